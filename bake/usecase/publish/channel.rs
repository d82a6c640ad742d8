//! Moving a channel's pointers to a published version or back (`promote`, `rollback`), and
//! reading its current references (`pin`).

use super::super::Context;
use super::{PublishUseError, digest_check, record_in_manifest};
use crate::exit::ExitStatus;
use crate::provenance::manifest::Publication;
use crate::publish::channel::ChannelEntry;
use crate::publish::{PublishOptions, PublishReport, Publisher};
use crate::recipe::Recipe;

/// How `promote` and `rollback` move a channel's pointers.
pub enum ChannelMove<'a> {
    Promote { version: &'a str, channel: &'a str },
    Rollback { channel: &'a str },
}

/// Moves the recipe's channel's pointers (`promote` and `rollback`), and records the move in the
/// version's manifest when it succeeded.
pub fn move_channel(
    ctx: &Context,
    recipe: &Recipe,
    movement: ChannelMove<'_>,
    dry_run: bool,
    allow_clobber: bool,
) -> Result<PublishReport, PublishUseError> {
    let options = PublishOptions {
        dry_run,
        set_default: true,
        allow_clobber,
    };
    ctx.block_on(async {
        let aws = ctx.aws().await;
        let digests = digest_check(aws, recipe, &ctx.settings)?;
        let publisher = Publisher {
            aws,
            digests: &digests,
            recipe,
            options,
        };
        let (moved, channel, action) = match movement {
            ChannelMove::Promote { version, channel } => (
                publisher.promote(version, channel).await,
                channel,
                "promote",
            ),
            ChannelMove::Rollback { channel } => {
                (publisher.rollback(channel).await, channel, "rollback")
            }
        };
        let report = moved?;
        if report.exit_status() == ExitStatus::Success {
            let moved = Publication::Channel {
                channel: channel.to_owned(),
                action: action.to_owned(),
                at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                by: crate::provenance::registry::operator(),
            };
            // A move writes parameter versions; its launch template versions and task
            // definitions were recorded when the version was published.
            record_in_manifest(ctx, &recipe.name, &report, vec![moved], |p| {
                matches!(p, Publication::SsmParameter { .. })
            });
        }
        Ok(report)
    })?
}

/// A channel's current immutable references (only `region`'s, when given).
pub fn pin(
    ctx: &Context,
    recipe: &Recipe,
    channel: &str,
    region: Option<&str>,
) -> Result<ChannelEntry, PublishUseError> {
    ctx.block_on(async {
        let aws = ctx.aws().await;
        let digests = digest_check(aws, recipe, &ctx.settings)?;
        let publisher = Publisher {
            aws,
            digests: &digests,
            recipe,
            options: PublishOptions::default(),
        };
        Ok(publisher.pin(channel, region).await?)
    })?
}
