//! The snapshot strategy from a finished disk image to AMIs in every region:
//!
//! ```text
//! preflight (regions, KMS keys, disk size; no mutating call)
//!   └► look up the version's AMI in the first region ─ found ─┐
//!        └► upload ─► register ─► wait available ─────────────┴► distribute ─► AmiRecord
//!           (from the previous version's snapshot when it can: only changed blocks)
//! ```
//!
//! Every resource is journaled before it is created. On an error, or when `cancel` resolves
//! (Ctrl-C), what this run created is removed again unless asked to keep it.

use std::future::Future;
use std::path::{Path, PathBuf};

use super::cleanup::{Removal, rollback};
use super::distribute::{DistributeOptions, DistributionFailed, SourceImage, distribute};
use super::incremental::{Comparison, NoParent, UploadSummary, find_parent};
use super::journal::{Journal, JournalError, ResourceKind};
use super::register::{RegisterError, RegisterRequest, register};
use super::upload::{Baseline, SnapshotRequest, SnapshotUploader, UploadError};
use super::wait::{Poll, WaitPolicy, wait_for};
use super::{AmiRecord, AmiSpec, AwsCallError, TAG_RUN, lookup, sdk_error, sdk_error_code};
use crate::aws::Aws;
use crate::store::Store;

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub upload_concurrency: usize,
    pub snapshot_wait: WaitPolicy,
    pub distribute: DistributeOptions,
    /// Leave what a failed run made (and its journal, for `bake cleanup`).
    pub keep_on_failure: bool,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            upload_concurrency: super::upload::DEFAULT_CONCURRENCY,
            snapshot_wait: WaitPolicy::SNAPSHOT,
            distribute: DistributeOptions::default(),
            keep_on_failure: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("region `{region}` is not an EC2 region this account can use (checked from {home})")]
    UnknownRegion { region: String, home: String },
    #[error("failed to list the EC2 regions from {region}")]
    Regions {
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error("KMS key `{key}` does not exist in {region}")]
    UnknownKey {
        key: String,
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error("failed to look up KMS key `{key}` in {region}")]
    Key {
        key: String,
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error(
        "the disk image `{}` is {size} bytes, larger than the recipe's {disk_size_gib} GiB root volume",
        path.display()
    )]
    DiskTooSmall {
        path: PathBuf,
        size: u64,
        disk_size_gib: u32,
    },
    #[error("failed to read the disk image `{}`", path.display())]
    DiskImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to look up the AMI of {version} in {region}")]
    Lookup {
        version: String,
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error("failed to journal the run in the store")]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error("AMI {image_id} in {region} did not become available")]
    Wait {
        image_id: String,
        region: String,
        #[source]
        source: super::wait::WaitError,
    },
    #[error(transparent)]
    Distribution(#[from] DistributionFailed),
    #[error(
        "the AMI of {version} does not exist in {region}, and there is no disk image to make it from"
    )]
    NoDiskImage { version: String, region: String },
    #[error("interrupted")]
    Interrupted,
}

impl PublishError {
    /// A mistake in the recipe or the command line, found before anything was made.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            PublishError::UnknownRegion { .. }
                | PublishError::UnknownKey { .. }
                | PublishError::DiskTooSmall { .. }
        )
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            PublishError::UnknownRegion { .. } => Some(
                "check `outputs.ami.regions`; opt-in regions must be enabled for the account"
                    .into(),
            ),
            PublishError::UnknownKey { region, .. } => Some(format!(
                "create the key (or an alias of that name) in {region}, or set `encryption.region_kms_key_ids.{region}`"
            )),
            PublishError::DiskTooSmall { .. } => Some("raise `outputs.ami.disk_size_gib`".into()),
            _ => None,
        }
    }
}

/// A failed publish: the error, and what the rollback did.
#[derive(Debug, thiserror::Error)]
#[error("failed to make the AMI")]
pub struct PublishFailed {
    #[source]
    pub error: PublishError,
    /// What was removed (or could not be); empty when nothing was made or it was kept.
    pub removals: Vec<Removal>,
    /// What was made was kept (asked to): its journal is left for `bake cleanup`.
    pub kept: bool,
}

