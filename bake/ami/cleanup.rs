//! Removing what bake created: the rollback of a failed or interrupted run (from its live
//! journal), and `bake cleanup` (journals of killed runs, plus unfinished snapshots found by
//! bake's tags). Only resources a journal names by id, or that carry the run's own `bake:run`
//! tag, are touched; a finished build's AMIs never are, and neither is a journaled image or
//! snapshot that carries *another* run's `bake:run` tag (runs of one version share idempotency
//! tokens, so a racing run can journal what the other made). In particular an image whose id never
//! reached the journal is looked for by its name *and* the run's tag, never by name and
//! creation time: another run of the same version registers an AMI of the same name, and that
//! one is finished.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_ec2::Client as Ec2;
use serde::Serialize;

use super::journal::{self, Journal, JournalError, Resource, ResourceKind, ResourceStatus};
use super::lookup;
use super::{AwsCallError, TAG_RUN, TAG_VERSION, sdk_error_code};
use crate::aws::Aws;
use crate::store::Store;

/// What happened to one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Removed,
    /// `--dry-run`: would have been removed.
    WouldRemove,
    /// Not there any more (removed earlier, or never made).
    AlreadyGone,
    /// Left alone: the journal names it, but it belongs to another run (see `reason`).
    Kept,
    Failed,
}

/// One resource's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removal {
    pub region: String,
    pub kind: ResourceKind,
    pub id: String,
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why a resource was kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The run that created it, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
}

