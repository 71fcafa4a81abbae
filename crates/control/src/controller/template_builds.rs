//! Template build jobs and the template lifecycle: submitting a build (a container
//! image, or a rebuild of an existing template), running it, reporting its phase and
//! log, deleting templates nobody uses.
//!
//! A job is recorded `queued` in the store when it is submitted and runs when the
//! previous one is done (one build at a time: builds are disk- and CPU-bound, and the
//! template store serialises installs anyway). It runs
//! [`cubicle_template::build_template`] on a blocking thread, which reports
//! `pulling`/`unpacking`/`building`; then [`Controller::prepare_template`]
//! (`snapshotting`), then `ready`. Any error ends it `failed` with the message and
//! whose fault it is (the request's — a bad image, bad flags — or the host's), and
//! leaves no template: the pipeline removes its build directory, and a template that
//! was installed but could not be prepared is removed. Phases are written to the store
//! as they change, with the last [`BUILD_LOG_LINES`] lines of output; while a job runs
//! its live log is kept here, with the latest progress of each layer of its image
//! (in memory only: several events a second, worthless once the job ends). A restart marks unfinished jobs `failed` and removes what
//! they left.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use cubicle_core::{ErrorKind, Limits, SandboxState, TemplateName};
use cubicle_store::{BuildFault, BuildLogLine, BuildRecord, BUILD_LOG_LINES};
use cubicle_template::{
    build_template, BuildEvent, BuildOptions, BuildOutcome, BuildPhase, ImageBuildRequest,
    LayerProgress, Recipe, RegistryAuth, Template, TemplateError, TemplateSource,
};

use super::Controller;
use crate::{now_ms, ControlError};

/// What the daemon remembers of build jobs besides their records.
#[derive(Debug, Default)]
pub(super) struct Builds {
    /// Held by the running job: builds run one at a time, in submission order.
    slot: tokio::sync::Mutex<()>,
    /// Jobs not finished yet: their phase and log as they happen.
    live: Mutex<HashMap<String, LiveBuild>>,
}

#[derive(Debug)]
struct LiveBuild {
    phase: BuildPhase,
    logs: VecDeque<BuildLogLine>,
    log_count: u64,
    /// The latest progress of each layer seen so far, by layer number.
    layers: Vec<LayerProgress>,
}

impl LiveBuild {
    fn new() -> Self {
        LiveBuild {
            phase: BuildPhase::Queued,
            logs: VecDeque::new(),
            log_count: 0,
            layers: Vec::new(),
        }
    }

    /// Records a layer's progress in place of what was known of that layer.
    fn layer(&mut self, p: LayerProgress) {
        match self.layers.binary_search_by_key(&p.index, |l| l.index) {
            Ok(at) => self.layers[at] = p,
            Err(at) => self.layers.insert(at, p),
        }
    }

    /// Appends a line, keeping the last [`BUILD_LOG_LINES`].
    fn push(&mut self, message: String) {
        if self.logs.len() == BUILD_LOG_LINES {
            self.logs.pop_front();
        }
        self.logs.push_back(BuildLogLine {
            at_ms: now_ms(),
            message,
        });
        self.log_count += 1;
    }
}

/// Why a job failed, for its record.
struct Failure {
    message: String,
    fault: BuildFault,
}

impl Failure {
    fn of(e: &ControlError) -> Failure {
        let fault = match e.kind() {
            ErrorKind::InvalidInput | ErrorKind::NotFound | ErrorKind::Conflict => BuildFault::User,
            _ => BuildFault::Internal,
        };
        Failure {
            message: e.chain_without_wrapper(),
            fault,
        }
    }
}

impl ControlError {
    /// The message of a build failure: a template error's own text (not prefixed with
    /// "template store"), anything else with its chain.
    fn chain_without_wrapper(&self) -> String {
        match self {
            ControlError::Template(e) => e.to_string(),
            other => other.chain(),
        }
    }
}

/// The message an interrupted job ends with.
pub const RESTARTED: &str = "the daemon restarted during the build";

