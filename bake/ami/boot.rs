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
//!
//! A machine can stop without QEMU exiting: when KVM cannot run the guest (common under nested
//! virtualisation, where `/dev/kvm` opens but an instruction cannot be emulated), QEMU prints
//! `KVM internal error` and **pauses** the VM. The wait therefore watches QEMU's stderr and asks
//! QEMU's monitor (QMP `query-status`) for the VM's state, so a stopped machine is noticed
//! within seconds rather than at the timeout. When the accelerator was chosen automatically,
//! a KVM failure falls back to software emulation (TCG); when KVM was asked for, it fails with
//! QEMU's own message. Every boot failure shows what QEMU said.

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
/// The KVM device; `auto` uses KVM when it opens (and falls back when KVM then fails).
pub const KVM_DEVICE: &str = "/dev/kvm";
/// How many console lines a failure shows.
pub const CONSOLE_TAIL_LINES: usize = 40;
/// Memory of the test machine: enough for a cloud kernel and systemd, small enough for CI.
const DEFAULT_MEMORY_MIB: u32 = 1024;
/// How often the wait checks for cancellation.
const POLL: Duration = Duration::from_millis(200);
/// Longest console line kept (a guest can print anything).
const MAX_LINE_CHARS: usize = 4096;
/// How often QEMU's monitor is asked for the VM's state: a stopped VM is seen within this.
const STATUS_POLL: Duration = Duration::from_secs(1);
/// How long the monitor's socket may take to appear after QEMU starts. A QEMU that never
/// opens it (an old build, a wrapper) is still watched through its stderr and exit.
const MONITOR_CONNECT: Duration = Duration::from_secs(10);
/// Under KVM the firmware prints its first console line within seconds. A machine that stays
/// silent this long under an automatically chosen KVM is taken for a KVM that cannot run the
/// guest (some nested hosts hang it without a word), and the boot falls back to TCG.
const KVM_SILENCE: Duration = Duration::from_secs(60);
/// How long to wait for QEMU's last words after it was killed.
const DRAIN: Duration = Duration::from_secs(2);
/// VM states (QMP `query-status`) in which the guest will never print the marker.
const STOPPED_STATES: [&str; 4] = ["internal-error", "guest-panicked", "io-error", "shutdown"];
/// What QEMU prints on stderr when the accelerator fails under a guest (its `kvm_cpu_exec`
/// and `kvm_handle_internal_error` messages).
const ACCELERATOR_FAILURES: [&str; 3] =
    ["KVM internal error", "KVM: entry failed", "kvm run failed"];

/// How to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// The text to wait for on the serial console.
    pub marker: String,
    pub timeout: Duration,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accelerator: Accelerator,
    /// The QEMU binary; `None` finds `qemu-system-x86_64` on `PATH`.
    pub qemu: Option<PathBuf>,
    /// The device whose opening tells `auto` that KVM is there.
    pub kvm_device: PathBuf,
    /// With `auto`: how long KVM may leave the console silent before the boot falls back.
    pub kvm_silence: Duration,
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
            qemu: None,
            kvm_device: PathBuf::from(KVM_DEVICE),
            kvm_silence: KVM_SILENCE,
            firmware_code: PathBuf::from(OVMF_CODE),
            firmware_vars: PathBuf::from(OVMF_VARS),
            console_log: None,
            cancel: None,
        }
    }

    /// The spec of a recipe's `boot` test; `None` for other tests.
    pub fn from_test(test: &Test) -> Option<Self> {
        match test {
            Test::Boot {
                marker,
                timeout,
                accelerator,
            } => {
                let mut spec = BootSpec::new(marker.clone(), *timeout);
                spec.accelerator = *accelerator;
                Some(spec)
            }
            _ => None,
        }
    }
}

/// Which QEMU accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Accelerator {
    /// KVM when `/dev/kvm` can be opened, else TCG; TCG again when KVM cannot run the guest.
    #[default]
    Auto,
    Kvm,
    /// Software emulation: slow, works anywhere.
    Tcg,
}

