//! Running a compiled recipe on EC2 Image Builder: create or reuse its resources, start the
//! build, follow it to the end, and keep what it made as bake's build record.
//!
//! - **Look before create.** Every resource is looked up by its name (owner: self) first; only
//!   missing ones are created, each with a client token derived from the version, so a retried
//!   call cannot create a second one. A second build of a version creates nothing: its image,
//!   once `AVAILABLE`, is found and recorded; one still in progress is followed.
//! - **Waiting is a value.** The image is polled every [`EngineOptions::poll`]; each change of
//!   its state and of a workflow step (`build-image: ApplyBuildComponents running`) is
//!   reported.
//! - **Failure** reports Image Builder's reason and where the logs are (CloudWatch Logs group
//!   `/aws/imagebuilder/<recipe name>`). Nothing is deleted (a retry of the version reuses
//!   the resources); the run's journal stays, so `bake cleanup` can remove them while the
//!   version has no build ([`super::cleanup`]).
//! - **Ctrl-C** (the cancel flag) cancels the build (`CancelImageCreation`) and waits until
//!   Image Builder says it is cancelled (or past the point where it can be).
//! - Everything bake creates carries `bake:recipe` and `bake:version`; the output AMIs too (in
//!   the distribution's AMI tags), so a store that never saw the build can still trace them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_imagebuilder::error::ProvideErrorMetadata;
use aws_sdk_imagebuilder::types::{
    AmiDistributionConfiguration, ComponentConfiguration, ContainerDistributionConfiguration,
    ContainerRepositoryService, ContainerType, Distribution, EbsInstanceBlockDeviceSpecification,
    EbsVolumeType, Filter, ImageStatus, ImageTestsConfiguration, InstanceBlockDeviceMapping,
    InstanceMetadataOptions, LaunchPermissionConfiguration, LaunchTemplateConfiguration, Ownership,
    Platform, SsmParameterConfiguration, SsmParameterDataType, TargetContainerRepository,
    WorkflowStepExecutionStatus,
};
use serde::{Deserialize, Serialize};

use aws_sdk_s3::types::{
    BucketLocationConstraint, CreateBucketConfiguration, PublicAccessBlockConfiguration, Tag,
    Tagging,
};

use super::compile::Compiled;
use crate::ami::RegionImage;
use crate::ami::instance::SourceAmi;
use crate::ami::journal::{Journal, ResourceKind};
use crate::aws::Aws;
use crate::build::pipeline::BuildReporter;
use crate::plan::Plan;
use crate::store::{Artifact, BuildRecord, ImageBuilderAmi, ImageBuilderContainer, Store};

/// How long bake follows one build before it gives up waiting (the build goes on in AWS):
/// Image Builder's own default timeout for a build's tests is 12 hours, and builds of large
/// images with many components take several.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(12 * 60 * 60);

/// The tag on the S3 bucket bake creates for component files (its value says what for).
pub const TAG_BUCKET: &str = "bake:bucket";

/// How long a cancelled build may take to reach `CANCELLED` before bake stops waiting.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How the engine runs.
#[derive(Clone)]
pub struct EngineOptions {
    /// Pause between polls of the image's state.
    pub poll: Duration,
    /// Set by Ctrl-C: the build is cancelled at the next poll.
    pub cancel: Arc<AtomicBool>,
}

impl EngineOptions {
    /// Image Builder's state changes take minutes; a poll every 15 s shows them promptly at a
    /// negligible request rate.
    pub const DEFAULT_POLL: Duration = Duration::from_secs(15);
}

/// What a build on Image Builder produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageBuilderOutput {
    pub name: String,
    pub version: String,
    /// The Image Builder image (build version) ARN.
    pub image_arn: String,
    /// The build's workflow executions (`wf-…`).
    pub workflow_executions: Vec<String>,
    /// The source AMI, or for a container the parent image.
    pub source_ami: String,
    /// Every region's AMI, the build region first (none for a container).
    pub regions: Vec<RegionImage>,
    /// A container's manifest digest, in ECR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// A container's `REPOSITORY@DIGEST`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_reference: Option<String>,
    /// ARNs of the Image Builder resources this run created (empty when it reused them all).
    pub created: Vec<String>,
    /// `s3://` URIs of the files this run uploaded for its components (empty when the bucket
    /// had them all).
    pub uploaded: Vec<String>,
    /// Whether this run started the build (false: an earlier run's image was found).
    pub started_build: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("failed to {action} in {region}")]
    Aws {
        action: String,
        region: String,
        #[source]
        source: crate::ami::instance::AwsDetail,
    },
    #[error("Image Builder image {image_arn} failed: {reason}")]
    Failed {
        image_arn: String,
        reason: String,
        logs: String,
    },
    #[error("the build was interrupted; Image Builder image {image_arn} is {state}")]
    Interrupted { image_arn: String, state: String },
    #[error("Image Builder image {image_arn} ended {state}")]
    Ended { image_arn: String, state: String },
    #[error("Image Builder image {image_arn} did not finish within {}", humantime::format_duration(*waited))]
    Timeout { image_arn: String, waited: Duration },
    #[error("Image Builder image {image_arn} is available but its container image was not found")]
    NoContainer { image_arn: String },
    #[error("Image Builder image {image_arn} names `{uri}`, which is not an image reference")]
    BadImageUri { image_arn: String, uri: String },
    #[error("failed to ask the registry for `{reference}`")]
    Registry {
        reference: String,
        #[source]
        source: Box<crate::registry::RegistryError>,
    },
    #[error("failed to keep the run's journal")]
    Journal {
        #[source]
        source: crate::ami::journal::JournalError,
    },
    #[error("Image Builder image {image_arn} is available but names no AMI in {region}")]
    NoAmi { image_arn: String, region: String },
    #[error(
        "`{text}` is not an Image Builder image ARN (arn:aws:imagebuilder:REGION:ACCOUNT:image/NAME/VERSION/BUILD)"
    )]
    NotAnImageArn { text: String },
    #[error(
        "Image Builder image {image_arn} was made from image recipe `{image_recipe}`, not `{expected}`: it is not version {version} of this recipe"
    )]
    OtherVersion {
        image_arn: String,
        image_recipe: String,
        expected: String,
        version: String,
    },
}

