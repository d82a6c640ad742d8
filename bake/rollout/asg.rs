//! Auto Scaling groups: find what a group runs, pin it to a numbered launch template version,
//! start an instance refresh to the release's numbered version, watch it, undo it.
//!
//! AWS can only roll a refresh back when the group names a numbered launch template version and
//! the image is an AMI id (not `resolve:ssm:`). bake therefore always refreshes to the numbered
//! version it published, and first pins a group that follows `$Default` or `$Latest` to the
//! number that label means now (which changes nothing that runs).

use aws_sdk_autoscaling::types::{
    AlarmSpecification, DesiredConfiguration, LaunchTemplateSpecification, RefreshPreferences,
    RefreshStrategy,
};
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::{Phase, RolloutError, TargetProgress};
use crate::publish::PublishError;
use crate::publish::channel::References;
use crate::publish::error::aws;
use crate::recipe::{Rollout, RolloutStrategy};

/// Percent of the group kept in service by a blue/green refresh (all of the old fleet) and the
/// most it may grow to (a whole new fleet beside it).
const BLUE_GREEN_MIN_HEALTHY: i32 = 100;
const BLUE_GREEN_MAX_HEALTHY: i32 = 200;

/// One group in one region, and the refresh bake started in it.
#[derive(Debug, Clone)]
pub struct GroupTarget {
    pub region: String,
    pub name: String,
    pub template_id: String,
    /// The numbered version the group ran before (where a rollback returns).
    pub from_version: i64,
    /// The release's numbered version.
    pub to_version: i64,
    /// The group followed `$Default`/`$Latest`: pin it to `from_version` before refreshing.
    pub pin: Option<String>,
    pub refresh_id: Option<String>,
}

impl GroupTarget {
    pub fn shown(&self) -> String {
        format!("group {} ({})", self.name, self.region)
    }
}

/// Looks at `name` in `region`: which of the release's launch templates it uses, and at which
/// numbered version.
pub async fn look(
    autoscaling: &aws_sdk_autoscaling::Client,
    ec2: &aws_sdk_ec2::Client,
    name: &str,
    region: &str,
    release: &References,
) -> Result<GroupTarget, RolloutError> {
    let out = autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .map_err(aws("DescribeAutoScalingGroups", region))?;
    let group = out
        .auto_scaling_groups()
        .first()
        .ok_or_else(|| RolloutError::GroupMissing {
            group: name.to_owned(),
            region: region.to_owned(),
        })?;
    let spec = group
        .launch_template()
        .or_else(|| {
            group
                .mixed_instances_policy()
                .and_then(|p| p.launch_template())
                .and_then(|t| t.launch_template_specification())
        })
        .ok_or_else(|| RolloutError::GroupTemplate {
            group: name.to_owned(),
            region: region.to_owned(),
            problem: "has no launch template (launch configurations cannot be refreshed to a launch template version bake published)".into(),
        })?;
    let record = release
        .launch_templates
        .iter()
        .filter(|l| l.region == region)
        .find(|l| {
            spec.launch_template_id() == Some(l.template_id.as_str())
                || spec.launch_template_name() == Some(l.template_name.as_str())
        })
        .ok_or_else(|| RolloutError::GroupTemplate {
            group: name.to_owned(),
            region: region.to_owned(),
            problem: format!(
                "uses launch template `{}`, which version {} was not published to",
                spec.launch_template_name()
                    .or(spec.launch_template_id())
                    .unwrap_or("?"),
                release.version
            ),
        })?;
    let label = spec.version().unwrap_or("$Default");
    let (from_version, pin) = match label.parse::<i64>() {
        Ok(number) => (number, None),
        Err(_) => {
            let number = resolve(ec2, &record.template_id, label, region).await?;
            (number, Some(label.to_owned()))
        }
    };
    Ok(GroupTarget {
        region: region.to_owned(),
        name: name.to_owned(),
        template_id: record.template_id.clone(),
        from_version,
        to_version: record.version,
        pin,
        refresh_id: None,
    })
}

