//! The validated recipe: types that cannot hold an invalid recipe. Built only by
//! [`super::validate`]; everything downstream (plan, build, publish) takes these.
//!
//! The types serialize to the canonical form that enters the version (see `plan::version`),
//! so a field's name here is part of bake's version format: renaming one changes every version.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::diagnostic::{SourceFile, SourceSpan};

/// A string that is rendered with handlebars before use. It serializes as its *source* text:
/// the version hashes templates and variable values, not rendered strings, so that `{{version}}`
/// may appear in a template without a circular definition.
#[derive(Debug, Clone)]
pub struct Template {
    pub text: String,
    pub origin: TemplateOrigin,
}

/// Where a template's text came from, to point errors at the right line.
#[derive(Debug, Clone)]
pub enum TemplateOrigin {
    /// A YAML scalar whose content starts at `span`.
    Yaml { span: SourceSpan },
    /// A whole file (a shell script or a templated source file).
    File(Arc<SourceFile>),
}

impl Serialize for Template {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// A recipe after validation, with its variable values resolved.
#[derive(Debug, Clone, Serialize)]
pub struct Recipe {
    #[serde(skip)]
    pub source: Arc<SourceFile>,
    /// The canonical path of the recipe file.
    #[serde(skip)]
    pub path: PathBuf,
    /// The canonical directory every relative path in the recipe is resolved against and must
    /// stay within.
    #[serde(skip)]
    pub root: PathBuf,
    pub name: String,
    #[serde(skip)]
    pub description: Option<String>,
    pub variables: BTreeMap<String, Variable>,
    pub base: Base,
    pub build: BuildSettings,
    pub provisioners: Vec<Provisioner>,
    pub tests: Vec<Test>,
    pub outputs: Outputs,
    pub publish: Publish,
    /// Absent from the canonical form when not set, so recipes without a gate keep their
    /// versions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<Audit>,
    /// Not part of the version: the key that signs an artifact's provenance does not change it.
    #[serde(skip)]
    pub provenance: ProvenanceSettings,
    /// Not part of the version: how long artifacts are kept says nothing about what they are.
    #[serde(skip)]
    pub lifecycle: Lifecycle,
}

/// Retention for `bake gc` (`lifecycle:`); the command line (`--keep`, `--older-than`)
/// overrides the recipe-wide values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lifecycle {
    /// The newest versions always kept.
    pub keep: Option<u32>,
    /// Only versions older than this are removed.
    pub older_than: Option<Duration>,
    /// How long an AMI stays deprecated before it is deregistered (zero: in the same run).
    pub grace: Duration,
    /// Per channel (each one of `publish.channels`).
    pub channels: BTreeMap<String, ChannelRetention>,
}

/// Channel entries `bake gc` keeps when the recipe does not say: the current one and the
/// previous one, which a rollback returns to.
pub const DEFAULT_CHANNEL_KEEP: u32 = 2;

/// How much of a channel's history `bake gc` keeps, beyond its current and previous versions
/// (always kept: they are what a rollback needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelRetention {
    /// The channel's newest entries kept.
    pub keep: u32,
    /// Every version the channel held within this long.
    pub older_than: Option<Duration>,
}

/// How a build's provenance is signed and which SBOMs are made (`provenance:`); the command
/// line (`--signing-key`, `--kms-key`, `--sbom-format`) overrides it.
#[derive(Debug, Clone, Default)]
pub struct ProvenanceSettings {
    pub signing_key: Option<PathBuf>,
    pub kms_key: Option<String>,
    /// `spdx` and/or `cyclonedx`; empty: SPDX only.
    pub sbom_formats: Vec<String>,
}

/// The compliance gate of a recipe (`audit:`).
#[derive(Debug, Clone, Serialize)]
pub struct Audit {
    pub scanner: Scanner,
    #[serde(skip)]
    pub datastream: PathBuf,
    /// As written in the recipe.
    pub datastream_path: String,
    /// The full XCCDF profile id.
    pub profile: String,
    pub target: AuditTarget,
    /// Minimum pass ratio in percent, in hundredths (so the canonical form has no floats).
    pub min_pass_ratio_centi: Option<u32>,
    pub max_failures: Option<u32>,
    /// Rule id (short form) → why its failure is accepted.
    pub exceptions: BTreeMap<String, String>,
    pub support_status: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scanner {
    Openscap,
}

/// What the scanned root is: SCAP content skips machine-only rules for a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditTarget {
    Machine,
    Container,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VariableKind {
    String,
    Number,
    Bool,
    List,
}

impl VariableKind {
    pub const NAMES: [&'static str; 4] = ["string", "number", "bool", "list"];

    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "string" => VariableKind::String,
            "number" => VariableKind::Number,
            "bool" => VariableKind::Bool,
            "list" => VariableKind::List,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            VariableKind::String => "string",
            VariableKind::Number => "number",
            VariableKind::Bool => "bool",
            VariableKind::List => "list",
        }
    }
}

