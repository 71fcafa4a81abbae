//! `cubicle bench ...`: benchmarks with peers in the same run (see docs/benchmarks.md).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use cubicle_core::{DataDir, Limits, SandboxId, TemplateName};
use cubicle_runtime::{AgentConfig, SandboxSpec};
use cubicle_template::TemplateStore;

use crate::args::{
    BenchApiCreateArgs, BenchCodeInterpreterArgs, BenchCommand, BenchCommonArgs, BenchNsCreateArgs,
    BenchSnapshotArgs,
};

/// Runs one benchmark.
pub async fn run(
    data: &DataDir,
    agent_bin: Option<PathBuf>,
    cmd: BenchCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::NsCreate(args) => ns_create(data, agent_bin, args).await,
        BenchCommand::ApiCreate(args) => api_create(args).await,
        BenchCommand::CodeInterpreter(args) => code_interpreter(data, args).await,
        BenchCommand::SnapshotOps(args) => snapshot(args).await,
        other => seed_scenarios(data, other).await,
    }
}

/// The seed's scenarios (`create`, `density`, chapter 4, `all`) from their arguments:
/// what to run and the options they share.
fn scenarios_of(
    cmd: BenchCommand,
) -> Result<(Vec<cubicle_bench::suite::Scenario>, BenchCommonArgs, u64), String> {
    use cubicle_bench::scenarios::Shape;
    use cubicle_bench::suite::{self, Scenario};
    let e = |e: cubicle_bench::scenarios::ParamError| e.to_string();
    // Sandboxes of a run live this long should this process not kill them.
    let timeout = 600;
    Ok(match cmd {
        BenchCommand::Create(a) => {
            let create_only = match a.mode.as_deref() {
                None => false,
                Some("create-only") => true,
                Some(other) => {
                    return Err(format!(
                        "unknown mode -m {other:?} (the only mode is create-only)"
                    ))
                }
            };
            cubicle_bench::api_create::Plan::new(a.concurrency, a.requests, a.warmup)
                .map_err(|e| e.to_string())?;
            (
                vec![Scenario::Create {
                    levels: vec![(a.concurrency, a.requests, a.warmup)],
                    create_only,
                }],
                a.common,
                a.timeout,
            )
        }
        BenchCommand::Density(a) => {
            if a.batches.is_empty() || a.batches.contains(&0) {
                return Err("--batches must list sizes of at least 1".into());
            }
            (
                vec![Scenario::Density { batches: a.batches }],
                a.common,
                timeout,
            )
        }
        BenchCommand::Snapshot(a) => (
            vec![Scenario::Snapshot {
                levels: vec![Shape::square(a.concurrency, a.rounds, a.warmup).map_err(e)?],
            }],
            a.common,
            timeout,
        ),
        BenchCommand::CreateFromSnapshot(a) => (
            vec![Scenario::CreateFromSnapshot {
                levels: vec![Shape::square(a.concurrency, a.rounds, a.warmup).map_err(e)?],
            }],
            a.common,
            timeout,
        ),
        BenchCommand::Rollback(a) => (
            vec![Scenario::Rollback {
                levels: vec![Shape::square(a.concurrency, a.rounds, a.warmup).map_err(e)?],
            }],
            a.common,
            timeout,
        ),
        BenchCommand::PauseResume(a) => (
            vec![Scenario::PauseResume {
                levels: vec![Shape::square(a.concurrency, a.rounds, a.warmup).map_err(e)?],
            }],
            a.common,
            timeout,
        ),
        BenchCommand::SnapshotDirty(a) => (
            vec![Scenario::SnapshotDirty {
                levels: vec![(a.dirty_mb, Shape::square(1, a.rounds, a.warmup).map_err(e)?)],
            }],
            a.common,
            timeout,
        ),
        BenchCommand::Clone(a) => (
            vec![Scenario::Clone {
                levels: vec![
                    Shape::new(a.clones, a.concurrency, a.rounds, a.warmup, "clones").map_err(e)?,
                ],
            }],
            a.common,
            timeout,
        ),
        BenchCommand::All(a) => (suite::all(), a.common, timeout),
        BenchCommand::NsCreate(_)
        | BenchCommand::ApiCreate(_)
        | BenchCommand::CodeInterpreter(_)
        | BenchCommand::SnapshotOps(_) => unreachable!("dispatched before"),
    })
}

/// This machine, for the report's header.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1048576.0);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem_gib:.1} GiB, Linux {kernel}")
}

