//! The build record: what the store keeps of one built version (`records/<hex>.json`), and the
//! one type every later stage reads it through (push, export, publish, attest, verify, the
//! manifest). A shared header (recipe, version, the plan inputs the version is the digest of,
//! timings, the compliance gate's result) and one [`Artifact`] variant per kind of output:
//! an OCI image, an AMI made from a disk image (snapshot strategy), an AMI made on a builder
//! instance, or an image and AMIs made from the same provisioned root.
//!
//! The format is versioned ([`RECORD_FORMAT`]). Records of the formats bake wrote before it
//! (one per stage: `bake.record/v1` for images, `bake.ami-snapshot-record/v1` and
//! `bake.ami-instance-record/v1` for AMIs) are read and converted; anything else is refused
//! with an error naming the file, never guessed at.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Store, StoreError};
use crate::ami::RegionImage;
use crate::ami::boot::BootReport;
use crate::ami::incremental::UploadSummary;
use crate::ami::instance::SourceAmi;
use crate::artifact::oci::LayerRef;
use crate::audit::AuditRecord;
use crate::build::pipeline::StepReport;
use crate::id::{Digest, Version, VersionPrefix};
use crate::plan::PlanInputs;

/// The record format this bake writes; bumped when its shape changes.
pub const RECORD_FORMAT: &str = "bake.build-record/v2";

/// Formats of earlier bakes that are still read (and converted).
const OCI_V1: &str = "bake.record/v1";
const SNAPSHOT_V1: &str = "bake.ami-snapshot-record/v1";
const INSTANCE_V1: &str = "bake.ami-instance-record/v1";

/// One built version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    pub format: String,
    /// The recipe's `name`.
    pub name: String,
    pub version: Version,
    /// The recipe file as the user named it.
    pub recipe: String,
    /// The bake that built it.
    pub bake_version: String,
    /// Exactly what the version is the digest of.
    pub inputs: PlanInputs,
    /// RFC 3339; empty for records converted from a format that kept no start time.
    pub started: String,
    pub duration_ms: u64,
    /// The compliance gate's result, when the recipe has an `audit:` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditRecord>,
    pub artifact: Artifact,
    /// Where the version was taken from instead of being built here (`registry/repo:tag`):
    /// a CI runner with an empty store fetched what another run had pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetched_from: Option<String>,
}

/// What a build made.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Artifact {
    OciImage {
        image: OciImage,
    },
    /// `outputs.ami.strategy: snapshot`.
    DiskAmi {
        ami: DiskAmi,
    },
    /// `outputs.ami.strategy: instance`.
    InstanceAmi {
        ami: InstanceAmi,
    },
    /// `outputs.oci` and `outputs.ami` (snapshot), from one provisioned root.
    OciImageAndDiskAmi {
        image: OciImage,
        ami: DiskAmi,
    },
    /// `bake build --engine imagebuilder`: AMIs EC2 Image Builder made from the recipe's
    /// compiled components, on the source AMI.
    ImageBuilderAmi {
        ami: ImageBuilderAmi,
    },
    /// `bake build --engine imagebuilder` of a recipe with `outputs.oci`: a container image EC2
    /// Image Builder built and pushed to ECR. It lives in ECR, not in the store: readers that
    /// need the image's blobs (push, export, audit, SBOMs) find no [`OciImage`]; those that need
    /// its digest ([`BuildRecord::image_digest`]: publish, manifest show) find it here.
    ImageBuilderContainer {
        image: ImageBuilderContainer,
    },
}

/// An OCI image in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OciImage {
    /// The manifest's digest.
    pub image_digest: Digest,
    pub config_digest: Digest,
    pub manifest_size: u64,
    pub layers: Vec<LayerRef>,
    pub steps: Vec<StepReport>,
    /// What determines the compressed bytes (and so the layer digests).
    pub compressor: String,
}

/// AMIs registered from a raw disk image bake made and uploaded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskAmi {
    /// The raw disk image that was uploaded; `None` only for AMIs registered by an earlier
    /// run whose record is gone.
    pub disk_image_digest: Option<Digest>,
    /// One per region, the first where the AMI was made.
    pub regions: Vec<RegionImage>,
    /// The recipe's boot tests that the disk image passed before it was uploaded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boots: Vec<BootReport>,
    /// How the first region's snapshot was uploaded: from which parent, or why in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadSummary>,
}

/// An AMI made by `CreateImage` from a provisioned builder instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceAmi {
    /// The image the builder started from.
    pub source: SourceAmi,
    pub image_name: String,
    pub build_id: Option<String>,
    /// The builder's SSH host key fingerprint, as pinned during the build.
    pub host_key: Option<String>,
    /// One per region, the build region first.
    pub regions: Vec<RegionImage>,
}

