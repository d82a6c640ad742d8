//! Building a recipe's OCI image into the local store: pull the base, take a version another run
//! pushed (`fetch_published`) rather than build it again, share step layers through the recipe's
//! layer cache, choose the runner (namespaces or a Docker Engine), build, and attest.

use std::num::NonZeroUsize;
use std::sync::Arc;

use super::attest::{AttestError, SigningOptions, attest_image};
use super::plan::PlanRecipeError;
use super::{Context, ContextError};
use crate::ami::boot::Accelerator;
use crate::build::engine::{Engine, EngineError};
use crate::build::pipeline::{self, BuildError, BuildOptions, BuildOutput, BuildReporter, Builder};
use crate::build::runner::{NamespaceRunner, Runner};
use crate::diagnostic::Diagnose;
use crate::exit::ExitStatus;
use crate::plan::Plan;
use crate::provenance::manifest::Attestations;
use crate::recipe::{self, Recipe, RunnerKind};
use crate::registry::RegistryError;
use crate::settings::Verbosity;
use crate::store::Store;

/// How `bake build` builds an image.
#[derive(Debug, Clone, Default)]
pub struct BuildImageOptions {
    /// The runner to use over the recipe's `build.runner`.
    pub runner: Option<RunnerKind>,
    /// How boot tests run QEMU, over the settings'.
    pub boot_accelerator: Option<Accelerator>,
    /// How the version's provenance is signed; `None`: it is not attested.
    pub signing: Option<SigningOptions>,
}

/// What building an image gave.
#[derive(Debug)]
pub struct ImageBuilt {
    pub output: BuildOutput,
    /// The push target the version was fetched from, when another run had pushed it.
    pub fetched_from: Option<String>,
    /// The version's attestations (none when not attested, or fetched).
    pub attestations: Option<Attestations>,
}

