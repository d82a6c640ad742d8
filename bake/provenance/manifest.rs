//! bake's manifest: one JSON document per recipe version that answers "what is this artifact
//! made of, who built it, from what, and where did it go?". Its schema is versioned
//! ([`MANIFEST_SCHEMA`]) and documented in docs/provenance.md.
//!
//! The manifest grows as a version moves on: the build writes inputs, outputs, attestations and
//! timings; pushes and publications append to `publications`; AMI distribution adds to
//! `outputs.amis`. Every update rewrites the whole file atomically under the store lock, at
//! `manifests/<hex>.json` in the store.
//!
//! [`find`] goes the other way: from an image digest, an AMI id, a launch template version or an
//! ECS task definition ARN to the version that produced it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::build::pipeline::BuildRecord;
use crate::store::{Store, StoreError, digest_hex};

/// The schema of the manifest document; bumped on incompatible changes.
pub const MANIFEST_SCHEMA: &str = "bake.manifest/v1";
/// Where manifests live in the store.
pub const MANIFEST_DIR: &str = "manifests";

/// The manifest of one version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: String,
    pub name: String,
    pub version: String,
    /// The recipe file as the user named it.
    pub recipe: String,
    pub inputs: Inputs,
    pub outputs: Outputs,
    #[serde(default)]
    pub publications: Vec<Publication>,
    #[serde(default)]
    pub attestations: Option<Attestations>,
    pub timings: Timings,
}

