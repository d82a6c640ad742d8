//! Paths inside a root filesystem, resolved from the host the way the image would see them
//! (Go's `filepath-securejoin`): symlinks in the root are followed, but an absolute target
//! starts again at the root and `..` never climbs above it. Plus the two things built on that:
//! creating directories in the root, and reading a small file from it.
//!
//! Resolution walks the existing prefix one component at a time with `lstat`, so it is only
//! as good as the tree is still: bake resolves while nothing runs in the root (before a step,
//! or while copying files), and the final component of every write is opened with
//! `O_NOFOLLOW` besides.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use fs_err::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// How many symlinks one resolution follows before it gives up with `ELOOP`: securejoin's
/// limit. Linux stops at 40, but an image path is resolved here once, not on every open.
const MAX_SYMLINK_FOLLOWS: usize = 255;

/// The host path that `path` (a path in the image, absolute or not) names inside `root`.
///
/// Symlinks are followed as the image sees them: `etc -> /outside` resolves to
/// `root/outside`, and `..` stops at the root. Components that do not exist are joined as
/// written (after them, `..` just drops the previous one). The result always starts with
/// `root` and contains no `..`.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<OsString> = components(path).collect();
    let mut follows = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let host = root.join(&candidate);
        match fs_err::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                follows += 1;
                if follows > MAX_SYMLINK_FOLLOWS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs_err::read_link(&host)?;
                if target.has_root() {
                    resolved.clear();
                }
                for part in components(&target).collect::<Vec<_>>().into_iter().rev() {
                    pending.push_front(part);
                }
            }
            Ok(_) => resolved = candidate,
            Err(error)
                if error.kind() == io::ErrorKind::NotFound
                    || error.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                resolved = candidate;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(root.join(resolved))
}

/// The components of a path as names and `..`; the root and `.` drop out.
fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name.to_owned()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

/// Whether `path` is the host's own root directory, under any name: same device and inode as
/// `/`, which also catches a bind mount of `/` elsewhere. Provisioning it would change the host.
pub(crate) fn is_host_root(path: &Path) -> io::Result<bool> {
    let candidate = fs_err::metadata(path)?;
    let host = fs_err::metadata("/")?;
    Ok(candidate.dev() == host.dev() && candidate.ino() == host.ino())
}

/// Mode and owner for a directory bake creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirAttrs {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `path` in `root` and creates the directories that are missing: the last one with
/// `leaf`, the ones above it with `parents`. Returns the directory's host path and the ones it
/// created, outermost first.
pub(crate) fn ensure_dir(
    root: &Path,
    path: &Path,
    leaf: DirAttrs,
    parents: DirAttrs,
) -> io::Result<(PathBuf, Vec<PathBuf>)> {
    let resolved = resolve_in_root(root, path)?;
    let relative = resolved
        .strip_prefix(root)
        .expect("resolve_in_root stays in the root")
        .to_owned();
    let mut created = Vec::new();
    let mut current = root.to_owned();
    let count = relative.components().count();
    for (index, part) in relative.components().enumerate() {
        current.push(part);
        match fs_err::symlink_metadata(&current) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("`{}` exists and is not a directory", current.display()),
                ));
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                let attrs = if index + 1 == count { leaf } else { parents };
                // `mkdir` fails if anything appeared here since resolution, symlinks included.
                fs_err::create_dir(&current)?;
                set_owner(&current, attrs.uid, attrs.gid)?;
                // After chown, which clears set-id bits, and explicitly, past the umask.
                fs_err::set_permissions(&current, std::fs::Permissions::from_mode(attrs.mode))?;
                created.push(current.clone());
            }
            Err(error) => return Err(error),
        }
    }
    Ok((current, created))
}

/// Changes a path's owner (not following a final symlink), skipping the call when it already
/// has that owner so that tests need no root when they ask for their own ids.
pub(crate) fn set_owner(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let meta = fs_err::symlink_metadata(path)?;
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    fs_err::os::unix::fs::lchown(path, Some(uid), Some(gid))
}

