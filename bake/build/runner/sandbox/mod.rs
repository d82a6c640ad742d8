//! The sandbox helper, `bake __sandbox`: a fresh process that bake starts for each step,
//! because namespaces cannot safely be set up after `fork` in a multithreaded (tokio) process,
//! and this one has a single thread.
//!
//! The helper reads a [`SandboxSpec`] from its stdin (one end of a socket pair), then:
//! 1. arms `PR_SET_PDEATHSIG` so it dies with bake, and checks bake is still its parent;
//! 2. blocks SIGINT, SIGTERM, SIGHUP and SIGCHLD and takes them from a signalfd instead;
//! 3. `unshare(CLONE_NEWPID)` and forks: the child is PID 1 of the new pid namespace. It arms
//!    its own death signal (so killing the helper kills the sandbox), resets the signal mask and
//!    dispositions, leaves the host's session and terminal (`setsid`), unshares the mount, UTS,
//!    IPC, cgroup and, without network, network namespaces, builds the sandbox ([`setup::build`]), points stdin at `/dev/null`, marks
//!    every other inherited descriptor close-on-exec, and executes the script: PID 1 *is* the
//!    step's shell, so no host binary is ever visible inside (`/proc/1/exe`);
//! 4. waits for PID 1 with the step's timeout. When it runs out, or the helper is told to stop,
//!    it SIGKILLs PID 1, and the kernel kills everything else in the pid namespace with it;
//! 5. writes one [`Report`] back on the socket and exits. The step's stdout and stderr are the
//!    helper's own, so bake reads them directly.
//!
//! If setup fails in the child, it writes the failed stage down a close-on-exec pipe before
//! exiting; a successful `execve` closes that pipe empty, which is how the helper tells the two
//! apart.
//!
//! Known limits, on purpose or not yet done:
//! - No seccomp filter. A root step cannot mount, `mknod` or change the host, but it can create
//!   a nested *user* namespace (where it holds every capability over namespaces of its own
//!   making). That stays inside the sandbox, yet widens the kernel surface it can reach;
//!   Docker's default seccomp profile closes it, and so should a filter here one day.
//! - `PR_SET_NO_NEW_PRIVS` is not set: root steps need nothing from it, and it would stop
//!   non-root steps from using `sudo`/`su` (set-uid programs gain only the kept capabilities
//!   anyway, so it would not narrow what a step can reach).
//! - No `/sys` and no `/dev/mqueue` are mounted; the image's own directories show through.

#[cfg(test)]
mod recording;
pub(crate) mod setup;
mod syscall;

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getppid, pipe2, setsid};
use serde::{Deserialize, Serialize};

pub use syscall::{Capability, KEPT_CAPABILITIES, capability_mask};

use super::protocol::{Report, SandboxSpec};

/// PID 1's exit status when setup failed before the script started. Only the helper sees it:
/// the report says what failed.
const SETUP_FAILED_EXIT: i32 = 127;

/// The shell that runs a script without a `#!` line, and its flags: `-e`, so that a failing
/// command fails the step, as Packer does for inline scripts.
const SHELL: &str = "/bin/sh";
const SHELL_FLAGS: &str = "-e";

