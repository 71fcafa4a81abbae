//! The E2B REST API's JSON shapes (as the `e2b` Python SDK 2.63 generated client reads
//! and writes them) and their conversions from the store's records.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use cubicle_control::{MetricSample, TemplateSummary};
use cubicle_store::{BuildRecord, SandboxRecord, SnapshotRecord};
use cubicle_template::LayerProgress;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `clientID` in responses (E2B's cluster node id; any string is accepted).
pub const CLIENT_ID: &str = "cubicle";

/// RFC 3339 with milliseconds, UTC (`2025-01-01T12:00:00.000Z`).
pub fn rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `POST /sandboxes` and `POST /v2/sandboxes` body. Every field the SDK may send is
/// listed; anything else is refused (`deny_unknown_fields`), so typos do not pass
/// silently.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSandbox {
    /// Template name.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds until the sandbox is killed (signed, so a negative value gets a clear error).
    #[serde(default)]
    pub timeout: Option<i64>,
    /// Pause instead of kill on timeout.
    #[serde(default, rename = "autoPause")]
    pub auto_pause: Option<bool>,
    /// Keep memory when auto-pausing.
    #[serde(default, rename = "autoPauseMemory")]
    pub auto_pause_memory: Option<bool>,
    /// Resume paused sandboxes on traffic.
    #[serde(default, rename = "autoResume")]
    pub auto_resume: Option<Value>,
    /// Require an envd access token (v1; v2 sandboxes are always secured).
    #[serde(default)]
    pub secure: Option<bool>,
    /// Outside network access (accepted; loopback only for now).
    #[serde(default)]
    pub allow_internet_access: Option<bool>,
    /// Network rules (accepted, not applied).
    #[serde(default)]
    pub network: Option<Value>,
    /// Labels.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Environment of every process.
    #[serde(default, rename = "envVars")]
    pub env_vars: Option<BTreeMap<String, String>>,
    /// MCP gateway configuration (accepted, not used).
    #[serde(default)]
    pub mcp: Option<Value>,
    /// Workload identity (accepted, not used).
    #[serde(default)]
    pub iam: Option<Value>,
    /// Volumes (accepted, not used).
    #[serde(default, rename = "volumeMounts")]
    pub volume_mounts: Option<Value>,
}

/// `POST /sandboxes/{id}/timeout` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutBody {
    /// Seconds from now.
    pub timeout: i64,
}

/// `POST /sandboxes/{id}/connect` (v1 and v2) and `/resume` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectBody {
    /// Seconds from now (only ever extends).
    #[serde(default)]
    pub timeout: Option<i64>,
    /// `false`: reboot instead of restoring memory (for paused sandboxes).
    #[serde(default)]
    pub memory: Option<bool>,
    /// Old name of `memory` on `/resume`.
    #[serde(default, rename = "autoPause")]
    pub auto_pause: Option<bool>,
}

/// `POST /sandboxes/{id}/pause` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PauseBody {
    /// Keep memory (the default); `false` keeps the filesystem only.
    #[serde(default)]
    pub memory: Option<bool>,
    /// Refuse to pause a sandbox whose agent does not answer.
    #[serde(default)]
    pub require_healthy_guest: Option<bool>,
    /// Cubicle: hibernate at once (memory checkpointed to disk and freed) instead of
    /// freezing in memory.
    #[serde(default)]
    pub hibernate: Option<bool>,
}

/// `POST /sandboxes/{id}/snapshots` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    /// The snapshot's name (its id is then `<name>:default`).
    #[serde(default)]
    pub name: Option<String>,
    /// `false`: filesystem only (not built).
    #[serde(default)]
    pub memory: Option<bool>,
}

/// `POST /sandboxes/{id}/fork` and `/clone` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// How many sandboxes (1–20, default 1).
    #[serde(default)]
    pub count: Option<i64>,
    /// Their timeout in seconds (default 15, E2B's).
    #[serde(default)]
    pub timeout: Option<i64>,
}

/// `POST /sandboxes/{id}/rollback` body (Cubicle's own endpoint).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// The snapshot to go back to (one of this sandbox's).
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// The sandbox's new timeout in seconds from now (default: the daemon's default).
    #[serde(default)]
    pub timeout: Option<i64>,
}

/// The answer of `POST /sandboxes/{id}/snapshots` and an item of `GET /snapshots`
/// (E2B's `SnapshotInfo`, plus Cubicle's own fields, which the SDK ignores).
#[derive(Debug, Serialize)]
pub struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    snapshot_id: String,
    names: Vec<String>,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "createdAt")]
    created_at: String,
    #[serde(rename = "sizeBytes")]
    size_bytes: u64,
    #[serde(rename = "cpuCount")]
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    metadata: BTreeMap<String, String>,
}