impl Controller {
    /// Submits a build of the image `request` as the new template `template_id` (a
    /// generated `tpl-…` name when `None`). Returns the job's record (`queued`) at once;
    /// the build runs in the background.
    ///
    /// Errors: [`ControlError::InvalidInput`] for a bad name or request,
    /// [`ControlError::Conflict`] for a name that is taken, a built-in template's, or
    /// being built.
    pub fn submit_image_build(
        self: &Arc<Self>,
        owner: i64,
        template_id: Option<&str>,
        request: ImageBuildRequest,
    ) -> Result<BuildRecord, ControlError> {
        let name: TemplateName = match template_id {
            Some(id) => id.parse().map_err(|e| {
                ControlError::InvalidInput(format!("invalid templateID {id:?}: {e}"))
            })?,
            None => cubicle_template::oci::generated_template_name()
                .parse()
                .map_err(|e| ControlError::InvalidInput(format!("generated name: {e}")))?,
        };
        check_image_request(&request)?;
        if Recipe::builtin(name.as_str()).is_ok() {
            return Err(ControlError::Conflict(format!(
                "template '{name}' is the name of a built-in template; choose another templateID"
            )));
        }
        if self.templates.get(&name).is_ok() {
            return Err(ControlError::Conflict(format!(
                "template '{name}' exists already; delete it first (`cubicle tpl rm {name}`) \
                 or rebuild it (`cubicle tpl rebuild {name}`)"
            )));
        }
        let source = TemplateSource::Image {
            name,
            request: Box::new(request),
        };
        self.submit(owner, source, false)
    }

    /// Submits a rebuild of the template `name` from its recorded source: a built-in
    /// recipe, or the image request of its last build (credentials are never recorded:
    /// `auth` gives them again). The template is replaced when the build succeeds.
    ///
    /// Errors: not found; [`ControlError::Conflict`] while sandboxes, snapshots or
    /// other templates use it, or a build of it runs.
    pub fn rebuild_template(
        self: &Arc<Self>,
        owner: i64,
        name: &str,
        auth: Option<RegistryAuth>,
    ) -> Result<BuildRecord, ControlError> {
        let template = self.template_by_name(name)?;
        self.refuse_if_used(&template, "rebuild")?;
        let source = match (&template.meta.image, Recipe::builtin(&template.meta.recipe)) {
            (None, Ok(recipe)) => TemplateSource::Recipe(recipe),
            (None, Err(_)) => {
                return Err(ControlError::InvalidInput(format!(
                    "template '{}' comes from the recipe '{}', which this build of cubicle \
                     does not know",
                    template.name, template.meta.recipe
                )))
            }
            (Some(image), _) => {
                let recorded = self
                    .store
                    .builds_of(template.name.as_str())?
                    .into_iter()
                    .rev()
                    .find(|b| b.source == "image")
                    .and_then(|b| serde_json::from_str::<ImageBuildRequest>(&b.request).ok());
                let mut request = recorded.unwrap_or_else(|| ImageBuildRequest {
                    // Built before jobs recorded requests: what template.json knows.
                    image: image.source.clone(),
                    defaults: cubicle_template::SandboxDefaults {
                        env: Default::default(),
                        service: None,
                        ..template.meta.sandbox.clone()
                    },
                    ..Default::default()
                });
                request.registry_auth = auth;
                TemplateSource::Image {
                    name: template.name.clone(),
                    request: Box::new(request),
                }
            }
        };
        self.submit(owner, source, true)
    }

    /// Records the job and starts its task.
    fn submit(
        self: &Arc<Self>,
        owner: i64,
        source: TemplateSource,
        rebuild: bool,
    ) -> Result<BuildRecord, ControlError> {
        let name = source.template_name()?;
        // One job per template at a time (checked and recorded under the live lock).
        let mut live = self.builds.live.lock().expect("builds");
        if let Some(running) = self
            .store
            .unfinished_builds()?
            .into_iter()
            .find(|b| b.template == name.as_str())
        {
            return Err(ControlError::Conflict(format!(
                "template '{name}' is being built (build {}, {})",
                running.id, running.phase
            )));
        }
        let request = match &source {
            TemplateSource::Image { request, .. } => serde_json::to_string(request)
                .map_err(|e| ControlError::InvalidInput(format!("request: {e}")))?,
            TemplateSource::Recipe(r) => serde_json::json!({ "recipe": r.name }).to_string(),
        };
        let now = now_ms();
        let record = BuildRecord {
            id: cubicle_core::random_uuid(),
            template: name.to_string(),
            owner,
            source: source.kind().to_owned(),
            request,
            rebuild,
            phase: BuildPhase::Queued.as_str().to_owned(),
            created_at_ms: now,
            updated_at_ms: now,
            finished_at_ms: None,
            error: None,
            fault: None,
            failed_phase: None,
            logs: Vec::new(),
            log_count: 0,
        };
        self.store.insert_build(&record)?;
        live.insert(record.id.clone(), LiveBuild::new());
        drop(live);
        tracing::info!(build = %record.id, template = %name, rebuild, "template build queued");
        let this = self.clone();
        let id = record.id.clone();
        tokio::spawn(async move { this.run_build(id, source, rebuild).await });
        Ok(record)
    }

