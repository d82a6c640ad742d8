//! Distribution: from one source AMI, make sure every region of an [`AmiSpec`] has the AMI
//! (copying it where it is missing), tagged, shared as asked (never public unless asked) and
//! deprecated when asked. Regions run in parallel with a bound; every region's outcome is
//! reported, then the whole fails once if any region failed.
//!
//! Strategy-agnostic: the source AMI can come from a snapshot upload or a builder instance.
//! Every step looks first, so a repeated distribution of a finished AMI makes no mutating call.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_ec2::Client as Ec2;
use aws_sdk_ec2::types::{
    ImageAttributeName, LaunchPermission, LaunchPermissionModifications, PermissionGroup,
    ResourceType, TagSpecification,
};
use futures_util::StreamExt as _;

use super::journal::{Journal, JournalError, ResourceKind};
use super::lookup::{self, ImageInfo};
use super::wait::{Poll, WaitPolicy, wait_for};
use super::{AmiSpec, AwsCallError, RegionImage, RegionSpec, TAG_RUN, sdk_error, sdk_error_code};
use crate::aws::Aws;

/// Regions worked on at once. Each region gets one copy here, so the bound is about API
/// pressure and log readability; the copy limit is [`MAX_COPIES_PER_REGION`].
pub const DEFAULT_REGION_CONCURRENCY: usize = 8;

/// AWS's limit on snapshot copies in flight into one destination region, per account. Copying
/// an AMI copies each of its snapshots, so a copy takes one slot per snapshot from the request
/// until the copied AMI is available.
pub const MAX_COPIES_PER_REGION: usize = 20;

/// The AMI everything is copied from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceImage {
    pub region: String,
    pub image_id: String,
}

/// How to distribute.
#[derive(Debug, Clone)]
pub struct DistributeOptions {
    pub concurrency: usize,
    pub wait: WaitPolicy,
    pub copy_quota: QuotaPolicy,
}

impl Default for DistributeOptions {
    fn default() -> Self {
        DistributeOptions {
            concurrency: DEFAULT_REGION_CONCURRENCY,
            wait: WaitPolicy::IMAGE,
            copy_quota: QuotaPolicy::default(),
        }
    }
}

/// What a copy does when AWS answers `ResourceLimitExceeded` (the region's concurrent copies,
/// this run's and others', are at the account's limit): wait with exponential backoff and full
/// jitter, and ask again, until `give_up_after`. The SDK's retries do not cover it: for AWS it is
/// a quota, not throttling.
#[derive(Debug, Clone, Copy)]
pub struct QuotaPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    pub give_up_after: Duration,
}

impl Default for QuotaPolicy {
    fn default() -> Self {
        // Copies take minutes; a slot frees when one of them completes.
        QuotaPolicy {
            first_delay: Duration::from_secs(15),
            max_delay: Duration::from_secs(120),
            give_up_after: Duration::from_secs(60 * 60),
        }
    }
}

impl QuotaPolicy {
    /// The pause before attempt `attempt` (0-based): a random time between half and all of the
    /// exponential delay, so that many copies waiting for slots do not ask again in step.
    fn pause(&self, attempt: u32) -> Duration {
        let delay = self
            .first_delay
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(self.max_delay);
        delay.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

/// This process's copies in flight per destination region: a gate of [`MAX_COPIES_PER_REGION`]
/// slots each, so that bake's own distributions (several AMIs in one run) never ask for more
/// than AWS allows. Copies made by other processes are met as `ResourceLimitExceeded`.
fn copy_slots(region: &str) -> Arc<tokio::sync::Semaphore> {
    static SLOTS: OnceLock<Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>> = OnceLock::new();
    let mut slots = SLOTS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Arc::clone(
        slots
            .entry(region.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(MAX_COPIES_PER_REGION))),
    )
}

/// Why one region failed.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("failed to look up the AMI of this version in {region}")]
    Lookup {
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error("failed to copy {source_image} from {source_region} to {region}")]
    Copy {
        source_image: String,
        source_region: String,
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error("AMI {image_id} in {region} did not become available")]
    Wait {
        image_id: String,
        region: String,
        #[source]
        source: super::wait::WaitError,
    },
    #[error("failed to {action} AMI {image_id} in {region}")]
    Finish {
        action: &'static str,
        image_id: String,
        region: String,
        #[source]
        source: AwsCallError,
    },
    #[error("failed to journal a copy to {region}")]
    Journal {
        region: String,
        #[source]
        source: JournalError,
    },
}

