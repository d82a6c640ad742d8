//! Deleting what the store throws away (see [`super::Store::discard`] and
//! [`super::Store::reap_trash`]): whole trees, as root, next to the host's files.
//!
//! A build root is an image's file system, written by provisioning steps that ran as root, and
//! deleting it must never reach outside it. Every step here works on directory descriptors
//! (`openat` with `O_NOFOLLOW`), so a symlink in the tree, or one swapped in for a directory
//! while it is being deleted, is removed as a link and never followed; and it never enters a
//! directory on another mount (a file system mounted into a root, a bind mount, even of the
//! store's own file system), which is reported and left alone rather than emptied.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, StatxFlags};
use rustix::io::Errno;

/// Where a directory lives: its device and, where the kernel says (Linux 5.8+), its mount,
/// which also tells a bind mount of the same file system from the file system itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MountId {
    major: u32,
    minor: u32,
    mount: Option<u64>,
}

fn mount_of(fd: BorrowedFd<'_>) -> io::Result<MountId> {
    let stat = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    let has_mount = StatxFlags::from_bits_retain(stat.stx_mask).contains(StatxFlags::MNT_ID);
    Ok(MountId {
        major: stat.stx_dev_major,
        minor: stat.stx_dev_minor,
        mount: has_mount.then_some(stat.stx_mnt_id),
    })
}

fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The names in `dir`, without `.` and `..` (also the unpacker's, for whiteouts).
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    // A fresh descriptor: reading a directory moves its offset.
    let fd = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsString::from(OsStr::from_bytes(&name)));
        }
    }
    Ok(names)
}

