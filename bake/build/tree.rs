//! A file tree read from a tar stream, kept as metadata in memory and file content in one
//! spool file: what the Docker runner knows of a root filesystem it cannot unpack on the host
//! (an unprivileged user cannot create root-owned files or device nodes there).
//!
//! Two uses, both ending in [`super::layer::write_layer_from`] so that the layer bytes come from
//! bake's own tar writer:
//!
//! - a rootfs tarball base, applied as bake's unpacker applies a layer (whiteouts, opaque
//!   markers, missing parents created `0755` root-owned, a later entry replacing an earlier
//!   one), then written whole;
//! - a container's export (`GET /containers/{id}/export`), read before and after a step: the
//!   two reads become [`Snapshot`]s ([`TarTree::snapshot`]) for bake's own diff, and the
//!   second one is the source of the step's layer.
//!
//! What a tar cannot say is made up consistently: every entry gets its own inode number and
//! hard links share one, so the layer writer finds hard links as it does on a real file system;
//! ctime is zero (it is never written). Every regular file's content digest is known, so the
//! diff compares content directly where the namespace runner's needs inodes and ctimes to know
//! what to hash.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::layer::{LayerError, LayerSource, OPAQUE_MARKER, WHITEOUT_PREFIX};
use super::snapshot::{EntryKind, EntryMeta, Excludes, Snapshot};

/// Mode of a parent directory a tar leaves out, as bake's unpacker (and containerd) make it.
const INVENTED_DIR_MODE: u32 = 0o755;

/// A failure to read a tar stream into a tree.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("failed to read the tar stream of {what}")]
    Read {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to spool file content of {what} into `{}`", path.display())]
    Spool {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entry `{path}` of {what} {problem}")]
    Entry {
        what: String,
        path: String,
        problem: &'static str,
    },
}

/// Offset and length of a file's content in the spool.
type Spooled = (u64, u64);

#[derive(Debug, Clone)]
struct Node {
    /// With the SHA-256 of a regular file's content.
    meta: EntryMeta,
    /// Where a regular file's content is in the spool (none in an index).
    content: Option<Spooled>,
}

/// What to keep of a tar stream's files.
#[derive(Debug, Clone, Default)]
pub struct Keep {
    /// Only metadata and content digests, no content: a tree to compare against, not to write.
    index_only: bool,
}

impl Keep {
    /// Metadata and content: a tree a layer can be written from.
    pub fn all() -> Self {
        Keep { index_only: false }
    }

    /// Metadata and content digests only: for [`TarTree::snapshot`].
    pub fn index() -> Self {
        Keep { index_only: true }
    }
}

/// A tree read from one or more tar streams.
pub struct TarTree {
    nodes: BTreeMap<PathBuf, Node>,
    spool: tempfile::NamedTempFile,
    spooled: u64,
    next_ino: u64,
}

impl std::fmt::Debug for TarTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarTree")
            .field("entries", &self.nodes.len())
            .field("spooled", &self.spooled)
            .finish()
    }
}

