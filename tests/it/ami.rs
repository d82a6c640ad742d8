//! The snapshot strategy's AWS half against moto: EBS direct upload, RegisterImage, distribution
//! to three regions, idempotent re-runs, rollback, `bake cleanup`, and the checks that fail
//! before anything is uploaded. moto ignores much of what RegisterImage and CopyImage are sent
//! (see MOTO.md), so those fields are asserted on the captured requests.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use aws_sdk_ec2::types::ImageAttributeName;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use bake::ami::distribute::{DistributeOptions, QuotaPolicy};
use bake::ami::publish::{PublishError, PublishOptions, publish_snapshot_ami};
use bake::ami::upload::BLOCK_SIZE;
use bake::ami::wait::WaitPolicy;
use bake::ami::{AmiSpec, RegionSpec, Sharing};
use bake::aws::{Aws, Emulator};
use bake::store::Store;

use super::common::{bake, fresh_account, service};
use super::moto_proxy::{Verdict, proxy};
use super::standin::ThrottleProxy;

/// One request as sent.
#[derive(Debug, Clone)]
struct Captured {
    operation: String,
    /// Form parameters (EC2 query protocol) or top-level JSON fields (EBS), as strings.
    params: BTreeMap<String, String>,
    region: String,
}

/// Records every request bake's clients send.
#[derive(Debug, Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl Capture {
    fn all(&self) -> Vec<Captured> {
        self.0.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    fn of(&self, operation: &str) -> Vec<Captured> {
        self.all()
            .into_iter()
            .filter(|c| c.operation == operation)
            .collect()
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Intercept for Capture {
    fn name(&self) -> &'static str {
        "TestCapture"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg
            .load::<Metadata>()
            .map(|m| m.name().to_owned())
            .unwrap_or_default();
        let request = context.request();
        let host_region = request
            .headers()
            .get("authorization")
            .and_then(|a| a.split('/').nth(2).map(str::to_owned))
            .unwrap_or_default();
        let mut params = BTreeMap::new();
        if operation != "PutSnapshotBlock" {
            let body = request
                .body()
                .bytes()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            if body.starts_with('{') {
                if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&body) {
                    for (k, v) in map {
                        let v = match v {
                            serde_json::Value::String(s) => s,
                            other => other.to_string(),
                        };
                        params.insert(k, v);
                    }
                }
            } else {
                for pair in body.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    params.insert(percent_decode(k), percent_decode(v));
                }
            }
        }
        self.0.lock().unwrap().push(Captured {
            operation,
            params,
            region: host_region,
        });
        Ok(())
    }
}

const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-2"];
const SHARED_ACCOUNT: &str = "111122223333";
const SHARED_ORG: &str = "arn:aws:organizations::111122223333:organization/o-abc123def4";

/// bake's AWS handle for one test: its own moto account, no retries (moto's 500s fail fast),
/// every request captured, and moto named as the emulator (`BAKE_AWS_EMULATOR=moto`).
async fn test_aws(endpoint: &str) -> (Aws, Capture, String) {
    let (aws, capture, account) = test_aws_as_if_aws(endpoint).await;
    (aws.with_emulator(Emulator::Moto), capture, account)
}

/// As [`test_aws`], but with no emulator named: bake must treat the endpoint as AWS itself
/// (an endpoint override is also how VPC and FIPS endpoints are reached).
async fn test_aws_as_if_aws(endpoint: &str) -> (Aws, Capture, String) {
    let account = fresh_account();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .retry_config(RetryConfig::disabled())
        .load()
        .await;
    let capture = Capture::default();
    let aws = Aws::from_config(config, Some(account.clone())).with_interceptor(capture.clone());
    (aws, capture, account)
}

fn fast_options() -> PublishOptions {
    PublishOptions {
        upload_concurrency: 8,
        snapshot_wait: WaitPolicy::fast(),
        distribute: DistributeOptions {
            concurrency: 3,
            wait: WaitPolicy::fast(),
            ..DistributeOptions::default()
        },
        keep_on_failure: false,
    }
}

/// A KMS key with alias `alias/bake-ami` in each region; returns region → key ARN.
async fn kms_keys(aws: &Aws, regions: &[&str]) -> BTreeMap<String, String> {
    let mut arns = BTreeMap::new();
    for region in regions {
        let kms = aws.kms(region);
        let key = kms.create_key().send().await.unwrap();
        let meta = key.key_metadata().unwrap();
        kms.create_alias()
            .alias_name("alias/bake-ami")
            .target_key_id(meta.key_id())
            .send()
            .await
            .unwrap();
        arns.insert(region.to_string(), meta.arn().unwrap().to_owned());
    }
    arns
}

fn spec(name: &str, regions: &[&str]) -> AmiSpec {
    let version = format!("sha256:{:0>64}", hex_of(name));
    AmiSpec {
        recipe: name.to_owned(),
        version: version.clone(),
        architecture: "x86_64".into(),
        boot_mode: "uefi".into(),
        disk_size_gib: 2,
        volume_type: "gp3".into(),
        encrypted: true,
        regions: regions
            .iter()
            .map(|r| RegionSpec {
                region: r.to_string(),
                name: format!("{name}-{r}-1"),
                description: Some(format!("{name} test AMI")),
                tags: [
                    ("Name".to_owned(), format!("{name}-{r}")),
                    ("bake:recipe".to_owned(), name.to_owned()),
                    ("bake:version".to_owned(), version.clone()),
                ]
                .into(),
                kms_key_id: Some("alias/bake-ami".into()),
            })
            .collect(),
        sharing: Sharing {
            accounts: vec![SHARED_ACCOUNT.into()],
            organizations: vec![SHARED_ORG.into()],
            organizational_units: vec![],
            public: false,
        },
        deprecate_after: None,
    }
}

fn hex_of(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect::<String>()
}

/// A sparse 1 GiB disk image with data in a few known blocks (one only partly filled, one
/// written with zeros, which must be skipped); returns the non-zero blocks by index.
fn synthetic_image(path: &Path) -> BTreeMap<i32, Vec<u8>> {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(1 << 30).unwrap();
    let mut blocks = BTreeMap::new();
    for (index, seed) in [(0i32, 1u8), (3, 7), (700, 42), (2047, 99)] {
        let mut data = vec![0u8; BLOCK_SIZE];
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1;
        }
        if index == 3 {
            data[4096..].fill(0); // mostly zeros, still sent
        }
        file.write_all_at(&data, index as u64 * BLOCK_SIZE as u64)
            .unwrap();
        blocks.insert(index, data);
    }
    // Written zeros: data to the file system, nothing to EBS.
    file.write_all_at(&vec![0u8; BLOCK_SIZE], 900 * BLOCK_SIZE as u64)
        .unwrap();
    blocks
}

fn is_mutating(operation: &str) -> bool {
    !["Describe", "List", "Get"]
        .iter()
        .any(|p| operation.starts_with(p))
}

