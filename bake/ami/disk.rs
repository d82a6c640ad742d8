//! The bootable disk image of an AMI (`outputs.ami.strategy: snapshot`): a provisioned root
//! filesystem in, a raw GPT disk image file out, reproducibly.
//!
//! ```text
//!  LBA 0      protective MBR
//!  LBA 1-33   GPT header and partition entries
//!  1 MiB      partition 1: EFI system partition (FAT32, `ESP`): systemd-boot as the removable-
//!             media loader (EFI/BOOT/BOOTX64.EFI), kernel, initrd, one loader entry
//!  +ESP       partition 2: ext4 root (label `root`), made by `mkfs.ext4 -d ROOT`
//!  last MiB   backup GPT
//! ```
//!
//! Everything happens in regular files: each filesystem is made in its own sparse file
//! (`mkfs.vfat` + `mtools`, `mkfs.ext4 -d`) and copied into the image at its partition's
//! offset, holes kept as holes. No loop device, no mount, nothing on the host's disks but the
//! output and a work directory beside it.
//!
//! The kernel command line and `/etc/fstab` name the root by filesystem UUID and the ESP by its
//! volume id; the serial console (`ttyS0`, what EC2's serial console and `get-console-output`
//! read) gets the kernel's and systemd's messages and a login prompt.
//!
//! Same root, same [`DiskSpec`], same bytes: the disk and partition GUIDs, the ext4 UUID and
//! directory hash seed and the FAT volume id are uuid v5 values derived from
//! [`DiskSpec::seed`] (the recipe's version); `mkfs.ext4` and `mtools` take their clock from
//! `E2FSPROGS_FAKE_TIME` / `SOURCE_DATE_EPOCH`; file modification times are clamped to the
//! build's `SOURCE_DATE_EPOCH`; and because `mkfs.ext4 -d` copies each source file's change
//! and access times (which record when the build root was unpacked, not what is in it),
//! every inode's `ctime` and `atime` are set to `SOURCE_DATE_EPOCH` afterwards with `debugfs`.
//! `mkfs.ext4` reads directories in sorted order (e2fsprogs 1.47), so inode numbers and block
//! placement do not depend on the build root's own directory order.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::recipe::{AmiOutput, Architecture};

/// Sector size of the image (EBS volumes and every hypervisor bake targets use 512).
pub const SECTOR_SIZE: u64 = 512;
/// Partitions start and end on 1 MiB boundaries, as every partitioning tool does: it keeps
/// filesystem blocks aligned to the larger units of EBS and SSDs.
const ALIGNMENT: u64 = 1 << 20;
/// The EFI system partition's default size: room for systemd-boot, two kernels and two
/// initrds of a cloud kernel (about 40 MiB each), as systemd's own guidance suggests.
pub const DEFAULT_ESP_SIZE: u64 = 256 << 20;
/// The smallest ESP bake makes: FAT32 needs 65525 clusters, 32 MiB with 512-byte clusters,
/// plus room for a kernel and an initrd.
const MIN_ESP_SIZE: u64 = 64 << 20;
/// The smallest root partition worth making.
const MIN_ROOT_SIZE: u64 = 64 << 20;
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// ext4 block size: the only one the kernel mounts on every architecture bake targets.
const EXT4_BLOCK_SIZE: u64 = 4096;
/// Bytes per inode in the ext4 inode table.
const EXT4_INODE_SIZE: u64 = 256;
/// How many lines of a failing tool's output an error shows.
const ERROR_TAIL_LINES: usize = 20;
/// Copy and hash buffer.
const CHUNK: usize = 1 << 20;

/// GPT partition type of an EFI system partition.
const ESP_TYPE: Uuid = Uuid::from_u128(0xC12A7328_F81F_11D2_BA4B_00A0C93EC93B);
/// GPT partition types of a root partition (the Discoverable Partitions Specification), so
/// systemd and tools recognize it without the table saying more.
const ROOT_X86_64_TYPE: Uuid = Uuid::from_u128(0x4F68BCE3_E8CD_4DB1_96E7_FBCAF984B709);
const ROOT_ARM64_TYPE: Uuid = Uuid::from_u128(0xB921B045_1DF0_41C3_AF44_4C6F280D3FAE);
/// The uuid v5 namespace of every id bake derives for a disk. Chosen once (random); changing
/// it changes every disk image's bytes.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x3d5f_0c8e_9a41_4b6e_8f27_1e64_b0a9_c512);

/// The ext4 root's volume label.
pub const ROOT_LABEL: &str = "root";
/// The ESP's volume label.
pub const ESP_LABEL: &str = "ESP";
/// Where the ESP is mounted in the booted system.
pub const ESP_MOUNT_POINT: &str = "/boot/efi";
/// The directory on the ESP holding the kernel and initrd.
const ESP_KERNEL_DIR: &str = "bake";
/// The loader entry's file name (and its id for `loader.conf`'s `default`).
const LOADER_ENTRY: &str = "bake.conf";

/// mke2fs's configuration, written next to the filesystem and used instead of the host's
/// `/etc/mke2fs.conf`, so the feature set does not depend on the machine that builds. These
/// are Debian bookworm's ext4 defaults; every one is supported by Linux 5.10 and later.
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
\treserved_ratio = 5.0
\tlazy_itable_init = 1

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

/// What disk to make. [`DiskSpec::for_recipe`] derives it from a recipe's AMI output.
#[derive(Debug, Clone, Serialize)]
pub struct DiskSpec {
    /// The whole disk, in bytes (a multiple of 1 MiB): the EBS volume size.
    pub size: u64,
    /// The EFI system partition, in bytes (a multiple of 1 MiB).
    pub esp_size: u64,
    pub architecture: Architecture,
    /// What every id of the disk is derived from: the recipe's version, so the same version
    /// gives the same disk and different versions never share a filesystem UUID.
    pub seed: String,
    /// Every timestamp bake or the mkfs tools write, and the ceiling of the root's mtimes.
    pub source_date_epoch: u64,
    /// Kernel parameters after bake's own (`root=`, `ro`, consoles).
    pub kernel_options: Vec<String>,
}

