//! `bake gc`: remove a recipe's old AMIs (and their snapshots) and images (ECR, registries)
//! without ever breaking a fleet.
//!
//! ```text
//!  interrupted gc journals ──► finish what a killed run started (snapshots of deregistered AMIs)
//!  per recipe: build records (versions, newest first) + channel records (SSM, home region)
//!  per region: candidates = AMIs tagged bake:recipe=NAME whose bake:version has a build record
//!              references = scan::scan (launch templates, ASGs, instances, SSM, AWS's own API)
//!  per publish.ecr repository (and publish.registries one, through the distribution API):
//!              candidates = images whose digest a build record of NAME names
//!              references = scan::services (task definitions of ECS services, every region the
//!              recipe's repositories and task definitions are in)
//!  decide (pure): in use? last N? channel retention? younger than --older-than? else remove
//!  apply: journal ─► tag bake:gc-deprecated + EnableImageDeprecation ─► (after the grace period)
//!         DeregisterImage ─► DeleteSnapshot… ─► the version's manifest records the removal
//!         images: delete each tag (while it names the digest) ─► the digest (ECR:
//!         BatchDeleteImage; registries: DELETE …/manifests/) ─► the version's manifest records it
//! ```
//!
//! Nothing without bake's tags *and* a build record in this store is a candidate, and nothing of
//! another recipe: the candidates are found by `bake:recipe`, and each needs the record of its
//! `bake:version` with the same recipe name; an image needs a record of this recipe whose image
//! digest it is ([`ecr`], [`registry`]). Every artifact gets one line saying what was decided
//! and why; a dry run makes the same decisions and sends only reads.

pub mod decide;
pub mod ecr;
pub mod journal;
pub mod registry;
pub mod scan;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use self::decide::{ChannelHold, Decision, Kind, VersionInfo};
use self::ecr::{Deleted, RegistryImage};
use self::journal::{Entry, EntryKind, GcJournal, GcJournalError, Step};
use crate::ami::lookup::{self, ImageInfo};
use crate::ami::{AwsCallError, TAG_RECIPE, TAG_VERSION, sdk_error_code};
use crate::aws::Aws;
use crate::id::Version;
use crate::provenance::manifest::{self, ManifestError, Removal};
use crate::publish::channel::{ChannelState, channel_parameter};
use crate::recipe::Recipe;
use crate::store::{BuildRecord, Store, StoreError};

/// The tag gc puts on an AMI when it deprecates it: when (RFC 3339) the grace period started.
/// Kept in AWS, so any machine's gc measures the same grace period.
pub const TAG_GC_DEPRECATED: &str = "bake:gc-deprecated";

/// Versions kept when neither the command line nor the recipe says.
pub const DEFAULT_KEEP: u32 = 3;

/// What the caller asked for.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Over the recipe's `lifecycle.keep`.
    pub keep: Option<u32>,
    /// Over the recipe's `lifecycle.older_than`.
    pub older_than: Option<Duration>,
    /// Decide and explain; send only reads.
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Scan(#[from] scan::ScanError),
    #[error("failed to list the AMIs of recipe `{recipe}` in {region}")]
    Images {
        recipe: String,
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error("failed to list the images of ECR repository `{repository}` in {region}")]
    EcrImages {
        repository: String,
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error("failed to look for images of recipe `{recipe}` in `{repository}`")]
    Registry {
        recipe: String,
        repository: String,
        #[source]
        source: Box<crate::registry::RegistryError>,
    },
    #[error("failed to read channel `{channel}` of recipe `{recipe}`")]
    Channel {
        recipe: String,
        channel: String,
        #[source]
        source: Box<crate::publish::PublishError>,
    },
    #[error("failed to read the build records of the store")]
    Store(#[from] StoreError),
    #[error("failed to journal gc in the store")]
    Journal(#[from] GcJournalError),
    #[error("failed to record a removal in the manifest of {version}")]
    Manifest {
        version: String,
        #[source]
        source: ManifestError,
    },
}

/// What happened to (or would happen to) one artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Kept: in use, or a retention rule holds it.
    Keep,
    /// Not bake's to judge (no build record, no tags): never touched.
    Skip,
    /// Deregistered (an AMI) or deleted (a snapshot, an image).
    Removed,
    WouldRemove,
    /// Deprecated; deregistered by a run after the grace period.
    Deprecated,
    WouldDeprecate,
    Failed,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Action::Keep => "keep",
            Action::Skip => "skip",
            Action::Removed => "removed",
            Action::WouldRemove => "would remove",
            Action::Deprecated => "deprecated",
            Action::WouldDeprecate => "would deprecate",
            Action::Failed => "failed",
        }
    }
}

