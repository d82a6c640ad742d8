//! `file` provisioners: copying a host file or directory into the root filesystem, from the
//! host side, as `cp -a` run inside a `chroot` of the root would, but without running anything
//! in it.
//!
//! - The destination is resolved with [`resolve_in_root`]: symlinks in the image are followed
//!   as the image sees them (so `/lib -> usr/lib` on a merged-usr system is written through,
//!   not replaced), an absolute one restarts at the root, and `..` stops there. Nothing lands
//!   outside the root, whatever the image contains.
//! - The last component is never followed: a file or symlink there is replaced (by a rename,
//!   from a temporary file created with `O_EXCL | O_NOFOLLOW` in the same directory), so a
//!   symlink or a hard link at the destination cannot redirect the write, and readers never
//!   see half a file.
//! - A destination that ends in `/` or is an existing directory receives the source under its
//!   own name; a source directory's *contents* are merged into the destination directory,
//!   which is created if missing (Docker's `COPY`).
//! - Symlinks are copied as symlinks, their targets verbatim. Permission bits (set-id bits
//!   included) come from the source unless `mode` overrides them for regular files;
//!   directories keep the source's modes. Everything copied gets `owner` (root by default,
//!   never the host user's ids); missing parent directories are created `0755`, root-owned.
//! - Timestamps are not copied: the layer writer clamps them to `SOURCE_DATE_EPOCH`. Hard
//!   links between source files become separate files.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use fs_err::os::unix::fs::OpenOptionsExt;

use super::resolve_in_root;
use super::root_path::{DirAttrs, ensure_dir, is_host_root, set_owner};

/// How many temporary names a copy tries in one directory before it gives up: each attempt
/// fails only if a file of that exact name exists, so needing more means something is wrong.
const TEMP_NAME_ATTEMPTS: u32 = 100;

/// Mode and owners for what [`copy_into_root`] writes. The default is the source's modes and
/// root (`0:0`) for everything, never the host user's ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyOptions {
    /// Permission bits for copied regular files; the source's when `None`.
    pub mode: Option<u32>,
    /// `(uid, gid)` of everything copied.
    pub owner: (u32, u32),
    /// `(uid, gid)` of parent directories the copy has to create.
    pub parent_owner: (u32, u32),
}

