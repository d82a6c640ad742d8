//! bake's registry client against real Debian `docker-registry` instances: round trips byte for
//! byte, second pushes that upload nothing, basic and token auth, skopeo reading what bake
//! pushed and bake pulling what skopeo pushed, ECR through moto plus a real registry as the
//! data plane, faults injected by a proxy in front of a real registry, tag resolution in plans,
//! and credentials that never leak.

pub(super) mod harness;

use std::sync::Arc;
use std::time::Duration;

use bake::registry::auth::{Credentials, StaticCredentials};
use bake::registry::ecr::{self, EcrCredentials, EcrEncryption, EcrError, RepositorySettings};
use bake::registry::pull::{pull_image, resolve};
use bake::registry::push::{PushTarget, push_image};
use bake::registry::{Client, ClientOptions, Credential, NoProgress, Reference, RegistryError};
use bake::store::Store;
use serde_json::Value;

use super::common::{bake, fresh_account, service, stderr, stdout};
use harness::{Auth, Fault, FaultProxy, LocalRegistry, TokenIssuer};

/// A repository name no other test (or earlier run against the same registry) uses.
fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "it/{prefix}-{}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn repo(registry: &str, name: &str) -> Reference {
    Reference::repository_only(&format!("{registry}/{name}")).unwrap()
}

fn target(registry: &str, name: &str, tags: &[&str]) -> PushTarget {
    PushTarget {
        repository: repo(registry, name),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
    }
}

/// Fast retries for tests: the registry's `Retry-After` still rules where it is given.
fn fast_options() -> ClientOptions {
    ClientOptions {
        base_backoff: Duration::from_millis(20),
        ..ClientOptions::default()
    }
}

