//! ECS task definitions: a new revision of the family, identical to its latest one except that
//! the named container's image is `repository@sha256:…` (never a tag), tagged with the bake
//! version. A revision that already runs that digest is reused. Optionally an ECS service is
//! moved to the revision.

use aws_sdk_ecs::types::{Tag, TaskDefinition, TaskDefinitionField, TaskDefinitionStatus};

use super::error::{PublishError, aws};
use crate::recipe::EcsService;

/// How many of a family's newest revisions are searched for one to reuse: enough for every
/// revision a release train keeps active, bounded so a huge family does not cost minutes.
const REVISIONS_SEARCHED: usize = 100;

/// The tag that records which bake version a revision was registered for.
pub const VERSION_TAG: &str = "bake:version";

/// A family now, for one wanted image.
#[derive(Debug, Clone)]
pub struct FamilyState {
    pub latest: TaskDefinition,
    pub latest_tags: Vec<Tag>,
    /// The image the container runs in the latest revision.
    pub current_image: Option<String>,
    /// An active revision whose container already runs the wanted image.
    pub existing: Option<String>,
}

fn container_image<'a>(definition: &'a TaskDefinition, container: &str) -> Option<&'a str> {
    definition
        .container_definitions()
        .iter()
        .find(|c| c.name() == Some(container))
        .and_then(|c| c.image())
}

/// Looks at the family (or, before its first revision, the recipe's template).
pub async fn look(
    ecs: &aws_sdk_ecs::Client,
    family: &str,
    container: &str,
    region: &str,
    wanted_image: &str,
    template: Option<&std::path::Path>,
) -> Result<FamilyState, PublishError> {
    let described = ecs
        .describe_task_definition()
        .task_definition(family)
        .include(TaskDefinitionField::Tags)
        .send()
        .await;
    let described = match described {
        Ok(out) => out,
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_client_exception()) =>
        {
            let Some(path) = template else {
                return Err(PublishError::NoTaskDefinition {
                    family: family.to_owned(),
                    region: region.to_owned(),
                });
            };
            let latest = from_template(path, family)?;
            if !latest
                .container_definitions()
                .iter()
                .any(|c| c.name() == Some(container))
            {
                return Err(PublishError::NoContainer {
                    container: container.to_owned(),
                    task_definition: path.display().to_string(),
                });
            }
            return Ok(FamilyState {
                current_image: None,
                latest,
                latest_tags: Vec::new(),
                existing: None,
            });
        }
        Err(e) => return Err(aws("DescribeTaskDefinition", region)(e)),
    };
    let latest =
        described
            .task_definition()
            .cloned()
            .ok_or_else(|| PublishError::NoTaskDefinition {
                family: family.to_owned(),
                region: region.to_owned(),
            })?;
    let current_image = container_image(&latest, container).map(str::to_owned);
    if !latest
        .container_definitions()
        .iter()
        .any(|c| c.name() == Some(container))
    {
        return Err(PublishError::NoContainer {
            container: container.to_owned(),
            task_definition: latest.task_definition_arn().unwrap_or(family).to_owned(),
        });
    }
    let existing = if current_image.as_deref() == Some(wanted_image) {
        latest.task_definition_arn().map(str::to_owned)
    } else {
        find_revision(ecs, family, container, region, wanted_image).await?
    };
    Ok(FamilyState {
        latest_tags: described.tags().to_vec(),
        latest,
        current_image,
        existing,
    })
}

