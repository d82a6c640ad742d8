//! Snapshots of a root directory and the difference between two of them: what a provisioning
//! step added, changed, deleted or replaced, which is what its layer must contain.
//!
//! A snapshot records, for every entry under the root, its metadata: type, mode, owner, size,
//! mtime and ctime (nanoseconds), inode, link count, device number, symlink target and xattrs;
//! and, once asked ([`Snapshot::hash_files`]), the SHA-256 of each regular file's content.
//!
//! [`diff`] calls an entry changed only when what its layer entry would record changed: type,
//! mode, owner, size, mtime as the layer writes it (whole seconds, clamped to
//! `SOURCE_DATE_EPOCH`), link count, device number, symlink target, the xattrs a layer keeps,
//! and content. Both runners decide this way, so they write the same layers: the Docker runner
//! sees the tree through a tar (no inodes, no ctime), and a file that apt or dpkg rewrote with
//! the same bytes and metadata is no change to either. The inode, ctime and exact mtime only
//! say when content must be compared: a file whose inode, ctime, mtime and size are all as
//! before is taken as untouched without reading it, so only files a step wrote to are hashed
//! after it.
//!
//! Timestamps are only as fine as the kernel makes them: before Linux 6.13 (multigrain
//! timestamps) a same-size rewrite in place within one timer tick (a few ms) of the snapshot
//! can keep mtime and ctime; from 6.13 on, a change after a `stat` always gets a new ctime.
//!
//! What a snapshot leaves out ([`Excludes`], and mount points) is left out of the diff as well,
//! so it can never appear in a layer, not even as a whiteout.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use super::layer::{LayerOptions, records_xattr};

/// Read size when hashing a file's content.
const HASH_BUFFER_BYTES: usize = 256 * 1024;

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
    /// SHA-256 of a regular file's content, when known: always in a tree read from a tar
    /// ([`super::tree::TarTree::snapshot`]); on the host, after [`Snapshot::hash_files`], or
    /// when [`diff`] needed it.
    pub digest: Option<[u8; 32]>,
}

/// How an entry compares with what it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Same,
    Changed,
    /// Everything a layer records is as before except perhaps the content, and the entry was
    /// written to: the content decides.
    ContentDecides,
}

impl EntryMeta {
    /// Compares the entry with `before` on what a layer records of it (see the module docs).
    fn compare(&self, before: &Self, options: &LayerOptions) -> Verdict {
        let is_dir = self.kind == EntryKind::Dir;
        // A directory's size and link count are file-system bookkeeping, not in a layer.
        let size = |meta: &Self| if is_dir { 0 } else { meta.size };
        let nlink = |meta: &Self| if is_dir { 0 } else { meta.nlink };
        fn xattrs(meta: &EntryMeta) -> impl Iterator<Item = (&OsString, &Vec<u8>)> {
            meta.xattrs.iter().filter(|(name, _)| records_xattr(name))
        }
        let recorded_differs = self.kind != before.kind
            || self.mode != before.mode
            || self.uid != before.uid
            || self.gid != before.gid
            || size(self) != size(before)
            || options.recorded_mtime(self.mtime_ns) != options.recorded_mtime(before.mtime_ns)
            || nlink(self) != nlink(before)
            || self.rdev != before.rdev
            || self.link_target != before.link_target
            || !xattrs(self).eq(xattrs(before));
        if recorded_differs {
            return Verdict::Changed;
        }
        if self.kind != EntryKind::File || self.size == 0 {
            return Verdict::Same;
        }
        match (self.digest, before.digest) {
            (Some(now), Some(was)) if now == was => Verdict::Same,
            (Some(_), Some(_)) => Verdict::Changed,
            _ if self.untouched_since(before) => Verdict::Same,
            _ => Verdict::ContentDecides,
        }
    }

    /// Whether the entry is the same inode with the same size, mtime and ctime: nothing wrote
    /// to it (a write sets ctime, which user space cannot set back).
    fn untouched_since(&self, before: &Self) -> bool {
        self.ino == before.ino
            && self.size == before.size
            && self.mtime_ns == before.mtime_ns
            && self.ctime_ns == before.ctime_ns
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
    /// The directory the snapshot was taken of, where file content is read to hash it; `None`
    /// for a tree read from a tar, whose files all have their digest.
    pub root: Option<PathBuf>,
}

impl Snapshot {
    /// Whether `path` was left out of this snapshot: excluded, a mount point, or below either.
    pub fn leaves_out(&self, path: &Path) -> bool {
        leaves_out(&self.excludes, &self.mount_points, path)
    }

