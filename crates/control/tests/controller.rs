//! The controller against a fake runtime: lifecycle records, ownership, failed creates,
//! timeouts, reconcile after a restart, idempotent creates.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cubicle_control::testing::{fake_templates, FakeRuntime};
use cubicle_control::{ControlConfig, ControlError, Controller, CreateRequest, ListRequest};
use cubicle_core::{SandboxId, SandboxState};
use cubicle_store::{SandboxRecord, Store};

async fn controller(
    runtime: Arc<FakeRuntime>,
    store: Store,
) -> (tempfile::TempDir, Arc<Controller>) {
    let (tmp, templates) = fake_templates();
    let config = ControlConfig {
        max_timeout: Duration::from_secs(3600),
        ..ControlConfig::default()
    };
    let c = Controller::start(config, runtime, store, templates)
        .await
        .unwrap();
    (tmp, c)
}

fn create(template: &str) -> CreateRequest {
    CreateRequest {
        template: template.into(),
        secure: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn create_records_running_and_routes() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (_t, c) = controller(rt.clone(), store.clone()).await;
    let mut req = create("base");
    req.metadata = BTreeMap::from([("k".into(), "v".into())]);
    req.env_vars = BTreeMap::from([("A".into(), "1".into())]);
    let r = c.create(7, req).await.unwrap();
    assert_eq!(r.state, SandboxState::Running);
    assert_eq!(r.owner, 7);
    assert!(r.started_at_ms.is_some());
    assert_eq!(r.envd_access_token.as_ref().map(|t| t.len()), Some(64));
    assert!(c.route(r.id.as_str()).is_some());
    // The agent got the env vars and the token.
    let spec = rt.created.lock().unwrap()[0].clone();
    assert_eq!(spec.agent.env_vars["A"], "1");
    assert_eq!(spec.agent.access_token, r.envd_access_token);
    assert_eq!(spec.agent.default_user, "user");
    assert_eq!(c.get(7, &r.id).unwrap().metadata["k"], "v");
}

#[tokio::test]
async fn other_keys_neither_see_nor_kill() {
    let rt = Arc::new(FakeRuntime::default());
    let (_t, c) = controller(rt, Store::open_in_memory().unwrap()).await;
    let r = c.create(1, create("base")).await.unwrap();
    assert!(matches!(
        c.get(2, &r.id),
        Err(ControlError::SandboxNotFound(_))
    ));
    assert!(matches!(
        c.kill(2, &r.id).await,
        Err(ControlError::SandboxNotFound(_))
    ));
    assert!(matches!(
        c.set_timeout(2, &r.id, 10),
        Err(ControlError::SandboxNotFound(_))
    ));
    assert!(c.list(2, &ListRequest::default()).unwrap().items.is_empty());
    assert_eq!(c.list(1, &ListRequest::default()).unwrap().items.len(), 1);
    c.kill(1, &r.id).await.unwrap();
    // Killed: gone for the owner too, and killing again is "not found".
    assert!(matches!(
        c.get(1, &r.id),
        Err(ControlError::SandboxNotFound(_))
    ));
    assert!(matches!(
        c.kill(1, &r.id).await,
        Err(ControlError::SandboxNotFound(_))
    ));
    assert!(c.route(r.id.as_str()).is_none());
}

#[tokio::test]
async fn bad_input_changes_nothing() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (_t, c) = controller(rt.clone(), store.clone()).await;
    assert!(matches!(
        c.create(1, create("nope")).await,
        Err(ControlError::TemplateNotFound(_))
    ));
    let mut too_long = create("base");
    too_long.timeout_secs = Some(7200);
    assert!(matches!(
        c.create(1, too_long).await,
        Err(ControlError::InvalidInput(_))
    ));
    assert!(rt.created.lock().unwrap().is_empty());
    assert!(store.live_sandboxes().unwrap().is_empty());
}

#[tokio::test]
async fn a_failed_create_is_recorded_as_killed_with_its_reason() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (_t, c) = controller(rt.clone(), store.clone()).await;
    *rt.fail_next_create.lock().unwrap() = true;
    let err = c.create(1, create("base")).await.unwrap_err();
    assert!(matches!(err, ControlError::Runtime(_)));
    assert!(store.live_sandboxes().unwrap().is_empty());
    let all = store
        .list_sandboxes(&cubicle_store::ListQuery {
            states: vec![SandboxState::Killed],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.items.len(), 1);
    assert!(all.items[0]
        .end_reason
        .as_deref()
        .unwrap()
        .contains("create failed"));
}

