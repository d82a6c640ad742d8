//! Publishing against moto and the local registry: launch template versions, SSM parameters,
//! Fargate task definitions, channels, refusals and partial publishes.
//!
//! moto ignores `SourceVersion` and has no instance refresh, so those are asserted on the
//! requests bake sends (captured by an interceptor), as are "creates nothing" and "changes
//! nothing".

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::Credentials;
use aws_sdk_ec2::types::{
    LaunchPermission, LaunchPermissionModifications, RequestLaunchTemplateData,
};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextRef;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use bake::aws::Aws;
use bake::exit::ExitStatus;
use bake::publish::{
    DigestCheck, ImageRef, PublishInputs, PublishOptions, Publisher, RegistryDigestCheck, Status,
    clients,
};
use sha2::{Digest, Sha256};

use super::common::{bake, fresh_account, service};

/// One request bake sent: its action (EC2 `Action=`, or the JSON protocols' `X-Amz-Target`
/// operation) and its body.
#[derive(Debug, Clone)]
struct Captured {
    action: String,
    body: String,
}

#[derive(Debug, Clone, Default)]
struct Capture(Arc<Mutex<Vec<Captured>>>);

impl Intercept for Capture {
    fn name(&self) -> &'static str {
        "TestCapture"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let request = context.request();
        let body = request
            .body()
            .bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        let action = match request.headers().get("x-amz-target") {
            Some(target) => target.rsplit('.').next().unwrap_or(target).to_owned(),
            None => body
                .split('&')
                .find_map(|kv| kv.strip_prefix("Action="))
                .unwrap_or_default()
                .to_owned(),
        };
        self.0.lock().unwrap().push(Captured { action, body });
        Ok(())
    }
}

impl Capture {
    fn take(&self) -> Vec<Captured> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn of<'a>(requests: &'a [Captured], action: &str) -> Vec<&'a Captured> {
    requests.iter().filter(|r| r.action == action).collect()
}

/// Requests that change something in AWS.
fn mutations(requests: &[Captured]) -> Vec<String> {
    const READ_ONLY: [&str; 4] = ["Describe", "Get", "List", "Check"];
    requests
        .iter()
        .filter(|r| !READ_ONLY.iter().any(|p| r.action.starts_with(p)))
        .map(|r| r.action.clone())
        .collect()
}

/// One test's moto account, clients for it, and a directory for its files (the rollout tests
/// use it too, pointed at the Auto Scaling/ECS stand-in).
pub(super) struct Env {
    pub(super) endpoint: String,
    pub(super) account: String,
    /// Clients for setting up and inspecting moto (not captured).
    pub(super) aws: Aws,
    capture: Capture,
    dir: tempfile::TempDir,
}

async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        // moto answers unimplemented calls with 500: fail fast and count each request once.
        .retry_config(RetryConfig::disabled())
        .load()
        .await
}

impl Env {
    async fn new() -> Option<Env> {
        Env::at("BAKE_TEST_MOTO_ENDPOINT").await
    }

    /// An environment whose endpoint is the server in `variable` (moto, or a stand-in in front
    /// of it).
    pub(super) async fn at(variable: &str) -> Option<Env> {
        let endpoint = service(variable)?;
        let account = fresh_account();
        let aws = Aws::from_config(sdk_config(&endpoint).await, Some(account.clone()))
            .with_emulator(bake::aws::Emulator::Moto);
        Some(Env {
            endpoint,
            account,
            aws,
            capture: Capture::default(),
            dir: tempfile::tempdir().unwrap(),
        })
    }

    /// bake's view: the same account, every request captured.
    async fn bake_aws(&self) -> Aws {
        Aws::from_config(sdk_config(&self.endpoint).await, Some(self.account.clone()))
            .with_emulator(bake::aws::Emulator::Moto)
            .with_interceptor(self.capture.clone())
    }

    fn recipe(&self, text: &str) -> bake::recipe::Recipe {
        let path = self.dir.path().join("recipe.yaml");
        fs_err::write(&path, text).unwrap();
        bake::recipe::load(&path, &Default::default())
            .unwrap_or_else(|e| panic!("test recipe is invalid: {e:?}"))
    }

    pub(super) fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs_err::write(&path, text).unwrap();
        path
    }

    /// An AMI of this account in `region`, made the way a bake build registers one.
    pub(super) async fn ami(&self, region: &str, name: &str) -> String {
        let ec2 = self.aws.ec2(region);
        ec2.register_image()
            .name(name)
            .root_device_name("/dev/xvda")
            .architecture(aws_sdk_ec2::types::ArchitectureValues::X8664)
            .virtualization_type("hvm")
            .send()
            .await
            .unwrap()
            .image_id()
            .unwrap()
            .to_owned()
    }

    /// A launch template with an instance type and a first version on `ami`.
    pub(super) async fn launch_template(&self, region: &str, name: &str, ami: &str) -> String {
        self.aws
            .ec2(region)
            .create_launch_template()
            .launch_template_name(name)
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(ami)
                    .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .launch_template()
            .unwrap()
            .launch_template_id()
            .unwrap()
            .to_owned()
    }

    pub(super) async fn template_default(&self, region: &str, id: &str) -> (i64, Option<String>) {
        let ec2 = self.aws.ec2(region);
        let out = ec2
            .describe_launch_template_versions()
            .launch_template_id(id)
            .versions("$Default")
            .send()
            .await
            .unwrap();
        let v = &out.launch_template_versions()[0];
        (
            v.version_number().unwrap(),
            v.launch_template_data()
                .and_then(|d| d.image_id())
                .map(str::to_owned),
        )
    }

    async fn template_versions(&self, region: &str, id: &str) -> usize {
        self.aws
            .ec2(region)
            .describe_launch_template_versions()
            .launch_template_id(id)
            .send()
            .await
            .unwrap()
            .launch_template_versions()
            .len()
    }

    pub(super) async fn parameter(&self, region: &str, name: &str) -> Option<String> {
        clients::ssm(&self.aws, region)
            .get_parameter()
            .name(name)
            .send()
            .await
            .ok()
            .and_then(|o| o.parameter().and_then(|p| p.value()).map(str::to_owned))
    }

    /// Runs the bake binary against moto, with a fresh store directory.
    pub(super) fn bake(&self, args: &[&str]) -> std::process::Output {
        let store = tempfile::tempdir().unwrap();
        self.bake_in(store.path(), args)
    }

    /// Runs the bake binary against moto, with the store `store`.
    pub(super) fn bake_in(&self, store: &Path, args: &[&str]) -> std::process::Output {
        self.command(store, args).output().expect("run bake")
    }

    /// The bake command [`Env::bake_in`] runs, for tests that start it in the background.
    pub(super) fn command(&self, store: &Path, args: &[&str]) -> std::process::Command {
        let mut command = bake();
        command
            .args(args)
            .arg("--store")
            .arg(store)
            .env("BAKE_AWS_ENDPOINT_URL", &self.endpoint)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &self.account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE");
        command
    }
}

