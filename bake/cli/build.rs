//! `bake build RECIPE`: build the recipe's OCI image into the local store (or return the stored
//! one when its version is already there), printing the version and image digest.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Args;

use super::common::CliReporter;
use super::{VarArgs, print_json, print_reports};
use crate::build::engine::Engine;
use crate::build::pipeline::{BuildOptions, Builder};
use crate::build::runner::{NamespaceRunner, Runner};
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::recipe;
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::store::Store;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE", required_unless_present = "all")]
    pub recipe: Option<PathBuf>,
    /// Build every recipe under DIR (default: the current directory), each after the recipe it
    /// is built on, independent ones at once; versions in the store are not built again.
    #[arg(
        long,
        value_name = "DIR",
        num_args = 0..=1,
        default_missing_value = ".",
        conflicts_with_all = ["recipe", "vars", "var_files"]
    )]
    pub all: Option<PathBuf>,
    /// With `--all`: how many recipes build at once (default: the number of CPUs).
    #[arg(long, value_name = "N", requires = "all", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    #[command(flatten)]
    pub vars: VarArgs,
    #[command(flatten)]
    pub attest: super::common::AttestArgs,
    /// How boot tests run QEMU, over the recipe's `accelerator`: `auto` (KVM when it works,
    /// else software emulation), `kvm` (fail when KVM cannot run the guest) or `tcg`.
    #[arg(long, value_enum, value_name = "ACCEL", env = "BAKE_BOOT_ACCELERATOR")]
    pub boot_accelerator: Option<crate::ami::boot::Accelerator>,
    /// Where provisioning steps run: `chroot` (namespaces, needs root) or `docker` (a Docker
    /// Engine found like the docker CLI finds it). Overrides the recipe's `build.runner`; both
    /// give the same image.
    #[arg(long, value_name = "RUNNER")]
    pub runner: Option<RunnerArg>,
    /// Where the build runs: `local` (this machine, or the recipe's builder instance) or
    /// `imagebuilder` (EC2 Image Builder builds the AMIs from the compiled recipe).
    #[arg(
        long,
        value_name = "ENGINE",
        default_value = "local",
        env = "BAKE_ENGINE"
    )]
    pub engine: EngineArg,
}

/// `--engine`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineArg {
    Local,
    Imagebuilder,
}

/// `--runner`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunnerArg {
    Chroot,
    Docker,
}

