//! Attestations in registries: push each attestation manifest of a version as an OCI 1.1
//! referrer of the pushed image (by digest, with `subject`), and where the registry has no
//! referrers API (Debian's docker-registry 2.8, older Harbor) keep the `sha256-<hex>` tag
//! fallback: an image index listing the referrers, updated by read-modify-write. Then the other
//! way: fetch an image's attestations from a registry for `bake verify`.
//!
//! The fallback index is racy between concurrent writers (the spec offers no lock); bake writes
//! it once per push, after every referrer manifest is in place, so a lost update only drops a
//! listing that the next push of the same version restores.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{Value, json};

use super::layout::{ATTESTATION_ARTIFACT_TYPE, DSSE_MEDIA_TYPE, PREDICATE_ANNOTATION, Target};
use super::manifest::Manifest;
use crate::registry::client::Access;
use crate::registry::{Client, NoProgress, Reference, RegistryError};
use crate::store::Store;

const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// What attaching did in one repository.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attached {
    /// `registry/repository@sha256:…` of each referrer manifest.
    pub referrers: Vec<String>,
    /// Whether the registry answered the referrers API (else the tag fallback was written).
    pub referrers_api: bool,
    /// The fallback tag written, if any.
    pub fallback_tag: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("version {version} has no attestations to attach; build it with attestations first")]
    NotAttested { version: String },
    #[error("attestation manifest {digest} in the store is not valid JSON")]
    BadReferrer { digest: String },
}

/// The attestation manifests of `manifest` (provenance first, then SBOMs), by digest.
fn referrer_digests(manifest: &Manifest) -> Vec<String> {
    let Some(attestations) = &manifest.attestations else {
        return Vec::new();
    };
    std::iter::once(&attestations.provenance)
        .chain(attestations.sboms.iter().map(|s| &s.attestation))
        .filter_map(|a| a.referrer.clone())
        .collect()
}

/// The blobs (envelopes, SBOMs and the configs of their referrer manifests) that `version`'s
/// attestations need in a registry, digest → size: none when it is not attested. A push sends
/// them beside the image's own blobs, so that only the small referrer manifests wait for it.
pub fn referrer_blobs(store: &Store, version: &str) -> BTreeMap<String, u64> {
    let Ok(Some(manifest)) = super::manifest::load(store, version) else {
        return BTreeMap::new();
    };
    let mut blobs = BTreeMap::new();
    for digest in referrer_digests(&manifest) {
        let Ok(bytes) = store.read_blob(&digest) else {
            continue; // `attach` reports it
        };
        if let Ok(document) = serde_json::from_slice::<Value>(&bytes) {
            add_blobs(&document, &mut blobs);
        }
    }
    blobs
}

/// Adds the config and layers a manifest document names to `blobs`.
fn add_blobs(document: &Value, blobs: &mut BTreeMap<String, u64>) {
    for blob in std::iter::once(&document["config"])
        .chain(document["layers"].as_array().into_iter().flatten())
    {
        if let (Some(digest), Some(size)) = (blob["digest"].as_str(), blob["size"].as_u64()) {
            blobs.insert(digest.to_owned(), size);
        }
    }
}

/// Whether the registry serves the referrers API for `repository` (distribution 2.8 answers
/// 404 for the route).
async fn has_referrers_api(
    client: &Client,
    repository: &Reference,
    digest: &str,
) -> Result<bool, RegistryError> {
    let path = format!("/v2/{}/referrers/{digest}", repository.repository());
    let what = format!("probe the referrers API of `{}`", repository.name());
    let response = client
        .send(repository, Access::Pull, &what, true, |http, base| {
            http.get(format!("{base}{path}"))
                .header("accept", INDEX_MEDIA_TYPE)
        })
        .await?;
    let is_index = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(INDEX_MEDIA_TYPE));
    Ok(response.status().is_success() && is_index)
}