/// AMIs EC2 Image Builder made (`bake build --engine imagebuilder`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageBuilderAmi {
    /// The parent image the build started from.
    pub source: SourceAmi,
    /// The Image Builder image (build version) ARN.
    pub image_arn: String,
    /// The output AMIs' name.
    pub image_name: String,
    /// The build's workflow execution ids.
    pub workflow_executions: Vec<String>,
    /// One per region, the build region first.
    pub regions: Vec<RegionImage>,
}

/// A container image EC2 Image Builder built and pushed to ECR.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageBuilderContainer {
    /// The image it was built on, as the container recipe names it (pinned by digest).
    pub parent_image: String,
    /// The Image Builder image (build version) ARN.
    pub image_arn: String,
    /// The build's workflow execution ids.
    pub workflow_executions: Vec<String>,
    /// Where the image is: `ACCOUNT.dkr.ecr.REGION.amazonaws.com/NAME`.
    pub repository: String,
    /// Its manifest's digest, as the registry answered for the URIs Image Builder named.
    pub image_digest: Digest,
    /// The tagged URIs Image Builder reported (`outputResources.containers[].imageUris`).
    pub image_uris: Vec<String>,
}

impl BuildRecord {
    /// A record of the current format.
    pub fn new(
        name: &str,
        version: &Version,
        recipe: &str,
        inputs: &PlanInputs,
        artifact: Artifact,
    ) -> BuildRecord {
        BuildRecord {
            format: RECORD_FORMAT.to_owned(),
            name: name.to_owned(),
            version: version.clone(),
            recipe: recipe.to_owned(),
            bake_version: env!("CARGO_PKG_VERSION").to_owned(),
            inputs: inputs.clone(),
            started: String::new(),
            duration_ms: 0,
            audit: None,
            artifact,
            fetched_from: None,
        }
    }

    /// The OCI image, if the version has one.
    pub fn image(&self) -> Option<&OciImage> {
        match &self.artifact {
            Artifact::OciImage { image } | Artifact::OciImageAndDiskAmi { image, .. } => {
                Some(image)
            }
            Artifact::DiskAmi { .. }
            | Artifact::InstanceAmi { .. }
            | Artifact::ImageBuilderAmi { .. }
            | Artifact::ImageBuilderContainer { .. } => None,
        }
    }

    /// The digest of the version's OCI image, in the store or (Image Builder) in ECR.
    pub fn image_digest(&self) -> Option<&Digest> {
        match &self.artifact {
            Artifact::ImageBuilderContainer { image } => Some(&image.image_digest),
            _ => self.image().map(|i| &i.image_digest),
        }
    }

    /// The container image Image Builder made, if it did.
    pub fn imagebuilder_container(&self) -> Option<&ImageBuilderContainer> {
        match &self.artifact {
            Artifact::ImageBuilderContainer { image } => Some(image),
            _ => None,
        }
    }

    /// The AMIs, one per region (none for an image-only version).
    pub fn amis(&self) -> &[RegionImage] {
        match &self.artifact {
            Artifact::DiskAmi { ami } | Artifact::OciImageAndDiskAmi { ami, .. } => &ami.regions,
            Artifact::InstanceAmi { ami } => &ami.regions,
            Artifact::ImageBuilderAmi { ami } => &ami.regions,
            Artifact::OciImage { .. } | Artifact::ImageBuilderContainer { .. } => &[],
        }
    }

    /// The disk image AMIs were registered from, if any.
    pub fn disk_ami(&self) -> Option<&DiskAmi> {
        match &self.artifact {
            Artifact::DiskAmi { ami } | Artifact::OciImageAndDiskAmi { ami, .. } => Some(ami),
            _ => None,
        }
    }

    /// The instance build, if the AMI was made on a builder.
    pub fn instance_ami(&self) -> Option<&InstanceAmi> {
        match &self.artifact {
            Artifact::InstanceAmi { ami } => Some(ami),
            _ => None,
        }
    }

    /// The Image Builder build, if EC2 Image Builder made the AMIs.
    pub fn imagebuilder_ami(&self) -> Option<&ImageBuilderAmi> {
        match &self.artifact {
            Artifact::ImageBuilderAmi { ami } => Some(ami),
            _ => None,
        }
    }

