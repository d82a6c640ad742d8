//! The final file system of an image, read from its layers in the store without unpacking them
//! to disk: every regular file's path, size and digests, with whiteouts applied, plus the bytes
//! of the few files an SBOM needs (the dpkg database, os-release).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};

use sha1::Sha1;
use sha2::{Digest as _, Sha256};

use crate::artifact::oci::LayerRef;
use crate::store::{Store, StoreError};

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// A regular file of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    pub size: u64,
    pub mode: u32,
    /// Lowercase hex.
    pub sha256: String,
    pub sha1: String,
    /// Kept only for the files [`keep`] asks for.
    pub content: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    File(ImageFile),
    Symlink(String),
}

/// The image's files by path (relative, no leading `/` or `./`).
#[derive(Debug, Default)]
pub struct ImageFs {
    pub nodes: BTreeMap<String, Node>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageFsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("failed to read layer {digest}")]
    Read {
        digest: String,
        #[source]
        source: std::io::Error,
    },
}

/// Whether the SBOM needs this file's bytes.
fn keep(path: &str) -> bool {
    path == "var/lib/dpkg/status"
        || path.starts_with("var/lib/dpkg/status.d/")
        || path == "etc/os-release"
        || path == "usr/lib/os-release"
}

fn normalize(path: &str) -> String {
    let trimmed = path.trim_start_matches("./").trim_start_matches('/');
    trimmed.trim_end_matches('/').to_owned()
}

impl ImageFs {
    /// Applies `layers` (base first) from the store.
    pub fn read(store: &Store, layers: &[LayerRef]) -> Result<ImageFs, ImageFsError> {
        let mut fs = ImageFs::default();
        for layer in layers {
            let file = store.open_blob(&layer.digest)?;
            fs.apply(file).map_err(|source| ImageFsError::Read {
                digest: layer.digest.clone(),
                source,
            })?;
        }
        Ok(fs)
    }

    fn remove_tree(&mut self, path: &str) {
        self.nodes.remove(path);
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let doomed: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for key in doomed {
            self.nodes.remove(&key);
        }
    }

    /// Applies one layer blob (plain, gzip or zstd tar).
    pub fn apply(&mut self, blob: impl Read) -> std::io::Result<()> {
        let mut blob = BufReader::with_capacity(1 << 20, blob);
        let head = blob.fill_buf()?.to_vec();
        let tar: Box<dyn Read> = if head.starts_with(GZIP_MAGIC) {
            Box::new(flate2::bufread::MultiGzDecoder::new(blob))
        } else if head.starts_with(ZSTD_MAGIC) {
            Box::new(zstd::stream::read::Decoder::with_buffer(blob)?)
        } else {
            Box::new(blob)
        };
        let mut archive = tar::Archive::new(tar);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw = entry.path()?.to_string_lossy().into_owned();
            let path = normalize(&raw);
            let (dir, base) = match path.rsplit_once('/') {
                Some((d, b)) => (d.to_owned(), b.to_owned()),
                None => (String::new(), path.clone()),
            };
            if base == ".wh..wh..opq" {
                // Opaque directory: what earlier layers had below it is gone.
                let keep_dir = self.nodes.remove(&dir);
                self.remove_tree(&dir);
                if let Some(node) = keep_dir {
                    self.nodes.insert(dir, node);
                }
                continue;
            }
            if let Some(name) = base.strip_prefix(".wh.") {
                let target = if dir.is_empty() {
                    name.to_owned()
                } else {
                    format!("{dir}/{name}")
                };
                self.remove_tree(&target);
                continue;
            }
            let kind = entry.header().entry_type();
            let mode = entry.header().mode().unwrap_or(0);
            if kind.is_dir() {
                // A directory replaces a file of the same name; its contents stay.
                if matches!(
                    self.nodes.get(&path),
                    Some(Node::File(_) | Node::Symlink(_))
                ) {
                    self.nodes.remove(&path);
                }
                continue;
            }
            self.remove_tree(&path);
            if kind.is_symlink() {
                let target = entry
                    .link_name()?
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default();
                self.nodes.insert(path, Node::Symlink(target));
            } else if kind.is_hard_link() {
                let target = entry
                    .link_name()?
                    .map(|t| normalize(&t.to_string_lossy()))
                    .unwrap_or_default();
                if let Some(node) = self.nodes.get(&target).cloned() {
                    let node = match node {
                        Node::File(mut f) => {
                            f.mode = mode;
                            if !keep(&path) {
                                f.content = None;
                            }
                            Node::File(f)
                        }
                        other => other,
                    };
                    self.nodes.insert(path, node);
                }
            } else if kind.is_file() || kind == tar::EntryType::Continuous {
                let wanted = keep(&path);
                let mut sha256 = Sha256::new();
                let mut sha1 = Sha1::new();
                let mut content = Vec::new();
                let mut buffer = vec![0u8; 1 << 16];
                let mut size = 0u64;
                loop {
                    let n = entry.read(&mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    sha256.update(&buffer[..n]);
                    sha1.update(&buffer[..n]);
                    if wanted {
                        content.extend_from_slice(&buffer[..n]);
                    }
                    size += n as u64;
                }
                self.nodes.insert(
                    path,
                    Node::File(ImageFile {
                        size,
                        mode,
                        sha256: hex::encode(sha256.finalize()),
                        sha1: hex::encode(sha1.finalize()),
                        content: wanted.then_some(content),
                    }),
                );
            }
            // Devices and FIFOs carry no content an SBOM lists.
        }
        Ok(())
    }

