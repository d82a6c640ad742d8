//! Snapshots of a root directory and the difference between two of them: what a provisioning
//! step added, changed, deleted or replaced, which is what its layer must contain.
//!
//! A snapshot records, for every entry under the root, the metadata a change can touch: type,
//! mode, owner, size, mtime and ctime (nanoseconds), inode, link count, device number, symlink
//! target and xattrs. Content is not hashed: any write changes mtime or ctime, and `ctime`
//! cannot be set from user space, so restoring an mtime with `touch -d` still shows.
//!
//! Timestamps are only as fine as the kernel makes them: before Linux 6.13 (multigrain
//! timestamps) a same-size rewrite in place within one timer tick (a few ms) of the snapshot
//! can keep mtime and ctime; from 6.13 on, a change after a `stat` always gets a new ctime.
//!
//! What a snapshot leaves out ([`Excludes`], and mount points) is left out of the diff as well,
//! so it can never appear in a layer, not even as a whiteout.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Paths under the root that a snapshot (and so a layer) leaves out, relative to the root.
///
/// Two kinds, both matched on whole path components:
///
/// - a **subtree** exclude (`proc`, `etc/resolv.conf`): the entry and everything below it are
///   not recorded;
/// - a **contents** exclude (`tmp`): the directory itself is recorded (so the image keeps
///   `/tmp` with its mode 1777) but nothing inside it is.
///
/// A runner lists what it owns: mount points for `proc`, `sys` and `dev`, files it bind-mounts
/// such as `etc/resolv.conf`, `etc/hosts` and `etc/hostname`, and scratch directories. Mount
/// points on another file system are found and left out without being listed (see
/// [`Snapshot::mount_points`]), but a bind mount from the same file system cannot be told from
/// a file and must be listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Excludes {
    subtrees: BTreeSet<PathBuf>,
    contents: BTreeSet<PathBuf>,
}

impl Excludes {
    /// Nothing excluded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Leaves out `path` and everything below it. `path` is relative to the root (a leading `/`
    /// is allowed and ignored) and may not contain `..`.
    pub fn subtree(mut self, path: impl AsRef<Path>) -> Result<Self, SnapshotError> {
        self.subtrees.insert(relative(path.as_ref())?);
        Ok(self)
    }

    /// Keeps the directory `path` but leaves out everything inside it.
    pub fn contents(mut self, path: impl AsRef<Path>) -> Result<Self, SnapshotError> {
        self.contents.insert(relative(path.as_ref())?);
        Ok(self)
    }
}

/// A normalized relative path: no root, no `.`, and no `..`.
fn relative(path: &Path) -> Result<PathBuf, SnapshotError> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(SnapshotError::Exclude {
                    path: path.to_path_buf(),
                });
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(SnapshotError::Exclude {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// The type of a file-system entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    /// Recorded so that changes are complete, but a tar cannot hold one: layers skip them.
    Socket,
}

impl EntryKind {
    fn of(file_type: std::fs::FileType) -> Self {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_dir() {
            Self::Dir
        } else if file_type.is_symlink() {
            Self::Symlink
        } else if file_type.is_char_device() {
            Self::CharDevice
        } else if file_type.is_block_device() {
            Self::BlockDevice
        } else if file_type.is_fifo() {
            Self::Fifo
        } else if file_type.is_socket() {
            Self::Socket
        } else {
            Self::File
        }
    }
}

/// What a snapshot knows about one entry. Nothing is followed: a symlink is described, not its
/// target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryMeta {
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of a regular file (a directory's size is file-system noise and not compared).
    pub size: u64,
    /// Nanoseconds since the epoch.
    pub mtime_ns: i128,
    pub ctime_ns: i128,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// Device number of a character or block device.
    pub rdev: u64,
    /// The target of a symlink, as stored.
    pub link_target: Option<PathBuf>,
    /// Extended attributes, by name.
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
}

impl EntryMeta {
    /// Whether anything a step could have done to the entry differs. Access times and the
    /// device id are not compared; the inode is, because replacing a file by renaming another
    /// over it (as `sed -i` and dpkg do) may keep everything else.
    fn changed_from(&self, before: &Self) -> bool {
        let size = |meta: &Self| {
            if meta.kind == EntryKind::Dir {
                0
            } else {
                meta.size
            }
        };
        self.kind != before.kind
            || self.mode != before.mode
            || self.uid != before.uid
            || self.gid != before.gid
            || size(self) != size(before)
            || self.mtime_ns != before.mtime_ns
            || self.ctime_ns != before.ctime_ns
            || self.ino != before.ino
            || self.nlink != before.nlink
            || self.rdev != before.rdev
            || self.link_target != before.link_target
            || self.xattrs != before.xattrs
    }
}

/// The recorded state of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Every recorded entry by path relative to the root, in component order (a parent before
    /// its children, and a directory's subtree contiguous). The root itself is not an entry.
    pub entries: BTreeMap<PathBuf, EntryMeta>,
    /// Entries on another file system than the root (mount points), left out with everything
    /// below them.
    pub mount_points: BTreeSet<PathBuf>,
    /// The excludes the snapshot was taken with.
    pub excludes: Excludes,
}

