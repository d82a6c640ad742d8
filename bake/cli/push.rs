//! `bake push VERSION|RECIPE [--to REPOSITORY]...`: push a built image from the store to the
//! recipe's registry and ECR targets (or to the repositories given), skipping what the
//! registries already have, and print every pushed `repository@sha256:…`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use super::{VarArgs, print_json, print_reports};
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::plan::Effect;
use crate::registry::auth::{ChainCredentials, Credentials};
use crate::registry::ecr::{self, EcrCredentials, EcrEncryption, RepositorySettings};
use crate::registry::push::{PushJob, PushTarget, TargetReport, Transfers, push_job};
use crate::registry::{BlobOutcome, Client, Progress, Reference, RegistryError};
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::store::BuildRecord;
use crate::store::Store;

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Versions (`sha256:…`, or their first 12 or more hex digits) or recipe files; several
    /// are pushed at once, with the layers they share sent once.
    #[arg(value_name = "VERSION|RECIPE", required = true, num_args = 1..)]
    pub what: Vec<String>,
    /// Push to this repository (`registry/name`, repeatable) instead of the recipes' targets.
    #[arg(long = "to", value_name = "REPOSITORY")]
    pub to: Vec<String>,
    /// A registry (`host:port`) to reach over plain HTTP (repeatable; loopback needs none).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure: Vec<String>,
    /// Upload blobs in chunks of this many MiB instead of one request each.
    #[arg(long, value_name = "MIB")]
    pub chunk_mib: Option<u64>,
    /// Blobs transferred at once.
    #[arg(long, value_name = "N", default_value_t = crate::registry::client::DEFAULT_PARALLELISM)]
    pub parallel: usize,
    #[command(flatten)]
    pub vars: VarArgs,
}

/// A push target before its repository is known (ECR's comes from the account).
enum Planned {
    Registry(PushTarget),
    Ecr {
        name: String,
        region: String,
        tags: Vec<String>,
        settings: RepositorySettings,
    },
}

/// One image of the push: its build record and where it goes.
struct Item {
    record: BuildRecord,
    planned: Vec<Planned>,
}

