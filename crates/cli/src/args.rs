//! Command-line arguments (clap structs only; behaviour lives in `commands/`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Cubicle: self-hosted sandboxes for AI agents.
#[derive(Debug, Parser)]
#[command(name = "cubicle", version, about)]
pub struct Cli {
    /// Data directory (templates, sandboxes, state).
    #[arg(long, global = true, env = "CUBICLE_DATA_DIR", default_value = cubicle_core::DataDir::DEFAULT)]
    pub data_dir: PathBuf,

    /// The `cubicle-agent` binary (default: next to this executable).
    #[arg(long, global = true, env = "CUBICLE_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build, list and remove templates.
    #[command(subcommand)]
    Tpl(TplCommand),
    /// Create, inspect, use and kill sandboxes (directly through the runtime).
    #[command(subcommand, alias = "sbx")]
    Sandbox(SandboxCommand),
    /// Measure performance (see docs/benchmarks.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the daemon: the E2B-compatible API and sandbox proxy on one port.
    Serve(ServeArgs),
    /// Manage API keys (directly in the data dir's database).
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CUBICLE_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: std::net::SocketAddr,
    /// Sandbox host names are `{port}-{id}.{domain}` (default: localhost:<listen port>).
    #[arg(long, env = "CUBICLE_DOMAIN")]
    pub domain: Option<String>,
    /// Lifetime in seconds of sandboxes created without a timeout.
    #[arg(long, default_value_t = 300)]
    pub default_timeout: u64,
    /// Longest timeout in seconds a client may ask for.
    #[arg(long, default_value_t = 86_400)]
    pub max_timeout: u64,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (the only time it is shown).
    Create(KeyNameArgs),
    /// List keys (names and prefixes, never the keys).
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// Delete a key; its sandboxes keep running until they time out.
    #[command(alias = "remove")]
    Rm(KeyNameArgs),
}

#[derive(Debug, Args)]
pub struct KeyNameArgs {
    /// The key's name.
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Start a sandbox and print its id; it runs until killed.
    Create(SandboxCreateArgs),
    /// List running sandboxes.
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    Exec(SandboxExecArgs),
    /// Kill sandboxes (killing one that is gone succeeds).
    Kill(SandboxKillArgs),
}

#[derive(Debug, Args)]
pub struct SandboxCreateArgs {
    /// Template to start from.
    #[arg(long, short, default_value = "base")]
    pub template: String,
    /// CPU limit in whole CPUs.
    #[arg(long, default_value_t = cubicle_core::Limits::default().cpu_count)]
    pub cpu: u32,
    /// Memory limit in MiB.
    #[arg(long, default_value_t = cubicle_core::Limits::default().memory_mb)]
    pub memory_mb: u64,
    /// Process limit.
    #[arg(long, default_value_t = cubicle_core::Limits::default().pids)]
    pub pids: u32,
    /// Environment variable for every process in the sandbox (repeatable).
    #[arg(long = "env", short, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Print JSON instead of the bare id.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SandboxExecArgs {
    /// The sandbox.
    pub id: String,
    /// User to run as.
    #[arg(long, short)]
    pub user: Option<String>,
    /// Working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Extra environment variable (repeatable).
    #[arg(long = "env", short, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Kill the command after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// The command line, run by `bash -l -c` like the E2B SDK's `commands.run`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SandboxKillArgs {
    /// Sandboxes to kill.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Sandbox start latency of the ns runtime: create until the agent answers
    /// /health, one at a time, next to peers started on the same rootfs.
    NsCreate(BenchNsCreateArgs),
}

#[derive(Debug, Args)]
pub struct BenchNsCreateArgs {
    /// Measured runs per contender.
    #[arg(long = "runs", short = 'n', default_value_t = 100)]
    pub runs: usize,
    /// Warm-up runs per contender (not counted).
    #[arg(long, short, default_value_t = 5)]
    pub warmup: usize,
    /// Template whose rootfs everyone starts.
    #[arg(long, short, default_value = "base")]
    pub template: String,
    /// Peers to measure in the same run: crun, runc, bwrap (repeatable).
    #[arg(long = "peer", value_name = "PEER")]
    pub peers: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TplCommand {
    /// Build a built-in template (only `base` for now). Does nothing when the template
    /// is already built from the current recipe, unless --rebuild is given.
    Build(TplBuildArgs),
    /// List built templates.
    #[command(alias = "list")]
    Ls(JsonFlag),
    /// Delete a built template (sandboxes must not be using it).
    #[command(alias = "remove")]
    Rm(TplRmArgs),
}

#[derive(Debug, Args)]
pub struct TplBuildArgs {
    /// Which built-in template.
    #[arg(default_value = "base")]
    pub name: String,
    /// Build again even if the recipe did not change.
    #[arg(long)]
    pub rebuild: bool,
    /// Debian mirror URL (default: the host's apt sources).
    #[arg(long, env = "CUBICLE_DEBIAN_MIRROR")]
    pub mirror: Option<String>,
    /// Print every line of build output instead of a summary.
    #[arg(long, short)]
    pub verbose: bool,
}

#[derive(Debug, Args)]
pub struct TplRmArgs {
    /// The template to delete.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
