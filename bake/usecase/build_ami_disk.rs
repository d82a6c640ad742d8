//! AMIs from disk images (the snapshot strategy): `bake build` of a snapshot-strategy recipe
//! (check regions and keys, provision the root, make the disk image, boot-test it, upload,
//! register, distribute, record and attest), `bake ami upload` (a raw disk image into an EBS
//! snapshot, journaled, removed again on failure or Ctrl-C) and `bake ami publish` (the AWS half
//! for a disk image built by `bake build` or by hand).
//!
//! Environment: `BAKE_AWS_POLL_INTERVAL` (`5s` by default): pause between state polls.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::attest::{AttestError, SigningOptions};
use super::plan::PlanRecipeError;
use super::{Context, ContextError};
use crate::ami::boot::{Accelerator, BootReport};
use crate::ami::cleanup::{Action, Removal, rollback};
use crate::ami::disk_build::{LocalImageError, build_local_image, build_local_image_of_built_root};
use crate::ami::journal::{Journal, JournalError, ResourceKind};
use crate::ami::publish::{
    PublishError, PublishFailed, PublishOptions, existing_image, preflight, publish_snapshot_ami,
};
use crate::ami::upload::{SnapshotRequest, SnapshotUploader, UploadError, min_volume_gib};
use crate::ami::{AmiRecord, AmiSpec, TAG_RUN};
use crate::build::pipeline::{self, BuildError, BuildOptions, BuildReporter, Builder};
use crate::build::runner::NamespaceRunner;
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::plan::Plan;
use crate::provenance::ProvenanceError;
use crate::provenance::ami::AmiProvenanceError;
use crate::recipe::{Recipe, RecipeError};
use crate::store::{Artifact, BuildRecord, DiskAmi, OciImage, Store, StoreError};

