//! Launch template versions: one new version per region and bake version, made from the source
//! version with only the image id (and the recipe's metadata overrides) changed. A version bake
//! already made for this AMI and bake version is reused, so re-runs create nothing.

use aws_sdk_ec2::types::{
    LaunchTemplateHttpTokensState, LaunchTemplateInstanceMetadataOptionsRequest,
    LaunchTemplateVersion, RequestLaunchTemplateData,
};

use super::error::{PublishError, aws};
use crate::recipe::{LaunchTemplateRef, LaunchTemplateTarget};

/// What a template looks like now, for one AMI and bake version.
#[derive(Debug, Clone)]
pub struct TemplateState {
    pub id: String,
    pub name: String,
    pub default_version: i64,
    pub default_ami: Option<String>,
    /// The version to make the new one from (resolved to a number).
    pub source_version: i64,
    /// A version bake already made for this AMI and bake version.
    pub existing: Option<i64>,
}

/// The version description that marks a version as bake's, for one recipe version.
pub fn description(recipe: &str, version: &str) -> String {
    format!("bake {recipe} {version}")
}

pub fn shown(template: &LaunchTemplateRef) -> &str {
    match template {
        LaunchTemplateRef::Name(n) | LaunchTemplateRef::Id(n) => n,
    }
}

/// Looks at the template: its default, its source version, and any version already made.
pub async fn look(
    ec2: &aws_sdk_ec2::Client,
    target: &LaunchTemplateTarget,
    region: &str,
    ami: &str,
    description: &str,
) -> Result<TemplateState, PublishError> {
    let missing = || PublishError::LaunchTemplateMissing {
        template: shown(&target.template).to_owned(),
        region: region.to_owned(),
    };
    let request = ec2.describe_launch_templates();
    let request = match &target.template {
        LaunchTemplateRef::Name(name) => request.launch_template_names(name),
        LaunchTemplateRef::Id(id) => request.launch_template_ids(id),
    };
    let templates = match request.send().await {
        Ok(out) => out.launch_templates().to_vec(),
        Err(e)
            if e.as_service_error()
                .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::code(s))
                .is_some_and(|c| c.starts_with("InvalidLaunchTemplate")) =>
        {
            Vec::new()
        }
        Err(e) => return Err(aws("DescribeLaunchTemplates", region)(e)),
    };
    let template = templates.into_iter().next().ok_or_else(missing)?;
    let id = template
        .launch_template_id()
        .ok_or_else(missing)?
        .to_owned();
    let name = template
        .launch_template_name()
        .unwrap_or_default()
        .to_owned();
    let default_version = template.default_version_number().unwrap_or(1);
    let latest_version = template.latest_version_number().unwrap_or(default_version);

    let versions = all_versions(ec2, &id, region).await?;
    let existing = versions
        .iter()
        .filter(|v| {
            v.version_description() == Some(description)
                && v.launch_template_data().and_then(|d| d.image_id()) == Some(ami)
        })
        .filter_map(LaunchTemplateVersion::version_number)
        .min();
    let default_ami = versions
        .iter()
        .find(|v| v.version_number() == Some(default_version))
        .and_then(|v| v.launch_template_data())
        .and_then(|d| d.image_id())
        .map(str::to_owned);
    let source_version = match target.source_version.as_str() {
        "$Default" => default_version,
        "$Latest" => latest_version,
        number => number
            .parse::<i64>()
            .ok()
            .filter(|n| versions.iter().any(|v| v.version_number() == Some(*n)))
            .ok_or_else(|| PublishError::SourceVersionMissing {
                template: name.clone(),
                region: region.to_owned(),
                version: number.to_owned(),
            })?,
    };
    Ok(TemplateState {
        id,
        name,
        default_version,
        default_ami,
        source_version,
        existing,
    })
}

async fn all_versions(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    region: &str,
) -> Result<Vec<LaunchTemplateVersion>, PublishError> {
    let mut versions = Vec::new();
    let mut token = None;
    loop {
        let page = ec2
            .describe_launch_template_versions()
            .launch_template_id(id)
            .set_next_token(token)
            .send()
            .await
            .map_err(aws("DescribeLaunchTemplateVersions", region))?;
        versions.extend(page.launch_template_versions().iter().cloned());
        token = page
            .next_token()
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        if token.is_none() {
            return Ok(versions);
        }
    }
}

/// Creates the new version from the source version; returns its number.
pub async fn create_version(
    ec2: &aws_sdk_ec2::Client,
    state: &TemplateState,
    target: &LaunchTemplateTarget,
    region: &str,
    ami: &str,
    description: &str,
) -> Result<i64, PublishError> {
    let mut data = RequestLaunchTemplateData::builder().image_id(ami);
    if target.http_tokens_required.is_some() || target.hop_limit.is_some() {
        let mut metadata = LaunchTemplateInstanceMetadataOptionsRequest::builder();
        if let Some(required) = target.http_tokens_required {
            metadata = metadata.http_tokens(if required {
                LaunchTemplateHttpTokensState::Required
            } else {
                LaunchTemplateHttpTokensState::Optional
            });
        }
        if let Some(limit) = target.hop_limit {
            metadata = metadata.http_put_response_hop_limit(i32::from(limit));
        }
        data = data.metadata_options(metadata.build());
    }
    let created = ec2
        .create_launch_template_version()
        .launch_template_id(&state.id)
        .source_version(state.source_version.to_string())
        .version_description(description)
        .launch_template_data(data.build())
        .send()
        .await
        .map_err(aws("CreateLaunchTemplateVersion", region))?;
    created
        .launch_template_version()
        .and_then(LaunchTemplateVersion::version_number)
        .ok_or_else(|| PublishError::Aws {
            operation: "CreateLaunchTemplateVersion".into(),
            region: region.to_owned(),
            source: "the answer has no version number".into(),
        })
}

/// Makes `version` the template's default.
pub async fn set_default(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    region: &str,
    version: i64,
) -> Result<(), PublishError> {
    ec2.modify_launch_template()
        .launch_template_id(id)
        .default_version(version.to_string())
        .send()
        .await
        .map_err(aws("ModifyLaunchTemplate", region))?;
    Ok(())
}

/// The template's current default version number (for moving a channel's pointer).
pub async fn default_version(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    region: &str,
) -> Result<i64, PublishError> {
    let out = ec2
        .describe_launch_templates()
        .launch_template_ids(id)
        .send()
        .await
        .map_err(|e| {
            if e.as_service_error()
                .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::code(s))
                .is_some_and(|c| c.starts_with("InvalidLaunchTemplate"))
            {
                PublishError::LaunchTemplateMissing {
                    template: id.to_owned(),
                    region: region.to_owned(),
                }
            } else {
                aws("DescribeLaunchTemplates", region)(e)
            }
        })?;
    out.launch_templates()
        .first()
        .and_then(|t| t.default_version_number())
        .ok_or_else(|| PublishError::LaunchTemplateMissing {
            template: id.to_owned(),
            region: region.to_owned(),
        })
}
