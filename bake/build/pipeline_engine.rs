//! The build pipeline's steps when the state lives in a Docker Engine (the Docker runner):
//! the same cache keys, layers and history as [`Builder::provision`], with the root filesystem
//! in the engine instead of a directory on the host.
//!
//! ```text
//! base ──► bake's layers ──► image load ──┐
//! step n: container of image n-1 ─► run ─► changes + export ─► bake's tar writer ─► layer n
//!                                   └──────► commit ─► image n (the next step's start only)
//! ```
//!
//! A tarball base (`rootfs`, `bootstrap`) is read into a [`TarTree`] and written by bake's tar
//! writer, never unpacked on the host: an unprivileged user could not create its root-owned
//! files and device nodes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    BuildError, BuildReporter, Builder, CachedStep, Contexts, Provisioned, StepChain, base_key,
    cache_base, store_layer,
};
use crate::artifact::oci::{HistoryEntry, LayerRef};
use crate::build::engine::{Engine, EngineError};
use crate::build::layer::{LayerOptions, write_layer_from};
use crate::build::runner::StepSpec;
use crate::build::snapshot::{Changes, Snapshot, diff};
use crate::build::tree::{Keep, TarTree};
use crate::plan::Plan;
use crate::recipe::template::{Context, Renderer, Secrets};
use crate::recipe::{Base, Compression, Recipe, RecipeError, Script, Step};

/// Whether `version` is built and complete in `store` (a build of it would run nothing): the
/// CLI connects to a Docker Engine only when a step may have to run.
pub fn is_built(store: &crate::store::Store, version: &str) -> bool {
    matches!(super::built_image(store, version), Ok(Some(_)))
}

impl From<EngineError> for BuildError {
    fn from(source: EngineError) -> Self {
        BuildError::Engine(Box::new(source))
    }
}

