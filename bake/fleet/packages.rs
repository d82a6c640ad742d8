//! Which installed packages a moved archive brings a new version of: the packages of the last
//! build's image (its dpkg status, read from the layers in the store) against each pinned
//! suite's `Packages` index as the archive serves it now.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Serialize;

use crate::plan::archive::ArchiveError;
use crate::provenance::dpkg::{self, DebPackage};
use crate::provenance::imagefs::ImageFs;
use crate::recipe::ArchiveSuite;
use crate::store::{BuildRecord, Store};

/// An installed package a suite now has a newer version of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageChange {
    pub name: String,
    pub built: String,
    pub now: String,
    /// The suite that offers `now`.
    pub suite: String,
    /// Whether that suite is a security suite (`*-security`, or an archive whose URL says so).
    pub security: bool,
}

/// The packages installed in the image `record` names, when its layers are in the store.
pub fn installed(store: &Store, record: &BuildRecord) -> Option<Vec<DebPackage>> {
    let image = record.image()?;
    let fs = ImageFs::read(store, &image.layers).ok()?;
    let status = fs.content("var/lib/dpkg/status")?;
    dpkg::parse_status("var/lib/dpkg/status", &String::from_utf8_lossy(status)).ok()
}

/// Each package's newest version in `archive`'s `components` for `architecture` (and `all`).
pub fn archive_versions(
    archive: &ArchiveSuite,
    components: &[String],
    architecture: &str,
) -> Result<BTreeMap<String, String>, ArchiveError> {
    let mut versions: BTreeMap<String, String> = BTreeMap::new();
    for component in components {
        let index = format!("{component}/binary-{architecture}/Packages");
        let text = fetch_index(archive, &index)?;
        for (name, version) in parse_packages(&text) {
            match versions.get(&name) {
                Some(known) if compare_versions(known, &version) != Ordering::Less => {}
                _ => {
                    versions.insert(name, version);
                }
            }
        }
    }
    Ok(versions)
}

/// The installed packages for which some suite now offers a newer version, by name.
pub fn changes(
    installed: &[DebPackage],
    suites: &[(ArchiveSuite, BTreeMap<String, String>)],
) -> Vec<PackageChange> {
    let mut out = Vec::new();
    for package in installed {
        let newest = suites
            .iter()
            .filter_map(|(suite, versions)| versions.get(&package.name).map(|v| (suite, v)))
            .max_by(|a, b| compare_versions(a.1, b.1));
        if let Some((suite, version)) = newest
            && compare_versions(version, &package.version) == Ordering::Greater
        {
            out.push(PackageChange {
                name: package.name.clone(),
                built: package.version.clone(),
                now: version.clone(),
                suite: suite.suite.clone(),
                security: suite.suite.ends_with("-security") || suite.mirror.contains("security"),
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// `Package`/`Version` pairs of a `Packages` index.
fn parse_packages(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut name = None;
        let mut version = None;
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("Package:") {
                name = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Version:") {
                version = Some(v.trim().to_owned());
            }
        }
        if let (Some(name), Some(version)) = (name, version) {
            out.push((name, version));
        }
    }
    out
}

/// A file under the suite's `dists/` directory, decompressed: `.xz` (through `xz`, which every
/// Debian-family system has), `.gz`, or plain, whichever the archive serves first.
fn fetch_index(archive: &ArchiveSuite, index: &str) -> Result<String, ArchiveError> {
    let base = format!(
        "{}/dists/{}/{index}",
        archive.mirror.trim_end_matches('/'),
        archive.suite
    );
    for (suffix, decode) in [
        (
            ".xz",
            decode_xz as fn(Vec<u8>) -> Result<Vec<u8>, ArchiveError>,
        ),
        (".gz", decode_gz),
        ("", Ok),
    ] {
        if let Some(bytes) = get(&format!("{base}{suffix}"))? {
            let bytes = decode(bytes)?;
            return Ok(String::from_utf8_lossy(&bytes).into_owned());
        }
    }
    Err(format!("{base}: the archive serves no Packages index (.xz, .gz or plain)").into())
}

/// The bytes at `url`, or `None` when it does not exist.
fn get(url: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
    if let Some(path) = url.strip_prefix("file://") {
        return match std::fs::read(Path::new(path)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{path}: {e}").into()),
        };
    }
    let url = url.to_owned();
    std::thread::spawn(move || -> Result<Option<Vec<u8>>, ArchiveError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let response = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(300))
                .build()?
                .get(&url)
                .send()
                .await?;
            if response.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            Ok(Some(response.error_for_status()?.bytes().await?.to_vec()))
        })
    })
    .join()
    .map_err(|_| "the archive reader thread panicked")?
}

fn decode_gz(bytes: Vec<u8>) -> Result<Vec<u8>, ArchiveError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes.as_slice()).read_to_end(&mut out)?;
    Ok(out)
}