impl SnapshotInfo {
    /// From a record and its full names.
    pub fn from_record(r: &SnapshotRecord, names: Vec<String>) -> Self {
        SnapshotInfo {
            snapshot_id: r.id.clone(),
            names,
            sandbox_id: r.sandbox_id.to_string(),
            template_id: r.template.clone(),
            created_at: rfc3339(r.created_at_ms),
            size_bytes: r.size_bytes,
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            metadata: r.metadata.clone(),
        }
    }
}

/// One item of the fork answer: exactly one of `sandbox` and `error`.
#[derive(Debug, Serialize)]
pub struct ForkResult {
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<Sandbox>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<Value>,
}

impl ForkResult {
    /// A fork that started.
    pub fn sandbox(s: Sandbox) -> Self {
        ForkResult {
            sandbox: Some(s),
            error: None,
        }
    }

    /// A fork that failed, as E2B's `{code, message}`.
    pub fn error(code: u16, message: String) -> Self {
        ForkResult {
            sandbox: None,
            error: Some(serde_json::json!({"code": code, "message": message})),
        }
    }
}

/// `POST /sandboxes/{id}/refreshes` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    /// Seconds from now (only ever extends).
    #[serde(default)]
    pub duration: Option<i64>,
}

/// Answer of create and connect.
#[derive(Debug, Serialize)]
pub struct Sandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    alias: Option<String>,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    envd_access_token: Option<String>,
    #[serde(rename = "trafficAccessToken")]
    traffic_access_token: Option<String>,
    domain: Option<String>,
}

impl Sandbox {
    /// From a record; `domain` is where `{port}-{id}.{domain}` names point.
    pub fn from_record(r: &SandboxRecord, domain: Option<&str>) -> Self {
        Sandbox {
            template_id: r.template.clone(),
            sandbox_id: r.id.to_string(),
            client_id: CLIENT_ID,
            alias: r.alias.clone(),
            envd_version: cubicle_envd::ENVD_VERSION,
            envd_access_token: r.envd_access_token.clone(),
            traffic_access_token: None,
            domain: domain.map(str::to_owned),
        }
    }
}

/// `GET /sandboxes/{id}` answer; also one item of the list answers.
#[derive(Debug, Serialize)]
pub struct SandboxDetail {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    alias: Option<String>,
    #[serde(rename = "startedAt")]
    started_at: String,
    #[serde(rename = "endAt")]
    end_at: String,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    #[serde(rename = "cpuCount")]
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    state: &'static str,
    metadata: BTreeMap<String, String>,
    #[serde(rename = "envdAccessToken", skip_serializing_if = "Option::is_none")]
    envd_access_token: Option<String>,
    #[serde(rename = "allowInternetAccess")]
    allow_internet_access: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<String>,
}

impl SandboxDetail {
    /// From a record. The access token is only shown by `GET /sandboxes/{id}`.
    pub fn from_record(r: &SandboxRecord, with_token: bool, domain: Option<&str>) -> Self {
        SandboxDetail {
            template_id: r.template.clone(),
            sandbox_id: r.id.to_string(),
            client_id: CLIENT_ID,
            alias: r.alias.clone(),
            started_at: rfc3339(r.started_at_ms.unwrap_or(r.created_at_ms)),
            end_at: rfc3339(r.end_at_ms),
            envd_version: cubicle_envd::ENVD_VERSION,
            cpu_count: r.cpu_count,
            memory_mb: r.memory_mb,
            disk_size_mb: r.disk_mb,
            state: r.state.as_str(),
            metadata: r.metadata.clone(),
            envd_access_token: if with_token {
                r.envd_access_token.clone()
            } else {
                None
            },
            allow_internet_access: r.allow_internet_access,
            domain: domain.map(str::to_owned),
        }
    }
}

/// One item of `GET /sandboxes/{id}/metrics`.
#[derive(Debug, Serialize)]
pub struct SandboxMetric {
    timestamp: String,
    #[serde(rename = "timestampUnix")]
    timestamp_unix: i64,
    #[serde(rename = "cpuCount")]
    cpu_count: u32,
    #[serde(rename = "cpuUsedPct")]
    cpu_used_pct: f64,
    #[serde(rename = "memUsed")]
    mem_used: u64,
    #[serde(rename = "memTotal")]
    mem_total: u64,
    #[serde(rename = "memCache")]
    mem_cache: u64,
    #[serde(rename = "diskUsed")]
    disk_used: u64,
    #[serde(rename = "diskTotal")]
    disk_total: u64,
}