pub(super) fn version(n: u8) -> String {
    format!("sha256:{}", format!("{n:02x}").repeat(32))
}

fn inputs(recipe: &str, n: u8, amis: &[(&str, &str)], images: Vec<ImageRef>) -> PublishInputs {
    PublishInputs {
        recipe: recipe.into(),
        version: version(n),
        amis: amis
            .iter()
            .map(|(r, a)| ((*r).to_owned(), (*a).to_owned()))
            .collect(),
        images,
    }
}

/// A recipe for an AMI published to launch template `web` (and more, from `publish`).
pub(super) fn ami_recipe(regions: &[&str], share: &[&str], publish: &str) -> String {
    let share = if share.is_empty() {
        String::new()
    } else {
        format!(
            "    sharing:\n      accounts: [{}]\n",
            share
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "bake: 1\nname: web\nbase: scratch\noutputs:\n  ami:\n    strategy: snapshot\n    name: \"web-{{{{version_short}}}}\"\n    regions: [{}]\n{share}publish:\n{publish}",
        regions.join(", ")
    )
}

/// A digest check that must not be reached (recipes without images).
struct NoImages;

impl DigestCheck for NoImages {
    async fn exists(
        &self,
        image: &ImageRef,
    ) -> Result<bool, bake::publish::digest::DigestCheckError> {
        panic!(
            "no image should be checked, asked for {}",
            image.reference()
        )
    }
}

fn publisher<'a, D: DigestCheck>(
    aws: &'a Aws,
    digests: &'a D,
    recipe: &'a bake::recipe::Recipe,
    options: PublishOptions,
) -> Publisher<'a, D> {
    Publisher {
        aws,
        digests,
        recipe,
        options,
    }
}

#[tokio::test]
async fn launch_templates_get_one_version_per_region_and_a_rerun_creates_nothing() {
    let Some(env) = Env::new().await else { return };
    let regions = ["us-east-1", "eu-west-1"];
    let mut templates = Vec::new();
    let mut amis = Vec::new();
    for region in regions {
        let old = env.ami(region, "web-old").await;
        let new = env.ami(region, "web-new").await;
        templates.push(env.launch_template(region, "web", &old).await);
        amis.push((region, new));
    }
    let recipe = env.recipe(&ami_recipe(
        &regions,
        &[],
        "  launch_templates:\n    - name: web\n",
    ));
    let amis_ref: Vec<(&str, &str)> = amis.iter().map(|(r, a)| (*r, a.as_str())).collect();
    let inputs = inputs("web", 1, &amis_ref, vec![]);
    let aws = env.bake_aws().await;
    let options = PublishOptions {
        set_default: true,
        ..Default::default()
    };
    let report = publisher(&aws, &NoImages, &recipe, options)
        .publish(&inputs)
        .await;
    assert_eq!(report.exit_status(), ExitStatus::Success, "{report:#?}");

    let requests = env.capture.take();
    let created = of(&requests, "CreateLaunchTemplateVersion");
    assert_eq!(created.len(), 2, "one version per region: {requests:#?}");
    for (region, ami) in &amis {
        assert!(
            created
                .iter()
                .any(|r| r.body.contains(&format!("ImageId={ami}"))
                    && r.body.contains("SourceVersion=1")
                    && r.body.contains("VersionDescription=bake")),
            "no CreateLaunchTemplateVersion from version 1 with {ami} for {region}: {created:#?}"
        );
    }
    for ((region, ami), id) in amis.iter().zip(&templates) {
        assert_eq!(
            env.template_default(region, id).await,
            (2, Some(ami.clone())),
            "default in {region}"
        );
    }

    // A second publish finds what the first made and changes nothing.
    let again = publisher(&aws, &NoImages, &recipe, options)
        .publish(&inputs)
        .await;
    assert_eq!(again.exit_status(), ExitStatus::Success, "{again:#?}");
    let requests = env.capture.take();
    assert!(
        mutations(&requests).is_empty(),
        "second publish changed something: {:?}",
        mutations(&requests)
    );
    assert!(!of(&requests, "DescribeLaunchTemplateVersions").is_empty());
    for (region, id) in regions.iter().zip(&templates) {
        assert_eq!(env.template_versions(region, id).await, 2);
    }
}

