//! Real-kernel tests. A filter or a capability drop cannot be undone, so each check runs
//! in a fresh copy of the test binary: the visible test re-executes the binary with
//! `--exact --ignored` for an ignored `child_*` test and an environment variable that
//! arms it, and asserts that exactly that test passed. Run alone (without the variable),
//! a `child_*` test does nothing.

use std::ffi::CStr;
use std::process::Command;

use nix::errno::Errno;

use super::caps::{self, Cap, CapSets, SANDBOX_CAPS};
use super::seccomp::SeccompPolicy;

/// Names the child test that a re-executed test binary should really run.
const CHILD_ENV: &str = "CUBICLE_SECURITY_TEST_CHILD";

/// Runs the ignored test `name` of this module in a re-executed test binary and panics
/// with its output unless it passed. Returns its stdout.
fn run_child(name: &str) -> String {
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, rest)| rest);
    let test = format!("{module}::{name}");
    let exe = std::env::current_exe().expect("test binary path");
    let output = Command::new(exe)
        .args([
            &test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &test)
        .output()
        .expect("re-executing the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "child test {test} failed ({})\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        output.status
    );
    stdout
}

/// Whether this process is the re-executed child meant to run test `name`.
fn armed(name: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|test| test.ends_with(&format!("::{name}")))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A raw syscall with up to five integer arguments.
fn sys(nr: libc::c_long, args: [u64; 5]) -> Result<libc::c_long, Errno> {
    // SAFETY: the callers pass only integers and pointers to NUL-terminated literals or
    // live locals, valid for the syscall in question.
    let rc = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4]) };
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc)
    }
}

fn ptr(s: &CStr) -> u64 {
    s.as_ptr() as u64
}

/// Without `CAP_SYS_ADMIN` (tests run by a normal user) the kernel only accepts a filter
/// under `no_new_privs`; the production path never needs this.
fn allow_unprivileged_install() {
    let sets = CapSets::current().expect("capget");
    if sets.effective & Cap::SysAdmin.bit() == 0 {
        let (one, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, one, zero, zero, zero) };
        assert_eq!(rc, 0, "PR_SET_NO_NEW_PRIVS: {}", Errno::last());
    }
}

/// Moves the calling thread into a private mount namespace, so that a mount that
/// unexpectedly succeeds cannot touch the host. Returns false where even root may not
/// do that (e.g. in a container without `CAP_SYS_ADMIN`).
fn private_mounts() -> bool {
    match sys(libc::SYS_unshare, [libc::CLONE_NEWNS as u64, 0, 0, 0, 0]) {
        Ok(_) => {}
        Err(Errno::EPERM) => return false,
        Err(errno) => panic!("unshare(CLONE_NEWNS): {errno}"),
    }
    let flags = libc::MS_REC | libc::MS_PRIVATE;
    sys(libc::SYS_mount, [0, ptr(c"/"), 0, flags, 0]).expect("making / private");
    true
}

/// Whether this test can run the root-only checks; says why not otherwise.
fn root_with_private_mounts() -> bool {
    if !is_root() {
        println!("skipped: needs root");
        return false;
    }
    if !private_mounts() {
        println!("skipped: cannot create a mount namespace");
        return false;
    }
    true
}

/// The `Cap*:` lines of a `/proc/.../status` text as `(CapInh, CapPrm, CapEff, CapBnd,
/// CapAmb)`.
fn cap_lines(status: &str) -> [u64; 5] {
    let field = |key: &str| {
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{key}:")))
            .unwrap_or_else(|| panic!("no {key} in {status}"));
        u64::from_str_radix(line.trim(), 16).expect("hex capability mask")
    };
    ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"].map(field)
}

