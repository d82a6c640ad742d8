//! Provenance: the manifest of each version, SLSA provenance and SBOMs signed as DSSE
//! envelopes, attached to images as OCI referrers, and their verification.
//!
//! ```text
//!  build record ──► SBOM (dpkg status or files) ──► in-toto statements ──► DSSE (key or KMS)
//!        │                                                                      │
//!        └──────────────► manifest ◄── digests ◄── referrers in the store ◄─────┘
//! ```
//!
//! [`prepare`] does the blocking work (reading layers, rendering documents), [`sign`] the
//! signing (local key or KMS, hence async), [`store_attestations`] writes blobs, referrers
//! and the manifest. [`attest`] runs the three for `bake build`.

pub mod ami;
pub mod dpkg;
pub mod dsse;
pub mod imagefs;
pub mod keys;
pub mod layout;
pub mod manifest;
pub mod registry;
pub mod sbom;
pub mod slsa;
pub mod verify;

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::store::{BuildRecord, Store, StoreError};
use dsse::{DsseError, Envelope, IN_TOTO_PAYLOAD_TYPE};
use imagefs::{ImageFs, ImageFsError};
use keys::{KeyAlgorithm, KeyError, LocalKey, Signer};
use layout::{Layout, LayoutError, Target};
use manifest::{AttestationRef, Attestations, Manifest, ManifestError, SbomRef, SignerInfo};
use sbom::{Inventory, SbomError, SbomFormat, SbomSubject};
use slsa::{RunDetails, SLSA_PREDICATE_TYPE, Subject};

#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("version {version} has no build record in the store; build it first")]
    NotBuilt { version: String },
    #[error(
        "version {version} has no OCI image to attest (its AMIs are attested with `bake attest AMI`)"
    )]
    NoImage { version: String },
    #[error("failed to read the image of version {version}")]
    Image {
        version: String,
        #[source]
        source: ImageFsError,
    },
    #[error("failed to make the SBOM of version {version}")]
    Sbom {
        version: String,
        #[source]
        source: SbomError,
    },
    #[error("failed to sign the attestations of version {version}")]
    Sign {
        version: String,
        #[source]
        source: DsseError,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// What to attest.
#[derive(Debug, Clone)]
pub struct AttestOptions {
    /// SBOM formats; the first is the one the manifest names first.
    pub sbom_formats: Vec<SbomFormat>,
    /// A fresh invocation id for the run details.
    pub invocation_id: String,
}

/// A random RFC 4122 version 4 UUID (for invocation ids).
pub fn random_uuid() -> Result<String, KeyError> {
    Ok(uuid::Builder::from_random_bytes(keys::random_bytes()?)
        .into_uuid()
        .to_string())
}

/// Unsigned statements and documents of one version.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub record: BuildRecord,
    pub target: Target,
    /// The provenance statement's bytes.
    pub provenance: Vec<u8>,
    /// (format, document bytes, statement bytes).
    pub sboms: Vec<(SbomFormat, Vec<u8>, Vec<u8>)>,
}

/// Envelopes over a [`Prepared`] version.
#[derive(Debug, Clone)]
pub struct Signed {
    pub prepared: Prepared,
    pub signer: SignerInfo,
    pub provenance: Envelope,
    pub sboms: Vec<Envelope>,
}

fn digest_of(bytes: &[u8]) -> String {
    crate::plan::hash::bytes_digest(bytes)
}

