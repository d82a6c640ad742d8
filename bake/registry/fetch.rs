//! A shared cache for ephemeral CI runners: a version already pushed is taken from its
//! registry instead of being built again.
//!
//! `bake push` tags every image with its version's short form. Before a build, `bake build`
//! asks each of the recipe's push targets for that tag; a manifest whose `dev.bake.version`
//! annotation is the planned version (tags move, so the tag alone proves nothing) is the
//! version's image, byte for byte: it is pulled into the store and a build record is written
//! for it from the plan (a version is the digest of its plan's inputs) and the image, saying
//! where it came from.

use oci_spec::image::{ImageConfiguration, ImageManifest};

use super::client::Client;
use super::pull::{PulledImage, pull_image};
use super::{Reference, Result};
use crate::artifact::oci::LayerRef;
use crate::plan::Plan;
use crate::store::{ANNOTATION_VERSION, Artifact, BuildRecord, OciImage, Store, StoreError};

/// The version's image, found in a registry and now in the store.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// `registry/repository:tag` it was found under.
    pub reference: String,
    pub pulled: PulledImage,
}

/// Asks each repository for the tag of `plan`'s version; pulls the first image that is that
/// version into the store. `None` when no repository has it; a repository whose tag names
/// another image is skipped (and logged).
pub async fn find_version(
    client: &Client,
    store: &Store,
    repositories: &[Reference],
    plan: &Plan,
    architecture: &str,
) -> Result<Option<Fetched>> {
    for repository in repositories {
        let tagged = repository.with_tag(plan.version.short())?;
        let Some(manifest) = client.get_manifest(&tagged).await? else {
            continue;
        };
        let annotated = serde_json::from_slice::<ImageManifest>(&manifest.bytes)
            .ok()
            .and_then(|m| m.annotations().clone())
            .and_then(|a| a.get(ANNOTATION_VERSION).cloned());
        if annotated.as_deref() != Some(plan.version.as_str()) {
            tracing::warn!(
                "{tagged} is not version {} (its manifest says {}): not used",
                plan.version,
                annotated.as_deref().unwrap_or("nothing")
            );
            continue;
        }
        let pinned = repository.with_digest(&manifest.info.digest)?;
        let pulled = pull_image(client, store, &pinned, architecture, &super::NoProgress).await?;
        return Ok(Some(Fetched {
            reference: tagged.to_string(),
            pulled,
        }));
    }
    Ok(None)
}

/// The build record of a fetched version: the plan's inputs, the image as stored.
pub fn record_fetched(
    store: &Store,
    plan: &Plan,
    fetched: &Fetched,
    compressor: String,
) -> std::result::Result<BuildRecord, StoreError> {
    let pulled = &fetched.pulled;
    let manifest_bytes = store.read_blob(&pulled.manifest_digest)?;
    let corrupt = |digest: &str| {
        let path = store.blob_path(digest).unwrap_or_default();
        move |source| StoreError::Corrupt { path, source }
    };
    let manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).map_err(corrupt(&pulled.manifest_digest))?;
    let config: ImageConfiguration =
        serde_json::from_slice(&store.read_blob(&pulled.config_digest)?)
            .map_err(corrupt(&pulled.config_digest))?;
    let layers = manifest
        .layers()
        .iter()
        .zip(config.rootfs().diff_ids())
        .map(|(descriptor, diff_id)| LayerRef {
            digest: descriptor.digest().to_string(),
            diff_id: diff_id.clone(),
            size: descriptor.size(),
            media_type: descriptor.media_type().to_string(),
        })
        .collect();
    let parse = |text: &str| {
        text.parse()
            .map_err(|_| StoreError::BadDigest(text.to_owned()))
    };
    let image = OciImage {
        image_digest: parse(&pulled.manifest_digest)?,
        config_digest: parse(&pulled.config_digest)?,
        manifest_size: manifest_bytes.len() as u64,
        layers,
        steps: Vec::new(),
        compressor,
    };
    let mut record = BuildRecord::new(
        &plan.name,
        &plan.version,
        &plan.recipe,
        &plan.inputs,
        Artifact::OciImage { image },
    );
    record.started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    record.fetched_from = Some(fetched.reference.clone());
    Ok(record)
}
