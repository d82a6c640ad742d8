//! Provisioning runners: run a recipe's shell steps inside an image's root filesystem, isolated
//! from the host, and copy `file` sources into that root from the host side.
//!
//! [`Runner`] is the narrow trait the build calls (synchronously, from `spawn_blocking`):
//! - [`NamespaceRunner`] is the daemonless implementation. It starts a fresh helper process
//!   (`bake __sandbox`, see [`sandbox`]) that puts the step in new mount, pid, UTS, IPC and
//!   (unless the step asks for the network) network namespaces, pivots into the root, and
//!   drops the capabilities that would let it out again;
//! - [`RecordingRunner`] is the fake for unit tests of callers: it records every step and plays
//!   back scripted results.
//!
//! [`copy_into_root`] writes host files into the root the way `cp` inside a `chroot` would:
//! symlinks in the root are followed as the image sees them, and nothing ever lands outside it.

mod copy;
mod fake;
mod namespace;
mod protocol;
mod root_path;
pub mod sandbox;
mod user;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use copy::{CopyError, CopyOptions, CopyReport, copy_into_root};
pub use fake::{FakeResult, RecordingRunner};
pub use namespace::NamespaceRunner;
pub use root_path::resolve_in_root;
pub use user::{ResolvedUser, UserError, resolve_user};

/// How many of a step's last output lines an error carries: enough to show an apt or compiler
/// error in full, few enough that the error stays readable above everything the step printed.
pub const LAST_LINES: usize = 20;

/// The hostname a step sees when its spec does not choose one.
pub const DEFAULT_HOSTNAME: &str = "bake";

/// `PATH` inside the sandbox unless the step sets its own: Debian's default for root, which is
/// also Docker's, so scripts find `/usr/sbin` tools such as `useradd` and `update-alternatives`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs provisioning steps against a root filesystem.
///
/// Implementations block until the step is over; async callers use `spawn_blocking`.
pub trait Runner: Send + Sync {
    /// A short name for logs and provenance (`namespace`, `recording`, …).
    fn name(&self) -> &str;

    /// Runs one shell step, streaming its output lines to `output` as they come.
    ///
    /// An exit code other than [`StepSpec::expected_exit_code`] is
    /// [`RunnerError::StepFailed`], with the step's last lines.
    fn run(&self, step: &StepSpec, output: &mut dyn StepOutput)
    -> Result<StepOutcome, RunnerError>;

    /// The Docker Engine this runner provisions in, when the build's state lives there rather
    /// than in a root directory on the host (the Docker runner, see [`crate::build::engine`]).
    fn engine(&self) -> Option<&crate::build::engine::Engine> {
        None
    }
}

/// One shell step, ready to run: templates rendered, paths absolute.
#[derive(Clone)]
pub struct StepSpec {
    /// The build root: the image's root filesystem on the host.
    pub root: PathBuf,
    /// The step's name, for the output prefix and messages.
    pub step: String,
    /// The rendered script. Without a `#!` line it runs under `/bin/sh -e` (Packer's default
    /// for inline scripts, and GitHub Actions' for `sh`), so a failing command fails the step.
    pub script: String,
    /// Added to (and overriding) the sandbox's default environment: `PATH`, `HOME`,
    /// `DEBIAN_FRONTEND=noninteractive`. Nothing from bake's own environment gets in.
    pub env: BTreeMap<String, String>,
    /// The directory the script starts in, as a path in the image; `/` when `None`.
    pub workdir: Option<String>,
    /// `name`, `uid`, `name:group` or `uid:gid`, resolved against the image's `/etc/passwd`
    /// and `/etc/group`; root when `None`.
    pub user: Option<String>,
    /// Share the host's network (and its `/etc/resolv.conf`); otherwise the step gets a network
    /// namespace of its own with only a loopback interface.
    pub network: bool,
    /// The sandbox is killed, every process in it, when this runs out.
    pub timeout: Duration,
    pub hostname: String,
    /// The exit code that counts as success (0 for provisioning; a `command` test may expect
    /// another).
    pub expected_exit_code: i32,
}

impl StepSpec {
    /// A step with the defaults: root user, `/`, no network, [`DEFAULT_HOSTNAME`], expected
    /// exit code 0.
    pub fn new(
        root: impl Into<PathBuf>,
        step: impl Into<String>,
        script: impl Into<String>,
        timeout: Duration,
    ) -> Self {
        StepSpec {
            root: root.into(),
            step: step.into(),
            script: script.into(),
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            network: false,
            timeout,
            hostname: DEFAULT_HOSTNAME.to_owned(),
            expected_exit_code: 0,
        }
    }
}

