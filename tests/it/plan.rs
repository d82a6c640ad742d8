//! Plans and versions: the version is stable across runs and reformatting, changes with every
//! input, and sensitive values never show.

use std::path::Path;

use bake::plan::{PlanOptions, plan};
use bake::recipe::{self, VarSources};
use proptest::prelude::*;

use super::common::{bake, copy_tree, fresh_account, run, service, stderr, stdout};

/// How a recipe is written: everything here is formatting, none of it meaning.
#[derive(Debug, Clone)]
struct Style {
    key_order: Vec<usize>,
    indent: usize,
    comments: bool,
    quote: Quote,
    flow_lists: bool,
}

#[derive(Debug, Clone, Copy)]
enum Quote {
    Plain,
    Double,
    Single,
}

impl Quote {
    fn q(self, s: &str) -> String {
        match self {
            Quote::Plain => s.to_owned(),
            Quote::Double => format!("\"{s}\""),
            Quote::Single => format!("'{s}'"),
        }
    }
}

/// What a recipe says: changing any of these must change the version.
#[derive(Debug, Clone)]
struct Content {
    suite: String,
    env_default: String,
    port: u16,
}

fn content() -> Content {
    Content {
        suite: "bookworm".into(),
        env_default: "staging".into(),
        port: 8080,
    }
}

/// Writes the recipe in `style`. Template strings are always double-quoted (YAML needs it for
/// `{{`), other plain strings follow the style.
fn write_recipe(c: &Content, s: &Style) -> String {
    let pad = " ".repeat(s.indent);
    let pad2 = pad.repeat(2);
    let pad3 = pad.repeat(3);
    let q = |v: &str| s.quote.q(v);
    let comment = |text: &str| {
        if s.comments {
            format!("# {text}\n")
        } else {
            String::new()
        }
    };
    let list = |items: &[String], indent: &str| {
        if s.flow_lists {
            format!(" [{}]\n", items.join(", "))
        } else {
            format!(
                "\n{}",
                items
                    .iter()
                    .map(|i| format!("{indent}- {i}\n"))
                    .collect::<String>()
            )
        }
    };
    let sections = [
        format!("bake: 1{}\n", if s.comments { "  # schema" } else { "" }),
        format!("name: {}\n", q("fmt-test")),
        format!(
            "{}variables:\n{pad}env:\n{pad2}type: {}\n{pad2}default: {}\n{pad2}allowed:{}",
            comment("variables"),
            q("string"),
            q(&c.env_default),
            list(&[q("staging"), q("prod"), q("dev")], &pad2)
        ),
        format!(
            "base:\n{pad}bootstrap:\n{pad2}suite: {}\n{pad2}packages:{}",
            q(&c.suite),
            list(&[q("curl"), q("ca-certificates")], &pad2)
        ),
        format!(
            "provisioners:\n{pad}- shell:\n{pad3}script: {}\n{pad3}env:\n{pad3}{pad}MODE: \"{{{{var.env}}}}\"\n{pad}- file:\n{pad3}source: {}\n{pad3}destination: {}\n",
            q("files/setup.sh"),
            q("files/conf"),
            q("/etc/app")
        ),
        format!(
            "{}outputs:\n{pad}oci:\n{pad2}ports:{}",
            comment("what we make"),
            list(&[c.port.to_string()], &pad2)
        ),
    ];
    s.key_order.iter().map(|&i| sections[i].clone()).collect()
}

fn style() -> impl Strategy<Value = Style> {
    (
        Just((0..6).collect::<Vec<usize>>()).prop_shuffle(),
        prop_oneof![Just(2usize), Just(4usize)],
        any::<bool>(),
        prop_oneof![Just(Quote::Plain), Just(Quote::Double), Just(Quote::Single)],
        any::<bool>(),
    )
        .prop_map(|(key_order, indent, comments, quote, flow_lists)| Style {
            key_order,
            indent,
            comments,
            quote,
            flow_lists,
        })
}

/// A recipe directory with its files.
fn recipe_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs_err::create_dir_all(dir.path().join("files/conf/sub")).unwrap();
    fs_err::write(
        dir.path().join("files/setup.sh"),
        "#!/bin/sh\necho {{var.env}}\n",
    )
    .unwrap();
    fs_err::write(dir.path().join("files/conf/app.conf"), "port=8080\n").unwrap();
    fs_err::write(dir.path().join("files/conf/sub/extra.conf"), "x=1\n").unwrap();
    dir
}

