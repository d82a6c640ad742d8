//! Removing a builder's temporary resources, in the only order AWS allows: terminate the
//! instance and wait until it is gone (its network interface holds the security group), then
//! delete the key pair and the security group, and deregister a half-made AMI with its
//! snapshots. Every step runs even when an earlier one fails; failures are collected, never
//! allowed to hide the error that made the build stop.
//!
//! Resources are found by their `bake:build-id` tag (and, for what the journal recorded, by
//! id), so nothing without bake's tags is ever touched. [`remove_journaled`] is how the shared
//! `bake cleanup` ([`crate::ami::cleanup`]) removes the instance kinds of a dead run's journal.

use std::time::Duration;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use serde::Serialize;

use super::wait::WaitPolicy;
use super::{TAG_BUILD_ID, TAG_CREATED, TAG_STATE};
use crate::ami::cleanup::{Action, Removal};
use crate::ami::journal::{Resource, ResourceKind};

/// One temporary resource found in AWS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Found {
    pub kind: ResourceKind,
    pub region: String,
    pub id: String,
    /// The key pair's name (deletion by id is not supported everywhere).
    pub name: Option<String>,
    pub build_id: String,
    /// Seconds since the epoch, from the `bake:created` tag.
    pub created: Option<u64>,
}

/// Something cleanup could not remove.
#[derive(Debug, Clone, Serialize)]
pub struct CleanupFailure {
    pub kind: ResourceKind,
    pub region: String,
    pub id: String,
    pub reason: String,
}

impl std::fmt::Display for CleanupFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "failed to remove {} {} in {}: {}",
            self.kind.label(),
            self.id,
            self.region,
            self.reason
        )
    }
}

/// What a cleanup did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CleanupReport {
    pub removed: Vec<Found>,
    pub failures: Vec<CleanupFailure>,
}

fn explain<E: ProvideErrorMetadata + std::fmt::Debug>(e: &E) -> String {
    match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => format!("{e:?}"),
    }
}

fn tag_filter(key: &str, value: Option<&str>) -> Filter {
    match value {
        Some(v) => Filter::builder()
            .name(format!("tag:{key}"))
            .values(v)
            .build(),
        None => Filter::builder().name("tag-key").values(key).build(),
    }
}

fn tag<'a>(tags: &'a [aws_sdk_ec2::types::Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

fn found(
    kind: ResourceKind,
    region: &str,
    id: Option<&str>,
    name: Option<&str>,
    tags: &[aws_sdk_ec2::types::Tag],
) -> Option<Found> {
    Some(Found {
        kind,
        region: region.to_owned(),
        id: id?.to_owned(),
        name: name.map(str::to_owned),
        build_id: tag(tags, TAG_BUILD_ID)?.to_owned(),
        created: tag(tags, TAG_CREATED).and_then(|c| c.parse().ok()),
    })
}

/// Finds bake's temporary resources in one region: those of `build_id`, or of every build.
/// AMIs are included only while tagged `bake:state=building` (a finished AMI is a product).
pub async fn find(
    ec2: &aws_sdk_ec2::Client,
    region: &str,
    build_id: Option<&str>,
) -> Result<Vec<Found>, String> {
    let by_tag = || tag_filter(TAG_BUILD_ID, build_id);
    let mut out = Vec::new();
    let instances = ec2
        .describe_instances()
        .filters(by_tag())
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .values("stopping")
                .values("stopped")
                .values("shutting-down")
                .build(),
        )
        .send()
        .await
        .map_err(|e| format!("failed to list instances in {region}: {}", explain(&e)))?;
    for r in instances.reservations() {
        for i in r.instances() {
            out.extend(found(
                ResourceKind::Instance,
                region,
                i.instance_id(),
                None,
                i.tags(),
            ));
        }
    }
    let keys = ec2
        .describe_key_pairs()
        .filters(by_tag())
        .send()
        .await
        .map_err(|e| format!("failed to list key pairs in {region}: {}", explain(&e)))?;
    for k in keys.key_pairs() {
        out.extend(found(
            ResourceKind::KeyPair,
            region,
            k.key_pair_id(),
            k.key_name(),
            k.tags(),
        ));
    }
    let groups = ec2
        .describe_security_groups()
        .filters(by_tag())
        .send()
        .await
        .map_err(|e| {
            format!(
                "failed to list security groups in {region}: {}",
                explain(&e)
            )
        })?;
    for g in groups.security_groups() {
        out.extend(found(
            ResourceKind::SecurityGroup,
            region,
            g.group_id(),
            g.group_name(),
            g.tags(),
        ));
    }
    let images = ec2
        .describe_images()
        .owners("self")
        .filters(by_tag())
        .filters(tag_filter(TAG_STATE, Some("building")))
        .send()
        .await
        .map_err(|e| format!("failed to list AMIs in {region}: {}", explain(&e)))?;
    for i in images.images() {
        out.extend(found(
            ResourceKind::Image,
            region,
            i.image_id(),
            i.name(),
            i.tags(),
        ));
    }
    Ok(out)
}

