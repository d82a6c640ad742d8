//! Publishing a version and moving channels: put a version where Auto Scaling Groups and
//! Fargate services consume it (`bake publish`), move a channel's pointers to a published version
//! or back (`promote`, `rollback`), read a channel's references (`pin`), and record what was
//! published in the version's manifest.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

mod channel;
mod error;

use super::Context;
use crate::aws::Aws;
use crate::provenance::manifest::Publication;
use crate::publish::{
    PublishError, PublishInputs, PublishOptions, PublishReport, Publisher, RegistryDigestCheck,
};
use crate::recipe::Recipe;
use crate::registry::{
    self, RegistryError,
    auth::{ChainCredentials, Credentials},
    ecr::EcrCredentials,
};
use crate::settings::Settings;
pub use channel::{ChannelMove, move_channel, pin};
pub use error::PublishUseError;

/// Plain-HTTP registry hosts of the recipe.
pub fn insecure_hosts(recipe: &Recipe) -> BTreeSet<String> {
    recipe
        .publish
        .registries
        .iter()
        .filter(|r| r.insecure)
        .filter_map(|r| r.repository.split_once('/').map(|(h, _)| h.to_owned()))
        .collect()
}

/// The digest check: bake's registry client with the configured credentials plus ECR's.
pub fn digest_check<'a>(
    aws: &'a Aws,
    recipe: &Recipe,
    settings: &Settings,
) -> Result<RegistryDigestCheck<'a>, RegistryError> {
    let mut options = settings.registry.client_options();
    options.insecure.extend(insecure_hosts(recipe));
    let sources: Vec<Arc<dyn Credentials>> = vec![
        settings.registry.credentials(),
        Arc::new(EcrCredentials::new(aws.clone())),
    ];
    let redirected: Vec<String> = options.endpoints.keys().cloned().collect();
    let client = registry::Client::new(options, Arc::new(ChainCredentials(sources)))?;
    Ok(RegistryDigestCheck::new(aws, client).with_redirected_hosts(redirected))
}

/// Where the inputs of the version to publish come from.
enum Source {
    /// `--inputs FILE`.
    Given(PublishInputs),
    /// The build record of the recipe's current version.
    Record(Box<crate::store::BuildRecord>),
}

/// The inputs of the version to publish: the given file, or the build record of the recipe's
/// current version.
fn source(
    ctx: &Context,
    recipe: &Recipe,
    shown: &str,
    inputs: Option<&Path>,
) -> Result<Source, PublishUseError> {
    if let Some(path) = inputs {
        let inputs = PublishInputs::from_file(path)?;
        if inputs.recipe != recipe.name {
            return Err(PublishUseError::InputsForOtherRecipe {
                path: path.to_owned(),
                found: inputs.recipe,
                recipe: recipe.name.clone(),
            });
        }
        return Ok(Source::Given(inputs));
    }
    let plan =
        super::plan::plan_recipe(ctx, recipe, shown).map_err(|source| PublishUseError::Plan {
            shown: shown.to_owned(),
            source,
        })?;
    let store = ctx.store().map_err(PublishUseError::Store)?;
    let record = store
        .record(&plan.version)
        .map_err(|e| PublishUseError::Store(e.into()))?
        .ok_or_else(|| PublishUseError::NotBuilt {
            version: plan.version.to_string(),
            recipe: recipe.name.clone(),
            store: ctx.settings.store.clone(),
        })?;
    Ok(Source::Record(Box::new(record)))
}

/// Every repository the recipe pushes to, with its registry host (ECR's needs the account).
async fn pushed_repositories(
    publisher: &Publisher<'_, RegistryDigestCheck<'_>>,
) -> Result<Vec<String>, PublishError> {
    let recipe = publisher.recipe;
    let mut repositories: Vec<String> = recipe
        .publish
        .registries
        .iter()
        .map(|r| r.repository.clone())
        .collect();
    if !recipe.publish.ecr.is_empty() {
        let home = crate::publish::home_region(recipe, publisher.aws)?;
        let account = publisher.caller_account(&home).await?;
        for target in &recipe.publish.ecr {
            let region = target.region.as_deref().unwrap_or(&home);
            repositories.push(format!(
                "{}/{}",
                registry::ecr::registry_host(&account, region),
                target.repository
            ));
        }
    }
    Ok(repositories)
}

/// Publishes (or, with `options.dry_run`, plans publishing) the recipe's current version, or
/// the version `inputs` (a `PublishInputs` JSON file) describes. `shown` names the recipe in
/// errors.
pub fn publish(
    ctx: &Context,
    recipe: &Recipe,
    shown: &str,
    inputs: Option<&Path>,
    options: PublishOptions,
) -> Result<PublishReport, PublishUseError> {
    let source = source(ctx, recipe, shown, inputs)?;
    ctx.block_on(async {
        let aws = ctx.aws().await;
        let digests = digest_check(aws, recipe, &ctx.settings)?;
        let publisher = Publisher {
            aws,
            digests: &digests,
            recipe,
            options,
        };
        let inputs = match source {
            Source::Given(inputs) => inputs,
            Source::Record(record) => {
                let repositories = pushed_repositories(&publisher).await?;
                PublishInputs::from_record(&record, &repositories)
                    .map_err(PublishUseError::Record)?
            }
        };
        let report = publisher.publish(&inputs).await;
        record_in_manifest(ctx, &recipe.name, &report, Vec::new(), |_| true);
        Ok(report)
    })?
}

/// Adds what a publish, promote or rollback did to the version's manifest in the store (made
/// for the occasion when the version was published from `--inputs`), so `bake manifest show`
/// finds the version from a launch template version, parameter version or task definition.
/// `extra` goes first (a channel move); `keep` chooses among the report's publications.
/// Failing to write it is a warning: AWS holds the truth (the release and channel records).
fn record_in_manifest(
    ctx: &Context,
    recipe: &str,
    report: &PublishReport,
    extra: Vec<Publication>,
    keep: impl Fn(&Publication) -> bool,
) {
    if report.dry_run || report.version.is_empty() {
        return;
    }
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let by = crate::provenance::registry::operator();
    let mut publications = extra;
    publications.extend(report.publications(&at, &by).into_iter().filter(keep));
    if publications.is_empty() {
        return;
    }
    let written = ctx.store().map_err(|e| e.to_string()).and_then(|store| {
        crate::provenance::manifest::record_publications_of(
            store,
            recipe,
            &report.version,
            publications,
        )
        .map_err(|e| e.to_string())
    });
    if let Err(e) = written {
        tracing::warn!("failed to record the publications in the manifest: {e}");
    }
}
