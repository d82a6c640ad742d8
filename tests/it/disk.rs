//! AMI disk images from a real Debian root: the partition table as `sfdisk` reads it, the ext4
//! root as `e2fsck` checks it, the ESP as `mtools` lists it, byte-for-byte reproducibility
//! across two independently provisioned roots, a boot in QEMU to the recipe's marker, and the
//! errors for a failing boot and bad inputs.
//!
//! The root comes from `tests/fixtures/recipes/disk/ami.yaml` through the build pipeline
//! (mmdebstrap with the cloud kernel, then a provisioning step in namespaces), so it needs root
//! and Debian's mirror; the store lives in the target directory, so the bootstrap is cached
//! across runs the way `bake build` caches it.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use bake::ami::boot::{BootError, BootSpec, boot_test};
use bake::ami::disk::{DiskError, DiskImage, DiskSpec, build_disk_image};
use bake::build::pipeline::{BuildOptions, BuildReporter, Builder};
use bake::build::runner::{NamespaceRunner, StepOutput, Stream};
use bake::recipe::{self, Test};
use bake::store::Store;

use super::common::{repo_root, stderr, stdout};

/// Whether this process can provision roots (see [`super::skip`]).
fn can_build() -> bool {
    super::skip::root("provisioning a root filesystem: namespaces, chown")
}

struct Quiet;

impl StepOutput for Quiet {
    fn line(&mut self, step: &str, _stream: Stream, line: &str) {
        eprintln!("[{step}] {line}");
    }
}

impl BuildReporter for Quiet {
    fn message(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

/// Two images of the fixture recipe, each from its own provisioned root.
struct Images {
    first: DiskImage,
    second: DiskImage,
    marker: String,
    /// A copy of the first root's /boot, for the bad-input tests.
    dir: PathBuf,
}

fn fixture() -> PathBuf {
    repo_root().join("tests/fixtures/recipes/disk/ami.yaml")
}

/// Builds the images once per test run.
fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let store = Store::open(&tmp.join("bake-disk-store")).expect("open the test store");
        let dir = tmp.join("bake-disk-images");
        let _ = fs_err::remove_dir_all(&dir);
        fs_err::create_dir_all(&dir).unwrap();

        let recipe = recipe::load(&fixture(), &Default::default()).expect("fixture loads");
        let plan = bake::plan::plan(&recipe, "ami.yaml", &Default::default()).expect("plan");
        // The test binary has no `__sandbox` subcommand: the bake binary is the helper.
        let runner = NamespaceRunner::with_helper(env!("CARGO_BIN_EXE_bake"));
        let builder = Builder {
            store: &store,
            runner: &runner,
            options: BuildOptions {
                source_date_epoch: plan.source_date_epoch(),
                workers: NonZeroUsize::new(2).unwrap(),
                cancel: Default::default(),
                boot_accelerator: None,
            },
        };
        let ami = recipe.outputs.ami.as_ref().expect("an AMI output");
        let spec = DiskSpec::for_recipe(ami, &plan.version, plan.source_date_epoch());
        let build = |name: &str| {
            let root = builder
                .provision_root(&recipe, &plan, &mut Quiet)
                .expect("provision the root");
            let image = build_disk_image(root.path(), &spec, &dir.join(name))
                .unwrap_or_else(|e| panic!("disk image: {e} ({e:?})"));
            if name == "first.raw" {
                copy_boot_dir(root.path(), &dir.join("boot"));
            }
            image
        };
        let first = build("first.raw");
        // A second root: the steps are cached now, so this one is unpacked from the layers, at
        // another path and another time.
        let second = build("second.raw");
        let marker = recipe
            .tests
            .iter()
            .find_map(|t| match t {
                Test::Boot { marker, .. } => Some(marker.clone()),
                _ => None,
            })
            .expect("the fixture has a boot test");
        Images {
            first,
            second,
            marker,
            dir,
        }
    })
}

