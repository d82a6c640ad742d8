//! Provenance of AMIs. An AMI has no content digest EC2 can report, so its provenance names each
//! AMI by ARN (`arn:aws:ec2:REGION::image/ami-…`) with the digest of the raw disk image it was
//! made from; an AMI made on a builder instance (no disk image bake saw) is named with the
//! version's digest instead, the digest of everything that went into it. The signed envelope is kept beside the manifest in the store (and, when asked, in
//! an SSM parameter), and each AMI is tagged with the envelope's digest (`bake:provenance`), so
//! `bake verify ami-… --region R` can find and check it.

use aws_sdk_ec2::types::Tag;
use serde_json::Value;

use super::dsse::{Envelope, IN_TOTO_PAYLOAD_TYPE};
use super::keys::{PublicKey, Signer};
use super::manifest::{self, AttestationRef, Attestations, Manifest, Publication, SignerInfo};
use super::slsa::{self, BuildFacts, ProvenanceSummary, RunDetails, SLSA_PREDICATE_TYPE, Subject};
use super::verify::{VerifiedAttestation, VerifyError, VerifyReport};
use crate::aws::Aws;
use crate::store::{Store, StoreError};

/// The tag naming the digest of an AMI's provenance envelope.
pub const TAG_PROVENANCE: &str = "bake:provenance";
/// The tag the AMI pipeline puts on each AMI naming its version (`bake::ami::TAG_VERSION`).
pub const TAG_VERSION: &str = "bake:version";
/// The tag naming the SSM parameter that also holds the envelope.
pub const TAG_PROVENANCE_PARAMETER: &str = "bake:provenance-parameter";

#[derive(Debug, thiserror::Error)]
pub enum AmiProvenanceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error("version {version} has no AMIs in its record; publish them first")]
    NoAmis { version: String },
    #[error(
        "version {version} has no disk image digest, which AMI provenance names as the AMIs' content"
    )]
    NoDiskImage { version: String },
    #[error("version {version} has no record in the store")]
    NotBuilt { version: String },
    #[error("failed to sign the provenance of version {version}")]
    Sign {
        version: String,
        #[source]
        source: super::dsse::DsseError,
    },
    #[error("failed to {what} in {region}: {message}")]
    Aws {
        what: String,
        region: String,
        message: String,
    },
}

fn aws_error<E: std::error::Error>(what: String, region: &str, error: E) -> AmiProvenanceError {
    AmiProvenanceError::Aws {
        what,
        region: region.to_owned(),
        message: aws_sdk_ec2::error::DisplayErrorContext(&error).to_string(),
    }
}

/// `arn:aws:ec2:REGION::image/AMI`.
pub fn ami_arn(region: &str, image_id: &str) -> String {
    format!("arn:aws:ec2:{region}::image/{image_id}")
}

/// The digest of `version`'s AMI provenance when every AMI its record lists is attested by it;
/// `None` when one is not (or nothing is).
pub fn attested(store: &Store, version: &str) -> Result<Option<String>, AmiProvenanceError> {
    let (Some(record), Some(manifest)) = (store.record(version)?, manifest::load(store, version)?)
    else {
        return Ok(None);
    };
    let Some(attestations) = &manifest.attestations else {
        return Ok(None);
    };
    let digest = &attestations.provenance.envelope_digest;
    let covered = manifest::record_amis(&record).iter().all(|ami| {
        manifest.publications.iter().any(|p| {
            matches!(p, Publication::Attestation { reference, digest: d, .. }
                if *reference == ami_arn(&ami.region, &ami.image_id) && d == digest)
        })
    });
    Ok(covered.then(|| digest.clone()))
}

