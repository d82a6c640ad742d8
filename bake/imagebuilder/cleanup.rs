//! `bake cleanup` for what `bake build --engine imagebuilder` left: Image Builder resources of a
//! version that never got built.
//!
//! A version's components, recipe and configurations are its immutable resources, reused by
//! every build of it, so they are leftovers only while the version has no build: a run killed
//! before its image existed, or one whose image failed or was cancelled. They are never touched
//! when
//!
//! - this store has the version's build record ([`Keep::Recorded`]),
//! - the version has an `AVAILABLE` image in Image Builder, whichever store recorded it (or
//!   none yet: the next `bake build` records it) ([`Keep::Built`]),
//! - the version has an image in progress (a killed run's build goes on in AWS, and the next
//!   run follows it) ([`Keep::Building`]),
//!
//! nor when they lack bake's `bake:recipe` and `bake:version` tags. Journaled resources (a dead
//! run's journal names them) are removed like the run's EC2 resources; tagged ones no journal of
//! this store names, only with `--older-than` (the CLI decides: [`find_tagged`] only lists).
//! Images go first, then the configurations, the recipe and the components, as Image Builder
//! refuses to delete what something still uses.

use std::collections::BTreeMap;
use std::str::FromStr;

use aws_sdk_imagebuilder::Client;
use aws_sdk_imagebuilder::error::ProvideErrorMetadata;
use aws_sdk_imagebuilder::types::{Filter, ImageStatus, Ownership};
use serde::Serialize;

use super::compile::version_resource_name;
use crate::ami::cleanup::{Action, Removal};
use crate::ami::journal::ResourceKind;
use crate::ami::{TAG_RECIPE, TAG_VERSION};
use crate::id::Version;
use crate::store::Store;

/// Why a version's Image Builder resources stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// This store has the version's build record.
    Recorded,
    /// The version has an available image.
    Built { image_arn: String },
    /// The version has an image in progress.
    Building { image_arn: String, status: String },
    /// The `bake:version` tag is not a version bake wrote: not bake's to judge.
    Foreign,
}

impl Keep {
    /// Why, for a report line.
    pub fn reason(&self, version: &str) -> String {
        match self {
            Keep::Recorded => {
                format!("version {version} has a build record: these are its immutable resources")
            }
            Keep::Built { image_arn } => format!(
                "version {version} is built ({image_arn} is AVAILABLE): these are its immutable resources"
            ),
            Keep::Building { image_arn, status } => format!(
                "version {version} is being built ({image_arn} is {status}); `bake build` follows it"
            ),
            Keep::Foreign => format!("`{version}` is not a version bake wrote"),
        }
    }

    /// Whether a journal's entries are settled for good (they are the version's now); a build
    /// in progress may still fail, so its run's journal stays for a later cleanup.
    pub fn settled(&self) -> bool {
        !matches!(self, Keep::Building { .. })
    }
}

/// One tagged Image Builder resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tagged {
    pub kind: ResourceKind,
    pub region: String,
    pub arn: String,
    pub recipe: String,
    pub version: String,
    /// Seconds since the epoch, from Image Builder's `dateCreated`.
    pub created: Option<u64>,
    /// For images: their state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

fn detail<E: ProvideErrorMetadata + std::fmt::Debug>(error: &E) -> String {
    match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => format!("{error:?}"),
    }
}

fn not_found<E: ProvideErrorMetadata>(error: &E) -> bool {
    error.code() == Some("ResourceNotFoundException")
}

/// Image Builder's `dateCreated` (RFC 3339, `Z` or `+00:00`) as seconds since the epoch.
fn epoch(text: Option<&str>) -> Option<u64> {
    let text = text?;
    let text = text
        .strip_suffix("+00:00")
        .map_or_else(|| text.to_owned(), |t| format!("{t}Z"));
    aws_smithy_types::DateTime::from_str(&text, aws_smithy_types::date_time::Format::DateTime)
        .ok()
        .and_then(|t| u64::try_from(t.secs()).ok())
        .or_else(|| {
            humantime::parse_rfc3339_weak(&text)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
        })
}

