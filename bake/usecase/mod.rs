//! bake's use cases: build an OCI image, build an AMI from a disk image or on a builder
//! instance, push, publish, clean up. Each takes typed options and a [`Context`] and returns a
//! typed result; the CLI only parses arguments, calls one of them and renders what it returns.

pub mod attest;
pub mod audit;
pub mod build_ami_disk;
pub mod build_ami_instance;
pub mod build_image;
pub mod cleanup;
mod context;
pub mod export;
pub mod fleet;
pub mod gc;
pub mod imagebuilder;
pub mod plan;
pub mod publish;
pub mod push;
pub mod record;
pub mod rollout;
pub mod verify;

pub use context::{Context, ContextError, cancel_on_signals};
