//! Building an AMI on a builder instance (`outputs.ami.strategy: instance`): resolve the source
//! AMI, plan with it, launch the builder, provision over SSH, register and distribute the AMI.
//!
//! Environment (resolved before work starts):
//! - `BAKE_SSH_TIMEOUT`: how long to wait for SSH on a new builder (`90s`, `5m`; default 5m).
//! - `BAKE_AWS_POLL_INTERVAL`: pause between AWS state polls (default 5s).
//! - `BAKE_SSH_BASTION_KEY`: an OpenSSH private key file for the recipe's bastion.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use super::{Context, ContextError};
use crate::ami::instance::{
    AmiBuildOutput, DEFAULT_SSH_TIMEOUT, InstanceBuilder, InstanceFailure, InstanceOptions,
    SourceAmiError,
};
use crate::build::pipeline::BuildReporter;
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::plan::{self, PlanError};
use crate::recipe::{AmiStrategy, Recipe};

/// Whether `recipe` is built by the instance strategy.
pub fn is_instance_recipe(recipe: &Recipe) -> bool {
    recipe
        .outputs
        .ami
        .as_ref()
        .is_some_and(|a| a.strategy == AmiStrategy::Instance)
}

/// Why an AMI was not built on a builder instance.
#[derive(Debug, thiserror::Error)]
pub enum BuildAmiInstanceError {
    #[error("{name}=`{text}` is not a duration")]
    Duration { name: String, text: String },
    #[error("failed to read the bastion key `{path}`")]
    BastionKey { path: String, reason: String },
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("recipe `{0}` uses `strategy: instance` without an `ami` base")]
    NoAmiBase(String),
    #[error(transparent)]
    Source(#[from] SourceAmiError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{}", .0.error)]
    Build(Box<InstanceFailure>),
}

impl Diagnose for BuildAmiInstanceError {
    fn hint(&self) -> Option<String> {
        match self {
            BuildAmiInstanceError::Duration { .. } => Some("for example `90s` or `5m`".into()),
            BuildAmiInstanceError::BastionKey { reason, .. } => Some(reason.clone()),
            BuildAmiInstanceError::Source(e) => e.hint(),
            BuildAmiInstanceError::Plan(e) => e.hint(),
            BuildAmiInstanceError::Build(failure) => failure.error.hint(),
            BuildAmiInstanceError::Context(_) | BuildAmiInstanceError::NoAmiBase(_) => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            BuildAmiInstanceError::Duration { .. }
            | BuildAmiInstanceError::BastionKey { .. }
            | BuildAmiInstanceError::NoAmiBase(_) => ExitStatus::RecipeOrUsage,
            BuildAmiInstanceError::Context(e) => e.exit_status(),
            BuildAmiInstanceError::Source(e) if e.is_user_error() => ExitStatus::RecipeOrUsage,
            BuildAmiInstanceError::Source(_) => ExitStatus::Infrastructure,
            BuildAmiInstanceError::Plan(e) => e.exit_status(),
            BuildAmiInstanceError::Build(failure) if failure.error.is_interrupted() => {
                ExitStatus::Interrupted
            }
            BuildAmiInstanceError::Build(failure) if failure.error.is_user_error() => {
                ExitStatus::RecipeOrUsage
            }
            BuildAmiInstanceError::Build(_) => ExitStatus::Infrastructure,
        }
    }

    fn reports(&self) -> Vec<Report> {
        match self {
            BuildAmiInstanceError::Plan(e) => e.reports(),
            BuildAmiInstanceError::Build(failure) => {
                let mut reports =
                    vec![Report::from_error(&failure.error).with_hint(failure.error.hint())];
                // Cleanup failures come after the error that stopped the build, never instead.
                for f in &failure.cleanup {
                    reports.push(
                        Report::new(f.to_string())
                            .with_hint(Some("run `bake cleanup` to retry".into())),
                    );
                }
                reports
            }
            _ => vec![Report::from_error(self).with_hint(self.hint())],
        }
    }
}

fn options_from_env(cancel: Arc<AtomicBool>) -> Result<InstanceOptions, BuildAmiInstanceError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let duration = |name: &str, default: Duration| -> Result<Duration, BuildAmiInstanceError> {
        match var(name) {
            None => Ok(default),
            Some(text) => humantime::parse_duration(&text)
                .or_else(|_| text.parse::<u64>().map(Duration::from_secs))
                .map_err(|_| BuildAmiInstanceError::Duration {
                    name: name.to_owned(),
                    text,
                }),
        }
    };
    let mut poll = InstanceOptions::default_poll();
    poll.interval = duration("BAKE_AWS_POLL_INTERVAL", poll.interval)?;
    let bastion_key = match var("BAKE_SSH_BASTION_KEY") {
        None => None,
        Some(path) => {
            let key = russh::keys::load_secret_key(&path, None).map_err(|e| {
                BuildAmiInstanceError::BastionKey {
                    reason: e.to_string(),
                    path,
                }
            })?;
            Some(Arc::new(key))
        }
    };
    Ok(InstanceOptions {
        ssh_timeout: duration("BAKE_SSH_TIMEOUT", DEFAULT_SSH_TIMEOUT)?,
        poll,
        cancel,
        bastion_key,
    })
}

/// Builds the AMI of an instance-strategy recipe on a builder instance (or finds the version's
/// AMI already there).
pub fn build_ami_instance(
    ctx: &Context,
    recipe: &Recipe,
    shown: &str,
    reporter: &mut dyn BuildReporter,
) -> Result<AmiBuildOutput, BuildAmiInstanceError> {
    let options = options_from_env(Arc::clone(ctx.cancel()))?;
    let store = ctx.store()?;
    ctx.block_on(async {
        let aws = ctx.aws().await;
        let source = crate::usecase::plan::resolve_source(aws, recipe)
            .await?
            .ok_or_else(|| BuildAmiInstanceError::NoAmiBase(recipe.name.clone()))?;
        let mut plan_options = ctx.settings.plan_options();
        plan_options.source_ami = Some(source.clone());
        let plan = plan::plan(recipe, shown, &plan_options)?;
        let ec2 = aws.ec2(&source.region);
        let builder = InstanceBuilder {
            aws,
            ec2: &ec2,
            store,
            options,
        };
        let output = builder
            .build(recipe, &plan, &source, reporter)
            .await
            .map_err(|failure| BuildAmiInstanceError::Build(Box::new(failure)))?;
        // The version's index, so `manifest show ami-…` finds it before any publish.
        if let Err(e) = crate::provenance::manifest::ensure(store, &plan.version) {
            tracing::warn!("failed to write the manifest: {e}");
        }
        Ok::<_, BuildAmiInstanceError>(output)
    })?
}
