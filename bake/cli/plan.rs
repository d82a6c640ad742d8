//! `bake plan RECIPE`: the version, the inputs that define it, and every effect a run would
//! have, without doing any of it. Beside each effect, whether a run would really do it: the
//! store is always asked; registries and AWS only with `--check` (or `--publish`, which asks
//! them anyway), so a plain plan stays fast and offline.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{VarArgs, print_json, print_reports};
use crate::aws::Aws;
use crate::exit::ExitStatus;
use crate::plan::Plan;
use crate::plan::state::{self, EffectState, Remote, TargetLookup};
use crate::registry::{self, auth::ChainCredentials, auth::Credentials, ecr::EcrCredentials};
use crate::settings::{OutputFormat, Settings};

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE", required_unless_present = "all")]
    pub recipe: Option<PathBuf>,
    /// Plan every recipe under DIR (default: the current directory): each one's version and
    /// whether it is built (store) or, with `--check`, published (registries, AWS), or new.
    #[arg(
        long,
        value_name = "DIR",
        num_args = 0..=1,
        default_missing_value = ".",
        conflicts_with_all = ["recipe", "publish", "vars", "var_files"]
    )]
    pub all: Option<PathBuf>,
    /// Also show each publishing pointer's current and wanted value for the built version
    /// (asks AWS and the registries; changes nothing): `bake publish --dry-run`'s report.
    #[arg(long)]
    pub publish: bool,
    /// Ask the registries and AWS whether each image and AMI already exists (`= in registry`,
    /// `= AMI exists`); without it only the local store is asked (`= built`).
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub fn run(args: &PlanArgs, settings: &Settings) -> ExitStatus {
    let path = match (&args.all, &args.recipe) {
        (Some(dir), _) => return super::fleet::plan_all(dir, args.check, settings),
        (None, Some(path)) => path,
        (None, None) => unreachable!("clap requires RECIPE without --all"),
    };
    let shown = path.display().to_string();
    let recipe = match super::common::load_or_report(path, &args.vars, settings) {
        Ok(recipe) => recipe,
        Err(status) => return status,
    };
    for advice in crate::build::hardening::missing_bootstrap_packages(&recipe) {
        tracing::warn!("{shown}: {advice}");
    }
    let planned = super::common::plan_recipe(&recipe, &shown, settings).map(|plan| {
        let states = effect_states(&recipe, &plan, args.check || args.publish, settings);
        (plan, states)
    });
    match planned {
        Ok((plan, states)) if args.publish => {
            let publish = super::publish::PublishArgs {
                recipe: path.clone(),
                inputs: None,
                dry_run: true,
                set_default: false,
                allow_clobber: false,
                vars: args.vars.clone(),
            };
            let report = match super::publish::publish_report(&publish, settings) {
                Ok(report) => report,
                Err(status) => return status,
            };
            match settings.output {
                OutputFormat::Json => {
                    print_json(
                        &serde_json::json!({ "plan": plan_document(&plan, &states), "publish": report }),
                    );
                    report.exit_status()
                }
                OutputFormat::Human => {
                    print_human(&plan, &states);
                    println!();
                    super::publish::show(settings, &report)
                }
            }
        }
        Ok((plan, states)) => {
            match settings.output {
                OutputFormat::Json => print_json(&plan_document(&plan, &states)),
                OutputFormat::Human => print_human(&plan, &states),
            }
            ExitStatus::Success
        }
        Err((reports, status)) => {
            print_reports(settings, &reports);
            status
        }
    }
}

