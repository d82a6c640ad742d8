//! Rolling a version out: move a channel to it and replace the machines behind it (instance
//! refreshes, ECS deployments), waiting and rolling back on failure ([`crate::rollout`]), then
//! record the rollout in the version's manifest.

use std::time::Duration;

use super::Context;
use crate::diagnostic::Diagnose;
use crate::exit::ExitStatus;
use crate::provenance::manifest::{Publication, RolloutTarget};
use crate::publish::{PublishOptions, Publisher};
use crate::recipe::Recipe;
use crate::registry::RegistryError;
use crate::rollout::{
    OnInterrupt, Reporter, RolloutError, RolloutOptions, RolloutReport, Rollouts,
};

/// What to roll out, where, and how.
#[derive(Debug, Clone)]
pub struct RolloutRequest<'a> {
    /// The version (`sha256:…` or at least its first 12 hex digits); it must have been
    /// published.
    pub version: &'a str,
    /// The channel, with `publish.rollouts.<channel>` in the recipe.
    pub channel: &'a str,
    /// How often to ask AWS how each target is doing.
    pub poll_interval: Duration,
    /// Overwrite SSM parameters bake does not own.
    pub allow_clobber: bool,
}

/// Why a rollout could not run (a rollout that ran and failed is a [`RolloutReport`]).
#[derive(Debug, thiserror::Error)]
pub enum RolloutUseError {
    #[error(transparent)]
    Context(#[from] super::ContextError),
    #[error(transparent)]
    Client(#[from] RegistryError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
}

impl Diagnose for RolloutUseError {
    fn hint(&self) -> Option<String> {
        match self {
            RolloutUseError::Context(_) => None,
            RolloutUseError::Client(e) => e.hint(),
            RolloutUseError::Rollout(e) => e.hint(),
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            RolloutUseError::Rollout(e) if e.is_refusal() => ExitStatus::RecipeOrUsage,
            _ => ExitStatus::Infrastructure,
        }
    }
}

/// Rolls `request.version` out to `request.channel`, telling `reporter` how each target does;
/// `interrupt` resolves (at the first Ctrl-C) with what to do about it.
pub fn rollout(
    ctx: &Context,
    recipe: &Recipe,
    request: &RolloutRequest<'_>,
    reporter: &dyn Reporter,
    interrupt: impl Future<Output = OnInterrupt>,
) -> Result<RolloutReport, RolloutUseError> {
    let report = ctx.block_on(async {
        let aws = ctx.aws().await;
        let digests = super::publish::digest_check(aws, recipe, &ctx.settings)?;
        let publisher = Publisher {
            aws,
            digests: &digests,
            recipe,
            options: PublishOptions {
                dry_run: false,
                set_default: true,
                allow_clobber: request.allow_clobber,
            },
        };
        let rollouts = Rollouts {
            publisher: &publisher,
            reporter,
            options: RolloutOptions {
                poll_interval: request.poll_interval,
            },
        };
        Ok::<_, RolloutUseError>(
            rollouts
                .run(request.version, request.channel, interrupt)
                .await?,
        )
    })??;
    record_in_manifest(ctx, &report);
    Ok(report)
}

/// Adds the rollout to the version's manifest in the store. A warning when it cannot: AWS
/// holds the truth (the channel record).
fn record_in_manifest(ctx: &Context, report: &RolloutReport) {
    let rollout = Publication::Rollout {
        channel: report.channel.clone(),
        outcome: report.outcome,
        reason: report.reason.clone(),
        targets: report
            .targets
            .iter()
            .map(|t| RolloutTarget {
                target: t.target.clone(),
                from: t.from.clone(),
                to: t.to.clone(),
                phase: t.phase.clone(),
            })
            .collect(),
        started_at: report.started_at.clone(),
        at: report.ended_at.clone(),
        by: crate::provenance::registry::operator(),
    };
    let written = ctx.store().map_err(|e| e.to_string()).and_then(|store| {
        crate::provenance::manifest::record_publications_of(
            store,
            &report.recipe,
            &report.version,
            [rollout],
        )
        .map_err(|e| e.to_string())
    });
    if let Err(e) = written {
        tracing::warn!("failed to record the rollout in the manifest: {e}");
    }
}