    /// Hashes the content of every non-empty regular file whose digest is not known yet, so
    /// that [`diff`] can tell a rewrite with the same bytes from a change once this tree is
    /// gone. Returns the bytes read. A snapshot of a tar tree has nothing to hash.
    pub fn hash_files(&mut self) -> Result<u64, SnapshotError> {
        let Some(root) = &self.root else {
            return Ok(0);
        };
        let mut hashed = 0;
        for (path, meta) in &mut self.entries {
            if meta.kind == EntryKind::File && meta.size > 0 && meta.digest.is_none() {
                meta.digest = Some(hash_file(&root.join(path))?);
                hashed += meta.size;
            }
        }
        Ok(hashed)
    }
}

/// SHA-256 of the content of the regular file at `path` (not following a symlink there).
fn hash_file(path: &Path) -> Result<[u8; 32], SnapshotError> {
    use sha2::Digest as _;
    let read_error = |source| SnapshotError::Read {
        path: path.to_path_buf(),
        source,
    };
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| read_error(e.into()))?;
    let mut file = std::fs::File::from(fd);
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; HASH_BUFFER_BYTES];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(read_error(error)),
        };
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().into())
}

/// Whether `path` is left out by `excludes` or below one of `mount_points`.
fn leaves_out(excludes: &Excludes, mount_points: &BTreeSet<PathBuf>, path: &Path) -> bool {
    let mut ancestor = Some(path);
    let mut first = true;
    while let Some(current) = ancestor {
        if current.as_os_str().is_empty() {
            break;
        }
        if excludes.subtrees.contains(current)
            || mount_points.contains(current)
            || (!first && excludes.contents.contains(current))
        {
            return true;
        }
        first = false;
        ancestor = current.parent();
    }
    false
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
        root: Some(root.to_path_buf()),
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
        digest: None,
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
    /// Entries added or modified, written whole into the layer.
    pub changed: BTreeSet<PathBuf>,
    /// Entries that are gone, each to become a `.wh.<name>` whiteout. Only the top of a deleted
    /// subtree is listed, and nothing whose parent is gone or no longer a directory (deleting
    /// or replacing the parent already hides it).
    pub deleted: BTreeSet<PathBuf>,
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
        self.changed.is_empty() && self.deleted.is_empty()
    }
}

