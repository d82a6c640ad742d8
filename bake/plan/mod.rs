//! Plans: resolve a recipe into the exact inputs a build would use, hash them into the version,
//! and list every effect a run would have.
//!
//! The version is `sha256:` + hex of the RFC 8785 canonical JSON of [`Plan::inputs`], which holds:
//! - `format`: bake's version-format string ([`VERSION_FORMAT`]), bumped only when the meaning of
//!   an input changes, so upgrading bake does not invalidate every cache;
//! - `recipe`: the validated recipe (name, variables with their values, base as written, build
//!   settings, provisioners, tests and outputs), with templates as written and not rendered;
//! - `base`: the base's pinned identity (a manifest digest, a tarball's digest, a bootstrap's
//!   full configuration, a base recipe's version);
//! - `source_date_epoch`: the timestamp every layer and config carries (from the recipe, else
//!   the `SOURCE_DATE_EPOCH` environment variable, else 0);
//! - `builtins`: digests of the scripts bake itself supplies (hardening profiles);
//! - `files`: every file the recipe reads (scripts, file sources; directories entry by entry),
//!   each with its path relative to the recipe, type, permission bits and content digest.
//!
//! Left out, on purpose: the recipe's `description` and `publish` section (where a version goes
//! does not change what it is), YAML formatting, key order and comments (the recipe is hashed
//! in canonical form), file timestamps and owners, and **sensitive variable values**: a digest
//! of a secret is an offline oracle for guessing it, and secrets are runtime inputs that must
//! never reach an artifact anyway. They enter as `"***"`, so declaring a variable sensitive is
//! itself part of the version.

pub mod archive;
pub mod base;
mod effects;
pub mod hash;
pub mod inputs;
pub mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use effects::Effect;
pub use inputs::{BaseIdentity, BuiltinInput, PlanInputs, RecipeInputs};

use crate::id::Version;
use crate::recipe::{self, Recipe, RecipeErrors, Script, Step, VarSources};
use hash::{DigestCache, FileInput, HashError, tree_inputs};

/// SOURCE_DATE_EPOCH when neither the recipe nor the environment sets one: 0, the Unix epoch.
/// A fixed default keeps builds reproducible by default, and 1970-01-01 in an image's `created`
/// field says "reproducible" rather than pretending to be a date.
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 0;

/// Bumped whenever the meaning of the version inputs changes.
pub const VERSION_FORMAT: &str = "bake.version/v1";

/// A resolved recipe: its version, the inputs that define it, and what a run would do.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub name: String,
    /// The recipe file, as the user named it.
    pub recipe: String,
    /// `sha256:<hex>` of the canonical inputs.
    pub version: Version,
    /// The bake that made this plan (recorded, not hashed).
    pub bake_version: &'static str,
    pub inputs: PlanInputs,
    pub effects: Vec<Effect>,
}

impl Plan {
    /// The SOURCE_DATE_EPOCH the build uses (part of the inputs).
    pub fn source_date_epoch(&self) -> u64 {
        self.inputs.source_date_epoch
    }

    /// The first 12 hex digits of the version, for names and tags.
    pub fn version_short(&self) -> &str {
        self.version.short()
    }
}

