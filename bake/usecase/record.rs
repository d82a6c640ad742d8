//! Finding a built version's record in the store from what a person typed: a version, a version
//! prefix, or a recipe file (its current version).

use std::path::{Path, PathBuf};

use super::Context;
use super::plan::PlanRecipeError;
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::plan::Plan;
use crate::recipe::{Recipe, RecipeErrors, VarSources};
use crate::store::record::BuildRecord;
use crate::store::{Store, StoreError};

/// Why no build record was found. Every case is the user's to fix (build it, name it better).
#[derive(Debug, thiserror::Error)]
pub enum FindRecordError {
    /// The recipe file has errors (the first is shown).
    #[error(transparent)]
    Recipe(RecipeErrors),
    /// The recipe's current version could not be planned (the first report is shown).
    #[error("failed to plan `{shown}`")]
    Plan {
        shown: String,
        #[source]
        source: PlanRecipeError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("version {version} is not in the store `{}`", store.display())]
    NotBuilt { version: String, store: PathBuf },
    #[error("version {version} of `{recipe}` is not in the store `{}`", store.display())]
    RecipeNotBuilt {
        version: String,
        recipe: String,
        store: PathBuf,
    },
    #[error("`{0}` is neither a recipe file nor a version")]
    NotAVersion(String),
    #[error("`{what}` matches {count} versions; give more digits")]
    Ambiguous { what: String, count: usize },
}

impl Diagnose for FindRecordError {
    fn hint(&self) -> Option<String> {
        match self {
            FindRecordError::NotBuilt { .. } | FindRecordError::RecipeNotBuilt { .. } => {
                Some("build it first with `bake build RECIPE`".into())
            }
            FindRecordError::NotAVersion(_) => {
                Some("give `sha256:<hex>`, at least 12 hex digits of it, or a recipe path".into())
            }
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        ExitStatus::RecipeOrUsage
    }

    fn reports(&self) -> Vec<Report> {
        vec![self.report()]
    }
}

impl FindRecordError {
    /// The one report shown for it.
    pub fn report(&self) -> Report {
        match self {
            FindRecordError::Recipe(errors) => errors
                .0
                .first()
                .map(|e| e.report())
                .unwrap_or_else(|| Report::new("invalid recipe")),
            FindRecordError::Plan { source, .. } => source
                .reports()
                .into_iter()
                .next()
                .unwrap_or_else(|| Report::new(self.to_string())),
            _ => Report::from_error(self).with_hint(Diagnose::hint(self)),
        }
    }
}

/// Loads and plans the recipe file `path` (shown as given).
pub fn load_and_plan(
    ctx: &Context,
    path: &str,
    vars: &VarSources,
) -> Result<(Recipe, Plan), FindRecordError> {
    let recipe = crate::recipe::load(Path::new(path), vars).map_err(FindRecordError::Recipe)?;
    let plan =
        super::plan::plan_recipe(ctx, &recipe, path).map_err(|source| FindRecordError::Plan {
            shown: path.to_owned(),
            source,
        })?;
    Ok((recipe, plan))
}

/// The build record named by a version, a version prefix, or a recipe file.
pub fn find_record(
    ctx: &Context,
    store: &Store,
    what: &str,
    vars: &VarSources,
) -> Result<BuildRecord, FindRecordError> {
    let not_built = |version: &str| FindRecordError::NotBuilt {
        version: version.to_owned(),
        store: ctx.settings.store.clone(),
    };
    if Path::new(what).is_file() {
        let (_, plan) = load_and_plan(ctx, what, vars)?;
        return store
            .record(&plan.version)?
            .ok_or_else(|| not_built(&plan.version));
    }
    let Ok(prefix) = what.parse::<crate::id::VersionPrefix>() else {
        return Err(FindRecordError::NotAVersion(what.to_owned()));
    };
    let mut matches = crate::store::record::versions_with_prefix(store, &prefix)?;
    match matches.len() {
        0 => Err(not_built(what)),
        1 => {
            let version = matches.remove(0);
            store.record(&version)?.ok_or_else(|| not_built(&version))
        }
        count => Err(FindRecordError::Ambiguous {
            what: what.to_owned(),
            count,
        }),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn context(store: &Path) -> Context {
        let store = store.to_str().expect("a UTF-8 temp path");
        let cli = crate::cli::Cli::try_parse_from(["bake", "--store", store, "validate"])
            .expect("the command line parses");
        Context::new(crate::settings::Settings::resolve(&cli.global).expect("settings resolve"))
    }

    #[test]
    fn a_name_that_is_no_version_is_the_users_to_fix_and_says_what_to_give() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(&dir.path().join("store"));
        let store = ctx.store().unwrap();
        let error = find_record(&ctx, store, "web-latest", &VarSources::default()).unwrap_err();
        assert!(matches!(error, FindRecordError::NotAVersion(_)));
        assert_eq!(error.exit_status(), ExitStatus::RecipeOrUsage);
        let report = error.report();
        assert_eq!(
            report.message,
            "`web-latest` is neither a recipe file nor a version"
        );
        assert!(report.hint.unwrap().contains("at least 12 hex digits"));
    }

    #[test]
    fn a_version_the_store_lacks_says_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(&dir.path().join("store"));
        let store = ctx.store().unwrap();
        let error = find_record(&ctx, store, "0123456789ab", &VarSources::default()).unwrap_err();
        assert!(matches!(error, FindRecordError::NotBuilt { .. }));
        assert_eq!(error.exit_status(), ExitStatus::RecipeOrUsage);
        let reports = error.reports();
        assert_eq!(reports.len(), 1);
        assert!(
            reports[0]
                .message
                .starts_with("version 0123456789ab is not in the store")
        );
        assert_eq!(
            reports[0].hint.as_deref(),
            Some("build it first with `bake build RECIPE`")
        );
    }
}
