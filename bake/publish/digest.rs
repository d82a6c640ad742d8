//! Does an image digest exist in its registry? Checked before any pointer names it.
//!
//! Behind a small trait so publishing logic can be tested without a registry. The real check
//! asks the registry for the manifest by digest: a manifest `HEAD` through bake's registry
//! client (its credentials, insecure hosts and retries) for registries, and ECR's
//! `DescribeImages` for ECR repositories (the AWS credentials already in use, which also works
//! where ECR's registry API is not served, such as an emulator).

use crate::aws::Aws;
use crate::registry::{self, Reference};

use super::inputs::ImageRef;

#[derive(Debug, thiserror::Error)]
pub enum DigestCheckError {
    #[error("`{reference}` is not a valid image reference")]
    Reference {
        reference: String,
        #[source]
        source: registry::ReferenceError,
    },
    #[error("failed to ask the registry for `{reference}`")]
    Registry {
        reference: String,
        #[source]
        source: registry::RegistryError,
    },
    #[error("the registry answered `{reference}` with another digest, {answered}")]
    WrongDigest { reference: String, answered: String },
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

/// The real check: the registry client, or ECR's API for ECR repositories.
pub struct RegistryDigestCheck<'a> {
    client: registry::Client,
    aws: &'a Aws,
    /// Registry hosts whose requests go elsewhere (`BAKE_REGISTRY_ENDPOINTS`).
    redirected: std::collections::BTreeSet<String>,
}

impl<'a> RegistryDigestCheck<'a> {
    pub fn new(aws: &'a Aws, client: registry::Client) -> Self {
        RegistryDigestCheck {
            client,
            aws,
            redirected: Default::default(),
        }
    }

    /// Registry hosts the user sent elsewhere: an ECR host among them is asked where its
    /// images were pushed (its registry), not through ECR's API, which describes only the
    /// images of the registry it fronts.
    pub fn with_redirected_hosts(mut self, hosts: impl IntoIterator<Item = String>) -> Self {
        self.redirected.extend(hosts);
        self
    }

    async fn head(&self, image: &ImageRef) -> Result<bool, DigestCheckError> {
        let shown = image.reference();
        let reference: Reference = shown
            .parse()
            .map_err(|source| DigestCheckError::Reference {
                reference: shown.clone(),
                source,
            })?;
        match self.client.head_manifest(&reference).await {
            Ok(None) => Ok(false),
            Ok(Some(info)) if info.digest == image.digest => Ok(true),
            Ok(Some(info)) => Err(DigestCheckError::WrongDigest {
                reference: shown,
                answered: info.digest,
            }),
            Err(source) => Err(DigestCheckError::Registry {
                reference: shown,
                source,
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
        let host = image.repository.split('/').next().unwrap_or_default();
        match ecr_repository(&image.repository) {
            Some((region, name)) if !self.redirected.contains(host) => {
                self.ecr(image, &region, &name).await
            }
            _ => self.head(image).await,
        }
    }
}

/// `ACCOUNT.dkr.ecr.REGION.amazonaws.com/NAME` → (region, name).
pub fn ecr_repository(repository: &str) -> Option<(String, String)> {
    let (host, name) = repository.split_once('/')?;
    registry::ecr::ecr_region(host).map(|region| (region.to_owned(), name.to_owned()))
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
