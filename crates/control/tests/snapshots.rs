//! Snapshots, create-from-snapshot, fork and rollback in the controller, against the
//! fake runtime: records, directories, what the runtime is asked, ownership, failures,
//! serialization and restart cleanup.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cubicle_control::testing::{fake_templates, FakeRuntime};
use cubicle_control::{
    ControlConfig, ControlError, Controller, CreateRequest, SnapshotListRequest,
};
use cubicle_core::{DataDir, SandboxState};
use cubicle_store::{SnapshotRecord, SnapshotState, Store};
use cubicle_template::TemplateStore;

struct Env {
    rt: Arc<FakeRuntime>,
    store: Store,
    tmp: tempfile::TempDir,
    c: Arc<Controller>,
}

impl Env {
    async fn new() -> Env {
        let rt = Arc::new(FakeRuntime::default());
        let store = Store::open_in_memory().unwrap();
        store.create_key("main").unwrap();
        store.create_key("other").unwrap();
        let (tmp, templates) = fake_templates();
        let c = start(rt.clone(), store.clone(), templates).await;
        Env { rt, store, tmp, c }
    }

    /// A second controller on the same runtime, store and data dir (a daemon restart).
    async fn restart(&mut self) {
        let templates = TemplateStore::new(DataDir::new(self.tmp.path()));
        self.c = start(self.rt.clone(), self.store.clone(), templates).await;
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.tmp.path().join("snapshots")
    }

    fn dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.snapshots_dir())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

async fn start(rt: Arc<FakeRuntime>, store: Store, templates: TemplateStore) -> Arc<Controller> {
    let config = ControlConfig {
        max_timeout: Duration::from_secs(3600),
        ..ControlConfig::default()
    };
    Controller::start(config, rt, store, templates)
        .await
        .unwrap()
}

fn create(template: &str) -> CreateRequest {
    CreateRequest {
        template: template.into(),
        secure: true,
        ..Default::default()
    }
}

fn all() -> SnapshotListRequest {
    SnapshotListRequest::default()
}

