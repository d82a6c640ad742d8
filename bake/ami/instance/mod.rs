//! The builder-instance strategy: an AMI from a vendor image (Amazon Linux, Ubuntu, RHEL) that
//! bake cannot bootstrap locally, made the way Packer's amazon-ebs makes it, without leaving
//! anything behind.
//!
//! ```text
//! preflight (source AMI exists, subnet/VPC, caller CIDR, templates)   nothing created yet
//!   │  journal: every resource is written to the store before it is created
//!   ▼
//! key pair (ed25519, imported) ─► security group (SSH from one CIDR) ─► RunInstances
//!   (IMDSv2 required, hop limit 1, encrypted root volume, tags on instance and volumes,
//!    ClientToken from the build id)
//!   ▼
//! wait running ─► wait for SSH (bounded; the timeout shows the console) ─► host key pinned
//!   ▼
//! provisioners + hardening + tests over SSH ─► compliance gate on the builder (`audit:`;
//! this host's oscap and the data stream uploaded, removed again) ─► stop ─► CreateImage
//! (tags on AMI and snapshots, `bake:state=building`) ─► wait available (consecutive
//! successes) ─► `available`
//!   ▼
//! cleanup, always (success, error, Ctrl-C): terminate + wait, key pair, security group, and
//! a half-made AMI with its snapshots; failures reported next to the original error
//!   ▼
//! distribution (shared with the snapshot strategy, [`crate::ami::distribute`]): copies,
//! sharing, KMS, deprecation; idempotent by `bake:version`
//! ```
//!
//! The journal is the shared one ([`crate::ami::journal`]); the run id is the `bake:build-id`
//! (and `bake:run`) tag value. After a SIGKILL, `bake cleanup` ([`crate::ami::cleanup`]) finds
//! the same resources from the journal and the tags.

mod audit;
pub mod cleanup;
mod provision;
pub mod source;
pub mod wait;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, HttpTokensState, IamInstanceProfileSpecification,
    ImageState, InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceStateName,
    IpPermission, IpRange, ResourceType, ShutdownBehavior, Tag, TagSpecification, VolumeType,
};
use base64::Engine;
use russh::keys::PrivateKey;
use serde::{Deserialize, Serialize};

use crate::ami::distribute::{DistributeOptions, SourceImage};
use crate::ami::journal::{EntryId, Journal, JournalError, ResourceKind};
use crate::ami::{AmiSpec, RegionImage, TAG_RECIPE, TAG_RUN, TAG_VERSION};
use crate::aws::Aws;
use crate::build::pipeline::BuildReporter;
use crate::plan::Plan;
use crate::recipe::template::{Context, Renderer, Secrets, render_map};
use crate::recipe::{AmiOutput, AmiStrategy, InstanceSettings, Recipe, RecipeError};
use crate::ssh::{BastionTarget, HostKeyPolicy, Session, SshError, SshTarget};
use crate::store::Store;
use cleanup::{CleanupFailure, Found};
pub use source::{SourceAmi, SourceAmiError};
use wait::WaitPolicy;

/// The tag naming the build (the journal's run id) on every temporary resource.
pub const TAG_BUILD_ID: &str = "bake:build-id";
/// Seconds since the epoch when the resource was made; `bake cleanup --older-than` reads it
/// for resources no journal names (security groups and key pairs have no creation time of
/// their own).
pub const TAG_CREATED: &str = "bake:created";
/// On AMIs the builder makes: `building` until the image is complete, then `available`. A
/// janitor only ever deregisters `building` images.
pub const TAG_STATE: &str = "bake:state";

/// How long bake waits for SSH on a new builder unless told otherwise: first boots of vendor
/// images with cloud-init take one to three minutes; five covers slow instance types.
pub const DEFAULT_SSH_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Pause between SSH attempts while a builder boots.
const SSH_RETRY: Duration = Duration::from_secs(2);

/// Console lines shown when SSH never answers.
const CONSOLE_TAIL: usize = 30;

/// Where bake asks for the caller's public address when the recipe gives no `ssh_cidr`.
const CHECKIP_URL: &str = "https://checkip.amazonaws.com";

/// Settings of one instance build (from the command line and the environment).
#[derive(Clone)]
pub struct InstanceOptions {
    pub ssh_timeout: Duration,
    /// Polling for instance states and the image (the image waiter uses two consecutive
    /// successes whatever this says).
    pub poll: WaitPolicy,
    /// Set by Ctrl-C: the build stops at the next check and removes what it made.
    pub cancel: Arc<AtomicBool>,
    /// The key for a bastion, when the recipe names one.
    pub bastion_key: Option<Arc<PrivateKey>>,
}

impl InstanceOptions {
    pub fn default_poll() -> WaitPolicy {
        WaitPolicy {
            interval: Duration::from_secs(5),
            // Half an hour: large images take long to snapshot.
            max_attempts: 360,
            consecutive: 1,
        }
    }
}

/// What an instance build produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AmiBuildOutput {
    pub name: String,
    pub version: crate::id::Version,
    pub region: String,
    pub image_id: String,
    pub image_name: String,
    pub source_ami: String,
    pub build_id: Option<String>,
    /// The builder's SSH host key fingerprint, as pinned during the build.
    pub host_key: Option<String>,
    /// The version's AMI already existed: no builder ran.
    pub cached: bool,
    /// Every region's AMI, the build region first.
    pub regions: Vec<RegionImage>,
    /// The compliance gate's result on the builder (kept in the build record, not printed).
    #[serde(skip)]
    pub audit: Option<crate::audit::AuditRecord>,
}

/// An AWS error's code and message, as the cause of a bake error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AwsDetail(pub String);