/// Why the helper could not do its job at all (as opposed to a sandbox that failed, which it
/// reports).
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("failed to read the sandbox spec from stdin")]
    ReadSpec(#[source] io::Error),
    #[error("the sandbox spec on stdin is not valid")]
    ParseSpec(#[source] serde_json::Error),
    #[error("bake (pid {expected}) exited before the sandbox started")]
    ParentGone { expected: i32 },
    #[error("failed to {what}")]
    Syscall {
        what: &'static str,
        #[source]
        source: Errno,
    },
    #[error("failed to write the report to bake")]
    WriteReport(#[source] io::Error),
}

fn sys<T>(what: &'static str, result: nix::Result<T>) -> Result<T, HelperError> {
    result.map_err(|source| HelperError::Syscall { what, source })
}

/// The helper's entry point (`bake __sandbox`).
pub fn run() -> Result<(), HelperError> {
    // First: from here on, if bake dies the helper dies, and the sandbox with it.
    sys(
        "arm the parent-death signal",
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL),
    )?;
    let control = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(HelperError::ReadSpec)?;
    let mut control = UnixStream::from(control);
    let mut input = Vec::new();
    control
        .read_to_end(&mut input)
        .map_err(HelperError::ReadSpec)?;
    let spec: SandboxSpec = serde_json::from_slice(&input).map_err(HelperError::ParseSpec)?;
    // bake may have died before the death signal was armed; nobody would kill us then.
    if getppid().as_raw() != spec.parent_pid {
        return Err(HelperError::ParentGone {
            expected: spec.parent_pid,
        });
    }
    let report = supervise(&spec)?;
    let text = serde_json::to_vec(&report).expect("reports always serialize");
    control.write_all(&text).map_err(HelperError::WriteReport)
}

/// What the child sends down the pipe when setup fails.
#[derive(Debug, Serialize, Deserialize)]
struct SetupFailure {
    stage: String,
    errno: Option<i32>,
    message: String,
}

fn supervise(spec: &SandboxSpec) -> Result<Report, HelperError> {
    let mut signals = SigSet::empty();
    for signal in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        signals.add(signal);
    }
    sys("block signals", signals.thread_block())?;
    let signal_fd = sys(
        "create a signalfd",
        SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK),
    )?;
    sys("create a pid namespace", unshare(CloneFlags::CLONE_NEWPID))?;
    let (failure_read, failure_write) = sys("create the setup pipe", pipe2(OFlag::O_CLOEXEC))?;

    // SAFETY: the helper is single-threaded (it is a fresh `bake __sandbox` that started no
    // threads), so the child may do anything the parent could.
    match sys("fork the sandbox init", unsafe { fork() })? {
        ForkResult::Child => {
            drop(failure_read);
            drop(signal_fd);
            let failure = sandbox_init(spec);
            let text = serde_json::to_vec(&failure).unwrap_or_default();
            let _ = std::fs::File::from(failure_write).write_all(&text);
            // SAFETY: _exit ends the process at once, running nothing of the parent's (no
            // atexit handlers, no flushing of buffers the parent also holds).
            unsafe { libc::_exit(SETUP_FAILED_EXIT) }
        }
        ForkResult::Parent { child } => {
            drop(failure_write);
            let mut text = Vec::new();
            // Returns at the child's execve (close-on-exec) or exit.
            let _ = std::fs::File::from(failure_read).read_to_end(&mut text);
            if !text.is_empty() {
                let _ = waitpid(child, None);
                let failure: SetupFailure =
                    serde_json::from_slice(&text).unwrap_or_else(|_| SetupFailure {
                        stage: "set up the sandbox".into(),
                        errno: None,
                        message: String::from_utf8_lossy(&text).into_owned(),
                    });
                return Ok(Report::SetupFailed {
                    stage: failure.stage,
                    errno: failure.errno,
                    message: failure.message,
                });
            }
            wait(child, &signal_fd, Duration::from_millis(spec.timeout_ms))
        }
    }
}

/// Waits for PID 1 until it exits, the timeout runs out, or the helper is told to stop.
fn wait(child: Pid, signal_fd: &SignalFd, timeout: Duration) -> Result<Report, HelperError> {
    let deadline = Instant::now().checked_add(timeout);
    loop {
        match sys(
            "wait for the sandbox",
            waitpid(child, Some(WaitPidFlag::WNOHANG)),
        )? {
            WaitStatus::Exited(_, code) => return Ok(Report::Exited { code }),
            WaitStatus::Signaled(_, signal, _) => {
                return Ok(Report::Signaled {
                    signal: signal as i32,
                });
            }
            _ => {}
        }
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) {
            kill_sandbox(child);
            return Ok(Report::TimedOut);
        }
        let poll_timeout = remaining.map_or(PollTimeout::NONE, |r| {
            // Round up, so a sub-millisecond remainder does not spin.
            PollTimeout::try_from(r + Duration::from_millis(1)).unwrap_or(PollTimeout::MAX)
        });
        let mut fds = [PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, poll_timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(source) => {
                kill_sandbox(child);
                return Err(HelperError::Syscall {
                    what: "wait for signals",
                    source,
                });
            }
        }
        while let Some(info) = sys("read a signal", signal_fd.read_signal())? {
            let signal = info.ssi_signo as i32;
            if signal != Signal::SIGCHLD as i32 {
                kill_sandbox(child);
                return Ok(Report::Interrupted { signal });
            }
        }
    }
}

/// SIGKILL to a pid namespace's init takes every process in the namespace with it.
fn kill_sandbox(child: Pid) {
    let _ = kill(child, Signal::SIGKILL);
    let _ = waitpid(child, None);
}