impl Builder<'_> {
    /// [`Builder::provision`] in `engine`; runs the recipe's `command` tests too, against the
    /// final state, since nothing of it is on the host afterwards.
    pub(super) fn provision_in_engine(
        &self,
        engine: &Engine,
        recipe: &Recipe,
        plan: &Plan,
        reporter: &mut dyn BuildReporter,
    ) -> Result<Provisioned, BuildError> {
        drop(self.store.reap_trash_in_background());
        if recipe.build.squash {
            return Err(BuildError::EngineUnsupported("`build.squash`".into()));
        }
        // The gate scans a root directory on the host, unpacked from the layers afterwards
        // (by `build_inner`), which takes root.
        if recipe.audit.is_some() && !nix::unistd::geteuid().is_root() {
            return Err(BuildError::EngineUnsupported(
                "the compliance gate (`audit:`) without root (it scans the root filesystem on the host)".into(),
            ));
        }
        let compression = recipe.build.compression;
        let (mut layers, history) = match &recipe.base {
            Base::Rootfs { .. } | Base::Bootstrap(_) => {
                self.engine_tarball_base(recipe, plan, reporter)?
            }
            _ => {
                let base = self.base(recipe, plan, reporter)?;
                (base.layers.into_resolved()?, base.history)
            }
        };
        // The same keys, cache and records as `Builder::provision`.
        let mut chain = StepChain::new(self.store, plan, recipe, &self.options, history);
        let renderer = Renderer::default();
        let context = Context::new(recipe, Some(&plan.version), None, Secrets::Reveal);
        let public = Context::new(recipe, Some(&plan.version), None, Secrets::Redact);
        let contexts = Contexts {
            secret: &context,
            public: &public,
        };
        let mut compressor = String::new();
        // The engine's image of `layers`, once loaded, and the top-level names it has.
        let mut state: Option<(String, BTreeSet<String>)> = None;

        for (index, provisioner) in recipe.provisioners.iter().enumerate() {
            self.check_cancel()?;
            let step_clock = Instant::now();
            if let Some(cached) = chain.advance(provisioner)? {
                let layer = chain.reuse(&provisioner.name, cached, reporter);
                if layer.is_some() {
                    state = None;
                }
                layers.extend(layer);
                continue;
            }
            let (image, present) = match state.take() {
                Some(state) => state,
                None => self.engine_state(engine, &layers, &format!("{index}-start"))?,
            };
            reporter.step_started(&provisioner.name, false);
            let work = self.store.work_dir("engine-step")?;
            let outcome = self.engine_step(
                engine,
                recipe,
                provisioner,
                &image,
                &present,
                &renderer,
                &contexts,
                reporter,
                work.path(),
            );
            let (container, before) = match outcome {
                Ok(ran) => ran,
                Err(error) => {
                    super::discard(self.store, work);
                    return Err(error);
                }
            };
            // From here the container exists: it goes whatever happens next.
            let outcome = self.engine_layer(
                engine,
                &container.id,
                &before,
                compression,
                &provisioner.name,
                work.path(),
            );
            let committed = outcome
                .as_ref()
                .ok()
                .map(|_| engine.commit(&container.id, &format!("{index}-done")));
            engine.discard(container);
            super::discard(self.store, work);
            let (layer, used, changes) = outcome?;
            let next_image = committed.expect("committed when the layer was written")?;
            if !used.is_empty() {
                compressor = used;
            }
            let mut now_present = present;
            for path in &changes.deleted {
                if path.components().count() == 1 {
                    now_present.remove(&*path.to_string_lossy());
                }
            }
            for path in &changes.changed {
                if path.components().count() == 1 {
                    now_present.insert(path.to_string_lossy().into_owned());
                }
            }
            state = Some((next_image, now_present));
            chain.ran(
                &provisioner.name,
                provisioner.name.clone(),
                layer.as_ref(),
                step_clock,
                reporter,
            )?;
            layers.extend(layer);
        }

        let tests: Vec<_> = recipe
            .tests
            .iter()
            .filter(|t| matches!(t, crate::recipe::Test::Command { .. }))
            .collect();
        if !tests.is_empty() {
            let (image, _) = match state.take() {
                Some(state) => state,
                None => self.engine_state(engine, &layers, "tests")?,
            };
            engine.set_current(Some(image));
            for test in tests {
                self.check_cancel()?;
                // The root is the engine's current image; the path is not used.
                self.run_test(test, Path::new("/"), &renderer, &context, reporter)?;
            }
            engine.set_current(None);
        }
        Ok(Provisioned {
            layers: layers.into(),
            history: chain.history,
            root: None,
            reports: chain.reports,
            compressor,
        })
    }

    /// Loads `layers` into the engine; returns the image and its top-level names.
    fn engine_state(
        &self,
        engine: &Engine,
        layers: &[LayerRef],
        what: &str,
    ) -> Result<(String, BTreeSet<String>), BuildError> {
        let clock = Instant::now();
        let image = engine.load_layers(self.store, layers, what)?;
        let mut present = BTreeSet::new();
        for layer in layers {
            for (name, added) in crate::build::engine::top_level_entries(self.store, layer)? {
                if added {
                    present.insert(name);
                } else {
                    present.remove(&name);
                }
            }
        }
        tracing::debug!(
            "{} layers loaded into the engine in {:?}",
            layers.len(),
            clock.elapsed()
        );
        Ok((image, present))
    }

    /// Runs one step in a container of `image`; returns the container, kept for its changes.
    #[allow(clippy::too_many_arguments)]
    fn engine_step(
        &self,
        engine: &Engine,
        recipe: &Recipe,
        provisioner: &crate::recipe::Provisioner,
        image: &str,
        present: &BTreeSet<String>,
        renderer: &Renderer,
        contexts: &Contexts<'_>,
        reporter: &mut dyn BuildReporter,
        work: &Path,
    ) -> Result<(crate::build::engine::ContainerStep, Snapshot), BuildError> {
        let context = contexts.secret;
        let spec = match &provisioner.step {
            Step::File(file) => {
                let destination = renderer.render(&file.destination, contexts.public)?;
                let options = crate::build::runner::CopyOptions {
                    mode: file.mode,
                    owner: file.owner.unwrap_or((0, 0)),
                    parent_owner: (0, 0),
                };
                let staging = if file.template {
                    Some(self.render_sources(file, renderer, contexts.public)?)
                } else {
                    None
                };
                let source: PathBuf = match &staging {
                    Some((_, path)) => path.clone(),
                    None => file.source.clone(),
                };
                let id = engine.create_idle(image, &provisioner.name)?;
                let container = crate::build::engine::ContainerStep { id, exit_code: 0 };
                let copied = engine
                    .read_tree(&container.id, work, &Keep::index())
                    .and_then(|before| {
                        engine
                            .copy_into_container(&container.id, &source, &destination, &options)
                            .map(|()| before.snapshot())
                    });
                return match copied {
                    Ok(before) => Ok((container, before)),
                    Err(error) => {
                        engine.discard(container);
                        Err(error.into())
                    }
                };
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
                let mut spec = StepSpec::new("/", &provisioner.name, script, shell.timeout);
                spec.env = shell
                    .env
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), renderer.render(t, context)?)))
                    .collect::<Result<_, RecipeError>>()?;
                spec.workdir.clone_from(&shell.workdir);
                spec.user.clone_from(&shell.user);
                spec.network = shell.network;
                spec.hostname = recipe.name.clone();
                spec
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
                let mut spec =
                    StepSpec::new("/", &provisioner.name, script, Duration::from_secs(30 * 60));
                spec.hostname = recipe.name.clone();
                spec
            }
        };
        let id = engine.create_for(image, &spec)?;
        let before = match engine.read_tree(&id, work, &Keep::index()) {
            Ok(tree) => tree.snapshot(),
            Err(error) => {
                engine.discard(crate::build::engine::ContainerStep { id, exit_code: -1 });
                return Err(error.into());
            }
        };
        let container = engine.run_created(id, &spec, Some(present), reporter)?;
        Ok((container, before))
    }

    /// The layer of what a step changed in `container` since `before` (a read of the same
    /// container before the step), written by bake's tar writer.
    fn engine_layer(
        &self,
        engine: &Engine,
        container: &str,
        before: &Snapshot,
        compression: Compression,
        step: &str,
        work: &Path,
    ) -> Result<(Option<LayerRef>, String, Changes), BuildError> {
        let after = engine.read_tree(container, work, &Keep::all())?;
        let options = LayerOptions {
            source_date_epoch: Some(self.options.source_date_epoch),
        };
        let changes = diff(before, &mut after.snapshot(), &options)?;
        if changes.is_empty() {
            return Ok((None, String::new(), changes));
        }
        let (layer, used) = store_layer(
            self.store,
            self.options.workers,
            compression,
            step,
            |writer| {
                write_layer_from(&after, &changes, &options, writer)
                    .map(|_| ())
                    .map_err(|source| BuildError::Layer {
                        step: step.to_owned(),
                        source,
                    })
            },
        )?;
        Ok((Some(layer), used, changes))
    }

    /// A `rootfs` or `bootstrap` base as one layer, read from its tarball without unpacking
    /// it: the same layer [`Builder::tarball_base`] makes from the unpacked tree.
    fn engine_tarball_base(
        &self,
        recipe: &Recipe,
        plan: &Plan,
        reporter: &mut dyn BuildReporter,
    ) -> Result<(Vec<LayerRef>, Vec<HistoryEntry>), BuildError> {
        let identity = &plan.inputs.base;
        let key = base_key(
            plan,
            recipe.build.compression,
            self.options.source_date_epoch,
        );
        let created_by = match &recipe.base {
            Base::Rootfs { relative_path, .. } => format!("bake: rootfs {relative_path}"),
            Base::Bootstrap(bootstrap) => format!(
                "bake: mmdebstrap --variant={} {} ({} packages)",
                bootstrap.variant,
                bootstrap.suite,
                bootstrap.packages.len()
            ),
            _ => unreachable!("only tarball bases come here"),
        };
        if let Some(cached) = self.store.cached::<CachedStep>("bases", &key)?
            && cached
                .layer
                .as_ref()
                .is_none_or(|l| self.store.has_blob(&l.digest))
        {
            return Ok((cached.layer.into_iter().collect(), vec![cached.history]));
        }
        reporter.message(&format!("preparing base: {created_by}"));
        let work = self.store.work_dir("base")?;
        let tarball = match &recipe.base {
            Base::Rootfs { path, .. } => path.clone(),
            Base::Bootstrap(bootstrap) => {
                let (arch, pinned) = match identity {
                    crate::plan::BaseIdentity::Bootstrap {
                        architecture,
                        archives,
                        ..
                    } => (architecture.clone(), archives.clone()),
                    _ => ("amd64".to_owned(), Vec::new()),
                };
                let tar = work.path().join("base.tar");
                crate::build::bases::bootstrap(
                    bootstrap,
                    &pinned,
                    &arch,
                    self.options.source_date_epoch,
                    &tar,
                )
                .map_err(|source| BuildError::Base {
                    recipe: recipe.name.clone(),
                    source,
                })?;
                tar
            }
            _ => unreachable!("only tarball bases come here"),
        };
        let file = fs_err::File::open(&tarball).map_err(|source| BuildError::Io {
            path: tarball.clone(),
            source,
        })?;
        let reader =
            crate::build::engine::decompressor(std::io::BufReader::with_capacity(1 << 20, file))?;
        let mut tree = TarTree::new(work.path()).map_err(|e| BuildError::Io {
            path: work.path().to_path_buf(),
            source: std::io::Error::other(crate::diagnostic::error_chain(&e)),
        })?;
        tree.apply(reader, &created_by, &Keep::all())
            .map_err(|e| BuildError::Io {
                path: tarball.clone(),
                source: std::io::Error::other(format!(
                    "{e}: {}",
                    crate::diagnostic::error_chain(&e)
                )),
            })?;
        let changes = Changes {
            changed: tree.paths().map(Path::to_path_buf).collect(),
            ..Changes::default()
        };
        let options = LayerOptions {
            source_date_epoch: Some(self.options.source_date_epoch),
        };
        let (layer, _) = store_layer(
            self.store,
            self.options.workers,
            recipe.build.compression,
            &created_by,
            |writer| {
                write_layer_from(&tree, &changes, &options, writer)
                    .map(|_| ())
                    .map_err(|source| BuildError::Layer {
                        step: created_by.clone(),
                        source,
                    })
            },
        )?;
        drop(tree);
        super::discard(self.store, work);
        let history = HistoryEntry {
            created_by: created_by.clone(),
            comment: Some("bake".into()),
            empty_layer: false,
        };
        cache_base(self.store, &key, &layer, &history)?;
        Ok((vec![layer], vec![history]))
    }
}
