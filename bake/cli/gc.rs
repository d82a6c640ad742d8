//! `bake gc [RECIPE…|--all DIR] [--keep N] [--older-than D] [--dry-run]`: remove old AMIs
//! (deprecating first) and images (ECR, registries) of recipes that nothing references any
//! more; one line per artifact says what was decided and why ([`crate::gc`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::common::{Failure, Outcome, load_recipe};
use super::{VarArgs, print_json};
use crate::diagnostic::Report;
use crate::gc::{GcOptions, GcReport};
use crate::settings::OutputFormat;
use crate::usecase::{Context, gc};

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Recipe files whose artifacts are collected.
    #[arg(value_name = "RECIPE", required_unless_present = "all")]
    pub recipes: Vec<PathBuf>,
    /// Every recipe (`*.yaml`, `*.yml`) directly in this directory.
    #[arg(long, value_name = "DIR", conflicts_with = "recipes")]
    pub all: Option<PathBuf>,
    /// Keep the newest N versions of each recipe (over the recipe's `lifecycle.keep`; default 3).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// Remove only versions older than this (`12h`, `30d`; over `lifecycle.older_than`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Decide and explain every artifact; send only reads.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration: {e}"))
}

pub fn run(args: &GcArgs, ctx: &Context) -> Outcome {
    let paths = match &args.all {
        Some(dir) => gc::recipes_in(dir)?,
        None => args.recipes.clone(),
    };
    let mut recipes = Vec::new();
    for path in &paths {
        recipes.push(load_recipe(path, &args.vars)?);
    }
    let options = GcOptions {
        keep: args.keep,
        older_than: args.older_than,
        dry_run: args.dry_run,
    };
    let report = gc::collect(ctx, &recipes, &options)?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Human => print_human(&report),
    }
    let failures: Vec<Report> = report
        .failures()
        .map(|l| {
            Report::new(format!(
                "failed to remove {} {} in {}: {}",
                l.kind,
                l.id,
                l.region,
                l.error.as_deref().unwrap_or("unknown error")
            ))
        })
        .collect();
    Failure::unless_none(failures)
}

fn print_human(report: &GcReport) {
    for line in &report.artifacts {
        println!("{}", line.human());
    }
    if report.artifacts.is_empty() {
        println!("nothing to collect");
    }
    for note in &report.notes {
        eprintln!("note: {note}");
    }
}