/// Reads the version's build record and image and renders its SBOMs and provenance statement.
/// Blocking: reads every layer of the image.
pub fn prepare(
    store: &Store,
    version: &str,
    options: &AttestOptions,
) -> Result<Prepared, ProvenanceError> {
    let not_built = || ProvenanceError::NotBuilt {
        version: version.to_owned(),
    };
    let record = store.record(version)?.ok_or_else(not_built)?;
    let output = record.image().ok_or_else(|| ProvenanceError::NoImage {
        version: version.to_owned(),
    })?;
    let target = Target {
        media_type: oci_spec::image::MediaType::ImageManifest.to_string(),
        digest: output.image_digest.to_string(),
        size: output.manifest_size,
        annotations: Default::default(),
    };
    let fs = ImageFs::read(store, &output.layers).map_err(|source| ProvenanceError::Image {
        version: version.to_owned(),
        source,
    })?;
    let inventory = Inventory::of(&fs).map_err(|source| ProvenanceError::Sbom {
        version: version.to_owned(),
        source,
    })?;
    let image_subject = Subject {
        name: record.name.clone(),
        digest: output.image_digest.to_string(),
    };
    let mut subjects = vec![image_subject.clone()];
    // The same build's disk image (both outputs), from the same provisioned root.
    if let Some(disk) = record
        .disk_ami()
        .and_then(|ami| ami.disk_image_digest.as_ref())
    {
        subjects.push(Subject {
            name: format!("{}.raw", record.name),
            digest: disk.to_string(),
        });
    }
    let sbom_subject = SbomSubject {
        name: record.name.clone(),
        digest: output.image_digest.to_string(),
        created_epoch: record.inputs.source_date_epoch,
    };
    let mut sboms = Vec::new();
    let mut byproducts = Vec::new();
    for &format in &options.sbom_formats {
        let document = sbom::render(format, &inventory, &sbom_subject);
        let predicate: Value = serde_json::from_slice(&document).expect("SBOMs are JSON");
        let statement = slsa::statement(
            std::slice::from_ref(&image_subject),
            format.predicate_type(),
            predicate,
        );
        byproducts.push(json!({
            "name": format!("sbom.{}.json", format.name()),
            "digest": {"sha256": crate::id::Digest::of(&document).hex()},
            "mediaType": format.media_type(),
        }));
        sboms.push((
            format,
            document,
            serde_json::to_vec(&statement).expect("JSON"),
        ));
    }
    let facts = slsa::BuildFacts::from(&record);
    let run = RunDetails::of(&facts, options.invocation_id.clone());
    let provenance = slsa::statement(
        &subjects,
        SLSA_PREDICATE_TYPE,
        slsa::predicate(&facts, &run, byproducts),
    );
    Ok(Prepared {
        record,
        target,
        provenance: serde_json::to_vec(&provenance).expect("JSON"),
        sboms,
    })
}

/// Signs the prepared statements.
pub async fn sign(prepared: Prepared, signer: &dyn Signer) -> Result<Signed, ProvenanceError> {
    let sign_error = |source| ProvenanceError::Sign {
        version: prepared.record.version.to_string(),
        source,
    };
    let provenance = Envelope::sign(IN_TOTO_PAYLOAD_TYPE, &prepared.provenance, signer)
        .await
        .map_err(sign_error)?;
    let mut sboms = Vec::new();
    for (_, _, statement) in &prepared.sboms {
        sboms.push(
            Envelope::sign(IN_TOTO_PAYLOAD_TYPE, statement, signer)
                .await
                .map_err(sign_error)?,
        );
    }
    let public = signer.public_key();
    Ok(Signed {
        signer: SignerInfo {
            key_id: public.key_id(),
            algorithm: public.algorithm().name().into(),
            reference: signer.reference(),
            public_key: public.to_pem(),
        },
        prepared,
        provenance,
        sboms,
    })
}

/// Stores the envelopes and SBOMs as blobs, attaches the envelopes to the image as referrers
/// in the store's layout, and writes the version's manifest (keeping its publications).
pub fn store_attestations(store: &Store, signed: &Signed) -> Result<Manifest, ProvenanceError> {
    let prepared = &signed.prepared;
    let layout = Layout::open(store.root())?;
    let created = crate::artifact::oci::rfc3339(prepared.record.inputs.source_date_epoch);
    let attach = |envelope: &Envelope, statement: &[u8], predicate_type: &str| {
        let bytes = envelope.to_json();
        let envelope_digest = store.put_blob(&bytes)?;
        let referrer = layout.attach(&prepared.target, &bytes, predicate_type, &created)?;
        Ok::<_, ProvenanceError>(AttestationRef {
            predicate_type: predicate_type.to_owned(),
            envelope_digest,
            statement_digest: digest_of(statement),
            referrer: Some(referrer),
        })
    };
    let provenance = attach(
        &signed.provenance,
        &prepared.provenance,
        SLSA_PREDICATE_TYPE,
    )?;
    let mut sboms = Vec::new();
    for ((format, document, statement), envelope) in prepared.sboms.iter().zip(&signed.sboms) {
        let digest = store.put_blob(document)?;
        sboms.push(SbomRef {
            format: format.name().into(),
            media_type: format.media_type().into(),
            digest,
            attestation: attach(envelope, statement, format.predicate_type())?,
        });
    }
    let fresh = Manifest::from_record(&prepared.record);
    let version = prepared.record.version.to_string();
    let _lock = store.lock()?;
    let previous = manifest::load(store, &version)?;
    let mut manifest = fresh;
    if let Some(previous) = previous {
        manifest.publications = previous.publications;
        for ami in previous.outputs.amis {
            if !manifest.outputs.amis.contains(&ami) {
                manifest.outputs.amis.push(ami);
            }
        }
    }
    manifest.attestations = Some(Attestations {
        signer: signed.signer.clone(),
        provenance,
        sboms,
    });
    manifest.timings.attested =
        Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
    manifest::save(store, &manifest)?;
    Ok(manifest)
}

