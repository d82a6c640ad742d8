//! The OCI build: from a planned recipe to an image in the store.
//!
//! ```text
//! base ──► layers in the store ─┐
//!                               ├─► unpack into a build root (only if a step must run)
//! step 1..n (cached by chain) ──┘    ──► snapshot, run, snapshot, diff ──► layer
//! tests ──► config + manifest ──► index.json + build record
//! ```
//!
//! Every layer is cached under a key that chains the base's identity and every step before it
//! (a step's definition, the digests of the files it reads, the recipe's variable values), so
//! changing the last step reruns only the last step, and a version already in the store runs
//! nothing at all.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::bases::{self, BaseError};
use super::compress::{BlobWriter, CompressError};
use super::layer::{LayerError, LayerOptions, write_layer};
use super::runner::{Runner, RunnerError, StepOutput, StepSpec};
use super::snapshot::{Changes, EntryKind, Excludes, Snapshot, SnapshotError, diff, snapshot};
use super::unpack::{UnpackError, unpack_layer};
use crate::artifact::oci::{self, HistoryEntry, ImageBlobs, ImageSettings, LayerRef};
use crate::id::{Digest, Version};
use crate::plan::hash::canonical_digest;
use crate::plan::{BaseIdentity, Plan};
use crate::recipe::template::{Context, Renderer, Secrets};
use crate::recipe::{Base, Compression, Recipe, RecipeError, Script, Step, Test};
use crate::store::{
    ANNOTATION_RECIPE, ANNOTATION_VERSION, Artifact, BuildRecord, OciImage, Store, StoreError,
};

#[path = "pipeline_engine.rs"]
mod engine_steps;

pub use engine_steps::is_built;

/// Bumped when what a cached layer means changes (tar format, whiteout rules), so old cache
/// entries are not reused.
const LAYER_CACHE_FORMAT: &str = "bake.layer-cache/v1";

/// What a build produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildOutput {
    pub name: String,
    pub version: Version,
    /// The manifest digest.
    pub image_digest: Digest,
    pub config_digest: Digest,
    pub manifest_size: u64,
    pub layers: Vec<LayerRef>,
    /// The version was already in the store: nothing ran.
    pub cached: bool,
    pub steps: Vec<StepReport>,
}

/// How one step went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    pub name: String,
    pub cached: bool,
    /// `None` when the step changed nothing.
    pub layer: Option<String>,
    pub duration_ms: u64,
}

/// The recorded image of `version`, if the store holds a complete build of it (the record and
/// every blob it names): then building it again runs nothing.
pub fn built_image(store: &Store, version: &str) -> Result<Option<BuildOutput>, StoreError> {
    let Some(record) = store.record(version)? else {
        return Ok(None);
    };
    let Some(image) = record.image() else {
        return Ok(None);
    };
    let complete = store.has_blob(&image.image_digest.to_string())
        && store.has_blob(&image.config_digest.to_string())
        && image.layers.iter().all(|l| store.has_blob(&l.digest));
    Ok(complete.then(|| BuildOutput {
        name: record.name.clone(),
        version: record.version.clone(),
        image_digest: image.image_digest.clone(),
        config_digest: image.config_digest.clone(),
        manifest_size: image.manifest_size,
        layers: image.layers.clone(),
        cached: false,
        steps: image.steps.clone(),
    }))
}