impl From<&MetricSample> for SandboxMetric {
    fn from(s: &MetricSample) -> Self {
        SandboxMetric {
            timestamp: rfc3339(s.timestamp_ms),
            timestamp_unix: s.timestamp_ms / 1000,
            cpu_count: s.cpu_count,
            cpu_used_pct: s.cpu_used_pct,
            mem_used: s.mem_used,
            mem_total: s.mem_total,
            mem_cache: s.mem_cache,
            disk_used: s.disk_used,
            disk_total: s.disk_total,
        }
    }
}

/// `GET /templates` item and `GET /templates/{id}` answer (E2B's `Template` and
/// `TemplateWithBuilds`, plus Cubicle's `meta`: everything `template.json` says).
#[derive(Debug, Serialize)]
pub struct Template {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    #[serde(rename = "cpuCount")]
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    public: bool,
    aliases: Vec<String>,
    names: Vec<String>,
    #[serde(rename = "createdAt")]
    created_at: String,
    #[serde(rename = "updatedAt")]
    updated_at: String,
    #[serde(rename = "createdBy")]
    created_by: Option<Value>,
    #[serde(rename = "lastSpawnedAt")]
    last_spawned_at: Option<String>,
    #[serde(rename = "spawnCount")]
    spawn_count: u64,
    #[serde(rename = "buildCount")]
    build_count: u32,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    #[serde(rename = "buildStatus")]
    build_status: &'static str,
    /// Only in `GET /templates/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    builds: Option<Vec<TemplateBuild>>,
    /// Only in `GET /templates/{id}`: `template.json` (Cubicle's own field).
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<Value>,
}

impl Template {
    /// From a template summary, its usage, the sandbox defaults and its build jobs
    /// (oldest first). A template built without a job (`cubicle tpl build`) has one
    /// build, derived from its recipe hash.
    pub fn new(
        t: &TemplateSummary,
        spawn_count: u64,
        last_spawned_ms: Option<i64>,
        limits: (u32, u64, u64),
        jobs: &[BuildRecord],
    ) -> Self {
        let built = rfc3339(t.built_at_ms);
        // The id is the name, so the name is an alias as well, then the template's own.
        let aliases: Vec<String> = std::iter::once(&t.name)
            .chain(&t.aliases)
            .cloned()
            .collect();
        let mut builds: Vec<TemplateBuild> = jobs
            .iter()
            .map(|b| TemplateBuild::from_record(b, limits))
            .collect();
        if builds.is_empty() {
            builds.push(TemplateBuild {
                // A UUID-shaped build id derived from the recipe hash.
                build_id: cubicle_core::uuid_shaped(&t.recipe_hash),
                status: "ready",
                phase: "ready",
                created_at: built.clone(),
                updated_at: built.clone(),
                finished_at: Some(built.clone()),
                cpu_count: limits.0,
                memory_mb: limits.1,
                disk_size_mb: limits.2,
                envd_version: cubicle_envd::ENVD_VERSION,
                reason: None,
            });
        }
        let latest = builds.last().expect("one build at least");
        // A template is installed, so it is ready unless a rebuild of it runs.
        let build_status = match latest.status {
            "building" => "building",
            _ => "ready",
        };
        let current = builds
            .iter()
            .rev()
            .find(|b| b.status == "ready")
            .unwrap_or(latest)
            .build_id
            .clone();
        let created_at = builds[0].created_at.clone();
        Template {
            template_id: t.name.clone(),
            build_id: current,
            cpu_count: limits.0,
            memory_mb: limits.1,
            disk_size_mb: limits.2,
            public: false,
            names: aliases.clone(),
            aliases,
            created_at,
            updated_at: built,
            created_by: None,
            last_spawned_at: last_spawned_ms.map(rfc3339),
            spawn_count,
            build_count: u32::try_from(builds.len()).unwrap_or(u32::MAX),
            envd_version: cubicle_envd::ENVD_VERSION,
            build_status,
            builds: Some(builds),
            meta: None,
        }
    }

    /// `GET /templates` items carry no builds and no meta.
    pub fn summary_only(mut self) -> Self {
        self.builds = None;
        self.meta = None;
        self
    }

    /// Adds `template.json`'s contents (`GET /templates/{id}`).
    pub fn with_meta(mut self, meta: Value) -> Self {
        self.meta = Some(meta);
        self
    }
}

