//! The JSON the daemon sends and accepts, in E2B's shapes (`crates/api/src/models.rs` is
//! the server side). Response types keep fields they do not know in `extra`, so printing
//! one back as JSON loses nothing the daemon said.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /v2/sandboxes` body. Build it with [`CreateSandbox::new`] and set what you need.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CreateSandbox {
    /// Template name.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Seconds until the daemon kills the sandbox (server default: 300).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Labels, filterable in [`ListParams::metadata`].
    pub metadata: BTreeMap<String, String>,
    /// Environment of every process in the sandbox.
    #[serde(rename = "envVars")]
    pub env_vars: BTreeMap<String, String>,
    /// Outside network access (accepted by the daemon; loopback only for now).
    #[serde(
        rename = "allow_internet_access",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_internet_access: Option<bool>,
    /// Sent as the `Idempotency-Key` header: a retry with the same key gets the same
    /// sandbox instead of a second one.
    #[serde(skip)]
    pub idempotency_key: Option<String>,
}

impl CreateSandbox {
    /// A create request for `template` with the server's defaults for everything else.
    pub fn new(template: impl Into<String>) -> Self {
        CreateSandbox {
            template_id: template.into(),
            ..CreateSandbox::default()
        }
    }
}

/// A sandbox as create and connect return it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Sandbox {
    /// Template it was created from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Its id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The node that runs it (any string).
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// Template alias.
    #[serde(default)]
    pub alias: Option<String>,
    /// Version of the envd protocol its agent speaks.
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// Token envd requires as `X-Access-Token` (absent for unsecured sandboxes).
    #[serde(
        rename = "envdAccessToken",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub envd_access_token: Option<String>,
    /// Token for port traffic (always null on Cubicle).
    #[serde(rename = "trafficAccessToken", default)]
    pub traffic_access_token: Option<String>,
    /// Domain of sandbox host names `{port}-{id}.{domain}`.
    #[serde(default)]
    pub domain: Option<String>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A sandbox as `GET /sandboxes/{id}` and the list return it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct SandboxDetail {
    /// Template it was created from.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Its id.
    #[serde(rename = "sandboxID")]
    pub sandbox_id: String,
    /// The node that runs it (any string).
    #[serde(rename = "clientID")]
    pub client_id: String,
    /// Template alias.
    #[serde(default)]
    pub alias: Option<String>,
    /// When it started.
    #[serde(rename = "startedAt")]
    pub started_at: DateTime<Utc>,
    /// When the daemon will kill it unless its timeout is changed.
    #[serde(rename = "endAt")]
    pub end_at: DateTime<Utc>,
    /// Version of the envd protocol its agent speaks.
    #[serde(rename = "envdVersion")]
    pub envd_version: String,
    /// CPU limit.
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    /// Memory limit, MiB.
    #[serde(rename = "memoryMB")]
    pub memory_mb: u64,
    /// Disk size, MiB.
    #[serde(rename = "diskSizeMB")]
    pub disk_size_mb: u64,
    /// `running` or `paused` (E2B's two states; kept as text so a newer daemon's states
    /// still decode).
    pub state: String,
    /// Labels.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Token envd requires as `X-Access-Token` (only in `GET /sandboxes/{id}`).
    #[serde(
        rename = "envdAccessToken",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub envd_access_token: Option<String>,
    /// Fields this client does not know (`allowInternetAccess`, `domain`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A sandbox state to filter the list by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxState {
    /// Running.
    Running,
    /// Paused.
    Paused,
}

impl SandboxState {
    /// The state's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
        }
    }
}

impl std::str::FromStr for SandboxState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "running" => Ok(SandboxState::Running),
            "paused" => Ok(SandboxState::Paused),
            other => Err(format!(
                "unknown sandbox state {other:?} (expected running or paused)"
            )),
        }
    }
}

/// Sort order of the list, by start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first (the server's default).
    Desc,
}