impl Accelerator {
    fn resolve(self, kvm_device: &Path) -> Accelerator {
        match self {
            Accelerator::Auto => {
                let usable = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(kvm_device)
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

    pub fn name(self) -> &'static str {
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
    /// Why KVM was given up for software emulation, when it was (QEMU's own words).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kvm_fallback: Option<String>,
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
        "boot test failed: `{marker}` did not appear on the serial console within {}s ({accelerator}); last console lines:\n{}{}",
        timeout.as_secs(),
        format_tail(last_lines),
        format_qemu(qemu_stderr)
    )]
    Timeout {
        marker: String,
        timeout: Duration,
        accelerator: String,
        last_lines: Vec<String>,
        /// What QEMU itself said, if anything.
        qemu_stderr: String,
    },
    #[error(
        "boot test failed: the machine stopped ({status}, {accelerator}) before `{marker}` appeared; last console lines:\n{}{}",
        format_tail(last_lines),
        format_qemu(qemu_stderr)
    )]
    Exited {
        marker: String,
        status: String,
        accelerator: String,
        last_lines: Vec<String>,
        /// What QEMU itself said, if anything (bad options, missing firmware, KVM's errors).
        qemu_stderr: String,
        /// The accelerator, not the guest, stopped the machine: KVM's internal error, or QEMU
        /// dying before the firmware printed anything.
        accelerator_failed: bool,
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
            BootError::Exited {
                accelerator_failed: true,
                ..
            } => Some(
                "KVM cannot run this guest on this host (common under nested virtualisation): boot with software emulation instead (`accelerator: tcg` in the boot test, or `bake build --boot-accelerator tcg`), or leave the accelerator on `auto`, which falls back by itself".into(),
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
        match self {
            BootError::Timeout { .. } => true,
            BootError::Exited {
                accelerator_failed, ..
            } => !accelerator_failed,
            _ => false,
        }
    }
}

