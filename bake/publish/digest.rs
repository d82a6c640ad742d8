//! Does an image digest exist in its registry? Checked before any pointer names it.
//!
//! Behind a small trait so publishing logic can be tested without a registry. The real check
//! asks the registry for the manifest by digest: an OCI distribution `HEAD` for registries
//! (anonymous, or with a bearer token the registry hands out anonymously), and ECR's
//! `DescribeImages` for ECR repositories (the AWS credentials already in use).

use std::collections::BTreeSet;

use crate::aws::Aws;

use super::inputs::ImageRef;

/// The manifest media types a digest may name.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum DigestCheckError {
    #[error("failed to ask `{repository}` for manifest {digest}")]
    Http {
        repository: String,
        digest: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry of `{repository}` answered HTTP {status} for manifest {digest}")]
    Status {
        repository: String,
        digest: String,
        status: u16,
    },
    #[error("failed to look up {digest} in ECR repository `{repository}`")]
    Ecr {
        repository: String,
        digest: String,
        #[source]
        source: Box<aws_sdk_ecr::Error>,
    },
}

/// Answers whether a digest exists in its repository.
pub trait DigestCheck {
    fn exists(
        &self,
        image: &ImageRef,
    ) -> impl std::future::Future<Output = Result<bool, DigestCheckError>>;
}

/// The real check: the OCI distribution API, or ECR for ECR repositories.
pub struct RegistryDigestCheck<'a> {
    http: reqwest::Client,
    /// Registry hosts reached over plain HTTP (the recipe's `insecure: true` registries).
    insecure_hosts: BTreeSet<String>,
    aws: &'a Aws,
}

impl<'a> RegistryDigestCheck<'a> {
    pub fn new(aws: &'a Aws, insecure_hosts: BTreeSet<String>) -> Self {
        RegistryDigestCheck {
            http: reqwest::Client::new(),
            insecure_hosts,
            aws,
        }
    }

    async fn head(&self, image: &ImageRef) -> Result<bool, DigestCheckError> {
        let (host, name) = image
            .repository
            .split_once('/')
            .unwrap_or(("registry-1.docker.io", &image.repository));
        let local = host.starts_with("127.0.0.1") || host.starts_with("localhost");
        let scheme = if local || self.insecure_hosts.contains(host) {
            "http"
        } else {
            "https"
        };
        let url = format!("{scheme}://{host}/v2/{name}/manifests/{}", image.digest);
        let http_error = |source| DigestCheckError::Http {
            repository: image.repository.clone(),
            digest: image.digest.clone(),
            source,
        };
        let response = self
            .http
            .head(&url)
            .header("accept", MANIFEST_ACCEPT)
            .send()
            .await
            .map_err(http_error)?;
        let response = if response.status() == 401 {
            // Registries that issue anonymous pull tokens say where in the challenge.
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            match bearer_token(&self.http, &challenge).await {
                Some(token) => self
                    .http
                    .head(&url)
                    .header("accept", MANIFEST_ACCEPT)
                    .bearer_auth(token)
                    .send()
                    .await
                    .map_err(http_error)?,
                None => response,
            }
        } else {
            response
        };
        match response.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            status => Err(DigestCheckError::Status {
                repository: image.repository.clone(),
                digest: image.digest.clone(),
                status,
            }),
        }
    }

    async fn ecr(
        &self,
        image: &ImageRef,
        region: &str,
        name: &str,
    ) -> Result<bool, DigestCheckError> {
        let client = super::clients::ecr(self.aws, region);
        let result = client
            .describe_images()
            .repository_name(name)
            .image_ids(
                aws_sdk_ecr::types::ImageIdentifier::builder()
                    .image_digest(&image.digest)
                    .build(),
            )
            .send()
            .await;
        match result {
            Ok(found) => Ok(!found.image_details().is_empty()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_image_not_found_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(DigestCheckError::Ecr {
                repository: image.repository.clone(),
                digest: image.digest.clone(),
                source: Box::new(aws_sdk_ecr::Error::from(e)),
            }),
        }
    }
}

impl DigestCheck for RegistryDigestCheck<'_> {
    async fn exists(&self, image: &ImageRef) -> Result<bool, DigestCheckError> {
        match ecr_repository(&image.repository) {
            Some((region, name)) => self.ecr(image, &region, &name).await,
            None => self.head(image).await,
        }
    }
}

/// `ACCOUNT.dkr.ecr.REGION.amazonaws.com/NAME` → (region, name).
pub fn ecr_repository(repository: &str) -> Option<(String, String)> {
    let (host, name) = repository.split_once('/')?;
    let mut parts = host.split('.');
    let account = parts.next()?;
    let (dkr, ecr, region) = (parts.next()?, parts.next()?, parts.next()?);
    let rest: Vec<&str> = parts.collect();
    (account.len() == 12
        && account.bytes().all(|b| b.is_ascii_digit())
        && dkr == "dkr"
        && ecr == "ecr"
        && (rest == ["amazonaws", "com"] || rest == ["amazonaws", "com", "cn"]))
    .then(|| (region.to_owned(), name.to_owned()))
}

/// Fetches an anonymous token for a `Bearer realm=…,service=…,scope=…` challenge.
async fn bearer_token(http: &reqwest::Client, challenge: &str) -> Option<String> {
    let params = challenge.strip_prefix("Bearer ")?;
    let mut realm = None;
    let mut query = Vec::new();
    for part in params.split(',') {
        let (key, value) = part.trim().split_once('=')?;
        let value = value.trim_matches('"').to_owned();
        if key == "realm" {
            realm = Some(value);
        } else {
            query.push((key.to_owned(), value));
        }
    }
    let mut url = reqwest::Url::parse(&realm?).ok()?;
    url.query_pairs_mut().extend_pairs(query);
    let response = http.get(url).send().await.ok()?;
    let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.ok()?).ok()?;
    body.get("token")
        .or_else(|| body.get("access_token"))
        .and_then(|t| t.as_str())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::ecr_repository;

    #[test]
    fn ecr_repositories_are_recognised() {
        assert_eq!(
            ecr_repository("123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/web"),
            Some(("eu-west-1".into(), "team/web".into()))
        );
        assert_eq!(ecr_repository("127.0.0.1:5000/web"), None);
        assert_eq!(
            ecr_repository("1234.dkr.ecr.eu-west-1.amazonaws.com/web"),
            None
        );
    }
}
