//! `cubicle tpl ...`: templates. Built-in templates are built locally through the
//! template pipeline (`tpl build`, which `scripts/setup` runs before any daemon);
//! templates from images are built by the daemon as jobs, which `create-from-image`
//! and `rebuild` submit and follow; `ls`, `info` and `rm` ask the daemon when an API
//! key is set and read the data dir otherwise.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cubicle_client::{ApiClient, BuildStarted, ClientError, ImageBuild, ImageProbe};
use cubicle_core::{uid_map, DataDir, TemplateName};
use cubicle_template::{
    BuildEvent, BuildOptions, BuildOutcome, BuildPhase, Recipe, Template, TemplateMeta,
    TemplateSource, TemplateStore,
};

use super::layer_bars::LayerBars;
use crate::args::{
    TplBuildArgs, TplCommand, TplCreateFromImageArgs, TplInfoArgs, TplRebuildArgs, TplRmArgs,
};

/// How often a followed build's status is asked for.
const POLL: Duration = Duration::from_millis(200);

/// Runs one `tpl` subcommand.
pub fn run(
    data: &DataDir,
    agent_bin: Option<std::path::PathBuf>,
    cmd: TplCommand,
) -> anyhow::Result<ExitCode> {
    let store = TemplateStore::new(data.clone());
    match cmd {
        TplCommand::Build(args) => build(&store, args),
        TplCommand::CreateFromImage(args) if args.local => {
            create_local(data, agent_bin, &store, *args)
        }
        TplCommand::CreateFromImage(args) => super::block_on(create_from_image(*args)),
        TplCommand::Ls(args) if !args.local && api_key_in_env() => {
            super::block_on(ls_api(args.json))
        }
        TplCommand::Ls(args) => ls(&store, args.json),
        TplCommand::Info(args) if !args.local && api_key_in_env() => {
            super::block_on(info_api(args))
        }
        TplCommand::Info(args) => info_local(&store, args),
        TplCommand::Rm(args) => rm(&store, args),
        TplCommand::Rebuild(args) => rebuild(&store, args),
    }
}

