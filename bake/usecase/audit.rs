//! The compliance gate alone (`bake audit`): scan a root filesystem, or a built version's image
//! unpacked into a scratch root, with every rule's result.
//!
//! The data stream, profile, target, thresholds and exceptions come from the recipe (the one
//! given, the one a version was built from, or an explicit one for a root directory), so the
//! numbers are the build gate's for the same root; the options' data stream, profile and target
//! override them, and are all a root without a recipe needs.
//!
//! A version built with `strategy: instance` has its root inside its AMI, never on this
//! machine: its gate ran on the builder, so the result recorded there is returned instead of
//! scanning again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Context, ContextError};
use crate::audit::{AuditDirs, AuditError, AuditRecord, Scan};
use crate::diagnostic::{Diagnose, Report};
use crate::exit::ExitStatus;
use crate::recipe::{Audit, AuditTarget, Recipe, Scanner, VarSources};
use crate::store::{Artifact, BuildRecord, Store};

/// The profile `bake audit` scans with when neither a recipe nor an option names one.
const DEFAULT_PROFILE: &str = "cis_level1_server";

/// What to scan, and the gate's settings over the recipe's.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// What `bake audit` was given: a version or recipe file (its record is `record`), or a
    /// root filesystem directory.
    pub what: String,
    /// The build record `what` names (none for a root directory).
    pub record: Option<BuildRecord>,
    /// Take the gate's settings from this recipe.
    pub recipe: Option<PathBuf>,
    /// The variables recipes are loaded with.
    pub vars: VarSources,
    pub datastream: Option<PathBuf>,
    pub profile: Option<String>,
    pub target: Option<AuditTarget>,
}

impl AuditOptions {
    /// Whether the options alone say everything the gate needs from a recipe.
    fn overrides_all(&self) -> bool {
        self.datastream.is_some() && self.profile.is_some() && self.target.is_some()
    }
}

/// What an audit found.
#[derive(Debug)]
pub enum Audited {
    /// A scan of `root` (an unpacked image is removed again).
    Scanned {
        root: PathBuf,
        record: AuditRecord,
        scan: Scan,
    },
    /// An instance-built version: the result its gate recorded on the builder (`image` is its
    /// AMI id, or its name).
    Recorded {
        version: String,
        image: String,
        gate: AuditRecord,
    },
}

impl Audited {
    /// The gate's verdict as an error, when it failed.
    pub fn gate_failure(&self) -> Option<AuditUseCaseError> {
        let record = match self {
            Audited::Scanned { record, .. } => record,
            Audited::Recorded { gate, .. } => gate,
        };
        (!record.problems.is_empty())
            .then(|| AuditUseCaseError::Audit(AuditError::Gate(Box::new(record.clone()))))
    }
}

/// Why an audit did not run (or its gate failed).
#[derive(Debug, thiserror::Error)]
pub enum AuditUseCaseError {
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("the recipe `{}` is not a file", .0.display())]
    RecipeNotFile(PathBuf),
    #[error("invalid recipe `{}`", .0.display())]
    Recipe(PathBuf, Box<Report>),
    #[error("the recipe `{}` has no `audit:` section, so it names no data stream", .0.display())]
    NoAuditSection(PathBuf),
    #[error("no SCAP data stream to scan with")]
    NoDatastream,
    #[error("{message}")]
    NoGate { message: String, image: String },
    #[error("version {version} of `{name}` has no OCI image to scan: it was built as an AMI")]
    NoImage { version: String, name: String },
    #[error(transparent)]
    Unpack(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Audit(AuditError),
}

impl Diagnose for AuditUseCaseError {
    fn hint(&self) -> Option<String> {
        match self {
            AuditUseCaseError::RecipeNotFile(_) => Some(
                "give the recipe with `--recipe FILE`, or the gate's settings with `--datastream`, `--profile` and `--target`".into(),
            ),
            AuditUseCaseError::NoAuditSection(_) | AuditUseCaseError::NoDatastream => Some(
                "give one with `--datastream FILE` (and `--profile`, `--target`), or add an `audit:` section to the recipe".into(),
            ),
            AuditUseCaseError::NoGate { .. } => Some(
                "add `audit:` to the recipe and build a new version: the gate then runs on the builder".into(),
            ),
            AuditUseCaseError::NoImage { .. } => {
                Some("its build record holds the gate's result (`bake manifest`)".into())
            }
            AuditUseCaseError::Audit(e) => e.hint(),
            _ => None,
        }
    }

    fn exit_status(&self) -> ExitStatus {
        match self {
            AuditUseCaseError::Context(_) | AuditUseCaseError::Unpack(_) => {
                ExitStatus::Infrastructure
            }
            AuditUseCaseError::Audit(AuditError::NoProfile { .. } | AuditError::Gate(_)) => {
                ExitStatus::RecipeOrUsage
            }
            AuditUseCaseError::Audit(_) => ExitStatus::Infrastructure,
            _ => ExitStatus::RecipeOrUsage,
        }
    }

    fn reports(&self) -> Vec<Report> {
        match self {
            AuditUseCaseError::Recipe(_, report) => vec![(**report).clone()],
            _ => vec![Report::from_error(self).with_hint(self.hint())],
        }
    }
}

