//! `--writable-layer-size` end to end: a template built from an OCI image with a 64 MiB
//! writable layer, its sandboxes through the daemon's API; writing past 64 MiB fails
//! with ENOSPC inside, and so it does in every sandbox that comes from one of them (a
//! snapshot, a clone, a rollback, a hibernated sandbox woken up). Bad sizes are refused
//! with a clear error.
//!
//! Needs root and the `base` template (its files make the image's userland).

mod support;

use std::fs;

use support::images::write_layout;
use support::Daemon;

fn cubicle(data: &std::path::Path, args: &[&str]) -> support::Run {
    support::cubicle_local(data, args, &[])
}

/// Fills the writable layer from inside `sandbox` (the image has bash and cat, no dd):
/// asserts the write fails with ENOSPC, then empties the file again.
fn assert_full_at_the_limit(d: &Daemon, sandbox: &str) {
    let run = d.cli(&[
        "sandbox",
        "exec",
        sandbox,
        "cat /dev/zero > /home/user/fill",
    ]);
    assert_ne!(run.code, 0, "{sandbox}: writing without end succeeded");
    assert!(
        run.stderr.contains("No space left on device"),
        "{sandbox}: {}",
        run.stderr
    );
    d.cli(&["sandbox", "exec", sandbox, ": > /home/user/fill"])
        .ok();
}

#[test]
fn a_templates_writable_layer_size_holds_through_the_api() {
    let base = support::base_rootfs();
    let images = tempfile::tempdir().unwrap();
    let layout = images.path().join("layout");
    write_layout(&layout, &base, "amd64");
    let data = support::private_dir("cubicle-layer-test-", 0o711);
    let build = |size: &str, name: &str| {
        cubicle(
            data.path(),
            &[
                "tpl",
                "create-from-image",
                "--local",
                "--image",
                layout.to_str().unwrap(),
                "--template-id",
                name,
                "--writable-layer-size",
                size,
            ],
        )
    };

    // Bad sizes: clear errors, no template.
    for (size, message) in [
        ("1M", "out of range for a writable layer: 16M"),
        ("64Q", "unknown unit in '64Q'"),
        ("big", "'big' is not a size"),
    ] {
        let run = build(size, "bad-size");
        assert_ne!(run.code, 0, "{size} accepted");
        assert!(run.stderr.contains(message), "{size}: {}", run.stderr);
    }
    assert!(!data.path().join("templates/bad-size").exists());

    build("64M", "layer-64m").ok();
    let meta: serde_json::Value = serde_json::from_slice(
        &fs::read(data.path().join("templates/layer-64m/template.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["sandbox"]["writable_layer_mib"], 64, "{meta:#}");

    let d = Daemon::start_with_templates(&data.path().join("templates"));
    let create = |template: &str| d.create_sandbox(template, 120);
    let sbx = create("layer-64m");
    // Its disk is the limit.
    let got = d.cli(&["sandbox", "get", &sbx, "--json"]).json();
    assert_eq!(got["diskSizeMB"], 64, "{got:#}");
    assert_full_at_the_limit(&d, &sbx);
    // What is in the layer stays when it is snapshotted; sandboxes from the snapshot
    // are limited like their source.
    d.cli(&["sandbox", "exec", &sbx, "echo kept > /home/user/kept"])
        .ok();
    let snapshot = d
        .cli(&["sandbox", "snapshot", &sbx, "--name", "limited"])
        .ok()
        .trim()
        .to_owned();
    let restored = create(&snapshot);
    assert_eq!(
        d.cli(&["sandbox", "exec", &restored, "cat /home/user/kept"])
            .ok(),
        "kept\n"
    );
    assert_full_at_the_limit(&d, &restored);
    // A clone (fork).
    let clones = d.cli(&["sandbox", "clone", &sbx]).ok();
    let clone = clones
        .split_whitespace()
        .next()
        .expect("a clone id")
        .to_owned();
    assert_full_at_the_limit(&d, &clone);
    // A rollback to its own snapshot.
    d.cli(&["sandbox", "rollback", &sbx, &snapshot]).ok();
    assert_full_at_the_limit(&d, &sbx);
    // Hibernated and woken up.
    d.cli(&["sandbox", "pause", "--hibernate", &sbx]).ok();
    d.cli(&["sandbox", "resume", &sbx]).ok();
    assert_full_at_the_limit(&d, &sbx);

    for id in [&sbx, &restored, &clone] {
        d.cli(&["sandbox", "kill", id]).ok();
    }
    // Nothing stays mounted once they are gone and the daemon stopped (its ready-made
    // layers go with it).
    let mounted = |d: &Daemon| {
        let dir = d.dir.path().display().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&dir)))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let mut d = d;
    d.stop();
    assert_eq!(mounted(&d), Vec::<String>::new(), "mounts left behind");
}
