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

use crate::store::{BuildRecord, Store, StoreError, digest_hex};

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
    /// What `bake gc` removed of this version, and when (the outputs above still name it, so
    /// `manifest show` answers for a removed AMI id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removals: Vec<Removal>,
}

/// One artifact of the version that `bake gc` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// `ami`, `snapshot` or `image`.
    pub kind: String,
    /// The AMI or snapshot id, or `repository@sha256:…`.
    pub id: String,
    /// Empty for registry images.
    #[serde(default)]
    pub region: String,
    /// RFC 3339.
    pub at: String,
    /// The rule that let it go.
    pub reason: String,
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
    /// A container image that lives in a registry, not in the store (Image Builder built and
    /// pushed it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_image: Option<RemoteImage>,
}

/// A container image built and pushed elsewhere (EC2 Image Builder, to ECR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteImage {
    /// `REPOSITORY@DIGEST`.
    pub reference: String,
    pub digest: String,
    /// The Image Builder image (build version) ARN.
    pub image_arn: String,
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
    /// A channel moved to this version (`promote`) or back to it (`rollback`, or `rollout`
    /// after a failed rollout of another version).
    Channel {
        channel: String,
        /// `promote` or `rollback` (empty in manifests written before bake recorded it).
        #[serde(default)]
        action: String,
        at: String,
        by: String,
    },
    /// A rollout of this version to a channel's machines (`bake rollout`): which groups and
    /// services, when, and how it ended. `at` is when it ended.
    Rollout {
        channel: String,
        outcome: crate::rollout::Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        targets: Vec<RolloutTarget>,
        started_at: String,
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

/// One group or service of a recorded rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutTarget {
    /// `group NAME (REGION)` or `service CLUSTER/NAME (REGION)`.
    pub target: String,
    /// Launch template version or task definition before and after.
    pub from: String,
    pub to: String,
    #[serde(flatten)]
    pub phase: crate::rollout::Phase,
}

impl Publication {
    /// The same thing published again (a re-run that found it in place), whenever and by
    /// whomever; channel moves are events, each kept.
    fn repeats(&self, other: &Publication) -> bool {
        let without_stamp = |p: &Publication| {
            let mut value = serde_json::to_value(p).expect("publications serialize");
            if let Some(map) = value.as_object_mut() {
                map.remove("at");
                map.remove("by");
            }
            value
        };
        !matches!(
            self,
            Publication::Channel { .. } | Publication::Rollout { .. }
        ) && without_stamp(self) == without_stamp(other)
    }
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

/// The AMIs a build record lists, in the manifest's form.
pub(crate) fn record_amis(record: &BuildRecord) -> Vec<AmiRecord> {
    record
        .amis()
        .iter()
        .map(|a| AmiRecord {
            region: a.region.clone(),
            account: None,
            image_id: a.image_id.clone(),
            snapshot_ids: vec![a.snapshot_id.clone()],
            name: record.ami_name().map(str::to_owned),
        })
        .collect()
}

impl Manifest {
    /// The manifest of a built version, from its build record (any artifact kind).
    pub fn from_record(record: &BuildRecord) -> Manifest {
        let inputs = &record.inputs;
        Manifest {
            schema: MANIFEST_SCHEMA.into(),
            name: record.name.clone(),
            version: record.version.to_string(),
            recipe: record.recipe.clone(),
            inputs: Inputs {
                base: serde_json::to_value(&inputs.base).expect("base identities serialize"),
                files: serde_json::to_value(&inputs.files).expect("file inputs serialize"),
                variables: serde_json::to_value(inputs.shown_variables())
                    .expect("variables serialize"),
                recipe_digest: inputs.recipe_digest(),
                source_date_epoch: inputs.source_date_epoch,
                bake_version: record.bake_version.clone(),
                compressor: record.compressor().to_owned(),
            },
            outputs: Outputs {
                oci: record.image().map(|image| OciOutput {
                    manifest_digest: image.image_digest.to_string(),
                    manifest_size: image.manifest_size,
                    media_type: oci_spec::image::MediaType::ImageManifest.to_string(),
                    config_digest: image.config_digest.to_string(),
                    index_digest: None,
                    layers: image.layers.clone(),
                }),
                disk_image: record
                    .disk_ami()
                    .and_then(|a| a.disk_image_digest.as_ref())
                    .map(|digest| DiskImage {
                        digest: digest.to_string(),
                        size: 0,
                    }),
                amis: record_amis(record),
                remote_image: record.imagebuilder_container().map(|c| RemoteImage {
                    reference: format!("{}@{}", c.repository, c.image_digest),
                    digest: c.image_digest.to_string(),
                    image_arn: c.image_arn.clone(),
                }),
            },
            publications: Vec::new(),
            attestations: None,
            timings: Timings {
                started: record.started.clone(),
                build_ms: record.duration_ms,
                attested: None,
            },
            removals: Vec::new(),
        }
    }

