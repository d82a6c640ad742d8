//! Pulling a base image into the store: resolve a tag to a digest (at plan time, so the version
//! pins it), pick the recipe's platform from an index, and download config and layers, each
//! verified against its digest and declared size before it is stored. Blobs already in the
//! store are not downloaded again.

use futures_util::StreamExt;
use oci_spec::image::{ImageIndex, ImageManifest};
use serde::Serialize;

use super::client::{Client, ManifestInfo};
use super::reference::Reference;
use super::{Progress, RegistryError, Result};
use crate::store::Store;

/// The digest (and type) a reference names now. Plans call this once, so a tag is pinned.
pub async fn resolve(client: &Client, reference: &Reference) -> Result<ManifestInfo> {
    client
        .head_manifest(reference)
        .await?
        .ok_or_else(|| RegistryError::ManifestUnknown {
            reference: reference.to_string(),
        })
}

/// A pulled image: everything is in the store.
#[derive(Debug, Clone, Serialize)]
pub struct PulledImage {
    /// What the reference named (an index or a manifest).
    pub digest: String,
    /// The platform's manifest (the same as `digest` for a single-platform image).
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<String>,
    /// Bytes downloaded (blobs already stored are not counted).
    pub bytes_downloaded: u64,
}

/// Pulls `reference` (best pinned by digest) for `linux/<architecture>` into the store.
pub async fn pull_image(
    client: &Client,
    store: &Store,
    reference: &Reference,
    architecture: &str,
    progress: &dyn Progress,
) -> Result<PulledImage> {
    let before = client.stats().bytes_downloaded;
    let top = fetch_manifest(client, store, reference, None).await?;
    let (manifest_digest, manifest) = if is_index(&top.1) {
        let index: ImageIndex =
            serde_json::from_slice(&top.1).map_err(|e| RegistryError::NotAnImage {
                what: reference.to_string(),
                reason: format!("its index is invalid: {e}"),
            })?;
        let wanted = |d: &&oci_spec::image::Descriptor| {
            d.platform().as_ref().is_some_and(|p| {
                p.os().to_string() == "linux" && p.architecture().to_string() == architecture
            })
        };
        let chosen = index
            .manifests()
            .iter()
            .find(wanted)
            .or_else(|| match index.manifests().as_slice() {
                [only] if only.platform().is_none() => Some(only),
                _ => None,
            })
            .ok_or_else(|| RegistryError::NoPlatform {
                reference: reference.to_string(),
                platform: format!("linux/{architecture}"),
                available: index
                    .manifests()
                    .iter()
                    .filter_map(|d| {
                        d.platform()
                            .as_ref()
                            .map(|p| format!("{}/{}", p.os(), p.architecture()))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let child = reference.with_digest(chosen.digest().as_ref())?;
        let (digest, bytes) = fetch_manifest(client, store, &child, Some(chosen.size())).await?;
        (digest, bytes)
    } else {
        top.clone()
    };
    let parsed: ImageManifest =
        serde_json::from_slice(&manifest).map_err(|e| RegistryError::NotAnImage {
            what: format!("{}@{manifest_digest}", reference.name()),
            reason: e.to_string(),
        })?;
    let config = parsed.config();
    let mut blobs = vec![(config.digest().to_string(), config.size())];
    blobs.extend(
        parsed
            .layers()
            .iter()
            .map(|l| (l.digest().to_string(), l.size())),
    );
    for (digest, _) in &blobs {
        super::reference::check_digest(&reference.to_string(), digest)?;
    }
    let parallelism = client.options().parallelism.max(1);
    let results: Vec<Result<()>> = futures_util::stream::iter(blobs.iter())
        .map(|(digest, size)| async move {
            progress.blob_started(digest, *size);
            client
                .get_blob(reference, digest, *size, store, progress)
                .await
        })
        .buffer_unordered(parallelism)
        .collect()
        .await;
    for result in results {
        result?;
    }
    Ok(PulledImage {
        digest: top.0,
        manifest_digest,
        config_digest: config.digest().to_string(),
        layers: parsed
            .layers()
            .iter()
            .map(|l| l.digest().to_string())
            .collect(),
        bytes_downloaded: client.stats().bytes_downloaded - before,
    })
}

/// A manifest by reference, verified and stored; returns its digest and bytes.
async fn fetch_manifest(
    client: &Client,
    store: &Store,
    reference: &Reference,
    declared_size: Option<u64>,
) -> Result<(String, Vec<u8>)> {
    if let Some(digest) = reference.digest()
        && store.has_blob(digest)
    {
        return Ok((digest.to_owned(), store.read_blob(digest)?));
    }
    let manifest =
        client
            .get_manifest(reference)
            .await?
            .ok_or_else(|| RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            })?;
    if let Some(size) = declared_size
        && size != manifest.info.size
    {
        return Err(RegistryError::SizeMismatch {
            what: format!("manifest `{reference}`"),
            expected: size,
            actual: manifest.info.size,
        });
    }
    let stored = store.put_blob(&manifest.bytes)?;
    debug_assert_eq!(stored, manifest.info.digest);
    Ok((manifest.info.digest, manifest.bytes.to_vec()))
}

fn is_index(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .is_ok_and(|v| v.get("manifests").is_some_and(serde_json::Value::is_array))
}

/// Pulls the base image `reference`, pinned at `digest` by the plan, for `linux/<architecture>`
/// into the store, from synchronous code (`bake build`). Does nothing when the pinned manifest
/// and everything it names are already stored.
pub fn pull_base_blocking(
    settings: &super::RegistrySettings,
    store: &Store,
    reference: &str,
    digest: &str,
    architecture: &str,
) -> Result<PulledImage> {
    let pinned = reference.parse::<Reference>()?.with_digest(digest)?;
    let settings = settings.clone();
    let store = store.clone();
    let architecture = architecture.to_owned();
    let run = move || -> Result<PulledImage> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| RegistryError::Io {
                path: "<tokio runtime>".into(),
                source,
            })?;
        runtime.block_on(async {
            let credentials = settings.credentials_for(pinned.registry()).await;
            let client = Client::new(settings.client_options(), credentials)?;
            pull_image(&client, &store, &pinned, &architecture, &super::NoProgress).await
        })
    };
    std::thread::spawn(run)
        .join()
        .unwrap_or_else(|_| panic!("the pull thread panicked"))
}
