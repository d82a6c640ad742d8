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

use super::{print_json, print_reports};
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::provenance::keys::{KmsSigner, PublicKey, Signer as _};
use crate::provenance::layout::Layout;
use crate::provenance::store_public_keys;
use crate::provenance::verify::{self, VerifyError, VerifyReport};
use crate::registry::{Client, Reference};
use crate::settings::{OutputFormat, Settings};

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

/// Where the attestations are read from.
enum Source<'a> {
    Layout {
        dir: PathBuf,
        selector: Option<&'a str>,
    },
    Registry(Reference),
    Ami(&'a str),
}

fn parse_reference<'a>(reference: &'a str, store: &Path) -> Source<'a> {
    if let Some(rest) = reference.strip_prefix("oci:") {
        // `oci:DIR:TAG`, unless the whole of it is a directory (a path with a colon).
        if !Path::new(rest).is_dir()
            && let Some((dir, tag)) = rest.split_once(':')
        {
            return Source::Layout {
                dir: PathBuf::from(dir),
                selector: Some(tag),
            };
        }
        return Source::Layout {
            dir: PathBuf::from(rest),
            selector: None,
        };
    }
    if reference.starts_with("ami-") {
        return Source::Ami(reference);
    }
    // `registry/repository[:tag][@digest]`; store references have no `/`.
    if reference.contains('/')
        && let Ok(parsed) = reference.parse::<Reference>()
    {
        return Source::Registry(parsed);
    }
    Source::Layout {
        dir: store.to_path_buf(),
        selector: Some(reference),
    }
}

/// Fetches the attestations of an image in a registry and verifies them.
fn verify_registry(
    reference: &Reference,
    shown: &str,
    settings: &Settings,
    keys: &[PublicKey],
) -> Result<VerifyReport, (Report, ExitStatus)> {
    let infra = |report: Report| (report, ExitStatus::Infrastructure);
    let store =
        crate::store::Store::open(&settings.store).map_err(|e| infra(Report::from_error(&e)))?;
    let client = Client::new(
        settings.registry.client_options(),
        settings.registry.credentials(),
    )
    .map_err(|e| infra(Report::from_error(&e).with_hint(e.hint())))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| infra(Report::from_error(&e)))?;
    let (target, envelopes) = runtime
        .block_on(crate::provenance::registry::fetch(
            &client, &store, reference,
        ))
        .map_err(|e| infra(Report::from_error(&e).with_hint(e.hint())))?;
    let claimed = reference
        .tag()
        .filter(|_| reference.digest().is_none())
        .and_then(verify::version_claimed_by_tag);
    verify::verify_attestations(shown, &target, &envelopes, keys, claimed.as_deref())
        .map_err(|e| (unverified_report(&e), exit_status(&e)))
}

/// Verifies an AMI in the settings' region through its `bake:provenance` tag.
fn verify_ami(
    image_id: &str,
    settings: &Settings,
    keys: &[PublicKey],
) -> Result<VerifyReport, (Report, ExitStatus)> {
    use crate::provenance::ami::{self, AmiVerifyError};
    let store = crate::store::Store::open(&settings.store)
        .map_err(|e| (Report::from_error(&e), ExitStatus::Infrastructure))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (Report::from_error(&e), ExitStatus::Infrastructure))?;
    runtime.block_on(async {
        let aws = crate::aws::Aws::load(&settings.aws).await;
        let Some(region) = settings
            .aws
            .region
            .clone()
            .or_else(|| aws.default_region().map(str::to_owned))
        else {
            return Err((
                Report::new(format!("no region to look for AMI `{image_id}` in"))
                    .with_hint(Some("give --region".into())),
                ExitStatus::RecipeOrUsage,
            ));
        };
        ami::verify_ami(&aws, &store, &region, image_id, keys)
            .await
            .map_err(|e| match e {
                AmiVerifyError::Verify(v) => (unverified_report(&v), exit_status(&v)),
                AmiVerifyError::NoSuchAmi { .. } => {
                    (Report::from_error(&e), ExitStatus::RecipeOrUsage)
                }
                AmiVerifyError::EnvelopeMissing { .. }
                | AmiVerifyError::ParameterMismatch { .. } => {
                    (Report::from_error(&e), ExitStatus::Unverified)
                }
                _ => (Report::from_error(&e), ExitStatus::Infrastructure),
            })
    })
}

fn exit_status(error: &VerifyError) -> ExitStatus {
    match error {
        VerifyError::Layout(_) | VerifyError::NoTrustedKeys => ExitStatus::RecipeOrUsage,
        _ => ExitStatus::Unverified,
    }
}

