//! `bake rollout`: move a channel to a version and replace the machines behind it, waiting,
//! showing progress, and rolling back on failure (see [`crate::rollout`]).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::{VarArgs, print_json, print_reports};
use crate::aws::Aws;
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::publish::{PublishOptions, Publisher};
use crate::rollout::{
    OnInterrupt, Outcome, Phase, Reporter, RolloutOptions, RolloutReport, Rollouts, TargetProgress,
};
use crate::settings::{OutputFormat, Settings};

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The version to roll out (`sha256:…` or at least its first 12 hex digits); it must have
    /// been published.
    #[arg(id = "target_version", value_name = "VERSION")]
    pub target_version: String,
    /// The channel (one of the recipe's `publish.channels`, with `publish.rollouts.<channel>`).
    #[arg(long, value_name = "NAME")]
    pub channel: String,
    /// What Ctrl-C does: `cancel` rolls every target and the channel back, `leave` lets AWS
    /// carry on; without it bake asks on a terminal and cancels elsewhere.
    #[arg(long, value_enum, value_name = "CHOICE")]
    pub on_interrupt: Option<OnInterrupt>,
    /// How often to ask AWS how each target is doing.
    // 15 s: refresh and deployment states change on the scale of instance warm-ups and task
    // starts, and a few calls a minute per target stay far from the API rate limits.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "15s")]
    pub poll_interval: Duration,
    /// Overwrite SSM parameters bake does not own.
    #[arg(long)]
    pub allow_clobber: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}` is not a duration such as `15s` or `1m`"))
}

pub fn run(args: &RolloutArgs, settings: &Settings) -> ExitStatus {
    let recipe = match super::common::load_or_report(&args.recipe, &args.vars, settings) {
        Ok(recipe) => recipe,
        Err(status) => return status,
    };
    let runtime = match super::runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e)]);
            return ExitStatus::Infrastructure;
        }
    };
    runtime.block_on(async {
        let aws = Aws::load(&settings.aws).await;
        let digests = match super::publish::digest_check(&aws, &recipe, settings) {
            Ok(digests) => digests,
            Err(status) => return status,
        };
        let publisher = Publisher {
            aws: &aws,
            digests: &digests,
            recipe: &recipe,
            options: PublishOptions {
                dry_run: false,
                set_default: true,
                allow_clobber: args.allow_clobber,
            },
        };
        let reporter = CliReporter::new(settings);
        let rollouts = Rollouts {
            publisher: &publisher,
            reporter: &reporter,
            options: RolloutOptions {
                poll_interval: args.poll_interval,
            },
        };
        let interrupt = interrupted(args.on_interrupt);
        let result = rollouts
            .run(&args.target_version, &args.channel, interrupt)
            .await;
        reporter.finish();
        match result {
            Ok(report) => {
                record_in_manifest(settings, &report);
                show(settings, &report)
            }
            Err(e) => {
                print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
                if e.is_refusal() {
                    ExitStatus::RecipeOrUsage
                } else {
                    ExitStatus::Infrastructure
                }
            }
        }
    })
}

/// Resolves at the first Ctrl-C with what to do: the flag's choice, else the answer to a
/// question on a terminal, else `cancel` (a half-done rollout with no one watching is the worse
/// outcome).
async fn interrupted(choice: Option<OnInterrupt>) -> OnInterrupt {
    if tokio::signal::ctrl_c().await.is_err() {
        // No signal handler: never resolves, the rollout runs to its end.
        std::future::pending::<()>().await;
    }
    if let Some(choice) = choice {
        return choice;
    }
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return OnInterrupt::Cancel;
    }
    let answer = tokio::task::spawn_blocking(|| {
        eprint!("\ninterrupted: cancel the rollout and roll back? [Y/n] (n leaves it to AWS) ");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await;
    match answer {
        Ok(Ok(line)) if line.trim().eq_ignore_ascii_case("n") => OnInterrupt::Leave,
        _ => OnInterrupt::Cancel,
    }
}

/// Bars on a terminal; elsewhere a log line per target whenever its state changes.
struct CliReporter {
    bars: Option<MultiProgress>,
    state: Mutex<HashMap<String, Shown>>,
    quiet: bool,
}

enum Shown {
    Bar(ProgressBar),
    Line(String),
}

impl CliReporter {
    fn new(settings: &Settings) -> Self {
        CliReporter {
            bars: (settings.progress && settings.output == OutputFormat::Human)
                .then(MultiProgress::new),
            state: Mutex::new(HashMap::new()),
            quiet: settings.verbosity == crate::settings::Verbosity::Quiet,
        }
    }

    fn finish(&self) {
        let state = self
            .state
            .lock()
            .expect("the reporter's lock is never poisoned");
        for shown in state.values() {
            if let Shown::Bar(bar) = shown {
                bar.finish();
            }
        }
    }
}

fn line(p: &TargetProgress) -> String {
    let mut text = format!("{}: {}", p.target, p.status);
    if let Some(percentage) = p.percentage {
        text.push_str(&format!(" {percentage}%"));
    }
    if let Some(detail) = &p.detail {
        text.push_str(&format!(", {detail}"));
    }
    if let Some(reason) = &p.reason {
        text.push_str(&format!(" ({reason})"));
    }
    text
}

impl Reporter for CliReporter {
    fn progress(&self, progress: &TargetProgress) {
        if self.quiet {
            return;
        }
        let text = line(progress);
        let mut state = self
            .state
            .lock()
            .expect("the reporter's lock is never poisoned");
        match (&self.bars, state.get(&progress.target)) {
            (Some(_), Some(Shown::Bar(bar))) => {
                bar.set_position(u64::from(progress.percentage.unwrap_or(0)));
                bar.set_message(text);
            }
            (Some(bars), _) => {
                let bar = bars.add(ProgressBar::new(100));
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {pos:>3}% {wide_msg}")
                        .expect("the template is valid"),
                );
                bar.set_position(u64::from(progress.percentage.unwrap_or(0)));
                bar.set_message(text);
                state.insert(progress.target.clone(), Shown::Bar(bar));
            }
            (None, Some(Shown::Line(last))) if *last == text => {}
            (None, _) => {
                eprintln!("{text}");
                state.insert(progress.target.clone(), Shown::Line(text));
            }
        }
    }

    fn note(&self, text: &str) {
        if self.quiet {
            return;
        }
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(text);
            }
            None => eprintln!("{text}"),
        }
    }
}

/// Adds the rollout to the version's manifest in the store. A warning when it cannot: AWS
/// holds the truth (the channel record).
fn record_in_manifest(settings: &Settings, report: &RolloutReport) {
    let rollout = crate::provenance::manifest::Publication::Rollout {
        channel: report.channel.clone(),
        outcome: report.outcome,
        reason: report.reason.clone(),
        targets: report
            .targets
            .iter()
            .map(|t| crate::provenance::manifest::RolloutTarget {
                target: t.target.clone(),
                from: t.from.clone(),
                to: t.to.clone(),
                phase: t.phase.clone(),
            })
            .collect(),
        started_at: report.started_at.clone(),
        at: report.ended_at.clone(),
        by: crate::provenance::registry::operator(),
    };
    let written = crate::store::Store::open(&settings.store)
        .map_err(|e| e.to_string())
        .and_then(|store| {
            crate::provenance::manifest::record_publications_of(
                &store,
                &report.recipe,
                &report.version,
                [rollout],
            )
            .map_err(|e| e.to_string())
        });
    if let Err(e) = written {
        tracing::warn!("failed to record the rollout in the manifest: {e}");
    }
}

fn show(settings: &Settings, report: &RolloutReport) -> ExitStatus {
    match settings.output {
        OutputFormat::Json => print_json(report),
        OutputFormat::Human => {
            println!(
                "rollout of {} to channel {}: {}",
                report.version,
                report.channel,
                serde_json::to_value(report.outcome)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            );
            for t in &report.targets {
                let phase = match &t.phase {
                    Phase::Running => "running".to_owned(),
                    Phase::Succeeded => "succeeded".to_owned(),
                    Phase::Failed(why) => format!("failed: {why}"),
                    Phase::RollingBack(why) => format!("rolling back: {why}"),
                    Phase::RolledBack(why) => format!("rolled back: {why}"),
                    Phase::RollbackFailed(why) => format!("rollback failed: {why}"),
                };
                println!("  {}  {} -> {}  {phase}", t.target, t.from, t.to);
            }
            if report.channel_moved_back {
                println!("  channel {} moved back", report.channel);
            }
        }
    }
    let mut reports: Vec<Report> = report
        .errors
        .iter()
        .map(|e| Report::new(e.message.clone()))
        .collect();
    let status = match report.outcome {
        Outcome::Succeeded => ExitStatus::Success,
        Outcome::Cancelled | Outcome::Left => ExitStatus::Interrupted,
        Outcome::RolledBack | Outcome::RollbackIncomplete => ExitStatus::Infrastructure,
    };
    if let Some(reason) = &report.reason {
        let what = match report.outcome {
            Outcome::RolledBack => "the rollout failed and was rolled back",
            Outcome::RollbackIncomplete => {
                "the rollout failed and could not be rolled back everywhere"
            }
            Outcome::Cancelled => "the rollout was cancelled and rolled back",
            _ => "the rollout did not finish",
        };
        reports.insert(0, Report::new(format!("{what}: {reason}")));
    } else if report.outcome == Outcome::Left {
        reports.insert(
            0,
            Report::new(format!(
                "interrupted: the rollout continues in AWS and channel {} stays on {}",
                report.channel, report.version
            ))
            .with_hint(Some(
                "watch it with `aws autoscaling describe-instance-refreshes` / `aws ecs describe-services`, or run `bake rollback` to move the channel back".into(),
            )),
        );
    }
    print_reports(settings, &reports);
    status
}
