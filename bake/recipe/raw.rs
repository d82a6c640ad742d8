//! The recipe file exactly as written: serde types that mirror the YAML, with the source
//! location of every value that validation may need to point at. Nothing here is checked beyond
//! its shape; [`super::validate`] turns a [`RawRecipe`] into a [`super::Recipe`].
//!
//! Every struct denies unknown fields, so a typo is an error with a suggestion rather than a
//! silently ignored setting.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// A value with the place it was written.
pub type S<T> = Spanned<T>;

/// A variable value as written in YAML (checked against the declared type later).
pub type RawValue = serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    /// The schema version; only `1` exists.
    pub bake: S<RawValue>,
    pub name: S<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub variables: BTreeMap<String, S<RawVariable>>,
    pub base: S<RawBase>,
    #[serde(default)]
    pub build: RawBuild,
    #[serde(default)]
    pub provisioners: Vec<S<RawProvisioner>>,
    #[serde(default)]
    pub tests: Vec<S<RawTest>>,
    #[serde(default)]
    pub outputs: RawOutputs,
    #[serde(default)]
    pub publish: RawPublish,
    /// The compliance gate: a scan of the provisioned root before anything is stored.
    pub audit: Option<S<RawAudit>>,
    /// How provenance is signed and which SBOMs are made.
    pub provenance: Option<S<RawProvenance>>,
    /// Retention for `bake gc`: how many versions and how long to keep, per channel too.
    pub lifecycle: Option<S<RawLifecycle>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLifecycle {
    /// The newest versions always kept (`bake gc --keep` overrides it).
    pub keep: Option<S<RawValue>>,
    /// Only versions older than this are removed (`bake gc --older-than` overrides it).
    pub older_than: Option<S<String>>,
    /// How long an AMI stays deprecated before it is deregistered (default `0s`: in the same
    /// run, right after its deprecation).
    pub grace: Option<S<String>>,
    /// Per channel: its newest `keep` entries, and every version it held within `older_than`.
    #[serde(default)]
    pub channels: BTreeMap<String, S<RawChannelRetention>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawChannelRetention {
    pub keep: Option<S<RawValue>>,
    pub older_than: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvenance {
    /// A PKCS#8 PEM private key file (ed25519 or ECDSA P-256), relative to the recipe or absolute.
    pub signing_key: Option<S<String>>,
    /// An AWS KMS asymmetric key (id, alias or ARN).
    pub kms_key: Option<S<String>>,
    /// `spdx` (the default) and/or `cyclonedx`.
    #[serde(default)]
    pub sbom_formats: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// Only `openscap`.
    pub scanner: Option<S<String>>,
    /// A SCAP source data stream (`.xml` or `.xml.xz`), relative to the recipe or absolute.
    pub datastream: S<String>,
    /// An XCCDF profile id, short (`cis_level1_server`) or full.
    pub profile: S<String>,
    /// `machine` or `container`; by default `machine` when the recipe makes an AMI.
    pub target: Option<S<String>>,
    /// The lowest share of passing rules, in percent (failures counted without exceptions).
    pub min_pass_ratio: Option<S<RawValue>>,
    /// The most failing rules allowed (exceptions not counted).
    pub max_failures: Option<S<RawValue>>,
    #[serde(default)]
    pub exceptions: Vec<S<RawExclusion>>,
    /// Also fail on packages whose Debian security support ended (default true).
    pub support_status: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVariable {
    #[serde(rename = "type")]
    pub kind: S<String>,
    pub description: Option<String>,
    pub default: Option<S<RawValue>>,
    #[serde(default)]
    pub required: bool,
    pub allowed: Option<S<Vec<RawValue>>>,
    #[serde(default)]
    pub sensitive: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawBase {
    /// An empty root filesystem.
    Scratch,
    /// An OCI image by registry reference (`registry/repo:tag` or `…@sha256:…`).
    Image(S<String>),
    /// An OCI image layout directory on disk.
    OciLayout(RawOciLayoutBase),
    /// A root filesystem tarball (plain, gzip or zstd).
    Rootfs(S<String>),
    /// A Debian or Ubuntu root filesystem made by mmdebstrap.
    Bootstrap(RawBootstrap),
    /// The output of another recipe (a path to its file).
    Recipe(S<String>),
    /// A source AMI chosen by filter, for the builder-instance strategy.
    Ami(RawAmiFilter),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOciLayoutBase {
    pub path: S<String>,
    /// Picks the manifest whose `org.opencontainers.image.ref.name` is this tag.
    pub tag: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBootstrap {
    pub distro: Option<S<String>>,
    pub suite: S<String>,
    pub variant: Option<S<String>>,
    #[serde(default)]
    pub packages: Vec<S<String>>,
    pub mirror: Option<S<String>>,
    pub components: Option<Vec<S<String>>>,
    /// `SUITE` (from `mirror`) or `URL SUITE`, as in a sources.list line.
    #[serde(default)]
    pub suites: Vec<S<String>>,
    pub keyring: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmiFilter {
    #[serde(default)]
    pub owners: Vec<S<String>>,
    pub name: Option<S<String>>,
    pub architecture: Option<S<String>>,
    pub virtualization_type: Option<S<String>>,
    pub root_device_type: Option<S<String>>,
    #[serde(default = "yes")]
    pub most_recent: bool,
    /// A public SSM parameter holding an AMI id, such as
    /// `/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64`.
    pub ssm_parameter: Option<S<String>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBuild {
    pub source_date_epoch: Option<S<RawValue>>,
    pub compression: Option<S<String>>,
    pub compression_level: Option<S<RawValue>>,
    #[serde(default)]
    pub squash: bool,
    pub runner: Option<S<String>>,
    pub cache: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawProvisioner {
    File(RawFileStep),
    Shell(RawShellStep),
    Hardening(RawHardeningStep),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileStep {
    pub name: Option<S<String>>,
    pub source: S<String>,
    pub destination: S<String>,
    pub mode: Option<S<RawValue>>,
    pub owner: Option<S<String>>,
    /// Render the source file(s) as templates before copying.
    #[serde(default)]
    pub template: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShellStep {
    pub name: Option<S<String>>,
    pub inline: Option<S<String>>,
    pub script: Option<S<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, S<String>>,
    #[serde(default)]
    pub network: bool,
    pub timeout: Option<S<String>>,
    pub user: Option<S<String>>,
    pub workdir: Option<S<String>>,
    /// Render a `script` file as a template (inline scripts always are).
    pub template: Option<bool>,
    /// The step reboots the machine (builder-instance strategy): wait for it to come back.
    #[serde(default)]
    pub expect_reboot: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHardeningStep {
    pub profile: S<String>,
    pub flavour: Option<S<String>>,
    #[serde(default)]
    pub exclude: Vec<S<RawExclusion>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExclusion {
    pub rule: S<String>,
    pub reason: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RawTest {
    Command(Box<RawCommandTest>),
    Boot(Box<RawBootTest>),
    /// Removed: the gate is `audit:`. Still read, whatever its fields, so that validation can
    /// say where it went instead of "unknown variant".
    Compliance(serde::de::IgnoredAny),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCommandTest {
    pub name: Option<S<String>>,
    pub run: S<String>,
    #[serde(default)]
    pub exit_code: i32,
    pub stdout_contains: Option<S<String>>,
    pub user: Option<S<String>>,
    #[serde(default)]
    pub network: bool,
    pub timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBootTest {
    pub marker: S<String>,
    pub timeout: Option<S<String>>,
    /// `auto` (default), `kvm` or `tcg`.
    pub accelerator: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutputs {
    pub oci: Option<S<RawOciOutput>>,
    pub ami: Option<S<RawAmiOutput>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOciOutput {
    pub platform: Option<S<String>>,
    pub entrypoint: Option<Vec<S<String>>>,
    pub cmd: Option<Vec<S<String>>>,
    #[serde(default)]
    pub env: BTreeMap<String, S<String>>,
    pub user: Option<S<String>>,
    pub workdir: Option<S<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, S<String>>,
    #[serde(default)]
    pub annotations: BTreeMap<String, S<String>>,
    #[serde(default)]
    pub ports: Vec<S<RawValue>>,
    pub stop_signal: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAmiOutput {
    pub strategy: S<String>,
    pub name: Option<S<String>>,
    pub description: Option<S<String>>,
    pub regions: S<Vec<S<String>>>,
    pub architecture: Option<S<String>>,
    pub boot_mode: Option<S<String>>,
    pub disk_size_gib: Option<S<RawValue>>,
    pub volume_type: Option<S<String>>,
    #[serde(default)]
    pub encryption: RawEncryption,
    #[serde(default)]
    pub sharing: RawSharing,
    #[serde(default)]
    pub tags: BTreeMap<String, S<String>>,
    pub deprecate_after: Option<S<String>>,
    pub instance: Option<S<RawInstanceSettings>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEncryption {
    pub encrypted: Option<bool>,
    pub kms_key_id: Option<S<String>>,
    /// Per-region KMS keys, for copies.
    #[serde(default)]
    pub region_kms_key_ids: BTreeMap<String, S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSharing {
    #[serde(default)]
    pub accounts: Vec<S<RawValue>>,
    #[serde(default)]
    pub organizations: Vec<S<String>>,
    #[serde(default)]
    pub organizational_units: Vec<S<String>>,
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstanceSettings {
    pub instance_type: Option<S<String>>,
    pub subnet_id: Option<S<String>>,
    pub vpc_id: Option<S<String>>,
    pub ssh_username: Option<S<String>>,
    pub ssh_cidr: Option<S<String>>,
    pub ssh_host: Option<S<String>>,
    pub ssh_port: Option<S<RawValue>>,
    pub bastion: Option<S<RawBastion>>,
    pub iam_instance_profile: Option<S<String>>,
    pub user_data: Option<S<String>>,
    pub root_volume_gib: Option<S<RawValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBastion {
    pub host: S<String>,
    pub port: Option<S<RawValue>>,
    pub user: Option<S<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPublish {
    #[serde(default)]
    pub registries: Vec<S<RawRegistryTarget>>,
    #[serde(default)]
    pub ecr: Vec<S<RawEcrTarget>>,
    #[serde(default)]
    pub launch_templates: Vec<S<RawLaunchTemplateTarget>>,
    #[serde(default)]
    pub ssm_parameters: Vec<S<RawSsmTarget>>,
    #[serde(default)]
    pub ecs_task_definitions: Vec<S<RawEcsTarget>>,
    #[serde(default)]
    pub channels: Vec<S<String>>,
    /// How `bake rollout` replaces machines for a channel, keyed by channel name.
    #[serde(default)]
    pub rollouts: BTreeMap<String, S<RawRollout>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    /// `canary` (checkpoints), `rolling` (min healthy percentage) or `blue_green`.
    pub strategy: Option<S<String>>,
    /// Canary checkpoints, ascending percentages ending at 100.
    pub checkpoints: Option<S<Vec<S<RawValue>>>>,
    pub checkpoint_delay: Option<S<String>>,
    pub min_healthy_percentage: Option<S<RawValue>>,
    pub instance_warmup: Option<S<String>>,
    pub bake_time: Option<S<String>>,
    #[serde(default)]
    pub alarms: Vec<S<String>>,
    #[serde(default = "yes")]
    pub skip_matching: bool,
    pub timeout: Option<S<String>>,
    /// Groups to refresh; without it, the groups of `launch_templates[].instance_refresh`.
    pub auto_scaling_groups: Option<Vec<S<RawRolloutGroup>>>,
    /// Services to deploy; without it, the services of `ecs_task_definitions[].service`.
    pub ecs_services: Option<Vec<S<RawRolloutService>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRolloutGroup {
    pub name: S<String>,
    /// Only these regions (default: every region the version's launch templates are in).
    pub regions: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRolloutService {
    pub cluster: S<String>,
    pub name: S<String>,
    /// The task definition target (by family) whose revisions the service runs; optional
    /// when the recipe has one.
    pub family: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRegistryTarget {
    pub repository: S<String>,
    #[serde(default)]
    pub tags: Vec<S<String>>,
    #[serde(default)]
    pub insecure: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEcrTarget {
    pub repository: S<String>,
    pub region: Option<S<String>>,
    #[serde(default)]
    pub tags: Vec<S<String>>,
    #[serde(default = "yes")]
    pub create: bool,
    #[serde(default)]
    pub immutable_tags: bool,
    #[serde(default = "yes")]
    pub scan_on_push: bool,
    /// KMS key (id, ARN or alias) to create the repository with; AES-256 without.
    pub kms_key: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLaunchTemplateTarget {
    pub name: Option<S<String>>,
    pub id: Option<S<String>>,
    pub regions: Option<Vec<S<String>>>,
    pub source_version: Option<S<RawValue>>,
    #[serde(default)]
    pub set_default: bool,
    pub metadata: Option<S<RawInstanceMetadata>>,
    pub instance_refresh: Option<S<RawInstanceRefresh>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstanceRefresh {
    pub auto_scaling_group: S<String>,
    pub min_healthy_percentage: Option<S<RawValue>>,
    #[serde(default = "yes")]
    pub skip_matching: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInstanceMetadata {
    pub http_tokens: Option<S<String>>,
    pub http_put_response_hop_limit: Option<S<RawValue>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSsmTarget {
    pub name: S<String>,
    pub regions: Option<Vec<S<String>>>,
    pub description: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEcsTarget {
    pub family: S<String>,
    pub container: S<String>,
    pub region: S<String>,
    /// Which published repository the image reference comes from; optional when the recipe
    /// publishes to exactly one.
    pub repository: Option<S<String>>,
    /// A task definition JSON file used when the family has no revision yet.
    pub template: Option<S<String>>,
    pub service: Option<S<RawEcsService>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEcsService {
    pub cluster: S<String>,
    pub name: S<String>,
}