fn bake_tags(tags: Option<&std::collections::HashMap<String, String>>) -> Option<(String, String)> {
    let tags = tags?;
    Some((
        tags.get(TAG_RECIPE)?.clone(),
        tags.get(TAG_VERSION)?.clone(),
    ))
}

fn name_filter(name: &str) -> Filter {
    Filter::builder().name("name").values(name).build()
}

/// Every build of the version's image (`name`, the image recipe's), with its state.
async fn image_builds(client: &Client, name: &str) -> Result<Vec<(String, ImageStatus)>, String> {
    let mut builds = Vec::new();
    let mut versions = client
        .list_images()
        .owner(Ownership::SelfValue)
        .filters(name_filter(name))
        .into_paginator()
        .send();
    let mut version_arns = Vec::new();
    while let Some(page) = versions.next().await {
        let page = page.map_err(|e| detail(&e))?;
        version_arns.extend(
            page.image_version_list()
                .iter()
                .filter(|v| v.name() == Some(name))
                .filter_map(|v| v.arn().map(str::to_owned)),
        );
    }
    for version_arn in version_arns {
        let mut pages = client
            .list_image_build_versions()
            .image_version_arn(&version_arn)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| detail(&e))?;
            for summary in page.image_summary_list() {
                if let (Some(arn), Some(status)) =
                    (summary.arn(), summary.state().and_then(|s| s.status()))
                {
                    builds.push((arn.to_owned(), status.clone()));
                }
            }
        }
    }
    Ok(builds)
}

/// Whether (and why) the Image Builder resources of `recipe` at `version` stay.
pub async fn keep(
    client: &Client,
    store: Option<&Store>,
    recipe: &str,
    version: &str,
) -> Result<Option<Keep>, String> {
    if let Some(store) = store
        && store
            .record(version)
            .map_err(|e| format!("failed to read the build record of {version}: {e}"))?
            .is_some()
    {
        return Ok(Some(Keep::Recorded));
    }
    let Ok(parsed) = Version::from_str(version) else {
        return Ok(Some(Keep::Foreign));
    };
    let builds = image_builds(client, &version_resource_name(recipe, &parsed)).await?;
    if let Some((arn, _)) = builds.iter().find(|(_, s)| *s == ImageStatus::Available) {
        return Ok(Some(Keep::Built {
            image_arn: arn.clone(),
        }));
    }
    if let Some((arn, status)) = builds.iter().find(|(_, s)| super::engine::in_progress(s)) {
        return Ok(Some(Keep::Building {
            image_arn: arn.clone(),
            status: status.as_str().to_owned(),
        }));
    }
    Ok(None)
}

