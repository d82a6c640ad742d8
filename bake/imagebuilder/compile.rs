//! A planned recipe compiled into EC2 Image Builder resources: pure functions, no AWS calls.
//!
//! - one **build component** per provisioner (an AWSTOE document whose `build` phase runs the
//!   step as bake's own runner would: shell scripts with `/bin/sh -e`, their environment, user
//!   and working directory; files written with their modes and owners; the hardening profile's
//!   script with the recipe's exclusions), so each component stays under Image Builder's size
//!   limit and the build's progress names the recipe's steps;
//! - one **test component** whose `test` phase runs the recipe's `command` tests (exit code and
//!   expected output) on an instance launched from the new AMI, before it is distributed;
//! - an **image recipe** on the source AMI the plan pinned, with the recipe's root volume
//!   (size, type, encryption); or, for `outputs.oci` ([`compile_container`]), a **container
//!   recipe** on the `image` base the plan pinned, with a Dockerfile template carrying the
//!   image settings, pushing to the first `publish.ecr` repository;
//! - an **infrastructure configuration**: instance type, subnet, instance profile, IMDSv2
//!   required with a hop limit of 1, the instance terminated on failure;
//! - a **distribution configuration**: every region of the recipe, with its AMI name,
//!   description and tags (rendered per region), KMS key and launch permissions; with
//!   [`CompileOptions::publish`], also the recipe's launch templates (given by id) and SSM
//!   parameters, for pipelines that run without bake;
//! - optionally an **image pipeline** with a schedule.
//!
//! Names derive from the recipe's name and short version ([`resource_name`]), semantic versions
//! are fixed ([`SEMANTIC_VERSION`]): one bake version is one set of immutable resources.
//! Sensitive variables never reach a document: a step that renders differently with secrets
//! revealed than with secrets redacted is refused, naming the step.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use base64::Engine as _;
use serde::Serialize;

use crate::ami::instance::SourceAmi;
use crate::ami::{TAG_RECIPE, TAG_VERSION};
use crate::plan::Plan;
use crate::recipe::template::{Context, Renderer, Secrets};
use crate::recipe::{
    Base, FileStep, LaunchTemplateRef, Recipe, RecipeError, Script, ShellStep, Step, Template, Test,
};

/// The semantic version of every versioned resource bake creates: the name carries bake's
/// version, so each name has exactly one version, and `x.x.x` lookups can never pick another
/// build's resources.
pub const SEMANTIC_VERSION: &str = "1.0.0";

/// The instance profile used when the recipe names none: the role AWS's Image Builder set-up
/// guide creates (`EC2InstanceProfileForImageBuilder`).
pub const DEFAULT_INSTANCE_PROFILE: &str = "EC2InstanceProfileForImageBuilder";

/// The instance type used when the recipe names none (Image Builder's own default is a choice
/// of several; one fixed type keeps builds comparable).
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.medium";

/// The most characters `CreateComponent` accepts in `data` (Image Builder's API limit).
pub const COMPONENT_DATA_LIMIT: usize = 16_000;

/// Scripts and files up to this size are written into a document as they are (readable in
/// the console); larger ones, and any that AWSTOE would read as its own `{{ … }}` variables,
/// are gzip-compressed and base64-encoded.
const PLAIN_TEXT_LIMIT: usize = 8_000;

/// Bytes per line of base64 in a document (what `base64` itself writes).
const BASE64_LINE: usize = 76;

/// The step timeout of a hardening step: a recipe gives hardening no timeout of its own, and
/// bake's local runner allows it half an hour, so its component does too.
const HARDENING_TIMEOUT_SECS: u64 = 30 * 60;

/// How the recipe is compiled.
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    /// Add the recipe's launch templates and SSM parameters to the distribution, so Image
    /// Builder publishes each image itself (for pipelines that run without bake). `bake build
    /// --engine imagebuilder` leaves this off: `bake publish` publishes, looking before it
    /// changes anything and recording what it did in the manifest.
    pub publish: bool,
    /// A schedule (`cron(…)` or `rate(…)`) for an image pipeline; no pipeline without one.
    pub schedule: Option<String>,
    /// The default region: where a container recipe whose ECR target names no region builds.
    pub region: Option<String>,
    /// The S3 bucket that delivers files too large to write into a component document
    /// ([`INLINE_FILE_LIMIT`]); without one they are written in, up to the document limit.
    pub file_bucket: Option<String>,
}

/// A `file` provisioner's single file larger than this, written into a document (after
/// compression and base64), goes through [`CompileOptions::file_bucket`] instead: it leaves a
/// quarter of the 16,000-character document for the step around it.
pub const INLINE_FILE_LIMIT: usize = 12_000;

/// A file delivered through S3: uploaded by the engine before the components are created,
/// fetched by the component's `S3Download` step, checked against its digest and installed by
/// the bash step after it. Keys are content-addressed (`bake/files/SHA256`), so the same bytes
/// are one object whatever the version, and an object never changes once written.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveredFile {
    pub bucket: String,
    pub key: String,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
    pub size: u64,
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

impl DeliveredFile {
    fn new(bucket: &str, bytes: Vec<u8>) -> DeliveredFile {
        let sha256 = crate::id::Digest::of(&bytes).hex().to_owned();
        DeliveredFile {
            bucket: bucket.to_owned(),
            key: format!("bake/files/{sha256}"),
            sha256,
            size: bytes.len() as u64,
            bytes,
        }
    }

    /// `s3://BUCKET/KEY`.
    pub fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// Where the build instance keeps it between download and install.
    fn staging_path(&self) -> String {
        format!("/tmp/bake-files/{}", self.sha256)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("recipe `{recipe}` has no `outputs.ami`: Image Builder builds AMIs from it")]
    NoAmi { recipe: String },
    #[error(
        "recipe `{recipe}` has both `outputs.oci` and `outputs.ami`: an Image Builder build makes one or the other"
    )]
    AmiAndOci { recipe: String },
    #[error(
        "recipe `{recipe}` has `outputs.oci` and no `publish.ecr` repository: Image Builder pushes container images to ECR"
    )]
    NoEcrTarget { recipe: String },
    #[error(
        "recipe `{recipe}` starts from `base: {base}`, and Image Builder builds containers on a registry image"
    )]
    NotImageBase { recipe: String, base: &'static str },
    #[error("no region for the ECR repository `{repository}` of recipe `{recipe}`")]
    NoRegion { recipe: String, repository: String },
    #[error("recipe `{recipe}` starts from `base: {base}`, and Image Builder builds on an AMI")]
    NotAmiBase { recipe: String, base: &'static str },
    #[error(
        "{what} of recipe `{recipe}` uses a sensitive variable, and Image Builder keeps component documents and resource settings in the clear"
    )]
    Secret { recipe: String, what: String },
    #[error(
        "component `{component}` is {size} characters, over Image Builder's limit of {COMPONENT_DATA_LIMIT}"
    )]
    TooLarge { component: String, size: usize },
    #[error("hardening profile `{profile}` is not one bake ships")]
    UnknownProfile { profile: String },
    #[error("failed to read `{}`", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error("failed to write component document `{component}` as YAML")]
    Yaml {
        component: String,
        #[source]
        source: serde_saphyr::SerializeError,
    },
}

