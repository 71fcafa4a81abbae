//! The zygote's side of its start: what `cubicle-agent zygote` does between the clone
//! and the `execve` of Python.
//!
//! It runs as root of the zygote's fresh user namespace (the host uid base on the host),
//! already in its own mount, network, ipc and uts namespaces, with the control socket
//! (`SOCK_SEQPACKET`) on fd 3. One linear sequence, each step named in a failure report:
//!
//! 1. read the [`ZygoteSpec`] (the first message on fd 3)
//! 2. stdio: `/dev/null` in, the zygote's log out
//! 3. private mounts; the root: the template's layers under a tmpfs upper (writable,
//!    thrown away with the zygote); /dev as in a sandbox; the host's /proc and /sys
//!    (a sandbox may mount its own proc and sysfs only where these are visible)
//! 4. `pivot_root`, keeping the host's tree at [`HOST_DIR`]
//! 5. the template's kernel user (`user`), keeping only `CAP_SETUID`, `CAP_SETGID` and
//!    `CAP_SETFCAP` (ambient, to write the id maps of the sandboxes it forks)
//! 6. `execve` of the template's `python3` with the kernel program in template-zygote
//!    mode; fd 3 stays the control socket.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sys::socket::{recv, send, MsgFlags};
use nix::unistd::{chdir, pivot_root, sethostname};

use super::super::init::{bind, io_err, mkdir, populate_dev, redirect_stdio, SpecialDirs};
use super::super::message::SYNC_FD;
use super::super::security::caps::{self, Cap};
use super::super::sys;
use super::{ZygoteSpec, HOST_DIR};

/// What the zygote keeps: enough to write the id maps of the sandboxes it forks
/// (`CAP_SETFCAP` because those maps include root, see user_namespaces(7)).
const ZYGOTE_CAPS: &[Cap] = &[Cap::Setuid, Cap::Setgid, Cap::Setfcap];
/// The user kernels run as (E2B's default user).
const KERNEL_USER: &str = "user";

/// A failed step and why.
#[derive(Debug)]
struct SetupError {
    step: &'static str,
    source: io::Error,
}

