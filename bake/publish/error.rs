//! Why a publish, promote or rollback refused or failed. Each message names the resource and the
//! region; the hint says what to do.

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::digest::DigestCheckError;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("AMI `{ami}` does not exist in {region} (or was deregistered)")]
    AmiMissing { ami: String, region: String },
    #[error("AMI `{ami}` in {region} is `{state}`, not `available`")]
    AmiNotAvailable {
        ami: String,
        region: String,
        state: String,
    },
    #[error("AMI `{ami}` in {region} is not launchable by account {account}")]
    AmiNotShared {
        ami: String,
        region: String,
        account: String,
    },
    #[error("image `{reference}` is not in its registry")]
    DigestMissing { reference: String },
    #[error("failed to check that `{reference}` is in its registry")]
    DigestCheck {
        reference: String,
        #[source]
        source: Box<DigestCheckError>,
    },
    #[error("launch template `{template}` does not exist in {region}")]
    LaunchTemplateMissing { template: String, region: String },
    #[error("launch template `{template}` in {region} has no version {version}")]
    SourceVersionMissing {
        template: String,
        region: String,
        version: String,
    },
    #[error("SSM parameter `{name}` in {region} exists and is not owned by bake recipe `{recipe}`")]
    ParameterNotOwned {
        name: String,
        region: String,
        recipe: String,
    },
    #[error("the inputs of version {version} have no AMI for {region}")]
    NoAmi { version: String, region: String },
    #[error("the inputs of version {version} have no image pushed to `{repository}`")]
    NoImage { version: String, repository: String },
    #[error("task definition family `{family}` has no active revision in {region}")]
    NoTaskDefinition { family: String, region: String },
    #[error("task definition template `{path}` for family `{family}` is invalid")]
    TaskTemplate {
        family: String,
        path: String,
        #[source]
        source: BoxError,
    },
    #[error("container `{container}` is not in task definition `{task_definition}`")]
    NoContainer {
        container: String,
        task_definition: String,
    },
    #[error("ECS service `{service}` does not exist in cluster `{cluster}` in {region}")]
    ServiceMissing {
        cluster: String,
        service: String,
        region: String,
    },
    #[error("failed to render `{field}` of the recipe")]
    Render {
        field: String,
        #[source]
        source: BoxError,
    },
    #[error("version {version} of recipe `{recipe}` has not been published")]
    ReleaseMissing { recipe: String, version: String },
    #[error("channel `{channel}` of recipe `{recipe}` {problem}")]
    Channel {
        recipe: String,
        channel: String,
        problem: String,
    },
    #[error("bake's record `{name}` in {region} is not valid JSON of the expected shape")]
    Record {
        name: String,
        region: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("recipe `{recipe}` has no region to keep its releases and channels in")]
    NoHomeRegion { recipe: String },
    #[error("{operation} failed in {region}")]
    Aws {
        operation: String,
        region: String,
        #[source]
        source: BoxError,
    },
}

impl PublishError {
    /// What to do about it, where bake knows.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            PublishError::AmiMissing { .. } | PublishError::NoAmi { .. } => {
                "publish a version whose AMI was built and copied to this region".into()
            }
            PublishError::AmiNotAvailable { .. } => {
                "wait until the AMI is available, then re-run (publishing converges)".into()
            }
            PublishError::AmiNotShared { account, .. } => format!(
                "share the AMI with {account} (outputs.ami.sharing.accounts) and, if it is encrypted, its KMS key"
            ),
            PublishError::DigestMissing { .. } | PublishError::NoImage { .. } => {
                "push the image for this version first".into()
            }
            PublishError::LaunchTemplateMissing { .. } => {
                "create the launch template first (bake only adds versions to existing templates), or fix the name, id or regions in publish.launch_templates".into()
            }
            PublishError::ParameterNotOwned { .. } => {
                "pass --allow-clobber to take the parameter over, or choose another name".into()
            }
            PublishError::NoTaskDefinition { .. } => {
                "register a first revision, or give publish.ecs_task_definitions[].template".into()
            }
            PublishError::ReleaseMissing { .. } => "run `bake publish` for that version first".into(),
            _ => return None,
        })
    }

    /// Whether retrying cannot help until the recipe, the inputs or the account change.
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            PublishError::Aws { .. } | PublishError::DigestCheck { .. }
        )
    }
}

/// An AWS call's failure, rendered with what the SDK's `Display` leaves out: the error code
/// and message, or the HTTP status of an answer that is not a modeled error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AwsCallError(pub String);

impl AwsCallError {
    pub fn from_sdk<E>(error: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        AwsCallError(crate::ami::sdk_error(error))
    }
}

/// Wraps an SDK error with the operation and region it failed in.
pub(crate) fn aws<E>(
    operation: &str,
    region: &str,
) -> impl FnOnce(SdkError<E, HttpResponse>) -> PublishError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let operation = operation.to_owned();
    let region = region.to_owned();
    move |error| PublishError::Aws {
        operation,
        region,
        source: Box::new(AwsCallError::from_sdk(&error)),
    }
}