fn copy_boot_dir(root: &Path, to: &Path) {
    fs_err::create_dir_all(to).unwrap();
    for entry in fs_err::read_dir(root.join("boot")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            fs_err::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Copies `size` bytes at `offset` of `image` into a new file.
fn extract(image: &Path, offset: u64, size: u64, out: &Path) {
    let status = Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", out.display()))
        .args([
            "bs=1M",
            "conv=sparse",
            "status=none",
            "iflag=skip_bytes,count_bytes",
        ])
        .arg(format!("skip={offset}"))
        .arg(format!("count={size}"))
        .status()
        .unwrap();
    assert!(status.success());
}

fn sha256sum(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(output.status.success());
    format!(
        "sha256:{}",
        stdout(&output).split_whitespace().next().unwrap()
    )
}

#[test]
fn the_partition_table_is_gpt_with_an_esp_and_a_root() {
    if !can_build() {
        return;
    }
    let image = &images().first;
    let output = Command::new("sfdisk")
        .arg("--json")
        .arg(&image.path)
        .output()
        .expect("sfdisk (fdisk) is installed");
    assert!(output.status.success(), "sfdisk: {}", stderr(&output));
    let table: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let table = &table["partitiontable"];
    assert_eq!(table["label"], "gpt");
    assert_eq!(table["sectorsize"], 512);
    assert_eq!(
        table["id"].as_str().unwrap().to_lowercase(),
        image.disk_guid,
        "disk GUID"
    );
    let partitions = table["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{table}");
    let (esp, root) = (&partitions[0], &partitions[1]);
    assert_eq!(
        esp["type"].as_str().unwrap(),
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    );
    assert_eq!(esp["start"], 2048, "the ESP starts at 1 MiB");
    assert_eq!(esp["size"], 256 * 2048);
    assert_eq!(
        root["type"].as_str().unwrap(),
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
        "Linux root (x86-64)"
    );
    assert_eq!(root["start"], 2048 + 256 * 2048);
    let root_end = root["start"].as_u64().unwrap() + root["size"].as_u64().unwrap();
    assert_eq!(
        root_end * 512,
        image.size - (1 << 20),
        "1 MiB left for the backup GPT"
    );
    assert_eq!(
        root["uuid"].as_str().unwrap().to_lowercase(),
        image.partitions[1].guid
    );
    assert_eq!(image.size, 2 << 30, "disk_size_gib: 2");
    assert_eq!(fs_err::metadata(&image.path).unwrap().len(), image.size);
}

#[test]
fn the_root_filesystem_is_clean_ext4_with_fstab_by_uuid() {
    if !can_build() {
        return;
    }
    let image = &images().first;
    let work = tempfile::tempdir().unwrap();
    let root = &image.partitions[1];
    let fs = work.path().join("root.ext4");
    extract(&image.path, root.offset, root.size, &fs);
    let fsck = Command::new("e2fsck").arg("-fn").arg(&fs).output().unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems:\n{}{}",
        stdout(&fsck),
        stderr(&fsck)
    );
    let header = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&fs)
        .output()
        .unwrap();
    let header = stdout(&header);
    assert!(
        header.contains(&format!("Filesystem UUID:          {}", image.root_fs_uuid)),
        "{header}"
    );
    assert!(
        header.contains("Filesystem volume name:   root"),
        "{header}"
    );
    let cat = |path: &str| {
        let output = Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(&fs)
            .output()
            .unwrap();
        stdout(&output)
    };
    let fstab = cat("/etc/fstab");
    assert!(
        fstab.contains(&format!("UUID={} / ext4", image.root_fs_uuid)),
        "{fstab}"
    );
    assert!(
        fstab.contains(&format!("UUID={} /boot/efi vfat", image.esp_uuid)),
        "{fstab}"
    );
    assert!(
        cat("/etc/systemd/system/bake-boot-ok.service").contains("bake-disk-test-ok"),
        "the provisioning step's unit is in the image"
    );
}

#[test]
fn the_esp_holds_systemd_boot_the_kernel_and_an_entry_by_uuid() {
    if !can_build() {
        return;
    }
    let images = images();
    let image = &images.first;
    let work = tempfile::tempdir().unwrap();
    let esp = &image.partitions[0];
    let fs = work.path().join("esp.img");
    extract(&image.path, esp.offset, esp.size, &fs);
    let mtools = |program: &str, path: &str| {
        let output = Command::new(program)
            .arg("-i")
            .arg(&fs)
            .arg(path)
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{program} {path}: {}",
            stderr(&output)
        );
        stdout(&output)
    };
    let listing = mtools("mdir", "::/EFI/BOOT");
    assert!(listing.contains("BOOTX64  EFI"), "{listing}");
    assert!(
        listing.contains(&format!("Volume Serial Number is {}", image.esp_uuid)),
        "{listing}"
    );
    let kernel_dir = mtools("mdir", "::/bake");
    assert!(kernel_dir.contains("vmlinuz"), "{kernel_dir}");
    assert!(kernel_dir.contains("initrd"), "{kernel_dir}");
    let loader = mtools("mtype", "::/loader/loader.conf");
    assert!(loader.contains("default bake.conf"), "{loader}");
    assert!(loader.contains("editor no"), "{loader}");
    let entry = mtools("mtype", "::/loader/entries/bake.conf");
    assert!(
        entry.contains(&format!("root=UUID={}", image.root_fs_uuid)),
        "{entry}"
    );
    assert!(entry.contains("console=ttyS0,115200n8"), "{entry}");
    assert!(
        entry.contains(&format!("version {}", image.kernel)),
        "{entry}"
    );
    // The kernel on the ESP is the root's kernel, byte for byte.
    let copied = work.path().join("vmlinuz");
    let output = Command::new("mcopy")
        .arg("-i")
        .arg(&fs)
        .arg("::/bake/vmlinuz")
        .arg(&copied)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        fs_err::read(&copied).unwrap(),
        fs_err::read(
            images
                .dir
                .join("boot")
                .join(format!("vmlinuz-{}", image.kernel))
        )
        .unwrap()
    );
}