/// Every archive at one fixed state: these tests are about the recipe's text, offline.
#[derive(Debug)]
struct FixedArchives;

impl bake::plan::archive::ArchiveResolver for FixedArchives {
    fn release(
        &self,
        _: &bake::recipe::ArchiveSuite,
    ) -> Result<bake::id::Digest, bake::plan::archive::ArchiveError> {
        Ok(bake::id::Digest::of(b"Suite: fixed\n"))
    }
}

fn version_of(dir: &Path, yaml: &str, sources: &VarSources) -> String {
    let path = dir.join("recipe.yaml");
    fs_err::write(&path, yaml).unwrap();
    let recipe = recipe::load(&path, sources).unwrap_or_else(|e| {
        let reports: String = e.0.iter().map(|e| e.report().render(false)).collect();
        panic!("recipe failed to load:\n{reports}\n{yaml}")
    });
    let options = PlanOptions {
        archive_resolver: Some(std::sync::Arc::new(FixedArchives)),
        ..PlanOptions::default()
    };
    plan(&recipe, "recipe.yaml", &options)
        .unwrap()
        .version
        .to_string()
}

fn canonical_style() -> Style {
    Style {
        key_order: (0..6).collect(),
        indent: 2,
        comments: false,
        quote: Quote::Plain,
        flow_lists: true,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn reformatting_keeps_the_version(style in style()) {
        let dir = recipe_dir();
        let none = VarSources::default();
        let reference = version_of(dir.path(), &write_recipe(&content(), &canonical_style()), &none);
        let reformatted = version_of(dir.path(), &write_recipe(&content(), &style), &none);
        prop_assert_eq!(reference, reformatted);
    }

    #[test]
    fn one_byte_of_a_script_or_source_changes_the_version(
        style in style(),
        which in 0usize..3,
        at in 0usize..8,
    ) {
        let dir = recipe_dir();
        let none = VarSources::default();
        let yaml = write_recipe(&content(), &style);
        let before = version_of(dir.path(), &yaml, &none);
        let file = ["files/setup.sh", "files/conf/app.conf", "files/conf/sub/extra.conf"][which];
        let path = dir.path().join(file);
        let mut bytes = fs_err::read(&path).unwrap();
        let i = at % bytes.len();
        bytes[i] ^= 0x20;
        fs_err::write(&path, bytes).unwrap();
        let after = version_of(dir.path(), &yaml, &none);
        prop_assert_ne!(before, after);
    }
}

#[test]
fn every_kind_of_input_changes_the_version() {
    let dir = recipe_dir();
    let none = VarSources::default();
    let style = canonical_style();
    let base = version_of(dir.path(), &write_recipe(&content(), &style), &none);
    let mut seen = vec![base.clone()];
    let mut check = |label: &str, version: String| {
        assert!(
            !seen.contains(&version),
            "{label} did not change the version"
        );
        seen.push(version);
    };

    let mut c = content();
    c.suite = "trixie".into();
    check(
        "the base",
        version_of(dir.path(), &write_recipe(&c, &style), &none),
    );

    let mut c = content();
    c.env_default = "prod".into();
    check(
        "a variable default",
        version_of(dir.path(), &write_recipe(&c, &style), &none),
    );

    let given = VarSources {
        cli: vec![("env".into(), "dev".into())],
        ..VarSources::default()
    };
    check(
        "a --var value",
        version_of(dir.path(), &write_recipe(&content(), &style), &given),
    );

    let mut c = content();
    c.port = 8081;
    check(
        "an output setting",
        version_of(dir.path(), &write_recipe(&c, &style), &none),
    );

    fs_err::write(dir.path().join("files/conf/new.conf"), "").unwrap();
    check(
        "a new file in a source directory",
        version_of(dir.path(), &write_recipe(&content(), &style), &none),
    );

    let script = dir.path().join("files/setup.sh");
    let mut perms = fs_err::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    fs_err::set_permissions(&script, perms).unwrap();
    check(
        "a script's mode",
        version_of(dir.path(), &write_recipe(&content(), &style), &none),
    );
}

/// Both runners give the same image, so which one builds is not an input: `build.runner` is
/// left out of the version (and of the inputs), while another build setting is not.
#[test]
fn the_runner_is_not_part_of_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let none = VarSources::default();
    let recipe = |build: &str| {
        format!("bake: 1\nname: r\nbase: scratch\nbuild:\n{build}outputs:\n  oci:\n    cmd: [/x]\n")
    };
    let chroot = version_of(dir.path(), &recipe("  runner: chroot\n"), &none);
    let docker = version_of(dir.path(), &recipe("  runner: docker\n"), &none);
    let squashed = version_of(
        dir.path(),
        &recipe("  runner: docker\n  squash: true\n"),
        &none,
    );
    assert_eq!(chroot, docker);
    assert_ne!(docker, squashed, "other build settings still count");
}