impl DiskSpec {
    /// A disk of `size_gib` GiB with the default ESP and no extra kernel options.
    pub fn new(
        size_gib: u32,
        architecture: Architecture,
        seed: impl Into<String>,
        source_date_epoch: u64,
    ) -> Self {
        DiskSpec {
            size: u64::from(size_gib) * GIB,
            esp_size: DEFAULT_ESP_SIZE,
            architecture,
            seed: seed.into(),
            source_date_epoch,
            kernel_options: Vec::new(),
        }
    }

    /// The disk of a recipe's AMI output (`disk_size_gib`, `architecture`) at `version`.
    pub fn for_recipe(ami: &AmiOutput, version: &str, source_date_epoch: u64) -> Self {
        DiskSpec::new(
            ami.disk_size_gib,
            ami.architecture,
            version,
            source_date_epoch,
        )
    }

    /// The ids of the disk, derived from the seed.
    pub fn ids(&self) -> DiskIds {
        let derive = |purpose: &str| {
            Uuid::new_v5(
                &ID_NAMESPACE,
                format!("bake-disk\0{}\0{purpose}", self.seed).as_bytes(),
            )
        };
        let volume = derive("esp-volume-id");
        let bytes = volume.as_bytes();
        DiskIds {
            disk_guid: derive("disk-guid"),
            esp_partition_guid: derive("esp-partition-guid"),
            root_partition_guid: derive("root-partition-guid"),
            root_fs_uuid: derive("root-fs-uuid"),
            root_hash_seed: derive("root-hash-seed"),
            esp_volume_id: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        }
    }

    /// Where the partitions go.
    pub fn layout(&self) -> Result<Layout, DiskError> {
        let bad = |reason: String| Err(DiskError::BadSpec { reason });
        if !self.size.is_multiple_of(ALIGNMENT) || !self.esp_size.is_multiple_of(ALIGNMENT) {
            return bad(format!(
                "the disk ({} bytes) and ESP ({} bytes) sizes must be multiples of 1 MiB",
                self.size, self.esp_size
            ));
        }
        if self.esp_size < MIN_ESP_SIZE {
            return bad(format!(
                "the ESP must be at least {} MiB, not {} MiB",
                MIN_ESP_SIZE / MIB,
                self.esp_size / MIB
            ));
        }
        // 1 MiB before the ESP (MBR, GPT), 1 MiB after the root (backup GPT).
        let root_size = self
            .size
            .checked_sub(2 * ALIGNMENT + self.esp_size)
            .filter(|s| *s >= MIN_ROOT_SIZE);
        let Some(root_size) = root_size else {
            return Err(DiskError::TooSmall {
                disk_size: self.size,
                needed: self.esp_size + 2 * ALIGNMENT + MIN_ROOT_SIZE,
                available: self.size.saturating_sub(2 * ALIGNMENT + self.esp_size),
            });
        };
        let esp_offset = ALIGNMENT;
        let root_offset = esp_offset + self.esp_size;
        Ok(Layout {
            esp: Extent {
                offset: esp_offset,
                size: self.esp_size,
            },
            root: Extent {
                offset: root_offset,
                size: root_size,
            },
        })
    }
}

/// The ids of one disk, all derived from [`DiskSpec::seed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskIds {
    pub disk_guid: Uuid,
    pub esp_partition_guid: Uuid,
    pub root_partition_guid: Uuid,
    pub root_fs_uuid: Uuid,
    /// The ext4 directory-index hash seed (random by default, so it must be pinned too).
    pub root_hash_seed: Uuid,
    /// The FAT volume id (serial number), shown as `XXXX-XXXX`.
    pub esp_volume_id: u32,
}

impl DiskIds {
    /// The ESP's volume id as `blkid` and `/dev/disk/by-uuid` show it.
    pub fn esp_uuid(&self) -> String {
        format!(
            "{:04X}-{:04X}",
            self.esp_volume_id >> 16,
            self.esp_volume_id & 0xffff
        )
    }
}

/// A byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub size: u64,
}

impl Extent {
    pub fn first_lba(&self) -> u64 {
        self.offset / SECTOR_SIZE
    }

    pub fn last_lba(&self) -> u64 {
        (self.offset + self.size) / SECTOR_SIZE - 1
    }
}

/// Where the partitions of a disk are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub esp: Extent,
    pub root: Extent,
}

/// One partition of a made disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// 1-based, as in `/dev/nvme0n1p1`.
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub guid: String,
    pub offset: u64,
    pub size: u64,
    /// The filesystem's UUID (ext4) or volume id (FAT, `XXXX-XXXX`).
    pub filesystem_id: String,
    pub label: String,
}

/// A disk image bake made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    pub path: PathBuf,
    /// Bytes (the EBS volume size).
    pub size: u64,
    /// `sha256:` of the whole raw image, holes read as zeros.
    pub digest: String,
    pub disk_guid: String,
    pub partitions: Vec<Partition>,
    pub root_fs_uuid: String,
    pub esp_uuid: String,
    /// The kernel release booted (`6.1.0-28-cloud-amd64`).
    pub kernel: String,
    /// The kernel command line in the loader entry.
    pub cmdline: String,
    /// Where systemd-boot came from: the image's own copy, or the building machine's.
    pub bootloader: String,
    /// Bytes of file data in the root filesystem (4 KiB blocks).
    pub root_data_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("`{tool}` is not installed; bake needs it to make disk images")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("failed to run `{tool}`")]
    Spawn {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("`{tool}` failed to {doing} (exit {code}):\n{tail}")]
    Tool {
        tool: &'static str,
        doing: String,
        code: i32,
        tail: String,
    },
    #[error("the root filesystem `{}` has no kernel: there is no /boot/vmlinuz-*", root.display())]
    NoKernel { root: PathBuf },
    #[error("the kernel {release} in `{}` has no initrd (/boot/initrd.img-{release})", root.display())]
    NoInitrd { root: PathBuf, release: String },
    #[error(
        "there is no systemd-boot for {architecture}: neither the image nor this machine has `{file}`"
    )]
    NoBootloader { architecture: String, file: String },
    #[error(
        "a {} MiB disk is too small for this root filesystem: it needs {} MiB, the root partition has {} MiB",
        disk_size / MIB,
        needed.div_ceil(MIB),
        available / MIB
    )]
    TooSmall {
        disk_size: u64,
        needed: u64,
        available: u64,
    },
    #[error(
        "the {} MiB EFI system partition cannot hold the kernel, initrd and boot loader ({} MiB)",
        esp_size / MIB,
        needed.div_ceil(MIB)
    )]
    EspTooSmall { esp_size: u64, needed: u64 },
    #[error("invalid disk: {reason}")]
    BadSpec { reason: String },
    #[error("failed to {doing} `{}`", path.display())]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to write the partition table of `{}`", path.display())]
    Gpt {
        path: PathBuf,
        #[source]
        source: gptman::Error,
    },
}

