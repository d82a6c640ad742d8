//! The namespace runner against a real root filesystem (static busybox and its applets): what
//! a step sees, how it ends, and escape attempts that must leave the host untouched. Every
//! escape test checks a canary on the host, outside the root, after the attempt.
//!
//! Needs root (namespaces, mounts) and `/bin/busybox` from Debian's `busybox-static`
//! (`scripts/setup` installs it). Without them the tests print why and pass, except under CI
//! (which runs as root with everything installed), where they fail.

use std::collections::BTreeSet;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bake::build::runner::sandbox::{KEPT_CAPABILITIES, capability_mask};
use bake::build::runner::{
    CopyError, CopyOptions, NamespaceRunner, OutputLine, Runner, RunnerError, StepOutcome,
    StepSpec, Stream, copy_into_root,
};

const BUSYBOX: &str = "/bin/busybox";

/// Where fixtures go: not `/tmp`, because inside the sandbox `/tmp` is a tmpfs, and a host
/// path under it would be hidden by that mount instead of resolving inside the root, which is
/// what the escape tests must show.
const FIXTURE_PARENT: &str = "/var/tmp";

/// Generous: the steps here take milliseconds, but CI's two cores are shared.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether the tests can run here; prints why not, and fails under CI.
fn ready() -> bool {
    if !super::skip::root("namespaces and mounts") {
        return false;
    }
    let busybox = Path::new(BUSYBOX).is_file();
    if !busybox {
        super::skip::skip("/bin/busybox (`apt-get install busybox-static`, or scripts/setup)");
    }
    busybox
}

macro_rules! require_root_and_busybox {
    () => {
        if !ready() {
            return;
        }
    };
}

/// A root filesystem with busybox, two users and no `/proc`, `/dev` or `/tmp`; beside it (so
/// outside it) a canary directory that must stay empty.
struct Image {
    dir: tempfile::TempDir,
    root: PathBuf,
    canary: PathBuf,
}

impl Image {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bake-it-runner-")
            .tempdir_in(FIXTURE_PARENT)
            .unwrap();
        let root = dir.path().join("root");
        let canary = dir.path().join("canary");
        for d in ["bin", "etc", "root", "srv", "home/app"] {
            fs_err::create_dir_all(root.join(d)).unwrap();
        }
        fs_err::create_dir(&canary).unwrap();
        fs_err::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if applet != "busybox" {
                symlink("busybox", root.join("bin").join(applet)).unwrap();
            }
        }
        fs_err::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n",
        )
        .unwrap();
        fs_err::write(
            root.join("etc/group"),
            "root:x:0:\nstaff:x:50:app\napp:x:1000:\n",
        )
        .unwrap();
        std::os::unix::fs::chown(root.join("home/app"), Some(1000), Some(1000)).unwrap();
        Image { dir, root, canary }
    }

    fn step(&self, script: &str) -> StepSpec {
        StepSpec::new(&self.root, "test step", script, STEP_TIMEOUT)
    }

    fn run(&self, step: &StepSpec) -> (Result<StepOutcome, RunnerError>, Vec<OutputLine>) {
        let runner = NamespaceRunner::with_helper(env!("CARGO_BIN_EXE_bake"));
        let mut lines: Vec<OutputLine> = Vec::new();
        let result = runner.run(step, &mut lines);
        (result, lines)
    }

    /// Runs a script that must succeed; returns its stdout.
    fn stdout(&self, step: &StepSpec) -> String {
        let (result, lines) = self.run(step);
        if let Err(error) = result {
            panic!("{error}\noutput: {lines:#?}");
        }
        stdout(&lines)
    }

    fn assert_host_untouched(&self) {
        let entries: Vec<_> = fs_err::read_dir(&self.canary)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(entries.is_empty(), "the step reached the host: {entries:?}");
        assert!(
            !mountinfo().contains(self.dir.path().to_str().unwrap()),
            "a sandbox mount is visible on the host"
        );
    }
}

fn stdout(lines: &[OutputLine]) -> String {
    lines
        .iter()
        .filter(|l| l.stream == Stream::Stdout)
        .map(|l| format!("{}\n", l.text))
        .collect()
}

fn mountinfo() -> String {
    fs_err::read_to_string("/proc/self/mountinfo").unwrap()
}

