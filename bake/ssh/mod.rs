//! A small SSH client for provisioning builder instances (russh + russh-sftp): connect with an
//! ed25519 key (optionally through a bastion, over `direct-tcpip`), pin the host key, run
//! scripts with environment, `sudo` and a timeout while streaming their output line by line,
//! and upload files over SFTP.
//!
//! Host keys: the first connection either checks the keys bake read from the instance's
//! console output, or (when the console shows none) accepts and records the key it is offered.
//! Every later connection to the same builder (after a reboot, for tests) must present that
//! key, so a machine that takes over the address mid-build is refused.
//!
//! Scripts are uploaded to a private file and run from there (`sh FILE </dev/null`), never fed
//! on stdin (a script that reads stdin would eat itself) and never put on a command line (where
//! `ps` shows secrets).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::io::AsyncWriteExt;

use crate::build::runner::{StepOutput, Stream};

/// How long one TCP connect plus SSH handshake may take before the attempt counts as failed.
/// An sshd that accepts connections but never speaks must not hang the build.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Grace the remote `timeout` gives a step after SIGTERM before it sends SIGKILL.
const REMOTE_KILL_AFTER_SECS: u64 = 10;

/// How often a running command checks the cancellation flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub bastion: Option<BastionTarget>,
}

/// A jump host, reached first; the target is reached through it with `direct-tcpip`.
#[derive(Clone)]
pub struct BastionTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The key for the bastion (the builder's temporary key is not installed there).
    pub key: Arc<PrivateKey>,
}

impl std::fmt::Debug for BastionTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BastionTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("key", &"<private key>")
            .finish()
    }
}

impl std::fmt::Display for SshTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}:{}", self.user, self.host, self.port)?;
        if let Some(b) = &self.bastion {
            write!(f, " (through {}@{}:{})", b.user, b.host, b.port)?;
        }
        Ok(())
    }
}

/// Which host keys a connection accepts.
#[derive(Debug, Clone, Default)]
pub enum HostKeyPolicy {
    /// Accept the first key offered and record it (trust on first use).
    #[default]
    FirstUse,
    /// Accept only these (from the console output, or recorded by an earlier connection).
    Pinned(Vec<PublicKey>),
}

/// A user a command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    /// The SSH user itself, no `sudo`.
    LoginUser,
    /// root, through `sudo -n` unless the SSH user is root.
    Root,
    /// Another user, through `sudo -n -u`.
    User(String),
}

/// A script to run remotely.
#[derive(Debug, Clone)]
pub struct RemoteScript {
    /// The step name: output lines are reported under it.
    pub name: String,
    pub script: String,
    pub env: Vec<(String, String)>,
    pub run_as: RunAs,
    pub workdir: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("failed to connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: Box<russh::Error>,
    },
    #[error("no SSH answer from {target} within {}s (TCP connect and handshake)", HANDSHAKE_TIMEOUT.as_secs())]
    HandshakeTimeout { target: String },
    #[error(
        "the host key of {target} ({offered}) is not the pinned one ({expected}): refusing to connect"
    )]
    HostKeyMismatch {
        target: String,
        offered: String,
        expected: String,
    },
    #[error("{target} refused the key for user `{user}`")]
    AuthRejected { target: String, user: String },
    #[error("SSH session with {target} failed during {what}")]
    Session {
        target: String,
        what: String,
        #[source]
        source: Box<russh::Error>,
    },
    #[error("SFTP on {target} failed during {what}")]
    Sftp {
        target: String,
        what: String,
        #[source]
        source: Box<russh_sftp::client::error::Error>,
    },
    #[error("failed to read `{}`", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("step `{step}` did not finish within {}s on {target}", timeout.as_secs())]
    Timeout {
        step: String,
        target: String,
        timeout: Duration,
    },
    #[error("step `{step}` was killed by signal {signal} on {target}")]
    Signal {
        step: String,
        target: String,
        signal: String,
    },
    #[error("the connection to {target} closed while step `{step}` ran (no exit status)")]
    Disconnected { step: String, target: String },
    #[error("step `{step}` was interrupted")]
    Interrupted { step: String },
}

impl SshError {
    /// Whether retrying the connection may help (the host is still booting).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            SshError::Connect { .. }
                | SshError::HandshakeTimeout { .. }
                | SshError::AuthRejected { .. }
        )
    }
}

