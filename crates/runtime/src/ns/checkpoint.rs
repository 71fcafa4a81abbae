//! Checkpoints of `ns` sandboxes with CRIU: writing one while the sandbox runs, and
//! restoring one as a new sandbox.
//!
//! A checkpoint directory holds:
//!
//! ```text
//! checkpoint.json   what it was taken from (layers, uid shift, host name, cost)
//! images/           CRIU's images of every process of the sandbox
//! upper/            the sandbox's layers above the template, flattened, taken with the
//!                   memory; never written afterwards (restores hard-link its files)
//! agent.log         the agent's log (its open file must exist on restore)
//! ```
//!
//! **Checkpoint:** freeze the sandbox's cgroup, `criu dump --leave-running` of its pid 1
//! (the bind mounts from the host named as external mounts; the netns and the cgroups
//! left to the runtime), copy the writable layer while still frozen (so files and memory
//! agree; unchanged files linked from the previous checkpoint, see `tree_copy`), thaw.
//!
//! **Restore:** a new sandbox directory whose base layer is hard links to the
//! checkpoint's `upper/` under an empty writable layer, its cgroups created with limits,
//! then `criu restore` started inside
//! them (so every restored process is born there, under a new cgroup namespace) and in a
//! mount namespace of its own with the overlay mounted, so nothing stays mounted on the
//! host; external mounts map to the new sandbox's run directory and the current agent
//! binary; the network namespace is a new one with loopback up; and the host name is
//! the new sandbox id (rewritten in the UTS image and in `/etc/hostname` /
//! `/etc/hosts`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::RuntimeError;

/// The metadata file of a checkpoint directory.
pub const META_FILE: &str = "checkpoint.json";
/// Format of [`CheckpointMeta`]; a restore refuses other versions.
pub const FORMAT: u32 = 1;

/// What a checkpoint was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointMeta {
    /// [`FORMAT`].
    pub format: u32,
    /// Template layers, top first.
    pub layers: Vec<PathBuf>,
    /// Host uid of the sandbox's root.
    pub uid_shift: u32,
    /// The sandbox's host name (its id) when the checkpoint was taken.
    pub hostname: String,
    /// Bytes of images and writable layer.
    pub size_bytes: u64,
    /// How long the sandbox was frozen, microseconds.
    pub frozen_us: u64,
    /// The stored agent binary its processes ran (see `agent_store`); a restore mounts
    /// this one, not the runtime's current agent. Absent in older checkpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_bin: Option<PathBuf>,
}

/// The CRIU binary: `$CUBICLE_CRIU`, else `/usr/local/sbin/criu` (what `scripts/criu`
/// installs), else `criu` on the PATH.
pub fn criu_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CUBICLE_CRIU") {
        return PathBuf::from(p);
    }
    let local = Path::new("/usr/local/sbin/criu");
    if local.is_file() {
        return local.to_owned();
    }
    PathBuf::from("criu")
}

/// The key CRIU knows an external (host bind) mount by: its path in the sandbox with
/// `/` made `-`.
pub fn external_key(mount_point: &Path) -> String {
    mount_point
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "-")
}

/// Arguments of `criu dump` for a sandbox whose pid 1 is `pid`.
pub fn dump_args(pid: i32, images: &Path, freezer: &Path, externals: &[PathBuf]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "dump".into(),
        "--leave-running".into(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        images.display().to_string(),
        "-o".into(),
        "dump.log".into(),
        // A process CRIU cannot seize within this is reported (and the dump retried).
        "--timeout".into(),
        "2".into(),
        "--freeze-cgroup".into(),
        freezer.display().to_string(),
        // Loopback is the sandbox's only network; nothing outside can reach its sockets
        // while it is frozen.
        "--network-lock".into(),
        "skip".into(),
    ];
    args.extend(common_args());
    for point in externals {
        args.push("--external".into());
        args.push(format!("mnt[{}]:{}", point.display(), external_key(point)));
    }
    args
}

/// Where each external mount of a restored sandbox comes from on the host.
#[derive(Debug, Clone)]
pub struct RestoreMounts {
    /// The new sandbox's run directory (`/run/cubicle` inside).
    pub run_dir: PathBuf,
    /// The agent binary (`/run/cubicle/cubicle-agent` inside).
    pub agent_bin: PathBuf,
}