fn anonymous() -> Client {
    Client::new(fast_options(), Arc::new(StaticCredentials::default())).unwrap()
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// Every blob of image `digest` in `from` is in `to` with the same bytes.
fn assert_same_image(from: &Store, to: &Store, digest: &str) {
    let graph = bake::registry::push::ImageGraph::from_store(from, digest).unwrap();
    for blob in graph
        .blobs
        .keys()
        .chain(graph.manifests.iter().map(|m| &m.digest))
    {
        assert_eq!(
            from.read_blob(blob).unwrap(),
            to.read_blob(blob).unwrap(),
            "blob {blob} differs after the round trip"
        );
    }
}

#[tokio::test]
async fn push_pull_round_trip_and_second_push_uploads_nothing() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let (_a, source) = store();
    // One layer above the in-memory threshold: its upload streams from the store file.
    let digest = harness::make_image(&source, 1, &[300_000, 9_000_000, 40_000]);
    let name = unique("roundtrip");
    let client = anonymous();
    let outcome = push_image(
        &client,
        &source,
        &digest,
        &[target(&registry, &name, &["v1", "stable"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    let report = &outcome.pushed[0];
    assert_eq!(report.blobs_uploaded, 4, "3 layers and the config");
    assert_eq!(report.reference, format!("{registry}/{name}@{digest}"));

    // Pull by tag into another store: the same bytes, and the tag resolves to the digest.
    let tagged: Reference = format!("{registry}/{name}:v1").parse().unwrap();
    assert_eq!(resolve(&client, &tagged).await.unwrap().digest, digest);
    let (_b, target_store) = store();
    let pulled = pull_image(&anonymous(), &target_store, &tagged, "amd64", &NoProgress)
        .await
        .unwrap();
    assert_eq!(pulled.digest, digest);
    assert_same_image(&source, &target_store, &digest);
    // Pulling again downloads nothing.
    let again_client = anonymous();
    let again = pull_image(&again_client, &target_store, &tagged, "amd64", &NoProgress)
        .await
        .unwrap();
    assert_eq!(again.bytes_downloaded, 0);
    assert_eq!(again_client.stats().blobs_downloaded, 0);

    // A second push uploads nothing and writes no manifest.
    let second = anonymous();
    let outcome = push_image(
        &second,
        &source,
        &digest,
        &[target(&registry, &name, &["v1", "stable"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let report = &outcome.pushed[0];
    assert_eq!((report.blobs_uploaded, report.blobs_present), (0, 4));
    assert_eq!(report.manifests_pushed, 0);
    assert_eq!(report.bytes_uploaded, 0);
    assert_eq!(second.stats().blobs_uploaded, 0);

    // A new repository on the same registry gets the blobs by cross-repository mount.
    let other = unique("mounted");
    let third = anonymous();
    let outcome = push_image(
        &third,
        &source,
        &digest,
        &[
            target(&registry, &name, &["v1"]),
            target(&registry, &other, &["v1"]),
        ],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty());
    assert_eq!(outcome.pushed[1].blobs_mounted, 4);
    assert_eq!(third.stats().blobs_uploaded, 0);
    let (_c, mounted_store) = store();
    pull_image(
        &anonymous(),
        &mounted_store,
        &format!("{registry}/{other}:v1").parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same_image(&source, &mounted_store, &digest);
}

#[tokio::test]
async fn chunked_uploads_round_trip() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let (_a, source) = store();
    // Above the in-memory threshold so the streamed body is used too.
    let digest = harness::make_image(&source, 2, &[9_500_000, 100_000]);
    let name = unique("chunked");
    let client = Client::new(
        ClientOptions {
            chunk_size: Some(1024 * 1024),
            ..fast_options()
        },
        Arc::new(StaticCredentials::default()),
    )
    .unwrap();
    let outcome = push_image(
        &client,
        &source,
        &digest,
        &[target(&registry, &name, &["chunked"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    let (_b, back) = store();
    pull_image(
        &anonymous(),
        &back,
        &format!("{registry}/{name}:chunked").parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same_image(&source, &back, &digest);
}

#[tokio::test]
async fn htpasswd_basic_auth_and_a_wrong_password() {
    let Some(registry) = service("BAKE_TEST_REGISTRY_AUTH") else {
        return;
    };
    let user = service("BAKE_TEST_REGISTRY_USER").unwrap();
    let password = service("BAKE_TEST_REGISTRY_PASSWORD").unwrap();
    let (_a, source) = store();
    let digest = harness::make_image(&source, 3, &[20_000]);
    let name = unique("basic");
    let client =
        Client::with_credential(fast_options(), &registry, Credential::new(&user, &password))
            .unwrap();
    let outcome = push_image(
        &client,
        &source,
        &digest,
        &[target(&registry, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    let (_b, back) = store();
    pull_image(
        &client,
        &back,
        &format!("{registry}/{name}:v1").parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same_image(&source, &back, &digest);

    let canary = "canary-wrong-password-4f1c";
    let wrong =
        Client::with_credential(fast_options(), &registry, Credential::new(&user, canary)).unwrap();
    let error = resolve(&wrong, &format!("{registry}/{name}:v1").parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            RegistryError::Unauthorized {
                had_credentials: true,
                ..
            }
        ),
        "{error:?}"
    );
    let message = format!("{error} {:?} {:?}", error.hint(), error);
    assert!(message.contains(&registry), "{message}");
    assert!(message.contains("refused the credentials"), "{message}");
    assert!(!message.contains(canary), "the password leaked: {message}");

    let error = resolve(
        &anonymous(),
        &format!("{registry}/{name}:v1").parse().unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains("refused anonymous access"),
        "{error}"
    );
    assert!(error.hint().unwrap().contains("docker login"));
}

#[tokio::test]
async fn token_auth_through_the_challenge_flow() {
    if service("BAKE_TEST_REGISTRY").is_none() {
        return;
    }
    let issuer = TokenIssuer::start("tokenuser", "token-password").await;
    let Some(registry) = LocalRegistry::start(Auth::Token {
        realm: issuer.realm.clone(),
        cert: issuer.cert.clone(),
    }) else {
        return;
    };
    let (_a, source) = store();
    let digest = harness::make_image(&source, 4, &[50_000, 60_000]);
    let name = unique("token");
    let client = Client::with_credential(
        fast_options(),
        &registry.addr,
        Credential::new("tokenuser", "token-password"),
    )
    .unwrap();
    let outcome = push_image(
        &client,
        &source,
        &digest,
        &[target(&registry.addr, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    let (_b, back) = store();
    pull_image(
        &client,
        &back,
        &format!("{}/{name}:v1", registry.addr).parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same_image(&source, &back, &digest);
    // Tokens are cached per scope: one for pull+push, one for pull, not one per request.
    let tokens = client.stats().token_requests;
    assert!(
        (1..=3).contains(&tokens),
        "{tokens} token requests for {} registry requests",
        client.stats().requests
    );
    assert_eq!(
        issuer.requests.load(std::sync::atomic::Ordering::SeqCst) as u64,
        tokens
    );

    // Anonymous: the issuer grants nothing, the registry refuses.
    let error = resolve(
        &anonymous(),
        &format!("{}/{name}:v1", registry.addr).parse().unwrap(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, RegistryError::Unauthorized { .. }),
        "{error:?}"
    );
}

fn skopeo_available() -> bool {
    crate::skip::tool("skopeo")
}

#[tokio::test]
async fn skopeo_reads_what_bake_pushed_and_bake_pulls_what_skopeo_pushed() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    if !skopeo_available() {
        return;
    }
    let (_a, source) = store();
    let digest = harness::make_image(&source, 5, &[70_000, 10_000]);
    let name = unique("skopeo");
    push_image(
        &anonymous(),
        &source,
        &digest,
        &[target(&registry, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let inspected = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{registry}/{name}:v1"))
        .output()
        .unwrap();
    assert!(
        inspected.status.success(),
        "{}",
        String::from_utf8_lossy(&inspected.stderr)
    );
    let json: Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert_eq!(json["Digest"], digest);
    let graph = bake::registry::push::ImageGraph::from_store(&source, &digest).unwrap();
    let manifest: Value = serde_json::from_slice(&graph.manifests[0].bytes).unwrap();
    let layers: Vec<&Value> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["digest"])
        .collect();
    let skopeo_layers: Vec<&Value> = json["Layers"].as_array().unwrap().iter().collect();
    assert_eq!(layers, skopeo_layers);

    // skopeo pushes an image of its own (from an OCI layout); bake pulls it.
    let (_c, other) = store();
    let other_digest = harness::make_image(&other, 6, &[30_000]);
    let layout = tempfile::tempdir().unwrap();
    bake::artifact::export::to_oci_layout(&other, &other_digest, layout.path(), "t").unwrap();
    let skopeo_name = unique("from-skopeo");
    let copied = std::process::Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:t", layout.path().display()))
        .arg(format!("docker://{registry}/{skopeo_name}:t"))
        .output()
        .unwrap();
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let (_d, pulled_store) = store();
    let pulled = pull_image(
        &anonymous(),
        &pulled_store,
        &format!("{registry}/{skopeo_name}:t").parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap();
    // skopeo keeps the manifest bytes when no conversion is needed.
    assert_eq!(pulled.digest, other_digest);
    assert_same_image(&other, &pulled_store, &other_digest);
}

pub(super) async fn moto_aws(endpoint: &str, account: &str) -> bake::aws::Aws {
    // SAFETY: every test that touches AWS sets the same dummy values.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    bake::aws::Aws::load(&bake::aws::AwsSettings {
        region: Some("us-east-1".into()),
        profile: None,
        endpoint_url: Some(endpoint.to_owned()),
        emulator_account: Some(account.to_owned()),
        emulator: Some(bake::aws::Emulator::Moto),
    })
    .await
}

#[tokio::test]
async fn ecr_repositories_and_tokens_with_moto_and_a_real_registry() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let account = fresh_account();
    let aws = moto_aws(&endpoint, &account).await;
    let ecr_client = aws.ecr("us-east-1");
    let wanted = RepositorySettings {
        immutable_tags: true,
        scan_on_push: true,
        encryption: EcrEncryption::Aes256,
        create: true,
    };
    let created = ecr::ensure_repository(&ecr_client, "us-east-1", "bake/app", &wanted)
        .await
        .unwrap();
    assert!(created.created);
    let host = ecr::registry_host(&account, "us-east-1");
    assert_eq!(created.uri, format!("{host}/bake/app"));
    let described = ecr_client
        .describe_repositories()
        .repository_names("bake/app")
        .send()
        .await
        .unwrap();
    let repository = &described.repositories()[0];
    assert_eq!(
        repository.image_tag_mutability(),
        Some(&aws_sdk_ecr::types::ImageTagMutability::Immutable)
    );
    assert!(
        repository
            .image_scanning_configuration()
            .unwrap()
            .scan_on_push()
    );

    // Existing: differences are reported, nothing is changed.
    let other = RepositorySettings {
        immutable_tags: false,
        scan_on_push: false,
        encryption: EcrEncryption::Kms(Some("alias/bake".into())),
        create: true,
    };
    let again = ecr::ensure_repository(&ecr_client, "us-east-1", "bake/app", &other)
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.differences.len(), 3, "{:?}", again.differences);
    assert!(again.differences[0].contains("tag immutability is on"));
    let after = ecr_client
        .describe_repositories()
        .repository_names("bake/app")
        .send()
        .await
        .unwrap();
    assert_eq!(
        after.repositories()[0].image_tag_mutability(),
        Some(&aws_sdk_ecr::types::ImageTagMutability::Immutable),
        "an existing repository was changed"
    );
    // Missing and not to be created: a clear error, at once.
    let missing = ecr::ensure_repository(
        &ecr_client,
        "us-east-1",
        "bake/missing",
        &RepositorySettings {
            create: false,
            ..wanted.clone()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(missing, EcrError::Missing { .. }), "{missing:?}");
    assert!(missing.to_string().contains("bake/missing"));

    // The data plane: a real registry with the password moto's token carries.
    let token = ecr_client.get_authorization_token().send().await.unwrap();
    let password =
        Credential::from_basic_token(token.authorization_data()[0].authorization_token().unwrap())
            .unwrap()
            .password;
    let Some(registry) = LocalRegistry::start(Auth::Htpasswd {
        user: "AWS".into(),
        password: password.expose().to_owned(),
    }) else {
        return;
    };
    let credentials = Arc::new(EcrCredentials::new(aws.clone()));
    let options = ClientOptions {
        endpoints: [(host.clone(), format!("http://{}", registry.addr))].into(),
        ..fast_options()
    };
    let client = Client::new(
        options.clone(),
        Arc::clone(&credentials) as Arc<dyn Credentials>,
    )
    .unwrap();
    let (_a, source) = store();
    let digest = harness::make_image(&source, 7, &[40_000, 5_000]);
    let ecr_repo = Reference::repository_only(&created.uri).unwrap();
    let outcome = push_image(
        &client,
        &source,
        &digest,
        &[PushTarget {
            repository: ecr_repo.clone(),
            tags: vec!["v1".into()],
        }],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    assert_eq!(
        outcome.pushed[0].reference,
        format!("{host}/bake/app@{digest}")
    );
    // moto's tokens expired in 2015: each use fetched a fresh one instead of reusing a dead one.
    let fetched = credentials.token_requests();
    assert!(fetched >= 2, "only {fetched} token fetches");
    let (_b, back) = store();
    pull_image(
        &client,
        &back,
        &ecr_repo.with_tag("v1").unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same_image(&source, &back, &digest);
    assert!(credentials.token_requests() > fetched);
}

#[tokio::test]
async fn faults_on_the_way_do_not_break_a_push() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let proxy = FaultProxy::start(&registry).await;
    proxy.add("GET", "/v2/", 1, Fault::Delay(Duration::from_millis(1500)));
    proxy.add(
        "HEAD",
        "/blobs/",
        1,
        Fault::Status(503, Some(1), "UNAVAILABLE"),
    );
    proxy.add(
        "HEAD",
        "/blobs/",
        1,
        Fault::Status(429, Some(1), "TOOMANYREQUESTS"),
    );
    proxy.add(
        "POST",
        "/blobs/uploads/",
        1,
        Fault::Status(502, None, "BAD_GATEWAY"),
    );
    proxy.add("PUT", "/blobs/uploads/", 1, Fault::ResetMidRequest);
    proxy.add(
        "PUT",
        "/manifests/",
        1,
        Fault::Status(429, Some(1), "TOOMANYREQUESTS"),
    );
    let (_a, source) = store();
    let digest = harness::make_image(&source, 8, &[600_000, 200_000, 9_000_000]);
    // The large layer streams from the store file: cut that upload too, in the middle.
    let manifest: Value = serde_json::from_slice(&source.read_blob(&digest).unwrap()).unwrap();
    let large = manifest["layers"][2]["digest"].as_str().unwrap().to_owned();
    proxy.add(
        "PUT",
        &format!("digest={}", large.replace(':', "%3A")),
        1,
        Fault::ResetMidRequest,
    );
    let name = unique("faults");
    let client = anonymous();
    let outcome = push_image(
        &client,
        &source,
        &digest,
        &[target(&proxy.addr, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    assert_eq!(proxy.injected(), 7, "{:#?}", proxy.log.lock().unwrap());
    assert!(client.stats().retries >= 6);
    // The registry itself (not through the proxy) holds exactly the image.
    let (_b, back) = store();
    let pulled = pull_image(
        &anonymous(),
        &back,
        &format!("{registry}/{name}:v1").parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(pulled.digest, digest);
    assert_same_image(&source, &back, &digest);

    // Pulling through faults: a blob cut mid-stream and a 500 are retried.
    proxy.add(
        "GET",
        &format!("/blobs/{large}"),
        1,
        Fault::ResetMidResponse,
    );
    proxy.add("GET", "/blobs/", 1, Fault::ResetMidResponse);
    proxy.add("GET", "/blobs/", 1, Fault::Status(500, None, "UNKNOWN"));
    proxy.add(
        "GET",
        "/manifests/",
        1,
        Fault::Delay(Duration::from_millis(800)),
    );
    let (_c, via_proxy) = store();
    pull_image(
        &anonymous(),
        &via_proxy,
        &format!("{}/{name}:v1", proxy.addr).parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(proxy.injected(), 11, "{:#?}", proxy.log.lock().unwrap());
    assert_same_image(&source, &via_proxy, &digest);
}

#[tokio::test]
async fn wrong_content_is_refused_and_not_stored() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let (_a, source) = store();
    let digest = harness::make_image(&source, 9, &[100_000]);
    let name = unique("wrong");
    push_image(
        &anonymous(),
        &source,
        &digest,
        &[target(&registry, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let proxy = FaultProxy::start(&registry).await;

    // A manifest whose announced digest is not that of its bytes.
    proxy.add("GET", "/manifests/", 1, Fault::WrongDigestHeader);
    let (_b, empty) = store();
    let error = pull_image(
        &anonymous(),
        &empty,
        &format!("{}/{name}:v1", proxy.addr).parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, RegistryError::DigestMismatch { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("nothing was stored"));
    assert!(harness::store_blobs(&empty).is_empty());

    // A blob larger than its descriptor says: refused, never stored.
    let (_c, other) = store();
    proxy.add("GET", "/blobs/", 1, Fault::Oversize);
    let parallel_one = Client::new(
        ClientOptions {
            parallelism: 1,
            ..fast_options()
        },
        Arc::new(StaticCredentials::default()),
    )
    .unwrap();
    let error = pull_image(
        &parallel_one,
        &other,
        &format!("{}/{name}@{digest}", proxy.addr).parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap_err();
    let RegistryError::SizeMismatch {
        expected, actual, ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(actual - expected, 1000);
    // One transfer at a time, config first: the config was the oversized blob.
    let config = manifest_config(&source, &digest);
    assert!(error.to_string().contains(&config), "{error}");
    assert!(!other.has_blob(&config));

    // Blobs with flipped bytes: refused, never stored.
    proxy.add("GET", "/blobs/", 100, Fault::CorruptBody);
    let error = pull_image(
        &anonymous(),
        &empty,
        &format!("{}/{name}@{digest}", proxy.addr).parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap_err();
    let RegistryError::DigestMismatch { expected, .. } = &error else {
        panic!("{error:?}");
    };
    assert!(!empty.has_blob(expected));
    // Only the verified manifest made it into the store.
    let stored: Vec<String> = harness::store_blobs(&empty)
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    assert_eq!(stored, vec![digest.clone()]);
}

#[tokio::test]
async fn immutable_tags_same_digest_is_fine_elsewhere_is_an_error() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let (_a, source) = store();
    let first = harness::make_image(&source, 10, &[10_000]);
    let second = harness::make_image(&source, 11, &[10_000]);
    let name = unique("immutable");
    push_image(
        &anonymous(),
        &source,
        &first,
        &[target(&registry, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    // ECR refuses to move an immutable tag with 400 TAG_INVALID; docker-registry would move
    // it, so the proxy plays ECR's part for manifest PUTs by tag.
    let proxy = FaultProxy::start(&registry).await;
    proxy.add(
        "PUT",
        "/manifests/v1",
        10,
        Fault::Status(400, None, "TAG_INVALID"),
    );
    let outcome = push_image(
        &anonymous(),
        &source,
        &second,
        &[target(&proxy.addr, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let failure = &outcome.failed[0];
    let RegistryError::ImmutableTag {
        existing, wanted, ..
    } = &failure.error
    else {
        panic!("{:?}", failure.error);
    };
    assert_eq!((existing, wanted), (&first, &second));
    assert!(failure.error.to_string().contains("immutable"));
    // The same image again: the tag already points at it, which counts as success.
    let outcome = push_image(
        &anonymous(),
        &source,
        &first,
        &[target(&proxy.addr, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
}

fn manifest_config(store: &Store, digest: &str) -> String {
    let manifest: Value = serde_json::from_slice(&store.read_blob(digest).unwrap()).unwrap();
    manifest["config"]["digest"].as_str().unwrap().to_owned()
}

/// Writes a recipe whose base is `image` into a fresh directory.
fn image_recipe(image: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(
        dir.path().join("recipe.yaml"),
        format!(
            "bake: 1\nname: from-registry\nbase:\n  image: {image}\noutputs:\n  oci:\n    cmd: [\"/bin/true\"]\n"
        ),
    )
    .unwrap();
    dir
}

#[tokio::test]
async fn plan_pins_a_tag_by_digest_and_build_pulls_the_base() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let (_a, source) = store();
    let digest = harness::make_image(&source, 12, &[30_000]);
    let name = unique("base");
    push_image(
        &anonymous(),
        &source,
        &digest,
        &[target(&registry, &name, &["bookworm"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let dir = image_recipe(&format!("{registry}/{name}:bookworm"));
    let store_dir = tempfile::tempdir().unwrap();
    let output = bake()
        .current_dir(dir.path())
        .arg("--store")
        .arg(store_dir.path())
        .args(["--output", "json", "plan", "recipe.yaml"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["inputs"]["base"]["digest"], digest);
    assert_eq!(
        plan["inputs"]["base"]["repository"],
        format!("{registry}/{name}")
    );

    // Moving the tag gives another version.
    let moved = harness::make_image(&source, 13, &[30_000]);
    push_image(
        &anonymous(),
        &source,
        &moved,
        &[target(&registry, &name, &["bookworm"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let output = bake()
        .current_dir(dir.path())
        .arg("--store")
        .arg(store_dir.path())
        .args(["--output", "json", "plan", "recipe.yaml"])
        .output()
        .unwrap();
    let replanned: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(replanned["inputs"]["base"]["digest"], moved);
    assert_ne!(replanned["version"], plan["version"]);

    // Building needs the namespace runner (root): it pulls the base and builds on it.
    if !crate::skip::root("building from a registry base") {
        return;
    }
    let output = bake()
        .current_dir(dir.path())
        .arg("--store")
        .arg(store_dir.path())
        .args(["--output", "json", "build", "recipe.yaml"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        stdout(&output),
        stderr(&output)
    );
    let built: Value = serde_json::from_slice(&output.stdout).unwrap();
    let built_store = Store::open(store_dir.path()).unwrap();
    let base_manifest: Value = serde_json::from_slice(&source.read_blob(&moved).unwrap()).unwrap();
    let base_layer = base_manifest["layers"][0]["digest"].as_str().unwrap();
    assert_eq!(built["layers"][0]["digest"], base_layer);
    assert_eq!(
        built_store.read_blob(base_layer).unwrap(),
        source.read_blob(base_layer).unwrap()
    );

    // `bake push RECIPE` pushes to the recipe's targets with its templated tags (`publish` is
    // not part of the version, so the built version is the one pushed).
    let out = unique("out");
    let text = fs_err::read_to_string(dir.path().join("recipe.yaml")).unwrap();
    fs_err::write(
        dir.path().join("recipe.yaml"),
        format!(
            "{text}publish:\n  registries:\n    - repository: {registry}/{out}\n      tags: [\"{{{{version_short}}}}\", latest]\n      insecure: true\n"
        ),
    )
    .unwrap();
    let output = bake()
        .current_dir(dir.path())
        .arg("--store")
        .arg(store_dir.path())
        .args(["--output", "json", "push", "recipe.yaml"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let pushed: Value = serde_json::from_slice(&output.stdout).unwrap();
    let image = built["image_digest"].as_str().unwrap();
    assert_eq!(
        pushed["references"],
        serde_json::json!([format!("{registry}/{out}@{image}")])
    );
    let short = &built["version"].as_str().unwrap()[7..19];
    assert_eq!(
        pushed["pushed"][0]["tags"],
        serde_json::json!([short, "latest"])
    );
    for tag in [short, "latest"] {
        let reference: Reference = format!("{registry}/{out}:{tag}").parse().unwrap();
        assert_eq!(
            resolve(&anonymous(), &reference).await.unwrap().digest,
            image
        );
    }
}

#[test]
fn bad_references_are_clear_errors() {
    for (image, expected) in [
        ("bad::ref", "path part"),
        ("127.0.0.1:5000/Upper/case:v1", "uppercase"),
        ("127.0.0.1:5000/app@", "empty"),
        (
            "127.0.0.1:5000/app@md5:0123456789abcdef0123456789abcdef",
            "algorithm `md5`",
        ),
        ("127.0.0.1:5000/app@sha256:abc", "64 hex digits"),
    ] {
        let dir = image_recipe(&format!("\"{image}\""));
        let output = bake()
            .current_dir(dir.path())
            .args(["plan", "recipe.yaml"])
            .output()
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(2),
            "{image}: {}",
            stderr(&output)
        );
        let text = stderr(&output);
        assert!(text.contains(expected), "{image}: {text}");
        assert!(text.contains("recipe.yaml"), "{image}: {text}");
    }
    // `--to` with a tag, or malformed.
    for to in ["127.0.0.1:5000/app:v1", "bad::ref", "127.0.0.1:5000/UP"] {
        let store_dir = tempfile::tempdir().unwrap();
        let (_x, s) = (0, Store::open(store_dir.path()).unwrap());
        let digest = harness::make_image(&s, 14, &[1_000]);
        let version = harness::record_image(&s, "bad-to", &digest);
        let output = bake()
            .arg("--store")
            .arg(store_dir.path())
            .args(["push", &version, "--to", to])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{to}: {}", stderr(&output));
        assert!(
            stderr(&output).contains(&format!("`{to}`")),
            "{}",
            stderr(&output)
        );
    }
}

#[tokio::test]
async fn images_pushed_together_send_their_shared_layer_once() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::open(store_dir.path()).unwrap();
    // The same seed and first size give both images the same base layer (streamed: above the
    // in-memory threshold); the app adds a layer of its own.
    let base = harness::make_image(&store, 21, &[3_000_000]);
    let app = harness::make_image(&store, 21, &[3_000_000, 200_000]);
    let base_version = harness::record_image(&store, "together-base", &base);
    let app_version = harness::record_image(&store, "together-app", &app);
    let blob_sizes = |digest: &str| -> Vec<(String, u64)> {
        let manifest: Value = serde_json::from_slice(&store.read_blob(digest).unwrap()).unwrap();
        std::iter::once(&manifest["config"])
            .chain(manifest["layers"].as_array().unwrap())
            .map(|d| {
                (
                    d["digest"].as_str().unwrap().to_owned(),
                    d["size"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let unique_blobs: std::collections::BTreeMap<String, u64> = blob_sizes(&base)
        .into_iter()
        .chain(blob_sizes(&app))
        .collect();
    assert_eq!(
        unique_blobs.len(),
        4,
        "two configs, the shared layer, the app's layer"
    );

    let name = unique("together");
    let output = bake()
        .arg("--store")
        .arg(store_dir.path())
        .args([
            "--output",
            "json",
            "push",
            &base_version,
            &app_version[..19],
        ])
        .args(["--to", &format!("{registry}/{name}")])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json["references"],
        serde_json::json!([
            format!("{registry}/{name}@{base}"),
            format!("{registry}/{name}@{app}"),
        ])
    );
    assert_eq!(json["images"][1]["version"], app_version.as_str());
    // Every blob went up exactly once: the shared layer's bytes are counted (and sent) once.
    assert_eq!(
        json["bytes_uploaded"].as_u64().unwrap(),
        unique_blobs.values().sum::<u64>(),
        "{json}"
    );
    let app_report = &json["pushed"][1];
    let base_report = &json["pushed"][0];
    assert_eq!(
        app_report["blobs_uploaded"].as_u64().unwrap()
            + base_report["blobs_uploaded"].as_u64().unwrap(),
        4
    );
    // Both images are whole in the registry: each version tag pulls its image byte for byte.
    for (version, digest) in [(&base_version, &base), (&app_version, &app)] {
        let tagged: Reference = format!("{registry}/{name}:{}", &version[7..19])
            .parse()
            .unwrap();
        assert_eq!(
            &resolve(&anonymous(), &tagged).await.unwrap().digest,
            digest
        );
        let (_d, pulled) = self::store();
        pull_image(&anonymous(), &pulled, &tagged, "amd64", &NoProgress)
            .await
            .unwrap();
        assert_same_image(&store, &pulled, digest);
    }
}

#[tokio::test]
async fn cli_push_prints_references_and_never_leaks_credentials() {
    let Some(registry) = service("BAKE_TEST_REGISTRY_AUTH") else {
        return;
    };
    let user = service("BAKE_TEST_REGISTRY_USER").unwrap();
    let password = service("BAKE_TEST_REGISTRY_PASSWORD").unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::open(store_dir.path()).unwrap();
    let digest = harness::make_image(&store, 15, &[80_000, 3_000]);
    let version = harness::record_image(&store, "cli-push", &digest);
    let name = unique("cli");
    let docker = tempfile::tempdir().unwrap();
    let auth = |user: &str, password: &str| {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        fs_err::write(
            docker.path().join("config.json"),
            format!(r#"{{"auths":{{"{registry}":{{"auth":"{token}"}}}}}}"#),
        )
        .unwrap();
    };
    auth(&user, &password);
    let push = |extra_env: &[(&str, &str)]| {
        let mut command = bake();
        command
            .arg("--store")
            .arg(store_dir.path())
            .args(["--output", "json", "push", &version[..19]])
            .args(["--to", &format!("{registry}/{name}")])
            .env("DOCKER_CONFIG", docker.path());
        for (k, v) in extra_env {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    let output = push(&[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json["references"],
        serde_json::json!([format!("{registry}/{name}@{digest}")])
    );
    assert!(json["bytes_uploaded"].as_u64().unwrap() > 80_000);
    assert!(stderr(&output).contains("uploaded"), "{}", stderr(&output));
    let output = push(&[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["bytes_uploaded"], 0, "the second push uploaded");
    assert_eq!(json["pushed"][0]["blobs_present"], 3);
    // The version tag is there.
    let tagged: Reference = format!("{registry}/{name}:{}", &version[7..19])
        .parse()
        .unwrap();
    let client =
        Client::with_credential(fast_options(), &registry, Credential::new(&user, &password))
            .unwrap();
    assert_eq!(resolve(&client, &tagged).await.unwrap().digest, digest);

    // A wrong password, with every log on: the canary is nowhere.
    let canary = "canary-pw-93b7e1";
    auth(&user, canary);
    let output = push(&[("BAKE_LOG", "trace")]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    let everything = format!("{}{}", stdout(&output), stderr(&output));
    assert!(
        everything.contains("refused the credentials"),
        "{everything}"
    );
    assert!(
        !everything.contains(canary),
        "the password leaked:\n{everything}"
    );
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{canary}"));
    assert!(
        !everything.contains(&encoded),
        "the encoded password leaked"
    );
    for entry in walkdir::WalkDir::new(store_dir.path()) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let bytes = fs_err::read(entry.path()).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains(canary) && !text.contains(&encoded),
                "{} holds the password",
                entry.path().display()
            );
        }
    }
}

#[tokio::test]
async fn multi_platform_index_is_pushed_after_its_manifests_and_pulled_per_platform() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let (_a, source) = store();
    let amd64 = harness::make_image(&source, 16, &[20_000]);
    let arm64 = harness::make_image(&source, 17, &[25_000]);
    let descriptor = |digest: &str, arch: &str| {
        let size = source.read_blob(digest).unwrap().len();
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size,
            "platform": {"os": "linux", "architecture": arch},
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor(&amd64, "amd64"), descriptor(&arm64, "arm64")],
    });
    let index_digest = source
        .put_blob(&serde_json::to_vec(&index).unwrap())
        .unwrap();
    let name = unique("index");
    let outcome = push_image(
        &anonymous(),
        &source,
        &index_digest,
        &[target(&registry, &name, &["multi"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    assert_eq!(outcome.pushed[0].manifests_pushed, 3);
    assert_eq!(outcome.pushed[0].blobs_uploaded, 4);
    let tagged: Reference = format!("{registry}/{name}:multi").parse().unwrap();
    let (_b, back) = store();
    let pulled = pull_image(&anonymous(), &back, &tagged, "arm64", &NoProgress)
        .await
        .unwrap();
    assert_eq!(pulled.digest, index_digest);
    assert_eq!(pulled.manifest_digest, arm64);
    assert_same_image(&source, &back, &arm64);
    // The other platform's layers were not downloaded.
    let amd64_manifest: Value = serde_json::from_slice(&source.read_blob(&amd64).unwrap()).unwrap();
    let amd64_layer = amd64_manifest["layers"][0]["digest"].as_str().unwrap();
    assert!(!back.has_blob(amd64_layer));
    let error = pull_image(&anonymous(), &back, &tagged, "s390x", &NoProgress)
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("linux/s390x") && text.contains("linux/amd64, linux/arm64"),
        "{text}"
    );
}

#[tokio::test]
async fn cli_push_to_ecr_creates_the_repository_and_reports_differences() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let Some(plain) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    if !crate::skip::root("building an image to push") {
        return;
    }
    let account = fresh_account();
    let aws = moto_aws(&endpoint, &account).await;
    let token = aws
        .ecr("us-east-1")
        .get_authorization_token()
        .send()
        .await
        .unwrap();
    let password =
        Credential::from_basic_token(token.authorization_data()[0].authorization_token().unwrap())
            .unwrap()
            .password;
    let Some(data_plane) = LocalRegistry::start(Auth::Htpasswd {
        user: "AWS".into(),
        password: password.expose().to_owned(),
    }) else {
        return;
    };
    // A small base on the plain registry, and a recipe built on it that publishes to ECR.
    let (_a, source) = store();
    let base = harness::make_image(&source, 18, &[15_000]);
    let base_name = unique("ecr-base");
    push_image(
        &anonymous(),
        &source,
        &base,
        &[target(&plain, &base_name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let dir = image_recipe(&format!("{plain}/{base_name}:v1"));
    let recipe = fs_err::read_to_string(dir.path().join("recipe.yaml")).unwrap();
    let publish = |immutable: bool| {
        fs_err::write(
            dir.path().join("recipe.yaml"),
            format!(
                "{recipe}publish:\n  ecr:\n    - repository: bake/cli-app\n      region: us-east-1\n      tags: [latest]\n      immutable_tags: {immutable}\n      kms_key: alias/bake-test\n"
            ),
        )
        .unwrap();
    };
    publish(true);
    let store_dir = tempfile::tempdir().unwrap();
    let host = ecr::registry_host(&account, "us-east-1");
    let run = |args: &[&str]| {
        bake()
            .current_dir(dir.path())
            .arg("--store")
            .arg(store_dir.path())
            .args(["--output", "json"])
            .args(args)
            .env("BAKE_AWS_ENDPOINT_URL", &endpoint)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("BAKE_AWS_REGION", "us-east-1")
            .env(
                "BAKE_REGISTRY_ENDPOINTS",
                format!("{host}=http://{}", data_plane.addr),
            )
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    };
    let built = run(&["build", "recipe.yaml"]);
    assert!(built.status.success(), "{}", stderr(&built));
    let built: Value = serde_json::from_slice(&built.stdout).unwrap();
    let image = built["image_digest"].as_str().unwrap();
    let pushed = run(&["push", "recipe.yaml"]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let json: Value = serde_json::from_slice(&pushed.stdout).unwrap();
    assert_eq!(
        json["references"],
        serde_json::json!([format!("{host}/bake/cli-app@{image}")])
    );
    let described = aws
        .ecr("us-east-1")
        .describe_repositories()
        .repository_names("bake/cli-app")
        .send()
        .await
        .unwrap();
    let repository = &described.repositories()[0];
    assert_eq!(
        repository.image_tag_mutability(),
        Some(&aws_sdk_ecr::types::ImageTagMutability::Immutable)
    );
    let encryption = repository.encryption_configuration().unwrap();
    assert_eq!(
        encryption.encryption_type(),
        &aws_sdk_ecr::types::EncryptionType::Kms
    );
    assert_eq!(encryption.kms_key(), Some("alias/bake-test"));

    // The recipe now asks for mutable tags: reported, not changed; nothing uploaded again.
    publish(false);
    let again = run(&["push", "recipe.yaml"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("tag immutability is on, the recipe asks for off"),
        "{}",
        stderr(&again)
    );
    let json: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(json["bytes_uploaded"], 0);
    let after = aws
        .ecr("us-east-1")
        .describe_repositories()
        .repository_names("bake/cli-app")
        .send()
        .await
        .unwrap();
    assert_eq!(
        after.repositories()[0].image_tag_mutability(),
        Some(&aws_sdk_ecr::types::ImageTagMutability::Immutable)
    );
}

#[tokio::test]
async fn tags_and_referrers_through_the_tag_schema() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let (_a, source) = store();
    let digest = harness::make_image(&source, 19, &[5_000]);
    let name = unique("referrers");
    let client = anonymous();
    push_image(
        &client,
        &source,
        &digest,
        &[target(&registry, &name, &["v1", "v2"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let repository = repo(&registry, &name);
    let mut tags = client.list_tags(&repository).await.unwrap();
    tags.sort();
    assert_eq!(tags, ["v1", "v2"]);
    // docker-registry has no referrers API: bake reads the `sha256-<hex>` tag instead.
    assert!(
        client
            .referrers(&repository, &digest)
            .await
            .unwrap()
            .is_none()
    );
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [],
    }))
    .unwrap();
    let schema_tag = digest.replace(':', "-");
    client
        .put_manifest(
            &repository,
            &schema_tag,
            "application/vnd.oci.image.index.v1+json",
            index.clone().into(),
        )
        .await
        .unwrap();
    let found = client
        .referrers(&repository, &digest)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.as_ref(), index.as_slice());
    // A repository that does not exist has no tags.
    assert!(
        client
            .list_tags(&repo(&registry, &unique("nothing")))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_referrer_is_found_through_the_tag_schema_fallback() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let (_a, source) = store();
    let digest = harness::make_image(&source, 20, &[5_000]);
    let name = unique("referrer-push");
    let client = anonymous();
    push_image(
        &client,
        &source,
        &digest,
        &[target(&registry, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let repository = repo(&registry, &name);
    // An attestation-like artifact: the empty config, one payload layer, a subject.
    let empty = source.put_blob(b"{}").unwrap();
    let payload = source.put_blob(b"{\"predicate\":\"bake test\"}").unwrap();
    for blob in [&empty, &payload] {
        let size = source.read_blob(blob).unwrap().len() as u64;
        client
            .push_blob(&repository, blob, size, &source, &NoProgress)
            .await
            .unwrap();
    }
    let subject_size = source.read_blob(&digest).unwrap().len();
    let artifact = |kind: &str| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": kind,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/json", "digest": payload, "size": 25}],
            "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": subject_size},
            "annotations": {"dev.bake.test": kind},
        }))
        .unwrap()
    };
    let media_type = "application/vnd.oci.image.manifest.v1+json";
    let first = client
        .push_referrer(
            &repository,
            media_type,
            artifact("application/vnd.bake.a").into(),
        )
        .await
        .unwrap();
    let second = client
        .push_referrer(
            &repository,
            media_type,
            artifact("application/vnd.bake.b").into(),
        )
        .await
        .unwrap();
    // Pushing one again does not list it twice.
    client
        .push_referrer(
            &repository,
            media_type,
            artifact("application/vnd.bake.a").into(),
        )
        .await
        .unwrap();
    let index: Value = serde_json::from_slice(
        &client
            .referrers(&repository, &digest)
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    let listed: Vec<(&str, &str)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["digest"].as_str().unwrap(),
                m["artifactType"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (first.as_str(), "application/vnd.bake.a"),
            (second.as_str(), "application/vnd.bake.b")
        ]
    );
    assert_eq!(
        index["manifests"][1]["annotations"]["dev.bake.test"],
        "application/vnd.bake.b"
    );
}

#[tokio::test]
async fn a_push_cut_short_resumes_without_uploading_again() {
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let (_a, source) = store();
    let digest = harness::make_image(&source, 21, &[400_000, 30_000]);
    let name = unique("resume");
    // The first run dies after its blobs: every manifest PUT fails.
    let proxy = FaultProxy::start(&registry).await;
    proxy.add(
        "PUT",
        "/manifests/",
        100,
        Fault::Status(400, None, "MANIFEST_INVALID"),
    );
    let outcome = push_image(
        &anonymous(),
        &source,
        &digest,
        &[target(&proxy.addr, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert_eq!(outcome.failed.len(), 1);
    assert!(
        outcome.failed[0]
            .error
            .to_string()
            .contains("MANIFEST_INVALID"),
        "{}",
        outcome.failed[0].error
    );
    // The next run finds the blobs there and only writes the manifest.
    let client = anonymous();
    let outcome = push_image(
        &client,
        &source,
        &digest,
        &[target(&registry, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty());
    assert_eq!(outcome.pushed[0].blobs_present, 3);
    assert_eq!(outcome.pushed[0].manifests_pushed, 1);
    assert_eq!(client.stats().blobs_uploaded, 0);
}

#[tokio::test]
async fn tls_on_loopback_with_a_ca_file() {
    if service("BAKE_TEST_REGISTRY").is_none() {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = harness::test_tls(certs.path());
    let Some(registry) = LocalRegistry::start(Auth::Tls { cert, key }) else {
        return;
    };
    let (_a, source) = store();
    let digest = harness::make_image(&source, 22, &[12_000]);
    let name = unique("tls");
    // Without the CA, the registry's certificate is not trusted: a clear error.
    let untrusted = push_image(
        &anonymous(),
        &source,
        &digest,
        &[target(&registry.addr, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    let error = &untrusted.failed[0].error;
    assert!(
        matches!(error, RegistryError::Unreachable { .. }),
        "{error:?}"
    );
    // With it, HTTPS works (after the plain-HTTP probe is answered 400 by the TLS server).
    let client = Client::new(
        ClientOptions {
            ca_file: Some(ca.clone()),
            ..fast_options()
        },
        Arc::new(StaticCredentials::default()),
    )
    .unwrap();
    let outcome = push_image(
        &client,
        &source,
        &digest,
        &[target(&registry.addr, &name, &["v1"])],
        &NoProgress,
    )
    .await
    .unwrap();
    assert!(outcome.failed.is_empty(), "{:?}", outcome.failed);
    let (_b, back) = store();
    pull_image(
        &client,
        &back,
        &format!("{}/{name}:v1", registry.addr).parse().unwrap(),
        "amd64",
        &NoProgress,
    )
    .await
    .unwrap();
    assert_same_image(&source, &back, &digest);
    // A CA file that is not PEM is refused up front, naming the file.
    let bogus = certs.path().join("bogus.pem");
    fs_err::write(&bogus, "not a certificate").unwrap();
    let error = Client::new(
        ClientOptions {
            ca_file: Some(bogus.clone()),
            ..fast_options()
        },
        Arc::new(StaticCredentials::default()),
    )
    .unwrap_err();
    assert!(error.to_string().contains("bogus.pem"), "{error}");
}
