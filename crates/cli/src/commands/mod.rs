//! One module per subcommand.

mod bench;
mod keys;
mod layer_bars;
mod sandbox;
mod serve;
mod snapshot;
mod tpl;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use cubicle_core::DataDir;
use cubicle_runtime::ns::{NsConfig, NsRuntime};

use crate::args::{Cli, Command};

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let data = DataDir::new(&cli.data_dir);
    let agent_bin = cli.agent_bin;
    match cli.command {
        Command::Tpl(cmd) => tpl::run(&data, agent_bin, cmd),
        Command::Sandbox(cmd) => block_on(sandbox::run(cmd)),
        Command::Bench(cmd) => block_on(bench::run(&data, agent_bin, cmd)),
        Command::Serve(args) => block_on(serve::run(&data, agent_bin, args)),
        Command::Keys(cmd) => keys::run(&data, cmd),
        Command::Snapshot(cmd) => block_on(snapshot::run(cmd)),
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// The `ns` runtime for this data dir, with the agent binary found next to `cubicle`
/// unless given.
pub fn ns_runtime(data: &DataDir, agent_bin: Option<PathBuf>) -> anyhow::Result<NsRuntime> {
    let agent_bin = match agent_bin {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating the cubicle executable")?
            .with_file_name("cubicle-agent"),
    };
    NsRuntime::new(NsConfig::new(data.clone(), agent_bin)).context("starting the ns runtime")
}

/// An API failure as the CLI prints it: the daemon's message, with a hint for a key the
/// daemon does not accept (its message is only "Invalid API key").
pub fn explain(e: anyhow::Error, api: &cubicle_client::ApiClient) -> anyhow::Error {
    match e.downcast_ref::<cubicle_client::ClientError>() {
        Some(c) if c.is_unauthorized() => anyhow::anyhow!(
            "{c}: the daemon at {} does not accept the key in E2B_API_KEY \
             (`cubicle keys create <name>` makes one)",
            api.base_url()
        ),
        _ => e,
    }
}

/// A unix-ms instant as `YYYY-MM-DD HH:MM` UTC.
pub fn when(ms: i64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| "?".into())
}

/// Rows under a header, columns padded to their widest cell.
pub fn columns<const N: usize>(header: [&str; N], rows: Vec<[String; N]>) -> String {
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for cells in std::iter::once(header.map(String::from)).chain(rows) {
        let line = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
