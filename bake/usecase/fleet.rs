//! The fleet's use cases: every recipe under a directory, linked to the recipe it is built on.
//! Plan them all, say which are outdated (and why), and build them (`bake build --all`, or a
//! recipe's bases first), each in its own `bake build` child process, each after the recipe it
//! is built on, independent ones at once.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::Context;
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::fleet::outdated::Reason;
use crate::fleet::schedule::{self, Outcome};
use crate::fleet::{Fleet, FleetError, Member};
use crate::plan::Plan;
use crate::recipe::{Base, Recipe};
use crate::settings::{Settings, Verbosity};
use crate::store::Store;

/// Why the fleet could not be loaded, or a recipe's bases not built.
#[derive(Debug, thiserror::Error)]
pub enum FleetUseCaseError {
    #[error(transparent)]
    Load(FleetError),
    #[error(transparent)]
    Chain(FleetError),
    #[error("base recipe `{shown}` failed to build: {message}")]
    BaseFailed {
        shown: String,
        message: String,
        status: ExitStatus,
    },
    /// Interrupted before a base recipe was built (its child reported why).
    #[error("interrupted before the base recipes were built")]
    BasesInterrupted,
}

impl Diagnose for FleetUseCaseError {
    fn hint(&self) -> Option<String> {
        match self {
            FleetUseCaseError::Load(FleetError::Read { .. }) => None,
            FleetUseCaseError::Load(e) | FleetUseCaseError::Chain(e) => e.hint(),
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            FleetUseCaseError::Load(FleetError::Read { .. }) => ExitStatus::Infrastructure,
            FleetUseCaseError::Load(_) | FleetUseCaseError::Chain(_) => ExitStatus::RecipeOrUsage,
            FleetUseCaseError::BaseFailed { status, .. } => *status,
            FleetUseCaseError::BasesInterrupted => ExitStatus::Interrupted,
        }
    }

    fn reports(&self) -> Vec<Report> {
        match self {
            FleetUseCaseError::Load(FleetError::Recipes(failed)) => failed
                .iter()
                .flat_map(|(_, errors)| errors.0.iter().map(|e| e.report()))
                .collect(),
            FleetUseCaseError::BaseFailed { .. } => vec![Report::new(self.to_string())],
            FleetUseCaseError::BasesInterrupted => Vec::new(),
            _ => vec![Report::from_error(self).with_hint(self.hint())],
        }
    }
}

/// The recipes under `dir` (searched recursively), linked to their bases.
pub fn load_fleet(dir: &Path) -> Result<Fleet, FleetUseCaseError> {
    Fleet::load(dir).map_err(FleetUseCaseError::Load)
}

/// Plans every member, parents first, each base recipe once. Recipes on a source AMI are
/// planned with that AMI resolved in AWS, one by one; the rest offline of AWS, together.
pub fn plan_fleet(ctx: &Context, fleet: &Fleet) -> Vec<Result<Plan, Report>> {
    let options = ctx.settings.plan_options();
    let together: Vec<(usize, &Member)> = fleet
        .members
        .iter()
        .enumerate()
        .filter(|(_, m)| !matches!(m.recipe.base, Base::Ami(_)))
        .collect();
    let pairs: Vec<(&Recipe, &str)> = together
        .iter()
        .map(|(_, m)| (&m.recipe, m.shown.as_str()))
        .collect();
    let mut plans: Vec<Option<Result<Plan, Report>>> = (0..fleet.len()).map(|_| None).collect();
    for ((i, _), plan) in together
        .iter()
        .zip(crate::plan::plan_many(&pairs, &options))
    {
        plans[*i] = Some(plan.map_err(|e| first_report(e.reports(), &e)));
    }
    for (i, member) in fleet.members.iter().enumerate() {
        if plans[i].is_none() {
            plans[i] = Some(
                super::plan::plan_recipe(ctx, &member.recipe, &member.shown).map_err(|e| {
                    let mut reports = e.reports();
                    if reports.is_empty() {
                        Report::new(format!("failed to plan `{}`", member.shown))
                    } else {
                        reports.remove(0)
                    }
                }),
            );
        }
    }
    plans
        .into_iter()
        .map(|p| p.expect("every member planned"))
        .collect()
}

