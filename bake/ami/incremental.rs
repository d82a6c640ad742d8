//! Incremental uploads: a new version of a recipe starts its snapshot from the snapshot of the
//! recipe's previous version in the same region (`StartSnapshot`'s `ParentSnapshotId`), and
//! writes only the blocks whose content differs (see [`super::upload::Baseline`]).
//!
//! The parent is found through what bake itself wrote: the store's build records of the
//! recipe's other versions (the most recently started first), and, when the store has none (a
//! fresh machine), bake's tags on snapshots (`bake:recipe`, `bake:version`); never by name. A
//! parent that cannot be used (gone, not completed, another volume size, other encryption or KMS
//! key, not bake's snapshot of that version) is no error: the upload is a full one, a log line
//! says why, and so does the record's [`UploadSummary`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::lookup::{self, SnapshotInfo};
use super::{AmiSpec, TAG_RECIPE, TAG_VERSION};
use crate::aws::Aws;
use crate::store::{Store, record};

/// The snapshot an upload starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub snapshot_id: String,
    /// The version it is the snapshot of.
    pub version: String,
    /// That version's disk image, when the store kept it: compared locally, instead of reading
    /// every block of the parent back.
    pub disk_image: Option<PathBuf>,
}

/// Why an upload starts from an empty snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoParent {
    /// The recipe has no earlier version in the region: the normal first upload.
    First(String),
    /// There is one, and it cannot be used.
    Unusable(String),
}

impl NoParent {
    pub fn reason(&self) -> &str {
        match self {
            NoParent::First(reason) | NoParent::Unusable(reason) => reason,
        }
    }
}

/// What the new image was compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// The parent's disk image, kept in the store.
    DiskImage,
    /// The parent's block checksums (`ListSnapshotBlocks`, `GetSnapshotBlock`).
    ParentChecksums,
}

/// How a snapshot was uploaded: part of the build record and of `--output json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSummary {
    pub region: String,
    pub snapshot_id: String,
    /// The snapshot it started from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_snapshot_id: Option<String>,
    /// The version the parent is the snapshot of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compared_with: Option<Comparison>,
    /// Blocks written (`ChangedBlocksCount`).
    pub changed_blocks: u64,
    /// Of those, all-zero blocks written over the parent's data.
    #[serde(default)]
    pub zero_blocks: u64,
    /// Why the snapshot starts empty (absent when it has a parent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_upload_reason: Option<String>,
}

