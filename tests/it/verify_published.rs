//! `bake verify --published` through the binary against moto: an untouched publish passes, and
//! each tampered surface (an SSM parameter, a launch template's default pointing at another
//! AMI, a removed launch permission) is reported by name, with exit status 5.

use aws_sdk_ec2::types::{
    LaunchPermission, LaunchPermissionModifications, RequestLaunchTemplateData,
};
use bake::publish::clients;

use super::publish::{Env, ami_recipe, ok, version};

const REGION: &str = "us-east-1";
const SHARED_WITH: &str = "111122223333";
const PARAMETER: &str = "/web/prod/ami";

fn verify(env: &Env, recipe: &str) -> (Option<i32>, serde_json::Value, String) {
    let output = env.bake(&[
        "verify",
        "--published",
        recipe,
        "--channel",
        "prod",
        "--output",
        "json",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {stderr}"));
    (output.status.code(), report, stderr)
}

/// The checks that differ, as `surface resource`.
fn differences(report: &serde_json::Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("found").is_some())
        .map(|c| {
            format!(
                "{} {}",
                c["surface"].as_str().unwrap(),
                c["resource"].as_str().unwrap()
            )
        })
        .collect()
}

async fn launch_permission(env: &Env, ami: &str, add: bool) {
    let permission = LaunchPermission::builder().user_id(SHARED_WITH).build();
    let modifications = if add {
        LaunchPermissionModifications::builder().add(permission)
    } else {
        LaunchPermissionModifications::builder().remove(permission)
    };
    env.aws
        .ec2(REGION)
        .modify_image_attribute()
        .image_id(ami)
        .launch_permission(modifications.build())
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn verify_published_passes_untouched_and_names_each_tampered_surface() {
    let Some(env) = Env::at("BAKE_TEST_MOTO_ENDPOINT").await else {
        return;
    };
    let old = env.ami(REGION, "web-old").await;
    let ami = env.ami(REGION, "web-v1").await;
    launch_permission(&env, &ami, true).await;
    let template = env.launch_template(REGION, "web", &old).await;
    let recipe = env.write(
        "recipe.yaml",
        &ami_recipe(
            &[REGION],
            &[SHARED_WITH],
            &format!(
                "  launch_templates:\n    - name: web\n  ssm_parameters:\n    - name: {PARAMETER}\n  channels: [prod]\n"
            ),
        ),
    );
    let recipe = recipe.to_str().unwrap();
    let inputs = env.write(
        "inputs.json",
        &format!(
            r#"{{"recipe": "web", "version": "{}", "amis": {{"{REGION}": "{ami}"}}}}"#,
            version(1)
        ),
    );
    ok(
        env.bake(&["publish", recipe, "--inputs", inputs.to_str().unwrap()]),
        "publish",
    );
    ok(
        env.bake(&["promote", recipe, &version(1), "--channel", "prod"]),
        "promote",
    );

    // Untouched: every surface agrees.
    let (code, report, stderr) = verify(&env, recipe);
    assert_eq!(code, Some(0), "{stderr}\n{report:#}");
    assert_eq!(report["version"], version(1));
    let surfaces: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["surface"].as_str().unwrap())
        .collect();
    for surface in [
        "ami",
        "launch_permission",
        "launch_template_version",
        "launch_template_default",
        "ssm_parameter",
    ] {
        assert!(
            surfaces.contains(&surface),
            "{surface} not checked: {report:#}"
        );
    }

    // A tampered SSM parameter is named.
    let ssm = clients::ssm(&env.aws, REGION);
    ssm.put_parameter()
        .name(PARAMETER)
        .value(&old)
        .data_type("aws:ec2:image")
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .overwrite(true)
        .send()
        .await
        .unwrap();
    let (code, report, _) = verify(&env, recipe);
    assert_eq!(code, Some(5));
    assert_eq!(differences(&report), [format!("ssm_parameter {PARAMETER}")]);
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["surface"] == "ssm_parameter")
        .unwrap();
    assert_eq!(check["found"], format!("holds {old}"));
    ssm.put_parameter()
        .name(PARAMETER)
        .value(&ami)
        .data_type("aws:ec2:image")
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .overwrite(true)
        .send()
        .await
        .unwrap();
    assert_eq!(verify(&env, recipe).0, Some(0));

    // The launch template's default moved to a version that launches another AMI.
    let ec2 = env.aws.ec2(REGION);
    let other = ec2
        .create_launch_template_version()
        .launch_template_id(&template)
        .launch_template_data(RequestLaunchTemplateData::builder().image_id(&old).build())
        .send()
        .await
        .unwrap()
        .launch_template_version()
        .unwrap()
        .version_number()
        .unwrap();
    let (published_default, _) = env.template_default(REGION, &template).await;
    ec2.modify_launch_template()
        .launch_template_id(&template)
        .default_version(other.to_string())
        .send()
        .await
        .unwrap();
    let (code, report, _) = verify(&env, recipe);
    assert_eq!(code, Some(5));
    assert_eq!(
        differences(&report),
        [format!("launch_template_default web ({template})")]
    );
    ec2.modify_launch_template()
        .launch_template_id(&template)
        .default_version(published_default.to_string())
        .send()
        .await
        .unwrap();

    // A removed launch permission is named with its account.
    launch_permission(&env, &ami, false).await;
    let (code, report, _) = verify(&env, recipe);
    assert_eq!(code, Some(5));
    assert_eq!(
        differences(&report),
        [format!("launch_permission {ami} for account {SHARED_WITH}")]
    );

    // Human output names it too.
    let output = env.bake(&["verify", "--published", recipe, "--channel", "prod"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!(
            "DIFFERS  launch_permission {ami} for account {SHARED_WITH}"
        )),
        "{stdout}"
    );
}

#[test]
fn published_needs_a_channel() {
    let output = super::common::run(&["verify", "--published", "recipe.yaml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--channel"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
