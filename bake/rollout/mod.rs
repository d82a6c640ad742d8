//! Rollouts: move a channel to a published version and replace the machines that run it, with
//! a way back.
//!
//! ```text
//!  look ──► pin groups ──► promote ──► start ──► watch ──┬─► all succeeded: done
//!  (groups,  (label →      (pointers,   (refresh   (poll,  │
//!   services, number)       channel)     to LT N,   alarms,└─► a failure, the timeout or
//!   alarms)                              deploy     progress)   Ctrl-C (cancel): undo every
//!                                        revision)              target, confirm, move the
//!                                                               channel back, exit non-zero
//! ```
//!
//! Every instance refresh goes to the release's *numbered* launch template version with
//! `AutoRollback` and the recipe's alarms, so AWS itself rolls back on an alarm; every ECS
//! deployment has the circuit breaker and the alarms set to roll back. bake watches until each
//! target ends, and when one fails it undoes the others too (a channel is one version on every
//! target), waits until AWS confirms each is back, and only then moves the channel back.

pub mod asg;
pub mod ecs;

use std::future::Future;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::diagnostic::{JsonReport, Report};
use crate::publish::channel::{Fleet, References};
use crate::publish::{DigestCheck, PublishError, Publisher, clients};
use crate::recipe::Rollout;

use asg::GroupTarget;
use ecs::ServiceTarget;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("channel `{channel}` of recipe `{recipe}` has no rollout settings")]
    NoSettings { recipe: String, channel: String },
    #[error(
        "the rollout of channel `{channel}` has no Auto Scaling group or ECS service to replace"
    )]
    NoTargets { channel: String },
    #[error("Auto Scaling group `{group}` does not exist in {region}")]
    GroupMissing { group: String, region: String },
    #[error("Auto Scaling group `{group}` in {region} {problem}")]
    GroupTemplate {
        group: String,
        region: String,
        problem: String,
    },
    #[error("version {version} has no task definition revision of family `{family}` in {region}")]
    NoRevision {
        family: String,
        region: String,
        version: String,
    },
    #[error("moving channel `{channel}` to version {version} failed: {problem}")]
    Promote {
        channel: String,
        version: String,
        problem: String,
    },
    #[error("unexpected answer about {what}: {problem}")]
    Answer { what: String, problem: String },
    #[error(transparent)]
    Publish(#[from] PublishError),
}

impl RolloutError {
    pub fn hint(&self) -> Option<String> {
        match self {
            RolloutError::NoSettings { channel, .. } => Some(format!(
                "add `publish.rollouts.{channel}` to the recipe (strategy, alarms, groups, services)"
            )),
            RolloutError::NoTargets { .. } => Some(
                "name `auto_scaling_groups` or `ecs_services` in the channel's rollout settings, or give publish.launch_templates[].instance_refresh / publish.ecs_task_definitions[].service".into(),
            ),
            RolloutError::Publish(e) => e.hint(),
            _ => None,
        }
    }

    /// Whether retrying cannot help until the recipe or the account change.
    pub fn is_refusal(&self) -> bool {
        match self {
            RolloutError::Publish(e) => e.is_refusal(),
            RolloutError::Answer { .. } | RolloutError::Promote { .. } => false,
            _ => true,
        }
    }
}

/// What Ctrl-C does to a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum OnInterrupt {
    /// Stop it and undo it: roll every target back and move the channel back.
    Cancel,
    /// Stop watching: AWS carries on, the channel stays on the new version.
    Leave,
}

/// Where one target is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase", content = "reason")]
pub enum Phase {
    Running,
    Succeeded,
    /// Ended without reaching the version, and not (yet) rolled back.
    Failed(String),
    RollingBack(String),
    RolledBack(String),
    RollbackFailed(String),
}

impl Phase {
    fn ended(&self) -> bool {
        !matches!(self, Phase::Running | Phase::RollingBack(_))
    }
}

/// One look at one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetProgress {
    /// `group NAME (REGION)` or `service CLUSTER/NAME (REGION)`.
    pub target: String,
    /// AWS's status word (`InProgress`, `RollbackSuccessful`, `IN_PROGRESS`, …).
    pub status: String,
    pub percentage: Option<u8>,
    /// Instances left to update, or tasks running.
    pub detail: Option<String>,
    /// AWS's reason (checkpoint reached, alarm, circuit breaker).
    pub reason: Option<String>,
    #[serde(flatten)]
    pub phase: Phase,
}