fn unverified_report(error: &VerifyError) -> Report {
    let hint = match error {
        VerifyError::NoTrustedKeys | VerifyError::Layout(_) => None,
        _ => Some("do not deploy this artifact; rebuild and re-attest it, or check which key signed it with `bake manifest show`".to_owned()),
    };
    Report::from_error(error).with_hint(hint)
}

/// The store's images are selected by tag, version or digest; a version prefix or a
/// `name:short` form is resolved through the manifests.
fn store_selector(store: &Path, selector: &str) -> String {
    let Ok(store) = crate::store::Store::open(store) else {
        return selector.to_owned();
    };
    match crate::provenance::manifest::find(&store, selector) {
        Ok(m) => m.version,
        Err(_) => selector.to_owned(),
    }
}

fn trusted_keys(args: &VerifyArgs, settings: &Settings) -> Result<Vec<PublicKey>, Report> {
    let mut keys = Vec::new();
    for path in &args.keys {
        keys.push(PublicKey::read(path).map_err(|e| Report::from_error(&e))?);
    }
    if let Some(kms_key) = &args.kms_key {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime starts");
        let region = crate::usecase::attest::kms_region(
            kms_key,
            &crate::usecase::Context::new(settings.clone()),
        );
        let signer = runtime.block_on(async {
            let aws = crate::aws::Aws::load(&settings.aws).await;
            let region = region.or_else(|| aws.default_region().map(str::to_owned));
            let client = aws.kms(region.as_deref().unwrap_or("us-east-1"));
            KmsSigner::new(client, kms_key).await
        });
        keys.push(
            signer
                .map_err(|e| Report::from_error(&e))?
                .public_key()
                .clone(),
        );
    }
    if keys.is_empty() {
        keys = store_public_keys(&settings.store).map_err(|e| Report::from_error(&e))?;
    }
    Ok(keys)
}

/// The region of a KMS key ARN, else the settings' region.
pub fn run(args: &VerifyArgs, settings: &Settings) -> ExitStatus {
    if let (true, Some(channel)) = (args.published, &args.channel) {
        return run_published(args, channel, settings);
    }
    let keys = match trusted_keys(args, settings) {
        Ok(keys) => keys,
        Err(report) => {
            print_reports(settings, &[report]);
            return ExitStatus::RecipeOrUsage;
        }
    };
    let result = match parse_reference(&args.reference, &settings.store) {
        Source::Registry(reference) => {
            verify_registry(&reference, &args.reference, settings, &keys)
        }
        Source::Ami(image_id) => verify_ami(image_id, settings, &keys),
        Source::Layout { dir, selector } => {
            let selector = if dir == settings.store {
                selector.map(|s| store_selector(&dir, s))
            } else {
                selector.map(str::to_owned)
            };
            Layout::open(&dir)
                .map_err(VerifyError::from)
                .and_then(|layout| {
                    verify::verify_layout(&layout, &args.reference, selector.as_deref(), &keys)
                })
                .map_err(|e| (unverified_report(&e), exit_status(&e)))
        }
    };
    match result {
        Ok(report) => {
            match settings.output {
                OutputFormat::Json => print_json(&report),
                OutputFormat::Human => print_human(&report),
            }
            ExitStatus::Success
        }
        Err((report, status)) => {
            print_reports(settings, &[report]);
            status
        }
    }
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
fn run_published(args: &VerifyArgs, channel: &str, settings: &Settings) -> ExitStatus {
    use crate::publish::{PublishOptions, Publisher};
    let recipe =
        match super::common::load_or_report(Path::new(&args.reference), &args.vars, settings) {
            Ok(recipe) => recipe,
            Err(status) => return status,
        };
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    runtime.block_on(async {
        let aws = crate::aws::Aws::load(&settings.aws).await;
        let digests = match super::publish::digest_check(&aws, &recipe, settings) {
            Ok(digests) => digests,
            Err(status) => return status,
        };
        let publisher = Publisher {
            aws: &aws,
            digests: &digests,
            recipe: &recipe,
            options: PublishOptions::default(),
        };
        match crate::verify_published::verify(&publisher, channel).await {
            Ok(report) => {
                match settings.output {
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
                    ExitStatus::Success
                } else {
                    print_reports(
                        settings,
                        &[Report::new(format!(
                            "{differences} published surface(s) of channel `{channel}` differ from what was published"
                        ))],
                    );
                    ExitStatus::Unverified
                }
            }
            Err(e) => {
                print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
                if e.is_refusal() {
                    ExitStatus::RecipeOrUsage
                } else {
                    ExitStatus::Infrastructure
                }
            }
        }
    })
}