/// Checks everything that can be checked before uploading: every region exists for the
/// account, every KMS key exists (returned as ARNs: StartSnapshot takes ARNs only), and the disk
/// image fits the volume. Makes no mutating call.
pub async fn preflight(
    aws: &Aws,
    spec: &AmiSpec,
    disk_image: Option<&Path>,
) -> Result<AmiSpec, PublishError> {
    if let Some(disk_image) = disk_image {
        let size = fs_err::metadata(disk_image)
            .map_err(|source| PublishError::DiskImage {
                path: disk_image.to_path_buf(),
                source,
            })?
            .len();
        if size > u64::from(spec.disk_size_gib) * 1024 * 1024 * 1024 {
            return Err(PublishError::DiskTooSmall {
                path: disk_image.to_path_buf(),
                size,
                disk_size_gib: spec.disk_size_gib,
            });
        }
    }
    check_regions(aws, spec).await?;
    let mut resolved = spec.clone();
    for region in &mut resolved.regions {
        let Some(key) = region.kms_key_id.clone() else {
            continue;
        };
        let kms = aws.kms(&region.region);
        match kms.describe_key().key_id(&key).send().await {
            Ok(out) => {
                region.kms_key_id = out
                    .key_metadata()
                    .and_then(|m| m.arn())
                    .map(str::to_owned)
                    .or(Some(key));
            }
            Err(e) if sdk_error_code(&e) == Some("NotFoundException") => {
                return Err(PublishError::UnknownKey {
                    key,
                    region: region.region.clone(),
                    source: AwsCallError(sdk_error(&e)),
                });
            }
            Err(e) => {
                return Err(PublishError::Key {
                    key,
                    region: region.region.clone(),
                    source: AwsCallError(sdk_error(&e)),
                });
            }
        }
    }
    Ok(resolved)
}

async fn check_regions(aws: &Aws, spec: &AmiSpec) -> Result<(), PublishError> {
    let home = spec.home().region.clone();
    let out = aws
        .ec2(&home)
        .describe_regions()
        .all_regions(true)
        .send()
        .await
        .map_err(|e| PublishError::Regions {
            region: home.clone(),
            source: AwsCallError(sdk_error(&e)),
        })?;
    for region in &spec.regions {
        let usable = out.regions().iter().any(|r| {
            r.region_name() == Some(region.region.as_str())
                && r.opt_in_status() != Some("not-opted-in")
        });
        if !usable {
            return Err(PublishError::UnknownRegion {
                region: region.region.clone(),
                home: home.clone(),
            });
        }
    }
    Ok(())
}

/// The version's AMI in the first region, if a finished run made it: then no disk image is
/// needed (a build can skip making one).
pub async fn existing_image(
    aws: &Aws,
    spec: &AmiSpec,
) -> Result<Option<lookup::ImageInfo>, PublishError> {
    let home = &spec.home().region;
    let images = lookup::images_of_version(&aws.ec2(home), &spec.recipe, &spec.version)
        .await
        .map_err(|source| PublishError::Lookup {
            version: spec.version.clone(),
            region: home.clone(),
            source,
        })?;
    Ok(images.into_iter().next())
}

/// Publishes the disk image as the AMI of `spec` in all its regions (without a disk image, only
/// when the first region has the AMI already). `cancel` resolving means stop (Ctrl-C): what was
/// made is removed and the error is [`PublishError::Interrupted`].
pub async fn publish_snapshot_ami(
    aws: &Aws,
    store: &Store,
    spec: &AmiSpec,
    disk_image: Option<&Path>,
    disk_image_digest: Option<String>,
    options: &PublishOptions,
    cancel: impl Future<Output = ()>,
) -> Result<AmiRecord, PublishFailed> {
    let fail = |error| PublishFailed {
        error,
        removals: Vec::new(),
        kept: false,
    };
    let spec = preflight(aws, spec, disk_image).await.map_err(fail)?;
    let existing = existing_image(aws, &spec).await.map_err(fail)?;
    if existing.is_none() && disk_image.is_none() {
        return Err(fail(PublishError::NoDiskImage {
            version: spec.version.clone(),
            region: spec.home().region.clone(),
        }));
    }
    let journal = Journal::begin(store, &spec.recipe, &spec.version).map_err(|e| fail(e.into()))?;
    let work = make(
        aws,
        store,
        &journal,
        &spec,
        disk_image,
        existing.as_ref(),
        options,
    );
    let result = tokio::select! {
        result = work => result,
        () = cancel => Err(PublishError::Interrupted),
    };
    match result {
        Ok((regions, upload)) => {
            if let Err(e) = journal.finish() {
                tracing::warn!("failed to delete the finished run's journal: {e}");
            }
            Ok(AmiRecord {
                disk_image_digest,
                regions,
                upload,
            })
        }
        Err(error) if options.keep_on_failure => {
            tracing::warn!(
                "keeping what this run made; `bake cleanup` removes it (journal `{}`)",
                journal.path().display()
            );
            Err(PublishFailed {
                error,
                removals: Vec::new(),
                kept: true,
            })
        }
        Err(error) => {
            let removals = rollback(aws, journal).await;
            Err(PublishFailed {
                error,
                removals,
                kept: false,
            })
        }
    }
}

