//! Publishing: put a built version where Auto Scaling Groups and Fargate services consume it,
//! safely and idempotently.
//!
//! ```text
//!  PublishInputs ──► per region: look ──► check ──► plan ──► apply ──► release record
//!  (AMI per region,   (template,    (AMI available   (current   (new LT     (SSM, home
//!   image digests)     parameter,    and launchable,  vs wanted) version,    region)
//!                      family)       digest exists)              parameter,
//!                                                                 revision)
//! ```
//!
//! Every region is looked at and checked before anything in it changes, so a refusal changes
//! nothing there; one region failing does not stop the others ([`PublishReport::exit_status`]
//! is then the partial-publish code). What a run makes is found again by the next one (a
//! launch template version by its description and AMI, a task definition revision by its
//! image, a parameter by its value), so re-runs converge and a second run creates nothing.
//!
//! The references a version was published as are kept in AWS, in an SSM parameter of the
//! recipe's home region (see [`channel`]), so promote, rollback and pin need no local store.

pub mod ami;
pub mod channel;
pub mod clients;
pub mod digest;
pub mod ecs;
pub mod error;
mod human;
pub mod inputs;
pub mod launch_template;
pub mod refresh;
pub mod ssm;

use std::collections::BTreeSet;

use futures_util::StreamExt;
use serde::Serialize;

pub use channel::References;
pub use digest::{DigestCheck, RegistryDigestCheck};
pub use error::PublishError;
pub use inputs::{ImageRef, PublishInputs};

use crate::aws::Aws;
use crate::diagnostic::{JsonReport, Report};
use crate::exit::ExitStatus;
use crate::recipe::template::{Context, Renderer, Secrets};
use crate::recipe::{EcsTarget, LaunchTemplateTarget, Recipe, SsmTarget};

/// Regions published at the same time: enough to overlap AWS latency, few enough to stay far
/// from per-account API rate limits.
const REGION_CONCURRENCY: usize = 4;

/// What the caller asked for.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishOptions {
    /// Look and show, change nothing.
    pub dry_run: bool,
    /// Make the new launch template versions the default (also per target in the recipe).
    pub set_default: bool,
    /// Overwrite SSM parameters bake does not own.
    pub allow_clobber: bool,
}

/// The pointer or artifact a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    LaunchTemplateVersion,
    LaunchTemplateDefault,
    SsmParameter,
    TaskDefinition,
    EcsService,
    InstanceRefresh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Make something new.
    Create,
    /// Move an existing pointer.
    Update,
    /// Already as wanted.
    Keep,
}

/// One pointer's current and wanted value, and (after applying) what it became.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub kind: Kind,
    pub target: String,
    pub current: Option<String>,
    pub wanted: String,
    pub action: Action,
    /// After applying: the id made or moved to (version number, parameter version, ARN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Dry run: looked and checked, nothing changed.
    Planned,
    /// Every change applied (or nothing needed changing).
    Done,
    /// Refused or failed; `changes` lists what was applied before the failure, if anything.
    Failed,
}

/// How one region went.
#[derive(Debug, Serialize)]
pub struct RegionOutcome {
    pub region: String,
    pub status: Status,
    pub changes: Vec<Change>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JsonReport>,
    /// The references this region now has (for the release record).
    #[serde(skip)]
    pub references: References,
}

impl RegionOutcome {
    fn failed(region: &str, changes: Vec<Change>, error: &PublishError) -> Self {
        RegionOutcome {
            region: region.to_owned(),
            status: Status::Failed,
            changes,
            error: Some(Report::from_error(error).with_hint(error.hint()).to_json()),
            references: References::default(),
        }
    }
}

/// The result of a publish, promote or rollback.
#[derive(Debug, Serialize)]
pub struct PublishReport {
    pub recipe: String,
    pub version: String,
    pub dry_run: bool,
    pub regions: Vec<RegionOutcome>,
    /// Errors outside any one region (the release record, the channel).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<JsonReport>,
}

