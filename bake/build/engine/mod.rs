//! The Docker Engine runner (`build.runner: docker`, `bake build --runner docker`): provisioning
//! steps run in containers of a Docker Engine instead of namespaces bake makes itself, so that
//! a user without root, who can reach the engine's socket, can build.
//!
//! The provisioned state lives in the engine, because an unprivileged user cannot create
//! root-owned files or device nodes in a host directory:
//!
//! - the base comes from bake's own layers, loaded into the engine as an image
//!   ([`Engine::load_layers`]); nothing is ever pulled from a registry;
//! - each step runs in a container created from the previous state ([`Engine::run_step`]);
//!   `file` steps go in through the archive API ([`copy`]);
//! - the step's layer is the difference between two exports of its container, before and
//!   after the step, read into [`crate::build::tree::TarTree`]s, diffed by bake's own
//!   [`crate::build::snapshot::diff`] (which compares content digests where the namespace
//!   runner needs inodes and ctimes to know what to hash) and written
//!   by bake's own tar writer ([`crate::build::layer::write_layer_from`]), so the bytes,
//!   digests and cache are the namespace runner's; the engine's own layer (its commit) only
//!   carries the state to the next step and never becomes part of the image. The engine's
//!   change list is not used: an engine that compares trees ("naive diff", Docker 20.10 on
//!   overlay2 here) misses a file rewritten with the same size and mtime.
//!
//! No Engine API shows ctime or inode numbers, and no layer records them: the diff judges both
//! runners' trees on what a layer records only, so a step that re-applies an owner or mode a
//! file already has, or rewrites a file with the same bytes (as dpkg does), changes neither
//! runner's layer.
//!
//! Everything bake creates in the engine carries [`LABEL_BUILD`] (the build id) and
//! [`LABEL_PID`]; a build removes what it made when it ends, on success, failure or Ctrl-C
//! ([`Engine::remove_everything`]), and `bake cleanup` removes what a killed build left
//! ([`sweep`]), never anything without bake's label.
//!
//! The client is `bollard`, the Engine API crate the product brief names: typed requests,
//! version negotiation, multiplexed attach streams, over the Unix socket only (its `pipe`
//! feature; no TLS stack, no BuildKit or SSH transports).

mod connect;
pub mod copy;
mod run;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

pub use connect::{EngineAddress, MIN_API_VERSION, discover};
pub use run::ContainerStep;
pub(crate) use run::{decompressor, top_level_entries};

use super::runner::{Runner, RunnerError, StepOutcome, StepOutput, StepSpec};

/// The label on everything bake creates in an engine: the build's id.
pub const LABEL_BUILD: &str = "dev.bake.build-id";

/// The label holding the process id of the build that created the object, so that `bake
/// cleanup` leaves a running build's objects alone.
pub const LABEL_PID: &str = "dev.bake.pid";

/// The repository name of the images a build loads and commits (never pushed anywhere).
const IMAGE_REPOSITORY: &str = "bake-build";