/// Scans what `options` names with its gate (or returns the gate's recorded result, for an
/// instance-built version).
pub fn audit(ctx: &Context, options: &AuditOptions) -> Result<Audited, AuditUseCaseError> {
    let store = ctx.store()?;
    let record = &options.record;
    if let Some(record) = record
        && let Artifact::InstanceAmi { ami } = &record.artifact
    {
        let image = ami
            .regions
            .first()
            .map_or_else(|| ami.image_name.clone(), |r| r.image_id.clone());
        let Some(gate) = &record.audit else {
            return Err(AuditUseCaseError::NoGate {
                message: format!(
                    "version {} of `{}` was built on a builder instance without a compliance gate, and its root is in AMI {image}: bake cannot scan it here",
                    record.version, record.name
                ),
                image,
            });
        };
        return Ok(Audited::Recorded {
            version: record.version.to_string(),
            image,
            gate: gate.clone(),
        });
    }
    // The recipe whose gate this is.
    let recipe_file: Option<PathBuf> = match (&options.recipe, record) {
        (Some(file), _) => Some(file.clone()),
        (None, Some(_)) if Path::new(&options.what).is_file() => Some(PathBuf::from(&options.what)),
        (None, Some(record)) if !options.overrides_all() => Some(PathBuf::from(&record.recipe)),
        _ => None,
    };
    let recipe = match &recipe_file {
        Some(file) => Some(load_recipe(file, &options.vars)?),
        None => None,
    };
    let audit = gate_settings(options, recipe_file.as_deref(), recipe.as_ref())?;

    // A version is unpacked into a scratch root, removed afterwards.
    let mut _unpacked = None;
    let root: PathBuf = match record {
        None => PathBuf::from(&options.what),
        Some(record) => {
            let Some(image) = record.image() else {
                return Err(AuditUseCaseError::NoImage {
                    version: record.version.to_string(),
                    name: record.name.clone(),
                });
            };
            let dir = unpack(store, &image.layers).map_err(AuditUseCaseError::Unpack)?;
            let root = dir.path().join("rootfs");
            _unpacked = Some(dir);
            root
        }
    };
    let dirs = AuditDirs {
        cache: store.root().join("cache").join("scap"),
        work: store.root().join("work"),
    };
    let (audit_record, scan) =
        crate::audit::evaluate(&root, &audit, &dirs).map_err(AuditUseCaseError::Audit)?;
    if let Some(record) = record
        && let Some(built) = &record.audit
        && built.datastream_digest != audit_record.datastream_digest
    {
        tracing::warn!(
            "version {} was gated with data stream {}; this scan used {} (`{}`)",
            record.version,
            built.datastream_digest,
            audit_record.datastream_digest,
            audit.datastream.display()
        );
    }
    Ok(Audited::Scanned {
        root,
        record: audit_record,
        scan,
    })
}

fn load_recipe(file: &Path, vars: &VarSources) -> Result<Recipe, AuditUseCaseError> {
    if !file.is_file() {
        return Err(AuditUseCaseError::RecipeNotFile(file.to_path_buf()));
    }
    crate::recipe::load(file, vars).map_err(|e| {
        let report =
            e.0.first()
                .map(|e| e.report())
                .unwrap_or_else(|| Report::new(format!("invalid recipe `{}`", file.display())));
        AuditUseCaseError::Recipe(file.to_path_buf(), Box::new(report))
    })
}

/// The gate of `recipe` (when it has one) with the options' overrides.
fn gate_settings(
    options: &AuditOptions,
    recipe_file: Option<&Path>,
    recipe: Option<&Recipe>,
) -> Result<Audit, AuditUseCaseError> {
    let from_recipe = recipe.and_then(|r| r.audit.clone());
    let mut audit = match from_recipe {
        Some(audit) => audit,
        None => {
            let Some(datastream) = &options.datastream else {
                return Err(match recipe_file {
                    Some(file) => AuditUseCaseError::NoAuditSection(file.to_path_buf()),
                    None => AuditUseCaseError::NoDatastream,
                });
            };
            Audit {
                scanner: Scanner::Openscap,
                datastream: datastream.clone(),
                datastream_path: datastream.display().to_string(),
                profile: full_profile(DEFAULT_PROFILE),
                target: AuditTarget::Machine,
                min_pass_ratio_centi: None,
                max_failures: None,
                exceptions: BTreeMap::new(),
                support_status: false,
            }
        }
    };
    if let Some(datastream) = &options.datastream {
        audit.datastream = datastream.clone();
        audit.datastream_path = datastream.display().to_string();
    }
    if let Some(profile) = options.profile.as_deref().map(full_profile)
        && profile != audit.profile
    {
        // The recipe's thresholds and exceptions are about its own profile.
        audit.min_pass_ratio_centi = None;
        audit.max_failures = None;
        audit.exceptions.clear();
        audit.profile = profile;
    }
    if let Some(target) = options.target {
        audit.target = target;
    }
    Ok(audit)
}

fn full_profile(profile: &str) -> String {
    if profile.starts_with("xccdf_") {
        profile.to_owned()
    } else {
        format!("xccdf_org.ssgproject.content_profile_{profile}")
    }
}

fn unpack(
    store: &Store,
    layers: &[crate::artifact::oci::LayerRef],
) -> Result<tempfile::TempDir, Box<dyn std::error::Error + Send + Sync>> {
    let dir = store.work_dir("audit")?;
    let root = dir.path().join("rootfs");
    fs_err::create_dir(&root)?;
    for layer in layers {
        let blob = store.open_blob(&layer.digest)?;
        crate::build::unpack::unpack_layer(std::io::BufReader::new(blob), &root)?;
    }
    Ok(dir)
}
