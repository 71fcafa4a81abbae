//! Create and destroy: bad input, failed creates that leave nothing behind, idempotent
//! destroy, concurrent creates from a multi-threaded caller.

mod support;

use std::time::Duration;

use cubicle_core::{ErrorKind, Limits, SandboxId};
use cubicle_runtime::{Runtime, RuntimeError};
use support::TestEnv;

fn sandbox_dirs(env: &TestEnv) -> Vec<String> {
    match std::fs::read_dir(env.data.path().join("sandboxes")) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Asserts that sandbox `id` has no directory, cgroup or listing entry.
async fn assert_nothing_left_of(env: &TestEnv, id: &SandboxId) {
    assert!(
        !sandbox_dirs(env).contains(&id.to_string()),
        "{id}: directory"
    );
    assert!(
        !env.runtime
            .cgroup_names()
            .unwrap()
            .contains(&id.to_string()),
        "{id}: cgroup"
    );
    assert!(
        env.runtime
            .list()
            .await
            .unwrap()
            .iter()
            .all(|s| s.id != *id),
        "{id}: listed"
    );
}

#[tokio::test]
async fn bad_specs_are_refused_before_anything_is_created() {
    let env = TestEnv::new();
    let mut ids = Vec::new();

    let mut spec = env.spec();
    ids.push(spec.id.to_string());
    spec.limits = Limits {
        memory_mb: 1,
        ..Limits::default()
    };
    let err = env.runtime.create(spec).await.unwrap_err();
    assert!(
        matches!(&err, RuntimeError::InvalidLimits(l) if l.field == "memoryMB"),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::InvalidInput);

    let mut spec = env.spec();
    ids.push(spec.id.to_string());
    spec.layers = vec!["/nonexistent/template/rootfs".into()];
    let err = env.runtime.create(spec).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}");

    let mut spec = env.spec();
    ids.push(spec.id.to_string());
    spec.uid_shift = 0;
    let err = env.runtime.create(spec).await.unwrap_err();
    assert!(
        matches!(err, RuntimeError::UidShiftMismatch { .. }),
        "{err:?}"
    );

    let dirs = sandbox_dirs(&env);
    let cgroups = env.runtime.cgroup_names().unwrap();
    for id in &ids {
        assert!(
            !dirs.contains(id) && !cgroups.contains(id),
            "{id} left behind"
        );
    }
}

#[tokio::test]
async fn a_create_that_fails_inside_the_sandbox_leaves_nothing_behind() {
    let env = TestEnv::new();
    // A "template" without /proc: init fails at that step and says so.
    let broken = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(broken.path().join("etc")).unwrap();
    let mut spec = env.spec();
    spec.layers = vec![broken.path().to_owned()];
    let id = spec.id.clone();
    let err = env.runtime.create(spec).await.unwrap_err();
    match &err {
        RuntimeError::Init { step, message } => {
            assert_eq!(step, "mount /proc", "{message}");
        }
        other => panic!("expected an init failure, got {other:?}"),
    }
    assert_nothing_left_of(&env, &id).await;
}