/// Whether `url` points at this host (density reads this host's memory).
fn is_local(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    matches!(
        host.trim_matches(['[', ']']),
        "127.0.0.1" | "localhost" | "::1" | "0.0.0.0"
    ) || host.starts_with("127.")
}

async fn seed_scenarios(data: &DataDir, cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    use cubicle_bench::scenarios::{Ctx, Step};
    use cubicle_bench::snapshot::Live;
    use cubicle_bench::suite::{self, DensityEnv, PeerSet};

    let all = matches!(cmd, BenchCommand::All(_));
    let (scenarios, common, timeout) = match scenarios_of(cmd) {
        Ok(s) => s,
        Err(e) => return Ok(usage_error(e)),
    };
    if common.template.trim().is_empty() {
        return Ok(usage_error("the template (-t) must not be empty"));
    }
    let client = match cubicle_client::ApiClient::from_env() {
        // A checkpoint of 1 GiB, or 20 creates at once on 2 cores, takes a while.
        Ok(c) => c.with_timeout(std::time::Duration::from_secs(300)),
        Err(e) => return Ok(usage_error(e)),
    };
    if let Err(code) = check_daemon(&client, &common.template).await {
        return Ok(code);
    }
    let peer_set = if common.peers {
        let store = TemplateStore::new(data.clone());
        let name: TemplateName = match common.template.parse() {
            Ok(n) => n,
            Err(e) => return Ok(usage_error(format!("--peers: {e}"))),
        };
        match store.get(&name) {
            // runc refuses a root reached through a symlink.
            Ok(t) => Some(PeerSet {
                rootfs: std::fs::canonicalize(&t.rootfs).unwrap_or_else(|_| t.rootfs.clone()),
            }),
            Err(e) => {
                return Ok(usage_error(format!(
                    "--peers starts the template's rootfs, read from the data dir {}: {e}",
                    data.root().display()
                )))
            }
        }
    } else {
        None
    };
    let density_env = DensityEnv {
        host: if !is_local(client.base_url()) {
            Err(format!(
                "the daemon at {} is not on this host",
                client.base_url()
            ))
        } else if !nix::unistd::geteuid().is_root() {
            Err("reading other processes' smaps_rollup needs root".into())
        } else {
            cubicle_bench::code_interpreter::Host::new(data)
                .map_err(|e| format!("finding this host's cgroups: {e}"))
        },
        sandbox_limit_mib: cubicle_core::Limits::default().memory_mb as f64,
    };

    let tty = std::io::stderr().is_terminal();
    let progress = move |s: Step| {
        if !tty {
            return;
        }
        let width = 30;
        let filled = (s.done * width)
            .checked_div(s.total)
            .unwrap_or(0)
            .min(width);
        eprint!(
            "\r\x1b[K[{}{}] {} {}/{}",
            "#".repeat(filled),
            ".".repeat(width - filled),
            s.label,
            s.done,
            s.total
        );
        let _ = std::io::stderr().flush();
    };
    let live = Live::default();
    let ctx = Ctx {
        client: &client,
        template: common.template.clone(),
        live: &live,
        sandbox_timeout_s: timeout,
        progress: &progress,
    };
    let started = std::time::Instant::now();
    let run = async {
        let mut outcomes = Vec::new();
        for s in &scenarios {
            outcomes.push(suite::run(&ctx, s, peer_set.as_ref(), &density_env).await);
        }
        outcomes
    };
    let outcome = tokio::select! {
        o = run => Ok(o),
        signal = interrupted() => Err(signal),
    };
    if tty {
        eprint!("\r\x1b[K");
    }
    let (sandboxes, snapshots) = (live.sandboxes().len(), live.snapshots().len());
    if sandboxes + snapshots > 0 {
        eprintln!("removing the {sandboxes} sandbox(es) and {snapshots} snapshot(s) this run left");
        for e in suite::cleanup(&client, &live).await {
            eprintln!("  {}x {}", e.count, e.message);
        }
    }
    let outcomes = match outcome {
        Err(signal) => {
            eprintln!("interrupted by {signal}: no report");
            return Ok(ExitCode::from(130));
        }
        Ok(o) => o,
    };
    let elapsed = started.elapsed();
    let mut header = vec![
        format!("machine: {}", machine()),
        format!(
            "daemon: {} (template {}); run took {:.0} s",
            client.base_url(),
            common.template,
            elapsed.as_secs_f64()
        ),
        format!(
            "command: cubicle bench {}",
            std::env::args().skip(2).collect::<Vec<_>>().join(" ")
        ),
        "the seed column is the seed report's own figure (a 16-core AMD EPYC CVM with \
         microVM sandboxes): orientation, not a like-for-like comparison"
            .into(),
    ];
    if all {
        header.push(
            "parameters: the seed's own sets for every scenario; none scaled down (this \
             machine's 24 GiB holds §3.3's 20 sandboxes and §4.2's 1 GiB; its 2 cores only \
             make the concurrent levels CPU-bound)"
                .into(),
        );
    }
    if peer_set.is_none() {
        header.push("peers: not measured (add --peers)".into());
    }
    let failures: usize = outcomes.iter().map(|o| o.failures()).sum();
    let tables: Vec<suite::Table> = outcomes.iter().flat_map(suite::tables).collect();
    let json = serde_json::json!({
        "header": header,
        "outcomes": outcomes,
        "tables": tables,
    });
    if let Some(dir) = &common.report {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut files = Vec::new();
        for (name, chart) in suite::charts(&outcomes) {
            std::fs::write(dir.join(&name), chart.render())
                .with_context(|| format!("writing {name}"))?;
            files.push(name);
        }
        std::fs::write(
            dir.join("report.md"),
            suite::markdown(&header, &outcomes, &files),
        )
        .context("writing report.md")?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(&json)?,
        )
        .context("writing results.json")?;
        eprintln!(
            "report: {} ({} chart(s))",
            dir.join("report.md").display(),
            files.len()
        );
    }
    if common.json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for h in &header {
            println!("{h}");
        }
        for t in &tables {
            println!();
            print!("{}", suite::text_table(t));
        }
    }
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Seconds a benchmark sandbox lives should its kill fail.
const BENCH_SANDBOX_TIMEOUT: u64 = 120;

