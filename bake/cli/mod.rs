//! The command line: clap definitions, one file per subcommand, and the one place that prints
//! errors. Each subcommand turns settings into calls to the library and results into output and
//! an [`ExitStatus`].

mod ami;
mod attest;
mod audit;
mod build;
mod build_output;
mod cleanup;
mod common;
mod export;
mod fleet;
mod gc;
mod imagebuilder;
mod key;
mod manifest;
mod plan;
mod publish;
mod push;
mod rollout;
mod sandbox;
mod validate;
mod verify;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::recipe::VarSources;
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::usecase::Context;
use common::Outcome;

/// bake: hardened AMIs and OCI images from declarative recipes, with content-addressed
/// versions, provenance and safe publishing.
#[derive(Debug, Parser)]
#[command(name = "bake", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// bake's local store (OCI layout, build records).
    #[arg(
        long,
        global = true,
        env = "BAKE_STORE",
        default_value = ".bake",
        value_name = "DIR"
    )]
    pub store: PathBuf,
    /// How results are printed on stdout.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Human, env = "BAKE_OUTPUT")]
    pub output: OutputFormat,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More logs on stderr (twice for debug logs).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Never draw progress bars.
    #[arg(long, global = true)]
    pub no_progress: bool,
    /// The default AWS region (else `AWS_REGION` or the profile's).
    #[arg(long, global = true, value_name = "REGION")]
    pub region: Option<String>,
    /// The AWS profile to use (else `AWS_PROFILE`).
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check recipes and report every error at once.
    Validate(validate::ValidateArgs),
    /// Resolve a recipe: its version, its inputs, and every effect a run would have.
    Plan(plan::PlanArgs),
    /// Build a recipe's OCI image into the local store (nothing runs if its version is there).
    Build(build::BuildArgs),
    /// Print the recipe graph: which recipes are built on which (a tree, JSON or Graphviz dot).
    Graph(fleet::GraphArgs),
    /// List the recipes whose version today is not the one last built, and why (a moved base
    /// image tag, a newer source AMI, changed files); exit 1 when there are any.
    Outdated(fleet::OutdatedArgs),
    /// Remove AWS resources left by AMI builds that died (journals and tags).
    Cleanup(cleanup::CleanupArgs),
    /// Remove old AMIs and images that nothing references (explain every decision).
    Gc(gc::GcArgs),
    /// AMIs from disk images: upload a raw image into an EBS snapshot, publish a recipe's AMI.
    Ami(ami::AmiArgs),
    /// Write a built image out of the store: an OCI layout directory or a docker-archive.
    Export(export::ExportArgs),
    /// Record an image made outside bake (by a pipeline `bake export imagebuilder` defined) as
    /// a recipe's version, so provenance and publishing cover it.
    #[command(subcommand)]
    Import(imagebuilder::ImportFrom),
    /// Sign and attach a built version's provenance (again): its image's, or its AMIs'.
    Attest(attest::AttestCommandArgs),
    /// Manage provenance signing keys.
    Key(key::KeyArgs),
    /// Show a version's manifest: inputs, outputs, publications, attestations.
    Manifest(manifest::ManifestArgs),
    /// Verify an artifact's signed provenance and SBOM.
    Verify(verify::VerifyArgs),
    /// Push a built image to registries and ECR (the recipe's targets, or `--to`).
    Push(push::PushArgs),
    /// Publish a built version: launch template versions, SSM parameters, ECS task definitions.
    Publish(publish::PublishArgs),
    /// Move a channel's pointers to a published version.
    Promote(publish::PromoteArgs),
    /// Move a channel's pointers back to its previous version.
    Rollback(publish::RollbackArgs),
    /// Print a channel's current immutable references.
    Pin(publish::PinArgs),
    /// Move a channel to a version and replace the machines behind it (instance refreshes, ECS
    /// deployments), waiting, and rolling back on failure.
    Rollout(rollout::RolloutArgs),
    /// Scan a root filesystem or a built version with OpenSCAP and print every rule's result.
    Audit(audit::AuditArgs),
    /// Internal: the namespace runner's sandbox helper, which bake starts itself.
    #[command(name = "__sandbox", hide = true)]
    Sandbox(sandbox::SandboxArgs),
}

/// Exports of a recipe rather than of a built image (`bake export imagebuilder`).
#[derive(Debug, clap::Subcommand)]
pub enum ExportTo {
    /// Write a recipe's EC2 Image Builder resources: AWSTOE component documents and a JSON plan
    /// of the API calls that create them (for CloudFormation or Terraform).
    Imagebuilder(imagebuilder::ExportImageBuilderArgs),
}