fn first_report(reports: Vec<Report>, error: &crate::plan::PlanError) -> Report {
    reports
        .into_iter()
        .next()
        .unwrap_or_else(|| Report::from_error(error))
}

/// A version as tables show it: its first 12 hex digits.
pub fn short_version(version: &str) -> &str {
    let hex = version.strip_prefix("sha256:").unwrap_or(version);
    hex.get(..12).unwrap_or(hex)
}

/// A report's message and causes on one line, for a table.
pub fn one_line(report: &Report) -> String {
    std::iter::once(report.message.as_str())
        .chain(report.causes.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(": ")
}

/// The store, when it exists (planning never creates one).
pub fn existing_store(settings: &Settings) -> Option<Store> {
    settings
        .store
        .is_dir()
        .then(|| Store::open(&settings.store).ok())
        .flatten()
}

// ---------------------------------------------------------------------------------------------
// bake outdated

/// One recipe in `bake outdated`'s report.
#[derive(Debug, Serialize)]
pub struct OutdatedLine {
    pub recipe: String,
    pub name: String,
    /// `outdated`, `up_to_date`, `unbuilt` (no build of this recipe in the store) or `error`.
    pub state: &'static str,
    /// The version last built (the newest build record of this recipe).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub built: Option<String>,
    /// The version today's plan gives.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub now: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<Reason>,
    /// When an archive moved: the installed packages (of the last build's image) it now has
    /// newer versions of.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<crate::fleet::packages::PackageChange>,
    /// The recipes built on this one, which its rebuild rebuilds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drags_along: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `bake outdated`'s report (fields in the order the JSON document has always had them).
#[derive(Debug, Serialize)]
pub struct OutdatedReport {
    pub outdated: usize,
    pub recipes: Vec<OutdatedLine>,
    pub unbuilt: usize,
    pub up_to_date: usize,
}

impl OutdatedReport {
    /// Success when every recipe is up to date; `Outdated` when some are not; an
    /// infrastructure failure when a recipe could not be planned.
    pub fn status(&self) -> ExitStatus {
        if self.recipes.iter().any(|l| l.state == "error") {
            ExitStatus::Infrastructure
        } else if self.outdated > 0 {
            ExitStatus::Outdated
        } else {
            ExitStatus::Success
        }
    }
}

/// Compares each recipe under `dir` with its last build: today's plan resolves every tag and
/// source AMI again (what the world offers now), and each difference is a reason.
pub fn outdated(ctx: &Context, dir: &Path) -> Result<OutdatedReport, FleetUseCaseError> {
    let fleet = load_fleet(dir)?;
    let plans = plan_fleet(ctx, &fleet);
    let store = existing_store(&ctx.settings);
    let last_built = store.as_ref().map(newest_records).unwrap_or_default();
    let mut lines = Vec::with_capacity(fleet.len());
    for (i, (member, plan)) in fleet.members.iter().zip(&plans).enumerate() {
        let mut line = OutdatedLine {
            recipe: member.shown.clone(),
            name: member.recipe.name.clone(),
            state: "unbuilt",
            built: None,
            now: None,
            reasons: Vec::new(),
            packages: Vec::new(),
            drags_along: Vec::new(),
            error: None,
        };
        match plan {
            Err(report) => {
                line.state = "error";
                line.error = Some(one_line(report));
            }
            Ok(plan) => {
                line.now = Some(plan.version.to_string());
                if let Some(record) = last_built.get(&member.recipe.name) {
                    line.built = Some(record.version.to_string());
                    if record.version == plan.version {
                        line.state = "up_to_date";
                    } else {
                        line.state = "outdated";
                        line.reasons =
                            crate::fleet::outdated::reasons(&record.inputs, &plan.inputs);
                        if line
                            .reasons
                            .iter()
                            .any(|r| matches!(r, Reason::ArchiveMoved { .. }))
                            && let Some(store) = &store
                        {
                            line.packages = changed_packages(store, record, plan);
                        }
                        line.drags_along = fleet
                            .descendants(i)
                            .into_iter()
                            .map(|d| fleet.members[d].shown.clone())
                            .collect();
                    }
                }
            }
        }
        lines.push(line);
    }
    let count = |state: &str| lines.iter().filter(|l| l.state == state).count();
    Ok(OutdatedReport {
        outdated: count("outdated"),
        unbuilt: count("unbuilt"),
        up_to_date: count("up_to_date"),
        recipes: lines,
    })
}

/// The installed packages of `record`'s image that the archives `plan` pinned now have newer
/// versions of (nothing when the image is not in the store or an index cannot be read, which
/// is logged).
fn changed_packages(
    store: &Store,
    record: &crate::store::BuildRecord,
    plan: &Plan,
) -> Vec<crate::fleet::packages::PackageChange> {
    use crate::fleet::packages;
    let crate::plan::BaseIdentity::Bootstrap {
        archives,
        components,
        architecture,
        ..
    } = &plan.inputs.base
    else {
        return Vec::new();
    };
    let Some(installed) = packages::installed(store, record) else {
        return Vec::new();
    };
    let mut suites = Vec::new();
    for pin in archives {
        let suite = crate::recipe::ArchiveSuite {
            mirror: pin.mirror.clone(),
            suite: pin.suite.clone(),
        };
        match packages::archive_versions(&suite, components, architecture) {
            Ok(versions) => suites.push((suite, versions)),
            Err(e) => tracing::warn!(
                "the packages of {} {} were not compared: {e}",
                pin.mirror,
                pin.suite
            ),
        }
    }
    packages::changes(&installed, &suites)
}

/// The newest build record (by start time) of each recipe name in the store.
fn newest_records(store: &Store) -> std::collections::HashMap<String, crate::store::BuildRecord> {
    let mut newest: std::collections::HashMap<String, crate::store::BuildRecord> =
        std::collections::HashMap::new();
    for version in crate::store::record::versions(store).unwrap_or_default() {
        let Ok(Some(record)) = crate::store::record::load(store, version.as_str()) else {
            continue;
        };
        let newer = newest
            .get(&record.name)
            .is_none_or(|kept| record.started > kept.started);
        if newer {
            newest.insert(record.name.clone(), record);
        }
    }
    newest
}

// ---------------------------------------------------------------------------------------------
// bake build --all, and base recipes before a recipe

/// What one `bake build` child reported.
#[derive(Debug, Clone, Serialize)]
struct BuiltMember {
    version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_digest: Option<String>,
}

/// Why a member was not built.
#[derive(Debug, Clone)]
struct Failure {
    message: String,
    status: ExitStatus,
}

/// How `bake build` children are started: this binary, with this run's options.
pub struct ChildBuild<'a> {
    pub settings: &'a Settings,
    /// Options of `bake build` itself to repeat (`--no-attest`, `--runner`, …).
    pub build_args: Vec<String>,
}

impl ChildBuild<'_> {
    fn command(&self, recipe: &Path) -> Result<Command, Failure> {
        let exe = std::env::current_exe().map_err(|e| Failure {
            message: format!("cannot find bake's own executable to build with: {e}"),
            status: ExitStatus::Infrastructure,
        })?;
        let store =
            std::path::absolute(&self.settings.store).unwrap_or(self.settings.store.clone());
        let mut command = Command::new(exe);
        command
            .arg("--store")
            .arg(store)
            .args(["--output", "json", "--no-progress"]);
        if let Some(region) = &self.settings.aws.region {
            command.args(["--region", region]);
        }
        if let Some(profile) = &self.settings.aws.profile {
            command.args(["--profile", profile]);
        }
        match self.settings.verbosity {
            Verbosity::Quiet => {
                command.arg("--quiet");
            }
            Verbosity::Verbose => {
                command.arg("-v");
            }
            Verbosity::Debug => {
                command.arg("-vv");
            }
            Verbosity::Normal => {}
        }
        command
            .arg("build")
            .arg(recipe)
            .args(&self.build_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(command)
    }

    /// Builds one recipe in its own process; its stderr is shown prefixed with `label`.
    fn build(&self, recipe: &Path, label: &str, running: &Running) -> Result<BuiltMember, Failure> {
        let mut child = self.command(recipe)?.spawn().map_err(|e| Failure {
            message: format!("failed to start `bake build {}`: {e}", recipe.display()),
            status: ExitStatus::Infrastructure,
        })?;
        let pid = child.id();
        running.add(pid);
        let stderr = child.stderr.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        let label = label.to_owned();
        let relay = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = writeln!(std::io::stderr().lock(), "{label} | {line}");
            }
        });
        let mut output = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut output);
        let status = child.wait();
        running.remove(pid);
        let _ = relay.join();
        let status = status.map_err(|e| Failure {
            message: format!("failed to wait for `bake build {}`: {e}", recipe.display()),
            status: ExitStatus::Infrastructure,
        })?;
        if !status.success() {
            let code = status.code();
            return Err(Failure {
                message: match code {
                    Some(code) => format!("`bake build` exited with status {code}"),
                    None => "`bake build` was killed".into(),
                },
                status: match code {
                    Some(2) => ExitStatus::RecipeOrUsage,
                    Some(130) | None => ExitStatus::Interrupted,
                    _ => ExitStatus::Infrastructure,
                },
            });
        }
        let value: serde_json::Value = serde_json::from_slice(&output).map_err(|e| Failure {
            message: format!("`bake build` printed no JSON result: {e}"),
            status: ExitStatus::Infrastructure,
        })?;
        Ok(BuiltMember {
            version: value["version"].as_str().unwrap_or_default().to_owned(),
            image_digest: value["image_digest"].as_str().map(str::to_owned),
        })
    }
}

