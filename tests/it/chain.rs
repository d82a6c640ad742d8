//! The chain end to end, driven only through the `bake` binary: a recipe becomes an image and
//! AMIs, those are published where Fargate services and Auto Scaling groups consume them, and
//! the version's manifest answers "which version is this?" from any identifier a consumer
//! holds (task definition ARN, image digest, `lt-…:N`, AMI id). Each test starts from an empty
//! store and a fresh moto account.
//!
//! The servers are the suite's: moto for AWS, a private `docker-registry` as ECR's data plane
//! (the registry host moto's ECR names is mapped to it with `BAKE_REGISTRY_ENDPOINTS`), and the
//! instance tests' sshd harness standing in for the builder instance.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use super::common::{bake, fresh_account, repo_root, service, stderr, stdout};
use super::registry::harness::{Auth, LocalRegistry};

const REGION: &str = "us-east-1";

/// Whether builds can run here (see [`super::skip`]).
fn can_build() -> bool {
    super::skip::root("building: namespaces, chown")
}

/// `bake` against moto (and, when given, a registry endpoint map), with its own store.
struct Chain {
    endpoint: String,
    account: String,
    store: PathBuf,
    registry_endpoints: Option<String>,
    dir: tempfile::TempDir,
}

impl Chain {
    fn new(endpoint: String) -> Chain {
        let dir = tempfile::tempdir().unwrap();
        Chain {
            endpoint,
            account: fresh_account(),
            store: dir.path().join("store"),
            registry_endpoints: None,
            dir,
        }
    }

    fn command(&self) -> Command {
        let mut command = bake();
        command
            .arg("--store")
            .arg(&self.store)
            .env("BAKE_AWS_ENDPOINT_URL", &self.endpoint)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &self.account)
            .env("BAKE_AWS_REGION", REGION)
            .env("BAKE_AWS_POLL_INTERVAL", "50ms")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL");
        if let Some(map) = &self.registry_endpoints {
            command.env("BAKE_REGISTRY_ENDPOINTS", map);
        }
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run bake")
    }

    /// Runs `args` with `--output json`, asserting success.
    fn json(&self, args: &[&str]) -> Value {
        let output = self
            .command()
            .args(["--output", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "bake {args:?} failed ({:?}):\n{}\n{}",
            output.status.code(),
            stderr(&output),
            stdout(&output)
        );
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("bake {args:?} printed no JSON ({e}): {}", stdout(&output)))
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs_err::create_dir_all(path.parent().unwrap()).unwrap();
        fs_err::write(&path, text).unwrap();
        path
    }

    async fn aws(&self) -> bake::aws::Aws {
        super::registry::moto_aws(&self.endpoint, &self.account).await
    }
}

