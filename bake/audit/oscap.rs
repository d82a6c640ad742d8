//! Running Debian 12's `oscap` (openscap-scanner 1.3.x) on an offline root, and reading its
//! XCCDF results.
//!
//! Offline scanning has traps, each handled here rather than left to the content:
//! - `OSCAP_PROBE_ROOT` points the probes at the root (what `oscap-chroot` does), but the
//!   `dpkginfo` probe reads the *host's* apt configuration: `APT_CONFIG` names one without
//!   `Dir::Etc::Parts` drop-ins.
//! - The environment probe reads `/proc/<pid>/environ` under the root: a fresh procfs of the
//!   scan's own pid namespace is mounted there, and `PATH` is root's standard one, so rules about
//!   root's `PATH` judge the image's directories, not the caller's shell.
//! - The partition probe reads the mount table of the scan's mount namespace, which starts as a
//!   copy of the host's: the host's mounts on the paths CIS asks about (`/tmp`, `/dev/shm`, …)
//!   are detached in that namespace so the host never answers for the image.
//! - Script-checked (SCE) rules run their script on the scanning host: their results say
//!   nothing about the image, so they are reported as [`Outcome::HostOnly`].
//! - For a container target, `/run/.containerenv` is created in the overlay's upper layer (as
//!   podman does when it runs an image): SSG's own container detection (the OVAL check behind
//!   its `machine` and `not_container` platforms) then finds a container, and `oscap` itself
//!   marks the machine-only rules not applicable. bake keeps no list of such rules.
//! - Results are written as ARF, which holds the verdicts of the CPE OVAL definitions behind
//!   every platform beside the rule results: each not-applicable rule is reported with the
//!   platform that kept it out, as this scan decided it ([`super::content`]).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuditError;
use super::content::{self, Content};
use crate::recipe::AuditTarget;

/// The oscap release line the offline tricks above were checked against.
const SUPPORTED_MAJOR_MINOR: &str = "1.3.";

/// Root's `PATH` on Debian (`/etc/profile`, `login.defs`' `ENV_SUPATH`).
const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Mount points CIS content asks about; the host's mounts there are hidden from the scan.
const HIDDEN_HOST_MOUNTS: &[&str] = &[
    "/dev/shm",
    "/tmp",
    "/var/tmp",
    "/home",
    "/var/log/audit",
    "/var/log",
    "/boot",
    "/opt",
    "/srv",
];

/// How many lines of a failing tool's output an error shows.
const ERROR_TAIL_LINES: usize = 20;

const SCE_SYSTEM: &str = "http://open-scap.org/page/SCE";
const RULE_PREFIX: &str = "xccdf_org.ssgproject.content_rule_";
const PROFILE_PREFIX: &str = "xccdf_org.ssgproject.content_profile_";

/// A rule's result, as XCCDF names it, plus `host_only` for checks that ran on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Error,
    Unknown,
    NotApplicable,
    NotChecked,
    NotSelected,
    Informational,
    Fixed,
    HostOnly,
}