/// How a library reports progress; the CLI draws it (bars on a terminal, lines elsewhere).
pub trait Reporter: Send + Sync {
    /// A target's latest state (called on every poll; draw only what changed).
    fn progress(&self, progress: &TargetProgress);
    /// Something happened to the rollout as a whole.
    fn note(&self, text: &str);
}

/// How the rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every target runs the version; the channel is on it.
    Succeeded,
    /// A target failed (or the timeout passed); every target is back and the channel too.
    RolledBack,
    /// As `RolledBack`, but some target could not be confirmed back: see its phase.
    RollbackIncomplete,
    /// Ctrl-C with `cancel`: undone like a failure.
    Cancelled,
    /// Ctrl-C with `leave`: AWS carries on, bake stopped watching.
    Left,
}

/// One target at the end.
#[derive(Debug, Clone, Serialize)]
pub struct TargetOutcome {
    pub target: String,
    /// Instance refresh id (groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_id: Option<String>,
    /// Launch template version or task definition before and after.
    pub from: String,
    pub to: String,
    #[serde(flatten)]
    pub phase: Phase,
}

/// The result of `bake rollout`.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutReport {
    pub recipe: String,
    pub channel: String,
    pub version: String,
    pub started_at: String,
    pub ended_at: String,
    pub outcome: Outcome,
    /// Why it did not succeed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub targets: Vec<TargetOutcome>,
    /// The channel was moved back to where it was.
    pub channel_moved_back: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<JsonReport>,
}

/// What the caller chose (what Ctrl-C does comes with the interrupt itself, see
/// [`Rollouts::run`]).
#[derive(Debug, Clone, Copy)]
pub struct RolloutOptions {
    pub poll_interval: Duration,
}

enum Target {
    Group(GroupTarget),
    Service(ServiceTarget),
}

impl Target {
    fn shown(&self) -> String {
        match self {
            Target::Group(g) => g.shown(),
            Target::Service(s) => s.shown(),
        }
    }
}

/// A target and how it is doing.
struct Tracked {
    target: Target,
    phase: Phase,
    /// bake is moving it back itself (a new refresh or deployment to the old version).
    undoing: bool,
    last: Option<TargetProgress>,
}