#[tokio::test]
async fn timeouts_kill_and_set_timeout_moves_the_deadline() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (_t, c) = controller(rt.clone(), store.clone()).await;
    let mut short = create("base");
    short.timeout_secs = Some(1);
    let a = c.create(1, short.clone()).await.unwrap();
    let b = c.create(1, short).await.unwrap();
    c.set_timeout(1, &b.id, 600).unwrap();
    // Wait (bounded) for the reaper to kill `a`.
    let killed = async {
        loop {
            if store.get_sandbox(&a.id).unwrap().unwrap().state == SandboxState::Killed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), killed)
        .await
        .expect("expired");
    let a = store.get_sandbox(&a.id).unwrap().unwrap();
    assert_eq!(a.end_reason.as_deref(), Some("timeout"));
    assert!(!rt.running.lock().unwrap().contains_key(&a.id));
    assert_eq!(c.get(1, &b.id).unwrap().state, SandboxState::Running);
    assert!(matches!(
        c.set_timeout(1, &b.id, 0),
        Err(ControlError::InvalidInput(_))
    ));
    // connect extends, never shortens.
    let before = c.get(1, &b.id).unwrap().end_at_ms;
    let (after, resumed) = c.connect(1, &b.id, Some(5)).await.unwrap();
    assert!(!resumed);
    assert_eq!(after.end_at_ms, before);
}

#[tokio::test]
async fn restart_adopts_survivors_and_records_the_dead() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (_t, c) = controller(rt.clone(), store.clone()).await;
    let alive = c.create(1, create("base")).await.unwrap();
    let dead = c.create(1, create("base")).await.unwrap();
    drop(c);
    // While the daemon is down: one sandbox dies, a stray appears, a create was cut.
    rt.running.lock().unwrap().remove(&dead.id);
    let stray: SandboxId = SandboxId::generate();
    rt.residues.lock().unwrap().insert(stray.clone());
    let cut = SandboxRecord {
        state: SandboxState::Creating,
        id: SandboxId::generate(),
        started_at_ms: None,
        ..store.get_sandbox(&alive.id).unwrap().unwrap()
    };
    store.insert_sandbox(&cut).unwrap();

    let (_t2, c) = controller(rt.clone(), store.clone()).await;
    assert!(c.route(alive.id.as_str()).is_some(), "survivor adopted");
    assert_eq!(c.get(1, &alive.id).unwrap().state, SandboxState::Running);
    let dead = store.get_sandbox(&dead.id).unwrap().unwrap();
    assert_eq!(dead.state, SandboxState::Killed);
    assert!(dead
        .end_reason
        .unwrap()
        .contains("not running when the daemon started"));
    let cut = store.get_sandbox(&cut.id).unwrap().unwrap();
    assert_eq!(cut.state, SandboxState::Killed);
    assert!(
        !rt.residues.lock().unwrap().contains(&stray),
        "stray destroyed"
    );
    assert!(rt.residues.lock().unwrap().contains(&alive.id));
}

#[tokio::test]
async fn idempotency_key_returns_the_same_sandbox() {
    let rt = Arc::new(FakeRuntime::default());
    let (_t, c) = controller(rt.clone(), Store::open_in_memory().unwrap()).await;
    let mut req = create("base");
    req.idempotency_key = Some("retry-1".into());
    let a = c.create(1, req.clone()).await.unwrap();
    let b = c.create(1, req.clone()).await.unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(rt.created.lock().unwrap().len(), 1);
    // Another key's identical idempotency key is another sandbox.
    let other = c.create(2, req).await.unwrap();
    assert_ne!(other.id, a.id);
}

#[tokio::test]
async fn metrics_are_sampled_on_demand() {
    let rt = Arc::new(FakeRuntime::default());
    let (_t, c) = controller(rt, Store::open_in_memory().unwrap()).await;
    let r = c.create(1, create("base")).await.unwrap();
    let m = c.metrics(1, &r.id, None, None).await.unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].mem_total, 2 << 30);
    assert_eq!(m[0].disk_used, 4096);
    assert!(matches!(
        c.metrics(2, &r.id, None, None).await,
        Err(ControlError::SandboxNotFound(_))
    ));
}