/// A set-up problem, not a measurement: `error: <message>` and exit code 2.
fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

async fn api_create(args: BenchApiCreateArgs) -> anyhow::Result<ExitCode> {
    use cubicle_bench::api_create::{self as bench, ApiTarget, Plan, Progress};
    let plan = match Plan::new(args.concurrency, args.requests, args.warmup) {
        Ok(p) => p,
        Err(e) => return Ok(usage_error(e)),
    };
    let client = match cubicle_client::ApiClient::from_env() {
        Ok(c) => c,
        Err(e) => return Ok(usage_error(e)),
    };
    if let Err(code) = check_daemon(&client, &args.template).await {
        return Ok(code);
    }
    let target = ApiTarget::new(client.clone(), &args.template, BENCH_SANDBOX_TIMEOUT);
    let tty = std::io::stderr().is_terminal();
    let progress = |p: Progress| {
        if !tty {
            return;
        }
        match p {
            Progress::Warmup { round, rounds } => eprint!("\rwarm-up {round}/{rounds}   "),
            Progress::Measured { done, total } => eprint!("\rcreated {done}/{total}   "),
        }
        let _ = std::io::stderr().flush();
    };
    let report = bench::run(plan, &target, &progress).await;
    if tty {
        eprint!("\r\x1b[K");
    }
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["template"] = args.template.clone().into();
        json["api_url"] = client.base_url().into();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!(
            "{}",
            api_create_table(&report, &args.template, client.base_url())
        );
    }
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Checks the daemon, the key and the template before measuring anything; a problem is
/// printed and its exit code returned.
async fn check_daemon(client: &cubicle_client::ApiClient, template: &str) -> Result<(), ExitCode> {
    if let Err(e) = client.health().await {
        return Err(usage_error(e));
    }
    let explain = |e: cubicle_client::ClientError| super::explain(e.into(), client);
    match client.templates().await {
        Ok(t) if t.iter().any(|t| t.template_id == template) => Ok(()),
        Ok(t) => {
            let names: Vec<&str> = t.iter().map(|t| t.template_id.as_str()).collect();
            Err(usage_error(format!(
                "the daemon at {} has no template {:?} (it has: {})",
                client.base_url(),
                template,
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            )))
        }
        Err(e) => Err(usage_error(explain(e))),
    }
}

