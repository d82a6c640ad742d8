//! Provenance at the end of `bake build`: the options that choose the signing key and SBOM
//! formats, and the step that signs, attaches and writes the manifest.

use std::path::PathBuf;

use clap::Args;

use crate::diagnostic::Report;
use crate::provenance::keys::{self, KmsSigner, LocalKey, Signer};
use crate::provenance::manifest::{self, Manifest};
use crate::provenance::sbom::SbomFormat;
use crate::provenance::{self, AttestOptions};
use crate::settings::{Settings, Verbosity};
use crate::store::Store;

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
}

/// Signs and attaches the attestations of `version`, writes its manifest, and copies it to
/// `--manifest`.
pub fn attest(
    args: &AttestArgs,
    settings: &Settings,
    store: &Store,
    version: &str,
) -> Result<Manifest, Report> {
    let report = |e: &(dyn std::error::Error + 'static)| Report::from_error(e);
    let runtime = super::runtime().map_err(|e| report(&e))?;
    let options = AttestOptions {
        sbom_formats: if args.sbom_formats.is_empty() {
            vec![SbomFormat::Spdx]
        } else {
            args.sbom_formats.clone()
        },
        invocation_id: provenance::random_uuid().map_err(|e| report(&e))?,
    };
    let signer = signer(args, settings, store, &runtime)?;
    let manifest = runtime
        .block_on(provenance::attest(
            store,
            version,
            signer.as_ref(),
            &options,
        ))
        .map_err(|e| report(&e))?;
    if let Some(path) = &args.manifest {
        manifest::write_copy(&manifest, path).map_err(|e| report(&e))?;
    }
    Ok(manifest)
}

/// Signs the provenance of an AMI version (its disk image's digest, for every AMI of it), tags
/// each AMI with the envelope's digest, and writes the manifest (copied to `--manifest`).
pub fn attest_amis(
    args: &AttestArgs,
    settings: &Settings,
    store: &Store,
    version: &str,
    ssm_parameter: Option<&str>,
    runtime: &tokio::runtime::Runtime,
) -> Result<Manifest, Report> {
    let report = |e: &(dyn std::error::Error + 'static)| Report::from_error(e);
    let signer = signer(args, settings, store, runtime)?;
    let invocation = provenance::random_uuid().map_err(|e| report(&e))?;
    let manifest = runtime
        .block_on(async {
            let aws = crate::aws::Aws::load(&settings.aws).await;
            provenance::ami::attest_amis(
                &aws,
                store,
                version,
                signer.as_ref(),
                invocation,
                ssm_parameter,
            )
            .await
        })
        .map_err(|e| report(&e))?;
    if let Some(path) = &args.manifest {
        manifest::write_copy(&manifest, path).map_err(|e| report(&e))?;
    }
    Ok(manifest)
}

/// The signer the options choose: a KMS key, a key file, or the store's default key (made on
/// first use).
fn signer(
    args: &AttestArgs,
    settings: &Settings,
    store: &Store,
    runtime: &tokio::runtime::Runtime,
) -> Result<Box<dyn Signer>, Report> {
    let report = |e: &(dyn std::error::Error + 'static)| Report::from_error(e);
    let signer: Box<dyn Signer> = if let Some(kms_key) = &args.kms_key {
        let region = super::verify::kms_region(kms_key, settings);
        let signer = runtime.block_on(async {
            let aws = crate::aws::Aws::load(&settings.aws).await;
            let region = region.or_else(|| aws.default_region().map(str::to_owned));
            let Some(region) = region else {
                return Err(
                    Report::new(format!("no AWS region for KMS key `{kms_key}`"))
                        .with_hint(Some("give a key ARN, --region or AWS_REGION".into())),
                );
            };
            KmsSigner::new(aws.kms(&region), kms_key)
                .await
                .map_err(|e| Report::from_error(&e))
        })?;
        Box::new(signer)
    } else if let Some(path) = &args.signing_key {
        Box::new(LocalKey::read(path).map_err(|e| report(&e))?)
    } else {
        let (key, created) =
            provenance::store_key(store, keys::DEFAULT_KEY_NAME).map_err(|e| report(&e))?;
        if created && settings.verbosity > Verbosity::Quiet {
            eprintln!(
                "==> made the store's signing key {} (ecdsa-p256, {})",
                key.public_key().key_id(),
                keys::store_key_path(store.root(), keys::DEFAULT_KEY_NAME).display()
            );
        }
        Box::new(key)
    };
    Ok(signer)
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
        match super::export::find_record(&store, &args.what, &args.vars, settings) {
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
