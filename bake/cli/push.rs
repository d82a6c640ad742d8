//! `bake push VERSION|RECIPE [--to REPOSITORY]...`: push a built image from the store to the
//! recipe's registry and ECR targets (or to the repositories given), skipping what the
//! registries already have, and print every pushed `repository@sha256:…`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use super::common::Outcome;
use super::{VarArgs, print_json, print_reports};
use crate::diagnostic::Report;
use crate::provenance::registry::Attached;
use crate::registry::push::TargetReport;
use crate::registry::{BlobOutcome, Progress};
use crate::settings::{OutputFormat, Settings, Verbosity};
use crate::usecase::Context;
use crate::usecase::push::{self, PushOptions, PushReporter, PushResult};

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Versions (`sha256:…`, or their first 12 or more hex digits) or recipe files; several
    /// are pushed at once, with the layers they share sent once.
    #[arg(value_name = "VERSION|RECIPE", required = true, num_args = 1..)]
    pub what: Vec<String>,
    /// Push to this repository (`registry/name`, repeatable) instead of the recipes' targets.
    #[arg(long = "to", value_name = "REPOSITORY")]
    pub to: Vec<String>,
    /// A registry (`host:port`) to reach over plain HTTP (repeatable; loopback needs none).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure: Vec<String>,
    /// Upload blobs in chunks of this many MiB instead of one request each.
    #[arg(long, value_name = "MIB")]
    pub chunk_mib: Option<u64>,
    /// Blobs transferred at once.
    #[arg(long, value_name = "N", default_value_t = crate::registry::client::DEFAULT_PARALLELISM)]
    pub parallel: usize,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub fn run(args: &PushArgs, ctx: &Context) -> Outcome {
    let options = PushOptions {
        what: args.what.clone(),
        to: args.to.clone(),
        insecure: args.insecure.clone(),
        chunk_size: args.chunk_mib.map(|m| m * 1024 * 1024),
        parallelism: args.parallel,
        vars: args.vars.sources(),
    };
    let reporter = CliProgress::new(&ctx.settings);
    let result = push::push(ctx, &options, &reporter)?;
    show(&ctx.settings, &result);
    Ok(result.status)
}

fn show(settings: &Settings, result: &PushResult) {
    match settings.output {
        OutputFormat::Json => print_json(&json!({
            "images": result.images.iter().map(|i| json!({
                "version": i.version,
                "image_digest": i.image_digest,
            })).collect::<Vec<_>>(),
            "pushed": result.pushed,
            "references": result.pushed.iter().map(|p| &p.reference).collect::<Vec<_>>(),
            "failed": result.failed.iter().map(|(r, e)| json!({"repository": r, "error": e})).collect::<Vec<_>>(),
            "bytes_uploaded": result.pushed.iter().map(|p| p.bytes_uploaded).sum::<u64>(),
            "bytes_skipped": result.pushed.iter().map(|p| p.bytes_skipped).sum::<u64>(),
            "attestations": result.attestations.iter().map(|a| json!({
                "version": a.version,
                "repository": a.repository,
                "attached": a.attached,
            })).collect::<Vec<_>>(),
        })),
        OutputFormat::Human => {
            for pushed in &result.pushed {
                println!("{}", pushed.reference);
            }
        }
    }
}

/// One line on what pushing `image` did: bytes and blobs uploaded and skipped.
fn summary(image: &str, pushed: &[TargetReport]) -> String {
    let uploaded: u64 = pushed.iter().map(|p| p.bytes_uploaded).sum();
    let skipped: u64 = pushed.iter().map(|p| p.bytes_skipped).sum();
    let blobs_up: usize = pushed.iter().map(|p| p.blobs_uploaded).sum();
    let blobs_skip: usize = pushed
        .iter()
        .map(|p| p.blobs_present + p.blobs_mounted)
        .sum();
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    format!(
        "pushed {image} to {} repositor{}: uploaded {} in {blobs_up} blob{}, skipped {} in {blobs_skip} blob{} already there",
        pushed.len(),
        if pushed.len() == 1 { "y" } else { "ies" },
        indicatif::HumanBytes(uploaded),
        plural(blobs_up),
        indicatif::HumanBytes(skipped),
        plural(blobs_skip),
    )
}

/// Progress bars per blob on a terminal (nothing otherwise); failures and news on stderr.
struct CliProgress {
    multi: Option<MultiProgress>,
    bars: Arc<Mutex<HashMap<String, ProgressBar>>>,
    settings: Settings,
}

impl CliProgress {
    fn new(settings: &Settings) -> Self {
        CliProgress {
            multi: settings.progress.then(MultiProgress::new),
            bars: Arc::new(Mutex::new(HashMap::new())),
            settings: settings.clone(),
        }
    }

    fn talks(&self) -> bool {
        self.settings.verbosity > Verbosity::Quiet
    }

    fn bar(&self, digest: &str) -> Option<ProgressBar> {
        self.bars.lock().expect("bars lock").get(digest).cloned()
    }
}

impl Progress for CliProgress {
    fn blob_started(&self, digest: &str, size: u64) {
        let Some(multi) = &self.multi else {
            return;
        };
        let bar = multi.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_prefix(
            digest
                .parse::<crate::id::Digest>()
                .map_or_else(|_| digest.to_owned(), |d| d.short().to_owned()),
        );
        self.bars
            .lock()
            .expect("bars lock")
            .insert(digest.to_owned(), bar);
    }

    fn blob_bytes(&self, digest: &str, n: u64) {
        if let Some(bar) = self.bar(digest) {
            bar.inc(n);
        }
    }

    fn blob_restart(&self, digest: &str) {
        if let Some(bar) = self.bar(digest) {
            bar.set_position(0);
        }
    }

    fn blob_done(&self, digest: &str, _size: u64, outcome: BlobOutcome) {
        if let Some(bar) = self.bars.lock().expect("bars lock").remove(digest) {
            bar.finish_with_message(format!("{outcome:?}"));
            if let Some(multi) = &self.multi {
                multi.remove(&bar);
            }
        }
    }

    fn sink(&self, digest: &str) -> Arc<dyn Fn(u64) + Send + Sync> {
        let bar = self.bar(digest);
        Arc::new(move |n| {
            if let Some(bar) = &bar {
                bar.inc(n);
            }
        })
    }
}

impl PushReporter for CliProgress {
    fn failed(&self, report: Report) {
        print_reports(&self.settings, &[report]);
    }

    fn attached(&self, repository: &str, done: &Attached) {
        if self.talks() {
            eprintln!(
                "attached {} attestation{} to {repository} ({})",
                done.referrers.len(),
                if done.referrers.len() == 1 { "" } else { "s" },
                match &done.fallback_tag {
                    Some(tag) => format!("no referrers API: listed in {tag}"),
                    None => "referrers API".into(),
                }
            );
        }
    }

    fn image_done(&self, image: &str, pushed: &[TargetReport]) {
        if self.talks() {
            eprintln!("{}", summary(image, pushed));
        }
    }

    fn finished(&self) {
        if let Some(multi) = &self.multi {
            let _ = multi.clear();
        }
    }
}
