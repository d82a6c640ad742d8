//! Auto Scaling instance refresh after a launch template's default version changed, so running
//! instances are replaced by ones from the new AMI at the pace the recipe allows.

use aws_sdk_autoscaling::types::RefreshPreferences;

use super::error::{PublishError, aws};
use crate::recipe::InstanceRefresh;

/// Starts the refresh; returns its id.
pub async fn start(
    autoscaling: &aws_sdk_autoscaling::Client,
    refresh: &InstanceRefresh,
    region: &str,
) -> Result<String, PublishError> {
    let mut preferences = RefreshPreferences::builder().skip_matching(refresh.skip_matching);
    if let Some(min) = refresh.min_healthy_percentage {
        preferences = preferences.min_healthy_percentage(i32::from(min));
    }
    let out = autoscaling
        .start_instance_refresh()
        .auto_scaling_group_name(&refresh.auto_scaling_group)
        .preferences(preferences.build())
        .send()
        .await
        .map_err(aws(
            &format!(
                "StartInstanceRefresh for Auto Scaling group `{}`",
                refresh.auto_scaling_group
            ),
            region,
        ))?;
    out.instance_refresh_id()
        .map(str::to_owned)
        .ok_or_else(|| PublishError::Aws {
            operation: "StartInstanceRefresh".into(),
            region: region.to_owned(),
            source: "the answer has no instance refresh id".into(),
        })
}