/// The number a launch template version label (`$Default`, `$Latest`) means now.
async fn resolve(
    ec2: &aws_sdk_ec2::Client,
    template_id: &str,
    label: &str,
    region: &str,
) -> Result<i64, RolloutError> {
    let out = ec2
        .describe_launch_template_versions()
        .launch_template_id(template_id)
        .versions(label)
        .send()
        .await
        .map_err(aws("DescribeLaunchTemplateVersions", region))?;
    out.launch_template_versions()
        .first()
        .and_then(|v| v.version_number())
        .ok_or_else(|| {
            PublishError::LaunchTemplateMissing {
                template: template_id.to_owned(),
                region: region.to_owned(),
            }
            .into()
        })
}

fn specification(target: &GroupTarget, version: i64) -> LaunchTemplateSpecification {
    LaunchTemplateSpecification::builder()
        .launch_template_id(&target.template_id)
        .version(version.to_string())
        .build()
}

/// Points a group that follows a label at the number the label means now.
pub async fn pin(
    autoscaling: &aws_sdk_autoscaling::Client,
    target: &GroupTarget,
) -> Result<(), RolloutError> {
    autoscaling
        .update_auto_scaling_group()
        .auto_scaling_group_name(&target.name)
        .launch_template(specification(target, target.from_version))
        .send()
        .await
        .map_err(aws(
            &format!("UpdateAutoScalingGroup for group `{}`", target.name),
            &target.region,
        ))?;
    Ok(())
}

