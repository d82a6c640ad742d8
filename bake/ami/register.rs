//! Registering an AMI from a root-volume snapshot: UEFI, ENA, IMDSv2 only, and a gp3 root
//! volume that is deleted with the instance.

use std::collections::BTreeMap;

use aws_sdk_ec2::Client as Ec2;
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, ImdsSupportValues,
    ResourceType, TagSpecification, VolumeType,
};

use super::AwsCallError;
use super::lookup::tags;

/// The root device: Nitro instances expose it as NVMe whatever the name; `/dev/xvda` is the
/// name Amazon Linux and Debian's own AMIs use.
pub const ROOT_DEVICE: &str = "/dev/xvda";

/// The image to register.
#[derive(Debug, Clone)]
pub struct RegisterRequest {
    pub name: String,
    pub description: Option<String>,
    /// EC2 name (`x86_64`, `arm64`).
    pub architecture: String,
    /// EC2 name (`uefi`, ...).
    pub boot_mode: String,
    pub snapshot_id: String,
    pub volume_size_gib: u32,
    pub volume_type: String,
    pub encrypted: bool,
    /// Tags for the image and its snapshot.
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
#[error("failed to register AMI `{name}` in {region}")]
pub struct RegisterError {
    pub name: String,
    pub region: String,
    #[source]
    pub source: AwsCallError,
}

/// Sends RegisterImage; returns the new AMI id.
pub async fn register(
    ec2: &Ec2,
    region: &str,
    request: &RegisterRequest,
) -> Result<String, RegisterError> {
    let error = |source| RegisterError {
        name: request.name.clone(),
        region: region.to_owned(),
        source,
    };
    let ebs = EbsBlockDevice::builder()
        .snapshot_id(&request.snapshot_id)
        .volume_size(request.volume_size_gib as i32)
        .volume_type(VolumeType::from(request.volume_type.as_str()))
        .delete_on_termination(true)
        .encrypted(request.encrypted)
        .build();
    let out = ec2
        .register_image()
        .name(&request.name)
        .set_description(request.description.clone())
        .architecture(ArchitectureValues::from(request.architecture.as_str()))
        .boot_mode(BootModeValues::from(request.boot_mode.as_str()))
        .ena_support(true)
        .imds_support(ImdsSupportValues::V20)
        .virtualization_type("hvm")
        .root_device_name(ROOT_DEVICE)
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(ROOT_DEVICE)
                .ebs(ebs)
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .set_tags(Some(tags(&request.tags)))
                .build(),
        )
        .send()
        .await
        .map_err(|e| error(AwsCallError::from_sdk(&e)))?;
    out.image_id().map(str::to_owned).ok_or_else(|| {
        error(AwsCallError(
            "RegisterImage answered without an image id".into(),
        ))
    })
}
