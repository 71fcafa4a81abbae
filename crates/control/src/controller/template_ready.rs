//! The last phase of a template build (`snapshotting`): a template whose image runs a
//! service is started once, probed and checkpointed into `templates/<name>/checkpoint/`,
//! so that its sandboxes are restored from that checkpoint with the service already
//! answering.
//!
//! The sandbox used for it goes through the runtime only (no store record, no owner, no
//! live-index entry) and is destroyed whatever happens. Without a probe, the service
//! only has to be still running [`SETTLE`] after it started, or to have ended with
//! status 0 by then: a one-shot command (a base image's `bash`, which ends at once on
//! an empty stdin), which then runs afresh in each sandbox, as in a container, and no
//! checkpoint is written.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cubicle_core::{Limits, SandboxId};
use cubicle_runtime::service::{probe_http, service_status};
use cubicle_runtime::{AgentConfig, Runtime, SandboxSpec, ServiceConfig, ServiceStatus};
use cubicle_template::{Template, TemplateStore};

use super::Controller;
use crate::ControlError;

/// The directory in a template's directory that holds its service's checkpoint.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// How long a service without a probe must keep running before it is checkpointed.
pub const SETTLE: Duration = Duration::from_secs(1);
/// How the agent says a service ended with status 0.
const COMPLETED: &str = "exited with status 0";
/// Lines of the service's log a failure shows.
const LOG_LINES: usize = 20;
/// First and longest pause between two probes.
const PROBE_FIRST_PAUSE: Duration = Duration::from_millis(10);
const PROBE_MAX_PAUSE: Duration = Duration::from_millis(500);
/// Longest single probe request.
const PROBE_ATTEMPT: Duration = Duration::from_secs(5);

/// What preparing a template did.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedTemplate {
    /// Where the checkpoint is; `None` when the service (without a probe) completed
    /// with status 0, so its sandboxes start it afresh.
    pub checkpoint: Option<PathBuf>,
    /// How the service ended during the build, if it did (with status 0).
    pub completed: Option<String>,
    /// Its size, bytes.
    pub size_bytes: u64,
    /// The probe's answer (its status line), if there is a probe.
    pub probe_answer: Option<String>,
    /// Starting the sandbox.
    pub start: Duration,
    /// From the start until the probe answered (or the service settled).
    pub ready: Duration,
    /// Writing the checkpoint.
    pub checkpoint_time: Duration,
}

impl PreparedTemplate {
    /// One line saying what the snapshotting phase did (for the build's log).
    pub fn summary(&self) -> String {
        if let Some(ended) = &self.completed {
            return format!(
                "the service {ended} within a second (a one-shot command, no probe): every \
                 sandbox runs it afresh; no checkpoint"
            );
        }
        let probe = match &self.probe_answer {
            Some(answer) => format!(
                "answered the probe ({answer}) after {:.2} s",
                self.ready.as_secs_f64()
            ),
            None => format!(
                "kept running for {:.1} s (no probe)",
                self.ready.as_secs_f64()
            ),
        };
        format!(
            "snapshotted: the service started in {:.2} s, {probe}; checkpoint of {:.1} MiB in {:.2} s",
            self.start.as_secs_f64(),
            self.size_bytes as f64 / (1024.0 * 1024.0),
            self.checkpoint_time.as_secs_f64()
        )
    }
}

/// The checkpoint sandboxes of `template` are restored from, if it has been prepared.
pub fn template_checkpoint(template: &Template) -> Option<PathBuf> {
    let dir = template.dir.join(CHECKPOINT_DIR);
    dir.join(cubicle_runtime::ns::checkpoint::META_FILE)
        .is_file()
        .then_some(dir)
}

/// The limits of `template`'s sandboxes: its defaults over `base`.
pub fn template_limits(template: &Template, base: Limits) -> Limits {
    let d = &template.meta.sandbox;
    Limits {
        cpu_count: d.cpu_count.unwrap_or(base.cpu_count),
        memory_mb: d.memory_mb.unwrap_or(base.memory_mb),
        ..base
    }
}

