//! Containers and images of one build: loading bake's layers as an image, running a step in a
//! container with its output streamed line by line, reading what the step changed, and
//! committing the result as the next step's starting point.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bollard::models::{ContainerCreateBody, HostConfig};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{Engine, EngineError, api_error};
use crate::artifact::oci::LayerRef;
use crate::build::runner::{DEFAULT_PATH, RunnerError, StepOutput, StepSpec, Stream, Tail};
use crate::build::tree::{Keep, TarTree};
use crate::store::Store;

/// Where the script goes: Docker's `/dev/shm`, a tmpfs every user may write to (mode 1777) that
/// never reaches an image or a commit. (Not `/tmp`, as with the namespace runner: Docker gives
/// a tmpfs there the mode of the image's `/tmp`, which an unprivileged step may not write to.)
const SCRIPT_PATH: &str = "/dev/shm/bake-step.sh";

/// How often a running step looks at the build's cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// A line longer than this is passed on in pieces (as the namespace runner does).
const MAX_LINE_BYTES: usize = 16 * 1024;

/// Mount points every step has, with the mode the namespace runner gives one it must create.
/// Docker provides them itself (in a layer of its own that never reaches an image), so the
/// runner creates the missing ones in the container, to give the namespace runner's layer.
pub(crate) const MOUNT_POINTS: [(&str, u32); 3] =
    [("proc", 0o555), ("dev", 0o755), ("tmp", 0o1777)];

/// A container a step ran in (or a file step wrote into), not yet removed.
#[derive(Debug)]
pub struct ContainerStep {
    pub id: String,
    pub exit_code: i32,
}

impl Engine {
    fn step_error(&self, step: &str) -> impl Fn(EngineError) -> RunnerError {
        let step = step.to_owned();
        move |source| RunnerError::Engine {
            step: step.clone(),
            source: Box::new(source),
        }
    }

    /// Loads `layers` (bake's blobs, base first) into the engine as one image named for `what`,
    /// labelled with the build; returns its name.
    pub fn load_layers(
        &self,
        store: &Store,
        layers: &[LayerRef],
        what: &str,
    ) -> Result<String, EngineError> {
        let name = self.image_name(what);
        let work = store.work_dir("engine-load").map_err(|e| EngineError::Io {
            action: "make a work directory for the image load".into(),
            source: io::Error::other(e),
        })?;
        let archive = work.path().join("image.tar");
        write_docker_archive(store, layers, &self.labels(), &name, &archive)?;
        self.block_on(async {
            let file = tokio::fs::File::open(&archive)
                .await
                .map_err(|source| EngineError::Io {
                    action: format!("open `{}`", archive.display()),
                    source,
                })?;
            let body = futures_util::stream::unfold(file, |mut file| async move {
                use tokio::io::AsyncReadExt;
                let mut buffer = vec![0u8; 1 << 20];
                match file.read(&mut buffer).await {
                    Ok(0) | Err(_) => None,
                    Ok(n) => {
                        buffer.truncate(n);
                        Some((bytes::Bytes::from(buffer), file))
                    }
                }
            });
            let mut progress = self.docker.import_image_stream(
                bollard::query_parameters::ImportImageOptions {
                    quiet: true,
                    ..Default::default()
                },
                body,
                None,
            );
            while let Some(item) = progress.next().await {
                item.map_err(api_error(format!("load bake's layers as `{name}`")))?;
            }
            Ok::<_, EngineError>(())
        })?;
        Ok(name)
    }

