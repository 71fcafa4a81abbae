//! [`Controller`]: every sandbox operation, the live index and the background tasks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use cubicle_core::{Limits, SandboxId, SandboxState, TemplateName};
use cubicle_runtime::{AgentConfig, Runtime, SandboxSpec};
use cubicle_store::{ListQuery, Page, SandboxRecord, SnapshotRecord, Store};
use cubicle_template::{TemplateError, TemplateStore};
use rand::RngCore;
use tokio::sync::Notify;

use crate::metrics::{MetricSample, Series};
use crate::request::{CreateRequest, ListRequest};

mod hibernate;
mod snapshots;
mod template_builds;
mod template_ready;

use crate::{now_ms, ControlError};
pub use snapshots::{SnapshotListRequest, FORK_DEFAULT_TIMEOUT, MAX_FORKS};
pub use template_builds::RESTARTED;
pub use template_ready::{prepare_template, template_checkpoint, PreparedTemplate};

/// How the control plane behaves.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Lifetime of a sandbox whose create names no timeout (E2B: 300 s).
    pub default_timeout: Duration,
    /// Longest timeout a caller may ask for.
    pub max_timeout: Duration,
    /// CPU, memory and task limits of new sandboxes.
    pub limits: Limits,
    /// Disk size reported for sandboxes, in MiB.
    pub disk_mb: u64,
    /// Largest upload into a sandbox (`POST /files`).
    pub max_upload_bytes: u64,
    /// How often running sandboxes' metrics are sampled.
    pub metrics_interval: Duration,
    /// How long killed sandboxes stay in the store (history, events).
    pub keep_killed: Duration,
    /// A sandbox paused (frozen) for longer than this hibernates: its memory goes to a
    /// checkpoint on disk. `None`: only when the pause asks for it.
    pub hibernate_after: Option<Duration>,
    /// Under memory pressure — the host's `MemAvailable` below this many MiB — paused
    /// sandboxes hibernate at once, longest paused first. `None`: never for this reason.
    pub hibernate_below_mib: Option<u64>,
    /// Where `MemAvailable` is read (`/proc/meminfo`; tests point it elsewhere).
    pub meminfo: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(24 * 3600),
            limits: Limits::default(),
            disk_mb: 10 * 1024,
            max_upload_bytes: 1 << 30,
            metrics_interval: Duration::from_secs(5),
            keep_killed: Duration::from_secs(7 * 24 * 3600),
            hibernate_after: Some(Duration::from_secs(600)),
            hibernate_below_mib: Some(1024),
            meminfo: PathBuf::from("/proc/meminfo"),
        }
    }
}

/// Where the proxy sends a sandbox's traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The agent's unix socket.
    pub socket: PathBuf,
}

/// A template as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSummary {
    /// Its name (the E2B template id).
    pub name: String,
    /// Other names it is found by (e.g. `code-interpreter-v1`), not including `name`.
    pub aliases: Vec<String>,
    /// The template it is a layer on, if any.
    pub parent: Option<String>,
    /// When it was built, ms since the epoch.
    pub built_at_ms: i64,
    /// Hash of the recipe it was built from.
    pub recipe_hash: String,
    /// Size of its root filesystem, bytes.
    pub size_bytes: u64,
    /// CPUs of its sandboxes, if the template sets them (else the daemon's default).
    pub cpu_count: Option<u32>,
    /// Memory of its sandboxes in MiB, if the template sets it.
    pub memory_mb: Option<u64>,
}

/// A running or paused sandbox in the live index.
#[derive(Debug)]
struct Live {
    owner: i64,
    /// The agent's socket (a rollback starts a new agent).
    socket: Mutex<PathBuf>,
    cpu_count: u32,
    disk_total: u64,
    end_at_ms: AtomicI64,
    /// Pause instead of kill when the deadline passes.
    auto_pause: bool,
    /// Paused: no traffic is routed to it and its deadline does not run.
    paused: AtomicBool,
    /// When it was paused, ms since the epoch (for hibernating idle pauses).
    paused_at_ms: AtomicI64,
    /// Held while a lifecycle operation (pause, resume, kill) runs on the sandbox, so
    /// that operations on one sandbox happen one after another.
    ops: tokio::sync::Mutex<()>,
}

/// The control plane. Create it with [`Controller::start`].
#[derive(Debug)]
pub struct Controller {
    config: ControlConfig,
    runtime: Arc<dyn Runtime>,
    store: Store,
    templates: TemplateStore,
    live: RwLock<HashMap<SandboxId, Arc<Live>>>,
    deadlines_changed: Notify,
    metrics: Mutex<HashMap<SandboxId, Series>>,
    idempotency: Mutex<HashMap<(i64, String), (IdempotencySlot, i64)>>,
    /// Template build jobs (see `template_builds`).
    builds: template_builds::Builds,
}