/// QEMU's own messages, for the end of an error.
fn format_qemu(said: &str) -> String {
    let said = said.trim();
    if said.is_empty() {
        String::new()
    } else {
        format!("\nQEMU said:\n{}", last_lines_of(said))
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
    /// A line on the serial console.
    Line(String),
    /// The console closed: QEMU exited.
    Closed,
    /// A line QEMU printed on its stderr.
    QemuSaid(String),
    /// QEMU's stderr closed.
    QemuQuiet,
    /// The monitor reports a VM state in which the guest will never boot on
    /// ([`STOPPED_STATES`]).
    Stopped(String),
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
    let qemu = match &spec.qemu {
        Some(qemu) => qemu.clone(),
        None => super::disk::which("qemu-system-x86_64").ok_or(BootError::NoQemu)?,
    };
    let work = tempfile::Builder::new()
        .prefix("bake-boot-")
        .tempdir()
        .map_err(|source| BootError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let accelerator = spec.accelerator.resolve(&spec.kvm_device);
    let kvm_silence = (spec.accelerator == Accelerator::Auto).then_some(spec.kvm_silence);
    match boot_once(&qemu, image, work.path(), spec, accelerator, kvm_silence) {
        // KVM inside a VM can fail in ways no probe of /dev/kvm shows: QEMU dies before the
        // firmware prints anything (nested virtualisation refusing an MSR), or pauses the VM
        // with an internal error (an instruction KVM cannot emulate). Emulation is slower but
        // works wherever QEMU does.
        Err(BootError::Exited {
            accelerator_failed: true,
            qemu_stderr,
            status,
            ..
        }) if spec.accelerator == Accelerator::Auto && accelerator == Accelerator::Kvm => {
            let said = qemu_stderr.trim();
            let why = if said.is_empty() {
                status
            } else {
                last_lines_of(said)
            };
            tracing::warn!(
                "KVM cannot run the guest ({}); booting with software emulation (TCG)",
                why.replace('\n', " ")
            );
            let mut report = boot_once(&qemu, image, work.path(), spec, Accelerator::Tcg, None)?;
            report.kvm_fallback = Some(why);
            Ok(report)
        }
        other => other,
    }
}

/// One boot of `image` with `accelerator`; `work` holds the firmware's variable store and the
/// monitor's socket. Under KVM, a console silent for `kvm_silence` counts as KVM failing.
fn boot_once(
    qemu: &Path,
    image: &Path,
    work: &Path,
    spec: &BootSpec,
    accelerator: Accelerator,
    kvm_silence: Option<Duration>,
) -> Result<BootReport, BootError> {
    // A fresh variable store for every boot: a failed boot must not leave its boot entries.
    let vars = work.join("OVMF_VARS.fd");
    fs_err::copy(&spec.firmware_vars, &vars).map_err(|source| BootError::Io {
        path: vars.clone(),
        source,
    })?;
    let monitor = work.join("qmp.sock");
    let _ = std::fs::remove_file(&monitor);
    let mut command = Command::new(qemu);
    command
        .args(["-machine", "q35", "-accel", accelerator.name()])
        .args(["-cpu", "max"])
        .args(["-m", &spec.memory_mib.to_string()])
        .args(["-smp", &spec.cpus.to_string()])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-monitor", "none", "-nic", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .arg("-drive")
        .arg(drive_arg(
            "if=pflash,format=raw,unit=0,readonly=on",
            &spec.firmware_code,
        ))
        .arg("-drive")
        .arg(drive_arg("if=pflash,format=raw,unit=1", &vars))
        .arg("-drive")
        .arg(drive_arg("if=none,id=disk,format=raw,snapshot=on", image))
        .args(["-device", "nvme,drive=disk,serial=bake-boot-test"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let clock = Instant::now();
    let mut child = command.spawn().map_err(BootError::Spawn)?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let mut machine = Machine { child };

    let (sender, receiver) = mpsc::channel();
    let log = spec.console_log.clone();
    let console = sender.clone();
    std::thread::spawn(move || read_console(stdout, log, console));
    let said = sender.clone();
    std::thread::spawn(move || read_stderr(stderr, said));
    let done = Arc::new(AtomicBool::new(false));
    {
        let done = Arc::clone(&done);
        std::thread::spawn(move || watch_status(&monitor, &done, &sender));
    }

    let mut tail: std::collections::VecDeque<String> = Default::default();
    let mut qemu_said: Vec<String> = Vec::new();
    let mut lines = 0;
    let deadline = clock + spec.timeout;
    let stopped = |status: String, accelerator_failed: bool| BootError::Exited {
        marker: spec.marker.clone(),
        status,
        accelerator: accelerator.name().into(),
        last_lines: Vec::new(),
        qemu_stderr: String::new(),
        accelerator_failed,
    };
    // Elapsed time and the last console line, while the machine boots.
    let progress = crate::progress::Task::new(
        format!("boot test ({})", accelerator.name()),
        None,
        crate::progress::Unit::Count("lines"),
    );
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
                qemu_stderr: String::new(),
            });
        }
        if let Some(limit) = kvm_silence
            && accelerator == Accelerator::Kvm
            && lines == 0
            && clock.elapsed() >= limit
        {
            let why = format!("no console output within {}s under KVM", limit.as_secs());
            break Err(stopped(why, true));
        }
        match receiver.recv_timeout(POLL.min(deadline - now)) {
            Ok(Event::Line(line)) => {
                lines += 1;
                progress.message(&line);
                if is_marker(&line, &spec.marker) {
                    break Ok(BootReport {
                        marker: spec.marker.clone(),
                        duration_ms: clock.elapsed().as_millis() as u64,
                        accelerator: accelerator.name().into(),
                        marker_line: line,
                        console_lines: lines,
                        kvm_fallback: None,
                    });
                }
                if tail.len() == CONSOLE_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Ok(Event::QemuSaid(line)) => {
                let failed = accelerator == Accelerator::Kvm
                    && ACCELERATOR_FAILURES.iter().any(|f| line.contains(f));
                qemu_said.push(line);
                if failed {
                    break Err(stopped("KVM internal error".into(), true));
                }
            }
            Ok(Event::Stopped(status)) => {
                // QEMU enters `internal-error` when the accelerator gives up on the guest.
                let failed = accelerator == Accelerator::Kvm && status == "internal-error";
                break Err(stopped(format!("VM state {status}"), failed));
            }
            Ok(Event::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                // A QEMU that dies before the firmware printed anything under KVM is taken
                // for the accelerator failing, as nothing of the image has run yet.
                let failed = accelerator == Accelerator::Kvm && lines == 0;
                break Err(stopped(String::new(), failed));
            }
            Ok(Event::QemuQuiet) | Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };
    drop(progress);
    // Stop the machine (by pid), then collect what QEMU said up to its end.
    done.store(true, Ordering::SeqCst);
    let _ = machine.child.kill();
    let status = machine.child.wait().ok();
    drop(machine);
    let drain_until = Instant::now() + DRAIN;
    while let Some(left) = drain_until.checked_duration_since(Instant::now()) {
        match receiver.recv_timeout(left) {
            Ok(Event::QemuSaid(line)) => qemu_said.push(line),
            Ok(Event::QemuQuiet) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let qemu_stderr = qemu_said.join("\n");
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
            qemu_stderr,
        },
        BootError::Exited {
            marker,
            status: why,
            accelerator,
            accelerator_failed,
            ..
        } => BootError::Exited {
            marker,
            status: if why.is_empty() {
                status.map_or_else(|| "unknown status".into(), |s| s.to_string())
            } else {
                why
            },
            accelerator,
            last_lines: tail.into_iter().collect(),
            qemu_stderr,
            accelerator_failed,
        },
        other => other,
    })
}

/// Reads QEMU's stderr line by line into `sender`, then says it closed.
fn read_stderr(stderr: impl Read, sender: mpsc::Sender<Event>) {
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if sender
            .send(Event::QemuSaid(clean_line(line.as_bytes())))
            .is_err()
        {
            return;
        }
    }
    let _ = sender.send(Event::QemuQuiet);
}