/// Every resolved input, with its digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    /// The base's pinned identity (image digest, tarball digest, bootstrap configuration,
    /// source AMI per region).
    pub base: Value,
    /// Every file the recipe reads, with its digest.
    pub files: Value,
    /// Variable values; sensitive ones are `{"sensitive": true}` and never their value.
    pub variables: Value,
    /// SHA-256 of the canonical recipe.
    pub recipe_digest: String,
    pub source_date_epoch: u64,
    pub bake_version: String,
    pub compressor: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outputs {
    pub oci: Option<OciOutput>,
    /// The raw disk image an AMI was made from.
    #[serde(default)]
    pub disk_image: Option<DiskImage>,
    #[serde(default)]
    pub amis: Vec<AmiRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciOutput {
    pub manifest_digest: String,
    pub manifest_size: u64,
    pub media_type: String,
    pub config_digest: String,
    /// An image index over several platforms, when there is one.
    #[serde(default)]
    pub index_digest: Option<String>,
    pub layers: Vec<crate::artifact::oci::LayerRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    pub digest: String,
    pub size: u64,
}

/// An AMI of this version in one region and account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmiRecord {
    pub region: String,
    #[serde(default)]
    pub account: Option<String>,
    pub image_id: String,
    #[serde(default)]
    pub snapshot_ids: Vec<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// One place a version was published to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Publication {
    Registry {
        /// `registry/repository:tag` or `…@sha256:…`.
        reference: String,
        digest: String,
        at: String,
        by: String,
    },
    LaunchTemplate {
        region: String,
        id: String,
        version: u64,
        at: String,
        by: String,
    },
    SsmParameter {
        region: String,
        name: String,
        version: u64,
        at: String,
        by: String,
    },
    EcsTaskDefinition {
        arn: String,
        at: String,
        by: String,
    },
    Channel {
        channel: String,
        at: String,
        by: String,
    },
    /// An attestation pushed next to the image (OCI referrer or tag fallback).
    Attestation {
        reference: String,
        digest: String,
        at: String,
        by: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attestations {
    pub signer: SignerInfo,
    pub provenance: AttestationRef,
    #[serde(default)]
    pub sboms: Vec<SbomRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignerInfo {
    pub key_id: String,
    pub algorithm: String,
    /// `file:<path>` or `kms:<key>`.
    pub reference: String,
    pub public_key: String,
}

/// A signed statement in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationRef {
    pub predicate_type: String,
    /// The DSSE envelope blob.
    pub envelope_digest: String,
    /// The statement inside it (the payload bytes).
    pub statement_digest: String,
    /// The OCI artifact manifest that attaches it to the image, if attached.
    #[serde(default)]
    pub referrer: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SbomRef {
    pub format: String,
    pub media_type: String,
    /// The SBOM document blob.
    pub digest: String,
    pub attestation: AttestationRef,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub started: String,
    pub build_ms: u64,
    #[serde(default)]
    pub attested: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no manifest in the store `{}` matches `{query}`", store.display())]
    NotFound { store: PathBuf, query: String },
    #[error("`{query}` matches {count} versions in the store: {}", versions.join(", "))]
    Ambiguous {
        query: String,
        count: usize,
        versions: Vec<String>,
    },
    #[error("failed to write the manifest to `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ManifestError {
    pub fn hint(&self) -> Option<String> {
        match self {
            ManifestError::NotFound { .. } => Some(
                "give a version (sha256:… or a prefix), an image digest, `repo@sha256:…`, an AMI id, `lt-…:VERSION` or a task definition ARN; `bake build` writes the manifest".into(),
            ),
            ManifestError::Ambiguous { .. } => Some("give more digits of the version".into()),
            _ => None,
        }
    }
}

fn variables(inputs: &Value) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(vars) = inputs
        .pointer("/recipe/variables")
        .and_then(Value::as_object)
    {
        for (name, var) in vars {
            let value = if var.get("sensitive").and_then(Value::as_bool) == Some(true) {
                serde_json::json!({"sensitive": true})
            } else {
                var.get("value").cloned().unwrap_or(Value::Null)
            };
            out.insert(name.clone(), value);
        }
    }
    Value::Object(out)
}

/// AMIs that the build record lists (the AMI pipeline writes them as `amis` next to `output`,
/// or inside it), in the manifest's form.
pub(crate) fn record_amis(raw_record: &Value) -> Vec<AmiRecord> {
    let list = raw_record
        .get("amis")
        .or_else(|| raw_record.pointer("/output/amis"))
        // The AMI pipeline's record: `ami.regions[]` of {region, image_id, snapshot_id}.
        .or_else(|| raw_record.pointer("/ami/regions"))
        .and_then(Value::as_array);
    list.into_iter()
        .flatten()
        .filter_map(|a| {
            let s = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_owned);
            let image_id = s("image_id").or_else(|| s("ami_id")).or_else(|| s("id"))?;
            let mut snapshot_ids: Vec<String> = a
                .get("snapshot_ids")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
            snapshot_ids.extend(s("snapshot_id"));
            Some(AmiRecord {
                region: s("region").unwrap_or_default(),
                account: s("account").or_else(|| s("account_id")),
                image_id,
                snapshot_ids,
                name: s("name"),
            })
        })
        .collect()
}

/// The raw disk image an AMI was made from, from either record shape.
fn disk_image_of(raw_record: &Value) -> Option<DiskImage> {
    if let Some(d) = raw_record.get("disk_image") {
        return serde_json::from_value::<DiskImage>(d.clone()).ok();
    }
    raw_record
        .pointer("/ami/disk_image_digest")
        .and_then(Value::as_str)
        .map(|digest| DiskImage {
            digest: digest.to_owned(),
            size: raw_record
                .pointer("/ami/disk_image_size")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        })
}

impl Manifest {
    /// The manifest of a version that only has an AMI record (the snapshot strategy's
    /// `bake.ami-snapshot-record/v1`: name, version, recipe, bake_version, inputs, ami).
    pub fn from_ami_record(raw_record: &Value) -> Option<Manifest> {
        let s = |k: &str| raw_record.get(k).and_then(Value::as_str).map(str::to_owned);
        let inputs = raw_record.get("inputs").cloned().unwrap_or(Value::Null);
        Some(Manifest {
            schema: MANIFEST_SCHEMA.into(),
            name: s("name")?,
            version: s("version")?,
            recipe: s("recipe").unwrap_or_default(),
            inputs: Inputs {
                base: inputs.get("base").cloned().unwrap_or(Value::Null),
                files: inputs.get("files").cloned().unwrap_or(Value::Null),
                variables: variables(&inputs),
                recipe_digest: crate::plan::hash::canonical_digest(
                    inputs.get("recipe").unwrap_or(&Value::Null),
                ),
                source_date_epoch: inputs
                    .get("source_date_epoch")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                bake_version: s("bake_version").unwrap_or_default(),
                compressor: s("compressor").unwrap_or_default(),
            },
            outputs: Outputs {
                oci: None,
                disk_image: disk_image_of(raw_record),
                amis: record_amis(raw_record),
            },
            publications: Vec::new(),
            attestations: None,
            timings: Timings {
                started: s("started").unwrap_or_default(),
                build_ms: raw_record
                    .get("duration_ms")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
                attested: None,
            },
        })
    }
    /// The manifest of a freshly built version, from its build record (`raw_record` is the same
    /// record as JSON, for the fields later pipeline stages add to it).
    pub fn from_record(record: &BuildRecord, raw_record: &Value) -> Manifest {
        let inputs = &record.inputs;
        let disk_image = disk_image_of(raw_record);
        Manifest {
            schema: MANIFEST_SCHEMA.into(),
            name: record.name.clone(),
            version: record.version.clone(),
            recipe: record.recipe.clone(),
            inputs: Inputs {
                base: inputs.get("base").cloned().unwrap_or(Value::Null),
                files: inputs.get("files").cloned().unwrap_or(Value::Null),
                variables: variables(inputs),
                recipe_digest: crate::plan::hash::canonical_digest(
                    inputs.get("recipe").unwrap_or(&Value::Null),
                ),
                source_date_epoch: record.source_date_epoch,
                bake_version: record.bake_version.clone(),
                compressor: record.compressor.clone(),
            },
            outputs: Outputs {
                oci: Some(OciOutput {
                    manifest_digest: record.output.image_digest.clone(),
                    manifest_size: record.output.manifest_size,
                    media_type: oci_spec::image::MediaType::ImageManifest.to_string(),
                    config_digest: record.output.config_digest.clone(),
                    index_digest: None,
                    layers: record.output.layers.clone(),
                }),
                disk_image,
                amis: record_amis(raw_record),
            },
            publications: Vec::new(),
            attestations: None,
            timings: Timings {
                started: record.started.clone(),
                build_ms: record.duration_ms,
                attested: None,
            },
        }
    }

    /// The digests of everything this version produced or was published as.
    fn matches(&self, query: &str) -> bool {
        let query = query.trim();
        let digest_query = query.rsplit_once('@').map_or(query, |(_, d)| d);
        let is_digest = digest_query.starts_with("sha256:");
        if is_digest {
            let ours = self
                .outputs
                .oci
                .iter()
                .flat_map(|o| std::iter::once(&o.manifest_digest).chain(o.index_digest.iter()))
                .chain(self.outputs.disk_image.iter().map(|d| &d.digest));
            let published = self.publications.iter().filter_map(|p| match p {
                Publication::Registry { digest, .. } => Some(digest),
                _ => None,
            });
            let found = ours.chain(published).any(|d| d == digest_query);
            // A version prefix (`sha256:34c5ae…`) names the version itself.
            let version = digest_query.len() >= "sha256:".len() + 6
                && self.version.starts_with(digest_query)
                && !query.contains('@');
            return found || version;
        }
        if query.starts_with("ami-") {
            return self.outputs.amis.iter().any(|a| a.image_id == query);
        }
        if query.starts_with("lt-") {
            let (id, version) = match query.split_once(':') {
                Some((id, v)) => (id, v.parse::<u64>().ok()),
                None => (query, None),
            };
            return self.publications.iter().any(|p| {
                matches!(p, Publication::LaunchTemplate { id: i, version: v, .. }
                    if i == id && version.is_none_or(|want| want == *v))
            });
        }
        if query.starts_with("arn:aws:ecs:") {
            return self
                .publications
                .iter()
                .any(|p| matches!(p, Publication::EcsTaskDefinition { arn, .. } if arn == query));
        }
        // A reference the version was pushed as (`registry/repository:tag`).
        if query.contains('/')
            && self
                .publications
                .iter()
                .any(|p| matches!(p, Publication::Registry { reference, .. } if reference == query))
        {
            return true;
        }
        // A bare hex prefix of the version, or `name:short` as in the store's index.
        let hex = self
            .version
            .strip_prefix("sha256:")
            .unwrap_or(&self.version);
        if query.len() >= 6 && query.bytes().all(|b| b.is_ascii_hexdigit()) {
            return hex.starts_with(query);
        }
        match query.split_once(':') {
            Some((name, short)) if short.len() >= 6 => name == self.name && hex.starts_with(short),
            _ => false,
        }
    }
}

fn manifest_path(store: &Store, version: &str) -> Result<PathBuf, StoreError> {
    Ok(store
        .root()
        .join(MANIFEST_DIR)
        .join(format!("{}.json", digest_hex(version)?)))
}

/// The manifest of `version`, if the store has one.
pub fn load(store: &Store, version: &str) -> Result<Option<Manifest>, ManifestError> {
    let path = manifest_path(store, version)?;
    let bytes = match fs_err::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Io { path, source }.into()),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Corrupt { path, source }.into())
}

