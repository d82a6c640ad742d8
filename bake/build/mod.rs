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
//! Everything here is blocking file-system and CPU work: async callers run it in
//! `spawn_blocking`.

pub mod compress;
pub mod layer;
pub mod snapshot;
#[cfg(test)]
mod testing;
pub mod unpack;
