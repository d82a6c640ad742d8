//! Finding the Docker Engine as the docker CLI does, connecting to it, and telling apart the
//! ways that fails: nobody listening, no permission on the socket, an API that is too old.
//!
//! Discovery order (the CLI's): `DOCKER_HOST`; then the context named by `DOCKER_CONTEXT` or by
//! `currentContext` in `$DOCKER_CONFIG/config.json` (default `~/.docker`), whose endpoint is in
//! `contexts/meta/<sha256 of the name>/meta.json`; then `/var/run/docker.sock`.

use std::io;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use super::EngineError;

/// The oldest Engine API bake speaks: Docker Engine 20.10 (Debian bookworm's `docker.io`), the
/// oldest engine bake is tested against. Everything the runner uses (changes, export, archive,
/// image load, labels, tmpfs mounts) is at least that old.
pub const MIN_API_VERSION: (u32, u32) = (1, 41);

/// The engine's socket when nothing else names one.
const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// How long one request may take before bollard gives up: image loads and exports of large
/// roots take a while; a step's own timeout is enforced by bake, not by this.
const REQUEST_TIMEOUT_SECONDS: u64 = 3600;

/// Where the engine is, and what said so (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineAddress {
    pub socket: PathBuf,
    /// `DOCKER_HOST`, `context NAME` or `the default socket`.
    pub found_by: String,
}

impl EngineAddress {
    /// The engine at a Unix socket.
    pub fn unix(socket: impl Into<PathBuf>) -> Self {
        EngineAddress {
            socket: socket.into(),
            found_by: "the caller".into(),
        }
    }
}

/// The engine the docker CLI would talk to, from this process's environment.
pub fn discover() -> Result<EngineAddress, EngineError> {
    let config_dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")));
    discover_in(
        std::env::var("DOCKER_HOST").ok().as_deref(),
        std::env::var("DOCKER_CONTEXT").ok().as_deref(),
        config_dir.as_deref(),
    )
}

/// [`discover`] with its inputs given.
pub(crate) fn discover_in(
    docker_host: Option<&str>,
    docker_context: Option<&str>,
    config_dir: Option<&Path>,
) -> Result<EngineAddress, EngineError> {
    if let Some(host) = docker_host.filter(|h| !h.is_empty()) {
        return Ok(EngineAddress {
            socket: unix_socket(host, "DOCKER_HOST")?,
            found_by: "DOCKER_HOST".into(),
        });
    }
    let context = match docker_context.filter(|c| !c.is_empty()) {
        Some(context) => Some(context.to_owned()),
        None => match config_dir {
            Some(dir) => current_context(&dir.join("config.json"))?,
            None => None,
        },
    };
    if let (Some(context), Some(dir)) = (context, config_dir)
        && context != "default"
    {
        let hex = hex::encode(sha2::Sha256::digest(context.as_bytes()));
        let meta = dir.join("contexts/meta").join(hex).join("meta.json");
        let context_error = |source| EngineError::Context {
            context: context.clone(),
            path: meta.clone(),
            source,
        };
        let text = fs_err::read_to_string(&meta).map_err(context_error)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| context_error(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        let host = value
            .pointer("/Endpoints/docker/Host")
            .and_then(|h| h.as_str())
            .ok_or_else(|| {
                context_error(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "no Endpoints.docker.Host in the context",
                ))
            })?;
        return Ok(EngineAddress {
            socket: unix_socket(host, &format!("context `{context}`"))?,
            found_by: format!("context `{context}`"),
        });
    }
    Ok(EngineAddress {
        socket: PathBuf::from(DEFAULT_SOCKET),
        found_by: "the default socket".into(),
    })
}

/// `currentContext` from the CLI's config file, if it has one.
fn current_context(config: &Path) -> Result<Option<String>, EngineError> {
    let text = match fs_err::read_to_string(config) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(EngineError::Context {
                context: "(current)".into(),
                path: config.to_path_buf(),
                source,
            });
        }
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| EngineError::Context {
            context: "(current)".into(),
            path: config.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
    Ok(value
        .get("currentContext")
        .and_then(|c| c.as_str())
        .filter(|c| !c.is_empty())
        .map(str::to_owned))
}

fn unix_socket(host: &str, source_name: &str) -> Result<PathBuf, EngineError> {
    match host.strip_prefix("unix://") {
        Some(path) if path.starts_with('/') => Ok(PathBuf::from(path)),
        _ => Err(EngineError::UnsupportedHost {
            value: host.to_owned(),
            source_name: source_name.to_owned(),
        }),
    }
}

