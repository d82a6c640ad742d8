//! [`NamespaceRunner`], bake's side of the daemonless runner: prepares the root on the host
//! (mount points, the user's ids, the environment, a placeholder for `/etc/resolv.conf`),
//! starts the helper (`bake __sandbox`, see [`super::sandbox`]) with the spec on a socket,
//! streams the step's output line by line, and turns the helper's report into a result.
//!
//! Mount points the image lacks (`/proc`, `/dev`, `/tmp`) are created and kept, and reported
//! in [`StepOutcome::created`]. A missing `/etc/resolv.conf` (or `/etc`) created only to bind
//! the host's onto is removed after the step, so no host DNS setting reaches the image.
//!
//! The helper enforces the step's timeout; bake keeps a backstop a little later in case the
//! helper itself hangs, and kills it, which kills the sandbox through its death signal.
//! Linux sends that death signal when the *thread* that started the helper exits, not the
//! process; `run` blocks its thread until the helper is gone, so the two cannot part early.
//!
//! One step at a time per root: two steps in the same root at once would race for its mount
//! points and see each other's files.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use fs_err::os::unix::fs::OpenOptionsExt;

use super::protocol::{Bind, MountTargets, Report, SANDBOX_SUBCOMMAND, SandboxSpec};
use super::root_path::{DirAttrs, ensure_dir, is_host_root, resolve_in_root};
use super::user::{ResolvedUser, resolve_user};
use super::{
    DEFAULT_PATH, Runner, RunnerError, StepOutcome, StepOutput, StepSpec, Stream, Tail, image_path,
};

/// How long after the step's timeout bake stops waiting for the helper's own report and kills
/// it. The kernel tears a pid namespace down in milliseconds; this only matters if the helper
/// itself hangs.
const HELPER_GRACE: Duration = Duration::from_secs(10);

/// A line longer than this is passed on in pieces, so that a step printing without newlines
/// (a progress bar, a binary) cannot make bake buffer without bound.
const MAX_LINE_BYTES: usize = 16 * 1024;

/// The host's resolver configuration, bound into steps that have the network.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// Mount points a step needs, with the mode each gets when bake has to create it.
const MOUNT_POINTS: [(&str, u32); 3] = [("/proc", 0o555), ("/dev", 0o755), ("/tmp", 0o1777)];

/// Directories bake creates in an image: root's, like the rest of a base system.
const ROOT_DIR: DirAttrs = DirAttrs {
    mode: 0o755,
    uid: 0,
    gid: 0,
};

/// Runs steps in Linux namespaces through a helper process; needs root.
#[derive(Debug, Clone)]
pub struct NamespaceRunner {
    helper: PathBuf,
}

impl NamespaceRunner {
    /// A runner whose helper is this very executable (`bake __sandbox`).
    pub fn new() -> io::Result<Self> {
        Ok(NamespaceRunner {
            helper: std::env::current_exe()?,
        })
    }

    /// A runner whose helper is another bake binary (tests use `CARGO_BIN_EXE_bake`, since the
    /// test binary itself has no `__sandbox` subcommand).
    pub fn with_helper(helper: impl Into<PathBuf>) -> Self {
        NamespaceRunner {
            helper: helper.into(),
        }
    }

    pub fn helper(&self) -> &Path {
        &self.helper
    }
}

impl Runner for NamespaceRunner {
    fn name(&self) -> &str {
        "namespace"
    }

    fn run(
        &self,
        step: &StepSpec,
        output: &mut dyn StepOutput,
    ) -> Result<StepOutcome, RunnerError> {
        let started = Instant::now();
        if !nix::unistd::geteuid().is_root() {
            return Err(RunnerError::NeedsRoot {
                step: step.step.clone(),
            });
        }
        let mut prepared = Prepared::default();
        let result = prepared
            .prepare(step)
            .and_then(|spec| self.run_sandbox(step, &spec, output));
        let cleanup = prepared.clean_up(&step.step);
        let outcome = match (result, cleanup) {
            (Ok(code), Ok(())) => code,
            (Ok(_), Err(cleanup)) => return Err(cleanup),
            (Err(error), cleanup) => {
                if let Err(cleanup) = cleanup {
                    tracing::warn!("{cleanup}: {}", error_chain(&cleanup));
                }
                return Err(error);
            }
        };
        Ok(StepOutcome {
            exit_code: outcome,
            duration: started.elapsed(),
            created: prepared.created,
        })
    }
}

/// What bake changed in the root before the step.
#[derive(Debug, Default)]
struct Prepared {
    /// Kept mount points, as image paths.
    created: Vec<String>,
    /// Removed after the step, last first.
    temporary: Vec<PathBuf>,
}

