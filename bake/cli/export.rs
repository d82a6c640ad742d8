//! `bake export VERSION|RECIPE`: write a built image out of the store, as an OCI image layout
//! directory or a docker-archive tarball.

use std::path::PathBuf;

use clap::Args;

use super::common::Outcome;
use super::{ExportTo, VarArgs, print_json};
use crate::exit::ExitStatus;
use crate::settings::OutputFormat;
use crate::usecase::Context;
use crate::usecase::export::{self, ExportOptions};

#[derive(Debug, Args)]
#[command(
    group(clap::ArgGroup::new("target").required(true).multiple(true)),
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct ExportArgs {
    #[command(subcommand)]
    pub to: Option<ExportTo>,
    /// A version (`sha256:…`, or its first 12 or more hex digits) or a recipe file.
    #[arg(value_name = "VERSION|RECIPE", required = true)]
    pub what: Option<String>,
    /// Write an OCI image layout into this directory.
    #[arg(long, value_name = "DIR", group = "target")]
    pub oci_layout: Option<PathBuf>,
    /// Write a docker-archive tarball (`docker load` reads it).
    #[arg(long, value_name = "FILE", group = "target")]
    pub docker_archive: Option<PathBuf>,
    /// Also copy the image's signed attestations into the OCI layout, as referrers (for
    /// `bake verify oci:DIR:TAG`; the layout then lists them next to the image).
    #[arg(long, requires = "oci_layout")]
    pub attestations: bool,
    /// The tag to give the image (default: the recipe name and short version).
    #[arg(long, value_name = "NAME:TAG")]
    pub tag: Option<String>,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub fn run(args: &ExportArgs, ctx: &Context) -> Outcome {
    let Some(what) = &args.what else {
        unreachable!("clap requires VERSION|RECIPE without a subcommand (cli::run dispatches it)")
    };
    let options = ExportOptions {
        oci_layout: args.oci_layout.clone(),
        docker_archive: args.docker_archive.clone(),
        attestations: args.attestations,
        tag: args.tag.clone(),
    };
    let exported = export::export(ctx, what, &args.vars.sources(), &options)?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&exported),
        OutputFormat::Human => {
            for (kind, path) in &exported.written {
                println!(
                    "{kind} {} ({})",
                    path.as_str().unwrap_or_default(),
                    exported.image_digest
                );
            }
        }
    }
    Ok(ExitStatus::Success)
}
