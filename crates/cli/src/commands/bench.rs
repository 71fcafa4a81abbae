//! `cubicle bench ...`: benchmarks with peers in the same run (see docs/benchmarks.md).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use cubicle_core::{DataDir, Limits, SandboxId, TemplateName};
use cubicle_runtime::{AgentConfig, SandboxSpec};
use cubicle_template::TemplateStore;

use crate::args::{BenchApiCreateArgs, BenchCommand, BenchNsCreateArgs};

/// Runs one benchmark.
pub async fn run(
    data: &DataDir,
    agent_bin: Option<PathBuf>,
    cmd: BenchCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::NsCreate(args) => ns_create(data, agent_bin, args).await,
        BenchCommand::ApiCreate(args) => api_create(args).await,
    }
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
    // Check the daemon, the key and the template before measuring anything.
    if let Err(e) = client.health().await {
        return Ok(usage_error(e));
    }
    let explain = |e: cubicle_client::ClientError| super::explain(e.into(), &client);
    match client.templates().await {
        Ok(t) if t.iter().any(|t| t.template_id == args.template) => {}
        Ok(t) => {
            let names: Vec<&str> = t.iter().map(|t| t.template_id.as_str()).collect();
            return Ok(usage_error(format!(
                "the daemon at {} has no template {:?} (it has: {})",
                client.base_url(),
                args.template,
                if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                }
            )));
        }
        Err(e) => return Ok(usage_error(explain(e))),
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
