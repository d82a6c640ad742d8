//! Writing a deterministic OCI layer tar from a root directory and a set of [`Changes`]
//! (FORMATS.md A3, B4): the same tree gives the same bytes whatever order it was created in,
//! whatever host writes it, and whatever the inode numbers are.
//!
//! The rules, each there because something else would leak into the bytes:
//!
//! - entries are sorted by path component by component (bytewise), so a parent comes before its
//!   children and a directory's subtree is contiguous; within a directory its whiteouts
//!   (`.wh.<name>`) come first, then its entries;
//! - the parent directories of every changed or deleted path are included with their current
//!   metadata, so a consumer never invents one;
//! - uid, gid and mode (with setuid, setgid and sticky) are numeric and kept; user and group
//!   names are left empty; device numbers only for devices; no atime or ctime;
//! - mtimes are clamped to `SOURCE_DATE_EPOCH` (A13); whiteouts have mtime 0;
//! - hard links are detected by (device, inode): the first path in order is stored, the others
//!   become link entries to it;
//! - xattrs are PAX `SCHILY.xattr.<name>` records sorted by name, minus the host-specific ones
//!   in [`HOST_XATTR_PREFIXES`];
//! - long paths and link targets use GNU long-name entries, whose headers are fixed.
//!
//! Only the low-level header API of the `tar` crate is used: `append_dir_all` follows
//! `read_dir` order and ignores hard links, and `HeaderMode::Deterministic` resets ownership.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use super::snapshot::{Changes, EntryKind, EntryMeta, entry_meta};

/// Prefix of a whiteout's name (A3).
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// Name of the marker that makes a directory opaque (A3). Read in other images' layers; bake
/// writes whiteouts for what a directory lost instead (see [`super::snapshot::diff`]).
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Extended attributes that describe the build host rather than the image, never written into
/// a layer: SELinux labels come from the host's policy (the runtime labels containers itself),
/// and overlayfs keeps its own bookkeeping under `trusted.overlay.`.
pub const HOST_XATTR_PREFIXES: &[&str] = &["security.selinux", "trusted.overlay."];

/// Longest name or link target that fits in a tar header; longer ones need a GNU extension.
const HEADER_NAME_LEN: usize = 100;

/// How to write a layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerOptions {
    /// `SOURCE_DATE_EPOCH`: mtimes later than this many seconds since the epoch are written as
    /// this. `None` keeps mtimes as they are (a build that is not reproducible).
    pub source_date_epoch: Option<u64>,
}

impl LayerOptions {
    /// The mtime a layer records for `mtime_ns` (nanoseconds since the epoch): whole seconds,
    /// clamped to `SOURCE_DATE_EPOCH`. The diff ([`super::snapshot::diff`]) judges mtimes by
    /// this too, so a change the layer cannot show is no change.
    pub fn recorded_mtime(&self, mtime_ns: i128) -> u64 {
        let seconds = u64::try_from(mtime_ns.div_euclid(1_000_000_000)).unwrap_or(0);
        match self.source_date_epoch {
            Some(epoch) => seconds.min(epoch),
            None => seconds,
        }
    }
}

/// Whether a layer records the extended attribute `name`: not the host's (see
/// [`HOST_XATTR_PREFIXES`]). A name that is not UTF-8 counts as recorded; writing it fails.
pub fn records_xattr(name: &OsStr) -> bool {
    name.to_str()
        .is_none_or(|name| !HOST_XATTR_PREFIXES.iter().any(|p| name.starts_with(p)))
}

/// What went into a layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LayerSummary {
    /// Files, directories, symlinks, devices and fifos stored (hard links included).
    pub entries: u64,
    /// Of `entries`, how many are hard links to an earlier entry.
    pub hard_links: u64,
    /// Whiteouts.
    pub whiteouts: u64,
    /// Sockets, which a tar cannot hold: they are left out, and listed here.
    pub skipped_sockets: Vec<PathBuf>,
}

/// A failure to write a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("failed to read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{}` changed while it was being written into the layer", path.display())]
    Changed { path: PathBuf },
    #[error("`{}` cannot be stored in an OCI layer: {reason}", path.display())]
    NotRepresentable { path: PathBuf, reason: &'static str },
    #[error("failed to write the layer tar")]
    Write(#[source] io::Error),
}

/// What one tar entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Entry,
    Whiteout,
}

