//! Attestations as OCI 1.1 referrers in an OCI image layout (bake's store, or a directory
//! `bake export` wrote): an artifact manifest whose `subject` is the image and whose one layer
//! is a DSSE envelope, listed in `index.json` (untagged, with its `artifactType`), which is how
//! OCI layout tools (oras, regclient) keep referrers. Finding the referrers of a digest reads the
//! index's artifact entries and keeps those whose `subject` is that digest.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The media type of a layer that is one DSSE envelope.
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// The `artifactType` of bake's attestation manifests.
pub const ATTESTATION_ARTIFACT_TYPE: &str = "application/vnd.in-toto+json";
/// The annotation carrying a statement's predicate type (on the layer and the manifest).
pub const PREDICATE_ANNOTATION: &str = "in-toto.io/predicate-type";
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// `{}`, the OCI empty descriptor's content.
pub const EMPTY_CONFIG: &[u8] = b"{}";
const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("`{}` is not an OCI image layout (it has no `oci-layout` file)", path.display())]
    NotALayout { path: PathBuf },
    #[error("failed to access `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{}` is not valid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("blob {digest} is missing from the layout `{}`", layout.display())]
    MissingBlob { layout: PathBuf, digest: String },
    #[error("blob {expected} in `{}` has the wrong content: its digest is {actual}", layout.display())]
    DigestMismatch {
        layout: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("`{digest}` is not a sha256 digest")]
    BadDigest { digest: String },
    #[error("the layout `{}` has no image {selector}", layout.display())]
    NoImage { layout: PathBuf, selector: String },
    #[error("the layout `{}` holds {count} images; name one with `oci:DIR:TAG`", layout.display())]
    WhichImage { layout: PathBuf, count: usize },
}

/// A descriptor of an image (or any manifest).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

impl Target {
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn hex_of(digest: &str) -> Result<&str, LayoutError> {
    crate::store::digest_hex(digest).map_err(|_| LayoutError::BadDigest {
        digest: digest.to_owned(),
    })
}

/// An attestation manifest attaching `envelope` (a DSSE envelope's JSON) to `subject`.
pub fn attestation_manifest(
    subject: &Target,
    envelope: &[u8],
    predicate_type: &str,
    created: &str,
) -> Vec<u8> {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "artifactType": ATTESTATION_ARTIFACT_TYPE,
        "config": {
            "mediaType": EMPTY_MEDIA_TYPE,
            "digest": sha256(EMPTY_CONFIG),
            "size": EMPTY_CONFIG.len(),
            "data": "e30=",
        },
        "layers": [{
            "mediaType": DSSE_MEDIA_TYPE,
            "digest": sha256(envelope),
            "size": envelope.len(),
            "annotations": {PREDICATE_ANNOTATION: predicate_type},
        }],
        "subject": subject.descriptor(),
        "annotations": {
            PREDICATE_ANNOTATION: predicate_type,
            "org.opencontainers.image.created": created,
        },
    });
    crate::artifact::oci::canonical_json(&manifest)
}