/// One artifact's line.
#[derive(Debug, Clone, Serialize)]
pub struct Line {
    /// `ami`, `snapshot` or `image`.
    pub kind: &'static str,
    pub region: String,
    /// The AMI or snapshot id, or the image's `repository@sha256:…`.
    pub id: String,
    pub recipe: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub action: Action,
    /// Every reference and rule that decided it.
    pub reasons: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Line {
    /// The line as a person reads it.
    pub fn human(&self) -> String {
        let version = self
            .version
            .as_deref()
            .and_then(|v| v.parse::<Version>().ok())
            .map_or(String::new(), |v| format!(" {}", v.short()));
        let mut text = format!(
            "{:<15} {} {}  {}  {}{version}: {}",
            self.action.label(),
            self.kind,
            self.id,
            self.region,
            self.recipe,
            self.reasons.join("; ")
        );
        if let Some(error) = &self.error {
            text.push_str(&format!(" ({error})"));
        }
        text
    }
}

/// The outcome of a gc run.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub artifacts: Vec<Line>,
    /// What the scan could not use (an API the endpoint does not offer), said once per region.
    pub notes: Vec<String>,
}

impl GcReport {
    pub fn failures(&self) -> impl Iterator<Item = &Line> {
        self.artifacts.iter().filter(|l| l.action == Action::Failed)
    }
}

/// One candidate image in ECR or a registry, with the decision about it.
struct ImageCandidate {
    recipe: String,
    /// The newest of `versions` (the one its line names).
    version: Version,
    /// Every version of the recipe whose build record names this digest, newest first: a
    /// rebuild that changed nothing in the image made the same manifest.
    versions: Vec<Version>,
    image: RegistryImage,
    decision: Decision,
}

/// One candidate AMI, with the decision about it.
struct Candidate {
    recipe: String,
    version: Version,
    region: String,
    image: ImageInfo,
    decision: Decision,
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// An RFC 3339 time as AWS and bake's records write it (with or without fractions and `Z`).
fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text).ok()
}

/// Runs gc over `recipes`; `registry` talks to the registries of `publish.registries`.
pub async fn run(
    aws: &Aws,
    registry: &crate::registry::Client,
    store: &Store,
    recipes: &[Recipe],
    options: &GcOptions,
) -> Result<GcReport, GcError> {
    let now = SystemTime::now();
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..GcReport::default()
    };
    resume(aws, registry, store, options.dry_run, &mut report).await?;

    let records = all_records(store)?;
    let mut pending: Vec<Candidate> = Vec::new();
    let mut by_region: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut versions: BTreeMap<String, Vec<VersionInfo>> = BTreeMap::new();
    let mut holds: BTreeMap<String, BTreeMap<Version, Vec<ChannelHold>>> = BTreeMap::new();
    for recipe in recipes {
        versions.insert(recipe.name.clone(), versions_of(&records, &recipe.name));
        holds.insert(recipe.name.clone(), channel_holds(aws, recipe, now).await?);
        for region in regions_of(recipe, &records) {
            let found = find_candidates(aws, recipe, &region, &records, &mut report).await?;
            for (version, image) in found {
                by_region
                    .entry(region.clone())
                    .or_default()
                    .insert(image.image_id.clone());
                pending.push(Candidate {
                    recipe: recipe.name.clone(),
                    version,
                    region: region.clone(),
                    image,
                    decision: Decision::Keep(Vec::new()),
                });
            }
        }
    }
    let (pending_images, image_references) =
        find_image_candidates(aws, registry, recipes, &records, &mut report).await?;
    let mut references = BTreeMap::new();
    for (region, ids) in &by_region {
        let refs = scan::scan(aws, region, ids).await?;
        report.notes.extend(refs.notes.iter().cloned());
        references.insert(region.clone(), refs);
    }
    let rules_of = |recipe: &str| {
        let lifecycle = recipes
            .iter()
            .find(|r| r.name == recipe)
            .map(|r| r.lifecycle.clone())
            .unwrap_or_default();
        decide::Rules {
            keep: options.keep.or(lifecycle.keep).unwrap_or(DEFAULT_KEEP),
            older_than: options.older_than.or(lifecycle.older_than),
        }
    };
    let mut candidates: Vec<Candidate> = Vec::new();
    for mut candidate in pending {
        let rules = rules_of(&candidate.recipe);
        let in_use = references
            .get(&candidate.region)
            .map(|r| r.of(&candidate.image.image_id).to_vec())
            .unwrap_or_default();
        let held = holds
            .get(&candidate.recipe)
            .and_then(|h| h.get(&candidate.version))
            .map_or(&[][..], Vec::as_slice);
        candidate.decision = decide::decide(
            Kind::Ami,
            &candidate.version,
            versions
                .get(&candidate.recipe)
                .map_or(&[][..], Vec::as_slice),
            held,
            &in_use,
            &rules,
            now,
        );
        candidates.push(candidate);
    }
    candidates.sort_by(|a, b| {
        (&a.recipe, &a.region, &a.image.image_id).cmp(&(&b.recipe, &b.region, &b.image.image_id))
    });
    let mut images: Vec<ImageCandidate> = Vec::new();
    for mut candidate in pending_images {
        let in_use: Vec<String> = image_references
            .iter()
            .flat_map(|r| {
                r.of(
                    &candidate.image.repository,
                    &candidate.image.digest,
                    &candidate.image.tags,
                )
            })
            .fold(Vec::new(), |mut all, reference| {
                if !all.contains(&reference) {
                    all.push(reference);
                }
                all
            });
        // A channel holds the digest its entries name, whichever version that is here.
        let by_digest: Vec<ChannelHold> = holds
            .get(&candidate.recipe)
            .into_iter()
            .flat_map(|h| h.values().flatten())
            .filter(|h| h.names_digest(&candidate.image.digest))
            .map(|h| {
                let mut hold = h.clone();
                if !candidate.versions.iter().any(|v| *v == h.version) {
                    let named = h
                        .version
                        .parse::<Version>()
                        .map_or_else(|_| h.version.clone(), |v| v.short().to_owned());
                    hold.reason = format!("{} names its digest (as version {named})", h.reason);
                }
                hold
            })
            .collect();
        let decisions = candidate
            .versions
            .iter()
            .map(|version| {
                let mut held: Vec<ChannelHold> = holds
                    .get(&candidate.recipe)
                    .and_then(|h| h.get(version))
                    .cloned()
                    .unwrap_or_default();
                for hold in &by_digest {
                    if !held.iter().any(|h| h.reason == hold.reason) {
                        held.push(hold.clone());
                    }
                }
                let decision = decide::decide(
                    Kind::Image,
                    version,
                    versions
                        .get(&candidate.recipe)
                        .map_or(&[][..], Vec::as_slice),
                    &held,
                    &in_use,
                    &rules_of(&candidate.recipe),
                    now,
                );
                (version.short().to_owned(), decision)
            })
            .collect();
        candidate.decision = decide::shared(decisions);
        images.push(candidate);
    }
    images.sort_by(|a, b| {
        (&a.recipe, &a.image.region, a.image.id()).cmp(&(&b.recipe, &b.image.region, b.image.id()))
    });
    apply(
        aws,
        registry,
        store,
        recipes,
        candidates,
        images,
        options.dry_run,
        now,
        &mut report,
    )
    .await?;
    Ok(report)
}