/// Everything a rollout needs, handed in.
pub struct Rollouts<'a, 'p, D: DigestCheck> {
    pub publisher: &'a Publisher<'p, D>,
    pub reporter: &'a dyn Reporter,
    pub options: RolloutOptions,
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl<D: DigestCheck> Rollouts<'_, '_, D> {
    fn aws(&self) -> &crate::aws::Aws {
        self.publisher.aws
    }

    /// The channel's rollout settings.
    pub fn settings(&self, channel: &str) -> Result<&Rollout, RolloutError> {
        self.publisher
            .recipe
            .publish
            .rollouts
            .get(channel)
            .ok_or_else(|| RolloutError::NoSettings {
                recipe: self.publisher.recipe.name.clone(),
                channel: channel.to_owned(),
            })
    }

    /// Every group and service the rollout replaces, as they are now.
    async fn look(
        &self,
        rollout: &Rollout,
        channel: &str,
        release: &References,
    ) -> Result<Vec<Target>, RolloutError> {
        let mut targets = Vec::new();
        let mut release_regions: Vec<&str> = release
            .launch_templates
            .iter()
            .map(|l| l.region.as_str())
            .collect();
        release_regions.sort_unstable();
        release_regions.dedup();
        for group in &rollout.auto_scaling_groups {
            let regions: Vec<&str> = match &group.regions {
                Some(regions) => regions.iter().map(String::as_str).collect(),
                None => release_regions.clone(),
            };
            for region in regions {
                let autoscaling = clients::autoscaling(self.aws(), region);
                let ec2 = self.aws().ec2(region);
                let target = asg::look(&autoscaling, &ec2, &group.name, region, release).await?;
                targets.push(Target::Group(target));
            }
        }
        for service in &rollout.ecs_services {
            let client = clients::ecs(self.aws(), &service.region);
            targets.push(Target::Service(ecs::look(&client, service, release).await?));
        }
        if targets.is_empty() {
            return Err(RolloutError::NoTargets {
                channel: channel.to_owned(),
            });
        }
        Ok(targets)
    }

    /// `bake rollout`: moves `channel` to `version` and replaces the machines, waiting until
    /// every target ends; undoes everything on a failure, the timeout or an interrupt (with
    /// [`OnInterrupt::Cancel`]). `interrupt` resolves when the user asks to stop.
    pub async fn run(
        &self,
        version: &str,
        channel: &str,
        interrupt: impl Future<Output = OnInterrupt>,
    ) -> Result<RolloutReport, RolloutError> {
        let rollout = self.settings(channel)?;
        let publisher = self.publisher;
        publisher.channel_state(channel).await?;
        let release = publisher.release(version).await?;
        let targets = self.look(rollout, channel, &release).await?;
        let started_at = now();

        // So that AWS can roll back: groups that follow a label get its number.
        for target in &targets {
            if let Target::Group(group) = target
                && let Some(label) = &group.pin
            {
                self.reporter.note(&format!(
                    "{} follows launch template version {label}: pinning it to version {} (what {label} is now) so that AWS can roll it back",
                    group.shown(),
                    group.from_version
                ));
                asg::pin(&clients::autoscaling(self.aws(), &group.region), group).await?;
            }
        }

        let moved = publisher
            .promote_with(&release.version, channel, Fleet::Leave)
            .await?;
        if moved.exit_status() != crate::exit::ExitStatus::Success {
            let problem = moved
                .regions
                .iter()
                .filter_map(|r| {
                    r.error
                        .as_ref()
                        .map(|e| format!("{}: {}", r.region, e.message))
                })
                .chain(moved.errors.iter().map(|e| e.message.clone()))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(RolloutError::Promote {
                channel: channel.to_owned(),
                version: release.version.clone(),
                problem,
            });
        }
        self.reporter.note(&format!(
            "channel {channel} moved to {}; replacing {} target(s)",
            release.version,
            targets.len()
        ));

        let mut tracked: Vec<Tracked> = targets
            .into_iter()
            .map(|target| Tracked {
                target,
                phase: Phase::Running,
                undoing: false,
                last: None,
            })
            .collect();
        let mut errors = Vec::new();
        let mut failure: Option<String> = None;
        for t in &mut tracked {
            if let Err(e) = self.start(rollout, t).await {
                failure.get_or_insert_with(|| format!("{}: {}", t.target.shown(), e));
                t.phase = Phase::Failed(crate::diagnostic::error_chain(&e));
                errors.push(Report::from_error(&e).to_json());
                break;
            }
        }

        let deadline = Instant::now() + rollout.timeout;
        let mut outcome = Outcome::Succeeded;
        let mut interrupt = std::pin::pin!(interrupt);
        if failure.is_none() {
            loop {
                if let Some(why) = self.poll(&mut tracked).await {
                    failure = Some(why);
                    break;
                }
                if tracked.iter().all(|t| t.phase == Phase::Succeeded) {
                    break;
                }
                if Instant::now() >= deadline {
                    failure = Some(format!(
                        "the rollout did not finish within its timeout of {}",
                        humantime::format_duration(rollout.timeout)
                    ));
                    break;
                }
                tokio::select! {
                    choice = &mut interrupt => {
                        match choice {
                            OnInterrupt::Leave => {
                                self.reporter.note("interrupted: leaving the rollout to AWS; the channel stays on the new version");
                                outcome = Outcome::Left;
                            }
                            OnInterrupt::Cancel => {
                                self.reporter.note("interrupted: cancelling the rollout and rolling every target back");
                                outcome = Outcome::Cancelled;
                                failure = Some("interrupted (Ctrl-C), cancelled".into());
                            }
                        }
                        break;
                    }
                    () = tokio::time::sleep(self.options.poll_interval) => {}
                }
            }
        }

        let mut channel_moved_back = false;
        if outcome != Outcome::Left
            && let Some(why) = &failure
        {
            if outcome == Outcome::Succeeded {
                outcome = Outcome::RolledBack;
            }
            self.reporter.note(&format!("rolling back: {why}"));
            let complete = self.undo(rollout, &mut tracked, &mut errors).await;
            if !complete && outcome == Outcome::RolledBack {
                outcome = Outcome::RollbackIncomplete;
            }
            match publisher.retract(channel, &release.version).await {
                Ok(Some(report)) if report.exit_status() == crate::exit::ExitStatus::Success => {
                    channel_moved_back = true;
                    self.reporter.note(&format!("channel {channel} moved back"));
                }
                Ok(Some(report)) => errors.extend(
                    report
                        .regions
                        .iter()
                        .filter_map(|r| r.error.clone())
                        .chain(report.errors.iter().cloned()),
                ),
                Ok(None) => {}
                Err(e) => errors.push(Report::from_error(&e).with_hint(e.hint()).to_json()),
            }
        }

        Ok(RolloutReport {
            recipe: publisher.recipe.name.clone(),
            channel: channel.to_owned(),
            version: release.version.clone(),
            started_at,
            ended_at: now(),
            outcome,
            reason: failure,
            targets: tracked
                .iter()
                .map(|t| match &t.target {
                    Target::Group(g) => TargetOutcome {
                        target: g.shown(),
                        refresh_id: g.refresh_id.clone(),
                        from: format!("{} version {}", g.template_id, g.from_version),
                        to: format!("{} version {}", g.template_id, g.to_version),
                        phase: t.phase.clone(),
                    },
                    Target::Service(s) => TargetOutcome {
                        target: s.shown(),
                        refresh_id: None,
                        from: s.from_arn.clone(),
                        to: s.to_arn.clone(),
                        phase: t.phase.clone(),
                    },
                })
                .collect(),
            channel_moved_back,
            errors,
        })
    }

    /// Starts a target's refresh or deployment towards the release.
    async fn start(&self, rollout: &Rollout, t: &mut Tracked) -> Result<(), RolloutError> {
        match &mut t.target {
            Target::Group(group) => {
                let client = clients::autoscaling(self.aws(), &group.region);
                let id =
                    asg::start(&client, group, group.to_version, asg::preferences(rollout)).await?;
                self.reporter.note(&format!(
                    "{}: instance refresh {id} to launch template version {} started",
                    group.shown(),
                    group.to_version
                ));
                group.refresh_id = Some(id);
            }
            Target::Service(service) => {
                let client = clients::ecs(self.aws(), &service.region);
                ecs::deploy(
                    &client,
                    service,
                    &service.to_arn,
                    Some(ecs::configuration(rollout)?),
                )
                .await?;
                self.reporter.note(&format!(
                    "{}: deploying {} (circuit breaker on)",
                    service.shown(),
                    service.to_arn
                ));
            }
        }
        Ok(())
    }

    /// One look at every target that has not ended; the first failure's description.
    async fn poll(&self, tracked: &mut [Tracked]) -> Option<String> {
        let mut failure = None;
        for t in tracked.iter_mut().filter(|t| !t.phase.ended()) {
            let progress = match &t.target {
                Target::Group(group) => {
                    asg::watch(&clients::autoscaling(self.aws(), &group.region), group).await
                }
                Target::Service(service) => {
                    ecs::watch(
                        &clients::ecs(self.aws(), &service.region),
                        service,
                        t.undoing,
                    )
                    .await
                }
            };
            let progress = match progress {
                Ok(progress) => progress,
                Err(e) => {
                    // One failed look is not a failed rollout: AWS carries on; try next time.
                    tracing::warn!(
                        "{}: {}",
                        t.target.shown(),
                        crate::diagnostic::error_chain(&e)
                    );
                    continue;
                }
            };
            self.reporter.progress(&progress);
            t.phase = progress.phase.clone();
            t.last = Some(progress);
            if failure.is_none()
                && let Phase::Failed(why)
                | Phase::RollingBack(why)
                | Phase::RolledBack(why)
                | Phase::RollbackFailed(why) = &t.phase
            {
                failure = Some(format!("{}: {why}", t.target.shown()));
            }
        }
        failure
    }

    /// Moves every target back to where it was, waiting until AWS confirms each; whether all
    /// are confirmed back.
    async fn undo(
        &self,
        rollout: &Rollout,
        tracked: &mut [Tracked],
        errors: &mut Vec<JsonReport>,
    ) -> bool {
        for t in tracked.iter_mut() {
            let result = match (&t.target, &t.phase) {
                (_, Phase::RolledBack(_) | Phase::RollingBack(_)) => Ok(()),
                (Target::Group(group), Phase::Running) => {
                    let client = clients::autoscaling(self.aws(), &group.region);
                    match asg::roll_back(&client, group).await {
                        Ok(true) => {
                            t.phase = Phase::RollingBack("rollback requested by bake".into());
                            Ok(())
                        }
                        // It ended meanwhile: look again, then undo what it became.
                        Ok(false) => match asg::watch(&client, group).await {
                            Ok(progress) => {
                                t.phase = progress.phase;
                                self.refresh_back(t).await
                            }
                            Err(e) => Err(e),
                        },
                        Err(e) => Err(e),
                    }
                }
                (Target::Group(group), _) if group.refresh_id.is_none() => {
                    t.phase = Phase::RolledBack("never started".into());
                    Ok(())
                }
                (Target::Group(_), _) => self.refresh_back(t).await,
                (Target::Service(service), _) => {
                    let client = clients::ecs(self.aws(), &service.region);
                    let configuration = ecs::undo_configuration(rollout);
                    match ecs::deploy(&client, service, &service.from_arn, configuration).await {
                        Ok(()) => {
                            t.undoing = true;
                            t.phase = Phase::RollingBack("moved back by bake".into());
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = result {
                t.phase = Phase::RollbackFailed(crate::diagnostic::error_chain(&e));
                errors.push(Report::from_error(&e).with_hint(e.hint()).to_json());
            }
        }
        // Wait for the rollbacks, as long again as the rollout may take.
        let deadline = Instant::now() + rollout.timeout;
        loop {
            let pending: Vec<usize> = (0..tracked.len())
                .filter(|i| matches!(tracked[*i].phase, Phase::RollingBack(_)))
                .collect();
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for i in pending {
                    tracked[i].phase =
                        Phase::RollbackFailed("the rollback did not finish in time".into());
                }
                break;
            }
            tokio::time::sleep(self.options.poll_interval).await;
            for i in pending {
                let t = &mut tracked[i];
                let progress = match &t.target {
                    Target::Group(group) => {
                        asg::watch(&clients::autoscaling(self.aws(), &group.region), group).await
                    }
                    Target::Service(service) => {
                        ecs::watch(
                            &clients::ecs(self.aws(), &service.region),
                            service,
                            t.undoing,
                        )
                        .await
                    }
                };
                match progress {
                    Ok(progress) => {
                        self.reporter.progress(&progress);
                        t.phase = match progress.phase {
                            Phase::Running => Phase::RollingBack(
                                progress.reason.clone().unwrap_or_else(|| "moving back".into()),
                            ),
                            // A refresh bake started back to the old version succeeded.
                            Phase::Succeeded if t.undoing => {
                                Phase::RolledBack("refreshed back by bake".into())
                            }
                            Phase::Succeeded => Phase::RollbackFailed(
                                "the refresh finished on the new version before it could be rolled back".into(),
                            ),
                            Phase::Failed(why) => Phase::RollbackFailed(why),
                            phase => phase,
                        };
                    }
                    Err(e) => tracing::warn!(
                        "{}: {}",
                        t.target.shown(),
                        crate::diagnostic::error_chain(&e)
                    ),
                }
            }
        }
        tracked
            .iter()
            .all(|t| matches!(t.phase, Phase::RolledBack(_)))
    }

    /// A group whose refresh ended on (part of) the new version: a new refresh back to the
    /// version it ran before.
    async fn refresh_back(&self, t: &mut Tracked) -> Result<(), RolloutError> {
        let Target::Group(group) = &mut t.target else {
            return Ok(());
        };
        if matches!(t.phase, Phase::RolledBack(_) | Phase::RollingBack(_)) {
            return Ok(());
        }
        let client = clients::autoscaling(self.aws(), &group.region);
        let preferences = aws_sdk_autoscaling::types::RefreshPreferences::builder()
            .skip_matching(true)
            .build();
        let id = asg::start(&client, group, group.from_version, preferences).await?;
        self.reporter.note(&format!(
            "{}: instance refresh {id} back to launch template version {} started",
            group.shown(),
            group.from_version
        ));
        group.refresh_id = Some(id);
        t.undoing = true;
        t.phase = Phase::RollingBack("refreshing back to the previous version".into());
        Ok(())
    }
}
