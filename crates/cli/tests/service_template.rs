//! Templates whose image runs a service: `tpl create-from-image` starts the image's
//! entrypoint (`python3 -m http.server`) in a sandbox, probes it, checkpoints it; a
//! sandbox of the template answers on the service's port through the daemon's proxy
//! (`Host: {port}-{id}.{domain}`) as soon as its create returns, also when forked. The
//! overrides (`--cmd/--arg/--env/--workdir/--user`, `--cpu/--memory`) change what runs;
//! a probe that never answers and a service that exits fail the build with the reason
//! and the service's last output, leaving no template, sandbox or cgroup.
//!
//! The image is one layer of the `base` template's root filesystem (it has python3),
//! written by the test as an OCI layout directory and as a `docker save` archive.
//! Needs root and the `base` template, like the other tests here.

mod support;

use std::fs;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::json;
use support::images::{base_layer, write_one_layer_docker_save, write_one_layer_layout};
use support::{templates_dir, Daemon};

/// One HTTP/1.1 request to the daemon; returns the status and the body.
fn http(d: &Daemon, method: &str, path: &str, host: &str, body: &str) -> (u16, String) {
    let addr = d.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nX-API-KEY: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        d.key,
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// `GET /` of `port` in sandbox `id` through the proxy, by host name.
fn get_port(d: &Daemon, id: &str, port: u16) -> (u16, String) {
    let listen = d.url.trim_start_matches("http://127.0.0.1:");
    let host = format!("{port}-{id}.localhost:{listen}");
    http(d, "GET", "/", &host, "")
}

#[test]
fn templates_with_a_service_answer_right_after_create() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "building templates needs root"
    );
    let base = templates_dir().join("base/rootfs");
    assert!(
        base.join("usr/bin/python3").is_file(),
        "base template (with python3) not built in {}: run `cubicle tpl build base`",
        templates_dir().display()
    );
    let images = tempfile::tempdir().unwrap();
    let layer = base_layer(&base);
    let config = json!({
        "Entrypoint": ["python3", "-m", "http.server"],
        "Cmd": ["8000"],
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello from the image"],
        "WorkingDir": "/srv",
        "ExposedPorts": {"8000/tcp": {}}
    });
    let layout = images.path().join("layout");
    write_one_layer_layout(&layout, &layer, &config);
    let saved = images.path().join("saved.tar");
    write_one_layer_docker_save(&saved, &layer, &config);
    drop(layer);
    // A daemon whose templates are the test's own (with `base`, to compare create times
    // with); the CLI builds into its data dir, as an operator would, so the template's
    // checkpoint names the layers by the paths the daemon uses.
    let tpl_root = support::private_dir("cubicle-svc-test-", 0o711);
    let own_templates = tpl_root.path().join("templates");
    fs::create_dir(&own_templates).unwrap();
    std::os::unix::fs::symlink(templates_dir().join("base"), own_templates.join("base")).unwrap();
    let d = Daemon::start_with_templates(&own_templates);
    let data = &d.dir;
    let templates = data.path().join("templates");

    // From the OCI layout, as the image says, probed on the image's port.
    let t0 = Instant::now();
    let built = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        layout.to_str().unwrap(),
        "--template-id",
        "svc",
        "--probe",
        "8000",
        "--probe-timeout",
        "30",
    ]);
    let build_secs = t0.elapsed().as_secs_f64();
    let stderr = built.stderr.clone();
    let out = built.ok();
    assert!(stderr.contains("== snapshotting"), "{stderr}");
    assert!(
        out.contains("service: python3 -m http.server 8000 as root in /srv"),
        "{out}"
    );
    assert!(out.contains("exposed ports: 8000"), "{out}");
    // The snapshotting phase's line of the build's log.
    assert!(
        stderr.contains("answered the probe (HTTP/1.0 200 OK)"),
        "{stderr}"
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(templates.join("svc/template.json")).unwrap()).unwrap();
    let sandbox = &meta["sandbox"];
    assert_eq!(
        sandbox["service"]["argv"],
        json!(["python3", "-m", "http.server", "8000"])
    );
    assert_eq!(sandbox["expose_ports"], json!([8000]));
    assert_eq!(sandbox["env"]["GREETING"], "hello from the image");
    assert_eq!(
        sandbox["probe"],
        json!({"port": 8000, "path": "/", "timeout_secs": 30})
    );
    assert!(templates.join("svc/checkpoint/checkpoint.json").is_file());

    // From the `docker save` archive, with every override.
    let built = d
        .cli(&[
            "tpl",
            "create-from-image",
            "--image",
            saved.to_str().unwrap(),
            "--template-id",
            "svc-over",
            "--cmd",
            "python3",
            "--arg",
            "-m",
            "--arg",
            "http.server",
            "--arg",
            "9000",
            "--env",
            "GREETING=overridden",
            "--workdir",
            "/tmp/www",
            "--user",
            "user",
            "--expose-port",
            "9000",
            "--probe",
            "9000",
            "--cpu",
            "1",
            "--memory",
            "512M",
        ])
        .ok();
    assert!(
        built.contains("service: python3 -m http.server 9000 as user in /tmp/www"),
        "{built}"
    );

    // Builds that fail: a probe nobody answers, a service that exits. Nothing is left.
    let t0 = Instant::now();
    let never = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        layout.to_str().unwrap(),
        "--template-id",
        "svc-never",
        "--probe",
        "8001",
        "--probe-timeout",
        "2",
    ]);
    assert_ne!(never.code, 0);
    assert!(
        never.stderr.contains(
            "the service did not answer the probe GET / on port 8001 within 2 s \
             (last attempt: nothing listens on port 8001); it is still running"
        ),
        "{}",
        never.stderr
    );
    assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    let exits = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        layout.to_str().unwrap(),
        "--template-id",
        "svc-exits",
        "--cmd",
        "sh",
        "--arg",
        "-c",
        "--arg",
        "echo starting up; echo cannot bind >&2; exit 3",
        "--probe",
        "8000",
    ]);
    assert_ne!(exits.code, 0);
    for part in [
        "the service ended before answering the probe on port 8000 (GET /)",
        "the service exited with status 3",
        "starting up\ncannot bind",
    ] {
        assert!(
            exits.stderr.contains(part),
            "no {part:?} in {}",
            exits.stderr
        );
    }
    // Refused before anything runs.
    let refused = d.cli(&[
        "tpl",
        "create-from-image",
        "--image",
        layout.to_str().unwrap(),
        "--template-id",
        "svc-refused",
        "--user",
        "nobody-here",
    ]);
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("the service's user \"nobody-here\" is not in the image's /etc/passwd"),
        "{}",
        refused.stderr
    );
    for name in ["svc-never", "svc-exits", "svc-refused"] {
        assert!(!templates.join(name).exists(), "{name} left behind");
    }
    let left: Vec<_> = fs::read_dir(data.path().join("sandboxes"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "sandboxes left behind: {left:?}");

    // Sandboxes: the service answers as soon as create returns.
    let sbx = d.create_sandbox("svc", 120);
    let (status, body) = get_port(&d, &sbx, 8000);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Directory listing for /"), "{body}");
    assert_eq!(d.exec(&sbx, "echo $GREETING"), "hello from the image\n");
    // Commands through envd work as before, next to the service.
    let ps = d.exec(&sbx, "ps -o user=,args= -C python3");
    assert!(ps.contains("root     python3 -m http.server 8000"), "{ps}");

    // A fork has the service running too.
    let listen = d.url.trim_start_matches("http://").to_owned();
    let (status, body) = http(
        &d,
        "POST",
        &format!("/sandboxes/{sbx}/fork"),
        &listen,
        r#"{"count": 1, "timeout": 60}"#,
    );
    assert_eq!(status, 201, "{body}");
    let forks: serde_json::Value = serde_json::from_str(&body).unwrap();
    let fork = forks[0]["sandbox"]["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = get_port(&d, &fork, 8000);
    assert_eq!(status, 200, "{body}");

    // The overrides: another port, user, cwd and env.
    let over = d.create_sandbox("svc-over", 120);
    let (status, body) = get_port(&d, &over, 9000);
    assert_eq!(status, 200, "{body}");
    let seen = d.exec(
        &over,
        "p=$(pgrep -x python3); stat -c %U /proc/$p; readlink /proc/$p/cwd; \
         tr '\\0' '\\n' < /proc/$p/environ | grep ^GREETING=",
    );
    assert_eq!(seen, "user\n/tmp/www\nGREETING=overridden\n");
    let (status, body) = http(&d, "GET", &format!("/sandboxes/{over}"), &listen, "");
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (info["cpuCount"].clone(), info["memoryMB"].clone()),
        (json!(1), json!(512))
    );
    let (status, _) = get_port(&d, &over, 8000);
    assert_eq!(status, 502, "nothing listens on 8000 in this one");

    // How long creates take: restored with the service vs. a plain template.
    let timed = |template: &str| {
        let mut ms: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                let id = d.create_sandbox(template, 120);
                let took = t.elapsed().as_secs_f64() * 1000.0;
                d.cli(&["sandbox", "kill", &id]).ok();
                took
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        ms[2]
    };
    let with_service = timed("svc");
    let plain = timed("base");
    eprintln!(
        "measured: build from the layout (incl. snapshotting) {build_secs:.1} s; \
         `cubicle sandbox create` median of 5: template with a service {with_service:.0} ms, \
         base {plain:.0} ms"
    );
    for id in [&sbx, &fork, &over] {
        d.cli(&["sandbox", "kill", id]).ok();
    }
}
