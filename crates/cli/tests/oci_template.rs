//! `cubicle tpl create-from-image` end to end: an OCI image written by the test (two
//! layers: a few programs copied from the `base` template, then a marker file and a
//! whiteout), built into a template in a private data dir, listed, and started as a
//! sandbox that runs `cat /marker` through the daemon; the same layers as a `docker
//! save` tarball; a taken name and an arm64 image refused.
//!
//! Needs root and the `base` template (its files make the image's userland), like the
//! other tests here.

mod support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::json;
use support::oci::{blob, dir, file, gzip, sha, symlink};
use support::{cubicle_bin, templates_dir, Daemon};

/// Files of the `base` rootfs the image's first layer copies: bash (which commands
/// run under), dash as /bin/sh, cat, and the libraries they load.
const COPIED: &[&str] = &[
    "usr/bin/bash",
    "usr/bin/dash",
    "usr/bin/cat",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/libtinfo.so.6",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
];

fn userland_layer(base: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in [
        "usr",
        "usr/bin",
        "usr/lib",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib64",
        "etc",
    ] {
        dir(&mut b, d, 0o755);
    }
    dir(&mut b, "tmp", 0o1777);
    symlink(&mut b, "bin", "usr/bin");
    symlink(&mut b, "lib", "usr/lib");
    symlink(&mut b, "lib64", "usr/lib64");
    for path in COPIED {
        // libtinfo.so.6 is a relative symlink in base, read through; owners are the
        // image's (root), not base's shifted ones.
        let data = fs::read(base.join(path))
            .unwrap_or_else(|e| panic!("read {path} from the base template: {e}"));
        file(&mut b, path, &data, 0o755);
    }
    symlink(&mut b, "usr/bin/sh", "dash");
    symlink(
        &mut b,
        "usr/lib64/ld-linux-x86-64.so.2",
        "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    );
    file(&mut b, "etc/gone", b"deleted by the next layer\n", 0o644);
    b.into_inner().unwrap()
}

fn marker_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "marker", b"from the image\n", 0o644);
    file(&mut b, "etc/.wh.gone", b"", 0o644);
    b.into_inner().unwrap()
}

/// Writes an OCI layout of the two layers (the first gzipped) for `arch`.
fn write_layout(layout: &Path, base: &Path, arch: &str) {
    let (l1, l2) = (userland_layer(base), marker_layer());
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh", "-c", "cat /marker"], "Env": ["A=1"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [sha(&l1), sha(&l2)]}
    });
    let config = blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
    );
    let layers = vec![
        blob(
            layout,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            &gzip(&l1),
        ),
        blob(layout, "application/vnd.oci.image.layer.v1.tar", &l2),
    ];
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": layers
    });
    let mut m = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    );
    m["platform"] = json!({"architecture": arch, "os": "linux"});
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]})).unwrap(),
    )
    .unwrap();
}

/// Writes a `docker save` tarball (classic format) of the same two layers.
fn write_docker_save(path: &Path, base: &Path) {
    let (l1, l2) = (userland_layer(base), marker_layer());
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [sha(&l1), sha(&l2)]}
    }))
    .unwrap();
    let config_name = format!("{}.json", &sha(&config)[7..]);
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": ["oci-test:latest"],
        "Layers": ["one/layer.tar", "two/layer.tar"]
    }]))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", &manifest),
        (config_name.as_str(), &config),
        ("one/layer.tar", &l1),
        ("two/layer.tar", &l2),
    ] {
        file(&mut b, name, data, 0o644);
    }
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

