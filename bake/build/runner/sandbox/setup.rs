//! The sandbox, built step by step inside fresh namespaces, over [`Syscall`]. Runs in the
//! sandbox's PID 1 after `unshare`, before it executes the script. In order:
//!
//! 1. every mount becomes private, so nothing below propagates to the host's mount table;
//! 2. the root is bound onto itself, because `pivot_root` wants a mount point;
//! 3. a fresh `proc` for the new pid namespace (the host's processes are not in it), with the
//!    entries that hold host-wide knobs read-only (`/proc/sys`: `core_pattern` would run a
//!    program on the host; `/proc/sysrq-trigger` would reboot it) and the ones that leak host
//!    state hidden, as Docker does;
//! 4. a small tmpfs `/dev` holding only `null`, `zero`, `full`, `random`, `urandom` and `tty`
//!    (bound from the host's nodes: nothing that reaches a disk), a private `devpts`
//!    instance, `/dev/shm` and the usual symlinks;
//! 5. a tmpfs `/tmp`, which also holds the script: nothing written there enters the image;
//! 6. the host's `/etc/resolv.conf`, read-only, only when the step has the network;
//! 7. the hostname, and `lo` up when the step has a network namespace of its own;
//! 8. `pivot_root` into the root, and the old root detached: no path leads back to the host;
//! 9. the capabilities cut to [`KEPT_CAPABILITIES`] (no `CAP_SYS_ADMIN` to undo any of the
//!    above, no `CAP_MKNOD`), then the step's user and groups, then its workdir, checked with
//!    that user's permissions.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::syscall::{KEPT_CAPABILITIES, Node, Syscall};
use crate::build::runner::protocol::SandboxSpec;

/// Where the script is written, in the sandbox's `/tmp`.
pub const SCRIPT_NAME: &str = "bake-step.sh";

/// `/proc` entries through which root could change the host kernel: read-only (Docker's list).
const PROC_READ_ONLY: [&str; 5] = ["bus", "fs", "irq", "sys", "sysrq-trigger"];
/// `/proc` files that show host memory, keys or timers: hidden behind `/dev/null` (Docker's).
const PROC_MASKED_FILES: [&str; 6] = [
    "kcore",
    "keys",
    "latency_stats",
    "sched_debug",
    "timer_list",
    "timer_stats",
];
/// `/proc` directories that show host hardware: hidden behind an empty read-only tmpfs.
const PROC_MASKED_DIRS: [&str; 3] = ["acpi", "asound", "scsi"];

/// The device nodes a build needs, bound from the host's: none of them reaches a disk.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const DEV_SYMLINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];
/// Docker's `/dev`: device nodes take no space, the size only bounds what a step writes into
/// `/dev` by mistake.
const DEV_OPTIONS: &str = "mode=755,size=65536k";
/// A private devpts instance: the step's terminals are its own, never the host's. Group 5 is
/// `tty` on Debian and Ubuntu (and Docker's choice).
const DEVPTS_OPTIONS: &str = "newinstance,ptmxmode=0666,mode=0620,gid=5";
/// Docker's default `/dev/shm` size.
const SHM_OPTIONS: &str = "mode=1777,size=65536k";
/// No size: the kernel's default, half of memory. Builds unpack large archives in `/tmp`, and
/// nothing written there outlives the step.
const TMP_OPTIONS: &str = "mode=1777";

/// Which stage of the setup failed, and why.
#[derive(Debug)]
pub struct SetupError {
    pub stage: String,
    pub source: io::Error,
}

fn at<T>(stage: impl FnOnce() -> String, result: io::Result<T>) -> Result<T, SetupError> {
    result.map_err(|source| SetupError {
        stage: stage(),
        source,
    })
}

