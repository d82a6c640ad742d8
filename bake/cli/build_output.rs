//! How `bake build`'s results print: an image, a snapshot-strategy AMI, an instance-strategy
//! AMI, an Image Builder build, and a fleet build's summary (human lines or `--output json`).

use serde::Serialize;

use super::print_json;
use crate::ami::AmiRecord;
use crate::ami::boot::BootReport;
use crate::ami::instance::AmiBuildOutput as InstanceAmi;
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::usecase::build_ami_disk::DiskAmiBuilt;
use crate::usecase::build_image::ImageBuilt;
use crate::usecase::fleet::{FleetBuilt, short_version};

/// Prints a built image: its version and digest, its attestations, where it was fetched from.
pub fn print_image(built: &ImageBuilt, settings: &Settings) {
    let output = &built.output;
    match settings.output {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(output).expect("outputs serialize");
            if let Some(reference) = &built.fetched_from {
                value["fetched_from"] = serde_json::json!(reference);
            }
            if let Some(a) = &built.attestations {
                value["provenance"] = serde_json::json!(a.provenance.envelope_digest);
                value["sboms"] =
                    serde_json::json!(a.sboms.iter().map(|s| &s.digest).collect::<Vec<_>>());
                value["signed_by"] = serde_json::json!(a.signer.key_id);
            }
            print_json(&value)
        }
        OutputFormat::Human => {
            println!("version  {}", output.version);
            println!("image    {}", output.image_digest);
            if let Some(a) = &built.attestations {
                println!("provenance {}", a.provenance.envelope_digest);
                for sbom in &a.sboms {
                    println!("sbom     {} ({})", sbom.digest, sbom.format);
                }
            }
            if let Some(reference) = &built.fetched_from {
                println!("fetched  {reference}");
            }
            if output.cached && settings.verbosity > Verbosity::Quiet {
                eprintln!("(already built: nothing ran)");
            }
        }
    }
}

/// What `bake build` prints for a snapshot-strategy AMI.
#[derive(Debug, Serialize)]
struct AmiBuildOutput<'a> {
    name: &'a str,
    version: &'a str,
    /// The OCI image the same build made, for a recipe with `outputs.oci` too.
    #[serde(skip_serializing_if = "Option::is_none")]
    image_digest: Option<&'a crate::id::Digest>,
    #[serde(flatten)]
    ami: &'a AmiRecord,
    /// The version's AMI existed already: no disk image was made, nothing was uploaded.
    cached: bool,
    /// The digest of the AMIs' signed provenance (none with `--no-attest`).
    #[serde(skip_serializing_if = "Option::is_none")]
    provenance: Option<&'a str>,
    /// The boot tests the disk image passed (the first run's, on a rebuild).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    boots: &'a [BootReport],
}

/// Prints a snapshot-strategy build: the version, its image, its AMIs, provenance and boots.
pub fn print_disk_ami(built: &DiskAmiBuilt, settings: &Settings) {
    let record = &built.record;
    let boots = record.disk_ami().map_or(&[][..], |a| a.boots.as_slice());
    match settings.output {
        OutputFormat::Json => print_json(&AmiBuildOutput {
            name: &record.name,
            version: &record.version,
            image_digest: record.image().map(|i| &i.image_digest),
            ami: &built.ami,
            cached: built.cached,
            provenance: built.provenance.as_deref(),
            boots,
        }),
        OutputFormat::Human => {
            println!("version  {}", record.version);
            if let Some(image) = record.image() {
                println!("image    {}", image.image_digest);
            }
            print_ami_record(&built.ami);
            if let Some(digest) = &built.provenance {
                println!("provenance {digest}");
            }
            for boot in boots {
                println!(
                    "booted   to `{}` in {:.1} s ({})",
                    boot.marker,
                    boot.duration_ms as f64 / 1000.0,
                    boot.accelerator
                );
            }
            if built.cached && settings.verbosity > Verbosity::Quiet {
                eprintln!("(already built: the AMI of this version exists)");
            }
        }
    }
}

/// Prints an instance-strategy build: the version, its AMI, name and source.
pub fn print_instance_ami(output: &InstanceAmi, settings: &Settings) {
    match settings.output {
        OutputFormat::Json => print_json(output),
        OutputFormat::Human => {
            println!("version  {}", output.version);
            println!("ami      {} ({})", output.image_id, output.region);
            println!("name     {}", output.image_name);
            println!("source   {}", output.source_ami);
            if output.cached && settings.verbosity > Verbosity::Quiet {
                eprintln!("(already built: nothing ran)");
            }
        }
    }
}

/// Prints what an Image Builder build or import recorded.
pub fn print_imagebuilder_output(
    output: &crate::imagebuilder::ImageBuilderOutput,
    settings: &Settings,
) {
    match settings.output {
        OutputFormat::Json => print_json(output),
        OutputFormat::Human => {
            println!("version  {}", output.version);
            println!("image    {}", output.image_arn);
            for region in &output.regions {
                println!("ami      {} ({})", region.image_id, region.region);
            }
            if let Some(reference) = &output.image_reference {
                println!("oci      {reference}");
            }
            println!("source   {}", output.source_ami);
        }
    }
}

/// Prints `bake build --all`'s summary: a table (or JSON) of every recipe and what happened.
pub fn print_fleet_built(built: &FleetBuilt, settings: &Settings) {
    match settings.output {
        OutputFormat::Json => print_json(built),
        OutputFormat::Human => {
            let lines = &built.recipes;
            let width = lines
                .iter()
                .map(|l| l.recipe.len())
                .max()
                .unwrap_or(6)
                .max(6);
            println!(
                "{:width$}  {:12}  {:11}  {:>8}",
                "RECIPE", "VERSION", "RESULT", "TIME"
            );
            for line in lines {
                let version = line.version.as_deref().map_or("-", short_version);
                let time = line.seconds.map_or("-".to_owned(), |s| format!("{s:.1}s"));
                let why = match (&line.error, &line.failed_base) {
                    (Some(error), _) => format!("  {error}"),
                    (None, Some(base)) => format!("  (base {base} failed)"),
                    _ => String::new(),
                };
                println!(
                    "{:width$}  {version:12}  {:11}  {time:>8}{why}",
                    line.recipe, line.result
                );
            }
            println!(
                "{} built, {} cached, {} failed, {} skipped",
                built.built,
                built.cached,
                built.failed,
                built.skipped + built.not_started,
            );
        }
    }
}

/// Prints an AMI record for people: the disk image digest, then one line per region.
pub fn print_ami_record(record: &AmiRecord) {
    if let Some(digest) = &record.disk_image_digest {
        println!("disk     {digest}");
    }
    for region in &record.regions {
        println!(
            "ami      {}  {}  {}",
            region.region, region.image_id, region.snapshot_id
        );
    }
}