/// The attested manifest of `version` if it is already signed by `signer` with every format
/// asked for (so rebuilding a stored version does not pile up attestations).
pub fn already_attested(
    store: &Store,
    version: &str,
    signer: &dyn Signer,
    formats: &[SbomFormat],
) -> Result<Option<Manifest>, ProvenanceError> {
    let Some(manifest) = manifest::load(store, version)? else {
        return Ok(None);
    };
    let Some(attestations) = &manifest.attestations else {
        return Ok(None);
    };
    let complete = attestations.signer.key_id == signer.public_key().key_id()
        && formats
            .iter()
            .all(|f| attestations.sboms.iter().any(|s| s.format == f.name()))
        && store.has_blob(&attestations.provenance.envelope_digest);
    Ok(complete.then_some(manifest))
}

/// Whether the store's layout holds a signed SLSA provenance attached to the image
/// `image_digest`. The manifest keeps one set of attestations per version, so for a version with
/// both outputs (whose manifest names the AMIs' provenance) the layout is where the image's is
/// looked for.
pub fn image_attested(store: &Store, image_digest: &str) -> Result<bool, ProvenanceError> {
    let layout = Layout::open(store.root())?;
    Ok(layout.referrers(image_digest)?.iter().any(|(_, manifest)| {
        manifest["annotations"][layout::PREDICATE_ANNOTATION].as_str() == Some(SLSA_PREDICATE_TYPE)
    }))
}

/// Prepares, signs and stores the attestations of `version` (unless already there).
pub async fn attest(
    store: &Store,
    version: &str,
    signer: &dyn Signer,
    options: &AttestOptions,
) -> Result<Manifest, ProvenanceError> {
    if let Some(manifest) = already_attested(store, version, signer, &options.sbom_formats)? {
        return Ok(manifest);
    }
    let prepared = {
        let store = store.clone();
        let version = version.to_owned();
        let options = options.clone();
        tokio::task::spawn_blocking(move || prepare(&store, &version, &options))
            .await
            .expect("the SBOM task does not panic")?
    };
    let signed = sign(prepared, signer).await?;
    store_attestations(store, &signed)
}

/// The store's default signing key, generated (ECDSA P-256, which cosign also verifies) the
/// first time it is needed. Returns the key and whether it was just made.
pub fn store_key(store: &Store, name: &str) -> Result<(LocalKey, bool), KeyError> {
    let path = keys::store_key_path(store.root(), name);
    if path.exists() {
        return Ok((LocalKey::read(&path)?, false));
    }
    let mut key = LocalKey::generate(KeyAlgorithm::EcdsaP256)?;
    key.write(&path, false)?;
    Ok((key, true))
}

/// The public keys `bake verify` trusts by default: every `*.pub` in the store's key directory.
pub fn store_public_keys(store_root: &Path) -> Result<Vec<keys::PublicKey>, KeyError> {
    let dir: PathBuf = store_root.join(keys::STORE_KEY_DIR);
    let mut found = Vec::new();
    let Ok(entries) = fs_err::read_dir(&dir) else {
        return Ok(found);
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pub"))
        .collect();
    paths.sort();
    for path in paths {
        found.push(keys::PublicKey::read(&path)?);
    }
    Ok(found)
}
