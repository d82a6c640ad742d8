//! Signing keys: keys bake generates and keeps (ed25519 or ECDSA P-256, PKCS#8 PEM), public keys
//! to verify with, and AWS KMS asymmetric keys that sign with `kms:Sign`.
//!
//! Signers sit behind [`Signer`], so provenance is signed the same way whether the key is a file
//! or lives in KMS. ECDSA signatures are ASN.1 DER (what cosign, securesystemslib and KMS use);
//! verification also accepts the raw `r||s` form that the DSSE spec's test vector uses.
//!
//! A key id is the lowercase hex SHA-256 of the public key's SubjectPublicKeyInfo DER, so the
//! same key has the same id whether it was loaded from a PEM file or fetched from KMS.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use sha2::{Digest as _, Sha256};

/// Where `bake key generate` keeps keys inside the store.
pub const STORE_KEY_DIR: &str = "keys";
/// The key a build signs with when neither the recipe nor the command line names one.
pub const DEFAULT_KEY_NAME: &str = "default";

/// The signature algorithms bake can generate keys for.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAlgorithm {
    /// Ed25519 (RFC 8032).
    Ed25519,
    /// ECDSA over NIST P-256 with SHA-256 (what cosign and KMS `ECC_NIST_P256` use).
    EcdsaP256,
}

impl KeyAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::Ed25519 => "ed25519",
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to read key `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write key `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` already exists; pass --force to replace it", path.display())]
    Exists { path: PathBuf },
    #[error(
        "`{}` is not a PKCS#8 PEM ed25519 or ECDSA P-256 {what} key",
        path.display()
    )]
    Format { path: PathBuf, what: &'static str },
    #[error("the public key from {origin} is not an ed25519 or ECDSA P-256 key")]
    PublicKeyFormat { origin: String },
    #[error("failed to read random bytes from /dev/urandom")]
    Random(#[source] std::io::Error),
    #[error(
        "KMS key `{key_id}` cannot sign DSSE envelopes: it is {spec} for {usage}, and bake needs an ECC_NIST_P256 key for SIGN_VERIFY"
    )]
    KmsKeySpec {
        key_id: String,
        spec: String,
        usage: String,
    },
    #[error("failed to fetch the public key of KMS key `{key_id}`")]
    KmsPublicKey {
        key_id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("KMS key `{key_id}` failed to sign")]
    Kms {
        key_id: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("KMS key `{key_id}` returned no signature")]
    KmsEmpty { key_id: String },
}

/// A public key that verifies signatures.
#[derive(Clone, PartialEq, Eq)]
pub enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} key {}", self.algorithm().name(), self.key_id())
    }
}

impl PublicKey {
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self {
            PublicKey::Ed25519(_) => KeyAlgorithm::Ed25519,
            PublicKey::P256(_) => KeyAlgorithm::EcdsaP256,
        }
    }

    /// Parses a SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`).
    pub fn from_pem(text: &str, origin: &str) -> Result<PublicKey, KeyError> {
        if let Ok(key) = ed25519_dalek::VerifyingKey::from_public_key_pem(text) {
            return Ok(PublicKey::Ed25519(key));
        }
        p256::ecdsa::VerifyingKey::from_public_key_pem(text)
            .map(PublicKey::P256)
            .map_err(|_| KeyError::PublicKeyFormat {
                origin: origin.to_owned(),
            })
    }

    /// Parses a SubjectPublicKeyInfo DER (what KMS `GetPublicKey` returns).
    pub fn from_der(der: &[u8], origin: &str) -> Result<PublicKey, KeyError> {
        if let Ok(key) = ed25519_dalek::VerifyingKey::from_public_key_der(der) {
            return Ok(PublicKey::Ed25519(key));
        }
        p256::ecdsa::VerifyingKey::from_public_key_der(der)
            .map(PublicKey::P256)
            .map_err(|_| KeyError::PublicKeyFormat {
                origin: origin.to_owned(),
            })
    }

    /// Reads a public key PEM file.
    pub fn read(path: &Path) -> Result<PublicKey, KeyError> {
        let text = fs_err::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        PublicKey::from_pem(&text, &format!("`{}`", path.display())).map_err(|_| KeyError::Format {
            path: path.to_path_buf(),
            what: "public",
        })
    }

    pub fn to_der(&self) -> Vec<u8> {
        match self {
            PublicKey::Ed25519(k) => k.to_public_key_der(),
            PublicKey::P256(k) => k.to_public_key_der(),
        }
        .expect("public keys encode")
        .into_vec()
    }

    pub fn to_pem(&self) -> String {
        let line = p256::pkcs8::LineEnding::LF;
        match self {
            PublicKey::Ed25519(k) => k.to_public_key_pem(line),
            PublicKey::P256(k) => k.to_public_key_pem(line),
        }
        .expect("public keys encode")
    }

    /// Lowercase hex SHA-256 of the SubjectPublicKeyInfo DER.
    pub fn key_id(&self) -> String {
        hex::encode(Sha256::digest(self.to_der()))
    }

    /// Whether `signature` is this key's signature of `message`. ECDSA signatures may be DER or
    /// raw `r||s`; high-S forms (which other signers may produce) are accepted.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            PublicKey::Ed25519(key) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|sig| key.verify_strict(message, &sig).is_ok()),
            PublicKey::P256(key) => {
                use p256::ecdsa::signature::Verifier as _;
                let parsed = p256::ecdsa::Signature::from_der(signature)
                    .or_else(|_| p256::ecdsa::Signature::from_slice(signature));
                parsed.is_ok_and(|sig| key.verify(message, &sig.normalize_s()).is_ok())
            }
        }
    }
}