impl Snapshot {
    /// Whether `path` was left out of this snapshot: excluded, a mount point, or below either.
    pub fn leaves_out(&self, path: &Path) -> bool {
        let mut ancestor = Some(path);
        let mut first = true;
        while let Some(current) = ancestor {
            if current.as_os_str().is_empty() {
                break;
            }
            if self.excludes.subtrees.contains(current)
                || self.mount_points.contains(current)
                || (!first && self.excludes.contents.contains(current))
            {
                return true;
            }
            first = false;
            ancestor = current.parent();
        }
        false
    }
}

/// A failure to take a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("failed to read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "exclude `{}` is not a path inside the root (it is empty or has `..`)",
        path.display()
    )]
    Exclude { path: PathBuf },
}

/// Records every entry under `root` except what `excludes` leaves out, without following
/// symlinks or entering other file systems.
pub fn snapshot(root: &Path, excludes: &Excludes) -> Result<Snapshot, SnapshotError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SnapshotError::Read { path, source }
    };
    let root_dev = fs_err::symlink_metadata(root)
        .map_err(read_error(root))?
        .dev();
    let mut snapshot = Snapshot {
        entries: BTreeMap::new(),
        mount_points: BTreeSet::new(),
        excludes: excludes.clone(),
    };
    let mut walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .min_depth(1)
        .into_iter();
    while let Some(entry) = walker.next() {
        let entry = entry.map_err(|error| {
            let path = error.path().unwrap_or(root).to_path_buf();
            let source = error
                .into_io_error()
                .unwrap_or_else(|| io::Error::other("file system loop"));
            SnapshotError::Read { path, source }
        })?;
        let full = entry.path();
        let relative = full
            .strip_prefix(root)
            .expect("walkdir yields paths under its root")
            .to_path_buf();
        let is_dir = entry.file_type().is_dir();
        if excludes.subtrees.contains(&relative) {
            if is_dir {
                walker.skip_current_dir();
            }
            continue;
        }
        let metadata = fs_err::symlink_metadata(full).map_err(read_error(full))?;
        if metadata.dev() != root_dev {
            snapshot.mount_points.insert(relative);
            if is_dir {
                walker.skip_current_dir();
            }
            continue;
        }
        if is_dir && excludes.contents.contains(&relative) {
            walker.skip_current_dir();
        }
        let meta = entry_meta(full, &metadata).map_err(read_error(full))?;
        snapshot.entries.insert(relative, meta);
    }
    Ok(snapshot)
}

