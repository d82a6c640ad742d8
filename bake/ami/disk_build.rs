//! The local half of a snapshot-strategy AMI build: recipe → provisioned root → disk image →
//! command tests → boot tests. What comes out is a raw image file that has booted, ready to
//! upload; nothing here talks to AWS.
//!
//! ```text
//!  Builder::provision_root ─► audit gate ─► build_disk_image ─► command tests (on the root) ─► boot tests
//!  (base + steps, cached)     (GPT, ESP, ext4)                                   (QEMU, marker)
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::boot::{BootError, BootReport, BootSpec, boot_test};
use super::disk::{DiskError, DiskImage, DiskSpec, build_disk_image};
use crate::build::pipeline::{BuildError, BuildReporter, Builder, StepReport};
use crate::plan::Plan;
use crate::recipe::{AmiStrategy, Recipe, Test};

/// A disk image that passed the recipe's tests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalImage {
    pub image: DiskImage,
    /// One per `boot` test of the recipe, in order.
    pub boots: Vec<BootReport>,
    pub steps: Vec<StepReport>,
    /// The compliance gate's result, when the recipe has an `audit:` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<crate::audit::AuditRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalImageError {
    #[error("recipe `{0}` has no `outputs.ami` to build a disk image for")]
    NoAmiOutput(String),
    #[error(
        "recipe `{0}` builds its AMI on an instance (`strategy: instance`), not from a disk image"
    )]
    InstanceStrategy(String),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("failed to make the disk image of `{recipe}`")]
    Disk {
        recipe: String,
        #[source]
        source: DiskError,
    },
    #[error("the disk image of `{recipe}` did not pass its boot test")]
    Boot {
        recipe: String,
        /// Boxed: a boot failure carries console lines and QEMU's words.
        #[source]
        source: Box<BootError>,
    },
}

impl LocalImageError {
    pub fn hint(&self) -> Option<String> {
        match self {
            LocalImageError::Build(e) => e.hint(),
            LocalImageError::Disk { source, .. } => source.hint(),
            LocalImageError::Boot { source, .. } => source.hint(),
            _ => None,
        }
    }

    /// Whether the recipe (not the machine) is at fault.
    pub fn is_recipe_failure(&self) -> bool {
        match self {
            LocalImageError::NoAmiOutput(_) | LocalImageError::InstanceStrategy(_) => true,
            LocalImageError::Build(e) => e.is_recipe_failure(),
            LocalImageError::Disk { source, .. } => source.is_recipe_failure(),
            LocalImageError::Boot { source, .. } => source.is_recipe_failure(),
        }
    }

    pub fn is_interrupted(&self) -> bool {
        match self {
            LocalImageError::Build(e) => e.is_interrupted(),
            LocalImageError::Boot { source, .. } => matches!(**source, BootError::Interrupted),
            _ => false,
        }
    }
}

/// Builds the disk image of `recipe` (planned as `plan`) at `out` and runs its command and
/// boot tests. On a failed test the image file is removed, so a caller cannot upload it.
pub fn build_local_image(
    builder: &Builder<'_>,
    recipe: &Recipe,
    plan: &Plan,
    out: &Path,
    reporter: &mut dyn BuildReporter,
) -> Result<LocalImage, LocalImageError> {
    build_disk(builder, recipe, plan, out, Checks::Run, reporter)
}

/// [`build_local_image`] for a version whose OCI image was just built (a recipe with both
/// outputs): the root is that image's layers, which its build already scanned (`audit`, its
/// gate's result) and ran the command tests against, so neither runs again. Boot tests still
/// run: only the disk image can boot.
pub fn build_local_image_of_built_root(
    builder: &Builder<'_>,
    recipe: &Recipe,
    plan: &Plan,
    out: &Path,
    audit: Option<crate::audit::AuditRecord>,
    reporter: &mut dyn BuildReporter,
) -> Result<LocalImage, LocalImageError> {
    build_disk(
        builder,
        recipe,
        plan,
        out,
        Checks::Done(audit.map(Box::new)),
        reporter,
    )
}

/// Whether the root still needs its gate and command tests.
enum Checks {
    Run,
    Done(Option<Box<crate::audit::AuditRecord>>),
}

fn build_disk(
    builder: &Builder<'_>,
    recipe: &Recipe,
    plan: &Plan,
    out: &Path,
    checks: Checks,
    reporter: &mut dyn BuildReporter,
) -> Result<LocalImage, LocalImageError> {
    let ami = recipe
        .outputs
        .ami
        .as_ref()
        .ok_or_else(|| LocalImageError::NoAmiOutput(recipe.name.clone()))?;
    if ami.strategy != AmiStrategy::Snapshot {
        return Err(LocalImageError::InstanceStrategy(recipe.name.clone()));
    }
    let root = builder.provision_root(recipe, plan, reporter)?;
    // The compliance gate scans the provisioned root before any disk image exists.
    let run_checks = matches!(checks, Checks::Run);
    let audit = match (checks, &recipe.audit) {
        (Checks::Done(audit), _) => audit.map(|a| *a),
        (Checks::Run, Some(audit)) => Some(builder.audit(root.path(), audit, reporter)?),
        (Checks::Run, None) => None,
    };
    let spec = DiskSpec::for_recipe(ami, &plan.version, builder.options.source_date_epoch);
    reporter.message(&format!(
        "making the disk image ({} GiB)",
        ami.disk_size_gib
    ));
    let image =
        build_disk_image(root.path(), &spec, out).map_err(|source| LocalImageError::Disk {
            recipe: recipe.name.clone(),
            source,
        })?;
    reporter.message(&format!("disk image {}", image.digest));
    let remove_image = || {
        let _ = fs_err::remove_file(out);
    };
    // Command tests may leave files in the root: they run after the image is made.
    if run_checks && let Err(e) = builder.run_command_tests(recipe, plan, root.path(), reporter) {
        remove_image();
        return Err(e.into());
    }
    let steps = root.steps.clone();
    drop(root);
    let mut boots = Vec::new();
    for test in &recipe.tests {
        if !matches!(test, Test::Boot { .. }) {
            continue;
        }
        let mut spec = BootSpec::from_test(test).expect("a boot test");
        if let Some(accelerator) = builder.options.boot_accelerator {
            spec.accelerator = accelerator;
        }
        spec.cancel = Some(builder.options.cancel.clone());
        reporter.step_started(&format!("boot test ({})", spec.marker), false);
        let clock = std::time::Instant::now();
        match boot_test(out, &spec) {
            Ok(report) => {
                reporter.step_finished(&format!("boot test ({})", spec.marker), clock.elapsed());
                boots.push(report);
            }
            Err(source) => {
                remove_image();
                return Err(LocalImageError::Boot {
                    recipe: recipe.name.clone(),
                    source: Box::new(source),
                });
            }
        }
    }
    Ok(LocalImage {
        image,
        boots,
        steps,
        audit,
    })
}