/// Sort classes of a path component: whiteouts before entries.
const CLASS_WHITEOUT: u8 = 0;
const CLASS_ENTRY: u8 = 1;

type SortKey = Vec<(u8, OsString)>;

fn sort_key(path: &Path, item: Item) -> SortKey {
    let mut key: SortKey = path
        .components()
        .map(|c| (CLASS_ENTRY, c.as_os_str().to_os_string()))
        .collect();
    match item {
        Item::Entry => {}
        Item::Whiteout => {
            if let Some(last) = key.last_mut() {
                last.0 = CLASS_WHITEOUT;
            }
        }
    }
    key
}

/// The tar entries for `changes`, in layer order.
fn plan(changes: &Changes) -> BTreeMap<SortKey, (PathBuf, Item)> {
    let mut items = BTreeMap::new();
    let mut add = |path: &Path, item: Item| {
        items.insert(sort_key(path, item), (path.to_path_buf(), item));
        for ancestor in path.ancestors().skip(1) {
            if ancestor.as_os_str().is_empty() {
                break;
            }
            items.insert(
                sort_key(ancestor, Item::Entry),
                (ancestor.to_path_buf(), Item::Entry),
            );
        }
    };
    for path in &changes.changed {
        add(path, Item::Entry);
    }
    for path in &changes.deleted {
        add(path, Item::Whiteout);
    }
    items
}

/// Writes the layer for `changes` of the tree at `root` into `out`, ending the tar. `out` is
/// typically a [`super::compress::BlobWriter`].
pub fn write_layer<W: Write>(
    root: &Path,
    changes: &Changes,
    options: &LayerOptions,
    out: W,
) -> Result<LayerSummary, LayerError> {
    write_layer_from(&HostRoot(root), changes, options, out)
}

/// Where a layer's entries come from: their metadata and the bytes of regular files.
///
/// The tar itself is always written here, by [`write_layer_from`], whatever the source: a root
/// directory on the host ([`HostRoot`]), or a tree read from a tar stream (the Docker runner's
/// container exports, see [`super::tree`]). Same metadata and content, same bytes.
pub trait LayerSource {
    /// The entry at `path` (relative), for messages.
    fn display(&self, path: &Path) -> PathBuf;

    /// The metadata of the entry at `path`, not following a symlink there. `(dev, ino)` and
    /// `nlink` tell hard links apart; ctime is not written.
    fn meta(&self, path: &Path) -> Result<EntryMeta, LayerError>;

    /// Calls `append` with exactly `meta.size` bytes of the regular file at `path`.
    fn content(
        &self,
        path: &Path,
        meta: &EntryMeta,
        append: &mut dyn FnMut(&mut dyn Read) -> Result<(), LayerError>,
    ) -> Result<(), LayerError>;
}

/// A root directory on the host; a file that changes while it is read is an error.
#[derive(Debug, Clone, Copy)]
pub struct HostRoot<'a>(pub &'a Path);

impl LayerSource for HostRoot<'_> {
    fn display(&self, path: &Path) -> PathBuf {
        self.0.join(path)
    }

    fn meta(&self, path: &Path) -> Result<EntryMeta, LayerError> {
        let full = self.0.join(path);
        let read_error = |source| LayerError::Read {
            path: full.clone(),
            source,
        };
        let metadata = fs_err::symlink_metadata(&full).map_err(read_error)?;
        entry_meta(&full, &metadata).map_err(read_error)
    }

    fn content(
        &self,
        path: &Path,
        meta: &EntryMeta,
        append: &mut dyn FnMut(&mut dyn Read) -> Result<(), LayerError>,
    ) -> Result<(), LayerError> {
        let full = self.0.join(path);
        let read_error = |source| LayerError::Read {
            path: full.to_path_buf(),
            source,
        };
        let fd = rustix::fs::open(
            &full,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| read_error(e.into()))?;
        let file = File::from(fd);
        let unchanged = |file: &File| -> Result<bool, LayerError> {
            let now = file.metadata().map_err(read_error)?;
            let now = entry_times(&now);
            Ok(now == (meta.ino, meta.size, meta.mtime_ns, meta.ctime_ns))
        };
        if !unchanged(&file)? {
            return Err(LayerError::Changed {
                path: full.to_path_buf(),
            });
        }
        let mut content = Exact {
            inner: &file,
            left: meta.size,
            shrank: false,
            error: None,
        };
        let appended = append(&mut content);
        if let Some(source) = content.error.take() {
            return Err(read_error(source));
        }
        if content.shrank {
            return Err(LayerError::Changed {
                path: full.to_path_buf(),
            });
        }
        appended?;
        if !unchanged(&file)? {
            return Err(LayerError::Changed {
                path: full.to_path_buf(),
            });
        }
        Ok(())
    }
}

