//! Releases and channels, kept in AWS so any machine can promote, roll back and pin.
//!
//! - A *release* is what a version was published as: its AMI per region, its image references,
//!   the launch template versions and task definition revisions made for it. Publish writes it
//!   to the SSM parameter `/bake/releases/<recipe>/<version_short>` in the recipe's home region.
//! - A *channel* (`/bake/channels/<recipe>/<channel>`) is a history of promoted releases; the last
//!   entry is current. Promote moves the pointers (launch template default versions, SSM
//!   parameters, ECS services) to a release and appends it; rollback moves them to the previous
//!   entry and drops the current one; pin prints the current entry's immutable references.
//!
//! Both records are tagged with the recipe like every parameter bake owns.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::PublishError;
use super::{
    Action, Change, DigestCheck, ImageRef, Kind, PublishReport, Publisher, RegionOutcome, Status,
    ami, check_digest, clients, ecs, home_region, launch_template, render_parameter, ssm,
};
use crate::diagnostic::Report;
use crate::id::{Version, VersionPrefix};

/// The format tag of a channel record.
const CHANNEL_FORMAT: &str = "bake.channel/1";

/// Entries a channel keeps: rollback needs only the previous one; a few more make the history
/// useful to a person while keeping the record well inside an SSM parameter.
const CHANNEL_HISTORY: usize = 10;

pub fn release_parameter(recipe: &str, version_short: &str) -> String {
    format!("/bake/releases/{recipe}/{version_short}")
}

pub fn channel_parameter(recipe: &str, channel: &str) -> String {
    format!("/bake/channels/{recipe}/{channel}")
}

/// A launch template version made for a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchTemplateRecord {
    pub region: String,
    pub template_id: String,
    pub template_name: String,
    pub version: i64,
}

/// A task definition revision registered for a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskDefinitionRecord {
    pub region: String,
    pub family: String,
    pub container: String,
    pub arn: String,
    /// `repository@sha256:…`.
    pub image: String,
}

/// An SSM parameter version written for a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SsmParameterRecord {
    pub region: String,
    pub name: String,
    pub version: u64,
}

/// The immutable references of one published version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct References {
    pub version: String,
    /// Region → AMI id.
    pub amis: BTreeMap<String, String>,
    /// `repository@sha256:…`.
    pub images: Vec<String>,
    pub launch_templates: Vec<LaunchTemplateRecord>,
    pub task_definitions: Vec<TaskDefinitionRecord>,
    /// Parameter versions that hold the AMI (absent from records of earlier bakes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssm_parameters: Vec<SsmParameterRecord>,
}

impl References {
    /// Adds `other`'s entries, replacing those for the same template or family in a region.
    pub fn merge(&mut self, other: &References) {
        self.amis.extend(other.amis.clone());
        for image in &other.images {
            if !self.images.contains(image) {
                self.images.push(image.clone());
            }
        }
        for lt in &other.launch_templates {
            self.launch_templates
                .retain(|l| !(l.region == lt.region && l.template_id == lt.template_id));
            self.launch_templates.push(lt.clone());
        }
        for td in &other.task_definitions {
            self.task_definitions
                .retain(|t| !(t.region == td.region && t.family == td.family));
            self.task_definitions.push(td.clone());
        }
        for p in &other.ssm_parameters {
            self.ssm_parameters
                .retain(|q| !(q.region == p.region && q.name == p.name));
            self.ssm_parameters.push(p.clone());
        }
        self.ssm_parameters
            .sort_by(|a, b| (&a.region, &a.name).cmp(&(&b.region, &b.name)));
        self.launch_templates
            .sort_by(|a, b| (&a.region, &a.template_id).cmp(&(&b.region, &b.template_id)));
        self.task_definitions
            .sort_by(|a, b| (&a.region, &a.family).cmp(&(&b.region, &b.family)));
    }

