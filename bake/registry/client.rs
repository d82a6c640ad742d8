//! The registry HTTP client: one `reqwest` client per run, authentication per host and scope,
//! retries with backoff, and the distribution-spec calls bake makes.
//!
//! Every call that reads content verifies it: manifests against the digest asked for (or the
//! one computed, when the registry's `Docker-Content-Digest` disagrees, the answer is refused),
//! blobs against their digest and declared size while they stream into the store, so nothing
//! unverified is ever stored.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt;

use super::auth::{Challenge, Credential, Credentials, Secret, StaticCredentials, TokenAnswer};
use super::reference::{Reference, is_loopback_host};
use super::{RegistryError, Result};
use crate::store::Store;

/// Attempts per request (the first included). With the backoff below, six attempts wait about
/// 15 s in total: enough to ride out a registry restart or a throttling burst, short enough
/// not to hide an outage.
pub const MAX_ATTEMPTS: u32 = 6;
/// First backoff; doubled per attempt, with jitter, up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(8);
/// The longest `Retry-After` bake honours; a registry asking for more is treated as down.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Concurrent blob transfers: enough to keep a link busy with a few large layers without
/// opening dozens of connections to one registry.
pub const DEFAULT_PARALLELISM: usize = 4;
/// Manifests larger than this are refused (the distribution spec's suggested lower bound for
/// what registries accept is 4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
/// A token is renewed this long before the registry says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);
/// Token lifetime when the token service names none (the token spec's default).
const DEFAULT_TOKEN_LIFETIME: u64 = 60;
/// Connecting to a registry should be quick; a registry that accepts but never answers is
/// caught by the read timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a loopback registry gets to answer a TLS handshake before bake tries plain HTTP.
const LOOPBACK_TLS_PROBE: Duration = Duration::from_secs(2);
/// Blobs up to this size are read into memory for upload (cheap to resend on a retry);
/// larger ones stream from the store file.
const IN_MEMORY_BLOB: u64 = 8 * 1024 * 1024;
/// Read size when streaming a blob file.
const STREAM_CHUNK: usize = 1024 * 1024;

/// The media types bake accepts for manifests, in the `Accept` header.
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Settings of a registry client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Registries (`host[:port]`) spoken to over plain HTTP even though they are not on
    /// loopback.
    pub insecure: Vec<String>,
    /// Extra trusted CA certificates (PEM), added to the system roots.
    pub ca_file: Option<PathBuf>,
    /// Registry host → base URL to use instead (`http://127.0.0.1:5000`): a mirror, or a local
    /// stand-in for a registry host (tests use it for ECR's data plane).
    pub endpoints: BTreeMap<String, String>,
    /// Attempts per request, including the first.
    pub max_attempts: u32,
    /// First backoff between attempts (doubled each time, with jitter).
    pub base_backoff: Duration,
    /// Concurrent blob transfers.
    pub parallelism: usize,
    /// Upload blobs in chunks of this many bytes (`PATCH`es) instead of one `PUT`.
    pub chunk_size: Option<u64>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: Vec::new(),
            ca_file: None,
            endpoints: BTreeMap::new(),
            max_attempts: MAX_ATTEMPTS,
            base_backoff: BASE_BACKOFF,
            parallelism: DEFAULT_PARALLELISM,
            chunk_size: None,
        }
    }
}

/// What a manifest `HEAD` (or `GET`) tells about a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestInfo {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
}

/// What a manifest `PUT` answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PutManifest {
    /// The digest of the bytes sent (checked against the registry's answer).
    pub digest: String,
    /// `OCI-Subject`: the registry indexed the manifest's subject for the referrers API.
    pub subject: Option<String>,
}

/// A manifest as fetched: its verified bytes and what they are.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub info: ManifestInfo,
    pub bytes: Bytes,
}

/// Counters of what a client did, for reports and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClientStats {
    pub requests: u64,
    pub retries: u64,
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    pub blobs_mounted: u64,
    pub blobs_downloaded: u64,
    pub bytes_downloaded: u64,
    pub token_requests: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    blobs_uploaded: AtomicU64,
    bytes_uploaded: AtomicU64,
    blobs_mounted: AtomicU64,
    blobs_downloaded: AtomicU64,
    bytes_downloaded: AtomicU64,
    token_requests: AtomicU64,
}

/// What bake knows about one registry host.
#[derive(Debug, Clone)]
struct HostState {
    /// `https://host` or `http://host`.
    base: String,
    challenge: Option<Challenge>,
}

/// A bearer token and when to stop using it.
struct Token {
    value: Secret,
    renew_at: Instant,
}

/// A registry client. Cheap to clone (shared state).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    options: ClientOptions,
    credentials: Arc<dyn Credentials>,
    hosts: Mutex<HashMap<String, HostState>>,
    tokens: Mutex<HashMap<(String, String), Token>>,
    token_fetch: tokio::sync::Mutex<()>,
    counters: Counters,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("options", &self.inner.options)
            .field("credentials", &self.inner.credentials)
            .finish_non_exhaustive()
    }
}

/// The scope a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Pull,
    Push,
    Delete,
}