pub fn run(args: &BuildArgs, settings: &Settings) -> ExitStatus {
    let settings = &Settings {
        boot_accelerator: args.boot_accelerator.or(settings.boot_accelerator),
        ..settings.clone()
    };
    let child = super::fleet::ChildBuild {
        settings,
        build_args: super::fleet::repeated_build_args(args),
    };
    let path = match (&args.all, &args.recipe) {
        (Some(dir), _) => {
            let jobs = args.jobs.map_or_else(
                || std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
                |n| n as usize,
            );
            return super::fleet::build_all(dir, jobs, &child, &cancel_on_signals());
        }
        (None, Some(path)) => path,
        (None, None) => unreachable!("clap requires RECIPE without --all"),
    };
    let shown = path.display().to_string();
    let recipe = match super::common::load_or_report(path, &args.vars, settings) {
        Ok(recipe) => recipe,
        Err(status) => return status,
    };
    // The recipes it is built on first (each in its own `bake build`), unless in the store.
    if let Err(status) = super::fleet::build_bases_of(&recipe, &child, &cancel_on_signals()) {
        return status;
    }
    if args.engine == EngineArg::Imagebuilder {
        return super::imagebuilder::run_build(&recipe, &shown, settings, cancel_on_signals());
    }
    if super::ami_instance::is_instance_recipe(&recipe) {
        return super::ami_instance::run_build(&recipe, &shown, settings, cancel_on_signals());
    }
    if recipe
        .outputs
        .ami
        .as_ref()
        .is_some_and(|a| a.strategy == crate::recipe::AmiStrategy::Snapshot)
    {
        let attest = args.attest.with_recipe(&recipe.provenance);
        return super::ami::run_snapshot_build(
            &recipe,
            &shown,
            &attest,
            settings,
            cancel_on_signals(),
        );
    }
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let plan = match super::common::plan_or_report(&recipe, &shown, settings) {
        Ok(plan) => plan,
        Err(status) => return status,
    };
    if let recipe::Base::Image { reference } = &recipe.base
        && let Some(digest) = plan.inputs.base.digest()
    {
        let digest = &digest.to_string();
        let architecture = recipe
            .outputs
            .oci
            .as_ref()
            .map_or("amd64", |o| o.architecture.oci());
        if let Err(error) = crate::registry::pull::pull_base_blocking(
            &settings.registry,
            &store,
            reference,
            digest,
            architecture,
        ) {
            print_reports(
                settings,
                &[Report::from_error(&error).with_hint(error.hint())],
            );
            return if error.is_user_error() {
                ExitStatus::RecipeOrUsage
            } else {
                ExitStatus::Infrastructure
            };
        }
    }
    // A version another run pushed is taken from the registry rather than built again.
    let fetched = if crate::build::pipeline::is_built(&store, &plan.version) {
        None
    } else {
        fetch_published(&recipe, &plan, &store, settings)
    };
    let cancel = cancel_on_signals();
    let docker = match args.runner {
        Some(choice) => choice == RunnerArg::Docker,
        None => recipe.build.runner == recipe::RunnerKind::Docker,
    } && !crate::build::pipeline::is_built(&store, &plan.version); // a built version runs nothing
    let namespace;
    let engine;
    let runner: &dyn Runner = if docker {
        engine = match Engine::connect(Arc::clone(&cancel)) {
            Ok(engine) => engine,
            Err(e) => {
                print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
                return ExitStatus::Infrastructure;
            }
        };
        &engine
    } else {
        namespace = match NamespaceRunner::new() {
            Ok(runner) => runner,
            Err(e) => {
                print_reports(settings, &[Report::from_error(&e)]);
                return ExitStatus::Infrastructure;
            }
        };
        &namespace
    };
    let builder = Builder {
        store: &store,
        runner,
        options: BuildOptions {
            source_date_epoch: plan.source_date_epoch(),
            workers: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            cancel,
            boot_accelerator: settings.boot_accelerator,
        },
    };
    let mut reporter = CliReporter {
        quiet: settings.verbosity == Verbosity::Quiet,
    };
    let shares_layers = recipe.build.cache.is_some()
        && fetched.is_none()
        && !crate::build::pipeline::is_built(&store, &plan.version);
    if shares_layers {
        layer_cache(&recipe, &plan, &store, settings, Direction::Import);
    }
    let built = builder.build(&recipe, &plan, &mut reporter);
    if shares_layers && built.is_ok() {
        layer_cache(&recipe, &plan, &store, settings, Direction::Export);
    }
    match built {
        Ok(output) => {
            // Provenance, SBOMs and the manifest (kept when the version is already attested).
            // A fetched version's provenance is the one its builder pushed beside it: this
            // machine built nothing, so it signs nothing.
            let attested = if args.attest.no_attest || fetched.is_some() {
                None
            } else {
                let options = args.attest.with_recipe(&recipe.provenance);
                match super::attest::attest(&options, settings, &store, &output.version) {
                    Ok(manifest) => manifest.attestations,
                    Err(report) => {
                        print_reports(settings, &[report]);
                        return ExitStatus::Infrastructure;
                    }
                }
            };
            match settings.output {
                OutputFormat::Json => {
                    let mut value = serde_json::to_value(&output).expect("outputs serialize");
                    if let Some(reference) = &fetched {
                        value["fetched_from"] = serde_json::json!(reference);
                    }
                    if let Some(a) = &attested {
                        value["provenance"] = serde_json::json!(a.provenance.envelope_digest);
                        value["sboms"] = serde_json::json!(
                            a.sboms.iter().map(|s| &s.digest).collect::<Vec<_>>()
                        );
                        value["signed_by"] = serde_json::json!(a.signer.key_id);
                    }
                    print_json(&value)
                }
                OutputFormat::Human => {
                    println!("version  {}", output.version);
                    println!("image    {}", output.image_digest);
                    if let Some(a) = &attested {
                        println!("provenance {}", a.provenance.envelope_digest);
                        for sbom in &a.sboms {
                            println!("sbom     {} ({})", sbom.digest, sbom.format);
                        }
                    }
                    if let Some(reference) = &fetched {
                        println!("fetched  {reference}");
                    }
                    if output.cached && settings.verbosity > Verbosity::Quiet {
                        eprintln!("(already built: nothing ran)");
                    }
                }
            }
            ExitStatus::Success
        }
        Err(error) => {
            print_reports(
                settings,
                &[Report::from_error(&error).with_hint(error.hint())],
            );
            if error.is_interrupted() {
                ExitStatus::Interrupted
            } else if error.is_recipe_failure() {
                ExitStatus::RecipeOrUsage
            } else {
                ExitStatus::Infrastructure
            }
        }
    }
}

