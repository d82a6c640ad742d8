//! The one place that builds AWS SDK configuration and clients. Stages never build clients
//! themselves; they are handed the ones made here.
//!
//! Standard credential chain, profiles and regions apply. An endpoint override (bake's
//! `BAKE_AWS_ENDPOINT_URL`, or the SDK's own `AWS_ENDPOINT_URL`) sends every client to a local
//! AWS emulator; with an emulator account set, each request carries the emulator's account
//! header so tests (or a person) get an isolated account per run.
//!
//! An endpoint override alone says nothing about what answers there: real users set one for
//! VPC and FIPS endpoints. So bake never infers emulator behaviour from it; the allowances for
//! APIs an emulator lacks are enabled only by naming the emulator (`BAKE_AWS_EMULATOR`), see
//! [`Emulator`].

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut;
use aws_smithy_runtime_api::client::interceptors::{Intercept, SharedInterceptor};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// Attempts per AWS call, including the first. The retry mode backs off exponentially with
/// jitter; five attempts ride out a throttling burst (about 20 s in total) without hiding an
/// outage for minutes.
pub const MAX_ATTEMPTS: u32 = 5;

/// bake's retry configuration for every AWS client: AWS's adaptive mode, which adds to the
/// standard mode's jittered backoff a client-side rate limiter that slows down once the service
/// answers `RequestLimitExceeded` or `Throttling`, so a fan-out over many regions stops
/// hammering a throttled API instead of spending its attempts.
pub fn retry_config() -> RetryConfig {
    RetryConfig::adaptive().with_max_attempts(MAX_ATTEMPTS)
}

/// The header moto reads to pick the account a request acts in.
pub const EMULATOR_ACCOUNT_HEADER: &str = "x-moto-account-id";

/// An AWS emulator bake has been told it talks to (`BAKE_AWS_EMULATOR`), and so which AWS APIs
/// it knows are missing there. Each allowance bake makes for a missing API asks this, never
/// whether an endpoint override is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emulator {
    /// moto (`moto_server`), the emulator bake's tests run against.
    Moto,
}

impl Emulator {
    /// Every emulator bake knows, by the name `BAKE_AWS_EMULATOR` takes.
    pub const ALL: [(&'static str, Emulator); 1] = [("moto", Emulator::Moto)];

    /// The name `BAKE_AWS_EMULATOR` takes.
    pub fn name(self) -> &'static str {
        match self {
            Emulator::Moto => "moto",
        }
    }

    /// Whether the emulator serves EC2 `EnableImageDeprecation` (moto answers it with a 500).
    pub fn serves_image_deprecation(self) -> bool {
        match self {
            Emulator::Moto => false,
        }
    }
}

impl std::str::FromStr for Emulator {
    type Err = AwsSettingsError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Emulator::ALL
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, emulator)| *emulator)
            .ok_or_else(|| AwsSettingsError::UnknownEmulator {
                name: name.to_owned(),
            })
    }
}

/// AWS settings that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AwsSettingsError {
    #[error("`{name}` in BAKE_AWS_EMULATOR is not an AWS emulator bake knows")]
    UnknownEmulator { name: String },
}

