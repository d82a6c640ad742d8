//! The decision about one AMI or registry image, without any I/O: what names it (the scan),
//! what the channels hold, the recipe's versions newest first, and the retention rules in; keep
//! (with every reason) or remove (with why) out. AMIs and images are judged by the same rules;
//! only what "referenced" means differs ([`Kind`]).

use std::time::{Duration, SystemTime};

use crate::id::Version;
use crate::publish::channel::ChannelState;
use crate::recipe::{ChannelRetention, DEFAULT_CHANNEL_KEEP};

/// One version of the recipe that this store built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: Version,
    /// When its build started (`None` for records that kept no time: oldest).
    pub made: Option<SystemTime>,
}

/// The retention rules in force for a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// The newest versions always kept.
    pub keep: u32,
    /// Only versions older than this are removed.
    pub older_than: Option<Duration>,
}

/// A channel's hold on a version, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelHold {
    pub version: String,
    pub reason: String,
    /// The images (`repository@sha256:…`) the channel's entry names: it holds those digests
    /// whichever version a store's records say they are.
    pub images: Vec<String>,
}

impl ChannelHold {
    /// Whether the held entry names the image `digest`.
    pub fn names_digest(&self, digest: &str) -> bool {
        self.images
            .iter()
            .any(|image| image.rsplit_once('@').is_some_and(|(_, d)| d == digest))
    }
}

/// What is being decided about: it says which references were looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An AMI (launch templates, Auto Scaling groups, instances, SSM parameters, channels).
    Ami,
    /// An image in ECR (ECS services' task definitions, channels).
    Image,
}

