//! A real registry on loopback for the tests: Debian's `docker-registry` (distribution
//! 2.8) on a free 127.0.0.1 port, storing in a temporary directory, optionally behind
//! htpasswd basic auth; images pushed to it from OCI layouts with `skopeo`. The registry
//! is stopped and its storage deleted when dropped.
//!
//! Needs the Debian packages `docker-registry`, `skopeo` and `apache2-utils`
//! (`htpasswd`), which `scripts/setup` installs; without them the tests fail saying so.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// How long the registry may take to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running registry; killed when dropped.
pub struct Registry {
    /// Config, htpasswd, storage and log.
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`.
    pub addr: String,
    /// The user name and password it requires, if any.
    pub creds: Option<(String, String)>,
    child: Child,
}

fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(tool).is_file();
    assert!(
        found,
        "`{tool}` is not installed: run `apt-get install {package}` (scripts/setup does)"
    );
}

impl Registry {
    /// A registry anyone may pull from and push to.
    pub fn start() -> Registry {
        Registry::start_inner(None)
    }

    /// A registry that requires `user` and `password` (htpasswd, bcrypt).
    pub fn start_with_auth(user: &str, password: &str) -> Registry {
        Registry::start_inner(Some((user.to_owned(), password.to_owned())))
    }

    fn start_inner(creds: Option<(String, String)>) -> Registry {
        need("docker-registry", "docker-registry");
        need("skopeo", "skopeo");
        let dir = tempfile::Builder::new()
            .prefix("cubicle-registry-")
            .tempdir()
            .unwrap();
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).unwrap();
        let addr = super::free_addr();
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        if let Some((user, password)) = &creds {
            need("htpasswd", "apache2-utils");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .unwrap();
            assert!(out.status.success(), "htpasswd: {out:?}");
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: cubicle-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let mut registry = Registry {
            dir,
            addr,
            creds,
            child,
        };
        registry.wait_ready();
        registry
    }

    /// Polls `GET /v2/` until it answers 200 (401 with auth), failing if the registry
    /// exits or takes longer than [`READY_TIMEOUT`].
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let expected = if self.creds.is_some() { 401 } else { 200 };
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("docker-registry exited ({status}):\n{}", self.log());
            }
            if http_status(&self.addr, "/v2/") == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry on {} did not answer GET /v2/ with {expected} within {READY_TIMEOUT:?}:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:<port>/<repo_tag>`.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    fn creds_arg(&self, flag: &str) -> Vec<String> {
        match &self.creds {
            Some((u, p)) => vec![flag.to_owned(), format!("{u}:{p}")],
            None => Vec::new(),
        }
    }

    /// Pushes the image tagged `tag` in the OCI layout `layout` as `repo_tag`
    /// (`--all`: every platform of a multi-platform image).
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str, all: bool) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--dest-tls-verify=false"]);
        if all {
            cmd.arg("--all");
        }
        cmd.args(self.creds_arg("--dest-creds"))
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.reference(repo_tag)));
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "skopeo copy to {repo_tag} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The manifest or index `repo_tag` points to, as the registry serves it (skopeo
    /// may have compressed layers on the way, so digests are not the layout's).
    pub fn raw_manifest(&self, repo_tag: &str) -> Vec<u8> {
        let out = Command::new("skopeo")
            .args([
                "--insecure-policy",
                "inspect",
                "--raw",
                "--tls-verify=false",
            ])
            .args(self.creds_arg("--creds"))
            .arg(format!("docker://{}", self.reference(repo_tag)))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo inspect: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// [`Registry::raw_manifest`] parsed.
    pub fn manifest(&self, repo_tag: &str) -> serde_json::Value {
        serde_json::from_slice(&self.raw_manifest(repo_tag)).unwrap()
    }

    /// The digests of the layers of the image manifest `repo_tag` points to.
    pub fn layers(&self, repo_tag: &str) -> Vec<String> {
        self.manifest(repo_tag)["layers"]
            .as_array()
            .expect("an image manifest")
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The digest of what `repo_tag` points to (manifest or index).
    pub fn digest(&self, repo_tag: &str) -> String {
        let hex: String = Sha256::digest(self.raw_manifest(repo_tag))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256:{hex}")
    }

    /// The file the registry serves the blob `digest` from.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// What the registry logged (including its access log).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many blob downloads (`GET /v2/<repo>/blobs/sha256:...`) it has served.
    pub fn blob_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status of `GET <path>` on `addr`, or `None` if it does not answer.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace().nth(1)?.parse().ok()
}