/// Signs the provenance of `version`'s AMIs, keeps the envelope in the store (and in SSM
/// parameter `ssm_parameter` of each region, when given), tags each AMI with its digest and
/// records it all in the manifest.
pub async fn attest_amis(
    aws: &Aws,
    store: &Store,
    version: &str,
    signer: &dyn Signer,
    invocation_id: String,
    ssm_parameter: Option<&str>,
) -> Result<Manifest, AmiProvenanceError> {
    let record = store
        .record(version)?
        .ok_or_else(|| AmiProvenanceError::NotBuilt {
            version: version.to_owned(),
        })?;
    let fresh = Manifest::from_record(&record);
    let mut manifest = match manifest::load(store, version)? {
        Some(existing) => existing,
        None => fresh.clone(),
    };
    // The record names the AMIs the version has now; a manifest from an earlier build of the
    // same version (say, before its AMIs were deregistered and built again) may name others.
    if !fresh.outputs.amis.is_empty() {
        manifest.outputs.amis = fresh.outputs.amis;
    }
    manifest.outputs.disk_image = fresh.outputs.disk_image.or(manifest.outputs.disk_image);
    if manifest.inputs.base.is_null() {
        // A manifest made from publications alone, before this store had the build.
        manifest.inputs = fresh.inputs;
        manifest.outputs.oci = fresh.outputs.oci;
        manifest.timings = fresh.timings;
    }
    if manifest.outputs.amis.is_empty() {
        return Err(AmiProvenanceError::NoAmis {
            version: version.to_owned(),
        });
    }
    // The AMIs' content: the disk image they were registered from, else (made on a builder)
    // the version itself.
    let built_remotely = record.instance_ami().is_some() || record.imagebuilder_ami().is_some();
    let content = match (&manifest.outputs.disk_image, built_remotely) {
        (Some(disk), _) => disk.digest.clone(),
        (None, true) => record.version.to_string(),
        (None, false) => {
            return Err(AmiProvenanceError::NoDiskImage {
                version: version.to_owned(),
            });
        }
    };
    let facts = BuildFacts::from(&record);
    let subjects: Vec<Subject> = manifest
        .outputs
        .amis
        .iter()
        .map(|a| Subject {
            name: ami_arn(&a.region, &a.image_id),
            digest: content.clone(),
        })
        .collect();
    let run = RunDetails::of(&facts, invocation_id);
    let statement = slsa::statement(
        &subjects,
        SLSA_PREDICATE_TYPE,
        slsa::predicate(&facts, &run, Vec::new()),
    );
    let payload = serde_json::to_vec(&statement).expect("statements serialize");
    let envelope = Envelope::sign(IN_TOTO_PAYLOAD_TYPE, &payload, signer)
        .await
        .map_err(|source| AmiProvenanceError::Sign {
            version: version.to_owned(),
            source,
        })?;
    let bytes = envelope.to_json();
    let envelope_digest = store.put_blob(&bytes)?;
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let by = super::registry::operator();
    let mut publications = Vec::new();
    for ami in &manifest.outputs.amis {
        let ec2 = aws.ec2(&ami.region);
        let mut tags = vec![
            Tag::builder()
                .key(TAG_PROVENANCE)
                .value(&envelope_digest)
                .build(),
        ];
        if let Some(name) = ssm_parameter {
            let ssm = aws.ssm(&ami.region);
            let text = String::from_utf8(bytes.clone()).expect("envelopes are JSON text");
            let put = ssm
                .put_parameter()
                .name(name)
                .value(text)
                .r#type(aws_sdk_ssm::types::ParameterType::String)
                .tier(aws_sdk_ssm::types::ParameterTier::Advanced)
                .overwrite(true)
                .send()
                .await
                .map_err(|e| {
                    aws_error(
                        format!("store the provenance in SSM parameter `{name}`"),
                        &ami.region,
                        e,
                    )
                })?;
            publications.push(Publication::SsmParameter {
                region: ami.region.clone(),
                name: name.to_owned(),
                version: put.version() as u64,
                at: at.clone(),
                by: by.clone(),
            });
            tags.push(
                Tag::builder()
                    .key(TAG_PROVENANCE_PARAMETER)
                    .value(name)
                    .build(),
            );
        }
        ec2.create_tags()
            .resources(&ami.image_id)
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| aws_error(format!("tag AMI `{}`", ami.image_id), &ami.region, e))?;
        publications.push(Publication::Attestation {
            reference: ami_arn(&ami.region, &ami.image_id),
            digest: envelope_digest.clone(),
            at: at.clone(),
            by: by.clone(),
        });
    }
    let public = signer.public_key();
    manifest.attestations = Some(Attestations {
        signer: SignerInfo {
            key_id: public.key_id(),
            algorithm: public.algorithm().name().into(),
            reference: signer.reference(),
            public_key: public.to_pem(),
        },
        provenance: AttestationRef {
            predicate_type: SLSA_PREDICATE_TYPE.into(),
            envelope_digest,
            statement_digest: crate::plan::hash::bytes_digest(&payload),
            referrer: None,
        },
        sboms: Vec::new(),
    });
    for publication in publications {
        if !manifest.publications.contains(&publication) {
            manifest.publications.push(publication);
        }
    }
    manifest.timings.attested = Some(at);
    manifest::save(store, &manifest)?;
    Ok(manifest)
}