/// Pushes every attestation of `manifest` to `repository` as referrers of the version's image.
pub async fn attach(
    client: &Client,
    store: &Store,
    repository: &Reference,
    manifest: &Manifest,
) -> Result<Attached, AttachError> {
    let referrers = referrer_digests(manifest);
    let subject = manifest
        .outputs
        .oci
        .as_ref()
        .map(|o| o.manifest_digest.clone())
        .unwrap_or_default();
    if referrers.is_empty() || subject.is_empty() {
        return Err(AttachError::NotAttested {
            version: manifest.version.clone(),
        });
    }
    // Each referrer's blobs (the empty config they share is sent once), all at once, then
    // their manifests, all at once.
    let mut documents = Vec::new();
    let mut blobs = BTreeMap::new();
    for digest in &referrers {
        let bytes = store.read_blob(digest).map_err(RegistryError::from)?;
        let document: Value =
            serde_json::from_slice(&bytes).map_err(|_| AttachError::BadReferrer {
                digest: digest.clone(),
            })?;
        add_blobs(&document, &mut blobs);
        documents.push((digest, Bytes::from(bytes), document));
    }
    futures_util::future::try_join_all(blobs.iter().map(|(digest, &size)| async move {
        if !client.blob_exists(repository, digest).await? {
            client
                .push_blob(repository, digest, size, store, &NoProgress)
                .await?;
        }
        Ok::<_, RegistryError>(())
    }))
    .await?;
    futures_util::future::try_join_all(documents.iter().map(|(digest, bytes, _)| {
        client.put_manifest(repository, digest, MANIFEST_MEDIA_TYPE, bytes.clone())
    }))
    .await?;
    let pushed: Vec<String> = documents
        .iter()
        .map(|(digest, _, _)| format!("{}@{digest}", repository.name()))
        .collect();
    let descriptors: Vec<Value> = documents
        .iter()
        .map(|(digest, bytes, document)| {
            json!({
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": digest,
                "size": bytes.len(),
                "artifactType": document.get("artifactType").cloned().unwrap_or(json!(ATTESTATION_ARTIFACT_TYPE)),
                "annotations": document.get("annotations").cloned().unwrap_or(json!({})),
            })
        })
        .collect();
    if has_referrers_api(client, repository, &subject).await? {
        return Ok(Attached {
            referrers: pushed,
            referrers_api: true,
            fallback_tag: None,
        });
    }
    // The tag schema: `sha256-<hex>` names an index of the subject's referrers.
    let tag = subject.replacen(':', "-", 1);
    let tagged = repository.with_tag(&tag).map_err(RegistryError::from)?;
    let mut entries: Vec<Value> = match client.get_manifest(&tagged).await? {
        Some(existing) => serde_json::from_slice::<Value>(&existing.bytes)
            .ok()
            .and_then(|v| v.get("manifests").and_then(Value::as_array).cloned())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    for descriptor in descriptors {
        if !entries.iter().any(|e| e["digest"] == descriptor["digest"]) {
            entries.push(descriptor);
        }
    }
    entries.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": entries,
    });
    client
        .put_manifest(
            repository,
            &tag,
            INDEX_MEDIA_TYPE,
            Bytes::from(crate::artifact::oci::canonical_json(&index)),
        )
        .await?;
    Ok(Attached {
        referrers: pushed,
        referrers_api: false,
        fallback_tag: Some(format!("{}:{tag}", repository.name())),
    })
}