    /// The name the AMIs were given, when a builder (not bake) chose it.
    pub fn ami_name(&self) -> Option<&str> {
        match &self.artifact {
            Artifact::InstanceAmi { ami } => Some(&ami.image_name),
            Artifact::ImageBuilderAmi { ami } => Some(&ami.image_name),
            _ => None,
        }
    }

    /// What decided the layers' bytes (empty without an image).
    pub fn compressor(&self) -> &str {
        self.image().map_or("", |i| i.compressor.as_str())
    }
}

fn path_of(store: &Store, version: &str) -> Result<PathBuf, StoreError> {
    Ok(store
        .root()
        .join("records")
        .join(format!("{}.json", super::digest_hex(version)?)))
}

/// The build record of `version`, if the store has one (converted from an earlier format
/// when it is one bake still reads).
pub fn load(store: &Store, version: &str) -> Result<Option<BuildRecord>, StoreError> {
    let path = path_of(store, version)?;
    let Some(value) = store.read_json::<Value>(&path)? else {
        return Ok(None);
    };
    from_value(&path, value).map(Some)
}

/// Writes `record` as the build record of its version, atomically.
pub fn save(store: &Store, record: &BuildRecord) -> Result<(), StoreError> {
    let path = path_of(store, &record.version)?;
    store.write_json(&path, record)
}

/// Every version the store has a record of, in order.
pub fn versions(store: &Store) -> Result<Vec<Version>, StoreError> {
    let dir = store.root().join("records");
    let entries = match fs_err::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StoreError::Io { path: dir, source }),
    };
    let mut found: Vec<Version> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".json")?.to_owned();
            format!("sha256:{name}").parse().ok()
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Every version the store has a record of whose hex starts with `prefix`.
pub fn versions_with_prefix(
    store: &Store,
    prefix: &VersionPrefix,
) -> Result<Vec<Version>, StoreError> {
    let mut found = versions(store)?;
    found.retain(|version| prefix.matches(version));
    Ok(found)
}

/// The records of recipe `name`'s versions other than `except` whose AMIs were registered from
/// a disk image, the most recently started first. A record that cannot be read is passed over:
/// it names no parent.
pub fn disk_amis_of(
    store: &Store,
    name: &str,
    except: &str,
) -> Result<Vec<BuildRecord>, StoreError> {
    let dir = store.root().join("records");
    let entries = match fs_err::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(StoreError::Io { path: dir, source }),
    };
    let mut found: Vec<(String, std::time::SystemTime, BuildRecord)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let hex = e.file_name().to_str()?.strip_suffix(".json")?.to_owned();
            let written = e.metadata().and_then(|m| m.modified()).ok()?;
            let record = load(store, &format!("sha256:{hex}")).ok().flatten()?;
            Some((record.started.clone(), written, record))
        })
        .filter(|(_, _, r)| r.name == name && r.version != except && r.disk_ami().is_some())
        .collect();
    // `started` is RFC 3339 in UTC with seconds (the text sorts as the time does); versions
    // started within one second are told apart by when their records were written.
    found.sort_by(|a, b| (&b.0, b.1).cmp(&(&a.0, a.1)));
    Ok(found.into_iter().map(|(_, _, record)| record).collect())
}

fn corrupt(path: &Path) -> impl FnOnce(serde_json::Error) -> StoreError + '_ {
    move |source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads a record of any format bake knows.
fn from_value(path: &Path, value: Value) -> Result<BuildRecord, StoreError> {
    #[derive(Deserialize)]
    struct Format {
        #[serde(default)]
        format: Option<String>,
    }
    let format = Format::deserialize(&value)
        .map_err(corrupt(path))?
        .format
        .unwrap_or_default();
    match format.as_str() {
        RECORD_FORMAT => serde_json::from_value(value).map_err(corrupt(path)),
        OCI_V1 => {
            let old: OciRecordV1 = serde_json::from_value(value).map_err(corrupt(path))?;
            Ok(old.into())
        }
        SNAPSHOT_V1 => {
            let old: SnapshotRecordV1 = serde_json::from_value(value).map_err(corrupt(path))?;
            Ok(old.into())
        }
        INSTANCE_V1 => {
            let old: InstanceRecordV1 = serde_json::from_value(value).map_err(corrupt(path))?;
            Ok(old.into())
        }
        _ => Err(StoreError::RecordFormat {
            path: path.to_path_buf(),
            format,
        }),
    }
}

/// `bake.record/v1`: an OCI image build.
#[derive(Deserialize)]
struct OciRecordV1 {
    name: String,
    version: Version,
    recipe: String,
    bake_version: String,
    inputs: PlanInputs,
    compressor: String,
    output: OciOutputV1,
    started: String,
    duration_ms: u64,
    #[serde(default)]
    audit: Option<AuditRecord>,
}