fn decode_xz(bytes: Vec<u8>) -> Result<Vec<u8>, ArchiveError> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("xz")
        .args(["--decompress", "--stdout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("failed to start xz to read a Packages.xz index: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(&bytes));
    let output = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| "the xz writer thread panicked")??;
    if !output.status.success() {
        return Err(format!(
            "xz failed to decompress a Packages index: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(output.stdout)
}

/// Debian's version order (deb-version(7)): epoch numerically, then the upstream version and
/// the revision, each compared as alternating non-digit parts (`~` before everything, even the
/// end; letters before other characters) and digit parts (numerically).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, rest)) if e.chars().all(|c| c.is_ascii_digit()) => {
                (e.parse().unwrap_or(0), rest)
            }
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((upstream, revision)) => (epoch, upstream, revision),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: Option<u8>) -> i32 {
        match c {
            Some(b'~') => -1,
            None => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(c) => i32::from(c) + 256,
        }
    }
    fn part(a: &str, b: &str) -> Ordering {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            // Non-digit prefixes, character by character.
            while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit())
            {
                let ca = (i < a.len() && !a[i].is_ascii_digit()).then(|| a[i]);
                let cb = (j < b.len() && !b[j].is_ascii_digit()).then(|| b[j]);
                let ordering = order(ca).cmp(&order(cb));
                if ordering != Ordering::Equal {
                    return ordering;
                }
                if ca.is_some() {
                    i += 1;
                }
                if cb.is_some() {
                    j += 1;
                }
            }
            // Digit runs, numerically (leading zeros do not count).
            let start_a = i;
            while i < a.len() && a[i].is_ascii_digit() {
                i += 1;
            }
            let start_b = j;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let da = std::str::from_utf8(&a[start_a..i])
                .unwrap_or("")
                .trim_start_matches('0');
            let db = std::str::from_utf8(&b[start_b..j])
                .unwrap_or("")
                .trim_start_matches('0');
            let ordering = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
            if ordering != Ordering::Equal {
                return ordering;
            }
        }
        Ordering::Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| part(ua, ub))
        .then_with(|| part(ra, rb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_versions_order_as_dpkg_orders_them() {
        // Each is lower than the next (dpkg --compare-versions agrees).
        let ascending = [
            "1.0~rc1",
            "1.0",
            "1.0-1",
            "1.0-1+deb12u1",
            "1.0-2",
            "1.0a",
            "1.0+b1",
            "1.2",
            "1.10",
            "7.88.1-10+deb12u5",
            "7.88.1-10+deb12u6",
            "1:0.1",
        ];
        for pair in ascending.windows(2) {
            assert_eq!(
                compare_versions(pair[0], pair[1]),
                Ordering::Less,
                "{pair:?}"
            );
            assert_eq!(
                compare_versions(pair[1], pair[0]),
                Ordering::Greater,
                "{pair:?}"
            );
        }
        assert_eq!(compare_versions("1.01", "1.1"), Ordering::Equal);
        assert_eq!(compare_versions("0:1.0", "1.0"), Ordering::Equal);
    }

    #[test]
    fn a_newer_version_in_a_security_suite_is_flagged() {
        let installed = |name: &str, version: &str| DebPackage {
            name: name.into(),
            architecture: "amd64".into(),
            version: version.into(),
            source: name.into(),
            source_version: None,
            maintainer: None,
            depends: Vec::new(),
        };
        let suite = |mirror: &str, suite: &str, packages: &[(&str, &str)]| {
            (
                ArchiveSuite {
                    mirror: mirror.into(),
                    suite: suite.into(),
                },
                packages
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
            )
        };
        let suites = [
            suite(
                "http://deb.debian.org/debian",
                "bookworm",
                &[("curl", "7.88.1-10+deb12u5"), ("bash", "5.2.15-2+b2")],
            ),
            suite(
                "http://deb.debian.org/debian-security",
                "bookworm-security",
                &[("curl", "7.88.1-10+deb12u6")],
            ),
        ];
        let found = changes(
            &[
                installed("curl", "7.88.1-10+deb12u5"),
                installed("bash", "5.2.15-2+b2"),
            ],
            &suites,
        );
        assert_eq!(
            found,
            [PackageChange {
                name: "curl".into(),
                built: "7.88.1-10+deb12u5".into(),
                now: "7.88.1-10+deb12u6".into(),
                suite: "bookworm-security".into(),
                security: true,
            }]
        );
    }

    #[test]
    fn packages_indices_are_read_plain_gzipped_or_xz() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("dists/stable/main/binary-amd64");
        std::fs::create_dir_all(&index).unwrap();
        let text = "Package: a\nVersion: 1.0\nArchitecture: amd64\n\nPackage: a\nVersion: 1.1\n\nPackage: b\nVersion: 2\n";
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf '{}' | xz > '{}'",
                text.replace('\n', "\\n"),
                index.join("Packages.xz").display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        let archive = ArchiveSuite {
            mirror: format!("file://{}", dir.path().display()),
            suite: "stable".into(),
        };
        let versions = archive_versions(&archive, &["main".into()], "amd64").unwrap();
        assert_eq!(versions["a"], "1.1");
        assert_eq!(versions["b"], "2");
        std::fs::remove_file(index.join("Packages.xz")).unwrap();
        std::fs::write(index.join("Packages"), "Package: c\nVersion: 3\n").unwrap();
        let versions = archive_versions(&archive, &["main".into()], "amd64").unwrap();
        assert_eq!(versions.keys().collect::<Vec<_>>(), ["c"]);
    }
}
