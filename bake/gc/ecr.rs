//! The ECR half of `bake gc`: which images of a recipe's ECR repositories are gc's to judge,
//! and removing one (its tags first, then its digest); and [`RegistryImage`], an image in ECR
//! or (through [`super::registry`]) in a registry.
//!
//! An image is a candidate only when its digest is the `image_digest` of one of this recipe's
//! build records in this store: bake made exactly that manifest for exactly that version.
//! Anything else in the repository (pushed by hand, by another tool, or a digest another
//! recipe's record names) is never a candidate, whatever its tags say.
//!
//! ECR has no deprecation: the reference check ([`super::scan::services`], the channels, the
//! retention rules) is what keeps a running service's image, and a removed image goes at once.

use std::collections::BTreeSet;

use aws_sdk_ecr::types::ImageIdentifier;

use crate::ami::AwsCallError;
use crate::aws::Aws;
use crate::id::Version;
use crate::recipe::Recipe;
use crate::registry::Reference;
use crate::store::BuildRecord;

/// BatchDeleteImage takes at most 100 image ids per request.
const IDS_PER_DELETE: usize = 100;

/// DescribeImages' largest page (fewer requests for big repositories).
const IMAGES_PER_PAGE: i32 = 1000;

/// BatchDeleteImage failure codes that mean there is nothing left to do for that id: the
/// image (or tag) is gone, or the tag was moved to another image since it was listed, which
/// must then keep it.
const SETTLED_FAILURES: [&str; 2] = ["ImageNotFound", "ImageTagDoesNotMatchDigest"];

/// One image in an ECR repository (as DescribeImages lists it) or in a registry's repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryImage {
    /// The ECR repository's region; empty for a registry's.
    pub region: String,
    /// `None` for ECR (the account's registry in `region`); a registry's host otherwise.
    pub registry: Option<String>,
    pub repository: String,
    /// `sha256:…`.
    pub digest: String,
    /// Empty for an untagged image.
    pub tags: Vec<String>,
}

impl RegistryImage {
    /// `repository@sha256:…` (ECR) or `registry/repository@sha256:…`: the image's id in gc's
    /// lines, journal and manifest removals.
    pub fn id(&self) -> String {
        match &self.registry {
            None => format!("{}@{}", self.repository, self.digest),
            Some(host) => format!("{host}/{}@{}", self.repository, self.digest),
        }
    }
}

/// The recipe's ECR repositories: (region, repository), in the region each target publishes
/// to (the target's own, else the recipe's first AMI region, else the default region, as
/// `bake push` resolves it).
pub fn repositories(recipe: &Recipe, aws: &Aws) -> BTreeSet<(String, String)> {
    let fallback = recipe
        .outputs
        .ami
        .iter()
        .flat_map(|a| a.regions.first().cloned())
        .next()
        .or_else(|| aws.default_region().map(str::to_owned));
    let mut repositories: BTreeSet<(String, String)> = recipe
        .publish
        .ecr
        .iter()
        .filter_map(|t| {
            let region = t.region.clone().or_else(|| fallback.clone())?;
            Some((region, t.repository.clone()))
        })
        .collect();
    // A registry target on an ECR host is an ECR repository: its API lists and deletes there.
    for target in &recipe.publish.registries {
        if let Ok(reference) = Reference::repository_only(&target.repository)
            && let Some(region) = crate::registry::ecr::ecr_region(reference.registry())
        {
            repositories.insert((region.to_owned(), reference.repository().to_owned()));
        }
    }
    repositories
}

/// Every image of `repository` (tagged or not); `None` when the repository does not exist.
pub async fn images(
    aws: &Aws,
    region: &str,
    repository: &str,
) -> Result<Option<Vec<RegistryImage>>, AwsCallError> {
    let ecr = aws.ecr(region);
    let mut found = Vec::new();
    let mut token = None;
    loop {
        let sent = ecr
            .describe_images()
            .repository_name(repository)
            .max_results(IMAGES_PER_PAGE)
            .set_next_token(token)
            .send()
            .await;
        let out = match sent {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_repository_not_found_exception()) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(AwsCallError::from_sdk(&e)),
        };
        for detail in out.image_details() {
            let Some(digest) = detail.image_digest() else {
                continue;
            };
            found.push(RegistryImage {
                region: region.to_owned(),
                registry: None,
                repository: repository.to_owned(),
                digest: digest.to_owned(),
                tags: detail.image_tags().to_vec(),
            });
        }
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            return Ok(Some(found));
        }
    }
}

/// Whether `record` names `digest` (`sha256:…`, as ECR writes it) as its image.
fn names(record: &BuildRecord, digest: &str) -> bool {
    let digest = digest.parse::<crate::id::Digest>();
    record
        .image()
        .is_some_and(|i| digest.as_ref().is_ok_and(|d| *d == i.image_digest))
}

/// The versions of `recipe` whose build records name `digest` as their image (more than one
/// when a rebuild made the same manifest).
pub fn versions_of(records: &[BuildRecord], recipe: &str, digest: &str) -> Vec<Version> {
    records
        .iter()
        .filter(|r| r.name == recipe && names(r, digest))
        .map(|r| r.version.clone())
        .collect()
}

