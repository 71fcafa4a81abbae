//! Building a template from a [`Recipe`]: debootstrap, configure and trim in a chroot,
//! shift the owners, install atomically. Layered recipes (with a parent) are built by
//! [`crate::layer`] instead, after their parent.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;

use crate::error::{IoContext, TemplateError};
use crate::meta::{now_unix, rfc3339_utc, Template, TemplateMeta};
use crate::mirror::{host_mirror, validate_mirror};
use crate::recipe::{Recipe, BASE};
use crate::shift::shift_ownership;
use crate::store::{TemplateStore, ROOTFS_DIR};

/// How many [`BuildEvent::Step`]s a build goes through.
pub const BUILD_STEPS: usize = 6;

/// How many trailing output lines a failed step's error carries.
const TAIL_LINES: usize = 20;

/// `PATH` for every program the build runs (the caller's may lack the sbin dirs).
pub(crate) const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Options of one build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Debian mirror URL; `None` takes the one the host's apt sources use.
    pub mirror: Option<String>,
    /// Build even if the installed template is current.
    pub rebuild: bool,
    /// Added to every uid/gid of the root filesystem; normally
    /// [`cubicle_core::uid_map::HOST_BASE`].
    pub uid_shift: u32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            mirror: None,
            rebuild: false,
            uid_shift: cubicle_core::uid_map::HOST_BASE,
        }
    }
}

/// What a build did.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildOutcome {
    /// The installed template was already built from this recipe; nothing was done.
    UpToDate(Template),
    /// A new template was built and installed.
    Built(Template),
}

impl BuildOutcome {
    /// The installed template, either way.
    pub fn template(&self) -> &Template {
        match self {
            BuildOutcome::UpToDate(t) | BuildOutcome::Built(t) => t,
        }
    }
}

/// Progress of a build, for display.
///
/// Not exhaustive: consumers outside this crate show events they do not know as log
/// lines, so new kinds of progress can be added without breaking them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BuildEvent {
    /// A new phase starts (`index` counts from 1 to `total`).
    Step {
        /// The phase's number, from 1.
        index: usize,
        /// How many phases there are.
        total: usize,
        /// What the phase does, in lowercase words.
        title: String,
    },
    /// One line of output of a program run by the build (debootstrap's `I: ...` lines
    /// among them) or a note of the build itself.
    Log(String),
    /// The build entered a phase of its job (what `GET .../builds/{id}/status` shows).
    Phase(BuildPhase),
    /// Progress of one layer of an image: see [`LayerProgress`].
    LayerProgress(LayerProgress),
}

/// How far one layer of an image got in one [`LayerStage`]: sent when the stage starts
/// (`done` 0), at most every [`PROGRESS_EVERY`] while it runs, and when it is complete
/// (`done == total`). A registry layer found in the layer cache is sent once, complete,
/// with `cached` set. Serialised in camelCase, as the build status endpoint shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerProgress {
    /// The layer's number, from 1.
    pub index: usize,
    /// How many layers the image has.
    pub count: usize,
    /// The layer's digest, `sha256:<hex>` (for `docker save` layers, of the
    /// uncompressed tar).
    pub digest: String,
    /// What is being done with it.
    pub stage: LayerStage,
    /// Bytes of the layer's blob downloaded or read so far.
    pub done: u64,
    /// The size of the layer's blob in bytes (compressed, as stored).
    pub total: u64,
    /// Whether the layer was already in the cache (nothing downloaded).
    pub cached: bool,
}

/// What is done to a layer, in this order: registry layers are downloaded, every layer
/// is verified against its digest, then unpacked into the root filesystem.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LayerStage {
    /// Fetching the blob from the registry into the layer cache.
    Downloading,
    /// Reading the blob to check its digest.
    Verifying,
    /// Applying the layer's tar to the root filesystem.
    Unpacking,
}

