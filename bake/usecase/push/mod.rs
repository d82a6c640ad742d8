//! Pushing built images: from the store to their recipes' registry and ECR targets (or to the
//! repositories given), skipping what the registries already have, with each image's signed
//! provenance and SBOMs attached as soon as it is up.

use std::collections::HashMap;
use std::sync::Arc;

mod error;
mod targets;

use super::Context;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::provenance::registry::Attached;
use crate::recipe::VarSources;
use crate::registry::auth::{ChainCredentials, Credentials};
use crate::registry::ecr::{self, EcrCredentials};
use crate::registry::push::{PushJob, PushTarget, TargetReport, Transfers, push_job};
use crate::registry::{Client, Progress, Reference};
use crate::store::{BuildRecord, Store};
pub use error::PushError;
use targets::{Planned, ensure_ecr, find};

/// What to push where.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Versions (`sha256:…`, or their first 12 or more hex digits) or recipe files.
    pub what: Vec<String>,
    /// Repositories (`registry/name`) to push to instead of the recipes' targets.
    pub to: Vec<String>,
    /// Registries (`host:port`) to reach over plain HTTP.
    pub insecure: Vec<String>,
    /// Upload blobs in chunks of this many bytes instead of one request each.
    pub chunk_size: Option<u64>,
    /// Blobs transferred at once.
    pub parallelism: usize,
    /// The variables recipe files are loaded with.
    pub vars: VarSources,
}

/// What a push tells as it goes, besides blob progress.
pub trait PushReporter: Progress {
    /// A target failed; the others go on.
    fn failed(&self, report: Report);
    /// Attestations were attached to an image in `repository`.
    fn attached(&self, repository: &str, attached: &Attached);
    /// One image is done: what pushing it did.
    fn image_done(&self, image: &str, pushed: &[TargetReport]);
    /// Every transfer is over (progress bars go).
    fn finished(&self);
}

/// An image that reached at least its push.
#[derive(Debug)]
pub struct PushedImage {
    pub version: crate::id::Version,
    pub image_digest: String,
}

/// The attestations attached to a pushed image.
#[derive(Debug)]
pub struct PushedAttestations {
    pub version: crate::id::Version,
    pub repository: String,
    pub attached: Attached,
}

/// What a push did: every pushed reference, every failure (as `(target, error)`), and the exit
/// status that sums it up (success, partial publish, or the failures' kind).
#[derive(Debug)]
pub struct PushResult {
    pub images: Vec<PushedImage>,
    pub pushed: Vec<TargetReport>,
    pub failed: Vec<(String, String)>,
    pub attestations: Vec<PushedAttestations>,
    pub status: ExitStatus,
}

/// One image of the push: its build record and where it goes.
struct Item {
    record: BuildRecord,
    planned: Vec<Planned>,
}

/// Pushes every image `options.what` names (the layers they share are sent once).
pub fn push(
    ctx: &Context,
    options: &PushOptions,
    reporter: &dyn PushReporter,
) -> Result<PushResult, PushError> {
    let store = ctx.store()?;
    let mut to = Vec::new();
    for repository in &options.to {
        to.push(Reference::repository_only(repository).map_err(PushError::To)?);
    }
    let mut items = Vec::new();
    let mut insecure = options.insecure.clone();
    for what in &options.what {
        let (record, recipe_targets, recipe_insecure) = find(ctx, store, what, &options.vars)?;
        insecure.extend(recipe_insecure);
        if record.image().is_none() {
            return Err(PushError::NoImage {
                version: record.version.to_string(),
                name: record.name.clone(),
            });
        }
        if items
            .iter()
            .any(|i: &Item| i.record.version == record.version)
        {
            continue; // named twice (say, by version and by recipe): pushed once
        }
        let mut planned = if to.is_empty() {
            recipe_targets
        } else {
            to.iter()
                .map(|repository| {
                    Planned::Registry(PushTarget {
                        repository: repository.clone(),
                        tags: Vec::new(),
                    })
                })
                .collect()
        };
        if planned.is_empty() {
            return Err(PushError::NoTargets(what.clone()));
        }
        // Every target gets the version's tag as well as its own.
        let version_tag = record.version.short().to_owned();
        for target in &mut planned {
            let tags = match target {
                Planned::Registry(t) => &mut t.tags,
                Planned::Ecr { tags, .. } => tags,
            };
            if !tags.contains(&version_tag) {
                tags.push(version_tag.clone());
            }
        }
        items.push(Item { record, planned });
    }
    ctx.block_on(push_items(ctx, options, store, items, insecure, reporter))?
}