/// Every region's outcome.
#[derive(Debug)]
pub struct DistributionReport {
    /// In the spec's region order.
    pub outcomes: Vec<(String, Result<RegionImage, RegionError>)>,
}

/// Distribution failed in some regions; the others are listed too.
#[derive(Debug, thiserror::Error)]
#[error("{}", render_failure(.succeeded, .failed))]
pub struct DistributionFailed {
    pub succeeded: Vec<RegionImage>,
    pub failed: Vec<(String, RegionError)>,
}

fn render_failure(succeeded: &[RegionImage], failed: &[(String, RegionError)]) -> String {
    let mut text = format!(
        "distribution failed in {} of {} regions:",
        failed.len(),
        failed.len() + succeeded.len()
    );
    for (region, error) in failed {
        text.push_str(&format!(
            "\n  {region}: {}",
            crate::diagnostic::error_chain(error)
        ));
    }
    for image in succeeded {
        text.push_str(&format!(
            "\n  {}: ok ({}, {})",
            image.region, image.image_id, image.snapshot_id
        ));
    }
    text
}

impl DistributionReport {
    /// The images in region order, or every failure at once.
    pub fn into_result(self) -> Result<Vec<RegionImage>, DistributionFailed> {
        let mut succeeded = Vec::new();
        let mut failed = Vec::new();
        for (region, outcome) in self.outcomes {
            match outcome {
                Ok(image) => succeeded.push(image),
                Err(e) => failed.push((region, e)),
            }
        }
        if failed.is_empty() {
            Ok(succeeded)
        } else {
            Err(DistributionFailed { succeeded, failed })
        }
    }
}

/// Brings every region of `spec` to the AMI of `source` (which must be in `spec`'s first
/// region): copies where missing, then tags, launch permissions and deprecation everywhere.
/// Copies made are journaled (when a journal is given) before they are requested.
///
/// `created_here`: whether the source AMI was made by this run (then it also gets the run tag).
pub async fn distribute(
    aws: &Aws,
    journal: Option<&Journal>,
    spec: &AmiSpec,
    source: &SourceImage,
    created_here: bool,
    options: &DistributeOptions,
) -> DistributionReport {
    let run = journal.map(Journal::run_id);
    let allowances = Allowances::of(aws);
    // Each copy takes a slot per snapshot of the source AMI (asked only when there is a region
    // to copy to).
    let snapshots = if spec.regions.iter().any(|r| r.region != source.region) {
        lookup::image(&aws.ec2(&source.region), &source.image_id)
            .await
            .ok()
            .flatten()
            .map_or(1, |image| {
                image.snapshots.len().clamp(1, MAX_COPIES_PER_REGION)
            })
    } else {
        1
    };
    let outcomes = futures_util::stream::iter(spec.regions.iter().map(|region| {
        let run = run.clone();
        async move {
            let outcome = if region.region == source.region {
                let ec2 = aws.ec2(&region.region);
                let run_tag = if created_here { run.as_deref() } else { None };
                finish(&ec2, spec, region, &source.image_id, run_tag, allowances).await
            } else {
                let copy = Copy {
                    source,
                    snapshots,
                    run: run.as_deref(),
                };
                copy_to(aws, journal, spec, region, &copy, options).await
            };
            if let Err(e) = &outcome {
                tracing::warn!("{}: {}", region.region, crate::diagnostic::error_chain(e));
            }
            (region.region.clone(), outcome)
        }
    }))
    .buffered(options.concurrency.max(1))
    .collect()
    .await;
    DistributionReport { outcomes }
}

