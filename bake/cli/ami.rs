//! `bake ami upload IMAGE`: upload a raw disk image into an EBS snapshot (journaled, removed
//! again on failure or Ctrl-C), and `bake ami publish RECIPE --disk-image IMAGE`: the snapshot
//! strategy's AWS half (upload, register, distribute) for a disk image built by `bake build`
//! or by hand. Both print ids on stdout (`--output json` for machines).
//!
//! Environment: `BAKE_AWS_POLL_INTERVAL` (`5s` by default): pause between state polls.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::{VarArgs, print_json, print_reports};
use crate::ami::cleanup::{Action, Removal, rollback};
use crate::ami::disk_build::{build_local_image, build_local_image_of_built_root};
use crate::ami::journal::{Journal, ResourceKind};
use crate::ami::publish::{
    PublishFailed, PublishOptions, existing_image, preflight, publish_snapshot_ami,
};
use crate::ami::upload::{SnapshotRequest, SnapshotUploader, min_volume_gib};
use crate::ami::{AmiRecord, AmiSpec, TAG_RUN};
use crate::aws::Aws;
use crate::build::pipeline::{BuildOptions, Builder};
use crate::build::runner::NamespaceRunner;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::plan::Plan;
use crate::recipe::Recipe;
use crate::settings::{OutputFormat, Settings};
use crate::store::{Artifact, BuildRecord, DiskAmi, OciImage, Store};

#[derive(Debug, Args)]
pub struct AmiArgs {
    #[command(subcommand)]
    pub command: AmiCommand,
}

