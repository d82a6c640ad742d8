//! How a [`PublishReport`] reads to a person: one line per region and per pointer change on
//! stdout, and its errors as `error: …` blocks for stderr.

use std::fmt::Write as _;

use super::{Action, PublishReport, Status};

impl PublishReport {
    /// The report as terminal lines: recipe, version, then each region's status and changes
    /// (`+` create, `~` update, `=` keep, with the current and wanted values).
    pub fn human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "recipe   {}", self.recipe);
        let _ = writeln!(out, "version  {}", self.version);
        for region in &self.regions {
            let status = match region.status {
                Status::Planned => "plan (dry run)",
                Status::Done => "done",
                Status::Failed => "FAILED",
            };
            let _ = writeln!(out, "{}  {status}", region.region);
            for change in &region.changes {
                let sign = match change.action {
                    Action::Create => "+",
                    Action::Update => "~",
                    Action::Keep => "=",
                };
                let kind = serde_json::to_value(change.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {sign} {kind} {}: {} -> {}{}",
                    change.target,
                    change.current.as_deref().unwrap_or("(none)"),
                    change.wanted,
                    change
                        .result
                        .as_ref()
                        .map(|r| format!(" [{r}]"))
                        .unwrap_or_default()
                );
            }
        }
        out
    }

    /// The report's failures as `error: …` blocks (a region's named after `error:`), with their
    /// causes and hints: for stderr, where a person or a log collector looks for them.
    pub fn errors_text(&self) -> String {
        let errors = self
            .regions
            .iter()
            .filter_map(|r| r.error.as_ref())
            .chain(self.errors.iter());
        let regions = self
            .regions
            .iter()
            .filter(|r| r.error.is_some())
            .map(|r| r.region.as_str())
            .chain(std::iter::repeat(""));
        let mut text = String::new();
        for (error, region) in errors.zip(regions) {
            if region.is_empty() {
                let _ = writeln!(text, "error: {}", error.message);
            } else {
                let _ = writeln!(text, "error: {region}: {}", error.message);
            }
            for cause in &error.causes {
                let _ = writeln!(text, "  Caused by: {cause}");
            }
            if let Some(hint) = &error.hint {
                let _ = writeln!(text, "  hint: {hint}");
            }
        }
        text
    }
}
