//! The registry side of the harness works end to end: a blob pushed to Debian's
//! docker-registry comes back byte for byte, and the authenticated instance demands credentials.

use sha2::{Digest, Sha256};

use super::common::service;

#[tokio::test]
async fn blob_push_and_pull() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let client = reqwest::Client::new();
    let repository = format!("harness/blob-{}", std::process::id());
    let blob = b"bake harness blob\n".repeat(1000);
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));

    let start = client
        .post(format!("http://{registry}/v2/{repository}/blobs/uploads/"))
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
    let put = client
        .put(format!("{location}{separator}digest={digest}"))
        .header("content-type", "application/octet-stream")
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);

    let head = client
        .head(format!("http://{registry}/v2/{repository}/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let pulled = client
        .get(format!("http://{registry}/v2/{repository}/blobs/{digest}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(pulled.as_ref(), blob.as_slice());
}

#[tokio::test]
async fn authenticated_registry_requires_credentials() {
    let Some(registry) = service("BAKE_TEST_REGISTRY_AUTH") else {
        return;
    };
    let user = service("BAKE_TEST_REGISTRY_USER").unwrap_or_default();
    let password = service("BAKE_TEST_REGISTRY_PASSWORD").unwrap_or_default();
    let client = reqwest::Client::new();
    let anonymous = client
        .get(format!("http://{registry}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let authed = client
        .get(format!("http://{registry}/v2/"))
        .basic_auth(&user, Some(&password))
        .send()
        .await
        .unwrap();
    assert_eq!(authed.status(), 200);
}