#[test]
fn two_builds_from_two_roots_give_the_same_bytes() {
    if !can_build() {
        return;
    }
    let images = images();
    assert_eq!(images.first.digest, images.second.digest);
    // An independent hash of the files, not bake's sparse-aware one.
    assert_eq!(sha256sum(&images.first.path), images.first.digest);
    assert_eq!(sha256sum(&images.second.path), images.second.digest);
    assert_eq!(images.first.root_fs_uuid, images.second.root_fs_uuid);
}

/// The whole local half of an AMI build, as `bake build` runs it: provision (cached now),
/// make the image, boot it to the recipe's marker.
#[test]
fn the_recipe_image_boots_to_its_marker_and_is_not_modified() {
    if !can_build() {
        return;
    }
    let images = images();
    let store =
        Store::open(&PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bake-disk-store")).unwrap();
    let recipe = recipe::load(&fixture(), &Default::default()).unwrap();
    let plan = bake::plan::plan(&recipe, "ami.yaml", &Default::default()).unwrap();
    let runner = NamespaceRunner::with_helper(env!("CARGO_BIN_EXE_bake"));
    let builder = Builder {
        store: &store,
        runner: &runner,
        options: BuildOptions {
            source_date_epoch: plan.source_date_epoch(),
            workers: NonZeroUsize::new(2).unwrap(),
            cancel: Default::default(),
            boot_accelerator: None,
        },
    };
    let out = images.dir.join("booted.raw");
    let local =
        bake::ami::disk_build::build_local_image(&builder, &recipe, &plan, &out, &mut Quiet)
            .unwrap_or_else(|e| panic!("{e}: {:?}", e.hint()));
    assert_eq!(
        local.image.digest, images.first.digest,
        "same recipe, same bytes"
    );
    assert_eq!(local.boots.len(), 1);
    let report = &local.boots[0];
    assert_eq!(report.marker, images.marker);
    assert!(
        report.marker_line.ends_with("bake-disk-test-ok"),
        "{report:?}"
    );
    assert!(report.console_lines > 10, "{report:?}");
    assert_eq!(
        sha256sum(&out),
        local.image.digest,
        "the boot wrote to an overlay, not the image"
    );
}

/// A QEMU wrapper that behaves like QEMU on a host whose KVM opens but cannot run the guest
/// (nested virtualisation): under `-accel kvm` it prints QEMU's internal-error message and
/// hangs, as QEMU does when it pauses the VM; otherwise it is the real QEMU.
fn broken_kvm_qemu(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let real = [
        "/usr/bin/qemu-system-x86_64",
        "/usr/local/bin/qemu-system-x86_64",
    ]
    .into_iter()
    .find(|p| Path::new(p).is_file())
    .expect("qemu-system-x86_64 (scripts/setup installs it)");
    let wrapper = dir.join("qemu-system-x86_64");
    fs_err::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             case \" $* \" in\n\
             *' -accel kvm '*)\n\
                 printf 'KVM internal error. Suberror: 1\\nextra data[0]: 0x0000000000000000\\nemulation failure\\n' >&2\n\
                 exec sleep 600 ;;\n\
             esac\n\
             exec {real} \"$@\"\n"
        ),
    )
    .unwrap();
    fs_err::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Any file that opens read-write makes `auto` pick KVM, as a working /dev/kvm would.
    fs_err::write(dir.join("kvm"), b"").unwrap();
    wrapper
}

/// The real image behind a KVM that fails the way nested virtualisation does: `auto` notices
/// the paused machine within seconds, boots again with software emulation and reaches the
/// marker; with `kvm` forced the boot fails at once and shows QEMU's message.
#[test]
fn a_kvm_that_cannot_run_the_guest_falls_back_to_emulation() {
    if !can_build() {
        return;
    }
    let images = images();
    let image = &images.first;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = BootSpec::new(images.marker.clone(), Duration::from_secs(900));
    spec.qemu = Some(broken_kvm_qemu(dir.path()));
    spec.kvm_device = dir.path().join("kvm");

    spec.accelerator = bake::ami::boot::Accelerator::Kvm;
    let clock = std::time::Instant::now();
    let error = boot_test(&image.path, &spec).unwrap_err();
    assert!(
        clock.elapsed() < Duration::from_secs(30),
        "a paused machine was waited on for {:?}",
        clock.elapsed()
    );
    let text = error.to_string();
    assert!(text.contains("QEMU said:\nKVM internal error"), "{text}");
    assert!(!error.is_recipe_failure(), "{text}");

    spec.accelerator = bake::ami::boot::Accelerator::Auto;
    let report = boot_test(&image.path, &spec).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.accelerator, "tcg", "{report:?}");
    assert!(
        report
            .kvm_fallback
            .as_deref()
            .is_some_and(|why| why.contains("KVM internal error")),
        "{report:?}"
    );
    assert!(report.marker_line.ends_with(&images.marker), "{report:?}");
}