/// Writes `manifest` into the store, atomically.
pub fn save(store: &Store, manifest: &Manifest) -> Result<(), ManifestError> {
    let path = manifest_path(store, &manifest.version)?;
    let dir = path.parent().expect("manifest paths have a parent");
    fs_err::create_dir_all(dir).map_err(|source| StoreError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    store.write_atomic(&path, &to_bytes(manifest))?;
    Ok(())
}

/// The manifest's bytes as written (pretty JSON, final newline).
pub fn to_bytes(manifest: &Manifest) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(manifest).expect("manifests serialize");
    bytes.push(b'\n');
    bytes
}

/// Changes the manifest of `version` under the store lock, so concurrent pushes and
/// publications do not lose each other's entries.
pub fn update(
    store: &Store,
    version: &str,
    change: impl FnOnce(&mut Manifest),
) -> Result<Manifest, ManifestError> {
    let _lock = store.lock()?;
    let mut manifest = load(store, version)?.ok_or_else(|| ManifestError::NotFound {
        store: store.root().to_path_buf(),
        query: version.to_owned(),
    })?;
    change(&mut manifest);
    save(store, &manifest)?;
    Ok(manifest)
}

/// Appends publications to the manifest of `version` (one write for all of them); one it
/// already lists is not added again.
pub fn record_publications(
    store: &Store,
    version: &str,
    publications: impl IntoIterator<Item = Publication>,
) -> Result<Manifest, ManifestError> {
    update(store, version, |m| {
        for publication in publications {
            if !m.publications.contains(&publication) {
                m.publications.push(publication);
            }
        }
    })
}

