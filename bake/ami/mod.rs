//! AMIs: from a provisioned root filesystem to images in EC2.
//!
//! ```text
//!  provisioned root ──► disk::build_disk_image ──► boot::boot_test ──► upload, register,
//!  (build::pipeline::   GPT raw image: ESP with     qemu + OVMF, waits    distribute
//!   provision_root)     systemd-boot, ext4 root     for the marker
//! ```
//!
//! [`disk_build::build_local_image`] runs the local part (root, image, command and boot tests)
//! in one call.

pub mod boot;
pub mod disk;
pub mod disk_build;