/// Settings of one build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub source_date_epoch: u64,
    /// Compression workers; the output does not depend on it.
    pub workers: NonZeroUsize,
    /// Set (by a signal handler) to stop the build at the next step; what it made so far is
    /// removed.
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Boot tests: the QEMU accelerator, over the recipe's choice.
    pub boot_accelerator: Option<crate::ami::boot::Accelerator>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to prepare the base of `{recipe}`")]
    Base {
        recipe: String,
        #[source]
        source: BaseError,
    },
    #[error("base `{0}` cannot be built locally yet")]
    UnsupportedBase(String),
    #[error("base image `{reference}` ({digest}) is not in the store")]
    BaseNotPulled { reference: String, digest: String },
    #[error("base recipe `{path}` ({name} {version}) is not built in this store")]
    BaseNotBuilt {
        path: String,
        name: String,
        version: String,
    },
    #[error("base recipe `{path}` ({name} {version}) made no OCI image to start from")]
    BaseWithoutImage {
        path: String,
        name: String,
        version: String,
    },
    #[error("failed to unpack layer {digest}")]
    Unpack {
        digest: String,
        #[source]
        source: UnpackError,
    },
    #[error("layer {digest} does not match its diff id {expected} (it unpacks to {actual})")]
    DiffId {
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("failed to scan the build root")]
    Snapshot(#[from] SnapshotError),
    #[error("failed to write the layer of step `{step}`")]
    Layer {
        step: String,
        #[source]
        source: LayerError,
    },
    #[error("failed to compress the layer of step `{step}`")]
    Compress {
        step: String,
        #[source]
        source: CompressError,
    },
    #[error(transparent)]
    Step(#[from] RunnerError),
    #[error("failed to copy `{source_path}` into the image at `{destination}`")]
    Copy {
        source_path: String,
        destination: String,
        #[source]
        source: super::runner::CopyError,
    },
    #[error("test `{name}` failed: {reason}")]
    Test { name: String, reason: String },
    #[error(transparent)]
    Render(#[from] RecipeError),
    #[error(transparent)]
    Image(#[from] oci::ImageError),
    #[error("failed to write into the build root `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the recipe has no OCI output to build")]
    NoOciOutput,
    #[error("the build was interrupted")]
    Interrupted,
    #[error(transparent)]
    Engine(Box<super::engine::EngineError>),
    #[error("{0} is not supported with the Docker runner yet")]
    EngineUnsupported(String),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

impl BuildError {
    /// Whether the build stopped because it was asked to (Ctrl-C, SIGTERM).
    pub fn is_interrupted(&self) -> bool {
        matches!(
            self,
            BuildError::Interrupted | BuildError::Step(RunnerError::Interrupted { .. })
        )
    }

    /// Whether the recipe (not the machine) is at fault: a failing step or test.
    pub fn is_recipe_failure(&self) -> bool {
        matches!(
            self,
            BuildError::Step(RunnerError::StepFailed { .. })
                | BuildError::Test { .. }
                | BuildError::Render(_)
                | BuildError::NoOciOutput
                | BuildError::UnsupportedBase(_)
                | BuildError::BaseWithoutImage { .. }
                | BuildError::EngineUnsupported(_)
                | BuildError::Audit(crate::audit::AuditError::Gate(_))
        )
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            BuildError::Base { source, .. } => source.hint(),
            BuildError::Step(e) => e.hint(),
            BuildError::Engine(e) => e.hint(),
            BuildError::EngineUnsupported(_) => {
                Some("build this recipe with the namespace runner (`--runner chroot`, as root)".into())
            }
            BuildError::Audit(e) => e.hint(),
            BuildError::UnsupportedBase(_) => {
                Some("use an image, bootstrap, rootfs or OCI layout base".into())
            }
            BuildError::BaseNotBuilt { path, .. } => Some(format!(
                "`bake build` builds base recipes first; build `{path}` (or every recipe with `bake build --all`)"
            )),
            BuildError::BaseWithoutImage { .. } => Some(
                "a base recipe needs `outputs.oci`: its image is the root the recipes built on it start from".into(),
            ),
            BuildError::BaseNotPulled { .. } => {
                Some("`bake build` pulls registry bases before building; pull it with `bake build`, or check registry access".into())
            }
            _ => None,
        }
    }
}

/// Receives build progress; the CLI draws it.
pub trait BuildReporter: StepOutput {
    fn step_started(&mut self, _name: &str, _cached: bool) {}
    fn step_finished(&mut self, _name: &str, _duration: Duration) {}
    fn message(&mut self, _text: &str) {}
}

/// Everything a build needs besides the recipe.
pub struct Builder<'a> {
    pub store: &'a Store,
    pub runner: &'a dyn Runner,
    pub options: BuildOptions,
}

/// A layer cache entry: the result of one step given everything before it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CachedStep {
    pub(crate) layer: Option<LayerRef>,
    pub(crate) history: HistoryEntry,
}

/// Every layer-cache entry a build of `recipe` as `plan` looks up, in order: the base's (for
/// a base bake turns into a layer itself) and each step's, as (cache kind, key). The keys
/// depend only on the plan, so they are known before anything runs.
pub(crate) fn cache_keys(recipe: &Recipe, plan: &Plan) -> Vec<(&'static str, String)> {
    let sde = plan.source_date_epoch();
    let mut key = base_key(plan, recipe.build.compression, sde);
    let mut keys = Vec::new();
    if matches!(recipe.base, Base::Rootfs { .. } | Base::Bootstrap(_)) {
        keys.push(("bases", key.clone()));
    }
    if recipe.build.squash {
        return keys;
    }
    for provisioner in &recipe.provisioners {
        key = step_key(&key, plan, provisioner);
        keys.push(("steps", key.clone()));
    }
    keys
}

/// The key of `provisioner`'s cache entry after the entry keyed `parent`.
fn step_key(parent: &str, plan: &Plan, provisioner: &crate::recipe::Provisioner) -> String {
    let step_json = serde_json::to_value(provisioner).expect("steps serialize");
    canonical_digest(&json!({
        "parent": parent,
        "step": step_json,
        "variables": plan.inputs.recipe.variables,
        "files": step_files(&plan.inputs.files, provisioner),
    }))
}

impl Builder<'_> {
    /// Builds `recipe`, planned as `plan`, into the store.
    ///
    /// Step output reaches `reporter` with every sensitive value replaced by `***`, and so do
    /// the last lines in step errors.
    pub fn build(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        reporter: &mut dyn BuildReporter,
    ) -> Result<BuildOutput, BuildError> {
        let secrets = recipe.secret_values();
        let mut redacting = Redacting {
            inner: reporter,
            secrets: &secrets,
        };
        self.build_inner(recipe, plan, &mut redacting)
            .map_err(|e| redact_error(e, &secrets))
    }

    /// Runs the recipe's base and provisioners into a root directory and returns it, without
    /// making an OCI image: the first half of an AMI build (`outputs.ami.strategy: snapshot`),
    /// whose root becomes a disk image ([`crate::ami::disk`]).
    ///
    /// Steps are cached exactly as in [`Builder::build`] (same keys, same layers in the store),
    /// so a second call runs nothing and only unpacks the cached layers. The root lives in the
    /// store's work area and moves to the store's trash when the returned value is dropped.
    /// Command tests are not run: they may leave files behind, so run them
    /// ([`Builder::run_command_tests`]) once the root is no longer needed as the image's
    /// content.
    pub fn provision_root(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        reporter: &mut dyn BuildReporter,
    ) -> Result<ProvisionedRoot, BuildError> {
        if self.runner.engine().is_some() {
            return Err(BuildError::EngineUnsupported(
                "an AMI build (a root filesystem on the host)".into(),
            ));
        }
        let secrets = recipe.secret_values();
        let mut redacting = Redacting {
            inner: reporter,
            secrets: &secrets,
        };
        let Provisioned {
            mut layers,
            mut root,
            reports,
            ..
        } = self
            .provision(recipe, plan, &mut redacting)
            .map_err(|e| redact_error(e, &secrets))?;
        self.materialize(&mut root, &recipe.name, &mut layers)?;
        Ok(ProvisionedRoot {
            root: root.expect("materialized"),
            layers: layers.into_resolved()?,
            steps: reports,
        })
    }

    /// Runs the recipe's `command` tests against `root` (as [`Builder::build`] does against
    /// the final root of an OCI image).
    pub fn run_command_tests(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        root: &Path,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(), BuildError> {
        let secrets = recipe.secret_values();
        let mut redacting = Redacting {
            inner: reporter,
            secrets: &secrets,
        };
        let renderer = Renderer::default();
        let context = Context::new(recipe, Some(&plan.version), None, Secrets::Reveal);
        for test in &recipe.tests {
            if matches!(test, Test::Command { .. }) {
                self.check_cancel()?;
                self.run_test(test, root, &renderer, &context, &mut redacting)
                    .map_err(|e| redact_error(e, &secrets))?;
            }
        }
        Ok(())
    }

    fn build_inner(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        reporter: &mut dyn BuildReporter,
    ) -> Result<BuildOutput, BuildError> {
        if let Some(mut output) = built_image(self.store, &plan.version)? {
            output.cached = true;
            for step in &mut output.steps {
                step.cached = true;
            }
            return Ok(output);
        }
        let oci_output = recipe.outputs.oci.as_ref().ok_or(BuildError::NoOciOutput)?;
        let started = std::time::SystemTime::now();
        let clock = Instant::now();
        let compression = recipe.build.compression;
        let engine = self.runner.engine();
        let Provisioned {
            mut layers,
            history,
            mut root,
            reports,
            compressor,
        } = match engine {
            // Runs the command tests too: nothing of the state is on the host.
            Some(engine) => self.provision_in_engine(engine, recipe, plan, reporter)?,
            None => self.provision(recipe, plan, reporter)?,
        };
        let renderer = Renderer::default();
        let context = Context::new(recipe, Some(&plan.version), None, Secrets::Reveal);
        // Tests run against the final root.
        let tests: Vec<&Test> = recipe
            .tests
            .iter()
            .filter(|t| matches!(t, Test::Command { .. }))
            .collect();
        if !tests.is_empty() && engine.is_none() {
            let build_root = self.materialize(&mut root, &recipe.name, &mut layers)?;
            for test in tests {
                self.check_cancel()?;
                self.run_test(test, build_root.path(), &renderer, &context, reporter)?;
            }
        }
        // The compliance gate: the provisioned root is scanned before any image is assembled.
        let audit = match &recipe.audit {
            Some(audit) => {
                self.check_cancel()?;
                let build_root = self.materialize(&mut root, &recipe.name, &mut layers)?;
                Some(self.audit(build_root.path(), audit, reporter)?)
            }
            None => None,
        };
        let discarding = Instant::now();
        drop(root);
        tracing::debug!("build root discarded in {:?}", discarding.elapsed());
        // The base layer may have been compressed beside the steps, tests and gate until now.
        let layers = layers.into_resolved()?;

        let settings = image_settings(recipe, oci_output, plan, &renderer)?;
        let annotations = BTreeMap::from([
            (ANNOTATION_VERSION.to_owned(), plan.version.to_string()),
            (
                oci_spec::image::ANNOTATION_TITLE.to_owned(),
                recipe.name.clone(),
            ),
            (
                oci_spec::image::ANNOTATION_VERSION.to_owned(),
                plan.version_short().to_owned(),
            ),
        ]);
        let ImageBlobs {
            config,
            config_digest,
            manifest,
            manifest_digest,
        } = oci::assemble(
            &settings,
            &layers,
            &history,
            self.options.source_date_epoch,
            &annotations,
        )?;
        self.store.put_blob(&config)?;
        self.store.put_blob(&manifest)?;
        let index_annotations = BTreeMap::from([
            (
                oci_spec::image::ANNOTATION_REF_NAME.to_owned(),
                format!("{}:{}", recipe.name, plan.version_short()),
            ),
            (ANNOTATION_VERSION.to_owned(), plan.version.to_string()),
            (ANNOTATION_RECIPE.to_owned(), recipe.name.clone()),
        ]);
        self.store.add_to_index(oci::descriptor(
            oci_spec::image::MediaType::ImageManifest,
            &manifest_digest,
            manifest.len() as u64,
            Some(index_annotations),
        )?)?;
        let parse = |text: String| {
            text.parse::<Digest>()
                .map_err(|_| StoreError::BadDigest(text))
        };
        let output = BuildOutput {
            name: recipe.name.clone(),
            version: plan.version.clone(),
            image_digest: parse(manifest_digest)?,
            config_digest: parse(config_digest)?,
            manifest_size: manifest.len() as u64,
            layers,
            cached: false,
            steps: reports,
        };
        let image = OciImage {
            image_digest: output.image_digest.clone(),
            config_digest: output.config_digest.clone(),
            manifest_size: output.manifest_size,
            layers: output.layers.clone(),
            steps: output.steps.clone(),
            compressor: if compressor.is_empty() {
                describe_compression(compression)
            } else {
                compressor
            },
        };
        let mut record = BuildRecord::new(
            &recipe.name,
            &plan.version,
            &plan.recipe,
            &plan.inputs,
            Artifact::OciImage { image },
        );
        record.started = humantime::format_rfc3339_seconds(started).to_string();
        record.duration_ms = clock.elapsed().as_millis() as u64;
        record.audit = audit;
        self.store.put_record(&record)?;
        tracing::debug!("build recorded after {:?}", clock.elapsed());
        Ok(output)
    }

    /// Runs the compliance gate of `audit` on a provisioned root (an image's or a disk's),
    /// reporting the score.
    pub fn audit(
        &self,
        root: &Path,
        audit: &crate::recipe::Audit,
        reporter: &mut dyn BuildReporter,
    ) -> Result<crate::audit::AuditRecord, BuildError> {
        reporter.message(&format!("audit: scanning with profile `{}`", audit.profile));
        let record = gate(self.store, root, audit)?;
        reporter.message(&format!(
            "audit: {:.2}% of {} rules pass",
            record.score_centi as f64 / 100.0,
            record.passed + record.failed
        ));
        Ok(record)
    }

    /// Runs the base and every provisioning step (each cached by its chain key), leaving the
    /// build root materialized only if a step had to run.
    fn provision(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        reporter: &mut dyn BuildReporter,
    ) -> Result<Provisioned, BuildError> {
        // Build roots earlier builds left in the trash are deleted beside this one, at idle
        // priority; whatever is left when the process ends waits for the next build.
        drop(self.store.reap_trash_in_background());
        let compression = recipe.build.compression;
        let BaseLayers {
            mut layers,
            history,
            root: base_root,
            tree: base_tree,
        } = self.base(recipe, plan, reporter)?;

        // Which steps are cached, given everything before them.
        let mut chain = StepChain::new(self.store, plan, recipe, &self.options, history);
        let renderer = Renderer::default();
        // Scripts and their environment see secrets; nothing that lands in a layer does.
        let context = Context::new(recipe, Some(&plan.version), None, Secrets::Reveal);
        let public = Context::new(recipe, Some(&plan.version), None, Secrets::Redact);
        let contexts = Contexts {
            secret: &context,
            public: &public,
        };
        let layer_options = LayerOptions {
            source_date_epoch: Some(self.options.source_date_epoch),
        };
        let mut root: Option<BuildRoot> = base_root;
        let mut compressor = String::new();
        let squash = recipe.build.squash;
        let mut squash_before: Option<Snapshot> = None;
        // The snapshot of the build root as it is now, when one was taken since it last
        // changed: the base's scan, then each step's "after", which is the next step's
        // "before" (nothing touches the root between two steps).
        let mut current_tree: Option<Snapshot> = base_tree;

        for (index, provisioner) in recipe.provisioners.iter().enumerate() {
            self.check_cancel()?;
            let step_clock = Instant::now();
            if let Some(cached) = chain.advance(provisioner)? {
                let layer = chain.reuse(&provisioner.name, cached, reporter);
                if let (Some(root), Some(layer)) = (&root, &layer) {
                    root.apply(self.store, layer)?;
                    current_tree = None;
                }
                layers.extend(layer);
                continue;
            }
            // A step must run: materialize the root (base + every layer so far) once.
            let build_root = self.materialize(&mut root, &recipe.name, &mut layers)?;
            reporter.step_started(&provisioner.name, false);
            // A squashed build diffs its one layer against the root before its first step.
            let mut before = match (&squash_before, current_tree.take()) {
                (Some(first), _) => first.clone(),
                (None, Some(tree)) => tree,
                (None, None) => snapshot(build_root.path(), &Excludes::new())?,
            };
            // The content of every file as it is now, for the files the step rewrites: only
            // what changed since the last step's diff is read (nothing for a squashed build's
            // later steps, whose "before" is the first one's).
            let hashed = before.hash_files()?;
            tracing::debug!(
                "step `{}`: {hashed} bytes hashed before it after {:?}",
                provisioner.name,
                step_clock.elapsed()
            );
            if squash && squash_before.is_none() {
                squash_before = Some(before.clone());
            }
            self.run_step(
                recipe,
                provisioner,
                build_root.path(),
                &renderer,
                &contexts,
                reporter,
            )?;
            if squash && index + 1 < recipe.provisioners.len() {
                chain.folded(&provisioner.name, step_clock, reporter);
                continue;
            }
            tracing::debug!(
                "step `{}` ran after {:?}",
                provisioner.name,
                step_clock.elapsed()
            );
            let mut after = snapshot(build_root.path(), &Excludes::new())?;
            let changes = diff(&before, &mut after, &layer_options)?;
            current_tree = Some(after);
            tracing::debug!(
                "step `{}` diffed after {:?}",
                provisioner.name,
                step_clock.elapsed()
            );
            let created_by = if squash {
                "bake: all steps (squashed)".to_owned()
            } else {
                provisioner.name.clone()
            };
            let layer = if changes.is_empty() {
                None
            } else {
                let (layer, used) =
                    self.write_layer(build_root.path(), &changes, compression, &provisioner.name)?;
                compressor = used;
                Some(layer)
            };
            chain.ran(
                &provisioner.name,
                created_by,
                layer.as_ref(),
                step_clock,
                reporter,
            )?;
            layers.extend(layer);
        }
        Ok(Provisioned {
            layers,
            history: chain.history,
            root,
            reports: chain.reports,
            compressor,
        })
    }

    /// The build root, made from `layers` the first time it is needed (waiting for the base
    /// layer if it is still being compressed).
    fn materialize<'r>(
        &self,
        root: &'r mut Option<BuildRoot>,
        name: &str,
        layers: &mut Layers,
    ) -> Result<&'r BuildRoot, BuildError> {
        if root.is_none() {
            let fresh = BuildRoot::new(self.store, name)?;
            for layer in layers.resolved()? {
                fresh.apply(self.store, layer)?;
            }
            *root = Some(fresh);
        }
        Ok(root.as_ref().expect("just made"))
    }

    fn check_cancel(&self) -> Result<(), BuildError> {
        if self
            .options
            .cancel
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            Err(BuildError::Interrupted)
        } else {
            Ok(())
        }
    }

    fn write_layer(
        &self,
        root: &Path,
        changes: &Changes,
        compression: Compression,
        step: &str,
    ) -> Result<(LayerRef, String), BuildError> {
        let options = LayerOptions {
            source_date_epoch: Some(self.options.source_date_epoch),
        };
        store_layer(
            self.store,
            self.options.workers,
            compression,
            step,
            |writer| {
                write_layer(root, changes, &options, writer)
                    .map(|_| ())
                    .map_err(|source| BuildError::Layer {
                        step: step.to_owned(),
                        source,
                    })
            },
        )
    }

    /// The base's layers in the store, making them if needed.
    fn base(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        reporter: &mut dyn BuildReporter,
    ) -> Result<BaseLayers, BuildError> {
        let base_error = |source| BuildError::Base {
            recipe: recipe.name.clone(),
            source,
        };
        let identity = &plan.inputs.base;
        let key = base_key(
            plan,
            recipe.build.compression,
            self.options.source_date_epoch,
        );
        match &recipe.base {
            Base::Scratch => Ok(BaseLayers::default()),
            Base::OciLayout { .. } | Base::Image { .. } | Base::Recipe { .. } => {
                let digest = match (&recipe.base, identity) {
                    // The parent's image, which its build left in the store.
                    (
                        Base::Recipe { relative_path, .. },
                        BaseIdentity::Recipe { name, version },
                    ) => parent_image(self.store, relative_path, name, version)?,
                    _ => identity
                        .digest()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                };
                let digest = digest.as_str();
                // A registry base was pulled into the store (which is an OCI layout) before
                // the build: `bake build` pulls it, and the plan pinned its digest.
                let path = match &recipe.base {
                    Base::OciLayout { path, .. } => path.clone(),
                    Base::Image { reference } => {
                        if !self.store.has_blob(digest) {
                            return Err(BuildError::BaseNotPulled {
                                reference: reference.clone(),
                                digest: digest.to_owned(),
                            });
                        }
                        self.store.root().to_path_buf()
                    }
                    Base::Recipe { .. } => self.store.root().to_path_buf(),
                    _ => unreachable!("matched above"),
                };
                let path = &path;
                let architecture = recipe
                    .outputs
                    .oci
                    .as_ref()
                    .map(|o| o.architecture)
                    .or_else(|| recipe.outputs.ami.as_ref().map(|a| a.architecture))
                    .map_or("amd64", |a| a.oci());
                let (manifest, config) =
                    bases::layout_image(path, digest, architecture).map_err(base_error)?;
                let mut layers = Vec::new();
                for (descriptor, diff_id) in
                    manifest.layers().iter().zip(config.rootfs().diff_ids())
                {
                    let digest = descriptor.digest().to_string();
                    if !self.store.has_blob(&digest) {
                        let source = path
                            .join("blobs/sha256")
                            .join(crate::store::digest_hex(&digest)?);
                        self.import_verified(&source, &digest)?;
                    }
                    layers.push(LayerRef {
                        digest,
                        diff_id: diff_id.clone(),
                        size: descriptor.size(),
                        media_type: oci_layer_media_type(descriptor.media_type().as_ref()),
                    });
                }
                let history = config
                    .history()
                    .iter()
                    .flatten()
                    .map(|h| HistoryEntry {
                        created_by: h.created_by().clone().unwrap_or_default(),
                        comment: h.comment().clone(),
                        empty_layer: h.empty_layer().unwrap_or(false),
                    })
                    .collect();
                Ok(BaseLayers {
                    layers: layers.into(),
                    history,
                    root: None,
                    tree: None,
                })
            }
            Base::Rootfs {
                path,
                relative_path,
            } => {
                let created_by = format!("bake: rootfs {relative_path}");
                self.tarball_base(
                    &key,
                    &created_by,
                    recipe.build.compression,
                    reporter,
                    // The tarball is read where it is.
                    |_| Ok(path.clone()),
                )
            }
            Base::Bootstrap(bootstrap) => {
                let (arch, pinned) = match identity {
                    crate::plan::BaseIdentity::Bootstrap {
                        architecture,
                        archives,
                        ..
                    } => (architecture.clone(), archives.clone()),
                    _ => ("amd64".to_owned(), Vec::new()),
                };
                let created_by = format!(
                    "bake: mmdebstrap --variant={} {} ({} packages)",
                    bootstrap.variant,
                    bootstrap.suite,
                    bootstrap.packages.len()
                );
                let sde = self.options.source_date_epoch;
                self.tarball_base(
                    &key,
                    &created_by,
                    recipe.build.compression,
                    reporter,
                    |tar: &Path| {
                        bases::bootstrap(bootstrap, &pinned, &arch, sde, tar)
                            .map(|()| tar.to_path_buf())
                            .map_err(base_error)
                    },
                )
            }
            Base::Ami(_) => Err(BuildError::UnsupportedBase("source AMI".into())),
        }
    }

    /// A base made from a tarball: produced once by `make`, unpacked, and stored as one
    /// deterministic layer cached under `key`.
    fn tarball_base(
        &self,
        key: &str,
        created_by: &str,
        compression: Compression,
        reporter: &mut dyn BuildReporter,
        make: impl FnOnce(&Path) -> Result<PathBuf, BuildError>,
    ) -> Result<BaseLayers, BuildError> {
        if let Some(cached) = self.store.cached::<CachedStep>("bases", key)?
            && cached
                .layer
                .as_ref()
                .is_none_or(|l| self.store.has_blob(&l.digest))
        {
            return Ok(BaseLayers {
                layers: cached.layer.into_iter().collect::<Vec<_>>().into(),
                history: vec![cached.history],
                root: None,
                tree: None,
            });
        }
        reporter.message(&format!("preparing base: {created_by}"));
        let clock = Instant::now();
        let work = self.store.work_dir("base")?;
        let tar = make(&work.path().join("base.tar"))?;
        let build_root = BuildRoot::new(self.store, "base-root")?;
        let root = build_root.path();
        let file = fs_err::File::open(&tar).map_err(|source| BuildError::Io {
            path: tar.clone(),
            source,
        })?;
        let size = file.metadata().map(|m| m.len()).ok();
        let file = crate::progress::Reading::new(
            file,
            crate::progress::Task::new("base unpack", size, crate::progress::Unit::Bytes),
        );
        // A large buffer keeps the unpacker's small reads off the syscall path.
        unpack_layer(std::io::BufReader::with_capacity(1 << 20, file), root).map_err(|source| {
            BuildError::Unpack {
                digest: created_by.to_owned(),
                source,
            }
        })?;
        discard(self.store, work);
        tracing::debug!("base unpacked in {:?}", clock.elapsed());
        let tree = snapshot(root, &Excludes::new())?;
        tracing::debug!("base scanned in {:?}", clock.elapsed());
        let history = HistoryEntry {
            created_by: created_by.to_owned(),
            comment: Some("bake".into()),
            empty_layer: false,
        };
        let changes = Changes::whole_tree(&tree);
        let file_bytes: u64 = tree
            .entries
            .values()
            .filter(|m| m.kind == EntryKind::File)
            .map(|m| m.size)
            .sum();
        let layers = if file_bytes <= OVERLAP_BASE_BYTES {
            // The tar is made now, before any step can change the root (reading files is
            // quick); compressing it, the slow part, runs beside the first step. The bytes
            // are the same as compressing while reading.
            let mut tar = Vec::with_capacity(
                usize::try_from(file_bytes).unwrap_or(0) + tree.entries.len() * 1024,
            );
            let options = LayerOptions {
                source_date_epoch: Some(self.options.source_date_epoch),
            };
            write_layer(root, &changes, &options, &mut tar).map_err(|source| {
                BuildError::Layer {
                    step: created_by.to_owned(),
                    source,
                }
            })?;
            tracing::debug!("base tar read in {:?}", clock.elapsed());
            let store = self.store.clone();
            let workers = self.options.workers;
            let step = created_by.to_owned();
            let key = key.to_owned();
            let history = history.clone();
            let cancel = self.options.cancel.clone();
            let handle = std::thread::spawn(move || {
                let (layer, _) = store_layer(&store, workers, compression, &step, |writer| {
                    // In pieces: an interrupted build waits for this thread, not for the base.
                    for piece in tar.chunks(BASE_PIECE_BYTES) {
                        if cancel.load(std::sync::atomic::Ordering::SeqCst) {
                            return Err(BuildError::Interrupted);
                        }
                        std::io::Write::write_all(writer, piece).map_err(|source| {
                            BuildError::Compress {
                                step: step.clone(),
                                source: CompressError::Write(source),
                            }
                        })?;
                    }
                    Ok(())
                })?;
                drop(tar);
                // Cached here, not by the build: a build whose step fails still keeps its base.
                cache_base(&store, &key, &layer, &history)?;
                tracing::debug!("base layer written in {:?}", clock.elapsed());
                Ok(layer)
            });
            Layers {
                pending_base: Some(PendingLayer(Some(handle))),
                done: Vec::new(),
            }
        } else {
            let (layer, _) = self.write_layer(root, &changes, compression, created_by)?;
            tracing::debug!("base layer written in {:?}", clock.elapsed());
            cache_base(self.store, key, &layer, &history)?;
            vec![layer].into()
        };
        Ok(BaseLayers {
            layers,
            history: vec![history],
            // The root just scanned is exactly the base: the first step runs on it instead of
            // unpacking the new layer again.
            root: Some(build_root),
            tree: Some(tree),
        })
    }

    /// Copies a blob from outside into the store, verifying its digest on the way.
    fn import_verified(&self, source: &Path, digest: &str) -> Result<(), BuildError> {
        use sha2::Digest as _;
        let mut input = fs_err::File::open(source).map_err(|e| BuildError::Io {
            path: source.to_path_buf(),
            source: e,
        })?;
        let mut file = self.store.temp_file()?;
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut input, &mut buffer).map_err(|e| BuildError::Io {
                path: source.to_path_buf(),
                source: e,
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            std::io::Write::write_all(&mut file, &buffer[..n]).map_err(|e| BuildError::Io {
                path: file.path().to_path_buf(),
                source: e,
            })?;
        }
        let actual = crate::id::Digest::from_hasher(hasher).to_string();
        if actual != digest {
            return Err(StoreError::DigestMismatch {
                expected: digest.to_owned(),
                actual,
            }
            .into());
        }
        self.store.commit_blob(file, digest)?;
        Ok(())
    }

    fn run_step(
        &self,
        recipe: &Recipe,
        provisioner: &crate::recipe::Provisioner,
        root: &Path,
        renderer: &Renderer,
        contexts: &Contexts<'_>,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(), BuildError> {
        let context = contexts.secret;
        match &provisioner.step {
            Step::File(file) => {
                let destination = renderer.render(&file.destination, contexts.public)?;
                let options = super::runner::CopyOptions {
                    mode: file.mode,
                    owner: file.owner.unwrap_or((0, 0)),
                    parent_owner: (0, 0),
                };
                // Templated sources are rendered into a private staging copy first; the copy
                // into the root then treats them like any other file.
                let staging = if file.template {
                    Some(self.render_sources(file, renderer, contexts.public)?)
                } else {
                    None
                };
                let source = match &staging {
                    Some((_, path)) => path.clone(),
                    None => file.source.clone(),
                };
                super::runner::copy_into_root(root, &source, &destination, &options)
                    .map(|_| ())
                    .map_err(|source| BuildError::Copy {
                        source_path: file.relative_source.clone(),
                        destination,
                        source,
                    })
            }
            Step::Shell(shell) => {
                let script = match &shell.script {
                    Script::Inline(template) => renderer.render(template, context)?,
                    Script::File {
                        template: Some(template),
                        ..
                    } => renderer.render(template, context)?,
                    Script::File {
                        path,
                        template: None,
                        ..
                    } => fs_err::read_to_string(path).map_err(|source| BuildError::Io {
                        path: path.clone(),
                        source,
                    })?,
                };
                let mut spec = StepSpec::new(root, &provisioner.name, script, shell.timeout);
                spec.env = shell
                    .env
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), renderer.render(t, context)?)))
                    .collect::<Result<_, RecipeError>>()?;
                spec.workdir.clone_from(&shell.workdir);
                spec.user.clone_from(&shell.user);
                spec.network = shell.network;
                spec.hostname = recipe.name.clone();
                self.runner.run(&spec, reporter)?;
                Ok(())
            }
            Step::Hardening(hardening) => {
                let flavour = crate::plan::hardening_flavour(recipe, hardening);
                let script = crate::build::hardening::script(
                    &hardening.profile,
                    flavour,
                    &hardening.exclude,
                )
                .ok_or_else(|| {
                    BuildError::UnsupportedBase(format!("hardening profile {}", hardening.profile))
                })?;
                let mut spec = StepSpec::new(
                    root,
                    &provisioner.name,
                    script,
                    Duration::from_secs(30 * 60),
                );
                spec.hostname = recipe.name.clone();
                self.runner.run(&spec, reporter)?;
                Ok(())
            }
        }
    }

    /// Renders a templated `file` source into a staging directory with the same layout and
    /// modes; returns the directory (removed on drop) and the path to copy from.
    fn render_sources(
        &self,
        file: &crate::recipe::FileStep,
        renderer: &Renderer,
        context: &Context,
    ) -> Result<(tempfile::TempDir, PathBuf), BuildError> {
        use std::os::unix::fs::PermissionsExt;
        let staging = self.store.work_dir("render")?;
        let name = file
            .source
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("source"));
        let top = staging.path().join(&name);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| BuildError::Io { path, source }
        };
        if file.source.is_dir() {
            // Directories first (with their modes), then the rendered files.
            for entry in walkdir::WalkDir::new(&file.source)
                .follow_links(false)
                .sort_by_file_name()
            {
                let entry = entry.map_err(|e| BuildError::Io {
                    path: file.source.clone(),
                    source: e
                        .into_io_error()
                        .unwrap_or_else(|| std::io::Error::other("walk")),
                })?;
                let relative = entry
                    .path()
                    .strip_prefix(&file.source)
                    .unwrap_or(Path::new(""));
                let target = top.join(relative);
                let meta = fs_err::symlink_metadata(entry.path()).map_err(io(entry.path()))?;
                if meta.is_dir() {
                    fs_err::create_dir_all(&target).map_err(io(&target))?;
                } else if meta.file_type().is_symlink() {
                    let link = fs_err::read_link(entry.path()).map_err(io(entry.path()))?;
                    std::os::unix::fs::symlink(link, &target).map_err(io(&target))?;
                }
            }
        }
        for (relative, template) in &file.templates {
            let target = if relative.as_os_str().is_empty() {
                top.clone()
            } else {
                top.join(relative)
            };
            let original = if relative.as_os_str().is_empty() {
                file.source.clone()
            } else {
                file.source.join(relative)
            };
            let rendered = renderer.render(template, context)?;
            fs_err::write(&target, rendered).map_err(io(&target))?;
            let mode = fs_err::metadata(&original)
                .map_err(io(&original))?
                .permissions()
                .mode();
            fs_err::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                .map_err(io(&target))?;
        }
        Ok((staging, top))
    }

    fn run_test(
        &self,
        test: &Test,
        root: &Path,
        renderer: &Renderer,
        context: &Context,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(), BuildError> {
        let Test::Command {
            name,
            run,
            exit_code,
            stdout_contains,
            user,
            network,
            timeout,
        } = test
        else {
            return Ok(());
        };
        reporter.step_started(name, false);
        // Tests must not change the image: run them on a snapshot-checked root and fail if
        // they leave changes behind would be stricter; here the root is discarded afterwards.
        let mut spec = StepSpec::new(root, name, renderer.render(run, context)?, *timeout);
        spec.user.clone_from(user);
        spec.network = *network;
        spec.expected_exit_code = *exit_code;
        let mut lines: Vec<super::runner::OutputLine> = Vec::new();
        let clock = Instant::now();
        {
            let mut tee = Tee {
                lines: &mut lines,
                reporter: &mut *reporter,
            };
            self.runner.run(&spec, &mut tee)?;
        }
        if let Some(expected) = stdout_contains {
            let expected = renderer.render(expected, context)?;
            let stdout: String = lines
                .iter()
                .filter(|l| l.stream == super::runner::Stream::Stdout)
                .map(|l| format!("{}\n", l.text))
                .collect();
            if !stdout.contains(&expected) {
                return Err(BuildError::Test {
                    name: name.clone(),
                    reason: format!("its output does not contain `{expected}`"),
                });
            }
        }
        reporter.step_finished(name, clock.elapsed());
        Ok(())
    }
}

