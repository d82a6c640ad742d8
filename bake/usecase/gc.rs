//! Garbage collection: remove old AMIs (deprecating first) and images (ECR, registries) of
//! recipes that nothing references any more, explaining every decision ([`crate::gc`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Context;
use crate::aws::Aws;
use crate::diagnostic::Diagnose;
use crate::exit::ExitStatus;
use crate::gc::{GcError, GcOptions, GcReport};
use crate::recipe::Recipe;
use crate::registry::auth::{ChainCredentials, Credentials};
use crate::registry::ecr::EcrCredentials;
use crate::registry::{Client, Reference, RegistryError};

/// Why nothing was collected.
#[derive(Debug, thiserror::Error)]
pub enum GcUseError {
    #[error(transparent)]
    ReadDir(std::io::Error),
    #[error("no recipe (`*.yaml`, `*.yml`) in `{}`", .0.display())]
    NoRecipes(PathBuf),
    #[error(
        "the store `{}` has no build records: gc removes only what this store built",
        .0.display()
    )]
    NoStore(PathBuf),
    #[error(transparent)]
    Context(#[from] super::ContextError),
    #[error(transparent)]
    Client(RegistryError),
    #[error(transparent)]
    Gc(#[from] GcError),
}

impl Diagnose for GcUseError {
    fn hint(&self) -> Option<String> {
        match self {
            GcUseError::NoStore(_) => {
                Some("pass the store the builds used (`--store`, `BAKE_STORE`)".into())
            }
            GcUseError::Client(e) => e.hint(),
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            GcUseError::ReadDir(_) | GcUseError::NoRecipes(_) | GcUseError::NoStore(_) => {
                ExitStatus::RecipeOrUsage
            }
            _ => ExitStatus::Infrastructure,
        }
    }
}

/// The recipe files (`*.yaml`, `*.yml`) directly in `dir`, sorted.
pub fn recipes_in(dir: &Path) -> Result<Vec<PathBuf>, GcUseError> {
    let entries = fs_err::read_dir(dir).map_err(GcUseError::ReadDir)?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(GcUseError::NoRecipes(dir.to_owned()));
    }
    Ok(found)
}

/// Collects the recipes' old artifacts that this store built (or, with `options.dry_run`,
/// decides and explains only).
pub fn collect(
    ctx: &Context,
    recipes: &[Recipe],
    options: &GcOptions,
) -> Result<GcReport, GcUseError> {
    let settings = &ctx.settings;
    if !settings.store.join("oci-layout").is_file() {
        return Err(GcUseError::NoStore(settings.store.clone()));
    }
    let store = ctx.store()?;
    ctx.block_on(async {
        let aws = ctx.aws().await;
        let registry = registry_client(ctx, recipes, aws)?;
        Ok(crate::gc::run(aws, &registry, store, recipes, options).await?)
    })?
}

/// The client for the recipes' registries: Docker's credentials and ECR's tokens, plain HTTP
/// where a registry target says `insecure`, as `bake push` talks to them.
fn registry_client(ctx: &Context, recipes: &[Recipe], aws: &Aws) -> Result<Client, GcUseError> {
    let settings = &ctx.settings;
    let sources: Vec<Arc<dyn Credentials>> = vec![
        settings.registry.credentials(),
        Arc::new(EcrCredentials::new(aws.clone())),
    ];
    let mut options = settings.registry.client_options();
    for target in recipes
        .iter()
        .flat_map(|r| &r.publish.registries)
        .filter(|t| t.insecure)
    {
        if let Ok(reference) = Reference::repository_only(&target.repository) {
            options.insecure.push(reference.registry().to_owned());
        }
    }
    Client::new(options, Arc::new(ChainCredentials(sources))).map_err(GcUseError::Client)
}
