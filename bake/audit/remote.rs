//! The gate on a live machine: what an instance build uploads to its builder (this host's
//! `oscap` with everything it loads, and the data stream), the script that scans the builder's
//! own root with it, and the judgement of the results it downloads.
//!
//! ```text
//!  build host: oscap + ldd closure + ld.so + /usr/share/openscap ─► bundle .tar.gz (cached by content)
//!              data stream (prepared) ─► .xml.gz (cached by digest)
//!  builder:    /tmp/bake-audit-XXXX ◄─ both, over SFTP
//!              ld.so --library-path lib bin/oscap xccdf eval … / ─► results-arf.xml
//!  build host: ◄─ results-arf.xml, dpkg status ─► read_arf + judge (the snapshot gate's code)
//!  builder:    rm -rf /tmp/bake-audit-XXXX, before the instance is stopped and imaged
//! ```
//!
//! Why a bundle: the builder must not need OpenSCAP, and the image must not get it. OpenSCAP
//! 1.3 runs its probes as threads inside `oscap` (there are no `probe_*` executables), so the
//! binary, the shared libraries `ldd` lists for it and its SCE plugin (libopenscap's own
//! dependencies included), and the schemas and XSL it reads are the whole scanner. It is run
//! through the bundled dynamic loader with `--library-path`, so nothing of the builder's libc
//! or libraries is used: the bundle runs on any Linux of the host's architecture. A builder of
//! another architecture is refused before anything is launched ([`check_architecture`]).
//!
//! The scan on the machine itself needs none of the offline tricks of [`super::oscap`]: the
//! probes read the live root, its mounts, its processes and its package database. Root's
//! standard `PATH` is still set (the environment probe reads the scanner's own environment).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::content::Content;
use super::oscap::{self, ChecksRanOn, Datastream, Scan, Scanned};
use super::{AuditDirs, AuditError, AuditRecord, EndedPackage};
use crate::recipe::Audit;

/// Where Debian's openscap-common keeps the schemas, XSL and CPE dictionaries `oscap` reads.
const OPENSCAP_SHARE: &str = "/usr/share/openscap";

/// The SCE check-engine plugin, loaded by `oscap` at start (next to libopenscap).
const SCE_PLUGIN: &str = "libopenscap_sce.so.25";

/// Bumped when the bundle's layout changes, so an older cached archive is not reused.
const BUNDLE_FORMAT: &str = "bake-oscap-bundle-v1";

/// Root's `PATH` on Debian: the scanner's own environment is what the PATH rules judge.
const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How many lines of the remote scanner's log an error shows.
const ERROR_TAIL_LINES: usize = 20;

/// File names inside the builder's scan directory.
pub const BUNDLE_FILE: &str = "oscap-bundle.tar.gz";
pub const DATASTREAM_FILE: &str = "datastream.xml.gz";
pub const RESULTS_FILE: &str = "results-arf.xml";

/// The architecture (EC2's name) of the machine bake runs on, whose `oscap` it uploads.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "arm64",
        other => other,
    }
}

/// Refuses a builder whose architecture is not this host's: the uploaded scanner is this
/// host's binary.
pub fn check_architecture(builder: &str) -> Result<(), AuditError> {
    let host = host_architecture();
    if builder == host {
        Ok(())
    } else {
        Err(AuditError::Architecture {
            host: host.to_owned(),
            builder: builder.to_owned(),
        })
    }
}

/// This host's `oscap`, its libraries, loader and data, packed for upload.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The `.tar.gz`, in the store's cache.
    pub archive: PathBuf,
    /// `sha256:…` over the bundled files' names, modes and contents.
    pub digest: String,
    /// The dynamic loader's file name inside `lib/` (`ld-linux-x86-64.so.2`).
    pub loader: String,
}

/// One file of the bundle.
struct Entry {
    /// Path inside the bundle (`bin/oscap`, `lib/libc.so.6`, `share/openscap/…`).
    name: String,
    source: PathBuf,
    mode: u32,
}