/// Scrubs step output in errors (a failing step's last lines, a test's reason) of sensitive
/// values.
fn redact_error(mut error: BuildError, secrets: &[String]) -> BuildError {
    match &mut error {
        BuildError::Step(runner) => {
            for line in runner.last_lines_mut() {
                *line = crate::recipe::redact(line, secrets);
            }
        }
        BuildError::Test { reason, .. } => *reason = crate::recipe::redact(reason, secrets),
        _ => {}
    }
    error
}

/// Passes progress on with sensitive values replaced by `***`: a script that echoes a secret
/// must not put it in CI logs.
struct Redacting<'a> {
    inner: &'a mut dyn BuildReporter,
    secrets: &'a [String],
}

impl StepOutput for Redacting<'_> {
    fn line(&mut self, step: &str, stream: super::runner::Stream, line: &str) {
        if self.secrets.is_empty() {
            self.inner.line(step, stream, line);
        } else {
            self.inner
                .line(step, stream, &crate::recipe::redact(line, self.secrets));
        }
    }
}

impl BuildReporter for Redacting<'_> {
    fn step_started(&mut self, name: &str, cached: bool) {
        self.inner.step_started(name, cached);
    }
    fn step_finished(&mut self, name: &str, duration: Duration) {
        self.inner.step_finished(name, duration);
    }
    fn message(&mut self, text: &str) {
        self.inner.message(text);
    }
}

