//! `bake export VERSION|RECIPE`: write a built image out of the store, as an OCI image layout
//! directory or a docker-archive tarball.

use std::path::PathBuf;

use clap::Args;

use super::{VarArgs, print_json, print_reports};
use crate::artifact::export;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::settings::Settings;
use crate::store::Store;

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

/// Exports of a recipe rather than of a built image.
#[derive(Debug, clap::Subcommand)]
pub enum ExportTo {
    /// Write a recipe's EC2 Image Builder resources: AWSTOE component documents and a JSON plan
    /// of the API calls that create them (for CloudFormation or Terraform).
    Imagebuilder(super::imagebuilder::ExportImageBuilderArgs),
}

pub fn run(args: &ExportArgs, settings: &Settings) -> ExitStatus {
    let what = match (&args.to, &args.what) {
        (Some(ExportTo::Imagebuilder(to)), _) => {
            return super::imagebuilder::run_export(to, settings);
        }
        (None, Some(what)) => what.as_str(),
        (None, None) => unreachable!("clap requires VERSION|RECIPE without a subcommand"),
    };
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let record = match super::common::find_record(&store, what, &args.vars, settings) {
        Ok(record) => record,
        Err(report) => {
            print_reports(settings, &[*report]);
            return ExitStatus::RecipeOrUsage;
        }
    };
    let short = record.version.short().to_owned();
    let tag = args
        .tag
        .clone()
        .unwrap_or_else(|| format!("bake/{}:{short}", record.name));
    let Some(image) = record.image() else {
        print_reports(
            settings,
            &[Report::new(format!(
                "version {} of `{}` has no OCI image: it was built as an AMI",
                record.version, record.name
            ))
            .with_hint(Some(
                "export writes images; give the recipe `outputs.oci` to build one".into(),
            ))],
        );
        return ExitStatus::RecipeOrUsage;
    };
    let digest_text = image.image_digest.to_string();
    let digest = &digest_text;
    let mut written = serde_json::Map::new();
    if let Some(dir) = &args.oci_layout {
        let ref_name = tag.rsplit(':').next().unwrap_or(&short).to_owned();
        if let Err(e) = export::to_oci_layout(&store, digest, dir, &ref_name) {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
        if args.attestations {
            use crate::provenance::layout::Layout;
            let copied = Layout::open(store.root())
                .and_then(|from| Layout::open(dir)?.copy_referrers_from(&from, digest));
            match copied {
                Ok(n) => {
                    written.insert("attestations".into(), n.into());
                }
                Err(e) => {
                    print_reports(settings, &[Report::from_error(&e)]);
                    return ExitStatus::Infrastructure;
                }
            }
        }
        written.insert("oci_layout".into(), dir.display().to_string().into());
    }
    if let Some(file) = &args.docker_archive {
        if let Err(e) = export::to_docker_archive(&store, digest, file, &tag) {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
        written.insert("docker_archive".into(), file.display().to_string().into());
    }
    match settings.output {
        crate::settings::OutputFormat::Json => print_json(&serde_json::json!({
            "version": record.version,
            "image_digest": digest,
            "tag": tag,
            "written": written,
        })),
        crate::settings::OutputFormat::Human => {
            for (kind, path) in &written {
                println!("{kind} {} ({digest})", path.as_str().unwrap_or_default());
            }
        }
    }
    ExitStatus::Success
}