/// The boxed future a [`Signer`] returns.
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, SignError>> + Send + 'a>>;

/// Something that signs bytes: a local key or a KMS key.
pub trait Signer: Send + Sync {
    fn public_key(&self) -> &PublicKey;
    /// How the manifest names the key: `file:<path>` or `kms:<key id or ARN>`.
    fn reference(&self) -> String;
    /// Signs `message` (the DSSE PAE bytes).
    fn sign<'a>(&'a self, message: &'a [u8]) -> SignFuture<'a>;
}

enum Secret {
    Ed25519(ed25519_dalek::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

/// A private key held by bake (generated by `bake key generate`).
pub struct LocalKey {
    secret: Secret,
    public: PublicKey,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for LocalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("LocalKey")
            .field("public", &self.public)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    use std::io::Read as _;
    let mut bytes = [0u8; N];
    fs_err::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(KeyError::Random)?;
    Ok(bytes)
}

impl LocalKey {
    /// A fresh key from the operating system's random source.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<LocalKey, KeyError> {
        let secret = match algorithm {
            KeyAlgorithm::Ed25519 => {
                Secret::Ed25519(ed25519_dalek::SigningKey::from_bytes(&random_bytes()?))
            }
            KeyAlgorithm::EcdsaP256 => loop {
                // A 32-byte string is a valid scalar except with probability ~2^-32.
                if let Ok(key) = p256::ecdsa::SigningKey::from_slice(&random_bytes::<32>()?) {
                    break Secret::P256(key);
                }
            },
        };
        Ok(LocalKey::from_secret(secret, None))
    }

    fn from_secret(secret: Secret, path: Option<PathBuf>) -> LocalKey {
        let public = match &secret {
            Secret::Ed25519(k) => PublicKey::Ed25519(k.verifying_key()),
            Secret::P256(k) => PublicKey::P256(*k.verifying_key()),
        };
        LocalKey {
            secret,
            public,
            path,
        }
    }

    /// Reads a PKCS#8 PEM private key.
    pub fn read(path: &Path) -> Result<LocalKey, KeyError> {
        let text = fs_err::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let secret = if let Ok(key) = ed25519_dalek::SigningKey::from_pkcs8_pem(&text) {
            Secret::Ed25519(key)
        } else if let Ok(key) = p256::ecdsa::SigningKey::from_pkcs8_pem(&text) {
            Secret::P256(key)
        } else {
            return Err(KeyError::Format {
                path: path.to_path_buf(),
                what: "private",
            });
        };
        Ok(LocalKey::from_secret(secret, Some(path.to_path_buf())))
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.public.algorithm()
    }

    /// Writes the private key (mode 0600) to `path` and the public key beside it
    /// (`<path>.pub`, or `<stem>.pub` for `<stem>.key`); refuses to replace either unless
    /// `force`. Returns the public key's path.
    pub fn write(&mut self, path: &Path, force: bool) -> Result<PathBuf, KeyError> {
        let public_path = public_path_for(path);
        for p in [path, public_path.as_path()] {
            if !force && p.exists() {
                return Err(KeyError::Exists {
                    path: p.to_path_buf(),
                });
            }
        }
        let line = p256::pkcs8::LineEnding::LF;
        let pem = match &self.secret {
            Secret::Ed25519(k) => k.to_pkcs8_pem(line),
            Secret::P256(k) => k.to_pkcs8_pem(line),
        }
        .expect("private keys encode");
        write_private(path, pem.as_bytes())?;
        write_file(&public_path, self.public.to_pem().as_bytes(), 0o644)?;
        self.path = Some(path.to_path_buf());
        Ok(public_path)
    }
}

/// The public key file that goes with private key `path`.
pub fn public_path_for(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "key") {
        path.with_extension("pub")
    } else {
        let mut name = path.as_os_str().to_owned();
        name.push(".pub");
        PathBuf::from(name)
    }
}

