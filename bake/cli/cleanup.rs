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

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::{print_json, print_reports};
use crate::ami::cleanup::{Action, CleanupOptions, CleanupReport, Removal};
use crate::ami::instance::cleanup::{self as instance_cleanup, Found};
use crate::ami::instance::now_secs;
use crate::aws::Aws;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::imagebuilder::cleanup::{self as imagebuilder_cleanup, Tagged};
use crate::settings::{OutputFormat, Settings};
use crate::store::Store;

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

#[derive(Debug, Serialize)]
struct Skipped {
    run: String,
    reason: String,
    resources: Vec<Found>,
}

/// Image Builder resources of a version no journal of this store names, left alone.
#[derive(Debug, Serialize)]
struct SkippedVersion {
    recipe: String,
    version: String,
    reason: String,
    resources: Vec<Tagged>,
}

/// A region whose Image Builder resources could not be listed.
#[derive(Debug, Serialize)]
struct Unlisted {
    region: String,
    reason: String,
}

#[derive(Debug, Default, Serialize)]
struct Outcome {
    dry_run: bool,
    #[serde(flatten)]
    journals: CleanupReport,
    /// Tagged resources of runs this store has no journal for.
    skipped_tagged: Vec<Skipped>,
    /// Tagged Image Builder resources of unbuilt versions this store has no journal for.
    skipped_image_builder: Vec<SkippedVersion>,
    /// Regions whose Image Builder resources could not be listed (no Image Builder there, or
    /// no permission): a warning, not a failure, as most stores never used Image Builder.
    image_builder_unlisted: Vec<Unlisted>,
}

