//! The layer cache in a registry (`build.cache: REPOSITORY`), for CI runners that start with an
//! empty store: like BuildKit's registry cache, each step's cache entry is kept as a small OCI
//! artifact tagged by its key (everything before the step), so a fresh runner whose recipe
//! changed only in its last step takes every earlier layer from the registry and runs only that
//! step.
//!
//! One entry: a manifest of artifact type [`ARTIFACT_TYPE`] whose config is the entry as the
//! store keeps it (the step's history line and layer descriptor) and whose one layer (none for a
//! step that changed nothing) is the step's layer blob, tagged `bake-cache-<kind>-<key>`.

use bytes::Bytes;
use serde_json::json;

use super::pipeline::{CachedStep, cache_keys};
use crate::plan::Plan;
use crate::recipe::Recipe;
use crate::registry::{Client, NoProgress, Reference, Result};
use crate::store::Store;

pub const ARTIFACT_TYPE: &str = "application/vnd.bake.layer-cache.v1";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.bake.layer-cache.entry.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// What an import or export did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// Entries taken from (or sent to) the registry.
    pub entries: usize,
    /// Entries already where they were going.
    pub present: usize,
}

fn tag(kind: &str, key: &str) -> String {
    format!("bake-cache-{kind}-{}", crate::id::hex_part(key))
}

/// Takes every entry of this build the store lacks and the registry has into the store.
pub async fn import(
    client: &Client,
    repository: &Reference,
    store: &Store,
    recipe: &Recipe,
    plan: &Plan,
) -> Result<Moved> {
    let mut moved = Moved::default();
    for (kind, key) in cache_keys(recipe, plan) {
        let local = store.cached::<CachedStep>(kind, &key)?;
        if local.is_some_and(|c| c.layer.is_none_or(|l| store.has_blob(&l.digest))) {
            moved.present += 1;
            continue;
        }
        let Some(manifest) = client
            .get_manifest(&repository.with_tag(&tag(kind, &key))?)
            .await?
        else {
            continue;
        };
        let Ok(parsed) = serde_json::from_slice::<serde_json::Value>(&manifest.bytes) else {
            continue;
        };
        if parsed["artifactType"] != ARTIFACT_TYPE {
            tracing::warn!(
                "{repository}:{} is not a bake layer-cache entry",
                tag(kind, &key)
            );
            continue;
        }
        let (Some(config), Some(size)) = (
            parsed["config"]["digest"].as_str(),
            parsed["config"]["size"].as_u64(),
        ) else {
            continue;
        };
        client
            .get_blob(repository, config, size, store, &NoProgress)
            .await?;
        let Ok(entry) = serde_json::from_slice::<CachedStep>(&store.read_blob(config)?) else {
            continue;
        };
        if let Some(layer) = &entry.layer {
            client
                .get_blob(repository, &layer.digest, layer.size, store, &NoProgress)
                .await?;
        }
        store.put_cached(kind, &key, &entry)?;
        moved.entries += 1;
    }
    Ok(moved)
}

/// Sends every entry of this build the store has and the registry lacks.
pub async fn export(
    client: &Client,
    repository: &Reference,
    store: &Store,
    recipe: &Recipe,
    plan: &Plan,
) -> Result<Moved> {
    let mut moved = Moved::default();
    for (kind, key) in cache_keys(recipe, plan) {
        let Some(entry) = store.cached::<CachedStep>(kind, &key)? else {
            continue;
        };
        let tagged = repository.with_tag(&tag(kind, &key))?;
        if client.head_manifest(&tagged).await?.is_some() {
            moved.present += 1;
            continue;
        }
        let config = serde_json::to_vec(&entry).expect("cache entries serialize");
        let config_digest = store.put_blob(&config)?;
        client
            .push_blob(
                repository,
                &config_digest,
                config.len() as u64,
                store,
                &NoProgress,
            )
            .await?;
        let mut layers = Vec::new();
        if let Some(layer) = &entry.layer {
            client
                .push_blob(repository, &layer.digest, layer.size, store, &NoProgress)
                .await?;
            layers.push(json!({
                "mediaType": layer.media_type,
                "digest": layer.digest,
                "size": layer.size,
            }));
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config.len()},
            "layers": layers,
            "annotations": {"dev.bake.cache-key": key, "dev.bake.cache-kind": kind},
        });
        let bytes = Bytes::from(serde_json::to_vec(&manifest).expect("manifests serialize"));
        client
            .put_manifest(repository, &tag(kind, &key), MANIFEST_MEDIA_TYPE, bytes)
            .await?;
        moved.entries += 1;
    }
    Ok(moved)
}