#[tokio::test]
async fn publish_uploads_registers_distributes_and_a_rerun_changes_nothing() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let (aws, capture, _) = test_aws(&endpoint).await;
    let keys = kms_keys(&aws, &REGIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let image = dir.path().join("disk.raw");
    let blocks = synthetic_image(&image);
    let spec = spec("amipub", &REGIONS);
    capture.clear();

    let record = publish_snapshot_ami(
        &aws,
        &store,
        &spec,
        Some(&image),
        Some("sha256:feed".into()),
        &fast_options(),
        std::future::pending(),
    )
    .await
    .expect("publish");
    assert_eq!(record.disk_image_digest.as_deref(), Some("sha256:feed"));
    let regions: Vec<&str> = record.regions.iter().map(|r| r.region.as_str()).collect();
    assert_eq!(regions, REGIONS);

    // The snapshot holds exactly the image's non-zero blocks.
    let home = &record.regions[0];
    let ebs = aws.ebs("us-east-1");
    let listed = ebs
        .list_snapshot_blocks()
        .snapshot_id(&home.snapshot_id)
        .send()
        .await
        .unwrap();
    let mut read_back = BTreeMap::new();
    for block in listed.blocks() {
        let index = block.block_index().unwrap();
        let got = ebs
            .get_snapshot_block()
            .snapshot_id(&home.snapshot_id)
            .block_index(index)
            .block_token(block.block_token().unwrap())
            .send()
            .await
            .unwrap();
        let data = got
            .block_data
            .collect()
            .await
            .unwrap()
            .into_bytes()
            .to_vec();
        read_back.insert(index, data);
    }
    assert_eq!(
        read_back.keys().collect::<Vec<_>>(),
        blocks.keys().collect::<Vec<_>>()
    );
    assert!(read_back == blocks, "block contents differ");

    // StartSnapshot: size, encryption with the home region's key (as an ARN), tags, token.
    let start = &capture.of("StartSnapshot")[0];
    assert_eq!(start.params["VolumeSize"], "2");
    assert_eq!(start.params["Encrypted"], "true");
    assert_eq!(start.params["KmsKeyArn"], keys["us-east-1"]);
    assert_eq!(
        start.params["ClientToken"],
        spec.client_token("start-snapshot", "us-east-1")
    );
    assert!(start.params["Tags"].contains("bake:version"));
    let complete = &capture.of("CompleteSnapshot")[0];
    assert!(capture.of("PutSnapshotBlock").len() == blocks.len());
    assert_eq!(complete.region, "us-east-1");

    // RegisterImage: what moto does not store, from the request.
    let registers = capture.of("RegisterImage");
    assert_eq!(registers.len(), 1);
    let p = &registers[0].params;
    assert_eq!(p["BootMode"], "uefi");
    assert_eq!(p["EnaSupport"], "true");
    assert_eq!(p["ImdsSupport"], "v2.0");
    assert_eq!(p["Architecture"], "x86_64");
    assert_eq!(p["RootDeviceName"], "/dev/xvda");
    assert_eq!(p["BlockDeviceMapping.1.DeviceName"], "/dev/xvda");
    assert_eq!(p["BlockDeviceMapping.1.Ebs.SnapshotId"], home.snapshot_id);
    assert_eq!(p["BlockDeviceMapping.1.Ebs.VolumeType"], "gp3");
    assert_eq!(p["BlockDeviceMapping.1.Ebs.DeleteOnTermination"], "true");
    assert_eq!(p["BlockDeviceMapping.1.Ebs.Encrypted"], "true");
    assert_eq!(p["BlockDeviceMapping.1.Ebs.VolumeSize"], "2");

    // CopyImage: one per other region, encrypted with that region's key.
    let copies = capture.of("CopyImage");
    assert_eq!(copies.len(), 2);
    for copy in &copies {
        assert_eq!(copy.params["SourceRegion"], "us-east-1");
        assert_eq!(copy.params["Encrypted"], "true");
        assert_eq!(copy.params["KmsKeyId"], keys[&copy.region], "{copy:?}");
    }
    // Never public.
    for modify in capture.of("ModifyImageAttribute") {
        assert!(!modify.params.values().any(|v| v == "all"), "{modify:?}");
    }

    // Every region has its AMI, tagged and shared.
    for image in &record.regions {
        let ec2 = aws.ec2(&image.region);
        let described = ec2
            .describe_images()
            .image_ids(&image.image_id)
            .send()
            .await
            .unwrap();
        let found = &described.images()[0];
        assert_eq!(
            found.name(),
            Some(format!("amipub-{}-1", image.region).as_str())
        );
        let tags: BTreeMap<_, _> = found
            .tags()
            .iter()
            .map(|t| (t.key().unwrap(), t.value().unwrap()))
            .collect();
        assert_eq!(tags["bake:version"], spec.version);
        assert_eq!(tags["Name"], format!("amipub-{}", image.region));
        assert!(tags.contains_key("bake:run"));
        assert_eq!(found.public(), Some(false));
        let permissions = ec2
            .describe_image_attribute()
            .image_id(&image.image_id)
            .attribute(ImageAttributeName::LaunchPermission)
            .send()
            .await
            .unwrap();
        let users: Vec<_> = permissions
            .launch_permissions()
            .iter()
            .filter_map(|p| p.user_id())
            .collect();
        let orgs: Vec<_> = permissions
            .launch_permissions()
            .iter()
            .filter_map(|p| p.organization_arn())
            .collect();
        assert_eq!(users, [SHARED_ACCOUNT], "{}", image.region);
        assert_eq!(orgs, [SHARED_ORG], "{}", image.region);
        // The snapshot behind a copy is tagged too.
        if image.region != "us-east-1" {
            let snapshot = ec2
                .describe_snapshots()
                .snapshot_ids(&image.snapshot_id)
                .send()
                .await
                .unwrap();
            let tags = snapshot.snapshots()[0].tags();
            assert!(tags.iter().any(|t| t.key() == Some("bake:version")));
        }
    }
    // A finished run leaves no journal behind.
    assert!(bake::ami::journal::list(&store).is_empty());

    // Again: the same AMIs, and not one mutating call.
    capture.clear();
    let again = publish_snapshot_ami(
        &aws,
        &store,
        &spec,
        Some(&image),
        Some("sha256:feed".into()),
        &fast_options(),
        std::future::pending(),
    )
    .await
    .expect("second publish");
    let ids = |r: &bake::ami::AmiRecord| {
        r.regions
            .iter()
            .map(|i| i.image_id.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&again), ids(&record));
    let mutating: Vec<String> = capture
        .all()
        .into_iter()
        .map(|c| c.operation)
        .filter(|o| is_mutating(o))
        .collect();
    assert!(
        mutating.is_empty(),
        "the second run changed things: {mutating:?}"
    );
    assert!(
        !capture.all().is_empty(),
        "the second run looked before deciding"
    );
}

#[tokio::test]
async fn failure_after_registering_removes_what_the_run_made_and_nothing_else() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let (aws, capture, _) = test_aws(&endpoint).await;
    kms_keys(&aws, &["us-east-1"]).await;
    let ec2 = aws.ec2("us-east-1");
    // Someone else's snapshot and AMI, one even with a bake-like tag: never touched.
    let theirs = ec2
        .create_snapshot()
        .volume_id("vol-12345678")
        .send()
        .await
        .ok()
        .and_then(|s| s.snapshot_id().map(str::to_owned));
    let their_image = ec2
        .register_image()
        .name("not-bakes")
        .root_device_name("/dev/xvda")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let image = dir.path().join("disk.raw");
    synthetic_image(&image);
    // moto rejects a launch permission for an account id that is not 12 digits (recipes
    // cannot say that; a spec can): the run fails after registering.
    let mut spec = spec("amifail", &["us-east-1"]);
    spec.sharing.accounts = vec!["123".into()];
    capture.clear();

    let failed = publish_snapshot_ami(
        &aws,
        &store,
        &spec,
        Some(&image),
        None,
        &fast_options(),
        std::future::pending(),
    )
    .await
    .expect_err("sharing fails on moto");
    assert!(
        matches!(failed.error, PublishError::Distribution(_)),
        "{:?}",
        failed.error
    );
    assert_eq!(capture.of("ModifyImageAttribute").len(), 1);
    assert!(
        failed.error.to_string().contains("set launch permissions"),
        "{}",
        failed.error
    );
    let registered = capture.of("RegisterImage");
    assert_eq!(registered.len(), 1);
    let snapshot_id = registered[0].params["BlockDeviceMapping.1.Ebs.SnapshotId"].clone();

    // The AMI and the uploaded snapshot are gone.
    let images = ec2
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("name")
                .values("amifail-us-east-1-1")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(
        images
            .images()
            .iter()
            .all(|i| i.state().map(|s| s.as_str()) == Some("deregistered")),
        "{images:?}"
    );
    let snapshot = ec2
        .describe_snapshots()
        .snapshot_ids(&snapshot_id)
        .send()
        .await;
    assert!(snapshot.is_err() || snapshot.unwrap().snapshots().is_empty());
    assert!(
        failed.removals.iter().all(|r| !r.failed()),
        "{:?}",
        failed.removals
    );
    assert!(
        bake::ami::journal::list(&store).is_empty(),
        "rolled back fully: no journal"
    );

    // Not bake's: still there.
    let still = ec2
        .describe_images()
        .image_ids(&their_image)
        .send()
        .await
        .unwrap();
    assert_eq!(still.images().len(), 1);
    if let Some(theirs) = theirs {
        let still = ec2
            .describe_snapshots()
            .snapshot_ids(&theirs)
            .send()
            .await
            .unwrap();
        assert_eq!(still.snapshots().len(), 1);
    }
    let deregistered: Vec<_> = capture
        .of("DeregisterImage")
        .into_iter()
        .map(|c| c.params["ImageId"].clone())
        .collect();
    assert!(!deregistered.contains(&their_image));
}

