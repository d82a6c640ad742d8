//! What of a plan is already done: beside each effect, whether a run would really do it. The
//! local store is always asked (it is on this machine); registries and AWS only when the
//! caller says so (`bake plan --check`), so a plan stays fast and works offline. An effect
//! that was not asked says so, and why, instead of pretending it would happen.
//!
//! The look-ups sit behind [`Lookup`] so the decisions are unit-tested with a fake; the real
//! one ([`TargetLookup`]) asks the store, the registry client and the AWS clients it is given.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use super::{Effect, Plan};
use crate::ami::Sharing;
use crate::aws::Aws;
use crate::registry::{self, Reference};
use crate::store::Store;

/// How long one remote look-up may take before its effect is shown as unknown: a plan must
/// never hang on an unreachable registry or AWS endpoint (the SDK's own retries fit in it).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a run would do an effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EffectState {
    /// A run would do it.
    Todo,
    /// The version is in the local store: building it runs nothing.
    Built { image_digest: String },
    /// The target repository has the image's manifest: pushing sends nothing.
    InRegistry { digest: String },
    /// An AMI tagged with this version exists in the region: nothing is uploaded, registered
    /// or copied there.
    AmiExists { image_id: String },
    /// The AMI's launch permissions already are what the recipe asks.
    Shared { image_id: String },
    /// Not asked, for this reason: the effect may or may not happen.
    NotAsked { reason: NotAsked },
    /// Asked, without an answer.
    Unknown { error: String },
}

/// Why an effect's state was not asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotAsked {
    /// Registries and AWS are asked only with `bake plan --check`.
    Offline,
    /// No AWS credentials were found, so AWS was not asked.
    NoCredentials,
    /// The image is not built here, so its digest (what a registry is asked for) is unknown.
    NotBuilt,
    /// Publishing pointers are compared by `bake plan --publish` (`bake publish --dry-run`).
    PublishPointers,
}

impl EffectState {
    /// The mark in front of the effect's line: `+` a run does it, `=` already so, `?` not known.
    pub fn mark(&self) -> char {
        match self {
            EffectState::Todo => '+',
            EffectState::Built { .. }
            | EffectState::InRegistry { .. }
            | EffectState::AmiExists { .. }
            | EffectState::Shared { .. } => '=',
            EffectState::NotAsked { .. } | EffectState::Unknown { .. } => '?',
        }
    }

    /// What to print before the effect (`built: `, `AMI exists (ami-…): `), if anything.
    pub fn label(&self) -> Option<String> {
        match self {
            EffectState::Todo => None,
            EffectState::Built { .. } => Some("built".into()),
            EffectState::InRegistry { .. } => Some("in registry".into()),
            EffectState::AmiExists { image_id } => Some(format!("AMI exists ({image_id})")),
            EffectState::Shared { .. } => Some("shared".into()),
            EffectState::NotAsked { reason } => Some(format!(
                "not asked ({})",
                match reason {
                    NotAsked::Offline => "registries and AWS are asked with --check",
                    NotAsked::NoCredentials => "no AWS credentials",
                    NotAsked::NotBuilt => "not built here: the image digest is not known yet",
                    NotAsked::PublishPointers => "publishing pointers are compared by --publish",
                }
            )),
            EffectState::Unknown { error } => Some(format!("unknown ({error})")),
        }
    }
}

/// What may be asked beyond the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// Registries and AWS are not asked (the default).
    Off,
    /// Registries are asked, AWS is not: no credentials were found.
    NoAwsCredentials,
    /// Registries and AWS are asked.
    On,
}

