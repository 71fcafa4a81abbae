//! Thin wrappers over the raw syscalls the `ns` runtime needs and that neither `std` nor
//! `nix` offer (clone with a pidfd, pidfd signals and waits, close_range). Every `unsafe`
//! block in the host-side runtime lives here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Converts a `-1`-means-error return value into an `io::Result`.
fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Everything the freshly cloned child needs before `execve`, prepared in the parent so
/// that the child performs no allocation (the parent is multi-threaded: after a raw
/// clone only async-signal-safe calls are allowed in the child).
#[derive(Debug)]
pub struct ChildExec {
    path: CString,
    // Owned storage behind `argv_ptrs`/`envp_ptrs`; never read directly.
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// cgroup `tasks` files the child writes `0` into (joins) before dropping to root of
    /// its user namespace.
    join: Vec<CString>,
}

impl ChildExec {
    /// Prepares `execve(path, argv, envp)`, after joining the cgroups of `join`.
    pub fn new(
        path: &std::path::Path,
        argv: &[&str],
        envp: &[String],
        join: &[std::path::PathBuf],
    ) -> io::Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let to_c = |s: &[u8]| {
            CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
        };
        let path = to_c(path.as_os_str().as_bytes())?;
        let argv: Vec<CString> = argv
            .iter()
            .map(|a| to_c(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let envp: Vec<CString> = envp
            .iter()
            .map(|a| to_c(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let join = join
            .iter()
            .map(|p| to_c(p.as_os_str().as_bytes()))
            .collect::<io::Result<_>>()?;
        let mut argv_ptrs: Vec<_> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut envp_ptrs: Vec<_> = envp.iter().map(|a| a.as_ptr()).collect();
        envp_ptrs.push(std::ptr::null());
        Ok(ChildExec {
            path,
            _argv: argv,
            argv_ptrs,
            _envp: envp,
            envp_ptrs,
            join,
        })
    }
}

/// Exit codes of the cloned child when a step before `execve` fails; the parent turns
/// them back into step names.
pub mod child_exit {
    /// The parent closed the sync channel before saying "go".
    pub const NO_GO: i32 = 120;
    /// `setresgid`/`setgroups` to root of the new user namespace failed.
    pub const SETGID: i32 = 121;
    /// `setresuid` to root of the new user namespace failed.
    pub const SETUID: i32 = 122;
    /// Moving the sync socket to fd 3 failed.
    pub const DUP: i32 = 123;
    /// `execve` of the agent failed.
    pub const EXEC: i32 = 124;
    /// Joining the sandbox's cgroup failed.
    pub const CGROUP: i32 = 125;

    /// The step a child exit code stands for.
    pub fn step(code: i32) -> Option<&'static str> {
        Some(match code {
            NO_GO => "wait for the runtime's go-ahead",
            SETGID => "become gid 0 in the user namespace",
            SETUID => "become uid 0 in the user namespace",
            DUP => "move the sync socket to fd 3",
            EXEC => "execute the agent binary",
            CGROUP => "join the sandbox's cgroup",
            _ => return None,
        })
    }
}

/// Clones a child into new namespaces (`flags`, `CLONE_NEW*`) and returns its pid and a
/// pidfd. The child waits until `sync_fd` becomes readable, becomes root of its user
/// namespace, moves `sync_fd` to fd 3, closes every other fd above 2 and executes
/// `exec`. It never returns into Rust code.
pub fn clone_into_namespaces(
    flags: libc::c_int,
    sync_fd: RawFd,
    exec: &ChildExec,
) -> io::Result<(libc::pid_t, OwnedFd)> {
    let mut pidfd: libc::c_int = -1;
    let clone_flags = (flags | libc::CLONE_PIDFD) as libc::c_ulong | libc::SIGCHLD as libc::c_ulong;
    // SAFETY: a fork-like clone (no CLONE_VM, null stack = the child runs on a copy of
    // the current stack). `pidfd` outlives the call. In the child we only call
    // async-signal-safe functions and end in execve/_exit (see `child_main`).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            clone_flags,
            0usize,
            &mut pidfd as *mut libc::c_int,
            0usize,
            0usize,
        )
    };
    let pid = check(ret)? as libc::pid_t;
    if pid == 0 {
        // SAFETY: we are the freshly cloned child; `exec` and `sync_fd` are valid in our
        // copy of the address space and fd table.
        unsafe { child_main(sync_fd, exec) }
    }
    // SAFETY: CLONE_PIDFD stored a fresh fd owned by nobody else into `pidfd`.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok((pid, pidfd))
}

