//! Pushing an image from the store: every blob the registry lacks (checked with `HEAD`,
//! mounted from another repository of the same registry when possible, else uploaded), with
//! bounded parallelism; then each manifest after its blobs, the index after its manifests, and
//! the tags last. A second push of the same image sends only `HEAD`s.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{OnceCell, Semaphore};

use super::client::Client;
use super::reference::Reference;
use super::{BlobOutcome, Progress, RegistryError, Result};
use crate::store::{Store, StoreError};

/// Where to push: a repository (no tag, no digest) and the tags to set.
#[derive(Debug, Clone)]
pub struct PushTarget {
    pub repository: Reference,
    pub tags: Vec<String>,
}

/// A manifest or index of the image, in push order.
#[derive(Debug, Clone)]
pub struct ManifestBlob {
    pub digest: String,
    pub media_type: String,
    pub bytes: Bytes,
}

/// Everything an image consists of, read from the store.
#[derive(Debug, Clone)]
pub struct ImageGraph {
    /// The manifest (or index) the image is named by.
    pub digest: String,
    pub media_type: String,
    /// Config and layer blobs (digest → size), each once.
    pub blobs: BTreeMap<String, u64>,
    /// Manifests, children before the index that lists them; the root is last.
    pub manifests: Vec<ManifestBlob>,
}

impl ImageGraph {
    /// Reads image `digest` (a manifest or an index) and all it references from the store.
    pub fn from_store(store: &Store, digest: &str) -> Result<Self> {
        let mut graph = ImageGraph {
            digest: digest.to_owned(),
            media_type: String::new(),
            blobs: BTreeMap::new(),
            manifests: Vec::new(),
        };
        graph.media_type = graph.visit(store, digest, 0)?;
        Ok(graph)
    }

    fn visit(&mut self, store: &Store, digest: &str, depth: usize) -> Result<String> {
        // Indexes of indexes exist, but not deeper than this in practice; a cycle is corrupt.
        const MAX_DEPTH: usize = 4;
        if depth > MAX_DEPTH {
            return Err(RegistryError::NotAnImage {
                what: digest.to_owned(),
                reason: "indexes nest too deeply".into(),
            });
        }
        if self.manifests.iter().any(|m| m.digest == digest) {
            return Ok(String::new());
        }
        let bytes = store.read_blob(digest)?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::NotAnImage {
                what: digest.to_owned(),
                reason: e.to_string(),
            })?;
        let media_type = media_type_of(&value);
        if let Some(children) = value.get("manifests").and_then(Value::as_array) {
            for child in children {
                let child_digest = descriptor_digest(child, digest)?;
                self.visit(store, &child_digest, depth + 1)?;
            }
        } else {
            let config = value
                .get("config")
                .ok_or_else(|| RegistryError::NotAnImage {
                    what: digest.to_owned(),
                    reason: "it has neither `manifests` nor `config`".into(),
                })?;
            self.add_blob(store, config, digest)?;
            for layer in value
                .get("layers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                self.add_blob(store, layer, digest)?;
            }
        }
        self.manifests.push(ManifestBlob {
            digest: digest.to_owned(),
            media_type: media_type.clone(),
            bytes: Bytes::from(bytes),
        });
        Ok(media_type)
    }

    fn add_blob(&mut self, store: &Store, descriptor: &Value, parent: &str) -> Result<()> {
        let digest = descriptor_digest(descriptor, parent)?;
        let size = descriptor
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| RegistryError::NotAnImage {
                what: parent.to_owned(),
                reason: format!("the descriptor of {digest} has no size"),
            })?;
        if !store.has_blob(&digest) {
            return Err(StoreError::MissingBlob { digest }.into());
        }
        self.blobs.insert(digest, size);
        Ok(())
    }
}

/// Makes blob `digest` present in `repository`: already there, mounted from `mount_from`, or
/// uploaded (within the push's upload bound).
#[allow(clippy::too_many_arguments)]
async fn transfer_blob(
    client: &Client,
    store: &Store,
    repository: &Reference,
    digest: &str,
    size: u64,
    mount_from: Option<&str>,
    transfers: &Transfers,
    progress: &dyn Progress,
) -> Result<BlobOutcome> {
    if client.blob_exists(repository, digest).await? {
        return Ok(BlobOutcome::Present);
    }
    if let Some(from) = mount_from
        && from != repository.repository()
        && client.mount_blob(repository, digest, from).await?
    {
        progress.blob_done(digest, size, BlobOutcome::Mounted);
        return Ok(BlobOutcome::Mounted);
    }
    let _permit = transfers
        .uploads
        .acquire()
        .await
        .expect("the upload semaphore is never closed");
    progress.blob_started(digest, size);
    client
        .push_blob(repository, digest, size, store, progress)
        .await?;
    progress.blob_done(digest, size, BlobOutcome::Uploaded);
    Ok(BlobOutcome::Uploaded)
}

