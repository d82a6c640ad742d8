//! `bake build RECIPE`: build the recipe's OCI image into the local store (or return the stored
//! one when its version is already there), printing the version and image digest.

use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::Args;

use super::VarArgs;
use super::build_output::{
    print_disk_ami, print_fleet_built, print_image, print_imagebuilder_output, print_instance_ami,
};
use super::common::{CliReporter, Outcome, load_recipe};
use crate::exit::ExitStatus;
use crate::recipe::{AmiStrategy, RunnerKind};
use crate::settings::{Settings, Verbosity};
use crate::usecase::Context;
use crate::usecase::build_ami_disk::{SnapshotBuildOptions, build_ami_disk};
use crate::usecase::build_ami_instance::{build_ami_instance, is_instance_recipe};
use crate::usecase::build_image::{BuildImageOptions, build_image};
use crate::usecase::fleet::{ChildBuild, build_all, build_bases_of};
use crate::usecase::imagebuilder::build_imagebuilder;

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The recipe file.
    #[arg(value_name = "RECIPE", required_unless_present = "all")]
    pub recipe: Option<PathBuf>,
    /// Build every recipe under DIR (default: the current directory), each after the recipe it
    /// is built on, independent ones at once; versions in the store are not built again.
    #[arg(
        long,
        value_name = "DIR",
        num_args = 0..=1,
        default_missing_value = ".",
        conflicts_with_all = ["recipe", "vars", "var_files"]
    )]
    pub all: Option<PathBuf>,
    /// With `--all`: how many recipes build at once (default: the number of CPUs).
    #[arg(long, value_name = "N", requires = "all", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    #[command(flatten)]
    pub vars: VarArgs,
    #[command(flatten)]
    pub attest: super::common::AttestArgs,
    /// How boot tests run QEMU, over the recipe's `accelerator`: `auto` (KVM when it works,
    /// else software emulation), `kvm` (fail when KVM cannot run the guest) or `tcg`.
    #[arg(long, value_enum, value_name = "ACCEL", env = "BAKE_BOOT_ACCELERATOR")]
    pub boot_accelerator: Option<crate::ami::boot::Accelerator>,
    /// Where provisioning steps run: `chroot` (namespaces, needs root) or `docker` (a Docker
    /// Engine found like the docker CLI finds it). Overrides the recipe's `build.runner`; both
    /// give the same image.
    #[arg(long, value_name = "RUNNER")]
    pub runner: Option<RunnerArg>,
    /// Where the build runs: `local` (this machine, or the recipe's builder instance) or
    /// `imagebuilder` (EC2 Image Builder builds the AMIs from the compiled recipe).
    #[arg(
        long,
        value_name = "ENGINE",
        default_value = "local",
        env = "BAKE_ENGINE"
    )]
    pub engine: EngineArg,
}

/// `--engine`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineArg {
    Local,
    Imagebuilder,
}

/// `--runner`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RunnerArg {
    Chroot,
    Docker,
}

pub fn run(args: &BuildArgs, ctx: &Context) -> Outcome {
    let settings = &Settings {
        boot_accelerator: args.boot_accelerator.or(ctx.settings.boot_accelerator),
        ..ctx.settings.clone()
    };
    // Ctrl-C from here on stops the build at its next safe point, cleaning up.
    ctx.cancel();
    let child = ChildBuild {
        settings,
        build_args: repeated_build_args(args),
    };
    let path = match (&args.all, &args.recipe) {
        (Some(dir), _) => {
            let jobs = args.jobs.map_or_else(
                || std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
                |n| n as usize,
            );
            let built = build_all(ctx, dir, jobs, &child)?;
            print_fleet_built(&built, settings);
            return Ok(built.status);
        }
        (None, Some(path)) => path,
        (None, None) => unreachable!("clap requires RECIPE without --all"),
    };
    let shown = path.display().to_string();
    let recipe = load_recipe(path, &args.vars)?;
    // The recipes it is built on first (each in its own `bake build`), unless in the store.
    build_bases_of(ctx, &recipe, &child)?;
    let mut reporter = CliReporter {
        quiet: settings.verbosity == Verbosity::Quiet,
    };
    let signing = (!args.attest.no_attest).then(|| {
        args.attest
            .with_recipe(&recipe.provenance)
            .signing_options()
    });
    if args.engine == EngineArg::Imagebuilder {
        let output = build_imagebuilder(ctx, &recipe, &shown, &mut reporter)?;
        print_imagebuilder_output(&output, settings);
        if !output.started_build && settings.verbosity > Verbosity::Quiet {
            eprintln!("(built by an earlier run: nothing was started)");
        }
        return Ok(ExitStatus::Success);
    }
    if is_instance_recipe(&recipe) {
        let output = build_ami_instance(ctx, &recipe, &shown, &mut reporter)?;
        print_instance_ami(&output, settings);
        return Ok(ExitStatus::Success);
    }
    if recipe
        .outputs
        .ami
        .as_ref()
        .is_some_and(|a| a.strategy == AmiStrategy::Snapshot)
    {
        let options = SnapshotBuildOptions {
            boot_accelerator: args.boot_accelerator,
            signing,
        };
        let built = build_ami_disk(ctx, &recipe, &shown, &options, &mut reporter)?;
        print_disk_ami(&built, settings);
        return Ok(ExitStatus::Success);
    }
    let options = BuildImageOptions {
        runner: args.runner.map(|runner| match runner {
            RunnerArg::Chroot => RunnerKind::Chroot,
            RunnerArg::Docker => RunnerKind::Docker,
        }),
        boot_accelerator: args.boot_accelerator,
        signing,
    };
    let built = build_image(ctx, &recipe, &shown, &options, &mut reporter)?;
    print_image(&built, settings);
    Ok(ExitStatus::Success)
}

/// `bake build` options a child build repeats.
fn repeated_build_args(args: &BuildArgs) -> Vec<String> {
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
            RunnerArg::Chroot => "chroot".into(),
            RunnerArg::Docker => "docker".into(),
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
    if args.engine == EngineArg::Imagebuilder {
        out.extend(["--engine".into(), "imagebuilder".into()]);
    }
    out
}
