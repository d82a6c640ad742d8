//! OCI registries and Amazon ECR: pulling bases, pushing what bake builds.
//!
//! The public API (stable; publishing and provenance build on it):
//!
//! - [`Reference`]: `[registry/]repository[:tag][@digest]`, parsed strictly
//!   (`"127.0.0.1:5000/app:1".parse::<Reference>()`, `Display` prints it back).
//! - [`Client`]: one per run, from [`ClientOptions`] (insecure hosts, CA file, endpoint
//!   overrides, retries, parallelism, chunked uploads) and a [`Credentials`] source
//!   ([`auth::DockerConfig`], [`auth::StaticCredentials`], [`ecr::EcrCredentials`],
//!   [`auth::ChainCredentials`]). Calls:
//!   [`Client::head_manifest`] → `Option<ManifestInfo>` (digest, media type, size),
//!   [`Client::get_manifest`] (verified bytes), [`Client::put_manifest`]`(repo, tag_or_digest,
//!   media_type, bytes)`, [`Client::blob_exists`], [`Client::push_blob`] (from the store),
//!   [`Client::get_blob`] (verified, into the store), [`Client::mount_blob`],
//!   [`Client::list_tags`], [`Client::referrers`] (API, else the `sha256-<hex>` tag schema),
//!   [`Client::push_referrer`] (a manifest with a `subject`, indexed by the registry or, without
//!   `OCI-Subject`, added to the `sha256-<hex>` tag index), [`Client::put_manifest_full`].
//! - [`push::push_image`]`(client, store, manifest_digest, targets, progress)`: the whole image
//!   (index → manifests → config and layers) to each [`push::PushTarget`], skipping blobs the
//!   registry has, mounting across repositories where it can, manifests after their blobs.
//! - [`pull::resolve`] (tag → digest, for plans) and [`pull::pull_image`] (a pinned image, the
//!   recipe's platform picked from an index, every blob verified into the store).
//! - [`ecr::ensure_repository`]: create an ECR repository with the recipe's settings, or report
//!   how an existing one differs (never changed silently).
//!
//! Transport rules: HTTPS with the system roots plus an optional CA file; plain HTTP only for
//! loopback registries and those listed as insecure. Idempotent requests are retried on
//! connection errors, 408, 429 and 5xx with exponential backoff and jitter, honouring
//! `Retry-After`; a blob upload that fails on the way restarts with a fresh session.
//! Credentials never appear in logs or errors ([`auth::Secret`] redacts itself).

pub mod auth;
pub mod client;
pub mod ecr;
pub mod fetch;
pub mod pull;
pub mod push;
pub mod reference;

use std::path::PathBuf;
use std::sync::Arc;

pub use auth::{Credential, Credentials};
pub use client::{
    Client, ClientOptions, ClientStats, Deletion, Manifest, ManifestInfo, PutManifest,
};
pub use reference::{Reference, ReferenceError};

use crate::store::StoreError;

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("failed to read `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA file `{}` cannot be used: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("failed to set up the HTTP client: {reason}")]
    HttpClient { reason: String },
    #[error("registry `{registry}` cannot be reached")]
    Unreachable {
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("failed to {what} on `{registry}`")]
    Http {
        registry: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("failed to {what}: `{registry}` answered {status}{}{}", code.as_ref().map(|c| format!(" {c}")).unwrap_or_default(), if message.is_empty() { String::new() } else { format!(": {message}") })]
    Status {
        registry: String,
        what: String,
        status: u16,
        code: Option<String>,
        message: String,
    },
    #[error("failed to {what}: `{registry}` refused {} ({detail})", if *had_credentials { "the credentials" } else { "anonymous access" })]
    Unauthorized {
        registry: String,
        what: String,
        had_credentials: bool,
        detail: String,
    },
    #[error("failed to {what}: `{registry}` does not follow the distribution spec: {reason}")]
    Protocol {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("{what} has digest {actual}, not {expected}; it was refused and nothing was stored")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error(
        "{what} has {actual} bytes, not the {expected} its descriptor declares; it was refused"
    )]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} is larger than bake accepts ({limit} bytes)")]
    TooLarge { what: String, limit: u64 },
    #[error("image `{reference}` does not exist")]
    ManifestUnknown { reference: String },
    #[error("image `{reference}` has no {platform} image in its index (it has: {available})")]
    NoPlatform {
        reference: String,
        platform: String,
        available: String,
    },
    #[error("`{what}` is not an image manifest or index: {reason}")]
    NotAnImage { what: String, reason: String },
    #[error(
        "tag `{tag}` of `{repository}` already points at {existing}, and the repository's tags are immutable; cannot point it at {wanted}"
    )]
    ImmutableTag {
        repository: String,
        tag: String,
        existing: String,
        wanted: String,
    },
    #[error(transparent)]
    Ecr(#[from] ecr::EcrError),
}