/// The two ways templates are rendered during a build.
struct Contexts<'a> {
    /// For scripts and their environment, which run but are not stored.
    secret: &'a Context,
    /// For anything written into the image (file contents, paths): sensitive values redacted.
    public: &'a Context,
}

struct Tee<'a> {
    lines: &'a mut Vec<super::runner::OutputLine>,
    reporter: &'a mut dyn BuildReporter,
}

impl StepOutput for Tee<'_> {
    fn line(&mut self, step: &str, stream: super::runner::Stream, line: &str) {
        self.lines.line(step, stream, line);
        self.reporter.line(step, stream, line);
    }
}

/// A recipe's root filesystem after its base and provisioners, in the store's work area
/// (moved to the store's trash on drop).
pub struct ProvisionedRoot {
    root: BuildRoot,
    /// The layers the root is made of, base first.
    pub layers: Vec<LayerRef>,
    pub steps: Vec<StepReport>,
}

impl ProvisionedRoot {
    pub fn path(&self) -> &Path {
        self.root.path()
    }
}

impl std::fmt::Debug for ProvisionedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisionedRoot")
            .field("path", &self.path())
            .field("layers", &self.layers.len())
            .finish()
    }
}

/// The base and the provisioning steps, done.
struct Provisioned {
    layers: Layers,
    history: Vec<HistoryEntry>,
    /// The build root, if a step had to run (so it is already materialized).
    root: Option<BuildRoot>,
    reports: Vec<StepReport>,
    /// The compressor string of the last layer written, empty if none was.
    compressor: String,
}