/// One build of a template (E2B's `TemplateBuild`, plus Cubicle's `phase` and, for a
/// failed build, `reason`).
#[derive(Debug, Serialize)]
pub struct TemplateBuild {
    #[serde(rename = "buildID")]
    build_id: String,
    status: &'static str,
    phase: &'static str,
    #[serde(rename = "createdAt")]
    created_at: String,
    #[serde(rename = "updatedAt")]
    updated_at: String,
    #[serde(rename = "finishedAt", skip_serializing_if = "Option::is_none")]
    finished_at: Option<String>,
    #[serde(rename = "cpuCount")]
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<BuildReason>,
}

impl TemplateBuild {
    fn from_record(b: &BuildRecord, limits: (u32, u64, u64)) -> Self {
        TemplateBuild {
            build_id: b.id.clone(),
            status: e2b_status(&b.phase),
            phase: phase_name(&b.phase),
            created_at: rfc3339(b.created_at_ms),
            updated_at: rfc3339(b.updated_at_ms),
            finished_at: b.finished_at_ms.map(rfc3339),
            cpu_count: limits.0,
            memory_mb: limits.1,
            disk_size_mb: limits.2,
            envd_version: cubicle_envd::ENVD_VERSION,
            reason: BuildReason::of(b),
        }
    }
}

/// Why a build failed (E2B's `BuildStatusReason`, plus whose fault it is: `user` for a
/// bad image or request, `internal` otherwise).
#[derive(Debug, Serialize)]
pub struct BuildReason {
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<String>,
    fault: &'static str,
}

impl BuildReason {
    fn of(b: &BuildRecord) -> Option<Self> {
        b.error.as_ref().map(|message| BuildReason {
            message: message.clone(),
            step: b.failed_phase.clone(),
            fault: b.fault.map_or("internal", |f| f.as_str()),
        })
    }
}

/// `GET /templates/{id}/builds/{buildID}/status` (E2B's `TemplateBuildInfo`, plus
/// Cubicle's `phase`).
#[derive(Debug, Serialize)]
pub struct TemplateBuildInfo {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    status: &'static str,
    phase: &'static str,
    logs: Vec<String>,
    #[serde(rename = "logEntries")]
    log_entries: Vec<Value>,
    /// The `logsOffset` that asks for the lines after these (Cubicle's own field).
    #[serde(rename = "nextLogsOffset")]
    next_logs_offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<BuildReason>,
    /// While the build runs, the latest progress of each layer of its image:
    /// `{index, count, digest, stage, done, total, cached}` (Cubicle's own field;
    /// absent when there is none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    layers: Vec<LayerProgress>,
}

impl TemplateBuildInfo {
    /// The lines of `b`'s log from number `offset` on (lines no longer kept are
    /// skipped), at most `limit`, and the progress of its layers.
    pub fn new(
        b: &BuildRecord,
        offset: u64,
        limit: Option<usize>,
        layers: Vec<LayerProgress>,
    ) -> Self {
        let first = b.log_count.saturating_sub(b.logs.len() as u64);
        let skip = usize::try_from(offset.saturating_sub(first)).unwrap_or(usize::MAX);
        let lines: Vec<_> = b
            .logs
            .iter()
            .skip(skip)
            .take(limit.unwrap_or(usize::MAX))
            .collect();
        let failed = b.phase == "failed";
        let next_logs_offset = first.max(offset).min(b.log_count) + lines.len() as u64;
        TemplateBuildInfo {
            next_logs_offset,
            template_id: b.template.clone(),
            build_id: b.id.clone(),
            status: e2b_status(&b.phase),
            phase: phase_name(&b.phase),
            logs: lines.iter().map(|l| l.message.clone()).collect(),
            log_entries: lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let last = i + 1 == lines.len();
                    serde_json::json!({
                        "timestamp": rfc3339(l.at_ms),
                        "message": l.message,
                        "level": if failed && last { "error" } else { "info" },
                    })
                })
                .collect(),
            reason: BuildReason::of(b),
            layers,
        }
    }
}

/// E2B's build status of a phase: `building` until it ends, then `ready` or `error`.
fn e2b_status(phase: &str) -> &'static str {
    match phase {
        "ready" => "ready",
        "failed" => "error",
        _ => "building",
    }
}

/// The phase's name as a static string (the store only holds known phases).
fn phase_name(phase: &str) -> &'static str {
    cubicle_store::BUILD_PHASES
        .iter()
        .find(|p| **p == phase)
        .copied()
        .unwrap_or("failed")
}