/// The parent snapshot of `spec`'s upload in its first region, or why there is none.
pub async fn find_parent(aws: &Aws, store: &Store, spec: &AmiSpec) -> Result<Parent, NoParent> {
    let home = spec.home();
    let ec2 = aws.ec2(&home.region);
    let records = record::disk_amis_of(store, &spec.recipe, &spec.version).map_err(|e| {
        NoParent::Unusable(format!(
            "the store's build records could not be read: {}",
            crate::diagnostic::error_chain(&e)
        ))
    })?;
    // The newest version with an AMI made in this region: its uploaded snapshot.
    let recorded = records.iter().find_map(|r| {
        let ami = r.disk_ami()?;
        let snapshot = match &ami.upload {
            Some(upload) if upload.region == home.region => upload.snapshot_id.clone(),
            _ => ami
                .regions
                .iter()
                .find(|i| i.region == home.region)?
                .snapshot_id
                .clone(),
        };
        Some((
            r.version.to_string(),
            snapshot,
            ami.disk_image_digest.clone(),
        ))
    });
    let lookup_failed = |e: super::AwsCallError| {
        NoParent::Unusable(format!(
            "the previous version's snapshot could not be looked up in {}: {e}",
            home.region
        ))
    };
    let (version, candidates, digest) = match recorded {
        Some((version, snapshot_id, digest)) => {
            let Some(info) = lookup::snapshot(&ec2, &snapshot_id)
                .await
                .map_err(lookup_failed)?
            else {
                return Err(NoParent::Unusable(format!(
                    "the snapshot {snapshot_id} of the previous version {version} is gone from {}",
                    home.region
                )));
            };
            let tagged = |key: &str| info.tags.get(key).map(String::as_str);
            if tagged(TAG_VERSION) != Some(version.as_str())
                || tagged(TAG_RECIPE) != Some(spec.recipe.as_str())
            {
                return Err(NoParent::Unusable(format!(
                    "the snapshot {snapshot_id} the record of {version} names is not tagged as \
                     `{}` {version} by bake",
                    spec.recipe
                )));
            }
            (version, vec![info], digest)
        }
        None => {
            let tagged = lookup::snapshots_tagged(&ec2, TAG_RECIPE, Some(&spec.recipe))
                .await
                .map_err(lookup_failed)?;
            let mut candidates: Vec<SnapshotInfo> = tagged
                .into_iter()
                .filter(|s| {
                    s.state == "completed"
                        && s.tags.get(TAG_VERSION).is_some_and(|v| *v != spec.version)
                })
                .collect();
            candidates.sort_by(|a, b| {
                (b.start_time, &b.snapshot_id).cmp(&(a.start_time, &a.snapshot_id))
            });
            let Some(newest) = candidates.first() else {
                return Err(NoParent::First(format!(
                    "no earlier version of `{}` has a completed snapshot in {}",
                    spec.recipe, home.region
                )));
            };
            // A version can have more than one snapshot tagged (bake tags an AMI's snapshots
            // too, and an emulator may register an AMI on a snapshot of its own): the first
            // usable one of the newest version.
            let version = newest.tags[TAG_VERSION].clone();
            let candidates = candidates
                .into_iter()
                .filter(|s| s.tags[TAG_VERSION] == version)
                .collect();
            (version, candidates, None)
        }
    };
    // Looked up only when it matters: a parent encrypted, and a recipe that names no key.
    let default_key =
        if spec.encrypted && home.kms_key_id.is_none() && candidates.iter().any(|c| c.encrypted) {
            Some(default_ebs_key(aws, &home.region).await.map_err(|e| {
                NoParent::Unusable(format!(
                    "the account's default EBS KMS key in {} could not be looked up: {e}",
                    home.region
                ))
            })?)
        } else {
            None
        };
    let mut first_reason = None;
    let mut found = None;
    for candidate in candidates {
        match usable(&candidate, spec, default_key.as_deref()) {
            Ok(()) => {
                found = Some(candidate);
                break;
            }
            Err(reason) => {
                first_reason.get_or_insert(reason);
            }
        }
    }
    let Some(info) = found else {
        return Err(first_reason.expect("there is a candidate"));
    };
    let disk_image = digest
        .and_then(|d| store.disk_image(&spec.recipe, &d.to_string()).ok())
        .flatten();
    Ok(Parent {
        snapshot_id: info.snapshot_id,
        version,
        disk_image,
    })
}

/// The ARN of the account's default EBS KMS key in `region` (what an encrypted volume that
/// names no key is encrypted with).
async fn default_ebs_key(aws: &Aws, region: &str) -> Result<String, super::AwsCallError> {
    let out = aws
        .ec2(region)
        .get_ebs_default_kms_key_id()
        .send()
        .await
        .map_err(|e| super::AwsCallError::from_sdk(&e))?;
    let key = out.kms_key_id().ok_or_else(|| {
        super::AwsCallError("GetEbsDefaultKmsKeyId answered without a key".into())
    })?;
    // It may answer an alias (`alias/aws/ebs`); snapshots name the key's ARN.
    let described = aws
        .kms(region)
        .describe_key()
        .key_id(key)
        .send()
        .await
        .map_err(|e| super::AwsCallError::from_sdk(&e))?;
    described
        .key_metadata()
        .and_then(|m| m.arn())
        .map(str::to_owned)
        .ok_or_else(|| super::AwsCallError(format!("DescribeKey of `{key}` answered no ARN")))
}