async fn code_interpreter(
    data: &DataDir,
    args: BenchCodeInterpreterArgs,
) -> anyhow::Result<ExitCode> {
    use cubicle_bench::code_interpreter::{self as bench, Host, Live, Plan, Progress, RunError};
    let plan = match Plan::new(
        args.sandboxes,
        args.warmup,
        &args.template,
        std::time::Duration::from_secs(args.idle_timeout),
    ) {
        Ok(p) => p,
        Err(e) => return Ok(usage_error(e)),
    };
    if !nix::unistd::geteuid().is_root() {
        return Ok(usage_error(
            "cubicle bench code-interpreter must run as root: it reads the sandboxes' \
             cgroups and other processes' /proc/<pid>/smaps_rollup (try sudo)",
        ));
    }
    let client = match cubicle_client::ApiClient::from_env() {
        Ok(c) => c,
        Err(e) => return Ok(usage_error(e)),
    };
    if let Err(code) = check_daemon(&client, &args.template).await {
        return Ok(code);
    }
    let host = match Host::new(data) {
        Ok(h) => h,
        Err(e) => return Ok(usage_error(format!("finding this host's cgroups: {e}"))),
    };

    let tty = std::io::stderr().is_terminal();
    let settling_shown = std::cell::Cell::new(false);
    let progress = |p: Progress| {
        match p {
            Progress::Warmup { done, total } if tty => eprint!("\rwarm-up {done}/{total}   "),
            Progress::Warmup { done, total } => eprintln!("warm-up {done}/{total}"),
            Progress::Created {
                done,
                total,
                failed,
            } => {
                let failed = match failed {
                    0 => String::new(),
                    n => format!(" ({n} failed)"),
                };
                if tty {
                    eprint!("\rcreated {done}/{total}{failed}   ");
                } else if done % 10 == 0 || done == total {
                    eprintln!("created {done}/{total}{failed}");
                }
            }
            Progress::Settling { busy, waited_ms } if tty => eprint!(
                "\rwaiting for idle: {busy} sandboxes still use CPU ({:.1} s)   ",
                waited_ms as f64 / 1e3
            ),
            Progress::Settling { .. } => {
                if !settling_shown.replace(true) {
                    eprintln!("waiting for the sandboxes to be idle");
                }
            }
            Progress::Measuring if tty => eprint!("\r\x1b[Kreading memory"),
            Progress::Measuring => eprintln!("reading memory"),
            Progress::Killing { count } if tty => {
                eprint!("\r\x1b[Kkilling {count} sandboxes")
            }
            Progress::Killing { count } => eprintln!("killing {count} sandboxes"),
        }
        let _ = std::io::stderr().flush();
    };

    let live = Live::default();
    let outcome = tokio::select! {
        result = bench::run(&client, &plan, &host, &live, &progress) => Ok(result),
        signal = interrupted() => Err(signal),
    };
    if tty {
        eprint!("\r\x1b[K");
    }
    // Whatever happened, no sandbox of this run stays.
    let left = live.ids().len();
    if left > 0 {
        eprintln!("killing the {left} sandbox(es) this run created");
        for e in bench::kill_all(&client, &live).await {
            eprintln!(
                "  kill failed {}x: {} (the daemon kills them at their timeout)",
                e.count, e.message
            );
        }
    }
    let report = match outcome {
        Err(signal) => {
            eprintln!("interrupted by {signal}: no report");
            return Ok(ExitCode::from(130));
        }
        Ok(Err(e @ RunError::NotHere { .. })) => return Ok(usage_error(e)),
        Ok(Err(e)) => return Err(anyhow::Error::from(e).context("code-interpreter benchmark")),
        Ok(Ok(report)) => report,
    };
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["api_url"] = client.base_url().into();
        json["data_dir"] = data.root().display().to_string().into();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", code_interpreter_table(&report, client.base_url()));
    }
    Ok(if report.failures() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn snapshot(args: BenchSnapshotArgs) -> anyhow::Result<ExitCode> {
    use cubicle_bench::snapshot::{self as bench, Live, Plan, Progress};
    let plan = match Plan::new(args.rounds, args.warmup, &args.template, args.dirty_mib) {
        Ok(p) => p,
        Err(e) => return Ok(usage_error(e)),
    };
    let client = match cubicle_client::ApiClient::from_env() {
        // A checkpoint or clone of a big sandbox takes longer than the SDK's 60 s.
        Ok(c) => c.with_timeout(std::time::Duration::from_secs(300)),
        Err(e) => return Ok(usage_error(e)),
    };
    if let Err(code) = check_daemon(&client, &args.template).await {
        return Ok(code);
    }

    let tty = std::io::stderr().is_terminal();
    let progress = |p: Progress| {
        match p {
            Progress::Warmup { done, total } if tty => {
                eprint!("\rwarm-up round {done}/{total}   ")
            }
            Progress::Warmup { done, total } => eprintln!("warm-up round {done}/{total}"),
            Progress::Round {
                done,
                total,
                failed,
            } => {
                let failed = match failed {
                    0 => String::new(),
                    n => format!(" ({n} failed)"),
                };
                if tty {
                    eprint!("\rround {done}/{total}{failed}   ");
                } else if done % 5 == 0 || done == total {
                    eprintln!("round {done}/{total}{failed}");
                }
            }
        }
        let _ = std::io::stderr().flush();
    };

    let live = Live::default();
    let outcome = tokio::select! {
        report = bench::run(&client, &plan, &live, &progress) => Ok(report),
        signal = interrupted() => Err(signal),
    };
    if tty {
        eprint!("\r\x1b[K");
    }
    // Whatever happened, no sandbox or snapshot of this run stays.
    let (sandboxes, snapshots) = (live.sandboxes().len(), live.snapshots().len());
    if sandboxes + snapshots > 0 {
        eprintln!(
            "removing the {sandboxes} sandbox(es) and {snapshots} snapshot(s) this run created"
        );
        for e in bench::remove_all(&client, &live).await {
            eprintln!(
                "  {}x {} (sandboxes die at their timeout; `cubicle snapshot rm` removes \
                 snapshots)",
                e.count, e.message
            );
        }
    }
    let report = match outcome {
        Err(signal) => {
            eprintln!("interrupted by {signal}: no report");
            return Ok(ExitCode::from(130));
        }
        Ok(report) => report,
    };
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        json["api_url"] = client.base_url().into();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{}", snapshot_table(&report, client.base_url()));
    }
    Ok(if report.failures() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The human report: one row per operation next to the seed's figure, then sizes and
/// failures.
fn snapshot_table(r: &cubicle_bench::snapshot::Report, url: &str) -> String {
    use cubicle_bench::snapshot::{Op, SizeSummary};
    use std::fmt::Write as _;
    let p = &r.plan;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "snapshot: template {} at {url}; {} round{} at c=1, {} warm-up round{} discarded{}; \
         {} MiB dirty in the second sandbox",
        p.template,
        p.rounds,
        if p.rounds == 1 { "" } else { "s" },
        p.warmup,
        if p.warmup == 1 { "" } else { "s" },
        match r.warmup_failures {
            0 => String::new(),
            n => format!(" ({n} with failures)"),
        },
        p.dirty_mib
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<34} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "latency (ms)", "n", "min", "p50", "p90", "p99", "max", "avg", "seed avg", "p50/seed"
    );
    let dirty = format!("{} MiB dirty", p.dirty_mib);
    // Two significant digits for ratios far below 1.
    let ratio = |x: f64| match x {
        x if x < 0.1 => format!("{x:.3}x"),
        x => format!("{x:.2}x"),
    };
    for o in &r.operations {
        let name = match o.op {
            Op::Pause => "pause (freeze)".to_owned(),
            Op::Resume => "resume (connect)".to_owned(),
            Op::Hibernate => "hibernate (pause to disk)".to_owned(),
            Op::ResumeHibernated => "resume hibernated (restore)".to_owned(),
            Op::Snapshot => "snapshot".to_owned(),
            Op::CreateFromSnapshot => "create from snapshot".to_owned(),
            Op::Rollback => "rollback".to_owned(),
            Op::SnapshotDirty => format!("snapshot, {dirty}"),
            Op::CreateFromDirty => format!("create from it, {dirty}"),
            Op::Clone => format!("clone (fork 1), {dirty}"),
            Op::CloneManyPerSandbox => format!("clone x5, per clone, {dirty}"),
            Op::RollbackDirty => format!("rollback, {dirty}"),
        };
        let cells = match &o.ms {
            Some(s) => [s.min, s.p50, s.p90, s.p99, s.max, s.avg].map(|v| format!("{v:.1}")),
            None => std::array::from_fn(|_| "-".to_owned()),
        };
        let mut notes = Vec::new();
        if o.failed > 0 {
            notes.push(format!("{} failed", o.failed));
        }
        if o.skipped > 0 {
            notes.push(format!("{} skipped", o.skipped));
        }
        let _ = writeln!(
            out,
            "{:<34} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}{}",
            name,
            o.ms.as_ref().map_or(0, |s| s.n),
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            o.seed
                .as_ref()
                .map_or("-".into(), |f| format!("{:.1}", f.avg_ms)),
            o.p50_over_seed.map_or("-".into(), ratio),
            if notes.is_empty() {
                String::new()
            } else {
                format!("  ({})", notes.join(", "))
            }
        );
    }
    let _ = writeln!(out, "seed figures:");
    for o in &r.operations {
        if let Some(f) = &o.seed {
            let _ = writeln!(out, "  {:<22} {:>6.1}  {}", o.op.key(), f.avg_ms, f.source);
        }
    }
    let _ = writeln!(out);
    let size = |s: &Option<SizeSummary>| match s {
        Some(s) => format!(
            "p50 {:.1} MiB (min {:.1}, max {:.1}, n {})",
            s.p50, s.min, s.max, s.n
        ),
        None => "-".into(),
    };
    let _ = writeln!(out, "snapshot image size: {}", size(&r.snapshot_size_mib));
    let _ = writeln!(
        out,
        "snapshot image size, {dirty}: {}",
        size(&r.snapshot_dirty_size_mib)
    );
    let _ = writeln!(
        out,
        "dirtying process RSS: {}; making it dirty took p50 {} ms (untimed set-up)",
        size(&r.dirty_rss_mib),
        r.dirty_setup_ms
            .as_ref()
            .map_or("-".into(), |s| format!("{:.0}", s.p50))
    );
    let _ = writeln!(out);
    let failures = r.failures();
    let _ = writeln!(
        out,
        "{}",
        match failures {
            0 => "no failures".to_owned(),
            n => format!("{n} failure(s):"),
        }
    );
    for e in &r.errors {
        let _ = writeln!(out, "  {}x {}", e.count, e.message);
    }
    for e in &r.cleanup_errors {
        let _ = writeln!(out, "  {}x {}", e.count, e.message);
    }
    out.push_str(
        "(each operation timed from the request sent to the answer, one at a time; create \
         = request sent -> 201; the seed's figures are its c=1 averages; MiB = 2^20 bytes)\n",
    );
    out
}