/// Arguments of `criu restore` of `images` onto the overlay at `root`.
pub fn restore_args(
    images: &Path,
    root: &Path,
    pidfile: &Path,
    externals: &[PathBuf],
    mounts: &RestoreMounts,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "restore".into(),
        "-d".into(),
        "-D".into(),
        images.display().to_string(),
        "-o".into(),
        "restore.log".into(),
        "--root".into(),
        root.display().to_string(),
        "--pidfile".into(),
        pidfile.display().to_string(),
    ];
    args.extend(common_args());
    for point in externals {
        let source = match point.to_str() {
            Some(super::message::SANDBOX_RUN_DIR) => mounts.run_dir.clone(),
            Some(super::message::SANDBOX_AGENT_BIN) => mounts.agent_bin.clone(),
            Some(p) if p.starts_with("/dev/") => point.clone(),
            // Masked /proc files are /dev/null.
            _ => PathBuf::from("/dev/null"),
        };
        args.push("--external".into());
        args.push(format!("mnt[{}]:{}", external_key(point), source.display()));
    }
    args
}

/// What `criu dump` and `criu restore` are both told.
fn common_args() -> impl Iterator<Item = String> {
    [
        "--tcp-established",
        "--file-locks",
        // The netns has only loopback, and nothing of it is kept: the restore makes a
        // new one with `lo` up (scripts/criu-patches/0004). Dumping and restoring its
        // addresses, routes and rules would run ip and iptables ten times, ~60 ms.
        "--empty-ns",
        "net",
        // The runtime owns the cgroups: a restore runs in the new sandbox's cgroups
        // (`CgroupManager::self_move_files`), so CRIU neither reads them on a dump
        // nor mounts and fills them on a restore (~15 ms each).
        "--manage-cgroups=ignore",
    ]
    .into_iter()
    .map(String::from)
}

/// Runs CRIU with `args` in `workdir` (its log goes there); the error carries the log's
/// error lines.
pub fn run_criu(
    op: &'static str,
    mut cmd: Command,
    args: &[String],
    log: &Path,
) -> Result<(), RuntimeError> {
    let program = PathBuf::from(cmd.get_program());
    let out = cmd
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| RuntimeError::Checkpoint {
            op,
            message: format!(
                "cannot run {} (install it with scripts/criu, or set CUBICLE_CRIU): {e}",
                program.display()
            ),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = log_text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(RuntimeError::Checkpoint {
        op,
        message: format!(
            "criu {} ({}): {}",
            args.first().map(String::as_str).unwrap_or(""),
            out.status,
            if errors.is_empty() {
                stderr.trim().to_owned()
            } else {
                errors.join("; ")
            }
        ),
    })
}

/// Copies the tree (or file) `from` to `to`, which must not exist, keeping everything an
/// overlay's writable layer holds; files `reuse` knows unchanged are hard-linked from
/// its copy (`tree_copy`).
pub fn copy_tree(
    from: &Path,
    to: &Path,
    reuse: Option<&super::tree_copy::LayerOrigin>,
) -> Result<super::tree_copy::Copied, RuntimeError> {
    super::tree_copy::copy_tree(from, to, reuse).map_err(|source| RuntimeError::Io {
        op: "copy",
        path: from.to_owned(),
        source,
    })
}

/// [`tree_copy::link_tree`](super::tree_copy::link_tree): `to` with hard links to the
/// files of `from`, a tree nobody writes.
pub fn link_tree(from: &Path, to: &Path) -> Result<(), RuntimeError> {
    super::tree_copy::link_tree(from, to).map_err(|source| RuntimeError::Io {
        op: "link",
        path: from.to_owned(),
        source,
    })
}

/// [`tree_copy::merge_upper`](super::tree_copy::merge_upper): the writable layer
/// `upper` applied onto `onto`, a flattened copy of the layer below it.
pub fn merge_upper(
    upper: &Path,
    onto: &Path,
    reuse: Option<&super::tree_copy::LayerOrigin>,
) -> Result<super::tree_copy::Copied, RuntimeError> {
    super::tree_copy::merge_upper(upper, onto, reuse).map_err(|source| RuntimeError::Io {
        op: "copy",
        path: upper.to_owned(),
        source,
    })
}

/// Bytes of regular files under `dir`.
pub fn tree_size(dir: &Path) -> u64 {
    fn walk(dir: &Path, total: &mut u64) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                walk(&e.path(), total);
            } else if md.is_file() {
                *total += md.len();
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total);
    total
}

/// Asks the agent behind `socket` to end every other connection from the host (its
/// `POST /_cubicle/quiesce`), and returns once the agent has closed this connection too,
/// so no host connection is left in the agent.
pub async fn quiesce_agent(socket: &Path) -> Result<(), RuntimeError> {
    host_request(socket, QUIESCE_PATH, b"", true)
        .await
        .map_err(|message| RuntimeError::Checkpoint {
            op: "checkpoint",
            message: format!("closing the host's connections to the agent: {message}"),
        })
}

