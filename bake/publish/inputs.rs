//! What publishing consumes: the artifacts of one built version (AMI ids per region, pushed
//! image references by digest). Loaded from an explicit JSON file or from the version's build
//! record, so publishing does not depend on how the build stages store their results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The artifacts of one built version of a recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishInputs {
    /// The recipe's `name`.
    pub recipe: String,
    /// The version, `sha256:<64 hex>`.
    pub version: String,
    /// Region → AMI id.
    #[serde(default)]
    pub amis: BTreeMap<String, String>,
    /// Images pushed for this version, by digest.
    #[serde(default)]
    pub images: Vec<ImageRef>,
}

/// An image pushed to a repository, pinned by its manifest digest.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// `registry/name`, without a tag or digest.
    pub repository: String,
    /// `sha256:<64 hex>`.
    pub digest: String,
}

impl ImageRef {
    /// `repository@sha256:…`, the only form bake ever writes into a task definition.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }

    /// Parses `repository@sha256:<64 hex>`.
    pub fn parse(text: &str) -> Option<Self> {
        let (repository, digest) = text.rsplit_once('@')?;
        (!repository.is_empty() && is_digest(digest)).then(|| ImageRef {
            repository: repository.to_owned(),
            digest: digest.to_owned(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InputsError {
    #[error("failed to read publish inputs `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("publish inputs `{}` are not valid JSON of the expected shape", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("publish inputs: {0}")]
    Invalid(String),
}

pub(crate) fn is_digest(text: &str) -> bool {
    text.parse::<crate::id::Digest>().is_ok()
}

pub(crate) fn is_ami_id(text: &str) -> bool {
    text.strip_prefix("ami-").is_some_and(|h| {
        (8..=17).contains(&h.len())
            && h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

impl PublishInputs {
    /// Reads and checks a `PublishInputs` JSON file.
    pub fn from_file(path: &Path) -> Result<Self, InputsError> {
        let text = fs_err::read_to_string(path).map_err(|source| InputsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let inputs: PublishInputs =
            serde_json::from_str(&text).map_err(|source| InputsError::Parse {
                path: path.to_owned(),
                source,
            })?;
        inputs.check()?;
        Ok(inputs)
    }

    /// Takes the inputs from the version's build record: its AMIs (any strategy), and its
    /// image in each of `repositories` (the recipe's push targets: a push keeps the manifest's
    /// bytes, so its digest; the registry is asked before anything points at it).
    pub fn from_record(
        record: &crate::store::BuildRecord,
        repositories: &[String],
    ) -> Result<Self, InputsError> {
        let amis = record
            .amis()
            .iter()
            .map(|r| (r.region.clone(), r.image_id.clone()))
            .collect();
        let images = match record.imagebuilder_container() {
            // Image Builder pushed it to one repository, its container recipe's target: the
            // recipe's other repositories never got it.
            Some(container) => vec![ImageRef {
                repository: container.repository.clone(),
                digest: container.image_digest.to_string(),
            }],
            None => record
                .image_digest()
                .map(|digest| {
                    repositories
                        .iter()
                        .map(|repository| ImageRef {
                            repository: repository.clone(),
                            digest: digest.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        let inputs = PublishInputs {
            recipe: record.name.clone(),
            version: record.version.to_string(),
            amis,
            images,
        };
        inputs.check()?;
        Ok(inputs)
    }

    /// Every id has the shape AWS or OCI gives it.
    pub fn check(&self) -> Result<(), InputsError> {
        if !is_digest(&self.version) {
            return Err(InputsError::Invalid(format!(
                "version `{}` is not `sha256:<64 lowercase hex>`",
                self.version
            )));
        }
        for (region, ami) in &self.amis {
            if !crate::recipe::is_region(region) {
                return Err(InputsError::Invalid(format!(
                    "`{region}` is not an AWS region"
                )));
            }
            if !is_ami_id(ami) {
                return Err(InputsError::Invalid(format!(
                    "`{ami}` (for {region}) is not an AMI id"
                )));
            }
        }
        for image in &self.images {
            if !is_digest(&image.digest) {
                return Err(InputsError::Invalid(format!(
                    "digest `{}` of `{}` is not `sha256:<64 lowercase hex>`",
                    image.digest, image.repository
                )));
            }
            if image.repository.contains('@') || image.repository.is_empty() {
                return Err(InputsError::Invalid(format!(
                    "repository `{}` must not be empty or carry a digest",
                    image.repository
                )));
            }
        }
        Ok(())
    }

    /// The first 12 hex digits of the version (checked by [`PublishInputs::check`]; an
    /// unchecked malformed one gives its text unchanged).
    pub fn version_short(&self) -> &str {
        match self.version.parse::<crate::id::Version>() {
            Ok(version) => {
                let short = version.short();
                let start = self.version.len() - version.hex().len();
                &self.version[start..start + short.len()]
            }
            Err(_) => &self.version,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_parse_only_with_a_digest() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let parsed = ImageRef::parse(&format!("127.0.0.1:5000/web@{digest}")).unwrap();
        assert_eq!(parsed.repository, "127.0.0.1:5000/web");
        assert_eq!(parsed.reference(), format!("127.0.0.1:5000/web@{digest}"));
        assert!(ImageRef::parse("127.0.0.1:5000/web:latest").is_none());
        assert!(ImageRef::parse("web@sha256:abc").is_none());
    }

    #[test]
    fn inputs_reject_malformed_ids() {
        let good = PublishInputs {
            recipe: "web".into(),
            version: format!("sha256:{}", "0".repeat(64)),
            amis: [("us-east-1".to_owned(), "ami-0123456789abcdef0".to_owned())].into(),
            images: vec![],
        };
        good.check().unwrap();
        let mut bad = good.clone();
        bad.amis.insert("us-east-1".into(), "i-123".into());
        assert!(
            bad.check()
                .unwrap_err()
                .to_string()
                .contains("not an AMI id")
        );
        let mut bad = good.clone();
        bad.version = "v1".into();
        assert!(bad.check().is_err());
        let mut bad = good;
        bad.images.push(ImageRef {
            repository: "r/x".into(),
            digest: "sha256:XYZ".into(),
        });
        assert!(bad.check().is_err());
    }

    fn record(artifact: serde_json::Value) -> crate::store::BuildRecord {
        serde_json::from_value(serde_json::json!({
            "format": crate::store::record::RECORD_FORMAT,
            "name": "web", "version": format!("sha256:{}", "c".repeat(64)), "recipe": "web.yaml",
            "bake_version": "0.1.0",
            "inputs": {"format": "bake.version/v1",
                       "recipe": {"name": "web", "variables": {}, "base": "scratch", "build": {},
                                  "provisioners": [], "tests": [], "outputs": {}},
                       "base": {"kind": "scratch"}, "files": [], "builtins": [], "source_date_epoch": 0},
            "started": "", "duration_ms": 0,
            "artifact": artifact,
        }))
        .unwrap()
    }

    fn regions() -> serde_json::Value {
        serde_json::json!([
            {"region": "us-east-1", "image_id": "ami-0123456789abcdef0", "snapshot_id": "snap-1"},
            {"region": "eu-west-1", "image_id": "ami-0fedcba9876543210", "snapshot_id": "snap-2"}
        ])
    }

    #[test]
    fn inputs_come_from_every_kind_of_build_record() {
        let digest = format!("sha256:{}", "d".repeat(64));
        let repositories = ["127.0.0.1:5000/web".to_owned()];
        let both = record(serde_json::json!({
            "kind": "oci_image_and_disk_ami",
            "image": {"image_digest": digest, "config_digest": digest, "manifest_size": 1,
                      "layers": [], "steps": [], "compressor": "gzip"},
            "ami": {"disk_image_digest": null, "regions": regions()}
        }));
        let inputs = PublishInputs::from_record(&both, &repositories).unwrap();
        assert_eq!(inputs.recipe, "web");
        assert_eq!(inputs.version_short(), "cccccccccccc");
        assert_eq!(inputs.amis.len(), 2);
        assert_eq!(inputs.amis["eu-west-1"], "ami-0fedcba9876543210");
        assert_eq!(
            inputs.images,
            [ImageRef {
                repository: "127.0.0.1:5000/web".into(),
                digest
            }]
        );
        // An AMI made on a builder instance reaches publishing like any other.
        let instance = record(serde_json::json!({
            "kind": "instance_ami",
            "ami": {"source": {"region": "us-east-1", "image_id": "ami-0aaaaaaaaaaaaaaaa"},
                    "image_name": "web", "build_id": null, "host_key": null, "regions": regions()}
        }));
        let inputs = PublishInputs::from_record(&instance, &repositories).unwrap();
        assert_eq!(inputs.amis["us-east-1"], "ami-0123456789abcdef0");
        assert!(inputs.images.is_empty());
    }
}
