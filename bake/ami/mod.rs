//! AMIs: from a provisioned root filesystem to images in EC2, without a builder instance (or,
//! with [`instance`], with one). The snapshot strategy makes a bootable disk image, proves it
//! boots, uploads it into an EBS snapshot through the EBS direct APIs, registers it, copies it to
//! every region, shares it, and records what was made. Everything a run creates in AWS is
//! journaled first, so a failed or interrupted run removes it and `bake cleanup` finds what a
//! killed one left behind.
//!
//! ```text
//!  provisioned root ──► disk::build_disk_image ──► boot::boot_test
//!  (build::pipeline::   GPT raw image: ESP with     qemu + OVMF, waits
//!   provision_root)     systemd-boot, ext4 root     for the marker
//!
//!  disk image ─► upload ─► register ─► distribute ───────────► AmiRecord
//!  (raw file)   EBS direct  RegisterImage  CopyImage per region,   per region:
//!               snapshot    (uefi, ENA,    tags, launch            AMI id, snapshot id
//!                           IMDSv2, gp3)   permissions, deprecation
//!                  ▲            ▲              ▲
//!                  └────────────┴── journal ───┘  (rollback on error, `bake cleanup`)
//! ```
//!
//! A new version's snapshot starts from the previous version's ([`incremental`]): only the
//! blocks that changed are uploaded.
//!
//! The pieces are strategy-agnostic: [`journal`], [`distribute`] and [`cleanup`] work on AMI
//! ids and regions, whichever way the source AMI was made. [`publish`] strings them together
//! for the snapshot strategy; [`instance`] is the builder-instance strategy (launch a vendor
//! image, provision it over SSH, create the image), with its own journal of temporary
//! resources.
//!
//! [`disk_build::build_local_image`] runs the local part (root, image, command and boot tests)
//! in one call.

pub mod boot;
pub mod cleanup;
pub mod disk;
pub mod disk_build;
pub mod distribute;
pub mod incremental;
pub mod instance;
pub mod journal;
pub mod lookup;
pub mod publish;
pub mod register;
pub mod spec;
pub mod upload;
pub mod wait;

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use serde::{Deserialize, Serialize};

pub use spec::{AmiSpec, RegionSpec, Sharing};

/// Tag naming the recipe a resource was made for.
pub const TAG_RECIPE: &str = "bake:recipe";
/// Tag naming the version a resource is the AMI (or snapshot) of: the idempotency key.
pub const TAG_VERSION: &str = "bake:version";
/// Tag naming the run that created a resource (how `bake cleanup` finds a killed run's leftovers
/// whose ids never reached the journal).
pub const TAG_RUN: &str = "bake:run";

/// One region's AMI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionImage {
    pub region: String,
    pub image_id: String,
    /// The root volume's snapshot.
    pub snapshot_id: String,
}

/// What an AMI build made: part of the build record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmiRecord {
    /// `sha256:` digest of the raw disk image that was uploaded (snapshot strategy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_image_digest: Option<String>,
    /// One entry per region, in the recipe's order (the first is where the AMI was made).
    pub regions: Vec<RegionImage>,
    /// How this run uploaded the first region's snapshot (absent when the AMI existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<incremental::UploadSummary>,
}

/// Renders an AWS SDK error with its code and message (the SDK's own `Display` says only
/// "service error").
pub fn sdk_error<E>(error: &SdkError<E, HttpResponse>) -> String
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
{
    match error {
        SdkError::ServiceError(service) => {
            let e = service.err();
            match (e.code(), e.message()) {
                (Some(code), Some(message)) => format!("{code}: {message}"),
                (Some(code), None) => code.to_owned(),
                _ => format!(
                    "HTTP {} that is not an AWS error ({e})",
                    service.raw().status().as_u16()
                ),
            }
        }
        other => crate::diagnostic::error_chain(other),
    }
}

/// The error code of an AWS SDK error, if the service gave one.
pub fn sdk_error_code<E, R>(
    error: &aws_smithy_runtime_api::client::result::SdkError<E, R>,
) -> Option<&str>
where
    E: aws_smithy_types::error::metadata::ProvideErrorMetadata,
{
    error.as_service_error().and_then(|e| e.code())
}

/// An AWS call that failed, rendered (the SDK's error types are per operation).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct AwsCallError(pub String);

impl AwsCallError {
    pub fn from_sdk<E>(error: &SdkError<E, HttpResponse>) -> Self
    where
        E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
    {
        AwsCallError(sdk_error(error))
    }
}
