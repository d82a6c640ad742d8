//! The builder-instance journal: every temporary AWS resource a build makes is written to the
//! store *before* it is created, so a build killed at any point (SIGKILL, power loss) leaves a
//! record `bake cleanup` can act on. Each resource also carries `bake:build-id` and
//! `bake:recipe` tags from its creation, so a journal lost with its machine (a CI runner) still
//! leaves the resources findable by tag.
//!
//! One file per build: `STORE/journal/instance/BUILD-ID.json`, rewritten atomically at each
//! change. A finished build whose resources are all gone deletes its file.
//!
//! This module is specific to the instance strategy; the snapshot strategy's journal (issue
//! 5) records other kinds. Both have the same shape (intend → created → removed, by build id)
//! so an integrator can merge them into one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

pub const JOURNAL_FORMAT: &str = "bake.instance-journal/v1";

/// Tags every temporary resource carries.
pub const TAG_BUILD_ID: &str = "bake:build-id";
pub const TAG_RECIPE: &str = "bake:recipe";
pub const TAG_VERSION: &str = "bake:version";
/// Seconds since the epoch when the resource was made; `bake cleanup --older-than` reads it
/// (security groups and key pairs have no reliable creation time of their own).
pub const TAG_CREATED: &str = "bake:created";
/// On AMIs: `building` until the image is complete, then `available`. A janitor only ever
/// deregisters `building` images.
pub const TAG_STATE: &str = "bake:state";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    KeyPair,
    SecurityGroup,
    Instance,
    Image,
}