#[tokio::test]
async fn unknown_region_unknown_key_and_small_disk_fail_before_any_upload() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let (aws, capture, _) = test_aws(&endpoint).await;
    kms_keys(&aws, &["us-east-1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let image = dir.path().join("disk.raw");
    synthetic_image(&image);
    let run = |spec: AmiSpec, image: std::path::PathBuf| {
        let aws = aws.clone();
        let store = store.clone();
        async move {
            publish_snapshot_ami(
                &aws,
                &store,
                &spec,
                Some(&image),
                None,
                &fast_options(),
                std::future::pending(),
            )
            .await
            .expect_err("must fail")
        }
    };
    capture.clear();

    let unknown_region = run(
        spec("amiregion", &["us-east-1", "xx-fake-1"]),
        image.clone(),
    )
    .await;
    assert!(
        matches!(&unknown_region.error, PublishError::UnknownRegion { region, .. } if region == "xx-fake-1"),
        "{:?}",
        unknown_region.error
    );

    // The key exists in us-east-1 only.
    let unknown_key = run(spec("amikey", &["us-east-1", "eu-west-1"]), image.clone()).await;
    assert!(
        matches!(&unknown_key.error, PublishError::UnknownKey { region, .. } if region == "eu-west-1"),
        "{:?}",
        unknown_key.error
    );
    assert!(unknown_key.error.hint().unwrap().contains("eu-west-1"));

    let big = dir.path().join("big.raw");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    let too_small = run(spec("amidisk", &["us-east-1"]), big).await;
    assert!(
        matches!(too_small.error, PublishError::DiskTooSmall { size, disk_size_gib: 2, .. } if size == 3 << 30),
        "{:?}",
        too_small.error
    );
    assert!(too_small.error.is_user_error());

    let mutating: Vec<String> = capture
        .all()
        .into_iter()
        .map(|c| c.operation)
        .filter(|o| is_mutating(o))
        .collect();
    assert!(mutating.is_empty(), "{mutating:?}");
    assert!(bake::ami::journal::list(&store).is_empty());
}

#[tokio::test]
async fn a_killed_upload_leaves_a_snapshot_that_cleanup_removes() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let (aws, _, account) = test_aws(&endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let run_bake = |args: &[&str]| {
        let mut command = bake();
        command
            .args(args)
            .env("BAKE_STORE", &store_dir)
            .env("BAKE_AWS_ENDPOINT_URL", &endpoint)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_REGION", "us-east-1")
            .env("BAKE_AWS_POLL_INTERVAL", "50ms")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE");
        command
    };

    // A finished upload: bake's, but complete, so cleanup keeps it.
    let small = dir.path().join("small.raw");
    synthetic_image(&small);
    let finished = run_bake(&["ami", "upload", small.to_str().unwrap(), "--output", "json"])
        .output()
        .unwrap();
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    let finished: serde_json::Value = serde_json::from_slice(&finished.stdout).unwrap();
    let finished_id = finished["snapshot_id"].as_str().unwrap().to_owned();

    // Someone else's snapshot.
    let ec2 = aws.ec2("us-east-1");
    let theirs = ec2
        .create_snapshot()
        .volume_id("vol-12345678")
        .send()
        .await
        .ok()
        .and_then(|s| s.snapshot_id().map(str::to_owned));

    // A big image, uploaded one block at a time, killed once the snapshot exists.
    let big = dir.path().join("big.raw");
    {
        let file = std::fs::File::create(&big).unwrap();
        let block: Vec<u8> = (0..BLOCK_SIZE).map(|i| (i % 253) as u8 | 1).collect();
        for index in 0..600u64 {
            file.write_all_at(&block, index * BLOCK_SIZE as u64)
                .unwrap();
        }
    }
    let mut child = run_bake(&["ami", "upload", big.to_str().unwrap(), "--concurrency", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let journal_dir = store_dir.join("journal");
    let deadline = Instant::now() + Duration::from_secs(60);
    let snapshot_id = loop {
        let found = std::fs::read_dir(&journal_dir).ok().and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .find_map(|text| {
                    let doc: serde_json::Value = serde_json::from_str(&text).ok()?;
                    doc["resources"][0]["id"].as_str().map(str::to_owned)
                })
        });
        if let Some(id) = found {
            break id;
        }
        assert!(Instant::now() < deadline, "the upload never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "bake ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let snapshot = ec2
        .describe_snapshots()
        .snapshot_ids(&snapshot_id)
        .send()
        .await
        .unwrap();
    assert_eq!(
        snapshot.snapshots().len(),
        1,
        "the killed run's snapshot exists"
    );

    let dry = run_bake(&["cleanup", "--dry-run"]).output().unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let dry_out = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry_out.contains(&format!("would remove  snapshot {snapshot_id}")),
        "{dry_out}"
    );
    assert_eq!(
        ec2.describe_snapshots()
            .snapshot_ids(&snapshot_id)
            .send()
            .await
            .unwrap()
            .snapshots()
            .len(),
        1,
        "a dry run removes nothing"
    );

    let cleaned = run_bake(&["cleanup"]).output().unwrap();
    let out = String::from_utf8_lossy(&cleaned.stdout);
    assert!(
        cleaned.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&cleaned.stderr)
    );
    assert!(
        out.contains(&format!("removed  snapshot {snapshot_id}")),
        "{out}"
    );
    let gone = ec2
        .describe_snapshots()
        .snapshot_ids(&snapshot_id)
        .send()
        .await;
    assert!(gone.is_err() || gone.unwrap().snapshots().is_empty());
    assert!(
        std::fs::read_dir(&journal_dir).unwrap().next().is_none(),
        "the journal is gone once everything in it is"
    );
    // Kept: the finished upload and someone else's snapshot.
    for kept in std::iter::once(finished_id).chain(theirs) {
        let still = ec2
            .describe_snapshots()
            .snapshot_ids(&kept)
            .send()
            .await
            .unwrap();
        assert_eq!(still.snapshots().len(), 1, "{kept} was removed");
    }
}

/// `bake build` of a snapshot-strategy recipe, end to end against moto: provision, disk image,
/// boot test in QEMU, upload, register, copies to three regions, signed provenance; then again,
/// which reuses it all.
/// Needs root and Debian's mirror (like the disk tests, whose store it shares for the cached
/// bootstrap).
#[tokio::test(flavor = "multi_thread")]
async fn bake_build_makes_the_ami_in_three_regions_and_a_rebuild_reuses_it() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    if !super::skip::root("provisioning a root filesystem") {
        return;
    }
    let (aws, _, account) = test_aws(&endpoint).await;
    kms_keys(&aws, &REGIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::fs::read_to_string(
        super::common::repo_root().join("tests/fixtures/recipes/disk/ami.yaml"),
    )
    .unwrap();
    let recipe = fixture.replace(
        "    regions: [us-east-1]\n    disk_size_gib: 2\n",
        "    name: \"disk-test-{{version_short}}\"\n    regions: [us-east-1, eu-west-1, ap-southeast-2]\n    disk_size_gib: 2\n    encryption:\n      kms_key_id: alias/bake-ami\n    sharing:\n      accounts: [\"111122223333\"]\n    tags:\n      Name: \"disk-test-{{region}}\"\n",
    );
    // The disk image must boot to the recipe's marker before anything is uploaded. Under TCG
    // (no KVM) on a machine busy with the other tests a boot can take minutes: more room.
    let recipe = recipe.replace(
        "tests:\n  - boot:\n      marker: bake-disk-test-ok\n      timeout: 10m\n",
        "tests:\n  - boot:\n      marker: bake-disk-test-ok\n      timeout: 25m\n",
    );
    assert!(
        recipe.contains("regions: [us-east-1, eu-west-1") && recipe.contains("timeout: 25m"),
        "the fixture changed: update this test"
    );
    let recipe_path = dir.path().join("ami.yaml");
    std::fs::write(&recipe_path, recipe).unwrap();
    let store = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bake-disk-store");
    let build = || {
        let output = bake()
            .args(["build", recipe_path.to_str().unwrap(), "--output", "json"])
            .env("BAKE_STORE", &store)
            .env("BAKE_AWS_ENDPOINT_URL", &endpoint)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_POLL_INTERVAL", "50ms")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "bake build failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let first = build();
    assert_eq!(first["cached"], false);
    // The image booted in QEMU to the boot test's marker before the upload.
    let boots = first["boots"]
        .as_array()
        .expect("the build reports its boot tests");
    assert_eq!(boots.len(), 1, "{first}");
    assert_eq!(boots[0]["marker"], "bake-disk-test-ok");
    assert!(
        boots[0]["marker_line"]
            .as_str()
            .unwrap()
            .ends_with("bake-disk-test-ok"),
        "{first}"
    );
    assert!(
        first["disk_image_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    let version = first["version"].as_str().unwrap().to_owned();
    let regions = first["regions"].as_array().unwrap();
    assert_eq!(
        regions
            .iter()
            .map(|r| r["region"].as_str().unwrap())
            .collect::<Vec<_>>(),
        REGIONS
    );
    for region in regions {
        let ec2 = aws.ec2(region["region"].as_str().unwrap());
        let image_id = region["image_id"].as_str().unwrap();
        let described = ec2
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .unwrap();
        let tags: BTreeMap<_, _> = described.images()[0]
            .tags()
            .iter()
            .map(|t| (t.key().unwrap(), t.value().unwrap()))
            .collect();
        assert_eq!(tags["bake:version"], version);
        assert_eq!(tags["bake:recipe"], "disk-test");
        // The build signed the AMIs' provenance and tagged each with its digest.
        assert_eq!(
            tags["bake:provenance"],
            first["provenance"].as_str().unwrap(),
            "{first}"
        );
        let permissions = ec2
            .describe_image_attribute()
            .image_id(image_id)
            .attribute(ImageAttributeName::LaunchPermission)
            .send()
            .await
            .unwrap();
        assert_eq!(
            permissions.launch_permissions()[0].user_id(),
            Some(SHARED_ACCOUNT)
        );
    }
    // The uploaded snapshot holds blocks (the disk image's non-zero ones; their contents are
    // checked against a synthetic image in the test above).
    let home_snapshot = regions[0]["snapshot_id"].as_str().unwrap();
    let blocks = aws
        .ebs("us-east-1")
        .list_snapshot_blocks()
        .snapshot_id(home_snapshot)
        .send()
        .await
        .unwrap();
    assert!(!blocks.blocks().is_empty());

    let second = build();
    assert_eq!(second["cached"], true);
    // The home region's snapshot is reported from the AMI on a rebuild (moto registers images
    // on a stand-in snapshot), so compare AMI ids.
    let ids = |v: &serde_json::Value| {
        v["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["image_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&second), ids(&first));
    assert_eq!(second["disk_image_digest"], first["disk_image_digest"]);
    // Already attested: the rebuild keeps the provenance instead of signing (and tagging) again.
    assert_eq!(second["provenance"], first["provenance"]);
    // Nothing booted again; the record keeps the first run's boot.
    assert_eq!(second["boots"], first["boots"]);
}

/// `bake build` of the disk fixture recipe, then of its version 2 (one more step writes one
/// small file): version 2's snapshot starts from version 1's, compared with version 1's disk
/// image, which the first build kept in the store; the blocks written are those where the two
/// disk images differ (the proxy's PutSnapshotBlock count says so too), and the snapshot reads
/// back equal to the kept version 2 image. A real provisioned root, made into disk images by
/// bake and boot-tested, through the throttle proxy (EBS parents and encryption).
#[tokio::test(flavor = "multi_thread")]
async fn bake_build_of_version_two_uploads_only_what_changed_since_the_kept_image() {
    let Some(proxy) = service("BAKE_TEST_THROTTLE_ENDPOINT") else {
        return;
    };
    if !super::skip::root("provisioning a root filesystem") {
        return;
    }
    let (aws, _, account) = test_aws(&proxy).await;
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::fs::read_to_string(
        super::common::repo_root().join("tests/fixtures/recipes/disk/ami.yaml"),
    )
    .unwrap();
    // More room for the boot under TCG on a busy machine, as above.
    let fixture = fixture.replace("      timeout: 10m\n", "      timeout: 25m\n");
    let second = fixture.replace(
        "provisioners:\n",
        "provisioners:\n  - shell:\n      name: release note\n      inline: echo 'release 2' >/etc/bake-release\n",
    );
    assert!(
        second != fixture && fixture.contains("timeout: 25m"),
        "the fixture changed"
    );
    // A store of its own: records of the other tests' versions (other accounts) stay out.
    let store = dir.path().join("store");
    let build = |name: &str, text: &str| {
        let recipe = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&recipe, text).unwrap();
        let output = bake()
            .args([
                "build",
                recipe.to_str().unwrap(),
                "--output",
                "json",
                "--no-attest",
            ])
            .env("BAKE_STORE", &store)
            .env("BAKE_AWS_ENDPOINT_URL", &proxy)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_POLL_INTERVAL", "50ms")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "bake build failed:\n{stderr}");
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let first = build("v1", &fixture);
    let kept = |digest: &str| {
        Store::open(&store)
            .unwrap()
            .disk_image("disk-test", digest)
            .unwrap()
            .unwrap_or_else(|| panic!("the store did not keep the disk image {digest}"))
    };
    let old = image_blocks(&kept(first["disk_image_digest"].as_str().unwrap()));
    let put_before = ThrottleProxy { url: &proxy }
        .passed(&account, "PutSnapshotBlock")
        .await;

    let second = build("v2", &second);
    let upload = &second["upload"];
    assert_eq!(
        upload["parent_snapshot_id"], first["upload"]["snapshot_id"],
        "{second}"
    );
    assert_eq!(upload["parent_version"], first["version"], "{second}");
    assert_eq!(upload["compared_with"], "disk_image", "{second}");
    let new_image = kept(second["disk_image_digest"].as_str().unwrap());
    let new = image_blocks(&new_image);
    // Only the latest image of the recipe stays.
    assert!(
        Store::open(&store)
            .unwrap()
            .disk_image("disk-test", first["disk_image_digest"].as_str().unwrap())
            .unwrap()
            .is_none()
    );
    let differing = old.iter().zip(&new).filter(|(a, b)| a != b).count() as u64;
    let non_zero = new.iter().filter(|b| b.is_some()).count() as u64;
    eprintln!("{differing} of {non_zero} non-zero blocks differ between the two built images");
    assert_eq!(upload["changed_blocks"], differing, "{second}");
    assert_eq!(
        ThrottleProxy { url: &proxy }
            .passed(&account, "PutSnapshotBlock")
            .await
            - put_before,
        differing
    );
    assert!(differing < non_zero, "{differing} of {non_zero}");
    let read = read_snapshot(
        &aws.ebs("us-east-1"),
        upload["snapshot_id"].as_str().unwrap(),
    )
    .await;
    assert_reads_back(&read, &new, "version 2's snapshot");
}

/// An endpoint override does not make bake lenient: moto does not implement
/// `EnableImageDeprecation` (MOTO.md: 500), and without `BAKE_AWS_EMULATOR` that failure fails
/// the region, as it would on AWS (the run then removes what it made). Naming moto as the
/// emulator turns the same failure into a warning. moto keeps no deprecation time either way,
/// so the requests bake sent are what is asserted.
#[tokio::test]
async fn a_failing_deprecation_fails_the_region_unless_the_emulator_is_named() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    for named in [false, true] {
        let (aws, capture, _) = if named {
            test_aws(&endpoint).await
        } else {
            test_aws_as_if_aws(&endpoint).await
        };
        kms_keys(&aws, &["us-east-1"]).await;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let image = dir.path().join("disk.raw");
        synthetic_image(&image);
        let mut spec = spec(
            if named { "amidepok" } else { "amidepfail" },
            &["us-east-1"],
        );
        spec.deprecate_after = Some(Duration::from_secs(30 * 24 * 3600));
        capture.clear();
        let outcome = publish_snapshot_ami(
            &aws,
            &store,
            &spec,
            Some(&image),
            None,
            &fast_options(),
            std::future::pending(),
        )
        .await;
        let sent = capture.of("EnableImageDeprecation");
        assert_eq!(sent.len(), 1, "named={named}: {sent:?}");
        let at: u64 = humantime::parse_rfc3339_weak(&sent[0].params["DeprecateAt"])
            .map(|t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())
            .unwrap_or_else(|e| panic!("{:?}: {e}", sent[0].params));
        assert_eq!(at % 60, 0, "whole minutes");
        if named {
            let record = outcome.expect("with moto named, the missing API is a warning");
            assert_eq!(record.regions.len(), 1);
        } else {
            let failed = outcome.expect_err("without an emulator named, the region fails");
            assert!(
                matches!(failed.error, PublishError::Distribution(_)),
                "{:?}",
                failed.error
            );
            let message = failed.error.to_string();
            assert!(
                message.contains("set the deprecation time of") && message.contains("us-east-1"),
                "{message}"
            );
            // Rolled back like any other failure: the AMI is not left without its deprecation.
            assert!(
                !capture.of("DeregisterImage").is_empty(),
                "the run removes its AMI"
            );
        }
    }
}

/// A proxy that holds every `RegisterImage` forever: the request never reaches moto and never
/// gets an answer, so a run can be killed with its AMI journaled as `creating` and no id (as a
/// SIGKILL while the request is in flight leaves it). Returns the proxy's URL and a flag
/// raised once a `RegisterImage` is being held.
fn stalling_proxy(upstream: &str) -> (String, Arc<std::sync::atomic::AtomicBool>) {
    let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = held.clone();
    let address = proxy(
        upstream,
        Arc::new(move |body: &[u8]| {
            if body.starts_with(b"Action=RegisterImage&") {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
                Verdict::Hold
            } else {
                Verdict::Forward
            }
        }),
        Arc::new(|_: &[u8], response| response),
    );
    (address, held)
}

/// A proxy under which every snapshot is still `pending` (an upload in progress): moto shows
/// snapshots `completed` at once (MOTO.md), so an unfinished one cannot be made there.
fn pending_snapshots_proxy(upstream: &str) -> String {
    proxy(
        upstream,
        Arc::new(|_: &[u8]| Verdict::Forward),
        Arc::new(|request: &[u8], response: Vec<u8>| {
            if !request.starts_with(b"Action=DescribeSnapshots&") {
                return response;
            }
            let text = String::from_utf8(response).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let body = body.replace("<status>completed</status>", "<status>pending</status>");
            let head: Vec<String> = head
                .split("\r\n")
                .map(|line| match line.split_once(':') {
                    Some((k, _)) if k.eq_ignore_ascii_case("content-length") => {
                        format!("{k}: {}", body.len())
                    }
                    _ => line.to_owned(),
                })
                .collect();
            format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
        }),
    )
}

/// Two runs of one version: the first is killed (SIGKILL) with its `RegisterImage` in flight,
/// the second finishes and registers the version's AMI under the same name. `bake cleanup`
/// then removes what the dead run's journal names (its snapshot) and never the finished run's
/// AMI, although it has the dead run's journaled name and was created after it started.
#[tokio::test]
async fn cleanup_of_a_killed_run_leaves_another_runs_finished_ami_of_the_version() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let (aws, _, account) = test_aws(&endpoint).await;
    let ec2 = aws.ec2("us-east-1");
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let recipe = dir.path().join("twin.yaml");
    std::fs::write(
        &recipe,
        "bake: 1\nname: twin\nbase: scratch\noutputs:\n  ami:\n    strategy: snapshot\n    regions: [us-east-1]\n    disk_size_gib: 1\n",
    )
    .unwrap();
    let disk = dir.path().join("disk.raw");
    synthetic_image(&disk);
    let (proxy, held) = stalling_proxy(&endpoint);
    let run_bake = |endpoint: &str, args: &[&str]| {
        let mut command = bake();
        command
            .args(args)
            .env("BAKE_STORE", &store_dir)
            .env("BAKE_AWS_ENDPOINT_URL", endpoint)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_REGION", "us-east-1")
            .env("BAKE_AWS_POLL_INTERVAL", "50ms")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL");
        command
    };
    let publish_args = [
        "ami",
        "publish",
        recipe.to_str().unwrap(),
        "--disk-image",
        disk.to_str().unwrap(),
        "--output",
        "json",
    ];

    // The first run, through the proxy: killed while its RegisterImage is held.
    let mut killed = run_bake(&proxy, &publish_args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !held.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the first run never registered");
        assert!(
            killed.try_wait().unwrap().is_none(),
            "the first run ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    killed.kill().unwrap(); // SIGKILL
    killed.wait().unwrap();
    let journal_dir = store_dir.join("journal");
    let journals: Vec<serde_json::Value> = std::fs::read_dir(&journal_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect();
    assert_eq!(journals.len(), 1, "{journals:?}");
    let dead_run = journals[0]["run"].as_str().unwrap().to_owned();
    let resources = journals[0]["resources"].as_array().unwrap();
    let dead_snapshot = resources[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(resources[1]["kind"], "image", "{resources:?}");
    assert_eq!(resources[1]["status"], "creating", "{resources:?}");
    let ami_name = resources[1]["token"].as_str().unwrap().to_owned();

    // The second run of the same version, straight to moto: it finishes.
    let finished = run_bake(&endpoint, &publish_args).output().unwrap();
    assert!(
        finished.status.success(),
        "{}",
        String::from_utf8_lossy(&finished.stderr)
    );
    let finished: serde_json::Value = serde_json::from_slice(&finished.stdout).unwrap();
    let kept_image = finished["regions"][0]["image_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let kept_snapshot = finished["regions"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let described = ec2
        .describe_images()
        .image_ids(&kept_image)
        .send()
        .await
        .unwrap();
    assert_eq!(described.images()[0].name(), Some(ami_name.as_str()));
    assert!(
        described.images()[0]
            .tags()
            .iter()
            .any(|t| t.key() == Some("bake:run") && t.value() != Some(dead_run.as_str())),
        "the finished AMI carries its own run's tag"
    );

    let cleaned = run_bake(&endpoint, &["cleanup"]).output().unwrap();
    let out = String::from_utf8_lossy(&cleaned.stdout);
    assert!(
        cleaned.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&cleaned.stderr)
    );
    assert!(
        out.contains(&format!("removed  snapshot {dead_snapshot}")),
        "{out}"
    );
    assert!(!out.contains(&kept_image), "{out}");
    let gone = ec2
        .describe_snapshots()
        .snapshot_ids(&dead_snapshot)
        .send()
        .await;
    assert!(gone.is_err() || gone.unwrap().snapshots().is_empty());
    // The finished run's AMI and its snapshot are still there.
    let image = bake::ami::lookup::image(&ec2, &kept_image).await.unwrap();
    assert!(
        image.is_some_and(|i| i.state == "available"),
        "cleanup removed another run's finished AMI"
    );
    let still = ec2
        .describe_snapshots()
        .snapshot_ids(&kept_snapshot)
        .send()
        .await
        .unwrap();
    assert_eq!(still.snapshots().len(), 1);
    assert!(
        std::fs::read_dir(&journal_dir).unwrap().next().is_none(),
        "the dead run's journal is gone once everything in it is"
    );
}

/// The journal of a run killed between journaling an AMI and learning its id: `bake cleanup`
/// finds that AMI by the journaled name and the run's own `bake:run` tag, and leaves another
/// AMI of the same name (another run's, finished) alone. moto drops RegisterImage's tags, so
/// the tags AWS would have stored at registration are set here with CreateTags.
#[tokio::test]
async fn cleanup_finds_a_dead_runs_unjournaled_ami_by_its_run_tag_only() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let (aws, capture, _) = test_aws(&endpoint).await;
    let ec2 = aws.ec2("us-east-1");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let spec = spec("amitwins", &["us-east-1"]);
    let name = spec.regions[0].name.clone();
    let journal = bake::ami::journal::Journal::begin(&store, &spec.recipe, &spec.version).unwrap();
    journal
        .creating(bake::ami::journal::ResourceKind::Image, "us-east-1", &name)
        .unwrap();
    let dead_run = journal.run_id();
    drop(journal); // the process died: the lock goes, the journal stays

    let register = |run: String| {
        let ec2 = ec2.clone();
        let name = name.clone();
        async move {
            let id = ec2
                .register_image()
                .name(&name)
                .root_device_name("/dev/xvda")
                .send()
                .await
                .unwrap()
                .image_id()
                .unwrap()
                .to_owned();
            ec2.create_tags()
                .resources(&id)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("bake:run")
                        .value(run)
                        .build(),
                )
                .send()
                .await
                .unwrap();
            id
        }
    };
    let dead_image = register(dead_run.clone()).await;
    let other_image = register("run-someone-else-0000".to_owned()).await;
    capture.clear();

    let report = bake::ami::cleanup::cleanup(
        &aws,
        Some(&store),
        &bake::ami::cleanup::CleanupOptions::default(),
    )
    .await
    .unwrap();
    assert!(!report.failed(), "{:?}", report.removals);
    let deregistered: Vec<String> = capture
        .of("DeregisterImage")
        .into_iter()
        .map(|c| c.params["ImageId"].clone())
        .collect();
    assert_eq!(deregistered, std::slice::from_ref(&dead_image));
    assert!(
        bake::ami::lookup::image(&ec2, &dead_image)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        bake::ami::lookup::image(&ec2, &other_image)
            .await
            .unwrap()
            .is_some(),
        "another run's AMI of the same name was removed"
    );
    assert!(bake::ami::journal::list(&store).is_empty());
}

/// A `PutSnapshotBlock` that never answers (the throttle proxy holds it) is abandoned after the
/// uploader's per-request timeout and sent again; the upload completes and the snapshot holds
/// every block. (A stalled block used to hang the build, as it does coldsnap.)
#[tokio::test]
async fn a_stalled_block_upload_is_retried_after_its_timeout_and_the_upload_completes() {
    let Some(proxy) = service("BAKE_TEST_THROTTLE_ENDPOINT") else {
        return;
    };
    let (aws, _, account) = test_aws(&proxy).await;
    let standin = ThrottleProxy { url: &proxy };
    standin.stall(&account, "PutSnapshotBlock", 1).await;

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let blocks = synthetic_image(&disk);
    let mut uploader = bake::ami::upload::SnapshotUploader::new(
        aws.ebs("us-east-1"),
        aws.ec2("us-east-1"),
        "us-east-1",
    );
    uploader.block_timeout = Duration::from_secs(2);
    uploader.wait = WaitPolicy::fast();
    let started = Instant::now();
    let snapshot_id = uploader
        .start(&bake::ami::upload::SnapshotRequest {
            volume_size_gib: 1,
            description: "stalled block test".into(),
            tags: BTreeMap::new(),
            encrypted: false,
            kms_key_arn: None,
            client_token: format!("stall-{account}"),
            parent_snapshot_id: None,
        })
        .await
        .unwrap();
    let written = tokio::time::timeout(
        Duration::from_secs(60),
        uploader.put_blocks(&snapshot_id, &disk, 1),
    )
    .await
    .expect("the upload hung on the stalled block")
    .unwrap();
    uploader.complete(&snapshot_id, &written).await.unwrap();
    uploader.wait_completed(&snapshot_id).await.unwrap();
    assert_eq!(written.changed_blocks, blocks.len() as u64);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the stalled request was not waited on for its timeout"
    );

    let stats = standin.stats(&account).await;
    let puts = &stats["actions"]["PutSnapshotBlock"];
    assert_eq!(puts["stalled"], 1, "{stats}");
    // Every block reached EBS once, the stalled one on its second attempt.
    assert_eq!(puts["passed"], blocks.len() as u64, "{stats}");
    let listed = aws
        .ebs("us-east-1")
        .list_snapshot_blocks()
        .snapshot_id(&snapshot_id)
        .send()
        .await
        .unwrap();
    let mut indexes: Vec<i32> = listed
        .blocks()
        .iter()
        .filter_map(|b| b.block_index())
        .collect();
    indexes.sort_unstable();
    assert_eq!(indexes, blocks.keys().copied().collect::<Vec<_>>());
    // The held request is left held (`/_standin/release` would release every test's stalls);
    // it ends with the proxy.
}

const TWENTY_REGIONS: [&str; 20] = [
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "ca-central-1",
    "sa-east-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-north-1",
    "eu-south-1",
    "ap-south-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "af-south-1",
];

/// An account of its own behind the throttle proxy, with bake's own retry configuration (not the
/// tests' usual none) and `limits` set for it.
async fn throttled_aws(proxy: &str, limits: &serde_json::Value) -> (Aws, String) {
    let account = fresh_account();
    let config = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(proxy)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .retry_config(bake::aws::retry_config())
        .load()
        .await;
    let aws = Aws::from_config(config, Some(account.clone())).with_emulator(Emulator::Moto);
    ThrottleProxy { url: proxy }
        .set_limits(&account, limits)
        .await;
    (aws, account)
}

/// Publishes a synthetic image as recipe `name`'s AMI in all twenty regions (unencrypted,
/// private), with fast waits and copy-quota backoff; returns its AMI per region.
async fn publish_to_twenty(aws: &Aws, name: &str) -> Vec<bake::ami::RegionImage> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let image = dir.path().join("disk.raw");
    synthetic_image(&image);
    let mut spec = spec(name, &TWENTY_REGIONS);
    spec.encrypted = false;
    spec.sharing = Sharing {
        accounts: vec![],
        organizations: vec![],
        organizational_units: vec![],
        public: false,
    };
    for region in &mut spec.regions {
        region.kms_key_id = None;
    }
    let options = PublishOptions {
        upload_concurrency: 8,
        snapshot_wait: WaitPolicy::fast(),
        distribute: DistributeOptions {
            concurrency: TWENTY_REGIONS.len(),
            wait: WaitPolicy {
                interval: Duration::from_millis(250),
                max_attempts: 400,
                consecutive_successes: 1,
            },
            copy_quota: QuotaPolicy {
                first_delay: Duration::from_millis(250),
                max_delay: Duration::from_secs(2),
                give_up_after: Duration::from_secs(120),
            },
        },
        keep_on_failure: false,
    };
    let record = publish_snapshot_ami(
        aws,
        &store,
        &spec,
        Some(&image),
        None,
        &options,
        std::future::pending(),
    )
    .await
    .expect("every region gets its AMI");
    record.regions
}

/// Whether `images` are one per region of the twenty.
fn in_all_twenty(images: &[bake::ami::RegionImage]) -> bool {
    let mut regions: Vec<&str> = images.iter().map(|r| r.region.as_str()).collect();
    regions.sort_unstable();
    let mut expected = TWENTY_REGIONS.to_vec();
    expected.sort_unstable();
    regions == expected
}

/// The sum of one counter (`passed`, `throttled`, `limited`, `stalled`) over every action.
fn total(stats: &serde_json::Value, counter: &str) -> u64 {
    stats["actions"]
        .as_object()
        .unwrap()
        .values()
        .map(|counts| counts[counter].as_u64().unwrap_or(0))
        .sum()
}

/// One AMI distributed to 20 regions through the throttle proxy, with EC2's request-rate
/// buckets shrunk for this account so that tags, snapshot and image polls are throttled
/// (`RequestLimitExceeded`, as EC2 answers): every region ends with its AMI, none fails, and
/// the proxy's counters show the limits were hit.
#[tokio::test]
async fn distribution_to_twenty_regions_survives_ec2_request_throttling() {
    let Some(proxy) = service("BAKE_TEST_THROTTLE_ENDPOINT") else {
        return;
    };
    // Buckets are per account, region and action: one copy per region never empties
    // CopyImage's, so the calls each region makes several of get one-token buckets.
    let limits = serde_json::json!({
        "actions": {
            "CreateTags": [1, 1],
            "DescribeImages": [1, 1],
            "DescribeSnapshots": [1, 1],
        },
        "copy_seconds": 2,
    });
    let (aws, account) = throttled_aws(&proxy, &limits).await;
    assert!(in_all_twenty(&publish_to_twenty(&aws, "amitwenty").await));

    let stats = ThrottleProxy { url: &proxy }.stats(&account).await;
    assert!(
        total(&stats, "throttled") > 0,
        "no request was throttled: {stats}"
    );
    assert_eq!(
        stats["actions"]["CopyImage"]["passed"],
        TWENTY_REGIONS.len() as u64 - 1,
        "{stats}"
    );
}

/// Distribution to 20 regions while the account's copy slots are taken (AWS allows 20 snapshot
/// copies in flight per destination region; here one, held by copies another process started,
/// and the proxy answers `ResourceLimitExceeded` past it, as EC2 does): every copy that met the
/// limit waited for a slot and was asked again, and the AMI reaches every region.
#[tokio::test]
async fn distribution_waits_for_copy_slots_another_process_holds() {
    let Some(proxy) = service("BAKE_TEST_THROTTLE_ENDPOINT") else {
        return;
    };
    let quick = serde_json::json!({ "max_copies": 1, "copy_seconds": 1 });
    let (aws, account) = throttled_aws(&proxy, &quick).await;
    let standin = ThrottleProxy { url: &proxy };
    let first = publish_to_twenty(&aws, "amiquotaa").await;
    assert!(in_all_twenty(&first));
    // "Another process": copies of the first AMI into every other region, each holding the
    // region's one slot for twelve seconds (the second AMI's own copies take as long).
    let slow = serde_json::json!({ "max_copies": 1, "copy_seconds": 12 });
    standin.set_limits(&account, &slow).await;
    let home = &first
        .iter()
        .find(|r| r.region == TWENTY_REGIONS[0])
        .unwrap()
        .image_id;
    for region in &TWENTY_REGIONS[1..] {
        aws.ec2(region)
            .copy_image()
            .source_image_id(home)
            .source_region(TWENTY_REGIONS[0])
            .name(format!("other-process-{region}"))
            .send()
            .await
            .expect("the other process's copy starts");
    }
    let second = publish_to_twenty(&aws, "amiquotab").await;
    assert!(in_all_twenty(&second));

    let stats = standin.stats(&account).await;
    let copies = &stats["actions"]["CopyImage"];
    assert!(
        copies["limited"].as_u64().unwrap_or(0) > 0,
        "no copy met the copy limit: {stats}"
    );
    // Each copy was made once in the end: the first AMI's 19, the other process's 19, the
    // second AMI's 19.
    assert_eq!(
        copies["passed"],
        3 * (TWENTY_REGIONS.len() as u64 - 1),
        "{stats}"
    );
    for region in &TWENTY_REGIONS[1..] {
        assert_eq!(stats["peak_copies"][region], 1, "{region}: {stats}");
    }
}

/// Runs of one version send the same idempotency tokens, so a run that raced another can get
/// the other's snapshot or AMI copy back from AWS and journal it by id. When the journaling run
/// dies, `bake cleanup` keeps what carries another run's `bake:run` tag, says why, and still
/// removes what is the dead run's own.
#[tokio::test]
async fn cleanup_keeps_what_a_dead_run_journaled_but_another_run_made() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let (aws, capture, _) = test_aws(&endpoint).await;
    let ec2 = aws.ec2("us-east-1");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let spec = spec("amiracers", &["us-east-1"]);
    let name = spec.regions[0].name.clone();
    let other_run = "run-the-finished-one-00".to_owned();
    let tag = |key: &str, value: &str| {
        aws_sdk_ec2::types::Tag::builder()
            .key(key)
            .value(value)
            .build()
    };
    let snapshot_of = |run: String| {
        let ec2 = ec2.clone();
        async move {
            let volume = ec2
                .create_volume()
                .availability_zone("us-east-1a")
                .size(1)
                .send()
                .await
                .unwrap();
            let snapshot = ec2
                .create_snapshot()
                .volume_id(volume.volume_id().unwrap())
                .send()
                .await
                .unwrap();
            let id = snapshot.snapshot_id().unwrap().to_owned();
            ec2.create_tags()
                .resources(&id)
                .tags(tag("bake:run", &run))
                .send()
                .await
                .unwrap();
            id
        }
    };

    let journal = bake::ami::journal::Journal::begin(&store, &spec.recipe, &spec.version).unwrap();
    let dead_run = journal.run_id();
    // Its own snapshot, and the other run's snapshot and AMI, which AWS answered it with.
    let own_snapshot = snapshot_of(dead_run.clone()).await;
    let shared_snapshot = snapshot_of(other_run.clone()).await;
    let shared_image = ec2
        .register_image()
        .name(&name)
        .root_device_name("/dev/xvda")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    ec2.create_tags()
        .resources(&shared_image)
        .tags(tag("bake:run", &other_run))
        .send()
        .await
        .unwrap();
    for (kind, token, id) in [
        (
            bake::ami::journal::ResourceKind::Snapshot,
            "own",
            &own_snapshot,
        ),
        (
            bake::ami::journal::ResourceKind::Snapshot,
            "shared",
            &shared_snapshot,
        ),
        (
            bake::ami::journal::ResourceKind::Image,
            name.as_str(),
            &shared_image,
        ),
    ] {
        let entry = journal.creating(kind, "us-east-1", token).unwrap();
        journal.created(entry, id).unwrap();
    }
    drop(journal); // the process died: the lock goes, the journal stays
    capture.clear();

    let report = bake::ami::cleanup::cleanup(
        &aws,
        Some(&store),
        &bake::ami::cleanup::CleanupOptions::default(),
    )
    .await
    .unwrap();
    assert!(!report.failed(), "{:?}", report.removals);
    assert!(
        capture.of("DeregisterImage").is_empty(),
        "{:?}",
        report.removals
    );
    let deleted: Vec<String> = capture
        .of("DeleteSnapshot")
        .into_iter()
        .map(|c| c.params["SnapshotId"].clone())
        .collect();
    assert_eq!(deleted, std::slice::from_ref(&own_snapshot));
    for kept in [&shared_snapshot, &shared_image] {
        let removal = report
            .removals
            .iter()
            .find(|r| &r.id == kept)
            .unwrap_or_else(|| panic!("{kept} is not in {:?}", report.removals));
        assert_eq!(removal.action, bake::ami::cleanup::Action::Kept);
        assert!(
            removal.reason.as_deref().unwrap().contains(&other_run),
            "{removal:?}"
        );
    }
    assert!(
        bake::ami::lookup::image(&ec2, &shared_image)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        bake::ami::lookup::snapshot(&ec2, &shared_snapshot)
            .await
            .unwrap()
            .is_some()
    );
}

/// An unfinished snapshot tagged by a run this store has no journal for may be an upload in
/// progress on another machine: `bake cleanup` leaves it, and only `--older-than` (the
/// operator saying such runs are dead) removes it.
#[tokio::test]
async fn cleanup_leaves_unfinished_snapshots_of_runs_without_a_journal_here() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let (aws, _, account) = test_aws(&endpoint).await;
    let ec2 = aws.ec2("us-east-1");
    let volume = ec2
        .create_volume()
        .availability_zone("us-east-1a")
        .size(1)
        .send()
        .await
        .unwrap()
        .volume_id()
        .unwrap()
        .to_owned();
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    let snapshot_id = ec2
        .create_snapshot()
        .volume_id(&volume)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Snapshot)
                .tags(tag("bake:version", &format!("sha256:{}", "e".repeat(64))))
                .tags(tag("bake:run", "run-on-another-machine"))
                .build(),
        )
        .send()
        .await
        .unwrap()
        .snapshot_id()
        .unwrap()
        .to_owned();
    let proxy = pending_snapshots_proxy(&endpoint);
    let dir = tempfile::tempdir().unwrap();
    let cleanup = |extra: &[&str]| {
        let output = bake()
            .args(["cleanup", "--regions", "us-east-1"])
            .args(extra)
            .env("BAKE_STORE", dir.path().join("store"))
            .env("BAKE_AWS_ENDPOINT_URL", &proxy)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_REGION", "us-east-1")
            .env("BAKE_AWS_POLL_INTERVAL", "50ms")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        out
    };
    let exists = || async {
        ec2.describe_snapshots()
            .snapshot_ids(&snapshot_id)
            .send()
            .await
            .map(|s| s.snapshots().len())
            .unwrap_or(0)
    };

    let out = cleanup(&[]);
    assert!(!out.contains(&snapshot_id), "{out}");
    assert_eq!(exists().await, 1, "another machine's upload was removed");

    let out = cleanup(&["--older-than", "0s"]);
    assert!(
        out.contains(&format!("removed  snapshot {snapshot_id}")),
        "{out}"
    );
    assert_eq!(exists().await, 0);
}