/// Every build record of the store.
fn all_records(store: &Store) -> Result<Vec<BuildRecord>, StoreError> {
    let mut records = Vec::new();
    for version in crate::store::record::versions(store)? {
        if let Some(record) = store.record(version.as_str())? {
            records.push(record);
        }
    }
    Ok(records)
}

/// The recipe's versions that this store built, newest first (by build start, then version for
/// a stable order).
fn versions_of(records: &[BuildRecord], recipe: &str) -> Vec<VersionInfo> {
    let mut versions: Vec<VersionInfo> = records
        .iter()
        .filter(|r| r.name == recipe)
        .map(|r| VersionInfo {
            version: r.version.clone(),
            made: parse_time(&r.started),
        })
        .collect();
    versions.sort_by(|a, b| b.made.cmp(&a.made).then_with(|| b.version.cmp(&a.version)));
    versions
}

/// Where the recipe's AMIs may be: its regions now, and every region a record lists.
fn regions_of(recipe: &Recipe, records: &[BuildRecord]) -> BTreeSet<String> {
    let mut regions: BTreeSet<String> = recipe
        .outputs
        .ami
        .iter()
        .flat_map(|a| a.regions.iter().cloned())
        .collect();
    regions.extend(
        records
            .iter()
            .filter(|r| r.name == recipe.name)
            .flat_map(|r| r.amis().iter().map(|a| a.region.clone())),
    );
    regions
}

/// What the recipe's channels hold, per version.
async fn channel_holds(
    aws: &Aws,
    recipe: &Recipe,
    now: SystemTime,
) -> Result<BTreeMap<Version, Vec<ChannelHold>>, GcError> {
    let mut holds: BTreeMap<Version, Vec<ChannelHold>> = BTreeMap::new();
    if recipe.publish.channels.is_empty() {
        return Ok(holds);
    }
    let error = |channel: &str| {
        let recipe = recipe.name.clone();
        let channel = channel.to_owned();
        move |source: crate::publish::PublishError| GcError::Channel {
            recipe,
            channel,
            source: Box::new(source),
        }
    };
    for channel in &recipe.publish.channels {
        let home = crate::publish::home_region(recipe, aws).map_err(error(channel))?;
        let ssm = crate::publish::clients::ssm(aws, &home);
        let name = channel_parameter(&recipe.name, channel);
        let state: Option<ChannelState> = crate::publish::ssm::read_record(&ssm, &name, &home)
            .await
            .map_err(error(channel))?;
        let Some(state) = state else { continue };
        let retention = recipe.lifecycle.channels.get(channel).copied();
        for hold in decide::channel_holds(channel, &state, retention, now) {
            if let Ok(version) = hold.version.parse::<Version>() {
                holds.entry(version).or_default().push(hold);
            }
        }
    }
    Ok(holds)
}