/// Writes the layer for `changes` of the tree `source` describes into `out`, ending the tar.
pub fn write_layer_from<W: Write>(
    source: &dyn LayerSource,
    changes: &Changes,
    options: &LayerOptions,
    out: W,
) -> Result<LayerSummary, LayerError> {
    let mut writer = LayerWriter {
        source,
        options,
        builder: tar::Builder::new(out),
        first_links: HashMap::new(),
        summary: LayerSummary::default(),
    };
    // Only matters for the crate's own file appenders, which are not used; stated so that a
    // future caller of them does not pick up the host's holes.
    writer.builder.sparse(false);
    for (path, item) in plan(changes).into_values() {
        match item {
            Item::Entry => writer.entry(&path)?,
            Item::Whiteout => {
                let name = path.file_name().expect("a deleted path has a name");
                let mut marker = OsString::from(WHITEOUT_PREFIX);
                marker.push(name);
                writer.marker(&path.with_file_name(marker))?;
            }
        }
    }
    writer.builder.into_inner().map_err(LayerError::Write)?;
    Ok(writer.summary)
}

struct LayerWriter<'a, W: Write> {
    source: &'a dyn LayerSource,
    options: &'a LayerOptions,
    builder: tar::Builder<W>,
    /// The first path stored for each (device, inode) with more than one link.
    first_links: HashMap<(u64, u64), PathBuf>,
    summary: LayerSummary,
}

