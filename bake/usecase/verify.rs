//! Verifying what bake made: an artifact's signed provenance and SBOM attestations (an image in
//! a registry, an OCI layout, the store, or an AMI through its `bake:provenance` tag), or the
//! live state of every surface a channel's version was published to
//! ([`crate::verify_published`]).

use std::path::{Path, PathBuf};

use super::Context;
use crate::diagnostic::Diagnose;
use crate::exit::ExitStatus;
use crate::provenance::ami::AmiVerifyError;
use crate::provenance::keys::{KeyError, KmsSigner, PublicKey, Signer as _};
use crate::provenance::layout::Layout;
use crate::provenance::store_public_keys;
use crate::provenance::verify::{self, VerifyError, VerifyReport};
use crate::publish::{PublishError, PublishOptions, Publisher};
use crate::recipe::Recipe;
use crate::registry::{Client, Reference, RegistryError};
use crate::verify_published::PublishedReport;

/// Which keys are trusted.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    /// Public key files (PEM).
    pub files: Vec<PathBuf>,
    /// An AWS KMS key (id, alias or ARN) whose public key is fetched with GetPublicKey.
    pub kms_key: Option<String>,
}

/// Why an artifact could not be verified, or did not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyUseError {
    #[error(transparent)]
    Context(#[from] super::ContextError),
    /// A trusted key could not be read or fetched.
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Unverified(#[from] VerifyError),
    #[error("no region to look for AMI `{0}` in")]
    NoRegion(String),
    #[error(transparent)]
    Ami(AmiVerifyError),
    #[error(transparent)]
    Published(#[from] PublishError),
}

impl Diagnose for VerifyUseError {
    fn hint(&self) -> Option<String> {
        match self {
            VerifyUseError::Registry(e) => e.hint(),
            VerifyUseError::Unverified(e) | VerifyUseError::Ami(AmiVerifyError::Verify(e)) => {
                match e {
                    VerifyError::NoTrustedKeys | VerifyError::Layout(_) => None,
                    _ => Some("do not deploy this artifact; rebuild and re-attest it, or check which key signed it with `bake manifest show`".to_owned()),
                }
            }
            VerifyUseError::NoRegion(_) => Some("give --region".into()),
            VerifyUseError::Published(e) => e.hint(),
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            VerifyUseError::Key(_) | VerifyUseError::NoRegion(_) => ExitStatus::RecipeOrUsage,
            VerifyUseError::Unverified(e) | VerifyUseError::Ami(AmiVerifyError::Verify(e)) => {
                match e {
                    VerifyError::Layout(_) | VerifyError::NoTrustedKeys => {
                        ExitStatus::RecipeOrUsage
                    }
                    _ => ExitStatus::Unverified,
                }
            }
            VerifyUseError::Ami(AmiVerifyError::NoSuchAmi { .. }) => ExitStatus::RecipeOrUsage,
            VerifyUseError::Ami(
                AmiVerifyError::EnvelopeMissing { .. } | AmiVerifyError::ParameterMismatch { .. },
            ) => ExitStatus::Unverified,
            VerifyUseError::Published(e) if e.is_refusal() => ExitStatus::RecipeOrUsage,
            _ => ExitStatus::Infrastructure,
        }
    }
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

/// Verifies the artifact `reference` names (`registry/repo:tag` or `…@sha256:…`,
/// `oci:DIR[:TAG]`, an AMI id, or a version, `name:short-version` or image digest in the store)
/// with the trusted keys.
pub fn verify_artifact(
    ctx: &Context,
    reference: &str,
    trusted: &TrustedKeys,
) -> Result<VerifyReport, VerifyUseError> {
    let settings = &ctx.settings;
    let keys = trusted_keys(ctx, trusted)?;
    match parse_reference(reference, &settings.store) {
        Source::Registry(parsed) => verify_registry(ctx, &parsed, reference, &keys),
        Source::Ami(image_id) => verify_ami(ctx, image_id, &keys),
        Source::Layout { dir, selector } => {
            let selector = if dir == settings.store {
                selector.map(|s| store_selector(ctx, s))
            } else {
                selector.map(str::to_owned)
            };
            let layout = Layout::open(&dir).map_err(VerifyError::from)?;
            Ok(verify::verify_layout(
                &layout,
                reference,
                selector.as_deref(),
                &keys,
            )?)
        }
    }
}

/// Fetches the attestations of an image in a registry and verifies them.
fn verify_registry(
    ctx: &Context,
    reference: &Reference,
    shown: &str,
    keys: &[PublicKey],
) -> Result<VerifyReport, VerifyUseError> {
    let settings = &ctx.settings;
    let store = ctx.store()?;
    let client = Client::new(
        settings.registry.client_options(),
        settings.registry.credentials(),
    )?;
    let (target, envelopes) = ctx.block_on(crate::provenance::registry::fetch(
        &client, store, reference,
    ))??;
    let claimed = reference
        .tag()
        .filter(|_| reference.digest().is_none())
        .and_then(verify::version_claimed_by_tag);
    Ok(verify::verify_attestations(
        shown,
        &target,
        &envelopes,
        keys,
        claimed.as_deref(),
    )?)
}

/// Verifies an AMI in the settings' region through its `bake:provenance` tag.
fn verify_ami(
    ctx: &Context,
    image_id: &str,
    keys: &[PublicKey],
) -> Result<VerifyReport, VerifyUseError> {
    let store = ctx.store()?;
    ctx.block_on(async {
        let aws = ctx.aws().await;
        let Some(region) = ctx
            .settings
            .aws
            .region
            .clone()
            .or_else(|| aws.default_region().map(str::to_owned))
        else {
            return Err(VerifyUseError::NoRegion(image_id.to_owned()));
        };
        crate::provenance::ami::verify_ami(aws, store, &region, image_id, keys)
            .await
            .map_err(VerifyUseError::Ami)
    })?
}

/// The store's images are selected by tag, version or digest; a version prefix or a
/// `name:short` form is resolved through the manifests.
fn store_selector(ctx: &Context, selector: &str) -> String {
    let Ok(store) = ctx.store() else {
        return selector.to_owned();
    };
    match crate::provenance::manifest::find(store, selector) {
        Ok(m) => m.version,
        Err(_) => selector.to_owned(),
    }
}

/// The key files, the KMS key's public key, else every `keys/*.pub` of the store.
fn trusted_keys(ctx: &Context, trusted: &TrustedKeys) -> Result<Vec<PublicKey>, VerifyUseError> {
    let mut keys = Vec::new();
    for path in &trusted.files {
        keys.push(PublicKey::read(path)?);
    }
    if let Some(kms_key) = &trusted.kms_key {
        let region = super::attest::kms_region(kms_key, ctx);
        let signer = ctx.block_on(async {
            let aws = ctx.aws().await;
            let region = region.or_else(|| aws.default_region().map(str::to_owned));
            let client = aws.kms(region.as_deref().unwrap_or("us-east-1"));
            KmsSigner::new(client, kms_key).await
        })??;
        keys.push(signer.public_key().clone());
    }
    if keys.is_empty() {
        keys = store_public_keys(&ctx.settings.store)?;
    }
    Ok(keys)
}

/// Compares every surface `channel`'s current version was published to with AWS.
pub fn verify_published(
    ctx: &Context,
    recipe: &Recipe,
    channel: &str,
) -> Result<PublishedReport, VerifyUseError> {
    ctx.block_on(async {
        let aws = ctx.aws().await;
        let digests = super::publish::digest_check(aws, recipe, &ctx.settings)?;
        let publisher = Publisher {
            aws,
            digests: &digests,
            recipe,
            options: PublishOptions::default(),
        };
        Ok(crate::verify_published::verify(&publisher, channel).await?)
    })?
}
