//! ECS services: deploy the release's task definition revision with the deployment circuit
//! breaker (and the recipe's alarms) set to roll back, watch the deployment, undo it.

use aws_sdk_ecs::types::{
    DeploymentAlarms, DeploymentCircuitBreaker, DeploymentConfiguration, DeploymentRolloutState,
};

use super::{Phase, RolloutError, TargetProgress};
use crate::publish::channel::References;
use crate::publish::error::aws;
use crate::recipe::{Rollout, RolloutService, RolloutStrategy};

/// A blue/green ECS deployment keeps every old task until the new ones run (100%) and may run
/// both sets at once (200%).
const BLUE_GREEN_MINIMUM_HEALTHY: i32 = 100;
const BLUE_GREEN_MAXIMUM: i32 = 200;

#[derive(Debug, Clone)]
pub struct ServiceTarget {
    pub region: String,
    pub cluster: String,
    pub name: String,
    /// The task definition the service ran before (where a rollback returns).
    pub from_arn: String,
    /// The release's revision.
    pub to_arn: String,
}

impl ServiceTarget {
    pub fn shown(&self) -> String {
        format!("service {}/{} ({})", self.cluster, self.name, self.region)
    }
}

/// Looks at a service: what it runs now, and the release's revision of its family.
pub async fn look(
    ecs: &aws_sdk_ecs::Client,
    service: &RolloutService,
    release: &References,
) -> Result<ServiceTarget, RolloutError> {
    let record = release
        .task_definitions
        .iter()
        .find(|t| t.family == service.family && t.region == service.region)
        .ok_or_else(|| RolloutError::NoRevision {
            family: service.family.clone(),
            region: service.region.clone(),
            version: release.version.clone(),
        })?;
    let current = crate::publish::ecs::service_task_definition(
        ecs,
        &crate::recipe::EcsService {
            cluster: service.cluster.clone(),
            name: service.name.clone(),
        },
        &service.region,
    )
    .await?;
    Ok(ServiceTarget {
        region: service.region.clone(),
        cluster: service.cluster.clone(),
        name: service.name.clone(),
        from_arn: current,
        to_arn: record.arn.clone(),
    })
}

/// The deployment configuration for the recipe's strategy: circuit breaker and alarms both
/// roll back.
pub fn configuration(rollout: &Rollout) -> Result<DeploymentConfiguration, RolloutError> {
    let mut c = DeploymentConfiguration::builder().deployment_circuit_breaker(
        DeploymentCircuitBreaker::builder()
            .enable(true)
            .rollback(true)
            .build(),
    );
    match rollout.strategy {
        RolloutStrategy::BlueGreen => {
            c = c
                .minimum_healthy_percent(BLUE_GREEN_MINIMUM_HEALTHY)
                .maximum_percent(BLUE_GREEN_MAXIMUM);
        }
        RolloutStrategy::Canary | RolloutStrategy::Rolling => {
            if let Some(min) = rollout.min_healthy_percentage {
                c = c.minimum_healthy_percent(i32::from(min));
            }
        }
    }
    if !rollout.alarms.is_empty() {
        c = c.alarms(
            DeploymentAlarms::builder()
                .set_alarm_names(Some(rollout.alarms.clone()))
                .enable(true)
                .rollback(true)
                .build()
                .map_err(|e| RolloutError::Answer {
                    what: "the ECS deployment alarms".into(),
                    problem: e.to_string(),
                })?,
        );
    }
    Ok(c.build())
}

/// The configuration for bake's own move back: the alarms that failed the rollout must not
/// fail the way back, and there is nothing earlier to roll back to.
pub fn undo_configuration(rollout: &Rollout) -> Option<DeploymentConfiguration> {
    let alarms = DeploymentAlarms::builder()
        .set_alarm_names(Some(rollout.alarms.clone()))
        .enable(false)
        .rollback(false)
        .build()
        .ok()?;
    Some(
        DeploymentConfiguration::builder()
            .deployment_circuit_breaker(
                DeploymentCircuitBreaker::builder()
                    .enable(true)
                    .rollback(false)
                    .build(),
            )
            .alarms(alarms)
            .build(),
    )
}

/// Points the service at `task_definition` (a new deployment starts).
pub async fn deploy(
    ecs: &aws_sdk_ecs::Client,
    target: &ServiceTarget,
    task_definition: &str,
    configuration: Option<DeploymentConfiguration>,
) -> Result<(), RolloutError> {
    ecs.update_service()
        .cluster(&target.cluster)
        .service(&target.name)
        .task_definition(task_definition)
        .set_deployment_configuration(configuration)
        .send()
        .await
        .map_err(aws(
            &format!("UpdateService for `{}/{}`", target.cluster, target.name),
            &target.region,
        ))?;
    Ok(())
}