/// Where an Image Builder image came from (see [`Engine::image_origin`]).
#[derive(Debug, Clone)]
pub struct ImageOrigin {
    pub region: String,
    /// The name of the image recipe it was built from (bake's names carry the version).
    pub image_recipe: String,
    /// The AMI its image recipe starts from.
    pub parent_image: String,
    pub status: ImageStatus,
}

/// The region of an ARN (`arn:PARTITION:SERVICE:REGION:…`), if it is an Image Builder image's.
fn arn_region(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(_), Some("imagebuilder"), Some(region), Some(_), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    (!region.is_empty() && resource.starts_with("image/")).then_some(region)
}

impl EngineError {
    pub fn hint(&self) -> Option<String> {
        match self {
            EngineError::Failed { logs, .. } => Some(format!(
                "the build's logs are in {logs}; fix the recipe and build again (a changed recipe is a new version with its own resources)"
            )),
            EngineError::OtherVersion { .. } => Some(
                "import the image with the recipe and the variables it was exported with (`bake export imagebuilder` names the version in every resource)".into(),
            ),
            EngineError::Timeout { .. } => Some(
                "the build goes on in AWS; `bake build` again follows it and records its AMIs"
                    .into(),
            ),
            EngineError::Aws { source, .. } if source.0.contains("instance profile") => Some(
                "Image Builder's instances need an instance profile: set `outputs.ami.instance.iam_instance_profile`, or create `EC2InstanceProfileForImageBuilder` as AWS's Image Builder guide describes".into(),
            ),
            _ => None,
        }
    }

    pub fn is_interrupted(&self) -> bool {
        matches!(self, EngineError::Interrupted { .. })
    }

    /// Whether the recipe is at fault (its build failed), not the machine or AWS.
    pub fn is_recipe_failure(&self) -> bool {
        matches!(self, EngineError::Failed { .. })
    }

    /// Whether what the user named is wrong (an ARN that is not an image's, or another
    /// version's image), not the machine or AWS.
    pub fn is_usage_error(&self) -> bool {
        matches!(
            self,
            EngineError::NotAnImageArn { .. } | EngineError::OtherVersion { .. }
        )
    }
}

fn aws<E: ProvideErrorMetadata + std::fmt::Debug>(
    action: impl Into<String>,
    region: &str,
) -> impl FnOnce(E) -> EngineError {
    let action = action.into();
    let region = region.to_owned();
    move |error| EngineError::Aws {
        action,
        region,
        source: crate::ami::instance::AwsDetail(match (error.code(), error.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            _ => format!("{error:?}"),
        }),
    }
}

/// A client token (1 to 36 characters) for creating `what` of `version`: the same call for the
/// same version is the same request, so a retry cannot create twice.
pub fn client_token(version: &str, what: &str) -> String {
    let digest = crate::id::Digest::of(format!("{version}\n{what}").as_bytes());
    digest.hex()[..32].to_owned()
}

/// Runs builds on Image Builder.
pub struct Engine<'a> {
    pub aws: &'a Aws,
    pub store: &'a Store,
    /// Reads a container build's digest from the registry it was pushed to (ECR).
    pub registry: Option<crate::registry::Client>,
    pub options: EngineOptions,
}

