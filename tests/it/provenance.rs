//! Provenance end to end: `bake build` signs SLSA provenance and SBOMs and attaches them to the
//! image as OCI referrers in the store; `bake verify` accepts them and rejects every tampered
//! variant with a message naming what did not match; independent implementations
//! (securesystemslib, spdx-tools, the CycloneDX schema, packageurl, dpkg-query) agree with
//! what bake wrote; `bake manifest show` finds the version that made an artifact.
//!
//! Builds need root (namespaces); without it these tests say so and pass, except under `CI`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::common::{bake, repo_root, service, stderr, stdout};

fn can_build() -> bool {
    super::skip::root("building images: namespaces, chown")
}

/// Runs `bake --store STORE ARGS` from the repository root.
fn bake_in(store: &Path, args: &[&str]) -> Output {
    bake()
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run bake")
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "bake failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        stderr(output)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

fn build(store: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json", "build"];
    all.extend_from_slice(args);
    json_of(&bake_in(store, &all))
}

fn blob_path(store: &Path, digest: &str) -> PathBuf {
    store
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn read_blob(store: &Path, digest: &str) -> Vec<u8> {
    fs_err::read(blob_path(store, digest)).unwrap()
}

fn put_blob(store: &Path, bytes: &[u8]) -> String {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    fs_err::write(blob_path(store, &digest), bytes).unwrap();
    digest
}

fn manifest_of(store: &Path, query: &str) -> Value {
    json_of(&bake_in(
        store,
        &["--output", "json", "manifest", "show", query],
    ))
}

fn verify(store: &Path, args: &[&str]) -> Output {
    let mut all = vec!["verify"];
    all.extend_from_slice(args);
    bake_in(store, &all)
}

/// Asserts that `output` failed verification (exit 5) with `needle` in its message.
fn assert_rejected(output: &Output, needle: &str) {
    let err = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(5),
        "expected a verification failure\nstdout:\n{}\nstderr:\n{err}",
        stdout(output)
    );
    assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
}

/// Runs an independent check from tests/tools/provenance_check.py; `None` when the venv is
/// missing (outside CI).
fn python_check(args: &[&str]) -> Option<Value> {
    let python = service("BAKE_TEST_PYTHON")?;
    let output = Command::new(python)
        .arg(repo_root().join("tests/tools/provenance_check.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "provenance_check.py {args:?} failed:\n{}{}",
        stdout(&output),
        stderr(&output)
    );
    Some(serde_json::from_slice(&output.stdout).unwrap())
}

/// Decodes the statement inside a stored envelope.
fn statement(store: &Path, envelope_digest: &str) -> Value {
    let envelope: Value = serde_json::from_slice(&read_blob(store, envelope_digest)).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&payload).unwrap()
}

/// Replaces the envelope that referrer `referrer` carries, as an attacker with write access to
/// the store (or registry) would: new envelope blob, new artifact manifest, index entry moved.
fn replace_envelope(store: &Path, referrer: &str, envelope: &[u8]) {
    let envelope_digest = put_blob(store, envelope);
    let mut manifest: Value = serde_json::from_slice(&read_blob(store, referrer)).unwrap();
    manifest["layers"][0]["digest"] = json!(envelope_digest);
    manifest["layers"][0]["size"] = json!(envelope.len());
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let new_referrer = put_blob(store, &bytes);
    let index_path = store.join("index.json");
    let mut index: Value = serde_json::from_slice(&fs_err::read(&index_path).unwrap()).unwrap();
    for entry in index["manifests"].as_array_mut().unwrap() {
        if entry["digest"] == referrer {
            entry["digest"] = json!(new_referrer);
            entry["size"] = json!(bytes.len());
        }
    }
    fs_err::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
}

const HELLO: &str = "recipes/hello-static.yaml";

#[test]
fn a_built_image_carries_verified_provenance_and_sboms_that_other_tools_accept() {
    if !can_build() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let s = store.path();
    let built = build(
        s,
        &[HELLO, "--sbom-format", "spdx", "--sbom-format", "cyclonedx"],
    );
    let version = built["version"].as_str().unwrap();
    let image = built["image_digest"].as_str().unwrap();
    assert!(built["provenance"].as_str().unwrap().starts_with("sha256:"));

    // bake verify, by store reference and through the store as an OCI layout.
    let short = &version["sha256:".len().."sha256:".len() + 12];
    let tag = format!("hello-static:{short}");
    let report = json_of(&verify(s, &["--output", "json", &tag]));
    assert_eq!(report["verified"], true);
    assert_eq!(report["digest"], image);
    assert_eq!(report["provenance"]["version"], version);
    assert_eq!(
        report["provenance"]["build_type"],
        "https://bake.dev/buildtypes/recipe/v1"
    );
    let types: Vec<&str> = report["attestations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["predicate_type"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), 3, "{types:?}");
    for expected in [
        "https://slsa.dev/provenance/v1",
        "https://spdx.dev/Document",
        "https://cyclonedx.org/bom",
    ] {
        assert!(types.contains(&expected), "{types:?}");
    }
    let layout_ref = format!("oci:{}:{tag}", s.display());
    let human = verify(s, &[&layout_ref]);
    assert!(human.status.success(), "{}", stderr(&human));
    assert!(stdout(&human).contains(&format!("digest       {image}")));

    // An exported layout carries the attestations with --attestations and verifies alone.
    let exported = tempfile::tempdir().unwrap();
    let dir = exported.path().join("layout");
    let out = bake_in(
        s,
        &[
            "export",
            version,
            "--oci-layout",
            dir.to_str().unwrap(),
            "--tag",
            "app:1",
            "--attestations",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let key = s.join("keys/default.pub");
    let alone = verify(
        exported.path(),
        &[
            "--key",
            key.to_str().unwrap(),
            &format!("oci:{}:1", dir.display()),
        ],
    );
    assert!(alone.status.success(), "{}", stderr(&alone));

    // The manifest: found from the image digest, with inputs, outputs and attestations.
    for query in [
        image.to_owned(),
        format!("127.0.0.1:5000/hello-static@{image}"),
    ] {
        let manifest = manifest_of(s, &query);
        assert_eq!(manifest["version"], version, "{query}");
    }
    let manifest = manifest_of(s, version);
    assert_eq!(manifest["schema"], "bake.manifest/v1");
    assert_eq!(manifest["outputs"]["oci"]["manifest_digest"], image);
    assert_eq!(
        manifest["inputs"]["files"][0]["path"],
        "hello-static/rootfs/hello"
    );
    let attestations = &manifest["attestations"];
    let public_key = s.join("keys/default.pub");
    assert_eq!(
        attestations["signer"]["public_key"],
        fs_err::read_to_string(&public_key).unwrap()
    );

    // The provenance statement: subject = the image, recipe and file inputs with digests.
    let provenance = statement(
        s,
        attestations["provenance"]["envelope_digest"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(provenance["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(
        provenance["subject"][0]["digest"]["sha256"],
        image.trim_start_matches("sha256:")
    );
    let deps = provenance["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap();
    assert!(deps.iter().any(|d| {
        d["uri"] == "file:hello-static/rootfs/hello"
            && d["digest"]["sha256"]
                == manifest["inputs"]["files"][0]["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:")
    }));

    // Independent implementations agree.
    let envelope = blob_path(
        s,
        attestations["provenance"]["envelope_digest"]
            .as_str()
            .unwrap(),
    );
    let envelope = envelope.to_str().unwrap();
    let Some(checked) = python_check(&["dsse", envelope, public_key.to_str().unwrap()]) else {
        return;
    };
    assert_eq!(checked["_type"], "https://in-toto.io/Statement/v1");
    let sboms = attestations["sboms"].as_array().unwrap();
    let spdx = blob_path(s, sboms[0]["digest"].as_str().unwrap());
    let cdx = blob_path(s, sboms[1]["digest"].as_str().unwrap());
    let spdx_report = python_check(&["spdx", spdx.to_str().unwrap()]).unwrap();
    assert_eq!(spdx_report["files"], 1, "the one file bake added");
    python_check(&["cyclonedx", cdx.to_str().unwrap()]).unwrap();
    // The SBOM attestations verify independently too.
    for sbom in sboms {
        let envelope = blob_path(s, sbom["attestation"]["envelope_digest"].as_str().unwrap());
        python_check(&[
            "dsse",
            envelope.to_str().unwrap(),
            public_key.to_str().unwrap(),
        ])
        .unwrap();
    }
}

#[test]
fn tampered_attestations_fail_verification_naming_what_did_not_match() {
    if !can_build() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let s = store.path();
    let built = build(s, &[HELLO]);
    let version = built["version"].as_str().unwrap().to_owned();
    let manifest = manifest_of(s, &version);
    let provenance = &manifest["attestations"]["provenance"];
    let referrer = provenance["referrer"].as_str().unwrap().to_owned();
    let envelope_bytes = read_blob(s, provenance["envelope_digest"].as_str().unwrap());
    let original: Value = serde_json::from_slice(&envelope_bytes).unwrap();
    let ok = verify(s, &[&version]);
    assert!(ok.status.success(), "{}", stderr(&ok));

    // A signature by another key: not trusted.
    let other = tempfile::tempdir().unwrap();
    let other_key = other.path().join("other.key");
    let generated = bake_in(
        s,
        &["key", "generate", "--out", other_key.to_str().unwrap()],
    );
    assert!(generated.status.success(), "{}", stderr(&generated));
    let other_pub = other.path().join("other.pub");
    assert_rejected(
        &verify(s, &["--key", other_pub.to_str().unwrap(), &version]),
        "which is not a trusted key",
    );

    // One changed payload byte: the signature no longer matches.
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut payload = b64.decode(original["payload"].as_str().unwrap()).unwrap();
    let at = payload
        .windows(b"hello-static".len())
        .position(|w| w == b"hello-static")
        .unwrap();
    payload[at] = b'j';
    let mut changed = original.clone();
    changed["payload"] = json!(b64.encode(&payload));
    let tampered = tempfile::tempdir().unwrap();
    super::common::copy_tree(s, tampered.path());
    replace_envelope(
        tampered.path(),
        &referrer,
        &serde_json::to_vec(&changed).unwrap(),
    );
    assert_rejected(
        &verify(tampered.path(), &[&version]),
        "does not match the payload: the attestation was modified after it was signed",
    );

    // A validly signed statement about another artifact.
    let mut statement: Value =
        serde_json::from_slice(&b64.decode(original["payload"].as_str().unwrap()).unwrap())
            .unwrap();
    statement["subject"][0]["digest"]["sha256"] = json!("0".repeat(64));
    let key = bake::provenance::keys::LocalKey::read(&s.join("keys/default.key")).unwrap();
    let resigned = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(bake::provenance::dsse::Envelope::sign(
            bake::provenance::dsse::IN_TOTO_PAYLOAD_TYPE,
            &serde_json::to_vec(&statement).unwrap(),
            &key,
        ))
        .unwrap();
    let wrong_subject = tempfile::tempdir().unwrap();
    super::common::copy_tree(s, wrong_subject.path());
    replace_envelope(wrong_subject.path(), &referrer, &resigned.to_json());
    assert_rejected(
        &verify(wrong_subject.path(), &[&version]),
        "its subject digest is not the artifact's",
    );

    // The image re-tagged to a different digest: another bake image (its own provenance says
    // another version), or an image without attestations.
    let other_image = build(
        s,
        &[
            "tests/fixtures/recipes/build/scratch.yaml",
            "--var",
            "greeting=retagged",
        ],
    );
    let unsigned = build(
        s,
        &[
            "tests/fixtures/recipes/build/scratch.yaml",
            "--var",
            "greeting=unsigned",
            "--no-attest",
        ],
    );
    let short = &version["sha256:".len().."sha256:".len() + 12];
    let tag = format!("hello-static:{short}");
    for (target, needle) in [
        (&other_image, "the tag was moved to another image"),
        (&unsigned, "no signed attestation is attached to"),
    ] {
        let retagged = tempfile::tempdir().unwrap();
        super::common::copy_tree(s, retagged.path());
        let index_path = retagged.path().join("index.json");
        let mut index: Value = serde_json::from_slice(&fs_err::read(&index_path).unwrap()).unwrap();
        for entry in index["manifests"].as_array_mut().unwrap() {
            if entry["annotations"]["org.opencontainers.image.ref.name"] == tag.as_str() {
                entry["digest"] = target["image_digest"].clone();
                entry["size"] = target["manifest_size"].clone();
            }
        }
        fs_err::write(&index_path, serde_json::to_vec_pretty(&index).unwrap()).unwrap();
        let layout_ref = format!("oci:{}:{tag}", retagged.path().display());
        assert_rejected(&verify(retagged.path(), &[&layout_ref]), needle);
    }
}

/// The statement without what legitimately differs between two runs.
fn without_run_details(mut statement: Value) -> Value {
    statement["predicate"]["runDetails"]
        .as_object_mut()
        .unwrap()
        .remove("metadata");
    statement
}

#[test]
fn two_builds_give_identical_sboms_and_provenance_except_run_details() {
    if !can_build() {
        return;
    }
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = [HELLO, "--sbom-format", "spdx", "--sbom-format", "cyclonedx"];
    let built_a = build(a.path(), &args);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let built_b = build(b.path(), &args);
    assert_eq!(built_a["sboms"], built_b["sboms"], "SBOM bytes differ");
    let ma = manifest_of(a.path(), built_a["version"].as_str().unwrap());
    let mb = manifest_of(b.path(), built_b["version"].as_str().unwrap());
    let pa = statement(
        a.path(),
        ma["attestations"]["provenance"]["envelope_digest"]
            .as_str()
            .unwrap(),
    );
    let pb = statement(
        b.path(),
        mb["attestations"]["provenance"]["envelope_digest"]
            .as_str()
            .unwrap(),
    );
    assert_ne!(
        pa["predicate"]["runDetails"]["metadata"]["invocationId"],
        pb["predicate"]["runDetails"]["metadata"]["invocationId"]
    );
    assert_eq!(without_run_details(pa), without_run_details(pb));
    // Rebuilding a stored version keeps its attestations instead of piling up new ones.
    let again = build(a.path(), &args);
    assert_eq!(again["provenance"], built_a["provenance"]);
}

#[test]
fn manifest_show_finds_the_version_of_an_ami_from_its_build_record() {
    if !can_build() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let s = store.path();
    let built = build(s, &[HELLO]);
    let version = built["version"].as_str().unwrap();
    let missing = bake_in(s, &["manifest", "show", "ami-0123456789abcdef0"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("no manifest in the store"),
        "{}",
        stderr(&missing)
    );

    // What the AMI pipeline adds to the build record flows into the manifest.
    let hex = version.trim_start_matches("sha256:");
    let record_path = s.join("records").join(format!("{hex}.json"));
    let mut record: Value = serde_json::from_slice(&fs_err::read(&record_path).unwrap()).unwrap();
    // As a build of a recipe with both outputs records it: the image and the AMIs.
    record["artifact"] = json!({
        "kind": "oci_image_and_disk_ami",
        "image": record["artifact"]["image"],
        "ami": {"disk_image_digest": null, "regions": [{
            "region": "eu-west-1",
            "image_id": "ami-0123456789abcdef0",
            "snapshot_id": "snap-0123456789abcdef0"
        }]}
    });
    fs_err::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    fs_err::remove_file(s.join("manifests").join(format!("{hex}.json"))).unwrap();
    build(s, &[HELLO]);
    let manifest = manifest_of(s, "ami-0123456789abcdef0");
    assert_eq!(manifest["version"], version);
    assert_eq!(
        manifest["outputs"]["amis"][0]["snapshot_ids"][0],
        "snap-0123456789abcdef0"
    );
    assert_eq!(manifest_of(s, "snap-0123456789abcdef0")["version"], version);
    let human = bake_in(s, &["manifest", "show", "ami-0123456789abcdef0"]);
    assert!(stdout(&human).contains("ami          ami-0123456789abcdef0 (eu-west-1)"));
    // --manifest writes it where CI wants it.
    let copy = s.join("out/manifest.json");
    fs_err::create_dir_all(copy.parent().unwrap()).unwrap();
    let written = bake_in(s, &["build", HELLO, "--manifest", copy.to_str().unwrap()]);
    assert!(written.status.success(), "{}", stderr(&written));
    let copied: Value = serde_json::from_slice(&fs_err::read(&copy).unwrap()).unwrap();
    assert_eq!(copied["version"], version);
}

#[test]
fn ed25519_keys_from_a_path_sign_and_verify() {
    if !can_build() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let s = store.path();
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("release.key");
    let generated = json_of(&bake_in(
        s,
        &[
            "--output",
            "json",
            "key",
            "generate",
            "--algorithm",
            "ed25519",
            "--out",
            key.to_str().unwrap(),
        ],
    ));
    assert_eq!(generated["algorithm"], "ed25519");
    let again = bake_in(s, &["key", "generate", "--out", key.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let built = build(s, &[HELLO, "--signing-key", key.to_str().unwrap()]);
    assert_eq!(built["signed_by"], generated["key_id"]);
    let public = keys.path().join("release.pub");
    let ok = verify(
        s,
        &[
            "--key",
            public.to_str().unwrap(),
            built["version"].as_str().unwrap(),
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    // The store has no key of its own, so without --key nothing is trusted.
    let untrusted = verify(s, &[built["version"].as_str().unwrap()]);
    assert_eq!(untrusted.status.code(), Some(2), "{}", stderr(&untrusted));
    assert!(
        stderr(&untrusted).contains("no trusted key"),
        "{}",
        stderr(&untrusted)
    );
}

/// A recipe's `provenance:` section chooses the signing key and the SBOM formats; the command
/// line wins over it.
#[test]
fn the_recipe_chooses_the_signing_key_and_sbom_formats() {
    if !can_build() {
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let s = store.path();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("release.key");
    let generated = json_of(&bake_in(
        s,
        &[
            "--output",
            "json",
            "key",
            "generate",
            "--algorithm",
            "ed25519",
            "--out",
            key.to_str().unwrap(),
        ],
    ));
    fs_err::write(dir.path().join("hello.txt"), "hello\n").unwrap();
    let recipe = dir.path().join("recipe.yaml");
    fs_err::write(
        &recipe,
        "bake: 1\nname: signed\nbase: scratch\nprovisioners:\n  - file:\n      source: hello.txt\n      destination: /hello.txt\noutputs:\n  oci: {}\nprovenance:\n  signing_key: release.key\n  sbom_formats: [spdx, cyclonedx]\n",
    )
    .unwrap();
    let built = build(s, &[recipe.to_str().unwrap()]);
    assert_eq!(built["signed_by"], generated["key_id"], "{built}");
    // One SBOM per format the recipe asks for (SPDX and CycloneDX).
    let sboms = built["sboms"].as_array().expect("sboms");
    assert_eq!(sboms.len(), 2, "{built}");
    let public = dir.path().join("release.pub");
    let ok = verify(
        s,
        &[
            "--key",
            public.to_str().unwrap(),
            built["version"].as_str().unwrap(),
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
}

/// A root with mmdebstrap's Debian, built once per machine (the store caches the bootstrap).
fn debian_store() -> PathBuf {
    std::env::temp_dir().join("bake-it-provenance-debian-store")
}

#[test]
fn a_debian_sbom_lists_exactly_the_packages_dpkg_query_reports() {
    if !can_build() {
        return;
    }
    let s = debian_store();
    // The store keeps the bootstrapped base between runs, not the attestations: this run's
    // bake makes the SBOM under test.
    let _ = fs_err::remove_dir_all(s.join("manifests"));
    let built = build(
        &s,
        &[
            "tests/fixtures/recipes/provenance/debian.yaml",
            "--sbom-format",
            "spdx",
            "--sbom-format",
            "cyclonedx",
        ],
    );
    let version = built["version"].as_str().unwrap();
    let ok = verify(&s, &[version]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let manifest = manifest_of(&s, version);
    let sboms = manifest["attestations"]["sboms"].as_array().unwrap();
    let spdx: Value =
        serde_json::from_slice(&read_blob(&s, sboms[0]["digest"].as_str().unwrap())).unwrap();

    // The image's root, unpacked by bake export + umoci (not by bake's SBOM reader).
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    let exported = bake_in(
        &s,
        &[
            "export",
            version,
            "--oci-layout",
            layout.to_str().unwrap(),
            "--tag",
            "img",
        ],
    );
    assert!(exported.status.success(), "{}", stderr(&exported));
    let bundle = work.path().join("bundle");
    let unpacked = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:img", layout.display())])
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(unpacked.status.success(), "umoci: {}", stderr(&unpacked));
    let admindir = bundle.join("rootfs/var/lib/dpkg");
    let query = Command::new("dpkg-query")
        .arg(format!("--admindir={}", admindir.display()))
        .args([
            "-W",
            "-f",
            "${db:Status-Status} ${Package} ${Version} ${Architecture}\n",
        ])
        .output()
        .unwrap();
    assert!(query.status.success(), "{}", stderr(&query));
    let mut expected: Vec<String> = stdout(&query)
        .lines()
        .filter_map(|l| l.strip_prefix("installed "))
        .map(str::to_owned)
        .collect();
    expected.sort();
    assert!(
        expected.len() > 50,
        "a minbase root has dozens of packages: {expected:?}"
    );

    let packages = spdx["packages"].as_array().unwrap();
    let mut listed: Vec<String> = packages[1..]
        .iter()
        .map(|p| {
            let purl = p["externalRefs"][0]["referenceLocator"].as_str().unwrap();
            let arch = purl
                .split("arch=")
                .nth(1)
                .unwrap()
                .split('&')
                .next()
                .unwrap();
            format!(
                "{} {} {arch}",
                p["name"].as_str().unwrap(),
                p["versionInfo"].as_str().unwrap()
            )
        })
        .collect();
    listed.sort();
    assert_eq!(listed, expected);

    // Valid purls, as packageurl-python parses and re-serializes them.
    let purls: Vec<&str> = packages[1..]
        .iter()
        .map(|p| p["externalRefs"][0]["referenceLocator"].as_str().unwrap())
        .collect();
    if let Some(parsed) = python_check(&[&["purls"][..], &purls].concat()) {
        for purl in parsed.as_array().unwrap() {
            assert_eq!(purl["type"], "deb");
            assert_eq!(purl["namespace"], "debian");
            assert_eq!(purl["qualifiers"]["distro"], "debian-12");
        }
        let spdx_file = blob_path(&s, sboms[0]["digest"].as_str().unwrap());
        let report = python_check(&["spdx", spdx_file.to_str().unwrap()]).unwrap();
        assert_eq!(
            report["packages"].as_u64().unwrap() as usize,
            expected.len() + 1
        );
        let cdx_file = blob_path(&s, sboms[1]["digest"].as_str().unwrap());
        python_check(&["cyclonedx", cdx_file.to_str().unwrap()]).unwrap();
    }
}

fn curl(args: &[&str]) -> Vec<u8> {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--noproxy", "*"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        stderr(&output)
    );
    output.stdout
}

#[test]
fn pushing_attaches_attestations_that_verify_from_the_registry() {
    if !can_build() {
        return;
    }
    let Some(registry) = service("BAKE_TEST_REGISTRY") else {
        return;
    };
    let store = tempfile::tempdir().unwrap();
    let s = store.path();
    let built = build(
        s,
        &[HELLO, "--sbom-format", "spdx", "--sbom-format", "cyclonedx"],
    );
    let version = built["version"].as_str().unwrap();
    let image = built["image_digest"].as_str().unwrap();
    let short = &version["sha256:".len().."sha256:".len() + 12];
    let repository = format!("{registry}/provenance-{}/hello", std::process::id());
    let pushed = json_of(&bake_in(
        s,
        &["--output", "json", "push", HELLO, "--to", &repository],
    ));
    let attached = &pushed["attestations"][0]["attached"];
    assert_eq!(attached["referrers"].as_array().unwrap().len(), 3);
    // Debian's docker-registry 2.8 has no referrers API: the tag fallback lists them.
    assert_eq!(attached["referrers_api"], false);
    let fallback = image.replacen(':', "-", 1);
    let path = repository.split_once('/').unwrap().1;
    let index: Value = serde_json::from_slice(&curl(&[
        "-H",
        "Accept: application/vnd.oci.image.index.v1+json",
        &format!("http://{registry}/v2/{path}/manifests/{fallback}"),
    ]))
    .unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 3);
    for entry in index["manifests"].as_array().unwrap() {
        assert_eq!(entry["artifactType"], "application/vnd.in-toto+json");
        let referrer: Value = serde_json::from_slice(&curl(&[
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!(
                "http://{registry}/v2/{path}/manifests/{}",
                entry["digest"].as_str().unwrap()
            ),
        ]))
        .unwrap();
        assert_eq!(referrer["subject"]["digest"], image);
    }

    // A fresh store that trusts only the public key verifies from the registry alone.
    let fresh = tempfile::tempdir().unwrap();
    let key = s.join("keys/default.pub");
    let tag_ref = format!("{repository}:{short}");
    let report = json_of(&verify(
        fresh.path(),
        &["--output", "json", "--key", key.to_str().unwrap(), &tag_ref],
    ));
    assert_eq!(report["digest"], image);
    assert_eq!(report["attestations"].as_array().unwrap().len(), 3);
    let by_digest = format!("{repository}@{image}");
    let ok = verify(fresh.path(), &["--key", key.to_str().unwrap(), &by_digest]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // The manifest records where the version went and finds it from there.
    assert_eq!(manifest_of(s, &tag_ref)["version"], version);

    // The version tag moved to another bake image in the same repository: rejected.
    let other = build(
        s,
        &[
            "tests/fixtures/recipes/build/scratch.yaml",
            "--var",
            "greeting=moved",
        ],
    );
    let pushed_other = bake_in(
        s,
        &[
            "push",
            "tests/fixtures/recipes/build/scratch.yaml",
            "--var",
            "greeting=moved",
            "--to",
            &repository,
        ],
    );
    assert!(pushed_other.status.success(), "{}", stderr(&pushed_other));
    let other_digest = other["image_digest"].as_str().unwrap();
    let other_manifest = curl(&[
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{registry}/v2/{path}/manifests/{other_digest}"),
    ]);
    let body = fresh.path().join("other-manifest.json");
    fs_err::write(&body, &other_manifest).unwrap();
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &format!("@{}", body.display()),
        &format!("http://{registry}/v2/{path}/manifests/{short}"),
    ]);
    assert_rejected(
        &verify(fresh.path(), &["--key", key.to_str().unwrap(), &tag_ref]),
        "the tag was moved to another image",
    );
}

async fn kms_key(endpoint: &str, account: &str) -> (bake::aws::Aws, String) {
    // SAFETY of the environment: moto takes any credentials; set dummy ones once.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let aws = bake::aws::Aws::load(&bake::aws::AwsSettings {
        region: Some("us-east-1".into()),
        profile: None,
        endpoint_url: Some(endpoint.to_owned()),
        emulator_account: Some(account.to_owned()),
        emulator: Some(bake::aws::Emulator::Moto),
    })
    .await;
    let created = aws
        .kms("us-east-1")
        .create_key()
        .key_spec(aws_sdk_kms::types::KeySpec::EccNistP256)
        .key_usage(aws_sdk_kms::types::KeyUsageType::SignVerify)
        .send()
        .await
        .expect("create an asymmetric key on moto");
    let arn = created.key_metadata().unwrap().arn().unwrap().to_owned();
    (aws, arn)
}

#[tokio::test]
async fn kms_keys_sign_envelopes_that_verify_with_their_public_key() {
    use bake::provenance::dsse::{Envelope, IN_TOTO_PAYLOAD_TYPE};
    use bake::provenance::keys::{KmsSigner, PublicKey, Signer as _};
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let (aws, arn) = kms_key(&endpoint, &super::common::fresh_account()).await;
    let signer = KmsSigner::new(aws.kms("us-east-1"), &arn).await.unwrap();
    assert_eq!(signer.reference(), format!("kms:{arn}"));
    let envelope = Envelope::sign(IN_TOTO_PAYLOAD_TYPE, br#"{"_type":"x"}"#, &signer)
        .await
        .unwrap();
    // The public key as KMS hands it out (SubjectPublicKeyInfo DER), parsed independently.
    let der = aws
        .kms("us-east-1")
        .get_public_key()
        .key_id(&arn)
        .send()
        .await
        .unwrap()
        .public_key()
        .unwrap()
        .as_ref()
        .to_vec();
    let public = PublicKey::from_der(&der, "moto").unwrap();
    assert_eq!(&public, signer.public_key());
    let verified = envelope
        .verify(IN_TOTO_PAYLOAD_TYPE, std::slice::from_ref(&public))
        .unwrap();
    assert_eq!(verified.payload, br#"{"_type":"x"}"#);

    // A message over KMS's 4 KiB RAW limit is sent as its SHA-256 DIGEST. moto does not
    // implement DIGEST (it hashes the digest again, see MOTO.md), so assert what bake sent:
    // the signature moto made is over exactly sha256(message).
    let long = vec![b'a'; 10_000];
    let sig = signer.sign(&long).await.unwrap();
    let digest = Sha256::digest(&long);
    assert!(
        public.verify(&digest, &sig),
        "bake sent the SHA-256 of the message"
    );

    // A symmetric key cannot sign (KMS refuses its public key): the key is named.
    let symmetric = aws.kms("us-east-1").create_key().send().await.unwrap();
    let id = symmetric.key_metadata().unwrap().key_id().to_owned();
    let error = KmsSigner::new(aws.kms("us-east-1"), &id).await.unwrap_err();
    assert!(error.to_string().contains(&id), "{error}");
}

#[test]
fn builds_sign_with_a_kms_key_and_verify_against_it() {
    if !can_build() {
        return;
    }
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let account = super::common::fresh_account();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_aws, arn) = runtime.block_on(kms_key(&endpoint, &account));
    let store = tempfile::tempdir().unwrap();
    let with_aws = |args: &[&str]| {
        bake()
            .arg("--store")
            .arg(store.path())
            .args(args)
            .env("BAKE_AWS_ENDPOINT_URL", &endpoint)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    };
    // hello-static's statements fit KMS's RAW limit, which moto implements faithfully.
    let built = json_of(&with_aws(&[
        "--output",
        "json",
        "build",
        HELLO,
        "--kms-key",
        &arn,
    ]));
    let version = built["version"].as_str().unwrap();
    let manifest = manifest_of(store.path(), version);
    assert_eq!(
        manifest["attestations"]["signer"]["reference"],
        format!("kms:{arn}")
    );
    assert!(
        !store.path().join("keys/default.key").exists(),
        "no local key was made"
    );
    let ok = with_aws(&["verify", "--kms-key", &arn, version]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    // The store's own (absent) keys do not vouch for it.
    let other = tempfile::tempdir().unwrap();
    let generated = bake_in(other.path(), &["key", "generate"]);
    assert!(generated.status.success());
    let key = other.path().join("keys/default.pub");
    assert_rejected(
        &with_aws(&["verify", "--key", key.to_str().unwrap(), version]),
        "which is not a trusted key",
    );
}

/// Registers an AMI on moto, tagged with `version` as the AMI pipeline tags its AMIs.
async fn register_ami(aws: &bake::aws::Aws, name: &str, version: &str) -> String {
    let ec2 = aws.ec2("us-east-1");
    let id = ec2
        .register_image()
        .name(name)
        .root_device_name("/dev/xvda")
        .send()
        .await
        .expect("register an AMI on moto")
        .image_id()
        .unwrap()
        .to_owned();
    ec2.create_tags()
        .resources(&id)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("bake:version")
                .value(version)
                .build(),
        )
        .send()
        .await
        .unwrap();
    id
}

#[test]
fn ami_provenance_is_tagged_kept_in_ssm_and_verified() {
    let Some(endpoint) = service("BAKE_TEST_MOTO_ENDPOINT") else {
        return;
    };
    let account = super::common::fresh_account();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (aws, _) = runtime.block_on(kms_key(&endpoint, &account));
    let version = format!("sha256:{}", "5".repeat(64));
    let ami = runtime.block_on(register_ami(&aws, "bake-prov-1", &version));
    let other = runtime.block_on(register_ami(&aws, "bake-prov-2", &version));
    let store = tempfile::tempdir().unwrap();
    let s = store.path();
    assert!(bake_in(s, &["key", "generate"]).status.success());
    bake::store::Store::open(s).unwrap();
    // The AMI pipeline's record of a snapshot-strategy AMI (`bake.ami-snapshot-record/v1`).
    let disk = format!("sha256:{}", "d".repeat(64));
    let record = json!({
        "format": "bake.ami-snapshot-record/v1",
        "name": "web-ami",
        "version": version,
        "recipe": "web-ami.yaml",
        "bake_version": "0.1.0",
        "inputs": {"format": "bake.version/v1",
                   "base": {"kind": "bootstrap", "distro": "debian", "suite": "bookworm",
                            "variant": "minbase", "packages": [], "mirror": "http://deb.debian.org/debian",
                            "components": ["main"], "architecture": "amd64"},
                   "files": [], "builtins": [],
                   "recipe": {"name": "web-ami", "variables": {}, "base": {}, "build": {},
                              "provisioners": [], "tests": [], "outputs": {}},
                   "source_date_epoch": 1700000000},
        "ami": {"disk_image_digest": disk,
                "regions": [{"region": "us-east-1", "image_id": ami, "snapshot_id": "snap-0123"}]},
        "duration_ms": 1000
    });
    fs_err::write(
        s.join("records").join(format!("{}.json", "5".repeat(64))),
        serde_json::to_vec_pretty(&record).unwrap(),
    )
    .unwrap();
    let with_aws = |store: &Path, args: &[&str]| {
        bake()
            .arg("--store")
            .arg(store)
            .args(["--region", "us-east-1"])
            .args(args)
            .env("BAKE_AWS_ENDPOINT_URL", &endpoint)
            .env("BAKE_AWS_EMULATOR_ACCOUNT", &account)
            .env("BAKE_AWS_EMULATOR", "moto")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    };
    let parameter = "/bake/provenance/web-ami";
    let attested = json_of(&with_aws(
        s,
        &[
            "--output",
            "json",
            "attest",
            &version,
            "--ssm-parameter",
            parameter,
        ],
    ));
    let envelope_digest = attested["attestations"]["provenance"]["envelope_digest"]
        .as_str()
        .unwrap()
        .to_owned();
    // The AMI carries the envelope's digest; the manifest finds the version from the AMI id.
    let tags = runtime.block_on(async {
        aws.ec2("us-east-1")
            .describe_images()
            .image_ids(&ami)
            .send()
            .await
            .unwrap()
            .images()[0]
            .tags()
            .iter()
            .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
            .collect::<std::collections::BTreeMap<_, _>>()
    });
    assert_eq!(tags["bake:provenance"], envelope_digest);
    assert_eq!(manifest_of(s, &ami)["version"], version);
    let provenance = statement(s, &envelope_digest);
    assert_eq!(
        provenance["subject"][0]["name"],
        format!("arn:aws:ec2:us-east-1::image/{ami}")
    );
    assert_eq!(provenance["subject"][0]["digest"]["sha256"], "d".repeat(64));

    let ok = with_aws(s, &["--output", "json", "verify", &ami]);
    let report = json_of(&ok);
    assert_eq!(report["provenance"]["version"], version);
    // From a machine without the store: the envelope comes from the SSM parameter.
    let fresh = tempfile::tempdir().unwrap();
    let key = s.join("keys/default.pub");
    let remote = with_aws(
        fresh.path(),
        &["verify", "--key", key.to_str().unwrap(), &ami],
    );
    assert!(remote.status.success(), "{}", stderr(&remote));

    // Another AMI tagged with this provenance: the statement is not about it.
    runtime.block_on(async {
        aws.ec2("us-east-1")
            .create_tags()
            .resources(&other)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key("bake:provenance")
                    .value(&envelope_digest)
                    .build(),
            )
            .send()
            .await
            .unwrap()
    });
    assert_rejected(
        &with_aws(s, &["verify", &other]),
        "its subject digest is not the artifact's",
    );
    // A tag pointing at other content than the parameter holds.
    runtime.block_on(async {
        aws.ec2("us-east-1")
            .create_tags()
            .resources(&ami)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key("bake:provenance")
                    .value(format!("sha256:{}", "0".repeat(64)))
                    .build(),
            )
            .send()
            .await
            .unwrap()
    });
    assert_rejected(
        &with_aws(
            fresh.path(),
            &["verify", "--key", key.to_str().unwrap(), &ami],
        ),
        "not the sha256:0000",
    );

    // The AMI is deregistered and the version built again: the new record names a new AMI.
    // Attesting signs for that one alone; the manifest forgets the AMI that is gone.
    let rebuilt = runtime.block_on(async {
        aws.ec2("us-east-1")
            .deregister_image()
            .image_id(&ami)
            .send()
            .await
            .unwrap();
        register_ami(&aws, "bake-prov-3", &version).await
    });
    let mut record = record;
    record["ami"]["regions"][0]["image_id"] = json!(rebuilt);
    fs_err::write(
        s.join("records").join(format!("{}.json", "5".repeat(64))),
        serde_json::to_vec_pretty(&record).unwrap(),
    )
    .unwrap();
    let again = with_aws(s, &["--output", "json", "attest", &version]);
    assert!(again.status.success(), "{}", stderr(&again));
    let manifest = json_of(&again);
    let amis: Vec<&str> = manifest["outputs"]["amis"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["image_id"].as_str().unwrap())
        .collect();
    assert_eq!(amis, [rebuilt.as_str()]);
    let ok = with_aws(s, &["verify", &rebuilt]);
    assert!(ok.status.success(), "{}", stderr(&ok));
}