/// The russh event handler: checks (or records) the host key.
struct Handler {
    policy: HostKeyPolicy,
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            // Builders present plain host keys; a certificate is not something bake pins.
            PublicKeyOrCertificate::Certificate(_) => return Ok(false),
        };
        *self.seen.lock().expect("host key lock") = Some(key.clone());
        Ok(match &self.policy {
            HostKeyPolicy::FirstUse => true,
            HostKeyPolicy::Pinned(keys) => keys.iter().any(|k| k.key_data() == key.key_data()),
        })
    }
}

/// The `SHA256:…` fingerprint OpenSSH shows for `key`.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// A new ed25519 key for one build, from the OS's random source. It lives in memory only.
pub fn generate_key() -> Result<PrivateKey, SshError> {
    let mut seed = [0u8; 32];
    getrandom_seed(&mut seed)?;
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    PrivateKey::new(
        russh::keys::ssh_key::private::KeypairData::Ed25519(pair),
        "bake-builder",
    )
    .map_err(|e| SshError::Local {
        path: PathBuf::from("<ed25519 key>"),
        source: std::io::Error::other(e.to_string()),
    })
}

/// `bytes` random bytes from the OS, in hex (for unique remote file names).
pub fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    if fs_err::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_err()
    {
        // Uniqueness, not secrecy, is what these names need: fall back to the clock and pid.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        return format!("{nanos:x}{:x}", std::process::id());
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn getrandom_seed(seed: &mut [u8; 32]) -> Result<(), SshError> {
    use std::io::Read;
    let path = Path::new("/dev/urandom");
    fs_err::File::open(path)
        .and_then(|mut f| f.read_exact(seed))
        .map_err(|source| SshError::Local {
            path: path.to_path_buf(),
            source,
        })
}

/// Host keys printed on a console by cloud-init, between its
/// `-----BEGIN SSH HOST KEY KEYS-----` and `-----END SSH HOST KEY KEYS-----` markers.
pub fn host_keys_from_console(console: &str) -> Vec<PublicKey> {
    let mut keys = Vec::new();
    let mut inside = false;
    for line in console.lines() {
        let line = line.trim();
        if line.contains("-----BEGIN SSH HOST KEY KEYS-----") {
            inside = true;
        } else if line.contains("-----END SSH HOST KEY KEYS-----") {
            inside = false;
        } else if inside {
            // Consoles prefix lines with timestamps or `ec2:`; the key starts at its algorithm.
            if let Some(start) = line.find("ssh-").or_else(|| line.find("ecdsa-"))
                && let Ok(key) = PublicKey::from_openssh(&line[start..])
            {
                keys.push(key);
            }
        }
    }
    keys
}

/// An authenticated SSH connection.
pub struct Session {
    handle: Handle<Handler>,
    /// Kept alive for the tunnel when connected through a bastion.
    _bastion: Option<Handle<Handler>>,
    target: SshTarget,
    host_key: PublicKey,
}

fn config() -> Arc<client::Config> {
    Arc::new(client::Config {
        // Long provisioning steps are silent for minutes; keepalives tell a dead peer apart.
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 4,
        nodelay: true,
        ..Default::default()
    })
}

impl Session {
    /// Connects and authenticates once (no retries: the caller decides how long to wait).
    pub async fn connect(
        target: &SshTarget,
        key: Arc<PrivateKey>,
        policy: HostKeyPolicy,
    ) -> Result<Session, SshError> {
        let shown = target.to_string();
        let seen = Arc::new(Mutex::new(None));
        let handler = Handler {
            policy: policy.clone(),
            seen: Arc::clone(&seen),
        };
        let attempt = async {
            match &target.bastion {
                None => {
                    let handle =
                        client::connect(config(), (target.host.as_str(), target.port), handler)
                            .await;
                    Ok((handle, None))
                }
                Some(b) => {
                    let jump = Handler {
                        policy: HostKeyPolicy::FirstUse,
                        seen: Arc::new(Mutex::new(None)),
                    };
                    let bastion_shown = format!("bastion {}@{}:{}", b.user, b.host, b.port);
                    let mut bastion = client::connect(config(), (b.host.as_str(), b.port), jump)
                        .await
                        .map_err(|source| SshError::Connect {
                            target: bastion_shown.clone(),
                            source: Box::new(source),
                        })?;
                    authenticate(&mut bastion, &b.user, Arc::clone(&b.key), &bastion_shown).await?;
                    let channel = bastion
                        .channel_open_direct_tcpip(
                            target.host.clone(),
                            u32::from(target.port),
                            "127.0.0.1",
                            0,
                        )
                        .await
                        .map_err(|source| SshError::Session {
                            target: bastion_shown,
                            what: format!("forwarding to {}:{}", target.host, target.port),
                            source: Box::new(source),
                        })?;
                    let handle =
                        client::connect_stream(config(), channel.into_stream(), handler).await;
                    Ok((handle, Some(bastion)))
                }
            }
        };
        let (handle, bastion) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
            Err(_) => return Err(SshError::HandshakeTimeout { target: shown }),
            Ok(result) => result?,
        };
        let mut handle = match handle {
            Ok(handle) => handle,
            Err(source) => {
                let offered = seen.lock().expect("host key lock").clone();
                if let (Some(offered), HostKeyPolicy::Pinned(keys)) = (offered, &policy) {
                    return Err(SshError::HostKeyMismatch {
                        target: shown,
                        offered: fingerprint(&offered),
                        expected: keys.iter().map(fingerprint).collect::<Vec<_>>().join(", "),
                    });
                }
                return Err(SshError::Connect {
                    target: shown,
                    source: Box::new(source),
                });
            }
        };
        authenticate(&mut handle, &target.user, key, &shown).await?;
        let host_key = seen
            .lock()
            .expect("host key lock")
            .clone()
            .expect("a connected session has checked a host key");
        Ok(Session {
            handle,
            _bastion: bastion,
            target: target.clone(),
            host_key,
        })
    }

    /// The host key this session was established with.
    pub fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    fn shown(&self) -> String {
        self.target.to_string()
    }

    /// Runs `script` and returns its exit code; output lines go to `output` under the step name.
    /// `cancel` is polled: when it is set the command is abandoned (the remote `timeout` wrapper
    /// and the closed channel end it).
    pub async fn run(
        &self,
        script: &RemoteScript,
        output: &mut dyn StepOutput,
        cancel: &dyn Fn() -> bool,
    ) -> Result<u32, SshError> {
        let file = format!("/tmp/bake-step-{}.sh", random_hex(8));
        self.write_file(&file, render_script(script).as_bytes(), 0o600)
            .await?;
        let command = remote_command(script, &file, &self.target.user);
        self.exec(&script.name, &command, script.timeout, output, cancel)
            .await
    }

    /// Runs one command line (already quoted) and streams its output.
    pub async fn exec(
        &self,
        step: &str,
        command: &str,
        timeout: Duration,
        output: &mut dyn StepOutput,
        cancel: &dyn Fn() -> bool,
    ) -> Result<u32, SshError> {
        let session_err = |what: &str| {
            let target = self.shown();
            let what = what.to_owned();
            move |source| SshError::Session {
                target,
                what,
                source: Box::new(source),
            }
        };
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(session_err("opening a channel"))?;
        channel
            .exec(true, command)
            .await
            .map_err(session_err("starting a command"))?;
        let mut lines = [LineBuffer::default(), LineBuffer::default()];
        let mut code = None;
        let mut signal = None;
        // The remote `timeout` fires first; this one covers a host that stops answering.
        let deadline =
            tokio::time::Instant::now() + timeout + Duration::from_secs(REMOTE_KILL_AFTER_SECS + 5);
        loop {
            let msg = tokio::select! {
                msg = channel.wait() => msg,
                () = tokio::time::sleep_until(deadline) => {
                    let _ = channel.close().await;
                    return Err(SshError::Timeout { step: step.to_owned(), target: self.shown(), timeout });
                }
                () = wait_cancel(cancel) => {
                    let _ = channel.signal(russh::Sig::TERM).await;
                    let _ = channel.close().await;
                    return Err(SshError::Interrupted { step: step.to_owned() });
                }
            };
            let Some(msg) = msg else { break };
            match msg {
                ChannelMsg::Data { data } => lines[0].push(&data, step, Stream::Stdout, output),
                ChannelMsg::ExtendedData { data, .. } => {
                    lines[1].push(&data, step, Stream::Stderr, output)
                }
                ChannelMsg::ExitStatus { exit_status } => code = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    signal = Some(format!("{signal_name:?}"))
                }
                _ => {}
            }
        }
        lines[0].finish(step, Stream::Stdout, output);
        lines[1].finish(step, Stream::Stderr, output);
        match (code, signal) {
            // `timeout` exits 124 when it had to stop the step (137 after its SIGKILL).
            (Some(124 | 137), _) if command.contains(TIMEOUT_MARKER) => Err(SshError::Timeout {
                step: step.to_owned(),
                target: self.shown(),
                timeout,
            }),
            (Some(code), _) => Ok(code),
            (None, Some(signal)) => Err(SshError::Signal {
                step: step.to_owned(),
                target: self.shown(),
                signal,
            }),
            (None, None) => Err(SshError::Disconnected {
                step: step.to_owned(),
                target: self.shown(),
            }),
        }
    }

    async fn sftp(&self) -> Result<russh_sftp::client::SftpSession, SshError> {
        let channel =
            self.handle
                .channel_open_session()
                .await
                .map_err(|source| SshError::Session {
                    target: self.shown(),
                    what: "opening an SFTP channel".into(),
                    source: Box::new(source),
                })?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|source| SshError::Session {
                target: self.shown(),
                what: "starting SFTP".into(),
                source: Box::new(source),
            })?;
        russh_sftp::client::SftpSession::new(channel.into_stream())
            .await
            .map_err(|source| SshError::Sftp {
                target: self.shown(),
                what: "starting SFTP".into(),
                source: Box::new(source),
            })
    }

    /// Writes `bytes` to `path` (as the SSH user) with `mode`.
    pub async fn write_file(&self, path: &str, bytes: &[u8], mode: u32) -> Result<(), SshError> {
        let sftp = self.sftp().await?;
        let result = self.put(&sftp, path, bytes, mode).await;
        let _ = sftp.close().await;
        result
    }

    async fn put(
        &self,
        sftp: &russh_sftp::client::SftpSession,
        path: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), SshError> {
        let err = |what: String| {
            let target = self.shown();
            move |source| SshError::Sftp {
                target,
                what,
                source: Box::new(source),
            }
        };
        let mut attrs = russh_sftp::protocol::FileAttributes::empty();
        attrs.permissions = Some(mode);
        let mut file = sftp
            .open_with_flags_and_attributes(
                path,
                russh_sftp::protocol::OpenFlags::CREATE
                    | russh_sftp::protocol::OpenFlags::TRUNCATE
                    | russh_sftp::protocol::OpenFlags::WRITE
                    | russh_sftp::protocol::OpenFlags::EXCLUDE,
                attrs,
            )
            .await
            .map_err(err(format!("creating `{path}`")))?;
        file.write_all(bytes).await.map_err(|e| SshError::Sftp {
            target: self.shown(),
            what: format!("writing `{path}`"),
            source: Box::new(russh_sftp::client::error::Error::IO(e.to_string())),
        })?;
        file.shutdown().await.map_err(|e| SshError::Sftp {
            target: self.shown(),
            what: format!("closing `{path}`"),
            source: Box::new(russh_sftp::client::error::Error::IO(e.to_string())),
        })?;
        // The umask may have narrowed the mode given at creation.
        let mut attrs = russh_sftp::protocol::FileAttributes::empty();
        attrs.permissions = Some(mode);
        sftp.set_metadata(path, attrs)
            .await
            .map_err(err(format!("setting the mode of `{path}`")))
    }

    /// Makes a fresh private directory `/tmp/{prefix}-RANDOM` (as the SSH user) and returns
    /// its path; creation fails rather than reuse an existing one.
    pub async fn create_private_dir(&self, prefix: &str) -> Result<String, SshError> {
        let dir = format!("/tmp/{prefix}-{}", random_hex(8));
        let sftp = self.sftp().await?;
        let result = async {
            sftp.create_dir(dir.clone())
                .await
                .map_err(|source| SshError::Sftp {
                    target: self.shown(),
                    what: format!("creating `{dir}`"),
                    source: Box::new(source),
                })?;
            let mut attrs = russh_sftp::protocol::FileAttributes::empty();
            attrs.permissions = Some(0o700);
            sftp.set_metadata(dir.clone(), attrs)
                .await
                .map_err(|source| SshError::Sftp {
                    target: self.shown(),
                    what: format!("setting the mode of `{dir}`"),
                    source: Box::new(source),
                })
        }
        .await;
        let _ = sftp.close().await;
        result.map(|()| dir)
    }

    /// Uploads the local file `local` to `remote` with `mode`.
    pub async fn upload_file(&self, local: &Path, remote: &str, mode: u32) -> Result<(), SshError> {
        let bytes = fs_err::read(local).map_err(|source| SshError::Local {
            path: local.to_path_buf(),
            source,
        })?;
        self.write_file(remote, &bytes, mode).await
    }

    /// Reads the remote file `path` (as the SSH user); `None` when it does not exist.
    pub async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, SshError> {
        use tokio::io::AsyncReadExt;
        let sftp = self.sftp().await?;
        let result = async {
            let mut file = match sftp.open(path).await {
                Ok(file) => file,
                Err(russh_sftp::client::error::Error::Status(status))
                    if status.status_code == russh_sftp::protocol::StatusCode::NoSuchFile =>
                {
                    return Ok(None);
                }
                Err(source) => {
                    return Err(SshError::Sftp {
                        target: self.shown(),
                        what: format!("opening `{path}`"),
                        source: Box::new(source),
                    });
                }
            };
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)
                .await
                .map_err(|e| SshError::Sftp {
                    target: self.shown(),
                    what: format!("reading `{path}`"),
                    source: Box::new(russh_sftp::client::error::Error::IO(e.to_string())),
                })?;
            Ok(Some(bytes))
        }
        .await;
        let _ = sftp.close().await;
        result
    }

    /// Uploads `local` (a file or a directory tree) into a fresh staging directory under
    /// `/tmp` and returns the staged path.
    pub async fn upload_staged(&self, local: &Path) -> Result<String, SshError> {
        let sftp = self.sftp().await?;
        let result = self.upload_tree(&sftp, local).await;
        let _ = sftp.close().await;
        result
    }

    async fn upload_tree(
        &self,
        sftp: &russh_sftp::client::SftpSession,
        local: &Path,
    ) -> Result<String, SshError> {
        use std::os::unix::fs::PermissionsExt;
        let staging = format!("/tmp/bake-upload-{}", random_hex(8));
        let sftp_err = |what: String| {
            let target = self.shown();
            move |source| SshError::Sftp {
                target,
                what,
                source: Box::new(source),
            }
        };
        sftp.create_dir(staging.clone())
            .await
            .map_err(sftp_err(format!("creating `{staging}`")))?;
        let name = local
            .file_name()
            .map_or_else(|| "source".to_owned(), |n| n.to_string_lossy().into_owned());
        let top = format!("{staging}/{name}");
        for entry in walkdir::WalkDir::new(local)
            .follow_links(false)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| SshError::Local {
                path: local.to_path_buf(),
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("walk")),
            })?;
            let relative = entry.path().strip_prefix(local).unwrap_or(entry.path());
            let remote = if relative.as_os_str().is_empty() {
                top.clone()
            } else {
                format!("{top}/{}", relative.to_string_lossy())
            };
            let local_err = |source| SshError::Local {
                path: entry.path().to_path_buf(),
                source,
            };
            let meta = entry.metadata().map_err(|e| local_err(e.into()))?;
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                sftp.create_dir(remote.clone())
                    .await
                    .map_err(sftp_err(format!("creating `{remote}`")))?;
                let mut attrs = russh_sftp::protocol::FileAttributes::empty();
                attrs.permissions = Some(mode);
                sftp.set_metadata(remote.clone(), attrs)
                    .await
                    .map_err(sftp_err(format!("setting the mode of `{remote}`")))?;
            } else if meta.file_type().is_symlink() {
                let target = fs_err::read_link(entry.path()).map_err(local_err)?;
                // OpenSSH's sftp-server takes SSH_FXP_SYMLINK's two paths in the reverse of
                // the draft's order (target first); every builder runs OpenSSH.
                sftp.symlink(target.to_string_lossy().into_owned(), remote.clone())
                    .await
                    .map_err(sftp_err(format!("creating the symlink `{remote}`")))?;
            } else if meta.is_file() {
                let bytes = fs_err::read(entry.path()).map_err(local_err)?;
                self.put(sftp, &remote, &bytes, mode).await?;
            }
        }
        Ok(top)
    }
}