impl TarTree {
    /// An empty tree whose file content is spooled into a temporary file in `dir`.
    pub fn new(dir: &Path) -> Result<Self, TreeError> {
        let spool = tempfile::NamedTempFile::new_in(dir).map_err(|source| TreeError::Spool {
            what: "a tree".into(),
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(TarTree {
            nodes: BTreeMap::new(),
            spool,
            spooled: 0,
            next_ino: 1,
        })
    }

    /// Every path in the tree, parents first.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.nodes.keys().map(PathBuf::as_path)
    }

    pub fn get(&self, path: &Path) -> Option<&EntryMeta> {
        self.nodes.get(path).map(|n| &n.meta)
    }

    /// Applies the tar stream `reader` (described as `what` in errors), keeping what `keep`
    /// keeps. Whiteouts and opaque markers remove what earlier streams put in the tree.
    pub fn apply(&mut self, reader: impl Read, what: &str, keep: &Keep) -> Result<(), TreeError> {
        let read_error = |source| TreeError::Read {
            what: what.to_owned(),
            source,
        };
        let mut archive = tar::Archive::new(reader);
        // Entries this stream wrote: an opaque marker hides only what came from below.
        let mut written: BTreeSet<PathBuf> = BTreeSet::new();
        let mut opaque: Vec<PathBuf> = Vec::new();
        for entry in archive.entries().map_err(read_error)? {
            let mut entry = entry.map_err(read_error)?;
            let raw = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw).into_owned();
            let entry_error = |problem| TreeError::Entry {
                what: what.to_owned(),
                path: shown.clone(),
                problem,
            };
            let Some(path) =
                normalize(Path::new(std::ffi::OsStr::from_bytes(&raw))).map_err(entry_error)?
            else {
                continue; // the root itself
            };
            let name = path.file_name().expect("normalized paths have a name");
            let name_bytes = name.as_bytes();
            if name_bytes == OPAQUE_MARKER.as_bytes() {
                opaque.push(path.parent().unwrap_or(Path::new("")).to_path_buf());
                continue;
            }
            if let Some(hidden) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                    continue; // aufs bookkeeping, as the unpacker ignores it
                }
                let gone = path.with_file_name(std::ffi::OsStr::from_bytes(hidden));
                self.remove_subtree(&gone);
                continue;
            }
            let header = entry.header().clone();
            let kind = match header.entry_type() {
                EntryType::Regular | EntryType::Continuous => EntryKind::File,
                EntryType::Directory => EntryKind::Dir,
                EntryType::Symlink => EntryKind::Symlink,
                EntryType::Char => EntryKind::CharDevice,
                EntryType::Block => EntryKind::BlockDevice,
                EntryType::Fifo => EntryKind::Fifo,
                EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| entry_error("is a hard link without a target"))?;
                    let target = normalize(Path::new(std::ffi::OsStr::from_bytes(&target)))
                        .map_err(entry_error)?
                        .ok_or_else(|| entry_error("is a hard link to the root"))?;
                    let Some(node) = self.nodes.get(&target).cloned() else {
                        return Err(entry_error(
                            "is a hard link to an entry the stream has not given (or bake did not keep)",
                        ));
                    };
                    self.ensure_parents(&path);
                    self.replace(&path);
                    self.nodes.insert(path.clone(), node);
                    written.insert(path);
                    continue;
                }
                _ => continue, // PAX and GNU headers are read by the crate; others carry nothing
            };
            let mut xattrs = BTreeMap::new();
            if let Some(extensions) = entry.pax_extensions().map_err(read_error)? {
                for extension in extensions {
                    let extension = extension.map_err(read_error)?;
                    if let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                        xattrs.insert(
                            OsString::from(std::ffi::OsStr::from_bytes(name)),
                            extension.value_bytes().to_vec(),
                        );
                    }
                }
            }
            let mtime_ns = pax_mtime_ns(&mut entry)
                .unwrap_or_else(|| i128::from(header.mtime().unwrap_or(0)) * 1_000_000_000);
            let rdev = match kind {
                EntryKind::CharDevice | EntryKind::BlockDevice => rustix::fs::makedev(
                    header.device_major().ok().flatten().unwrap_or(0),
                    header.device_minor().ok().flatten().unwrap_or(0),
                ),
                _ => 0,
            };
            let link_target = match kind {
                EntryKind::Symlink => Some(PathBuf::from(std::ffi::OsStr::from_bytes(
                    &entry.link_name_bytes().unwrap_or_default(),
                ))),
                _ => None,
            };
            let size = if kind == EntryKind::File {
                header.entry_size().map_err(read_error)?
            } else {
                0
            };
            let (content, digest) = if kind == EntryKind::File {
                let (content, digest) =
                    self.spool_content(&mut entry, size, what, keep.index_only)?;
                (content, Some(digest))
            } else {
                (None, None)
            };
            let meta = EntryMeta {
                kind,
                mode: header.mode().map_err(read_error)? & 0o7777,
                uid: u32::try_from(header.uid().map_err(read_error)?)
                    .map_err(|_| entry_error("has a uid above 2^32"))?,
                gid: u32::try_from(header.gid().map_err(read_error)?)
                    .map_err(|_| entry_error("has a gid above 2^32"))?,
                size,
                mtime_ns,
                ctime_ns: 0,
                dev: 0,
                ino: self.next_ino,
                nlink: 1,
                rdev,
                link_target,
                xattrs,
                digest,
            };
            self.next_ino += 1;
            self.ensure_parents(&path);
            if kind == EntryKind::Dir
                && let Some(existing) = self.nodes.get_mut(&path)
                && existing.meta.kind == EntryKind::Dir
            {
                // An existing directory takes the new metadata and keeps its content.
                existing.meta = EntryMeta {
                    ino: existing.meta.ino,
                    ..meta
                };
            } else {
                self.replace(&path);
                self.nodes.insert(path.clone(), Node { meta, content });
            }
            written.insert(path);
        }
        for dir in opaque {
            let below: Vec<PathBuf> = self
                .nodes
                .keys()
                .filter(|p| p.starts_with(&dir) && **p != dir && !written.contains(*p))
                .cloned()
                .collect();
            for path in below {
                self.nodes.remove(&path);
            }
        }
        self.count_links();
        Ok(())
    }

    /// Sets `nlink` from how many paths share each inode.
    fn count_links(&mut self) {
        let mut counts: HashMap<u64, u64> = HashMap::new();
        for node in self.nodes.values() {
            if node.meta.kind != EntryKind::Dir {
                *counts.entry(node.meta.ino).or_default() += 1;
            }
        }
        for node in self.nodes.values_mut() {
            if node.meta.kind != EntryKind::Dir {
                node.meta.nlink = counts[&node.meta.ino];
            }
        }
    }

    /// Reads a file's content, hashing it and (unless `index_only`) appending it to the spool.
    fn spool_content(
        &mut self,
        entry: &mut impl Read,
        size: u64,
        what: &str,
        index_only: bool,
    ) -> Result<(Option<Spooled>, [u8; 32]), TreeError> {
        use sha2::Digest as _;
        let offset = self.spooled;
        let path = self.spool.path().to_path_buf();
        let spool_error = |source| TreeError::Spool {
            what: what.to_owned(),
            path: path.clone(),
            source,
        };
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; 256 * 1024];
        let mut left = size;
        if !index_only {
            self.spool
                .as_file_mut()
                .seek(SeekFrom::Start(offset))
                .map_err(spool_error)?;
        }
        while left > 0 {
            let want = buffer
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = entry
                .read(&mut buffer[..want])
                .map_err(|source| TreeError::Read {
                    what: what.to_owned(),
                    source,
                })?;
            if n == 0 {
                return Err(TreeError::Read {
                    what: what.to_owned(),
                    source: io::Error::new(io::ErrorKind::UnexpectedEof, "a file ended early"),
                });
            }
            hasher.update(&buffer[..n]);
            if !index_only {
                self.spool
                    .as_file_mut()
                    .write_all(&buffer[..n])
                    .map_err(spool_error)?;
            }
            left -= n as u64;
        }
        let content = if index_only {
            None
        } else {
            self.spooled += size;
            Some((offset, size))
        };
        Ok((content, hasher.finalize().into()))
    }

    /// The tree as a [`Snapshot`] that [`crate::build::snapshot::diff`] can compare with
    /// another read of the same root: inode numbers are stable (from the path, or from the
    /// first path of a hard-link group), and every file has its content digest, so a file
    /// whose bytes changed differs even with the same size and mtime.
    pub fn snapshot(&self) -> Snapshot {
        let mut first: HashMap<u64, &Path> = HashMap::new();
        for (path, node) in &self.nodes {
            if node.meta.kind != EntryKind::Dir {
                first.entry(node.meta.ino).or_insert(path);
            }
        }
        let stable = |path: &Path| -> u64 {
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(path.as_os_str().as_bytes());
            u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
        };
        let entries = self
            .nodes
            .iter()
            .map(|(path, node)| {
                let mut meta = node.meta.clone();
                let anchor = if meta.kind == EntryKind::Dir {
                    path.as_path()
                } else {
                    first[&meta.ino]
                };
                meta.ino = stable(anchor);
                (path.clone(), meta)
            })
            .collect();
        Snapshot {
            entries,
            mount_points: BTreeSet::new(),
            excludes: Excludes::new(),
            root: None,
        }
    }

    /// Creates missing parent directories as the unpacker does.
    fn ensure_parents(&mut self, path: &Path) {
        let mut missing = Vec::new();
        for ancestor in path.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            match self.nodes.get(ancestor) {
                Some(node) if node.meta.kind == EntryKind::Dir => break,
                Some(_) => {
                    // Something that is not a directory is in the way: the unpacker replaces it.
                    self.nodes.remove(ancestor);
                    missing.push(ancestor.to_path_buf());
                }
                None => missing.push(ancestor.to_path_buf()),
            }
        }
        for dir in missing.into_iter().rev() {
            let ino = self.next_ino;
            self.next_ino += 1;
            self.nodes.insert(
                dir,
                Node {
                    meta: EntryMeta {
                        kind: EntryKind::Dir,
                        mode: INVENTED_DIR_MODE,
                        uid: 0,
                        gid: 0,
                        size: 0,
                        mtime_ns: 0,
                        ctime_ns: 0,
                        dev: 0,
                        ino,
                        nlink: 1,
                        rdev: 0,
                        link_target: None,
                        xattrs: BTreeMap::new(),
                        digest: None,
                    },
                    content: None,
                },
            );
        }
    }

    /// Removes what is at `path` so that a new entry can take its place (a directory only goes
    /// if the new entry is not a directory; the caller handles that case).
    fn replace(&mut self, path: &Path) {
        self.remove_subtree(path);
    }

    fn remove_subtree(&mut self, path: &Path) {
        let below: Vec<PathBuf> = self
            .nodes
            .range(path.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(path))
            .map(|(p, _)| p.clone())
            .collect();
        for p in below {
            self.nodes.remove(&p);
        }
    }
}