impl Bundle {
    /// Collects the scanner's files and packs them, unless an archive of the same content is
    /// already cached in `cache`.
    pub fn prepare(cache: &Path) -> Result<Bundle, AuditError> {
        let oscap = find_program("oscap").ok_or(AuditError::Missing { program: "oscap" })?;
        let (entries, loader) = collect(&oscap)?;
        let mut hasher = Sha256::new();
        hasher.update(BUNDLE_FORMAT.as_bytes());
        for entry in &entries {
            hasher.update(b"\0");
            hasher.update(entry.name.as_bytes());
            hasher.update(format!("\0{:o}\0", entry.mode).as_bytes());
            hasher.update(file_digest(&entry.source)?);
        }
        let digest = crate::id::Digest::from_hasher(hasher);
        let archive = cache.join(format!("oscap-bundle-{}.tar.gz", digest.hex()));
        let bundle = Bundle {
            archive,
            digest: digest.to_string(),
            loader,
        };
        if bundle.archive.is_file() {
            return Ok(bundle);
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { path, source }
        };
        fs_err::create_dir_all(cache).map_err(io(cache))?;
        let temp = tempfile::NamedTempFile::new_in(cache).map_err(io(cache))?;
        {
            let gz = flate2::write::GzEncoder::new(
                temp.as_file().try_clone().map_err(io(cache))?,
                flate2::Compression::default(),
            );
            let mut tar = tar::Builder::new(gz);
            let mut dirs = std::collections::BTreeSet::new();
            for entry in &entries {
                // Parent directories first, each once, so extraction needs no `mkdir -p`.
                let mut parent = String::new();
                for part in entry
                    .name
                    .split('/')
                    .rev()
                    .skip(1)
                    .collect::<Vec<_>>()
                    .iter()
                    .rev()
                {
                    parent = if parent.is_empty() {
                        (*part).to_owned()
                    } else {
                        format!("{parent}/{part}")
                    };
                    if dirs.insert(parent.clone()) {
                        let mut header = tar::Header::new_gnu();
                        header.set_entry_type(tar::EntryType::Directory);
                        header.set_mode(0o755);
                        header.set_size(0);
                        header.set_mtime(0);
                        header.set_cksum();
                        tar.append_data(&mut header, format!("{parent}/"), std::io::empty())
                            .map_err(io(&bundle.archive))?;
                    }
                }
                let file = fs_err::File::open(&entry.source).map_err(io(&entry.source))?;
                let size = file.metadata().map_err(io(&entry.source))?.len();
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(entry.mode);
                header.set_size(size);
                header.set_mtime(0);
                header.set_cksum();
                tar.append_data(&mut header, &entry.name, file)
                    .map_err(io(&entry.source))?;
            }
            let gz = tar.into_inner().map_err(io(&bundle.archive))?;
            let mut file = gz.finish().map_err(io(&bundle.archive))?;
            file.flush().map_err(io(&bundle.archive))?;
        }
        temp.as_file().sync_all().map_err(io(&bundle.archive))?;
        temp.persist(&bundle.archive)
            .map_err(|e| io(&bundle.archive)(e.error))?;
        Ok(bundle)
    }
}

/// `program` on `PATH`, with symbolic links resolved.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .and_then(|found| fs_err::canonicalize(found).ok())
}

