//! Where a build starts: turning a recipe's base into layers in the store (and, for a base
//! that is not already an image, a tarball to unpack). Each kind of base is resolved the same
//! way, so a registry pull plugs in as one more arm of [`BaseSource`].

use std::path::{Path, PathBuf};
use std::process::Command;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

use crate::artifact::oci::LayerRef;
use crate::plan::archive::{ArchiveMoved, PinnedArchive, check_bootstrapped};
use crate::recipe::{Bootstrap, Distro};

/// A base, ready to unpack.
#[derive(Debug, Clone)]
pub enum BaseSource {
    /// Nothing: an empty root.
    Scratch,
    /// A root filesystem tarball (plain, gzip or zstd) to unpack and turn into one base layer.
    Tarball(PathBuf),
    /// Layers of an existing image, already in (or copied into) the store.
    Image {
        layers: Vec<LayerRef>,
        history: Vec<crate::artifact::oci::HistoryEntry>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("mmdebstrap is not installed, so bake cannot bootstrap `{suite}`")]
    NoMmdebstrap { suite: String },
    #[error("failed to start mmdebstrap")]
    Spawn(#[source] std::io::Error),
    #[error("mmdebstrap failed to bootstrap `{suite}` (exit {code}):\n{tail}")]
    Bootstrap {
        suite: String,
        code: i32,
        tail: String,
    },
    #[error("failed to read OCI layout `{}`", path.display())]
    Layout {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("OCI layout `{}` is invalid: {reason}", path.display())]
    BadLayout { path: PathBuf, reason: String },
    #[error(transparent)]
    ArchiveMoved(Box<ArchiveMoved>),
}

impl BaseError {
    pub fn hint(&self) -> Option<String> {
        match self {
            BaseError::NoMmdebstrap { .. } => Some("install it with `apt-get install mmdebstrap` (Debian and Ubuntu)".into()),
            BaseError::Bootstrap { .. } => Some("check the suite, packages and mirror; mmdebstrap needs network access to the mirror".into()),
            BaseError::ArchiveMoved(_) => Some("plan and build again: the new plan pins the archive's new state (a new version)".into()),
            _ => None,
        }
    }
}

/// mmdebstrap's hooks that make `file://` mirrors reachable from the chroot.
const FILE_MIRROR_HOOKS: &str = "/usr/share/mmdebstrap/hooks/file-mirror-automount";

/// The last lines of a failing tool's output worth showing.
const ERROR_TAIL_LINES: usize = 20;

/// Bootstraps `bootstrap` for `architecture` (`amd64`, `arm64`) into the tarball `out` with
/// mmdebstrap, reproducibly: `SOURCE_DATE_EPOCH` fixes every timestamp mmdebstrap writes. The
/// Release files apt read are checked against `pinned` (the plan's): a root made from another
/// state of an archive is an error naming it.
pub fn bootstrap(
    bootstrap: &Bootstrap,
    pinned: &[PinnedArchive],
    architecture: &str,
    source_date_epoch: u64,
    out: &Path,
) -> Result<(), BaseError> {
    let program = which("mmdebstrap").ok_or_else(|| BaseError::NoMmdebstrap {
        suite: bootstrap.suite.clone(),
    })?;
    let mut command = Command::new(program);
    command
        .arg(format!("--variant={}", bootstrap.variant))
        .arg(format!("--architectures={architecture}"))
        .arg(format!("--components={}", bootstrap.components.join(",")))
        .arg("--format=tar")
        .arg("--quiet");
    if !bootstrap.packages.is_empty() {
        command.arg(format!("--include={}", bootstrap.packages.join(",")));
    }
    if let Some(keyring) = &bootstrap.keyring_path {
        command.arg(format!("--keyring={}", keyring.display()));
    } else if bootstrap.distro == Distro::Ubuntu {
        command.arg("--keyring=/usr/share/keyrings/ubuntu-archive-keyring.gpg");
    }
    // A `file://` archive is outside the chroot apt runs in: mmdebstrap's own hook bind-mounts
    // (or copies) it in.
    if bootstrap
        .archives()
        .iter()
        .any(|a| a.mirror.starts_with("file://"))
    {
        command.arg(format!("--hook-dir={FILE_MIRROR_HOOKS}"));
    }
    // apt's lists, copied out before mmdebstrap removes them, say which Release files it read.
    let lists = out.with_extension("apt-lists");
    std::fs::create_dir_all(&lists).map_err(|source| BaseError::Layout {
        path: lists.clone(),
        source,
    })?;
    command
        .arg(format!(
            "--customize-hook=sync-out /var/lib/apt/lists {}",
            lists.display()
        ))
        .arg(&bootstrap.suite)
        .arg(out)
        .arg(&bootstrap.mirror);
    for extra in &bootstrap.suites {
        command.arg(format!(
            "deb {} {} {}",
            extra.mirror,
            extra.suite,
            bootstrap.components.join(" ")
        ));
    }
    command
        .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
        .env("LC_ALL", "C.UTF-8");
    let progress = crate::progress::Task::new(
        format!("bootstrap {}", bootstrap.suite),
        None,
        crate::progress::Unit::Count("packages"),
    );
    progress.message("mmdebstrap");
    let output = command.output().map_err(BaseError::Spawn)?;
    drop(progress);
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(ERROR_TAIL_LINES)..].join("\n");
        return Err(BaseError::Bootstrap {
            suite: bootstrap.suite.clone(),
            code: output.status.code().unwrap_or(-1),
            tail,
        });
    }
    let checked = check_bootstrapped(&lists, pinned);
    let _ = std::fs::remove_dir_all(&lists);
    checked.map_err(BaseError::ArchiveMoved)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Reads the image `manifest_digest` of the layout at `dir`: its manifest and config. When the
