//! `bake verify --published`: compare the live state of every surface a channel's version was
//! published to with what was published, and name every difference.
//!
//! What was published comes from the channel's current entry (the release record publish wrote
//! to `/bake/releases/…` and promote copied into `/bake/channels/…`, the same references the
//! version's manifest lists), so any machine can check without the store that published.
//!
//! Checked, per region: the AMI exists, is `available`, every account of the recipe's sharing
//! may launch it, it carries the recipe's tags and (where the recipe deprecates) a deprecation
//! time; each launch template version bake made launches that AMI, and the template's default
//! is that version; each SSM parameter holds the AMI with data type `aws:ec2:image`; each task
//! definition revision is active and pins the image digest; the channel's Auto Scaling groups
//! run the launch template version, and its ECS services the revision.

use serde::Serialize;

use crate::publish::channel::References;
use crate::publish::error::aws;
use crate::publish::{DigestCheck, PublishError, Publisher, clients, render_parameter};
use crate::recipe::template::{Context, Renderer, Secrets};

/// One thing compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `ami`, `launch_permission`, `ami_tag`, `deprecation`, `launch_template_version`,
    /// `launch_template_default`, `ssm_parameter`, `task_definition`, `auto_scaling_group`,
    /// `ecs_service`.
    pub surface: &'static str,
    /// The resource, by name (and id).
    pub resource: String,
    pub region: String,
    pub expected: String,
    /// What is there; `None` when it agrees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
}

impl Check {
    pub fn agrees(&self) -> bool {
        self.found.is_none()
    }
}

/// The result of `bake verify --published`.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedReport {
    pub recipe: String,
    pub channel: String,
    pub version: String,
    pub checks: Vec<Check>,
    /// What could not be checked here, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

impl PublishedReport {
    pub fn differences(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| !c.agrees())
    }
}

struct Checks(Vec<Check>);

impl Checks {
    fn add(
        &mut self,
        surface: &'static str,
        resource: impl Into<String>,
        region: &str,
        expected: impl Into<String>,
        found: Option<String>,
    ) {
        self.0.push(Check {
            surface,
            resource: resource.into(),
            region: region.to_owned(),
            expected: expected.into(),
            found,
        });
    }
}

/// Compares every published surface of `channel`'s current version with AWS.
pub async fn verify<D: DigestCheck>(
    publisher: &Publisher<'_, D>,
    channel: &str,
) -> Result<PublishedReport, PublishError> {
    let entry = publisher.pin(channel, None).await?;
    let release = entry.references;
    let mut checks = Checks(Vec::new());
    let mut skipped = Vec::new();
    for (region, ami) in &release.amis {
        check_ami(publisher, &release, region, ami, &mut checks, &mut skipped).await?;
        check_templates(publisher, &release, region, ami, &mut checks).await?;
        check_parameters(publisher, &release, region, ami, &mut checks).await?;
    }
    check_tasks(publisher, &release, &mut checks).await?;
    check_fleet(publisher, channel, &release, &mut checks).await?;
    Ok(PublishedReport {
        recipe: publisher.recipe.name.clone(),
        channel: channel.to_owned(),
        version: release.version,
        checks: checks.0,
        skipped,
    })
}