/// The recipe's AMIs in `region` that gc may judge; the others get a `skip` line.
async fn find_candidates(
    aws: &Aws,
    recipe: &Recipe,
    region: &str,
    records: &[BuildRecord],
    report: &mut GcReport,
) -> Result<Vec<(Version, ImageInfo)>, GcError> {
    let ec2 = aws.ec2(region);
    let images = lookup::images_tagged(&ec2, TAG_RECIPE, &recipe.name)
        .await
        .map_err(|source| GcError::Images {
            recipe: recipe.name.clone(),
            region: region.to_owned(),
            source,
        })?;
    let mut found = Vec::new();
    let mut seen = BTreeSet::new();
    for image in images {
        if matches!(image.state.as_str(), "deregistered" | "failed" | "error")
            || image.tags.get(TAG_RECIPE) != Some(&recipe.name)
        {
            continue;
        }
        seen.insert(image.image_id.clone());
        let skip = |reason: String| Line {
            kind: "ami",
            region: region.to_owned(),
            id: image.image_id.clone(),
            recipe: recipe.name.clone(),
            version: image.tags.get(TAG_VERSION).cloned(),
            action: Action::Skip,
            reasons: vec![reason],
            error: None,
        };
        let Some(version) = image
            .tags
            .get(TAG_VERSION)
            .and_then(|v| v.parse::<Version>().ok())
        else {
            report.artifacts.push(skip(format!(
                "no valid {TAG_VERSION} tag: not made by bake, never touched"
            )));
            continue;
        };
        if !records
            .iter()
            .any(|r| r.version == version && r.name == recipe.name)
        {
            report.artifacts.push(skip(format!(
                "no build record of {version} for recipe {} in this store: never touched",
                recipe.name
            )));
            continue;
        }
        found.push((version, image));
    }
    // AMIs the records list that lack bake's tags here: said, never touched.
    for record in records.iter().filter(|r| r.name == recipe.name) {
        for ami in record.amis().iter().filter(|a| a.region == region) {
            if seen.contains(&ami.image_id) {
                continue;
            }
            let Ok(Some(image)) = lookup::image(&ec2, &ami.image_id).await else {
                continue;
            };
            let tagged = image.tags.get(TAG_RECIPE).map(String::as_str);
            report.artifacts.push(Line {
                kind: "ami",
                region: region.to_owned(),
                id: image.image_id.clone(),
                recipe: recipe.name.clone(),
                version: Some(record.version.to_string()),
                action: Action::Skip,
                reasons: vec![match tagged {
                    Some(other) => format!(
                        "tagged {TAG_RECIPE}={other}, not {}: never touched",
                        recipe.name
                    ),
                    None => format!("lacks bake's {TAG_RECIPE} tag: never touched"),
                }],
                error: None,
            });
        }
    }
    Ok(found)
}

/// The images of the recipes' ECR and registry repositories that gc may judge, and what ECS
/// services run in every region those ECR repositories and the recipes' task definitions are in
/// (a service may pull from another region's repository, so each image is checked against all
/// of them).
async fn find_image_candidates(
    aws: &Aws,
    registry: &crate::registry::Client,
    recipes: &[Recipe],
    records: &[BuildRecord],
    report: &mut GcReport,
) -> Result<(Vec<ImageCandidate>, Vec<scan::ImageReferences>), GcError> {
    let mut found = Vec::new();
    let mut regions = BTreeSet::new();
    for recipe in recipes {
        let repositories = ecr::repositories(recipe, aws);
        let elsewhere = registry::repositories(recipe);
        if repositories.is_empty() && elsewhere.is_empty() {
            continue;
        }
        let newest_first = versions_of(records, &recipe.name);
        // The candidate for an image the records of `named` versions name, if any.
        let candidate = |image: RegistryImage, named: Vec<Version>| {
            let versions: Vec<Version> = newest_first
                .iter()
                .map(|v| v.version.clone())
                .filter(|v| named.contains(v))
                .collect();
            Some(ImageCandidate {
                recipe: recipe.name.clone(),
                version: versions.first()?.clone(),
                versions,
                image,
                decision: Decision::Keep(Vec::new()),
            })
        };
        for repository in &elsewhere {
            let images = registry::images(registry, repository, records, &recipe.name)
                .await
                .map_err(|source| GcError::Registry {
                    recipe: recipe.name.clone(),
                    repository: repository.name(),
                    source: Box::new(source),
                })?;
            found.extend(
                images
                    .into_iter()
                    .filter_map(|(image, named)| candidate(image, named)),
            );
        }
        regions.extend(
            recipe
                .publish
                .ecs_task_definitions
                .iter()
                .map(|t| t.region.clone()),
        );
        for (region, repository) in repositories {
            regions.insert(region.clone());
            let listed = ecr::images(aws, &region, &repository)
                .await
                .map_err(|source| GcError::EcrImages {
                    repository: repository.clone(),
                    region: region.clone(),
                    source,
                })?;
            let Some(images) = listed else {
                report.notes.push(format!(
                    "ECR repository {repository} does not exist in {region}: no images of {} to collect there",
                    recipe.name
                ));
                continue;
            };
            let mut foreign = 0usize;
            for image in images {
                let named = ecr::versions_of(records, &recipe.name, &image.digest);
                match candidate(image, named) {
                    Some(candidate) => found.push(candidate),
                    None => foreign += 1,
                }
            }
            if foreign > 0 {
                report.notes.push(format!(
                    "ECR repository {repository} in {region}: {foreign} image(s) that no build record of {} in this store names, never touched",
                    recipe.name
                ));
            }
        }
    }
    let mut references = Vec::new();
    if !found.is_empty() {
        // Images only in registries, of a recipe with no AWS target: the default region's
        // services are the ones bake knows of.
        if regions.is_empty()
            && let Some(region) = aws.default_region()
        {
            regions.insert(region.to_owned());
        }
        for region in &regions {
            references.push(scan::services(aws, region).await?);
        }
    }
    Ok((found, references))
}