#[tokio::test]
async fn layered_templates_pass_every_layer_and_the_interpreter_flag() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (tmp, c) = controller(rt.clone(), store.clone()).await;
    let rootfs = |n: &str| tmp.path().join("templates").join(n).join("rootfs");

    let base = c.create(1, create("base")).await.unwrap();
    assert_eq!(base.template, "base");
    // By alias: recorded under the template's name, the alias as asked.
    let ci = c.create(1, create("code-interpreter-v1")).await.unwrap();
    assert_eq!(ci.template, "code-interpreter");
    assert_eq!(ci.alias.as_deref(), Some("code-interpreter-v1"));
    let by_name = c.create(1, create("code-interpreter")).await.unwrap();
    assert_eq!(by_name.template, "code-interpreter");

    let specs = rt.created.lock().unwrap().clone();
    assert_eq!(specs[0].layers, [rootfs("base")]);
    assert!(!specs[0].agent.code_interpreter);
    for spec in &specs[1..] {
        assert_eq!(spec.layers, [rootfs("code-interpreter"), rootfs("base")]);
        assert!(spec.agent.code_interpreter);
    }
    // The runtime's view keeps every layer (what template removal must respect).
    let running = rt.running.lock().unwrap();
    assert_eq!(running[&ci.id].layers.len(), 2);
    drop(running);

    // Listing shows aliases and parents; lookup by alias works.
    let list = c.templates().unwrap();
    let names: Vec<&str> = list.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["base", "code-interpreter"]);
    assert_eq!(list[1].aliases, ["code-interpreter-v1"]);
    assert_eq!(list[1].parent.as_deref(), Some("base"));
    assert!(list[0].aliases.is_empty() && list[0].parent.is_none());
    assert_eq!(
        c.template("code-interpreter-v1").unwrap().name,
        "code-interpreter"
    );
}

#[tokio::test]
async fn a_layer_whose_parent_is_gone_is_refused_before_anything_is_recorded() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (tmp, c) = controller(rt.clone(), store.clone()).await;
    std::fs::remove_dir_all(tmp.path().join("templates/base")).unwrap();
    let err = c.create(1, create("code-interpreter")).await.unwrap_err();
    assert!(
        err.chain().contains("its parent 'base': it is not built"),
        "{}",
        err.chain()
    );
    assert_eq!(err.kind(), cubicle_core::ErrorKind::NotFound);
    assert!(rt.created.lock().unwrap().is_empty());
    let page = c.list(1, &ListRequest::default()).unwrap();
    assert!(page.items.is_empty());
}

fn paused_in_runtime(rt: &FakeRuntime, id: &SandboxId) -> bool {
    rt.running.lock().unwrap()[id].paused
}

