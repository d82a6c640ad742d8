//! `bake publish`, `bake promote`, `bake rollback` and `bake pin`: put a version where
//! Auto Scaling Groups and Fargate services consume it, and move channels between versions.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use super::{VarArgs, print_json, print_reports};
use crate::aws::Aws;
use crate::diagnostic::{JsonReport, Report};
use crate::exit::ExitStatus;

use crate::publish::{
    Action, PublishError, PublishInputs, PublishOptions, PublishReport, Publisher,
    RegistryDigestCheck, Status,
};
use crate::recipe::Recipe;
use crate::registry::{
    self,
    auth::{ChainCredentials, Credentials},
    ecr::EcrCredentials,
};
use crate::settings::{OutputFormat, Settings};
use crate::store::Store;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The version's artifacts as JSON (`{recipe, version, amis: {region: ami}, images:
    /// [{repository, digest}]}`); without it they come from the version's build record.
    #[arg(long, value_name = "FILE")]
    pub inputs: Option<PathBuf>,
    /// Show each pointer's current and wanted value; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Make the new launch template versions the default.
    #[arg(long)]
    pub set_default: bool,
    /// Overwrite SSM parameters bake does not own.
    #[arg(long)]
    pub allow_clobber: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The version to promote (`sha256:…` or at least its first 12 hex digits).
    #[arg(id = "target_version", value_name = "VERSION")]
    pub target_version: String,
    /// The channel (one of the recipe's `publish.channels`).
    #[arg(long, value_name = "NAME")]
    pub channel: String,
    /// Show each pointer's current and wanted value; change nothing.
    #[arg(long, conflicts_with = "rollout")]
    pub dry_run: bool,
    /// Overwrite SSM parameters bake does not own.
    #[arg(long)]
    pub allow_clobber: bool,
    /// Also replace the machines behind the channel, as `bake rollout` does: instance refreshes
    /// and ECS deployments with the recipe's `publish.rollouts.<channel>`, waited for and rolled
    /// back on failure.
    #[arg(long)]
    pub rollout: bool,
    /// With `--rollout`: what Ctrl-C does (`cancel` or `leave`; see `bake rollout`).
    #[arg(long, value_enum, value_name = "CHOICE", requires = "rollout")]
    pub on_interrupt: Option<crate::rollout::OnInterrupt>,
    /// With `--rollout`: how often to ask AWS how each target is doing.
    #[arg(long, value_name = "DURATION", requires = "rollout",
          value_parser = super::rollout::parse_duration, default_value = "15s")]
    pub poll_interval: std::time::Duration,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The channel to move back to its previous version.
    #[arg(long, value_name = "NAME")]
    pub channel: String,
    /// Show each pointer's current and wanted value; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Overwrite SSM parameters bake does not own.
    #[arg(long)]
    pub allow_clobber: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE")]
    pub recipe: PathBuf,
    /// The channel whose current references are printed.
    #[arg(long, value_name = "NAME")]
    pub channel: String,
    /// Only this region's references (images are printed regardless).
    #[arg(long = "in-region", value_name = "REGION")]
    pub in_region: Option<String>,
    #[command(flatten)]
    pub vars: VarArgs,
}

fn runtime() -> tokio::runtime::Runtime {
    super::runtime().expect("a tokio runtime starts")
}

/// Plain-HTTP registry hosts of the recipe.
fn insecure_hosts(recipe: &Recipe) -> BTreeSet<String> {
    recipe
        .publish
        .registries
        .iter()
        .filter(|r| r.insecure)
        .filter_map(|r| r.repository.split_once('/').map(|(h, _)| h.to_owned()))
        .collect()
}

/// The digest check: bake's registry client with the configured credentials plus ECR's.
pub(super) fn digest_check<'a>(
    aws: &'a Aws,
    recipe: &Recipe,
    settings: &Settings,
) -> Result<RegistryDigestCheck<'a>, ExitStatus> {
    let mut options = settings.registry.client_options();
    options.insecure.extend(insecure_hosts(recipe));
    let sources: Vec<Arc<dyn Credentials>> = vec![
        settings.registry.credentials(),
        Arc::new(EcrCredentials::new(aws.clone())),
    ];
    let redirected: Vec<String> = options.endpoints.keys().cloned().collect();
    match registry::Client::new(options, Arc::new(ChainCredentials(sources))) {
        Ok(client) => Ok(RegistryDigestCheck::new(aws, client).with_redirected_hosts(redirected)),
        Err(e) => {
            print_reports(settings, &[Report::from_error(&e).with_hint(e.hint())]);
            Err(ExitStatus::Infrastructure)
        }
    }
}