/// One copy of the source AMI to a region.
struct Copy<'a> {
    source: &'a SourceImage,
    /// The source AMI's snapshot count: the copy slots it takes.
    snapshots: usize,
    run: Option<&'a str>,
}

async fn copy_to(
    aws: &Aws,
    journal: Option<&Journal>,
    spec: &AmiSpec,
    region: &RegionSpec,
    copy: &Copy<'_>,
    options: &DistributeOptions,
) -> Result<RegionImage, RegionError> {
    let Copy {
        source,
        snapshots,
        run,
    } = *copy;
    let ec2 = aws.ec2(&region.region);
    let existing = lookup::images_of_version(&ec2, &spec.recipe, &spec.version)
        .await
        .map_err(|source| RegionError::Lookup {
            region: region.region.clone(),
            source,
        })?;
    if let Some(image) = existing.first() {
        tracing::info!("{}: reusing {}", region.region, image.image_id);
        wait_available(&ec2, &region.region, &image.image_id, options.wait).await?;
        return finish(
            &ec2,
            spec,
            region,
            &image.image_id,
            None,
            Allowances::of(aws),
        )
        .await;
    }
    let journal_error = |source| RegionError::Journal {
        region: region.region.clone(),
        source,
    };
    let entry = match journal {
        Some(j) => Some(
            j.creating(ResourceKind::Image, &region.region, &region.name)
                .map_err(journal_error)?,
        ),
        None => None,
    };
    let mut tags = region.tags.clone();
    if let Some(run) = run {
        tags.insert(TAG_RUN.to_owned(), run.to_owned());
    }
    let mut request = ec2
        .copy_image()
        .source_image_id(&source.image_id)
        .source_region(&source.region)
        .name(&region.name)
        .set_description(region.description.clone())
        .client_token(spec.client_token("copy-image", &region.region))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .set_tags(Some(lookup::tags(&tags)))
                .build(),
        );
    if spec.encrypted {
        request = request
            .encrypted(true)
            .set_kms_key_id(region.kms_key_id.clone());
    }
    let progress = crate::progress::Task::new(
        format!("copy to {}", region.region),
        None,
        crate::progress::Unit::Count("polls"),
    );
    progress.message("waiting for a copy slot");
    // Held until the copied AMI is available: AWS counts a copy until it completes.
    let _slots = copy_slots(&region.region)
        .acquire_many_owned(snapshots as u32)
        .await
        .expect("the copy gates are never closed");
    let started = Instant::now();
    let mut attempt = 0;
    let out = loop {
        match request.clone().send().await {
            Ok(out) => break out,
            Err(e)
                if sdk_error_code(&e) == Some("ResourceLimitExceeded")
                    && started.elapsed() < options.copy_quota.give_up_after =>
            {
                let pause = options.copy_quota.pause(attempt);
                attempt += 1;
                progress.message("at AWS's concurrent-copy limit: waiting for a slot");
                tracing::info!(
                    "{}: the account's concurrent snapshot copies are at AWS's limit; asking again in {:.1}s",
                    region.region,
                    pause.as_secs_f64()
                );
                tokio::time::sleep(pause).await;
            }
            Err(e) => {
                return Err(RegionError::Copy {
                    source_image: source.image_id.clone(),
                    source_region: source.region.clone(),
                    region: region.region.clone(),
                    source: AwsCallError(sdk_error(&e)),
                });
            }
        }
    };
    let image_id = out.image_id().unwrap_or_default().to_owned();
    progress.message(format!("{image_id}: copying"));
    if let (Some(j), Some(entry)) = (journal, entry) {
        j.created(entry, &image_id).map_err(journal_error)?;
    }
    let info = wait_available(&ec2, &region.region, &image_id, options.wait).await?;
    if let (Some(j), Some(entry)) = (journal, entry) {
        j.image_snapshots(entry, &info.snapshots)
            .map_err(journal_error)?;
    }
    finish(&ec2, spec, region, &image_id, run, Allowances::of(aws)).await
}