/// The AMI's removal as the version's manifest records it.
fn record_removals(
    store: &Store,
    version: &Version,
    removals: Vec<Removal>,
) -> Result<(), GcError> {
    let fail = |source| GcError::Manifest {
        version: version.to_string(),
        source,
    };
    if manifest::ensure(store, version.as_str())
        .map_err(fail)?
        .is_none()
    {
        return Ok(());
    }
    manifest::update(store, version.as_str(), |m| {
        for removal in removals {
            if !m
                .removals
                .iter()
                .any(|r| r.kind == removal.kind && r.id == removal.id)
            {
                m.removals.push(removal);
            }
        }
    })
    .map_err(fail)?;
    Ok(())
}

/// What deleting one snapshot came to.
enum SnapshotOutcome {
    Deleted,
    AlreadyGone,
    /// Another AMI still uses it (registered from the same snapshot).
    InUse(String),
    Failed(String),
}

async fn delete_snapshot(ec2: &aws_sdk_ec2::Client, snapshot: &str) -> SnapshotOutcome {
    match ec2.delete_snapshot().snapshot_id(snapshot).send().await {
        Ok(_) => SnapshotOutcome::Deleted,
        Err(e) => match sdk_error_code(&e) {
            Some("InvalidSnapshot.NotFound") => SnapshotOutcome::AlreadyGone,
            Some("InvalidSnapshot.InUse") => {
                SnapshotOutcome::InUse(AwsCallError::from_sdk(&e).to_string())
            }
            _ => SnapshotOutcome::Failed(AwsCallError::from_sdk(&e).to_string()),
        },
    }
}

/// Deletes the entry's pending snapshots, journaling each, and returns their lines and the
/// manifest removals.
async fn remove_snapshots(
    ec2: &aws_sdk_ec2::Client,
    entry: &Entry,
    why: &str,
    mut progress: impl FnMut(&str) -> Result<(), GcJournalError>,
    lines: &mut Vec<Line>,
    removals: &mut Vec<Removal>,
) -> Result<(), GcError> {
    for snapshot in entry.pending_snapshots() {
        let line = |action, reason: String, error: Option<String>| Line {
            kind: "snapshot",
            region: entry.region.clone(),
            id: snapshot.clone(),
            recipe: entry.recipe.clone(),
            version: Some(entry.version.clone()),
            action,
            reasons: vec![reason],
            error,
        };
        match delete_snapshot(ec2, &snapshot).await {
            SnapshotOutcome::Deleted | SnapshotOutcome::AlreadyGone => {
                progress(&snapshot)?;
                removals.push(Removal {
                    kind: "snapshot".into(),
                    id: snapshot.clone(),
                    region: entry.region.clone(),
                    at: now_rfc3339(),
                    reason: format!("snapshot of {} ({why})", entry.image_id),
                });
                lines.push(line(
                    Action::Removed,
                    format!("snapshot of {} ({why})", entry.image_id),
                    None,
                ));
            }
            SnapshotOutcome::InUse(error) => {
                // Nothing more to do for it: journaled as settled so no later run retries.
                progress(&snapshot)?;
                lines.push(line(
                    Action::Keep,
                    format!("snapshot of {}, still used by another AMI", entry.image_id),
                    Some(error),
                ));
            }
            SnapshotOutcome::Failed(error) => lines.push(line(
                Action::Failed,
                format!("snapshot of {} ({why})", entry.image_id),
                Some(error),
            )),
        }
    }
    Ok(())
}

