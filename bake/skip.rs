//! Skipping a test honestly: the one place where a test that lacks what it needs (root, a tool,
//! a test server) either skips or fails.
//!
//! Compiled twice: into the crate's unit tests (`crate::skip`) and, by path, into the
//! integration tests (`tests/it/main.rs`), so both follow the same rule:
//!
//! - with `CI` set, a missing dependency **fails** the test: CI provides everything, and a
//!   green run must mean that every test ran;
//! - otherwise the test skips, and says so where it is seen and counted. libtest captures the
//!   output of passing tests (and so hides a skip message), so the line goes to stderr through
//!   the raw handle, which the capture does not intercept, and is appended to the file named by
//!   `BAKE_TEST_SKIP_LOG`, from which `scripts/test` counts the skipped tests and names them in
//!   its summary.

use std::io::Write;

/// The environment variable naming the file that collects skip lines (set by `scripts/test`).
pub const SKIP_LOG: &str = "BAKE_TEST_SKIP_LOG";

/// Marks the running test as skipped for lack of `what`, or fails it under `CI`.
///
/// The caller returns right after: `if !skip::root("…") { return; }` reads best through the
/// helpers below.
#[track_caller]
pub fn skip(what: &str) {
    let test = current_test();
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs {what}, which CI must provide (CI is set: a missing dependency fails instead of skipping)"
    );
    let line = format!("SKIPPED {test}: needs {what}\n");
    if let Some(path) = std::env::var_os(SKIP_LOG) {
        // One `write` of a short line with O_APPEND: lines from parallel tests do not interleave.
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
        if let Err(error) = appended {
            panic!(
                "{test}: cannot record the skip in {}: {error}",
                std::path::Path::new(&path).display()
            );
        }
    }
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Whether the test runs as root; skips (or fails under `CI`) when not, naming `why`.
#[track_caller]
pub fn root(why: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        skip(&format!("root ({why})"));
    }
    root
}

/// Whether the command-line `tool` can be run; skips (or fails under `CI`) when not.
#[track_caller]
pub fn tool(tool: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !found {
        skip(&format!("`{tool}` (scripts/setup installs it)"));
    }
    found
}

/// The running test's name: libtest runs each test on a thread named after it.
#[track_caller]
fn current_test() -> String {
    match std::thread::current().name() {
        Some(name) if name != "main" => name.to_owned(),
        // Only with `--test-threads=1` on some platforms; the caller's place still names it.
        _ => format!("the test at {}", std::panic::Location::caller()),
    }
}