#[derive(Default)]
struct BaseLayers {
    layers: Layers,
    history: Vec<HistoryEntry>,
    /// The base, already unpacked, when making its layer required unpacking it.
    root: Option<BuildRoot>,
    /// The snapshot of `root`, taken to make the base layer.
    tree: Option<Snapshot>,
}

/// A build root in the store's work area, moved to the store's trash when dropped (deleting
/// it is left to a background reap, off the build's critical path: see [`Store::discard`]).
struct BuildRoot {
    store: Store,
    /// Discarded, with the root, on drop.
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
}

impl Drop for BuildRoot {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            discard(&self.store, dir);
        }
    }
}

impl BuildRoot {
    fn new(store: &Store, name: &str) -> Result<Self, BuildError> {
        let dir = store.work_dir(name)?;
        let root = dir.path().join("rootfs");
        fs_err::create_dir(&root).map_err(|source| BuildError::Io {
            path: root.clone(),
            source,
        })?;
        Ok(BuildRoot {
            store: store.clone(),
            dir: Some(dir),
            root,
        })
    }

    fn path(&self) -> &Path {
        &self.root
    }

    /// Unpacks a stored layer onto the root, checking it against its diff id.
    fn apply(&self, store: &Store, layer: &LayerRef) -> Result<(), BuildError> {
        let blob = store.open_blob(&layer.digest)?;
        let unpacked =
            unpack_layer(std::io::BufReader::new(blob), self.path()).map_err(|source| {
                BuildError::Unpack {
                    digest: layer.digest.clone(),
                    source,
                }
            })?;
        let actual = unpacked.diff_id.to_string();
        if actual != layer.diff_id {
            return Err(BuildError::DiffId {
                digest: layer.digest.clone(),
                expected: layer.diff_id.clone(),
                actual,
            });
        }
        Ok(())
    }
}

