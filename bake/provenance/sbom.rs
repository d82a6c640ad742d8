//! Software bills of materials: SPDX 2.3 JSON and CycloneDX 1.5 JSON documents of an image,
//! from its installed-package database (`/var/lib/dpkg/status` and `status.d/`), or, for an
//! image without one (scratch), from the files it holds.
//!
//! Output is deterministic: same packages (or files), same subject, same SOURCE_DATE_EPOCH,
//! same bytes. Every list is sorted, maps are sorted by key (serde_json without
//! `preserve_order`), identifiers derive from the content (SPDX ids, the document namespace and
//! the CycloneDX serial number come from names and the image digest, never from randomness or
//! the clock).

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use super::dpkg::{self, DebPackage, DpkgError, OsRelease};
use super::imagefs::{ImageFile, ImageFs};

/// in-toto predicate types of the two formats.
pub const SPDX_PREDICATE_TYPE: &str = "https://spdx.dev/Document";
pub const CYCLONEDX_PREDICATE_TYPE: &str = "https://cyclonedx.org/bom";
pub const SPDX_MEDIA_TYPE: &str = "application/spdx+json";
pub const CYCLONEDX_MEDIA_TYPE: &str = "application/vnd.cyclonedx+json";

/// Where SPDX document namespaces of bake SBOMs live (the image digest makes each unique).
const SPDX_NAMESPACE_BASE: &str = "https://bake.dev/spdx";
/// The UUIDv5 namespace of CycloneDX serial numbers (bake's own, fixed forever).
const CYCLONEDX_SERIAL_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6b61_6b65_2d73_626f_6d2d_6379_636c_6f6e);

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum SbomFormat {
    /// SPDX 2.3 JSON.
    #[default]
    Spdx,
    /// CycloneDX 1.5 JSON.
    Cyclonedx,
}

impl SbomFormat {
    pub fn predicate_type(self) -> &'static str {
        match self {
            SbomFormat::Spdx => SPDX_PREDICATE_TYPE,
            SbomFormat::Cyclonedx => CYCLONEDX_PREDICATE_TYPE,
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            SbomFormat::Spdx => SPDX_MEDIA_TYPE,
            SbomFormat::Cyclonedx => CYCLONEDX_MEDIA_TYPE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SbomFormat::Spdx => "spdx",
            SbomFormat::Cyclonedx => "cyclonedx",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    #[error("the image's package database is damaged")]
    Dpkg(#[from] DpkgError),
    #[error("`{path}` in the image is not UTF-8")]
    Encoding { path: String },
}

/// What the SBOM describes.
#[derive(Debug, Clone)]
pub struct SbomSubject {
    /// The image's name (the recipe name, or a repository).
    pub name: String,
    /// The image manifest digest, `sha256:<hex>`.
    pub digest: String,
    /// SOURCE_DATE_EPOCH: the documents' creation time.
    pub created_epoch: u64,
}

/// What the image contains: its installed packages, or, without a package database, its files.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub os: Option<OsRelease>,
    /// Sorted by (name, architecture, version); empty when the image has no dpkg database.
    pub packages: Vec<DebPackage>,
    pub has_package_database: bool,
    /// Sorted by path; only filled when there is no package database.
    pub files: Vec<(String, ImageFile)>,
}

fn text<'a>(path: &str, bytes: &'a [u8]) -> Result<&'a str, SbomError> {
    std::str::from_utf8(bytes).map_err(|_| SbomError::Encoding {
        path: path.to_owned(),
    })
}

impl Inventory {
    pub fn of(fs: &ImageFs) -> Result<Inventory, SbomError> {
        let os = fs
            .content("etc/os-release")
            .or_else(|| fs.content("usr/lib/os-release"))
            .map(|b| text("etc/os-release", b).map(OsRelease::parse))
            .transpose()?;
        let mut packages = Vec::new();
        let mut has_package_database = false;
        for (path, file) in fs.files() {
            if path == "var/lib/dpkg/status" || path.starts_with("var/lib/dpkg/status.d/") {
                has_package_database = true;
                let Some(content) = &file.content else {
                    continue;
                };
                packages.extend(dpkg::parse_status(path, text(path, content)?)?);
            }
        }
        packages.sort();
        packages.dedup_by(|a, b| a.name == b.name && a.architecture == b.architecture);
        let files = if has_package_database {
            Vec::new()
        } else {
            fs.files()
                .map(|(path, file)| (path.to_owned(), file.clone()))
                .collect()
        };
        Ok(Inventory {
            os,
            packages,
            has_package_database,
            files,
        })
    }