/// A look-up failed; rendered into [`EffectState::Unknown`].
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("failed to read the store")]
    Store(#[source] crate::store::StoreError),
    #[error("failed to ask the registry for `{reference}`")]
    Registry {
        reference: String,
        #[source]
        source: Box<registry::RegistryError>,
    },
    #[error("`{reference}` is not a valid image reference")]
    Reference {
        reference: String,
        #[source]
        source: registry::ReferenceError,
    },
    #[error("failed to ask ECR for repository `{repository}` in {region}")]
    Ecr {
        repository: String,
        region: String,
        #[source]
        source: Box<aws_sdk_ecr::Error>,
    },
    #[error("failed to look up the AMI of this version in {region}")]
    Ami {
        region: String,
        #[source]
        source: crate::ami::AwsCallError,
    },
    #[error("no answer within {}s", LOOKUP_TIMEOUT.as_secs())]
    Timeout,
    #[error("nothing to ask: {0}")]
    Unavailable(&'static str),
}

/// The questions a plan asks about its effects.
pub trait Lookup {
    /// The manifest digest of `version`'s image, if the local store holds a complete build.
    fn built(&self, version: &str) -> Result<Option<String>, LookupError>;
    /// Whether the registry repository `repository` (`host/name`) has the manifest `digest`.
    fn in_registry(
        &self,
        repository: &str,
        digest: &str,
    ) -> impl Future<Output = Result<bool, LookupError>>;
    /// Whether ECR repository `name` in `region` has the manifest `digest`.
    fn in_ecr(
        &self,
        region: &str,
        name: &str,
        digest: &str,
    ) -> impl Future<Output = Result<bool, LookupError>>;
    /// The AMI in `region` tagged as `recipe`'s `version`, if there is one.
    fn ami(
        &self,
        region: &str,
        recipe: &str,
        version: &str,
    ) -> impl Future<Output = Result<Option<String>, LookupError>>;
    /// Whether `image_id`'s launch permissions already are what `sharing` asks.
    fn shared(
        &self,
        region: &str,
        image_id: &str,
        sharing: &Sharing,
    ) -> impl Future<Output = Result<bool, LookupError>>;
}

async fn timed<T>(future: impl Future<Output = Result<T, LookupError>>) -> Result<T, LookupError> {
    tokio::time::timeout(LOOKUP_TIMEOUT, future)
        .await
        .unwrap_or(Err(LookupError::Timeout))
}

fn unknown(error: &LookupError) -> EffectState {
    EffectState::Unknown {
        error: crate::diagnostic::error_chain(error),
    }
}

/// The state of each of `plan`'s effects, in order. Asks the store always, registries when
/// `remote` is not [`Remote::Off`], AWS only with [`Remote::On`].
pub async fn assess(plan: &Plan, lookup: &impl Lookup, remote: Remote) -> Vec<EffectState> {
    assess_effects(&plan.name, &plan.version, &plan.effects, lookup, remote).await
}

/// [`assess`] of the effects of recipe `name` at `version`.
pub async fn assess_effects(
    name: &str,
    version: &str,
    effects: &[Effect],
    lookup: &impl Lookup,
    remote: Remote,
) -> Vec<EffectState> {
    let built = lookup.built(version);
    let digest = built.as_ref().ok().cloned().flatten();
    let aws_off = match remote {
        Remote::Off => Some(NotAsked::Offline),
        Remote::NoAwsCredentials => Some(NotAsked::NoCredentials),
        Remote::On => None,
    };
    // The AMI of each region, asked once however many effects depend on it.
    let mut amis: Vec<(String, Result<Option<String>, String>)> = Vec::new();
    if aws_off.is_none() {
        for region in ami_regions(effects) {
            let found = timed(lookup.ami(&region, name, version))
                .await
                .map_err(|e| crate::diagnostic::error_chain(&e));
            amis.push((region, found));
        }
    }
    let ami_state = |region: &str| -> EffectState {
        if let Some(reason) = aws_off {
            return EffectState::NotAsked { reason };
        }
        match amis.iter().find(|(r, _)| r == region).map(|(_, f)| f) {
            Some(Ok(Some(image_id))) => EffectState::AmiExists {
                image_id: image_id.clone(),
            },
            Some(Ok(None)) | None => EffectState::Todo,
            Some(Err(error)) => EffectState::Unknown {
                error: error.clone(),
            },
        }
    };
    let build_region = effects.iter().find_map(|e| match e {
        Effect::RegisterAmi { region, .. } => Some(region.clone()),
        _ => None,
    });
    let mut states = Vec::with_capacity(effects.len());
    for effect in effects {
        let state = match effect {
            Effect::BuildImage { .. } => match &built {
                Ok(Some(image_digest)) => EffectState::Built {
                    image_digest: image_digest.clone(),
                },
                Ok(None) => EffectState::Todo,
                Err(e) => unknown(e),
            },
            // Everything before the home region's AMI exists is skipped once it does.
            Effect::BuildDisk { .. }
            | Effect::UploadSnapshot { .. }
            | Effect::LaunchBuilder { .. } => {
                ami_state(build_region.as_deref().unwrap_or_default())
            }
            Effect::RegisterAmi { region, .. } => ami_state(region),
            Effect::CopyAmi { to, .. } => ami_state(to),
            Effect::ShareAmi {
                region,
                accounts,
                organizations,
                organizational_units,
                public,
            } => match ami_state(region) {
                EffectState::AmiExists { image_id } => {
                    let sharing = Sharing {
                        accounts: accounts.clone(),
                        organizations: organizations.clone(),
                        organizational_units: organizational_units.clone(),
                        public: *public,
                    };
                    match timed(lookup.shared(region, &image_id, &sharing)).await {
                        Ok(true) => EffectState::Shared { image_id },
                        Ok(false) => EffectState::Todo,
                        Err(e) => unknown(&e),
                    }
                }
                other => other,
            },
            Effect::PushImage { repository, .. } => match (&digest, remote) {
                (_, Remote::Off) => EffectState::NotAsked {
                    reason: NotAsked::Offline,
                },
                (None, _) => EffectState::NotAsked {
                    reason: NotAsked::NotBuilt,
                },
                (Some(digest), _) => match timed(lookup.in_registry(repository, digest)).await {
                    Ok(true) => EffectState::InRegistry {
                        digest: digest.clone(),
                    },
                    Ok(false) => EffectState::Todo,
                    Err(e) => unknown(&e),
                },
            },
            Effect::PushEcr {
                repository, region, ..
            } => match (&digest, aws_off) {
                (_, Some(reason)) => EffectState::NotAsked { reason },
                (None, None) => EffectState::NotAsked {
                    reason: NotAsked::NotBuilt,
                },
                (Some(digest), None) => {
                    match timed(lookup.in_ecr(region, repository, digest)).await {
                        Ok(true) => EffectState::InRegistry {
                            digest: digest.clone(),
                        },
                        Ok(false) => EffectState::Todo,
                        Err(e) => unknown(&e),
                    }
                }
            },
            Effect::CreateLaunchTemplateVersion { .. }
            | Effect::PutSsmParameter { .. }
            | Effect::RegisterTaskDefinition { .. } => EffectState::NotAsked {
                reason: NotAsked::PublishPointers,
            },
        };
        states.push(state);
    }
    states
}

/// The regions the plan's AMI effects name, in order, once each.
fn ami_regions(effects: &[Effect]) -> Vec<String> {
    let mut regions: Vec<String> = Vec::new();
    for effect in effects {
        let region = match effect {
            Effect::RegisterAmi { region, .. } | Effect::ShareAmi { region, .. } => region,
            Effect::CopyAmi { to, .. } => to,
            _ => continue,
        };
        if !regions.contains(region) {
            regions.push(region.clone());
        }
    }
    regions
}

/// The real look-ups: the local store (when there is one), a registry client, and AWS.
pub struct TargetLookup<'a> {
    pub store: Option<&'a Store>,
    pub registry: Option<&'a registry::Client>,
    pub aws: Option<&'a Aws>,
}

