//! What a run of a recipe would do, listed before it does it (like `terraform plan`): what is
//! built, pushed, registered and pointed where. Names are rendered with the real version, with
//! sensitive values redacted.

use serde::Serialize;

use crate::recipe::template::{Context, Renderer, Secrets};
use crate::recipe::{AmiStrategy, Base, LaunchTemplateRef, Recipe, RecipeError, Template};

/// One thing a run would change or create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Effect {
    /// Build an OCI image into the local store.
    BuildImage {
        platform: String,
        base: String,
        steps: usize,
        tests: usize,
    },
    /// Build a bootable disk image locally (snapshot strategy).
    BuildDisk { size_gib: u32, boot_mode: String },
    /// Launch a temporary builder instance (instance strategy).
    LaunchBuilder {
        region: String,
        instance_type: String,
    },
    /// Upload the disk to an EBS snapshot with the EBS direct APIs.
    UploadSnapshot { region: String, encrypted: bool },
    /// Register (or create) the AMI in its build region.
    RegisterAmi { region: String, name: String },
    /// Copy the AMI to another region.
    CopyAmi {
        from: String,
        to: String,
        name: String,
        encrypted: bool,
    },
    /// Grant launch permissions.
    ShareAmi {
        region: String,
        accounts: Vec<String>,
        organizations: Vec<String>,
        organizational_units: Vec<String>,
        public: bool,
    },
    /// Push the image to an OCI registry.
    PushImage {
        repository: String,
        tags: Vec<String>,
    },
    /// Push the image to ECR (creating the repository if asked).
    PushEcr {
        repository: String,
        region: String,
        tags: Vec<String>,
        create_repository: bool,
    },
    /// Create a launch template version pointing at the new AMI.
    CreateLaunchTemplateVersion {
        template: String,
        region: String,
        source_version: String,
        set_default: bool,
    },
    /// Write the AMI id to an SSM parameter.
    PutSsmParameter { name: String, region: String },
    /// Register a task definition revision pinned to the image digest.
    RegisterTaskDefinition {
        family: String,
        region: String,
        container: String,
        repository: String,
        update_service: Option<String>,
    },
}