#[tokio::test]
async fn without_set_default_the_default_stays_and_dry_run_changes_nothing() {
    let Some(env) = Env::new().await else { return };
    let old = env.ami("us-east-1", "web-old").await;
    let new = env.ami("us-east-1", "web-new").await;
    let id = env.launch_template("us-east-1", "web", &old).await;
    let recipe = env.recipe(&ami_recipe(
        &["us-east-1"],
        &[],
        "  launch_templates:\n    - name: web\n  ssm_parameters:\n    - name: /web/ami\n",
    ));
    let inputs = inputs("web", 1, &[("us-east-1", &new)], vec![]);
    let aws = env.bake_aws().await;

    let dry = PublishOptions {
        dry_run: true,
        set_default: true,
        ..Default::default()
    };
    let plan = publisher(&aws, &NoImages, &recipe, dry)
        .publish(&inputs)
        .await;
    assert_eq!(plan.regions[0].status, Status::Planned);
    let json = serde_json::to_value(&plan).unwrap();
    let changes = json["regions"][0]["changes"].as_array().unwrap();
    let default = changes
        .iter()
        .find(|c| c["kind"] == "launch_template_default")
        .unwrap();
    assert_eq!(default["current"], format!("version 1 ({old})"));
    let parameter = changes
        .iter()
        .find(|c| c["kind"] == "ssm_parameter")
        .unwrap();
    assert_eq!(parameter["current"], serde_json::Value::Null);
    assert_eq!(parameter["wanted"], new.as_str());
    assert!(
        mutations(&env.capture.take()).is_empty(),
        "a dry run changed something"
    );

    let report = publisher(&aws, &NoImages, &recipe, PublishOptions::default())
        .publish(&inputs)
        .await;
    assert_eq!(report.exit_status(), ExitStatus::Success, "{report:#?}");
    assert_eq!(env.template_default("us-east-1", &id).await, (1, Some(old)));
    assert_eq!(env.template_versions("us-east-1", &id).await, 2);
    assert_eq!(
        env.parameter("us-east-1", "/web/ami").await,
        Some(new.clone())
    );
    // The parameter's history names the bake version of each value.
    let label = format!("/web/ami:bake-{}", &version(1)[7..19]);
    assert_eq!(env.parameter("us-east-1", &label).await, Some(new));
}

/// bake's registry client, with no credentials (the test registry is anonymous).
fn registry_client() -> bake::registry::Client {
    bake::registry::Client::new(
        bake::registry::ClientOptions::default(),
        std::sync::Arc::new(bake::registry::auth::ChainCredentials(Vec::new())),
    )
    .unwrap()
}

/// Pushes a small image to the registry; returns its repository and manifest digest.
pub(super) async fn push_image(registry: &str, name: &str) -> ImageRef {
    push_image_as(registry, name, None).await
}

async fn push_image_as(registry: &str, name: &str, auth: Option<(&str, &str)>) -> ImageRef {
    let client = reqwest::Client::new();
    let authed = |request: reqwest::RequestBuilder| match auth {
        Some((user, password)) => request.basic_auth(user, Some(password)),
        None => request,
    };
    let nonce = format!("{:?}", std::time::SystemTime::now());
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{{"Labels":{{"nonce":"{nonce}"}}}}}}"#
    );
    let layer = format!("layer {nonce}").into_bytes();
    let mut descriptors = Vec::new();
    for blob in [config.as_bytes().to_vec(), layer] {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
        let start = authed(client.post(format!("http://{registry}/v2/{name}/blobs/uploads/")))
            .send()
            .await
            .unwrap();
        assert_eq!(start.status(), 202);
        let location = start.headers()["location"].to_str().unwrap().to_owned();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("http://{registry}{location}")
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let put = authed(client.put(format!("{location}{separator}digest={digest}")))
            .header("content-type", "application/octet-stream")
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 201);
        descriptors.push((digest, blob.len()));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": descriptors[0].0, "size": descriptors[0].1},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": descriptors[1].0, "size": descriptors[1].1}]
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let put = authed(client.put(format!("http://{registry}/v2/{name}/manifests/latest")))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{:?}", put.text().await);
    ImageRef {
        repository: format!("{registry}/{name}"),
        digest,
    }
}

pub(super) fn fargate_recipe(
    repository: &str,
    service: Option<(&str, &str)>,
    channels: bool,
) -> String {
    let service = service
        .map(|(c, s)| format!("      service: {{cluster: {c}, name: {s}}}\n"))
        .unwrap_or_default();
    let channels = if channels { "  channels: [prod]\n" } else { "" };
    format!(
        "bake: 1\nname: api\nbase: scratch\noutputs:\n  oci: {{}}\npublish:\n  registries:\n    - repository: {repository}\n      insecure: true\n  ecs_task_definitions:\n    - family: api\n      container: app\n      region: us-east-1\n{service}{channels}"
    )
}

