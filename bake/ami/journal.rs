//! The journal of a run: every AWS resource a run is about to create is written to bake's store
//! *before* the create call, and its id right after. A run that fails (or is interrupted) removes
//! what its journal lists; a run that is killed leaves the journal behind for `bake cleanup`.
//!
//! ```text
//! .bake/journal/<run>.json   the run's resources (rewritten atomically on every change)
//! .bake/journal/<run>.lock   flock-ed by the live run, so cleanup never touches a running one
//! ```
//!
//! A finished run deletes its journal: what it made now belongs to the build record, and
//! `bake cleanup` must never remove it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

/// Bumped when the journal's shape changes.
pub const JOURNAL_FORMAT: &str = "bake.journal/v1";

/// The store subdirectory holding journals.
const JOURNAL_DIR: &str = "journal";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to access the journal `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What kind of AWS resource an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// An EBS snapshot.
    Snapshot,
    /// An AMI (registered, created from an instance, or copied).
    Image,
    /// An EC2 instance (builder-instance strategy).
    Instance,
    /// An EC2 key pair (id = key name).
    KeyPair,
    /// A security group.
    SecurityGroup,
    /// An EC2 Image Builder component build version (id = its ARN; token = its name).
    ImageBuilderComponent,
    /// An Image Builder image recipe (id = ARN; token = name).
    ImageBuilderImageRecipe,
    /// An Image Builder container recipe (id = ARN; token = name).
    ImageBuilderContainerRecipe,
    /// An Image Builder infrastructure configuration (id = ARN; token = name).
    ImageBuilderInfrastructure,
    /// An Image Builder distribution configuration (id = ARN; token = name).
    ImageBuilderDistribution,
    /// An Image Builder image build (id = its build version ARN; token = its recipe's name).
    ImageBuilderImage,
}

impl ResourceKind {
    pub fn label(self) -> &'static str {
        match self {
            ResourceKind::Snapshot => "snapshot",
            ResourceKind::Image => "AMI",
            ResourceKind::Instance => "instance",
            ResourceKind::KeyPair => "key pair",
            ResourceKind::SecurityGroup => "security group",
            ResourceKind::ImageBuilderComponent => "Image Builder component",
            ResourceKind::ImageBuilderImageRecipe => "Image Builder image recipe",
            ResourceKind::ImageBuilderContainerRecipe => "Image Builder container recipe",
            ResourceKind::ImageBuilderInfrastructure => {
                "Image Builder infrastructure configuration"
            }
            ResourceKind::ImageBuilderDistribution => "Image Builder distribution configuration",
            ResourceKind::ImageBuilderImage => "Image Builder image",
        }
    }

    /// Whether Image Builder owns it ([`crate::imagebuilder::cleanup`] removes it).
    pub fn is_image_builder(self) -> bool {
        matches!(
            self,
            ResourceKind::ImageBuilderComponent
                | ResourceKind::ImageBuilderImageRecipe
                | ResourceKind::ImageBuilderContainerRecipe
                | ResourceKind::ImageBuilderInfrastructure
                | ResourceKind::ImageBuilderDistribution
                | ResourceKind::ImageBuilderImage
        )
    }
}

/// Where a resource is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceStatus {
    /// The create call is about to be (or was) sent; the id may not be known.
    Creating,
    /// AWS answered with its id.
    Created,
    /// Removed again (rollback or cleanup).
    Removed,
}

/// One resource of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    pub kind: ResourceKind,
    pub region: String,
    /// The AWS id, once known.
    pub id: Option<String>,
    /// How to find the resource without its id: the image name, or the client token.
    pub token: String,
    pub status: ResourceStatus,
    /// For images: the snapshots behind them, once known (removed with the image).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
}

/// The journal file of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalDoc {
    pub format: String,
    pub run: String,
    pub recipe: String,
    pub version: String,
    /// Unix seconds.
    pub started: u64,
    pub pid: u32,
    pub resources: Vec<Resource>,
}

impl JournalDoc {
    /// The regions this run touched.
    pub fn regions(&self) -> Vec<String> {
        let mut regions: Vec<String> = self.resources.iter().map(|r| r.region.clone()).collect();
        regions.sort();
        regions.dedup();
        regions
    }
}

/// A handle on an entry, returned by [`Journal::creating`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryId(usize);

/// The live journal of a running run; cheap to clone and share between tasks.
#[derive(Debug, Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    path: PathBuf,
    lock_path: PathBuf,
    doc: Mutex<JournalDoc>,
    /// Held (flock) for the life of the run.
    _lock: File,
}

fn journal_dir(store: &Store) -> PathBuf {
    store.root().join(JOURNAL_DIR)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new run id: unique per machine and time, short enough for a tag value.
fn new_run_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let seed = format!(
        "{nanos}/{}/{:?}",
        std::process::id(),
        std::thread::current().id()
    );
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, seed.as_bytes());
    format!("run-{}", &id.simple().to_string()[..20])
}

impl Journal {
    /// Starts the journal of a new run of `recipe` at `version` (written at once, empty).
    pub fn begin(store: &Store, recipe: &str, version: &str) -> Result<Self, JournalError> {
        let dir = journal_dir(store);
        fs_err::create_dir_all(&dir).map_err(io(&dir))?;
        let run = new_run_id();
        let lock_path = dir.join(format!("{run}.lock"));
        let lock = File::create(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        let journal = Journal {
            inner: Arc::new(Inner {
                store: store.clone(),
                path: dir.join(format!("{run}.json")),
                lock_path,
                doc: Mutex::new(JournalDoc {
                    format: JOURNAL_FORMAT.to_owned(),
                    run,
                    recipe: recipe.to_owned(),
                    version: version.to_owned(),
                    started: now_secs(),
                    pid: std::process::id(),
                    resources: Vec::new(),
                }),
                _lock: lock,
            }),
        };
        journal.save(&journal.doc())?;
        Ok(journal)
    }

    /// The run's id (also the value of the `bake:run` tag on what it creates).
    pub fn run_id(&self) -> String {
        self.doc().run
    }

    /// A copy of the journal as it stands.
    pub fn doc(&self) -> JournalDoc {
        self.inner.doc.lock().expect("journal lock").clone()
    }

    fn update<T>(&self, change: impl FnOnce(&mut JournalDoc) -> T) -> Result<T, JournalError> {
        let mut doc = self.inner.doc.lock().expect("journal lock");
        let result = change(&mut doc);
        self.save(&doc)?;
        Ok(result)
    }

    fn save(&self, doc: &JournalDoc) -> Result<(), JournalError> {
        let mut bytes = serde_json::to_vec_pretty(doc).expect("journals serialize");
        bytes.push(b'\n');
        self.inner.store.write_atomic(&self.inner.path, &bytes)?;
        Ok(())
    }

    /// Records that a resource is about to be created; call before the create request.
    pub fn creating(
        &self,
        kind: ResourceKind,
        region: &str,
        token: &str,
    ) -> Result<EntryId, JournalError> {
        self.update(|doc| {
            doc.resources.push(Resource {
                kind,
                region: region.to_owned(),
                id: None,
                token: token.to_owned(),
                status: ResourceStatus::Creating,
                snapshots: Vec::new(),
            });
            EntryId(doc.resources.len() - 1)
        })
    }

    /// Records the id AWS gave the resource.
    pub fn created(&self, entry: EntryId, id: &str) -> Result<(), JournalError> {
        self.update(|doc| {
            let resource = &mut doc.resources[entry.0];
            resource.id = Some(id.to_owned());
            resource.status = ResourceStatus::Created;
        })
    }

    /// Records the snapshots behind an image.
    pub fn image_snapshots(
        &self,
        entry: EntryId,
        snapshots: &[String],
    ) -> Result<(), JournalError> {
        self.update(|doc| {
            let resource = &mut doc.resources[entry.0];
            for snapshot in snapshots {
                if !resource.snapshots.contains(snapshot) {
                    resource.snapshots.push(snapshot.clone());
                }
            }
        })
    }

    /// Records that a resource was removed again.
    pub fn removed(&self, entry: EntryId) -> Result<(), JournalError> {
        self.update(|doc| doc.resources[entry.0].status = ResourceStatus::Removed)
    }

    /// The entries not yet removed, newest first (the order to remove them in).
    pub fn live(&self) -> Vec<(EntryId, Resource)> {
        let doc = self.doc();
        doc.resources
            .into_iter()
            .enumerate()
            .filter(|(_, r)| r.status != ResourceStatus::Removed)
            .map(|(i, r)| (EntryId(i), r))
            .rev()
            .collect()
    }

    /// The run succeeded: what it made is kept, so the journal goes (cleanup must not find it).
    pub fn finish(self) -> Result<(), JournalError> {
        self.discard()
    }

    /// Deletes the journal (after a finished run, or a rollback that removed everything).
    pub fn discard(self) -> Result<(), JournalError> {
        remove_if_exists(&self.inner.path)?;
        remove_if_exists(&self.inner.lock_path)?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

fn remove_if_exists(path: &Path) -> Result<(), JournalError> {
    match fs_err::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(path)(e)),
    }
}

/// A journal left in the store by a run that is no longer alive.
#[derive(Debug)]
pub struct Abandoned {
    pub doc: JournalDoc,
    pub path: PathBuf,
    lock_path: PathBuf,
    /// Held while cleanup works on it, so two cleanups do not race.
    _lock: Option<File>,
}

impl Abandoned {
    /// Rewrites the journal (after cleanup removed some of it).
    pub fn save(&self, store: &Store) -> Result<(), JournalError> {
        let mut bytes = serde_json::to_vec_pretty(&self.doc).expect("journals serialize");
        bytes.push(b'\n');
        store.write_atomic(&self.path, &bytes)?;
        Ok(())
    }

    /// Deletes the journal once everything in it is gone.
    pub fn discard(self) -> Result<(), JournalError> {
        remove_if_exists(&self.path)?;
        remove_if_exists(&self.lock_path)?;
        Ok(())
    }
}

/// Every journal in the store (live or not), without locking: for listing regions.
pub fn list(store: &Store) -> Vec<JournalDoc> {
    let dir = journal_dir(store);
    let Ok(entries) = fs_err::read_dir(&dir) else {
        return Vec::new();
    };
    let mut docs: Vec<JournalDoc> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter_map(|p| fs_err::read(&p).ok())
        .filter_map(|text| serde_json::from_slice(&text).ok())
        .collect();
    docs.sort_by_key(|d| d.started);
    docs
}

/// What [`abandoned`] found.
#[derive(Debug, Default)]
pub struct Scan {
    pub abandoned: Vec<Abandoned>,
    /// Runs still alive (their lock is held): never touched.
    pub running: Vec<String>,
}

/// The journals of runs that are not running any more (killed, or failed without finishing
/// their rollback), oldest first.
pub fn abandoned(store: &Store) -> Result<Scan, JournalError> {
    let dir = journal_dir(store);
    let mut scan = Scan::default();
    let entries = match fs_err::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(scan),
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
    for path in paths {
        let lock_path = path.with_extension("lock");
        let lock = match File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
        {
            Ok(file) => file,
            Err(e) => return Err(io(&lock_path)(e)),
        };
        let text = fs_err::read(&path).map_err(io(&path))?;
        let doc: JournalDoc = serde_json::from_slice(&text).map_err(|e| JournalError::Io {
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        match lock.try_lock() {
            Ok(()) => scan.abandoned.push(Abandoned {
                doc,
                path,
                lock_path,
                _lock: Some(lock),
            }),
            Err(std::fs::TryLockError::WouldBlock) => scan.running.push(doc.run),
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        }
    }
    scan.abandoned.sort_by_key(|a| a.doc.started);
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_written_before_and_after_creation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let version = format!("sha256:{}", "a".repeat(64));
        let journal = Journal::begin(&store, "web", &version).unwrap();
        let entry = journal
            .creating(ResourceKind::Snapshot, "eu-west-1", "token-1")
            .unwrap();
        let on_disk: JournalDoc =
            serde_json::from_slice(&fs_err::read(journal.path()).unwrap()).unwrap();
        assert_eq!(on_disk.resources.len(), 1);
        assert_eq!(on_disk.resources[0].status, ResourceStatus::Creating);
        assert_eq!(on_disk.resources[0].id, None);
        journal.created(entry, "snap-0123").unwrap();
        let image = journal
            .creating(ResourceKind::Image, "eu-west-1", "web-1")
            .unwrap();
        journal.created(image, "ami-0123").unwrap();
        journal
            .image_snapshots(image, &["snap-0456".to_owned()])
            .unwrap();
        let on_disk: JournalDoc =
            serde_json::from_slice(&fs_err::read(journal.path()).unwrap()).unwrap();
        assert_eq!(on_disk.resources[0].id.as_deref(), Some("snap-0123"));
        assert_eq!(on_disk.resources[1].snapshots, vec!["snap-0456"]);
        // Newest first: the image goes before the snapshot it was made from.
        let live: Vec<_> = journal.live().into_iter().map(|(_, r)| r.kind).collect();
        assert_eq!(live, vec![ResourceKind::Image, ResourceKind::Snapshot]);
        journal.removed(image).unwrap();
        assert_eq!(journal.live().len(), 1);
    }

    #[test]
    fn a_live_run_is_not_abandoned_and_a_finished_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let version = format!("sha256:{}", "b".repeat(64));
        let journal = Journal::begin(&store, "web", &version).unwrap();
        let scan = abandoned(&store).unwrap();
        assert!(scan.abandoned.is_empty());
        assert_eq!(scan.running, vec![journal.run_id()]);
        let path = journal.path().to_path_buf();
        journal.finish().unwrap();
        assert!(!path.exists());
        let scan = abandoned(&store).unwrap();
        assert!(scan.abandoned.is_empty() && scan.running.is_empty());
    }

    #[test]
    fn a_dropped_run_is_abandoned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let version = format!("sha256:{}", "c".repeat(64));
        let journal = Journal::begin(&store, "web", &version).unwrap();
        journal
            .creating(ResourceKind::Image, "us-east-1", "web-1")
            .unwrap();
        let run = journal.run_id();
        drop(journal); // as if the process died: the lock is released, the file stays
        let scan = abandoned(&store).unwrap();
        assert_eq!(scan.abandoned.len(), 1);
        assert_eq!(scan.abandoned[0].doc.run, run);
        assert_eq!(scan.abandoned[0].doc.regions(), vec!["us-east-1"]);
    }
}