/// A name no other test (or run) uses, for host canaries in shared places like `/tmp`.
fn unique(what: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "bake-it-{what}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[test]
fn the_step_is_pid_1_of_its_own_pid_namespace() {
    require_root_and_busybox!();
    let image = Image::new();
    let out = image.stdout(&image.step(
        "echo \"pid=$$\"\n\
         tr '\\0' ' ' < /proc/1/cmdline; echo\n\
         readlink /proc/1/exe\n\
         ls /proc | grep -c '^[0-9]'\n",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "pid=1");
    assert_eq!(lines[1].trim_end(), "/bin/sh -e /tmp/bake-step.sh");
    // The image's busybox, not a host binary: nothing of the host is PID 1's executable.
    assert_eq!(lines[2], "/bin/busybox");
    let processes: usize = lines[3].parse().unwrap();
    assert!(processes <= 4, "the step sees {processes} processes");
}

#[test]
fn signals_start_at_their_defaults() {
    require_root_and_busybox!();
    let image = Image::new();
    // bake ignores SIGPIPE (Rust's runtime does) and the helper blocks signals; neither may
    // leak into the step, or `yes | head` would never end.
    let mut step = image.step("grep -E '^Sig(Blk|Ign)' /proc/self/status\nyes | head -n 1\n");
    step.timeout = Duration::from_secs(20);
    assert_eq!(
        image.stdout(&step),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\ny\n"
    );
}

#[test]
fn the_hosts_own_root_is_refused() {
    require_root_and_busybox!();
    let image = Image::new();
    // `/usr/..` is `/` under another name.
    let mut step = image.step("touch /bake-it-must-not-exist\n");
    step.root = "/usr/..".into();
    let (result, _) = image.run(&step);
    assert!(
        matches!(result, Err(RunnerError::HostRoot { .. })),
        "{result:?}"
    );
    let source = image.dir.path().join("f");
    fs_err::write(&source, "x").unwrap();
    let copied = copy_into_root(
        Path::new("/"),
        &source,
        "/bake-it-must-not-exist",
        &CopyOptions::default(),
    );
    assert!(
        matches!(copied, Err(CopyError::HostRoot { .. })),
        "{copied:?}"
    );
    assert!(!Path::new("/bake-it-must-not-exist").exists());
}

#[test]
fn the_hostname_is_the_steps_and_cannot_be_changed() {
    require_root_and_busybox!();
    let image = Image::new();
    let host = nix::unistd::gethostname().unwrap();
    let mut step =
        image.step("hostname\nhostname evil && echo CHANGED || echo refused\nhostname\n");
    step.hostname = "bake-it-host".into();
    let out = image.stdout(&step);
    assert_eq!(out, "bake-it-host\nrefused\nbake-it-host\n");
    assert_eq!(nix::unistd::gethostname().unwrap(), host);
}

#[test]
fn without_network_there_is_only_an_up_loopback_and_no_resolv_conf() {
    require_root_and_busybox!();
    let image = Image::new();
    let out = image.stdout(&image.step(
        "sed -n 's/^ *\\([^:]*\\):.*/\\1/p' /proc/net/dev\n\
         ip link show lo | head -n 1\n\
         test -e /etc/resolv.conf && echo RESOLV || echo no-resolv\n\
         ping -c 1 -W 2 127.0.0.1 > /dev/null && echo loopback-works\n",
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "lo", "interfaces: {out}");
    assert!(lines[1].contains("UP"), "{}", lines[1]);
    assert_eq!(lines[2..], ["no-resolv", "loopback-works"]);
}

#[test]
fn with_network_the_hosts_resolv_conf_is_there_read_only_and_gone_after() {
    require_root_and_busybox!();
    let Ok(host_resolv) = fs_err::read_to_string("/etc/resolv.conf") else {
        super::skip::skip("the host's /etc/resolv.conf");
        return;
    };
    let image = Image::new();
    let mut step = image.step(
        "cat /etc/resolv.conf\n\
         echo x >> /etc/resolv.conf && echo WRITABLE || echo read-only\n",
    );
    step.network = true;
    let out = image.stdout(&step);
    assert_eq!(out, format!("{host_resolv}read-only\n"));
    assert!(
        !image.root.join("etc/resolv.conf").exists(),
        "the placeholder is removed after the step"
    );
    assert_eq!(
        fs_err::read_to_string("/etc/resolv.conf").unwrap(),
        host_resolv
    );
    image.assert_host_untouched();
}

#[test]
fn env_workdir_and_user_are_applied_and_nothing_else_gets_in() {
    require_root_and_busybox!();
    let image = Image::new();
    let mut step = image.step(
        "id -u; id -g; id -G; pwd\n\
         echo \"$GREETING|$HOME|$PATH|$DEBIAN_FRONTEND\"\n\
         grep CapEff /proc/self/status\n\
         env | cut -d= -f1 | sort | tr '\\n' ' '; echo\n",
    );
    step.user = Some("app".into());
    step.workdir = Some("/home/app".into());
    step.env.insert("GREETING".into(), "hello world".into());
    let out = image.stdout(&step);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..4], ["1000", "1000", "1000 50", "/home/app"]);
    assert_eq!(
        lines[4],
        "hello world|/home/app|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|noninteractive"
    );
    assert_eq!(
        lines[5], "CapEff:\t0000000000000000",
        "a user step holds no capability"
    );
    let names: BTreeSet<&str> = lines[6].split_whitespace().collect();
    let allowed = BTreeSet::from([
        "DEBIAN_FRONTEND",
        "GREETING",
        "HOME",
        "PATH",
        // Set by the shell itself.
        "OLDPWD",
        "PWD",
        "SHLVL",
    ]);
    assert!(names.is_subset(&allowed), "unexpected variables: {names:?}");

    let mut numeric = image.step("id -u; id -g\n");
    numeric.user = Some("4242:4343".into());
    assert_eq!(image.stdout(&numeric), "4242\n4343\n");
}

#[test]
fn root_steps_hold_only_the_kept_capabilities() {
    require_root_and_busybox!();
    let image = Image::new();
    let out = image.stdout(&image.step("grep -E '^Cap(Inh|Eff|Bnd|Amb)' /proc/self/status\n"));
    let kept = format!("{:016x}", capability_mask(&KEPT_CAPABILITIES));
    assert_eq!(
        out,
        format!(
            "CapInh:\t{0:016x}\nCapEff:\t{kept}\nCapBnd:\t{kept}\nCapAmb:\t{0:016x}\n",
            0
        )
    );
}

#[test]
fn a_failing_step_reports_its_exit_code_and_last_lines() {
    require_root_and_busybox!();
    let image = Image::new();
    let (result, _) = image.run(&image.step(
        // One stream: lines of stdout and stderr are ordered only within each.
        "for i in $(seq 1 30); do echo \"line $i\"; done\necho oops\nexit 3\n",
    ));
    let error = result.unwrap_err();
    let RunnerError::StepFailed {
        code, last_lines, ..
    } = &error
    else {
        panic!("{error}");
    };
    assert_eq!(*code, 3);
    assert_eq!(last_lines.len(), bake::build::runner::LAST_LINES);
    assert_eq!(last_lines.first().unwrap(), "line 12");
    assert_eq!(last_lines.last().unwrap(), "oops");
    let message = error.to_string();
    assert!(message.contains("exit code 3"), "{message}");
    assert!(message.contains("  | oops"), "{message}");
}

#[test]
fn scripts_stop_at_the_first_failure_unless_they_choose_their_interpreter() {
    require_root_and_busybox!();
    let image = Image::new();
    let (result, lines) = image.run(&image.step("false\necho UNREACHED\n"));
    assert!(matches!(
        result,
        Err(RunnerError::StepFailed { code: 1, .. })
    ));
    assert!(!stdout(&lines).contains("UNREACHED"));
    let out = image.stdout(&image.step("#!/bin/sh\nfalse\necho reached\n"));
    assert_eq!(out, "reached\n");
}

#[test]
fn output_arrives_line_by_line_on_its_stream() {
    require_root_and_busybox!();
    let image = Image::new();
    let (result, lines) = image.run(&image.step("echo out\necho err >&2\nprintf 'no newline'\n"));
    result.unwrap();
    assert!(lines.contains(&OutputLine {
        stream: Stream::Stdout,
        text: "out".into()
    }));
    assert!(lines.contains(&OutputLine {
        stream: Stream::Stderr,
        text: "err".into()
    }));
    assert!(lines.contains(&OutputLine {
        stream: Stream::Stdout,
        text: "no newline".into()
    }));
}

#[test]
fn a_timeout_kills_every_process_in_the_sandbox() {
    require_root_and_busybox!();
    let image = Image::new();
    // Background processes that would outlive a shell killed on its own.
    let mut step = image.step(
        "sleep 7771 &\nsleep 7772 &\n(while true; do sleep 7773; done) &\necho started\nsleep 7774\n",
    );
    step.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let (result, _) = image.run(&step);
    let elapsed = started.elapsed();
    let error = result.unwrap_err();
    assert!(
        matches!(&error, RunnerError::TimedOut { last_lines, .. } if last_lines == &["started"]),
        "{error}"
    );
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    let survivors: Vec<String> = fs_err::read_dir("/proc")
        .unwrap()
        .filter_map(|e| fs_err::read(e.unwrap().path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("sleep 777"))
        .collect();
    assert!(survivors.is_empty(), "still running: {survivors:?}");
}

#[test]
fn setup_failures_name_the_stage() {
    require_root_and_busybox!();
    let image = Image::new();
    let mut step = image.step("true\n");
    step.workdir = Some("/does/not/exist".into());
    let (result, _) = image.run(&step);
    let error = result.unwrap_err();
    assert!(
        matches!(&error, RunnerError::Setup { stage, source, .. }
            if stage == "change to workdir `/does/not/exist`"
                && source.raw_os_error() == Some(libc::ENOENT)),
        "{error:?}"
    );
    let runner = NamespaceRunner::with_helper(image.dir.path().join("no-such-bake"));
    let error = runner.run(&step, &mut Vec::new()).unwrap_err();
    assert!(matches!(error, RunnerError::Spawn { .. }), "{error:?}");
}

#[test]
fn mount_points_are_created_once_and_nothing_stays_mounted() {
    require_root_and_busybox!();
    let image = Image::new();
    let (first, _) = image.run(&image.step("mkdir -p /tmp/x /dev/shm/y\n"));
    assert_eq!(first.unwrap().created, ["/proc", "/dev", "/tmp"]);
    let (second, _) = image.run(&image.step("true\n"));
    assert!(second.unwrap().created.is_empty());
    for dir in ["proc", "dev", "tmp"] {
        let entries = fs_err::read_dir(image.root.join(dir)).unwrap().count();
        assert_eq!(entries, 0, "/{dir} holds what the sandbox mounted there");
    }
    image.assert_host_untouched();
}

#[test]
fn escape_dotdot_from_the_root_lands_inside() {
    require_root_and_busybox!();
    let image = Image::new();
    let name = unique("dotdot");
    let canary = image.canary.display().to_string();
    let out = image.stdout(&image.step(&format!(
        "cd /\n\
         echo pwned > ../../../tmp/{name} && echo wrote-tmp\n\
         mkdir -p ../../../..{canary}\n\
         echo pwned > ../../../../..{canary}/f && echo wrote-canary\n\
         cd ../../../..; pwd\n"
    )));
    assert_eq!(out, "wrote-tmp\nwrote-canary\n/\n");
    assert!(!Path::new("/tmp").join(&name).exists());
    let inside = image
        .root
        .join(image.canary.strip_prefix("/").unwrap())
        .join("f");
    assert!(inside.is_file(), "the write went into the root");
    image.assert_host_untouched();
}

#[test]
fn escape_through_an_absolute_symlink_stays_inside() {
    require_root_and_busybox!();
    let image = Image::new();
    let canary = image.canary.display().to_string();
    let out = image.stdout(&image.step(&format!(
        "ln -s {canary} /x\n\
         echo pwned > /x/f || echo dangling\n\
         mkdir -p {canary}\n\
         echo pwned > /x/f && echo wrote\n"
    )));
    assert_eq!(out, "dangling\nwrote\n");
    image.assert_host_untouched();
}

#[test]
fn escape_by_mounting_is_refused() {
    require_root_and_busybox!();
    let image = Image::new();
    let before = mountinfo();
    let out = image.stdout(&image.step(
        "mkdir -p /mnt\n\
         mount -t tmpfs none /mnt && echo MOUNTED\n\
         mount --bind / /mnt && echo MOUNTED\n\
         mount -t proc proc /mnt && echo MOUNTED\n\
         mount -o remount,rw /proc/sys && echo REMOUNTED\n\
         umount /proc/sys && echo UNMOUNTED\n\
         umount -l /dev && echo UNMOUNTED\n\
         unshare -m true && echo UNSHARED\n\
         echo done\n",
    ));
    assert_eq!(out, "done\n");
    assert_eq!(mountinfo(), before);
    image.assert_host_untouched();
}

#[test]
fn escape_through_device_nodes_is_refused() {
    require_root_and_busybox!();
    let image = Image::new();
    let out = image.stdout(&image.step(
        "mknod /sda b 8 0 && echo MADE\n\
         mknod /mem c 1 1 && echo MADE\n\
         mknod /dev/sda b 8 0 && echo MADE\n\
         ls /dev | tr '\\n' ' '; echo\n\
         cat /dev/null && echo null-works\n",
    ));
    assert_eq!(
        out,
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero \nnull-works\n"
    );
    assert!(!image.root.join("sda").exists() && !image.root.join("mem").exists());
    image.assert_host_untouched();
}

#[test]
fn escape_with_chroot_tricks_leads_nowhere() {
    require_root_and_busybox!();
    let image = Image::new();
    let marker = unique("marker");
    fs_err::write(image.dir.path().join(&marker), "host").unwrap();
    let canary = image.canary.display().to_string();
    let out = image.stdout(&image.step(&format!(
        "mkdir -p /jail/bin\n\
         cp /bin/busybox /jail/bin/busybox\n\
         chroot /jail /bin/busybox sh -c 'cd /../../../..; /bin/busybox mkdir -p .{canary}; /bin/busybox touch .{canary}/f'\n\
         chroot / /bin/sh -c 'cd ../../../..; pwd; mkdir -p .{canary}; touch .{canary}/g'\n\
         cd /; cd ..; cd ..; ls -a | grep -c {marker} || true\n\
         find / -xdev -name '{marker}' | wc -l\n"
    )));
    assert_eq!(out, "/\n0\n0\n");
    assert!(
        image
            .root
            .join("jail")
            .join(image.canary.strip_prefix("/").unwrap())
            .join("f")
            .is_file()
    );
    image.assert_host_untouched();
}

#[test]
fn escape_through_proc_is_refused() {
    require_root_and_busybox!();
    let image = Image::new();
    let marker = image.dir.path().join(unique("proc-marker"));
    fs_err::write(&marker, "host").unwrap();
    let core_pattern = fs_err::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    let marker = marker.display();
    // Writes back the value it read, so that even a failure of this test changes nothing.
    let out = image.stdout(&image.step(&format!(
        "readlink /proc/1/root\n\
         for p in /proc/[0-9]*; do test -e $p/root{marker} && echo FOUND $p; done\n\
         test -e {marker} && echo FOUND\n\
         cat /proc/sys/kernel/core_pattern > /tmp/cp\n\
         cat /tmp/cp > /proc/sys/kernel/core_pattern && echo WROTE\n\
         echo 1 > /proc/sys/kernel/sysrq && echo WROTE\n\
         grep -c ' /proc/sys ro,' /proc/self/mountinfo\n"
    )));
    assert_eq!(out, "/\n1\n");
    assert_eq!(
        fs_err::read_to_string("/proc/sys/kernel/core_pattern").unwrap(),
        core_pattern
    );
    image.assert_host_untouched();
}

#[test]
fn no_host_descriptor_reaches_the_step() {
    require_root_and_busybox!();
    let image = Image::new();
    let out = image.stdout(&image.step(
        // The glob's own directory descriptor is gone by the time readlink looks at it.
        "for fd in /proc/$$/fd/*; do readlink $fd || true; done\n\
         if sh -c ': 3< /dev/tty' 2> /dev/null; then echo HAS-TTY; else echo no-tty; fi\n",
    ));
    let mut lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.pop(), Some("no-tty"));
    for target in lines {
        assert!(
            target == "/dev/null" || target.starts_with("pipe:[") || target == "/tmp/bake-step.sh",
            "the step holds `{target}`"
        );
    }
}

#[test]
fn files_copied_in_are_what_the_step_sees() {
    require_root_and_busybox!();
    let image = Image::new();
    let source = image.dir.path().join("greet.sh");
    fs_err::write(&source, "echo copied greeting\n").unwrap();
    fs_err::set_permissions(&source, std::fs::Permissions::from_mode(0o600)).unwrap();
    symlink(&image.canary, image.root.join("opt")).unwrap();
    let options = CopyOptions {
        mode: Some(0o755),
        owner: (1000, 1000),
        ..CopyOptions::default()
    };
    // `/opt` is an absolute symlink to the host's canary: it must resolve inside the root.
    let report = copy_into_root(&image.root, &source, "/opt/bin/", &options).unwrap();
    assert_eq!(report.destination, "/opt/bin/greet.sh");
    image.assert_host_untouched();
    let mut step =
        image.step("ls -ln /opt/bin/greet.sh | awk '{print $1, $3, $4}'\nsh /opt/bin/greet.sh\n");
    step.user = Some("app".into());
    assert_eq!(
        image.stdout(&step),
        "-rwxr-xr-x 1000 1000\ncopied greeting\n"
    );
}
