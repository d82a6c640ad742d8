//! SSM parameters: the AMI id of a region, written as `aws:ec2:image` data, only into parameters
//! bake owns (tagged with the recipe) unless the caller allows clobbering. Overwriting keeps
//! Parameter Store's own version history. Also bake's JSON records (releases, channels).

use aws_sdk_ssm::types::{ParameterTier, ParameterType, ResourceTypeForTagging, Tag};

use super::error::{PublishError, aws};

/// The tag that marks a parameter as bake's, with the recipe's name as its value.
pub const OWNER_TAG: &str = "bake:recipe";

/// Parameter Store's limit for a standard parameter's value; larger ones need the advanced tier.
const STANDARD_TIER_MAX_BYTES: usize = 4096;

/// A parameter now.
#[derive(Debug, Clone)]
pub struct ParameterState {
    pub name: String,
    pub value: Option<String>,
    pub owned: bool,
}

/// Reads a parameter's value and whether `recipe` owns it.
pub async fn look(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    region: &str,
    recipe: &str,
) -> Result<ParameterState, PublishError> {
    let value = match ssm.get_parameter().name(name).send().await {
        Ok(out) => out.parameter().and_then(|p| p.value()).map(str::to_owned),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_parameter_not_found()) =>
        {
            None
        }
        Err(e) => return Err(aws("GetParameter", region)(e)),
    };
    let owned = if value.is_some() {
        let tags = ssm
            .list_tags_for_resource()
            .resource_type(ResourceTypeForTagging::Parameter)
            .resource_id(name)
            .send()
            .await
            .map_err(aws("ListTagsForResource", region))?;
        tags.tag_list()
            .iter()
            .any(|t| t.key() == OWNER_TAG && t.value() == recipe)
    } else {
        false
    };
    Ok(ParameterState {
        name: name.to_owned(),
        value,
        owned,
    })
}

/// Refuses to touch a parameter someone else owns.
pub fn may_write(
    state: &ParameterState,
    region: &str,
    recipe: &str,
    allow_clobber: bool,
) -> Result<(), PublishError> {
    if state.value.is_some() && !state.owned && !allow_clobber {
        return Err(PublishError::ParameterNotOwned {
            name: state.name.clone(),
            region: region.to_owned(),
            recipe: recipe.to_owned(),
        });
    }
    Ok(())
}

/// What to write.
pub struct Write<'a> {
    pub value: &'a str,
    /// `Some("aws:ec2:image")` for AMI ids (AWS then checks the id), `None` for text.
    pub data_type: Option<&'a str>,
    pub description: Option<&'a str>,
    /// A label for the new parameter version (`bake-<version_short>`), so the history says
    /// which bake version each value came from.
    pub label: Option<&'a str>,
}

/// Writes the value, tags the parameter as the recipe's; returns the parameter's new version.
pub async fn put(
    ssm: &aws_sdk_ssm::Client,
    state: &ParameterState,
    region: &str,
    recipe: &str,
    write: &Write<'_>,
) -> Result<i64, PublishError> {
    let tier = if write.value.len() > STANDARD_TIER_MAX_BYTES {
        ParameterTier::Advanced
    } else {
        ParameterTier::Standard
    };
    let tag = Tag::builder()
        .key(OWNER_TAG)
        .value(recipe)
        .build()
        .expect("key and value are set");
    let mut request = ssm
        .put_parameter()
        .name(&state.name)
        .value(write.value)
        .r#type(ParameterType::String)
        .tier(tier)
        .set_data_type(write.data_type.map(str::to_owned))
        .set_description(write.description.map(str::to_owned));
    // PutParameter takes tags only when it creates the parameter.
    if state.value.is_some() {
        request = request.overwrite(true);
    } else {
        request = request.tags(tag.clone());
    }
    let out = request.send().await.map_err(aws("PutParameter", region))?;
    if state.value.is_some() && !state.owned {
        ssm.add_tags_to_resource()
            .resource_type(ResourceTypeForTagging::Parameter)
            .resource_id(&state.name)
            .tags(tag)
            .send()
            .await
            .map_err(aws("AddTagsToResource", region))?;
    }
    if let Some(label) = write.label {
        ssm.label_parameter_version()
            .name(&state.name)
            .parameter_version(out.version())
            .labels(label)
            .send()
            .await
            .map_err(aws("LabelParameterVersion", region))?;
    }
    Ok(out.version())
}

/// The label bake puts on the parameter versions it writes for a version.
pub fn version_label(version_short: &str) -> String {
    format!("bake-{version_short}")
}

/// Reads one of bake's JSON records, or `None` when it does not exist.
pub async fn read_record<T: serde::de::DeserializeOwned>(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    region: &str,
) -> Result<Option<T>, PublishError> {
    match ssm.get_parameter().name(name).send().await {
        Ok(out) => {
            let text = out.parameter().and_then(|p| p.value()).unwrap_or_default();
            serde_json::from_str(text)
                .map(Some)
                .map_err(|source| PublishError::Record {
                    name: name.to_owned(),
                    region: region.to_owned(),
                    source,
                })
        }
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_parameter_not_found()) =>
        {
            Ok(None)
        }
        Err(e) => Err(aws("GetParameter", region)(e)),
    }
}

/// Writes one of bake's JSON records (refusing a parameter bake does not own).
pub async fn write_record<T: serde::Serialize>(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    region: &str,
    recipe: &str,
    record: &T,
) -> Result<(), PublishError> {
    let state = look(ssm, name, region, recipe).await?;
    may_write(&state, region, recipe, false)?;
    let text = serde_json::to_string(record).expect("bake's records always serialize");
    if state.value.as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    put(
        ssm,
        &state,
        region,
        recipe,
        &Write {
            value: &text,
            data_type: None,
            description: Some("bake record: do not edit"),
            label: None,
        },
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_parameters_need_allow_clobber() {
        let foreign = ParameterState {
            name: "/x".into(),
            value: Some("ami-1".into()),
            owned: false,
        };
        let err = may_write(&foreign, "eu-west-1", "web", false).unwrap_err();
        assert!(err.to_string().contains("/x"));
        may_write(&foreign, "eu-west-1", "web", true).unwrap();
        let new = ParameterState {
            value: None,
            ..foreign.clone()
        };
        may_write(&new, "eu-west-1", "web", false).unwrap();
        let ours = ParameterState {
            owned: true,
            ..foreign
        };
        may_write(&ours, "eu-west-1", "web", false).unwrap();
    }
}