async fn make(
    aws: &Aws,
    store: &Store,
    journal: &Journal,
    spec: &AmiSpec,
    disk_image: Option<&Path>,
    existing: Option<&lookup::ImageInfo>,
    options: &PublishOptions,
) -> Result<(Vec<super::RegionImage>, Option<UploadSummary>), PublishError> {
    let home = spec.home();
    let ec2 = aws.ec2(&home.region);
    let (image_id, uploaded) = match existing {
        Some(image) => {
            tracing::info!(
                "{}: the AMI of this version exists: {}",
                home.region,
                image.image_id
            );
            (image.image_id.clone(), None)
        }
        None => {
            let disk_image = disk_image.ok_or_else(|| PublishError::NoDiskImage {
                version: spec.version.clone(),
                region: home.region.clone(),
            })?;
            let summary = upload(aws, store, journal, spec, disk_image, options).await?;
            let snapshot_id = summary.snapshot_id.clone();
            let mut tags = home.tags.clone();
            tags.insert(TAG_RUN.to_owned(), journal.run_id());
            let entry = journal.creating(ResourceKind::Image, &home.region, &home.name)?;
            let image_id = register(
                &ec2,
                &home.region,
                &RegisterRequest {
                    name: home.name.clone(),
                    description: home.description.clone(),
                    architecture: spec.architecture.clone(),
                    boot_mode: spec.boot_mode.clone(),
                    snapshot_id: snapshot_id.clone(),
                    volume_size_gib: spec.disk_size_gib,
                    volume_type: spec.volume_type.clone(),
                    encrypted: spec.encrypted,
                    tags,
                },
            )
            .await?;
            journal.created(entry, &image_id)?;
            let info = wait_image(&ec2, &home.region, &image_id, options.distribute.wait).await?;
            let mut snapshots = vec![snapshot_id.clone()];
            snapshots.extend(info.snapshots);
            journal.image_snapshots(entry, &snapshots)?;
            (image_id, Some(summary))
        }
    };
    let source = SourceImage {
        region: home.region.clone(),
        image_id,
    };
    let mut regions = distribute(
        aws,
        Some(journal),
        spec,
        &source,
        uploaded.is_some(),
        &options.distribute,
    )
    .await
    .into_result()?;
    if let (Some(summary), Some(first)) = (&uploaded, regions.first_mut()) {
        // The snapshot the home AMI was registered from (emulators may report another).
        first.snapshot_id = summary.snapshot_id.clone();
    }
    Ok((regions, uploaded))
}

