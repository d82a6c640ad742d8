//! The one place that builds AWS SDK configuration and clients. Stages never build clients
//! themselves; they are handed the ones made here.
//!
//! Standard credential chain, profiles and regions apply. An endpoint override (bake's
//! `BAKE_AWS_ENDPOINT_URL`, or the SDK's own `AWS_ENDPOINT_URL`) sends every client to a local
//! AWS emulator; with an emulator account set, each request carries the emulator's account
//! header so tests (or a person) get an isolated account per run.

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut;
use aws_smithy_runtime_api::client::interceptors::{Intercept, SharedInterceptor};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// Attempts per AWS call, including the first. Standard retry mode backs off exponentially with
/// jitter; five attempts ride out a throttling burst (about 20 s in total) without hiding an
/// outage for minutes.
pub const MAX_ATTEMPTS: u32 = 5;

/// The header moto reads to pick the account a request acts in.
pub const EMULATOR_ACCOUNT_HEADER: &str = "x-moto-account-id";

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
}

impl AwsSettings {
    /// bake's own AWS environment variables (the SDK reads the standard `AWS_*` ones itself).
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        AwsSettings {
            region: var("BAKE_AWS_REGION"),
            profile: var("BAKE_AWS_PROFILE"),
            endpoint_url: var("BAKE_AWS_ENDPOINT_URL"),
            emulator_account: var("BAKE_AWS_EMULATOR_ACCOUNT"),
        }
    }
}

/// Shared AWS configuration, from which per-service, per-region clients are made.
#[derive(Debug, Clone)]
pub struct Aws {
    config: SdkConfig,
    emulator_account: Option<String>,
    /// Added to every client made from here (request logs, tests' request capture).
    interceptors: Vec<SharedInterceptor>,
}

impl Aws {
    /// Loads the configuration (credentials are resolved lazily, at the first call).
    pub async fn load(settings: &AwsSettings) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
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
            interceptors: Vec::new(),
        }
    }

    /// Wraps an already built configuration (tests, or callers with their own setup).
    pub fn from_config(config: SdkConfig, emulator_account: Option<String>) -> Self {
        Aws {
            config,
            emulator_account,
            interceptors: Vec::new(),
        }
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
        let mut builder =
            aws_sdk_ec2::config::Builder::from(&self.config).region(Region::new(region.to_owned()));
        for interceptor in self.interceptors() {
            builder = builder.interceptor(interceptor);
        }
        aws_sdk_ec2::Client::from_conf(builder.build())
    }
}

impl Aws {
    /// An ECR client for `region`.
    pub fn ecr(&self, region: &str) -> aws_sdk_ecr::Client {
        let mut builder =
            aws_sdk_ecr::config::Builder::from(&self.config).region(Region::new(region.to_owned()));
        if let Some(account) = &self.emulator_account {
            builder = builder.interceptor(EmulatorAccount(account.clone()));
        }
        aws_sdk_ecr::Client::from_conf(builder.build())
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