impl Engine<'_> {
    /// Builds `compiled` (from `plan`, on `source`) and writes the version's build record.
    ///
    /// The run keeps a journal of what it creates (in the store, as AMI builds do). Once the
    /// build record is written the journal goes: the resources are the recorded version's. A
    /// run that fails, is cancelled or is killed leaves it, and `bake cleanup` removes what it
    /// names unless the version got built meanwhile ([`super::cleanup`]).
    pub async fn build(
        &self,
        plan: &Plan,
        source: Option<&SourceAmi>,
        compiled: &Compiled,
        reporter: &mut dyn BuildReporter,
    ) -> Result<ImageBuilderOutput, EngineError> {
        let journal = Journal::begin(self.store, &plan.name, compiled.version.as_str())
            .map_err(|source| EngineError::Journal { source })?;
        let result = self
            .build_journaled(plan, source, compiled, &journal, reporter)
            .await;
        // Nothing created: nothing for cleanup, whatever the outcome.
        if (result.is_ok() || journal.live().is_empty())
            && let Err(e) = journal.finish()
        {
            tracing::warn!("failed to delete the run's journal: {e}");
        }
        result
    }

    async fn build_journaled(
        &self,
        plan: &Plan,
        source: Option<&SourceAmi>,
        compiled: &Compiled,
        journal: &Journal,
        reporter: &mut dyn BuildReporter,
    ) -> Result<ImageBuilderOutput, EngineError> {
        let journaled = |kind: ResourceKind, name: &str| {
            journal
                .creating(kind, &compiled.region, name)
                .map_err(|source| EngineError::Journal { source })
        };
        let settled = |entry, arn: &str| {
            journal
                .created(entry, arn)
                .map_err(|source| EngineError::Journal { source })
        };
        let started = Instant::now();
        let region = compiled.region.as_str();
        let client = self.aws.imagebuilder(region);
        let version = compiled.version.as_str();
        let mut created = Vec::new();
        let uploaded = self.deliver_files(compiled, reporter).await?;

        let mut component_arns = HashMap::new();
        for component in &compiled.components {
            let arn = match self
                .find_component(&client, region, &component.name)
                .await?
            {
                Some(arn) => arn,
                None => {
                    let entry = journaled(ResourceKind::ImageBuilderComponent, &component.name)?;
                    let arn = client
                        .create_component()
                        .name(&component.name)
                        .semantic_version(&component.semantic_version)
                        .description(&component.description)
                        .platform(Platform::Linux)
                        .data(&component.data)
                        .set_tags(Some(to_map(&component.tags)))
                        .client_token(client_token(
                            version,
                            &format!("component {}", component.name),
                        ))
                        .send()
                        .await
                        .map_err(aws(
                            format!("create component `{}`", component.name),
                            region,
                        ))?
                        .component_build_version_arn()
                        .unwrap_or_default()
                        .to_owned();
                    settled(entry, &arn)?;
                    reporter.message(&format!("created component {arn}"));
                    created.push(arn.clone());
                    arn
                }
            };
            component_arns.insert(component.name.clone(), arn);
        }

        let recipe_arn = match (&compiled.image_recipe, &compiled.container_recipe) {
            (Some(recipe), _) => match self
                .find_image_recipe(&client, region, &recipe.name)
                .await?
            {
                Some(arn) => arn,
                None => {
                    let entry = journaled(ResourceKind::ImageBuilderImageRecipe, &recipe.name)?;
                    let mut request = client
                        .create_image_recipe()
                        .name(&recipe.name)
                        .semantic_version(&recipe.semantic_version)
                        .description(&recipe.description)
                        .parent_image(&recipe.parent_image)
                        .set_tags(Some(to_map(&recipe.tags)))
                        .client_token(client_token(
                            version,
                            &format!("image recipe {}", recipe.name),
                        ));
                    for name in &recipe.components {
                        request = request.components(
                            ComponentConfiguration::builder()
                                .component_arn(&component_arns[name])
                                .build()
                                .expect("the component ARN is set"),
                        );
                    }
                    for mapping in &recipe.block_device_mappings {
                        request = request.block_device_mappings(
                            InstanceBlockDeviceMapping::builder()
                                .device_name(&mapping.device_name)
                                .ebs(
                                    EbsInstanceBlockDeviceSpecification::builder()
                                        .encrypted(mapping.ebs.encrypted)
                                        .set_kms_key_id(mapping.ebs.kms_key_id.clone())
                                        .volume_size(mapping.ebs.volume_size as i32)
                                        .volume_type(EbsVolumeType::from(
                                            mapping.ebs.volume_type.as_str(),
                                        ))
                                        .delete_on_termination(mapping.ebs.delete_on_termination)
                                        .build(),
                                )
                                .build(),
                        );
                    }
                    let arn = request
                        .send()
                        .await
                        .map_err(aws(
                            format!("create image recipe `{}`", recipe.name),
                            region,
                        ))?
                        .image_recipe_arn()
                        .unwrap_or_default()
                        .to_owned();
                    settled(entry, &arn)?;
                    reporter.message(&format!("created image recipe {arn}"));
                    created.push(arn.clone());
                    arn
                }
            },
            (None, Some(recipe)) => match self
                .find_container_recipe(&client, region, &recipe.name)
                .await?
            {
                Some(arn) => arn,
                None => {
                    let entry = journaled(ResourceKind::ImageBuilderContainerRecipe, &recipe.name)?;
                    let mut request = client
                        .create_container_recipe()
                        .container_type(ContainerType::Docker)
                        .name(&recipe.name)
                        .semantic_version(&recipe.semantic_version)
                        .description(&recipe.description)
                        .parent_image(&recipe.parent_image)
                        .dockerfile_template_data(&recipe.dockerfile_template_data)
                        .target_repository(sdk_repository(&recipe.target_repository))
                        .set_tags(Some(to_map(&recipe.tags)))
                        .client_token(client_token(
                            version,
                            &format!("container recipe {}", recipe.name),
                        ));
                    for name in &recipe.components {
                        request = request.components(
                            ComponentConfiguration::builder()
                                .component_arn(&component_arns[name])
                                .build()
                                .expect("the component ARN is set"),
                        );
                    }
                    let arn = request
                        .send()
                        .await
                        .map_err(aws(
                            format!("create container recipe `{}`", recipe.name),
                            region,
                        ))?
                        .container_recipe_arn()
                        .unwrap_or_default()
                        .to_owned();
                    settled(entry, &arn)?;
                    reporter.message(&format!("created container recipe {arn}"));
                    created.push(arn.clone());
                    arn
                }
            },
            (None, None) => unreachable!("a compiled recipe has an image or a container recipe"),
        };

        let infra = &compiled.infrastructure_configuration;
        let infra_arn = match self
            .find_infrastructure(&client, region, &infra.name)
            .await?
        {
            Some(arn) => arn,
            None => {
                let entry = journaled(ResourceKind::ImageBuilderInfrastructure, &infra.name)?;
                let arn = client
                    .create_infrastructure_configuration()
                    .name(&infra.name)
                    .description(&infra.description)
                    .set_instance_types(Some(infra.instance_types.clone()))
                    .instance_profile_name(&infra.instance_profile_name)
                    .set_subnet_id(infra.subnet_id.clone())
                    .terminate_instance_on_failure(infra.terminate_instance_on_failure)
                    .instance_metadata_options(
                        InstanceMetadataOptions::builder()
                            .http_tokens(&infra.instance_metadata_options.http_tokens)
                            .http_put_response_hop_limit(
                                infra.instance_metadata_options.http_put_response_hop_limit,
                            )
                            .build(),
                    )
                    .set_resource_tags(Some(to_map(&infra.resource_tags)))
                    .set_tags(Some(to_map(&infra.tags)))
                    .client_token(client_token(
                        version,
                        &format!("infrastructure configuration {}", infra.name),
                    ))
                    .send()
                    .await
                    .map_err(aws(
                        format!("create infrastructure configuration `{}`", infra.name),
                        region,
                    ))?
                    .infrastructure_configuration_arn()
                    .unwrap_or_default()
                    .to_owned();
                settled(entry, &arn)?;
                reporter.message(&format!("created infrastructure configuration {arn}"));
                created.push(arn.clone());
                arn
            }
        };

        let distribution = &compiled.distribution_configuration;
        let distribution_arn = match self
            .find_distribution(&client, region, &distribution.name)
            .await?
        {
            Some(arn) => arn,
            None => {
                let entry = journaled(ResourceKind::ImageBuilderDistribution, &distribution.name)?;
                let mut request = client
                    .create_distribution_configuration()
                    .name(&distribution.name)
                    .description(&distribution.description)
                    .set_tags(Some(to_map(&distribution.tags)))
                    .client_token(client_token(
                        version,
                        &format!("distribution configuration {}", distribution.name),
                    ));
                for d in &distribution.distributions {
                    request = request.distributions(sdk_distribution(d));
                }
                let arn = request
                    .send()
                    .await
                    .map_err(aws(
                        format!("create distribution configuration `{}`", distribution.name),
                        region,
                    ))?
                    .distribution_configuration_arn()
                    .unwrap_or_default()
                    .to_owned();
                settled(entry, &arn)?;
                reporter.message(&format!("created distribution configuration {arn}"));
                created.push(arn.clone());
                arn
            }
        };

        // The image: an earlier run's, or a new build.
        let image_version_arn = recipe_arn
            .replacen(":image-recipe/", ":image/", 1)
            .replacen(":container-recipe/", ":image/", 1);
        let recipe_name = compiled.recipe_name();
        let builds = self.builds(&client, region, &image_version_arn).await?;
        let current = builds
            .iter()
            .find(|(_, status)| *status == ImageStatus::Available)
            .or_else(|| builds.iter().find(|(_, status)| in_progress(status)));
        let (image_arn, started_build) = match current {
            Some((arn, status)) => {
                reporter.message(&format!(
                    "Image Builder image {arn} of this version is {}: following it",
                    status.as_str()
                ));
                (arn.clone(), false)
            }
            None => {
                // Failed or cancelled attempts count, so a rebuild after one gets a fresh token.
                let attempt = builds.len() + 1;
                let entry = journaled(ResourceKind::ImageBuilderImage, recipe_name)?;
                let container = compiled.container_recipe.is_some();
                let arn = client
                    .create_image()
                    .set_image_recipe_arn((!container).then(|| recipe_arn.clone()))
                    .set_container_recipe_arn(container.then(|| recipe_arn.clone()))
                    .infrastructure_configuration_arn(&infra_arn)
                    .distribution_configuration_arn(&distribution_arn)
                    .image_tests_configuration(
                        ImageTestsConfiguration::builder()
                            .image_tests_enabled(compiled.has_tests())
                            .build(),
                    )
                    .set_tags(Some(to_map(compiled.tags())))
                    .client_token(client_token(version, &format!("image attempt {attempt}")))
                    .send()
                    .await
                    .map_err(aws("start the Image Builder build", region))?
                    .image_build_version_arn()
                    .unwrap_or_default()
                    .to_owned();
                settled(entry, &arn)?;
                reporter.message(&format!("started Image Builder image {arn}"));
                (arn, true)
            }
        };

        let workflow_executions = self
            .follow(&client, region, &compiled.recipe, &image_arn, reporter)
            .await?;
        let (regions, container, source_ami) = match (source, &compiled.container_recipe) {
            (_, Some(recipe)) => {
                let container = self
                    .record_container(
                        region,
                        plan,
                        recipe,
                        &image_arn,
                        &workflow_executions,
                        started,
                    )
                    .await?;
                (Vec::new(), Some(container), recipe.parent_image.clone())
            }
            (Some(source), None) => {
                let regions = self
                    .record_image(
                        region,
                        plan,
                        source,
                        compiled,
                        &image_arn,
                        &workflow_executions,
                        started,
                    )
                    .await?;
                (regions, None, source.image_id.clone())
            }
            (None, None) => unreachable!("an image recipe is compiled on a source AMI"),
        };
        Ok(ImageBuilderOutput {
            name: plan.name.clone(),
            version: plan.version.to_string(),
            image_arn,
            workflow_executions,
            source_ami,
            regions,
            image_digest: container.as_ref().map(|c| c.image_digest.to_string()),
            image_reference: container
                .as_ref()
                .map(|c| format!("{}@{}", c.repository, c.image_digest)),
            created,
            uploaded,
            started_build,
        })
    }

    /// Writes the version's build record from the finished container image `image_arn`: the
    /// image Image Builder pushed, by the digest its registry answers for the first URI Image
    /// Builder reported (URIs name tags, which can move; the record pins the digest).
    async fn record_container(
        &self,
        region: &str,
        plan: &Plan,
        recipe: &super::compile::ContainerRecipe,
        image_arn: &str,
        workflow_executions: &[String],
        started: Instant,
    ) -> Result<ImageBuilderContainer, EngineError> {
        let image = self
            .aws
            .imagebuilder(region)
            .get_image()
            .image_build_version_arn(image_arn)
            .send()
            .await
            .map_err(aws("read the finished image", region))?;
        let containers = image
            .image()
            .and_then(|i| i.output_resources())
            .map(|o| o.containers().to_vec())
            .unwrap_or_default();
        let image_uris: Vec<String> = containers
            .iter()
            .filter(|c| c.region().is_none_or(|r| r == region))
            .chain(
                containers
                    .iter()
                    .filter(|c| c.region().is_some_and(|r| r != region)),
            )
            .flat_map(|c| c.image_uris().iter().cloned())
            .collect();
        let no_image = || EngineError::NoContainer {
            image_arn: image_arn.to_owned(),
        };
        let uri = image_uris.first().ok_or_else(no_image)?;
        let reference: crate::registry::Reference =
            uri.parse().map_err(|_| EngineError::BadImageUri {
                image_arn: image_arn.to_owned(),
                uri: uri.clone(),
            })?;
        let registry = self.registry.as_ref().ok_or_else(no_image)?;
        let info = registry
            .head_manifest(&reference)
            .await
            .map_err(|source| EngineError::Registry {
                reference: uri.clone(),
                source: Box::new(source),
            })?
            .ok_or_else(no_image)?;
        let image_digest: crate::id::Digest =
            info.digest.parse().map_err(|_| EngineError::BadImageUri {
                image_arn: image_arn.to_owned(),
                uri: format!("{uri} (digest {})", info.digest),
            })?;
        let container = ImageBuilderContainer {
            parent_image: recipe.parent_image.clone(),
            image_arn: image_arn.to_owned(),
            workflow_executions: workflow_executions.to_vec(),
            repository: reference.name(),
            image_digest,
            image_uris,
        };
        let mut record = BuildRecord::new(
            &plan.name,
            &plan.version,
            &plan.recipe,
            &plan.inputs,
            Artifact::ImageBuilderContainer {
                image: container.clone(),
            },
        );
        record.started =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now() - started.elapsed())
                .to_string();
        record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Err(e) = self.store.put_record(&record) {
            // The image is in ECR under the version's tags; a rebuild finds it and writes it.
            tracing::warn!("failed to write the build record: {e}");
        }
        Ok(container)
    }

    /// Writes the version's build record from the finished image `image_arn` (of `region`): its
    /// AMI in every region of the distribution, their root snapshots, the source and the
    /// workflow executions. Returns the regions' AMIs.
    #[allow(clippy::too_many_arguments)]
    async fn record_image(
        &self,
        region: &str,
        plan: &Plan,
        source: &SourceAmi,
        compiled: &Compiled,
        image_arn: &str,
        workflow_executions: &[String],
        started: Instant,
    ) -> Result<Vec<RegionImage>, EngineError> {
        let image = self
            .aws
            .imagebuilder(region)
            .get_image()
            .image_build_version_arn(image_arn)
            .send()
            .await
            .map_err(aws("read the finished image", region))?;
        let amis: Vec<(String, String)> = image
            .image()
            .and_then(|i| i.output_resources())
            .map(|o| {
                o.amis()
                    .iter()
                    .filter_map(|a| Some((a.region()?.to_owned(), a.image()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        let mut regions = Vec::new();
        for distribution in &compiled.distribution_configuration.distributions {
            let region = &distribution.region;
            let image_id = amis
                .iter()
                .find(|(r, _)| r == region)
                .map(|(_, id)| id.clone())
                .ok_or_else(|| EngineError::NoAmi {
                    image_arn: image_arn.to_owned(),
                    region: region.clone(),
                })?;
            let snapshot_id = self.root_snapshot(region, &image_id).await?;
            regions.push(RegionImage {
                region: region.clone(),
                image_id,
                snapshot_id,
            });
        }
        let image_name = image
            .image()
            .and_then(|i| i.output_resources())
            .and_then(|o| o.amis().first())
            .and_then(|a| a.name())
            .unwrap_or_default()
            .to_owned();
        let mut record = BuildRecord::new(
            &plan.name,
            &plan.version,
            &plan.recipe,
            &plan.inputs,
            Artifact::ImageBuilderAmi {
                ami: ImageBuilderAmi {
                    source: source.clone(),
                    image_arn: image_arn.to_owned(),
                    image_name,
                    workflow_executions: workflow_executions.to_vec(),
                    regions: regions.clone(),
                },
            },
        );
        record.started =
            humantime::format_rfc3339_seconds(std::time::SystemTime::now() - started.elapsed())
                .to_string();
        record.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Err(e) = self.store.put_record(&record) {
            // The AMIs exist and carry the version's tags; a rebuild finds them and writes it.
            tracing::warn!("failed to write the build record: {e}");
        }
        Ok(regions)
    }

    /// The image `image_arn` was made from: its region, its image recipe's name and its parent
    /// AMI. What `bake import imagebuilder` plans the recipe with, so that the version it
    /// computes is the one the image was built as, whatever the source AMI filter finds today.
    pub async fn image_origin(&self, image_arn: &str) -> Result<ImageOrigin, EngineError> {
        let region = arn_region(image_arn).ok_or_else(|| EngineError::NotAnImageArn {
            text: image_arn.to_owned(),
        })?;
        let out = self
            .aws
            .imagebuilder(region)
            .get_image()
            .image_build_version_arn(image_arn)
            .send()
            .await
            .map_err(aws(format!("read Image Builder image {image_arn}"), region))?;
        let image = out.image();
        let recipe = image.and_then(|i| i.image_recipe());
        Ok(ImageOrigin {
            region: region.to_owned(),
            image_recipe: recipe.and_then(|r| r.name()).unwrap_or_default().to_owned(),
            parent_image: recipe
                .and_then(|r| r.parent_image())
                .unwrap_or_default()
                .to_owned(),
            status: image
                .and_then(|i| i.state())
                .and_then(|s| s.status())
                .cloned()
                .unwrap_or(ImageStatus::Pending),
        })
    }

    /// Records an image Image Builder made without bake (by a pipeline `bake export
    /// imagebuilder` defined) as the version `compiled` is: it must be that version's image
    /// (made from the image recipe named after it) and available. Nothing is created or
    /// started.
    pub async fn import(
        &self,
        plan: &Plan,
        source: &SourceAmi,
        compiled: &Compiled,
        image_arn: &str,
        reporter: &mut dyn BuildReporter,
    ) -> Result<ImageBuilderOutput, EngineError> {
        let started = Instant::now();
        let origin = self.image_origin(image_arn).await?;
        if origin.image_recipe != compiled.recipe_name() {
            return Err(EngineError::OtherVersion {
                image_arn: image_arn.to_owned(),
                image_recipe: origin.image_recipe,
                expected: compiled.recipe_name().to_owned(),
                version: plan.version.to_string(),
            });
        }
        if origin.status != ImageStatus::Available {
            return Err(EngineError::Ended {
                image_arn: image_arn.to_owned(),
                state: origin.status.as_str().to_owned(),
            });
        }
        let client = self.aws.imagebuilder(&origin.region);
        let mut workflow_executions = Vec::new();
        let mut steps = HashMap::new();
        self.report_steps(
            &client,
            image_arn,
            &mut workflow_executions,
            &mut steps,
            reporter,
        )
        .await;
        let regions = self
            .record_image(
                &origin.region,
                plan,
                source,
                compiled,
                image_arn,
                &workflow_executions,
                started,
            )
            .await?;
        Ok(ImageBuilderOutput {
            name: plan.name.clone(),
            version: plan.version.to_string(),
            image_arn: image_arn.to_owned(),
            workflow_executions,
            source_ami: source.image_id.clone(),
            regions,
            image_digest: None,
            image_reference: None,
            created: Vec::new(),
            uploaded: Vec::new(),
            started_build: false,
        })
    }

    /// Puts the files the components fetch into their bucket: the bucket is created (private,
    /// tagged as bake's) when missing, and an object already there is not sent again (keys are
    /// content digests). Returns the URIs uploaded.
    async fn deliver_files(
        &self,
        compiled: &Compiled,
        reporter: &mut dyn BuildReporter,
    ) -> Result<Vec<String>, EngineError> {
        let Some(first) = compiled.files.first() else {
            return Ok(Vec::new());
        };
        let region = compiled.region.as_str();
        let s3 = self.aws.s3(region);
        let bucket = first.bucket.as_str();
        match s3.head_bucket().bucket(bucket).send().await {
            Ok(_) => {}
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {
                let mut request = s3.create_bucket().bucket(bucket);
                // us-east-1 is S3's default location and refuses to be named as a constraint.
                if region != "us-east-1" {
                    request = request.create_bucket_configuration(
                        CreateBucketConfiguration::builder()
                            .location_constraint(BucketLocationConstraint::from(region))
                            .build(),
                    );
                }
                request
                    .send()
                    .await
                    .map_err(aws(format!("create S3 bucket `{bucket}`"), region))?;
                s3.put_public_access_block()
                    .bucket(bucket)
                    .public_access_block_configuration(
                        PublicAccessBlockConfiguration::builder()
                            .block_public_acls(true)
                            .ignore_public_acls(true)
                            .block_public_policy(true)
                            .restrict_public_buckets(true)
                            .build(),
                    )
                    .send()
                    .await
                    .map_err(aws(format!("make S3 bucket `{bucket}` private"), region))?;
                s3.put_bucket_tagging()
                    .bucket(bucket)
                    .tagging(
                        Tagging::builder()
                            .tag_set(
                                Tag::builder()
                                    .key(TAG_BUCKET)
                                    .value("imagebuilder-files")
                                    .build()
                                    .expect("key and value are set"),
                            )
                            .build()
                            .expect("the tag set is set"),
                    )
                    .send()
                    .await
                    .map_err(aws(format!("tag S3 bucket `{bucket}`"), region))?;
                reporter.message(&format!("created S3 bucket {bucket}"));
            }
            Err(e) => return Err(aws(format!("look for S3 bucket `{bucket}`"), region)(e)),
        }
        let mut uploaded = Vec::new();
        for file in &compiled.files {
            match s3
                .head_object()
                .bucket(&file.bucket)
                .key(&file.key)
                .send()
                .await
            {
                Ok(_) => continue,
                Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {}
                Err(e) => {
                    return Err(aws(format!("look for {}", file.uri()), region)(e));
                }
            }
            let checksum = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                hex::decode(&file.sha256).expect("the digest is hex"),
            );
            s3.put_object()
                .bucket(&file.bucket)
                .key(&file.key)
                .body(aws_sdk_s3::primitives::ByteStream::from(file.bytes.clone()))
                .checksum_sha256(checksum)
                .send()
                .await
                .map_err(aws(format!("upload {}", file.uri()), region))?;
            reporter.message(&format!("uploaded {} ({} bytes)", file.uri(), file.size));
            uploaded.push(file.uri());
        }
        Ok(uploaded)
    }

    async fn find_component(
        &self,
        client: &aws_sdk_imagebuilder::Client,
        region: &str,
        name: &str,
    ) -> Result<Option<String>, EngineError> {
        let out = client
            .list_components()
            .owner(Ownership::SelfValue)
            .filters(name_filter(name))
            .send()
            .await
            .map_err(aws(format!("look for component `{name}`"), region))?;
        Ok(out
            .component_version_list()
            .iter()
            .find(|c| c.name() == Some(name))
            .and_then(|c| c.arn())
            .map(str::to_owned))
    }

    async fn find_image_recipe(
        &self,
        client: &aws_sdk_imagebuilder::Client,
        region: &str,
        name: &str,
    ) -> Result<Option<String>, EngineError> {
        let out = client
            .list_image_recipes()
            .owner(Ownership::SelfValue)
            .filters(name_filter(name))
            .send()
            .await
            .map_err(aws(format!("look for image recipe `{name}`"), region))?;
        Ok(out
            .image_recipe_summary_list()
            .iter()
            .find(|r| r.name() == Some(name))
            .and_then(|r| r.arn())
            .map(str::to_owned))
    }

    async fn find_container_recipe(
        &self,
        client: &aws_sdk_imagebuilder::Client,
        region: &str,
        name: &str,
    ) -> Result<Option<String>, EngineError> {
        let out = client
            .list_container_recipes()
            .owner(Ownership::SelfValue)
            .filters(name_filter(name))
            .send()
            .await
            .map_err(aws(format!("look for container recipe `{name}`"), region))?;
        Ok(out
            .container_recipe_summary_list()
            .iter()
            .find(|r| r.name() == Some(name))
            .and_then(|r| r.arn())
            .map(str::to_owned))
    }

    async fn find_infrastructure(
        &self,
        client: &aws_sdk_imagebuilder::Client,
        region: &str,
        name: &str,
    ) -> Result<Option<String>, EngineError> {
        let out = client
            .list_infrastructure_configurations()
            .filters(name_filter(name))
            .send()
            .await
            .map_err(aws(
                format!("look for infrastructure configuration `{name}`"),
                region,
            ))?;
        Ok(out
            .infrastructure_configuration_summary_list()
            .iter()
            .find(|r| r.name() == Some(name))
            .and_then(|r| r.arn())
            .map(str::to_owned))
    }

    async fn find_distribution(
        &self,
        client: &aws_sdk_imagebuilder::Client,
        region: &str,
        name: &str,
    ) -> Result<Option<String>, EngineError> {
        let out = client
            .list_distribution_configurations()
            .filters(name_filter(name))
            .send()
            .await
            .map_err(aws(
                format!("look for distribution configuration `{name}`"),
                region,
            ))?;
        Ok(out
            .distribution_configuration_summary_list()
            .iter()
            .find(|r| r.name() == Some(name))
            .and_then(|r| r.arn())
            .map(str::to_owned))
    }

    /// Every build of the image version, oldest first, with its state.
    async fn builds(
        &self,
        client: &aws_sdk_imagebuilder::Client,
        region: &str,
        image_version_arn: &str,
    ) -> Result<Vec<(String, ImageStatus)>, EngineError> {
        let mut found = Vec::new();
        let mut token = None;
        loop {
            let out = client
                .list_image_build_versions()
                .image_version_arn(image_version_arn)
                .set_next_token(token)
                .send()
                .await
                .map_err(aws("look for images of this version", region))?;
            for summary in out.image_summary_list() {
                if let (Some(arn), Some(status)) =
                    (summary.arn(), summary.state().and_then(|s| s.status()))
                {
                    found.push((arn.to_owned(), status.clone()));
                }
            }
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        Ok(found)
    }

    /// Polls the image until it is available, reporting each change of its state and of its
    /// workflows' steps; cancels it on Ctrl-C. Returns the workflow execution ids.
    async fn follow(
        &self,
        client: &aws_sdk_imagebuilder::Client,
        region: &str,
        recipe: &str,
        image_arn: &str,
        reporter: &mut dyn BuildReporter,
    ) -> Result<Vec<String>, EngineError> {
        let started = Instant::now();
        let mut last_state = String::new();
        let mut steps: HashMap<String, String> = HashMap::new();
        let mut executions: Vec<String> = Vec::new();
        let mut cancelled_at: Option<Instant> = None;
        loop {
            if cancelled_at.is_none() && self.options.cancel.load(Ordering::SeqCst) {
                reporter.message(&format!("cancelling Image Builder image {image_arn}"));
                match client
                    .cancel_image_creation()
                    .image_build_version_arn(image_arn)
                    .client_token(client_token(image_arn, "cancel"))
                    .send()
                    .await
                {
                    Ok(_) => {}
                    // Distributing or integrating: past the point where a build can stop.
                    Err(e) if e.code() == Some("ResourceInUseException") => {
                        reporter.message(&format!(
                            "Image Builder image {image_arn} is past cancelling ({}); it will finish",
                            e.message().unwrap_or_default()
                        ));
                    }
                    Err(e) => return Err(aws("cancel the Image Builder build", region)(e)),
                }
                cancelled_at = Some(Instant::now());
            }
            let out = client
                .get_image()
                .image_build_version_arn(image_arn)
                .send()
                .await
                .map_err(aws("follow the Image Builder build", region))?;
            let state = out.image().and_then(|i| i.state());
            let status = state
                .and_then(|s| s.status())
                .cloned()
                .unwrap_or(ImageStatus::Pending);
            if status.as_str() != last_state {
                reporter.message(&format!("image {}", status.as_str()));
                last_state = status.as_str().to_owned();
            }
            self.report_steps(client, image_arn, &mut executions, &mut steps, reporter)
                .await;
            match status {
                ImageStatus::Available => return Ok(executions),
                ImageStatus::Failed => {
                    return Err(EngineError::Failed {
                        image_arn: image_arn.to_owned(),
                        reason: state
                            .and_then(|s| s.reason())
                            .unwrap_or("Image Builder gave no reason")
                            .to_owned(),
                        logs: format!(
                            "CloudWatch Logs group /aws/imagebuilder/{recipe} in {region}"
                        ),
                    });
                }
                ImageStatus::Cancelled if cancelled_at.is_some() => {
                    return Err(EngineError::Interrupted {
                        image_arn: image_arn.to_owned(),
                        state: "CANCELLED".into(),
                    });
                }
                ref other if !in_progress(other) => {
                    return Err(EngineError::Ended {
                        image_arn: image_arn.to_owned(),
                        state: other.as_str().to_owned(),
                    });
                }
                _ => {}
            }
            if let Some(at) = cancelled_at
                && at.elapsed() > CANCEL_TIMEOUT
            {
                return Err(EngineError::Interrupted {
                    image_arn: image_arn.to_owned(),
                    state: status.as_str().to_owned(),
                });
            }
            if started.elapsed() > BUILD_TIMEOUT {
                return Err(EngineError::Timeout {
                    image_arn: image_arn.to_owned(),
                    waited: BUILD_TIMEOUT,
                });
            }
            tokio::time::sleep(self.options.poll).await;
        }
    }

    /// Reports workflow steps whose status changed. Progress only: a failure to read them is
    /// logged, never fatal (the image's state decides the build).
    async fn report_steps(
        &self,
        client: &aws_sdk_imagebuilder::Client,
        image_arn: &str,
        executions: &mut Vec<String>,
        steps: &mut HashMap<String, String>,
        reporter: &mut dyn BuildReporter,
    ) {
        let listed = match client
            .list_workflow_executions()
            .image_build_version_arn(image_arn)
            .send()
            .await
        {
            Ok(listed) => listed,
            Err(e) => {
                tracing::debug!("workflow executions of {image_arn}: {e:?}");
                return;
            }
        };
        for execution in listed.workflow_executions() {
            let Some(id) = execution.workflow_execution_id() else {
                continue;
            };
            if !executions.iter().any(|e| e == id) {
                executions.push(id.to_owned());
            }
            let workflow = execution
                .workflow_build_version_arn()
                .and_then(|arn| arn.split('/').nth(2))
                .unwrap_or("workflow")
                .to_owned();
            let Ok(listed_steps) = client
                .list_workflow_step_executions()
                .workflow_execution_id(id)
                .send()
                .await
            else {
                continue;
            };
            for step in listed_steps.steps() {
                let (Some(step_id), Some(name), Some(status)) =
                    (step.step_execution_id(), step.name(), step.status())
                else {
                    continue;
                };
                if *status == WorkflowStepExecutionStatus::Pending {
                    continue;
                }
                let shown = status.as_str().to_ascii_lowercase();
                if steps.get(step_id) != Some(&shown) {
                    let message = step
                        .message()
                        .filter(|_| *status == WorkflowStepExecutionStatus::Failed)
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default();
                    reporter.message(&format!("{workflow}: {name} {shown}{message}"));
                    steps.insert(step_id.to_owned(), shown);
                }
            }
        }
    }

    /// The root volume's snapshot of an AMI (empty when EC2 names none).
    async fn root_snapshot(&self, region: &str, image_id: &str) -> Result<String, EngineError> {
        let out = self
            .aws
            .ec2(region)
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .map_err(aws(format!("describe AMI {image_id}"), region))?;
        Ok(out
            .images()
            .first()
            .and_then(|image| {
                let root = image.root_device_name();
                let mappings = image.block_device_mappings();
                mappings
                    .iter()
                    .find(|m| m.device_name() == root)
                    .or_else(|| mappings.first())
                    .and_then(|m| m.ebs())
                    .and_then(|e| e.snapshot_id())
                    .map(str::to_owned)
            })
            .unwrap_or_default())
    }
}

/// Whether a build in this state is still going (it may yet succeed, or be cancelled).
pub(crate) fn in_progress(status: &ImageStatus) -> bool {
    matches!(
        status,
        ImageStatus::Pending
            | ImageStatus::Creating
            | ImageStatus::Building
            | ImageStatus::Testing
            | ImageStatus::Distributing
            | ImageStatus::Integrating
    )
}

fn name_filter(name: &str) -> Filter {
    Filter::builder().name("name").values(name).build()
}

fn to_map(tags: &std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn sdk_repository(repository: &super::compile::TargetRepository) -> TargetContainerRepository {
    TargetContainerRepository::builder()
        .service(ContainerRepositoryService::from(
            repository.service.as_str(),
        ))
        .repository_name(&repository.repository_name)
        .build()
        .expect("the service and repository name are set")
}

fn sdk_distribution(d: &super::compile::Distribution) -> Distribution {
    let mut builder = Distribution::builder().region(&d.region);
    if let Some(container) = &d.container_distribution_configuration {
        builder = builder.container_distribution_configuration(
            ContainerDistributionConfiguration::builder()
                .set_description(container.description.clone())
                .set_container_tags(
                    Some(container.container_tags.clone()).filter(|t| !t.is_empty()),
                )
                .target_repository(sdk_repository(&container.target_repository))
                .build(),
        );
    }
    let Some(ami) = &d.ami_distribution_configuration else {
        return builder.build().expect("the region is set");
    };
    let permission = ami.launch_permission.as_ref().map(|p| {
        LaunchPermissionConfiguration::builder()
            .set_user_ids(Some(p.user_ids.clone()).filter(|v| !v.is_empty()))
            .set_user_groups(Some(p.user_groups.clone()).filter(|v| !v.is_empty()))
            .set_organization_arns(Some(p.organization_arns.clone()).filter(|v| !v.is_empty()))
            .set_organizational_unit_arns(
                Some(p.organizational_unit_arns.clone()).filter(|v| !v.is_empty()),
            )
            .build()
    });
    builder = builder.ami_distribution_configuration(
        AmiDistributionConfiguration::builder()
            .name(&ami.name)
            .set_description(ami.description.clone())
            .set_ami_tags(Some(to_map(&ami.ami_tags)))
            .set_kms_key_id(ami.kms_key_id.clone())
            .set_launch_permission(permission)
            .build(),
    );
    for template in &d.launch_template_configurations {
        builder = builder.launch_template_configurations(
            LaunchTemplateConfiguration::builder()
                .launch_template_id(&template.launch_template_id)
                .set_default_version(template.set_default_version)
                .build()
                .expect("the launch template id is set"),
        );
    }
    for parameter in &d.ssm_parameter_configurations {
        builder = builder.ssm_parameter_configurations(
            SsmParameterConfiguration::builder()
                .parameter_name(&parameter.parameter_name)
                .data_type(SsmParameterDataType::from(parameter.data_type.as_str()))
                .build()
                .expect("the parameter name is set"),
        );
    }
    builder.build().expect("the region is set")
}

#[cfg(test)]
mod tests {
    use super::arn_region;

    #[test]
    fn only_image_arns_give_their_region() {
        assert_eq!(
            arn_region("arn:aws:imagebuilder:eu-west-1:123456789012:image/app-1a2b/1.0.0/1"),
            Some("eu-west-1")
        );
        assert_eq!(
            arn_region("arn:aws-cn:imagebuilder:cn-north-1:123456789012:image/app/1.0.0/2"),
            Some("cn-north-1")
        );
        for not_an_image in [
            "ami-0123456789abcdef0",
            "arn:aws:imagebuilder:eu-west-1:123456789012:image-recipe/app/1.0.0",
            "arn:aws:ec2:eu-west-1:123456789012:image/ami-0123456789abcdef0",
            "arn:aws:imagebuilder::123456789012:image/app/1.0.0/1",
            "arn:aws:imagebuilder:eu-west-1",
        ] {
            assert_eq!(arn_region(not_an_image), None, "{not_an_image}");
        }
    }
}
