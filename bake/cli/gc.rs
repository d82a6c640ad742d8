//! `bake gc [RECIPE…|--all DIR] [--keep N] [--older-than D] [--dry-run]`: remove old AMIs
//! (deprecating first) and images (ECR, registries) of recipes that nothing references any
//! more; one line per artifact says what was decided and why ([`crate::gc`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{VarArgs, print_json, print_reports};
use crate::aws::Aws;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::gc::{GcOptions, GcReport};
use crate::recipe::Recipe;
use crate::registry::auth::{ChainCredentials, Credentials};
use crate::registry::ecr::EcrCredentials;
use crate::registry::{Client, Reference};
use crate::settings::{OutputFormat, Settings};
use crate::store::Store;

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

/// The recipe files of `--all DIR`, sorted.
fn recipes_in(dir: &std::path::Path) -> Result<Vec<PathBuf>, Report> {
    let entries = fs_err::read_dir(dir).map_err(|e| Report::from_error(&e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Report::new(format!(
            "no recipe (`*.yaml`, `*.yml`) in `{}`",
            dir.display()
        )));
    }
    Ok(found)
}

pub fn run(args: &GcArgs, settings: &Settings) -> ExitStatus {
    let paths = match &args.all {
        Some(dir) => match recipes_in(dir) {
            Ok(paths) => paths,
            Err(report) => {
                print_reports(settings, &[report]);
                return ExitStatus::RecipeOrUsage;
            }
        },
        None => args.recipes.clone(),
    };
    let mut recipes = Vec::new();
    for path in &paths {
        match super::common::load_or_report(path, &args.vars, settings) {
            Ok(recipe) => recipes.push(recipe),
            Err(status) => return status,
        }
    }
    if !settings.store.join("oci-layout").is_file() {
        print_reports(
            settings,
            &[Report::new(format!(
                "the store `{}` has no build records: gc removes only what this store built",
                settings.store.display()
            ))
            .with_hint(Some(
                "pass the store the builds used (`--store`, `BAKE_STORE`)".into(),
            ))],
        );
        return ExitStatus::RecipeOrUsage;
    }
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
    let options = GcOptions {
        keep: args.keep,
        older_than: args.older_than,
        dry_run: args.dry_run,
    };
    let outcome = rt.block_on(async {
        let aws = Aws::load(&settings.aws).await;
        let registry = registry_client(settings, &recipes, &aws)?;
        crate::gc::run(&aws, &registry, &store, &recipes, &options)
            .await
            .map_err(|e| Report::from_error(&e))
    });
    let report = match outcome {
        Ok(report) => report,
        Err(report) => {
            print_reports(settings, &[report]);
            return ExitStatus::Infrastructure;
        }
    };
    match settings.output {
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
    if failures.is_empty() {
        ExitStatus::Success
    } else {
        print_reports(settings, &failures);
        ExitStatus::Infrastructure
    }
}

/// The client for the recipes' registries: Docker's credentials and ECR's tokens, plain HTTP
/// where a registry target says `insecure`, as `bake push` talks to them.
fn registry_client(settings: &Settings, recipes: &[Recipe], aws: &Aws) -> Result<Client, Report> {
    let sources: Vec<Arc<dyn Credentials>> = vec![
        settings.registry.credentials(),
        Arc::new(EcrCredentials::new(aws.clone())),
    ];
    let mut options = settings.registry.client_options();
    for target in recipes
        .iter()
        .flat_map(|r| &r.publish.registries)
        .filter(|t| t.insecure)
    {
        if let Ok(reference) = Reference::repository_only(&target.repository) {
            options.insecure.push(reference.registry().to_owned());
        }
    }
    Client::new(options, Arc::new(ChainCredentials(sources)))
        .map_err(|e| Report::from_error(&e).with_hint(e.hint()))
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