/// The bundle's files, sorted by name, and the loader's file name.
fn collect(oscap: &Path) -> Result<(Vec<Entry>, String), AuditError> {
    let mut entries = vec![Entry {
        name: "bin/oscap".into(),
        source: oscap.to_path_buf(),
        mode: 0o755,
    }];
    let mut objects = vec![oscap.to_path_buf()];
    let (libraries, loader) = shared_objects(&objects)?;
    // The SCE plugin is dlopen'ed, so `ldd oscap` does not list it: it lives next to
    // libopenscap, and its own dependencies are the next `ldd`'s.
    let plugin = libraries
        .iter()
        .find(|(name, _)| name.starts_with("libopenscap.so"))
        .and_then(|(_, path)| path.parent())
        .map(|dir| dir.join(SCE_PLUGIN))
        .filter(|p| p.is_file());
    let (libraries, loader) = match plugin {
        Some(plugin) => {
            objects.push(plugin.clone());
            let (mut all, loader) = shared_objects(&objects)?;
            all.push((SCE_PLUGIN.to_owned(), plugin));
            (all, loader)
        }
        None => (libraries, loader),
    };
    let loader_path = loader.ok_or_else(|| AuditError::Bundle {
        reason: format!("`ldd {}` names no dynamic loader", oscap.display()),
    })?;
    let loader_name = loader_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| AuditError::Bundle {
            reason: format!("the loader `{}` has no file name", loader_path.display()),
        })?;
    entries.push(Entry {
        name: format!("lib/{loader_name}"),
        source: loader_path,
        mode: 0o755,
    });
    for (name, path) in libraries {
        if name == loader_name || entries.iter().any(|e| e.name == format!("lib/{name}")) {
            continue;
        }
        entries.push(Entry {
            name: format!("lib/{name}"),
            source: path,
            mode: 0o644,
        });
    }
    let share = Path::new(OPENSCAP_SHARE);
    if !share.is_dir() {
        return Err(AuditError::Bundle {
            reason: format!("`{OPENSCAP_SHARE}` (OpenSCAP's schemas and XSL) is missing"),
        });
    }
    for item in walkdir::WalkDir::new(share)
        .follow_links(true)
        .sort_by_file_name()
    {
        let item = item.map_err(|e| AuditError::Io {
            path: share.to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| std::io::Error::other("walk")),
        })?;
        if !item.file_type().is_file() {
            continue;
        }
        let relative = item.path().strip_prefix(share).unwrap_or(item.path());
        entries.push(Entry {
            name: format!("share/openscap/{}", relative.to_string_lossy()),
            source: item.path().to_path_buf(),
            mode: 0o644,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((entries, loader_name))
}

/// Shared objects by the name their dependents ask for (`libc.so.6`) and the file it resolves to.
type Libraries = Vec<(String, PathBuf)>;

/// The shared objects `ldd` resolves for `objects`, and the dynamic loader.
fn shared_objects(objects: &[PathBuf]) -> Result<(Libraries, Option<PathBuf>), AuditError> {
    let output = Command::new("ldd")
        .args(objects)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => AuditError::Missing { program: "ldd" },
            _ => AuditError::Spawn {
                program: "ldd",
                source,
            },
        })?;
    if !output.status.success() {
        return Err(AuditError::Bundle {
            reason: format!(
                "`ldd` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    parse_ldd(&String::from_utf8_lossy(&output.stdout))
}

fn parse_ldd(text: &str) -> Result<(Libraries, Option<PathBuf>), AuditError> {
    let mut libraries = Libraries::new();
    let mut loader = None;
    for line in text.lines() {
        // `ldd A B` heads each object's list with `A:`.
        if !line.starts_with(['\t', ' ']) {
            continue;
        }
        let line = line.trim();
        if let Some((name, rest)) = line.split_once(" => ") {
            let path = rest.split(" (").next().unwrap_or("").trim();
            if path == "not found" || path.is_empty() {
                return Err(AuditError::Bundle {
                    reason: format!("`ldd` cannot find `{name}`, which `oscap` needs"),
                });
            }
            let name = name.trim().to_owned();
            if !libraries.iter().any(|(n, _)| *n == name) {
                libraries.push((name, PathBuf::from(path)));
            }
        } else if line.starts_with('/') {
            let path = line.split(" (").next().unwrap_or("").trim();
            loader = Some(PathBuf::from(path));
        }
        // `linux-vdso.so.1` is the kernel's: nothing to bundle.
    }
    Ok((libraries, loader))
}

fn file_digest(path: &Path) -> Result<[u8; 32], AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs_err::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buffer).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().into())
}

