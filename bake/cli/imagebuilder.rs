//! `bake build RECIPE --engine imagebuilder`, `bake export imagebuilder RECIPE DIR` and `bake
//! import imagebuilder IMAGE_ARN --recipe RECIPE`: the recipe is planned here (its source AMI
//! resolved in AWS, or for an import the AMI the image was built on), compiled and handed to
//! [`crate::imagebuilder`]; this file only turns results into output and exit statuses.
//!
//! Environment: `BAKE_AWS_POLL_INTERVAL`, the pause between polls of a build (default 15s);
//! `BAKE_IMAGEBUILDER_BUCKET`, the bucket of files too large for a component document.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use super::{VarArgs, print_json, print_reports};
use crate::ami::instance::SourceAmi;
use crate::aws::Aws;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::imagebuilder::engine::client_token;
use crate::imagebuilder::{CompileOptions, Compiled, Engine, EngineOptions, compile};
use crate::plan::Plan;
use crate::recipe::Recipe;
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::store::Store;

/// `bake export imagebuilder RECIPE DIR`.
#[derive(Debug, Args)]
pub struct ExportImageBuilderArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The directory to write the component documents and `plan.json` into.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Also define an image pipeline that runs on this schedule (`cron(…)` or `rate(…)`).
    #[arg(long, value_name = "EXPRESSION")]
    pub schedule: Option<String>,
    #[command(flatten)]
    pub vars: VarArgs,
}

/// `bake import …`: where the image comes from.
#[derive(Debug, clap::Subcommand)]
pub enum ImportFrom {
    /// An EC2 Image Builder image (`arn:aws:imagebuilder:REGION:ACCOUNT:image/…/…/N`), made
    /// from the resources `bake export imagebuilder` wrote for the recipe.
    Imagebuilder(ImportImageBuilderArgs),
}

/// `bake import imagebuilder IMAGE_ARN --recipe RECIPE`.
#[derive(Debug, Args)]
pub struct ImportImageBuilderArgs {
    /// The Image Builder image (build version) ARN.
    #[arg(value_name = "IMAGE_ARN")]
    pub image_arn: String,
    /// The recipe the image was exported from.
    #[arg(long, value_name = "FILE")]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub vars: VarArgs,
}

/// Plans `recipe`: with its source AMI resolved (an AMI recipe), or as any build plans it (a
/// container recipe, whose `image` base the plan pins); the error is printed already.
async fn plan(
    aws: &Aws,
    recipe: &Recipe,
    shown: &str,
    settings: &Settings,
) -> Result<(Plan, Option<SourceAmi>), ExitStatus> {
    if recipe.outputs.oci.is_some() {
        let plan = super::common::plan_resolved_or_report(
            recipe,
            shown,
            &settings.plan_options(),
            settings,
        )?;
        return Ok((plan, None));
    }
    let source = match crate::usecase::plan::resolve_source(aws, recipe).await {
        Ok(Some(source)) => source,
        Ok(None) => {
            let error = crate::imagebuilder::CompileError::NotAmiBase {
                recipe: recipe.name.clone(),
                base: base_name(recipe),
            };
            print_reports(
                settings,
                &[Report::from_error(&error).with_hint(error.hint())],
            );
            return Err(ExitStatus::RecipeOrUsage);
        }
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
            return Err(if e.is_user_error() {
                ExitStatus::RecipeOrUsage
            } else {
                ExitStatus::Infrastructure
            });
        }
    };
    let mut options = settings.plan_options();
    options.source_ami = Some(source.clone());
    let plan = super::common::plan_resolved_or_report(recipe, shown, &options, settings)?;
    Ok((plan, Some(source)))
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

fn compile_or_report(
    recipe: &Recipe,
    plan: &Plan,
    source: Option<&SourceAmi>,
    options: &CompileOptions,
    settings: &Settings,
) -> Result<Compiled, ExitStatus> {
    match source {
        Some(source) => compile(recipe, plan, source, options),
        None => crate::imagebuilder::compile::compile_container(recipe, plan, options),
    }
    .map_err(|e| {
        print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
        if e.is_user_error() {
            ExitStatus::RecipeOrUsage
        } else {
            ExitStatus::Infrastructure
        }
    })
}

