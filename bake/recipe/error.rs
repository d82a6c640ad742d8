//! Recipe errors: what is wrong, where in which file, and how to fix it.
//!
//! Loading a recipe collects every error it can find instead of stopping at the first, so one
//! `bake validate` run shows a person everything to fix.

use std::path::PathBuf;

use thiserror::Error;

use crate::diagnostic::{Report, SourceSpan};

/// What is wrong with a recipe. The message names the thing; the location and hint live in
/// [`RecipeError`].
#[derive(Debug, Error)]
pub enum RecipeErrorKind {
    #[error("failed to read recipe `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("unknown field `{field}`{}", context_suffix(.context))]
    UnknownField { field: String, context: String },
    #[error("unknown {what} `{given}`")]
    UnknownVariant { what: String, given: String },
    #[error("unsupported recipe schema version `{0}`; this bake reads `bake: 1`")]
    SchemaVersion(String),
    #[error("invalid {what} `{value}`: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("variable `{name}` expects a {expected} but {source_name} gives {found}")]
    VariableType {
        name: String,
        expected: &'static str,
        found: String,
        source_name: String,
    },
    #[error(
        "variable `{name}` is {value} from {source_name}, which is not one of its allowed values: {allowed}"
    )]
    NotAllowed {
        name: String,
        value: String,
        allowed: String,
        source_name: String,
    },
    #[error("required variable `{0}` has no value")]
    MissingVariable(String),
    #[error("{source_name} sets variable `{name}`, which the recipe does not declare")]
    UndeclaredVariable { name: String, source_name: String },
    #[error("sensitive variable `{0}` has a default in the recipe")]
    SensitiveDefault(String),
    #[error("unknown template variable `{0}`")]
    UnknownTemplateVariable(String),
    #[error("template variable `{0}` has no value")]
    UnsetTemplateVariable(String),
    #[error("`{0}` is not known here")]
    UnavailableTemplateVariable(String),
    #[error("invalid template: {0}")]
    Template(String),
    #[error("{what} `{path}` does not exist")]
    MissingFile { what: &'static str, path: String },
    #[error("{what} `{path}` is outside the recipe's directory")]
    EscapesRoot { what: &'static str, path: String },
    #[error("failed to read {what} `{path}`")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read variable file `{path}`")]
    VarFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe `{0}` is part of a cycle of base recipes")]
    Cycle(String),
}

fn context_suffix(context: &str) -> String {
    if context.is_empty() {
        String::new()
    } else {
        format!(" in {context}")
    }
}

/// One recipe error with the place it was found and, where bake knows one, a fix.
#[derive(Debug, Error)]
#[error("{kind}")]
pub struct RecipeError {
    #[source]
    pub kind: Box<RecipeErrorKind>,
    pub span: Option<SourceSpan>,
    pub hint: Option<String>,
}

impl RecipeError {
    pub fn new(kind: RecipeErrorKind) -> Self {
        RecipeError {
            kind: Box::new(kind),
            span: None,
            hint: None,
        }
    }

    pub fn at(kind: RecipeErrorKind, span: SourceSpan) -> Self {
        RecipeError {
            kind: Box::new(kind),
            span: Some(span),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn maybe_hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }

    pub fn report(&self) -> Report {
        // The kind is this error's message; only the kind's own sources are causes.
        let mut report = Report::from_error(&*self.kind);
        report.span = self.span.clone();
        report.hint = self.hint.clone();
        report
    }
}

/// Every error found in one or more recipes, in the order they were found.
#[derive(Debug, Default, Error)]
#[error("{} error{} in recipe", .0.len(), if .0.len() == 1 { "" } else { "s" })]
pub struct RecipeErrors(pub Vec<RecipeError>);

impl RecipeErrors {
    pub fn push(&mut self, error: RecipeError) {
        self.0.push(error);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn extend(&mut self, other: RecipeErrors) {
        self.0.extend(other.0);
    }

    /// `Ok(value)` when nothing was collected.
    pub fn into_result<T>(self, value: T) -> Result<T, RecipeErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl From<RecipeError> for RecipeErrors {
    fn from(error: RecipeError) -> Self {
        RecipeErrors(vec![error])
    }
}