pub(super) async fn register_first_revision(
    env: &Env,
    image: &str,
) -> aws_sdk_ecs::types::TaskDefinition {
    use aws_sdk_ecs::types::{
        Compatibility, ContainerDefinition, KeyValuePair, NetworkMode, PortMapping,
    };
    let ecs = clients::ecs(&env.aws, "us-east-1");
    ecs.register_task_definition()
        .family("api")
        .network_mode(NetworkMode::Awsvpc)
        .requires_compatibilities(Compatibility::Fargate)
        .cpu("256")
        .memory("512")
        .execution_role_arn(format!("arn:aws:iam::{}:role/exec", env.account))
        .container_definitions(
            ContainerDefinition::builder()
                .name("app")
                .image(image)
                .memory(512)
                .essential(true)
                .port_mappings(PortMapping::builder().container_port(8080).build())
                .environment(KeyValuePair::builder().name("MODE").value("prod").build())
                .build(),
        )
        .container_definitions(
            ContainerDefinition::builder()
                .name("proxy")
                .image("public.example/proxy:1")
                .memory(128)
                .essential(false)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .task_definition()
        .unwrap()
        .clone()
}

/// A task definition without what differs between revisions by nature.
fn comparable(mut d: aws_sdk_ecs::types::TaskDefinition) -> String {
    d.task_definition_arn = None;
    d.revision = 0;
    d.registered_at = None;
    d.registered_by = None;
    for c in d.container_definitions.iter_mut().flatten() {
        if c.name.as_deref() == Some("app") {
            c.image = None;
        }
    }
    format!("{d:?}")
}

#[tokio::test]
async fn fargate_task_definitions_pin_the_pushed_digest_once() {
    let Some(env) = Env::new().await else { return };
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let name = format!("publish/api-{}", env.account);
    let image = push_image(&registry, &name).await;
    let first = register_first_revision(&env, &format!("{}:latest", image.repository)).await;
    let recipe = env.recipe(&fargate_recipe(&image.repository, None, false));
    let inputs = inputs("api", 1, &[], vec![image.clone()]);
    let aws = env.bake_aws().await;
    let digests = RegistryDigestCheck::new(&aws, registry_client());

    let report = publisher(&aws, &digests, &recipe, PublishOptions::default())
        .publish(&inputs)
        .await;
    assert_eq!(report.exit_status(), ExitStatus::Success, "{report:#?}");
    let requests = env.capture.take();
    assert_eq!(of(&requests, "RegisterTaskDefinition").len(), 1);

    let ecs = clients::ecs(&env.aws, "us-east-1");
    let latest = ecs
        .describe_task_definition()
        .task_definition("api")
        .include(aws_sdk_ecs::types::TaskDefinitionField::Tags)
        .send()
        .await
        .unwrap();
    let definition = latest.task_definition().unwrap().clone();
    assert_eq!(definition.revision(), 2);
    let app = definition
        .container_definitions()
        .iter()
        .find(|c| c.name() == Some("app"))
        .unwrap();
    assert_eq!(app.image(), Some(image.reference().as_str()));
    assert!(app.image().unwrap().contains("@sha256:"));
    assert_eq!(
        comparable(definition),
        comparable(first),
        "only the image may differ"
    );
    assert!(
        latest
            .tags()
            .iter()
            .any(|t| t.key() == Some("bake:version") && t.value() == Some(version(1).as_str())),
        "the revision is tagged with the bake version: {:?}",
        latest.tags()
    );

    let again = publisher(&aws, &digests, &recipe, PublishOptions::default())
        .publish(&inputs)
        .await;
    assert_eq!(again.exit_status(), ExitStatus::Success, "{again:#?}");
    let requests = env.capture.take();
    assert!(
        mutations(&requests).is_empty(),
        "second publish changed something: {:?}",
        mutations(&requests)
    );
    assert!(!of(&requests, "DescribeTaskDefinition").is_empty());
}

#[tokio::test]
async fn a_digest_missing_from_the_registry_is_refused() {
    let Some(env) = Env::new().await else { return };
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let name = format!("publish/missing-{}", env.account);
    let pushed = push_image(&registry, &name).await;
    register_first_revision(&env, &format!("{}:latest", pushed.repository)).await;
    let absent = ImageRef {
        repository: pushed.repository.clone(),
        digest: format!("sha256:{}", hex::encode(Sha256::digest(b"never pushed"))),
    };
    let recipe = env.recipe(&fargate_recipe(&absent.repository, None, false));
    let aws = env.bake_aws().await;
    let digests = RegistryDigestCheck::new(&aws, registry_client());
    let report = publisher(&aws, &digests, &recipe, PublishOptions::default())
        .publish(&inputs("api", 1, &[], vec![absent.clone()]))
        .await;
    assert_ne!(report.exit_status(), ExitStatus::Success);
    let error = report.regions[0].error.as_ref().unwrap();
    assert!(
        error.message.contains(&absent.reference())
            && error.message.contains("not in its registry"),
        "{}",
        error.message
    );
    assert!(mutations(&env.capture.take()).is_empty());
    // The real check also says yes to what is there.
    assert!(digests.exists(&pushed).await.unwrap());
}

fn refusal(report: &bake::publish::PublishReport) -> String {
    assert_eq!(report.regions.len(), 1, "{report:#?}");
    assert_eq!(report.regions[0].status, Status::Failed, "{report:#?}");
    assert!(report.regions[0].changes.is_empty(), "{report:#?}");
    let e = report.regions[0].error.as_ref().unwrap();
    format!(
        "{} | hint: {}",
        e.message,
        e.hint.clone().unwrap_or_default()
    )
}

#[tokio::test]
async fn refusals_are_clear_and_change_nothing() {
    let Some(env) = Env::new().await else { return };
    let region = "us-east-1";
    let old = env.ami(region, "web-old").await;
    let good = env.ami(region, "web-good").await;
    let id = env.launch_template(region, "web", &old).await;
    let aws = env.bake_aws().await;
    let publish = "  launch_templates:\n    - name: web\n      set_default: true\n  ssm_parameters:\n    - name: /web/ami\n";
    let recipe = env.recipe(&ami_recipe(&[region], &[], publish));
    let run = |recipe: bake::recipe::Recipe, inputs: PublishInputs, clobber: bool| {
        let aws = &aws;
        async move {
            let options = PublishOptions {
                allow_clobber: clobber,
                ..Default::default()
            };
            publisher(aws, &NoImages, &recipe, options)
                .publish(&inputs)
                .await
        }
    };

    // An AMI that is gone (deregistered).
    let gone = env.ami(region, "web-gone").await;
    env.aws
        .ec2(region)
        .deregister_image()
        .image_id(&gone)
        .send()
        .await
        .unwrap();
    let message = refusal(
        &run(
            recipe.clone(),
            inputs("web", 1, &[(region, &gone)], vec![]),
            false,
        )
        .await,
    );
    assert!(
        message.contains(&gone) && message.contains(region),
        "{message}"
    );
    assert!(mutations(&env.capture.take()).is_empty());

    // An AMI the recipe's sharing account cannot launch.
    let shared = env.recipe(&ami_recipe(&[region], &["111122223333"], publish));
    let message = refusal(
        &run(
            shared.clone(),
            inputs("web", 1, &[(region, &good)], vec![]),
            false,
        )
        .await,
    );
    assert!(
        message.contains("not launchable by account 111122223333") && message.contains(&good),
        "{message}"
    );
    assert!(mutations(&env.capture.take()).is_empty());
    // Once shared, the same publish goes through.
    env.aws
        .ec2(region)
        .modify_image_attribute()
        .image_id(&good)
        .launch_permission(
            LaunchPermissionModifications::builder()
                .add(LaunchPermission::builder().user_id("111122223333").build())
                .build(),
        )
        .send()
        .await
        .unwrap();

    // An SSM parameter someone else owns.
    clients::ssm(&env.aws, region)
        .put_parameter()
        .name("/web/ami")
        .value(&old)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .unwrap();
    let message = refusal(
        &run(
            shared.clone(),
            inputs("web", 1, &[(region, &good)], vec![]),
            false,
        )
        .await,
    );
    assert!(
        message.contains("/web/ami")
            && message.contains("not owned by bake")
            && message.contains("--allow-clobber"),
        "{message}"
    );
    assert!(mutations(&env.capture.take()).is_empty());
    assert_eq!(env.parameter(region, "/web/ami").await, Some(old.clone()));
    assert_eq!(env.template_versions(region, &id).await, 1);

    // With --allow-clobber it is taken over (and owned from then on).
    let report = run(
        shared.clone(),
        inputs("web", 1, &[(region, &good)], vec![]),
        true,
    )
    .await;
    assert_eq!(report.exit_status(), ExitStatus::Success, "{report:#?}");
    assert_eq!(env.parameter(region, "/web/ami").await, Some(good.clone()));
    env.capture.take();
    let report = run(shared, inputs("web", 2, &[(region, &good)], vec![]), false).await;
    assert_eq!(report.exit_status(), ExitStatus::Success, "{report:#?}");
    env.capture.take();

    // A launch template that does not exist: the parameter in the same region is not written.
    let missing = env.recipe(&ami_recipe(
        &[region],
        &[],
        "  launch_templates:\n    - name: nope\n  ssm_parameters:\n    - name: /web/other\n",
    ));
    let message = refusal(&run(missing, inputs("web", 1, &[(region, &good)], vec![]), false).await);
    assert!(
        message.contains("launch template `nope` does not exist in us-east-1")
            && message.contains("create the launch template first"),
        "{message}"
    );
    assert!(mutations(&env.capture.take()).is_empty());
    assert_eq!(env.parameter(region, "/web/other").await, None);
}

#[tokio::test]
async fn instance_refresh_is_requested_after_a_default_change() {
    let Some(env) = Env::new().await else { return };
    let region = "us-east-1";
    let old = env.ami(region, "web-old").await;
    let new = env.ami(region, "web-new").await;
    let id = env.launch_template(region, "web", &old).await;
    let recipe = env.recipe(&ami_recipe(
        &[region],
        &[],
        "  launch_templates:\n    - name: web\n      set_default: true\n      instance_refresh:\n        auto_scaling_group: web-asg\n        min_healthy_percentage: 75\n",
    ));
    let aws = env.bake_aws().await;
    let report = publisher(&aws, &NoImages, &recipe, PublishOptions::default())
        .publish(&inputs("web", 1, &[(region, &new)], vec![]))
        .await;
    let requests = env.capture.take();
    let refresh = of(&requests, "StartInstanceRefresh");
    assert_eq!(refresh.len(), 1, "{:?}", mutations(&requests));
    let body = &refresh[0].body;
    assert!(
        body.contains("AutoScalingGroupName=web-asg")
            && body.contains("Preferences.MinHealthyPercentage=75")
            && body.contains("Preferences.SkipMatching=true"),
        "{body}"
    );
    // moto has no instance refresh: the failure is reported clearly, after the default moved.
    assert_eq!(env.template_default(region, &id).await, (2, Some(new)));
    let error = report.regions[0]
        .error
        .as_ref()
        .expect("moto refuses the refresh");
    assert!(
        error
            .message
            .contains("StartInstanceRefresh for Auto Scaling group `web-asg`")
            && error.causes.iter().any(|c| c.contains("HTTP 500")),
        "{error:?}"
    );
}

#[tokio::test]
async fn one_failing_region_of_three_is_a_partial_publish() {
    let Some(env) = Env::new().await else { return };
    let regions = ["us-east-1", "us-west-2", "eu-west-1"];
    let mut amis = Vec::new();
    let mut templates = Vec::new();
    for region in regions {
        let old = env.ami(region, "web-old").await;
        let new = env.ami(region, "web-new").await;
        // No template in us-west-2.
        if region != "us-west-2" {
            templates.push((region, env.launch_template(region, "web", &old).await));
        }
        amis.push(format!("\"{region}\": \"{new}\""));
    }
    let recipe = env.write(
        "recipe.yaml",
        &ami_recipe(&regions, &[], "  launch_templates:\n    - name: web\n"),
    );
    let inputs = env.write(
        "inputs.json",
        &format!(
            r#"{{"recipe": "web", "version": "{}", "amis": {{{}}}}}"#,
            version(1),
            amis.join(", ")
        ),
    );
    let output = env.bake(&[
        "publish",
        recipe.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--output",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(i32::from(ExitStatus::PartialPublish.code())),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains("us-west-2") && stderr.contains("launch template `web` does not exist"),
        "{stderr}"
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let statuses: Vec<(String, String)> = report["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["region"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        [
            ("eu-west-1".into(), "done".into()),
            ("us-east-1".into(), "done".into()),
            ("us-west-2".into(), "failed".into())
        ]
    );
    for (region, id) in templates {
        assert_eq!(env.template_versions(region, &id).await, 2, "{region}");
    }
}

pub(super) fn pin(env: &Env, recipe: &Path) -> serde_json::Value {
    let output = env.bake(&[
        "pin",
        recipe.to_str().unwrap(),
        "--channel",
        "prod",
        "--output",
        "json",
    ]);
    assert!(
        output.status.success(),
        "pin failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

pub(super) fn ok(output: std::process::Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed ({:?}): {}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
}

#[tokio::test]
async fn promote_pin_promote_rollback_pin_from_fresh_stores() {
    let Some(env) = Env::new().await else { return };
    let region = "us-east-1";
    let old = env.ami(region, "web-old").await;
    let v1 = env.ami(region, "web-v1").await;
    let v2 = env.ami(region, "web-v2").await;
    let id = env.launch_template(region, "web", &old).await;
    let recipe = env.write(
        "recipe.yaml",
        &ami_recipe(
            &[region],
            &[],
            "  launch_templates:\n    - name: web\n  ssm_parameters:\n    - name: /web/prod/ami\n  channels: [prod, staging]\n",
        ),
    );
    let recipe_arg = recipe.to_str().unwrap();
    for (n, ami) in [(1, &v1), (2, &v2)] {
        let inputs = env.write(
            &format!("inputs-{n}.json"),
            &format!(
                r#"{{"recipe": "web", "version": "{}", "amis": {{"{region}": "{ami}"}}}}"#,
                version(n)
            ),
        );
        ok(
            env.bake(&["publish", recipe_arg, "--inputs", inputs.to_str().unwrap()]),
            "publish",
        );
    }
    // With channels, publishing moves no pointer: the default and the parameter wait.
    assert_eq!(env.template_default(region, &id).await, (1, Some(old)));
    assert_eq!(env.parameter(region, "/web/prod/ami").await, None);

    // Promoting a version that was never published is refused.
    let never = env.bake(&["promote", recipe_arg, &version(9), "--channel", "prod"]);
    assert!(!never.status.success());
    assert!(String::from_utf8_lossy(&never.stderr).contains("has not been published"));

    ok(
        env.bake(&[
            "promote",
            recipe_arg,
            &version(1)[7..19],
            "--channel",
            "prod",
        ]),
        "promote v1",
    );
    let first = pin(&env, &recipe);
    assert_eq!(first["references"]["version"], version(1));
    assert_eq!(first["references"]["amis"][region], v1.as_str());
    assert_eq!(
        env.parameter(region, "/web/prod/ami").await,
        Some(v1.clone())
    );
    let (default, ami) = env.template_default(region, &id).await;
    assert_eq!(ami, Some(v1.clone()));
    assert_eq!(
        first["references"]["launch_templates"][0]["version"],
        serde_json::json!(default)
    );

    ok(
        env.bake(&["promote", recipe_arg, &version(2), "--channel", "prod"]),
        "promote v2",
    );
    assert_eq!(
        pin(&env, &recipe)["references"]["amis"][region],
        v2.as_str()
    );
    assert_eq!(
        env.parameter(region, "/web/prod/ami").await,
        Some(v2.clone())
    );
    assert_eq!(env.template_default(region, &id).await.1, Some(v2.clone()));

    ok(
        env.bake(&["rollback", recipe_arg, "--channel", "prod"]),
        "rollback",
    );
    let label = format!("/web/prod/ami:bake-{}", &version(1)[7..19]);
    assert_eq!(env.parameter(region, &label).await, Some(v1.clone()));
    let back = pin(&env, &recipe);
    assert_eq!(back["references"], first["references"]);
    assert_eq!(
        env.parameter(region, "/web/prod/ami").await,
        Some(v1.clone())
    );
    assert_eq!(env.template_default(region, &id).await, (default, Some(v1)));

    // Nothing earlier to roll back to, and an undeclared channel: clear refusals.
    let output = env.bake(&["rollback", recipe_arg, "--channel", "prod"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no earlier version"));
    let output = env.bake(&["pin", recipe_arg, "--channel", "qa"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not in publish.channels"));
}

#[tokio::test]
async fn promote_moves_an_ecs_service_and_rollback_moves_it_back() {
    let Some(env) = Env::new().await else { return };
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let name = format!("publish/svc-{}", env.account);
    let one = push_image(&registry, &name).await;
    let two = push_image(&registry, &name).await;
    let first = register_first_revision(&env, &format!("{}:latest", one.repository)).await;
    let ecs = clients::ecs(&env.aws, "us-east-1");
    ecs.create_cluster()
        .cluster_name("apps")
        .send()
        .await
        .unwrap();
    let ec2 = env.aws.ec2("us-east-1");
    let subnet = ec2.describe_subnets().send().await.unwrap().subnets()[0]
        .subnet_id()
        .unwrap()
        .to_owned();
    let group = ec2
        .describe_security_groups()
        .send()
        .await
        .unwrap()
        .security_groups()[0]
        .group_id()
        .unwrap()
        .to_owned();
    ecs.create_service()
        .cluster("apps")
        .service_name("api")
        .task_definition(first.task_definition_arn().unwrap())
        .desired_count(1)
        .launch_type(aws_sdk_ecs::types::LaunchType::Fargate)
        .network_configuration(
            aws_sdk_ecs::types::NetworkConfiguration::builder()
                .awsvpc_configuration(
                    aws_sdk_ecs::types::AwsVpcConfiguration::builder()
                        .subnets(subnet)
                        .security_groups(group)
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let recipe = env.write(
        "recipe.yaml",
        &fargate_recipe(&one.repository, Some(("apps", "api")), true),
    );
    let recipe_arg = recipe.to_str().unwrap();
    for (n, image) in [(1, &one), (2, &two)] {
        let inputs = env.write(
            &format!("inputs-{n}.json"),
            &format!(
                r#"{{"recipe": "api", "version": "{}", "images": [{{"repository": "{}", "digest": "{}"}}]}}"#,
                version(n),
                image.repository,
                image.digest
            ),
        );
        ok(
            env.bake(&["publish", recipe_arg, "--inputs", inputs.to_str().unwrap()]),
            "publish",
        );
    }
    let service_task = || async {
        clients::ecs(&env.aws, "us-east-1")
            .describe_services()
            .cluster("apps")
            .services("api")
            .send()
            .await
            .unwrap()
            .services()[0]
            .task_definition()
            .unwrap()
            .to_owned()
    };
    assert_eq!(service_task().await, first.task_definition_arn().unwrap());
    ok(
        env.bake(&["promote", recipe_arg, &version(1), "--channel", "prod"]),
        "promote v1",
    );
    let pinned = pin(&env, &recipe);
    let v1_arn = pinned["references"]["task_definitions"][0]["arn"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(pinned["references"]["images"][0], one.reference().as_str());
    assert_eq!(service_task().await, v1_arn);
    ok(
        env.bake(&["promote", recipe_arg, &version(2), "--channel", "prod"]),
        "promote v2",
    );
    assert_ne!(service_task().await, v1_arn);
    ok(
        env.bake(&["rollback", recipe_arg, "--channel", "prod"]),
        "rollback",
    );
    assert_eq!(service_task().await, v1_arn);
    assert_eq!(pin(&env, &recipe)["references"], pinned["references"]);
}

#[test]
fn publish_without_inputs_or_a_build_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("recipe.yaml");
    fs_err::write(
        &recipe,
        ami_recipe(
            &["us-east-1"],
            &[],
            "  launch_templates:\n    - name: web\n",
        ),
    )
    .unwrap();
    let store = dir.path().join("store");
    let output = bake()
        .args([
            "publish",
            recipe.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not built in the store") && stderr.contains("--inputs"),
        "{stderr}"
    );
}

#[tokio::test]
async fn digests_are_checked_with_the_registry_credentials() {
    let Some(env) = Env::new().await else { return };
    let Some(registry) = service("BAKE_TEST_REGISTRY_AUTH") else {
        return;
    };
    let user = service("BAKE_TEST_REGISTRY_USER").unwrap_or_default();
    let password = service("BAKE_TEST_REGISTRY_PASSWORD").unwrap_or_default();
    let pushed = push_image_as(&registry, "publish/private", Some((&user, &password))).await;
    let absent = ImageRef {
        repository: pushed.repository.clone(),
        digest: format!("sha256:{}", hex::encode(Sha256::digest(b"absent"))),
    };
    let credentials = bake::registry::auth::StaticCredentials::one(
        &registry,
        bake::registry::Credential::new(&user, &password),
    );
    let client = bake::registry::Client::new(
        bake::registry::ClientOptions::default(),
        Arc::new(credentials),
    )
    .unwrap();
    let digests = RegistryDigestCheck::new(&env.aws, client);
    assert!(digests.exists(&pushed).await.unwrap());
    assert!(!digests.exists(&absent).await.unwrap());
    // Without credentials the check fails, and says which image it was about.
    let anonymous = RegistryDigestCheck::new(&env.aws, registry_client());
    let error = anonymous.exists(&pushed).await.unwrap_err();
    assert!(error.to_string().contains(&pushed.reference()), "{error}");
}

#[tokio::test]
async fn dry_run_on_the_command_line_shows_current_and_wanted() {
    let Some(env) = Env::new().await else { return };
    let region = "us-east-1";
    let old = env.ami(region, "web-old").await;
    let new = env.ami(region, "web-new").await;
    let id = env.launch_template(region, "web", &old).await;
    let recipe = env.write(
        "recipe.yaml",
        &ami_recipe(
            &[region],
            &[],
            "  launch_templates:\n    - name: web\n  ssm_parameters:\n    - name: /web/ami\n",
        ),
    );
    let inputs = env.write(
        "inputs.json",
        &format!(
            r#"{{"recipe": "web", "version": "{}", "amis": {{"{region}": "{new}"}}}}"#,
            version(1)
        ),
    );
    let output = env.bake(&[
        "publish",
        recipe.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
        "--dry-run",
        "--set-default",
    ]);
    ok(output.clone(), "dry run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("us-east-1  plan (dry run)"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "~ launch_template_default web ({id}): version 1 ({old}) -> the new version"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("+ ssm_parameter /web/ami: (none) -> {new}")),
        "{stdout}"
    );
    assert_eq!(env.template_versions(region, &id).await, 1);
    assert_eq!(env.parameter(region, "/web/ami").await, None);
}

#[tokio::test]
async fn publish_takes_the_artifacts_from_the_build_record() {
    let Some(env) = Env::new().await else { return };
    let region = "us-east-1";
    let old = env.ami(region, "web-old").await;
    let new = env.ami(region, "web-new").await;
    let id = env.launch_template(region, "web", &old).await;
    let recipe = env.write(
        "recipe.yaml",
        &ami_recipe(
            &[region],
            &[],
            "  launch_templates:\n    - name: web\n      set_default: true\n",
        ),
    );
    let recipe_arg = recipe.to_str().unwrap();
    let store = env.dir.path().join("store");
    let plan = env.bake_in(&store, &["plan", recipe_arg, "--output", "json"]);
    ok(plan.clone(), "plan");
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let version = plan["version"].as_str().unwrap().to_owned();
    // The AMI stage's record of what it made (as `bake build` of the snapshot strategy writes it).
    let record = bake::store::BuildRecord::new(
        "web",
        &version.parse().unwrap(),
        recipe_arg,
        &serde_json::from_value(plan["inputs"].clone()).unwrap(),
        bake::store::Artifact::DiskAmi {
            ami: bake::store::DiskAmi {
                disk_image_digest: None,
                regions: vec![bake::ami::RegionImage {
                    region: region.into(),
                    image_id: new.clone(),
                    snapshot_id: "snap-0123456789abcdef0".into(),
                }],
                boots: vec![],
                upload: None,
            },
        },
    );
    bake::store::Store::open(&store)
        .unwrap()
        .put_record(&record)
        .unwrap();
    // `bake plan --publish` shows each pointer's current and wanted value, and changes nothing.
    let planned = env.bake_in(
        &store,
        &["plan", recipe_arg, "--publish", "--output", "json"],
    );
    ok(planned.clone(), "plan --publish");
    let planned: serde_json::Value = serde_json::from_slice(&planned.stdout).unwrap();
    assert_eq!(planned["plan"]["version"], version.as_str());
    assert_eq!(planned["publish"]["dry_run"], true);
    let changes = planned["publish"]["regions"][0]["changes"].to_string();
    assert!(
        changes.contains(&old) && changes.contains(&new),
        "{changes}"
    );
    assert_eq!(env.template_versions(region, &id).await, 1);
    let output = env.bake_in(&store, &["publish", recipe_arg, "--output", "json"]);
    ok(output.clone(), "publish from the record");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["version"], version.as_str());
    assert_eq!(env.template_default(region, &id).await, (2, Some(new)));
}

#[tokio::test]
async fn a_family_without_revisions_starts_from_the_recipes_template() {
    let Some(env) = Env::new().await else { return };
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let name = format!("publish/tpl-{}", env.account);
    let image = push_image(&registry, &name).await;
    env.write(
        "task.json",
        r#"{
  "family": "api",
  "cpu": "256",
  "memory": "512",
  "networkMode": "awsvpc",
  "requiresCompatibilities": ["FARGATE"],
  "containerDefinitions": [
    {"name": "app", "image": "placeholder", "memory": 512, "essential": true,
     "portMappings": [{"containerPort": 8080, "protocol": "tcp"}],
     "environment": [{"name": "MODE", "value": "prod"}]}
  ]
}"#,
    );
    let text = fargate_recipe(&image.repository, None, false) + "      template: task.json\n";
    let recipe = env.recipe(&text);
    let aws = env.bake_aws().await;
    let digests = RegistryDigestCheck::new(&aws, registry_client());
    let inputs = inputs("api", 1, &[], vec![image.clone()]);
    let report = publisher(&aws, &digests, &recipe, PublishOptions::default())
        .publish(&inputs)
        .await;
    assert_eq!(report.exit_status(), ExitStatus::Success, "{report:#?}");
    let definition = clients::ecs(&env.aws, "us-east-1")
        .describe_task_definition()
        .task_definition("api")
        .send()
        .await
        .unwrap()
        .task_definition()
        .unwrap()
        .clone();
    assert_eq!(definition.revision(), 1);
    assert_eq!(definition.cpu(), Some("256"));
    let app = &definition.container_definitions()[0];
    assert_eq!(app.image(), Some(image.reference().as_str()));
    assert_eq!(app.port_mappings()[0].container_port(), Some(8080));
    assert_eq!(app.environment()[0].value(), Some("prod"));
    env.capture.take();
    let again = publisher(&aws, &digests, &recipe, PublishOptions::default())
        .publish(&inputs)
        .await;
    assert_eq!(again.exit_status(), ExitStatus::Success, "{again:#?}");
    assert!(mutations(&env.capture.take()).is_empty());

    // A template with a field bake does not know is refused, not half-used.
    env.write(
        "task.json",
        r#"{"containerDefinitions": [{"name": "app", "secrets": []}]}"#,
    );
    let text = fargate_recipe(&image.repository, None, false)
        .replace("family: api", "family: api2")
        + "      template: task.json\n";
    let recipe = env.recipe(&text);
    let report = publisher(&aws, &digests, &recipe, PublishOptions::default())
        .publish(&inputs)
        .await;
    let error = report.regions[0]
        .error
        .as_ref()
        .expect("the template is refused");
    assert!(
        error.message.contains("task definition template")
            && error.causes.iter().any(|c| c.contains("secrets")),
        "{error:?}"
    );
    assert!(mutations(&env.capture.take()).is_empty());
}
