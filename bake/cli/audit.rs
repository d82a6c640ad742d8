//! `bake audit VERSION|RECIPE|ROOTFS`: the compliance gate alone, with every rule's result.
//!
//! The data stream, profile, target, thresholds and exceptions come from the recipe (the one
//! given, the one a version was built from, or `--recipe` for a root directory), so the numbers
//! are the build gate's for the same root; `--datastream`, `--profile` and `--target` override
//! them, and are all a root without a recipe needs.
//!
//! A version built with `strategy: instance` has its root inside its AMI, never on this
//! machine: its gate ran on the builder, so `bake audit` shows the result recorded there
//! instead of scanning again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use super::{VarArgs, print_json, print_reports};
use crate::audit::{AuditDirs, AuditError, AuditRecord, Scan};
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::recipe::{Audit, AuditTarget, Recipe, Scanner};
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::store::{Artifact, BuildRecord, InstanceAmi, Store};

/// The profile `bake audit` scans with when neither a recipe nor `--profile` names one.
const DEFAULT_PROFILE: &str = "cis_level1_server";

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

pub fn run(args: &AuditArgs, settings: &Settings) -> ExitStatus {
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    let fail = |report: Report, status: ExitStatus| {
        print_reports(settings, &[report]);
        status
    };
    let is_root = Path::new(&args.what).is_dir();
    let record = if is_root {
        None
    } else {
        match super::common::find_record(&store, &args.what, &args.vars, settings) {
            Ok(record) => Some(record),
            Err(report) => return fail(*report, ExitStatus::RecipeOrUsage),
        }
    };
    if let Some(record) = &record
        && let Artifact::InstanceAmi { ami } = &record.artifact
    {
        return recorded(args, settings, record, ami);
    }
    // The recipe whose gate this is.
    let recipe_file: Option<PathBuf> = match (&args.recipe, &record) {
        (Some(file), _) => Some(file.clone()),
        (None, Some(_)) if Path::new(&args.what).is_file() => Some(PathBuf::from(&args.what)),
        (None, Some(record)) if !args.overrides_all() => Some(PathBuf::from(&record.recipe)),
        _ => None,
    };
    let recipe = match &recipe_file {
        Some(file) => match load_recipe(file, &args.vars) {
            Ok(recipe) => Some(recipe),
            Err(report) => return fail(report, ExitStatus::RecipeOrUsage),
        },
        None => None,
    };
    let audit = match gate_settings(args, recipe_file.as_deref(), recipe.as_ref()) {
        Ok(audit) => audit,
        Err(report) => return fail(report, ExitStatus::RecipeOrUsage),
    };

    // A version is unpacked into a scratch root, removed afterwards.
    let mut _unpacked = None;
    let root: PathBuf = match &record {
        None => PathBuf::from(&args.what),
        Some(record) => {
            let Some(image) = record.image() else {
                return fail(
                    Report::new(format!(
                        "version {} of `{}` has no OCI image to scan: it was built as an AMI",
                        record.version, record.name
                    ))
                    .with_hint(Some(
                        "its build record holds the gate's result (`bake manifest`)".into(),
                    )),
                    ExitStatus::RecipeOrUsage,
                );
            };
            match unpack(&store, &image.layers) {
                Ok(dir) => {
                    let root = dir.path().join("rootfs");
                    _unpacked = Some(dir);
                    root
                }
                Err(report) => return fail(report, ExitStatus::Infrastructure),
            }
        }
    };
    let dirs = AuditDirs {
        cache: store.root().join("cache").join("scap"),
        work: store.root().join("work"),
    };
    let (audit_record, scan) = match crate::audit::evaluate(&root, &audit, &dirs) {
        Ok(found) => found,
        Err(e) => {
            let status = match e {
                AuditError::NoProfile { .. } => ExitStatus::RecipeOrUsage,
                _ => ExitStatus::Infrastructure,
            };
            return fail(Report::from_error(&e).with_hint(e.hint()), status);
        }
    };
    if let Some(record) = &record
        && let Some(built) = &record.audit
        && built.datastream_digest != audit_record.datastream_digest
    {
        tracing::warn!(
            "version {} was gated with data stream {}; this scan used {} (`{}`)",
            record.version,
            built.datastream_digest,
            audit_record.datastream_digest,
            audit.datastream.display()
        );
    }
    print(settings, &root, &audit_record, &scan);
    if audit_record.problems.is_empty() {
        ExitStatus::Success
    } else {
        let error = AuditError::Gate(Box::new(audit_record));
        print_reports(
            settings,
            &[Report::from_error(&error).with_hint(error.hint())],
        );
        ExitStatus::RecipeOrUsage
    }
}

