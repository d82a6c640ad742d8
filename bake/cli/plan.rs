//! `bake plan RECIPE`: the version, the inputs that define it, and every effect a run would
//! have, without doing any of it.

use std::path::PathBuf;

use clap::Args;

use super::{VarArgs, print_json, print_reports};
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::plan::{self, Plan, PlanError};
use crate::recipe;
use crate::settings::{OutputFormat, Settings};

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// Also show each publishing pointer's current and wanted value for the built version
    /// (asks AWS and the registries; changes nothing): `bake publish --dry-run`'s report.
    #[arg(long)]
    pub publish: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub fn run(args: &PlanArgs, settings: &Settings) -> ExitStatus {
    let shown = args.recipe.display().to_string();
    let recipe = match load_or_report(&args.recipe, &args.vars, settings) {
        Ok(recipe) => recipe,
        Err(status) => return status,
    };
    let planned = plan_recipe(&recipe, &shown, settings);
    match planned {
        Ok(plan) if args.publish => {
            let publish = super::publish::PublishArgs {
                recipe: args.recipe.clone(),
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
                    print_json(&serde_json::json!({ "plan": plan, "publish": report }));
                    report.exit_status()
                }
                OutputFormat::Human => {
                    print_human(&plan);
                    println!();
                    super::publish::show(settings, &report)
                }
            }
        }
        Ok(plan) => {
            match settings.output {
                OutputFormat::Json => print_json(&plan),
                OutputFormat::Human => print_human(&plan),
            }
            ExitStatus::Success
        }
        Err((reports, status)) => {
            print_reports(settings, &reports);
            status
        }
    }
}

/// Plans `recipe` the one way every command does: an `ami` base is first resolved in AWS (so
/// its exact id enters the version), then the plan is made with the settings' options. The
/// error is the reports to print and the exit status to end with.
pub(super) fn plan_recipe(
    recipe: &crate::recipe::Recipe,
    shown: &str,
    settings: &Settings,
) -> Result<Plan, (Vec<Report>, ExitStatus)> {
    let options = super::ami_instance::plan_options(recipe, settings)
        .map_err(|(report, status)| (vec![report], status))?;
    plan::plan(recipe, shown, &options).map_err(|error| {
        let status = if error.is_user_error() {
            ExitStatus::RecipeOrUsage
        } else {
            ExitStatus::Infrastructure
        };
        (plan_reports(&error), status)
    })
}

/// [`plan_recipe`] for callers that report one error.
pub(super) fn plan_one_report(
    recipe: &crate::recipe::Recipe,
    shown: &str,
    settings: &Settings,
) -> Result<Plan, Box<Report>> {
    plan_recipe(recipe, shown, settings).map_err(|(mut reports, _)| {
        Box::new(if reports.is_empty() {
            Report::new(format!("failed to plan `{shown}`"))
        } else {
            reports.remove(0)
        })
    })
}

/// Loads the recipe at `path` with the command line's variables, or prints every error in it
/// and returns the exit status to end with.
pub(super) fn load_or_report(
    path: &std::path::Path,
    vars: &VarArgs,
    settings: &Settings,
) -> Result<crate::recipe::Recipe, ExitStatus> {
    recipe::load(path, &vars.sources()).map_err(|errors| {
        print_reports(settings, &plan_reports(&PlanError::from(errors)));
        ExitStatus::RecipeOrUsage
    })
}

/// Plans `recipe` ([`plan_recipe`]), or prints why it cannot be planned and returns the exit
/// status to end with.
pub(super) fn plan_or_report(
    recipe: &crate::recipe::Recipe,
    shown: &str,
    settings: &Settings,
) -> Result<crate::plan::Plan, ExitStatus> {
    plan_recipe(recipe, shown, settings).map_err(|(reports, status)| {
        print_reports(settings, &reports);
        status
    })
}

/// Plans `recipe` with options whose source AMI the caller already resolved (through
/// [`super::ami_instance::resolve_source`], as [`plan_recipe`] does), or prints why not.
pub(super) fn plan_resolved_or_report(
    recipe: &crate::recipe::Recipe,
    shown: &str,
    options: &crate::plan::PlanOptions,
    settings: &Settings,
) -> Result<crate::plan::Plan, ExitStatus> {
    plan::plan(recipe, shown, options).map_err(|error| {
        print_reports(settings, &plan_reports(&error));
        if error.is_user_error() {
            ExitStatus::RecipeOrUsage
        } else {
            ExitStatus::Infrastructure
        }
    })
}

/// Reports for a plan error: one per recipe error, or one with the cause chain.
pub fn plan_reports(error: &PlanError) -> Vec<Report> {
    match error {
        PlanError::Recipe(errors) => errors.0.iter().map(|e| e.report()).collect(),
        PlanError::BaseRecipe { source, .. } if matches!(**source, PlanError::Recipe(_)) => {
            plan_reports(source)
        }
        other => vec![Report::from_error(other).with_hint(other.hint())],
    }
}

fn print_human(plan: &Plan) {
    println!("recipe   {}", plan.recipe);
    println!("name     {}", plan.name);
    println!("version  {}", plan.version);
    println!();
    println!("inputs:");
    let base = serde_json::to_value(&plan.inputs.base).expect("base identities serialize");
    println!("  base       {}", compact(&base));
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
    for effect in &plan.effects {
        println!("  + {}", effect.describe());
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
