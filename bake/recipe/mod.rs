//! Recipes: parse the YAML ([`parse`]), check it into a [`Recipe`] that cannot be invalid
//! ([`validate`]), resolve its variables ([`vars`]) and render its templates ([`template`]).
//!
//! The one entry point is [`load`]: a path and the variable sources in, a validated recipe or
//! every error found out.

mod error;
pub mod model;
mod parse;
mod paths;
mod raw;
pub mod template;
mod validate;
pub mod vars;

use std::path::Path;

pub use error::{RecipeError, RecipeErrorKind, RecipeErrors};
pub use model::*;
pub use validate::{HARDENING_PROFILES, is_region};
pub use vars::VarSources;

use crate::diagnostic::SourceFile;

/// Reads, parses and validates the recipe at `path` with variable values from `sources`.
///
/// Relative paths inside the recipe resolve against the recipe's directory and may not leave it.
pub fn load(path: &Path, sources: &VarSources) -> Result<Recipe, RecipeErrors> {
    let text = fs_err::read_to_string(path).map_err(|e| {
        RecipeError::new(RecipeErrorKind::Read {
            path: path.to_path_buf(),
            source: e,
        })
    })?;
    let canonical = fs_err::canonicalize(path).map_err(|e| {
        RecipeError::new(RecipeErrorKind::Read {
            path: path.to_path_buf(),
            source: e,
        })
    })?;
    let root = canonical
        .parent()
        .expect("a file's canonical path has a parent")
        .to_path_buf();
    let file = SourceFile::new(path.display().to_string(), text);
    let raw = parse::parse_recipe(&file)?;
    let validator = validate::Validator::new(file, root, validate::display_dir(path), sources);
    let mut recipe = validator.validate(raw).map_err(RecipeErrors)?;
    recipe.path = canonical;
    Ok(recipe)
}