/// `bake audit` of an instance-built version: the gate's result as recorded on the builder.
fn recorded(
    args: &AuditArgs,
    settings: &Settings,
    record: &BuildRecord,
    ami: &InstanceAmi,
) -> ExitStatus {
    let image = ami
        .regions
        .first()
        .map_or_else(|| ami.image_name.clone(), |r| r.image_id.clone());
    let Some(gate) = &record.audit else {
        print_reports(
            settings,
            &[Report::new(format!(
                "version {} of `{}` was built on a builder instance without a compliance gate, and its root is in AMI {image}: bake cannot scan it here",
                record.version, record.name
            ))
            .with_hint(Some(
                "add `audit:` to the recipe and build a new version: the gate then runs on the builder".into(),
            ))],
        );
        return ExitStatus::RecipeOrUsage;
    };
    if settings.verbosity > Verbosity::Quiet {
        eprintln!(
            "version {} was built on a builder instance; its root is in AMI {image}, so this is the result its gate recorded on the builder (not a new scan)",
            record.version
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
    if gate.problems.is_empty() {
        ExitStatus::Success
    } else {
        let error = AuditError::Gate(Box::new(gate.clone()));
        print_reports(
            settings,
            &[Report::from_error(&error).with_hint(error.hint())],
        );
        ExitStatus::RecipeOrUsage
    }
}

impl AuditArgs {
    /// Whether the flags alone say everything the gate needs from a recipe.
    fn overrides_all(&self) -> bool {
        self.datastream.is_some() && self.profile.is_some() && self.target.is_some()
    }
}

fn load_recipe(file: &Path, vars: &VarArgs) -> Result<Recipe, Report> {
    if !file.is_file() {
        return Err(Report::new(format!(
            "the recipe `{}` is not a file",
            file.display()
        ))
        .with_hint(Some(
            "give the recipe with `--recipe FILE`, or the gate's settings with `--datastream`, `--profile` and `--target`".into(),
        )));
    }
    crate::recipe::load(file, &vars.sources()).map_err(|e| {
        e.0.first()
            .map(|e| e.report())
            .unwrap_or_else(|| Report::new(format!("invalid recipe `{}`", file.display())))
    })
}

/// The gate of `recipe` (when it has one) with the command line's overrides.
fn gate_settings(
    args: &AuditArgs,
    recipe_file: Option<&Path>,
    recipe: Option<&Recipe>,
) -> Result<Audit, Report> {
    let from_recipe = recipe.and_then(|r| r.audit.clone());
    let mut audit = match from_recipe {
        Some(audit) => audit,
        None => {
            let Some(datastream) = &args.datastream else {
                return Err(match recipe_file {
                    Some(file) => Report::new(format!(
                        "the recipe `{}` has no `audit:` section, so it names no data stream",
                        file.display()
                    )),
                    None => Report::new("no SCAP data stream to scan with"),
                }
                .with_hint(Some(
                    "give one with `--datastream FILE` (and `--profile`, `--target`), or add an `audit:` section to the recipe".into(),
                )));
            };
            Audit {
                scanner: Scanner::Openscap,
                datastream: datastream.clone(),
                datastream_path: datastream.display().to_string(),
                profile: full_profile(DEFAULT_PROFILE),
                target: AuditTarget::Machine,
                min_pass_ratio_centi: None,
                max_failures: None,
                exceptions: BTreeMap::new(),
                support_status: false,
            }
        }
    };
    if let Some(datastream) = &args.datastream {
        audit.datastream = datastream.clone();
        audit.datastream_path = datastream.display().to_string();
    }
    if let Some(profile) = args.profile.as_deref().map(full_profile)
        && profile != audit.profile
    {
        // The recipe's thresholds and exceptions are about its own profile.
        audit.min_pass_ratio_centi = None;
        audit.max_failures = None;
        audit.exceptions.clear();
        audit.profile = profile;
    }
    if let Some(target) = args.target {
        audit.target = match target {
            TargetArg::Machine => AuditTarget::Machine,
            TargetArg::Container => AuditTarget::Container,
        };
    }
    Ok(audit)
}

fn full_profile(profile: &str) -> String {
    if profile.starts_with("xccdf_") {
        profile.to_owned()
    } else {
        format!("xccdf_org.ssgproject.content_profile_{profile}")
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