/// Moves a work directory to the store's trash (or deletes it, if it cannot be moved).
fn discard(store: &Store, dir: tempfile::TempDir) {
    let path = dir.keep();
    if let Err(e) = store.discard(&path) {
        tracing::warn!("could not remove `{}`: {e}", path.display());
    }
}

/// The writer a layer's tar goes into: compressed, hashed, and written to a store temp file.
type LayerSink = BlobWriter<std::io::BufWriter<crate::store::Writeback<std::fs::File>>>;

/// Compresses the tar that `fill` writes into a new blob of `store`.
fn store_layer(
    store: &Store,
    workers: NonZeroUsize,
    compression: Compression,
    step: &str,
    fill: impl FnOnce(&mut LayerSink) -> Result<(), BuildError>,
) -> Result<(LayerRef, String), BuildError> {
    let writing = Instant::now();
    let file = store.temp_file()?;
    let handle = file
        .as_file()
        .try_clone()
        .map_err(|source| BuildError::Io {
            path: file.path().to_path_buf(),
            source,
        })?;
    let mut writer = BlobWriter::new(
        std::io::BufWriter::with_capacity(1 << 20, crate::store::Writeback::new(handle)),
        compression,
        workers,
    )
    .map_err(|source| BuildError::Compress {
        step: step.to_owned(),
        source,
    })?
    .with_progress(crate::progress::Task::new(
        format!("layer of {step}"),
        None,
        crate::progress::Unit::Bytes,
    ));
    fill(&mut writer)?;
    let (mut out, blob) = writer.finish().map_err(|source| BuildError::Compress {
        step: step.to_owned(),
        source,
    })?;
    std::io::Write::flush(&mut out).map_err(|source| BuildError::Io {
        path: file.path().to_path_buf(),
        source,
    })?;
    drop(out);
    let digest = blob.digest.to_string();
    tracing::debug!(
        "layer of `{step}` compressed in {:?}: {} bytes from {} ({})",
        writing.elapsed(),
        blob.size,
        blob.uncompressed_size,
        blob.compressor
    );
    let syncing = Instant::now();
    store.commit_blob(file, &digest)?;
    tracing::debug!(
        "layer of `{step}` committed (synced in {:?})",
        syncing.elapsed()
    );
    Ok((
        LayerRef {
            digest,
            diff_id: blob.diff_id.to_string(),
            size: blob.size,
            media_type: blob.media_type.to_string(),
        },
        blob.compressor,
    ))
}

