//! bake: a declarative bake pipeline for immutable infrastructure.
//!
//! One recipe in, hardened artifacts with content-addressed versions out:
//!
//! ```text
//!  recipe.yaml ──► recipe ──► plan ──► build ──► store ──► publish ──► provenance
//!                  parse,     pin every runners,   OCI      registries, manifest,
//!                  validate,  input,    layers,    layout,  ECR, launch SLSA, SBOM,
//!                  template   version,  disk       build    templates,  signatures
//!                             effects   images     records  SSM, ECS
//! ```
//!
//! Past publishing: [`rollout`] moves a channel and replaces the machines behind it (instance
//! refreshes, ECS deployments) with a way back, and [`verify_published`] compares the live
//! state of every published surface with what was published.
//!
//! Each stage has one typed entry point whose output serializes, so any stage can be inspected
//! or rerun: [`recipe::load`] gives a [`recipe::Recipe`], [`plan::plan`] a [`plan::Plan`].
//! Side effects live behind narrow traits; AWS clients are built in one place ([`aws`]).
//! The command line ([`cli`]) is a thin layer that turns settings into calls and results into
//! output and an [`exit::ExitStatus`].

pub mod ami;
pub mod artifact;
pub mod audit;
pub mod aws;
pub mod build;
pub mod cli;
pub mod diagnostic;
pub mod exit;
pub mod fleet;
pub mod gc;
pub mod id;
pub mod imagebuilder;
pub mod plan;
pub mod progress;
pub mod provenance;
pub mod publish;
pub mod recipe;
pub mod registry;
pub mod rollout;
pub mod settings;
#[cfg(test)]
pub(crate) mod skip;
pub mod ssh;
pub mod store;
pub mod usecase;
pub mod verify_published;