#[test]
fn a_boot_without_the_marker_fails_with_the_last_console_lines() {
    if !can_build() {
        return;
    }
    let image = &images().first;
    // The firmware and the kernel speak within this time even under software emulation on a
    // busy two-core machine (the first firmware line took over a minute there); the marker
    // never comes.
    let spec = BootSpec::new(
        "bake-marker-that-is-never-printed",
        Duration::from_secs(180),
    );
    let error = boot_test(&image.path, &spec).unwrap_err();
    let BootError::Timeout { last_lines, .. } = &error else {
        panic!("expected a timeout, got {error}");
    };
    assert!(!last_lines.is_empty(), "{error}");
    let text = error.to_string();
    assert!(
        text.contains(
            "`bake-marker-that-is-never-printed` did not appear on the serial console within 180s"
        ),
        "{text}"
    );
    assert!(text.contains("last console lines:\n  | "), "{text}");
    assert!(error.hint().is_some());
}

#[test]
fn bad_inputs_fail_with_clear_errors() {
    if !can_build() {
        return;
    }
    let images = images();
    let work = tempfile::tempdir().unwrap();
    let spec = DiskSpec::new(
        2,
        bake::recipe::Architecture::X86_64,
        "sha256:bad",
        1_704_067_200,
    );

    // A base without a kernel.
    let empty = work.path().join("empty-root");
    fs_err::create_dir_all(empty.join("etc")).unwrap();
    let error = build_disk_image(&empty, &spec, &work.path().join("a.raw")).unwrap_err();
    assert!(matches!(error, DiskError::NoKernel { .. }), "{error}");
    assert!(error.to_string().contains("has no kernel"), "{error}");
    assert!(error.hint().unwrap().contains("linux-image-cloud-amd64"));
    assert!(error.is_recipe_failure());
    assert!(!work.path().join("a.raw").exists());

    // A disk smaller than the root filesystem: a root with the real kernel and initrd and
    // 300 MiB of incompressible data, on a 512 MiB disk (254 MiB of root partition).
    let root = work.path().join("big-root");
    fs_err::create_dir_all(root.join("usr/share/data")).unwrap();
    copy_boot_dir(&images.dir, &root.join("boot"));
    let mut data = vec![0u8; 1 << 20];
    for i in 0..300u32 {
        for (j, byte) in data.iter_mut().enumerate() {
            *byte = (i as usize * 31 + j * 7 + 1) as u8;
        }
        fs_err::write(root.join(format!("usr/share/data/{i}")), &data).unwrap();
    }
    let mut small = spec.clone();
    small.size = 512 << 20;
    let error = build_disk_image(&root, &small, &work.path().join("b.raw")).unwrap_err();
    assert!(matches!(error, DiskError::TooSmall { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("a 512 MiB disk is too small"), "{text}");
    assert!(text.contains("the root partition has 254 MiB"), "{text}");
    assert!(
        error.hint().unwrap().contains("disk_size_gib"),
        "{:?}",
        error.hint()
    );
    assert!(!work.path().join("b.raw").exists());
}

#[test]
fn a_local_image_needs_a_snapshot_ami_output() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::open(store_dir.path()).unwrap();
    let path = repo_root().join("tests/fixtures/recipes/build/scratch.yaml");
    let recipe = recipe::load(&path, &Default::default()).expect("fixture loads");
    let plan = bake::plan::plan(&recipe, "scratch.yaml", &Default::default()).expect("plan");
    let runner = NamespaceRunner::with_helper(env!("CARGO_BIN_EXE_bake"));
    let builder = Builder {
        store: &store,
        runner: &runner,
        options: BuildOptions {
            source_date_epoch: plan.source_date_epoch(),
            workers: NonZeroUsize::MIN,
            cancel: Default::default(),
            boot_accelerator: None,
        },
    };
    let out = store_dir.path().join("disk.raw");
    let error =
        bake::ami::disk_build::build_local_image(&builder, &recipe, &plan, &out, &mut Quiet)
            .unwrap_err();
    assert!(
        matches!(
            error,
            bake::ami::disk_build::LocalImageError::NoAmiOutput(_)
        ),
        "{error}"
    );
    assert!(
        error.to_string().contains("has no `outputs.ami`"),
        "{error}"
    );
    assert!(error.is_recipe_failure());
    assert!(!out.exists());
}