    fn vendor(&self) -> String {
        self.os
            .as_ref()
            .map_or_else(|| "debian".to_owned(), |o| o.id.to_ascii_lowercase())
    }

    fn supplier(&self) -> String {
        let vendor = self.vendor();
        match vendor.as_str() {
            "debian" => "Debian".into(),
            "ubuntu" => "Ubuntu".into(),
            _ => vendor,
        }
    }

    pub fn purl(&self, package: &DebPackage) -> String {
        let distro = self.os.as_ref().and_then(OsRelease::distro);
        dpkg::purl(&self.vendor(), package, distro.as_deref())
    }
}

/// The hex digits of a subject's digest (subjects are bake's own digests, always sha256).
fn digest_hex(digest: &str) -> String {
    digest
        .parse::<crate::id::Digest>()
        .map_or_else(|_| digest.to_owned(), |d| d.hex().to_owned())
}

/// `pkg:oci/<name>@sha256%3A<hex>`: the image as a package.
fn image_purl(subject: &SbomSubject) -> String {
    let name = subject
        .name
        .rsplit('/')
        .next()
        .unwrap_or(&subject.name)
        .to_ascii_lowercase();
    format!("pkg:oci/{name}@sha256%3A{}", digest_hex(&subject.digest))
}

/// An SPDX id from arbitrary text: `[A-Za-z0-9.-]` kept, anything else `-`, plus a short hash
/// of the original so two names that sanitize alike stay distinct.
fn spdx_id(kind: &str, text: &str) -> String {
    let clean: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let hash = hex::encode(&Sha256::digest(text.as_bytes())[..4]);
    format!("SPDXRef-{kind}-{clean}-{hash}")
}

fn rfc3339(epoch: u64) -> String {
    crate::artifact::oci::rfc3339(epoch)
}

/// The SPDX 2.3 JSON document.
pub fn spdx(inventory: &Inventory, subject: &SbomSubject) -> Value {
    let hex = digest_hex(&subject.digest);
    let mut root = json!({
        "SPDXID": "SPDXRef-Image",
        "name": subject.name,
        "versionInfo": subject.digest,
        "downloadLocation": "NOASSERTION",
        "primaryPackagePurpose": "CONTAINER",
        "supplier": "NOASSERTION",
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
        "checksums": [{"algorithm": "SHA256", "checksumValue": hex}],
        "externalRefs": [{
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": image_purl(subject),
        }],
    });
    let mut packages = Vec::new();
    let mut files = Vec::new();
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": "SPDXRef-Image",
    })];
    let supplier = format!("Organization: {}", inventory.supplier());
    for package in &inventory.packages {
        let id = spdx_id(
            "Package-deb",
            &format!("{}-{}", package.name, package.architecture),
        );
        let source = match &package.source_version {
            Some(version) => format!("{} {version}", package.source),
            None => format!("{} {}", package.source, package.version),
        };
        packages.push(json!({
            "SPDXID": id,
            "name": package.name,
            "versionInfo": package.version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "supplier": supplier,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "LIBRARY",
            "sourceInfo": format!("built package from: {source}"),
            "comment": format!("architecture {}", package.architecture),
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": inventory.purl(package),
            }],
        }));
        relationships.push(json!({
            "spdxElementId": "SPDXRef-Image",
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": id,
        }));
    }
    if inventory.has_package_database {
        root["filesAnalyzed"] = json!(false);
    } else {
        // The verification code: SHA-1 over the sorted SHA-1s of every file (SPDX 2.3 §7.9).
        let mut sha1s: Vec<&str> = inventory
            .files
            .iter()
            .map(|(_, f)| f.sha1.as_str())
            .collect();
        sha1s.sort_unstable();
        let code = hex::encode(Sha1::digest(sha1s.concat().as_bytes()));
        root["filesAnalyzed"] = json!(true);
        root["packageVerificationCode"] = json!({"packageVerificationCodeValue": code});
        for (path, file) in &inventory.files {
            let id = spdx_id("File", path);
            files.push(json!({
                "SPDXID": id,
                "fileName": format!("./{path}"),
                "checksums": [
                    {"algorithm": "SHA1", "checksumValue": file.sha1},
                    {"algorithm": "SHA256", "checksumValue": file.sha256},
                ],
                "licenseConcluded": "NOASSERTION",
                "copyrightText": "NOASSERTION",
                "comment": format!("mode {:04o}, {} bytes", file.mode & 0o7777, file.size),
            }));
            relationships.push(json!({
                "spdxElementId": "SPDXRef-Image",
                "relationshipType": "CONTAINS",
                "relatedSpdxElement": id,
            }));
        }
    }
    packages.insert(0, root);
    let mut document = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{}@{}", subject.name, subject.digest),
        "documentNamespace": format!(
            "{SPDX_NAMESPACE_BASE}/{}/{hex}",
            subject.name.replace(['/', ':', '#'], "-")
        ),
        "creationInfo": {
            "created": rfc3339(subject.created_epoch),
            "creators": [format!("Tool: bake-{}", env!("CARGO_PKG_VERSION"))],
        },
        "packages": packages,
        "relationships": relationships,
    });
    if !files.is_empty() {
        document["files"] = Value::Array(files);
    }
    document
}