/// What a copy wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Where the source went, as a path in the image (symlinks in the image not resolved).
    pub destination: String,
    pub files: usize,
    /// Directories created (existing ones that received files are not counted).
    pub directories: usize,
    pub symlinks: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("failed to read `{}`", path.display())]
    Source {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{}` is a {kind}; bake copies regular files, directories and symlinks", path.display())]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("failed to write `{destination}` into the root filesystem `{}`", root.display())]
    Write {
        root: PathBuf,
        destination: String,
        #[source]
        source: io::Error,
    },
    #[error("refusing to copy into `{}`: it is the host's own root filesystem", root.display())]
    HostRoot { root: PathBuf },
    #[error("`{destination}` is a directory in the image and cannot be replaced by a file")]
    IsADirectory { destination: String },
    #[error("destination `{destination}` names no file to copy `{}` to", file.display())]
    NoFileName { destination: String, file: PathBuf },
}

/// Copies `source` (a file, symlink or directory on the host) to `destination` (a path in the
/// image) inside `root`. See the module documentation for the rules.
pub fn copy_into_root(
    root: &Path,
    source: &Path,
    destination: &str,
    options: &CopyOptions,
) -> Result<CopyReport, CopyError> {
    let root = fs_err::canonicalize(root).map_err(|source| CopyError::Write {
        root: root.to_owned(),
        destination: destination.to_owned(),
        source,
    })?;
    if is_host_root(&root).map_err(|source| CopyError::Write {
        root: root.clone(),
        destination: destination.to_owned(),
        source,
    })? {
        return Err(CopyError::HostRoot { root });
    }
    let copier = Copier {
        root: &root,
        options,
    };
    let meta = fs_err::symlink_metadata(source).map_err(|e| source_error(source, e))?;
    let destination_path = Path::new("/").join(destination);
    let mut report = CopyReport::default();
    if meta.is_dir() {
        report.destination = destination_path.display().to_string();
        copier.copy_dir(source, &destination_path, &mut report)?;
        return Ok(report);
    }
    let into_dir = destination.ends_with('/')
        || resolve_in_root(&root, &destination_path)
            .and_then(fs_err::metadata)
            .is_ok_and(|m| m.is_dir());
    let target = if into_dir {
        let name = source.file_name().ok_or_else(|| CopyError::NoFileName {
            destination: destination.to_owned(),
            file: source.to_owned(),
        })?;
        destination_path.join(name)
    } else {
        destination_path
    };
    report.destination = target.display().to_string();
    copier.copy_entry(source, &meta, &target, &mut report)?;
    Ok(report)
}

fn source_error(path: &Path, source: io::Error) -> CopyError {
    CopyError::Source {
        path: path.to_owned(),
        source,
    }
}

struct Copier<'a> {
    root: &'a Path,
    options: &'a CopyOptions,
}

impl Copier<'_> {
    fn write_error(&self, destination: &Path) -> impl FnOnce(io::Error) -> CopyError {
        let root = self.root.to_owned();
        let destination = destination.display().to_string();
        move |source| CopyError::Write {
            root,
            destination,
            source,
        }
    }

    fn parents(&self) -> DirAttrs {
        DirAttrs {
            mode: 0o755,
            uid: self.options.parent_owner.0,
            gid: self.options.parent_owner.1,
        }
    }

    fn copy_dir(
        &self,
        source: &Path,
        destination: &Path,
        report: &mut CopyReport,
    ) -> Result<(), CopyError> {
        self.make_dir(source, destination, report)?;
        for entry in walkdir::WalkDir::new(source)
            .min_depth(1)
            .follow_links(false)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(source).to_owned();
                source_error(&path, e.into())
            })?;
            let relative = entry
                .path()
                .strip_prefix(source)
                .expect("walkdir yields paths under its root");
            let target = destination.join(relative);
            let meta = entry
                .metadata()
                .map_err(|e| source_error(entry.path(), e.into()))?;
            if meta.is_dir() {
                self.make_dir(entry.path(), &target, report)?;
            } else {
                self.copy_entry(entry.path(), &meta, &target, report)?;
            }
        }
        Ok(())
    }

    /// Creates the directory (and its parents) unless it exists; a new one gets the source
    /// directory's mode.
    fn make_dir(
        &self,
        source: &Path,
        destination: &Path,
        report: &mut CopyReport,
    ) -> Result<(), CopyError> {
        let mode = fs_err::metadata(source)
            .map_err(|e| source_error(source, e))?
            .permissions()
            .mode()
            & 0o7777;
        let leaf = DirAttrs {
            mode,
            uid: self.options.owner.0,
            gid: self.options.owner.1,
        };
        let (_, created) = ensure_dir(self.root, destination, leaf, self.parents())
            .map_err(self.write_error(destination))?;
        report.directories += created.len();
        Ok(())
    }

    /// Copies a regular file or a symlink to `destination`, replacing what is there.
    fn copy_entry(
        &self,
        source: &Path,
        meta: &std::fs::Metadata,
        destination: &Path,
        report: &mut CopyReport,
    ) -> Result<(), CopyError> {
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_symlink() {
            return Err(CopyError::Unsupported {
                path: source.to_owned(),
                kind: file_kind(meta),
            });
        }
        let name = destination
            .file_name()
            .ok_or_else(|| CopyError::NoFileName {
                destination: destination.display().to_string(),
                file: source.to_owned(),
            })?;
        let parent = destination.parent().unwrap_or(Path::new("/"));
        let (parent_host, created) = ensure_dir(self.root, parent, self.parents(), self.parents())
            .map_err(self.write_error(destination))?;
        report.directories += created.len();
        let final_host = parent_host.join(name);
        if fs_err::symlink_metadata(&final_host).is_ok_and(|m| m.is_dir()) {
            return Err(CopyError::IsADirectory {
                destination: destination.display().to_string(),
            });
        }
        let (uid, gid) = self.options.owner;
        let temporary = if kind.is_symlink() {
            let target = fs_err::read_link(source).map_err(|e| source_error(source, e))?;
            let temporary = temporary_name(&parent_host, |path| {
                fs_err::os::unix::fs::symlink(&target, path)
            })
            .map_err(self.write_error(destination))?;
            report.symlinks += 1;
            temporary
        } else {
            let mut input = fs_err::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(source)
                .map_err(|e| source_error(source, e))?;
            let mut file = None;
            let temporary = temporary_name(&parent_host, |path| {
                file = Some(
                    fs_err::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(path)?,
                );
                Ok(())
            })
            .map_err(self.write_error(destination))?;
            let mut output = file.expect("set when the name was taken");
            let mode = self
                .options
                .mode
                .unwrap_or(meta.permissions().mode() & 0o7777);
            let written = io::copy(&mut input, &mut output)
                .and_then(|_| std::os::unix::fs::fchown(output.file(), Some(uid), Some(gid)))
                // After chown, which clears set-id bits.
                .and_then(|()| output.set_permissions(std::fs::Permissions::from_mode(mode)));
            if let Err(error) = written {
                let _ = fs_err::remove_file(&temporary);
                return Err(self.write_error(destination)(error));
            }
            report.files += 1;
            temporary
        };
        let placed = if kind.is_symlink() {
            set_owner(&temporary, uid, gid)
        } else {
            Ok(())
        }
        .and_then(|()| fs_err::rename(&temporary, &final_host));
        if let Err(error) = placed {
            let _ = fs_err::remove_file(&temporary);
            return Err(self.write_error(destination)(error));
        }
        Ok(())
    }
}

/// Creates something under a fresh hidden name in `dir` with `create`, which must fail with
/// `AlreadyExists` when the name is taken.
fn temporary_name(
    dir: &Path,
    mut create: impl FnMut(&Path) -> io::Result<()>,
) -> io::Result<PathBuf> {
    let pid = std::process::id();
    for attempt in 0..TEMP_NAME_ATTEMPTS {
        let path = dir.join(format!(".bake-copy-{pid}-{attempt}"));
        match create(&path) {
            Ok(()) => return Ok(path),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(error),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "no free temporary name in `{}` after {TEMP_NAME_ATTEMPTS} attempts",
            dir.display()
        ),
    ))
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    if kind.is_fifo() {
        "named pipe"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_block_device() {
        "block device"
    } else if kind.is_char_device() {
        "character device"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};

    use super::*;

    fn owner_of(path: &Path) -> (u32, u32) {
        let meta = fs_err::symlink_metadata(path).unwrap();
        (meta.uid(), meta.gid())
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        src: PathBuf,
        outside: PathBuf,
        options: CopyOptions,
    }

    /// A root, a source tree and a host directory outside the root, with the caller's own ids
    /// as owners so that no chown needs root.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let src = dir.path().join("src");
        let outside = dir.path().join("outside");
        for d in [&root, &src, &outside] {
            fs_err::create_dir_all(d).unwrap();
        }
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        Fixture {
            _dir: dir,
            root,
            src,
            outside,
            options: CopyOptions {
                mode: None,
                owner: me,
                parent_owner: me,
            },
        }
    }

    fn write(path: &Path, text: &str, mode: u32) {
        fs_err::create_dir_all(path.parent().unwrap()).unwrap();
        fs_err::write(path, text).unwrap();
        fs_err::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs_err::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_file_lands_at_a_new_path_with_parents_created() {
        let f = fixture();
        write(&f.src.join("motd"), "hello\n", 0o640);
        let report =
            copy_into_root(&f.root, &f.src.join("motd"), "/etc/app/motd", &f.options).unwrap();
        assert_eq!(report.destination, "/etc/app/motd");
        assert_eq!((report.files, report.directories), (1, 2));
        let copied = f.root.join("etc/app/motd");
        assert_eq!(fs_err::read_to_string(&copied).unwrap(), "hello\n");
        assert_eq!(mode(&copied), 0o640);
        assert_eq!(mode(&f.root.join("etc/app")), 0o755);
        assert_eq!(owner_of(&copied), f.options.owner);
    }

    #[test]
    fn mode_overrides_the_source_and_a_trailing_slash_means_into() {
        let f = fixture();
        write(&f.src.join("run.sh"), "#!/bin/sh\n", 0o600);
        let options = CopyOptions {
            mode: Some(0o755),
            ..f.options
        };
        let report =
            copy_into_root(&f.root, &f.src.join("run.sh"), "/usr/local/bin/", &options).unwrap();
        assert_eq!(report.destination, "/usr/local/bin/run.sh");
        assert_eq!(mode(&f.root.join("usr/local/bin/run.sh")), 0o755);
    }

    #[test]
    fn an_existing_directory_receives_the_file_under_its_name() {
        let f = fixture();
        fs_err::create_dir_all(f.root.join("opt")).unwrap();
        write(&f.src.join("tool"), "x", 0o755);
        let report = copy_into_root(&f.root, &f.src.join("tool"), "/opt", &f.options).unwrap();
        assert_eq!(report.destination, "/opt/tool");
        assert!(f.root.join("opt/tool").is_file());
    }

    #[test]
    fn directories_are_merged_recursively_with_modes_and_symlinks_kept() {
        let f = fixture();
        let tree = f.src.join("tree");
        write(&tree.join("bin/run"), "run", 0o755);
        write(&tree.join("conf/app.conf"), "a=1", 0o600);
        fs_err::set_permissions(tree.join("conf"), std::fs::Permissions::from_mode(0o750)).unwrap();
        symlink("../conf/app.conf", tree.join("bin/conf")).unwrap();
        symlink("/etc/hostname", tree.join("hostname")).unwrap();
        fs_err::create_dir_all(f.root.join("opt/app/conf")).unwrap();
        write(&f.root.join("opt/app/old"), "kept", 0o644);

        let report = copy_into_root(&f.root, &tree, "/opt/app", &f.options).unwrap();
        assert_eq!(
            (report.files, report.symlinks, report.directories),
            (2, 2, 1)
        );
        let app = f.root.join("opt/app");
        assert_eq!(mode(&app.join("bin/run")), 0o755);
        assert_eq!(mode(&app.join("conf/app.conf")), 0o600);
        assert_eq!(mode(&app.join("bin")), 0o755);
        assert_eq!(
            fs_err::read_link(app.join("bin/conf")).unwrap(),
            Path::new("../conf/app.conf")
        );
        assert_eq!(
            fs_err::read_link(app.join("hostname")).unwrap(),
            Path::new("/etc/hostname")
        );
        assert_eq!(fs_err::read_to_string(app.join("old")).unwrap(), "kept");
    }

    #[test]
    fn image_symlinks_to_directories_are_written_through() {
        let f = fixture();
        fs_err::create_dir_all(f.root.join("usr/lib")).unwrap();
        symlink("usr/lib", f.root.join("lib")).unwrap();
        write(&f.src.join("tree/lib/modules/x.ko"), "ko", 0o644);
        copy_into_root(&f.root, &f.src.join("tree"), "/", &f.options).unwrap();
        assert!(f.root.join("usr/lib/modules/x.ko").is_file());
        assert!(
            fs_err::symlink_metadata(f.root.join("lib"))
                .unwrap()
                .file_type()
                .is_symlink(),
            "merged-usr link intact"
        );
    }

    #[test]
    fn absolute_symlinks_in_the_image_stay_inside_the_root() {
        let f = fixture();
        symlink(&f.outside, f.root.join("etc")).unwrap();
        write(&f.src.join("passwd"), "evil", 0o644);
        copy_into_root(&f.root, &f.src.join("passwd"), "/etc/passwd", &f.options).unwrap();
        assert!(fs_err::read_dir(&f.outside).unwrap().next().is_none());
        let inside = f
            .root
            .join(f.outside.strip_prefix("/").unwrap())
            .join("passwd");
        assert_eq!(fs_err::read_to_string(inside).unwrap(), "evil");
    }

    #[test]
    fn dotdot_never_climbs_out_of_the_root() {
        let f = fixture();
        write(&f.src.join("canary"), "x", 0o644);
        let escape = format!("/../../../../..{}/canary", f.outside.display());
        copy_into_root(&f.root, &f.src.join("canary"), &escape, &f.options).unwrap();
        assert!(!f.outside.join("canary").exists());
        let inside = f
            .root
            .join(f.outside.strip_prefix("/").unwrap())
            .join("canary");
        assert!(inside.is_file());
    }

    #[test]
    fn the_final_component_is_replaced_not_followed() {
        let f = fixture();
        write(&f.root.join("data/real"), "original", 0o644);
        fs_err::create_dir_all(f.root.join("etc")).unwrap();
        symlink("../data/real", f.root.join("etc/conf")).unwrap();
        write(&f.root.join("etc/a"), "shared", 0o644);
        fs_err::hard_link(f.root.join("etc/a"), f.root.join("etc/b")).unwrap();
        write(&f.src.join("new"), "new", 0o644);

        copy_into_root(&f.root, &f.src.join("new"), "/etc/conf", &f.options).unwrap();
        copy_into_root(&f.root, &f.src.join("new"), "/etc/a", &f.options).unwrap();
        assert!(
            fs_err::symlink_metadata(f.root.join("etc/conf"))
                .unwrap()
                .is_file()
        );
        assert_eq!(
            fs_err::read_to_string(f.root.join("data/real")).unwrap(),
            "original"
        );
        assert_eq!(fs_err::read_to_string(f.root.join("etc/a")).unwrap(), "new");
        assert_eq!(
            fs_err::read_to_string(f.root.join("etc/b")).unwrap(),
            "shared"
        );
        let leftovers: Vec<_> = fs_err::read_dir(f.root.join("etc"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with(".bake-copy"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_directory_in_the_way_of_a_file_is_an_error() {
        let f = fixture();
        fs_err::create_dir_all(f.root.join("opt/app/conf")).unwrap();
        write(&f.src.join("tree/conf"), "file", 0o644);
        let error =
            copy_into_root(&f.root, &f.src.join("tree"), "/opt/app", &f.options).unwrap_err();
        assert!(
            matches!(error, CopyError::IsADirectory { ref destination } if destination == "/opt/app/conf")
        );
    }

    #[test]
    fn special_files_are_refused() {
        let f = fixture();
        let fifo = f.src.join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let error = copy_into_root(&f.root, &fifo, "/pipe", &f.options).unwrap_err();
        assert!(matches!(
            error,
            CopyError::Unsupported {
                kind: "named pipe",
                ..
            }
        ));
        assert!(matches!(
            copy_into_root(&f.root, &f.src.join("missing"), "/x", &f.options),
            Err(CopyError::Source { .. })
        ));
    }

    #[test]
    fn by_default_everything_is_root_owned() {
        if !crate::skip::root("chown to root") {
            return;
        }
        let f = fixture();
        write(&f.src.join("tree/f"), "x", 0o644);
        symlink("f", f.src.join("tree/l")).unwrap();
        let options = CopyOptions {
            owner: (1000, 1001),
            ..CopyOptions::default()
        };
        copy_into_root(&f.root, &f.src.join("tree"), "/srv/data", &options).unwrap();
        assert_eq!(owner_of(&f.root.join("srv")), (0, 0));
        assert_eq!(owner_of(&f.root.join("srv/data")), (1000, 1001));
        assert_eq!(owner_of(&f.root.join("srv/data/f")), (1000, 1001));
        assert_eq!(owner_of(&f.root.join("srv/data/l")), (1000, 1001));
        copy_into_root(
            &f.root,
            &f.src.join("tree/f"),
            "/etc/f",
            &CopyOptions::default(),
        )
        .unwrap();
        assert_eq!(owner_of(&f.root.join("etc/f")), (0, 0));
    }
}