/// Everything the gate needs before a builder exists: checked and cached on this host, so a
/// missing scanner, a bad data stream or an unknown profile fails the build before anything
/// is launched.
#[derive(Debug)]
pub struct Prepared {
    pub scanner_version: String,
    pub datastream: Datastream,
    /// The data stream's XML, gzip-compressed for the upload (cached by digest).
    pub datastream_gz: PathBuf,
    pub applicability: Content,
    pub bundle: Bundle,
}

impl Prepared {
    pub fn new(audit: &Audit, dirs: &AuditDirs) -> Result<Prepared, AuditError> {
        let scanner_version = oscap::version()?;
        let datastream = Datastream::prepare(&audit.datastream, &dirs.cache)?;
        let applicability = datastream.content(&audit.profile)?;
        let datastream_gz = compressed(&datastream, &dirs.cache)?;
        let bundle = Bundle::prepare(&dirs.cache)?;
        Ok(Prepared {
            scanner_version,
            datastream,
            datastream_gz,
            applicability,
            bundle,
        })
    }

    /// The script (run as root in `dir`, which holds the two uploads) that unpacks the
    /// scanner and scans the machine's root with `profile`. It exits 0 when the scan ran
    /// (whatever the rules' results), else with `oscap`'s code after printing its log's end.
    pub fn scan_script(&self, dir: &str, profile: &str) -> String {
        let q = crate::ssh::shell_quote;
        format!(
            r#"set -eu
dir={dir}
cd "$dir"
umask 022
tar -xzf {bundle} --no-same-owner
gzip -dc {ds} > datastream.xml
set +e
env -i PATH={path} LC_ALL=C.UTF-8 \
  OSCAP_SCHEMA_PATH="$dir/share/openscap/schemas" OSCAP_XSLT_PATH="$dir/share/openscap/xsl" \
  OSCAP_CPE_PATH="$dir/share/openscap/cpe" OSCAP_CHECK_ENGINE_PLUGIN_DIR="$dir/lib" \
  "$dir/lib/"{loader} --library-path "$dir/lib" "$dir/bin/oscap" \
  xccdf eval --profile {profile} --results-arf "$dir/{results}" "$dir/datastream.xml" \
  > "$dir/oscap.log" 2>&1
code=$?
# 2: the scan ran and some rule failed.
if [ "$code" -eq 0 ] || [ "$code" -eq 2 ]; then exit 0; fi
tail -n {tail} "$dir/oscap.log" >&2
exit "$code"
"#,
            dir = q(dir),
            bundle = q(BUNDLE_FILE),
            ds = q(DATASTREAM_FILE),
            path = q(ROOT_PATH),
            loader = q(&self.bundle.loader),
            profile = q(profile),
            results = RESULTS_FILE,
            tail = ERROR_TAIL_LINES,
        )
    }

    /// The scan the downloaded ARF records, read as the snapshot gate reads its own.
    pub fn read(&self, arf: &str, profile: &str, shown: &Path) -> Result<Scan, AuditError> {
        oscap::read_arf(
            arf,
            &self.applicability,
            profile,
            &Scanned {
                results: &shown.join(RESULTS_FILE),
                root: shown,
                checks_ran_on: ChecksRanOn::Target,
            },
        )
    }

    /// The gate's verdict on `scan`: `Ok` with the record when it passes,
    /// [`AuditError::Gate`] with the same record when it fails.
    pub fn judge(
        &self,
        scan: &Scan,
        audit: &Audit,
        unsupported: Vec<EndedPackage>,
    ) -> Result<AuditRecord, AuditError> {
        let record = super::judge(
            scan,
            audit,
            &self.scanner_version,
            &self.datastream.digest,
            unsupported,
        );
        if record.problems.is_empty() {
            Ok(record)
        } else {
            Err(AuditError::Gate(Box::new(record)))
        }
    }
}

/// The script that removes the scan directory and checks it is gone.
pub fn cleanup_script(dir: &str) -> String {
    let dir = crate::ssh::shell_quote(dir);
    format!("rm -rf {dir}\ntest ! -e {dir}\n")
}