fn fail(settings: &Settings, error: &PublishError) -> ExitStatus {
    print_reports(
        settings,
        &[Report::from_error(error).with_hint(error.hint())],
    );
    if error.is_refusal() {
        ExitStatus::RecipeOrUsage
    } else {
        ExitStatus::Infrastructure
    }
}

/// Where the inputs of the version to publish come from.
enum Source {
    /// `--inputs FILE`.
    Given(PublishInputs),
    /// The build record of the recipe's current version.
    Record(Box<crate::store::BuildRecord>),
}

/// The inputs of the version to publish: the given file, or the build record of the recipe's
/// current version.
fn source(args: &PublishArgs, recipe: &Recipe, settings: &Settings) -> Result<Source, Report> {
    if let Some(path) = &args.inputs {
        let inputs = PublishInputs::from_file(path).map_err(|e| Report::from_error(&e))?;
        if inputs.recipe != recipe.name {
            return Err(Report::new(format!(
                "publish inputs `{}` are for recipe `{}`, not `{}`",
                path.display(),
                inputs.recipe,
                recipe.name
            )));
        }
        return Ok(Source::Given(inputs));
    }
    let shown = args.recipe.display().to_string();
    let plan = super::common::plan_one_report(recipe, &shown, settings).map_err(|r| *r)?;
    let store = Store::open(&settings.store).map_err(|e| Report::from_error(&e))?;
    let record = store
        .record(&plan.version)
        .map_err(|e| Report::from_error(&e))?
        .ok_or_else(|| {
            Report::new(format!(
                "version {} of `{}` is not built in the store `{}`",
                plan.version,
                recipe.name,
                settings.store.display()
            ))
            .with_hint(Some(
                "run `bake build` first, or give the artifacts with --inputs FILE".into(),
            ))
        })?;
    Ok(Source::Record(Box::new(record)))
}

/// Every repository the recipe pushes to, with its registry host (ECR's needs the account).
async fn pushed_repositories(
    publisher: &Publisher<'_, RegistryDigestCheck<'_>>,
) -> Result<Vec<String>, PublishError> {
    let recipe = publisher.recipe;
    let mut repositories: Vec<String> = recipe
        .publish
        .registries
        .iter()
        .map(|r| r.repository.clone())
        .collect();
    if !recipe.publish.ecr.is_empty() {
        let home = crate::publish::home_region(recipe, publisher.aws)?;
        let account = publisher.caller_account(&home).await?;
        for target in &recipe.publish.ecr {
            let region = target.region.as_deref().unwrap_or(&home);
            repositories.push(format!(
                "{}/{}",
                registry::ecr::registry_host(&account, region),
                target.repository
            ));
        }
    }
    Ok(repositories)
}

pub fn run_publish(args: &PublishArgs, settings: &Settings) -> ExitStatus {
    match publish_report(args, settings) {
        Ok(report) => show(settings, &report),
        Err(status) => status,
    }
}

/// Publishes (or, with `dry_run`, plans publishing) the recipe's current version; errors are
/// printed, and their exit status returned.
pub(super) fn publish_report(
    args: &PublishArgs,
    settings: &Settings,
) -> Result<PublishReport, ExitStatus> {
    let recipe = super::common::load_or_report(&args.recipe, &args.vars, settings)?;
    let source = match source(args, &recipe, settings) {
        Ok(source) => source,
        Err(report) => {
            print_reports(settings, &[report]);
            return Err(ExitStatus::RecipeOrUsage);
        }
    };
    let options = PublishOptions {
        dry_run: args.dry_run,
        set_default: args.set_default,
        allow_clobber: args.allow_clobber,
    };
    runtime().block_on(async {
        let aws = Aws::load(&settings.aws).await;
        let digests = digest_check(&aws, &recipe, settings)?;
        let publisher = Publisher {
            aws: &aws,
            digests: &digests,
            recipe: &recipe,
            options,
        };
        let inputs = match source {
            Source::Given(inputs) => inputs,
            Source::Record(record) => {
                let repositories = match pushed_repositories(&publisher).await {
                    Ok(repositories) => repositories,
                    Err(e) => return Err(fail(settings, &e)),
                };
                match PublishInputs::from_record(&record, &repositories) {
                    Ok(inputs) => inputs,
                    Err(e) => {
                        print_reports(settings, &[Report::from_error(&e)]);
                        return Err(ExitStatus::RecipeOrUsage);
                    }
                }
            }
        };
        let report = publisher.publish(&inputs).await;
        record_in_manifest(settings, &recipe.name, &report, Vec::new(), |_| true);
        Ok(report)
    })
}

