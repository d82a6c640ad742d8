//! `bake verify REF`: check an artifact's signed provenance and SBOM attestations and print the
//! verified provenance summary.
//!
//! REF is an AMI id (in `--region`; found through its `bake:provenance` tag), an image in a registry (`registry/repository:tag` or `…@sha256:…`; attestations are
//! read through the referrers API or its `sha256-<hex>` tag fallback), an OCI layout (`oci:DIR`
//! or `oci:DIR:TAG`), or an image in the local store (its version, `name:short-version` or
//! manifest digest). Trusted keys: `--key PUBLIC.pem`
//! (repeatable), `--kms-key` (its public key from KMS), else every `keys/*.pub` of the store.
//!
//! `bake verify --published RECIPE --channel NAME` instead compares the live state of every
//! surface the channel's version was published to with what was published
//! ([`crate::verify_published`]).

use std::path::{Path, PathBuf};

use clap::Args;

use super::common::{Failure, Outcome, load_recipe};
use super::print_json;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::provenance::verify::VerifyReport;
use crate::settings::OutputFormat;
use crate::usecase::Context;
use crate::usecase::verify::{self, TrustedKeys};

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// `registry/repo:tag` or `…@sha256:…`, `oci:DIR[:TAG]`, or a version, `name:short-version`
    /// or image digest in the store.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// REF is a recipe: compare every surface its channel's version was published to (AMIs,
    /// launch permissions, launch template versions, SSM parameters, task definitions, the
    /// channel's groups and services) with AWS, and print every difference.
    #[arg(long, requires = "channel")]
    pub published: bool,
    /// The channel whose current version `--published` checks.
    #[arg(long, value_name = "NAME", requires = "published")]
    pub channel: Option<String>,
    #[command(flatten)]
    pub vars: super::VarArgs,
    /// A trusted public key (PEM); repeatable.
    #[arg(long = "key", value_name = "PUBLIC.pem")]
    pub keys: Vec<PathBuf>,
    /// Trust this AWS KMS key (id, alias or ARN); its public key is fetched with GetPublicKey.
    #[arg(long, value_name = "KEY")]
    pub kms_key: Option<String>,
}

pub fn run(args: &VerifyArgs, ctx: &Context) -> Outcome {
    if let (true, Some(channel)) = (args.published, &args.channel) {
        return run_published(args, channel, ctx);
    }
    let trusted = TrustedKeys {
        files: args.keys.clone(),
        kms_key: args.kms_key.clone(),
    };
    let report = verify::verify_artifact(ctx, &args.reference, &trusted)?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Human => print_human(&report),
    }
    Ok(ExitStatus::Success)
}

fn print_human(report: &VerifyReport) {
    let p = &report.provenance;
    println!("verified     {}", report.reference);
    println!("digest       {}", report.digest);
    if let Some(name) = &p.name {
        println!(
            "recipe       {name} ({})",
            p.recipe.as_deref().unwrap_or("?")
        );
    }
    if let Some(version) = &p.version {
        println!("version      {version}");
    }
    println!("builder      {}", p.builder_id);
    println!("build type   {}", p.build_type);
    if let (Some(start), Some(end)) = (&p.started_on, &p.finished_on) {
        println!("built        {start} .. {end}");
    }
    println!(
        "inputs       {} resolved dependencies",
        p.resolved_dependencies
    );
    for a in &report.attestations {
        match a.components {
            Some(n) => println!(
                "attestation  {} ({n} components) signed by {}",
                a.predicate_type, a.key_id
            ),
            None => println!("attestation  {} signed by {}", a.predicate_type, a.key_id),
        }
    }
}

/// `bake verify --published RECIPE --channel NAME`.
fn run_published(args: &VerifyArgs, channel: &str, ctx: &Context) -> Outcome {
    let recipe = load_recipe(Path::new(&args.reference), &args.vars)?;
    let report = verify::verify_published(ctx, &recipe, channel)?;
    match ctx.settings.output {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Human => {
            println!(
                "{} channel {}: version {}",
                report.recipe, report.channel, report.version
            );
            for check in &report.checks {
                match &check.found {
                    None => println!(
                        "ok       {} {} in {}: {}",
                        check.surface, check.resource, check.region, check.expected
                    ),
                    Some(found) => println!(
                        "DIFFERS  {} {} in {}: expected {}, found {found}",
                        check.surface, check.resource, check.region, check.expected
                    ),
                }
            }
            for skipped in &report.skipped {
                println!("skipped  {skipped}");
            }
        }
    }
    let differences = report.differences().count();
    if differences == 0 {
        return Ok(ExitStatus::Success);
    }
    Err(Failure::new(
        ExitStatus::Unverified,
        Report::new(format!(
            "{differences} published surface(s) of channel `{channel}` differ from what was published"
        )),
    ))
}