/// The CycloneDX 1.5 JSON document.
pub fn cyclonedx(inventory: &Inventory, subject: &SbomSubject) -> Value {
    let serial = uuid::Uuid::new_v5(
        &CYCLONEDX_SERIAL_NAMESPACE,
        format!("{}@{}", subject.name, subject.digest).as_bytes(),
    );
    let mut components = Vec::new();
    let mut refs = Vec::new();
    let by_name: BTreeMap<&str, Vec<&DebPackage>> =
        inventory
            .packages
            .iter()
            .fold(BTreeMap::new(), |mut map, p| {
                map.entry(p.name.as_str()).or_insert_with(Vec::new).push(p);
                map
            });
    let mut dependencies = Vec::new();
    for package in &inventory.packages {
        let purl = inventory.purl(package);
        let mut properties = vec![
            json!({"name": "bake:deb:architecture", "value": package.architecture}),
            json!({"name": "bake:deb:source", "value": package.source}),
        ];
        if let Some(version) = &package.source_version {
            properties.push(json!({"name": "bake:deb:source_version", "value": version}));
        }
        if let Some(maintainer) = &package.maintainer {
            properties.push(json!({"name": "bake:deb:maintainer", "value": maintainer}));
        }
        components.push(json!({
            "type": "library",
            "bom-ref": purl,
            "name": package.name,
            "version": package.version,
            "purl": purl,
            "supplier": {"name": inventory.supplier()},
            "properties": properties,
        }));
        refs.push(purl.clone());
        // Dependencies on installed packages of the same or an `all` architecture.
        let mut depends: Vec<String> = package
            .depends
            .iter()
            .filter_map(|name| by_name.get(name.as_str()))
            .flatten()
            .filter(|d| {
                d.architecture == package.architecture
                    || d.architecture == "all"
                    || package.architecture == "all"
            })
            .map(|d| inventory.purl(d))
            .collect();
        depends.sort();
        depends.dedup();
        dependencies.push(json!({"ref": purl, "dependsOn": depends}));
    }
    for (path, file) in &inventory.files {
        let reference = format!("file:/{path}");
        components.push(json!({
            "type": "file",
            "bom-ref": reference,
            "name": format!("/{path}"),
            "hashes": [
                {"alg": "SHA-1", "content": file.sha1},
                {"alg": "SHA-256", "content": file.sha256},
            ],
            "properties": [
                {"name": "bake:file:mode", "value": format!("{:04o}", file.mode & 0o7777)},
                {"name": "bake:file:size", "value": file.size.to_string()},
            ],
        }));
        refs.push(reference);
    }
    dependencies.insert(0, json!({"ref": "image", "dependsOn": refs}));
    let mut metadata = json!({
        "timestamp": rfc3339(subject.created_epoch),
        "lifecycles": [{"phase": "build"}],
        "tools": {"components": [{
            "type": "application",
            "name": "bake",
            "version": env!("CARGO_PKG_VERSION"),
        }]},
        "component": {
            "type": "container",
            "bom-ref": "image",
            "name": subject.name,
            "version": subject.digest,
            "purl": image_purl(subject),
            "hashes": [{"alg": "SHA-256", "content": digest_hex(&subject.digest)}],
        },
    });
    if let Some(os) = &inventory.os
        && let Some(pretty) = &os.pretty_name
    {
        metadata["properties"] = json!([{"name": "bake:os", "value": pretty}]);
    }
    json!({
        "$schema": "http://cyclonedx.org/schema/bom-1.5.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": format!("urn:uuid:{serial}"),
        "version": 1,
        "metadata": metadata,
        "components": components,
        "dependencies": dependencies,
    })
}

