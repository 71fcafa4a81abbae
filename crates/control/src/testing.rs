//! Test doubles for code built on the controller (enabled by the `testing` feature): a
//! runtime that records what it is asked and never starts a process, and a data dir with
//! fake built `base` and `code-interpreter` templates.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cubicle_core::{uid_map, DataDir, SandboxId};
use cubicle_runtime::{
    CheckpointInfo, Runtime, RuntimeError, SandboxInfo, SandboxSpec, SandboxStats,
};
use cubicle_template::TemplateStore;

/// A runtime that keeps sandboxes as records only.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    /// Sandboxes it "runs".
    pub running: Mutex<HashMap<SandboxId, SandboxInfo>>,
    /// Sandboxes it holds state for.
    pub residues: Mutex<HashSet<SandboxId>>,
    /// Makes the next create fail (in init, like a broken template).
    pub fail_next_create: Mutex<bool>,
    /// Every spec it was given.
    pub created: Mutex<Vec<SandboxSpec>>,
    /// Makes the next checkpoint fail.
    pub fail_next_checkpoint: Mutex<bool>,
    /// Every restore: the checkpoint directory and the new sandbox's spec.
    pub restored: Mutex<Vec<(PathBuf, SandboxSpec)>>,
    /// Makes the next restore fail.
    pub fail_next_restore: Mutex<bool>,
    /// How long each checkpoint takes.
    pub checkpoint_delay: Mutex<Duration>,
    /// Checkpoints running now, and the most that ever ran at once.
    pub checkpoints_running: AtomicUsize,
    /// The most checkpoints that ever ran at once.
    pub max_concurrent_checkpoints: AtomicUsize,
}

/// What [`FakeRuntime::checkpoint`] writes: the sandbox it came from.
const FAKE_CHECKPOINT: &str = "fake-checkpoint.json";

impl FakeRuntime {
    fn set_paused(&self, id: &SandboxId, paused: bool) -> Result<(), RuntimeError> {
        match self.running.lock().expect("lock").get_mut(id) {
            Some(info) => {
                info.paused = paused;
                Ok(())
            }
            None => Err(RuntimeError::NotFound(id.clone())),
        }
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }
    async fn create(&self, spec: SandboxSpec) -> Result<SandboxInfo, RuntimeError> {
        if std::mem::take(&mut *self.fail_next_create.lock().expect("lock")) {
            return Err(RuntimeError::Init {
                step: "mount /proc".into(),
                message: "boom".into(),
            });
        }
        let info = SandboxInfo {
            id: spec.id.clone(),
            pid: 4242,
            layers: spec.layers.clone(),
            agent_socket: PathBuf::from(format!("/nonexistent/{}.sock", spec.id)),
            paused: false,
        };
        self.running
            .lock()
            .expect("lock")
            .insert(spec.id.clone(), info.clone());
        self.residues.lock().expect("lock").insert(spec.id.clone());
        self.created.lock().expect("lock").push(spec);
        Ok(info)
    }
    async fn destroy(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        self.running.lock().expect("lock").remove(id);
        self.residues.lock().expect("lock").remove(id);
        Ok(())
    }
    async fn list(&self) -> Result<Vec<SandboxInfo>, RuntimeError> {
        Ok(self
            .running
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect())
    }
    async fn residues(&self) -> Result<Vec<SandboxId>, RuntimeError> {
        Ok(self
            .residues
            .lock()
            .expect("lock")
            .iter()
            .cloned()
            .collect())
    }
    async fn pause(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        self.set_paused(id, true)
    }
    async fn resume(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        self.set_paused(id, false)
    }
    async fn checkpoint(
        &self,
        id: &SandboxId,
        dir: &std::path::Path,
    ) -> Result<CheckpointInfo, RuntimeError> {
        let layers = match self.running.lock().expect("lock").get(id) {
            Some(info) => info.layers.clone(),
            None => return Err(RuntimeError::NotFound(id.clone())),
        };
        let now = self.checkpoints_running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent_checkpoints
            .fetch_max(now, Ordering::SeqCst);
        let delay = *self.checkpoint_delay.lock().expect("lock");
        tokio::time::sleep(delay).await;
        self.checkpoints_running.fetch_sub(1, Ordering::SeqCst);
        if std::mem::take(&mut *self.fail_next_checkpoint.lock().expect("lock")) {
            return Err(RuntimeError::Checkpoint {
                op: "checkpoint",
                message: "boom".into(),
            });
        }
        let io = |source| RuntimeError::Io {
            op: "write",
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir(dir).map_err(io)?;
        std::fs::write(dir.join(FAKE_CHECKPOINT), id.as_str()).map_err(io)?;
        Ok(CheckpointInfo {
            size_bytes: 1234,
            frozen_us: 10,
            layers,
        })
    }
    async fn restore(
        &self,
        dir: &std::path::Path,
        spec: SandboxSpec,
    ) -> Result<SandboxInfo, RuntimeError> {
        if std::mem::take(&mut *self.fail_next_restore.lock().expect("lock")) {
            return Err(RuntimeError::Checkpoint {
                op: "restore",
                message: "boom".into(),
            });
        }
        if !dir.join(FAKE_CHECKPOINT).is_file() {
            return Err(RuntimeError::Checkpoint {
                op: "restore",
                message: format!("no checkpoint in {}", dir.display()),
            });
        }
        self.restored
            .lock()
            .expect("lock")
            .push((dir.to_owned(), spec.clone()));
        self.create(spec).await
    }
    async fn stats(&self, _id: &SandboxId) -> Result<SandboxStats, RuntimeError> {
        Ok(SandboxStats {
            cpu_usage_ns: 1_000_000,
            memory_bytes: 10 << 20,
            memory_limit_bytes: 2 << 30,
            memory_cache_bytes: 1 << 20,
            disk_used_bytes: 4096,
            pids: 1,
        })
    }
}

/// A temporary data dir with fake built templates (only what the store checks): `base`,
/// and `code-interpreter` (alias `code-interpreter-v1`, with the code interpreter), a
/// layer on `base`.
pub fn fake_templates() -> (tempfile::TempDir, TemplateStore) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let put = |name: &str, meta: String| {
        let dir = tmp.path().join("templates").join(name);
        std::fs::create_dir_all(dir.join("rootfs")).expect("mkdir");
        std::fs::write(dir.join("template.json"), meta).expect("write");
    };
    put(
        "base",
        format!(
            r#"{{"format_version":1,"recipe":"base","recipe_hash":"00","uid_shift":{},"built_at":"2026-01-01T00:00:00Z","size_bytes":1,"file_count":1,"build_seconds":1.0,"mirror":"m"}}"#,
            uid_map::HOST_BASE
        ),
    );
    put(
        "code-interpreter",
        format!(
            r#"{{"format_version":2,"recipe":"code-interpreter","recipe_hash":"01","uid_shift":{},"built_at":"2026-01-02T00:00:00Z","size_bytes":1,"file_count":1,"build_seconds":1.0,"mirror":"m","parent":"base","parent_built_at":"2026-01-01T00:00:00Z","aliases":["code-interpreter-v1"],"code_interpreter":true}}"#,
            uid_map::HOST_BASE
        ),
    );
    let store = TemplateStore::new(DataDir::new(tmp.path()));
    (tmp, store)
}