/// Finishes what interrupted gc runs started: the snapshots of AMIs they deregistered. AMIs
/// they had not deregistered yet are decided again by this run, from AWS as it is now.
async fn resume(
    aws: &Aws,
    registry: &crate::registry::Client,
    store: &Store,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<(), GcError> {
    for mut journal in journal::interrupted(store)? {
        let run = journal.doc.run.clone();
        let why = format!("resuming interrupted gc {run}");
        let mut finished = true;
        for index in 0..journal.doc.entries.len() {
            let entry = journal.doc.entries[index].clone();
            if entry.step == Step::Done {
                continue;
            }
            if entry.kind == EntryKind::Image {
                let Some(image) = ecr::parse_id(&entry.region, &entry.image_id) else {
                    continue;
                };
                let exists = match &image.registry {
                    None => {
                        ecr::exists(aws, &image)
                            .await
                            .map_err(|source| GcError::EcrImages {
                                repository: image.repository.clone(),
                                region: entry.region.clone(),
                                source,
                            })?
                    }
                    Some(host) => registry::exists(registry, &image).await.map_err(|source| {
                        GcError::Registry {
                            recipe: entry.recipe.clone(),
                            repository: format!("{host}/{}", image.repository),
                            source: Box::new(source),
                        }
                    })?,
                };
                // Still there: decided afresh below. Gone: the killed run deleted it after its
                // last journal write; what is left is to say so in the version's manifest.
                if exists || dry_run {
                    continue;
                }
                if let Ok(version) = entry.version.parse::<Version>() {
                    record_removals(
                        store,
                        &version,
                        vec![Removal {
                            kind: "image".into(),
                            id: entry.image_id.clone(),
                            region: entry.region.clone(),
                            at: now_rfc3339(),
                            reason: why.clone(),
                        }],
                    )?;
                }
                report.artifacts.push(Line {
                    kind: "image",
                    region: entry.region.clone(),
                    id: entry.image_id.clone(),
                    recipe: entry.recipe.clone(),
                    version: Some(entry.version.clone()),
                    action: Action::Removed,
                    reasons: vec![format!("{why}: its deletion had been sent")],
                    error: None,
                });
                journal.doc.entries[index].step = Step::Done;
                journal.save(store)?;
                continue;
            }
            let ec2 = aws.ec2(&entry.region);
            let exists = lookup::image(&ec2, &entry.image_id)
                .await
                .map_err(|source| GcError::Images {
                    recipe: entry.recipe.clone(),
                    region: entry.region.clone(),
                    source,
                })?
                .is_some();
            if exists {
                continue; // decided afresh below
            }
            if dry_run {
                report
                    .artifacts
                    .extend(entry.pending_snapshots().into_iter().map(|s| Line {
                        kind: "snapshot",
                        region: entry.region.clone(),
                        id: s,
                        recipe: entry.recipe.clone(),
                        version: Some(entry.version.clone()),
                        action: Action::WouldRemove,
                        reasons: vec![format!("snapshot of {} ({why})", entry.image_id)],
                        error: None,
                    }));
                continue;
            }
            let mut lines = Vec::new();
            let mut removals = Vec::new();
            let mut settled = Vec::new();
            remove_snapshots(
                &ec2,
                &entry,
                &why,
                |s| {
                    settled.push(s.to_owned());
                    Ok(())
                },
                &mut lines,
                &mut removals,
            )
            .await?;
            let slot = &mut journal.doc.entries[index];
            slot.settled_snapshots.extend(settled);
            if slot.pending_snapshots().is_empty() {
                slot.step = Step::Done;
            } else {
                finished = false;
            }
            journal.save(store)?;
            if let Ok(version) = entry.version.parse::<Version>() {
                record_removals(store, &version, removals)?;
            }
            report.artifacts.extend(lines);
        }
        if finished && !dry_run {
            journal.discard()?;
        }
    }
    Ok(())
}

/// The deprecation time gc sets: the next whole minute (EC2 rounds to the minute and refuses
/// a time in the past).
fn deprecation_time(now: SystemTime) -> SystemTime {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs - secs % 60 + 60)
}

/// Marks the AMI as deprecated by gc (the tag) and deprecates it in EC2; `Err` leaves it as is.
async fn deprecate(
    aws: &Aws,
    ec2: &aws_sdk_ec2::Client,
    image: &ImageInfo,
    now: SystemTime,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    if !image.tags.contains_key(TAG_GC_DEPRECATED) {
        let mut tag = BTreeMap::new();
        tag.insert(
            TAG_GC_DEPRECATED.to_owned(),
            humantime::format_rfc3339_seconds(now).to_string(),
        );
        lookup::ensure_tags(ec2, &image.image_id, &image.tags, &tag)
            .await
            .map_err(|e| format!("tag {TAG_GC_DEPRECATED}: {e}"))?;
    }
    let already = image
        .deprecation_time
        .as_deref()
        .and_then(parse_time)
        .is_some_and(|t| t <= deprecation_time(now));
    if already {
        return Ok(());
    }
    // An emulator the user named as lacking the API answers an unmodeled 500: one attempt, then
    // a note; against AWS (the default) every retry applies and a failure stops the removal.
    let lacking = aws
        .emulator()
        .is_some_and(|e| !e.serves_image_deprecation());
    let at = deprecation_time(now)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let mut request = ec2
        .enable_image_deprecation()
        .image_id(&image.image_id)
        .deprecate_at(aws_sdk_ec2::primitives::DateTime::from_secs(at as i64))
        .customize();
    if lacking {
        request = request.config_override(
            aws_sdk_ec2::config::Builder::default()
                .retry_config(aws_config::retry::RetryConfig::disabled()),
        );
    }
    match request.send().await {
        Ok(_) => Ok(()),
        Err(e)
            if lacking
                && sdk_error_code(&e).is_none()
                && e.raw_response()
                    .is_some_and(|r| r.status().is_server_error()) =>
        {
            let note = "the AWS emulator does not implement EnableImageDeprecation: AMIs are marked with bake:gc-deprecated only".to_owned();
            if !notes.contains(&note) {
                notes.push(note);
            }
            Ok(())
        }
        Err(e) => Err(format!(
            "EnableImageDeprecation: {}",
            AwsCallError::from_sdk(&e)
        )),
    }
}