#[tokio::test]
async fn every_sandbox_process_is_in_the_sandbox_cgroup_with_its_limits() {
    let env = TestEnv::new();
    let mut spec = env.spec();
    spec.limits = Limits {
        cpu_count: 1,
        memory_mb: 300,
        pids: 77,
    };
    let sbx = env.create_spec(spec).await.unwrap();
    let out = sbx.sh("sleep 30 >/dev/null 2>&1 & echo $!").await;
    let inner_pid = out.stdout_text().trim().to_owned();
    assert!(!inner_pid.is_empty());
    // Host view: the agent and everything it starts sit in <parent>/<id> in every
    // controller the runtime uses (joined by the child itself on cgroup v1).
    let procs = std::fs::read_to_string(env.runtime.cgroup_file(sbx.id(), "cgroup.procs")).unwrap();
    let pids: Vec<&str> = procs.lines().collect();
    assert!(
        pids.contains(&sbx.info.pid.to_string().as_str()),
        "agent not in cgroup: {pids:?}"
    );
    assert!(
        pids.len() >= 2,
        "the user process is not in the cgroup: {pids:?}"
    );
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", sbx.info.pid)).unwrap();
    let wanted = format!("/cubicle-test/{}", sbx.id());
    if env.runtime.cgroup_version() == "v1" {
        for controller in ["memory", "cpu", "pids", "freezer"] {
            assert!(
                cgroup.lines().any(|l| l
                    .split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == controller))
                    && l.ends_with(&wanted)),
                "{controller} not joined: {cgroup}"
            );
        }
    } else {
        assert!(
            cgroup
                .lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&wanted)),
            "{cgroup}"
        );
    }
    let read = |f: &str| std::fs::read_to_string(env.runtime.cgroup_file(sbx.id(), f)).unwrap();
    assert_eq!(read("pids.max").trim(), "77");
    if env.runtime.cgroup_version() == "v1" {
        assert_eq!(
            read("memory.limit_in_bytes").trim(),
            (300u64 << 20).to_string()
        );
        assert_eq!(read("cpu.cfs_quota_us").trim(), "100000");
    } else {
        assert_eq!(read("memory.max").trim(), (300u64 << 20).to_string());
    }
    // Stats come from the same cgroup and the sandbox's own layer.
    let before = env.runtime.stats(sbx.id()).await.unwrap();
    assert_eq!(before.memory_limit_bytes, 300 << 20);
    assert!(
        before.pids >= 2 && before.cpu_usage_ns > 0 && before.memory_bytes > 0,
        "{before:?}"
    );
    sbx.sh("head -c 3000000 /dev/urandom > /home/user/blob")
        .await;
    let after = env.runtime.stats(sbx.id()).await.unwrap();
    assert!(
        after.disk_used_bytes >= before.disk_used_bytes + 3_000_000,
        "{before:?} {after:?}"
    );
    assert!(after.cpu_usage_ns > before.cpu_usage_ns);
    // Inside, the cgroup namespace makes the sandbox's cgroup look like the root.
    assert_eq!(
        sbx.sh("cat /proc/self/cgroup | grep -c ':/$'")
            .await
            .stdout_text()
            .trim(),
        cgroup.lines().count().to_string()
    );
}

#[tokio::test]
async fn duplicate_ids_are_refused_and_destroy_is_idempotent() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    let mut dup = env.spec();
    dup.id = sbx.id().clone();
    let err = env.runtime.create(dup).await.unwrap_err();
    assert!(matches!(err, RuntimeError::AlreadyExists(_)), "{err:?}");
    // The original is untouched by the refused duplicate.
    assert_eq!(sbx.client.health().await.unwrap(), 204);

    let listed = env.runtime.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, *sbx.id());
    assert_eq!(listed[0].pid, sbx.info.pid);

    let id = sbx.id().clone();
    env.runtime.destroy(&id).await.unwrap();
    env.runtime.destroy(&id).await.unwrap();
    assert!(env.runtime.list().await.unwrap().is_empty());
    assert!(sandbox_dirs(&env).is_empty());
    assert!(sbx.client.health().await.is_err(), "agent socket gone");
    assert_nothing_left_of(&env, &id).await;
}

#[tokio::test]
async fn destroy_works_from_a_runtime_that_did_not_create_the_sandbox() {
    // The CLI creates in one process and kills from another: the runtime must find the
    // sandbox through its on-disk record.
    let env = TestEnv::new();
    let sbx = env.create().await;
    let other = cubicle_runtime::ns::NsRuntime::new({
        let mut c = cubicle_runtime::ns::NsConfig::new(
            cubicle_core::DataDir::new(env.data.path()),
            env!("CARGO_BIN_EXE_cubicle-agent").into(),
        );
        c.cgroup_parent = "cubicle-test".into();
        c
    })
    .unwrap();
    assert_eq!(other.list().await.unwrap().len(), 1);
    other.destroy(sbx.id()).await.unwrap();
    assert!(other.list().await.unwrap().is_empty());
    assert!(sbx.client.health().await.is_err());
}