#[test]
fn plan_json_has_the_documented_shape_and_is_stable() {
    let args = [
        "plan",
        "--output",
        "json",
        "tests/fixtures/recipes/valid/full.yaml",
    ];
    let first = run(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    let json: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let version = json["version"].as_str().unwrap();
    assert!(
        version.starts_with("sha256:") && version.len() == 71,
        "{version}"
    );
    assert!(
        version[7..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(json["name"], "full");
    assert!(json["inputs"].is_object());
    assert!(json["effects"].as_array().is_some_and(|e| !e.is_empty()));
    // The version is the digest of the canonical inputs: anyone can recompute it.
    let canonical = serde_json_canonicalizer::to_vec(&json["inputs"]).unwrap();
    use sha2::Digest as _;
    assert_eq!(
        version,
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&canonical)))
    );

    let second = run(&args);
    assert_eq!(
        first.stdout, second.stdout,
        "two plans of the same recipe differ"
    );
}

#[test]
fn a_copied_recipe_tree_has_the_same_version() {
    let copy = tempfile::tempdir().unwrap();
    copy_tree(
        &super::common::repo_root().join("tests/fixtures/recipes/valid"),
        copy.path(),
    );
    let here = run(&[
        "plan",
        "--output",
        "json",
        "tests/fixtures/recipes/valid/full.yaml",
    ]);
    let there_path = copy.path().join("full.yaml");
    let there = run(&["plan", "--output", "json", there_path.to_str().unwrap()]);
    let version = |o: &std::process::Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["version"].clone()
    };
    assert_eq!(version(&here), version(&there));
}