impl<W: Write> LayerWriter<'_, W> {
    /// A whiteout: an empty regular file with no metadata of its own.
    fn marker(&mut self, path: &Path) -> Result<(), LayerError> {
        let mut header = Header::new_gnu();
        header.set_entry_type(EntryType::Regular);
        header.set_mode(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(0);
        self.builder
            .append_data(&mut header, path, io::empty())
            .map_err(LayerError::Write)?;
        self.summary.whiteouts += 1;
        Ok(())
    }

    fn entry(&mut self, path: &Path) -> Result<(), LayerError> {
        let full = self.source.display(path);
        if path
            .file_name()
            .is_some_and(|name| name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()))
        {
            return Err(LayerError::NotRepresentable {
                path: full,
                reason: "names starting with `.wh.` are whiteouts in a layer",
            });
        }
        let meta = self.source.meta(path)?;
        if meta.kind == EntryKind::Socket {
            self.summary.skipped_sockets.push(path.to_path_buf());
            return Ok(());
        }

        let mut header = Header::new_gnu();
        header.set_mode(meta.mode);
        header.set_uid(meta.uid.into());
        header.set_gid(meta.gid.into());
        header.set_mtime(self.options.recorded_mtime(meta.mtime_ns));
        header.set_size(0);

        if meta.kind != EntryKind::Dir && meta.nlink > 1 {
            if let Some(first) = self.first_links.get(&(meta.dev, meta.ino)).cloned() {
                header.set_entry_type(EntryType::Link);
                self.link_name(&mut header, first.as_os_str())?;
                self.append(&mut header, path, io::empty())?;
                self.summary.entries += 1;
                self.summary.hard_links += 1;
                return Ok(());
            }
            self.first_links
                .insert((meta.dev, meta.ino), path.to_path_buf());
        }
        // After the hard-link check: a link shares its target's inode, xattrs included.
        self.xattrs(&full, &meta)?;

        match meta.kind {
            EntryKind::Dir => {
                header.set_entry_type(EntryType::Directory);
                // A trailing slash marks a directory for readers that look at names only.
                let mut name = path.as_os_str().to_os_string();
                name.push("/");
                self.append(&mut header, Path::new(&name), io::empty())?;
            }
            EntryKind::Symlink => {
                header.set_entry_type(EntryType::Symlink);
                let target = meta.link_target.as_deref().unwrap_or(Path::new(""));
                self.link_name(&mut header, target.as_os_str())?;
                self.append(&mut header, path, io::empty())?;
            }
            EntryKind::CharDevice | EntryKind::BlockDevice | EntryKind::Fifo => {
                header.set_entry_type(match meta.kind {
                    EntryKind::CharDevice => EntryType::Char,
                    EntryKind::BlockDevice => EntryType::Block,
                    _ => EntryType::Fifo,
                });
                if meta.kind != EntryKind::Fifo {
                    let major = rustix::fs::major(meta.rdev);
                    let minor = rustix::fs::minor(meta.rdev);
                    header.set_device_major(major).map_err(LayerError::Write)?;
                    header.set_device_minor(minor).map_err(LayerError::Write)?;
                }
                self.append(&mut header, path, io::empty())?;
            }
            EntryKind::File => {
                header.set_entry_type(EntryType::Regular);
                header.set_size(meta.size);
                let builder = &mut self.builder;
                self.source.content(path, &meta, &mut |content| {
                    builder
                        .append_data(&mut header, path, content)
                        .map_err(LayerError::Write)
                })?;
            }
            EntryKind::Socket => unreachable!("skipped above"),
        }
        self.summary.entries += 1;
        Ok(())
    }

    /// PAX xattr records for the entry that follows, if it has any worth keeping.
    fn xattrs(&mut self, full: &Path, meta: &EntryMeta) -> Result<(), LayerError> {
        let mut records = Vec::new();
        for (name, value) in &meta.xattrs {
            let Some(name) = name.to_str() else {
                return Err(LayerError::NotRepresentable {
                    path: full.to_path_buf(),
                    reason: "an extended attribute name is not UTF-8",
                });
            };
            if !records_xattr(name.as_ref()) {
                continue;
            }
            records.push((format!("SCHILY.xattr.{name}"), value.as_slice()));
        }
        // `meta.xattrs` is a BTreeMap, so the records are already sorted by name.
        self.builder
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
            .map_err(LayerError::Write)
    }

    /// Sets a symlink or hard link target, byte for byte: the crate's own setter normalizes
    /// `a/./b` to `a/b`, which would change what a symlink stores.
    fn link_name(&mut self, header: &mut Header, target: &OsStr) -> Result<(), LayerError> {
        let bytes = target.as_bytes();
        if bytes.contains(&0) {
            return Err(LayerError::NotRepresentable {
                path: PathBuf::from(target),
                reason: "a link target contains a NUL byte",
            });
        }
        if bytes.len() <= HEADER_NAME_LEN {
            let field = &mut header.as_old_mut().linkname;
            field.fill(0);
            field[..bytes.len()].copy_from_slice(bytes);
        } else {
            // GNU long link: a `K` entry holding the NUL-terminated target, then the real
            // entry (whose own link field is left empty).
            let mut long = Header::new_gnu();
            let name = b"././@LongLink";
            long.as_gnu_mut().expect("a GNU header").name[..name.len()].copy_from_slice(name);
            long.set_mode(0o644);
            long.set_uid(0);
            long.set_gid(0);
            long.set_mtime(0);
            long.set_size(bytes.len() as u64 + 1);
            long.set_entry_type(EntryType::GNULongLink);
            long.set_cksum();
            self.builder
                .append(&long, bytes.chain(&[0u8][..]))
                .map_err(LayerError::Write)?;
        }
        Ok(())
    }

    fn append(
        &mut self,
        header: &mut Header,
        path: &Path,
        data: impl Read,
    ) -> Result<(), LayerError> {
        self.builder
            .append_data(header, path, data)
            .map_err(LayerError::Write)
    }
}

/// What tells a file's content changed: inode, size, mtime and ctime (in ns).
fn entry_times(metadata: &std::fs::Metadata) -> (u64, u64, i128, i128) {
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    (
        metadata.ino(),
        metadata.size(),
        ns(metadata.mtime(), metadata.mtime_nsec()),
        ns(metadata.ctime(), metadata.ctime_nsec()),
    )
}

