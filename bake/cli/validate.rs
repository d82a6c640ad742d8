//! `bake validate [RECIPE…]`: check recipes and report every error at once.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

use super::common::{Failure, Outcome};
use super::{VarArgs, print_json, print_reports};
use crate::diagnostic::{JsonReport, Report};
use crate::exit::ExitStatus;
use crate::recipe;
use crate::settings::OutputFormat;
use crate::usecase::Context;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Recipe files or directories of recipes (default: `recipes/`).
    #[arg(value_name = "RECIPE")]
    pub recipes: Vec<PathBuf>,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Serialize)]
struct Output {
    valid: bool,
    recipes: Vec<RecipeResult>,
}

#[derive(Serialize)]
struct RecipeResult {
    path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    valid: bool,
    errors: Vec<JsonReport>,
}

pub fn run(args: &ValidateArgs, ctx: &Context) -> Outcome {
    let settings = &ctx.settings;
    let paths = expand(&args.recipes).map_err(Failure::usage)?;
    let sources = args.vars.sources();
    let mut results = Vec::new();
    let mut failed = 0;
    let mut error_count = 0;
    for path in &paths {
        let shown = path.display().to_string();
        match recipe::load(path, &sources) {
            Ok(recipe) => {
                if settings.output == OutputFormat::Human {
                    println!("ok {shown} ({})", recipe.name);
                }
                results.push(RecipeResult {
                    path: shown,
                    name: Some(recipe.name),
                    valid: true,
                    errors: Vec::new(),
                });
            }
            Err(errors) => {
                let reports: Vec<Report> = errors.0.iter().map(|e| e.report()).collect();
                print_reports(settings, &reports);
                failed += 1;
                error_count += reports.len();
                results.push(RecipeResult {
                    path: shown,
                    name: None,
                    valid: false,
                    errors: reports.iter().map(Report::to_json).collect(),
                });
            }
        }
    }
    if settings.output == OutputFormat::Json {
        print_json(&Output {
            valid: failed == 0,
            recipes: results,
        });
    }
    if failed == 0 {
        return Ok(ExitStatus::Success);
    }
    Err(Failure::usage(Report::new(format!(
        "{error_count} error{} in {failed} of {} recipe{}",
        if error_count == 1 { "" } else { "s" },
        paths.len(),
        if paths.len() == 1 { "" } else { "s" }
    ))))
}

/// Recipe files from the arguments: files as given, directories expanded to their `*.yaml`
/// and `*.yml` files (sorted), and `recipes/` when nothing is given.
fn expand(given: &[PathBuf]) -> Result<Vec<PathBuf>, Report> {
    let defaulted = given.is_empty();
    let given: Vec<PathBuf> = if defaulted {
        vec![PathBuf::from("recipes")]
    } else {
        given.to_vec()
    };
    let mut out = Vec::new();
    for path in &given {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = fs_err::read_dir(path)
                .map_err(|e| Report::from_error(&e))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| is_recipe_file(p))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Report::new(format!(
                    "no recipes (*.yaml, *.yml) in `{}`",
                    path.display()
                )));
            }
            out.extend(found);
        } else if defaulted {
            return Err(
                Report::new("no recipes given and no `recipes/` directory here").with_hint(Some(
                    "name recipe files: bake validate path/to/recipe.yaml".into(),
                )),
            );
        } else {
            out.push(path.clone());
        }
    }
    Ok(out)
}

fn is_recipe_file(path: &Path) -> bool {
    path.is_file()
        && matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        )
}