impl PublishReport {
    /// What the regions that are done now hold for this version (new launch template versions,
    /// SSM parameter versions, task definition revisions), as entries of the version's
    /// manifest, stamped `at` by `by`. Nothing for a dry run.
    pub fn publications(
        &self,
        at: &str,
        by: &str,
    ) -> Vec<crate::provenance::manifest::Publication> {
        use crate::provenance::manifest::Publication;
        let mut out = Vec::new();
        if self.dry_run {
            return out;
        }
        for outcome in self.regions.iter().filter(|r| r.status == Status::Done) {
            let references = &outcome.references;
            for lt in &references.launch_templates {
                out.push(Publication::LaunchTemplate {
                    region: lt.region.clone(),
                    id: lt.template_id.clone(),
                    version: u64::try_from(lt.version).unwrap_or_default(),
                    at: at.to_owned(),
                    by: by.to_owned(),
                });
            }
            for parameter in &references.ssm_parameters {
                out.push(Publication::SsmParameter {
                    region: parameter.region.clone(),
                    name: parameter.name.clone(),
                    version: parameter.version,
                    at: at.to_owned(),
                    by: by.to_owned(),
                });
            }
            for task in &references.task_definitions {
                out.push(Publication::EcsTaskDefinition {
                    arn: task.arn.clone(),
                    at: at.to_owned(),
                    by: by.to_owned(),
                });
            }
        }
        out
    }

    /// Success when every region is done, the partial-publish code when some are, else
    /// a recipe error for refusals and an infrastructure error otherwise.
    pub fn exit_status(&self) -> ExitStatus {
        let failed = self
            .regions
            .iter()
            .filter(|r| r.status == Status::Failed)
            .count();
        if failed == 0 && self.errors.is_empty() {
            ExitStatus::Success
        } else if failed < self.regions.len() {
            ExitStatus::PartialPublish
        } else {
            ExitStatus::Infrastructure
        }
    }
}

/// Everything publishing needs, handed in (no clients are made deep inside).
pub struct Publisher<'a, D: DigestCheck> {
    pub aws: &'a Aws,
    pub digests: &'a D,
    pub recipe: &'a Recipe,
    pub options: PublishOptions,
}

/// The regions the recipe's AMI goes to.
fn ami_regions(recipe: &Recipe) -> Vec<String> {
    recipe
        .outputs
        .ami
        .as_ref()
        .map(|a| a.regions.clone())
        .unwrap_or_default()
}

fn in_region(regions: &Option<Vec<String>>, all: &[String], region: &str) -> bool {
    regions
        .as_deref()
        .unwrap_or(all)
        .iter()
        .any(|r| r == region)
}

/// The region that keeps a recipe's releases and channels: the first AMI region, else the
/// first task definition's region, else the default region.
pub fn home_region(recipe: &Recipe, aws: &Aws) -> Result<String, PublishError> {
    ami_regions(recipe)
        .first()
        .cloned()
        .or_else(|| {
            recipe
                .publish
                .ecs_task_definitions
                .first()
                .map(|t| t.region.clone())
        })
        .or_else(|| aws.default_region().map(str::to_owned))
        .ok_or_else(|| PublishError::NoHomeRegion {
            recipe: recipe.name.clone(),
        })
}

/// The recipe's targets in one region.
struct RegionTargets<'r> {
    launch_templates: Vec<&'r LaunchTemplateTarget>,
    parameters: Vec<&'r SsmTarget>,
    tasks: Vec<&'r EcsTarget>,
}

impl<'r> RegionTargets<'r> {
    fn of(recipe: &'r Recipe, region: &str) -> Self {
        let all = ami_regions(recipe);
        let publish = &recipe.publish;
        RegionTargets {
            launch_templates: publish
                .launch_templates
                .iter()
                .filter(|t| in_region(&t.regions, &all, region))
                .collect(),
            parameters: publish
                .ssm_parameters
                .iter()
                .filter(|t| in_region(&t.regions, &all, region))
                .collect(),
            tasks: publish
                .ecs_task_definitions
                .iter()
                .filter(|t| t.region == region)
                .collect(),
        }
    }

    fn needs_ami(&self) -> bool {
        !self.launch_templates.is_empty() || !self.parameters.is_empty()
    }
}

/// Every region some target of the recipe publishes to.
pub fn target_regions(recipe: &Recipe) -> Vec<String> {
    let all = ami_regions(recipe);
    let publish = &recipe.publish;
    let mut regions = BTreeSet::new();
    for t in &publish.launch_templates {
        regions.extend(t.regions.clone().unwrap_or_else(|| all.clone()));
    }
    for t in &publish.ssm_parameters {
        regions.extend(t.regions.clone().unwrap_or_else(|| all.clone()));
    }
    regions.extend(
        publish
            .ecs_task_definitions
            .iter()
            .map(|t| t.region.clone()),
    );
    regions.into_iter().collect()
}

