//! `bake gc` through the binary against moto: the reference scan in two regions, the dry run,
//! a second run, a run killed mid-way, and AMIs that are not gc's to touch; the same for ECR
//! images (moto's ECR API, with ECS services and task definitions naming digests).
//!
//! bake talks to moto through the throttle proxy of `scripts/services`
//! (`BAKE_TEST_THROTTLE_ENDPOINT`), which counts every request per account and action: that is
//! how "makes no mutating call" is asserted on what the binary really sent, and its `stall`
//! control holds one DeleteSnapshot so a run can be killed between deregistering an AMI and
//! deleting its snapshot (or one BatchDeleteImage). Setup and inspection talk to moto directly
//! (uncounted). moto has no EnableImageDeprecation; bake is told it talks to moto
//! (`BAKE_AWS_EMULATOR=moto`).
//!
//! gc only speaks ECR's API (DescribeImages, BatchDeleteImage), never the registry's `/v2/`, so
//! the images are put into moto's ECR with PutImage from manifests whose digests the store's
//! build records name, as `bake push` would have left them; no data plane is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use aws_sdk_autoscaling::types::{
    LaunchTemplate, LaunchTemplateOverrides, LaunchTemplateSpecification, MixedInstancesPolicy,
};
use aws_sdk_ec2::types::{RequestLaunchTemplateData, Tag};
use bake::aws::Aws;
use bake::publish::clients;
use serde_json::{Value, json};

use super::common::{bake, fresh_account, service};
use super::registry::harness;
use super::standin::ThrottleProxy;

const RECIPE: &str = "gcweb";
const HOME: &str = "us-east-1";
const OTHER: &str = "eu-west-1";

/// Region → (AMI id, snapshot id) of one version.
type Amis = BTreeMap<String, (String, String)>;

struct Env {
    proxy: String,
    account: String,
    /// Clients straight to moto, for setup and inspection (not counted by the proxy).
    aws: Aws,
    /// Holds the store and the recipe.
    _dir: tempfile::TempDir,
    store: PathBuf,
    recipe: PathBuf,
}

