//! `bake import imagebuilder IMAGE_ARN --recipe RECIPE` and `bake export imagebuilder RECIPE
//! DIR`: arguments in, [`crate::usecase::imagebuilder`] does the work, results out.

use std::path::PathBuf;

use clap::Args;

use super::build_output::print_imagebuilder_output;
use super::common::{CliReporter, Outcome, load_recipe};
use super::{VarArgs, print_json};
use crate::exit::ExitStatus;
use crate::settings::{OutputFormat, Verbosity};
use crate::usecase::Context;
use crate::usecase::imagebuilder::{export_imagebuilder, import_imagebuilder};

/// `bake export imagebuilder RECIPE DIR`.
#[derive(Debug, Args)]
pub struct ExportImageBuilderArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The directory to write the component documents and `plan.json` into.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Also define an image pipeline that runs on this schedule (`cron(…)` or `rate(…)`).
    #[arg(long, value_name = "EXPRESSION")]
    pub schedule: Option<String>,
    #[command(flatten)]
    pub vars: VarArgs,
}

/// `bake import …`: where the image comes from.
#[derive(Debug, clap::Subcommand)]
pub enum ImportFrom {
    /// An EC2 Image Builder image (`arn:aws:imagebuilder:REGION:ACCOUNT:image/…/…/N`), made
    /// from the resources `bake export imagebuilder` wrote for the recipe.
    Imagebuilder(ImportImageBuilderArgs),
}

/// `bake import imagebuilder IMAGE_ARN --recipe RECIPE`.
#[derive(Debug, Args)]
pub struct ImportImageBuilderArgs {
    /// The Image Builder image (build version) ARN.
    #[arg(value_name = "IMAGE_ARN")]
    pub image_arn: String,
    /// The recipe the image was exported from.
    #[arg(long, value_name = "FILE")]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub vars: VarArgs,
}

/// `bake import imagebuilder IMAGE_ARN --recipe RECIPE`: records the image as the recipe's
/// version it was built as.
pub fn run_import(args: &ImportImageBuilderArgs, ctx: &Context) -> Outcome {
    let recipe = load_recipe(&args.recipe, &args.vars)?;
    let shown = args.recipe.display().to_string();
    let mut reporter = CliReporter {
        quiet: ctx.settings.verbosity == Verbosity::Quiet,
    };
    let output = import_imagebuilder(ctx, &recipe, &shown, &args.image_arn, &mut reporter)?;
    print_imagebuilder_output(&output, &ctx.settings);
    Ok(ExitStatus::Success)
}

/// `bake export imagebuilder RECIPE DIR`: writes the compiled documents and `plan.json`.
pub fn export(args: &ExportImageBuilderArgs, ctx: &Context) -> Outcome {
    let shown = args.recipe.display().to_string();
    let recipe = load_recipe(&args.recipe, &args.vars)?;
    let exported = export_imagebuilder(ctx, &recipe, &shown, &args.dir, args.schedule.clone())?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&exported),
        OutputFormat::Human => {
            for path in &exported.written {
                println!("{}", path.display());
            }
            for note in &exported.not_compiled {
                eprintln!("warning: not compiled: {note}");
            }
        }
    }
    Ok(ExitStatus::Success)
}