async fn push_items(
    ctx: &Context,
    options: &PushOptions,
    store: &Store,
    items: Vec<Item>,
    insecure: Vec<String>,
    reporter: &dyn PushReporter,
) -> Result<PushResult, PushError> {
    let settings = &ctx.settings;
    let needs_ecr = items.iter().flat_map(|i| &i.planned).any(|p| match p {
        Planned::Ecr { .. } => true,
        Planned::Registry(t) => ecr::ecr_region(t.repository.registry()).is_some(),
    });
    let aws = if needs_ecr {
        Some(ctx.aws().await)
    } else {
        None
    };
    let mut sources: Vec<Arc<dyn Credentials>> = vec![settings.registry.credentials()];
    if let Some(aws) = aws {
        sources.push(Arc::new(EcrCredentials::new(aws.clone())));
    }
    let mut client_options = settings.registry.client_options();
    client_options.insecure.extend(insecure);
    client_options.parallelism = options.parallelism.max(1);
    client_options.chunk_size = options.chunk_size;
    let client = Client::new(client_options, Arc::new(ChainCredentials(sources)))
        .map_err(PushError::Client)?;
    let mut failures: Vec<(String, String)> = Vec::new();
    // ECR repositories are looked at (and created) once each, however many images go there.
    let mut ensured: HashMap<(String, String), Option<Reference>> = HashMap::new();
    let mut jobs = Vec::new();
    let mut records = Vec::new();
    for item in items {
        let mut targets = Vec::new();
        for target in item.planned {
            match target {
                Planned::Registry(target) => targets.push(target),
                Planned::Ecr {
                    name,
                    region,
                    tags,
                    settings: repository_settings,
                } => {
                    let aws = aws.expect("AWS is loaded for ECR targets");
                    let key = (region, name);
                    if !ensured.contains_key(&key) {
                        let repository =
                            ensure_ecr(aws, &key.0, &key.1, &repository_settings, reporter)
                                .await
                                .map_err(|failure| failures.push(failure))
                                .ok();
                        ensured.insert(key.clone(), repository);
                    }
                    if let Some(repository) = &ensured[&key] {
                        targets.push(PushTarget {
                            repository: repository.clone(),
                            tags,
                        });
                    }
                }
            }
        }
        jobs.push(PushJob {
            digest: image_digest(&item.record),
            targets,
            companions: crate::provenance::registry::referrer_blobs(store, &item.record.version),
        });
        records.push(item.record);
    }
    // Each image's signed provenance and SBOMs follow it as soon as it is up, while the other
    // images may still be uploading (provenance module).
    let transfers = Transfers::new(&client);
    let results =
        futures_util::future::join_all(jobs.iter().zip(&records).map(|(job, record)| async {
            let outcome = push_job(&client, store, job, &transfers, reporter).await;
            let attached = match &outcome {
                Ok(outcome) => {
                    crate::provenance::registry::attach_pushed(
                        &client,
                        store,
                        &record.version,
                        &outcome.pushed,
                    )
                    .await
                }
                Err(_) => Vec::new(),
            };
            (outcome, attached)
        }))
        .await;
    reporter.finished();
    let mut images = Vec::new();
    let mut all_pushed = Vec::new();
    let mut attestations = Vec::new();
    let mut only_user_errors = failures.is_empty();
    for (record, (outcome, attached)) in records.iter().zip(results) {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                reporter.failed(Report::from_error(&e).with_hint(e.hint()));
                failures.push((record.version.to_string(), e.to_string()));
                only_user_errors = false;
                continue;
            }
        };
        for failure in &outcome.failed {
            reporter.failed(Report::from_error(&failure.error).with_hint(failure.error.hint()));
            only_user_errors &= failure.error.is_user_error();
            failures.push((failure.repository.clone(), failure.error.to_string()));
        }
        for (repository, result) in attached {
            match result {
                Ok(done) => {
                    reporter.attached(&repository, &done);
                    attestations.push(PushedAttestations {
                        version: record.version.clone(),
                        repository,
                        attached: done,
                    });
                }
                Err(e) => {
                    reporter.failed(Report::from_error(&e));
                    only_user_errors = false;
                    failures.push((repository, e.to_string()));
                }
            }
        }
        reporter.image_done(&image_digest(record), &outcome.pushed);
        images.push(PushedImage {
            version: record.version.clone(),
            image_digest: image_digest(record),
        });
        all_pushed.extend(outcome.pushed);
    }
    let status = match (all_pushed.is_empty(), failures.is_empty()) {
        (_, true) => ExitStatus::Success,
        (true, false) if only_user_errors => ExitStatus::RecipeOrUsage,
        (true, false) => ExitStatus::Infrastructure,
        (false, false) => ExitStatus::PartialPublish,
    };
    Ok(PushResult {
        images,
        pushed: all_pushed,
        failed: failures,
        attestations,
        status,
    })
}

/// The digest of a record's image (every record `push` keeps was checked to have one).
fn image_digest(record: &BuildRecord) -> String {
    record
        .image()
        .map(|image| image.image_digest.to_string())
        .unwrap_or_default()
}