impl Outcome {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pass" => Outcome::Pass,
            "fail" => Outcome::Fail,
            "error" => Outcome::Error,
            "unknown" => Outcome::Unknown,
            "notapplicable" => Outcome::NotApplicable,
            "notchecked" => Outcome::NotChecked,
            "notselected" => Outcome::NotSelected,
            "informational" => Outcome::Informational,
            "fixed" => Outcome::Fixed,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Error => "error",
            Outcome::Unknown => "unknown",
            Outcome::NotApplicable => "notapplicable",
            Outcome::NotChecked => "notchecked",
            Outcome::NotSelected => "notselected",
            Outcome::Informational => "informational",
            Outcome::Fixed => "fixed",
            Outcome::HostOnly => "host_only",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleResult {
    /// The short id (`sshd_disable_root_login`).
    pub id: String,
    pub severity: String,
    pub result: Outcome,
    /// Why a `notapplicable` rule did not apply: the data stream's platforms that the scan
    /// found unmet, with the scanner's verdict on each definition they test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The selected rules of one scan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Scan {
    pub profile: String,
    pub rules: Vec<RuleResult>,
}

/// `oscap`'s version, refused unless it is 1.3.x.
pub fn version() -> Result<String, AuditError> {
    let output = Command::new("oscap")
        .arg("--version")
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => AuditError::Missing { program: "oscap" },
            _ => AuditError::Spawn {
                program: "oscap",
                source,
            },
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let found = text
        .lines()
        .next()
        .and_then(|line| line.rsplit(' ').next())
        .unwrap_or("")
        .to_owned();
    if !found.starts_with(SUPPORTED_MAJOR_MINOR) {
        return Err(AuditError::Version { found });
    }
    Ok(found)
}

/// A data stream ready for `oscap`: decompressed (cached by digest) when it was `.xz`.
#[derive(Debug, Clone)]
pub struct Datastream {
    /// The file as the recipe (or the command line) names it.
    pub source: PathBuf,
    pub xml: PathBuf,
    /// `sha256:…` of the file the recipe names.
    pub digest: String,
}

impl Datastream {
    pub fn prepare(path: &Path, cache: &Path) -> Result<Self, AuditError> {
        let read = |source| AuditError::Datastream {
            path: path.to_path_buf(),
            source,
        };
        let mut file = fs_err::File::open(path).map_err(read)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let n = file.read(&mut buffer).map_err(read)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let digest = crate::id::Digest::from_hasher(hasher);
        let hex = digest.hex().to_owned();
        let digest = digest.to_string();
        let is_xz = path.extension().is_some_and(|e| e == "xz");
        if !is_xz {
            return Ok(Datastream {
                source: path.to_path_buf(),
                xml: path.to_path_buf(),
                digest,
            });
        }
        let xml = cache.join(format!("{hex}.xml"));
        if xml.is_file() {
            return Ok(Datastream {
                source: path.to_path_buf(),
                xml,
                digest,
            });
        }
        let io = |source| AuditError::Io {
            path: cache.to_path_buf(),
            source,
        };
        fs_err::create_dir_all(cache).map_err(io)?;
        let temp = tempfile::NamedTempFile::new_in(cache).map_err(io)?;
        let output = Command::new("xz")
            .arg("--decompress")
            .arg("--stdout")
            .arg(path)
            .stdout(temp.as_file().try_clone().map_err(io)?)
            .output()
            .map_err(|source| AuditError::Spawn {
                program: "xz",
                source,
            })?;
        if !output.status.success() {
            return Err(AuditError::Decompress {
                path: path.to_path_buf(),
                reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        temp.as_file().sync_all().map_err(io)?;
        temp.persist(&xml).map_err(|e| io(e.error))?;
        Ok(Datastream {
            source: path.to_path_buf(),
            xml,
            digest,
        })
    }

    /// Reads the data stream's applicability content, refusing one that does not have
    /// `profile`.
    pub fn content(&self, profile: &str) -> Result<Content, AuditError> {
        let text = fs_err::read_to_string(&self.xml).map_err(|source| AuditError::Datastream {
            path: self.source.clone(),
            source,
        })?;
        let content = Content::parse(&text);
        if !content.profiles().iter().any(|p| p == profile) {
            return Err(AuditError::NoProfile {
                profile: profile.to_owned(),
                datastream: self.source.clone(),
                available: content
                    .profiles()
                    .iter()
                    .map(|p| p.strip_prefix(PROFILE_PREFIX).unwrap_or(p).to_owned())
                    .collect(),
            });
        }
        Ok(content)
    }
}

/// The scan, run by `sh` inside `unshare --mount --pid --fork`: arguments, never interpolated.
const SCAN_SCRIPT: &str = r#"set -eu
root=$1 upper=$2 work=$3 merged=$4 container=$5 ds=$6 profile=$7 results=$8 aptconf=$9
shift 9
mount -t overlay overlay -o "lowerdir=$root,upperdir=$upper,workdir=$work" "$merged"
mkdir -p "$merged/proc" "$merged/run"
mount -t proc proc "$merged/proc"
if [ "$container" = 1 ]; then : >"$merged/run/.containerenv"; fi
for m in "$@"; do
	while mountpoint -q "$m"; do umount -l "$m"; done
done
set +e
APT_CONFIG=$aptconf OSCAP_PROBE_ROOT=$merged PATH=$BAKE_ROOT_PATH \
	oscap xccdf eval --profile "$profile" --results-arf "$results" "$ds"
code=$?
# 2: the scan ran and some rule failed.
if [ "$code" -eq 2 ]; then exit 0; fi
exit "$code"
"#;

/// Scans `root` with `profile` of `datastream` through an overlay; `work` holds the scratch
/// directories (removed afterwards).
pub fn scan(
    root: &Path,
    datastream: &Datastream,
    profile: &str,
    target: AuditTarget,
    work: &Path,
) -> Result<Scan, AuditError> {
    let applicability = datastream.content(profile)?;
    let root = fs_err::canonicalize(root).map_err(|source| AuditError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    if root == Path::new("/") {
        return Err(AuditError::BadRoot {
            root,
            reason: "it is the host's root; bake scans image roots only".into(),
        });
    }
    let text = root.to_string_lossy();
    if text.contains([',', ':', '\\']) || !root.join("etc").is_dir() {
        return Err(AuditError::BadRoot {
            reason: if root.join("etc").is_dir() {
                "its path holds `,`, `:` or `\\`, which an overlay mount cannot take".into()
            } else {
                "it has no /etc: not a root filesystem".into()
            },
            root,
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AuditError::Io { path, source }
    };
    fs_err::create_dir_all(work).map_err(io(work))?;
    let scratch = tempfile::Builder::new()
        .prefix("audit-")
        .tempdir_in(work)
        .map_err(io(work))?;
    let dir = scratch.path();
    for sub in ["upper", "work", "merged"] {
        fs_err::create_dir(dir.join(sub)).map_err(io(dir))?;
    }
    let apt_conf = dir.join("apt.conf");
    // An empty parts directory: the host's apt drop-ins must not steer the dpkginfo probe.
    fs_err::create_dir(dir.join("apt.conf.d")).map_err(io(dir))?;
    // The probe already reads the dpkg database under OSCAP_PROBE_ROOT.
    fs_err::write(
        &apt_conf,
        format!(
            "Dir::Etc::Parts \"{}\";\n",
            dir.join("apt.conf.d").display()
        ),
    )
    .map_err(io(&apt_conf))?;
    let results = dir.join("results-arf.xml");
    let output = Command::new("unshare")
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--propagation",
            "private",
            "--",
        ])
        .arg("sh")
        .arg("-c")
        .arg(SCAN_SCRIPT)
        .arg("bake-audit")
        .arg(&root)
        .arg(dir.join("upper"))
        .arg(dir.join("work"))
        .arg(dir.join("merged"))
        .arg(if target == AuditTarget::Container {
            "1"
        } else {
            "0"
        })
        .arg(&datastream.xml)
        .arg(profile)
        .arg(&results)
        .arg(&apt_conf)
        .args(HIDDEN_HOST_MOUNTS)
        .env("BAKE_ROOT_PATH", ROOT_PATH)
        .env("LC_ALL", "C.UTF-8")
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => AuditError::Missing { program: "unshare" },
            _ => AuditError::Spawn {
                program: "unshare",
                source,
            },
        })?;
    if !output.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        return Err(AuditError::Scan {
            root,
            code: output.status.code().unwrap_or(-1),
            tail: lines[lines.len().saturating_sub(ERROR_TAIL_LINES)..].join("\n"),
        });
    }
    let arf = fs_err::read_to_string(&results).map_err(|e| AuditError::Results {
        path: results.clone(),
        reason: e.to_string(),
    })?;
    read_arf(
        &arf,
        &applicability,
        profile,
        &Scanned {
            results: &results,
            root: &root,
            checks_ran_on: ChecksRanOn::Host,
        },
    )
}

/// Where the scanner's script-checked (SCE) rules ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksRanOn {
    /// The build host (an offline scan of a root directory): their results say nothing about
    /// the image and become [`Outcome::HostOnly`].
    Host,
    /// The scanned machine itself (a live scan on a builder): their results count.
    Target,
}

/// What an ARF document is the result of, for its errors and its script-checked rules.
#[derive(Debug, Clone, Copy)]
pub struct Scanned<'a> {
    /// Where the results were read from.
    pub results: &'a Path,
    /// The scanned root, as errors show it.
    pub root: &'a Path,
    pub checks_ran_on: ChecksRanOn,
}