pub fn run(args: &PushArgs, settings: &Settings) -> ExitStatus {
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let mut to = Vec::new();
    for repository in &args.to {
        match Reference::repository_only(repository) {
            Ok(repository) => to.push(repository),
            Err(e) => {
                print_reports(
                    settings,
                    &[Report::from_error(&e).with_hint(Some(
                        "give `--to registry.example/name`, without a tag".into(),
                    ))],
                );
                return ExitStatus::RecipeOrUsage;
            }
        }
    }
    let mut items = Vec::new();
    let mut insecure = args.insecure.clone();
    for what in &args.what {
        let (record, recipe_targets, recipe_insecure) = match find(&store, what, args, settings) {
            Ok(found) => found,
            Err(report) => {
                print_reports(settings, &[*report]);
                return ExitStatus::RecipeOrUsage;
            }
        };
        insecure.extend(recipe_insecure);
        if record.image().is_none() {
            print_reports(
                settings,
                &[Report::new(format!(
                    "version {} of `{}` has no OCI image to push: it was built as an AMI",
                    record.version, record.name
                ))
                .with_hint(Some(
                    "push sends images; give the recipe `outputs.oci` to build one".into(),
                ))],
            );
            return ExitStatus::RecipeOrUsage;
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
            print_reports(
                settings,
                &[Report::new(format!(
                    "nothing to push `{what}` to: its recipe has no registry or ECR targets"
                ))
                .with_hint(Some("give one or more `--to REPOSITORY`".into()))],
            );
            return ExitStatus::RecipeOrUsage;
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
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    runtime.block_on(push(args, settings, &store, items, insecure))
}

async fn push(
    args: &PushArgs,
    settings: &Settings,
    store: &Store,
    items: Vec<Item>,
    insecure: Vec<String>,
) -> ExitStatus {
    let needs_ecr = items.iter().flat_map(|i| &i.planned).any(|p| match p {
        Planned::Ecr { .. } => true,
        Planned::Registry(t) => ecr::ecr_region(t.repository.registry()).is_some(),
    });
    let aws = if needs_ecr {
        Some(crate::aws::Aws::load(&settings.aws).await)
    } else {
        None
    };
    let mut sources: Vec<Arc<dyn Credentials>> = vec![settings.registry.credentials()];
    if let Some(aws) = &aws {
        sources.push(Arc::new(EcrCredentials::new(aws.clone())));
    }
    let mut options = settings.registry.client_options();
    options.insecure.extend(insecure);
    options.parallelism = args.parallel.max(1);
    options.chunk_size = args.chunk_mib.map(|m| m * 1024 * 1024);
    let client = match Client::new(options, Arc::new(ChainCredentials(sources))) {
        Ok(client) => client,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
            return ExitStatus::Infrastructure;
        }
    };
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
                    let aws = aws.as_ref().expect("AWS is loaded for ECR targets");
                    let key = (region, name);
                    if !ensured.contains_key(&key) {
                        let repository =
                            ensure_ecr(aws, &key.0, &key.1, &repository_settings, settings)
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
    let progress = CliProgress::new(settings.progress);
    // Each image's signed provenance and SBOMs follow it as soon as it is up, while the other
    // images may still be uploading (provenance module).
    let transfers = Transfers::new(&client);
    let results =
        futures_util::future::join_all(jobs.iter().zip(&records).map(|(job, record)| async {
            let outcome = push_job(&client, store, job, &transfers, &progress).await;
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
    progress.clear();
    let mut images = Vec::new();
    let mut all_pushed = Vec::new();
    let mut attestations = Vec::new();
    let mut only_user_errors = failures.is_empty();
    for (record, (outcome, attached)) in records.iter().zip(results) {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
                failures.push((record.version.to_string(), e.to_string()));
                only_user_errors = false;
                continue;
            }
        };
        for failure in &outcome.failed {
            print_reports(
                settings,
                &[Report::from_error(&failure.error).with_hint(failure.error.hint())],
            );
            only_user_errors &= failure.error.is_user_error();
            failures.push((failure.repository.clone(), failure.error.to_string()));
        }
        for (repository, result) in attached {
            match result {
                Ok(done) => {
                    if settings.verbosity > Verbosity::Quiet {
                        eprintln!(
                            "attached {} attestation{} to {repository} ({})",
                            done.referrers.len(),
                            if done.referrers.len() == 1 { "" } else { "s" },
                            match &done.fallback_tag {
                                Some(tag) => format!("no referrers API: listed in {tag}"),
                                None => "referrers API".into(),
                            }
                        );
                    }
                    attestations.push(json!({
                        "version": record.version,
                        "repository": repository,
                        "attached": done,
                    }));
                }
                Err(e) => {
                    print_reports(settings, &[Report::from_error(&e)]);
                    only_user_errors = false;
                    failures.push((repository, e.to_string()));
                }
            }
        }
        if settings.verbosity > Verbosity::Quiet {
            eprintln!("{}", summary(&image_digest(record), &outcome.pushed));
        }
        images.push(json!({
            "version": record.version,
            "image_digest": image_digest(record),
        }));
        all_pushed.extend(outcome.pushed);
    }
    match settings.output {
        OutputFormat::Json => print_json(&json!({
            "images": images,
            "pushed": all_pushed,
            "references": all_pushed.iter().map(|p| &p.reference).collect::<Vec<_>>(),
            "failed": failures.iter().map(|(r, e)| json!({"repository": r, "error": e})).collect::<Vec<_>>(),
            "bytes_uploaded": all_pushed.iter().map(|p| p.bytes_uploaded).sum::<u64>(),
            "bytes_skipped": all_pushed.iter().map(|p| p.bytes_skipped).sum::<u64>(),
            "attestations": attestations,
        })),
        OutputFormat::Human => {
            for pushed in &all_pushed {
                println!("{}", pushed.reference);
            }
        }
    }
    match (all_pushed.is_empty(), failures.is_empty()) {
        (_, true) => ExitStatus::Success,
        (true, false) if only_user_errors => ExitStatus::RecipeOrUsage,
        (true, false) => ExitStatus::Infrastructure,
        (false, false) => ExitStatus::PartialPublish,
    }
}

/// The repository of ECR repository `name` in `region`, made with `repository_settings` if
/// missing (differences from an existing one are logged as warnings); a failure is reported
/// and returned as (target, error) for the summary.
async fn ensure_ecr(
    aws: &crate::aws::Aws,
    region: &str,
    name: &str,
    repository_settings: &RepositorySettings,
    settings: &Settings,
) -> Result<Reference, (String, String)> {
    let ensured = ecr::ensure_repository(&aws.ecr(region), region, name, repository_settings)
        .await
        .map_err(|e| {
            let error = RegistryError::from(e);
            print_reports(
                settings,
                &[Report::from_error(&error).with_hint(error.hint())],
            );
            (format!("ecr:{region}/{name}"), error.to_string())
        })?;
    Reference::repository_only(&ensured.uri).map_err(|e| (ensured.uri.clone(), e.to_string()))
}

/// One line on what pushing `image` did: bytes and blobs uploaded and skipped.
fn summary(image: &str, pushed: &[TargetReport]) -> String {
    let uploaded: u64 = pushed.iter().map(|p| p.bytes_uploaded).sum();
    let skipped: u64 = pushed.iter().map(|p| p.bytes_skipped).sum();
    let blobs_up: usize = pushed.iter().map(|p| p.blobs_uploaded).sum();
    let blobs_skip: usize = pushed
        .iter()
        .map(|p| p.blobs_present + p.blobs_mounted)
        .sum();
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    format!(
        "pushed {image} to {} repositor{}: uploaded {} in {blobs_up} blob{}, skipped {} in {blobs_skip} blob{} already there",
        pushed.len(),
        if pushed.len() == 1 { "y" } else { "ies" },
        indicatif::HumanBytes(uploaded),
        plural(blobs_up),
        indicatif::HumanBytes(skipped),
        plural(blobs_skip),
    )
}

/// The build record, the recipe's targets (none for a bare version) and the registries the
/// recipe marks insecure.
fn find(
    store: &Store,
    what: &str,
    args: &PushArgs,
    settings: &Settings,
) -> Result<(BuildRecord, Vec<Planned>, Vec<String>), Box<Report>> {
    if !Path::new(what).is_file() {
        let record = super::common::find_record(store, what, &args.vars, settings)?;
        return Ok((record, Vec::new(), Vec::new()));
    }
    let recipe = crate::recipe::load(Path::new(what), &args.vars.sources()).map_err(|e| {
        Box::new(
            e.0.first()
                .map(|e| e.report())
                .unwrap_or_else(|| Report::new("invalid recipe")),
        )
    })?;
    let plan = super::common::plan_one_report(&recipe, what, settings)?;
    let record = store
        .record(&plan.version)
        .map_err(|e| Box::new(Report::from_error(&e)))?
        .ok_or_else(|| {
            Box::new(
                Report::new(format!(
                    "version {} of `{}` is not in the store `{}`",
                    plan.version,
                    what,
                    settings.store.display()
                ))
                .with_hint(Some("build it first with `bake build RECIPE`".into())),
            )
        })?;
    let mut targets = Vec::new();
    let mut insecure = Vec::new();
    for effect in &plan.effects {
        match effect {
            Effect::PushImage { repository, tags } => {
                let parsed = Reference::repository_only(repository)
                    .map_err(|e| Box::new(Report::from_error(&e)))?;
                if recipe
                    .publish
                    .registries
                    .iter()
                    .any(|r| &r.repository == repository && r.insecure)
                {
                    insecure.push(parsed.registry().to_owned());
                }
                targets.push(Planned::Registry(PushTarget {
                    repository: parsed,
                    tags: tags.clone(),
                }));
            }
            Effect::PushEcr {
                repository,
                region,
                tags,
                create_repository,
            } => {
                let spec = recipe
                    .publish
                    .ecr
                    .iter()
                    .find(|e| &e.repository == repository);
                targets.push(Planned::Ecr {
                    name: repository.clone(),
                    region: region.clone(),
                    tags: tags.clone(),
                    settings: RepositorySettings {
                        immutable_tags: spec.is_some_and(|s| s.immutable_tags),
                        scan_on_push: spec.is_none_or(|s| s.scan_on_push),
                        encryption: match spec.and_then(|s| s.kms_key.clone()) {
                            Some(key) => EcrEncryption::Kms(Some(key)),
                            None => EcrEncryption::Aes256,
                        },
                        create: *create_repository,
                    },
                });
            }
            _ => {}
        }
    }
    Ok((record, targets, insecure))
}

/// Progress bars per blob on a terminal; nothing otherwise.
struct CliProgress {
    multi: Option<MultiProgress>,
    bars: Arc<Mutex<HashMap<String, ProgressBar>>>,
}

impl CliProgress {
    fn new(enabled: bool) -> Self {
        CliProgress {
            multi: enabled.then(MultiProgress::new),
            bars: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn clear(&self) {
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }

    fn bar(&self, digest: &str) -> Option<ProgressBar> {
        self.bars.lock().expect("bars lock").get(digest).cloned()
    }
}

impl Progress for CliProgress {
    fn blob_started(&self, digest: &str, size: u64) {
        let Some(multi) = &self.multi else {
            return;
        };
        let bar = multi.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_prefix(
            digest
                .parse::<crate::id::Digest>()
                .map_or_else(|_| digest.to_owned(), |d| d.short().to_owned()),
        );
        self.bars
            .lock()
            .expect("bars lock")
            .insert(digest.to_owned(), bar);
    }

    fn blob_bytes(&self, digest: &str, n: u64) {
        if let Some(bar) = self.bar(digest) {
            bar.inc(n);
        }
    }

    fn blob_restart(&self, digest: &str) {
        if let Some(bar) = self.bar(digest) {
            bar.set_position(0);
        }
    }

    fn blob_done(&self, digest: &str, _size: u64, outcome: BlobOutcome) {
        if let Some(bar) = self.bars.lock().expect("bars lock").remove(digest) {
            bar.finish_with_message(format!("{outcome:?}"));
            if let Some(multi) = &self.multi {
                multi.remove(&bar);
            }
        }
    }

    fn sink(&self, digest: &str) -> Arc<dyn Fn(u64) + Send + Sync> {
        let bar = self.bar(digest);
        Arc::new(move |n| {
            if let Some(bar) = &bar {
                bar.inc(n);
            }
        })
    }
}

/// The digest of a record's image (every record `push` keeps was checked to have one).
fn image_digest(record: &BuildRecord) -> String {
    record
        .image()
        .map(|image| image.image_digest.to_string())
        .unwrap_or_default()
}