/// A declared variable and its resolved value.
#[derive(Debug, Clone)]
pub struct Variable {
    pub kind: VariableKind,
    pub description: Option<String>,
    pub sensitive: bool,
    /// `None` only for an optional variable nobody gave a value; a template that uses it fails.
    pub value: Option<VariableValue>,
    pub declared_at: SourceSpan,
}

/// A sensitive variable serializes as `"***"` whether or not it has a value, so neither its
/// value nor its presence reaches the version or any output.
impl Serialize for Variable {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Variable", 3)?;
        s.serialize_field("kind", &self.kind)?;
        s.serialize_field("sensitive", &self.sensitive)?;
        if self.sensitive {
            s.serialize_field("value", REDACTED)?;
        } else {
            s.serialize_field("value", &self.value)?;
        }
        s.end()
    }
}

/// A variable value; a sensitive one has a redacting `Debug` and serializes as `"***"`.
#[derive(Clone, PartialEq)]
pub struct VariableValue {
    pub value: serde_json::Value,
    pub sensitive: bool,
}

/// What bake prints instead of a sensitive value.
pub const REDACTED: &str = "***";

impl Recipe {
    /// The values of the recipe's sensitive variables as they would appear in text, longest
    /// first (so a secret containing another is replaced whole): what [`redact`] hides.
    pub fn secret_values(&self) -> Vec<String> {
        let mut values: Vec<String> = self
            .variables
            .values()
            .filter(|v| v.sensitive)
            .filter_map(|v| v.value.as_ref())
            .map(|v| match &v.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .filter(|v| !v.is_empty())
            .collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values
    }
}

/// `text` with every one of `secrets` (from [`Recipe::secret_values`]) replaced by [`REDACTED`].
pub fn redact(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_owned(), |text, secret| {
        text.replace(secret.as_str(), REDACTED)
    })
}

impl std::fmt::Debug for VariableValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.sensitive {
            f.write_str(REDACTED)
        } else {
            write!(f, "{}", self.value)
        }
    }
}

impl Serialize for VariableValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.sensitive {
            serializer.serialize_str(REDACTED)
        } else {
            self.value.serialize(serializer)
        }
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Base {
    Scratch,
    Image {
        reference: String,
    },
    OciLayout {
        #[serde(skip)]
        path: PathBuf,
        relative_path: String,
        tag: Option<String>,
    },
    Rootfs {
        #[serde(skip)]
        path: PathBuf,
        relative_path: String,
    },
    Bootstrap(Bootstrap),
    Recipe {
        #[serde(skip)]
        path: PathBuf,
        relative_path: String,
    },
    Ami(AmiFilter),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bootstrap {
    pub distro: Distro,
    pub suite: String,
    pub variant: String,
    /// Sorted and deduplicated: the order packages are listed in does not matter to apt.
    pub packages: Vec<String>,
    pub mirror: String,
    pub components: Vec<String>,
    /// Further suites apt reads besides `suite` (updates, security), each with its archive.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub suites: Vec<ArchiveSuite>,
    /// The OpenPGP keyring the archives are signed with, as written (else the distribution's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyring: Option<String>,
    /// The keyring file, resolved inside the recipe's directory.
    #[serde(skip)]
    pub keyring_path: Option<PathBuf>,
}

/// One suite of one archive: what apt reads, and what a plan pins by its Release file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArchiveSuite {
    pub mirror: String,
    pub suite: String,
}

