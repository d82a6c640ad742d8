//! Resolving a recipe's source-AMI filter to one exact image id, at plan time, so the version
//! pins it: a new vendor release is a new version, never a silent change under an old one.
//!
//! With `ssm_parameter`, the parameter's value is the id (checked to exist and to match the
//! architecture). Otherwise `DescribeImages` with the filter's owners, name pattern,
//! architecture, virtualization and root-device type, in state `available`; the newest by
//! creation date wins, and ties (common: images published together, or an emulator's catalog)
//! are broken by name (descending: vendor names end in dates and versions), then by id.

use serde::{Deserialize, Serialize};

use crate::recipe::AmiFilter;

/// The image a build starts from, in the region it is built in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceAmi {
    pub region: String,
    pub image_id: String,
    pub name: Option<String>,
    pub creation_date: Option<String>,
    pub owner_id: Option<String>,
    pub architecture: Option<String>,
    /// The device the root volume attaches as (the builder's volume settings go there).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub root_device_name: Option<String>,
    /// The SSM parameter it came from, if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ssm_parameter: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceAmiError {
    #[error("no available image in {region} matches the source-AMI filter ({filter})")]
    NoMatch { region: String, filter: String },
    #[error(
        "{count} images in {region} match the source-AMI filter ({filter}) and `most_recent` is false"
    )]
    Ambiguous {
        region: String,
        filter: String,
        count: usize,
    },
    #[error("SSM parameter `{parameter}` does not exist in {region}")]
    MissingParameter { parameter: String, region: String },
    #[error("SSM parameter `{parameter}` in {region} holds `{value}`, which is not an AMI id")]
    NotAnAmiId {
        parameter: String,
        region: String,
        value: String,
    },
    #[error("source AMI {image_id} does not exist (or is not available) in {region}")]
    Missing { image_id: String, region: String },
    #[error("source AMI {image_id} in {region} is {actual}, but the recipe asks for {expected}")]
    Architecture {
        image_id: String,
        region: String,
        actual: String,
        expected: String,
    },
    #[error("failed to {action} in {region}")]
    Aws {
        action: String,
        region: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl SourceAmiError {
    pub fn hint(&self) -> Option<String> {
        match self {
            SourceAmiError::NoMatch { .. } => Some(
                "check `base.ami.owners`, `name` and `architecture`; names are shell-style globs (`*`, `?`)"
                    .into(),
            ),
            SourceAmiError::Ambiguous { .. } => {
                Some("set `most_recent: true` or narrow `base.ami.name`".into())
            }
            SourceAmiError::MissingParameter { .. } => Some(
                "public parameters live under `/aws/service/…`; list them with `aws ssm get-parameters-by-path`"
                    .into(),
            ),
            SourceAmiError::Missing { .. } => {
                Some("the image may be deregistered, private, or in another region".into())
            }
            _ => None,
        }
    }

    /// Whether the recipe (rather than access to AWS) is at fault.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, SourceAmiError::Aws { .. })
    }
}

fn aws_error<E>(action: &str, region: &str) -> impl FnOnce(E) -> SourceAmiError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let action = action.to_owned();
    let region = region.to_owned();
    move |e| SourceAmiError::Aws {
        action,
        region,
        source: Box::new(e),
    }
}

fn describe(filter: &AmiFilter) -> String {
    let mut parts = Vec::new();
    if !filter.owners.is_empty() {
        parts.push(format!("owners {}", filter.owners.join(", ")));
    }
    if let Some(name) = &filter.name {
        parts.push(format!("name `{name}`"));
    }
    parts.push(filter.architecture.ec2().to_owned());
    parts.push(filter.virtualization_type.clone());
    parts.push(filter.root_device_type.clone());
    parts.join(", ")
}

fn source_from(region: &str, image: &aws_sdk_ec2::types::Image) -> SourceAmi {
    SourceAmi {
        region: region.to_owned(),
        image_id: image.image_id().unwrap_or_default().to_owned(),
        name: image.name().map(str::to_owned),
        creation_date: image.creation_date().map(str::to_owned),
        owner_id: image.owner_id().map(str::to_owned),
        architecture: image.architecture().map(|a| a.as_str().to_owned()),
        root_device_name: image.root_device_name().map(str::to_owned),
        ssm_parameter: None,
    }
}