impl DiskError {
    pub fn hint(&self) -> Option<String> {
        match self {
            DiskError::MissingTool { package, .. } => Some(format!("install it with `apt-get install {package}`")),
            DiskError::NoKernel { .. } => Some(
                "add a kernel and an initrd generator to the base, e.g. `linux-image-cloud-amd64` (ENA and NVMe drivers for EC2) and `initramfs-tools` in `base.bootstrap.packages`".into(),
            ),
            DiskError::NoInitrd { .. } => Some(
                "add `initramfs-tools` (or `dracut`) to `base.bootstrap.packages` so installing the kernel makes an initrd".into(),
            ),
            DiskError::NoBootloader { .. } => Some(
                "add `systemd-boot-efi` to `base.bootstrap.packages`, or install it on the machine that builds".into(),
            ),
            DiskError::TooSmall { needed, .. } => Some(format!(
                "raise `outputs.ami.disk_size_gib` to at least {} or make the image smaller",
                (needed + DEFAULT_ESP_SIZE + 2 * ALIGNMENT).div_ceil(GIB)
            )),
            _ => None,
        }
    }

    /// Whether the recipe (not the machine) is at fault.
    pub fn is_recipe_failure(&self) -> bool {
        matches!(
            self,
            DiskError::NoKernel { .. }
                | DiskError::NoInitrd { .. }
                | DiskError::NoBootloader { .. }
                | DiskError::TooSmall { .. }
                | DiskError::EspTooSmall { .. }
                | DiskError::BadSpec { .. }
        )
    }
}