    /// Only what concerns `region` (images are global).
    pub fn in_region(&self, region: &str) -> References {
        References {
            version: self.version.clone(),
            amis: self
                .amis
                .iter()
                .filter(|(r, _)| *r == region)
                .map(|(r, a)| (r.clone(), a.clone()))
                .collect(),
            images: self.images.clone(),
            launch_templates: self
                .launch_templates
                .iter()
                .filter(|l| l.region == region)
                .cloned()
                .collect(),
            task_definitions: self
                .task_definitions
                .iter()
                .filter(|t| t.region == region)
                .cloned()
                .collect(),
            ssm_parameters: self
                .ssm_parameters
                .iter()
                .filter(|p| p.region == region)
                .cloned()
                .collect(),
        }
    }
}

/// One promotion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelEntry {
    pub promoted_at: String,
    pub references: References,
}

/// A channel's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    pub format: String,
    pub recipe: String,
    pub channel: String,
    /// Oldest first; the last entry is current.
    pub history: Vec<ChannelEntry>,
}

impl ChannelState {
    pub fn current(&self) -> Option<&ChannelEntry> {
        self.history.last()
    }

    /// Appends a promotion (unless it is already current) and trims the history.
    pub fn promote(&mut self, references: References, at: String) {
        if self.current().map(|e| &e.references.version) == Some(&references.version) {
            if let Some(last) = self.history.last_mut() {
                last.references = references;
            }
            return;
        }
        self.history.push(ChannelEntry {
            promoted_at: at,
            references,
        });
        let excess = self.history.len().saturating_sub(CHANNEL_HISTORY);
        self.history.drain(..excess);
    }

    /// The entry a rollback returns to.
    pub fn previous(&self) -> Option<&ChannelEntry> {
        self.history.len().checked_sub(2).map(|i| &self.history[i])
    }
}

/// Whether a channel move also moves the machines: instance refreshes after a launch template's
/// default changed and ECS service updates. `bake rollout` moves the pointers with
/// [`Fleet::Leave`] and replaces the machines itself, watching and rolling back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fleet {
    Move,
    Leave,
}