/// The ARNs of the resources of `kind` named `name` (a journal entry whose create call never
/// answered). For images, the builds of the version's image that are over (failed or
/// cancelled: [`keep`] has ruled out the others).
async fn named(client: &Client, kind: ResourceKind, name: &str) -> Result<Vec<String>, String> {
    let mut arns = Vec::new();
    match kind {
        ResourceKind::ImageBuilderComponent => {
            let versions = client
                .list_components()
                .owner(Ownership::SelfValue)
                .filters(name_filter(name))
                .send()
                .await
                .map_err(|e| detail(&e))?;
            for version in versions.component_version_list() {
                let Some(arn) = version.arn().filter(|_| version.name() == Some(name)) else {
                    continue;
                };
                let builds = client
                    .list_component_build_versions()
                    .component_version_arn(arn)
                    .send()
                    .await
                    .map_err(|e| detail(&e))?;
                arns.extend(
                    builds
                        .component_summary_list()
                        .iter()
                        .filter_map(|c| c.arn().map(str::to_owned)),
                );
            }
        }
        ResourceKind::ImageBuilderImageRecipe => {
            let out = client
                .list_image_recipes()
                .owner(Ownership::SelfValue)
                .filters(name_filter(name))
                .send()
                .await
                .map_err(|e| detail(&e))?;
            arns.extend(
                out.image_recipe_summary_list()
                    .iter()
                    .filter(|r| r.name() == Some(name))
                    .filter_map(|r| r.arn().map(str::to_owned)),
            );
        }
        ResourceKind::ImageBuilderContainerRecipe => {
            let out = client
                .list_container_recipes()
                .owner(Ownership::SelfValue)
                .filters(name_filter(name))
                .send()
                .await
                .map_err(|e| detail(&e))?;
            arns.extend(
                out.container_recipe_summary_list()
                    .iter()
                    .filter(|r| r.name() == Some(name))
                    .filter_map(|r| r.arn().map(str::to_owned)),
            );
        }
        ResourceKind::ImageBuilderInfrastructure => {
            let out = client
                .list_infrastructure_configurations()
                .filters(name_filter(name))
                .send()
                .await
                .map_err(|e| detail(&e))?;
            arns.extend(
                out.infrastructure_configuration_summary_list()
                    .iter()
                    .filter(|r| r.name() == Some(name))
                    .filter_map(|r| r.arn().map(str::to_owned)),
            );
        }
        ResourceKind::ImageBuilderDistribution => {
            let out = client
                .list_distribution_configurations()
                .filters(name_filter(name))
                .send()
                .await
                .map_err(|e| detail(&e))?;
            arns.extend(
                out.distribution_configuration_summary_list()
                    .iter()
                    .filter(|r| r.name() == Some(name))
                    .filter_map(|r| r.arn().map(str::to_owned)),
            );
        }
        ResourceKind::ImageBuilderImage => {
            arns.extend(
                image_builds(client, name)
                    .await?
                    .into_iter()
                    .filter(|(_, s)| !super::engine::in_progress(s))
                    .map(|(arn, _)| arn),
            );
        }
        _ => {}
    }
    Ok(arns)
}

/// Whether the resource `arn` of `kind` exists (for `--dry-run`).
async fn exists(client: &Client, kind: ResourceKind, arn: &str) -> Result<bool, String> {
    macro_rules! probe {
        ($call:expr) => {
            match $call.send().await {
                Ok(_) => Ok(true),
                Err(e) if not_found(&e) => Ok(false),
                Err(e) => Err(detail(&e)),
            }
        };
    }
    match kind {
        ResourceKind::ImageBuilderComponent => {
            probe!(client.get_component().component_build_version_arn(arn))
        }
        ResourceKind::ImageBuilderImageRecipe => {
            probe!(client.get_image_recipe().image_recipe_arn(arn))
        }
        ResourceKind::ImageBuilderContainerRecipe => {
            probe!(client.get_container_recipe().container_recipe_arn(arn))
        }
        ResourceKind::ImageBuilderInfrastructure => probe!(
            client
                .get_infrastructure_configuration()
                .infrastructure_configuration_arn(arn)
        ),
        ResourceKind::ImageBuilderDistribution => probe!(
            client
                .get_distribution_configuration()
                .distribution_configuration_arn(arn)
        ),
        ResourceKind::ImageBuilderImage => {
            probe!(client.get_image().image_build_version_arn(arn))
        }
        _ => Ok(false),
    }
}

