//! bake's local content-addressed store: an OCI image layout (blobs under `blobs/sha256/`,
//! `index.json` naming the images it holds) plus build records keyed by version and caches of
//! intermediate results.
//!
//! ```text
//! .bake/
//!   oci-layout              {"imageLayoutVersion": "1.0.0"}
//!   index.json              one entry per built image, annotated with its recipe and version
//!   blobs/sha256/<hex>      layers, configs, manifests
//!   records/<hex>.json      the build record of version sha256:<hex>
//!   cache/<kind>/<hex>.json small pointers: step results, bootstrapped bases
//!   disks/<recipe>/<hex>.raw the disk image of a recipe's latest uploaded AMI version, which
//!                           the next version's upload compares itself with
//!   tmp/                    staging for atomic writes (same file system as the blobs)
//!   work/                   build roots of running builds
//!   trash/                  finished build roots and scratch files, waiting to be deleted
//! ```
//!
//! Every write is atomic (temp file in `tmp/`, fsync, rename, fsync of the directory), and a
//! blob is stored under a digest only after that digest was computed over the bytes written.
//!
//! Deleting a build root (tens of thousands of files, hundreds of MB) takes seconds on a file
//! system mounted with `discard`, so a build does not wait for it: [`Store::discard`] renames the
//! root into `trash/` (one atomic rename on the same file system), and the next build that has
//! work to do empties `trash/` on a background thread ([`Store::reap_trash_in_background`]) while
//! it runs. Nothing in the store ever points into `trash/`, so a half-deleted entry (the process
//! exited mid-way) is harmless and is finished by a later reap. Only entries of `work/` and
//! `tmp/` can be discarded, and the reap deletes inside `trash/` only: it follows no symlink and
//! enters no mount (`trash.rs`).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, MediaType};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};

pub mod record;
pub(crate) mod trash;

pub use record::{
    Artifact, BuildRecord, DiskAmi, ImageBuilderAmi, ImageBuilderContainer, InstanceAmi, OciImage,
};

/// The annotation bake puts on each index entry: the version it is the image of.
pub const ANNOTATION_VERSION: &str = "dev.bake.version";
/// The annotation naming the recipe an index entry was built from.
pub const ANNOTATION_RECIPE: &str = "dev.bake.recipe";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to access the store at `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` is not a valid store file", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("blob {digest} is not in the store")]
    MissingBlob { digest: String },
    #[error("blob {expected} has the wrong content: its digest is {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("`{0}` is not a sha256 digest")]
    BadDigest(String),
    #[error(
        "build record `{}` has format `{format}`, which this bake does not read",
        path.display()
    )]
    RecordFormat { path: PathBuf, format: String },
    #[error(
        "refusing to discard `{}`: only entries of the store's `work/` and `tmp/` are thrown away",
        path.display()
    )]
    NotDiscardable { path: PathBuf },
}

/// How much a [`Writeback`] lets pile up before it starts writing it to disk.
const WRITEBACK_WINDOW: u64 = 8 << 20;

/// A large blob being written into a temp file, handed to the disk as it goes: each full
/// [`WRITEBACK_WINDOW`] is submitted for writeback at once (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`, which starts the I/O without waiting for it), so the disk writes
/// while the rest is still being produced and the fsync of [`Store::commit_blob`] only waits for
/// the tail. What it writes is exactly what it is given; durability still comes from that fsync.
pub struct Writeback<W: Write + std::os::fd::AsFd> {
    inner: W,
    written: u64,
    submitted: u64,
}