/// Resolves with the name of the first SIGINT, SIGTERM or SIGHUP (never, for a signal
/// whose handler cannot be installed).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    async fn recv(s: Option<Signal>) {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        _ = recv(signal(SignalKind::interrupt()).ok()) => "SIGINT",
        _ = recv(signal(SignalKind::terminate()).ok()) => "SIGTERM",
        _ = recv(signal(SignalKind::hangup()).ok()) => "SIGHUP",
    }
}

/// The human report: latencies next to the seed's, then memory, then failures.
fn code_interpreter_table(r: &cubicle_bench::code_interpreter::Report, url: &str) -> String {
    use cubicle_bench::code_interpreter::{MemSummary, ProcMemory};
    use cubicle_bench::stats::Summary;
    use std::fmt::Write as _;
    let p = &r.plan;
    let seed = &r.seed;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "code-interpreter: template {} at {url}; {} sandboxes created one after another and \
         kept alive; {} warm-up sandbox{} discarded{}; cgroup {}",
        p.template,
        p.sandboxes,
        p.warmup,
        if p.warmup == 1 { "" } else { "es" },
        match r.warmup_failures {
            0 => String::new(),
            n => format!(" ({n} failed)"),
        },
        r.cgroup_version
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<22} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "latency (ms)", "n", "min", "p50", "p90", "p99", "max", "avg", "seed p50", "p50/seed"
    );
    let row = |out: &mut String, name: &str, s: &Option<Summary>, seed_p50: Option<f64>| {
        let cells = match s {
            Some(s) => [s.min, s.p50, s.p90, s.p99, s.max, s.avg].map(|v| format!("{v:.1}")),
            None => std::array::from_fn(|_| "-".to_owned()),
        };
        let (seed_cell, ratio) = match (seed_p50, s) {
            (Some(sp), Some(s)) => (format!("{sp:.1}"), format!("{:.2}x", s.p50 / sp)),
            (Some(sp), None) => (format!("{sp:.1}"), "-".into()),
            _ => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<22} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
            name,
            s.as_ref().map_or(0, |s| s.n),
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            seed_cell,
            ratio
        );
    };
    row(
        &mut out,
        "create (-> 201)",
        &r.create_ms,
        Some(seed.create_ms.p50),
    );
    row(&mut out, "first run_code 1+1", &r.first_run_ms, None);
    row(&mut out, "second run_code 1+1", &r.second_run_ms, None);
    let c = &seed.create_ms;
    let _ = writeln!(
        out,
        "seed create, c=1 n={}: min {} p50 {} p90 {} p99 {} max {} avg {} (no seed figure for \
         run_code)",
        c.n, c.min, c.p50, c.p90, c.p99, c.max, c.avg
    );
    let _ = writeln!(out);

    let m = &r.memory;
    let idle = &r.idle;
    let _ = writeln!(
        out,
        "idle memory per sandbox (MiB): {} sandboxes, {} processes each; {}",
        m.sandboxes,
        if m.processes.0 == m.processes.1 {
            m.processes.0.to_string()
        } else {
            format!("{}-{}", m.processes.0, m.processes.1)
        },
        if idle.bound_hit {
            format!(
                "NOT idle: {} sandboxes still used CPU when the {:.0} s bound was hit",
                idle.busy,
                p.idle_bound_ms as f64 / 1e3
            )
        } else {
            format!(
                "idle after {:.1} s (no CPU time for {:.0} s in any sandbox)",
                idle.waited_ms as f64 / 1e3,
                idle.window_ms as f64 / 1e3
            )
        }
    );
    let _ = writeln!(
        out,
        "{:<22} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "", "n", "min", "p50", "p90", "max", "avg", "sum", "p50/seed"
    );
    let mem_row = |out: &mut String, name: &str, s: &Option<MemSummary>| {
        let cells = match s {
            Some(s) => [s.min, s.p50, s.p90, s.max, s.avg].map(|v| format!("{v:.2}")),
            None => std::array::from_fn(|_| "-".to_owned()),
        };
        let _ = writeln!(
            out,
            "{:<22} {:>4} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}",
            name,
            s.as_ref().map_or(0, |s| s.n),
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            s.as_ref().map_or("-".into(), |s| format!("{:.1}", s.sum)),
            s.as_ref()
                .map_or("-".into(), |s| format!("{:.2}x", s.p50 / seed.idle_mib)),
        );
    };
    mem_row(&mut out, "PSS", &m.pss_mib);
    mem_row(&mut out, "USS (private)", &m.uss_mib);
    mem_row(&mut out, "RSS", &m.rss_mib);
    match &r.mem_available {
        Some(a) => {
            let _ = writeln!(
                out,
                "MemAvailable: {:.1} MiB before, {:.1} MiB with the {} sandboxes: {:.1} MiB less, \
                 {:.2} MiB per sandbox; ratio to the seed's {:.0}: {:.2}x",
                a.before_mib,
                a.after_mib,
                r.created,
                a.drop_mib,
                a.per_sandbox_mib,
                seed.idle_mib,
                a.per_sandbox_mib / seed.idle_mib
            );
        }
        None => {
            let _ = writeln!(out, "MemAvailable: could not be read");
        }
    }
    let _ = writeln!(
        out,
        "seed: ~{:.0} MiB per idle sandbox ({:.0}-{:.0}; MemAvailable drop / sandboxes, free -m)",
        seed.idle_mib, seed.idle_mib_range.0, seed.idle_mib_range.1
    );
    if m.unreadable_processes > 0 {
        let _ = writeln!(
            out,
            "  {} processes exited before their memory was read",
            m.unreadable_processes
        );
    }
    let mib = |m: &ProcMemory| {
        format!(
            "PSS {:.1}, USS {:.1}, RSS {:.1} MiB",
            m.pss_kib as f64 / 1024.0,
            m.uss_kib as f64 / 1024.0,
            m.rss_kib as f64 / 1024.0
        )
    };
    if r.zygotes.is_empty() {
        let _ = writeln!(out, "template zygote: none found");
    }
    for z in &r.zygotes {
        let _ = writeln!(
            out,
            "template zygote pid {} (daemon pid {}; one per template, not per sandbox):",
            z.pid, z.daemon
        );
        let _ = writeln!(
            out,
            "  before the sandboxes: {}",
            z.before.as_ref().map_or("not running yet".into(), &mib)
        );
        let _ = writeln!(
            out,
            "  with the sandboxes:   {}",
            z.with_sandboxes.as_ref().map_or("unreadable".into(), &mib)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "success: {}/{} created, first run_code {}/{}, second {}/{}",
        r.created,
        p.sandboxes,
        r.created - r.first_run_failed,
        r.created,
        r.created - r.second_run_failed,
        r.created
    );
    for e in &r.create_errors {
        let _ = writeln!(out, "  create failed {}x: {}", e.count, e.message);
    }
    for e in &r.run_errors {
        let _ = writeln!(out, "  run_code failed {}x: {}", e.count, e.message);
    }
    for e in &r.kill_errors {
        let _ = writeln!(out, "  kill failed {}x: {}", e.count, e.message);
    }
    out.push_str(
        "(create = request sent -> 201; run_code = request sent -> end_of_execution, the \
         result checked; PSS shares each page among the processes mapping it, USS = \
         Private_Clean + Private_Dirty, RSS counts shared pages in full; sums over each \
         sandbox's cgroup; MiB = 2^20 bytes)\n",
    );
    out
}

