//! Commands over every recipe of a directory: `bake graph [DIR]`, `bake plan --all [DIR]` and
//! `bake build --all [DIR]`, and the building of a recipe's unbuilt base recipes before it.
//!
//! Each recipe of a fleet is built by its own `bake build` process (this binary, with this
//! run's global options): a build owns its runner, signal handling and store work directories,
//! and a failing or killed build cannot take its siblings down. Their stderr is shown line by
//! line, prefixed with the recipe's name; their JSON result feeds the summary.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::{print_json, print_reports};
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::fleet::outdated::Reason;
use crate::fleet::schedule::{self, Outcome};
use crate::fleet::{Fleet, FleetError, Member};
use crate::plan::{Plan, PlanError};
use crate::recipe::Base;
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::store::Store;

#[derive(Debug, Args)]
pub struct GraphArgs {
    /// The directory whose recipes (searched recursively) make the graph.
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// How the graph is printed: `text` (a tree) or `dot` (Graphviz). `--output json` prints
    /// it as JSON.
    #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
    pub format: GraphFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphFormat {
    Text,
    Dot,
}

pub fn graph(args: &GraphArgs, settings: &Settings) -> ExitStatus {
    let fleet = match load_or_report(&args.dir, settings) {
        Ok(fleet) => fleet,
        Err(status) => return status,
    };
    match (settings.output, args.format) {
        (OutputFormat::Json, _) => print_json(&fleet.document()),
        (OutputFormat::Human, GraphFormat::Text) => print!("{}", fleet.tree()),
        (OutputFormat::Human, GraphFormat::Dot) => print!("{}", fleet.dot()),
    }
    ExitStatus::Success
}

/// Loads the recipes under `dir`, or prints every error and returns the status to end with.
fn load_or_report(dir: &Path, settings: &Settings) -> Result<Fleet, ExitStatus> {
    Fleet::load(dir).map_err(|error| {
        let reports = match &error {
            FleetError::Recipes(failed) => failed
                .iter()
                .flat_map(|(_, errors)| errors.0.iter().map(|e| e.report()))
                .collect(),
            FleetError::Read { .. } => vec![Report::from_error(&error)],
            _ => vec![Report::from_error(&error).with_hint(error.hint())],
        };
        print_reports(settings, &reports);
        match error {
            FleetError::Read { .. } => ExitStatus::Infrastructure,
            _ => ExitStatus::RecipeOrUsage,
        }
    })
}

/// Plans every member, parents first, each base recipe once. Recipes on a source AMI are
/// planned with that AMI resolved in AWS, one by one; the rest offline of AWS, together.
fn plan_fleet(fleet: &Fleet, settings: &Settings) -> Vec<Result<Plan, Report>> {
    let options = settings.plan_options();
    let together: Vec<(usize, &Member)> = fleet
        .members
        .iter()
        .enumerate()
        .filter(|(_, m)| !matches!(m.recipe.base, Base::Ami(_)))
        .collect();
    let pairs: Vec<(&crate::recipe::Recipe, &str)> = together
        .iter()
        .map(|(_, m)| (&m.recipe, m.shown.as_str()))
        .collect();
    let mut plans: Vec<Option<Result<Plan, Report>>> = (0..fleet.len()).map(|_| None).collect();
    for ((i, _), plan) in together
        .iter()
        .zip(crate::plan::plan_many(&pairs, &options))
    {
        plans[*i] = Some(plan.map_err(|e| first_report(&e)));
    }
    for (i, member) in fleet.members.iter().enumerate() {
        if plans[i].is_none() {
            plans[i] = Some(
                super::common::plan_one_report(&member.recipe, &member.shown, settings)
                    .map_err(|r| *r),
            );
        }
    }
    plans
        .into_iter()
        .map(|p| p.expect("every member planned"))
        .collect()
}

/// A version as tables show it: its first 12 hex digits.
fn short_version(version: &str) -> &str {
    let hex = version.strip_prefix("sha256:").unwrap_or(version);
    hex.get(..12).unwrap_or(hex)
}

/// A report's message and causes on one line, for a table.
fn one_line(report: &Report) -> String {
    std::iter::once(report.message.as_str())
        .chain(report.causes.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(": ")
}

fn first_report(error: &PlanError) -> Report {
    super::common::plan_reports(error)
        .into_iter()
        .next()
        .unwrap_or_else(|| Report::from_error(error))
}

/// The store, when it exists (planning never creates one).
fn existing_store(settings: &Settings) -> Option<Store> {
    settings
        .store
        .is_dir()
        .then(|| Store::open(&settings.store).ok())
        .flatten()
}

// ---------------------------------------------------------------------------------------------
// bake plan --all

/// One line of `bake plan --all`.
#[derive(Debug, Serialize)]
struct PlannedMember<'a> {
    recipe: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base: Option<&'a str>,
    /// `new`, `built` (in the store), `published` (asked with `--check`: in a registry or AWS),
    /// or `error`.
    state: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    published: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn plan_all(dir: &Path, check: bool, settings: &Settings) -> ExitStatus {
    let fleet = match load_or_report(dir, settings) {
        Ok(fleet) => fleet,
        Err(status) => return status,
    };
    let plans = plan_fleet(&fleet, settings);
    let store = existing_store(settings);
    let mut lines = Vec::with_capacity(fleet.len());
    let mut failed = false;
    for (member, plan) in fleet.members.iter().zip(&plans) {
        let base = member.parent.map(|p| fleet.members[p].shown.as_str());
        let line = match plan {
            Ok(plan) => {
                let built = store
                    .as_ref()
                    .is_some_and(|s| crate::fleet::built_record(s, &plan.version).is_some());
                let published = if check {
                    super::plan::published(&member.recipe, plan, settings)
                } else {
                    Vec::new()
                };
                PlannedMember {
                    recipe: &member.shown,
                    name: &member.recipe.name,
                    version: Some(plan.version.to_string()),
                    base,
                    state: if !published.is_empty() {
                        "published"
                    } else if built {
                        "built"
                    } else {
                        "new"
                    },
                    published,
                    error: None,
                }
            }
            Err(report) => {
                failed = true;
                PlannedMember {
                    recipe: &member.shown,
                    name: &member.recipe.name,
                    version: None,
                    base,
                    state: "error",
                    published: Vec::new(),
                    error: Some(one_line(report)),
                }
            }
        };
        lines.push(line);
    }
    match settings.output {
        OutputFormat::Json => print_json(&serde_json::json!({ "recipes": lines })),
        OutputFormat::Human => {
            let width = lines.iter().map(|l| l.recipe.len()).max().unwrap_or(0);
            for line in &lines {
                let version = line.version.as_deref().map_or("-", short_version);
                let detail = match (&line.error, line.published.is_empty()) {
                    (Some(error), _) => format!("  {error}"),
                    (None, false) => format!("  {}", line.published.join(", ")),
                    _ => String::new(),
                };
                println!(
                    "{:width$}  {:12}  {}{detail}",
                    line.recipe, version, line.state
                );
            }
        }
    }
    if failed {
        for report in plans.into_iter().filter_map(Result::err) {
            print_reports(settings, &[report]);
        }
        ExitStatus::RecipeOrUsage
    } else {
        ExitStatus::Success
    }
}

// ---------------------------------------------------------------------------------------------
// bake outdated

#[derive(Debug, Args)]
pub struct OutdatedArgs {
    /// The directory whose recipes (searched recursively) are compared with their last build.
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
}

/// One recipe in `bake outdated`'s report.
#[derive(Debug, Serialize)]
struct OutdatedLine<'a> {
    recipe: &'a str,
    name: &'a str,
    /// `outdated`, `up_to_date`, `unbuilt` (no build of this recipe in the store) or `error`.
    state: &'static str,
    /// The version last built (the newest build record of this recipe).
    #[serde(skip_serializing_if = "Option::is_none")]
    built: Option<String>,
    /// The version today's plan gives.
    #[serde(skip_serializing_if = "Option::is_none")]
    now: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reasons: Vec<Reason>,
    /// When an archive moved: the installed packages (of the last build's image) it now has
    /// newer versions of.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    packages: Vec<crate::fleet::packages::PackageChange>,
    /// The recipes built on this one, which its rebuild rebuilds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    drags_along: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn outdated(args: &OutdatedArgs, settings: &Settings) -> ExitStatus {
    let fleet = match load_or_report(&args.dir, settings) {
        Ok(fleet) => fleet,
        Err(status) => return status,
    };
    // Today's plan resolves every tag and source AMI again: what the world offers now.
    let plans = plan_fleet(&fleet, settings);
    let store = existing_store(settings);
    let last_built = store.as_ref().map(newest_records).unwrap_or_default();
    let mut lines = Vec::with_capacity(fleet.len());
    let mut error = None;
    for (i, (member, plan)) in fleet.members.iter().zip(&plans).enumerate() {
        let mut line = OutdatedLine {
            recipe: &member.shown,
            name: &member.recipe.name,
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
                error.get_or_insert(ExitStatus::Infrastructure);
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
                            .map(|d| fleet.members[d].shown.as_str())
                            .collect();
                    }
                }
            }
        }
        lines.push(line);
    }
    let count = |state: &str| lines.iter().filter(|l| l.state == state).count();
    match settings.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "recipes": lines,
            "outdated": count("outdated"),
            "up_to_date": count("up_to_date"),
            "unbuilt": count("unbuilt"),
        })),
        OutputFormat::Human => {
            let short = |v: &Option<String>| v.as_deref().map_or("", short_version).to_owned();
            for line in lines.iter().filter(|l| l.state == "outdated") {
                println!(
                    "{} ({}): outdated, built {} → now {}",
                    line.recipe,
                    line.name,
                    short(&line.built),
                    short(&line.now)
                );
                for reason in &line.reasons {
                    println!("  {}", reason.describe());
                }
                for p in &line.packages {
                    let security = if p.security { ", security" } else { "" };
                    println!(
                        "  package {} {} → {} ({}{security})",
                        p.name, p.built, p.now, p.suite
                    );
                }
                if !line.drags_along.is_empty() {
                    println!("  drags along: {}", line.drags_along.join(", "));
                }
            }
            for line in lines.iter().filter(|l| l.state == "error") {
                println!(
                    "{} ({}): not planned: {}",
                    line.recipe,
                    line.name,
                    line.error.as_deref().unwrap_or_default()
                );
            }
            println!(
                "{} outdated, {} up to date, {} never built here",
                count("outdated"),
                count("up_to_date"),
                count("unbuilt")
            );
        }
    }
    match error {
        Some(status) => status,
        None if count("outdated") > 0 => ExitStatus::Outdated,
        None => ExitStatus::Success,
    }
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
pub(super) struct ChildBuild<'a> {
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