    /// Creates a container of `image` for `step` (not started).
    fn create(
        &self,
        image: &str,
        step: &StepSpec,
        command: Vec<String>,
    ) -> Result<String, EngineError> {
        // Only the defaults: the step's own variables (which may be secrets) come in on stdin
        // (see [`step_input`]), because the engine copies a container's environment into the
        // image a commit makes, which would hand it to the next step and keep it in the engine.
        let env = [
            ("PATH", DEFAULT_PATH),
            ("DEBIAN_FRONTEND", "noninteractive"),
        ];
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(command),
            entrypoint: Some(Vec::new()),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            // Always given: a commit keeps the last container's user (and workdir) in the
            // image, which the next step must not inherit. Root by default, as with the
            // namespace runner.
            user: Some(step.user.clone().unwrap_or_else(|| "0:0".to_owned())),
            working_dir: Some(step.workdir.clone().unwrap_or_else(|| "/".into())),
            hostname: Some(step.hostname.clone()),
            labels: Some(self.labels()),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(true),
            tty: Some(false),
            host_config: Some(HostConfig {
                network_mode: Some(if step.network { "host" } else { "none" }.into()),
                // As the namespace runner's: nothing written there enters a layer; nosuid and
                // nodev, not Docker's default noexec. (Docker gives it the mode of the image's
                // `/tmp`, which is 1777 in every real image.)
                tmpfs: Some(HashMap::from([(
                    "/tmp".to_owned(),
                    "rw,exec,nosuid,nodev,mode=1777".to_owned(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.block_on(async {
            self.docker
                .create_container(
                    None::<bollard::query_parameters::CreateContainerOptions>,
                    body,
                )
                .await
                .map(|created| created.id)
                .map_err(api_error(format!("create a container of `{image}`")))
        })
    }

    /// Creates a container of `image` that never runs: `file` steps write into it.
    pub fn create_idle(&self, image: &str, step: &str) -> Result<String, EngineError> {
        let spec = StepSpec::new("/", step, "", Duration::from_secs(1));
        self.create(image, &spec, vec!["/bin/true".into()])
    }

    /// Creates the mount points among [`MOUNT_POINTS`] that `present` lacks in `container`,
    /// as the namespace runner creates them in a root; returns their names.
    pub fn create_mount_points(
        &self,
        container: &str,
        present: &BTreeSet<String>,
    ) -> Result<Vec<String>, EngineError> {
        let missing: Vec<(&str, u32)> = MOUNT_POINTS
            .iter()
            .copied()
            .filter(|(name, _)| !present.contains(*name))
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut tar = tar::Builder::new(Vec::new());
        for (name, mode) in &missing {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(*mode);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(now);
            header.set_size(0);
            tar.append_data(&mut header, format!("{name}/"), io::empty())
                .map_err(|source| EngineError::Io {
                    action: "make the mount points' tar".into(),
                    source,
                })?;
        }
        let bytes = tar.into_inner().map_err(|source| EngineError::Io {
            action: "make the mount points' tar".into(),
            source,
        })?;
        self.upload(container, "/", bytes)?;
        Ok(missing.iter().map(|(n, _)| (*n).to_owned()).collect())
    }

    /// Extracts the tar `bytes` into the directory `path` of `container`.
    pub fn upload(&self, container: &str, path: &str, bytes: Vec<u8>) -> Result<(), EngineError> {
        self.block_on(async {
            self.docker
                .upload_to_container(
                    container,
                    Some(bollard::query_parameters::UploadToContainerOptions {
                        path: path.to_owned(),
                        ..Default::default()
                    }),
                    bollard::body_full(bytes.into()),
                )
                .await
                .map_err(api_error(format!(
                    "write into `{path}` of container {container}"
                )))
        })
    }

    /// The first tar header of `path` in `container` (what is there, not followed if it is a
    /// symlink), or `None` if nothing is.
    pub fn stat(&self, container: &str, path: &str) -> Result<Option<tar::Header>, EngineError> {
        self.block_on(async {
            let mut stream = self.docker.download_from_container(
                container,
                Some(bollard::query_parameters::DownloadFromContainerOptions {
                    path: path.to_owned(),
                }),
            );
            let mut first = Vec::new();
            while first.len() < 512 {
                match stream.next().await {
                    Some(Ok(chunk)) => first.extend_from_slice(&chunk),
                    Some(Err(error)) if super::is_not_found(&error) => return Ok(None),
                    Some(Err(error)) => {
                        return Err(api_error(format!(
                            "look at `{path}` in container {container}"
                        ))(error));
                    }
                    None => break,
                }
            }
            if first.len() < 512 {
                return Ok(None);
            }
            let mut header = tar::Header::new_old();
            header.as_mut_bytes().copy_from_slice(&first[..512]);
            Ok(Some(header))
        })
    }

    /// Runs `step` in a new container of `image`, streaming its output to `output`; the
    /// container is kept and returned if the step exits as expected.
    pub fn run_step(
        &self,
        image: &str,
        step: &StepSpec,
        output: &mut dyn StepOutput,
    ) -> Result<ContainerStep, RunnerError> {
        let container = self.create_for(image, step)?;
        self.run_created(container, step, None, output)
    }

    /// Creates (does not start) the container `step` will run in.
    pub fn create_for(&self, image: &str, step: &StepSpec) -> Result<String, RunnerError> {
        self.create(image, step, step_command(&step.script))
            .map_err(self.step_error(&step.step))
    }

    /// Runs `step` in `container` (from [`Engine::create_for`]); first creates the mount points
    /// the image lacks when `present` (its top-level names) is given, as the namespace runner
    /// does in a root. On failure the container is removed.
    pub fn run_created(
        &self,
        container: String,
        step: &StepSpec,
        present: Option<&BTreeSet<String>>,
        output: &mut dyn StepOutput,
    ) -> Result<ContainerStep, RunnerError> {
        if let Some(present) = present
            && let Err(error) = self.create_mount_points(&container, present)
        {
            self.discard(ContainerStep {
                id: container,
                exit_code: -1,
            });
            return Err(self.step_error(&step.step)(error));
        }
        match self.attach_and_wait(&container, step, output) {
            Ok(code) => Ok(ContainerStep {
                id: container,
                exit_code: code,
            }),
            Err(error) => {
                self.discard(ContainerStep {
                    id: container,
                    exit_code: -1,
                });
                Err(error)
            }
        }
    }

    fn attach_and_wait(
        &self,
        container: &str,
        step: &StepSpec,
        output: &mut dyn StepOutput,
    ) -> Result<i32, RunnerError> {
        let engine_error = self.step_error(&step.step);
        let cancel = self.cancel.clone();
        self.block_on(async {
            let attached = self
                .docker
                .attach_container(
                    container,
                    Some(bollard::query_parameters::AttachContainerOptions {
                        stdin: true,
                        stdout: true,
                        stderr: true,
                        stream: true,
                        logs: false,
                        detach_keys: None,
                    }),
                )
                .await
                .map_err(|e| engine_error(api_error("attach to the step's container")(e)))?;
            self.docker
                .start_container(container, None::<bollard::query_parameters::StartContainerOptions>)
                .await
                .map_err(|e| engine_error(api_error("start the step's container")(e)))?;
            let mut input = attached.input;
            let mut stream = attached.output;
            // The script goes in on stdin, which closes right after: the step's stdin is empty.
            let script = step_input(step);
            let feed = async move {
                let _ = input.write_all(&script).await;
                let _ = input.shutdown().await;
            };
            let mut tail = Tail::default();
            let mut lines = [LineSplitter::default(), LineSplitter::default()];
            let deadline = tokio::time::sleep(step.timeout);
            tokio::pin!(deadline);
            tokio::pin!(feed);
            let mut fed = false;
            let mut poll = tokio::time::interval(CANCEL_POLL);
            let mut stopped: Option<Stop> = None;
            loop {
                tokio::select! {
                    () = &mut feed, if !fed => fed = true,
                    item = stream.next() => match item {
                        Some(Ok(log)) => {
                            let (which, bytes) = match log {
                                bollard::container::LogOutput::StdErr { message } => (Stream::Stderr, message),
                                bollard::container::LogOutput::StdOut { message }
                                | bollard::container::LogOutput::Console { message } => (Stream::Stdout, message),
                                bollard::container::LogOutput::StdIn { .. } => continue,
                            };
                            let splitter = &mut lines[usize::from(which == Stream::Stderr)];
                            for line in splitter.push(&bytes) {
                                tail.push(&line);
                                output.line(&step.step, which, &line);
                            }
                        }
                        Some(Err(_)) | None => break,
                    },
                    () = &mut deadline => {
                        stopped = Some(Stop::TimedOut);
                        break;
                    }
                    _ = poll.tick() => {
                        if cancel.load(Ordering::SeqCst) {
                            stopped = Some(Stop::Interrupted);
                            break;
                        }
                    }
                }
            }
            for (index, splitter) in lines.iter_mut().enumerate() {
                if let Some(line) = splitter.finish() {
                    let which = if index == 0 { Stream::Stdout } else { Stream::Stderr };
                    tail.push(&line);
                    output.line(&step.step, which, &line);
                }
            }
            if stopped.is_some() {
                let _ = self
                    .docker
                    .kill_container(container, None::<bollard::query_parameters::KillContainerOptions>)
                    .await;
            }
            let mut waited = self.docker.wait_container(
                container,
                None::<bollard::query_parameters::WaitContainerOptions>,
            );
            let code = match waited.next().await {
                Some(Ok(response)) => response.status_code,
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
                Some(Err(error)) => {
                    return Err(engine_error(api_error("wait for the step's container")(error)));
                }
                None => -1,
            };
            let last_lines = tail.into_lines();
            match stopped {
                Some(Stop::TimedOut) => Err(RunnerError::TimedOut {
                    step: step.step.clone(),
                    timeout: step.timeout,
                    last_lines,
                }),
                Some(Stop::Interrupted) => Err(RunnerError::Interrupted {
                    step: step.step.clone(),
                    signal: libc::SIGINT,
                }),
                None => {
                    let code = i32::try_from(code).unwrap_or(-1);
                    if code == step.expected_exit_code {
                        Ok(code)
                    } else {
                        Err(RunnerError::StepFailed {
                            step: step.step.clone(),
                            code,
                            last_lines,
                        })
                    }
                }
            }
        })
    }

    /// `container`'s whole filesystem (its export) read into a tree spooled in `dir`: with
    /// content (`Keep::all`), or only metadata and digests (`Keep::index`).
    ///
    /// The engine's own change list (`GET /containers/{id}/changes`) is not used: engines that
    /// compare trees ("naive diff") miss a file rewritten with the same size and mtime, which
    /// comparing content digests of two exports of the same container does not.
    pub fn read_tree(
        &self,
        container: &str,
        dir: &Path,
        keep: &Keep,
    ) -> Result<TarTree, EngineError> {
        let export = dir.join(format!("export-{}.tar", fastrand::u64(..)));
        self.block_on(async {
            let mut file =
                tokio::fs::File::create(&export)
                    .await
                    .map_err(|source| EngineError::Io {
                        action: format!("create `{}`", export.display()),
                        source,
                    })?;
            let mut stream = self.docker.export_container(container);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(api_error(format!("export container {container}")))?;
                file.write_all(&chunk)
                    .await
                    .map_err(|source| EngineError::Io {
                        action: format!("write `{}`", export.display()),
                        source,
                    })?;
            }
            file.flush().await.map_err(|source| EngineError::Io {
                action: format!("write `{}`", export.display()),
                source,
            })
        })?;
        let mut tree = TarTree::new(dir).map_err(|e| EngineError::Io {
            action: "make a spool for the container's files".into(),
            source: io::Error::other(crate::diagnostic::error_chain(&e)),
        })?;
        let reader = io::BufReader::with_capacity(
            1 << 20,
            fs_err::File::open(&export).map_err(|source| EngineError::Io {
                action: "read the container's export".into(),
                source,
            })?,
        );
        let applied = tree.apply(reader, &format!("container {container}'s export"), keep);
        let _ = fs_err::remove_file(&export);
        applied.map_err(|e| EngineError::Io {
            action: format!("read container {container}'s export"),
            source: io::Error::other(format!("{e}: {}", crate::diagnostic::error_chain(&e))),
        })?;
        Ok(tree)
    }

    /// Commits `container` as this build's image `what` (the next step's starting point, never
    /// a layer of the result); returns its name.
    pub fn commit(&self, container: &str, what: &str) -> Result<String, EngineError> {
        let name = self.image_name(what);
        let (repo, tag) = name.split_once(':').expect("image names have a tag");
        self.block_on(async {
            self.docker
                .commit_container(
                    bollard::query_parameters::CommitContainerOptions {
                        container: Some(container.to_owned()),
                        repo: Some(repo.to_owned()),
                        tag: Some(tag.to_owned()),
                        pause: false,
                        ..Default::default()
                    },
                    bollard::models::ContainerConfig {
                        labels: Some(self.labels()),
                        ..Default::default()
                    },
                )
                .await
                .map_err(api_error(format!("commit container {container}")))
        })?;
        Ok(name)
    }

    /// Removes a container (its output was read, or it does not matter).
    pub fn discard(&self, container: ContainerStep) {
        let removed = self.block_on(async {
            self.docker
                .remove_container(
                    &container.id,
                    Some(bollard::query_parameters::RemoveContainerOptions {
                        force: true,
                        v: true,
                        ..Default::default()
                    }),
                )
                .await
        });
        if let Err(error) = removed {
            tracing::debug!("container {} not removed yet: {error}", container.id);
        }
    }
}

enum Stop {
    TimedOut,
    Interrupted,
}

/// What the container's shell does with [`step_input`]: the first line counts the lines of
/// `export` statements that follow, which it writes to `/dev/shm/bake-env` (a tmpfs, as
/// [`SCRIPT_PATH`]) and sources; the rest is the
/// script. Shell builtins only, besides `cat`.
const READ_INPUT: &str = r#"IFS= read -r n || exit 125; : > /dev/shm/bake-env || exit 125; i=0; while [ "$i" -lt "$n" ]; do IFS= read -r line || exit 125; printf '%s\n' "$line" >> /dev/shm/bake-env; i=$((i + 1)); done; . /dev/shm/bake-env && cat > "$0" && exec "$@" "$0""#;

/// The container's stdin: the step's variables as `export NAME='value'` lines (their count
/// first), then the script.
fn step_input(step: &StepSpec) -> Vec<u8> {
    let mut exports = String::new();
    for (name, value) in &step.env {
        exports.push_str(&format!(
            "export {name}='{}'\n",
            value.replace('\'', r"'\''")
        ));
    }
    let lines = exports.matches('\n').count();
    let mut input = format!("{lines}\n{exports}").into_bytes();
    input.extend_from_slice(step.script.as_bytes());
    input
}

/// The container's command: read the script from stdin into [`SCRIPT_PATH`], then run it as
/// the namespace runner does: `/bin/sh -e SCRIPT`, or the interpreter of its `#!` line with the
/// line's one argument (as the kernel would; `/dev/shm` is mounted `noexec`).
fn step_command(script: &str) -> Vec<String> {
    let mut command = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        READ_INPUT.to_owned(),
        SCRIPT_PATH.to_owned(),
    ];
    match script.strip_prefix("#!") {
        Some(rest) => {
            let line = rest.lines().next().unwrap_or("").trim();
            let (interpreter, argument) = match line.split_once([' ', '\t']) {
                Some((interpreter, argument)) => (interpreter, Some(argument.trim())),
                None => (line, None),
            };
            command.push(interpreter.to_owned());
            command.extend(argument.filter(|a| !a.is_empty()).map(str::to_owned));
        }
        None => command.extend(["/bin/sh".to_owned(), "-e".to_owned()]),
    }
    command
}

/// Splits a byte stream into lines (without terminators; invalid UTF-8 replaced), passing on
/// [`MAX_LINE_BYTES`] pieces of endless lines.
#[derive(Debug, Default)]
struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                lines.push(Self::text(std::mem::take(&mut self.pending)));
            } else {
                self.pending.push(byte);
                if self.pending.len() == MAX_LINE_BYTES {
                    lines.push(Self::text(std::mem::take(&mut self.pending)));
                }
            }
        }
        lines
    }

    fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| Self::text(std::mem::take(&mut self.pending)))
    }

    fn text(mut line: Vec<u8>) -> String {
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8_lossy(&line).into_owned()
    }
}

