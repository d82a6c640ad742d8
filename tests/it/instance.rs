//! The builder-instance strategy end to end: `bake build` against moto (EC2) with provisioning
//! over SSH to a real OpenSSH `sshd` running in an isolated root (its own mount and PID
//! namespaces, an overlay over a cached mmdebstrap root with openssh-server and sudo, host
//! keys generated in that root), reached through the recipe's `ssh_host`/`ssh_port` override.
//!
//! moto does not run instances, so the "builder" bake provisions is that sshd: bake's key pair
//! is read back from moto (`DescribeKeyPairs` with the public key) and authorized there, the
//! way cloud-init would on EC2. A recording proxy between bake and moto keeps every request
//! bake sent, because moto stores only part of what RunInstances and CreateImage carry
//! (see shared MOTO.md): IMDS options, volume encryption and tags are asserted on the requests.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Filter, ResourceType, Tag, TagSpecification};
use bake::aws::{Aws, AwsSettings};

use super::common::{bake, fresh_account, service, stderr, stdout};

pub(super) const REGION: &str = "us-east-1";

// ---------------------------------------------------------------------------------------------
// moto, through a recording proxy

/// Every request bake sent (form-decoded EC2 query bodies), in order.
#[derive(Clone, Default)]
pub(super) struct Captured(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

impl Captured {
    pub(super) fn actions(&self, action: &str) -> Vec<BTreeMap<String, String>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.get("Action").map(String::as_str) == Some(action))
            .cloned()
            .collect()
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A pass-through to moto that records each request (form-decoded EC2 query bodies).
fn start_proxy(upstream: &str) -> (String, Captured) {
    let captured = Captured::default();
    let record = captured.clone();
    let address = super::moto_proxy::proxy(
        upstream,
        Arc::new(move |body: &[u8]| {
            let form = url_decode_form(&String::from_utf8_lossy(body));
            if form.contains_key("Action") {
                record.0.lock().unwrap().push(form);
            }
            super::moto_proxy::Verdict::Forward
        }),
        Arc::new(|_: &[u8], response| response),
    );
    (address, captured)
}

fn url_decode_form(text: &str) -> BTreeMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                    out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// One test's moto account, clients for it, and the proxy bake talks to.
pub(super) struct Moto {
    pub(super) proxy: String,
    pub(super) captured: Captured,
    pub(super) account: String,
    pub(super) ec2: aws_sdk_ec2::Client,
    pub(super) aws: Aws,
}

pub(super) async fn moto() -> Option<Moto> {
    let endpoint = service("BAKE_TEST_MOTO_ENDPOINT")?;
    let account = fresh_account();
    // SAFETY: the tests set the same dummy values; nothing reads them concurrently in a way
    // that could observe a torn write.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let aws = Aws::load(&AwsSettings {
        region: Some(REGION.into()),
        profile: None,
        endpoint_url: Some(endpoint.clone()),
        emulator_account: Some(account.clone()),
        emulator: Some(bake::aws::Emulator::Moto),
    })
    .await;
    let (proxy, captured) = start_proxy(&endpoint);
    Some(Moto {
        ec2: aws.ec2(REGION),
        proxy,
        captured,
        account,
        aws,
    })
}

impl Moto {
    /// `bake` configured for this account, through the proxy.
    pub(super) fn bake(&self, store: &Path) -> Command {
        let mut command = bake();
        command
            .env("BAKE_AWS_ENDPOINT_URL", &self.proxy)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &self.account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_REGION", REGION)
            .env("BAKE_AWS_POLL_INTERVAL", "50ms")
            .env("BAKE_STORE", store)
            .env("BAKE_VAR_token", "s3cr3t-value")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL");
        command
    }

    /// Two vendor-like AMIs (made from a throwaway instance, then terminated): moto's own
    /// images are `paravirtual`/`standard`, so recipes here filter on that.
    pub(super) async fn vendor_amis(&self) -> (String, String) {
        let run = self
            .ec2
            .run_instances()
            .image_id("ami-12345678")
            .min_count(1)
            .max_count(1)
            .send()
            .await
            .unwrap();
        let instance = run.instances()[0].instance_id().unwrap().to_owned();
        let mut ids = Vec::new();
        for name in ["vendor-linux-2026.1-x86_64", "vendor-linux-2026.2-x86_64"] {
            let image = self
                .ec2
                .create_image()
                .instance_id(&instance)
                .name(name)
                .send()
                .await
                .unwrap();
            ids.push(image.image_id().unwrap().to_owned());
        }
        self.ec2
            .terminate_instances()
            .instance_ids(&instance)
            .send()
            .await
            .unwrap();
        (ids[0].clone(), ids[1].clone())
    }

    /// Instances not terminated, key pairs and non-default security groups in the account.
    pub(super) async fn leftovers(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let instances = self
            .ec2
            .describe_instances()
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .values("stopping")
                    .values("stopped")
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| i.instance_id().map(str::to_owned))
            .collect();
        let keys = self
            .ec2
            .describe_key_pairs()
            .send()
            .await
            .unwrap()
            .key_pairs()
            .iter()
            .filter_map(|k| k.key_name().map(str::to_owned))
            .collect();
        let groups = self
            .ec2
            .describe_security_groups()
            .send()
            .await
            .unwrap()
            .security_groups()
            .iter()
            .filter(|g| g.group_name() != Some("default"))
            .filter_map(|g| g.group_name().map(str::to_owned))
            .collect();
        (instances, keys, groups)
    }
}

// ---------------------------------------------------------------------------------------------
// sshd in an isolated root

/// The cached base root: Debian bookworm minbase with openssh-server and sudo, and an
/// `ec2-user` with passwordless sudo (as on vendor images). Made once with mmdebstrap.
fn base_root() -> Result<PathBuf, String> {
    let cache = std::env::var_os("BAKE_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/bake"))
        .join("fixtures");
    std::fs::create_dir_all(&cache).map_err(|e| e.to_string())?;
    let root = cache.join("sshd-root-bookworm-v1");
    let lock = std::fs::File::create(cache.join("sshd-root.lock")).map_err(|e| e.to_string())?;
    lock.lock().map_err(|e| e.to_string())?;
    if !root.join("usr/sbin/sshd").exists() {
        let partial = cache.join("sshd-root-bookworm-v1.partial");
        let _ = std::fs::remove_dir_all(&partial);
        let status = Command::new("mmdebstrap")
            .args([
                "--variant=minbase",
                "--include=openssh-server,sudo",
                "bookworm",
            ])
            .arg(&partial)
            .env("SOURCE_DATE_EPOCH", "0")
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("mmdebstrap: {e}"))?;
        if !status.success() {
            return Err(format!("mmdebstrap failed: {status}"));
        }
        let _ = std::fs::remove_dir_all(&root);
        std::fs::rename(&partial, &root).map_err(|e| e.to_string())?;
    }
    let sudoers = root.join("etc/sudoers.d/ec2-user");
    if !sudoers.exists() {
        let ok = Command::new("chroot")
            .arg(&root)
            .args([
                "/bin/sh",
                "-c",
                "id ec2-user >/dev/null 2>&1 || useradd -m -s /bin/sh ec2-user; usermod -p '*' ec2-user",
            ])
            .status()
            .map_err(|e| e.to_string())?
            .success();
        if !ok {
            return Err("could not add ec2-user to the sshd root".into());
        }
        std::fs::write(&sudoers, "ec2-user ALL=(ALL) NOPASSWD:ALL\n").map_err(|e| e.to_string())?;
    }
    Ok(root)
}