/// PID 1 of the sandbox: builds it and executes the script. Returns only on failure.
fn sandbox_init(spec: &SandboxSpec) -> SetupFailure {
    let failure = |stage: &str, source: io::Error| SetupFailure {
        stage: stage.to_owned(),
        errno: source.raw_os_error(),
        message: source.to_string(),
    };
    let nix_failure = |stage: &str, errno: Errno| failure(stage, io::Error::from(errno));

    // Both survive execve: the mask the helper set, and the dispositions inherited from bake
    // (whose Rust runtime ignores SIGPIPE, which would keep `yes | head` running forever).
    if let Err(errno) = SigSet::empty().thread_set_mask() {
        return nix_failure("unblock signals", errno);
    }
    if let Err(error) = reset_signal_dispositions() {
        return failure("reset signal dispositions", error);
    }
    // If the helper dies (bake killed it, or died itself), the whole sandbox goes.
    if let Err(errno) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        return nix_failure("arm the parent-death signal", errno);
    }
    // A session of its own: no controlling terminal, so no TIOCSTI into the user's shell.
    if let Err(errno) = setsid() {
        return nix_failure("start a new session", errno);
    }
    // The cgroup namespace only hides the host's cgroup paths from /proc/self/cgroup.
    let mut namespaces = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP;
    if !spec.network {
        namespaces |= CloneFlags::CLONE_NEWNET;
    }
    if let Err(errno) = unshare(namespaces) {
        return nix_failure(
            "create mount, UTS, IPC, cgroup and network namespaces",
            errno,
        );
    }
    if let Err(error) = setup::build(&syscall::Linux, spec) {
        return failure(&error.stage, error.source);
    }
    match fs_err::File::open("/dev/null") {
        Ok(null) => {
            if let Err(errno) = nix::unistd::dup2_stdin(null) {
                return nix_failure("point stdin at /dev/null", errno);
            }
        }
        Err(error) => return failure("open /dev/null", error),
    }
    // Nothing of the host's may cross execve but stdout and stderr: a directory descriptor
    // would be a way out of the root.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on descriptors.
    if unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) } < 0 {
        return failure(
            "mark inherited descriptors close-on-exec",
            io::Error::last_os_error(),
        );
    }

    let script = setup::script_path_in_image(&spec.root, &spec.mounts.tmp);
    let (program, argv) = command(&spec.script, &script);
    let env: Result<Vec<CString>, _> = spec
        .env
        .iter()
        .map(|(name, value)| CString::new(format!("{name}={value}")))
        .collect();
    let (Ok(program), Ok(argv), Ok(env)) = (
        CString::new(program.as_os_str().as_encoded_bytes()),
        argv.into_iter()
            .map(CString::new)
            .collect::<Result<Vec<_>, _>>(),
        env,
    ) else {
        return failure(
            "prepare the command",
            io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the environment"),
        );
    };
    let Err(errno) = nix::unistd::execve(&program, &argv, &env);
    nix_failure(&format!("execute `{}`", program.to_string_lossy()), errno)
}

/// The kernel's `struct sigaction` on 64-bit Linux (x86_64 and arm64 both have `sa_restorer`).
#[repr(C)]
struct KernelSigaction {
    handler: libc::c_ulong,
    flags: libc::c_ulong,
    restorer: libc::c_ulong,
    mask: u64,
}

/// The highest signal number on Linux (`_NSIG`).
const LAST_SIGNAL: libc::c_long = 64;

/// Sets every signal's disposition to the default. Through the raw system call, because the
/// C library refuses to touch the real-time signals it reserves (32 and 33), and those may
/// arrive ignored from bake's own parent.
fn reset_signal_dispositions() -> io::Result<()> {
    let default = KernelSigaction {
        handler: libc::SIG_DFL as libc::c_ulong,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for signal in 1..=LAST_SIGNAL {
        if signal == libc::SIGKILL as libc::c_long || signal == libc::SIGSTOP as libc::c_long {
            continue;
        }
        // SAFETY: rt_sigaction with a valid struct, no old action, and the kernel's sigset size.
        let result = unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The program and arguments that run the script: the script itself when it names its
/// interpreter with `#!`, else the shell with `-e`.
fn command(script: &str, path: &Path) -> (std::path::PathBuf, Vec<String>) {
    let shown = path.display().to_string();
    if script.starts_with("#!") {
        (path.to_owned(), vec![shown])
    } else {
        (
            SHELL.into(),
            vec![SHELL.to_owned(), SHELL_FLAGS.to_owned(), shown],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_run_under_sh_e_unless_they_name_an_interpreter() {
        let path = Path::new("/tmp/bake-step.sh");
        let (program, argv) = command("apt-get update\n", path);
        assert_eq!(program, Path::new("/bin/sh"));
        assert_eq!(argv, ["/bin/sh", "-e", "/tmp/bake-step.sh"]);
        let (program, argv) = command("#!/bin/bash\nset -o pipefail\n", path);
        assert_eq!(program, path);
        assert_eq!(argv, ["/tmp/bake-step.sh"]);
    }
}
