//! Test trees shared by the `build` unit tests: a root with one of every kind of entry and
//! attribute a layer has to carry, and helpers to read a layer tar back.
//!
//! Most of these tests need root (chown, mknod, mount), as CI has: [`privileged`] skips them
//! with a counted message for a developer who is not root, and fails them in CI.

use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use rustix::fs::{FileType, Mode, makedev, mknodat};

/// Whether a test may do what only root can (see [`crate::skip`]: skips outside CI, fails in
/// CI, which runs as root).
pub fn privileged() -> bool {
    crate::skip::root("chown, mknod, mount")
}

/// A path longer than a tar header's 100-byte name field.
pub const LONG_DIR: &str = "opt/a-directory-name-long-enough/to-need/a-gnu-long-name-entry/in/the/tar/header/because/it-is-long";

pub fn write(root: &Path, path: &str, content: &[u8]) {
    let full = root.join(path);
    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
    std::fs::write(full, content).unwrap();
}

pub fn chmod(root: &Path, path: &str, mode: u32) {
    std::fs::set_permissions(root.join(path), std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn chown(root: &Path, path: &str, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(root.join(path), Some(uid), Some(gid)).unwrap();
}

pub fn mknod(root: &Path, path: &str, file_type: FileType, major: u32, minor: u32) {
    let full = root.join(path);
    std::fs::create_dir_all(full.parent().unwrap()).unwrap();
    mknodat(
        rustix::fs::CWD,
        &full,
        file_type,
        Mode::from_raw_mode(0o644),
        makedev(major, minor),
    )
    .unwrap();
}

/// One of everything: files with owners and special mode bits, a hard link pair, relative and
/// absolute symlinks, devices, a fifo, a sticky and a setgid directory, an xattr, and a path and
/// a symlink target too long for a plain tar header.
pub fn rich_tree(root: &Path) {
    write(root, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n");
    write(root, "etc/shadow", b"root:*:19000:0:99999:7:::\n");
    chmod(root, "etc/shadow", 0o640);
    chown(root, "etc/shadow", 0, 42);
    write(root, "etc/motd", b"welcome\n");
    write(root, "usr/bin/sudo", b"\x7fELF pretend sudo");
    chmod(root, "usr/bin/sudo", 0o4755);
    std::fs::hard_link(root.join("usr/bin/sudo"), root.join("usr/bin/sudoedit")).unwrap();
    write(root, "usr/lib/libx.so.1", &vec![7u8; 70_000]);
    symlink("libx.so.1", root.join("usr/lib/libx.so")).unwrap();
    symlink("usr/bin", root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    chmod(root, "tmp", 0o1777);
    mknod(root, "dev/null", FileType::CharacterDevice, 1, 3);
    mknod(root, "dev/sda", FileType::BlockDevice, 8, 0);
    mknod(root, "run/initctl", FileType::Fifo, 0, 0);
    write(root, "var/lib/attr", b"with an xattr\n");
    xattr::set(root.join("var/lib/attr"), "user.bake", b"yes").unwrap();
    write(root, "var/cache/app/old", b"stale\n");
    write(root, "var/cache/app/keep", b"kept\n");
    std::fs::create_dir_all(root.join("srv/data")).unwrap();
    chown(root, "srv", 1000, 1000);
    chmod(root, "srv/data", 0o2775);
    write(root, "home/user/.profile", b"export A=1\n");
    chown(root, "home/user/.profile", 1000, 1000);
    chown(root, "home/user", 1000, 1000);
    write(root, &format!("{LONG_DIR}/file"), b"long\n");
    symlink(
        format!("/{LONG_DIR}/file/and/a/target/that/is/itself/longer/than/a/hundred/bytes"),
        root.join("opt/long-link"),
    )
    .unwrap();
    write(root, "usr/share/doc/pkg/README", b"docs\n");
    write(root, "usr/share/doc/pkg/copyright", b"(c)\n");
}

/// One tar entry, as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub path: String,
    pub kind: tar::EntryType,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: Option<String>,
    pub size: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub device: Option<(u32, u32)>,
    pub user_name: Vec<u8>,
}

/// Every entry of a plain tar.
pub fn list(tar_bytes: &[u8]) -> Vec<Listed> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let xattrs = match entry.pax_extensions().unwrap() {
            Some(extensions) => extensions
                .map(|e| e.unwrap())
                .map(|e| (e.key().unwrap().to_string(), e.value_bytes().to_vec()))
                .collect(),
            None => Vec::new(),
        };
        let header = entry.header().clone();
        let device = match header.entry_type() {
            tar::EntryType::Char | tar::EntryType::Block => Some((
                header.device_major().unwrap().unwrap(),
                header.device_minor().unwrap().unwrap(),
            )),
            _ => None,
        };
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        out.push(Listed {
            path: String::from_utf8(entry.path_bytes().into_owned()).unwrap(),
            kind: header.entry_type(),
            mode: header.mode().unwrap(),
            uid: header.uid().unwrap(),
            gid: header.gid().unwrap(),
            mtime: header.mtime().unwrap(),
            link: entry
                .link_name_bytes()
                .map(|l| String::from_utf8(l.into_owned()).unwrap()),
            size: content.len() as u64,
            xattrs,
            device,
            user_name: header.username_bytes().unwrap_or_default().to_vec(),
        });
    }
    out
}