/// `bake ami publish` with moto's account for this test, through `endpoint` (the throttle
/// proxy: it models EBS parents, which moto ignores); returns the JSON output and stderr.
fn publish_through(
    endpoint: &str,
    account: &str,
    store: &Path,
    recipe: &Path,
    image: &Path,
) -> (serde_json::Value, String) {
    let output = bake()
        .args(["ami", "publish"])
        .arg(recipe)
        .arg("--disk-image")
        .arg(image)
        .args(["--output", "json"])
        .env("BAKE_STORE", store)
        .env("BAKE_AWS_ENDPOINT_URL", endpoint)
        .env("BAKE_AWS_EMULATOR_ACCOUNT", account)
        .env("BAKE_AWS_EMULATOR", "moto")
        .env("BAKE_AWS_REGION", "us-east-1")
        .env("BAKE_AWS_POLL_INTERVAL", "50ms")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "bake ami publish failed:\n{stderr}"
    );
    (serde_json::from_slice(&output.stdout).unwrap(), stderr)
}

/// Every 512 KiB block of `image` by index: its SHA-256, or `None` for a block of zeros (holes
/// included). Digests, not bytes: two 2 GiB images stay small.
fn image_blocks(image: &Path) -> Vec<Option<[u8; 32]>> {
    use sha2::Digest as _;
    let file = std::fs::File::open(image).unwrap();
    let size = file.metadata().unwrap().len();
    let mut block = vec![0u8; BLOCK_SIZE];
    (0..size.div_ceil(BLOCK_SIZE as u64))
        .map(|index| {
            let offset = index * BLOCK_SIZE as u64;
            block.fill(0);
            let wanted = (size - offset).min(BLOCK_SIZE as u64) as usize;
            file.read_exact_at(&mut block[..wanted], offset).unwrap();
            block
                .iter()
                .any(|b| *b != 0)
                .then(|| sha2::Sha256::digest(&block).into())
        })
        .collect()
}