/// A host-only `POST path` to the agent behind `socket` on a connection of its own,
/// which the agent closes after its answer (`204` expected). With `until_closed`, it
/// returns only once the agent's end of the connection is closed, not just shut down.
async fn host_request(
    socket: &Path,
    path: &str,
    body: &[u8],
    until_closed: bool,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(&[head.as_bytes(), body].concat())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .map_err(|_| "no answer within 10 s".to_owned())?
    .map_err(|e| e.to_string())?;
    if until_closed {
        // End of file means the agent shut down its side; a write fails with EPIPE once
        // its socket is closed.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline {
            match stream.write(b"\n").await {
                Ok(_) => tokio::time::sleep(std::time::Duration::from_micros(100)).await,
                Err(_) => break,
            }
        }
    }
    let status_line = answer.split(|b| *b == b'\n').next().unwrap_or_default();
    if status_line.starts_with(b"HTTP/1.1 204") {
        Ok(())
    } else {
        Err(format!(
            "the agent answered {:?}",
            String::from_utf8_lossy(status_line).trim()
        ))
    }
}

/// Whether a dump failed for a passing reason worth another try: a connection from the
/// host that reached the agent after it had ended the others, or a process caught in
/// the middle of a fork when the sandbox froze (CRIU cannot seize it).
pub fn is_transient_dump_error(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::Checkpoint { message, .. }
        if message.contains("unix: Unix socket") || message.contains("Unseizable"))
}

/// The agent's host-only request that ends every other host connection.
pub const QUIESCE_PATH: &str = "/_cubicle/quiesce";
/// The agent's host-only request that sets a restored sandbox's identity.
pub const IDENTITY_PATH: &str = "/_cubicle/identity";

/// Gives the agent of a restored sandbox its new id, access token and env vars.
pub async fn set_agent_identity(
    socket: &Path,
    identity: &super::message::AgentIdentity,
) -> Result<(), RuntimeError> {
    let failed = |message: String| RuntimeError::Checkpoint {
        op: "restore",
        message: format!("giving the agent its new identity: {message}"),
    };
    let body = serde_json::to_vec(identity).map_err(|e| failed(e.to_string()))?;
    host_request(socket, IDENTITY_PATH, &body, false)
        .await
        .map_err(failed)
}

/// Microseconds since `start`.
pub fn micros_since(start: Instant) -> u64 {
    start.elapsed().as_micros().try_into().unwrap_or(u64::MAX)
}

/// CRIU image magic numbers of a UTS namespace image (`utsns-<id>.img`), from CRIU's
/// `criu/include/magic.h`.
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const UTSNS_MAGIC: u32 = 0x5447_3203;

/// Rewrites the host name in a CRIU UTS namespace image: the image is two magic words,
/// then one length-prefixed `UtsnsEntry { nodename = 1; domainname = 2 }` protobuf.
pub fn rewrite_utsns(image: &[u8], hostname: &str) -> Result<Vec<u8>, String> {
    let word = |at: usize| -> Result<u32, String> {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "UTS image too short".to_owned())
    };
    if word(0)? != IMG_COMMON_MAGIC && word(0)? != UTSNS_MAGIC {
        return Err(format!("not a CRIU image (magic {:#x})", word(0)?));
    }
    let (header, entry_at) = if word(0)? == IMG_COMMON_MAGIC {
        (8, 8)
    } else {
        (4, 4)
    };
    if word(header - 4)? != UTSNS_MAGIC {
        return Err("not a UTS namespace image".into());
    }
    let len = word(entry_at)? as usize;
    let body = image
        .get(entry_at + 4..entry_at + 4 + len)
        .ok_or("UTS image truncated")?;
    // Keep every field but the node name.
    let mut fields = Vec::new();
    let mut at = 0;
    while at < body.len() {
        let key = body[at];
        at += 1;
        if key & 7 != 2 {
            return Err(format!(
                "unexpected protobuf wire type in UTS image: {key:#x}"
            ));
        }
        let (n, used) = read_varint(&body[at..]).ok_or("bad varint in UTS image")?;
        at += used;
        let value = body
            .get(at..at + n as usize)
            .ok_or("UTS image field truncated")?;
        at += n as usize;
        if key >> 3 != 1 {
            fields.push((key, value.to_vec()));
        }
    }
    let mut entry = Vec::new();
    push_field(&mut entry, 0x0a, hostname.as_bytes());
    for (key, value) in fields {
        push_field(&mut entry, key, &value);
    }
    let mut out = image[..entry_at].to_vec();
    out.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    out.extend_from_slice(&entry);
    out.extend_from_slice(&image[entry_at + 4 + len..]);
    Ok(out)
}

fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn push_field(out: &mut Vec<u8>, key: u8, value: &[u8]) {
    out.push(key);
    let mut n = value.len() as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(value);
}

