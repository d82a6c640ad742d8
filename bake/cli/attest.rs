//! Provenance at the end of `bake build`: the options that choose the signing key and SBOM
//! formats, and the step that signs, attaches and writes the manifest.

use super::common::AttestArgs;
use crate::diagnostic::{Diagnose, Report};
use crate::provenance::manifest::{self, Manifest};
use crate::settings::Settings;
use crate::store::Store;
use crate::usecase::{self, Context};

/// Signs and attaches the attestations of `version`, writes its manifest, and copies it to
/// `--manifest`.
pub fn attest(
    args: &AttestArgs,
    settings: &Settings,
    store: &Store,
    version: &str,
) -> Result<Manifest, Report> {
    let ctx = Context::new(settings.clone());
    usecase::attest::attest_image(&ctx, store, version, &args.signing_options())
        .map_err(|e| first_report(&e))
}

/// Signs the provenance of an AMI version and writes the manifest (copied to `--manifest`).
pub fn attest_amis(
    args: &AttestArgs,
    settings: &Settings,
    store: &Store,
    version: &str,
    ssm_parameter: Option<&str>,
    runtime: &tokio::runtime::Runtime,
) -> Result<Manifest, Report> {
    let ctx = Context::new(settings.clone());
    runtime
        .block_on(usecase::attest::attest_amis(
            &ctx,
            store,
            version,
            &args.signing_options(),
            ssm_parameter,
        ))
        .map_err(|e| first_report(&e))
}

fn first_report(error: &usecase::attest::AttestError) -> Report {
    error.reports().remove(0)
}

/// `bake attest VERSION|REF`: sign (again) the provenance of a built version: its image's
/// attestations, or, for a version whose record lists AMIs, the AMIs' provenance (each AMI tagged
/// with the envelope's digest, the envelope kept in the store and optionally in SSM).
#[derive(Debug, clap::Args)]
pub struct AttestCommandArgs {
    /// A recipe file (its current version), a version (or prefix), `name:short-version`, an
    /// image digest or an AMI id.
    #[arg(value_name = "RECIPE|VERSION|REF")]
    pub what: String,
    #[command(flatten)]
    pub vars: super::VarArgs,
    /// Also keep an AMI's provenance envelope in this SSM parameter (in each AMI's region).
    #[arg(long, value_name = "NAME")]
    pub ssm_parameter: Option<String>,
    #[command(flatten)]
    pub attest: AttestArgs,
}

pub fn run(args: &AttestCommandArgs, settings: &Settings) -> crate::exit::ExitStatus {
    use crate::exit::ExitStatus;
    let fail = |report: Report, status: ExitStatus| {
        super::print_reports(settings, &[report]);
        status
    };
    let store = match Store::open(&settings.store) {
        Ok(store) => store,
        Err(e) => return fail(Report::from_error(&e), ExitStatus::Infrastructure),
    };
    // The version: a recipe's current one, from a manifest, from a record, else the argument.
    let version = if std::path::Path::new(&args.what).is_file() {
        match super::common::find_record(&store, &args.what, &args.vars, settings) {
            Ok(record) => record.version.to_string(),
            Err(report) => return fail(*report, ExitStatus::RecipeOrUsage),
        }
    } else {
        match manifest::find(&store, &args.what) {
            Ok(found) => found.version,
            Err(_) if args.what.parse::<crate::id::Version>().is_ok() => args.what.clone(),
            Err(e) => {
                return fail(
                    Report::from_error(&e).with_hint(e.hint()),
                    ExitStatus::RecipeOrUsage,
                );
            }
        }
    };
    let record = match store.record(&version) {
        Ok(Some(record)) => record,
        Ok(None) => {
            return fail(
                Report::new(format!("version {version} has no record in the store")),
                ExitStatus::RecipeOrUsage,
            );
        }
        Err(e) => return fail(Report::from_error(&e), ExitStatus::Infrastructure),
    };
    // AMIs are attested as AMIs (tagged, kept in SSM); an image-only version by its image.
    let manifest = if !record.amis().is_empty() {
        let runtime = match super::runtime() {
            Ok(runtime) => runtime,
            Err(e) => return fail(Report::from_error(&e), ExitStatus::Infrastructure),
        };
        match attest_amis(
            &args.attest,
            settings,
            &store,
            &version,
            args.ssm_parameter.as_deref(),
            &runtime,
        ) {
            Ok(manifest) => manifest,
            Err(report) => return fail(report, ExitStatus::Infrastructure),
        }
    } else {
        match attest(&args.attest, settings, &store, &version) {
            Ok(manifest) => manifest,
            Err(report) => return fail(report, ExitStatus::Infrastructure),
        }
    };
    match settings.output {
        crate::settings::OutputFormat::Json => super::print_json(&manifest),
        crate::settings::OutputFormat::Human => {
            println!("version    {}", manifest.version);
            if let Some(a) = &manifest.attestations {
                println!("provenance {}", a.provenance.envelope_digest);
                println!("signed by  {} ({})", a.signer.key_id, a.signer.reference);
            }
            for ami in &manifest.outputs.amis {
                println!("ami        {} ({})", ami.image_id, ami.region);
            }
        }
    }
    ExitStatus::Success
}
