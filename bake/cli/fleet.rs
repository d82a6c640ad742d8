//! `bake graph DIR`, `bake outdated DIR` and `bake plan --all DIR`: the recipes under a directory
//! as a fleet ([`crate::usecase::fleet`] loads, plans and compares them; this file renders).

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use super::common::Outcome;
use super::{print_json, print_reports};
use crate::diagnostic::Diagnose;
use crate::exit::ExitStatus;
use crate::settings::OutputFormat;
use crate::usecase::Context;
use crate::usecase::fleet::{
    existing_store, load_fleet, one_line, outdated as outdated_report, plan_fleet, short_version,
};

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// The directory whose recipes (searched recursively) make the graph.
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// How the graph is printed: `text` (a tree) or `dot` (Graphviz). `--output json` prints
    /// it as JSON.
    #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
    pub format: GraphFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
}

pub fn graph(args: &GraphArgs, ctx: &Context) -> Outcome {
    let fleet = load_fleet(&args.dir)?;
    match (ctx.settings.output, args.format) {
        (OutputFormat::Json, _) => print_json(&fleet.document()),
        (OutputFormat::Human, GraphFormat::Text) => print!("{}", fleet.tree()),
        (OutputFormat::Human, GraphFormat::Dot) => print!("{}", fleet.dot()),
    }
    Ok(ExitStatus::Success)
}

// ---------------------------------------------------------------------------------------------
// bake plan --all

/// One line of `bake plan --all`.
#[derive(Debug, Serialize)]
struct PlannedMember<'a> {
    recipe: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base: Option<&'a str>,
    /// `new`, `built` (in the store), `published` (asked with `--check`: in a registry or AWS),
    /// or `error`.
    state: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    published: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `bake plan --all DIR` (for `bake plan`, which calls it with its settings until it is
/// converted).
pub fn plan_all(dir: &Path, check: bool, ctx: &Context) -> ExitStatus {
    let settings = &ctx.settings;
    let fleet = match load_fleet(dir) {
        Ok(fleet) => fleet,
        Err(error) => {
            print_reports(settings, &error.reports());
            return error.exit_status();
        }
    };
    let plans = plan_fleet(ctx, &fleet);
    let store = existing_store(settings);
    let mut lines = Vec::with_capacity(fleet.len());
    let mut failed = false;
    for (member, plan) in fleet.members.iter().zip(&plans) {
        let base = member.parent.map(|p| fleet.members[p].shown.as_str());
        let line = match plan {
            Ok(plan) => {
                let built = store
                    .as_ref()
                    .is_some_and(|s| crate::fleet::built_record(s, &plan.version).is_some());
                let published = if check {
                    crate::usecase::plan::published(ctx, &member.recipe, plan)
                } else {
                    Vec::new()
                };
                PlannedMember {
                    recipe: &member.shown,
                    name: &member.recipe.name,
                    version: Some(plan.version.to_string()),
                    base,
                    state: if !published.is_empty() {
                        "published"
                    } else if built {
                        "built"
                    } else {
                        "new"
                    },
                    published,
                    error: None,
                }
            }
            Err(report) => {
                failed = true;
                PlannedMember {
                    recipe: &member.shown,
                    name: &member.recipe.name,
                    version: None,
                    base,
                    state: "error",
                    published: Vec::new(),
                    error: Some(one_line(report)),
                }
            }
        };
        lines.push(line);
    }
    match settings.output {
        OutputFormat::Json => print_json(&serde_json::json!({ "recipes": lines })),
        OutputFormat::Human => {
            let width = lines.iter().map(|l| l.recipe.len()).max().unwrap_or(0);
            for line in &lines {
                let version = line.version.as_deref().map_or("-", short_version);
                let detail = match (&line.error, line.published.is_empty()) {
                    (Some(error), _) => format!("  {error}"),
                    (None, false) => format!("  {}", line.published.join(", ")),
                    _ => String::new(),
                };
                println!(
                    "{:width$}  {:12}  {}{detail}",
                    line.recipe, version, line.state
                );
            }
        }
    }
    if failed {
        for report in plans.into_iter().filter_map(Result::err) {
            print_reports(settings, &[report]);
        }
        ExitStatus::RecipeOrUsage
    } else {
        ExitStatus::Success
    }
}

// ---------------------------------------------------------------------------------------------
// bake outdated

#[derive(Debug, Args)]
pub struct OutdatedArgs {
    /// The directory whose recipes (searched recursively) are compared with their last build.
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
}

pub fn outdated(args: &OutdatedArgs, ctx: &Context) -> Outcome {
    let report = outdated_report(ctx, &args.dir)?;
    let lines = &report.recipes;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Human => {
            let short = |v: &Option<String>| v.as_deref().map_or("", short_version).to_owned();
            for line in lines.iter().filter(|l| l.state == "outdated") {
                println!(
                    "{} ({}): outdated, built {} → now {}",
                    line.recipe,
                    line.name,
                    short(&line.built),
                    short(&line.now)
                );
                for reason in &line.reasons {
                    println!("  {}", reason.describe());
                }
                for p in &line.packages {
                    let security = if p.security { ", security" } else { "" };
                    println!(
                        "  package {} {} → {} ({}{security})",
                        p.name, p.built, p.now, p.suite
                    );
                }
                if !line.drags_along.is_empty() {
                    println!("  drags along: {}", line.drags_along.join(", "));
                }
            }
            for line in lines.iter().filter(|l| l.state == "error") {
                println!(
                    "{} ({}): not planned: {}",
                    line.recipe,
                    line.name,
                    line.error.as_deref().unwrap_or_default()
                );
            }
            println!(
                "{} outdated, {} up to date, {} never built here",
                report.outdated, report.up_to_date, report.unbuilt
            );
        }
    }
    Ok(report.status())
}
