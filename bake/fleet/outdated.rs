//! `bake outdated`: why a recipe's version today is not the one last built.
//!
//! A plan pins everything a version depends on (a base image tag to its manifest digest, a
//! source AMI filter to the newest image, every file to its digest). The last build of a recipe
//! keeps the inputs it was planned with, so comparing them with today's plan says exactly what
//! moved: the world (a tag, a newer vendor AMI), the recipe's own files, or a base recipe.

use serde::Serialize;

use crate::plan::{BaseIdentity, PlanInputs};

/// One thing that differs between the last build's inputs and today's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reason {
    /// The base image's tag names another manifest now.
    BaseImageMoved {
        repository: String,
        built: String,
        now: String,
    },
    /// A package archive the bootstrap reads has a new Release (a point release, a security
    /// update).
    ArchiveMoved {
        mirror: String,
        suite: String,
        built: String,
        now: String,
    },
    /// A newer image matches the source AMI filter.
    SourceAmiSuperseded {
        region: String,
        built: String,
        now: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        now_name: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        now_created: Option<String>,
    },
    /// The base recipe has a new version (it is outdated itself, or changed).
    BaseRecipeChanged {
        name: String,
        built: String,
        now: String,
    },
    /// The base changed in another way (another kind, a rootfs tarball or layout, the
    /// bootstrap's configuration).
    BaseChanged { built: String, now: String },
    /// Files the recipe reads changed, appeared or went away.
    FilesChanged { paths: Vec<String> },
    /// The recipe itself (steps, outputs, variables, build settings) changed.
    RecipeChanged { parts: Vec<&'static str> },
    /// Scripts bake supplies (hardening profiles) changed with this bake.
    BuiltinsChanged,
    /// The timestamp every layer carries, or the version format, changed.
    SettingsChanged { parts: Vec<&'static str> },
}

impl Reason {
    /// One line for people.
    pub fn describe(&self) -> String {
        match self {
            Reason::BaseImageMoved {
                repository,
                built,
                now,
            } => format!(
                "base image {repository} moved: {} → {}",
                short(built),
                short(now)
            ),
            Reason::SourceAmiSuperseded {
                region,
                built,
                now,
                now_name,
                now_created,
            } => {
                let detail = match (now_name, now_created) {
                    (Some(name), Some(created)) => format!(" ({name}, {created})"),
                    (Some(name), None) => format!(" ({name})"),
                    _ => String::new(),
                };
                format!("source AMI superseded in {region}: {built} → {now}{detail}")
            }
            Reason::ArchiveMoved {
                mirror,
                suite,
                built,
                now,
            } => format!(
                "package archive {mirror} {suite} has a new Release: {} → {}",
                short(built),
                short(now)
            ),
            Reason::BaseRecipeChanged { name, built, now } => format!(
                "base recipe {name} has a new version: {} → {}",
                short(built),
                short(now)
            ),
            Reason::BaseChanged { built, now } => format!("base changed: {built} → {now}"),
            Reason::FilesChanged { paths } => format!("files changed: {}", paths.join(", ")),
            Reason::RecipeChanged { parts } => format!("recipe changed: {}", parts.join(", ")),
            Reason::BuiltinsChanged => "bake's built-in hardening scripts changed".into(),
            Reason::SettingsChanged { parts } => format!("changed: {}", parts.join(", ")),
        }
    }

    /// Whether the reason is the world moving under an unchanged recipe (not an edit).
    pub fn is_upstream(&self) -> bool {
        matches!(
            self,
            Reason::BaseImageMoved { .. }
                | Reason::ArchiveMoved { .. }
                | Reason::SourceAmiSuperseded { .. }
                | Reason::BaseRecipeChanged { .. }
        )
    }
}

fn short(digest: &str) -> &str {
    crate::id::short_text(digest)
}

/// Everything that differs between `built` (the last build's inputs) and `now` (today's plan).
pub fn reasons(built: &PlanInputs, now: &PlanInputs) -> Vec<Reason> {
    let mut reasons = Vec::new();
    if built.base != now.base {
        reasons.extend(base_reasons(&built.base, &now.base));
    }
    let mut paths: Vec<String> = Vec::new();
    for file in &now.files {
        if !built.files.contains(file) {
            paths.push(file.path.clone());
        }
    }
    for file in &built.files {
        if !now.files.iter().any(|f| f.path == file.path) {
            paths.push(format!("{} (gone)", file.path));
        }
    }
    if !paths.is_empty() {
        paths.sort();
        paths.dedup();
        reasons.push(Reason::FilesChanged { paths });
    }
    let (b, n) = (&built.recipe, &now.recipe);
    let parts: Vec<&'static str> = [
        ("name", b.name != n.name),
        ("variables", b.variables != n.variables),
        ("base", b.base != n.base),
        ("build", b.build != n.build),
        ("provisioners", b.provisioners != n.provisioners),
        ("tests", b.tests != n.tests),
        ("outputs", b.outputs != n.outputs),
    ]
    .into_iter()
    .filter_map(|(part, changed)| changed.then_some(part))
    .collect();
    if !parts.is_empty() {
        reasons.push(Reason::RecipeChanged { parts });
    }
    if built.builtins != now.builtins {
        reasons.push(Reason::BuiltinsChanged);
    }
    let parts: Vec<&'static str> = [
        (
            "source_date_epoch",
            built.source_date_epoch != now.source_date_epoch,
        ),
        ("version format", built.format != now.format),
    ]
    .into_iter()
    .filter_map(|(part, changed)| changed.then_some(part))
    .collect();
    if !parts.is_empty() {
        reasons.push(Reason::SettingsChanged { parts });
    }
    reasons
}

