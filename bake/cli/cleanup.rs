//! `bake cleanup`: remove what builder-instance builds left behind when they could not clean
//! up themselves (SIGKILL, a lost machine). It finds resources two ways: the store's journals
//! (what each build was about to create) and the `bake:build-id` tag every such resource
//! carries, in every region of the journals, of `--regions` and of the default region.
//! Resources without bake's tags are never touched; builds whose process still runs are
//! skipped; builds this store has no journal for are removed only with `--older-than`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::{print_json, print_reports};
use crate::ami::instance::cleanup::{self, CleanupFailure, Found};
use crate::ami::instance::journal::{self, Journal, JournalEntry, ResourceState};
use crate::ami::instance::wait::WaitPolicy;
use crate::aws::Aws;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::settings::{OutputFormat, Settings};
use crate::store::Store;

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Also sweep these regions for tagged resources (comma-separated or repeated); journal
    /// regions and the default region are always swept.
    #[arg(long, value_delimiter = ',', value_name = "REGION")]
    pub regions: Vec<String>,
    /// Remove only what is older than this (`2h`, `1d`); with it, also resources of builds
    /// this store has no journal for (CI janitors).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Show what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration: {e}"))
}

#[derive(Debug, Serialize)]
struct Skipped {
    build_id: String,
    reason: String,
    resources: Vec<Found>,
}

#[derive(Debug, Default, Serialize)]
struct Outcome {
    dry_run: bool,
    removed: Vec<Found>,
    skipped: Vec<Skipped>,
    failures: Vec<CleanupFailure>,
    /// Snapshot-strategy runs (uploads, registrations, copies) that did not finish.
    runs: crate::ami::cleanup::CleanupReport,
}

pub fn run(args: &CleanupArgs, settings: &Settings) -> ExitStatus {
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
    let journals: Vec<JournalEntry> = store.as_ref().map(journal::list).unwrap_or_default();
    let rt = match super::ami_instance::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let result = rt.block_on(sweep(args, settings, store.as_ref(), journals));
    match result {
        Err(reports) => {
            print_reports(settings, &reports);
            ExitStatus::Infrastructure
        }
        Ok(outcome) => {
            match settings.output {
                OutputFormat::Json => print_json(&outcome),
                OutputFormat::Human => print_human(&outcome),
            }
            for r in outcome.runs.removals.iter().filter(|r| r.failed()) {
                print_reports(
                    settings,
                    &[Report::new(format!(
                        "failed to remove {} {} in {}: {}",
                        r.kind.label(),
                        r.id,
                        r.region,
                        r.error.as_deref().unwrap_or("unknown error")
                    ))],
                );
            }
            if outcome.failures.is_empty() && !outcome.runs.failed() {
                ExitStatus::Success
            } else {
                let reports: Vec<Report> = outcome
                    .failures
                    .iter()
                    .map(|f| Report::new(f.to_string()))
                    .collect();
                print_reports(settings, &reports);
                ExitStatus::Infrastructure
            }
        }
    }
}