/// What deleting one id (a tag or the digest) came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// Gone now, or already (or, for a tag, moved to another image: not this image's any more).
    Settled,
    Failed(String),
}

/// Deletes `ids` of the image in one or more BatchDeleteImage requests; one outcome per id, in
/// order. A request that fails as a whole fails each of its ids.
async fn delete(
    ecr: &aws_sdk_ecr::Client,
    repository: &str,
    ids: Vec<ImageIdentifier>,
) -> Vec<Deleted> {
    let mut outcomes = Vec::new();
    for batch in ids.chunks(IDS_PER_DELETE) {
        let sent = ecr
            .batch_delete_image()
            .repository_name(repository)
            .set_image_ids(Some(batch.to_vec()))
            .send()
            .await;
        let out = match sent {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_repository_not_found_exception()) =>
            {
                outcomes.extend(batch.iter().map(|_| Deleted::Settled));
                continue;
            }
            Err(e) => {
                let error = format!("BatchDeleteImage: {}", AwsCallError::from_sdk(&e));
                outcomes.extend(batch.iter().map(|_| Deleted::Failed(error.clone())));
                continue;
            }
        };
        for id in batch {
            let failure = out.failures().iter().find(|f| {
                f.image_id().is_some_and(|failed| {
                    failed.image_tag() == id.image_tag()
                        && (failed.image_digest().is_none()
                            || failed.image_digest() == id.image_digest())
                })
            });
            outcomes.push(match failure {
                None => Deleted::Settled,
                Some(f) => {
                    let code = f.failure_code().map_or("", |c| c.as_str());
                    if SETTLED_FAILURES.contains(&code) {
                        Deleted::Settled
                    } else {
                        Deleted::Failed(format!(
                            "BatchDeleteImage: {code}: {}",
                            f.failure_reason().unwrap_or("no reason given")
                        ))
                    }
                }
            });
        }
    }
    outcomes
}

/// Deletes the image's `tags`, each only while it still names this digest (a tag moved to
/// another image since it was listed stays there); one outcome per tag.
pub async fn delete_tags(
    ecr: &aws_sdk_ecr::Client,
    image: &RegistryImage,
    tags: &[String],
) -> Vec<Deleted> {
    let ids = tags
        .iter()
        .map(|tag| {
            ImageIdentifier::builder()
                .image_digest(&image.digest)
                .image_tag(tag)
                .build()
        })
        .collect();
    delete(ecr, &image.repository, ids).await
}

/// Deletes the image by its digest.
pub async fn delete_digest(ecr: &aws_sdk_ecr::Client, image: &RegistryImage) -> Deleted {
    let id = ImageIdentifier::builder()
        .image_digest(&image.digest)
        .build();
    delete(ecr, &image.repository, vec![id])
        .await
        .pop()
        .unwrap_or(Deleted::Settled)
}

/// Whether the image is still in its repository.
pub async fn exists(aws: &Aws, image: &RegistryImage) -> Result<bool, AwsCallError> {
    let sent = aws
        .ecr(&image.region)
        .describe_images()
        .repository_name(&image.repository)
        .image_ids(
            ImageIdentifier::builder()
                .image_digest(&image.digest)
                .build(),
        )
        .send()
        .await;
    match sent {
        Ok(out) => Ok(!out.image_details().is_empty()),
        Err(e)
            if e.as_service_error().is_some_and(|e| {
                e.is_image_not_found_exception() || e.is_repository_not_found_exception()
            }) =>
        {
            Ok(false)
        }
        Err(e) => Err(AwsCallError::from_sdk(&e)),
    }
}

/// The image an id names: `repository@sha256:…` in ECR in `region`, or, with no region,
/// `registry/repository@sha256:…`.
pub fn parse_id(region: &str, id: &str) -> Option<RegistryImage> {
    let (name, digest) = id.rsplit_once('@')?;
    let (registry, repository) = if region.is_empty() {
        let (host, repository) = name.split_once('/')?;
        (Some(host.to_owned()), repository)
    } else {
        (None, name)
    };
    Some(RegistryImage {
        region: region.to_owned(),
        registry,
        repository: repository.to_owned(),
        digest: digest.to_owned(),
        tags: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_id_round_trips() {
        let image = RegistryImage {
            region: "us-east-1".into(),
            registry: None,
            repository: "team/api".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            tags: vec!["v1".into()],
        };
        let parsed = parse_id("us-east-1", &image.id()).unwrap();
        assert_eq!(parsed.repository, "team/api");
        assert_eq!(parsed.digest, image.digest);
        assert!(parse_id("us-east-1", "no-digest").is_none());
        let elsewhere = RegistryImage {
            region: String::new(),
            registry: Some("127.0.0.1:5000".into()),
            ..image
        };
        let parsed = parse_id("", &elsewhere.id()).unwrap();
        assert_eq!(
            elsewhere.id(),
            format!("127.0.0.1:5000/team/api@{}", elsewhere.digest)
        );
        assert_eq!(
            parsed,
            RegistryImage {
                tags: Vec::new(),
                ..elsewhere
            }
        );
    }
}
