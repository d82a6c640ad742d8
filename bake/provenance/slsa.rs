//! SLSA provenance v1 inside an in-toto Statement v1, made from a build record.
//!
//! bake's build type (`https://bake.dev/buildtypes/recipe/v1`, documented in
//! docs/provenance.md) puts what the user controlled in `externalParameters` (the recipe, its
//! non-sensitive variable values, the SOURCE_DATE_EPOCH) and every resolved input in
//! `resolvedDependencies` with its digest (the base, each file the recipe reads, the canonical
//! recipe itself). Only `runDetails.metadata` (invocation id, start and finish times) differs
//! between two builds of the same inputs.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::plan::PlanInputs;
use crate::plan::hash::canonical_digest;
use crate::store::BuildRecord;

/// What provenance says about a build, from its build record (of any artifact kind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildFacts {
    pub name: String,
    pub version: String,
    pub recipe: String,
    pub bake_version: String,
    pub inputs: PlanInputs,
    pub source_date_epoch: u64,
    pub compressor: String,
    /// RFC 3339.
    pub started: String,
    pub duration_ms: u64,
    /// The remote build service that ran the build, when bake did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteBuild>,
}

/// A build that a service ran for bake: its builder id and the service's own name for the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteBuild {
    pub builder_id: String,
    pub invocation_id: String,
}

/// The builder id of a build EC2 Image Builder ran (`bake build --engine imagebuilder`).
pub const IMAGEBUILDER_BUILDER_ID: &str = "https://bake.dev/builders/ec2-imagebuilder/v1";

impl From<&BuildRecord> for BuildFacts {
    fn from(record: &BuildRecord) -> Self {
        BuildFacts {
            name: record.name.clone(),
            version: record.version.to_string(),
            recipe: record.recipe.clone(),
            bake_version: record.bake_version.clone(),
            inputs: record.inputs.clone(),
            source_date_epoch: record.inputs.source_date_epoch,
            compressor: record.compressor().to_owned(),
            // Records converted from a format that kept no start time: the time of attesting
            // stands in.
            started: if record.started.is_empty() {
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
            } else {
                record.started.clone()
            },
            duration_ms: record.duration_ms,
            // The image ARN and its workflow executions name the run on Image Builder.
            remote: record.imagebuilder_ami().map(|ib| RemoteBuild {
                builder_id: IMAGEBUILDER_BUILDER_ID.into(),
                invocation_id: std::iter::once(ib.image_arn.as_str())
                    .chain(ib.workflow_executions.iter().map(String::as_str))
                    .collect::<Vec<_>>()
                    .join(" "),
            }),
        }
    }
}

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const SLSA_PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
pub const BUILD_TYPE: &str = "https://bake.dev/buildtypes/recipe/v1";
/// The builder id of a bake run on a machine the user controls (no hosted trust root).
pub const LOCAL_BUILDER_ID: &str = "https://bake.dev/builders/local/v1";

/// An in-toto subject: a name and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    pub name: String,
    /// `sha256:<hex>`.
    pub digest: String,
}

impl Subject {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "digest": sha256_set(&self.digest),
        })
    }
}

/// The parts of a statement that differ between runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDetails {
    pub builder_id: String,
    pub invocation_id: String,
    /// RFC 3339.
    pub started_on: String,
    pub finished_on: String,
}

impl RunDetails {
    /// The run that produced `record`, with a fresh invocation id (for a build a service ran,
    /// that service's builder id and its name for the run).
    pub fn of(record: &BuildFacts, invocation_id: String) -> RunDetails {
        let started = humantime::parse_rfc3339(&record.started).ok();
        let finished = started
            .map(|s| s + std::time::Duration::from_millis(record.duration_ms))
            .map(|f| humantime::format_rfc3339_seconds(f).to_string())
            .unwrap_or_else(|| record.started.clone());
        let (builder_id, invocation_id) = match &record.remote {
            Some(remote) => (remote.builder_id.clone(), remote.invocation_id.clone()),
            None => (LOCAL_BUILDER_ID.into(), invocation_id),
        };
        RunDetails {
            builder_id,
            invocation_id,
            started_on: record.started.clone(),
            finished_on: finished,
        }
    }
}

/// An in-toto Statement v1.
pub fn statement(subjects: &[Subject], predicate_type: &str, predicate: Value) -> Value {
    json!({
        "_type": STATEMENT_TYPE,
        "subject": subjects.iter().map(Subject::to_json).collect::<Vec<_>>(),
        "predicateType": predicate_type,
        "predicate": predicate,
    })
}

/// An in-toto digest set: `{"sha256": "<hex>"}`.
fn sha256_set(digest: &str) -> Value {
    let hex = digest
        .parse::<crate::id::Digest>()
        .map_or_else(|_| digest.to_owned(), |d| d.hex().to_owned());
    json!({ "sha256": hex })
}

