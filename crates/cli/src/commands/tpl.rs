//! `cubicle tpl ...`: template build, listing and removal.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use cubicle_core::{uid_map, DataDir, TemplateName};
use cubicle_template::{
    BuildEvent, BuildOptions, BuildOutcome, BuildPhase, ImageBuildRequest, Probe, Recipe,
    RegistryAuth, RunOverrides, SandboxDefaults, Template, TemplateMeta, TemplateStore,
};

use crate::args::{TplBuildArgs, TplCommand, TplCreateFromImageArgs};

/// Runs one `tpl` subcommand.
pub fn run(
    data: &DataDir,
    agent_bin: Option<std::path::PathBuf>,
    cmd: TplCommand,
) -> anyhow::Result<ExitCode> {
    let store = TemplateStore::new(data.clone());
    match cmd {
        TplCommand::Build(args) => build(&store, args),
        TplCommand::CreateFromImage(args) => create_from_image(data, agent_bin, &store, *args),
        TplCommand::Ls(args) if !args.local && api_key_in_env() => {
            super::block_on(ls_api(args.json))
        }
        TplCommand::Ls(args) => ls(&store, args.json),
        TplCommand::Rm(args) => {
            let name: TemplateName = args.name.parse()?;
            store.remove(&name)?;
            eprintln!("removed template {name}");
            Ok(ExitCode::SUCCESS)
        }
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
    let outcome = cubicle_template::build(store, recipe, &opts, &mut |e| progress.event(e));
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

fn create_from_image(
    data: &DataDir,
    agent_bin: Option<std::path::PathBuf>,
    store: &TemplateStore,
    args: TplCreateFromImageArgs,
) -> anyhow::Result<ExitCode> {
    let name: TemplateName = match &args.template_id {
        Some(id) => id.parse()?,
        None => cubicle_template::oci::generated_template_name().parse()?,
    };
    let mut progress = Progress::new(true);
    let request = image_request(&args);
    let built =
        cubicle_template::build_from_image(store, &request, &name, uid_map::HOST_BASE, &mut |e| {
            progress.event(e)
        });
    progress.flush();
    let t = built.with_context(|| format!("building template '{name}' from {}", args.image))?;
    // The snapshotting phase, run here until builds are daemon jobs (which will call
    // `Controller::prepare_template`): a template with a service is started once in this
    // process's own runtime, probed, checkpointed; a failure removes the template.
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
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &t)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let layers = t.meta.image.as_ref().map_or(0, |i| i.layers);
    println!(
        "built {} from {} in {:.1} s: {} layers, {}, {} files, in {}",
        t.name,
        args.image,
        t.meta.build_seconds,
        layers,
        human_bytes(t.meta.size_bytes),
        t.meta.file_count,
        t.dir.display()
    );
    let sandbox = &t.meta.sandbox;
    if let Some(service) = &sandbox.service {
        println!(
            "service: {} as {} in {}",
            cubicle_template::run_config::shell_words(&service.argv),
            service.user.as_deref().unwrap_or("root"),
            service.workdir.as_deref().unwrap_or("/")
        );
    }
    if !sandbox.expose_ports.is_empty() {
        let ports: Vec<String> = sandbox.expose_ports.iter().map(u16::to_string).collect();
        println!(
            "exposed ports: {} (reachable as {{port}}-{{sandbox id}}.{{domain}})",
            ports.join(", ")
        );
    }
    if let Some(ended) = prepared.as_ref().and_then(|p| p.completed.as_ref()) {
        println!(
            "the service {ended} within a second (a one-shot command, no probe): every sandbox \
             runs it afresh; no checkpoint"
        );
    } else if let Some(p) = prepared {
        let probe = match &p.probe_answer {
            Some(answer) => format!(
                "answered the probe ({answer}) after {:.2} s",
                p.ready.as_secs_f64()
            ),
            None => format!("kept running for {:.1} s (no probe)", p.ready.as_secs_f64()),
        };
        println!(
            "snapshotted: the service started in {:.2} s, {probe}; checkpoint of {} in {:.2} s",
            p.start.as_secs_f64(),
            human_bytes(p.size_bytes),
            p.checkpoint_time.as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The build request `tpl create-from-image`'s flags make.
fn image_request(args: &TplCreateFromImageArgs) -> ImageBuildRequest {
    ImageBuildRequest {
        image: args.image.clone(),
        registry_auth: match (&args.registry_username, &args.registry_password) {
            (Some(username), Some(password)) => Some(RegistryAuth {
                username: username.clone(),
                password: password.clone(),
            }),
            _ => None,
        },
        overrides: RunOverrides {
            cmd: args.cmd.clone(),
            args: args.args.clone(),
            env: args.env.clone(),
            workdir: args.workdir.clone(),
            user: args.user.clone(),
        },
        defaults: SandboxDefaults {
            cpu_count: args.cpu,
            memory_mb: args.memory,
            writable_layer_mib: args.writable_layer_size,
            expose_ports: args.expose_ports.clone(),
            probe: args.probe.map(|port| Probe {
                port,
                path: args.probe_path.clone(),
                timeout_secs: args.probe_timeout,
            }),
            ..Default::default()
        },
    }
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
/// for a hundred packages) are shown as their first line and a count.
#[derive(Debug)]
struct Progress {
    verbose: bool,
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
            run: None,
            hidden: 0,
            last_hidden: String::new(),
        }
    }

    fn event(&mut self, event: BuildEvent) {
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