/// Renders an SSM parameter target's name (and description) for a region and version.
pub fn render_parameter(
    recipe: &Recipe,
    target: &SsmTarget,
    version: &str,
    region: &str,
) -> Result<(String, Option<String>), PublishError> {
    let renderer = Renderer::default();
    let context = Context::new(recipe, Some(version), Some(region), Secrets::Reveal);
    let render = |template, field: &str| {
        renderer
            .render(template, &context)
            .map_err(|e| PublishError::Render {
                field: field.to_owned(),
                source: Box::new(e),
            })
    };
    let name = render(&target.name, "publish.ssm_parameters[].name")?;
    let description = target
        .description
        .as_ref()
        .map(|d| render(d, "publish.ssm_parameters[].description"))
        .transpose()?;
    Ok((name, description))
}

/// The pushed image a task definition target pins.
fn image_for<'i>(
    inputs: &'i PublishInputs,
    target: &EcsTarget,
) -> Result<&'i ImageRef, PublishError> {
    inputs
        .images
        .iter()
        .find(|i| {
            i.repository == target.repository
                || i.repository.ends_with(&format!("/{}", target.repository))
        })
        .ok_or_else(|| PublishError::NoImage {
            version: inputs.version.clone(),
            repository: target.repository.clone(),
        })
}