/// Writes a docker-archive (`docker save` format) of `layers`, decompressed, with a config that
/// carries `labels`, tagged `name`. An image without layers gets one empty layer (the engine
/// loads no image without one); it is never part of bake's image.
fn write_docker_archive(
    store: &Store,
    layers: &[LayerRef],
    labels: &HashMap<String, String>,
    name: &str,
    archive: &Path,
) -> Result<(), EngineError> {
    let io_error = |action: &str| {
        let action = action.to_owned();
        move |source| EngineError::Io { action, source }
    };
    let file = fs_err::File::create(archive).map_err(io_error("create the image archive"))?;
    let mut tar = tar::Builder::new(io::BufWriter::with_capacity(1 << 20, file));
    let mut diff_ids = Vec::new();
    let mut layer_names = Vec::new();
    let append = |tar: &mut tar::Builder<_>, path: &str, size: u64, data: &mut dyn Read| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(size);
        header.set_mtime(0);
        tar.append_data(&mut header, path, data)
    };
    for (index, layer) in layers.iter().enumerate() {
        let path = format!("layer{index}.tar");
        let blob = store
            .open_blob(&layer.digest)
            .map_err(|e| EngineError::Io {
                action: format!("open layer {}", layer.digest),
                source: io::Error::other(e.to_string()),
            })?;
        // The size must be known before the entry: decompress into a temporary file first.
        let mut plain = tempfile::tempfile_in(archive.parent().unwrap_or(Path::new(".")))
            .map_err(io_error("make a temporary file"))?;
        let size = io::copy(&mut decompressor(io::BufReader::new(blob))?, &mut plain)
            .map_err(io_error(&format!("decompress layer {}", layer.digest)))?;
        use std::io::Seek;
        plain
            .seek(io::SeekFrom::Start(0))
            .map_err(io_error("rewind a temporary file"))?;
        append(&mut tar, &path, size, &mut plain).map_err(io_error("write the image archive"))?;
        diff_ids.push(layer.diff_id.clone());
        layer_names.push(path);
    }
    if layers.is_empty() {
        let empty = [0u8; 1024];
        let digest = crate::id::Digest::of(&empty).to_string();
        append(&mut tar, "empty.tar", empty.len() as u64, &mut &empty[..])
            .map_err(io_error("write the image archive"))?;
        diff_ids.push(digest);
        layer_names.push("empty.tar".into());
    }
    let config = serde_json::json!({
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux",
        "config": { "Labels": labels },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = serde_json::to_vec(&config).expect("json");
    append(
        &mut tar,
        "config.json",
        config.len() as u64,
        &mut &config[..],
    )
    .map_err(io_error("write the image archive"))?;
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [name],
        "Layers": layer_names,
    }]))
    .expect("json");
    append(
        &mut tar,
        "manifest.json",
        manifest.len() as u64,
        &mut &manifest[..],
    )
    .map_err(io_error("write the image archive"))?;
    let mut out = tar
        .into_inner()
        .map_err(io_error("write the image archive"))?;
    out.flush().map_err(io_error("write the image archive"))?;
    Ok(())
}