fn base_reasons(built: &BaseIdentity, now: &BaseIdentity) -> Vec<Reason> {
    // The same bootstrap configuration on archives that moved: one reason per archive.
    if let (
        BaseIdentity::Bootstrap { archives: a1, .. },
        BaseIdentity::Bootstrap { archives: a2, .. },
    ) = (built, now)
    {
        let mut same_configuration = built.clone();
        if let BaseIdentity::Bootstrap { archives, .. } = &mut same_configuration {
            archives.clone_from(a2);
        }
        if same_configuration == *now {
            let moved: Vec<Reason> = a2
                .iter()
                .filter_map(|pin| {
                    let old = a1
                        .iter()
                        .find(|o| o.mirror == pin.mirror && o.suite == pin.suite)?;
                    (old.release != pin.release).then(|| Reason::ArchiveMoved {
                        mirror: pin.mirror.clone(),
                        suite: pin.suite.clone(),
                        built: old.release.to_string(),
                        now: pin.release.to_string(),
                    })
                })
                .collect();
            if !moved.is_empty() {
                return moved;
            }
        }
    }
    vec![base_reason(built, now)]
}

fn base_reason(built: &BaseIdentity, now: &BaseIdentity) -> Reason {
    match (built, now) {
        (
            BaseIdentity::Image {
                repository: r1,
                digest: d1,
            },
            BaseIdentity::Image {
                repository: r2,
                digest: d2,
            },
        ) if r1 == r2 => Reason::BaseImageMoved {
            repository: r2.clone(),
            built: d1.to_string(),
            now: d2.to_string(),
        },
        (
            BaseIdentity::Ami {
                region: g1,
                image_id: i1,
                ..
            },
            BaseIdentity::Ami {
                region: g2,
                image_id: i2,
                name,
                creation_date,
                ..
            },
        ) if g1 == g2 => Reason::SourceAmiSuperseded {
            region: g2.clone(),
            built: i1.clone(),
            now: i2.clone(),
            now_name: name.clone(),
            now_created: creation_date.clone(),
        },
        (
            BaseIdentity::Recipe {
                name: n1,
                version: v1,
            },
            BaseIdentity::Recipe {
                name: n2,
                version: v2,
            },
        ) if n1 == n2 => Reason::BaseRecipeChanged {
            name: n2.clone(),
            built: v1.to_string(),
            now: v2.to_string(),
        },
        (built, now) => Reason::BaseChanged {
            built: describe_base(built),
            now: describe_base(now),
        },
    }
}