/// One line of the summary.
#[derive(Debug, Serialize)]
struct SummaryLine<'a> {
    recipe: &'a str,
    name: &'a str,
    /// `built`, `cached`, `failed`, `skipped` (a recipe it is built on failed) or
    /// `not_started` (the run was interrupted).
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_digest: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// For a skipped recipe: the recipe whose failure stopped it.
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_base: Option<&'a str>,
}

pub(super) fn build_all(
    dir: &Path,
    jobs: usize,
    child: &ChildBuild<'_>,
    cancel: &AtomicBool,
) -> ExitStatus {
    let settings = child.settings;
    let fleet = match load_or_report(dir, settings) {
        Ok(fleet) => fleet,
        Err(status) => return status,
    };
    let all: Vec<usize> = (0..fleet.len()).collect();
    let outcomes = build_members(&fleet, &all, jobs, child, cancel);
    print_summary(&fleet, &outcomes, settings);
    exit_status(&outcomes)
}

/// Builds the listed members of `fleet` (and nothing else), skipping those whose version is in
/// the store.
fn build_members(
    fleet: &Fleet,
    wanted: &[usize],
    jobs: usize,
    child: &ChildBuild<'_>,
    cancel: &AtomicBool,
) -> Vec<Outcome<BuiltMember, Failure>> {
    let settings = child.settings;
    let plans = plan_fleet(fleet, settings);
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
            print_reports(settings, std::slice::from_ref(report));
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
/// not in the store. `Err` is the status to end with when one failed.
pub(super) fn build_bases_of(
    recipe: &crate::recipe::Recipe,
    child: &ChildBuild<'_>,
    cancel: &AtomicBool,
) -> Result<(), ExitStatus> {
    let Base::Recipe { .. } = &recipe.base else {
        return Ok(());
    };
    let chain = match Fleet::chain_of(recipe) {
        Ok(chain) => chain,
        Err(error) => {
            print_reports(
                child.settings,
                &[Report::from_error(&error).with_hint(error.hint())],
            );
            return Err(ExitStatus::RecipeOrUsage);
        }
    };
    let wanted: Vec<usize> = (0..chain.len()).collect();
    let outcomes = build_members(&chain, &wanted, 1, child, cancel);
    for (member, outcome) in chain.members.iter().zip(&outcomes) {
        match outcome {
            Outcome::Built { result, .. } => {
                tracing::info!("built base recipe {} as {}", member.shown, result.version)
            }
            Outcome::Failed { error, .. } => {
                print_reports(
                    child.settings,
                    &[Report::new(format!(
                        "base recipe `{}` failed to build: {}",
                        member.shown, error.message
                    ))],
                );
                return Err(error.status);
            }
            Outcome::NotStarted => return Err(ExitStatus::Interrupted),
            Outcome::Cached { .. } | Outcome::Skipped { .. } => {}
        }
    }
    Ok(())
}

fn print_summary(fleet: &Fleet, outcomes: &[Outcome<BuiltMember, Failure>], settings: &Settings) {
    let lines: Vec<SummaryLine<'_>> = fleet
        .members
        .iter()
        .zip(outcomes)
        .map(|(member, outcome)| {
            let mut line = SummaryLine {
                recipe: &member.shown,
                name: &member.recipe.name,
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
                    line.failed_base = Some(&fleet.members[*failed].shown);
                }
                Outcome::NotStarted => line.result = "not_started",
            }
            line
        })
        .collect();
    let count = |what: &str| lines.iter().filter(|l| l.result == what).count();
    match settings.output {
        OutputFormat::Json => print_json(&serde_json::json!({
            "recipes": lines,
            "built": count("built"),
            "cached": count("cached"),
            "failed": count("failed"),
            "skipped": count("skipped"),
            "not_started": count("not_started"),
        })),
        OutputFormat::Human => {
            let width = lines
                .iter()
                .map(|l| l.recipe.len())
                .max()
                .unwrap_or(6)
                .max(6);
            println!(
                "{:width$}  {:12}  {:11}  {:>8}",
                "RECIPE", "VERSION", "RESULT", "TIME"
            );
            for line in &lines {
                let version = line.version.as_deref().map_or("-", short_version);
                let time = line.seconds.map_or("-".to_owned(), |s| format!("{s:.1}s"));
                let why = match (&line.error, line.failed_base) {
                    (Some(error), _) => format!("  {error}"),
                    (None, Some(base)) => format!("  (base {base} failed)"),
                    _ => String::new(),
                };
                println!(
                    "{:width$}  {version:12}  {:11}  {time:>8}{why}",
                    line.recipe, line.result
                );
            }
            println!(
                "{} built, {} cached, {} failed, {} skipped",
                count("built"),
                count("cached"),
                count("failed"),
                count("skipped") + count("not_started"),
            );
        }
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

/// `bake build` options a child build repeats.
pub(super) fn repeated_build_args(args: &super::build::BuildArgs) -> Vec<String> {
    let mut out = Vec::new();
    if args.attest.no_attest {
        out.push("--no-attest".into());
    }
    for format in &args.attest.sbom_formats {
        out.push("--sbom-format".into());
        out.push(
            clap::ValueEnum::to_possible_value(format)
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default(),
        );
    }
    if let Some(key) = &args.attest.signing_key {
        out.push("--signing-key".into());
        out.push(key.display().to_string());
    }
    if let Some(key) = &args.attest.kms_key {
        out.push("--kms-key".into());
        out.push(key.clone());
    }
    if let Some(runner) = args.runner {
        out.push("--runner".into());
        out.push(match runner {
            super::build::RunnerArg::Chroot => "chroot".into(),
            super::build::RunnerArg::Docker => "docker".into(),
        });
    }
    if let Some(accelerator) = args.boot_accelerator {
        out.push("--boot-accelerator".into());
        out.push(
            clap::ValueEnum::to_possible_value(&accelerator)
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default(),
        );
    }
    if args.engine == super::build::EngineArg::Imagebuilder {
        out.extend(["--engine".into(), "imagebuilder".into()]);
    }
    out
}
