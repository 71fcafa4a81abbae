//! A real `cubicle serve` on a private data dir and free port, and the `cubicle` CLI
//! pointed at it through `E2B_API_URL` / `E2B_API_KEY`.
//!
//! Needs root and the `base` template (in `$CUBICLE_DATA_DIR`, default
//! /var/lib/cubicle), like the agent's tests; without them the tests fail with a message
//! saying so. The daemon runs the `cubicle-agent` built next to the `cubicle` binary
//! (`cargo test --workspace` builds both), or `$CUBICLE_AGENT_BIN`.

#![allow(dead_code)]

pub mod images;
pub mod registry;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cubicle_core::DataDir;
use cubicle_runtime::ns::{NsConfig, NsRuntime};
use cubicle_runtime::Runtime;

/// The `cubicle` binary under test.
pub fn cubicle_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cubicle"))
}

/// The agent the daemon starts in sandboxes.
fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CUBICLE_AGENT_BIN") {
        return p.into();
    }
    let next_to = cubicle_bin().with_file_name("cubicle-agent");
    assert!(
        next_to.is_file(),
        "{} is missing: build it with `cargo build -p cubicle-agent` (cargo test \
         --workspace does) or set CUBICLE_AGENT_BIN",
        next_to.display()
    );
    next_to
}

/// Where the templates are.
pub fn templates_dir() -> PathBuf {
    let root = std::env::var("CUBICLE_DATA_DIR").unwrap_or_else(|_| DataDir::DEFAULT.into());
    Path::new(&root).join("templates")
}

/// A running daemon; stopped (and any sandbox it left destroyed) when dropped.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub key: String,
    child: Option<Child>,
}

impl Daemon {
    pub fn start() -> Daemon {
        let templates = templates_dir();
        assert!(
            templates.join("base/template.json").is_file(),
            "base template not built in {}: run `cubicle tpl build base`",
            templates.display()
        );
        Daemon::start_with_templates(&templates)
    }

    /// A daemon whose data dir's `templates/` is a symlink to `templates`.
    pub fn start_with_templates(templates: &Path) -> Daemon {
        assert_eq!(
            nix::unistd::geteuid().as_raw(),
            0,
            "these tests run `cubicle serve`, which needs root (namespaces, cgroups)"
        );
        let dir = tempfile::Builder::new()
            .prefix("cubicle-cli-test-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::os::unix::fs::symlink(templates, dir.path().join("templates")).unwrap();
        let addr = free_addr();
        let mut daemon = Daemon {
            url: format!("http://{addr}"),
            key: String::new(),
            dir,
            child: None,
        };
        daemon.spawn();
        daemon.key = std::fs::read_to_string(daemon.dir.path().join("initial-api-key"))
            .expect("initial-api-key")
            .trim()
            .to_owned();
        daemon
    }

    /// Starts `cubicle serve` on this data dir and address; returns once it answers.
    fn spawn(&mut self) {
        let addr = self.url.trim_start_matches("http://").to_owned();
        let log = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(name))
                .unwrap()
        };
        let child = Command::new(cubicle_bin())
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(["serve", "--listen", &addr])
            .env("CUBICLE_AGENT_BIN", agent_bin())
            .env("CUBICLE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log("serve.out"))
            .stderr(log("serve.err"))
            .spawn()
            .expect("spawn cubicle serve");
        self.child = Some(child);
        self.wait_ready(&addr);
    }

