//! Amazon ECR: registry credentials from `GetAuthorizationToken`, and repositories that exist
//! with the settings the recipe asks for before the first push.
//!
//! ECR's registry answers the `/v2/` probe with a `Basic` challenge and wants
//! `Authorization: Basic <authorizationToken>` (the token is already base64 of `AWS:<password>`),
//! so [`EcrCredentials`] is a [`Credentials`] source like any other: the client's challenge
//! logic does the rest. Tokens are cached per registry host until shortly before `expiresAt`;
//! a token the registry refuses is dropped and fetched again.
//!
//! [`ensure_repository`] looks before it creates: an existing repository whose settings differ
//! from the recipe's is reported, never changed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use aws_sdk_ecr::types::{
    EncryptionConfiguration, EncryptionType, ImageScanningConfiguration, ImageTagMutability,
};
use serde::Serialize;

use super::auth::{AuthError, BoxFuture, Credential, Credentials};
use crate::aws::Aws;

/// A token is renewed this long before ECR says it expires (tokens last 12 hours; a push that
/// starts with a nearly expired token should not fail half way).
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum EcrError {
    #[error("failed to look up ECR repository `{repository}` in {region}")]
    Describe {
        repository: String,
        region: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("failed to create ECR repository `{repository}` in {region}")]
    Create {
        repository: String,
        region: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("ECR repository `{repository}` does not exist in {region}")]
    Missing { repository: String, region: String },
    #[error("ECR did not return a URI for repository `{repository}` in {region}")]
    NoUri { repository: String, region: String },
}