/// Adds what a publish, promote or rollback did to the version's manifest in the store (made
/// for the occasion when the version was published from `--inputs`), so `bake manifest show`
/// finds the version from a launch template version, parameter version or task definition.
/// `extra` goes first (a channel move); `keep` chooses among the report's publications.
/// Failing to write it is a warning: AWS holds the truth (the release and channel records).
fn record_in_manifest(
    settings: &Settings,
    recipe: &str,
    report: &PublishReport,
    extra: Vec<crate::provenance::manifest::Publication>,
    keep: impl Fn(&crate::provenance::manifest::Publication) -> bool,
) {
    if report.dry_run || report.version.is_empty() {
        return;
    }
    let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let by = crate::provenance::registry::operator();
    let mut publications = extra;
    publications.extend(report.publications(&at, &by).into_iter().filter(keep));
    if publications.is_empty() {
        return;
    }
    let written = Store::open(&settings.store)
        .map_err(|e| e.to_string())
        .and_then(|store| {
            crate::provenance::manifest::record_publications_of(
                &store,
                recipe,
                &report.version,
                publications,
            )
            .map_err(|e| e.to_string())
        });
    if let Err(e) = written {
        tracing::warn!("failed to record the publications in the manifest: {e}");
    }
}

pub fn run_promote(args: &PromoteArgs, settings: &Settings) -> ExitStatus {
    if args.rollout {
        // The rollout promotes (moves the channel) before it replaces the machines, and moves
        // the channel back if they fail.
        let rollout = super::rollout::RolloutArgs {
            recipe: args.recipe.clone(),
            target_version: args.target_version.clone(),
            channel: args.channel.clone(),
            on_interrupt: args.on_interrupt,
            poll_interval: args.poll_interval,
            allow_clobber: args.allow_clobber,
            vars: args.vars.clone(),
        };
        return super::rollout::run(&rollout, settings);
    }
    let movement = ChannelMove::Promote {
        version: &args.target_version,
        channel: &args.channel,
    };
    move_channel(
        &args.recipe,
        &args.vars,
        args.dry_run,
        args.allow_clobber,
        movement,
        settings,
    )
}

pub fn run_rollback(args: &RollbackArgs, settings: &Settings) -> ExitStatus {
    let movement = ChannelMove::Rollback {
        channel: &args.channel,
    };
    move_channel(
        &args.recipe,
        &args.vars,
        args.dry_run,
        args.allow_clobber,
        movement,
        settings,
    )
}

/// How `promote` and `rollback` move a channel's pointers.
enum ChannelMove<'a> {
    Promote { version: &'a str, channel: &'a str },
    Rollback { channel: &'a str },
}

/// Loads the recipe and moves its channel's pointers (`promote` and `rollback`).
fn move_channel(
    recipe: &std::path::Path,
    vars: &VarArgs,
    dry_run: bool,
    allow_clobber: bool,
    movement: ChannelMove<'_>,
    settings: &Settings,
) -> ExitStatus {
    let recipe = match super::common::load_or_report(recipe, vars, settings) {
        Ok(recipe) => recipe,
        Err(status) => return status,
    };
    let options = PublishOptions {
        dry_run,
        set_default: true,
        allow_clobber,
    };
    runtime().block_on(async {
        let aws = Aws::load(&settings.aws).await;
        let digests = match digest_check(&aws, &recipe, settings) {
            Ok(digests) => digests,
            Err(status) => return status,
        };
        let publisher = Publisher {
            aws: &aws,
            digests: &digests,
            recipe: &recipe,
            options,
        };
        let (moved, channel, action) = match movement {
            ChannelMove::Promote { version, channel } => (
                publisher.promote(version, channel).await,
                channel,
                "promote",
            ),
            ChannelMove::Rollback { channel } => {
                (publisher.rollback(channel).await, channel, "rollback")
            }
        };
        match moved {
            Ok(report) => {
                if report.exit_status() == ExitStatus::Success {
                    let moved = crate::provenance::manifest::Publication::Channel {
                        channel: channel.to_owned(),
                        action: action.to_owned(),
                        at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                            .to_string(),
                        by: crate::provenance::registry::operator(),
                    };
                    // A move writes parameter versions; its launch template versions and task
                    // definitions were recorded when the version was published.
                    record_in_manifest(settings, &recipe.name, &report, vec![moved], |p| {
                        matches!(
                            p,
                            crate::provenance::manifest::Publication::SsmParameter { .. }
                        )
                    });
                }
                show(settings, &report)
            }
            Err(e) => fail(settings, &e),
        }
    })
}