fn io_error(doing: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DiskError + use<> {
    let path = path.to_path_buf();
    move |source| DiskError::Io {
        doing,
        path,
        source,
    }
}

/// The host path of `path` in the image at `root`, following the image's symlinks inside
/// the root only: bake runs as root, and an image whose `/etc` points at the host's must not
/// get bake to write there.
fn in_root(root: &Path, path: &str) -> Result<PathBuf, DiskError> {
    crate::build::runner::resolve_in_root(root, Path::new(path)).map_err(|source| DiskError::Io {
        doing: "resolve",
        path: root.join(path.trim_start_matches('/')),
        source,
    })
}

/// The tools a disk image needs, and the Debian package of each.
const TOOLS: [(&str, &str); 5] = [
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("dumpe2fs", "e2fsprogs"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
];

/// Makes the disk image of `root` as described by `spec`, at `out` (replaced atomically).
///
/// `root` is prepared in place first: `/etc/fstab` gets the root and ESP entries (other
/// entries are kept), `/boot/efi` is created, and modification times later than the spec's
/// `SOURCE_DATE_EPOCH` are clamped to it. The work files live in a directory beside `out`
/// and are removed afterwards.
pub fn build_disk_image(root: &Path, spec: &DiskSpec, out: &Path) -> Result<DiskImage, DiskError> {
    let layout = spec.layout()?;
    let tools = Tools::find()?;
    let kernel = find_kernel(root)?;
    let (bootloader_path, bootloader) = find_bootloader(root, spec.architecture)?;
    let ids = spec.ids();
    let cmdline = kernel_cmdline(&ids, spec);

    let esp_needed = file_size(&kernel.vmlinuz)?
        + file_size(&kernel.initrd)?
        + 2 * file_size(&bootloader_path)?
        + 4 * MIB;
    // FAT32 spends about 1% on its tables.
    if esp_needed > spec.esp_size - spec.esp_size / 64 {
        return Err(DiskError::EspTooSmall {
            esp_size: spec.esp_size,
            needed: esp_needed,
        });
    }

    write_fstab(root, &ids)?;
    let usage = normalize_root(root, spec.source_date_epoch)?;
    // The inode table and journal come on top of the data; mkfs catches the rest.
    if usage.bytes + usage.inodes * EXT4_INODE_SIZE > layout.root.size {
        return Err(DiskError::TooSmall {
            disk_size: spec.size,
            needed: usage.bytes + usage.inodes * EXT4_INODE_SIZE,
            available: layout.root.size,
        });
    }

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let work = tempfile::Builder::new()
        .prefix(".bake-disk-")
        .tempdir_in(parent)
        .map_err(io_error("create a work directory in", parent))?;

    let esp_file = work.path().join("esp.img");
    make_esp(
        &tools,
        &EspContent {
            kernel: &kernel,
            bootloader: &bootloader_path,
            architecture: spec.architecture,
            cmdline: &cmdline,
            title: &os_title(root),
        },
        &ids,
        spec,
        work.path(),
        &esp_file,
    )?;
    let root_file = work.path().join("root.ext4");
    make_ext4(
        &tools,
        root,
        &ids,
        spec,
        &layout,
        &usage,
        work.path(),
        &root_file,
    )?;

    // Assemble: a sparse file of the disk's size, the partition table, the two filesystems.
    let image_tmp = work.path().join("disk.raw");
    let mut image = File::create(&image_tmp).map_err(io_error("create", &image_tmp))?;
    image
        .set_len(spec.size)
        .map_err(io_error("size", &image_tmp))?;
    write_partition_table(&mut image, &image_tmp, &layout, &ids, spec.architecture)?;
    copy_sparse(&esp_file, &image, &image_tmp, layout.esp.offset)?;
    copy_sparse(&root_file, &image, &image_tmp, layout.root.offset)?;
    image.sync_all().map_err(io_error("sync", &image_tmp))?;
    drop(image);
    let digest = hash_sparse(&image_tmp)?;
    fs_err::rename(&image_tmp, out).map_err(|source| DiskError::Io {
        doing: "move the disk image to",
        path: out.to_path_buf(),
        source,
    })?;

    let root_type = root_partition_type(spec.architecture);
    Ok(DiskImage {
        path: out.to_path_buf(),
        size: spec.size,
        digest,
        disk_guid: ids.disk_guid.to_string(),
        partitions: vec![
            Partition {
                number: 1,
                name: "EFI System Partition".into(),
                type_guid: ESP_TYPE.to_string(),
                guid: ids.esp_partition_guid.to_string(),
                offset: layout.esp.offset,
                size: layout.esp.size,
                filesystem_id: ids.esp_uuid(),
                label: ESP_LABEL.into(),
            },
            Partition {
                number: 2,
                name: "root".into(),
                type_guid: root_type.to_string(),
                guid: ids.root_partition_guid.to_string(),
                offset: layout.root.offset,
                size: layout.root.size,
                filesystem_id: ids.root_fs_uuid.to_string(),
                label: ROOT_LABEL.into(),
            },
        ],
        root_fs_uuid: ids.root_fs_uuid.to_string(),
        esp_uuid: ids.esp_uuid(),
        kernel: kernel.release,
        cmdline,
        bootloader,
        root_data_bytes: usage.bytes,
    })
}

/// The kernel command line: root by UUID, read-only until systemd remounts it per fstab,
/// the serial console last so it is `/dev/console` (systemd's status and the boot-test marker
/// go there), and EC2's recommended NVMe timeout (EBS volumes are NVMe devices on Nitro).
fn kernel_cmdline(ids: &DiskIds, spec: &DiskSpec) -> String {
    let mut options = vec![
        format!("root=UUID={}", ids.root_fs_uuid),
        "rootfstype=ext4".into(),
        "ro".into(),
        "console=tty0".into(),
        "console=ttyS0,115200n8".into(),
        "nvme_core.io_timeout=4294967295".into(),
    ];
    options.extend(spec.kernel_options.iter().cloned());
    options.join(" ")
}

fn root_partition_type(architecture: Architecture) -> Uuid {
    match architecture {
        Architecture::X86_64 => ROOT_X86_64_TYPE,
        Architecture::Arm64 => ROOT_ARM64_TYPE,
    }
}

/// The EFI names of an architecture (`x64` → `BOOTX64.EFI`, `systemd-bootx64.efi`).
fn efi_arch(architecture: Architecture) -> &'static str {
    match architecture {
        Architecture::X86_64 => "x64",
        Architecture::Arm64 => "aa64",
    }
}

/// The programs, found on `PATH` (and the sbin directories, which a non-login root shell may
/// lack).
struct Tools {
    mkfs_ext4: PathBuf,
    debugfs: PathBuf,
    dumpe2fs: PathBuf,
    mkfs_vfat: PathBuf,
    mcopy: PathBuf,
    mmd: PathBuf,
}

impl Tools {
    fn find() -> Result<Self, DiskError> {
        let mut found = Vec::new();
        for (tool, package) in TOOLS.iter().chain(&[("mmd", "mtools")]) {
            found.push(which(tool).ok_or(DiskError::MissingTool { tool, package })?);
        }
        let mut found = found.into_iter();
        let mut next = || found.next().expect("one per tool");
        Ok(Tools {
            mkfs_ext4: next(),
            debugfs: next(),
            dumpe2fs: next(),
            mkfs_vfat: next(),
            mcopy: next(),
            mmd: next(),
        })
    }
}

/// Finds `program` on `PATH` or in the sbin directories.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"])
        .filter(|d| !d.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Runs a tool, failing with its last lines of output.
fn run(tool: &'static str, doing: &str, command: &mut Command) -> Result<String, DiskError> {
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| DiskError::Spawn { tool, source })?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        return Err(DiskError::Tool {
            tool,
            doing: doing.to_owned(),
            code: output.status.code().unwrap_or(-1),
            tail: tail(&text),
        });
    }
    Ok(text)
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(ERROR_TAIL_LINES)..].join("\n")
}

fn file_size(path: &Path) -> Result<u64, DiskError> {
    Ok(fs_err::metadata(path)
        .map_err(|e| DiskError::Io {
            doing: "read",
            path: path.to_path_buf(),
            source: io::Error::new(e.kind(), e),
        })?
        .len())
}

/// The kernel and initrd in a root.
#[derive(Debug)]
struct Kernel {
    release: String,
    vmlinuz: PathBuf,
    initrd: PathBuf,
}

/// The newest `/boot/vmlinuz-RELEASE` of `root` and its `/boot/initrd.img-RELEASE`.
fn find_kernel(root: &Path) -> Result<Kernel, DiskError> {
    let boot = in_root(root, "/boot")?;
    let mut releases: Vec<String> = match fs_err::read_dir(&boot) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("vmlinuz-"))
                    .map(str::to_owned)
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(DiskError::Io {
                doing: "list",
                path: boot,
                source: io::Error::new(e.kind(), e),
            });
        }
    };
    releases.sort_by(|a, b| compare_versions(a, b));
    let release = releases.pop().ok_or_else(|| DiskError::NoKernel {
        root: root.to_path_buf(),
    })?;
    let vmlinuz = in_root(root, &format!("/boot/vmlinuz-{release}"))?;
    let initrd = in_root(root, &format!("/boot/initrd.img-{release}"))?;
    if !initrd.is_file() {
        return Err(DiskError::NoInitrd {
            root: root.to_path_buf(),
            release,
        });
    }
    Ok(Kernel {
        release,
        vmlinuz,
        initrd,
    })
}

/// Compares version strings the way people read them: runs of digits as numbers.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut chars = s.chars().peekable();
        while let Some(&c) = chars.peek() {
            let digit = c.is_ascii_digit();
            let mut run = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_ascii_digit() != digit {
                    break;
                }
                run.push(c);
                chars.next();
            }
            out.push(if digit {
                Ok(run.parse().unwrap_or(u64::MAX))
            } else {
                Err(run)
            });
        }
        out
    }
    parts(a).cmp(&parts(b))
}