impl AwsSettingsError {
    pub fn hint(&self) -> Option<String> {
        match self {
            AwsSettingsError::UnknownEmulator { .. } => Some(format!(
                "known emulators: {}; leave BAKE_AWS_EMULATOR unset for AWS itself (also behind an endpoint override)",
                Emulator::ALL
                    .iter()
                    .map(|(name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// AWS settings, resolved from the command line and the environment before any work starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsSettings {
    /// The default region; `None` leaves it to the SDK's chain (`AWS_REGION`, profile).
    pub region: Option<String>,
    /// A named profile; `None` leaves it to `AWS_PROFILE`.
    pub profile: Option<String>,
    /// Send every request here instead of AWS (an emulator such as moto).
    pub endpoint_url: Option<String>,
    /// With an emulator: the 12-digit account to act in.
    pub emulator_account: Option<String>,
    /// The emulator the endpoint is, when the user says so; `None` is AWS itself, whatever
    /// the endpoint.
    pub emulator: Option<Emulator>,
}

impl AwsSettings {
    /// bake's own AWS environment variables (the SDK reads the standard `AWS_*` ones itself).
    pub fn from_env() -> Result<Self, AwsSettingsError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The settings from a variable lookup (the environment, or a test's map).
    pub fn from_vars(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, AwsSettingsError> {
        let var = |name: &str| lookup(name).filter(|v| !v.is_empty());
        Ok(AwsSettings {
            region: var("BAKE_AWS_REGION"),
            profile: var("BAKE_AWS_PROFILE"),
            endpoint_url: var("BAKE_AWS_ENDPOINT_URL"),
            emulator_account: var("BAKE_AWS_EMULATOR_ACCOUNT"),
            emulator: var("BAKE_AWS_EMULATOR")
                .map(|name| name.parse())
                .transpose()?,
        })
    }
}

/// Shared AWS configuration, from which per-service, per-region clients are made.
#[derive(Debug, Clone)]
pub struct Aws {
    config: SdkConfig,
    emulator_account: Option<String>,
    emulator: Option<Emulator>,
    /// Added to every client made from here (request logs, tests' request capture).
    interceptors: Vec<SharedInterceptor>,
}

/// Builds a per-region client of one service from the shared configuration, with the emulator
/// account header and the extra interceptors.
macro_rules! service_client {
    ($self:ident, $sdk:ident, $region:expr) => {{
        let mut builder =
            $sdk::config::Builder::from(&$self.config).region(Region::new($region.to_owned()));
        if let Some(account) = &$self.emulator_account {
            builder = builder.interceptor(EmulatorAccount(account.clone()));
        }
        for interceptor in &$self.interceptors {
            builder.push_interceptor(interceptor.clone());
        }
        $sdk::Client::from_conf(builder.build())
    }};
}

impl Aws {
    /// Loads the configuration (credentials are resolved lazily, at the first call).
    pub async fn load(settings: &AwsSettings) -> Self {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).retry_config(retry_config());
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(profile) = &settings.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(url) = &settings.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        Aws {
            config: loader.load().await,
            emulator_account: settings.emulator_account.clone(),
            emulator: settings.emulator,
            interceptors: Vec::new(),
        }
    }

    /// Wraps an already built configuration (tests, or callers with their own setup).
    pub fn from_config(config: SdkConfig, emulator_account: Option<String>) -> Self {
        Aws {
            config,
            emulator_account,
            emulator: None,
            interceptors: Vec::new(),
        }
    }

    /// Says which emulator answers (see [`Emulator`]); without it, bake treats the endpoint
    /// as AWS.
    pub fn with_emulator(mut self, emulator: Emulator) -> Self {
        self.emulator = Some(emulator);
        self
    }

    /// The emulator the user named, if any.
    pub fn emulator(&self) -> Option<Emulator> {
        self.emulator
    }

    /// Adds an interceptor to every client made from now on.
    pub fn with_interceptor(mut self, interceptor: impl Intercept + 'static) -> Self {
        self.interceptors.push(SharedInterceptor::new(interceptor));
        self
    }

    /// The interceptors a client of any service must carry: the emulator account header and
    /// any added with [`Aws::with_interceptor`]. For clients of services without a method here.
    pub fn interceptors(&self) -> Vec<SharedInterceptor> {
        let mut all: Vec<SharedInterceptor> = self
            .emulator_account
            .iter()
            .map(|a| SharedInterceptor::new(EmulatorAccount(a.clone())))
            .collect();
        all.extend(self.interceptors.iter().cloned());
        all
    }

    /// The default region, if the settings or the environment give one.
    pub fn default_region(&self) -> Option<&str> {
        self.config.region().map(Region::as_ref)
    }

    pub fn sdk_config(&self) -> &SdkConfig {
        &self.config
    }

    /// An EC2 client for `region`.
    pub fn ec2(&self, region: &str) -> aws_sdk_ec2::Client {
        service_client!(self, aws_sdk_ec2, region)
    }

    /// An EBS direct API client for `region` (snapshot block uploads).
    pub fn ebs(&self, region: &str) -> aws_sdk_ebs::Client {
        service_client!(self, aws_sdk_ebs, region)
    }

    /// A KMS client for `region`.
    pub fn kms(&self, region: &str) -> aws_sdk_kms::Client {
        service_client!(self, aws_sdk_kms, region)
    }

    /// An STS client for `region`.
    pub fn sts(&self, region: &str) -> aws_sdk_sts::Client {
        service_client!(self, aws_sdk_sts, region)
    }

    /// An SSM client for `region` (parameters: vendor AMIs, channels, published AMI ids).
    pub fn ssm(&self, region: &str) -> aws_sdk_ssm::Client {
        service_client!(self, aws_sdk_ssm, region)
    }

    /// An EC2 Image Builder client for `region` (`bake build --engine imagebuilder`).
    pub fn imagebuilder(&self, region: &str) -> aws_sdk_imagebuilder::Client {
        service_client!(self, aws_sdk_imagebuilder, region)
    }

    /// An ECR client for `region`.
    pub fn ecr(&self, region: &str) -> aws_sdk_ecr::Client {
        service_client!(self, aws_sdk_ecr, region)
    }

    /// An S3 client for `region` (files Image Builder components fetch). With an endpoint
    /// override (an emulator on `127.0.0.1` or `localhost`) requests are path-style: a
    /// virtual-hosted bucket name would have to resolve as a subdomain of the override.
    pub fn s3(&self, region: &str) -> aws_sdk_s3::Client {
        let mut builder = aws_sdk_s3::config::Builder::from(&self.config)
            .region(Region::new(region.to_owned()))
            .force_path_style(self.config.endpoint_url().is_some());
        if let Some(account) = &self.emulator_account {
            builder = builder.interceptor(EmulatorAccount(account.clone()));
        }
        for interceptor in &self.interceptors {
            builder.push_interceptor(interceptor.clone());
        }
        aws_sdk_s3::Client::from_conf(builder.build())
    }
}

/// Adds the emulator's account header to every request.
#[derive(Debug, Clone)]
struct EmulatorAccount(String);

impl Intercept for EmulatorAccount {
    fn name(&self) -> &'static str {
        "BakeEmulatorAccount"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        context
            .request_mut()
            .headers_mut()
            .insert(EMULATOR_ACCOUNT_HEADER, self.0.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> Result<AwsSettings, AwsSettingsError> {
        AwsSettings::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn an_endpoint_override_alone_names_no_emulator() {
        let s = settings(&[(
            "BAKE_AWS_ENDPOINT_URL",
            "https://ec2-fips.us-east-1.amazonaws.com",
        )])
        .unwrap();
        assert_eq!(s.emulator, None);
        let s = settings(&[
            ("BAKE_AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
            ("BAKE_AWS_EMULATOR", "moto"),
        ])
        .unwrap();
        assert_eq!(s.emulator, Some(Emulator::Moto));
        assert!(!Emulator::Moto.serves_image_deprecation());
    }

    #[test]
    fn an_unknown_emulator_is_refused_with_the_known_ones() {
        let error = settings(&[("BAKE_AWS_EMULATOR", "localstack")]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "`localstack` in BAKE_AWS_EMULATOR is not an AWS emulator bake knows"
        );
        assert!(error.hint().unwrap().contains("moto"));
        assert_eq!(
            settings(&[("BAKE_AWS_EMULATOR", "")]).unwrap().emulator,
            None
        );
    }
}
