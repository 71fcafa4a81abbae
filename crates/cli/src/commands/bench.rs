//! `cubicle bench ...`: benchmarks with peers in the same run (see docs/benchmarks.md).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use cubicle_core::{DataDir, Limits, SandboxId, TemplateName};
use cubicle_runtime::{AgentConfig, SandboxSpec};
use cubicle_template::TemplateStore;

use crate::args::{BenchCommand, BenchNsCreateArgs};

/// Runs one benchmark.
pub async fn run(
    data: &DataDir,
    agent_bin: Option<PathBuf>,
    cmd: BenchCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::NsCreate(args) => ns_create(data, agent_bin, args).await,
    }
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
    let template = TemplateStore::new(data.clone()).get(&name)?;
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
            rootfs: template.rootfs.clone(),
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