trait StepExt<T> {
    fn step(self, step: &'static str) -> Result<T, SetupError>;
}

impl<T, E: Into<io::Error>> StepExt<T> for Result<T, E> {
    fn step(self, step: &'static str) -> Result<T, SetupError> {
        self.map_err(|e| SetupError {
            step,
            source: e.into(),
        })
    }
}

/// Entry point of `cubicle-agent zygote`: sets the zygote up and executes
/// `python3 -c <python_program> --template-zygote`. Never returns: on failure it reports
/// the step on the control socket and exits.
pub fn run(python_program: &str) -> ! {
    // SAFETY: fd 3 is the control socket the runtime placed there before exec; nothing
    // else in this fresh process owns it.
    let control = unsafe { OwnedFd::from_raw_fd(SYNC_FD) };
    let err = match set_up(&control, python_program) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    let report = serde_json::json!({
        "type": "failed",
        "step": err.step,
        "message": err.source.to_string(),
    });
    let _ = send(
        control.as_raw_fd(),
        report.to_string().as_bytes(),
        MsgFlags::MSG_NOSIGNAL,
    );
    std::process::exit(1)
}

fn set_up(control: &OwnedFd, python_program: &str) -> Result<std::convert::Infallible, SetupError> {
    let mut buf = vec![0u8; super::MAX_MESSAGE];
    let len = recv(control.as_raw_fd(), &mut buf, MsgFlags::empty()).step("read the spec")?;
    let spec: ZygoteSpec = serde_json::from_slice(&buf[..len])
        .map_err(io::Error::other)
        .step("read the spec")?;
    redirect_stdio(Path::new("/dev/null"), Some(&spec.log)).step("redirect stdio")?;

    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .step("make mounts private")?;
    mount_root(&spec).step("mount the template")?;
    let root = spec.root.as_path();
    populate_dev(root, SpecialDirs::OnTmpfs).step("populate /dev")?;
    bind(Path::new("/proc"), &root.join("proc")).step("bind /proc")?;
    bind(Path::new("/sys"), &root.join("sys")).step("bind /sys")?;
    mount(
        Some("tmpfs"),
        &root.join("run"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=755"),
    )
    .map_err(|e| io_err("/run", e))
    .step("mount /run")?;
    let host = root.join(HOST_DIR.trim_start_matches('/'));
    mkdir(&host, 0o755).step("mount /run")?;
    chdir(root).step("pivot_root")?;
    pivot_root(".", &host).step("pivot_root")?;
    chdir("/").step("pivot_root")?;
    sethostname("cubicle-zygote").step("set the host name")?;

    caps::drop_bounding_set(ZYGOTE_CAPS).step("drop capabilities")?;
    // Python runs as the template's user (the user of its kernels: its home is where
    // IPython and matplotlib keep their state), keeping what it needs to map ids.
    let (uid, gid) = template_user(KERNEL_USER).step("find the kernel user")?;
    caps::become_user_keeping(uid, gid, &[gid], ZYGOTE_CAPS).step("become the kernel user")?;
    sys::set_inheritable(control.as_raw_fd()).step("keep the control socket")?;
    if chdir(&spec.cwd).is_err() {
        chdir("/").step("enter the working directory")?;
    }
    exec_python(&spec, python_program).step("execute python3")
}

/// The zygote's root: every template layer read-only, under a writable upper on a tmpfs
/// (Python and IPython may write caches while they start; nothing of it survives).
fn mount_root(spec: &ZygoteSpec) -> io::Result<()> {
    mount(
        Some("tmpfs"),
        &spec.scratch,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=700,size=256m"),
    )
    .map_err(|e| io_err(spec.scratch.display(), e))?;
    let upper = spec.scratch.join("upper");
    let work = spec.scratch.join("work");
    mkdir(&upper, 0o755)?;
    mkdir(&work, 0o700)?;
    let lower = spec
        .layers
        .iter()
        .map(|l| {
            l.to_str()
                .ok_or_else(|| io::Error::other("layer path is not UTF-8"))
        })
        .collect::<io::Result<Vec<_>>>()?
        .join(":");
    let opts = format!(
        "lowerdir={lower},upperdir={},workdir={},userxattr",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        &spec.root,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| io_err(&opts, e))
}

/// uid and gid of `name` in the template's `/etc/passwd`.
fn template_user(name: &str) -> io::Result<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| io_err("/etc/passwd", e))?;
    passwd_entry(&passwd, name).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no user {name:?} in the template's /etc/passwd"),
        )
    })
}

fn passwd_entry(passwd: &str, name: &str) -> Option<(u32, u32)> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields.as_slice() {
            [user, _, uid, gid, ..] if *user == name => {
                Some((uid.parse().ok()?, gid.parse().ok()?))
            }
            _ => None,
        }
    })
}

fn exec_python(spec: &ZygoteSpec, python_program: &str) -> io::Result<std::convert::Infallible> {
    let to_c = |s: &str| CString::new(s).map_err(|_| io::Error::other("NUL byte in argument"));
    let path = to_c("/usr/bin/python3")?;
    let argv = [
        to_c("python3")?,
        to_c("-c")?,
        to_c(python_program)?,
        to_c("--template-zygote")?,
    ];
    let envp = spec
        .env
        .iter()
        .map(|(k, v)| to_c(&format!("{k}={v}")))
        .collect::<io::Result<Vec<_>>>()?;
    let err = nix::unistd::execve(&path, &argv, &envp).unwrap_err();
    Err(io_err("/usr/bin/python3", err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_in_passwd() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1001::/home/user:/bin/bash\n";
        assert_eq!(passwd_entry(passwd, "user"), Some((1000, 1001)));
        assert_eq!(passwd_entry(passwd, "root"), Some((0, 0)));
        assert_eq!(passwd_entry(passwd, "nobody"), None);
        assert_eq!(passwd_entry("user:x:abc:1\n", "user"), None);
    }
}