    /// SIGKILL: the daemon dies at once, as in a crash (sandboxes keep running).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts the daemon again (after [`Daemon::kill`] or [`Daemon::stop`]), same data
    /// dir, address and key.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.spawn();
    }

    /// A typed API client for this daemon.
    pub fn api(&self) -> cubicle_client::ApiClient {
        cubicle_client::ApiClient::new(&self.url, &self.key).unwrap()
    }

    fn wait_ready(&mut self, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if health(addr) {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("cubicle serve exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "cubicle serve not ready in 20 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("serve.out"), read("serve.err"))
    }

    /// `cubicle <args>` with this daemon's URL and key in the environment.
    pub fn cli(&self, args: &[&str]) -> Run {
        self.cli_env(
            args,
            &[("E2B_API_URL", &self.url), ("E2B_API_KEY", &self.key)],
        )
    }

    /// A sandbox of `template` (through `cubicle sandbox create`), living `timeout` s: its id.
    pub fn create_sandbox(&self, template: &str, timeout: u32) -> String {
        let timeout = timeout.to_string();
        self.cli(&["sandbox", "create", "-t", template, "--timeout", &timeout])
            .ok()
            .trim()
            .to_owned()
    }

    /// The output of `script` run in sandbox `id` (`cubicle sandbox exec`), which must
    /// succeed.
    pub fn exec(&self, id: &str, script: &str) -> String {
        self.cli(&["sandbox", "exec", id, script]).ok()
    }

    /// `cubicle <args>` with exactly these E2B/Cubicle variables set.
    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(cubicle_bin());
        for var in [
            "E2B_API_URL",
            "E2B_API_KEY",
            "E2B_SANDBOX_URL",
            "CUBICLE_API_KEY",
        ] {
            cmd.env_remove(var);
        }
        // The data dir is only for `tpl ls --local`; never the real one.
        cmd.env("CUBICLE_DATA_DIR", self.dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.args(args).stdin(Stdio::null()).output().unwrap();
        Run::new(args, out)
    }

    /// Sandboxes with a directory in the data dir (running or not cleaned up).
    pub fn sandbox_dirs(&self) -> Vec<String> {
        match std::fs::read_dir(self.dir.path().join("sandboxes")) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// SIGTERM, and wait for the daemon to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Our own child, not yet reaped: the pid cannot have been recycled.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        // A daemon that did not stop cleanly leaves ready-made writable layers mounted;
        // a new pool removes those of dead processes.
        drop(cubicle_runtime::ns::quota::LayerPool::new(DataDir::new(
            self.dir.path(),
        )));
        let left = self.sandbox_dirs();
        if left.is_empty() {
            return;
        }
        if std::thread::panicking() {
            eprintln!("daemon log:\n{}", self.log());
        }
        // Sandboxes outlive the daemon by design; a failed test must not leak them.
        let runtime = NsRuntime::new(NsConfig::new(DataDir::new(self.dir.path()), agent_bin()))
            .expect("runtime for clean-up");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for id in runtime.residues().await.unwrap_or_default() {
                let _ = runtime.destroy(&id).await;
            }
        });
    }
}

/// A finished CLI run.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn new(args: &[&str], out: Output) -> Run {
        Run {
            args: args.iter().map(|a| a.to_string()).collect(),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts the exit code and returns self.
    #[track_caller]
    pub fn code(self, expected: i32) -> Run {
        assert_eq!(
            self.code, expected,
            "cubicle {:?}: exit {} (expected {expected})\nstdout: {}\nstderr: {}",
            self.args, self.code, self.stdout, self.stderr
        );
        self
    }

    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(self) -> String {
        self.code(0).stdout
    }

    /// stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// `cubicle --data-dir <data> <args>` without an API key (it works on the data dir,
/// no daemon), with `env` added to its environment.
pub fn cubicle_local(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = Command::new(cubicle_bin())
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("E2B_API_KEY")
        .env_remove("CUBICLE_API_KEY")
        .env_remove("CUBICLE_REGISTRY_PASSWORD")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run::new(args, out)
}

/// A loopback address with a port nobody listens on right now.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET /health` answers 200.
fn health(addr: &str) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}

/// Cgroup directories still named after sandbox `id` (v1 controllers and v2).
pub fn cgroups_of(id: &str) -> Vec<PathBuf> {
    // Each data dir has its own parent (`cubicle` or `cubicle-<hash>`), in every v1
    // hierarchy or in the v2 root.
    let root = Path::new("/sys/fs/cgroup");
    let mut hierarchies = vec![root.to_owned()];
    if let Ok(entries) = std::fs::read_dir(root) {
        hierarchies.extend(entries.flatten().map(|e| e.path()));
    }
    let mut found = Vec::new();
    for h in hierarchies {
        let Ok(parents) = std::fs::read_dir(&h) else {
            continue;
        };
        for parent in parents.flatten() {
            let name = parent.file_name().to_string_lossy().into_owned();
            let dir = parent.path().join(id);
            if (name == "cubicle" || name.starts_with("cubicle-")) && dir.exists() {
                found.push(dir);
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The `base` template's rootfs, whose files the tests' images copy. Building templates
/// needs root, and the template must be built (like every test here).
pub fn base_rootfs() -> PathBuf {
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
    base
}

/// A new directory under /tmp with `mode` (0711 for a data dir, 0755 for a templates
/// dir): the sandboxes' unprivileged root must traverse it.
pub fn private_dir(prefix: &str, mode: u32) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    dir
}