/// Reads exactly `left` bytes from a file. Its own failures are kept aside (`shrank` if the file
/// ended early, `error` if reading failed) so that they are not mistaken for failures to write
/// the output, which come through the same `io::copy`. Growth is caught afterwards by comparing
/// the size.
struct Exact<R> {
    inner: R,
    left: u64,
    shrank: bool,
    error: Option<io::Error>,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        match self.inner.read(&mut buf[..want]) {
            Ok(0) => {
                self.shrank = true;
                Err(io::ErrorKind::UnexpectedEof.into())
            }
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => Err(error),
            Err(error) => {
                let kind = error.kind();
                self.error = Some(error);
                Err(kind.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::symlink;

    use proptest::prelude::*;
    use tar::EntryType;

    use super::*;
    use crate::build::snapshot::{Excludes, diff, snapshot};
    use crate::build::testing::{LONG_DIR, chmod, chown, list, privileged, rich_tree, write};

    /// 2001-09-09: earlier than any file a test creates, so every mtime is clamped to it.
    const EPOCH: u64 = 1_000_000_000;

    fn layer(root: &Path, changes: &Changes, epoch: Option<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        let options = LayerOptions {
            source_date_epoch: epoch,
        };
        write_layer(root, changes, &options, &mut out).unwrap();
        out
    }

    fn set(paths: &[&str]) -> BTreeSet<PathBuf> {
        paths.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn a_whole_tree_layer_keeps_every_kind_of_entry_and_its_metadata() {
        if !privileged() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        rich_tree(dir.path());
        let snap = snapshot(dir.path(), &Excludes::new()).unwrap();
        let bytes = layer(dir.path(), &Changes::whole_tree(&snap), Some(EPOCH));
        let entries = list(&bytes);
        let find = |path: &str| {
            entries
                .iter()
                .find(|e| e.path == path)
                .unwrap_or_else(|| panic!("`{path}` is not in the layer"))
        };

        // Component order, parents first, no `./` prefix, directories with a trailing slash.
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            &paths[..6],
            ["bin", "dev/", "dev/null", "dev/sda", "etc/", "etc/motd"]
        );
        let mut sorted = paths.clone();
        sorted.sort_by(|a, b| Path::new(a).cmp(Path::new(b)));
        assert_eq!(paths, sorted);
        assert_eq!(entries.len(), snap.entries.len());

        let sudo = find("usr/bin/sudo");
        assert_eq!(
            (sudo.kind, sudo.mode, sudo.size),
            (EntryType::Regular, 0o4755, 17)
        );
        let sudoedit = find("usr/bin/sudoedit");
        assert_eq!(sudoedit.kind, EntryType::Link);
        assert_eq!(sudoedit.link.as_deref(), Some("usr/bin/sudo"));
        assert_eq!(sudoedit.size, 0);
        let shadow = find("etc/shadow");
        assert_eq!((shadow.mode, shadow.uid, shadow.gid), (0o640, 0, 42));
        assert_eq!(find("home/user/.profile").uid, 1000);
        assert_eq!(find("srv/").gid, 1000);
        assert_eq!(find("srv/data/").mode, 0o2775);
        assert_eq!(find("tmp/").mode, 0o1777);
        assert_eq!(find("bin").link.as_deref(), Some("usr/bin"));
        assert_eq!(find("usr/lib/libx.so.1").size, 70_000);
        assert_eq!(find("dev/null").device, Some((1, 3)));
        assert_eq!(find("dev/sda").kind, EntryType::Block);
        assert_eq!(find("run/initctl").kind, EntryType::Fifo);
        assert_eq!(
            find("var/lib/attr").xattrs,
            [("SCHILY.xattr.user.bake".to_string(), b"yes".to_vec())]
        );
        assert!(find(&format!("{LONG_DIR}/file")).path.len() > HEADER_NAME_LEN);
        assert!(find("opt/long-link").link.as_ref().unwrap().len() > HEADER_NAME_LEN);
        gnu_tar_lists(&bytes, entries.len());
        for entry in &entries {
            assert_eq!(entry.mtime, EPOCH, "{} is not clamped", entry.path);
            assert!(entry.user_name.is_empty(), "{} has a user name", entry.path);
            if entry.device.is_none() {
                assert!(!matches!(entry.kind, EntryType::Char | EntryType::Block));
            }
        }
    }

    /// GNU tar, if installed, reads the layer without a warning and sees the same entries.
    fn gnu_tar_lists(bytes: &[u8], expected: usize) {
        use std::process::{Command, Stdio};
        if !crate::skip::tool("tar") {
            return;
        }
        let mut child = Command::new("tar")
            .args(["--xattrs", "-tvf", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let input = bytes.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let output = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && stderr.is_empty(),
            "GNU tar: {stderr}"
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).lines().count(),
            expected
        );
    }

    #[test]
    fn whiteouts_come_first_in_their_directory() {
        if !privileged() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        rich_tree(root);
        let changes = Changes {
            changed: set(&["var/cache/app/keep", "etc/motd"]),
            deleted: set(&[
                "usr/share/doc/pkg",
                "etc/zzz-gone",
                "etc/aaa-gone",
                "var/cache/app/old",
            ]),
        };
        let entries = list(&layer(root, &changes, Some(EPOCH)));
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "etc/",
                "etc/.wh.aaa-gone",
                "etc/.wh.zzz-gone",
                "etc/motd",
                "usr/",
                "usr/share/",
                "usr/share/doc/",
                "usr/share/doc/.wh.pkg",
                "var/",
                "var/cache/",
                "var/cache/app/",
                "var/cache/app/.wh.old",
                "var/cache/app/keep",
            ]
        );
        let marker = &entries[1];
        assert_eq!(
            (marker.kind, marker.size, marker.mode, marker.mtime),
            (EntryType::Regular, 0, 0, 0)
        );
    }

    #[test]
    fn mtimes_are_clamped_to_the_epoch_only_when_later() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "old", b"");
        write(root, "new", b"");
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(EPOCH - 5);
        std::fs::File::options()
            .write(true)
            .open(root.join("old"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let snap = snapshot(root, &Excludes::new()).unwrap();
        let changes = Changes::whole_tree(&snap);
        let clamped = list(&layer(root, &changes, Some(EPOCH)));
        assert_eq!(clamped[0].path, "new");
        assert_eq!(clamped[0].mtime, EPOCH);
        assert_eq!(clamped[1].mtime, EPOCH - 5);
        let kept = list(&layer(root, &changes, None));
        assert!(kept[0].mtime > EPOCH);
    }

    #[test]
    fn sockets_are_skipped_and_whiteout_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let _socket = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
        let snap = snapshot(root, &Excludes::new()).unwrap();
        let mut out = Vec::new();
        let summary = write_layer(
            root,
            &Changes::whole_tree(&snap),
            &LayerOptions::default(),
            &mut out,
        )
        .unwrap();
        assert_eq!(summary.skipped_sockets, [PathBuf::from("sock")]);
        assert_eq!(summary.entries, 0);

        write(root, ".wh.sneaky", b"");
        let snap = snapshot(root, &Excludes::new()).unwrap();
        let error = write_layer(
            root,
            &Changes::whole_tree(&snap),
            &LayerOptions::default(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(
            matches!(error, LayerError::NotRepresentable { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_diff_layer_holds_the_changes_and_their_parents() {
        if !privileged() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        rich_tree(root);
        let before = snapshot(root, &Excludes::new()).unwrap();
        write(root, "usr/lib/libx.so.1", b"new content, same inode");
        std::fs::remove_dir_all(root.join("usr/share/doc/pkg")).unwrap();
        let mut after = snapshot(root, &Excludes::new()).unwrap();
        let mut out = Vec::new();
        let summary = write_layer(
            root,
            &diff(&before, &mut after, &LayerOptions::default()).unwrap(),
            &LayerOptions::default(),
            &mut out,
        )
        .unwrap();
        let paths: Vec<String> = list(&out).into_iter().map(|e| e.path).collect();
        assert_eq!(
            paths,
            [
                "usr/",
                "usr/lib/",
                "usr/lib/libx.so.1",
                "usr/share/",
                "usr/share/doc/",
                "usr/share/doc/.wh.pkg"
            ]
        );
        assert_eq!((summary.entries, summary.whiteouts), (5, 1));
    }

    /// The bytes of a fixed tree are pinned: a change to the tar writer that changes layer
    /// digests must be deliberate (update the digest here and say so in the commit).
    #[test]
    fn the_layer_of_a_fixed_tree_has_a_pinned_digest() {
        if !privileged() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "etc/hosts", b"127.0.0.1 localhost\n");
        chmod(root, "etc/hosts", 0o644);
        chmod(root, "etc", 0o755);
        write(root, "usr/bin/tool", b"#!/bin/sh\n");
        chmod(root, "usr/bin/tool", 0o4755);
        chmod(root, "usr/bin", 0o755);
        chmod(root, "usr", 0o755);
        chown(root, "usr/bin/tool", 0, 50);
        std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/alias")).unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();
        xattr::set(root.join("etc/hosts"), "user.pinned", b"1").unwrap();
        let snap = snapshot(root, &Excludes::new()).unwrap();
        let bytes = layer(root, &Changes::whole_tree(&snap), Some(EPOCH));
        assert_eq!(
            crate::plan::hash::bytes_digest(&bytes),
            "sha256:2415c174d867746968b36551271611d7b75974b29cfef3d0521cfa315235d301"
        );
    }

    /// A small tree: files (with content and mode), symlinks and hard links, by path.
    #[derive(Debug, Clone)]
    enum Node {
        File(Vec<u8>, u32),
        Symlink(String),
        HardLinkTo(usize),
    }

    fn tree_strategy() -> impl Strategy<Value = Vec<(String, Node)>> {
        let node = prop_oneof![
            4 => (prop::collection::vec(any::<u8>(), 0..600), 0u32..0o7777)
                .prop_map(|(content, mode)| Node::File(content, mode)),
            1 => "[a-z./]{1,12}".prop_map(Node::Symlink),
            1 => (0usize..8).prop_map(Node::HardLinkTo),
        ];
        prop::collection::btree_map("(d[0-2]/){0,2}f[0-5]", node, 1..24)
            .prop_map(|map| map.into_iter().collect())
    }

    /// Creates `nodes` under `root` in the given order.
    fn create(root: &Path, nodes: &[(String, Node)], order: &[usize]) {
        for &i in order {
            let (path, node) = &nodes[i];
            let full = root.join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            match node {
                Node::File(content, mode) => {
                    write(root, path, content);
                    chmod(root, path, *mode);
                    chown(root, path, 1000 + *mode % 7, 2000);
                }
                Node::Symlink(target) => symlink(target, &full).unwrap(),
                Node::HardLinkTo(_) => {}
            }
        }
        // Hard links last, to a file wherever it is.
        for &i in order {
            if let (path, Node::HardLinkTo(n)) = &nodes[i] {
                let files: Vec<&String> = nodes
                    .iter()
                    .filter(|(_, node)| matches!(node, Node::File(..)))
                    .map(|(path, _)| path)
                    .collect();
                if !files.is_empty() {
                    let target = root.join(files[n % files.len()]);
                    std::fs::hard_link(target, root.join(path)).unwrap();
                }
            }
        }
    }

    /// Same tree → same bytes, whatever order it was created in (so whatever the inode numbers,
    /// directory order and times are). A proptest run by hand so that the root check and its
    /// skip message happen once.
    #[test]
    fn the_same_tree_gives_the_same_bytes() {
        if !privileged() {
            return;
        }
        let config = ProptestConfig {
            cases: 24,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let result = runner.run(&(tree_strategy(), any::<u64>()), |(nodes, seed)| {
            let forward: Vec<usize> = (0..nodes.len()).collect();
            let mut shuffled = forward.clone();
            shuffled.reverse();
            shuffled.rotate_left((seed as usize) % nodes.len().max(1));

            let mut layers = Vec::new();
            for order in [&forward, &shuffled] {
                let dir = tempfile::tempdir().unwrap();
                create(dir.path(), &nodes, order);
                let snap = snapshot(dir.path(), &Excludes::new()).unwrap();
                layers.push(layer(dir.path(), &Changes::whole_tree(&snap), Some(EPOCH)));
            }
            prop_assert!(
                layers[0] == layers[1],
                "creation order changed the layer bytes"
            );
            let hard_links = list(&layers[0])
                .iter()
                .filter(|e| e.kind == EntryType::Link)
                .count();
            let expected = nodes
                .iter()
                .filter(|(_, n)| matches!(n, Node::HardLinkTo(_)))
                .count();
            let any_file = nodes.iter().any(|(_, n)| matches!(n, Node::File(..)));
            prop_assert_eq!(hard_links, if any_file { expected } else { 0 });
            Ok(())
        });
        if let Err(error) = result {
            panic!("{error}");
        }
    }
}
