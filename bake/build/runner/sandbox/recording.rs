//! A [`Syscall`] that records calls instead of making them (youki's `TestHelperSyscall`), so
//! that the sandbox setup's order and flags are unit-tested without root.

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::syscall::{Capability, Node, Syscall};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount {
        source: Option<PathBuf>,
        target: PathBuf,
        fstype: Option<String>,
        flags: MsFlags,
        data: Option<String>,
    },
    PivotRoot(PathBuf),
    /// `kind` describes the node: `dir mode 755`, `file N bytes mode 700 owner U:G`,
    /// `symlink TARGET`.
    Create {
        path: PathBuf,
        kind: String,
    },
    SetHostname(String),
    LoopbackUp,
    LimitCapabilities(Vec<&'static str>),
    SwitchUser {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
    },
    Chdir(PathBuf),
}

#[derive(Debug, Default)]
pub struct RecordingSyscall {
    calls: RefCell<Vec<Call>>,
    /// Mount targets that do not exist (`ENOENT`).
    missing: Vec<PathBuf>,
    /// A mount target whose mount fails with `EPERM`.
    failing: Option<PathBuf>,
}

impl RecordingSyscall {
    pub fn missing<const N: usize>(paths: [&str; N]) -> Self {
        RecordingSyscall {
            missing: paths.iter().map(PathBuf::from).collect(),
            ..Default::default()
        }
    }

    pub fn failing_mount(target: &str) -> Self {
        RecordingSyscall {
            failing: Some(target.into()),
            ..Default::default()
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.borrow().clone()
    }

    fn record(&self, call: Call) {
        self.calls.borrow_mut().push(call);
    }
}

impl Syscall for RecordingSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        if self.missing.iter().any(|m| m == target) {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        if self.failing.as_deref() == Some(target) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.record(Call::Mount {
            source: source.map(Path::to_owned),
            target: target.to_owned(),
            fstype: fstype.map(str::to_owned),
            flags,
            data: data.map(str::to_owned),
        });
        Ok(())
    }

    fn pivot_root(&self, new_root: &Path) -> io::Result<()> {
        self.record(Call::PivotRoot(new_root.to_owned()));
        Ok(())
    }

    fn create(&self, path: &Path, node: &Node<'_>) -> io::Result<()> {
        let kind = match node {
            Node::Dir { mode } => format!("dir mode {mode:o}"),
            Node::File {
                contents,
                mode,
                uid,
                gid,
            } => format!(
                "file {} bytes mode {mode:o} owner {uid}:{gid}",
                contents.len()
            ),
            Node::Symlink { target } => format!("symlink {target}"),
        };
        self.record(Call::Create {
            path: path.to_owned(),
            kind,
        });
        Ok(())
    }

    fn set_hostname(&self, name: &str) -> io::Result<()> {
        self.record(Call::SetHostname(name.to_owned()));
        Ok(())
    }

    fn loopback_up(&self) -> io::Result<()> {
        self.record(Call::LoopbackUp);
        Ok(())
    }

    fn limit_capabilities(&self, keep: &[Capability]) -> io::Result<()> {
        self.record(Call::LimitCapabilities(
            keep.iter().map(|c| c.name).collect(),
        ));
        Ok(())
    }

    fn switch_user(&self, uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
        self.record(Call::SwitchUser {
            uid,
            gid,
            groups: groups.to_vec(),
        });
        Ok(())
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        self.record(Call::Chdir(path.to_owned()));
        Ok(())
    }
}