/// The script and the environment values may carry rendered secrets: `Debug` shows the
/// variable names and the script's size, never their contents.
impl fmt::Debug for StepSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepSpec")
            .field("root", &self.root)
            .field("step", &self.step)
            .field("script", &format_args!("<{} bytes>", self.script.len()))
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("workdir", &self.workdir)
            .field("user", &self.user)
            .field("network", &self.network)
            .field("timeout", &self.timeout)
            .field("hostname", &self.hostname)
            .field("expected_exit_code", &self.expected_exit_code)
            .finish()
    }
}

/// Which of the step's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Receives a step's output as it runs, one line at a time (without the line terminator;
/// invalid UTF-8 is replaced). Lines of one stream arrive in order; stdout and stderr are
/// separate pipes, so between the two the order is only as close as the pipes deliver it.
pub trait StepOutput {
    fn line(&mut self, step: &str, stream: Stream, line: &str);
}

/// One line of a step's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub stream: Stream,
    pub text: String,
}

/// Collects the lines, for tests and for callers that inspect output (a `command` test's
/// `stdout_contains`).
impl StepOutput for Vec<OutputLine> {
    fn line(&mut self, _step: &str, stream: Stream, line: &str) {
        self.push(OutputLine {
            stream,
            text: line.to_owned(),
        });
    }
}

/// Writes each line as `STEP | LINE`, the way the CLI shows provisioning on stderr.
#[derive(Debug)]
pub struct PrefixedOutput<W> {
    writer: W,
}

impl<W: std::io::Write> PrefixedOutput<W> {
    pub fn new(writer: W) -> Self {
        PrefixedOutput { writer }
    }
}

impl<W: std::io::Write> StepOutput for PrefixedOutput<W> {
    fn line(&mut self, step: &str, _stream: Stream, line: &str) {
        // Progress output is best effort: a closed stderr must not fail the build.
        let _ = writeln!(self.writer, "{step} | {line}");
    }
}

/// What a successful step reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    pub exit_code: i32,
    pub duration: Duration,
    /// Mount points the runner had to create because the image lacked them (`/proc`, `/dev`,
    /// `/tmp`), as paths in the image. They are kept: every Linux image has them, and an image
    /// without them cannot be provisioned again. The layer builder sees them as added.
    pub created: Vec<String>,
}