/// Filters and paging of `GET /v2/sandboxes`. The default lists running and paused
/// sandboxes, newest first, 100 per page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListParams {
    /// Only sandboxes carrying all of these labels.
    pub metadata: Vec<(String, String)>,
    /// Only these states (empty: running and paused).
    pub states: Vec<SandboxState>,
    /// Page size (server default 100, at most 1000).
    pub limit: Option<u32>,
    /// The cursor from the previous page's [`Page::next_token`].
    pub next_token: Option<String>,
    /// Sort order.
    pub order: Option<Order>,
    /// Only sandboxes of this template.
    pub template: Option<String>,
    /// Only sandboxes started after this instant.
    pub started_after: Option<DateTime<Utc>>,
}

impl ListParams {
    /// The query string, encoded as the E2B SDK does (`metadata` is itself a query
    /// string, encoded twice).
    pub fn query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if !self.metadata.is_empty() {
            let inner = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(&self.metadata)
                .finish();
            q.append_pair("metadata", &inner);
        }
        if !self.states.is_empty() {
            let states: Vec<&str> = self.states.iter().map(|s| s.as_str()).collect();
            q.append_pair("state", &states.join(","));
        }
        if let Some(limit) = self.limit {
            q.append_pair("limit", &limit.to_string());
        }
        if let Some(token) = &self.next_token {
            q.append_pair("nextToken", token);
        }
        if let Some(order) = self.order {
            q.append_pair(
                "order",
                match order {
                    Order::Asc => "asc",
                    Order::Desc => "desc",
                },
            );
        }
        if let Some(template) = &self.template {
            q.append_pair("template", template);
        }
        if let Some(after) = self.started_after {
            q.append_pair(
                "startedAfter",
                &after.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
        }
        q.finish()
    }
}

/// A snapshot as `POST /sandboxes/{id}/snapshots` and `GET /snapshots` return it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Snapshot {
    /// Its id (`<name>:default`), what a create's template names to start from it.
    #[serde(rename = "snapshotID")]
    pub snapshot_id: String,
    /// Full names (`<namespace>/<name>:default`); empty without a name.
    #[serde(default)]
    pub names: Vec<String>,
    /// The sandbox it was taken of (Cubicle).
    #[serde(rename = "sandboxID", default)]
    pub sandbox_id: Option<String>,
    /// The source's template (Cubicle).
    #[serde(rename = "templateID", default)]
    pub template_id: Option<String>,
    /// When it was taken (Cubicle).
    #[serde(rename = "createdAt", default)]
    pub created_at: Option<DateTime<Utc>>,
    /// Bytes on disk (Cubicle).
    #[serde(rename = "sizeBytes", default)]
    pub size_bytes: Option<u64>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of a fork answer: the new sandbox, or why it did not start.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ForkResult {
    /// The fork, if it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Sandbox>,
    /// `{code, message}` if it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Cursor of the next page (`x-next-token`); `None` on the last page.
    pub next_token: Option<String>,
}