impl<D: DigestCheck> Publisher<'_, D> {
    /// The account that publishes (and so launches from its templates).
    pub async fn caller_account(&self, region: &str) -> Result<String, PublishError> {
        let out = clients::sts(self.aws, region)
            .get_caller_identity()
            .send()
            .await
            .map_err(error::aws("GetCallerIdentity", region))?;
        Ok(out.account().unwrap_or_default().to_owned())
    }

    /// Every account that must be able to launch the AMI: the publisher's and the recipe's
    /// sharing accounts.
    pub fn launching_accounts(&self, caller: &str) -> Vec<String> {
        let mut accounts = vec![caller.to_owned()];
        if let Some(ami) = &self.recipe.outputs.ami {
            for account in &ami.share_accounts {
                if !accounts.contains(account) {
                    accounts.push(account.clone());
                }
            }
        }
        accounts
    }

    /// Publishes `inputs` to every target of the recipe, region by region.
    pub async fn publish(&self, inputs: &PublishInputs) -> PublishReport {
        let regions = target_regions(self.recipe);
        let mut report = PublishReport {
            recipe: self.recipe.name.clone(),
            version: inputs.version.clone(),
            dry_run: self.options.dry_run,
            regions: Vec::new(),
            errors: Vec::new(),
        };
        let home = match home_region(self.recipe, self.aws) {
            Ok(home) => home,
            Err(e) => {
                report.errors.push(Report::from_error(&e).to_json());
                return report;
            }
        };
        // Only AMIs need the account (to check who may launch them).
        let needs_account = !self.recipe.publish.launch_templates.is_empty()
            || !self.recipe.publish.ssm_parameters.is_empty();
        let caller = if needs_account {
            match self.caller_account(&home).await {
                Ok(caller) => caller,
                Err(e) => {
                    report.errors.push(Report::from_error(&e).to_json());
                    return report;
                }
            }
        } else {
            String::new()
        };
        let mut outcomes: Vec<RegionOutcome> = futures_util::stream::iter(regions.iter())
            .map(|region| self.publish_region(inputs, region, &caller))
            .buffer_unordered(REGION_CONCURRENCY)
            .collect()
            .await;
        outcomes.sort_by(|a, b| a.region.cmp(&b.region));
        report.regions = outcomes;
        if !self.options.dry_run
            && report.regions.iter().any(|r| r.status == Status::Done)
            && let Err(e) = self.record_release(inputs, &home, &report).await
        {
            report
                .errors
                .push(Report::from_error(&e).with_hint(e.hint()).to_json());
        }
        report
    }

    async fn record_release(
        &self,
        inputs: &PublishInputs,
        home: &str,
        report: &PublishReport,
    ) -> Result<(), PublishError> {
        let ssm = clients::ssm(self.aws, home);
        let name = channel::release_parameter(&self.recipe.name, inputs.version_short());
        let mut release: References = ssm::read_record(&ssm, &name, home)
            .await?
            .unwrap_or_default();
        release.version = inputs.version.clone();
        release.amis.extend(inputs.amis.clone());
        for image in &inputs.images {
            let reference = image.reference();
            if !release.images.contains(&reference) {
                release.images.push(reference);
            }
        }
        for outcome in report.regions.iter().filter(|r| r.status == Status::Done) {
            release.merge(&outcome.references);
        }
        ssm::write_record(&ssm, &name, home, &self.recipe.name, &release).await
    }

    async fn publish_region(
        &self,
        inputs: &PublishInputs,
        region: &str,
        caller: &str,
    ) -> RegionOutcome {
        let mut changes = Vec::new();
        let mut references = References::default();
        match self
            .publish_region_inner(inputs, region, caller, &mut changes, &mut references)
            .await
        {
            Ok(()) => RegionOutcome {
                region: region.to_owned(),
                status: if self.options.dry_run {
                    Status::Planned
                } else {
                    Status::Done
                },
                changes,
                error: None,
                references,
            },
            Err(e) => {
                // Only what was applied stays listed.
                changes.retain(|c| c.result.is_some());
                RegionOutcome::failed(region, changes, &e)
            }
        }
    }

    async fn publish_region_inner(
        &self,
        inputs: &PublishInputs,
        region: &str,
        caller: &str,
        changes: &mut Vec<Change>,
        references: &mut References,
    ) -> Result<(), PublishError> {
        let targets = RegionTargets::of(self.recipe, region);
        let recipe = &self.recipe.name;
        // Pointers move at publish time unless channels move them.
        let move_pointers = self.recipe.publish.channels.is_empty();
        let ec2 = self.aws.ec2(region);
        let ssm_client = clients::ssm(self.aws, region);
        let ecs_client = clients::ecs(self.aws, region);

        // 1. Check the artifacts.
        let ami = if targets.needs_ami() {
            let ami = inputs.amis.get(region).ok_or_else(|| PublishError::NoAmi {
                version: inputs.version.clone(),
                region: region.to_owned(),
            })?;
            ami::check(&ec2, ami, region, caller, &self.launching_accounts(caller)).await?;
            references.amis.insert(region.to_owned(), ami.clone());
            Some(ami.as_str())
        } else {
            None
        };
        let mut images = Vec::new();
        for target in &targets.tasks {
            let image = image_for(inputs, target)?;
            check_digest(self.digests, image).await?;
            images.push(image.reference());
        }

        // 2. Look at every target before changing any.
        let description = launch_template::description(recipe, &inputs.version);
        let mut templates = Vec::new();
        for target in &targets.launch_templates {
            let ami = ami.expect("launch templates need an AMI");
            let state = launch_template::look(&ec2, target, region, ami, &description).await?;
            templates.push((*target, state));
        }
        let mut parameters = Vec::new();
        if move_pointers {
            for target in &targets.parameters {
                let (name, text) = render_parameter(self.recipe, target, &inputs.version, region)?;
                let state = ssm::look(&ssm_client, &name, region, recipe).await?;
                ssm::may_write(&state, region, recipe, self.options.allow_clobber)?;
                parameters.push((state, text));
            }
        }
        let mut families = Vec::new();
        for (target, image) in targets.tasks.iter().zip(&images) {
            let state = ecs::look(
                &ecs_client,
                &target.family,
                &target.container,
                region,
                image,
                target.template.as_deref(),
            )
            .await?;
            let service = match (&target.service, move_pointers) {
                (Some(service), true) => Some((
                    service,
                    ecs::service_task_definition(&ecs_client, service, region).await?,
                )),
                _ => None,
            };
            families.push((*target, state, image, service));
        }

        // 3. Plan, then apply unless this is a dry run.
        let apply = !self.options.dry_run;
        for (target, state) in &templates {
            let ami = ami.expect("launch templates need an AMI");
            let shown = format!("{} ({})", state.name, state.id);
            let mut change = Change {
                kind: Kind::LaunchTemplateVersion,
                target: shown.clone(),
                current: state.existing.map(|v| format!("version {v}")),
                wanted: format!("{ami} from version {}", state.source_version),
                action: if state.existing.is_some() {
                    Action::Keep
                } else {
                    Action::Create
                },
                result: None,
            };
            let number = match state.existing {
                Some(v) => Some(v),
                None if apply => Some(
                    launch_template::create_version(&ec2, state, target, region, ami, &description)
                        .await?,
                ),
                None => None,
            };
            change.result = number.filter(|_| apply).map(|v| format!("version {v}"));
            changes.push(change);
            if self.options.set_default || target.set_default {
                let wanted = number
                    .map(|v| format!("version {v}"))
                    .unwrap_or_else(|| "the new version".into());
                let keep = number == Some(state.default_version);
                let mut change = Change {
                    kind: Kind::LaunchTemplateDefault,
                    target: shown.clone(),
                    current: Some(format!(
                        "version {} ({})",
                        state.default_version,
                        state.default_ami.as_deref().unwrap_or("no AMI")
                    )),
                    wanted,
                    action: if keep { Action::Keep } else { Action::Update },
                    result: None,
                };
                if apply && let Some(v) = number {
                    if !keep {
                        launch_template::set_default(&ec2, &state.id, region, v).await?;
                    }
                    change.result = Some(format!("version {v}"));
                }
                changes.push(change);
                if !keep && let Some(refresh) = &target.instance_refresh {
                    self.refresh(refresh, region, apply, changes).await?;
                }
            }
            if let Some(v) = number {
                references
                    .launch_templates
                    .push(channel::LaunchTemplateRecord {
                        region: region.to_owned(),
                        template_id: state.id.clone(),
                        template_name: state.name.clone(),
                        version: v,
                    });
            }
        }
        for (state, text) in &parameters {
            let ami = ami.expect("parameters need an AMI");
            let keep = state.value.as_deref() == Some(ami);
            let mut change = Change {
                kind: Kind::SsmParameter,
                target: state.name.clone(),
                current: state.value.clone(),
                wanted: ami.to_owned(),
                action: match (&state.value, keep) {
                    (_, true) => Action::Keep,
                    (None, _) => Action::Create,
                    (Some(_), false) => Action::Update,
                },
                result: None,
            };
            if apply {
                change.result = Some(if keep {
                    ami.to_owned()
                } else {
                    let version = ssm::put(
                        &ssm_client,
                        state,
                        region,
                        recipe,
                        &ssm::Write {
                            value: ami,
                            data_type: Some("aws:ec2:image"),
                            description: text.as_deref(),
                            label: Some(&ssm::version_label(inputs.version_short())),
                        },
                    )
                    .await?;
                    references.ssm_parameters.push(channel::SsmParameterRecord {
                        region: region.to_owned(),
                        name: state.name.clone(),
                        version: u64::try_from(version).unwrap_or_default(),
                    });
                    format!("{ami} (parameter version {version})")
                });
            }
            changes.push(change);
        }
        for (target, state, image, service) in &families {
            let shown = format!("{} container {}", target.family, target.container);
            let mut change = Change {
                kind: Kind::TaskDefinition,
                target: shown,
                current: state.current_image.clone(),
                wanted: (*image).clone(),
                action: if state.existing.is_some() {
                    Action::Keep
                } else {
                    Action::Create
                },
                result: None,
            };
            let arn = match &state.existing {
                Some(arn) => Some(arn.clone()),
                None if apply => Some(
                    ecs::register(
                        &ecs_client,
                        state,
                        &target.container,
                        region,
                        image,
                        &inputs.version,
                    )
                    .await?,
                ),
                None => None,
            };
            change.result = arn.clone().filter(|_| apply);
            changes.push(change);
            if let Some((service, current)) = service {
                let keep = arn.as_deref() == Some(current.as_str());
                let mut change = Change {
                    kind: Kind::EcsService,
                    target: format!("{}/{}", service.cluster, service.name),
                    current: Some(current.clone()),
                    wanted: arn.clone().unwrap_or_else(|| "the new revision".into()),
                    action: if keep { Action::Keep } else { Action::Update },
                    result: None,
                };
                if apply && let Some(arn) = &arn {
                    if !keep {
                        ecs::update_service(&ecs_client, service, region, arn).await?;
                    }
                    change.result = Some(arn.clone());
                }
                changes.push(change);
            }
            if let Some(arn) = arn {
                references
                    .task_definitions
                    .push(channel::TaskDefinitionRecord {
                        region: region.to_owned(),
                        family: target.family.clone(),
                        container: target.container.clone(),
                        arn,
                        image: (*image).clone(),
                    });
            }
        }
        Ok(())
    }
}