/// `Ok` when the path does not exist: `/proc` entries vary between kernels.
fn unless_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Builds the sandbox for `spec` and leaves the process in it, as the step's user, in its
/// workdir, ready to execute the script.
pub fn build(sys: &dyn Syscall, spec: &SandboxSpec) -> Result<(), SetupError> {
    let root = spec.root.as_path();
    let targets = [&spec.mounts.proc, &spec.mounts.dev, &spec.mounts.tmp]
        .into_iter()
        .chain(spec.resolv_conf.as_ref().map(|b| &b.target));
    for target in targets {
        if !target.starts_with(root) || target == root {
            return Err(SetupError {
                stage: format!("check mount point `{}`", target.display()),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not inside the root"),
            });
        }
    }

    at(
        || "make every mount private".into(),
        sys.mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None,
        ),
    )?;
    at(
        || format!("bind `{}` onto itself", root.display()),
        sys.mount(
            Some(root),
            root,
            None,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None,
        ),
    )?;
    mount_proc(sys, &spec.mounts.proc)?;
    mount_dev(sys, &spec.mounts.dev)?;

    let tmp = &spec.mounts.tmp;
    at(
        || format!("mount a tmpfs on `{}`", tmp.display()),
        sys.mount(
            Some(Path::new("tmpfs")),
            tmp,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(TMP_OPTIONS),
        ),
    )?;
    let script = tmp.join(SCRIPT_NAME);
    at(
        || format!("write the script to `{}`", script.display()),
        sys.create(
            &script,
            &Node::File {
                contents: spec.script.as_bytes(),
                mode: 0o700,
                uid: spec.uid,
                gid: spec.gid,
            },
        ),
    )?;

    if let Some(bind) = &spec.resolv_conf {
        bind_read_only(sys, &bind.source, &bind.target)?;
    }
    at(
        || format!("set the hostname to `{}`", spec.hostname),
        sys.set_hostname(&spec.hostname),
    )?;
    if !spec.network {
        at(
            || "bring up the loopback interface".into(),
            sys.loopback_up(),
        )?;
    }
    at(
        || format!("pivot into `{}`", root.display()),
        sys.pivot_root(root),
    )?;
    at(
        || "drop capabilities".into(),
        sys.limit_capabilities(&KEPT_CAPABILITIES),
    )?;
    at(
        || format!("switch to uid {} gid {}", spec.uid, spec.gid),
        sys.switch_user(spec.uid, spec.gid, &spec.groups),
    )?;
    at(
        || format!("change to workdir `{}`", spec.workdir),
        sys.chdir(Path::new(&spec.workdir)),
    )?;
    Ok(())
}

fn mount_proc(sys: &dyn Syscall, proc: &Path) -> Result<(), SetupError> {
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    at(
        || format!("mount proc on `{}`", proc.display()),
        sys.mount(
            Some(Path::new("proc")),
            proc,
            Some("proc"),
            proc_flags,
            None,
        ),
    )?;
    for name in PROC_READ_ONLY {
        let path = proc.join(name);
        at(
            || format!("make `{}` read-only", path.display()),
            unless_missing(read_only(sys, &path, &path, proc_flags)),
        )?;
    }
    for name in PROC_MASKED_FILES {
        let path = proc.join(name);
        at(
            || format!("mask `{}`", path.display()),
            unless_missing(sys.mount(
                Some(Path::new("/dev/null")),
                &path,
                None,
                MsFlags::MS_BIND,
                None,
            )),
        )?;
    }
    for name in PROC_MASKED_DIRS {
        let path = proc.join(name);
        at(
            || format!("mask `{}`", path.display()),
            unless_missing(sys.mount(
                Some(Path::new("tmpfs")),
                &path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | proc_flags,
                None,
            )),
        )?;
    }
    Ok(())
}

fn mount_dev(sys: &dyn Syscall, dev: &Path) -> Result<(), SetupError> {
    at(
        || format!("mount a tmpfs on `{}`", dev.display()),
        sys.mount(
            Some(Path::new("tmpfs")),
            dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some(DEV_OPTIONS),
        ),
    )?;
    for name in DEVICES {
        let target = dev.join(name);
        let source = Path::new("/dev").join(name);
        at(
            || format!("bind `{}` onto `{}`", source.display(), target.display()),
            sys.create(
                &target,
                &Node::File {
                    contents: b"",
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            )
            .and_then(|()| sys.mount(Some(&source), &target, None, MsFlags::MS_BIND, None)),
        )?;
    }
    let pts = dev.join("pts");
    at(
        || format!("mount devpts on `{}`", pts.display()),
        sys.create(&pts, &Node::Dir { mode: 0o755 }).and_then(|()| {
            sys.mount(
                Some(Path::new("devpts")),
                &pts,
                Some("devpts"),
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                Some(DEVPTS_OPTIONS),
            )
        }),
    )?;
    let shm = dev.join("shm");
    at(
        || format!("mount a tmpfs on `{}`", shm.display()),
        sys.create(&shm, &Node::Dir { mode: 0o1777 })
            .and_then(|()| {
                sys.mount(
                    Some(Path::new("shm")),
                    &shm,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                    Some(SHM_OPTIONS),
                )
            }),
    )?;
    for (name, target) in DEV_SYMLINKS {
        let link = dev.join(name);
        at(
            || format!("link `{}` to `{target}`", link.display()),
            sys.create(&link, &Node::Symlink { target }),
        )?;
    }
    Ok(())
}

fn bind_read_only(sys: &dyn Syscall, source: &Path, target: &Path) -> Result<(), SetupError> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    at(
        || {
            format!(
                "bind `{}` read-only onto `{}`",
                source.display(),
                target.display()
            )
        },
        read_only(sys, source, target, flags),
    )
}