/// The human report: the seed report's columns, then failures.
fn api_create_table(r: &cubicle_bench::api_create::Report, template: &str, url: &str) -> String {
    use std::fmt::Write as _;
    let p = &r.plan;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "api-create: POST /v2/sandboxes (template {template}) then DELETE, at {url}"
    );
    let _ = writeln!(
        out,
        "{:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7}",
        "concurrency", "requests", "avg", "min", "p50", "p90", "p95", "p99", "max", "wall", "per"
    );
    let cells = match &r.create_ms {
        Some(s) => [s.avg, s.min, s.p50, s.p90, s.p95, s.p99, s.max].map(|v| format!("{v:.1}")),
        None => std::array::from_fn(|_| "-".to_owned()),
    };
    let _ = writeln!(
        out,
        "{:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9.1} {:>7.2}",
        p.concurrency,
        p.requests,
        cells[0],
        cells[1],
        cells[2],
        cells[3],
        cells[4],
        cells[5],
        cells[6],
        r.wall_ms,
        r.per_ms
    );
    let _ = writeln!(
        out,
        "success {}/{} ({:.1}%); {} warm-up round{} of {} discarded{}",
        r.ok,
        p.requests,
        r.success_pct,
        p.warmup_rounds,
        if p.warmup_rounds == 1 { "" } else { "s" },
        p.concurrency,
        if r.warmup_failures > 0 {
            format!(" ({} failed)", r.warmup_failures)
        } else {
            String::new()
        }
    );
    for e in &r.errors {
        let _ = writeln!(out, "  create failed {}x: {}", e.count, e.message);
    }
    for e in &r.kill_errors {
        let _ = writeln!(out, "  kill failed {}x: {}", e.count, e.message);
    }
    out.push_str(
        "(milliseconds; create = request sent -> 201, sent once the sandbox's envd answers; \
         wall = first create -> last kill done; per = wall / requests)\n",
    );
    out
}