#[tokio::test]
async fn pause_and_resume_follow_the_state_machine() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (_t, c) = controller(rt.clone(), store.clone()).await;
    let r = c.create(1, create("base")).await.unwrap();

    let paused = c.pause(1, &r.id).await.unwrap();
    assert_eq!(paused.state, SandboxState::Paused);
    assert!(paused_in_runtime(&rt, &r.id));
    assert!(
        c.route(r.id.as_str()).is_none(),
        "no traffic to a paused sandbox"
    );
    // Pausing again is a conflict; other keys do not find it; resume (v1) resumes.
    assert!(matches!(
        c.pause(1, &r.id).await,
        Err(ControlError::Conflict(_))
    ));
    assert!(matches!(
        c.pause(2, &r.id).await,
        Err(ControlError::SandboxNotFound(_))
    ));
    let listed = c
        .list(
            1,
            &ListRequest {
                states: vec![SandboxState::Paused],
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    // A refresh does not resume it.
    c.extend(1, &r.id, Some(60)).unwrap();
    assert!(paused_in_runtime(&rt, &r.id));

    // connect resumes (201 in the API) with the deadline at now + timeout.
    let before = cubicle_control::now_ms();
    let (record, resumed) = c.connect(1, &r.id, Some(120)).await.unwrap();
    assert!(resumed);
    assert_eq!(record.state, SandboxState::Running);
    assert!(record.end_at_ms >= before + 120_000);
    assert!(!paused_in_runtime(&rt, &r.id));
    assert!(c.route(r.id.as_str()).is_some());
    let (_, resumed) = c.connect(1, &r.id, None).await.unwrap();
    assert!(!resumed, "a running sandbox is not resumed again");
    assert!(matches!(
        c.resume(1, &r.id, None).await,
        Err(ControlError::Conflict(_))
    ));
    c.pause(1, &r.id).await.unwrap();
    let record = c.resume(1, &r.id, None).await.unwrap();
    assert_eq!(record.state, SandboxState::Running);

    // A paused sandbox can be killed; afterwards nothing finds it.
    c.pause(1, &r.id).await.unwrap();
    c.kill(1, &r.id).await.unwrap();
    assert!(!rt.running.lock().unwrap().contains_key(&r.id));
    assert!(matches!(
        c.pause(1, &r.id).await,
        Err(ControlError::SandboxNotFound(_))
    ));
    assert!(matches!(
        c.connect(1, &r.id, None).await,
        Err(ControlError::SandboxNotFound(_))
    ));
    assert_eq!(
        store.get_sandbox(&r.id).unwrap().unwrap().state,
        SandboxState::Killed
    );
}

#[tokio::test]
async fn paused_sandboxes_do_not_expire_and_auto_pause_pauses_at_the_deadline() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (_t, c) = controller(rt.clone(), store.clone()).await;
    let mut short = create("base");
    short.timeout_secs = Some(1);
    let paused = c.create(1, short.clone()).await.unwrap();
    c.pause(1, &paused.id).await.unwrap();
    short.auto_pause = true;
    let auto = c.create(1, short.clone()).await.unwrap();
    short.auto_pause = false;
    let plain = c.create(1, short).await.unwrap();

    // Bounded wait until the plain one expired (the others' deadlines passed too).
    let killed = async {
        while store.get_sandbox(&plain.id).unwrap().unwrap().state != SandboxState::Killed {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), killed)
        .await
        .expect("plain sandbox expired");
    let auto_paused = async {
        while store.get_sandbox(&auto.id).unwrap().unwrap().state != SandboxState::Paused {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), auto_paused)
        .await
        .expect("auto-pause sandbox paused");
    assert!(paused_in_runtime(&rt, &auto.id));
    assert_eq!(c.get(1, &paused.id).unwrap().state, SandboxState::Paused);
    assert!(
        paused_in_runtime(&rt, &paused.id),
        "a paused sandbox outlives its timeout"
    );
}

#[tokio::test]
async fn restart_keeps_paused_sandboxes_paused_and_repairs_half_done_pauses() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (_t, c) = controller(rt.clone(), store.clone()).await;
    let paused = c.create(1, create("base")).await.unwrap();
    c.pause(1, &paused.id).await.unwrap();
    let frozen_only = c.create(1, create("base")).await.unwrap();
    let recorded_only = c.create(1, create("base")).await.unwrap();
    c.pause(1, &recorded_only.id).await.unwrap();
    drop(c);
    // A daemon that died between the runtime and the store: one sandbox is frozen but
    // recorded as running, the other recorded as paused but running.
    rt.running
        .lock()
        .unwrap()
        .get_mut(&frozen_only.id)
        .unwrap()
        .paused = true;
    rt.running
        .lock()
        .unwrap()
        .get_mut(&recorded_only.id)
        .unwrap()
        .paused = false;

    let (_t2, c) = controller(rt.clone(), store.clone()).await;
    assert_eq!(c.get(1, &paused.id).unwrap().state, SandboxState::Paused);
    assert!(c.route(paused.id.as_str()).is_none());
    // The store wins.
    assert!(!paused_in_runtime(&rt, &frozen_only.id));
    assert!(c.route(frozen_only.id.as_str()).is_some());
    assert!(paused_in_runtime(&rt, &recorded_only.id));
    let (_, resumed) = c.connect(1, &paused.id, None).await.unwrap();
    assert!(resumed);
}

