//! bake's integration tests, compiled into one binary (one link, one run).
//!
//! Tests that need a server (moto, the registry) find it through the environment that
//! `scripts/services` exports; without it they fail under `CI` and skip outside, through
//! [`skip`], which `scripts/test` counts and names in its summary.

mod ami;
mod aws_harness;
mod build;
mod chain;
mod cli;
mod common;
mod disk;
mod docker_runner;
mod fleet;
mod gc;
mod hardening;
mod imagebuilder;
mod instance;
mod moto_proxy;
mod plan;
mod provenance;
mod publish;
mod recipes;
mod registry;
mod registry_harness;
mod rollout;
mod runner;
#[path = "../../bake/skip.rs"]
mod skip;
mod standin;
mod verify_published;