/// Regression: the raw clone used glibc's set*id wrappers in the child, which broadcast
/// to the parent's threads and could hang when the caller is multi-threaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_from_a_multithreaded_caller_never_hang() {
    let env = TestEnv::new();
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let runtime = env.runtime.clone();
        let spec = env.spec();
        tasks.push(tokio::spawn(async move {
            let id = spec.id.clone();
            tokio::time::timeout(Duration::from_secs(20), runtime.create(spec))
                .await
                .expect("create finished")
                .expect("create succeeded");
            runtime.destroy(&id).await.expect("destroy");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(sandbox_dirs(&env).is_empty());
}

#[tokio::test]
async fn a_child_that_cannot_execute_the_agent_says_so_and_leaves_nothing_behind() {
    // The child exits before reading the runtime's go frame: the runtime's read of the
    // report then fails with ECONNRESET, not EOF. That used to be the error
    // ("read the init report: Connection reset by peer") instead of the step that failed.
    let env = TestEnv::new();
    let agents = env.data.path().join("agents");
    for stored in std::fs::read_dir(&agents).unwrap() {
        std::fs::remove_file(stored.unwrap().path().join("cubicle-agent")).unwrap();
    }
    let spec = env.spec();
    let id = spec.id.clone();
    let err = env.runtime.create(spec).await.unwrap_err();
    match &err {
        RuntimeError::Spawn { step, source } => {
            assert_eq!(*step, "execute the agent binary", "{source}");
            assert!(source.to_string().contains("exited with 124"), "{source}");
        }
        other => panic!("expected the exec step to fail, got {other:?}"),
    }
    assert_nothing_left_of(&env, &id).await;
}

/// The value a sandbox's background counter last wrote, read from the host (the agent
/// of a paused sandbox does not answer).
fn counter(env: &TestEnv, sbx: &support::Sandbox) -> u64 {
    let path = env
        .data
        .path()
        .join("sandboxes")
        .join(sbx.id().as_str())
        .join("upper/tmp/count");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn pause_stops_every_process_and_resume_lets_them_go_on() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    let out = sbx
        .sh("nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.005; done' >/dev/null 2>&1 &")
        .await;
    assert_eq!(out.end.exit_code, 0);
    let counting = async {
        while counter(&env, &sbx) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), counting)
        .await
        .expect("the counter runs");

    let started = std::time::Instant::now();
    env.runtime.pause(sbx.id()).await.unwrap();
    let paused_in = started.elapsed();
    let state_file = if env.runtime.cgroup_version() == "v1" {
        "freezer.state"
    } else {
        "cgroup.events"
    };
    let state = std::fs::read_to_string(env.runtime.cgroup_file(sbx.id(), state_file)).unwrap();
    assert!(
        state.trim() == "FROZEN" || state.contains("frozen 1"),
        "{state}"
    );
    let listed = env.runtime.list().await.unwrap();
    assert!(listed.iter().any(|s| &s.id == sbx.id() && s.paused));
    // Pausing again is fine. Nothing moves while paused: not the counter, not the agent.
    env.runtime.pause(sbx.id()).await.unwrap();
    let frozen_at = counter(&env, &sbx);
    let health = tokio::time::timeout(Duration::from_millis(300), sbx.client.health()).await;
    assert!(health.is_err(), "a paused agent answered: {health:?}");
    assert_eq!(
        counter(&env, &sbx),
        frozen_at,
        "the counter ran while paused"
    );

    let started = std::time::Instant::now();
    env.runtime.resume(sbx.id()).await.unwrap();
    let resumed_in = started.elapsed();
    assert_eq!(
        sbx.client.health().await.unwrap(),
        http::StatusCode::NO_CONTENT
    );
    let going_on = async {
        while counter(&env, &sbx) <= frozen_at {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), going_on)
        .await
        .expect("the counter goes on after resume");
    eprintln!("pause {paused_in:?}, resume {resumed_in:?}");
    let listed = env.runtime.list().await.unwrap();
    assert!(listed.iter().any(|s| &s.id == sbx.id() && !s.paused));

    // A paused sandbox is destroyed like a running one, leaving nothing.
    env.runtime.pause(sbx.id()).await.unwrap();
    let id = sbx.id().clone();
    tokio::time::timeout(Duration::from_secs(10), sbx.destroy())
        .await
        .expect("destroying a paused sandbox does not hang");
    assert_nothing_left_of(&env, &id).await;
    // Unknown sandboxes are not found.
    assert!(matches!(
        env.runtime.pause(&id).await,
        Err(RuntimeError::NotFound(_))
    ));
    assert!(matches!(
        env.runtime.resume(&id).await,
        Err(RuntimeError::NotFound(_))
    ));
}