/// Whether a child of `parent` would be the volume `spec` describes: a snapshot with a parent
/// has the parent's encryption and key, and bake uses only a parent of the same size.
/// `default_key` is the ARN of the account's default EBS key, when the recipe names no key.
fn usable(
    parent: &SnapshotInfo,
    spec: &AmiSpec,
    default_key: Option<&str>,
) -> Result<(), NoParent> {
    let id = &parent.snapshot_id;
    let unusable = |why: String| {
        Err(NoParent::Unusable(format!(
            "the parent snapshot {id} {why}"
        )))
    };
    if parent.state != "completed" {
        return unusable(format!("is {}, not completed", parent.state));
    }
    let size = i64::from(parent.volume_size.unwrap_or(0));
    if size != i64::from(spec.disk_size_gib) {
        return unusable(format!(
            "is {size} GiB, and this version's volume is {} GiB",
            spec.disk_size_gib
        ));
    }
    let encryption = |encrypted| {
        if encrypted {
            "encrypted"
        } else {
            "unencrypted"
        }
    };
    if parent.encrypted != spec.encrypted {
        return unusable(format!(
            "is {}, and this version's volume is {}",
            encryption(parent.encrypted),
            encryption(spec.encrypted)
        ));
    }
    if spec.encrypted {
        let theirs = parent.kms_key_id.as_deref().unwrap_or("(none)");
        match &spec.home().kms_key_id {
            Some(ours) if ours == theirs => {}
            Some(ours) => {
                return unusable(format!(
                    "is encrypted with KMS key {theirs}, and this version's with {ours}"
                ));
            }
            None => match default_key {
                Some(ours) if ours == theirs => {}
                Some(ours) => {
                    return unusable(format!(
                        "is encrypted with KMS key {theirs}, and this version with the \
                         account's default EBS key {ours}"
                    ));
                }
                None => {
                    return unusable(format!(
                        "is encrypted with KMS key {theirs}, and the account's default EBS key \
                         is not known"
                    ));
                }
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(encrypted: bool, key: Option<&str>) -> AmiSpec {
        AmiSpec {
            recipe: "web".into(),
            version: format!("sha256:{}", "2".repeat(64)),
            architecture: "x86_64".into(),
            boot_mode: "uefi".into(),
            disk_size_gib: 2,
            volume_type: "gp3".into(),
            encrypted,
            regions: vec![super::super::RegionSpec {
                region: "us-east-1".into(),
                name: "web".into(),
                description: None,
                tags: Default::default(),
                kms_key_id: key.map(str::to_owned),
            }],
            sharing: Default::default(),
            deprecate_after: None,
        }
    }

    fn snapshot(state: &str, size: i32, key: Option<&str>) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: "snap-0123456789abcdef0".into(),
            state: state.into(),
            tags: Default::default(),
            start_time: None,
            volume_size: Some(size),
            encrypted: key.is_some(),
            kms_key_id: key.map(str::to_owned),
        }
    }

    #[test]
    fn a_parent_of_another_size_state_encryption_or_key_is_refused_saying_why() {
        let key = "arn:aws:kms:us-east-1:123456789012:key/a";
        let other = "arn:aws:kms:us-east-1:123456789012:key/b";
        assert_eq!(
            usable(&snapshot("completed", 2, None), &spec(false, None), None),
            Ok(())
        );
        assert_eq!(
            usable(
                &snapshot("completed", 2, Some(key)),
                &spec(true, Some(key)),
                None
            ),
            Ok(())
        );
        // No key named: the account's default EBS key is what the parent must have.
        assert_eq!(
            usable(
                &snapshot("completed", 2, Some(key)),
                &spec(true, None),
                Some(key)
            ),
            Ok(())
        );
        let reason = |parent: SnapshotInfo, spec: AmiSpec| {
            usable(&parent, &spec, None)
                .unwrap_err()
                .reason()
                .to_owned()
        };
        assert!(reason(snapshot("pending", 2, None), spec(false, None)).contains("is pending"));
        assert!(reason(snapshot("completed", 3, None), spec(false, None)).contains("is 3 GiB"));
        assert!(
            reason(snapshot("completed", 2, None), spec(true, Some(key))).contains("unencrypted")
        );
        assert!(
            reason(snapshot("completed", 2, Some(other)), spec(true, Some(key)))
                .contains("KMS key arn:aws:kms:us-east-1:123456789012:key/b")
        );
        assert!(
            reason(snapshot("completed", 2, Some(key)), spec(true, None)).contains("not known")
        );
        let refused = usable(
            &snapshot("completed", 2, Some(other)),
            &spec(true, None),
            Some(key),
        );
        assert!(
            refused
                .unwrap_err()
                .reason()
                .contains("the account's default EBS key arn:aws:kms:us-east-1:123456789012:key/a")
        );
    }
}