/// Asks the recipe's push targets (registries and ECR repositories) for the planned version;
/// when one has it, pulls it into the store with a build record saying where it came from and
/// returns that reference. Any failure is logged and the version is built here instead.
pub(super) fn fetch_published(
    recipe: &recipe::Recipe,
    plan: &crate::plan::Plan,
    store: &Store,
    settings: &Settings,
) -> Option<String> {
    use crate::registry::fetch;
    use crate::registry::{
        Reference, auth::ChainCredentials, auth::Credentials, ecr::EcrCredentials,
    };
    let oci = recipe.outputs.oci.as_ref()?;
    if recipe.publish.registries.is_empty() && recipe.publish.ecr.is_empty() {
        return None;
    }
    let runtime = super::runtime()
        .map_err(|e| tracing::warn!("the registries were not asked for the version: {e}"))
        .ok()?;
    let found = runtime.block_on(async {
        let mut repositories: Vec<Reference> = recipe
            .publish
            .registries
            .iter()
            .filter_map(|r| Reference::repository_only(&r.repository).ok())
            .collect();
        let mut credentials: Vec<Arc<dyn Credentials>> = vec![settings.registry.credentials()];
        if !recipe.publish.ecr.is_empty() {
            let aws = crate::aws::Aws::load(&settings.aws).await;
            for target in &recipe.publish.ecr {
                let Some(region) = target
                    .region
                    .clone()
                    .or_else(|| aws.default_region().map(str::to_owned))
                else {
                    continue;
                };
                let described = aws
                    .ecr(&region)
                    .describe_repositories()
                    .repository_names(&target.repository)
                    .send()
                    .await;
                match described {
                    Ok(found) => repositories.extend(
                        found
                            .repositories()
                            .iter()
                            .filter_map(|r| r.repository_uri())
                            .filter_map(|uri| Reference::repository_only(uri).ok()),
                    ),
                    // No repository yet: nothing was pushed there.
                    Err(e) => tracing::debug!("ECR {region}/{}: {e}", target.repository),
                }
            }
            credentials.push(Arc::new(EcrCredentials::new(aws)));
        }
        let mut options = settings.registry.client_options();
        options.insecure.extend(
            recipe
                .publish
                .registries
                .iter()
                .filter(|r| r.insecure)
                .filter_map(|r| r.repository.split_once('/').map(|(h, _)| h.to_owned())),
        );
        let client =
            crate::registry::Client::new(options, Arc::new(ChainCredentials(credentials)))?;
        fetch::find_version(&client, store, &repositories, plan, oci.architecture.oci()).await
    });
    let fetched = match found {
        Ok(Some(fetched)) => fetched,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(
                "the push targets were not asked for the version ({e}): building it here"
            );
            return None;
        }
    };
    let compressor = crate::build::pipeline::describe_compression(recipe.build.compression);
    let written = fetch::record_fetched(store, plan, &fetched, compressor)
        .and_then(|record| store.put_record(&record));
    match written {
        Ok(()) => {
            if settings.verbosity > Verbosity::Quiet {
                eprintln!(
                    "==> {} is in {}: fetched, nothing is built",
                    plan.version_short(),
                    fetched.reference
                );
            }
            Some(fetched.reference)
        }
        Err(e) => {
            tracing::warn!("the fetched version could not be recorded ({e}): building it here");
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Import,
    Export,
}

/// Takes the build's step layers from (or sends them to) the recipe's `build.cache` registry.
/// A cache that cannot be reached is a warning: the build runs (or ends) as without it.
fn layer_cache(
    recipe: &recipe::Recipe,
    plan: &crate::plan::Plan,
    store: &Store,
    settings: &Settings,
    direction: Direction,
) {
    use crate::build::remote_cache;
    let Some(repository) = &recipe.build.cache else {
        return;
    };
    let moved = super::runtime()
        .map_err(|e| crate::registry::RegistryError::Io {
            path: "<tokio runtime>".into(),
            source: e,
        })
        .and_then(|runtime| {
            runtime.block_on(async {
                let repository = crate::registry::Reference::repository_only(repository)?;
                let credentials = settings
                    .registry
                    .credentials_for(repository.registry())
                    .await;
                let client =
                    crate::registry::Client::new(settings.registry.client_options(), credentials)?;
                match direction {
                    Direction::Import => {
                        remote_cache::import(&client, &repository, store, recipe, plan).await
                    }
                    Direction::Export => {
                        remote_cache::export(&client, &repository, store, recipe, plan).await
                    }
                }
            })
        });
    match (moved, direction) {
        (Ok(moved), Direction::Import) if settings.verbosity > Verbosity::Quiet => eprintln!(
            "==> layer cache {repository}: {} step(s) taken, {} already here",
            moved.entries, moved.present
        ),
        (Ok(moved), Direction::Export) if settings.verbosity > Verbosity::Quiet => eprintln!(
            "==> layer cache {repository}: {} step(s) sent, {} already there",
            moved.entries, moved.present
        ),
        (Ok(_), _) => {}
        (Err(e), _) => tracing::warn!(
            "the layer cache {repository} was not used: {}",
            crate::diagnostic::error_chain(&e)
        ),
    }
}

/// A flag that SIGINT and SIGTERM set ([`crate::usecase::cancel_on_signals`]).
fn cancel_on_signals() -> Arc<AtomicBool> {
    crate::usecase::cancel_on_signals()
}