/// Resolves `filter` in `region`.
pub async fn resolve(
    ec2: &aws_sdk_ec2::Client,
    ssm: &aws_sdk_ssm::Client,
    region: &str,
    filter: &AmiFilter,
) -> Result<SourceAmi, SourceAmiError> {
    if let Some(parameter) = &filter.ssm_parameter {
        let value = match ssm.get_parameter().name(parameter).send().await {
            Ok(out) => out
                .parameter()
                .and_then(|p| p.value())
                .unwrap_or_default()
                .trim()
                .to_owned(),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                return Err(SourceAmiError::MissingParameter {
                    parameter: parameter.clone(),
                    region: region.to_owned(),
                });
            }
            Err(e) => {
                return Err(aws_error("read the SSM parameter", region)(
                    aws_sdk_ssm::Error::from(e),
                ));
            }
        };
        if !is_ami_id(&value) {
            return Err(SourceAmiError::NotAnAmiId {
                parameter: parameter.clone(),
                region: region.to_owned(),
                value,
            });
        }
        let mut source = describe_one(ec2, region, &value).await?;
        if source.architecture.as_deref() != Some(filter.architecture.ec2()) {
            return Err(SourceAmiError::Architecture {
                image_id: value,
                region: region.to_owned(),
                actual: source
                    .architecture
                    .unwrap_or_else(|| "of no architecture".into()),
                expected: filter.architecture.ec2().to_owned(),
            });
        }
        source.ssm_parameter = Some(parameter.clone());
        return Ok(source);
    }
    let ec2_filter = |name: &str, value: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name(name)
            .values(value)
            .build()
    };
    let mut request = ec2
        .describe_images()
        .set_owners(Some(filter.owners.clone()))
        .filters(ec2_filter("architecture", filter.architecture.ec2()))
        .filters(ec2_filter(
            "virtualization-type",
            &filter.virtualization_type,
        ))
        .filters(ec2_filter("root-device-type", &filter.root_device_type))
        .filters(ec2_filter("state", "available"));
    if let Some(name) = &filter.name {
        request = request.filters(ec2_filter("name", name));
    }
    let out = request
        .send()
        .await
        .map_err(|e| aws_error("look up the source AMI", region)(aws_sdk_ec2::Error::from(e)))?;
    let mut images: Vec<SourceAmi> = out
        .images()
        .iter()
        .map(|i| source_from(region, i))
        .collect();
    if images.is_empty() {
        return Err(SourceAmiError::NoMatch {
            region: region.to_owned(),
            filter: describe(filter),
        });
    }
    if images.len() > 1 && !filter.most_recent {
        return Err(SourceAmiError::Ambiguous {
            region: region.to_owned(),
            filter: describe(filter),
            count: images.len(),
        });
    }
    images.sort_by(newest_first);
    Ok(images.swap_remove(0))
}

/// Newest creation date first; then name descending; then image id ascending. Total and
/// independent of the order AWS lists images in.
fn newest_first(a: &SourceAmi, b: &SourceAmi) -> std::cmp::Ordering {
    b.creation_date
        .cmp(&a.creation_date)
        .then_with(|| b.name.cmp(&a.name))
        .then_with(|| a.image_id.cmp(&b.image_id))
}

/// Looks up one image by id (bake's check that a pinned source still exists).
pub async fn describe_one(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    image_id: &str,
) -> Result<SourceAmi, SourceAmiError> {
    let missing = || SourceAmiError::Missing {
        image_id: image_id.to_owned(),
        region: region.to_owned(),
    };
    match ec2.describe_images().image_ids(image_id).send().await {
        Ok(out) => out
            .images()
            .iter()
            .find(|i| {
                i.image_id() == Some(image_id)
                    && i.state()
                        .is_none_or(|s| *s == aws_sdk_ec2::types::ImageState::Available)
            })
            .map(|i| source_from(region, i))
            .ok_or_else(missing),
        Err(e) if aws_smithy_types_code(&e).is_some_and(|c| c.starts_with("InvalidAMIID")) => {
            Err(missing())
        }
        Err(e) => Err(aws_error("look up the source AMI", region)(
            aws_sdk_ec2::Error::from(e),
        )),
    }
}

fn aws_smithy_types_code<E: aws_sdk_ec2::error::ProvideErrorMetadata>(e: &E) -> Option<&str> {
    e.code()
}

/// `ami-` followed by 8 or 17 hex digits.
pub fn is_ami_id(text: &str) -> bool {
    text.strip_prefix("ami-").is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

impl crate::diagnostic::Diagnose for SourceAmiError {
    fn hint(&self) -> Option<String> {
        SourceAmiError::hint(self)
    }

    fn exit_status(&self) -> crate::exit::ExitStatus {
        if self.is_user_error() {
            crate::exit::ExitStatus::RecipeOrUsage
        } else {
            crate::exit::ExitStatus::Infrastructure
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ami(id: &str, name: &str, date: &str) -> SourceAmi {
        SourceAmi {
            region: "us-east-1".into(),
            image_id: id.into(),
            name: Some(name.into()),
            creation_date: Some(date.into()),
            owner_id: None,
            architecture: None,
            root_device_name: None,
            ssm_parameter: None,
        }
    }

    #[test]
    fn newest_wins_and_ties_break_the_same_way_in_any_order() {
        let a = ami(
            "ami-0000000b",
            "al2023-ami-2023.6",
            "2026-01-01T00:00:00.000Z",
        );
        let b = ami(
            "ami-0000000a",
            "al2023-ami-2023.7",
            "2026-01-01T00:00:00.000Z",
        );
        let c = ami(
            "ami-0000000c",
            "al2023-ami-2023.7",
            "2026-01-01T00:00:00.000Z",
        );
        let old = ami(
            "ami-00000001",
            "al2023-ami-2023.9",
            "2025-01-01T00:00:00.000Z",
        );
        let mut one = vec![a.clone(), b.clone(), c.clone(), old.clone()];
        let mut two = vec![old, c, a, b.clone()];
        one.sort_by(newest_first);
        two.sort_by(newest_first);
        assert_eq!(one, two);
        assert_eq!(one[0], b, "same date and name: the lower id wins");
        assert_eq!(
            one[3].image_id, "ami-00000001",
            "older dates lose whatever their name"
        );
    }

    #[test]
    fn ami_ids_are_checked() {
        assert!(is_ami_id("ami-0123456789abcdef0"));
        assert!(is_ami_id("ami-12345678"));
        assert!(!is_ami_id("ami-xyz"));
        assert!(!is_ami_id("snap-12345678"));
        assert!(!is_ami_id(""));
    }
}