/// A snapshot as EBS reads it back: every listed block's data by index (through the proxy, so
/// a child reads its parent's blocks where it wrote none, as on AWS).
async fn read_snapshot(ebs: &aws_sdk_ebs::Client, snapshot_id: &str) -> BTreeMap<i32, Vec<u8>> {
    let mut pages = ebs
        .list_snapshot_blocks()
        .snapshot_id(snapshot_id)
        .into_paginator()
        .send();
    let mut blocks = BTreeMap::new();
    while let Some(page) = pages.next().await {
        for block in page.unwrap().blocks() {
            let index = block.block_index().unwrap();
            let read = ebs
                .get_snapshot_block()
                .snapshot_id(snapshot_id)
                .block_index(index)
                .block_token(block.block_token().unwrap())
                .send()
                .await
                .unwrap();
            let data = read
                .block_data
                .collect()
                .await
                .unwrap()
                .into_bytes()
                .to_vec();
            blocks.insert(index, data);
        }
    }
    blocks
}

/// Asserts that `snapshot` reads back as `image` (its [`image_blocks`]): each listed block
/// equals the image's, and each block it does not list is all zeros in the image.
fn assert_reads_back(snapshot: &BTreeMap<i32, Vec<u8>>, image: &[Option<[u8; 32]>], what: &str) {
    use sha2::Digest as _;
    for (index, block) in image.iter().enumerate() {
        match (snapshot.get(&(index as i32)), block) {
            (Some(read), Some(digest)) => assert!(
                sha2::Sha256::digest(read).as_slice() == digest,
                "{what}: block {index} reads back otherwise"
            ),
            (Some(read), None) => assert!(
                read.iter().all(|b| *b == 0),
                "{what}: block {index} reads back data where the image has zeros"
            ),
            (None, Some(_)) => panic!("{what}: block {index} of the image is missing"),
            (None, None) => {}
        }
    }
    assert!(
        snapshot.keys().all(|i| (*i as usize) < image.len()),
        "{what}: the snapshot has blocks past the image"
    );
}