fn detail<E: ProvideErrorMetadata + std::fmt::Debug>(e: &E) -> AwsDetail {
    AwsDetail(match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => format!("{e:?}"),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("recipe `{0}` has no `outputs.ami` with `strategy: instance`")]
    NotInstanceStrategy(String),
    #[error(transparent)]
    Source(#[from] SourceAmiError),
    #[error("subnet `{subnet}` does not exist in {region}")]
    UnknownSubnet { subnet: String, region: String },
    #[error("subnet `{subnet}` is in {actual}, not in the recipe's `vpc_id` {vpc}")]
    SubnetNotInVpc {
        subnet: String,
        vpc: String,
        actual: String,
    },
    #[error("VPC `{vpc}` has no subnet in {region}")]
    NoSubnet { vpc: String, region: String },
    #[error("{region} has no default VPC")]
    NoDefaultVpc { region: String },
    #[error(
        "subnet `{subnet}` in {region} gives instances no public address, so bake could not reach the builder"
    )]
    UnreachableSubnet { subnet: String, region: String },
    #[error("failed to find this machine's public address at {CHECKIP_URL}")]
    CallerAddress {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "a bastion needs `outputs.ami.instance.ssh_cidr`: the builder is reached from the bastion, not from here"
    )]
    BastionNeedsCidr,
    #[error("failed to {action} in {region}")]
    Aws {
        action: String,
        region: String,
        #[source]
        source: AwsDetail,
    },
    #[error("failed to write the build journal")]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Distribution(#[from] crate::ami::distribute::DistributionFailed),
    #[error(transparent)]
    Render(#[from] RecipeError),
    #[error("failed to read `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hardening profile `{0}` is unknown to this bake")]
    UnknownProfile(String),
    #[error(transparent)]
    Ssh(SshError),
    #[error(
        "SSH on builder {instance} ({target}) did not answer within {}s; last error: {last_error}\n{console}",
        timeout.as_secs()
    )]
    SshTimeout {
        instance: String,
        target: String,
        timeout: Duration,
        last_error: String,
        console: String,
    },
    #[error(
        "step `{step}` failed with exit code {code} (expected {expected}){}",
        show_lines(last_lines)
    )]
    StepFailed {
        step: String,
        code: u32,
        expected: i32,
        last_lines: Vec<String>,
    },
    #[error("test `{name}` failed: {reason}")]
    Test { name: String, reason: String },
    #[error("builder did not come back after step `{step}`: {last_error}")]
    RebootTimeout { step: String, last_error: String },
    #[error("failed waiting for {what} in {region}: {reason}")]
    Wait {
        what: String,
        region: String,
        reason: String,
    },
    #[error("AMI {image_id} in {region} failed: {reason}")]
    ImageFailed {
        image_id: String,
        region: String,
        reason: String,
    },
    #[error("the build was interrupted")]
    Interrupted,
    #[error("AMI {image_id} was made, but the builder's temporary resources were not all removed")]
    CleanupAfterSuccess { image_id: String },
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(
        "the compliance scan's directory `{dir}` could not be removed from builder {instance}, so no image is made from it: {reason}"
    )]
    ScanNotRemoved {
        dir: String,
        instance: String,
        reason: String,
    },
}

fn show_lines(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last output:\n  {}", lines.join("\n  "))
    }
}

impl InstanceError {
    pub fn hint(&self) -> Option<String> {
        match self {
            InstanceError::Source(e) => e.hint(),
            InstanceError::UnknownSubnet { .. } => {
                Some("check `outputs.ami.instance.subnet_id` and the region (the first of `outputs.ami.regions`)".into())
            }
            InstanceError::UnreachableSubnet { .. } => Some(
                "use a subnet that maps public IPs, or set `ssh_host` (a port forward) or a `bastion`".into(),
            ),
            InstanceError::NoDefaultVpc { .. } => {
                Some("set `outputs.ami.instance.subnet_id` (or `vpc_id`)".into())
            }
            InstanceError::CallerAddress { .. } => Some(
                "set `outputs.ami.instance.ssh_cidr` to the address range bake connects from".into(),
            ),
            InstanceError::SshTimeout { .. } => Some(
                "check the security group CIDR (`ssh_cidr`), `ssh_username`, and the console output above".into(),
            ),
            InstanceError::CleanupAfterSuccess { .. } => {
                Some("run `bake cleanup` to retry the removal".into())
            }
            InstanceError::Audit(e) => e.hint(),
            _ => None,
        }
    }

    pub fn is_interrupted(&self) -> bool {
        matches!(self, InstanceError::Interrupted)
    }

    /// Whether the recipe (not the machine or AWS) is at fault.
    pub fn is_user_error(&self) -> bool {
        match self {
            InstanceError::Source(e) => e.is_user_error(),
            InstanceError::NotInstanceStrategy(_)
            | InstanceError::UnknownSubnet { .. }
            | InstanceError::SubnetNotInVpc { .. }
            | InstanceError::NoSubnet { .. }
            | InstanceError::NoDefaultVpc { .. }
            | InstanceError::UnreachableSubnet { .. }
            | InstanceError::BastionNeedsCidr
            | InstanceError::Render(_)
            | InstanceError::UnknownProfile(_)
            | InstanceError::StepFailed { .. }
            | InstanceError::Test { .. } => true,
            InstanceError::Audit(e) => matches!(
                e,
                crate::audit::AuditError::Gate(_)
                    | crate::audit::AuditError::NoProfile { .. }
                    | crate::audit::AuditError::NothingEvaluated { .. }
                    | crate::audit::AuditError::Architecture { .. }
                    | crate::audit::AuditError::Datastream { .. }
            ),
            _ => false,
        }
    }
}

/// A failed build: the error that stopped it, and anything its cleanup could not remove.
#[derive(Debug)]
pub struct InstanceFailure {
    pub error: InstanceError,
    pub cleanup: Vec<CleanupFailure>,
    /// Whether anything was created in AWS before the error.
    pub created_anything: bool,
}

/// The network a builder goes into.
#[derive(Debug, Clone)]
struct Network {
    vpc_id: String,
    subnet_id: String,
}

/// The templated fields, rendered for the build region before anything is created.
struct Rendered {
    image_name: String,
    description: Option<String>,
    tags: Vec<(String, String)>,
    user_data: Option<String>,
}

/// Runs instance builds in one region.
pub struct InstanceBuilder<'a> {
    /// For the build region's client and distribution to the others.
    pub aws: &'a Aws,
    pub ec2: &'a aws_sdk_ec2::Client,
    pub store: &'a Store,
    pub options: InstanceOptions,
}

/// What the build has created so far (ids as AWS returned them), with their journal entries.
#[derive(Default)]
struct Created {
    resources: Vec<(EntryId, Found)>,
    /// The AMI, once made (kept on success: its entry leaves the journal).
    image: Option<EntryId>,
}

