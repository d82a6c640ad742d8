//! The installed-package database of a Debian-family root: `/var/lib/dpkg/status` and the
//! one-stanza files of `/var/lib/dpkg/status.d/` (distroless images), `/etc/os-release`, and
//! package URLs (`pkg:deb/debian/NAME@VERSION?arch=…&distro=…`).

use std::collections::BTreeMap;

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct DebPackage {
    pub name: String,
    pub architecture: String,
    /// Full Debian version, epoch included.
    pub version: String,
    /// The source package (the binary's own name when the stanza has no `Source`).
    pub source: String,
    /// The source version when it differs from the binary's (binNMUs).
    pub source_version: Option<String>,
    pub maintainer: Option<String>,
    pub depends: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DpkgError {
    #[error("{file}:{line}: `{text}` is neither `Field: value` nor a continuation line")]
    Syntax {
        file: String,
        line: usize,
        text: String,
    },
    #[error("{file}: the stanza at line {line} has no `{field}` field")]
    Missing {
        file: String,
        line: usize,
        field: &'static str,
    },
}

/// A deb822 stanza: field names lowercased, values with continuation lines joined by `\n`.
#[derive(Debug, Default)]
struct Stanza {
    line: usize,
    fields: BTreeMap<String, String>,
}

fn parse_stanzas(file: &str, text: &str) -> Result<Vec<Stanza>, DpkgError> {
    let mut stanzas = Vec::new();
    let mut current: Option<Stanza> = None;
    let mut last_field: Option<String> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            stanzas.extend(current.take());
            last_field = None;
            continue;
        }
        if line.starts_with('#') && current.is_none() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            let (Some(stanza), Some(field)) = (current.as_mut(), last_field.as_ref()) else {
                return Err(DpkgError::Syntax {
                    file: file.to_owned(),
                    line: number,
                    text: line.to_owned(),
                });
            };
            let value = stanza.fields.get_mut(field).expect("field was inserted");
            value.push('\n');
            value.push_str(line.trim());
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(DpkgError::Syntax {
                file: file.to_owned(),
                line: number,
                text: line.to_owned(),
            });
        };
        let name = name.trim().to_ascii_lowercase();
        let stanza = current.get_or_insert_with(|| Stanza {
            line: number,
            ..Stanza::default()
        });
        stanza.fields.insert(name.clone(), value.trim().to_owned());
        last_field = Some(name);
    }
    stanzas.extend(current);
    Ok(stanzas)
}

/// Parses a status file (or a `status.d` file) and returns its *installed* packages: a stanza
/// whose `Status` state is not `installed` (config files left behind, half-installed) is
/// skipped, since nothing of it runs in the image.
pub fn parse_status(file: &str, text: &str) -> Result<Vec<DebPackage>, DpkgError> {
    let mut packages = Vec::new();
    for stanza in parse_stanzas(file, text)? {
        let get = |field: &'static str| -> Result<String, DpkgError> {
            stanza
                .fields
                .get(field)
                .cloned()
                .ok_or_else(|| DpkgError::Missing {
                    file: file.to_owned(),
                    line: stanza.line,
                    field,
                })
        };
        let name = get("package")?;
        // status.d files of distroless images have no Status field: they are installed.
        if let Some(status) = stanza.fields.get("status")
            && status.split_whitespace().nth(2) != Some("installed")
        {
            continue;
        }
        let (source, source_version) = match stanza.fields.get("source") {
            Some(source) => match source.split_once(' ') {
                Some((name, version)) => (
                    name.to_owned(),
                    Some(
                        version
                            .trim()
                            .trim_start_matches('(')
                            .trim_end_matches(')')
                            .to_owned(),
                    ),
                ),
                None => (source.clone(), None),
            },
            None => (name.clone(), None),
        };
        let depends = stanza
            .fields
            .get("depends")
            .map(|d| {
                let mut names: Vec<String> = d
                    .split([',', '|'])
                    .filter_map(|alt| alt.split_whitespace().next())
                    .map(|n| n.split(':').next().unwrap_or(n).to_owned())
                    .filter(|n| !n.is_empty())
                    .collect();
                names.sort();
                names.dedup();
                names
            })
            .unwrap_or_default();
        packages.push(DebPackage {
            name,
            architecture: get("architecture")?,
            version: get("version")?,
            source,
            source_version,
            maintainer: stanza.fields.get("maintainer").cloned(),
            depends,
        });
    }
    Ok(packages)
}

/// What `/etc/os-release` says about the distribution.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OsRelease {
    pub id: String,
    pub version_id: Option<String>,
    pub version_codename: Option<String>,
    pub pretty_name: Option<String>,
}