/// The data stream's XML gzip-compressed (SSG's 15 MB compress to about 1 MB), cached as
/// `<digest>.xml.gz`.
fn compressed(datastream: &Datastream, cache: &Path) -> Result<PathBuf, AuditError> {
    // Named by the digest's hex digits (a cache key, so anything unparsable is used as is).
    let name = datastream
        .digest
        .parse::<crate::id::Digest>()
        .map_or_else(|_| datastream.digest.clone(), |d| d.hex().to_owned());
    let path = cache.join(format!("{name}.xml.gz"));
    if path.is_file() {
        return Ok(path);
    }
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AuditError::Io { path: p, source }
    };
    fs_err::create_dir_all(cache).map_err(io(cache))?;
    let temp = tempfile::NamedTempFile::new_in(cache).map_err(io(cache))?;
    let mut input = fs_err::File::open(&datastream.xml).map_err(io(&datastream.xml))?;
    let mut gz = flate2::write::GzEncoder::new(
        temp.as_file().try_clone().map_err(io(cache))?,
        flate2::Compression::default(),
    );
    std::io::copy(&mut input, &mut gz).map_err(io(&datastream.xml))?;
    gz.finish().map_err(io(&path))?;
    temp.as_file().sync_all().map_err(io(&path))?;
    temp.persist(&path).map_err(|e| io(&path)(e.error))?;
    Ok(path)
}

/// A scratch root holding only what the support check reads (the dpkg status database and
/// `/etc/debian_version`), from the builder's copies; `None` entries were not on the builder.
pub fn support_root(
    work: &Path,
    status: Option<&[u8]>,
    debian_version: Option<&[u8]>,
) -> Result<tempfile::TempDir, AuditError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| AuditError::Io { path: p, source }
    };
    fs_err::create_dir_all(work).map_err(io(work))?;
    let dir = tempfile::Builder::new()
        .prefix("builder-dpkg-")
        .tempdir_in(work)
        .map_err(io(work))?;
    if let Some(status) = status {
        let admin = dir.path().join("var/lib/dpkg");
        fs_err::create_dir_all(&admin).map_err(io(&admin))?;
        fs_err::write(admin.join("status"), status).map_err(io(&admin))?;
    }
    if let Some(version) = debian_version {
        let etc = dir.path().join("etc");
        fs_err::create_dir_all(&etc).map_err(io(&etc))?;
        fs_err::write(etc.join("debian_version"), version).map_err(io(&etc))?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_libraries_and_the_loader() {
        let text = "/usr/bin/oscap:\n\tlinux-vdso.so.1 (0x00007ffd)\n\tlibopenscap.so.25 => /lib/x86_64-linux-gnu/libopenscap.so.25 (0x00007f15)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f15)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f15)\n/usr/lib/x86_64-linux-gnu/libopenscap_sce.so.25:\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f15)\n";
        let (libraries, loader) = parse_ldd(text).unwrap();
        assert_eq!(
            libraries,
            [
                (
                    "libopenscap.so.25".to_owned(),
                    PathBuf::from("/lib/x86_64-linux-gnu/libopenscap.so.25")
                ),
                (
                    "libc.so.6".to_owned(),
                    PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
                ),
            ]
        );
        assert_eq!(loader, Some(PathBuf::from("/lib64/ld-linux-x86-64.so.2")));
        assert!(parse_ldd("x:\n\tlibgone.so.1 => not found\n").is_err());
    }

    #[test]
    fn another_architecture_is_refused() {
        assert!(check_architecture(host_architecture()).is_ok());
        let other = if host_architecture() == "arm64" {
            "x86_64"
        } else {
            "arm64"
        };
        let e = check_architecture(other).unwrap_err();
        assert!(e.to_string().contains(other), "{e}");
        assert!(e.hint().is_some());
    }

    #[test]
    fn the_cleanup_script_quotes_the_directory_and_checks_it_is_gone() {
        let script = cleanup_script("/tmp/bake-audit-1 'x");
        assert_eq!(
            script,
            "rm -rf '/tmp/bake-audit-1 '\\''x'\ntest ! -e '/tmp/bake-audit-1 '\\''x'\n"
        );
    }
}