impl InstanceBuilder<'_> {
    fn cancelled(&self) -> bool {
        self.options.cancel.load(Ordering::SeqCst)
    }

    fn check_cancel(&self) -> Result<(), InstanceError> {
        if self.cancelled() {
            Err(InstanceError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Builds `recipe` (planned as `plan`, its source pinned as `source`).
    pub async fn build(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        source: &SourceAmi,
        reporter: &mut dyn BuildReporter,
    ) -> Result<AmiBuildOutput, InstanceFailure> {
        let not_created = |error| InstanceFailure {
            error,
            cleanup: Vec::new(),
            created_anything: false,
        };
        let ami = recipe
            .outputs
            .ami
            .as_ref()
            .filter(|a| a.strategy == AmiStrategy::Instance)
            .ok_or_else(|| not_created(InstanceError::NotInstanceStrategy(recipe.name.clone())))?;
        let settings = ami
            .instance
            .as_ref()
            .ok_or_else(|| not_created(InstanceError::NotInstanceStrategy(recipe.name.clone())))?;
        let region = ami.regions[0].clone();
        let started = Instant::now();

        // Preflight: everything that can be wrong is found before anything is created.
        let preflight = async {
            let spec = AmiSpec::from_recipe(recipe, &plan.version)?
                .ok_or_else(|| InstanceError::NotInstanceStrategy(recipe.name.clone()))?;
            if let Some(existing) = self.existing(plan, &region).await? {
                return Ok(Err((existing, spec)));
            }
            let source = source::describe_one(self.ec2, &region, &source.image_id).await?;
            let network = self.network(settings, &region).await?;
            let cidr = self.caller_cidr(settings).await?;
            let rendered = render(recipe, plan, ami, settings, &region)?;
            let gate = self.prepare_gate(recipe, &source, reporter).await?;
            Ok(Ok((source, network, cidr, rendered, spec, gate)))
        };
        let (source, network, cidr, rendered, spec, gate) =
            match preflight.await.map_err(not_created)? {
                Ok(ready) => ready,
                Err((mut existing, spec)) => {
                    reporter.message(&format!(
                        "AMI {} already has version {}: no builder needed",
                        existing.image_id, plan.version
                    ));
                    // Distribution looks before it acts: a finished one makes no mutating call.
                    existing.regions = self
                        .distribute(None, &spec, &existing, false)
                        .await
                        .map_err(not_created)?;
                    // A store that never saw this version (another machine built it) gets its
                    // record, so publish, attest and the manifest find the AMI here too.
                    if matches!(self.store.record(&plan.version), Ok(None)) {
                        self.write_record(plan, source, &existing, started);
                    }
                    return Ok(existing);
                }
            };
        self.check_cancel().map_err(not_created)?;

        let journal = Journal::begin(self.store, &recipe.name, &plan.version)
            .map_err(|e| not_created(e.into()))?;
        let build_id = journal.run_id();
        reporter.message(&format!(
            "build {build_id}: builder in {region} from {}",
            source.image_id
        ));
        let mut created = Created::default();
        let ctx = BuildCtx {
            recipe,
            plan,
            ami,
            settings,
            region: &region,
            build_id: &build_id,
            source: &source,
            network: &network,
            cidr: &cidr,
            rendered: &rendered,
            gate: gate.as_ref(),
        };
        let result = self.run(&ctx, &journal, &mut created, reporter).await;

        // Cleanup runs whatever happened; a finished AMI is no longer `building`, so it stays.
        reporter.message(&format!("build {build_id}: removing temporary resources"));
        let mut cleanup = self.cleanup(&region, &build_id, &journal, &created).await;
        let result = match result {
            Ok(mut output) if cleanup.is_empty() => {
                // The AMI is the product now: it leaves the journal, so no rollback takes it.
                if let Some(entry) = created.image
                    && let Err(e) = journal.removed(entry)
                {
                    tracing::warn!("failed to update the journal: {e}");
                }
                reporter.message(&format!("distributing {}", output.image_id));
                match self.distribute(Some(&journal), &spec, &output, true).await {
                    Ok(regions) => {
                        output.regions = regions;
                        Ok(output)
                    }
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match (&result, cleanup.is_empty()) {
            (Ok(_), true) => {
                if let Err(e) = journal.finish() {
                    tracing::warn!("failed to close the build journal: {e}");
                }
            }
            // The AMI is made, but temporary resources remain: the journal stays for
            // `bake cleanup`, without the AMI.
            (Ok(_), false) => {
                if let Some(entry) = created.image {
                    let _ = journal.removed(entry);
                }
                drop(journal);
            }
            // Anything still live in the journal (copies, an image cleanup missed) goes too;
            // with failures the journal stays for `bake cleanup`.
            (Err(_), true) => {
                for removal in crate::ami::cleanup::rollback(self.aws, journal).await {
                    if removal.failed() {
                        cleanup.push(CleanupFailure {
                            kind: removal.kind,
                            region: removal.region,
                            id: removal.id,
                            reason: removal.error.unwrap_or_default(),
                        });
                    }
                }
            }
            (Err(_), false) => drop(journal),
        }
        match result {
            Ok(mut output) if cleanup.is_empty() => {
                output.build_id = Some(build_id);
                self.write_record(plan, &source, &output, started);
                Ok(output)
            }
            Ok(output) => Err(InstanceFailure {
                error: InstanceError::CleanupAfterSuccess {
                    image_id: output.image_id,
                },
                cleanup,
                created_anything: true,
            }),
            Err(error) => Err(InstanceFailure {
                error,
                cleanup,
                created_anything: true,
            }),
        }
    }

    /// The compliance gate's scanner and data stream, checked and cached on this host before
    /// anything is created: a builder of another architecture, a missing `oscap` or a profile
    /// the data stream lacks fails here, not after a builder was launched.
    async fn prepare_gate(
        &self,
        recipe: &Recipe,
        source: &SourceAmi,
        reporter: &mut dyn BuildReporter,
    ) -> Result<Option<crate::audit::remote::Prepared>, InstanceError> {
        let Some(audit) = recipe.audit.clone() else {
            return Ok(None);
        };
        let builder = source
            .architecture
            .clone()
            .or_else(|| match &recipe.base {
                crate::recipe::Base::Ami(filter) => Some(filter.architecture.ec2().to_owned()),
                _ => None,
            })
            .unwrap_or_else(|| crate::audit::remote::host_architecture().to_owned());
        crate::audit::remote::check_architecture(&builder)?;
        reporter.message("audit: preparing the scanner and data stream for the builder");
        let dirs = crate::audit::AuditDirs {
            cache: self.store.root().join("cache").join("scap"),
            work: self.store.root().join("work"),
        };
        // Hashing and packing some hundred megabytes (cached after the first build).
        let prepared =
            tokio::task::spawn_blocking(move || crate::audit::remote::Prepared::new(&audit, &dirs))
                .await
                .map_err(|e| InstanceError::Io {
                    path: self.store.root().join("cache").join("scap"),
                    source: std::io::Error::other(e.to_string()),
                })??;
        Ok(Some(prepared))
    }

    /// Keeps the build in the store's record of the version (a failure to write it is only
    /// logged: the AMI exists, and a rebuild finds it by its tag and writes the record).
    fn write_record(
        &self,
        plan: &Plan,
        source: &SourceAmi,
        output: &AmiBuildOutput,
        started: Instant,
    ) {
        let mut record = crate::store::BuildRecord::new(
            &plan.name,
            &plan.version,
            &plan.recipe,
            &plan.inputs,
            crate::store::Artifact::InstanceAmi {
                ami: crate::store::InstanceAmi {
                    source: source.clone(),
                    image_name: output.image_name.clone(),
                    build_id: output.build_id.clone(),
                    host_key: output.host_key.clone(),
                    regions: output.regions.clone(),
                },
            },
        );
        record.audit = output.audit.clone();
        record.started =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now() - started.elapsed())
                .to_string();
        record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Err(e) = self.store.put_record(&record) {
            tracing::warn!("failed to write the build record: {e}");
        }
    }

    /// An available AMI of this version made by an earlier run (idempotency by `bake:version`).
    async fn existing(
        &self,
        plan: &Plan,
        region: &str,
    ) -> Result<Option<AmiBuildOutput>, InstanceError> {
        let out = self
            .ec2
            .describe_images()
            .owners("self")
            .filters(tag_filter(TAG_VERSION, &plan.version))
            .filters(tag_filter(TAG_STATE, "available"))
            .send()
            .await
            .map_err(aws("look for an AMI of this version", region))?;
        let mut images: Vec<_> = out
            .images()
            .iter()
            .filter(|i| i.state() == Some(&ImageState::Available))
            .collect();
        images.sort_by(|a, b| a.image_id().cmp(&b.image_id()));
        Ok(images.first().map(|image| AmiBuildOutput {
            name: plan.name.clone(),
            version: plan.version.clone(),
            region: region.to_owned(),
            image_id: image.image_id().unwrap_or_default().to_owned(),
            image_name: image.name().unwrap_or_default().to_owned(),
            source_ami: image
                .tags()
                .iter()
                .find(|t| t.key() == Some("bake:source-ami"))
                .and_then(|t| t.value())
                .unwrap_or_default()
                .to_owned(),
            build_id: image
                .tags()
                .iter()
                .find(|t| t.key() == Some(TAG_BUILD_ID))
                .and_then(|t| t.value())
                .map(str::to_owned),
            host_key: None,
            cached: true,
            regions: Vec::new(),
            audit: None,
        }))
    }

    /// Resolves the subnet and VPC the builder goes into, and checks bake can reach it.
    async fn network(
        &self,
        settings: &InstanceSettings,
        region: &str,
    ) -> Result<Network, InstanceError> {
        let reachable_otherwise = settings.ssh_host.is_some() || settings.bastion.is_some();
        let subnet = match (&settings.subnet_id, &settings.vpc_id) {
            (Some(subnet_id), vpc) => {
                let out = match self
                    .ec2
                    .describe_subnets()
                    .subnet_ids(subnet_id)
                    .send()
                    .await
                {
                    Ok(out) => out,
                    Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidSubnetID")) => {
                        return Err(InstanceError::UnknownSubnet {
                            subnet: subnet_id.clone(),
                            region: region.to_owned(),
                        });
                    }
                    Err(e) => return Err(aws("look up the subnet", region)(e)),
                };
                let subnet =
                    out.subnets()
                        .first()
                        .cloned()
                        .ok_or_else(|| InstanceError::UnknownSubnet {
                            subnet: subnet_id.clone(),
                            region: region.to_owned(),
                        })?;
                if let Some(vpc) = vpc
                    && subnet.vpc_id() != Some(vpc.as_str())
                {
                    return Err(InstanceError::SubnetNotInVpc {
                        subnet: subnet_id.clone(),
                        vpc: vpc.clone(),
                        actual: subnet.vpc_id().unwrap_or("no VPC").to_owned(),
                    });
                }
                subnet
            }
            (None, vpc) => {
                let vpc_id = match vpc {
                    Some(vpc) => vpc.clone(),
                    None => {
                        let out = self
                            .ec2
                            .describe_vpcs()
                            .filters(Filter::builder().name("is-default").values("true").build())
                            .send()
                            .await
                            .map_err(aws("find the default VPC", region))?;
                        out.vpcs()
                            .first()
                            .and_then(|v| v.vpc_id())
                            .map(str::to_owned)
                            .ok_or_else(|| InstanceError::NoDefaultVpc {
                                region: region.to_owned(),
                            })?
                    }
                };
                let out = self
                    .ec2
                    .describe_subnets()
                    .filters(Filter::builder().name("vpc-id").values(&vpc_id).build())
                    .send()
                    .await
                    .map_err(aws("list the VPC's subnets", region))?;
                let mut subnets = out.subnets().to_vec();
                // Public subnets first, then by zone and id: the same choice every run.
                subnets.sort_by(|a, b| {
                    b.map_public_ip_on_launch()
                        .cmp(&a.map_public_ip_on_launch())
                        .then_with(|| a.availability_zone().cmp(&b.availability_zone()))
                        .then_with(|| a.subnet_id().cmp(&b.subnet_id()))
                });
                subnets
                    .into_iter()
                    .next()
                    .ok_or_else(|| InstanceError::NoSubnet {
                        vpc: vpc_id.clone(),
                        region: region.to_owned(),
                    })?
            }
        };
        let subnet_id = subnet.subnet_id().unwrap_or_default().to_owned();
        if subnet.map_public_ip_on_launch() != Some(true) && !reachable_otherwise {
            return Err(InstanceError::UnreachableSubnet {
                subnet: subnet_id,
                region: region.to_owned(),
            });
        }
        Ok(Network {
            vpc_id: subnet.vpc_id().unwrap_or_default().to_owned(),
            subnet_id,
        })
    }

    /// The CIDR the security group admits SSH from.
    async fn caller_cidr(&self, settings: &InstanceSettings) -> Result<String, InstanceError> {
        if let Some(cidr) = &settings.ssh_cidr {
            return Ok(cidr.clone());
        }
        if settings.bastion.is_some() {
            return Err(InstanceError::BastionNeedsCidr);
        }
        let boxed = |e: Box<dyn std::error::Error + Send + Sync>| InstanceError::CallerAddress {
            source: e,
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| boxed(Box::new(e)))?;
        let text = client
            .get(CHECKIP_URL)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| boxed(Box::new(e)))?
            .text()
            .await
            .map_err(|e| boxed(Box::new(e)))?;
        let ip: std::net::Ipv4Addr = text.trim().parse().map_err(|e| boxed(Box::new(e)))?;
        Ok(format!("{ip}/32"))
    }

    /// Everything from the key pair to the available AMI. Whatever it creates is recorded in
    /// `journal` first and in `created` after.
    async fn run(
        &self,
        ctx: &BuildCtx<'_>,
        journal: &Journal,
        created: &mut Created,
        reporter: &mut dyn BuildReporter,
    ) -> Result<AmiBuildOutput, InstanceError> {
        let region = ctx.region;
        let tags = ctx.bake_tags();
        let name = format!("bake-{}", ctx.build_id);

        // Key pair: generated here, only the public half goes to AWS.
        let key = Arc::new(crate::ssh::generate_key().map_err(InstanceError::Ssh)?);
        let public = key.public_key().to_openssh().map_err(|e| {
            InstanceError::Ssh(SshError::Local {
                path: PathBuf::from("<ed25519 key>"),
                source: std::io::Error::other(e.to_string()),
            })
        })?;
        let entry = journal.creating(ResourceKind::KeyPair, region, &name)?;
        let out = self
            .ec2
            .import_key_pair()
            .key_name(&name)
            .public_key_material(aws_sdk_ec2::primitives::Blob::new(public.into_bytes()))
            .tag_specifications(tag_spec(ResourceType::KeyPair, &tags))
            .send()
            .await
            .map_err(aws("import the builder's key pair", region))?;
        let key_id = out.key_pair_id().unwrap_or(&name).to_owned();
        // The journal names key pairs by name (deletable in every implementation).
        journal.created(entry, &name)?;
        created.add(
            entry,
            ResourceKind::KeyPair,
            region,
            &key_id,
            Some(&name),
            ctx.build_id,
        );
        self.check_cancel()?;

        // Security group: SSH from one CIDR only.
        let entry = journal.creating(ResourceKind::SecurityGroup, region, &name)?;
        let out = self
            .ec2
            .create_security_group()
            .group_name(&name)
            .description(format!(
                "bake builder {} for {}: SSH from {}",
                ctx.build_id, ctx.recipe.name, ctx.cidr
            ))
            .vpc_id(&ctx.network.vpc_id)
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, &tags))
            .send()
            .await
            .map_err(aws("create the builder's security group", region))?;
        let group_id = out.group_id().unwrap_or_default().to_owned();
        journal.created(entry, &group_id)?;
        created.add(
            entry,
            ResourceKind::SecurityGroup,
            region,
            &group_id,
            Some(&name),
            ctx.build_id,
        );
        let ssh_port = if ctx.settings.ssh_host.is_some() {
            22
        } else {
            i32::from(ctx.settings.ssh_port)
        };
        self.ec2
            .authorize_security_group_ingress()
            .group_id(&group_id)
            .ip_permissions(
                IpPermission::builder()
                    .ip_protocol("tcp")
                    .from_port(ssh_port)
                    .to_port(ssh_port)
                    .ip_ranges(
                        IpRange::builder()
                            .cidr_ip(ctx.cidr)
                            .description(format!("bake build {}", ctx.build_id))
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .map_err(aws("allow SSH into the builder's security group", region))?;
        self.check_cancel()?;

        // The builder.
        let token = client_token(ctx.build_id, "run");
        let entry = journal.creating(ResourceKind::Instance, region, &token)?;
        let instance_id = self.launch(ctx, &name, &group_id, &token, &tags).await?;
        journal.created(entry, &instance_id)?;
        created.add(
            entry,
            ResourceKind::Instance,
            region,
            &instance_id,
            None,
            ctx.build_id,
        );
        reporter.message(&format!("builder {instance_id} launched"));
        let (public_ip, private_ip) = self.wait_running(region, &instance_id).await?;

        let target = SshTarget {
            host: match (&ctx.settings.ssh_host, &ctx.settings.bastion) {
                (Some(host), _) => host.clone(),
                (None, Some(_)) => private_ip.clone().unwrap_or_default(),
                (None, None) => public_ip.or(private_ip).unwrap_or_default(),
            },
            port: ctx.settings.ssh_port,
            user: ctx.settings.ssh_username.clone(),
            bastion: ctx.settings.bastion.as_ref().map(|b| BastionTarget {
                host: b.host.clone(),
                port: b.port,
                user: b.user.clone(),
                key: self
                    .options
                    .bastion_key
                    .clone()
                    .unwrap_or_else(|| Arc::clone(&key)),
            }),
        };
        let mut session = self
            .wait_ssh(region, &instance_id, &target, Arc::clone(&key), reporter)
            .await?;
        let host_key = session.host_key().clone();
        let fingerprint = crate::ssh::fingerprint(&host_key);
        reporter.message(&format!("SSH to {target}: host key {fingerprint} pinned"));

        // Provisioning and tests, as in the snapshot strategy.
        let renderer = Renderer::default();
        let secret = Context::new(ctx.recipe, Some(&ctx.plan.version), None, Secrets::Reveal);
        let public_ctx = Context::new(ctx.recipe, Some(&ctx.plan.version), None, Secrets::Redact);
        let cancel_flag = Arc::clone(&self.options.cancel);
        let cancel = move || cancel_flag.load(Ordering::SeqCst);
        let provisioning = provision::Provisioning {
            store: self.store,
            target: target.clone(),
            key: Arc::clone(&key),
            host_key,
            renderer: &renderer,
            secret: &secret,
            public: &public_ctx,
            secrets: ctx.recipe.secret_values(),
            cancel: &cancel,
        };
        provisioning
            .provision(&mut session, ctx.recipe, reporter)
            .await?;
        provisioning.tests(&session, ctx.recipe, reporter).await?;
        self.check_cancel()?;
        let audit = match (&ctx.recipe.audit, ctx.gate) {
            (Some(audit), Some(prepared)) => Some(
                audit::Gate {
                    prepared,
                    audit,
                    work: self.store.root().join("work"),
                    instance_id: &instance_id,
                }
                .run(&session, &cancel, reporter)
                .await?,
            ),
            _ => None,
        };
        drop(session);
        self.check_cancel()?;

        // Stop, image, wait.
        reporter.message(&format!("stopping {instance_id}"));
        self.ec2
            .stop_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .map_err(aws("stop the builder", region))?;
        self.wait_state(region, &instance_id, InstanceStateName::Stopped)
            .await?;
        self.check_cancel()?;

        let image_name = &ctx.rendered.image_name;
        let mut image_tags = ctx.rendered.tags.clone();
        image_tags.extend(tags.iter().cloned());
        image_tags.push(("bake:source-ami".into(), ctx.source.image_id.clone()));
        let mut building = image_tags.clone();
        building.push((TAG_STATE.into(), "building".into()));
        let entry = journal.creating(ResourceKind::Image, region, image_name)?;
        let out = self
            .ec2
            .create_image()
            .instance_id(&instance_id)
            .name(image_name)
            .set_description(ctx.rendered.description.clone())
            // Snapshot tags are set afterwards: not every EC2 implementation takes them here.
            .tag_specifications(tag_spec(ResourceType::Image, &building))
            .send()
            .await
            .map_err(aws("create the AMI", region))?;
        let image_id = out.image_id().unwrap_or_default().to_owned();
        journal.created(entry, &image_id)?;
        created.image = Some(entry);
        created.add(
            entry,
            ResourceKind::Image,
            region,
            &image_id,
            Some(image_name),
            ctx.build_id,
        );
        reporter.message(&format!(
            "AMI {image_id} ({image_name}) created; waiting until available"
        ));
        let snapshots = self.wait_image(region, &image_id).await?;
        journal.image_snapshots(entry, &snapshots)?;
        if !snapshots.is_empty() {
            self.ec2
                .create_tags()
                .set_resources(Some(snapshots))
                .set_tags(Some(to_tags(&image_tags)))
                .send()
                .await
                .map_err(aws("tag the AMI's snapshots", region))?;
        }
        self.check_cancel()?;
        self.ec2
            .create_tags()
            .resources(&image_id)
            .tags(Tag::builder().key(TAG_STATE).value("available").build())
            .send()
            .await
            .map_err(aws("mark the AMI available", region))?;
        created
            .resources
            .retain(|(_, r)| r.kind != ResourceKind::Image);
        Ok(AmiBuildOutput {
            name: ctx.recipe.name.clone(),
            version: ctx.plan.version.clone(),
            region: region.to_owned(),
            image_id,
            image_name: image_name.clone(),
            source_ami: ctx.source.image_id.clone(),
            build_id: None,
            host_key: Some(fingerprint),
            cached: false,
            regions: Vec::new(),
            audit,
        })
    }

    async fn launch(
        &self,
        ctx: &BuildCtx<'_>,
        key_name: &str,
        group_id: &str,
        token: &str,
        tags: &[(String, String)],
    ) -> Result<String, InstanceError> {
        let region = ctx.region;
        let root_device = ctx
            .source
            .root_device_name
            .clone()
            .unwrap_or_else(|| "/dev/xvda".into());
        let size = ctx
            .settings
            .root_volume_gib
            .unwrap_or(ctx.ami.disk_size_gib);
        let volume = EbsBlockDevice::builder()
            .volume_size(i32::try_from(size).unwrap_or(i32::MAX))
            .volume_type(VolumeType::from(ctx.ami.volume_type.as_str()))
            .encrypted(ctx.ami.encrypted)
            .set_kms_key_id(ctx.ami.kms_key_id.clone().filter(|_| ctx.ami.encrypted))
            .delete_on_termination(true)
            .build();
        let profile = ctx.settings.iam_instance_profile.as_ref().map(|p| {
            let b = IamInstanceProfileSpecification::builder();
            if p.starts_with("arn:") {
                b.arn(p)
            } else {
                b.name(p)
            }
            .build()
        });
        let user_data = ctx
            .rendered
            .user_data
            .as_ref()
            .map(|u| base64::engine::general_purpose::STANDARD.encode(u));
        let out = self
            .ec2
            .run_instances()
            .image_id(&ctx.source.image_id)
            .instance_type(aws_sdk_ec2::types::InstanceType::from(
                ctx.settings.instance_type.as_str(),
            ))
            .min_count(1)
            .max_count(1)
            .key_name(key_name)
            .subnet_id(&ctx.network.subnet_id)
            .security_group_ids(group_id)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_put_response_hop_limit(1)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(root_device)
                    .ebs(volume)
                    .build(),
            )
            .set_iam_instance_profile(profile)
            .set_user_data(user_data)
            // A builder that powers itself off is gone, not stopped and billed.
            .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
            .tag_specifications(tag_spec(ResourceType::Instance, tags))
            .tag_specifications(tag_spec(ResourceType::Volume, tags))
            .client_token(token)
            .send()
            .await
            .map_err(aws("launch the builder instance", region))?;
        out.instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_owned)
            .ok_or_else(|| InstanceError::Wait {
                what: "the builder instance".into(),
                region: region.to_owned(),
                reason: "RunInstances returned no instance".into(),
            })
    }

    async fn describe_instance(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<Option<aws_sdk_ec2::types::Instance>, String> {
        match self
            .ec2
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
        {
            Ok(out) => Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .next()
                .cloned()),
            // Eventual consistency: a new instance may not be visible yet.
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Ok(None),
            Err(e) => Err(format!("in {region}: {}", detail(&e))),
        }
    }

    async fn wait_state(
        &self,
        region: &str,
        instance_id: &str,
        wanted: InstanceStateName,
    ) -> Result<aws_sdk_ec2::types::Instance, InstanceError> {
        let last = std::cell::RefCell::new(None);
        let what = format!("builder {instance_id} to be {}", wanted.as_str());
        let progress = crate::progress::Task::new(
            format!("builder {instance_id}"),
            None,
            crate::progress::Unit::Count("polls"),
        );
        self.options
            .poll
            .until(&what, || {
                let last = &last;
                let wanted = wanted.clone();
                let progress = &progress;
                async move {
                    let instance = self.describe_instance(region, instance_id).await?;
                    let state = instance
                        .as_ref()
                        .and_then(|i| i.state())
                        .and_then(|s| s.name())
                        .cloned();
                    if matches!(
                        state,
                        Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
                    ) && wanted != InstanceStateName::Terminated
                    {
                        return Err(format!("builder {instance_id} terminated unexpectedly"));
                    }
                    let done = state.as_ref() == Some(&wanted);
                    progress.message(format!(
                        "{} (waiting for {})",
                        state.as_ref().map_or("unknown", InstanceStateName::as_str),
                        wanted.as_str()
                    ));
                    *last.borrow_mut() = instance;
                    Ok(done)
                }
            })
            .await
            .map_err(|reason| InstanceError::Wait {
                what,
                region: region.to_owned(),
                reason,
            })?;
        Ok(last.into_inner().expect("a finished wait saw the instance"))
    }

    /// Waits for `running`; returns the public and private addresses.
    async fn wait_running(
        &self,
        region: &str,
        instance_id: &str,
    ) -> Result<(Option<String>, Option<String>), InstanceError> {
        let instance = self
            .wait_state(region, instance_id, InstanceStateName::Running)
            .await?;
        Ok((
            instance.public_ip_address().map(str::to_owned),
            instance.private_ip_address().map(str::to_owned),
        ))
    }

    /// The instance's console output, decoded (empty when there is none yet).
    async fn console(&self, instance_id: &str) -> String {
        match self
            .ec2
            .get_console_output()
            .instance_id(instance_id)
            .send()
            .await
        {
            Ok(out) => out
                .output()
                .and_then(|o| {
                    base64::engine::general_purpose::STANDARD
                        .decode(o.trim())
                        .ok()
                })
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default(),
            Err(e) => {
                tracing::debug!("no console output for {instance_id}: {}", detail(&e));
                String::new()
            }
        }
    }

    /// Connects once SSH answers, within the SSH timeout; pins the host key from the console
    /// when it shows one.
    async fn wait_ssh(
        &self,
        region: &str,
        instance_id: &str,
        target: &SshTarget,
        key: Arc<PrivateKey>,
        reporter: &mut dyn BuildReporter,
    ) -> Result<Session, InstanceError> {
        let _ = region;
        reporter.message(&format!(
            "waiting for SSH on {target} (up to {}s)",
            self.options.ssh_timeout.as_secs()
        ));
        let deadline = Instant::now() + self.options.ssh_timeout;
        let mut last_error;
        loop {
            self.check_cancel()?;
            let console_keys = crate::ssh::host_keys_from_console(&self.console(instance_id).await);
            let policy = if console_keys.is_empty() {
                HostKeyPolicy::FirstUse
            } else {
                HostKeyPolicy::Pinned(console_keys)
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let attempt = tokio::time::timeout(
                remaining.max(Duration::from_secs(1)),
                Session::connect(target, Arc::clone(&key), policy),
            );
            match attempt.await {
                Ok(Ok(session)) => return Ok(session),
                Ok(Err(e)) if e.is_transient() => last_error = crate::diagnostic::error_chain(&e),
                Ok(Err(e)) => return Err(InstanceError::Ssh(e)),
                Err(_) => last_error = "the SSH handshake did not finish".into(),
            }
            if Instant::now() >= deadline {
                let console = self.console(instance_id).await;
                let lines: Vec<&str> = console.lines().collect();
                let tail = &lines[lines.len().saturating_sub(CONSOLE_TAIL)..];
                let console = if tail.is_empty() {
                    "(the instance's console output is empty)".to_owned()
                } else {
                    format!(
                        "console output of {instance_id} (last {} lines):\n  {}",
                        tail.len(),
                        tail.join("\n  ")
                    )
                };
                return Err(InstanceError::SshTimeout {
                    instance: instance_id.to_owned(),
                    target: target.to_string(),
                    timeout: self.options.ssh_timeout,
                    last_error,
                    console,
                });
            }
            tokio::time::sleep(SSH_RETRY.min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
    }

    /// Waits until the AMI is available twice in a row; returns its snapshot ids.
    async fn wait_image(&self, region: &str, image_id: &str) -> Result<Vec<String>, InstanceError> {
        let policy = WaitPolicy {
            consecutive: 2,
            ..self.options.poll
        };
        let snapshots = std::cell::RefCell::new(Vec::new());
        policy
            .until(&format!("AMI {image_id} to be available"), || {
                let snapshots = &snapshots;
                async move {
                    let out = self
                        .ec2
                        .describe_images()
                        .image_ids(image_id)
                        .send()
                        .await
                        .map_err(|e| detail(&e).0)?;
                    let Some(image) = out.images().first() else {
                        return Ok(false);
                    };
                    match image.state() {
                        Some(ImageState::Available) => {
                            *snapshots.borrow_mut() = image
                                .block_device_mappings()
                                .iter()
                                .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
                                .map(str::to_owned)
                                .collect();
                            Ok(true)
                        }
                        Some(ImageState::Failed | ImageState::Error | ImageState::Invalid) => {
                            Err(image
                                .state_reason()
                                .and_then(|r| r.message())
                                .unwrap_or("the image failed")
                                .to_owned())
                        }
                        _ => Ok(false),
                    }
                }
            })
            .await
            .map_err(|reason| InstanceError::ImageFailed {
                image_id: image_id.to_owned(),
                region: region.to_owned(),
                reason,
            })?;
        Ok(snapshots.into_inner())
    }

    /// The shared distribution step: copies to the recipe's other regions, tags, sharing and
    /// deprecation, each only where missing. Copies are journaled when `journal` is given.
    async fn distribute(
        &self,
        journal: Option<&Journal>,
        spec: &AmiSpec,
        output: &AmiBuildOutput,
        created_here: bool,
    ) -> Result<Vec<RegionImage>, InstanceError> {
        let options = DistributeOptions {
            wait: crate::ami::wait::WaitPolicy {
                interval: self.options.poll.interval,
                ..crate::ami::wait::WaitPolicy::IMAGE
            },
            ..DistributeOptions::default()
        };
        let source = SourceImage {
            region: output.region.clone(),
            image_id: output.image_id.clone(),
        };
        Ok(crate::ami::distribute::distribute(
            self.aws,
            journal,
            spec,
            &source,
            created_here,
            &options,
        )
        .await
        .into_result()?)
    }

    /// Removes the build's temporary resources: what it knows it made, plus anything tagged
    /// with its build id.
    async fn cleanup(
        &self,
        region: &str,
        build_id: &str,
        journal: &Journal,
        created: &Created,
    ) -> Vec<CleanupFailure> {
        let mut resources: Vec<Found> = created.resources.iter().map(|(_, r)| r.clone()).collect();
        match cleanup::find(self.ec2, region, Some(build_id)).await {
            Ok(found) => {
                for f in found {
                    if !resources.iter().any(|r| r.kind == f.kind && r.id == f.id) {
                        resources.push(f);
                    }
                }
            }
            Err(reason) => tracing::warn!("{reason}; removing what the build recorded"),
        }
        let wait = WaitPolicy {
            interval: self.options.poll.interval,
            ..cleanup::default_wait()
        };
        let report = cleanup::remove(self.ec2, &resources, &wait).await;
        for (entry, r) in &created.resources {
            if report
                .removed
                .iter()
                .any(|x| x.kind == r.kind && x.id == r.id)
                && let Err(e) = journal.removed(*entry)
            {
                tracing::warn!("failed to update the journal: {e}");
            }
        }
        // Entries whose create call never answered (no id) were found by tag, if they exist.
        if report.failures.is_empty() {
            for (entry, resource) in journal.live() {
                if resource.id.is_none()
                    && matches!(
                        resource.kind,
                        ResourceKind::Instance
                            | ResourceKind::KeyPair
                            | ResourceKind::SecurityGroup
                    )
                {
                    let _ = journal.removed(entry);
                }
            }
        }
        report.failures
    }
}

impl Created {
    fn add(
        &mut self,
        entry: EntryId,
        kind: ResourceKind,
        region: &str,
        id: &str,
        name: Option<&str>,
        build_id: &str,
    ) {
        self.resources.push((
            entry,
            Found {
                kind,
                region: region.to_owned(),
                id: id.to_owned(),
                name: name.map(str::to_owned),
                build_id: build_id.to_owned(),
                created: Some(now_secs()),
            },
        ));
    }
}

struct BuildCtx<'a> {
    recipe: &'a Recipe,
    plan: &'a Plan,
    ami: &'a AmiOutput,
    settings: &'a InstanceSettings,
    region: &'a str,
    build_id: &'a str,
    source: &'a SourceAmi,
    network: &'a Network,
    cidr: &'a str,
    rendered: &'a Rendered,
    /// The compliance gate, prepared on this host, when the recipe has `audit:`.
    gate: Option<&'a crate::audit::remote::Prepared>,
}

impl BuildCtx<'_> {
    /// The tags every resource of this build carries from its creation.
    fn bake_tags(&self) -> Vec<(String, String)> {
        vec![
            (
                "Name".into(),
                format!("bake {} {}", self.recipe.name, self.build_id),
            ),
            (TAG_BUILD_ID.into(), self.build_id.to_owned()),
            (TAG_RUN.into(), self.build_id.to_owned()),
            (TAG_RECIPE.into(), self.recipe.name.clone()),
            (TAG_VERSION.into(), self.plan.version.to_string()),
            (TAG_CREATED.into(), now_secs().to_string()),
        ]
    }
}

/// The recipe's name, description, tags and user data for the build region.
fn render(
    recipe: &Recipe,
    plan: &Plan,
    ami: &AmiOutput,
    settings: &InstanceSettings,
    region: &str,
) -> Result<Rendered, InstanceError> {
    let renderer = Renderer::default();
    let public = Context::new(recipe, Some(&plan.version), Some(region), Secrets::Redact);
    let secret = Context::new(recipe, Some(&plan.version), Some(region), Secrets::Reveal);
    Ok(Rendered {
        image_name: renderer.render(&ami.name, &public)?,
        description: ami
            .description
            .as_ref()
            .map(|d| renderer.render(d, &public))
            .transpose()?,
        tags: render_map(&renderer, &ami.tags, &public)?
            .into_iter()
            .collect(),
        user_data: settings
            .user_data
            .as_ref()
            .map(|u| renderer.render(u, &secret))
            .transpose()?,
    })
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A ClientToken (at most 64 characters) for one call of one build: a retried call with the
/// same token cannot launch a second builder.
fn client_token(build_id: &str, purpose: &str) -> String {
    let mut token = format!("bake-{build_id}-{purpose}");
    token.truncate(64);
    token
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

fn to_tags(tags: &[(String, String)]) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn tag_spec(kind: ResourceType, tags: &[(String, String)]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(to_tags(tags)))
        .build()
}

fn aws<E: ProvideErrorMetadata + std::fmt::Debug>(
    action: &str,
    region: &str,
) -> impl FnOnce(E) -> InstanceError {
    let action = action.to_owned();
    let region = region.to_owned();
    move |e| InstanceError::Aws {
        action,
        region,
        source: detail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tokens_are_bounded_and_stable() {
        let token = client_token(&"a".repeat(80), "run");
        assert_eq!(token.len(), 64);
        assert_eq!(client_token("abc-12", "run"), "bake-abc-12-run");
    }
}