impl<W: Write + std::os::fd::AsFd> Writeback<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            written: 0,
            submitted: 0,
        }
    }

    fn submit(&mut self) {
        use std::os::fd::AsRawFd as _;
        let length = self.written - self.submitted;
        // SAFETY: a plain syscall on a descriptor this writer holds open. A failure (a file
        // system without support) only loses the head start; fsync still makes it durable.
        unsafe {
            libc::sync_file_range(
                self.inner.as_fd().as_raw_fd(),
                self.submitted as libc::off64_t,
                length as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.submitted = self.written;
    }
}

impl<W: Write + std::os::fd::AsFd> Write for Writeback<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        if self.written - self.submitted >= WRITEBACK_WINDOW {
            self.submit();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The store's directory of things to delete (see the module documentation).
const TRASH: &str = "trash";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A handle on a store directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens the store at `root`, creating an empty layout if there is none.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        for dir in ["blobs/sha256", "records", "cache", "tmp", "work", TRASH] {
            fs_err::create_dir_all(root.join(dir)).map_err(io(root))?;
        }
        // Absolute, so that paths made under it (tempfile makes its directories absolute)
        // are recognised as the store's whatever the working directory was called.
        let store = Store {
            root: std::path::absolute(root).map_err(io(root))?,
        };
        let layout = root.join("oci-layout");
        if !layout.exists() {
            store.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !root.join("index.json").exists() {
            store.write_index(&empty_index())?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh private directory for a running build (removed by the caller, or by `bake gc`).
    pub fn work_dir(&self, label: &str) -> Result<tempfile::TempDir, StoreError> {
        let base = self.root.join("work");
        tempfile::Builder::new()
            .prefix(&format!("{label}-"))
            .tempdir_in(&base)
            .map_err(io(&base))
    }

    /// Takes `path` (an entry of the store's `work/` or `tmp/`; anything else is refused) out
    /// of the way at the cost of one rename: it moves into `trash/`, to be deleted by a later
    /// [`Store::reap_trash`]. Falls back to deleting it now if it cannot be moved (another file
    /// system, no `trash/`). A missing `path` is not an error.
    pub fn discard(&self, path: &Path) -> Result<(), StoreError> {
        let Some(name) = path.file_name().filter(|_| self.discardable(path)) else {
            return Err(StoreError::NotDiscardable {
                path: path.to_path_buf(),
            });
        };
        let trash = self.root.join(TRASH);
        // Only into the store's own directory: a `trash` that became a symlink would carry the
        // entry out of the store (and the reap does not follow it).
        let real_dir = fs_err::symlink_metadata(&trash).is_ok_and(|m| m.is_dir());
        // A fresh directory per entry keeps names unique without guessing.
        let slot = real_dir
            .then(|| {
                tempfile::Builder::new()
                    .prefix(&format!("{}-", name.to_string_lossy()))
                    .tempdir_in(&trash)
                    .ok()
            })
            .flatten();
        let Some(slot) = slot.map(tempfile::TempDir::keep) else {
            return trash::remove_all(path).map_err(io(path));
        };
        if std::fs::rename(path, slot.join(name)).is_ok() {
            return Ok(());
        }
        // Not moved: `path` is gone, or on another file system, or a reap in another process
        // emptied the trash between making the slot and the rename. Deleted here instead.
        let _ = std::fs::remove_dir(&slot);
        trash::remove_all(path).map_err(io(path))
    }

    /// Whether `path` names an entry below the store's `work/` or `tmp/`, spelled without `..`.
    fn discardable(&self, path: &Path) -> bool {
        let Ok(inside) = path.strip_prefix(&self.root) else {
            return false;
        };
        let parts: Vec<Component<'_>> = inside.components().collect();
        parts.len() >= 2
            && matches!(parts[0], Component::Normal(top) if top == "work" || top == "tmp")
            && parts.iter().all(|c| matches!(c, Component::Normal(_)))
    }

    /// Deletes everything in `trash/`, and nothing outside it: no symlink is followed, no
    /// mount entered, and a `trash` that is not a real directory is left alone. Entries another
    /// process deletes at the same time are skipped; what cannot be deleted is left for the
    /// next reap and reported in the debug log.
    pub fn reap_trash(&self) {
        let trash = self.root.join(TRASH);
        match trash::empty(&trash) {
            Ok(left) => {
                for (name, e) in left {
                    tracing::debug!("left `{}` in the trash: {e}", trash.join(name).display());
                }
            }
            Err(e) => tracing::debug!("could not empty `{}`: {e}", trash.display()),
        }
    }

    /// [`Store::reap_trash`] on a background thread, at the lowest I/O and CPU priority so it
    /// takes nothing from the build it runs beside. The thread is detached: if the process
    /// ends first, the rest waits for the next reap.
    pub fn reap_trash_in_background(&self) -> std::thread::JoinHandle<()> {
        let store = self.clone();
        std::thread::spawn(move || {
            trash::lower_priority();
            store.reap_trash();
        })
    }

    /// A temp file on the store's file system, for [`Store::commit_blob`].
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, StoreError> {
        let dir = self.root.join("tmp");
        tempfile::NamedTempFile::new_in(&dir).map_err(io(&dir))
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = digest_hex(digest)?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).is_ok_and(|p| p.is_file())
    }

    /// Moves a fully written temp file into the store as blob `digest` (computed by the writer
    /// over exactly the bytes it wrote).
    pub fn commit_blob(
        &self,
        file: tempfile::NamedTempFile,
        digest: &str,
    ) -> Result<PathBuf, StoreError> {
        let path = self.blob_path(digest)?;
        file.as_file().sync_all().map_err(io(file.path()))?;
        if path.exists() {
            // Same digest, same bytes: keep the one already there.
            return Ok(path);
        }
        file.persist(&path).map_err(|e| StoreError::Io {
            path: path.clone(),
            source: e.error,
        })?;
        sync_dir(path.parent().expect("blob path has a parent"))?;
        Ok(path)
    }

    /// Stores `bytes` as a blob and returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        if self.has_blob(&digest) {
            return Ok(digest);
        }
        let mut file = self.temp_file()?;
        file.write_all(bytes).map_err(io(file.path()))?;
        self.commit_blob(file, &digest)?;
        Ok(digest)
    }

    /// Reads a blob, checking its content against its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest)?;
        let bytes = match fs_err::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob {
                    digest: digest.to_owned(),
                });
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Opens a blob for streaming (large layers); the caller verifies if it needs to.
    pub fn open_blob(&self, digest: &str) -> Result<File, StoreError> {
        let path = self.blob_path(digest)?;
        File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StoreError::MissingBlob {
                digest: digest.to_owned(),
            },
            _ => io(&path)(e),
        })
    }

    /// The build record of `version`, if it was built here.
    pub fn record(&self, version: &str) -> Result<Option<BuildRecord>, StoreError> {
        record::load(self, version)
    }

    /// Writes the build record of its version.
    pub fn put_record(&self, record: &BuildRecord) -> Result<(), StoreError> {
        record::save(self, record)
    }

    /// The disk image with `digest` that the store keeps for recipe `name`, if it has it.
    pub fn disk_image(&self, name: &str, digest: &str) -> Result<Option<PathBuf>, StoreError> {
        let path = self.disk_image_path(name, digest)?;
        Ok(path.is_file().then_some(path))
    }

    /// Keeps `image` (moved: a file on the store's file system, such as one in `work/`) as
    /// recipe `name`'s disk image with `digest`, and drops the images of its earlier versions:
    /// only the latest one is compared with, by the next version's incremental upload.
    pub fn keep_disk_image(
        &self,
        name: &str,
        digest: &str,
        image: &Path,
    ) -> Result<PathBuf, StoreError> {
        let path = self.disk_image_path(name, digest)?;
        let dir = path.parent().expect("disk images have a directory");
        fs_err::create_dir_all(dir).map_err(io(dir))?;
        fs_err::rename(image, &path).map_err(io(image))?;
        sync_dir(dir)?;
        for entry in fs_err::read_dir(dir).map_err(io(dir))?.flatten() {
            if entry.path() != path {
                let _ = fs_err::remove_file(entry.path());
            }
        }
        Ok(path)
    }

    fn disk_image_path(&self, name: &str, digest: &str) -> Result<PathBuf, StoreError> {
        let hex = digest_hex(digest)?;
        // Recipe names are validated (letters, digits, `-`, `_`, `.`, starting with a letter
        // or digit); anything else never names a directory here.
        let simple = !name.is_empty()
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !simple {
            return Err(StoreError::Io {
                path: PathBuf::from(name),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a recipe name"),
            });
        }
        Ok(self
            .root
            .join("disks")
            .join(name)
            .join(format!("{hex}.raw")))
    }

    /// A cached result of `kind` (such as `steps` or `bootstrap`) under `key` (a digest).
    pub fn cached<T: DeserializeOwned>(
        &self,
        kind: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let path = self
            .root
            .join("cache")
            .join(kind)
            .join(format!("{}.json", digest_hex(key)?));
        self.read_json(&path)
    }

    pub fn put_cached<T: Serialize>(
        &self,
        kind: &str,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let dir = self.root.join("cache").join(kind);
        fs_err::create_dir_all(&dir).map_err(io(&dir))?;
        self.write_json(&dir.join(format!("{}.json", digest_hex(key)?)), value)
    }

    /// The store's image index.
    pub fn index(&self) -> Result<ImageIndex, StoreError> {
        let path = self.root.join("index.json");
        Ok(self.read_json(&path)?.unwrap_or_else(empty_index))
    }

    /// Adds (or replaces, by version) an image in the index, under the store lock.
    pub fn add_to_index(&self, descriptor: Descriptor) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let version = descriptor
            .annotations()
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_VERSION))
            .cloned();
        let mut manifests: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|m| {
                let theirs = m
                    .annotations()
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_VERSION));
                version.is_none() || theirs != version.as_ref()
            })
            .cloned()
            .collect();
        manifests.push(descriptor);
        index.set_manifests(manifests);
        self.write_index(&index)
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), StoreError> {
        self.write_json(&self.root.join("index.json"), index)
    }

    /// An exclusive lock on the store, held until dropped.
    pub fn lock(&self) -> Result<File, StoreError> {
        let path = self.root.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        file.lock().map_err(io(&path))?;
        Ok(file)
    }

    pub(crate) fn read_json<T: DeserializeOwned>(
        &self,
        path: &Path,
    ) -> Result<Option<T>, StoreError> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(path)(e)),
        };
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io(path))?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| StoreError::Corrupt {
                path: path.to_path_buf(),
                source,
            })
    }

    pub(crate) fn write_json<T: Serialize>(
        &self,
        path: &Path,
        value: &T,
    ) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(value).expect("store documents serialize");
        bytes.push(b'\n');
        self.write_atomic(path, &bytes)
    }

    /// Writes `bytes` to `path` atomically: readers see the old file or the new one, never a
    /// part, even if bake is killed in the middle.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let mut file = self.temp_file()?;
        file.write_all(bytes).map_err(io(file.path()))?;
        file.as_file().sync_all().map_err(io(file.path()))?;
        file.persist(path).map_err(|e| StoreError::Io {
            path: path.to_path_buf(),
            source: e.error,
        })?;
        sync_dir(path.parent().expect("store paths have parents"))
    }
}