/// Variable values given on the command line.
#[derive(Debug, Clone, Args)]
pub struct VarArgs {
    /// Set a variable (repeatable); overrides --var-file, BAKE_VAR_<name> and defaults.
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_var)]
    pub vars: Vec<(String, String)>,
    /// Read variables from a YAML file of `name: value` (repeatable, later files win).
    #[arg(long = "var-file", value_name = "FILE")]
    pub var_files: Vec<PathBuf>,
}

impl VarArgs {
    pub fn sources(&self) -> VarSources {
        VarSources {
            cli: self.vars.clone(),
            files: self.var_files.clone(),
            env: Vec::new(),
        }
        .with_process_env()
    }
}

fn parse_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not NAME=VALUE")),
    }
}

/// Runs a parsed command line: the run's one [`Context`] (composition root) is made here, and
/// the one place that prints a command's failure and turns it into an exit status is here too.
pub fn run(command: Command, settings: &Settings) -> ExitStatus {
    match crate::progress::mode_for(settings) {
        Ok(mode) => crate::progress::init(mode),
        Err(report) => {
            print_reports(settings, &[report]);
            return ExitStatus::RecipeOrUsage;
        }
    }
    let ctx = Context::new(settings.clone());
    let outcome: Outcome = match command {
        Command::Validate(args) => validate::run(&args, &ctx),
        Command::Plan(plan::PlanArgs {
            all: Some(dir),
            check,
            ..
        }) => Ok(fleet::plan_all(&dir, check, &ctx)),
        Command::Plan(args) => plan::run(&args, &ctx),
        Command::Build(args) => build::run(&args, &ctx),
        Command::Graph(args) => fleet::graph(&args, &ctx),
        Command::Outdated(args) => fleet::outdated(&args, &ctx),
        Command::Export(export::ExportArgs {
            to: Some(ExportTo::Imagebuilder(to)),
            ..
        }) => imagebuilder::export(&to, &ctx),
        Command::Export(args) => export::run(&args, &ctx),
        Command::Import(imagebuilder::ImportFrom::Imagebuilder(args)) => {
            imagebuilder::run_import(&args, &ctx)
        }
        Command::Attest(args) => attest::run(&args, &ctx),
        Command::Key(args) => key::run(&args, &ctx),
        Command::Manifest(args) => manifest::run(&args, &ctx),
        Command::Verify(args) => verify::run(&args, &ctx),
        Command::Push(args) => push::run(&args, &ctx),
        Command::Publish(args) => publish::run_publish(&args, &ctx),
        // The rollout promotes (moves the channel) before it replaces the machines, and moves
        // the channel back if they fail.
        Command::Promote(args) if args.rollout => rollout::run(
            &rollout::RolloutArgs {
                recipe: args.recipe,
                target_version: args.target_version,
                channel: args.channel,
                on_interrupt: args.on_interrupt,
                poll_interval: args.poll_interval,
                allow_clobber: args.allow_clobber,
                vars: args.vars,
            },
            &ctx,
        ),
        Command::Promote(args) => publish::run_promote(&args, &ctx),
        Command::Rollback(args) => publish::run_rollback(&args, &ctx),
        Command::Pin(args) => publish::run_pin(&args, &ctx),
        Command::Rollout(args) => rollout::run(&args, &ctx),
        Command::Ami(args) => ami::run(&args, &ctx),
        Command::Cleanup(args) => cleanup::run(&args, &ctx),
        Command::Gc(args) => gc::run(&args, &ctx),
        Command::Audit(args) => audit::run(&args, &ctx),
        Command::Sandbox(args) => Ok(sandbox::run(&args)),
    };
    match outcome {
        Ok(status) => status,
        Err(failure) => {
            print_reports(&ctx.settings, &failure.reports);
            failure.status
        }
    }
}

/// Sets up logging on stderr: `BAKE_LOG` (tracing's filter syntax) wins over `-q`/`-v`.
pub fn init_logging(settings: &Settings) {
    let default = match settings.verbosity {
        Verbosity::Quiet => "error",
        Verbosity::Normal => "warn,bake=info",
        Verbosity::Verbose => "info,bake=debug",
        Verbosity::Debug => "debug,bake=trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BAKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(settings.color)
        .without_time()
        .with_target(false)
        .try_init();
}

/// Prints error reports on stderr, with colour when the settings allow.
pub fn print_reports(settings: &Settings, reports: &[Report]) {
    use std::io::Write;
    let mut stderr = std::io::stderr().lock();
    for report in reports {
        let _ = write!(stderr, "{}", report.render(settings.color));
    }
}

/// Writes a JSON document on stdout. A reader that went away (`bake … | head`) is not an
/// error worth a panic: the rest of the document is dropped.
pub fn print_json(value: &impl serde::Serialize) {
    use std::io::Write;
    let text = serde_json::to_string_pretty(value).expect("bake's outputs always serialize");
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|()| stdout.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        tracing::warn!("failed to write the result on stdout: {e}");
    }
}
