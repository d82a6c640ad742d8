//! Planning a recipe the one way every use case does: an `ami` base is first resolved in AWS
//! (so its exact id enters the version), then the plan is made with the settings' options.

use super::Context;
use crate::ami::instance::{SourceAmi, SourceAmiError, source};
use crate::aws::Aws;
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::plan::{self, Plan, PlanError, PlanOptions};
use crate::recipe::{Base, Recipe};

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