/// Where the planned version already is, asking the registries and AWS: one line per image in
/// a registry or AMI in a region (`bake plan --all --check`).
pub(super) fn published(
    recipe: &crate::recipe::Recipe,
    plan: &Plan,
    settings: &Settings,
) -> Vec<String> {
    plan.effects
        .iter()
        .zip(effect_states(recipe, plan, true, settings))
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

/// Whether a run would do each effect: the store is asked; registries and AWS with `remote`.
fn effect_states(
    recipe: &crate::recipe::Recipe,
    plan: &Plan,
    remote: bool,
    settings: &Settings,
) -> Vec<EffectState> {
    // Planning never creates a store: one that does not exist has built nothing.
    let store = settings
        .store
        .is_dir()
        .then(|| crate::store::Store::open(&settings.store))
        .and_then(|opened| {
            opened
                .map_err(|e| tracing::warn!("the store was not asked: {e}"))
                .ok()
        });
    let offline = TargetLookup {
        store: store.as_ref(),
        registry: None,
        aws: None,
    };
    let runtime = match super::runtime() {
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
        let aws = Aws::load(&settings.aws).await;
        let mode = if state::has_aws_credentials(&aws).await {
            Remote::On
        } else {
            Remote::NoAwsCredentials
        };
        let mut options = settings.registry.client_options();
        options.insecure.extend(
            recipe
                .publish
                .registries
                .iter()
                .filter(|r| r.insecure)
                .filter_map(|r| r.repository.split_once('/').map(|(h, _)| h.to_owned())),
        );
        let mut credentials: Vec<Arc<dyn Credentials>> = vec![settings.registry.credentials()];
        if mode == Remote::On {
            credentials.push(Arc::new(EcrCredentials::new(aws.clone())));
        }
        let client = registry::Client::new(options, Arc::new(ChainCredentials(credentials)))
            .map_err(|e| tracing::warn!("registries cannot be asked: {e}"))
            .ok();
        let lookup = TargetLookup {
            store: store.as_ref(),
            registry: client.as_ref(),
            aws: Some(&aws),
        };
        state::assess(plan, &lookup, mode).await
    })
}

/// The plan as printed with `--output json`: each effect carries its `state`.
fn plan_document(plan: &Plan, states: &[EffectState]) -> serde_json::Value {
    #[derive(serde::Serialize)]
    struct Stated<'a> {
        #[serde(flatten)]
        effect: &'a crate::plan::Effect,
        state: &'a EffectState,
    }
    let mut document = serde_json::to_value(plan).expect("plans serialize");
    let effects: Vec<Stated<'_>> = plan
        .effects
        .iter()
        .zip(states)
        .map(|(effect, state)| Stated { effect, state })
        .collect();
    document["effects"] = serde_json::to_value(effects).expect("effects serialize");
    document
}

fn print_human(plan: &Plan, states: &[EffectState]) {
    println!("recipe   {}", plan.recipe);
    println!("name     {}", plan.name);
    println!("version  {}", plan.version);
    println!();
    println!("inputs:");
    let mut base = serde_json::to_value(&plan.inputs.base).expect("base identities serialize");
    let archives = base
        .as_object_mut()
        .and_then(|b| b.remove("archives"))
        .unwrap_or_default();
    println!("  base       {}", compact(&base));
    for archive in archives.as_array().into_iter().flatten() {
        println!(
            "  archive    {} {}  {}",
            scalar(&archive["mirror"]),
            scalar(&archive["suite"]),
            scalar(&archive["release"])
        );
    }
    let vars = &plan.inputs.recipe.variables;
    if !vars.is_empty() {
        let shown: Vec<String> = vars
            .iter()
            .map(|(name, v)| {
                if v.value.is_null() {
                    format!("{name} (unset)")
                } else {
                    format!("{name}={}", scalar(&v.value))
                }
            })
            .collect();
        println!("  variables  {}", shown.join(", "));
    }
    for file in &plan.inputs.files {
        let detail = file
            .digest
            .clone()
            .or_else(|| file.target.clone())
            .unwrap_or_else(|| "directory".into());
        println!("  file       {}  {detail}", file.path);
    }
    println!();
    println!("effects:");
    for (effect, state) in plan.effects.iter().zip(states) {
        match state.label() {
            Some(label) => println!("  {} {label}: {}", state.mark(), effect.describe()),
            None => println!("  {} {}", state.mark(), effect.describe()),
        }
    }
}

fn scalar(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn compact(value: &serde_json::Value) -> String {
    match value.as_object() {
        Some(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar(v)))
            .collect::<Vec<_>>()
            .join(" "),
        None => scalar(value),
    }
}