/// Carries out the decisions (or, in a dry run, says what they would do).
#[allow(clippy::too_many_arguments)]
async fn apply(
    aws: &Aws,
    registry: &crate::registry::Client,
    store: &Store,
    recipes: &[Recipe],
    candidates: Vec<Candidate>,
    images: Vec<ImageCandidate>,
    dry_run: bool,
    now: SystemTime,
    report: &mut GcReport,
) -> Result<(), GcError> {
    let line = |c: &Candidate, action, reasons: Vec<String>, error| Line {
        kind: "ami",
        region: c.region.clone(),
        id: c.image.image_id.clone(),
        recipe: c.recipe.clone(),
        version: Some(c.version.to_string()),
        action,
        reasons,
        error,
    };
    let grace_of = |recipe: &str| {
        recipes
            .iter()
            .find(|r| r.name == recipe)
            .map_or(Duration::ZERO, |r| r.lifecycle.grace)
    };
    let mut removing = Vec::new();
    for c in candidates {
        match &c.decision {
            Decision::Keep(reasons) => {
                report
                    .artifacts
                    .push(line(&c, Action::Keep, reasons.clone(), None));
            }
            Decision::Remove(reasons) => {
                if dry_run {
                    let grace = grace_of(&c.recipe);
                    let started = c
                        .image
                        .tags
                        .get(TAG_GC_DEPRECATED)
                        .map(String::as_str)
                        .and_then(parse_time)
                        .unwrap_or(now);
                    let mut reasons = reasons.clone();
                    if started + grace > now {
                        reasons.push(grace_reason(started, grace));
                        report
                            .artifacts
                            .push(line(&c, Action::WouldDeprecate, reasons, None));
                    } else {
                        reasons.push(snapshots_reason(&c.image.snapshots));
                        report
                            .artifacts
                            .push(line(&c, Action::WouldRemove, reasons, None));
                    }
                } else {
                    removing.push(c);
                }
            }
        }
    }
    let mut removing_images = Vec::new();
    for c in images {
        match &c.decision {
            Decision::Keep(reasons) => {
                report
                    .artifacts
                    .push(image_line(&c, Action::Keep, reasons.clone(), None));
            }
            Decision::Remove(reasons) if dry_run => {
                let mut reasons = reasons.clone();
                reasons.push(tags_reason(&c.image.tags));
                report
                    .artifacts
                    .push(image_line(&c, Action::WouldRemove, reasons, None));
            }
            Decision::Remove(_) => removing_images.push(c),
        }
    }
    if removing.is_empty() && removing_images.is_empty() {
        return Ok(());
    }
    let image_entries = removing_images.iter().map(|c| Entry {
        kind: EntryKind::Image,
        recipe: c.recipe.clone(),
        version: c.version.to_string(),
        region: c.image.region.clone(),
        image_id: c.image.id(),
        snapshots: Vec::new(),
        settled_snapshots: Vec::new(),
        tags: c.image.tags.clone(),
        settled_tags: Vec::new(),
        step: Step::Planned,
    });
    let entries = removing
        .iter()
        .map(|c| Entry {
            kind: EntryKind::Ami,
            recipe: c.recipe.clone(),
            version: c.version.to_string(),
            region: c.region.clone(),
            image_id: c.image.image_id.clone(),
            snapshots: c.image.snapshots.clone(),
            settled_snapshots: Vec::new(),
            tags: Vec::new(),
            settled_tags: Vec::new(),
            step: Step::Planned,
        })
        .chain(image_entries)
        .collect();
    let journal = GcJournal::begin(store, entries)?;
    for c in &removing {
        let Decision::Remove(reasons) = &c.decision else {
            continue;
        };
        let ec2 = aws.ec2(&c.region);
        if let Err(error) = deprecate(aws, &ec2, &c.image, now, &mut report.notes).await {
            report
                .artifacts
                .push(line(c, Action::Failed, reasons.clone(), Some(error)));
            continue;
        }
        journal.update(&c.region, &c.image.image_id, |e| e.step = Step::Deprecated)?;
        let grace = grace_of(&c.recipe);
        let started = c
            .image
            .tags
            .get(TAG_GC_DEPRECATED)
            .map(String::as_str)
            .and_then(parse_time)
            .unwrap_or(now);
        if started + grace > now {
            let mut reasons = reasons.clone();
            reasons.push(grace_reason(started, grace));
            report
                .artifacts
                .push(line(c, Action::Deprecated, reasons, None));
            continue;
        }
        match ec2
            .deregister_image()
            .image_id(&c.image.image_id)
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) if sdk_error_code(&e).is_some_and(|code| code.starts_with("InvalidAMIID")) => {}
            Err(e) => {
                report.artifacts.push(line(
                    c,
                    Action::Failed,
                    reasons.clone(),
                    Some(format!("DeregisterImage: {}", AwsCallError::from_sdk(&e))),
                ));
                continue;
            }
        }
        journal.update(&c.region, &c.image.image_id, |e| {
            e.step = Step::Deregistered
        })?;
        let why = reasons.join("; ");
        let mut removals = vec![Removal {
            kind: "ami".into(),
            id: c.image.image_id.clone(),
            region: c.region.clone(),
            at: now_rfc3339(),
            reason: why.clone(),
        }];
        let mut lines = vec![line(
            c,
            Action::Removed,
            {
                let mut reasons = reasons.clone();
                reasons.push(snapshots_reason(&c.image.snapshots));
                reasons
            },
            None,
        )];
        let entry = Entry {
            kind: EntryKind::Ami,
            recipe: c.recipe.clone(),
            version: c.version.to_string(),
            region: c.region.clone(),
            image_id: c.image.image_id.clone(),
            snapshots: c.image.snapshots.clone(),
            settled_snapshots: Vec::new(),
            tags: Vec::new(),
            settled_tags: Vec::new(),
            step: Step::Deregistered,
        };
        remove_snapshots(
            &ec2,
            &entry,
            "its AMI was removed",
            |s| {
                journal.update(&c.region, &c.image.image_id, |e| {
                    e.settled_snapshots.push(s.to_owned())
                })
            },
            &mut lines,
            &mut removals,
        )
        .await?;
        journal.update(&c.region, &c.image.image_id, |e| {
            if e.pending_snapshots().is_empty() {
                e.step = Step::Done;
            }
        })?;
        record_removals(store, &c.version, removals)?;
        report.artifacts.extend(lines);
    }
    for c in &removing_images {
        let Decision::Remove(reasons) = &c.decision else {
            continue;
        };
        let line = remove_image(aws, registry, store, &journal, c, reasons).await?;
        report.artifacts.push(line);
    }
    journal.finish()?;
    Ok(())
}

