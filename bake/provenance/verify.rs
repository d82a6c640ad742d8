//! `bake verify`: fetch an artifact's attestations, check each DSSE signature against trusted
//! keys, check that the signed statement is about this artifact (a subject digest equals the
//! artifact's actual digest), and summarize the verified provenance.
//!
//! Verification fails closed: any attached attestation that does not verify fails the whole
//! check, with a message naming what did not match.

use serde::Serialize;
use serde_json::Value;

use super::dsse::{DsseError, Envelope, IN_TOTO_PAYLOAD_TYPE};
use super::keys::PublicKey;
use super::layout::{DSSE_MEDIA_TYPE, Layout, LayoutError, Target};
use super::sbom::{CYCLONEDX_PREDICATE_TYPE, SPDX_PREDICATE_TYPE};
use super::slsa::{self, ProvenanceSummary, SLSA_PREDICATE_TYPE, STATEMENT_TYPE};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("no signed attestation is attached to {reference} ({digest})")]
    NoAttestations { reference: String, digest: String },
    #[error("{reference} ({digest}) has attestations but no SLSA provenance among them")]
    NoProvenance { reference: String, digest: String },
    #[error("attestation {referrer} of {digest} failed verification")]
    Envelope {
        referrer: String,
        digest: String,
        #[source]
        source: DsseError,
    },
    #[error("attestation {referrer} is not an in-toto v1 statement: {reason}")]
    Statement { referrer: String, reason: String },
    #[error(
        "attestation {referrer} is about {}, not {digest}: its subject digest is not the artifact's, so it was made for another artifact",
        if subjects.is_empty() { "nothing".to_owned() } else { subjects.join(", ") }
    )]
    SubjectMismatch {
        referrer: String,
        digest: String,
        subjects: Vec<String>,
    },
    #[error(
        "{reference} is tagged as version {tagged}, but the image it points to ({digest}) has provenance for version {attested}: the tag was moved to another image"
    )]
    VersionMismatch {
        reference: String,
        digest: String,
        tagged: String,
        attested: String,
    },
    #[error(
        "no trusted key: give --key PUBLIC.pem or --kms-key, or create the store's key with `bake key generate`"
    )]
    NoTrustedKeys,
}

/// One attestation that verified.
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedAttestation {
    pub referrer: String,
    pub predicate_type: String,
    pub key_id: String,
    /// For SBOMs: how many packages (or files) they list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub components: Option<usize>,
}

/// What `bake verify` reports.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub reference: String,
    pub digest: String,
    pub verified: bool,
    pub provenance: ProvenanceSummary,
    pub attestations: Vec<VerifiedAttestation>,
}

/// Verifies one envelope against `trusted` and checks that its statement is about `digest`.
/// Returns the statement (parsed from the verified payload bytes) and the signing key id.
pub fn verify_envelope(
    envelope_bytes: &[u8],
    referrer: &str,
    digest: &str,
    trusted: &[PublicKey],
) -> Result<(Value, String), VerifyError> {
    let envelope_error = |source| VerifyError::Envelope {
        referrer: referrer.to_owned(),
        digest: digest.to_owned(),
        source,
    };
    let envelope = Envelope::from_json(envelope_bytes).map_err(envelope_error)?;
    let verified = envelope
        .verify(IN_TOTO_PAYLOAD_TYPE, trusted)
        .map_err(envelope_error)?;
    // Parse exactly the bytes whose signature was checked.
    let statement: Value =
        serde_json::from_slice(&verified.payload).map_err(|e| VerifyError::Statement {
            referrer: referrer.to_owned(),
            reason: e.to_string(),
        })?;
    let kind = statement.get("_type").and_then(Value::as_str);
    if kind != Some(STATEMENT_TYPE) {
        return Err(VerifyError::Statement {
            referrer: referrer.to_owned(),
            reason: format!("`_type` is {kind:?}, not `{STATEMENT_TYPE}`"),
        });
    }
    let subjects = slsa::subjects_of(&statement);
    if !subjects.iter().any(|s| s.digest == digest) {
        return Err(VerifyError::SubjectMismatch {
            referrer: referrer.to_owned(),
            digest: digest.to_owned(),
            subjects: subjects
                .iter()
                .map(|s| format!("{} ({})", s.digest, s.name))
                .collect(),
        });
    }
    Ok((statement, verified.key_id))
}