impl Lookup for TargetLookup<'_> {
    fn built(&self, version: &str) -> Result<Option<String>, LookupError> {
        let Some(store) = self.store else {
            return Ok(None);
        };
        crate::build::pipeline::built_image(store, version)
            .map(|output| output.map(|o| o.image_digest.to_string()))
            .map_err(LookupError::Store)
    }

    async fn in_registry(&self, repository: &str, digest: &str) -> Result<bool, LookupError> {
        let client = self
            .registry
            .ok_or(LookupError::Unavailable("no registry client"))?;
        let shown = format!("{repository}@{digest}");
        let reference: Reference = shown.parse().map_err(|source| LookupError::Reference {
            reference: shown.clone(),
            source,
        })?;
        match client.head_manifest(&reference).await {
            Ok(found) => Ok(found.is_some_and(|info| info.digest == digest)),
            Err(source) => Err(LookupError::Registry {
                reference: shown,
                source: Box::new(source),
            }),
        }
    }

    async fn in_ecr(&self, region: &str, name: &str, digest: &str) -> Result<bool, LookupError> {
        let aws = self.aws.ok_or(LookupError::Unavailable("no AWS clients"))?;
        let result = aws
            .ecr(region)
            .describe_images()
            .repository_name(name)
            .image_ids(
                aws_sdk_ecr::types::ImageIdentifier::builder()
                    .image_digest(digest)
                    .build(),
            )
            .send()
            .await;
        match result {
            Ok(found) => Ok(!found.image_details().is_empty()),
            Err(e)
                if e.as_service_error().is_some_and(|s| {
                    s.is_image_not_found_exception() || s.is_repository_not_found_exception()
                }) =>
            {
                Ok(false)
            }
            Err(e) => Err(LookupError::Ecr {
                repository: name.to_owned(),
                region: region.to_owned(),
                source: Box::new(aws_sdk_ecr::Error::from(e)),
            }),
        }
    }

    async fn ami(
        &self,
        region: &str,
        recipe: &str,
        version: &str,
    ) -> Result<Option<String>, LookupError> {
        let aws = self.aws.ok_or(LookupError::Unavailable("no AWS clients"))?;
        crate::ami::lookup::images_of_version(&aws.ec2(region), recipe, version)
            .await
            .map(|images| images.into_iter().next().map(|i| i.image_id))
            .map_err(|source| LookupError::Ami {
                region: region.to_owned(),
                source,
            })
    }

    async fn shared(
        &self,
        region: &str,
        image_id: &str,
        sharing: &Sharing,
    ) -> Result<bool, LookupError> {
        let aws = self.aws.ok_or(LookupError::Unavailable("no AWS clients"))?;
        crate::ami::distribute::is_shared(&aws.ec2(region), image_id, sharing)
            .await
            .map_err(|source| LookupError::Ami {
                region: region.to_owned(),
                source,
            })
    }
}

