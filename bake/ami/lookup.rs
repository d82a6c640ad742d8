//! Looking before creating: find bake's images and snapshots by their tags, read an image's
//! state and snapshots, and add tags that are missing (and only those).

use std::collections::BTreeMap;

use aws_sdk_ec2::Client as Ec2;
use aws_sdk_ec2::types::{Filter, Image, ImageState, Snapshot, Tag};

use super::{AwsCallError, TAG_RECIPE, TAG_RUN, TAG_VERSION, sdk_error_code};

/// What bake needs to know about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub image_id: String,
    pub name: String,
    pub state: String,
    pub snapshots: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub creation_date: Option<String>,
    pub deprecation_time: Option<String>,
    pub public: bool,
}

impl ImageInfo {
    fn from_image(image: &Image) -> Self {
        ImageInfo {
            image_id: image.image_id().unwrap_or_default().to_owned(),
            name: image.name().unwrap_or_default().to_owned(),
            state: image
                .state()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            snapshots: image
                .block_device_mappings()
                .iter()
                .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
                .map(str::to_owned)
                .collect(),
            tags: tag_map(image.tags()),
            creation_date: image.creation_date().map(str::to_owned),
            deprecation_time: image.deprecation_time().map(str::to_owned),
            public: image.public().unwrap_or(false),
        }
    }
}

pub fn tag_map(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// The images of `recipe` at `version` in the client's region, owned by this account, that are
/// not failed or deregistered (newest id last, for a stable order).
pub async fn images_of_version(
    ec2: &Ec2,
    recipe: &str,
    version: &str,
) -> Result<Vec<ImageInfo>, AwsCallError> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(filter(&format!("tag:{TAG_VERSION}"), version))
        .filters(filter(&format!("tag:{TAG_RECIPE}"), recipe))
        .send()
        .await
        .map_err(|e| AwsCallError::from_sdk(&e))?;
    let mut images: Vec<ImageInfo> = out
        .images()
        .iter()
        .filter(|i| {
            !matches!(
                i.state(),
                Some(ImageState::Failed | ImageState::Deregistered | ImageState::Error)
            )
        })
        .map(ImageInfo::from_image)
        .collect();
    images.sort_by(|a, b| a.image_id.cmp(&b.image_id));
    Ok(images)
}

/// Images owned by this account with the given tag (any state).
pub async fn images_tagged(
    ec2: &Ec2,
    key: &str,
    value: &str,
) -> Result<Vec<ImageInfo>, AwsCallError> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(filter(&format!("tag:{key}"), value))
        .send()
        .await
        .map_err(|e| AwsCallError::from_sdk(&e))?;
    Ok(out.images().iter().map(ImageInfo::from_image).collect())
}

/// Images owned by this account with exactly this name that one run made (its `bake:run`
/// tag). Never by name alone: every run of a version names its AMI the same.
pub async fn images_named_by_run(
    ec2: &Ec2,
    name: &str,
    run: &str,
) -> Result<Vec<ImageInfo>, AwsCallError> {
    let out = ec2
        .describe_images()
        .owners("self")
        .filters(filter("name", name))
        .filters(filter(&format!("tag:{TAG_RUN}"), run))
        .send()
        .await
        .map_err(|e| AwsCallError::from_sdk(&e))?;
    Ok(out
        .images()
        .iter()
        .filter(|i| i.name() == Some(name))
        .map(ImageInfo::from_image)
        .filter(|i| i.tags.get(TAG_RUN).map(String::as_str) == Some(run))
        .collect())
}

/// One image by id; `None` if it does not exist (or was deregistered).
pub async fn image(ec2: &Ec2, image_id: &str) -> Result<Option<ImageInfo>, AwsCallError> {
    match ec2.describe_images().image_ids(image_id).send().await {
        Ok(out) => Ok(out
            .images()
            .iter()
            .find(|i| i.image_id() == Some(image_id))
            .filter(|i| i.state() != Some(&ImageState::Deregistered))
            .map(ImageInfo::from_image)),
        Err(e) if sdk_error_code(&e).is_some_and(|c| c.starts_with("InvalidAMIID")) => Ok(None),
        Err(e) => Err(AwsCallError::from_sdk(&e)),
    }
}

/// What bake needs to know about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub snapshot_id: String,
    pub state: String,
    pub tags: BTreeMap<String, String>,
    pub start_time: Option<std::time::SystemTime>,
    /// GiB.
    pub volume_size: Option<i32>,
    pub encrypted: bool,
    /// The KMS key's ARN, for an encrypted snapshot.
    pub kms_key_id: Option<String>,
}

impl SnapshotInfo {
    fn from_snapshot(s: &Snapshot) -> Self {
        SnapshotInfo {
            snapshot_id: s.snapshot_id().unwrap_or_default().to_owned(),
            state: s.state().map(|s| s.as_str().to_owned()).unwrap_or_default(),
            tags: tag_map(s.tags()),
            start_time: s
                .start_time()
                .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
            volume_size: s.volume_size(),
            encrypted: s.encrypted().unwrap_or(false),
            kms_key_id: s.kms_key_id().map(str::to_owned),
        }
    }
}

/// Snapshots with the given tag (never by owner: see MOTO.md, and the filter is what matters).
pub async fn snapshots_tagged(
    ec2: &Ec2,
    key: &str,
    value: Option<&str>,
) -> Result<Vec<SnapshotInfo>, AwsCallError> {
    let request = ec2.describe_snapshots().owner_ids("self");
    let request = match value {
        Some(value) => request.filters(filter(&format!("tag:{key}"), value)),
        None => request.filters(filter("tag-key", key)),
    };
    let out = request
        .send()
        .await
        .map_err(|e| AwsCallError::from_sdk(&e))?;
    Ok(out
        .snapshots()
        .iter()
        .map(SnapshotInfo::from_snapshot)
        .collect())
}

/// One snapshot by id; `None` if it does not exist.
pub async fn snapshot(ec2: &Ec2, snapshot_id: &str) -> Result<Option<SnapshotInfo>, AwsCallError> {
    match ec2
        .describe_snapshots()
        .snapshot_ids(snapshot_id)
        .send()
        .await
    {
        Ok(out) => Ok(out
            .snapshots()
            .iter()
            .find(|s| s.snapshot_id() == Some(snapshot_id))
            .map(SnapshotInfo::from_snapshot)),
        Err(e) if sdk_error_code(&e).is_some_and(|c| c.starts_with("InvalidSnapshot")) => Ok(None),
        Err(e) => Err(AwsCallError::from_sdk(&e)),
    }
}

/// Adds the tags of `wanted` that `resource` lacks or has with another value; no call when it
/// has them all (so a repeated run makes no mutating call).
pub async fn ensure_tags(
    ec2: &Ec2,
    resource: &str,
    present: &BTreeMap<String, String>,
    wanted: &BTreeMap<String, String>,
) -> Result<bool, AwsCallError> {
    let missing: Vec<Tag> = wanted
        .iter()
        .filter(|(k, v)| present.get(*k) != Some(*v))
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    ec2.create_tags()
        .resources(resource)
        .set_tags(Some(missing))
        .send()
        .await
        .map_err(|e| AwsCallError::from_sdk(&e))?;
    Ok(true)
}

/// EC2 tags from a map.
pub fn tags(map: &BTreeMap<String, String>) -> Vec<Tag> {
    map.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}
