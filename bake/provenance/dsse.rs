//! DSSE (Dead Simple Signing Envelope) v1: the pre-authentication encoding, envelopes, signing
//! and verification.
//!
//! A signature covers `PAE(payloadType, payload)`, never the JSON of the envelope, so an
//! envelope needs no canonical form; verification checks the signature over the exact decoded
//! payload bytes and only then hands those same bytes to a parser ([`Verified::payload`]).

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use serde::{Deserialize, Serialize};

use super::keys::{PublicKey, SignError, Signer};

/// The payload type of an in-toto statement.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + payload_type.len() + body.len());
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out
}

/// A DSSE envelope as it is stored and transmitted. Unknown fields are ignored, as the spec asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Base64 of the serialized body.
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    /// An unauthenticated hint naming the key; never trusted, only used to pick keys to try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyid: Option<String>,
    /// Base64 of the signature.
    pub sig: String,
}

/// Why an envelope did not verify.
#[derive(Debug, thiserror::Error)]
pub enum DsseError {
    #[error("the envelope is not valid DSSE JSON")]
    Json(#[source] serde_json::Error),
    #[error("the envelope's {field} is not base64")]
    Base64 {
        field: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("the envelope has no signatures")]
    Unsigned,
    #[error("the envelope's payload type is `{actual}`, not `{expected}`")]
    PayloadType { expected: String, actual: String },
    #[error(
        "the signature by trusted key {key_id} does not match the payload: the attestation was modified after it was signed"
    )]
    BadSignature { key_id: String },
    #[error(
        "the envelope is signed by {}, which is not a trusted key (trusted: {})",
        signed_by.join(", "),
        trusted.join(", ")
    )]
    UntrustedKey {
        signed_by: Vec<String>,
        trusted: Vec<String>,
    },
    #[error("no trusted key was given to verify the envelope with")]
    NoTrustedKeys,
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// A payload whose signature verified, and the key that signed it.
#[derive(Debug, Clone)]
pub struct Verified {
    pub payload: Vec<u8>,
    pub payload_type: String,
    pub key_id: String,
}

/// Decodes standard or URL-safe base64, padded or not (the spec requires accepting either).
pub fn decode_base64(field: &'static str, text: &str) -> Result<Vec<u8>, DsseError> {
    let trimmed = text.trim_end_matches('=');
    let padded = format!("{trimmed}{}", "=".repeat((4 - trimmed.len() % 4) % 4));
    STANDARD
        .decode(&padded)
        .or_else(|_| URL_SAFE.decode(&padded))
        .map_err(|source| DsseError::Base64 { field, source })
}

impl Envelope {
    /// Signs `payload` with `signer`.
    pub async fn sign(
        payload_type: &str,
        payload: &[u8],
        signer: &dyn Signer,
    ) -> Result<Envelope, DsseError> {
        let sig = signer.sign(&pae(payload_type, payload)).await?;
        Ok(Envelope {
            payload: STANDARD.encode(payload),
            payload_type: payload_type.to_owned(),
            signatures: vec![EnvelopeSignature {
                keyid: Some(signer.public_key().key_id()),
                sig: STANDARD.encode(sig),
            }],
        })
    }

    pub fn from_json(bytes: &[u8]) -> Result<Envelope, DsseError> {
        serde_json::from_slice(bytes).map_err(DsseError::Json)
    }