/// Deletes the resource `arn` of `kind`: `Removed`, `AlreadyGone`, or `Failed` with the reason.
async fn delete(client: &Client, kind: ResourceKind, arn: &str) -> (Action, Option<String>) {
    macro_rules! delete {
        ($call:expr) => {
            match $call.send().await {
                Ok(_) => (Action::Removed, None),
                Err(e) if not_found(&e) => (Action::AlreadyGone, None),
                Err(e) => (Action::Failed, Some(detail(&e))),
            }
        };
    }
    match kind {
        ResourceKind::ImageBuilderComponent => {
            delete!(client.delete_component().component_build_version_arn(arn))
        }
        ResourceKind::ImageBuilderImageRecipe => {
            delete!(client.delete_image_recipe().image_recipe_arn(arn))
        }
        ResourceKind::ImageBuilderContainerRecipe => {
            delete!(client.delete_container_recipe().container_recipe_arn(arn))
        }
        ResourceKind::ImageBuilderInfrastructure => delete!(
            client
                .delete_infrastructure_configuration()
                .infrastructure_configuration_arn(arn)
        ),
        ResourceKind::ImageBuilderDistribution => delete!(
            client
                .delete_distribution_configuration()
                .distribution_configuration_arn(arn)
        ),
        ResourceKind::ImageBuilderImage => {
            delete!(client.delete_image().image_build_version_arn(arn))
        }
        _ => (
            Action::Failed,
            Some(format!("{} is not Image Builder's", kind.label())),
        ),
    }
}

/// Removes (or with `dry_run` reports) one resource of kind `kind`: `arn` when known, else what
/// is named `name`. `run` is the run it is reported under.
pub async fn remove(
    client: &Client,
    region: &str,
    run: Option<&str>,
    kind: ResourceKind,
    arn: Option<&str>,
    name: &str,
    dry_run: bool,
) -> Vec<Removal> {
    let removal = |id: &str, action, error| Removal {
        region: region.to_owned(),
        kind,
        id: id.to_owned(),
        action,
        error,
        reason: None,
        run: run.map(str::to_owned),
    };
    let arns = match arn {
        Some(arn) => vec![arn.to_owned()],
        None => match named(client, kind, name).await {
            Ok(arns) => arns,
            Err(e) => return vec![removal(name, Action::Failed, Some(e))],
        },
    };
    let mut out = Vec::new();
    for arn in arns {
        if dry_run {
            out.push(match exists(client, kind, &arn).await {
                Ok(true) => removal(&arn, Action::WouldRemove, None),
                Ok(false) => removal(&arn, Action::AlreadyGone, None),
                Err(e) => removal(&arn, Action::Failed, Some(e)),
            });
            continue;
        }
        let (action, error) = delete(client, kind, &arn).await;
        out.push(removal(&arn, action, error));
    }
    out
}

/// The order resources of one version go in: images first (they use everything else), the
/// components last (the recipe uses them).
pub fn removal_rank(kind: ResourceKind) -> u8 {
    match kind {
        ResourceKind::ImageBuilderImage => 0,
        ResourceKind::ImageBuilderDistribution => 1,
        ResourceKind::ImageBuilderInfrastructure => 2,
        ResourceKind::ImageBuilderImageRecipe | ResourceKind::ImageBuilderContainerRecipe => 3,
        _ => 4,
    }
}