/// digest names an index (a multi-platform image), the manifest for `architecture` (OCI name,
/// such as `amd64`) on Linux is chosen.
pub fn layout_image(
    dir: &Path,
    manifest_digest: &str,
    architecture: &str,
) -> Result<(ImageManifest, ImageConfiguration), BaseError> {
    let blob = |digest: &str| -> Result<Vec<u8>, BaseError> {
        // Parsed, not sliced: the digest names a file, so it must be exactly 64 hex digits.
        let parsed: crate::id::Digest = digest.parse().map_err(|_| BaseError::BadLayout {
            path: dir.to_path_buf(),
            reason: format!("unsupported digest `{digest}`"),
        })?;
        let path = dir.join("blobs/sha256").join(parsed.hex());
        let bytes = fs_err::read(&path).map_err(|source| BaseError::Layout {
            path: path.clone(),
            source,
        })?;
        let actual = crate::plan::hash::bytes_digest(&bytes);
        if actual != digest {
            return Err(BaseError::BadLayout {
                path: dir.to_path_buf(),
                reason: format!("blob {digest} has digest {actual}"),
            });
        }
        Ok(bytes)
    };
    let bytes = blob(manifest_digest)?;
    let manifest: ImageManifest = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(_) => {
            let index: ImageIndex =
                serde_json::from_slice(&bytes).map_err(|e| BaseError::BadLayout {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "{manifest_digest} is neither an image manifest nor an index: {e}"
                    ),
                })?;
            let platform_matches = |d: &&oci_spec::image::Descriptor| {
                d.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == architecture
                })
            };
            let chosen = index
                .manifests()
                .iter()
                .find(platform_matches)
                .or_else(|| match index.manifests().as_slice() {
                    // A single entry without a platform is the image whatever its platform.
                    [only] if only.platform().is_none() => Some(only),
                    _ => None,
                })
                .ok_or_else(|| BaseError::BadLayout {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "its index {manifest_digest} has no linux/{architecture} image"
                    ),
                })?;
            return layout_image(dir, chosen.digest().as_ref(), architecture);
        }
    };
    let config_bytes = blob(manifest.config().digest().as_ref())?;
    let config: ImageConfiguration =
        serde_json::from_slice(&config_bytes).map_err(|e| BaseError::BadLayout {
            path: dir.to_path_buf(),
            reason: format!("its config is invalid: {e}"),
        })?;
    if config.rootfs().diff_ids().len() != manifest.layers().len() {
        return Err(BaseError::BadLayout {
            path: dir.to_path_buf(),
            reason: "the config's diff_ids do not match the manifest's layers".into(),
        });
    }
    Ok((manifest, config))
}