fn descriptor_digest(descriptor: &Value, parent: &str) -> Result<String> {
    let digest = descriptor
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| RegistryError::NotAnImage {
            what: parent.to_owned(),
            reason: "a descriptor has no digest".into(),
        })?;
    super::reference::check_digest(parent, digest)?;
    Ok(digest.to_owned())
}

/// The `mediaType` a manifest declares (Docker and OCI manifests both carry it; an OCI one
/// without it is told apart by its shape).
pub fn media_type_of(value: &Value) -> String {
    match value.get("mediaType").and_then(Value::as_str) {
        Some(media_type) => media_type.to_owned(),
        None if value.get("manifests").is_some() => {
            "application/vnd.oci.image.index.v1+json".into()
        }
        None => "application/vnd.oci.image.manifest.v1+json".into(),
    }
}

/// What a push to one repository did.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// `registry/repository`.
    pub repository: String,
    /// `registry/repository@sha256:…`.
    pub reference: String,
    pub digest: String,
    pub tags: Vec<String>,
    pub blobs_uploaded: usize,
    pub blobs_mounted: usize,
    pub blobs_present: usize,
    pub bytes_uploaded: u64,
    /// Bytes not sent because the registry had (or could mount) them.
    pub bytes_skipped: u64,
    pub manifests_pushed: usize,
}

/// A target that failed.
#[derive(Debug)]
pub struct TargetFailure {
    pub repository: String,
    pub error: RegistryError,
}

/// The result of pushing one image to several targets: each target's outcome.
#[derive(Debug, Default)]
pub struct PushOutcome {
    pub pushed: Vec<TargetReport>,
    pub failed: Vec<TargetFailure>,
}

/// One image to push: its manifest (or index) digest in the store, and where it goes.
#[derive(Debug, Clone)]
pub struct PushJob {
    pub digest: String,
    pub targets: Vec<PushTarget>,
    /// Blobs that go with the image without being part of it (its attestations' envelopes and
    /// SBOMs), digest → size: uploaded beside its own, counted in its report.
    pub companions: BTreeMap<String, u64>,
}

/// Pushes image `digest` from the store to every target, one target after another (blobs in
/// parallel within a target), so that later targets on the same registry can mount from
/// earlier ones. Every target is tried; the outcome lists each.
pub async fn push_image(
    client: &Client,
    store: &Store,
    digest: &str,
    targets: &[PushTarget],
    progress: &dyn Progress,
) -> Result<PushOutcome> {
    let job = PushJob {
        digest: digest.to_owned(),
        targets: targets.to_vec(),
        companions: BTreeMap::new(),
    };
    push_job(client, store, &job, &Transfers::new(client), progress).await
}

/// Pushes one image, like [`push_image`], sharing `transfers` with the other images of its
/// batch: a release pushes its images concurrently, each through `push_job` with the same
/// [`Transfers`], so that at most the client's parallelism of uploads are in flight overall and
/// a blob two images share (their base layer) goes to each repository once: the second image
/// waits for the first's upload instead of sending it again.
pub async fn push_job(
    client: &Client,
    store: &Store,
    job: &PushJob,
    transfers: &Transfers,
    progress: &dyn Progress,
) -> Result<PushOutcome> {
    let mut graph = {
        let store = store.clone();
        let digest = job.digest.clone();
        tokio::task::spawn_blocking(move || ImageGraph::from_store(&store, &digest))
            .await
            .expect("reading the image graph does not panic")?
    };
    for (digest, &size) in &job.companions {
        if !store.has_blob(digest) {
            return Err(StoreError::MissingBlob {
                digest: digest.clone(),
            }
            .into());
        }
        graph.blobs.entry(digest.clone()).or_insert(size);
    }
    let mut outcome = PushOutcome::default();
    // Repositories that now hold the blobs, per registry, for mounts.
    let mut holders: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for target in &job.targets {
        let from = holders
            .get(target.repository.registry())
            .and_then(|repos| repos.first().cloned());
        match push_to(
            client,
            store,
            &graph,
            target,
            from.as_deref(),
            transfers,
            progress,
        )
        .await
        {
            Ok(report) => {
                holders
                    .entry(target.repository.registry().to_owned())
                    .or_default()
                    .push(target.repository.repository().to_owned());
                outcome.pushed.push(report);
            }
            Err(error) => outcome.failed.push(TargetFailure {
                repository: target.repository.name(),
                error,
            }),
        }
    }
    Ok(outcome)
}

/// The blob transfers of one batch of images pushed together: each (repository, blob) is
/// looked at once, and uploads share one bound.
pub struct Transfers {
    /// `repository@digest` of each blob → set once the blob is there.
    blobs: std::sync::Mutex<BTreeMap<String, Arc<OnceCell<()>>>>,
    uploads: Semaphore,
}

