//! The reference scan: in one region, everything that names an AMI, so that `bake gc` never
//! removes one a fleet still launches from.
//!
//! - every launch template's `$Default` and `$Latest` version;
//! - every Auto Scaling group's launch template version (a number, `$Default` or `$Latest`,
//!   also inside a mixed-instances policy and its overrides) and launch configuration;
//! - every instance that is not terminated (running or stopped);
//! - every SSM parameter whose value names the AMI (bake's own release and channel records
//!   excepted: channels are judged by their own rules, releases are history);
//! - AWS's own `DescribeImageReferences`, where the endpoint offers it. It is an addition, never
//!   a replacement: when it fails for any reason the scan above still decides, and the report
//!   says so.
//!
//! Any other failure stops the scan: a reference bake could not read is never taken for none.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::Filter;

use crate::ami::AwsCallError;
use crate::aws::Aws;

/// Parameters whose values are bake's own records, not consumers of an AMI.
const BAKE_RECORD_PREFIXES: [&str; 2] = ["/bake/releases/", "/bake/channels/"];

/// GetParameters takes at most 10 names per request.
const PARAMETERS_PER_REQUEST: usize = 10;

/// Image ids per DescribeImageReferences request, well under its limit.
const IMAGES_PER_REFERENCE_REQUEST: usize = 10;

/// DescribeImageReferences is optional to the answer (the scan is the ground truth): one retry
/// rides out a blip without holding the run up where the API is not offered at all.
const IMAGE_REFERENCES_ATTEMPTS: u32 = 2;

/// A scan that could not be completed: gc must not decide on it.
#[derive(Debug, thiserror::Error)]
#[error("failed to {action} in {region} while looking for references to AMIs")]
pub struct ScanError {
    pub action: &'static str,
    pub region: String,
    #[source]
    pub source: AwsCallError,
}

/// What names which AMI in one region.
#[derive(Debug, Default)]
pub struct RegionReferences {
    /// AMI id → why it is in use (one line per reference).
    pub by_image: BTreeMap<String, Vec<String>>,
    /// What the scan could not use, said once (an API the endpoint does not offer).
    pub notes: Vec<String>,
}

impl RegionReferences {
    fn add(&mut self, image_id: &str, reference: String) {
        let list = self.by_image.entry(image_id.to_owned()).or_default();
        if !list.contains(&reference) {
            list.push(reference);
        }
    }

    pub fn of(&self, image_id: &str) -> &[String] {
        self.by_image.get(image_id).map_or(&[], Vec::as_slice)
    }
}

fn fail(action: &'static str, region: &str) -> impl FnOnce(AwsCallError) -> ScanError {
    let region = region.to_owned();
    move |source| ScanError {
        action,
        region,
        source,
    }
}

macro_rules! sdk {
    ($e:expr) => {
        $e.map_err(|e| AwsCallError::from_sdk(&e))
    };
}

/// Scans `region` for references to AMIs; `candidates` are the ids AWS's own reference API is
/// asked about.
pub async fn scan(
    aws: &Aws,
    region: &str,
    candidates: &BTreeSet<String>,
) -> Result<RegionReferences, ScanError> {
    let mut refs = RegionReferences::default();
    let ec2 = aws.ec2(region);
    let mut templates = Templates::default();
    launch_templates(&ec2, region, &mut templates, &mut refs).await?;
    auto_scaling_groups(aws, &ec2, region, &mut templates, &mut refs).await?;
    instances(&ec2, region, &mut refs).await?;
    parameters(aws, region, &mut refs).await?;
    image_references(&ec2, region, candidates, &mut refs).await;
    Ok(refs)
}

/// Launch template versions already read: (template id or name, version) → AMI id.
#[derive(Default)]
struct Templates(BTreeMap<(String, String), Option<String>>);

impl Templates {
    async fn image_of(
        &mut self,
        ec2: &aws_sdk_ec2::Client,
        region: &str,
        id: Option<&str>,
        name: Option<&str>,
        version: &str,
    ) -> Result<Option<String>, ScanError> {
        let key = (
            id.or(name).unwrap_or_default().to_owned(),
            version.to_owned(),
        );
        if let Some(found) = self.0.get(&key) {
            return Ok(found.clone());
        }
        let out = sdk!(
            ec2.describe_launch_template_versions()
                .set_launch_template_id(id.map(str::to_owned))
                .set_launch_template_name(if id.is_some() {
                    None
                } else {
                    name.map(str::to_owned)
                })
                .versions(version)
                .send()
                .await
        )
        .map_err(fail("describe launch template versions", region))?;
        let image = out
            .launch_template_versions()
            .first()
            .and_then(|v| v.launch_template_data())
            .and_then(|d| d.image_id())
            .map(str::to_owned);
        self.0.insert(key, image.clone());
        Ok(image)
    }
}