/// Writes `size` bytes of deterministic noise (no zero block) to `path`.
fn noise(path: &Path, size: usize, seed: u64) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(size);
    while bytes.len() < size {
        // xorshift64*: cheap, and incompressible enough that nothing is a zero block.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    bytes.truncate(size);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Version 2 of the example AMI recipe (the disk fixture) adds one small file. Its disk image
/// is made by bake's own disk builder (GPT, ESP, ext4) from a root that stands in for the
/// provisioned one (a dummy kernel, initrd and boot loader, and some tens of MiB of files; no
/// bootstrap, no boot: this test is about the upload). `bake ami publish` of version 2 starts
/// its snapshot from version 1's (found through the store's build record), compares with
/// version 1's block checksums (`ami publish` keeps no disk image) and writes exactly the blocks
/// that differ between the two images, a small part of the image; the snapshot the AMI was
/// registered from reads back equal to version 2's image. moto ignores the snapshot named in
/// RegisterImage (MOTO.md), so the snapshot read is the one bake reports for the AMI. The
/// recipe encrypts with the account's default EBS key (it names none): the proxy models EBS
/// direct encryption and `GetEbsDefaultKmsKeyId`, which moto lacks, so the parent's key is
/// checked against that default.
#[tokio::test]
async fn version_two_uploads_only_its_changed_blocks_onto_version_ones_snapshot() {
    let Some(proxy) = service("BAKE_TEST_THROTTLE_ENDPOINT") else {
        return;
    };
    if !super::skip::tool("mkfs.ext4") || !super::skip::tool("mcopy") {
        return;
    }
    let (aws, _, account) = test_aws(&proxy).await;
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::fs::read_to_string(
        super::common::repo_root().join("tests/fixtures/recipes/disk/ami.yaml"),
    )
    .unwrap();
    let second = fixture.replace(
        "provisioners:\n",
        "provisioners:\n  - shell:\n      name: release note\n      inline: echo 'release 2' >/var/lib/bake-release\n",
    );
    assert_ne!(second, fixture, "the fixture changed: update this test");
    let images = [("v1", fixture), ("v2", second)].map(|(name, text)| {
        let recipe_path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&recipe_path, &text).unwrap();
        let recipe = bake::recipe::load(&recipe_path, &Default::default()).unwrap();
        let plan = bake::plan::plan(&recipe, "ami.yaml", &Default::default()).unwrap();
        let root = dir.path().join(format!("{name}-root"));
        noise(&root.join("boot/vmlinuz-6.1.0-test-amd64"), 6 << 20, 1);
        noise(&root.join("boot/initrd.img-6.1.0-test-amd64"), 12 << 20, 2);
        noise(
            &root.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
            100 << 10,
            3,
        );
        for n in 0..48u64 {
            noise(
                &root.join(format!("usr/lib/x86_64-linux-gnu/libstandin-{n}.so")),
                (1 << 20) + (n as usize) * 4096,
                10 + n,
            );
        }
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "standin\n").unwrap();
        if name == "v2" {
            // The one small file version 2's step adds.
            std::fs::create_dir_all(root.join("var/lib")).unwrap();
            std::fs::write(root.join("var/lib/bake-release"), "release 2\n").unwrap();
        }
        let ami = recipe.outputs.ami.as_ref().unwrap();
        let spec =
            bake::ami::disk::DiskSpec::for_recipe(ami, &plan.version, plan.source_date_epoch());
        let image = dir.path().join(format!("{name}.raw"));
        bake::ami::disk::build_disk_image(&root, &spec, &image)
            .unwrap_or_else(|e| panic!("disk image of {name}: {e} ({e:?})"));
        (recipe_path, image, plan.version.to_string())
    });
    let store = dir.path().join("store");

    let (first, _) = publish_through(&proxy, &account, &store, &images[0].0, &images[0].1);
    let first_snapshot = first["upload"]["snapshot_id"].as_str().unwrap().to_owned();
    assert!(
        first["upload"].get("parent_snapshot_id").is_none(),
        "{first}"
    );
    assert!(
        first["upload"]["full_upload_reason"]
            .as_str()
            .unwrap()
            .contains("no earlier version"),
        "{first}"
    );
    let put_before = ThrottleProxy { url: &proxy }
        .passed(&account, "PutSnapshotBlock")
        .await;

    let (second, stderr) = publish_through(&proxy, &account, &store, &images[1].0, &images[1].1);
    let upload = &second["upload"];
    assert_eq!(
        upload["parent_snapshot_id"],
        first_snapshot.as_str(),
        "{second}"
    );
    assert_eq!(upload["parent_version"], images[0].2.as_str(), "{second}");
    assert_eq!(upload["compared_with"], "parent_checksums", "{second}");
    assert!(upload.get("full_upload_reason").is_none(), "{second}");
    assert!(!stderr.contains("uploading in full"), "{stderr}");

    let old = image_blocks(&images[0].1);
    let new = image_blocks(&images[1].1);
    assert_eq!(old.len(), new.len());
    let differing = old.iter().zip(&new).filter(|(a, b)| a != b).count() as u64;
    let non_zero = new.iter().filter(|b| b.is_some()).count() as u64;
    let changed = upload["changed_blocks"].as_u64().unwrap();
    // Shown with --nocapture: how small a part of the image the change is.
    eprintln!("{differing} of {non_zero} non-zero blocks differ between the two images");
    assert_eq!(changed, differing, "{second}");
    // What reached EBS is exactly those blocks.
    assert_eq!(
        ThrottleProxy { url: &proxy }
            .passed(&account, "PutSnapshotBlock")
            .await
            - put_before,
        differing
    );
    assert!(
        differing * 5 <= non_zero,
        "{differing} of {non_zero} non-zero blocks differ: not a small part"
    );
    assert!(differing > 0);

    // The AMI's snapshot reads back as version 2's image.
    let snapshot_id = second["regions"][0]["snapshot_id"].as_str().unwrap();
    assert_eq!(snapshot_id, upload["snapshot_id"].as_str().unwrap());
    let ebs = aws.ebs("us-east-1");
    let read = read_snapshot(&ebs, snapshot_id).await;
    assert_reads_back(&read, &new, "version 2's snapshot");
    // And the parent is untouched.
    assert_reads_back(
        &read_snapshot(&ebs, &first_snapshot).await,
        &old,
        "version 1's snapshot",
    );
    let image_id = second["regions"][0]["image_id"].as_str().unwrap();
    let described = aws
        .ec2("us-east-1")
        .describe_images()
        .image_ids(image_id)
        .send()
        .await
        .unwrap();
    assert_eq!(described.images().len(), 1);
}