/// Removes `resources` (all in one region) in dependency order and reports each outcome.
pub async fn remove(
    ec2: &aws_sdk_ec2::Client,
    resources: &[Found],
    wait: &WaitPolicy,
) -> CleanupReport {
    let mut report = CleanupReport::default();
    let of = |kind: ResourceKind| resources.iter().filter(move |r| r.kind == kind);
    let fail = |r: &Found, reason: String| CleanupFailure {
        kind: r.kind,
        region: r.region.clone(),
        id: r.id.clone(),
        reason,
    };

    // Instances first; the group can only go once their interfaces are gone.
    let instances: Vec<&Found> = of(ResourceKind::Instance).collect();
    let mut terminated = Vec::new();
    if !instances.is_empty() {
        let ids: Vec<String> = instances.iter().map(|r| r.id.clone()).collect();
        match ec2
            .terminate_instances()
            .set_instance_ids(Some(ids.clone()))
            .send()
            .await
        {
            Ok(_) => terminated = instances.clone(),
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => {
                terminated = instances.clone()
            }
            Err(e) => {
                let reason = explain(&e);
                report
                    .failures
                    .extend(instances.iter().map(|r| fail(r, reason.clone())));
            }
        }
        if !terminated.is_empty() {
            let ids: Vec<String> = terminated.iter().map(|r| r.id.clone()).collect();
            match wait_terminated(ec2, &ids, wait).await {
                Ok(()) => report
                    .removed
                    .extend(terminated.iter().map(|r| (*r).clone())),
                Err(reason) => report
                    .failures
                    .extend(terminated.iter().map(|r| fail(r, reason.clone()))),
            }
        }
    }

    for r in of(ResourceKind::KeyPair) {
        let mut request = ec2.delete_key_pair();
        request = match &r.name {
            Some(name) => request.key_name(name),
            None => request.key_pair_id(&r.id),
        };
        match request.send().await {
            Ok(_) => report.removed.push(r.clone()),
            Err(e) if e.code() == Some("InvalidKeyPair.NotFound") => report.removed.push(r.clone()),
            Err(e) => report.failures.push(fail(r, explain(&e))),
        }
    }

    for r in of(ResourceKind::SecurityGroup) {
        match delete_group(ec2, &r.id, wait).await {
            Ok(()) => report.removed.push(r.clone()),
            Err(reason) => report.failures.push(fail(r, reason)),
        }
    }

    for r in of(ResourceKind::Image) {
        match deregister(ec2, &r.id).await {
            Ok(()) => report.removed.push(r.clone()),
            Err(reason) => report.failures.push(fail(r, reason)),
        }
    }
    report
}

async fn wait_terminated(
    ec2: &aws_sdk_ec2::Client,
    ids: &[String],
    wait: &WaitPolicy,
) -> Result<(), String> {
    wait.until("the builder instance to terminate", || async {
        let out = ec2
            .describe_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await;
        match out {
            Ok(out) => Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .all(|i| i.state().and_then(|s| s.name()) == Some(&InstanceStateName::Terminated))),
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Ok(true),
            Err(e) => Err(explain(&e)),
        }
    })
    .await
}

