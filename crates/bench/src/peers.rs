//! Peers: other ways to start a process on the same rootfs, timed from spawn to exit of
//! their launcher (as `hyperfine` would), running `/bin/true`.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why a peer cannot be measured.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Unknown peer name.
    #[error("unknown peer '{0}' (known: crun, runc, bwrap)")]
    Unknown(String),
    /// The peer's binary is not installed.
    #[error("{0} is not installed (apt-get install {0})")]
    NotInstalled(&'static str),
    /// Preparing or running the peer failed.
    #[error("{peer}: {message}")]
    Failed {
        /// Which peer.
        peer: String,
        /// What happened.
        message: String,
    },
}

/// Something that can start `/bin/true` in the rootfs, once per call.
pub trait Peer: Send {
    /// Its name in reports.
    fn name(&self) -> &str;
    /// Starts it once and waits for it to finish; returns the wall time.
    fn run_once(&mut self) -> Result<Duration, PeerError>;
}

/// Creates the named peer for `rootfs`.
pub fn make(name: &str, rootfs: &Path) -> Result<Box<dyn Peer>, PeerError> {
    match name {
        "crun" => Ok(Box::new(Oci::new("crun", rootfs)?)),
        "runc" => Ok(Box::new(Oci::new("runc", rootfs)?)),
        "bwrap" => {
            which("bwrap").ok_or(PeerError::NotInstalled("bubblewrap"))?;
            Ok(Box::new(Bwrap {
                rootfs: rootfs.to_owned(),
            }))
        }
        other => Err(PeerError::Unknown(other.to_owned())),
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// An OCI runtime (`crun run` / `runc run`) with a bundle whose root is the rootfs,
/// read-only, and whose process is `/bin/true`.
struct Oci {
    bin: &'static str,
    bundle: tempfile::TempDir,
    runs: u64,
    /// crun 1.8 refuses hybrid cgroup layouts; it runs in a private mount namespace
    /// without `/sys/fs/cgroup/unified` there (the workaround from the facts sheet).
    hide_unified: bool,
}

impl Oci {
    fn new(bin: &'static str, rootfs: &Path) -> Result<Self, PeerError> {
        which(bin).ok_or(PeerError::NotInstalled(bin))?;
        let failed = |message: String| PeerError::Failed {
            peer: bin.into(),
            message,
        };
        let bundle = tempfile::tempdir().map_err(|e| failed(e.to_string()))?;
        let out = Command::new(bin)
            .args(["spec", "-b"])
            .arg(bundle.path())
            .output()
            .map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(format!(
                "spec: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let path = bundle.path().join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| failed(e.to_string()))?;
        let mut config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| failed(e.to_string()))?;
        config["root"] = serde_json::json!({"path": rootfs, "readonly": true});
        config["process"]["terminal"] = false.into();
        config["process"]["args"] = serde_json::json!(["/bin/true"]);
        std::fs::write(&path, config.to_string()).map_err(|e| failed(e.to_string()))?;
        let hybrid = bin == "crun" && Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists();
        Ok(Oci {
            bin,
            bundle,
            runs: 0,
            hide_unified: hybrid,
        })
    }
}

impl Peer for Oci {
    fn name(&self) -> &str {
        self.bin
    }

    fn run_once(&mut self) -> Result<Duration, PeerError> {
        self.runs += 1;
        let id = format!("cubicle-bench-{}-{}", std::process::id(), self.runs);
        let mut cmd = Command::new(self.bin);
        cmd.args(["run", "-b"])
            .arg(self.bundle.path())
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if self.hide_unified {
            // SAFETY: only syscalls between fork and exec.
            unsafe {
                cmd.pre_exec(hide_cgroup2);
            }
        }
        let started = Instant::now();
        let out = cmd.output().map_err(|e| PeerError::Failed {
            peer: self.bin.into(),
            message: e.to_string(),
        })?;
        let took = started.elapsed();
        if !out.status.success() {
            return Err(PeerError::Failed {
                peer: self.bin.into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(took)
    }
}

fn hide_cgroup2() -> io::Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    umount2("/sys/fs/cgroup/unified", MntFlags::MNT_DETACH)?;
    Ok(())
}

/// bubblewrap with every namespace it can unshare, the rootfs read-only as `/`.
struct Bwrap {
    rootfs: PathBuf,
}

impl Peer for Bwrap {
    fn name(&self) -> &str {
        "bwrap"
    }

    fn run_once(&mut self) -> Result<Duration, PeerError> {
        let started = Instant::now();
        let out = Command::new("bwrap")
            .args(["--unshare-all", "--ro-bind"])
            .arg(&self.rootfs)
            .args(["/", "--proc", "/proc", "--dev", "/dev", "/bin/true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| PeerError::Failed {
                peer: "bwrap".into(),
                message: e.to_string(),
            })?;
        let took = started.elapsed();
        if !out.status.success() {
            return Err(PeerError::Failed {
                peer: "bwrap".into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(took)
    }
}
