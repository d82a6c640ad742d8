//! The compliance gate of an instance build, run on the builder over SSH after the
//! provisioners and tests and before the instance is stopped and imaged: the scanner bundle
//! and the data stream go up into a private directory, `oscap` scans the live root `/`, the ARF
//! results (and the dpkg status database, for the support check) come back, and the directory
//! is removed before the image is taken. The results are read and judged here by the same code
//! as the snapshot gate's ([`crate::audit::remote`]), so the build record has the same shape.

use std::path::PathBuf;
use std::time::Duration;

use super::InstanceError;
use crate::audit::remote::{self, Prepared};
use crate::audit::{AuditError, AuditRecord};
use crate::build::pipeline::BuildReporter;
use crate::build::runner::OutputLine;
use crate::recipe::Audit;
use crate::ssh::{RemoteScript, RunAs, Session, SshError};

/// How long the scan may run on the builder (unpacking included): a CIS profile takes
/// seconds to minutes; a large root with many files to check takes longer.
const SCAN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How long removing the scan directory may take.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2 * 60);

/// Where Debian keeps what the support check reads.
const DPKG_STATUS: &str = "/var/lib/dpkg/status";
const DEBIAN_VERSION: &str = "/etc/debian_version";

/// What comes back from the builder.
struct Downloaded {
    arf: Vec<u8>,
    /// `/var/lib/dpkg/status`, when the builder has one and the support check is on.
    dpkg_status: Option<Vec<u8>>,
    debian_version: Option<Vec<u8>>,
}

/// Everything the gate needs on this side.
pub(super) struct Gate<'a> {
    pub prepared: &'a Prepared,
    pub audit: &'a Audit,
    /// The store's scratch directory (for the support check's copy of the dpkg database).
    pub work: PathBuf,
    pub instance_id: &'a str,
}

impl Gate<'_> {
    /// Runs the gate on the builder: the record when it passes; [`AuditError::Gate`] naming
    /// the failing rules when it does not. The scan directory is removed whatever happens.
    pub async fn run(
        &self,
        session: &Session,
        cancel: &(dyn Fn() -> bool + Sync),
        reporter: &mut dyn BuildReporter,
    ) -> Result<AuditRecord, InstanceError> {
        reporter.message(&format!(
            "audit: scanning builder {} with profile `{}` (oscap {} and the data stream uploaded)",
            self.instance_id, self.audit.profile, self.prepared.scanner_version
        ));
        let dir = session
            .create_private_dir("bake-audit")
            .await
            .map_err(ssh_error)?;
        let scanned = self.scan(session, &dir, cancel).await;
        // Removed before anything else happens to the builder: the image must not carry the
        // scanner, the data stream or the results.
        let removed = self.remove(session, &dir).await;
        let downloaded = match (scanned, removed) {
            (Ok(found), Ok(())) => found,
            (Err(e), Ok(())) => return Err(e),
            (Err(e), Err(also)) => {
                tracing::warn!("{}", crate::diagnostic::error_chain(&also));
                return Err(e);
            }
            (Ok(_), Err(e)) => return Err(e),
        };
        let shown = PathBuf::from(format!("{}:/", self.instance_id));
        let arf = String::from_utf8_lossy(&downloaded.arf);
        let scan = self.prepared.read(&arf, &self.audit.profile, &shown)?;
        let unsupported = if self.audit.support_status {
            let root = remote::support_root(
                &self.work,
                downloaded.dpkg_status.as_deref(),
                downloaded.debian_version.as_deref(),
            )?;
            crate::audit::support::ended(root.path(), &self.work)?
        } else {
            Vec::new()
        };
        let record = self.prepared.judge(&scan, self.audit, unsupported);
        let judged = match &record {
            Ok(record) => Some(record),
            Err(AuditError::Gate(record)) => Some(&**record),
            Err(_) => None,
        };
        if let Some(record) = judged {
            reporter.message(&format!(
                "audit: {:.2}% of {} rules pass",
                record.score_centi as f64 / 100.0,
                record.passed + record.failed
            ));
        }
        Ok(record?)
    }

    /// Uploads, scans, downloads: the ARF text, the dpkg status database and the Debian
    /// version (when the builder has them).
    async fn scan(
        &self,
        session: &Session,
        dir: &str,
        cancel: &(dyn Fn() -> bool + Sync),
    ) -> Result<Downloaded, InstanceError> {
        session
            .upload_file(
                &self.prepared.bundle.archive,
                &format!("{dir}/{}", remote::BUNDLE_FILE),
                0o600,
            )
            .await
            .map_err(ssh_error)?;
        session
            .upload_file(
                &self.prepared.datastream_gz,
                &format!("{dir}/{}", remote::DATASTREAM_FILE),
                0o600,
            )
            .await
            .map_err(ssh_error)?;
        let script = RemoteScript {
            name: "audit".into(),
            script: self.prepared.scan_script(dir, &self.audit.profile),
            env: Vec::new(),
            run_as: RunAs::Root,
            workdir: None,
            timeout: SCAN_TIMEOUT,
        };
        let mut lines: Vec<OutputLine> = Vec::new();
        let code = session
            .run(&script, &mut lines, cancel)
            .await
            .map_err(ssh_error)?;
        if code != 0 {
            return Err(AuditError::Scan {
                root: PathBuf::from(format!("{}:/", self.instance_id)),
                code: i32::try_from(code).unwrap_or(-1),
                tail: lines
                    .iter()
                    .map(|l| l.text.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            }
            .into());
        }
        let results = format!("{dir}/{}", remote::RESULTS_FILE);
        let arf = session
            .read_file(&results)
            .await
            .map_err(ssh_error)?
            .ok_or_else(|| AuditError::Results {
                path: PathBuf::from(format!("{}:{results}", self.instance_id)),
                reason: "the scanner wrote no results".into(),
            })?;
        let (dpkg_status, debian_version) = if self.audit.support_status {
            (
                session.read_file(DPKG_STATUS).await.map_err(ssh_error)?,
                session.read_file(DEBIAN_VERSION).await.map_err(ssh_error)?,
            )
        } else {
            (None, None)
        };
        Ok(Downloaded {
            arf,
            dpkg_status,
            debian_version,
        })
    }

    async fn remove(&self, session: &Session, dir: &str) -> Result<(), InstanceError> {
        let script = RemoteScript {
            name: "audit cleanup".into(),
            script: remote::cleanup_script(dir),
            env: Vec::new(),
            run_as: RunAs::Root,
            workdir: None,
            timeout: REMOVE_TIMEOUT,
        };
        let mut lines: Vec<OutputLine> = Vec::new();
        // Not cancellable: an interrupted build still leaves no scan on the builder it can.
        let result = session.run(&script, &mut lines, &|| false).await;
        match result {
            Ok(0) => Ok(()),
            Ok(code) => Err(InstanceError::ScanNotRemoved {
                dir: dir.to_owned(),
                instance: self.instance_id.to_owned(),
                reason: format!(
                    "exit {code}: {}",
                    lines
                        .iter()
                        .map(|l| l.text.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            }),
            Err(e) => Err(InstanceError::ScanNotRemoved {
                dir: dir.to_owned(),
                instance: self.instance_id.to_owned(),
                reason: crate::diagnostic::error_chain(&e),
            }),
        }
    }
}

fn ssh_error(e: SshError) -> InstanceError {
    match e {
        SshError::Interrupted { .. } => InstanceError::Interrupted,
        other => InstanceError::Ssh(other),
    }
}