/// What a create starts from.
enum Source {
    /// A built template, and the name (or alias) it was asked for by.
    Template(Box<cubicle_template::Template>, TemplateName),
    /// One of the caller's snapshots.
    Snapshot(Box<SnapshotRecord>),
}

/// The record-level settings of a sandbox about to start.
struct Launch {
    template: String,
    alias: Option<String>,
    timeout_secs: u64,
    metadata: BTreeMap<String, String>,
    env_vars: BTreeMap<String, String>,
    secure: bool,
    allow_internet_access: bool,
    auto_pause: bool,
    /// The template's main service, for a sandbox started fresh (a restored one has
    /// it running already).
    service: Option<cubicle_runtime::ServiceConfig>,
}

/// The sandbox made by the first create with one idempotency key (locked while that
/// create runs).
type IdempotencySlot = Arc<tokio::sync::Mutex<Option<SandboxId>>>;

/// How long an `Idempotency-Key` is remembered.
const IDEMPOTENCY_TTL_MS: i64 = 10 * 60 * 1000;

impl Controller {
    /// Reconciles the store with what the runtime runs, then starts the background
    /// tasks (timeouts, metrics, history purge). They stop when the controller is dropped.
    pub async fn start(
        config: ControlConfig,
        runtime: Arc<dyn Runtime>,
        store: Store,
        templates: TemplateStore,
    ) -> Result<Arc<Controller>, ControlError> {
        let controller = Arc::new(Controller {
            config,
            runtime,
            store,
            templates,
            live: RwLock::new(HashMap::new()),
            deadlines_changed: Notify::new(),
            metrics: Mutex::new(HashMap::new()),
            idempotency: Mutex::new(HashMap::new()),
            builds: Default::default(),
        });
        controller.reconcile().await?;
        controller.reconcile_builds().await?;
        controller.prepare_templates();
        let weak = Arc::downgrade(&controller);
        tokio::spawn(expire_sandboxes(weak.clone()));
        tokio::spawn(sample_metrics(
            weak.clone(),
            controller.config.metrics_interval,
        ));
        let config = &controller.config;
        if config.hibernate_after.is_some() || config.hibernate_below_mib.is_some() {
            let every = config
                .hibernate_after
                .map_or(Duration::from_secs(1), |after| after / 4)
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            tokio::spawn(hibernate::hibernate_idle(weak.clone(), every));
        }
        tokio::spawn(purge_history(weak));
        Ok(controller)
    }

    /// Lets the runtime warm up what makes creates fast (the code-interpreter
    /// templates' interpreters), in the background. A template it cannot read is skipped:
    /// creating from it reports why.
    fn prepare_templates(&self) {
        let Ok(templates) = self.templates.list() else {
            return;
        };
        for template in templates.iter().filter(|t| t.meta.code_interpreter) {
            let Ok(layers) = template.layers(&self.templates) else {
                continue;
            };
            let mut agent = AgentConfig::new(template.name.clone());
            agent.code_interpreter = true;
            self.runtime.prepare(&layers, &agent);
        }
    }

