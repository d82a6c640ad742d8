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
//!
//! For registry images ([`services`]), in one region: every ECS service of every cluster that
//! is not `INACTIVE`, the task definition it is set to and those of all its deployments (a
//! rollout in progress runs two), and each container image those task definitions name, by
//! digest (`…@sha256:…`, what bake publishes) or by tag (matched against the tags the image
//! carries in ECR when gc judges it).

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

/// DescribeServices takes at most 10 services per request.
const SERVICES_PER_REQUEST: usize = 10;

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

/// What names which image in one region: the task definitions ECS services run.
#[derive(Debug, Default)]
pub struct ImageReferences {
    /// Digest (`sha256:…`) → why it is in use.
    pub by_digest: BTreeMap<String, Vec<String>>,
    /// (repository path, tag) → why it is in use, for images a task definition names by tag.
    pub by_tag: BTreeMap<(String, String), Vec<String>>,
}

impl ImageReferences {
    fn add(list: &mut Vec<String>, reference: String) {
        if !list.contains(&reference) {
            list.push(reference);
        }
    }

    /// Every reference to the image `digest` of `repository` carrying `tags`.
    pub fn of(&self, repository: &str, digest: &str, tags: &[String]) -> Vec<String> {
        let mut found = self.by_digest.get(digest).cloned().unwrap_or_default();
        for tag in tags {
            for reference in self
                .by_tag
                .get(&(repository.to_owned(), tag.clone()))
                .into_iter()
                .flatten()
            {
                Self::add(&mut found, format!("{reference} (by tag {tag})"));
            }
        }
        found
    }
}

/// What a container image string names: a digest, or a repository path and a tag.
#[derive(Debug, PartialEq, Eq)]
pub enum ImageName {
    Digest(String),
    Tag { repository: String, tag: String },
}

/// Reads a task definition's `image` (`[host/]path[:tag][@sha256:…]`); `None` for a bare
/// repository (it means `latest`, and bake never publishes that).
pub fn image_name(image: &str) -> Option<ImageName> {
    if let Some((_, digest)) = image.rsplit_once('@') {
        let digest: crate::id::Digest = digest.to_ascii_lowercase().parse().ok()?;
        return Some(ImageName::Digest(digest.to_string()));
    }
    // A first segment with a dot or a port (or `localhost`) is a registry host.
    let path = match image.split_once('/') {
        Some((host, rest)) if host.contains(['.', ':']) || host == "localhost" => rest,
        _ => image,
    };
    let (repository, tag) = path.rsplit_once(':')?;
    (!repository.is_empty() && !tag.is_empty() && !tag.contains('/')).then(|| ImageName::Tag {
        repository: repository.to_owned(),
        tag: tag.to_owned(),
    })
}

/// Scans `region` for the images ECS services run.
pub async fn services(aws: &Aws, region: &str) -> Result<ImageReferences, ScanError> {
    let ecs = crate::publish::clients::ecs(aws, region);
    let mut refs = ImageReferences::default();
    let mut clusters = Vec::new();
    let mut token = None;
    loop {
        let out = sdk!(ecs.list_clusters().set_next_token(token).send().await)
            .map_err(fail("list ECS clusters", region))?;
        clusters.extend(out.cluster_arns().iter().cloned());
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    // Task definition ARN → its container images, read once however many services run it.
    let mut images: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for cluster in &clusters {
        let mut arns = Vec::new();
        let mut token = None;
        loop {
            let out = sdk!(
                ecs.list_services()
                    .cluster(cluster)
                    .set_next_token(token)
                    .send()
                    .await
            )
            .map_err(fail("list ECS services", region))?;
            arns.extend(out.service_arns().iter().cloned());
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        let cluster_name = cluster.rsplit('/').next().unwrap_or(cluster);
        for batch in arns.chunks(SERVICES_PER_REQUEST) {
            let out = sdk!(
                ecs.describe_services()
                    .cluster(cluster)
                    .set_services(Some(batch.to_vec()))
                    .send()
                    .await
            )
            .map_err(fail("describe ECS services", region))?;
            for service in out.services() {
                if service.status() == Some("INACTIVE") {
                    continue;
                }
                let name = service.service_name().unwrap_or("?");
                let mut definitions: Vec<&str> = service.task_definition().into_iter().collect();
                for deployment in service.deployments() {
                    if let Some(td) = deployment.task_definition()
                        && !definitions.contains(&td)
                    {
                        definitions.push(td);
                    }
                }
                for definition in definitions {
                    if !images.contains_key(definition) {
                        let out = sdk!(
                            ecs.describe_task_definition()
                                .task_definition(definition)
                                .send()
                                .await
                        )
                        .map_err(fail("describe ECS task definitions", region))?;
                        let named = out
                            .task_definition()
                            .map(|t| {
                                t.container_definitions()
                                    .iter()
                                    .filter_map(|c| c.image())
                                    .map(str::to_owned)
                                    .collect()
                            })
                            .unwrap_or_default();
                        images.insert(definition.to_owned(), named);
                    }
                    let reason = format!(
                        "ECS service {name} (cluster {cluster_name}) runs task definition {definition}"
                    );
                    for image in &images[definition] {
                        match image_name(image) {
                            Some(ImageName::Digest(digest)) => ImageReferences::add(
                                refs.by_digest.entry(digest).or_default(),
                                reason.clone(),
                            ),
                            Some(ImageName::Tag { repository, tag }) => ImageReferences::add(
                                refs.by_tag.entry((repository, tag)).or_default(),
                                reason.clone(),
                            ),
                            None => {}
                        }
                    }
                }
            }
        }
    }
    Ok(refs)
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

    #[test]
    fn task_definition_images_are_read_by_digest_or_by_tag() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            image_name(&format!(
                "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/api@{digest}"
            )),
            Some(ImageName::Digest(digest.clone()))
        );
        assert_eq!(
            image_name(&format!(
                "api:v1@{}",
                digest.to_uppercase().replace("SHA", "sha")
            )),
            Some(ImageName::Digest(digest))
        );
        assert_eq!(
            image_name("123456789012.dkr.ecr.us-east-1.amazonaws.com/team/api:v1"),
            Some(ImageName::Tag {
                repository: "team/api".into(),
                tag: "v1".into()
            })
        );
        assert_eq!(
            image_name("localhost:5000/api:v2"),
            Some(ImageName::Tag {
                repository: "api".into(),
                tag: "v2".into()
            })
        );
        assert_eq!(image_name("localhost:5000/api"), None);
        assert_eq!(image_name("api@sha256:short"), None);
    }
}