impl Effect {
    /// One line for people: `+ verb object (details)`.
    pub fn describe(&self) -> String {
        match self {
            Effect::BuildImage {
                platform,
                base,
                steps,
                tests,
            } => format!(
                "build OCI image for {platform} from {base} ({steps} step{}, {tests} test{})",
                plural(*steps),
                plural(*tests)
            ),
            Effect::BuildDisk {
                size_gib,
                boot_mode,
            } => {
                format!("build a {boot_mode} disk image of {size_gib} GiB")
            }
            Effect::LaunchBuilder {
                region,
                instance_type,
            } => {
                format!("launch a temporary {instance_type} builder instance in {region}")
            }
            Effect::UploadSnapshot { region, encrypted } => format!(
                "upload the disk to an {}EBS snapshot in {region}",
                if *encrypted { "encrypted " } else { "" }
            ),
            Effect::RegisterAmi { region, name } => format!("register AMI `{name}` in {region}"),
            Effect::CopyAmi {
                from,
                to,
                name,
                encrypted,
            } => format!(
                "copy AMI `{name}` from {from} to {to}{}",
                if *encrypted { " (encrypted)" } else { "" }
            ),
            Effect::ShareAmi {
                region,
                accounts,
                organizations,
                organizational_units,
                public,
            } => {
                let mut with: Vec<String> =
                    accounts.iter().map(|a| format!("account {a}")).collect();
                with.extend(organizations.iter().map(|o| format!("organization {o}")));
                with.extend(organizational_units.iter().map(|o| format!("OU {o}")));
                if *public {
                    with.push("EVERYONE (public)".into());
                }
                format!("share the AMI in {region} with {}", with.join(", "))
            }
            Effect::PushImage { repository, tags } => {
                format!("push image to {repository}{}", tag_list(tags))
            }
            Effect::PushEcr {
                repository,
                region,
                tags,
                create_repository,
            } => format!(
                "push image to ECR repository {repository} in {region}{}{}",
                tag_list(tags),
                if *create_repository {
                    " (creating it if missing)"
                } else {
                    ""
                }
            ),
            Effect::CreateLaunchTemplateVersion {
                template,
                region,
                source_version,
                set_default,
            } => format!(
                "create a version of launch template {template} in {region} from {source_version} with the new AMI{}",
                if *set_default {
                    ", and make it the default"
                } else {
                    ""
                }
            ),
            Effect::PutSsmParameter { name, region } => {
                format!("write the AMI id to SSM parameter {name} in {region}")
            }
            Effect::RegisterTaskDefinition {
                family,
                region,
                container,
                repository,
                update_service,
            } => format!(
                "register task definition {family} in {region} with container {container} pinned to {repository}@<digest>{}",
                update_service
                    .as_ref()
                    .map(|s| format!(", and update service {s}"))
                    .unwrap_or_default()
            ),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn tag_list(tags: &[String]) -> String {
    if tags.is_empty() {
        String::new()
    } else {
        format!(" as {}", tags.join(", "))
    }
}

/// Where a target without its own region publishes: the first AMI region, else the default
/// region of the AWS settings.
fn default_region(recipe: &Recipe, aws_region: Option<&str>) -> String {
    recipe
        .outputs
        .ami
        .as_ref()
        .and_then(|a| a.regions.first().cloned())
        .or_else(|| aws_region.map(str::to_owned))
        .unwrap_or_else(|| "(default region)".into())
}

/// Lists every effect of building and publishing `recipe` at `version`.
pub fn effects(
    recipe: &Recipe,
    version: &str,
    aws_region: Option<&str>,
) -> Result<Vec<Effect>, RecipeError> {
    let renderer = Renderer::default();
    let global = Context::new(recipe, Some(version), None, Secrets::Redact);
    let render = |t: &Template, c: &Context| renderer.render(t, c);
    let mut out = Vec::new();
    let base = describe_base(&recipe.base);
    if let Some(oci) = &recipe.outputs.oci {
        out.push(Effect::BuildImage {
            platform: format!(
                "{}/{}{}",
                oci.os,
                oci.architecture.oci(),
                oci.variant
                    .as_ref()
                    .map(|v| format!("/{v}"))
                    .unwrap_or_default()
            ),
            base: base.clone(),
            steps: recipe.provisioners.len(),
            tests: recipe.tests.len(),
        });
    }
    if let Some(ami) = &recipe.outputs.ami {
        let build_region = ami.regions.first().cloned().unwrap_or_default();
        match ami.strategy {
            AmiStrategy::Snapshot => {
                out.push(Effect::BuildDisk {
                    size_gib: ami.disk_size_gib,
                    boot_mode: serde_json::to_value(ami.boot_mode)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                });
                out.push(Effect::UploadSnapshot {
                    region: build_region.clone(),
                    encrypted: ami.encrypted,
                });
            }
            AmiStrategy::Instance => {
                let instance_type = ami
                    .instance
                    .as_ref()
                    .map_or("", |i| i.instance_type.as_str());
                out.push(Effect::LaunchBuilder {
                    region: build_region.clone(),
                    instance_type: instance_type.into(),
                });
            }
        }
        for (i, region) in ami.regions.iter().enumerate() {
            let regional = Context::new(recipe, Some(version), Some(region), Secrets::Redact);
            let name = render(&ami.name, &regional)?;
            if i == 0 {
                out.push(Effect::RegisterAmi {
                    region: region.clone(),
                    name,
                });
            } else {
                out.push(Effect::CopyAmi {
                    from: build_region.clone(),
                    to: region.clone(),
                    name,
                    encrypted: ami.encrypted,
                });
            }
            let shared = !ami.share_accounts.is_empty()
                || !ami.share_organizations.is_empty()
                || !ami.share_organizational_units.is_empty()
                || ami.public;
            if shared {
                out.push(Effect::ShareAmi {
                    region: region.clone(),
                    accounts: ami.share_accounts.clone(),
                    organizations: ami.share_organizations.clone(),
                    organizational_units: ami.share_organizational_units.clone(),
                    public: ami.public,
                });
            }
        }
    }
    let publish = &recipe.publish;
    for r in &publish.registries {
        out.push(Effect::PushImage {
            repository: r.repository.clone(),
            tags: r
                .tags
                .iter()
                .map(|t| render(t, &global))
                .collect::<Result<_, _>>()?,
        });
    }
    for e in &publish.ecr {
        out.push(Effect::PushEcr {
            repository: e.repository.clone(),
            region: e
                .region
                .clone()
                .unwrap_or_else(|| default_region(recipe, aws_region)),
            tags: e
                .tags
                .iter()
                .map(|t| render(t, &global))
                .collect::<Result<_, _>>()?,
            create_repository: e.create,
        });
    }
    let ami_regions: Vec<String> = recipe
        .outputs
        .ami
        .as_ref()
        .map(|a| a.regions.clone())
        .unwrap_or_default();
    for lt in &publish.launch_templates {
        let regions = lt.regions.clone().unwrap_or_else(|| ami_regions.clone());
        for region in regions {
            out.push(Effect::CreateLaunchTemplateVersion {
                template: match &lt.template {
                    LaunchTemplateRef::Name(n) => n.clone(),
                    LaunchTemplateRef::Id(id) => id.clone(),
                },
                region,
                source_version: lt.source_version.clone(),
                set_default: lt.set_default,
            });
        }
    }
    for s in &publish.ssm_parameters {
        let regions = s.regions.clone().unwrap_or_else(|| ami_regions.clone());
        for region in regions {
            let regional = Context::new(recipe, Some(version), Some(&region), Secrets::Redact);
            out.push(Effect::PutSsmParameter {
                name: render(&s.name, &regional)?,
                region,
            });
        }
    }
    for t in &publish.ecs_task_definitions {
        out.push(Effect::RegisterTaskDefinition {
            family: t.family.clone(),
            region: t.region.clone(),
            container: t.container.clone(),
            repository: t.repository.clone(),
            update_service: t
                .service
                .as_ref()
                .map(|s| format!("{}/{}", s.cluster, s.name)),
        });
    }
    Ok(out)
}

fn describe_base(base: &Base) -> String {
    match base {
        Base::Scratch => "scratch".into(),
        Base::Image { reference } => reference.clone(),
        Base::OciLayout {
            relative_path, tag, ..
        } => match tag {
            Some(tag) => format!("OCI layout {relative_path}:{tag}"),
            None => format!("OCI layout {relative_path}"),
        },
        Base::Rootfs { relative_path, .. } => format!("rootfs {relative_path}"),
        Base::Bootstrap(b) => format!(
            "{} {} ({}{})",
            serde_json::to_value(b.distro)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            b.suite,
            b.variant,
            if b.packages.is_empty() {
                String::new()
            } else {
                format!(" + {} packages", b.packages.len())
            }
        ),
        Base::Recipe { relative_path, .. } => format!("recipe {relative_path}"),
        Base::Ami(filter) => format!(
            "source AMI {}",
            filter
                .name
                .clone()
                .or_else(|| filter.ssm_parameter.clone())
                .unwrap_or_default()
        ),
    }
}