#[tokio::test]
async fn hibernation_frees_the_sandbox_and_resume_restores_it_under_its_id() {
    let rt = Arc::new(FakeRuntime::default());
    let store = Store::open_in_memory().unwrap();
    let (tmp, c) = controller(rt.clone(), store.clone()).await;
    let r = c.create(1, create("base")).await.unwrap();
    let dir = tmp.path().join("hibernated").join(r.id.as_str());

    let record = c.hibernate(1, &r.id).await.unwrap();
    assert_eq!(record.state, SandboxState::Paused);
    assert!(dir.is_dir(), "checkpoint on disk");
    assert!(
        !rt.running.lock().unwrap().contains_key(&r.id),
        "processes ended"
    );
    assert!(c.route(r.id.as_str()).is_none());
    assert!(matches!(
        c.hibernate(1, &r.id).await,
        Err(ControlError::Conflict(_))
    ));
    assert!(matches!(
        c.pause(1, &r.id).await,
        Err(ControlError::Conflict(_))
    ));

    // A restart (same data dir) adopts it as paused, and resume restores it under the
    // same id.
    drop(c);
    let config = ControlConfig {
        max_timeout: Duration::from_secs(3600),
        ..ControlConfig::default()
    };
    let templates = cubicle_template::TemplateStore::new(cubicle_core::DataDir::new(tmp.path()));
    let c = Controller::start(config, rt.clone(), store.clone(), templates)
        .await
        .unwrap();
    assert_eq!(c.get(1, &r.id).unwrap().state, SandboxState::Paused);
    let (record, resumed) = c.connect(1, &r.id, Some(60)).await.unwrap();
    assert!(resumed);
    assert_eq!(record.state, SandboxState::Running);
    let restored = rt.restored.lock().unwrap().clone();
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].0, dir);
    assert_eq!(restored[0].1.id, r.id);
    assert_eq!(restored[0].1.agent.access_token, r.envd_access_token);
    assert!(!dir.exists(), "the checkpoint goes once restored");
    assert!(c.route(r.id.as_str()).is_some());

    // Killing a hibernated sandbox removes its checkpoint.
    c.hibernate(1, &r.id).await.unwrap();
    assert!(dir.is_dir());
    c.kill(1, &r.id).await.unwrap();
    assert!(!dir.exists());
}

#[tokio::test]
async fn a_long_pause_hibernates() {
    let rt = Arc::new(FakeRuntime::default());
    let (tmp, templates) = fake_templates();
    let config = ControlConfig {
        hibernate_after: Some(Duration::from_millis(50)),
        ..ControlConfig::default()
    };
    let c = Controller::start(
        config,
        rt.clone(),
        Store::open_in_memory().unwrap(),
        templates,
    )
    .await
    .unwrap();
    let r = c.create(1, create("base")).await.unwrap();
    let running = c.create(1, create("base")).await.unwrap();
    c.pause(1, &r.id).await.unwrap();
    let dir = tmp.path().join("hibernated").join(r.id.as_str());
    let hibernated = async {
        while !dir.is_dir() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), hibernated)
        .await
        .expect("the paused sandbox hibernated");
    assert!(!rt.running.lock().unwrap().contains_key(&r.id));
    assert!(
        rt.running.lock().unwrap().contains_key(&running.id),
        "a running one stays"
    );
    let (_, resumed) = c.connect(1, &r.id, None).await.unwrap();
    assert!(resumed);
}

#[tokio::test]
async fn memory_pressure_hibernates_paused_sandboxes_only() {
    let rt = Arc::new(FakeRuntime::default());
    let (tmp, templates) = fake_templates();
    let meminfo = tmp.path().join("meminfo");
    std::fs::write(
        &meminfo,
        "MemTotal: 25000000 kB\nMemAvailable: 4194304 kB\n",
    )
    .unwrap();
    let config = ControlConfig {
        hibernate_after: None,
        hibernate_below_mib: Some(1024),
        meminfo: meminfo.clone(),
        ..ControlConfig::default()
    };
    let c = Controller::start(
        config,
        rt.clone(),
        Store::open_in_memory().unwrap(),
        templates,
    )
    .await
    .unwrap();
    let paused = c.create(1, create("base")).await.unwrap();
    let running = c.create(1, create("base")).await.unwrap();
    c.pause(1, &paused.id).await.unwrap();
    let dir = tmp.path().join("hibernated").join(paused.id.as_str());
    // Plenty of memory: the pause stays in memory (one check runs per second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!dir.exists());
    // Short of memory: it hibernates; the running sandbox is left alone.
    std::fs::write(&meminfo, "MemTotal: 25000000 kB\nMemAvailable: 524288 kB\n").unwrap();
    let hibernated = async {
        while !dir.is_dir() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), hibernated)
        .await
        .expect("the paused sandbox hibernated under memory pressure");
    assert!(rt.running.lock().unwrap().contains_key(&running.id));
    assert_eq!(c.get(1, &running.id).unwrap().state, SandboxState::Running);
}