async fn launch_templates(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    templates: &mut Templates,
    refs: &mut RegionReferences,
) -> Result<(), ScanError> {
    let mut token = None;
    loop {
        let out = sdk!(
            ec2.describe_launch_templates()
                .set_next_token(token)
                .send()
                .await
        )
        .map_err(fail("list launch templates", region))?;
        for template in out.launch_templates() {
            let Some(id) = template.launch_template_id() else {
                continue;
            };
            let name = template.launch_template_name().unwrap_or(id);
            for (selector, number) in [
                ("$Default", template.default_version_number()),
                ("$Latest", template.latest_version_number()),
            ] {
                if let Some(image) = templates
                    .image_of(ec2, region, Some(id), None, selector)
                    .await?
                {
                    let number = number.map_or(String::new(), |n| format!(" (version {n})"));
                    refs.add(
                        &image,
                        format!("launch template {name} ({id}) {selector}{number}"),
                    );
                }
            }
        }
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            return Ok(());
        }
    }
}

/// A launch template as an Auto Scaling group names it.
struct TemplateUse<'a> {
    id: Option<&'a str>,
    name: Option<&'a str>,
    /// `None` means `$Default`, as Auto Scaling reads it.
    version: Option<&'a str>,
    how: &'static str,
}

async fn auto_scaling_groups(
    aws: &Aws,
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    templates: &mut Templates,
    refs: &mut RegionReferences,
) -> Result<(), ScanError> {
    let autoscaling = crate::publish::clients::autoscaling(aws, region);
    let mut token = None;
    loop {
        let out = sdk!(
            autoscaling
                .describe_auto_scaling_groups()
                .set_next_token(token)
                .send()
                .await
        )
        .map_err(fail("list Auto Scaling groups", region))?;
        for group in out.auto_scaling_groups() {
            let group_name = group.auto_scaling_group_name().unwrap_or("?");
            let mut uses: Vec<TemplateUse<'_>> = Vec::new();
            if let Some(spec) = group.launch_template() {
                uses.push(TemplateUse {
                    id: spec.launch_template_id(),
                    name: spec.launch_template_name(),
                    version: spec.version(),
                    how: "uses",
                });
            }
            if let Some(mixed) = group
                .mixed_instances_policy()
                .and_then(|p| p.launch_template())
            {
                if let Some(spec) = mixed.launch_template_specification() {
                    uses.push(TemplateUse {
                        id: spec.launch_template_id(),
                        name: spec.launch_template_name(),
                        version: spec.version(),
                        how: "uses (mixed instances policy)",
                    });
                }
                for spec in mixed
                    .overrides()
                    .iter()
                    .filter_map(|o| o.launch_template_specification())
                {
                    uses.push(TemplateUse {
                        id: spec.launch_template_id(),
                        name: spec.launch_template_name(),
                        version: spec.version(),
                        how: "uses (mixed instances policy override)",
                    });
                }
            }
            for u in uses {
                let version = u.version.unwrap_or("$Default");
                if let Some(image) = templates
                    .image_of(ec2, region, u.id, u.name, version)
                    .await?
                {
                    let template = match (u.name, u.id) {
                        (Some(name), Some(id)) => format!("{name} ({id})"),
                        (name, id) => name.or(id).unwrap_or("?").to_owned(),
                    };
                    refs.add(
                        &image,
                        format!(
                            "Auto Scaling group {group_name} {} launch template {template} version {version}",
                            u.how
                        ),
                    );
                }
            }
            if let Some(configuration) = group.launch_configuration_name() {
                let out = sdk!(
                    autoscaling
                        .describe_launch_configurations()
                        .launch_configuration_names(configuration)
                        .send()
                        .await
                )
                .map_err(fail("describe launch configurations", region))?;
                for c in out.launch_configurations() {
                    if let Some(image) = c.image_id() {
                        refs.add(
                            image,
                            format!(
                                "Auto Scaling group {group_name} uses launch configuration {configuration}"
                            ),
                        );
                    }
                }
            }
        }
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            return Ok(());
        }
    }
}