/// Deletes a group, retrying while AWS still sees it in use (interfaces of a just-terminated
/// instance linger for a while).
async fn delete_group(
    ec2: &aws_sdk_ec2::Client,
    id: &str,
    wait: &WaitPolicy,
) -> Result<(), String> {
    wait.until("the security group to be deletable", || async {
        match ec2.delete_security_group().group_id(id).send().await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("InvalidGroup.NotFound") => Ok(true),
            Err(e) if e.code() == Some("DependencyViolation") => Ok(false),
            Err(e) => Err(explain(&e)),
        }
    })
    .await
}

/// Deregisters an AMI and deletes the snapshots it referenced.
pub async fn deregister(ec2: &aws_sdk_ec2::Client, image_id: &str) -> Result<(), String> {
    let snapshots: Vec<String> = match ec2.describe_images().image_ids(image_id).send().await {
        Ok(out) => out
            .images()
            .iter()
            .flat_map(|i| i.block_device_mappings())
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
            .collect(),
        Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidAMIID")) => return Ok(()),
        Err(e) => return Err(explain(&e)),
    };
    match ec2.deregister_image().image_id(image_id).send().await {
        Ok(_) => {}
        Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidAMIID")) => {}
        Err(e) => return Err(explain(&e)),
    }
    for snapshot in snapshots {
        match ec2.delete_snapshot().snapshot_id(&snapshot).send().await {
            Ok(_) => {}
            Err(e) if e.code() == Some("InvalidSnapshot.NotFound") => {}
            Err(e) => return Err(format!("snapshot {snapshot}: {}", explain(&e))),
        }
    }
    Ok(())
}

/// Removes one instance-kind entry of a dead run's journal (`run` is its build id): by its id
/// when the journal has it, else whatever carries the run's tag. With `dry_run`, lists what
/// exists instead.
pub async fn remove_journaled(
    ec2: &aws_sdk_ec2::Client,
    resource: &Resource,
    run: &str,
    dry_run: bool,
) -> Vec<Removal> {
    let removal = |id: &str, action, error: Option<String>| Removal {
        region: resource.region.clone(),
        kind: resource.kind,
        id: id.to_owned(),
        action,
        error,
        reason: None,
        run: Some(run.to_owned()),
    };
    let tagged = match find(ec2, &resource.region, Some(run)).await {
        Ok(found) => found,
        Err(reason) => {
            let id = resource.id.as_deref().unwrap_or(&resource.token);
            return vec![removal(id, Action::Failed, Some(reason))];
        }
    };
    let mut targets: Vec<Found> = tagged
        .into_iter()
        .filter(|f| f.kind == resource.kind)
        .filter(|f| match (&resource.id, resource.kind) {
            (Some(id), ResourceKind::KeyPair) => {
                f.name.as_deref() == Some(id.as_str()) || &f.id == id
            }
            (Some(id), _) => &f.id == id,
            (None, _) => true,
        })
        .collect();
    // Journalled by id but its tags never arrived: still ours, by the journal.
    if targets.is_empty()
        && let Some(id) = &resource.id
        && !dry_run
    {
        targets.push(Found {
            kind: resource.kind,
            region: resource.region.clone(),
            id: id.clone(),
            name: (resource.kind == ResourceKind::KeyPair).then(|| id.clone()),
            build_id: run.to_owned(),
            created: None,
        });
    }
    if targets.is_empty() {
        let id = resource.id.as_deref().unwrap_or(&resource.token);
        return vec![removal(id, Action::AlreadyGone, None)];
    }
    if dry_run {
        return targets
            .iter()
            .map(|f| removal(&f.id, Action::WouldRemove, None))
            .collect();
    }
    let report = remove(ec2, &targets, &default_wait()).await;
    report
        .removed
        .iter()
        .map(|f| removal(&f.id, Action::Removed, None))
        .chain(
            report
                .failures
                .iter()
                .map(|f| removal(&f.id, Action::Failed, Some(f.reason.clone()))),
        )
        .collect()
}

/// Seconds to wait between polls while removing (instances take a minute to terminate).
pub fn default_wait() -> WaitPolicy {
    WaitPolicy {
        interval: Duration::from_secs(5),
        // About ten minutes: termination rarely takes more than two.
        max_attempts: 120,
        consecutive: 1,
    }
}
