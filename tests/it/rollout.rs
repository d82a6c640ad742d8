//! `bake rollout` through the binary, against the Auto Scaling/ECS stand-in in front of moto
//! (tests/tools/asg_ecs_standin.py): moto has no instance refresh, no deployment circuit
//! breaker and no alarm-driven rollback, so the stand-in serves those and forwards the rest.
//! The refreshes' and deployments' state is read back through the stand-in's AWS APIs; groups,
//! launch templates, services and channels from moto (through the same endpoint).

use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_autoscaling::types::LaunchTemplateSpecification;
use bake::publish::clients;

use super::common::service;
use super::publish::{
    Env, ami_recipe, fargate_recipe, ok, pin, push_image, register_first_revision, version,
};

const REGION: &str = "us-east-1";
/// How long a test waits for the stand-in to reach a state (it moves every 0.5 s).
const PATIENCE: Duration = Duration::from_secs(90);

async fn env() -> Option<Env> {
    Env::at("BAKE_TEST_ASG_ECS_ENDPOINT").await
}

/// An Auto Scaling group of `size` instances on launch template version `version`.
async fn group(env: &Env, name: &str, template_id: &str, version: &str, size: i32) {
    clients::autoscaling(&env.aws, REGION)
        .create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .launch_template(
            LaunchTemplateSpecification::builder()
                .launch_template_id(template_id)
                .version(version)
                .build(),
        )
        .min_size(size)
        .max_size(size * 2)
        .desired_capacity(size)
        .availability_zones(format!("{REGION}a"))
        .send()
        .await
        .unwrap();
}

/// The launch template version the group runs.
async fn group_version(env: &Env, name: &str) -> String {
    let out = clients::autoscaling(&env.aws, REGION)
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(name)
        .send()
        .await
        .unwrap();
    out.auto_scaling_groups()[0]
        .launch_template()
        .and_then(|t| t.version())
        .unwrap()
        .to_owned()
}

/// One CloudWatch (query protocol) call to moto, through the stand-in's endpoint: bake itself
/// has no CloudWatch client (AWS watches the alarms; bake reads the verdict from the refresh
/// or deployment), so the test speaks the protocol. moto reads the service and region from the
/// credential scope and the account from `x-moto-account-id`; it does not check signatures.
async fn cloudwatch(env: &Env, action: &str, parameters: &[(&str, &str)]) {
    let mut form = vec![("Action", action), ("Version", "2010-08-01")];
    form.extend_from_slice(parameters);
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(' ', "%20")))
        .collect::<Vec<_>>()
        .join("&");
    let response = reqwest::Client::new()
        .post(format!("{}/", env.endpoint))
        .header(
            "authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/monitoring/aws4_request, SignedHeaders=host, Signature=0"
            ),
        )
        .header("x-moto-account-id", &env.account)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "CloudWatch {action}: {status} {text}");
}

/// A CloudWatch alarm in state OK.
async fn alarm(env: &Env, name: &str) {
    cloudwatch(
        env,
        "PutMetricAlarm",
        &[
            ("AlarmName", name),
            ("Namespace", "AWS/ApplicationELB"),
            ("MetricName", "HTTPCode_Target_5XX_Count"),
            ("Statistic", "Sum"),
            ("Period", "60"),
            ("EvaluationPeriods", "1"),
            ("Threshold", "10"),
            ("ComparisonOperator", "GreaterThanThreshold"),
        ],
    )
    .await;
    set_alarm(env, name, "OK").await;
}

async fn set_alarm(env: &Env, name: &str, state: &str) {
    cloudwatch(
        env,
        "SetAlarmState",
        &[
            ("AlarmName", name),
            ("StateValue", state),
            ("StateReason", "set by the test"),
        ],
    )
    .await;
}

/// The group's refreshes, newest first.
async fn refreshes(env: &Env, name: &str) -> Vec<aws_sdk_autoscaling::types::InstanceRefresh> {
    clients::autoscaling(&env.aws, REGION)
        .describe_instance_refreshes()
        .auto_scaling_group_name(name)
        .send()
        .await
        .unwrap()
        .instance_refreshes()
        .to_vec()
}