/// One sample of `GET /sandboxes/{id}/metrics`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct SandboxMetric {
    /// When it was taken.
    pub timestamp: DateTime<Utc>,
    /// The same, unix seconds.
    #[serde(rename = "timestampUnix")]
    pub timestamp_unix: i64,
    /// CPU limit.
    #[serde(rename = "cpuCount")]
    pub cpu_count: u32,
    /// CPU use in percent of the limit.
    #[serde(rename = "cpuUsedPct")]
    pub cpu_used_pct: f64,
    /// Memory in use, bytes.
    #[serde(rename = "memUsed")]
    pub mem_used: u64,
    /// Memory limit, bytes.
    #[serde(rename = "memTotal")]
    pub mem_total: u64,
    /// Page cache, bytes.
    #[serde(rename = "memCache")]
    pub mem_cache: u64,
    /// Disk in use, bytes.
    #[serde(rename = "diskUsed")]
    pub disk_used: u64,
    /// Disk size, bytes.
    #[serde(rename = "diskTotal")]
    pub disk_total: u64,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A template as `GET /templates` lists it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Template {
    /// Its name (E2B's template id).
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// Id of its current build.
    #[serde(rename = "buildID", default)]
    pub build_id: String,
    /// CPU limit of its sandboxes.
    #[serde(rename = "cpuCount", default)]
    pub cpu_count: u32,
    /// Memory limit of its sandboxes, MiB.
    #[serde(rename = "memoryMB", default)]
    pub memory_mb: u64,
    /// Disk size of its sandboxes, MiB.
    #[serde(rename = "diskSizeMB", default)]
    pub disk_size_mb: u64,
    /// Other names.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// When it was built.
    #[serde(rename = "createdAt", default)]
    pub created_at: Option<DateTime<Utc>>,
    /// When the last sandbox was created from it.
    #[serde(rename = "lastSpawnedAt", default)]
    pub last_spawned_at: Option<DateTime<Utc>>,
    /// Sandboxes created from it (by this API key).
    #[serde(rename = "spawnCount", default)]
    pub spawn_count: u64,
    /// `ready` once built (`building` while a rebuild runs).
    #[serde(rename = "buildStatus", default)]
    pub build_status: String,
    /// Its builds, oldest first (`GET /templates/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builds: Option<Vec<Value>>,
    /// Its `template.json` (`GET /templates/{id}` only; Cubicle's own field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Value>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `POST /templates/images` body: a template from a container image (what `cubicle tpl
/// create-from-image` sends). Build it with [`ImageBuild::new`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageBuild {
    /// A registry reference, or a path on the daemon's host.
    pub image: String,
    /// The new template's name (default: a generated `tpl-…`).
    #[serde(rename = "templateID", skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    /// Registry user name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_username: Option<String>,
    /// Registry password or token (sent, never stored by the daemon).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_password: Option<String>,
    /// Size limit of each sandbox's writable layer, MiB.
    #[serde(
        rename = "writableLayerSizeMB",
        skip_serializing_if = "Option::is_none"
    )]
    pub writable_layer_size_mb: Option<u64>,
    /// Ports of the image's service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expose_ports: Vec<u16>,
    /// The readiness probe of the service.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ImageProbe>,
    /// Replaces the image's entrypoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// Replace the image's cmd.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Added to the image's environment.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Replaces the image's working directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Replaces the image's user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// CPUs of the template's sandboxes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    /// Memory of the template's sandboxes, MiB.
    #[serde(rename = "memoryMB", skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
}

impl ImageBuild {
    /// A build of `image` with the image's own settings.
    pub fn new(image: impl Into<String>) -> Self {
        ImageBuild {
            image: image.into(),
            ..ImageBuild::default()
        }
    }
}

/// The readiness probe of an [`ImageBuild`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageProbe {
    /// Port inside the sandbox.
    pub port: u16,
    /// Path of the HTTP GET.
    pub path: String,
    /// Seconds the build waits for an answer.
    pub timeout_secs: u64,
}

/// The answer of a build submission (202).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BuildStarted {
    /// The template being built.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The build's id, for [`crate::ApiClient::build_status`].
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// Its phase (`queued`).
    pub phase: String,
}

/// `GET /templates/{id}/builds/{buildID}/status` (E2B's `TemplateBuildInfo` with
/// Cubicle's `phase`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct BuildStatus {
    /// The template.
    #[serde(rename = "templateID")]
    pub template_id: String,
    /// The build.
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// E2B's status: `building`, `ready` or `error`.
    pub status: String,
    /// Cubicle's phase: `queued`, `pulling`, `unpacking`, `building`, `snapshotting`,
    /// `ready` or `failed`.
    #[serde(default)]
    pub phase: String,
    /// Log lines from the offset asked for.
    #[serde(default)]
    pub logs: Vec<String>,
    /// The offset of the line after these (Cubicle's own field).
    #[serde(rename = "nextLogsOffset", default)]
    pub next_logs_offset: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<BuildReason>,
    /// While it runs, the latest progress of each layer of its image (Cubicle's own
    /// field; empty when there is none or the build has ended).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<BuildLayer>,
}