/// Asks QEMU's monitor (QMP) for the VM's state every [`STATUS_POLL`] until `done`, and reports
/// a state the guest cannot boot on. Any trouble with the monitor ends the watch quietly: the
/// console, QEMU's stderr and its exit still tell the boot's outcome.
fn watch_status(socket: &Path, done: &AtomicBool, sender: &mpsc::Sender<Event>) {
    let connected_by = Instant::now() + MONITOR_CONNECT;
    let stream = loop {
        if done.load(Ordering::SeqCst) {
            return;
        }
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(_) if Instant::now() < connected_by => std::thread::sleep(POLL),
            Err(_) => return,
        }
    };
    let mut monitor = match Monitor::new(stream) {
        Ok(monitor) => monitor,
        Err(error) => {
            tracing::debug!("QEMU's monitor did not answer: {error}");
            return;
        }
    };
    while !done.load(Ordering::SeqCst) {
        match monitor.status() {
            Ok(status) if STOPPED_STATES.contains(&status.as_str()) => {
                let _ = sender.send(Event::Stopped(status));
                return;
            }
            Ok(_) => std::thread::sleep(STATUS_POLL),
            Err(error) => {
                tracing::debug!("QEMU's monitor stopped answering: {error}");
                return;
            }
        }
    }
}

/// A QMP connection: one JSON object per line each way.
struct Monitor {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Monitor {
    /// Reads the greeting and leaves capabilities negotiation mode.
    fn new(stream: std::os::unix::net::UnixStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(MONITOR_CONNECT))?;
        let writer = stream.try_clone()?;
        let mut monitor = Monitor {
            reader: BufReader::new(stream),
            writer,
        };
        monitor.read_message()?; // {"QMP": {"version": …}}
        monitor.execute("qmp_capabilities")?;
        Ok(monitor)
    }