/// Settings a plan needs from outside the recipe.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// The AWS default region, for targets that do not name one.
    pub aws_region: Option<String>,
    /// `SOURCE_DATE_EPOCH` from the environment, used when the recipe sets none.
    pub source_date_epoch: Option<u64>,
    /// Where file digests are remembered between runs (in the store); `None` hashes every time.
    pub digest_cache: Option<PathBuf>,
    /// Resolves image base tags to digests (a registry); `None`: image bases must be pinned.
    pub image_resolver: Option<base::SharedResolver>,
    /// Pins bootstrap bases' archives (by default, reading them: a bootstrap reads its mirror
    /// anyway); `None`: a bootstrap base cannot be planned.
    pub archive_resolver: Option<archive::SharedArchiveResolver>,
    /// The source AMI an `ami` base resolved to (in the build region), looked up in AWS before
    /// planning; `None` leaves such a recipe unplannable.
    pub source_ami: Option<crate::ami::instance::SourceAmi>,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            aws_region: None,
            source_date_epoch: None,
            digest_cache: None,
            image_resolver: None,
            archive_resolver: Some(std::sync::Arc::new(archive::ArchiveFetcher::new())),
            source_ami: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Recipe(#[from] RecipeErrors),
    #[error(transparent)]
    Hash(HashError),
    #[error("failed to read `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("base image `{reference}` is not pinned by digest")]
    UnpinnedImage { reference: String },
    #[error("the base image of recipe `{recipe}` is not a valid reference")]
    BadImageReference {
        recipe: String,
        #[source]
        source: crate::registry::ReferenceError,
    },
    #[error("failed to resolve base image `{reference}` to a digest")]
    ImageResolve {
        reference: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to pin the package archive {mirror} {suite}")]
    ArchiveResolve {
        mirror: String,
        suite: String,
        #[source]
        source: archive::ArchiveError,
    },
    #[error("recipe `{recipe}` bootstraps from package archives, which bake has not pinned")]
    UnpinnedArchives { recipe: String },
    #[error("recipe `{recipe}` starts from a source AMI, which bake has not resolved")]
    UnresolvedAmi { recipe: String },
    #[error("OCI layout `{}` cannot be a base: {reason}", path.display())]
    Layout { path: PathBuf, reason: String },
    #[error("base recipes form a cycle: {}", chain.join(" → "))]
    Cycle { chain: Vec<String> },
    #[error("failed to plan base recipe `{}`", path.display())]
    BaseRecipe {
        path: PathBuf,
        #[source]
        source: Box<PlanError>,
    },
}

impl PlanError {
    /// A fix bake knows, if any.
    pub fn hint(&self) -> Option<String> {
        match self {
            PlanError::UnpinnedImage { reference } => Some(format!(
                "pin it as `{reference}@sha256:<digest>`, or plan with registry access so bake resolves the tag"
            )),
            PlanError::UnresolvedAmi { .. } => Some(
                "bake resolves source AMIs with AWS access: check the credentials and the region"
                    .into(),
            ),
            PlanError::ImageResolve { source, .. } => source
                .downcast_ref::<crate::registry::RegistryError>()
                .and_then(crate::registry::RegistryError::hint),
            PlanError::Cycle { .. } => {
                Some("a recipe cannot build on itself, directly or through others".into())
            }
            PlanError::ArchiveResolve { .. } => Some(
                "a plan pins each archive by its InRelease (or Release) file: check the mirror URL, the suite and network access to the mirror".into(),
            ),
            _ => None,
        }
    }

    /// Whether the problem is in what the user wrote (as opposed to the environment).
    pub fn is_user_error(&self) -> bool {
        match self {
            PlanError::Recipe(_)
            | PlanError::UnpinnedImage { .. }
            | PlanError::BadImageReference { .. }
            | PlanError::UnresolvedAmi { .. }
            | PlanError::Layout { .. }
            | PlanError::Cycle { .. } => true,
            // A tag that does not exist is the recipe's fault; an unreachable registry is not.
            PlanError::ImageResolve { source, .. } => source
                .downcast_ref::<crate::registry::RegistryError>()
                .is_some_and(crate::registry::RegistryError::is_user_error),
            PlanError::Hash(_)
            | PlanError::Io { .. }
            | PlanError::ArchiveResolve { .. }
            | PlanError::UnpinnedArchives { .. } => false,
            PlanError::BaseRecipe { source, .. } => source.is_user_error(),
        }
    }
}

/// Plans `recipe` (loaded from `shown_path`).
pub fn plan(recipe: &Recipe, shown_path: &str, options: &PlanOptions) -> Result<Plan, PlanError> {
    plan_many(&[(recipe, shown_path)], options)
        .pop()
        .expect("one plan per recipe")
}

/// Plans several recipes with one digest cache, each base recipe planned once: list parents
/// before the recipes built on them and a base recipe among `recipes` is not planned again.
/// One result per recipe, in order.
pub fn plan_many(
    recipes: &[(&Recipe, &str)],
    options: &PlanOptions,
) -> Vec<Result<Plan, PlanError>> {
    let cache = match &options.digest_cache {
        Some(file) => DigestCache::load(file),
        None => DigestCache::in_memory(),
    };
    let mut planned = HashMap::new();
    let plans = recipes
        .iter()
        .map(|(recipe, shown)| {
            let mut stack = vec![recipe.path.clone()];
            let plan = plan_inner(recipe, shown, options, &mut stack, &cache, &mut planned);
            if let Ok(plan) = &plan {
                planned.insert(recipe.path.clone(), plan.clone());
            }
            plan
        })
        .collect();
    cache.save();
    plans
}

fn plan_inner(
    recipe: &Recipe,
    shown_path: &str,
    options: &PlanOptions,
    stack: &mut Vec<PathBuf>,
    cache: &DigestCache,
    planned: &mut HashMap<PathBuf, Plan>,
) -> Result<Plan, PlanError> {
    let mut plan_base = |path: &Path| -> Result<Plan, PlanError> {
        if stack.iter().any(|p| p == path) {
            let mut chain: Vec<String> = stack.iter().map(|p| p.display().to_string()).collect();
            chain.push(path.display().to_string());
            return Err(PlanError::Cycle { chain });
        }
        if let Some(plan) = planned.get(path) {
            return Ok(plan.clone());
        }
        // A base recipe gets its defaults and the environment, not the `--var`s meant for the
        // recipe being planned.
        let sources = VarSources::default().with_process_env();
        let wrap = |source: PlanError| PlanError::BaseRecipe {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let base = recipe::load(path, &sources).map_err(|e| wrap(e.into()))?;
        stack.push(path.to_path_buf());
        let plan = plan_inner(
            &base,
            &path.display().to_string(),
            options,
            stack,
            cache,
            planned,
        );
        stack.pop();
        let plan = plan.map_err(|e| match e {
            cycle @ PlanError::Cycle { .. } => cycle,
            other => wrap(other),
        })?;
        planned.insert(path.to_path_buf(), plan.clone());
        Ok(plan)
    };
    let base = base::identity(
        recipe,
        &mut plan_base,
        cache,
        options.image_resolver.as_deref(),
        options.archive_resolver.as_deref(),
        options.source_ami.as_ref(),
    )?;
    let files = file_inputs(recipe, cache)?;
    let builtins = builtin_inputs(recipe);
    // Timestamps in every layer and config come from it, so it is an input like any other.
    let source_date_epoch = recipe
        .build
        .source_date_epoch
        .or(options.source_date_epoch)
        .unwrap_or(DEFAULT_SOURCE_DATE_EPOCH);
    fn value(v: &impl Serialize) -> serde_json::Value {
        serde_json::to_value(v).expect("recipes serialize")
    }
    let inputs = PlanInputs {
        format: VERSION_FORMAT.to_owned(),
        recipe: RecipeInputs {
            name: recipe.name.clone(),
            variables: serde_json::from_value(value(&recipe.variables))
                .expect("variables serialize as variable inputs"),
            base: value(&recipe.base),
            build: value(&recipe.build),
            provisioners: value(&recipe.provisioners),
            tests: value(&recipe.tests),
            outputs: value(&recipe.outputs),
        },
        base,
        files,
        builtins,
        source_date_epoch,
    };
    let version = inputs.version();
    let effects = effects::effects(recipe, &version, options.aws_region.as_deref())
        .map_err(|e| PlanError::Recipe(e.into()))?;
    Ok(Plan {
        name: recipe.name.clone(),
        recipe: shown_path.to_owned(),
        version,
        bake_version: env!("CARGO_PKG_VERSION"),
        inputs,
        effects,
    })
}

/// The flavour a hardening step runs in: as written, or following the recipe's output.
pub fn hardening_flavour(
    recipe: &Recipe,
    step: &crate::recipe::HardeningStep,
) -> crate::recipe::Flavour {
    step.flavour.unwrap_or(
        if recipe.outputs.oci.is_none() && recipe.outputs.ami.is_some() {
            crate::recipe::Flavour::Ami
        } else {
            crate::recipe::Flavour::Oci
        },
    )
}

/// The digests of the scripts bake itself supplies (hardening profiles): a new bake with a
/// changed profile gives new versions.
fn builtin_inputs(recipe: &Recipe) -> Vec<BuiltinInput> {
    let mut out = Vec::new();
    for p in &recipe.provisioners {
        if let Step::Hardening(h) = &p.step {
            let flavour = hardening_flavour(recipe, h);
            let script = crate::build::hardening::script(&h.profile, flavour, &h.exclude)
                .unwrap_or_default();
            out.push(BuiltinInput {
                profile: h.profile.clone(),
                flavour: serde_json::to_value(flavour)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .expect("flavours serialize as strings"),
                digest: crate::id::Digest::of(script.as_bytes()),
            });
        }
    }
    out
}

/// Every file the recipe reads, sorted by path, each listed once.
fn file_inputs(recipe: &Recipe, cache: &DigestCache) -> Result<Vec<FileInput>, PlanError> {
    let mut files = Vec::new();
    for p in &recipe.provisioners {
        match &p.step {
            Step::File(f) => {
                files.extend(tree_inputs(&recipe.root, &f.source, cache).map_err(PlanError::Hash)?)
            }
            Step::Shell(s) => {
                if let Script::File { path, .. } = &s.script {
                    files.extend(tree_inputs(&recipe.root, path, cache).map_err(PlanError::Hash)?);
                }
            }
            Step::Hardening(_) => {}
        }
    }
    // The keyring the archives are checked with is an input like a script.
    if let recipe::Base::Bootstrap(bootstrap) = &recipe.base
        && let Some(keyring) = &bootstrap.keyring_path
    {
        files.extend(tree_inputs(&recipe.root, keyring, cache).map_err(PlanError::Hash)?);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup_by(|a, b| a.path == b.path);
    Ok(files)
}

impl crate::diagnostic::Diagnose for PlanError {
    fn hint(&self) -> Option<String> {
        PlanError::hint(self)
    }

    fn exit_status(&self) -> crate::exit::ExitStatus {
        if self.is_user_error() {
            crate::exit::ExitStatus::RecipeOrUsage
        } else {
            crate::exit::ExitStatus::Infrastructure
        }
    }

    /// One report per recipe error, or one with the cause chain.
    fn reports(&self) -> Vec<crate::diagnostic::Report> {
        match self {
            PlanError::Recipe(errors) => errors.0.iter().map(|e| e.report()).collect(),
            PlanError::BaseRecipe { source, .. } if matches!(**source, PlanError::Recipe(_)) => {
                source.reports()
            }
            other => vec![crate::diagnostic::Report::from_error(other).with_hint(other.hint())],
        }
    }
}