/// The metadata of the entry at `path`, given its `lstat`.
pub(crate) fn entry_meta(path: &Path, metadata: &std::fs::Metadata) -> io::Result<EntryMeta> {
    let kind = EntryKind::of(metadata.file_type());
    let link_target = match kind {
        EntryKind::Symlink => Some(std::fs::read_link(path)?),
        _ => None,
    };
    Ok(EntryMeta {
        kind,
        mode: metadata.mode() & 0o7777,
        uid: metadata.uid(),
        gid: metadata.gid(),
        size: metadata.size(),
        mtime_ns: nanos(metadata.mtime(), metadata.mtime_nsec()),
        ctime_ns: nanos(metadata.ctime(), metadata.ctime_nsec()),
        dev: metadata.dev(),
        ino: metadata.ino(),
        nlink: metadata.nlink(),
        rdev: match kind {
            EntryKind::CharDevice | EntryKind::BlockDevice => metadata.rdev(),
            _ => 0,
        },
        link_target,
        xattrs: read_xattrs(path)?,
    })
}

fn nanos(seconds: i64, nanoseconds: i64) -> i128 {
    i128::from(seconds) * 1_000_000_000 + i128::from(nanoseconds)
}

/// The extended attributes of `path` itself (not of a symlink's target).
pub(crate) fn read_xattrs(path: &Path) -> io::Result<BTreeMap<OsString, Vec<u8>>> {
    let mut xattrs = BTreeMap::new();
    let names = match xattr::list(path) {
        Ok(names) => names,
        // A file system without xattrs has none to record.
        Err(error) if error.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {
            return Ok(xattrs);
        }
        Err(error) => return Err(error),
    };
    for name in names {
        // An attribute removed between listing and reading is simply gone.
        if let Some(value) = xattr::get(path, &name)? {
            xattrs.insert(name, value);
        }
    }
    Ok(xattrs)
}

/// What changed between two snapshots of the same root: the content of a layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Entries added or modified, written whole into the layer. Includes every entry below a
    /// replaced directory.
    pub changed: BTreeSet<PathBuf>,
    /// Entries that are gone, each to become a `.wh.<name>` whiteout. Only the top of a deleted
    /// subtree is listed, and nothing whose parent is gone, replaced or no longer a directory
    /// (deleting or replacing the parent already hides it).
    pub deleted: BTreeSet<PathBuf>,
    /// Directories deleted and created again (a different inode): their lower content is
    /// hidden with an opaque marker, and what they hold now is in `changed`.
    pub replaced_dirs: BTreeSet<PathBuf>,
}

impl Changes {
    /// Every entry of a snapshot as changed: the content of a base or squashed layer.
    pub fn whole_tree(snapshot: &Snapshot) -> Self {
        Self {
            changed: snapshot.entries.keys().cloned().collect(),
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.deleted.is_empty() && self.replaced_dirs.is_empty()
    }
}

/// What changed from `before` to `after`. Paths that either snapshot left out are ignored, so
/// snapshots taken with different excludes never produce whiteouts for excluded paths.
pub fn diff(before: &Snapshot, after: &Snapshot) -> Changes {
    let ignored = |path: &Path| before.leaves_out(path) || after.leaves_out(path);
    let mut changes = Changes::default();
    // Component order visits a directory before its subtree, so a replaced ancestor is known
    // by the time its descendants come.
    for (path, now) in &after.entries {
        if ignored(path) {
            continue;
        }
        match before.entries.get(path) {
            None => {
                changes.changed.insert(path.clone());
            }
            Some(was) => {
                let replaced =
                    was.kind == EntryKind::Dir && now.kind == EntryKind::Dir && was.ino != now.ino;
                if replaced {
                    changes.replaced_dirs.insert(path.clone());
                }
                if replaced || now.changed_from(was) || under_any(path, &changes.replaced_dirs) {
                    changes.changed.insert(path.clone());
                }
            }
        }
    }
    for path in before.entries.keys() {
        if after.entries.contains_key(path) || ignored(path) {
            continue;
        }
        let parent = path.parent().unwrap_or(Path::new(""));
        let parent_unchanged_dir = parent.as_os_str().is_empty()
            || match (before.entries.get(parent), after.entries.get(parent)) {
                (Some(was), Some(now)) => {
                    was.kind == EntryKind::Dir && now.kind == EntryKind::Dir && was.ino == now.ino
                }
                _ => false,
            };
        if parent_unchanged_dir {
            changes.deleted.insert(path.to_path_buf());
        }
    }
    changes
}

/// Whether a proper ancestor of `path` is in `dirs`.
fn under_any(path: &Path, dirs: &BTreeSet<PathBuf>) -> bool {
    !dirs.is_empty() && path.ancestors().skip(1).any(|a| dirs.contains(a))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn write(root: &Path, path: &str, content: &str) {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, content).unwrap();
    }

