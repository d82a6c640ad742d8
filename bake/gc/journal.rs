//! The journal of a `bake gc` run: every AMI and ECR image a run is about to remove is written
//! to the store *before* the first mutating call, and each step (deprecated, deregistered, each
//! snapshot deleted; each tag, then the digest, of an image) right after AWS answered. A run that is killed leaves the journal behind; the next
//! run finds it (its lock is free) and finishes what the dead one started: above all the
//! snapshots of an AMI that was already deregistered, which no scan can find through the AMI
//! any more.
//!
//! ```text
//! .bake/gc/<run>.json   the run's removals (rewritten atomically on every step)
//! .bake/gc/<run>.lock   flock-ed by the live run, so a second gc never resumes a running one
//! ```
//!
//! Separate from the build journal (`.bake/journal/`) on purpose: `bake cleanup` removes what
//! a build journal lists, and what gc lists must only ever be removed by gc's own rules.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// Bumped when the journal's shape changes.
pub const GC_JOURNAL_FORMAT: &str = "bake.gc-journal/v1";

/// The store subdirectory holding gc journals.
const GC_DIR: &str = "gc";

#[derive(Debug, thiserror::Error)]
pub enum GcJournalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to access the gc journal `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> GcJournalError + '_ {
    move |source| GcJournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How far the removal of one AMI got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Decided; nothing sent yet.
    Planned,
    /// Marked and deprecated; deregistered once the grace period is over.
    Deprecated,
    /// Deregistered; its snapshots may remain.
    Deregistered,
    /// The AMI and every snapshot are gone.
    Done,
}

/// What an entry removes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// An AMI and its snapshots (journals of earlier bakes name no kind: AMIs).
    #[default]
    Ami,
    /// An ECR image: its tags, then its digest.
    Image,
}

/// One AMI or ECR image a run removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(default)]
    pub kind: EntryKind,
    pub recipe: String,
    pub version: String,
    pub region: String,
    /// The AMI id, or the image's `repository@sha256:…`.
    pub image_id: String,
    /// The AMI's snapshots, as DescribeImages listed them before anything was sent.
    pub snapshots: Vec<String>,
    /// Snapshots settled: deleted, found gone, or left because another AMI still uses them.
    #[serde(default)]
    pub settled_snapshots: Vec<String>,
    /// An image's tags, as DescribeImages listed them before anything was sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Tags settled: deleted, or found gone or moved to another image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settled_tags: Vec<String>,
    pub step: Step,
}

impl Entry {
    /// Snapshots still to delete.
    pub fn pending_snapshots(&self) -> Vec<String> {
        self.snapshots
            .iter()
            .filter(|s| !self.settled_snapshots.contains(s))
            .cloned()
            .collect()
    }

    /// An image's tags still to delete.
    pub fn pending_tags(&self) -> Vec<String> {
        self.tags
            .iter()
            .filter(|t| !self.settled_tags.contains(t))
            .cloned()
            .collect()
    }
}

/// The journal file of one gc run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcJournalDoc {
    pub format: String,
    pub run: String,
    /// Unix seconds.
    pub started: u64,
    pub pid: u32,
    pub entries: Vec<Entry>,
}

/// The live journal of a running gc.
#[derive(Debug)]
pub struct GcJournal {
    store: Store,
    path: PathBuf,
    lock_path: PathBuf,
    doc: Mutex<GcJournalDoc>,
    /// Held (flock) for the life of the run.
    _lock: File,
}

fn dir_of(store: &Store) -> PathBuf {
    store.root().join(GC_DIR)
}

fn save_doc(store: &Store, path: &Path, doc: &GcJournalDoc) -> Result<(), GcJournalError> {
    let mut bytes = serde_json::to_vec_pretty(doc).expect("gc journals serialize");
    bytes.push(b'\n');
    store.write_atomic(path, &bytes)?;
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<(), GcJournalError> {
    match fs_err::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

impl GcJournal {
    /// Starts the journal of a new gc run with every removal it is about to make, written
    /// before the first mutating call.
    pub fn begin(store: &Store, entries: Vec<Entry>) -> Result<Self, GcJournalError> {
        let dir = dir_of(store);
        fs_err::create_dir_all(&dir).map_err(io(&dir))?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let seed = format!(
            "gc/{:?}/{}",
            std::time::SystemTime::now(),
            std::process::id()
        );
        let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, seed.as_bytes());
        let run = format!("gc-{}", &id.simple().to_string()[..20]);
        let lock_path = dir.join(format!("{run}.lock"));
        let lock = File::create(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        let journal = GcJournal {
            store: store.clone(),
            path: dir.join(format!("{run}.json")),
            lock_path,
            doc: Mutex::new(GcJournalDoc {
                format: GC_JOURNAL_FORMAT.to_owned(),
                run,
                started,
                pid: std::process::id(),
                entries,
            }),
            _lock: lock,
        };
        journal.save()?;
        Ok(journal)
    }

    fn save(&self) -> Result<(), GcJournalError> {
        let doc = self.doc.lock().expect("gc journal lock");
        save_doc(&self.store, &self.path, &doc)
    }

    /// Records progress on the entry of `image_id` in `region`.
    pub fn update(
        &self,
        region: &str,
        image_id: &str,
        change: impl FnOnce(&mut Entry),
    ) -> Result<(), GcJournalError> {
        {
            let mut doc = self.doc.lock().expect("gc journal lock");
            if let Some(entry) = doc
                .entries
                .iter_mut()
                .find(|e| e.region == region && e.image_id == image_id)
            {
                change(entry);
            }
        }
        self.save()
    }

    /// The run id.
    pub fn run(&self) -> String {
        self.doc.lock().expect("gc journal lock").run.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run ended: the journal goes if every entry is done or waits for its grace period
    /// (a later run decides those again from AWS); else it stays for the next run.
    pub fn finish(self) -> Result<(), GcJournalError> {
        let unfinished = {
            let doc = self.doc.lock().expect("gc journal lock");
            doc.entries
                .iter()
                .any(|e| e.step == Step::Deregistered && !e.pending_snapshots().is_empty())
        };
        if unfinished {
            return Ok(());
        }
        remove_if_exists(&self.path)?;
        remove_if_exists(&self.lock_path)
    }
}

/// A gc journal left by a run that is no longer alive, locked while this run works on it.
#[derive(Debug)]
pub struct Interrupted {
    pub doc: GcJournalDoc,
    path: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl Interrupted {
    /// Rewrites it after progress.
    pub fn save(&self, store: &Store) -> Result<(), GcJournalError> {
        save_doc(store, &self.path, &self.doc)
    }

    /// Deletes it once nothing in it is left to do.
    pub fn discard(self) -> Result<(), GcJournalError> {
        remove_if_exists(&self.path)?;
        remove_if_exists(&self.lock_path)
    }
}

/// The journals of gc runs that died, oldest first; runs still alive (lock held) are left out.
pub fn interrupted(store: &Store) -> Result<Vec<Interrupted>, GcJournalError> {
    let dir = dir_of(store);
    let entries = match fs_err::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir)(e)),
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(&dir))?.path();
        if path.extension().is_some_and(|e| e == "json") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut found = Vec::new();
    for path in paths {
        let lock_path = path.with_extension("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
        let text = fs_err::read(&path).map_err(io(&path))?;
        let doc: GcJournalDoc = serde_json::from_slice(&text).map_err(|e| GcJournalError::Io {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        found.push(Interrupted {
            doc,
            path,
            lock_path,
            _lock: lock,
        });
    }
    found.sort_by_key(|j| j.doc.started);
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(image: &str) -> Entry {
        Entry {
            kind: EntryKind::Ami,
            recipe: "web".into(),
            version: format!("sha256:{}", "a".repeat(64)),
            region: "us-east-1".into(),
            image_id: image.into(),
            snapshots: vec!["snap-1".into(), "snap-2".into()],
            settled_snapshots: Vec::new(),
            tags: Vec::new(),
            settled_tags: Vec::new(),
            step: Step::Planned,
        }
    }

    #[test]
    fn a_killed_run_is_found_with_its_progress_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let journal = GcJournal::begin(&store, vec![entry("ami-1"), entry("ami-2")]).unwrap();
        assert!(
            interrupted(&store).unwrap().is_empty(),
            "a live run is never resumed"
        );
        journal
            .update("us-east-1", "ami-1", |e| {
                e.step = Step::Deregistered;
                e.settled_snapshots.push("snap-1".into());
            })
            .unwrap();
        drop(journal); // as if killed: the lock goes, the file stays
        let found = interrupted(&store).unwrap();
        assert_eq!(found.len(), 1);
        let first = &found[0].doc.entries[0];
        assert_eq!(first.step, Step::Deregistered);
        assert_eq!(first.pending_snapshots(), vec!["snap-2"]);
        found.into_iter().next().unwrap().discard().unwrap();
        assert!(interrupted(&store).unwrap().is_empty());
    }

    #[test]
    fn a_finished_run_leaves_nothing_but_unfinished_snapshots_stay_journaled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let journal = GcJournal::begin(&store, vec![entry("ami-1")]).unwrap();
        let path = journal.path().to_path_buf();
        journal
            .update("us-east-1", "ami-1", |e| e.step = Step::Done)
            .unwrap();
        journal.finish().unwrap();
        assert!(!path.exists());

        let journal = GcJournal::begin(&store, vec![entry("ami-2")]).unwrap();
        journal
            .update("us-east-1", "ami-2", |e| e.step = Step::Deregistered)
            .unwrap();
        journal.finish().unwrap();
        assert_eq!(interrupted(&store).unwrap().len(), 1);
    }

    #[test]
    fn journals_of_earlier_bakes_read_as_amis_and_image_tags_are_tracked() {
        let earlier = r#"{"recipe":"web","version":"v","region":"us-east-1","image_id":"ami-1",
            "snapshots":["snap-1"],"step":"planned"}"#;
        let entry: Entry = serde_json::from_str(earlier).unwrap();
        assert_eq!(entry.kind, EntryKind::Ami);
        assert!(entry.tags.is_empty());

        let mut image = Entry {
            kind: EntryKind::Image,
            image_id: format!("web@sha256:{}", "b".repeat(64)),
            snapshots: Vec::new(),
            tags: vec!["v1".into(), "latest".into()],
            ..entry
        };
        image.settled_tags.push("latest".into());
        assert_eq!(image.pending_tags(), vec!["v1"]);
        let text = serde_json::to_string(&image).unwrap();
        assert!(text.contains(r#""kind":"image""#), "{text}");
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), image);
    }
}