impl EcrError {
    pub fn hint(&self) -> Option<String> {
        match self {
            EcrError::Missing { .. } => Some(
                "create it, or set `create: true` on the recipe's ECR target so bake creates it"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// How a repository should be encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EcrEncryption {
    /// ECR's default, AES-256 with an AWS-owned key.
    Aes256,
    /// KMS, with this key (or the AWS-managed `aws/ecr` key).
    Kms(Option<String>),
}

/// The settings bake wants a repository to have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepositorySettings {
    pub immutable_tags: bool,
    pub scan_on_push: bool,
    pub encryption: EcrEncryption,
    /// Create the repository if it is missing (else a missing repository is an error).
    pub create: bool,
}

/// What [`ensure_repository`] found or did.
#[derive(Debug, Clone, Serialize)]
pub struct EnsuredRepository {
    pub name: String,
    pub region: String,
    /// `<account>.dkr.ecr.<region>.amazonaws.com/<name>`.
    pub uri: String,
    pub created: bool,
    /// How the existing repository differs from the settings asked for (not changed).
    pub differences: Vec<String>,
}

/// Makes sure repository `name` exists: creates it with `settings` when missing (if allowed),
/// else compares and reports differences.
pub async fn ensure_repository(
    ecr: &aws_sdk_ecr::Client,
    region: &str,
    name: &str,
    settings: &RepositorySettings,
) -> Result<EnsuredRepository, EcrError> {
    let described = ecr
        .describe_repositories()
        .repository_names(name)
        .send()
        .await;
    match described {
        Ok(answer) => {
            let repository = answer
                .repositories()
                .first()
                .ok_or_else(|| EcrError::Missing {
                    repository: name.to_owned(),
                    region: region.to_owned(),
                })?;
            let uri = repository
                .repository_uri()
                .ok_or_else(|| EcrError::NoUri {
                    repository: name.to_owned(),
                    region: region.to_owned(),
                })?
                .to_owned();
            let differences = differences(repository, settings);
            for difference in &differences {
                tracing::warn!(
                    "ECR repository `{name}` in {region} differs from the recipe: {difference} (bake does not change existing repositories)"
                );
            }
            Ok(EnsuredRepository {
                name: name.to_owned(),
                region: region.to_owned(),
                uri,
                created: false,
                differences,
            })
        }
        Err(error)
            if error
                .as_service_error()
                .is_some_and(|e| e.is_repository_not_found_exception()) =>
        {
            if !settings.create {
                return Err(EcrError::Missing {
                    repository: name.to_owned(),
                    region: region.to_owned(),
                });
            }
            let encryption = match &settings.encryption {
                EcrEncryption::Aes256 => EncryptionConfiguration::builder()
                    .encryption_type(EncryptionType::Aes256)
                    .build(),
                EcrEncryption::Kms(key) => EncryptionConfiguration::builder()
                    .encryption_type(EncryptionType::Kms)
                    .set_kms_key(key.clone())
                    .build(),
            }
            .expect("encryption type is set");
            let created = ecr
                .create_repository()
                .repository_name(name)
                .image_tag_mutability(if settings.immutable_tags {
                    ImageTagMutability::Immutable
                } else {
                    ImageTagMutability::Mutable
                })
                .image_scanning_configuration(
                    ImageScanningConfiguration::builder()
                        .scan_on_push(settings.scan_on_push)
                        .build(),
                )
                .encryption_configuration(encryption)
                .send()
                .await
                .map_err(|e| EcrError::Create {
                    repository: name.to_owned(),
                    region: region.to_owned(),
                    source: Box::new(e),
                })?;
            let uri = created
                .repository()
                .and_then(|r| r.repository_uri())
                .ok_or_else(|| EcrError::NoUri {
                    repository: name.to_owned(),
                    region: region.to_owned(),
                })?
                .to_owned();
            tracing::info!("created ECR repository `{name}` in {region}");
            Ok(EnsuredRepository {
                name: name.to_owned(),
                region: region.to_owned(),
                uri,
                created: true,
                differences: Vec::new(),
            })
        }
        Err(error) => Err(EcrError::Describe {
            repository: name.to_owned(),
            region: region.to_owned(),
            source: Box::new(error),
        }),
    }
}

fn differences(
    repository: &aws_sdk_ecr::types::Repository,
    settings: &RepositorySettings,
) -> Vec<String> {
    let mut out = Vec::new();
    let immutable = matches!(
        repository.image_tag_mutability(),
        Some(ImageTagMutability::Immutable | ImageTagMutability::ImmutableWithExclusion)
    );
    if immutable != settings.immutable_tags {
        out.push(format!(
            "tag immutability is {}, the recipe asks for {}",
            on_off(immutable),
            on_off(settings.immutable_tags)
        ));
    }
    let scan = repository
        .image_scanning_configuration()
        .is_some_and(|c| c.scan_on_push());
    if scan != settings.scan_on_push {
        out.push(format!(
            "scan on push is {}, the recipe asks for {}",
            on_off(scan),
            on_off(settings.scan_on_push)
        ));
    }
    let encryption = repository.encryption_configuration();
    let actual = match encryption.map(|e| e.encryption_type()) {
        Some(EncryptionType::Kms | EncryptionType::KmsDsse) => {
            EcrEncryption::Kms(encryption.and_then(|e| e.kms_key()).map(str::to_owned))
        }
        _ => EcrEncryption::Aes256,
    };
    let matches = match (&actual, &settings.encryption) {
        // No key asked for: any KMS key will do.
        (EcrEncryption::Kms(_), EcrEncryption::Kms(None)) => true,
        (a, b) => a == b,
    };
    if !matches {
        out.push(format!(
            "encryption is {}, the recipe asks for {}",
            describe(&actual),
            describe(&settings.encryption)
        ));
    }
    out
}

fn on_off(value: bool) -> &'static str {
    if value { "on" } else { "off" }
}

fn describe(encryption: &EcrEncryption) -> String {
    match encryption {
        EcrEncryption::Aes256 => "AES256".into(),
        EcrEncryption::Kms(None) => "KMS".into(),
        EcrEncryption::Kms(Some(key)) => format!("KMS with key {key}"),
    }
}

/// The region of an ECR registry host (`<account>.dkr.ecr.<region>.amazonaws.com[.cn]`).
pub fn ecr_region(host: &str) -> Option<&str> {
    let host = host.split(':').next()?;
    let rest = host
        .strip_suffix(".amazonaws.com")
        .or_else(|| host.strip_suffix(".amazonaws.com.cn"))?;
    let mut parts = rest.split('.');
    let account = parts.next()?;
    let (dkr, ecr) = (parts.next()?, parts.next()?);
    let region = parts.next()?;
    (account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && dkr == "dkr"
        && ecr.starts_with("ecr")
        && parts.next().is_none())
    .then_some(region)
}

/// The registry host of `account` in `region`.
pub fn registry_host(account: &str, region: &str) -> String {
    format!("{account}.dkr.ecr.{region}.amazonaws.com")
}

/// Credentials for ECR registry hosts, from `GetAuthorizationToken` in the host's region.
pub struct EcrCredentials {
    aws: Aws,
    cache: Mutex<HashMap<String, (Credential, SystemTime)>>,
    calls: AtomicU64,
}

impl std::fmt::Debug for EcrCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcrCredentials")
            .field("calls", &self.calls)
            .finish_non_exhaustive()
    }
}