async fn wait_available(
    ec2: &Ec2,
    region: &str,
    image_id: &str,
    policy: WaitPolicy,
) -> Result<ImageInfo, RegionError> {
    wait_for(policy, image_id, || async {
        match lookup::image(ec2, image_id).await {
            Ok(Some(info)) => Ok(match info.state.as_str() {
                "available" => Poll::Ready,
                "failed" | "error" | "invalid" | "deregistered" => Poll::Failed(info.state),
                _ => Poll::Pending(info.state),
            }),
            // Just made and not visible yet (eventual consistency).
            Ok(None) => Ok(Poll::Pending("not visible yet".into())),
            Err(e) => Err(e.0),
        }
    })
    .await
    .map_err(|source| RegionError::Wait {
        image_id: image_id.to_owned(),
        region: region.to_owned(),
        source,
    })?;
    lookup::image(ec2, image_id)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| RegionError::Wait {
            image_id: image_id.to_owned(),
            region: region.to_owned(),
            source: super::wait::WaitError::Failed {
                what: image_id.to_owned(),
                state: "gone".into(),
            },
        })
}

/// What distribution lets pass because the user named an emulator that lacks an API
/// (`BAKE_AWS_EMULATOR`). An endpoint override alone allows nothing: behind it may be AWS
/// itself (VPC and FIPS endpoints).
#[derive(Debug, Clone, Copy, Default)]
struct Allowances {
    /// A deprecation time the endpoint cannot set is warned about instead of failing the region.
    no_image_deprecation: bool,
}

impl Allowances {
    fn of(aws: &Aws) -> Self {
        Allowances {
            no_image_deprecation: aws
                .emulator()
                .is_some_and(|e| !e.serves_image_deprecation()),
        }
    }
}

/// Tags, launch permissions and deprecation of one region's AMI, each only if not already so.
async fn finish(
    ec2: &Ec2,
    spec: &AmiSpec,
    region: &RegionSpec,
    image_id: &str,
    run: Option<&str>,
    allowances: Allowances,
) -> Result<RegionImage, RegionError> {
    let fail = |action: &'static str| {
        move |source: AwsCallError| RegionError::Finish {
            action,
            image_id: image_id.to_owned(),
            region: region.region.clone(),
            source,
        }
    };
    let info = lookup::image(ec2, image_id)
        .await
        .map_err(fail("describe"))?
        .ok_or_else(|| fail("describe")(AwsCallError(format!("{image_id} does not exist"))))?;
    let mut wanted = region.tags.clone();
    if let Some(run) = run {
        wanted.insert(TAG_RUN.to_owned(), run.to_owned());
    }
    lookup::ensure_tags(ec2, image_id, &info.tags, &wanted)
        .await
        .map_err(fail("tag"))?;
    for snapshot_id in &info.snapshots {
        let present = lookup::snapshot(ec2, snapshot_id)
            .await
            .map_err(fail("describe the snapshot of"))?
            .map(|s| s.tags)
            .unwrap_or_default();
        lookup::ensure_tags(ec2, snapshot_id, &present, &wanted)
            .await
            .map_err(fail("tag the snapshot of"))?;
    }
    share(ec2, image_id, &spec.sharing)
        .await
        .map_err(fail("set launch permissions of"))?;
    if let Some(after) = spec.deprecate_after
        && info.deprecation_time.is_none()
    {
        let made = info
            .creation_date
            .as_deref()
            .and_then(|d| humantime::parse_rfc3339_weak(d).ok())
            .unwrap_or_else(SystemTime::now);
        match deprecate(ec2, image_id, made + after).await {
            Ok(()) => {}
            // An emulator the user named as lacking EnableImageDeprecation (moto answers an
            // unmodeled 500): the request was made as for AWS; there is nothing to set.
            Err(Unimplemented(_)) if allowances.no_image_deprecation => tracing::warn!(
                "{}: the AWS emulator does not implement EnableImageDeprecation; {image_id} has no deprecation time",
                region.region
            ),
            Err(e) => return Err(fail("set the deprecation time of")(e.into())),
        }
    }
    let snapshot_id = info.snapshots.first().cloned().unwrap_or_default();
    Ok(RegionImage {
        region: region.region.clone(),
        image_id: image_id.to_owned(),
        snapshot_id,
    })
}