impl Client {
    /// A client with the given options and credential source.
    pub fn new(options: ClientOptions, credentials: Arc<dyn Credentials>) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("bake/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .pool_max_idle_per_host(options.parallelism.max(1) * 2);
        if let Some(path) = &options.ca_file {
            let pem = fs_err::read(path).map_err(|source| RegistryError::CaFile {
                path: path.clone(),
                reason: source.to_string(),
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryError::CaFile {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(RegistryError::CaFile {
                    path: path.clone(),
                    reason: "it holds no PEM certificate".into(),
                });
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| RegistryError::HttpClient {
            reason: e.to_string(),
        })?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                options,
                credentials,
                hosts: Mutex::new(HashMap::new()),
                tokens: Mutex::new(HashMap::new()),
                token_fetch: tokio::sync::Mutex::new(()),
                counters: Counters::default(),
            }),
        })
    }

    /// An anonymous client with default options.
    pub fn anonymous() -> Result<Self> {
        Client::new(
            ClientOptions::default(),
            Arc::new(StaticCredentials::default()),
        )
    }

    /// A client with one credential for one host (tests, scripts).
    pub fn with_credential(
        options: ClientOptions,
        host: &str,
        credential: Credential,
    ) -> Result<Self> {
        Client::new(options, Arc::new(StaticCredentials::one(host, credential)))
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.options
    }

    /// What this client has done so far.
    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            requests: get(&c.requests),
            retries: get(&c.retries),
            blobs_uploaded: get(&c.blobs_uploaded),
            bytes_uploaded: get(&c.bytes_uploaded),
            blobs_mounted: get(&c.blobs_mounted),
            blobs_downloaded: get(&c.blobs_downloaded),
            bytes_downloaded: get(&c.bytes_downloaded),
            token_requests: get(&c.token_requests),
        }
    }

    // ---- the distribution API -------------------------------------------------------------

    /// `HEAD` a manifest: its digest, media type and size, or `None` if the registry does not
    /// have it. A registry that answers `HEAD` without a digest (ECR has been seen to) is asked
    /// with `GET`, and the digest computed.
    pub async fn head_manifest(&self, reference: &Reference) -> Result<Option<ManifestInfo>> {
        let path = format!(
            "/v2/{}/manifests/{}",
            reference.repository(),
            reference.reference()
        );
        let what = format!("check manifest `{reference}`");
        let response = self
            .send(reference, Access::Pull, &what, true, |http, base| {
                http.head(format!("{base}{path}"))
                    .header(header::ACCEPT, MANIFEST_MEDIA_TYPES.join(", "))
            })
            .await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(status_error(reference.registry(), &what, response).await),
        }
        let headers = response.headers();
        let digest = header_str(headers, "docker-content-digest");
        let media_type = header_str(headers, header::CONTENT_TYPE.as_str());
        let size = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match (digest, media_type, size) {
            (Some(digest), Some(media_type), Some(size)) if digest.starts_with("sha256:") => {
                if let Some(pinned) = reference.digest()
                    && pinned != digest
                {
                    return Err(RegistryError::DigestMismatch {
                        what: format!("manifest `{reference}`"),
                        expected: pinned.to_owned(),
                        actual: digest,
                    });
                }
                Ok(Some(ManifestInfo {
                    digest,
                    media_type,
                    size,
                }))
            }
            _ => Ok(self.get_manifest(reference).await?.map(|m| m.info)),
        }
    }

    /// `GET` a manifest, verified: against the digest in the reference if it has one, and
    /// against the registry's `Docker-Content-Digest` if it sends one.
    pub async fn get_manifest(&self, reference: &Reference) -> Result<Option<Manifest>> {
        let path = format!(
            "/v2/{}/manifests/{}",
            reference.repository(),
            reference.reference()
        );
        let what = format!("fetch manifest `{reference}`");
        let response = self
            .send(reference, Access::Pull, &what, true, |http, base| {
                http.get(format!("{base}{path}"))
                    .header(header::ACCEPT, MANIFEST_MEDIA_TYPES.join(", "))
            })
            .await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(status_error(reference.registry(), &what, response).await),
        }
        let claimed = header_str(response.headers(), "docker-content-digest");
        let header_type = header_str(response.headers(), header::CONTENT_TYPE.as_str());
        if response
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST_SIZE)
        {
            return Err(RegistryError::TooLarge {
                what: format!("manifest `{reference}`"),
                limit: MAX_MANIFEST_SIZE,
            });
        }
        let bytes = read_limited(response, MAX_MANIFEST_SIZE, reference.registry(), &what).await?;
        let actual = sha256_digest(&bytes);
        let expected = reference.digest().map(str::to_owned).or(claimed);
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("manifest `{reference}`"),
                expected,
                actual,
            });
        }
        // The document's own mediaType wins over a registry's guess in Content-Type.
        let media_type = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType")?.as_str().map(str::to_owned))
            .or(header_type)
            .unwrap_or_else(|| MANIFEST_MEDIA_TYPES[0].to_owned());
        Ok(Some(Manifest {
            info: ManifestInfo {
                digest: actual,
                media_type,
                size: bytes.len() as u64,
            },
            bytes,
        }))
    }

    /// `PUT` a manifest under `tag_or_digest` in `repository` (a reference without tag or
    /// digest). Returns the digest of the bytes sent; a registry that reports another digest
    /// is an error.
    pub async fn put_manifest(
        &self,
        repository: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String> {
        Ok(self
            .put_manifest_full(repository, tag_or_digest, media_type, bytes)
            .await?
            .digest)
    }

    /// [`Client::put_manifest`], also telling whether the registry processed a `subject`
    /// (its `OCI-Subject` answer header).
    pub async fn put_manifest_full(
        &self,
        repository: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<PutManifest> {
        let digest = sha256_digest(&bytes);
        let path = format!("/v2/{}/manifests/{tag_or_digest}", repository.repository());
        let what = format!(
            "push manifest {digest} to `{}` as `{tag_or_digest}`",
            repository.name()
        );
        let media_type = media_type.to_owned();
        let response = self
            .send(repository, Access::Push, &what, true, |http, base| {
                http.put(format!("{base}{path}"))
                    .header(header::CONTENT_TYPE, media_type.as_str())
                    .body(bytes.clone())
            })
            .await?;
        if response.status() != StatusCode::CREATED && response.status() != StatusCode::OK {
            return Err(status_error(repository.registry(), &what, response).await);
        }
        if let Some(returned) = header_str(response.headers(), "docker-content-digest")
            && returned != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("manifest pushed to `{}`", repository.name()),
                expected: digest,
                actual: returned,
            });
        }
        let subject = header_str(response.headers(), "oci-subject");
        Ok(PutManifest { digest, subject })
    }

    /// Pushes a manifest that has a `subject` (a signature, SBOM or attestation) by digest, and
    /// makes it findable as a referrer of its subject: through the registry's referrers API when
    /// it processed the subject (`OCI-Subject`), else by adding it to the index under the
    /// `sha256-<hex>` tag (the referrers tag schema). Its blobs must already be in the
    /// repository. Returns the manifest's digest.
    pub async fn push_referrer(
        &self,
        repository: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String> {
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| RegistryError::NotAnImage {
                what: "referrer manifest".into(),
                reason: e.to_string(),
            })?;
        let subject = value
            .pointer("/subject/digest")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| RegistryError::NotAnImage {
                what: "referrer manifest".into(),
                reason: "it has no `subject`".into(),
            })?
            .to_owned();
        super::reference::check_digest(&repository.name(), &subject)?;
        let digest = sha256_digest(&bytes);
        let pushed = self
            .put_manifest_full(repository, &digest, media_type, bytes.clone())
            .await?;
        if pushed.subject.is_some() {
            return Ok(digest);
        }
        let artifact_type = value
            .get("artifactType")
            .or_else(|| value.pointer("/config/mediaType"))
            .cloned();
        let mut descriptor = serde_json::json!({
            "mediaType": media_type,
            "digest": digest,
            "size": bytes.len(),
        });
        if let Some(artifact_type) = artifact_type {
            descriptor["artifactType"] = artifact_type;
        }
        if let Some(annotations) = value.get("annotations") {
            descriptor["annotations"] = annotations.clone();
        }
        let tag = subject.replacen(':', "-", 1);
        let tagged = repository.with_tag(&tag)?;
        let mut index =
            match self.get_manifest(&tagged).await? {
                Some(existing) => {
                    let index: serde_json::Value = serde_json::from_slice(&existing.bytes)
                        .map_err(|e| RegistryError::NotAnImage {
                            what: tagged.to_string(),
                            reason: e.to_string(),
                        })?;
                    if !index
                        .get("manifests")
                        .is_some_and(serde_json::Value::is_array)
                    {
                        return Err(RegistryError::NotAnImage {
                            what: tagged.to_string(),
                            reason: "the referrers tag does not hold an image index".into(),
                        });
                    }
                    index
                }
                None => serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [],
                }),
            };
        let manifests = index["manifests"]
            .as_array_mut()
            .expect("checked to be an array");
        if manifests
            .iter()
            .any(|m| m.get("digest").and_then(serde_json::Value::as_str) == Some(&digest))
        {
            return Ok(digest);
        }
        manifests.push(descriptor);
        let bytes = serde_json::to_vec(&index).expect("an index serializes");
        self.put_manifest(
            repository,
            &tag,
            "application/vnd.oci.image.index.v1+json",
            Bytes::from(bytes),
        )
        .await?;
        Ok(digest)
    }

    /// Whether `repository` has blob `digest` (`HEAD`).
    pub async fn blob_exists(&self, repository: &Reference, digest: &str) -> Result<bool> {
        let path = format!("/v2/{}/blobs/{digest}", repository.repository());
        let what = format!("check blob {digest} in `{}`", repository.name());
        let response = self
            .send(repository, Access::Pull, &what, true, |http, base| {
                http.head(format!("{base}{path}"))
            })
            .await?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(repository.registry(), &what, response).await),
        }
    }

    /// Downloads blob `digest` of `size` bytes from `repository` into the store, verified
    /// against both while it streams; nothing is stored unless both match. A blob already in the
    /// store is not downloaded again.
    pub async fn get_blob(
        &self,
        repository: &Reference,
        digest: &str,
        size: u64,
        store: &Store,
        progress: &dyn super::Progress,
    ) -> Result<()> {
        if store.has_blob(digest) {
            progress.blob_done(digest, size, super::BlobOutcome::Present);
            return Ok(());
        }
        let mut last_error = None;
        for attempt in 0..self.inner.options.max_attempts {
            if attempt > 0 {
                self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(self.backoff(attempt, None)).await;
            }
            match self
                .get_blob_once(repository, digest, size, store, progress)
                .await
            {
                Ok(()) => {
                    progress.blob_done(digest, size, super::BlobOutcome::Downloaded);
                    return Ok(());
                }
                // A stream cut in the middle is retried from the start; wrong content is not.
                Err(e) if e.is_transient() => {
                    tracing::debug!("download of {digest} failed, retrying: {e}");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("at least one attempt ran"))
    }

    async fn get_blob_once(
        &self,
        repository: &Reference,
        digest: &str,
        size: u64,
        store: &Store,
        progress: &dyn super::Progress,
    ) -> Result<()> {
        let path = format!("/v2/{}/blobs/{digest}", repository.repository());
        let what = format!("download blob {digest} from `{}`", repository.name());
        let response = self
            .send(repository, Access::Pull, &what, true, |http, base| {
                http.get(format!("{base}{path}"))
            })
            .await?;
        if response.status() != StatusCode::OK {
            return Err(status_error(repository.registry(), &what, response).await);
        }
        if let Some(length) = response.content_length()
            && length != size
        {
            return Err(RegistryError::SizeMismatch {
                what: format!("blob {digest} from `{}`", repository.name()),
                expected: size,
                actual: length,
            });
        }
        let temp = store.temp_file()?;
        let std_file = temp.reopen().map_err(|source| RegistryError::Io {
            path: temp.path().to_path_buf(),
            source,
        })?;
        let mut file = tokio::fs::File::from_std(std_file);
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        let mut stream = response.bytes_stream();
        use tokio::io::AsyncWriteExt;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| RegistryError::Http {
                registry: repository.registry().to_owned(),
                what: what.clone(),
                source,
            })?;
            received += chunk.len() as u64;
            if received > size {
                return Err(RegistryError::SizeMismatch {
                    what: format!("blob {digest} from `{}`", repository.name()),
                    expected: size,
                    actual: received,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|source| RegistryError::Io {
                    path: temp.path().to_path_buf(),
                    source,
                })?;
            progress.blob_bytes(digest, chunk.len() as u64);
        }
        file.flush().await.map_err(|source| RegistryError::Io {
            path: temp.path().to_path_buf(),
            source,
        })?;
        drop(file);
        if received != size {
            return Err(RegistryError::SizeMismatch {
                what: format!("blob {digest} from `{}`", repository.name()),
                expected: size,
                actual: received,
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                what: format!("blob from `{}`", repository.name()),
                expected: digest.to_owned(),
                actual,
            });
        }
        let store = store.clone();
        let digest = digest.to_owned();
        tokio::task::spawn_blocking(move || store.commit_blob(temp, &digest))
            .await
            .expect("commit task does not panic")?;
        self.inner
            .counters
            .blobs_downloaded
            .fetch_add(1, Ordering::Relaxed);
        self.inner
            .counters
            .bytes_downloaded
            .fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Tries to mount blob `digest` into `repository` from `from` (same registry). `true` when
    /// mounted; `false` when the registry did not (the upload session it may have opened is
    /// abandoned).
    pub async fn mount_blob(
        &self,
        repository: &Reference,
        digest: &str,
        from: &str,
    ) -> Result<bool> {
        let path = format!(
            "/v2/{}/blobs/uploads/?mount={digest}&from={from}",
            repository.repository()
        );
        let what = format!(
            "mount blob {digest} into `{}` from `{from}`",
            repository.name()
        );
        let response = self
            .send_scoped(
                repository,
                &[
                    scope(repository.repository(), Access::Push),
                    scope(from, Access::Pull),
                ],
                &what,
                true,
                |http, base| {
                    http.post(format!("{base}{path}"))
                        .header(header::CONTENT_LENGTH, "0")
                },
            )
            .await?;
        match response.status() {
            StatusCode::CREATED => {
                self.inner
                    .counters
                    .blobs_mounted
                    .fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            StatusCode::ACCEPTED => {
                if let Some(location) = header_str(response.headers(), "location") {
                    // Close the session the registry opened instead of mounting.
                    let url = self.absolute(repository, &location)?;
                    let _ = self
                        .send(repository, Access::Push, &what, false, |http, _| {
                            http.delete(url.clone())
                        })
                        .await;
                }
                Ok(false)
            }
            _ => Err(status_error(repository.registry(), &what, response).await),
        }
    }

    /// Uploads blob `digest` (of `size` bytes) from the store to `repository`: monolithic by
    /// default, in chunks when the options ask. The whole upload is retried with a fresh session
    /// when it fails on the way (a session cut mid-body is not resumable on every registry).
    pub async fn push_blob(
        &self,
        repository: &Reference,
        digest: &str,
        size: u64,
        store: &Store,
        progress: &dyn super::Progress,
    ) -> Result<()> {
        let path = store.blob_path(digest)?;
        let mut last_error = None;
        for attempt in 0..self.inner.options.max_attempts {
            if attempt > 0 {
                self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(self.backoff(attempt, None)).await;
                progress.blob_restart(digest);
                // A previous attempt may have completed on the registry's side.
                if self.blob_exists(repository, digest).await? {
                    return Ok(());
                }
            }
            let result = match self.inner.options.chunk_size {
                Some(chunk) => {
                    self.upload_chunked(repository, digest, size, &path, chunk, progress)
                        .await
                }
                None => {
                    self.upload_monolithic(repository, digest, size, &path, progress)
                        .await
                }
            };
            match result {
                Ok(()) => {
                    self.inner
                        .counters
                        .blobs_uploaded
                        .fetch_add(1, Ordering::Relaxed);
                    self.inner
                        .counters
                        .bytes_uploaded
                        .fetch_add(size, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if e.is_transient() => {
                    tracing::debug!("upload of {digest} failed, retrying: {e}");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("at least one attempt ran"))
    }

    /// Opens an upload session; returns its absolute URL.
    async fn open_session(&self, repository: &Reference, digest: &str) -> Result<reqwest::Url> {
        let path = format!("/v2/{}/blobs/uploads/", repository.repository());
        let what = format!("start upload of {digest} to `{}`", repository.name());
        let response = self
            .send(repository, Access::Push, &what, true, |http, base| {
                http.post(format!("{base}{path}"))
                    .header(header::CONTENT_LENGTH, "0")
            })
            .await?;
        if response.status() != StatusCode::ACCEPTED {
            return Err(status_error(repository.registry(), &what, response).await);
        }
        let location =
            header_str(response.headers(), "location").ok_or_else(|| RegistryError::Protocol {
                registry: repository.registry().to_owned(),
                what: what.clone(),
                reason: "the answer has no Location header".into(),
            })?;
        self.absolute(repository, &location)
    }

    async fn upload_monolithic(
        &self,
        repository: &Reference,
        digest: &str,
        size: u64,
        path: &std::path::Path,
        progress: &dyn super::Progress,
    ) -> Result<()> {
        let mut url = self.open_session(repository, digest).await?;
        url.query_pairs_mut().append_pair("digest", digest);
        let what = format!("upload blob {digest} to `{}`", repository.name());
        let body = BlobBody::open(path, 0, size).await?;
        // The upload URL is a session: a failed PUT is retried by the caller with a new one.
        let response = self
            .send(repository, Access::Push, &what, false, |http, _| {
                http.put(url.clone())
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, size)
                    .body(body.body(digest, progress))
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(status_error(repository.registry(), &what, response).await);
        }
        Ok(())
    }

    async fn upload_chunked(
        &self,
        repository: &Reference,
        digest: &str,
        size: u64,
        path: &std::path::Path,
        chunk: u64,
        progress: &dyn super::Progress,
    ) -> Result<()> {
        let mut url = self.open_session(repository, digest).await?;
        let what = format!("upload blob {digest} to `{}` in chunks", repository.name());
        let mut offset = 0;
        while offset < size {
            let len = chunk.min(size - offset);
            let body = BlobBody::open(path, offset, len).await?;
            let range = format!("{offset}-{}", offset + len - 1);
            let response = self
                .send(repository, Access::Push, &what, false, |http, _| {
                    http.patch(url.clone())
                        .header(header::CONTENT_TYPE, "application/octet-stream")
                        .header(header::CONTENT_LENGTH, len)
                        .header(header::CONTENT_RANGE, range.as_str())
                        .body(body.body(digest, progress))
                })
                .await?;
            if response.status() != StatusCode::ACCEPTED {
                return Err(status_error(repository.registry(), &what, response).await);
            }
            if let Some(location) = header_str(response.headers(), "location") {
                url = self.absolute(repository, &location)?;
            }
            offset += len;
        }
        url.query_pairs_mut().append_pair("digest", digest);
        let response = self
            .send(repository, Access::Push, &what, false, |http, _| {
                http.put(url.clone())
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, "0")
            })
            .await?;
        if response.status() != StatusCode::CREATED {
            return Err(status_error(repository.registry(), &what, response).await);
        }
        Ok(())
    }

    /// `DELETE` a manifest by digest, or a tag (`reference`'s tag or digest): what the registry
    /// did. Registries that keep no tag of their own (the distribution registry) answer a tag
    /// deletion as unsupported; deleting the digest then removes its tags.
    pub async fn delete_manifest(&self, reference: &Reference) -> Result<Deletion> {
        let path = format!(
            "/v2/{}/manifests/{}",
            reference.repository(),
            reference.reference()
        );
        let what = format!("delete manifest `{reference}`");
        let response = self
            .send(reference, Access::Delete, &what, true, |http, base| {
                http.delete(format!("{base}{path}"))
            })
            .await?;
        match response.status() {
            StatusCode::OK | StatusCode::ACCEPTED | StatusCode::NO_CONTENT => Ok(Deletion::Deleted),
            StatusCode::NOT_FOUND => Ok(Deletion::NotFound),
            // Tags: the distribution registry answers 400 (DIGEST_INVALID or UNSUPPORTED) or 405.
            StatusCode::METHOD_NOT_ALLOWED | StatusCode::BAD_REQUEST
                if reference.digest().is_none() =>
            {
                Ok(Deletion::Unsupported)
            }
            _ => Err(status_error(reference.registry(), &what, response).await),
        }
    }

    /// The tags of `repository`, following `Link` pages.
    pub async fn list_tags(&self, repository: &Reference) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        struct TagList {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let what = format!("list tags of `{}`", repository.name());
        let mut next = format!("/v2/{}/tags/list", repository.repository());
        let mut tags = Vec::new();
        loop {
            let path = next.clone();
            let response = self
                .send(repository, Access::Pull, &what, true, |http, base| {
                    http.get(format!("{base}{path}"))
                })
                .await?;
            if response.status() == StatusCode::NOT_FOUND {
                return Ok(tags);
            }
            if response.status() != StatusCode::OK {
                return Err(status_error(repository.registry(), &what, response).await);
            }
            let link = header_str(response.headers(), "link");
            let bytes =
                read_limited(response, MAX_MANIFEST_SIZE, repository.registry(), &what).await?;
            let page: TagList =
                serde_json::from_slice(&bytes).map_err(|e| RegistryError::Protocol {
                    registry: repository.registry().to_owned(),
                    what: what.clone(),
                    reason: format!("the tag list is not valid JSON: {e}"),
                })?;
            tags.extend(page.tags.unwrap_or_default());
            match link.as_deref().and_then(next_link) {
                Some(link) => next = link,
                None => return Ok(tags),
            }
        }
    }

    /// The referrers of `digest` in `repository` (an image index), through the referrers API,
    /// else the `sha256-<hex>` tag schema; `None` when neither has any.
    pub async fn referrers(&self, repository: &Reference, digest: &str) -> Result<Option<Bytes>> {
        let what = format!("list referrers of {digest} in `{}`", repository.name());
        let path = format!("/v2/{}/referrers/{digest}", repository.repository());
        let response = self
            .send(repository, Access::Pull, &what, true, |http, base| {
                http.get(format!("{base}{path}"))
                    .header(header::ACCEPT, "application/vnd.oci.image.index.v1+json")
            })
            .await?;
        match response.status() {
            StatusCode::OK => Ok(Some(
                read_limited(response, MAX_MANIFEST_SIZE, repository.registry(), &what).await?,
            )),
            StatusCode::NOT_FOUND => {
                let tag = digest.replacen(':', "-", 1);
                let tagged = repository.with_tag(&tag)?;
                Ok(self.get_manifest(&tagged).await?.map(|m| m.bytes))
            }
            _ => Err(status_error(repository.registry(), &what, response).await),
        }
    }

    // ---- transport ----------------------------------------------------------------------

    /// Sends a request built by `build` (called again for each attempt, with the base URL) to
    /// `target`'s registry, authenticated for `access` to its repository.
    pub(crate) async fn send<F>(
        &self,
        target: &Reference,
        access: Access,
        what: &str,
        retry: bool,
        build: F,
    ) -> Result<reqwest::Response>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        self.send_scoped(
            target,
            &[scope(target.repository(), access)],
            what,
            retry,
            build,
        )
        .await
    }

    async fn send_scoped<F>(
        &self,
        target: &Reference,
        scopes: &[String],
        what: &str,
        retry: bool,
        build: F,
    ) -> Result<reqwest::Response>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        let host = target.registry();
        let state = self.host(target).await?;
        let scope_key = scopes.join(" ");
        let attempts = if retry {
            self.inner.options.max_attempts.max(1)
        } else {
            1
        };
        let mut reauthenticated = false;
        let mut attempt = 0;
        loop {
            let authorization = self
                .authorization(host, &state.base, &scope_key, scopes)
                .await?;
            let mut request = build(&self.inner.http, &state.base);
            if let Some(value) = &authorization {
                let mut value =
                    HeaderValue::from_str(value.expose()).map_err(|_| RegistryError::Protocol {
                        registry: host.to_owned(),
                        what: what.to_owned(),
                        reason: "the credential has characters a header cannot carry".into(),
                    })?;
                value.set_sensitive(true);
                request = request.header(header::AUTHORIZATION, value);
            }
            self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
            let outcome = request.send().await;
            attempt += 1;
            let retry_after = match outcome {
                Err(source) => {
                    let transient = source.is_connect()
                        || source.is_timeout()
                        || source.is_request()
                        || source.is_body();
                    if !transient || attempt >= attempts {
                        return Err(RegistryError::Http {
                            registry: host.to_owned(),
                            what: what.to_owned(),
                            source,
                        });
                    }
                    tracing::debug!("{what}: attempt {attempt} failed: {source}; retrying");
                    None
                }
                Ok(response) if response.status() == StatusCode::UNAUTHORIZED => {
                    let challenge = header_str(response.headers(), "www-authenticate")
                        .and_then(|h| Challenge::parse(&h));
                    if reauthenticated || challenge.is_none() {
                        return Err(
                            unauthorized(host, what, authorization.is_some(), response).await
                        );
                    }
                    // Learn (or relearn) the scheme, drop what was refused, try once more.
                    reauthenticated = true;
                    self.set_challenge(host, challenge);
                    if authorization.is_some() {
                        self.inner
                            .tokens
                            .lock()
                            .expect("token cache lock")
                            .remove(&(host.to_owned(), scope_key.clone()));
                        self.inner.credentials.invalidate(host);
                    }
                    continue;
                }
                Ok(response) => {
                    let status = response.status();
                    let transient = status == StatusCode::REQUEST_TIMEOUT
                        || status == StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error();
                    if !transient || attempt >= attempts {
                        return Ok(response);
                    }
                    let after = retry_after(response.headers());
                    tracing::debug!(
                        "{what}: the registry answered {status} (attempt {attempt}); retrying"
                    );
                    after
                }
            };
            self.inner.counters.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(self.backoff(attempt, retry_after)).await;
        }
    }

    /// How long to wait before attempt `attempt + 1`: the registry's `Retry-After` if it gave
    /// one (bounded), else exponential backoff with jitter.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(after) = retry_after {
            return after.min(MAX_RETRY_AFTER);
        }
        let base = self.inner.options.base_backoff;
        let exp = base.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let capped = exp.min(MAX_BACKOFF);
        // "Equal jitter": half fixed, half random, so retries of parallel uploads spread out.
        let half = capped / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// The base URL and known challenge of `target`'s registry, probing `/v2/` the first time.
    async fn host(&self, target: &Reference) -> Result<HostState> {
        let host = target.registry();
        if let Some(state) = self.inner.hosts.lock().expect("hosts lock").get(host) {
            return Ok(state.clone());
        }
        let options = &self.inner.options;
        let candidates: Vec<String> = if let Some(base) = options.endpoints.get(host) {
            vec![base.trim_end_matches('/').to_owned()]
        } else if options.insecure.iter().any(|h| h == host) {
            vec![format!("http://{}", target.api_host())]
        } else if is_loopback_host(host) {
            // Loopback registries mostly speak plain HTTP (traffic that never leaves the
            // machine); one that speaks TLS answers a plain request with 400, and then gets
            // HTTPS. Plain first spares every run a failed TLS handshake.
            vec![
                format!("http://{}", target.api_host()),
                format!("https://{}", target.api_host()),
            ]
        } else {
            vec![format!("https://{}", target.api_host())]
        };
        let mut last_error = None;
        for (i, base) in candidates.iter().enumerate() {
            let last = i + 1 == candidates.len();
            let mut attempt = 0;
            let probed = loop {
                attempt += 1;
                self.inner.counters.requests.fetch_add(1, Ordering::Relaxed);
                let mut probe = self.inner.http.get(format!("{base}/v2/"));
                if candidates.len() > 1 && base.starts_with("https://") {
                    // A loopback registry without TLS may never answer a TLS handshake; it
                    // would finish in milliseconds if it spoke TLS.
                    probe = probe.timeout(LOOPBACK_TLS_PROBE);
                }
                match probe.send().await {
                    Ok(response)
                        if response.status().is_server_error()
                            || response.status() == StatusCode::TOO_MANY_REQUESTS =>
                    {
                        if attempt >= options.max_attempts {
                            break Ok(response);
                        }
                        let after = retry_after(response.headers());
                        tokio::time::sleep(self.backoff(attempt, after)).await;
                    }
                    Ok(response) => break Ok(response),
                    Err(e)
                        if e.is_connect()
                            && candidates.len() == 1
                            && attempt < options.max_attempts =>
                    {
                        tokio::time::sleep(self.backoff(attempt, None)).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            match probed {
                // A TLS server's answer to plain HTTP: try the next scheme.
                Ok(response) if response.status() == StatusCode::BAD_REQUEST && !last => {
                    tracing::debug!("{base} answered 400 to plain HTTP; trying HTTPS");
                }
                Ok(response) => {
                    let challenge = if response.status() == StatusCode::UNAUTHORIZED {
                        header_str(response.headers(), "www-authenticate")
                            .and_then(|h| Challenge::parse(&h))
                    } else {
                        None
                    };
                    let state = HostState {
                        base: base.clone(),
                        challenge,
                    };
                    self.inner
                        .hosts
                        .lock()
                        .expect("hosts lock")
                        .insert(host.to_owned(), state.clone());
                    return Ok(state);
                }
                Err(source) => last_error = Some(source),
            }
        }
        Err(RegistryError::Unreachable {
            registry: host.to_owned(),
            source: last_error.expect("at least one candidate was tried"),
        })
    }

    fn set_challenge(&self, host: &str, challenge: Option<Challenge>) {
        if let Some(state) = self.inner.hosts.lock().expect("hosts lock").get_mut(host) {
            state.challenge = challenge;
        }
    }

    /// The `Authorization` header for a request to `host` needing `scopes`, if any.
    async fn authorization(
        &self,
        host: &str,
        base: &str,
        scope_key: &str,
        scopes: &[String],
    ) -> Result<Option<Secret>> {
        let challenge = self
            .inner
            .hosts
            .lock()
            .expect("hosts lock")
            .get(host)
            .and_then(|s| s.challenge.clone());
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self
                .inner
                .credentials
                .get(host)
                .await?
                .map(|c| Secret::new(c.basic_header()))),
            Some(Challenge::Bearer { realm, service }) => {
                let key = (host.to_owned(), scope_key.to_owned());
                if let Some(token) = self.inner.tokens.lock().expect("token lock").get(&key)
                    && token.renew_at > Instant::now()
                {
                    return Ok(Some(Secret::new(format!(
                        "Bearer {}",
                        token.value.expose()
                    ))));
                }
                // One fetch at a time: parallel blob requests would otherwise each ask the
                // realm for the same token.
                let _fetching = self.inner.token_fetch.lock().await;
                if let Some(token) = self.inner.tokens.lock().expect("token lock").get(&key)
                    && token.renew_at > Instant::now()
                {
                    return Ok(Some(Secret::new(format!(
                        "Bearer {}",
                        token.value.expose()
                    ))));
                }
                let token = self
                    .fetch_token(host, base, &realm, service.as_deref(), scopes)
                    .await?;
                let header = Secret::new(format!("Bearer {}", token.value.expose()));
                self.inner
                    .tokens
                    .lock()
                    .expect("token lock")
                    .insert(key, token);
                Ok(Some(header))
            }
        }
    }

    /// Asks the realm for a token for `scopes`, with the host's credentials if there are any.
    async fn fetch_token(
        &self,
        host: &str,
        base: &str,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<Token> {
        let what = format!("get a token for `{}` from {realm}", scopes.join(" "));
        let mut url = reqwest::Url::parse(realm).map_err(|e| RegistryError::Protocol {
            registry: host.to_owned(),
            what: what.clone(),
            reason: format!("the token realm is not a URL: {e}"),
        })?;
        // A realm in plain HTTP is only followed where plain HTTP is allowed for the registry.
        if url.scheme() == "http" && !base.starts_with("http://") {
            return Err(RegistryError::Protocol {
                registry: host.to_owned(),
                what,
                reason: "the registry speaks HTTPS but sends credentials to a plain-HTTP realm"
                    .into(),
            });
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            for scope in scopes {
                query.append_pair("scope", scope);
            }
        }
        let credential = self.inner.credentials.get(host).await?;
        let mut attempt = 0;
        let response = loop {
            attempt += 1;
            let mut request = self.inner.http.get(url.clone());
            if let Some(credential) = &credential {
                let mut value =
                    HeaderValue::from_str(&credential.basic_header()).map_err(|_| {
                        RegistryError::Protocol {
                            registry: host.to_owned(),
                            what: what.clone(),
                            reason: "the credential has characters a header cannot carry".into(),
                        }
                    })?;
                value.set_sensitive(true);
                request = request.header(header::AUTHORIZATION, value);
            }
            self.inner
                .counters
                .token_requests
                .fetch_add(1, Ordering::Relaxed);
            match request.send().await {
                Ok(r)
                    if (r.status().is_server_error()
                        || r.status() == StatusCode::TOO_MANY_REQUESTS)
                        && attempt < self.inner.options.max_attempts =>
                {
                    let after = retry_after(r.headers());
                    tokio::time::sleep(self.backoff(attempt, after)).await;
                }
                Ok(r) => break r,
                Err(e) if e.is_connect() && attempt < self.inner.options.max_attempts => {
                    tokio::time::sleep(self.backoff(attempt, None)).await;
                }
                Err(source) => {
                    return Err(RegistryError::Http {
                        registry: host.to_owned(),
                        what,
                        source,
                    });
                }
            }
        };
        if response.status() == StatusCode::UNAUTHORIZED
            || response.status() == StatusCode::FORBIDDEN
        {
            return Err(RegistryError::Unauthorized {
                registry: host.to_owned(),
                what,
                had_credentials: credential.is_some(),
                detail: format!("the token service answered {}", response.status()),
            });
        }
        if !response.status().is_success() {
            return Err(status_error(host, &what, response).await);
        }
        let bytes = read_limited(response, MAX_MANIFEST_SIZE, host, &what).await?;
        let answer: TokenAnswer =
            serde_json::from_slice(&bytes).map_err(|_| RegistryError::Protocol {
                registry: host.to_owned(),
                what: what.clone(),
                reason: "the token service's answer is not its JSON format".into(),
            })?;
        let value = answer
            .token
            .or(answer.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Protocol {
                registry: host.to_owned(),
                what: what.clone(),
                reason: "the token service's answer has no token".into(),
            })?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(DEFAULT_TOKEN_LIFETIME));
        Ok(Token {
            value: Secret::new(value),
            renew_at: Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
        })
    }

    /// An absolute URL for a `Location` header, which may be relative.
    fn absolute(&self, target: &Reference, location: &str) -> Result<reqwest::Url> {
        let base = self
            .inner
            .hosts
            .lock()
            .expect("hosts lock")
            .get(target.registry())
            .map(|s| s.base.clone())
            .unwrap_or_else(|| format!("https://{}", target.api_host()));
        let base =
            reqwest::Url::parse(&format!("{base}/")).map_err(|e| RegistryError::Protocol {
                registry: target.registry().to_owned(),
                what: "resolve an upload location".into(),
                reason: e.to_string(),
            })?;
        base.join(location).map_err(|e| RegistryError::Protocol {
            registry: target.registry().to_owned(),
            what: "resolve an upload location".into(),
            reason: format!("`{location}` is not a URL: {e}"),
        })
    }
}

/// What [`Client::delete_manifest`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    Deleted,
    /// The registry has no such manifest or tag (any more).
    NotFound,
    /// The registry does not delete tags on their own.
    Unsupported,
}

/// `repository:<name>:pull`, `…:pull,push` or `…:delete`.
fn scope(repository: &str, access: Access) -> String {
    match access {
        Access::Pull => format!("repository:{repository}:pull"),
        Access::Push => format!("repository:{repository}:pull,push"),
        Access::Delete => format!("repository:{repository}:delete"),
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// `Retry-After` in seconds (the HTTP-date form is rare from registries and falls back to the
/// usual backoff).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header_str(headers, "retry-after")?
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The `rel="next"` target of a `Link` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

/// Reads a response body, refusing more than `limit` bytes.
async fn read_limited(
    response: reqwest::Response,
    limit: u64,
    registry: &str,
    what: &str,
) -> Result<Bytes> {
    let mut stream = response.bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| RegistryError::Http {
            registry: registry.to_owned(),
            what: what.to_owned(),
            source,
        })?;
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(RegistryError::TooLarge {
                what: what.to_owned(),
                limit,
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// The registry's error document, `{"errors":[{"code","message"}]}`.
#[derive(Deserialize)]
struct ErrorBody {
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Longest registry error text kept in an error message.
const MAX_ERROR_TEXT: usize = 300;

async fn status_error(registry: &str, what: &str, response: reqwest::Response) -> RegistryError {
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    let (code, message) = match serde_json::from_slice::<ErrorBody>(&body) {
        Ok(parsed) if !parsed.errors.is_empty() => {
            let codes: Vec<&str> = parsed.errors.iter().map(|e| e.code.as_str()).collect();
            let messages: Vec<&str> = parsed.errors.iter().map(|e| e.message.as_str()).collect();
            (Some(codes.join(", ")), messages.join("; "))
        }
        _ => (
            None,
            String::from_utf8_lossy(&body)
                .trim()
                .chars()
                .take(MAX_ERROR_TEXT)
                .collect(),
        ),
    };
    RegistryError::Status {
        registry: registry.to_owned(),
        what: what.to_owned(),
        status,
        code,
        message,
    }
}

async fn unauthorized(
    registry: &str,
    what: &str,
    had_credentials: bool,
    response: reqwest::Response,
) -> RegistryError {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let detail = serde_json::from_slice::<ErrorBody>(&body)
        .ok()
        .and_then(|b| b.errors.into_iter().next())
        .map(|e| format!("{}: {}", e.code, e.message))
        .unwrap_or_else(|| format!("the registry answered {status}"));
    RegistryError::Unauthorized {
        registry: registry.to_owned(),
        what: what.to_owned(),
        had_credentials,
        detail,
    }
}

/// A blob (or a range of it) as a request body: in memory when small, else streamed from the
/// store file, counting bytes for progress.
struct BlobBody {
    path: PathBuf,
    offset: u64,
    len: u64,
    bytes: Option<Bytes>,
}

impl BlobBody {
    async fn open(path: &std::path::Path, offset: u64, len: u64) -> Result<Self> {
        let bytes = if len <= IN_MEMORY_BLOB {
            let mut file =
                tokio::fs::File::open(path)
                    .await
                    .map_err(|source| RegistryError::Io {
                        path: path.to_path_buf(),
                        source,
                    })?;
            use tokio::io::AsyncSeekExt;
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(|source| RegistryError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
            let mut buf = vec![0; len as usize];
            file.read_exact(&mut buf)
                .await
                .map_err(|source| RegistryError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
            Some(Bytes::from(buf))
        } else {
            None
        };
        Ok(BlobBody {
            path: path.to_path_buf(),
            offset,
            len,
            bytes,
        })
    }

    fn body(&self, digest: &str, progress: &dyn super::Progress) -> reqwest::Body {
        if let Some(bytes) = &self.bytes {
            progress.blob_bytes(digest, bytes.len() as u64);
            return reqwest::Body::from(bytes.clone());
        }
        // A blocking thread reads the file straight into each chunk's buffer (no zeroing, no
        // second copy through tokio's file buffer) a few chunks ahead of the socket.
        let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let path = self.path.clone();
        let (offset, len) = (self.offset, self.len);
        let progress = progress.sink(digest);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek};
            let opened = std::fs::File::open(&path).and_then(|mut file| {
                file.seek(std::io::SeekFrom::Start(offset))?;
                Ok(file)
            });
            let mut file = match opened {
                Ok(file) => file,
                Err(e) => {
                    let _ = sender.blocking_send(Err(e));
                    return;
                }
            };
            let mut left = len;
            while left > 0 {
                let want = left.min(STREAM_CHUNK as u64);
                let mut chunk = Vec::with_capacity(want as usize);
                let read = (&mut file)
                    .take(want)
                    .read_to_end(&mut chunk)
                    .and_then(|n| {
                        if n == 0 {
                            Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "the blob file is shorter than its size",
                            ))
                        } else {
                            Ok(n)
                        }
                    });
                let item = read.map(|n| {
                    left -= n as u64;
                    progress(n as u64);
                    Bytes::from(chunk)
                });
                let failed = item.is_err();
                // The receiver is gone when the request was dropped: stop reading.
                if sender.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        });
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        });
        reqwest::Body::wrap_stream(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_retry_after() {
        assert_eq!(
            next_link(r#"</v2/a/tags/list?n=2&last=b>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(next_link(r#"</x>; rel="prev""#), None);
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let client = Client::anonymous().unwrap();
        for attempt in 1..20 {
            let d = client.backoff(attempt, None);
            let cap = (BASE_BACKOFF * (1 << (attempt - 1).min(16))).min(MAX_BACKOFF);
            assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?}");
        }
        assert_eq!(
            client.backoff(1, Some(Duration::from_secs(600))),
            MAX_RETRY_AFTER
        );
        assert_eq!(
            client.backoff(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
    }
}
