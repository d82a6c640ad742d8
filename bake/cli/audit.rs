//! `bake audit VERSION|RECIPE|ROOTFS`: the compliance gate alone, with every rule's result
//! ([`crate::usecase::audit`] scans; this file renders).
//!
//! The data stream, profile, target, thresholds and exceptions come from the recipe (the one
//! given, the one a version was built from, or `--recipe` for a root directory), so the numbers
//! are the build gate's for the same root; `--datastream`, `--profile` and `--target` override
//! them, and are all a root without a recipe needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use super::common::{Failure, Outcome, find_record};
use super::{VarArgs, print_json};
use crate::audit::{AuditRecord, Scan};
use crate::exit::ExitStatus;
use crate::recipe::AuditTarget;
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::usecase::Context;
use crate::usecase::audit::{AuditOptions, Audited, audit};

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// A version in the store, a recipe file (its version), or a root filesystem directory.
    #[arg(value_name = "VERSION|RECIPE|ROOTFS")]
    pub what: String,
    /// Take the gate's settings from this recipe (default: the recipe given, or the one the
    /// version was built from).
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// The SCAP source data stream (`.xml` or `.xml.xz`), instead of the recipe's.
    #[arg(long, value_name = "FILE")]
    pub datastream: Option<PathBuf>,
    /// The XCCDF profile, short (`cis_level1_server`) or full, instead of the recipe's.
    #[arg(long)]
    pub profile: Option<String>,
    /// What the root is, instead of the recipe's: SCAP content skips machine-only rules for a
    /// container.
    #[arg(long, value_enum)]
    pub target: Option<TargetArg>,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TargetArg {
    Machine,
    Container,
}

pub fn run(args: &AuditArgs, ctx: &Context) -> Outcome {
    let settings = &ctx.settings;
    let record = if Path::new(&args.what).is_dir() {
        None
    } else {
        let store = ctx.store()?;
        Some(find_record(store, &args.what, &args.vars, settings).map_err(|r| Failure::usage(*r))?)
    };
    let options = AuditOptions {
        what: args.what.clone(),
        record,
        recipe: args.recipe.clone(),
        vars: args.vars.sources(),
        datastream: args.datastream.clone(),
        profile: args.profile.clone(),
        target: args.target.map(|target| match target {
            TargetArg::Machine => AuditTarget::Machine,
            TargetArg::Container => AuditTarget::Container,
        }),
    };
    let audited = audit(ctx, &options)?;
    match &audited {
        Audited::Scanned { root, record, scan } => print(settings, root, record, scan),
        Audited::Recorded {
            version,
            image,
            gate,
        } => recorded(args, settings, version, image, gate),
    }
    match audited.gate_failure() {
        Some(failed) => Err(failed.into()),
        None => Ok(ExitStatus::Success),
    }
}

/// `bake audit` of an instance-built version: the gate's result as recorded on the builder.
fn recorded(args: &AuditArgs, settings: &Settings, version: &str, image: &str, gate: &AuditRecord) {
    if settings.verbosity > Verbosity::Quiet {
        eprintln!(
            "version {version} was built on a builder instance; its root is in AMI {image}, so this is the result its gate recorded on the builder (not a new scan)"
        );
        if args.datastream.is_some() || args.profile.is_some() || args.target.is_some() {
            eprintln!(
                "--datastream, --profile and --target do not apply: nothing is scanned again"
            );
        }
    }
    match settings.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "recorded": true,
            "image_id": image,
            "scanner": gate.scanner,
            "scanner_version": gate.scanner_version,
            "profile": gate.profile,
            "datastream_digest": gate.datastream_digest,
            "target": gate.target,
            "passed": gate.passed,
            "failed": gate.failed,
            "score_centi": gate.score_centi,
            "gate": gate,
        })),
        OutputFormat::Human => {
            for rule in &gate.failing {
                println!("{:<14} {:<8} {}", "fail", rule.severity, rule.id);
            }
            for rule in &gate.excepted {
                println!(
                    "{:<14} {:<8} {} ({})",
                    "fail", "excepted", rule.id, rule.reason
                );
            }
            for rule in &gate.undecided {
                println!(
                    "{:<14} {:<8} {}",
                    rule.result.name(),
                    rule.severity,
                    rule.id
                );
            }
            for rule in &gate.not_applicable {
                println!(
                    "{:<14} {:<8} {} ({})",
                    "notapplicable", "", rule.id, rule.reason
                );
            }
            println!(
                "{}: {:.2}% pass ({} pass, {} fail, {} excepted; recorded on the builder)",
                gate.profile,
                gate.score_centi as f64 / 100.0,
                gate.passed,
                gate.failed,
                gate.excepted.len(),
            );
        }
    }
}

fn print(settings: &Settings, root: &Path, record: &AuditRecord, scan: &Scan) {
    match settings.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "root": root.display().to_string(),
            "scanner": record.scanner,
            "scanner_version": record.scanner_version,
            "profile": record.profile,
            "datastream_digest": record.datastream_digest,
            "target": record.target,
            "passed": record.passed,
            "failed": record.failed,
            "score_centi": record.score_centi,
            "gate": record,
            "rules": scan.rules,
        })),
        OutputFormat::Human => {
            let mut by_outcome: BTreeMap<&str, usize> = BTreeMap::new();
            for rule in &scan.rules {
                match &rule.reason {
                    Some(reason) => println!(
                        "{:<14} {:<8} {} ({reason})",
                        rule.result.name(),
                        rule.severity,
                        rule.id
                    ),
                    None => println!(
                        "{:<14} {:<8} {}",
                        rule.result.name(),
                        rule.severity,
                        rule.id
                    ),
                }
                *by_outcome.entry(rule.result.name()).or_default() += 1;
            }
            println!(
                "{}: {:.2}% pass ({} pass, {} fail, {} excepted; {})",
                record.profile,
                record.score_centi as f64 / 100.0,
                record.passed,
                record.failed,
                record.excepted.len(),
                by_outcome
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
}