fn describe_base(base: &BaseIdentity) -> String {
    match base {
        BaseIdentity::Scratch => "scratch".into(),
        BaseIdentity::Image { repository, digest } => {
            format!("image {repository}@{}", digest.short())
        }
        BaseIdentity::OciLayout { digest } => format!("OCI layout {}", digest.short()),
        BaseIdentity::Rootfs { digest } => format!("rootfs {}", digest.short()),
        BaseIdentity::Bootstrap {
            suite, packages, ..
        } => format!("bootstrap {suite} ({} packages)", packages.len()),
        BaseIdentity::Recipe { name, version } => {
            format!("recipe {name} {}", version.short())
        }
        BaseIdentity::Ami {
            region, image_id, ..
        } => format!("AMI {image_id} in {region}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::RecipeInputs;

    fn inputs(base: BaseIdentity) -> PlanInputs {
        PlanInputs {
            format: "bake.version/v1".into(),
            recipe: RecipeInputs {
                name: "app".into(),
                variables: Default::default(),
                base: serde_json::json!({"image": "r/app:1"}),
                build: serde_json::json!({}),
                provisioners: serde_json::json!([]),
                tests: serde_json::json!([]),
                outputs: serde_json::json!({}),
            },
            base,
            files: Vec::new(),
            builtins: Vec::new(),
            source_date_epoch: 0,
        }
    }

    fn digest(c: char) -> crate::id::Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn same_inputs_have_no_reason() {
        let a = inputs(BaseIdentity::Scratch);
        assert_eq!(reasons(&a, &a.clone()), []);
    }

    #[test]
    fn a_moved_tag_is_named_with_both_digests() {
        let built = inputs(BaseIdentity::Image {
            repository: "r/app".into(),
            digest: digest('a'),
        });
        let now = inputs(BaseIdentity::Image {
            repository: "r/app".into(),
            digest: digest('b'),
        });
        let found = reasons(&built, &now);
        assert_eq!(found.len(), 1);
        assert!(found[0].is_upstream());
        assert_eq!(
            found[0].describe(),
            "base image r/app moved: aaaaaaaaaaaa → bbbbbbbbbbbb"
        );
    }

    #[test]
    fn a_moved_archive_is_named_and_a_changed_package_list_is_a_base_change() {
        let bootstrap = |updates: char, packages: &[&str]| BaseIdentity::Bootstrap {
            distro: "debian".into(),
            suite: "bookworm".into(),
            variant: "minbase".into(),
            packages: packages.iter().map(|p| (*p).to_owned()).collect(),
            mirror: "http://deb.debian.org/debian".into(),
            components: vec!["main".into()],
            architecture: "amd64".into(),
            archives: vec![
                crate::plan::archive::PinnedArchive {
                    mirror: "http://deb.debian.org/debian".into(),
                    suite: "bookworm".into(),
                    release: digest('a'),
                },
                crate::plan::archive::PinnedArchive {
                    mirror: "http://deb.debian.org/debian".into(),
                    suite: "bookworm-updates".into(),
                    release: digest(updates),
                },
            ],
        };
        let found = reasons(
            &inputs(bootstrap('b', &["curl"])),
            &inputs(bootstrap('c', &["curl"])),
        );
        assert_eq!(
            found.iter().map(Reason::describe).collect::<Vec<_>>(),
            [
                "package archive http://deb.debian.org/debian bookworm-updates has a new Release: bbbbbbbbbbbb → cccccccccccc"
            ]
        );
        let found = reasons(
            &inputs(bootstrap('b', &["curl"])),
            &inputs(bootstrap('c', &["curl", "nginx"])),
        );
        assert!(matches!(found[0], Reason::BaseChanged { .. }), "{found:?}");
    }

    #[test]
    fn a_newer_source_ami_and_an_edited_step_are_both_reasons() {
        let ami = |id: &str| BaseIdentity::Ami {
            region: "us-east-1".into(),
            image_id: id.into(),
            name: Some(format!("debian-{id}")),
            creation_date: Some("2026-12-01T00:00:00.000Z".into()),
            owner_id: None,
        };
        let built = inputs(ami("ami-1"));
        let mut now = inputs(ami("ami-2"));
        now.recipe.provisioners = serde_json::json!([{"shell": {"inline": "true"}}]);
        let found = reasons(&built, &now);
        assert_eq!(
            found.iter().map(Reason::describe).collect::<Vec<_>>(),
            [
                "source AMI superseded in us-east-1: ami-1 → ami-2 (debian-ami-2, 2026-12-01T00:00:00.000Z)",
                "recipe changed: provisioners"
            ]
        );
        assert!(!found[1].is_upstream());
    }
}