impl Prepared {
    fn prepare(&mut self, step: &StepSpec) -> Result<SandboxSpec, RunnerError> {
        let prepare_error = |path: &Path| {
            let path = path.to_owned();
            move |source| RunnerError::Prepare {
                step: step.step.clone(),
                path,
                source,
            }
        };
        let root = fs_err::canonicalize(&step.root).map_err(prepare_error(&step.root))?;
        if !root.is_dir() {
            return Err(prepare_error(&root)(io::Error::new(
                io::ErrorKind::NotADirectory,
                "the build root is not a directory",
            )));
        }
        if is_host_root(&root).map_err(prepare_error(&root))? {
            return Err(RunnerError::HostRoot {
                step: step.step.clone(),
                root,
            });
        }
        let mut targets = Vec::new();
        for (path, mode) in MOUNT_POINTS {
            let (host, created) = ensure_dir(
                &root,
                Path::new(path),
                DirAttrs { mode, ..ROOT_DIR },
                ROOT_DIR,
            )
            .map_err(prepare_error(&root.join(&path[1..])))?;
            self.created
                .extend(created.iter().map(|p| image_path(&root, p)));
            targets.push(host);
        }
        let [proc, dev, tmp] = <[PathBuf; 3]>::try_from(targets).expect("three mount points");
        let user = step.user.as_deref();
        let resolved = resolve_user(&root, user).map_err(|source| RunnerError::User {
            step: step.step.clone(),
            user: user.unwrap_or("root").to_owned(),
            source,
        })?;
        let env = environment(step, &resolved)?;
        // Last, so that nothing fails after the placeholder exists (it is cleaned up anyway).
        let resolv_conf = if step.network {
            self.resolv_conf(&root)
                .map_err(|(path, source)| RunnerError::Prepare {
                    step: step.step.clone(),
                    path,
                    source,
                })?
        } else {
            None
        };
        Ok(SandboxSpec {
            parent_pid: std::process::id() as i32,
            mounts: MountTargets { proc, dev, tmp },
            hostname: step.hostname.clone(),
            network: step.network,
            resolv_conf,
            workdir: step.workdir.clone().unwrap_or_else(|| "/".to_owned()),
            uid: resolved.uid,
            gid: resolved.gid,
            groups: resolved.groups,
            env,
            script: step.script.clone(),
            timeout_ms: u64::try_from(step.timeout.as_millis()).unwrap_or(u64::MAX),
            root,
        })
    }

