//! Escape attempts from inside real sandboxes. Each test runs hostile code as the
//! default user and, where it matters more, as root of the sandbox (what `sudo` or
//! `user="root"` gives), and checks the host, other sandboxes and the agent are safe.

mod support;

use std::time::Duration;

use cubicle_core::Limits;
use cubicle_envd::proto::{Empty, ListResponse};
use support::TestEnv;

/// Runs a Python snippet that calls raw syscalls and prints `name=errno` per line.
const SYSCALL_PROBE: &str = r#"
import ctypes, os, errno
libc = ctypes.CDLL(None, use_errno=True)
def call(name, nr, *args):
    r = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    e = ctypes.get_errno() if r == -1 else 0
    print("%s=%s" % (name, errno.errorcode.get(e, e) if e else "ok"))
call("mount", 165, 0, 0, 0, 0, 0)
call("umount2", 166, 0, 0)
call("unshare_user", 272, 0x10000000)
call("unshare_mnt", 272, 0x00020000)
call("setns", 308, 0, 0)
call("pivot_root", 155, 0, 0)
call("chroot", 161, 0)
call("init_module", 175, 0, 0, 0)
call("finit_module", 313, 0, 0, 0)
call("delete_module", 176, 0, 0)
call("kexec_load", 246, 0, 0, 0, 0)
call("bpf", 321, 0, 0, 0)
call("perf_event_open", 298, 0, 0, 0, 0, 0)
call("userfaultfd", 323, 0)
call("keyctl", 250, 0, 0, 0, 0, 0)
call("add_key", 248, 0, 0, 0, 0, 0)
call("open_by_handle_at", 304, 0, 0, 0)
call("io_uring_setup", 425, 1, 0)
call("reboot", 169, 0, 0, 0, 0)
call("swapon", 167, 0, 0)
call("settimeofday", 164, 0, 0)
call("clone3", 435, 0, 0)
call("ptrace_attach_agent", 101, 16, 1, 0, 0)
"#;

fn parse_probe(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test]
async fn dangerous_syscalls_fail_even_for_sandbox_root() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    sbx.client
        .run(
            &format!("cat > /tmp/probe.py <<'EOF'\n{SYSCALL_PROBE}\nEOF"),
            None,
        )
        .await
        .unwrap();
    for as_root in [false, true] {
        let out = if as_root {
            sbx.root_sh("python3 /tmp/probe.py").await
        } else {
            sbx.sh("python3 /tmp/probe.py").await
        };
        assert_eq!(out.end.exit_code, 0, "{}", out.stderr_text());
        let results = parse_probe(&out.stdout_text());
        assert_eq!(results.len(), 23, "{results:?}");
        for (name, result) in &results {
            let expected: &[&str] = match name.as_str() {
                "clone3" => &["ENOSYS"],
                // Non-dumpable pid 1 without CAP_SYS_PTRACE: EPERM either way.
                _ => &["EPERM"],
            };
            assert!(
                expected.contains(&result.as_str()),
                "{name} as {} gave {result}, expected {expected:?}",
                if as_root { "root" } else { "user" }
            );
        }
    }
}

#[tokio::test]
async fn sandbox_sees_neither_host_processes_nor_host_files() {
    let env = TestEnv::new();
    let marker = env.data.path().join("host-marker");
    std::fs::write(&marker, "host secret").unwrap();
    let sbx = env.create().await;

    // Only the sandbox's own processes: pid 1 is the agent.
    let ps = sbx
        .root_sh("cat /proc/1/comm; ls /proc | grep -c '^[0-9]'")
        .await;
    let text = ps.stdout_text();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("cubicle-agent"));
    let count: u32 = lines.next().unwrap().parse().unwrap();
    assert!(count < 10, "sandbox sees {count} processes");
    let me = std::process::id();
    let probe = sbx
        .root_sh(&format!(
            "test -e /proc/{me}/cmdline && cat /proc/{me}/cmdline"
        ))
        .await;
    assert!(
        !probe.stdout_text().contains("isolation"),
        "host process visible"
    );

    // Host paths: the test's data dir, the template store, the marker, /work.
    for path in [
        marker.to_str().unwrap(),
        env.data.path().to_str().unwrap(),
        "/var/lib/cubicle/templates",
        "/work",
    ] {
        let out = sbx.root_sh(&format!("test -e '{path}'")).await;
        assert_ne!(out.end.exit_code, 0, "{path} is visible inside the sandbox");
    }
    // Only loopback in the network namespace.
    let net = sbx
        .sh("cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '")
        .await;
    assert_eq!(net.stdout_text(), "lo\n");
    // The uid map: root inside is an unprivileged host uid.
    let map = sbx.sh("cat /proc/self/uid_map").await.stdout_text();
    let fields: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(fields, ["0", &env.uid_shift.to_string(), "65536"]);
}

