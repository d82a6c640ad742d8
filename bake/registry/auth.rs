//! Registry credentials and the authentication challenge flow.
//!
//! Where credentials come from ([`Credentials`]): given directly ([`StaticCredentials`]),
//! Docker's `config.json` (`auths`, `credsStore`, `credHelpers`, the latter two by running
//! `docker-credential-<name> get`: [`DockerConfig`]), or ECR's `GetAuthorizationToken`
//! ([`super::ecr::EcrCredentials`]). How they are used depends on the registry's challenge
//! (`WWW-Authenticate`): `Basic` sends them on every request (ECR's case); `Bearer` trades them
//! (or nothing, for anonymous pulls) at the realm for a token per scope, cached until shortly
//! before it expires.
//!
//! Secrets are held in [`Secret`], whose `Debug` prints `***`, and are never part of an error
//! message: errors name the registry and the source of the credentials, not their content.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;

/// A secret string: redacted in `Debug`, never displayed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A user name and password (or identity token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: Secret,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

impl Credential {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credential {
            username: username.into(),
            password: Secret::new(password),
        }
    }

    /// Decodes `base64(user:password)`, as Docker's `auths.<host>.auth` and ECR tokens hold.
    pub fn from_basic_token(token: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (user, password) = text.split_once(':')?;
        Some(Credential::new(user, password))
    }

    /// The `Authorization` header value for Basic auth.
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Why credentials could not be found (never carries the credentials themselves).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("failed to read Docker's credentials file `{}`", path.display())]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Docker's credentials file `{}` is not valid JSON", path.display())]
    ConfigParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the `auth` entry for `{host}` in `{}` is not base64 of `user:password`", path.display())]
    BadAuthEntry { host: String, path: PathBuf },
    #[error("failed to run credential helper `{helper}` for `{host}`")]
    HelperSpawn {
        helper: String,
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("credential helper `{helper}` failed for `{host}` (exit {code}): {message}")]
    HelperFailed {
        helper: String,
        host: String,
        code: i32,
        message: String,
    },
    #[error("credential helper `{helper}` gave output for `{host}` that is not its JSON format")]
    HelperOutput { helper: String, host: String },
    #[error("failed to get an ECR authorization token in {region}")]
    Ecr {
        region: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("ECR returned an authorization token for `{host}` that bake cannot read")]
    EcrToken { host: String },
}

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source of credentials, asked per registry host (`host[:port]`).
pub trait Credentials: Send + Sync + fmt::Debug {
    /// The credential for `host`, if this source has one.
    fn get<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Option<Credential>, AuthError>>;

    /// The registry refused the credential last returned for `host`: forget any cached one, so
    /// the next `get` fetches a fresh one (ECR tokens expire).
    fn invalidate(&self, _host: &str) {}
}

/// Credentials given directly, per host.
#[derive(Debug, Default, Clone)]
pub struct StaticCredentials(pub HashMap<String, Credential>);

impl StaticCredentials {
    pub fn one(host: &str, credential: Credential) -> Self {
        StaticCredentials(HashMap::from([(host.to_owned(), credential)]))
    }
}

impl Credentials for StaticCredentials {
    fn get<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Option<Credential>, AuthError>> {
        Box::pin(async move { Ok(self.0.get(host).cloned()) })
    }
}

/// Tries each source in turn; the first that has a credential wins.
#[derive(Debug, Default, Clone)]
pub struct ChainCredentials(pub Vec<Arc<dyn Credentials>>);

impl Credentials for ChainCredentials {
    fn get<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Option<Credential>, AuthError>> {
        Box::pin(async move {
            for source in &self.0 {
                if let Some(credential) = source.get(host).await? {
                    return Ok(Some(credential));
                }
            }
            Ok(None)
        })
    }

    fn invalidate(&self, host: &str) {
        for source in &self.0 {
            source.invalidate(host);
        }
    }
}

/// Docker's `config.json`: `auths`, `credsStore` and `credHelpers`.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    path: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
}

#[derive(Default, Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default, rename = "identitytoken")]
    identity_token: Option<String>,
}

impl fmt::Debug for DockerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DockerAuth(***)")
    }
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

impl DockerConfig {
    /// The file at `path` (it need not exist: then it has no credentials).
    pub fn at(path: &Path) -> Self {
        DockerConfig {
            path: path.to_path_buf(),
        }
    }