#[derive(Deserialize)]
struct OciOutputV1 {
    image_digest: Digest,
    config_digest: Digest,
    manifest_size: u64,
    layers: Vec<LayerRef>,
    steps: Vec<StepReport>,
}

impl From<OciRecordV1> for BuildRecord {
    fn from(old: OciRecordV1) -> BuildRecord {
        BuildRecord {
            format: RECORD_FORMAT.to_owned(),
            name: old.name,
            version: old.version,
            recipe: old.recipe,
            bake_version: old.bake_version,
            inputs: old.inputs,
            started: old.started,
            duration_ms: old.duration_ms,
            audit: old.audit,
            fetched_from: None,
            artifact: Artifact::OciImage {
                image: OciImage {
                    image_digest: old.output.image_digest,
                    config_digest: old.output.config_digest,
                    manifest_size: old.output.manifest_size,
                    layers: old.output.layers,
                    steps: old.output.steps,
                    compressor: old.compressor,
                },
            },
        }
    }
}

/// `bake.ami-snapshot-record/v1`: a snapshot-strategy AMI.
#[derive(Deserialize)]
struct SnapshotRecordV1 {
    name: String,
    version: Version,
    recipe: String,
    bake_version: String,
    inputs: PlanInputs,
    ami: DiskAmiV1,
    #[serde(default)]
    audit: Option<AuditRecord>,
    #[serde(default)]
    boots: Vec<BootReport>,
    duration_ms: u64,
}

#[derive(Deserialize)]
struct DiskAmiV1 {
    #[serde(default)]
    disk_image_digest: Option<Digest>,
    regions: Vec<RegionImage>,
}

impl From<SnapshotRecordV1> for BuildRecord {
    fn from(old: SnapshotRecordV1) -> BuildRecord {
        BuildRecord {
            format: RECORD_FORMAT.to_owned(),
            name: old.name,
            version: old.version,
            recipe: old.recipe,
            bake_version: old.bake_version,
            inputs: old.inputs,
            started: String::new(),
            duration_ms: old.duration_ms,
            audit: old.audit,
            fetched_from: None,
            artifact: Artifact::DiskAmi {
                ami: DiskAmi {
                    disk_image_digest: old.ami.disk_image_digest,
                    regions: old.ami.regions,
                    boots: old.boots,
                    upload: None,
                },
            },
        }
    }
}

/// `bake.ami-instance-record/v1`: an instance-strategy AMI (it kept no recipe path or bake
/// version).
#[derive(Deserialize)]
struct InstanceRecordV1 {
    inputs: PlanInputs,
    source: SourceAmi,
    output: InstanceOutputV1,
    duration_ms: u64,
}

#[derive(Deserialize)]
struct InstanceOutputV1 {
    name: String,
    version: Version,
    image_name: String,
    build_id: Option<String>,
    host_key: Option<String>,
    regions: Vec<RegionImage>,
}

