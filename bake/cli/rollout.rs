//! `bake rollout`: move a channel to a version and replace the machines behind it, waiting,
//! showing progress, and rolling back on failure (see [`crate::rollout`]).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::common::{Outcome, load_recipe, parse_duration};
use super::{VarArgs, print_json, print_reports};
use crate::diagnostic::Report;
use crate::exit::ExitStatus;
use crate::rollout::{self, OnInterrupt, Phase, Reporter, RolloutReport, TargetProgress};
use crate::settings::{OutputFormat, Settings};
use crate::usecase::{self, Context, rollout::RolloutRequest};

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

pub fn run(args: &RolloutArgs, ctx: &Context) -> Outcome {
    let recipe = load_recipe(&args.recipe, &args.vars)?;
    let request = RolloutRequest {
        version: &args.target_version,
        channel: &args.channel,
        poll_interval: args.poll_interval,
        allow_clobber: args.allow_clobber,
    };
    let reporter = CliReporter::new(&ctx.settings);
    let result = usecase::rollout::rollout(
        ctx,
        &recipe,
        &request,
        &reporter,
        interrupted(ctx.cancel(), args.on_interrupt),
    );
    reporter.finish();
    Ok(show(&ctx.settings, &result?))
}

/// How often the rollout looks at the run's cancellation flag: a person at a terminal sees the
/// question at once, and a flag load is nothing beside the rollout's AWS polls.
const INTERRUPT_CHECK: Duration = Duration::from_millis(100);

/// Resolves at the first Ctrl-C (the run's cancellation flag) with what to do: the flag's
/// choice, else the answer to a question on a terminal, else `cancel` (a half-done rollout with
/// no one watching is the worse outcome).
async fn interrupted(cancel: &AtomicBool, choice: Option<OnInterrupt>) -> OnInterrupt {
    while !cancel.load(Ordering::SeqCst) {
        tokio::time::sleep(INTERRUPT_CHECK).await;
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
        rollout::Outcome::Succeeded => ExitStatus::Success,
        rollout::Outcome::Cancelled | rollout::Outcome::Left => ExitStatus::Interrupted,
        rollout::Outcome::RolledBack | rollout::Outcome::RollbackIncomplete => {
            ExitStatus::Infrastructure
        }
    };
    if let Some(reason) = &report.reason {
        let what = match report.outcome {
            rollout::Outcome::RolledBack => "the rollout failed and was rolled back",
            rollout::Outcome::RollbackIncomplete => {
                "the rollout failed and could not be rolled back everywhere"
            }
            rollout::Outcome::Cancelled => "the rollout was cancelled and rolled back",
            _ => "the rollout did not finish",
        };
        reports.insert(0, Report::new(format!("{what}: {reason}")));
    } else if report.outcome == rollout::Outcome::Left {
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