    /// Runs one job to its end.
    async fn run_build(self: Arc<Self>, id: String, source: TemplateSource, rebuild: bool) {
        let _slot = self.builds.slot.lock().await;
        let name = match source.template_name() {
            Ok(n) => n,
            Err(e) => return self.end_build(&id, Err(Failure::of(&e.into()))),
        };
        self.build_log(&id, format!("building template '{name}'"));
        let this = self.clone();
        let job = id.clone();
        let built = tokio::task::spawn_blocking(move || {
            let opts = BuildOptions {
                rebuild,
                ..BuildOptions::default()
            };
            build_template(&this.templates, &source, &opts, &mut |e| {
                this.build_event(&job, e)
            })
        })
        .await;
        let template = match built {
            Ok(Ok(BuildOutcome::Built(t) | BuildOutcome::UpToDate(t))) => t,
            Ok(Err(e)) => return self.end_build(&id, Err(Failure::of(&e.into()))),
            Err(panic) => {
                return self.end_build(
                    &id,
                    Err(Failure {
                        message: format!("the build crashed: {panic}"),
                        fault: BuildFault::Internal,
                    }),
                )
            }
        };
        self.set_build_phase(&id, BuildPhase::Snapshotting);
        match self.prepare_template(&template).await {
            Ok(Some(prepared)) => self.build_log(&id, prepared.summary()),
            Ok(None) => {}
            Err(e) => {
                let failure = Failure::of(&e);
                // A template that is not ready is no template.
                self.remove_half_template(&id, &template).await;
                return self.end_build(&id, Err(failure));
            }
        }
        self.end_build(&id, Ok(&template));
    }

    /// One event of a running job's pipeline (on its blocking thread).
    fn build_event(&self, id: &str, event: BuildEvent) {
        match event {
            BuildEvent::Phase(phase) => self.set_build_phase(id, phase),
            BuildEvent::Step {
                index,
                total,
                title,
            } => self.build_log(id, format!("[{index}/{total}] {title}")),
            BuildEvent::Log(line) => self.build_log(id, line),
            // Several a second while a layer is downloaded, verified or unpacked: kept
            // for the status endpoint, not logged (the pipeline logs each layer's end of
            // each stage as a line of its own).
            BuildEvent::LayerProgress(p) => {
                if let Some(b) = self.builds.live.lock().expect("builds").get_mut(id) {
                    b.layer(p);
                }
            }
            // Kinds of progress this version does not know are shown as they are.
            other => self.build_log(id, format!("{other:?}")),
        }
    }

    /// Appends a line to a running job's log.
    fn build_log(&self, id: &str, line: String) {
        tracing::debug!(build = %id, "{line}");
        if let Some(b) = self.builds.live.lock().expect("builds").get_mut(id) {
            b.push(line);
        }
    }

    /// Moves a running job to `phase` (recorded with its log so far).
    fn set_build_phase(&self, id: &str, phase: BuildPhase) {
        let (logs, count) = {
            let mut live = self.builds.live.lock().expect("builds");
            let Some(b) = live.get_mut(id) else { return };
            if b.phase == phase || phase.is_final() {
                return;
            }
            b.phase = phase;
            b.push(format!("== {phase}"));
            (b.logs.iter().cloned().collect::<Vec<_>>(), b.log_count)
        };
        tracing::info!(build = %id, %phase, "template build");
        if let Err(e) = self
            .store
            .update_build(id, phase.as_str(), &logs, count, now_ms())
        {
            tracing::error!(build = %id, error = %e, "cannot record the build's phase");
        }
    }

