//! Template build jobs through a real daemon: `cubicle tpl create-from-image` submits a
//! job and follows its phases to a usable template; the E2B template endpoints (list,
//! get with builds, build status, aliases, delete) answer in E2B's shapes; a template in
//! use cannot be removed or rebuilt; failed builds (a corrupted layer, no /bin/sh) and a
//! daemon killed mid-build leave no template behind; a running build shows the
//! progress of each layer of its image.
//!
//! Each test's daemon gets a private templates directory (the images' userland is
//! copied from the `base` template of $CUBICLE_DATA_DIR, which must be built). Needs
//! root, like the other tests here.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::images::{
    big_layer, corrupt_layer, gzip, marker_layer, userland_layer, write_index, write_layout,
    write_manifest,
};
use support::Daemon;

/// An empty templates directory the sandboxes' root can traverse.
fn private_templates() -> tempfile::TempDir {
    support::private_dir("cubicle-tpl-jobs-", 0o755)
}

/// What is in a templates directory besides the lock file.
fn entries(dir: &Path) -> Vec<String> {
    all_entries(dir)
        .into_iter()
        .filter(|n| !n.starts_with(".old-"))
        .collect()
}

/// Everything but the lock, also `.old-*` directories still being deleted.
fn all_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    names.sort();
    names
}