fn component_count(statement: &Value) -> Option<usize> {
    let predicate = statement.get("predicate")?;
    match statement.get("predicateType").and_then(Value::as_str)? {
        SPDX_PREDICATE_TYPE => Some(
            predicate
                .get("packages")
                .and_then(Value::as_array)
                .map_or(0, |p| p.len().saturating_sub(1))
                + predicate
                    .get("files")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len),
        ),
        CYCLONEDX_PREDICATE_TYPE => predicate
            .get("components")
            .and_then(Value::as_array)
            .map(Vec::len),
        _ => None,
    }
}

/// Verifies every attestation of `target` given as (referrer digest, envelope bytes) pairs.
/// `tagged_version` is the bake version (or a prefix of one) that the reference claims (the
/// layout's version annotation, or a registry tag that is a short version), which the
/// provenance must confirm.
pub fn verify_attestations(
    reference: &str,
    target: &Target,
    envelopes: &[(String, Vec<u8>)],
    trusted: &[PublicKey],
    tagged_version: Option<&str>,
) -> Result<VerifyReport, VerifyError> {
    if trusted.is_empty() {
        return Err(VerifyError::NoTrustedKeys);
    }
    if envelopes.is_empty() {
        return Err(VerifyError::NoAttestations {
            reference: reference.to_owned(),
            digest: target.digest.clone(),
        });
    }
    let mut attestations = Vec::new();
    let mut provenance = None;
    for (referrer, bytes) in envelopes {
        let (statement, key_id) = verify_envelope(bytes, referrer, &target.digest, trusted)?;
        let predicate_type = statement
            .get("predicateType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if predicate_type == SLSA_PREDICATE_TYPE && provenance.is_none() {
            provenance = Some(ProvenanceSummary::of(&statement));
        }
        attestations.push(VerifiedAttestation {
            referrer: referrer.clone(),
            predicate_type,
            key_id,
            components: component_count(&statement),
        });
    }
    let provenance = provenance.ok_or_else(|| VerifyError::NoProvenance {
        reference: reference.to_owned(),
        digest: target.digest.clone(),
    })?;
    if let Some(tagged) = tagged_version
        && !provenance
            .version
            .as_deref()
            .is_some_and(|v| v.starts_with(tagged))
    {
        return Err(VerifyError::VersionMismatch {
            reference: reference.to_owned(),
            digest: target.digest.clone(),
            tagged: tagged.to_owned(),
            attested: provenance.version.clone().unwrap_or_else(|| "none".into()),
        });
    }
    Ok(VerifyReport {
        reference: reference.to_owned(),
        digest: target.digest.clone(),
        verified: true,
        provenance,
        attestations,
    })
}

/// The DSSE envelopes attached to `digest` in `layout`, by referrer.
pub fn layout_envelopes(
    layout: &Layout,
    digest: &str,
) -> Result<Vec<(String, Vec<u8>)>, LayoutError> {
    let mut envelopes = Vec::new();
    for (referrer, manifest) in layout.referrers(digest)? {
        for layer in manifest
            .get("layers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if layer.get("mediaType").and_then(Value::as_str) != Some(DSSE_MEDIA_TYPE) {
                continue;
            }
            if let Some(blob) = layer.get("digest").and_then(Value::as_str) {
                envelopes.push((referrer.clone(), layout.read_blob(blob)?));
            }
        }
    }
    Ok(envelopes)
}

/// Verifies the image `selector` names in an OCI layout (the only image when `None`).
pub fn verify_layout(
    layout: &Layout,
    reference: &str,
    selector: Option<&str>,
    trusted: &[PublicKey],
) -> Result<VerifyReport, VerifyError> {
    let target = layout.resolve(selector)?;
    let envelopes = layout_envelopes(layout, &target.digest)?;
    let tagged = target
        .annotations
        .get(crate::store::ANNOTATION_VERSION)
        .cloned();
    verify_attestations(reference, &target, &envelopes, trusted, tagged.as_deref())
}

/// The version a registry tag claims: bake tags images with the first 12 hex digits of their
/// version, so a tag of 12 to 64 lowercase hex digits is read as `sha256:<prefix>`.
pub fn version_claimed_by_tag(tag: &str) -> Option<String> {
    ((12..=64).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| format!("sha256:{tag}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_version_tags_claim_a_version() {
        assert_eq!(
            version_claimed_by_tag("34c5ae2f0a12").as_deref(),
            Some("sha256:34c5ae2f0a12")
        );
        assert_eq!(version_claimed_by_tag("latest"), None);
        assert_eq!(version_claimed_by_tag("1.2.3"), None);
        assert_eq!(version_claimed_by_tag("34C5AE2F0A12"), None);
    }
}
