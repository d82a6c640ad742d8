//! The boot test: boot a raw disk image in QEMU with UEFI firmware (OVMF), no network, and
//! wait for the recipe's marker on the serial console.
//!
//! The image is attached as an NVMe drive (what EBS volumes are on Nitro instances) with
//! `snapshot=on`, so the guest's writes go to a temporary overlay and the image's bytes, and
//! so its digest, do not change. The firmware's variable store is a private copy. KVM is used
//! when `/dev/kvm` can be opened, software emulation (TCG) otherwise.
//!
//! What prints the marker is the image's business: bake boots exactly the bytes it uploads
//! and injects nothing (no test-only unit, loader entry or kernel option), so a passing test
//! says something about the AMI itself. A recipe typically installs a oneshot unit ordered
//! after `multi-user.target` that writes the marker to `/dev/ttyS0` (or `/dev/kmsg`) — which
//! also tells operators reading an instance's console output (`get-console-output`, the EC2
//! serial console) that the boot finished. The marker must end a console line, as a word of
//! its own (see [`is_marker`]): systemd's own `Starting …` lines name the unit, so a marker
//! that merely appears in a unit's name never counts.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::recipe::Test;

/// The UEFI firmware code (read-only) and the template of its variable store, as Debian's
/// `ovmf` package installs them.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// How many console lines a failure shows.
pub const CONSOLE_TAIL_LINES: usize = 40;
/// Memory of the test machine: enough for a cloud kernel and systemd, small enough for CI.
const DEFAULT_MEMORY_MIB: u32 = 1024;
/// How often the wait checks for cancellation.
const POLL: Duration = Duration::from_millis(200);
/// Longest console line kept (a guest can print anything).
const MAX_LINE_CHARS: usize = 4096;

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// The text to wait for on the serial console.
    pub marker: String,
    pub timeout: Duration,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accelerator: Accelerator,
    pub firmware_code: PathBuf,
    pub firmware_vars: PathBuf,
    /// Where to write the whole console output as it arrives (for CI artifacts).
    pub console_log: Option<PathBuf>,
    /// Set to stop waiting (Ctrl-C); the machine is killed.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl BootSpec {
    pub fn new(marker: impl Into<String>, timeout: Duration) -> Self {
        BootSpec {
            marker: marker.into(),
            timeout,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: 2,
            accelerator: Accelerator::Auto,
            firmware_code: PathBuf::from(OVMF_CODE),
            firmware_vars: PathBuf::from(OVMF_VARS),
            console_log: None,
            cancel: None,
        }
    }

    /// The spec of a recipe's `boot` test; `None` for other tests.
    pub fn from_test(test: &Test) -> Option<Self> {
        match test {
            Test::Boot { marker, timeout } => Some(BootSpec::new(marker.clone(), *timeout)),
            _ => None,
        }
    }
}

/// Which QEMU accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accelerator {
    /// KVM when `/dev/kvm` can be opened, else TCG.
    Auto,
    Kvm,
    /// Software emulation: slow, works anywhere.
    Tcg,
}

impl Accelerator {
    fn resolve(self) -> Accelerator {
        match self {
            Accelerator::Auto => {
                let usable = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                if usable {
                    Accelerator::Kvm
                } else {
                    Accelerator::Tcg
                }
            }
            other => other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Accelerator::Auto => "auto",
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// A passed boot test.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootReport {
    pub marker: String,
    /// From starting QEMU to seeing the marker.
    pub duration_ms: u64,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// The console line the marker was on.
    pub marker_line: String,
    pub console_lines: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("`qemu-system-x86_64` is not installed; bake needs it for boot tests")]
    NoQemu,
    #[error("the UEFI firmware `{}` is missing", path.display())]
    NoFirmware { path: PathBuf },
    #[error("boot tests support x86_64 images only")]
    Architecture,
    #[error("the disk image `{}` does not exist", path.display())]
    NoImage { path: PathBuf },
    #[error("failed to start QEMU")]
    Spawn(#[source] std::io::Error),
    #[error("failed to prepare the boot test in `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "boot test failed: `{marker}` did not appear on the serial console within {}s ({accelerator}); last console lines:\n{}",
        timeout.as_secs(),
        format_tail(last_lines)
    )]
    Timeout {
        marker: String,
        timeout: Duration,
        accelerator: String,
        last_lines: Vec<String>,
    },
    #[error(
        "boot test failed: the machine stopped ({status}) before `{marker}` appeared; last console lines:\n{}{}",
        format_tail(last_lines),
        qemu_stderr
    )]
    Exited {
        marker: String,
        status: String,
        last_lines: Vec<String>,
        /// What QEMU itself said, if anything (bad options, missing firmware).
        qemu_stderr: String,
    },
    #[error("the boot test was interrupted")]
    Interrupted,
}