/// Why an AMI was not made from a disk image (or a disk image not uploaded).
#[derive(Debug, thiserror::Error)]
pub enum BuildAmiDiskError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("BAKE_AWS_POLL_INTERVAL=`{0}` is not a duration")]
    PollInterval(String),
    #[error(transparent)]
    Plan(#[from] PlanRecipeError),
    #[error("`{0}` has no renderable `outputs.ami`")]
    NoRenderableAmi(String),
    #[error("`{0}` has no `outputs.ami`")]
    NoAmi(String),
    #[error(transparent)]
    Spec(RecipeError),
    #[error(transparent)]
    Preflight(PublishError),
    #[error(transparent)]
    Runner(std::io::Error),
    #[error("{error}")]
    Build { error: BuildError, cancelled: bool },
    #[error(transparent)]
    WorkDir(StoreError),
    #[error("{error}")]
    Disk {
        error: LocalImageError,
        cancelled: bool,
    },
    #[error(transparent)]
    Digest(UploadError),
    #[error(transparent)]
    Join(tokio::task::JoinError),
    #[error(transparent)]
    Publish(Box<PublishFailed>),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    ImageProvenance(ProvenanceError),
    #[error(transparent)]
    AmiProvenance(AmiProvenanceError),
    #[error(transparent)]
    Attest(#[from] AttestError),
    #[error("no AWS region to upload to")]
    NoRegion,
    #[error(transparent)]
    Image(std::io::Error),
    #[error(transparent)]
    Journal(JournalError),
    #[error("{error}")]
    Upload {
        error: Box<dyn std::error::Error + Send + Sync>,
        interrupted: bool,
        removals: Vec<Removal>,
        kept: bool,
    },
}

impl Diagnose for BuildAmiDiskError {
    fn hint(&self) -> Option<String> {
        match self {
            BuildAmiDiskError::Plan(e) => e.hint(),
            BuildAmiDiskError::Preflight(e) => e.hint(),
            BuildAmiDiskError::Build { error, .. } => error.hint(),
            BuildAmiDiskError::Disk { error, .. } => error.hint(),
            BuildAmiDiskError::Publish(failed) => failed.error.hint(),
            BuildAmiDiskError::Attest(e) => e.hint(),
            BuildAmiDiskError::NoRegion => Some("pass `--region`, or set `AWS_REGION`".into()),
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            BuildAmiDiskError::PollInterval(_)
            | BuildAmiDiskError::NoRenderableAmi(_)
            | BuildAmiDiskError::NoAmi(_)
            | BuildAmiDiskError::Spec(_)
            | BuildAmiDiskError::Digest(_)
            | BuildAmiDiskError::NoRegion
            | BuildAmiDiskError::Image(_) => ExitStatus::RecipeOrUsage,
            BuildAmiDiskError::Plan(e) => e.exit_status(),
            BuildAmiDiskError::Preflight(e) if e.is_user_error() => ExitStatus::RecipeOrUsage,
            BuildAmiDiskError::Build { error, cancelled } => {
                if error.is_interrupted() || *cancelled {
                    ExitStatus::Interrupted
                } else if error.is_recipe_failure() {
                    ExitStatus::RecipeOrUsage
                } else {
                    ExitStatus::Infrastructure
                }
            }
            BuildAmiDiskError::Disk { error, cancelled } => {
                if error.is_interrupted() || *cancelled {
                    ExitStatus::Interrupted
                } else if error.is_recipe_failure() {
                    ExitStatus::RecipeOrUsage
                } else {
                    ExitStatus::Infrastructure
                }
            }
            BuildAmiDiskError::Publish(failed) => {
                if matches!(failed.error, PublishError::Interrupted) {
                    ExitStatus::Interrupted
                } else if failed.error.is_user_error() {
                    ExitStatus::RecipeOrUsage
                } else {
                    ExitStatus::Infrastructure
                }
            }
            BuildAmiDiskError::Upload {
                interrupted: true, ..
            } => ExitStatus::Interrupted,
            _ => ExitStatus::Infrastructure,
        }
    }

    fn reports(&self) -> Vec<Report> {
        match self {
            BuildAmiDiskError::Plan(e) => e.reports(),
            BuildAmiDiskError::Attest(e) => e.reports(),
            BuildAmiDiskError::Build { error, .. } => {
                vec![Report::from_error(error).with_hint(error.hint())]
            }
            BuildAmiDiskError::Disk { error, .. } => {
                vec![Report::from_error(error).with_hint(error.hint())]
            }
            // Rollback failures come after the error that stopped the run, never instead.
            BuildAmiDiskError::Publish(failed) => {
                let mut reports =
                    vec![Report::from_error(failed.as_ref()).with_hint(failed.error.hint())];
                reports.extend(removal_failures(&failed.removals, failed.kept));
                reports
            }
            BuildAmiDiskError::Upload {
                error,
                removals,
                kept,
                ..
            } => {
                let mut reports = vec![Report::from_error(error.as_ref())];
                reports.extend(removal_failures(removals, *kept));
                reports
            }
            _ => vec![Report::from_error(self).with_hint(self.hint())],
        }
    }
}

/// What a rollback could not remove, as reports (none when what was made was kept).
fn removal_failures(removals: &[Removal], kept: bool) -> Vec<Report> {
    if kept {
        return Vec::new();
    }
    removals
        .iter()
        .filter(|r| r.action == Action::Failed)
        .map(|r| {
            Report::new(format!(
                "failed to remove {:?} {} in {}: {}",
                r.kind,
                r.id,
                r.region,
                r.error.as_deref().unwrap_or("unknown error")
            ))
            .with_hint(Some("run `bake cleanup` to retry".into()))
        })
        .collect()
}

/// What a rollback removed, on stderr, as it is reported (the errors follow).
fn print_removals(removals: &[Removal], kept: bool) {
    if kept {
        eprintln!("kept what this run made; `bake cleanup` removes it");
        return;
    }
    for r in removals {
        if r.action == Action::Removed {
            eprintln!("removed {:?} {} in {}", r.kind, r.id, r.region);
        }
    }
}

fn poll_interval() -> Result<Option<Duration>, BuildAmiDiskError> {
    match std::env::var("BAKE_AWS_POLL_INTERVAL") {
        Ok(text) if !text.is_empty() => humantime::parse_duration(&text)
            .map(Some)
            .map_err(|_| BuildAmiDiskError::PollInterval(text)),
        _ => Ok(None),
    }
}

/// Resolves when `flag` is set (by bake's SIGINT/SIGTERM handler).
async fn flag_set(flag: Arc<AtomicBool>) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `bake ami upload`'s choices.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// The raw disk image.
    pub image: PathBuf,
    /// The snapshot's volume size in GiB (default: the image's size, rounded up).
    pub volume_size: Option<u64>,
    pub description: String,
    /// `PutSnapshotBlock` calls in flight.
    pub concurrency: usize,
    /// On failure, keep the snapshot (and its journal, for `bake cleanup`).
    pub keep_on_failure: bool,
}