    /// The store (API keys live there too).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &ControlConfig {
        &self.config
    }

    /// Compares the store with the runtime after a (re)start. Running sandboxes survive
    /// a daemon restart and are adopted; nothing is dropped silently: every sandbox that
    /// did not survive is marked killed with the reason, every stray is destroyed.
    async fn reconcile(&self) -> Result<(), ControlError> {
        let running: HashMap<SandboxId, cubicle_runtime::SandboxInfo> = self
            .runtime
            .list()
            .await?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        let mut kept = HashSet::new();
        let mut known = HashSet::new();
        for record in self.store.live_sandboxes()? {
            let now = now_ms();
            match (record.state, running.get(&record.id)) {
                (state @ (SandboxState::Running | SandboxState::Paused), Some(info)) => {
                    // The store says what the sandbox should be; a daemon that died
                    // between freezing and recording (or the reverse) left it otherwise.
                    let paused = state == SandboxState::Paused;
                    if paused && !info.paused {
                        self.runtime.pause(&record.id).await?;
                    } else if !paused && info.paused {
                        self.runtime.resume(&record.id).await?;
                    }
                    self.adopt(&record, info.agent_socket.clone());
                    kept.insert(record.id.clone());
                    tracing::info!(sandbox = %record.id, %state, "adopted sandbox");
                }
                (SandboxState::Paused, None) if self.is_hibernated(&record.id) => {
                    // Nothing runs; the checkpoint is restored on resume. The socket is
                    // set then.
                    self.adopt(&record, PathBuf::new());
                    kept.insert(record.id.clone());
                    tracing::info!(sandbox = %record.id, "adopted hibernated sandbox");
                    continue;
                }
                (SandboxState::Creating, _) => {
                    self.store.transition(
                        &record.id,
                        SandboxState::Killed,
                        now,
                        Some("the daemon stopped while the sandbox was being created"),
                    )?;
                    tracing::warn!(sandbox = %record.id, "create interrupted by a restart");
                }
                (state, _) => {
                    self.store.transition(
                        &record.id,
                        SandboxState::Killed,
                        now,
                        Some(&format!(
                            "was {state} but not running when the daemon started"
                        )),
                    )?;
                    tracing::warn!(sandbox = %record.id, %state, "sandbox did not survive");
                }
            }
            if !kept.contains(&record.id) {
                // Whatever it left behind (directory, cgroup) goes with its record.
                self.runtime.destroy(&record.id).await?;
                known.insert(record.id.clone());
            }
        }
        // Whatever the runtime still has that the store does not claim goes away.
        for id in self.runtime.residues().await? {
            if !kept.contains(&id) && !known.contains(&id) {
                tracing::warn!(sandbox = %id, "destroying a sandbox the store does not know");
                self.runtime.destroy(&id).await?;
            }
        }
        // Checkpoints of hibernated sandboxes no paused record claims.
        if let Ok(entries) = std::fs::read_dir(self.templates.data_dir().hibernated()) {
            for entry in entries.flatten() {
                let id = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<SandboxId>().ok());
                if !id.is_some_and(|id| kept.contains(&id)) {
                    tracing::warn!(path = %entry.path().display(), "removing an unclaimed hibernation checkpoint");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        self.reconcile_snapshots().await
    }

    fn adopt(&self, record: &SandboxRecord, socket: PathBuf) {
        let live = Arc::new(Live {
            owner: record.owner,
            socket: Mutex::new(socket),
            cpu_count: record.cpu_count,
            disk_total: record.disk_mb << 20,
            end_at_ms: AtomicI64::new(record.end_at_ms),
            auto_pause: record.auto_pause,
            paused: AtomicBool::new(record.state == SandboxState::Paused),
            paused_at_ms: AtomicI64::new(now_ms()),
            ops: tokio::sync::Mutex::new(()),
        });
        self.live
            .write()
            .expect("live index")
            .insert(record.id.clone(), live);
        self.metrics.lock().expect("metrics").insert(
            record.id.clone(),
            Series::new(record.started_at_ms.unwrap_or(record.created_at_ms)),
        );
        self.deadlines_changed.notify_one();
    }

    /// Creates a sandbox for `owner`; returns once its agent answers. The template may
    /// also name one of `owner`'s snapshots (E2B's create-from-snapshot): the sandbox is
    /// then restored from it, with a new id and access token.
    pub async fn create(
        &self,
        owner: i64,
        request: CreateRequest,
    ) -> Result<SandboxRecord, ControlError> {
        let max_timeout = self.config.max_timeout.as_secs();
        let template_name = request.validate(max_timeout)?;
        // One create per idempotency key: concurrent retries wait for the first.
        let slot = request
            .idempotency_key
            .as_ref()
            .map(|key| self.idempotency_slot(owner, key));
        let mut slot_guard = match slot {
            Some(slot) => Some(slot.lock_owned().await),
            None => None,
        };
        if let Some(Some(id)) = slot_guard.as_deref() {
            if let Some(existing) = self
                .store
                .get_sandbox(id)?
                .filter(|r| r.state.is_live() && r.owner == owner)
            {
                return Ok(existing);
            }
        }
        let record = match self.source_of(owner, &request.template, template_name)? {
            Source::Template(template, name) => {
                self.create_from_template(owner, request, template, name)
                    .await?
            }
            Source::Snapshot(snapshot) => {
                let timeout = request
                    .timeout_secs
                    .unwrap_or(self.config.default_timeout.as_secs());
                let mut env_vars = snapshot.env_vars.clone();
                env_vars.extend(request.env_vars);
                let launch = Launch {
                    template: snapshot.template.clone(),
                    alias: Some(snapshot.id.clone()),
                    timeout_secs: timeout,
                    metadata: request.metadata,
                    env_vars,
                    secure: request.secure,
                    allow_internet_access: request.allow_internet_access,
                    auto_pause: request.auto_pause,
                    service: None,
                };
                let dir = self.snapshot_dir(&snapshot.key);
                self.launch(owner, launch, &snapshot, Some(&dir)).await?
            }
        };
        if let Some(guard) = slot_guard.as_deref_mut() {
            *guard = Some(record.id.clone());
        }
        Ok(record)
    }

    /// What a create starts from: a template by name or alias, else one of `owner`'s
    /// snapshots. Names with `:` or `/` are snapshot ids only; a bare name is a template
    /// first, a snapshot's name second.
    fn source_of(
        &self,
        owner: i64,
        requested: &str,
        template_name: Option<TemplateName>,
    ) -> Result<Source, ControlError> {
        let not_found = || ControlError::TemplateNotFound(requested.to_owned());
        if let Some(name) = template_name {
            // By name or alias; then every layer it stacks on (a missing or rebuilt
            // parent fails here, before anything is recorded).
            match self.templates.get(&name) {
                Ok(t) => return Ok(Source::Template(Box::new(t), name)),
                Err(TemplateError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match self.find_snapshot(owner, requested)? {
            Some(s) => Ok(Source::Snapshot(Box::new(s))),
            None => Err(not_found()),
        }
    }

    async fn create_from_template(
        &self,
        owner: i64,
        request: CreateRequest,
        template: Box<cubicle_template::Template>,
        template_name: TemplateName,
    ) -> Result<SandboxRecord, ControlError> {
        let layers = template.layers(&self.templates)?;
        let timeout = request
            .timeout_secs
            .unwrap_or(self.config.default_timeout.as_secs());
        // The template's CPU and memory (E2B's create has no fields for them).
        let limits = template_ready::template_limits(&template, self.config.limits);
        // The template's environment under the request's.
        let mut env_vars = template.meta.sandbox.env.clone();
        env_vars.extend(request.env_vars);
        // A template with a service starts from its checkpoint, service running.
        let checkpoint = template_checkpoint(&template);
        if template.meta.sandbox.service.is_some() && checkpoint.is_none() {
            tracing::debug!(template = %template.name, "template's service has no checkpoint; starting it fresh");
        }
        // What a start needs, in the shape a snapshot has (nothing of it is stored).
        let from = SnapshotRecord {
            key: String::new(),
            id: String::new(),
            owner,
            sandbox_id: SandboxId::generate(),
            name: None,
            state: cubicle_store::SnapshotState::Ready,
            created_at_ms: now_ms(),
            size_bytes: 0,
            template: template.name.to_string(),
            layers,
            uid_shift: template.meta.uid_shift,
            env_vars: BTreeMap::new(),
            default_user: "user".into(),
            code_interpreter: template.meta.code_interpreter,
            cpu_count: limits.cpu_count,
            memory_mb: limits.memory_mb,
            metadata: BTreeMap::new(),
            // The template's `--writable-layer-size`, enforced by the runtime.
            writable_layer_mib: template.meta.sandbox.writable_layer_mib,
        };
        let launch = Launch {
            // The template's own name, whatever the request called it; the name asked
            // for (possibly an alias) is the alias, as in E2B.
            template: template.name.to_string(),
            alias: Some(template_name.to_string()),
            timeout_secs: timeout,
            metadata: request.metadata,
            env_vars,
            secure: request.secure,
            allow_internet_access: request.allow_internet_access,
            auto_pause: request.auto_pause,
            service: template_ready::service_config(&template),
        };
        self.launch(owner, launch, &from, checkpoint.as_deref())
            .await
    }

    /// Records a new sandbox as `creating`, starts it (fresh from `from`'s layers, or
    /// restored from the checkpoint in `checkpoint`), records it running and indexes it.
    /// A failed start is recorded as killed with the reason.
    async fn launch(
        &self,
        owner: i64,
        launch: Launch,
        from: &SnapshotRecord,
        checkpoint: Option<&Path>,
    ) -> Result<SandboxRecord, ControlError> {
        let id = SandboxId::generate();
        let token = launch.secure.then(random_token);
        let now = now_ms();
        let limits = Limits {
            cpu_count: from.cpu_count,
            memory_mb: from.memory_mb,
            ..self.config.limits
        };
        let record = SandboxRecord {
            id: id.clone(),
            owner,
            template: launch.template,
            alias: launch.alias,
            state: SandboxState::Creating,
            created_at_ms: now,
            started_at_ms: None,
            end_at_ms: now + (launch.timeout_secs as i64) * 1000,
            ended_at_ms: None,
            end_reason: None,
            cpu_count: limits.cpu_count,
            memory_mb: limits.memory_mb,
            // A limited writable layer is the sandbox's disk.
            disk_mb: from.writable_layer_mib.unwrap_or(self.config.disk_mb),
            metadata: launch.metadata,
            env_vars: launch.env_vars.clone(),
            envd_access_token: token.clone(),
            allow_internet_access: launch.allow_internet_access,
            auto_pause: launch.auto_pause,
            writable_layer_mib: from.writable_layer_mib,
        };
        self.store.insert_sandbox(&record)?;
        let mut spec = self.spec_for(&record, from);
        spec.agent.service = launch.service.clone();
        let fresh_if_restore_fails = launch.service.is_some();
        let started = match checkpoint {
            None => self.runtime.create(spec).await,
            Some(dir) if fresh_if_restore_fails => {
                // A template's checkpoint can go stale (a new agent binary, a changed
                // host); its service then starts fresh, as without a checkpoint.
                match self.runtime.restore(dir, spec.clone()).await {
                    Ok(info) => Ok(info),
                    Err(e) => {
                        tracing::warn!(sandbox = %id, template = %record.template, error = %e,
                            "the template's checkpoint did not restore; starting its service fresh (rebuild the template to checkpoint it again)");
                        self.runtime.create(spec).await
                    }
                }
            }
            Some(dir) => self.runtime.restore(dir, spec).await,
        };
        let info = match started {
            Ok(info) => info,
            Err(e) => {
                let what = if checkpoint.is_some() {
                    "restore"
                } else {
                    "create"
                };
                let reason = format!("{what} failed: {e}");
                if let Err(store_err) =
                    self.store
                        .transition(&id, SandboxState::Killed, now_ms(), Some(&reason))
                {
                    tracing::error!(sandbox = %id, error = %store_err, "recording a failed create");
                }
                return Err(e.into());
            }
        };
        let record = match self
            .store
            .transition(&id, SandboxState::Running, now_ms(), None)
        {
            Ok(r) => r,
            Err(e) => {
                // Never leave a sandbox running that the store does not know as running.
                let _ = self.runtime.destroy(&id).await;
                return Err(e.into());
            }
        };
        self.adopt(&record, info.agent_socket);
        Ok(record)
    }

    /// The runtime spec of the sandbox `record` on `from`'s layers and agent settings.
    fn spec_for(&self, record: &SandboxRecord, from: &SnapshotRecord) -> SandboxSpec {
        SandboxSpec {
            id: record.id.clone(),
            layers: from.layers.clone(),
            uid_shift: from.uid_shift,
            limits: Limits {
                cpu_count: record.cpu_count,
                memory_mb: record.memory_mb,
                ..self.config.limits
            },
            writable_layer_mib: record.writable_layer_mib,
            agent: AgentConfig {
                sandbox_id: record.id.to_string(),
                env_vars: record.env_vars.clone(),
                default_user: from.default_user.clone(),
                access_token: record.envd_access_token.clone(),
                max_upload_bytes: self.config.max_upload_bytes,
                code_interpreter: from.code_interpreter,
                warm_python: None,
                service: None,
            },
        }
    }

    /// The slot of an idempotency key: holds the sandbox the first create with that key
    /// made. Slots older than [`IDEMPOTENCY_TTL_MS`] are forgotten.
    fn idempotency_slot(&self, owner: i64, key: &str) -> IdempotencySlot {
        let mut keys = self.idempotency.lock().expect("idempotency");
        let now = now_ms();
        keys.retain(|_, (_, at)| now - *at < IDEMPOTENCY_TTL_MS);
        keys.entry((owner, key.to_owned()))
            .or_insert_with(|| (Arc::new(tokio::sync::Mutex::new(None)), now))
            .0
            .clone()
    }

    fn live_of(&self, owner: i64, id: &SandboxId) -> Result<Arc<Live>, ControlError> {
        self.live
            .read()
            .expect("live index")
            .get(id)
            .filter(|l| l.owner == owner)
            .cloned()
            .ok_or_else(|| ControlError::SandboxNotFound(id.clone()))
    }

    /// A live sandbox of `owner` (killed ones and other owners' are not found).
    pub fn get(&self, owner: i64, id: &SandboxId) -> Result<SandboxRecord, ControlError> {
        self.store
            .get_sandbox(id)?
            .filter(|r| r.owner == owner && r.state.is_live())
            .ok_or_else(|| ControlError::SandboxNotFound(id.clone()))
    }

    /// A page of `owner`'s sandboxes.
    pub fn list(&self, owner: i64, request: &ListRequest) -> Result<Page, ControlError> {
        request.validate()?;
        let states = if request.states.is_empty() {
            vec![SandboxState::Running, SandboxState::Paused]
        } else {
            request.states.clone()
        };
        Ok(self.store.list_sandboxes(&ListQuery {
            owner: Some(owner),
            states,
            metadata: request.metadata.clone(),
            template: request.template.clone(),
            started_after_ms: request.started_after_ms,
            order: request.order,
            limit: request.limit,
            cursor: request.cursor.clone(),
        })?)
    }

    /// Kills a sandbox of `owner`. An unknown or already killed sandbox is not found.
    pub async fn kill(&self, owner: i64, id: &SandboxId) -> Result<(), ControlError> {
        self.live_of(owner, id)?;
        self.kill_now(id, "killed").await
    }

    /// Takes the sandbox out of the index (so only one caller kills it), destroys it and
    /// records why. If the runtime fails, the sandbox stays indexed and the error is
    /// returned: nothing is marked killed that may still run.
    async fn kill_now(&self, id: &SandboxId, reason: &str) -> Result<(), ControlError> {
        let Some(live) = self.live.write().expect("live index").remove(id) else {
            return Err(ControlError::SandboxNotFound(id.clone()));
        };
        // An operation under way (a pause, a resume) finishes first.
        let op = live.ops.lock().await;
        if let Err(e) = self.runtime.destroy(id).await {
            drop(op);
            tracing::error!(sandbox = %id, error = %e, "destroy failed; will retry");
            live.end_at_ms.store(now_ms() + 30_000, Ordering::Relaxed);
            self.live
                .write()
                .expect("live index")
                .insert(id.clone(), live);
            self.deadlines_changed.notify_one();
            return Err(e.into());
        }
        let hibernated = self.hibernation_dir(id);
        if hibernated.exists() {
            if let Err(e) = std::fs::remove_dir_all(&hibernated) {
                tracing::warn!(sandbox = %id, error = %e, "removing a killed sandbox's hibernation checkpoint");
            }
        }
        self.metrics.lock().expect("metrics").remove(id);
        self.store
            .transition(id, SandboxState::Killed, now_ms(), Some(reason))?;
        tracing::info!(sandbox = %id, reason, "sandbox killed");
        Ok(())
    }

    /// Sets the sandbox to expire `secs` seconds from now (may shorten its life).
    pub fn set_timeout(
        &self,
        owner: i64,
        id: &SandboxId,
        secs: u64,
    ) -> Result<SandboxRecord, ControlError> {
        let live = self.live_of(owner, id)?;
        self.check_timeout(Some(secs))?;
        self.set_deadline(id, &live, now_ms() + (secs as i64) * 1000)
    }

    fn set_deadline(
        &self,
        id: &SandboxId,
        live: &Live,
        end_at_ms: i64,
    ) -> Result<SandboxRecord, ControlError> {
        let record = self.store.set_end_at(id, end_at_ms)?;
        live.end_at_ms.store(end_at_ms, Ordering::Relaxed);
        self.deadlines_changed.notify_one();
        Ok(record)
    }

    /// E2B `connect`: a paused sandbox is resumed, with its deadline at `now + timeout`
    /// (the default timeout if none is given); a running sandbox answers at once, its
    /// deadline moved as by [`Controller::extend`]. Returns the record and whether it was
    /// resumed.
    pub async fn connect(
        &self,
        owner: i64,
        id: &SandboxId,
        timeout_secs: Option<u64>,
    ) -> Result<(SandboxRecord, bool), ControlError> {
        let live = self.live_of(owner, id)?;
        self.check_timeout(timeout_secs)?;
        if live.paused.load(Ordering::Acquire) {
            if let Some(record) = self.resume_paused(id, &live, timeout_secs).await? {
                return Ok((record, true));
            }
        }
        Ok((self.extend(owner, id, timeout_secs)?, false))
    }

    /// Moves the sandbox's deadline to `now + timeout` if that is later (E2B's connect
    /// and refresh never shorten a sandbox's life). A paused sandbox stays paused.
    pub fn extend(
        &self,
        owner: i64,
        id: &SandboxId,
        timeout_secs: Option<u64>,
    ) -> Result<SandboxRecord, ControlError> {
        let live = self.live_of(owner, id)?;
        self.check_timeout(timeout_secs)?;
        if let Some(t) = timeout_secs {
            let wanted = now_ms() + (t as i64) * 1000;
            if wanted > live.end_at_ms.load(Ordering::Relaxed) {
                return self.set_deadline(id, &live, wanted);
            }
        }
        self.get(owner, id)
    }

    fn check_timeout(&self, timeout_secs: Option<u64>) -> Result<(), ControlError> {
        let max = self.config.max_timeout.as_secs();
        match timeout_secs {
            Some(t) if t == 0 || t > max => Err(ControlError::InvalidInput(format!(
                "timeout must be between 1 and {max} seconds, got {t}"
            ))),
            _ => Ok(()),
        }
    }

    /// Pauses a running sandbox of `owner`: every process stops where it is, memory
    /// kept; traffic to it is refused and its timeout stops running until it is resumed
    /// ([`Controller::connect`], [`Controller::resume`]). Pausing a paused sandbox is a
    /// conflict.
    pub async fn pause(&self, owner: i64, id: &SandboxId) -> Result<SandboxRecord, ControlError> {
        let live = self.live_of(owner, id)?;
        let _op = live.ops.lock().await;
        self.pause_locked(id, &live).await
    }

    /// Pauses `live`, whose operation lock the caller holds.
    async fn pause_locked(
        &self,
        id: &SandboxId,
        live: &Arc<Live>,
    ) -> Result<SandboxRecord, ControlError> {
        if !self.still_indexed(id, live) {
            return Err(ControlError::SandboxNotFound(id.clone()));
        }
        if live.paused.load(Ordering::Acquire) {
            return Err(ControlError::Conflict(format!(
                "sandbox {id} is already paused"
            )));
        }
        self.runtime.pause(id).await?;
        let record = match self
            .store
            .transition(id, SandboxState::Paused, now_ms(), None)
        {
            Ok(r) => r,
            Err(e) => {
                // Never leave a sandbox paused that the store does not know as paused.
                if let Err(resume) = self.runtime.resume(id).await {
                    tracing::error!(sandbox = %id, error = %resume, "resuming after a failed pause");
                }
                return Err(e.into());
            }
        };
        live.paused_at_ms.store(now_ms(), Ordering::Relaxed);
        live.paused.store(true, Ordering::Release);
        self.deadlines_changed.notify_one();
        tracing::info!(sandbox = %id, "sandbox paused");
        Ok(record)
    }

    /// Hibernates a sandbox of `owner` (Cubicle's deep pause): paused if it runs, then
    /// checkpointed to disk with its processes ended, so it holds no memory. Resumed like
    /// any paused sandbox. Hibernating a hibernated sandbox is a conflict.
    pub async fn hibernate(
        &self,
        owner: i64,
        id: &SandboxId,
    ) -> Result<SandboxRecord, ControlError> {
        let live = self.live_of(owner, id)?;
        let _op = live.ops.lock().await;
        if !self.still_indexed(id, &live) {
            return Err(ControlError::SandboxNotFound(id.clone()));
        }
        if self.is_hibernated(id) {
            return Err(ControlError::Conflict(format!(
                "sandbox {id} is already paused (hibernated)"
            )));
        }
        if !live.paused.load(Ordering::Acquire) {
            self.pause_locked(id, &live).await?;
        }
        self.hibernate_locked(id).await?;
        self.get(owner, id)
    }

    /// E2B `resume` (v1): resumes a paused sandbox of `owner`; a running one is a
    /// conflict.
    pub async fn resume(
        &self,
        owner: i64,
        id: &SandboxId,
        timeout_secs: Option<u64>,
    ) -> Result<SandboxRecord, ControlError> {
        let live = self.live_of(owner, id)?;
        self.check_timeout(timeout_secs)?;
        self.resume_paused(id, &live, timeout_secs)
            .await?
            .ok_or_else(|| ControlError::Conflict(format!("sandbox {id} is already running")))
    }

    /// Resumes `live` if it is paused (`None` if it is running), with its deadline at
    /// `now + timeout`.
    async fn resume_paused(
        &self,
        id: &SandboxId,
        live: &Arc<Live>,
        timeout_secs: Option<u64>,
    ) -> Result<Option<SandboxRecord>, ControlError> {
        let _op = live.ops.lock().await;
        if !self.still_indexed(id, live) {
            return Err(ControlError::SandboxNotFound(id.clone()));
        }
        if !live.paused.load(Ordering::Acquire) {
            return Ok(None);
        }
        let timeout = timeout_secs.unwrap_or(self.config.default_timeout.as_secs());
        let end_at_ms = now_ms() + (timeout as i64) * 1000;
        if self.is_hibernated(id) {
            self.wake_locked(id, live).await?;
        } else {
            self.runtime.resume(id).await?;
        }
        let record = self
            .store
            .transition(id, SandboxState::Running, now_ms(), None)
            .and_then(|_| self.store.set_end_at(id, end_at_ms));
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                // Never leave a sandbox running that the store knows as paused.
                if let Err(pause) = self.runtime.pause(id).await {
                    tracing::error!(sandbox = %id, error = %pause, "pausing after a failed resume");
                }
                return Err(e.into());
            }
        };
        live.end_at_ms.store(end_at_ms, Ordering::Relaxed);
        live.paused.store(false, Ordering::Release);
        self.deadlines_changed.notify_one();
        tracing::info!(sandbox = %id, "sandbox resumed");
        Ok(Some(record))
    }

    /// Whether `live` is still the index entry of `id` (not killed while the caller
    /// waited for its operation lock).
    fn still_indexed(&self, id: &SandboxId, live: &Arc<Live>) -> bool {
        self.live
            .read()
            .expect("live index")
            .get(id)
            .is_some_and(|l| Arc::ptr_eq(l, live))
    }

    /// Samples of the sandbox's resource use between `start` and `end` (ms).
    pub async fn metrics(
        &self,
        owner: i64,
        id: &SandboxId,
        start_ms: Option<i64>,
        end_ms: Option<i64>,
    ) -> Result<Vec<MetricSample>, ControlError> {
        let live = self.live_of(owner, id)?;
        let empty = self
            .metrics
            .lock()
            .expect("metrics")
            .get(id)
            .is_none_or(Series::is_empty);
        if empty {
            self.sample(id, &live).await?;
        }
        Ok(self
            .metrics
            .lock()
            .expect("metrics")
            .get(id)
            .map(|s| s.range(start_ms, end_ms))
            .unwrap_or_default())
    }

    async fn sample(&self, id: &SandboxId, live: &Live) -> Result<(), ControlError> {
        let stats = self.runtime.stats(id).await?;
        if let Some(series) = self.metrics.lock().expect("metrics").get_mut(id) {
            series.push(&stats, now_ms(), live.cpu_count, live.disk_total);
        }
        Ok(())
    }

    /// Where a running sandbox's traffic goes; `None` for unknown, killed or paused
    /// sandboxes (no owner check: sandbox traffic is authorised by the sandbox's own
    /// access token, enforced by its agent).
    pub fn route(&self, id: &str) -> Option<Route> {
        let id: SandboxId = id.parse().ok()?;
        self.live
            .read()
            .expect("live index")
            .get(&id)
            .filter(|l| !l.paused.load(Ordering::Acquire))
            .map(|l| Route {
                socket: l.socket.lock().expect("socket").clone(),
            })
    }

    /// Built templates.
    pub fn templates(&self) -> Result<Vec<TemplateSummary>, ControlError> {
        Ok(self.templates.list()?.into_iter().map(summary).collect())
    }

    /// One template by name or alias.
    pub fn template(&self, name: &str) -> Result<TemplateSummary, ControlError> {
        let parsed: TemplateName = name
            .parse()
            .map_err(|_| ControlError::TemplateNotFound(name.to_owned()))?;
        match self.templates.get(&parsed) {
            Ok(t) => Ok(summary(t)),
            Err(TemplateError::NotFound { .. }) => {
                Err(ControlError::TemplateNotFound(name.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn next_deadline(&self) -> Option<i64> {
        self.live
            .read()
            .expect("live index")
            .values()
            .filter(|l| !l.paused.load(Ordering::Acquire))
            .map(|l| l.end_at_ms.load(Ordering::Relaxed))
            .min()
    }

    /// Running sandboxes whose deadline passed.
    fn expired(&self, now: i64) -> Vec<(SandboxId, Arc<Live>)> {
        self.live
            .read()
            .expect("live index")
            .iter()
            .filter(|(_, l)| {
                !l.paused.load(Ordering::Acquire) && l.end_at_ms.load(Ordering::Relaxed) <= now
            })
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect()
    }

    /// A sandbox whose deadline passed: paused if it asked for that at create,
    /// otherwise killed. A deadline moved meanwhile (a refresh) spares it.
    async fn expire(&self, id: &SandboxId, live: &Arc<Live>) -> Result<(), ControlError> {
        if live.auto_pause {
            let _op = live.ops.lock().await;
            if live.paused.load(Ordering::Acquire)
                || live.end_at_ms.load(Ordering::Relaxed) > now_ms()
            {
                return Ok(());
            }
            return self.pause_locked(id, live).await.map(|_| ());
        }
        self.kill_now(id, "timeout").await
    }

    fn live_ids(&self) -> Vec<(SandboxId, Arc<Live>)> {
        self.live
            .read()
            .expect("live index")
            .iter()
            .map(|(id, l)| (id.clone(), l.clone()))
            .collect()
    }
}

fn summary(t: cubicle_template::Template) -> TemplateSummary {
    TemplateSummary {
        name: t.name.to_string(),
        aliases: t.meta.aliases.clone(),
        parent: t.meta.parent.clone(),
        built_at_ms: t.meta.built_at_unix().map(|s| s as i64 * 1000).unwrap_or(0),
        recipe_hash: t.meta.recipe_hash.clone(),
        size_bytes: t.meta.size_bytes,
        cpu_count: t.meta.sandbox.cpu_count,
        memory_mb: t.meta.sandbox.memory_mb,
    }
}

/// 256 random bits as hex: envd access tokens.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Kills sandboxes whose deadline passed. Sleeps until the earliest deadline or until
/// one changes.
async fn expire_sandboxes(controller: Weak<Controller>) {
    loop {
        let (next, notified) = {
            let Some(c) = controller.upgrade() else {
                return;
            };
            let next = c.next_deadline();
            // Register interest before releasing the controller, so a change in between
            // is not missed.
            let notified = Box::pin(async move { c.deadlines_changed.notified().await });
            (next, notified)
        };
        let sleep = async {
            match next {
                Some(at) => {
                    let wait = (at - now_ms()).max(0) as u64;
                    tokio::time::sleep(Duration::from_millis(wait)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = notified => {}
        }
        let Some(c) = controller.upgrade() else {
            return;
        };
        for (id, live) in c.expired(now_ms()) {
            if let Err(e) = c.expire(&id, &live).await {
                tracing::error!(sandbox = %id, error = %e.chain(), "expiring sandbox");
            }
        }
    }
}

/// Samples every running sandbox's resource use.
async fn sample_metrics(controller: Weak<Controller>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let Some(c) = controller.upgrade() else {
            return;
        };
        for (id, live) in c.live_ids() {
            if let Err(e) = c.sample(&id, &live).await {
                tracing::debug!(sandbox = %id, error = %e.chain(), "metrics sample");
            }
        }
    }
}

/// Deletes killed sandboxes' records once they are older than `keep_killed`.
async fn purge_history(controller: Weak<Controller>) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let Some(c) = controller.upgrade() else {
            return;
        };
        let before = now_ms() - c.config.keep_killed.as_millis() as i64;
        match c.store.purge_killed(before) {
            Ok(n) if n > 0 => tracing::info!(purged = n, "old sandbox records removed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "purging sandbox history"),
        }
    }
}