/// What a launch permission grants to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Grantee {
    Account(String),
    Organization(String),
    OrganizationalUnit(String),
    Everyone,
}

impl Grantee {
    fn of(permission: &LaunchPermission) -> Option<Grantee> {
        if let Some(id) = permission.user_id() {
            return Some(Grantee::Account(id.to_owned()));
        }
        if let Some(arn) = permission.organization_arn() {
            return Some(Grantee::Organization(arn.to_owned()));
        }
        if let Some(arn) = permission.organizational_unit_arn() {
            return Some(Grantee::OrganizationalUnit(arn.to_owned()));
        }
        (permission.group() == Some(&PermissionGroup::All)).then_some(Grantee::Everyone)
    }

    fn permission(&self) -> LaunchPermission {
        let builder = LaunchPermission::builder();
        match self {
            Grantee::Account(id) => builder.user_id(id),
            Grantee::Organization(arn) => builder.organization_arn(arn),
            Grantee::OrganizationalUnit(arn) => builder.organizational_unit_arn(arn),
            Grantee::Everyone => builder.group(PermissionGroup::All),
        }
        .build()
    }
}

/// Grants what `sharing` asks and takes away public access it does not ask for. Grants to
/// others that are already there are left alone (someone may have shared on purpose).
async fn share(ec2: &Ec2, image_id: &str, sharing: &super::Sharing) -> Result<(), AwsCallError> {
    let (add, remove) = sharing_changes(ec2, image_id, sharing).await?;
    if add.is_empty() && remove.is_empty() {
        return Ok(());
    }
    let mut modifications = LaunchPermissionModifications::builder();
    if !add.is_empty() {
        modifications = modifications.set_add(Some(add));
    }
    if !remove.is_empty() {
        modifications = modifications.set_remove(Some(remove));
    }
    ec2.modify_image_attribute()
        .image_id(image_id)
        .launch_permission(modifications.build())
        .send()
        .await
        .map_err(|e| AwsCallError::from_sdk(&e))?;
    Ok(())
}

/// Whether the AMI's launch permissions already are what `sharing` asks (what `bake plan`
/// shows): distribution would change nothing.
pub async fn is_shared(
    ec2: &Ec2,
    image_id: &str,
    sharing: &super::Sharing,
) -> Result<bool, AwsCallError> {
    let (add, remove) = sharing_changes(ec2, image_id, sharing).await?;
    Ok(add.is_empty() && remove.is_empty())
}