impl<D: DigestCheck> Publisher<'_, D> {
    /// Starts (or, in a dry run, plans) an instance refresh after a default-version change.
    pub(crate) async fn refresh(
        &self,
        refresh: &crate::recipe::InstanceRefresh,
        region: &str,
        apply: bool,
        changes: &mut Vec<Change>,
    ) -> Result<(), PublishError> {
        let mut change = Change {
            kind: Kind::InstanceRefresh,
            target: refresh.auto_scaling_group.clone(),
            current: None,
            wanted: format!(
                "refresh (min healthy {}%, skip matching {})",
                refresh
                    .min_healthy_percentage
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "default".into()),
                refresh.skip_matching
            ),
            action: Action::Create,
            result: None,
        };
        if apply {
            let client = clients::autoscaling(self.aws, region);
            change.result = Some(refresh::start(&client, refresh, region).await?);
        }
        changes.push(change);
        Ok(())
    }
}

/// Fails unless the image's digest is in its registry.
pub(crate) async fn check_digest<D: DigestCheck>(
    digests: &D,
    image: &ImageRef,
) -> Result<(), PublishError> {
    match digests.exists(image).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(PublishError::DigestMissing {
            reference: image.reference(),
        }),
        Err(source) => Err(PublishError::DigestCheck {
            reference: image.reference(),
            source: Box::new(source),
        }),
    }
}