/// The progress of one layer of a build's image: what is being done with it and how
/// many bytes of its blob are done.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BuildLayer {
    /// The layer's number, from 1.
    pub index: usize,
    /// How many layers the image has.
    pub count: usize,
    /// Its digest, `sha256:<hex>`.
    pub digest: String,
    /// `downloading`, `verifying` or `unpacking`.
    pub stage: String,
    /// Bytes of its blob downloaded or read so far.
    pub done: u64,
    /// The size of its blob.
    pub total: u64,
    /// Whether it was in the layer cache (nothing downloaded).
    #[serde(default)]
    pub cached: bool,
}

impl BuildLayer {
    /// Whether its stage is complete.
    pub fn is_complete(&self) -> bool {
        self.done >= self.total
    }
}

impl BuildStatus {
    /// Whether the build has ended (ready or failed).
    pub fn is_finished(&self) -> bool {
        self.status == "ready" || self.status == "error"
    }
}

/// Why a build failed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct BuildReason {
    /// The error.
    pub message: String,
    /// The phase it failed in.
    #[serde(default)]
    pub step: Option<String>,
    /// `user` (a bad image or request) or `internal`.
    #[serde(default)]
    pub fault: Option<String>,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// The daemon's version.
    #[serde(default)]
    pub version: String,
}

/// E2B's error body, `{"code": <status>, "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct ErrorBody {
    pub code: Option<i64>,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_has_what_the_sdk_sends() {
        let mut c = CreateSandbox::new("base");
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"templateID": "base", "metadata": {}, "envVars": {}})
        );
        c.timeout = Some(30);
        c.metadata.insert("k".into(), "v".into());
        c.env_vars.insert("A".into(), "1".into());
        c.idempotency_key = Some("abc".into());
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"templateID": "base", "timeout": 30, "metadata": {"k": "v"},
                               "envVars": {"A": "1"}})
        );
    }

    #[test]
    fn list_query_is_encoded_like_the_sdk() {
        let p = ListParams {
            metadata: vec![("acc".into(), "x".into()), ("role".into(), "b c".into())],
            states: vec![SandboxState::Running, SandboxState::Paused],
            limit: Some(5),
            next_token: Some("abc".into()),
            order: Some(Order::Asc),
            template: Some("base".into()),
            started_after: DateTime::from_timestamp(1_735_689_600, 0),
        };
        assert_eq!(
            p.query(),
            "metadata=acc%3Dx%26role%3Db%2Bc&state=running%2Cpaused&limit=5&nextToken=abc\
             &order=asc&template=base&startedAfter=2025-01-01T00%3A00%3A00.000Z"
        );
        assert_eq!(ListParams::default().query(), "");
        // The server decodes twice and gets the pairs back.
        let outer: Vec<(String, String)> = form_urlencoded::parse(p.query().as_bytes())
            .into_owned()
            .collect();
        let inner: Vec<(String, String)> = form_urlencoded::parse(outer[0].1.as_bytes())
            .into_owned()
            .collect();
        assert_eq!(inner, p.metadata);
    }

    #[test]
    fn states_parse() {
        assert_eq!("running".parse::<SandboxState>(), Ok(SandboxState::Running));
        assert!("killed".parse::<SandboxState>().is_err());
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let json = serde_json::json!({
            "templateID": "base", "sandboxID": "abc", "clientID": "cubicle", "alias": "base",
            "startedAt": "2025-01-01T12:00:00.000Z", "endAt": "2025-01-01T12:05:00Z",
            "envdVersion": "0.6.4", "cpuCount": 2, "memoryMB": 2048, "diskSizeMB": 10240,
            "state": "running", "metadata": {"k": "v"}, "allowInternetAccess": true,
            "lifecycle": {"onTimeout": "kill", "autoResume": false}
        });
        let d: SandboxDetail = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(d.end_at.timestamp(), 1_735_733_100);
        assert_eq!(d.extra["allowInternetAccess"], true);
        assert_eq!(serde_json::to_value(&d).unwrap(), {
            let mut j = json;
            j["startedAt"] = "2025-01-01T12:00:00Z".into();
            j
        });
    }
}
