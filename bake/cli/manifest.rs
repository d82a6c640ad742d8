//! `bake manifest show VERSION|REF`: print a version's manifest, found by version, image digest
//! (`sha256:…`, `repo@sha256:…`), AMI id, launch template version (`lt-…:N`) or ECS task
//! definition ARN.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::common::Outcome;
use super::print_json;
use crate::exit::ExitStatus;
use crate::provenance::manifest::{self, ManifestError, Publication};
use crate::settings::OutputFormat;
use crate::usecase::Context;

#[derive(Debug, Args)]
pub struct ManifestArgs {
    #[command(subcommand)]
    pub command: ManifestCommand,
}

#[derive(Debug, Subcommand)]
pub enum ManifestCommand {
    /// Print the manifest of the version that VERSION|REF names.
    Show(ShowArgs),
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A version (or prefix), `name:short-version`, an image digest or `repo@sha256:…`, an AMI
    /// id, `lt-…:VERSION` or an ECS task definition ARN.
    #[arg(value_name = "VERSION|REF")]
    pub query: String,
    /// Also write the manifest to this file.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
}

pub fn run(args: &ManifestArgs, ctx: &Context) -> Outcome {
    let ManifestCommand::Show(args) = &args.command;
    let settings = &ctx.settings;
    if !settings.store.join("oci-layout").is_file() {
        return Err(ManifestError::NotFound {
            store: settings.store.clone(),
            query: args.query.clone(),
        }
        .into());
    }
    let store = ctx.store()?;
    let found = manifest::find(store, &args.query)?;
    if let Some(path) = &args.manifest {
        manifest::write_copy(&found, path)?;
    }
    match settings.output {
        OutputFormat::Json => print_json(&found),
        OutputFormat::Human => {
            println!("name         {}", found.name);
            println!("version      {}", found.version);
            println!("recipe       {}", found.recipe);
            if let Some(oci) = &found.outputs.oci {
                println!("image        {}", oci.manifest_digest);
            }
            if let Some(remote) = &found.outputs.remote_image {
                println!("image        {} ({})", remote.reference, remote.image_arn);
            }
            for ami in &found.outputs.amis {
                println!("ami          {} ({})", ami.image_id, ami.region);
            }
            if let Some(attestations) = &found.attestations {
                println!(
                    "provenance   {} (signed by {})",
                    attestations.provenance.envelope_digest, attestations.signer.key_id
                );
                for sbom in &attestations.sboms {
                    println!("sbom         {} ({})", sbom.digest, sbom.format);
                }
            }
            for publication in &found.publications {
                let text = match publication {
                    Publication::Registry { reference, .. } => format!("registry {reference}"),
                    Publication::LaunchTemplate {
                        id,
                        version,
                        region,
                        ..
                    } => format!("launch template {id} version {version} ({region})"),
                    Publication::SsmParameter {
                        name,
                        version,
                        region,
                        ..
                    } => format!("SSM parameter {name} version {version} ({region})"),
                    Publication::EcsTaskDefinition { arn, .. } => format!("task definition {arn}"),
                    Publication::Channel {
                        channel,
                        action,
                        at,
                        ..
                    } => format!("channel {channel} ({action} at {at})"),
                    Publication::Attestation { reference, .. } => {
                        format!("attestation {reference}")
                    }
                    Publication::Rollout {
                        channel,
                        outcome,
                        targets,
                        at,
                        ..
                    } => format!(
                        "rollout to channel {channel}: {} ({} target(s), ended {at})",
                        serde_json::to_value(outcome)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        targets.len()
                    ),
                };
                println!("published    {text}");
            }
            for removal in &found.removals {
                let place = if removal.region.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", removal.region)
                };
                println!(
                    "removed      {} {}{place} at {}: {}",
                    removal.kind, removal.id, removal.at, removal.reason
                );
            }
        }
    }
    Ok(ExitStatus::Success)
}