async fn check_ami<D: DigestCheck>(
    publisher: &Publisher<'_, D>,
    release: &References,
    region: &str,
    ami: &str,
    checks: &mut Checks,
    skipped: &mut Vec<String>,
) -> Result<(), PublishError> {
    let ec2 = publisher.aws.ec2(region);
    let described = ec2.describe_images().image_ids(ami).send().await;
    let image = match described {
        Ok(out) => out
            .images()
            .iter()
            .find(|i| i.image_id() == Some(ami))
            .cloned(),
        Err(e) if crate::ami::sdk_error_code(&e).is_some_and(|c| c.starts_with("InvalidAMIID")) => {
            None
        }
        Err(e) => return Err(aws("DescribeImages", region)(e)),
    };
    let Some(image) = image else {
        checks.add("ami", ami, region, "available", Some("missing".into()));
        return Ok(());
    };
    let state = image
        .state()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default();
    checks.add(
        "ami",
        ami,
        region,
        "available",
        (state != "available").then_some(state),
    );
    let Some(output) = &publisher.recipe.outputs.ami else {
        return Ok(());
    };
    if !output.share_accounts.is_empty() && !image.public().unwrap_or(false) {
        let attribute = ec2
            .describe_image_attribute()
            .image_id(ami)
            .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
            .send()
            .await
            .map_err(aws("DescribeImageAttribute", region))?;
        let permitted: Vec<&str> = attribute
            .launch_permissions()
            .iter()
            .filter_map(|p| p.user_id())
            .collect();
        let public = attribute
            .launch_permissions()
            .iter()
            .any(|p| p.group().is_some_and(|g| g.as_str() == "all"));
        for account in &output.share_accounts {
            let found = (!public && !permitted.contains(&account.as_str()))
                .then(|| format!("account {account} may not launch it"));
            checks.add(
                "launch_permission",
                format!("{ami} for account {account}"),
                region,
                format!("account {account} may launch it"),
                found,
            );
        }
    }
    let renderer = Renderer::default();
    let context = Context::new(
        publisher.recipe,
        Some(release.version.as_str()),
        Some(region),
        Secrets::Reveal,
    );
    for (key, template) in &output.tags {
        let wanted = renderer
            .render(template, &context)
            .map_err(|e| PublishError::Render {
                field: format!("outputs.ami.tags.{key}"),
                source: Box::new(e),
            })?;
        let actual = image
            .tags()
            .iter()
            .find(|t| t.key() == Some(key.as_str()))
            .and_then(|t| t.value());
        checks.add(
            "ami_tag",
            format!("{ami} tag {key}"),
            region,
            wanted.clone(),
            (actual != Some(wanted.as_str())).then(|| {
                actual
                    .map(str::to_owned)
                    .unwrap_or_else(|| "no such tag".into())
            }),
        );
    }
    if output.deprecate_after.is_some() {
        match publisher.aws.emulator() {
            Some(emulator) if !emulator.serves_image_deprecation() => skipped.push(format!(
                "deprecation time of {ami} in {region}: the {} emulator does not serve image deprecation",
                emulator.name()
            )),
            _ => checks.add(
                "deprecation",
                ami,
                region,
                "a deprecation time",
                image.deprecation_time().is_none().then(|| "none".into()),
            ),
        }
    }
    Ok(())
}

async fn check_templates<D: DigestCheck>(
    publisher: &Publisher<'_, D>,
    release: &References,
    region: &str,
    ami: &str,
    checks: &mut Checks,
) -> Result<(), PublishError> {
    let ec2 = publisher.aws.ec2(region);
    for lt in release
        .launch_templates
        .iter()
        .filter(|l| l.region == region)
    {
        let shown = format!(
            "{} ({}) version {}",
            lt.template_name, lt.template_id, lt.version
        );
        let image_of = |version: String| {
            let ec2 = ec2.clone();
            let id = lt.template_id.clone();
            async move {
                ec2.describe_launch_template_versions()
                    .launch_template_id(id)
                    .versions(version)
                    .send()
                    .await
                    .map(|out| {
                        out.launch_template_versions().first().map(|v| {
                            (
                                v.version_number().unwrap_or_default(),
                                v.launch_template_data()
                                    .and_then(|d| d.image_id())
                                    .unwrap_or("no AMI")
                                    .to_owned(),
                            )
                        })
                    })
            }
        };
        let recorded = match image_of(lt.version.to_string()).await {
            Ok(found) => found,
            Err(e)
                if crate::ami::sdk_error_code(&e)
                    .is_some_and(|c| c.starts_with("InvalidLaunchTemplate")) =>
            {
                None
            }
            Err(e) => return Err(aws("DescribeLaunchTemplateVersions", region)(e)),
        };
        let found = match &recorded {
            None => Some("no such version".to_owned()),
            Some((_, image)) if image != ami => Some(format!("launches {image}")),
            Some(_) => None,
        };
        checks.add(
            "launch_template_version",
            shown.clone(),
            region,
            format!("launches {ami}"),
            found,
        );
        // A channel moves the default version (publish.channels): consumers of `$Default` must
        // get the version too.
        if recorded.is_some() {
            let default = image_of("$Default".into())
                .await
                .map_err(aws("DescribeLaunchTemplateVersions", region))?;
            let found = match default {
                Some((number, image)) if number != lt.version || image != ami => Some(format!(
                    "default is version {number}, which launches {image}"
                )),
                Some(_) => None,
                None => Some("no default version".into()),
            };
            checks.add(
                "launch_template_default",
                format!("{} ({})", lt.template_name, lt.template_id),
                region,
                format!("default is version {} ({ami})", lt.version),
                found,
            );
        }
    }
    Ok(())
}

