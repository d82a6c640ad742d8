//! The Image Builder engine's use cases: `bake build RECIPE --engine imagebuilder` (plan, compile,
//! hand the build to EC2 Image Builder, record the result), `bake import imagebuilder` (record an
//! image a pipeline made as the version it was built as) and `bake export imagebuilder` (write
//! the compiled component documents and the API calls that create everything). The recipe is
//! planned here (its source AMI resolved in AWS, or for an import the AMI the image was built
//! on), compiled and handed to [`crate::imagebuilder`].
//!
//! Environment: `BAKE_AWS_POLL_INTERVAL`, the pause between polls of a build (default 15s);
//! `BAKE_IMAGEBUILDER_BUCKET`, the bucket of files too large for a component document.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use super::{Context, ContextError};
use crate::ami::instance::{SourceAmi, SourceAmiError};
use crate::aws::Aws;
use crate::build::pipeline::BuildReporter;
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::imagebuilder::engine::client_token;
use crate::imagebuilder::{
    CompileError, CompileOptions, Compiled, Engine, EngineError, EngineOptions, ImageBuilderOutput,
    compile,
};
use crate::plan::{Plan, PlanError};
use crate::recipe::Recipe;
use crate::settings::{Settings, Verbosity};

/// Why an Image Builder build, import or export failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageBuilderError {
    #[error("BAKE_AWS_POLL_INTERVAL=`{0}` is not a duration")]
    PollInterval(String),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Source(SourceAmiError),
    #[error(transparent)]
    Origin(SourceAmiError),
    #[error(transparent)]
    NotAmiBase(CompileError),
    #[error(transparent)]
    Compile(CompileError),
    #[error("failed to read the AWS account (for the bucket of the recipe's files): {0}")]
    Account(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Write(std::io::Error),
}

impl Diagnose for ImageBuilderError {
    fn hint(&self) -> Option<String> {
        match self {
            ImageBuilderError::PollInterval(_) => Some("for example `5s` or `500ms`".into()),
            ImageBuilderError::Plan(e) => e.hint(),
            ImageBuilderError::Source(e) | ImageBuilderError::Origin(e) => e.hint(),
            ImageBuilderError::NotAmiBase(e) | ImageBuilderError::Compile(e) => e.hint(),
            ImageBuilderError::Engine(e) => e.hint(),
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            ImageBuilderError::PollInterval(_) | ImageBuilderError::NotAmiBase(_) => {
                ExitStatus::RecipeOrUsage
            }
            ImageBuilderError::Plan(e) => e.exit_status(),
            ImageBuilderError::Source(e) if e.is_user_error() => ExitStatus::RecipeOrUsage,
            ImageBuilderError::Compile(e) if e.is_user_error() => ExitStatus::RecipeOrUsage,
            ImageBuilderError::Engine(e) if e.is_interrupted() => ExitStatus::Interrupted,
            ImageBuilderError::Engine(e) if e.is_recipe_failure() || e.is_usage_error() => {
                ExitStatus::RecipeOrUsage
            }
            _ => ExitStatus::Infrastructure,
        }
    }

    fn reports(&self) -> Vec<Report> {
        match self {
            ImageBuilderError::Plan(e) => e.reports(),
            _ => vec![Report::from_error(self).with_hint(self.hint())],
        }
    }
}

/// Plans `recipe`: with its source AMI resolved (an AMI recipe), or as any build plans it (a
/// container recipe, whose `image` base the plan pins).
async fn plan(
    aws: &Aws,
    recipe: &Recipe,
    shown: &str,
    settings: &Settings,
) -> Result<(Plan, Option<SourceAmi>), ImageBuilderError> {
    if recipe.outputs.oci.is_some() {
        let plan = crate::plan::plan(recipe, shown, &settings.plan_options())?;
        return Ok((plan, None));
    }
    let source = crate::usecase::plan::resolve_source(aws, recipe)
        .await
        .map_err(ImageBuilderError::Source)?
        .ok_or_else(|| not_ami_base(recipe))?;
    let mut options = settings.plan_options();
    options.source_ami = Some(source.clone());
    let plan = crate::plan::plan(recipe, shown, &options)?;
    Ok((plan, Some(source)))
}

fn not_ami_base(recipe: &Recipe) -> ImageBuilderError {
    ImageBuilderError::NotAmiBase(CompileError::NotAmiBase {
        recipe: recipe.name.clone(),
        base: base_name(recipe),
    })
}