/// systemd-boot for the architecture: the image's own (its version is then part of what the
/// recipe pins), else the building machine's `systemd-boot-efi`.
fn find_bootloader(
    root: &Path,
    architecture: Architecture,
) -> Result<(PathBuf, String), DiskError> {
    let file = format!(
        "usr/lib/systemd/boot/efi/systemd-boot{}.efi",
        efi_arch(architecture)
    );
    let in_image = in_root(root, &file)?;
    if in_image.is_file() {
        return Ok((in_image, format!("systemd-boot from the image (/{file})")));
    }
    let host = Path::new("/").join(&file);
    if host.is_file() {
        return Ok((
            host.clone(),
            format!(
                "systemd-boot from the building machine ({})",
                host.display()
            ),
        ));
    }
    Err(DiskError::NoBootloader {
        architecture: architecture.ec2().into(),
        file: format!("/{file}"),
    })
}

/// The loader entry's title: the image's `PRETTY_NAME`, else "Linux".
fn os_title(root: &Path) -> String {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .filter_map(|p| in_root(root, p).ok())
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        })
        .unwrap_or_else(|| "Linux".into())
}

/// Writes `/etc/fstab`: the root and the ESP by filesystem id, then any entry the image
/// already had for other mount points.
fn write_fstab(root: &Path, ids: &DiskIds) -> Result<(), DiskError> {
    let etc = in_root(root, "/etc")?;
    let path = etc.join("fstab");
    // Refuse to follow a symlink out of the root.
    if fs_err::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
        fs_err::remove_file(&path).map_err(|e| DiskError::Io {
            doing: "replace",
            path: path.clone(),
            source: io::Error::new(e.kind(), e),
        })?;
    }
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let mut text = format!(
        "# Written by bake: the root and the EFI system partition by filesystem id.\n\
         UUID={} / ext4 defaults,errors=remount-ro 0 1\n\
         UUID={} {ESP_MOUNT_POINT} vfat umask=0077,nofail 0 2\n",
        ids.root_fs_uuid,
        ids.esp_uuid()
    );
    for line in existing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let keep = fields.len() >= 2
            && !fields[0].starts_with('#')
            && fields[1] != "/"
            && fields[1] != ESP_MOUNT_POINT;
        if keep {
            text.push_str(line);
            text.push('\n');
        }
    }
    fs_err::create_dir_all(&etc).map_err(|e| DiskError::Io {
        doing: "create",
        path: etc.clone(),
        source: io::Error::new(e.kind(), e),
    })?;
    fs_err::write(&path, text).map_err(|e| DiskError::Io {
        doing: "write",
        path: path.clone(),
        source: io::Error::new(e.kind(), e),
    })?;
    let mount_point = in_root(root, ESP_MOUNT_POINT)?;
    fs_err::create_dir_all(&mount_point).map_err(|e| DiskError::Io {
        doing: "create",
        path: mount_point.clone(),
        source: io::Error::new(e.kind(), e),
    })?;
    Ok(())
}

/// How much a root holds.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    /// Bytes in 4 KiB blocks: file data, directories, long symlinks.
    bytes: u64,
    inodes: u64,
}

/// Clamps every modification time in `root` to `source_date_epoch` (files a step made carry
/// the time the step ran) and measures the tree.
fn normalize_root(root: &Path, source_date_epoch: u64) -> Result<Usage, DiskError> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    use std::os::unix::fs::MetadataExt;
    let ceiling = i64::try_from(source_date_epoch).unwrap_or(i64::MAX);
    let mut usage = Usage::default();
    for entry in walkdir::WalkDir::new(root).follow_links(false) {
        let entry = entry.map_err(|e| {
            let path = e.path().unwrap_or(root).to_path_buf();
            DiskError::Io {
                doing: "read",
                path,
                source: e
                    .into_io_error()
                    .unwrap_or_else(|| io::Error::other("walk")),
            }
        })?;
        let meta = entry.metadata().map_err(|e| DiskError::Io {
            doing: "read",
            path: entry.path().to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| io::Error::other("metadata")),
        })?;
        usage.inodes += 1;
        let blocks = if meta.is_dir() || meta.is_file() || meta.file_type().is_symlink() {
            meta.len()
                .div_ceil(EXT4_BLOCK_SIZE)
                .max(u64::from(meta.is_dir()))
        } else {
            0
        };
        usage.bytes += blocks * EXT4_BLOCK_SIZE;
        if meta.mtime() > ceiling || (meta.mtime() == ceiling && meta.mtime_nsec() != 0) {
            utimensat(
                nix::fcntl::AT_FDCWD,
                entry.path(),
                &TimeSpec::UTIME_OMIT,
                &TimeSpec::new(ceiling, 0),
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(|e| DiskError::Io {
                doing: "set the modification time of",
                path: entry.path().to_path_buf(),
                source: io::Error::from(e),
            })?;
        }
    }
    Ok(usage)
}

/// What goes on the ESP.
struct EspContent<'a> {
    kernel: &'a Kernel,
    bootloader: &'a Path,
    architecture: Architecture,
    cmdline: &'a str,
    title: &'a str,
}