/// Success for what another process deleted first (two reaps at once).
fn gone_ok(result: rustix::io::Result<()>) -> io::Result<()> {
    match result {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` from `dir`, with everything below it if it is a directory on `mount`.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr, mount: MountId) -> io::Result<()> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
        return gone_ok(rustix::fs::unlinkat(dir, name, AtFlags::empty()));
    }
    let child = match open_dir(dir, name) {
        Ok(child) => child,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    // Checked on the open directory itself, so a mount made after the stat above is seen.
    if mount_of(child.as_fd())? != mount {
        return Err(io::Error::new(
            io::ErrorKind::CrossesDevices,
            format!(
                "`{}` is a mount point; unmount it, then delete it",
                name.to_string_lossy()
            ),
        ));
    }
    for entry in list_dir(child.as_fd())? {
        remove_at(child.as_fd(), &entry, mount)?;
    }
    gone_ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR))
}

/// Deletes `path` (a file, a symlink, or a directory tree on the same mount as its parent).
/// A missing `path` is not an error.
pub(super) fn remove_all(path: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a path with a parent directory",
        ));
    };
    let parent = match rustix::fs::open(
        parent,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(parent) => parent,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let mount = mount_of(parent.as_fd())?;
    remove_at(parent.as_fd(), name, mount)
}

/// Deletes every entry of `dir`, which must be a real directory (not a symlink to one), and
/// returns what could not be deleted, with why. A missing `dir` has nothing to delete.
pub(super) fn empty(dir: &Path) -> io::Result<Vec<(OsString, io::Error)>> {
    let fd = match rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mount = mount_of(fd.as_fd())?;
    let mut left = Vec::new();
    for name in list_dir(fd.as_fd())? {
        if let Err(e) = remove_at(fd.as_fd(), &name, mount) {
            left.push((name, e));
        }
    }
    Ok(left)
}

/// Puts the calling thread in the idle I/O class and at nice 19 (best effort: a failure only
/// means the reap competes with the build).
pub(super) fn lower_priority() {
    // ioprio_set(IOPRIO_WHO_PROCESS, 0 = this thread, IOPRIO_CLASS_IDLE << 13).
    const IOPRIO_WHO_PROCESS: libc::c_int = 1;
    const IOPRIO_CLASS_IDLE: libc::c_int = 3;
    // SAFETY: plain syscalls on the calling thread with integer arguments. On Linux both the
    // I/O priority and the nice value of `who = 0` are the calling thread's, not the process's.
    unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IOPRIO_CLASS_IDLE << 13,
        );
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::process::Command;

    use super::*;

    fn write(path: &Path, text: &str) {
        fs_err::create_dir_all(path.parent().unwrap()).unwrap();
        fs_err::write(path, text).unwrap();
    }

    #[test]
    fn trees_are_deleted_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        write(&outside.join("keep"), "keep\n");
        let trash = dir.path().join("trash");
        write(&trash.join("root/etc/passwd"), "root:x:0:0\n");
        write(&trash.join("loose-file"), "x\n");
        symlink(&outside, trash.join("root/escape-dir")).unwrap();
        symlink(outside.join("keep"), trash.join("root/escape-file")).unwrap();
        symlink(&outside, trash.join("top-link")).unwrap();
        // Not writable by its owner: root deletes it anyway.
        let locked = trash.join("root/locked");
        write(&locked.join("f"), "f\n");
        std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o500))
            .unwrap();

        let left = empty(&trash).unwrap();
        let root = rustix::process::geteuid().is_root();
        if root {
            assert!(left.is_empty(), "{left:?}");
            assert_eq!(fs_err::read_dir(&trash).unwrap().count(), 0);
        } else {
            // Only the locked directory's content is out of reach.
            assert_eq!(left.len(), 1, "{left:?}");
            assert_eq!(left[0].0, "root");
        }
        assert!(trash.is_dir(), "the directory itself stays");
        assert_eq!(
            fs_err::read_to_string(outside.join("keep")).unwrap(),
            "keep\n"
        );
    }

    #[test]
    fn a_trash_that_is_a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        write(&elsewhere.join("precious"), "x\n");
        let trash = dir.path().join("trash");
        symlink(&elsewhere, &trash).unwrap();
        let error = empty(&trash).unwrap_err();
        // O_NOFOLLOW | O_DIRECTORY on a symlink: ENOTDIR (ELOOP on some kernels).
        assert!(
            [Some(libc::ENOTDIR), Some(libc::ELOOP)].contains(&error.raw_os_error()),
            "{error}"
        );
        assert!(elsewhere.join("precious").is_file());
        // Nothing there is nothing to do.
        assert!(empty(&dir.path().join("none")).unwrap().is_empty());
    }

    #[test]
    fn remove_all_takes_files_links_and_trees_and_ignores_missing_paths() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        write(&target.join("f"), "f\n");
        write(&dir.path().join("tree/a/b/c"), "c\n");
        write(&dir.path().join("file"), "x\n");
        symlink(&target, dir.path().join("link")).unwrap();
        for name in ["tree", "file", "link", "missing"] {
            remove_all(&dir.path().join(name)).unwrap();
            assert!(!dir.path().join(name).exists(), "{name}");
        }
        assert!(target.join("f").is_file(), "the link's target stays");
        remove_all(&dir.path().join("no-parent/x")).unwrap();
        assert_eq!(
            remove_all(Path::new("/")).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    /// Mounts `source` on `target` (`tmpfs` for a fresh file system, else a bind mount).
    fn mount(source: &Path, target: &Path) {
        let mut command = Command::new("mount");
        if source == Path::new("tmpfs") {
            command.args(["-t", "tmpfs", "bake-test"]);
        } else {
            command.arg("--bind").arg(source);
        }
        let status = command.arg(target).status().unwrap();
        assert!(status.success(), "mount {} failed", source.display());
    }

    fn umount(target: &Path) {
        let status = Command::new("umount").arg(target).status().unwrap();
        assert!(status.success(), "umount {} failed", target.display());
    }

    #[test]
    fn mounts_in_the_trash_are_left_alone() {
        if !crate::build::testing::privileged() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // A bind mount of a directory of the same file system: only the mount id tells it.
        let host = dir.path().join("host");
        write(&host.join("precious"), "x\n");
        let trash = dir.path().join("trash");
        let bound = trash.join("root-1/srv");
        let tmpfs = trash.join("root-2/run");
        fs_err::create_dir_all(&bound).unwrap();
        fs_err::create_dir_all(&tmpfs).unwrap();
        write(&trash.join("root-1/etc/hostname"), "a\n");
        write(&trash.join("root-3/etc/hostname"), "b\n");
        mount(&host, &bound);
        mount(Path::new("tmpfs"), &tmpfs);
        write(&tmpfs.join("pid"), "1\n");

        let left = empty(&trash);
        let bound_kept = host.join("precious").is_file();
        let tmpfs_kept = tmpfs.join("pid").is_file();
        umount(&bound);
        umount(&tmpfs);

        let left = left.unwrap();
        assert!(
            bound_kept && tmpfs_kept,
            "a mounted file system was emptied"
        );
        let mut names: Vec<_> = left.iter().map(|(name, _)| name.clone()).collect();
        names.sort();
        assert_eq!(names, ["root-1", "root-2"]);
        assert!(
            left.iter()
                .all(|(_, e)| e.kind() == io::ErrorKind::CrossesDevices),
            "{left:?}"
        );
        assert!(!trash.join("root-3").exists());
        // Unmounted, what is left goes at the next try.
        assert!(empty(&trash).unwrap().is_empty());
        assert!(host.join("precious").is_file());
    }
}