/// The agent's form of `template`'s service.
pub fn service_config(template: &Template) -> Option<ServiceConfig> {
    template
        .meta
        .sandbox
        .service
        .as_ref()
        .map(|s| ServiceConfig {
            argv: s.argv.clone(),
            cwd: s.workdir.clone(),
            user: s.user.clone(),
        })
}

impl Controller {
    /// Makes `template` ready for sandboxes: for a template with a service, starts it
    /// once, waits for its probe and checkpoints it (see [`prepare_template`]). A
    /// template without a service needs nothing (`Ok(None)`).
    pub async fn prepare_template(
        &self,
        template: &Template,
    ) -> Result<Option<PreparedTemplate>, ControlError> {
        prepare_template(
            self.runtime.as_ref(),
            &self.templates,
            template,
            self.config.limits,
            self.config.max_upload_bytes,
        )
        .await
    }
}

/// Starts a sandbox of `template` through `runtime` (recorded nowhere), waits until its
/// service answers the probe (or, without one, still runs after [`SETTLE`]),
/// checkpoints it into `templates/<name>/checkpoint/` and destroys it. On failure the
/// error names the port and timeout, whether and how the service ended and the last
/// lines of its log; no sandbox and no checkpoint is left.
pub async fn prepare_template(
    runtime: &dyn Runtime,
    templates: &TemplateStore,
    template: &Template,
    limits: Limits,
    max_upload_bytes: u64,
) -> Result<Option<PreparedTemplate>, ControlError> {
    let Some(service) = service_config(template) else {
        return Ok(None);
    };
    let dir = template.dir.join(CHECKPOINT_DIR);
    remove_dir(&dir)?;
    let id = SandboxId::generate();
    let mut agent = AgentConfig::new(id.to_string());
    agent.env_vars = template.meta.sandbox.env.clone();
    agent.max_upload_bytes = max_upload_bytes;
    agent.service = Some(service);
    let spec = SandboxSpec {
        id: id.clone(),
        layers: template.layers(templates)?,
        uid_shift: template.meta.uid_shift,
        limits: template_limits(template, limits),
        // The service runs on a limited layer as its sandboxes will.
        writable_layer_mib: template.meta.sandbox.writable_layer_mib,
        agent,
    };
    tracing::info!(template = %template.name, sandbox = %id, "starting the template's service");
    let t0 = Instant::now();
    let info = runtime.create(spec).await?;
    let start = t0.elapsed();
    let outcome = ready_and_checkpoint(runtime, template, &id, &info.agent_socket, &dir).await;
    let destroyed = runtime.destroy(&id).await;
    let result = match (outcome, destroyed) {
        (Ok(mut prepared), Ok(())) => {
            prepared.start = start;
            Ok(Some(prepared))
        }
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(e.into()),
    };
    if result.is_err() {
        let _ = remove_dir(&dir);
    }
    if let Ok(Some(PreparedTemplate {
        completed: Some(ended),
        ..
    })) = &result
    {
        tracing::info!(template = %template.name, %ended, "template's command completed; its sandboxes run it afresh");
    } else if let Ok(Some(p)) = &result {
        tracing::info!(
            template = %template.name, bytes = p.size_bytes,
            start_ms = p.start.as_millis() as u64, ready_ms = p.ready.as_millis() as u64,
            checkpoint_ms = p.checkpoint_time.as_millis() as u64,
            "template service checkpointed"
        );
    }
    result
}