/// A fake template `web` whose image runs a service, with CPU, memory and env
/// defaults; `checkpointed` also gives it the checkpoint its build would have written.
fn add_service_template(tmp: &std::path::Path, checkpointed: bool) {
    let dir = tmp.join("templates/web");
    std::fs::create_dir_all(dir.join("rootfs")).unwrap();
    let meta = serde_json::json!({
        "format_version": 1, "recipe": "image", "recipe_hash": "02",
        "uid_shift": cubicle_core::uid_map::HOST_BASE, "built_at": "2026-01-03T00:00:00Z",
        "size_bytes": 1, "file_count": 1, "build_seconds": 1.0, "mirror": "",
        "sandbox": {
            "cpu_count": 1, "memory_mb": 512,
            "env": {"A": "template", "B": "template"},
            "expose_ports": [8000],
            "service": {"argv": ["python3", "-m", "http.server"], "workdir": "/srv", "user": "www"},
            "probe": {"port": 8000, "path": "/", "timeout_secs": 5}
        }
    });
    std::fs::write(dir.join("template.json"), meta.to_string()).unwrap();
    if checkpointed {
        let cp = dir.join("checkpoint");
        std::fs::create_dir_all(&cp).unwrap();
        std::fs::write(cp.join("checkpoint.json"), "{}").unwrap();
        std::fs::write(cp.join("fake-checkpoint.json"), "{}").unwrap();
    }
}

#[tokio::test]
async fn templates_with_a_service_restore_their_checkpoint_with_their_defaults() {
    let rt = Arc::new(FakeRuntime::default());
    let (tmp, c) = controller(rt.clone(), Store::open_in_memory().unwrap()).await;
    add_service_template(tmp.path(), true);
    let mut req = create("web");
    req.env_vars = BTreeMap::from([("B".to_string(), "request".to_string())]);
    let rec = c.create(1, req.clone()).await.unwrap();
    assert_eq!((rec.cpu_count, rec.memory_mb), (1, 512));
    assert_eq!(rec.env_vars["A"], "template");
    assert_eq!(rec.env_vars["B"], "request");
    {
        let restored = rt.restored.lock().unwrap();
        assert_eq!(restored.len(), 1, "started from the template's checkpoint");
        assert_eq!(restored[0].0, tmp.path().join("templates/web/checkpoint"));
        assert_eq!(restored[0].1.limits.memory_mb, 512);
        assert_eq!(restored[0].1.agent.env_vars["B"], "request");
    }
    // A checkpoint that no longer restores: the service starts fresh instead.
    *rt.fail_next_restore.lock().unwrap() = true;
    let rec = c.create(1, req).await.unwrap();
    assert_eq!(rec.state, SandboxState::Running);
    let spec = rt.created.lock().unwrap().last().cloned().unwrap();
    assert_eq!(spec.id, rec.id);
    let service = spec.agent.service.unwrap();
    assert_eq!(service.argv, ["python3", "-m", "http.server"]);
    assert_eq!(service.cwd.as_deref(), Some("/srv"));
    assert_eq!(service.user.as_deref(), Some("www"));
    // GET /templates reports the template's CPU and memory.
    let web = c.template("web").unwrap();
    assert_eq!((web.cpu_count, web.memory_mb), (Some(1), Some(512)));
    // Templates without a service are unchanged: no service, the daemon's limits.
    let base = c.create(1, create("base")).await.unwrap();
    let spec = rt.created.lock().unwrap().last().cloned().unwrap();
    assert_eq!(spec.id, base.id);
    assert_eq!(spec.agent.service, None);
    assert_eq!(base.cpu_count, ControlConfig::default().limits.cpu_count);
}

#[tokio::test]
async fn preparing_a_template_leaves_nothing_when_its_service_cannot_be_reached() {
    let rt = Arc::new(FakeRuntime::default());
    let (tmp, c) = controller(rt.clone(), Store::open_in_memory().unwrap()).await;
    let store = cubicle_template::TemplateStore::new(cubicle_core::DataDir::new(tmp.path()));
    let base = store.get(&"base".parse().unwrap()).unwrap();
    assert_eq!(c.prepare_template(&base).await.unwrap(), None);
    assert!(rt.created.lock().unwrap().is_empty(), "nothing to start");
    add_service_template(tmp.path(), true);
    let web = store.get(&"web".parse().unwrap()).unwrap();
    // The fake runtime's agent socket does not exist: the service's state cannot be read.
    let err = c.prepare_template(&web).await.unwrap_err();
    assert!(
        err.to_string().contains("asking the sandbox's agent"),
        "{err}"
    );
    assert_eq!(rt.created.lock().unwrap().len(), 1);
    assert!(
        rt.running.lock().unwrap().is_empty(),
        "the sandbox was destroyed"
    );
    assert!(!tmp.path().join("templates/web/checkpoint").exists());
}
