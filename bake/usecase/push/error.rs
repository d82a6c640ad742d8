//! Why a push did not start, or sent nothing.

use std::path::PathBuf;

use super::super::record::FindRecordError;
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::registry::RegistryError;

/// Why nothing was pushed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Context(#[from] super::super::ContextError),
    #[error(transparent)]
    To(crate::registry::ReferenceError),
    #[error(transparent)]
    Find(#[from] FindRecordError),
    #[error("version {version} of `{recipe}` is not in the store `{}`", store.display())]
    RecipeNotBuilt {
        version: String,
        recipe: String,
        store: PathBuf,
    },
    #[error(transparent)]
    Target(crate::registry::ReferenceError),
    #[error("version {version} of `{name}` has no OCI image to push: it was built as an AMI")]
    NoImage { version: String, name: String },
    #[error("nothing to push `{0}` to: its recipe has no registry or ECR targets")]
    NoTargets(String),
    #[error(transparent)]
    Client(RegistryError),
}

impl Diagnose for PushError {
    fn hint(&self) -> Option<String> {
        match self {
            PushError::To(_) => Some("give `--to registry.example/name`, without a tag".into()),
            PushError::RecipeNotBuilt { .. } => {
                Some("build it first with `bake build RECIPE`".into())
            }
            PushError::NoImage { .. } => {
                Some("push sends images; give the recipe `outputs.oci` to build one".into())
            }
            PushError::NoTargets(_) => Some("give one or more `--to REPOSITORY`".into()),
            PushError::Client(e) => e.hint(),
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            PushError::Context(_) | PushError::Client(_) => ExitStatus::Infrastructure,
            _ => ExitStatus::RecipeOrUsage,
        }
    }

    fn reports(&self) -> Vec<Report> {
        match self {
            PushError::Find(e) => e.reports(),
            _ => vec![Report::from_error(self).with_hint(Diagnose::hint(self))],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_user_named_wrongly_is_a_usage_error_with_its_fix() {
        let error = PushError::NoTargets("web.yaml".into());
        assert_eq!(error.exit_status(), ExitStatus::RecipeOrUsage);
        let reports = error.reports();
        assert_eq!(
            reports[0].message,
            "nothing to push `web.yaml` to: its recipe has no registry or ECR targets"
        );
        assert_eq!(
            reports[0].hint.as_deref(),
            Some("give one or more `--to REPOSITORY`")
        );
        let image = PushError::NoImage {
            version: "sha256:00".into(),
            name: "base".into(),
        };
        assert_eq!(image.exit_status(), ExitStatus::RecipeOrUsage);
        assert!(Diagnose::hint(&image).unwrap().contains("outputs.oci"));
    }

    #[test]
    fn the_store_or_the_runtime_failing_is_infrastructure() {
        let error = PushError::Context(super::super::super::ContextError::Runtime(
            std::io::Error::other("no threads"),
        ));
        assert_eq!(error.exit_status(), ExitStatus::Infrastructure);
    }
}
