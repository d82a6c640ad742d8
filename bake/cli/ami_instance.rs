//! `bake build` for recipes with `outputs.ami.strategy: instance`, and the source-AMI lookup
//! `bake plan` and `bake build` share: AWS settings become clients here, the library does the
//! work.
//!
//! Environment (resolved before work starts):
//! - `BAKE_SSH_TIMEOUT`: how long to wait for SSH on a new builder (`90s`, `5m`; default 5m).
//! - `BAKE_AWS_POLL_INTERVAL`: pause between AWS state polls (default 5s).
//! - `BAKE_SSH_BASTION_KEY`: an OpenSSH private key file for the recipe's bastion.

use std::sync::Arc;
use std::time::Duration;

use super::{print_json, print_reports};
use crate::ami::instance::{DEFAULT_SSH_TIMEOUT, InstanceBuilder, InstanceError, InstanceOptions};
use crate::aws::Aws;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::recipe::{AmiStrategy, Recipe};
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::store::Store;

/// Whether `recipe` is built by the instance strategy.
pub fn is_instance_recipe(recipe: &Recipe) -> bool {
    recipe
        .outputs
        .ami
        .as_ref()
        .is_some_and(|a| a.strategy == AmiStrategy::Instance)
}

fn options_from_env(cancel: Arc<std::sync::atomic::AtomicBool>) -> Result<InstanceOptions, Report> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let duration = |name: &str, default: Duration| -> Result<Duration, Report> {
        match var(name) {
            None => Ok(default),
            Some(text) => humantime::parse_duration(&text)
                .or_else(|_| text.parse::<u64>().map(Duration::from_secs))
                .map_err(|_| {
                    Report::new(format!("{name}=`{text}` is not a duration"))
                        .with_hint(Some("for example `90s` or `5m`".into()))
                }),
        }
    };
    let mut poll = InstanceOptions::default_poll();
    poll.interval = duration("BAKE_AWS_POLL_INTERVAL", poll.interval)?;
    let bastion_key = match var("BAKE_SSH_BASTION_KEY") {
        None => None,
        Some(path) => {
            let key = russh::keys::load_secret_key(&path, None).map_err(|e| {
                Report::new(format!("failed to read the bastion key `{path}`"))
                    .with_hint(Some(format!("{e}")))
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

/// `bake build` of an instance-strategy recipe.
pub fn run_build(
    recipe: &Recipe,
    shown: &str,
    settings: &Settings,
    cancel: Arc<std::sync::atomic::AtomicBool>,
) -> ExitStatus {
    let options = match options_from_env(cancel) {
        Ok(o) => o,
        Err(report) => {
            print_reports(settings, &[report]);
            return ExitStatus::RecipeOrUsage;
        }
    };
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let mut reporter = super::common::CliReporter {
        quiet: settings.verbosity == Verbosity::Quiet,
    };
    rt.block_on(async {
        let aws = Aws::load(&settings.aws).await;
        let source = match crate::usecase::plan::resolve_source(&aws, recipe).await {
            Ok(Some(source)) => source,
            Ok(None) => {
                print_reports(
                    settings,
                    &[Report::new(format!(
                        "recipe `{}` uses `strategy: instance` without an `ami` base",
                        recipe.name
                    ))],
                );
                return ExitStatus::RecipeOrUsage;
            }
            Err(e) => {
                print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
                return if e.is_user_error() {
                    ExitStatus::RecipeOrUsage
                } else {
                    ExitStatus::Infrastructure
                };
            }
        };
        let mut plan_options = settings.plan_options();
        plan_options.source_ami = Some(source.clone());
        let plan =
            match super::common::plan_resolved_or_report(recipe, shown, &plan_options, settings) {
                Ok(plan) => plan,
                Err(status) => return status,
            };
        let ec2 = aws.ec2(&source.region);
        let builder = InstanceBuilder {
            aws: &aws,
            ec2: &ec2,
            store: &store,
            options,
        };
        match builder.build(recipe, &plan, &source, &mut reporter).await {
            Ok(output) => {
                // The version's index, so `manifest show ami-…` finds it before any publish.
                if let Err(e) = crate::provenance::manifest::ensure(&store, &plan.version) {
                    tracing::warn!("failed to write the manifest: {e}");
                }
                match settings.output {
                    OutputFormat::Json => print_json(&output),
                    OutputFormat::Human => {
                        println!("version  {}", output.version);
                        println!("ami      {} ({})", output.image_id, output.region);
                        println!("name     {}", output.image_name);
                        println!("source   {}", output.source_ami);
                        if output.cached && settings.verbosity > Verbosity::Quiet {
                            eprintln!("(already built: nothing ran)");
                        }
                    }
                }
                ExitStatus::Success
            }
            Err(failure) => {
                let mut reports =
                    vec![Report::from_error(&failure.error).with_hint(failure.error.hint())];
                // Cleanup failures come after the error that stopped the build, never instead.
                for f in &failure.cleanup {
                    reports.push(
                        Report::new(f.to_string())
                            .with_hint(Some("run `bake cleanup` to retry".into())),
                    );
                }
                print_reports(settings, &reports);
                exit_for(&failure.error)
            }
        }
    })
}

fn exit_for(error: &InstanceError) -> ExitStatus {
    if error.is_interrupted() {
        ExitStatus::Interrupted
    } else if error.is_user_error() {
        ExitStatus::RecipeOrUsage
    } else {
        ExitStatus::Infrastructure
    }
}