fn sh(script: &str) -> String {
    let output = Command::new("/bin/sh")
        .args(["-c", script])
        .output()
        .expect("running /bin/sh");
    assert!(
        output.status.success(),
        "{script}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn seccomp_filter_in_real_kernel() {
    run_child("child_seccomp_filter");
}

#[test]
#[ignore = "runs in a re-executed child of seccomp_filter_in_real_kernel"]
fn child_seccomp_filter() {
    if !armed("child_seccomp_filter") {
        return;
    }
    let program = SeccompPolicy::default_policy().unwrap().compile().unwrap();
    allow_unprivileged_install();
    program.install().expect("installing the filter");

    let mount = [
        ptr(c"none"),
        ptr(c"/nonexistent-cubicle-test"),
        ptr(c"tmpfs"),
        0,
        0,
    ];
    // Unfiltered, root would get ENOENT here.
    assert_eq!(sys(libc::SYS_mount, mount), Err(Errno::EPERM));
    let newuser = [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0];
    assert_eq!(sys(libc::SYS_unshare, newuser), Err(Errno::EPERM));
    // Unfiltered, clone3(NULL, 0) is EINVAL.
    assert_eq!(sys(libc::SYS_clone3, [0; 5]), Err(Errno::ENOSYS));
    let clone_newuser = [(libc::CLONE_NEWUSER | libc::SIGCHLD) as u64, 0, 0, 0, 0];
    assert_eq!(sys(libc::SYS_clone, clone_newuser), Err(Errno::EPERM));
    assert_eq!(
        sys(libc::SYS_getpid | 0x4000_0000, [0; 5]),
        Err(Errno::EPERM)
    );
    assert_eq!(sys(1000, [0; 5]), Err(Errno::ENOSYS));
    assert_eq!(
        sys(libc::SYS_io_uring_setup, [1, 0, 0, 0, 0]),
        Err(Errno::EPERM)
    );
    assert_eq!(sys(libc::SYS_bpf, [0; 5]), Err(Errno::EPERM));
    assert_eq!(sys(libc::SYS_keyctl, [0; 5]), Err(Errno::EPERM));

    assert_eq!(
        sys(libc::SYS_getpid, [0; 5]),
        Ok(libc::c_long::from(std::process::id() as i32))
    );

    // SAFETY: the child only calls `_exit`, which is async-signal-safe.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: terminating the forked child without running any Rust code.
        unsafe { libc::_exit(42) };
    }
    assert!(pid > 0, "fork: {}", Errno::last());
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).unwrap();
    assert_eq!(
        status,
        nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 42)
    );

    // posix_spawn and pthread_create try clone3 first and fall back on ENOSYS.
    let status = Command::new("/bin/true")
        .status()
        .expect("spawning /bin/true");
    assert!(status.success(), "/bin/true: {status}");
    assert_eq!(std::thread::spawn(|| 7).join().unwrap(), 7);
    assert_eq!(sh("echo hello | tr a-z A-Z"), "HELLO\n");

    for (family, kind) in [
        (libc::AF_INET, libc::SOCK_STREAM),
        (libc::AF_INET6, libc::SOCK_DGRAM),
        (libc::AF_UNIX, libc::SOCK_STREAM),
        (libc::AF_NETLINK, libc::SOCK_RAW),
    ] {
        let fd = sys(libc::SYS_socket, [family as u64, kind as u64, 0, 0, 0])
            .unwrap_or_else(|e| panic!("socket({family}): {e}"));
        sys(libc::SYS_close, [fd as u64, 0, 0, 0, 0]).unwrap();
    }
    let vsock = [libc::AF_VSOCK as u64, libc::SOCK_STREAM as u64, 0, 0, 0];
    assert_eq!(sys(libc::SYS_socket, vsock), Err(Errno::EPERM));

    // Unfiltered, /dev/null answers terminal ioctls with ENOTTY.
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&devnull) as u64;
    let byte = b'x';
    let byte_ptr = &byte as *const u8 as u64;
    for request in [libc::TIOCSTI, 1 << 32 | libc::TIOCSTI] {
        let args = [fd, request, byte_ptr, 0, 0];
        assert_eq!(
            sys(libc::SYS_ioctl, args),
            Err(Errno::EPERM),
            "{request:#x}"
        );
    }
    let args = [fd, libc::TCGETS, 0, 0, 0];
    assert_eq!(sys(libc::SYS_ioctl, args), Err(Errno::ENOTTY));

    assert!(sys(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0]).is_ok());
    let no_aslr = [libc::ADDR_NO_RANDOMIZE as u64, 0, 0, 0, 0];
    assert_eq!(sys(libc::SYS_personality, no_aslr), Err(Errno::EPERM));
}

#[test]
fn ordinary_programs_run_under_the_filter() {
    let stdout = run_child("child_ordinary_programs");
    eprintln!("{stdout}");
}