impl CompileError {
    pub fn hint(&self) -> Option<String> {
        match self {
            CompileError::NotAmiBase { .. } => Some(
                "give the recipe an `ami` base (a source AMI filter or SSM parameter), or build it locally without `--engine imagebuilder`".into(),
            ),
            CompileError::Secret { .. } => Some(
                "read the secret at build time instead (from SSM Parameter Store or Secrets Manager, with the instance profile's permissions)".into(),
            ),
            CompileError::TooLarge { .. } => Some(
                "split the step, or install large files from a package or an S3 object the step downloads".into(),
            ),
            CompileError::AmiAndOci { .. } => Some(
                "build the AMI and the container image from two recipes, or build locally (`bake build` without `--engine`)".into(),
            ),
            CompileError::NoEcrTarget { .. } => Some(
                "add the repository under `publish.ecr` (Image Builder's container recipe pushes to it)".into(),
            ),
            CompileError::NotImageBase { .. } => Some(
                "give the recipe an `image` base (`base: {image: REGISTRY/NAME:TAG}`), or build it locally without `--engine imagebuilder`".into(),
            ),
            CompileError::NoRegion { .. } => Some(
                "give the ECR target a `region`, or set a default region (`--region`, `AWS_REGION`)".into(),
            ),
            _ => None,
        }
    }

    /// Whether the recipe (not the machine) is at fault.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, CompileError::Io { .. } | CompileError::Yaml { .. })
    }
}

/// Everything a recipe compiles to, in the shapes of Image Builder's API requests (camelCase
/// members, as `CreateComponent` and the others take them).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Compiled {
    pub recipe: String,
    pub version: String,
    /// Where the image is built (the recipe's first region).
    pub region: String,
    pub components: Vec<Component>,
    /// For `outputs.ami`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_recipe: Option<ImageRecipe>,
    /// For `outputs.oci`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_recipe: Option<ContainerRecipe>,
    /// Files the components fetch from S3 (uploaded before the components are created).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<DeliveredFile>,
    pub infrastructure_configuration: InfrastructureConfiguration,
    pub distribution_configuration: DistributionConfiguration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pipeline: Option<ImagePipeline>,
    /// Parts of the recipe Image Builder does not run, each with why.
    pub not_compiled: Vec<String>,
}

/// Whether a component runs while building or while testing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentKind {
    Build,
    Test,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    pub name: String,
    pub semantic_version: String,
    pub description: String,
    pub platform: String,
    /// The AWSTOE document (YAML).
    pub data: String,
    pub tags: BTreeMap<String, String>,
    #[serde(skip)]
    pub kind: ComponentKind,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecipe {
    pub name: String,
    pub semantic_version: String,
    pub description: String,
    pub parent_image: String,
    /// Component names, in build order (their ARNs are known once they exist).
    pub components: Vec<String>,
    pub block_device_mappings: Vec<BlockDeviceMapping>,
    pub tags: BTreeMap<String, String>,
}