/// The PAX `mtime` record, in nanoseconds, when the entry has one.
fn pax_mtime_ns<R: Read>(entry: &mut tar::Entry<'_, R>) -> Option<i128> {
    let extensions = entry.pax_extensions().ok()??;
    for extension in extensions {
        let extension = extension.ok()?;
        if extension.key_bytes() == b"mtime" {
            let value = extension.value().ok()?;
            let (seconds, fraction) = value.split_once('.').unwrap_or((value, ""));
            let seconds: i128 = seconds.parse().ok()?;
            let mut nanos = fraction.chars().take(9).collect::<String>();
            while nanos.len() < 9 {
                nanos.push('0');
            }
            let nanos: i128 = nanos.parse().ok()?;
            return Some(seconds * 1_000_000_000 + nanos);
        }
    }
    None
}

/// A tar path relative to the root, without `.` components; `None` for the root; `..` refused.
fn normalize(path: &Path) -> Result<Option<PathBuf>, &'static str> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err("has a `..` component");
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

impl LayerSource for TarTree {
    fn display(&self, path: &Path) -> PathBuf {
        Path::new("/").join(path)
    }

    fn meta(&self, path: &Path) -> Result<EntryMeta, LayerError> {
        self.nodes
            .get(path)
            .map(|n| n.meta.clone())
            .ok_or_else(|| LayerError::Read {
                path: self.display(path),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "not in the tree read from the engine",
                ),
            })
    }

    fn content(
        &self,
        path: &Path,
        _meta: &EntryMeta,
        append: &mut dyn FnMut(&mut dyn Read) -> Result<(), LayerError>,
    ) -> Result<(), LayerError> {
        let read_error = |source| LayerError::Read {
            path: self.display(path),
            source,
        };
        let (offset, length) = self
            .nodes
            .get(path)
            .and_then(|n| n.content)
            .ok_or_else(|| read_error(io::Error::new(io::ErrorKind::NotFound, "no content")))?;
        let mut file = self.spool.reopen().map_err(read_error)?;
        file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
        append(&mut file.take(length))
    }
}

