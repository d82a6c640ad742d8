//! `bake publish`, `bake promote`, `bake rollback` and `bake pin`: put a version where
//! Auto Scaling Groups and Fargate services consume it, and move channels between versions.

use std::path::PathBuf;

use clap::Args;

use super::common::{Outcome, load_recipe, parse_duration, show_publish_report};
use super::{VarArgs, print_json};
use crate::exit::ExitStatus;
use crate::publish::PublishOptions;
use crate::settings::OutputFormat;
use crate::usecase::Context;
use crate::usecase::publish::{self, ChannelMove};

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The version's artifacts as JSON (`{recipe, version, amis: {region: ami}, images:
    /// [{repository, digest}]}`); without it they come from the version's build record.
    #[arg(long, value_name = "FILE")]
    pub inputs: Option<PathBuf>,
    /// Show each pointer's current and wanted value; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Make the new launch template versions the default.
    #[arg(long)]
    pub set_default: bool,
    /// Overwrite SSM parameters bake does not own.
    #[arg(long)]
    pub allow_clobber: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The version to promote (`sha256:…` or at least its first 12 hex digits).
    #[arg(id = "target_version", value_name = "VERSION")]
    pub target_version: String,
    /// The channel (one of the recipe's `publish.channels`).
    #[arg(long, value_name = "NAME")]
    pub channel: String,
    /// Show each pointer's current and wanted value; change nothing.
    #[arg(long, conflicts_with = "rollout")]
    pub dry_run: bool,
    /// Overwrite SSM parameters bake does not own.
    #[arg(long)]
    pub allow_clobber: bool,
    /// Also replace the machines behind the channel, as `bake rollout` does: instance refreshes
    /// and ECS deployments with the recipe's `publish.rollouts.<channel>`, waited for and rolled
    /// back on failure.
    #[arg(long)]
    pub rollout: bool,
    /// With `--rollout`: what Ctrl-C does (`cancel` or `leave`; see `bake rollout`).
    #[arg(long, value_enum, value_name = "CHOICE", requires = "rollout")]
    pub on_interrupt: Option<crate::rollout::OnInterrupt>,
    /// With `--rollout`: how often to ask AWS how each target is doing.
    #[arg(long, value_name = "DURATION", requires = "rollout",
          value_parser = parse_duration, default_value = "15s")]
    pub poll_interval: std::time::Duration,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The channel to move back to its previous version.
    #[arg(long, value_name = "NAME")]
    pub channel: String,
    /// Show each pointer's current and wanted value; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Overwrite SSM parameters bake does not own.
    #[arg(long)]
    pub allow_clobber: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The channel whose current references are printed.
    #[arg(long, value_name = "NAME")]
    pub channel: String,
    /// Only this region's references (images are printed regardless).
    #[arg(long = "in-region", value_name = "REGION")]
    pub in_region: Option<String>,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub fn run_publish(args: &PublishArgs, ctx: &Context) -> Outcome {
    let recipe = load_recipe(&args.recipe, &args.vars)?;
    let options = PublishOptions {
        dry_run: args.dry_run,
        set_default: args.set_default,
        allow_clobber: args.allow_clobber,
    };
    let shown = args.recipe.display().to_string();
    let report = publish::publish(ctx, &recipe, &shown, args.inputs.as_deref(), options)?;
    Ok(show_publish_report(&ctx.settings, &report))
}

/// `bake promote` without `--rollout` (with it, `bake rollout` runs instead).
pub fn run_promote(args: &PromoteArgs, ctx: &Context) -> Outcome {
    let movement = ChannelMove::Promote {
        version: &args.target_version,
        channel: &args.channel,
    };
    move_channel(
        &args.recipe,
        &args.vars,
        args.dry_run,
        args.allow_clobber,
        movement,
        ctx,
    )
}

pub fn run_rollback(args: &RollbackArgs, ctx: &Context) -> Outcome {
    let movement = ChannelMove::Rollback {
        channel: &args.channel,
    };
    move_channel(
        &args.recipe,
        &args.vars,
        args.dry_run,
        args.allow_clobber,
        movement,
        ctx,
    )
}

/// Loads the recipe and moves its channel's pointers (`promote` and `rollback`).
fn move_channel(
    recipe: &std::path::Path,
    vars: &VarArgs,
    dry_run: bool,
    allow_clobber: bool,
    movement: ChannelMove<'_>,
    ctx: &Context,
) -> Outcome {
    let recipe = load_recipe(recipe, vars)?;
    let report = publish::move_channel(ctx, &recipe, movement, dry_run, allow_clobber)?;
    Ok(show_publish_report(&ctx.settings, &report))
}

pub fn run_pin(args: &PinArgs, ctx: &Context) -> Outcome {
    let recipe = load_recipe(&args.recipe, &args.vars)?;
    let entry = publish::pin(ctx, &recipe, &args.channel, args.in_region.as_deref())?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&entry),
        OutputFormat::Human => {
            let r = &entry.references;
            println!("version  {}", r.version);
            println!("promoted {}", entry.promoted_at);
            for (region, ami) in &r.amis {
                println!("ami      {region}  {ami}");
            }
            for image in &r.images {
                println!("image    {image}");
            }
            for lt in &r.launch_templates {
                println!(
                    "template {}  {} ({}) version {}",
                    lt.region, lt.template_name, lt.template_id, lt.version
                );
            }
            for td in &r.task_definitions {
                println!("task     {}  {}", td.region, td.arn);
            }
        }
    }
    Ok(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::super::Cli::command().debug_assert();
    }
}