impl ResourceKind {
    pub fn label(self) -> &'static str {
        match self {
            ResourceKind::KeyPair => "key pair",
            ResourceKind::SecurityGroup => "security group",
            ResourceKind::Instance => "instance",
            ResourceKind::Image => "AMI",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceState {
    /// About to be created (it may or may not exist).
    Intended,
    Created,
    Removed,
    /// The build's product: never removed by cleanup.
    Kept,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalResource {
    pub kind: ResourceKind,
    pub region: String,
    /// The name bake chose (key pair and group name, image name) or the client token.
    pub name: String,
    pub id: Option<String>,
    pub state: ResourceState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildState {
    Running,
    /// The build ended (either way) and removed what it could.
    Ended,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub format: String,
    pub build_id: String,
    pub recipe: String,
    pub version: String,
    pub region: String,
    /// The process that runs the build, and the boot it runs in: a live pid from an earlier
    /// boot is someone else.
    pub pid: u32,
    pub boot_id: Option<String>,
    /// Seconds since the epoch.
    pub started: u64,
    pub state: BuildState,
    pub resources: Vec<JournalResource>,
}

impl JournalEntry {
    /// Whether the build that wrote this entry still runs.
    pub fn is_live(&self) -> bool {
        self.state == BuildState::Running
            && boot_id() == self.boot_id
            && pid_alive(self.pid)
            && self.pid != std::process::id()
    }

    /// Whether anything in the entry may still exist in AWS.
    pub fn has_leftovers(&self) -> bool {
        self.resources
            .iter()
            .any(|r| matches!(r.state, ResourceState::Intended | ResourceState::Created))
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence; EPERM still means a process exists.
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

/// This boot's id (Linux), to tell a reused pid from the build that wrote a journal.
pub fn boot_id() -> Option<String> {
    fs_err::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn dir(store: &Store) -> PathBuf {
    store.root().join("journal").join("instance")
}

/// An open journal: every change is on disk before the call returns.
pub struct Journal<'s> {
    store: &'s Store,
    path: PathBuf,
    entry: JournalEntry,
}

impl<'s> Journal<'s> {
    /// Starts the journal of a new build.
    pub fn create(
        store: &'s Store,
        build_id: &str,
        recipe: &str,
        version: &str,
        region: &str,
    ) -> Result<Self, StoreError> {
        let dir = dir(store);
        fs_err::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let journal = Journal {
            store,
            path: dir.join(format!("{build_id}.json")),
            entry: JournalEntry {
                format: JOURNAL_FORMAT.into(),
                build_id: build_id.into(),
                recipe: recipe.into(),
                version: version.into(),
                region: region.into(),
                pid: std::process::id(),
                boot_id: boot_id(),
                started: now_secs(),
                state: BuildState::Running,
                resources: Vec::new(),
            },
        };
        journal.save()?;
        Ok(journal)
    }

    /// Reopens an entry (for `bake cleanup`).
    pub fn open(store: &'s Store, entry: JournalEntry) -> Self {
        Journal {
            store,
            path: dir(store).join(format!("{}.json", entry.build_id)),
            entry,
        }
    }

    pub fn entry(&self) -> &JournalEntry {
        &self.entry
    }

    fn save(&self) -> Result<(), StoreError> {
        let mut bytes = serde_json::to_vec_pretty(&self.entry).expect("journals serialize");
        bytes.push(b'\n');
        self.store.write_atomic(&self.path, &bytes)
    }

    fn position(&self, kind: ResourceKind, name: &str) -> Option<usize> {
        self.entry
            .resources
            .iter()
            .position(|r| r.kind == kind && r.name == name)
    }

    /// Records that `kind` named `name` is about to be created in `region`.
    pub fn intend(
        &mut self,
        kind: ResourceKind,
        region: &str,
        name: &str,
    ) -> Result<(), StoreError> {
        if self.position(kind, name).is_none() {
            self.entry.resources.push(JournalResource {
                kind,
                region: region.into(),
                name: name.into(),
                id: None,
                state: ResourceState::Intended,
            });
        }
        self.save()
    }

    fn set(
        &mut self,
        kind: ResourceKind,
        name: &str,
        id: Option<&str>,
        state: ResourceState,
    ) -> Result<(), StoreError> {
        if let Some(i) = self.position(kind, name) {
            let r = &mut self.entry.resources[i];
            if let Some(id) = id {
                r.id = Some(id.to_owned());
            }
            r.state = state;
        }
        self.save()
    }

    pub fn created(&mut self, kind: ResourceKind, name: &str, id: &str) -> Result<(), StoreError> {
        self.set(kind, name, Some(id), ResourceState::Created)
    }

    pub fn removed(&mut self, kind: ResourceKind, name: &str) -> Result<(), StoreError> {
        self.set(kind, name, None, ResourceState::Removed)
    }

    pub fn kept(&mut self, kind: ResourceKind, name: &str) -> Result<(), StoreError> {
        self.set(kind, name, None, ResourceState::Kept)
    }

    /// Marks the build ended; deletes the file when nothing can be left over.
    pub fn end(mut self) -> Result<(), StoreError> {
        self.entry.state = BuildState::Ended;
        if self.entry.has_leftovers() {
            self.save()
        } else {
            remove(&self.path)
        }
    }

    /// Marks every resource of a given kind and id removed (cleanup found it by tag).
    pub fn removed_id(&mut self, kind: ResourceKind, id: &str) -> Result<(), StoreError> {
        for r in &mut self.entry.resources {
            if r.kind == kind && r.id.as_deref() == Some(id) {
                r.state = ResourceState::Removed;
            }
        }
        self.save()
    }

    /// Marks every remaining resource removed (cleanup has swept the build's tags).
    pub fn all_removed(&mut self) {
        for r in &mut self.entry.resources {
            if matches!(r.state, ResourceState::Intended | ResourceState::Created) {
                r.state = ResourceState::Removed;
            }
        }
    }
}

fn remove(path: &Path) -> Result<(), StoreError> {
    match fs_err::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Every journal in the store (unreadable files are skipped with a warning).
pub fn list(store: &Store) -> Vec<JournalEntry> {
    let dir = dir(store);
    let Ok(read) = fs_err::read_dir(&dir) else {
        return Vec::new();
    };
    let mut entries: Vec<JournalEntry> = read
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let text = fs_err::read(e.path()).ok()?;
            match serde_json::from_slice(&text) {
                Ok(entry) => Some(entry),
                Err(err) => {
                    tracing::warn!(
                        "skipping unreadable journal `{}`: {err}",
                        e.path().display()
                    );
                    None
                }
            }
        })
        .collect();
    entries.sort_by(|a, b| a.build_id.cmp(&b.build_id));
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_recorded_before_and_after_creation_and_the_file_goes_when_clean() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let mut j = Journal::create(&store, "b1", "web", "sha256:00", "us-east-1").unwrap();
        j.intend(ResourceKind::KeyPair, "us-east-1", "bake-b1")
            .unwrap();
        let on_disk = list(&store);
        assert_eq!(on_disk.len(), 1);
        assert_eq!(on_disk[0].resources[0].state, ResourceState::Intended);
        assert!(on_disk[0].has_leftovers());
        assert!(
            !on_disk[0].is_live(),
            "this process wrote it: not another live build"
        );
        j.created(ResourceKind::KeyPair, "bake-b1", "key-1")
            .unwrap();
        assert_eq!(list(&store)[0].resources[0].id.as_deref(), Some("key-1"));
        j.removed(ResourceKind::KeyPair, "bake-b1").unwrap();
        j.end().unwrap();
        assert!(list(&store).is_empty());
    }

    #[test]
    fn an_entry_with_leftovers_survives_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let mut j = Journal::create(&store, "b2", "web", "sha256:00", "us-east-1").unwrap();
        j.intend(ResourceKind::Instance, "us-east-1", "tok")
            .unwrap();
        j.end().unwrap();
        let listed = list(&store);
        assert_eq!(listed[0].state, BuildState::Ended);
        assert!(!listed[0].is_live());
    }

    #[test]
    fn a_dead_pid_is_not_live() {
        let entry = JournalEntry {
            format: JOURNAL_FORMAT.into(),
            build_id: "b".into(),
            recipe: "r".into(),
            version: "v".into(),
            region: "us-east-1".into(),
            pid: i32::MAX as u32,
            boot_id: boot_id(),
            started: 0,
            state: BuildState::Running,
            resources: vec![],
        };
        assert!(!entry.is_live());
        let live = JournalEntry { pid: 1, ..entry };
        assert!(live.is_live(), "pid 1 exists");
    }
}