impl Kind {
    /// Why nothing keeps an artifact of this kind.
    fn unreferenced(self) -> &'static str {
        match self {
            Kind::Ami => {
                "unreferenced: no launch template, Auto Scaling group, instance, SSM parameter or channel names it"
            }
            Kind::Image => {
                "unreferenced: no task definition an ECS service runs and no channel names its digest"
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Keep(Vec<String>),
    Remove(Vec<String>),
}

/// What a channel holds: its current version (what `bake pin` prints), its previous one (what
/// `bake rollback` returns to), its newest `keep` entries and every version it held within
/// `older_than`.
pub fn channel_holds(
    channel: &str,
    state: &ChannelState,
    retention: Option<ChannelRetention>,
    now: SystemTime,
) -> Vec<ChannelHold> {
    let keep = retention.map_or(DEFAULT_CHANNEL_KEEP, |r| r.keep) as usize;
    let within = retention.and_then(|r| r.older_than);
    let mut holds = Vec::new();
    // Newest first; an entry was in the channel until the next one was promoted.
    let entries: Vec<_> = state.history.iter().rev().collect();
    for (index, entry) in entries.iter().enumerate() {
        let version = entry.references.version.clone();
        let images = entry.references.images.clone();
        let reason = match index {
            0 => Some(format!("channel {channel}: current (pinned)")),
            1 => Some(format!("channel {channel}: previous (the rollback target)")),
            i if i < keep => Some(format!(
                "channel {channel}: entry {} of the {keep} it keeps",
                i + 1
            )),
            _ => None,
        };
        if let Some(reason) = reason {
            holds.push(ChannelHold {
                version,
                reason,
                images,
            });
            continue;
        }
        // Superseded when the next newer entry was promoted.
        let until = entries[index - 1].promoted_at.as_str();
        let until = humantime::parse_rfc3339_weak(until).ok();
        if let (Some(within), Some(until)) = (within, until)
            && now.duration_since(until).unwrap_or(Duration::ZERO) < within
        {
            holds.push(ChannelHold {
                version,
                images,
                reason: format!(
                    "channel {channel}: held it within the last {}",
                    humantime::format_duration(within)
                ),
            });
        }
    }
    holds
}

/// Decides about an AMI or image (`kind`) of `version`: `versions` are the recipe's, newest
/// first; `channels` what the channels hold of this version; `in_use` what the scan found
/// naming this artifact.
pub fn decide(
    kind: Kind,
    version: &Version,
    versions: &[VersionInfo],
    channels: &[ChannelHold],
    in_use: &[String],
    rules: &Rules,
    now: SystemTime,
) -> Decision {
    let mut keep: Vec<String> = in_use.iter().map(|r| format!("in use: {r}")).collect();
    keep.extend(channels.iter().map(|h| h.reason.clone()));
    let rank = versions.iter().position(|v| &v.version == version);
    if let Some(rank) = rank
        && rank < rules.keep as usize
    {
        keep.push(format!(
            "rule: one of the last {} versions (newest {})",
            rules.keep,
            rank + 1
        ));
    }
    let made = rank.and_then(|r| versions[r].made);
    if let Some(older_than) = rules.older_than {
        let age = made.map(|m| now.duration_since(m).unwrap_or(Duration::ZERO));
        if age.is_none_or(|age| age < older_than) {
            keep.push(format!(
                "rule: not older than {}",
                humantime::format_duration(older_than)
            ));
        }
    }
    if !keep.is_empty() {
        return Decision::Keep(keep);
    }
    let mut why = vec![
        kind.unreferenced().to_owned(),
        format!("not one of the last {} versions", rules.keep),
    ];
    if let Some(older_than) = rules.older_than {
        why.push(format!(
            "older than {}",
            humantime::format_duration(older_than)
        ));
    }
    Decision::Remove(why)
}

/// The decision about an artifact several versions share (a rebuild that changed nothing in an
/// image made the same manifest), from each version's (short name, decision), newest first: it
/// is kept when any of them keeps it, with the reasons of each that does; it goes only when
/// every one of them would let it go.
pub fn shared(mut decisions: Vec<(String, Decision)>) -> Decision {
    if decisions.len() == 1 {
        return decisions.pop().expect("one decision").1;
    }
    let mut kept = Vec::new();
    for (version, decision) in &decisions {
        if let Decision::Keep(reasons) = decision {
            kept.extend(reasons.iter().map(|r| format!("as version {version}: {r}")));
        }
    }
    if !kept.is_empty() {
        return Decision::Keep(kept);
    }
    let others: Vec<String> = decisions.iter().skip(1).map(|(v, _)| v.clone()).collect();
    match decisions.into_iter().next() {
        Some((_, Decision::Remove(mut why))) => {
            why.push(format!(
                "also the image of version(s) {}, which would go too",
                others.join(", ")
            ));
            Decision::Remove(why)
        }
        // No version names it (never a candidate then): keep.
        _ => Decision::Keep(vec!["no build record names it".into()]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::channel::{ChannelEntry, References};

    fn v(n: u8) -> Version {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
            .parse()
            .unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    const DAY: u64 = 86_400;

    fn versions() -> Vec<VersionInfo> {
        (1..=5)
            .rev()
            .map(|n| VersionInfo {
                version: v(n),
                made: Some(at(u64::from(n) * DAY)),
            })
            .collect()
    }

    #[test]
    fn only_old_unreferenced_versions_go_and_each_kept_one_says_why() {
        let now = at(10 * DAY);
        let rules = Rules {
            keep: 2,
            older_than: None,
        };
        let decide = |n, channels: &[ChannelHold], in_use: &[String]| {
            decide(Kind::Ami, &v(n), &versions(), channels, in_use, &rules, now)
        };
        assert!(matches!(decide(5, &[], &[]), Decision::Keep(r) if r[0].contains("newest 1")));
        assert!(matches!(decide(4, &[], &[]), Decision::Keep(_)));
        assert!(matches!(decide(3, &[], &[]), Decision::Remove(_)));
        let asg = "Auto Scaling group web uses launch template web (lt-1) version 3".to_owned();
        match decide(2, &[], std::slice::from_ref(&asg)) {
            Decision::Keep(reasons) => assert_eq!(reasons, vec![format!("in use: {asg}")]),
            other => panic!("{other:?}"),
        }
        // A version this store did not build is never among the newest.
        assert!(matches!(decide(9, &[], &[]), Decision::Remove(_)));
    }

    #[test]
    fn older_than_keeps_young_versions_and_unknown_ages() {
        let now = at(10 * DAY);
        let rules = Rules {
            keep: 1,
            older_than: Some(Duration::from_secs(7 * DAY)),
        };
        // Made on day 4: 6 days old, younger than 7 days.
        assert!(matches!(
            decide(Kind::Ami, &v(4), &versions(), &[], &[], &rules, now),
            Decision::Keep(r) if r[0].contains("not older than")
        ));
        assert!(matches!(
            decide(Kind::Ami, &v(2), &versions(), &[], &[], &rules, now),
            Decision::Remove(r) if r.iter().any(|x| x.contains("older than 7days"))
        ));
        let unknown = vec![VersionInfo {
            version: v(1),
            made: None,
        }];
        let rules = Rules {
            keep: 0,
            older_than: Some(Duration::from_secs(DAY)),
        };
        assert!(matches!(
            decide(Kind::Ami, &v(1), &unknown, &[], &[], &rules, now),
            Decision::Keep(_)
        ));
    }

    #[test]
    fn images_are_kept_by_a_running_service_or_a_channel_and_else_removed_as_images() {
        let now = at(10 * DAY);
        let rules = Rules {
            keep: 1,
            older_than: None,
        };
        let service = "ECS service api (cluster prod) runs task definition arn:aws:ecs:us-east-1:123456789012:task-definition/api:3".to_owned();
        match decide(
            Kind::Image,
            &v(2),
            &versions(),
            &[],
            std::slice::from_ref(&service),
            &rules,
            now,
        ) {
            Decision::Keep(reasons) => assert_eq!(reasons, vec![format!("in use: {service}")]),
            other => panic!("{other:?}"),
        }
        let held = channel(&[(3, 1), (4, 2)]);
        let holds = channel_holds("prod", &held, None, now);
        let of_3: Vec<ChannelHold> = holds.into_iter().filter(|h| v(3) == h.version).collect();
        assert!(matches!(
            decide(Kind::Image, &v(3), &versions(), &of_3, &[], &rules, now),
            Decision::Keep(r) if r == vec!["channel prod: previous (the rollback target)".to_owned()]
        ));
        match decide(Kind::Image, &v(1), &versions(), &[], &[], &rules, now) {
            Decision::Remove(why) => {
                assert!(
                    why[0].contains("no task definition an ECS service runs"),
                    "{why:?}"
                );
                assert!(!why[0].contains("launch template"), "{why:?}");
                assert_eq!(why[1], "not one of the last 1 versions");
            }
            other => panic!("{other:?}"),
        }
        // The newest version is kept by the rule whatever kind it is.
        assert!(matches!(
            decide(Kind::Image, &v(5), &versions(), &[], &[], &rules, now),
            Decision::Keep(r) if r[0].contains("newest 1")
        ));
    }

    #[test]
    fn an_image_several_versions_share_goes_only_when_each_of_them_would_let_it_go() {
        let keep = Decision::Keep(vec!["rule: one of the last 1 versions (newest 1)".into()]);
        let remove = |why: &str| Decision::Remove(vec![why.to_owned()]);
        assert_eq!(
            shared(vec![
                ("05".into(), keep.clone()),
                ("02".into(), remove("old"))
            ]),
            Decision::Keep(vec![
                "as version 05: rule: one of the last 1 versions (newest 1)".into()
            ])
        );
        assert_eq!(
            shared(vec![
                ("03".into(), remove("old")),
                ("02".into(), remove("older"))
            ]),
            Decision::Remove(vec![
                "old".into(),
                "also the image of version(s) 02, which would go too".into()
            ])
        );
        assert_eq!(shared(vec![("02".into(), remove("old"))]), remove("old"));
    }

    fn channel(versions: &[(u8, u64)]) -> ChannelState {
        ChannelState {
            format: "bake.channel/1".into(),
            recipe: "web".into(),
            channel: "prod".into(),
            history: versions
                .iter()
                .map(|(n, day)| ChannelEntry {
                    promoted_at: humantime::format_rfc3339_seconds(at(day * DAY)).to_string(),
                    references: References {
                        version: v(*n).to_string(),
                        images: vec![format!("web@sha256:{}", format!("{n:02x}").repeat(32))],
                        ..References::default()
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn channels_hold_current_previous_their_newest_entries_and_recent_ones() {
        let state = channel(&[(1, 1), (2, 2), (3, 8), (4, 9), (5, 9)]);
        let now = at(10 * DAY);
        let holds = channel_holds("prod", &state, None, now);
        let held: Vec<_> = holds.iter().map(|h| h.version.clone()).collect();
        assert_eq!(held, vec![v(5).to_string(), v(4).to_string()]);
        assert!(holds[0].reason.contains("current"));
        assert!(holds[1].reason.contains("previous"));
        assert!(holds[0].names_digest(&format!("sha256:{}", "05".repeat(32))));
        assert!(!holds[0].names_digest(&format!("sha256:{}", "04".repeat(32))));

        let retention = ChannelRetention {
            keep: 3,
            older_than: Some(Duration::from_secs(3 * DAY)),
        };
        let holds = channel_holds("prod", &state, Some(retention), now);
        let held: Vec<_> = holds.iter().map(|h| h.version.clone()).collect();
        // v3 is the third newest; v2 was superseded on day 8 (2 days ago): within 3 days;
        // v1 was superseded on day 2: gone.
        assert_eq!(
            held,
            vec![
                v(5).to_string(),
                v(4).to_string(),
                v(3).to_string(),
                v(2).to_string()
            ]
        );
        assert!(holds[3].reason.contains("within the last 3days"));
    }
}