/// Reads a small regular file from the image (`/etc/passwd`, say), refusing anything larger
/// than `limit` bytes or not a regular file. `None` when it does not exist.
pub(crate) fn read_image_file(
    root: &Path,
    path: &Path,
    limit: u64,
) -> io::Result<Option<(PathBuf, String)>> {
    let host = resolve_in_root(root, path)?;
    let file = match fs_err::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&host)
    {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("`{}` is not a regular file", host.display()),
        ));
    }
    if meta.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "`{}` is {} bytes, more than the {limit} bake reads",
                host.display(),
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(Some((host, String::from_utf8_lossy(&bytes).into_owned())))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use proptest::prelude::*;

    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs_err::create_dir_all(root.join("usr/lib")).unwrap();
        fs_err::create_dir_all(root.join("etc")).unwrap();
        fs_err::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("/outside", root.join("abs")).unwrap();
        symlink("../../../../..", root.join("up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        symlink("/etc/passwd", root.join("usr/passwd-link")).unwrap();
        dir
    }

    #[test]
    fn relative_symlinks_are_followed_inside_the_root() {
        let dir = tree();
        let root = dir.path();
        assert_eq!(
            resolve_in_root(root, Path::new("/lib/x.so")).unwrap(),
            root.join("usr/lib/x.so")
        );
    }

    #[test]
    fn absolute_symlinks_restart_at_the_root() {
        let dir = tree();
        let root = dir.path();
        assert_eq!(
            resolve_in_root(root, Path::new("/abs/f")).unwrap(),
            root.join("outside/f")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("usr/passwd-link")).unwrap(),
            root.join("etc/passwd")
        );
    }

    #[test]
    fn dotdot_stops_at_the_root() {
        let dir = tree();
        let root = dir.path();
        assert_eq!(
            resolve_in_root(root, Path::new("/../../../tmp/canary")).unwrap(),
            root.join("tmp/canary")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/up/etc")).unwrap(),
            root.join("etc")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/etc/missing/../../x")).unwrap(),
            root.join("x")
        );
    }

    #[test]
    fn the_host_root_is_recognised_under_any_name() {
        assert!(is_host_root(Path::new("/")).unwrap());
        assert!(is_host_root(Path::new("/usr/..")).unwrap());
        assert!(!is_host_root(tree().path()).unwrap());
    }

    #[test]
    fn symlink_loops_fail() {
        let dir = tree();
        let error = resolve_in_root(dir.path(), Path::new("/loop/x")).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn ensure_dir_creates_missing_directories_with_their_modes() {
        let dir = tree();
        let root = dir.path();
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        let leaf = DirAttrs {
            mode: 0o1777,
            uid: me.0,
            gid: me.1,
        };
        let parents = DirAttrs {
            mode: 0o755,
            ..leaf
        };
        let (path, created) = ensure_dir(root, Path::new("/abs/a/b"), leaf, parents).unwrap();
        assert_eq!(path, root.join("outside/a/b"));
        assert_eq!(
            created,
            [
                root.join("outside"),
                root.join("outside/a"),
                root.join("outside/a/b")
            ]
        );
        let mode = |p: &Path| fs_err::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&root.join("outside/a")), 0o755);
        assert_eq!(mode(&root.join("outside/a/b")), 0o1777);
        let (_, again) = ensure_dir(root, Path::new("/abs/a/b"), leaf, parents).unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn ensure_dir_refuses_a_file_in_the_way() {
        let dir = tree();
        let me = DirAttrs {
            mode: 0o755,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        let error = ensure_dir(dir.path(), Path::new("/etc/passwd/x"), me, me).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotADirectory);
    }

    #[test]
    fn read_image_file_reads_through_image_symlinks_and_refuses_big_files() {
        let dir = tree();
        let root = dir.path();
        let (host, text) = read_image_file(root, Path::new("/usr/passwd-link"), 1024)
            .unwrap()
            .unwrap();
        assert_eq!(host, root.join("etc/passwd"));
        assert!(text.starts_with("root:"));
        assert!(read_image_file(root, Path::new("/etc/passwd"), 4).is_err());
        assert!(
            read_image_file(root, Path::new("/etc/group"), 1024)
                .unwrap()
                .is_none()
        );
        assert!(read_image_file(root, Path::new("/etc"), 1024).is_err());
    }

    proptest! {
        #[test]
        fn resolution_never_leaves_the_root(parts in proptest::collection::vec(
            prop_oneof![
                Just(".."), Just("."), Just("lib"), Just("abs"), Just("up"), Just("usr"),
                Just("etc"), Just("passwd-link"), Just("x"),
            ],
            0..12,
        ), absolute in any::<bool>()) {
            let dir = tree();
            let root = dir.path();
            let mut path = if absolute { PathBuf::from("/") } else { PathBuf::new() };
            for part in parts {
                path.push(part);
            }
            if let Ok(resolved) = resolve_in_root(root, &path) {
                prop_assert!(resolved.starts_with(root));
                prop_assert!(!resolved.components().any(|c| c == Component::ParentDir));
            }
        }
    }
}