/// Makes the FAT32 ESP in `out`: systemd-boot as the removable-media loader (what firmware
/// without boot entries in NVRAM, such as a fresh EC2 instance, starts) and at its own path,
/// `loader.conf` (no menu, no editor: the command line cannot be changed at the console),
/// one loader entry, the kernel and the initrd.
fn make_esp(
    tools: &Tools,
    content: &EspContent<'_>,
    ids: &DiskIds,
    spec: &DiskSpec,
    work: &Path,
    out: &Path,
) -> Result<(), DiskError> {
    let file = File::create(out).map_err(io_error("create", out))?;
    file.set_len(spec.esp_size).map_err(io_error("size", out))?;
    drop(file);
    let sde = spec.source_date_epoch.to_string();
    run(
        "mkfs.vfat",
        "make the EFI system partition",
        Command::new(&tools.mkfs_vfat)
            .args([
                "-F",
                "32",
                "-S",
                "512",
                "--invariant",
                "-n",
                ESP_LABEL,
                "-i",
            ])
            .arg(format!("{:08X}", ids.esp_volume_id))
            .arg(out)
            .env("SOURCE_DATE_EPOCH", &sde),
    )?;

    let arch = efi_arch(content.architecture);
    let loader_conf = work.join("loader.conf");
    write_file(
        &loader_conf,
        &format!("default {LOADER_ENTRY}\ntimeout 0\neditor no\nconsole-mode keep\n"),
    )?;
    let entry = work.join("entry.conf");
    write_file(
        &entry,
        &format!(
            "title {title}\nversion {release}\nlinux /{ESP_KERNEL_DIR}/vmlinuz\ninitrd /{ESP_KERNEL_DIR}/initrd.img\noptions {cmdline}\n",
            title = content.title,
            release = content.kernel.release,
            cmdline = content.cmdline,
        ),
    )?;
    // Directories and files one at a time, in a fixed order: the FAT's layout is the order
    // things were added in.
    let directories = [
        "::/EFI",
        "::/EFI/BOOT",
        "::/EFI/systemd",
        "::/loader",
        "::/loader/entries",
        &format!("::/{ESP_KERNEL_DIR}"),
    ];
    let mtools = |program: &Path| {
        let mut command = Command::new(program);
        command
            .env("SOURCE_DATE_EPOCH", &sde)
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(out);
        command
    };
    run(
        "mmd",
        "make directories on the EFI system partition",
        mtools(&tools.mmd).args(directories),
    )?;
    let copies: [(&Path, String); 6] = [
        (
            content.bootloader,
            format!("::/EFI/BOOT/BOOT{}.EFI", arch.to_uppercase()),
        ),
        (
            content.bootloader,
            format!("::/EFI/systemd/systemd-boot{arch}.efi"),
        ),
        (&loader_conf, "::/loader/loader.conf".into()),
        (&entry, format!("::/loader/entries/{LOADER_ENTRY}")),
        (
            &content.kernel.vmlinuz,
            format!("::/{ESP_KERNEL_DIR}/vmlinuz"),
        ),
        (
            &content.kernel.initrd,
            format!("::/{ESP_KERNEL_DIR}/initrd.img"),
        ),
    ];
    for (source, target) in copies {
        run(
            "mcopy",
            &format!("copy `{}` to the EFI system partition", source.display()),
            mtools(&tools.mcopy).arg("-o").arg(source).arg(&target),
        )?;
    }
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<(), DiskError> {
    fs_err::write(path, text).map_err(|e| DiskError::Io {
        doing: "write",
        path: path.to_path_buf(),
        source: io::Error::new(e.kind(), e),
    })
}

/// Makes the ext4 root in `out` from `root`, then pins the inode times `mkfs.ext4 -d` copies
/// from the build root.
#[allow(clippy::too_many_arguments)]
fn make_ext4(
    tools: &Tools,
    root: &Path,
    ids: &DiskIds,
    spec: &DiskSpec,
    layout: &Layout,
    usage: &Usage,
    work: &Path,
    out: &Path,
) -> Result<(), DiskError> {
    let file = File::create(out).map_err(io_error("create", out))?;
    file.set_len(layout.root.size)
        .map_err(io_error("size", out))?;
    drop(file);
    let conf = work.join("mke2fs.conf");
    write_file(&conf, MKE2FS_CONF)?;
    let sde = spec.source_date_epoch.to_string();
    let made = run(
        "mkfs.ext4",
        "make the root filesystem",
        Command::new(&tools.mkfs_ext4)
            .args(["-q", "-F", "-t", "ext4", "-L", ROOT_LABEL, "-U"])
            .arg(ids.root_fs_uuid.to_string())
            .arg("-E")
            .arg(format!(
                "hash_seed={},root_owner=0:0,nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                ids.root_hash_seed
            ))
            .arg("-d")
            .arg(root)
            .arg(out)
            .env("MKE2FS_CONFIG", &conf)
            .env("E2FSPROGS_FAKE_TIME", &sde)
            .env("SOURCE_DATE_EPOCH", &sde),
    );
    match made {
        Err(DiskError::Tool { tail, .. })
            if tail.contains("Could not allocate block")
                || tail.contains("No space left")
                || tail.contains("Could not allocate inode")
                || tail.contains("too small") =>
        {
            return Err(DiskError::TooSmall {
                disk_size: spec.size,
                // What mkfs could not fit: at least the data and a little more.
                needed: (usage.bytes + usage.inodes * EXT4_INODE_SIZE).max(layout.root.size + 1),
                available: layout.root.size,
            });
        }
        other => other?,
    };

    // Which inodes are in use, from the group summaries.
    let summary = run(
        "dumpe2fs",
        "read the root filesystem's inode bitmaps",
        Command::new(&tools.dumpe2fs).arg(out),
    )?;
    let used = used_inodes(&summary).ok_or_else(|| DiskError::Tool {
        tool: "dumpe2fs",
        doing: "describe the root filesystem (unexpected output)".into(),
        code: 0,
        tail: tail(&summary),
    })?;
    let commands = work.join("debugfs.cmds");
    let mut script = String::with_capacity(used.len() * 64);
    for inode in used {
        use std::fmt::Write as _;
        let _ = writeln!(script, "sif <{inode}> ctime @{sde}");
        let _ = writeln!(script, "sif <{inode}> atime @{sde}");
    }
    write_file(&commands, &script)?;
    let output = run(
        "debugfs",
        "set the root filesystem's inode times",
        Command::new(&tools.debugfs)
            .arg("-w")
            .arg("-f")
            .arg(&commands)
            .arg(out)
            .env("E2FSPROGS_FAKE_TIME", &sde)
            .env("SOURCE_DATE_EPOCH", &sde),
    )?;
    // debugfs echoes each command (`debugfs: sif ...`), reports a failed one on its output,
    // and still exits 0.
    let complaints: Vec<&str> = output
        .lines()
        .filter(|l| {
            !l.starts_with("debugfs ") && !l.starts_with("debugfs: ") && !l.trim().is_empty()
        })
        .collect();
    if !complaints.is_empty() {
        return Err(DiskError::Tool {
            tool: "debugfs",
            doing: "set the root filesystem's inode times".into(),
            code: 0,
            tail: tail(&complaints.join("\n")),
        });
    }
    Ok(())
}

/// The inodes in use, from `dumpe2fs` output: every inode but the free ones, skipping the
/// reserved inodes 1 and 3 to 10 (which `mkfs` leaves empty or owns itself).
fn used_inodes(summary: &str) -> Option<Vec<u64>> {
    let field = |name: &str| -> Option<u64> {
        summary
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
    };
    let count = field("Inode count:")?;
    let mut free = vec![false; usize::try_from(count).ok()? + 1];
    let mut groups = 0;
    for line in summary.lines() {
        let Some(ranges) = line.trim_start().strip_prefix("Free inodes: ") else {
            continue;
        };
        if !line.starts_with("  ") {
            continue;
        }
        groups += 1;
        for range in ranges.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let (start, end) = match range.split_once('-') {
                Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
                None => {
                    let n = range.parse::<u64>().ok()?;
                    (n, n)
                }
            };
            for inode in start..=end.min(count) {
                free[usize::try_from(inode).ok()?] = true;
            }
        }
    }
    if groups == 0 {
        return None;
    }
    Some(
        (1..=count)
            .filter(|&i| i == 2 || i >= 11)
            .filter(|&i| !free[i as usize])
            .collect(),
    )
}