/// A container recipe: the components run in a Docker build on the parent image, and the
/// image is pushed to the target ECR repository.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRecipe {
    pub container_type: String,
    pub name: String,
    pub semantic_version: String,
    pub description: String,
    /// The recipe's `image` base, pinned by the digest the plan resolved.
    pub parent_image: String,
    /// Component names, in build order (their ARNs are known once they exist).
    pub components: Vec<String>,
    pub dockerfile_template_data: String,
    pub target_repository: TargetRepository,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetRepository {
    pub service: String,
    pub repository_name: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerDistribution {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub container_tags: Vec<String>,
    pub target_repository: TargetRepository,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockDeviceMapping {
    pub device_name: String,
    pub ebs: Ebs,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ebs {
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    pub volume_size: u32,
    pub volume_type: String,
    pub delete_on_termination: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InfrastructureConfiguration {
    pub name: String,
    pub description: String,
    pub instance_types: Vec<String>,
    pub instance_profile_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    pub terminate_instance_on_failure: bool,
    pub instance_metadata_options: InstanceMetadataOptions,
    /// Tags on the build and test instances (and their volumes).
    pub resource_tags: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceMetadataOptions {
    pub http_tokens: String,
    pub http_put_response_hop_limit: i32,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DistributionConfiguration {
    pub name: String,
    pub description: String,
    pub distributions: Vec<Distribution>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Distribution {
    pub region: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ami_distribution_configuration: Option<AmiDistribution>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_distribution_configuration: Option<ContainerDistribution>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub launch_template_configurations: Vec<LaunchTemplateConfiguration>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ssm_parameter_configurations: Vec<SsmParameterConfiguration>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AmiDistribution {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub ami_tags: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launch_permission: Option<LaunchPermission>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchPermission {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_ids: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub user_groups: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub organization_arns: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub organizational_unit_arns: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchTemplateConfiguration {
    pub launch_template_id: String,
    pub set_default_version: bool,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SsmParameterConfiguration {
    pub parameter_name: String,
    pub data_type: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImagePipeline {
    pub name: String,
    pub description: String,
    pub schedule: Schedule,
    pub image_tests_configuration: ImageTestsConfiguration,
    pub status: String,
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Schedule {
    pub schedule_expression: String,
    pub pipeline_execution_start_condition: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageTestsConfiguration {
    pub image_tests_enabled: bool,
}

impl Compiled {
    /// The image or container recipe's name (also its images' name).
    pub fn recipe_name(&self) -> &str {
        match (&self.image_recipe, &self.container_recipe) {
            (Some(recipe), _) => &recipe.name,
            (None, Some(recipe)) => &recipe.name,
            (None, None) => "",
        }
    }

    /// The version's tags (every resource carries them).
    pub fn tags(&self) -> &BTreeMap<String, String> {
        &self.infrastructure_configuration.tags
    }

    /// Whether the image has tests to run (a test component).
    pub fn has_tests(&self) -> bool {
        self.components
            .iter()
            .any(|c| c.kind == ComponentKind::Test)
    }
}

/// The name of the resources of `recipe` at `version`: `NAME-SHORT`, in Image Builder's
/// alphabet (bake allows `.` in recipe names, Image Builder does not).
pub fn resource_name(recipe: &str, plan: &Plan) -> String {
    version_resource_name(recipe, &plan.version)
}

/// [`resource_name`] of `recipe` at `version`: also the image recipe's (and so its images')
/// name, which is how `bake cleanup` finds a version's images.
pub fn version_resource_name(recipe: &str, version: &crate::id::Version) -> String {
    format!("{}-{}", recipe.replace('.', "-"), version.short())
}

/// The tags every resource of a version carries.
pub fn version_tags(recipe: &Recipe, plan: &Plan) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TAG_RECIPE.to_owned(), recipe.name.clone()),
        (TAG_VERSION.to_owned(), plan.version.to_string()),
    ])
}

/// Compiles `recipe`, planned as `plan` with its source AMI pinned as `source`.
pub fn compile(
    recipe: &Recipe,
    plan: &Plan,
    source: &SourceAmi,
    options: &CompileOptions,
) -> Result<Compiled, CompileError> {
    if recipe.outputs.oci.is_some() {
        return compile_container(recipe, plan, options);
    }
    let ami = recipe
        .outputs
        .ami
        .as_ref()
        .ok_or_else(|| CompileError::NoAmi {
            recipe: recipe.name.clone(),
        })?;
    if !matches!(recipe.base, Base::Ami(_)) {
        return Err(CompileError::NotAmiBase {
            recipe: recipe.name.clone(),
            base: base_kind(&recipe.base),
        });
    }
    let name = resource_name(&recipe.name, plan);
    let tags = version_tags(recipe, plan);
    let description = format!("bake recipe {} at {}", recipe.name, plan.version);
    let renderer = Renderer::default();
    let text = Texts {
        recipe,
        renderer: &renderer,
        plan,
    };
    let mut not_compiled = Vec::new();

    let mut files = Vec::new();
    let components = components(
        &text,
        &name,
        &tags,
        options.file_bucket.as_deref(),
        &mut files,
        &mut not_compiled,
    )?;
    if ami.deprecate_after.is_some() {
        not_compiled.push(
            "deprecate_after: Image Builder deprecates through lifecycle policies, which bake does not create".into(),
        );
    }

    let region = ami.regions[0].clone();
    let settings = ami.instance.as_ref();
    let image_recipe = ImageRecipe {
        name: name.clone(),
        semantic_version: SEMANTIC_VERSION.into(),
        description: description.clone(),
        parent_image: source.image_id.clone(),
        components: components.iter().map(|c| c.name.clone()).collect(),
        block_device_mappings: vec![BlockDeviceMapping {
            device_name: source
                .root_device_name
                .clone()
                .unwrap_or_else(|| "/dev/xvda".into()),
            ebs: Ebs {
                encrypted: ami.encrypted,
                kms_key_id: ami
                    .region_kms_key_ids
                    .get(&region)
                    .or(ami.kms_key_id.as_ref())
                    .filter(|_| ami.encrypted)
                    .cloned(),
                volume_size: settings
                    .and_then(|s| s.root_volume_gib)
                    .unwrap_or(ami.disk_size_gib),
                volume_type: ami.volume_type.clone(),
                delete_on_termination: true,
            },
        }],
        tags: tags.clone(),
    };
    let infrastructure_configuration = InfrastructureConfiguration {
        name: name.clone(),
        description: description.clone(),
        instance_types: vec![
            settings
                .map(|s| s.instance_type.clone())
                .unwrap_or_else(|| DEFAULT_INSTANCE_TYPE.into()),
        ],
        instance_profile_name: settings
            .and_then(|s| s.iam_instance_profile.clone())
            .unwrap_or_else(|| DEFAULT_INSTANCE_PROFILE.into()),
        subnet_id: settings.and_then(|s| s.subnet_id.clone()),
        terminate_instance_on_failure: true,
        instance_metadata_options: InstanceMetadataOptions {
            http_tokens: "required".into(),
            http_put_response_hop_limit: 1,
        },
        resource_tags: tags.clone(),
        tags: tags.clone(),
    };

    let mut distributions = Vec::new();
    for region in &ami.regions {
        let public = Context::new(recipe, Some(&plan.version), Some(region), Secrets::Redact);
        let secret = Context::new(recipe, Some(&plan.version), Some(region), Secrets::Reveal);
        let both =
            |template: &Template, what: &str| text.render_in(template, &public, &secret, what);
        let mut ami_tags = BTreeMap::new();
        for (key, value) in &ami.tags {
            ami_tags.insert(key.clone(), both(value, &format!("AMI tag `{key}`"))?);
        }
        ami_tags.extend(tags.clone());
        let permission = LaunchPermission {
            user_ids: ami.share_accounts.clone(),
            user_groups: if ami.public {
                vec!["all".into()]
            } else {
                Vec::new()
            },
            organization_arns: ami.share_organizations.clone(),
            organizational_unit_arns: ami.share_organizational_units.clone(),
        };
        let shared = !(permission.user_ids.is_empty()
            && permission.user_groups.is_empty()
            && permission.organization_arns.is_empty()
            && permission.organizational_unit_arns.is_empty());
        let mut distribution = Distribution {
            region: region.clone(),
            ami_distribution_configuration: Some(AmiDistribution {
                name: both(&ami.name, "the AMI name")?,
                description: ami
                    .description
                    .as_ref()
                    .map(|d| both(d, "the AMI description"))
                    .transpose()?,
                ami_tags,
                kms_key_id: ami
                    .region_kms_key_ids
                    .get(region)
                    .or(ami.kms_key_id.as_ref())
                    .filter(|_| ami.encrypted)
                    .cloned(),
                launch_permission: shared.then_some(permission),
            }),
            container_distribution_configuration: None,
            launch_template_configurations: Vec::new(),
            ssm_parameter_configurations: Vec::new(),
        };
        if options.publish {
            for target in &recipe.publish.launch_templates {
                if target.regions.as_ref().is_some_and(|r| !r.contains(region)) {
                    continue;
                }
                match &target.template {
                    LaunchTemplateRef::Id(id) => distribution.launch_template_configurations.push(
                        LaunchTemplateConfiguration {
                            launch_template_id: id.clone(),
                            set_default_version: target.set_default,
                        },
                    ),
                    LaunchTemplateRef::Name(template) => not_compiled.push(format!(
                        "launch template `{template}` in {region}: Image Builder takes launch templates by id (`id: lt-…` in the recipe)"
                    )),
                }
            }
            for target in &recipe.publish.ssm_parameters {
                if target.regions.as_ref().is_some_and(|r| !r.contains(region)) {
                    continue;
                }
                distribution
                    .ssm_parameter_configurations
                    .push(SsmParameterConfiguration {
                        parameter_name: both(&target.name, "an SSM parameter name")?,
                        data_type: "aws:ec2:image".into(),
                    });
            }
        }
        distributions.push(distribution);
    }
    let distribution_configuration = DistributionConfiguration {
        name: name.clone(),
        description: description.clone(),
        distributions,
        tags: tags.clone(),
    };
    let has_tests = components.iter().any(|c| c.kind == ComponentKind::Test);
    let image_pipeline = options.schedule.as_ref().map(|schedule| ImagePipeline {
        name: recipe.name.replace('.', "-"),
        description: format!("bake recipe {}", recipe.name),
        schedule: Schedule {
            schedule_expression: schedule.clone(),
            pipeline_execution_start_condition: "EXPRESSION_MATCH_ONLY".into(),
        },
        image_tests_configuration: ImageTestsConfiguration {
            image_tests_enabled: has_tests,
        },
        status: "ENABLED".into(),
        tags: tags.clone(),
    });
    Ok(Compiled {
        recipe: recipe.name.clone(),
        version: plan.version.to_string(),
        region,
        components,
        image_recipe: Some(image_recipe),
        container_recipe: None,
        files,
        infrastructure_configuration,
        distribution_configuration,
        image_pipeline,
        not_compiled,
    })
}

/// The build components (one per provisioner) and the test component (the `command` tests) of
/// the recipe `text` renders, named `NAME-N` and `NAME-tests`; what Image Builder cannot run
/// goes to `not_compiled`. Image and container recipes use the same.
fn components(
    text: &Texts,
    name: &str,
    tags: &BTreeMap<String, String>,
    bucket: Option<&str>,
    files: &mut Vec<DeliveredFile>,
    not_compiled: &mut Vec<String>,
) -> Result<Vec<Component>, CompileError> {
    let recipe = text.recipe;
    let mut components = Vec::new();
    for (index, provisioner) in recipe.provisioners.iter().enumerate() {
        let step_name = step_name(index + 1, &provisioner.name);
        let what = format!("provisioner `{}`", provisioner.name);
        let delivered = files.len();
        let (commands, timeout) = match &provisioner.step {
            Step::Shell(shell) => (shell_commands(text, shell, &what)?, shell.timeout.as_secs()),
            Step::File(file) => (file_commands(text, file, &what, bucket, files)?, 0),
            Step::Hardening(hardening) => {
                let flavour = crate::plan::hardening_flavour(recipe, hardening);
                let script = crate::build::hardening::script(
                    &hardening.profile,
                    flavour,
                    &hardening.exclude,
                )
                .ok_or_else(|| CompileError::UnknownProfile {
                    profile: hardening.profile.clone(),
                })?;
                (
                    run_script(&script, &BTreeMap::new(), None, None),
                    HARDENING_TIMEOUT_SECS,
                )
            }
        };
        let component = format!("{name}-{}", index + 1);
        let document = Document {
            name: component.clone(),
            description: format!("{}: {}", recipe.name, provisioner.name),
            schema_version: "1.0",
            phases: vec![Phase {
                name: "build",
                steps: match files.last().filter(|_| files.len() > delivered) {
                    Some(file) => vec![
                        DocStep::s3_download(format!("{step_name}Fetch"), file),
                        DocStep::bash(step_name, commands, timeout),
                    ],
                    None => vec![DocStep::bash(step_name, commands, timeout)],
                },
            }],
        };
        components.push(Component {
            name: component.clone(),
            semantic_version: SEMANTIC_VERSION.into(),
            description: document.description.clone(),
            platform: "Linux".into(),
            data: document.to_yaml()?,
            tags: tags.clone(),
            kind: ComponentKind::Build,
        });
    }

    let mut test_steps = Vec::new();
    for test in &recipe.tests {
        match test {
            Test::Command {
                name: test_name,
                run,
                exit_code,
                stdout_contains,
                user,
                timeout,
                ..
            } => {
                let what = format!("test `{test_name}`");
                let script = text.render(run, &what)?;
                let expected = stdout_contains
                    .as_ref()
                    .map(|t| text.render(t, &what))
                    .transpose()?;
                test_steps.push(DocStep::bash(
                    step_name(test_steps.len() + 1, test_name),
                    test_commands(&script, *exit_code, expected.as_deref(), user.as_deref()),
                    timeout.as_secs(),
                ));
            }
            Test::Boot { marker, .. } => not_compiled.push(format!(
                "boot test (marker `{marker}`): Image Builder's test stage launches the new AMI, but bake cannot read its console there"
            )),
        }
    }
    if recipe.audit.is_some() {
        not_compiled.push("audit: the compliance gate scans a local root only".into());
    }
    if !test_steps.is_empty() {
        let component = format!("{name}-tests");
        let document = Document {
            name: component.clone(),
            description: format!("{}: tests", recipe.name),
            schema_version: "1.0",
            phases: vec![Phase {
                name: "test",
                steps: test_steps,
            }],
        };
        components.push(Component {
            name: component,
            semantic_version: SEMANTIC_VERSION.into(),
            description: document.description.clone(),
            platform: "Linux".into(),
            data: document.to_yaml()?,
            tags: tags.clone(),
            kind: ComponentKind::Test,
        });
    }
    for component in &components {
        if component.data.len() > COMPONENT_DATA_LIMIT {
            return Err(CompileError::TooLarge {
                component: component.name.clone(),
                size: component.data.len(),
            });
        }
    }
    Ok(components)
}

/// The Dockerfile template of a container recipe: Image Builder's parent image, environment and
/// components placeholders, then the image settings of `outputs.oci`.
fn dockerfile(text: &Texts, oci: &crate::recipe::OciOutput) -> Result<String, CompileError> {
    let json = |value: &str| serde_json::to_string(value).expect("strings serialize");
    let mut lines = vec![
        "FROM {{{ imagebuilder:parentImage }}}".to_owned(),
        "{{{ imagebuilder:environments }}}".to_owned(),
        "{{{ imagebuilder:components }}}".to_owned(),
    ];
    for (key, value) in &oci.env {
        let value = text.render(value, &format!("environment variable `{key}`"))?;
        lines.push(format!("ENV {key}={}", json(&value)));
    }
    for (key, value) in &oci.labels {
        let value = text.render(value, &format!("label `{key}`"))?;
        lines.push(format!("LABEL {}={}", json(key), json(&value)));
    }
    for port in &oci.ports {
        lines.push(format!("EXPOSE {port}"));
    }
    if let Some(signal) = &oci.stop_signal {
        lines.push(format!("STOPSIGNAL {signal}"));
    }
    if let Some(workdir) = &oci.workdir {
        lines.push(format!("WORKDIR {workdir}"));
    }
    if let Some(user) = &oci.user {
        lines.push(format!("USER {user}"));
    }
    for (instruction, words) in [("ENTRYPOINT", &oci.entrypoint), ("CMD", &oci.cmd)] {
        if let Some(words) = words {
            let rendered = words
                .iter()
                .map(|w| text.render(w, &format!("`{}`", instruction.to_ascii_lowercase())))
                .collect::<Result<Vec<_>, _>>()?;
            lines.push(format!(
                "{instruction} {}",
                serde_json::to_string(&rendered).expect("strings serialize")
            ));
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    Ok(out)
}

/// Compiles a recipe with `outputs.oci`: a container recipe on its `image` base (pinned by the
/// plan's digest) that pushes to its first `publish.ecr` repository, the same components as an
/// image recipe, a distribution that names the repository and the target's tags, and the
/// infrastructure configuration (Image Builder's defaults: `outputs.ami.instance` does not
/// apply).
pub fn compile_container(
    recipe: &Recipe,
    plan: &Plan,
    options: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let oci = recipe
        .outputs
        .oci
        .as_ref()
        .expect("compile_container is for recipes with outputs.oci");
    if recipe.outputs.ami.is_some() {
        return Err(CompileError::AmiAndOci {
            recipe: recipe.name.clone(),
        });
    }
    let crate::plan::BaseIdentity::Image { repository, digest } = &plan.inputs.base else {
        return Err(CompileError::NotImageBase {
            recipe: recipe.name.clone(),
            base: base_kind(&recipe.base),
        });
    };
    let target = recipe
        .publish
        .ecr
        .first()
        .ok_or_else(|| CompileError::NoEcrTarget {
            recipe: recipe.name.clone(),
        })?;
    let region = target
        .region
        .clone()
        .or_else(|| options.region.clone())
        .ok_or_else(|| CompileError::NoRegion {
            recipe: recipe.name.clone(),
            repository: target.repository.clone(),
        })?;
    let name = resource_name(&recipe.name, plan);
    let tags = version_tags(recipe, plan);
    let description = format!("bake recipe {} at {}", recipe.name, plan.version);
    let renderer = Renderer::default();
    let text = Texts {
        recipe,
        renderer: &renderer,
        plan,
    };
    let mut not_compiled = Vec::new();
    let mut files = Vec::new();
    let components = components(
        &text,
        &name,
        &tags,
        options.file_bucket.as_deref(),
        &mut files,
        &mut not_compiled,
    )?;
    if recipe.publish.ecr.len() > 1 {
        not_compiled.push(format!(
            "publish.ecr beyond `{}`: Image Builder pushes to the container recipe's one repository (`bake push` of a local build reaches the others)",
            target.repository
        ));
    }
    let target_repository = TargetRepository {
        service: "ECR".into(),
        repository_name: target.repository.clone(),
    };
    let container_tags = target
        .tags
        .iter()
        .map(|t| text.render(t, &format!("tag of ECR repository `{}`", target.repository)))
        .collect::<Result<Vec<_>, _>>()?;
    let container_recipe = ContainerRecipe {
        container_type: "DOCKER".into(),
        name: name.clone(),
        semantic_version: SEMANTIC_VERSION.into(),
        description: description.clone(),
        parent_image: format!("{repository}@{digest}"),
        components: components.iter().map(|c| c.name.clone()).collect(),
        dockerfile_template_data: dockerfile(&text, oci)?,
        target_repository: target_repository.clone(),
        tags: tags.clone(),
    };
    let infrastructure_configuration = InfrastructureConfiguration {
        name: name.clone(),
        description: description.clone(),
        instance_types: vec![DEFAULT_INSTANCE_TYPE.into()],
        instance_profile_name: DEFAULT_INSTANCE_PROFILE.into(),
        subnet_id: None,
        terminate_instance_on_failure: true,
        instance_metadata_options: InstanceMetadataOptions {
            http_tokens: "required".into(),
            http_put_response_hop_limit: 1,
        },
        resource_tags: tags.clone(),
        tags: tags.clone(),
    };
    let distribution_configuration = DistributionConfiguration {
        name: name.clone(),
        description: description.clone(),
        distributions: vec![Distribution {
            region: region.clone(),
            ami_distribution_configuration: None,
            container_distribution_configuration: Some(ContainerDistribution {
                description: Some(description.clone()),
                container_tags,
                target_repository,
            }),
            launch_template_configurations: Vec::new(),
            ssm_parameter_configurations: Vec::new(),
        }],
        tags: tags.clone(),
    };
    let has_tests = components.iter().any(|c| c.kind == ComponentKind::Test);
    let image_pipeline = options.schedule.as_ref().map(|schedule| ImagePipeline {
        name: recipe.name.replace('.', "-"),
        description: format!("bake recipe {}", recipe.name),
        schedule: Schedule {
            schedule_expression: schedule.clone(),
            pipeline_execution_start_condition: "EXPRESSION_MATCH_ONLY".into(),
        },
        image_tests_configuration: ImageTestsConfiguration {
            image_tests_enabled: has_tests,
        },
        status: "ENABLED".into(),
        tags: tags.clone(),
    });
    Ok(Compiled {
        recipe: recipe.name.clone(),
        version: plan.version.to_string(),
        region,
        components,
        image_recipe: None,
        container_recipe: Some(container_recipe),
        files,
        infrastructure_configuration,
        distribution_configuration,
        image_pipeline,
        not_compiled,
    })
}

fn base_kind(base: &Base) -> &'static str {
    match base {
        Base::Scratch => "scratch",
        Base::Image { .. } => "image",
        Base::OciLayout { .. } => "oci_layout",
        Base::Rootfs { .. } => "rootfs",
        Base::Bootstrap(_) => "bootstrap",
        Base::Recipe { .. } => "recipe",
        Base::Ami(_) => "ami",
    }
}

/// Renders templates for documents, refusing any that a secret would change.
struct Texts<'a> {
    recipe: &'a Recipe,
    renderer: &'a Renderer,
    plan: &'a Plan,
}

impl Texts<'_> {
    fn render(&self, template: &Template, what: &str) -> Result<String, CompileError> {
        let public = Context::new(self.recipe, Some(&self.plan.version), None, Secrets::Redact);
        let secret = Context::new(self.recipe, Some(&self.plan.version), None, Secrets::Reveal);
        self.render_in(template, &public, &secret, what)
    }

    fn render_in(
        &self,
        template: &Template,
        public: &Context,
        secret: &Context,
        what: &str,
    ) -> Result<String, CompileError> {
        let shown = self.renderer.render(template, public)?;
        let real = self.renderer.render(template, secret)?;
        if shown != real {
            return Err(CompileError::Secret {
                recipe: self.recipe.name.clone(),
                what: what.to_owned(),
            });
        }
        Ok(real)
    }
}

/// An AWSTOE step name: the step's position and its name's letters and digits (AWSTOE allows
/// `[A-Za-z0-9_-]`, at most 128 characters).
fn step_name(position: usize, name: &str) -> String {
    let mut out = format!("Step{position}");
    for word in name.split(|c: char| !c.is_ascii_alphanumeric()) {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            out.push(first.to_ascii_uppercase());
            out.extend(chars);
        }
    }
    out.truncate(128);
    out
}

/// `text` quoted for the shell (single quotes).
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Shell lines that write `bytes` into the file named by the shell expression `target`:
/// as a quoted here-document when that is exact and readable, else gzip + base64.
fn write_bytes(bytes: &[u8], target: &str) -> String {
    if let Ok(text) = std::str::from_utf8(bytes)
        && bytes.len() <= PLAIN_TEXT_LIMIT
        && !text.contains("{{")
        && text.ends_with('\n')
    {
        let mut delimiter = String::from("BAKE_EOF");
        while text.lines().any(|l| l == delimiter) {
            delimiter.push('_');
        }
        return format!("cat >{target} <<'{delimiter}'\n{text}{delimiter}\n");
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder
        .write_all(bytes)
        .and_then(|()| encoder.flush())
        .expect("compressing into memory cannot fail");
    let compressed = encoder
        .finish()
        .expect("compressing into memory cannot fail");
    let encoded = base64::engine::general_purpose::STANDARD.encode(compressed);
    let mut lines = String::new();
    for chunk in encoded.as_bytes().chunks(BASE64_LINE) {
        lines.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        lines.push('\n');
    }
    format!("base64 -d <<'BAKE_EOF' | gzip -dc >{target}\n{lines}BAKE_EOF\n")
}

/// Shell lines that write a script (or a test's expected text) into `target`. A missing final
/// newline is added, which changes neither what a script does nor what `case` matches, and
/// keeps the usual one-line command readable in the document.
fn write_script(text: &str, target: &str) -> String {
    if text.ends_with('\n') {
        write_bytes(text.as_bytes(), target)
    } else {
        write_bytes(format!("{text}\n").as_bytes(), target)
    }
}

/// Commands that run `script` as bake's runner does: `/bin/sh -e`, with `env`, as `user`, in
/// `workdir`.
fn run_script(
    script: &str,
    env: &BTreeMap<String, String>,
    user: Option<&str>,
    workdir: Option<&str>,
) -> String {
    let mut commands = String::from("set -eu\nscript=$(mktemp)\ntrap 'rm -f \"$script\"' EXIT\n");
    commands.push_str(&write_script(script, "\"$script\""));
    commands.push_str("chmod 0755 \"$script\"\n");
    if let Some(dir) = workdir {
        commands.push_str(&format!("cd {}\n", quote(dir)));
    }
    let mut line = String::new();
    if let Some(user) = user {
        line.push_str(&format!("runuser -u {} -- ", quote(user)));
    }
    if !env.is_empty() {
        line.push_str("env");
        for (key, value) in env {
            line.push_str(&format!(" {key}={}", quote(value)));
        }
        line.push(' ');
    }
    line.push_str("/bin/sh -e \"$script\"\n");
    commands.push_str(&line);
    commands
}

fn shell_commands(text: &Texts<'_>, shell: &ShellStep, what: &str) -> Result<String, CompileError> {
    let script = match &shell.script {
        Script::Inline(template) => text.render(template, what)?,
        Script::File {
            template: Some(template),
            ..
        } => text.render(template, what)?,
        Script::File {
            path,
            template: None,
            ..
        } => read_text(path)?,
    };
    let mut env = BTreeMap::new();
    for (key, value) in &shell.env {
        env.insert(key.clone(), text.render(value, what)?);
    }
    Ok(run_script(
        &script,
        &env,
        shell.user.as_deref(),
        shell.workdir.as_deref(),
    ))
}

fn read_text(path: &Path) -> Result<String, CompileError> {
    fs_err::read_to_string(path).map_err(|source| CompileError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Commands that copy a `file` step's source into the image as bake's runner does: a
/// destination ending in `/` (or an existing directory) receives the source under its own name;
/// a directory's contents merge into the destination; files keep their modes unless the step
/// sets one; everything is owned by the step's owner (root by default).
fn file_commands(
    text: &Texts<'_>,
    file: &FileStep,
    what: &str,
    bucket: Option<&str>,
    files: &mut Vec<DeliveredFile>,
) -> Result<String, CompileError> {
    use std::os::unix::fs::PermissionsExt;
    let destination = text.render(&file.destination, what)?;
    let templates: BTreeMap<&Path, &Template> = file
        .templates
        .iter()
        .map(|(p, t)| (p.as_path(), t))
        .collect();
    let (uid, gid) = file.owner.unwrap_or((0, 0));
    let owner = format!("{uid}:{gid}");
    let source_name = file
        .source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CompileError::Io { path, source }
    };
    let mut commands = format!("set -eu\ndest={}\n", quote(&destination));
    commands.push_str(&format!(
        "case \"$dest\" in */) dest=\"$dest\"{} ;; *) if [ -d \"$dest\" ]; then dest=\"$dest/\"{}; fi ;; esac\n",
        quote(&source_name),
        quote(&source_name)
    ));
    let meta = fs_err::symlink_metadata(&file.source).map_err(io(&file.source))?;
    if !meta.is_dir() {
        let bytes = match templates.get(Path::new("")) {
            Some(template) => text.render(template, what)?.into_bytes(),
            None => fs_err::read(&file.source).map_err(io(&file.source))?,
        };
        let mode = file.mode.unwrap_or(meta.permissions().mode() & 0o7777);
        commands.push_str("mkdir -p \"$(dirname \"$dest\")\"\n");
        let written = write_bytes(&bytes, "\"$dest\"");
        match bucket.filter(|_| written.len() > INLINE_FILE_LIMIT) {
            Some(bucket) => {
                let delivered = DeliveredFile::new(bucket, bytes);
                let staged = quote(&delivered.staging_path());
                commands.push_str(&format!(
                    "printf '%s  %s\\n' {} {staged} | sha256sum -c --status -\ncat {staged} >\"$dest\"\nrm -f {staged}\n",
                    delivered.sha256,
                ));
                files.push(delivered);
            }
            None => commands.push_str(&written),
        }
        commands.push_str(&format!(
            "chmod {mode:04o} \"$dest\"\nchown {owner} \"$dest\"\n"
        ));
        return Ok(commands);
    }
    commands.push_str(&format!("mkdir -p \"$dest\"\nchown {owner} \"$dest\"\n"));
    for entry in walkdir::WalkDir::new(&file.source)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
    {
        let entry = entry.map_err(|e| CompileError::Io {
            path: file.source.clone(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk")),
        })?;
        let relative = entry
            .path()
            .strip_prefix(&file.source)
            .unwrap_or(entry.path());
        let target = format!(
            "\"$dest\"/{}",
            quote(&relative.to_string_lossy().replace('\\', "/"))
        );
        let meta = fs_err::symlink_metadata(entry.path()).map_err(io(entry.path()))?;
        let own_mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            commands.push_str(&format!(
                "mkdir -p {target}\nchmod {own_mode:04o} {target}\nchown {owner} {target}\n"
            ));
        } else if meta.file_type().is_symlink() {
            let link = fs_err::read_link(entry.path()).map_err(io(entry.path()))?;
            commands.push_str(&format!(
                "ln -sfn {} {target}\nchown -h {owner} {target}\n",
                quote(&link.to_string_lossy())
            ));
        } else {
            let bytes = match templates.get(relative) {
                Some(template) => text.render(template, what)?.into_bytes(),
                None => fs_err::read(entry.path()).map_err(io(entry.path()))?,
            };
            let mode = file.mode.unwrap_or(own_mode);
            commands.push_str(&write_bytes(&bytes, &target));
            commands.push_str(&format!(
                "chmod {mode:04o} {target}\nchown {owner} {target}\n"
            ));
        }
    }
    Ok(commands)
}

/// Commands that run a `command` test: its exit code and, when given, text its output must
/// contain.
fn test_commands(
    script: &str,
    exit_code: i32,
    expected: Option<&str>,
    user: Option<&str>,
) -> String {
    let mut commands = String::from(
        "set -u\nscript=$(mktemp)\nout=$(mktemp)\ntrap 'rm -f \"$script\" \"$out\"' EXIT\n",
    );
    commands.push_str(&write_script(script, "\"$script\""));
    commands.push_str("chmod 0755 \"$script\"\n");
    let runner = match user {
        Some(user) => format!("runuser -u {} -- ", quote(user)),
        None => String::new(),
    };
    commands.push_str(&format!(
        "{runner}/bin/sh -e \"$script\" >\"$out\"\ncode=$?\ncat \"$out\"\n"
    ));
    commands.push_str(&format!(
        "if [ \"$code\" -ne {exit_code} ]; then echo \"exited with $code, expected {exit_code}\" >&2; exit 1; fi\n"
    ));
    if let Some(expected) = expected {
        commands.push_str("expected=$(mktemp)\n");
        commands.push_str(&write_script(expected, "\"$expected\""));
        // The expected text, whole, anywhere in the output (quoted in a `case` pattern, it
        // matches literally); command substitution drops trailing newlines from both.
        commands.push_str(
            "case \"$(cat \"$out\")\" in\n  *\"$(cat \"$expected\")\"*) ;;\n  *) echo 'the output does not contain the expected text' >&2; exit 1 ;;\nesac\n",
        );
    }
    commands
}

/// An AWSTOE component document (the subset bake writes).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    name: String,
    description: String,
    schema_version: &'static str,
    phases: Vec<Phase>,
}

#[derive(Serialize)]
struct Phase {
    name: &'static str,
    steps: Vec<DocStep>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DocStep {
    name: String,
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_seconds: Option<u64>,
    on_failure: &'static str,
    inputs: StepInputs,
}

#[derive(Serialize)]
#[serde(untagged)]
enum StepInputs {
    Bash(BashInputs),
    /// `S3Download`: a list of objects to fetch.
    S3Download(Vec<S3DownloadInput>),
}

#[derive(Serialize)]
struct BashInputs {
    commands: Vec<serde_saphyr::LitString>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct S3DownloadInput {
    source: String,
    destination: String,
    overwrite: bool,
}

impl DocStep {
    fn bash(name: String, commands: String, timeout_secs: u64) -> DocStep {
        DocStep {
            name,
            action: "ExecuteBash",
            timeout_seconds: (timeout_secs > 0).then_some(timeout_secs),
            on_failure: "Abort",
            inputs: StepInputs::Bash(BashInputs {
                commands: vec![serde_saphyr::LitString(commands)],
            }),
        }
    }

    /// Fetches `file` from its bucket to its staging path (the bash step that follows checks
    /// its digest and installs it).
    fn s3_download(name: String, file: &DeliveredFile) -> DocStep {
        DocStep {
            name,
            action: "S3Download",
            timeout_seconds: None,
            on_failure: "Abort",
            inputs: StepInputs::S3Download(vec![S3DownloadInput {
                source: file.uri(),
                destination: file.staging_path(),
                overwrite: true,
            }]),
        }
    }
}

impl Document {
    fn to_yaml(&self) -> Result<String, CompileError> {
        serde_saphyr::to_string(self).map_err(|source| CompileError::Yaml {
            component: self.name.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_keep_position_and_words() {
        assert_eq!(step_name(1, "sshd settings"), "Step1SshdSettings");
        assert_eq!(
            step_name(12, "kernel & logging: v2"),
            "Step12KernelLoggingV2"
        );
        assert!(step_name(3, &"x".repeat(300)).len() <= 128);
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn small_text_is_written_as_is_and_the_rest_compressed() {
        let plain = write_bytes(b"PermitRootLogin no\n", "\"$dest\"");
        assert!(
            plain.contains("<<'BAKE_EOF'\nPermitRootLogin no\nBAKE_EOF\n"),
            "{plain}"
        );
        // A line equal to the delimiter does not end the here-document early.
        let tricky = write_bytes(b"BAKE_EOF\n", "\"$dest\"");
        assert!(
            tricky.contains("<<'BAKE_EOF_'\nBAKE_EOF\nBAKE_EOF_\n"),
            "{tricky}"
        );
        // AWSTOE would read `{{ x }}` as its own variable: such text is encoded.
        let braces = write_bytes(b"echo {{ not_awstoe }}\n", "\"$dest\"");
        assert!(braces.starts_with("base64 -d") && !braces.contains("not_awstoe"));
        let binary = write_bytes(&[0, 159, 146, 150], "x");
        let encoded: String = binary
            .lines()
            .skip(1)
            .take_while(|l| *l != "BAKE_EOF")
            .collect();
        let compressed = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        let mut decoded = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&compressed[..]),
            &mut decoded,
        )
        .unwrap();
        assert_eq!(decoded, [0, 159, 146, 150]);
    }

    #[test]
    fn scripts_run_as_the_local_runner_runs_them() {
        let env = BTreeMap::from([("GREETING".to_owned(), "it's me".to_owned())]);
        let commands = run_script("echo hi\n", &env, Some("app"), Some("/srv"));
        assert!(commands.contains("cd '/srv'\n"), "{commands}");
        assert!(
            commands
                .contains("runuser -u 'app' -- env GREETING='it'\\''s me' /bin/sh -e \"$script\""),
            "{commands}"
        );
    }

    /// The export fixture, planned on a pinned source AMI, with `token` set to `secret` and
    /// `extra` (YAML list items) added to its provisioners.
    fn fixture(extra: &str, secret: &str) -> (tempfile::TempDir, Recipe, Plan, SourceAmi) {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/imagebuilder");
        let dir = tempfile::tempdir().unwrap();
        for entry in walkdir::WalkDir::new(fixtures.join("files")) {
            let entry = entry.unwrap();
            let target = dir
                .path()
                .join(entry.path().strip_prefix(&fixtures).unwrap());
            if entry.file_type().is_dir() {
                fs_err::create_dir_all(&target).unwrap();
            } else {
                fs_err::copy(entry.path(), &target).unwrap();
            }
        }
        let text = fs_err::read_to_string(fixtures.join("export.yaml"))
            .unwrap()
            .replace("provisioners:\n", &format!("provisioners:\n{extra}"));
        let path = dir.path().join("export.yaml");
        fs_err::write(&path, text).unwrap();
        let sources = crate::recipe::VarSources {
            cli: vec![("token".into(), secret.into())],
            files: Vec::new(),
            env: Vec::new(),
        };
        let recipe = crate::recipe::load(&path, &sources).unwrap();
        let source = SourceAmi {
            region: "us-east-1".into(),
            image_id: "ami-0123456789abcdef0".into(),
            name: Some("vendor-linux".into()),
            creation_date: None,
            owner_id: Some("123456789012".into()),
            architecture: Some("x86_64".into()),
            root_device_name: Some("/dev/xvda".into()),
            ssm_parameter: Some("/bake-test/export/ami".into()),
        };
        let options = crate::plan::PlanOptions {
            source_ami: Some(source.clone()),
            ..Default::default()
        };
        let plan = crate::plan::plan(&recipe, "export.yaml", &options).unwrap();
        (dir, recipe, plan, source)
    }

    #[test]
    fn a_recipe_compiles_to_versioned_resources_with_imdsv2_and_its_regions() {
        let (_dir, recipe, plan, source) = fixture("", "s3cr3t");
        let compiled = compile(&recipe, &plan, &source, &CompileOptions::default()).unwrap();
        let name = format!("export-test-{}", plan.version_short());
        let names: Vec<&str> = compiled
            .components
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                format!("{name}-1"),
                format!("{name}-2"),
                format!("{name}-3"),
                format!("{name}-tests")
            ]
        );
        assert!(compiled.has_tests());
        assert_eq!(
            compiled.image_recipe.as_ref().unwrap().parent_image,
            "ami-0123456789abcdef0"
        );
        assert_eq!(
            compiled.image_recipe.as_ref().unwrap().semantic_version,
            SEMANTIC_VERSION
        );
        let root = &compiled
            .image_recipe
            .as_ref()
            .unwrap()
            .block_device_mappings[0];
        assert_eq!(root.device_name, "/dev/xvda");
        assert_eq!(root.ebs.volume_size, 12);
        assert_eq!(root.ebs.kms_key_id.as_deref(), Some("alias/bake-ami"));
        let infra = &compiled.infrastructure_configuration;
        assert_eq!(infra.instance_metadata_options.http_tokens, "required");
        assert_eq!(
            infra.instance_metadata_options.http_put_response_hop_limit,
            1
        );
        assert!(infra.terminate_instance_on_failure);
        assert_eq!(infra.instance_types, ["t3.large"]);
        assert_eq!(infra.instance_profile_name, "BakeImageBuilder");
        let regions: Vec<&str> = compiled
            .distribution_configuration
            .distributions
            .iter()
            .map(|d| d.region.as_str())
            .collect();
        assert_eq!(regions, ["us-east-1", "eu-west-1"]);
        let eu = &compiled.distribution_configuration.distributions[1];
        assert_eq!(
            eu.ami_distribution_configuration.as_ref().unwrap().ami_tags["Name"],
            "export-test-eu-west-1"
        );
        assert_eq!(
            eu.ami_distribution_configuration.as_ref().unwrap().ami_tags[TAG_VERSION],
            plan.version.to_string()
        );
        assert_eq!(
            eu.ami_distribution_configuration
                .as_ref()
                .unwrap()
                .launch_permission
                .as_ref()
                .unwrap()
                .user_ids,
            ["111122223333"]
        );
        // Without `publish`, bake's own publish step owns launch templates and parameters.
        assert!(eu.launch_template_configurations.is_empty());
        assert!(eu.ssm_parameter_configurations.is_empty());
        assert!(compiled.image_pipeline.is_none());
        assert!(
            compiled
                .not_compiled
                .iter()
                .any(|n| n.contains("boot test"))
        );
        // The same plan compiles to the same resources.
        let again = compile(&recipe, &plan, &source, &CompileOptions::default()).unwrap();
        assert_eq!(
            serde_json::to_value(&again).unwrap(),
            serde_json::to_value(&compiled).unwrap()
        );

        let published = compile(
            &recipe,
            &plan,
            &source,
            &CompileOptions {
                publish: true,
                schedule: Some("rate(7 days)".into()),
                region: None,
                file_bucket: None,
            },
        )
        .unwrap();
        let us = &published.distribution_configuration.distributions[0];
        assert_eq!(
            us.launch_template_configurations[0].launch_template_id,
            "lt-0123456789abcdef0"
        );
        assert_eq!(
            us.ssm_parameter_configurations[0].parameter_name,
            "/bake-test/export/us-east-1/ami"
        );
        assert!(
            published
                .not_compiled
                .iter()
                .any(|n| n.contains("launch template `export-test`"))
        );
        let pipeline = published.image_pipeline.unwrap();
        assert_eq!(pipeline.schedule.schedule_expression, "rate(7 days)");
        assert!(pipeline.image_tests_configuration.image_tests_enabled);
    }

    #[test]
    fn documents_run_the_steps_and_tests_and_never_hold_a_secret() {
        let (_dir, recipe, plan, source) = fixture("", "s3cr3t-unused");
        let compiled = compile(&recipe, &plan, &source, &CompileOptions::default()).unwrap();
        for component in &compiled.components {
            assert!(
                !component.data.contains("s3cr3t-unused"),
                "{}",
                component.data
            );
            let document: serde_json::Value = serde_saphyr::from_str(&component.data).unwrap();
            assert_eq!(document["schemaVersion"], "1.0");
            assert_eq!(document["name"], component.name.as_str());
        }
        let conf = &compiled.components[0].data;
        // A directory's files, each with the step's mode; a file AWSTOE would misread is
        // encoded, the other is readable.
        assert!(conf.contains("chmod 0640 \"$dest\"/'app.conf'"), "{conf}");
        assert!(conf.contains("listen = 8080"), "{conf}");
        assert!(!conf.contains("{{ braces }}"), "{conf}");
        let shell = &compiled.components[2].data;
        assert!(
            shell.contains("env APP_ENV='staging' /bin/sh -e \"$script\""),
            "{shell}"
        );
        assert!(shell.contains("phases:\n- name: build\n") || shell.contains("- name: build"));
        let tests = &compiled.components[3].data;
        assert!(tests.contains("- name: test"), "{tests}");
        assert!(tests.contains("environment=staging"), "{tests}");
        assert!(tests.contains("Step1EnvironmentIsSet"), "{tests}");

        let (_dir, recipe, plan, source) = fixture(
            "  - shell:\n      name: uses the token\n      inline: echo '{{var.token}}'\n",
            "s3cr3t-used",
        );
        let error = compile(&recipe, &plan, &source, &CompileOptions::default()).unwrap_err();
        assert!(matches!(error, CompileError::Secret { .. }));
        let message = error.to_string();
        assert!(
            message.contains("provisioner `uses the token`"),
            "{message}"
        );
        assert!(!message.contains("s3cr3t-used"));
    }

    #[test]
    fn the_hardening_profile_fits_one_component_compressed() {
        let (_dir, recipe, plan, source) = fixture(
            "  - hardening:\n      profile: baseline\n      flavour: ami\n      exclude:\n        - rule: journald\n          reason: logs leave the instance\n",
            "x",
        );
        let compiled = compile(&recipe, &plan, &source, &CompileOptions::default()).unwrap();
        let hardening = &compiled.components[0];
        assert!(hardening.data.len() <= COMPONENT_DATA_LIMIT);
        assert!(
            hardening.data.contains("base64 -d <<'BAKE_EOF' | gzip -dc"),
            "{}",
            hardening.data
        );
        assert_eq!(
            serde_json::to_value(compiled.components[0].kind).unwrap(),
            "build"
        );
    }
}