    /// The envelope's JSON bytes (compact, fields in a fixed order).
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("envelopes serialize")
    }

    /// Verifies that at least one signature is by one of `trusted` over this payload, and
    /// returns the payload. The payload type must be `expected_type`.
    pub fn verify(
        &self,
        expected_type: &str,
        trusted: &[PublicKey],
    ) -> Result<Verified, DsseError> {
        if trusted.is_empty() {
            return Err(DsseError::NoTrustedKeys);
        }
        if self.signatures.is_empty() {
            return Err(DsseError::Unsigned);
        }
        let payload = decode_base64("payload", &self.payload)?;
        let message = pae(&self.payload_type, &payload);
        let mut bad_by_trusted = None;
        for signature in &self.signatures {
            let sig = decode_base64("signature", &signature.sig)?;
            // The key id only narrows which keys to try first; every trusted key is tried.
            let mut keys: Vec<&PublicKey> = trusted.iter().collect();
            keys.sort_by_key(|k| Some(k.key_id()) != signature.keyid);
            for key in keys {
                if key.verify(&message, &sig) {
                    if self.payload_type != expected_type {
                        return Err(DsseError::PayloadType {
                            expected: expected_type.to_owned(),
                            actual: self.payload_type.clone(),
                        });
                    }
                    return Ok(Verified {
                        payload,
                        payload_type: self.payload_type.clone(),
                        key_id: key.key_id(),
                    });
                }
                if Some(key.key_id()) == signature.keyid {
                    bad_by_trusted = Some(key.key_id());
                }
            }
        }
        if let Some(key_id) = bad_by_trusted {
            return Err(DsseError::BadSignature { key_id });
        }
        Err(DsseError::UntrustedKey {
            signed_by: self
                .signatures
                .iter()
                .map(|s| s.keyid.clone().unwrap_or_else(|| "an unnamed key".into()))
                .collect(),
            trusted: trusted.iter().map(PublicKey::key_id).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provenance::keys::{KeyAlgorithm, LocalKey};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn pae_matches_the_spec() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    /// The test vector of the DSSE protocol (protocol.md): ECDSA P-256, SHA-256, RFC 6979,
    /// the raw r||s signature.
    #[test]
    fn the_dsse_spec_test_vector_reproduces() {
        use p256::ecdsa::signature::Signer as _;
        let d = hex::decode("d73ec437fd6346e3619c5ebfdfff0f6916804955ad32ac9ac492b0ede1f6ffb7")
            .unwrap();
        let key = p256::ecdsa::SigningKey::from_slice(&d).unwrap();
        let message = pae("http://example.com/HelloWorld", b"hello world");
        let signature: p256::ecdsa::Signature = key.sign(&message);
        assert_eq!(
            STANDARD.encode(signature.to_bytes()),
            "A3JqsQGtVsJ2O2xqrI5IcnXip5GToJ3F+FnZ+O88SjtR6rDAajabZKciJTfUiHqJPcIAriEGAHTVeCUjW2JIZA=="
        );
        // And bake's verifier accepts the spec's envelope, raw r||s signature and all.
        let envelope = Envelope::from_json(br#"{"payload": "aGVsbG8gd29ybGQ=",
 "payloadType": "http://example.com/HelloWorld",
 "signatures": [{"sig": "A3JqsQGtVsJ2O2xqrI5IcnXip5GToJ3F+FnZ+O88SjtR6rDAajabZKciJTfUiHqJPcIAriEGAHTVeCUjW2JIZA=="}]}"#).unwrap();
        let public = PublicKey::P256(*key.verifying_key());
        let verified = envelope
            .verify("http://example.com/HelloWorld", &[public])
            .unwrap();
        assert_eq!(verified.payload, b"hello world");
    }

    #[test]
    fn signed_envelopes_verify_and_tampering_is_named() {
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256] {
            let key = LocalKey::generate(algorithm).unwrap();
            let other = LocalKey::generate(algorithm).unwrap();
            let envelope =
                block_on(Envelope::sign(IN_TOTO_PAYLOAD_TYPE, b"{\"a\":1}", &key)).unwrap();
            let verified = envelope
                .verify(IN_TOTO_PAYLOAD_TYPE, &[key.public_key().clone()])
                .unwrap();
            assert_eq!(verified.payload, b"{\"a\":1}");

            let mut changed = envelope.clone();
            changed.payload = STANDARD.encode(b"{\"a\":2}");
            let error = changed
                .verify(IN_TOTO_PAYLOAD_TYPE, &[key.public_key().clone()])
                .unwrap_err();
            assert!(matches!(error, DsseError::BadSignature { .. }), "{error}");

            let error = envelope
                .verify(IN_TOTO_PAYLOAD_TYPE, &[other.public_key().clone()])
                .unwrap_err();
            assert!(matches!(error, DsseError::UntrustedKey { .. }), "{error}");
            assert!(error.to_string().contains("not a trusted key"));

            // The payload type is authenticated too.
            let mut retyped = envelope.clone();
            retyped.payload_type = "text/plain".into();
            assert!(
                retyped
                    .verify("text/plain", &[key.public_key().clone()])
                    .is_err()
            );
        }
    }

    #[test]
    fn url_safe_and_unpadded_base64_are_accepted() {
        assert_eq!(
            decode_base64("payload", "aGVsbG8gd29ybGQ").unwrap(),
            b"hello world"
        );
        assert_eq!(decode_base64("payload", "_-8=").unwrap(), [0xff, 0xef]);
        assert!(decode_base64("payload", "not base64!").is_err());
    }

    #[test]
    fn envelopes_without_signatures_or_with_garbage_fail() {
        let key = LocalKey::generate(KeyAlgorithm::Ed25519).unwrap();
        let unsigned = Envelope {
            payload: STANDARD.encode(b"x"),
            payload_type: IN_TOTO_PAYLOAD_TYPE.into(),
            signatures: vec![],
        };
        assert!(matches!(
            unsigned.verify(IN_TOTO_PAYLOAD_TYPE, &[key.public_key().clone()]),
            Err(DsseError::Unsigned)
        ));
        assert!(Envelope::from_json(b"{\"payload\": 1}").is_err());
    }
}