pub fn run(args: &CleanupArgs, settings: &Settings) -> ExitStatus {
    if args.docker {
        return sweep_engine(args, settings);
    }
    // A store that does not exist has no journals: only the tag sweep applies.
    let store = if settings.store.is_dir() {
        match Store::open(&settings.store) {
            Ok(store) => Some(store),
            Err(e) => {
                print_reports(settings, &[Report::from_error(&e)]);
                return ExitStatus::Infrastructure;
            }
        }
    } else {
        None
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    match rt.block_on(sweep(args, settings, store.as_ref())) {
        Err(reports) => {
            print_reports(settings, &reports);
            ExitStatus::Infrastructure
        }
        Ok(outcome) => {
            match settings.output {
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
            if failures.is_empty() {
                ExitStatus::Success
            } else {
                print_reports(settings, &failures);
                ExitStatus::Infrastructure
            }
        }
    }
}

/// `bake cleanup --docker`.
fn sweep_engine(args: &CleanupArgs, settings: &Settings) -> ExitStatus {
    let swept = crate::build::engine::discover()
        .and_then(|address| crate::build::engine::sweep(address, args.dry_run));
    match swept {
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
            ExitStatus::Infrastructure
        }
        Ok(swept) => {
            match settings.output {
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
            ExitStatus::Success
        }
    }
}

async fn sweep(
    args: &CleanupArgs,
    settings: &Settings,
    store: Option<&Store>,
) -> Result<Outcome, Vec<Report>> {
    let aws = Aws::load(&settings.aws).await;
    let mut regions: BTreeSet<String> = args.regions.iter().cloned().collect();
    if let Some(region) = aws.default_region() {
        regions.insert(region.to_owned());
    }
    if let Some(store) = store {
        for doc in crate::ami::journal::list(store) {
            regions.extend(doc.regions());
        }
    }
    if regions.is_empty() {
        return Err(vec![Report::new("no region to sweep").with_hint(Some(
            "name them with `--regions`, or set a default region (`--region`, `AWS_REGION`)".into(),
        ))]);
    }
    let options = CleanupOptions {
        dry_run: args.dry_run,
        older_than: args.older_than,
        regions: regions.iter().cloned().collect(),
    };
    // Journals first: they know ids, and the order resources must go in.
    let journals = crate::ami::cleanup::cleanup(&aws, store, &options)
        .await
        .map_err(|e| vec![Report::from_error(&e)])?;
    let mut outcome = Outcome {
        dry_run: args.dry_run,
        journals,
        ..Outcome::default()
    };
    // Runs the journals account for (alive, too young, or just cleaned).
    let mut known: BTreeSet<String> = outcome.journals.running.iter().cloned().collect();
    known.extend(outcome.journals.skipped.iter().cloned());
    known.extend(
        outcome
            .journals
            .removals
            .iter()
            .filter_map(|r| r.run.clone()),
    );
    if let Some(store) = store {
        known.extend(
            crate::ami::journal::list(store)
                .into_iter()
                .map(|doc| doc.run),
        );
    }
    let cutoff = args
        .older_than
        .map(|d| now_secs().saturating_sub(d.as_secs()));
    let wait = crate::ami::instance::wait::WaitPolicy {
        interval: std::env::var("BAKE_AWS_POLL_INTERVAL")
            .ok()
            .and_then(|t| humantime::parse_duration(&t).ok())
            .unwrap_or(Duration::from_secs(5)),
        ..instance_cleanup::default_wait()
    };
    for region in &regions {
        let ec2 = aws.ec2(region);
        let found = instance_cleanup::find(&ec2, region, None)
            .await
            .map_err(|reason| vec![Report::new(reason)])?;
        let mut groups: BTreeMap<String, Vec<Found>> = BTreeMap::new();
        for f in found {
            groups.entry(f.build_id.clone()).or_default().push(f);
        }
        let mut remove = Vec::new();
        for (run, resources) in groups {
            if outcome.journals.running.contains(&run) || outcome.journals.skipped.contains(&run) {
                continue;
            }
            // A journal of this store named the run: the journal pass listed (or removed) what
            // it knew; what remains tagged is still that dead run's.
            let has_journal = known.contains(&run);
            if has_journal && args.dry_run {
                continue;
            }
            let old_enough =
                cutoff.is_some_and(|c| resources.iter().all(|r| r.created.is_some_and(|t| t <= c)));
            if has_journal || old_enough {
                remove.extend(resources);
            } else {
                outcome.skipped_tagged.push(Skipped {
                    run,
                    reason: match cutoff {
                        None => {
                            "no journal in this store for this run; pass --older-than to remove it"
                                .into()
                        }
                        Some(_) => "newer than --older-than".into(),
                    },
                    resources,
                });
            }
        }
        if remove.is_empty() {
            continue;
        }
        if args.dry_run {
            outcome
                .journals
                .removals
                .extend(remove.iter().map(|f| removal(f, Action::WouldRemove, None)));
            continue;
        }
        let report = instance_cleanup::remove(&ec2, &remove, &wait).await;
        outcome.journals.removals.extend(
            report
                .removed
                .iter()
                .map(|f| removal(f, Action::Removed, None)),
        );
        for failure in report.failures {
            outcome.journals.removals.push(Removal {
                region: failure.region,
                kind: failure.kind,
                id: failure.id,
                action: Action::Failed,
                error: Some(failure.reason),
                reason: None,
                run: None,
            });
        }
    }
    sweep_image_builder(args, &aws, store, &regions, cutoff, &mut outcome).await;
    Ok(outcome)
}

/// How long one Image Builder call of the cleanup's tag sweep may take: a listing page answers
/// in well under a second; an endpoint that holds the call is given up on, with a warning.
const IMAGE_BUILDER_SWEEP_TIMEOUT: Duration = Duration::from_secs(20);

/// The tag pass over Image Builder: versions of recipes that carry bake's tags, have no build
/// (no record here, no available or running image) and no journal in this store (the journal
/// pass judged those). Removed only with `--older-than`, when all of the version's resources
/// are older: without a journal, a young one may be a live run's on another machine.
async fn sweep_image_builder(
    args: &CleanupArgs,
    aws: &Aws,
    store: Option<&Store>,
    regions: &BTreeSet<String>,
    cutoff: Option<u64>,
    outcome: &mut Outcome,
) {
    let journaled: BTreeSet<String> = store
        .map(|store| {
            crate::ami::journal::list(store)
                .into_iter()
                .map(|doc| doc.version)
                .collect()
        })
        .unwrap_or_default();
    for region in regions {
        // A janitor's look, not a build's: an endpoint without Image Builder (an emulator, a
        // proxy that never answers) must not hold up the EC2 cleanup, so one try, bounded.
        let client = aws.imagebuilder(region);
        let client = aws_sdk_imagebuilder::Client::from_conf(
            client
                .config()
                .to_builder()
                .retry_config(aws_config::retry::RetryConfig::disabled())
                .timeout_config(
                    aws_config::timeout::TimeoutConfig::builder()
                        .operation_timeout(IMAGE_BUILDER_SWEEP_TIMEOUT)
                        .build(),
                )
                .build(),
        );
        let found = match imagebuilder_cleanup::find_tagged(&client, region).await {
            Ok(found) => found,
            Err(reason) => {
                eprintln!(
                    "warning: could not list Image Builder resources in {region}, left them as they are: {reason}"
                );
                outcome.image_builder_unlisted.push(Unlisted {
                    region: region.clone(),
                    reason,
                });
                continue;
            }
        };
        for ((recipe, version), resources) in found {
            if journaled.contains(&version) {
                continue;
            }
            match imagebuilder_cleanup::keep(&client, store, &recipe, &version).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(reason) => {
                    outcome.skipped_image_builder.push(SkippedVersion {
                        recipe,
                        version,
                        reason: format!("could not tell whether it is built: {reason}"),
                        resources,
                    });
                    continue;
                }
            }
            let old_enough =
                cutoff.is_some_and(|c| resources.iter().all(|r| r.created.is_some_and(|t| t <= c)));
            if !old_enough {
                outcome.skipped_image_builder.push(SkippedVersion {
                    recipe,
                    version,
                    reason: match cutoff {
                        None => "no journal in this store for this version; pass --older-than to remove it".into(),
                        Some(_) => "newer than --older-than".into(),
                    },
                    resources,
                });
                continue;
            }
            // Images first, components last (`find_tagged` sorted them so).
            for resource in &resources {
                let mut removals = imagebuilder_cleanup::remove(
                    &client,
                    region,
                    None,
                    resource.kind,
                    Some(&resource.arn),
                    &resource.arn,
                    args.dry_run,
                )
                .await;
                for r in &mut removals {
                    r.reason = Some(format!("version {version} of {recipe}, never built"));
                }
                outcome.journals.removals.extend(removals);
            }
        }
    }
}

fn removal(found: &Found, action: Action, error: Option<String>) -> Removal {
    Removal {
        region: found.region.clone(),
        kind: found.kind,
        id: found.id.clone(),
        action,
        error,
        reason: None,
        run: Some(found.build_id.clone()),
    }
}

fn print_human(outcome: &Outcome) {
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
