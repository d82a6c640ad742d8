//! Cleaning up what AMI builds left behind when they could not clean up themselves (SIGKILL, a
//! lost machine): by the store's journals of dead runs, then by bake's tags in every region
//! swept, then Image Builder's tagged resources of unbuilt versions; or, for `--docker`, what
//! killed Docker-runner builds left in the Docker Engine. What each source may remove is
//! described on `bake cleanup` (`cli/cleanup.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

mod imagebuilder;

use super::Context;
use crate::ami::cleanup::{Action, CleanupOptions, CleanupReport, Removal};
use crate::ami::instance::cleanup::{self as instance_cleanup, Found};
use crate::ami::instance::now_secs;
use crate::aws::Aws;
use crate::build::engine::{EngineError, Swept};
use crate::diagnostic::Diagnose;
use crate::imagebuilder::cleanup::Tagged;
use crate::store::Store;

/// What to sweep and how.
#[derive(Debug, Clone, Default)]
pub struct CleanupRequest {
    /// Regions to sweep for tagged resources besides the journals' and the default region.
    pub regions: Vec<String>,
    /// Remove only what is older than this; with it, also tagged resources of runs this store
    /// has no journal for.
    pub older_than: Option<Duration>,
    /// Show what would be removed, and remove nothing.
    pub dry_run: bool,
}

/// Why a cleanup could not run.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(transparent)]
    Context(#[from] super::ContextError),
    #[error("no region to sweep")]
    NoRegion,
    #[error(transparent)]
    Journals(#[from] crate::ami::cleanup::CleanupError),
    /// Tagged resources could not be listed (the reason as the lister gives it).
    #[error("{0}")]
    Find(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl Diagnose for CleanupError {
    fn hint(&self) -> Option<String> {
        match self {
            CleanupError::NoRegion => Some(
                "name them with `--regions`, or set a default region (`--region`, `AWS_REGION`)"
                    .into(),
            ),
            CleanupError::Engine(e) => e.hint(),
            _ => None,
        }
    }
}

/// Sweeps the journals, bake's tags and Image Builder (see the module's documentation).
pub fn cleanup(ctx: &Context, request: &CleanupRequest) -> Result<CleanupResult, CleanupError> {
    // A store that does not exist has no journals: only the tag sweep applies.
    let store = if ctx.settings.store.is_dir() {
        Some(ctx.store()?)
    } else {
        None
    };
    ctx.block_on(async { sweep(request, ctx.aws().await, store).await })?
}

/// Sweeps the Docker Engine (found as the docker CLI finds it): containers, images and volumes
/// labelled with a dead Docker-runner build's id.
pub fn cleanup_docker(dry_run: bool) -> Result<Swept, CleanupError> {
    let address = crate::build::engine::discover()?;
    Ok(crate::build::engine::sweep(address, dry_run)?)
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub run: String,
    pub reason: String,
    pub resources: Vec<Found>,
}

/// Image Builder resources of a version no journal of this store names, left alone.
#[derive(Debug, Serialize)]
pub struct SkippedVersion {
    pub recipe: String,
    pub version: String,
    pub reason: String,
    pub resources: Vec<Tagged>,
}

/// A region whose Image Builder resources could not be listed.
#[derive(Debug, Serialize)]
pub struct Unlisted {
    pub region: String,
    pub reason: String,
}

/// What a cleanup removed (or, in a dry run, would remove), and what it left and why.
#[derive(Debug, Default, Serialize)]
pub struct CleanupResult {
    pub dry_run: bool,
    #[serde(flatten)]
    pub journals: CleanupReport,
    /// Tagged resources of runs this store has no journal for.
    pub skipped_tagged: Vec<Skipped>,
    /// Tagged Image Builder resources of unbuilt versions this store has no journal for.
    pub skipped_image_builder: Vec<SkippedVersion>,
    /// Regions whose Image Builder resources could not be listed (no Image Builder there, or
    /// no permission): a warning, not a failure, as most stores never used Image Builder.
    pub image_builder_unlisted: Vec<Unlisted>,
}

async fn sweep(
    args: &CleanupRequest,
    aws: &Aws,
    store: Option<&Store>,
) -> Result<CleanupResult, CleanupError> {
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
        return Err(CleanupError::NoRegion);
    }
    let options = CleanupOptions {
        dry_run: args.dry_run,
        older_than: args.older_than,
        regions: regions.iter().cloned().collect(),
    };
    // Journals first: they know ids, and the order resources must go in.
    let journals = crate::ami::cleanup::cleanup(aws, store, &options).await?;
    let mut outcome = CleanupResult {
        dry_run: args.dry_run,
        journals,
        ..CleanupResult::default()
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
            .map_err(CleanupError::Find)?;
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
    imagebuilder::sweep(args, aws, store, &regions, cutoff, &mut outcome).await;
    Ok(outcome)
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
