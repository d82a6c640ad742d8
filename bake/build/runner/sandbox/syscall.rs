//! The privileged operations that build a sandbox, behind a narrow trait (youki's `Syscall`):
//! [`Linux`] performs them; the recording fake (tests only) writes them down, so that the order
//! and flags of [`super::setup`] are unit-tested without root or namespaces.
//!
//! Process-level steps that cannot be faked meaningfully (`unshare`, `fork`, `setsid`, `execve`)
//! stay in [`super`].

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fs_err::os::unix::fs::OpenOptionsExt;
use nix::mount::{MntFlags, MsFlags};
use nix::unistd::{Gid, Uid};

/// Something [`Syscall::create`] makes on a filesystem private to the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node<'a> {
    Dir {
        mode: u32,
    },
    File {
        contents: &'a [u8],
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        target: &'a str,
    },
}

/// A Linux capability, by name (for messages) and number (for the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub number: u32,
}

/// What a step keeps: Docker's default set minus `CAP_MKNOD`. Enough for package managers
/// (`chown`, `setuid` to `_apt`, `setcap` in postinst scripts, binding low ports in tests),
/// and nothing that reaches beyond the sandbox: no `CAP_SYS_ADMIN` (no mounts, no namespaces
/// of its own making, no `sethostname`), no `CAP_MKNOD` (no block devices onto the host's
/// disks), no `CAP_DAC_READ_SEARCH` (no `open_by_handle_at` out of the root), no
/// `CAP_SYS_MODULE`, `CAP_SYS_PTRACE`, `CAP_NET_ADMIN` or `CAP_SYS_RAWIO`.
pub const KEPT_CAPABILITIES: [Capability; 13] = [
    cap("CAP_CHOWN", 0),
    cap("CAP_DAC_OVERRIDE", 1),
    cap("CAP_FOWNER", 3),
    cap("CAP_FSETID", 4),
    cap("CAP_KILL", 5),
    cap("CAP_SETGID", 6),
    cap("CAP_SETUID", 7),
    cap("CAP_SETPCAP", 8),
    cap("CAP_NET_BIND_SERVICE", 10),
    cap("CAP_NET_RAW", 13),
    cap("CAP_SYS_CHROOT", 18),
    cap("CAP_AUDIT_WRITE", 29),
    cap("CAP_SETFCAP", 31),
];

const fn cap(name: &'static str, number: u32) -> Capability {
    Capability { name, number }
}

/// The bit mask of a set of capabilities, as `/proc/PID/status` shows it (`CapBnd`, `CapEff`).
pub fn capability_mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |mask, c| mask | 1 << c.number)
}

/// The operations [`super::setup::build`] needs, in the terms it needs them.
pub trait Syscall {
    /// `mount(2)`; `source` and `data` as the kernel takes them.
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()>;
    /// Makes `new_root` the root of the mount namespace and detaches the old root entirely.
    fn pivot_root(&self, new_root: &Path) -> io::Result<()>;
    /// Creates a directory, file or symlink that must not exist yet (never following one).
    fn create(&self, path: &Path, node: &Node<'_>) -> io::Result<()>;
    fn set_hostname(&self, name: &str) -> io::Result<()>;
    /// Brings up `lo` in the current network namespace.
    fn loopback_up(&self) -> io::Result<()>;
    /// Limits the bounding, permitted and effective sets to `keep`, and empties the
    /// inheritable and ambient sets.
    fn limit_capabilities(&self, keep: &[Capability]) -> io::Result<()>;
    /// Sets supplementary groups, then the group, then the user (all of real, effective and
    /// saved ids).
    fn switch_user(&self, uid: u32, gid: u32, groups: &[u32]) -> io::Result<()>;
    fn chdir(&self, path: &Path) -> io::Result<()>;
}

/// The real thing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Linux;

/// `_LINUX_CAPABILITY_VERSION_3` from `<linux/capability.h>`: 64-bit sets in two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

impl Syscall for Linux {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> io::Result<()> {
        Ok(nix::mount::mount(source, target, fstype, flags, data)?)
    }

    fn pivot_root(&self, new_root: &Path) -> io::Result<()> {
        // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "." then
        // removes the old root, leaving no path back to the host's tree (runc does the same).
        nix::unistd::chdir(new_root)?;
        nix::unistd::pivot_root(".", ".")?;
        nix::mount::umount2(".", MntFlags::MNT_DETACH)?;
        nix::unistd::chdir("/")?;
        Ok(())
    }

    fn create(&self, path: &Path, node: &Node<'_>) -> io::Result<()> {
        match node {
            Node::Dir { mode } => {
                fs_err::create_dir(path)?;
                fs_err::set_permissions(path, std::fs::Permissions::from_mode(*mode))
            }
            Node::File {
                contents,
                mode,
                uid,
                gid,
            } => {
                let mut file = fs_err::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)?;
                file.write_all(contents)?;
                std::os::unix::fs::fchown(file.file(), Some(*uid), Some(*gid))?;
                file.set_permissions(std::fs::Permissions::from_mode(*mode))
            }
            Node::Symlink { target } => fs_err::os::unix::fs::symlink(target, path),
        }
    }

    fn set_hostname(&self, name: &str) -> io::Result<()> {
        Ok(nix::unistd::sethostname(name)?)
    }

    fn loopback_up(&self) -> io::Result<()> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo") {
            *slot = *byte as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `ifr_flags` of a valid ifreq.
        unsafe {
            if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
                return Err(io::Error::last_os_error());
            }
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn limit_capabilities(&self, keep: &[Capability]) -> io::Result<()> {
        let mask = capability_mask(keep);
        // The bounding set first: dropping from it needs CAP_SETPCAP, which capset may remove.
        for number in 0..64u32 {
            if mask & (1 << number) != 0 {
                continue;
            }
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, number as libc::c_ulong, 0, 0, 0) } < 0 {
                let error = io::Error::last_os_error();
                // EINVAL: past the last capability this kernel knows.
                if error.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(error);
            }
        }
        // SAFETY: prctl with integer arguments only.
        let cleared = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        if cleared < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
        let mut header = CapHeader {
            version: CAPABILITY_VERSION_3,
            pid: 0,
        };
        let mut data = [CapData::default(); 2];
        // SAFETY: capget/capset with a version-3 header and two data words, as the ABI wants.
        unsafe {
            if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            for (word, data) in data.iter_mut().enumerate() {
                let wanted = (mask >> (32 * word)) as u32;
                // Never ask for more than is held: capset would refuse.
                data.permitted &= wanted;
                data.effective = data.permitted;
                data.inheritable = 0;
            }
            if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn switch_user(&self, uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
        let groups: Vec<Gid> = groups.iter().copied().map(Gid::from_raw).collect();
        nix::unistd::setgroups(&groups)?;
        let gid = Gid::from_raw(gid);
        nix::unistd::setresgid(gid, gid, gid)?;
        let uid = Uid::from_raw(uid);
        nix::unistd::setresuid(uid, uid, uid)?;
        Ok(())
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        Ok(nix::unistd::chdir(path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_capabilities_are_dockers_default_without_mknod() {
        let names: Vec<&str> = KEPT_CAPABILITIES.iter().map(|c| c.name).collect();
        assert!(!names.contains(&"CAP_MKNOD"));
        assert!(!names.contains(&"CAP_SYS_ADMIN"));
        assert_eq!(names.len(), 13);
        // Docker's default CapBnd is 0xa80425fb; without CAP_MKNOD (bit 27) it is 0xa00425fb.
        assert_eq!(capability_mask(&KEPT_CAPABILITIES), 0xa004_25fb);
    }
}