#[derive(Debug, Subcommand)]
pub enum AmiCommand {
    /// Upload a raw disk image into a new EBS snapshot (EBS direct APIs).
    Upload(UploadArgs),
    /// Upload a recipe's disk image, register the AMI and distribute it to the recipe's regions.
    Publish(PublishArgs),
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The raw disk image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// The snapshot's volume size in GiB (default: the image's size, rounded up).
    #[arg(long, value_name = "GIB")]
    pub volume_size: Option<u64>,
    /// The snapshot's description.
    #[arg(long, default_value = "uploaded by bake")]
    pub description: String,
    /// `PutSnapshotBlock` calls in flight.
    #[arg(long, default_value_t = crate::ami::upload::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// On failure, keep the snapshot (and its journal, for `bake cleanup`).
    #[arg(long)]
    pub keep_on_failure: bool,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The recipe file (its `outputs.ami` says where and how).
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The raw disk image to publish.
    #[arg(long, value_name = "IMAGE")]
    pub disk_image: PathBuf,
    /// On failure, keep what was made (and its journal, for `bake cleanup`).
    #[arg(long)]
    pub keep_on_failure: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub fn run(args: &AmiArgs, settings: &Settings) -> ExitStatus {
    let runtime = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let poll = match poll_interval() {
        Ok(poll) => poll,
        Err(report) => {
            print_reports(settings, &[report]);
            return ExitStatus::RecipeOrUsage;
        }
    };
    match &args.command {
        AmiCommand::Upload(args) => runtime.block_on(upload(args, settings, poll)),
        AmiCommand::Publish(args) => runtime.block_on(publish(args, settings, poll)),
    }
}

fn poll_interval() -> Result<Option<Duration>, Report> {
    match std::env::var("BAKE_AWS_POLL_INTERVAL") {
        Ok(text) if !text.is_empty() => humantime::parse_duration(&text)
            .map(Some)
            .map_err(|_| Report::new(format!("BAKE_AWS_POLL_INTERVAL=`{text}` is not a duration"))),
        _ => Ok(None),
    }
}

/// Resolves when the user asks bake to stop (Ctrl-C or SIGTERM).
pub async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let term = async {
        match term.as_mut() {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[derive(Debug, Serialize)]
struct Uploaded {
    snapshot_id: String,
    region: String,
    changed_blocks: u64,
    checksum: String,
}

async fn upload(args: &UploadArgs, settings: &Settings, poll: Option<Duration>) -> ExitStatus {
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let aws = Aws::load(&settings.aws).await;
    let Some(region) = aws.default_region().map(str::to_owned) else {
        print_reports(
            settings,
            &[Report::new("no AWS region to upload to")
                .with_hint(Some("pass `--region`, or set `AWS_REGION`".into()))],
        );
        return ExitStatus::RecipeOrUsage;
    };
    let size = match fs_err::metadata(&args.image) {
        Ok(m) => m.len(),
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::RecipeOrUsage;
        }
    };
    let volume = args.volume_size.unwrap_or_else(|| min_volume_gib(size));
    let mut uploader = SnapshotUploader::new(aws.ebs(&region), aws.ec2(&region), &region);
    uploader.concurrency = args.concurrency.max(1);
    if let Some(interval) = poll {
        uploader.wait.interval = interval;
    }
    let journal = match Journal::begin(&store, "-", "-") {
        Ok(j) => j,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let work = async {
        let token = format!("bake-upload-{}", journal.run_id());
        let entry = journal.creating(ResourceKind::Snapshot, &region, &token)?;
        let snapshot_id = uploader
            .start(&SnapshotRequest {
                volume_size_gib: volume,
                description: args.description.clone(),
                tags: [(TAG_RUN.to_owned(), journal.run_id())].into(),
                encrypted: false,
                kms_key_arn: None,
                client_token: token,
                parent_snapshot_id: None,
            })
            .await?;
        journal.created(entry, &snapshot_id)?;
        tracing::info!("uploading {} into {snapshot_id}", args.image.display());
        let written = uploader
            .put_blocks(&snapshot_id, &args.image, volume)
            .await?;
        uploader.complete(&snapshot_id, &written).await?;
        uploader.wait_completed(&snapshot_id).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Uploaded {
            snapshot_id,
            region: region.clone(),
            changed_blocks: written.changed_blocks,
            checksum: written.checksum,
        })
    };
    let result = tokio::select! {
        result = work => result,
        () = interrupted() => Err("interrupted".into()),
    };
    match result {
        Ok(uploaded) => {
            if let Err(e) = journal.finish() {
                tracing::warn!("failed to delete the journal: {e}");
            }
            match settings.output {
                OutputFormat::Json => print_json(&uploaded),
                OutputFormat::Human => println!("snapshot  {}", uploaded.snapshot_id),
            }
            ExitStatus::Success
        }
        Err(error) => {
            let interrupted = error.to_string() == "interrupted";
            let report = Report::from_error(error.as_ref());
            let removals = if args.keep_on_failure {
                Vec::new()
            } else {
                rollback(&aws, journal).await
            };
            print_reports(settings, &[report]);
            print_removals(settings, &removals, args.keep_on_failure);
            if interrupted {
                ExitStatus::Interrupted
            } else {
                ExitStatus::Infrastructure
            }
        }
    }
}

async fn publish(args: &PublishArgs, settings: &Settings, poll: Option<Duration>) -> ExitStatus {
    let shown = args.recipe.display().to_string();
    let recipe = match super::common::load_or_report(&args.recipe, &args.vars, settings) {
        Ok(recipe) => recipe,
        Err(status) => return status,
    };
    let plan = match super::common::plan_or_report(&recipe, &shown, settings) {
        Ok(plan) => plan,
        Err(status) => return status,
    };
    let spec = match AmiSpec::from_recipe(&recipe, &plan.version) {
        Ok(Some(spec)) => spec,
        Ok(None) => {
            print_reports(
                settings,
                &[Report::new(format!("`{shown}` has no `outputs.ami`"))],
            );
            return ExitStatus::RecipeOrUsage;
        }
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::RecipeOrUsage;
        }
    };
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let aws = Aws::load(&settings.aws).await;
    let digest = {
        let path = args.disk_image.clone();
        match tokio::task::spawn_blocking(move || crate::ami::upload::file_digest(&path)).await {
            Ok(Ok(digest)) => digest,
            Ok(Err(e)) => {
                print_reports(settings, &[Report::from_error(&e)]);
                return ExitStatus::RecipeOrUsage;
            }
            Err(e) => {
                print_reports(settings, &[Report::from_error(&e)]);
                return ExitStatus::Infrastructure;
            }
        }
    };
    let mut options = PublishOptions {
        keep_on_failure: args.keep_on_failure,
        ..PublishOptions::default()
    };
    if let Some(interval) = poll {
        options.snapshot_wait.interval = interval;
        options.distribute.wait.interval = interval;
    }
    let started = std::time::SystemTime::now();
    // An image the store already has of this version stays in its record.
    let image = store
        .record(&plan.version)
        .ok()
        .flatten()
        .and_then(|r| r.image().cloned());
    let result = publish_snapshot_ami(
        &aws,
        &store,
        &spec,
        Some(&args.disk_image),
        Some(digest),
        &options,
        interrupted(),
    )
    .await;
    let result = result.map(|ami| {
        let record = disk_ami_record(&plan, image, &ami, Vec::new(), None, started);
        (record, ami)
    });
    finish_publish(settings, &store, result)
}

/// The build record of a version whose AMIs were registered from a disk image (with its OCI
/// image, when the same build made one).
fn disk_ami_record(
    plan: &Plan,
    image: Option<OciImage>,
    ami: &AmiRecord,
    boots: Vec<crate::ami::boot::BootReport>,
    audit: Option<crate::audit::AuditRecord>,
    started: std::time::SystemTime,
) -> BuildRecord {
    let ami = DiskAmi {
        // The publish step computed it over the bytes it uploaded.
        disk_image_digest: ami
            .disk_image_digest
            .as_deref()
            .and_then(|d| d.parse().ok()),
        regions: ami.regions.clone(),
        boots,
        upload: ami.upload.clone(),
    };
    let artifact = match image {
        Some(image) => Artifact::OciImageAndDiskAmi { image, ami },
        None => Artifact::DiskAmi { ami },
    };
    let mut record = BuildRecord::new(
        &plan.name,
        &plan.version,
        &plan.recipe,
        &plan.inputs,
        artifact,
    );
    record.started = humantime::format_rfc3339_seconds(started).to_string();
    record.duration_ms = started
        .elapsed()
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    record.audit = audit;
    record
}

fn finish_publish(
    settings: &Settings,
    store: &Store,
    result: Result<(BuildRecord, AmiRecord), PublishFailed>,
) -> ExitStatus {
    match result {
        Ok((full, record)) => {
            if let Err(e) = store.put_record(&full) {
                tracing::warn!("failed to write the build record: {e}");
            }
            match settings.output {
                OutputFormat::Json => print_json(&record),
                OutputFormat::Human => print_ami_record(&record),
            }
            ExitStatus::Success
        }
        Err(failed) => finish_publish_error(settings, failed),
    }
}

fn finish_publish_error(settings: &Settings, failed: PublishFailed) -> ExitStatus {
    print_reports(
        settings,
        &[Report::from_error(&failed).with_hint(failed.error.hint())],
    );
    print_removals(settings, &failed.removals, failed.kept);
    if matches!(failed.error, crate::ami::publish::PublishError::Interrupted) {
        ExitStatus::Interrupted
    } else if failed.error.is_user_error() {
        ExitStatus::RecipeOrUsage
    } else {
        ExitStatus::Infrastructure
    }
}

/// Prints an AMI record for people: the disk image digest, then one line per region.
pub fn print_ami_record(record: &AmiRecord) {
    if let Some(digest) = &record.disk_image_digest {
        println!("disk     {digest}");
    }
    for region in &record.regions {
        println!(
            "ami      {}  {}  {}",
            region.region, region.image_id, region.snapshot_id
        );
    }
}

/// What a rollback did, on stderr (the error came first).
fn print_removals(settings: &Settings, removals: &[Removal], kept: bool) {
    if kept {
        eprintln!("kept what this run made; `bake cleanup` removes it");
        return;
    }
    let mut failures = Vec::new();
    for r in removals {
        match r.action {
            Action::Removed => eprintln!("removed {:?} {} in {}", r.kind, r.id, r.region),
            Action::Failed => failures.push(
                Report::new(format!(
                    "failed to remove {:?} {} in {}: {}",
                    r.kind,
                    r.id,
                    r.region,
                    r.error.as_deref().unwrap_or("unknown error")
                ))
                .with_hint(Some("run `bake cleanup` to retry".into())),
            ),
            _ => {}
        }
    }
    print_reports(settings, &failures);
}

/// What `bake build` prints for a snapshot-strategy AMI.
#[derive(Debug, Serialize)]
struct AmiBuildOutput<'a> {
    name: &'a str,
    version: &'a str,
    /// The OCI image the same build made, for a recipe with `outputs.oci` too.
    #[serde(skip_serializing_if = "Option::is_none")]
    image_digest: Option<&'a crate::id::Digest>,
    #[serde(flatten)]
    ami: &'a AmiRecord,
    /// The version's AMI existed already: no disk image was made, nothing was uploaded.
    cached: bool,
    /// The digest of the AMIs' signed provenance (none with `--no-attest`).
    #[serde(skip_serializing_if = "Option::is_none")]
    provenance: Option<&'a str>,
    /// The boot tests the disk image passed (the first run's, on a rebuild).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    boots: &'a [crate::ami::boot::BootReport],
}