/// A base layer being compressed on a background thread while the first step runs. Dropping
/// it waits for the thread, so a failed or interrupted build never leaves it writing (a failed
/// build still stores and caches its base; an interrupted one stops compressing).
struct PendingLayer(Option<std::thread::JoinHandle<Result<LayerRef, BuildError>>>);

impl PendingLayer {
    fn wait(mut self) -> Result<LayerRef, BuildError> {
        let handle = self.0.take().expect("waited for once");
        handle
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for PendingLayer {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            let _ = handle.join();
        }
    }
}

/// The layers of a build so far, base first. The base's own layer may still be being
/// compressed beside the first step; the list is only read through [`Layers::resolved`], which
/// waits for it, so no root is unpacked and no image assembled without it.
#[derive(Default)]
struct Layers {
    /// The base layer, still being compressed; it goes before `done`.
    pending_base: Option<PendingLayer>,
    done: Vec<LayerRef>,
}

impl Layers {
    /// Every layer, base first, once the base layer is compressed.
    fn resolved(&mut self) -> Result<&[LayerRef], BuildError> {
        if let Some(pending) = self.pending_base.take() {
            let waiting = Instant::now();
            self.done.insert(0, pending.wait()?);
            tracing::debug!("base layer awaited for {:?}", waiting.elapsed());
        }
        Ok(&self.done)
    }

    fn into_resolved(mut self) -> Result<Vec<LayerRef>, BuildError> {
        self.resolved()?;
        Ok(self.done)
    }
}

impl From<Vec<LayerRef>> for Layers {
    fn from(done: Vec<LayerRef>) -> Self {
        Layers {
            pending_base: None,
            done,
        }
    }
}

impl Extend<LayerRef> for Layers {
    fn extend<I: IntoIterator<Item = LayerRef>>(&mut self, layers: I) {
        self.done.extend(layers);
    }
}

/// The cache key of a recipe's base layers, and the start of its steps' key chain.
fn base_key(plan: &Plan, compression: Compression, source_date_epoch: u64) -> String {
    canonical_digest(&json!({
        "format": LAYER_CACHE_FORMAT,
        "base": plan.inputs.base,
        "compression": compression,
        "source_date_epoch": source_date_epoch,
    }))
}

/// The per-step bookkeeping both runners share, so that they cannot drift apart: the chain of
/// cache keys (each step's key covers its definition, the digests of the files it reads, the
/// recipe's variable values and every key before it), the step cache, the history and the
/// reports. Both runners' layers are the same bytes, so they share one cache: a step cached
/// by one runner is not run again by the other.
struct StepChain<'a> {
    store: &'a Store,
    plan: &'a Plan,
    key: String,
    /// Whether steps are looked up in and stored into the cache (not in a squashed build,
    /// whose steps have no layers of their own).
    caching: bool,
    history: Vec<HistoryEntry>,
    reports: Vec<StepReport>,
}

impl<'a> StepChain<'a> {
    /// The chain after the base, whose history is `history`.
    fn new(
        store: &'a Store,
        plan: &'a Plan,
        recipe: &Recipe,
        options: &BuildOptions,
        history: Vec<HistoryEntry>,
    ) -> Self {
        StepChain {
            store,
            plan,
            key: base_key(plan, recipe.build.compression, options.source_date_epoch),
            caching: !recipe.build.squash,
            history,
            reports: Vec::new(),
        }
    }

    /// Moves the chain on to `provisioner` (its key now covers it) and returns its cached
    /// result, if the store holds it whole.
    fn advance(
        &mut self,
        provisioner: &crate::recipe::Provisioner,
    ) -> Result<Option<CachedStep>, StoreError> {
        self.key = step_key(&self.key, self.plan, provisioner);
        if !self.caching {
            return Ok(None);
        }
        let cached = self.store.cached::<CachedStep>("steps", &self.key)?;
        Ok(cached.filter(|cached| {
            cached
                .layer
                .as_ref()
                .is_none_or(|l| self.store.has_blob(&l.digest))
        }))
    }

    /// Records `name` as served from the cache; returns its layer, if it has one.
    fn reuse(
        &mut self,
        name: &str,
        cached: CachedStep,
        reporter: &mut dyn BuildReporter,
    ) -> Option<LayerRef> {
        reporter.step_started(name, true);
        self.reports.push(StepReport {
            name: name.to_owned(),
            cached: true,
            layer: cached.layer.as_ref().map(|l| l.digest.clone()),
            duration_ms: 0,
        });
        self.history.push(cached.history);
        cached.layer
    }

