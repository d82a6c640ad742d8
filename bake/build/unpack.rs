//! Applying a layer (plain, gzip or zstd tar, told apart by magic bytes) onto a root directory
//! with OCI whiteout semantics (FORMATS.md A3), safely against hostile tars.
//!
//! Safety: every path is taken relative to the root, `..` components are refused, and parent
//! directories are opened with `openat2(RESOLVE_IN_ROOT)`, so a symlink met on the way
//! (`etc -> /host/etc`, `x -> ../../..`) resolves as if the root were `/`, the way a container
//! sees it, and can never lead outside. The last component is never followed: an existing entry
//! there is removed and replaced, files are created with `O_EXCL | O_NOFOLLOW`, and ownership,
//! modes, xattrs and times are set with `AT_SYMLINK_NOFOLLOW` (or on the open file). Hard link
//! targets resolve the same way, so they stay inside too. A missing parent directory is created
//! (0755, root-owned), as containerd does.
//!
//! Whiteouts: `.wh.<name>` removes `<name>` and `.wh..wh..opq` removes everything in its
//! directory, but only what came from below: entries this layer wrote are kept whatever the
//! order of the tar. Other `.wh..wh.*` names (aufs bookkeeping) are ignored.
//!
//! A failed unpack leaves the root half-written: unpack into a fresh directory and discard it
//! on error. Needs `/proc` (xattrs are set through `/proc/self/fd`) and root to preserve
//! ownership and create devices.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use oci_spec::image::{Digest, MediaType};
use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};
use tar::EntryType;

use super::compress::sha256_digest;
use super::layer::{OPAQUE_MARKER, WHITEOUT_PREFIX};

/// Magic bytes at the start of a gzip member (RFC 1952).
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];

/// Magic bytes at the start of a zstd frame (RFC 8878).
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Read and copy buffer: large enough that decompression and writing run in big steps.
const BUFFER: usize = 256 << 10;

/// `openat2(RESOLVE_IN_ROOT)` answers EAGAIN when a rename elsewhere raced with the lookup;
/// the kernel's advice is to retry. Nothing else renames inside a root being unpacked, so a few
/// attempts are plenty.
const RESOLVE_ATTEMPTS: usize = 8;

/// Names that are markers rather than whiteouts (aufs kept hard-link bookkeeping under
/// `.wh..wh.plnk`); ignored, as Docker and containerd do.
const META_PREFIX: &[u8] = b".wh..wh.";

/// What unpacking a layer did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unpacked {
    /// `sha256:` of the uncompressed tar: compare with the image config's `rootfs.diff_ids`.
    pub diff_id: Digest,
    /// The layer's format as found from its magic bytes: tar, tar+gzip or tar+zstd.
    pub media_type: MediaType,
    /// Entries written (files, directories, links, devices, fifos).
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Extended attributes the target file system refused as unsupported, by entry path.
    pub skipped_xattrs: Vec<(PathBuf, String)>,
}

/// A failure to unpack a layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("failed to open the unpack root `{}`", root.display())]
    Root {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read the layer")]
    Read(#[source] io::Error),
    #[error("layer entry `{}` is refused: {reason}", path.display())]
    Unsafe { path: PathBuf, reason: &'static str },
    #[error("failed to unpack layer entry `{}`", path.display())]
    Apply {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Unpacks the layer read from `blob` onto the directory `root`.
pub fn unpack_layer<R: Read>(blob: R, root: &Path) -> Result<Unpacked, UnpackError> {
    let root_fd = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::Root {
        root: root.to_path_buf(),
        source: e.into(),
    })?;
    let mut blob = BufReader::with_capacity(BUFFER, blob);
    let head = blob.fill_buf().map_err(UnpackError::Read)?;
    let (media_type, tar): (MediaType, Box<dyn Read>) = if head.starts_with(GZIP_MAGIC) {
        (
            MediaType::ImageLayerGzip,
            Box::new(flate2::bufread::MultiGzDecoder::new(blob)),
        )
    } else if head.starts_with(ZSTD_MAGIC) {
        let decoder = zstd::stream::read::Decoder::with_buffer(blob).map_err(UnpackError::Read)?;
        (MediaType::ImageLayerZstd, Box::new(decoder))
    } else {
        (MediaType::ImageLayer, Box::new(blob))
    };
    let mut tar = Hashing {
        inner: tar,
        hasher: Sha256::new(),
    };
    let mut unpacker = Unpacker {
        root: root_fd,
        created: HashSet::new(),
        dir_times: Vec::new(),
        summary: Summary::default(),
        buffer: vec![0u8; BUFFER],
    };
    {
        let mut archive = tar::Archive::new(&mut tar);
        for entry in archive.entries().map_err(UnpackError::Read)? {
            let mut entry = entry.map_err(UnpackError::Read)?;
            unpacker.entry(&mut entry)?;
        }
    }
    // The DiffID covers the whole stream, including the end-of-archive blocks and any padding
    // after them.
    io::copy(&mut tar, &mut io::sink()).map_err(UnpackError::Read)?;
    unpacker.finish()?;
    Ok(Unpacked {
        diff_id: sha256_digest(tar.hasher),
        media_type,
        entries: unpacker.summary.entries,
        whiteouts: unpacker.summary.whiteouts,
        skipped_xattrs: unpacker.summary.skipped_xattrs,
    })
}

struct Hashing<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[derive(Default)]
struct Summary {
    entries: u64,
    whiteouts: u64,
    skipped_xattrs: Vec<(PathBuf, String)>,
}

/// A normalized entry path: its components, none empty, `.` or `..`.
type Components = Vec<Vec<u8>>;

fn display(components: &[Vec<u8>]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&components.join(&b'/')))
}

/// Splits a path from the tar into components, refusing `..`. A leading `/` is dropped: the
/// path is inside the root whatever it says.
fn components(raw: &[u8]) -> Result<Components, UnpackError> {
    let mut out = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(UnpackError::Unsafe {
                    path: PathBuf::from(OsStr::from_bytes(raw)),
                    reason: "`..` components are not allowed",
                });
            }
            name => out.push(name.to_vec()),
        }
    }
    Ok(out)
}

