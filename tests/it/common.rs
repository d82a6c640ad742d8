//! Helpers shared by the integration tests: running the `bake` binary, finding test servers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (tests run the binary from here so paths in messages are relative).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `bake` command in the repository root with a clean, predictable environment.
pub fn bake() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bake"));
    command.current_dir(repo_root());
    for (key, _) in std::env::vars() {
        if key.starts_with("BAKE_") {
            command.env_remove(key);
        }
    }
    command
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env_remove("SOURCE_DATE_EPOCH");
    command
}

/// Runs `bake ARGS` and returns its output.
pub fn run(args: &[&str]) -> Output {
    bake().args(args).output().expect("run bake")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The address of a test server from `scripts/services`, or `None` (after saying why) when the
/// test should skip. Under `CI` a missing server is a failure, never a skip.
pub fn service(variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => Some(value),
        _ => {
            super::skip::skip(&format!(
                "the test server in {variable} (run the tests through scripts/test, which starts them)"
            ));
            None
        }
    }
}

/// A fresh 12-digit AWS account id for moto, so each test has its own state.
pub fn fresh_account() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "9{:05}{:06}",
        std::process::id() % 100_000,
        (nanos / 1000 + n) % 1_000_000
    )
}

/// Copies a directory tree (files and symlinks) for tests that edit fixtures.
pub fn copy_tree(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.unwrap();
        let target = to.join(entry.path().strip_prefix(from).unwrap());
        let file_type = entry.file_type();
        if file_type.is_dir() {
            fs_err::create_dir_all(&target).unwrap();
        } else if file_type.is_symlink() {
            std::os::unix::fs::symlink(fs_err::read_link(entry.path()).unwrap(), &target).unwrap();
        } else {
            fs_err::copy(entry.path(), &target).unwrap();
        }
    }
}
