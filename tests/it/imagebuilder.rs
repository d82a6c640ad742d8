//! EC2 Image Builder as bake's build engine, driven through the `bake` binary against the
//! Image Builder stand-in (`tests/tools/imagebuilder_standin.py`, in front of moto): builds
//! move through their states every half second, register their AMIs in moto, and fail on
//! purpose when a component document contains `BAKE_STANDIN_FAIL_BUILD`.
//!
//! Each test has its own moto account; the stand-in's state is read back through its own
//! Image Builder API, moto's through EC2 and SSM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::common::{bake, repo_root, service, stderr, stdout};
use super::instance::{Moto, REGION};

/// The test account's Image Builder and moto, a store and a recipe directory.
struct Harness {
    moto: Moto,
    endpoint: String,
    dir: tempfile::TempDir,
}

impl Harness {
    /// Everything a build needs: the stand-in, an account with a vendor AMI behind SSM
    /// parameter `parameter`, and Image Builder's default instance profile.
    async fn start(parameter: &str) -> Option<Harness> {
        let endpoint = service("BAKE_TEST_IMAGEBUILDER_ENDPOINT")?;
        let python = service("BAKE_TEST_PYTHON")?;
        let moto_endpoint = service("BAKE_TEST_MOTO_ENDPOINT")?;
        let moto = super::instance::moto().await?;
        let (_older, newest) = moto.vendor_amis().await;
        moto.aws
            .ssm(REGION)
            .put_parameter()
            .name(parameter)
            .value(&newest)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .send()
            .await
            .unwrap();
        create_instance_profile(
            &python,
            &moto_endpoint,
            &moto.account,
            bake::imagebuilder::compile::DEFAULT_INSTANCE_PROFILE,
        );
        Some(Harness {
            moto,
            endpoint,
            dir: tempfile::tempdir().unwrap(),
        })
    }

    fn store(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `bake` against the stand-in in this test's account, with store `store`.
    fn bake(&self, store: &str) -> Command {
        let mut command = bake();
        command
            .env("BAKE_AWS_ENDPOINT_URL", &self.endpoint)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &self.moto.account)
            .env("BAKE_AWS_REGION", REGION)
            .env("BAKE_AWS_POLL_INTERVAL", "100ms")
            .env("BAKE_STORE", self.store(store))
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL");
        command
    }

    /// Runs `bake --output json ARGS` with `store`, asserting success.
    fn json(&self, store: &str, args: &[&str]) -> Value {
        let output = self
            .bake(store)
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

    /// An Image Builder client of this account, through the stand-in.
    async fn imagebuilder(&self) -> aws_sdk_imagebuilder::Client {
        bake::aws::Aws::load(&bake::aws::AwsSettings {
            region: Some(REGION.into()),
            profile: None,
            endpoint_url: Some(self.endpoint.clone()),
            emulator_account: Some(self.moto.account.clone()),
            emulator: Some(bake::aws::Emulator::Moto),
        })
        .await
        .imagebuilder(REGION)
    }

    /// The names of this account's components and the ARNs of its images' builds.
    async fn inventory(&self) -> (Vec<String>, Vec<String>) {
        let client = self.imagebuilder().await;
        let components = client
            .list_components()
            .owner(aws_sdk_imagebuilder::types::Ownership::SelfValue)
            .send()
            .await
            .unwrap()
            .component_version_list()
            .iter()
            .filter_map(|c| c.name().map(str::to_owned))
            .collect();
        let mut images = Vec::new();
        for version in client
            .list_images()
            .owner(aws_sdk_imagebuilder::types::Ownership::SelfValue)
            .send()
            .await
            .unwrap()
            .image_version_list()
        {
            let builds = client
                .list_image_build_versions()
                .image_version_arn(version.arn().unwrap())
                .send()
                .await
                .unwrap();
            images.extend(
                builds
                    .image_summary_list()
                    .iter()
                    .filter_map(|s| s.arn().map(str::to_owned)),
            );
        }
        (components, images)
    }
}

/// Creates an IAM instance profile in moto (the stand-in checks that an infrastructure
/// configuration's profile exists), with the venv's boto3: bake has no IAM client.
fn create_instance_profile(python: &str, endpoint: &str, account: &str, name: &str) {
    let script = r#"
import sys, boto3
endpoint, account, name = sys.argv[1:4]
iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
def header(request, **kwargs):
    request.headers["x-moto-account-id"] = account
iam.meta.events.register("before-sign.iam.*", header)
iam.create_instance_profile(InstanceProfileName=name)
"#;
    let output = Command::new(python)
        .args(["-c", script, endpoint, account, name])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "creating the instance profile failed: {}",
        stderr(&output)
    );
}