fn build(store: &TemplateStore, args: TplBuildArgs) -> anyhow::Result<ExitCode> {
    let recipe = Recipe::builtin(&args.name)?;
    let opts = BuildOptions {
        mirror: args.mirror,
        rebuild: args.rebuild,
        uid_shift: uid_map::HOST_BASE,
    };
    let mut progress = Progress::new(args.verbose);
    let outcome =
        cubicle_template::build_template(store, &TemplateSource::Recipe(recipe), &opts, &mut |e| {
            progress.event(e)
        });
    progress.flush();
    let outcome = outcome.with_context(|| format!("building template '{}'", recipe.name))?;
    match outcome {
        BuildOutcome::UpToDate(t) => {
            println!("{} is up to date (built {})", t.name, built_when(&t.meta));
        }
        BuildOutcome::Built(t) => {
            let layer = t
                .parent()
                .map(|p| format!(" (a layer on {p})"))
                .unwrap_or_default();
            println!(
                "built {} in {:.1} s: {}, {} files{layer}, in {}",
                t.name,
                t.meta.build_seconds,
                human_bytes(t.meta.size_bytes),
                t.meta.file_count,
                t.dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tpl create-from-image --local`: the pipeline in this process, on the data dir, and
/// for a template with a service the snapshotting phase in this process's own runtime.
fn create_local(
    data: &DataDir,
    agent_bin: Option<std::path::PathBuf>,
    store: &TemplateStore,
    args: TplCreateFromImageArgs,
) -> anyhow::Result<ExitCode> {
    let name: TemplateName = match &args.template_id {
        Some(id) => id.parse()?,
        None => cubicle_template::oci::generated_template_name().parse()?,
    };
    let request = image_request(&args);
    let source = TemplateSource::Image {
        name: name.clone(),
        request: Box::new(request),
    };
    let mut progress = Progress::new(true);
    let built =
        cubicle_template::build_template(store, &source, &BuildOptions::default(), &mut |e| {
            progress.event(e)
        });
    progress.flush();
    let t = built
        .with_context(|| format!("building template '{name}' from {}", args.image))?
        .template()
        .clone();
    let prepared = if t.meta.sandbox.service.is_some() {
        progress.event(BuildEvent::Phase(BuildPhase::Snapshotting));
        let prepared = super::block_on(async {
            let runtime = super::ns_runtime(data, agent_bin)?;
            let limits = cubicle_core::Limits::default();
            cubicle_control::prepare_template(&runtime, store, &t, limits, 1 << 30)
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))
        });
        match prepared {
            Ok(p) => p,
            Err(e) => {
                if let Err(rm) = store.remove(&t.name) {
                    eprintln!("removing the template after the failure: {rm}");
                }
                return Err(e.context(format!(
                    "building template '{name}' from {}: its service did not become ready",
                    args.image
                )));
            }
        }
    } else {
        None
    };
    progress.event(BuildEvent::Phase(BuildPhase::Ready));
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &t)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let layers = t.meta.image.as_ref().map_or(0, |i| i.layers);
    writeln!(
        out,
        "built {} from {} in {:.1} s: {} layers, {}, {} files, in {}",
        t.name,
        args.image,
        t.meta.build_seconds,
        layers,
        human_bytes(t.meta.size_bytes),
        t.meta.file_count,
        t.dir.display()
    )?;
    write_service(&mut out, &t.meta)?;
    if let Some(p) = prepared {
        writeln!(out, "{}", p.summary())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The build request `tpl create-from-image --local`'s flags make.
fn image_request(args: &TplCreateFromImageArgs) -> cubicle_template::ImageBuildRequest {
    cubicle_template::ImageBuildRequest {
        image: args.image.clone(),
        registry_auth: match (&args.registry_username, &args.registry_password) {
            (Some(username), Some(password)) => Some(cubicle_template::RegistryAuth {
                username: username.clone(),
                password: password.clone(),
            }),
            _ => None,
        },
        overrides: cubicle_template::RunOverrides {
            cmd: args.cmd.clone(),
            args: args.args.clone(),
            env: args.env.clone(),
            workdir: args.workdir.clone(),
            user: args.user.clone(),
        },
        defaults: cubicle_template::SandboxDefaults {
            cpu_count: args.cpu,
            memory_mb: args.memory,
            writable_layer_mib: args.writable_layer_size,
            expose_ports: args.expose_ports.clone(),
            probe: args.probe.map(|port| cubicle_template::Probe {
                port,
                path: args.probe_path.clone(),
                timeout_secs: args.probe_timeout,
            }),
            ..Default::default()
        },
    }
}

/// `tpl create-from-image`: submits the build to the daemon and follows it.
async fn create_from_image(args: TplCreateFromImageArgs) -> anyhow::Result<ExitCode> {
    let api = daemon("tpl create-from-image")?;
    let request = image_build(&args);
    let started = api
        .build_image(&request)
        .await
        .map_err(|e| super::explain(e.into(), &api))?;
    follow(&api, &started, &args.image, args.json).await
}

/// The request `tpl create-from-image`'s flags make. A path that exists here is sent
/// absolute (the daemon resolves it on the same host).
fn image_build(args: &TplCreateFromImageArgs) -> ImageBuild {
    let path = std::path::Path::new(&args.image);
    let image = match std::path::absolute(path) {
        Ok(abs) if path.exists() => abs.display().to_string(),
        _ => args.image.clone(),
    };
    ImageBuild {
        image,
        template_id: args.template_id.clone(),
        registry_username: args.registry_username.clone(),
        registry_password: args.registry_password.clone(),
        writable_layer_size_mb: args.writable_layer_size,
        expose_ports: args.expose_ports.clone(),
        probe: args.probe.map(|port| ImageProbe {
            port,
            path: args.probe_path.clone(),
            timeout_secs: args.probe_timeout,
        }),
        cmd: args.cmd.clone(),
        args: args.args.clone(),
        env: args.env.iter().cloned().collect(),
        workdir: args.workdir.clone(),
        user: args.user.clone(),
        cpu_count: args.cpu,
        memory_mb: args.memory,
    }
}

/// The daemon's client, for a command that needs one.
fn daemon(command: &str) -> anyhow::Result<ApiClient> {
    ApiClient::from_env().map_err(|e| match e {
        ClientError::NoApiKey => anyhow::anyhow!(
            "`cubicle {command}` builds through the daemon: {e} (and E2B_API_URL if it \
             does not listen on the default address)"
        ),
        other => other.into(),
    })
}

/// Follows a build: phases and log lines on stderr as they come (among them one line
/// per layer and stage as it completes), and on a terminal a progress bar of the layer
/// being downloaded, verified or unpacked; exit 0 with the template's summary (or its
/// JSON) when it is ready, 1 with the reason when it failed.
async fn follow(
    api: &ApiClient,
    started: &BuildStarted,
    image: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    eprintln!(
        "build {} of template {}: {}",
        started.build_id, started.template_id, started.phase
    );
    let mut offset = 0;
    let mut bars = LayerBars::for_stderr();
    let status = loop {
        let status = api
            .build_status(&started.template_id, &started.build_id, offset)
            .await
            .map_err(|e| {
                anyhow::Error::from(e).context(format!(
                    "following build {} of template {}",
                    started.build_id, started.template_id
                ))
            })?;
        offset = status
            .next_logs_offset
            .unwrap_or(offset + status.logs.len() as u64);
        if !status.logs.is_empty() {
            bars.clear();
        }
        for line in &status.logs {
            if line.starts_with("== ") || line.starts_with('[') {
                eprintln!("{line}");
            } else {
                eprintln!("    {line}");
            }
        }
        if status.is_finished() {
            bars.clear();
            break status;
        }
        match status.layers.iter().find(|l| !l.cached && !l.is_complete()) {
            Some(l) => bars.update(
                l.index, l.count, &l.digest, &l.stage, l.done, l.total, l.cached,
            ),
            None => bars.clear(),
        }
        tokio::time::sleep(POLL).await;
    };
    if status.status != "ready" {
        let reason = status.reason.as_ref();
        let message = reason.map_or("no reason given", |r| r.message.as_str());
        let phase = reason
            .and_then(|r| r.step.as_deref())
            .map(|s| format!(" while {s}"))
            .unwrap_or_default();
        eprintln!(
            "error: building template '{}' failed{phase}: {message}",
            started.template_id
        );
        return Ok(ExitCode::from(1));
    }
    let t = api.template(&started.template_id).await?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &t)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let meta: Option<TemplateMeta> = t.meta.clone().and_then(|m| serde_json::from_value(m).ok());
    match meta {
        Some(meta) => {
            let layers = meta.image.as_ref().map_or(0, |i| i.layers);
            writeln!(
                out,
                "built {} from {image} in {:.1} s: {layers} layers, {}, {} files",
                t.template_id,
                meta.build_seconds,
                human_bytes(meta.size_bytes),
                meta.file_count,
            )?;
            write_service(&mut out, &meta)?;
        }
        None => writeln!(out, "built {} from {image}", t.template_id)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The service and exposed ports of a template just built, if it has them.
fn write_service(out: &mut impl Write, meta: &TemplateMeta) -> std::io::Result<()> {
    let sandbox = &meta.sandbox;
    if let Some(service) = &sandbox.service {
        writeln!(
            out,
            "service: {} as {} in {}",
            cubicle_template::run_config::shell_words(&service.argv),
            service.user.as_deref().unwrap_or("root"),
            service.workdir.as_deref().unwrap_or("/")
        )?;
    }
    if !sandbox.expose_ports.is_empty() {
        let ports: Vec<String> = sandbox.expose_ports.iter().map(u16::to_string).collect();
        writeln!(
            out,
            "exposed ports: {} (reachable as {{port}}-{{sandbox id}}.{{domain}})",
            ports.join(", ")
        )?;
    }
    Ok(())
}

/// `tpl rm`: through the daemon when a key is set and it answers, else the data dir.
fn rm(store: &TemplateStore, args: TplRmArgs) -> anyhow::Result<ExitCode> {
    if !args.local && api_key_in_env() {
        let api = ApiClient::from_env()?;
        match super::block_on(api.delete_template(&args.name)) {
            Ok(()) => {
                eprintln!("removed template {}", args.name);
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) if e.is_unreachable() => {
                eprintln!(
                    "note: {e}; removing it from {} directly",
                    store.dir().display()
                );
            }
            Err(e) => return Err(super::explain(e.into(), &api)),
        }
    }
    let name: TemplateName = args.name.parse()?;
    store.remove(&name)?;
    eprintln!("removed template {name}");
    Ok(ExitCode::SUCCESS)
}

/// `tpl rebuild`: built-in templates locally, image templates through a daemon job.
fn rebuild(store: &TemplateStore, args: TplRebuildArgs) -> anyhow::Result<ExitCode> {
    if Recipe::builtin(&args.name).is_ok() {
        return build(
            store,
            TplBuildArgs {
                name: args.name,
                rebuild: true,
                mirror: args.mirror,
                verbose: false,
            },
        );
    }
    super::block_on(async {
        let api = daemon("tpl rebuild")?;
        let registry = args
            .registry_username
            .as_deref()
            .zip(args.registry_password.as_deref());
        let started = api
            .rebuild_template(&args.name, registry)
            .await
            .map_err(|e| super::explain(e.into(), &api))?;
        let source = api
            .template(&started.template_id)
            .await
            .ok()
            .and_then(|t| t.meta)
            .and_then(|m| m["image"]["source"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "its image".into());
        follow(&api, &started, &source, args.json).await
    })
}

/// `tpl info` from the data dir.
fn info_local(store: &TemplateStore, args: TplInfoArgs) -> anyhow::Result<ExitCode> {
    let name: TemplateName = args.name.parse()?;
    let t = store.get(&name)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &t)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    write!(out, "{}", describe(t.name.as_str(), &t.meta, &[]))?;
    Ok(ExitCode::SUCCESS)
}

/// `tpl info` through the daemon (`GET /templates/{id}`), with its builds.
async fn info_api(args: TplInfoArgs) -> anyhow::Result<ExitCode> {
    let api = ApiClient::from_env()?;
    let t = api
        .template(&args.name)
        .await
        .map_err(|e| super::explain(e.into(), &api))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &t)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let meta: TemplateMeta = serde_json::from_value(t.meta.clone().unwrap_or_default())
        .context("the daemon's answer has no readable template.json (meta)")?;
    let builds: Vec<String> = t
        .builds
        .iter()
        .flatten()
        .map(|b| {
            let mut line = format!(
                "{} {} {}",
                b["buildID"].as_str().unwrap_or("?"),
                b["phase"].as_str().or(b["status"].as_str()).unwrap_or("?"),
                b["createdAt"].as_str().unwrap_or("")
            );
            if let Some(m) = b["reason"]["message"].as_str() {
                line.push_str(&format!(": {m}"));
            }
            line
        })
        .collect();
    write!(out, "{}", describe(&t.template_id, &meta, &builds))?;
    Ok(ExitCode::SUCCESS)
}

/// What `tpl info` prints: one `key: value` line per fact.
fn describe(name: &str, meta: &TemplateMeta, builds: &[String]) -> String {
    let mut rows: Vec<(&str, String)> = vec![("name", name.to_owned())];
    if !meta.aliases.is_empty() {
        rows.push(("aliases", meta.aliases.join(", ")));
    }
    if let Some(p) = &meta.parent {
        rows.push(("parent", p.clone()));
    }
    match &meta.image {
        Some(i) => {
            rows.push(("source", format!("image {} ({})", i.source, i.format)));
            rows.push(("digest", i.digest.clone()));
            rows.push(("platform", i.platform.clone()));
            rows.push(("layers", i.layers.to_string()));
            let c = &i.config;
            let argv: Vec<&String> = c.entrypoint.iter().chain(&c.cmd).collect();
            if !argv.is_empty() {
                rows.push(("image cmd", format!("{argv:?}")));
            }
        }
        None => {
            let hash: String = meta.recipe_hash.chars().take(12).collect();
            rows.push(("source", format!("recipe {}:{hash}", meta.recipe)));
            if !meta.mirror.is_empty() {
                rows.push(("mirror", meta.mirror.clone()));
            }
        }
    }
    rows.push((
        "size",
        format!(
            "{}, {} files",
            human_bytes(meta.size_bytes),
            meta.file_count
        ),
    ));
    rows.push((
        "built",
        format!("{} in {:.1} s", built_when(meta), meta.build_seconds),
    ));
    if meta.code_interpreter {
        rows.push(("code interpreter", "yes".into()));
    }
    let d = &meta.sandbox;
    if let Some(c) = d.cpu_count {
        rows.push(("cpus", c.to_string()));
    }
    if let Some(m) = d.memory_mb {
        rows.push(("memory", format!("{m} MiB")));
    }
    if let Some(w) = d.writable_layer_mib {
        rows.push(("writable layer", format!("{w} MiB")));
    }
    if !d.expose_ports.is_empty() {
        let ports: Vec<String> = d.expose_ports.iter().map(u16::to_string).collect();
        rows.push(("exposed ports", ports.join(", ")));
    }
    if !d.env.is_empty() {
        let env: Vec<String> = d.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        rows.push(("env", env.join(" ")));
    }
    if let Some(s) = &d.service {
        let mut line = format!("{:?}", s.argv);
        if let Some(w) = &s.workdir {
            line.push_str(&format!(" in {w}"));
        }
        if let Some(u) = &s.user {
            line.push_str(&format!(" as {u}"));
        }
        rows.push(("service", line));
    }
    if let Some(p) = &d.probe {
        rows.push((
            "probe",
            format!(
                "GET http://127.0.0.1:{}{} within {} s",
                p.port, p.path, p.timeout_secs
            ),
        ));
    }
    for (i, b) in builds.iter().enumerate() {
        rows.push((if i == 0 { "builds" } else { "" }, b.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    rows.iter()
        .map(|(k, v)| {
            let key = if k.is_empty() {
                String::new()
            } else {
                format!("{k}:")
            };
            format!("{key:<width$} {v}\n")
        })
        .collect()
}

fn ls(store: &TemplateStore, json: bool) -> anyhow::Result<ExitCode> {
    let templates = store.list()?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &templates)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if templates.is_empty() {
        eprintln!(
            "no templates in {}; build one with `cubicle tpl build base`",
            store.dir().display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 7]> = templates.iter().map(|t| row(store, t)).collect();
    write!(
        out,
        "{}",
        super::columns(
            ["NAME", "PARENT", "ALIASES", "SIZE", "FILES", "BUILT", "RECIPE"],
            rows
        )
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Whether the environment names an API key, i.e. the caller talks to a daemon.
fn api_key_in_env() -> bool {
    ["E2B_API_KEY", "CUBICLE_API_KEY"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.is_empty()))
}

/// `tpl ls` with an API key: the templates the daemon offers (`GET /templates`).
async fn ls_api(json: bool) -> anyhow::Result<ExitCode> {
    let api = cubicle_client::ApiClient::from_env()?;
    let templates = api
        .templates()
        .await
        .map_err(|e| super::explain(e.into(), &api))?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &templates)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 7]> = templates
        .iter()
        .map(|t| {
            [
                t.template_id.clone(),
                dash_if_empty(
                    t.aliases
                        .iter()
                        .filter(|a| **a != t.template_id)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                t.build_status.clone(),
                t.cpu_count.to_string(),
                format!("{} MiB", t.memory_mb),
                t.spawn_count.to_string(),
                t.created_at
                    .map(|c| format!("{} UTC", c.format("%Y-%m-%d %H:%M")))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "ALIASES",
        "STATUS",
        "CPUS",
        "MEMORY",
        "SANDBOXES",
        "BUILT",
    ];
    write!(out, "{}", super::columns(header, rows))?;
    Ok(ExitCode::SUCCESS)
}

fn dash_if_empty(s: String) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// One `tpl ls` row. SIZE and FILES are the template's own layer. A template is
/// outdated when its recipe changed, or (a layer) its parent was rebuilt or is missing.
fn row(store: &TemplateStore, t: &Template) -> [String; 7] {
    let short: String = t.meta.recipe_hash.chars().take(12).collect();
    let outdated = Recipe::builtin(&t.meta.recipe)
        .is_ok_and(|r| r.hash(t.meta.uid_shift) != t.meta.recipe_hash)
        || (t.parent().is_some() && t.layers(store).is_err());
    [
        t.name.to_string(),
        t.parent().unwrap_or("-").to_owned(),
        dash_if_empty(t.meta.aliases.join(",")),
        human_bytes(t.meta.size_bytes),
        t.meta.file_count.to_string(),
        t.meta
            .built_at_unix()
            .map(|s| format!("{} UTC", short_time(s)))
            .unwrap_or_else(|| t.meta.built_at.clone()),
        if let Some(image) = &t.meta.image {
            let digest: String = image.digest.chars().take(7 + 12).collect();
            format!("{}:{digest}", image.format)
        } else if outdated {
            format!("{}:{short} (outdated)", t.meta.recipe)
        } else {
            format!("{}:{short}", t.meta.recipe)
        },
    ]
}

/// Prints build progress on stderr: steps as `[2/6] title`, output lines indented.
/// Unless verbose, runs of debootstrap lines of the same kind (`I: Retrieving ...`
/// for a hundred packages) are shown as their first line and a count. Layer downloads
/// get a progress bar on a terminal ([`LayerBars`]).
#[derive(Debug)]
struct Progress {
    verbose: bool,
    bars: LayerBars,
    /// The `I:` verb of the current run of lines, e.g. "Retrieving".
    run: Option<String>,
    /// Lines of the current run not shown.
    hidden: usize,
    /// The last hidden line, shown instead of a count if it is the only one.
    last_hidden: String,
}

impl Progress {
    fn new(verbose: bool) -> Self {
        Progress {
            verbose,
            bars: LayerBars::for_stderr(),
            run: None,
            hidden: 0,
            last_hidden: String::new(),
        }
    }

    fn event(&mut self, event: BuildEvent) {
        if !matches!(event, BuildEvent::LayerProgress(_)) {
            self.bars.clear();
        }
        match event {
            BuildEvent::Step {
                index,
                total,
                title,
            } => {
                self.flush();
                eprintln!("[{index}/{total}] {title}");
            }
            BuildEvent::Phase(phase) => {
                self.flush();
                eprintln!("== {}", phase.as_str());
            }
            BuildEvent::LayerProgress(p) => self.bars.update(
                p.index,
                p.count,
                &p.digest,
                p.stage.as_str(),
                p.done,
                p.total,
                p.cached,
            ),
            BuildEvent::Log(line) if self.verbose => eprintln!("    {line}"),
            BuildEvent::Log(line) => {
                let verb = info_verb(&line);
                if verb.is_some() && verb == self.run.as_deref() {
                    self.hidden += 1;
                    self.last_hidden = line;
                    return;
                }
                self.flush();
                self.run = verb.map(str::to_owned);
                eprintln!("    {line}");
            }
            // Progress this version does not know how to show, as it is.
            other => {
                self.flush();
                eprintln!("    {other:?}");
            }
        }
    }

    /// Ends the current run of similar lines.
    fn flush(&mut self) {
        match self.hidden {
            0 => {}
            1 => eprintln!("    {}", self.last_hidden),
            n => eprintln!("    ... and {n} more like this"),
        }
        self.hidden = 0;
        self.run = None;
    }
}

/// "Retrieving" for debootstrap's "I: Retrieving adduser 3.134". Downloads alternate
/// "Retrieving x" and "Validating x", so both count as "Retrieving".
fn info_verb(line: &str) -> Option<&str> {
    match line.strip_prefix("I: ")?.split_whitespace().next()? {
        "Validating" => Some("Retrieving"),
        verb => Some(verb),
    }
}

fn built_when(meta: &TemplateMeta) -> String {
    let Some(at) = meta.built_at_unix() else {
        return meta.built_at.clone();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(at, |d| d.as_secs());
    format!("{} UTC, {}", short_time(at), ago(now.saturating_sub(at)))
}

/// `2026-05-20 14:31` from Unix seconds.
fn short_time(unix: u64) -> String {
    let s = cubicle_template::rfc3339_utc(unix);
    format!("{} {}", &s[..10], &s[11..16])
}

fn ago(secs: u64) -> String {
    let (n, unit) = match secs {
        0..=59 => return "just now".to_owned(),
        60..=3599 => (secs / 60, "minute"),
        3600..=86_399 => (secs / 3600, "hour"),
        _ => (secs / 86_400, "day"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(180 * 1024 * 1024), "180.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(ago(5), "just now");
        assert_eq!(ago(60), "1 minute ago");
        assert_eq!(ago(7200), "2 hours ago");
        assert_eq!(ago(3 * 86_400), "3 days ago");
        assert_eq!(short_time(1_779_287_462), "2026-05-20 14:31");
        assert_eq!(info_verb("I: Retrieving adduser 3.134"), Some("Retrieving"));
        assert_eq!(info_verb("I: Validating adduser 3.134"), Some("Retrieving"));
        assert_eq!(info_verb("W: oops"), None);
    }

    #[test]
    fn progress_collapses_runs() {
        let mut p = Progress::new(false);
        for l in ["I: Retrieving a", "I: Retrieving b", "I: Retrieving c"] {
            p.event(BuildEvent::Log(l.into()));
        }
        assert_eq!(p.hidden, 2);
        p.event(BuildEvent::Log("I: Validating c".into()));
        assert_eq!(p.hidden, 3);
        p.event(BuildEvent::Log("I: Extracting a".into()));
        assert_eq!((p.hidden, p.run.as_deref()), (0, Some("Extracting")));
        p.event(BuildEvent::Log("plain output".into()));
        assert_eq!(p.run, None);
    }

    #[test]
    fn table_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(DataDir::new(tmp.path()));
        let t = Template {
            name: "base".parse().unwrap(),
            dir: "/d/templates/base".into(),
            rootfs: "/d/templates/base/rootfs".into(),
            meta: TemplateMeta {
                format_version: 1,
                recipe: "base".into(),
                recipe_hash: "0123456789abcdef".repeat(4),
                uid_shift: uid_map::HOST_BASE,
                built_at: "2026-05-20T14:31:02Z".into(),
                size_bytes: 150 << 20,
                file_count: 7000,
                build_seconds: 40.0,
                mirror: "http://deb.debian.org/debian".into(),
                parent: None,
                parent_built_at: None,
                aliases: Vec::new(),
                code_interpreter: false,
                image: None,
                sandbox: Default::default(),
            },
        };
        assert_eq!(
            row(&store, &t),
            [
                "base",
                "-",
                "-",
                "150.0 MiB",
                "7000",
                "2026-05-20 14:31 UTC",
                "base:0123456789ab (outdated)"
            ]
        );
        // A layer whose parent is not there is outdated whatever its recipe hash.
        let recipe = Recipe::builtin("code-interpreter").unwrap();
        let layer = Template {
            name: "code-interpreter".parse().unwrap(),
            meta: TemplateMeta {
                format_version: 2,
                recipe: recipe.name.into(),
                recipe_hash: recipe.hash(uid_map::HOST_BASE),
                parent: Some("base".into()),
                parent_built_at: Some("2026-05-20T14:31:02Z".into()),
                aliases: vec!["code-interpreter-v1".into()],
                code_interpreter: true,
                ..t.meta.clone()
            },
            ..t.clone()
        };
        let r = row(&store, &layer);
        assert_eq!(&r[..3], ["code-interpreter", "base", "code-interpreter-v1"]);
        assert!(r[6].ends_with("(outdated)"), "{}", r[6]);
    }
}