/// Verifies AMI `image_id` in `region`: its `bake:provenance` tag names an envelope (in the
/// store, else in the SSM parameter its other tag names) that a trusted key signed and whose
/// subjects include this AMI.
pub async fn verify_ami(
    aws: &Aws,
    store: &Store,
    region: &str,
    image_id: &str,
    trusted: &[PublicKey],
) -> Result<VerifyReport, AmiVerifyError> {
    let reference = format!("{image_id} ({region})");
    let described = aws
        .ec2(region)
        .describe_images()
        .image_ids(image_id)
        .send()
        .await
        .map_err(|e| {
            AmiVerifyError::Aws(aws_error(format!("describe AMI `{image_id}`"), region, e))
        })?;
    let image = described
        .images()
        .first()
        .ok_or_else(|| AmiVerifyError::NoSuchAmi {
            image_id: image_id.to_owned(),
            region: region.to_owned(),
        })?;
    let tag = |key: &str| {
        image
            .tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_owned)
    };
    let arn = ami_arn(region, image_id);
    let Some(digest) = tag(TAG_PROVENANCE) else {
        return Err(AmiVerifyError::Verify(VerifyError::NoAttestations {
            reference,
            digest: arn,
        }));
    };
    let bytes = match store.read_blob(&digest) {
        Ok(bytes) => bytes,
        Err(StoreError::MissingBlob { .. }) => match tag(TAG_PROVENANCE_PARAMETER) {
            Some(name) => {
                let got = aws
                    .ssm(region)
                    .get_parameter()
                    .name(&name)
                    .send()
                    .await
                    .map_err(|e| {
                        AmiVerifyError::Aws(aws_error(
                            format!("read SSM parameter `{name}`"),
                            region,
                            e,
                        ))
                    })?;
                let text = got
                    .parameter()
                    .and_then(|p| p.value())
                    .unwrap_or_default()
                    .as_bytes()
                    .to_vec();
                let actual = crate::plan::hash::bytes_digest(&text);
                if actual != digest {
                    return Err(AmiVerifyError::ParameterMismatch {
                        name,
                        expected: digest,
                        actual,
                    });
                }
                text
            }
            None => {
                return Err(AmiVerifyError::EnvelopeMissing {
                    image_id: image_id.to_owned(),
                    digest,
                });
            }
        },
        Err(e) => return Err(AmiVerifyError::Store(e)),
    };
    // The AMI's content is its disk image: the statement must name this AMI.
    let envelope_error = |source| VerifyError::Envelope {
        referrer: digest.clone(),
        digest: arn.clone(),
        source,
    };
    let envelope =
        Envelope::from_json(&bytes).map_err(|e| AmiVerifyError::Verify(envelope_error(e)))?;
    let verified = envelope
        .verify(IN_TOTO_PAYLOAD_TYPE, trusted)
        .map_err(|e| AmiVerifyError::Verify(envelope_error(e)))?;
    let statement: Value = serde_json::from_slice(&verified.payload).map_err(|e| {
        AmiVerifyError::Verify(VerifyError::Statement {
            referrer: digest.clone(),
            reason: e.to_string(),
        })
    })?;
    let subjects = slsa::subjects_of(&statement);
    let Some(subject) = subjects.iter().find(|s| s.name == arn) else {
        return Err(AmiVerifyError::Verify(VerifyError::SubjectMismatch {
            referrer: digest.clone(),
            digest: arn,
            subjects: subjects.iter().map(|s| s.name.clone()).collect(),
        }));
    };
    let provenance = ProvenanceSummary::of(&statement);
    if let Some(version) = tag(TAG_VERSION)
        && provenance.version.as_deref() != Some(version.as_str())
    {
        return Err(AmiVerifyError::Verify(VerifyError::VersionMismatch {
            reference,
            digest: subject.digest.clone(),
            tagged: version,
            attested: provenance.version.clone().unwrap_or_default(),
        }));
    }
    Ok(VerifyReport {
        reference,
        digest: subject.digest.clone(),
        verified: true,
        provenance,
        attestations: vec![VerifiedAttestation {
            referrer: digest,
            predicate_type: SLSA_PREDICATE_TYPE.into(),
            key_id: verified.key_id,
            components: None,
        }],
    })
}

#[derive(Debug, thiserror::Error)]
pub enum AmiVerifyError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error(transparent)]
    Aws(AmiProvenanceError),
    #[error(transparent)]
    Store(StoreError),
    #[error("AMI `{image_id}` does not exist in {region}")]
    NoSuchAmi { image_id: String, region: String },
    #[error(
        "AMI `{image_id}` names provenance {digest}, which is neither in the store nor in an SSM parameter"
    )]
    EnvelopeMissing { image_id: String, digest: String },
    #[error(
        "SSM parameter `{name}` holds provenance {actual}, not the {expected} the AMI's tag names"
    )]
    ParameterMismatch {
        name: String,
        expected: String,
        actual: String,
    },
}