/// Writes the protective MBR and both GPT copies.
fn write_partition_table(
    image: &mut File,
    path: &Path,
    layout: &Layout,
    ids: &DiskIds,
    architecture: Architecture,
) -> Result<(), DiskError> {
    let gpt_error = |source| DiskError::Gpt {
        path: path.to_path_buf(),
        source,
    };
    let mut gpt = gptman::GPT::new_from(image, SECTOR_SIZE, ids.disk_guid.to_bytes_le())
        .map_err(gpt_error)?;
    gpt[1] = gptman::GPTPartitionEntry {
        partition_type_guid: ESP_TYPE.to_bytes_le(),
        unique_partition_guid: ids.esp_partition_guid.to_bytes_le(),
        starting_lba: layout.esp.first_lba(),
        ending_lba: layout.esp.last_lba(),
        attribute_bits: 0,
        partition_name: "EFI System Partition".into(),
    };
    gpt[2] = gptman::GPTPartitionEntry {
        partition_type_guid: root_partition_type(architecture).to_bytes_le(),
        unique_partition_guid: ids.root_partition_guid.to_bytes_le(),
        starting_lba: layout.root.first_lba(),
        ending_lba: layout.root.last_lba(),
        attribute_bits: 0,
        partition_name: "root".into(),
    };
    gpt.write_into(image).map_err(gpt_error)?;
    gptman::GPT::write_protective_mbr_into(image, SECTOR_SIZE).map_err(gpt_error)?;
    image.flush().map_err(io_error("write", path))?;
    Ok(())
}

/// The data segments of a sparse file: `(offset, length)` of each run that is not a hole.
fn data_segments(file: &File, path: &Path) -> Result<Vec<(u64, u64)>, DiskError> {
    use nix::unistd::{Whence, lseek};
    let len = file.metadata().map_err(io_error("read", path))?.len();
    let mut segments = Vec::new();
    let mut position: u64 = 0;
    while position < len {
        let start = match lseek(file, position as i64, Whence::SeekData) {
            Ok(start) => start as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(io_error("read", path)(io::Error::from(e))),
        };
        let end = lseek(file, start as i64, Whence::SeekHole)
            .map_err(|e| io_error("read", path)(io::Error::from(e)))? as u64;
        segments.push((start, end - start));
        position = end;
    }
    Ok(segments)
}

/// Copies the data of `source` into `target` at `offset`, leaving holes (and all-zero chunks)
/// unwritten so the image stays sparse.
fn copy_sparse(
    source: &Path,
    target: &File,
    target_path: &Path,
    offset: u64,
) -> Result<(), DiskError> {
    let input = File::open(source).map_err(io_error("open", source))?;
    let mut buffer = vec![0u8; CHUNK];
    for (start, length) in data_segments(&input, source)? {
        let mut done = 0;
        while done < length {
            let n = usize::try_from((length - done).min(CHUNK as u64)).expect("chunk fits");
            input
                .read_exact_at(&mut buffer[..n], start + done)
                .map_err(io_error("read", source))?;
            if buffer[..n].iter().any(|&b| b != 0) {
                target
                    .write_all_at(&buffer[..n], offset + start + done)
                    .map_err(io_error("write", target_path))?;
            }
            done += n as u64;
        }
    }
    Ok(())
}