/// Where the deployment of `wanted` is now. `undoing`: bake itself is moving the service back
/// to `from_arn`, so reaching it is the goal rather than a rollback.
pub async fn watch(
    ecs: &aws_sdk_ecs::Client,
    target: &ServiceTarget,
    undoing: bool,
) -> Result<TargetProgress, RolloutError> {
    let out = ecs
        .describe_services()
        .cluster(&target.cluster)
        .services(&target.name)
        .send()
        .await
        .map_err(aws(
            &format!("DescribeServices for `{}/{}`", target.cluster, target.name),
            &target.region,
        ))?;
    let service = out.services().first().ok_or_else(|| RolloutError::Answer {
        what: target.shown(),
        problem: "DescribeServices does not list it".into(),
    })?;
    let deployments = service.deployments();
    let primary = deployments
        .iter()
        .find(|d| d.status() == Some("PRIMARY"))
        .ok_or_else(|| RolloutError::Answer {
            what: target.shown(),
            problem: "the service has no PRIMARY deployment".into(),
        })?;
    let state = |d: &aws_sdk_ecs::types::Deployment| {
        d.rollout_state()
            .cloned()
            .unwrap_or(DeploymentRolloutState::InProgress)
    };
    let ours = deployments
        .iter()
        .find(|d| d.task_definition() == Some(target.to_arn.as_str()));
    let failed_reason = ours
        .filter(|d| state(d) == DeploymentRolloutState::Failed)
        .map(|d| {
            d.rollout_state_reason()
                .unwrap_or("the deployment failed")
                .to_owned()
        });
    let primary_state = state(primary);
    let on = primary.task_definition().unwrap_or_default();
    let goal = if undoing {
        target.from_arn.as_str()
    } else {
        target.to_arn.as_str()
    };
    let phase = if on == goal {
        match primary_state {
            DeploymentRolloutState::Completed if undoing => {
                Phase::RolledBack("moved back by bake".into())
            }
            DeploymentRolloutState::Completed => Phase::Succeeded,
            DeploymentRolloutState::Failed => Phase::Failed(
                primary
                    .rollout_state_reason()
                    .unwrap_or("the deployment failed")
                    .to_owned(),
            ),
            _ => Phase::Running,
        }
    } else if on == target.from_arn {
        // ECS rolled back on its own (circuit breaker or alarm).
        let why = failed_reason.unwrap_or_else(|| {
            primary
                .rollout_state_reason()
                .unwrap_or("ECS rolled the deployment back")
                .to_owned()
        });
        match primary_state {
            DeploymentRolloutState::Completed => Phase::RolledBack(why),
            DeploymentRolloutState::Failed => Phase::RollbackFailed(why),
            _ => Phase::RollingBack(why),
        }
    } else {
        Phase::Failed(format!(
            "the service was moved to `{on}` by someone else during the rollout"
        ))
    };
    Ok(TargetProgress {
        target: target.shown(),
        status: primary_state.as_str().to_owned(),
        percentage: u8::try_from(
            (i64::from(primary.running_count()) * 100)
                .checked_div(i64::from(primary.desired_count()))
                .unwrap_or(100)
                .min(100),
        )
        .ok(),
        detail: Some(format!(
            "{} of {} tasks running, {} failed",
            primary.running_count(),
            primary.desired_count(),
            primary.failed_tasks()
        )),
        reason: primary.rollout_state_reason().map(str::to_owned),
        phase,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn deployments_roll_back_on_the_breaker_and_the_alarms_but_the_way_back_does_not() {
        let rollout = Rollout {
            strategy: RolloutStrategy::BlueGreen,
            checkpoints: Vec::new(),
            checkpoint_delay: Duration::from_secs(60),
            min_healthy_percentage: None,
            instance_warmup: None,
            bake_time: None,
            alarms: vec!["api-5xx".into()],
            skip_matching: true,
            timeout: Duration::from_secs(600),
            auto_scaling_groups: Vec::new(),
            ecs_services: Vec::new(),
        };
        let forward = configuration(&rollout).unwrap();
        let breaker = forward.deployment_circuit_breaker().unwrap();
        assert!(breaker.enable() && breaker.rollback());
        let alarms = forward.alarms().unwrap();
        assert!(alarms.enable() && alarms.rollback());
        assert_eq!(alarms.alarm_names(), ["api-5xx"]);
        assert_eq!(forward.minimum_healthy_percent(), Some(100));
        assert_eq!(forward.maximum_percent(), Some(200));

        let back = undo_configuration(&rollout).unwrap();
        assert!(!back.deployment_circuit_breaker().unwrap().rollback());
        assert!(!back.alarms().unwrap().enable());
    }
}
