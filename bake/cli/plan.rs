//! `bake plan RECIPE`: the version, the inputs that define it, and every effect a run would
//! have, without doing any of it. Beside each effect, whether a run would really do it: the
//! store is always asked; registries and AWS only with `--check` (or `--publish`, which asks
//! them anyway), so a plain plan stays fast and offline.

use std::path::PathBuf;

use clap::Args;

use super::common::{Outcome, load_recipe, show_publish_report};
use super::{VarArgs, print_json};
use crate::exit::ExitStatus;
use crate::plan::Plan;
use crate::plan::state::EffectState;
use crate::publish::PublishOptions;
use crate::settings::OutputFormat;
use crate::usecase::{self, Context};

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

pub fn run(args: &PlanArgs, ctx: &Context) -> Outcome {
    let settings = &ctx.settings;
    // `--all` is the fleet's plan, which `cli::run` dispatches.
    let Some(path) = &args.recipe else {
        unreachable!("clap requires RECIPE without --all")
    };
    let shown = path.display().to_string();
    let recipe = load_recipe(path, &args.vars)?;
    for advice in crate::build::hardening::missing_bootstrap_packages(&recipe) {
        tracing::warn!("{shown}: {advice}");
    }
    let plan = usecase::plan::plan_recipe(ctx, &recipe, &shown)?;
    let states = usecase::plan::effect_states(ctx, &recipe, &plan, args.check || args.publish);
    if !args.publish {
        match settings.output {
            OutputFormat::Json => print_json(&plan_document(&plan, &states)),
            OutputFormat::Human => print_human(&plan, &states),
        }
        return Ok(ExitStatus::Success);
    }
    let options = PublishOptions {
        dry_run: true,
        set_default: false,
        allow_clobber: false,
    };
    let report = usecase::publish::publish(ctx, &recipe, &shown, None, options)?;
    match settings.output {
        OutputFormat::Json => {
            print_json(
                &serde_json::json!({ "plan": plan_document(&plan, &states), "publish": report }),
            );
            Ok(report.exit_status())
        }
        OutputFormat::Human => {
            print_human(&plan, &states);
            println!();
            Ok(show_publish_report(settings, &report))
        }
    }
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