/// `sha256:` of a whole file, reading only its data segments (holes hash as zeros).
pub fn hash_sparse(path: &Path) -> Result<String, DiskError> {
    let mut file = File::open(path).map_err(io_error("open", path))?;
    let len = file.metadata().map_err(io_error("read", path))?.len();
    let segments = data_segments(&file, path)?;
    let zeros = vec![0u8; CHUNK];
    let mut buffer = vec![0u8; CHUNK];
    let mut hasher = Sha256::new();
    let mut position = 0u64;
    let feed_zeros = |hasher: &mut Sha256, mut count: u64| {
        while count > 0 {
            let n = count.min(CHUNK as u64) as usize;
            hasher.update(&zeros[..n]);
            count -= n as u64;
        }
    };
    for (start, length) in segments {
        feed_zeros(&mut hasher, start - position);
        file.seek(SeekFrom::Start(start))
            .map_err(io_error("read", path))?;
        let mut done = 0;
        while done < length {
            let n = usize::try_from((length - done).min(CHUNK as u64)).expect("chunk fits");
            io::Read::read_exact(&mut file, &mut buffer[..n]).map_err(io_error("read", path))?;
            hasher.update(&buffer[..n]);
            done += n as u64;
        }
        position = start + length;
    }
    feed_zeros(&mut hasher, len - position);
    Ok(crate::id::Digest::from_hasher(hasher).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(gib: u32) -> DiskSpec {
        DiskSpec::new(gib, Architecture::X86_64, "sha256:abc", 1_700_000_000)
    }

    #[test]
    fn ids_follow_the_seed() {
        let a = spec(8).ids();
        assert_eq!(a, spec(2).ids(), "the size does not change the ids");
        let mut other = spec(8);
        other.seed = "sha256:abd".into();
        let b = other.ids();
        assert_ne!(a.root_fs_uuid, b.root_fs_uuid);
        assert_ne!(a.esp_volume_id, b.esp_volume_id);
        let all = [
            a.disk_guid,
            a.esp_partition_guid,
            a.root_partition_guid,
            a.root_fs_uuid,
            a.root_hash_seed,
        ];
        for (i, x) in all.iter().enumerate() {
            assert_eq!(x.get_version_num(), 5);
            assert!(all[i + 1..].iter().all(|y| y != x), "ids are distinct");
        }
        assert_eq!(a.esp_uuid().len(), 9);
    }

    #[test]
    fn layout_puts_the_esp_at_1_mib_and_the_root_after_it() {
        let layout = spec(8).layout().unwrap();
        assert_eq!(layout.esp.offset, MIB);
        assert_eq!(layout.esp.first_lba(), 2048);
        assert_eq!(layout.root.offset, MIB + DEFAULT_ESP_SIZE);
        assert_eq!(layout.root.offset + layout.root.size, 8 * GIB - MIB);
        assert_eq!(layout.root.last_lba(), (8 * GIB - MIB) / 512 - 1);
    }

    #[test]
    fn a_disk_without_room_for_a_root_is_too_small() {
        let mut tiny = spec(1);
        tiny.esp_size = GIB - MIB;
        let error = tiny.layout().unwrap_err();
        assert!(matches!(error, DiskError::TooSmall { .. }), "{error}");
        let mut odd = spec(1);
        odd.size += 1;
        assert!(matches!(odd.layout(), Err(DiskError::BadSpec { .. })));
        let mut small_esp = spec(1);
        small_esp.esp_size = 32 * MIB;
        assert!(matches!(small_esp.layout(), Err(DiskError::BadSpec { .. })));
    }

    #[test]
    fn kernels_sort_by_version() {
        let mut releases = [
            "6.1.0-9-cloud-amd64",
            "6.1.0-28-cloud-amd64",
            "5.10.0-30-cloud-amd64",
        ];
        releases.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(releases.last(), Some(&"6.1.0-28-cloud-amd64"));
    }

    #[test]
    fn used_inodes_are_the_complement_of_the_free_ranges() {
        let summary = "Inode count:              32\nInodes per group:         16\n\
                       Group 0: (Blocks 0-32767)\n  Free inodes: 14-16\n\
                       Group 1: (Blocks 32768-65535)\n  Free inodes: 17, 19-32\n";
        assert_eq!(used_inodes(summary).unwrap(), vec![2, 11, 12, 13, 18]);
        assert_eq!(
            used_inodes("Inode count: 3\n"),
            None,
            "no groups: not dumpe2fs output"
        );
    }

    #[test]
    fn fstab_names_root_and_esp_by_id_and_keeps_other_mounts() {
        let root = tempfile::tempdir().unwrap();
        fs_err::create_dir(root.path().join("etc")).unwrap();
        fs_err::write(
            root.path().join("etc/fstab"),
            "# UNCONFIGURED FSTAB FOR BASE SYSTEM\n/dev/sda1 / ext4 defaults 0 1\ntmpfs /tmp tmpfs nosuid 0 0\n",
        )
        .unwrap();
        let ids = spec(8).ids();
        write_fstab(root.path(), &ids).unwrap();
        let text = fs_err::read_to_string(root.path().join("etc/fstab")).unwrap();
        assert!(
            text.contains(&format!("UUID={} / ext4", ids.root_fs_uuid)),
            "{text}"
        );
        assert!(
            text.contains(&format!("UUID={} /boot/efi vfat", ids.esp_uuid())),
            "{text}"
        );
        assert!(text.contains("tmpfs /tmp tmpfs nosuid 0 0"), "{text}");
        assert!(!text.contains("/dev/sda1"), "{text}");
        assert!(root.path().join("boot/efi").is_dir());
    }

    #[test]
    fn fstab_stays_in_the_root_when_etc_points_outside() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc")).unwrap();
        write_fstab(root.path(), &spec(8).ids()).unwrap();
        assert!(
            !outside.path().join("fstab").exists(),
            "wrote outside the root"
        );
        let inside = root
            .path()
            .join(outside.path().strip_prefix("/").unwrap())
            .join("fstab");
        assert!(
            inside.is_file(),
            "the image's /etc is resolved inside the root"
        );
    }

    #[test]
    fn a_root_without_a_kernel_is_refused_with_a_hint() {
        let root = tempfile::tempdir().unwrap();
        let error = find_kernel(root.path()).unwrap_err();
        assert!(matches!(error, DiskError::NoKernel { .. }));
        assert!(error.hint().unwrap().contains("linux-image-cloud-amd64"));
        fs_err::create_dir(root.path().join("boot")).unwrap();
        fs_err::write(root.path().join("boot/vmlinuz-6.1.0-1-cloud-amd64"), b"k").unwrap();
        let error = find_kernel(root.path()).unwrap_err();
        assert!(matches!(error, DiskError::NoInitrd { .. }), "{error}");
        fs_err::write(
            root.path().join("boot/initrd.img-6.1.0-1-cloud-amd64"),
            b"i",
        )
        .unwrap();
        assert_eq!(
            find_kernel(root.path()).unwrap().release,
            "6.1.0-1-cloud-amd64"
        );
    }

    #[test]
    fn sparse_copies_and_hashes_read_holes_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        let file = File::create(&source).unwrap();
        file.set_len(8 * MIB).unwrap();
        file.write_all_at(b"hello", 3 * MIB + 7).unwrap();
        drop(file);
        let target_path = dir.path().join("target");
        let target = File::create(&target_path).unwrap();
        target.set_len(16 * MIB).unwrap();
        copy_sparse(&source, &target, &target_path, 4 * MIB).unwrap();
        drop(target);
        let bytes = fs_err::read(&target_path).unwrap();
        assert_eq!(
            &bytes[(7 * MIB + 7) as usize..(7 * MIB + 12) as usize],
            b"hello"
        );
        assert_eq!(bytes.iter().filter(|&&b| b != 0).count(), 5);
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        assert_eq!(hash_sparse(&target_path).unwrap(), expected);
    }
}