fn cubicle(data: &Path, args: &[&str]) -> support::Run {
    let out = std::process::Command::new(cubicle_bin())
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("E2B_API_KEY")
        .env_remove("CUBICLE_API_KEY")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    support::Run {
        args: args.iter().map(|a| a.to_string()).collect(),
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn template_from_an_oci_layout_runs_a_sandbox() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "building templates needs root"
    );
    let base = templates_dir().join("base/rootfs");
    assert!(
        base.join("usr/bin/bash").is_file(),
        "base template not built in {}: run `cubicle tpl build base`",
        templates_dir().display()
    );
    let images = tempfile::tempdir().unwrap();
    let layout = images.path().join("layout");
    write_layout(&layout, &base, "amd64");
    // The data dir must be traversable by the sandboxes' unprivileged root.
    let data = tempfile::Builder::new()
        .prefix("cubicle-oci-test-")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(data.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let layout_arg = layout.to_str().unwrap();

    let built = cubicle(
        data.path(),
        &[
            "tpl",
            "create-from-image",
            "--image",
            layout_arg,
            "--template-id",
            "oci-test",
        ],
    );
    let stderr = built.stderr.clone();
    let stdout = built.ok();
    assert!(stdout.starts_with("built oci-test from "), "{stdout}");
    assert!(stdout.contains(" 2 layers"), "{stdout}");
    // Its cmd is a one-shot command: it runs in every sandbox, nothing is checkpointed.
    assert!(
        stdout.contains("the service exited with status 0 within a second"),
        "{stdout}"
    );
    assert!(!data.path().join("templates/oci-test/checkpoint").exists());
    for line in [
        "unpacking layer 1/2 (sha256:",
        "unpacking layer 2/2 (sha256:",
        "added the account user",
    ] {
        assert!(stderr.contains(line), "no {line:?} in:\n{stderr}");
    }

    // The same store as `tpl build`: shifted owners, template.json with the image.
    let dir = data.path().join("templates/oci-test");
    let rootfs = dir.join("rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("marker")).unwrap(),
        "from the image\n"
    );
    assert!(!rootfs.join("etc/gone").exists(), "whiteout applied");
    let shift = cubicle_core::uid_map::HOST_BASE;
    assert_eq!(
        fs::symlink_metadata(rootfs.join("marker")).unwrap().uid(),
        shift
    );
    assert_eq!(
        fs::metadata(rootfs.join("home/user")).unwrap().uid(),
        shift + 1000
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("template.json")).unwrap()).unwrap();
    assert_eq!(meta["recipe"], "image");
    assert_eq!(meta["uid_shift"], shift);
    assert_eq!(meta["image"]["format"], "oci-layout");
    assert_eq!(meta["image"]["layers"], 2);
    assert_eq!(
        meta["image"]["config"]["cmd"],
        json!(["/bin/sh", "-c", "cat /marker"])
    );
    assert_eq!(meta["image"]["config"]["env"], json!(["A=1"]));

    // Listed; a taken name, a generated name and an image for arm64.
    let ls = cubicle(data.path(), &["tpl", "ls", "--local"]).ok();
    let row = ls
        .lines()
        .find(|l| l.starts_with("oci-test "))
        .unwrap_or_else(|| panic!("{ls}"));
    assert!(row.contains("oci-layout:sha256:"), "{row}");
    let again = cubicle(
        data.path(),
        &[
            "tpl",
            "create-from-image",
            "--image",
            layout_arg,
            "--template-id",
            "oci-test",
        ],
    );
    assert_ne!(again.code, 0);
    assert!(
        again.stderr.contains("template 'oci-test' exists already"),
        "{}",
        again.stderr
    );
    // A `docker save` tarball of the same layers, with a generated name.
    let saved = images.path().join("saved.tar");
    write_docker_save(&saved, &base);
    let generated = cubicle(
        data.path(),
        &[
            "tpl",
            "create-from-image",
            "--image",
            saved.to_str().unwrap(),
        ],
    )
    .ok();
    let id = generated
        .strip_prefix("built ")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{generated}"));
    assert!(id.starts_with("tpl-"), "{generated}");
    let rootfs = data.path().join("templates").join(id).join("rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("marker")).unwrap(),
        "from the image\n"
    );
    assert!(!rootfs.join("etc/gone").exists(), "whiteout applied");
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(rootfs.with_file_name("template.json")).unwrap()).unwrap();
    assert_eq!(meta["image"]["format"], "docker-archive");
    cubicle(data.path(), &["tpl", "rm", id]).ok();
    let arm = images.path().join("arm");
    write_layout(&arm, &base, "arm64");
    let refused = cubicle(
        data.path(),
        &[
            "tpl",
            "create-from-image",
            "--image",
            arm.to_str().unwrap(),
            "--template-id",
            "arm",
        ],
    );
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("the image is for linux/arm64, not linux/amd64"),
        "{}",
        refused.stderr
    );
    assert!(!data.path().join("templates/arm").exists());

    // A sandbox of it, through the daemon and the runtime.
    let d = Daemon::start_with_templates(&data.path().join("templates"));
    let sbx = d
        .cli(&["sandbox", "create", "-t", "oci-test", "--timeout", "60"])
        .ok();
    let sbx = sbx.trim().to_owned();
    let out = d
        .cli(&[
            "sandbox",
            "exec",
            &sbx,
            "--",
            "/bin/sh",
            "-c",
            "'cat /marker'",
        ])
        .ok();
    assert_eq!(out, "from the image\n");
    let out = d
        .cli(&[
            "sandbox",
            "exec",
            &sbx,
            "test -e /etc/gone && echo present || echo gone",
        ])
        .ok();
    assert_eq!(out, "gone\n");
    d.cli(&["sandbox", "kill", &sbx]).ok();
}
