//! `bake ami upload IMAGE`: upload a raw disk image into an EBS snapshot (journaled, removed
//! again on failure or Ctrl-C), and `bake ami publish RECIPE --disk-image IMAGE`: the snapshot
//! strategy's AWS half (upload, register, distribute) for a disk image built by `bake build`
//! or by hand. Both print ids on stdout (`--output json` for machines). The work is
//! [`crate::usecase::build_ami_disk`]'s.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::build_output::print_ami_record;
use super::common::{Outcome, load_recipe};
use super::{VarArgs, print_json};
use crate::exit::ExitStatus;
use crate::settings::OutputFormat;
use crate::usecase::Context;
use crate::usecase::build_ami_disk::{
    PublishDiskOptions, UploadOptions, publish_disk_image, upload_snapshot,
};

#[derive(Debug, Args)]
pub struct AmiArgs {
    #[command(subcommand)]
    pub command: AmiCommand,
}

#[derive(Debug, Subcommand)]
pub enum AmiCommand {
    /// Upload a raw disk image into a new EBS snapshot (EBS direct APIs).
    Upload(UploadArgs),
    /// Upload a recipe's disk image, register the AMI and distribute it to the recipe's regions.
    Publish(PublishArgs),
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    /// The raw disk image.
    #[arg(value_name = "IMAGE")]
    pub image: PathBuf,
    /// The snapshot's volume size in GiB (default: the image's size, rounded up).
    #[arg(long, value_name = "GIB")]
    pub volume_size: Option<u64>,
    /// The snapshot's description.
    #[arg(long, default_value = "uploaded by bake")]
    pub description: String,
    /// `PutSnapshotBlock` calls in flight.
    #[arg(long, default_value_t = crate::ami::upload::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// On failure, keep the snapshot (and its journal, for `bake cleanup`).
    #[arg(long)]
    pub keep_on_failure: bool,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The recipe file (its `outputs.ami` says where and how).
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The raw disk image to publish.
    #[arg(long, value_name = "IMAGE")]
    pub disk_image: PathBuf,
    /// On failure, keep what was made (and its journal, for `bake cleanup`).
    #[arg(long)]
    pub keep_on_failure: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub fn run(args: &AmiArgs, ctx: &Context) -> Outcome {
    match &args.command {
        AmiCommand::Upload(args) => upload(args, ctx),
        AmiCommand::Publish(args) => publish(args, ctx),
    }
}

fn upload(args: &UploadArgs, ctx: &Context) -> Outcome {
    let options = UploadOptions {
        image: args.image.clone(),
        volume_size: args.volume_size,
        description: args.description.clone(),
        concurrency: args.concurrency,
        keep_on_failure: args.keep_on_failure,
    };
    let uploaded = upload_snapshot(ctx, &options)?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&uploaded),
        OutputFormat::Human => println!("snapshot  {}", uploaded.snapshot_id),
    }
    Ok(ExitStatus::Success)
}

fn publish(args: &PublishArgs, ctx: &Context) -> Outcome {
    let shown = args.recipe.display().to_string();
    let recipe = load_recipe(&args.recipe, &args.vars)?;
    let options = PublishDiskOptions {
        disk_image: args.disk_image.clone(),
        keep_on_failure: args.keep_on_failure,
    };
    let record = publish_disk_image(ctx, &recipe, &shown, &options)?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&record),
        OutputFormat::Human => print_ami_record(&record),
    }
    Ok(ExitStatus::Success)
}