/// Why the engine could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the Docker Engine at `{}` is unreachable", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("permission denied on the Docker Engine socket `{}`", socket.display())]
    PermissionDenied {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the Docker Engine at `{}` speaks API {found}; bake needs {needed} or later",
        socket.display()
    )]
    ApiTooOld {
        socket: PathBuf,
        found: String,
        needed: String,
    },
    #[error("`{value}` in {source_name} is not a Docker host bake can use")]
    UnsupportedHost { value: String, source_name: String },
    #[error("failed to read the Docker context `{context}` from `{}`", path.display())]
    Context {
        context: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the Docker Engine failed to {action}")]
    Api {
        action: String,
        #[source]
        source: bollard::errors::Error,
    },
    #[error("failed to {action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start the runtime for the Docker Engine client")]
    Runtime(#[source] std::io::Error),
}

impl EngineError {
    /// A fix bake knows, if any.
    pub fn hint(&self) -> Option<String> {
        match self {
            EngineError::Unreachable { socket, .. } => Some(format!(
                "start the Docker Engine, or point DOCKER_HOST at its socket \
                 (unix:///path/to/docker.sock); bake looked at `{}`",
                socket.display()
            )),
            EngineError::PermissionDenied { socket, .. } => Some(format!(
                "give your user read and write access to `{}`: add it to the socket's group \
                 (`sudo usermod -aG docker $USER`, then log in again), or use a rootless engine \
                 through DOCKER_HOST",
                socket.display()
            )),
            EngineError::ApiTooOld { .. } => {
                Some("upgrade the Docker Engine to 20.10 or later".into())
            }
            EngineError::UnsupportedHost { .. } => Some(
                "the Docker runner talks to a local engine over its Unix socket: \
                 DOCKER_HOST=unix:///path/to/docker.sock"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// A connection to a Docker Engine for one build.
pub struct Engine {
    docker: bollard::Docker,
    runtime: tokio::runtime::Runtime,
    address: EngineAddress,
    api_version: String,
    build_id: String,
    cancel: Arc<AtomicBool>,
    /// The image holding the current state, for steps and tests run through [`Runner::run`].
    current: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("address", &self.address)
            .field("api_version", &self.api_version)
            .field("build_id", &self.build_id)
            .finish()
    }
}

impl Engine {
    /// Connects to the engine the docker CLI would use ([`discover`]), checks its API version,
    /// and starts a build whose objects are labelled with a fresh id. `cancel` is the build's
    /// cancel flag: a running step is killed soon after it is set.
    pub fn connect(cancel: Arc<AtomicBool>) -> Result<Self, EngineError> {
        Self::connect_to(discover()?, cancel)
    }

    /// Connects to the engine at `address`.
    pub fn connect_to(
        address: EngineAddress,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self, EngineError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(EngineError::Runtime)?;
        let (docker, api_version) = runtime.block_on(connect::connect(&address))?;
        let build_id = format!("{}-{:016x}", std::process::id(), fastrand::u64(..));
        tracing::debug!(
            "Docker Engine at {} (API {api_version}), build {build_id}",
            address.socket.display()
        );
        Ok(Engine {
            docker,
            runtime,
            address,
            api_version,
            build_id,
            cancel,
            current: std::sync::Mutex::new(None),
        })
    }

    pub fn build_id(&self) -> &str {
        &self.build_id
    }

    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// The labels every object of this build carries.
    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_BUILD.to_owned(), self.build_id.clone()),
            (LABEL_PID.to_owned(), std::process::id().to_string()),
        ])
    }

    /// The image name (`bake-build:<build id>-<what>`) of one of this build's images.
    fn image_name(&self, what: &str) -> String {
        format!("{IMAGE_REPOSITORY}:{}-{what}", self.build_id)
    }

    /// Sets the image later [`Runner::run`] calls (command tests) start from.
    pub fn set_current(&self, image: Option<String>) {
        *self.current.lock().expect("not poisoned") = image;
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Removes every container, image and volume labelled with this build's id.
    pub fn remove_everything(&self) -> Result<(), EngineError> {
        let filter = format!("{LABEL_BUILD}={}", self.build_id);
        self.block_on(remove_labelled(&self.docker, &filter, |_| true))
            .map(|_| ())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Whatever happened to the build, nothing of it stays in the engine.
        if let Err(error) = self.remove_everything() {
            tracing::warn!(
                "could not remove build {}'s objects from the Docker Engine: {}",
                self.build_id,
                crate::diagnostic::error_chain(&error)
            );
        }
    }
}

/// What a sweep removed (or would remove).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Swept {
    pub containers: Vec<String>,
    pub images: Vec<String>,
    pub volumes: Vec<String>,
}

/// `bake cleanup`'s half for the engine: removes every container, image and volume labelled by
/// a bake build whose process is gone (on this machine; a label naming a live pid is left
/// alone). Nothing without [`LABEL_BUILD`] is touched. With `dry_run`, only lists them.
pub fn sweep(address: EngineAddress, dry_run: bool) -> Result<Swept, EngineError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(EngineError::Runtime)?;
    runtime.block_on(async {
        let (docker, _) = connect::connect(&address).await?;
        let dead = |labels: &HashMap<String, String>| {
            labels
                .get(LABEL_PID)
                .and_then(|pid| pid.parse::<i32>().ok())
                .is_none_or(|pid| !process_alive(pid))
        };
        if dry_run {
            list_labelled(&docker, LABEL_BUILD, dead).await
        } else {
            remove_labelled(&docker, LABEL_BUILD, dead).await
        }
    })
}

/// Whether a process with this id runs (on this machine).
fn process_alive(pid: i32) -> bool {
    pid > 0
        && !matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
}

