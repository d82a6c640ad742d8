//! Why a version could not be published, or a channel moved or read.

use std::path::PathBuf;

use super::super::plan::PlanRecipeError;
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::publish::PublishError;
use crate::publish::inputs::InputsError;
use crate::registry::RegistryError;

/// Why a version could not be published, or a channel moved or read.
#[derive(Debug, thiserror::Error)]
pub enum PublishUseError {
    #[error(transparent)]
    Context(#[from] super::super::ContextError),
    /// The store could not be read for the version's build record.
    #[error(transparent)]
    Store(super::super::ContextError),
    #[error(transparent)]
    Inputs(#[from] InputsError),
    #[error("publish inputs `{}` are for recipe `{found}`, not `{recipe}`", path.display())]
    InputsForOtherRecipe {
        path: PathBuf,
        found: String,
        recipe: String,
    },
    /// The recipe's current version could not be planned (its first report is shown).
    #[error("failed to plan `{shown}`")]
    Plan {
        shown: String,
        #[source]
        source: PlanRecipeError,
    },
    #[error("version {version} of `{recipe}` is not built in the store `{}`", store.display())]
    NotBuilt {
        version: String,
        recipe: String,
        store: PathBuf,
    },
    /// The build record lacks what publishing needs.
    #[error(transparent)]
    Record(InputsError),
    #[error(transparent)]
    Client(#[from] RegistryError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl Diagnose for PublishUseError {
    fn hint(&self) -> Option<String> {
        match self {
            PublishUseError::NotBuilt { .. } => {
                Some("run `bake build` first, or give the artifacts with --inputs FILE".into())
            }
            PublishUseError::Client(e) => e.hint(),
            PublishUseError::Publish(e) => e.hint(),
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            PublishUseError::Context(_) | PublishUseError::Client(_) => ExitStatus::Infrastructure,
            PublishUseError::Publish(e) if !e.is_refusal() => ExitStatus::Infrastructure,
            // Finding the version's artifacts is the user's to fix, whatever failed.
            _ => ExitStatus::RecipeOrUsage,
        }
    }

    fn reports(&self) -> Vec<Report> {
        match self {
            PublishUseError::Plan { source, .. } => {
                vec![
                    source
                        .reports()
                        .into_iter()
                        .next()
                        .unwrap_or_else(|| Report::new(self.to_string())),
                ]
            }
            _ => vec![Report::from_error(self).with_hint(Diagnose::hint(self))],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unbuilt_version_is_a_usage_error_that_names_both_ways_out() {
        let error = PublishUseError::NotBuilt {
            version: "sha256:0123".into(),
            recipe: "web".into(),
            store: PathBuf::from(".bake"),
        };
        assert_eq!(error.exit_status(), ExitStatus::RecipeOrUsage);
        let report = &error.reports()[0];
        assert_eq!(
            report.message,
            "version sha256:0123 of `web` is not built in the store `.bake`"
        );
        assert!(report.hint.as_deref().unwrap().contains("--inputs FILE"));
    }

    #[test]
    fn only_publish_failures_retrying_may_fix_are_infrastructure() {
        let other = PublishUseError::InputsForOtherRecipe {
            path: PathBuf::from("inputs.json"),
            found: "db".into(),
            recipe: "web".into(),
        };
        assert_eq!(other.exit_status(), ExitStatus::RecipeOrUsage);
        let runtime = PublishUseError::Context(super::super::super::ContextError::Runtime(
            std::io::Error::other("no threads"),
        ));
        assert_eq!(runtime.exit_status(), ExitStatus::Infrastructure);
    }
}