/// Every resolved input, as in-toto resource descriptors.
pub fn resolved_dependencies(record: &BuildFacts) -> Vec<Value> {
    use crate::plan::BaseIdentity;
    let inputs = &record.inputs;
    let mut deps = Vec::new();
    deps.push(json!({
        "uri": format!("bake:recipe/{}", record.name),
        "name": record.recipe,
        "digest": sha256_set(&inputs.recipe_digest()),
        "mediaType": "application/vnd.bake.recipe+json",
    }));
    let base = &inputs.base;
    if *base != BaseIdentity::Scratch {
        let uri = match base {
            BaseIdentity::Image { repository, digest } => format!("oci://{repository}@{digest}"),
            BaseIdentity::Bootstrap {
                distro,
                suite,
                variant,
                ..
            } => format!("mmdebstrap:{distro}/{suite}?variant={variant}"),
            BaseIdentity::Ami {
                region, image_id, ..
            } => crate::provenance::ami::ami_arn(region, image_id),
            other => format!("bake:base/{}", other.kind()),
        };
        let annotations = serde_json::to_value(base).expect("base identities serialize");
        // A base with a content digest (image, layout, tarball) is pinned by it; a bootstrap
        // by its full configuration, a base recipe or an AMI by its identity.
        let digest = base
            .digest()
            .map(|d| sha256_set(&d.to_string()))
            .unwrap_or_else(|| sha256_set(&canonical_digest(&annotations)));
        deps.push(json!({
            "uri": uri,
            "name": "base",
            "digest": digest,
            "annotations": annotations,
        }));
    }
    // Each package archive the bootstrap read, by the Release file the plan pinned.
    if let BaseIdentity::Bootstrap { archives, .. } = base {
        for archive in archives {
            deps.push(json!({
                "uri": format!("{}/dists/{}/InRelease", archive.mirror.trim_end_matches('/'), archive.suite),
                "name": format!("archive {}", archive.suite),
                "digest": sha256_set(&archive.release.to_string()),
            }));
        }
    }
    for file in &inputs.files {
        let mut dep = json!({"uri": format!("file:{}", file.path), "name": file.path});
        let value = serde_json::to_value(file).expect("file inputs serialize");
        dep["digest"] = match &file.digest {
            Some(digest) => sha256_set(digest),
            // Directories and symlinks have no content digest: pin their metadata.
            None => sha256_set(&canonical_digest(&value)),
        };
        let mut annotations = Map::new();
        for key in ["type", "mode", "target"] {
            if let Some(v) = value.get(key) {
                annotations.insert(key.into(), v.clone());
            }
        }
        dep["annotations"] = Value::Object(annotations);
        deps.push(dep);
    }
    for builtin in &inputs.builtins {
        deps.push(json!({
            "uri": format!("bake:builtin/hardening/{}/{}", builtin.profile, builtin.flavour),
            "digest": sha256_set(&builtin.digest.to_string()),
        }));
    }
    deps
}

/// The SLSA v1 predicate of `record`'s build.
pub fn predicate(record: &BuildFacts, run: &RunDetails, byproducts: Vec<Value>) -> Value {
    let mut predicate = json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "recipe": {"path": record.recipe, "name": record.name},
                "variables": record.inputs.shown_variables(),
                "sourceDateEpoch": record.source_date_epoch,
                "version": record.version,
            },
            "internalParameters": {
                "bakeVersion": record.bake_version,
                "compressor": record.compressor,
                "versionFormat": record.inputs.format,
            },
            "resolvedDependencies": resolved_dependencies(record),
        },
        "runDetails": {
            "builder": {
                "id": run.builder_id,
                "version": {"bake": record.bake_version},
            },
            "metadata": {
                "invocationId": run.invocation_id,
                "startedOn": run.started_on,
                "finishedOn": run.finished_on,
            },
        },
    });
    if !byproducts.is_empty() {
        predicate["runDetails"]["byproducts"] = Value::Array(byproducts);
    }
    predicate
}

/// What `bake verify` prints about a verified provenance.
#[derive(Debug, Clone, Serialize)]
pub struct ProvenanceSummary {
    pub build_type: String,
    pub builder_id: String,
    pub recipe: Option<String>,
    pub name: Option<String>,
    pub version: Option<String>,
    pub bake_version: Option<String>,
    pub started_on: Option<String>,
    pub finished_on: Option<String>,
    pub resolved_dependencies: usize,
    pub subjects: Vec<Subject>,
}