/// The child side of [`clone_into_namespaces`]. Async-signal-safe calls only, and no
/// glibc wrapper that assumes glibc's view of the process's threads.
///
/// # Safety
/// Must only be called in a child freshly created by a fork-like clone.
unsafe fn child_main(sync_fd: RawFd, exec: &ChildExec) -> ! {
    // SAFETY: plain syscalls on valid pointers/fds; no allocation, no locks, no return
    // into the parent's Rust code.
    unsafe {
        // First keep only the sync socket (as fd 3) of everything inherited. The parent
        // is multi-threaded: a file another thread has open for writing at the moment of
        // the clone cannot be executed by anyone (ETXTBSY) while a copy of that fd lives,
        // so no copy may live on while we wait for the go-ahead.
        if sync_fd == 3 {
            if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                libc::_exit(child_exit::DUP);
            }
        } else if libc::dup2(sync_fd, 3) != 3 {
            libc::_exit(child_exit::DUP);
        }
        // Nothing of the parent's may leak into the sandbox either.
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let mut byte = 0u8;
        loop {
            let r = libc::recv(3, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK);
            if r == 1 {
                break;
            }
            if r == -1 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            libc::_exit(child_exit::NO_GO);
        }
        // Still host root (kuid 0) here, so the host's cgroup files are writable.
        for tasks in &exec.join {
            let fd = libc::open(tasks.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(child_exit::CGROUP);
            }
            libc::close(fd);
        }
        // Raw syscalls, not glibc's wrappers: those broadcast set*id to every thread glibc
        // believes exists, and after a raw clone that list is the parent's (deadlock).
        if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
            || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
        {
            libc::_exit(child_exit::SETGID);
        }
        if libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0 {
            libc::_exit(child_exit::SETUID);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::execve(
            exec.path.as_ptr(),
            exec.argv_ptrs.as_ptr(),
            exec.envp_ptrs.as_ptr(),
        );
        libc::_exit(child_exit::EXEC);
    }
}

/// Marks `dir`, a directory of an overlay's upper layer, opaque for an overlay mounted
/// with `userxattr` (`user.overlay.opaque=y`): the lower layers' entries of that
/// directory are hidden.
pub fn set_overlay_opaque(dir: &std::path::Path) -> io::Result<()> {
    set_xattr(dir, c"user.overlay.opaque", b"y")
}

