//! 200 create/destroy cycles, sequential and concurrent, leave the host exactly as it
//! was: mounts, cgroups, namespaces, processes, file descriptors, disk usage.
//!
//! Alone in its test binary: it compares global host state before and after.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use cubicle_runtime::Runtime;
use support::TestEnv;

const PARENT: &str = "cubicle-leaktest";

#[derive(Debug, PartialEq, Eq)]
struct HostState {
    mountinfo: String,
    cgroups: Vec<String>,
    sandbox_processes: Vec<u32>,
    namespaces: BTreeSet<String>,
    our_fds: usize,
    our_children: usize,
    data_dir_entries: Vec<String>,
    data_dir_bytes: u64,
}

/// Processes other test binaries' sandboxes run (other cgroup parents) are ignored, so
/// the comparison only sees this test and the host itself.
fn in_foreign_sandbox(pid: &str) -> bool {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    cgroup.contains("/cubicle") && !cgroup.contains(&format!("/{PARENT}/"))
}

fn host_state(env: &TestEnv) -> HostState {
    let me = std::process::id().to_string();
    let mut sandbox_processes = Vec::new();
    let mut namespaces = BTreeSet::new();
    let mut our_children = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().into_string().unwrap();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || in_foreign_sandbox(&pid) {
            continue;
        }
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cgroup.contains(&format!("/{PARENT}/")) {
            sandbox_processes.push(pid.parse().unwrap());
        }
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1));
            if ppid == Some(me.as_str()) {
                our_children += 1;
            }
        }
        for ns in ["mnt", "pid", "net", "uts", "ipc", "cgroup", "user"] {
            if let Ok(link) = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")) {
                namespaces.insert(link.to_string_lossy().into_owned());
            }
        }
    }
    let data = env.data.path();
    HostState {
        mountinfo: std::fs::read_to_string("/proc/self/mountinfo").unwrap(),
        cgroups: env.runtime.cgroup_names().unwrap(),
        sandbox_processes,
        namespaces,
        our_fds: std::fs::read_dir("/proc/self/fd").unwrap().count(),
        our_children,
        data_dir_entries: walk(data),
        data_dir_bytes: du(data),
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            out.push(e.path().display().to_string());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out.sort();
    out
}

fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walk(dir)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_create_destroy_cycles_leave_nothing_behind() {
    let env = TestEnv::with_cgroup_parent(PARENT);
    // One cycle first: creating the cgroup parent and the sandboxes dir is expected state.
    let first = env.create().await;
    assert_eq!(first.sh("echo warm").await.stdout_text(), "warm\n");
    first.destroy().await;
    let before = host_state(&env);

    // 100 sequential cycles, each doing real work inside the sandbox.
    for i in 0..100 {
        let sbx = env.create().await;
        let out = sbx
            .sh(&format!(
                "echo {i} > /tmp/f && (sleep 30 >/dev/null 2>&1 &) ; cat /tmp/f"
            ))
            .await;
        assert_eq!(out.stdout_text(), format!("{i}\n"));
        sbx.destroy().await;
    }
    // 100 more, 10 at a time concurrently, some destroyed while a command runs.
    for _ in 0..10 {
        let mut batch = Vec::new();
        for j in 0..10 {
            let runtime = env.runtime.clone();
            let spec = env.spec();
            batch.push(tokio::spawn(async move {
                let id = spec.id.clone();
                let info = runtime.create(spec).await.expect("create");
                let client = cubicle_envd::client::EnvdClient::new(&info.agent_socket);
                if j % 2 == 0 {
                    let out = client
                        .run("head -c 100000 /dev/urandom | sha1sum", None)
                        .await
                        .unwrap();
                    assert_eq!(out.end.exit_code, 0);
                } else {
                    // Destroy with a live stream open.
                    let _stream = client
                        .start(
                            &cubicle_envd::proto::StartRequest {
                                process: cubicle_envd::proto::ProcessConfig {
                                    cmd: "/bin/sleep".into(),
                                    args: vec!["600".into()],
                                    ..Default::default()
                                },
                                ..Default::default()
                            },
                            None,
                            None,
                        )
                        .await
                        .unwrap();
                }
                runtime.destroy(&id).await.expect("destroy");
            }));
        }
        for t in batch {
            t.await.unwrap();
        }
    }

    let after = host_state(&env);
    assert_eq!(before.mountinfo, after.mountinfo, "host mounts changed");
    assert_eq!(before.cgroups, after.cgroups, "cgroups left behind");
    assert_eq!(
        after.sandbox_processes,
        Vec::<u32>::new(),
        "sandbox processes left"
    );
    let leaked: Vec<_> = after.namespaces.difference(&before.namespaces).collect();
    assert!(leaked.is_empty(), "namespaces left behind: {leaked:?}");
    assert_eq!(before.our_fds, after.our_fds, "file descriptors leaked");
    assert_eq!(before.our_children, after.our_children, "unreaped children");
    assert_eq!(
        before.data_dir_entries, after.data_dir_entries,
        "files left behind"
    );
    assert_eq!(
        before.data_dir_bytes, after.data_dir_bytes,
        "disk usage changed"
    );
}