fn poll_interval() -> Result<Duration, Report> {
    match std::env::var("BAKE_AWS_POLL_INTERVAL")
        .ok()
        .filter(|v| !v.is_empty())
    {
        None => Ok(EngineOptions::DEFAULT_POLL),
        Some(text) => humantime::parse_duration(&text).map_err(|_| {
            Report::new(format!("BAKE_AWS_POLL_INTERVAL=`{text}` is not a duration"))
                .with_hint(Some("for example `5s` or `500ms`".into()))
        }),
    }
}

/// `bake build RECIPE --engine imagebuilder`.
pub fn run_build(
    recipe: &Recipe,
    shown: &str,
    settings: &Settings,
    cancel: Arc<AtomicBool>,
) -> ExitStatus {
    let poll = match poll_interval() {
        Ok(poll) => poll,
        Err(report) => {
            print_reports(settings, &[report]);
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
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let quiet = settings.verbosity == Verbosity::Quiet;
    let mut reporter = super::common::CliReporter { quiet };
    rt.block_on(async {
        let aws = Aws::load(&settings.aws).await;
        let (plan, source) = match plan(&aws, recipe, shown, settings).await {
            Ok(planned) => planned,
            Err(status) => return status,
        };
        let file_bucket = match file_bucket(&aws, recipe).await {
            Ok(bucket) => bucket,
            Err(report) => {
                print_reports(settings, &[report]);
                return ExitStatus::Infrastructure;
            }
        };
        let options = CompileOptions {
            region: aws.default_region().map(str::to_owned),
            file_bucket,
            ..CompileOptions::default()
        };
        let compiled = match compile_or_report(recipe, &plan, source.as_ref(), &options, settings) {
            Ok(compiled) => compiled,
            Err(status) => return status,
        };
        if !quiet {
            for note in &compiled.not_compiled {
                eprintln!("warning: not run on Image Builder: {note}");
            }
        }
        let engine = Engine {
            aws: &aws,
            store: &store,
            registry: registry_client(&aws, settings),
            options: EngineOptions { poll, cancel },
        };
        match engine
            .build(&plan, source.as_ref(), &compiled, &mut reporter)
            .await
        {
            Ok(output) => {
                show(&store, &plan, &output, settings);
                if !output.started_build && !quiet {
                    eprintln!("(built by an earlier run: nothing was started)");
                }
                ExitStatus::Success
            }
            Err(error) => failed(&error, settings),
        }
    })
}

/// The bucket that delivers a recipe's large files to Image Builder: `BAKE_IMAGEBUILDER_BUCKET`,
/// else `bake-imagebuilder-files-ACCOUNT-REGION` (bucket names are global: the account and
/// region keep bake's apart). None for a recipe without `file` provisioners (no lookup).
async fn file_bucket(aws: &Aws, recipe: &Recipe) -> Result<Option<String>, Report> {
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
            Report::new(format!(
                "failed to read the AWS account (for the bucket of the recipe's files): {}",
                aws_sdk_sts::error::DisplayErrorContext(&e)
            ))
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

/// Writes the version's manifest (its index, so `manifest show ami-…` finds it before any
/// publish) and prints what was recorded.
fn show(
    store: &Store,
    plan: &Plan,
    output: &crate::imagebuilder::ImageBuilderOutput,
    settings: &Settings,
) {
    if let Err(e) = crate::provenance::manifest::ensure(store, &plan.version) {
        tracing::warn!("failed to write the manifest: {e}");
    }
    match settings.output {
        OutputFormat::Json => print_json(output),
        OutputFormat::Human => {
            println!("version  {}", output.version);
            println!("image    {}", output.image_arn);
            for region in &output.regions {
                println!("ami      {} ({})", region.image_id, region.region);
            }
            if let Some(reference) = &output.image_reference {
                println!("oci      {reference}");
            }
            println!("source   {}", output.source_ami);
        }
    }
}

fn failed(error: &crate::imagebuilder::EngineError, settings: &Settings) -> ExitStatus {
    print_reports(
        settings,
        &[Report::from_error(error).with_hint(error.hint())],
    );
    if error.is_interrupted() {
        ExitStatus::Interrupted
    } else if error.is_recipe_failure() || error.is_usage_error() {
        ExitStatus::RecipeOrUsage
    } else {
        ExitStatus::Infrastructure
    }
}

/// `bake import imagebuilder IMAGE_ARN --recipe RECIPE`: plans the recipe on the AMI the image
/// was built on (so the version is the one it was built as, wherever the recipe's source filter
/// points today), checks that the image is that version's, and records it.
pub fn run_import(args: &ImportImageBuilderArgs, settings: &Settings) -> ExitStatus {
    let recipe = match super::common::load_or_report(&args.recipe, &args.vars, settings) {
        Ok(recipe) => recipe,
        Err(status) => return status,
    };
    let shown = args.recipe.display().to_string();
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let quiet = settings.verbosity == Verbosity::Quiet;
    let mut reporter = super::common::CliReporter { quiet };
    rt.block_on(async {
        let aws = Aws::load(&settings.aws).await;
        let engine = Engine {
            aws: &aws,
            store: &store,
            registry: None,
            options: EngineOptions {
                poll: EngineOptions::DEFAULT_POLL,
                cancel: Arc::new(AtomicBool::new(false)),
            },
        };
        let origin = match engine.image_origin(&args.image_arn).await {
            Ok(origin) => origin,
            Err(error) => return failed(&error, settings),
        };
        let crate::recipe::Base::Ami(filter) = &recipe.base else {
            let error = crate::imagebuilder::CompileError::NotAmiBase {
                recipe: recipe.name.clone(),
                base: base_name(&recipe),
            };
            print_reports(
                settings,
                &[Report::from_error(&error).with_hint(error.hint())],
            );
            return ExitStatus::RecipeOrUsage;
        };
        let mut source = match crate::ami::instance::source::describe_one(
            &aws.ec2(&origin.region),
            &origin.region,
            &origin.parent_image,
        )
        .await
        {
            Ok(source) => source,
            Err(e) => {
                print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
                return ExitStatus::Infrastructure;
            }
        };
        // Planned as the build was: the filter's SSM parameter is part of the source's identity.
        source.ssm_parameter = filter.ssm_parameter.clone();
        let mut options = settings.plan_options();
        options.source_ami = Some(source.clone());
        let plan = match super::common::plan_resolved_or_report(&recipe, &shown, &options, settings)
        {
            Ok(plan) => plan,
            Err(status) => return status,
        };
        let compiled = match compile_or_report(
            &recipe,
            &plan,
            Some(&source),
            &CompileOptions::default(),
            settings,
        ) {
            Ok(compiled) => compiled,
            Err(status) => return status,
        };
        match engine
            .import(&plan, &source, &compiled, &args.image_arn, &mut reporter)
            .await
        {
            Ok(output) => {
                show(&store, &plan, &output, settings);
                ExitStatus::Success
            }
            Err(error) => failed(&error, settings),
        }
    })
}

/// `bake export imagebuilder RECIPE DIR`.
pub fn run_export(args: &ExportImageBuilderArgs, settings: &Settings) -> ExitStatus {
    let shown = args.recipe.display().to_string();
    let recipe = match super::common::load_or_report(&args.recipe, &args.vars, settings) {
        Ok(recipe) => recipe,
        Err(status) => return status,
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let planned = rt.block_on(async {
        let aws = Aws::load(&settings.aws).await;
        let region = aws.default_region().map(str::to_owned);
        plan(&aws, &recipe, &shown, settings)
            .await
            .map(|(plan, source)| (plan, source, region))
    });
    let (plan, source, region) = match planned {
        Ok(planned) => planned,
        Err(status) => return status,
    };
    let options = CompileOptions {
        publish: true,
        schedule: args.schedule.clone(),
        region,
        // Exports upload nothing: every file is written into its document.
        file_bucket: None,
    };
    let compiled = match compile_or_report(&recipe, &plan, source.as_ref(), &options, settings) {
        Ok(compiled) => compiled,
        Err(status) => return status,
    };
    let written = match write_export(&compiled, &args.dir) {
        Ok(written) => written,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    match settings.output {
        OutputFormat::Json => print_json(&json!({
            "version": compiled.version,
            "written": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "not_compiled": compiled.not_compiled,
        })),
        OutputFormat::Human => {
            for path in &written {
                println!("{}", path.display());
            }
            for note in &compiled.not_compiled {
                eprintln!("warning: not compiled: {note}");
            }
        }
    }
    ExitStatus::Success
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