/// A disk image uploaded into a snapshot.
#[derive(Debug, Serialize)]
pub struct Uploaded {
    pub snapshot_id: String,
    pub region: String,
    pub changed_blocks: u64,
    pub checksum: String,
}

/// Uploads a raw disk image into a new EBS snapshot in the default region (EBS direct APIs),
/// removing it again on failure or Ctrl-C unless asked to keep it.
pub fn upload_snapshot(ctx: &Context, args: &UploadOptions) -> Result<Uploaded, BuildAmiDiskError> {
    let poll = poll_interval()?;
    let cancel = Arc::clone(ctx.cancel());
    ctx.block_on(async {
        let store = ctx.store()?;
        let aws = ctx.aws().await;
        let region = aws
            .default_region()
            .map(str::to_owned)
            .ok_or(BuildAmiDiskError::NoRegion)?;
        let size = fs_err::metadata(&args.image)
            .map_err(BuildAmiDiskError::Image)?
            .len();
        let volume = args.volume_size.unwrap_or_else(|| min_volume_gib(size));
        let mut uploader = SnapshotUploader::new(aws.ebs(&region), aws.ec2(&region), &region);
        uploader.concurrency = args.concurrency.max(1);
        if let Some(interval) = poll {
            uploader.wait.interval = interval;
        }
        let journal = Journal::begin(store, "-", "-").map_err(BuildAmiDiskError::Journal)?;
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
            () = flag_set(cancel) => Err("interrupted".into()),
        };
        match result {
            Ok(uploaded) => {
                if let Err(e) = journal.finish() {
                    tracing::warn!("failed to delete the journal: {e}");
                }
                Ok(uploaded)
            }
            Err(error) => {
                let interrupted = error.to_string() == "interrupted";
                let removals = if args.keep_on_failure {
                    Vec::new()
                } else {
                    rollback(aws, journal).await
                };
                print_removals(&removals, args.keep_on_failure);
                Err(BuildAmiDiskError::Upload {
                    error,
                    interrupted,
                    removals,
                    kept: args.keep_on_failure,
                })
            }
        }
    })?
}

/// `bake ami publish`'s choices.
#[derive(Debug, Clone)]
pub struct PublishDiskOptions {
    /// The raw disk image to publish.
    pub disk_image: PathBuf,
    /// On failure, keep what was made (and its journal, for `bake cleanup`).
    pub keep_on_failure: bool,
}