/// Waits (30 s at most) until `dir` holds nothing but the lock: the daemon deletes
/// removed and replaced templates on a thread of its own, after renaming them aside.
fn assert_empty_soon(dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = all_entries(dir);
        if left.is_empty() {
            return;
        }
        assert!(
            left.iter().all(|n| n.starts_with(".old-")),
            "not being deleted: {left:?}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "never deleted: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `GET path` with the daemon's key: status and JSON body.
fn get(d: &Daemon, path: &str) -> (u16, Value) {
    let addr = d.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nX-API-Key: {}\r\nConnection: close\r\n\r\n",
        d.key
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status: u16 = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, value)
}

/// The build id `tpl create-from-image` printed first ("build <id> of template ...").
fn build_id_of(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("build "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no build id in:\n{stderr}"))
        .to_owned()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn an_image_build_job_goes_through_its_phases_to_a_template_with_a_lifecycle() {
    let base = support::base_rootfs();
    let images = tempfile::tempdir().unwrap();
    let layout = images.path().join("layout");
    write_layout(&layout, &base, "amd64");
    let templates = private_templates();
    let d = Daemon::start_with_templates(templates.path());
    let name = "jobs-image";

    let run = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        layout.to_str().unwrap(),
        "--template-id",
        name,
        "--expose-port",
        "8080",
        "--cpu",
        "1",
        "--memory",
        "256M",
    ]);
    let stderr = run.stderr.clone();
    let stdout = run.ok();
    assert!(
        stdout.starts_with(&format!("built {name} from {}", layout.display())),
        "{stdout}"
    );
    assert!(stdout.contains(" 2 layers"), "{stdout}");
    let build_id = build_id_of(&stderr);
    let mut last = 0;
    for line in [
        ": queued",
        "== unpacking",
        "layer 1/2 (sha256:",
        ": verified ",
        "layer 2/2 (sha256:",
        ": unpacked ",
        "== building",
        "added the account user",
        "== snapshotting",
        "is ready",
    ] {
        let at = stderr
            .find(line)
            .unwrap_or_else(|| panic!("no {line:?} in:\n{stderr}"));
        assert!(at >= last, "{line:?} out of order in:\n{stderr}");
        last = at;
    }
    assert_eq!(entries(templates.path()), [name]);

    // E2B's shapes: the list, one template with its builds, the build's status.
    let (s, list) = get(&d, "/templates");
    assert_eq!(s, 200);
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["templateID"] == name)
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(listed["buildStatus"], "ready");
    assert_eq!(listed["buildID"], build_id.as_str());
    assert!(listed.get("builds").is_none());
    let (s, one) = get(&d, &format!("/templates/{name}"));
    assert_eq!(s, 200, "{one}");
    let builds = one["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 1);
    for field in [
        "buildID",
        "status",
        "createdAt",
        "updatedAt",
        "finishedAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "envdVersion",
    ] {
        assert!(builds[0].get(field).is_some(), "no {field}: {}", builds[0]);
    }
    assert_eq!(
        (&builds[0]["status"], &builds[0]["phase"]),
        (&json!("ready"), &json!("ready"))
    );
    assert_eq!(one["meta"]["image"]["layers"], 2);
    assert_eq!(one["meta"]["sandbox"]["expose_ports"], json!([8080]));
    assert_eq!(one["meta"]["sandbox"]["cpu_count"], 1);
    assert_eq!(one["meta"]["sandbox"]["memory_mb"], 256);

    let status_path = format!("/templates/{name}/builds/{build_id}/status");
    let (s, status) = get(&d, &status_path);
    assert_eq!(s, 200, "{status}");
    assert_eq!(status["templateID"], name);
    assert_eq!(status["buildID"], build_id.as_str());
    assert_eq!(status["status"], "ready");
    assert_eq!(status["phase"], "ready");
    assert!(status.get("reason").is_none());
    let logs = status["logs"].as_array().unwrap();
    let entries_ = status["logEntries"].as_array().unwrap();
    assert!(logs.len() > 5 && logs.len() == entries_.len(), "{status}");
    for e in entries_ {
        assert!(e["timestamp"].as_str().unwrap().ends_with('Z'), "{e}");
        assert_eq!(e["level"], "info");
        assert!(e["message"].is_string());
    }
    let (_, tail) = get(&d, &format!("{status_path}?logsOffset={}", logs.len() - 1));
    assert_eq!(tail["logs"], json!([logs.last().unwrap()]));
    assert_eq!(tail["nextLogsOffset"], logs.len());
    let (s, alias) = get(&d, &format!("/templates/aliases/{name}"));
    assert_eq!(
        (s, alias),
        (200, json!({"templateID": name, "public": false}))
    );
    let (s, v) = get(&d, &format!("/templates/{name}/builds/nope/status"));
    assert_eq!((s, v["code"].clone()), (404, json!(404)), "{v}");

    // The CLI's views.
    let info = d.cli(&["tpl", "info", name]).ok();
    for line in [
        "name: ",
        "source: ",
        "(oci-layout)",
        "layers: ",
        "exposed ports: ",
        "8080",
        "memory: ",
        "256 MiB",
        "builds: ",
        &build_id,
    ] {
        assert!(info.contains(line), "no {line:?} in:\n{info}");
    }
    let info = d.cli(&["tpl", "info", name, "--json"]);
    assert_eq!(info.json()["builds"][0]["buildID"], build_id.as_str());
    let local = d.cli(&["tpl", "info", "--local", name, "--json"]);
    // --local reads the data dir: this daemon's, whose templates/ is the private dir.
    assert_eq!(local.json()["image"]["layers"], 2, "{}", local.stdout);
    let ls = d.cli(&["tpl", "ls"]).ok();
    assert!(ls.lines().any(|l| l.starts_with(name)), "{ls}");

    // In use by a sandbox: neither removed nor rebuilt; the message says by what.
    let sbx = d.create_sandbox(name, 120);
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
    let refused = d.cli(&["tpl", "rm", name]).code(1);
    assert!(
        refused.stderr.contains(&format!(
            "cannot delete template '{name}': it is in use: sandboxes {sbx} (running)"
        )),
        "{}",
        refused.stderr
    );
    let refused = d.cli(&["tpl", "rebuild", name]).code(1);
    assert!(refused.stderr.contains("in use"), "{}", refused.stderr);
    assert_eq!(entries(templates.path()), [name]);
    d.cli(&["sandbox", "kill", &sbx]).ok();

    // A rebuild repeats the recorded request as a second build.
    let rebuilt = d.cli(&["tpl", "rebuild", name]);
    let rebuild_id = build_id_of(&rebuilt.stderr);
    let stdout = rebuilt.ok();
    assert!(
        stdout.starts_with(&format!("built {name} from ")),
        "{stdout}"
    );
    assert_ne!(rebuild_id, build_id);
    let (_, one) = get(&d, &format!("/templates/{name}"));
    assert_eq!(one["builds"].as_array().unwrap().len(), 2);
    assert_eq!(one["buildID"], rebuild_id.as_str());
    assert_eq!(one["meta"]["sandbox"]["expose_ports"], json!([8080]));

    // Now nothing uses it.
    d.cli(&["tpl", "rm", name]).ok();
    assert_empty_soon(templates.path());
    let (s, _) = get(&d, &format!("/templates/{name}"));
    assert_eq!(s, 404);
    let (s, _) = get(&d, &format!("/templates/aliases/{name}"));
    assert_eq!(s, 404);
    let gone = d.cli(&["tpl", "rm", name]).code(1);
    assert!(gone.stderr.contains("not found"), "{}", gone.stderr);
}

#[test]
fn failed_builds_say_why_and_leave_no_template() {
    let base = support::base_rootfs();
    let images = tempfile::tempdir().unwrap();
    let templates = private_templates();
    let d = Daemon::start_with_templates(templates.path());

    // A layer whose bytes do not match its digest: the request's fault.
    let corrupt = images.path().join("corrupt");
    write_layout(&corrupt, &base, "amd64");
    corrupt_layer(&corrupt, 1);
    let run = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        corrupt.to_str().unwrap(),
        "--template-id",
        "jobs-corrupt",
    ]);
    let build = build_id_of(&run.stderr);
    let run = run.code(1);
    assert!(
        run.stderr.contains(
            "error: building template 'jobs-corrupt' failed while unpacking: layer 2/2 (sha256:"
        ),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("digest mismatch"), "{}", run.stderr);
    let (s, status) = get(
        &d,
        &format!("/templates/jobs-corrupt/builds/{build}/status"),
    );
    assert_eq!(s, 200);
    assert_eq!(status["status"], "error");
    assert_eq!(status["phase"], "failed");
    assert_eq!(status["reason"]["step"], "unpacking");
    assert_eq!(status["reason"]["fault"], "user");
    assert!(
        status["reason"]["message"]
            .as_str()
            .unwrap()
            .contains("digest mismatch"),
        "{status}"
    );
    let last = status["logEntries"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["level"], "error");

    // No /bin/sh in the image.
    let shell_less = images.path().join("no-shell");
    let m = write_manifest(
        &shell_less,
        "amd64",
        json!({"Cmd": ["/marker"]}),
        &[(&marker_layer(), false)],
    );
    write_index(&shell_less, m, "latest");
    let run = d
        .cli(&[
            "tpl",
            "create-from-image",
            "--image",
            shell_less.to_str().unwrap(),
            "--template-id",
            "jobs-no-shell",
        ])
        .code(1);
    assert!(run.stderr.contains("/bin/sh"), "{}", run.stderr);
    assert!(
        run.stderr.contains("failed while building"),
        "{}",
        run.stderr
    );

    // Nothing of either is left: no template, no build directory.
    assert_empty_soon(templates.path());
    let (s, _) = get(&d, "/templates/jobs-corrupt");
    assert_eq!(s, 404);

    // Refused before any job: a bad name, a built-in's, a missing daemon key.
    let bad = d
        .cli(&[
            "tpl",
            "create-from-image",
            "--image",
            "/x",
            "--template-id",
            "Bad_Name",
        ])
        .code(1);
    assert!(bad.stderr.contains("invalid templateID"), "{}", bad.stderr);
    let builtin = d
        .cli(&[
            "tpl",
            "create-from-image",
            "--image",
            "/x",
            "--template-id",
            "base",
        ])
        .code(1);
    assert!(
        builtin.stderr.contains("built-in template"),
        "{}",
        builtin.stderr
    );
    let no_key = d
        .cli_env(
            &["tpl", "create-from-image", "--image", "/x"],
            &[("E2B_API_URL", &d.url)],
        )
        .code(1);
    assert!(
        no_key.stderr.contains("builds through the daemon"),
        "{}",
        no_key.stderr
    );
    let unreachable = d
        .cli_env(
            &["tpl", "create-from-image", "--image", "/x"],
            &[
                ("E2B_API_URL", &format!("http://{}", support::free_addr())),
                ("E2B_API_KEY", &d.key),
            ],
        )
        .code(1);
    assert!(
        unreachable.stderr.contains("cannot reach the Cubicle API"),
        "{}",
        unreachable.stderr
    );
}