fn image_line(
    c: &ImageCandidate,
    action: Action,
    reasons: Vec<String>,
    error: Option<String>,
) -> Line {
    Line {
        kind: "image",
        region: c.image.region.clone(),
        id: c.image.id(),
        recipe: c.recipe.clone(),
        version: Some(c.version.to_string()),
        action,
        reasons,
        error,
    }
}

/// Removes one image (ECR's API, or a registry's): each tag (only while it still names the
/// digest), then the digest, journaling each step; the versions' manifests record the removal.
async fn remove_image(
    aws: &Aws,
    registry: &crate::registry::Client,
    store: &Store,
    journal: &GcJournal,
    c: &ImageCandidate,
    reasons: &[String],
) -> Result<Line, GcError> {
    let id = c.image.id();
    let region = c.image.region.as_str();
    let ecr = c.image.registry.is_none().then(|| aws.ecr(region));
    let failed = |error: String| image_line(c, Action::Failed, reasons.to_vec(), Some(error));
    let outcomes = match &ecr {
        Some(ecr) => ecr::delete_tags(ecr, &c.image, &c.image.tags).await,
        None => registry::delete_tags(registry, &c.image, &c.image.tags).await,
    };
    let mut failure = None;
    for (tag, outcome) in c.image.tags.iter().zip(outcomes) {
        match outcome {
            Deleted::Settled => {
                journal.update(region, &id, |e| e.settled_tags.push(tag.clone()))?;
            }
            Deleted::Failed(error) => failure = Some(format!("tag {tag}: {error}")),
        }
    }
    if let Some(error) = failure {
        return Ok(failed(error));
    }
    let deleted = match &ecr {
        Some(ecr) => ecr::delete_digest(ecr, &c.image).await,
        None => registry::delete_digest(registry, &c.image).await,
    };
    if let Deleted::Failed(error) = deleted {
        return Ok(failed(error));
    }
    journal.update(region, &id, |e| e.step = Step::Done)?;
    let why = reasons.join("; ");
    for version in &c.versions {
        record_removals(
            store,
            version,
            vec![Removal {
                kind: "image".into(),
                id: id.clone(),
                region: region.to_owned(),
                at: now_rfc3339(),
                reason: why.clone(),
            }],
        )?;
    }
    let mut reasons = reasons.to_vec();
    reasons.push(tags_reason(&c.image.tags));
    Ok(image_line(c, Action::Removed, reasons, None))
}

fn tags_reason(tags: &[String]) -> String {
    if tags.is_empty() {
        "untagged".into()
    } else {
        format!("with tags {} (deleted first)", tags.join(", "))
    }
}

fn grace_reason(started: SystemTime, grace: Duration) -> String {
    format!(
        "grace period {}: deregistered from {}",
        humantime::format_duration(grace),
        humantime::format_rfc3339_seconds(started + grace)
    )
}

fn snapshots_reason(snapshots: &[String]) -> String {
    if snapshots.is_empty() {
        "no snapshots".into()
    } else {
        format!("with snapshots {}", snapshots.join(", "))
    }
}
