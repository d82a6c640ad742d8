//! The compliance gate: an offline OpenSCAP scan of a provisioned root filesystem, scored
//! against a recipe's `audit:` thresholds, and Debian's security-support check of its packages.
//!
//! ```text
//!  root dir ──► overlay (private mount + pid namespace) ──► oscap xccdf eval ──► per-rule results
//!          └──► check-support-status on its dpkg database ──► packages out of support
//!                                                 └──► gate: score, thresholds, exceptions
//! ```
//!
//! The scan never writes into the image: `oscap` reads the root through an overlay whose upper
//! layer is a scratch directory, inside a mount namespace of its own, so even a probe that
//! writes (or a crash halfway) leaves the image's files untouched. The entry point is
//! [`audit_root`], one call on a root directory, so OCI and AMI builds share it.

pub mod content;
pub mod oscap;
pub mod remote;
pub mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::recipe::{Audit, AuditTarget};

pub use oscap::{Outcome, RuleResult, Scan};
pub use support::EndedPackage;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("`{program}` is not installed, so bake cannot audit the image")]
    Missing { program: &'static str },
    #[error("`oscap` is version {found}; bake's gate needs Debian 12's openscap-scanner 1.3.x")]
    Version { found: String },
    #[error("failed to run `{program}`")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the scan of `{}` failed (exit {code}):\n{tail}", root.display())]
    Scan {
        root: PathBuf,
        code: i32,
        tail: String,
    },
    #[error("`{}` cannot be scanned: {reason}", root.display())]
    BadRoot { root: PathBuf, reason: String },
    #[error("failed to read the SCAP data stream `{}`", path.display())]
    Datastream {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to decompress the SCAP data stream `{}`: {reason}", path.display())]
    Decompress { path: PathBuf, reason: String },
    #[error("the scan results `{}` cannot be read: {reason}", path.display())]
    Results { path: PathBuf, reason: String },
    #[error(
        "the SCAP data stream `{}` has no profile `{profile}`",
        datastream.display()
    )]
    NoProfile {
        profile: String,
        datastream: PathBuf,
        /// Short ids of the profiles it has.
        available: Vec<String>,
    },
    #[error("profile `{profile}` selects no rule that applies to `{}`", root.display())]
    NothingEvaluated { profile: String, root: PathBuf },
    #[error("`check-support-status` failed on `{}` (exit {code}):\n{tail}", root.display())]
    Support {
        root: PathBuf,
        code: i32,
        tail: String,
    },
    #[error("failed to prepare the scan in `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", gate_message(.0))]
    Gate(Box<AuditRecord>),
    #[error(
        "the compliance gate cannot run on an {builder} builder from this {host} machine: bake uploads this machine's `oscap` to the builder"
    )]
    Architecture { host: String, builder: String },
    #[error("failed to bundle this machine's `oscap` for the builder: {reason}")]
    Bundle { reason: String },
}

impl AuditError {
    pub fn hint(&self) -> Option<String> {
        match self {
            AuditError::Missing { program: "oscap" } => {
                Some("install it with `apt-get install openscap-scanner`".into())
            }
            AuditError::Missing {
                program: "check-support-status",
            } => Some("install it with `apt-get install debian-security-support`".into()),
            AuditError::Missing { program: "ldd" } => {
                Some("install it with `apt-get install libc-bin`".into())
            }
            AuditError::Missing { .. } => None,
            AuditError::Version { .. } => {
                Some("install Debian 12's `openscap-scanner` (1.3.7)".into())
            }
            AuditError::NoProfile { available, .. } => Some(format!(
                "its profiles are: {}",
                if available.is_empty() {
                    "none (is it a SCAP source data stream?)".to_owned()
                } else {
                    available.join(", ")
                }
            )),
            AuditError::NothingEvaluated { .. } => {
                Some("check the profile id and that the data stream is for this distribution".into())
            }
            AuditError::Architecture { builder, .. } => Some(format!(
                "run `bake build` on an {builder} machine with openscap-scanner, or build this AMI with `strategy: snapshot`"
            )),
            AuditError::Bundle { .. } => {
                Some("reinstall `openscap-scanner` (and `openscap-common` for the schemas)".into())
            }
            AuditError::Gate(_) => Some(
                "fix the image (a hardening step), or add the rule to `audit.exceptions` with a reason"
                    .into(),
            ),
            _ => None,
        }
    }
}

