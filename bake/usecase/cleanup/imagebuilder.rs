//! The cleanup's tag pass over EC2 Image Builder.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{CleanupRequest, CleanupResult, SkippedVersion, Unlisted};
use crate::aws::Aws;
use crate::imagebuilder::cleanup as imagebuilder_cleanup;
use crate::store::Store;

/// How long one Image Builder call of the cleanup's tag sweep may take: a listing page answers
/// in well under a second; an endpoint that holds the call is given up on, with a warning.
const IMAGE_BUILDER_SWEEP_TIMEOUT: Duration = Duration::from_secs(20);

/// The tag pass over Image Builder: versions of recipes that carry bake's tags, have no build
/// (no record here, no available or running image) and no journal in this store (the journal
/// pass judged those). Removed only with `--older-than`, when all of the version's resources
/// are older: without a journal, a young one may be a live run's on another machine.
pub(super) async fn sweep(
    args: &CleanupRequest,
    aws: &Aws,
    store: Option<&Store>,
    regions: &BTreeSet<String>,
    cutoff: Option<u64>,
    outcome: &mut CleanupResult,
) {
    let journaled: BTreeSet<String> = store
        .map(|store| {
            crate::ami::journal::list(store)
                .into_iter()
                .map(|doc| doc.version)
                .collect()
        })
        .unwrap_or_default();
    for region in regions {
        // A janitor's look, not a build's: an endpoint without Image Builder (an emulator, a
        // proxy that never answers) must not hold up the EC2 cleanup, so one try, bounded.
        let client = aws.imagebuilder(region);
        let client = aws_sdk_imagebuilder::Client::from_conf(
            client
                .config()
                .to_builder()
                .retry_config(aws_config::retry::RetryConfig::disabled())
                .timeout_config(
                    aws_config::timeout::TimeoutConfig::builder()
                        .operation_timeout(IMAGE_BUILDER_SWEEP_TIMEOUT)
                        .build(),
                )
                .build(),
        );
        let found = match imagebuilder_cleanup::find_tagged(&client, region).await {
            Ok(found) => found,
            Err(reason) => {
                eprintln!(
                    "warning: could not list Image Builder resources in {region}, left them as they are: {reason}"
                );
                outcome.image_builder_unlisted.push(Unlisted {
                    region: region.clone(),
                    reason,
                });
                continue;
            }
        };
        for ((recipe, version), resources) in found {
            if journaled.contains(&version) {
                continue;
            }
            match imagebuilder_cleanup::keep(&client, store, &recipe, &version).await {
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(reason) => {
                    outcome.skipped_image_builder.push(SkippedVersion {
                        recipe,
                        version,
                        reason: format!("could not tell whether it is built: {reason}"),
                        resources,
                    });
                    continue;
                }
            }
            let old_enough =
                cutoff.is_some_and(|c| resources.iter().all(|r| r.created.is_some_and(|t| t <= c)));
            if !old_enough {
                outcome.skipped_image_builder.push(SkippedVersion {
                    recipe,
                    version,
                    reason: match cutoff {
                        None => "no journal in this store for this version; pass --older-than to remove it".into(),
                        Some(_) => "newer than --older-than".into(),
                    },
                    resources,
                });
                continue;
            }
            // Images first, components last (`find_tagged` sorted them so).
            for resource in &resources {
                let mut removals = imagebuilder_cleanup::remove(
                    &client,
                    region,
                    None,
                    resource.kind,
                    Some(&resource.arn),
                    &resource.arn,
                    args.dry_run,
                )
                .await;
                for r in &mut removals {
                    r.reason = Some(format!("version {version} of {recipe}, never built"));
                }
                outcome.journals.removals.extend(removals);
            }
        }
    }
}