/// A layer blob's tar: plain, gzip or zstd, told apart by magic bytes.
pub(crate) fn decompressor<'a>(
    mut blob: impl io::BufRead + 'a,
) -> Result<Box<dyn Read + 'a>, EngineError> {
    let magic = blob
        .fill_buf()
        .map_err(|source| EngineError::Io {
            action: "read a layer".into(),
            source,
        })?
        .get(..4)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    Ok(if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(blob))
    } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(blob).map_err(|source| EngineError::Io {
                action: "read a zstd layer".into(),
                source,
            })?,
        )
    } else {
        Box::new(blob)
    })
}

/// The top-level names a layer adds (`Some`) or removes with a whiteout (`None`), in order: how
/// the runner knows which mount points an image has without looking through the engine (whose
/// own mount points would hide the answer).
pub(crate) fn top_level_entries(
    store: &Store,
    layer: &LayerRef,
) -> Result<Vec<(String, bool)>, EngineError> {
    let blob = store
        .open_blob(&layer.digest)
        .map_err(|e| EngineError::Io {
            action: format!("open layer {}", layer.digest),
            source: io::Error::other(e.to_string()),
        })?;
    let mut archive = tar::Archive::new(decompressor(io::BufReader::new(blob))?);
    let mut found = Vec::new();
    let read_error = |source| EngineError::Io {
        action: format!("read layer {}", layer.digest),
        source,
    };
    for entry in archive.entries().map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let path = entry.path().map_err(read_error)?.into_owned();
        let mut components = path
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)));
        let (Some(first), None) = (components.next(), components.next()) else {
            continue;
        };
        let name = first.as_os_str().to_string_lossy().into_owned();
        match name.strip_prefix(crate::build::layer::WHITEOUT_PREFIX) {
            Some(hidden) => found.push((hidden.to_owned(), false)),
            None => found.push((name, true)),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_and_streams_end_cleanly() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"one\r\ntw"), ["one"]);
        assert_eq!(splitter.push(b"o\nthree"), ["two"]);
        assert_eq!(splitter.finish().as_deref(), Some("three"));
        assert_eq!(splitter.finish(), None);
        let long = vec![b'x'; MAX_LINE_BYTES + 3];
        let pieces = splitter.push(&long);
        assert_eq!(pieces.len(), 1);
        assert_eq!(splitter.finish().unwrap().len(), 3);
    }

    #[test]
    fn variables_go_in_before_the_script_quoted_for_the_shell() {
        let mut step = StepSpec::new("/", "s", "echo hi\n", Duration::from_secs(1));
        step.env.insert("A".into(), "it's\ntwo lines".into());
        step.env.insert("B".into(), "$HOME `x`".into());
        let input = String::from_utf8(step_input(&step)).unwrap();
        assert_eq!(
            input,
            "3\nexport A='it'\\''s\ntwo lines'\nexport B='$HOME `x`'\necho hi\n"
        );
    }

    #[test]
    fn scripts_run_as_the_namespace_runner_runs_them() {
        assert_eq!(step_command("echo hi")[4..], ["/bin/sh", "-e"]);
        assert_eq!(
            step_command("#!/bin/busybox sh\necho hi")[4..],
            ["/bin/busybox", "sh"]
        );
        assert_eq!(
            step_command("#!/usr/bin/python3\n")[4..],
            ["/usr/bin/python3"]
        );
        assert_eq!(step_command("x")[3], SCRIPT_PATH);
    }
}