/// Uploads the disk image into a new snapshot in the first region: from the previous
/// version's snapshot when there is a usable one (only the blocks that differ), else in full.
async fn upload(
    aws: &Aws,
    store: &Store,
    journal: &Journal,
    spec: &AmiSpec,
    disk_image: &Path,
    options: &PublishOptions,
) -> Result<UploadSummary, PublishError> {
    let home = spec.home();
    let mut uploader =
        SnapshotUploader::new(aws.ebs(&home.region), aws.ec2(&home.region), &home.region);
    uploader.concurrency = options.upload_concurrency;
    uploader.wait = options.snapshot_wait;
    let (parent, baseline, comparison, reason) = match find_parent(aws, store, spec).await {
        Ok(parent) => match &parent.disk_image {
            Some(image) => {
                let baseline = Baseline::Image(image.clone());
                (Some(parent), baseline, Some(Comparison::DiskImage), None)
            }
            None => match uploader.block_checksums(&parent.snapshot_id).await {
                Ok(sums) => (
                    Some(parent),
                    Baseline::Checksums(sums),
                    Some(Comparison::ParentChecksums),
                    None,
                ),
                Err(e) => {
                    let reason = crate::diagnostic::error_chain(&e);
                    (
                        None,
                        Baseline::Empty,
                        None,
                        Some(NoParent::Unusable(reason)),
                    )
                }
            },
        },
        Err(no_parent) => (None, Baseline::Empty, None, Some(no_parent)),
    };
    match (&parent, &reason) {
        (Some(parent), _) => tracing::info!(
            "{}: starting from {} (version {}), writing only the blocks that differ from its {}",
            home.region,
            parent.snapshot_id,
            parent.version,
            if parent.disk_image.is_some() {
                "disk image"
            } else {
                "block checksums"
            }
        ),
        (None, Some(NoParent::Unusable(why))) => {
            tracing::warn!("{}: uploading in full: {why}", home.region);
        }
        (None, Some(NoParent::First(why))) => {
            tracing::info!("{}: uploading in full: {why}", home.region);
        }
        (None, None) => {}
    }
    let mut tags = home.tags.clone();
    tags.insert(TAG_RUN.to_owned(), journal.run_id());
    let client_token = spec.client_token("start-snapshot", &home.region);
    let volume = u64::from(spec.disk_size_gib);
    let entry = journal.creating(ResourceKind::Snapshot, &home.region, &client_token)?;
    let snapshot_id = uploader
        .start(&SnapshotRequest {
            volume_size_gib: volume,
            description: format!("{} {} root volume (bake)", spec.recipe, spec.version),
            tags,
            encrypted: spec.encrypted,
            kms_key_arn: home.kms_key_id.clone(),
            client_token,
            parent_snapshot_id: parent.as_ref().map(|p| p.snapshot_id.clone()),
        })
        .await?;
    journal.created(entry, &snapshot_id)?;
    tracing::info!("{}: uploading into {snapshot_id}", home.region);
    let written = uploader
        .put_changed_blocks(&snapshot_id, disk_image, volume, baseline)
        .await?;
    uploader.complete(&snapshot_id, &written).await?;
    uploader.wait_completed(&snapshot_id).await?;
    tracing::info!(
        "{}: {snapshot_id} completed ({} blocks written, {} of them zeros)",
        home.region,
        written.changed_blocks,
        written.zero_blocks
    );
    Ok(UploadSummary {
        region: home.region.clone(),
        snapshot_id,
        parent_snapshot_id: parent.as_ref().map(|p| p.snapshot_id.clone()),
        parent_version: parent.map(|p| p.version),
        compared_with: comparison,
        changed_blocks: written.changed_blocks,
        zero_blocks: written.zero_blocks,
        full_upload_reason: reason.map(|r| r.reason().to_owned()),
    })
}

async fn wait_image(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    image_id: &str,
    policy: WaitPolicy,
) -> Result<lookup::ImageInfo, PublishError> {
    let wait_error = |source| PublishError::Wait {
        image_id: image_id.to_owned(),
        region: region.to_owned(),
        source,
    };
    wait_for(policy, image_id, || async {
        match lookup::image(ec2, image_id).await {
            Ok(Some(info)) if info.state == "available" => Ok(Poll::Ready),
            Ok(Some(info)) if matches!(info.state.as_str(), "failed" | "error" | "invalid") => {
                Ok(Poll::Failed(info.state))
            }
            Ok(Some(info)) => Ok(Poll::Pending(info.state)),
            Ok(None) => Ok(Poll::Pending("not visible yet".into())),
            Err(e) => Err(e.0),
        }
    })
    .await
    .map_err(wait_error)?;
    lookup::image(ec2, image_id)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            wait_error(super::wait::WaitError::Failed {
                what: image_id.to_owned(),
                state: "gone".into(),
            })
        })
}