#[tokio::test]
async fn sandboxes_do_not_see_each_other_and_writes_never_reach_the_template() {
    let env = TestEnv::new();
    let a = env.create().await;
    let b = env.create().await;
    let w = a
        .root_sh("echo a-secret > /tmp/a-file && echo evil > /etc/evil && echo x >> /etc/hostname-evil && rm /usr/bin/yes")
        .await;
    assert_eq!(w.end.exit_code, 0, "{}", w.stderr_text());
    let seen = b
        .root_sh("ls /tmp/a-file /etc/evil; test -x /usr/bin/yes")
        .await;
    assert!(
        seen.stdout_text().is_empty(),
        "b sees a's files: {}",
        seen.stdout_text()
    );
    assert_eq!(seen.end.exit_code, 0, "b lost /usr/bin/yes");
    assert!(
        !env.rootfs.join("etc/evil").exists(),
        "write reached the template"
    );
    assert!(
        env.rootfs.join("usr/bin/yes").exists(),
        "delete reached the template"
    );
    let upper = env
        .data
        .path()
        .join("sandboxes")
        .join(a.id().as_str())
        .join("upper");
    assert!(
        upper.join("etc/evil").exists(),
        "writes go to the sandbox's upper layer"
    );
    // Sandbox b cannot find a's upper layer or agent socket either.
    let find = b
        .root_sh(&format!(
            "ls -d /proc/*/root/tmp/a-file {} 2>/dev/null",
            upper.display()
        ))
        .await;
    assert!(find.stdout_text().is_empty());
}

#[tokio::test]
async fn no_mounts_devices_or_kernel_knobs_for_sandbox_root() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    for (cmd, what) in [
        ("mount -t tmpfs none /mnt", "mount a tmpfs"),
        ("mount --bind /tmp /mnt", "bind mount"),
        ("unshare -U true", "create a user namespace"),
        ("unshare -m true", "create a mount namespace"),
        ("mknod /tmp/sda b 8 0", "create a block device"),
        ("echo 1 > /proc/sys/vm/drop_caches", "write a sysctl"),
        ("echo b > /proc/sysrq-trigger", "trigger sysrq"),
        ("hostname evil", "change the host name"),
        ("head -c1 /dev/mem", "read /dev/mem"),
        ("cat /proc/1/environ", "read the agent's environment"),
        ("head -c1 /proc/1/mem", "read the agent's memory"),
        ("ip link add dummy0 type dummy", "create a network device"),
    ] {
        let out = sbx.root_sh(&format!("{cmd} 2>&1")).await;
        assert_ne!(
            out.end.exit_code,
            0,
            "sandbox root could {what}: {}",
            out.stdout_text()
        );
    }
    // SIGKILL to a pid namespace's init from inside is dropped by the kernel.
    sbx.root_sh("kill -9 1; kill -STOP 1").await;
    // The agent survived all of it.
    assert_eq!(sbx.client.health().await.unwrap(), 204);
    assert_eq!(sbx.sh("echo alive").await.stdout_text(), "alive\n");
    let devs = sbx.sh("ls /dev | sort | tr '\\n' ' '").await.stdout_text();
    assert_eq!(
        devs,
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero "
    );
    // sudo works (E2B parity) but yields only the sandbox's capability set.
    let caps = sbx.sh("sudo -n grep CapEff /proc/self/status").await;
    assert_eq!(caps.end.exit_code, 0, "{}", caps.stderr_text());
    assert_eq!(
        caps.stderr_text(),
        "",
        "sudo complains (host name not resolvable?)"
    );
    assert_eq!(
        caps.stdout_text().split_whitespace().nth(1),
        Some("00000000800025fb")
    );
}