fn empty_index() -> ImageIndex {
    ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(Vec::<Descriptor>::new())
        .build()
        .expect("an empty index is valid")
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// The hex part of a `sha256:` digest, checked.
pub fn digest_hex(digest: &str) -> Result<&str, StoreError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) =>
        {
            Ok(hex)
        }
        _ => Err(StoreError::BadDigest(digest.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_disk_image_of_a_recipe_is_kept_and_earlier_ones_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = format!("sha256:{}", "a".repeat(64));
        let second = format!("sha256:{}", "b".repeat(64));
        let work = store.work_dir("disk").unwrap();
        let image = work.path().join("disk.raw");
        fs_err::write(&image, b"one").unwrap();
        let kept = store.keep_disk_image("web", &first, &image).unwrap();
        assert_eq!(store.disk_image("web", &first).unwrap(), Some(kept));
        assert!(!image.exists(), "moved, not copied");
        fs_err::write(&image, b"two").unwrap();
        let kept = store.keep_disk_image("web", &second, &image).unwrap();
        assert_eq!(fs_err::read(&kept).unwrap(), b"two");
        assert_eq!(store.disk_image("web", &first).unwrap(), None);
        assert_eq!(store.disk_image("other", &second).unwrap(), None);
        assert!(store.disk_image("../web", &second).is_err());
    }

    #[test]
    fn blobs_round_trip_and_are_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = store.put_blob(b"hello").unwrap();
        assert_eq!(store.read_blob(&digest).unwrap(), b"hello");
        fs_err::write(store.blob_path(&digest).unwrap(), b"tampered").unwrap();
        assert!(matches!(
            store.read_blob(&digest),
            Err(StoreError::DigestMismatch { .. })
        ));
        let missing = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(
            store.read_blob(&missing),
            Err(StoreError::MissingBlob { .. })
        ));
        assert!(matches!(
            store.blob_path("sha256:../../etc"),
            Err(StoreError::BadDigest(_))
        ));
    }

    #[test]
    fn layout_is_a_valid_oci_layout() {
        let dir = tempfile::tempdir().unwrap();
        Store::open(dir.path()).unwrap();
        let layout: serde_json::Value =
            serde_json::from_slice(&fs_err::read(dir.path().join("oci-layout")).unwrap()).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: ImageIndex =
            serde_json::from_slice(&fs_err::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert!(index.manifests().is_empty());
    }

    #[test]
    fn discarded_entries_go_to_the_trash_until_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs_err::write(outside.path().join("keep"), b"keep").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let work = store.work_dir("root").unwrap().keep();
        fs_err::create_dir_all(work.join("a/b")).unwrap();
        fs_err::write(work.join("a/b/file"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), work.join("a/escape")).unwrap();
        let file = store.temp_file().unwrap().into_temp_path().keep().unwrap();
        store.discard(&work).unwrap();
        store.discard(&file).unwrap();
        // Gone from where they were, in the trash instead, whole.
        assert!(!work.exists() && !file.exists());
        let trash = dir.path().join(TRASH);
        let slots: Vec<_> = fs_err::read_dir(&trash).unwrap().flatten().collect();
        assert_eq!(slots.len(), 2);
        let moved = walkdir::WalkDir::new(&trash)
            .into_iter()
            .flatten()
            .filter(|e| e.file_name() == "file")
            .count();
        assert_eq!(moved, 1);
        // A missing path is nothing to do.
        store.discard(&dir.path().join("work/none")).unwrap();
        assert_eq!(fs_err::read_dir(&trash).unwrap().count(), 2);
        store.reap_trash_in_background().join().unwrap();
        assert_eq!(fs_err::read_dir(&trash).unwrap().count(), 0);
        // The symlink was deleted, not followed.
        assert_eq!(fs_err::read(outside.path().join("keep")).unwrap(), b"keep");
        // The rest of the store is untouched.
        assert!(dir.path().join("index.json").is_file());
        assert!(dir.path().join("work").is_dir());
    }

    #[test]
    fn reaping_an_empty_or_missing_trash_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.reap_trash();
        fs_err::remove_dir(dir.path().join(TRASH)).unwrap();
        store.reap_trash();
        // Without a trash directory, discarding deletes on the spot.
        let work = store.work_dir("root").unwrap().keep();
        fs_err::write(work.join("f"), b"x").unwrap();
        store.discard(&work).unwrap();
        assert!(!work.exists());
        assert!(!dir.path().join(TRASH).exists());
    }

    #[test]
    fn a_store_opened_by_a_relative_path_discards_its_work_dirs() {
        let dir = tempfile::tempdir().unwrap();
        // The same directory named relative to the working directory (no chdir: tests share
        // the process).
        let cwd = std::env::current_dir().unwrap();
        let mut relative = PathBuf::new();
        for _ in cwd.components().skip(1) {
            relative.push("..");
        }
        relative.push(dir.path().strip_prefix("/").unwrap());
        let store = Store::open(&relative).unwrap();
        let work = store.work_dir("root").unwrap().keep();
        assert!(work.is_absolute());
        fs_err::write(work.join("f"), b"x").unwrap();
        store.discard(&work).unwrap();
        assert!(!work.exists());
        store.reap_trash();
        assert_eq!(
            fs_err::read_dir(dir.path().join("work")).unwrap().count(),
            0
        );
    }

    #[test]
    fn only_work_and_tmp_entries_can_be_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = store.put_blob(b"kept").unwrap();
        let refused = [
            dir.path().to_path_buf(),
            dir.path().join("work"),
            dir.path().join("tmp"),
            dir.path().join("blobs"),
            dir.path().join("records"),
            dir.path().join("index.json"),
            dir.path().join(TRASH),
            dir.path().join("work/../blobs"),
            dir.path().join("work/./x/../../blobs"),
            outside.path().to_path_buf(),
            PathBuf::from("work/relative"),
        ];
        for path in refused {
            assert!(
                matches!(store.discard(&path), Err(StoreError::NotDiscardable { .. })),
                "{}",
                path.display()
            );
        }
        assert!(outside.path().is_dir());
        assert_eq!(store.read_blob(&digest).unwrap(), b"kept");
        assert!(dir.path().join("work").is_dir() && dir.path().join("tmp").is_dir());
        assert_eq!(fs_err::read_dir(dir.path().join(TRASH)).unwrap().count(), 0);
    }

    #[test]
    fn a_trash_replaced_by_a_symlink_is_not_reaped_through() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        fs_err::write(elsewhere.path().join("precious"), b"x").unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs_err::remove_dir(dir.path().join(TRASH)).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join(TRASH)).unwrap();
        store.reap_trash();
        assert!(elsewhere.path().join("precious").is_file());
        // Nor is anything discarded into it: deleted in place instead.
        let work = store.work_dir("root").unwrap().keep();
        fs_err::write(work.join("f"), b"x").unwrap();
        store.discard(&work).unwrap();
        assert!(!work.exists());
        assert_eq!(fs_err::read_dir(elsewhere.path()).unwrap().count(), 1);
    }

    #[test]
    fn writeback_writes_exactly_what_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..(2 * WRITEBACK_WINDOW + 12_345))
            .map(|i| (i % 251) as u8)
            .collect();
        let mut writer = Writeback::new(fs_err::File::create(&path).unwrap().into_file());
        // Uneven pieces, so a window ends mid-write.
        const PIECE: u64 = 1_000_003;
        for piece in data.chunks(PIECE as usize) {
            writer.write_all(piece).unwrap();
        }
        writer.flush().unwrap();
        // The first window filled on the ninth piece; the tail is left to the fsync.
        assert_eq!(writer.submitted, 9 * PIECE);
        assert_eq!(writer.written, data.len() as u64);
        drop(writer);
        assert_eq!(fs_err::read(&path).unwrap(), data);
    }

    #[test]
    fn caches_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let version = format!("sha256:{}", "a".repeat(64));
        assert!(store.record(&version).unwrap().is_none());
        assert_eq!(store.cached::<u32>("steps", &version).unwrap(), None);
        store.put_cached("steps", &version, &3u32).unwrap();
        assert_eq!(store.cached::<u32>("steps", &version).unwrap(), Some(3));
    }
}
