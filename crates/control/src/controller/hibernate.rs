//! Hibernation: the deep pause. A hibernated sandbox's processes are checkpointed to
//! `<data dir>/hibernated/<id>` and end, so it holds no memory, only disk; resuming
//! restores the checkpoint under the same id, token and env vars.
//!
//! A sandbox hibernates when its pause asks for it (`{"hibernate": true}`), when it has
//! been paused (frozen) for longer than [`super::ControlConfig::hibernate_after`], or
//! when the host is short of memory ([`super::ControlConfig::hibernate_below_mib`]):
//! then paused sandboxes hibernate, longest paused first, until it no longer is.
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
            // It wakes with the limit it was created with.
            writable_layer_mib: record.writable_layer_mib,
            agent: AgentConfig {
                sandbox_id: id.to_string(),
                env_vars: record.env_vars.clone(),
                default_user: "user".into(),
                access_token: record.envd_access_token.clone(),
                max_upload_bytes: self.config.max_upload_bytes,
                code_interpreter: template.meta.code_interpreter,
                warm_python: None,
                service: None,
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

    /// Paused sandboxes in memory (not hibernated) that should hibernate now, longest
    /// paused first: those paused for longer than `hibernate_after`, or, while the host's
    /// available memory is below `hibernate_below_mib`, all of them.
    fn to_hibernate(&self) -> Vec<(SandboxId, Arc<Live>)> {
        let pressure = self.config.hibernate_below_mib.is_some_and(|min| {
            mem_available_mib(&self.config.meminfo).is_some_and(|available| available < min)
        });
        let before = self
            .config
            .hibernate_after
            .map(|after| now_ms() - after.as_millis() as i64);
        let mut paused: Vec<(SandboxId, Arc<Live>)> = self
            .live
            .read()
            .expect("live index")
            .iter()
            .filter(|(_, l)| l.paused.load(Ordering::Acquire))
            .filter(|(_, l)| {
                pressure || before.is_some_and(|b| l.paused_at_ms.load(Ordering::Relaxed) <= b)
            })
            .map(|(id, l)| (id.clone(), l.clone()))
            .filter(|(id, _)| !self.is_hibernated(id))
            .collect();
        paused.sort_by_key(|(_, l)| l.paused_at_ms.load(Ordering::Relaxed));
        paused
    }

    /// Whether the host's memory is still short (see [`Controller::to_hibernate`]).
    fn under_pressure(&self) -> bool {
        self.config.hibernate_below_mib.is_some_and(|min| {
            mem_available_mib(&self.config.meminfo).is_some_and(|available| available < min)
        })
    }
}

/// `MemAvailable` of a `/proc/meminfo`-format file, in MiB.
fn mem_available_mib(meminfo: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(meminfo).ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Hibernates paused sandboxes that stayed paused too long, or all of them (longest
/// paused first, until memory is no longer short) under memory pressure; checks every
/// `every`.
pub(super) async fn hibernate_idle(controller: Weak<Controller>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(c) = controller.upgrade() else {
            return;
        };
        let candidates = c.to_hibernate();
        let pressure = c.under_pressure();
        for (id, live) in candidates {
            let overdue = c.config.hibernate_after.is_some_and(|after| {
                live.paused_at_ms.load(Ordering::Relaxed) <= now_ms() - after.as_millis() as i64
            });
            // Under pressure, stop once enough memory is back.
            if !overdue && pressure && !c.under_pressure() {
                continue;
            }
            let _op = live.ops.lock().await;
            if !c.still_indexed(&id, &live) || !live.paused.load(Ordering::Acquire) {
                continue;
            }
            if let Err(e) = c.hibernate_locked(&id).await {
                tracing::warn!(sandbox = %id, error = %e.chain(), "hibernating a paused sandbox");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_mib() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meminfo");
        std::fs::write(
            &path,
            "MemTotal:       24684032 kB\nMemFree:        1000 kB\nMemAvailable:    2097152 kB\n",
        )
        .unwrap();
        assert_eq!(mem_available_mib(&path), Some(2048));
        std::fs::write(&path, "MemTotal: 1 kB\n").unwrap();
        assert_eq!(mem_available_mib(&path), None);
        assert_eq!(mem_available_mib(&dir.path().join("missing")), None);
    }
}
