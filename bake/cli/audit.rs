//! `bake audit VERSION|ROOTFS`: the compliance scan alone, with every rule's result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use super::{VarArgs, print_json, print_reports};
use crate::audit::{AuditDirs, Outcome, oscap};
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::recipe::AuditTarget;
use crate::settings::{OutputFormat, Settings};
use crate::store::Store;

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// A root filesystem directory, a version in the store, or a recipe file (its version).
    #[arg(value_name = "VERSION|ROOTFS")]
    pub what: String,
    /// The SCAP source data stream (`.xml` or `.xml.xz`).
    #[arg(long, value_name = "FILE")]
    pub datastream: PathBuf,
    /// The XCCDF profile, short (`cis_level1_server`) or full.
    #[arg(long, default_value = "cis_level1_server")]
    pub profile: String,
    /// What the root is: SCAP content skips machine-only rules for a container.
    #[arg(long, value_enum, default_value_t = TargetArg::Machine)]
    pub target: TargetArg,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TargetArg {
    Machine,
    Container,
}

pub fn run(args: &AuditArgs, settings: &Settings) -> ExitStatus {
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    // A version is unpacked into a scratch root, removed afterwards.
    let mut _unpacked = None;
    let root: PathBuf = if Path::new(&args.what).is_dir() {
        PathBuf::from(&args.what)
    } else {
        let record = match super::export::find_record(&store, &args.what, &args.vars, settings) {
            Ok(record) => record,
            Err(report) => {
                print_reports(settings, &[*report]);
                return ExitStatus::RecipeOrUsage;
            }
        };
        let Some(image) = record.image() else {
            print_reports(
                settings,
                &[Report::new(format!(
                    "version {} of `{}` has no OCI image to scan: it was built as an AMI",
                    record.version, record.name
                ))],
            );
            return ExitStatus::RecipeOrUsage;
        };
        match unpack(&store, &image.layers) {
            Ok(dir) => {
                let root = dir.path().join("rootfs");
                _unpacked = Some(dir);
                root
            }
            Err(report) => {
                print_reports(settings, &[report]);
                return ExitStatus::Infrastructure;
            }
        }
    };
    let profile = if args.profile.starts_with("xccdf_") {
        args.profile.clone()
    } else {
        format!("xccdf_org.ssgproject.content_profile_{}", args.profile)
    };
    let target = match args.target {
        TargetArg::Machine => AuditTarget::Machine,
        TargetArg::Container => AuditTarget::Container,
    };
    let dirs = AuditDirs {
        cache: store.root().join("cache").join("scap"),
        work: store.root().join("work"),
    };
    let scan = oscap::version().and_then(|version| {
        let datastream = oscap::Datastream::prepare(&args.datastream, &dirs.cache)?;
        let scan = oscap::scan(&root, &datastream, &profile, target, &dirs.work)?;
        Ok((version, datastream.digest, scan))
    });
    let (version, digest, scan) = match scan {
        Ok(found) => found,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
            return ExitStatus::Infrastructure;
        }
    };
    let passed = count(&scan.rules, Outcome::Pass);
    let failed = count(&scan.rules, Outcome::Fail);
    let score_centi = crate::audit::score_centi(passed, failed);
    match settings.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "root": root.display().to_string(),
            "scanner": "openscap",
            "scanner_version": version,
            "profile": profile,
            "datastream_digest": digest,
            "passed": passed,
            "failed": failed,
            "score_centi": score_centi,
            "rules": scan.rules,
        })),
        OutputFormat::Human => {
            let mut by_outcome: BTreeMap<&str, usize> = BTreeMap::new();
            for rule in &scan.rules {
                println!(
                    "{:<14} {:<8} {}",
                    rule.result.name(),
                    rule.severity,
                    rule.id
                );
                *by_outcome.entry(rule.result.name()).or_default() += 1;
            }
            println!(
                "{profile}: {:.2}% pass ({passed} pass, {failed} fail; {})",
                score_centi as f64 / 100.0,
                by_outcome
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    ExitStatus::Success
}

fn count(rules: &[crate::audit::RuleResult], outcome: Outcome) -> u32 {
    rules.iter().filter(|r| r.result == outcome).count() as u32
}

fn unpack(
    store: &Store,
    layers: &[crate::artifact::oci::LayerRef],
) -> Result<tempfile::TempDir, Report> {
    let dir = store
        .work_dir("audit")
        .map_err(|e| Report::from_error(&e))?;
    let root = dir.path().join("rootfs");
    fs_err::create_dir(&root).map_err(|e| Report::from_error(&e))?;
    for layer in layers {
        let blob = store
            .open_blob(&layer.digest)
            .map_err(|e| Report::from_error(&e))?;
        crate::build::unpack::unpack_layer(std::io::BufReader::new(blob), &root)
            .map_err(|e| Report::from_error(&e))?;
    }
    Ok(dir)
}