/// Connects and checks the API version; returns the client (negotiated down to the engine's
/// version) and that version.
pub(super) async fn connect(
    address: &EngineAddress,
) -> Result<(bollard::Docker, String), EngineError> {
    let socket = &address.socket;
    let unreachable = |source| EngineError::Unreachable {
        socket: socket.clone(),
        source,
    };
    // Checked here rather than left to bollard, to tell "missing" from "not allowed".
    if let Err(error) = fs_err::symlink_metadata(socket) {
        return Err(unreachable(error));
    }
    let client = bollard::Docker::connect_with_unix(
        &socket.to_string_lossy(),
        REQUEST_TIMEOUT_SECONDS,
        bollard::API_DEFAULT_VERSION,
    )
    .map_err(|e| unreachable(io::Error::other(e)))?;
    let version = client
        .version()
        .await
        .map_err(|error| classify(socket, error))?;
    let found = version.api_version.unwrap_or_default();
    if parse_version(&found).is_none_or(|v| v < MIN_API_VERSION) {
        return Err(EngineError::ApiTooOld {
            socket: socket.clone(),
            found: if found.is_empty() {
                "(none)".into()
            } else {
                found
            },
            needed: format!("{}.{}", MIN_API_VERSION.0, MIN_API_VERSION.1),
        });
    }
    let client = client
        .negotiate_version()
        .await
        .map_err(|error| classify(socket, error))?;
    Ok((client, found))
}

/// `1.41` as `(1, 41)`.
fn parse_version(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Turns a failed first request into the error that says what is wrong.
fn classify(socket: &Path, error: bollard::errors::Error) -> EngineError {
    let io_kind = io_error_kind(&error);
    let source = io::Error::new(
        io_kind.unwrap_or(io::ErrorKind::Other),
        crate::diagnostic::error_chain(&error),
    );
    match io_kind {
        Some(io::ErrorKind::PermissionDenied) => EngineError::PermissionDenied {
            socket: socket.to_path_buf(),
            source,
        },
        _ => EngineError::Unreachable {
            socket: socket.to_path_buf(),
            source,
        },
    }
}

/// The kind of the first I/O error in `error`'s chain.
fn io_error_kind(error: &(dyn std::error::Error + 'static)) -> Option<io::ErrorKind> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(io) = error.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_comes_first_then_the_context_then_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let found =
            discover_in(Some("unix:///run/x.sock"), Some("other"), Some(dir.path())).unwrap();
        assert_eq!(found.socket, Path::new("/run/x.sock"));
        assert_eq!(found.found_by, "DOCKER_HOST");

        assert_eq!(
            discover_in(None, None, Some(dir.path())).unwrap().socket,
            Path::new(DEFAULT_SOCKET)
        );

        fs_err::write(
            dir.path().join("config.json"),
            r#"{"currentContext": "ci"}"#,
        )
        .unwrap();
        let hex = hex::encode(sha2::Sha256::digest(b"ci"));
        let meta = dir.path().join("contexts/meta").join(hex);
        fs_err::create_dir_all(&meta).unwrap();
        fs_err::write(
            meta.join("meta.json"),
            r#"{"Name":"ci","Endpoints":{"docker":{"Host":"unix:///run/ci.sock"}}}"#,
        )
        .unwrap();
        let found = discover_in(None, None, Some(dir.path())).unwrap();
        assert_eq!(found.socket, Path::new("/run/ci.sock"));
        assert_eq!(found.found_by, "context `ci`");
        // DOCKER_CONTEXT overrides the config file; `default` is the default socket.
        assert_eq!(
            discover_in(None, Some("default"), Some(dir.path()))
                .unwrap()
                .socket,
            Path::new(DEFAULT_SOCKET)
        );
        assert!(matches!(
            discover_in(None, Some("missing"), Some(dir.path())),
            Err(EngineError::Context { .. })
        ));
    }

    #[test]
    fn only_unix_sockets_are_accepted() {
        let error = discover_in(Some("tcp://127.0.0.1:2375"), None, None).unwrap_err();
        assert!(matches!(error, EngineError::UnsupportedHost { .. }));
        assert!(error.hint().unwrap().contains("unix://"));
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("1.9").unwrap() < MIN_API_VERSION);
        assert!(parse_version("1.41").unwrap() >= MIN_API_VERSION);
        assert!(parse_version("1.100").unwrap() > MIN_API_VERSION);
        assert_eq!(parse_version("x"), None);
    }
}
