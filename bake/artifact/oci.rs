//! The OCI image config and manifest for a build: made with `oci-spec` types and serialized once
//! in canonical JSON (RFC 8785), so that the same build gives the same bytes and digests
//! (oci-spec keeps labels and annotations in hash maps, whose order would otherwise vary).

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::{Duration, UNIX_EPOCH};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, Digest, HistoryBuilder,
    ImageConfigurationBuilder, ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};
use serde::{Deserialize, Serialize};

use crate::recipe::Architecture;

/// A layer of the image, as the build produced or reused it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    /// Digest of the stored (compressed) blob.
    pub digest: String,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: String,
    pub size: u64,
    pub media_type: String,
}

/// One history entry: a step, with or without a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub created_by: String,
    pub comment: Option<String>,
    /// The step changed nothing, so it has no layer.
    pub empty_layer: bool,
}

/// The rendered image settings of a recipe's `outputs.oci`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSettings {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub ports: Vec<String>,
    pub stop_signal: Option<String>,
}

impl ImageSettings {
    pub fn architecture_of(arch: Architecture) -> String {
        arch.oci().to_owned()
    }
}

/// Serialized config and manifest, with their digests.
#[derive(Debug, Clone)]
pub struct ImageBlobs {
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("failed to build the image {what}: {reason}")]
    Build { what: &'static str, reason: String },
}

fn build_err(what: &'static str) -> impl Fn(oci_spec::OciSpecError) -> ImageError {
    move |e| ImageError::Build {
        what,
        reason: e.to_string(),
    }
}

/// RFC 3339 UTC for a SOURCE_DATE_EPOCH.
pub fn rfc3339(epoch: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(epoch)).to_string()
}

/// Canonical JSON bytes of any serializable value.
pub fn canonical_json(value: &impl Serialize) -> Vec<u8> {
    let value = serde_json::to_value(value).expect("OCI documents serialize");
    serde_json_canonicalizer::to_vec(&value).expect("OCI documents canonicalize")
}

fn digest_of(bytes: &[u8]) -> String {
    crate::plan::hash::bytes_digest(bytes)
}

/// Builds the config and manifest of an image from its layers (base first) and history.
pub fn assemble(
    settings: &ImageSettings,
    layers: &[LayerRef],
    history: &[HistoryEntry],
    created_epoch: u64,
    manifest_annotations: &BTreeMap<String, String>,
) -> Result<ImageBlobs, ImageError> {
    let created = rfc3339(created_epoch);
    let mut config = ConfigBuilder::default();
    if !settings.env.is_empty() {
        config = config.env(
            settings
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        );
    }
    if let Some(entrypoint) = &settings.entrypoint {
        config = config.entrypoint(entrypoint.clone());
    }
    if let Some(cmd) = &settings.cmd {
        config = config.cmd(cmd.clone());
    }
    if let Some(user) = &settings.user {
        config = config.user(user.clone());
    }
    if let Some(workdir) = &settings.workdir {
        config = config.working_dir(workdir.clone());
    }
    if !settings.labels.is_empty() {
        config = config.labels(
            settings
                .labels
                .clone()
                .into_iter()
                .collect::<HashMap<_, _>>(),
        );
    }
    if !settings.ports.is_empty() {
        config = config.exposed_ports(settings.ports.clone());
    }
    if let Some(signal) = &settings.stop_signal {
        config = config.stop_signal(signal.clone());
    }
    let config = config.build().map_err(build_err("config"))?;

    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(diff_ids)
        .build()
        .map_err(build_err("rootfs"))?;
    let history = history
        .iter()
        .map(|h| {
            let mut b = HistoryBuilder::default()
                .created(created.clone())
                .created_by(h.created_by.clone())
                .empty_layer(h.empty_layer);
            if let Some(comment) = &h.comment {
                b = b.comment(comment.clone());
            }
            b.build().map_err(build_err("history"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut image = ImageConfigurationBuilder::default()
        .created(created.clone())
        .architecture(Arch::from(settings.architecture.as_str()))
        .os(Os::from(settings.os.as_str()))
        .config(config)
        .rootfs(rootfs)
        .history(history);
    if let Some(variant) = &settings.variant {
        image = image.variant(variant.clone());
    }
    let image = image.build().map_err(build_err("configuration"))?;
    let config_bytes = canonical_json(&image);
    let config_digest = digest_of(&config_bytes);

    let config_descriptor = descriptor(
        MediaType::ImageConfig,
        &config_digest,
        config_bytes.len() as u64,
        None,
    )?;
    let layer_descriptors = layers
        .iter()
        .map(|l| {
            descriptor(
                MediaType::from(l.media_type.as_str()),
                &l.digest,
                l.size,
                None,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut annotations: HashMap<String, String> =
        settings.annotations.clone().into_iter().collect();
    annotations.extend(manifest_annotations.clone());
    annotations
        .entry(oci_spec::image::ANNOTATION_CREATED.to_owned())
        .or_insert(created);
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config_descriptor)
        .layers(layer_descriptors)
        .annotations(annotations)
        .build()
        .map_err(build_err("manifest"))?;
    let manifest_bytes = canonical_json(&manifest);
    let manifest_digest = digest_of(&manifest_bytes);
    Ok(ImageBlobs {
        config: config_bytes,
        config_digest,
        manifest: manifest_bytes,
        manifest_digest,
    })
}

/// A descriptor for a blob.
pub fn descriptor(
    media_type: MediaType,
    digest: &str,
    size: u64,
    annotations: Option<BTreeMap<String, String>>,
) -> Result<Descriptor, ImageError> {
    let digest = Digest::from_str(digest).map_err(build_err("descriptor digest"))?;
    let mut b = DescriptorBuilder::default()
        .media_type(media_type)
        .digest(digest)
        .size(size);
    if let Some(annotations) = annotations {
        b = b.annotations(annotations.into_iter().collect::<HashMap<_, _>>());
    }
    b.build().map_err(build_err("descriptor"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer() -> LayerRef {
        LayerRef {
            digest: format!("sha256:{}", "1".repeat(64)),
            diff_id: format!("sha256:{}", "2".repeat(64)),
            size: 42,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }
    }

    fn settings() -> ImageSettings {
        ImageSettings {
            os: "linux".into(),
            architecture: "amd64".into(),
            entrypoint: Some(vec!["/hello".into()]),
            labels: (0..20)
                .map(|i| (format!("label{i}"), format!("v{i}")))
                .collect(),
            ports: vec!["8080/tcp".into()],
            ..ImageSettings::default()
        }
    }

    #[test]
    fn same_inputs_same_bytes_despite_hash_maps() {
        let history = [HistoryEntry {
            created_by: "file #1".into(),
            comment: None,
            empty_layer: false,
        }];
        let annotations: BTreeMap<String, String> =
            (0..20).map(|i| (format!("a{i}"), format!("{i}"))).collect();
        let first = assemble(&settings(), &[layer()], &history, 0, &annotations).unwrap();
        for _ in 0..5 {
            let again = assemble(&settings(), &[layer()], &history, 0, &annotations).unwrap();
            assert_eq!(first.manifest, again.manifest);
            assert_eq!(first.config, again.config);
        }
        let config: serde_json::Value = serde_json::from_slice(&first.config).unwrap();
        assert_eq!(config["created"], "1970-01-01T00:00:00Z");
        assert_eq!(config["rootfs"]["diff_ids"][0], layer().diff_id);
        assert_eq!(
            config["config"]["ExposedPorts"]["8080/tcp"],
            serde_json::json!({})
        );
    }
}