/// The image `reference` points to and the DSSE envelopes attached to it, by referrer digest.
/// Blobs go through the store (verified against their digests on the way).
pub async fn fetch(
    client: &Client,
    store: &Store,
    reference: &Reference,
) -> Result<(Target, Vec<(String, Vec<u8>)>), RegistryError> {
    let info =
        client
            .head_manifest(reference)
            .await?
            .ok_or_else(|| RegistryError::ManifestUnknown {
                reference: reference.to_string(),
            })?;
    let target = Target {
        media_type: info.media_type.clone(),
        digest: info.digest.clone(),
        size: info.size,
        annotations: Default::default(),
    };
    let repository = Reference::repository_only(&reference.name())?;
    let mut envelopes = Vec::new();
    let Some(index) = client.referrers(&repository, &info.digest).await? else {
        return Ok((target, envelopes));
    };
    let index: Value = serde_json::from_slice(&index).unwrap_or(Value::Null);
    for entry in index["manifests"].as_array().into_iter().flatten() {
        let is_attestation = entry["artifactType"] == ATTESTATION_ARTIFACT_TYPE
            || entry["annotations"].get(PREDICATE_ANNOTATION).is_some();
        let Some(digest) = entry["digest"].as_str().filter(|_| is_attestation) else {
            continue;
        };
        let Some(manifest) = client
            .get_manifest(&repository.with_digest(digest)?)
            .await?
        else {
            continue;
        };
        let manifest: Value = serde_json::from_slice(&manifest.bytes).unwrap_or(Value::Null);
        // Only a referrer whose subject is this image counts, whatever index listed it.
        if manifest["subject"]["digest"] != info.digest.as_str() {
            continue;
        }
        for layer in manifest["layers"].as_array().into_iter().flatten() {
            if layer["mediaType"] != DSSE_MEDIA_TYPE {
                continue;
            }
            let (Some(blob), Some(size)) = (layer["digest"].as_str(), layer["size"].as_u64())
            else {
                continue;
            };
            client
                .get_blob(&repository, blob, size, store, &NoProgress)
                .await?;
            envelopes.push((digest.to_owned(), store.read_blob(blob)?));
        }
    }
    Ok((target, envelopes))
}

/// Who is running bake, for the manifest's publication records.
pub fn operator() -> String {
    std::env::var("BAKE_OPERATOR")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| format!("uid {}", rustix::process::getuid().as_raw()))
}

/// After `bake push`: attaches the version's attestations next to each pushed copy and records
/// the pushes and attestations in the version's manifest. A version without a manifest (built
/// with `--no-attest`) has nothing to attach. Returns, per repository, what was attached or why
/// not.
pub async fn attach_pushed(
    client: &Client,
    store: &Store,
    version: &str,
    pushed: &[crate::registry::push::TargetReport],
) -> Vec<(String, Result<Attached, AttachError>)> {
    let manifest = match super::manifest::load(store, version) {
        Ok(Some(manifest)) if manifest.attestations.is_some() => manifest,
        _ => return Vec::new(),
    };
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let by = operator();
    let mut results = Vec::new();
    let mut publications = Vec::new();
    for target in pushed {
        let repository = match Reference::repository_only(&target.repository) {
            Ok(r) => r,
            Err(e) => {
                results.push((
                    target.repository.clone(),
                    Err(AttachError::Registry(e.into())),
                ));
                continue;
            }
        };
        let result = attach(client, store, &repository, &manifest).await;
        publications.push(super::manifest::Publication::Registry {
            reference: target.reference.clone(),
            digest: target.digest.clone(),
            at: at.clone(),
            by: by.clone(),
        });
        for tag in &target.tags {
            publications.push(super::manifest::Publication::Registry {
                reference: format!("{}:{tag}", target.repository),
                digest: target.digest.clone(),
                at: at.clone(),
                by: by.clone(),
            });
        }
        if let Ok(attached) = &result {
            for referrer in &attached.referrers {
                publications.push(super::manifest::Publication::Attestation {
                    reference: referrer.clone(),
                    digest: referrer.rsplit('@').next().unwrap_or_default().to_owned(),
                    at: at.clone(),
                    by: by.clone(),
                });
            }
        }
        results.push((target.repository.clone(), result));
    }
    // Recording is best effort: the registry already holds what was pushed. One durable write
    // for all of it, off the async threads.
    let (store, version) = (store.clone(), version.to_owned());
    let recorded = tokio::task::spawn_blocking(move || {
        super::manifest::record_publications(&store, &version, publications)
    })
    .await
    .expect("recording publications does not panic");
    if let Err(e) = recorded {
        tracing::warn!("failed to record the pushes in the manifest: {e}");
    }
    results
}