async fn instances(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    refs: &mut RegionReferences,
) -> Result<(), ScanError> {
    let alive = Filter::builder()
        .name("instance-state-name")
        .set_values(Some(
            ["pending", "running", "stopping", "stopped", "shutting-down"]
                .map(String::from)
                .to_vec(),
        ))
        .build();
    let mut token = None;
    loop {
        let out = sdk!(
            ec2.describe_instances()
                .filters(alive.clone())
                .set_next_token(token)
                .send()
                .await
        )
        .map_err(fail("list instances", region))?;
        for instance in out.reservations().iter().flat_map(|r| r.instances()) {
            if let (Some(image), Some(id)) = (instance.image_id(), instance.instance_id()) {
                let state = instance
                    .state()
                    .and_then(|s| s.name())
                    .map_or("?", |n| n.as_str());
                refs.add(image, format!("instance {id} ({state})"));
            }
        }
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            return Ok(());
        }
    }
}

/// The AMI ids in a parameter value (a bare id, a list, JSON: any `ami-…` token).
fn ami_ids(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|token| {
            token
                .strip_prefix("ami-")
                .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        })
}

async fn parameters(aws: &Aws, region: &str, refs: &mut RegionReferences) -> Result<(), ScanError> {
    let ssm = crate::publish::clients::ssm(aws, region);
    let mut names = Vec::new();
    let mut token = None;
    loop {
        let out = sdk!(ssm.describe_parameters().set_next_token(token).send().await)
            .map_err(fail("list SSM parameters", region))?;
        names.extend(
            out.parameters()
                .iter()
                .filter_map(|p| p.name())
                .filter(|n| !BAKE_RECORD_PREFIXES.iter().any(|p| n.starts_with(p)))
                .map(str::to_owned),
        );
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    for batch in names.chunks(PARAMETERS_PER_REQUEST) {
        let out = sdk!(
            ssm.get_parameters()
                .set_names(Some(batch.to_vec()))
                .send()
                .await
        )
        .map_err(fail("read SSM parameters", region))?;
        for parameter in out.parameters() {
            let (Some(name), Some(value)) = (parameter.name(), parameter.value()) else {
                continue;
            };
            for image in ami_ids(value) {
                refs.add(
                    image,
                    format!("SSM parameter {name} (version {})", parameter.version()),
                );
            }
        }
    }
    Ok(())
}

async fn image_references(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    candidates: &BTreeSet<String>,
    refs: &mut RegionReferences,
) {
    let ids: Vec<String> = candidates.iter().cloned().collect();
    for batch in ids.chunks(IMAGES_PER_REFERENCE_REQUEST) {
        let mut token = None;
        loop {
            let sent = ec2
                .describe_image_references()
                .set_image_ids(Some(batch.to_vec()))
                .include_all_resource_types(true)
                .set_next_token(token)
                .customize()
                .config_override(
                    aws_sdk_ec2::config::Builder::default().retry_config(
                        aws_config::retry::RetryConfig::standard()
                            .with_max_attempts(IMAGE_REFERENCES_ATTEMPTS),
                    ),
                )
                .send()
                .await;
            let out = match sent {
                Ok(out) => out,
                Err(e) => {
                    refs.notes.push(format!(
                        "{region}: DescribeImageReferences is not available here ({}); bake's own scan decides alone",
                        AwsCallError::from_sdk(&e)
                    ));
                    return;
                }
            };
            for reference in out.image_references() {
                if let Some(image) = reference.image_id() {
                    let kind = reference.resource_type().map_or("resource", |t| t.as_str());
                    refs.add(
                        image,
                        format!(
                            "{kind} {} (DescribeImageReferences)",
                            reference.arn().unwrap_or("?")
                        ),
                    );
                }
            }
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ami_ids_are_found_in_any_value_shape() {
        let found: Vec<&str> =
            ami_ids(r#"{"x86":"ami-0123abcd","arm":"ami-0fed"} ami-zz,ami-12ab"#).collect();
        assert_eq!(found, vec!["ami-0123abcd", "ami-0fed", "ami-12ab"]);
        assert_eq!(ami_ids("resolve:ssm:/x").count(), 0);
    }
}