impl RegistryError {
    /// Worth retrying: the network or the registry hiccuped; the content was not wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Http { source, .. } | RegistryError::Unreachable { source, .. } => {
                source.is_connect()
                    || source.is_timeout()
                    || source.is_request()
                    || source.is_body()
                    || source.is_decode()
            }
            RegistryError::Status { status, code, .. } => {
                *status == 408
                    || *status == 429
                    || *status >= 500
                    // A session the registry lost (after a cut upload) is started again.
                    || code.as_deref().is_some_and(|c| {
                        c.contains("BLOB_UPLOAD_UNKNOWN") || c.contains("BLOB_UPLOAD_INVALID")
                    })
            }
            // A body cut short shows up as fewer bytes than declared.
            RegistryError::SizeMismatch {
                actual, expected, ..
            } => actual < expected,
            _ => false,
        }
    }

    /// A fix bake knows, if any.
    pub fn hint(&self) -> Option<String> {
        match self {
            RegistryError::Unauthorized {
                had_credentials: false,
                registry,
                ..
            } => Some(format!(
                "log in to `{registry}` (`docker login {registry}` writes ~/.docker/config.json, which bake reads)"
            )),
            RegistryError::Unauthorized {
                had_credentials: true,
                ..
            } => Some("check the user name and password (or token) for this registry".into()),
            RegistryError::Unreachable { registry, .. } => Some(format!(
                "check that `{registry}` is up; a registry without TLS needs `--insecure-registry {registry}` (plain HTTP is used by default only on loopback)"
            )),
            RegistryError::CaFile { .. } => {
                Some("give a PEM file with one or more CA certificates".into())
            }
            RegistryError::Status { status: 404, code, .. }
                if code.as_deref().is_some_and(|c| c.contains("NAME_UNKNOWN")) =>
            {
                Some("the repository does not exist on the registry; create it first (for ECR, set `create: true`)".into())
            }
            RegistryError::ImmutableTag { .. } => Some(
                "use a tag that includes the version (such as `{{version_short}}`), or delete the old tag"
                    .into(),
            ),
            RegistryError::Ecr(e) => e.hint(),
            _ => None,
        }
    }

    /// Whether the user's input (a reference, a tag) is at fault rather than the environment.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            RegistryError::Reference(_)
                | RegistryError::ImmutableTag { .. }
                | RegistryError::NoPlatform { .. }
                | RegistryError::ManifestUnknown { .. }
                | RegistryError::CaFile { .. }
        )
    }
}

/// What happened to one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobOutcome {
    /// The registry (or, for pulls, the store) already had it.
    Present,
    Mounted,
    Uploaded,
    Downloaded,
}

/// Progress of blob transfers, reported by the library and drawn by the CLI.
pub trait Progress: Send + Sync {
    /// A transfer of `digest` (`size` bytes) is about to start.
    fn blob_started(&self, _digest: &str, _size: u64) {}
    /// `n` more bytes of `digest` went over the wire.
    fn blob_bytes(&self, _digest: &str, _n: u64) {}
    /// A failed transfer of `digest` starts over.
    fn blob_restart(&self, _digest: &str) {}
    /// `digest` is done.
    fn blob_done(&self, _digest: &str, _size: u64, _outcome: BlobOutcome) {}
    /// A byte counter for `digest`, for streamed bodies that outlive the borrow of `self`.
    fn sink(&self, _digest: &str) -> Arc<dyn Fn(u64) + Send + Sync> {
        Arc::new(|_| {})
    }
}