/// `POST /templates/images` body (Cubicle's own endpoint; what `cubicle tpl
/// create-from-image` sends).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageBuildBody {
    /// A registry reference, or a path on the daemon's host.
    pub image: String,
    /// The new template's name (default: a generated `tpl-…`).
    #[serde(default, rename = "templateID")]
    pub template_id: Option<String>,
    /// Registry user name (never stored).
    #[serde(default)]
    pub registry_username: Option<String>,
    /// Registry password or token (never stored).
    #[serde(default)]
    pub registry_password: Option<String>,
    /// Size limit of each sandbox's writable layer, MiB.
    #[serde(default, rename = "writableLayerSizeMB")]
    pub writable_layer_size_mb: Option<u64>,
    /// Ports of the image's service.
    #[serde(default)]
    pub expose_ports: Vec<u16>,
    /// Readiness probe of the service.
    #[serde(default)]
    pub probe: Option<ProbeBody>,
    /// Replaces the image's entrypoint.
    #[serde(default)]
    pub cmd: Option<String>,
    /// Replace the image's cmd.
    #[serde(default)]
    pub args: Vec<String>,
    /// Added to the image's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Replaces the image's working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Replaces the image's user.
    #[serde(default)]
    pub user: Option<String>,
    /// CPUs of the template's sandboxes.
    #[serde(default)]
    pub cpu_count: Option<u32>,
    /// Memory of the template's sandboxes, MiB.
    #[serde(default, rename = "memoryMB")]
    pub memory_mb: Option<u64>,
}

/// A readiness probe in [`ImageBuildBody`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProbeBody {
    /// Port inside the sandbox.
    pub port: u16,
    /// Path of the GET (default `/`).
    #[serde(default)]
    pub path: Option<String>,
    /// Seconds the build waits for an answer (default 60).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// `POST /templates/{id}/rebuild` body: the registry credentials, which are never
/// stored, again.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RebuildBody {
    /// Registry user name.
    #[serde(default)]
    pub registry_username: Option<String>,
    /// Registry password or token.
    #[serde(default)]
    pub registry_password: Option<String>,
}

/// The 202 answer of a build submission.
#[derive(Debug, Serialize)]
pub struct BuildStarted {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    phase: &'static str,
}

impl BuildStarted {
    /// From the job's record.
    pub fn from_record(b: &BuildRecord) -> Self {
        BuildStarted {
            template_id: b.template.clone(),
            build_id: b.id.clone(),
            phase: phase_name(&b.phase),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_sandbox_accepts_what_the_sdk_sends_and_refuses_unknown_fields() {
        let sdk: NewSandbox = serde_json::from_value(serde_json::json!({
            "templateID": "base", "timeout": 300, "metadata": {"k": "v"}, "envVars": {},
            "autoPause": false, "autoResume": {"enabled": false}, "allow_internet_access": true,
            "network": {"allowOut": []}, "mcp": null, "iam": {}, "volumeMounts": []
        }))
        .unwrap();
        assert_eq!(sdk.template_id, "base");
        assert_eq!(sdk.timeout, Some(300));
        let err = serde_json::from_value::<NewSandbox>(serde_json::json!({
            "templateID": "base", "tiemout": 5
        }))
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `tiemout`"), "{err}");
        assert!(serde_json::from_value::<NewSandbox>(serde_json::json!({"timeout": 5})).is_err());
    }

    #[test]
    fn build_status_shows_layers_only_when_there_are_some() {
        let record = BuildRecord {
            id: "b".into(),
            template: "t".into(),
            owner: 1,
            source: "image".into(),
            request: "{}".into(),
            rebuild: false,
            phase: "unpacking".into(),
            created_at_ms: 0,
            updated_at_ms: 0,
            finished_at_ms: None,
            error: None,
            fault: None,
            failed_phase: None,
            logs: Vec::new(),
            log_count: 0,
        };
        let v = serde_json::to_value(TemplateBuildInfo::new(&record, 0, None, Vec::new())).unwrap();
        assert!(v.get("layers").is_none(), "{v}");
        let layer = LayerProgress {
            index: 1,
            count: 1,
            digest: "sha256:ab".into(),
            stage: cubicle_template::LayerStage::Unpacking,
            done: 3,
            total: 9,
            cached: false,
        };
        let v =
            serde_json::to_value(TemplateBuildInfo::new(&record, 0, None, vec![layer])).unwrap();
        assert_eq!(
            v["layers"],
            serde_json::json!([{"index": 1, "count": 1, "digest": "sha256:ab",
                "stage": "unpacking", "done": 3, "total": 9, "cached": false}])
        );
        assert_eq!(v["phase"], "unpacking");
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(1_735_732_800_123), "2025-01-01T12:00:00.123Z");
    }
}