#[test]
fn a_running_build_shows_the_progress_of_each_layer() {
    let base = support::base_rootfs();
    let images = tempfile::tempdir().unwrap();
    let layout = images.path().join("big");
    // 256 MiB to verify and unpack: each stage takes long enough to be seen mid-way.
    let (userland, big) = (userland_layer(&base), big_layer("big/zeros", 256));
    let m = write_manifest(
        &layout,
        "amd64",
        json!({"Cmd": ["/bin/sh"]}),
        &[(&userland, true), (&big, false)],
    );
    write_index(&layout, m, "latest");
    // What the status reports as each layer's total: the size of its blob.
    let sizes = [gzip(&userland).len() as u64, big.len() as u64];
    let templates = private_templates();
    let d = Daemon::start_with_templates(templates.path());
    let api = d.api();
    let name = "jobs-progress";
    let mut request = cubicle_client::ImageBuild::new(layout.to_str().unwrap());
    request.template_id = Some(name.into());
    let started = block_on(api.build_image(&request)).unwrap();
    let status_path = format!("/templates/{name}/builds/{}/status", started.build_id);

    // Poll until it ends: every observation of a layer is consistent, its bytes only
    // grow within a stage, and the big layer is caught mid-unpack.
    let mut seen: Vec<(u64, String, u64)> = Vec::new();
    let mut mid_unpack = false;
    let mut partial = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = loop {
        let (s, v) = get(&d, &status_path);
        assert_eq!(s, 200, "{v}");
        if v["status"] != "building" {
            break v;
        }
        for l in v["layers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let index = l["index"].as_u64().unwrap();
            let (stage, done, total) = (
                l["stage"].as_str().unwrap().to_owned(),
                l["done"].as_u64().unwrap(),
                l["total"].as_u64().unwrap(),
            );
            assert_eq!(l["count"], 2, "{l}");
            assert_eq!(l["cached"], false, "{l}");
            assert!(l["digest"].as_str().unwrap().starts_with("sha256:"), "{l}");
            assert_eq!(total, sizes[index as usize - 1], "{l}");
            assert!(done <= total, "{l}");
            assert!(["verifying", "unpacking"].contains(&stage.as_str()), "{l}");
            if let Some(before) = seen.iter().rev().find(|(i, _, _)| *i == index) {
                if before.1 == stage {
                    assert!(done >= before.2, "went back: {before:?} then {l}");
                } else {
                    assert_eq!(
                        (before.1.as_str(), stage.as_str()),
                        ("verifying", "unpacking")
                    );
                }
            }
            partial |= done > 0 && done < total;
            mid_unpack |= index == 2 && stage == "unpacking" && done < total;
            seen.push((index, stage, done));
        }
        assert!(Instant::now() < deadline, "still running: {v}");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(last["status"], "ready", "{last}");
    assert!(
        last.get("layers").is_none(),
        "an ended build has no layers: {last}"
    );
    assert!(mid_unpack, "layer 2 never seen unpacking: {seen:?}");
    assert!(partial, "no layer seen part-way: {seen:?}");
    // The client reads the same field (empty once ended), and the log has one line per
    // layer and stage.
    let status = block_on(api.build_status(name, &started.build_id, 0)).unwrap();
    assert!(status.layers.is_empty());
    for i in 1..=2 {
        for stage in ["verified", "unpacked"] {
            let n = status
                .logs
                .iter()
                .filter(|l| l.starts_with(&format!("layer {i}/2 (sha256:")))
                .filter(|l| l.contains(&format!("): {stage} ")))
                .count();
            assert_eq!(n, 1, "layer {i} {stage}: {:?}", status.logs);
        }
    }
    d.cli(&["tpl", "rm", name]).ok();
    assert_empty_soon(templates.path());
}

#[test]
fn a_daemon_killed_during_a_build_fails_the_job_and_leaves_nothing() {
    let base = support::base_rootfs();
    let images = tempfile::tempdir().unwrap();
    let layout = images.path().join("big");
    // 384 MiB to verify and unpack: long enough to be caught mid-build.
    let m = write_manifest(
        &layout,
        "amd64",
        json!({"Cmd": ["/bin/sh"]}),
        &[
            (&userland_layer(&base), true),
            (&big_layer("big/zeros", 384), false),
        ],
    );
    write_index(&layout, m, "latest");
    let templates = private_templates();
    let mut d = Daemon::start_with_templates(templates.path());
    let api = d.api();
    let mut request = cubicle_client::ImageBuild::new(layout.to_str().unwrap());
    request.template_id = Some("jobs-killed".into());
    let started = block_on(api.build_image(&request)).unwrap();
    assert_eq!(started.phase, "queued");
    // A second build waits for the first (one at a time).
    let small = images.path().join("small");
    write_layout(&small, &base, "amd64");
    let mut second = cubicle_client::ImageBuild::new(small.to_str().unwrap());
    second.template_id = Some("jobs-waiting".into());
    let waiting = block_on(api.build_image(&second)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = block_on(api.build_status("jobs-killed", &started.build_id, 0)).unwrap();
        assert!(
            !status.is_finished(),
            "finished before the kill: {status:?}"
        );
        if status.phase == "unpacking" || status.phase == "building" {
            break;
        }
        assert!(Instant::now() < deadline, "never unpacking: {status:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let queued = block_on(api.build_status("jobs-waiting", &waiting.build_id, 0)).unwrap();
    assert_eq!(
        (queued.phase.as_str(), queued.status.as_str()),
        ("queued", "building")
    );
    d.kill();
    let left = entries(templates.path());
    assert!(
        left.iter().any(|e| e.starts_with(".build-jobs-killed-")),
        "the kill did not catch the build in progress: {left:?}"
    );

    d.restart();
    let status = block_on(d.api().build_status("jobs-killed", &started.build_id, 0)).unwrap();
    assert_eq!(status.status, "error");
    assert_eq!(status.phase, "failed");
    let reason = status.reason.unwrap();
    assert_eq!(reason.message, cubicle_control::RESTARTED);
    assert_eq!(reason.fault.as_deref(), Some("internal"));
    assert_empty_soon(templates.path());
    let (s, _) = get(&d, "/templates/jobs-killed");
    assert_eq!(s, 404);
    let queued = block_on(d.api().build_status("jobs-waiting", &waiting.build_id, 0)).unwrap();
    assert_eq!(queued.phase, "failed");
    assert_eq!(queued.reason.unwrap().message, cubicle_control::RESTARTED);
    // The daemon builds again after the restart (--json: the template's object).
    let after = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        small.to_str().unwrap(),
        "--template-id",
        "jobs-after",
        "--json",
    ]);
    let v = after.json();
    assert_eq!(v["templateID"], "jobs-after");
    assert_eq!(v["builds"][0]["status"], "ready");
    assert_eq!(v["meta"]["image"]["format"], "oci-layout");
    assert_eq!(entries(templates.path()), ["jobs-after"]);

    // With no daemon answering, `tpl rm` changes the data dir itself.
    d.stop();
    let rm = d
        .cli_env(
            &["tpl", "rm", "jobs-after"],
            &[("E2B_API_URL", &d.url), ("E2B_API_KEY", &d.key)],
        )
        .code(0);
    assert!(
        rm.stderr.contains("cannot reach the Cubicle API") && rm.stderr.contains("directly"),
        "{}",
        rm.stderr
    );
    assert_empty_soon(templates.path());
}
