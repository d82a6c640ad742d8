//! `bake build` and `bake export` end to end: reproducible digests, valid OCI output that other
//! tools accept, whiteouts and file metadata that survive a round trip, and the build cache.
//!
//! These tests run provisioning steps in namespaces, which needs root (CI is root); without it
//! they say so and pass, except under `CI`, where they fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use super::common::{bake, copy_tree, repo_root, service, stderr, stdout};

/// Whether this process can run builds (see [`super::skip`]).
fn can_build() -> bool {
    super::skip::root("building images: namespaces, chown")
}

/// Runs `bake --store STORE --output json ARGS` in `cwd` and parses stdout.
fn bake_json(store: &Path, cwd: &Path, args: &[&str]) -> (Output, Value) {
    let output = bake()
        .current_dir(cwd)
        .arg("--store")
        .arg(store)
        .args(["--output", "json"])
        .args(args)
        .output()
        .expect("run bake");
    let value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    (output, value)
}

fn assert_ok(output: &Output) {
    assert!(
        output.status.success(),
        "bake failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

/// A copy of a fixture directory in a fresh temp dir.
fn fixture_copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(
        &repo_root().join("tests/fixtures/recipes").join(name),
        dir.path(),
    );
    dir
}

/// Sets every file's mtime under `dir` to `epoch` (so two copies differ in time, not content).
fn touch_all(dir: &Path, stamp: &str) {
    let status = Command::new("find")
        .arg(dir)
        .args(["-exec", "touch", "-h", "-d", stamp, "{}", "+"])
        .status()
        .unwrap();
    assert!(status.success());
}

fn schema_dir() -> PathBuf {
    repo_root().join("tests/fixtures/oci-image-spec")
}

/// Validates `file` as an OCI `kind` with the image-spec schemas, through the test venv's
/// jsonschema (an implementation independent of bake's).
fn check_schema(kind: &str, file: &Path) {
    let Some(python) = service("BAKE_TEST_PYTHON") else {
        return;
    };
    let output = Command::new(python)
        .arg(repo_root().join("tests/tools/oci_schema.py"))
        .arg(schema_dir())
        .arg(kind)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{} is not a valid OCI {kind}:\n{}{}",
        file.display(),
        stdout(&output),
        stderr(&output)
    );
}

/// Unpacks image `tag` of the layout at `layout` with umoci (an independent OCI implementation)
/// into `bundle`, and returns the bundle's root filesystem.
pub(super) fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    let unpacked = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:{tag}", layout.display())])
        .arg(bundle)
        .output()
        .expect("umoci is installed by scripts/setup");
    assert!(
        unpacked.status.success(),
        "umoci unpack: {}",
        stderr(&unpacked)
    );
    bundle.join("rootfs")
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