fn api_error(action: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> EngineError {
    let action = action.into();
    move |source| EngineError::Api { action, source }
}

async fn list_labelled(
    docker: &bollard::Docker,
    filter: &str,
    select: impl Fn(&HashMap<String, String>) -> bool,
) -> Result<Swept, EngineError> {
    use bollard::query_parameters::{ListContainersOptions, ListImagesOptions, ListVolumesOptions};
    let filters = HashMap::from([("label".to_owned(), vec![filter.to_owned()])]);
    let mut swept = Swept::default();
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters.clone()),
            ..Default::default()
        }))
        .await
        .map_err(api_error("list bake's containers"))?;
    for container in containers {
        if select(&container.labels.clone().unwrap_or_default())
            && let Some(id) = container.id
        {
            swept.containers.push(id);
        }
    }
    let images = docker
        .list_images(Some(ListImagesOptions {
            all: true,
            filters: Some(filters.clone()),
            ..Default::default()
        }))
        .await
        .map_err(api_error("list bake's images"))?;
    for image in images {
        if select(&image.labels) {
            swept.images.push(image.id);
        }
    }
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(filters),
        }))
        .await
        .map_err(api_error("list bake's volumes"))?;
    for volume in volumes.volumes.unwrap_or_default() {
        if select(&volume.labels) {
            swept.volumes.push(volume.name);
        }
    }
    Ok(swept)
}

/// Removes what [`list_labelled`] finds: containers first (they hold images), then images
/// newest first (a child before its parent), then volumes. Every removal is tried; the first
/// failure is returned after the others.
async fn remove_labelled(
    docker: &bollard::Docker,
    filter: &str,
    select: impl Fn(&HashMap<String, String>) -> bool,
) -> Result<Swept, EngineError> {
    use bollard::query_parameters::{RemoveContainerOptions, RemoveImageOptions};
    let swept = list_labelled(docker, filter, select).await?;
    let mut first_error = None;
    for id in &swept.containers {
        let removed = docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                }),
            )
            .await;
        if let Err(error) = removed
            && !is_not_found(&error)
        {
            first_error.get_or_insert(api_error(format!("remove container {id}"))(error));
        }
    }
    // Images go until none is left: a child image must go before its parent.
    let mut left = swept.images.clone();
    for _round in 0..swept.images.len().max(1) {
        let mut blocked = Vec::new();
        for id in left {
            let removed = docker
                .remove_image(
                    &id,
                    Some(RemoveImageOptions {
                        force: true,
                        noprune: false,
                    }),
                    None,
                )
                .await;
            match removed {
                Ok(_) => {}
                Err(error) if is_not_found(&error) => {}
                Err(error) if is_conflict(&error) => blocked.push(id),
                Err(error) => {
                    first_error.get_or_insert(api_error(format!("remove image {id}"))(error));
                }
            }
        }
        left = blocked;
        if left.is_empty() {
            break;
        }
    }
    if let Some(id) = left.first() {
        first_error.get_or_insert(EngineError::Io {
            action: format!("remove image {id} (another image still needs it)"),
            source: std::io::Error::other("conflict"),
        });
    }
    for name in &swept.volumes {
        if let Err(error) = docker
            .remove_volume(name, None::<bollard::query_parameters::RemoveVolumeOptions>)
            .await
            && !is_not_found(&error)
        {
            first_error.get_or_insert(api_error(format!("remove volume {name}"))(error));
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(swept),
    }
}

fn is_not_found(error: &bollard::errors::Error) -> bool {
    matches!(
        error,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn is_conflict(error: &bollard::errors::Error) -> bool {
    matches!(
        error,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

/// The Docker runner as a [`Runner`]: runs a step (a command test) in a throwaway container of
/// the current state and keeps nothing of it. Provisioning steps, whose changes become layers,
/// go through [`Engine::run_step`] from the build pipeline instead; `step.root` is not used.
impl Runner for Engine {
    fn name(&self) -> &str {
        "docker"
    }

    fn run(
        &self,
        step: &StepSpec,
        output: &mut dyn StepOutput,
    ) -> Result<StepOutcome, RunnerError> {
        let image = self
            .current
            .lock()
            .expect("not poisoned")
            .clone()
            .ok_or_else(|| RunnerError::Helper {
                step: step.step.clone(),
                problem: "has no image to run in: the build has not loaded one into the engine"
                    .into(),
            })?;
        let started = std::time::Instant::now();
        let container = self.run_step(&image, step, output)?;
        let code = container.exit_code;
        self.discard(container);
        Ok(StepOutcome {
            exit_code: code,
            duration: started.elapsed(),
            created: Vec::new(),
        })
    }

    fn engine(&self) -> Option<&Engine> {
        Some(self)
    }
}
