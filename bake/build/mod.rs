//! Building images: the filesystem-layer core of the OCI builder.
//!
//! A provisioning step runs in a root directory; [`snapshot`] records the tree before and after
//! and diffs the two; [`layer`] writes the difference (or a whole tree) as a deterministic OCI
//! layer tar; [`compress`] turns the tar into a gzip or zstd blob while computing its DiffID,
//! digest and size; [`unpack`] applies a layer (a base image's, or one of ours) onto a root
//! directory with OCI whiteout semantics, without letting a hostile tar write outside it.
//!
//! ```text
//!  snapshot(root) ─► run step ─► snapshot(root) ─► diff ─► write_layer ─► BlobWriter ─► blob
//!                                                          (tar bytes)    (DiffID, digest)
//! ```
//!
//! Put together for one provisioning step (the orchestrator owns the blob file, its fsync and
//! its rename to `blobs/sha256/<hex>`):
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::num::NonZeroUsize;
//! use std::path::Path;
//! use bake::build::{compress::BlobWriter, layer, snapshot};
//!
//! let root = Path::new("/var/lib/bake/rootfs");
//! let excludes = snapshot::Excludes::new().subtree("proc")?.contents("tmp")?;
//! let before = snapshot::snapshot(root, &excludes)?;
//! // ... run the step ...
//! let mut after = snapshot::snapshot(root, &excludes)?;
//! // The diff judges mtimes as the layer records them; `after` keeps the digests it computed,
//! // to serve as the next step's `before`.
//! let options = layer::LayerOptions { source_date_epoch: Some(1_700_000_000) };
//! let changes = snapshot::diff(&before, &mut after, &options)?;
//!
//! let file = fs_err::File::create("/var/lib/bake/blobs/tmp-layer")?;
//! let workers = std::thread::available_parallelism()?;
//! let compression = bake::recipe::Compression::Gzip(6);
//! let mut blob = BlobWriter::new(file, compression, workers)?;
//! let summary = layer::write_layer(root, &changes, &options, &mut blob)?;
//! let (file, blob) = blob.finish()?;
//! file.sync_all()?;
//! println!("{} entries, diff_id {}, digest {}", summary.entries, blob.diff_id, blob.digest);
//! # Ok(()) }
//! ```
//!
//! Everything here is blocking file-system and CPU work: async callers run it in
//! `spawn_blocking`.

pub mod bases;
pub mod compress;
pub mod engine;
pub mod hardening;
pub mod layer;
pub mod pipeline;
pub mod remote_cache;
pub mod runner;
pub mod snapshot;
#[cfg(test)]
pub(crate) mod testing;
pub mod tree;
pub mod unpack;
