//! `bake cleanup`: remove what AMI builds left behind when they could not clean up themselves
//! (SIGKILL, a lost machine). Two sources:
//!
//! - the store's journals of dead runs ([`crate::ami::cleanup::cleanup`]): snapshots, images
//!   and the builder-instance strategy's instances, key pairs and security groups, by id or by
//!   the run's tag; runs whose journal lock is held (still running) are never touched;
//! - bake's tags, in every region swept (`--regions`, the default region, and the journals'
//!   regions): unfinished snapshots, and builder instances, key pairs, security groups and
//!   `building` AMIs carrying `bake:build-id`. Those of runs this store has no journal for
//!   (another machine's) are removed only with `--older-than`.
//!
//! - Image Builder ([`crate::imagebuilder::cleanup`]): what `--engine imagebuilder` runs left
//!   without a build, by journal or, with `--older-than`, by bake's version tags; never a
//!   version that has a build record, an available image or a build in progress.
//!
//! Resources without bake's tags are never touched.
//!
//! `--docker` sweeps the Docker Engine instead ([`crate::build::engine::sweep`]): containers,
//! images and volumes labelled by Docker-runner builds whose process is gone. Nothing without
//! bake's label is touched.

use std::time::Duration;

use clap::Args;

use super::common::{Failure, Outcome};
use super::print_json;
use crate::ami::cleanup::Action;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::settings::OutputFormat;
use crate::usecase::Context;
use crate::usecase::cleanup::{self, CleanupRequest, CleanupResult};

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Also sweep these regions for tagged resources (comma-separated or repeated); journal
    /// regions and the default region are always swept.
    #[arg(long, value_delimiter = ',', value_name = "REGION")]
    pub regions: Vec<String>,
    /// Remove only what is older than this (`2h`, `1d`); with it, also tagged resources of
    /// runs this store has no journal for (CI janitors).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Show what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Sweep the Docker Engine (found as the docker CLI finds it) for what killed Docker-runner
    /// builds left: containers, images and volumes labelled with a dead build's id. No AWS.
    #[arg(long)]
    pub docker: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration: {e}"))
}

pub fn run(args: &CleanupArgs, ctx: &Context) -> Outcome {
    if args.docker {
        return sweep_engine(args, ctx);
    }
    let request = CleanupRequest {
        regions: args.regions.clone(),
        older_than: args.older_than,
        dry_run: args.dry_run,
    };
    let outcome = cleanup::cleanup(ctx, &request)?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&outcome),
        OutputFormat::Human => print_human(&outcome),
    }
    let failures: Vec<Report> = outcome
        .journals
        .removals
        .iter()
        .filter(|r| r.failed())
        .map(|r| {
            Report::new(format!(
                "failed to remove {} {} in {}: {}",
                r.kind.label(),
                r.id,
                r.region,
                r.error.as_deref().unwrap_or("unknown error")
            ))
        })
        .collect();
    Failure::unless_none(failures)
}

/// `bake cleanup --docker`.
fn sweep_engine(args: &CleanupArgs, ctx: &Context) -> Outcome {
    let swept = cleanup::cleanup_docker(args.dry_run)?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "dry_run": args.dry_run,
            "engine": swept,
        })),
        OutputFormat::Human => {
            let verb = if args.dry_run {
                "would remove"
            } else {
                "removed"
            };
            for (kind, ids) in [
                ("container", &swept.containers),
                ("image", &swept.images),
                ("volume", &swept.volumes),
            ] {
                for id in ids {
                    println!("{verb}  docker {kind} {id}");
                }
            }
            if swept == crate::build::engine::Swept::default() {
                eprintln!("nothing to clean up in the Docker Engine");
            }
        }
    }
    Ok(ExitStatus::Success)
}

fn print_human(outcome: &CleanupResult) {
    let mut printed = false;
    for r in &outcome.journals.removals {
        let verb = match r.action {
            Action::Removed => "removed",
            Action::WouldRemove => "would remove",
            Action::AlreadyGone => continue,
            Action::Kept => "kept",
            Action::Failed => "failed",
        };
        printed = true;
        println!(
            "{verb}  {} {}  {}{}{}",
            r.kind.label(),
            r.id,
            r.region,
            r.run
                .as_deref()
                .map(|run| format!("  run {run}"))
                .unwrap_or_default(),
            r.reason
                .as_deref()
                .map(|why| format!(": {why}"))
                .unwrap_or_default()
        );
    }
    for run in &outcome.journals.running {
        printed = true;
        println!("skipped  run {run}: still running");
    }
    for run in &outcome.journals.skipped {
        printed = true;
        println!("skipped  run {run}: newer than --older-than");
    }
    for s in &outcome.skipped_tagged {
        for r in &s.resources {
            printed = true;
            println!(
                "skipped  {} {}  {}  run {}: {}",
                r.kind.label(),
                r.id,
                r.region,
                s.run,
                s.reason
            );
        }
    }
    for s in &outcome.skipped_image_builder {
        for r in &s.resources {
            printed = true;
            println!(
                "skipped  {} {}  {}  version {}: {}",
                r.kind.label(),
                r.arn,
                r.region,
                s.version,
                s.reason
            );
        }
    }
    if !printed {
        println!("nothing to clean up");
    }
}