impl LayerStage {
    /// Its name in the API: `downloading`, `verifying`, `unpacking`.
    pub fn as_str(self) -> &'static str {
        match self {
            LayerStage::Downloading => "downloading",
            LayerStage::Verifying => "verifying",
            LayerStage::Unpacking => "unpacking",
        }
    }
}

impl std::fmt::Display for LayerStage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often [`BuildEvent::LayerProgress`] is sent while a layer stage runs.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Decides when an intermediate [`LayerProgress`] is due: at most once every
/// [`PROGRESS_EVERY`] (the first and last events of a stage are sent by its caller).
#[derive(Debug)]
pub(crate) struct Throttle {
    last: Instant,
}

impl Throttle {
    /// A throttle whose stage (and first event) starts now.
    pub(crate) fn new() -> Self {
        Throttle {
            last: Instant::now(),
        }
    }

    /// Whether an event is due now (and if so, the next one is counted from now).
    pub(crate) fn due(&mut self) -> bool {
        self.due_at(Instant::now())
    }

    fn due_at(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last) < PROGRESS_EVERY {
            return false;
        }
        self.last = now;
        true
    }
}

/// The phases of a template build, in order; a build ends `Ready` or `Failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildPhase {
    /// Waiting for its turn (builds run one at a time).
    Queued,
    /// Fetching the image's manifest and layers (registry images; cached layers are
    /// not fetched again).
    Pulling,
    /// Verifying and unpacking the layers into the root filesystem (or, for a Debian
    /// recipe, installing its packages).
    Unpacking,
    /// Preparing the userland, shifting owners and installing the template.
    Building,
    /// Starting the template's service, waiting for its probe and checkpointing it
    /// (templates with a service only).
    Snapshotting,
    /// Done: sandboxes can start from it.
    Ready,
    /// Ended with an error; nothing of it is left.
    Failed,
}

impl BuildPhase {
    /// Its name in the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildPhase::Queued => "queued",
            BuildPhase::Pulling => "pulling",
            BuildPhase::Unpacking => "unpacking",
            BuildPhase::Building => "building",
            BuildPhase::Snapshotting => "snapshotting",
            BuildPhase::Ready => "ready",
            BuildPhase::Failed => "failed",
        }
    }

    /// Whether the build has ended.
    pub fn is_final(self) -> bool {
        matches!(self, BuildPhase::Ready | BuildPhase::Failed)
    }

    /// Every phase, in order.
    pub const ALL: [BuildPhase; 7] = [
        BuildPhase::Queued,
        BuildPhase::Pulling,
        BuildPhase::Unpacking,
        BuildPhase::Building,
        BuildPhase::Snapshotting,
        BuildPhase::Ready,
        BuildPhase::Failed,
    ];
}

impl std::str::FromStr for BuildPhase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        BuildPhase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown build phase {s:?}"))
    }
}