    /// Records the end of a job and forgets its live state.
    fn end_build(&self, id: &str, result: Result<&Template, Failure>) {
        match &result {
            Ok(t) => self.build_log(id, format!("template '{}' is ready", t.name)),
            Err(f) => self.build_log(id, format!("failed: {}", f.message)),
        }
        let Some(live) = self.builds.live.lock().expect("builds").remove(id) else {
            return;
        };
        let logs: Vec<BuildLogLine> = live.logs.into_iter().collect();
        let failed_phase = live.phase.as_str();
        let error = result
            .as_ref()
            .err()
            .map(|f| (f.message.as_str(), f.fault, failed_phase));
        match self
            .store
            .finish_build(id, error, &logs, live.log_count, now_ms())
        {
            Ok(r) => tracing::info!(build = %id, template = %r.template, phase = %r.phase,
                error = r.error.as_deref().unwrap_or(""), "template build ended"),
            Err(e) => tracing::error!(build = %id, error = %e, "cannot record the build's end"),
        }
    }

    /// Deletes a template its job installed but could not make ready.
    async fn remove_half_template(&self, id: &str, template: &Template) {
        let templates = self.templates.clone();
        let name = template.name.clone();
        let removed = tokio::task::spawn_blocking(move || templates.remove(&name)).await;
        match removed {
            Ok(Ok(())) | Ok(Err(TemplateError::NotFound { .. })) => {}
            Ok(Err(e)) => {
                tracing::error!(build = %id, error = %e, "cannot remove the failed template")
            }
            Err(e) => tracing::error!(build = %id, error = %e, "cannot remove the failed template"),
        }
    }

    /// The build `build_id` of the template `template` (by the name the job was
    /// submitted for), with its live log if it is running, and the latest progress of
    /// each layer of its image while it runs (empty once it ended, or if it has none).
    pub fn template_build(
        &self,
        template: &str,
        build_id: &str,
    ) -> Result<(BuildRecord, Vec<LayerProgress>), ControlError> {
        let not_found = || ControlError::BuildNotFound(build_id.to_owned());
        let mut record = self.store.get_build(build_id)?.ok_or_else(not_found)?;
        let same_template = record.template == template
            || self
                .template(template)
                .is_ok_and(|t| t.name == record.template);
        if !same_template {
            return Err(not_found());
        }
        let mut layers = Vec::new();
        if let Some(live) = self.builds.live.lock().expect("builds").get(build_id) {
            record.phase = live.phase.as_str().to_owned();
            record.logs = live.logs.iter().cloned().collect();
            record.log_count = live.log_count;
            layers = live.layers.clone();
        }
        Ok((record, layers))
    }

    /// Every build of the template `name` (by its own name), oldest first.
    pub fn template_builds(&self, name: &str) -> Result<Vec<BuildRecord>, ControlError> {
        let mut builds = self.store.builds_of(name)?;
        let live = self.builds.live.lock().expect("builds");
        for b in &mut builds {
            if let Some(l) = live.get(&b.id) {
                b.phase = l.phase.as_str().to_owned();
            }
        }
        Ok(builds)
    }

    /// The installed template `name` (by name or alias), everything `template.json`
    /// says.
    pub fn template_details(&self, name: &str) -> Result<Template, ControlError> {
        self.template_by_name(name)
    }

    fn template_by_name(&self, name: &str) -> Result<Template, ControlError> {
        let parsed: TemplateName = name
            .parse()
            .map_err(|_| ControlError::TemplateNotFound(name.to_owned()))?;
        self.templates.get(&parsed).map_err(|e| match e {
            TemplateError::NotFound { .. } => ControlError::TemplateNotFound(name.to_owned()),
            other => other.into(),
        })
    }