impl EcrCredentials {
    pub fn new(aws: Aws) -> Self {
        EcrCredentials {
            aws,
            cache: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
        }
    }

    /// How many tokens were fetched.
    pub fn token_requests(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    async fn fetch(&self, host: &str, region: &str) -> Result<Option<Credential>, AuthError> {
        let now = SystemTime::now();
        if let Some((credential, renew_at)) = self.cache.lock().expect("ecr cache lock").get(host)
            && *renew_at > now
        {
            return Ok(Some(credential.clone()));
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let answer = self
            .aws
            .ecr(region)
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| AuthError::Ecr {
                region: region.to_owned(),
                source: Box::new(e),
            })?;
        let data = answer
            .authorization_data()
            .first()
            .ok_or_else(|| AuthError::EcrToken {
                host: host.to_owned(),
            })?;
        let credential = data
            .authorization_token()
            .and_then(Credential::from_basic_token)
            .ok_or_else(|| AuthError::EcrToken {
                host: host.to_owned(),
            })?;
        let expires = data
            .expires_at()
            .and_then(|t| SystemTime::try_from(*t).ok())
            .unwrap_or(now);
        let renew_at = expires
            .checked_sub(REFRESH_MARGIN)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        if renew_at > now {
            self.cache
                .lock()
                .expect("ecr cache lock")
                .insert(host.to_owned(), (credential.clone(), renew_at));
        } else {
            // Already (nearly) expired on arrival, or the clocks disagree: use it for this
            // request and ask again next time.
            tracing::debug!("ECR token for {host} expires at once; not caching it");
            self.cache.lock().expect("ecr cache lock").remove(host);
        }
        Ok(Some(credential))
    }
}

impl Credentials for EcrCredentials {
    fn get<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Option<Credential>, AuthError>> {
        Box::pin(async move {
            match ecr_region(host) {
                Some(region) => self.fetch(host, region).await,
                None => Ok(None),
            }
        })
    }

    fn invalidate(&self, host: &str) {
        self.cache.lock().expect("ecr cache lock").remove(host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_hosts() {
        assert_eq!(
            ecr_region("123456789012.dkr.ecr.eu-west-1.amazonaws.com"),
            Some("eu-west-1")
        );
        assert_eq!(
            ecr_region("123456789012.dkr.ecr-fips.us-east-1.amazonaws.com"),
            Some("us-east-1")
        );
        assert_eq!(ecr_region("registry.example.com"), None);
        assert_eq!(ecr_region("12345.dkr.ecr.eu-west-1.amazonaws.com"), None);
        assert_eq!(
            registry_host("123456789012", "us-east-1"),
            "123456789012.dkr.ecr.us-east-1.amazonaws.com"
        );
    }
}