#[test]
fn sensitive_values_never_show() {
    const CANARY: &str = "CANARY-5f1d2c-not-for-your-eyes";
    let recipe = "tests/fixtures/recipes/valid/full.yaml";
    for output_format in ["human", "json"] {
        let var = format!("api_token={CANARY}");
        let output = run(&[
            "plan",
            "--output",
            output_format,
            recipe,
            "--var",
            &var,
            "-vv",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(
            !stdout(&output).contains(CANARY),
            "canary on stdout ({output_format})"
        );
        assert!(
            !stderr(&output).contains(CANARY),
            "canary on stderr ({output_format})"
        );
        assert!(
            stdout(&output).contains("***"),
            "the sensitive variable is shown redacted"
        );
    }
    // Through the environment too, and a sensitive value does not enter the version.
    let with_env = super::common::bake()
        .args(["plan", "--output", "json", recipe])
        .env("BAKE_VAR_api_token", CANARY)
        .output()
        .unwrap();
    assert!(!stdout(&with_env).contains(CANARY));
    let without = run(&["plan", "--output", "json", recipe]);
    let version = |o: &std::process::Output| {
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["version"].clone()
    };
    assert_eq!(version(&with_env), version(&without));
}

#[test]
fn a_sensitive_value_breaking_a_rule_is_not_echoed() {
    const CANARY: &str = "CANARY-b7e9-wrong-choice";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.yaml");
    fs_err::write(
        &path,
        "bake: 1\nname: s\nvariables:\n  key:\n    type: string\n    sensitive: true\n    allowed: [a, b]\nbase: scratch\noutputs:\n  oci: {}\n",
    )
    .unwrap();
    let var = format!("key={CANARY}");
    let output = run(&["plan", path.to_str().unwrap(), "--var", &var]);
    assert_eq!(output.status.code(), Some(2));
    assert!(!stderr(&output).contains(CANARY), "{}", stderr(&output));
    assert!(stderr(&output).contains("***"));
}

#[test]
fn human_plan_lists_inputs_and_effects() {
    let output = run(&["plan", "tests/fixtures/recipes/valid/full.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for expected in [
        "name     full",
        "version  sha256:",
        "file       files/setup.sh  sha256:",
        "+ build OCI image for linux/amd64 from debian bookworm",
        // Registries are asked only with --check, and the plan says so.
        "? not asked (registries and AWS are asked with --check): push image to 127.0.0.1:5000/full as ",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

/// `bake plan` in `dir` with its own store, human output.
fn plan_text(store: &Path, recipe: &Path, extra: &[&str]) -> String {
    let output = bake()
        .arg("--store")
        .arg(store)
        .arg("plan")
        .arg(recipe)
        .args(extra)
        // No AWS here: the registry is asked, AWS says it has no credentials, fast.
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/nonexistent/bake-test")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/bake-test")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    stdout(&output)
}

fn effect_line<'a>(text: &'a str, what: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no effect `{what}` in:\n{text}"))
        .trim()
}

/// The effects of an OCI recipe follow its real state: `+ build` until it is built, then
/// `= built`; a push is not asked about without `--check`, and with it is `+ push` until the
/// registry has the manifest, then `= in registry`.
#[test]
fn plan_effects_say_built_and_in_registry_once_they_are() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    if !super::skip::root("building images") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let repository = format!("{registry}/plan-state-{}", fresh_account());
    let recipe = dir.path().join("state.yaml");
    fs_err::write(
        &recipe,
        format!(
            "bake: 1\nname: plan-state\nbase: scratch\noutputs:\n  oci: {{}}\npublish:\n  registries:\n    - repository: {repository}\n      tags: [latest]\n"
        ),
    )
    .unwrap();
    let push = format!("push image to {repository}");

    let text = plan_text(&store, &recipe, &[]);
    assert!(
        effect_line(&text, "build OCI image").starts_with("+ build OCI image"),
        "{text}"
    );
    assert!(
        effect_line(&text, &push)
            .starts_with("? not asked (registries and AWS are asked with --check)"),
        "{text}"
    );
    assert!(!store.exists(), "planning made a store");
    let text = plan_text(&store, &recipe, &["--check"]);
    assert!(
        effect_line(&text, &push).starts_with("? not asked (not built here"),
        "{text}"
    );

    let built = bake()
        .arg("--store")
        .arg(&store)
        .args(["--output", "json", "build"])
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", stderr(&built));
    let built: serde_json::Value = serde_json::from_slice(&built.stdout).unwrap();
    let digest = built["image_digest"].as_str().unwrap().to_owned();

    let text = plan_text(&store, &recipe, &[]);
    assert!(
        effect_line(&text, "build OCI image").starts_with("= built: build OCI image"),
        "{text}"
    );
    let text = plan_text(&store, &recipe, &["--check"]);
    assert!(
        effect_line(&text, &push).starts_with("+ push image"),
        "{text}"
    );

    let pushed = bake()
        .arg("--store")
        .arg(&store)
        .arg("push")
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let text = plan_text(&store, &recipe, &["--check"]);
    assert!(
        effect_line(&text, &push).starts_with("= in registry: push image"),
        "{text}"
    );
    let json = plan_text(&store, &recipe, &["--check", "--output", "json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let effects = json["effects"].as_array().unwrap();
    assert_eq!(effects[0]["action"], "build_image");
    assert_eq!(effects[0]["state"]["status"], "built");
    assert_eq!(effects[0]["state"]["image_digest"], digest.as_str());
    assert_eq!(effects[1]["action"], "push_image");
    assert_eq!(effects[1]["state"]["status"], "in_registry");
    assert_eq!(effects[1]["state"]["digest"], digest.as_str());
}

/// An AMI recipe's effects with `--check` against moto: where an AMI tagged with the version
/// exists, its region's effects are `= AMI exists` (and `= shared` when its launch permissions
/// already are the recipe's); a region without one still has `+ copy`. Without credentials,
/// AWS is not asked and the plan says so.
#[tokio::test]
async fn plan_effects_say_ami_exists_per_region() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let account = fresh_account();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let recipe = dir.path().join("ami.yaml");
    fs_err::write(
        &recipe,
        "bake: 1\nname: plan-ami\nbase: scratch\noutputs:\n  ami:\n    strategy: snapshot\n    regions: [us-east-1, eu-west-1]\n    disk_size_gib: 1\n    sharing:\n      accounts: [\"111122223333\"]\n",
    )
    .unwrap();
    let plan = |args: &[&str], credentials: bool| {
        let mut command = bake();
        command
            .arg("--store")
            .arg(&store)
            .args(["--output", "json", "plan"])
            .arg(&recipe)
            .args(args)
            .env("BAKE_AWS_ENDPOINT_URL", &endpoint)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", "/nonexistent/bake-test")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/bake-test")
            .env_remove("AWS_PROFILE");
        if credentials {
            command
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing");
        } else {
            command
                .env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY");
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let states = |doc: &serde_json::Value| -> Vec<(String, String)> {
        doc["effects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let region = e
                    .get("region")
                    .or_else(|| e.get("to"))
                    .and_then(|r| r.as_str())
                    .unwrap_or("");
                (
                    format!("{} {region}", e["action"].as_str().unwrap()),
                    e["state"]["status"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let offline = plan(&[], true);
    let version = offline["version"].as_str().unwrap().to_owned();
    assert!(
        states(&offline)
            .iter()
            .filter(|(e, _)| !e.starts_with("build_disk"))
            .all(|(_, s)| s == "not_asked"),
        "{offline}"
    );
    assert_eq!(offline["effects"][1]["state"]["reason"], "offline");

    // Nothing in AWS yet: everything would be done.
    let fresh = plan(&["--check"], true);
    assert!(states(&fresh).iter().all(|(_, s)| s == "todo"), "{fresh}");

    // The version's AMI in us-east-1 (as a finished run leaves it), shared as asked.
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    let aws = bake::aws::Aws::from_config(config, Some(account.clone()));
    let ec2 = aws.ec2("us-east-1");
    let image_id = ec2
        .register_image()
        .name("plan-ami-us-east-1")
        .root_device_name("/dev/xvda")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    ec2.create_tags()
        .resources(&image_id)
        .tags(tag("bake:version", &version))
        .tags(tag("bake:recipe", "plan-ami"))
        .send()
        .await
        .unwrap();
    ec2.modify_image_attribute()
        .image_id(&image_id)
        .launch_permission(
            aws_sdk_ec2::types::LaunchPermissionModifications::builder()
                .add(
                    aws_sdk_ec2::types::LaunchPermission::builder()
                        .user_id("111122223333")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();

    let checked = plan(&["--check"], true);
    assert_eq!(
        states(&checked),
        [
            ("build_disk ".to_owned(), "ami_exists".to_owned()),
            ("upload_snapshot us-east-1".into(), "ami_exists".into()),
            ("register_ami us-east-1".into(), "ami_exists".into()),
            ("share_ami us-east-1".into(), "shared".into()),
            ("copy_ami eu-west-1".into(), "todo".into()),
            ("share_ami eu-west-1".into(), "todo".into()),
        ],
        "{checked}"
    );
    assert_eq!(
        checked["effects"][2]["state"]["image_id"],
        image_id.as_str()
    );

    // The same, for people.
    let human = bake()
        .arg("--store")
        .arg(&store)
        .arg("plan")
        .arg(&recipe)
        .arg("--check")
        .env("BAKE_AWS_ENDPOINT_URL", &endpoint)
        .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
        .env("BAKE_AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let text = stdout(&human);
    assert!(
        text.contains(&format!(
            "= AMI exists ({image_id}): register AMI `plan-ami-us-east-1"
        )) || text.contains(&format!("= AMI exists ({image_id}): register AMI")),
        "{text}"
    );
    assert!(text.contains("+ copy AMI"), "{text}");

    // No credentials: AWS is not asked, and each AWS effect says so.
    let blind = plan(&["--check"], false);
    assert!(
        states(&blind).iter().all(|(_, s)| s == "not_asked"),
        "{blind}"
    );
    assert_eq!(blind["effects"][2]["state"]["reason"], "no_credentials");
}
