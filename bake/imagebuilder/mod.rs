//! EC2 Image Builder as bake's remote build engine: the same recipe that builds locally runs on
//! AWS's managed build fleet, and what comes back is recorded and published by bake like a local
//! build.
//!
//! ```text
//!  recipe + plan ──► compile (pure) ──► components (AWSTOE), image recipe, infrastructure and
//!                       │               distribution configurations, optional pipeline
//!                       ├──► export: the documents and a JSON plan of the API calls
//!                       ▼
//!                    engine: look up, create what is missing (tagged, idempotency tokens from
//!                    the version) ─► CreateImage ─► wait (states, workflow steps; Ctrl-C
//!                    cancels) ─► build record + manifest from the image's AMIs, or for a
//!                    container recipe from the digest of the image it pushed to ECR
//! ```
//!
//! Resource names and semantic versions derive from bake's version ([`compile::resource_name`]),
//! so a version maps to one set of immutable resources: a second build of it finds them (and
//! its image) and creates nothing.

pub mod cleanup;
pub mod compile;
pub mod engine;

pub use compile::{CompileError, CompileOptions, Compiled, compile};
pub use engine::{Engine, EngineError, EngineOptions, ImageBuilderOutput};