pub fn run_pin(args: &PinArgs, settings: &Settings) -> ExitStatus {
    let recipe = match super::common::load_or_report(&args.recipe, &args.vars, settings) {
        Ok(recipe) => recipe,
        Err(status) => return status,
    };
    runtime().block_on(async {
        let aws = Aws::load(&settings.aws).await;
        let digests = match digest_check(&aws, &recipe, settings) {
            Ok(digests) => digests,
            Err(status) => return status,
        };
        let publisher = Publisher {
            aws: &aws,
            digests: &digests,
            recipe: &recipe,
            options: PublishOptions::default(),
        };
        match publisher
            .pin(&args.channel, args.in_region.as_deref())
            .await
        {
            Ok(entry) => {
                match settings.output {
                    OutputFormat::Json => print_json(&entry),
                    OutputFormat::Human => {
                        let r = &entry.references;
                        println!("version  {}", r.version);
                        println!("promoted {}", entry.promoted_at);
                        for (region, ami) in &r.amis {
                            println!("ami      {region}  {ami}");
                        }
                        for image in &r.images {
                            println!("image    {image}");
                        }
                        for lt in &r.launch_templates {
                            println!(
                                "template {}  {} ({}) version {}",
                                lt.region, lt.template_name, lt.template_id, lt.version
                            );
                        }
                        for td in &r.task_definitions {
                            println!("task     {}  {}", td.region, td.arn);
                        }
                    }
                }
                ExitStatus::Success
            }
            Err(e) => fail(settings, &e),
        }
    })
}

pub(super) fn show(settings: &Settings, report: &PublishReport) -> ExitStatus {
    match settings.output {
        OutputFormat::Json => print_json(report),
        OutputFormat::Human => {
            println!("recipe   {}", report.recipe);
            println!("version  {}", report.version);
            for region in &report.regions {
                let status = match region.status {
                    Status::Planned => "plan (dry run)",
                    Status::Done => "done",
                    Status::Failed => "FAILED",
                };
                println!("{}  {status}", region.region);
                for change in &region.changes {
                    let sign = match change.action {
                        Action::Create => "+",
                        Action::Update => "~",
                        Action::Keep => "=",
                    };
                    let kind = serde_json::to_value(change.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    println!(
                        "  {sign} {kind} {}: {} -> {}{}",
                        change.target,
                        change.current.as_deref().unwrap_or("(none)"),
                        change.wanted,
                        change
                            .result
                            .as_ref()
                            .map(|r| format!(" [{r}]"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    // Failures go to stderr as well, where a person or a log collector looks for them.
    let errors: Vec<&JsonReport> = report
        .regions
        .iter()
        .filter_map(|r| r.error.as_ref())
        .chain(report.errors.iter())
        .collect();
    for (error, region) in errors.iter().zip(
        report
            .regions
            .iter()
            .filter(|r| r.error.is_some())
            .map(|r| r.region.as_str())
            .chain(std::iter::repeat("")),
    ) {
        let mut text = if region.is_empty() {
            format!("error: {}\n", error.message)
        } else {
            format!("error: {region}: {}\n", error.message)
        };
        for cause in &error.causes {
            text.push_str(&format!("  Caused by: {cause}\n"));
        }
        if let Some(hint) = &error.hint {
            text.push_str(&format!("  hint: {hint}\n"));
        }
        eprint!("{text}");
    }
    report.exit_status()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::super::Cli::command().debug_assert();
    }
}