impl BootError {
    pub fn hint(&self) -> Option<String> {
        match self {
            BootError::NoQemu => Some("install it with `apt-get install qemu-system-x86`".into()),
            BootError::NoFirmware { .. } => Some("install it with `apt-get install ovmf`".into()),
            BootError::Timeout { .. } => Some(
                "check that the image prints the marker at the end of a line on the serial console (a oneshot unit after multi-user.target running `echo MARKER >/dev/ttyS0`), or raise the test's `timeout`".into(),
            ),
            BootError::Exited { .. } => {
                Some("the kernel panicked or the machine rebooted: see the console lines".into())
            }
            _ => None,
        }
    }

    /// The last console lines, for a report.
    pub fn last_lines(&self) -> &[String] {
        match self {
            BootError::Timeout { last_lines, .. } | BootError::Exited { last_lines, .. } => {
                last_lines
            }
            _ => &[],
        }
    }

    /// Whether the image (so the recipe), not the machine, is at fault.
    pub fn is_recipe_failure(&self) -> bool {
        matches!(self, BootError::Timeout { .. } | BootError::Exited { .. })
    }
}

fn format_tail(lines: &[String]) -> String {
    if lines.is_empty() {
        "  (nothing)".into()
    } else {
        lines
            .iter()
            .map(|l| format!("  | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Kills and reaps QEMU (by its pid, through the `Child`) however the wait ends.
struct Machine {
    child: Child,
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Event {
    Line(String),
    /// The console closed: QEMU exited.
    Closed,
}

/// Boots `image` and waits for `spec.marker` on its serial console.
pub fn boot_test(image: &Path, spec: &BootSpec) -> Result<BootReport, BootError> {
    if !image.is_file() {
        return Err(BootError::NoImage {
            path: image.to_path_buf(),
        });
    }
    for firmware in [&spec.firmware_code, &spec.firmware_vars] {
        if !firmware.is_file() {
            return Err(BootError::NoFirmware {
                path: firmware.clone(),
            });
        }
    }
    let qemu = super::disk::which("qemu-system-x86_64").ok_or(BootError::NoQemu)?;
    let work = tempfile::Builder::new()
        .prefix("bake-boot-")
        .tempdir()
        .map_err(|source| BootError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let vars = work.path().join("OVMF_VARS.fd");
    fs_err::copy(&spec.firmware_vars, &vars).map_err(|source| BootError::Io {
        path: vars.clone(),
        source,
    })?;
    let accelerator = spec.accelerator.resolve();
    match boot_once(&qemu, image, &vars, spec, accelerator) {
        // KVM inside a VM can fail in ways no probe of /dev/kvm shows (nested virtualization
        // refusing an MSR, for one): QEMU dies before the firmware prints anything. Emulation
        // is slower but works wherever QEMU does.
        Err(BootError::Exited {
            last_lines,
            qemu_stderr,
            ..
        }) if spec.accelerator == Accelerator::Auto
            && accelerator == Accelerator::Kvm
            && last_lines.is_empty() =>
        {
            tracing::warn!(
                "KVM failed before the firmware started{}; booting with software emulation",
                qemu_stderr.replace('\n', " ")
            );
            fs_err::copy(&spec.firmware_vars, &vars).map_err(|source| BootError::Io {
                path: vars.clone(),
                source,
            })?;
            boot_once(&qemu, image, &vars, spec, Accelerator::Tcg)
        }
        other => other,
    }
}

/// One boot of `image` with `accelerator`.
fn boot_once(
    qemu: &Path,
    image: &Path,
    vars: &Path,
    spec: &BootSpec,
    accelerator: Accelerator,
) -> Result<BootReport, BootError> {
    let mut command = Command::new(qemu);
    command
        .args(["-machine", "q35", "-accel", accelerator.name()])
        .args(["-cpu", "max"])
        .args(["-m", &spec.memory_mib.to_string()])
        .args(["-smp", &spec.cpus.to_string()])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-nic", "none"])
        .arg("-drive")
        .arg(drive_arg(
            "if=pflash,format=raw,unit=0,readonly=on",
            &spec.firmware_code,
        ))
        .arg("-drive")
        .arg(drive_arg("if=pflash,format=raw,unit=1", vars))
        .arg("-drive")
        .arg(drive_arg("if=none,id=disk,format=raw,snapshot=on", image))
        .args(["-device", "nvme,drive=disk,serial=bake-boot-test"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let clock = Instant::now();
    let mut child = command.spawn().map_err(BootError::Spawn)?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let machine = Machine { child };

    let (sender, receiver) = mpsc::channel();
    let log = spec.console_log.clone();
    std::thread::spawn(move || read_console(stdout, log, sender));
    let stderr_thread = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    let mut tail: std::collections::VecDeque<String> = Default::default();
    let mut lines = 0;
    let deadline = clock + spec.timeout;
    let outcome = loop {
        if spec
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
        {
            break Err(BootError::Interrupted);
        }
        let now = Instant::now();
        if now >= deadline {
            break Err(BootError::Timeout {
                marker: spec.marker.clone(),
                timeout: spec.timeout,
                accelerator: accelerator.name().into(),
                last_lines: Vec::new(),
            });
        }
        match receiver.recv_timeout(POLL.min(deadline - now)) {
            Ok(Event::Line(line)) => {
                lines += 1;
                if is_marker(&line, &spec.marker) {
                    break Ok(BootReport {
                        marker: spec.marker.clone(),
                        duration_ms: clock.elapsed().as_millis() as u64,
                        accelerator: accelerator.name().into(),
                        marker_line: line,
                        console_lines: lines,
                    });
                }
                if tail.len() == CONSOLE_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Ok(Event::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(BootError::Exited {
                    marker: spec.marker.clone(),
                    status: String::new(),
                    last_lines: Vec::new(),
                    qemu_stderr: String::new(),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    // Stop the machine (by pid) and collect what QEMU said.
    let mut machine = machine;
    let _ = machine.child.kill();
    let status = machine.child.wait().ok();
    drop(machine);
    let qemu_stderr = stderr_thread.join().unwrap_or_default();
    outcome.map_err(|error| match error {
        BootError::Timeout {
            marker,
            timeout,
            accelerator,
            ..
        } => BootError::Timeout {
            marker,
            timeout,
            accelerator,
            last_lines: tail.into_iter().collect(),
        },
        BootError::Exited { marker, .. } => {
            let said = qemu_stderr.trim();
            BootError::Exited {
                marker,
                status: status.map_or_else(|| "unknown status".into(), |s| s.to_string()),
                last_lines: tail.into_iter().collect(),
                qemu_stderr: if said.is_empty() {
                    String::new()
                } else {
                    format!("\nQEMU said:\n{}", last_lines_of(said))
                },
            }
        }
        other => other,
    })
}

/// Whether a console line carries the marker: the line ends with it, as a word of its own
/// (at the start, or after a space, `:` or `]`). So a kernel log line (`[   12.345678]
/// MARKER`, from `/dev/kmsg`) and a marker written right after getty's prompt (`vm login:
/// MARKER`, which has no newline of its own) count, while systemd announcing a unit whose name
/// contains the marker (`Starting MARKER.service - …`) does not.
fn is_marker(line: &str, marker: &str) -> bool {
    let line = line.trim_end();
    line.strip_suffix(marker)
        .is_some_and(|before| before.is_empty() || before.ends_with([' ', ':', ']']))
}

/// The last lines of QEMU's own messages.
fn last_lines_of(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
}

/// A `-drive` argument naming `path`, with QEMU's comma escaping.
fn drive_arg(options: &str, path: &Path) -> String {
    format!(
        "{options},file={}",
        path.display().to_string().replace(',', ",,")
    )
}

/// Reads the console, line by line, cleaned of terminal escapes, into `sender` (and the log).
fn read_console(stdout: impl Read, log: Option<PathBuf>, sender: mpsc::Sender<Event>) {
    let mut log = log.and_then(|p| std::fs::File::create(p).ok());
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if let Some(file) = log.as_mut() {
                    let _ = std::io::Write::write_all(file, &raw);
                }
                // A carriage return starts the line over (systemd redraws its status line
                // that way): each piece is a line of its own.
                for piece in raw.split(|&b| b == b'\r') {
                    let line = clean_line(piece);
                    if line.is_empty() {
                        continue;
                    }
                    if sender.send(Event::Line(line)).is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = sender.send(Event::Closed);
}

/// A console line as text: ANSI escape sequences and control characters removed, trailing
/// spaces trimmed, and at most [`MAX_LINE_CHARS`] characters.
fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.peek() {
                Some('[') => {
                    chars.next();
                    // Parameters and intermediates, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                Some(_) => {
                    chars.next();
                }
                None => {}
            },
            '\t' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    let trimmed = out.trim_end();
    trimmed.chars().take(MAX_LINE_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_lose_escapes_and_control_characters() {
        assert_eq!(
            clean_line(b"\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[1mMulti-User\x1b[0m.\r\n"),
            "  OK  ] Reached target Multi-User."
        );
        assert_eq!(clean_line(b"\x1bcbake-boot-ok\r\n"), "bake-boot-ok");
        assert_eq!(clean_line(b"\r\n"), "");
    }

    #[test]
    fn failures_show_the_last_console_lines() {
        let error = BootError::Timeout {
            marker: "bake-boot-ok".into(),
            timeout: Duration::from_secs(30),
            accelerator: "kvm".into(),
            last_lines: vec!["Reached target Basic System.".into(), "login:".into()],
        };
        let text = error.to_string();
        assert!(text.contains("`bake-boot-ok` did not appear"), "{text}");
        assert!(text.contains("within 30s"), "{text}");
        assert!(
            text.ends_with("  | Reached target Basic System.\n  | login:"),
            "{text}"
        );
        assert_eq!(error.last_lines().len(), 2);
        assert!(error.is_recipe_failure());
    }

    #[test]
    fn the_marker_must_end_the_line_as_a_word() {
        assert!(is_marker("bake-boot-ok", "bake-boot-ok"));
        assert!(is_marker("  bake-boot-ok ", "bake-boot-ok"));
        assert!(is_marker("[   31.415926] bake-boot-ok", "bake-boot-ok"));
        assert!(is_marker("vm login: bake-boot-ok", "bake-boot-ok"));
        assert!(!is_marker(
            "         Starting bake-boot-ok.service - Report a finished boot...",
            "bake-boot-ok"
        ));
        assert!(!is_marker(
            "[  OK  ] Finished bake-boot-ok.service.",
            "bake-boot-ok"
        ));
        assert!(!is_marker("[ 1.0] bake-boot-ok-not", "bake-boot-ok"));
        assert!(!is_marker("not-bake-boot-ok", "bake-boot-ok"));
    }

    #[test]
    fn drive_paths_escape_commas() {
        assert_eq!(
            drive_arg("if=none", Path::new("/tmp/a,b.raw")),
            "if=none,file=/tmp/a,,b.raw"
        );
    }

    #[test]
    fn missing_images_and_firmware_are_reported() {
        let image = tempfile::NamedTempFile::new().unwrap();
        let error = boot_test(
            Path::new("/nonexistent.raw"),
            &BootSpec::new("x", Duration::from_secs(1)),
        )
        .unwrap_err();
        assert!(matches!(error, BootError::NoImage { .. }), "{error}");
        let mut spec = BootSpec::new("x", Duration::from_secs(1));
        spec.firmware_code = PathBuf::from("/nonexistent/OVMF_CODE.fd");
        let error = boot_test(image.path(), &spec).unwrap_err();
        assert!(matches!(error, BootError::NoFirmware { .. }), "{error}");
        assert!(error.to_string().contains("/nonexistent/OVMF_CODE.fd"));
        assert!(error.hint().unwrap().contains("ovmf"));
    }
}