/// Every Image Builder resource in `client`'s region that carries `bake:recipe` and
/// `bake:version`, grouped by `(recipe, version)`.
pub async fn find_tagged(
    client: &Client,
    region: &str,
) -> Result<BTreeMap<(String, String), Vec<Tagged>>, String> {
    let mut found: BTreeMap<(String, String), Vec<Tagged>> = BTreeMap::new();
    let mut add = |kind,
                   arn: Option<&str>,
                   tags: Option<&std::collections::HashMap<String, String>>,
                   created: Option<&str>,
                   status: Option<String>| {
        if let (Some(arn), Some((recipe, version))) = (arn, bake_tags(tags)) {
            found
                .entry((recipe.clone(), version.clone()))
                .or_default()
                .push(Tagged {
                    kind,
                    region: region.to_owned(),
                    arn: arn.to_owned(),
                    recipe,
                    version,
                    created: epoch(created),
                    status,
                });
        }
    };

    let mut component_versions = Vec::new();
    let mut pages = client
        .list_components()
        .owner(Ownership::SelfValue)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| detail(&e))?;
        component_versions.extend(
            page.component_version_list()
                .iter()
                .filter_map(|c| c.arn().map(str::to_owned)),
        );
    }
    for version_arn in component_versions {
        let mut pages = client
            .list_component_build_versions()
            .component_version_arn(&version_arn)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| detail(&e))?;
            for c in page.component_summary_list() {
                add(
                    ResourceKind::ImageBuilderComponent,
                    c.arn(),
                    c.tags(),
                    c.date_created(),
                    None,
                );
            }
        }
    }

    let mut pages = client
        .list_image_recipes()
        .owner(Ownership::SelfValue)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| detail(&e))?;
        for r in page.image_recipe_summary_list() {
            add(
                ResourceKind::ImageBuilderImageRecipe,
                r.arn(),
                r.tags(),
                r.date_created(),
                None,
            );
        }
    }

    let mut pages = client
        .list_container_recipes()
        .owner(Ownership::SelfValue)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| detail(&e))?;
        for r in page.container_recipe_summary_list() {
            add(
                ResourceKind::ImageBuilderContainerRecipe,
                r.arn(),
                r.tags(),
                r.date_created(),
                None,
            );
        }
    }

    let mut pages = client
        .list_infrastructure_configurations()
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| detail(&e))?;
        for r in page.infrastructure_configuration_summary_list() {
            add(
                ResourceKind::ImageBuilderInfrastructure,
                r.arn(),
                r.tags(),
                r.date_created(),
                None,
            );
        }
    }

    let mut pages = client
        .list_distribution_configurations()
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| detail(&e))?;
        for r in page.distribution_configuration_summary_list() {
            add(
                ResourceKind::ImageBuilderDistribution,
                r.arn(),
                r.tags(),
                r.date_created(),
                None,
            );
        }
    }

    let mut image_versions = Vec::new();
    let mut pages = client
        .list_images()
        .owner(Ownership::SelfValue)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| detail(&e))?;
        image_versions.extend(
            page.image_version_list()
                .iter()
                .filter_map(|v| v.arn().map(str::to_owned)),
        );
    }
    for version_arn in image_versions {
        let mut pages = client
            .list_image_build_versions()
            .image_version_arn(&version_arn)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| detail(&e))?;
            for s in page.image_summary_list() {
                add(
                    ResourceKind::ImageBuilderImage,
                    s.arn(),
                    s.tags(),
                    s.date_created(),
                    s.state()
                        .and_then(|s| s.status())
                        .map(|s| s.as_str().to_owned()),
                );
            }
        }
    }
    for resources in found.values_mut() {
        resources.sort_by_key(|r| (removal_rank(r.kind), r.arn.clone()));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_builder_dates_read_as_epoch_seconds() {
        assert_eq!(epoch(Some("2020-12-01T18:24:33.000Z")), Some(1_606_847_073));
        assert_eq!(
            epoch(Some("2020-12-01T18:24:33.123456+00:00")),
            Some(1_606_847_073)
        );
        assert_eq!(epoch(Some("yesterday")), None);
        assert_eq!(epoch(None), None);
    }

    #[test]
    fn images_go_first_and_components_last() {
        let mut kinds = vec![
            ResourceKind::ImageBuilderComponent,
            ResourceKind::ImageBuilderImageRecipe,
            ResourceKind::ImageBuilderImage,
            ResourceKind::ImageBuilderInfrastructure,
            ResourceKind::ImageBuilderDistribution,
        ];
        kinds.sort_by_key(|k| removal_rank(*k));
        assert_eq!(
            kinds,
            vec![
                ResourceKind::ImageBuilderImage,
                ResourceKind::ImageBuilderDistribution,
                ResourceKind::ImageBuilderInfrastructure,
                ResourceKind::ImageBuilderImageRecipe,
                ResourceKind::ImageBuilderComponent,
            ]
        );
    }
}