impl Transfers {
    /// A batch bounded by `client`'s parallelism.
    pub fn new(client: &Client) -> Self {
        Transfers {
            blobs: std::sync::Mutex::new(BTreeMap::new()),
            uploads: Semaphore::new(client.options().parallelism.max(1)),
        }
    }

    fn cell(&self, repository: &Reference, digest: &str) -> Arc<OnceCell<()>> {
        self.blobs
            .lock()
            .expect("transfers lock")
            .entry(format!("{}@{digest}", repository.name()))
            .or_default()
            .clone()
    }
}

/// Pushes `graph` to one target; `mount_from` is a repository on the same registry that has
/// the blobs.
pub async fn push_to(
    client: &Client,
    store: &Store,
    graph: &ImageGraph,
    target: &PushTarget,
    mount_from: Option<&str>,
    transfers: &Transfers,
    progress: &dyn Progress,
) -> Result<TargetReport> {
    let repository = &target.repository;
    for tag in &target.tags {
        repository.with_tag(tag)?;
    }
    let parallelism = client.options().parallelism.max(1);
    let results: Vec<Result<(u64, BlobOutcome)>> = futures_util::stream::iter(graph.blobs.iter())
        .map(|(digest, &size)| async move {
            // Another image of this push may be sending the same blob here: wait for it, and
            // count the blob as present (its bytes are that image's).
            let mut outcome = BlobOutcome::Present;
            let done = &mut outcome;
            transfers
                .cell(repository, digest)
                .get_or_try_init(|| async move {
                    *done = transfer_blob(
                        client, store, repository, digest, size, mount_from, transfers, progress,
                    )
                    .await?;
                    Ok::<_, RegistryError>(())
                })
                .await?;
            if outcome == BlobOutcome::Present {
                progress.blob_done(digest, size, BlobOutcome::Present);
            }
            Ok((size, outcome))
        })
        .buffer_unordered(parallelism)
        .collect()
        .await;
    let mut report = TargetReport {
        repository: repository.name(),
        reference: format!("{}@{}", repository.name(), graph.digest),
        digest: graph.digest.clone(),
        tags: target.tags.clone(),
        blobs_uploaded: 0,
        blobs_mounted: 0,
        blobs_present: 0,
        bytes_uploaded: 0,
        bytes_skipped: 0,
        manifests_pushed: 0,
    };
    let mut first_error = None;
    for result in results {
        match result {
            Ok((size, BlobOutcome::Uploaded)) => {
                report.blobs_uploaded += 1;
                report.bytes_uploaded += size;
            }
            Ok((size, BlobOutcome::Mounted)) => {
                report.blobs_mounted += 1;
                report.bytes_skipped += size;
            }
            Ok((size, _)) => {
                report.blobs_present += 1;
                report.bytes_skipped += size;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    // Manifests after their blobs, children before the index; the root goes by tag (or by
    // digest when there is no tag).
    let (root, children) = graph
        .manifests
        .split_last()
        .expect("an image has at least its own manifest");
    let mut seen = HashSet::new();
    for manifest in children {
        if !seen.insert(&manifest.digest) {
            continue;
        }
        let at = repository.with_digest(&manifest.digest)?;
        if client.head_manifest(&at).await?.is_none() {
            client
                .put_manifest(
                    repository,
                    &manifest.digest,
                    &manifest.media_type,
                    manifest.bytes.clone(),
                )
                .await?;
            report.manifests_pushed += 1;
        }
    }
    if target.tags.is_empty() {
        let at = repository.with_digest(&root.digest)?;
        if client.head_manifest(&at).await?.is_none() {
            client
                .put_manifest(
                    repository,
                    &root.digest,
                    &root.media_type,
                    root.bytes.clone(),
                )
                .await?;
            report.manifests_pushed += 1;
        }
    }
    for tag in &target.tags {
        let tagged = repository.with_tag(tag)?;
        let existing = client.head_manifest(&tagged).await?;
        if existing.as_ref().is_some_and(|e| e.digest == root.digest) {
            continue;
        }
        match client
            .put_manifest(repository, tag, &root.media_type, root.bytes.clone())
            .await
        {
            Ok(_) => report.manifests_pushed += 1,
            Err(error @ RegistryError::Status { .. }) => {
                // An immutable tag (ECR answers 400 with TAG_INVALID): fine if it already
                // points at this image, a clear error if it points elsewhere.
                match client.head_manifest(&tagged).await? {
                    Some(now) if now.digest == root.digest => {}
                    Some(now) => {
                        return Err(RegistryError::ImmutableTag {
                            repository: repository.name(),
                            tag: tag.clone(),
                            existing: now.digest,
                            wanted: root.digest.clone(),
                        });
                    }
                    None => return Err(error),
                }
            }
            Err(error) => return Err(error),
        }
    }
    Ok(report)
}