fn path_cstring(path: &std::path::Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// `lsetxattr(path, name, value)`.
pub fn set_xattr(path: &std::path::Path, name: &std::ffi::CStr, value: &[u8]) -> io::Result<()> {
    let path = path_cstring(path)?;
    // SAFETY: path and name are NUL-terminated; value is a valid buffer of its length.
    let ret = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(ret as libc::c_long).map(drop)
}

/// Bytes of a `get`-style call that answers with a length: asked for its size first
/// (`read(NULL, 0)`), then read; asked again if what it returns grew meanwhile (ERANGE).
fn read_sized(mut read: impl FnMut(*mut libc::c_void, usize) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let size = check(read(std::ptr::null_mut(), 0) as libc::c_long)? as usize;
        let mut buf = vec![0u8; size];
        match check(read(buf.as_mut_ptr().cast(), buf.len()) as libc::c_long) {
            Ok(n) => {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Every extended attribute of `path` (not following a symlink), name and value.
pub fn xattrs(path: &std::path::Path) -> io::Result<Vec<(CString, Vec<u8>)>> {
    let path = path_cstring(path)?;
    // SAFETY: read_sized passes either NULL with size 0 (a size query) or a writable
    // buffer of the given size; path is NUL-terminated.
    let names = read_sized(|buf, len| unsafe { libc::llistxattr(path.as_ptr(), buf.cast(), len) })?;
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = CString::new(name).expect("split at NUL");
        // SAFETY: as above; name is NUL-terminated.
        let value = read_sized(|buf, len| unsafe {
            libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf, len)
        })?;
        out.push((name, value));
    }
    Ok(out)
}

/// `ioctl(target, FICLONE, source)`: `target` shares `source`'s extents (a reflink).
pub fn reflink(source: &std::fs::File, target: &std::fs::File) -> io::Result<()> {
    // FICLONE = _IOW(0x94, 9, int).
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: both fds are open files for the duration of the call; FICLONE takes the
    // source fd as its argument.
    let ret = unsafe { libc::ioctl(target.as_raw_fd(), FICLONE, source.as_raw_fd()) };
    check(ret as libc::c_long).map(drop)
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel returned a fresh fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`. ESRCH (already exited) is success.
pub fn pidfd_kill(pidfd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is valid for the duration of the call; null siginfo is allowed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    match check(ret) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Exited(i32),
    /// Killed by a signal.
    Signaled(i32),
}

/// Non-blocking `waitid(P_PIDFD, fd, WEXITED | WNOHANG)`. `Ok(None)`: still running, or
/// not our child (ECHILD: someone else reaps it).
pub fn pidfd_try_reap(pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo is plain data; zeroed is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-pointer for the duration of the call.
    let ret = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if ret == -1 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ECHILD) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    // SAFETY: waitid filled `info` (or left it zeroed when nothing changed state).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(if info.si_code == libc::CLD_EXITED {
        ExitStatus::Exited(status)
    } else {
        ExitStatus::Signaled(status)
    }))
}

/// Whether the process behind `pidfd` has exited (the pidfd polls readable).
pub fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// Waits up to `timeout` for the process behind `pidfd` to exit (blocking); whether it
/// did.
pub fn pidfd_wait(pidfd: &OwnedFd, timeout: std::time::Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return n == 1 && pfd.revents & libc::POLLIN != 0;
    }
}

/// Brings the loopback interface of the current network namespace up
/// (`SIOCSIFFLAGS` with `IFF_UP`), without netlink or an `ip` binary.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain syscall; the fd is owned below.
    let fd = check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) }
            as libc::c_long,
    )?;
    // SAFETY: fresh fd owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: valid fd and a pointer to a properly initialised ifreq.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } as libc::c_long)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } as libc::c_long)?;
    Ok(())
}

/// `memfd_create(name, 0)`: an anonymous file that survives `execve` (no CLOEXEC).
pub fn memfd_inheritable(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: valid NUL-terminated name.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), 0) } as libc::c_long)?;
    // SAFETY: fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Clears `FD_CLOEXEC` so the fd is inherited across `execve`.
pub fn set_inheritable(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl on an fd number; a bad fd is reported as EBADF.
    check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } as libc::c_long).map(|_| ())
}

/// Waits until `fd` polls readable (e.g. a pidfd whose process exited).
pub async fn readable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is borrowed for longer than the AsyncFd registration, which is dropped
    // at the end of this function, so it stays open and refers to the same file.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)?;
    let _guard = registered.readable().await?;
    Ok(())
}

/// Makes `cmd` (a CRIU restore) start inside a new sandbox: it moves itself into the
/// sandbox's cgroups by writing `0` into each of `cgroup_files` and takes a cgroup
/// namespace rooted there, so every process it forks is born in them and sees its own
/// cgroup as `/`; and it gets a mount namespace of its own (private propagation) with an
/// overlay mounted on `target` with `options`, so that whatever it builds on the overlay
/// never shows in the caller's namespace, and the overlay goes away with the last
/// process using it.
pub fn restore_pre_exec(
    cmd: &mut std::process::Command,
    cgroup_files: &[std::path::PathBuf],
    target: &std::path::Path,
    options: &str,
) -> io::Result<()> {
    use std::os::unix::process::CommandExt;
    let nul = |what| io::Error::new(io::ErrorKind::InvalidInput, format!("NUL in {what}"));
    let cgroup_files = cgroup_files
        .iter()
        .map(|f| CString::new(f.as_os_str().as_encoded_bytes()).map_err(|_| nul("cgroup path")))
        .collect::<io::Result<Vec<_>>>()?;
    let target =
        CString::new(target.as_os_str().as_encoded_bytes()).map_err(|_| nul("overlay target"))?;
    let options = CString::new(options).map_err(|_| nul("overlay options"))?;
    // SAFETY: the closure runs in the forked child before exec and only makes raw
    // syscalls on strings prepared before the fork (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            for file in &cgroup_files {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                check(fd as libc::c_long)?;
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    let e = io::Error::last_os_error();
                    libc::close(fd);
                    return Err(e);
                }
                libc::close(fd);
            }
            check(libc::unshare(libc::CLONE_NEWCGROUP | libc::CLONE_NEWNS) as libc::c_long)?;
            check(libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) as libc::c_long)?;
            check(libc::mount(
                c"overlay".as_ptr(),
                target.as_ptr(),
                c"overlay".as_ptr(),
                0,
                options.as_ptr().cast(),
            ) as libc::c_long)?;
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    fn open_fds(pid: libc::pid_t) -> Vec<i32> {
        let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        fds.sort();
        fds
    }

    #[test]
    fn a_cloned_child_keeps_no_fd_of_the_parent_while_it_waits_for_its_go_ahead() {
        // Regression: the child kept every inherited fd until just before execve. A file
        // another thread had open for writing at the clone then could not be executed
        // (ETXTBSY) until this child went on.
        let written = tempfile::tempfile().unwrap();
        let (host, child) = UnixStream::pair().unwrap();
        let exec = ChildExec::new(std::path::Path::new("/bin/true"), &["true"], &[], &[]).unwrap();
        let (pid, pidfd) = clone_into_namespaces(0, child.as_raw_fd(), &exec).unwrap();
        drop(child);
        // Down to stdio and the sync socket as fd 3, soon after the clone.
        let only_its_own = || {
            let fds = open_fds(pid);
            let sync_is_3 = std::fs::read_link(format!("/proc/{pid}/fd/3"))
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
            (fds.iter().all(|fd| (0..=3).contains(fd)) && sync_is_3)
                .then_some(())
                .ok_or(fds)
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut state = only_its_own();
        while state.is_err() && Instant::now() < deadline {
            std::thread::yield_now();
            state = only_its_own();
        }
        if let Err(fds) = state {
            pidfd_kill(&pidfd, libc::SIGKILL).unwrap();
            panic!(
                "the waiting child still holds fds {fds:?} (the parent's file is fd {})",
                written.as_raw_fd()
            );
        }
        // No go-ahead: hanging up makes the child exit with the step's code (it used to
        // hold a copy of `host` itself, and waited forever).
        drop(host);
        assert!(
            pidfd_wait(&pidfd, Duration::from_secs(5)),
            "child did not exit"
        );
        assert_eq!(
            pidfd_try_reap(&pidfd).unwrap(),
            Some(ExitStatus::Exited(child_exit::NO_GO))
        );
    }
}
