//! The command line's contract: version, exit codes, data on stdout and logs on stderr.

use super::common::{bake, run, stderr, stdout};

#[test]
fn version_names_the_binary() {
    let output = run(&["--version"]);
    assert!(output.status.success());
    assert_eq!(
        stdout(&output),
        format!("bake {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(run(&["plan"]).status.code(), Some(2));
    let bad_var = run(&[
        "plan",
        "tests/fixtures/recipes/valid/minimal.yaml",
        "--var",
        "novalue",
    ]);
    assert_eq!(bad_var.status.code(), Some(2));
    assert!(
        stderr(&bad_var).contains("is not NAME=VALUE"),
        "{}",
        stderr(&bad_var)
    );
}

#[test]
fn a_missing_recipe_file_is_named() {
    let output = run(&["plan", "tests/fixtures/recipes/nope.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.starts_with("error: failed to read recipe `tests/fixtures/recipes/nope.yaml`"),
        "{err}"
    );
    assert!(err.contains("Caused by:"), "{err}");
    assert_eq!(stdout(&output), "");
}

#[test]
fn valid_recipe_prints_data_on_stdout_only() {
    let output = run(&["validate", "tests/fixtures/recipes/valid/minimal.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        stdout(&output),
        "ok tests/fixtures/recipes/valid/minimal.yaml (minimal)\n"
    );
    assert_eq!(stderr(&output), "");
}

#[test]
fn an_unknown_aws_emulator_is_a_usage_error() {
    let output = super::common::bake()
        .args(["validate", "tests/fixtures/recipes/valid/minimal.yaml"])
        .env("BAKE_AWS_EMULATOR", "localstack")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.starts_with(
            "error: `localstack` in BAKE_AWS_EMULATOR is not an AWS emulator bake knows"
        ),
        "{err}"
    );
    assert!(err.contains("hint: known emulators: moto"), "{err}");
    assert_eq!(stdout(&output), "");
}

/// `bake … --output json | head`: a reader that closed stdout early is no reason to panic.
#[test]
fn json_output_to_a_closed_pipe_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    for n in 0..200 {
        fs_err::write(
            dir.path().join(format!("r{n}.yaml")),
            format!("bake: 1\nname: r{n}\nbase: scratch\noutputs:\n  oci: {{}}\n"),
        )
        .unwrap();
    }
    let mut child = bake()
        .args(["graph", "--output", "json"])
        .arg(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(output.status.code(), Some(0), "{text}");
}