    /// The bind of the host's resolver configuration, creating an empty file (and `/etc`) to
    /// bind onto when the image has none.
    fn resolv_conf(&mut self, root: &Path) -> Result<Option<Bind>, (PathBuf, io::Error)> {
        let source = match fs_err::canonicalize(HOST_RESOLV_CONF) {
            Ok(source) => source,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                tracing::warn!("the host has no {HOST_RESOLV_CONF}; the step gets none either");
                return Ok(None);
            }
            Err(error) => return Err((HOST_RESOLV_CONF.into(), error)),
        };
        let target = resolve_in_root(root, Path::new(HOST_RESOLV_CONF))
            .map_err(|e| (root.join("etc/resolv.conf"), e))?;
        match fs_err::symlink_metadata(&target) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => {
                return Err((
                    target,
                    io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
                ));
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let parent = target.parent().expect("resolved paths are inside the root");
                let relative = parent.strip_prefix(root).expect("inside the root");
                let (_, dirs) = ensure_dir(root, relative, ROOT_DIR, ROOT_DIR)
                    .map_err(|e| (parent.to_owned(), e))?;
                self.temporary.extend(dirs);
                fs_err::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&target)
                    .map_err(|e| (target.clone(), e))?;
                self.temporary.push(target.clone());
            }
            Err(error) => return Err((target, error)),
        }
        Ok(Some(Bind { source, target }))
    }

    /// Removes the temporary files, last created first. A directory the step put something
    /// into is the step's now, and stays.
    fn clean_up(&mut self, step: &str) -> Result<(), RunnerError> {
        let mut first_error = None;
        for path in self.temporary.drain(..).rev() {
            let removed = match fs_err::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => match fs_err::remove_dir(&path) {
                    Err(error) if error.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(()),
                    other => other,
                },
                Ok(_) => fs_err::remove_file(&path),
                Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(error) => Err(error),
            };
            if let Err(source) = removed {
                first_error.get_or_insert(RunnerError::Cleanup {
                    step: step.to_owned(),
                    path,
                    source,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The step's complete environment: the defaults, then the step's own (which may override
/// them). Nothing comes from bake's environment.
fn environment(step: &StepSpec, user: &ResolvedUser) -> Result<Vec<(String, String)>, RunnerError> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOME".to_owned(), user.home.clone()),
        ("DEBIAN_FRONTEND".to_owned(), "noninteractive".to_owned()),
    ]);
    for (name, value) in &step.env {
        let problem = if name.is_empty() || name.contains(['=', '\0']) {
            Some("is not a valid name")
        } else if value.contains('\0') {
            Some("contains a NUL byte")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(RunnerError::Env {
                step: step.step.clone(),
                name: name.clone(),
                problem,
            });
        }
        env.insert(name.clone(), value.clone());
    }
    Ok(env.into_iter().collect())
}

impl NamespaceRunner {
    /// Starts the helper, streams the output, and maps the report; returns the exit code.
    fn run_sandbox(
        &self,
        step: &StepSpec,
        spec: &SandboxSpec,
        output: &mut dyn StepOutput,
    ) -> Result<i32, RunnerError> {
        let payload = serde_json::to_vec(spec).expect("sandbox specs always serialize");
        let spawn_error = |source| RunnerError::Spawn {
            step: step.step.clone(),
            helper: self.helper.clone(),
            source,
        };
        let (control, helper_end) = UnixStream::pair().map_err(spawn_error)?;
        let mut helper = Command::new(&self.helper)
            .arg(SANDBOX_SUBCOMMAND)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::from(OwnedFd::from(helper_end)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        let stdout = helper.stdout.take().expect("stdout is piped");
        let stderr = helper.stderr.take().expect("stderr is piped");

        let backstop = step
            .timeout
            .checked_add(HELPER_GRACE)
            .and_then(|d| Instant::now().checked_add(d));
        let mut tail = Tail::default();
        let mut backstop_fired = false;
        let (lines, received) = mpsc::channel();
        let report = thread::scope(|scope| {
            let to_main = lines.clone();
            scope.spawn(move || forward_lines(stdout, Stream::Stdout, &to_main));
            scope.spawn(move || forward_lines(stderr, Stream::Stderr, &lines));
            let exchange = scope.spawn(|| exchange(&control, &payload));
            loop {
                let next = match backstop {
                    Some(at) if !backstop_fired => {
                        received.recv_timeout(at.saturating_duration_since(Instant::now()))
                    }
                    _ => received.recv().map_err(|_| RecvTimeoutError::Disconnected),
                };
                match next {
                    Ok((stream, line)) => {
                        tail.push(&line);
                        output.line(&step.step, stream, &line);
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        backstop_fired = true;
                        let _ = helper.kill();
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            exchange.join().expect("the exchange thread does not panic")
        });
        let status = helper.wait();
        let last_lines = tail.into_lines();
        let problem = |problem: String| RunnerError::Helper {
            step: step.step.clone(),
            problem,
        };
        if backstop_fired {
            return Err(RunnerError::TimedOut {
                step: step.step.clone(),
                timeout: step.timeout,
                last_lines,
            });
        }
        let report = match report {
            Ok(bytes) if bytes.is_empty() => {
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                return Err(problem(format!(
                    "ended ({status}) without saying how the step went"
                )));
            }
            Ok(bytes) => serde_json::from_slice::<Report>(&bytes)
                .map_err(|e| problem(format!("sent a report bake cannot read: {e}")))?,
            Err(error) => return Err(problem(format!("could not be talked to: {error}"))),
        };
        match report {
            Report::Exited { code } if code == step.expected_exit_code => Ok(code),
            Report::Exited { code } => Err(RunnerError::StepFailed {
                step: step.step.clone(),
                code,
                last_lines,
            }),
            Report::Signaled { signal } => Err(RunnerError::StepKilled {
                step: step.step.clone(),
                signal,
                last_lines,
            }),
            Report::TimedOut => Err(RunnerError::TimedOut {
                step: step.step.clone(),
                timeout: step.timeout,
                last_lines,
            }),
            Report::Interrupted { signal } => Err(RunnerError::Interrupted {
                step: step.step.clone(),
                signal,
            }),
            Report::SetupFailed {
                stage,
                errno,
                message,
            } => Err(RunnerError::Setup {
                step: step.step.clone(),
                stage,
                source: errno
                    .map_or_else(|| io::Error::other(message), io::Error::from_raw_os_error),
            }),
        }
    }
}

/// Sends the spec, closes the sending side, and reads the report until the helper exits.
fn exchange(control: &UnixStream, payload: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = control;
    stream.write_all(payload)?;
    stream.shutdown(Shutdown::Write)?;
    let mut report = Vec::new();
    stream.read_to_end(&mut report)?;
    Ok(report)
}

/// Reads lines (or [`MAX_LINE_BYTES`] pieces) from one of the step's streams until it closes.
fn forward_lines(reader: impl Read, stream: Stream, to: &mpsc::Sender<(Stream, String)>) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE_BYTES as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        let text = String::from_utf8_lossy(&line).into_owned();
        if to.send((stream, text)).is_err() {
            return;
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut causes = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    causes.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(input: &[u8]) -> Vec<String> {
        let (to, from) = mpsc::channel();
        forward_lines(input, Stream::Stdout, &to);
        drop(to);
        from.into_iter().map(|(_, line)| line).collect()
    }

    #[test]
    fn lines_lose_their_terminators_and_invalid_utf8() {
        assert_eq!(
            collect(b"one\r\ntwo\nthree\xff"),
            ["one", "two", "three\u{fffd}"]
        );
    }

    #[test]
    fn endless_lines_come_in_pieces() {
        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        let lines = collect(&long);
        assert_eq!(
            lines.iter().map(String::len).collect::<Vec<_>>(),
            [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]
        );
    }

    #[test]
    fn the_environment_starts_clean_and_the_step_may_override_it() {
        let user = ResolvedUser {
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            home: "/home/app".into(),
        };
        let mut step = StepSpec::new("/r", "s", "true", Duration::from_secs(1));
        step.env.insert("PATH".into(), "/opt/bin:/usr/bin".into());
        step.env.insert("GREETING".into(), "hello world".into());
        let env = environment(&step, &user).unwrap();
        assert_eq!(
            env,
            [
                ("DEBIAN_FRONTEND".to_owned(), "noninteractive".to_owned()),
                ("GREETING".to_owned(), "hello world".to_owned()),
                ("HOME".to_owned(), "/home/app".to_owned()),
                ("PATH".to_owned(), "/opt/bin:/usr/bin".to_owned()),
            ]
        );
        step.env.insert("A=B".into(), "x".into());
        assert!(matches!(
            environment(&step, &user),
            Err(RunnerError::Env { name, .. }) if name == "A=B"
        ));
    }

    fn rooted() -> Option<tempfile::TempDir> {
        if !crate::skip::root("preparing mount points chowns to root") {
            return None;
        }
        Some(tempfile::tempdir().unwrap())
    }

    #[test]
    fn missing_mount_points_are_created_kept_and_reported() {
        let Some(dir) = rooted() else { return };
        let root = dir.path().join("root");
        fs_err::create_dir_all(root.join("tmp")).unwrap();
        std::os::unix::fs::symlink("/does-not-exist", root.join("dev")).unwrap();
        let step = StepSpec::new(&root, "s", "true", Duration::from_secs(1));
        let mut prepared = Prepared::default();
        let spec = prepared.prepare(&step).unwrap();
        // `/dev` is a dangling absolute symlink: it resolves inside the root, never on the host.
        assert_eq!(prepared.created, ["/proc", "/does-not-exist"]);
        assert_eq!(spec.mounts.dev, root.join("does-not-exist"));
        assert!(!Path::new("/does-not-exist").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs_err::metadata(root.join("proc"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o555);
        assert!(spec.resolv_conf.is_none());
        prepared.clean_up("s").unwrap();
        assert!(root.join("proc").is_dir(), "mount points are kept");
    }

    #[test]
    fn a_resolv_conf_placeholder_is_removed_after_the_step() {
        let Some(dir) = rooted() else { return };
        if !Path::new(HOST_RESOLV_CONF).exists() {
            crate::skip::skip(&format!("the host's {HOST_RESOLV_CONF}"));
            return;
        }
        let root = dir.path().join("root");
        fs_err::create_dir_all(&root).unwrap();
        let mut step = StepSpec::new(&root, "s", "true", Duration::from_secs(1));
        step.network = true;
        let mut prepared = Prepared::default();
        let spec = prepared.prepare(&step).unwrap();
        let bind = spec.resolv_conf.unwrap();
        assert_eq!(bind.target, root.join("etc/resolv.conf"));
        assert!(bind.target.is_file());
        prepared.clean_up("s").unwrap();
        assert!(
            !root.join("etc").exists(),
            "the placeholder and its /etc are gone"
        );
    }

    #[test]
    fn unknown_users_fail_before_anything_runs() {
        let Some(dir) = rooted() else { return };
        let mut step = StepSpec::new(dir.path(), "s", "true", Duration::from_secs(1));
        step.user = Some("nobody-here".into());
        let error = Prepared::default().prepare(&step).unwrap_err();
        assert!(matches!(error, RunnerError::User { ref user, .. } if user == "nobody-here"));
    }
}
