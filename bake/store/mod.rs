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
//!   tmp/                    staging for atomic writes (same file system as the blobs)
//!   work/                   build roots of running builds
//! ```
//!
//! Every write is atomic (temp file in `tmp/`, fsync, rename, fsync of the directory), and a
//! blob is stored under a digest only after that digest was computed over the bytes written.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, MediaType};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest as _, Sha256};

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
}

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
        for dir in ["blobs/sha256", "records", "cache", "tmp", "work"] {
            fs_err::create_dir_all(root.join(dir)).map_err(io(root))?;
        }
        let store = Store {
            root: root.to_path_buf(),
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
    pub fn record<T: DeserializeOwned>(&self, version: &str) -> Result<Option<T>, StoreError> {
        let path = self
            .root
            .join("records")
            .join(format!("{}.json", digest_hex(version)?));
        self.read_json(&path)
    }

    pub fn put_record<T: Serialize>(&self, version: &str, record: &T) -> Result<(), StoreError> {
        let path = self
            .root
            .join("records")
            .join(format!("{}.json", digest_hex(version)?));
        self.write_json(&path, record)
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

    fn read_json<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, StoreError> {
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

    fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), StoreError> {
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
    fn records_and_caches_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let version = format!("sha256:{}", "a".repeat(64));
        assert!(
            store
                .record::<serde_json::Value>(&version)
                .unwrap()
                .is_none()
        );
        store
            .put_record(&version, &serde_json::json!({"ok": true}))
            .unwrap();
        assert_eq!(
            store
                .record::<serde_json::Value>(&version)
                .unwrap()
                .unwrap()["ok"],
            true
        );
        store.put_cached("steps", &version, &3u32).unwrap();
        assert_eq!(store.cached::<u32>("steps", &version).unwrap(), Some(3));
    }
}