async fn ns_create(
    data: &DataDir,
    agent_bin: Option<PathBuf>,
    args: BenchNsCreateArgs,
) -> anyhow::Result<ExitCode> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let name: TemplateName = args.template.parse()?;
    let store = TemplateStore::new(data.clone());
    let template = store.get(&name)?;
    let layers = template.layers(&store)?;
    let runtime = super::ns_runtime(data, agent_bin)?;
    let peers = args
        .peers
        .iter()
        .map(|p| cubicle_bench::peers::make(p, &template.rootfs))
        .collect::<Result<Vec<_>, _>>()?;
    let spec = || {
        let id = SandboxId::generate();
        SandboxSpec {
            agent: AgentConfig::new(id.to_string()),
            id,
            layers: layers.clone(),
            uid_shift: template.meta.uid_shift,
            limits: Limits::default(),
            writable_layer_mib: args.writable_layer_size,
        }
    };
    let progress = |i: usize, n: usize| {
        eprint!("\rround {i}/{n}");
        let _ = std::io::stderr().flush();
    };
    let rows =
        cubicle_bench::ns_create::run(&runtime, spec, peers, args.runs, args.warmup, progress)
            .await
            .context("ns-create benchmark")?;
    eprintln!();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    let base = rows[0].summary.p50;
    println!(
        "{:<14} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>9}  timed",
        "contender", "n", "min", "p50", "p90", "p99", "max", "avg", "p50/ours"
    );
    for r in &rows {
        let s = &r.summary;
        println!(
            "{:<14} {:>5} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {:>8.2}x  {}",
            r.name,
            s.n,
            s.min,
            s.p50,
            s.p90,
            s.p99,
            s.max,
            s.avg,
            s.p50 / base,
            r.what
        );
    }
    println!(
        "(milliseconds; c=1; {} warm-up rounds discarded)",
        args.warmup
    );
    Ok(ExitCode::SUCCESS)
}