/// Adds (or replaces, by region and image id) an AMI of `version`.
pub fn record_ami(store: &Store, version: &str, ami: AmiRecord) -> Result<Manifest, ManifestError> {
    update(store, version, |m| {
        m.outputs
            .amis
            .retain(|a| !(a.region == ami.region && a.image_id == ami.image_id));
        m.outputs.amis.push(ami);
    })
}

/// Every manifest in the store, by version.
pub fn all(store: &Store) -> Result<Vec<Manifest>, ManifestError> {
    let dir = store.root().join(MANIFEST_DIR);
    let entries = match fs_err::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StoreError::Io { path: dir, source }.into()),
    };
    let mut manifests = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let bytes = fs_err::read(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::Corrupt { path, source })?;
        manifests.push(manifest);
    }
    manifests.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(manifests)
}

/// The one manifest that `query` names: a version (or a prefix of one), an image digest
/// (`sha256:…` or `repo@sha256:…`), an AMI id, a launch template id with its version
/// (`lt-…:3`), an ECS task definition ARN, or `name:short-version`.
pub fn find(store: &Store, query: &str) -> Result<Manifest, ManifestError> {
    let mut found: Vec<Manifest> = all(store)?
        .into_iter()
        .filter(|m| m.version == query || m.matches(query))
        .collect();
    match found.len() {
        0 => Err(ManifestError::NotFound {
            store: store.root().to_path_buf(),
            query: query.to_owned(),
        }),
        1 => Ok(found.remove(0)),
        count => Err(ManifestError::Ambiguous {
            query: query.to_owned(),
            count,
            versions: found.into_iter().map(|m| m.version).collect(),
        }),
    }
}