/// A bind mount, then the remount that makes it read-only (a bind ignores `MS_RDONLY`).
fn read_only(sys: &dyn Syscall, source: &Path, target: &Path, flags: MsFlags) -> io::Result<()> {
    sys.mount(Some(source), target, None, MsFlags::MS_BIND, None)?;
    sys.mount(
        None,
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | flags,
        None,
    )
}

/// The script's path once inside the sandbox, given where `/tmp` was mounted.
pub fn script_path_in_image(root: &Path, tmp: &Path) -> PathBuf {
    Path::new("/")
        .join(tmp.strip_prefix(root).unwrap_or(Path::new("tmp")))
        .join(SCRIPT_NAME)
}

#[cfg(test)]
mod tests {
    use super::super::recording::{Call, RecordingSyscall};
    use super::*;
    use crate::build::runner::protocol::{Bind, MountTargets};

    fn spec(network: bool) -> SandboxSpec {
        SandboxSpec {
            parent_pid: 1,
            root: "/b/root".into(),
            mounts: MountTargets {
                proc: "/b/root/proc".into(),
                dev: "/b/root/dev".into(),
                tmp: "/b/root/var/tmp".into(),
            },
            hostname: "builder".into(),
            network,
            resolv_conf: network.then(|| Bind {
                source: "/etc/resolv.conf".into(),
                target: "/b/root/etc/resolv.conf".into(),
            }),
            workdir: "/srv".into(),
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 4],
            env: vec![],
            script: "echo hi\n".into(),
            timeout_ms: 1000,
        }
    }

    fn position(calls: &[Call], wanted: impl Fn(&Call) -> bool) -> usize {
        calls.iter().position(wanted).expect("the call was made")
    }

    #[test]
    fn mounts_are_private_before_anything_is_mounted() {
        let sys = RecordingSyscall::default();
        build(&sys, &spec(false)).unwrap();
        let calls = sys.calls();
        assert!(matches!(&calls[0], Call::Mount { target, flags, .. }
            if target == Path::new("/") && flags.contains(MsFlags::MS_PRIVATE | MsFlags::MS_REC)));
        assert!(
            matches!(&calls[1], Call::Mount { source: Some(s), target, flags, .. }
            if s == Path::new("/b/root") && target == Path::new("/b/root")
                && flags.contains(MsFlags::MS_BIND))
        );
    }

    #[test]
    fn proc_is_fresh_and_its_host_wide_knobs_are_read_only() {
        let sys = RecordingSyscall::default();
        build(&sys, &spec(false)).unwrap();
        let calls = sys.calls();
        assert!(calls.iter().any(
            |c| matches!(c, Call::Mount { fstype: Some(t), target, flags, .. }
            if t == "proc" && target == Path::new("/b/root/proc")
                && flags.contains(MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC))
        ));
        for name in ["sys", "sysrq-trigger"] {
            let path = Path::new("/b/root/proc").join(name);
            assert!(
                calls
                    .iter()
                    .any(|c| matches!(c, Call::Mount { target, flags, .. }
                    if *target == path
                        && flags.contains(MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY))),
                "{name} not remounted read-only"
            );
        }
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, Call::Mount { source: Some(s), target, .. }
            if s == Path::new("/dev/null") && target == Path::new("/b/root/proc/kcore")))
        );
    }

    #[test]
    fn missing_proc_entries_are_skipped() {
        let sys = RecordingSyscall::missing(["/b/root/proc/acpi", "/b/root/proc/timer_stats"]);
        build(&sys, &spec(false)).unwrap();
    }

    #[test]
    fn dev_holds_only_the_harmless_devices() {
        let sys = RecordingSyscall::default();
        build(&sys, &spec(false)).unwrap();
        let bound: Vec<String> = sys
            .calls()
            .iter()
            .filter_map(|c| match c {
                Call::Mount {
                    source: Some(s),
                    target,
                    flags,
                    ..
                } if *flags == MsFlags::MS_BIND && target.starts_with("/b/root/dev") => {
                    Some(s.display().to_string())
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            bound,
            [
                "/dev/null",
                "/dev/zero",
                "/dev/full",
                "/dev/random",
                "/dev/urandom",
                "/dev/tty"
            ]
        );
        let calls = sys.calls();
        assert!(calls.iter().any(
            |c| matches!(c, Call::Mount { fstype: Some(t), data: Some(d), .. }
            if t == "devpts" && d.contains("newinstance"))
        ));
        assert!(calls.iter().any(|c| matches!(c, Call::Create { path, kind }
            if path == Path::new("/b/root/dev/ptmx") && kind == "symlink pts/ptmx")));
    }

    #[test]
    fn the_script_goes_to_the_tmpfs_owned_by_the_step_user() {
        let sys = RecordingSyscall::default();
        build(&sys, &spec(false)).unwrap();
        let calls = sys.calls();
        let tmpfs = position(&calls, |c| {
            matches!(c, Call::Mount { target, fstype: Some(t), .. }
            if target == Path::new("/b/root/var/tmp") && t == "tmpfs")
        });
        let script = position(&calls, |c| {
            matches!(c, Call::Create { path, kind }
            if path == Path::new("/b/root/var/tmp/bake-step.sh")
                && kind == "file 8 bytes mode 700 owner 1000:1000")
        });
        assert!(tmpfs < script);
        assert_eq!(
            script_path_in_image(Path::new("/b/root"), Path::new("/b/root/var/tmp")),
            Path::new("/var/tmp/bake-step.sh")
        );
    }

    #[test]
    fn resolv_conf_and_loopback_depend_on_the_network() {
        let offline = RecordingSyscall::default();
        build(&offline, &spec(false)).unwrap();
        let calls = offline.calls();
        assert!(calls.contains(&Call::LoopbackUp));
        assert!(!calls.iter().any(|c| matches!(c, Call::Mount { target, .. }
            if target.ends_with("etc/resolv.conf"))));

        let online = RecordingSyscall::default();
        build(&online, &spec(true)).unwrap();
        let calls = online.calls();
        assert!(!calls.contains(&Call::LoopbackUp));
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, Call::Mount { target, flags, .. }
            if target == Path::new("/b/root/etc/resolv.conf")
                && flags.contains(MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY)))
        );
    }

    #[test]
    fn privileges_go_after_the_pivot_and_in_the_right_order() {
        let sys = RecordingSyscall::default();
        build(&sys, &spec(false)).unwrap();
        let calls = sys.calls();
        let last_mount = calls
            .iter()
            .rposition(|c| matches!(c, Call::Mount { .. }))
            .unwrap();
        let hostname = position(&calls, |c| *c == Call::SetHostname("builder".into()));
        let pivot = position(&calls, |c| matches!(c, Call::PivotRoot(_)));
        let caps = position(&calls, |c| matches!(c, Call::LimitCapabilities(_)));
        let user = position(&calls, |c| {
            *c == Call::SwitchUser {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 4],
            }
        });
        let chdir = position(&calls, |c| *c == Call::Chdir("/srv".into()));
        assert!(last_mount < pivot && hostname < pivot);
        assert!(pivot < caps && caps < user && user < chdir);
        assert_eq!(chdir, calls.len() - 1);
        let Call::LimitCapabilities(kept) = &calls[caps] else {
            unreachable!()
        };
        assert!(!kept.contains(&"CAP_SYS_ADMIN") && !kept.contains(&"CAP_MKNOD"));
    }

    #[test]
    fn a_failing_stage_is_named() {
        let sys = RecordingSyscall::failing_mount("/b/root/dev");
        let error = build(&sys, &spec(false)).unwrap_err();
        assert_eq!(error.stage, "mount a tmpfs on `/b/root/dev`");
        assert_eq!(error.source.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn mount_points_outside_the_root_are_refused() {
        let mut spec = spec(false);
        spec.mounts.tmp = "/tmp".into();
        let sys = RecordingSyscall::default();
        let error = build(&sys, &spec).unwrap_err();
        assert!(error.stage.contains("/tmp"), "{}", error.stage);
        assert!(sys.calls().is_empty());
    }
}