/// Metadata to set on an unpacked entry.
struct Attributes {
    uid: Uid,
    gid: Gid,
    mode: Mode,
    mtime: Timespec,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Unpacker {
    root: OwnedFd,
    /// Paths this layer wrote, which its whiteouts must not remove.
    created: HashSet<Vec<u8>>,
    /// Directory mtimes, set at the end: writing inside a directory changes its mtime.
    dir_times: Vec<(Components, Timespec)>,
    summary: Summary,
    /// The copy buffer, reused for every file (a fresh one per file costs an mmap, munmap and
    /// page faults each time, for files that are mostly a few KiB).
    buffer: Vec<u8>,
}

impl Unpacker {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let path = components(&entry.path_bytes())?;
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader) {
            return Ok(());
        }
        // The root itself (`./`): its metadata belongs to whoever made the root.
        let Some((name, parent)) = path.split_last() else {
            return Ok(());
        };
        let shown = display(&path);
        if name.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(parent, name, &shown);
        }
        let attributes = attributes(entry, &shown)?;
        let dir = self
            .dir(parent, true, &shown)?
            .expect("created when missing");
        let apply = |source: io::Error| UnpackError::Apply {
            path: shown.clone(),
            source,
        };
        // A directory over a directory only takes the new metadata; anything else over an
        // existing entry replaces it (and a directory's whole subtree with it).
        let is_dir = kind == EntryType::Directory;
        let existing = lstat_at(dir.as_fd(), name).map_err(apply)?;
        let keep_dir = is_dir && existing == Some(FileType::Directory);
        if existing.is_some() && !keep_dir {
            remove_all(dir.as_fd(), name).map_err(apply)?;
        }
        let name_os = OsStr::from_bytes(name);
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let fd = rustix::fs::openat(
                    &dir,
                    name_os,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| apply(e.into()))?;
                let mut file = File::from(fd);
                copy(entry, &mut file, &mut self.buffer).map_err(apply)?;
            }
            EntryType::Directory => {
                if !keep_dir {
                    rustix::fs::mkdirat(&dir, name_os, Mode::from_raw_mode(0o700))
                        .map_err(|e| apply(e.into()))?;
                }
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| UnpackError::Unsafe {
                    path: shown.clone(),
                    reason: "a symlink without a target",
                })?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &dir, name_os)
                    .map_err(|e| apply(e.into()))?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| UnpackError::Unsafe {
                    path: shown.clone(),
                    reason: "a hard link without a target",
                })?;
                let target = components(&target)?;
                let Some((target_name, target_parent)) = target.split_last() else {
                    return Err(UnpackError::Unsafe {
                        path: shown,
                        reason: "a hard link to the root",
                    });
                };
                let target_dir = self
                    .dir(target_parent, false, &shown)?
                    .ok_or_else(|| apply(io::ErrorKind::NotFound.into()))?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
                rustix::fs::linkat(
                    &target_dir,
                    OsStr::from_bytes(target_name),
                    &dir,
                    name_os,
                    AtFlags::empty(),
                )
                .map_err(|e| apply(e.into()))?;
                // The inode's metadata is the target's: the link's header does not own it.
                self.created.insert(path.join(&b'/'));
                self.summary.entries += 1;
                return Ok(());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (file_type, dev) = match kind {
                    EntryType::Fifo => (FileType::Fifo, 0),
                    _ => {
                        let header = entry.header();
                        let number = |n: io::Result<Option<u32>>| {
                            n.map(|n| n.unwrap_or(0)).map_err(UnpackError::Read)
                        };
                        let major = number(header.device_major())?;
                        let minor = number(header.device_minor())?;
                        let file_type = if kind == EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (file_type, rustix::fs::makedev(major, minor))
                    }
                };
                rustix::fs::mknodat(&dir, name_os, file_type, Mode::from_raw_mode(0o600), dev)
                    .map_err(|e| apply(e.into()))?;
            }
            _ => {
                return Err(UnpackError::Unsafe {
                    path: shown,
                    reason: "an entry type that is not a file, directory, link, device or fifo",
                });
            }
        }
        self.set_attributes(dir.as_fd(), name, &shown, kind, &attributes)?;
        if is_dir {
            self.dir_times.push((path.clone(), attributes.mtime));
        }
        self.created.insert(path.join(&b'/'));
        self.summary.entries += 1;
        Ok(())
    }

    /// Owner, then mode (a chown clears setuid), then xattrs (a chown clears
    /// `security.capability`), then mtime.
    fn set_attributes(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        shown: &Path,
        kind: EntryType,
        attributes: &Attributes,
    ) -> Result<(), UnpackError> {
        let apply = |source: Errno| UnpackError::Apply {
            path: shown.to_path_buf(),
            source: source.into(),
        };
        let name_os = OsStr::from_bytes(name);
        rustix::fs::chownat(
            dir,
            name_os,
            Some(attributes.uid),
            Some(attributes.gid),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(apply)?;
        if kind != EntryType::Symlink {
            // Follows a symlink in the last component, but the entry was just created here
            // as something else, and nothing else writes in the root meanwhile.
            rustix::fs::chmodat(dir, name_os, attributes.mode, AtFlags::empty()).map_err(apply)?;
        }
        if !attributes.xattrs.is_empty() {
            // `/proc/self/fd/<dir>/<name>` reaches the entry through the directory already
            // opened safely, and `lsetxattr` does not follow the last component.
            let mut through =
                format!("/proc/self/fd/{}/", std::os::fd::AsRawFd::as_raw_fd(&dir)).into_bytes();
            through.extend_from_slice(name);
            let through = OsStr::from_bytes(&through);
            for (key, value) in &attributes.xattrs {
                let key = OsStr::from_bytes(key);
                match rustix::fs::lsetxattr(through, key, value, XattrFlags::empty()) {
                    Ok(()) => {}
                    Err(Errno::OPNOTSUPP) => self
                        .summary
                        .skipped_xattrs
                        .push((shown.to_path_buf(), key.to_string_lossy().into_owned())),
                    Err(error) => return Err(apply(error)),
                }
            }
        }
        if kind != EntryType::Directory {
            set_mtime(dir, name, attributes.mtime).map_err(apply)?;
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        parent: &[Vec<u8>],
        name: &[u8],
        shown: &Path,
    ) -> Result<(), UnpackError> {
        let apply = |source: io::Error| UnpackError::Apply {
            path: shown.to_path_buf(),
            source,
        };
        if name == OPAQUE_MARKER.as_bytes() {
            if let Some(dir) = self.dir(parent, false, shown)? {
                let prefix = parent.join(&b'/');
                self.clear_lower(dir.as_fd(), &prefix).map_err(apply)?;
            }
            self.summary.whiteouts += 1;
            return Ok(());
        }
        if name.starts_with(META_PREFIX) {
            return Ok(());
        }
        let target = &name[WHITEOUT_PREFIX.len()..];
        if target.is_empty() || target == b"." || target == b".." {
            return Err(UnpackError::Unsafe {
                path: shown.to_path_buf(),
                reason: "a whiteout must name an entry",
            });
        }
        let mut target_path = parent.to_vec();
        target_path.push(target.to_vec());
        // Whiteouts hide lower layers only, never this layer's own entries.
        if !self.created.contains(&target_path.join(&b'/'))
            && let Some(dir) = self.dir(parent, false, shown)?
        {
            remove_all(dir.as_fd(), target).map_err(apply)?;
        }
        self.summary.whiteouts += 1;
        Ok(())
    }

    /// Removes what is inside `dir` (at `prefix`) and did not come from this layer, descending
    /// into this layer's directories, whose lower content is hidden too.
    fn clear_lower(&self, dir: BorrowedFd<'_>, prefix: &[u8]) -> io::Result<()> {
        for name in list_dir(dir)? {
            let mut path = prefix.to_vec();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            if !self.created.contains(&path) {
                remove_all(dir, &name)?;
            } else if lstat_at(dir, &name)? == Some(FileType::Directory) {
                let child = rustix::fs::openat(
                    dir,
                    OsStr::from_bytes(&name),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                self.clear_lower(child.as_fd(), &path)?;
            }
        }
        Ok(())
    }

    /// Opens the directory at `components` inside the root, resolving symlinks as if the root
    /// were `/`. Missing directories are created when `create` is set; otherwise a missing
    /// directory gives `None`.
    fn dir(
        &self,
        components: &[Vec<u8>],
        create: bool,
        shown: &Path,
    ) -> Result<Option<OwnedFd>, UnpackError> {
        let apply = |source: Errno| UnpackError::Apply {
            path: shown.to_path_buf(),
            source: source.into(),
        };
        match self.open_in_root(components) {
            Ok(fd) => return Ok(Some(fd)),
            Err(Errno::NOENT) => {}
            Err(Errno::NOTDIR) if !create => return Ok(None),
            Err(error) => return Err(apply(error)),
        }
        if !create {
            return Ok(None);
        }
        // Create what is missing, one component at a time, each inside the last directory
        // that resolved (which is inside the root).
        let mut parent = self.open_in_root(&[]).map_err(apply)?;
        for depth in 1..=components.len() {
            parent = match self.open_in_root(&components[..depth]) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    let name = OsStr::from_bytes(&components[depth - 1]);
                    rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755))
                        .map_err(apply)?;
                    // mkdir applies the umask; the mode of an invented parent is fixed.
                    rustix::fs::chmodat(
                        &parent,
                        name,
                        Mode::from_raw_mode(0o755),
                        AtFlags::empty(),
                    )
                    .map_err(apply)?;
                    self.open_in_root(&components[..depth]).map_err(apply)?
                }
                Err(error) => return Err(apply(error)),
            };
        }
        Ok(Some(parent))
    }

    fn open_in_root(&self, components: &[Vec<u8>]) -> Result<OwnedFd, Errno> {
        let path = if components.is_empty() {
            b".".to_vec()
        } else {
            components.join(&b'/')
        };
        let mut attempts = 0;
        loop {
            match rustix::fs::openat2(
                &self.root,
                OsStr::from_bytes(&path),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(Errno::AGAIN) if attempts < RESOLVE_ATTEMPTS => attempts += 1,
                result => return result,
            }
        }
    }

    /// Sets directory mtimes, now that nothing more is written inside them.
    fn finish(&mut self) -> Result<(), UnpackError> {
        for (path, mtime) in std::mem::take(&mut self.dir_times) {
            let (name, parent) = path.split_last().expect("directories have a name");
            let shown = display(&path);
            // A later whiteout may have removed it.
            let Some(dir) = self.dir(parent, false, &shown)? else {
                continue;
            };
            match set_mtime(dir.as_fd(), name, mtime) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(error) => {
                    return Err(UnpackError::Apply {
                        path: shown,
                        source: error.into(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The metadata of a tar entry, with ids checked and the PAX mtime (which may carry
/// nanoseconds) preferred to the header's.
fn attributes<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    shown: &Path,
) -> Result<Attributes, UnpackError> {
    let header = entry.header();
    let id = |n: io::Result<u64>| -> Result<u32, UnpackError> {
        let n = n.map_err(UnpackError::Read)?;
        // -1 means "unchanged" to chown, not an id.
        u32::try_from(n)
            .ok()
            .filter(|n| *n != u32::MAX)
            .ok_or_else(|| UnpackError::Unsafe {
                path: shown.to_path_buf(),
                reason: "a uid or gid out of range",
            })
    };
    let uid = Uid::from_raw(id(header.uid())?);
    let gid = Gid::from_raw(id(header.gid())?);
    let mode = Mode::from_raw_mode(header.mode().map_err(UnpackError::Read)? & 0o7777);
    let seconds = header.mtime().map_err(UnpackError::Read)?;
    let mut mtime = Timespec {
        tv_sec: i64::try_from(seconds).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions().map_err(UnpackError::Read)? {
        for extension in extensions {
            let extension = extension.map_err(UnpackError::Read)?;
            let key = extension.key_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push((name.to_vec(), extension.value_bytes().to_vec()));
            } else if key == b"mtime"
                && let Some(time) = pax_time(extension.value_bytes())
            {
                mtime = time;
            }
        }
    }
    Ok(Attributes {
        uid,
        gid,
        mode,
        mtime,
        xattrs,
    })
}

/// A PAX time: decimal seconds with an optional fraction (`1700000000.123456789`).
fn pax_time(value: &[u8]) -> Option<Timespec> {
    let value = std::str::from_utf8(value).ok()?;
    let (seconds, fraction) = value.split_once('.').unwrap_or((value, ""));
    let seconds: i64 = seconds.parse().ok()?;
    if seconds < 0 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = fraction
        .chars()
        .chain("000000000".chars())
        .take(9)
        .collect();
    Some(Timespec {
        tv_sec: seconds,
        tv_nsec: digits.parse().ok()?,
    })
}

fn set_mtime(dir: BorrowedFd<'_>, name: &[u8], mtime: Timespec) -> Result<(), Errno> {
    let times = Timestamps {
        last_access: mtime,
        last_modification: mtime,
    };
    rustix::fs::utimensat(
        dir,
        OsStr::from_bytes(name),
        &times,
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

/// The type of `name` in `dir` without following it, or `None` if there is nothing.
fn lstat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(FileType::from_raw_mode(stat.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// The names in `dir`, as bytes.
fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    use std::os::unix::ffi::OsStringExt;
    Ok(crate::store::trash::list_dir(dir)?
        .into_iter()
        .map(OsStringExt::into_vec)
        .collect())
}

/// Removes `name` from `dir`, with everything below it if it is a directory, never following
/// a symlink.
fn remove_all(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let name_os = OsStr::from_bytes(name);
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            let child = rustix::fs::openat(
                dir,
                name_os,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            for grandchild in list_dir(child.as_fd())? {
                remove_all(child.as_fd(), &grandchild)?;
            }
            Ok(rustix::fs::unlinkat(dir, name_os, AtFlags::REMOVEDIR)?)
        }
        Some(_) => Ok(rustix::fs::unlinkat(dir, name_os, AtFlags::empty())?),
    }
}

/// Copies an entry's content through `buffer`.
fn copy(from: &mut impl Read, to: &mut File, buffer: &mut [u8]) -> io::Result<()> {
    loop {
        let n = match from.read(buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        to.write_all(&buffer[..n])?;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};
    use std::num::NonZeroUsize;
    use std::os::unix::fs::{MetadataExt, symlink};

    use rustix::fs::FileType as Kind;

    use super::*;
    use crate::build::compress::BlobWriter;
    use crate::build::layer::{LayerOptions, write_layer};
    use crate::build::snapshot::{Changes, EntryKind, Excludes, diff, snapshot};
    use crate::build::testing::{chmod, chown, mknod, privileged, rich_tree, write};
    use crate::recipe::Compression;

    /// Everything that must survive a round trip, per path: the snapshot minus times of
    /// directories, inodes, link counts and device ids, plus file content and which paths share
    /// an inode.
    type Normalized = BTreeMap<PathBuf, String>;

    fn normalized(root: &Path) -> Normalized {
        let snap = snapshot(root, &Excludes::new()).unwrap();
        let mut first_path: HashMap<u64, PathBuf> = HashMap::new();
        snap.entries
            .iter()
            .map(|(path, meta)| {
                let content = match meta.kind {
                    EntryKind::File => crate::plan::hash::file_digest(&root.join(path)).unwrap(),
                    _ => String::new(),
                };
                let group = match meta.kind {
                    EntryKind::Dir => path.clone(),
                    _ => first_path.entry(meta.ino).or_insert(path.clone()).clone(),
                };
                // Directory mtimes are kept too, but a directory that the layer does not
                // mention gets a new one when its content changes underneath.
                let mtime = match meta.kind {
                    EntryKind::Dir => 0,
                    _ => meta.mtime_ns / 1_000_000_000,
                };
                let line = format!(
                    "{:?} {:o} {}:{} size={} target={:?} rdev={} xattrs={:?} mtime={} {} link={}",
                    meta.kind,
                    meta.mode,
                    meta.uid,
                    meta.gid,
                    if meta.kind == EntryKind::Dir {
                        0
                    } else {
                        meta.size
                    },
                    meta.link_target,
                    meta.rdev,
                    meta.xattrs,
                    mtime,
                    content,
                    group.display(),
                );
                (path.clone(), line)
            })
            .collect()
    }

    fn assert_same_tree(actual: &Path, expected: &Path) {
        let actual = normalized(actual);
        let expected = normalized(expected);
        for (path, line) in &expected {
            assert_eq!(actual.get(path), Some(line), "`{}` differs", path.display());
        }
        let extra: Vec<_> = actual
            .keys()
            .filter(|p| !expected.contains_key(*p))
            .collect();
        assert!(extra.is_empty(), "unexpected entries: {extra:?}");
    }

    fn compressed_layer(root: &Path, changes: &Changes, compression: Compression) -> Vec<u8> {
        let workers = NonZeroUsize::new(2).unwrap();
        let mut blob = BlobWriter::new(Vec::new(), compression, workers).unwrap();
        write_layer(root, changes, &LayerOptions::default(), &mut blob).unwrap();
        blob.finish().unwrap().0
    }

    #[test]
    fn a_whole_tree_layer_unpacks_to_the_same_tree() {
        if !privileged() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (dir.path().join("source"), dir.path().join("target"));
        std::fs::create_dir_all(&target).unwrap();
        rich_tree(&source);
        let snap = snapshot(&source, &Excludes::new()).unwrap();
        let blob = compressed_layer(&source, &Changes::whole_tree(&snap), Compression::Zstd(3));
        let unpacked = unpack_layer(&blob[..], &target).unwrap();
        assert_eq!(unpacked.media_type, MediaType::ImageLayerZstd);
        assert_eq!(unpacked.entries, snap.entries.len() as u64);
        assert_same_tree(&target, &source);
    }

    /// A layer from another producer: GNU tar's POSIX format, with `./` prefixes, PAX times
    /// with nanoseconds, atime and ctime records, and its own hard link and xattr encoding.
    #[test]
    fn a_gnu_tar_archive_unpacks_to_the_same_tree() {
        if !privileged() || !crate::skip::tool("tar") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (source, target) = (dir.path().join("source"), dir.path().join("target"));
        std::fs::create_dir_all(&target).unwrap();
        rich_tree(&source);
        let output = std::process::Command::new("tar")
            .args([
                "--format=posix",
                "--xattrs",
                "--numeric-owner",
                "-cf",
                "-",
                "-C",
            ])
            .arg(&source)
            .arg(".")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let unpacked = unpack_layer(&output.stdout[..], &target).unwrap();
        assert_eq!(unpacked.media_type, MediaType::ImageLayer);
        assert_same_tree(&target, &source);
    }

    /// The round trip the builder relies on: snapshot, change, diff, layer, and unpacking that
    /// layer onto the old tree gives the new one.
    #[test]
    fn a_diff_layer_applied_to_the_before_tree_gives_the_after_tree() {
        if !privileged() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (work, lower) = (dir.path().join("work"), dir.path().join("lower"));
        std::fs::create_dir_all(&lower).unwrap();
        rich_tree(&work);
        let mut before = snapshot(&work, &Excludes::new()).unwrap();
        before.hash_files().unwrap();
        let base = compressed_layer(&work, &Changes::whole_tree(&before), Compression::Gzip(6));
        unpack_layer(&base[..], &lower).unwrap();

        // Add, change, delete a file and a directory, replace a directory, change types.
        write(&work, "etc/new.conf", b"added\n");
        write(&work, "etc/motd", b"changed and longer\n");
        chmod(&work, "etc/passwd", 0o600);
        chown(&work, "srv", 0, 0);
        std::fs::remove_file(work.join("usr/lib/libx.so")).unwrap();
        std::fs::remove_dir_all(work.join("usr/share/doc/pkg")).unwrap();
        std::fs::rename(work.join("var/cache/app"), work.join("var/app.old")).unwrap();
        write(&work, "var/cache/app/fresh", b"new dir, new content\n");
        std::fs::remove_dir_all(work.join("var/app.old")).unwrap();
        std::fs::remove_dir_all(work.join("home/user")).unwrap();
        symlink("/srv", work.join("home/user")).unwrap();
        std::fs::remove_file(work.join("etc/shadow")).unwrap();
        std::fs::create_dir(work.join("etc/shadow")).unwrap();
        std::fs::hard_link(work.join("etc/passwd"), work.join("etc/passwd.link")).unwrap();
        xattr::set(work.join("var/lib/attr"), "user.second", b"2").unwrap();
        mknod(&work, "run/second-fifo", Kind::Fifo, 0, 0);
        write(&work, "usr/bin/tool", b"setgid tool");
        chmod(&work, "usr/bin/tool", 0o2711);

        let mut after = snapshot(&work, &Excludes::new()).unwrap();
        let changes = diff(&before, &mut after, &Default::default()).unwrap();
        // The directory made again lost `var/cache/app/keep`: a whiteout, like the others.
        assert!(changes.deleted.contains(Path::new("var/cache/app/keep")));
        let layer = compressed_layer(&work, &changes, Compression::Gzip(6));
        let unpacked = unpack_layer(&layer[..], &lower).unwrap();
        assert_eq!(unpacked.media_type, MediaType::ImageLayerGzip);
        assert!(unpacked.whiteouts >= 3, "{unpacked:?}");
        assert_same_tree(&lower, &work);
    }

    /// One entry of a hand-made tar; paths and targets are written byte for byte, bypassing
    /// the checks a well-behaved writer makes.
    enum Craft<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
    }

    fn crafted(entries: &[Craft<'_>]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in entries {
            let mut header = tar::Header::new_gnu();
            let (path, kind, target, data): (&str, _, &str, &[u8]) = match entry {
                Craft::File(path, data) => (path, EntryType::Regular, "", data),
                Craft::Dir(path) => (path, EntryType::Directory, "", b""),
                Craft::Symlink(path, target) => (path, EntryType::Symlink, target, b""),
                Craft::HardLink(path, target) => (path, EntryType::Link, target, b""),
            };
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
            header.set_entry_type(kind);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_000_000_000);
            header.set_size(data.len() as u64);
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    /// A root to unpack into and, beside it, a directory with a file that nothing may touch.
    struct Arena {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    impl Arena {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            let outside = dir.path().join("outside");
            std::fs::create_dir_all(&root).unwrap();
            write(&outside, "secret", b"secret\n");
            Self {
                _dir: dir,
                root,
                outside,
            }
        }

        /// The outside directory as an absolute path without its leading `/`.
        fn outside_str(&self) -> String {
            self.outside.to_str().unwrap().to_string()
        }

        fn unpack(&self, entries: &[Craft<'_>]) -> Result<Unpacked, UnpackError> {
            unpack_layer(&crafted(entries)[..], &self.root)
        }

        fn assert_outside_untouched(&self) {
            let names: Vec<_> = std::fs::read_dir(&self.outside)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["secret"], "something was written outside the root");
            let secret = self.outside.join("secret");
            assert_eq!(std::fs::read(&secret).unwrap(), b"secret\n");
            assert_eq!(std::fs::metadata(&secret).unwrap().nlink(), 1);
        }
    }

    #[test]
    fn parent_components_are_refused() {
        if !privileged() {
            return;
        }
        let arena = Arena::new();
        let error = arena
            .unpack(&[Craft::File("../outside/pwned", b"x")])
            .unwrap_err();
        assert!(matches!(error, UnpackError::Unsafe { .. }), "{error}");
        let error = arena
            .unpack(&[Craft::File("a/../../outside/pwned", b"x")])
            .unwrap_err();
        assert!(matches!(error, UnpackError::Unsafe { .. }), "{error}");
        arena.assert_outside_untouched();
    }

    #[test]
    fn absolute_paths_land_inside_the_root() {
        if !privileged() {
            return;
        }
        let arena = Arena::new();
        let path = format!("{}/pwned", arena.outside_str());
        arena.unpack(&[Craft::File(&path, b"x")]).unwrap();
        let inside = arena.root.join(path.trim_start_matches('/'));
        assert_eq!(std::fs::read(inside).unwrap(), b"x");
        arena.assert_outside_untouched();
    }

    #[test]
    fn a_symlinked_parent_never_leads_outside() {
        if !privileged() {
            return;
        }
        let arena = Arena::new();
        let outside = arena.outside_str();
        // Absolute symlink to the outside directory, then a file through it: resolved inside
        // the root, where that directory does not exist, so the entry fails.
        let result = arena.unpack(&[
            Craft::Symlink("etc", &outside),
            Craft::File("etc/pwned", b"x"),
        ]);
        assert!(result.is_err());
        arena.assert_outside_untouched();

        // Relative symlink climbing above the root: `..` stops at the root, as in a container.
        let climb = format!("../../../../../../../..{outside}");
        arena
            .unpack(&[
                Craft::Symlink("up", "../../../../../.."),
                Craft::File("up/pwned", b"x"),
            ])
            .unwrap();
        assert_eq!(std::fs::read(arena.root.join("pwned")).unwrap(), b"x");
        let result = arena.unpack(&[
            Craft::Symlink("climb", &climb),
            Craft::File("climb/pwned", b"x"),
        ]);
        assert!(result.is_err());
        arena.assert_outside_untouched();

        // The same in two layers: the symlink is already in the root when the file comes.
        arena.unpack(&[Craft::Symlink("lib", &outside)]).unwrap();
        assert!(arena.unpack(&[Craft::File("lib/pwned", b"x")]).is_err());
        arena.assert_outside_untouched();

        // Once the resolved directory exists inside the root, the file lands there.
        std::fs::create_dir_all(arena.root.join(outside.trim_start_matches('/'))).unwrap();
        arena.unpack(&[Craft::File("lib/pwned", b"x")]).unwrap();
        let landed = arena
            .root
            .join(outside.trim_start_matches('/'))
            .join("pwned");
        assert_eq!(std::fs::read(landed).unwrap(), b"x");
        arena.assert_outside_untouched();
    }

    #[test]
    fn hard_links_cannot_reach_outside() {
        if !privileged() {
            return;
        }
        let arena = Arena::new();
        let outside = arena.outside_str();
        let absolute = format!("{outside}/secret");
        let error = arena
            .unpack(&[Craft::HardLink("stolen", "../outside/secret")])
            .unwrap_err();
        assert!(matches!(error, UnpackError::Unsafe { .. }), "{error}");
        assert!(
            arena
                .unpack(&[Craft::HardLink("stolen", &absolute)])
                .is_err()
        );
        assert!(
            arena
                .unpack(&[
                    Craft::Symlink("o", &outside),
                    Craft::HardLink("stolen", "o/secret")
                ])
                .is_err()
        );
        assert!(!arena.root.join("stolen").exists());
        arena.assert_outside_untouched();

        // Inside the root, hard links work, and a link to a symlink links the symlink.
        arena
            .unpack(&[
                Craft::File("a", b"content"),
                Craft::HardLink("b", "a"),
                Craft::HardLink("o2", "o"),
            ])
            .unwrap();
        assert_eq!(std::fs::metadata(arena.root.join("b")).unwrap().nlink(), 2);
        assert!(
            std::fs::symlink_metadata(arena.root.join("o2"))
                .unwrap()
                .is_symlink()
        );
        arena.assert_outside_untouched();
    }

    #[test]
    fn whiteouts_cannot_delete_outside() {
        if !privileged() {
            return;
        }
        let arena = Arena::new();
        let outside = arena.outside_str();
        let absolute_whiteout = format!("{outside}/.wh.secret");
        arena
            .unpack(&[
                Craft::Symlink("o", &outside),
                Craft::File("o/.wh.secret", b""),
                Craft::File("o/.wh..wh..opq", b""),
                Craft::File(&absolute_whiteout, b""),
            ])
            .unwrap();
        assert!(
            arena
                .unpack(&[Craft::File("../outside/.wh.secret", b"")])
                .is_err()
        );
        assert!(arena.unpack(&[Craft::File(".wh.", b"")]).is_err());
        assert!(arena.unpack(&[Craft::File("d/.wh...", b"")]).is_err());
        arena.assert_outside_untouched();
    }

    #[test]
    fn an_entry_over_a_symlink_replaces_the_symlink() {
        if !privileged() {
            return;
        }
        let arena = Arena::new();
        let secret = format!("{}/secret", arena.outside_str());
        arena
            .unpack(&[
                Craft::Symlink("passwd", &secret),
                Craft::Symlink("d", &arena.outside_str()),
            ])
            .unwrap();
        arena
            .unpack(&[
                Craft::File("passwd", b"mine"),
                Craft::Dir("d/"),
                Craft::File("d/x", b"inside"),
            ])
            .unwrap();
        assert_eq!(std::fs::read(arena.root.join("passwd")).unwrap(), b"mine");
        assert!(
            std::fs::symlink_metadata(arena.root.join("d"))
                .unwrap()
                .is_dir()
        );
        assert_eq!(std::fs::read(arena.root.join("d/x")).unwrap(), b"inside");
        arena.assert_outside_untouched();
    }

    #[test]
    fn whiteouts_hide_lower_entries_but_never_this_layers_own() {
        if !privileged() {
            return;
        }
        let arena = Arena::new();
        arena
            .unpack(&[
                Craft::File("a/x", b"x"),
                Craft::File("a/y", b"y"),
                Craft::File("b/old", b"old"),
                Craft::File("b/sub/deep", b"deep"),
                Craft::File("c/gone", b"gone"),
            ])
            .unwrap();
        // An out-of-order producer: the opaque marker after the directory's new entries, and a
        // whiteout for an entry the same layer wrote.
        let unpacked = arena
            .unpack(&[
                Craft::File("a/.wh.x", b""),
                Craft::Dir("b/"),
                Craft::File("b/new", b"new"),
                Craft::Dir("b/sub/"),
                Craft::File("b/.wh..wh..opq", b""),
                Craft::File("c/kept", b"kept"),
                Craft::File("c/.wh.kept", b""),
                Craft::File("c/.wh.gone", b""),
                Craft::File(".wh.nonexistent", b""),
                Craft::File("c/.wh..wh.plnk", b""),
            ])
            .unwrap();
        assert_eq!(unpacked.whiteouts, 5);
        let list = |dir: &str| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(arena.root.join(dir))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        assert_eq!(list("a"), ["y"]);
        assert_eq!(list("b"), ["new", "sub"]);
        assert!(list("b/sub").is_empty());
        assert_eq!(list("c"), ["kept"]);
    }

    #[test]
    fn the_format_is_detected_and_the_diff_id_covers_the_tar() {
        if !privileged() {
            return;
        }
        let tar = crafted(&[Craft::File("hello", b"world")]);
        let diff_id = crate::plan::hash::bytes_digest(&tar);
        let workers = NonZeroUsize::new(1).unwrap();
        for (compression, media_type) in [
            (None, MediaType::ImageLayer),
            (Some(Compression::Gzip(6)), MediaType::ImageLayerGzip),
            (Some(Compression::Zstd(3)), MediaType::ImageLayerZstd),
        ] {
            let blob = match compression {
                None => tar.clone(),
                Some(compression) => {
                    let mut writer = BlobWriter::new(Vec::new(), compression, workers).unwrap();
                    writer.write_all(&tar).unwrap();
                    writer.finish().unwrap().0
                }
            };
            let dir = tempfile::tempdir().unwrap();
            let unpacked = unpack_layer(&blob[..], dir.path()).unwrap();
            assert_eq!(unpacked.media_type, media_type);
            assert_eq!(unpacked.diff_id.to_string(), diff_id);
            assert_eq!(std::fs::read(dir.path().join("hello")).unwrap(), b"world");
        }
    }

    #[test]
    fn pax_times_keep_their_fraction() {
        let time = pax_time(b"1700000000.5").unwrap();
        assert_eq!((time.tv_sec, time.tv_nsec), (1_700_000_000, 500_000_000));
        assert!(pax_time(b"-1").is_none());
        assert!(pax_time(b"12.x").is_none());
    }
}