/// Why an image was not built.
#[derive(Debug, thiserror::Error)]
pub enum BuildImageError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Plan(#[from] PlanRecipeError),
    #[error(transparent)]
    PullBase(RegistryError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Runner(std::io::Error),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Attest(#[from] AttestError),
}

impl Diagnose for BuildImageError {
    fn hint(&self) -> Option<String> {
        match self {
            BuildImageError::Context(e) => e.hint(),
            BuildImageError::Plan(e) => e.hint(),
            BuildImageError::PullBase(e) => e.hint(),
            BuildImageError::Engine(e) => e.hint(),
            BuildImageError::Runner(_) => None,
            BuildImageError::Build(e) => e.hint(),
            BuildImageError::Attest(e) => e.hint(),
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            BuildImageError::Plan(e) => e.exit_status(),
            BuildImageError::PullBase(e) if e.is_user_error() => ExitStatus::RecipeOrUsage,
            BuildImageError::Build(e) => build_exit_status(e),
            _ => ExitStatus::Infrastructure,
        }
    }

    fn reports(&self) -> Vec<crate::diagnostic::Report> {
        match self {
            BuildImageError::Plan(e) => e.reports(),
            BuildImageError::Attest(e) => e.reports(),
            _ => vec![crate::diagnostic::Report::from_error(self).with_hint(self.hint())],
        }
    }
}

/// The exit status of a failed build: interrupted, the recipe's fault, or the machine's.
pub fn build_exit_status(error: &BuildError) -> ExitStatus {
    if error.is_interrupted() {
        ExitStatus::Interrupted
    } else if error.is_recipe_failure() {
        ExitStatus::RecipeOrUsage
    } else {
        ExitStatus::Infrastructure
    }
}

/// Builds `recipe`'s OCI image into the store (or returns the stored one when its version is
/// already there), then signs its provenance.
pub fn build_image(
    ctx: &Context,
    recipe: &Recipe,
    shown: &str,
    options: &BuildImageOptions,
    reporter: &mut dyn BuildReporter,
) -> Result<ImageBuilt, BuildImageError> {
    let store = ctx.store()?;
    let plan = super::plan::plan_recipe(ctx, recipe, shown)?;
    if let recipe::Base::Image { reference } = &recipe.base
        && let Some(digest) = plan.inputs.base.digest()
    {
        let digest = &digest.to_string();
        let architecture = recipe
            .outputs
            .oci
            .as_ref()
            .map_or("amd64", |o| o.architecture.oci());
        crate::registry::pull::pull_base_blocking(
            &ctx.settings.registry,
            store,
            reference,
            digest,
            architecture,
        )
        .map_err(BuildImageError::PullBase)?;
    }
    // A version another run pushed is taken from the registry rather than built again.
    let fetched = if pipeline::is_built(store, &plan.version) {
        None
    } else {
        fetch_published(ctx, recipe, &plan, store)
    };
    let cancel = ctx.cancel();
    let docker = match options.runner {
        Some(choice) => choice == RunnerKind::Docker,
        None => recipe.build.runner == RunnerKind::Docker,
    } && !pipeline::is_built(store, &plan.version); // a built version runs nothing
    let namespace;
    let engine;
    let runner: &dyn Runner = if docker {
        engine = Engine::connect(Arc::clone(cancel))?;
        &engine
    } else {
        namespace = NamespaceRunner::new().map_err(BuildImageError::Runner)?;
        &namespace
    };
    let builder = Builder {
        store,
        runner,
        options: BuildOptions {
            source_date_epoch: plan.source_date_epoch(),
            workers: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            cancel: Arc::clone(cancel),
            boot_accelerator: options.boot_accelerator.or(ctx.settings.boot_accelerator),
        },
    };
    let shares_layers = recipe.build.cache.is_some()
        && fetched.is_none()
        && !pipeline::is_built(store, &plan.version);
    if shares_layers {
        layer_cache(ctx, recipe, &plan, store, Direction::Import);
    }
    let built = builder.build(recipe, &plan, reporter);
    if shares_layers && built.is_ok() {
        layer_cache(ctx, recipe, &plan, store, Direction::Export);
    }
    let output = built?;
    // Provenance, SBOMs and the manifest (kept when the version is already attested). A fetched
    // version's provenance is the one its builder pushed beside it: this machine built nothing,
    // so it signs nothing.
    let attestations = match &options.signing {
        Some(signing) if fetched.is_none() => {
            attest_image(ctx, store, output.version.as_ref(), signing)?.attestations
        }
        _ => None,
    };
    Ok(ImageBuilt {
        output,
        fetched_from: fetched,
        attestations,
    })
}

/// Asks the recipe's push targets (registries and ECR repositories) for the planned version;
/// when one has it, pulls it into the store with a build record saying where it came from and
/// returns that reference. Any failure is logged and the version is built here instead.
pub fn fetch_published(
    ctx: &Context,
    recipe: &Recipe,
    plan: &Plan,
    store: &Store,
) -> Option<String> {
    use crate::registry::fetch;
    use crate::registry::{
        Reference, auth::ChainCredentials, auth::Credentials, ecr::EcrCredentials,
    };
    let oci = recipe.outputs.oci.as_ref()?;
    if recipe.publish.registries.is_empty() && recipe.publish.ecr.is_empty() {
        return None;
    }
    let settings = &ctx.settings;
    let found = ctx
        .block_on(async {
            let mut repositories: Vec<Reference> = recipe
                .publish
                .registries
                .iter()
                .filter_map(|r| Reference::repository_only(&r.repository).ok())
                .collect();
            let mut credentials: Vec<Arc<dyn Credentials>> = vec![settings.registry.credentials()];
            if !recipe.publish.ecr.is_empty() {
                let aws = ctx.aws().await;
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
                credentials.push(Arc::new(EcrCredentials::new(aws.clone())));
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
        })
        .map_err(|e| tracing::warn!("the registries were not asked for the version: {e}"))
        .ok()?;
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
    let compressor = pipeline::describe_compression(recipe.build.compression);
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
fn layer_cache(ctx: &Context, recipe: &Recipe, plan: &Plan, store: &Store, direction: Direction) {
    use crate::build::remote_cache;
    let Some(repository) = &recipe.build.cache else {
        return;
    };
    let settings = &ctx.settings;
    let runtime = match ctx.runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!(
                "the layer cache {repository} was not used: {}",
                crate::diagnostic::error_chain(&e)
            );
            return;
        }
    };
    let moved = runtime.block_on(async {
        let repository = crate::registry::Reference::repository_only(repository)?;
        let credentials = settings
            .registry
            .credentials_for(repository.registry())
            .await;
        let client = crate::registry::Client::new(settings.registry.client_options(), credentials)?;
        match direction {
            Direction::Import => {
                remote_cache::import(&client, &repository, store, recipe, plan).await
            }
            Direction::Export => {
                remote_cache::export(&client, &repository, store, recipe, plan).await
            }
        }
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