/// Uploads `recipe`'s disk image, registers its AMI and distributes it to the recipe's regions;
/// records the version (with its OCI image, when the store has one of it).
pub fn publish_disk_image(
    ctx: &Context,
    recipe: &Recipe,
    shown: &str,
    options: &PublishDiskOptions,
) -> Result<AmiRecord, BuildAmiDiskError> {
    let poll = poll_interval()?;
    let plan = super::plan::plan_recipe(ctx, recipe, shown)?;
    let spec = AmiSpec::from_recipe(recipe, &plan.version)
        .map_err(BuildAmiDiskError::Spec)?
        .ok_or_else(|| BuildAmiDiskError::NoAmi(shown.to_owned()))?;
    let store = ctx.store()?;
    let cancel = Arc::clone(ctx.cancel());
    let (record, ami) = ctx.block_on(async {
        let aws = ctx.aws().await;
        let path = options.disk_image.clone();
        let digest = tokio::task::spawn_blocking(move || crate::ami::upload::file_digest(&path))
            .await
            .map_err(BuildAmiDiskError::Join)?
            .map_err(BuildAmiDiskError::Digest)?;
        let mut publish = PublishOptions {
            keep_on_failure: options.keep_on_failure,
            ..PublishOptions::default()
        };
        if let Some(interval) = poll {
            publish.snapshot_wait.interval = interval;
            publish.distribute.wait.interval = interval;
        }
        let started = std::time::SystemTime::now();
        // An image the store already has of this version stays in its record.
        let image = store
            .record(&plan.version)
            .ok()
            .flatten()
            .and_then(|r| r.image().cloned());
        let ami = publish_snapshot_ami(
            aws,
            store,
            &spec,
            Some(&options.disk_image),
            Some(digest),
            &publish,
            flag_set(cancel),
        )
        .await
        .map_err(published_error)?;
        let record = disk_ami_record(&plan, image, &ami, Vec::new(), None, started);
        Ok::<_, BuildAmiDiskError>((record, ami))
    })??;
    if let Err(e) = store.put_record(&record) {
        tracing::warn!("failed to write the build record: {e}");
    }
    Ok(ami)
}

/// A failed publish, once what its rollback removed is on stderr.
fn published_error(failed: PublishFailed) -> BuildAmiDiskError {
    print_removals(&failed.removals, failed.kept);
    BuildAmiDiskError::Publish(Box::new(failed))
}

