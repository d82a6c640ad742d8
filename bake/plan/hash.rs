//! Content hashes of the files a recipe reads, and the digest of canonical JSON.
//!
//! A directory hashes as the sorted list of its entries (relative path, type, permission bits,
//! and the content hash of a file or the target of a symlink), so renaming, adding, removing,
//! re-permissioning or editing anything inside it changes the hash, and nothing else does
//! (timestamps, owners and inode numbers are not inputs).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Reads in 1 MiB chunks: large enough to keep hashing at memory speed, small enough that a
/// multi-GB rootfs tarball never sits in memory.
const READ_CHUNK: usize = 1 << 20;

/// One file-system entry that is an input of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInput {
    /// Relative to the recipe's directory, `/`-separated.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: FileKind,
    /// Permission bits in octal, such as `0644`.
    pub mode: String,
    /// `sha256:<hex>` of a regular file's content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// A symlink's target, as stored (symlinks are recorded, never followed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
}

/// A failure to read an input, naming the path.
#[derive(Debug, thiserror::Error)]
#[error("failed to read `{}`", path.display())]
pub struct HashError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// `sha256:<hex>` of a file's content, streamed.
pub fn file_digest(path: &Path) -> Result<String, HashError> {
    let error = |source| HashError {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(error)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; READ_CHUNK];
    loop {
        let n = file.read(&mut buffer).map_err(error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// Remembers file digests between runs, keyed by path and the metadata any change to a file
/// changes (device, inode, size, mtime, ctime), so an unchanged recipe plans in milliseconds
/// even when it reads a large tarball. ctime cannot be set by a user, so a rewritten file always
/// misses; files changed in the last two seconds are never cached, which closes the window
/// where a same-tick rewrite could keep all five values (git's "racy clean" problem).
#[derive(Debug, Default)]
pub struct DigestCache {
    file: Option<PathBuf>,
    entries: std::sync::Mutex<std::collections::BTreeMap<String, CachedDigest>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct CachedDigest {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    digest: String,
}

/// How old a file's last change must be before its digest is remembered.
const CACHE_SETTLE_NS: i128 = 2_000_000_000;

impl DigestCache {
    /// A cache that is not saved anywhere.
    pub fn in_memory() -> Self {
        DigestCache::default()
    }

    /// Loads the cache kept in `file` (a missing or unreadable cache is an empty one).
    pub fn load(file: &Path) -> Self {
        let entries = std::fs::read(file)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        DigestCache {
            file: Some(file.to_path_buf()),
            entries: std::sync::Mutex::new(entries),
        }
    }

    /// Writes the cache back (atomically; failures only cost speed next time).
    pub fn save(&self) {
        let Some(file) = &self.file else { return };
        let Some(dir) = file.parent() else { return };
        let entries = self.entries.lock().expect("digest cache lock");
        let Ok(bytes) = serde_json::to_vec(&*entries) else {
            return;
        };
        if std::fs::create_dir_all(dir).is_err() {
            return;
        }
        if let Ok(mut temp) = tempfile::NamedTempFile::new_in(dir)
            && std::io::Write::write_all(&mut temp, &bytes).is_ok()
        {
            let _ = temp.persist(file);
        }
    }

    /// The digest of the regular file at `path`, from the cache when its metadata is unchanged.
    pub fn digest(&self, path: &Path) -> Result<String, HashError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|source| HashError {
            path: path.to_path_buf(),
            source,
        })?;
        let key = path.to_string_lossy().into_owned();
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        let ctime_ns = i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec());
        let fresh = |c: &CachedDigest| {
            c.dev == meta.dev()
                && c.ino == meta.ino()
                && c.size == meta.size()
                && c.mtime_ns == mtime_ns
                && c.ctime_ns == ctime_ns
        };
        if let Some(hit) = self
            .entries
            .lock()
            .expect("digest cache lock")
            .get(&key)
            .filter(|c| fresh(c))
        {
            return Ok(hit.digest.clone());
        }
        let digest = file_digest(path)?;
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        if now_ns - ctime_ns.max(mtime_ns) > CACHE_SETTLE_NS {
            self.entries.lock().expect("digest cache lock").insert(
                key,
                CachedDigest {
                    dev: meta.dev(),
                    ino: meta.ino(),
                    size: meta.size(),
                    mtime_ns,
                    ctime_ns,
                    digest: digest.clone(),
                },
            );
        }
        Ok(digest)
    }
}

/// `sha256:<hex>` of bytes.
pub fn bytes_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The entries of `path` (a file, a symlink or a directory tree), with paths relative to
/// `root`, in sorted order.
pub fn tree_inputs(
    root: &Path,
    path: &Path,
    cache: &DigestCache,
) -> Result<Vec<FileInput>, HashError> {
    let mut out = Vec::new();
    let walker = walkdir::WalkDir::new(path)
        .follow_links(false)
        .sort_by_file_name();
    for entry in walker {
        let entry = entry.map_err(|e| {
            let path = e
                .path()
                .map_or_else(|| path.to_path_buf(), Path::to_path_buf);
            HashError {
                path,
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("file system loop")),
            }
        })?;
        let full = entry.path();
        let metadata = entry.metadata().map_err(|e| HashError {
            path: full.to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("metadata")),
        })?;
        let relative = full.strip_prefix(root).unwrap_or(full);
        let relative = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let mode = format!("{:04o}", metadata.permissions().mode() & 0o7777);
        let file_type = metadata.file_type();
        let input = if file_type.is_symlink() {
            let target = std::fs::read_link(full).map_err(|source| HashError {
                path: full.to_path_buf(),
                source,
            })?;
            FileInput {
                path: relative,
                kind: FileKind::Symlink,
                mode,
                digest: None,
                target: Some(target.to_string_lossy().into_owned()),
            }
        } else if file_type.is_dir() {
            FileInput {
                path: relative,
                kind: FileKind::Directory,
                mode,
                digest: None,
                target: None,
            }
        } else if file_type.is_file() {
            FileInput {
                path: relative,
                kind: FileKind::File,
                mode,
                digest: Some(cache.digest(full)?),
                target: None,
            }
        } else {
            return Err(HashError {
                path: full.to_path_buf(),
                source: std::io::Error::other("not a regular file, directory or symlink"),
            });
        };
        out.push(input);
    }
    Ok(out)
}

