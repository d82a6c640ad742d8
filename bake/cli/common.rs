//! What several commands share: the failure every command returns, loading and planning a recipe
//! with errors reported, finding a built version, the provenance options, and the build log on
//! stderr.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::VarArgs;
use crate::build::pipeline::BuildReporter;
use crate::build::runner::{StepOutput, Stream};
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::plan::PlanError;
use crate::provenance::sbom::SbomFormat;
use crate::recipe;
use crate::settings::Settings;
use crate::store::Store;
use crate::store::record::BuildRecord;
use crate::usecase::attest::SigningOptions;

/// A command that did not succeed: the reports to print and the exit status to end with.
#[derive(Debug)]
pub struct Failure {
    pub reports: Vec<Report>,
    pub status: ExitStatus,
}

impl Failure {
    pub fn new(status: ExitStatus, report: Report) -> Self {
        Failure {
            reports: vec![report],
            status,
        }
    }

    /// Success when nothing failed; else an infrastructure failure reporting each (what a
    /// cleanup that could not remove some resources ends with).
    pub fn unless_none(failures: Vec<Report>) -> Outcome {
        if failures.is_empty() {
            return Ok(ExitStatus::Success);
        }
        Err(Failure {
            reports: failures,
            status: ExitStatus::Infrastructure,
        })
    }

    /// A mistake in the recipe or the command line.
    pub fn usage(report: Report) -> Self {
        Failure::new(ExitStatus::RecipeOrUsage, report)
    }
}

impl<E: Diagnose> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure {
            reports: error.reports(),
            status: error.exit_status(),
        }
    }
}

/// What a command returns: its exit status when it ran to the end (which may still be a
/// partial publish or an `outdated` answer), or the failure that stopped it.
pub type Outcome = Result<ExitStatus, Failure>;

/// Reports for a plan error: one per recipe error, or one with the cause chain.
pub fn plan_reports(error: &PlanError) -> Vec<Report> {
    crate::diagnostic::Diagnose::reports(error)
}

/// Loads the recipe at `path` with the command line's variables; the failure reports every
/// error in it.
pub fn load_recipe(path: &Path, vars: &VarArgs) -> Result<crate::recipe::Recipe, Failure> {
    recipe::load(path, &vars.sources()).map_err(|errors| Failure {
        reports: plan_reports(&PlanError::from(errors)),
        status: ExitStatus::RecipeOrUsage,
    })
}

/// The build record named by a version, a version prefix, or a recipe file
/// ([`crate::usecase::record::find_record`], with its one report).
pub fn find_record(
    store: &Store,
    what: &str,
    vars: &VarArgs,
    settings: &Settings,
) -> Result<BuildRecord, Box<Report>> {
    let ctx = crate::usecase::Context::new(settings.clone());
    crate::usecase::record::find_record(&ctx, store, what, &vars.sources())
        .map_err(|error| Box::new(error.report()))
}

#[derive(Debug, Clone, Args)]
pub struct AttestArgs {
    /// Also write the version's manifest to FILE (for CI).
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Sign provenance with this private key (PKCS#8 PEM) instead of the store's default key.
    #[arg(
        long,
        value_name = "FILE",
        env = "BAKE_SIGNING_KEY",
        conflicts_with = "kms_key"
    )]
    pub signing_key: Option<PathBuf>,
    /// Sign provenance with this AWS KMS asymmetric key (ECC_NIST_P256; id, alias or ARN).
    #[arg(long, value_name = "KEY", env = "BAKE_KMS_KEY")]
    pub kms_key: Option<String>,
    /// SBOM formats to produce and attest (repeatable; default: the recipe's, else SPDX).
    #[arg(long = "sbom-format", value_enum)]
    pub sbom_formats: Vec<SbomFormat>,
    /// Build only: no SBOM, provenance or manifest.
    #[arg(long)]
    pub no_attest: bool,
}

impl AttestArgs {
    /// These options, with what the command line leaves unset taken from the recipe's
    /// `provenance:` section (a key given on the command line or in the environment wins over
    /// both of the recipe's).
    pub fn with_recipe(&self, recipe: &crate::recipe::ProvenanceSettings) -> AttestArgs {
        let mut args = self.clone();
        if args.signing_key.is_none() && args.kms_key.is_none() {
            args.signing_key = recipe.signing_key.clone();
            args.kms_key = recipe.kms_key.clone();
        }
        if args.sbom_formats.is_empty() {
            args.sbom_formats = recipe
                .sbom_formats
                .iter()
                .filter_map(|f| <SbomFormat as clap::ValueEnum>::from_str(f, false).ok())
                .collect();
        }
        args
    }
    /// The signing choices these options make.
    pub fn signing_options(&self) -> SigningOptions {
        SigningOptions {
            manifest_copy: self.manifest.clone(),
            signing_key: self.signing_key.clone(),
            kms_key: self.kms_key.clone(),
            sbom_formats: self.sbom_formats.clone(),
        }
    }
}

/// Shows build progress on stderr: one line per step, then its output prefixed by its name.
pub struct CliReporter {
    pub quiet: bool,
}

impl StepOutput for CliReporter {
    fn line(&mut self, step: &str, _stream: Stream, line: &str) {
        if !self.quiet {
            crate::progress::log_line(&format!("{step} | {line}"));
        }
    }
}

impl BuildReporter for CliReporter {
    fn step_started(&mut self, name: &str, cached: bool) {
        if !self.quiet {
            let note = if cached { " (cached)" } else { "" };
            crate::progress::log_line(&format!("==> {name}{note}"));
        }
    }

    fn step_finished(&mut self, name: &str, duration: Duration) {
        if !self.quiet {
            crate::progress::log_line(&format!(
                "==> {name}: done in {:.1}s",
                duration.as_secs_f64()
            ));
        }
    }

    fn message(&mut self, text: &str) {
        if !self.quiet {
            crate::progress::log_line(&format!("==> {text}"));
        }
    }
}

/// Parses a positive duration such as `15s` or `1m` (`--poll-interval`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}` is not a duration such as `15s` or `1m`"))
}

/// Prints a publish, promote or rollback report (`bake publish`, `promote`, `rollback`,
/// `plan --publish`) and returns its exit status.
pub fn show_publish_report(
    settings: &Settings,
    report: &crate::publish::PublishReport,
) -> ExitStatus {
    match settings.output {
        crate::settings::OutputFormat::Json => super::print_json(report),
        crate::settings::OutputFormat::Human => print!("{}", report.human()),
    }
    // Failures go to stderr as well, where a person or a log collector looks for them.
    eprint!("{}", report.errors_text());
    report.exit_status()
}