fn seconds(d: std::time::Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

/// The refresh preferences for the recipe's strategy.
pub fn preferences(rollout: &Rollout) -> RefreshPreferences {
    let mut p = RefreshPreferences::builder()
        .skip_matching(rollout.skip_matching)
        // bake always names a numbered version, so AWS can always roll back.
        .auto_rollback(true);
    match rollout.strategy {
        RolloutStrategy::Canary => {
            p = p
                .set_checkpoint_percentages(Some(
                    rollout.checkpoints.iter().map(|c| i32::from(*c)).collect(),
                ))
                .checkpoint_delay(seconds(rollout.checkpoint_delay));
            if let Some(min) = rollout.min_healthy_percentage {
                p = p.min_healthy_percentage(i32::from(min));
            }
        }
        RolloutStrategy::Rolling => {
            if let Some(min) = rollout.min_healthy_percentage {
                p = p.min_healthy_percentage(i32::from(min));
            }
        }
        RolloutStrategy::BlueGreen => {
            p = p
                .min_healthy_percentage(BLUE_GREEN_MIN_HEALTHY)
                .max_healthy_percentage(BLUE_GREEN_MAX_HEALTHY);
        }
    }
    if let Some(warmup) = rollout.instance_warmup {
        p = p.instance_warmup(seconds(warmup));
    }
    if let Some(bake) = rollout.bake_time {
        p = p.bake_time(seconds(bake));
    }
    if !rollout.alarms.is_empty() {
        p = p.alarm_specification(
            AlarmSpecification::builder()
                .set_alarms(Some(rollout.alarms.clone()))
                .build(),
        );
    }
    p.build()
}

/// Starts a refresh of the group to `version`; returns its id.
pub async fn start(
    autoscaling: &aws_sdk_autoscaling::Client,
    target: &GroupTarget,
    version: i64,
    preferences: RefreshPreferences,
) -> Result<String, RolloutError> {
    let out = autoscaling
        .start_instance_refresh()
        .auto_scaling_group_name(&target.name)
        .strategy(RefreshStrategy::Rolling)
        .desired_configuration(
            DesiredConfiguration::builder()
                .launch_template(specification(target, version))
                .build(),
        )
        .preferences(preferences)
        .send()
        .await
        .map_err(aws(
            &format!("StartInstanceRefresh for group `{}`", target.name),
            &target.region,
        ))?;
    out.instance_refresh_id()
        .map(str::to_owned)
        .ok_or_else(|| RolloutError::Answer {
            what: target.shown(),
            problem: "StartInstanceRefresh answered without a refresh id".into(),
        })
}

/// Where the refresh is now.
pub async fn watch(
    autoscaling: &aws_sdk_autoscaling::Client,
    target: &GroupTarget,
) -> Result<TargetProgress, RolloutError> {
    let id = target.refresh_id.as_deref().unwrap_or_default();
    let out = autoscaling
        .describe_instance_refreshes()
        .auto_scaling_group_name(&target.name)
        .instance_refresh_ids(id)
        .send()
        .await
        .map_err(aws(
            &format!("DescribeInstanceRefreshes for group `{}`", target.name),
            &target.region,
        ))?;
    let refresh = out
        .instance_refreshes()
        .first()
        .ok_or_else(|| RolloutError::Answer {
            what: target.shown(),
            problem: format!("instance refresh {id} is not listed"),
        })?;
    let status = refresh
        .status()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default();
    let reason = refresh.status_reason().map(str::to_owned);
    let why = || {
        reason
            .clone()
            .unwrap_or_else(|| format!("the refresh is {status}"))
    };
    let phase = match status.as_str() {
        "Successful" => Phase::Succeeded,
        "RollbackSuccessful" => Phase::RolledBack(why()),
        "RollbackFailed" => Phase::RollbackFailed(why()),
        "Failed" | "Cancelled" => Phase::Failed(why()),
        "RollbackInProgress" => Phase::RollingBack(why()),
        _ => Phase::Running,
    };
    let (percentage, left) = match refresh.rollback_details() {
        Some(back) if status.starts_with("Rollback") => (
            back.percentage_complete_on_rollback(),
            back.instances_to_update_on_rollback(),
        ),
        _ => (refresh.percentage_complete(), refresh.instances_to_update()),
    };
    Ok(TargetProgress {
        target: target.shown(),
        status,
        percentage: percentage.and_then(|p| u8::try_from(p).ok()),
        detail: left.map(|n| format!("{n} instances to update")),
        reason,
        phase,
    })
}

/// Undoes a refresh that is still running: AWS rolls the replaced instances back. `false` when
/// AWS says the refresh is no longer active (it ended meanwhile) or cannot be rolled back.
pub async fn roll_back(
    autoscaling: &aws_sdk_autoscaling::Client,
    target: &GroupTarget,
) -> Result<bool, RolloutError> {
    match autoscaling
        .rollback_instance_refresh()
        .auto_scaling_group_name(&target.name)
        .send()
        .await
    {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error()
                .and_then(|s| s.code())
                .is_some_and(|c| {
                    c == "ActiveInstanceRefreshNotFound" || c == "IrreversibleInstanceRefresh"
                }) =>
        {
            Ok(false)
        }
        Err(e) => Err(aws(
            &format!("RollbackInstanceRefresh for group `{}`", target.name),
            &target.region,
        )(e)
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn rollout(strategy: RolloutStrategy, checkpoints: Vec<u8>) -> Rollout {
        Rollout {
            strategy,
            checkpoints,
            checkpoint_delay: Duration::from_secs(300),
            min_healthy_percentage: Some(75),
            instance_warmup: None,
            bake_time: Some(Duration::from_secs(60)),
            alarms: vec!["web-5xx".into()],
            skip_matching: true,
            timeout: Duration::from_secs(3600),
            auto_scaling_groups: Vec::new(),
            ecs_services: Vec::new(),
        }
    }

    #[test]
    fn each_strategy_asks_for_what_it_means() {
        let canary = preferences(&rollout(RolloutStrategy::Canary, vec![10, 50, 100]));
        assert_eq!(canary.checkpoint_percentages(), [10, 50, 100]);
        assert_eq!(canary.checkpoint_delay(), Some(300));
        assert_eq!(canary.min_healthy_percentage(), Some(75));
        assert_eq!(canary.auto_rollback(), Some(true));
        assert_eq!(canary.bake_time(), Some(60));
        assert_eq!(canary.alarm_specification().unwrap().alarms(), ["web-5xx"]);

        let rolling = preferences(&rollout(RolloutStrategy::Rolling, Vec::new()));
        assert!(rolling.checkpoint_percentages().is_empty());
        assert_eq!(rolling.min_healthy_percentage(), Some(75));
        assert_eq!(rolling.auto_rollback(), Some(true));

        let blue_green = preferences(&rollout(RolloutStrategy::BlueGreen, Vec::new()));
        assert_eq!(blue_green.min_healthy_percentage(), Some(100));
        assert_eq!(blue_green.max_healthy_percentage(), Some(200));
    }
}
