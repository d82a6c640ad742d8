//! Pinning package archives: a bootstrap base reads Debian (or Ubuntu) archives, whose state
//! moves with every security update. A plan pins each suite it reads to the digest of the
//! signed file that describes it (`InRelease`, else `Release`), the way a registry tag is
//! pinned to a manifest digest, so a moved archive is a new version; after the bootstrap,
//! [`check_bootstrapped`] proves apt read exactly those files.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::id::Digest;
use crate::recipe::ArchiveSuite;

/// One suite of one archive as a plan pinned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedArchive {
    pub mirror: String,
    pub suite: String,
    /// The digest of the suite's `InRelease` (or, without one, `Release`) file.
    pub release: Digest,
}

pub type ArchiveError = Box<dyn std::error::Error + Send + Sync>;

/// Finds the digest of a suite's signed Release file. Plans are synchronous; implementations
/// block.
pub trait ArchiveResolver: std::fmt::Debug + Send + Sync {
    fn release(&self, archive: &ArchiveSuite) -> Result<Digest, ArchiveError>;
}

pub type SharedArchiveResolver = Arc<dyn ArchiveResolver>;

/// Reads Release files over HTTP(S) or from `file://` archives, each suite once per process
/// (a plan of many recipes on one archive asks it once).
#[derive(Debug, Default)]
pub struct ArchiveFetcher {
    seen: Mutex<HashMap<(String, String), Digest>>,
}

impl ArchiveFetcher {
    pub fn new() -> Self {
        Self::default()
    }
}

impl ArchiveResolver for ArchiveFetcher {
    fn release(&self, archive: &ArchiveSuite) -> Result<Digest, ArchiveError> {
        let key = (archive.mirror.clone(), archive.suite.clone());
        if let Some(digest) = self.seen.lock().expect("not poisoned").get(&key) {
            return Ok(digest.clone());
        }
        let bytes = fetch_release(archive)?;
        let digest = Digest::of(&bytes);
        self.seen
            .lock()
            .expect("not poisoned")
            .insert(key, digest.clone());
        Ok(digest)
    }
}

/// The URL of a file under the suite's `dists/` directory.
fn dists_url(archive: &ArchiveSuite, file: &str) -> String {
    format!(
        "{}/dists/{}/{file}",
        archive.mirror.trim_end_matches('/'),
        archive.suite
    )
}

/// The bytes of the suite's `InRelease`, else its `Release`.
fn fetch_release(archive: &ArchiveSuite) -> Result<Vec<u8>, ArchiveError> {
    if let Some(path) = archive.mirror.strip_prefix("file://") {
        let dists = Path::new(path).join("dists").join(&archive.suite);
        for name in ["InRelease", "Release"] {
            match std::fs::read(dists.join(name)) {
                Ok(bytes) => return Ok(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("{}: {e}", dists.join(name).display()).into()),
            }
        }
        return Err(format!("{} has neither InRelease nor Release", dists.display()).into());
    }
    let archive = archive.clone();
    // A private runtime in its own thread: safe whether or not the caller is in a runtime.
    std::thread::spawn(move || -> Result<Vec<u8>, ArchiveError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()?;
            for name in ["InRelease", "Release"] {
                let url = dists_url(&archive, name);
                let response = client.get(&url).send().await?;
                if response.status() == reqwest::StatusCode::NOT_FOUND {
                    continue;
                }
                let response = response.error_for_status()?;
                return Ok(response.bytes().await?.to_vec());
            }
            Err(format!(
                "{} answers 404 for both InRelease and Release",
                dists_url(&archive, "")
            )
            .into())
        })
    })
    .join()
    .map_err(|_| "the archive resolver thread panicked")?
}

/// A pinned suite whose Release file apt did not read.
#[derive(Debug, thiserror::Error)]
#[error(
    "the bootstrap read another state of {mirror} {suite} than the plan pinned (Release {pinned}): the archive moved between plan and build"
)]
pub struct ArchiveMoved {
    pub mirror: String,
    pub suite: String,
    pub pinned: String,
}

/// Checks that the Release files apt kept in `lists` (its `/var/lib/apt/lists` after the
/// bootstrap) include each pinned one, by digest: the root was made from exactly the pinned
/// state of every archive.
pub fn check_bootstrapped(lists: &Path, pinned: &[PinnedArchive]) -> Result<(), Box<ArchiveMoved>> {
    let mut read: Vec<Digest> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(lists) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if (name.ends_with("_InRelease") || name.ends_with("_Release"))
                && let Ok(bytes) = std::fs::read(entry.path())
            {
                read.push(Digest::of(&bytes));
            }
        }
    }
    match pinned.iter().find(|p| !read.contains(&p.release)) {
        Some(p) => Err(Box::new(ArchiveMoved {
            mirror: p.mirror.clone(),
            suite: p.suite.clone(),
            pinned: p.release.short().to_owned(),
        })),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(dir: &Path, suite: &str, text: &str) -> ArchiveSuite {
        let dists = dir.join("dists").join(suite);
        std::fs::create_dir_all(&dists).unwrap();
        std::fs::write(dists.join("InRelease"), text).unwrap();
        ArchiveSuite {
            mirror: format!("file://{}", dir.display()),
            suite: suite.into(),
        }
    }

    #[test]
    fn a_file_archive_is_pinned_by_its_inrelease_and_a_change_moves_it() {
        let dir = tempfile::tempdir().unwrap();
        let suite = archive(dir.path(), "stable", "Suite: stable\nDate: 1\n");
        let first = ArchiveFetcher::new().release(&suite).unwrap();
        assert_eq!(first, Digest::of(b"Suite: stable\nDate: 1\n"));
        archive(dir.path(), "stable", "Suite: stable\nDate: 2\n");
        assert_ne!(ArchiveFetcher::new().release(&suite).unwrap(), first);
    }

    #[test]
    fn a_release_file_serves_when_there_is_no_inrelease_and_nothing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let dists = dir.path().join("dists/old");
        std::fs::create_dir_all(&dists).unwrap();
        std::fs::write(dists.join("Release"), "Suite: old\n").unwrap();
        let fetcher = ArchiveFetcher::new();
        let old = ArchiveSuite {
            mirror: format!("file://{}", dir.path().display()),
            suite: "old".into(),
        };
        assert_eq!(fetcher.release(&old).unwrap(), Digest::of(b"Suite: old\n"));
        let missing = ArchiveSuite {
            suite: "missing".into(),
            ..old
        };
        let error = fetcher.release(&missing).unwrap_err().to_string();
        assert!(error.contains("neither InRelease nor Release"), "{error}");
    }

    #[test]
    fn the_check_names_the_archive_apt_did_not_read() {
        let lists = tempfile::tempdir().unwrap();
        std::fs::write(
            lists
                .path()
                .join("deb.debian.org_debian_dists_bookworm_InRelease"),
            "read",
        )
        .unwrap();
        std::fs::write(lists.path().join("lock"), "").unwrap();
        let pin = |suite: &str, text: &[u8]| PinnedArchive {
            mirror: "http://deb.debian.org/debian".into(),
            suite: suite.into(),
            release: Digest::of(text),
        };
        assert!(check_bootstrapped(lists.path(), &[pin("bookworm", b"read")]).is_ok());
        let error = check_bootstrapped(
            lists.path(),
            &[pin("bookworm", b"read"), pin("bookworm-updates", b"other")],
        )
        .unwrap_err();
        assert_eq!(error.suite, "bookworm-updates");
        assert!(error.to_string().contains("the archive moved"), "{error}");
    }
}