async fn authenticate(
    handle: &mut Handle<Handler>,
    user: &str,
    key: Arc<PrivateKey>,
    shown: &str,
) -> Result<(), SshError> {
    let hash = handle
        .best_supported_rsa_hash()
        .await
        .map_err(|source| SshError::Session {
            target: shown.to_owned(),
            what: "negotiating the signature hash".into(),
            source: Box::new(source),
        })?
        .flatten();
    let result = handle
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, hash))
        .await
        .map_err(|source| SshError::Session {
            target: shown.to_owned(),
            what: "authentication".into(),
            source: Box::new(source),
        })?;
    if result.success() {
        Ok(())
    } else {
        Err(SshError::AuthRejected {
            target: shown.to_owned(),
            user: user.to_owned(),
        })
    }
}

async fn wait_cancel(cancel: &dyn Fn() -> bool) {
    loop {
        if cancel() {
            return;
        }
        tokio::time::sleep(CANCEL_POLL).await;
    }
}

/// Splits a byte stream into lines for [`StepOutput`].
#[derive(Default)]
struct LineBuffer(Vec<u8>);

impl LineBuffer {
    fn push(&mut self, data: &[u8], step: &str, stream: Stream, output: &mut dyn StepOutput) {
        self.0.extend_from_slice(data);
        while let Some(pos) = self.0.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=pos).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            output.line(step, stream, text.trim_end_matches('\r'));
        }
    }

    fn finish(&mut self, step: &str, stream: Stream, output: &mut dyn StepOutput) {
        if !self.0.is_empty() {
            let text = String::from_utf8_lossy(&self.0).into_owned();
            output.line(step, stream, &text);
            self.0.clear();
        }
    }
}