fn base_name(recipe: &Recipe) -> &'static str {
    match recipe.base {
        crate::recipe::Base::Scratch => "scratch",
        crate::recipe::Base::Image { .. } => "image",
        crate::recipe::Base::OciLayout { .. } => "oci_layout",
        crate::recipe::Base::Rootfs { .. } => "rootfs",
        crate::recipe::Base::Bootstrap(_) => "bootstrap",
        crate::recipe::Base::Recipe { .. } => "recipe",
        crate::recipe::Base::Ami(_) => "ami",
    }
}

fn compile_recipe(
    recipe: &Recipe,
    plan: &Plan,
    source: Option<&SourceAmi>,
    options: &CompileOptions,
) -> Result<Compiled, ImageBuilderError> {
    match source {
        Some(source) => compile(recipe, plan, source, options),
        None => crate::imagebuilder::compile::compile_container(recipe, plan, options),
    }
    .map_err(ImageBuilderError::Compile)
}

fn poll_interval() -> Result<Duration, ImageBuilderError> {
    match std::env::var("BAKE_AWS_POLL_INTERVAL")
        .ok()
        .filter(|v| !v.is_empty())
    {
        None => Ok(EngineOptions::DEFAULT_POLL),
        Some(text) => {
            humantime::parse_duration(&text).map_err(|_| ImageBuilderError::PollInterval(text))
        }
    }
}

/// `bake build RECIPE --engine imagebuilder`: compiles the recipe and has Image Builder build
/// it (or finds the build an earlier run started), then records the version.
pub fn build_imagebuilder(
    ctx: &Context,
    recipe: &Recipe,
    shown: &str,
    reporter: &mut dyn BuildReporter,
) -> Result<ImageBuilderOutput, ImageBuilderError> {
    let poll = poll_interval()?;
    let store = ctx.store()?;
    let settings = &ctx.settings;
    let quiet = settings.verbosity == Verbosity::Quiet;
    let cancel = Arc::clone(ctx.cancel());
    ctx.block_on(async {
        let aws = ctx.aws().await;
        let (plan, source) = plan(aws, recipe, shown, settings).await?;
        let file_bucket = file_bucket(aws, recipe).await?;
        let options = CompileOptions {
            region: aws.default_region().map(str::to_owned),
            file_bucket,
            ..CompileOptions::default()
        };
        let compiled = compile_recipe(recipe, &plan, source.as_ref(), &options)?;
        if !quiet {
            for note in &compiled.not_compiled {
                eprintln!("warning: not run on Image Builder: {note}");
            }
        }
        let engine = Engine {
            aws,
            store,
            registry: registry_client(aws, settings),
            options: EngineOptions { poll, cancel },
        };
        let output = engine
            .build(&plan, source.as_ref(), &compiled, reporter)
            .await?;
        ensure_manifest(store, &plan);
        Ok(output)
    })?
}

/// The bucket that delivers a recipe's large files to Image Builder: `BAKE_IMAGEBUILDER_BUCKET`,
/// else `bake-imagebuilder-files-ACCOUNT-REGION` (bucket names are global: the account and
/// region keep bake's apart). None for a recipe without `file` provisioners (no lookup).
async fn file_bucket(aws: &Aws, recipe: &Recipe) -> Result<Option<String>, ImageBuilderError> {
    if !recipe
        .provisioners
        .iter()
        .any(|p| matches!(p.step, crate::recipe::Step::File(_)))
    {
        return Ok(None);
    }
    if let Ok(bucket) = std::env::var("BAKE_IMAGEBUILDER_BUCKET")
        && !bucket.is_empty()
    {
        return Ok(Some(bucket));
    }
    let region = aws
        .default_region()
        .or_else(|| {
            recipe
                .outputs
                .ami
                .as_ref()
                .and_then(|a| a.regions.first().map(String::as_str))
        })
        .unwrap_or("us-east-1")
        .to_owned();
    let build_region = recipe
        .outputs
        .ami
        .as_ref()
        .and_then(|a| a.regions.first().cloned())
        .or_else(|| recipe.publish.ecr.first().and_then(|t| t.region.clone()))
        .unwrap_or_else(|| region.clone());
    let identity = aws
        .sts(&region)
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| {
            ImageBuilderError::Account(aws_sdk_sts::error::DisplayErrorContext(&e).to_string())
        })?;
    let account = identity.account().unwrap_or_default();
    Ok(Some(format!(
        "bake-imagebuilder-files-{account}-{build_region}"
    )))
}