/// The SBOM document in `format`, as bytes (pretty JSON with a final newline).
pub fn render(format: SbomFormat, inventory: &Inventory, subject: &SbomSubject) -> Vec<u8> {
    let value = match format {
        SbomFormat::Spdx => spdx(inventory, subject),
        SbomFormat::Cyclonedx => cyclonedx(inventory, subject),
    };
    let mut bytes = serde_json::to_vec_pretty(&value).expect("SBOMs serialize");
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inventory() -> Inventory {
        let packages = dpkg::parse_status(
            "status",
            "Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9+deb12u4\nSource: glibc\n\n\
             Package: libc6\nStatus: install ok installed\nArchitecture: i386\nVersion: 2.36-9+deb12u4\nSource: glibc\n\n\
             Package: hello\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.10-3\nDepends: libc6 (>= 2.34)\n",
        )
        .unwrap();
        let mut packages = packages;
        packages.sort();
        Inventory {
            os: Some(OsRelease::parse("ID=debian\nVERSION_ID=\"12\"\n")),
            packages,
            has_package_database: true,
            files: vec![],
        }
    }

    fn subject() -> SbomSubject {
        SbomSubject {
            name: "demo".into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            created_epoch: 1_700_000_000,
        }
    }

    #[test]
    fn spdx_lists_every_package_with_unique_ids_and_purls() {
        let doc = spdx(&inventory(), &subject());
        let packages = doc["packages"].as_array().unwrap();
        assert_eq!(packages.len(), 4, "the image and three packages");
        let ids: std::collections::BTreeSet<&str> = packages
            .iter()
            .map(|p| p["SPDXID"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 4, "multi-arch packages get distinct ids");
        let purls: Vec<&str> = packages[1..]
            .iter()
            .map(|p| p["externalRefs"][0]["referenceLocator"].as_str().unwrap())
            .collect();
        assert!(
            purls.contains(&"pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=i386&distro=debian-12")
        );
        assert_eq!(doc["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(
            doc["documentNamespace"],
            format!("https://bake.dev/spdx/demo/{}", "ab".repeat(32))
        );
    }

    #[test]
    fn cyclonedx_dependencies_follow_architectures() {
        let doc = cyclonedx(&inventory(), &subject());
        let deps = doc["dependencies"].as_array().unwrap();
        let hello = deps
            .iter()
            .find(|d| {
                d["ref"]
                    .as_str()
                    .unwrap()
                    .starts_with("pkg:deb/debian/hello@")
            })
            .unwrap();
        assert_eq!(
            hello["dependsOn"],
            json!(["pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12"])
        );
        assert!(
            doc["serialNumber"]
                .as_str()
                .unwrap()
                .starts_with("urn:uuid:")
        );
        // Same input, same bytes.
        assert_eq!(
            render(SbomFormat::Cyclonedx, &inventory(), &subject()),
            render(SbomFormat::Cyclonedx, &inventory(), &subject())
        );
    }

    #[test]
    fn images_without_a_package_database_list_their_files() {
        let file = ImageFile {
            size: 5,
            mode: 0o755,
            sha256: hex::encode(Sha256::digest(b"hello")),
            sha1: hex::encode(Sha1::digest(b"hello")),
            content: None,
        };
        let inventory = Inventory {
            files: vec![("hello".into(), file)],
            ..Inventory::default()
        };
        let doc = spdx(&inventory, &subject());
        assert_eq!(doc["files"][0]["fileName"], "./hello");
        assert_eq!(doc["packages"][0]["filesAnalyzed"], true);
        let code = hex::encode(Sha1::digest(hex::encode(Sha1::digest(b"hello")).as_bytes()));
        assert_eq!(
            doc["packages"][0]["packageVerificationCode"]["packageVerificationCodeValue"],
            code
        );
        let cdx = cyclonedx(&inventory, &subject());
        assert_eq!(cdx["components"][0]["name"], "/hello");
        assert_eq!(cdx["components"][0]["type"], "file");
    }
}