/// `sha256:<hex>` of the RFC 8785 (JCS) canonical form of `value`: key order and whitespace
/// never change the digest.
pub fn canonical_digest(value: &serde_json::Value) -> String {
    let bytes = serde_json_canonicalizer::to_vec(value).expect("a JSON value always canonicalizes");
    bytes_digest(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_is_sorted_and_sensitive_to_content_mode_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs_err::create_dir_all(root.join("t/b")).unwrap();
        fs_err::write(root.join("t/z"), "z").unwrap();
        fs_err::write(root.join("t/b/a"), "a").unwrap();
        std::os::unix::fs::symlink("../z", root.join("t/b/l")).unwrap();
        let cache = DigestCache::in_memory();
        let first = tree_inputs(root, &root.join("t"), &cache).unwrap();
        let paths: Vec<_> = first.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["t", "t/b", "t/b/a", "t/b/l", "t/z"]);
        assert_eq!(first[3].target.as_deref(), Some("../z"));

        fs_err::write(root.join("t/z"), "Z").unwrap();
        let edited = tree_inputs(root, &root.join("t"), &cache).unwrap();
        assert_ne!(first, edited);

        let mut perms = fs_err::metadata(root.join("t/z")).unwrap().permissions();
        perms.set_mode(0o755);
        fs_err::set_permissions(root.join("t/z"), perms).unwrap();
        assert_ne!(edited, tree_inputs(root, &root.join("t"), &cache).unwrap());
    }

    #[test]
    fn the_digest_cache_misses_when_a_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs_err::write(&file, "one").unwrap();
        // Old enough to be remembered.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        let cache_file = dir.path().join("cache.json");
        let cache = DigestCache::load(&cache_file);
        let first = cache.digest(&file).unwrap();
        cache.save();
        let reloaded = DigestCache::load(&cache_file);
        assert_eq!(reloaded.entries.lock().unwrap().len(), 1);
        assert_eq!(reloaded.digest(&file).unwrap(), first);
        // Same size, same mtime, new content: ctime still tells.
        fs_err::write(&file, "two").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_ne!(reloaded.digest(&file).unwrap(), first);
        assert_eq!(reloaded.digest(&file).unwrap(), bytes_digest(b"two"));
    }

    #[test]
    fn canonical_digest_ignores_key_order() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":[1,2]}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str(r#"{ "b":[1,2], "a":1 }"#).unwrap();
        assert_eq!(canonical_digest(&a), canonical_digest(&b));
        assert!(canonical_digest(&a).starts_with("sha256:"));
    }
}
