//! The fleet: recipes built on recipes, `bake graph`, `bake plan --all` and `bake build --all`,
//! through the binary. Builds run shell steps in the namespace runner (root) on a busybox root;
//! the AMI member uploads to moto.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::common::{bake, fresh_account, service, stderr, stdout};

/// A busybox root with a stand-in kernel and initrd, so a snapshot-strategy AMI can be made
/// from it (no boot test runs it).
fn busybox_rootfs(dir: &Path) {
    let root = dir.join("rootfs-src");
    for sub in ["bin", "etc", "boot", "tmp", "proc", "dev"] {
        fs_err::create_dir_all(root.join(sub)).unwrap();
    }
    fs_err::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static must be installed");
    for applet in [
        "sh", "cat", "echo", "test", "nc", "sleep", "mkdir", "seq", "timeout",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs_err::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs_err::write(root.join("boot/vmlinuz-6.1.0-fleet"), "not a kernel\n").unwrap();
    fs_err::write(root.join("boot/initrd.img-6.1.0-fleet"), "not an initrd\n").unwrap();
    let status = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(&root)
        .args(["-cf"])
        .arg(dir.join("rootfs.tar"))
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    fs_err::remove_dir_all(root).unwrap();
}

struct Fleet {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store").display().to_string();
        Fleet {
            dir,
            env: vec![("BAKE_STORE".into(), store)],
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        fs_err::create_dir_all(path.parent().unwrap()).unwrap();
        fs_err::write(&path, text).unwrap();
        path
    }

    fn bake(&self, args: &[&str]) -> Output {
        let mut command = bake();
        command.current_dir(self.path()).args(args);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command.output().unwrap()
    }

    /// `bake ARGS --output json`, which must succeed.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let output = self.bake(&all);
        assert!(
            output.status.success(),
            "bake {args:?} failed:\n{}",
            stderr(&output)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

/// Each recipe's result in a `build --all --output json` summary.
fn results(summary: &Value) -> BTreeMap<String, String> {
    summary["recipes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["recipe"].as_str().unwrap().to_owned(),
                r["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn all(result: &str, recipes: &[&str]) -> BTreeMap<String, String> {
    recipes
        .iter()
        .map(|r| ((*r).to_owned(), result.to_owned()))
        .collect()
}

/// hardened base → runtime → (api: OCI, node: AMI), and an unrelated `tool` recipe.
fn three_levels(fleet: &Fleet) {
    busybox_rootfs(fleet.path());
    fleet.write(
        "base/harden.sh",
        "mkdir -p /etc/bake\necho hardened > /etc/bake/base\n",
    );
    fleet.write(
        "base.yaml",
        "bake: 1\nname: hardened\nbase:\n  rootfs: rootfs.tar\nprovisioners:\n  - shell:\n      script: base/harden.sh\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    // Each level checks it starts from the level below: a build from anything else fails.
    fleet.write(
        "runtime.yaml",
        "bake: 1\nname: runtime\nbase:\n  recipe: base.yaml\nprovisioners:\n  - shell:\n      inline: |\n        test \"$(cat /etc/bake/base)\" = hardened\n        echo runtime > /etc/bake/runtime\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    fleet.write(
        "services/api.yaml",
        "bake: 1\nname: api\nbase:\n  recipe: ../runtime.yaml\nprovisioners:\n  - shell:\n      inline: |\n        test \"$(cat /etc/bake/runtime)\" = runtime\n        echo api > /etc/bake/api\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    fleet.write(
        "services/node.yaml",
        "bake: 1\nname: node\nbase:\n  recipe: ../runtime.yaml\nprovisioners:\n  - shell:\n      inline: |\n        test \"$(cat /etc/bake/runtime)\" = runtime\n        echo node > /etc/bake/node\noutputs:\n  ami:\n    strategy: snapshot\n    regions: [us-east-1]\n    disk_size_gib: 1\n    encryption:\n      encrypted: false\n",
    );
    fleet.write(
        "tool.yaml",
        "bake: 1\nname: tool\nbase:\n  rootfs: rootfs.tar\nprovisioners:\n  - shell:\n      inline: echo tool > /tool\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
}

#[test]
fn graph_prints_the_tree_json_and_dot() {
    let fleet = Fleet::new();
    three_levels(&fleet);
    let tree = fleet.bake(&["graph"]);
    assert!(tree.status.success(), "{}", stderr(&tree));
    assert_eq!(
        stdout(&tree),
        "base.yaml (hardened: oci) from rootfs\n\
         └─ runtime.yaml (runtime: oci)\n\
         \x20  ├─ services/api.yaml (api: oci)\n\
         \x20  └─ services/node.yaml (node: ami)\n\
         tool.yaml (tool: oci) from rootfs\n"
    );
    let json = fleet.json(&["graph", "."]);
    let recipes = json["recipes"].as_array().unwrap();
    let order: Vec<&str> = recipes
        .iter()
        .map(|r| r["recipe"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "base.yaml",
            "runtime.yaml",
            "services/api.yaml",
            "services/node.yaml",
            "tool.yaml"
        ]
    );
    assert_eq!(
        recipes[1]["base"],
        serde_json::json!({"recipe": "base.yaml"})
    );
    assert_eq!(recipes[0]["base"], serde_json::json!({"kind": "rootfs"}));
    assert_eq!(
        recipes[1]["children"],
        serde_json::json!(["services/api.yaml", "services/node.yaml"])
    );
    let dot = stdout(&fleet.bake(&["graph", "--format", "dot"]));
    assert!(dot.starts_with("digraph recipes {"), "{dot}");
    assert!(
        dot.contains("\"runtime.yaml\" -> \"services/node.yaml\";"),
        "{dot}"
    );
    assert_eq!(dot.matches(" -> ").count(), 3, "{dot}");
}

#[test]
fn a_cycle_and_a_missing_parent_are_errors_naming_the_files() {
    let fleet = Fleet::new();
    fleet.write(
        "a.yaml",
        "bake: 1\nname: a\nbase:\n  recipe: b.yaml\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    fleet.write(
        "b.yaml",
        "bake: 1\nname: b\nbase:\n  recipe: a.yaml\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    for args in [&["graph"][..], &["build", "--all"], &["plan", "--all"]] {
        let output = fleet.bake(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let text = stderr(&output);
        assert!(
            text.contains("base recipes form a cycle: a.yaml → b.yaml → a.yaml"),
            "{args:?}: {text}"
        );
    }

    let fleet = Fleet::new();
    fleet.write(
        "child.yaml",
        "bake: 1\nname: child\nbase:\n  recipe: parent.yaml\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    // Not a recipe (no `bake:` key): left alone, not reported.
    fleet.write("taskdef.yaml", "family: app\n");
    let output = fleet.bake(&["graph"]);
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    assert!(text.contains("child.yaml:4"), "{text}");
    assert!(text.contains("parent.yaml"), "{text}");
    assert!(!text.contains("taskdef"), "{text}");
    let output = fleet.bake(&["build", "child.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("parent.yaml"),
        "{}",
        stderr(&output)
    );
}

/// The first Done-when: `build --all` builds the graph in order, a changed byte in the
/// base rebuilds it and everything on it and nothing else, and a second run builds nothing.
#[test]
fn build_all_builds_in_order_and_rebuilds_exactly_what_a_changed_base_drags_along() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    if !super::skip::root("running shell steps in the namespace runner") {
        return;
    }
    let mut fleet = Fleet::new();
    three_levels(&fleet);
    fleet.env.extend(
        [
            ("BAKE_AWS_ENDPOINT_URL", endpoint.as_str()),
            ("BAKE_AWS_EMULATOR", "moto"),
            ("BAKE_AWS_EMULATOR_ACCOUNT", &fresh_account()),
            ("BAKE_AWS_REGION", "us-east-1"),
            ("BAKE_AWS_POLL_INTERVAL", "50ms"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let everything = [
        "base.yaml",
        "runtime.yaml",
        "services/api.yaml",
        "services/node.yaml",
        "tool.yaml",
    ];

    let first = fleet.json(&["build", "--all", "--jobs", "2", "--no-attest"]);
    assert_eq!(results(&first), all("built", &everything), "{first:#}");
    assert_eq!(first["built"], 5);
    let version = |summary: &Value, recipe: &str| -> String {
        summary["recipes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["recipe"] == recipe)
            .and_then(|r| r["version"].as_str())
            .unwrap()
            .to_owned()
    };
    // Each child's version names its parent's.
    let plan = fleet.json(&["plan", "runtime.yaml"]);
    assert_eq!(
        plan["inputs"]["base"]["version"].as_str(),
        Some(version(&first, "base.yaml").as_str())
    );
    // The AMI member registered its AMI (asked of moto by `plan --all --check`).
    let checked = fleet.json(&["plan", "--all", "--check"]);
    let states: BTreeMap<&str, &str> = checked["recipes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["recipe"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states["services/node.yaml"], "published", "{checked:#}");
    assert_eq!(states["services/api.yaml"], "built", "{checked:#}");

    let second = fleet.json(&["build", "--all", "--no-attest"]);
    assert_eq!(results(&second), all("cached", &everything), "{second:#}");
    assert_eq!(second["built"], 0);

    // One byte in the base's provisioner.
    fleet.write(
        "base/harden.sh",
        "mkdir -p /etc/bake\necho hardened > /etc/bake/base \n",
    );
    let third = fleet.json(&["build", "--all", "--no-attest"]);
    let mut expected = all("built", &everything[..4]);
    expected.insert("tool.yaml".into(), "cached".into());
    assert_eq!(results(&third), expected, "{third:#}");
    for recipe in &everything[..4] {
        assert_ne!(version(&first, recipe), version(&third, recipe), "{recipe}");
    }
    assert_eq!(version(&first, "tool.yaml"), version(&third, "tool.yaml"));

    let fourth = fleet.json(&["build", "--all", "--no-attest"]);
    assert_eq!(results(&fourth), all("cached", &everything), "{fourth:#}");

    // Another CI runner, with an empty store: the AMI of node's version is in AWS, so no disk
    // image is made and nothing is uploaded (its base recipes are built first, being local).
    let output = fleet.bake(&[
        "--store",
        fleet.path().join("fresh-store").to_str().unwrap(),
        "build",
        "services/node.yaml",
        "--no-attest",
        "--output",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let node: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(node["version"], version(&fourth, "services/node.yaml"));
    assert_eq!(node["cached"], true, "{node:#}");
    assert!(
        !stderr(&output).contains("making the disk image"),
        "{}",
        stderr(&output)
    );

    // `plan --all` agrees: everything built.
    let planned = fleet.json(&["plan", "--all"]);
    let states: Vec<&str> = planned["recipes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["built"; 5]);
}

/// Two siblings whose steps each wait for the other (over 127.0.0.1): built one after the
/// other, the first waits out its timeout and fails.
#[test]
fn independent_recipes_build_at_the_same_time_and_a_failure_stops_only_its_descendants() {
    if !super::skip::root("running shell steps in the namespace runner") {
        return;
    }
    let fleet = Fleet::new();
    busybox_rootfs(fleet.path());
    let port = |_: u8| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (pa, pb) = (port(0), port(1));
    // Listen on its own port, connect to the sibling's until it answers, then wait until the
    // sibling connected too (each 60 s at most).
    let sibling = |name: &str, mine: u16, theirs: u16| {
        format!(
            "bake: 1\nname: {name}\nbase:\n  rootfs: rootfs.tar\nprovisioners:\n  - shell:\n      network: true\n      inline: |\n        timeout 60 nc -l -p {mine} </dev/null >/dev/null &\n        listener=$!\n        for i in $(seq 600); do\n          if nc -w 1 127.0.0.1 {theirs} </dev/null 2>/dev/null; then\n            wait $listener || {{ echo 'the sibling never connected' >&2; exit 1; }}\n            exit 0\n          fi\n          sleep 0.1\n        done\n        echo 'the sibling never answered' >&2\n        exit 1\noutputs:\n  oci:\n    cmd: [/bin/sh]\n"
        )
    };
    fleet.write("a.yaml", &sibling("a", pa, pb));
    fleet.write("b.yaml", &sibling("b", pb, pa));
    // A failing recipe, a recipe on it, and one on that: only those two are skipped.
    fleet.write(
        "broken.yaml",
        "bake: 1\nname: broken\nbase:\n  rootfs: rootfs.tar\nprovisioners:\n  - shell:\n      inline: exit 7\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    fleet.write(
        "on-broken.yaml",
        "bake: 1\nname: on-broken\nbase:\n  recipe: broken.yaml\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    fleet.write(
        "on-on-broken.yaml",
        "bake: 1\nname: on-on-broken\nbase:\n  recipe: on-broken.yaml\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );

    let output = fleet.bake(&[
        "build",
        "--all",
        "--jobs",
        "2",
        "--no-attest",
        "--output",
        "json",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut expected = all("built", &["a.yaml", "b.yaml"]);
    expected.insert("broken.yaml".into(), "failed".into());
    expected.insert("on-broken.yaml".into(), "skipped".into());
    expected.insert("on-on-broken.yaml".into(), "skipped".into());
    assert_eq!(
        results(&summary),
        expected,
        "{summary:#}\n{}",
        stderr(&output)
    );
    let skipped = summary["recipes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["recipe"] == "on-on-broken.yaml")
        .unwrap();
    assert_eq!(skipped["failed_base"], "broken.yaml");
    // The failing step's output reaches stderr, prefixed with its recipe.
    assert!(stderr(&output).contains("broken | "), "{}", stderr(&output));

    // The human summary says the same.
    let output = fleet.bake(&["build", "--all", "--no-attest"]);
    let text = stdout(&output);
    assert!(text.contains("2 cached, 1 failed, 2 skipped"), "{text}");
    assert!(text.contains("(base broken.yaml failed)"), "{text}");
}

/// `bake build CHILD` builds the recipes it is built on first, unless they are in the store.
#[test]
fn building_a_recipe_builds_its_unbuilt_bases_first() {
    if !super::skip::root("running shell steps in the namespace runner") {
        return;
    }
    let fleet = Fleet::new();
    busybox_rootfs(fleet.path());
    fleet.write(
        "base.yaml",
        "bake: 1\nname: base\nbase:\n  rootfs: rootfs.tar\nprovisioners:\n  - shell:\n      inline: echo base > /base\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    fleet.write(
        "child.yaml",
        "bake: 1\nname: child\nbase:\n  recipe: base.yaml\nprovisioners:\n  - shell:\n      inline: test \"$(cat /base)\" = base\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    let built = fleet.json(&["build", "child.yaml", "--no-attest"]);
    let planned = fleet.json(&["plan", "--all"]);
    let states: Vec<&str> = planned["recipes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["built", "built"]);
    assert_eq!(planned["recipes"][1]["version"], built["version"]);
    // The child's image holds the base's layers below its own.
    let base = fleet.json(&["build", "base.yaml", "--no-attest"]);
    assert_eq!(base["cached"], true);
    let child_layers = built["layers"].as_array().unwrap();
    let base_layers = base["layers"].as_array().unwrap();
    assert_eq!(&child_layers[..base_layers.len()], &base_layers[..]);
}

/// `bake outdated` after the base image's tag moved in a registry: the recipe on it is outdated
/// because of the move (both digests named), the recipe built on that one because of it, and
/// after `build --all` nothing is.
#[test]
fn outdated_names_a_moved_base_image_tag_and_what_it_drags_along() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    if !super::skip::root("building images") {
        return;
    }
    let fleet = Fleet::new();
    let repository = format!("{registry}/outdated-{}", fresh_account());
    // The upstream image, outside the fleet's directory, pushed with the tag `stable`.
    let upstream = fleet.path().join("upstream");
    fs_err::create_dir_all(&upstream).unwrap();
    fs_err::write(upstream.join("release.txt"), "1\n").unwrap();
    fs_err::write(
        upstream.join("upstream.yaml"),
        format!(
            "bake: 1\nname: upstream\nbase: scratch\nprovisioners:\n  - file:\n      source: release.txt\n      destination: /release.txt\noutputs:\n  oci: {{}}\npublish:\n  registries:\n    - repository: {repository}\n      tags: [stable]\n"
        ),
    )
    .unwrap();
    let publish_upstream = || {
        let built = fleet.json(&["build", "upstream/upstream.yaml", "--no-attest"]);
        let pushed = fleet.bake(&["push", "upstream/upstream.yaml"]);
        assert!(pushed.status.success(), "{}", stderr(&pushed));
        built["image_digest"].as_str().unwrap().to_owned()
    };
    let first = publish_upstream();
    fleet.write(
        "fleet/app.yaml",
        &format!(
            "bake: 1\nname: app\nbase:\n  image: {repository}:stable\nprovisioners:\n  - file:\n      source: app.txt\n      destination: /app.txt\noutputs:\n  oci: {{}}\n"
        ),
    );
    fleet.write("fleet/app.txt", "app\n");
    fleet.write(
        "fleet/svc.yaml",
        "bake: 1\nname: svc\nbase:\n  recipe: app.yaml\noutputs:\n  oci: {}\n",
    );
    fleet.json(&["build", "--all", "fleet", "--no-attest"]);
    let report = fleet.json(&["outdated", "fleet"]);
    assert_eq!(report["outdated"], 0, "{report:#}");
    assert_eq!(report["up_to_date"], 2, "{report:#}");

    fleet.write("upstream/release.txt", "2\n");
    let second = publish_upstream();
    assert_ne!(first, second);
    let output = fleet.bake(&["outdated", "fleet", "--output", "json"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let app = &report["recipes"][0];
    assert_eq!(app["recipe"], "fleet/app.yaml");
    assert_eq!(app["state"], "outdated");
    assert_eq!(
        app["reasons"],
        serde_json::json!([{"kind": "base_image_moved", "repository": repository, "built": first, "now": second}])
    );
    assert_eq!(app["drags_along"], serde_json::json!(["fleet/svc.yaml"]));
    let svc = &report["recipes"][1];
    assert_eq!(svc["state"], "outdated");
    assert_eq!(svc["reasons"][0]["kind"], "base_recipe_changed");
    assert_eq!(svc["reasons"][0]["now"], app["now"]);
    let text = stdout(&fleet.bake(&["outdated", "fleet"]));
    assert!(
        text.contains(&format!(
            "base image {repository} moved: {} → {}",
            &first[7..19],
            &second[7..19]
        )),
        "{text}"
    );
    assert!(text.contains("drags along: fleet/svc.yaml"), "{text}");

    let rebuilt = fleet.json(&["build", "--all", "fleet", "--no-attest"]);
    assert_eq!(rebuilt["built"], 2, "{rebuilt:#}");
    let output = fleet.bake(&["outdated", "fleet"]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(stdout(&output).contains("0 outdated, 2 up to date"));
}

/// `bake outdated` when a newer image matches a recipe's source AMI filter in moto. The last
/// build's record is written from the plan (an instance build needs a builder; what matters
/// here is the inputs it pinned).
#[tokio::test(flavor = "multi_thread")]
async fn outdated_names_a_superseded_source_ami() {
    let Some(moto) = super::instance::moto().await else {
        return;
    };
    let (_, newest) = moto.vendor_amis().await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    fs_err::create_dir_all(dir.path().join("recipes")).unwrap();
    fs_err::write(
        dir.path().join("recipes/node.yaml"),
        "bake: 1\nname: node\nbase:\n  ami:\n    owners: [self]\n    name: \"vendor-linux-*-x86_64\"\n    virtualization_type: paravirtual\n    root_device_type: standard\nprovisioners:\n  - shell:\n      inline: \"true\"\noutputs:\n  ami:\n    strategy: instance\n    regions: [us-east-1]\n    instance:\n      ssh_username: admin\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        moto.bake(&store)
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap()
    };
    let planned = run(&["plan", "recipes/node.yaml", "--output", "json"]);
    assert!(planned.status.success(), "{}", stderr(&planned));
    let plan: Value = serde_json::from_slice(&planned.stdout).unwrap();
    assert_eq!(plan["inputs"]["base"]["image_id"], newest.as_str());
    record_plan(&bake::store::Store::open(&store).unwrap(), &plan);
    let output = run(&["outdated", "recipes"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );

    // A newer vendor release (moto dates images to the second).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let instance = moto
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
        .instance_id(instance.instances()[0].instance_id().unwrap())
        .name("vendor-linux-2026.9-x86_64")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    let output = run(&["outdated", "recipes", "--output", "json"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let node = &report["recipes"][0];
    assert_eq!(node["state"], "outdated", "{report:#}");
    assert_eq!(
        node["reasons"][0]["kind"], "source_ami_superseded",
        "{report:#}"
    );
    assert_eq!(node["reasons"][0]["region"], "us-east-1");
    assert_eq!(node["reasons"][0]["built"], newest.as_str());
    assert_eq!(node["reasons"][0]["now"], newer.as_str());
    assert_eq!(node["reasons"][0]["now_name"], "vendor-linux-2026.9-x86_64");
}

/// A bootstrap recipe on a local `file://` archive: the plan pins the suite's InRelease, so a
/// re-signed archive (a package update) is a new version, and `outdated` names the recipe, the
/// archive and the recipe built on it. (The last build's records are written from the plans:
/// this test is about pinning, the bootstrap tests build from Debian's mirror.)
#[test]
fn a_moved_package_archive_is_a_new_version_and_outdated_names_it() {
    let fleet = Fleet::new();
    let archive = fleet.path().join("archive");
    let release = archive.join("dists/stable/InRelease");
    fs_err::create_dir_all(release.parent().unwrap()).unwrap();
    fs_err::write(
        &release,
        "Suite: stable\nDate: Mon, 07 Dec 2026 00:00:00 UTC\n",
    )
    .unwrap();
    fleet.write(
        "fleet/base.yaml",
        &format!(
            "bake: 1\nname: base\nbase:\n  bootstrap:\n    suite: stable\n    mirror: file://{}\noutputs:\n  oci: {{}}\n",
            archive.display()
        ),
    );
    fleet.write(
        "fleet/app.yaml",
        "bake: 1\nname: app\nbase:\n  recipe: base.yaml\noutputs:\n  oci: {}\n",
    );
    let planned = fleet.json(&["plan", "--all", "fleet"]);
    let store = bake::store::Store::open(&fleet.path().join("store")).unwrap();
    for (recipe, name) in [("fleet/base.yaml", "base"), ("fleet/app.yaml", "app")] {
        let plan = fleet.json(&["plan", recipe]);
        assert_eq!(
            planned["recipes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["recipe"] == recipe)
                .unwrap()["version"],
            plan["version"]
        );
        assert_eq!(plan["name"], name);
        record_plan(&store, &plan);
    }
    let base_plan = fleet.json(&["plan", "fleet/base.yaml"]);
    let pinned = base_plan["inputs"]["base"]["archives"][0]["release"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        pinned,
        format!("sha256:{}", sha256_hex(&fs_err::read(&release).unwrap()))
    );
    assert_eq!(fleet.bake(&["outdated", "fleet"]).status.code(), Some(0));

    // A package update: the archive's InRelease is written (and signed) again.
    fs_err::write(
        &release,
        "Suite: stable\nDate: Tue, 08 Dec 2026 00:00:00 UTC\n",
    )
    .unwrap();
    let moved = fleet.json(&["plan", "fleet/base.yaml"]);
    assert_ne!(moved["version"], base_plan["version"]);
    let output = fleet.bake(&["outdated", "fleet", "--output", "json"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let base = &report["recipes"][0];
    assert_eq!(base["recipe"], "fleet/base.yaml");
    assert_eq!(
        base["reasons"],
        serde_json::json!([{
            "kind": "archive_moved",
            "mirror": format!("file://{}", archive.display()),
            "suite": "stable",
            "built": pinned,
            "now": moved["inputs"]["base"]["archives"][0]["release"],
        }])
    );
    assert_eq!(base["drags_along"], serde_json::json!(["fleet/app.yaml"]));
    assert_eq!(
        report["recipes"][1]["reasons"][0]["kind"],
        "base_recipe_changed"
    );

    // An archive that cannot be read is an error naming it, not an unpinned plan.
    fs_err::remove_file(&release).unwrap();
    let output = fleet.bake(&["plan", "fleet/base.yaml"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("failed to pin the package archive file://"),
        "{}",
        stderr(&output)
    );
}

/// Writes the build record a build of `plan` (a `bake plan --output json` document) would
/// leave, without its artifact's bytes: what `outdated` compares today's plan with.
fn record_plan(store: &bake::store::Store, plan: &Value) {
    let record = serde_json::json!({
        "format": "bake.build-record/v2",
        "name": plan["name"],
        "version": plan["version"],
        "recipe": plan["recipe"],
        "bake_version": "0.1.0",
        "inputs": plan["inputs"],
        "started": "2026-12-01T00:00:00Z",
        "duration_ms": 1,
        "artifact": {"kind": "disk_ami", "ami": {"disk_image_digest": null, "regions": []}}
    });
    store
        .put_record(&serde_json::from_value(record).unwrap())
        .unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// bookworm's minbase packages, fetched once from Debian's mirror (mmdebstrap keeps the .debs it
/// installed) and cached in the target directory.
fn minbase_debs() -> PathBuf {
    static DEBS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DEBS.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fleet-bookworm-minbase-debs");
        if dir.join(".complete").is_file() {
            return dir;
        }
        let partial = dir.with_extension("partial");
        let _ = fs_err::remove_dir_all(&partial);
        fs_err::create_dir_all(&partial).unwrap();
        let status = Command::new("mmdebstrap")
            .args([
                "--variant=minbase",
                "--format=null",
                "--quiet",
                "--skip=essential/unlink",
            ])
            .arg(format!(
                "--customize-hook=sync-out /var/cache/apt/archives {}",
                partial.display()
            ))
            .args(["bookworm", "/dev/null"])
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mmdebstrap could not fetch the minbase packages"
        );
        fs_err::write(partial.join(".complete"), "").unwrap();
        let _ = fs_err::remove_dir_all(&dir);
        fs_err::rename(&partial, &dir).unwrap();
        dir
    })
    .clone()
}

/// A signed Debian archive on disk (suite `stable`, component `main`): the minbase packages plus
/// `bake-canary`, whose version the tests bump, indexed with apt-ftparchive and signed with a
/// key made for the test.
struct LocalArchive {
    dir: PathBuf,
    gnupg: tempfile::TempDir,
}

impl LocalArchive {
    fn new(dir: &Path) -> LocalArchive {
        let pool = dir.join("pool");
        fs_err::create_dir_all(&pool).unwrap();
        for entry in fs_err::read_dir(minbase_debs()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "deb") {
                fs_err::copy(&path, pool.join(path.file_name().unwrap())).unwrap();
            }
        }
        let gnupg = tempfile::tempdir().unwrap();
        run(Command::new("gpg")
            .env("GNUPGHOME", gnupg.path())
            .args(["--batch", "--quiet", "--passphrase", ""])
            .args([
                "--quick-gen-key",
                "bake test archive <archive@bake.invalid>",
            ])
            .args(["ed25519", "sign", "never"]));
        LocalArchive {
            dir: dir.to_path_buf(),
            gnupg,
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    fn export_keyring(&self, to: &Path) {
        let output = Command::new("gpg")
            .env("GNUPGHOME", self.gnupg.path())
            .args(["--batch", "--export"])
            .output()
            .unwrap();
        assert!(output.status.success());
        fs_err::write(to, output.stdout).unwrap();
    }

    /// `bake-canary` at `version` (the only one), then the indices, Release and InRelease anew.
    fn publish(&self, version: &str) {
        let pool = self.dir.join("pool");
        for entry in fs_err::read_dir(&pool).unwrap() {
            let path = entry.unwrap().path();
            if path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("bake-canary_")
            {
                fs_err::remove_file(path).unwrap();
            }
        }
        let package = tempfile::tempdir().unwrap();
        fs_err::create_dir_all(package.path().join("DEBIAN")).unwrap();
        fs_err::create_dir_all(package.path().join("usr/share/bake-canary")).unwrap();
        fs_err::write(
            package.path().join("usr/share/bake-canary/version"),
            version,
        )
        .unwrap();
        fs_err::write(
            package.path().join("DEBIAN/control"),
            format!("Package: bake-canary\nVersion: {version}\nArchitecture: all\nMaintainer: bake tests <tests@bake.invalid>\nPriority: optional\nDescription: the package the fleet tests bump\n"),
        )
        .unwrap();
        run(Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .arg(package.path())
            .arg(pool.join(format!("bake-canary_{version}_all.deb"))));
        let dists = self.dir.join("dists/stable");
        let index = dists.join("main/binary-amd64");
        fs_err::create_dir_all(&index).unwrap();
        let packages = Command::new("apt-ftparchive")
            .args(["packages", "pool"])
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(packages.status.success());
        fs_err::write(index.join("Packages"), packages.stdout).unwrap();
        let release = Command::new("apt-ftparchive")
            .args([
                "-o",
                "APT::FTPArchive::Release::Suite=stable",
                "-o",
                "APT::FTPArchive::Release::Codename=stable",
                "-o",
                "APT::FTPArchive::Release::Components=main",
                "-o",
                "APT::FTPArchive::Release::Architectures=amd64",
                "release",
                "dists/stable",
            ])
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(release.status.success());
        fs_err::write(dists.join("Release"), release.stdout).unwrap();
        run(Command::new("gpg")
            .env("GNUPGHOME", self.gnupg.path())
            .args(["--batch", "--yes", "--clearsign", "-o"])
            .arg(dists.join("InRelease"))
            .arg(dists.join("Release")));
    }
}

fn run(command: &mut Command) {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The local-archive case end to end: a bootstrap recipe on a signed `file://` archive
/// and a recipe built on it; a package update (re-indexed, re-signed) is a new version,
/// `outdated` names the recipe, the archive, the package and the recipe it drags along, and
/// after `build --all` nothing is outdated.
#[test]
fn an_updated_package_in_a_local_archive_is_named_by_outdated_until_build_all() {
    if !super::skip::root("bootstrapping with mmdebstrap")
        || !super::skip::tool("apt-ftparchive")
        || !super::skip::tool("gpg")
    {
        return;
    }
    let fleet = Fleet::new();
    let archive = LocalArchive::new(&fleet.path().join("archive"));
    archive.publish("1.0");
    fs_err::create_dir_all(fleet.path().join("fleet")).unwrap();
    archive.export_keyring(&fleet.path().join("fleet/archive-keyring.gpg"));
    fleet.write(
        "fleet/base.yaml",
        &format!(
            "bake: 1\nname: base\nbase:\n  bootstrap:\n    suite: stable\n    mirror: {}\n    keyring: archive-keyring.gpg\n    packages: [bake-canary]\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
            archive.url()
        ),
    );
    fleet.write(
        "fleet/app.yaml",
        "bake: 1\nname: app\nbase:\n  recipe: base.yaml\nprovisioners:\n  - shell:\n      inline: cat /usr/share/bake-canary/version > /canary-seen\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    );
    let first = fleet.json(&["build", "--all", "fleet", "--no-attest"]);
    assert_eq!(first["built"], 2, "{first:#}");
    let output = fleet.bake(&["outdated", "fleet"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );

    archive.publish("1.1");
    let output = fleet.bake(&["outdated", "fleet", "--output", "json"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let base = &report["recipes"][0];
    assert_eq!(base["recipe"], "fleet/base.yaml");
    assert_eq!(base["state"], "outdated");
    assert_eq!(base["reasons"][0]["kind"], "archive_moved", "{report:#}");
    assert_eq!(base["reasons"][0]["suite"], "stable");
    assert_eq!(
        base["packages"],
        serde_json::json!([{"name": "bake-canary", "built": "1.0", "now": "1.1", "suite": "stable", "security": false}]),
        "{report:#}"
    );
    assert_eq!(base["drags_along"], serde_json::json!(["fleet/app.yaml"]));
    assert_eq!(report["recipes"][1]["state"], "outdated");
    let text = stdout(&fleet.bake(&["outdated", "fleet"]));
    assert!(
        text.contains("package bake-canary 1.0 → 1.1 (stable)"),
        "{text}"
    );

    let second = fleet.json(&["build", "--all", "fleet", "--no-attest"]);
    assert_eq!(second["built"], 2, "{second:#}");
    let output = fleet.bake(&["outdated", "fleet"]);
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    assert!(stdout(&output).contains("0 outdated, 2 up to date"));
}

/// A shared cache for ephemeral CI runners: a fresh store asks the recipe's registry for the
/// planned version before building, takes the pushed image (its tag names the version and its
/// manifest says so) and runs nothing.
#[test]
fn a_fresh_store_takes_a_pushed_version_from_the_registry_and_runs_nothing() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    if !super::skip::root("running shell steps in the namespace runner") {
        return;
    }
    let fleet = Fleet::new();
    busybox_rootfs(fleet.path());
    let repository = format!("{registry}/shared-cache-{}", fresh_account());
    fleet.write(
        "app.yaml",
        &format!(
            "bake: 1\nname: app\nbase:\n  rootfs: rootfs.tar\nprovisioners:\n  - shell:\n      inline: echo built > /built\noutputs:\n  oci:\n    cmd: [/bin/sh]\npublish:\n  registries:\n    - repository: {repository}\n      tags: [latest]\n"
        ),
    );
    let built = fleet.json(&["build", "app.yaml", "--no-attest"]);
    let pushed = fleet.bake(&["push", "app.yaml"]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let version = built["version"].as_str().unwrap();
    let digest = built["image_digest"].as_str().unwrap();

    // Another runner: an empty store.
    let output = fleet.bake(&[
        "--store",
        fleet.path().join("fresh-store").to_str().unwrap(),
        "build",
        "app.yaml",
        "--output",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let fetched: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(fetched["version"], version);
    assert_eq!(fetched["image_digest"], digest);
    assert_eq!(fetched["cached"], true);
    assert_eq!(
        fetched["fetched_from"],
        format!("{repository}:{}", &version[7..19])
    );
    let log = stderr(&output);
    assert!(log.contains("fetched, nothing is built"), "{log}");
    assert!(!log.contains("==> shell #1"), "a step ran: {log}");
    // The store has the image and its record: exporting it needs nothing else.
    let exported = fleet.bake(&[
        "--store",
        fleet.path().join("fresh-store").to_str().unwrap(),
        "export",
        version,
        "--oci-layout",
        fleet.path().join("layout").to_str().unwrap(),
    ]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    let record: Value = serde_json::from_slice(
        &fs_err::read(
            fleet
                .path()
                .join("fresh-store/records")
                .join(format!("{}.json", &version[7..])),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(record["fetched_from"], fetched["fetched_from"]);
    assert_eq!(record["inputs"]["base"]["kind"], "rootfs");

    // A tag is not proof: the version's tag moved to another version's image (same
    // repository), so a fresh store builds the version itself.
    fleet.write(
        "app.yaml",
        &fs_err::read_to_string(fleet.path().join("app.yaml"))
            .unwrap()
            .replace("echo built", "echo rebuilt"),
    );
    let other = fleet.json(&["build", "app.yaml", "--no-attest"]);
    let pushed = fleet.bake(&["push", "app.yaml"]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = bake::registry::Client::new(
            bake::registry::ClientOptions::default(),
            std::sync::Arc::new(bake::registry::auth::ChainCredentials(Vec::new())),
        )
        .unwrap();
        let repo = bake::registry::Reference::repository_only(&repository).unwrap();
        let manifest = client
            .get_manifest(
                &repo
                    .with_digest(other["image_digest"].as_str().unwrap())
                    .unwrap(),
            )
            .await
            .unwrap()
            .unwrap();
        client
            .put_manifest(
                &repo,
                &version[7..19],
                "application/vnd.oci.image.manifest.v1+json",
                manifest.bytes,
            )
            .await
            .unwrap();
    });
    fleet.write(
        "app.yaml",
        &fs_err::read_to_string(fleet.path().join("app.yaml"))
            .unwrap()
            .replace("echo rebuilt", "echo built"),
    );
    let output = fleet.bake(&[
        "--store",
        fleet.path().join("third-store").to_str().unwrap(),
        "build",
        "app.yaml",
        "--output",
        "json",
        "--no-attest",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let rebuilt: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(rebuilt["version"], version);
    assert_eq!(
        rebuilt["image_digest"], digest,
        "built here, the same bytes"
    );
    assert!(rebuilt.get("fetched_from").is_none(), "{rebuilt:#}");
    let log = stderr(&output);
    assert!(log.contains("is not version"), "{log}");
    assert!(log.contains("==> shell #1"), "nothing ran: {log}");
}

/// The layer cache in a registry (`build.cache`): a fresh store whose recipe changed only in its
/// last step takes the base and the first step from the registry and runs only the last step,
/// and the image is the one a warm store builds.
#[test]
fn with_a_registry_layer_cache_a_fresh_store_reruns_only_the_changed_last_step() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    if !super::skip::root("running shell steps in the namespace runner") {
        return;
    }
    let fleet = Fleet::new();
    busybox_rootfs(fleet.path());
    let cache = format!("{registry}/layer-cache-{}", fresh_account());
    let recipe = |last: &str| {
        format!(
            "bake: 1\nname: cached\nbase:\n  rootfs: rootfs.tar\nbuild:\n  cache: {cache}\nprovisioners:\n  - shell:\n      inline: echo first > /first\n  - shell:\n      inline: echo {last} > /last\noutputs:\n  oci:\n    cmd: [/bin/sh]\n"
        )
    };
    fleet.write("cached.yaml", &recipe("one"));
    let warm = fleet.bake(&["build", "cached.yaml", "--no-attest"]);
    assert!(warm.status.success(), "{}", stderr(&warm));
    assert!(
        stderr(&warm).contains("3 step(s) sent"),
        "{}",
        stderr(&warm)
    );

    fleet.write("cached.yaml", &recipe("two"));
    let output = fleet.bake(&[
        "--store",
        fleet.path().join("fresh-store").to_str().unwrap(),
        "build",
        "cached.yaml",
        "--no-attest",
        "--output",
        "json",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let log = stderr(&output);
    assert!(log.contains("2 step(s) taken"), "{log}");
    assert!(
        !log.contains("preparing base"),
        "the base was made again: {log}"
    );
    let fresh: Value = serde_json::from_slice(&output.stdout).unwrap();
    let cached: Vec<bool> = fresh["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cached"].as_bool().unwrap())
        .collect();
    assert_eq!(cached, [true, false], "{fresh:#}");
    // The same image as a build in the warm store.
    let warm = fleet.json(&["build", "cached.yaml", "--no-attest"]);
    assert_eq!(warm["image_digest"], fresh["image_digest"]);
}