    /// Deletes the template `name` (by name or alias) and its build records.
    ///
    /// Errors: not found; [`ControlError::Conflict`] while a running or paused sandbox
    /// is of it, a snapshot needs its layer, another template is built on it, or a
    /// build of it runs, naming them.
    pub async fn delete_template(&self, name: &str) -> Result<(), ControlError> {
        let template = self.template_by_name(name)?;
        self.refuse_if_used(&template, "delete")?;
        let templates = self.templates.clone();
        let own = template.name.clone();
        tokio::task::spawn_blocking(move || templates.remove(&own))
            .await
            .map_err(|e| ControlError::Unavailable(format!("removing the template: {e}")))??;
        self.store.delete_builds_of(template.name.as_str())?;
        tracing::info!(template = %template.name, "template deleted");
        Ok(())
    }

    /// [`ControlError::Conflict`] saying what uses `template`, if anything does.
    fn refuse_if_used(&self, template: &Template, what: &str) -> Result<(), ControlError> {
        let name = template.name.as_str();
        let mut uses = Vec::new();
        if let Some(b) = self
            .store
            .unfinished_builds()?
            .into_iter()
            .find(|b| b.template == name)
        {
            uses.push(format!("a build is running (build {}, {})", b.id, b.phase));
        }
        let sandboxes: Vec<String> = self
            .store
            .live_sandboxes()?
            .into_iter()
            .filter(|s| {
                s.template == name
                    && matches!(s.state, SandboxState::Running | SandboxState::Paused)
            })
            .map(|s| format!("{} ({})", s.id, s.state))
            .collect();
        if !sandboxes.is_empty() {
            uses.push(format!("sandboxes {}", listed(&sandboxes)));
        }
        let snapshots: Vec<String> = self
            .store
            .snapshots_using_layer(&template.rootfs)?
            .into_iter()
            .map(|s| s.id)
            .collect();
        if !snapshots.is_empty() {
            uses.push(format!("snapshots {}", listed(&snapshots)));
        }
        let children: Vec<String> = self
            .templates
            .list()?
            .into_iter()
            .filter(|t| t.parent() == Some(name))
            .map(|t| t.name.to_string())
            .collect();
        if !children.is_empty() {
            uses.push(format!("templates built on it: {}", listed(&children)));
        }
        if uses.is_empty() {
            return Ok(());
        }
        Err(ControlError::Conflict(format!(
            "cannot {what} template '{name}': it is in use: {}",
            uses.join("; ")
        )))
    }