/// Progress that goes nowhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// Registry settings resolved from the command line and the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistrySettings {
    /// Registries spoken to over plain HTTP (`BAKE_INSECURE_REGISTRIES`, comma-separated).
    pub insecure: Vec<String>,
    /// Extra CA certificates (`BAKE_REGISTRY_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// `host=url` overrides (`BAKE_REGISTRY_ENDPOINTS`, comma-separated).
    pub endpoints: Vec<(String, String)>,
    /// Docker's config file (`DOCKER_CONFIG`/`config.json`, else `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
    /// AWS settings, for ECR registries' tokens.
    pub aws: Option<crate::aws::AwsSettings>,
}

impl RegistrySettings {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let list = |name: &str| -> Vec<String> {
            var(name)
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default()
        };
        RegistrySettings {
            insecure: list("BAKE_INSECURE_REGISTRIES"),
            ca_file: var("BAKE_REGISTRY_CA_FILE").map(PathBuf::from),
            endpoints: list("BAKE_REGISTRY_ENDPOINTS")
                .into_iter()
                .filter_map(|e| {
                    e.split_once('=')
                        .map(|(h, u)| (h.trim().to_owned(), u.trim().to_owned()))
                })
                .collect(),
            docker_config: auth::DockerConfig::default_location().map(|c| c.path().to_path_buf()),
            aws: None,
        }
    }

    /// Client options from these settings.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            insecure: self.insecure.clone(),
            ca_file: self.ca_file.clone(),
            endpoints: self.endpoints.iter().cloned().collect(),
            ..ClientOptions::default()
        }
    }

    /// The credential sources these settings name (Docker's config file), without ECR.
    pub fn credentials(&self) -> Arc<dyn Credentials> {
        match &self.docker_config {
            Some(path) => Arc::new(auth::DockerConfig::at(path)),
            None => Arc::new(auth::StaticCredentials::default()),
        }
    }

    /// Credentials for talking to `host`: Docker's config file, and for an ECR registry host
    /// (with AWS settings) ECR tokens as well.
    pub async fn credentials_for(&self, host: &str) -> Arc<dyn Credentials> {
        let docker = self.credentials();
        match (&self.aws, ecr::ecr_region(host)) {
            (Some(aws), Some(_)) => {
                let aws = crate::aws::Aws::load(aws).await;
                Arc::new(auth::ChainCredentials(vec![
                    docker,
                    Arc::new(ecr::EcrCredentials::new(aws)),
                ]))
            }
            _ => docker,
        }
    }
}

/// Resolves base image tags to digests for plans, through the registry. Plans are synchronous,
/// so each resolution runs on a private runtime in its own thread (safe whether or not the
/// caller is inside a runtime).
#[derive(Debug, Clone)]
pub struct RegistryResolver {
    settings: RegistrySettings,
}

impl RegistryResolver {
    pub fn new(settings: RegistrySettings) -> Self {
        RegistryResolver { settings }
    }
}

impl crate::plan::base::ImageResolver for RegistryResolver {
    fn resolve(
        &self,
        reference: &Reference,
    ) -> std::result::Result<ManifestInfo, Box<dyn std::error::Error + Send + Sync>> {
        let settings = self.settings.clone();
        let reference = reference.clone();
        let run = move || -> std::result::Result<ManifestInfo, RegistryError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| RegistryError::Io {
                    path: PathBuf::from("<tokio runtime>"),
                    source,
                })?;
            runtime.block_on(async {
                let credentials = settings.credentials_for(reference.registry()).await;
                let client = Client::new(settings.client_options(), credentials)?;
                pull::resolve(&client, &reference).await
            })
        };
        std::thread::spawn(run)
            .join()
            .map_err(|_| "the registry resolver thread panicked")?
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    }
}