impl OsRelease {
    pub fn parse(text: &str) -> OsRelease {
        let mut fields = BTreeMap::new();
        for line in text.lines() {
            if let Some((key, value)) = line.split_once('=') {
                let value = value.trim();
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                    .unwrap_or(value);
                fields.insert(key.trim().to_owned(), value.to_owned());
            }
        }
        OsRelease {
            id: fields.get("ID").cloned().unwrap_or_else(|| "debian".into()),
            version_id: fields.get("VERSION_ID").cloned(),
            version_codename: fields.get("VERSION_CODENAME").cloned(),
            pretty_name: fields.get("PRETTY_NAME").cloned(),
        }
    }

    /// The purl `distro` qualifier: `debian-12`, else the codename (testing has no version).
    pub fn distro(&self) -> Option<String> {
        match (&self.version_id, &self.version_codename) {
            (Some(version), _) => Some(format!("{}-{version}", self.id)),
            (None, Some(codename)) => Some(codename.clone()),
            (None, None) => None,
        }
    }
}

/// Percent-encodes everything but unreserved characters (and `:`, which purl leaves alone in
/// Debian versions' epochs).
fn purl_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b".-_~:".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `pkg:deb/<vendor>/<name>@<version>?arch=<arch>&distro=<distro>` (qualifiers sorted by key).
pub fn purl(vendor: &str, package: &DebPackage, distro: Option<&str>) -> String {
    let mut text = format!(
        "pkg:deb/{}/{}@{}?arch={}",
        purl_encode(&vendor.to_ascii_lowercase()),
        purl_encode(&package.name.to_ascii_lowercase()),
        purl_encode(&package.version),
        purl_encode(&package.architecture),
    );
    if let Some(distro) = distro {
        text.push_str("&distro=");
        text.push_str(&purl_encode(distro));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "\
Package: libstdc++6
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: same
Source: gcc-12 (12.2.0-14)
Version: 12.2.0-14+deb12u1
Maintainer: Debian GCC Maintainers <debian-gcc@lists.debian.org>
Depends: gcc-12-base (= 12.2.0-14), libc6 (>= 2.36),
 libgcc-s1 (>= 4.2) | libgcc1:amd64
Description: GNU Standard C++ Library v3
 This package contains an additional runtime library.
 .
 More text.

Package: old-tool
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: attr
Status: install ok installed
Architecture: amd64
Version: 1:2.5.1-4
Source: attr
";

    #[test]
    fn installed_packages_with_sources_and_continuations() {
        let packages = parse_status("status", STATUS).unwrap();
        assert_eq!(
            packages.len(),
            2,
            "config-files only packages are not installed"
        );
        let cxx = &packages[0];
        assert_eq!(cxx.name, "libstdc++6");
        assert_eq!(cxx.source, "gcc-12");
        assert_eq!(cxx.source_version.as_deref(), Some("12.2.0-14"));
        assert_eq!(
            cxx.depends,
            ["gcc-12-base", "libc6", "libgcc-s1", "libgcc1"]
        );
        assert_eq!(packages[1].source, "attr");
        assert_eq!(packages[1].source_version, None);
    }

    #[test]
    fn purls_encode_plus_and_keep_epochs() {
        let packages = parse_status("status", STATUS).unwrap();
        assert_eq!(
            purl("debian", &packages[0], Some("debian-12")),
            "pkg:deb/debian/libstdc%2B%2B6@12.2.0-14%2Bdeb12u1?arch=amd64&distro=debian-12"
        );
        assert_eq!(
            purl("debian", &packages[1], None),
            "pkg:deb/debian/attr@1:2.5.1-4?arch=amd64"
        );
    }

    #[test]
    fn broken_status_files_name_the_line() {
        let error = parse_status("var/lib/dpkg/status", "Package: a\nno colon here\n").unwrap_err();
        assert_eq!(
            error.to_string(),
            "var/lib/dpkg/status:2: `no colon here` is neither `Field: value` nor a continuation line"
        );
        let error = parse_status("s", "Package: a\nStatus: install ok installed\n").unwrap_err();
        assert!(
            error.to_string().contains("no `architecture` field"),
            "{error}"
        );
        assert!(parse_status("s", " leading continuation\n").is_err());
    }

    #[test]
    fn os_release_gives_the_distro_qualifier() {
        let os = OsRelease::parse(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\n",
        );
        assert_eq!(os.distro().as_deref(), Some("debian-12"));
        let testing = OsRelease::parse("ID=debian\nVERSION_CODENAME=trixie\n");
        assert_eq!(testing.distro().as_deref(), Some("trixie"));
    }
}
