//! Every invalid recipe fixture fails `bake validate` with exit code 2 and exactly the message
//! snapshotted for it; the valid fixtures and the example recipes pass.

use super::common::{repo_root, run, stderr, stdout};

/// Extra arguments a fixture asks for in its first line: `# args: --var k=v`.
fn fixture_args(text: &str) -> Vec<String> {
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix("# args: "))
        .map(|a| a.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn invalid_fixtures_fail_with_their_snapshotted_message() {
    let dir = repo_root().join("tests/fixtures/recipes/invalid");
    let mut fixtures: Vec<_> = fs_err::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    fixtures.sort();
    assert!(
        fixtures.len() >= 20,
        "only {} invalid fixtures",
        fixtures.len()
    );
    for fixture in fixtures {
        let name = fixture.file_stem().unwrap().to_string_lossy().into_owned();
        let relative = fixture
            .strip_prefix(repo_root())
            .unwrap()
            .display()
            .to_string();
        let mut args = vec!["validate".to_owned(), relative];
        args.extend(fixture_args(&fs_err::read_to_string(&fixture).unwrap()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = run(&args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{name}: expected exit 2\nstdout: {}\nstderr: {}",
            stdout(&output),
            stderr(&output)
        );
        assert_eq!(
            stdout(&output),
            "",
            "{name}: nothing on stdout for a failed recipe"
        );
        insta::assert_snapshot!(format!("invalid__{name}"), stderr(&output));
    }
}

#[test]
fn errors_of_many_recipes_are_reported_together_as_json() {
    let output = run(&[
        "validate",
        "--output",
        "json",
        "tests/fixtures/recipes/invalid/several-errors.yaml",
        "tests/fixtures/recipes/invalid/schema-version.yaml",
        "tests/fixtures/recipes/valid/minimal.yaml",
    ]);
    assert_eq!(output.status.code(), Some(2));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["valid"], false);
    let recipes = json["recipes"].as_array().unwrap();
    assert_eq!(recipes.len(), 3);
    assert!(
        recipes[0]["errors"].as_array().unwrap().len() >= 4,
        "{json:#}"
    );
    assert_eq!(recipes[1]["errors"][0]["line"], 1);
    assert_eq!(recipes[2]["valid"], true);
    assert_eq!(recipes[2]["name"], "minimal");
}

#[test]
fn example_recipes_validate() {
    let output = run(&["validate", "recipes"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(&output),
        stderr(&output)
    );
    assert!(stdout(&output).lines().count() >= 4, "{}", stdout(&output));
}

#[test]
fn amis_are_encrypted_and_private_unless_the_recipe_says_otherwise_and_audits_target_machines() {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("ds.xml"), "<placeholder/>").unwrap();
    let path = dir.path().join("ami.yaml");
    fs_err::write(
        &path,
        "bake: 1
name: ami
base:
  bootstrap:
    suite: bookworm
outputs:
  ami:
    strategy: snapshot
    name: ami-{{version_short}}
    regions: [us-east-1]
audit:
  datastream: ds.xml
  profile: cis_level1_server
  max_failures: 3
  exceptions:
    - rule: xccdf_org.ssgproject.content_rule_partition_for_tmp
      reason: mounted at boot
",
    )
    .unwrap();
    let recipe = bake::recipe::load(&path, &bake::recipe::VarSources::default()).unwrap();
    let ami = recipe.outputs.ami.as_ref().unwrap();
    assert!(ami.encrypted, "AMIs are encrypted by default");
    assert!(!ami.public, "AMIs are never public by default");
    let audit = recipe.audit.as_ref().unwrap();
    assert_eq!(audit.target, bake::recipe::AuditTarget::Machine);
    assert_eq!(
        audit.profile,
        "xccdf_org.ssgproject.content_profile_cis_level1_server"
    );
    assert_eq!(audit.exceptions["partition_for_tmp"], "mounted at boot");
    assert!(audit.support_status);
}

#[test]
fn an_instance_built_ami_takes_a_gate_scanned_as_a_machine() {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(dir.path().join("ds.xml"), "<placeholder/>").unwrap();
    let path = dir.path().join("vendor.yaml");
    fs_err::write(
        &path,
        "bake: 1
name: vendor
base:
  ami:
    ssm_parameter: /aws/service/debian/release/bookworm/latest/amd64
outputs:
  ami:
    strategy: instance
    regions: [us-east-1]
audit:
  datastream: ds.xml
  profile: cis_level1_server
  min_pass_ratio: 90
",
    )
    .unwrap();
    let recipe = bake::recipe::load(&path, &bake::recipe::VarSources::default()).unwrap();
    let audit = recipe.audit.as_ref().expect("the gate is kept");
    assert_eq!(audit.target, bake::recipe::AuditTarget::Machine);
    assert_eq!(audit.min_pass_ratio_centi, Some(9000));
}
