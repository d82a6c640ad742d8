//! `file` steps for the Docker runner: the host files go into a container through the archive
//! API (`PUT /containers/{id}/archive`), with the rules of
//! [`crate::build::runner::copy_into_root`]: a destination that ends in `/` or is a directory
//! receives the source under its own name, a source directory's contents are merged into the
//! destination, missing parents are created `0755` and root-owned, everything copied gets the
//! step's owner, `mode` overrides regular files' permission bits, symlinks are copied verbatim,
//! and hard links between source files become separate files.
//!
//! The tar is extracted at the deepest directory of the destination that exists, which the
//! engine resolves as the container sees it (symlinks included), so nothing replaces an
//! image's symlinked directory (`/lib -> usr/lib`).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{Engine, EngineError};
use crate::build::runner::CopyOptions;

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> EngineError {
    let action = format!("read `{}`", path.display());
    move |source| EngineError::Io { action, source }
}

impl Engine {
    /// Copies `source` (a host file or directory) to `destination` (an absolute path in the
    /// image) in `container`.
    pub fn copy_into_container(
        &self,
        container: &str,
        source: &Path,
        destination: &str,
        options: &CopyOptions,
    ) -> Result<(), EngineError> {
        let source_meta = fs_err::symlink_metadata(source).map_err(io_error(source))?;
        let into = destination.ends_with('/');
        let destination = Path::new("/").join(destination.trim_start_matches('/'));
        let existing = self.stat(container, &destination.to_string_lossy())?;
        let existing_dir = existing
            .as_ref()
            .is_some_and(|h| h.entry_type() == tar::EntryType::Directory);
        let target = if !source_meta.is_dir() && (into || existing_dir) {
            destination.join(source.file_name().unwrap_or_default())
        } else {
            destination.clone()
        };
        // The deepest existing parent of the target: the tar goes there.
        let mut base = target.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut missing = Vec::new();
        while base != Path::new("/") {
            match self.stat(container, &base.to_string_lossy())? {
                Some(_) => break,
                None => {
                    missing.push(base.clone());
                    base = base.parent().unwrap_or(Path::new("/")).to_path_buf();
                }
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut tar = tar::Builder::new(Vec::new());
        let relative =
            |path: &Path| -> PathBuf { path.strip_prefix(&base).unwrap_or(path).to_path_buf() };
        let write_error = |source| EngineError::Io {
            action: "make the file step's tar".into(),
            source,
        };
        for dir in missing.iter().rev() {
            append_dir(&mut tar, &relative(dir), 0o755, options.parent_owner, now)
                .map_err(write_error)?;
        }
        if source_meta.is_dir() {
            let target_exists = target == destination && existing_dir;
            if !target_exists {
                append_dir(
                    &mut tar,
                    &relative(&target),
                    source_meta.permissions().mode() & 0o7777,
                    options.owner,
                    now,
                )
                .map_err(write_error)?;
            }
            for entry in walkdir::WalkDir::new(source)
                .follow_links(false)
                .min_depth(1)
                .sort_by_file_name()
            {
                let entry = entry.map_err(|e| {
                    io_error(source)(
                        e.into_io_error()
                            .unwrap_or_else(|| io::Error::other("walk")),
                    )
                })?;
                let inside = entry.path().strip_prefix(source).expect("walked below");
                let name = relative(&target).join(inside);
                append_entry(&mut tar, entry.path(), &name, options, now)?;
            }
        } else {
            append_entry(&mut tar, source, &relative(&target), options, now)?;
        }
        let bytes = tar.into_inner().map_err(write_error)?;
        self.upload(container, &base.to_string_lossy(), bytes)
    }
}

fn append_dir(
    tar: &mut tar::Builder<Vec<u8>>,
    name: &Path,
    mode: u32,
    (uid, gid): (u32, u32),
    mtime: u64,
) -> io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(mode);
    header.set_uid(uid.into());
    header.set_gid(gid.into());
    header.set_mtime(mtime);
    header.set_size(0);
    let mut path = name.as_os_str().to_os_string();
    path.push("/");
    tar.append_data(&mut header, Path::new(&path), io::empty())
}

fn append_entry(
    tar: &mut tar::Builder<Vec<u8>>,
    host: &Path,
    name: &Path,
    options: &CopyOptions,
    mtime: u64,
) -> Result<(), EngineError> {
    let meta = fs_err::symlink_metadata(host).map_err(io_error(host))?;
    let write_error = |source| EngineError::Io {
        action: "make the file step's tar".into(),
        source,
    };
    let mut header = tar::Header::new_gnu();
    header.set_uid(options.owner.0.into());
    header.set_gid(options.owner.1.into());
    header.set_mtime(mtime);
    header.set_size(0);
    let file_type = meta.file_type();
    if file_type.is_dir() {
        return append_dir(tar, name, meta.mode() & 0o7777, options.owner, mtime)
            .map_err(write_error);
    }
    if file_type.is_symlink() {
        let target = fs_err::read_link(host).map_err(io_error(host))?;
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_mode(0o777);
        return tar
            .append_link(&mut header, name, &target)
            .map_err(write_error);
    }
    if !file_type.is_file() {
        return Err(EngineError::Io {
            action: format!("copy `{}`", host.display()),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "bake copies regular files, directories and symlinks",
            ),
        });
    }
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(options.mode.unwrap_or(meta.mode() & 0o7777));
    header.set_size(meta.len());
    let file = fs_err::File::open(host).map_err(io_error(host))?;
    tar.append_data(&mut header, name, file)
        .map_err(write_error)
}