/// The private key file of store key `name`.
pub fn store_key_path(store_root: &Path, name: &str) -> PathBuf {
    store_root.join(STORE_KEY_DIR).join(format!("{name}.key"))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeyError> {
    write_file(path, bytes, 0o600)
}

/// Writes atomically (temp file in the same directory, fsync, rename) with `mode`, so a key
/// file is never seen half written or, for a private key, ever readable by others.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    let err = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs_err::create_dir_all(&dir).map_err(err)?;
    let mut file = tempfile::NamedTempFile::new_in(&dir).map_err(err)?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.as_file().sync_all().map_err(err)?;
    file.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

impl Signer for LocalKey {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn reference(&self) -> String {
        match &self.path {
            Some(path) => format!("file:{}", path.display()),
            None => "file:(in memory)".into(),
        }
    }

    fn sign<'a>(&'a self, message: &'a [u8]) -> SignFuture<'a> {
        let signature = match &self.secret {
            Secret::Ed25519(key) => {
                use ed25519_dalek::Signer as _;
                key.sign(message).to_bytes().to_vec()
            }
            Secret::P256(key) => {
                use p256::ecdsa::signature::Signer as _;
                let sig: p256::ecdsa::Signature = key.sign(message);
                sig.to_der().to_bytes().to_vec()
            }
        };
        Box::pin(std::future::ready(Ok(signature)))
    }
}

/// The largest message KMS `Sign` accepts as `RAW` (bytes).
pub const KMS_RAW_MESSAGE_LIMIT: usize = 4096;

/// An AWS KMS asymmetric key (`ECC_NIST_P256`, `SIGN_VERIFY`) that signs with `kms:Sign`
/// (`ECDSA_SHA_256`; messages over [`KMS_RAW_MESSAGE_LIMIT`] are sent as their SHA-256 digest).
pub struct KmsSigner {
    client: aws_sdk_kms::Client,
    key_id: String,
    public: PublicKey,
}

impl std::fmt::Debug for KmsSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsSigner")
            .field("key_id", &self.key_id)
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl KmsSigner {
    /// Fetches the key's public key and checks that it can sign.
    pub async fn new(client: aws_sdk_kms::Client, key_id: &str) -> Result<KmsSigner, KeyError> {
        let response = client
            .get_public_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| KeyError::KmsPublicKey {
                key_id: key_id.to_owned(),
                source: sdk_error(e),
            })?;
        let spec = response
            .key_spec()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        let usage = response
            .key_usage()
            .map(|u| u.as_str().to_owned())
            .unwrap_or_default();
        let der = response
            .public_key()
            .map(|b| b.as_ref())
            .unwrap_or_default();
        // The key itself is the authority on its curve (emulators may leave KeySpec out).
        let public = PublicKey::from_der(der, &format!("KMS key `{key_id}`")).ok();
        let signs = usage.is_empty() || usage == "SIGN_VERIFY";
        let Some(public @ PublicKey::P256(_)) = public.filter(|_| signs) else {
            return Err(KeyError::KmsKeySpec {
                key_id: key_id.to_owned(),
                spec: if spec.is_empty() {
                    "not an ECC_NIST_P256 key".into()
                } else {
                    spec
                },
                usage: if usage.is_empty() {
                    "an unknown usage".into()
                } else {
                    usage
                },
            });
        };
        Ok(KmsSigner {
            client,
            key_id: key_id.to_owned(),
            public,
        })
    }
}

