//! The typed plan inputs: exactly what a version is the digest of. Their JSON (canonicalised,
//! RFC 8785) is hashed into the version, so the serialized shape is a compatibility contract:
//! field names, `null` for an absent optional value, and which fields exist must not change
//! without bumping [`super::VERSION_FORMAT`]. Build records keep these inputs, and every stage
//! after the plan reads them through these types, never by JSON pointer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::hash::{FileInput, canonical_digest};
use crate::id::{Digest, Version};

/// What a version is the digest of (see the module docs of [`crate::plan`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanInputs {
    /// bake's version-format string.
    pub format: String,
    pub recipe: RecipeInputs,
    pub base: BaseIdentity,
    pub files: Vec<FileInput>,
    pub builtins: Vec<BuiltinInput>,
    pub source_date_epoch: u64,
}

/// The validated recipe as hashed: templates as written, sensitive values as `***`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipeInputs {
    pub name: String,
    pub variables: BTreeMap<String, VariableInput>,
    /// The base as written (its pinned identity is [`PlanInputs::base`]).
    pub base: Value,
    pub build: Value,
    pub provisioners: Value,
    pub tests: Value,
    pub outputs: Value,
}

/// One variable as hashed (the recipe model's serialized form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariableInput {
    pub kind: Value,
    pub sensitive: bool,
    /// `"***"` for a sensitive variable; `null` for an optional one nobody set.
    pub value: Value,
}

/// The pinned identity of a recipe's base: what cannot move under a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BaseIdentity {
    Scratch,
    /// A registry image, by manifest digest.
    Image {
        repository: String,
        digest: Digest,
    },
    /// An image in an OCI layout directory, by manifest digest.
    OciLayout {
        digest: Digest,
    },
    /// A root file system tarball, by content digest.
    Rootfs {
        digest: Digest,
    },
    /// A Debian/Ubuntu bootstrap, by its full configuration.
    Bootstrap {
        distro: String,
        suite: String,
        variant: String,
        packages: Vec<String>,
        mirror: String,
        components: Vec<String>,
        architecture: String,
        /// Each suite apt reads, pinned by its signed Release file: a moved archive is a new
        /// version.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        archives: Vec<super::archive::PinnedArchive>,
    },
    /// Another recipe, by its version.
    Recipe {
        name: String,
        version: Version,
    },
    /// A source AMI, by its exact id in the build region (a new vendor release is a new
    /// version).
    Ami {
        region: String,
        image_id: String,
        name: Option<String>,
        creation_date: Option<String>,
        owner_id: Option<String>,
    },
}

impl BaseIdentity {
    /// The `kind` it serializes with.
    pub fn kind(&self) -> &'static str {
        match self {
            BaseIdentity::Scratch => "scratch",
            BaseIdentity::Image { .. } => "image",
            BaseIdentity::OciLayout { .. } => "oci_layout",
            BaseIdentity::Rootfs { .. } => "rootfs",
            BaseIdentity::Bootstrap { .. } => "bootstrap",
            BaseIdentity::Recipe { .. } => "recipe",
            BaseIdentity::Ami { .. } => "ami",
        }
    }

    /// The content digest that pins it, for bases that have one.
    pub fn digest(&self) -> Option<&Digest> {
        match self {
            BaseIdentity::Image { digest, .. }
            | BaseIdentity::OciLayout { digest }
            | BaseIdentity::Rootfs { digest } => Some(digest),
            _ => None,
        }
    }
}

/// A script bake itself supplies (a hardening profile), by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltinInput {
    pub profile: String,
    pub flavour: String,
    pub digest: Digest,
}

impl PlanInputs {
    /// The version these inputs define: the digest of their canonical JSON.
    pub fn version(&self) -> Version {
        let digest = canonical_digest(&self.to_value());
        Version::from_digest(digest.parse().expect("canonical_digest gives sha256"))
    }

    /// The inputs as the JSON value that is hashed.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("plan inputs serialize")
    }

    /// The digest of the canonical recipe alone (provenance names the recipe by it).
    pub fn recipe_digest(&self) -> String {
        canonical_digest(&serde_json::to_value(&self.recipe).expect("recipes serialize"))
    }

    /// Variable values as provenance shows them: sensitive ones as `{"sensitive": true}`,
    /// never their value.
    pub fn shown_variables(&self) -> BTreeMap<String, Value> {
        self.recipe
            .variables
            .iter()
            .map(|(name, var)| {
                let value = if var.sensitive {
                    serde_json::json!({"sensitive": true})
                } else {
                    var.value.clone()
                };
                (name.clone(), value)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_serialize_exactly_as_the_version_format_says() {
        let text = r#"{
            "format": "bake.version/v1",
            "recipe": {"name": "web", "variables": {"token": {"kind": "string", "sensitive": true, "value": "***"},
                        "level": {"kind": "string", "sensitive": false, "value": null}},
                       "base": {"ami": {}}, "build": {}, "provisioners": [], "tests": [], "outputs": {}},
            "base": {"kind": "ami", "region": "us-east-1", "image_id": "ami-0123456789abcdef0",
                     "name": null, "creation_date": "2026-01-01T00:00:00.000Z", "owner_id": "123456789012"},
            "files": [{"path": "a.sh", "type": "file", "mode": "0755", "digest": "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}],
            "builtins": [{"profile": "baseline", "flavour": "ami", "digest": "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}],
            "source_date_epoch": 0
        }"#;
        let value: Value = serde_json::from_str(text).unwrap();
        let inputs: PlanInputs = serde_json::from_value(value.clone()).unwrap();
        // Round trip to the same JSON: the version of a stored record's inputs is the version.
        assert_eq!(inputs.to_value(), value);
        assert_eq!(inputs.version().as_str(), canonical_digest(&value));
        assert_eq!(inputs.base.kind(), "ami");
        assert_eq!(
            inputs.shown_variables()["token"],
            serde_json::json!({"sensitive": true})
        );
        assert_eq!(inputs.shown_variables()["level"], Value::Null);
        let scratch = serde_json::to_value(BaseIdentity::Scratch).unwrap();
        assert_eq!(scratch, serde_json::json!({"kind": "scratch"}));
    }
}