/// An sshd on 127.0.0.1 in its own mount and PID namespaces, chrooted into an overlay of the
/// base root; what provisioning writes lands in `upper`.
pub(super) struct Sshd {
    child: Child,
    pub(super) port: u16,
    /// The cached base root (the overlay's lower layer).
    base: PathBuf,
    upper: PathBuf,
    keys: PathBuf,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Sshd {
    pub(super) fn start() -> Option<Sshd> {
        if !super::skip::root("namespaces, overlay and chroot for sshd") {
            return None;
        }
        let base = match base_root() {
            Ok(base) => base,
            Err(e) => {
                super::skip::skip(&format!("a Debian root with openssh-server ({e})"));
                return None;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        let work = dir.path().join("work");
        let merged = dir.path().join("merged");
        let keys = dir.path().join("keys");
        for d in [&upper, &work, &merged, &keys] {
            std::fs::create_dir_all(d).unwrap();
        }
        let port = free_port();
        let script = r#"set -e
mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$UPPER,workdir=$WORK" "$MERGED"
mount -t proc proc "$MERGED/proc"
mkdir -p "$MERGED/etc/ssh/authorized" "$MERGED/run/sshd"
mount --bind "$KEYS" "$MERGED/etc/ssh/authorized"
rm -f "$MERGED"/etc/ssh/ssh_host_*
chroot "$MERGED" ssh-keygen -q -A
exec chroot "$MERGED" /usr/sbin/sshd -D -e -p "$PORT" -o ListenAddress=127.0.0.1 \
  -o AuthorizedKeysFile=/etc/ssh/authorized/%u -o PasswordAuthentication=no \
  -o KbdInteractiveAuthentication=no -o UsePAM=no -o PidFile=none
"#;
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                script,
            ])
            .env("BASE", &base)
            .env("UPPER", &upper)
            .env("WORK", &work)
            .env("MERGED", &merged)
            .env("KEYS", &keys)
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("sshd.log")).unwrap())
            .spawn()
            .expect("start unshare");
        let sshd = Sshd {
            child,
            port,
            base,
            upper,
            keys,
            _dir: dir,
        };
        // Ready when it sends its banner.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut banner = [0u8; 7];
                if s.read_exact(&mut banner).is_ok() && &banner == b"SSH-2.0" {
                    return Some(sshd);
                }
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not start: {}",
                sshd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Authorizes `public_key` for ec2-user (what cloud-init does on a real builder).
    fn authorize(&self, public_key: &str) {
        let path = self.keys.join("ec2-user");
        std::fs::write(&path, format!("{public_key}\n")).unwrap();
    }