/// Waits until the group's newest refresh has paused at `checkpoint`%.
async fn wait_for_checkpoint(env: &Env, name: &str, checkpoint: u8, bake: &mut Child) {
    let wanted = format!("Checkpoint {checkpoint}% reached");
    let start = Instant::now();
    loop {
        let found = refreshes(env, name).await;
        if found
            .first()
            .and_then(|r| r.status_reason())
            .is_some_and(|r| r.contains(&wanted))
        {
            return;
        }
        if let Some(status) = bake.try_wait().unwrap() {
            panic!("bake ended ({status}) before the refresh reached checkpoint {checkpoint}%");
        }
        assert!(
            start.elapsed() < PATIENCE,
            "the refresh never reached checkpoint {checkpoint}%: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for a background bake and collects its output; kills it (by its PID, which this test
/// started) if it does not end in time.
fn finish(mut child: Child) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > PATIENCE {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "bake rollout did not end in {PATIENCE:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

fn spawn(env: &Env, store: &Path, args: &[&str]) -> Child {
    env.command(store, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bake")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A recipe whose AMI goes to launch template `web` and whose `prod` channel rolls out to
/// group `web-asg` with `rollout` (YAML lines under `prod:`).
fn web_recipe(rollout: &str) -> String {
    ami_recipe(
        &[REGION],
        &[],
        &format!(
            "  launch_templates:\n    - name: web\n  channels: [prod]\n  rollouts:\n    prod:\n{rollout}      auto_scaling_groups:\n        - name: web-asg\n"
        ),
    )
}

/// A launch template, a group of four on its version 1, an alarm, and versions 1 and 2
/// published (1 promoted to `prod`). Returns the recipe path and the template id.
async fn web_fleet(env: &Env, rollout: &str) -> (std::path::PathBuf, String) {
    let old = env.ami(REGION, "web-old").await;
    let template = env.launch_template(REGION, "web", &old).await;
    group(env, "web-asg", &template, "1", 4).await;
    alarm(env, "web-5xx").await;
    let recipe = env.write("recipe.yaml", &web_recipe(rollout));
    let recipe_arg = recipe.to_str().unwrap();
    for n in [1, 2] {
        let ami = env.ami(REGION, &format!("web-v{n}")).await;
        let inputs = env.write(
            &format!("inputs-{n}.json"),
            &format!(
                r#"{{"recipe": "web", "version": "{}", "amis": {{"{REGION}": "{ami}"}}}}"#,
                version(n)
            ),
        );
        ok(
            env.bake(&["publish", recipe_arg, "--inputs", inputs.to_str().unwrap()]),
            "publish",
        );
    }
    ok(
        env.bake(&["promote", recipe_arg, &version(1), "--channel", "prod"]),
        "promote v1",
    );
    (recipe, template)
}

/// The launch template version a channel's current release made.
fn pinned_template_version(env: &Env, recipe: &Path) -> (String, i64) {
    let pinned = pin(env, recipe);
    (
        pinned["references"]["version"].as_str().unwrap().to_owned(),
        pinned["references"]["launch_templates"][0]["version"]
            .as_i64()
            .unwrap(),
    )
}

fn manifest_rollouts(env: &Env, store: &Path, n: u8) -> Vec<serde_json::Value> {
    let output = env.bake_in(
        store,
        &["manifest", "show", &version(n), "--output", "json"],
    );
    assert!(output.status.success(), "{}", text(&output.stderr));
    let manifest: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    manifest["publications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["kind"] == "rollout")
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_canary_rollout_passes_its_checkpoints_and_ends_on_the_new_version() {
    let Some(env) = env().await else { return };
    let (recipe, _) = web_fleet(
        &env,
        "      strategy: canary\n      checkpoints: [25, 50, 100]\n      checkpoint_delay: 1s\n      alarms: [web-5xx]\n      timeout: 2m\n",
    )
    .await;
    let recipe_arg = recipe.to_str().unwrap();
    let (_, v1_template) = pinned_template_version(&env, &recipe);
    let store = tempfile::tempdir().unwrap();
    let output = env.bake_in(
        store.path(),
        &[
            "rollout",
            recipe_arg,
            &version(2),
            "--channel",
            "prod",
            "--poll-interval",
            "200ms",
        ],
    );
    let stderr = text(&output.stderr);
    ok(output, "rollout v2");

    let (pinned, v2_template) = pinned_template_version(&env, &recipe);
    assert_eq!(pinned, version(2));
    assert_ne!(v2_template, v1_template);
    // The refresh went to the release's numbered version, with its checkpoints, the alarm and
    // AWS's automatic rollback, and the group now runs that version.
    let refresh = &refreshes(&env, "web-asg").await[0];
    assert_eq!(refresh.status().unwrap().as_str(), "Successful");
    let desired = refresh
        .desired_configuration()
        .and_then(|d| d.launch_template())
        .unwrap();
    assert_eq!(desired.version(), Some(v2_template.to_string().as_str()));
    let preferences = refresh.preferences().unwrap();
    assert_eq!(preferences.checkpoint_percentages(), [25, 50, 100]);
    assert_eq!(preferences.auto_rollback(), Some(true));
    assert_eq!(
        preferences.alarm_specification().unwrap().alarms(),
        ["web-5xx"]
    );
    assert_eq!(
        group_version(&env, "web-asg").await,
        v2_template.to_string()
    );
    // Progress showed both pauses.
    for checkpoint in ["Checkpoint 25% reached", "Checkpoint 50% reached"] {
        assert!(stderr.contains(checkpoint), "{checkpoint}: {stderr}");
    }

    let recorded = manifest_rollouts(&env, store.path(), 2);
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["channel"], "prod");
    assert_eq!(recorded[0]["outcome"], "succeeded");
    assert_eq!(
        recorded[0]["targets"][0]["target"],
        "group web-asg (us-east-1)"
    );
    assert_eq!(recorded[0]["targets"][0]["phase"], "succeeded");
}

#[tokio::test]
async fn promote_with_rollout_replaces_the_machines_as_rollout_does() {
    let Some(env) = env().await else { return };
    let (recipe, _) = web_fleet(
        &env,
        "      strategy: rolling\n      min_healthy_percentage: 90\n      timeout: 2m\n",
    )
    .await;
    let recipe_arg = recipe.to_str().unwrap();
    let (_, v1_template) = pinned_template_version(&env, &recipe);
    let store = tempfile::tempdir().unwrap();
    // `--on-interrupt` and `--poll-interval` belong to `--rollout`; alone they are refused.
    let refused = env.bake_in(
        store.path(),
        &[
            "promote",
            recipe_arg,
            &version(2),
            "--channel",
            "prod",
            "--poll-interval",
            "1s",
        ],
    );
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    let output = env.bake_in(
        store.path(),
        &[
            "promote",
            recipe_arg,
            &version(2),
            "--channel",
            "prod",
            "--rollout",
            "--poll-interval",
            "200ms",
        ],
    );
    ok(output, "promote --rollout v2");

    let (pinned, v2_template) = pinned_template_version(&env, &recipe);
    assert_eq!(pinned, version(2));
    assert_ne!(v2_template, v1_template);
    let refresh = &refreshes(&env, "web-asg").await[0];
    assert_eq!(refresh.status().unwrap().as_str(), "Successful");
    assert_eq!(
        refresh.preferences().unwrap().min_healthy_percentage(),
        Some(90)
    );
    assert_eq!(
        group_version(&env, "web-asg").await,
        v2_template.to_string()
    );
    let recorded = manifest_rollouts(&env, store.path(), 2);
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["outcome"], "succeeded");
}

#[tokio::test]
async fn an_alarm_at_the_first_checkpoint_rolls_back_and_moves_the_channel_back() {
    let Some(env) = env().await else { return };
    let (recipe, template) = web_fleet(
        &env,
        "      strategy: canary\n      checkpoints: [25, 100]\n      checkpoint_delay: 5m\n      alarms: [web-5xx]\n      timeout: 10m\n",
    )
    .await;
    let recipe_arg = recipe.to_str().unwrap();
    let (_, v1_template) = pinned_template_version(&env, &recipe);
    let store = tempfile::tempdir().unwrap();
    let mut bake = spawn(
        &env,
        store.path(),
        &[
            "rollout",
            recipe_arg,
            &version(2),
            "--channel",
            "prod",
            "--poll-interval",
            "200ms",
        ],
    );
    wait_for_checkpoint(&env, "web-asg", 25, &mut bake).await;
    set_alarm(&env, "web-5xx", "ALARM").await;
    let output = finish(bake);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("the rollout failed and was rolled back")
            && stderr.contains("The alarm web-5xx is in ALARM state"),
        "{stderr}"
    );

    // AWS rolled the refresh back; the group never left version 1.
    let refresh = &refreshes(&env, "web-asg").await[0];
    assert_eq!(refresh.status().unwrap().as_str(), "RollbackSuccessful");
    assert_eq!(group_version(&env, "web-asg").await, "1");
    // The channel and the launch template's default are back on version 1's.
    let (pinned, pinned_template) = pinned_template_version(&env, &recipe);
    assert_eq!(pinned, version(1));
    assert_eq!(pinned_template, v1_template);
    assert_eq!(env.template_default(REGION, &template).await.0, v1_template);

    let recorded = manifest_rollouts(&env, store.path(), 2);
    assert_eq!(recorded[0]["outcome"], "rolled_back");
    assert!(
        recorded[0]["reason"].as_str().unwrap().contains("web-5xx"),
        "{recorded:?}"
    );
}

/// Starts a canary rollout of version 2, waits for its first pause, and sends bake SIGINT.
async fn interrupted(env: &Env, choice: &str) -> (Output, std::path::PathBuf) {
    let (recipe, _) = web_fleet(
        env,
        "      strategy: canary\n      checkpoints: [25, 100]\n      checkpoint_delay: 5m\n      timeout: 10m\n",
    )
    .await;
    let store = tempfile::tempdir().unwrap();
    let mut bake = spawn(
        env,
        store.path(),
        &[
            "rollout",
            recipe.to_str().unwrap(),
            &version(2),
            "--channel",
            "prod",
            "--poll-interval",
            "200ms",
            "--on-interrupt",
            choice,
        ],
    );
    wait_for_checkpoint(env, "web-asg", 25, &mut bake).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(bake.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    (finish(bake), recipe)
}

#[tokio::test]
async fn ctrl_c_with_cancel_rolls_the_refresh_and_the_channel_back() {
    let Some(env) = env().await else { return };
    let (output, recipe) = interrupted(&env, "cancel").await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    let refresh = &refreshes(&env, "web-asg").await[0];
    assert_eq!(refresh.status().unwrap().as_str(), "RollbackSuccessful");
    assert_eq!(group_version(&env, "web-asg").await, "1");
    assert_eq!(pinned_template_version(&env, &recipe).0, version(1));
}

#[tokio::test]
async fn ctrl_c_with_leave_lets_the_refresh_go_on_and_keeps_the_channel() {
    let Some(env) = env().await else { return };
    let (output, recipe) = interrupted(&env, "leave").await;
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("the rollout continues in AWS"), "{stderr}");
    let refresh = &refreshes(&env, "web-asg").await[0];
    assert_eq!(
        refresh.status().unwrap().as_str(),
        "InProgress",
        "{refresh:?}"
    );
    assert_eq!(pinned_template_version(&env, &recipe).0, version(2));
}

/// The service `apps/api` on `revision`'s task definition, one task, with its own subnet and
/// security group (moto needs both).
async fn api_service(env: &Env, task_definition: &str) {
    let ecs = clients::ecs(&env.aws, REGION);
    ecs.create_cluster()
        .cluster_name("apps")
        .send()
        .await
        .unwrap();
    let ec2 = env.aws.ec2(REGION);
    let subnet = ec2.describe_subnets().send().await.unwrap().subnets()[0]
        .subnet_id()
        .unwrap()
        .to_owned();
    let security_group = ec2
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
        .task_definition(task_definition)
        .desired_count(1)
        .launch_type(aws_sdk_ecs::types::LaunchType::Fargate)
        .network_configuration(
            aws_sdk_ecs::types::NetworkConfiguration::builder()
                .awsvpc_configuration(
                    aws_sdk_ecs::types::AwsVpcConfiguration::builder()
                        .subnets(subnet)
                        .security_groups(security_group)
                        .build()
                        .unwrap(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
}

async fn service_task(env: &Env) -> String {
    clients::ecs(&env.aws, REGION)
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
}

/// Registers a revision of `api` like the latest, whose tasks fail to start (the stand-in's
/// `BAKE_STANDIN_TASKS_FAIL`), so that the next published revision fails too.
async fn break_the_family(env: &Env) {
    let ecs = clients::ecs(&env.aws, REGION);
    let latest = ecs
        .describe_task_definition()
        .task_definition("api")
        .send()
        .await
        .unwrap()
        .task_definition()
        .unwrap()
        .clone();
    let containers = latest
        .container_definitions()
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c.environment.get_or_insert_with(Vec::new).push(
                aws_sdk_ecs::types::KeyValuePair::builder()
                    .name("BAKE_STANDIN_TASKS_FAIL")
                    .value("true")
                    .build(),
            );
            c
        })
        .collect();
    ecs.register_task_definition()
        .family("api")
        .set_network_mode(latest.network_mode().cloned())
        .set_requires_compatibilities(Some(latest.requires_compatibilities().to_vec()))
        .set_cpu(latest.cpu().map(str::to_owned))
        .set_memory(latest.memory().map(str::to_owned))
        .set_execution_role_arn(latest.execution_role_arn().map(str::to_owned))
        .set_container_definitions(Some(containers))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn an_ecs_rollout_whose_circuit_breaker_trips_ends_on_the_previous_revision() {
    let Some(env) = env().await else { return };
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let name = format!("rollout/api-{}", env.account);
    let one = push_image(&registry, &name).await;
    let two = push_image(&registry, &name).await;
    let first = register_first_revision(&env, &format!("{}:latest", one.repository)).await;
    api_service(&env, first.task_definition_arn().unwrap()).await;
    let recipe = env.write(
        "recipe.yaml",
        &format!(
            "{}  rollouts:\n    prod:\n      timeout: 2m\n",
            fargate_recipe(&one.repository, Some(("apps", "api")), true)
        ),
    );
    let recipe_arg = recipe.to_str().unwrap();
    let publish = |n: u8, image: &bake::publish::ImageRef| {
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
    };
    let rollout = |n: u8| {
        env.bake(&[
            "rollout",
            recipe_arg,
            &version(n),
            "--channel",
            "prod",
            "--poll-interval",
            "200ms",
        ])
    };

    // Version 1 deploys and completes.
    publish(1, &one);
    ok(rollout(1), "rollout v1");
    let v1_arn = pin(&env, &recipe)["references"]["task_definitions"][0]["arn"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(service_task(&env).await, v1_arn);

    // Version 2's tasks never start: the circuit breaker fails the deployment, ECS rolls the
    // service back to version 1's revision, and bake moves the channel back.
    break_the_family(&env).await;
    publish(2, &two);
    let output = rollout(2);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("circuit breaker"), "{stderr}");
    assert_eq!(service_task(&env).await, v1_arn);
    let pinned = pin(&env, &recipe);
    assert_eq!(pinned["references"]["version"], version(1));
    // The failed deployment had the circuit breaker set to roll back.
    let described = clients::ecs(&env.aws, REGION)
        .describe_services()
        .cluster("apps")
        .services("api")
        .send()
        .await
        .unwrap();
    let breaker = described.services()[0]
        .deployment_configuration()
        .and_then(|c| c.deployment_circuit_breaker())
        .unwrap();
    assert!(breaker.enable());
}

/// `bake validate` of a recipe with `rollouts` (YAML lines under `publish:`).
fn validate(publish_tail: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("recipe.yaml");
    let yaml = format!(
        "{}{publish_tail}",
        fargate_recipe("127.0.0.1:5000/api", Some(("apps", "api")), true)
    );
    fs_err::write(&path, yaml).unwrap();
    super::common::run(&["validate", path.to_str().unwrap()])
}

#[test]
fn bad_rollout_settings_are_named_at_their_place() {
    let output = validate(
        "  rollouts:\n    prod:\n      strategy: linear\n      checkpoints: [50, 20]\n      timeout: soon\n    qa:\n      alarms: [x]\n",
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    for wanted in [
        "rollout strategy `linear`",
        "write `canary`, `rolling` or `blue_green`",
        "checkpoints need `strategy: canary`",
        "checkpoint `20`",
        "checkpoints must ascend",
        "duration `soon`",
        "rollout for channel `qa`, which is not in publish.channels",
        "recipe.yaml:18:",
    ] {
        assert!(stderr.contains(wanted), "{wanted}: {stderr}");
    }
    let output = validate(
        "  rollouts:\n    prod:\n      strategy: canary\n      checkpoints: [10, 50]\n      ecs_services:\n        - {cluster: apps, name: api, family: apj}\n",
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the last checkpoint must be 100"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `api`?"), "{stderr}");
    let output = validate("  rollouts:\n    prod:\n      strategy: canary\n      max_surge: 3\n");
    assert_eq!(output.status.code(), Some(2));
    assert!(
        text(&output.stderr).contains("max_surge"),
        "{}",
        text(&output.stderr)
    );
    ok(
        validate(
            "  rollouts:\n    prod:\n      strategy: blue_green\n      alarms: [api-5xx]\n      timeout: 30m\n",
        ),
        "validate a good rollout",
    );
}

#[test]
fn rollout_settings_are_not_part_of_the_version() {
    let plan = |tail: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recipe.yaml");
        let yaml = format!(
            "{}{tail}",
            fargate_recipe("127.0.0.1:5000/api", Some(("apps", "api")), true)
        );
        fs_err::write(&path, yaml).unwrap();
        let output = super::common::run(&["plan", path.to_str().unwrap(), "--output", "json"]);
        assert!(output.status.success(), "{}", text(&output.stderr));
        let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        plan["version"].as_str().unwrap().to_owned()
    };
    let without = plan("");
    let with = plan(
        "  rollouts:\n    prod:\n      strategy: canary\n      checkpoints: [5, 100]\n      alarms: [api-5xx]\n",
    );
    assert_eq!(without, with);
}
