//! Settings: what the user typed, the environment (`BAKE_*`, `NO_COLOR`) and the terminal,
//! resolved into one value before any work starts. Commands read settings, never raw arguments
//! or environment variables.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::aws::AwsSettings;

/// How results are printed on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    #[default]
    Human,
    /// One JSON document, for machines.
    Json,
}

/// How chatty the logs on stderr are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
    Debug,
}

/// Settings shared by every command.
#[derive(Debug, Clone)]
pub struct Settings {
    /// bake's local content-addressed store.
    pub store: PathBuf,
    pub output: OutputFormat,
    pub verbosity: Verbosity,
    /// Draw progress bars (only on a terminal, and never when quiet or asked not to).
    pub progress: bool,
    /// Colour error output (only on a terminal, and never with `NO_COLOR`).
    pub color: bool,
    pub aws: AwsSettings,
    /// Registries: insecure hosts, CA file, endpoint overrides, Docker's credentials file.
    pub registry: crate::registry::RegistrySettings,
    /// Boot tests: the QEMU accelerator, over the recipe's choice (`bake build
    /// --boot-accelerator`, or `BAKE_BOOT_ACCELERATOR`).
    pub boot_accelerator: Option<crate::ami::boot::Accelerator>,
}

impl Settings {
    /// What a plan needs from the settings and the environment.
    pub fn plan_options(&self) -> crate::plan::PlanOptions {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        crate::plan::PlanOptions {
            aws_region: self
                .aws
                .region
                .clone()
                .or_else(|| var("AWS_REGION"))
                .or_else(|| var("AWS_DEFAULT_REGION")),
            source_date_epoch: var("SOURCE_DATE_EPOCH").and_then(|v| v.parse().ok()),
            // Only a store that exists keeps the cache: planning never creates one.
            digest_cache: self
                .store
                .is_dir()
                .then(|| self.store.join("cache/file-digests.json")),
            image_resolver: Some(std::sync::Arc::new(crate::registry::RegistryResolver::new(
                self.registry.clone(),
            ))),
            source_ami: None,
            ..crate::plan::PlanOptions::default()
        }
    }

    /// Resolves settings from the global arguments and the environment.
    pub fn resolve(args: &crate::cli::GlobalArgs) -> Result<Self, crate::aws::AwsSettingsError> {
        let verbosity = match (args.quiet, args.verbose) {
            (true, _) => Verbosity::Quiet,
            (false, 0) => Verbosity::Normal,
            (false, 1) => Verbosity::Verbose,
            (false, _) => Verbosity::Debug,
        };
        let stderr_tty = std::io::stderr().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let mut aws = AwsSettings::from_env()?;
        if args.region.is_some() {
            aws.region.clone_from(&args.region);
        }
        if args.profile.is_some() {
            aws.profile.clone_from(&args.profile);
        }
        Ok(Settings {
            store: args.store.clone(),
            output: args.output,
            verbosity,
            progress: stderr_tty && !args.no_progress && verbosity > Verbosity::Quiet,
            color: stderr_tty && !no_color,
            registry: crate::registry::RegistrySettings {
                aws: Some(aws.clone()),
                ..crate::registry::RegistrySettings::from_env()
            },
            aws,
            boot_accelerator: None,
        })
    }
}