async fn ready_and_checkpoint(
    runtime: &dyn Runtime,
    template: &Template,
    id: &SandboxId,
    socket: &Path,
    dir: &Path,
) -> Result<PreparedTemplate, ControlError> {
    let t0 = Instant::now();
    let probe_answer = match &template.meta.sandbox.probe {
        Some(probe) => Some(wait_for_probe(socket, probe).await?),
        None => {
            if let Some(ended) = wait_settled(socket).await? {
                return Ok(PreparedTemplate {
                    checkpoint: None,
                    completed: Some(ended),
                    size_bytes: 0,
                    probe_answer: None,
                    start: Duration::ZERO,
                    ready: t0.elapsed(),
                    checkpoint_time: Duration::ZERO,
                });
            }
            None
        }
    };
    let ready = t0.elapsed();
    let t1 = Instant::now();
    let info = runtime.checkpoint(id, dir).await?;
    Ok(PreparedTemplate {
        checkpoint: Some(dir.to_owned()),
        completed: None,
        size_bytes: info.size_bytes,
        probe_answer,
        start: Duration::ZERO,
        ready,
        checkpoint_time: t1.elapsed(),
    })
}

/// Probes until an HTTP answer comes, the service ends, or the probe's timeout passes.
async fn wait_for_probe(
    socket: &Path,
    probe: &cubicle_template::Probe,
) -> Result<String, ControlError> {
    let timeout = Duration::from_secs(probe.timeout_secs);
    let deadline = Instant::now() + timeout;
    let mut pause = PROBE_FIRST_PAUSE;
    let mut last_error = String::from("no probe was made");
    loop {
        let status = status_of(socket).await?;
        if !status.running {
            return Err(failure(
                &format!(
                    "the service ended before answering the probe on port {} (GET {})",
                    probe.port, probe.path
                ),
                &status,
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(failure(
                &format!(
                    "the service did not answer the probe GET {} on port {} within {} s \
                     (last attempt: {last_error}); it is still running",
                    probe.path, probe.port, probe.timeout_secs
                ),
                &status,
            ));
        }
        match probe_http(socket, probe.port, &probe.path, left.min(PROBE_ATTEMPT)).await {
            Ok(answer) => return Ok(answer),
            Err(e) => last_error = e,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 3 / 2).min(PROBE_MAX_PAUSE);
    }
}

/// Waits [`SETTLE`] and checks the service still runs (checked every 50 ms, so a
/// service that fails at once fails the build at once). `Some(how it ended)` for a
/// service that completed with status 0.
async fn wait_settled(socket: &Path) -> Result<Option<String>, ControlError> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let status = status_of(socket).await?;
        if !status.running {
            return match &status.ended {
                Some(ended) if ended == COMPLETED => Ok(Some(ended.clone())),
                _ => Err(failure(
                    "the service did not keep running (the template has no probe)",
                    &status,
                )),
            };
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn status_of(socket: &Path) -> Result<ServiceStatus, ControlError> {
    service_status(socket).await.map_err(|e| {
        ControlError::Unavailable(format!("asking the sandbox's agent about the service: {e}"))
    })
}

/// The build error for a service that did not become ready.
fn failure(what: &str, status: &ServiceStatus) -> ControlError {
    let mut message = what.to_owned();
    if let Some(ended) = &status.ended {
        message.push_str(&format!("; the service {ended}"));
    }
    let lines: Vec<&str> = status.log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_LINES)..];
    if tail.is_empty() {
        message.push_str("; it printed nothing");
    } else {
        message.push_str(&format!(
            "; the last {} lines of its output:\n{}",
            tail.len(),
            tail.join("\n")
        ));
    }
    ControlError::ServiceNotReady(message)
}

fn remove_dir(dir: &Path) -> Result<(), ControlError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ControlError::Unavailable(format!(
            "remove {}: {e}",
            dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_show_how_the_service_ended_and_its_last_lines() {
        let log: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let status = ServiceStatus {
            pid: Some(7),
            running: false,
            ended: Some("exited with status 3".into()),
            log,
        };
        let msg = failure("the service ended", &status).to_string();
        assert!(msg.starts_with(
            "the service ended; the service exited with status 3; the last 20 lines of its output:\nline 11\n"
        ), "{msg}");
        assert!(msg.ends_with("line 30"), "{msg}");
        let quiet = ServiceStatus {
            pid: Some(7),
            running: true,
            ended: None,
            log: String::new(),
        };
        assert_eq!(
            failure("no answer", &quiet).to_string(),
            "no answer; it printed nothing"
        );
    }
}