    /// The file this source reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub fn default_location() -> Option<Self> {
        let dir = match std::env::var_os("DOCKER_CONFIG") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => PathBuf::from(std::env::var_os("HOME")?).join(".docker"),
        };
        Some(DockerConfig::at(&dir.join("config.json")))
    }

    fn read(&self) -> Result<DockerConfigFile, AuthError> {
        let text = match fs_err::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfigFile::default());
            }
            Err(source) => {
                return Err(AuthError::ConfigRead {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        serde_json::from_slice(&text).map_err(|source| AuthError::ConfigParse {
            path: self.path.clone(),
            source,
        })
    }

    async fn lookup(&self, host: &str) -> Result<Option<Credential>, AuthError> {
        let config = self.read()?;
        if let Some(helper) = config.cred_helpers.get(host) {
            return run_helper(helper, host).await;
        }
        let entry = config
            .auths
            .iter()
            .find(|(key, _)| normalize_host(key) == host);
        if let Some((_, auth)) = entry {
            if let Some(token) = auth.auth.as_deref().filter(|t| !t.is_empty()) {
                return Credential::from_basic_token(token)
                    .map(Some)
                    .ok_or_else(|| AuthError::BadAuthEntry {
                        host: host.to_owned(),
                        path: self.path.clone(),
                    });
            }
            if let (Some(user), Some(password)) = (&auth.username, &auth.password) {
                return Ok(Some(Credential::new(user, password.clone())));
            }
            if let Some(token) = &auth.identity_token {
                // Docker's convention for identity tokens.
                return Ok(Some(Credential::new("<token>", token.clone())));
            }
        }
        if let Some(store) = &config.creds_store {
            return run_helper(store, host).await;
        }
        Ok(None)
    }
}

impl Credentials for DockerConfig {
    fn get<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Option<Credential>, AuthError>> {
        Box::pin(self.lookup(host))
    }
}

/// `https://index.docker.io/v1/` → `index.docker.io`; `host:5000` stays.
fn normalize_host(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let key = key.split('/').next().unwrap_or(key);
    if key == "index.docker.io" {
        "registry-1.docker.io"
    } else {
        key
    }
}

/// Runs `docker-credential-<helper> get` with the host on stdin.
async fn run_helper(helper: &str, host: &str) -> Result<Option<Credential>, AuthError> {
    use tokio::io::AsyncWriteExt;
    let program = format!("docker-credential-{helper}");
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| AuthError::HelperSpawn {
            helper: program.clone(),
            host: host.to_owned(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its status below.
        let _ = stdin.write_all(host.as_bytes()).await;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|source| AuthError::HelperSpawn {
            helper: program.clone(),
            host: host.to_owned(),
            source,
        })?;
    if !output.status.success() {
        let message = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        // Helpers say "credentials not found in native keychain" for unknown hosts.
        if message
            .to_ascii_lowercase()
            .contains("credentials not found")
        {
            return Ok(None);
        }
        return Err(AuthError::HelperFailed {
            helper: program,
            host: host.to_owned(),
            code: output.status.code().unwrap_or(-1),
            // The first line only, and never the helper's stdout beyond an error message.
            message: message
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect(),
        });
    }
    let answer: HelperAnswer =
        serde_json::from_slice(&output.stdout).map_err(|_| AuthError::HelperOutput {
            helper: program.clone(),
            host: host.to_owned(),
        })?;
    Ok(Some(Credential::new(answer.username, answer.secret)))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

impl Challenge {
    /// Parses the first challenge bake understands from a header value.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
        let params = parse_params(params);
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => Some(Challenge::Basic),
            "bearer" => Some(Challenge::Bearer {
                realm: params.get("realm")?.clone(),
                service: params.get("service").cloned(),
            }),
            _ => None,
        }
    }
}

/// `key="value", key2=value2` (RFC 7235 auth-params; quoted strings may hold commas).
fn parse_params(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if chars.next().is_none() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    out
}

/// The token endpoint's answer.
#[derive(Deserialize)]
pub(crate) struct TokenAnswer {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub access_token: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
            })
        );
        assert_eq!(
            Challenge::parse(
                r#"Basic realm="https://1.dkr.ecr.us-east-1.amazonaws.com/",service="ecr.amazonaws.com""#
            ),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Negotiate"), None);
        assert_eq!(Challenge::parse("Bearer service=\"x\""), None);
    }

    #[test]
    fn secrets_never_print() {
        let credential = Credential::new("user", "hunter2-canary");
        let shown = format!("{credential:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("user"));
        let parsed = Credential::from_basic_token("QVdTOnNlY3JldA==").unwrap();
        assert_eq!(parsed.username, "AWS");
        assert_eq!(parsed.password.expose(), "secret");
        assert!(Credential::from_basic_token("not base64!").is_none());
    }

    #[tokio::test]
    async fn docker_config_auths_and_helpers() {
        let dir = tempfile::tempdir().unwrap();
        let helper_dir = dir.path().join("bin");
        fs_err::create_dir_all(&helper_dir).unwrap();
        let helper = helper_dir.join("docker-credential-baketest");
        fs_err::write(
            &helper,
            "#!/bin/sh\nread host\nif [ \"$host\" = helper.example ]; then echo '{\"Username\":\"h\",\"Secret\":\"s3\"}'; else echo 'credentials not found in native keychain'; exit 1; fi\n",
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let config = dir.path().join("config.json");
        fs_err::write(
            &config,
            r#"{"auths":{"https://reg.example/v1/":{"auth":"dTpw"},"other.example":{"auth":"!!"}},
                "credHelpers":{"helper.example":"baketest"},"credsStore":"baketest"}"#,
        )
        .unwrap();
        // The helper is found on PATH, as Docker finds it.
        let path = format!(
            "{}:{}",
            helper_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        // SAFETY: this test is the only one in the library that reads PATH for helpers.
        unsafe { std::env::set_var("PATH", path) };
        let source = DockerConfig::at(&config);
        let found = source.get("reg.example").await.unwrap().unwrap();
        assert_eq!(found.username, "u");
        assert_eq!(found.password.expose(), "p");
        let helped = source.get("helper.example").await.unwrap().unwrap();
        assert_eq!(helped.password.expose(), "s3");
        // credsStore answers "not found" for a host it does not know: no credential.
        assert!(source.get("nowhere.example").await.unwrap().is_none());
        let bad = source.get("other.example").await.unwrap_err().to_string();
        assert!(bad.contains("other.example"), "{bad}");
        assert!(
            DockerConfig::at(&dir.path().join("missing.json"))
                .get("reg.example")
                .await
                .unwrap()
                .is_none()
        );
    }
}
