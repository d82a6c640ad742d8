//! The AWS side of the harness works end to end: a client built by bake's own AWS module
//! (endpoint override, per-test emulator account) talks to moto.

use aws_sdk_ec2::types::{LaunchTemplateVersion, RequestLaunchTemplateData};
use bake::aws::{Aws, AwsSettings};

use super::common::{fresh_account, service};

async fn aws_for(endpoint: &str, account: &str) -> Aws {
    // SAFETY of the environment: credentials come from the standard chain; give moto dummy ones
    // through the environment so the test does not depend on the machine's.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    Aws::load(&AwsSettings {
        region: Some("us-east-1".into()),
        profile: None,
        endpoint_url: Some(endpoint.to_owned()),
        emulator_account: Some(account.to_owned()),
        emulator: Some(bake::aws::Emulator::Moto),
    })
    .await
}

#[tokio::test]
async fn launch_template_round_trip_in_an_isolated_account() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let account = fresh_account();
    let aws = aws_for(&endpoint, &account).await;
    let ec2 = aws.ec2("eu-west-1");
    let created = ec2
        .create_launch_template()
        .launch_template_name("bake-harness")
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id("ami-12345678")
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .expect("create launch template on moto");
    let id = created
        .launch_template()
        .and_then(|t| t.launch_template_id())
        .unwrap()
        .to_owned();

    let versions = ec2
        .describe_launch_template_versions()
        .launch_template_id(&id)
        .versions("$Default")
        .send()
        .await
        .unwrap();
    let data: Vec<&LaunchTemplateVersion> = versions.launch_template_versions().iter().collect();
    assert_eq!(data.len(), 1);
    let template_data = data[0].launch_template_data().unwrap();
    assert_eq!(template_data.image_id(), Some("ami-12345678"));
    assert_eq!(data[0].version_number(), Some(1));

    // Another account sees nothing: the account header isolates tests from each other.
    let other = aws_for(&endpoint, &fresh_account()).await.ec2("eu-west-1");
    let listed = other.describe_launch_templates().send().await.unwrap();
    assert!(
        listed
            .launch_templates()
            .iter()
            .all(|t| t.launch_template_name() != Some("bake-harness")),
        "the template leaked into another account"
    );
    // And the region is honoured: us-east-1 of the same account has no such template.
    let elsewhere = aws
        .ec2("us-east-1")
        .describe_launch_templates()
        .send()
        .await
        .unwrap();
    assert!(elsewhere.launch_templates().is_empty());
}