/// The tree's paths, for tests.
#[cfg(test)]
fn names(tree: &TarTree) -> Vec<String> {
    tree.paths().map(|p| p.display().to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::layer::{LayerOptions, write_layer, write_layer_from};
    use crate::build::snapshot::{Changes, Excludes, diff, snapshot};

    fn tar_of(entries: &[(&str, EntryType, &[u8], &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(if *kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_000);
            header.set_size(data.len() as u64);
            if !link.is_empty() {
                header.set_link_name(link).unwrap();
            }
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_opaque_markers_and_invented_parents_apply_like_the_unpacker() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = TarTree::new(dir.path()).unwrap();
        let lower = tar_of(&[
            ("./etc/", EntryType::Directory, b"", ""),
            ("./etc/a", EntryType::Regular, b"a", ""),
            ("./etc/b", EntryType::Regular, b"b", ""),
            ("./opt/x/y", EntryType::Regular, b"y", ""),
        ]);
        tree.apply(&lower[..], "lower", &Keep::all()).unwrap();
        assert_eq!(
            names(&tree),
            ["etc", "etc/a", "etc/b", "opt", "opt/x", "opt/x/y"]
        );
        assert_eq!(tree.get(Path::new("opt")).unwrap().mode, INVENTED_DIR_MODE);
        let upper = tar_of(&[
            ("etc/.wh.a", EntryType::Regular, b"", ""),
            ("opt/x/new", EntryType::Regular, b"n", ""),
            ("opt/x/.wh..wh..opq", EntryType::Regular, b"", ""),
            ("etc/b2", EntryType::Link, b"", "etc/b"),
        ]);
        tree.apply(&upper[..], "upper", &Keep::all()).unwrap();
        assert_eq!(
            names(&tree),
            ["etc", "etc/b", "etc/b2", "opt", "opt/x", "opt/x/new"]
        );
        let b = tree.get(Path::new("etc/b")).unwrap();
        let b2 = tree.get(Path::new("etc/b2")).unwrap();
        assert_eq!((b.ino, b.nlink), (b2.ino, 2));
    }

    #[test]
    fn an_index_has_digests_and_no_content_and_its_snapshot_sees_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let read = |content: &[u8]| {
            let mut tree = TarTree::new(dir.path()).unwrap();
            let stream = tar_of(&[
                ("etc/", EntryType::Directory, b"", ""),
                ("etc/a", EntryType::Regular, content, ""),
            ]);
            tree.apply(&stream[..], "export", &Keep::index()).unwrap();
            tree
        };
        let before = read(b"one");
        let same = read(b"one");
        let after = read(b"two");
        assert!(before.meta(Path::new("etc/a")).is_ok());
        assert!(
            before
                .content(
                    Path::new("etc/a"),
                    &before.meta(Path::new("etc/a")).unwrap(),
                    &mut |_| Ok(())
                )
                .is_err()
        );
        // Same size and mtime: only the content digest tells the rewrite.
        let options = LayerOptions::default();
        let compare =
            |a: &TarTree, b: &TarTree| diff(&a.snapshot(), &mut b.snapshot(), &options).unwrap();
        let unchanged = compare(&before, &same);
        assert!(unchanged.is_empty(), "{unchanged:?}");
        let changed = compare(&before, &after);
        assert_eq!(
            changed.changed.into_iter().collect::<Vec<_>>(),
            [PathBuf::from("etc/a")]
        );
    }

    /// The same tree, unpacked on the host or read from a tar, gives the same layer bytes.
    #[test]
    fn a_tree_read_from_a_tar_writes_the_layer_the_unpacked_tree_writes() {
        if !crate::build::testing::privileged() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs_err::create_dir(&root).unwrap();
        crate::build::testing::rich_tree(&root);
        let tree = snapshot(&root, &Excludes::new()).unwrap();
        let options = LayerOptions {
            source_date_epoch: Some(1_000_000_000),
        };
        let mut from_host = Vec::new();
        write_layer(&root, &Changes::whole_tree(&tree), &options, &mut from_host).unwrap();

        let mut read = TarTree::new(dir.path()).unwrap();
        read.apply(&from_host[..], "layer", &Keep::all()).unwrap();
        let changes = Changes {
            changed: read.paths().map(Path::to_path_buf).collect(),
            ..Changes::default()
        };
        let mut from_tree = Vec::new();
        write_layer_from(&read, &changes, &options, &mut from_tree).unwrap();
        assert!(from_host == from_tree, "the two layers differ");
    }

    #[test]
    fn spool_holds_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut tree = TarTree::new(dir.path()).unwrap();
        let stream = tar_of(&[("a", EntryType::Regular, b"hello", "")]);
        tree.apply(&stream[..], "t", &Keep::all()).unwrap();
        let mut got = Vec::new();
        tree.content(
            Path::new("a"),
            &tree.meta(Path::new("a")).unwrap(),
            &mut |r| {
                r.read_to_end(&mut got)
                    .map(|_| ())
                    .map_err(LayerError::Write)
            },
        )
        .unwrap();
        assert_eq!(got, b"hello");
    }

    /// The two runners' diffs agree: the namespace runner's (a root on the host, inodes and
    /// ctimes) and the Docker runner's (two tar reads of the same root, content digests) give
    /// the same layer bytes for the same step, including rewrites that change nothing a layer
    /// records.
    #[test]
    fn the_host_diff_and_the_tar_diff_write_the_same_layer() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let write = |path: &str, content: &str| {
            let full = root.join(path);
            fs_err::create_dir_all(full.parent().unwrap()).unwrap();
            fs_err::write(full, content).unwrap();
        };
        write("etc/passwd", "root:x:0:0\n");
        write("etc/motd", "hi\n");
        write("etc/doomed", "x\n");
        write("usr/lib/libx.so", "library\n");
        write("var/cache/apt/pkgcache.bin", "cache\n");
        write("opt/app/main", "app\n");
        let epoch = LayerOptions {
            source_date_epoch: Some(1_000_000_000),
        };
        // What `docker export` would give: the whole tree, mtimes as they are.
        let export = |name: &str| {
            let whole = Changes::whole_tree(&snapshot(&root, &Excludes::new()).unwrap());
            let mut tar = Vec::new();
            write_layer(&root, &whole, &LayerOptions::default(), &mut tar).unwrap();
            let mut tree = TarTree::new(dir.path()).unwrap();
            tree.apply(&tar[..], name, &Keep::all()).unwrap();
            tree
        };
        let mut host_before = snapshot(&root, &Excludes::new()).unwrap();
        host_before.hash_files().unwrap();
        let tar_before = export("before");

        // A dpkg-style rewrite with the same bytes and mtime, a mode changed and back, a real
        // change of the same size, a deletion, a directory made again with one file back.
        let libx = root.join("usr/lib/libx.so");
        let mtime = fs_err::metadata(&libx).unwrap().modified().unwrap();
        write("usr/lib/libx.so.tmp", "library\n");
        std::fs::File::options()
            .write(true)
            .open(root.join("usr/lib/libx.so.tmp"))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        fs_err::rename(root.join("usr/lib/libx.so.tmp"), &libx).unwrap();
        let passwd = root.join("etc/passwd");
        fs_err::set_permissions(&passwd, std::fs::Permissions::from_mode(0o600)).unwrap();
        fs_err::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
        write("etc/motd", "ho\n");
        fs_err::remove_file(root.join("etc/doomed")).unwrap();
        fs_err::rename(root.join("var/cache/apt"), root.join("var/apt.old")).unwrap();
        write("var/cache/apt/srcpkgcache.bin", "new\n");
        fs_err::remove_dir_all(root.join("var/apt.old")).unwrap();

        let mut host_after = snapshot(&root, &Excludes::new()).unwrap();
        let by_host = diff(&host_before, &mut host_after, &epoch).unwrap();
        let tar_after = export("after");
        let by_tar = diff(&tar_before.snapshot(), &mut tar_after.snapshot(), &epoch).unwrap();
        assert_eq!(by_host, by_tar);
        let paths = |set: &BTreeSet<PathBuf>| -> Vec<String> {
            set.iter().map(|p| p.display().to_string()).collect()
        };
        assert_eq!(
            paths(&by_host.changed),
            ["etc/motd", "var/cache/apt/srcpkgcache.bin"]
        );
        assert_eq!(
            paths(&by_host.deleted),
            ["etc/doomed", "var/cache/apt/pkgcache.bin"]
        );
        let mut from_host = Vec::new();
        write_layer(&root, &by_host, &epoch, &mut from_host).unwrap();
        let mut from_tree = Vec::new();
        write_layer_from(&tar_after, &by_tar, &epoch, &mut from_tree).unwrap();
        assert!(from_host == from_tree, "the two layers differ");
    }
}