/// An SDK error as a boxed error, rendered with its whole context (service code and message).
fn sdk_error<E: std::error::Error>(error: E) -> Box<dyn std::error::Error + Send + Sync> {
    aws_sdk_kms::error::DisplayErrorContext(&error)
        .to_string()
        .into()
}

impl Signer for KmsSigner {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn reference(&self) -> String {
        format!("kms:{}", self.key_id)
    }

    fn sign<'a>(&'a self, message: &'a [u8]) -> SignFuture<'a> {
        Box::pin(async move {
            // KMS hashes a RAW message itself (up to 4 KiB); anything longer goes as its SHA-256
            // DIGEST. Both yield ECDSA-SHA256 over the same hash.
            let (body, message_type) = if message.len() <= KMS_RAW_MESSAGE_LIMIT {
                (message.to_vec(), aws_sdk_kms::types::MessageType::Raw)
            } else {
                (
                    Sha256::digest(message).to_vec(),
                    aws_sdk_kms::types::MessageType::Digest,
                )
            };
            let response = self
                .client
                .sign()
                .key_id(&self.key_id)
                .message(aws_sdk_kms::primitives::Blob::new(body))
                .message_type(message_type)
                .signing_algorithm(aws_sdk_kms::types::SigningAlgorithmSpec::EcdsaSha256)
                .send()
                .await
                .map_err(|e| SignError::Kms {
                    key_id: self.key_id.clone(),
                    source: sdk_error(e),
                })?;
            response
                .signature()
                .map(|b| b.as_ref().to_vec())
                .ok_or_else(|| SignError::KmsEmpty {
                    key_id: self.key_id.clone(),
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_pem_files_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        for algorithm in [KeyAlgorithm::Ed25519, KeyAlgorithm::EcdsaP256] {
            let path = dir.path().join(format!("{}.key", algorithm.name()));
            let mut key = LocalKey::generate(algorithm).unwrap();
            let public_path = key.write(&path, false).unwrap();
            assert_eq!(public_path, path.with_extension("pub"));
            let mode = fs_err::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let read = LocalKey::read(&path).unwrap();
            assert_eq!(read.public_key(), key.public_key());
            assert_eq!(read.algorithm(), algorithm);
            let public = PublicKey::read(&public_path).unwrap();
            assert_eq!(public.key_id(), key.public_key().key_id());
            assert_eq!(public.key_id().len(), 64);
            // No silent replacement.
            let error = key.write(&path, false).unwrap_err();
            assert!(matches!(error, KeyError::Exists { .. }), "{error}");
            key.write(&path, true).unwrap();
        }
    }

    #[test]
    fn bad_key_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.key");
        fs_err::write(
            &path,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let error = LocalKey::read(&path).unwrap_err();
        assert!(error.to_string().contains("junk.key"), "{error}");
        assert!(PublicKey::read(&path).is_err());
        assert!(matches!(
            LocalKey::read(&dir.path().join("missing.key")),
            Err(KeyError::Read { .. })
        ));
    }

    #[test]
    fn ecdsa_signatures_are_der_and_raw_ones_verify_too() {
        let key = LocalKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let sig = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(key.sign(b"message"))
            .unwrap();
        assert_eq!(sig[0], 0x30, "DER SEQUENCE");
        assert!(key.public_key().verify(b"message", &sig));
        let raw = p256::ecdsa::Signature::from_der(&sig).unwrap().to_bytes();
        assert!(key.public_key().verify(b"message", &raw));
        assert!(!key.public_key().verify(b"other", &sig));
        assert!(!key.public_key().verify(b"message", b"short"));
    }

    #[test]
    fn public_key_paths() {
        assert_eq!(public_path_for(Path::new("a/b.key")), Path::new("a/b.pub"));
        assert_eq!(
            public_path_for(Path::new("a/b.pem")),
            Path::new("a/b.pem.pub")
        );
    }
}