impl<D: DigestCheck> Publisher<'_, D> {
    fn channel_error(&self, channel: &str, problem: impl Into<String>) -> PublishError {
        PublishError::Channel {
            recipe: self.recipe.name.clone(),
            channel: channel.to_owned(),
            problem: problem.into(),
        }
    }

    fn declared(&self, channel: &str) -> Result<(), PublishError> {
        if self.recipe.publish.channels.iter().any(|c| c == channel) {
            Ok(())
        } else {
            Err(self.channel_error(
                channel,
                format!(
                    "is not in publish.channels (declared: {})",
                    if self.recipe.publish.channels.is_empty() {
                        "none".to_owned()
                    } else {
                        self.recipe.publish.channels.join(", ")
                    }
                ),
            ))
        }
    }

    /// Reads a channel's record (an empty history when it was never promoted).
    pub async fn channel_state(&self, channel: &str) -> Result<ChannelState, PublishError> {
        self.declared(channel)?;
        let home = home_region(self.recipe, self.aws)?;
        let ssm = clients::ssm(self.aws, &home);
        let name = channel_parameter(&self.recipe.name, channel);
        let state: Option<ChannelState> = ssm::read_record(&ssm, &name, &home).await?;
        Ok(state.unwrap_or_else(|| ChannelState {
            format: CHANNEL_FORMAT.into(),
            recipe: self.recipe.name.clone(),
            channel: channel.to_owned(),
            history: Vec::new(),
        }))
    }

    async fn write_channel(&self, state: &ChannelState) -> Result<(), PublishError> {
        let home = home_region(self.recipe, self.aws)?;
        let ssm = clients::ssm(self.aws, &home);
        let name = channel_parameter(&self.recipe.name, &state.channel);
        ssm::write_record(&ssm, &name, &home, &self.recipe.name, state).await
    }

    /// The release a version was published as.
    pub async fn release(&self, version: &str) -> Result<References, PublishError> {
        let missing = || PublishError::ReleaseMissing {
            recipe: self.recipe.name.clone(),
            version: version.to_owned(),
        };
        let prefix: VersionPrefix = version.parse().map_err(|_| missing())?;
        let home = home_region(self.recipe, self.aws)?;
        let ssm = clients::ssm(self.aws, &home);
        let name = release_parameter(&self.recipe.name, prefix.short());
        let release: References = ssm::read_record(&ssm, &name, &home)
            .await?
            .ok_or_else(missing)?;
        let published = release.version.parse::<Version>().ok();
        if !published.is_some_and(|published| prefix.matches(&published)) {
            return Err(missing());
        }
        Ok(release)
    }

    /// `bake promote`: moves the channel's pointers to `version`'s release and records it.
    pub async fn promote(
        &self,
        version: &str,
        channel: &str,
    ) -> Result<PublishReport, PublishError> {
        self.promote_with(version, channel, Fleet::Move).await
    }

    /// Promote, moving the machines too or not.
    pub async fn promote_with(
        &self,
        version: &str,
        channel: &str,
        fleet: Fleet,
    ) -> Result<PublishReport, PublishError> {
        let mut state = self.channel_state(channel).await?;
        let release = self.release(version).await?;
        let mut report = self.move_pointers(&release, fleet).await?;
        if !self.options.dry_run && report.exit_status() == crate::exit::ExitStatus::Success {
            state.promote(release, now());
            if let Err(e) = self.write_channel(&state).await {
                report.errors.push(Report::from_error(&e).to_json());
            }
        }
        Ok(report)
    }

    /// `bake rollback`: moves the channel's pointers back to the previous entry.
    pub async fn rollback(&self, channel: &str) -> Result<PublishReport, PublishError> {
        self.rollback_with(channel, Fleet::Move).await
    }

    /// Rollback, moving the machines too or not.
    pub async fn rollback_with(
        &self,
        channel: &str,
        fleet: Fleet,
    ) -> Result<PublishReport, PublishError> {
        let mut state = self.channel_state(channel).await?;
        let previous = state
            .previous()
            .ok_or_else(|| self.channel_error(channel, "has no earlier version to roll back to"))?
            .references
            .clone();
        let mut report = self.move_pointers(&previous, fleet).await?;
        if !self.options.dry_run && report.exit_status() == crate::exit::ExitStatus::Success {
            state.history.pop();
            if let Err(e) = self.write_channel(&state).await {
                report.errors.push(Report::from_error(&e).to_json());
            }
        }
        Ok(report)
    }

    /// Takes `version` off the channel after a failed rollout: a rollback when the channel was
    /// on another version before, else the entry is dropped and the pointers stay (there is
    /// nothing earlier to point them at). `None` when the channel is not on `version`.
    pub async fn retract(
        &self,
        channel: &str,
        version: &str,
    ) -> Result<Option<PublishReport>, PublishError> {
        let mut state = self.channel_state(channel).await?;
        if state.current().map(|e| e.references.version.as_str()) != Some(version) {
            return Ok(None);
        }
        if state.previous().is_some() {
            return self.rollback_with(channel, Fleet::Leave).await.map(Some);
        }
        state.history.pop();
        self.write_channel(&state).await?;
        Ok(Some(PublishReport {
            recipe: self.recipe.name.clone(),
            version: version.to_owned(),
            dry_run: false,
            regions: Vec::new(),
            errors: Vec::new(),
        }))
    }

    /// `bake pin`: the channel's current references (in one region, if asked).
    pub async fn pin(
        &self,
        channel: &str,
        region: Option<&str>,
    ) -> Result<ChannelEntry, PublishError> {
        let state = self.channel_state(channel).await?;
        let current = state
            .current()
            .ok_or_else(|| self.channel_error(channel, "has never been promoted"))?;
        Ok(ChannelEntry {
            promoted_at: current.promoted_at.clone(),
            references: match region {
                Some(region) => current.references.in_region(region),
                None => current.references.clone(),
            },
        })
    }

    /// Checks every artifact of `release`, then moves every pointer of the recipe to it.
    async fn move_pointers(
        &self,
        release: &References,
        fleet: Fleet,
    ) -> Result<PublishReport, PublishError> {
        let home = home_region(self.recipe, self.aws)?;
        let caller = if release.amis.is_empty() {
            String::new()
        } else {
            self.caller_account(&home).await?
        };
        let mut regions: Vec<String> = release
            .amis
            .keys()
            .cloned()
            .chain(release.task_definitions.iter().map(|t| t.region.clone()))
            .collect();
        regions.sort();
        regions.dedup();
        let mut outcomes = Vec::new();
        for region in &regions {
            let mut changes = Vec::new();
            let mut written = Vec::new();
            let outcome = match self
                .move_region(release, region, &caller, fleet, &mut changes, &mut written)
                .await
            {
                Ok(()) => RegionOutcome {
                    region: region.clone(),
                    status: if self.options.dry_run {
                        Status::Planned
                    } else {
                        Status::Done
                    },
                    changes,
                    error: None,
                    references: References {
                        ssm_parameters: written,
                        ..release.in_region(region)
                    },
                },
                Err(e) => {
                    changes.retain(|c| c.result.is_some());
                    RegionOutcome::failed(region, changes, &e)
                }
            };
            outcomes.push(outcome);
        }
        Ok(PublishReport {
            recipe: self.recipe.name.clone(),
            version: release.version.clone(),
            dry_run: self.options.dry_run,
            regions: outcomes,
            errors: Vec::new(),
        })
    }

    async fn move_region(
        &self,
        release: &References,
        region: &str,
        caller: &str,
        fleet: Fleet,
        changes: &mut Vec<Change>,
        written: &mut Vec<SsmParameterRecord>,
    ) -> Result<(), PublishError> {
        let ec2 = self.aws.ec2(region);
        let ssm_client = clients::ssm(self.aws, region);
        let ecs_client = clients::ecs(self.aws, region);
        let recipe = &self.recipe.name;
        let ami = release.amis.get(region);
        let targets = super::RegionTargets::of(self.recipe, region);

        // Check first: nothing moves towards an artifact that cannot be used.
        if let Some(ami) = ami {
            ami::check(&ec2, ami, region, caller, &self.launching_accounts(caller)).await?;
        }
        let tasks: Vec<&TaskDefinitionRecord> = release
            .task_definitions
            .iter()
            .filter(|t| t.region == region)
            .collect();
        for task in &tasks {
            let image = ImageRef::parse(&task.image).ok_or_else(|| PublishError::NoImage {
                version: release.version.clone(),
                repository: task.image.clone(),
            })?;
            check_digest(self.digests, &image).await?;
        }

        // Look at every pointer.
        let mut templates = Vec::new();
        for lt in release
            .launch_templates
            .iter()
            .filter(|l| l.region == region)
        {
            let current = launch_template::default_version(&ec2, &lt.template_id, region).await?;
            templates.push((lt, current));
        }
        let mut parameters = Vec::new();
        if let Some(ami) = ami {
            for target in &targets.parameters {
                let (name, text) = render_parameter(self.recipe, target, &release.version, region)?;
                let state = ssm::look(&ssm_client, &name, region, recipe).await?;
                ssm::may_write(&state, region, recipe, self.options.allow_clobber)?;
                parameters.push((state, text, ami));
            }
        }
        let mut services = Vec::new();
        for target in targets.tasks.iter().filter(|_| fleet == Fleet::Move) {
            if let Some(service) = &target.service
                && let Some(task) = tasks.iter().find(|t| t.family == target.family)
            {
                let current = ecs::service_task_definition(&ecs_client, service, region).await?;
                services.push((service, current, *task));
            }
        }

        // Move them.
        let apply = !self.options.dry_run;
        for (lt, current) in templates {
            let keep = current == lt.version;
            let refresh = targets
                .launch_templates
                .iter()
                .find(|t| match &t.template {
                    crate::recipe::LaunchTemplateRef::Id(id) => *id == lt.template_id,
                    crate::recipe::LaunchTemplateRef::Name(name) => *name == lt.template_name,
                })
                .and_then(|t| t.instance_refresh.as_ref());
            let mut change = Change {
                kind: Kind::LaunchTemplateDefault,
                target: format!("{} ({})", lt.template_name, lt.template_id),
                current: Some(format!("version {current}")),
                wanted: format!("version {}", lt.version),
                action: if keep { Action::Keep } else { Action::Update },
                result: None,
            };
            if apply {
                if !keep {
                    launch_template::set_default(&ec2, &lt.template_id, region, lt.version).await?;
                }
                change.result = Some(format!("version {}", lt.version));
            }
            changes.push(change);
            if !keep
                && fleet == Fleet::Move
                && let Some(refresh) = refresh
            {
                self.refresh(refresh, region, apply, changes).await?;
            }
        }
        for (state, text, ami) in parameters {
            let keep = state.value.as_deref() == Some(ami.as_str());
            let mut change = Change {
                kind: Kind::SsmParameter,
                target: state.name.clone(),
                current: state.value.clone(),
                wanted: ami.clone(),
                action: match (&state.value, keep) {
                    (_, true) => Action::Keep,
                    (None, _) => Action::Create,
                    (Some(_), false) => Action::Update,
                },
                result: None,
            };
            if apply {
                if !keep {
                    let version = ssm::put(
                        &ssm_client,
                        &state,
                        region,
                        recipe,
                        &ssm::Write {
                            value: ami,
                            data_type: Some("aws:ec2:image"),
                            description: text.as_deref(),
                            label: release
                                .version
                                .parse::<Version>()
                                .ok()
                                .map(|v| ssm::version_label(v.short()))
                                .as_deref(),
                        },
                    )
                    .await?;
                    written.push(SsmParameterRecord {
                        region: region.to_owned(),
                        name: state.name.clone(),
                        version: u64::try_from(version).unwrap_or_default(),
                    });
                }
                change.result = Some(ami.clone());
            }
            changes.push(change);
        }
        for (service, current, task) in services {
            let keep = current == task.arn;
            let mut change = Change {
                kind: Kind::EcsService,
                target: format!("{}/{}", service.cluster, service.name),
                current: Some(current),
                wanted: task.arn.clone(),
                action: if keep { Action::Keep } else { Action::Update },
                result: None,
            };
            if apply {
                if !keep {
                    ecs::update_service(&ecs_client, service, region, &task.arn).await?;
                }
                change.result = Some(task.arn.clone());
            }
            changes.push(change);
        }
        Ok(())
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(version: &str, ami: &str) -> References {
        References {
            version: version.into(),
            amis: [("us-east-1".to_owned(), ami.to_owned())].into(),
            ..References::default()
        }
    }

    #[test]
    fn promote_and_rollback_walk_the_history() {
        let mut state = ChannelState {
            format: CHANNEL_FORMAT.into(),
            recipe: "web".into(),
            channel: "prod".into(),
            history: vec![],
        };
        assert!(state.previous().is_none());
        state.promote(refs("v1", "ami-1"), "t1".into());
        state.promote(refs("v1", "ami-1"), "t2".into());
        assert_eq!(
            state.history.len(),
            1,
            "promoting the current version again adds nothing"
        );
        state.promote(refs("v2", "ami-2"), "t3".into());
        assert_eq!(state.previous().unwrap().references.version, "v1");
        for i in 0..20 {
            state.promote(refs(&format!("v{}", i + 3), "ami-3"), "t".into());
        }
        assert_eq!(state.history.len(), CHANNEL_HISTORY);
    }

    #[test]
    fn merge_replaces_per_region_entries() {
        let mut a = References::default();
        a.launch_templates.push(LaunchTemplateRecord {
            region: "r1".into(),
            template_id: "lt-1".into(),
            template_name: "web".into(),
            version: 2,
        });
        let mut b = a.clone();
        b.launch_templates[0].version = 3;
        b.launch_templates.push(LaunchTemplateRecord {
            region: "r2".into(),
            template_id: "lt-2".into(),
            template_name: "web".into(),
            version: 1,
        });
        a.merge(&b);
        assert_eq!(a.launch_templates.len(), 2);
        assert_eq!(a.launch_templates[0].version, 3);
        assert_eq!(a.in_region("r2").launch_templates.len(), 1);
    }
}