/// The build record of a version whose AMIs were registered from a disk image (with its OCI
/// image, when the same build made one).
fn disk_ami_record(
    plan: &Plan,
    image: Option<OciImage>,
    ami: &AmiRecord,
    boots: Vec<BootReport>,
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

/// How `bake build` builds a snapshot-strategy recipe.
#[derive(Debug, Clone, Default)]
pub struct SnapshotBuildOptions {
    /// How boot tests run QEMU, over the settings'.
    pub boot_accelerator: Option<Accelerator>,
    /// How the version's provenance is signed; `None`: it is not attested.
    pub signing: Option<SigningOptions>,
}

/// What a snapshot-strategy build gave.
#[derive(Debug)]
pub struct DiskAmiBuilt {
    pub record: BuildRecord,
    pub ami: AmiRecord,
    /// The version's AMI existed already: no disk image was made, nothing was uploaded.
    pub cached: bool,
    /// The digest of the AMIs' signed provenance (none when not attested).
    pub provenance: Option<String>,
}

/// `bake build` for `outputs.ami.strategy: snapshot`: check regions and KMS keys, then (unless
/// the version's AMI exists) provision the root, make the disk image, boot-test it, and publish
/// it (upload, register, distribute); record and attest the result.
pub fn build_ami_disk(
    ctx: &Context,
    recipe: &Recipe,
    shown: &str,
    options: &SnapshotBuildOptions,
    reporter: &mut dyn BuildReporter,
) -> Result<DiskAmiBuilt, BuildAmiDiskError> {
    let store = ctx.store()?;
    let plan = super::plan::plan_recipe(ctx, recipe, shown)?;
    let (Some(_), Ok(Some(spec))) = (
        recipe.outputs.ami.as_ref(),
        AmiSpec::from_recipe(recipe, &plan.version),
    ) else {
        return Err(BuildAmiDiskError::NoRenderableAmi(shown.to_owned()));
    };
    ctx.runtime()?;
    let poll = poll_interval()?;
    let cancel = ctx.cancel();
    // Regions and keys first: a typo should not cost a provisioning run.
    let existing = ctx
        .block_on(async {
            let aws = ctx.aws().await;
            preflight(aws, &spec, None).await?;
            existing_image(aws, &spec).await
        })?
        .map_err(BuildAmiDiskError::Preflight)?;
    let started = std::time::SystemTime::now();
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
    let fetched = if wants_image && !pipeline::is_built(store, &plan.version) {
        super::build_image::fetch_published(ctx, recipe, &plan, store)
    } else {
        None
    };
    if existing.is_none() || wants_image {
        let runner = NamespaceRunner::new().map_err(BuildAmiDiskError::Runner)?;
        let builder = Builder {
            store,
            runner: &runner,
            options: BuildOptions {
                source_date_epoch: plan.source_date_epoch(),
                workers: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
                cancel: Arc::clone(cancel),
                boot_accelerator: options.boot_accelerator.or(ctx.settings.boot_accelerator),
            },
        };
        // With `outputs.oci` too, the image comes first: its steps fill the layer cache, so the
        // disk image's root below is those same layers unpacked (no step runs twice), and both
        // artifacts are the one provisioned root under this one version.
        if wants_image {
            builder
                .build(recipe, &plan, reporter)
                .map_err(|error| BuildAmiDiskError::Build {
                    error,
                    cancelled: cancel.load(Ordering::SeqCst),
                })?;
            let record = store.record(&plan.version).ok().flatten();
            image = record.as_ref().and_then(|r| r.image().cloned());
            image_audit = record.and_then(|r| r.audit);
        }
        if existing.is_none() {
            let dir = store.work_dir("disk").map_err(BuildAmiDiskError::WorkDir)?;
            let out = dir.path().join("disk.raw");
            let built = if image.is_some() {
                build_local_image_of_built_root(
                    &builder,
                    recipe,
                    &plan,
                    &out,
                    image_audit.clone(),
                    reporter,
                )
            } else {
                build_local_image(&builder, recipe, &plan, &out, reporter)
            };
            let local = built.map_err(|error| BuildAmiDiskError::Disk {
                error,
                cancelled: cancel.load(Ordering::SeqCst),
            })?;
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
    let mut publish = PublishOptions::default();
    if let Some(interval) = poll {
        publish.snapshot_wait.interval = interval;
        publish.distribute.wait.interval = interval;
    }
    let result = ctx.block_on(async {
        publish_snapshot_ami(
            ctx.aws().await,
            store,
            &spec,
            disk.as_ref().map(|(path, _)| path.as_path()),
            digest,
            &publish,
            flag_set(Arc::clone(cancel)),
        )
        .await
    })?;
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
    let ami = result.map_err(published_error)?;
    let mut record = disk_ami_record(&plan, image, &ami, boots, audit, started);
    // A rebuild that reuses the AMI uploaded nothing: the record keeps the first run's.
    if let Artifact::DiskAmi { ami: disk } | Artifact::OciImageAndDiskAmi { ami: disk, .. } =
        &mut record.artifact
        && disk.upload.is_none()
    {
        disk.upload = previous_ami.and_then(|a| a.upload.clone());
    }
    if let Err(e) = store.put_record(&record) {
        tracing::warn!("failed to write the build record: {e}");
    }
    let provenance = match &options.signing {
        Some(signing) => attest(ctx, store, &record, signing, fetched.is_some())?,
        None => None,
    };
    Ok(DiskAmiBuilt {
        record,
        ami,
        cached,
        provenance,
    })
}

/// Signs a snapshot build's provenance: the image's (as a plain OCI build signs it), unless the
/// layout has it or the image was fetched (its builder pushed its provenance beside it), then
/// the AMIs', unless every one of them already has it. The image's comes first: the manifest
/// names the AMIs' provenance, the layout the image's. Returns the AMIs' provenance digest.
fn attest(
    ctx: &Context,
    store: &Store,
    record: &BuildRecord,
    signing: &SigningOptions,
    fetched: bool,
) -> Result<Option<String>, BuildAmiDiskError> {
    let version = record.version.to_string();
    if let Some(image) = record.image()
        && !fetched
        && !crate::provenance::image_attested(store, &image.image_digest.to_string())
            .map_err(BuildAmiDiskError::ImageProvenance)?
    {
        super::attest::attest_image(ctx, store, &version, signing)?;
    }
    match crate::provenance::ami::attested(store, &version) {
        Ok(Some(digest)) => Ok(Some(digest)),
        Ok(None) => {
            let manifest = ctx.block_on(super::attest::attest_amis(
                ctx, store, &version, signing, None,
            ))??;
            Ok(manifest.attestations.map(|a| a.provenance.envelope_digest))
        }
        Err(e) => Err(BuildAmiDiskError::AmiProvenance(e)),
    }
}