/// The registry client that reads a container build's digest: the configured registries
/// (`BAKE_REGISTRY_ENDPOINTS` and the others) with Docker's credentials and ECR's tokens.
fn registry_client(aws: &Aws, settings: &Settings) -> Option<crate::registry::Client> {
    let sources: Vec<Arc<dyn crate::registry::auth::Credentials>> = vec![
        settings.registry.credentials(),
        Arc::new(crate::registry::ecr::EcrCredentials::new(aws.clone())),
    ];
    match crate::registry::Client::new(
        settings.registry.client_options(),
        Arc::new(crate::registry::auth::ChainCredentials(sources)),
    ) {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::warn!("no registry client for container builds: {e}");
            None
        }
    }
}

/// Writes the version's manifest: its index, so `manifest show ami-…` finds it before any
/// publish.
fn ensure_manifest(store: &crate::store::Store, plan: &Plan) {
    if let Err(e) = crate::provenance::manifest::ensure(store, &plan.version) {
        tracing::warn!("failed to write the manifest: {e}");
    }
}

/// `bake import imagebuilder IMAGE_ARN --recipe RECIPE`: plans the recipe on the AMI the image
/// was built on (so the version is the one it was built as, wherever the recipe's source filter
/// points today), checks that the image is that version's, and records it.
pub fn import_imagebuilder(
    ctx: &Context,
    recipe: &Recipe,
    shown: &str,
    image_arn: &str,
    reporter: &mut dyn BuildReporter,
) -> Result<ImageBuilderOutput, ImageBuilderError> {
    let store = ctx.store()?;
    ctx.block_on(async {
        let aws = ctx.aws().await;
        let engine = Engine {
            aws,
            store,
            registry: None,
            options: EngineOptions {
                poll: EngineOptions::DEFAULT_POLL,
                cancel: Arc::new(AtomicBool::new(false)),
            },
        };
        let origin = engine.image_origin(image_arn).await?;
        let crate::recipe::Base::Ami(filter) = &recipe.base else {
            return Err(not_ami_base(recipe));
        };
        let mut source = crate::ami::instance::source::describe_one(
            &aws.ec2(&origin.region),
            &origin.region,
            &origin.parent_image,
        )
        .await
        .map_err(ImageBuilderError::Origin)?;
        // Planned as the build was: the filter's SSM parameter is part of the source's identity.
        source.ssm_parameter = filter.ssm_parameter.clone();
        let mut options = ctx.settings.plan_options();
        options.source_ami = Some(source.clone());
        let plan = crate::plan::plan(recipe, shown, &options)?;
        let compiled = compile_recipe(recipe, &plan, Some(&source), &CompileOptions::default())?;
        let output = engine
            .import(&plan, &source, &compiled, image_arn, reporter)
            .await?;
        ensure_manifest(store, &plan);
        Ok(output)
    })?
}

/// What `bake export imagebuilder` wrote.
#[derive(Debug, Serialize)]
pub struct Exported {
    /// What the recipe does that Image Builder does not run.
    pub not_compiled: Vec<String>,
    pub version: String,
    /// The files written: the component documents, then `plan.json`.
    pub written: Vec<PathBuf>,
}

/// `bake export imagebuilder RECIPE DIR`: compiles the recipe (with an image pipeline when
/// `schedule` is given) and writes its component documents and `plan.json` into `dir`.
pub fn export_imagebuilder(
    ctx: &Context,
    recipe: &Recipe,
    shown: &str,
    dir: &Path,
    schedule: Option<String>,
) -> Result<Exported, ImageBuilderError> {
    let (plan, source, region) = ctx.block_on(async {
        let aws = ctx.aws().await;
        let region = aws.default_region().map(str::to_owned);
        plan(aws, recipe, shown, &ctx.settings)
            .await
            .map(|(plan, source)| (plan, source, region))
    })??;
    let options = CompileOptions {
        publish: true,
        schedule,
        region,
        // Exports upload nothing: every file is written into its document.
        file_bucket: None,
    };
    let compiled = compile_recipe(recipe, &plan, source.as_ref(), &options)?;
    let written = write_export(&compiled, dir).map_err(ImageBuilderError::Write)?;
    Ok(Exported {
        version: compiled.version.clone(),
        written,
        not_compiled: compiled.not_compiled.clone(),
    })
}
/// Writes each component document as `components/NAME.yaml` and the API calls that create
/// everything as `plan.json`; returns the paths written.
fn write_export(compiled: &Compiled, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let components = dir.join("components");
    fs_err::create_dir_all(&components)?;
    let mut written = Vec::new();
    for component in &compiled.components {
        let path = components.join(format!("{}.yaml", component.name));
        fs_err::write(&path, &component.data)?;
        written.push(path);
    }
    let path = dir.join("plan.json");
    let mut text = serde_json::to_string_pretty(&api_plan(compiled)).expect("plans serialize");
    text.push('\n');
    fs_err::write(&path, text)?;
    written.push(path);
    Ok(written)
}