/// The newest active revision of `family` whose container runs `image`.
async fn find_revision(
    ecs: &aws_sdk_ecs::Client,
    family: &str,
    container: &str,
    region: &str,
    image: &str,
) -> Result<Option<String>, PublishError> {
    let mut arns = Vec::new();
    let mut token = None;
    while arns.len() < REVISIONS_SEARCHED {
        let page = ecs
            .list_task_definitions()
            .family_prefix(family)
            .status(TaskDefinitionStatus::Active)
            .sort(aws_sdk_ecs::types::SortOrder::Desc)
            .set_next_token(token)
            .send()
            .await
            .map_err(aws("ListTaskDefinitions", region))?;
        // The prefix also matches longer family names: keep this family's own revisions.
        arns.extend(
            page.task_definition_arns()
                .iter()
                .filter(|arn| {
                    arn.rsplit_once('/')
                        .and_then(|(_, fr)| fr.rsplit_once(':'))
                        .is_some_and(|(f, _)| f == family)
                })
                .cloned(),
        );
        token = page.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    arns.truncate(REVISIONS_SEARCHED);
    for arn in arns {
        let out = ecs
            .describe_task_definition()
            .task_definition(&arn)
            .send()
            .await
            .map_err(aws("DescribeTaskDefinition", region))?;
        if out
            .task_definition()
            .and_then(|d| container_image(d, container))
            == Some(image)
        {
            return Ok(Some(arn));
        }
    }
    Ok(None)
}

fn some_vec<T: Clone>(items: &[T]) -> Option<Vec<T>> {
    (!items.is_empty()).then(|| items.to_vec())
}

/// Registers a copy of the latest revision with the container's image replaced; returns its
/// ARN.
pub async fn register(
    ecs: &aws_sdk_ecs::Client,
    state: &FamilyState,
    container: &str,
    region: &str,
    image: &str,
    version: &str,
) -> Result<String, PublishError> {
    let latest = &state.latest;
    let containers = latest
        .container_definitions()
        .iter()
        .map(|c| {
            if c.name() == Some(container) {
                let mut c = c.clone();
                c.image = Some(image.to_owned());
                c
            } else {
                c.clone()
            }
        })
        .collect();
    let mut tags: Vec<Tag> = state
        .latest_tags
        .iter()
        .filter(|t| t.key() != Some(VERSION_TAG))
        .cloned()
        .collect();
    tags.push(Tag::builder().key(VERSION_TAG).value(version).build());
    let out = ecs
        .register_task_definition()
        .set_family(latest.family().map(str::to_owned))
        .set_task_role_arn(latest.task_role_arn().map(str::to_owned))
        .set_execution_role_arn(latest.execution_role_arn().map(str::to_owned))
        .set_network_mode(latest.network_mode().cloned())
        .set_container_definitions(Some(containers))
        .set_volumes(some_vec(latest.volumes()))
        .set_placement_constraints(some_vec(latest.placement_constraints()))
        .set_requires_compatibilities(some_vec(latest.requires_compatibilities()))
        .set_cpu(latest.cpu().map(str::to_owned))
        .set_memory(latest.memory().map(str::to_owned))
        .set_pid_mode(latest.pid_mode().cloned())
        .set_ipc_mode(latest.ipc_mode().cloned())
        .set_proxy_configuration(latest.proxy_configuration().cloned())
        .set_ephemeral_storage(latest.ephemeral_storage().cloned())
        .set_runtime_platform(latest.runtime_platform().cloned())
        .set_enable_fault_injection(latest.enable_fault_injection())
        .set_tags(Some(tags))
        .send()
        .await
        .map_err(aws("RegisterTaskDefinition", region))?;
    out.task_definition()
        .and_then(|d| d.task_definition_arn())
        .map(str::to_owned)
        .ok_or_else(|| PublishError::Aws {
            operation: "RegisterTaskDefinition".into(),
            region: region.to_owned(),
            source: "the answer has no task definition ARN".into(),
        })
}

/// The task definition a service runs now.
pub async fn service_task_definition(
    ecs: &aws_sdk_ecs::Client,
    service: &EcsService,
    region: &str,
) -> Result<String, PublishError> {
    let out = ecs
        .describe_services()
        .cluster(&service.cluster)
        .services(&service.name)
        .send()
        .await
        .map_err(aws("DescribeServices", region))?;
    out.services()
        .iter()
        .find(|s| s.service_name() == Some(service.name.as_str()) && s.status() != Some("INACTIVE"))
        .and_then(|s| s.task_definition())
        .map(str::to_owned)
        .ok_or_else(|| PublishError::ServiceMissing {
            cluster: service.cluster.clone(),
            service: service.name.clone(),
            region: region.to_owned(),
        })
}

/// Moves a service to `task_definition`.
pub async fn update_service(
    ecs: &aws_sdk_ecs::Client,
    service: &EcsService,
    region: &str,
    task_definition: &str,
) -> Result<(), PublishError> {
    ecs.update_service()
        .cluster(&service.cluster)
        .service(&service.name)
        .task_definition(task_definition)
        .send()
        .await
        .map_err(aws("UpdateService", region))?;
    Ok(())
}

/// A task definition template (the `RegisterTaskDefinition` JSON shape, for the fields listed
/// here) for a family's first revision. Unknown fields are refused rather than dropped.
mod template {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct TaskTemplate {
        pub family: Option<String>,
        pub cpu: Option<String>,
        pub memory: Option<String>,
        pub network_mode: Option<String>,
        #[serde(default)]
        pub requires_compatibilities: Vec<String>,
        pub execution_role_arn: Option<String>,
        pub task_role_arn: Option<String>,
        pub runtime_platform: Option<RuntimePlatform>,
        pub container_definitions: Vec<Container>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct RuntimePlatform {
        pub cpu_architecture: Option<String>,
        pub operating_system_family: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Container {
        pub name: String,
        pub image: Option<String>,
        pub cpu: Option<i32>,
        pub memory: Option<i32>,
        pub memory_reservation: Option<i32>,
        pub essential: Option<bool>,
        pub command: Option<Vec<String>>,
        pub entry_point: Option<Vec<String>>,
        #[serde(default)]
        pub environment: Vec<NameValue>,
        #[serde(default)]
        pub port_mappings: Vec<PortMapping>,
        pub working_directory: Option<String>,
        pub user: Option<String>,
        pub readonly_root_filesystem: Option<bool>,
        pub log_configuration: Option<LogConfiguration>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct NameValue {
        pub name: String,
        pub value: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct PortMapping {
        pub container_port: i32,
        pub host_port: Option<i32>,
        pub protocol: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct LogConfiguration {
        pub log_driver: String,
        #[serde(default)]
        pub options: BTreeMap<String, String>,
    }
}

/// Reads a template and makes the task definition it describes (before its first revision).
pub fn from_template(path: &std::path::Path, family: &str) -> Result<TaskDefinition, PublishError> {
    use aws_sdk_ecs::types::{
        Compatibility, ContainerDefinition, CpuArchitecture, KeyValuePair, LogConfiguration,
        LogDriver, NetworkMode, OsFamily, PortMapping, RuntimePlatform, TransportProtocol,
    };
    let invalid = |source: Box<dyn std::error::Error + Send + Sync>| PublishError::TaskTemplate {
        family: family.to_owned(),
        path: path.display().to_string(),
        source,
    };
    let text = fs_err::read_to_string(path).map_err(|e| invalid(Box::new(e)))?;
    let t: template::TaskTemplate =
        serde_json::from_str(&text).map_err(|e| invalid(Box::new(e)))?;
    if let Some(named) = &t.family
        && named != family
    {
        return Err(invalid(
            format!("its family is `{named}`, the recipe's is `{family}`").into(),
        ));
    }
    let containers = t
        .container_definitions
        .into_iter()
        .map(|c| {
            ContainerDefinition::builder()
                .name(c.name)
                .set_image(c.image)
                .set_cpu(c.cpu)
                .set_memory(c.memory)
                .set_memory_reservation(c.memory_reservation)
                .set_essential(c.essential)
                .set_command(c.command)
                .set_entry_point(c.entry_point)
                .set_environment(some_vec(
                    &c.environment
                        .into_iter()
                        .map(|e| KeyValuePair::builder().name(e.name).value(e.value).build())
                        .collect::<Vec<_>>(),
                ))
                .set_port_mappings(some_vec(
                    &c.port_mappings
                        .into_iter()
                        .map(|p| {
                            PortMapping::builder()
                                .container_port(p.container_port)
                                .set_host_port(p.host_port)
                                .set_protocol(
                                    p.protocol.map(|s| TransportProtocol::from(s.as_str())),
                                )
                                .build()
                        })
                        .collect::<Vec<_>>(),
                ))
                .set_working_directory(c.working_directory)
                .set_user(c.user)
                .set_readonly_root_filesystem(c.readonly_root_filesystem)
                .set_log_configuration(c.log_configuration.map(|l| {
                    LogConfiguration::builder()
                        .log_driver(LogDriver::from(l.log_driver.as_str()))
                        .set_options(
                            (!l.options.is_empty()).then(|| l.options.into_iter().collect()),
                        )
                        .build()
                        .expect("the log driver is set")
                }))
                .build()
        })
        .collect::<Vec<_>>();
    Ok(TaskDefinition::builder()
        .family(family)
        .set_cpu(t.cpu)
        .set_memory(t.memory)
        .set_network_mode(t.network_mode.map(|m| NetworkMode::from(m.as_str())))
        .set_requires_compatibilities(some_vec(
            &t.requires_compatibilities
                .iter()
                .map(|c| Compatibility::from(c.as_str()))
                .collect::<Vec<_>>(),
        ))
        .set_execution_role_arn(t.execution_role_arn)
        .set_task_role_arn(t.task_role_arn)
        .set_runtime_platform(t.runtime_platform.map(|p| {
            RuntimePlatform::builder()
                .set_cpu_architecture(
                    p.cpu_architecture
                        .map(|a| CpuArchitecture::from(a.as_str())),
                )
                .set_operating_system_family(
                    p.operating_system_family
                        .map(|o| OsFamily::from(o.as_str())),
                )
                .build()
        }))
        .set_container_definitions(Some(containers))
        .build())
}