    /// Records `name`, started at `clock`, as run and making `layer` (`None`: it changed
    /// nothing), described in the history as `created_by`; caches the result under the step's
    /// key.
    fn ran(
        &mut self,
        name: &str,
        created_by: String,
        layer: Option<&LayerRef>,
        clock: Instant,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(), StoreError> {
        let entry = HistoryEntry {
            created_by,
            comment: Some("bake".into()),
            empty_layer: layer.is_none(),
        };
        if self.caching {
            self.store.put_cached(
                "steps",
                &self.key,
                &CachedStep {
                    layer: layer.cloned(),
                    history: entry.clone(),
                },
            )?;
        }
        self.history.push(entry);
        self.finished(name, layer, clock, reporter);
        Ok(())
    }

    /// Records `name` of a squashed build as run, its changes left for the last step's layer.
    fn folded(&mut self, name: &str, clock: Instant, reporter: &mut dyn BuildReporter) {
        self.finished(name, None, clock, reporter);
    }

    fn finished(
        &mut self,
        name: &str,
        layer: Option<&LayerRef>,
        clock: Instant,
        reporter: &mut dyn BuildReporter,
    ) {
        reporter.step_finished(name, clock.elapsed());
        self.reports.push(StepReport {
            name: name.to_owned(),
            cached: false,
            layer: layer.map(|l| l.digest.clone()),
            duration_ms: clock.elapsed().as_millis() as u64,
        });
    }
}

/// Records a base's layer in the cache, so the next build of the same base skips making it.
fn cache_base(
    store: &Store,
    key: &str,
    layer: &LayerRef,
    history: &HistoryEntry,
) -> Result<(), StoreError> {
    store.put_cached(
        "bases",
        key,
        &CachedStep {
            layer: Some(layer.clone()),
            history: history.clone(),
        },
    )
}

/// Bases whose files add up to at most this are read into memory as a tar, so that compressing
/// it overlaps with the first step; larger ones are compressed before the step runs.
const OVERLAP_BASE_BYTES: u64 = 1 << 30;

/// How much of an in-memory base tar is compressed between two looks at the cancel flag: a
/// fraction of a second of compression, so Ctrl-C is not held up by the base.
const BASE_PIECE_BYTES: usize = 8 << 20;

/// Runs the compliance gate of `audit` on `root`: one call on a root directory, so every kind
/// of build (OCI layers, AMI disks) gates the same way before it stores anything.
pub fn gate(
    store: &Store,
    root: &Path,
    audit: &crate::recipe::Audit,
) -> Result<crate::audit::AuditRecord, BuildError> {
    let dirs = crate::audit::AuditDirs {
        cache: store.root().join("cache").join("scap"),
        work: store.root().join("work"),
    };
    Ok(crate::audit::audit_root(root, audit, &dirs)?)
}

/// The inputs of one step, from the plan's file list.
fn step_files<'f>(
    files: &'f [crate::plan::hash::FileInput],
    provisioner: &crate::recipe::Provisioner,
) -> Vec<&'f crate::plan::hash::FileInput> {
    let prefix = match &provisioner.step {
        Step::File(f) => Some(f.relative_source.clone()),
        Step::Shell(s) => match &s.script {
            Script::File { relative_path, .. } => Some(relative_path.clone()),
            Script::Inline(_) => None,
        },
        Step::Hardening(_) => None,
    };
    let Some(prefix) = prefix else {
        return Vec::new();
    };
    let prefix = prefix
        .trim_start_matches("./")
        .trim_end_matches('/')
        .to_owned();
    files
        .iter()
        .filter(|f| f.path == prefix || f.path.starts_with(&format!("{prefix}/")))
        .collect()
}

pub fn describe_compression(compression: Compression) -> String {
    match compression {
        Compression::Gzip(level) => format!("gzip/level{level}"),
        Compression::Zstd(level) => format!("zstd/level{level}"),
    }
}

/// The image settings of the recipe's OCI output, rendered with the version (secrets
/// redacted: a secret never belongs in an image config).
fn image_settings(
    recipe: &Recipe,
    oci: &crate::recipe::OciOutput,
    plan: &Plan,
    renderer: &Renderer,
) -> Result<ImageSettings, BuildError> {
    let context = Context::new(recipe, Some(&plan.version), None, Secrets::Redact);
    let list =
        |items: &Option<Vec<crate::recipe::Template>>| -> Result<Option<Vec<String>>, RecipeError> {
            items
                .as_ref()
                .map(|items| items.iter().map(|t| renderer.render(t, &context)).collect())
                .transpose()
        };
    let map = |items: &BTreeMap<String, crate::recipe::Template>| -> Result<BTreeMap<String, String>, RecipeError> {
        items.iter().map(|(k, t)| Ok((k.clone(), renderer.render(t, &context)?))).collect()
    };
    Ok(ImageSettings {
        os: oci.os.clone(),
        architecture: oci.architecture.oci().to_owned(),
        variant: oci.variant.clone(),
        entrypoint: list(&oci.entrypoint)?,
        cmd: list(&oci.cmd)?,
        env: map(&oci.env)?,
        user: oci.user.clone(),
        workdir: oci.workdir.clone(),
        labels: map(&oci.labels)?,
        annotations: map(&oci.annotations)?,
        ports: oci.ports.clone(),
        stop_signal: oci.stop_signal.clone(),
    })
}

/// Docker's layer media types name the same bytes as OCI's; bake's manifests are OCI, so base
/// layers pulled from Docker-format images take the OCI names.
fn oci_layer_media_type(media_type: &str) -> String {
    match media_type {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip".into()
        }
        "application/vnd.docker.image.rootfs.diff.tar" => {
            "application/vnd.oci.image.layer.v1.tar".into()
        }
        other => other.to_owned(),
    }
}

/// The manifest digest of the image the base recipe at `path` built as `version`.
fn parent_image(
    store: &Store,
    path: &str,
    name: &str,
    version: &Version,
) -> Result<String, BuildError> {
    let record = store
        .record(version.as_str())?
        .ok_or_else(|| BuildError::BaseNotBuilt {
            path: path.to_owned(),
            name: name.to_owned(),
            version: version.short().to_owned(),
        })?;
    record
        .image()
        .map(|image| image.image_digest.to_string())
        .ok_or_else(|| BuildError::BaseWithoutImage {
            path: path.to_owned(),
            name: name.to_owned(),
            version: version.short().to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> LayerRef {
        LayerRef {
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            diff_id: format!("sha256:{}", format!("{:02x}", n + 100).repeat(32)),
            size: u64::from(n),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }
    }

    fn pending(result: Result<LayerRef, BuildError>) -> Option<PendingLayer> {
        Some(PendingLayer(Some(std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            result
        }))))
    }

    #[test]
    fn a_pending_base_layer_goes_first_once_compressed() {
        let mut layers = Layers {
            pending_base: pending(Ok(layer(0))),
            done: Vec::new(),
        };
        layers.extend([layer(1)]);
        layers.extend(None);
        layers.extend(Some(layer(2)));
        assert_eq!(
            layers
                .resolved()
                .unwrap()
                .iter()
                .map(|l| l.size)
                .collect::<Vec<_>>(),
            [0, 1, 2]
        );
        // Resolving again waits for nothing and adds nothing.
        assert_eq!(layers.resolved().unwrap().len(), 3);
        let all = layers.into_resolved().unwrap();
        assert_eq!(all.iter().map(|l| l.size).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn a_failed_base_layer_fails_whoever_reads_the_layers() {
        let mut layers = Layers {
            pending_base: pending(Err(BuildError::Interrupted)),
            done: vec![layer(1)],
        };
        assert!(matches!(layers.resolved(), Err(BuildError::Interrupted)));
        let layers = Layers {
            pending_base: pending(Err(BuildError::NoOciOutput)),
            done: Vec::new(),
        };
        assert!(matches!(
            layers.into_resolved(),
            Err(BuildError::NoOciOutput)
        ));
        // Dropped unread, it still waits for its thread.
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = finished.clone();
        drop(Layers {
            pending_base: Some(PendingLayer(Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(layer(3))
            })))),
            done: Vec::new(),
        });
        assert!(finished.load(std::sync::atomic::Ordering::SeqCst));
    }
}