async fn sweep(
    args: &CleanupArgs,
    settings: &Settings,
    store: Option<&Store>,
    journals: Vec<JournalEntry>,
) -> Result<Outcome, Vec<Report>> {
    let aws = Aws::load(&settings.aws).await;
    let mut regions: BTreeSet<String> = args.regions.iter().cloned().collect();
    for j in &journals {
        regions.insert(j.region.clone());
        regions.extend(j.resources.iter().map(|r| r.region.clone()));
    }
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
    let by_id: BTreeMap<&str, &JournalEntry> =
        journals.iter().map(|j| (j.build_id.as_str(), j)).collect();
    let now = journal::now_secs();
    let cutoff = args.older_than.map(|d| now.saturating_sub(d.as_secs()));
    let mut outcome = Outcome {
        dry_run: args.dry_run,
        ..Outcome::default()
    };
    let wait = WaitPolicy {
        interval: std::env::var("BAKE_AWS_POLL_INTERVAL")
            .ok()
            .and_then(|t| humantime::parse_duration(&t).ok())
            .unwrap_or(Duration::from_secs(5)),
        ..cleanup::default_wait()
    };
    let mut swept_builds: BTreeMap<String, bool> = BTreeMap::new();
    for region in &regions {
        let ec2 = aws.ec2(region);
        let mut found = cleanup::find(&ec2, region, None)
            .await
            .map_err(|reason| vec![Report::new(reason)])?;
        // What journals recorded by id, in case its tags never arrived.
        for j in &journals {
            for r in &j.resources {
                if &r.region == region
                    && r.state == ResourceState::Created
                    && let Some(id) = &r.id
                    && !found.iter().any(|f| f.kind == r.kind && &f.id == id)
                    && r.kind != journal::ResourceKind::Image
                {
                    found.push(Found {
                        kind: r.kind,
                        region: region.clone(),
                        id: id.clone(),
                        name: matches!(r.kind, journal::ResourceKind::KeyPair)
                            .then(|| r.name.clone()),
                        build_id: j.build_id.clone(),
                        created: Some(j.started),
                    });
                }
            }
        }
        let mut groups: BTreeMap<String, Vec<Found>> = BTreeMap::new();
        for f in found {
            groups.entry(f.build_id.clone()).or_default().push(f);
        }
        let mut to_remove = Vec::new();
        for (build_id, resources) in groups {
            let decision = match by_id.get(build_id.as_str()) {
                Some(j) if j.is_live() => Err(format!("build is still running (pid {})", j.pid)),
                Some(j) => match cutoff {
                    Some(cutoff) if j.started > cutoff => {
                        Err("build is newer than --older-than".to_owned())
                    }
                    _ => Ok(()),
                },
                None => match cutoff {
                    None => Err(
                        "no journal in this store for this build; pass --older-than to remove it"
                            .to_owned(),
                    ),
                    Some(cutoff) => {
                        if resources
                            .iter()
                            .all(|r| r.created.is_some_and(|c| c <= cutoff))
                        {
                            Ok(())
                        } else {
                            Err("resources are newer than --older-than".to_owned())
                        }
                    }
                },
            };
            match decision {
                Ok(()) => {
                    swept_builds.entry(build_id.clone()).or_insert(true);
                    to_remove.extend(resources);
                }
                Err(reason) => outcome.skipped.push(Skipped {
                    build_id,
                    reason,
                    resources,
                }),
            }
        }
        if to_remove.is_empty() {
            continue;
        }
        if args.dry_run {
            outcome.removed.extend(to_remove);
            continue;
        }
        let report = cleanup::remove(&ec2, &to_remove, &wait).await;
        for f in &report.failures {
            if let Some(r) = to_remove.iter().find(|r| r.id == f.id) {
                swept_builds.insert(r.build_id.clone(), false);
            }
        }
        outcome.removed.extend(report.removed);
        outcome.failures.extend(report.failures);
    }
    // Journals of dead builds whose resources are all gone are closed (and deleted).
    if !args.dry_run
        && let Some(store) = store
    {
        for j in &journals {
            if j.is_live() || swept_builds.get(&j.build_id) == Some(&false) {
                continue;
            }
            if cutoff.is_some_and(|c| j.started > c) {
                continue;
            }
            let mut open = Journal::open(store, j.clone());
            open.all_removed();
            if let Err(e) = open.end() {
                tracing::warn!("failed to close the journal of build {}: {e}", j.build_id);
            }
        }
    }
    outcome.runs = crate::ami::cleanup::cleanup(
        &aws,
        store,
        &crate::ami::cleanup::CleanupOptions {
            dry_run: args.dry_run,
            older_than: args.older_than,
            regions: regions.iter().cloned().collect(),
        },
    )
    .await
    .map_err(|e| vec![Report::from_error(&e)])?;
    Ok(outcome)
}

fn print_human(outcome: &Outcome) {
    let verb = if outcome.dry_run {
        "would remove"
    } else {
        "removed"
    };
    for r in &outcome.removed {
        println!(
            "{verb}  {} {}  {}  build {}",
            r.kind.label(),
            r.id,
            r.region,
            r.build_id
        );
    }
    for s in &outcome.skipped {
        for r in &s.resources {
            println!(
                "skipped  {} {}  {}  build {}: {}",
                r.kind.label(),
                r.id,
                r.region,
                s.build_id,
                s.reason
            );
        }
    }
    for r in &outcome.runs.removals {
        let action = match r.action {
            crate::ami::cleanup::Action::Removed => "removed",
            crate::ami::cleanup::Action::WouldRemove => "would remove",
            crate::ami::cleanup::Action::AlreadyGone => "already gone",
            crate::ami::cleanup::Action::Failed => "failed to remove",
        };
        println!(
            "{action}  {} {}  {}  run {}",
            r.kind.label(),
            r.id,
            r.region,
            r.run.as_deref().unwrap_or("-")
        );
    }
    for run in &outcome.runs.running {
        println!("skipped  run {run}: still running");
    }
    for run in &outcome.runs.skipped {
        println!("skipped  run {run}: newer than --older-than");
    }
    if outcome.removed.is_empty()
        && outcome.skipped.is_empty()
        && outcome.runs.removals.is_empty()
        && outcome.runs.running.is_empty()
        && outcome.runs.skipped.is_empty()
    {
        println!("nothing to clean up");
    }
}