/// Resolves when `flag` is set (by bake's SIGINT/SIGTERM handler).
async fn flag_set(flag: Arc<AtomicBool>) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `bake build` for `outputs.ami.strategy: snapshot`: check regions and KMS keys, then (unless
/// the version's AMI exists) provision the root, make the disk image, boot-test it, and publish
/// it (upload, register, distribute); record and print the result.
pub fn run_snapshot_build(
    recipe: &Recipe,
    shown: &str,
    attest: &super::common::AttestArgs,
    settings: &Settings,
    cancel: Arc<AtomicBool>,
) -> ExitStatus {
    let report = |e: &(dyn std::error::Error + 'static)| {
        print_reports(settings, &[Report::from_error(e)]);
    };
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            report(&e);
            return ExitStatus::Infrastructure;
        }
    };
    let plan = match super::common::plan_or_report(recipe, shown, settings) {
        Ok(plan) => plan,
        Err(status) => return status,
    };
    let (Some(_), Ok(Some(spec))) = (
        recipe.outputs.ami.as_ref(),
        AmiSpec::from_recipe(recipe, &plan.version),
    ) else {
        print_reports(
            settings,
            &[Report::new(format!(
                "`{shown}` has no renderable `outputs.ami`"
            ))],
        );
        return ExitStatus::RecipeOrUsage;
    };
    let runtime = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            report(&e);
            return ExitStatus::Infrastructure;
        }
    };
    let poll = match poll_interval() {
        Ok(poll) => poll,
        Err(r) => {
            print_reports(settings, &[r]);
            return ExitStatus::RecipeOrUsage;
        }
    };
    let aws = runtime.block_on(Aws::load(&settings.aws));
    // Regions and keys first: a typo should not cost a provisioning run.
    let checked = runtime.block_on(async {
        preflight(&aws, &spec, None).await?;
        existing_image(&aws, &spec).await
    });
    let existing = match checked {
        Ok(existing) => existing,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
            return if e.is_user_error() {
                ExitStatus::RecipeOrUsage
            } else {
                ExitStatus::Infrastructure
            };
        }
    };
    let started = std::time::SystemTime::now();
    let quiet = settings.verbosity == crate::settings::Verbosity::Quiet;
    let mut reporter = super::common::CliReporter { quiet };
    // What an earlier run of this version recorded, read before this run writes anything.
    let previous = store.record(&plan.version).ok().flatten();
    // Holds the disk image until the upload is done.
    let mut work_dir = None;
    let mut disk: Option<(PathBuf, String)> = None;
    let mut audit = None;
    let mut boots = Vec::new();
    let mut image: Option<OciImage> = None;
    // The image build's gate result, for the disk image of the same root.
    let mut image_audit = None;
    let wants_image = recipe.outputs.oci.is_some();
    // An image another run pushed is fetched rather than built (`bake build`'s shared cache).
    let fetched = if wants_image && !crate::build::pipeline::is_built(&store, &plan.version) {
        super::build::fetch_published(recipe, &plan, &store, settings)
    } else {
        None
    };
    if existing.is_none() || wants_image {
        let runner = match NamespaceRunner::new() {
            Ok(runner) => runner,
            Err(e) => {
                report(&e);
                return ExitStatus::Infrastructure;
            }
        };
        let builder = Builder {
            store: &store,
            runner: &runner,
            options: BuildOptions {
                source_date_epoch: plan.source_date_epoch(),
                workers: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
                cancel: Arc::clone(&cancel),
                boot_accelerator: settings.boot_accelerator,
            },
        };
        let exit = |e: &crate::build::pipeline::BuildError| {
            if e.is_interrupted() || cancel.load(Ordering::SeqCst) {
                ExitStatus::Interrupted
            } else if e.is_recipe_failure() {
                ExitStatus::RecipeOrUsage
            } else {
                ExitStatus::Infrastructure
            }
        };
        // With `outputs.oci` too, the image comes first: its steps fill the layer cache, so the
        // disk image's root below is those same layers unpacked (no step runs twice), and both
        // artifacts are the one provisioned root under this one version.
        if wants_image {
            match builder.build(recipe, &plan, &mut reporter) {
                Ok(_) => {
                    let record = store.record(&plan.version).ok().flatten();
                    image = record.as_ref().and_then(|r| r.image().cloned());
                    image_audit = record.and_then(|r| r.audit);
                }
                Err(e) => {
                    print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
                    return exit(&e);
                }
            }
        }
        if existing.is_none() {
            let dir = match store.work_dir("disk") {
                Ok(dir) => dir,
                Err(e) => {
                    report(&e);
                    return ExitStatus::Infrastructure;
                }
            };
            let out = dir.path().join("disk.raw");
            let built = if image.is_some() {
                build_local_image_of_built_root(
                    &builder,
                    recipe,
                    &plan,
                    &out,
                    image_audit.clone(),
                    &mut reporter,
                )
            } else {
                build_local_image(&builder, recipe, &plan, &out, &mut reporter)
            };
            let local = match built {
                Ok(local) => local,
                Err(e) => {
                    print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
                    return if e.is_interrupted() || cancel.load(Ordering::SeqCst) {
                        ExitStatus::Interrupted
                    } else if e.is_recipe_failure() {
                        ExitStatus::RecipeOrUsage
                    } else {
                        ExitStatus::Infrastructure
                    };
                }
            };
            let local_image = local.image;
            audit = local.audit;
            boots = local.boots;
            disk = Some((local_image.path.clone(), local_image.digest.clone()));
            work_dir = Some(dir);
        }
    }
    // The image's gate scanned the same root the AMI is made of.
    audit = audit.or(image_audit);
    let previous_ami = previous.as_ref().and_then(BuildRecord::disk_ami);
    let digest = disk.as_ref().map(|(_, digest)| digest.clone()).or_else(|| {
        previous_ami
            .and_then(|a| a.disk_image_digest.as_ref())
            .map(ToString::to_string)
    });
    // A rebuild that reuses the AMI ran no gate and no boot: the record keeps the first run's.
    if existing.is_some()
        && let Some(previous) = &previous
    {
        audit = audit.or_else(|| previous.audit.clone());
        if boots.is_empty()
            && let Some(ami) = previous_ami
        {
            boots = ami.boots.clone();
        }
    }
    let mut options = PublishOptions::default();
    if let Some(interval) = poll {
        options.snapshot_wait.interval = interval;
        options.distribute.wait.interval = interval;
    }
    let result = runtime.block_on(publish_snapshot_ami(
        &aws,
        &store,
        &spec,
        disk.as_ref().map(|(path, _)| path.as_path()),
        digest,
        &options,
        flag_set(Arc::clone(&cancel)),
    ));
    // The image just uploaded is what the next version's upload compares itself with.
    if let (Ok(ami), Some((path, digest))) = (&result, &disk)
        && ami.upload.is_some()
        && let Err(e) = store.keep_disk_image(&recipe.name, digest, path)
    {
        tracing::warn!(
            "failed to keep the disk image for the next version's incremental upload: {}",
            crate::diagnostic::error_chain(&e)
        );
    }
    drop(work_dir);
    let cached = existing.is_some();
    let result = result.map(|ami| {
        let mut record = disk_ami_record(&plan, image, &ami, boots, audit, started);
        // A rebuild that reuses the AMI uploaded nothing: the record keeps the first run's.
        if let Artifact::DiskAmi { ami: disk } | Artifact::OciImageAndDiskAmi { ami: disk, .. } =
            &mut record.artifact
            && disk.upload.is_none()
        {
            disk.upload = previous_ami.and_then(|a| a.upload.clone());
        }
        (record, ami)
    });
    match result {
        Ok((record, ami)) => {
            if let Err(e) = store.put_record(&record) {
                tracing::warn!("failed to write the build record: {e}");
            }
            // The image's provenance (as a plain OCI build signs it), unless the layout has it
            // or the image was fetched (its builder pushed its provenance beside it). It comes
            // before the AMIs': the manifest names the AMIs' provenance, the layout the image's.
            if let Some(image) = record.image()
                && !attest.no_attest
                && fetched.is_none()
            {
                let signed =
                    crate::provenance::image_attested(&store, &image.image_digest.to_string())
                        .map_err(|e| Report::from_error(&e))
                        .and_then(|attested| {
                            if attested {
                                Ok(())
                            } else {
                                super::attest::attest(attest, settings, &store, &record.version)
                                    .map(drop)
                            }
                        });
                if let Err(report) = signed {
                    print_reports(settings, &[report]);
                    return ExitStatus::Infrastructure;
                }
            }
            // Signed provenance for the AMIs, unless every one of them already has it.
            let provenance = if attest.no_attest {
                None
            } else {
                match crate::provenance::ami::attested(&store, &record.version) {
                    Ok(Some(digest)) => Some(digest),
                    Ok(None) => {
                        match super::attest::attest_amis(
                            attest,
                            settings,
                            &store,
                            &record.version,
                            None,
                            &runtime,
                        ) {
                            Ok(manifest) => {
                                manifest.attestations.map(|a| a.provenance.envelope_digest)
                            }
                            Err(report) => {
                                print_reports(settings, &[report]);
                                return ExitStatus::Infrastructure;
                            }
                        }
                    }
                    Err(e) => {
                        report(&e);
                        return ExitStatus::Infrastructure;
                    }
                }
            };
            match settings.output {
                OutputFormat::Json => print_json(&AmiBuildOutput {
                    name: &record.name,
                    version: &record.version,
                    image_digest: record.image().map(|i| &i.image_digest),
                    ami: &ami,
                    cached,
                    provenance: provenance.as_deref(),
                    boots: record.disk_ami().map_or(&[], |a| a.boots.as_slice()),
                }),
                OutputFormat::Human => {
                    println!("version  {}", record.version);
                    if let Some(image) = record.image() {
                        println!("image    {}", image.image_digest);
                    }
                    print_ami_record(&ami);
                    if let Some(digest) = &provenance {
                        println!("provenance {digest}");
                    }
                    for boot in record.disk_ami().map_or(&[][..], |a| a.boots.as_slice()) {
                        println!(
                            "booted   to `{}` in {:.1} s ({})",
                            boot.marker,
                            boot.duration_ms as f64 / 1000.0,
                            boot.accelerator
                        );
                    }
                    if cached && !quiet {
                        eprintln!("(already built: the AMI of this version exists)");
                    }
                }
            }
            ExitStatus::Success
        }
        Err(failed) => finish_publish_error(settings, failed),
    }
}