#[test]
fn scratch_builds_are_reproducible_across_directories_and_times() {
    if !can_build() {
        return;
    }
    let first = fixture_copy("build");
    let second = fixture_copy("build");
    touch_all(first.path(), "2001-02-03 04:05:06");
    touch_all(second.path(), "2022-12-31 23:59:59");
    let store_a = tempfile::tempdir().unwrap();
    let store_b = tempfile::tempdir().unwrap();
    let (out_a, a) = bake_json(store_a.path(), first.path(), &["build", "scratch.yaml"]);
    assert_ok(&out_a);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (out_b, b) = bake_json(store_b.path(), second.path(), &["build", "scratch.yaml"]);
    assert_ok(&out_b);
    assert_eq!(a["version"], b["version"]);
    assert_eq!(
        a["image_digest"], b["image_digest"],
        "same recipe, different image"
    );
    let layers = a["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "one layer per file step: {a:#}");
    for layer in layers {
        assert!(layer["digest"].as_str().unwrap().starts_with("sha256:"));
        assert!(layer["size"].as_u64().unwrap() > 0);
    }
    // The build record is in the store, keyed by version.
    let hex = a["version"].as_str().unwrap().trim_start_matches("sha256:");
    let record: Value = serde_json::from_slice(
        &fs_err::read(store_a.path().join("records").join(format!("{hex}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(record["format"], "bake.build-record/v2");
    assert_eq!(record["artifact"]["kind"], "oci_image");
    let image = &record["artifact"]["image"];
    assert_eq!(image["image_digest"], a["image_digest"]);
    assert!(
        image["compressor"]
            .as_str()
            .unwrap()
            .starts_with("gzip/zlib-rs"),
        "{}",
        image["compressor"]
    );
    assert_eq!(record["inputs"]["format"], "bake.version/v1");
}

#[test]
fn exported_layouts_satisfy_the_oci_schemas_skopeo_and_umoci() {
    if !can_build() {
        return;
    }
    let recipe = fixture_copy("build");
    let store = tempfile::tempdir().unwrap();
    let (output, built) = bake_json(store.path(), recipe.path(), &["build", "scratch.yaml"]);
    assert_ok(&output);
    let layout = tempfile::tempdir().unwrap();
    let dir = layout.path().join("oci");
    let (output, exported) = bake_json(
        store.path(),
        recipe.path(),
        &[
            "export",
            "scratch.yaml",
            "--oci-layout",
            dir.to_str().unwrap(),
            "--tag",
            "bake/scratch:test",
        ],
    );
    assert_ok(&output);
    assert_eq!(exported["image_digest"], built["image_digest"]);

    let manifest_digest = built["image_digest"].as_str().unwrap();
    let manifest: Value =
        serde_json::from_slice(&fs_err::read(blob(&dir, manifest_digest)).unwrap()).unwrap();
    check_schema("layout", &dir.join("oci-layout"));
    check_schema("index", &dir.join("index.json"));
    check_schema("manifest", &blob(&dir, manifest_digest));
    check_schema(
        "config",
        &blob(&dir, manifest["config"]["digest"].as_str().unwrap()),
    );
    // bake's own store is a layout too.
    check_schema("index", &store.path().join("index.json"));
    check_schema("layout", &store.path().join("oci-layout"));

    let skopeo = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:test", dir.display())])
        .output()
        .expect("skopeo is installed by scripts/setup");
    assert!(skopeo.status.success(), "skopeo: {}", stderr(&skopeo));
    let inspected: Value = serde_json::from_slice(&skopeo.stdout).unwrap();
    assert_eq!(inspected["Digest"], built["image_digest"]);
    assert_eq!(
        inspected["Labels"]["org.opencontainers.image.title"],
        "scratch-files"
    );

    let umoci = Command::new("umoci")
        .args(["stat", "--image", &format!("{}:test", dir.display())])
        .output()
        .expect("umoci is installed by scripts/setup");
    assert!(umoci.status.success(), "umoci: {}", stderr(&umoci));

    // The templated directory was rendered and its symlink kept.
    let rootfs = umoci_unpack(&dir, "test", &layout.path().join("bundle"));
    assert_eq!(
        fs_err::read_to_string(rootfs.join("srv/site/index.html")).unwrap(),
        "<h1>scratch-files</h1>\n"
    );
    assert_eq!(
        fs_err::read_link(rootfs.join("srv/site/default.html")).unwrap(),
        Path::new("index.html")
    );
}

/// A busybox root filesystem tarball (busybox-static is installed by scripts/setup).
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs-src");
    for sub in ["bin", "etc", "opt/old", "tmp", "proc", "dev"] {
        fs_err::create_dir_all(root.join(sub)).unwrap();
    }
    fs_err::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static must be installed");
    for applet in [
        "sh", "rm", "ln", "cp", "chmod", "echo", "cat", "mkdir", "ls",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs_err::write(root.join("etc/doomed.conf"), "delete me\n").unwrap();
    fs_err::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs_err::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs_err::write(root.join("opt/old/a"), "a\n").unwrap();
    fs_err::write(root.join("opt/old/b"), "b\n").unwrap();
    let tarball = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(&root)
        .args(["-cf"])
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    tarball
}

fn write_recipe(dir: &Path, steps: &str) -> PathBuf {
    let path = dir.join("recipe.yaml");
    fs_err::write(
        &path,
        format!(
            "bake: 1\nname: busybox-steps\nbase:\n  rootfs: rootfs.tar\nprovisioners:\n{steps}outputs:\n  oci:\n    cmd: [/bin/sh]\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn deletions_setuid_hard_links_and_symlinks_survive_a_round_trip() {
    if !can_build() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    busybox_rootfs(dir.path());
    write_recipe(
        dir.path(),
        "  - shell:\n      inline: |\n        rm /etc/doomed.conf\n        rm -rf /opt/old\n        cp /bin/busybox /bin/suid\n        chmod 4755 /bin/suid\n        ln /bin/suid /bin/suid-link\n        echo target > /etc/target\n        ln -s /etc/target /etc/link\n",
    );
    let store = tempfile::tempdir().unwrap();
    let (output, _) = bake_json(store.path(), dir.path(), &["build", "recipe.yaml"]);
    assert_ok(&output);
    let layout = dir.path().join("oci");
    let (output, _) = bake_json(
        store.path(),
        dir.path(),
        &[
            "export",
            "recipe.yaml",
            "--oci-layout",
            layout.to_str().unwrap(),
            "--tag",
            "x:t",
        ],
    );
    assert_ok(&output);
    let rootfs = umoci_unpack(&layout, "t", &dir.path().join("bundle"));
    use std::os::unix::fs::MetadataExt;
    assert!(
        !rootfs.join("etc/doomed.conf").exists(),
        "the whiteout did not hide the base file"
    );
    assert!(
        !rootfs.join("opt/old").exists(),
        "the deleted directory came back"
    );
    assert!(rootfs.join("opt").is_dir());
    let suid = fs_err::metadata(rootfs.join("bin/suid")).unwrap();
    assert_eq!(suid.mode() & 0o7777, 0o4755, "setuid bit lost");
    let link = fs_err::metadata(rootfs.join("bin/suid-link")).unwrap();
    assert_eq!(suid.ino(), link.ino(), "hard link became a copy");
    assert_eq!(
        fs_err::read_link(rootfs.join("etc/link")).unwrap(),
        Path::new("/etc/target")
    );
    assert_eq!(
        fs_err::read_to_string(rootfs.join("etc/target")).unwrap(),
        "target\n"
    );
}

#[test]
fn a_built_version_runs_nothing_and_a_changed_last_step_reruns_only_itself() {
    if !can_build() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    busybox_rootfs(dir.path());
    let steps = |last: &str| {
        format!(
            "  - shell:\n      inline: echo step-one-ran; echo 1 > /one\n  - shell:\n      inline: echo step-two-ran; echo 2 > /two\n  - shell:\n      inline: echo {last}; echo {last} > /three\n"
        )
    };
    write_recipe(dir.path(), &steps("step-three-ran"));
    let store = tempfile::tempdir().unwrap();
    let (first, built) = bake_json(store.path(), dir.path(), &["build", "recipe.yaml"]);
    assert_ok(&first);
    assert!(stderr(&first).contains("step-one-ran"));
    assert_eq!(built["cached"], false);

    let (again, rebuilt) = bake_json(store.path(), dir.path(), &["build", "recipe.yaml"]);
    assert_ok(&again);
    assert_eq!(rebuilt["cached"], true);
    assert_eq!(rebuilt["image_digest"], built["image_digest"]);
    for marker in ["step-one-ran", "step-two-ran", "step-three-ran"] {
        assert!(
            !stderr(&again).contains(marker),
            "a step ran on a no-op rebuild:\n{}",
            stderr(&again)
        );
    }

    write_recipe(dir.path(), &steps("step-three-changed"));
    let (changed, rebuilt) = bake_json(store.path(), dir.path(), &["build", "recipe.yaml"]);
    assert_ok(&changed);
    let err = stderr(&changed);
    assert!(
        !err.contains("step-one-ran") && !err.contains("step-two-ran"),
        "earlier steps reran:\n{err}"
    );
    assert!(err.contains("step-three-changed"));
    let cached: Vec<bool> = rebuilt["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cached"].as_bool().unwrap())
        .collect();
    assert_eq!(cached, [true, true, false]);
    assert_ne!(rebuilt["version"], built["version"]);
    // The first two layers are shared.
    assert_eq!(
        rebuilt["layers"].as_array().unwrap()[..3],
        built["layers"].as_array().unwrap()[..3]
    );
}

#[test]
fn the_docker_archive_loads_and_runs_in_docker() {
    if !can_build() {
        return;
    }
    let Some(host) = service("BAKE_TEST_DOCKER_HOST") else {
        return;
    };
    let store = tempfile::tempdir().unwrap();
    let root = repo_root();
    let (output, built) = bake_json(store.path(), &root, &["build", "recipes/hello-static.yaml"]);
    assert_ok(&output);
    let archive = store.path().join("hello.tar");
    let tag = format!("bake-test/hello-static:{}", std::process::id());
    let (output, _) = bake_json(
        store.path(),
        &root,
        &[
            "export",
            "recipes/hello-static.yaml",
            "--docker-archive",
            archive.to_str().unwrap(),
            "--tag",
            &tag,
        ],
    );
    assert_ok(&output);
    let docker = |args: &[&str]| {
        Command::new("/usr/bin/docker")
            .arg("-H")
            .arg(&host)
            .args(args)
            .output()
            .unwrap()
    };
    let loaded = docker(&["load", "-i", archive.to_str().unwrap()]);
    assert!(loaded.status.success(), "docker load: {}", stderr(&loaded));
    let ran = docker(&["run", "--rm", "--network", "none", &tag]);
    assert!(ran.status.success(), "docker run: {}", stderr(&ran));
    assert_eq!(stdout(&ran), "hello from bake\n");
    // Docker sees the same config bake wrote.
    let inspected = docker(&["image", "inspect", "--format", "{{.Id}}", &tag]);
    let config = built["config_digest"].as_str().unwrap();
    assert_eq!(stdout(&inspected).trim(), config);
    let _ = docker(&["rmi", &tag]);
}

#[test]
fn debian_builds_with_apt_are_reproducible() {
    if !can_build() {
        return;
    }
    let first = fixture_copy("build");
    let second = fixture_copy("build");
    let store_a = tempfile::tempdir().unwrap();
    let store_b = tempfile::tempdir().unwrap();
    let (out_a, a) = bake_json(store_a.path(), first.path(), &["build", "debian-apt.yaml"]);
    assert_ok(&out_a);
    let (out_b, b) = bake_json(store_b.path(), second.path(), &["build", "debian-apt.yaml"]);
    assert_ok(&out_b);
    assert_eq!(a["version"], b["version"]);
    assert_eq!(
        a["image_digest"], b["image_digest"],
        "two Debian builds differ"
    );
}

#[test]
fn ctrl_c_stops_the_build_cleans_up_and_exits_130() {
    if !can_build() {
        return;
    }
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    busybox_rootfs(dir.path());
    write_recipe(
        dir.path(),
        "  - shell:\n      inline: echo step-started; sleep 60\n",
    );
    let store = tempfile::tempdir().unwrap();
    let mut child = bake()
        .current_dir(dir.path())
        .arg("--store")
        .arg(store.path())
        .args(["build", "recipe.yaml"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        // Its own process group, as a shell gives a foreground job, so Ctrl-C reaches bake and
        // its sandbox helper together and nothing else.
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains("step-started") {
            break;
        }
        line.clear();
    }
    assert!(
        seen.contains("step-started"),
        "the step never started:\n{seen}"
    );
    let started = std::time::Instant::now();
    // SAFETY: signalling a process group we created.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the step was not stopped"
    );
    assert_eq!(status.code(), Some(130), "stderr:\n{seen}{rest}");
    let leftovers: Vec<_> = fs_err::read_dir(store.path().join("work"))
        .unwrap()
        .collect();
    assert!(
        leftovers.is_empty(),
        "work directories left behind: {leftovers:?}"
    );
    assert!(
        fs_err::read_dir(store.path().join("records"))
            .unwrap()
            .next()
            .is_none()
    );
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs_err::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_killed_build_leaves_nothing_outside_the_store_and_the_next_build_reaps_its_trash() {
    if !can_build() {
        return;
    }
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    busybox_rootfs(dir.path());
    write_recipe(
        dir.path(),
        "  - shell:\n      inline: echo step-started; sleep 60\n",
    );
    let store = tempfile::tempdir().unwrap();
    // Where bake's own temp files would go if it made any outside the store.
    let tmp = tempfile::tempdir().unwrap();
    let build = |args: &[&str]| {
        let mut command = bake();
        command
            .current_dir(dir.path())
            .env("TMPDIR", tmp.path())
            .arg("--store")
            .arg(store.path())
            .args(args);
        command
    };
    let mut child = build(&["build", "recipe.yaml"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while stderr.read_line(&mut line).unwrap() > 0 {
        seen.push_str(&line);
        if line.contains("step-started") {
            break;
        }
        line.clear();
    }
    assert!(
        seen.contains("step-started"),
        "the step never started:\n{seen}"
    );
    // SAFETY: signalling a process group we created. SIGKILL: no cleanup code runs.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "killed by a signal");

    assert!(names(tmp.path()).is_empty(), "outside the store");
    // What it leaves is the store's: the root it was provisioning, in `work/` (a later
    // `bake gc` removes it), and the scratch of its base, already in `trash/`.
    let killed_root = names(&store.path().join("work"));
    assert_eq!(killed_root.len(), 1, "{killed_root:?}");
    assert!(killed_root[0].starts_with("base-root-"), "{killed_root:?}");
    let killed_trash = names(&store.path().join("trash"));
    assert!(!killed_trash.is_empty());

    // The next build with work to do succeeds beside the leftovers and reaps the trash: the
    // killed build's scratch is a few empty directories, gone long before the step has run.
    write_recipe(dir.path(), "  - shell:\n      inline: echo done > /done\n");
    let output = build(&["build", "recipe.yaml"]).output().unwrap();
    assert_ok(&output);
    assert!(names(tmp.path()).is_empty(), "outside the store");
    assert_eq!(names(&store.path().join("work")), killed_root);
    let trash = names(&store.path().join("trash"));
    assert!(
        killed_trash.iter().all(|name| !trash.contains(name)),
        "not reaped: {killed_trash:?} in {trash:?}"
    );
}

/// Every byte the store holds, with layer blobs decompressed.
fn store_text(store: &Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in walkdir::WalkDir::new(store) {
        let entry = entry.unwrap();
        if !entry.file_type().is_file() {
            continue;
        }
        let bytes = fs_err::read(entry.path()).unwrap();
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut plain = Vec::new();
            std::io::Read::read_to_end(
                &mut flate2::read::MultiGzDecoder::new(&bytes[..]),
                &mut plain,
            )
            .unwrap();
            all.extend(plain);
        }
        all.extend(bytes);
    }
    all
}

#[test]
fn secrets_reach_steps_but_never_layers_logs_or_records() {
    if !can_build() {
        return;
    }
    const CANARY: &str = "CANARY-7d3e1f-secret";
    let dir = tempfile::tempdir().unwrap();
    busybox_rootfs(dir.path());
    let recipe = |fail: bool| {
        format!(
            "bake: 1\nname: secrets\nvariables:\n  token:\n    type: string\n    sensitive: true\nbase:\n  rootfs: rootfs.tar\nprovisioners:\n  - shell:\n      env:\n        TOKEN: \"{{{{var.token}}}}\"\n      inline: |\n        echo \"inline sees {{{{var.token}}}}\"\n        echo \"env sees $TOKEN\"\n        test \"$TOKEN\" = \"{{{{var.token}}}}\"\n        echo \"$TOKEN\" > /tmp/scratch-only\n        echo public > /public\n        {}\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
            if fail { "exit 7" } else { "true" }
        )
    };
    fs_err::write(dir.path().join("recipe.yaml"), recipe(false)).unwrap();
    let store = tempfile::tempdir().unwrap();
    let var = format!("token={CANARY}");
    let (output, built) = bake_json(
        store.path(),
        dir.path(),
        &["build", "recipe.yaml", "--var", &var],
    );
    assert_ok(&output);
    assert!(
        stderr(&output).contains("inline sees ***"),
        "{}",
        stderr(&output)
    );
    assert!(stderr(&output).contains("env sees ***"));
    for text in [stdout(&output), stderr(&output), built.to_string()] {
        assert!(!text.contains(CANARY), "the secret was printed");
    }
    let stored = store_text(store.path());
    assert!(
        !stored.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()),
        "the secret reached the store"
    );
    assert!(
        stored.windows(7).any(|w| w == b"public\n"),
        "the layer content is searchable"
    );

    // A failing step's last lines are redacted too.
    fs_err::write(dir.path().join("recipe.yaml"), recipe(true)).unwrap();
    let (failed, _) = bake_json(
        store.path(),
        dir.path(),
        &["build", "recipe.yaml", "--var", &var],
    );
    assert_eq!(failed.status.code(), Some(2));
    assert!(
        stderr(&failed).contains("exit code 7"),
        "{}",
        stderr(&failed)
    );
    assert!(!stderr(&failed).contains(CANARY), "{}", stderr(&failed));
}

#[test]
fn an_exported_layout_is_a_base_and_squash_makes_one_layer() {
    if !can_build() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    busybox_rootfs(dir.path());
    write_recipe(
        dir.path(),
        "  - shell:\n      inline: echo one > /one\n  - shell:\n      inline: echo two > /two\n",
    );
    let store = tempfile::tempdir().unwrap();
    let (output, first) = bake_json(store.path(), dir.path(), &["build", "recipe.yaml"]);
    assert_ok(&output);
    assert_eq!(first["layers"].as_array().unwrap().len(), 3);
    let (output, _) = bake_json(
        store.path(),
        dir.path(),
        &[
            "export",
            "recipe.yaml",
            "--oci-layout",
            "layout",
            "--tag",
            "base:v1",
        ],
    );
    assert_ok(&output);

    // A second recipe on top of that layout, squashing its two steps into one layer.
    fs_err::write(
        dir.path().join("on-top.yaml"),
        "bake: 1\nname: on-top\nbase:\n  oci_layout:\n    path: layout\n    tag: v1\nbuild:\n  squash: true\nprovisioners:\n  - shell:\n      inline: rm /one; echo three > /three\n  - shell:\n      inline: echo four > /four\noutputs:\n  oci:\n    cmd: [/bin/sh]\n",
    )
    .unwrap();
    let other_store = tempfile::tempdir().unwrap();
    let (output, second) = bake_json(other_store.path(), dir.path(), &["build", "on-top.yaml"]);
    assert_ok(&output);
    let layers = second["layers"].as_array().unwrap();
    assert_eq!(
        layers.len(),
        4,
        "the base's three layers and one squashed layer: {second:#}"
    );
    assert_eq!(layers[..3], first["layers"].as_array().unwrap()[..]);
    let (output, _) = bake_json(
        other_store.path(),
        dir.path(),
        &[
            "export",
            "on-top.yaml",
            "--oci-layout",
            "layout2",
            "--tag",
            "x:t",
        ],
    );
    assert_ok(&output);
    let rootfs = umoci_unpack(&dir.path().join("layout2"), "t", &dir.path().join("bundle"));
    assert!(!rootfs.join("one").exists());
    for (file, content) in [("two", "two\n"), ("three", "three\n"), ("four", "four\n")] {
        assert_eq!(fs_err::read_to_string(rootfs.join(file)).unwrap(), content);
    }
}

#[test]
fn a_missing_mmdebstrap_is_named_with_the_fix() {
    if !can_build() {
        return;
    }
    let dir = fixture_copy("build");
    let store = tempfile::tempdir().unwrap();
    let output = bake()
        .current_dir(dir.path())
        .env("PATH", "/nonexistent")
        .arg("--store")
        .arg(store.path())
        .args(["build", "debian-apt.yaml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let err = stderr(&output);
    assert!(err.contains("mmdebstrap is not installed"), "{err}");
    assert!(
        err.contains("hint: install it with `apt-get install mmdebstrap`"),
        "{err}"
    );
}

/// A step whose layer takes a while to compress (48 MiB of random bytes).
fn slow_layer_recipe(dir: &Path) {
    busybox_rootfs(dir);
    write_recipe(
        dir,
        "  - shell:\n      inline: /bin/busybox dd if=/dev/urandom of=/big bs=1048576 count=48\n",
    );
}

/// Off a terminal (CI, a pipe), and with `--output json`, long steps say how far they are as
/// plain `==>` lines every `BAKE_PROGRESS_INTERVAL`, ending with `(done)`: stdout stays one JSON
/// document and stderr has no escape code.
#[test]
fn long_steps_show_progress_as_plain_lines_off_a_terminal() {
    if !can_build() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    slow_layer_recipe(dir.path());
    let store = tempfile::tempdir().unwrap();
    let output = bake()
        .current_dir(dir.path())
        .env("BAKE_PROGRESS_INTERVAL", "10ms")
        .arg("--store")
        .arg(store.path())
        .args(["--output", "json", "build", "recipe.yaml"])
        .output()
        .unwrap();
    assert_ok(&output);
    let document: Value = serde_json::from_slice(&output.stdout).expect("stdout is one JSON");
    assert!(document["image_digest"].is_string(), "{document}");
    let log = stderr(&output);
    assert!(!log.contains('\u{1b}'), "an escape code on stderr:\n{log}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("==> layer of "))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("MiB")) && lines.iter().any(|l| l.ends_with("(done)")),
        "no progress lines for the layer:\n{log}"
    );

    // A bad interval is named.
    let output = bake()
        .current_dir(dir.path())
        .env("BAKE_PROGRESS_INTERVAL", "often")
        .arg("--store")
        .arg(store.path())
        .args(["build", "recipe.yaml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("BAKE_PROGRESS_INTERVAL=`often`"));
}

/// On a terminal, long steps draw bars (indicatif), named after the step.
#[test]
fn long_steps_draw_progress_bars_on_a_terminal() {
    if !can_build() || !super::skip::tool("script") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    slow_layer_recipe(dir.path());
    let store = tempfile::tempdir().unwrap();
    // `script` gives bake a pseudo-terminal for stdout and stderr, and copies what it drew.
    let command = format!(
        "{} --store {} build recipe.yaml",
        env!("CARGO_BIN_EXE_bake"),
        store.path().display()
    );
    let output = Command::new("script")
        .current_dir(dir.path())
        .env("TERM", "xterm")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .output()
        .unwrap();
    assert_ok(&output);
    let drawn = stdout(&output);
    assert!(
        drawn.contains("layer of") && drawn.contains('\u{1b}'),
        "no bar was drawn:\n{drawn}"
    );
}