    fn paths(set: &BTreeSet<PathBuf>) -> Vec<&str> {
        set.iter().map(|p| p.to_str().unwrap()).collect()
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "etc/passwd", "root:x:0:0\n");
        write(root, "etc/motd", "hi\n");
        write(root, "usr/share/doc/a/README", "a\n");
        write(root, "usr/share/doc/a/sub/x", "x\n");
        write(root, "var/lib/state/y", "y\n");
        write(root, "tmp/scratch", "s\n");
        write(root, "proc/1/status", "fake\n");
        symlink("../usr/share", root.join("etc/share")).unwrap();
        dir
    }

    fn excludes() -> Excludes {
        Excludes::new()
            .subtree("/proc")
            .unwrap()
            .contents("tmp")
            .unwrap()
    }

    #[test]
    fn snapshot_records_entries_in_component_order_and_honours_excludes() {
        let dir = tree();
        let snap = snapshot(dir.path(), &excludes()).unwrap();
        let listed: Vec<_> = snap.entries.keys().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            listed,
            [
                "etc",
                "etc/motd",
                "etc/passwd",
                "etc/share",
                "tmp",
                "usr",
                "usr/share",
                "usr/share/doc",
                "usr/share/doc/a",
                "usr/share/doc/a/README",
                "usr/share/doc/a/sub",
                "usr/share/doc/a/sub/x",
                "var",
                "var/lib",
                "var/lib/state",
                "var/lib/state/y",
            ]
        );
        let share = &snap.entries[Path::new("etc/share")];
        assert_eq!(share.kind, EntryKind::Symlink);
        assert_eq!(
            share.link_target.as_deref(),
            Some(Path::new("../usr/share"))
        );
        assert!(snap.leaves_out(Path::new("proc/1")));
        assert!(snap.leaves_out(Path::new("tmp/scratch")));
        assert!(!snap.leaves_out(Path::new("tmp")));
    }

    #[test]
    fn excludes_reject_parent_components_and_the_root() {
        assert!(Excludes::new().subtree("../etc").is_err());
        assert!(Excludes::new().contents("/").is_err());
    }

    #[test]
    fn diff_finds_added_modified_deleted_and_replaced_entries() {
        let dir = tree();
        let root = dir.path();
        let before = snapshot(root, &excludes()).unwrap();

        write(root, "etc/new", "new\n");
        // Same size, so only times and ctime tell.
        write(root, "etc/motd", "ho\n");
        std::fs::set_permissions(
            root.join("etc/passwd"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::remove_dir_all(root.join("usr/share/doc/a")).unwrap();
        // Recreate `state` while the old one still exists, so that its inode cannot be reused.
        std::fs::rename(root.join("var/lib/state"), root.join("var/state.old")).unwrap();
        write(root, "var/lib/state/z", "z\n");
        std::fs::remove_dir_all(root.join("var/state.old")).unwrap();
        write(root, "tmp/other", "ignored\n");
        write(root, "proc/2/status", "ignored\n");

        let after = snapshot(root, &excludes()).unwrap();
        let changes = diff(&before, &after);
        assert_eq!(
            paths(&changes.changed),
            [
                "etc",
                "etc/motd",
                "etc/new",
                "etc/passwd",
                "tmp",
                "usr/share/doc",
                "var",
                "var/lib",
                "var/lib/state",
                "var/lib/state/z"
            ]
        );
        // The deleted subtree collapses to its top; `y` is hidden by the opaque `state`.
        assert_eq!(paths(&changes.deleted), ["usr/share/doc/a"]);
        assert_eq!(paths(&changes.replaced_dirs), ["var/lib/state"]);
    }

    #[test]
    fn a_directory_that_became_a_symlink_hides_its_old_children_without_whiteouts() {
        let dir = tree();
        let root = dir.path();
        let before = snapshot(root, &Excludes::new()).unwrap();
        std::fs::remove_dir_all(root.join("var/lib")).unwrap();
        symlink("/usr/lib", root.join("var/lib")).unwrap();
        let after = snapshot(root, &Excludes::new()).unwrap();
        let changes = diff(&before, &after);
        assert_eq!(paths(&changes.changed), ["var", "var/lib"]);
        assert!(changes.deleted.is_empty(), "{:?}", changes.deleted);
        assert!(changes.replaced_dirs.is_empty());
    }

    #[test]
    fn what_either_snapshot_excludes_is_neither_changed_nor_deleted() {
        let dir = tree();
        let root = dir.path();
        let before = snapshot(root, &Excludes::new()).unwrap();
        write(root, "tmp/new", "n\n");
        let after = snapshot(root, &excludes()).unwrap();
        let changes = diff(&before, &after);
        // `proc` and `tmp/scratch` were recorded before and are excluded after: no whiteouts.
        assert!(changes.deleted.is_empty(), "{:?}", changes.deleted);
        assert_eq!(paths(&changes.changed), ["tmp"]);
    }

    #[test]
    fn identical_snapshots_have_no_changes_and_whole_tree_lists_everything() {
        let dir = tree();
        let snap = snapshot(dir.path(), &excludes()).unwrap();
        let again = snapshot(dir.path(), &excludes()).unwrap();
        assert!(diff(&snap, &again).is_empty());
        let whole = Changes::whole_tree(&snap);
        assert_eq!(whole.changed.len(), snap.entries.len());
    }

    #[test]
    fn xattrs_and_ctime_only_changes_are_seen() {
        let dir = tree();
        let root = dir.path();
        let before = snapshot(root, &Excludes::new()).unwrap();
        xattr::set(root.join("etc/passwd"), "user.bake", b"1").unwrap();
        let after = snapshot(root, &Excludes::new()).unwrap();
        assert_eq!(
            after.entries[Path::new("etc/passwd")].xattrs[&OsString::from("user.bake")],
            b"1"
        );
        assert_eq!(paths(&diff(&before, &after).changed), ["etc/passwd"]);
    }

    #[test]
    fn a_mount_point_is_left_out_and_what_it_covers_is_not_deleted() {
        if !crate::build::testing::privileged() {
            return;
        }
        let dir = tree();
        let root = dir.path();
        write(root, "run/lock/pid", "1\n");
        let before = snapshot(root, &Excludes::new()).unwrap();
        let mounted = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "bake-test",
                root.join("run").to_str().unwrap(),
            ])
            .status();
        assert!(mounted.unwrap().success(), "mount -t tmpfs failed");
        write(root, "run/other", "x\n");
        let after = snapshot(root, &Excludes::new());
        let unmounted = std::process::Command::new("umount")
            .arg(root.join("run"))
            .status();
        let after = after.unwrap();
        assert!(unmounted.unwrap().success());
        assert_eq!(paths(&after.mount_points), ["run"]);
        assert!(!after.entries.contains_key(Path::new("run")));
        assert!(diff(&before, &after).is_empty());
    }
}