impl std::fmt::Display for BuildPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Builds the built-in `base` template (see [`crate::recipe::BASE`]).
pub fn build_base(
    store: &TemplateStore,
    opts: &BuildOptions,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<BuildOutcome, TemplateError> {
    build(store, &BASE, opts, on_event)
}

/// Builds the template of `recipe` into `store`, unless it is already built from the
/// same recipe and uid shift (and `opts.rebuild` is false), which returns at once.
///
/// A recipe with a parent is built as a layer on the parent's template, and the parent
/// first (recursively) if it is missing or outdated; `opts.rebuild` forces only the
/// template asked for.
///
/// Needs root, `chroot` and `unshare`, and `debootstrap` or `mount` (layers). Every
/// program runs in a private mount namespace, so nothing mounted during the build can
/// stay mounted on the host.
pub fn build(
    store: &TemplateStore,
    recipe: &Recipe,
    opts: &BuildOptions,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<BuildOutcome, TemplateError> {
    if let Some(parent) = recipe.parent {
        return crate::layer::build_layer(store, recipe, parent, opts, on_event);
    }
    let name = recipe.template_name()?;
    let hash = recipe.hash(opts.uid_shift);
    if !opts.rebuild {
        if let Some(t) = store.current(&name, &hash, opts.uid_shift) {
            return Ok(BuildOutcome::UpToDate(t));
        }
    }
    let started = Instant::now();
    step(on_event, 1, "checking requirements");
    let tools = Tools::find()?;
    let debootstrap_bin = tools.debootstrap()?;
    let mirror = match &opts.mirror {
        Some(m) => validate_mirror(m)?,
        None => host_mirror(recipe.suite)?,
    };
    on_event(BuildEvent::Log(format!("mirror: {mirror}")));
    let cache = store.data_dir().cache().join("debootstrap");
    std::fs::create_dir_all(&cache).ctx("create directory", &cache)?;

    store.install(
        &name,
        &hash,
        opts.uid_shift,
        opts.rebuild,
        on_event,
        &mut |dir, on_event| {
            let rootfs = dir.join(ROOTFS_DIR);
            step(
                on_event,
                2,
                &format!("installing packages (debootstrap {})", recipe.suite),
            );
            debootstrap(
                &tools,
                &debootstrap_bin,
                recipe,
                &rootfs,
                &mirror,
                &cache,
                on_event,
            )?;
            step(on_event, 3, "configuring");
            tools.run_in_chroot(&rootfs, recipe.configure_script, "configuring", on_event)?;
            step(on_event, 4, "trimming");
            tools.run_in_chroot(&rootfs, recipe.trim_script, "trimming", on_event)?;
            step(
                on_event,
                5,
                &format!("shifting owners by {}", opts.uid_shift),
            );
            let stats = shift_ownership(&rootfs, opts.uid_shift)?;
            step(on_event, 6, "installing");
            Ok(TemplateMeta {
                format_version: TemplateMeta::format_version_for(None),
                recipe: recipe.name.to_owned(),
                recipe_hash: hash.clone(),
                uid_shift: opts.uid_shift,
                built_at: rfc3339_utc(now_unix()),
                size_bytes: stats.bytes,
                file_count: stats.entries,
                build_seconds: build_seconds(started),
                mirror: mirror.clone(),
                parent: None,
                parent_built_at: None,
                aliases: recipe.aliases.iter().map(|a| a.to_string()).collect(),
                code_interpreter: recipe.code_interpreter,
                image: None,
                sandbox: Default::default(),
            })
        },
    )
}

/// Reports step `index` of a recipe build (plain or layer), and the job phase it starts:
/// installing packages (step 2) is `unpacking`, configuring (step 3) onwards `building`.
pub(crate) fn step(on_event: &mut dyn FnMut(BuildEvent), index: usize, title: &str) {
    match index {
        2 => on_event(BuildEvent::Phase(BuildPhase::Unpacking)),
        3 => on_event(BuildEvent::Phase(BuildPhase::Building)),
        _ => {}
    }
    report_step(on_event, index, BUILD_STEPS, title);
}

/// Reports step `index` of `total` of any build (recipe, layer or image): logged, and
/// sent as a [`BuildEvent::Step`].
pub(crate) fn report_step(
    on_event: &mut dyn FnMut(BuildEvent),
    index: usize,
    total: usize,
    title: &str,
) {
    tracing::info!("[{index}/{total}] {title}");
    on_event(BuildEvent::Step {
        index,
        total,
        title: title.to_owned(),
    });
}

/// A build's duration as recorded in `template.json`: seconds, to a tenth.
pub(crate) fn build_seconds(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 10.0).round() / 10.0
}

/// The programs a build runs, found on the host.
#[derive(Debug)]
pub(crate) struct Tools {
    pub(crate) chroot: PathBuf,
    pub(crate) unshare: PathBuf,
}

impl Tools {
    /// Checks that the build can run at all: root, and the programs every build needs.
    pub(crate) fn find() -> Result<Tools, TemplateError> {
        let uid = nix::unistd::geteuid();
        if !uid.is_root() {
            return Err(TemplateError::NotRoot { uid: uid.as_raw() });
        }
        Ok(Tools {
            chroot: find_tool("chroot", "coreutils")?,
            unshare: find_tool("unshare", "util-linux")?,
        })
    }

    /// `debootstrap`, which builds root filesystems.
    fn debootstrap(&self) -> Result<PathBuf, TemplateError> {
        find_tool("debootstrap", "debootstrap")
    }

    /// `unshare --mount --propagation private -- sh -c 'umask 022 && exec "$@"' sh
    /// <program> <args>`: whatever `program` mounts lives and dies in its own mount
    /// namespace, and the caller's umask does not leak into the root filesystem.
    fn isolated(&self, program: &Path) -> Command {
        let mut cmd = Command::new(&self.unshare);
        cmd.args(["--mount", "--propagation", "private", "--"])
            .args(["/bin/sh", "-c", "umask 022 && exec \"$@\"", "sh"])
            .arg(program)
            .env("PATH", CHILD_PATH)
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// Runs `script` with `/bin/sh -eu` as root inside `rootfs`.
    fn run_in_chroot(
        &self,
        rootfs: &Path,
        script: &str,
        what: &str,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), TemplateError> {
        let mut cmd = self.isolated(&self.chroot);
        cmd.env_clear()
            .env("PATH", CHILD_PATH)
            .env("HOME", "/root")
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg(rootfs)
            .args(["/bin/sh", "-eu", "-c", script, "sh"]);
        let run = run_streamed(cmd, on_event).ctx("run chroot in", rootfs)?;
        if run.status.success() {
            return Ok(());
        }
        Err(TemplateError::StepFailed {
            step: what.to_owned(),
            status: run.status.to_string(),
            tail: join_tail(&run.tail),
        })
    }
}

pub(crate) fn find_tool(
    tool: &'static str,
    package: &'static str,
) -> Result<PathBuf, TemplateError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(std::env::split_paths(CHILD_PATH))
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
        .ok_or(TemplateError::MissingTool { tool, package })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn debootstrap(
    tools: &Tools,
    debootstrap_bin: &Path,
    recipe: &Recipe,
    rootfs: &Path,
    mirror: &str,
    cache: &Path,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<(), TemplateError> {
    let mut cmd = tools.isolated(debootstrap_bin);
    cmd.arg(format!("--variant={}", recipe.variant))
        .arg(format!("--include={}", recipe.packages.join(",")))
        .arg("--cache-dir")
        .arg(cache)
        .arg(recipe.suite)
        .arg(rootfs)
        .arg(mirror);
    let run = run_streamed(cmd, on_event).ctx("run", debootstrap_bin)?;
    if run.status.success() {
        return Ok(());
    }
    // debootstrap's own log is the useful part and goes away with the build directory.
    let mut tail = run.tail;
    let log = rootfs.join("debootstrap/debootstrap.log");
    if let Ok(text) = std::fs::read_to_string(&log) {
        tail.push_back("--- end of debootstrap.log:".to_owned());
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(TAIL_LINES);
        tail.extend(lines[from..].iter().map(|l| l.to_string()));
    }
    Err(TemplateError::Debootstrap {
        mirror: mirror.to_owned(),
        status: run.status.to_string(),
        tail: join_tail(&tail),
    })
}

pub(crate) fn join_tail(tail: &VecDeque<String>) -> String {
    tail.iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How a streamed program ended.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    /// Its last [`TAIL_LINES`] lines of output.
    pub(crate) tail: VecDeque<String>,
}

/// Runs `cmd` with stdin from /dev/null and stdout and stderr merged into one pipe,
/// passing each output line to `on_event` as it comes.
pub(crate) fn run_streamed(
    mut cmd: Command,
    on_event: &mut dyn FnMut(BuildEvent),
) -> std::io::Result<Finished> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let write2: OwnedFd = write.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2));
    let spawned = cmd.spawn();
    // The write ends live in `cmd`: drop them, or the pipe never reaches EOF.
    drop(cmd);
    let mut child = spawned?;
    let mut tail = VecDeque::with_capacity(TAIL_LINES + 1);
    let mut reader = BufReader::new(File::from(read));
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        }
        let text = String::from_utf8_lossy(&buf);
        // Progress bars redraw with \r; keep only the final state of the line.
        let line = text
            .trim_end_matches(['\n', '\r'])
            .rsplit('\r')
            .next()
            .unwrap_or("")
            .trim_end();
        if line.is_empty() {
            continue;
        }
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
        on_event(BuildEvent::Log(line.to_owned()));
    }
    let status = child.wait()?;
    Ok(Finished { status, tail })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_merged_output_and_keeps_a_tail() {
        let mut cmd = Command::new("/bin/sh");
        cmd.args([
            "-c",
            "echo out1; echo err1 >&2; printf 'a\\rb\\r\\n'; i=0; while [ $i -lt 30 ]; do echo n$i; i=$((i+1)); done; exit 3",
        ]);
        let mut lines = Vec::new();
        let run = run_streamed(cmd, &mut |e| {
            if let BuildEvent::Log(l) = e {
                lines.push(l)
            }
        })
        .unwrap();
        assert_eq!(run.status.code(), Some(3));
        assert_eq!(&lines[..3], ["out1", "err1", "b"]);
        assert_eq!(lines.len(), 33);
        assert_eq!(run.tail.len(), TAIL_LINES);
        assert_eq!(run.tail.back().map(String::as_str), Some("n29"));
    }

    #[test]
    fn progress_is_throttled_to_one_event_per_interval() {
        let start = Instant::now();
        let mut t = Throttle { last: start };
        let ms = |n| start + Duration::from_millis(n);
        // Right after the start event: nothing; then one per 100 ms, however many reads.
        let due: Vec<u64> = (0..=350).step_by(10).filter(|&n| t.due_at(ms(n))).collect();
        assert_eq!(due, [100, 200, 300]);
        // A clock that goes backwards (never, but) is not due.
        assert!(!t.due_at(start));
        assert_eq!(LayerStage::Unpacking.to_string(), "unpacking");
        assert!(LayerStage::Downloading < LayerStage::Verifying);
        let p = LayerProgress {
            index: 2,
            count: 3,
            digest: "sha256:ab".into(),
            stage: LayerStage::Verifying,
            done: 5,
            total: 10,
            cached: false,
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"index": 2, "count": 3, "digest": "sha256:ab",
                "stage": "verifying", "done": 5, "total": 10, "cached": false})
        );
    }

    #[test]
    fn missing_program_is_an_error() {
        let cmd = Command::new("/nonexistent/program");
        assert!(run_streamed(cmd, &mut |_| {}).is_err());
    }

    #[test]
    fn missing_tool_names_the_package() {
        let err = find_tool("cubicle-no-such-tool", "some-package").unwrap_err();
        assert!(err.to_string().contains("apt-get install some-package"));
        assert_eq!(err.kind(), cubicle_core::ErrorKind::Unavailable);
        assert!(find_tool("sh", "dash").is_ok());
    }

    #[test]
    fn up_to_date_template_returns_without_building() {
        // No root, no debootstrap, no mirror needed when the template is current.
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(cubicle_core::DataDir::new(tmp.path()));
        let opts = BuildOptions {
            mirror: Some("not a url".into()),
            ..BuildOptions::default()
        };
        let dir = tmp.path().join("templates/base");
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let meta = TemplateMeta {
            format_version: 1,
            recipe: "base".into(),
            recipe_hash: BASE.hash(opts.uid_shift),
            uid_shift: opts.uid_shift,
            built_at: rfc3339_utc(0),
            size_bytes: 1,
            file_count: 1,
            build_seconds: 1.0,
            mirror: "http://m/debian".into(),
            parent: None,
            parent_built_at: None,
            aliases: Vec::new(),
            code_interpreter: false,
            image: None,
            sandbox: Default::default(),
        };
        std::fs::write(
            dir.join("template.json"),
            serde_json::to_vec(&meta).unwrap(),
        )
        .unwrap();
        let mut events = Vec::new();
        let out = build_base(&store, &opts, &mut |e| events.push(e)).unwrap();
        assert!(matches!(out, BuildOutcome::UpToDate(ref t) if t.meta == meta));
        assert!(events.is_empty());
        // With --rebuild the invalid mirror is noticed (or, unprivileged, missing root).
        let opts = BuildOptions {
            rebuild: true,
            ..opts
        };
        let err = build_base(&store, &opts, &mut |_| {}).unwrap_err();
        assert!(
            matches!(
                err,
                TemplateError::InvalidMirror { .. }
                    | TemplateError::NotRoot { .. }
                    | TemplateError::MissingTool { .. }
            ),
            "{err}"
        );
    }

    fn write_meta(dir: &Path, meta: &TemplateMeta) {
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::write(dir.join("template.json"), serde_json::to_vec(meta).unwrap()).unwrap();
    }

    #[test]
    fn layered_template_is_up_to_date_only_on_its_parent_build() {
        use crate::recipe::CODE_INTERPRETER;
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(cubicle_core::DataDir::new(tmp.path()));
        let opts = BuildOptions {
            mirror: Some("not a url".into()),
            ..BuildOptions::default()
        };
        let base = TemplateMeta {
            format_version: 1,
            recipe: "base".into(),
            recipe_hash: BASE.hash(opts.uid_shift),
            uid_shift: opts.uid_shift,
            built_at: rfc3339_utc(100),
            size_bytes: 1,
            file_count: 1,
            build_seconds: 1.0,
            mirror: "http://m/debian".into(),
            parent: None,
            parent_built_at: None,
            aliases: Vec::new(),
            code_interpreter: false,
            image: None,
            sandbox: Default::default(),
        };
        write_meta(&tmp.path().join("templates/base"), &base);
        let child = TemplateMeta {
            format_version: 2,
            recipe: CODE_INTERPRETER.name.into(),
            recipe_hash: CODE_INTERPRETER.hash(opts.uid_shift),
            parent: Some("base".into()),
            parent_built_at: Some(base.built_at.clone()),
            aliases: vec!["code-interpreter-v1".into()],
            code_interpreter: true,
            ..base.clone()
        };
        let child_dir = tmp.path().join("templates/code-interpreter");
        write_meta(&child_dir, &child);
        let mut events = Vec::new();
        // By name or by alias, nothing to do.
        for name in ["code-interpreter", "code-interpreter-v1"] {
            let recipe = Recipe::builtin(name).unwrap();
            let out = build(&store, recipe, &opts, &mut |e| events.push(e)).unwrap();
            assert!(matches!(out, BuildOutcome::UpToDate(ref t) if t.meta == child));
        }
        assert!(events.is_empty());

        // The parent was rebuilt since: the child is built again (here it fails early on
        // the mirror, after finding the parent up to date).
        write_meta(
            &child_dir,
            &TemplateMeta {
                parent_built_at: Some(rfc3339_utc(50)),
                ..child.clone()
            },
        );
        let err = build(&store, &CODE_INTERPRETER, &opts, &mut |e| events.push(e)).unwrap_err();
        assert!(
            matches!(
                err,
                TemplateError::InvalidMirror { .. }
                    | TemplateError::NotRoot { .. }
                    | TemplateError::MissingTool { .. }
            ),
            "{err}"
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, BuildEvent::Log(l) if l.starts_with("building 'base' first"))),
            "the current parent was not rebuilt: {events:?}"
        );
    }
}
