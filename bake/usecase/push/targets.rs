//! Where a push sends each image: the targets of its recipe's plan (registries, ECR
//! repositories with the settings they are made with), or none for a bare version.

use std::path::Path;

use super::super::Context;
use super::super::record::{find_record, load_and_plan};
use super::{PushError, PushReporter};
use crate::diagnostic::Report;
use crate::plan::Effect;
use crate::recipe::VarSources;
use crate::registry::ecr;
use crate::registry::ecr::{EcrEncryption, RepositorySettings};
use crate::registry::push::PushTarget;
use crate::registry::{Reference, RegistryError};
use crate::store::{BuildRecord, Store};

/// A push target before its repository is known (ECR's comes from the account).
pub(super) enum Planned {
    Registry(PushTarget),
    Ecr {
        name: String,
        region: String,
        tags: Vec<String>,
        settings: RepositorySettings,
    },
}

/// The build record, the recipe's targets (none for a bare version) and the registries the
/// recipe marks insecure.
pub(super) fn find(
    ctx: &Context,
    store: &Store,
    what: &str,
    vars: &VarSources,
) -> Result<(BuildRecord, Vec<Planned>, Vec<String>), PushError> {
    if !Path::new(what).is_file() {
        let record = find_record(ctx, store, what, vars)?;
        return Ok((record, Vec::new(), Vec::new()));
    }
    let (recipe, plan) = load_and_plan(ctx, what, vars)?;
    let record = store
        .record(&plan.version)
        .map_err(|e| PushError::Find(e.into()))?
        .ok_or_else(|| PushError::RecipeNotBuilt {
            version: plan.version.to_string(),
            recipe: what.to_owned(),
            store: ctx.settings.store.clone(),
        })?;
    let mut targets = Vec::new();
    let mut insecure = Vec::new();
    for effect in &plan.effects {
        match effect {
            Effect::PushImage { repository, tags } => {
                let parsed = Reference::repository_only(repository).map_err(PushError::Target)?;
                if recipe
                    .publish
                    .registries
                    .iter()
                    .any(|r| &r.repository == repository && r.insecure)
                {
                    insecure.push(parsed.registry().to_owned());
                }
                targets.push(Planned::Registry(PushTarget {
                    repository: parsed,
                    tags: tags.clone(),
                }));
            }
            Effect::PushEcr {
                repository,
                region,
                tags,
                create_repository,
            } => {
                let spec = recipe
                    .publish
                    .ecr
                    .iter()
                    .find(|e| &e.repository == repository);
                targets.push(Planned::Ecr {
                    name: repository.clone(),
                    region: region.clone(),
                    tags: tags.clone(),
                    settings: RepositorySettings {
                        immutable_tags: spec.is_some_and(|s| s.immutable_tags),
                        scan_on_push: spec.is_none_or(|s| s.scan_on_push),
                        encryption: match spec.and_then(|s| s.kms_key.clone()) {
                            Some(key) => EcrEncryption::Kms(Some(key)),
                            None => EcrEncryption::Aes256,
                        },
                        create: *create_repository,
                    },
                });
            }
            _ => {}
        }
    }
    Ok((record, targets, insecure))
}

/// The repository of ECR repository `name` in `region`, made with `repository_settings` if
/// missing (differences from an existing one are logged as warnings); a failure is reported
/// and returned as (target, error) for the summary.
pub(super) async fn ensure_ecr(
    aws: &crate::aws::Aws,
    region: &str,
    name: &str,
    repository_settings: &RepositorySettings,
    reporter: &dyn PushReporter,
) -> Result<Reference, (String, String)> {
    let ensured = ecr::ensure_repository(&aws.ecr(region), region, name, repository_settings)
        .await
        .map_err(|e| {
            let error = RegistryError::from(e);
            reporter.failed(Report::from_error(&error).with_hint(error.hint()));
            (format!("ecr:{region}/{name}"), error.to_string())
        })?;
    Reference::repository_only(&ensured.uri).map_err(|e| (ensured.uri.clone(), e.to_string()))
}