/// Writes `/etc/hostname` and `/etc/hosts` naming `hostname` into a writable layer, as
/// init does at create, owned by the sandbox's root (`uid_shift`).
pub fn write_host_files(upper: &Path, hostname: &str, uid_shift: u32) -> Result<(), RuntimeError> {
    let etc = upper.join("etc");
    let io = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| RuntimeError::Io { op, path, source }
    };
    if !etc.exists() {
        std::fs::create_dir(&etc).map_err(io("create", &etc))?;
        std::os::unix::fs::chown(&etc, Some(uid_shift), Some(uid_shift))
            .map_err(io("chown", &etc))?;
    }
    for (name, text) in [
        ("hostname", format!("{hostname}\n")),
        ("hosts", super::init::hosts_file(hostname)),
    ] {
        let path = etc.join(name);
        std::fs::write(&path, text).map_err(io("write", &path))?;
        std::os::unix::fs::chown(&path, Some(uid_shift), Some(uid_shift))
            .map_err(io("chown", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utsns_image(nodename: &str, domainname: &str) -> Vec<u8> {
        let mut entry = Vec::new();
        push_field(&mut entry, 0x0a, nodename.as_bytes());
        push_field(&mut entry, 0x12, domainname.as_bytes());
        let mut img = Vec::new();
        img.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        img.extend_from_slice(&UTSNS_MAGIC.to_le_bytes());
        img.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        img.extend_from_slice(&entry);
        img
    }

    #[test]
    fn the_host_name_is_rewritten_and_the_domain_kept() {
        let img = utsns_image("oldsandboxid", "(none)");
        let new = rewrite_utsns(&img, "a-much-longer-new-sandbox-id").unwrap();
        assert_eq!(new, utsns_image("a-much-longer-new-sandbox-id", "(none)"));
        assert!(rewrite_utsns(&img[..10], "x").is_err());
        assert!(rewrite_utsns(b"not an image at all", "x").is_err());
    }

    #[test]
    fn a_missing_criu_is_named_in_the_error() {
        let err = run_criu(
            "checkpoint",
            Command::new("/nonexistent/criu"),
            &["dump".to_owned()],
            Path::new("/nonexistent/dump.log"),
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("cannot run /nonexistent/criu") && message.contains("scripts/criu"),
            "{message}"
        );
    }

    #[test]
    fn a_failing_criu_reports_its_log_errors() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("dump.log");
        std::fs::write(
            &log,
            "(00.001) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE\n\
             (00.002) Error (criu/sk-unix.c:351): unix: Unix socket 7 not found\n",
        )
        .unwrap();
        let err = run_criu("checkpoint", Command::new("false"), &[], &log).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("Unix socket 7 not found"), "{message}");
        assert!(!message.contains("RLIMIT_NOFILE"), "{message}");
        assert!(is_transient_dump_error(&err));
    }

    fn restore_args_for_test(externals: &[PathBuf]) -> Vec<String> {
        let mounts = RestoreMounts {
            run_dir: PathBuf::from("/data/sandboxes/new/run"),
            agent_bin: PathBuf::from("/usr/local/bin/cubicle-agent"),
        };
        restore_args(
            Path::new("/i"),
            Path::new("/r"),
            Path::new("/p"),
            externals,
            &mounts,
        )
    }

    #[test]
    fn dump_and_restore_name_the_same_external_mounts() {
        let externals = vec![
            PathBuf::from("/dev/null"),
            PathBuf::from("/proc/keys"),
            PathBuf::from(super::super::message::SANDBOX_RUN_DIR),
            PathBuf::from(super::super::message::SANDBOX_AGENT_BIN),
        ];
        let dump = dump_args(7, Path::new("/i"), Path::new("/f"), &externals);
        assert!(
            dump.contains(&"mnt[/proc/keys]:proc-keys".to_string()),
            "{dump:?}"
        );
        assert!(dump.contains(&"--leave-running".to_string()));
        // Both sides agree on what is not in the images (the netns, the cgroups).
        for args in [&dump, &restore_args_for_test(&externals)] {
            for flag in ["--empty-ns", "--manage-cgroups=ignore", "--tcp-established"] {
                assert!(args.contains(&flag.to_string()), "{flag}: {args:?}");
            }
        }
        let restore = restore_args_for_test(&externals);
        for expected in [
            "mnt[dev-null]:/dev/null",
            "mnt[proc-keys]:/dev/null",
            "mnt[run-cubicle]:/data/sandboxes/new/run",
            "mnt[run-cubicle-cubicle-agent]:/usr/local/bin/cubicle-agent",
        ] {
            assert!(
                restore.contains(&expected.to_string()),
                "{expected}: {restore:?}"
            );
        }
    }
}