impl From<InstanceRecordV1> for BuildRecord {
    fn from(old: InstanceRecordV1) -> BuildRecord {
        BuildRecord {
            format: RECORD_FORMAT.to_owned(),
            name: old.output.name,
            version: old.output.version,
            recipe: String::new(),
            bake_version: String::new(),
            inputs: old.inputs,
            started: String::new(),
            duration_ms: old.duration_ms,
            audit: None,
            fetched_from: None,
            artifact: Artifact::InstanceAmi {
                ami: InstanceAmi {
                    source: old.source,
                    image_name: old.output.image_name,
                    build_id: old.output.build_id,
                    host_key: old.output.host_key,
                    regions: old.output.regions,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn inputs() -> Value {
        json!({
            "format": "bake.version/v1",
            "recipe": {"name": "web", "variables": {}, "base": "scratch", "build": {},
                       "provisioners": [], "tests": [], "outputs": {}},
            "base": {"kind": "scratch"},
            "files": [],
            "builtins": [],
            "source_date_epoch": 7
        })
    }

    fn version() -> String {
        format!("sha256:{}", "c".repeat(64))
    }

    fn digest(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn region(region: &str, ami: &str) -> Value {
        json!({"region": region, "image_id": ami, "snapshot_id": "snap-0123456789abcdef0"})
    }

    fn store_with(record: &Value) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let path = path_of(&store, &version()).unwrap();
        store.write_json(&path, record).unwrap();
        (dir, store)
    }

    #[test]
    fn records_of_each_earlier_format_are_read_with_their_artifacts() {
        let oci = json!({
            "format": "bake.record/v1", "name": "web", "version": version(), "recipe": "web.yaml",
            "bake_version": "0.1.0", "inputs": inputs(), "source_date_epoch": 7, "compressor": "gzip-6",
            "output": {"name": "web", "version": version(), "image_digest": digest('a'),
                       "config_digest": digest('b'), "manifest_size": 400, "layers": [], "cached": false, "steps": []},
            "started": "2026-01-01T00:00:00Z", "duration_ms": 5
        });
        let (_dir, store) = store_with(&oci);
        let record = load(&store, &version()).unwrap().unwrap();
        assert_eq!(record.format, RECORD_FORMAT);
        assert_eq!(
            record.image().unwrap().image_digest.to_string(),
            digest('a')
        );
        assert_eq!(record.compressor(), "gzip-6");
        assert!(record.amis().is_empty());

        let snapshot = json!({
            "format": "bake.ami-snapshot-record/v1", "name": "web", "version": version(),
            "recipe": "web.yaml", "bake_version": "0.1.0", "inputs": inputs(),
            "ami": {"disk_image_digest": digest('f'), "regions": [region("eu-west-1", "ami-0123456789abcdef0")]},
            "duration_ms": 9
        });
        let (_dir, store) = store_with(&snapshot);
        let record = load(&store, &version()).unwrap().unwrap();
        assert!(record.image().is_none());
        assert_eq!(record.amis()[0].image_id, "ami-0123456789abcdef0");
        assert_eq!(
            record
                .disk_ami()
                .unwrap()
                .disk_image_digest
                .as_ref()
                .unwrap()
                .to_string(),
            digest('f')
        );

        // The instance strategy's record kept its AMIs under `output.regions`: once invisible
        // to publish, attest and the manifest.
        let instance = json!({
            "format": "bake.ami-instance-record/v1", "inputs": inputs(),
            "source": {"region": "us-east-1", "image_id": "ami-0fedcba9876543210", "name": "vendor",
                       "creation_date": null, "owner_id": "123456789012", "architecture": "x86_64"},
            "output": {"name": "web", "version": version(), "region": "us-east-1",
                       "image_id": "ami-0123456789abcdef0", "image_name": "web-cccccccccccc",
                       "source_ami": "ami-0fedcba9876543210", "build_id": "b-1", "host_key": null,
                       "cached": false, "regions": [region("us-east-1", "ami-0123456789abcdef0")]},
            "duration_ms": 3
        });
        let (_dir, store) = store_with(&instance);
        let record = load(&store, &version()).unwrap().unwrap();
        assert_eq!(record.name, "web");
        assert_eq!(record.amis()[0].image_id, "ami-0123456789abcdef0");
        assert_eq!(
            record.instance_ami().unwrap().source.image_id,
            "ami-0fedcba9876543210"
        );
    }

    #[test]
    fn a_record_round_trips_and_unknown_formats_are_refused_naming_the_file() {
        let inputs: PlanInputs = serde_json::from_value(inputs()).unwrap();
        let version: Version = version().parse().unwrap();
        let record = BuildRecord::new(
            "web",
            &version,
            "web.yaml",
            &inputs,
            Artifact::OciImageAndDiskAmi {
                image: OciImage {
                    image_digest: digest('a').parse().unwrap(),
                    config_digest: digest('b').parse().unwrap(),
                    manifest_size: 1,
                    layers: vec![],
                    steps: vec![],
                    compressor: "zstd-3".into(),
                },
                ami: DiskAmi {
                    disk_image_digest: Some(digest('d').parse().unwrap()),
                    regions: vec![
                        serde_json::from_value(region("us-east-1", "ami-0123456789abcdef0"))
                            .unwrap(),
                    ],
                    boots: vec![],
                    upload: None,
                },
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        save(&store, &record).unwrap();
        let read = load(&store, &version).unwrap().unwrap();
        assert_eq!(
            serde_json::to_value(&read).unwrap(),
            serde_json::to_value(&record).unwrap()
        );
        assert!(read.image().is_some() && read.amis().len() == 1);
        assert_eq!(
            versions_with_prefix(&store, &"cccccccccccc".parse().unwrap()).unwrap(),
            std::slice::from_ref(&version)
        );

        let (_dir, store) = store_with(&json!({"format": "bake.build/1", "amis": {}}));
        let error = load(&store, &version).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("bake.build/1") && message.contains("records/"),
            "{message}"
        );
        let (_dir, store) = store_with(&json!({"name": "no format"}));
        assert!(matches!(
            load(&store, &version),
            Err(StoreError::RecordFormat { .. })
        ));
    }
}