impl Removal {
    pub fn failed(&self) -> bool {
        self.action == Action::Failed
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Removes one resource (an image with its snapshots, or a snapshot). A resource whose id never
/// reached the journal is found by the run's tag (with the journaled name, for images). An
/// emulator that drops the tags given at registration (moto) leaves such an image unfound:
/// left behind, rather than guessed at.
async fn remove(aws: &Aws, run: &str, resource: &Resource, dry_run: bool) -> Vec<Removal> {
    if resource.kind.is_image_builder() {
        return crate::imagebuilder::cleanup::remove(
            &aws.imagebuilder(&resource.region),
            &resource.region,
            Some(run),
            resource.kind,
            resource.id.as_deref(),
            &resource.token,
            dry_run,
        )
        .await;
    }
    let ec2 = &aws.ec2(&resource.region);
    let removal = |id: &str, kind, action, error: Option<String>| Removal {
        region: resource.region.clone(),
        kind,
        id: id.to_owned(),
        action,
        error,
        reason: None,
        run: Some(run.to_owned()),
    };
    let kept = |id: &str, kind, owner: String| Removal {
        region: resource.region.clone(),
        kind,
        id: id.to_owned(),
        action: Action::Kept,
        error: None,
        reason: Some(format!(
            "it carries the `{TAG_RUN}` tag of run {owner}: another run of the same version made it (AWS answered this run's create with the same idempotency token)"
        )),
        run: Some(run.to_owned()),
    };
    match resource.kind {
        ResourceKind::Image => {
            let candidates: Vec<(String, Vec<String>)> = match &resource.id {
                Some(id) => match lookup::image(ec2, id).await {
                    Ok(Some(info)) => match other_run(&info.tags, run) {
                        Some(owner) => return vec![kept(id, ResourceKind::Image, owner)],
                        None => vec![(id.clone(), info.snapshots)],
                    },
                    Ok(None) => vec![],
                    Err(e) => {
                        return vec![removal(id, ResourceKind::Image, Action::Failed, Some(e.0))];
                    }
                },
                None => match lookup::images_named_by_run(ec2, &resource.token, run).await {
                    Ok(images) => images
                        .into_iter()
                        .map(|i| (i.image_id, i.snapshots))
                        .collect(),
                    Err(e) => {
                        return vec![removal(
                            &resource.token,
                            ResourceKind::Image,
                            Action::Failed,
                            Some(e.0),
                        )];
                    }
                },
            };
            let mut out = Vec::new();
            if candidates.is_empty()
                && let Some(id) = &resource.id
            {
                out.push(removal(id, ResourceKind::Image, Action::AlreadyGone, None));
            }
            let mut snapshots: Vec<String> = resource.snapshots.clone();
            for (image_id, image_snapshots) in candidates {
                for s in image_snapshots {
                    if !snapshots.contains(&s) {
                        snapshots.push(s);
                    }
                }
                if dry_run {
                    out.push(removal(
                        &image_id,
                        ResourceKind::Image,
                        Action::WouldRemove,
                        None,
                    ));
                    continue;
                }
                match ec2.deregister_image().image_id(&image_id).send().await {
                    Ok(_) => out.push(removal(
                        &image_id,
                        ResourceKind::Image,
                        Action::Removed,
                        None,
                    )),
                    Err(e) if sdk_error_code(&e).is_some_and(|c| c.starts_with("InvalidAMIID")) => {
                        out.push(removal(
                            &image_id,
                            ResourceKind::Image,
                            Action::AlreadyGone,
                            None,
                        ));
                    }
                    Err(e) => {
                        out.push(removal(
                            &image_id,
                            ResourceKind::Image,
                            Action::Failed,
                            Some(AwsCallError::from_sdk(&e).0),
                        ));
                        // Its snapshots are in use while it exists.
                        return out;
                    }
                }
            }
            for snapshot_id in snapshots {
                out.push(
                    delete_snapshot(ec2, &snapshot_id, dry_run)
                        .await
                        .into_removal(&resource.region, &snapshot_id, run),
                );
            }
            out
        }
        ResourceKind::Snapshot => {
            let ids: Vec<String> = match &resource.id {
                Some(id) => match lookup::snapshot(ec2, id).await {
                    Ok(Some(info)) => match other_run(&info.tags, run) {
                        Some(owner) => return vec![kept(id, ResourceKind::Snapshot, owner)],
                        None => vec![id.clone()],
                    },
                    // Gone, or not readable: deleting says which.
                    Ok(None) | Err(_) => vec![id.clone()],
                },
                None => match lookup::snapshots_tagged(ec2, TAG_RUN, Some(run)).await {
                    Ok(found) => found.into_iter().map(|s| s.snapshot_id).collect(),
                    Err(e) => {
                        return vec![removal(
                            &resource.token,
                            ResourceKind::Snapshot,
                            Action::Failed,
                            Some(e.0),
                        )];
                    }
                },
            };
            let mut out = Vec::new();
            for id in ids {
                out.push(delete_snapshot(ec2, &id, dry_run).await.into_removal(
                    &resource.region,
                    &id,
                    run,
                ));
            }
            out
        }
        // A builder's temporary resources (instance strategy): terminated and deleted in
        // the order AWS needs, found by id or by the run's tag.
        ResourceKind::Instance | ResourceKind::KeyPair | ResourceKind::SecurityGroup => {
            super::instance::cleanup::remove_journaled(ec2, resource, run, dry_run).await
        }
        // Handled above.
        ResourceKind::ImageBuilderComponent
        | ResourceKind::ImageBuilderImageRecipe
        | ResourceKind::ImageBuilderContainerRecipe
        | ResourceKind::ImageBuilderInfrastructure
        | ResourceKind::ImageBuilderDistribution
        | ResourceKind::ImageBuilderImage => Vec::new(),
    }
}

/// The run a resource's `bake:run` tag names, when that is not `run`. Idempotency tokens are
/// derived from the version, so two runs of one version that race get the same snapshot or
/// copy back from AWS, and both journal it; only the run whose tag it carries may remove it.
/// A resource without the tag (an emulator may drop tags) is the journal's to remove.
fn other_run(tags: &BTreeMap<String, String>, run: &str) -> Option<String> {
    tags.get(TAG_RUN).filter(|owner| *owner != run).cloned()
}

struct SnapshotOutcome(Action, Option<String>);

impl SnapshotOutcome {
    fn into_removal(self, region: &str, id: &str, run: &str) -> Removal {
        Removal {
            region: region.to_owned(),
            kind: ResourceKind::Snapshot,
            id: id.to_owned(),
            action: self.0,
            error: self.1,
            reason: None,
            run: Some(run.to_owned()),
        }
    }
}

async fn delete_snapshot(ec2: &Ec2, snapshot_id: &str, dry_run: bool) -> SnapshotOutcome {
    if dry_run {
        return match lookup::snapshot(ec2, snapshot_id).await {
            Ok(Some(_)) => SnapshotOutcome(Action::WouldRemove, None),
            Ok(None) => SnapshotOutcome(Action::AlreadyGone, None),
            Err(e) => SnapshotOutcome(Action::Failed, Some(e.0)),
        };
    }
    match ec2.delete_snapshot().snapshot_id(snapshot_id).send().await {
        Ok(_) => SnapshotOutcome(Action::Removed, None),
        Err(e) if sdk_error_code(&e) == Some("InvalidSnapshot.NotFound") => {
            SnapshotOutcome(Action::AlreadyGone, None)
        }
        Err(e) => SnapshotOutcome(Action::Failed, Some(AwsCallError::from_sdk(&e).0)),
    }
}

/// Removes everything a live run created, newest first, and deletes its journal if all went.
/// Returns what happened to each resource; failures are in the list (the caller reports them
/// next to the error that caused the rollback, never instead of it).
pub async fn rollback(aws: &Aws, journal: Journal) -> Vec<Removal> {
    let doc = journal.doc();
    let mut removals = Vec::new();
    let mut all_gone = true;
    for (entry, resource) in journal.live() {
        let outcome = remove(aws, &doc.run, &resource, false).await;
        if outcome.iter().any(Removal::failed) {
            all_gone = false;
        } else if let Err(e) = journal.removed(entry) {
            tracing::warn!("failed to update the journal: {e}");
            all_gone = false;
        }
        removals.extend(outcome);
    }
    if all_gone && let Err(e) = journal.discard() {
        tracing::warn!("failed to delete the journal: {e}");
    }
    removals
}

/// What `bake cleanup` should do.
#[derive(Debug, Clone, Default)]
pub struct CleanupOptions {
    pub dry_run: bool,
    /// Only runs (and unfinished snapshots) older than this.
    pub older_than: Option<Duration>,
    /// Regions to search by tag for unfinished snapshots no journal names by id: of this
    /// store's dead runs, and with `older_than` of runs from other machines too.
    pub regions: Vec<String>,
}

/// What `bake cleanup` did.
#[derive(Debug, Default, Serialize)]
pub struct CleanupReport {
    pub removals: Vec<Removal>,
    /// Runs still alive: left alone.
    pub running: Vec<String>,
    /// Abandoned runs younger than `--older-than`: left alone.
    pub skipped: Vec<String>,
}

impl CleanupReport {
    pub fn failed(&self) -> bool {
        self.removals.iter().any(Removal::failed)
    }
}

/// Finds and removes what killed runs left behind: what this store's journals of dead runs
/// name, then, in `options.regions`, unfinished snapshots tagged by those runs, or, with
/// `older_than`, by any run older than that which is not running here.
pub async fn cleanup(
    aws: &Aws,
    store: Option<&Store>,
    options: &CleanupOptions,
) -> Result<CleanupReport, CleanupError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let min_age = options.older_than.unwrap_or(Duration::ZERO).as_secs();
    let scan = match store {
        Some(store) => journal::abandoned(store)?,
        None => journal::Scan::default(),
    };
    let mut report = CleanupReport {
        running: scan.running,
        ..CleanupReport::default()
    };
    // The dead runs this store's journals name: their tagged leftovers are theirs to remove.
    let mut dead_runs: Vec<String> = Vec::new();
    for mut abandoned in scan.abandoned {
        if now.saturating_sub(abandoned.doc.started) < min_age {
            report.skipped.push(abandoned.doc.run.clone());
            continue;
        }
        let run = abandoned.doc.run.clone();
        dead_runs.push(run.clone());
        let mut all_gone = true;
        // An Image Builder run's resources are its version's: they stay while the version is
        // recorded, built or being built (see `crate::imagebuilder::cleanup`).
        let image_builder = match abandoned
            .doc
            .resources
            .iter()
            .find(|r| r.kind.is_image_builder() && r.status != ResourceStatus::Removed)
        {
            Some(resource) => Some(
                crate::imagebuilder::cleanup::keep(
                    &aws.imagebuilder(&resource.region),
                    store,
                    &abandoned.doc.recipe,
                    &abandoned.doc.version,
                )
                .await,
            ),
            None => None,
        };
        // Newest first: images before the snapshots they were made from (and Image Builder
        // images before the recipe and components they were made from).
        for index in (0..abandoned.doc.resources.len()).rev() {
            let resource = abandoned.doc.resources[index].clone();
            if resource.status == ResourceStatus::Removed {
                continue;
            }
            if resource.kind.is_image_builder() {
                let id = resource
                    .id
                    .clone()
                    .unwrap_or_else(|| resource.token.clone());
                match &image_builder {
                    Some(Err(reason)) => {
                        all_gone = false;
                        report.removals.push(Removal {
                            region: resource.region.clone(),
                            kind: resource.kind,
                            id,
                            action: Action::Failed,
                            error: Some(format!(
                                "could not tell whether version {} is built: {reason}",
                                abandoned.doc.version
                            )),
                            reason: None,
                            run: Some(run.clone()),
                        });
                        continue;
                    }
                    Some(Ok(Some(keep))) => {
                        report.removals.push(Removal {
                            region: resource.region.clone(),
                            kind: resource.kind,
                            id,
                            action: Action::Kept,
                            error: None,
                            reason: Some(keep.reason(&abandoned.doc.version)),
                            run: Some(run.clone()),
                        });
                        if !keep.settled() {
                            all_gone = false;
                        } else if !options.dry_run {
                            // The version's now, not the run's: the journal lets go of it.
                            abandoned.doc.resources[index].status = ResourceStatus::Removed;
                            if let Some(store) = store {
                                abandoned.save(store)?;
                            }
                        }
                        continue;
                    }
                    Some(Ok(None)) | None => {}
                }
            }
            let outcome = remove(aws, &run, &resource, options.dry_run).await;
            if outcome.iter().any(Removal::failed) {
                all_gone = false;
            } else if !options.dry_run {
                abandoned.doc.resources[index].status = ResourceStatus::Removed;
                if let Some(store) = store {
                    abandoned.save(store)?;
                }
            }
            report.removals.extend(outcome);
        }
        if all_gone && !options.dry_run {
            abandoned.discard()?;
        }
    }
    for region in &options.regions {
        let ec2 = aws.ec2(region);
        let found = match lookup::snapshots_tagged(&ec2, TAG_VERSION, None).await {
            Ok(found) => found,
            Err(e) => {
                report.removals.push(Removal {
                    region: region.clone(),
                    kind: ResourceKind::Snapshot,
                    id: format!("tag-key={TAG_VERSION}"),
                    action: Action::Failed,
                    error: Some(e.0),
                    reason: None,
                    run: None,
                });
                continue;
            }
        };
        for snapshot in found {
            // Only snapshots that never completed: a completed one may back a finished AMI.
            if !matches!(snapshot.state.as_str(), "pending" | "error")
                || !snapshot.tags.contains_key(TAG_RUN)
            {
                continue;
            }
            let age = snapshot
                .start_time
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .unwrap_or(Duration::ZERO);
            if age.as_secs() < min_age {
                continue;
            }
            let run = snapshot.tags.get(TAG_RUN).cloned().unwrap_or_default();
            if report.running.contains(&run) || report.skipped.contains(&run) {
                continue;
            }
            // A run this store has no journal for may be alive on another machine (an upload
            // in progress is `pending`): only `--older-than` says it is dead.
            if options.older_than.is_none() && !dead_runs.contains(&run) {
                tracing::info!(
                    "{region}: left {} of run {run}, which this store has no journal for (`--older-than` removes it)",
                    snapshot.snapshot_id
                );
                continue;
            }
            let outcome = delete_snapshot(&ec2, &snapshot.snapshot_id, options.dry_run).await;
            report
                .removals
                .push(outcome.into_removal(region, &snapshot.snapshot_id, &run));
        }
    }
    Ok(report)
}