    /// A file as provisioning left it in the root.
    pub(super) fn file(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.upper.join(path.trim_start_matches('/'))).ok()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // unshare --kill-child takes sshd (PID 1 of its namespace) and the mounts with it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Authorizes the build's key in `sshd` as soon as bake has imported it into moto, while bake
/// waits for SSH (as a real builder's cloud-init would).
pub(super) fn authorize_when_imported(moto: &Moto, sshd: &Sshd, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let rt = tokio::runtime::Handle::current();
    loop {
        let keys = tokio::task::block_in_place(|| {
            rt.block_on(async {
                moto.ec2
                    .describe_key_pairs()
                    .include_public_key(true)
                    .filters(
                        Filter::builder()
                            .name("tag-key")
                            .values("bake:build-id")
                            .build(),
                    )
                    .send()
                    .await
                    .unwrap()
                    .key_pairs()
                    .iter()
                    .filter(|k| k.key_name().is_some_and(|n| n.starts_with("bake-")))
                    .filter_map(|k| k.public_key().map(str::to_owned))
                    .collect::<Vec<_>>()
            })
        });
        if let Some(key) = keys.first() {
            sshd.authorize(key);
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("bake exited ({status}) before importing its key pair");
        }
        assert!(Instant::now() < deadline, "bake never imported a key pair");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// recipes

struct RecipeDir {
    dir: tempfile::TempDir,
    store: PathBuf,
}

impl RecipeDir {
    fn new(provisioners: &str, tests: &str, instance: &str, base: &str) -> RecipeDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("files")).unwrap();
        std::fs::write(dir.path().join("files/motd"), "baked by bake\n").unwrap();
        let recipe = format!(
            r#"bake: 1
name: vendor-web
variables:
  token:
    type: string
    sensitive: true
base:
{base}
provisioners:
{provisioners}
tests:
{tests}
outputs:
  ami:
    strategy: instance
    name: "vendor-web-{{{{version_short}}}}"
    description: "vendor-web for {{{{region}}}}"
    regions: [us-east-1]
    tags:
      team: platform
      built-in: "{{{{region}}}}"
    instance:
{instance}
"#
        );
        std::fs::write(dir.path().join("recipe.yaml"), recipe).unwrap();
        let store = dir.path().join("store");
        RecipeDir { dir, store }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("recipe.yaml")
    }
}

const VENDOR_BASE: &str = r#"  ami:
    owners: [self]
    name: "vendor-linux-*-x86_64"
    virtualization_type: paravirtual
    root_device_type: standard"#;

fn instance_settings(port: u16, extra: &str) -> String {
    format!(
        "      ssh_host: 127.0.0.1\n      ssh_port: {port}\n      ssh_cidr: 127.0.0.1/32\n      ssh_username: ec2-user\n      user_data: \"#cloud-config\\n\"\n{extra}"
    )
}

fn wait_for(child: &mut Child, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("bake exited ({status}) before {what}");
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub(super) fn finish(child: Child) -> std::process::Output {
    child.wait_with_output().unwrap()
}

pub(super) fn tag<'a>(tags: &'a [Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

/// The `TagSpecification.N.ResourceType` → tags map of one request.
fn tag_specs(request: &BTreeMap<String, String>) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for n in 1..10 {
        let Some(kind) = request.get(&format!("TagSpecification.{n}.ResourceType")) else {
            continue;
        };
        let mut tags = BTreeMap::new();
        for t in 1..50 {
            if let Some(key) = request.get(&format!("TagSpecification.{n}.Tag.{t}.Key")) {
                let value = request
                    .get(&format!("TagSpecification.{n}.Tag.{t}.Value"))
                    .cloned()
                    .unwrap_or_default();
                tags.insert(key.clone(), value);
            }
        }
        out.insert(kind.clone(), tags);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_build_provisions_over_ssh_and_leaves_nothing_behind() {
    let Some(moto) = moto().await else { return };
    let Some(sshd) = Sshd::start() else {
        return;
    };
    let (_older, newest) = moto.vendor_amis().await;
    let recipe = RecipeDir::new(
        r#"  - file:
      name: motd
      source: files/motd
      destination: /etc/motd-bake
      mode: "0640"
  - shell:
      name: install
      env:
        GREETING: "hello from {{name}}"
        TOKEN: "{{var.token}}"
      inline: |
        set -eu
        mkdir -p /opt/app
        echo "$GREETING as $(id -un)" > /opt/app/provisioned
        echo "token length ${#TOKEN}" >> /opt/app/provisioned
        echo "the token is $TOKEN"
  - shell:
      name: as ec2-user
      user: ec2-user
      workdir: /tmp
      inline: id -un > /tmp/who && pwd >> /tmp/who"#,
        r#"  - command:
      name: motd is there
      run: cat /etc/motd-bake
      stdout_contains: baked by bake"#,
        &instance_settings(sshd.port, ""),
        VENDOR_BASE,
    );
    let mut child = moto
        .bake(&recipe.store)
        .args(["--output", "json", "build"])
        .arg(recipe.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    authorize_when_imported(&moto, &sshd, &mut child);
    let output = finish(child);
    let err = stderr(&output);
    assert!(
        output.status.success(),
        "bake build failed:\n{err}\nsshd:\n{}",
        sshd.log()
    );
    let built: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(
        built["source_ami"], newest,
        "the newest matching AMI (tie broken by name)"
    );
    let image_id = built["image_id"].as_str().unwrap().to_owned();

    // Provisioning happened over SSH, in the sshd's root, with sudo and env.
    assert_eq!(
        sshd.file("/opt/app/provisioned").as_deref(),
        Some("hello from vendor-web as root\ntoken length 12\n")
    );
    assert_eq!(
        sshd.file("/etc/motd-bake").as_deref(),
        Some("baked by bake\n")
    );
    let mode = std::fs::metadata(sshd.upper.join("etc/motd-bake")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o7777,
        0o640
    );
    assert_eq!(sshd.file("/tmp/who").as_deref(), Some("ec2-user\n/tmp\n"));
    // Output is streamed with the step prefix, secrets redacted.
    assert!(err.contains("install | the token is ***"), "{err}");
    assert!(!err.contains("s3cr3t-value"), "{err}");
    assert!(err.contains("host key SHA256:"), "{err}");

    // The AMI exists with its tags.
    let images = moto
        .ec2
        .describe_images()
        .image_ids(&image_id)
        .send()
        .await
        .unwrap();
    let image = &images.images()[0];
    assert_eq!(image.name(), built["image_name"].as_str());
    assert!(image.name().unwrap().starts_with("vendor-web-"));
    let tags = image.tags();
    assert_eq!(tag(tags, "team"), Some("platform"));
    assert_eq!(tag(tags, "built-in"), Some("us-east-1"));
    assert_eq!(tag(tags, "bake:state"), Some("available"));
    assert_eq!(tag(tags, "bake:version"), built["version"].as_str());
    assert_eq!(tag(tags, "bake:source-ami"), Some(newest.as_str()));
    for snapshot in image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
    {
        let snaps = moto
            .ec2
            .describe_snapshots()
            .snapshot_ids(snapshot)
            .send()
            .await
            .unwrap();
        assert_eq!(tag(snaps.snapshots()[0].tags(), "team"), Some("platform"));
    }

    // What bake asked for (moto keeps only part of it).
    let run = moto.captured.actions("RunInstances");
    assert_eq!(run.len(), 1);
    let run = &run[0];
    assert_eq!(run["ImageId"], newest);
    assert_eq!(run["MetadataOptions.HttpTokens"], "required");
    assert_eq!(run["MetadataOptions.HttpPutResponseHopLimit"], "1");
    assert_eq!(run["BlockDeviceMapping.1.Ebs.Encrypted"], "true");
    assert_eq!(run["BlockDeviceMapping.1.Ebs.VolumeType"], "gp3");
    assert_eq!(run["BlockDeviceMapping.1.DeviceName"], "/dev/sda1");
    assert!(run["ClientToken"].starts_with("bake-"));
    let build_id = tag_specs(run)["instance"]["bake:build-id"].clone();
    for (action, kinds) in [
        ("ImportKeyPair", vec!["key-pair"]),
        ("CreateSecurityGroup", vec!["security-group"]),
        ("RunInstances", vec!["instance", "volume"]),
        ("CreateImage", vec!["image"]),
    ] {
        let requests = moto.captured.actions(action);
        assert_eq!(requests.len(), 1, "{action}");
        let specs = tag_specs(&requests[0]);
        for kind in kinds {
            assert_eq!(specs[kind]["bake:build-id"], build_id, "{action} {kind}");
            assert_eq!(specs[kind]["bake:recipe"], "vendor-web", "{action} {kind}");
        }
    }
    let ingress = &moto.captured.actions("AuthorizeSecurityGroupIngress")[0];
    assert_eq!(ingress["IpPermissions.1.IpRanges.1.CidrIp"], "127.0.0.1/32");
    assert_eq!(ingress["IpPermissions.1.FromPort"], "22");
    let order: Vec<String> = moto
        .captured
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|r| r["Action"].clone())
        .filter(|a| {
            [
                "TerminateInstances",
                "DeleteKeyPair",
                "DeleteSecurityGroup",
                "StopInstances",
                "CreateImage",
            ]
            .contains(&a.as_str())
        })
        .collect();
    assert_eq!(
        order,
        [
            "StopInstances",
            "CreateImage",
            "TerminateInstances",
            "DeleteKeyPair",
            "DeleteSecurityGroup"
        ]
    );

    // Nothing temporary is left, in moto or in the journal.
    let (instances, keys, groups) = moto.leftovers().await;
    assert!(instances.is_empty(), "{instances:?}");
    assert!(keys.is_empty(), "{keys:?}");
    assert!(groups.is_empty(), "{groups:?}");
    let journals: Vec<_> = std::fs::read_dir(recipe.store.join("journal"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(journals.is_empty(), "{journals:?}");
    assert_eq!(built["regions"][0]["image_id"], image_id);

    // A second build of the same version finds the AMI by its `bake:version` tag.
    let before = moto.captured.count();
    let again = moto
        .bake(&recipe.store)
        .args(["--output", "json", "build"])
        .arg(recipe.path())
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    let cached: serde_json::Value = serde_json::from_str(&stdout(&again)).unwrap();
    assert_eq!(cached["image_id"], image_id);
    assert_eq!(cached["cached"], true);
    let new: Vec<String> = moto.captured.0.lock().unwrap()[before..]
        .iter()
        .map(|r| r["Action"].clone())
        .collect();
    assert!(
        !new.iter()
            .any(|a| a == "RunInstances" || a == "ImportKeyPair"),
        "{new:?}"
    );
}

async fn assert_clean(moto: &Moto) {
    let (instances, keys, groups) = moto.leftovers().await;
    assert!(instances.is_empty(), "instances left: {instances:?}");
    assert!(keys.is_empty(), "key pairs left: {keys:?}");
    assert!(groups.is_empty(), "security groups left: {groups:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provisioner_removes_every_temporary_resource() {
    let Some(moto) = moto().await else { return };
    let Some(sshd) = Sshd::start() else {
        return;
    };
    moto.vendor_amis().await;
    let recipe = RecipeDir::new(
        "  - shell:\n      name: broken\n      inline: |\n        echo about to fail\n        exit 3",
        "  []",
        &instance_settings(sshd.port, ""),
        VENDOR_BASE,
    );
    let mut child = moto
        .bake(&recipe.store)
        .arg("build")
        .arg(recipe.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    authorize_when_imported(&moto, &sshd, &mut child);
    let output = finish(child);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("step `broken` failed with exit code 3 (expected 0)"),
        "{err}"
    );
    assert!(err.contains("about to fail"), "{err}");
    assert!(moto.captured.actions("CreateImage").is_empty());
    assert_eq!(moto.captured.actions("TerminateInstances").len(), 1);
    assert_clean(&moto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_daemon_that_never_answers_times_out_with_the_console_and_cleans_up() {
    let Some(moto) = moto().await else { return };
    moto.vendor_amis().await;
    // Accepts TCP connections (the kernel does, into the backlog) but never speaks SSH.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let recipe = RecipeDir::new(
        "  - shell:\n      inline: \"true\"",
        "  []",
        &instance_settings(port, ""),
        VENDOR_BASE,
    );
    let output = moto
        .bake(&recipe.store)
        .env("BAKE_SSH_TIMEOUT", "3s")
        .arg("build")
        .arg(recipe.path())
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(3), "{err}");
    assert!(err.contains("did not answer within 3s"), "{err}");
    assert!(err.contains("console output of i-"), "{err}");
    assert!(err.contains("hint: check the security group CIDR"), "{err}");
    assert_clean(&moto).await;
    drop(silent);
}

/// Starts a build whose step signals that it runs (a marker file in the root) and then waits.
async fn build_blocked_in_provisioning(moto: &Moto, sshd: &Sshd, recipe: &RecipeDir) -> Child {
    let mut child = moto
        .bake(&recipe.store)
        .arg("build")
        .arg(recipe.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    authorize_when_imported(moto, sshd, &mut child);
    wait_for(&mut child, "the step to start", || {
        sshd.upper.join("tmp/step-started").exists()
    });
    child
}

const BLOCKING_STEP: &str = "  - shell:\n      name: slow\n      inline: |\n        touch /tmp/step-started\n        sleep 120";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_provisioning_removes_every_temporary_resource() {
    let Some(moto) = moto().await else { return };
    let Some(sshd) = Sshd::start() else {
        return;
    };
    moto.vendor_amis().await;
    let recipe = RecipeDir::new(
        BLOCKING_STEP,
        "  []",
        &instance_settings(sshd.port, ""),
        VENDOR_BASE,
    );
    let child = build_blocked_in_provisioning(&moto, &sshd, &recipe).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let output = finish(child);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(130), "{err}");
    assert!(err.contains("the build was interrupted"), "{err}");
    assert_clean(&moto).await;
    assert!(moto.captured.actions("CreateImage").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_bake_cleanup_removes_the_builds_resources_and_nothing_else() {
    let Some(moto) = moto().await else { return };
    let Some(sshd) = Sshd::start() else {
        return;
    };
    moto.vendor_amis().await;
    // Resources made outside bake, some even named like bake's: they must survive.
    let outside_key = moto
        .ec2
        .create_key_pair()
        .key_name("bake-not-ours")
        .send()
        .await
        .unwrap();
    let vpc = moto.ec2.describe_vpcs().send().await.unwrap().vpcs()[0]
        .vpc_id()
        .unwrap()
        .to_owned();
    let outside_group = moto
        .ec2
        .create_security_group()
        .group_name("team-ssh")
        .description("not bake's")
        .vpc_id(&vpc)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::SecurityGroup)
                .tags(
                    Tag::builder()
                        .key("bake:recipe")
                        .value("vendor-web")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_owned();
    let outside_instance = moto
        .ec2
        .run_instances()
        .image_id("ami-12345678")
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned();

    let recipe = RecipeDir::new(
        BLOCKING_STEP,
        "  []",
        &instance_settings(sshd.port, ""),
        VENDOR_BASE,
    );
    let mut child = build_blocked_in_provisioning(&moto, &sshd, &recipe).await;
    child.kill().unwrap(); // SIGKILL: no cleanup can run
    child.wait().unwrap();

    let (instances, keys, groups) = moto.leftovers().await;
    assert_eq!(
        instances.len(),
        2,
        "bake's builder and the outside instance: {instances:?}"
    );
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(groups.len(), 2, "{groups:?}");

    // A dry run lists, removes nothing.
    let dry = moto
        .bake(&recipe.store)
        .args(["cleanup", "--dry-run"])
        .output()
        .unwrap();
    assert!(dry.status.success(), "{}", stderr(&dry));
    let listed = stdout(&dry);
    assert_eq!(listed.matches("would remove").count(), 3, "{listed}");
    assert_eq!(moto.leftovers().await.0.len(), 2);

    let cleaned = moto.bake(&recipe.store).arg("cleanup").output().unwrap();
    assert!(cleaned.status.success(), "{}", stderr(&cleaned));
    let report = stdout(&cleaned);
    assert!(report.contains("removed  instance i-"), "{report}");
    assert!(report.contains("removed  key pair "), "{report}");
    assert!(report.contains("removed  security group sg-"), "{report}");

    let (instances, keys, groups) = moto.leftovers().await;
    assert_eq!(instances, [outside_instance]);
    assert_eq!(keys, [outside_key.key_name().unwrap().to_owned()]);
    assert_eq!(groups, ["team-ssh"]);
    let _ = outside_group;
    // The journal is closed; a second cleanup finds nothing.
    let again = moto.bake(&recipe.store).arg("cleanup").output().unwrap();
    assert!(
        stdout(&again).contains("nothing to clean up"),
        "{}",
        stdout(&again)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sources_and_subnets_fail_before_anything_is_created() {
    let Some(moto) = moto().await else { return };
    moto.vendor_amis().await;
    let before = moto.leftovers().await;
    let ssm = moto.aws.ssm(REGION);
    ssm.put_parameter()
        .name("/vendor/gone")
        .value("ami-0123456789abcdef0")
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let subnet_private = {
        let vpc = moto
            .ec2
            .create_vpc()
            .cidr_block("10.20.0.0/16")
            .send()
            .await
            .unwrap()
            .vpc()
            .unwrap()
            .vpc_id()
            .unwrap()
            .to_owned();
        moto.ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block("10.20.1.0/24")
            .send()
            .await
            .unwrap()
            .subnet()
            .unwrap()
            .subnet_id()
            .unwrap()
            .to_owned()
    };
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "a filter that matches nothing",
            "  ami:\n    owners: [self]\n    name: \"no-such-image-*\"\n    virtualization_type: paravirtual\n    root_device_type: standard".into(),
            instance_settings(22, ""),
            "no available image in us-east-1 matches the source-AMI filter (owners self, name `no-such-image-*`",
        ),
        (
            "a missing source AMI",
            "  ami:\n    ssm_parameter: /vendor/gone".into(),
            instance_settings(22, ""),
            "source AMI ami-0123456789abcdef0 does not exist (or is not available) in us-east-1",
        ),
        (
            "an unknown subnet",
            VENDOR_BASE.into(),
            instance_settings(22, "      subnet_id: subnet-0123456789abcdef0\n"),
            "subnet `subnet-0123456789abcdef0` does not exist in us-east-1",
        ),
        (
            "an unreachable subnet",
            VENDOR_BASE.into(),
            format!(
                "      ssh_cidr: 127.0.0.1/32\n      subnet_id: {subnet_private}\n"
            ),
            "gives instances no public address, so bake could not reach the builder",
        ),
    ];
    for (case, base, instance, expected) in cases {
        let recipe = RecipeDir::new(
            "  - shell:\n      inline: \"true\"",
            "  []",
            &instance,
            &base,
        );
        let output = moto
            .bake(&recipe.store)
            .arg("build")
            .arg(recipe.path())
            .output()
            .unwrap();
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{case}: {err}");
        assert!(err.contains(expected), "{case}: {err}");
        assert!(err.contains("hint: "), "{case}: {err}");
    }
    for action in [
        "ImportKeyPair",
        "CreateKeyPair",
        "CreateSecurityGroup",
        "RunInstances",
    ] {
        assert!(
            moto.captured.actions(action).is_empty(),
            "{action} was called"
        );
    }
    assert_eq!(moto.leftovers().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_pins_the_resolved_source_ami_in_the_version() {
    let Some(moto) = moto().await else { return };
    let (_, newest) = moto.vendor_amis().await;
    let recipe = RecipeDir::new(
        "  - shell:\n      inline: \"true\"",
        "  []",
        &instance_settings(22, ""),
        VENDOR_BASE,
    );
    let plan = |moto: &Moto| {
        let output = moto
            .bake(&recipe.store)
            .args(["--output", "json", "plan"])
            .arg(recipe.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_str::<serde_json::Value>(&stdout(&output)).unwrap()
    };
    let first = plan(&moto);
    assert_eq!(first["inputs"]["base"]["kind"], "ami");
    assert_eq!(first["inputs"]["base"]["image_id"], newest);
    assert_eq!(
        plan(&moto)["version"],
        first["version"],
        "same AMI, same version"
    );
    // A new vendor release is a new version.
    let run = moto
        .ec2
        .run_instances()
        .image_id("ami-12345678")
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let newer = moto
        .ec2
        .create_image()
        .instance_id(run.instances()[0].instance_id().unwrap())
        .name("vendor-linux-2026.3-x86_64")
        .send()
        .await
        .unwrap();
    let second = plan(&moto);
    assert_eq!(
        second["inputs"]["base"]["image_id"],
        newer.image_id().unwrap()
    );
    assert_ne!(second["version"], first["version"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bastion_reaches_the_builder_through_a_forwarded_channel() {
    let Some(moto) = moto().await else { return };
    let Some(sshd) = Sshd::start() else {
        return;
    };
    moto.vendor_amis().await;
    // The same sshd is the bastion: bake logs in there, opens a direct-tcpip channel to
    // 127.0.0.1:PORT, and runs its SSH session to the "builder" inside that channel.
    let bastion = format!(
        "      bastion:\n        host: 127.0.0.1\n        port: {}\n        user: ec2-user\n",
        sshd.port
    );
    let recipe = RecipeDir::new(
        "  - shell:\n      name: mark\n      inline: echo through-the-bastion > /opt/bastion-mark",
        "  []",
        &instance_settings(sshd.port, &bastion),
        VENDOR_BASE,
    );
    let mut child = moto
        .bake(&recipe.store)
        .arg("build")
        .arg(recipe.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    authorize_when_imported(&moto, &sshd, &mut child);
    let output = finish(child);
    let err = stderr(&output);
    assert!(output.status.success(), "{err}\nsshd:\n{}", sshd.log());
    assert!(
        err.contains(&format!("(through ec2-user@127.0.0.1:{})", sshd.port)),
        "{err}"
    );
    assert_eq!(
        sshd.file("/opt/bastion-mark").as_deref(),
        Some("through-the-bastion\n")
    );
    assert_clean(&moto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_janitor_without_the_journal_removes_tagged_leftovers_only_with_older_than() {
    let Some(moto) = moto().await else { return };
    let Some(sshd) = Sshd::start() else {
        return;
    };
    moto.vendor_amis().await;
    let recipe = RecipeDir::new(
        BLOCKING_STEP,
        "  []",
        &instance_settings(sshd.port, ""),
        VENDOR_BASE,
    );
    let mut child = build_blocked_in_provisioning(&moto, &sshd, &recipe).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(moto.leftovers().await.0.len(), 1);

    // Another machine's janitor: a store without this run's journal.
    let other_store = recipe.dir.path().join("other-store");
    let listed = moto
        .bake(&other_store)
        .args(["cleanup", "--dry-run"])
        .output()
        .unwrap();
    assert!(listed.status.success(), "{}", stderr(&listed));
    let text = stdout(&listed);
    assert_eq!(
        text.matches("no journal in this store for this run; pass --older-than")
            .count(),
        3,
        "{text}"
    );
    let young = moto
        .bake(&other_store)
        .args(["cleanup", "--older-than", "1h"])
        .output()
        .unwrap();
    assert!(
        stdout(&young).contains("newer than --older-than"),
        "{}",
        stdout(&young)
    );
    assert_eq!(
        moto.leftovers().await.0.len(),
        1,
        "nothing younger than 1h is removed"
    );

    std::thread::sleep(Duration::from_secs(2));
    let swept = moto
        .bake(&other_store)
        .args(["cleanup", "--older-than", "1s"])
        .output()
        .unwrap();
    assert!(swept.status.success(), "{}", stderr(&swept));
    assert_eq!(
        stdout(&swept).matches("removed  ").count(),
        3,
        "{}",
        stdout(&swept)
    );
    assert_clean(&moto).await;
}

/// bake's SSH client on its own against the real sshd: host key pinning, exit codes, timeouts,
/// cancellation, environment, and SFTP uploads moved into place with modes and owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ssh_client_pins_host_keys_runs_scripts_and_uploads_trees() {
    use bake::build::runner::OutputLine;
    use bake::ssh::{HostKeyPolicy, RemoteScript, RunAs, Session, SshError, SshTarget};

    let Some(sshd) = Sshd::start() else {
        return;
    };
    let key = Arc::new(bake::ssh::generate_key().unwrap());
    sshd.authorize(&key.public_key().to_openssh().unwrap());
    let target = SshTarget {
        host: "127.0.0.1".into(),
        port: sshd.port,
        user: "ec2-user".into(),
        bastion: None,
    };
    let session = Session::connect(&target, Arc::clone(&key), HostKeyPolicy::FirstUse)
        .await
        .unwrap();
    // The key recorded on first use is one of those generated in that root.
    let offered = session.host_key().clone();
    let generated: Vec<String> = std::fs::read_dir(sshd.upper.join("etc/ssh"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with("_key.pub"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(
        generated
            .iter()
            .any(|k| russh::keys::PublicKey::from_openssh(k.trim())
                .unwrap()
                .key_data()
                == offered.key_data()),
        "{generated:?}"
    );
    // Pinned to another key: refused.
    let stranger = bake::ssh::generate_key().unwrap().public_key().clone();
    match Session::connect(
        &target,
        Arc::clone(&key),
        HostKeyPolicy::Pinned(vec![stranger]),
    )
    .await
    {
        Err(SshError::HostKeyMismatch { .. }) => {}
        Err(other) => panic!("expected a host key mismatch, got {other}"),
        Ok(_) => panic!("a wrong pinned key was accepted"),
    }
    // Pinned to the recorded key: accepted.
    Session::connect(
        &target,
        Arc::clone(&key),
        HostKeyPolicy::Pinned(vec![offered.clone()]),
    )
    .await
    .unwrap();

    let never = || false;
    let script = |name: &str, text: &str, timeout: u64| RemoteScript {
        name: name.into(),
        script: text.into(),
        env: vec![("MESSAGE".into(), "it's here".into())],
        run_as: RunAs::Root,
        workdir: Some("/etc".into()),
        timeout: Duration::from_secs(timeout),
    };
    let mut lines: Vec<OutputLine> = Vec::new();
    let code = session
        .run(
            &script(
                "env",
                "echo \"$MESSAGE in $(pwd) as $(id -un)\"; echo oops >&2; exit 7",
                30,
            ),
            &mut lines,
            &never,
        )
        .await
        .unwrap();
    assert_eq!(code, 7);
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert!(texts.contains(&"it's here in /etc as root"), "{texts:?}");
    assert!(texts.contains(&"oops"), "{texts:?}");

    let started = Instant::now();
    match session
        .run(&script("slow", "sleep 60", 2), &mut lines, &never)
        .await
    {
        Err(SshError::Timeout { step, .. }) => assert_eq!(step, "slow"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));

    let cancelled = || true;
    match session
        .run(&script("cancelled", "sleep 60", 60), &mut lines, &cancelled)
        .await
    {
        Err(SshError::Interrupted { step }) => assert_eq!(step, "cancelled"),
        other => panic!("expected an interruption, got {other:?}"),
    }

    // A tree uploaded over SFTP and moved into place as root.
    let local = tempfile::tempdir().unwrap();
    let tree = local.path().join("app");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(tree.join("bin/run"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::write(tree.join("config"), "key=value\n").unwrap();
    std::os::unix::fs::symlink("bin/run", tree.join("start")).unwrap();
    let staged = session.upload_staged(&tree).await.unwrap();
    let install = bake::ssh::install_command(&staged, "/srv/app", Some(0o750), (1000, 1000));
    let code = session
        .run(&script("install", &install, 60), &mut lines, &never)
        .await
        .unwrap();
    assert_eq!(code, 0, "{lines:?}");
    let root = sshd.upper.join("srv/app");
    use std::os::unix::fs::MetadataExt;
    let run = std::fs::metadata(root.join("bin/run")).unwrap();
    assert_eq!(run.mode() & 0o7777, 0o750);
    assert_eq!((run.uid(), run.gid()), (1000, 1000));
    assert_eq!(
        std::fs::read_to_string(root.join("config")).unwrap(),
        "key=value\n"
    );
    assert_eq!(
        std::fs::read_link(root.join("start")).unwrap(),
        PathBuf::from("bin/run")
    );
    // The staging directory is gone.
    assert!(!sshd.upper.join(staged.trim_start_matches('/')).exists());
}

// ---------------------------------------------------------------------------------------------
// the compliance gate on the builder

/// The `audit:` section of the gate tests: SSG's Debian 12 content (vendored), CIS level 1.
fn audit_section(thresholds: &str) -> String {
    format!(
        "audit:\n  datastream: {}\n  profile: cis_level1_server\n{thresholds}",
        super::hardening::datastream().display()
    )
}

impl RecipeDir {
    fn with_audit(self, audit: &str) -> RecipeDir {
        let path = self.path();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(audit);
        std::fs::write(&path, text).unwrap();
        self
    }
}

/// Every path under the builder's writable layer that looks like part of the scan: its
/// directory, the bundle, the scanner, its libraries, the data stream or the results.
fn scan_traces(sshd: &Sshd) -> Vec<PathBuf> {
    walkdir::WalkDir::new(&sshd.upper)
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.path().to_path_buf())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with("bake-audit")
                || name.starts_with("oscap")
                || name.starts_with("libopenscap")
                || name.starts_with("ld-linux")
                || name.contains("datastream")
                || name.contains("results-arf")
                || name.starts_with("ssg-")
        })
        .collect()
}

/// The build record of `version` in `store`.
fn build_record(store: &Path, version: &str) -> serde_json::Value {
    let hex = version.trim_start_matches("sha256:");
    let text = std::fs::read_to_string(store.join("records").join(format!("{hex}.json")))
        .unwrap_or_else(|e| panic!("no record for {version}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn can_scan() -> bool {
    super::skip::tool("oscap")
}

/// The gate of an instance build runs on the builder with this host's scanner uploaded (the
/// builder has no OpenSCAP), is recorded like the snapshot gate's, and leaves nothing of the
/// scan in the builder's root, which is what the image is made of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_runs_on_the_builder_with_an_uploaded_scanner_and_leaves_no_trace() {
    if !can_scan() {
        return;
    }
    let Some(moto) = moto().await else { return };
    let Some(sshd) = Sshd::start() else {
        return;
    };
    // The builder cannot scan itself: no OpenSCAP in its root.
    for path in ["usr/bin/oscap", "usr/share/openscap"] {
        assert!(!sshd.base.join(path).exists(), "the builder has {path}");
    }
    moto.vendor_amis().await;
    let recipe = RecipeDir::new(
        "  - shell:\n      name: harden a little\n      inline: chmod 0600 /etc/crontab 2>/dev/null || true",
        "  - command:\n      name: passwd is there\n      run: test -f /etc/passwd",
        &instance_settings(sshd.port, ""),
        VENDOR_BASE,
    )
    .with_audit(&audit_section(
        "  min_pass_ratio: 80\n  exceptions:\n    - rule: partition_for_tmp\n      reason: the builder's /tmp is a directory of its root; the instance mounts a tmpfs at boot\n",
    ));
    let mut child = moto
        .bake(&recipe.store)
        .args(["--output", "json", "build"])
        .arg(recipe.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    authorize_when_imported(&moto, &sshd, &mut child);
    let output = finish(child);
    let err = stderr(&output);
    assert!(
        output.status.success(),
        "bake build failed:\n{err}\nsshd:\n{}",
        sshd.log()
    );
    let built: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    let version = built["version"].as_str().unwrap().to_owned();

    // The gate ran on the builder, after the tests and before the builder was stopped.
    let scanning = err.find("audit: scanning builder i-").expect(&err);
    let tested = err.find("passwd is there").expect(&err);
    let stopping = err.find("stopping i-").expect(&err);
    assert!(tested < scanning && scanning < stopping, "{err}");
    assert!(err.contains("% of "), "{err}");

    // The record has the snapshot gate's shape: counts, score, exceptions, and every rule
    // that did not apply with the platform that kept it out.
    let record = build_record(&recipe.store, &version);
    let audit = &record["audit"];
    assert_eq!(audit["scanner"], "openscap");
    assert!(
        audit["scanner_version"]
            .as_str()
            .unwrap()
            .starts_with("1.3."),
        "{audit:#}"
    );
    assert_eq!(
        audit["profile"],
        "xccdf_org.ssgproject.content_profile_cis_level1_server"
    );
    assert_eq!(audit["target"], "machine");
    let expected_digest = {
        use sha2::Digest;
        let bytes = std::fs::read(super::hardening::datastream()).unwrap();
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&bytes)))
    };
    assert_eq!(audit["datastream_digest"], expected_digest.as_str());
    let passed = audit["passed"].as_u64().unwrap();
    let failed = audit["failed"].as_u64().unwrap();
    eprintln!(
        "gate on the builder: {passed} pass, {failed} fail, score {}, {} not applicable, failing: {}",
        audit["score_centi"],
        audit["not_applicable"].as_array().map_or(0, Vec::len),
        audit["failing"]
    );
    assert!(passed > 50, "{audit:#}");
    assert!(failed > 0, "a minbase root fails some CIS rules: {audit:#}");
    assert_eq!(
        audit["score_centi"].as_u64().unwrap(),
        passed * 10_000 / (passed + failed)
    );
    assert_eq!(audit["min_pass_ratio_centi"], 8000);
    assert!(
        audit["problems"].as_array().unwrap().is_empty(),
        "{audit:#}"
    );
    let excepted = audit["excepted"].as_array().unwrap();
    assert_eq!(excepted.len(), 1, "{audit:#}");
    assert_eq!(excepted[0]["id"], "partition_for_tmp");
    let not_applicable = audit["not_applicable"].as_array().unwrap();
    assert!(!not_applicable.is_empty(), "{audit:#}");
    assert!(
        not_applicable
            .iter()
            .all(|r| !r["reason"].as_str().unwrap().is_empty()),
        "{not_applicable:#?}"
    );
    assert!(
        not_applicable
            .iter()
            .any(|r| r["reason"].as_str().unwrap().contains("platform `")),
        "{not_applicable:#?}"
    );
    // The support check read the builder's own dpkg database (bookworm: nothing ended).
    assert_eq!(audit["unsupported_packages"], serde_json::json!([]));

    // Nothing of the scan is left in the root the image is made of.
    let traces = scan_traces(&sshd);
    assert!(traces.is_empty(), "{traces:#?}");
    let leftover_tmp: Vec<_> = std::fs::read_dir(sshd.upper.join("tmp"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftover_tmp.is_empty(), "{leftover_tmp:?}");
    assert_clean(&moto).await;

    // `bake audit` cannot scan a root that is inside an AMI: it shows the recorded result.
    let shown = moto
        .bake(&recipe.store)
        .args(["--output", "json", "audit", &version])
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert!(
        stderr(&shown).contains("the result its gate recorded on the builder"),
        "{}",
        stderr(&shown)
    );
    let shown: serde_json::Value = serde_json::from_str(&stdout(&shown)).unwrap();
    assert_eq!(shown["recorded"], true);
    assert_eq!(shown["image_id"], built["image_id"]);
    assert_eq!(shown["passed"], audit["passed"]);
    assert_eq!(shown["failed"], audit["failed"]);
    assert_eq!(shown["score_centi"], audit["score_centi"]);
}

/// A provisioner that breaks a rule fails the gate on the builder: the build fails naming
/// the rule, no image is made, the scan is gone from the builder, and every temporary AWS
/// resource is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gate_on_the_builder_fails_the_build_naming_the_rules() {
    if !can_scan() {
        return;
    }
    let Some(moto) = moto().await else { return };
    let Some(sshd) = Sshd::start() else {
        return;
    };
    moto.vendor_amis().await;
    let recipe = RecipeDir::new(
        "  - shell:\n      name: loosen passwd\n      inline: chmod 0666 /etc/passwd",
        "  []",
        &instance_settings(sshd.port, ""),
        VENDOR_BASE,
    )
    .with_audit(&audit_section("  min_pass_ratio: 100\n"));
    let mut child = moto
        .bake(&recipe.store)
        .arg("build")
        .arg(recipe.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    authorize_when_imported(&moto, &sshd, &mut child);
    let output = finish(child);
    let err = stderr(&output);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{err}\nsshd:\n{}",
        sshd.log()
    );
    assert!(
        err.contains("error: the image fails the compliance gate: "),
        "{err}"
    );
    assert!(err.contains("below the minimum of 100.00%"), "{err}");
    assert!(err.contains("failing rules:"), "{err}");
    assert!(err.contains("\n  file_permissions_etc_passwd ("), "{err}");
    assert!(err.contains("hint: fix the image"), "{err}");
    assert!(moto.captured.actions("StopInstances").is_empty());
    assert!(moto.captured.actions("CreateImage").is_empty());
    assert_eq!(moto.captured.actions("TerminateInstances").len(), 1);
    let traces = scan_traces(&sshd);
    assert!(traces.is_empty(), "{traces:#?}");
    assert_clean(&moto).await;
    assert!(
        !recipe.store.join("records").exists()
            || std::fs::read_dir(recipe.store.join("records"))
                .unwrap()
                .next()
                .is_none(),
        "a failed build has no record"
    );
}

/// The bundle uploaded to builders is this host's whole scanner: `oscap`, its loader, every
/// library it and its SCE plugin load, and OpenSCAP's data. Unpacked elsewhere it runs
/// through its own loader with its own libraries only, and it is cached by content.
#[test]
fn the_scanner_bundle_runs_through_its_own_loader_and_is_cached() {
    if !can_scan() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let bundle = bake::audit::remote::Bundle::prepare(cache.path()).unwrap();
    assert!(bundle.digest.starts_with("sha256:"));
    assert!(bundle.loader.starts_with("ld-linux"), "{}", bundle.loader);
    let again = bake::audit::remote::Bundle::prepare(cache.path()).unwrap();
    assert_eq!(again.digest, bundle.digest);
    assert_eq!(again.archive, bundle.archive);
    let archives = std::fs::read_dir(cache.path()).unwrap().count();
    assert_eq!(archives, 1, "one archive, no temporary file left");

    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&bundle.archive)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let root = dir.path();
    for path in [
        "bin/oscap".to_owned(),
        format!("lib/{}", bundle.loader),
        "lib/libopenscap.so.25".into(),
        "lib/libopenscap_sce.so.25".into(),
        "lib/libc.so.6".into(),
        "lib/libxml2.so.2".into(),
        "share/openscap/schemas".into(),
        "share/openscap/xsl".into(),
    ] {
        assert!(root.join(&path).exists(), "the bundle lacks {path}");
    }
    let probes: Vec<_> = walkdir::WalkDir::new(root)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("probe_"))
        .collect();
    assert!(probes.is_empty(), "oscap 1.3 has in-process probes");

    // Run with an empty environment through the bundled loader; every object it maps comes
    // from the bundle (`LD_DEBUG=libs` names each file the loader opens).
    let lib = root.join("lib");
    let output = Command::new(lib.join(&bundle.loader))
        .arg("--library-path")
        .arg(&lib)
        .arg(root.join("bin/oscap"))
        .arg("--version")
        .env_clear()
        .env("LD_DEBUG", "libs")
        .env("OSCAP_SCHEMA_PATH", root.join("share/openscap/schemas"))
        .env("OSCAP_CHECK_ENGINE_PLUGIN_DIR", &lib)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("1.3."), "{}", stdout(&output));
    // The SCE plugin (dlopen'ed) is the bundle's too.
    assert!(
        stdout(&output).contains("SCE Version: 1.0 (from libopenscap_sce.so.25)"),
        "{}",
        stdout(&output)
    );
    let opened: Vec<String> = stderr(&output)
        .lines()
        .filter_map(|l| l.split("calling init: ").nth(1))
        .map(|p| p.trim().to_owned())
        .collect();
    assert!(!opened.is_empty(), "{}", stderr(&output));
    let lib_text = lib.to_string_lossy().into_owned();
    for path in &opened {
        assert!(
            path.starts_with(&lib_text),
            "{path} was loaded from outside the bundle"
        );
    }
}

/// The uploaded scanner is this host's binary: a builder of another architecture is refused
/// before anything is created in AWS. moto stores no architecture of its own choosing for the
/// AMIs a test makes (always `x86_64`), so the proxy in front of it answers DescribeImages
/// with the other architecture, and the recipe takes its source from an SSM parameter (a
/// DescribeImages filter on the architecture would be moto's to apply).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_of_another_architecture_is_refused_before_anything_is_created() {
    if !can_scan() {
        return;
    }
    let Some(mut moto) = moto().await else { return };
    let (host, other) = match bake::audit::remote::host_architecture() {
        "arm64" => ("arm64", "x86_64"),
        _ => ("x86_64", "arm64"),
    };
    let (_, vendor) = moto.vendor_amis().await;
    let described = moto
        .ec2
        .describe_images()
        .image_ids(&vendor)
        .send()
        .await
        .unwrap();
    assert_eq!(
        described.images()[0].architecture().map(|a| a.as_str()),
        Some(host),
        "moto's AMIs are the host's architecture"
    );
    moto.aws
        .ssm(REGION)
        .put_parameter()
        .name("/vendor/other")
        .value(&vendor)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let endpoint = service("BAKE_TEST_MOTO_ENDPOINT").unwrap();
    let captured = Captured::default();
    let record = captured.clone();
    let (from, to) = (
        format!("<architecture>{host}</architecture>"),
        format!("<architecture>{other}</architecture>"),
    );
    moto.proxy = super::moto_proxy::proxy(
        &endpoint,
        Arc::new(move |body: &[u8]| {
            let form = url_decode_form(&String::from_utf8_lossy(body));
            if form.contains_key("Action") {
                record.0.lock().unwrap().push(form);
            }
            super::moto_proxy::Verdict::Forward
        }),
        Arc::new(move |request: &[u8], response: Vec<u8>| {
            if String::from_utf8_lossy(request).contains("Action=DescribeImages") {
                replace_in_body(&response, &from, &to)
            } else {
                response
            }
        }),
    );
    moto.captured = captured;
    let recipe = RecipeDir::new(
        "  - shell:\n      inline: \"true\"",
        "  []",
        &instance_settings(22, ""),
        &format!("  ami:\n    ssm_parameter: /vendor/other\n    architecture: {other}"),
    )
    .with_audit(&audit_section("  min_pass_ratio: 80\n"));
    let before = moto.leftovers().await;
    let output = moto
        .bake(&recipe.store)
        .arg("build")
        .arg(recipe.path())
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "the compliance gate cannot run on an {other} builder from this {host} machine"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("hint: run `bake build` on an {other} machine")),
        "{err}"
    );
    assert!(!moto.captured.actions("DescribeImages").is_empty());
    for action in ["ImportKeyPair", "CreateSecurityGroup", "RunInstances"] {
        assert!(
            moto.captured.actions(action).is_empty(),
            "{action} was called"
        );
    }
    assert_eq!(moto.leftovers().await, before);
}

/// `response` (a whole HTTP/1.1 answer) with `from` replaced by `to` in its body and its
/// `Content-Length` set to match.
fn replace_in_body(response: &[u8], from: &str, to: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return response.to_vec();
    };
    let body = body.replace(from, to);
    let head: Vec<String> = head
        .split("\r\n")
        .map(|line| match line.split_once(':') {
            Some((name, _)) if name.eq_ignore_ascii_case("content-length") => {
                format!("{name}: {}", body.len())
            }
            _ => line.to_owned(),
        })
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}