/// Blocks that hold data in the parent and are zeros in the new image are written as zeros
/// (else the child would read the parent's stale data); a parent found without a build record
/// (another store) is found by bake's tags; and a parent of another volume size is not used:
/// the upload is a full one, and the output and the log say why.
#[tokio::test]
async fn zeroed_blocks_are_written_a_tagged_parent_is_found_and_an_unusable_one_says_why() {
    let Some(proxy) = service("BAKE_TEST_THROTTLE_ENDPOINT") else {
        return;
    };
    let (aws, _, account) = test_aws(&proxy).await;
    let dir = tempfile::tempdir().unwrap();
    let recipe = |name: &str, size: u32, description: &str| {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "bake: 1\nname: zeros\nbase: scratch\noutputs:\n  ami:\n    strategy: snapshot\n    regions: [us-east-1]\n    disk_size_gib: {size}\n    encryption:\n      encrypted: false\n    tags:\n      release: {description}\n"
            ),
        )
        .unwrap();
        path
    };
    let first_image = dir.path().join("v1.raw");
    synthetic_image(&first_image);
    let second_image = dir.path().join("v2.raw");
    std::fs::copy(&first_image, &second_image).unwrap();
    {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&second_image)
            .unwrap();
        let zeros = vec![0u8; BLOCK_SIZE];
        // Blocks 700 and 2047 become zeros; block 3 changes; block 5 is new; block 0 stays.
        file.write_all_at(&zeros, 700 * BLOCK_SIZE as u64).unwrap();
        file.write_all_at(&zeros, 2047 * BLOCK_SIZE as u64).unwrap();
        file.write_all_at(&[5u8; 100], 3 * BLOCK_SIZE as u64)
            .unwrap();
        file.write_all_at(&[6u8; 100], 5 * BLOCK_SIZE as u64)
            .unwrap();
    }

    let (first, _) = publish_through(
        &proxy,
        &account,
        &dir.path().join("store-1"),
        &recipe("v1", 1, "first"),
        &first_image,
    );
    // Another store: no build record of version 1, so its snapshot is found by its tags.
    let store = dir.path().join("store-2");
    let (second, _) = publish_through(
        &proxy,
        &account,
        &store,
        &recipe("v2", 1, "second"),
        &second_image,
    );
    assert_ne!(
        first["upload"]["snapshot_id"],
        second["upload"]["snapshot_id"]
    );
    assert_eq!(
        second["upload"]["parent_snapshot_id"], first["upload"]["snapshot_id"],
        "{second}"
    );
    assert_eq!(second["upload"]["changed_blocks"], 4, "{second}");
    assert_eq!(second["upload"]["zero_blocks"], 2, "{second}");
    let ebs = aws.ebs("us-east-1");
    let read = read_snapshot(&ebs, second["upload"]["snapshot_id"].as_str().unwrap()).await;
    for index in [700, 2047] {
        assert!(
            read[&index].iter().all(|b| *b == 0),
            "block {index} still shows the parent's data"
        );
    }
    assert_reads_back(&read, &image_blocks(&second_image), "version 2's snapshot");

    // The same change compared with version 1's disk image, which the first store now keeps
    // (as `bake build` keeps the image it uploaded): the same blocks are written.
    let kept = dir.path().join("v1-again.raw");
    synthetic_image(&kept);
    Store::open(&dir.path().join("store-1"))
        .unwrap()
        .keep_disk_image("zeros", first["disk_image_digest"].as_str().unwrap(), &kept)
        .unwrap();
    let (again, _) = publish_through(
        &proxy,
        &account,
        &dir.path().join("store-1"),
        &recipe("v2b", 1, "second, again"),
        &second_image,
    );
    let upload = &again["upload"];
    assert_eq!(
        upload["parent_snapshot_id"], first["upload"]["snapshot_id"],
        "{again}"
    );
    assert_eq!(upload["compared_with"], "disk_image", "{again}");
    assert_eq!(upload["changed_blocks"], 4, "{again}");
    assert_eq!(upload["zero_blocks"], 2, "{again}");
    let read = read_snapshot(&ebs, upload["snapshot_id"].as_str().unwrap()).await;
    assert_reads_back(&read, &image_blocks(&second_image), "version 2b's snapshot");

    // Version 3 has a 2 GiB volume: version 2's 1 GiB snapshot cannot be its parent.
    let (third, stderr) = publish_through(
        &proxy,
        &account,
        &store,
        &recipe("v3", 2, "third"),
        &second_image,
    );
    let upload = &third["upload"];
    assert!(upload.get("parent_snapshot_id").is_none(), "{third}");
    let reason = upload["full_upload_reason"].as_str().unwrap();
    assert!(
        reason.contains("is 1 GiB") && reason.contains("2 GiB"),
        "{reason}"
    );
    assert!(
        stderr.contains("uploading in full") && stderr.contains(reason),
        "{stderr}"
    );
    let non_zero = image_blocks(&second_image)
        .iter()
        .filter(|b| b.is_some())
        .count();
    assert_eq!(upload["changed_blocks"], non_zero as u64, "{third}");
    // The build record keeps the same account of the upload.
    let records =
        bake::store::record::disk_amis_of(&Store::open(&store).unwrap(), "zeros", "").unwrap();
    let newest = records[0].disk_ami().unwrap().upload.as_ref().unwrap();
    assert_eq!(newest.full_upload_reason.as_deref(), Some(reason));
    assert_eq!(
        newest.snapshot_id,
        upload["snapshot_id"].as_str().unwrap(),
        "{records:?}"
    );

    // Version 3's snapshot is deleted: version 4 (also 2 GiB) cannot start from it.
    aws.ec2("us-east-1")
        .delete_snapshot()
        .snapshot_id(upload["snapshot_id"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let (fourth, stderr) = publish_through(
        &proxy,
        &account,
        &store,
        &recipe("v4", 2, "fourth"),
        &second_image,
    );
    let reason = fourth["upload"]["full_upload_reason"].as_str().unwrap();
    assert!(reason.contains("is gone"), "{fourth}");
    assert!(stderr.contains(reason), "{stderr}");
}