/// Copies the manifest to `path` (for CI), atomically.
pub fn write_copy(manifest: &Manifest, path: &Path) -> Result<(), ManifestError> {
    use std::io::Write as _;
    let err = |source| ManifestError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(&dir).map_err(err)?;
    file.write_all(&to_bytes(manifest)).map_err(err)?;
    file.as_file().sync_all().map_err(err)?;
    file.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version_digit: char, image_digit: char) -> Manifest {
        Manifest {
            schema: MANIFEST_SCHEMA.into(),
            name: "demo".into(),
            version: format!("sha256:{}", version_digit.to_string().repeat(64)),
            recipe: "demo.yaml".into(),
            inputs: Inputs {
                base: Value::Null,
                files: Value::Null,
                variables: Value::Null,
                recipe_digest: String::new(),
                source_date_epoch: 0,
                bake_version: "0.1.0".into(),
                compressor: "gzip".into(),
            },
            outputs: Outputs {
                oci: Some(OciOutput {
                    manifest_digest: format!("sha256:{}", image_digit.to_string().repeat(64)),
                    manifest_size: 1,
                    media_type: String::new(),
                    config_digest: String::new(),
                    index_digest: None,
                    layers: vec![],
                }),
                ..Outputs::default()
            },
            publications: vec![],
            attestations: None,
            timings: Timings {
                started: String::new(),
                build_ms: 0,
                attested: None,
            },
        }
    }

    #[test]
    fn find_by_every_kind_of_reference() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        save(&store, &manifest('a', 'b')).unwrap();
        save(&store, &manifest('c', 'd')).unwrap();
        let a = format!("sha256:{}", "a".repeat(64));
        record_ami(
            &store,
            &a,
            AmiRecord {
                region: "eu-west-1".into(),
                account: None,
                image_id: "ami-0123456789abcdef0".into(),
                snapshot_ids: vec!["snap-1".into()],
                name: None,
            },
        )
        .unwrap();
        record_publications(
            &store,
            &a,
            [Publication::LaunchTemplate {
                region: "eu-west-1".into(),
                id: "lt-0abc".into(),
                version: 7,
                at: "t".into(),
                by: "me".into(),
            }],
        )
        .unwrap();
        let image_b = format!("sha256:{}", "b".repeat(64));
        for query in [
            a.clone(),
            "aaaaaaa".into(),
            image_b.clone(),
            format!("registry.example/demo@{image_b}"),
            "ami-0123456789abcdef0".into(),
            "lt-0abc:7".into(),
            "demo:aaaaaaaaaaaa".into(),
        ] {
            assert_eq!(find(&store, &query).unwrap().version, a, "{query}");
        }
        assert!(matches!(
            find(&store, "lt-0abc:8"),
            Err(ManifestError::NotFound { .. })
        ));
        assert!(matches!(
            find(&store, "ami-ffffffffffffffff0"),
            Err(ManifestError::NotFound { .. })
        ));
        let error = find(&store, "sha256:").unwrap_err();
        assert!(error.hint().is_some());
    }

    #[test]
    fn amis_come_from_the_record_in_either_place() {
        let raw = serde_json::json!({"amis": [{"region": "us-east-1", "ami_id": "ami-1", "snapshot_id": "snap-1"}]});
        let amis = record_amis(&raw);
        assert_eq!(amis[0].image_id, "ami-1");
        assert_eq!(amis[0].snapshot_ids, ["snap-1"]);
        let snapshot_record = serde_json::json!({
            "format": "bake.ami-snapshot-record/v1", "name": "web", "version": format!("sha256:{}", "e".repeat(64)),
            "recipe": "web.yaml", "bake_version": "0.1.0", "inputs": {"source_date_epoch": 5},
            "ami": {"disk_image_digest": format!("sha256:{}", "f".repeat(64)),
                    "regions": [{"region": "eu-west-1", "image_id": "ami-3", "snapshot_id": "snap-3"}]},
            "duration_ms": 9
        });
        let manifest = Manifest::from_ami_record(&snapshot_record).unwrap();
        assert_eq!(manifest.outputs.amis[0].image_id, "ami-3");
        assert_eq!(manifest.outputs.amis[0].snapshot_ids, ["snap-3"]);
        assert_eq!(
            manifest.outputs.disk_image.unwrap().digest,
            format!("sha256:{}", "f".repeat(64))
        );
        assert_eq!(manifest.inputs.source_date_epoch, 5);
        let nested =
            serde_json::json!({"output": {"amis": [{"region": "r", "image_id": "ami-2"}]}});
        assert_eq!(record_amis(&nested)[0].image_id, "ami-2");
    }
}
