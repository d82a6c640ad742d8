//! Debian's security-support check (`check-support-status` from debian-security-support) on
//! an image's own dpkg database: which installed packages no longer get security updates.

use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::AuditError;

/// Where debian-security-support keeps its lists, one per Debian release.
const LISTS: &str = "/usr/share/debian-security-support";

/// How many lines of a failing tool's output an error shows.
const ERROR_TAIL_LINES: usize = 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedPackage {
    pub package: String,
    pub version: String,
}

/// The binary packages of `root` whose security support has ended, per the list for the
/// image's Debian release (from its `/etc/debian_version`). A root that is not Debian, or a
/// release with no list, has nothing to report.
pub fn ended(root: &Path, work: &Path) -> Result<Vec<EndedPackage>, AuditError> {
    let admin = root.join("var/lib/dpkg");
    if !admin.join("status").is_file() {
        return Ok(Vec::new());
    }
    let Some(major) = fs_err::read_to_string(root.join("etc/debian_version"))
        .ok()
        .and_then(|v| v.trim().split('.').next().map(str::to_owned))
        .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
    else {
        return Ok(Vec::new());
    };
    let list = Path::new(LISTS).join(format!("security-support-ended.deb{major}"));
    if !Path::new(LISTS).is_dir() {
        return Err(AuditError::Missing {
            program: "check-support-status",
        });
    }
    if !list.is_file() {
        tracing::warn!(
            "debian-security-support has no list for Debian {major}; support status not checked"
        );
        return Ok(Vec::new());
    }
    let io = |source| AuditError::Io {
        path: work.to_path_buf(),
        source,
    };
    fs_err::create_dir_all(work).map_err(io)?;
    let scratch = tempfile::Builder::new()
        .prefix("support-")
        .tempdir_in(work)
        .map_err(io)?;
    // The status database is where the tool writes each package it reports, as NAME/VERSION:
    // a fresh one per run lists exactly this image's.
    let status_db = scratch.path().join("reported");
    let output = Command::new("check-support-status")
        .args(["--type", "ended", "--no-heading", "--list"])
        .arg(&list)
        .arg("--status-db")
        .arg(&status_db)
        .env("DPKG_ADMINDIR", &admin)
        .env("LC_ALL", "C.UTF-8")
        .env("TMPDIR", scratch.path())
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => AuditError::Missing {
                program: "check-support-status",
            },
            _ => AuditError::Spawn {
                program: "check-support-status",
                source,
            },
        })?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = text.lines().collect();
        return Err(AuditError::Support {
            root: root.to_path_buf(),
            code: output.status.code().unwrap_or(-1),
            tail: lines[lines.len().saturating_sub(ERROR_TAIL_LINES)..].join("\n"),
        });
    }
    let reported = fs_err::read_to_string(&status_db).unwrap_or_default();
    Ok(parse_status_db(&reported))
}

fn parse_status_db(text: &str) -> Vec<EndedPackage> {
    let mut packages: Vec<EndedPackage> = text
        .lines()
        .filter_map(|line| line.split_once('/'))
        .map(|(package, version)| EndedPackage {
            package: package.trim().to_owned(),
            version: version.trim().to_owned(),
        })
        .collect();
    packages.sort_by(|a, b| a.package.cmp(&b.package));
    packages.dedup();
    packages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_database_lists_name_and_version() {
        let got =
            parse_status_db("libnet-easytcp-perl/0.26-6\n\nbad line\nckeditor3/3.6.6.1+dfsg-7\n");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].package, "ckeditor3");
        assert_eq!(got[1].version, "0.26-6");
    }
}