/// Quotes `text` for a POSIX shell.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Marks commands bake wrapped in `timeout`, whose 124/137 mean "timed out".
const TIMEOUT_MARKER: &str = "timeout -k";

/// The script file's text: environment, working directory, then the step's script in a
/// subshell so `exit` in it still reaches bake as the exit code.
fn render_script(script: &RemoteScript) -> String {
    let mut text = String::from("#!/bin/sh\n");
    for (name, value) in &script.env {
        text.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    if let Some(dir) = &script.workdir {
        text.push_str(&format!("cd {} || exit 1\n", shell_quote(dir)));
    }
    text.push_str(&script.script);
    if !script.script.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// The command line that runs `file` as the script's user, under a remote `timeout`, and
/// removes the file afterwards.
fn remote_command(script: &RemoteScript, file: &str, login_user: &str) -> String {
    let secs = script.timeout.as_secs().max(1);
    let run = format!(
        "{TIMEOUT_MARKER} {REMOTE_KILL_AFTER_SECS} {secs} /bin/sh {} </dev/null",
        shell_quote(file)
    );
    let quoted = shell_quote(file);
    match &script.run_as {
        RunAs::LoginUser => format!("{run}; rc=$?; rm -f {quoted}; exit $rc"),
        RunAs::Root if login_user == "root" => {
            format!("{run}; rc=$?; rm -f {quoted}; exit $rc")
        }
        RunAs::Root => format!("sudo -n -H {run}; rc=$?; rm -f {quoted}; exit $rc"),
        RunAs::User(user) => {
            let sudo = if login_user == "root" { "" } else { "sudo -n " };
            let user = shell_quote(user);
            format!(
                "{sudo}chown {user} {quoted} && sudo -n -u {user} -H {run}; rc=$?; {sudo}rm -f {quoted}; exit $rc"
            )
        }
    }
}

/// The shell snippet that moves a staged upload to its destination with `cp -a` semantics:
/// a destination ending in `/` (or an existing directory) receives the source under its own
/// name; a directory's contents merge into the destination. `mode` applies to regular files,
/// owner to everything copied.
pub fn install_command(
    staged: &str,
    destination: &str,
    mode: Option<u32>,
    owner: (u32, u32),
) -> String {
    let mode = mode.map_or_else(String::new, |m| format!("{m:o}"));
    let script = r#"set -eu
src=$1; dest=$2; mode=$3; owner=$4
if [ -d "$src" ] && [ ! -L "$src" ]; then
  mkdir -p "$dest"
  ( cd "$src" && find . -mindepth 1 ) > "$src.list"
  cp -a "$src"/. "$dest"/
  while IFS= read -r p; do
    chown -h "$owner" "$dest/$p"
    if [ -n "$mode" ] && [ -f "$dest/$p" ] && [ ! -L "$dest/$p" ]; then chmod "$mode" "$dest/$p"; fi
  done < "$src.list"
else
  case "$dest" in */) dest="$dest$(basename "$src")";; *) if [ -d "$dest" ]; then dest="$dest/$(basename "$src")"; fi;; esac
  mkdir -p "$(dirname "$dest")"
  cp -a "$src" "$dest.bake-tmp"
  chown -h "$owner" "$dest.bake-tmp"
  if [ -n "$mode" ] && [ ! -L "$dest.bake-tmp" ]; then chmod "$mode" "$dest.bake-tmp"; fi
  mv -f "$dest.bake-tmp" "$dest"
fi
rm -rf "$(dirname "$src")"
"#;
    format!(
        "/bin/sh -c {} bake-install {} {} {} {}",
        shell_quote(script),
        shell_quote(staged),
        shell_quote(destination),
        shell_quote(&mode),
        shell_quote(&format!("{}:{}", owner.0, owner.1)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn scripts_carry_env_and_workdir() {
        let text = render_script(&RemoteScript {
            name: "s".into(),
            script: "echo hi".into(),
            env: vec![("GREETING".into(), "a 'b'".into())],
            run_as: RunAs::Root,
            workdir: Some("/srv".into()),
            timeout: Duration::from_secs(5),
        });
        assert_eq!(
            text,
            "#!/bin/sh\nexport GREETING='a '\\''b'\\'''\ncd '/srv' || exit 1\necho hi\n"
        );
    }

    #[test]
    fn commands_use_sudo_only_when_needed() {
        let mut s = RemoteScript {
            name: "s".into(),
            script: String::new(),
            env: vec![],
            run_as: RunAs::Root,
            workdir: None,
            timeout: Duration::from_secs(7),
        };
        let c = remote_command(&s, "/tmp/f.sh", "ec2-user");
        assert!(
            c.starts_with("sudo -n -H timeout -k 10 7 /bin/sh '/tmp/f.sh' </dev/null"),
            "{c}"
        );
        let c = remote_command(&s, "/tmp/f.sh", "root");
        assert!(c.starts_with("timeout -k 10 7 /bin/sh"), "{c}");
        s.run_as = RunAs::User("app".into());
        let c = remote_command(&s, "/tmp/f.sh", "ec2-user");
        assert!(
            c.starts_with("sudo -n chown 'app' '/tmp/f.sh' && sudo -n -u 'app' -H timeout"),
            "{c}"
        );
        let c = remote_command(&s, "/tmp/f.sh", "root");
        assert!(
            c.starts_with("chown 'app' '/tmp/f.sh' && sudo -n -u 'app' -H timeout"),
            "{c}"
        );
        s.run_as = RunAs::LoginUser;
        let c = remote_command(&s, "/tmp/f.sh", "ec2-user");
        assert!(c.starts_with("timeout -k 10 7 /bin/sh"), "{c}");
    }

    #[test]
    fn console_host_keys_are_found_between_the_markers() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhd0vGYsyL0fnqo0pq6KrKP8BKvQkBqWmNBGmCRvTjA root@host";
        let console = format!(
            "boot\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhd0vGYsyL0fnqo0pq6KrKP8BKvQkBqWmNBGmCRvTjA outside\n-----BEGIN SSH HOST KEY KEYS-----\n[  12.3] ec2: {key}\nnot a key\n-----END SSH HOST KEY KEYS-----\n"
        );
        let keys = host_keys_from_console(&console);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].comment().as_str_lossy(), "root@host");
        assert!(host_keys_from_console("Xen boot text").is_empty());
    }

    #[test]
    fn generated_keys_are_ed25519_and_distinct() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_eq!(a.algorithm(), russh::keys::Algorithm::Ed25519);
        assert_ne!(
            a.public_key().to_openssh().unwrap(),
            b.public_key().to_openssh().unwrap()
        );
    }

    #[test]
    fn lines_are_split_across_chunks() {
        struct Collect(Vec<(String, String)>);
        impl StepOutput for Collect {
            fn line(&mut self, step: &str, _stream: Stream, line: &str) {
                self.0.push((step.into(), line.into()));
            }
        }
        let mut out = Collect(vec![]);
        let mut buf = LineBuffer::default();
        buf.push(b"one\ntw", "s", Stream::Stdout, &mut out);
        buf.push(b"o\r\nthree", "s", Stream::Stdout, &mut out);
        buf.finish("s", Stream::Stdout, &mut out);
        let lines: Vec<&str> = out.0.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(lines, ["one", "two", "three"]);
    }
}