/// Whether the AWS configuration yields credentials (within [`LOOKUP_TIMEOUT`]): without them
/// AWS is not asked, and the plan says so.
pub async fn has_aws_credentials(aws: &Aws) -> bool {
    use aws_credential_types::provider::ProvideCredentials as _;
    let Some(provider) = aws.sdk_config().credentials_provider() else {
        return false;
    };
    matches!(
        tokio::time::timeout(LOOKUP_TIMEOUT, provider.provide_credentials()).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Answers from fixed data and records every question.
    #[derive(Default)]
    struct Fake {
        built: Option<String>,
        in_registry: Vec<String>,
        amis: Vec<(String, String)>,
        shared: bool,
        asked: RefCell<Vec<String>>,
    }

    impl Lookup for Fake {
        fn built(&self, version: &str) -> Result<Option<String>, LookupError> {
            self.asked.borrow_mut().push(format!("store {version}"));
            Ok(self.built.clone())
        }

        async fn in_registry(&self, repository: &str, digest: &str) -> Result<bool, LookupError> {
            self.asked
                .borrow_mut()
                .push(format!("registry {repository}@{digest}"));
            Ok(self.in_registry.iter().any(|r| r == repository))
        }

        async fn in_ecr(&self, region: &str, name: &str, _: &str) -> Result<bool, LookupError> {
            self.asked.borrow_mut().push(format!("ecr {region}/{name}"));
            Ok(self.in_registry.iter().any(|r| r == name))
        }

        async fn ami(&self, region: &str, _: &str, _: &str) -> Result<Option<String>, LookupError> {
            self.asked.borrow_mut().push(format!("ami {region}"));
            Ok(self
                .amis
                .iter()
                .find(|(r, _)| r == region)
                .map(|(_, id)| id.clone()))
        }

        async fn shared(&self, _: &str, image_id: &str, _: &Sharing) -> Result<bool, LookupError> {
            self.asked.borrow_mut().push(format!("shared {image_id}"));
            Ok(self.shared)
        }
    }

    fn version() -> String {
        format!("sha256:{}", "a".repeat(64))
    }

    fn assess(effects: Vec<Effect>, fake: &Fake, remote: Remote) -> Vec<EffectState> {
        run(assess_effects("web", &version(), &effects, fake, remote))
    }

    fn oci_effects() -> Vec<Effect> {
        vec![
            Effect::BuildImage {
                platform: "linux/amd64".into(),
                base: "scratch".into(),
                steps: 0,
                tests: 0,
            },
            Effect::PushImage {
                repository: "127.0.0.1:5000/web".into(),
                tags: vec![],
            },
            Effect::PushEcr {
                repository: "web".into(),
                region: "eu-west-1".into(),
                tags: vec![],
                create_repository: true,
            },
        ]
    }

    fn ami_effects() -> Vec<Effect> {
        vec![
            Effect::BuildDisk {
                size_gib: 2,
                boot_mode: "uefi".into(),
            },
            Effect::UploadSnapshot {
                region: "us-east-1".into(),
                encrypted: true,
            },
            Effect::RegisterAmi {
                region: "us-east-1".into(),
                name: "web-1".into(),
            },
            Effect::ShareAmi {
                region: "us-east-1".into(),
                accounts: vec!["111122223333".into()],
                organizations: vec![],
                organizational_units: vec![],
                public: false,
            },
            Effect::CopyAmi {
                from: "us-east-1".into(),
                to: "eu-west-1".into(),
                name: "web-1".into(),
                encrypted: true,
            },
            Effect::PutSsmParameter {
                name: "/web/ami".into(),
                region: "us-east-1".into(),
            },
        ]
    }

    fn run<T>(future: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn offline_asks_only_the_store_and_says_what_it_did_not_ask() {
        let fake = Fake {
            built: Some("sha256:feed".into()),
            ..Fake::default()
        };
        let mut effects = oci_effects();
        effects.extend(ami_effects());
        let states = assess(effects, &fake, Remote::Off);
        assert_eq!(
            states[0],
            EffectState::Built {
                image_digest: "sha256:feed".into()
            }
        );
        let offline = EffectState::NotAsked {
            reason: NotAsked::Offline,
        };
        assert!(states[1..8].iter().all(|s| *s == offline), "{states:?}");
        assert_eq!(
            states[8],
            EffectState::NotAsked {
                reason: NotAsked::PublishPointers
            }
        );
        assert_eq!(*fake.asked.borrow(), [format!("store {}", version())]);
    }

    #[test]
    fn what_exists_is_shown_as_done_and_the_rest_as_todo() {
        let fake = Fake {
            built: Some("sha256:feed".into()),
            in_registry: vec!["127.0.0.1:5000/web".into()],
            amis: vec![("us-east-1".into(), "ami-1".into())],
            shared: true,
            ..Fake::default()
        };
        let mut effects = oci_effects();
        effects.extend(ami_effects());
        let states = assess(effects, &fake, Remote::On);
        let exists = EffectState::AmiExists {
            image_id: "ami-1".into(),
        };
        assert_eq!(
            states,
            vec![
                EffectState::Built {
                    image_digest: "sha256:feed".into()
                },
                EffectState::InRegistry {
                    digest: "sha256:feed".into()
                },
                EffectState::Todo, // not in ECR
                exists.clone(),    // the disk is not built again
                exists.clone(),    // nor uploaded
                exists,
                EffectState::Shared {
                    image_id: "ami-1".into()
                },
                EffectState::Todo, // no AMI in eu-west-1 yet
                EffectState::NotAsked {
                    reason: NotAsked::PublishPointers
                },
            ]
        );
        // Each region's AMI is asked for once.
        let asked = fake.asked.borrow();
        assert_eq!(asked.iter().filter(|a| *a == "ami us-east-1").count(), 1);
    }

    #[test]
    fn an_unbuilt_image_cannot_be_looked_for_and_no_credentials_means_aws_is_not_asked() {
        let fake = Fake::default();
        let states = assess(oci_effects(), &fake, Remote::NoAwsCredentials);
        assert_eq!(
            states,
            vec![
                EffectState::Todo,
                EffectState::NotAsked {
                    reason: NotAsked::NotBuilt
                },
                EffectState::NotAsked {
                    reason: NotAsked::NoCredentials
                },
            ]
        );
        let states = assess(ami_effects(), &fake, Remote::NoAwsCredentials);
        assert!(
            states[..5].iter().all(|s| *s
                == EffectState::NotAsked {
                    reason: NotAsked::NoCredentials
                }),
            "{states:?}"
        );
        assert!(!fake.asked.borrow().iter().any(|a| a.starts_with("ami")));
    }

    #[test]
    fn marks_and_labels() {
        assert_eq!(EffectState::Todo.mark(), '+');
        assert_eq!(EffectState::Todo.label(), None);
        let built = EffectState::Built {
            image_digest: "sha256:feed".into(),
        };
        assert_eq!(
            (built.mark(), built.label().unwrap().as_str()),
            ('=', "built")
        );
        let exists = EffectState::AmiExists {
            image_id: "ami-1".into(),
        };
        assert_eq!(exists.label().unwrap(), "AMI exists (ami-1)");
        let offline = EffectState::NotAsked {
            reason: NotAsked::Offline,
        };
        assert_eq!(offline.mark(), '?');
        let pointers = EffectState::NotAsked {
            reason: NotAsked::PublishPointers,
        };
        assert_eq!(
            pointers.label().unwrap(),
            "not asked (publishing pointers are compared by --publish)"
        );
        assert!(offline.label().unwrap().contains("--check"));
        assert_eq!(
            serde_json::to_value(&offline).unwrap(),
            serde_json::json!({"status": "not_asked", "reason": "offline"})
        );
    }
}