    /// The manifest of a version this store did not build (it was published from `--inputs`):
    /// no inputs are known, only its publications.
    pub fn unbuilt(name: &str, version: &str) -> Manifest {
        Manifest {
            schema: MANIFEST_SCHEMA.into(),
            name: name.to_owned(),
            version: version.to_owned(),
            recipe: String::new(),
            inputs: Inputs {
                base: Value::Null,
                files: Value::Null,
                variables: Value::Null,
                recipe_digest: String::new(),
                source_date_epoch: 0,
                bake_version: String::new(),
                compressor: String::new(),
            },
            outputs: Outputs::default(),
            publications: Vec::new(),
            attestations: None,
            timings: Timings {
                started: String::new(),
                build_ms: 0,
                attested: None,
            },
            removals: Vec::new(),
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
                .chain(self.outputs.disk_image.iter().map(|d| &d.digest))
                .chain(self.outputs.remote_image.iter().map(|r| &r.digest));
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
        if query.starts_with("snap-") {
            return self
                .outputs
                .amis
                .iter()
                .any(|a| a.snapshot_ids.iter().any(|s| s == query));
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
        let parsed = self.version.parse::<crate::id::Version>().ok();
        let hex = parsed.as_ref().map_or(self.version.as_str(), |v| v.hex());
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

/// Appends publications to the manifest of `version` of recipe `name`, making an
/// [`Manifest::unbuilt`] one when this store has none (the version was published from
/// `--inputs`), so that `manifest show` finds it from what was published. One write for all
/// of them; one it already lists is not added again.
pub fn record_publications_of(
    store: &Store,
    name: &str,
    version: &str,
    publications: impl IntoIterator<Item = Publication>,
) -> Result<Manifest, ManifestError> {
    let _lock = store.lock()?;
    let mut manifest = match load(store, version)? {
        Some(manifest) => manifest,
        None => match store.record(version)? {
            Some(record) => Manifest::from_record(&record),
            None => Manifest::unbuilt(name, version),
        },
    };
    for publication in publications {
        if !manifest
            .publications
            .iter()
            .any(|p| p.repeats(&publication))
        {
            manifest.publications.push(publication);
        }
    }
    save(store, &manifest)?;
    Ok(manifest)
}

/// The manifest of `version`, written from its build record first if the store has the record
/// and no manifest yet (builds that sign nothing, such as an AMI made on a builder instance).
pub fn ensure(store: &Store, version: &str) -> Result<Option<Manifest>, ManifestError> {
    let _lock = store.lock()?;
    if let Some(manifest) = load(store, version)? {
        return Ok(Some(manifest));
    }
    let Some(record) = store.record(version)? else {
        return Ok(None);
    };
    let manifest = Manifest::from_record(&record);
    save(store, &manifest)?;
    Ok(Some(manifest))
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

impl crate::diagnostic::Diagnose for ManifestError {
    fn hint(&self) -> Option<String> {
        ManifestError::hint(self)
    }

    fn exit_status(&self) -> crate::exit::ExitStatus {
        match self {
            ManifestError::NotFound { .. } | ManifestError::Ambiguous { .. } => {
                crate::exit::ExitStatus::RecipeOrUsage
            }
            _ => crate::exit::ExitStatus::Infrastructure,
        }
    }
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
            removals: Vec::new(),
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
    fn manifests_come_from_every_kind_of_record_and_find_snapshots() {
        let record: BuildRecord = serde_json::from_value(serde_json::json!({
            "format": crate::store::record::RECORD_FORMAT,
            "name": "web", "version": format!("sha256:{}", "e".repeat(64)), "recipe": "web.yaml",
            "bake_version": "0.1.0",
            "inputs": {"format": "bake.version/v1",
                       "recipe": {"name": "web", "variables": {}, "base": {}, "build": {},
                                  "provisioners": [], "tests": [], "outputs": {}},
                       "base": {"kind": "ami", "region": "eu-west-1", "image_id": "ami-0aaaaaaaaaaaaaaaa",
                                "name": null, "creation_date": null, "owner_id": null},
                       "files": [], "builtins": [], "source_date_epoch": 5},
            "started": "", "duration_ms": 9,
            "artifact": {"kind": "instance_ami", "ami": {
                "source": {"region": "eu-west-1", "image_id": "ami-0aaaaaaaaaaaaaaaa"},
                "image_name": "web-eeeeeeeeeeee", "build_id": "b", "host_key": null,
                "regions": [{"region": "eu-west-1", "image_id": "ami-3", "snapshot_id": "snap-3"}]}}
        }))
        .unwrap();
        let manifest = Manifest::from_record(&record);
        assert!(manifest.outputs.oci.is_none());
        assert_eq!(manifest.outputs.amis[0].image_id, "ami-3");
        assert_eq!(manifest.outputs.amis[0].snapshot_ids, ["snap-3"]);
        assert_eq!(
            manifest.outputs.amis[0].name.as_deref(),
            Some("web-eeeeeeeeeeee")
        );
        assert_eq!(manifest.inputs.base["image_id"], "ami-0aaaaaaaaaaaaaaaa");
        assert_eq!(manifest.inputs.source_date_epoch, 5);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        save(&store, &manifest).unwrap();
        assert_eq!(find(&store, "snap-3").unwrap().version, manifest.version);
        assert_eq!(find(&store, "ami-3").unwrap().version, manifest.version);

        // A version published without a local build gets a manifest of its publications.
        let other = format!("sha256:{}", "f".repeat(64));
        record_publications_of(
            &store,
            "web",
            &other,
            [Publication::EcsTaskDefinition {
                arn: "arn:aws:ecs:us-east-1:123456789012:task-definition/web:4".into(),
                at: "t".into(),
                by: "me".into(),
            }],
        )
        .unwrap();
        let found = find(
            &store,
            "arn:aws:ecs:us-east-1:123456789012:task-definition/web:4",
        )
        .unwrap();
        assert_eq!(found.version, other);
        assert!(found.outputs.oci.is_none() && found.inputs.base.is_null());
    }
}