#[tokio::test]
async fn fork_bomb_is_stopped_by_pids_limit_and_agent_survives() {
    let env = TestEnv::new();
    let mut spec = env.spec();
    spec.limits = Limits {
        pids: 64,
        ..Limits::default()
    };
    let sbx = env.create_spec(spec).await.unwrap();
    let cgroup_pids = env.runtime.cgroup_file(sbx.id(), "pids.events");
    let bomb = sbx
        .client
        .start(
            &cubicle_envd::proto::StartRequest {
                process: cubicle_envd::proto::ProcessConfig {
                    cmd: "/bin/bash".into(),
                    args: vec!["-c".into(), "b() { b | b & }; b; sleep 600".into()],
                    ..Default::default()
                },
                stdin: Some(false),
                tag: Some("bomb".into()),
                ..Default::default()
            },
            None,
            None,
        )
        .await
        .unwrap();
    // Wait until the kernel has refused forks (pids.events "max" > 0 on v1 and v2).
    let hit_limit = async {
        loop {
            let events = std::fs::read_to_string(&cgroup_pids).unwrap_or_default();
            if events
                .lines()
                .any(|l| l.starts_with("max ") && l != "max 0")
            {
                break;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), hit_limit)
        .await
        .expect("fork bomb reached the pids limit");
    // The agent still answers and still knows its processes.
    assert_eq!(sbx.client.health().await.unwrap(), 204);
    let list: ListResponse = sbx
        .client
        .unary("/process.Process/List", &Empty {}, None)
        .await
        .unwrap();
    assert!(list
        .processes
        .iter()
        .any(|p| p.tag.as_deref() == Some("bomb")));
    drop(bomb);
    // Kill the bomb's process group until the sandbox can run commands again.
    let recovered = async {
        loop {
            let _ = sbx.client.run("true", Some("root")).await;
            let _ = sbx
                .client
                .unary::<_, Empty>(
                    "/process.Process/SendSignal",
                    &cubicle_envd::proto::SendSignalRequest {
                        process: cubicle_envd::proto::ProcessSelector::Tag("bomb".into()),
                        signal: cubicle_envd::proto::Signal::Sigkill,
                    },
                    None,
                )
                .await;
            // `[b]` keeps pkill from matching this very shell's command line.
            if let Ok(out) = sbx
                .client
                .run("pkill -9 -f '[b] [|] b' ; echo alive", Some("root"))
                .await
            {
                if out.stdout_text().contains("alive") {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), recovered)
        .await
        .expect("sandbox recovers once the bomb is killed");
    assert_eq!(sbx.sh("echo ok").await.stdout_text(), "ok\n");
}

#[tokio::test]
async fn memory_hog_is_oom_killed_and_agent_survives() {
    let env = TestEnv::new();
    let mut spec = env.spec();
    spec.limits = Limits {
        memory_mb: 128,
        ..Limits::default()
    };
    let sbx = env.create_spec(spec).await.unwrap();
    let out = sbx
        .sh("python3 -c \"x = b'x' * (1024 << 20); print('survived')\"")
        .await;
    assert_eq!(
        out.end.status,
        "signal: killed",
        "stdout: {}",
        out.stdout_text()
    );
    assert_eq!(out.end.exit_code, -1);
    assert_eq!(sbx.client.health().await.unwrap(), 204);
    assert_eq!(
        sbx.sh("echo still here").await.stdout_text(),
        "still here\n"
    );
    let agent_alive = sbx.root_sh("cat /proc/1/comm").await;
    assert_eq!(agent_alive.stdout_text(), "cubicle-agent\n");
}
