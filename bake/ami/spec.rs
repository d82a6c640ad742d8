//! What to make, rendered: the recipe's `outputs.ami` with every per-region template filled in
//! for one version. The AMI stages take this, never the recipe, so any strategy (or a test)
//! can hand them one.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{TAG_RECIPE, TAG_VERSION};
use crate::recipe::template::{Context, Renderer, Secrets, render_map};
use crate::recipe::{Recipe, RecipeError};

/// One region's rendered settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSpec {
    pub region: String,
    /// The AMI name (unique per account and region).
    pub name: String,
    pub description: Option<String>,
    /// The recipe's tags plus bake's own (`bake:recipe`, `bake:version`).
    pub tags: BTreeMap<String, String>,
    /// The KMS key for this region's snapshot (id, alias or ARN); `None`: the account's
    /// default EBS key (when encrypted).
    pub kms_key_id: Option<String>,
}

/// Who may launch the AMI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sharing {
    pub accounts: Vec<String>,
    pub organizations: Vec<String>,
    pub organizational_units: Vec<String>,
    /// Launchable by everyone. Never implied.
    pub public: bool,
}

/// An AMI to make, fully rendered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmiSpec {
    pub recipe: String,
    /// `sha256:<hex>`.
    pub version: String,
    /// The EC2 architecture name (`x86_64`, `arm64`).
    pub architecture: String,
    /// The EC2 boot mode (`uefi`, `legacy-bios`, `uefi-preferred`).
    pub boot_mode: String,
    pub disk_size_gib: u32,
    pub volume_type: String,
    pub encrypted: bool,
    /// The first is where the AMI is made; the others get copies.
    pub regions: Vec<RegionSpec>,
    pub sharing: Sharing,
    pub deprecate_after: Option<Duration>,
}

impl AmiSpec {
    /// Renders the recipe's `outputs.ami` for `version`; `None` when the recipe has no AMI.
    pub fn from_recipe(recipe: &Recipe, version: &str) -> Result<Option<Self>, RecipeError> {
        let Some(ami) = &recipe.outputs.ami else {
            return Ok(None);
        };
        let renderer = Renderer::default();
        let mut regions = Vec::new();
        for region in &ami.regions {
            let context = Context::new(recipe, Some(version), Some(region), Secrets::Reveal);
            let mut tags = render_map(&renderer, &ami.tags, &context)?;
            tags.insert(TAG_RECIPE.to_owned(), recipe.name.clone());
            tags.insert(TAG_VERSION.to_owned(), version.to_owned());
            regions.push(RegionSpec {
                region: region.clone(),
                name: renderer.render(&ami.name, &context)?,
                description: ami
                    .description
                    .as_ref()
                    .map(|d| renderer.render(d, &context))
                    .transpose()?,
                tags,
                kms_key_id: if ami.encrypted {
                    ami.region_kms_key_ids
                        .get(region)
                        .or(ami.kms_key_id.as_ref())
                        .cloned()
                } else {
                    None
                },
            });
        }
        Ok(Some(AmiSpec {
            recipe: recipe.name.clone(),
            version: version.to_owned(),
            architecture: ami.architecture.ec2().to_owned(),
            boot_mode: match ami.boot_mode {
                crate::recipe::BootMode::Uefi => "uefi",
                crate::recipe::BootMode::LegacyBios => "legacy-bios",
                crate::recipe::BootMode::UefiPreferred => "uefi-preferred",
            }
            .to_owned(),
            disk_size_gib: ami.disk_size_gib,
            volume_type: ami.volume_type.clone(),
            encrypted: ami.encrypted,
            regions,
            sharing: Sharing {
                accounts: ami.share_accounts.clone(),
                organizations: ami.share_organizations.clone(),
                organizational_units: ami.share_organizational_units.clone(),
                public: ami.public,
            },
            deprecate_after: ami.deprecate_after,
        }))
    }

    /// The region the AMI is made in.
    pub fn home(&self) -> &RegionSpec {
        &self.regions[0]
    }

    /// An idempotency token for `operation` in `region`: the same for every run of this version,
    /// so a retried or repeated create returns the first one's resource.
    pub fn client_token(&self, operation: &str, region: &str) -> String {
        let seed = format!("bake/{}/{}/{operation}/{region}", self.recipe, self.version);
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, seed.as_bytes()).to_string()
    }
}
