//! Pinning a recipe's base: turning "what to start from" into an identity that cannot move, so
//! that it can enter the version.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{BaseIdentity, PlanError};
use crate::recipe::{Base, Recipe};
use crate::registry::{ManifestInfo, Reference};

/// Resolves an image reference with a tag to the digest it names now (through a registry), so
/// that a plan pins it. Plans are synchronous; implementations block.
pub trait ImageResolver: std::fmt::Debug + Send + Sync {
    fn resolve(
        &self,
        reference: &Reference,
    ) -> Result<ManifestInfo, Box<dyn std::error::Error + Send + Sync>>;
}

/// A shared resolver, as plan options hold it.
pub type SharedResolver = Arc<dyn ImageResolver>;

/// The pinned identity of `recipe`'s base. `plan_recipe` plans a base recipe (for `recipe:`
/// bases), with the stack of recipes being planned to catch cycles; `resolver` turns an image
/// tag into a digest (without one, image bases must be pinned by digest).
pub fn identity(
    recipe: &Recipe,
    plan_recipe: &mut dyn FnMut(&Path) -> Result<super::Plan, PlanError>,
    cache: &super::hash::DigestCache,
    resolver: Option<&dyn ImageResolver>,
    archives: Option<&dyn super::archive::ArchiveResolver>,
    source_ami: Option<&crate::ami::instance::SourceAmi>,
) -> Result<BaseIdentity, PlanError> {
    let digest = |text: String| -> Result<crate::id::Digest, PlanError> {
        text.parse()
            .map_err(|e: crate::id::BadId| PlanError::Layout {
                path: recipe.path.clone(),
                reason: e.to_string(),
            })
    };
    Ok(match &recipe.base {
        Base::Scratch => BaseIdentity::Scratch,
        Base::Image { reference } => {
            let parsed: Reference =
                reference
                    .parse()
                    .map_err(|source| PlanError::BadImageReference {
                        recipe: recipe.name.clone(),
                        source,
                    })?;
            let digest = match (parsed.digest(), resolver) {
                (Some(digest), _) => digest.to_owned(),
                (None, Some(resolver)) => {
                    resolver
                        .resolve(&parsed)
                        .map_err(|source| PlanError::ImageResolve {
                            reference: reference.clone(),
                            source,
                        })?
                        .digest
                }
                (None, None) => {
                    return Err(PlanError::UnpinnedImage {
                        reference: reference.clone(),
                    });
                }
            };
            BaseIdentity::Image {
                repository: parsed.name().to_owned(),
                digest: digest
                    .parse()
                    .map_err(|e: crate::id::BadId| PlanError::ImageResolve {
                        reference: reference.clone(),
                        source: Box::new(e),
                    })?,
            }
        }
        Base::OciLayout {
            path,
            tag,
            relative_path,
        } => BaseIdentity::OciLayout {
            digest: digest(layout_manifest(path, tag.as_deref(), relative_path)?)?,
        },
        Base::Rootfs { path, .. } => BaseIdentity::Rootfs {
            digest: digest(cache.digest(path).map_err(PlanError::Hash)?)?,
        },
        Base::Bootstrap(bootstrap) => {
            let arch = recipe
                .outputs
                .oci
                .as_ref()
                .map(|o| o.architecture)
                .or_else(|| recipe.outputs.ami.as_ref().map(|a| a.architecture))
                .map_or("amd64", |a| a.oci());
            let resolver = archives.ok_or_else(|| PlanError::UnpinnedArchives {
                recipe: recipe.name.clone(),
            })?;
            let archives = bootstrap
                .archives()
                .into_iter()
                .map(|archive| {
                    let release =
                        resolver
                            .release(&archive)
                            .map_err(|source| PlanError::ArchiveResolve {
                                mirror: archive.mirror.clone(),
                                suite: archive.suite.clone(),
                                source,
                            })?;
                    Ok(super::archive::PinnedArchive {
                        mirror: archive.mirror,
                        suite: archive.suite,
                        release,
                    })
                })
                .collect::<Result<Vec<_>, PlanError>>()?;
            BaseIdentity::Bootstrap {
                distro: serde_json::to_value(bootstrap.distro)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .expect("distros serialize as strings"),
                suite: bootstrap.suite.clone(),
                variant: bootstrap.variant.clone(),
                packages: bootstrap.packages.clone(),
                mirror: bootstrap.mirror.clone(),
                components: bootstrap.components.clone(),
                architecture: arch.to_owned(),
                archives,
            }
        }
        Base::Recipe { path, .. } => {
            let base = plan_recipe(path)?;
            BaseIdentity::Recipe {
                name: base.name,
                version: base.version,
            }
        }
        // The exact image, so a new vendor release is a new version.
        Base::Ami(_) => match source_ami {
            Some(source) => BaseIdentity::Ami {
                region: source.region.clone(),
                image_id: source.image_id.clone(),
                name: source.name.clone(),
                creation_date: source.creation_date.clone(),
                owner_id: source.owner_id.clone(),
            },
            None => {
                return Err(PlanError::UnresolvedAmi {
                    recipe: recipe.name.clone(),
                });
            }
        },
    })
}

/// The digest of the manifest (or index) in the layout at `dir` that a base names: the one
/// tagged `tag`, or the only one.
fn layout_manifest(dir: &Path, tag: Option<&str>, shown: &str) -> Result<String, PlanError> {
    let index_path = dir.join("index.json");
    let text = fs_err::read_to_string(&index_path).map_err(|source| PlanError::Io {
        path: index_path.clone(),
        source,
    })?;
    let index: oci_spec::image::ImageIndex =
        serde_json::from_str(&text).map_err(|e| PlanError::Layout {
            path: PathBuf::from(shown),
            reason: format!("its index.json is not an OCI image index: {e}"),
        })?;
    let manifests = index.manifests();
    let chosen = match tag {
        Some(tag) => manifests
            .iter()
            .find(|m| {
                m.annotations()
                    .as_ref()
                    .and_then(|a| a.get(oci_spec::image::ANNOTATION_REF_NAME))
                    .is_some_and(|name| name == tag)
            })
            .ok_or_else(|| PlanError::Layout {
                path: PathBuf::from(shown),
                reason: format!("no manifest is tagged `{tag}`"),
            })?,
        None => match manifests.as_slice() {
            [only] => only,
            [] => {
                return Err(PlanError::Layout {
                    path: PathBuf::from(shown),
                    reason: "it holds no image".into(),
                });
            }
            _ => {
                return Err(PlanError::Layout {
                    path: PathBuf::from(shown),
                    reason: format!("it holds {} images; name one with `tag`", manifests.len()),
                });
            }
        },
    };
    let digest = chosen.digest().to_string();
    // The blob must be there: a layout that points at nothing is not a base.
    let (algorithm, hex) = digest.split_once(':').unwrap_or(("sha256", &digest));
    let blob = dir.join("blobs").join(algorithm).join(hex);
    if !blob.is_file() {
        return Err(PlanError::Layout {
            path: PathBuf::from(shown),
            reason: format!("its index names {digest}, which is not in `blobs/`"),
        });
    }
    Ok(digest)
}