#[tokio::test]
async fn snapshot_list_delete() {
    let e = Env::new().await;
    let mut req = create("base");
    req.env_vars = BTreeMap::from([("A".into(), "1".into())]);
    req.metadata = BTreeMap::from([("m".into(), "x".into())]);
    let sbx = e.c.create(1, req).await.unwrap();
    let named =
        e.c.snapshot(1, &sbx.id, Some("my-snap".into()))
            .await
            .unwrap();
    assert_eq!(named.id, "my-snap:default");
    assert_eq!(named.state, SnapshotState::Ready);
    assert_eq!(named.size_bytes, 1234);
    assert_eq!(named.sandbox_id, sbx.id);
    assert_eq!(named.template, "base");
    assert_eq!(named.env_vars["A"], "1");
    assert_eq!(named.metadata["m"], "x");
    assert_eq!(
        named.layers,
        vec![e.tmp.path().join("templates/base/rootfs")]
    );
    assert_eq!(
        e.c.snapshot_names(&named).unwrap(),
        ["main/my-snap:default"]
    );
    let unnamed = e.c.snapshot(1, &sbx.id, None).await.unwrap();
    assert_eq!(unnamed.id, format!("{}:default", unnamed.key));
    assert!(e.c.snapshot_names(&unnamed).unwrap().is_empty());
    assert_eq!(e.dirs(), {
        let mut v = vec![named.key.clone(), unnamed.key.clone()];
        v.sort();
        v
    });
    // The sandbox runs on.
    assert!(e.c.route(sbx.id.as_str()).is_some());

    // A name already used → conflict; a template's name → conflict; bad names → 400.
    assert!(matches!(
        e.c.snapshot(1, &sbx.id, Some("my-snap".into())).await,
        Err(ControlError::Conflict(_))
    ));
    assert!(matches!(
        e.c.snapshot(1, &sbx.id, Some("base".into())).await,
        Err(ControlError::Conflict(_))
    ));
    for bad in ["", "My", "-x", "a:b", "a/b", &"x".repeat(64)] {
        assert!(
            matches!(
                e.c.snapshot(1, &sbx.id, Some(bad.into())).await,
                Err(ControlError::InvalidInput(_))
            ),
            "{bad:?}"
        );
    }
    // Another owner cannot snapshot it.
    assert!(matches!(
        e.c.snapshot(2, &sbx.id, None).await,
        Err(ControlError::SandboxNotFound(_))
    ));

    // Listing: newest first, filters by sandbox and by name in every spelling.
    let page = e.c.list_snapshots(1, &all()).unwrap();
    let ids: Vec<_> = page.items.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids.len(), 2);
    assert!(e.c.list_snapshots(2, &all()).unwrap().items.is_empty());
    for name in [
        "my-snap",
        "my-snap:default",
        "main/my-snap",
        "main/my-snap:default",
    ] {
        let r = SnapshotListRequest {
            name: Some(name.into()),
            ..all()
        };
        let got = e.c.list_snapshots(1, &r).unwrap().items;
        assert_eq!(got.len(), 1, "{name}");
        assert_eq!(got[0].id, "my-snap:default");
    }
    for name in ["other/my-snap", "my-snap:v2", "nope"] {
        let r = SnapshotListRequest {
            name: Some(name.into()),
            ..all()
        };
        assert!(
            e.c.list_snapshots(1, &r).unwrap().items.is_empty(),
            "{name}"
        );
    }
    let r = SnapshotListRequest {
        sandbox_id: Some(sbx.id.to_string()),
        limit: 1,
        ..all()
    };
    let first = e.c.list_snapshots(1, &r).unwrap();
    assert_eq!(first.items.len(), 1);
    let second =
        e.c.list_snapshots(
            1,
            &SnapshotListRequest {
                cursor: first.next_cursor.clone(),
                ..r.clone()
            },
        )
        .unwrap();
    assert_eq!(second.items.len(), 1);
    assert_ne!(first.items[0].key, second.items[0].key);
    assert!(second.next_cursor.is_none());
    let bad_sandbox = SnapshotListRequest {
        sandbox_id: Some("NOT-AN-ID".into()),
        ..all()
    };
    assert!(e
        .c
        .list_snapshots(1, &bad_sandbox)
        .unwrap()
        .items
        .is_empty());
    assert!(matches!(
        e.c.list_snapshots(1, &SnapshotListRequest { limit: 0, ..all() }),
        Err(ControlError::InvalidInput(_))
    ));

    // Killing the source keeps its snapshots.
    e.c.kill(1, &sbx.id).await.unwrap();
    assert_eq!(e.c.list_snapshots(1, &all()).unwrap().items.len(), 2);

    // Delete: other owners and unknown ids are not found; the directory goes.
    assert!(matches!(
        e.c.delete_snapshot(2, "my-snap:default").await,
        Err(ControlError::SnapshotNotFound(_))
    ));
    e.c.delete_snapshot(1, "main/my-snap:default")
        .await
        .unwrap();
    assert!(matches!(
        e.c.delete_snapshot(1, "my-snap:default").await,
        Err(ControlError::SnapshotNotFound(_))
    ));
    assert_eq!(e.dirs(), vec![unnamed.key.clone()]);
    e.c.delete_snapshot(1, &unnamed.id).await.unwrap();
    assert!(e.dirs().is_empty());
}