    /// After a restart: jobs the restart cut short are failed, and what they left
    /// (a half-built directory, a template installed but not made ready) removed.
    pub(super) async fn reconcile_builds(&self) -> Result<(), ControlError> {
        for b in self.store.unfinished_builds()? {
            tracing::warn!(build = %b.id, template = %b.template, phase = %b.phase,
                "template build cut short by a restart");
            // A new template's name was free when the job was submitted, so whatever
            // has it now is the job's; a rebuild replaced the old one only at its end.
            let ours = !b.rebuild || b.phase == BuildPhase::Snapshotting.as_str();
            if let (true, Ok(name)) = (ours, b.template.parse::<TemplateName>()) {
                let templates = self.templates.clone();
                let removed = tokio::task::spawn_blocking(move || templates.remove(&name))
                    .await
                    .map_err(|e| ControlError::Unavailable(format!("removing: {e}")))?;
                match removed {
                    Ok(()) => {
                        tracing::warn!(template = %b.template, "removed a half-built template")
                    }
                    Err(TemplateError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.store.finish_build(
                &b.id,
                Some((RESTARTED, BuildFault::Internal, &b.phase)),
                &b.logs,
                b.log_count,
                now_ms(),
            )?;
        }
        let templates = self.templates.clone();
        let removed = tokio::task::spawn_blocking(move || templates.remove_leftovers())
            .await
            .map_err(|e| ControlError::Unavailable(format!("removing: {e}")))??;
        for path in removed {
            tracing::warn!(path = %path.display(), "removed what an interrupted build left");
        }
        Ok(())
    }
}

/// Refuses requests that cannot make a template, before anything is queued.
fn check_image_request(r: &ImageBuildRequest) -> Result<(), ControlError> {
    let bad = |m: String| Err(ControlError::InvalidInput(m));
    if r.image.trim().is_empty() {
        return bad(
            "image is required: a registry reference or a path on the daemon's host".into(),
        );
    }
    let d = &r.defaults;
    if let Some(cpu) = d.cpu_count {
        let (min, max) = Limits::CPU;
        if !(min..=max).contains(&u64::from(cpu)) {
            return bad(format!(
                "cpuCount must be between {min} and {max}, got {cpu}"
            ));
        }
    }
    if let Some(mem) = d.memory_mb {
        let (min, max) = Limits::MEMORY_MB;
        if !(min..=max).contains(&mem) {
            return bad(format!(
                "memoryMB must be between {min} and {max}, got {mem}"
            ));
        }
    }
    if d.writable_layer_mib == Some(0) {
        return bad("writableLayerSizeMB must be at least 1".into());
    }
    if d.expose_ports.contains(&0) {
        return bad("exposePorts: 0 is not a port".into());
    }
    if let Some(p) = &d.probe {
        if p.port == 0 {
            return bad("probe.port: 0 is not a port".into());
        }
        if !p.path.starts_with('/') {
            return bad(format!("probe.path must start with '/', got {:?}", p.path));
        }
        if p.timeout_secs == 0 {
            return bad("probe.timeoutSecs must be at least 1".into());
        }
    }
    for (k, _) in &r.overrides.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return bad(format!("env: invalid variable name {k:?}"));
        }
    }
    if r.overrides
        .cmd
        .as_deref()
        .is_some_and(|c| c.trim().is_empty())
    {
        return bad("cmd must not be empty".into());
    }
    Ok(())
}

/// Up to five names, then how many more.
fn listed(items: &[String]) -> String {
    let shown = items.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    match items.len() {
        n if n > 5 => format!("{shown} and {} more", n - 5),
        _ => shown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubicle_template::LayerStage;

    #[test]
    fn a_live_build_keeps_the_latest_progress_of_each_layer_in_order() {
        let mut b = LiveBuild::new();
        let p = |index, stage, done| LayerProgress {
            index,
            count: 3,
            digest: format!("sha256:{index}"),
            stage,
            done,
            total: 100,
            cached: false,
        };
        b.layer(p(2, LayerStage::Downloading, 0));
        b.layer(p(1, LayerStage::Downloading, 100));
        b.layer(p(2, LayerStage::Downloading, 40));
        b.layer(p(3, LayerStage::Downloading, 100));
        b.layer(p(2, LayerStage::Downloading, 100));
        b.layer(p(1, LayerStage::Unpacking, 10));
        assert_eq!(
            b.layers,
            [
                p(1, LayerStage::Unpacking, 10),
                p(2, LayerStage::Downloading, 100),
                p(3, LayerStage::Downloading, 100),
            ]
        );
        assert!(b.logs.is_empty(), "progress is not logged");
    }

    #[test]
    fn the_store_knows_every_phase() {
        assert_eq!(
            cubicle_store::BUILD_PHASES,
            BuildPhase::ALL.map(BuildPhase::as_str)
        );
    }

    #[test]
    fn lists() {
        let items: Vec<String> = (0..7).map(|i| format!("s{i}")).collect();
        assert_eq!(listed(&items[..2]), "s0, s1");
        assert_eq!(listed(&items), "s0, s1, s2, s3, s4 and 2 more");
    }

    #[test]
    fn bad_requests_are_refused_before_queueing() {
        let ok = ImageBuildRequest {
            image: "/images/x".into(),
            ..Default::default()
        };
        assert!(check_image_request(&ok).is_ok());
        let with = |f: &dyn Fn(&mut ImageBuildRequest)| {
            let mut r = ok.clone();
            f(&mut r);
            check_image_request(&r).unwrap_err().to_string()
        };
        assert!(with(&|r| r.image = " ".into()).contains("image is required"));
        assert!(with(&|r| r.defaults.cpu_count = Some(0)).contains("cpuCount"));
        assert!(with(&|r| r.defaults.memory_mb = Some(1)).contains("memoryMB"));
        assert!(with(&|r| r.defaults.expose_ports = vec![0]).contains("exposePorts"));
        assert!(with(&|r| {
            r.defaults.probe = Some(cubicle_template::Probe {
                port: 80,
                path: "x".into(),
                timeout_secs: 5,
            })
        })
        .contains("must start with '/'"));
        assert!(with(&|r| r.overrides.env = vec![("A=B".into(), "c".into())]).contains("env"));
    }
}