impl Bootstrap {
    /// Every suite apt reads: the main one first, then `suites`.
    pub fn archives(&self) -> Vec<ArchiveSuite> {
        std::iter::once(ArchiveSuite {
            mirror: self.mirror.clone(),
            suite: self.suite.clone(),
        })
        .chain(self.suites.iter().cloned())
        .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Distro {
    Debian,
    Ubuntu,
}

#[derive(Debug, Clone, Serialize)]
pub struct AmiFilter {
    pub owners: Vec<String>,
    pub name: Option<String>,
    pub architecture: Architecture,
    pub virtualization_type: String,
    pub root_device_type: String,
    pub most_recent: bool,
    pub ssm_parameter: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    X86_64,
    Arm64,
}

impl Architecture {
    /// The OCI/Go name (`amd64`, `arm64`).
    pub fn oci(self) -> &'static str {
        match self {
            Architecture::X86_64 => "amd64",
            Architecture::Arm64 => "arm64",
        }
    }

    /// The EC2 name (`x86_64`, `arm64`).
    pub fn ec2(self) -> &'static str {
        match self {
            Architecture::X86_64 => "x86_64",
            Architecture::Arm64 => "arm64",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BuildSettings {
    pub source_date_epoch: Option<u64>,
    pub compression: Compression,
    pub squash: bool,
    /// Where steps run. Not part of the version (skipped when the recipe is hashed): both
    /// runners give the same image, byte for byte.
    #[serde(skip)]
    pub runner: RunnerKind,
    /// A registry repository (`registry/name`) step layers are shared through, keyed by
    /// everything before each step (BuildKit's registry cache). Not part of the version: where
    /// layers are cached does not change them.
    #[serde(skip)]
    pub cache: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "algorithm", content = "level")]
pub enum Compression {
    Gzip(u32),
    Zstd(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunnerKind {
    /// Namespaces and chroot, no daemon (the default).
    Chroot,
    /// A Docker Engine through its API.
    Docker,
}

#[derive(Debug, Clone, Serialize)]
pub struct Provisioner {
    /// A human name for logs and layer history; defaults to the kind and position.
    pub name: String,
    #[serde(flatten)]
    pub step: Step,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Step {
    File(FileStep),
    Shell(ShellStep),
    Hardening(HardeningStep),
}

#[derive(Debug, Clone, Serialize)]
pub struct FileStep {
    #[serde(skip)]
    pub source: PathBuf,
    pub relative_source: String,
    pub destination: Template,
    pub mode: Option<u32>,
    pub owner: Option<(u32, u32)>,
    pub template: bool,
    /// With `template`: each regular file of the source (its path relative to the source, or
    /// empty for a single file) and its text as a template.
    #[serde(skip)]
    pub templates: Vec<(PathBuf, Template)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShellStep {
    pub script: Script,
    pub env: BTreeMap<String, Template>,
    pub network: bool,
    #[serde(serialize_with = "serialize_secs")]
    pub timeout: Duration,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub expect_reboot: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Script {
    Inline(Template),
    File {
        #[serde(skip)]
        path: PathBuf,
        relative_path: String,
        /// The file's text as a template, when it is rendered; `None` runs it verbatim.
        #[serde(skip)]
        template: Option<Template>,
        rendered: bool,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct HardeningStep {
    pub profile: String,
    pub flavour: Option<Flavour>,
    pub exclude: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavour {
    Ami,
    Oci,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Test {
    Command {
        name: String,
        run: Template,
        exit_code: i32,
        stdout_contains: Option<Template>,
        user: Option<String>,
        network: bool,
        #[serde(serialize_with = "serialize_secs")]
        timeout: Duration,
    },
    Boot {
        marker: String,
        #[serde(serialize_with = "serialize_secs")]
        timeout: Duration,
        /// How the test machine runs, not what is built: not part of the version.
        #[serde(skip)]
        accelerator: crate::ami::boot::Accelerator,
    },
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Outputs {
    pub oci: Option<OciOutput>,
    pub ami: Option<AmiOutput>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OciOutput {
    pub os: String,
    pub architecture: Architecture,
    pub variant: Option<String>,
    pub entrypoint: Option<Vec<Template>>,
    pub cmd: Option<Vec<Template>>,
    pub env: BTreeMap<String, Template>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub labels: BTreeMap<String, Template>,
    pub annotations: BTreeMap<String, Template>,
    /// `PORT/PROTO`, sorted.
    pub ports: Vec<String>,
    pub stop_signal: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AmiStrategy {
    Snapshot,
    Instance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMode {
    Uefi,
    LegacyBios,
    UefiPreferred,
}

#[derive(Debug, Clone, Serialize)]
pub struct AmiOutput {
    pub strategy: AmiStrategy,
    pub name: Template,
    pub description: Option<Template>,
    /// The first region is where the AMI is built; the others receive copies.
    pub regions: Vec<String>,
    pub architecture: Architecture,
    pub boot_mode: BootMode,
    pub disk_size_gib: u32,
    pub volume_type: String,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub region_kms_key_ids: BTreeMap<String, String>,
    pub share_accounts: Vec<String>,
    pub share_organizations: Vec<String>,
    pub share_organizational_units: Vec<String>,
    pub public: bool,
    pub tags: BTreeMap<String, Template>,
    #[serde(serialize_with = "serialize_opt_secs")]
    pub deprecate_after: Option<Duration>,
    pub instance: Option<InstanceSettings>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceSettings {
    pub instance_type: String,
    pub subnet_id: Option<String>,
    pub vpc_id: Option<String>,
    pub ssh_username: String,
    pub ssh_cidr: Option<String>,
    pub ssh_host: Option<String>,
    pub ssh_port: u16,
    pub bastion: Option<Bastion>,
    pub iam_instance_profile: Option<String>,
    pub user_data: Option<Template>,
    pub root_volume_gib: Option<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bastion {
    pub host: String,
    pub port: u16,
    pub user: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Publish {
    pub registries: Vec<RegistryTarget>,
    pub ecr: Vec<EcrTarget>,
    pub launch_templates: Vec<LaunchTemplateTarget>,
    pub ssm_parameters: Vec<SsmTarget>,
    pub ecs_task_definitions: Vec<EcsTarget>,
    pub channels: Vec<String>,
    /// Channel name → how `bake rollout` replaces machines for it. Like the rest of `publish`,
    /// not part of the version: how a version reaches machines does not change what it is.
    pub rollouts: BTreeMap<String, Rollout>,
}

/// How machines are replaced when a channel moves to a version (`bake rollout`).
#[derive(Debug, Clone, Serialize)]
pub struct Rollout {
    pub strategy: RolloutStrategy,
    /// Percentages at which an instance refresh pauses (canary); the last is 100.
    pub checkpoints: Vec<u8>,
    #[serde(serialize_with = "serialize_secs")]
    pub checkpoint_delay: Duration,
    /// `None` leaves AWS's default (90 for instance refreshes, 100 for ECS).
    pub min_healthy_percentage: Option<u8>,
    #[serde(serialize_with = "serialize_opt_secs")]
    pub instance_warmup: Option<Duration>,
    #[serde(serialize_with = "serialize_opt_secs")]
    pub bake_time: Option<Duration>,
    /// CloudWatch alarms that stop the rollout and roll it back.
    pub alarms: Vec<String>,
    pub skip_matching: bool,
    #[serde(serialize_with = "serialize_secs")]
    pub timeout: Duration,
    pub auto_scaling_groups: Vec<RolloutGroup>,
    pub ecs_services: Vec<RolloutService>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStrategy {
    /// Replace in steps, pausing at each checkpoint while the alarms watch.
    Canary,
    /// Replace batch by batch, keeping the minimum healthy percentage in service.
    Rolling,
    /// Launch the whole new fleet before the old one goes (max healthy 200%), then bake.
    BlueGreen,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutGroup {
    pub name: String,
    /// `None`: every region the version's launch templates are in.
    pub regions: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RolloutService {
    pub cluster: String,
    pub name: String,
    /// The task definition target the service runs (its family and region).
    pub family: String,
    pub region: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegistryTarget {
    /// `registry/repository` without a tag or digest.
    pub repository: String,
    pub tags: Vec<Template>,
    pub insecure: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct EcrTarget {
    pub repository: String,
    pub region: Option<String>,
    pub tags: Vec<Template>,
    pub create: bool,
    pub immutable_tags: bool,
    pub scan_on_push: bool,
    /// Create the repository encrypted with this KMS key (else ECR's default AES-256).
    pub kms_key: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LaunchTemplateRef {
    Name(String),
    Id(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct LaunchTemplateTarget {
    pub template: LaunchTemplateRef,
    /// `None`: every region the AMI is distributed to.
    pub regions: Option<Vec<String>>,
    /// `$Default`, `$Latest` or a version number.
    pub source_version: String,
    pub set_default: bool,
    pub http_tokens_required: Option<bool>,
    pub hop_limit: Option<u8>,
    /// Start an Auto Scaling instance refresh after the default version changes.
    pub instance_refresh: Option<InstanceRefresh>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstanceRefresh {
    pub auto_scaling_group: String,
    /// 0 to 100; `None` leaves AWS's default (90).
    pub min_healthy_percentage: Option<u8>,
    /// Skip instances already on the new version.
    pub skip_matching: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SsmTarget {
    pub name: Template,
    pub regions: Option<Vec<String>>,
    pub description: Option<Template>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EcsTarget {
    pub family: String,
    pub container: String,
    pub region: String,
    /// The repository (as written in a registry or ECR target) whose digest the task pins.
    pub repository: String,
    #[serde(skip)]
    pub template: Option<PathBuf>,
    pub template_relative: Option<String>,
    pub service: Option<EcsService>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EcsService {
    pub cluster: String,
    pub name: String,
}

fn serialize_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn serialize_opt_secs<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs()),
        None => s.serialize_none(),
    }
}
