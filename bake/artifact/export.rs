//! Taking an image out of the store: as an OCI image layout directory (for skopeo, umoci,
//! crane, registries) or as a docker-archive tarball that `docker load` accepts. The archive is
//! also a valid OCI layout inside a tar (it carries `oci-layout` and `index.json` next to
//! docker's `manifest.json`), so either kind of tool can read it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndexBuilder, ImageManifest, MediaType};

use super::oci::{canonical_json, descriptor};
use crate::store::{Store, StoreError, digest_hex};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to write `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {digest} in the store is not an OCI image manifest")]
    Manifest {
        digest: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("`{}` exists and is not an OCI layout; refusing to write into it", path.display())]
    NotALayout { path: PathBuf },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every blob of the image whose manifest is `manifest_digest`: (digest, media type, size).
fn image_blobs(
    store: &Store,
    manifest_digest: &str,
) -> Result<(Vec<u8>, ImageManifest), ExportError> {
    let bytes = store.read_blob(manifest_digest)?;
    let manifest: ImageManifest =
        serde_json::from_slice(&bytes).map_err(|source| ExportError::Manifest {
            digest: manifest_digest.to_owned(),
            source,
        })?;
    Ok((bytes, manifest))
}

/// Copies (or hard-links) a blob into a layout's `blobs/sha256/`.
fn place_blob(store: &Store, digest: &str, blobs_dir: &Path) -> Result<(), ExportError> {
    let target = blobs_dir.join(digest_hex(digest)?);
    if target.exists() {
        return Ok(());
    }
    let source = store.blob_path(digest)?;
    if !source.is_file() {
        return Err(StoreError::MissingBlob {
            digest: digest.to_owned(),
        }
        .into());
    }
    if std::fs::hard_link(&source, &target).is_err() {
        fs_err::copy(&source, &target).map_err(io(&target))?;
    }
    Ok(())
}

/// Writes the image into an OCI image layout at `dir` (created, or added to if it already is a
/// layout), tagged `ref_name`.
pub fn to_oci_layout(
    store: &Store,
    manifest_digest: &str,
    dir: &Path,
    ref_name: &str,
) -> Result<(), ExportError> {
    if dir.exists()
        && fs_err::read_dir(dir).map_err(io(dir))?.next().is_some()
        && !dir.join("oci-layout").is_file()
    {
        return Err(ExportError::NotALayout {
            path: dir.to_path_buf(),
        });
    }
    let blobs = dir.join("blobs/sha256");
    fs_err::create_dir_all(&blobs).map_err(io(&blobs))?;
    let (manifest_bytes, manifest) = image_blobs(store, manifest_digest)?;
    for layer in manifest.layers() {
        place_blob(store, layer.digest().as_ref(), &blobs)?;
    }
    place_blob(store, manifest.config().digest().as_ref(), &blobs)?;
    place_blob(store, manifest_digest, &blobs)?;

    let index_path = dir.join("index.json");
    let mut manifests: Vec<Descriptor> = match fs_err::read(&index_path) {
        Ok(bytes) => serde_json::from_slice::<oci_spec::image::ImageIndex>(&bytes)
            .map(|i| i.manifests().clone())
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    manifests.retain(|m| {
        m.annotations()
            .as_ref()
            .and_then(|a| a.get(oci_spec::image::ANNOTATION_REF_NAME))
            .map(String::as_str)
            != Some(ref_name)
    });
    let annotations = BTreeMap::from([(
        oci_spec::image::ANNOTATION_REF_NAME.to_owned(),
        ref_name.to_owned(),
    )]);
    manifests.push(
        descriptor(
            MediaType::ImageManifest,
            manifest_digest,
            manifest_bytes.len() as u64,
            Some(annotations),
        )
        .map_err(|e| io(dir)(std::io::Error::other(e.to_string())))?,
    );
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()
        .map_err(|e| io(dir)(std::io::Error::other(e.to_string())))?;
    write_file(
        &dir.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    write_file(&index_path, &canonical_json(&index))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ExportError> {
    let dir = path.parent().expect("layout files have a parent");
    let mut file = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    file.write_all(bytes).map_err(io(path))?;
    file.persist(path).map_err(|e| io(path)(e.error))?;
    Ok(())
}

/// Writes the image as a docker-archive tarball at `file` (as `docker save` would), tagged
/// `repo_tag` (such as `bake/web:3f2a…`).
pub fn to_docker_archive(
    store: &Store,
    manifest_digest: &str,
    file: &Path,
    repo_tag: &str,
) -> Result<(), ExportError> {
    let (manifest_bytes, manifest) = image_blobs(store, manifest_digest)?;
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    {
        let mut tar = tar::Builder::new(std::io::BufWriter::new(temp.as_file()));
        let blob_name = |digest: &str| -> Result<String, ExportError> {
            Ok(format!("blobs/sha256/{}", digest_hex(digest)?))
        };
        let config_digest = manifest.config().digest().to_string();
        let mut layer_names = Vec::new();
        let mut digests: Vec<String> = vec![config_digest.clone(), manifest_digest.to_owned()];
        for layer in manifest.layers() {
            let digest = layer.digest().to_string();
            layer_names.push(blob_name(&digest)?);
            digests.push(digest);
        }
        digests.sort();
        digests.dedup();
        append_bytes(&mut tar, "blobs/", None, file)?;
        append_bytes(&mut tar, "blobs/sha256/", None, file)?;
        for digest in &digests {
            let path = store.blob_path(digest)?;
            let mut blob = fs_err::File::open(&path).map_err(io(&path))?;
            let size = blob.metadata().map_err(io(&path))?.len();
            let mut header = regular_header(size);
            tar.append_data(&mut header, blob_name(digest)?, &mut blob)
                .map_err(io(file))?;
        }
        let docker_manifest = serde_json::json!([{
            "Config": blob_name(&config_digest)?,
            "RepoTags": [repo_tag],
            "Layers": layer_names,
        }]);
        append_bytes(
            &mut tar,
            "manifest.json",
            Some(&serde_json::to_vec(&docker_manifest).expect("json")),
            file,
        )?;
        append_bytes(
            &mut tar,
            "oci-layout",
            Some(br#"{"imageLayoutVersion":"1.0.0"}"#),
            file,
        )?;
        let annotations = BTreeMap::from([
            (
                oci_spec::image::ANNOTATION_REF_NAME.to_owned(),
                repo_tag.rsplit(':').next().unwrap_or(repo_tag).to_owned(),
            ),
            ("io.containerd.image.name".to_owned(), repo_tag.to_owned()),
        ]);
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![
                descriptor(
                    MediaType::ImageManifest,
                    manifest_digest,
                    manifest_bytes.len() as u64,
                    Some(annotations),
                )
                .map_err(|e| io(file)(std::io::Error::other(e.to_string())))?,
            ])
            .build()
            .map_err(|e| io(file)(std::io::Error::other(e.to_string())))?;
        append_bytes(&mut tar, "index.json", Some(&canonical_json(&index)), file)?;
        tar.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(io(file))?;
    }
    temp.as_file().sync_all().map_err(io(file))?;
    temp.persist(file).map_err(|e| io(file)(e.error))?;
    Ok(())
}

/// A regular-file header with fixed metadata: the archive is a function of the image only.
fn regular_header(size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_size(size);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    bytes: Option<&[u8]>,
    file: &Path,
) -> Result<(), ExportError> {
    match bytes {
        Some(bytes) => {
            let mut header = regular_header(bytes.len() as u64);
            tar.append_data(&mut header, name, bytes).map_err(io(file))
        }
        None => {
            let mut header = regular_header(0);
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            tar.append_data(&mut header, name, std::io::empty())
                .map_err(io(file))
        }
    }
}