/// The API calls that create `compiled`, in order, each with its request; an ARN known only
/// once an earlier call has answered is written `${OPERATION:NAME}`.
pub fn api_plan(compiled: &Compiled) -> Value {
    let version = &compiled.version;
    let with_token = |mut input: Value, what: &str| {
        input["clientToken"] = json!(client_token(version, what));
        input
    };
    let mut calls = Vec::new();
    for component in &compiled.components {
        let mut input = serde_json::to_value(component).expect("components serialize");
        input["platform"] = json!("Linux");
        calls.push(json!({
            "operation": "CreateComponent",
            "input": with_token(input, &format!("component {}", component.name)),
            "document": format!("components/{}.yaml", component.name),
        }));
    }
    let (operation, member, what, mut input, components) =
        match (&compiled.image_recipe, &compiled.container_recipe) {
            (Some(recipe), _) => (
                "CreateImageRecipe",
                "imageRecipeArn",
                "image recipe",
                serde_json::to_value(recipe).expect("recipes serialize"),
                &recipe.components,
            ),
            (None, Some(recipe)) => (
                "CreateContainerRecipe",
                "containerRecipeArn",
                "container recipe",
                serde_json::to_value(recipe).expect("recipes serialize"),
                &recipe.components,
            ),
            (None, None) => unreachable!("a compiled recipe has an image or a container recipe"),
        };
    let recipe_name = compiled.recipe_name();
    input["components"] = components
        .iter()
        .map(|name| json!({"componentArn": format!("${{CreateComponent:{name}}}")}))
        .collect();
    calls.push(json!({
        "operation": operation,
        "input": with_token(input, &format!("{what} {recipe_name}")),
    }));
    let infra = &compiled.infrastructure_configuration;
    calls.push(json!({
        "operation": "CreateInfrastructureConfiguration",
        "input": with_token(
            serde_json::to_value(infra).expect("configurations serialize"),
            &format!("infrastructure configuration {}", infra.name),
        ),
    }));
    let distribution = &compiled.distribution_configuration;
    calls.push(json!({
        "operation": "CreateDistributionConfiguration",
        "input": with_token(
            serde_json::to_value(distribution).expect("configurations serialize"),
            &format!("distribution configuration {}", distribution.name),
        ),
    }));
    let references = json!({
        member: format!("${{{operation}:{recipe_name}}}"),
        "infrastructureConfigurationArn":
            format!("${{CreateInfrastructureConfiguration:{}}}", infra.name),
        "distributionConfigurationArn":
            format!("${{CreateDistributionConfiguration:{}}}", distribution.name),
    });
    match &compiled.image_pipeline {
        Some(pipeline) => {
            let mut input = serde_json::to_value(pipeline).expect("pipelines serialize");
            merge(&mut input, &references);
            calls.push(json!({
                "operation": "CreateImagePipeline",
                "input": with_token(input, &format!("image pipeline {}", pipeline.name)),
            }));
        }
        None => {
            let mut input = json!({
                "imageTestsConfiguration": {"imageTestsEnabled": compiled.has_tests()},
                "tags": compiled.tags(),
            });
            merge(&mut input, &references);
            calls.push(json!({
                "operation": "CreateImage",
                "input": with_token(input, "image attempt 1"),
            }));
        }
    }
    json!({
        "recipe": compiled.recipe,
        "version": compiled.version,
        "region": compiled.region,
        "calls": calls,
        "notCompiled": compiled.not_compiled,
    })
}

fn merge(into: &mut Value, from: &Value) {
    if let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) {
        for (key, value) in from {
            into.insert(key.clone(), value.clone());
        }
    }
}
