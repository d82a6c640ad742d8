//! Provenance at the end of a build: choose the signer, sign and attach the attestations of a
//! version's image or AMIs, write its manifest (and a copy where CI wants it).

use std::path::PathBuf;

use super::{Context, ContextError};
use crate::diagnostic::Diagnose;
use crate::provenance::ami::AmiProvenanceError;
use crate::provenance::keys::{self, KeyError, KmsSigner, LocalKey, Signer};
use crate::provenance::manifest::{self, Manifest, ManifestError};
use crate::provenance::sbom::SbomFormat;
use crate::provenance::{self, AttestOptions, ProvenanceError};
use crate::settings::Verbosity;
use crate::store::Store;

/// How a version's provenance is signed and what comes with it.
#[derive(Debug, Clone, Default)]
pub struct SigningOptions {
    /// Also write the version's manifest here (for CI).
    pub manifest_copy: Option<PathBuf>,
    /// A private key file (PKCS#8 PEM); else `kms_key`; else the store's default key.
    pub signing_key: Option<PathBuf>,
    /// An AWS KMS asymmetric key (id, alias or ARN).
    pub kms_key: Option<String>,
    /// SBOM formats to produce and attest (none: SPDX).
    pub sbom_formats: Vec<SbomFormat>,
}

/// Why a version could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("no AWS region for KMS key `{0}`")]
    NoKmsRegion(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Provenance(#[from] ProvenanceError),
    #[error(transparent)]
    AmiProvenance(#[from] AmiProvenanceError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl Diagnose for AttestError {
    fn hint(&self) -> Option<String> {
        match self {
            AttestError::NoKmsRegion(_) => Some("give a key ARN, --region or AWS_REGION".into()),
            _ => None,
        }
    }
}

/// Signs and attaches the attestations of `version`'s image, writes its manifest, and copies it
/// to `options.manifest_copy`.
pub fn attest_image(
    ctx: &Context,
    store: &Store,
    version: &str,
    options: &SigningOptions,
) -> Result<Manifest, AttestError> {
    let attest_options = AttestOptions {
        sbom_formats: if options.sbom_formats.is_empty() {
            vec![SbomFormat::Spdx]
        } else {
            options.sbom_formats.clone()
        },
        invocation_id: provenance::random_uuid()?,
    };
    let manifest = ctx.block_on(async {
        let signer = signer(ctx, store, options).await?;
        Ok::<_, AttestError>(
            provenance::attest(store, version, signer.as_ref(), &attest_options).await?,
        )
    })??;
    if let Some(path) = &options.manifest_copy {
        manifest::write_copy(&manifest, path)?;
    }
    Ok(manifest)
}

/// Signs the provenance of an AMI version (its disk image's digest, for every AMI of it), tags
/// each AMI with the envelope's digest, keeps the envelope in SSM when asked, and writes the
/// manifest (copied to `options.manifest_copy`).
pub async fn attest_amis(
    ctx: &Context,
    store: &Store,
    version: &str,
    options: &SigningOptions,
    ssm_parameter: Option<&str>,
) -> Result<Manifest, AttestError> {
    let signer = signer(ctx, store, options).await?;
    let invocation = provenance::random_uuid()?;
    let manifest = provenance::ami::attest_amis(
        ctx.aws().await,
        store,
        version,
        signer.as_ref(),
        invocation,
        ssm_parameter,
    )
    .await?;
    if let Some(path) = &options.manifest_copy {
        manifest::write_copy(&manifest, path)?;
    }
    Ok(manifest)
}

/// The region of a KMS key: the one in its ARN, else the settings' region.
pub fn kms_region(key: &str, ctx: &Context) -> Option<String> {
    key.strip_prefix("arn:")
        .and_then(|rest| rest.split(':').nth(2))
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .or_else(|| ctx.settings.aws.region.clone())
}

/// The signer the options choose: a KMS key, a key file, or the store's default key (made on
/// first use).
async fn signer(
    ctx: &Context,
    store: &Store,
    options: &SigningOptions,
) -> Result<Box<dyn Signer>, AttestError> {
    if let Some(kms_key) = &options.kms_key {
        let aws = ctx.aws().await;
        let region = kms_region(kms_key, ctx)
            .or_else(|| aws.default_region().map(str::to_owned))
            .ok_or_else(|| AttestError::NoKmsRegion(kms_key.clone()))?;
        return Ok(Box::new(KmsSigner::new(aws.kms(&region), kms_key).await?));
    }
    if let Some(path) = &options.signing_key {
        return Ok(Box::new(LocalKey::read(path)?));
    }
    let (key, created) = provenance::store_key(store, keys::DEFAULT_KEY_NAME)?;
    if created && ctx.settings.verbosity > Verbosity::Quiet {
        eprintln!(
            "==> made the store's signing key {} (ecdsa-p256, {})",
            key.public_key().key_id(),
            keys::store_key_path(store.root(), keys::DEFAULT_KEY_NAME).display()
        );
    }
    Ok(Box::new(key))
}

/// Why a built version could not be attested again (`bake attest`).
#[derive(Debug, thiserror::Error)]
pub enum AttestVersionError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Find(#[from] super::record::FindRecordError),
    /// Neither a manifest's reference nor a version.
    #[error(transparent)]
    Reference(ManifestError),
    #[error("version {0} has no record in the store")]
    NoRecord(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Attest(#[from] AttestError),
}

impl Diagnose for AttestVersionError {
    fn hint(&self) -> Option<String> {
        match self {
            AttestVersionError::Reference(e) => e.hint(),
            AttestVersionError::Attest(e) => Diagnose::hint(e),
            _ => None,
        }
    }

    fn exit_status(&self) -> crate::exit::ExitStatus {
        match self {
            AttestVersionError::Find(_)
            | AttestVersionError::Reference(_)
            | AttestVersionError::NoRecord(_) => crate::exit::ExitStatus::RecipeOrUsage,
            _ => crate::exit::ExitStatus::Infrastructure,
        }
    }

    fn reports(&self) -> Vec<crate::diagnostic::Report> {
        match self {
            AttestVersionError::Find(e) => e.reports(),
            _ => vec![crate::diagnostic::Report::from_error(self).with_hint(Diagnose::hint(self))],
        }
    }
}

/// Signs (again) the provenance of the built version `what` names (a recipe file's current
/// version, a version or prefix, `name:short-version`, an image digest or an AMI id): its
/// AMIs' (tagged, kept in the store and, with `ssm_parameter`, in SSM) when its record lists
/// AMIs, else its image's attestations.
pub fn attest_version(
    ctx: &Context,
    what: &str,
    vars: &crate::recipe::VarSources,
    options: &SigningOptions,
    ssm_parameter: Option<&str>,
) -> Result<Manifest, AttestVersionError> {
    let store = ctx.store()?;
    // The version: a recipe's current one, from a manifest, from a record, else the argument.
    let version = if std::path::Path::new(what).is_file() {
        super::record::find_record(ctx, store, what, vars)?
            .version
            .to_string()
    } else {
        match manifest::find(store, what) {
            Ok(found) => found.version,
            Err(_) if what.parse::<crate::id::Version>().is_ok() => what.to_owned(),
            Err(e) => return Err(AttestVersionError::Reference(e)),
        }
    };
    let record = store
        .record(&version)?
        .ok_or_else(|| AttestVersionError::NoRecord(version.clone()))?;
    // AMIs are attested as AMIs (tagged, kept in SSM); an image-only version by its image.
    if record.amis().is_empty() {
        return Ok(attest_image(ctx, store, &version, options)?);
    }
    Ok(ctx.block_on(attest_amis(ctx, store, &version, options, ssm_parameter))??)
}