/// What changed from `before` to `after`, judged on what a layer records (see the module
/// docs). Paths that either snapshot left out are ignored, so snapshots taken with different
/// excludes never produce whiteouts for excluded paths.
///
/// A directory is compared by path, never by inode (a layer cannot say which directory it is):
/// one deleted and made again is the same directory, whose lost children get whiteouts.
///
/// Content is compared only for a non-empty regular file whose recorded metadata is as before
/// but which was written to (see [`EntryMeta::untouched_since`]): from the digests when both are
/// known, else by hashing the file under `after`'s root against `before`'s digest (a file
/// whose old digest is unknown counts as changed). `after` keeps the digests computed, and
/// takes `before`'s for every file untouched since, so that it serves as the next step's
/// `before` with only what this step wrote left to hash.
pub fn diff(
    before: &Snapshot,
    after: &mut Snapshot,
    options: &LayerOptions,
) -> Result<Changes, SnapshotError> {
    let Snapshot {
        entries,
        mount_points,
        excludes,
        root,
    } = after;
    let ignored = |path: &Path| before.leaves_out(path) || leaves_out(excludes, mount_points, path);
    let mut changes = Changes::default();
    for (path, now) in entries.iter_mut() {
        if ignored(path) {
            continue;
        }
        let Some(was) = before.entries.get(path) else {
            changes.changed.insert(path.clone());
            continue;
        };
        let changed = match now.compare(was, options) {
            Verdict::Same => false,
            Verdict::Changed => true,
            Verdict::ContentDecides => match (root.as_deref(), was.digest, now.digest) {
                (_, Some(old), Some(new)) => old != new,
                (Some(root), Some(old), None) => {
                    let new = hash_file(&root.join(path))?;
                    now.digest = Some(new);
                    old != new
                }
                _ => true,
            },
        };
        if now.digest.is_none() && now.untouched_since(was) {
            now.digest = was.digest;
        }
        if changed {
            changes.changed.insert(path.clone());
        }
    }
    for path in before.entries.keys() {
        if entries.contains_key(path) || ignored(path) {
            continue;
        }
        let parent = path.parent().unwrap_or(Path::new(""));
        let is_dir = |snapshot: &BTreeMap<PathBuf, EntryMeta>| {
            snapshot
                .get(parent)
                .is_some_and(|meta| meta.kind == EntryKind::Dir)
        };
        if parent.as_os_str().is_empty() || (is_dir(&before.entries) && is_dir(entries)) {
            changes.deleted.insert(path.to_path_buf());
        }
    }
    Ok(changes)
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

    /// 2001-09-09: earlier than any file a test creates, so every new mtime is recorded as it.
    const EPOCH: LayerOptions = LayerOptions {
        source_date_epoch: Some(1_000_000_000),
    };

    /// A snapshot whose files are hashed, as a step's `before` is.
    fn hashed(root: &Path, excludes: &Excludes) -> Snapshot {
        let mut snap = snapshot(root, excludes).unwrap();
        snap.hash_files().unwrap();
        snap
    }

    fn changes(before: &Snapshot, root: &Path, excludes: &Excludes) -> Changes {
        let mut after = snapshot(root, excludes).unwrap();
        diff(before, &mut after, &EPOCH).unwrap()
    }

    #[test]
    fn diff_finds_added_modified_and_deleted_entries() {
        let dir = tree();
        let root = dir.path();
        let before = hashed(root, &excludes());

        write(root, "etc/new", "new\n");
        // Same size, and the mtime a layer records is the same: only the content tells.
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

        let changes = changes(&before, root, &excludes());
        // Directories whose only change is an mtime the layer clamps are no change (the layer
        // writes the parents of what changed anyway).
        assert_eq!(
            paths(&changes.changed),
            ["etc/motd", "etc/new", "etc/passwd", "var/lib/state/z"]
        );
        // The deleted subtree collapses to its top; the directory made again is the same
        // directory by path, and what it lost gets a whiteout.
        assert_eq!(
            paths(&changes.deleted),
            ["usr/share/doc/a", "var/lib/state/y"]
        );
    }

    #[test]
    fn rewrites_with_the_same_bytes_and_metadata_are_no_change() {
        let dir = tree();
        let root = dir.path();
        let before = hashed(root, &Excludes::new());
        // As dpkg does: a new inode with the same content, renamed over the old one, and the
        // same mtime.
        let passwd = root.join("etc/passwd");
        let mtime = std::fs::metadata(&passwd).unwrap().modified().unwrap();
        write(root, "etc/passwd.dpkg-new", "root:x:0:0\n");
        std::fs::File::options()
            .write(true)
            .open(root.join("etc/passwd.dpkg-new"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        std::fs::rename(root.join("etc/passwd.dpkg-new"), &passwd).unwrap();
        // A mode changed and changed back: only the ctime moved.
        let motd = root.join("etc/motd");
        std::fs::set_permissions(&motd, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&motd, std::fs::Permissions::from_mode(0o644)).unwrap();
        // The same length written in place, with the old mtime put back: the content tells.
        let readme = root.join("usr/share/doc/a/README");
        let mtime = std::fs::metadata(&readme).unwrap().modified().unwrap();
        std::fs::write(&readme, "b\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&readme)
            .unwrap()
            .set_modified(mtime)
            .unwrap();

        let mut after = snapshot(root, &Excludes::new()).unwrap();
        assert_ne!(
            after.entries[Path::new("etc/passwd")].ino,
            before.entries[Path::new("etc/passwd")].ino
        );
        let changes = diff(&before, &mut after, &EPOCH).unwrap();
        assert_eq!(paths(&changes.changed), ["usr/share/doc/a/README"]);
        assert!(changes.deleted.is_empty(), "{:?}", changes.deleted);
        // Only what was written to was hashed; the rest took the earlier digests.
        for (path, meta) in &after.entries {
            if meta.kind == EntryKind::File {
                assert!(meta.digest.is_some(), "{} has no digest", path.display());
            }
        }
    }

    #[test]
    fn only_files_written_to_are_hashed_after_a_step() {
        let dir = tree();
        let root = dir.path();
        let before = hashed(root, &Excludes::new());
        write(root, "etc/new", "new\n");
        write(root, "etc/motd", "longer than before\n");
        let mut after = snapshot(root, &Excludes::new()).unwrap();
        let changes = diff(&before, &mut after, &EPOCH).unwrap();
        assert_eq!(paths(&changes.changed), ["etc/motd", "etc/new"]);
        // A new file and one whose size changed need no content to be judged.
        assert_eq!(after.entries[Path::new("etc/new")].digest, None);
        assert_eq!(after.entries[Path::new("etc/motd")].digest, None);
        assert_eq!(
            after.entries[Path::new("etc/passwd")].digest,
            before.entries[Path::new("etc/passwd")].digest
        );
        // The next step's `before` hashes only those two.
        assert_eq!(after.hash_files().unwrap(), 4 + 19);
    }

    #[test]
    fn without_the_old_digest_a_file_written_to_counts_as_changed() {
        let dir = tree();
        let root = dir.path();
        let before = snapshot(root, &Excludes::new()).unwrap();
        write(root, "etc/motd", "hi\n");
        assert_eq!(
            paths(&changes(&before, root, &Excludes::new()).changed),
            ["etc/motd"]
        );
    }

    #[test]
    fn a_directory_that_became_a_symlink_hides_its_old_children_without_whiteouts() {
        let dir = tree();
        let root = dir.path();
        let before = hashed(root, &Excludes::new());
        std::fs::remove_dir_all(root.join("var/lib")).unwrap();
        symlink("/usr/lib", root.join("var/lib")).unwrap();
        let changes = changes(&before, root, &Excludes::new());
        assert_eq!(paths(&changes.changed), ["var/lib"]);
        assert!(changes.deleted.is_empty(), "{:?}", changes.deleted);
    }

    #[test]
    fn what_either_snapshot_excludes_is_neither_changed_nor_deleted() {
        let dir = tree();
        let root = dir.path();
        let before = hashed(root, &Excludes::new());
        write(root, "tmp/new", "n\n");
        let changes = changes(&before, root, &excludes());
        // `proc` and `tmp/scratch` were recorded before and are excluded after: no whiteouts.
        assert!(changes.deleted.is_empty(), "{:?}", changes.deleted);
        assert!(changes.changed.is_empty(), "{:?}", changes.changed);
    }

    #[test]
    fn mtimes_are_compared_as_the_layer_records_them() {
        let dir = tree();
        let root = dir.path();
        let set_mtime = |seconds: u64| {
            std::fs::File::options()
                .write(true)
                .open(root.join("etc/motd"))
                .unwrap()
                .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
                .unwrap();
        };
        set_mtime(500);
        let before = hashed(root, &Excludes::new());
        set_mtime(600);
        let mut after = snapshot(root, &Excludes::new()).unwrap();
        let unclamped = diff(&before, &mut after, &LayerOptions::default()).unwrap();
        assert_eq!(paths(&unclamped.changed), ["etc/motd"]);
        // Both clamped to the epoch: the same in a layer, and the same bytes.
        let clamped = LayerOptions {
            source_date_epoch: Some(400),
        };
        let mut after = snapshot(root, &Excludes::new()).unwrap();
        assert!(diff(&before, &mut after, &clamped).unwrap().is_empty());
    }

    #[test]
    fn identical_snapshots_have_no_changes_and_whole_tree_lists_everything() {
        let dir = tree();
        let snap = hashed(dir.path(), &excludes());
        assert!(changes(&snap, dir.path(), &excludes()).is_empty());
        let whole = Changes::whole_tree(&snap);
        assert_eq!(whole.changed.len(), snap.entries.len());
    }

    #[test]
    fn xattrs_a_layer_keeps_are_seen_and_host_ones_are_not() {
        let dir = tree();
        let root = dir.path();
        let before = hashed(root, &Excludes::new());
        xattr::set(root.join("etc/passwd"), "user.bake", b"1").unwrap();
        let mut after = snapshot(root, &Excludes::new()).unwrap();
        assert_eq!(
            after.entries[Path::new("etc/passwd")].xattrs[&OsString::from("user.bake")],
            b"1"
        );
        assert_eq!(
            paths(&diff(&before, &mut after, &EPOCH).unwrap().changed),
            ["etc/passwd"]
        );
        // An SELinux label is the host's, never in a layer: a relabel is no change.
        let mut relabelled = after.clone();
        relabelled
            .entries
            .get_mut(Path::new("etc/motd"))
            .unwrap()
            .xattrs
            .insert(
                "security.selinux".into(),
                b"system_u:object_r:etc_t:s0".to_vec(),
            );
        assert!(diff(&after, &mut relabelled, &EPOCH).unwrap().is_empty());
    }

    #[test]
    fn a_mount_point_is_left_out_and_what_it_covers_is_not_deleted() {
        if !crate::build::testing::privileged() {
            return;
        }
        let dir = tree();
        let root = dir.path();
        write(root, "run/lock/pid", "1\n");
        let before = hashed(root, &Excludes::new());
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
        let mut after = after.unwrap();
        assert!(unmounted.unwrap().success());
        assert_eq!(paths(&after.mount_points), ["run"]);
        assert!(!after.entries.contains_key(Path::new("run")));
        assert!(diff(&before, &mut after, &EPOCH).unwrap().is_empty());
    }
}
