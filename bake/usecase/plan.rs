//! Planning a recipe the one way every use case does: an `ami` base is first resolved in AWS
//! (so its exact id enters the version), then the plan is made with the settings' options.

use std::sync::Arc;

use super::Context;
use crate::ami::instance::{SourceAmi, SourceAmiError, source};
use crate::aws::Aws;
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::plan::state::{self, EffectState, Remote, TargetLookup};
use crate::plan::{self, Plan, PlanError, PlanOptions};
use crate::recipe::{Base, Recipe};
use crate::registry::{self, auth::ChainCredentials, auth::Credentials, ecr::EcrCredentials};

/// Why a recipe could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanRecipeError {
    #[error(transparent)]
    Source(#[from] SourceAmiError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Context(#[from] super::ContextError),
}

impl Diagnose for PlanRecipeError {
    fn hint(&self) -> Option<String> {
        match self {
            PlanRecipeError::Source(e) => e.hint(),
            PlanRecipeError::Plan(e) => e.hint(),
            PlanRecipeError::Context(_) => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            PlanRecipeError::Source(e) => e.exit_status(),
            PlanRecipeError::Plan(e) => e.exit_status(),
            PlanRecipeError::Context(e) => e.exit_status(),
        }
    }

    fn reports(&self) -> Vec<Report> {
        match self {
            PlanRecipeError::Source(e) => e.reports(),
            PlanRecipeError::Plan(e) => e.reports(),
            PlanRecipeError::Context(e) => e.reports(),
        }
    }
}

/// The region a recipe's source AMI is resolved in: where the AMI is built.
fn build_region(recipe: &Recipe, aws: &Aws) -> Option<String> {
    recipe
        .outputs
        .ami
        .as_ref()
        .and_then(|a| a.regions.first().cloned())
        .or_else(|| aws.default_region().map(str::to_owned))
}

/// Resolves `recipe`'s source AMI when its base is `ami`.
pub async fn resolve_source(
    aws: &Aws,
    recipe: &Recipe,
) -> Result<Option<SourceAmi>, SourceAmiError> {
    let Base::Ami(filter) = &recipe.base else {
        return Ok(None);
    };
    let region = build_region(recipe, aws).unwrap_or_else(|| "us-east-1".into());
    source::resolve(&aws.ec2(&region), &aws.ssm(&region), &region, filter)
        .await
        .map(Some)
}

/// Plan options with the source AMI resolved (a lookup in AWS only for `ami` bases).
pub fn plan_options(ctx: &Context, recipe: &Recipe) -> Result<PlanOptions, PlanRecipeError> {
    let mut options = ctx.settings.plan_options();
    if matches!(recipe.base, Base::Ami(_)) {
        options.source_ami =
            ctx.block_on(async { resolve_source(ctx.aws().await, recipe).await })??;
    }
    Ok(options)
}

/// Plans `recipe` (shown as `shown` in errors), resolving its source AMI first.
pub fn plan_recipe(ctx: &Context, recipe: &Recipe, shown: &str) -> Result<Plan, PlanRecipeError> {
    let options = plan_options(ctx, recipe)?;
    Ok(plan::plan(recipe, shown, &options)?)
}

/// Whether a run would do each of the plan's effects: the store is asked; registries and AWS
/// only with `remote` (`bake plan --check`), so a plain plan stays fast and offline.
pub fn effect_states(
    ctx: &Context,
    recipe: &Recipe,
    plan: &Plan,
    remote: bool,
) -> Vec<EffectState> {
    let settings = &ctx.settings;
    // Planning never creates a store: one that does not exist has built nothing.
    let store = settings
        .store
        .is_dir()
        .then(|| ctx.store())
        .and_then(|opened| {
            opened
                .map_err(|e| tracing::warn!("the store was not asked: {e}"))
                .ok()
        });
    let offline = TargetLookup {
        store,
        registry: None,
        aws: None,
    };
    let runtime = match ctx.runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!("registries and AWS were not asked: {e}");
            return futures_util::FutureExt::now_or_never(state::assess(
                plan,
                &offline,
                Remote::Off,
            ))
            .unwrap_or_default();
        }
    };
    if !remote {
        return runtime.block_on(state::assess(plan, &offline, Remote::Off));
    }
    runtime.block_on(async {
        let aws = ctx.aws().await;
        let mode = if state::has_aws_credentials(aws).await {
            Remote::On
        } else {
            Remote::NoAwsCredentials
        };
        let mut options = settings.registry.client_options();
        options
            .insecure
            .extend(super::publish::insecure_hosts(recipe));
        let mut credentials: Vec<Arc<dyn Credentials>> = vec![settings.registry.credentials()];
        if mode == Remote::On {
            credentials.push(Arc::new(EcrCredentials::new(aws.clone())));
        }
        let client = registry::Client::new(options, Arc::new(ChainCredentials(credentials)))
            .map_err(|e| tracing::warn!("registries cannot be asked: {e}"))
            .ok();
        let lookup = TargetLookup {
            store,
            registry: client.as_ref(),
            aws: Some(aws),
        };
        state::assess(plan, &lookup, mode).await
    })
}

/// Where the planned version already is, asking the registries and AWS: one line per image in
/// a registry or AMI in a region (`bake plan --all --check`).
pub fn published(ctx: &Context, recipe: &Recipe, plan: &Plan) -> Vec<String> {
    plan.effects
        .iter()
        .zip(effect_states(ctx, recipe, plan, true))
        .filter_map(|(effect, state)| match state {
            EffectState::InRegistry { .. } | EffectState::AmiExists { .. } => Some(format!(
                "{} ({})",
                effect.describe(),
                state.label().unwrap_or_default()
            )),
            _ => None,
        })
        .collect()
}