/// Why a step did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("step `{step}` failed with exit code {code}{}", tail(last_lines))]
    StepFailed {
        step: String,
        code: i32,
        last_lines: Vec<String>,
    },
    #[error("step `{step}` was killed by signal {signal}{}", tail(last_lines))]
    StepKilled {
        step: String,
        signal: i32,
        last_lines: Vec<String>,
    },
    #[error(
        "step `{step}` timed out after {}{}",
        humantime::format_duration(*timeout),
        tail(last_lines)
    )]
    TimedOut {
        step: String,
        timeout: Duration,
        last_lines: Vec<String>,
    },
    #[error("step `{step}` was interrupted by signal {signal}")]
    Interrupted { step: String, signal: i32 },
    #[error("the namespace runner needs root to run step `{step}`")]
    NeedsRoot { step: String },
    #[error("refusing to run step `{step}` in `{}`: it is the host's own root filesystem", root.display())]
    HostRoot { step: String, root: PathBuf },
    #[error("failed to prepare `{}` for step `{step}`", path.display())]
    Prepare {
        step: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to resolve user `{user}` for step `{step}`")]
    User {
        step: String,
        user: String,
        #[source]
        source: UserError,
    },
    #[error("environment variable `{name}` of step `{step}` {problem}")]
    Env {
        step: String,
        name: String,
        problem: &'static str,
    },
    #[error("failed to start the sandbox helper `{}` for step `{step}`", helper.display())]
    Spawn {
        step: String,
        helper: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to set up the sandbox for step `{step}`: {stage}")]
    Setup {
        step: String,
        stage: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the sandbox helper for step `{step}` {problem}")]
    Helper { step: String, problem: String },
    #[error("the Docker Engine failed step `{step}`")]
    Engine {
        step: String,
        #[source]
        source: Box<crate::build::engine::EngineError>,
    },
    #[error("failed to remove `{}` after step `{step}`", path.display())]
    Cleanup {
        step: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RunnerError {
    /// A fix bake knows, if any.
    pub fn hint(&self) -> Option<String> {
        match self {
            RunnerError::NeedsRoot { .. } => Some(
                "run bake as root (namespaces and mounts need it), or build in a Docker Engine \
                 you can reach: `bake build --runner docker` (or `build.runner: docker`)"
                    .into(),
            ),
            RunnerError::Engine { source, .. } => source.hint(),
            RunnerError::TimedOut { .. } => {
                Some("raise the step's `timeout` if it needs longer".into())
            }
            RunnerError::Setup { stage, source, .. }
                if stage.starts_with("execute")
                    && source.kind() == std::io::ErrorKind::NotFound =>
            {
                Some(
                    "shell steps need `/bin/sh` in the image, or the interpreter named on the \
                     script's `#!` line"
                        .into(),
                )
            }
            RunnerError::Spawn { .. } => Some(
                "the namespace runner re-executes bake itself; check that the binary still exists"
                    .into(),
            ),
            _ => None,
        }
    }

    /// The step's last output lines, when the step itself ran.
    pub fn last_lines(&self) -> &[String] {
        match self {
            RunnerError::StepFailed { last_lines, .. }
            | RunnerError::StepKilled { last_lines, .. }
            | RunnerError::TimedOut { last_lines, .. } => last_lines,
            _ => &[],
        }
    }

    /// The step's last output lines, to rewrite them (redaction).
    pub fn last_lines_mut(&mut self) -> &mut [String] {
        match self {
            RunnerError::StepFailed { last_lines, .. }
            | RunnerError::StepKilled { last_lines, .. }
            | RunnerError::TimedOut { last_lines, .. } => last_lines,
            _ => &mut [],
        }
    }
}

/// The last lines, indented under the message, or nothing.
fn tail(lines: &[String]) -> String {
    if lines.is_empty() {
        return "; it printed nothing".to_owned();
    }
    let mut shown = String::from("; its last lines:");
    for line in lines {
        shown.push_str("\n  | ");
        shown.push_str(line);
    }
    shown
}

/// The last [`LAST_LINES`] lines a step printed, on both streams, in order.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    lines: VecDeque<String>,
}

impl Tail {
    pub(crate) fn push(&mut self, line: &str) {
        if self.lines.len() == LAST_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line.to_owned());
    }

    pub(crate) fn into_lines(self) -> Vec<String> {
        self.lines.into()
    }
}

/// A path in the image, for messages: `/` joined with the path relative to the root.
pub(crate) fn image_path(root: &Path, host: &Path) -> String {
    match host.strip_prefix(root) {
        Ok(relative) => format!("/{}", relative.display()),
        Err(_) => host.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines_in_order() {
        let mut tail = Tail::default();
        for n in 0..LAST_LINES + 5 {
            tail.push(&format!("line {n}"));
        }
        let lines = tail.into_lines();
        assert_eq!(lines.len(), LAST_LINES);
        assert_eq!(lines[0], "line 5");
        assert_eq!(lines[LAST_LINES - 1], format!("line {}", LAST_LINES + 4));
    }

    #[test]
    fn step_failed_shows_the_code_and_the_last_lines() {
        let error = RunnerError::StepFailed {
            step: "install packages".into(),
            code: 100,
            last_lines: vec![
                "Reading package lists...".into(),
                "E: Unable to locate package nginx-ful".into(),
            ],
        };
        insta::assert_snapshot!(error.to_string(), @r"
        step `install packages` failed with exit code 100; its last lines:
          | Reading package lists...
          | E: Unable to locate package nginx-ful
        ");
    }

    #[test]
    fn timeout_and_silence_read_well() {
        let error = RunnerError::TimedOut {
            step: "compile".into(),
            timeout: Duration::from_secs(90),
            last_lines: Vec::new(),
        };
        insta::assert_snapshot!(error.to_string(), @"step `compile` timed out after 1m 30s; it printed nothing");
        assert!(error.hint().is_some());
    }

    #[test]
    fn debug_never_shows_the_script_or_env_values() {
        let mut spec = StepSpec::new("/r", "s", "echo hunter2", Duration::from_secs(1));
        spec.env.insert("TOKEN".into(), "hunter2".into());
        let shown = format!("{spec:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("TOKEN"), "{shown}");
    }

    #[test]
    fn prefixed_output_prefixes_each_line_with_the_step() {
        let mut out = PrefixedOutput::new(Vec::new());
        out.line("base", Stream::Stdout, "hello");
        out.line("base", Stream::Stderr, "oops");
        assert_eq!(
            String::from_utf8(out.writer).unwrap(),
            "base | hello\nbase | oops\n"
        );
    }

    #[test]
    fn image_path_is_rooted() {
        let root = Path::new("/var/build/root");
        assert_eq!(image_path(root, &root.join("etc/passwd")), "/etc/passwd");
        assert_eq!(image_path(root, root), "/");
    }
}