/// The `result` of the one change of `kind` in a publish report.
fn change_result(report: &Value, kind: &str) -> String {
    let results: Vec<&str> = report["regions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["changes"].as_array().unwrap())
        .filter(|c| c["kind"] == kind)
        .filter_map(|c| c["result"].as_str())
        .collect();
    assert_eq!(results.len(), 1, "one {kind} change in {report:#}");
    results[0].to_owned()
}

/// The version `bake manifest show QUERY` names.
fn shown_version(chain: &Chain, query: &str) -> String {
    chain.json(&["manifest", "show", query])["version"]
        .as_str()
        .unwrap()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Fargate: OCI image → ECR → task definition → channel

fn fargate_recipe(chain: &Chain, release: &str) -> PathBuf {
    chain.write("app/release.txt", &format!("{release}\n"));
    chain.write(
        "task.json",
        r#"{
  "family": "chain-api",
  "cpu": "256",
  "memory": "512",
  "networkMode": "awsvpc",
  "requiresCompatibilities": ["FARGATE"],
  "containerDefinitions": [
    {"name": "app", "image": "placeholder", "memory": 512, "essential": true}
  ]
}"#,
    );
    chain.write(
        "api.yaml",
        r#"bake: 1
name: chain-api
base: scratch
provisioners:
  - file:
      name: release
      source: app/release.txt
      destination: /app/release.txt
outputs:
  oci:
    cmd: ["/app/run"]
publish:
  ecr:
    - repository: chain/api
      region: us-east-1
  ecs_task_definitions:
    - family: chain-api
      container: app
      region: us-east-1
      template: task.json
  channels: [prod]
"#,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn fargate_path_build_push_publish_promote_rollback_and_find_each_version() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    if !can_build() {
        return;
    }
    let mut chain = Chain::new(endpoint);
    let aws = chain.aws().await;
    let token = aws
        .ecr(REGION)
        .get_authorization_token()
        .send()
        .await
        .unwrap();
    let password = bake::registry::Credential::from_basic_token(
        token.authorization_data()[0].authorization_token().unwrap(),
    )
    .unwrap()
    .password;
    let Some(data_plane) = LocalRegistry::start(Auth::Htpasswd {
        user: "AWS".into(),
        password: password.expose().to_owned(),
    }) else {
        return;
    };
    let host = bake::registry::ecr::registry_host(&chain.account, REGION);
    chain.registry_endpoints = Some(format!("{host}=http://{}", data_plane.addr));

    // Version 1: build, push to ECR, publish a task definition pinned by digest, promote.
    let recipe = fargate_recipe(&chain, "1");
    let recipe = recipe.to_str().unwrap();
    let built = chain.json(&["build", recipe]);
    let v1 = built["version"].as_str().unwrap().to_owned();
    let d1 = built["image_digest"].as_str().unwrap().to_owned();
    let pushed = chain.json(&["push", recipe]);
    let reference1 = format!("{host}/chain/api@{d1}");
    assert_eq!(pushed["references"], serde_json::json!([reference1]));
    let published = chain.json(&["publish", recipe]);
    assert_eq!(published["version"], v1.as_str());
    let arn1 = change_result(&published, "task_definition");
    assert!(arn1.starts_with("arn:aws:ecs:"), "{arn1}");
    chain.json(&["promote", recipe, &v1, "--channel", "prod"]);

    // Version 2: a changed file is a new version, with its own image and revision.
    let recipe = fargate_recipe(&chain, "2");
    let recipe = recipe.to_str().unwrap();
    let built = chain.json(&["build", recipe]);
    let v2 = built["version"].as_str().unwrap().to_owned();
    let d2 = built["image_digest"].as_str().unwrap().to_owned();
    assert_ne!(v1, v2);
    assert_ne!(d1, d2);
    chain.json(&["push", recipe]);
    let arn2 = change_result(&chain.json(&["publish", recipe]), "task_definition");
    assert_ne!(arn1, arn2);
    chain.json(&["promote", recipe, &v2, "--channel", "prod"]);
    chain.json(&["rollback", recipe, "--channel", "prod"]);
    let pinned = chain.json(&["pin", recipe, "--channel", "prod"]);
    assert_eq!(pinned["references"]["version"], v1.as_str());

    // The manifest is the version's index: each identifier a consumer holds names its version.
    assert_eq!(shown_version(&chain, &arn1), v1);
    assert_eq!(shown_version(&chain, &arn2), v2);
    assert_eq!(shown_version(&chain, &d1), v1);
    assert_eq!(shown_version(&chain, &d2), v2);
    assert_eq!(shown_version(&chain, &reference1), v1);
    let manifest = chain.json(&["manifest", "show", &v1]);
    let publications = manifest["publications"].as_array().unwrap();
    let kinds = |kind: &str| publications.iter().filter(|p| p["kind"] == kind).count();
    assert_eq!(kinds("ecs_task_definition"), 1, "{manifest:#}");
    assert!(kinds("registry") >= 1, "{manifest:#}");
    // Promoted, then promoted again after version 2 was rolled back: two channel moves, each
    // with its time.
    let moves: Vec<&Value> = publications
        .iter()
        .filter(|p| p["kind"] == "channel")
        .collect();
    assert_eq!(moves.len(), 2, "{manifest:#}");
    assert!(
        moves
            .iter()
            .all(|m| m["channel"] == "prod" && m["at"].is_string())
    );
    assert_eq!(moves[1]["action"], "rollback", "{manifest:#}");
    let manifest2 = chain.json(&["manifest", "show", &v2]);
    assert!(
        manifest2["publications"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "channel" && p["action"] == "promote"),
        "{manifest2:#}"
    );

    let verified = chain.run(&["verify", &v1]);
    assert!(verified.status.success(), "{}", stderr(&verified));
}

// ---------------------------------------------------------------------------------------------
// Both outputs: one provisioned root → image and AMIs → launch template and SSM parameter

/// The disk tests' bootable root with an OCI output too, no boot test (the AMI tests boot it),
/// and publish targets.
fn both_outputs_recipe() -> String {
    let fixture =
        fs_err::read_to_string(repo_root().join("tests/fixtures/recipes/disk/ami.yaml")).unwrap();
    let recipe = fixture
        .replace(
            "tests:\n  - boot:\n      marker: bake-disk-test-ok\n      timeout: 10m\n",
            "tests:\n  - command:\n      name: hardened\n      run: test -f /etc/ssh/sshd_config\n",
        )
        .replace("name: disk-test\n", "name: chain-both\n")
        .replace(
            "outputs:\n  ami:\n    strategy: snapshot\n    regions: [us-east-1]\n",
            "outputs:\n  oci: {}\n  ami:\n    strategy: snapshot\n    name: \"chain-both-{{version_short}}\"\n    regions: [us-east-1]\n",
        );
    assert!(
        recipe.contains("  oci: {}")
            && recipe.contains("name: chain-both")
            && !recipe.contains("boot:"),
        "the disk fixture changed: update this test"
    );
    recipe
        + "\npublish:\n  launch_templates:\n    - name: chain-both\n  ssm_parameters:\n    - name: /chain/both/ami\n  channels: [prod]\n"
}

#[tokio::test(flavor = "multi_thread")]
async fn one_build_gives_image_and_amis_under_one_version_and_publishes_them() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    if !can_build() {
        return;
    }
    let chain = Chain::new(endpoint);
    let aws = chain.aws().await;
    let ec2 = aws.ec2(REGION);
    // What ran before this recipe existed: an AMI published and promoted as version 0.
    let earlier = ec2
        .register_image()
        .name("chain-both-before")
        .root_device_name("/dev/xvda")
        .architecture(aws_sdk_ec2::types::ArchitectureValues::X8664)
        .virtualization_type("hvm")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    let template = ec2
        .create_launch_template()
        .launch_template_name("chain-both")
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(&earlier)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_owned();
    let recipe = chain.write("both.yaml", &both_outputs_recipe());
    let recipe = recipe.to_str().unwrap();
    let v0 = format!("sha256:{}", "0e".repeat(32));
    let inputs = chain.write(
        "v0.json",
        &format!(
            r#"{{"recipe": "chain-both", "version": "{v0}", "amis": {{"{REGION}": "{earlier}"}}}}"#
        ),
    );
    chain.json(&["publish", recipe, "--inputs", inputs.to_str().unwrap()]);
    chain.json(&["promote", recipe, &v0, "--channel", "prod"]);

    // One build: the image and the AMI, one version.
    let built = chain.json(&["build", recipe]);
    let version = built["version"].as_str().unwrap().to_owned();
    let image = built["image_digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no image in {built:#}"))
        .to_owned();
    assert!(image.starts_with("sha256:"), "{built:#}");
    let ami = built["regions"][0]["image_id"].as_str().unwrap().to_owned();
    assert!(ami.starts_with("ami-"), "{built:#}");
    let manifest = chain.json(&["manifest", "show", &version]);
    assert_eq!(
        manifest["outputs"]["oci"]["manifest_digest"],
        image.as_str()
    );
    assert_eq!(manifest["outputs"]["amis"][0]["image_id"], ami.as_str());
    assert!(
        manifest["outputs"]["disk_image"]["digest"].is_string(),
        "{manifest:#}"
    );
    // The image is in the store under that version: it exports.
    let layout = chain.dir.path().join("layout");
    let exported = chain.run(&["export", &version, "--oci-layout", layout.to_str().unwrap()]);
    assert!(exported.status.success(), "{}", stderr(&exported));

    // Publish from the build record, promote, roll back to version 0.
    let published = chain.json(&["publish", recipe]);
    assert_eq!(published["version"], version.as_str());
    let lt_version = change_result(&published, "launch_template_version")
        .trim_start_matches("version ")
        .to_owned();
    chain.json(&["promote", recipe, &version, "--channel", "prod"]);
    let parameter = aws
        .ssm(REGION)
        .get_parameter()
        .name("/chain/both/ami")
        .send()
        .await
        .unwrap();
    assert_eq!(parameter.parameter().unwrap().value(), Some(ami.as_str()));
    chain.json(&["rollback", recipe, "--channel", "prod"]);
    let pinned = chain.json(&["pin", recipe, "--channel", "prod"]);
    assert_eq!(pinned["references"]["version"], v0.as_str());

    // Every identifier names the version; the manifest lists what was published, with versions.
    assert_eq!(
        shown_version(&chain, &format!("{template}:{lt_version}")),
        version
    );
    assert_eq!(shown_version(&chain, &ami), version);
    assert_eq!(shown_version(&chain, &image), version);
    let manifest = chain.json(&["manifest", "show", &version]);
    let publications = manifest["publications"].as_array().unwrap();
    assert!(
        publications.iter().any(|p| p["kind"] == "launch_template"
            && p["id"] == template.as_str()
            && p["version"].as_u64().map(|v| v.to_string()) == Some(lt_version.clone())),
        "{manifest:#}"
    );
    assert!(
        publications.iter().any(|p| p["kind"] == "ssm_parameter"
            && p["name"] == "/chain/both/ami"
            && p["version"].as_u64().is_some()),
        "{manifest:#}"
    );
    assert!(
        publications
            .iter()
            .any(|p| p["kind"] == "channel" && p["action"] == "promote"),
        "{manifest:#}"
    );

    let verified = chain.run(&["verify", &ami]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    // The image of a both-outputs version is signed too, not only its AMIs.
    let verified = chain.json(&["verify", &image]);
    assert_eq!(verified["digest"], image.as_str(), "{verified:#}");
    assert_eq!(verified["verified"], true, "{verified:#}");
}