/// A test version: `sha256:` and 64 hex digits from `n`.
fn version(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

fn short(n: u8) -> String {
    format!("{n:02x}").repeat(6)
}

impl Env {
    async fn new(recipe_text: &str) -> Option<Env> {
        let moto = service("BAKE_TEST_MOTO_ENDPOINT")?;
        let proxy = service("BAKE_TEST_THROTTLE_ENDPOINT")?;
        let account = fresh_account();
        let config = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&moto)
            .region(Region::new(HOME))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .retry_config(RetryConfig::disabled())
            .load()
            .await;
        let aws = Aws::from_config(config, Some(account.clone()));
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        bake::store::Store::open(&store).unwrap();
        let recipe = dir.path().join("gcweb.yaml");
        fs_err::write(&recipe, recipe_text).unwrap();
        Some(Env {
            proxy,
            account,
            aws,
            _dir: dir,
            store,
            recipe,
        })
    }

    /// Runs `bake ARGS` through the counting proxy, in this test's account and store.
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = bake();
        command
            .args(args)
            .arg("--store")
            .arg(&self.store)
            .env("BAKE_AWS_ENDPOINT_URL", &self.proxy)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &self.account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", HOME)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE");
        command
    }

    fn bake(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run bake")
    }

    /// `bake gc RECIPE ARGS --output json`, which must succeed; its report.
    fn gc(&self, args: &[&str]) -> Value {
        let mut all = vec!["gc", self.recipe.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--output", "json"]);
        let out = self.bake(&all);
        assert!(
            out.status.success(),
            "bake gc failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).expect("gc prints JSON")
    }

    /// Every request the proxy counted for this account, by action.
    async fn counted(&self) -> BTreeMap<String, u64> {
        let stats = ThrottleProxy { url: &self.proxy }
            .stats(&self.account)
            .await;
        stats["actions"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(action, counts)| {
                let n = ["passed", "throttled", "limited", "stalled"]
                    .iter()
                    .map(|k| counts[k].as_u64().unwrap_or(0))
                    .sum();
                (action.clone(), n)
            })
            .collect()
    }

    /// The store's build record of version `n`, with its AMIs, made on day `n`.
    fn record(&self, name: &str, n: u8, amis: &[(&str, &str, &str)]) {
        let regions: Vec<Value> = amis
            .iter()
            .map(|(region, image, snapshot)| {
                json!({"region": region, "image_id": image, "snapshot_id": snapshot})
            })
            .collect();
        self.put_record(
            name,
            n,
            json!({"kind": "disk_ami", "ami": {"disk_image_digest": null, "regions": regions}}),
        );
    }

    /// The store's build record of version `n`, an OCI image whose manifest has `digest`,
    /// made on day `n`.
    fn record_image(&self, name: &str, n: u8, digest: &str) {
        // The manifest's own config when the store holds it (an image `bake push` can push).
        let store = bake::store::Store::open(&self.store).unwrap();
        let config = store
            .read_blob(digest)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .and_then(|m| m["config"]["digest"].as_str().map(str::to_owned))
            .unwrap_or_else(|| version(n));
        self.put_record(
            name,
            n,
            json!({"kind": "oci_image", "image": {
                "image_digest": digest,
                "config_digest": config,
                "manifest_size": 2,
                "layers": [],
                "steps": [],
                "compressor": "gzip"
            }}),
        );
    }

    /// The store's build record of version `n` with `artifact`, made on day `n`.
    fn put_record(&self, name: &str, n: u8, artifact: Value) {
        let record = json!({
            "format": "bake.build-record/v2",
            "name": name,
            "version": version(n),
            "recipe": format!("{name}.yaml"),
            "bake_version": "0.1.0",
            "inputs": {
                "format": "bake.version/v1",
                "recipe": {"name": name, "variables": {}, "base": "scratch", "build": {},
                           "provisioners": [], "tests": [], "outputs": {}},
                "base": {"kind": "scratch"},
                "files": [],
                "builtins": [],
                "source_date_epoch": 7
            },
            "started": format!("2026-01-{:02}T00:00:00Z", n + 1),
            "duration_ms": 1,
            "artifact": artifact
        });
        let record: bake::store::BuildRecord = serde_json::from_value(record).unwrap();
        bake::store::Store::open(&self.store)
            .unwrap()
            .put_record(&record)
            .unwrap();
    }

    /// An AMI registered in moto, tagged (image and snapshot) as a bake build tags it when
    /// `tags` says so; returns (AMI id, snapshot id).
    async fn ami(&self, region: &str, name: &str, tags: &[(&str, &str)]) -> (String, String) {
        let ec2 = self.aws.ec2(region);
        let image = ec2
            .register_image()
            .name(name)
            .root_device_name("/dev/xvda")
            .architecture(aws_sdk_ec2::types::ArchitectureValues::X8664)
            .virtualization_type("hvm")
            .send()
            .await
            .unwrap()
            .image_id()
            .unwrap()
            .to_owned();
        let described = ec2
            .describe_images()
            .image_ids(&image)
            .send()
            .await
            .unwrap();
        let snapshot = described.images()[0]
            .block_device_mappings()
            .iter()
            .find_map(|m| m.ebs().and_then(|e| e.snapshot_id()))
            .expect("moto gives a registered AMI a snapshot")
            .to_owned();
        if !tags.is_empty() {
            ec2.create_tags()
                .resources(&image)
                .resources(&snapshot)
                .set_tags(Some(
                    tags.iter()
                        .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                        .collect(),
                ))
                .send()
                .await
                .unwrap();
        }
        (image, snapshot)
    }

    /// Version `n` of the recipe: an AMI per region, tagged, and its build record.
    async fn built(&self, n: u8, regions: &[&str]) -> Amis {
        let v = version(n);
        let tags = [("bake:recipe", RECIPE), ("bake:version", v.as_str())];
        let mut made = BTreeMap::new();
        for region in regions {
            let ami = self
                .ami(region, &format!("{RECIPE}-{}", short(n)), &tags)
                .await;
            made.insert(region.to_string(), ami);
        }
        let amis: Vec<(&str, &str, &str)> = made
            .iter()
            .map(|(r, (i, s))| (r.as_str(), i.as_str(), s.as_str()))
            .collect();
        self.record(RECIPE, n, &amis);
        made
    }

    async fn image_exists(&self, region: &str, image: &str) -> bool {
        self.aws
            .ec2(region)
            .describe_images()
            .image_ids(image)
            .send()
            .await
            .map(|o| {
                o.images()
                    .iter()
                    .any(|i| i.state().is_some_and(|s| s.as_str() == "available"))
            })
            .unwrap_or(false)
    }

    async fn snapshot_exists(&self, region: &str, snapshot: &str) -> bool {
        self.aws
            .ec2(region)
            .describe_snapshots()
            .snapshot_ids(snapshot)
            .send()
            .await
            .is_ok_and(|o| !o.snapshots().is_empty())
    }

    /// A launch template whose versions have these AMIs (version 1 first); `default` is made
    /// the default version. Returns its id.
    async fn launch_template(&self, name: &str, amis: &[&str], default: i64) -> String {
        let ec2 = self.aws.ec2(HOME);
        let data = |ami: &str| {
            RequestLaunchTemplateData::builder()
                .image_id(ami)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build()
        };
        let id = ec2
            .create_launch_template()
            .launch_template_name(name)
            .launch_template_data(data(amis[0]))
            .send()
            .await
            .unwrap()
            .launch_template()
            .unwrap()
            .launch_template_id()
            .unwrap()
            .to_owned();
        for ami in &amis[1..] {
            ec2.create_launch_template_version()
                .launch_template_id(&id)
                .launch_template_data(data(ami))
                .send()
                .await
                .unwrap();
        }
        ec2.modify_launch_template()
            .launch_template_id(&id)
            .default_version(default.to_string())
            .send()
            .await
            .unwrap();
        id
    }

    /// An Auto Scaling group with no instances (so only the group names the AMI).
    async fn group(
        &self,
        name: &str,
        template: Option<LaunchTemplateSpecification>,
        mixed: Option<MixedInstancesPolicy>,
    ) {
        clients::autoscaling(&self.aws, HOME)
            .create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .set_launch_template(template)
            .set_mixed_instances_policy(mixed)
            .min_size(0)
            .max_size(1)
            .desired_capacity(0)
            .availability_zones(format!("{HOME}a"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("create Auto Scaling group {name}: {e:?}"));
    }

    /// Writes a channel's record as `bake promote` does: `versions` oldest first.
    async fn channel(&self, channel: &str, versions: &[(u8, Amis)]) {
        let entries: Vec<(u8, Amis, Vec<String>)> = versions
            .iter()
            .map(|(n, amis)| (*n, amis.clone(), Vec::new()))
            .collect();
        self.channel_with_images(channel, &entries).await;
    }

    /// Writes a channel's record whose entries also name images (`repository@sha256:…`).
    async fn channel_with_images(&self, channel: &str, versions: &[(u8, Amis, Vec<String>)]) {
        let history: Vec<Value> = versions
            .iter()
            .enumerate()
            .map(|(i, (n, amis, images))| {
                json!({
                    "promoted_at": format!("2026-02-{:02}T00:00:00Z", i + 1),
                    "references": {
                        "version": version(*n),
                        "amis": amis.iter().map(|(r, (i, _))| (r.clone(), i.clone())).collect::<BTreeMap<_, _>>(),
                        "images": images,
                        "launch_templates": [],
                        "task_definitions": []
                    }
                })
            })
            .collect();
        let state = json!({"format": "bake.channel/1", "recipe": RECIPE, "channel": channel, "history": history});
        clients::ssm(&self.aws, HOME)
            .put_parameter()
            .name(format!("/bake/channels/{RECIPE}/{channel}"))
            .value(state.to_string())
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .send()
            .await
            .unwrap();
    }

    fn gc_journals(&self) -> Vec<PathBuf> {
        match fs_err::read_dir(self.store.join("gc")) {
            Ok(entries) => entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

fn recipe_text(regions: &[&str]) -> String {
    format!(
        "bake: 1\nname: {RECIPE}\nbase: scratch\noutputs:\n  ami:\n    strategy: snapshot\n    name: \"{RECIPE}-{{{{version_short}}}}\"\n    regions: [{}]\npublish:\n  channels: [prod]\nlifecycle:\n  grace: 0s\n",
        regions.join(", ")
    )
}

/// Actions that change nothing (the proxy's names: `Action`, `service:Action` or a JSON
/// target `Service.Action`).
fn mutations(counted: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> Vec<String> {
    counted
        .iter()
        .filter(|(action, n)| before.get(*action).copied().unwrap_or(0) < **n)
        .map(|(action, _)| action.rsplit([':', '.']).next().unwrap().to_owned())
        .filter(|action| {
            !["Describe", "Get", "List"]
                .iter()
                .any(|p| action.starts_with(p))
        })
        .collect()
}

/// (region, id) → line of the report's AMIs.
fn ami_lines(report: &Value) -> BTreeMap<(String, String), Value> {
    report["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "ami")
        .map(|l| {
            (
                (
                    l["region"].as_str().unwrap().to_owned(),
                    l["id"].as_str().unwrap().to_owned(),
                ),
                l.clone(),
            )
        })
        .collect()
}

fn with_action(report: &Value, kind: &str, action: &str) -> BTreeSet<String> {
    report["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == kind && l["action"] == action)
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_exactly_the_unreferenced_old_amis_in_two_regions_and_says_why() {
    let Some(env) = Env::new(&recipe_text(&[HOME, OTHER])).await else {
        return;
    };
    let both = [HOME, OTHER];
    let mut v = BTreeMap::new();
    for n in 0..=9u8 {
        v.insert(n, env.built(n, &both).await);
    }
    let ami = |n: u8, region: &str| v[&n][region].0.clone();

    // v1: an ASG pinned to launch template version 1 (the template's default is version 2).
    let pinned = env
        .launch_template("gc-pinned", &[&ami(1, HOME), &ami(9, HOME)], 2)
        .await;
    env.group(
        "asg-pinned",
        Some(
            LaunchTemplateSpecification::builder()
                .launch_template_id(&pinned)
                .version("1")
                .build(),
        ),
        None,
    )
    .await;
    // v2: an ASG through `$Default` (version 1; `$Latest` is version 2 on v9).
    let default = env
        .launch_template("gc-default", &[&ami(2, HOME), &ami(9, HOME)], 1)
        .await;
    env.group(
        "asg-default",
        Some(
            LaunchTemplateSpecification::builder()
                .launch_template_id(&default)
                .version("$Default")
                .build(),
        ),
        None,
    )
    .await;
    // v3: a mixed-instances ASG pinned to version 1.
    let mixed = env
        .launch_template("gc-mixed", &[&ami(3, HOME), &ami(9, HOME)], 2)
        .await;
    env.group(
        "asg-mixed",
        None,
        Some(
            MixedInstancesPolicy::builder()
                .launch_template(
                    LaunchTemplate::builder()
                        .launch_template_specification(
                            LaunchTemplateSpecification::builder()
                                .launch_template_id(&mixed)
                                .version("1")
                                .build(),
                        )
                        .overrides(
                            LaunchTemplateOverrides::builder()
                                .instance_type("t3.micro")
                                .build(),
                        )
                        .build(),
                )
                .build(),
        ),
    )
    .await;
    // v4: an instance, in the other region.
    let instance = env
        .aws
        .ec2(OTHER)
        .run_instances()
        .image_id(ami(4, OTHER))
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned();
    // v5: an SSM parameter.
    clients::ssm(&env.aws, HOME)
        .put_parameter()
        .name("/app/web/ami")
        .value(ami(5, HOME))
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    // v6 is prod's previous version, v8 its current one.
    env.channel("prod", &[(6, v[&6].clone()), (8, v[&8].clone())])
        .await;
    // Not gc's: an AMI without bake's tags, one of another recipe (with its own record in the
    // same store), and one tagged for this recipe with a version this store never built.
    let (foreign, foreign_snapshot) = env.ami(HOME, "hand-made", &[]).await;
    let other_version = version(0x42);
    let (other, other_snapshot) = env
        .ami(
            HOME,
            "other-1",
            &[("bake:recipe", "other"), ("bake:version", &other_version)],
        )
        .await;
    env.record("other", 0x42, &[(HOME, &other, &other_snapshot)]);
    let stray_version = version(0x77);
    let (stray, _) = env
        .ami(
            HOME,
            "gcweb-stray",
            &[("bake:recipe", RECIPE), ("bake:version", &stray_version)],
        )
        .await;

    let expected_removed: BTreeSet<(String, String)> = [
        (HOME, 0),
        (HOME, 4),
        (HOME, 7),
        (OTHER, 0),
        (OTHER, 1),
        (OTHER, 2),
        (OTHER, 3),
        (OTHER, 5),
        (OTHER, 7),
    ]
    .iter()
    .map(|&(r, n)| (r.to_owned(), ami(n, r)))
    .collect();
    let instance_reason = format!("instance {instance}");
    let expected_reasons: Vec<((&str, u8), &str)> = vec![
        (
            (HOME, 1),
            "Auto Scaling group asg-pinned uses launch template",
        ),
        (
            (HOME, 2),
            "Auto Scaling group asg-default uses launch template",
        ),
        ((HOME, 2), "$Default"),
        (
            (HOME, 3),
            "Auto Scaling group asg-mixed uses (mixed instances policy)",
        ),
        ((OTHER, 4), instance_reason.as_str()),
        ((HOME, 5), "SSM parameter /app/web/ami"),
        ((HOME, 6), "channel prod: previous"),
        ((OTHER, 6), "channel prod: previous"),
        ((HOME, 8), "channel prod: current"),
        ((OTHER, 8), "channel prod: current"),
        ((HOME, 9), "rule: one of the last 1 versions"),
        ((OTHER, 9), "rule: one of the last 1 versions"),
    ];
    let check_lines = |report: &Value, removal: &str| {
        let lines = ami_lines(report);
        let removed: BTreeSet<(String, String)> = lines
            .iter()
            .filter(|(_, l)| l["action"] == removal)
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(removed, expected_removed, "{removal}: {report:#}");
        for &((region, n), reason) in &expected_reasons {
            let line = &lines[&(region.to_owned(), ami(n, region))];
            assert_eq!(line["action"], "keep", "{line:#}");
            assert!(
                line["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r.as_str().unwrap().contains(reason)),
                "v{n} in {region} should be kept because {reason}: {line:#}"
            );
        }
        // Only this recipe's AMIs get lines; the stray one is named and left alone.
        assert!(!lines.contains_key(&(HOME.to_owned(), foreign.clone())));
        assert!(!lines.contains_key(&(HOME.to_owned(), other.clone())));
        assert_eq!(lines[&(HOME.to_owned(), stray.clone())]["action"], "skip");
        // 10 versions × 2 regions + the stray one.
        assert_eq!(lines.len(), 21, "{report:#}");
    };

    // The dry run decides everything and sends only reads.
    let before = env.counted().await;
    let dry = env.gc(&["--keep", "1", "--dry-run"]);
    check_lines(&dry, "would_remove");
    let sent = env.counted().await;
    assert!(
        sent.keys().any(|a| a.contains("DescribeAutoScalingGroups")),
        "the proxy saw bake's requests: {sent:?}"
    );
    assert_eq!(mutations(&sent, &before), Vec::<String>::new());
    for (region, image) in &expected_removed {
        assert!(env.image_exists(region, image).await);
    }
    // The human form: one line per artifact, naming the reference.
    let human = env.bake(&[
        "gc",
        env.recipe.to_str().unwrap(),
        "--keep",
        "1",
        "--dry-run",
    ]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success());
    assert_eq!(text.lines().count(), 21, "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("keep")
            && l.contains(&ami(1, HOME))
            && l.contains("asg-pinned")),
        "{text}"
    );

    // The real run removes exactly those, deprecating first, and their snapshots.
    let before = env.counted().await;
    let real = env.gc(&["--keep", "1"]);
    check_lines(&real, "removed");
    let sent = env.counted().await;
    let changed = mutations(&sent, &before);
    for action in [
        "EnableImageDeprecation",
        "DeregisterImage",
        "DeleteSnapshot",
    ] {
        assert!(changed.iter().any(|a| a == action), "{action}: {changed:?}");
    }
    let removed_snapshots = with_action(&real, "snapshot", "removed");
    for (region, image) in &expected_removed {
        assert!(
            !env.image_exists(region, image).await,
            "{image} in {region}"
        );
        let n = v.iter().find(|(_, m)| &m[region].0 == image).unwrap().0;
        let snapshot = &v[n][region].1;
        assert!(removed_snapshots.contains(snapshot));
        assert!(!env.snapshot_exists(region, snapshot).await, "{snapshot}");
    }
    for &((region, n), _) in &expected_reasons {
        assert!(env.image_exists(region, &ami(n, region)).await);
        assert!(env.snapshot_exists(region, &v[&n][region].1).await);
    }
    for (image, snapshot) in [(&foreign, &foreign_snapshot), (&other, &other_snapshot)] {
        assert!(env.image_exists(HOME, image).await);
        assert!(env.snapshot_exists(HOME, snapshot).await);
    }
    assert!(env.image_exists(HOME, &stray).await);
    assert!(
        env.gc_journals().is_empty(),
        "a finished run leaves no journal"
    );

    // The removed version's manifest says what went and when; `manifest show` still answers
    // for its AMI id.
    let shown = env.bake(&["manifest", "show", &ami(7, OTHER), "--output", "json"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let manifest: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(manifest["version"], version(7));
    let removals = manifest["removals"].as_array().unwrap();
    let ids: BTreeSet<&str> = removals.iter().map(|r| r["id"].as_str().unwrap()).collect();
    for region in both {
        assert!(ids.contains(ami(7, region).as_str()));
        assert!(ids.contains(v[&7][region].1.as_str()));
    }
    assert!(
        removals
            .iter()
            .all(|r| r["at"].as_str().unwrap().starts_with("20"))
    );

    // A second run finds nothing to do: no mutating call.
    let before = env.counted().await;
    let again = env.gc(&["--keep", "1"]);
    assert!(with_action(&again, "ami", "removed").is_empty());
    assert_eq!(
        mutations(&env.counted().await, &before),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gc_killed_between_deregistering_and_deleting_snapshots_is_finished_by_the_next() {
    let Some(env) = Env::new(&recipe_text(&[HOME])).await else {
        return;
    };
    let mut v = BTreeMap::new();
    for n in 1..=4u8 {
        v.insert(n, env.built(n, &[HOME]).await[HOME].clone());
    }
    // The next DeleteSnapshot of this account is held forever: the run stops right after its
    // first AMI was deregistered and journaled.
    ThrottleProxy { url: &env.proxy }
        .stall(&env.account, "DeleteSnapshot", 1)
        .await;
    let mut child = env
        .command(&["gc", env.recipe.to_str().unwrap(), "--keep", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stalled = env
            .counted()
            .await
            .get("DeleteSnapshot")
            .copied()
            .unwrap_or(0);
        let journaled = env
            .gc_journals()
            .iter()
            .any(|p| fs_err::read_to_string(p).is_ok_and(|t| t.contains("\"deregistered\"")));
        if stalled > 0 && journaled {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "gc ended before it could be killed"
        );
        assert!(std::time::Instant::now() < deadline, "gc never got stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let journal: Value =
        serde_json::from_str(&fs_err::read_to_string(&env.gc_journals()[0]).unwrap()).unwrap();
    let first = journal["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["step"] == "deregistered")
        .unwrap()
        .clone();
    let image = first["image_id"].as_str().unwrap().to_owned();
    let snapshot = first["snapshots"][0].as_str().unwrap().to_owned();
    assert!(!env.image_exists(HOME, &image).await);
    assert!(
        env.snapshot_exists(HOME, &snapshot).await,
        "killed before the snapshot went"
    );

    // The next run finishes: the orphaned snapshot (only the journal knows it) and the rest.
    let report = env.gc(&["--keep", "1"]);
    let removed_snapshots = with_action(&report, "snapshot", "removed");
    assert!(removed_snapshots.contains(&snapshot), "{report:#}");
    for n in 1..=3u8 {
        let (image, snapshot) = &v[&n];
        assert!(!env.image_exists(HOME, image).await, "v{n}");
        assert!(!env.snapshot_exists(HOME, snapshot).await, "v{n}");
    }
    assert!(env.image_exists(HOME, &v[&4].0).await);
    assert!(env.gc_journals().is_empty(), "{:?}", env.gc_journals());

    let before = env.counted().await;
    env.gc(&["--keep", "1"]);
    assert_eq!(
        mutations(&env.counted().await, &before),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn amis_without_bake_tags_or_of_another_recipe_are_never_touched() {
    let Some(env) = Env::new(&recipe_text(&[HOME])).await else {
        return;
    };
    // Old versions of this recipe whose AMIs lost their tags, or carry another recipe's: the
    // records name them, but gc needs both before it judges anything.
    let (untagged, untagged_snapshot) = env.ami(HOME, "gcweb-old", &[]).await;
    env.record(RECIPE, 1, &[(HOME, &untagged, &untagged_snapshot)]);
    let (theirs, theirs_snapshot) = env
        .ami(
            HOME,
            "gcweb-theirs",
            &[("bake:recipe", "other"), ("bake:version", &version(2))],
        )
        .await;
    env.record(RECIPE, 2, &[(HOME, &theirs, &theirs_snapshot)]);
    let newest = env.built(3, &[HOME]).await;

    let before = env.counted().await;
    let report = env.gc(&["--keep", "1"]);
    let lines = ami_lines(&report);
    for image in [&untagged, &theirs] {
        let line = &lines[&(HOME.to_owned(), image.clone())];
        assert_eq!(line["action"], "skip", "{line:#}");
        assert!(
            line["reasons"][0]
                .as_str()
                .unwrap()
                .contains("never touched")
        );
        assert!(env.image_exists(HOME, image).await);
    }
    assert!(env.snapshot_exists(HOME, &untagged_snapshot).await);
    assert!(env.snapshot_exists(HOME, &theirs_snapshot).await);
    assert_eq!(
        lines[&(HOME.to_owned(), newest[HOME].0.clone())]["action"],
        "keep"
    );
    assert_eq!(
        mutations(&env.counted().await, &before),
        Vec::<String>::new()
    );
}

#[test]
fn gc_refuses_a_store_without_builds_and_bad_lifecycle_settings() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.yaml");
    fs_err::write(&recipe, recipe_text(&[HOME])).unwrap();
    let out = bake()
        .args(["gc", recipe.to_str().unwrap(), "--store"])
        .arg(dir.path().join("none"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no build records"));

    let bad: &Path = &dir.path().join("bad.yaml");
    fs_err::write(
        bad,
        format!(
            "{}  keep: 0\n  channels:\n    dev: {{keep: 1, older_than: soon}}\n",
            recipe_text(&[HOME])
        ),
    )
    .unwrap();
    let out = bake()
        .args(["validate", bad.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("lifecycle keep"), "{stderr}");
    assert!(
        stderr.contains("`dev` is not in publish.channels"),
        "{stderr}"
    );
    assert!(stderr.contains("bad.yaml:"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// ECR images

const REPOSITORY: &str = "gcweb/api";

fn image_recipe_text() -> String {
    format!(
        "bake: 1\nname: {RECIPE}\nbase: scratch\noutputs:\n  oci: {{}}\npublish:\n  ecr:\n    - repository: {REPOSITORY}\n      region: {HOME}\n  channels: [prod, dev]\n"
    )
}

/// An image manifest of its own for `seed`, and its digest.
fn manifest(seed: &str) -> (String, String) {
    let text = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": bake::id::Digest::of(seed.as_bytes()).to_string(),
            "size": seed.len()
        },
        "layers": []
    })
    .to_string();
    let digest = bake::id::Digest::of(text.as_bytes()).to_string();
    (text, digest)
}

impl Env {
    /// Puts the manifest into the test's ECR repository under each of `tags` (none: untagged),
    /// as `bake push` leaves it; moto keeps the digest it is given (MOTO.md, gotcha 6), which
    /// is the sha256 of the bytes, as ECR's data plane computes it.
    async fn put_image(&self, text: &str, digest: &str, tags: &[&str]) {
        let ecr = self.aws.ecr(HOME);
        let put = |tag: Option<&str>| {
            ecr.put_image()
                .repository_name(REPOSITORY)
                .image_manifest(text)
                .image_manifest_media_type("application/vnd.oci.image.manifest.v1+json")
                .image_digest(digest)
                .set_image_tag(tag.map(str::to_owned))
                .send()
        };
        if tags.is_empty() {
            put(None).await.unwrap();
        }
        for tag in tags {
            put(Some(tag)).await.unwrap();
        }
    }

    /// Version `n` of the image recipe: its image in ECR with `tags`, and its build record.
    async fn built_image(&self, n: u8, tags: &[&str]) -> String {
        let (text, digest) = manifest(&format!("{RECIPE} {n}"));
        self.put_image(&text, &digest, tags).await;
        self.record_image(RECIPE, n, &digest);
        digest
    }

    /// Digest → tags of every image in the test's repository, as moto holds them.
    async fn ecr_images(&self) -> BTreeMap<String, BTreeSet<String>> {
        let out = self
            .aws
            .ecr(HOME)
            .describe_images()
            .repository_name(REPOSITORY)
            .send()
            .await
            .unwrap();
        out.image_details()
            .iter()
            .map(|d| {
                (
                    d.image_digest().unwrap().to_owned(),
                    d.image_tags().iter().cloned().collect(),
                )
            })
            .collect()
    }

    /// Registers a task definition whose one container runs `digest` from the test's
    /// repository; its ARN.
    async fn task_definition(&self, family: &str, digest: &str) -> String {
        let image = format!(
            "{}/{REPOSITORY}@{digest}",
            bake::registry::ecr::registry_host(&self.account, HOME)
        );
        clients::ecs(&self.aws, HOME)
            .register_task_definition()
            .family(family)
            .container_definitions(
                aws_sdk_ecs::types::ContainerDefinition::builder()
                    .name("app")
                    .image(image)
                    .memory(512)
                    .essential(true)
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .task_definition()
            .unwrap()
            .task_definition_arn()
            .unwrap()
            .to_owned()
    }
}

/// Id (`repository@digest`) → line of the report's images.
fn image_lines(report: &Value) -> BTreeMap<String, Value> {
    report["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == "image")
        .map(|l| (l["id"].as_str().unwrap().to_owned(), l.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_deletes_exactly_the_unreferenced_old_ecr_images_and_keeps_what_a_service_runs() {
    let Some(env) = Env::new(&image_recipe_text()).await else {
        return;
    };
    let ecr = env.aws.ecr(HOME);
    ecr.create_repository()
        .repository_name(REPOSITORY)
        .send()
        .await
        .unwrap();
    // Versions 0 to 7 of the recipe, some tagged, some untagged (as a retag leaves them).
    let tags: [&[&str]; 8] = [
        &[],
        &[],
        &["v2"],
        &[],
        &["v4", "stable"],
        &[],
        &["v6"],
        &["v7", "latest"],
    ];
    let mut d = BTreeMap::new();
    for (n, tags) in tags.iter().enumerate() {
        d.insert(n as u8, env.built_image(n as u8, tags).await);
    }
    let id = |n: u8| format!("{REPOSITORY}@{}", d[&n]);

    // A running service whose deployment still runs revision 1 (v2) while the service is set
    // to revision 2 (v3): a rollout in progress runs both. moto keeps the first deployment
    // after UpdateService (MOTO.md), which is exactly that state.
    let ecs = clients::ecs(&env.aws, HOME);
    ecs.create_cluster()
        .cluster_name("gc-cluster")
        .send()
        .await
        .unwrap();
    let rev1 = env.task_definition("gc-api", &d[&2]).await;
    let rev2 = env.task_definition("gc-api", &d[&3]).await;
    ecs.create_service()
        .cluster("gc-cluster")
        .service_name("gc-api")
        .task_definition(&rev1)
        .desired_count(1)
        .send()
        .await
        .unwrap();
    ecs.update_service()
        .cluster("gc-cluster")
        .service("gc-api")
        .task_definition(&rev2)
        .send()
        .await
        .unwrap();
    // A task definition that is registered but that no service runs does not keep v0.
    env.task_definition("gc-unused", &d[&0]).await;
    // v5 is prod's previous version, v6 its current one; dev's current entry, a version this
    // store did not build, names v1's digest.
    env.channel("prod", &[(5, Amis::new()), (6, Amis::new())])
        .await;
    env.channel_with_images(
        "dev",
        &[(0x99, Amis::new(), vec![format!("{REPOSITORY}@{}", d[&1])])],
    )
    .await;
    // Not gc's: an image pushed by hand, and one of another recipe (its record is in the same
    // store), both in the same repository.
    let (hand, hand_digest) = manifest("by hand");
    env.put_image(&hand, &hand_digest, &["manual"]).await;
    let (theirs, theirs_digest) = manifest("other recipe");
    env.put_image(&theirs, &theirs_digest, &[]).await;
    env.record_image("other", 0x42, &theirs_digest);

    let expected_removed: BTreeSet<String> = [0, 4].map(id).into_iter().collect();
    let expected_reasons: Vec<(u8, String)> = vec![
        (
            2,
            format!("in use: ECS service gc-api (cluster gc-cluster) runs task definition {rev1}"),
        ),
        (
            3,
            format!("in use: ECS service gc-api (cluster gc-cluster) runs task definition {rev2}"),
        ),
        (
            1,
            format!(
                "channel dev: current (pinned) names its digest (as version {})",
                short(0x99)
            ),
        ),
        (5, "channel prod: previous".to_owned()),
        (6, "channel prod: current".to_owned()),
        (7, "rule: one of the last 1 versions".to_owned()),
    ];
    let check_lines = |report: &Value, removal: &str| {
        let lines = image_lines(report);
        let removed: BTreeSet<String> = lines
            .iter()
            .filter(|(_, l)| l["action"] == removal)
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(removed, expected_removed, "{removal}: {report:#}");
        for (n, reason) in &expected_reasons {
            let line = &lines[&id(*n)];
            assert_eq!(line["action"], "keep", "{line:#}");
            assert_eq!(line["region"], HOME);
            assert_eq!(line["version"], version(*n));
            assert!(
                line["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r.as_str().unwrap().starts_with(reason.as_str())),
                "v{n} should be kept because {reason}: {line:#}"
            );
        }
        let v4 = &lines[&id(4)];
        assert!(
            v4["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r.as_str().unwrap().contains("with tags v4, stable")),
            "{v4:#}"
        );
        // One line per version's image; the foreign ones get none and are counted in a note.
        assert_eq!(lines.len(), 8, "{report:#}");
        assert!(
            report["notes"].as_array().unwrap().iter().any(|n| {
                let n = n.as_str().unwrap();
                n.contains(REPOSITORY) && n.contains("2 image(s)") && n.contains("never touched")
            }),
            "{report:#}"
        );
    };
    let everything = env.ecr_images().await;
    assert_eq!(everything.len(), 10);

    // The dry run decides everything and sends only reads.
    let before = env.counted().await;
    let dry = env.gc(&["--keep", "1", "--dry-run"]);
    check_lines(&dry, "would_remove");
    let sent = env.counted().await;
    assert!(
        sent.keys().any(|a| a.ends_with("DescribeServices"))
            && sent.keys().any(|a| a.ends_with("DescribeImages")),
        "the proxy saw bake's requests: {sent:?}"
    );
    assert_eq!(mutations(&sent, &before), Vec::<String>::new());
    assert_eq!(env.ecr_images().await, everything);
    let human = env.bake(&[
        "gc",
        env.recipe.to_str().unwrap(),
        "--keep",
        "1",
        "--dry-run",
    ]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success());
    assert_eq!(text.lines().count(), 8, "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("keep")
            && l.contains(&format!("image {}", id(2)))
            && l.contains(&rev1)),
        "{text}"
    );

    // The real run deletes exactly those, tags first.
    let before = env.counted().await;
    let real = env.gc(&["--keep", "1"]);
    check_lines(&real, "removed");
    let changed = mutations(&env.counted().await, &before);
    assert!(
        changed.iter().all(|a| a == "BatchDeleteImage") && !changed.is_empty(),
        "{changed:?}"
    );
    let left = env.ecr_images().await;
    let mut expected = everything.clone();
    for n in [0, 4] {
        expected.remove(&d[&n]);
    }
    assert_eq!(left, expected);
    assert_eq!(left[&hand_digest], BTreeSet::from(["manual".to_owned()]));
    assert!(left.contains_key(&theirs_digest));
    assert!(
        env.gc_journals().is_empty(),
        "a finished run leaves no journal"
    );

    // The removed version's manifest says what went; `manifest show` still finds it by digest.
    let shown = env.bake(&["manifest", "show", &d[&4], "--output", "json"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["version"], version(4));
    let removals = shown["removals"].as_array().unwrap();
    assert_eq!(removals.len(), 1, "{shown:#}");
    assert_eq!(removals[0]["kind"], "image");
    assert_eq!(removals[0]["id"], id(4).as_str());
    assert_eq!(removals[0]["region"], HOME);

    // A second run deletes nothing.
    let before = env.counted().await;
    let again = env.gc(&["--keep", "1"]);
    assert!(
        with_action(&again, "image", "removed").is_empty(),
        "{again:#}"
    );
    assert_eq!(image_lines(&again).len(), 6, "{again:#}");
    assert_eq!(
        mutations(&env.counted().await, &before),
        Vec::<String>::new()
    );
    assert_eq!(env.ecr_images().await, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gc_killed_while_deleting_images_is_finished_by_the_next() {
    let Some(env) = Env::new(&image_recipe_text()).await else {
        return;
    };
    env.aws
        .ecr(HOME)
        .create_repository()
        .repository_name(REPOSITORY)
        .send()
        .await
        .unwrap();
    let mut d = BTreeMap::new();
    for (n, tags) in [
        (1u8, &[][..]),
        (2, &["v2"][..]),
        (3, &[][..]),
        (4, &["v4"][..]),
    ] {
        d.insert(n, env.built_image(n, tags).await);
    }
    // The run's first BatchDeleteImage is held forever: it is killed with every removal
    // journaled and that request sent but not answered.
    let target = "AmazonEC2ContainerRegistry_V20150921.BatchDeleteImage";
    ThrottleProxy { url: &env.proxy }
        .stall(&env.account, target, 1)
        .await;
    let mut child = env
        .command(&["gc", env.recipe.to_str().unwrap(), "--keep", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while env.counted().await.get(target).copied().unwrap_or(0) == 0 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "gc ended before it could be killed"
        );
        assert!(std::time::Instant::now() < deadline, "gc never got stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let journals = env.gc_journals();
    assert_eq!(journals.len(), 1);
    let journal: Value =
        serde_json::from_str(&fs_err::read_to_string(&journals[0]).unwrap()).unwrap();
    let entries = journal["entries"].as_array().unwrap();
    let journaled: BTreeSet<&str> = entries
        .iter()
        .map(|e| {
            assert_eq!(e["kind"], "image", "{e:#}");
            e["image_id"].as_str().unwrap()
        })
        .collect();
    let old: BTreeSet<String> = [1, 2, 3]
        .map(|n| format!("{REPOSITORY}@{}", d[&n]))
        .into_iter()
        .collect();
    assert_eq!(journaled, old.iter().map(String::as_str).collect());
    // AWS carried out the request the killed run sent: its image is gone, and only the
    // journal knows gc removed it.
    let held = entries[0]["image_id"].as_str().unwrap().to_owned();
    let held_digest = held.rsplit_once('@').unwrap().1.to_owned();
    env.aws
        .ecr(HOME)
        .batch_delete_image()
        .repository_name(REPOSITORY)
        .image_ids(
            aws_sdk_ecr::types::ImageIdentifier::builder()
                .image_digest(&held_digest)
                .build(),
        )
        .send()
        .await
        .unwrap();

    // The next run records that removal and finishes the others.
    let report = env.gc(&["--keep", "1"]);
    let lines = image_lines(&report);
    assert_eq!(with_action(&report, "image", "removed"), old, "{report:#}");
    assert!(
        lines[&held]["reasons"][0]
            .as_str()
            .unwrap()
            .contains("resuming interrupted gc"),
        "{report:#}"
    );
    assert_eq!(
        env.ecr_images().await.into_keys().collect::<Vec<_>>(),
        vec![d[&4].clone()]
    );
    assert!(env.gc_journals().is_empty(), "{:?}", env.gc_journals());
    let n = d
        .iter()
        .find(|(_, digest)| **digest == held_digest)
        .unwrap()
        .0;
    let shown = env.bake(&["manifest", "show", &version(*n), "--output", "json"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["removals"][0]["id"], held.as_str(), "{shown:#}");

    let before = env.counted().await;
    env.gc(&["--keep", "1"]);
    assert_eq!(
        mutations(&env.counted().await, &before),
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_deletes_old_images_from_a_registry_by_digest_and_keeps_what_a_service_runs() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let name = format!("gc/web-{}", fresh_account());
    let repository = format!("{registry}/{name}");
    let recipe = format!(
        "bake: 1\nname: {RECIPE}\nbase: scratch\noutputs:\n  oci: {{}}\npublish:\n  registries:\n    - repository: {repository}\n  channels: [prod]\n"
    );
    let Some(env) = Env::new(&recipe).await else {
        return;
    };
    let store = bake::store::Store::open(&env.store).unwrap();
    // Versions 1 to 4 and another recipe's image, pushed by `bake push` (each gets its
    // version's tag).
    let push = |n: u8, recipe: &str| {
        let digest = harness::make_image(&store, 7_000 + u64::from(n), &[64]);
        env.record_image(recipe, n, &digest);
        let out = env.bake(&["push", &version(n), "--to", &repository]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        digest
    };
    let d: BTreeMap<u8, String> = (1..=4u8).map(|n| (n, push(n, RECIPE))).collect();
    let theirs = push(0x42, "other");
    let id = |n: u8| format!("{repository}@{}", d[&n]);

    // v2 runs in an ECS service; v3 is prod's current version; v4 is the newest.
    let ecs = clients::ecs(&env.aws, HOME);
    ecs.create_cluster()
        .cluster_name("gc-registry")
        .send()
        .await
        .unwrap();
    let definition = clients::ecs(&env.aws, HOME)
        .register_task_definition()
        .family("gc-registry")
        .container_definitions(
            aws_sdk_ecs::types::ContainerDefinition::builder()
                .name("app")
                .image(id(2))
                .memory(512)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .task_definition()
        .unwrap()
        .task_definition_arn()
        .unwrap()
        .to_owned();
    ecs.create_service()
        .cluster("gc-registry")
        .service_name("web")
        .task_definition(&definition)
        .desired_count(1)
        .send()
        .await
        .unwrap();
    env.channel("prod", &[(3, Amis::new())]).await;

    let client = bake::registry::Client::anonymous().unwrap();
    let repo = bake::registry::Reference::repository_only(&repository).unwrap();
    let present = |digest: String| {
        let reference = repo.with_digest(&digest).unwrap();
        let client = &client;
        async move { client.head_manifest(&reference).await.unwrap().is_some() }
    };
    let tags = client.list_tags(&repo).await.unwrap();
    assert_eq!(tags.len(), 5, "{tags:?}");

    let check = |report: &Value, removal: &str| {
        let lines = image_lines(report);
        assert_eq!(lines.len(), 4, "{report:#}");
        assert_eq!(lines[&id(1)]["action"], removal, "{report:#}");
        assert_eq!(lines[&id(1)]["region"], "");
        for (n, reason) in [
            (
                2,
                format!(
                    "in use: ECS service web (cluster gc-registry) runs task definition {definition}"
                ),
            ),
            (3, "channel prod: current".to_owned()),
            (4, "rule: one of the last 1 versions".to_owned()),
        ] {
            let line = &lines[&id(n)];
            assert_eq!(line["action"], "keep", "{line:#}");
            assert!(
                line["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r.as_str().unwrap().starts_with(&reason)),
                "v{n}: {reason}: {line:#}"
            );
        }
    };
    let dry = env.gc(&["--keep", "1", "--dry-run"]);
    check(&dry, "would_remove");
    assert!(present(d[&1].clone()).await);
    assert_eq!(client.list_tags(&repo).await.unwrap(), tags);

    let real = env.gc(&["--keep", "1"]);
    check(&real, "removed");
    assert!(!present(d[&1].clone()).await, "v1 is gone");
    for n in 2..=4 {
        assert!(present(d[&n].clone()).await, "v{n}");
    }
    assert!(
        present(theirs.clone()).await,
        "another recipe's image stays"
    );
    let left = client.list_tags(&repo).await.unwrap();
    assert_eq!(left.len(), 4, "{left:?}");
    let v1_tag = version(1)["sha256:".len()..]
        .chars()
        .take(12)
        .collect::<String>();
    assert!(!left.iter().any(|t| t == &v1_tag), "{left:?}");
    let shown = env.bake(&["manifest", "show", &version(1), "--output", "json"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["removals"][0]["kind"], "image", "{shown:#}");
    assert_eq!(shown["removals"][0]["id"], id(1).as_str());

    let again = env.gc(&["--keep", "1"]);
    assert!(
        with_action(&again, "image", "removed").is_empty(),
        "{again:#}"
    );
    assert_eq!(client.list_tags(&repo).await.unwrap(), left);
}
