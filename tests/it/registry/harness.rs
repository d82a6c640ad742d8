//! Test harness for the registry tests: private Debian `docker-registry` instances (plain,
//! htpasswd, or token auth against a token issuer written here), a fault-injecting HTTP proxy
//! to put in front of a real registry, and small OCI images made straight into a store.
//!
//! Everything listens on 127.0.0.1 and is stopped when dropped (by the handle this harness
//! holds, never by name).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bake::artifact::oci::{HistoryEntry, ImageSettings, LayerRef, assemble};
use bake::store::Store;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A free port on 127.0.0.1 (the kernel's pick; released before the server binds it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How a private registry authenticates (or, for `Tls`, serves HTTPS without auth).
pub enum Auth {
    Tls { cert: PathBuf, key: PathBuf },
    Htpasswd { user: String, password: String },
    Token { realm: String, cert: PathBuf },
}

/// A private `docker-registry serve` on loopback, stopped on drop.
pub struct LocalRegistry {
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

pub const TOKEN_SERVICE: &str = "bake-test-registry";
pub const TOKEN_ISSUER: &str = "bake-test-issuer";

impl LocalRegistry {
    /// Starts one; `None` (after saying why) when docker-registry is missing outside CI.
    pub fn start(auth: Auth) -> Option<LocalRegistry> {
        if !crate::skip::tool("docker-registry") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: bake-test-{port}\n",
            dir.path().join("data").display()
        );
        match &auth {
            Auth::Tls { cert, key } => {
                config.push_str(&format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert.display(),
                    key.display()
                ));
            }
            Auth::Htpasswd { user, password } => {
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .expect("htpasswd (apache2-utils) is installed");
                assert!(out.status.success());
                let file = dir.path().join("htpasswd");
                fs_err::write(&file, &out.stdout).unwrap();
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: bake-test\n    path: {}\n",
                    file.display()
                ));
            }
            Auth::Token { realm, cert } => {
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    cert.display()
                ));
            }
        }
        let config_path = dir.path().join("config.yml");
        fs_err::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let registry = LocalRegistry {
            addr: format!("127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        registry.wait_ready();
        Some(registry)
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(&self.addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not listen on {} in 30 s", self.addr);
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token issuer for docker-registry's `auth: token`: a key and a self-signed certificate
/// made with openssl, ES256 JWTs carrying the `x5c` chain, granting what is asked to the one
/// user it knows (and nothing to anyone else).
pub struct TokenIssuer {
    pub realm: String,
    pub cert: PathBuf,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl TokenIssuer {
    pub async fn start(user: &str, password: &str) -> TokenIssuer {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let status = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=bake-test-token-issuer",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .expect("openssl is installed");
        assert!(status.success());
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        let x5c = base64::engine::general_purpose::STANDARD.encode(der);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let counter = Arc::clone(&requests);
        let key_path = key.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let (expected, x5c, key_path, counter) = (
                    expected.clone(),
                    x5c.clone(),
                    key_path.clone(),
                    Arc::clone(&counter),
                );
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let authorized = request.header("authorization") == Some(expected.as_str());
                    let url = reqwest::Url::parse(&format!("http://x{}", request.path)).unwrap();
                    let mut access = Vec::new();
                    for (k, v) in url.query_pairs() {
                        if k == "scope" && authorized {
                            let parts: Vec<&str> = v.splitn(3, ':').collect();
                            if parts.len() == 3 {
                                access.push(serde_json::json!({
                                    "type": parts[0], "name": parts[1],
                                    "actions": parts[2].split(',').collect::<Vec<_>>(),
                                }));
                            }
                        }
                    }
                    let token = sign_jwt(&key_path, &x5c, access);
                    let body = serde_json::json!({"token": token, "expires_in": 300}).to_string();
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        TokenIssuer {
            realm: format!("http://{addr}/token"),
            cert,
            requests,
            task,
            _dir: dir,
        }
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An ES256 JWT signed with openssl (DER signature turned into JOSE's r‖s).
fn sign_jwt(key: &Path, x5c: &str, access: Vec<serde_json::Value>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": "bake", "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", fastrand_like()), "access": access,
    });
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let der = child.wait_with_output().unwrap().stdout;
    format!("{input}.{}", b64url(&der_to_raw(&der)))
}

fn fastrand_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// DER `SEQUENCE { INTEGER r, INTEGER s }` → 64 bytes r‖s.
fn der_to_raw(der: &[u8]) -> Vec<u8> {
    let mut i = 2;
    if der[1] & 0x80 != 0 {
        i += (der[1] & 0x7f) as usize;
    }
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[i], 0x02);
        let len = der[i + 1] as usize;
        let int = &der[i + 2..i + 2 + len];
        let int = &int[int.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    out
}

/// An HTTP/1.1 request as the proxy and token issuer read it.
pub struct Request {
    pub method: String,
    pub path: String,
    pub head: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub content_length: usize,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a request head (up to the blank line).
async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        // Not HTTP (a TLS handshake, say): hang up, as a plain HTTP server would answer.
        if head.is_empty() && !byte[0].is_ascii_uppercase() {
            return None;
        }
        head.push(byte[0]);
        if head.len() > 64 * 1024 {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let first = lines.next()?;
    let mut parts = first.split(' ');
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let content_length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    Some(Request {
        method,
        path,
        head,
        headers,
        content_length,
    })
}

/// What the proxy does to a matching request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status (and `Retry-After` seconds), without asking the registry.
    Status(u16, Option<u64>, &'static str),
    /// Read half the request body, then reset the connection.
    ResetMidRequest,
    /// Forward, then send half the response and reset the connection.
    ResetMidResponse,
    /// Wait, then forward.
    Delay(Duration),
    /// Forward, then flip a byte of the response body.
    CorruptBody,
    /// Forward, then replace the `Docker-Content-Digest` header's value.
    WrongDigestHeader,
    /// Forward, then append bytes to the body (and count them in `Content-Length`).
    Oversize,
}

/// A rule: the first `times` requests with `method` whose path contains `path` get `fault`.
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: &'static str,
    pub path: String,
    pub times: usize,
    pub fault: Fault,
}

/// A fault-injecting HTTP/1.1 proxy in front of a real registry.
pub struct FaultProxy {
    pub addr: String,
    rules: Arc<Mutex<Vec<Rule>>>,
    /// `METHOD path -> what happened`, in order.
    pub log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let rules: Arc<Mutex<Vec<Rule>>> = Arc::default();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let upstream = upstream.to_owned();
        let (r, l) = (Arc::clone(&rules), Arc::clone(&log));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (rules, log, upstream) = (Arc::clone(&r), Arc::clone(&l), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &upstream, &rules, &log).await;
                });
            }
        });
        FaultProxy {
            addr,
            rules,
            log,
            task,
        }
    }

    pub fn add(&self, method: &'static str, path: &str, times: usize, fault: Fault) {
        self.rules.lock().unwrap().push(Rule {
            method,
            path: path.to_owned(),
            times,
            fault,
        });
    }

    /// How many faults were injected.
    pub fn injected(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.ends_with("-> forwarded"))
            .count()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: &str,
    rules: &Mutex<Vec<Rule>>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    loop {
        let Some(request) = read_request(&mut client).await else {
            return Ok(());
        };
        let fault = {
            let mut rules = rules.lock().unwrap();
            rules
                .iter_mut()
                .find(|r| {
                    r.times > 0 && r.method == request.method && request.path.contains(&r.path)
                })
                .map(|r| {
                    r.times -= 1;
                    r.fault.clone()
                })
        };
        let line = format!("{} {}", request.method, request.path);
        log.lock().unwrap().push(match &fault {
            Some(f) => format!("{line} -> {f:?}"),
            None => format!("{line} -> forwarded"),
        });
        let mut body = vec![0; request.content_length];
        match &fault {
            Some(Fault::ResetMidRequest) => {
                let half = request.content_length / 2;
                client.read_exact(&mut body[..half]).await?;
                client.set_zero_linger()?;
                return Ok(());
            }
            _ => {
                client.read_exact(&mut body).await?;
            }
        }
        if let Some(Fault::Status(code, retry_after, reason)) = &fault {
            let body = format!(
                r#"{{"errors":[{{"code":"{reason}","message":"injected by the test proxy"}}]}}"#
            );
            let mut response = format!(
                "HTTP/1.1 {code} Injected\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
            if let Some(seconds) = retry_after {
                response.push_str(&format!("Retry-After: {seconds}\r\n"));
            }
            response.push_str("\r\n");
            response.push_str(&body);
            client.write_all(response.as_bytes()).await?;
            continue;
        }
        if let Some(Fault::Delay(d)) = &fault {
            tokio::time::sleep(*d).await;
        }
        // Forward on a fresh upstream connection, closed after the answer.
        let mut up = TcpStream::connect(upstream).await?;
        let head = String::from_utf8_lossy(&request.head);
        let head: String = head
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect::<Vec<_>>()
            .join("\r\n");
        let head = head.trim_end_matches("\r\n").to_owned() + "\r\nConnection: close\r\n\r\n";
        up.write_all(head.as_bytes()).await?;
        up.write_all(&body).await?;
        let mut response = Vec::new();
        up.read_to_end(&mut response).await?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(response.len(), |p| p + 4);
        match &fault {
            Some(Fault::ResetMidResponse) => {
                let cut = split + (response.len() - split) / 2;
                client.write_all(&response[..cut]).await?;
                client.flush().await?;
                client.set_zero_linger()?;
                return Ok(());
            }
            Some(Fault::CorruptBody) if response.len() > split => {
                let at = split + (response.len() - split) / 2;
                response[at] ^= 0xff;
            }
            Some(Fault::Oversize) => {
                let text = String::from_utf8_lossy(&response[..split]).into_owned();
                let extra = 1000;
                let replaced: String = text
                    .split("\r\n")
                    .map(|l| match l.split_once(':') {
                        Some((k, v)) if k.eq_ignore_ascii_case("content-length") => {
                            let n: usize = v.trim().parse().unwrap_or(0);
                            format!("Content-Length: {}", n + extra)
                        }
                        _ => l.to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join("\r\n");
                let mut out = replaced.into_bytes();
                out.extend_from_slice(&response[split..]);
                out.extend(std::iter::repeat_n(b'x', extra));
                response = out;
            }
            Some(Fault::WrongDigestHeader) => {
                let text = String::from_utf8_lossy(&response[..split]).into_owned();
                let wrong = format!("sha256:{}", "0".repeat(64));
                let replaced: String = text
                    .split("\r\n")
                    .map(|l| {
                        if l.to_ascii_lowercase().starts_with("docker-content-digest:") {
                            format!("Docker-Content-Digest: {wrong}")
                        } else {
                            l.to_owned()
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("\r\n");
                let mut out = replaced.into_bytes();
                out.extend_from_slice(&response[split..]);
                response = out;
            }
            _ => {}
        }
        client.write_all(&response).await?;
        // The upstream answered `Connection: close`; the client will not reuse this one.
        return Ok(());
    }
}

/// Deterministic bytes that do not compress (so layer sizes are what the test asks for).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    let mut counter = 0u64;
    while out.len() < len {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update(counter.to_le_bytes());
        out.extend_from_slice(&h.finalize());
        counter += 1;
    }
    out.truncate(len);
    out
}

/// Makes an image straight in the store: one gzip layer per size (a tar holding one file of
/// that many noise bytes), a config and a manifest. Returns the manifest digest.
pub fn make_image(store: &Store, seed: u64, layer_sizes: &[usize]) -> String {
    let mut layers = Vec::new();
    let mut history = Vec::new();
    for (i, size) in layer_sizes.iter().enumerate() {
        let content = noise(seed * 1000 + i as u64, *size);
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("data-{seed}-{i}.bin"),
            content.as_slice(),
        )
        .unwrap();
        let tar = tar.into_inner().unwrap();
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let digest = store.put_blob(&gz).unwrap();
        layers.push(LayerRef {
            digest,
            diff_id,
            size: gz.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        });
        history.push(HistoryEntry {
            created_by: format!("test layer {i}"),
            comment: None,
            empty_layer: false,
        });
    }
    let settings = ImageSettings {
        os: "linux".into(),
        architecture: "amd64".into(),
        cmd: Some(vec!["/bin/sh".into()]),
        ..ImageSettings::default()
    };
    let blobs = assemble(&settings, &layers, &history, 0, &Default::default()).unwrap();
    store.put_blob(&blobs.config).unwrap();
    store.put_blob(&blobs.manifest).unwrap();
    blobs.manifest_digest
}

/// Writes a build record for `digest` so that `bake push VERSION` finds it; returns the version.
pub fn record_image(store: &Store, name: &str, digest: &str) -> String {
    let version = format!(
        "sha256:{}",
        hex::encode(Sha256::digest(format!("{name}-{digest}")))
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&store.read_blob(digest).unwrap()).unwrap();
    let inputs: bake::plan::PlanInputs = serde_json::from_value(serde_json::json!({
        "format": bake::plan::VERSION_FORMAT,
        "recipe": {"name": name, "variables": {}, "base": "scratch", "build": {},
                   "provisioners": [], "tests": [], "outputs": {}},
        "base": {"kind": "scratch"}, "files": [], "builtins": [], "source_date_epoch": 0
    }))
    .unwrap();
    let record = bake::store::BuildRecord::new(
        name,
        &version.parse().unwrap(),
        "test",
        &inputs,
        bake::store::Artifact::OciImage {
            image: bake::store::OciImage {
                image_digest: digest.parse().unwrap(),
                config_digest: manifest["config"]["digest"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap(),
                manifest_size: store.read_blob(digest).unwrap().len() as u64,
                layers: vec![],
                steps: vec![],
                compressor: "test".into(),
            },
        },
    );
    store.put_record(&record).unwrap();
    version
}

/// Every blob file of a store, as (digest, bytes).
pub fn store_blobs(store: &Store) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = fs_err::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                format!("sha256:{}", e.file_name().to_string_lossy()),
                fs_err::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A test CA and a server certificate for 127.0.0.1 signed by it, made with openssl in `dir`:
/// returns (CA certificate, server certificate, server key).
pub fn test_tls(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-days",
        "2",
        "-subj",
        "/CN=bake-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    run(&csr);
    fs_err::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}