async fn check_parameters<D: DigestCheck>(
    publisher: &Publisher<'_, D>,
    release: &References,
    region: &str,
    ami: &str,
    checks: &mut Checks,
) -> Result<(), PublishError> {
    let recipe = publisher.recipe;
    let all = recipe
        .outputs
        .ami
        .as_ref()
        .map(|a| a.regions.clone())
        .unwrap_or_default();
    let ssm = clients::ssm(publisher.aws, region);
    for target in &recipe.publish.ssm_parameters {
        if !target
            .regions
            .as_deref()
            .unwrap_or(&all)
            .iter()
            .any(|r| r == region)
        {
            continue;
        }
        let (name, _) = render_parameter(recipe, target, &release.version, region)?;
        let found = match ssm.get_parameter().name(&name).send().await {
            Ok(out) => {
                let parameter = out.parameter();
                let value = parameter.and_then(|p| p.value()).unwrap_or_default();
                let data_type = parameter.and_then(|p| p.data_type()).unwrap_or("text");
                if value != ami {
                    Some(format!("holds {value}"))
                } else if data_type != "aws:ec2:image" {
                    Some(format!(
                        "has data type {data_type}, so AWS does not validate it as an AMI"
                    ))
                } else {
                    None
                }
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                Some("missing".into())
            }
            Err(e) => return Err(aws("GetParameter", region)(e)),
        };
        checks.add(
            "ssm_parameter",
            name,
            region,
            format!("holds {ami} (aws:ec2:image)"),
            found,
        );
    }
    Ok(())
}

async fn check_tasks<D: DigestCheck>(
    publisher: &Publisher<'_, D>,
    release: &References,
    checks: &mut Checks,
) -> Result<(), PublishError> {
    for task in &release.task_definitions {
        let ecs = clients::ecs(publisher.aws, &task.region);
        let found = match ecs
            .describe_task_definition()
            .task_definition(&task.arn)
            .send()
            .await
        {
            Ok(out) => {
                let definition = out.task_definition();
                let status = definition
                    .and_then(|d| d.status())
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default();
                let image = definition
                    .and_then(|d| {
                        d.container_definitions()
                            .iter()
                            .find(|c| c.name() == Some(task.container.as_str()))
                    })
                    .and_then(|c| c.image());
                if status != "ACTIVE" {
                    Some(format!("is {status}"))
                } else if image != Some(task.image.as_str()) {
                    Some(format!(
                        "container {} runs {}",
                        task.container,
                        image.unwrap_or("nothing")
                    ))
                } else {
                    None
                }
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_client_exception()) =>
            {
                Some("missing".into())
            }
            Err(e) => return Err(aws("DescribeTaskDefinition", &task.region)(e)),
        };
        checks.add(
            "task_definition",
            task.arn.clone(),
            &task.region,
            format!("active, container {} runs {}", task.container, task.image),
            found,
        );
    }
    Ok(())
}

async fn check_fleet<D: DigestCheck>(
    publisher: &Publisher<'_, D>,
    channel: &str,
    release: &References,
    checks: &mut Checks,
) -> Result<(), PublishError> {
    let Some(rollout) = publisher.recipe.publish.rollouts.get(channel) else {
        return Ok(());
    };
    for group in &rollout.auto_scaling_groups {
        for lt in &release.launch_templates {
            if group
                .regions
                .as_ref()
                .is_some_and(|r| !r.contains(&lt.region))
            {
                continue;
            }
            let autoscaling = clients::autoscaling(publisher.aws, &lt.region);
            let out = autoscaling
                .describe_auto_scaling_groups()
                .auto_scaling_group_names(&group.name)
                .send()
                .await
                .map_err(aws("DescribeAutoScalingGroups", &lt.region))?;
            let found = match out.auto_scaling_groups().first() {
                None => Some("missing".to_owned()),
                Some(g) => match g.launch_template() {
                    Some(t)
                        if t.launch_template_id() == Some(lt.template_id.as_str())
                            && t.version() == Some(lt.version.to_string().as_str()) =>
                    {
                        None
                    }
                    Some(t) => Some(format!(
                        "runs {} version {}",
                        t.launch_template_id()
                            .or(t.launch_template_name())
                            .unwrap_or("?"),
                        t.version().unwrap_or("$Default")
                    )),
                    None => Some("has no launch template".into()),
                },
            };
            checks.add(
                "auto_scaling_group",
                group.name.clone(),
                &lt.region,
                format!("runs {} version {}", lt.template_id, lt.version),
                found,
            );
        }
    }
    for service in &rollout.ecs_services {
        let Some(task) = release
            .task_definitions
            .iter()
            .find(|t| t.family == service.family && t.region == service.region)
        else {
            continue;
        };
        let ecs = clients::ecs(publisher.aws, &service.region);
        let current = crate::publish::ecs::service_task_definition(
            &ecs,
            &crate::recipe::EcsService {
                cluster: service.cluster.clone(),
                name: service.name.clone(),
            },
            &service.region,
        )
        .await;
        let found = match current {
            Ok(arn) if arn == task.arn => None,
            Ok(arn) => Some(format!("runs {arn}")),
            Err(PublishError::ServiceMissing { .. }) => Some("missing".into()),
            Err(e) => return Err(e),
        };
        checks.add(
            "ecs_service",
            format!("{}/{}", service.cluster, service.name),
            &service.region,
            format!("runs {}", task.arn),
            found,
        );
    }
    Ok(())
}