/// The pids of the running builds, so an interrupt reaches each (by pid, nothing else).
#[derive(Default)]
struct Running(std::sync::Mutex<Vec<u32>>);

impl Running {
    fn add(&self, pid: u32) {
        self.0.lock().expect("not poisoned").push(pid);
    }

    fn remove(&self, pid: u32) {
        self.0.lock().expect("not poisoned").retain(|p| *p != pid);
    }

    fn terminate(&self) {
        for pid in self.0.lock().expect("not poisoned").iter() {
            if let Ok(pid) = i32::try_from(*pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    }
}

/// One line of the summary of `bake build --all`.
#[derive(Debug, Serialize)]
pub struct SummaryLine {
    pub recipe: String,
    pub name: String,
    /// `built`, `cached`, `failed`, `skipped` (a recipe it is built on failed) or
    /// `not_started` (the run was interrupted).
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For a skipped recipe: the recipe whose failure stopped it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_base: Option<String>,
}

/// What `bake build --all` did (fields in the order the JSON document has always had them).
#[derive(Debug, Serialize)]
pub struct FleetBuilt {
    pub built: usize,
    pub cached: usize,
    pub failed: usize,
    pub not_started: usize,
    pub recipes: Vec<SummaryLine>,
    pub skipped: usize,
    /// Success only when every recipe is built; else the first failure's kind (an interrupt
    /// wins).
    #[serde(skip)]
    pub status: ExitStatus,
}

/// `bake build --all DIR`: builds every recipe under `dir` (at most `jobs` at once), skipping
/// those whose version is in the store.
pub fn build_all(
    ctx: &Context,
    dir: &Path,
    jobs: usize,
    child: &ChildBuild<'_>,
) -> Result<FleetBuilt, FleetUseCaseError> {
    let fleet = load_fleet(dir)?;
    let all: Vec<usize> = (0..fleet.len()).collect();
    let outcomes = build_members(ctx, &fleet, &all, jobs, child, ctx.cancel());
    Ok(summary(&fleet, &outcomes))
}

/// Builds the listed members of `fleet` (and nothing else), skipping those whose version is in
/// the store.
fn build_members(
    ctx: &Context,
    fleet: &Fleet,
    wanted: &[usize],
    jobs: usize,
    child: &ChildBuild<'_>,
    cancel: &AtomicBool,
) -> Vec<Outcome<BuiltMember, Failure>> {
    let settings = child.settings;
    let plans = plan_fleet(ctx, fleet);
    let store = existing_store(settings);
    let decided: Vec<Option<Outcome<BuiltMember, Failure>>> = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| match plan {
            _ if !wanted.contains(&i) => Some(Outcome::NotStarted),
            Err(report) => Some(Outcome::Failed {
                error: Failure {
                    message: one_line(report),
                    status: ExitStatus::RecipeOrUsage,
                },
                took: Duration::ZERO,
            }),
            Ok(plan) => store
                .as_ref()
                .and_then(|s| crate::fleet::built_record(s, &plan.version))
                .map(|record| Outcome::Cached {
                    result: BuiltMember {
                        version: plan.version.to_string(),
                        image_digest: record.image().map(|i| i.image_digest.to_string()),
                    },
                }),
        })
        .collect();
    for (member, plan) in fleet.members.iter().zip(&plans) {
        if let Err(report) = plan {
            // Shown now, as the run goes on: the summary names the recipe on one line.
            let _ = write!(
                std::io::stderr().lock(),
                "{}",
                report.render(settings.color)
            );
            tracing::debug!("{} was not planned", member.shown);
        }
    }
    let parents: Vec<Option<usize>> = fleet.members.iter().map(|m| m.parent).collect();
    let running = Running::default();
    let watcher_done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        // Forward an interrupt to the running builds, which clean up after themselves.
        scope.spawn(|| {
            while !watcher_done.load(Ordering::SeqCst) {
                if cancel.load(Ordering::SeqCst) {
                    running.terminate();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let outcomes = schedule::run(&parents, decided, jobs, cancel, |i| {
            let member = &fleet.members[i];
            child.build(&member.recipe.path, &member.recipe.name, &running)
        });
        watcher_done.store(true, Ordering::SeqCst);
        outcomes
    })
}

/// Before `recipe` is built: builds each of its base recipes (nearest last) whose version is
/// not in the store, each in its own `bake build`.
pub fn build_bases_of(
    ctx: &Context,
    recipe: &Recipe,
    child: &ChildBuild<'_>,
) -> Result<(), FleetUseCaseError> {
    let Base::Recipe { .. } = &recipe.base else {
        return Ok(());
    };
    let chain = Fleet::chain_of(recipe).map_err(FleetUseCaseError::Chain)?;
    let wanted: Vec<usize> = (0..chain.len()).collect();
    let outcomes = build_members(ctx, &chain, &wanted, 1, child, ctx.cancel());
    for (member, outcome) in chain.members.iter().zip(&outcomes) {
        match outcome {
            Outcome::Built { result, .. } => {
                tracing::info!("built base recipe {} as {}", member.shown, result.version)
            }
            Outcome::Failed { error, .. } => {
                return Err(FleetUseCaseError::BaseFailed {
                    shown: member.shown.clone(),
                    message: error.message.clone(),
                    status: error.status,
                });
            }
            Outcome::NotStarted => return Err(FleetUseCaseError::BasesInterrupted),
            Outcome::Cached { .. } | Outcome::Skipped { .. } => {}
        }
    }
    Ok(())
}

/// The summary of a fleet build: one line per member, counts, and the status to end with.
fn summary(fleet: &Fleet, outcomes: &[Outcome<BuiltMember, Failure>]) -> FleetBuilt {
    let lines: Vec<SummaryLine> = fleet
        .members
        .iter()
        .zip(outcomes)
        .map(|(member, outcome)| {
            let mut line = SummaryLine {
                recipe: member.shown.clone(),
                name: member.recipe.name.clone(),
                result: "",
                version: None,
                image_digest: None,
                seconds: None,
                error: None,
                failed_base: None,
            };
            match outcome {
                Outcome::Built { result, took } => {
                    line.result = "built";
                    line.version = Some(result.version.clone());
                    line.image_digest = result.image_digest.clone();
                    line.seconds = Some((took.as_secs_f64() * 10.0).round() / 10.0);
                }
                Outcome::Cached { result } => {
                    line.result = "cached";
                    line.version = Some(result.version.clone());
                    line.image_digest = result.image_digest.clone();
                }
                Outcome::Failed { error, took } => {
                    line.result = "failed";
                    line.error = Some(error.message.clone());
                    line.seconds = Some((took.as_secs_f64() * 10.0).round() / 10.0);
                }
                Outcome::Skipped { failed } => {
                    line.result = "skipped";
                    line.failed_base = Some(fleet.members[*failed].shown.clone());
                }
                Outcome::NotStarted => line.result = "not_started",
            }
            line
        })
        .collect();
    let count = |what: &str| lines.iter().filter(|l| l.result == what).count();
    FleetBuilt {
        built: count("built"),
        cached: count("cached"),
        failed: count("failed"),
        not_started: count("not_started"),
        skipped: count("skipped"),
        status: exit_status(outcomes),
        recipes: lines,
    }
}

/// Success only when every recipe is built; else the first failure's kind (an interrupt wins).
fn exit_status(outcomes: &[Outcome<BuiltMember, Failure>]) -> ExitStatus {
    if outcomes.iter().any(|o| matches!(o, Outcome::NotStarted)) {
        return ExitStatus::Interrupted;
    }
    outcomes
        .iter()
        .find_map(|o| match o {
            Outcome::Failed { error, .. } => Some(error.status),
            _ => None,
        })
        .unwrap_or(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(state: &'static str) -> OutdatedLine {
        OutdatedLine {
            recipe: "r.yaml".into(),
            name: "r".into(),
            state,
            built: None,
            now: None,
            reasons: Vec::new(),
            packages: Vec::new(),
            drags_along: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn outdated_exits_outdated_unless_a_recipe_was_not_planned() {
        let report = |lines: Vec<OutdatedLine>| OutdatedReport {
            outdated: lines.iter().filter(|l| l.state == "outdated").count(),
            recipes: lines,
            unbuilt: 0,
            up_to_date: 0,
        };
        assert_eq!(
            report(vec![line("up_to_date")]).status(),
            ExitStatus::Success
        );
        assert_eq!(
            report(vec![line("outdated"), line("up_to_date")]).status(),
            ExitStatus::Outdated
        );
        assert_eq!(
            report(vec![line("outdated"), line("error")]).status(),
            ExitStatus::Infrastructure
        );
    }

    #[test]
    fn a_failed_base_names_the_recipe_and_keeps_its_status() {
        let error = FleetUseCaseError::BaseFailed {
            shown: "base.yaml".into(),
            message: "`bake build` exited with status 2".into(),
            status: ExitStatus::RecipeOrUsage,
        };
        let reports = error.reports();
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0].message,
            "base recipe `base.yaml` failed to build: `bake build` exited with status 2"
        );
        assert_eq!(error.exit_status(), ExitStatus::RecipeOrUsage);
        // The interrupted child said why; nothing more is printed.
        assert!(FleetUseCaseError::BasesInterrupted.reports().is_empty());
        assert_eq!(
            FleetUseCaseError::BasesInterrupted.exit_status(),
            ExitStatus::Interrupted
        );
    }

    #[test]
    fn the_summary_json_keeps_its_keys_in_order() {
        let built = FleetBuilt {
            built: 1,
            cached: 0,
            failed: 0,
            not_started: 0,
            recipes: Vec::new(),
            skipped: 0,
            status: ExitStatus::Success,
        };
        let text = serde_json::to_string(&built).unwrap();
        assert_eq!(
            text,
            r#"{"built":1,"cached":0,"failed":0,"not_started":0,"recipes":[],"skipped":0}"#
        );
    }
}