/// `recipes/vendor-hardened.yaml` in `dir`, its base pointed at `parameter`, publishing to this
/// test's SSM parameter and channel; `extra_step` (YAML list items) is added to its
/// provisioners.
fn vendor_recipe(dir: &Path, parameter: &str, extra_step: &str) -> PathBuf {
    let example = repo_root().join("recipes");
    super::common::copy_tree(
        &example.join("vendor-hardened"),
        &dir.join("vendor-hardened"),
    );
    let text = fs_err::read_to_string(example.join("vendor-hardened.yaml")).unwrap();
    let replaced = text
        .replace(
            "/aws/service/debian/release/bookworm/latest/amd64",
            parameter,
        )
        .replace(
            "    - name: /platform/vendor-hardened/ami\n",
            "    - name: /ib/vendor/ami\n  channels: [prod]\n",
        )
        .replace("\ntests:\n", &format!("{extra_step}\ntests:\n"));
    assert!(
        replaced.contains(parameter) && replaced.contains("channels: [prod]"),
        "recipes/vendor-hardened.yaml changed: update this test"
    );
    let path = dir.join("vendor-hardened.yaml");
    fs_err::write(&path, replaced).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_ami_recipe_builds_on_image_builder_then_publishes_and_promotes() {
    let parameter = "/ib/vendor/bookworm";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let recipe = vendor_recipe(h.dir.path(), parameter, "");
    let recipe = recipe.to_str().unwrap();

    let built = h.json("store", &["build", recipe, "--engine", "imagebuilder"]);
    let version = built["version"].as_str().unwrap().to_owned();
    let ami = built["regions"][0]["image_id"].as_str().unwrap().to_owned();
    assert!(ami.starts_with("ami-"), "{built:#}");
    assert_eq!(built["regions"][0]["region"], REGION);
    assert_eq!(built["started_build"], true);
    let image_arn = built["image_arn"].as_str().unwrap().to_owned();
    assert!(image_arn.contains(":image/vendor-hardened-"), "{built:#}");
    // Two components (the file and the script), the test component, the recipe and both
    // configurations.
    assert_eq!(built["created"].as_array().unwrap().len(), 6, "{built:#}");
    assert_eq!(built["workflow_executions"].as_array().unwrap().len(), 2);

    // The AMI is in EC2, tagged with the version (the distribution's AMI tags).
    let images = h
        .moto
        .ec2
        .describe_images()
        .image_ids(&ami)
        .send()
        .await
        .unwrap();
    assert_eq!(
        super::instance::tag(images.images()[0].tags(), "bake:version"),
        Some(version.as_str())
    );

    // The record and manifest name the AMI and the source.
    let manifest = h.json("store", &["manifest", "show", &ami]);
    assert_eq!(manifest["version"], version.as_str());
    assert_eq!(manifest["outputs"]["amis"][0]["image_id"], ami.as_str());

    // publish and promote work unchanged, from the build record. With a channel declared,
    // publish makes the version available and promote moves the pointers.
    let published = h.json("store", &["publish", recipe]);
    assert_eq!(published["version"], version.as_str());
    h.json("store", &["promote", recipe, &version, "--channel", "prod"]);
    let value = h
        .moto
        .aws
        .ssm(REGION)
        .get_parameter()
        .name("/ib/vendor/ami")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e:?}\npublished: {published:#}"));
    assert_eq!(value.parameter().unwrap().value(), Some(ami.as_str()));
    let pinned = h.json("store", &["pin", recipe, "--channel", "prod"]);
    assert_eq!(pinned["references"]["version"], version.as_str());

    // The provenance says Image Builder ran the build: its builder id, and the image ARN and
    // workflow executions as the invocation.
    let attested = h.json("store", &["attest", &ami]);
    let envelope = attested["attestations"]["provenance"]["envelope_digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_owned();
    let envelope: Value = serde_json::from_slice(
        &fs_err::read(h.store("store").join("blobs/sha256").join(envelope)).unwrap(),
    )
    .unwrap();
    let statement: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            envelope["payload"].as_str().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let run = &statement["predicate"]["runDetails"];
    assert_eq!(
        run["builder"]["id"],
        bake::provenance::slsa::IMAGEBUILDER_BUILDER_ID,
        "{statement:#}"
    );
    let invocation = run["metadata"]["invocationId"].as_str().unwrap();
    assert!(invocation.starts_with(&image_arn), "{statement:#}");
    for execution in built["workflow_executions"].as_array().unwrap() {
        assert!(
            invocation.contains(execution.as_str().unwrap()),
            "{statement:#}"
        );
    }

    // A second build of the version from an empty store (another CI runner) finds everything:
    // no resource is created, no build started, and its record names the same AMI.
    let before = h.inventory().await;
    assert_eq!(before.1, std::slice::from_ref(&image_arn));
    let again = h.json(
        "other-store",
        &["build", recipe, "--engine", "imagebuilder"],
    );
    assert_eq!(again["created"], serde_json::json!([]), "{again:#}");
    assert_eq!(again["started_build"], false);
    assert_eq!(again["image_arn"], image_arn.as_str());
    assert_eq!(again["regions"][0]["image_id"], ami.as_str());
    assert_eq!(h.inventory().await, before);
    let shown = h.json("other-store", &["manifest", "show", &version]);
    assert_eq!(shown["outputs"]["amis"][0]["image_id"], ami.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_reports_the_reason_and_the_logs_and_keeps_the_resources() {
    let parameter = "/ib/vendor/failing";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let failing =
        "  - shell:\n      name: breaks\n      inline: echo BAKE_STANDIN_FAIL_BUILD; exit 1\n";
    let recipe = vendor_recipe(h.dir.path(), parameter, failing);
    let output = h
        .bake("store")
        .args([
            "build",
            recipe.to_str().unwrap(),
            "--engine",
            "imagebuilder",
        ])
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("failed: Workflow Execution ID")
            && err.contains("exited with status 1 in its build phase"),
        "{err}"
    );
    assert!(
        err.contains("CloudWatch Logs group /aws/imagebuilder/"),
        "{err}"
    );
    // The build's step that failed was reported as it happened.
    assert!(err.contains("ApplyBuildComponents failed"), "{err}");
    // Nothing the version owns was removed: its components and the failed image remain.
    let (components, images) = h.inventory().await;
    assert_eq!(components.len(), 4, "{components:?}");
    assert_eq!(images.len(), 1);
    // No record: the version is not built.
    assert!(
        !h.store("store").join("records").exists() || {
            fs_err::read_dir(h.store("store").join("records"))
                .unwrap()
                .next()
                .is_none()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_image_builder_build() {
    let parameter = "/ib/vendor/cancel";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let recipe = vendor_recipe(h.dir.path(), parameter, "");
    let mut child = h
        .bake("store")
        .args([
            "build",
            recipe.to_str().unwrap(),
            "--engine",
            "imagebuilder",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the build is running, then interrupt it as a terminal's Ctrl-C would.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in lines.by_ref() {
        let line = line.unwrap();
        let building = line.contains("image BUILDING");
        seen.push(line);
        if building {
            break;
        }
        assert!(Instant::now() < deadline, "no BUILDING state: {seen:#?}");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    let err = format!("{}\n{}", seen.join("\n"), rest.join("\n"));
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("the build was interrupted"), "{err}");
    let (_, images) = h.inventory().await;
    assert_eq!(images.len(), 1);
    let image = h
        .imagebuilder()
        .await
        .get_image()
        .image_build_version_arn(&images[0])
        .send()
        .await
        .unwrap();
    assert_eq!(
        image.image().unwrap().state().unwrap().status(),
        Some(&aws_sdk_imagebuilder::types::ImageStatus::Cancelled)
    );
}

// ---------------------------------------------------------------------------------------------
// bake export imagebuilder

/// The export fixture, with its base pointed at `parameter`.
fn export_recipe(dir: &Path, parameter: &str, extra_step: &str) -> PathBuf {
    let fixtures = repo_root().join("tests/fixtures/imagebuilder");
    super::common::copy_tree(&fixtures.join("files"), &dir.join("files"));
    let text = fs_err::read_to_string(fixtures.join("export.yaml"))
        .unwrap()
        .replace("/bake-test/export/ami", parameter)
        .replace("provisioners:\n", &format!("provisioners:\n{extra_step}"));
    let path = dir.join("export.yaml");
    fs_err::write(&path, text).unwrap();
    path
}

const SECRET: &str = "s3cr3t-ib-value";

/// Every file under `dir`, with its text.
fn files_under(dir: &Path) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            (
                e.path().strip_prefix(dir).unwrap().display().to_string(),
                fs_err::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_stable_documents_that_follow_the_awstoe_format_and_no_secret() {
    let parameter = "/bake-test/export/ami";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let Some(python) = service("BAKE_TEST_PYTHON") else {
        return;
    };
    let recipe = export_recipe(h.dir.path(), parameter, "");
    let out = h.dir.path().join("export");
    let output = h
        .bake("store")
        .env("BAKE_VAR_token", SECRET)
        .args(["export", "imagebuilder", recipe.to_str().unwrap()])
        .arg(&out)
        .args(["--schedule", "cron(0 3 ? * MON *)"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stdout(&output).contains(SECRET) && !stderr(&output).contains(SECRET));
    let files = files_under(&out);
    for (path, text) in &files {
        assert!(!text.contains(SECRET), "{path} holds the secret");
    }

    // Every document follows AWS's component document format.
    let documents: Vec<PathBuf> = files
        .iter()
        .filter(|(p, _)| p.ends_with(".yaml"))
        .map(|(p, _)| out.join(p))
        .collect();
    assert_eq!(documents.len(), 4, "{files:?}");
    let checked = Command::new(&python)
        .arg(repo_root().join("tests/tools/awstoe_schema.py"))
        .arg(repo_root().join("tests/fixtures/imagebuilder/awstoe-component.schema.json"))
        .args(&documents)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}{}",
        stdout(&checked),
        stderr(&checked)
    );

    // Stable: the same recipe exports the same bytes; the snapshot shows them with the moving
    // parts (the source AMI, and so the version) filtered.
    let again = h.dir.path().join("again");
    let output = h
        .bake("store")
        .env("BAKE_VAR_token", SECRET)
        .args(["export", "imagebuilder", recipe.to_str().unwrap()])
        .arg(&again)
        .args(["--schedule", "cron(0 3 ? * MON *)"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(files_under(&again), files);
    let shown: String = files
        .iter()
        .map(|(path, text)| format!("=== {path}\n{text}\n"))
        .collect();
    insta::with_settings!({filters => vec![
        (r"sha256:[0-9a-f]{64}", "sha256:[VERSION]"),
        (r"export-test-[0-9a-f]{12}", "export-test-[SHORT]"),
        (r#""clientToken": "[0-9a-f]{32}""#, r#""clientToken": "[TOKEN]""#),
        (r"ami-[0-9a-f]+", "ami-[ID]"),
        (r"-[0-9a-f]{12}\b", "-[SHORT]"),
    ]}, {
        insta::assert_snapshot!("export_imagebuilder", shown);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_uses_a_sensitive_variable_is_refused_without_showing_it() {
    let parameter = "/bake-test/export/secret";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let leaking =
        "  - shell:\n      name: uses the token\n      inline: echo '{{var.token}}' >/etc/token\n";
    let recipe = export_recipe(h.dir.path(), parameter, leaking);
    let out = h.dir.path().join("export");
    let output = h
        .bake("store")
        .env("BAKE_VAR_token", SECRET)
        .args(["export", "imagebuilder", recipe.to_str().unwrap()])
        .arg(&out)
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "provisioner `uses the token` of recipe `export-test` uses a sensitive variable"
        ),
        "{err}"
    );
    assert!(!err.contains(SECRET) && !stdout(&output).contains(SECRET));
    assert!(!out.exists(), "nothing is written for a refused recipe");
    // The build refuses it the same way, before creating anything.
    let output = h
        .bake("store")
        .env("BAKE_VAR_token", SECRET)
        .args([
            "build",
            recipe.to_str().unwrap(),
            "--engine",
            "imagebuilder",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(!stderr(&output).contains(SECRET));
    assert_eq!(h.inventory().await, (vec![], vec![]));
}

#[tokio::test]
async fn recipes_without_a_source_ami_are_refused_with_a_hint() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let output = bake()
        .env("BAKE_AWS_ENDPOINT_URL", &endpoint)
        .env("BAKE_AWS_EMULATOR", "moto")
        .env("BAKE_AWS_EMULATOR_ACCOUNT", super::common::fresh_account())
        .env("BAKE_AWS_REGION", REGION)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("BAKE_STORE", dir.path().join("store"))
        .args(["export", "imagebuilder", "recipes/debian-ami.yaml"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "recipe `debian-ami` starts from `base: bootstrap`, and Image Builder builds on an AMI"
        ),
        "{err}"
    );
    assert!(err.contains("hint: give the recipe an `ami` base"), "{err}");
}

/// What Image Builder's build phase runs is what the local build does. The example AMI recipe's
/// provisioners, applied by the namespace runner to a Debian root, and the build-phase commands
/// `bake export imagebuilder` compiles them to, run by the same runner (under bash, as AWSTOE's
/// `ExecuteBash` runs them) on the same root, leave the same files: paths, types, modes, owners,
/// contents and link targets. `recipes/vendor-hardened.yaml` is the only example recipe whose base
/// is an AMI, so the only one Image Builder can build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compiled_build_phase_leaves_the_files_the_local_build_leaves() {
    if !super::skip::root("building images: namespaces, chown") {
        return;
    }
    let parameter = "/ib/vendor/twins";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let dir = h.dir.path();
    let recipe = vendor_recipe(dir, parameter, "");
    let exported = dir.join("export");
    let output = h
        .bake("store")
        .args(["export", "imagebuilder", recipe.to_str().unwrap()])
        .arg(&exported)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));

    // The build phase of every component, in the image recipe's order, as one script per step.
    let plan: Value =
        serde_json::from_slice(&fs_err::read(exported.join("plan.json")).unwrap()).unwrap();
    let mut steps = Vec::new();
    for call in plan["calls"].as_array().unwrap() {
        if call["operation"] != "CreateComponent" {
            continue;
        }
        let text =
            fs_err::read_to_string(exported.join(call["document"].as_str().unwrap())).unwrap();
        let document: Value = serde_saphyr::from_str(&text).unwrap();
        for phase in document["phases"].as_array().unwrap() {
            if phase["name"] != "build" {
                continue;
            }
            for step in phase["steps"].as_array().unwrap() {
                assert_eq!(step["action"], "ExecuteBash", "{text}");
                let commands: Vec<&str> = step["inputs"]["commands"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap())
                    .collect();
                steps.push(commands.join("\n"));
            }
        }
    }
    assert_eq!(steps.len(), 2, "the file and the script: {plan:#}");

    // Two twins of the recipe on the same Debian root (with procps, which owns /etc/sysctl.d, as
    // on Debian's AMI): its own provisioners, and the compiled steps. Each compiled step runs as
    // AWSTOE runs it: its commands in one bash script.
    let example = fs_err::read_to_string(repo_root().join("recipes/vendor-hardened.yaml")).unwrap();
    let provisioners =
        &example[example.find("provisioners:\n").unwrap()..example.find("\ntests:\n").unwrap()];
    let twin = |name: &str, provisioners: &str| {
        format!(
            "bake: 1\nname: {name}\nbase:\n  bootstrap:\n    suite: bookworm\n    variant: minbase\n    packages: [procps]\n\
             build:\n  source_date_epoch: 1700000000\n{provisioners}\noutputs:\n  oci:\n    cmd: [/bin/sh]\n"
        )
    };
    fs_err::write(dir.join("local.yaml"), twin("twin-local", provisioners)).unwrap();
    let mut compiled = String::from("provisioners:\n");
    fs_err::create_dir_all(dir.join("compiled")).unwrap();
    for (i, commands) in steps.iter().enumerate() {
        let script = format!("compiled/step{i}.sh");
        fs_err::write(
            dir.join(&script),
            format!(
                "#!/bin/bash\nexec bash -e -s <<'BAKE_TWIN_STEP'\n{commands}\nBAKE_TWIN_STEP\n"
            ),
        )
        .unwrap();
        compiled.push_str(&format!(
            "  - shell:\n      name: compiled step {i}\n      script: {script}\n"
        ));
    }
    fs_err::write(dir.join("compiled.yaml"), twin("twin-compiled", &compiled)).unwrap();

    let mut roots = Vec::new();
    for name in ["local", "compiled"] {
        let recipe = format!("{name}.yaml");
        let layout = dir.join(format!("oci-{name}"));
        for args in [
            vec!["build", recipe.as_str()],
            vec![
                "export",
                recipe.as_str(),
                "--oci-layout",
                layout.to_str().unwrap(),
                "--tag",
                "twin:t",
            ],
        ] {
            let output = h
                .bake("store")
                .current_dir(dir)
                .args(&args)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "bake {args:?}: {}",
                stderr(&output)
            );
        }
        roots.push(super::build::umoci_unpack(
            &layout,
            "t",
            &dir.join(format!("bundle-{name}")),
        ));
    }
    let local = tree(&roots[0]);
    let compiled = tree(&roots[1]);
    let differences: Vec<String> = local
        .iter()
        .filter(|(path, entry)| compiled.get(*path) != Some(entry))
        .map(|(path, entry)| format!("{path}: local {entry}, compiled {:?}", compiled.get(path)))
        .chain(
            compiled
                .iter()
                .filter(|(path, _)| !local.contains_key(*path))
                .map(|(path, entry)| format!("{path}: only compiled, {entry}")),
        )
        .collect();
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    // And the recipe's changes are there at all.
    for changed in [
        "/etc/ssh/sshd_config.d/50-bake-hardening.conf",
        "/etc/sysctl.d/90-bake-hardening.conf",
        "/etc/security/limits.d/90-bake-nocore.conf",
    ] {
        assert!(local.contains_key(changed), "{changed}");
    }
}

/// Every entry under `root` (mtimes aside): its type, mode, owner, and its content's SHA-256 or
/// its link target.
fn tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    use sha2::Digest as _;
    use std::os::unix::fs::MetadataExt as _;
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(Result::unwrap)
        .map(|entry| {
            let meta = entry.metadata().unwrap();
            let kind = if entry.file_type().is_symlink() {
                format!(
                    "link -> {}",
                    fs_err::read_link(entry.path()).unwrap().display()
                )
            } else if entry.file_type().is_file() {
                let bytes = fs_err::read(entry.path()).unwrap();
                format!("file {}", hex::encode(sha2::Sha256::digest(&bytes)))
            } else if entry.file_type().is_dir() {
                "dir".to_owned()
            } else {
                format!("special {:o}", meta.mode() & 0o170000)
            };
            let path = format!("/{}", entry.path().strip_prefix(root).unwrap().display());
            (
                path,
                format!(
                    "{kind} mode {:o} owner {}:{}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid()
                ),
            )
        })
        .collect()
}

/// `bake import imagebuilder`: an image Image Builder made for the recipe's version (here by a
/// build through another store, as an exported pipeline would make it) is recorded by a store
/// that never saw it, after the recipe's source parameter moved on. The version is the one the
/// image was built as (planned on the image's parent AMI), and the record and manifest name its
/// AMI, so provenance covers it. The image of another version is refused, naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_records_an_image_made_elsewhere_as_the_version_it_was_built_as() {
    let parameter = "/ib/vendor/import";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let recipe = vendor_recipe(h.dir.path(), parameter, "");
    let recipe = recipe.to_str().unwrap();
    let built = h.json("builder", &["build", recipe, "--engine", "imagebuilder"]);
    let version = built["version"].as_str().unwrap();
    let image_arn = built["image_arn"].as_str().unwrap();
    let ami = built["regions"][0]["image_id"].as_str().unwrap();

    // The source parameter moves on: a plan today gives another version.
    let (_, newer) = h.moto.vendor_amis().await;
    h.moto
        .aws
        .ssm(REGION)
        .put_parameter()
        .name(parameter)
        .value(&newer)
        .overwrite(true)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let planned = h.json("store", &["plan", recipe]);
    assert_ne!(planned["version"], version, "{planned:#}");

    let before = h.inventory().await;
    let imported = h.json(
        "store",
        &["import", "imagebuilder", image_arn, "--recipe", recipe],
    );
    assert_eq!(imported["version"], version, "{imported:#}");
    assert_eq!(imported["image_arn"], image_arn);
    assert_eq!(imported["regions"][0]["image_id"], ami);
    assert_eq!(imported["created"], serde_json::json!([]));
    assert_eq!(imported["started_build"], false);
    assert_eq!(
        imported["workflow_executions"], built["workflow_executions"],
        "{imported:#}"
    );
    assert_eq!(h.inventory().await, before, "an import creates nothing");
    let shown = h.json("store", &["manifest", "show", ami]);
    assert_eq!(shown["version"], version);
    assert_eq!(shown["outputs"]["amis"][0]["image_id"], ami);
    // Provenance covers it (`publish` plans today's version, so it waits for the next build).
    let attested = h.json("store", &["attest", ami]);
    assert_eq!(attested["version"], version, "{attested:#}");

    // A changed recipe is another version: its image recipe is not the one the image came from.
    let changed_dir = h.dir.path().join("changed");
    fs_err::create_dir_all(&changed_dir).unwrap();
    let changed = vendor_recipe(
        &changed_dir,
        parameter,
        "  - shell:\n      name: one more step\n      inline: echo more >/etc/more\n",
    );
    let output = h
        .bake("other")
        .args(["import", "imagebuilder", image_arn, "--recipe"])
        .arg(&changed)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let shown = stderr(&output);
    assert!(
        shown.contains("is not version") && shown.contains(image_arn),
        "{shown}"
    );
    // And text that is not an image ARN is named as such.
    let output = h
        .bake("other")
        .args([
            "import",
            "imagebuilder",
            "ami-0123456789abcdef0",
            "--recipe",
            recipe,
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("`ami-0123456789abcdef0` is not an Image Builder image ARN"),
        "{}",
        stderr(&output)
    );
}

// ---------------------------------------------------------------------------------------------
// bake cleanup

impl Harness {
    /// Every Image Builder resource of this account: `KIND NAME` for the components, recipes
    /// and configurations, `image ARN STATUS` for each build.
    async fn everything(&self) -> std::collections::BTreeSet<String> {
        use aws_sdk_imagebuilder::types::Ownership;
        let client = self.imagebuilder().await;
        let mut all = std::collections::BTreeSet::new();
        for c in client
            .list_components()
            .owner(Ownership::SelfValue)
            .send()
            .await
            .unwrap()
            .component_version_list()
        {
            all.insert(format!("component {}", c.name().unwrap()));
        }
        for r in client
            .list_image_recipes()
            .owner(Ownership::SelfValue)
            .send()
            .await
            .unwrap()
            .image_recipe_summary_list()
        {
            all.insert(format!("image-recipe {}", r.name().unwrap()));
        }
        for r in client
            .list_infrastructure_configurations()
            .send()
            .await
            .unwrap()
            .infrastructure_configuration_summary_list()
        {
            all.insert(format!("infrastructure {}", r.name().unwrap()));
        }
        for r in client
            .list_distribution_configurations()
            .send()
            .await
            .unwrap()
            .distribution_configuration_summary_list()
        {
            all.insert(format!("distribution {}", r.name().unwrap()));
        }
        for arn in self.inventory().await.1 {
            let image = client
                .get_image()
                .image_build_version_arn(&arn)
                .send()
                .await
                .unwrap();
            let status = image.image().unwrap().state().unwrap().status().unwrap();
            all.insert(format!("image {arn} {}", status.as_str()));
        }
        all
    }

    /// Runs `bake ARGS` with `store`, returning the output (not asserting success).
    fn run(&self, store: &str, args: &[&str]) -> std::process::Output {
        self.bake(store).args(args).output().unwrap()
    }
}

/// A recipe variant in its own directory: another version of the example.
fn variant(h: &Harness, parameter: &str, name: &str, step: &str, edit: &str) -> String {
    let dir = h.dir.path().join(name);
    fs_err::create_dir_all(&dir).unwrap();
    let path = vendor_recipe(&dir, parameter, step);
    if !edit.is_empty() {
        let text = fs_err::read_to_string(&path).unwrap();
        let edited = text.replace(
            "      ssh_username: admin\n",
            &format!("      ssh_username: admin\n{edit}"),
        );
        assert_ne!(
            text, edited,
            "recipes/vendor-hardened.yaml changed: update this test"
        );
        fs_err::write(&path, edited).unwrap();
    }
    path.to_str().unwrap().to_owned()
}

fn lines_with<'a>(report: &'a str, words: &[&str]) -> Vec<&'a str> {
    report
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .collect()
}

/// `bake cleanup` removes what Image Builder runs left without a build (a failed image and its
/// version's resources; what a run created before failing without an image), reports them with
/// the EC2 resources' report lines (`would remove` on a dry run), and never touches a built
/// version's resources, a version still building (a killed run's build goes on in AWS), an
/// untagged resource, or, without `--older-than`, a version this store has no journal for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_what_failed_and_killed_image_builder_runs_left_and_nothing_built() {
    let parameter = "/ib/vendor/cleanup";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let new = |before: &std::collections::BTreeSet<String>,
               after: &std::collections::BTreeSet<String>| {
        after
            .difference(before)
            .cloned()
            .collect::<std::collections::BTreeSet<String>>()
    };
    // A resource bake did not make (no bake tags), named like bake's.
    let client = h.imagebuilder().await;
    client
        .create_component()
        .name("vendor-hardened-0123456789ab-1")
        .semantic_version("1.0.0")
        .platform(aws_sdk_imagebuilder::types::Platform::Linux)
        .data("name: team\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps: []\n")
        .client_token("team-component")
        .send()
        .await
        .unwrap();
    let untagged = h.everything().await;

    // a: built, recorded.
    let built_recipe = variant(&h, parameter, "built", "", "");
    let built_version = h.json(
        "store",
        &["build", &built_recipe, "--engine", "imagebuilder"],
    )["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let after_built = h.everything().await;
    let built = new(&untagged, &after_built);
    assert_eq!(built.len(), 7, "{built:#?}"); // 3 components, recipe, 2 configurations, image

    // b: its image failed.
    let failed_recipe = variant(
        &h,
        parameter,
        "failed",
        "  - shell:\n      name: breaks\n      inline: echo BAKE_STANDIN_FAIL_BUILD; exit 1\n",
        "",
    );
    let output = h.run(
        "store",
        &["build", &failed_recipe, "--engine", "imagebuilder"],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let after_failed = h.everything().await;
    let failed = new(&after_built, &after_failed);
    assert_eq!(failed.len(), 8, "{failed:#?}");
    assert!(failed.iter().any(|r| r.ends_with(" FAILED")), "{failed:#?}");

    // c: failed before its image existed (its instance profile does not exist).
    let early_recipe = variant(
        &h,
        parameter,
        "early",
        "",
        "      iam_instance_profile: no-such-profile\n",
    );
    let output = h.run(
        "store",
        &["build", &early_recipe, "--engine", "imagebuilder"],
    );
    assert!(!output.status.success(), "{}", stderr(&output));
    let after_early = h.everything().await;
    let early = new(&after_failed, &after_early);
    assert_eq!(early.len(), 4, "components and recipe only: {early:#?}");

    // d: killed while its image builds; the build goes on in Image Builder.
    let killed_recipe = variant(
        &h,
        parameter,
        "killed",
        "  - shell:\n      name: slow\n      inline: echo killed\n",
        "",
    );
    let mut child = h
        .bake("store")
        .args(["build", &killed_recipe, "--engine", "imagebuilder"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let building = line.contains("image BUILDING");
        seen.push(line);
        if building {
            break;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    assert!(seen.last().unwrap().contains("image BUILDING"), "{seen:#?}");
    let after_killed = h.everything().await;
    let killed: std::collections::BTreeSet<String> = new(&after_early, &after_killed)
        .into_iter()
        .filter(|r| !r.starts_with("image "))
        .collect();
    assert_eq!(killed.len(), 7, "{killed:#?}");

    // e: another machine's failed build: tagged, no journal in this store.
    let elsewhere_recipe = variant(
        &h,
        parameter,
        "elsewhere",
        "  - shell:\n      name: breaks too\n      inline: echo BAKE_STANDIN_FAIL_BUILD; exit 2\n",
        "",
    );
    let output = h.run(
        "other",
        &["build", &elsewhere_recipe, "--engine", "imagebuilder"],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let before = h.everything().await;
    let name_of = |resource: &str| resource.split(' ').nth(1).unwrap().to_owned();
    let elsewhere: Vec<String> = new(&after_killed, &before)
        .into_iter()
        .filter(|r| !r.starts_with("image ") || r.ends_with(" FAILED"))
        .filter(|r| !killed.contains(r))
        .collect();
    assert_eq!(elsewhere.len(), 8, "{elsewhere:#?}");

    // A dry run lists and removes nothing.
    let dry = h.run("store", &["cleanup", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let report = stdout(&dry);
    // b: 4 components, the recipe, both configurations and the image; c: 3 components and the
    // recipe.
    assert_eq!(
        report.matches("would remove  Image Builder").count(),
        12,
        "{report}"
    );
    for resource in failed.iter().chain(&early) {
        let name = name_of(resource);
        let name = name.rsplit('/').nth(2).map_or(name.as_str(), |n| n);
        assert!(
            !lines_with(&report, &["would remove", name]).is_empty(),
            "{name}: {report}"
        );
    }
    // d is kept: still building (or built by now).
    assert!(
        lines_with(&report, &["kept  Image Builder", "run-"])
            .iter()
            .all(|l| l.contains("is being built") || l.contains("is built")),
        "{report}"
    );
    assert_eq!(report.matches("kept  Image Builder").count(), 8, "{report}");
    // e: skipped, with the way to remove it.
    assert_eq!(
        lines_with(&report, &["skipped  Image Builder", "pass --older-than"]).len(),
        8,
        "{report}"
    );
    // a, and the untagged component, are not even mentioned.
    for resource in built.iter().chain(&untagged) {
        let name = name_of(resource);
        assert!(!report.contains(&name), "{name}: {report}");
    }
    assert_eq!(h.everything().await, before, "a dry run removes nothing");

    // The cleanup removes b and c, and leaves the rest.
    let cleaned = h.run("store", &["cleanup"]);
    assert!(cleaned.status.success(), "{}", stderr(&cleaned));
    let report = stdout(&cleaned);
    assert_eq!(
        report.matches("removed  Image Builder").count(),
        12,
        "{report}"
    );
    // The image went before the recipe, the recipe before its components.
    let first = |what: &str| {
        report
            .find(&format!("removed  Image Builder {what}"))
            .unwrap()
    };
    assert!(first("image arn:") < first("image recipe"), "{report}");
    assert!(first("image recipe") < first("component"), "{report}");
    let after = h.everything().await;
    let expected: std::collections::BTreeSet<String> = before
        .iter()
        .filter(|r| !failed.contains(*r) && !early.contains(*r))
        .cloned()
        .collect();
    // d's image may have finished meanwhile: compare without images' states.
    let strip = |set: &std::collections::BTreeSet<String>| {
        set.iter()
            .map(|r| r.split(' ').take(2).collect::<Vec<_>>().join(" "))
            .collect::<std::collections::BTreeSet<String>>()
    };
    assert_eq!(strip(&after), strip(&expected), "{report}");
    // The record of a still answers.
    let shown = h.json("store", &["manifest", "show", &built_version]);
    assert_eq!(shown["version"], built_version.as_str(), "{shown:#}");

    // Once d's build is over, a is built and d too: a cleanup with --older-than removes e (old
    // enough now), and nothing else.
    let deadline = Instant::now() + Duration::from_secs(60);
    while h
        .everything()
        .await
        .iter()
        .any(|r| r.starts_with("image ") && !r.ends_with(" AVAILABLE") && !r.ends_with(" FAILED"))
    {
        assert!(Instant::now() < deadline, "d's build did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let swept = h.run("store", &["cleanup", "--older-than", "1s"]);
    assert!(swept.status.success(), "{}", stderr(&swept));
    let report = stdout(&swept);
    assert_eq!(
        report.matches("removed  Image Builder").count(),
        8,
        "{report}"
    );
    for resource in &elsewhere {
        let name = name_of(resource);
        let name = name.rsplit('/').nth(2).map_or(name.as_str(), |n| n);
        assert!(
            !lines_with(&report, &["removed", name, "never built"]).is_empty(),
            "{name}: {report}"
        );
    }
    let left = h.everything().await;
    assert!(
        strip(&left).is_superset(&strip(&built)) && left.is_superset(&untagged),
        "{left:#?}"
    );
    for resource in &killed {
        assert!(left.contains(resource), "{resource}: {left:#?}");
    }
    assert!(
        !left.iter().any(|r| elsewhere.contains(r)),
        "{left:#?}\n{report}"
    );
    // Nothing is left to clean up: d's journal let go of what is now its version's.
    let again = h.run("store", &["cleanup"]);
    assert!(
        stdout(&again).contains("nothing to clean up"),
        "{}",
        stdout(&again)
    );
}

// ---------------------------------------------------------------------------------------------
// Container recipes

/// A recipe with `outputs.oci` and `--engine imagebuilder`: Image Builder's container recipe on
/// the recipe's `image` base (pinned by digest), pushed to the recipe's ECR repository (the
/// stand-in pushes to the harness registry, standing in for the account's ECR registry, and
/// names the ECR host as AWS does). The build record names the digest the registry has; a
/// second build creates nothing; `publish` pins an ECS task definition to that digest, and
/// `manifest show` finds the version from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_recipe_builds_on_image_builder_and_publishes_its_ecr_digest() {
    let parameter = "/ib/vendor/container";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let account = h.moto.account.clone();
    // The base image, in the harness registry.
    let base_store_dir = tempfile::tempdir().unwrap();
    let base_store = bake::store::Store::open(base_store_dir.path()).unwrap();
    let base_digest = super::registry::harness::make_image(&base_store, 22, &[2_000]);
    let base_name = format!("it/ib-base-{account}");
    let client = bake::registry::Client::new(
        bake::registry::ClientOptions::default(),
        std::sync::Arc::new(bake::registry::auth::StaticCredentials::default()),
    )
    .unwrap();
    let pushed = bake::registry::push::push_image(
        &client,
        &base_store,
        &base_digest,
        &[bake::registry::push::PushTarget {
            repository: bake::registry::Reference::repository_only(&format!(
                "{registry}/{base_name}"
            ))
            .unwrap(),
            tags: vec!["v1".into()],
        }],
        &bake::registry::NoProgress,
    )
    .await
    .unwrap();
    assert!(pushed.failed.is_empty(), "{:?}", pushed.failed);

    let dir = h.dir.path().join("web");
    fs_err::create_dir_all(&dir).unwrap();
    fs_err::write(dir.join("release.txt"), "one\n").unwrap();
    fs_err::write(
        dir.join("task.json"),
        r#"{
  "family": "ib-web",
  "cpu": "256",
  "memory": "512",
  "networkMode": "awsvpc",
  "requiresCompatibilities": ["FARGATE"],
  "containerDefinitions": [
    {"name": "app", "image": "placeholder", "memory": 512, "essential": true}
  ]
}"#,
    )
    .unwrap();
    let repository = format!("ib/web-{account}");
    let recipe = dir.join("web.yaml");
    fs_err::write(
        &recipe,
        format!(
            r#"bake: 1
name: ib-web
base:
  image: {registry}/{base_name}:v1
provisioners:
  - file:
      name: release
      source: release.txt
      destination: /app/release.txt
  - shell:
      name: greeting
      inline: echo hello >/app/hello
tests:
  - command:
      name: the release is there
      run: cat /app/release.txt
      stdout_contains: one
outputs:
  oci:
    cmd: ["/app/run"]
    env:
      MODE: prod
publish:
  ecr:
    - repository: {repository}
      region: us-east-1
      tags: [stable]
  ecs_task_definitions:
    - family: ib-web
      container: app
      region: us-east-1
      template: task.json
"#
        ),
    )
    .unwrap();
    let recipe = recipe.to_str().unwrap();
    let host = bake::registry::ecr::registry_host(&account, REGION);
    let ecr = format!("{host}/{repository}");
    let build = |store: &str| {
        let output = h
            .bake(store)
            .env(
                "BAKE_REGISTRY_ENDPOINTS",
                format!("{host}=http://{registry}"),
            )
            .args([
                "--output",
                "json",
                "build",
                recipe,
                "--engine",
                "imagebuilder",
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}\n{}",
            stderr(&output),
            stdout(&output)
        );
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };

    let built = build("store");
    assert_eq!(built["started_build"], true, "{built:#}");
    // Two build components, the test component, the container recipe, both configurations.
    assert_eq!(built["created"].as_array().unwrap().len(), 6, "{built:#}");
    assert!(
        built["created"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str().unwrap().contains(":container-recipe/")),
        "{built:#}"
    );
    let digest = built["image_digest"].as_str().unwrap().to_owned();
    assert_eq!(built["image_reference"], format!("{ecr}@{digest}").as_str());
    assert_eq!(built["regions"], serde_json::json!([]));

    // The image really is in the registry that stands in for ECR, under that digest.
    let in_registry = client
        .head_manifest(&format!("{registry}/{repository}@{digest}").parse().unwrap())
        .await
        .unwrap()
        .expect("the image is in the registry");
    assert_eq!(in_registry.digest, digest);
    let tagged = client
        .head_manifest(&format!("{registry}/{repository}:stable").parse().unwrap())
        .await
        .unwrap()
        .expect("the target's tag is in the registry");
    assert_eq!(tagged.digest, digest);

    // The container recipe starts from the base pinned by digest, and its Dockerfile carries
    // the recipe's image settings.
    let ib = h.imagebuilder().await;
    let arn = built["created"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .find(|a| a.contains(":container-recipe/"))
        .unwrap()
        .to_owned();
    let container = ib
        .get_container_recipe()
        .container_recipe_arn(&arn)
        .send()
        .await
        .unwrap();
    let container = container.container_recipe().unwrap();
    assert_eq!(
        container.parent_image(),
        Some(format!("{registry}/{base_name}@{base_digest}").as_str())
    );
    let dockerfile = container.dockerfile_template_data().unwrap();
    assert!(
        dockerfile.starts_with("FROM {{{ imagebuilder:parentImage }}}\n")
            && dockerfile.contains("{{{ imagebuilder:components }}}")
            && dockerfile.contains("ENV MODE=\"prod\"")
            && dockerfile.contains("CMD [\"/app/run\"]"),
        "{dockerfile}"
    );
    assert_eq!(
        container.target_repository().unwrap().repository_name(),
        repository
    );

    // The record: manifest show finds the version from the digest and the reference.
    let version = built["version"].as_str().unwrap().to_owned();
    let shown = h.json("store", &["manifest", "show", &digest]);
    assert_eq!(shown["version"], version.as_str(), "{shown:#}");
    assert_eq!(
        shown["outputs"]["remote_image"]["reference"],
        format!("{ecr}@{digest}").as_str()
    );
    let shown = h.json("store", &["manifest", "show", &format!("{ecr}@{digest}")]);
    assert_eq!(shown["version"], version.as_str());

    // A second build, from another store, creates nothing and records the same digest.
    let before = h.everything().await;
    let again = build("other-store");
    assert_eq!(again["created"], serde_json::json!([]), "{again:#}");
    assert_eq!(again["started_build"], false);
    assert_eq!(again["image_digest"], digest.as_str());
    assert_eq!(h.everything().await, before);

    // publish pins the task definition to the digest in ECR.
    let output = h
        .bake("store")
        .env(
            "BAKE_REGISTRY_ENDPOINTS",
            format!("{host}=http://{registry}"),
        )
        .args(["--output", "json", "publish", recipe])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        stderr(&output),
        stdout(&output)
    );
    let published: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(published["version"], version.as_str(), "{published:#}");
    let ecs = bake::publish::clients::ecs(&h.moto.aws, REGION);
    let task = ecs
        .describe_task_definition()
        .task_definition("ib-web")
        .send()
        .await
        .unwrap();
    let image = task.task_definition().unwrap().container_definitions()[0]
        .image()
        .unwrap()
        .to_owned();
    assert_eq!(image, format!("{ecr}@{digest}"), "{published:#}");
}

/// Container recipes Image Builder cannot build are refused before anything is created, each
/// with the way out: not on a registry image, and without an ECR repository to push to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_recipes_without_a_registry_base_or_an_ecr_target_are_refused() {
    let parameter = "/ib/vendor/container-refused";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let dir = h.dir.path().join("refused");
    fs_err::create_dir_all(&dir).unwrap();
    let scratch = dir.join("scratch.yaml");
    fs_err::write(
        &scratch,
        "bake: 1\nname: ib-scratch\nbase: scratch\noutputs:\n  oci:\n    cmd: [/run]\npublish:\n  ecr:\n    - repository: ib/scratch\n",
    )
    .unwrap();
    // A base that exists, and no ECR target.
    let base_store_dir = tempfile::tempdir().unwrap();
    let base_store = bake::store::Store::open(base_store_dir.path()).unwrap();
    let base_digest = super::registry::harness::make_image(&base_store, 23, &[1_000]);
    let base_name = format!("it/ib-refused-{}", h.moto.account);
    let client = bake::registry::Client::new(
        bake::registry::ClientOptions::default(),
        std::sync::Arc::new(bake::registry::auth::StaticCredentials::default()),
    )
    .unwrap();
    let pushed = bake::registry::push::push_image(
        &client,
        &base_store,
        &base_digest,
        &[bake::registry::push::PushTarget {
            repository: bake::registry::Reference::repository_only(&format!(
                "{registry}/{base_name}"
            ))
            .unwrap(),
            tags: vec!["v1".into()],
        }],
        &bake::registry::NoProgress,
    )
    .await
    .unwrap();
    assert!(pushed.failed.is_empty(), "{:?}", pushed.failed);
    let no_ecr = dir.join("no-ecr.yaml");
    fs_err::write(
        &no_ecr,
        format!(
            "bake: 1\nname: ib-no-ecr\nbase:\n  image: {registry}/{base_name}:v1\noutputs:\n  oci:\n    cmd: [/run]\n"
        ),
    )
    .unwrap();
    for (recipe, message, hint) in [
        (
            &scratch,
            "recipe `ib-scratch` starts from `base: scratch`, and Image Builder builds containers on a registry image",
            "hint: give the recipe an `image` base",
        ),
        (
            &no_ecr,
            "recipe `ib-no-ecr` has `outputs.oci` and no `publish.ecr` repository",
            "hint: add the repository under `publish.ecr`",
        ),
    ] {
        let output = h
            .bake("store")
            .args([
                "build",
                recipe.to_str().unwrap(),
                "--engine",
                "imagebuilder",
            ])
            .output()
            .unwrap();
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{err}");
        assert!(err.contains(message) && err.contains(hint), "{err}");
    }
    assert_eq!(h.everything().await, Default::default());
}

// ---------------------------------------------------------------------------------------------
// Files delivered through S3

/// A `file` provisioner whose file is too large for a component document goes through S3: the
/// run creates bake's bucket, uploads the file under its digest, and the component fetches it
/// (`S3Download`), checks the digest and installs it with its mode. A second build uploads
/// nothing; a small file stays in its document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_too_large_for_a_component_is_delivered_through_s3() {
    let parameter = "/ib/vendor/s3files";
    let Some(h) = Harness::start(parameter).await else {
        return;
    };
    let big: Vec<u8> = super::registry::harness::noise(22, 40_000);
    let recipe = variant(
        &h,
        parameter,
        "s3files",
        "  - file:\n      name: big blob\n      source: big.bin\n      destination: /opt/big.bin\n      mode: \"0600\"\n",
        "",
    );
    fs_err::write(h.dir.path().join("s3files/big.bin"), &big).unwrap();

    let built = h.json("store", &["build", &recipe, "--engine", "imagebuilder"]);
    let uploaded = built["uploaded"].as_array().unwrap();
    assert_eq!(uploaded.len(), 1, "{built:#}");
    let uri = uploaded[0].as_str().unwrap().to_owned();
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&big));
    let (bucket, key) = uri
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
        .unwrap();
    assert_eq!(key, format!("bake/files/{digest}"));
    assert!(bucket.starts_with("bake-imagebuilder-files-"), "{bucket}");

    // The object holds the file's bytes; the bucket is private and says it is bake's.
    let s3 = h.moto.aws.s3(REGION);
    let object = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    let body = object.body.collect().await.unwrap().into_bytes();
    assert_eq!(body.as_ref(), big.as_slice());
    let tags = s3.get_bucket_tagging().bucket(bucket).send().await.unwrap();
    assert!(
        tags.tag_set()
            .iter()
            .any(|t| t.key() == bake::imagebuilder::engine::TAG_BUCKET),
        "{tags:?}"
    );

    // The big file's component fetches it and checks it; the small one is written in.
    let ib = h.imagebuilder().await;
    let mut documents = Vec::new();
    for arn in built["created"].as_array().unwrap() {
        let arn = arn.as_str().unwrap();
        if !arn.contains(":component/") {
            continue;
        }
        let component = ib
            .get_component()
            .component_build_version_arn(arn)
            .send()
            .await
            .unwrap();
        documents.push(component.component().unwrap().data().unwrap().to_owned());
    }
    let fetching: Vec<&String> = documents
        .iter()
        .filter(|d| d.contains("action: S3Download"))
        .collect();
    assert_eq!(fetching.len(), 1, "{documents:#?}");
    let document = fetching[0];
    let parsed: Value = serde_saphyr::from_str(document).unwrap();
    let steps = &parsed["phases"][0]["steps"];
    assert_eq!(steps[0]["action"], "S3Download", "{document}");
    assert_eq!(steps[0]["inputs"][0]["source"], uri.as_str(), "{document}");
    assert_eq!(steps[1]["action"], "ExecuteBash", "{document}");
    assert!(
        document.contains("sha256sum -c")
            && document.contains(&digest)
            && document.contains("chmod 0600"),
        "{document}"
    );
    assert!(document.len() < 2_000, "{document}");
    assert!(
        documents
            .iter()
            .any(|d| d.contains("50-bake-hardening.conf") && d.contains("cat >")),
        "the sshd settings file stays in its document: {documents:#?}"
    );

    // A second build, from another store, uploads and creates nothing.
    let again = h.json(
        "other-store",
        &["build", &recipe, "--engine", "imagebuilder"],
    );
    assert_eq!(again["uploaded"], serde_json::json!([]), "{again:#}");
    assert_eq!(again["created"], serde_json::json!([]), "{again:#}");
}