fn gate_message(record: &AuditRecord) -> String {
    let mut text = format!(
        "the image fails the compliance gate: {:.2}% of {} rules pass in profile `{}`",
        record.score_centi as f64 / 100.0,
        record.passed + record.failed,
        record.profile
    );
    for problem in &record.problems {
        text.push_str("\n  - ");
        text.push_str(problem);
    }
    if !record.failing.is_empty() {
        text.push_str("\nfailing rules:");
        for rule in &record.failing {
            text.push_str(&format!("\n  {} ({})", rule.id, rule.severity));
        }
    }
    if !record.unsupported_packages.is_empty() {
        text.push_str("\npackages whose security support ended:");
        for p in &record.unsupported_packages {
            text.push_str(&format!("\n  {} {}", p.package, p.version));
        }
    }
    text
}

/// What the gate found, for the build record (and the provenance manifest).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub scanner: String,
    pub scanner_version: String,
    /// The full XCCDF profile id.
    pub profile: String,
    /// `sha256:…` of the data stream as the recipe names it (compressed or not).
    pub datastream_digest: String,
    pub target: AuditTarget,
    pub passed: u32,
    /// Failing rules, exceptions included.
    pub failed: u32,
    /// Passing share in hundredths of a percent: passed / (passed + failed).
    pub score_centi: u32,
    pub min_pass_ratio_centi: Option<u32>,
    pub max_failures: Option<u32>,
    /// Failing rules not covered by an exception.
    pub failing: Vec<RuleSummary>,
    /// Failing rules the recipe accepts, with its reason.
    pub excepted: Vec<ExceptedRule>,
    /// Rules the scanner could not decide offline (`unknown`, `error`, host-only checks).
    pub undecided: Vec<RuleSummary>,
    /// Rules of the profile that did not apply to this root, each with the data stream's reason
    /// as the scan decided it (SSG's platforms: `machine`, a package, a mount point, …).
    #[serde(default)]
    pub not_applicable: Vec<NotApplicableRule>,
    pub unsupported_packages: Vec<EndedPackage>,
    /// Why the gate failed; empty when it passed.
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleSummary {
    pub id: String,
    pub severity: String,
    pub result: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotApplicableRule {
    pub id: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExceptedRule {
    pub id: String,
    pub reason: String,
}

/// Where the gate keeps decompressed data streams (by digest) and its scratch directories.
#[derive(Debug, Clone)]
pub struct AuditDirs {
    pub cache: PathBuf,
    pub work: PathBuf,
}

/// Scans `root` as `audit` says, checks package support, and judges the result: `Ok` with the
/// record when the gate passes, [`AuditError::Gate`] with the same record when it fails.
pub fn audit_root(root: &Path, audit: &Audit, dirs: &AuditDirs) -> Result<AuditRecord, AuditError> {
    let (record, _) = evaluate(root, audit, dirs)?;
    if record.problems.is_empty() {
        Ok(record)
    } else {
        Err(AuditError::Gate(Box::new(record)))
    }
}

/// The gate's whole evaluation of `root` (the scan, the support check, the judgement), whether
/// it passes or not: [`audit_root`] for builds, and `bake audit`, which shows every rule.
pub fn evaluate(
    root: &Path,
    audit: &Audit,
    dirs: &AuditDirs,
) -> Result<(AuditRecord, Scan), AuditError> {
    let version = oscap::version()?;
    let datastream = oscap::Datastream::prepare(&audit.datastream, &dirs.cache)?;
    let scan = oscap::scan(root, &datastream, &audit.profile, audit.target, &dirs.work)?;
    let unsupported = if audit.support_status {
        support::ended(root, &dirs.work)?
    } else {
        Vec::new()
    };
    let record = judge(&scan, audit, &version, &datastream.digest, unsupported);
    Ok((record, scan))
}

/// Applies the thresholds and exceptions of `audit` to `scan`.
pub fn judge(
    scan: &Scan,
    audit: &Audit,
    scanner_version: &str,
    datastream_digest: &str,
    unsupported_packages: Vec<EndedPackage>,
) -> AuditRecord {
    let mut failing = Vec::new();
    let mut excepted = Vec::new();
    let mut undecided = Vec::new();
    let mut not_applicable = Vec::new();
    let (mut passed, mut failed) = (0u32, 0u32);
    for rule in &scan.rules {
        match rule.result {
            Outcome::Pass => passed += 1,
            Outcome::Fail => {
                failed += 1;
                match audit.exceptions.get(&rule.id) {
                    Some(reason) => excepted.push(ExceptedRule {
                        id: rule.id.clone(),
                        reason: reason.clone(),
                    }),
                    None => failing.push(summary(rule)),
                }
            }
            Outcome::Error | Outcome::Unknown | Outcome::HostOnly => undecided.push(summary(rule)),
            Outcome::NotApplicable => not_applicable.push(NotApplicableRule {
                id: rule.id.clone(),
                reason: rule
                    .reason
                    .clone()
                    .unwrap_or_else(|| "the scanner gave no reason".into()),
            }),
            _ => {}
        }
    }
    let score_centi = score_centi(passed, failed);
    let mut problems = Vec::new();
    // Exceptions take a rule out of the count of failures, not out of the score: the score is
    // what the image is, the exceptions what the recipe accepts.
    if let Some(min) = audit.min_pass_ratio_centi {
        let accepted = score_centi_with(passed + excepted.len() as u32, failing.len() as u32);
        if accepted < min {
            problems.push(format!(
                "{:.2}% of rules pass (with exceptions), below the minimum of {:.2}%",
                accepted as f64 / 100.0,
                min as f64 / 100.0
            ));
        }
    }
    if let Some(max) = audit.max_failures
        && failing.len() as u32 > max
    {
        problems.push(format!(
            "{} rules fail (exceptions not counted), more than the {max} allowed",
            failing.len()
        ));
    }
    for package in &unsupported_packages {
        problems.push(format!(
            "package `{}` {} is out of Debian security support",
            package.package, package.version
        ));
    }
    let unused: Vec<&String> = audit
        .exceptions
        .keys()
        .filter(|id| !excepted.iter().any(|e| &e.id == *id))
        .collect();
    if !unused.is_empty() {
        tracing::info!(
            "audit exceptions for rules that did not fail: {}",
            unused
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    AuditRecord {
        scanner: "openscap".into(),
        scanner_version: scanner_version.into(),
        profile: audit.profile.clone(),
        datastream_digest: datastream_digest.into(),
        target: audit.target,
        passed,
        failed,
        score_centi,
        min_pass_ratio_centi: audit.min_pass_ratio_centi,
        max_failures: audit.max_failures,
        failing,
        excepted,
        undecided,
        not_applicable,
        unsupported_packages,
        problems,
    }
}

fn summary(rule: &RuleResult) -> RuleSummary {
    RuleSummary {
        id: rule.id.clone(),
        severity: rule.severity.clone(),
        result: rule.result,
    }
}

/// passed / (passed + failed) in hundredths of a percent, rounded down (a gate never rounds
/// an image up to its threshold); 100% when nothing was decided.
pub fn score_centi(passed: u32, failed: u32) -> u32 {
    score_centi_with(passed, failed)
}

fn score_centi_with(passed: u32, failed: u32) -> u32 {
    let total = u64::from(passed) + u64::from(failed);
    if total == 0 {
        return 10_000;
    }
    (u64::from(passed) * 10_000 / total) as u32
}

/// Per-rule results of a scan, for `bake audit --output json`.
pub fn results_by_rule(scan: &Scan) -> BTreeMap<String, Outcome> {
    scan.rules
        .iter()
        .map(|r| (r.id.clone(), r.result))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::Scanner;

    fn audit(min: Option<u32>, max: Option<u32>, exceptions: &[(&str, &str)]) -> Audit {
        Audit {
            scanner: Scanner::Openscap,
            datastream: PathBuf::from("/nonexistent"),
            datastream_path: "ds.xml".into(),
            profile: "xccdf_org.ssgproject.content_profile_cis_level1_server".into(),
            target: AuditTarget::Machine,
            min_pass_ratio_centi: min,
            max_failures: max,
            exceptions: exceptions
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
            support_status: true,
        }
    }

    fn scan(results: &[(&str, Outcome)]) -> Scan {
        Scan {
            profile: "p".into(),
            rules: results
                .iter()
                .map(|(id, result)| RuleResult {
                    id: (*id).into(),
                    severity: "medium".into(),
                    result: *result,
                    reason: (*result == Outcome::NotApplicable)
                        .then(|| format!("platform `machine` is not met ({id})")),
                })
                .collect(),
        }
    }

    #[test]
    fn the_score_counts_only_decided_rules_and_rounds_down() {
        assert_eq!(score_centi(225, 87), 7211);
        assert_eq!(score_centi(2, 1), 6666);
        assert_eq!(score_centi(0, 0), 10_000);
    }

    #[test]
    fn the_gate_names_failing_rules_and_honours_exceptions() {
        let s = scan(&[
            ("a", Outcome::Pass),
            ("b", Outcome::Pass),
            ("c", Outcome::Fail),
            ("d", Outcome::Fail),
            ("e", Outcome::NotApplicable),
            ("f", Outcome::HostOnly),
        ]);
        let record = judge(
            &s,
            &audit(Some(7500), None, &[]),
            "1.3.7",
            "sha256:x",
            vec![],
        );
        assert_eq!(
            (record.passed, record.failed, record.score_centi),
            (2, 2, 5000)
        );
        assert_eq!(record.failing.len(), 2);
        assert_eq!(record.undecided[0].id, "f");
        assert_eq!(
            record.not_applicable,
            [NotApplicableRule {
                id: "e".into(),
                reason: "platform `machine` is not met (e)".into()
            }]
        );
        assert_eq!(record.problems.len(), 1, "{:?}", record.problems);
        let message = gate_message(&record);
        assert!(message.contains("\n  c (medium)") && message.contains("\n  d (medium)"));

        let record = judge(
            &s,
            &audit(
                Some(7500),
                Some(0),
                &[("c", "no GRUB"), ("d", "site-specific")],
            ),
            "1.3.7",
            "sha256:x",
            vec![],
        );
        assert!(record.problems.is_empty(), "{:?}", record.problems);
        assert_eq!(
            record.score_centi, 5000,
            "exceptions do not change the score"
        );
        assert_eq!(record.excepted[0].reason, "no GRUB");
    }

    #[test]
    fn max_failures_and_unsupported_packages_fail_the_gate() {
        let s = scan(&[("a", Outcome::Pass), ("b", Outcome::Fail)]);
        let record = judge(&s, &audit(None, Some(0), &[]), "1.3.7", "sha256:x", vec![]);
        assert_eq!(record.problems.len(), 1);
        let ended = EndedPackage {
            package: "libnet-easytcp-perl".into(),
            version: "0.26-6".into(),
        };
        let record = judge(
            &s,
            &audit(None, Some(1), &[]),
            "1.3.7",
            "sha256:x",
            vec![ended],
        );
        assert!(record.problems[0].contains("libnet-easytcp-perl"));
    }
}
