//! Starting a user process: credentials, environment, working directory, stdio or a
//! pseudo-terminal. Everything that runs between `fork` and `execve` is in
//! [`configure_child`] and uses async-signal-safe calls only.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cubicle_envd::connect::{Code, ConnectError};
use cubicle_envd::proto::{ProcessConfig, PtySize};

use crate::users::User;

/// `PATH` for processes whose request does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `oom_score_adj` of user processes. The agent keeps 0 (or -1000 where the runtime may
/// set it), so in a memory-cgroup OOM the kernel kills user code, not the agent.
pub const USER_OOM_SCORE_ADJ: &[u8] = b"500";

/// Where extra descriptors are staged in the child before moving into place.
const EXTRA_FD_STAGING: RawFd = 900;

/// What a started process's I/O ends are on the agent side.
#[derive(Debug)]
pub enum ChildIo {
    /// Plain pipes.
    Pipes {
        /// stdin (None when the request asked for no stdin).
        stdin: Option<OwnedFd>,
        /// stdout.
        stdout: OwnedFd,
        /// stderr.
        stderr: OwnedFd,
    },
    /// A pseudo-terminal: stdin, stdout and stderr are its slave side.
    Pty {
        /// The master side.
        master: OwnedFd,
    },
}

/// The environment of a new process: the user's basics, then the sandbox's variables,
/// then the request's (later ones win).
pub fn environment(
    user: &User,
    sandbox_env: &BTreeMap<String, String>,
    request_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), DEFAULT_PATH.to_owned());
    env.insert("HOME".to_owned(), user.home.to_string_lossy().into_owned());
    env.insert("USER".to_owned(), user.name.clone());
    env.insert("LOGNAME".to_owned(), user.name.clone());
    env.extend(sandbox_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(request_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Resolves and checks the working directory (must exist and be a directory).
pub fn working_dir(cwd: Option<&str>, user: &User) -> Result<PathBuf, ConnectError> {
    let dir = match cwd {
        None | Some("") => user.home.clone(),
        Some(c) => crate::paths::resolve(c, &user.home)
            .map_err(|e| ConnectError::new(Code::InvalidArgument, e.to_string()))?,
    };
    match std::fs::metadata(&dir) {
        Ok(md) if md.is_dir() => Ok(dir),
        Ok(_) => Err(ConnectError::new(
            Code::InvalidArgument,
            format!("cwd '{}' is not a directory", dir.display()),
        )),
        // A missing home is not fatal: fall back to / as a login would.
        Err(_) if cwd.is_none() => Ok(PathBuf::from("/")),
        Err(_) => Err(ConnectError::new(
            Code::InvalidArgument,
            format!("cwd '{}' does not exist", dir.display()),
        )),
    }
}

/// Prepared credentials and directory for the child, as C values (no allocation after
/// fork).
struct ChildSetup {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    cwd: CString,
    controlling_tty: bool,
    /// Descriptors to install at fixed numbers above 2: (number in the child, source fd
    /// in the parent). The parent keeps the sources open until `spawn` returns.
    extra_fds: Vec<(RawFd, RawFd)>,
}

impl ChildSetup {
    fn new(user: &User, cwd: &Path, controlling_tty: bool) -> Result<Self, ConnectError> {
        Ok(ChildSetup {
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
            cwd: CString::new(cwd.as_os_str().as_encoded_bytes())
                .map_err(|_| ConnectError::new(Code::InvalidArgument, "cwd contains a NUL byte"))?,
            controlling_tty,
            extra_fds: Vec::new(),
        })
    }
}

/// Starts `config` as `user`.
pub fn spawn(
    config: &ProcessConfig,
    user: &User,
    env: &BTreeMap<String, String>,
    cwd: &Path,
    pty: Option<PtySize>,
    with_stdin: bool,
) -> Result<(Child, ChildIo), ConnectError> {
    let setup = ChildSetup::new(user, cwd, pty.is_some())?;
    let mut cmd = Command::new(&config.cmd);
    cmd.args(&config.args).env_clear().envs(env);
    let io = match pty {
        Some(size) => {
            let pair = open_pty(size).map_err(|e| internal("open a pseudo-terminal", e))?;
            let slave = |p: &OwnedFd| p.try_clone().map(Stdio::from);
            cmd.stdin(slave(&pair.slave).map_err(|e| internal("dup pty", e))?)
                .stdout(slave(&pair.slave).map_err(|e| internal("dup pty", e))?)
                .stderr(Stdio::from(pair.slave));
            Some(pair.master)
        }
        None => {
            cmd.stdin(if with_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            None
        }
    };
    // SAFETY: `configure_child` only makes async-signal-safe syscalls on data prepared
    // before the fork; the agent is single-threaded besides.
    unsafe {
        cmd.pre_exec(move || configure_child(&setup));
    }
    let mut child = cmd.spawn().map_err(|e| spawn_error(&config.cmd, e))?;
    let child_io = match io {
        Some(master) => ChildIo::Pty { master },
        None => ChildIo::Pipes {
            stdin: child.stdin.take().map(OwnedFd::from),
            stdout: child
                .stdout
                .take()
                .map(OwnedFd::from)
                .expect("piped stdout"),
            stderr: child
                .stderr
                .take()
                .map(OwnedFd::from)
                .expect("piped stderr"),
        },
    };
    Ok((child, child_io))
}

/// Starts `program args` as `user` with the given descriptors: `stdio` becomes fds 0, 1
/// and 2, `extra` is installed at the given numbers (3, 4, ...). Returns the pid; the
/// caller watches it through the reaper.
pub fn spawn_with_fds(
    program: &str,
    args: &[&str],
    user: &User,
    env: &BTreeMap<String, String>,
    cwd: &Path,
    stdio: [OwnedFd; 3],
    extra: Vec<(RawFd, OwnedFd)>,
) -> Result<u32, ConnectError> {
    let mut setup = ChildSetup::new(user, cwd, false)?;
    setup.extra_fds = extra.iter().map(|(n, fd)| (*n, fd.as_raw_fd())).collect();
    let [stdin, stdout, stderr] = stdio;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env)
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    // SAFETY: as in `spawn`.
    unsafe {
        cmd.pre_exec(move || configure_child(&setup));
    }
    let child = cmd.spawn().map_err(|e| spawn_error(program, e))?;
    drop(extra);
    Ok(child.id())
}

/// Runs in the child between fork and exec.
fn configure_child(s: &ChildSetup) -> io::Result<()> {
    // SAFETY: plain syscalls on valid pointers owned by `s`.
    unsafe {
        // Extra descriptors: first above every target (so installing one cannot clobber
        // the source of another), then into place; dup2 clears close-on-exec.
        for (i, (_, source)) in s.extra_fds.iter().enumerate() {
            if libc::dup2(*source, EXTRA_FD_STAGING + i as RawFd) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        for (i, (target, _)) in s.extra_fds.iter().enumerate() {
            if libc::dup2(EXTRA_FD_STAGING + i as RawFd, *target) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(EXTRA_FD_STAGING + i as RawFd);
        }
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if s.controlling_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        // User code must be the OOM killer's choice, never the agent: raising the score
        // needs no privilege (and we still are root before dropping credentials).
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::write(
                fd,
                USER_OOM_SCORE_ADJ.as_ptr().cast(),
                USER_OOM_SCORE_ADJ.len(),
            );
            libc::close(fd);
        }
        if libc::setgroups(s.groups.len(), s.groups.as_ptr()) < 0
            || libc::setresgid(s.gid, s.gid, s.gid) < 0
            || libc::setresuid(s.uid, s.uid, s.uid) < 0
        {
            return Err(io::Error::last_os_error());
        }
        // chdir as the user, so permissions apply as they will for the program.
        if libc::chdir(s.cwd.as_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

struct PtyPair {
    master: OwnedFd,
    slave: OwnedFd,
}

fn open_pty(size: PtySize) -> io::Result<PtyPair> {
    let ws = winsize(size);
    let pty = nix::pty::openpty(Some(&ws), None)?;
    // The master is read and written asynchronously.
    nix::fcntl::fcntl(
        pty.master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    nix::fcntl::fcntl(
        pty.master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(PtyPair {
        master: pty.master,
        slave: pty.slave,
    })
}

fn winsize(size: PtySize) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: size.rows.clamp(1, u16::MAX.into()) as u16,
        ws_col: size.cols.clamp(1, u16::MAX.into()) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Resizes a pseudo-terminal.
pub fn resize(master: &OwnedFd, size: PtySize) -> io::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn internal(what: &str, e: io::Error) -> ConnectError {
    ConnectError::new(Code::Internal, format!("{what}: {e}"))
}

fn spawn_error(cmd: &str, e: io::Error) -> ConnectError {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => ConnectError::new(
            Code::ResourceExhausted,
            "cannot start the process: the sandbox's process limit is reached",
        ),
        Some(libc::ENOMEM) => ConnectError::new(
            Code::ResourceExhausted,
            "cannot start the process: out of memory",
        ),
        Some(libc::ENOENT) => ConnectError::new(
            Code::InvalidArgument,
            format!("cannot start the process: '{cmd}' not found"),
        ),
        Some(libc::EACCES) => ConnectError::new(
            Code::PermissionDenied,
            format!("cannot start the process: '{cmd}': permission denied"),
        ),
        _ => ConnectError::new(
            Code::Internal,
            format!("cannot start the process '{cmd}': {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/user".into(),
            shell: "/bin/bash".into(),
            groups: vec![1000],
        }
    }

    #[test]
    fn environment_layers_win_in_order() {
        let sandbox = BTreeMap::from([
            ("A".to_string(), "sbx".to_string()),
            ("B".into(), "sbx".into()),
        ]);
        let request = BTreeMap::from([
            ("B".to_string(), "req".to_string()),
            ("HOME".into(), "/x".into()),
        ]);
        let env = environment(&user(), &sandbox, &request);
        assert_eq!(env["A"], "sbx");
        assert_eq!(env["B"], "req");
        assert_eq!(env["HOME"], "/x");
        assert_eq!(env["USER"], "user");
        assert_eq!(env["PATH"], DEFAULT_PATH);
    }

    #[test]
    fn working_dir_errors() {
        let mut u = user();
        u.home = std::env::temp_dir();
        assert_eq!(working_dir(None, &u).unwrap(), std::env::temp_dir());
        let missing = working_dir(Some("/definitely/not/here"), &u).unwrap_err();
        assert_eq!(missing.code, Code::InvalidArgument);
        assert_eq!(missing.message, "cwd '/definitely/not/here' does not exist");
        assert_eq!(
            working_dir(Some("/etc/passwd"), &u).unwrap_err().code,
            Code::InvalidArgument
        );
        u.home = "/no/such/home".into();
        assert_eq!(working_dir(None, &u).unwrap(), Path::new("/"));
    }
}