impl Layout {
    pub fn open(root: &Path) -> Result<Layout, LayoutError> {
        if !root.join("oci-layout").is_file() {
            return Err(LayoutError::NotALayout {
                path: root.to_path_buf(),
            });
        }
        Ok(Layout {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> LayoutError + use<> {
        let path = path.to_path_buf();
        move |source| LayoutError::Io { path, source }
    }

    /// A blob, checked against its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, LayoutError> {
        let path = self.root.join("blobs/sha256").join(hex_of(digest)?);
        let bytes = match fs_err::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LayoutError::MissingBlob {
                    layout: self.root.clone(),
                    digest: digest.to_owned(),
                });
            }
            Err(e) => return Err(self.io(&path)(e)),
        };
        let actual = sha256(&bytes);
        if actual != digest {
            return Err(LayoutError::DigestMismatch {
                layout: self.root.clone(),
                expected: digest.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores `bytes` as a blob (atomically) and returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, LayoutError> {
        let digest = sha256(bytes);
        let dir = self.root.join("blobs/sha256");
        let path = dir.join(hex_of(&digest)?);
        if path.is_file() {
            return Ok(digest);
        }
        self.write_atomic(&path, bytes)?;
        Ok(digest)
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
        let dir = path.parent().expect("layout paths have a parent");
        fs_err::create_dir_all(dir).map_err(self.io(dir))?;
        let mut file = tempfile::NamedTempFile::new_in(dir).map_err(self.io(dir))?;
        file.write_all(bytes).map_err(self.io(path))?;
        file.as_file().sync_all().map_err(self.io(path))?;
        file.persist(path).map_err(|e| self.io(path)(e.error))?;
        Ok(())
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    pub fn index(&self) -> Result<Value, LayoutError> {
        let path = self.index_path();
        let bytes = fs_err::read(&path).map_err(self.io(&path))?;
        serde_json::from_slice(&bytes).map_err(|source| LayoutError::Json { path, source })
    }

    fn entries(index: &Value) -> Vec<Value> {
        index
            .get("manifests")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// Lists `descriptor` in `index.json` (once), under the layout's lock.
    pub fn add_to_index(&self, descriptor: Value) -> Result<(), LayoutError> {
        let lock_path = self.root.join("lock");
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(self.io(&lock_path))?;
        lock.lock().map_err(self.io(&lock_path))?;
        let mut index = self.index()?;
        let mut entries = Self::entries(&index);
        if !entries
            .iter()
            .any(|e| e.get("digest") == descriptor.get("digest"))
        {
            entries.push(descriptor);
        }
        index["manifests"] = Value::Array(entries);
        let mut bytes = serde_json::to_vec_pretty(&index).expect("indexes serialize");
        bytes.push(b'\n');
        self.write_atomic(&self.index_path(), &bytes)
    }

    /// Attaches a DSSE envelope to `subject` as a referrer; returns the artifact manifest's
    /// digest.
    pub fn attach(
        &self,
        subject: &Target,
        envelope: &[u8],
        predicate_type: &str,
        created: &str,
    ) -> Result<String, LayoutError> {
        self.put_blob(EMPTY_CONFIG)?;
        self.put_blob(envelope)?;
        let manifest = attestation_manifest(subject, envelope, predicate_type, created);
        let digest = self.put_blob(&manifest)?;
        self.add_to_index(json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": digest,
            "size": manifest.len(),
            "artifactType": ATTESTATION_ARTIFACT_TYPE,
            "annotations": {PREDICATE_ANNOTATION: predicate_type},
        }))?;
        Ok(digest)
    }

    /// Copies the referrers of `digest` in `source` (their manifests and blobs) into this
    /// layout; returns how many.
    pub fn copy_referrers_from(&self, source: &Layout, digest: &str) -> Result<usize, LayoutError> {
        let referrers = source.referrers(digest)?;
        for (referrer, manifest) in &referrers {
            let blobs = std::iter::once(&manifest["config"])
                .chain(manifest["layers"].as_array().into_iter().flatten());
            for blob in blobs {
                if let Some(d) = blob["digest"].as_str() {
                    self.put_blob(&source.read_blob(d)?)?;
                }
            }
            let bytes = source.read_blob(referrer)?;
            self.put_blob(&bytes)?;
            let predicate = manifest["annotations"][PREDICATE_ANNOTATION].clone();
            self.add_to_index(json!({
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": referrer,
                "size": bytes.len(),
                "artifactType": manifest.get("artifactType").cloned().unwrap_or(json!(ATTESTATION_ARTIFACT_TYPE)),
                "annotations": {PREDICATE_ANNOTATION: predicate},
            }))?;
        }
        Ok(referrers.len())
    }

    /// The artifact manifests whose subject is `digest`: (manifest digest, manifest JSON).
    pub fn referrers(&self, digest: &str) -> Result<Vec<(String, Value)>, LayoutError> {
        let mut found = Vec::new();
        for entry in Self::entries(&self.index()?) {
            if entry.get("artifactType").is_none() {
                continue;
            }
            let Some(manifest_digest) = entry.get("digest").and_then(Value::as_str) else {
                continue;
            };
            let manifest: Value = match self.read_blob(manifest_digest) {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                // A referrer whose blob is gone cannot vouch for anything: skip it.
                Err(LayoutError::MissingBlob { .. }) => continue,
                Err(e) => return Err(e),
            };
            if manifest.pointer("/subject/digest").and_then(Value::as_str) == Some(digest) {
                found.push((manifest_digest.to_owned(), manifest));
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    /// The image a selector names: a tag (`org.opencontainers.image.ref.name`), a bake version
    /// or a manifest digest; `None` picks the only image.
    pub fn resolve(&self, selector: Option<&str>) -> Result<Target, LayoutError> {
        let images: Vec<Value> = Self::entries(&self.index()?)
            .into_iter()
            .filter(|e| e.get("artifactType").is_none())
            .collect();
        let annotations = |e: &Value| -> BTreeMap<String, String> {
            e.get("annotations")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default()
        };
        let chosen = match selector {
            None => match images.as_slice() {
                [only] => only.clone(),
                _ => {
                    return Err(LayoutError::WhichImage {
                        layout: self.root.clone(),
                        count: images.len(),
                    });
                }
            },
            Some(selector) => images
                .iter()
                .find(|e| {
                    let a = annotations(e);
                    a.get(REF_NAME).map(String::as_str) == Some(selector)
                        || a.get(crate::store::ANNOTATION_VERSION).map(String::as_str)
                            == Some(selector)
                        || e.get("digest").and_then(Value::as_str) == Some(selector)
                })
                .cloned()
                .ok_or_else(|| LayoutError::NoImage {
                    layout: self.root.clone(),
                    selector: format!("`{selector}`"),
                })?,
        };
        Ok(Target {
            media_type: chosen
                .get("mediaType")
                .and_then(Value::as_str)
                .unwrap_or(MANIFEST_MEDIA_TYPE)
                .to_owned(),
            digest: chosen
                .get("digest")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            size: chosen.get("size").and_then(Value::as_u64).unwrap_or(0),
            annotations: annotations(&chosen),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referrers_are_found_by_subject_and_images_by_tag() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let layout = Layout::open(store.root()).unwrap();
        let image = layout.put_blob(b"{\"schemaVersion\":2}").unwrap();
        layout
            .add_to_index(json!({
                "mediaType": MANIFEST_MEDIA_TYPE, "digest": image, "size": 19,
                "annotations": {REF_NAME: "demo:1"}
            }))
            .unwrap();
        let target = layout.resolve(Some("demo:1")).unwrap();
        assert_eq!(target.digest, image);
        assert_eq!(layout.resolve(None).unwrap().digest, image);
        let referrer = layout
            .attach(
                &target,
                b"{\"payload\":\"\"}",
                "https://slsa.dev/provenance/v1",
                "t",
            )
            .unwrap();
        let found = layout.referrers(&image).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, referrer);
        assert_eq!(found[0].1["subject"]["digest"], image);
        // The referrer is not an image, and the store's own index parser still reads it.
        assert_eq!(layout.resolve(None).unwrap().digest, image);
        store.index().unwrap();
        // Attaching again adds nothing.
        layout
            .attach(
                &target,
                b"{\"payload\":\"\"}",
                "https://slsa.dev/provenance/v1",
                "t",
            )
            .unwrap();
        assert_eq!(layout.referrers(&image).unwrap().len(), 1);
        assert!(matches!(
            layout.resolve(Some("nope")),
            Err(LayoutError::NoImage { .. })
        ));
        assert!(matches!(
            Layout::open(&dir.path().join("blobs")),
            Err(LayoutError::NotALayout { .. })
        ));
    }
}