    /// The VM's run state (`running`, `paused`, `internal-error`, …).
    fn status(&mut self) -> std::io::Result<String> {
        let answer = self.execute("query-status")?;
        answer
            .get("status")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| std::io::Error::other(format!("query-status answered {answer}")))
    }

    /// Runs a command and returns its `return` value, skipping asynchronous events.
    fn execute(&mut self, command: &str) -> std::io::Result<serde_json::Value> {
        let request = serde_json::json!({ "execute": command });
        std::io::Write::write_all(&mut self.writer, format!("{request}\n").as_bytes())?;
        loop {
            let mut message = self.read_message()?;
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            if let Some(error) = message.get("error") {
                return Err(std::io::Error::other(format!("{command}: {error}")));
            }
        }
    }

    fn read_message(&mut self) -> std::io::Result<serde_json::Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }
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
            qemu_stderr: String::new(),
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

    /// QEMU's words when KVM cannot emulate an instruction of the guest (it then pauses the VM
    /// and never exits), as seen on a nested-virtualisation CI host.
    const KVM_INTERNAL_ERROR: &str =
        "KVM internal error. Suberror: 1\nextra data[0]: 0x0000000000000000\nemulation failure";

    /// A stand-in for QEMU: under `-accel kvm` it says what QEMU says when KVM fails and then
    /// hangs, as QEMU does; under `-accel tcg` it prints the marker on the console and hangs.
    struct StandIn {
        dir: tempfile::TempDir,
        spec: BootSpec,
        image: PathBuf,
    }

    impl StandIn {
        fn new(accelerator: Accelerator) -> Self {
            use std::os::unix::fs::PermissionsExt;
            let dir = tempfile::tempdir().unwrap();
            let qemu = dir.path().join("qemu-system-x86_64");
            fs_err::write(
                &qemu,
                format!(
                    "#!/bin/sh\n\
                     echo \"$*\" >> \"$0.calls\"\n\
                     case \" $* \" in\n\
                     *' -accel kvm '*) printf '%s\\n' '{KVM_INTERNAL_ERROR}' >&2 ;;\n\
                     *) echo 'qemu-system-x86_64: warning: TCG does not support requested feature: CPUID.01H:ECX.vmx' >&2\n\
                        echo 'BdsDxe: starting Boot0001'; echo 'bake-boot-ok' ;;\n\
                     esac\n\
                     exec sleep 600\n"
                ),
            )
            .unwrap();
            fs_err::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
            for file in ["code.fd", "vars.fd", "disk.raw"] {
                fs_err::write(dir.path().join(file), b"").unwrap();
            }
            let mut spec = BootSpec::new("bake-boot-ok", Duration::from_secs(600));
            spec.accelerator = accelerator;
            spec.qemu = Some(qemu);
            spec.firmware_code = dir.path().join("code.fd");
            spec.firmware_vars = dir.path().join("vars.fd");
            let image = dir.path().join("disk.raw");
            StandIn { dir, spec, image }
        }

        /// The accelerators the stand-in was started with, in order.
        fn calls(&self) -> Vec<String> {
            let calls = fs_err::read_to_string(self.dir.path().join("qemu-system-x86_64.calls"))
                .unwrap_or_default();
            calls
                .lines()
                .map(|l| {
                    l.split("-accel ")
                        .nth(1)
                        .unwrap()
                        .split(' ')
                        .next()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        }
    }

    #[test]
    fn a_kvm_internal_error_with_kvm_forced_fails_at_once_with_qemus_message() {
        let stand_in = StandIn::new(Accelerator::Kvm);
        let clock = Instant::now();
        let error = boot_test(&stand_in.image, &stand_in.spec).unwrap_err();
        // Well inside the 600 s boot timeout: the stopped machine is seen, not waited out.
        assert!(
            clock.elapsed() < Duration::from_secs(30),
            "{:?}",
            clock.elapsed()
        );
        assert!(
            matches!(
                error,
                BootError::Exited {
                    accelerator_failed: true,
                    ..
                }
            ),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("QEMU said:\nKVM internal error. Suberror: 1"),
            "{text}"
        );
        assert!(text.contains("emulation failure"), "{text}");
        assert!(!error.is_recipe_failure());
        assert!(error.hint().unwrap().contains("tcg"), "{:?}", error.hint());
        assert_eq!(stand_in.calls(), ["kvm"]);
    }

    #[test]
    fn a_kvm_internal_error_with_the_accelerator_on_auto_falls_back_to_tcg() {
        let mut stand_in = StandIn::new(Accelerator::Auto);
        // `auto` picks KVM when the device opens: give it a device that does.
        stand_in.spec.kvm_device = stand_in.image.clone();
        let clock = Instant::now();
        let report = boot_test(&stand_in.image, &stand_in.spec).unwrap();
        assert!(
            clock.elapsed() < Duration::from_secs(30),
            "{:?}",
            clock.elapsed()
        );
        assert_eq!(report.accelerator, "tcg");
        assert_eq!(report.marker_line, "bake-boot-ok");
        let why = report.kvm_fallback.unwrap();
        assert!(why.contains("KVM internal error"), "{why}");
        assert_eq!(stand_in.calls(), ["kvm", "tcg"]);
    }

    #[test]
    fn a_kvm_that_leaves_the_console_silent_falls_back_to_tcg_on_auto_only() {
        use std::os::unix::fs::PermissionsExt;
        let mut stand_in = StandIn::new(Accelerator::Auto);
        // This stand-in says nothing at all under KVM: it just hangs.
        let qemu = stand_in.spec.qemu.clone().unwrap();
        let script = fs_err::read_to_string(&qemu)
            .unwrap()
            .replace(&format!("printf '%s\\n' '{KVM_INTERNAL_ERROR}' >&2"), ":");
        fs_err::write(&qemu, script).unwrap();
        fs_err::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        stand_in.spec.kvm_device = stand_in.image.clone();
        stand_in.spec.kvm_silence = Duration::from_secs(1);
        let report = boot_test(&stand_in.image, &stand_in.spec).unwrap();
        assert_eq!(report.accelerator, "tcg");
        assert_eq!(
            report.kvm_fallback.as_deref(),
            Some("no console output within 1s under KVM")
        );

        // Forced KVM waits for its own timeout: the user asked for it.
        stand_in.spec.accelerator = Accelerator::Kvm;
        stand_in.spec.timeout = Duration::from_secs(3);
        let error = boot_test(&stand_in.image, &stand_in.spec).unwrap_err();
        assert!(matches!(error, BootError::Timeout { .. }), "{error:?}");
    }

    #[test]
    fn tcg_forced_never_tries_kvm() {
        let mut stand_in = StandIn::new(Accelerator::Tcg);
        stand_in.spec.kvm_device = stand_in.image.clone();
        let report = boot_test(&stand_in.image, &stand_in.spec).unwrap();
        assert_eq!(report.accelerator, "tcg");
        assert_eq!(report.kvm_fallback, None);
        assert_eq!(stand_in.calls(), ["tcg"]);
    }

    #[test]
    fn a_timeout_shows_what_qemu_said() {
        let mut stand_in = StandIn::new(Accelerator::Tcg);
        stand_in.spec.marker = "never-printed".into();
        stand_in.spec.timeout = Duration::from_secs(2);
        let error = boot_test(&stand_in.image, &stand_in.spec).unwrap_err();
        assert!(matches!(error, BootError::Timeout { .. }), "{error:?}");
        let text = error.to_string();
        assert!(text.contains("  | bake-boot-ok"), "{text}");
        assert!(
            text.contains("QEMU said:\nqemu-system-x86_64: warning: TCG does not support"),
            "{text}"
        );
    }
}