// ---------------------------------------------------------------------------------------------
// Vendor AMI: SSM parameter → builder instance → publish from the record → attest → manifest

/// `recipes/vendor-hardened.yaml`, pointed at this test's parameter and at the sshd harness.
fn vendor_recipe(dir: &Path, parameter: &str, ssh_port: u16) -> PathBuf {
    let example = repo_root().join("recipes");
    super::common::copy_tree(
        &example.join("vendor-hardened"),
        &dir.join("vendor-hardened"),
    );
    let text = fs_err::read_to_string(example.join("vendor-hardened.yaml")).unwrap();
    let replaced = text
        .replace("/aws/service/debian/release/bookworm/latest/amd64", parameter)
        .replace(
            "      instance_type: t3.small\n      ssh_username: admin\n",
            &format!(
                "      instance_type: t3.small\n      ssh_username: ec2-user\n      ssh_host: 127.0.0.1\n      ssh_port: {ssh_port}\n      ssh_cidr: 127.0.0.1/32\n      user_data: \"#cloud-config\\n\"\n"
            ),
        )
        .replace("/platform/vendor-hardened/ami", "/chain/vendor/ami");
    assert!(
        replaced.contains(parameter)
            && replaced.contains("ssh_port")
            && replaced.contains("/chain/vendor/ami"),
        "recipes/vendor-hardened.yaml changed: update this test"
    );
    let path = dir.join("vendor-hardened.yaml");
    fs_err::write(&path, replaced).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_ami_path_build_on_a_builder_then_publish_attest_and_find_it() {
    let Some(moto) = super::instance::moto().await else {
        return;
    };
    let Some(sshd) = super::instance::Sshd::start() else {
        return;
    };
    let (_older, newest) = moto.vendor_amis().await;
    let parameter = "/vendor/debian/bookworm/latest/amd64";
    moto.aws
        .ssm(super::instance::REGION)
        .put_parameter()
        .name(parameter)
        .value(&newest)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let recipe = vendor_recipe(dir.path(), parameter, sshd.port);
    let store = dir.path().join("store");

    let mut child = moto
        .bake(&store)
        .args(["--output", "json", "build"])
        .arg(&recipe)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    super::instance::authorize_when_imported(&moto, &sshd, &mut child);
    let output = super::instance::finish(child);
    assert!(
        output.status.success(),
        "bake build failed:\n{}\nsshd:\n{}",
        stderr(&output),
        sshd.log()
    );
    let built: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(built["source_ami"], newest.as_str());
    let version = built["version"].as_str().unwrap().to_owned();
    let ami = built["image_id"].as_str().unwrap().to_owned();
    assert!(
        sshd.file("/etc/sysctl.d/90-bake-hardening.conf")
            .is_some_and(|t| t.contains("kernel.kptr_restrict = 2"))
    );

    let run = |args: &[&str]| {
        let output = moto
            .bake(&store)
            .args(["--output", "json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "bake {args:?} failed ({:?}):\n{}",
            output.status.code(),
            stderr(&output)
        );
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let recipe_arg = recipe.to_str().unwrap();
    // Publish takes the AMI from the build record: no --inputs.
    let published = run(&["publish", recipe_arg]);
    assert_eq!(published["version"], version.as_str());
    let value = moto
        .aws
        .ssm(super::instance::REGION)
        .get_parameter()
        .name("/chain/vendor/ami")
        .send()
        .await
        .unwrap();
    assert_eq!(value.parameter().unwrap().value(), Some(ami.as_str()));

    let attested = run(&["attest", &ami]);
    assert_eq!(attested["version"], version.as_str());
    assert!(
        attested["attestations"]["provenance"]["envelope_digest"].is_string(),
        "{attested:#}"
    );
    let images = moto
        .ec2
        .describe_images()
        .image_ids(&ami)
        .send()
        .await
        .unwrap();
    assert_eq!(
        super::instance::tag(images.images()[0].tags(), "bake:provenance"),
        attested["attestations"]["provenance"]["envelope_digest"].as_str()
    );

    let shown = run(&["manifest", "show", &ami]);
    assert_eq!(shown["version"], version.as_str());
    assert_eq!(shown["outputs"]["amis"][0]["image_id"], ami.as_str());
    assert_eq!(shown["inputs"]["base"]["image_id"], newest.as_str());
    assert!(
        shown["publications"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "ssm_parameter" && p["name"] == "/chain/vendor/ami"),
        "{shown:#}"
    );
}

/// Every command that plans a recipe resolves an `ami` base the same way: before the store is
/// asked for anything, the source AMI is looked up (here nothing is built, so each says so).
#[tokio::test]
async fn every_command_plans_a_recipe_with_an_ami_base() {
    let Some(moto) = super::instance::moto().await else {
        return;
    };
    let (_older, newest) = moto.vendor_amis().await;
    let parameter = "/vendor/debian/bookworm/plan/amd64";
    moto.aws
        .ssm(super::instance::REGION)
        .put_parameter()
        .name(parameter)
        .value(&newest)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let recipe = vendor_recipe(dir.path(), parameter, 22);
    let recipe = recipe.to_str().unwrap();
    let store = dir.path().join("store");
    let planned = moto
        .bake(&store)
        .args(["--output", "json", "plan", recipe])
        .output()
        .unwrap();
    assert!(planned.status.success(), "{}", stderr(&planned));
    let plan: Value = serde_json::from_slice(&planned.stdout).unwrap();
    let version = plan["version"].as_str().unwrap();
    let layout = dir.path().join("layout");
    for args in [
        vec!["publish", recipe, "--dry-run"],
        vec!["push", recipe],
        vec!["export", recipe, "--oci-layout", layout.to_str().unwrap()],
        vec!["attest", recipe],
    ] {
        let output = moto.bake(&store).args(&args).output().unwrap();
        let err = stderr(&output);
        assert!(
            !output.status.success(),
            "{args:?} succeeded with nothing built"
        );
        assert!(
            !err.contains("has not resolved") && err.contains(version),
            "{args:?} did not plan the recipe to its version {version}:\n{err}"
        );
    }
}