#[tokio::test]
async fn create_from_snapshot_restores_with_a_new_id_and_token() {
    let e = Env::new().await;
    let mut req = create("code-interpreter");
    req.env_vars = BTreeMap::from([("A".into(), "1".into()), ("B".into(), "2".into())]);
    let src = e.c.create(1, req).await.unwrap();
    let snap = e.c.snapshot(1, &src.id, Some("ci".into())).await.unwrap();
    assert!(snap.code_interpreter);

    let mut req = create("ci:default");
    req.env_vars = BTreeMap::from([("B".into(), "override".into()), ("C".into(), "3".into())]);
    req.metadata = BTreeMap::from([("new".into(), "yes".into())]);
    req.timeout_secs = Some(60);
    let copy = e.c.create(1, req).await.unwrap();
    assert_ne!(copy.id, src.id);
    assert_eq!(copy.state, SandboxState::Running);
    assert_eq!(copy.template, "code-interpreter");
    assert_eq!(copy.alias.as_deref(), Some("ci:default"));
    assert_ne!(copy.envd_access_token, src.envd_access_token);
    assert_eq!(copy.envd_access_token.as_ref().map(String::len), Some(64));
    assert_eq!(
        copy.metadata,
        BTreeMap::from([("new".into(), "yes".into())])
    );
    assert!(copy.end_at_ms - copy.created_at_ms <= 60_000);
    let restored = e.rt.restored.lock().unwrap().clone();
    assert_eq!(restored.len(), 1);
    let (dir, spec) = &restored[0];
    assert_eq!(dir, &e.snapshots_dir().join(&snap.key));
    assert_eq!(spec.id, copy.id);
    assert_eq!(spec.agent.sandbox_id, copy.id.to_string());
    assert_eq!(spec.agent.access_token, copy.envd_access_token);
    assert!(spec.agent.code_interpreter);
    assert_eq!(spec.layers, snap.layers);
    assert_eq!(spec.agent.env_vars["A"], "1");
    assert_eq!(spec.agent.env_vars["B"], "override");
    assert_eq!(spec.agent.env_vars["C"], "3");
    assert!(e.c.route(copy.id.as_str()).is_some());

    // The bare name and the namespaced id work too; another owner's is a 404.
    e.c.create(1, create("ci")).await.unwrap();
    e.c.create(1, create("main/ci:default")).await.unwrap();
    for other in [
        "ci",
        "ci:default",
        "main/ci:default",
        "other/ci:default",
        "ci:v2",
    ] {
        assert!(
            matches!(
                e.c.create(2, create(other)).await,
                Err(ControlError::TemplateNotFound(_))
            ),
            "{other}"
        );
    }
    // The snapshot outlives its source and can be restored again and again.
    e.c.kill(1, &src.id).await.unwrap();
    e.c.create(1, create("ci:default")).await.unwrap();
    assert_eq!(e.rt.restored.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn fork_makes_independent_sandboxes_and_removes_its_checkpoint() {
    let e = Env::new().await;
    let mut req = create("base");
    req.env_vars = BTreeMap::from([("A".into(), "1".into())]);
    let src = e.c.create(1, req).await.unwrap();
    let results = e.c.fork(1, &src.id, 5, Some(120)).await.unwrap();
    assert_eq!(results.len(), 5);
    let forks: Vec<_> = results.into_iter().map(Result::unwrap).collect();
    let mut ids: Vec<_> = forks.iter().map(|f| f.id.clone()).collect();
    ids.push(src.id.clone());
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "every fork has its own id");
    for f in &forks {
        assert_eq!(f.state, SandboxState::Running);
        assert_eq!(f.env_vars["A"], "1");
        assert_ne!(f.envd_access_token, src.envd_access_token);
        assert!(f.end_at_ms - f.created_at_ms <= 120_000);
        assert!(e.c.route(f.id.as_str()).is_some());
    }
    // The source runs on with its deadline; the temporary checkpoint is gone.
    let after = e.c.get(1, &src.id).unwrap();
    assert_eq!(after.end_at_ms, src.end_at_ms);
    assert_eq!(after.state, SandboxState::Running);
    assert!(e.dirs().is_empty(), "{:?}", e.dirs());
    assert!(e.c.list_snapshots(1, &all()).unwrap().items.is_empty());

    // Bad counts, other owners, failing checkpoints.
    for n in [0, 21] {
        assert!(matches!(
            e.c.fork(1, &src.id, n, None).await,
            Err(ControlError::InvalidInput(_))
        ));
    }
    assert!(matches!(
        e.c.fork(2, &src.id, 1, None).await,
        Err(ControlError::SandboxNotFound(_))
    ));
    *e.rt.fail_next_checkpoint.lock().unwrap() = true;
    assert!(e.c.fork(1, &src.id, 2, None).await.is_err());
    assert!(e.dirs().is_empty());
    // One failing restore fails that fork only.
    *e.rt.fail_next_restore.lock().unwrap() = true;
    let results = e.c.fork(1, &src.id, 3, None).await.unwrap();
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
}

#[tokio::test]
async fn rollback_rules() {
    let e = Env::new().await;
    let a = e.c.create(1, create("base")).await.unwrap();
    let b = e.c.create(1, create("base")).await.unwrap();
    let sa = e.c.snapshot(1, &a.id, Some("a".into())).await.unwrap();
    let sb = e.c.snapshot(1, &b.id, None).await.unwrap();

    // Own snapshot: same id, token and env; a new agent; paused → running.
    e.c.pause(1, &a.id).await.unwrap();
    let rolled =
        e.c.rollback(1, &a.id, "a:default", Some(100))
            .await
            .unwrap();
    assert_eq!(rolled.id, a.id);
    assert_eq!(rolled.envd_access_token, a.envd_access_token);
    assert_eq!(rolled.state, SandboxState::Running);
    assert!(rolled.end_at_ms - cubicle_control::now_ms() <= 100_000);
    assert!(e.c.route(a.id.as_str()).is_some());
    let (dir, spec) = e.rt.restored.lock().unwrap().last().cloned().unwrap();
    assert_eq!(dir, e.snapshots_dir().join(&sa.key));
    assert_eq!(spec.id, a.id);
    assert_eq!(spec.agent.access_token, a.envd_access_token);
    assert!(!e.rt.running.lock().unwrap()[&a.id].paused);

    // Another sandbox's snapshot → conflict; unknown → not found; another owner → not found.
    match e.c.rollback(1, &a.id, &sb.id, None).await {
        Err(ControlError::Conflict(m)) => assert!(m.contains("own snapshots"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        e.c.rollback(1, &a.id, "nope:default", None).await,
        Err(ControlError::SnapshotNotFound(_))
    ));
    assert!(matches!(
        e.c.rollback(2, &a.id, "a:default", None).await,
        Err(ControlError::SandboxNotFound(_))
    ));
    let c2 = e.c.create(2, create("base")).await.unwrap();
    assert!(matches!(
        e.c.rollback(2, &c2.id, "a:default", None).await,
        Err(ControlError::SnapshotNotFound(_))
    ));

    // A failed restore: the sandbox is gone, recorded killed with the reason.
    *e.rt.fail_next_restore.lock().unwrap() = true;
    assert!(e.c.rollback(1, &a.id, "a", None).await.is_err());
    assert!(e.c.route(a.id.as_str()).is_none());
    let rec = e.store.get_sandbox(&a.id).unwrap().unwrap();
    assert_eq!(rec.state, SandboxState::Killed);
    assert!(rec
        .end_reason
        .unwrap()
        .contains("rollback to a:default failed"));
    // Its snapshot is still there.
    assert_eq!(e.c.list_snapshots(1, &all()).unwrap().items.len(), 2);
}

#[tokio::test]
async fn a_failed_checkpoint_leaves_no_record_and_no_directory() {
    let e = Env::new().await;
    let sbx = e.c.create(1, create("base")).await.unwrap();
    *e.rt.fail_next_checkpoint.lock().unwrap() = true;
    assert!(matches!(
        e.c.snapshot(1, &sbx.id, Some("x".into())).await,
        Err(ControlError::Runtime(_))
    ));
    assert!(e.c.list_snapshots(1, &all()).unwrap().items.is_empty());
    assert!(e.store.snapshot_keys().unwrap().is_empty());
    assert!(e.dirs().is_empty());
    assert!(e.c.route(sbx.id.as_str()).is_some(), "the sandbox runs on");
    // The name is free again.
    e.c.snapshot(1, &sbx.id, Some("x".into())).await.unwrap();
}

#[tokio::test]
async fn paused_sandboxes_can_be_snapshotted_and_stay_paused() {
    let e = Env::new().await;
    let sbx = e.c.create(1, create("base")).await.unwrap();
    e.c.pause(1, &sbx.id).await.unwrap();
    e.c.snapshot(1, &sbx.id, None).await.unwrap();
    assert_eq!(e.c.get(1, &sbx.id).unwrap().state, SandboxState::Paused);
    assert!(e.rt.running.lock().unwrap()[&sbx.id].paused);
}

#[tokio::test]
async fn snapshots_of_one_sandbox_are_serialized_and_of_many_parallel() {
    let e = Env::new().await;
    *e.rt.checkpoint_delay.lock().unwrap() = Duration::from_millis(50);
    let one = e.c.create(1, create("base")).await.unwrap();
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let c = e.c.clone();
            let id = one.id.clone();
            tokio::spawn(async move { c.snapshot(1, &id, None).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(e.rt.max_concurrent_checkpoints.load(Ordering::SeqCst), 1);

    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(e.c.create(1, create("base")).await.unwrap().id);
    }
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let c = e.c.clone();
            tokio::spawn(async move { c.snapshot(1, &id, None).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(e.rt.max_concurrent_checkpoints.load(Ordering::SeqCst) > 1);
    assert_eq!(e.c.list_snapshots(1, &all()).unwrap().items.len(), 10);
}

#[tokio::test]
async fn a_kill_during_a_snapshot_waits_and_the_snapshot_survives() {
    let e = Env::new().await;
    *e.rt.checkpoint_delay.lock().unwrap() = Duration::from_millis(100);
    let sbx = e.c.create(1, create("base")).await.unwrap();
    let c = e.c.clone();
    let id = sbx.id.clone();
    let snap = tokio::spawn(async move { c.snapshot(1, &id, None).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    e.c.kill(1, &sbx.id).await.unwrap();
    let snap = snap.await.unwrap().unwrap();
    assert_eq!(snap.state, SnapshotState::Ready);
    assert!(e.c.route(sbx.id.as_str()).is_none());
    e.c.create(1, create(&snap.id)).await.unwrap();
}

#[tokio::test]
async fn restart_keeps_ready_snapshots_and_removes_leftovers() {
    let mut e = Env::new().await;
    let sbx = e.c.create(1, create("base")).await.unwrap();
    let ready = e.c.snapshot(1, &sbx.id, Some("keep".into())).await.unwrap();
    // A snapshot cut by a crash: its record says creating, its directory is half there.
    let cut = SnapshotRecord {
        key: "cutkey".into(),
        id: "cut:default".into(),
        name: Some("cut".into()),
        state: SnapshotState::Creating,
        ..ready.clone()
    };
    e.store.insert_snapshot(&cut).unwrap();
    std::fs::create_dir_all(e.snapshots_dir().join("cutkey")).unwrap();
    // A fork's temporary checkpoint and a directory nobody claims.
    std::fs::create_dir_all(e.snapshots_dir().join("fork-abc")).unwrap();
    std::fs::create_dir_all(e.snapshots_dir().join("stray")).unwrap();

    e.restart().await;
    assert_eq!(e.dirs(), vec![ready.key.clone()]);
    assert_eq!(e.store.snapshot_keys().unwrap(), vec![ready.key.clone()]);
    let listed = e.c.list_snapshots(1, &all()).unwrap().items;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "keep:default");
    // Still usable, and its name still taken.
    e.c.create(1, create("keep")).await.unwrap();
    assert!(matches!(
        e.c.snapshot(1, &sbx.id, Some("keep".into())).await,
        Err(ControlError::Conflict(_))
    ));
    e.c.snapshot(1, &sbx.id, Some("cut".into())).await.unwrap();
}