    /// The bytes of `path`, following symlinks (relative or absolute, within the image).
    pub fn content(&self, path: &str) -> Option<&[u8]> {
        let mut path = normalize(path);
        for _ in 0..16 {
            match self.nodes.get(&path)? {
                Node::File(f) => return f.content.as_deref(),
                Node::Symlink(target) => {
                    path = if target.starts_with('/') {
                        normalize(target)
                    } else {
                        let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
                        resolve(dir, target)
                    };
                }
            }
        }
        None
    }

    /// Regular files, by path.
    pub fn files(&self) -> impl Iterator<Item = (&str, &ImageFile)> {
        self.nodes.iter().filter_map(|(path, node)| match node {
            Node::File(f) => Some((path.as_str(), f)),
            Node::Symlink(_) => None,
        })
    }
}

/// Joins a relative symlink target to its directory, resolving `.` and `..` (never above `/`).
fn resolve(dir: &str, target: &str) -> String {
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            if let Some(link) = link {
                header.set_link_name(link).unwrap();
            }
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_links_and_kept_contents() {
        let mut fs = ImageFs::default();
        use tar::EntryType::*;
        fs.apply(
            &layer(&[
                ("usr/lib/os-release", Regular, b"ID=debian\n", None),
                (
                    "etc/os-release",
                    Symlink,
                    b"",
                    Some("../usr/lib/os-release"),
                ),
                ("opt/a/one", Regular, b"1", None),
                ("opt/b/two", Regular, b"2", None),
                ("bin/tool", Regular, b"tool", None),
                ("bin/alias", Link, b"", Some("bin/tool")),
            ])[..],
        )
        .unwrap();
        fs.apply(
            &layer(&[
                ("opt/a/.wh..wh..opq", Regular, b"", None),
                ("opt/a/new", Regular, b"n", None),
                ("opt/.wh.b", Regular, b"", None),
            ])[..],
        )
        .unwrap();
        assert_eq!(fs.content("etc/os-release"), Some(&b"ID=debian\n"[..]));
        let files: Vec<&str> = fs.files().map(|(p, _)| p).collect();
        assert_eq!(
            files,
            ["bin/alias", "bin/tool", "opt/a/new", "usr/lib/os-release"]
        );
        let (_, tool) = fs.files().find(|(p, _)| *p == "bin/alias").unwrap();
        assert_eq!(tool.sha256, hex::encode(Sha256::digest(b"tool")));
        assert_eq!(tool.content, None, "only SBOM inputs keep their bytes");
    }

    #[test]
    fn symlinks_resolve_within_the_image() {
        assert_eq!(
            resolve("etc", "../usr/lib/os-release"),
            "usr/lib/os-release"
        );
        assert_eq!(resolve("etc", "../../../x"), "x");
    }
}