/// The launch permissions to add and to remove for the AMI to be shared as `sharing` asks.
async fn sharing_changes(
    ec2: &Ec2,
    image_id: &str,
    sharing: &super::Sharing,
) -> Result<(Vec<LaunchPermission>, Vec<LaunchPermission>), AwsCallError> {
    let mut wanted: BTreeSet<Grantee> = BTreeSet::new();
    wanted.extend(sharing.accounts.iter().cloned().map(Grantee::Account));
    wanted.extend(
        sharing
            .organizations
            .iter()
            .cloned()
            .map(Grantee::Organization),
    );
    wanted.extend(
        sharing
            .organizational_units
            .iter()
            .cloned()
            .map(Grantee::OrganizationalUnit),
    );
    if sharing.public {
        wanted.insert(Grantee::Everyone);
    }
    let current: BTreeSet<Grantee> = ec2
        .describe_image_attribute()
        .image_id(image_id)
        .attribute(ImageAttributeName::LaunchPermission)
        .send()
        .await
        .map_err(|e| AwsCallError::from_sdk(&e))?
        .launch_permissions()
        .iter()
        .filter_map(Grantee::of)
        .collect();
    let add: Vec<LaunchPermission> = wanted
        .difference(&current)
        .map(Grantee::permission)
        .collect();
    let remove: Vec<LaunchPermission> = if !sharing.public && current.contains(&Grantee::Everyone) {
        vec![Grantee::Everyone.permission()]
    } else {
        Vec::new()
    };
    Ok((add, remove))
}

/// Why setting a deprecation time failed.
#[derive(Debug)]
enum DeprecateError {
    /// A 5xx without an error code: the endpoint does not implement the call (an emulator).
    Unimplemented(AwsCallError),
    Failed(AwsCallError),
}
use DeprecateError::Unimplemented;

impl From<DeprecateError> for AwsCallError {
    fn from(e: DeprecateError) -> Self {
        match e {
            DeprecateError::Unimplemented(e) | DeprecateError::Failed(e) => e,
        }
    }
}

/// EC2 rounds deprecation times to the minute; sending a whole minute keeps the request stable.
async fn deprecate(ec2: &Ec2, image_id: &str, at: SystemTime) -> Result<(), DeprecateError> {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let minute = secs - secs % 60;
    ec2.enable_image_deprecation()
        .image_id(image_id)
        .deprecate_at(aws_sdk_ec2::primitives::DateTime::from_secs(minute as i64))
        .send()
        .await
        .map_err(|e| {
            let unimplemented = e
                .raw_response()
                .is_some_and(|r| r.status().is_server_error())
                && super::sdk_error_code(&e).is_none();
            let error = AwsCallError::from_sdk(&e);
            if unimplemented {
                DeprecateError::Unimplemented(error)
            } else {
                DeprecateError::Failed(error)
            }
        })?;
    Ok(())
}

/// The tags an image gets in a region (exposed for strategies that create images themselves).
pub fn image_tags(region: &RegionSpec, run: Option<&str>) -> BTreeMap<String, String> {
    let mut tags = region.tags.clone();
    if let Some(run) = run {
        tags.insert(TAG_RUN.to_owned(), run.to_owned());
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grantees_round_trip_through_launch_permissions() {
        for grantee in [
            Grantee::Account("111122223333".into()),
            Grantee::Organization("arn:aws:organizations::1:organization/o-1".into()),
            Grantee::OrganizationalUnit("arn:aws:organizations::1:ou/o-1/ou-1".into()),
            Grantee::Everyone,
        ] {
            assert_eq!(Grantee::of(&grantee.permission()), Some(grantee));
        }
    }

    #[test]
    fn a_failure_report_names_every_region() {
        let failed = DistributionFailed {
            succeeded: vec![RegionImage {
                region: "us-east-1".into(),
                image_id: "ami-1".into(),
                snapshot_id: "snap-1".into(),
            }],
            failed: vec![(
                "eu-west-1".into(),
                RegionError::Copy {
                    source_image: "ami-1".into(),
                    source_region: "us-east-1".into(),
                    region: "eu-west-1".into(),
                    source: AwsCallError("InvalidAMIID.NotFound: no such AMI".into()),
                },
            )],
        };
        assert_eq!(
            failed.to_string(),
            "distribution failed in 1 of 2 regions:\n  eu-west-1: failed to copy ami-1 from \
             us-east-1 to eu-west-1: InvalidAMIID.NotFound: no such AMI\n  us-east-1: ok \
             (ami-1, snap-1)"
        );
    }
}
