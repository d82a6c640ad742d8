//! What bake and its sandbox helper (`bake __sandbox`) say to each other, as JSON over the
//! helper's stdin, which is one end of a Unix socket pair: the [`SandboxSpec`] goes in (then
//! bake shuts its write side), one [`Report`] comes back just before the helper exits.
//!
//! The spec travels on a socket and not on the command line because it holds the script and
//! its environment, which may carry secrets, and every user on the host can read a process's
//! arguments.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The subcommand bake runs itself as to become the helper.
pub const SANDBOX_SUBCOMMAND: &str = "__sandbox";

/// Everything the helper needs, resolved by bake beforehand: host paths are canonical and
/// inside the root, the user is ids, the environment is final.
#[derive(Serialize, Deserialize)]
pub struct SandboxSpec {
    /// bake's pid: the helper checks it is still its parent after arming its death signal.
    pub parent_pid: i32,
    /// The canonical host path of the root filesystem.
    pub root: PathBuf,
    pub mounts: MountTargets,
    pub hostname: String,
    pub network: bool,
    /// The host's resolver configuration to bind read-only into the root (with network only).
    pub resolv_conf: Option<Bind>,
    /// Where the script starts, as a path in the image.
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The complete environment, in order.
    pub env: Vec<(String, String)>,
    pub script: String,
    pub timeout_ms: u64,
}

/// Like [`super::StepSpec`]'s: the script and the environment values may carry secrets.
impl std::fmt::Debug for SandboxSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxSpec")
            .field("parent_pid", &self.parent_pid)
            .field("root", &self.root)
            .field("mounts", &self.mounts)
            .field("hostname", &self.hostname)
            .field("network", &self.network)
            .field("resolv_conf", &self.resolv_conf)
            .field("workdir", &self.workdir)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("groups", &self.groups)
            .field(
                "env",
                &self.env.iter().map(|(name, _)| name).collect::<Vec<_>>(),
            )
            .field("script", &format_args!("<{} bytes>", self.script.len()))
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// Host paths of the mount points in the root, symlinks already resolved inside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountTargets {
    pub proc: PathBuf,
    pub dev: PathBuf,
    pub tmp: PathBuf,
}

/// A host file bound onto a file in the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
}

/// How a sandbox ended, as the helper saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Report {
    /// The step's shell (the sandbox's PID 1) exited.
    Exited { code: i32 },
    /// The step's shell was killed by a signal.
    Signaled { signal: i32 },
    /// The timeout ran out and the helper killed the sandbox.
    TimedOut,
    /// The helper was told to stop (SIGINT, SIGTERM, SIGHUP) and killed the sandbox.
    Interrupted { signal: i32 },
    /// Building the sandbox failed before the script started.
    SetupFailed {
        stage: String,
        errno: Option<i32>,
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_as_tagged_json() {
        let report = Report::SetupFailed {
            stage: "mount proc on `/proc`".into(),
            errno: Some(1),
            message: "Operation not permitted".into(),
        };
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.starts_with(r#"{"kind":"setup_failed""#), "{text}");
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), report);
        let exited = serde_json::to_string(&Report::Exited { code: 3 }).unwrap();
        assert_eq!(exited, r#"{"kind":"exited","code":3}"#);
    }
}