#[test]
#[ignore = "runs in a re-executed child of ordinary_programs_run_under_the_filter"]
fn child_ordinary_programs() {
    if !armed("child_ordinary_programs") {
        return;
    }
    let program = SeccompPolicy::default_policy().unwrap().compile().unwrap();
    allow_unprivileged_install();
    program.install().expect("installing the filter");

    let work = tempfile::tempdir().unwrap();
    let dir = work.path().display();
    // Coreutils, pipes, job control, subshells, file operations.
    let out = sh(&format!(
        "set -e; cd {dir}; mkdir -p a/b; echo data > a/b/f; cp -r a c; mv c d; \
         ln -s d/b/f link; cat link; mkfifo fifo; (echo fifo > fifo &) ; cat fifo; \
         ls -la >/dev/null; find . -name f | sort; chmod 600 a/b/f; stat -c %a a/b/f; \
         sleep 0.1 & wait; seq 1 1000 | sort -n | tail -1; date +%Y >/dev/null; \
         tar czf t.tgz a && tar tzf t.tgz | head -1; rm -rf a d"
    ));
    assert_eq!(
        out, "data\nfifo\n./a/b/f\n./d/b/f\n600\n1000\na/\n",
        "shell output"
    );
    println!("ran: sh + coreutils");

    let optional: &[(&str, &[&str])] = &[
        (
            "python3",
            &[
                "-c",
                "import os, threading, subprocess, socket, asyncio, tempfile, multiprocessing\n\
                 t = threading.Thread(target=lambda: None); t.start(); t.join()\n\
                 assert subprocess.run(['true']).returncode == 0\n\
                 pid = os.fork()\n\
                 if pid == 0: os._exit(3)\n\
                 assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3\n\
                 s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); s.close()\n\
                 asyncio.run(asyncio.sleep(0.01))\n\
                 with multiprocessing.Pool(2) as p: assert p.map(abs, [-1, -2]) == [1, 2]\n\
                 print('python ok')",
            ],
        ),
        (
            "node",
            &[
                "-e",
                "const cp = require('child_process'); const fs = require('fs');\n\
                 if (cp.execSync('echo hi').toString() !== 'hi\\n') throw 'exec';\n\
                 fs.writeFileSync('/dev/null', 'x');\n\
                 require('http').createServer().listen(0, function () {\n\
                   this.close(); console.log('node ok'); });",
            ],
        ),
        ("ip", &["-o", "link", "show", "lo"]),
        ("dpkg", &["-s", "coreutils"]),
        ("apt-cache", &["policy", "coreutils"]),
    ];
    for (program, args) in optional {
        let Ok(output) = Command::new(program).args(*args).output() else {
            println!("skipped: {program} (not installed)");
            continue;
        };
        assert!(
            output.status.success(),
            "{program}: {}\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        println!("ran: {program}");
    }

    if Command::new("gcc").arg("--version").output().is_ok() {
        std::fs::write(
            work.path().join("hello.c"),
            "#include <stdio.h>\n#include <pthread.h>\n\
             static void *run(void *arg) { return arg; }\n\
             int main(void) { pthread_t t; void *r; pthread_create(&t, 0, run, (void *)42);\n\
             pthread_join(t, &r); printf(\"hello %ld\\n\", (long)r); return 0; }\n",
        )
        .unwrap();
        let out = sh(&format!(
            "cd {dir} && gcc -O1 -pthread hello.c -o hello && ./hello"
        ));
        assert_eq!(out, "hello 42\n");
        println!("ran: gcc + compiled program");
    }
}

#[test]
fn capabilities_are_restricted_in_real_kernel() {
    run_child("child_capabilities");
}

#[test]
#[ignore = "runs in a re-executed child of capabilities_are_restricted_in_real_kernel"]
fn child_capabilities() {
    if !armed("child_capabilities") {
        return;
    }
    if !root_with_private_mounts() {
        return;
    }
    let target = tempfile::tempdir().unwrap();
    let target = std::ffi::CString::new(target.path().as_os_str().as_encoded_bytes()).unwrap();
    let keep = Cap::mask(SANDBOX_CAPS);

    caps::restrict_to(SANDBOX_CAPS).expect("restrict_to");
    // Capabilities are per thread: look at this thread, not the process's main thread.
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert_eq!(cap_lines(&status), [0, keep, keep, keep, 0], "{status}");
    assert_eq!(
        CapSets::current().unwrap(),
        CapSets {
            effective: keep,
            permitted: keep,
            inheritable: 0
        }
    );
    let mount = [ptr(c"none"), ptr(&target), ptr(c"tmpfs"), 0, 0];
    assert_eq!(sys(libc::SYS_mount, mount), Err(Errno::EPERM));
    // Idempotent.
    caps::restrict_to(SANDBOX_CAPS).expect("second restrict_to");

    // A new program as root gets exactly the bounding set.
    let out = sh("grep Cap /proc/self/status");
    assert_eq!(cap_lines(&out), [0, keep, keep, keep, 0], "{out}");
}

#[test]
fn init_sequence_in_real_kernel() {
    run_child("child_init_sequence");
}

#[test]
#[ignore = "runs in a re-executed child of init_sequence_in_real_kernel"]
fn child_init_sequence() {
    if !armed("child_init_sequence") {
        return;
    }
    if !root_with_private_mounts() {
        return;
    }
    let keep = Cap::mask(SANDBOX_CAPS);
    // The order documented in the module docs.
    let program = SeccompPolicy::default_policy().unwrap().compile().unwrap();
    caps::drop_bounding_set(SANDBOX_CAPS).expect("drop_bounding_set");
    program.install().expect("install without no_new_privs");
    caps::restrict_to(SANDBOX_CAPS).expect("restrict_to under the filter");

    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(status.contains("NoNewPrivs:\t0"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let out = sh("grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status; id -u");
    assert_eq!(cap_lines(&out), [0, keep, keep, keep, 0], "{out}");
    assert!(out.contains("Seccomp:\t2") && out.ends_with("0\n"), "{out}");
    let newuser = [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0];
    assert_eq!(sys(libc::SYS_unshare, newuser), Err(Errno::EPERM));
}
