//! The registry half of `bake gc` for plain OCI registries (`publish.registries`), through the
//! distribution API: which of a recipe's images a repository holds, and removing one (its tags
//! first, then its digest).
//!
//! The distribution API lists tags, not manifests, so the candidates are looked up the other
//! way round from ECR's: each image digest the recipe's build records name is asked for
//! (`HEAD …/manifests/<digest>`), and each tag is resolved to find the tags that name one of
//! them. An untagged manifest no record names is never seen, let alone touched. Registry targets
//! on an ECR host are ECR repositories ([`super::ecr::repositories`]), not handled here.

use std::collections::BTreeMap;

use super::ecr::{Deleted, RegistryImage};
use crate::id::Version;
use crate::recipe::Recipe;
use crate::registry::{Client, Deletion, Reference, RegistryError};
use crate::store::BuildRecord;

/// The recipe's registry repositories (`publish.registries`, ECR hosts aside).
pub fn repositories(recipe: &Recipe) -> Vec<Reference> {
    let mut found: Vec<Reference> = Vec::new();
    for target in &recipe.publish.registries {
        let Ok(reference) = Reference::repository_only(&target.repository) else {
            continue;
        };
        if crate::registry::ecr::ecr_region(reference.registry()).is_none()
            && !found.iter().any(|r| r.name() == reference.name())
        {
            found.push(reference);
        }
    }
    found
}

/// The images of `repository` that the recipe's build records name, with the tags that name
/// them; each with the recipe's versions whose records name it.
pub async fn images(
    client: &Client,
    repository: &Reference,
    records: &[BuildRecord],
    recipe: &str,
) -> Result<Vec<(RegistryImage, Vec<Version>)>, RegistryError> {
    let mut digests: BTreeMap<String, Vec<Version>> = BTreeMap::new();
    for record in records.iter().filter(|r| r.name == recipe) {
        if let Some(image) = record.image() {
            digests
                .entry(image.image_digest.to_string())
                .or_default()
                .push(record.version.clone());
        }
    }
    let mut present: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for digest in digests.keys() {
        if client
            .head_manifest(&repository.with_digest(digest)?)
            .await?
            .is_some()
        {
            present.insert(digest.clone(), Vec::new());
        }
    }
    if !present.is_empty() {
        for tag in client.list_tags(repository).await? {
            let Ok(tagged) = repository.with_tag(&tag) else {
                continue;
            };
            if let Some(info) = client.head_manifest(&tagged).await?
                && let Some(tags) = present.get_mut(&info.digest)
            {
                tags.push(tag);
            }
        }
    }
    Ok(present
        .into_iter()
        .map(|(digest, tags)| {
            let versions = digests.remove(&digest).unwrap_or_default();
            (
                RegistryImage {
                    region: String::new(),
                    registry: Some(repository.registry().to_owned()),
                    repository: repository.repository().to_owned(),
                    digest,
                    tags,
                },
                versions,
            )
        })
        .collect())
}

fn reference_of(image: &RegistryImage) -> Result<Reference, String> {
    Reference::new(
        image.registry.as_deref().unwrap_or_default(),
        &image.repository,
        None,
        Some(&image.digest),
    )
    .map_err(|e| e.to_string())
}

/// Deletes the image's `tags`, each only while it still names this digest (checked right
/// before: a tag moved to another image since it was listed stays there); one outcome per tag.
/// A registry that does not delete tags on their own has them go with the digest.
pub async fn delete_tags(client: &Client, image: &RegistryImage, tags: &[String]) -> Vec<Deleted> {
    let mut outcomes = Vec::new();
    for tag in tags {
        outcomes.push(delete_tag(client, image, tag).await);
    }
    outcomes
}

async fn delete_tag(client: &Client, image: &RegistryImage, tag: &str) -> Deleted {
    let tagged = match reference_of(image).and_then(|r| r.with_tag(tag).map_err(|e| e.to_string()))
    {
        Ok(tagged) => tagged,
        Err(error) => return Deleted::Failed(error),
    };
    match client.head_manifest(&tagged).await {
        Ok(Some(info)) if info.digest == image.digest => {}
        Ok(_) => return Deleted::Settled, // gone, or another image's now
        Err(e) => return Deleted::Failed(crate::diagnostic::error_chain(&e)),
    }
    match client.delete_manifest(&tagged).await {
        Ok(Deletion::Deleted | Deletion::NotFound | Deletion::Unsupported) => Deleted::Settled,
        Err(e) => Deleted::Failed(crate::diagnostic::error_chain(&e)),
    }
}

/// Deletes the image by its digest.
pub async fn delete_digest(client: &Client, image: &RegistryImage) -> Deleted {
    let reference = match reference_of(image) {
        Ok(reference) => reference,
        Err(error) => return Deleted::Failed(error),
    };
    match client.delete_manifest(&reference).await {
        Ok(Deletion::Deleted | Deletion::NotFound) => Deleted::Settled,
        Ok(Deletion::Unsupported) => {
            Deleted::Failed("the registry refused to delete the manifest".into())
        }
        Err(e) => Deleted::Failed(crate::diagnostic::error_chain(&e)),
    }
}

/// Whether the image is still in its repository.
pub async fn exists(client: &Client, image: &RegistryImage) -> Result<bool, RegistryError> {
    let reference = Reference::new(
        image.registry.as_deref().unwrap_or_default(),
        &image.repository,
        None,
        Some(&image.digest),
    )?;
    Ok(client.head_manifest(&reference).await?.is_some())
}