/// The scan an ARF results document records: every selected rule's result, each
/// not-applicable one with the platform that kept it out (from the same document's CPE OVAL
/// verdicts). Offline and live scans are read by this one function, so their records agree.
pub fn read_arf(
    arf: &str,
    applicability: &Content,
    profile: &str,
    scanned: &Scanned<'_>,
) -> Result<Scan, AuditError> {
    let mut rules =
        parse_results(arf, scanned.checks_ran_on).map_err(|reason| AuditError::Results {
            path: scanned.results.to_path_buf(),
            reason,
        })?;
    // The CPE OVAL verdicts of this very scan say which platform kept a rule out.
    let facts = content::facts(arf);
    for rule in &mut rules {
        if rule.result == Outcome::NotApplicable {
            rule.reason = Some(applicability.why_not_applicable(&rule.id, &facts));
        }
    }
    let scan = Scan {
        profile: profile.to_owned(),
        rules,
    };
    if !scan
        .rules
        .iter()
        .any(|r| matches!(r.result, Outcome::Pass | Outcome::Fail))
    {
        return Err(AuditError::NothingEvaluated {
            profile: profile.to_owned(),
            root: scanned.root.to_path_buf(),
        });
    }
    Ok(scan)
}

/// The selected rules of an XCCDF 1.2 results document (`notselected` ones are left out).
pub fn parse_results(xml: &str, checks_ran_on: ChecksRanOn) -> Result<Vec<RuleResult>, String> {
    let mut rules = Vec::new();
    let mut rest = xml;
    while let Some(start) = find_tag(rest, "rule-result") {
        let element = &rest[start..];
        let end = element
            .find("</rule-result>")
            .ok_or("a rule-result element is not closed")?;
        let body = &element[..end];
        let open_end = body.find('>').ok_or("a rule-result tag is not closed")?;
        let open = &body[..open_end];
        let idref = attribute(open, "idref").ok_or("a rule-result has no idref")?;
        let severity = attribute(open, "severity").unwrap_or("unknown");
        let result_text = element_text(body, "result").ok_or("a rule-result has no result")?;
        let result = Outcome::parse(result_text)
            .ok_or_else(|| format!("rule `{idref}` has the unknown result `{result_text}`"))?;
        let host_only =
            checks_ran_on == ChecksRanOn::Host && check_system(body) == Some(SCE_SYSTEM);
        let result = match result {
            Outcome::Pass | Outcome::Fail if host_only => Outcome::HostOnly,
            other => other,
        };
        if result != Outcome::NotSelected {
            rules.push(RuleResult {
                id: idref.strip_prefix(RULE_PREFIX).unwrap_or(idref).to_owned(),
                severity: severity.to_owned(),
                result,
                reason: None,
            });
        }
        rest = &element[end + "</rule-result>".len()..];
    }
    Ok(rules)
}

