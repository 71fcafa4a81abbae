//! Hibernation: the deep pause. A hibernated sandbox's processes are checkpointed to
//! `<data dir>/hibernated/<id>` and end, so it holds no memory, only disk; resuming
//! restores the checkpoint under the same id, token and env vars.
//!
//! A sandbox hibernates when its pause asks for it (`{"hibernate": true}`), or when it
//! has been paused (frozen) for longer than [`super::ControlConfig::hibernate_after`].
//! Both happen under the sandbox's operation lock. The state stays `paused` either
//! way; a hibernated sandbox is recognised by its checkpoint directory, which also lets
//! a restarted daemon adopt it.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use cubicle_core::{Limits, SandboxId, TemplateName};
use cubicle_runtime::{AgentConfig, SandboxSpec};

use super::{Controller, Live};
use crate::{now_ms, ControlError};

impl Controller {
    /// Where the checkpoint of hibernated sandbox `id` lives.
    pub(super) fn hibernation_dir(&self, id: &SandboxId) -> PathBuf {
        self.templates.data_dir().hibernated().join(id.as_str())
    }

    /// Whether sandbox `id` is hibernated (its checkpoint exists).
    pub(super) fn is_hibernated(&self, id: &SandboxId) -> bool {
        self.hibernation_dir(id).is_dir()
    }

    /// Checkpoints the paused sandbox `id` and ends its processes. The caller holds its
    /// operation lock. A failure leaves it paused in memory, as it was.
    pub(super) async fn hibernate_locked(&self, id: &SandboxId) -> Result<(), ControlError> {
        if self.is_hibernated(id) {
            return Ok(());
        }
        let parent = self.templates.data_dir().hibernated();
        std::fs::create_dir_all(&parent)
            .map_err(|e| ControlError::Unavailable(format!("create {}: {e}", parent.display())))?;
        let dir = self.hibernation_dir(id);
        let started = std::time::Instant::now();
        self.runtime.checkpoint(id, &dir).await?;
        if let Err(e) = self.runtime.destroy(id).await {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        tracing::info!(sandbox = %id, took = ?started.elapsed(), "sandbox hibernated");
        Ok(())
    }

    /// Restores hibernated sandbox `id` under its own id; it runs again. The caller holds
    /// its operation lock. A failure leaves it hibernated.
    pub(super) async fn wake_locked(
        &self,
        id: &SandboxId,
        live: &Live,
    ) -> Result<(), ControlError> {
        let record = self
            .store
            .get_sandbox(id)?
            .ok_or_else(|| ControlError::SandboxNotFound(id.clone()))?;
        let name: TemplateName = record
            .template
            .parse()
            .map_err(|_| ControlError::TemplateNotFound(record.template.clone()))?;
        let template = self.templates.get(&name)?;
        let spec = SandboxSpec {
            id: id.clone(),
            layers: template.layers(&self.templates)?,
            uid_shift: template.meta.uid_shift,
            limits: Limits {
                cpu_count: record.cpu_count,
                memory_mb: record.memory_mb,
                ..self.config.limits
            },
            agent: AgentConfig {
                sandbox_id: id.to_string(),
                env_vars: record.env_vars.clone(),
                default_user: "user".into(),
                access_token: record.envd_access_token.clone(),
                max_upload_bytes: self.config.max_upload_bytes,
                code_interpreter: template.meta.code_interpreter,
                warm_python: None,
            },
        };
        let dir = self.hibernation_dir(id);
        let started = std::time::Instant::now();
        let info = self.runtime.restore(&dir, spec).await?;
        *live.socket.lock().expect("socket") = info.agent_socket;
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(sandbox = %id, error = %e, "removing a woken sandbox's checkpoint");
        }
        tracing::info!(sandbox = %id, took = ?started.elapsed(), "sandbox woken from hibernation");
        Ok(())
    }

    /// Paused sandboxes frozen for longer than `after`.
    fn long_paused(&self, after: Duration) -> Vec<(SandboxId, Arc<Live>)> {
        let before = now_ms() - after.as_millis() as i64;
        self.live
            .read()
            .expect("live index")
            .iter()
            .filter(|(id, l)| {
                l.paused.load(Ordering::Acquire)
                    && l.paused_at_ms.load(Ordering::Relaxed) <= before
                    && !self.is_hibernated(id)
            })
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect()
    }
}

/// Hibernates sandboxes that stay paused longer than `after`, checking every `every`.
pub(super) async fn hibernate_idle(controller: Weak<Controller>, after: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(c) = controller.upgrade() else {
            return;
        };
        for (id, live) in c.long_paused(after) {
            let _op = live.ops.lock().await;
            if !c.still_indexed(&id, &live) || !live.paused.load(Ordering::Acquire) {
                continue;
            }
            if let Err(e) = c.hibernate_locked(&id).await {
                tracing::warn!(sandbox = %id, error = %e.chain(), "hibernating an idle paused sandbox");
            }
        }
    }
}
