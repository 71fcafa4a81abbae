//! `cubicle tpl create-from-image` end to end: an OCI image written by the test (two
//! layers: a few programs copied from the `base` template, then a marker file and a
//! whiteout), built by a daemon (a build job) into a private templates directory,
//! listed, and started as a sandbox that runs `cat /marker`; the same layers as a
//! `docker save` tarball; a taken name and an arm64 image refused.
//!
//! Needs root and the `base` template (its files make the image's userland), like the
//! other tests here.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;

use serde_json::json;
use support::images::{write_docker_save, write_layout};
use support::Daemon;

#[test]
fn template_from_an_oci_layout_runs_a_sandbox() {
    let base = support::base_rootfs();
    let images = tempfile::tempdir().unwrap();
    let layout = images.path().join("layout");
    write_layout(&layout, &base, "amd64");
    // The templates must be traversable by the sandboxes' unprivileged root.
    let templates = support::private_dir("cubicle-oci-test-", 0o755);
    let d = Daemon::start_with_templates(templates.path());
    let layout_arg = layout.to_str().unwrap();

    let built = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        layout_arg,
        "--template-id",
        "oci-test",
    ]);
    let stderr = built.stderr.clone();
    let stdout = built.ok();
    assert!(stdout.starts_with("built oci-test from "), "{stdout}");
    assert!(stdout.contains(" 2 layers"), "{stdout}");
    // Its cmd is a one-shot command: it runs in every sandbox, nothing is checkpointed
    // (the build's log says so).
    assert!(
        stderr.contains("the service exited with status 0 within a second"),
        "{stderr}"
    );
    assert!(!templates.path().join("oci-test/checkpoint").exists());
    for i in 1..=2 {
        for stage in ["verified", "unpacked"] {
            assert!(
                stderr
                    .lines()
                    .any(|l| l.contains(&format!("layer {i}/2 (sha256:"))
                        && l.contains(&format!("): {stage} "))),
                "layer {i} not {stage} in:\n{stderr}"
            );
        }
    }
    assert!(
        stderr.contains("added the account user"),
        "no account in:\n{stderr}"
    );

    // The same store as `tpl build`: shifted owners, template.json with the image.
    let dir = templates.path().join("oci-test");
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
    let ls = d.cli(&["tpl", "ls", "--local"]).ok();
    let row = ls
        .lines()
        .find(|l| l.starts_with("oci-test "))
        .unwrap_or_else(|| panic!("{ls}"));
    assert!(row.contains("oci-layout:sha256:"), "{row}");
    let again = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        layout_arg,
        "--template-id",
        "oci-test",
    ]);
    assert_ne!(again.code, 0);
    assert!(
        again.stderr.contains("template 'oci-test' exists already"),
        "{}",
        again.stderr
    );
    // A `docker save` tarball of the same layers, with a generated name.
    let saved = images.path().join("saved.tar");
    write_docker_save(&saved, &base);
    let generated = d
        .cli(&[
            "tpl",
            "create-from-image",
            "--image",
            saved.to_str().unwrap(),
        ])
        .ok();
    let id = generated
        .strip_prefix("built ")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("{generated}"));
    assert!(id.starts_with("tpl-"), "{generated}");
    let rootfs = templates.path().join(id).join("rootfs");
    assert_eq!(
        fs::read_to_string(rootfs.join("marker")).unwrap(),
        "from the image\n"
    );
    assert!(!rootfs.join("etc/gone").exists(), "whiteout applied");
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(rootfs.with_file_name("template.json")).unwrap()).unwrap();
    assert_eq!(meta["image"]["format"], "docker-archive");
    d.cli(&["tpl", "rm", id]).ok();
    let arm = images.path().join("arm");
    write_layout(&arm, &base, "arm64");
    let refused = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        arm.to_str().unwrap(),
        "--template-id",
        "arm",
    ]);
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("the image is for linux/arm64, not linux/amd64"),
        "{}",
        refused.stderr
    );
    assert!(!templates.path().join("arm").exists());

    // A sandbox of it, through the daemon and the runtime.
    let sbx = d.create_sandbox("oci-test", 60);
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