/// The offset of the next `<NAME` opening tag (oscap writes results without a prefix).
fn find_tag(text: &str, name: &str) -> Option<usize> {
    let needle = format!("<{name}");
    let mut from = 0;
    while let Some(found) = text[from..].find(&needle) {
        let at = from + found;
        if matches!(
            text[at + needle.len()..].chars().next(),
            Some(' ' | '>' | '\n' | '\t' | '/')
        ) {
            return Some(at);
        }
        from = at + needle.len();
    }
    None
}

fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

fn element_text<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let start = find_tag(body, name)?;
    let open_end = start + body[start..].find('>')? + 1;
    let close = body[open_end..].find("</")?;
    Some(body[open_end..open_end + close].trim())
}

fn check_system(body: &str) -> Option<&str> {
    let start = find_tag(body, "check")?;
    let open_end = start + body[start..].find('>')?;
    attribute(&body[start..open_end], "system")
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESULTS: &str = r##"<?xml version="1.0"?>
<Benchmark xmlns="http://checklists.nist.gov/xccdf/1.2"><TestResult id="t">
<rule-result idref="xccdf_org.ssgproject.content_rule_sshd_disable_root_login" role="full" time="t" severity="medium" weight="1.0">
  <result>pass</result>
  <check system="http://oval.mitre.org/XMLSchema/oval-definitions-5"><check-content-ref name="oval:x" href="#oval0"/></check>
</rule-result>
<rule-result idref="xccdf_org.ssgproject.content_rule_partition_for_tmp" role="full" time="t" severity="low" weight="1.0">
  <result>fail</result>
</rule-result>
<rule-result idref="xccdf_org.ssgproject.content_rule_set_nftables_base_chain" role="full" time="t" severity="medium" weight="1.0">
  <result>fail</result>
  <check system="http://open-scap.org/page/SCE"><check-content-ref href="x.sh"/></check>
</rule-result>
<rule-result idref="xccdf_org.ssgproject.content_rule_other" role="full" time="t" severity="low" weight="1.0">
  <result>notselected</result>
</rule-result>
</TestResult></Benchmark>"##;

    #[test]
    fn results_are_read_per_rule_and_host_checks_set_apart() {
        let rules = parse_results(RESULTS, ChecksRanOn::Host).unwrap();
        let got: Vec<(&str, &str, Outcome)> = rules
            .iter()
            .map(|r| (r.id.as_str(), r.severity.as_str(), r.result))
            .collect();
        assert_eq!(
            got,
            vec![
                ("sshd_disable_root_login", "medium", Outcome::Pass),
                ("partition_for_tmp", "low", Outcome::Fail),
                ("set_nftables_base_chain", "medium", Outcome::HostOnly),
            ]
        );
        // On a live machine the script ran on the image itself: its verdict counts.
        let live = parse_results(RESULTS, ChecksRanOn::Target).unwrap();
        assert_eq!(live[2].result, Outcome::Fail);
    }

    #[test]
    fn broken_results_are_an_error() {
        assert!(
            parse_results(
                "<rule-result idref=\"x\"><result>maybe</result></rule-result>",
                ChecksRanOn::Host
            )
            .is_err()
        );
        assert!(
            parse_results(
                "<rule-result severity=\"low\"><result>pass</result></rule-result>",
                ChecksRanOn::Host
            )
            .is_err()
        );
        assert_eq!(
            parse_results("<TestResult/>", ChecksRanOn::Host)
                .unwrap()
                .len(),
            0
        );
    }
}