impl ProvenanceSummary {
    pub fn of(statement: &Value) -> ProvenanceSummary {
        let s = |pointer: &str| {
            statement
                .pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        ProvenanceSummary {
            build_type: s("/predicate/buildDefinition/buildType").unwrap_or_default(),
            builder_id: s("/predicate/runDetails/builder/id").unwrap_or_default(),
            recipe: s("/predicate/buildDefinition/externalParameters/recipe/path"),
            name: s("/predicate/buildDefinition/externalParameters/recipe/name"),
            version: s("/predicate/buildDefinition/externalParameters/version"),
            bake_version: s("/predicate/buildDefinition/internalParameters/bakeVersion"),
            started_on: s("/predicate/runDetails/metadata/startedOn"),
            finished_on: s("/predicate/runDetails/metadata/finishedOn"),
            resolved_dependencies: statement
                .pointer("/predicate/buildDefinition/resolvedDependencies")
                .and_then(Value::as_array)
                .map_or(0, Vec::len),
            subjects: subjects_of(statement),
        }
    }
}

/// The subjects of a statement (those with a sha256), as `sha256:<hex>` digests.
pub fn subjects_of(statement: &Value) -> Vec<Subject> {
    statement
        .get("subject")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let hex = s.pointer("/digest/sha256").and_then(Value::as_str)?;
            Some(Subject {
                name: s
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("_")
                    .to_owned(),
                digest: format!("sha256:{}", hex.to_ascii_lowercase()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> BuildRecord {
        serde_json::from_value(json!({
            "format": crate::store::record::RECORD_FORMAT,
            "name": "demo",
            "version": format!("sha256:{}", "1".repeat(64)),
            "recipe": "demo.yaml",
            "bake_version": "0.1.0",
            "inputs": {
                "format": "bake.version/v1",
                "base": {"kind": "bootstrap", "distro": "debian", "suite": "bookworm", "variant": "minbase",
                         "packages": [], "mirror": "http://deb.debian.org/debian", "components": ["main"],
                         "architecture": "amd64",
                         "archives": [{"mirror": "http://deb.debian.org/debian", "suite": "bookworm",
                                       "release": format!("sha256:{}", "5".repeat(64))}]},
                "files": [
                    {"path": "app/bin", "type": "file", "mode": "0755", "digest": format!("sha256:{}", "2".repeat(64))},
                    {"path": "app", "type": "directory", "mode": "0755"}
                ],
                "recipe": {"name": "demo", "base": null, "build": {}, "provisioners": [], "tests": [],
                           "outputs": {}, "variables": {
                    "greeting": {"kind": "string", "sensitive": false, "value": "hi"},
                    "token": {"kind": "string", "sensitive": true, "value": "***"}
                }},
                "builtins": [],
                "source_date_epoch": 1700000000
            },
            "started": "2026-01-01T00:00:00Z",
            "duration_ms": 61000,
            "artifact": {"kind": "oci_image", "image": {
                "image_digest": format!("sha256:{}", "3".repeat(64)),
                "config_digest": format!("sha256:{}", "4".repeat(64)),
                "manifest_size": 1, "layers": [], "steps": [], "compressor": "gzip-6"
            }}
        }))
        .unwrap()
    }

    #[test]
    fn provenance_holds_inputs_with_digests_and_no_secrets() {
        let record = record();
        let facts = BuildFacts::from(&record);
        let run = RunDetails::of(&facts, "inv-1".into());
        assert_eq!(run.finished_on, "2026-01-01T00:01:01Z");
        let subject = Subject {
            name: "demo".into(),
            digest: record.image().unwrap().image_digest.to_string(),
        };
        let statement = statement(
            std::slice::from_ref(&subject),
            SLSA_PREDICATE_TYPE,
            predicate(&facts, &run, vec![]),
        );
        assert_eq!(statement["subject"][0]["digest"]["sha256"], "3".repeat(64));
        let external = &statement["predicate"]["buildDefinition"]["externalParameters"];
        assert_eq!(external["variables"]["greeting"], "hi");
        assert_eq!(external["variables"]["token"], json!({"sensitive": true}));
        let deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
            .as_array()
            .unwrap();
        assert_eq!(deps.len(), 5, "recipe, base, its archive, two files");
        assert!(
            deps.iter()
                .all(|d| d["digest"]["sha256"].as_str().unwrap().len() == 64)
        );
        assert_eq!(deps[1]["uri"], "mmdebstrap:debian/bookworm?variant=minbase");
        assert_eq!(
            deps[2]["uri"],
            "http://deb.debian.org/debian/dists/bookworm/InRelease"
        );
        assert_eq!(deps[2]["digest"]["sha256"], "5".repeat(64));
        assert_eq!(deps[3]["digest"]["sha256"], "2".repeat(64));
        let summary = ProvenanceSummary::of(&statement);
        assert_eq!(summary.subjects, [subject]);
        assert_eq!(summary.version.as_deref(), Some(record.version.as_str()));
    }
}
