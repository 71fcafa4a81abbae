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
    /// Create, list, inspect, use and kill sandboxes through the daemon's API.
    #[command(subcommand, alias = "sbx", after_help = API_ENV_HELP)]
    Sandbox(SandboxCommand),
    /// Measure performance (see docs/benchmarks.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run the daemon: the E2B-compatible API and sandbox proxy on one port.
    Serve(ServeArgs),
    /// Manage API keys (directly in the data dir's database).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// List and remove snapshots of sandboxes (`sandbox snapshot` takes them).
    #[command(subcommand, alias = "snap", after_help = API_ENV_HELP)]
    Snapshot(SnapshotCommand),
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List your snapshots, newest first: ID, SANDBOX, TEMPLATE, SIZE, CREATED.
    #[command(alias = "list", after_help = API_ENV_HELP)]
    Ls(SnapshotLsArgs),
    /// Delete snapshots; missing ones are reported and skipped (exit code 1).
    #[command(after_help = API_ENV_HELP)]
    Rm(SnapshotRmArgs),
}

#[derive(Debug, Args)]
pub struct SnapshotLsArgs {
    /// Only snapshots of this sandbox.
    #[arg(long)]
    pub sandbox: Option<String>,
    /// Print the daemon's objects as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SnapshotRmArgs {
    /// Snapshot ids (`my-snap:default`, or the name).
    #[arg(required = true)]
    pub ids: Vec<String>,
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
    /// Seconds a sandbox may stay paused (frozen, in memory) before it hibernates (its
    /// memory is checkpointed to disk and freed); 0: only when a pause asks for it.
    #[arg(long, env = "CUBICLE_HIBERNATE_AFTER", default_value_t = 600)]
    pub hibernate_after: u64,
    /// When the host's available memory falls below this many MiB, paused sandboxes
    /// hibernate at once, longest paused first; 0: never for this reason.
    #[arg(long, env = "CUBICLE_HIBERNATE_BELOW_MIB", default_value_t = 1024)]
    pub hibernate_below_mib: u64,
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

/// How the sandbox commands find the daemon (shown in their `--help`).
const API_ENV_HELP: &str = "\
The daemon (`cubicle serve`) is found through the environment, as the E2B SDK finds it:
  E2B_API_URL      its API (default http://127.0.0.1:3000)
  E2B_API_KEY      an API key (CUBICLE_API_KEY also works); `cubicle keys create <name>`
                   makes one, and the daemon's first key is in <data dir>/initial-api-key
  E2B_SANDBOX_URL  where `exec` reaches sandboxes (default: E2B_API_URL)
Errors from the daemon print `error: <message>` and exit 1; bad arguments exit 2.";

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Start a sandbox and print its id. It lives until its timeout or `kill`.
    #[command(after_help = API_ENV_HELP)]
    Create(SandboxCreateArgs),
    /// List your sandboxes: ID, TEMPLATE, STATE, STARTED, ENDS, METADATA.
    ///
    /// Newest first; STARTED is UTC, ENDS is the time left until the daemon kills the
    /// sandbox. `--json` prints the daemon's objects (E2B's ListedSandbox).
    #[command(alias = "list", after_help = API_ENV_HELP)]
    Ls(SandboxLsArgs),
    /// Show one sandbox.
    #[command(after_help = API_ENV_HELP)]
    Get(SandboxGetArgs),
    /// Run a command in a sandbox, streaming its output; exits with its exit code.
    ///
    /// The command runs as `bash -l -c '<command...>'`, through the daemon's sandbox
    /// proxy with the sandbox's envd access token, as the E2B SDK's `commands.run`.
    /// The exit code is the command's, or 128 + signal if it was killed.
    #[command(after_help = API_ENV_HELP)]
    Exec(SandboxExecArgs),
    /// Run code in a sandbox's code interpreter, streaming its output.
    ///
    /// For sandboxes of a template with the code interpreter (`code-interpreter`), as
    /// the `e2b-code-interpreter` SDK's `run_code`: the code runs as a notebook cell in
    /// the language's default context (state is kept between runs) or in `--context`.
    /// Printed text streams to stdout/stderr, the value of the last expression is
    /// printed after it (rich results as `[html]`, `[png]`...), and an error prints its
    /// traceback on stderr and exits 1.
    #[command(after_help = API_ENV_HELP)]
    RunCode(SandboxRunCodeArgs),
    /// Kill sandboxes; missing ones are reported and skipped.
    ///
    /// A sandbox that does not exist (any more) is reported on stderr as `sandbox <id>
    /// not found` and skipped, as E2B's kill answers False for it. The exit code is 1
    /// only if none of the given sandboxes existed, or the daemon failed for one.
    #[command(after_help = API_ENV_HELP)]
    Kill(SandboxKillArgs),
    /// Pause sandboxes: every process stops where it is, memory kept, until `resume`.
    ///
    /// A paused sandbox answers no traffic and its timeout does not run. Pausing one
    /// that is already paused is reported and is not an error. The exit code is 1 if a
    /// sandbox was not found or the daemon failed for one.
    #[command(after_help = API_ENV_HELP)]
    Pause(SandboxPauseArgs),
    /// Resume paused sandboxes where they stopped.
    ///
    /// Each one's timeout starts again from now (`--timeout`, or the daemon's default).
    /// Resuming a running sandbox only extends its timeout, if that is later.
    #[command(after_help = API_ENV_HELP)]
    Resume(SandboxResumeArgs),
    /// Snapshot a sandbox (memory, processes, files) and print the snapshot's id.
    ///
    /// The sandbox runs on (a paused one stays paused). `sandbox create -t <snapshot>`
    /// starts new sandboxes from it, `sandbox rollback` puts this sandbox back to it.
    #[command(after_help = API_ENV_HELP)]
    Snapshot(SandboxSnapshotArgs),
    /// Put a sandbox back to one of its own snapshots: same id and token, running.
    ///
    /// Every process and file is the snapshot's again; its timeout starts again from
    /// now. If the restore fails the sandbox is gone (recorded as killed).
    #[command(after_help = API_ENV_HELP)]
    Rollback(SandboxRollbackArgs),
    /// Clone a running sandbox N times (E2B's fork) and print the new ids.
    ///
    /// The sandbox is checkpointed once and each clone is restored from that
    /// checkpoint with its own id. Exit code 1 if any clone failed.
    #[command(after_help = API_ENV_HELP)]
    Clone(SandboxCloneArgs),
}

#[derive(Debug, Args)]
pub struct SandboxSnapshotArgs {
    /// Sandbox id.
    pub id: String,
    /// Name the snapshot (its id is then `<name>:default`).
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Args)]
pub struct SandboxRollbackArgs {
    /// Sandbox id.
    pub id: String,
    /// One of its snapshots.
    pub snapshot: String,
}

#[derive(Debug, Args)]
pub struct SandboxCloneArgs {
    /// Sandbox id.
    pub id: String,
    /// How many clones (1-20).
    #[arg(short = 'n', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub count: u32,
    /// Seconds until the daemon kills each clone (default: 300).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct SandboxPauseArgs {
    /// Sandbox ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Hibernate: checkpoint the memory to disk and free it (resume takes longer than
    /// from a frozen pause). Pausing already hibernates after the daemon's
    /// `--hibernate-after`.
    #[arg(long)]
    pub hibernate: bool,
}

#[derive(Debug, Args)]
pub struct SandboxIdsArgs {
    /// Sandbox ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SandboxResumeArgs {
    /// Sandbox ids.
    #[arg(required = true)]
    pub ids: Vec<String>,
    /// Seconds until the daemon kills the sandbox (default: the daemon's, 300).
    #[arg(long)]
    pub timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct SandboxCreateArgs {
    /// Template to start from.
    #[arg(long, short, default_value = "base")]
    pub template: String,
    /// Seconds until the daemon kills the sandbox (default: the daemon's, 300).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
    /// Environment variable for every process in the sandbox (repeatable).
    #[arg(long = "env", short, value_name = "KEY=VALUE", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// Label, filterable with `ls --metadata` (repeatable).
    #[arg(long, short, value_name = "KEY=VALUE", value_parser = key_value)]
    pub metadata: Vec<(String, String)>,
    /// Print the daemon's JSON (with the envd access token) instead of the bare id.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SandboxLsArgs {
    /// Only sandboxes with this label (repeatable; all must match).
    #[arg(long, short, value_name = "KEY=VALUE", value_parser = key_value)]
    pub metadata: Vec<(String, String)>,
    /// Only sandboxes in these states (repeatable or comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub state: Vec<StateArg>,
    /// Print the daemon's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A sandbox state to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    /// Running sandboxes.
    Running,
    /// Paused sandboxes.
    Paused,
}

#[derive(Debug, Args)]
pub struct SandboxGetArgs {
    /// The sandbox.
    pub id: String,
    /// Print the daemon's JSON (with the envd access token) instead of a summary.
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
    #[arg(long = "env", short, value_name = "KEY=VALUE", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// Kill the command after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// The command line, run by `bash -l -c` like the E2B SDK's `commands.run`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SandboxRunCodeArgs {
    /// The sandbox.
    pub id: String,
    /// The code; `-` reads it from stdin.
    pub code: String,
    /// Language of the default context to run in: python (default), javascript, bash.
    #[arg(long, short, conflicts_with = "context")]
    pub language: Option<String>,
    /// A context made through the SDK's `create_code_context` (`POST /contexts`).
    #[arg(long)]
    pub context: Option<String>,
    /// Environment variable for this run only (repeatable).
    #[arg(long = "env", short, value_name = "KEY=VALUE", value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// Stop waiting after this many seconds (the run is interrupted, exit code 124).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,
}

#[derive(Debug, Args)]
pub struct SandboxKillArgs {
    /// Sandboxes to kill.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

/// `KEY=VALUE` (the value may be empty and contain `=`).
pub fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Sandbox start latency of the ns runtime: create until the agent answers
    /// /health, one at a time, next to peers started on the same rootfs.
    NsCreate(BenchNsCreateArgs),
    /// Sandbox creation through the E2B API of a running `cubicle serve`, like the seed's
    /// cube-bench: each of C workers creates a sandbox (POST /v2/sandboxes, answered once
    /// envd is up; timed) and kills it at once (untimed), until N creates are done.
    #[command(after_help = BENCH_API_HELP)]
    ApiCreate(BenchApiCreateArgs),
    /// Code-interpreter sandboxes through a running `cubicle serve` on this host: create
    /// latency, first `run_code` latency and idle memory of N sandboxes alive together,
    /// next to the seed's figures. Needs root.
    ///
    /// N sandboxes are created one after another (POST /v2/sandboxes, timed until 201);
    /// right after each create `1+1` runs twice through the sandbox proxy (port 49999,
    /// timed from request to end_of_execution; the result must be 2). Once every
    /// sandbox's CPU time has stopped growing for 1 s (or the idle timeout passed),
    /// each sandbox's memory is the sum of PSS, USS and RSS over the processes of its
    /// cgroup (/proc/<pid>/smaps_rollup), and MemAvailable's drop is divided by N. All
    /// sandboxes are killed at the end, also on Ctrl-C or an error.
    #[command(after_help = BENCH_CODE_INTERPRETER_HELP)]
    CodeInterpreter(BenchCodeInterpreterArgs),
    /// Snapshots, create from a snapshot, rollback, clone, pause and resume through the
    /// E2B API of a running `cubicle serve`, one at a time, next to the seed's figures.
    ///
    /// Each round creates a sandbox (untimed), pauses it (POST /sandboxes/{id}/pause)
    /// and resumes it (POST /v2/sandboxes/{id}/connect), snapshots it (POST
    /// /sandboxes/{id}/snapshots), creates a sandbox from the snapshot (POST
    /// /v2/sandboxes, timed until 201), rolls the first back to it (POST
    /// /sandboxes/{id}/rollback), hibernates it (a pause that checkpoints it to disk) and
    /// resumes it again. Then a second sandbox gets --dirty-mib MiB of memory
    /// made dirty by a background Python process (untimed; done once its RSS is there)
    /// and is snapshotted, created from, cloned once and 5 times (POST
    /// /sandboxes/{id}/fork) and rolled back. Each operation is timed from the request
    /// sent to the answer. Every sandbox and snapshot of the run is removed at the end,
    /// also on Ctrl-C or an error.
    #[command(after_help = BENCH_SNAPSHOT_HELP)]
    SnapshotOps(BenchSnapshotArgs),
    /// Seed §3.2: C workers create N sandboxes through the API (each killed at once, or
    /// kept with -m create-only); the seed's metrics plus wall and per.
    #[command(alias = "cold-start", after_help = BENCH_SCENARIO_HELP, allow_negative_numbers = true)]
    Create(BenchCreateArgs),
    /// Seed §3.3: idle sandboxes launched in batches and kept; MemAvailable and each
    /// sandbox's PSS after each batch, the per-sandbox overhead and this host's projected
    /// capacity. Stops before a batch that would eat into a 10% headroom. Needs root and
    /// the daemon on this host (its --data-dir).
    #[command(after_help = BENCH_SCENARIO_HELP, allow_negative_numbers = true)]
    Density(BenchDensityArgs),
    /// Seed §4.1: each round snapshots C fresh sandboxes at once; wall and per-snapshot.
    #[command(after_help = BENCH_SCENARIO_HELP, allow_negative_numbers = true)]
    Snapshot(BenchBatchArgs),
    /// Seed §4.2: write D MB into /dev/shm of a fresh sandbox, snapshot it, and create a
    /// sandbox from that snapshot (both timed), serially.
    #[command(after_help = BENCH_SCENARIO_HELP, allow_negative_numbers = true)]
    SnapshotDirty(BenchDirtyArgs),
    /// Seed §4.3: one snapshot; each round creates C sandboxes from it at once.
    #[command(after_help = BENCH_SCENARIO_HELP, allow_negative_numbers = true)]
    CreateFromSnapshot(BenchBatchArgs),
    /// Seed §4.4: each round, C fresh sandboxes each snapshot themselves and roll back to
    /// it, all at once.
    #[command(after_help = BENCH_SCENARIO_HELP, allow_negative_numbers = true)]
    Rollback(BenchBatchArgs),
    /// Seed §4.5: each round clones a source sandbox (10 MiB in /dev/shm) N times with C
    /// fork requests at once.
    #[command(after_help = BENCH_SCENARIO_HELP, allow_negative_numbers = true)]
    Clone(BenchCloneArgs),
    /// Seed §4.6: each round pauses C fresh sandboxes at once and resumes them at once,
    /// then hibernates them (memory to disk, the seed's kind of pause) and resumes them.
    #[command(after_help = BENCH_SCENARIO_HELP, allow_negative_numbers = true)]
    PauseResume(BenchBatchArgs),
    /// Every scenario above with the seed's parameter sets, in one run.
    #[command(after_help = BENCH_SCENARIO_HELP)]
    All(BenchAllArgs),
}

const BENCH_SCENARIO_HELP: &str = "\
Metrics as in the seed report, in milliseconds: avg, min, p50, p90, p95, p99, max of each
operation (request sent -> answer); for batches wall (first request sent -> last answer)
and per (= wall avg / operations per batch). Warm-up rounds run first and are discarded;
rounds run serially. The seed's published figures (a 16-core host) are shown next to
Cubicle's. --peers adds crun, runc, bubblewrap and runsc starting the template's rootfs
to a `ready` line, and CRIU dumping/restoring a small process tree (a peer that is not
installed shows \"not installed\"). --report DIR writes report.md, results.json and SVG
charts. Exit codes: 0 all operations succeeded, 1 some failed, 2 bad parameters or a
daemon that cannot be reached, refuses the key or lacks the template. The daemon and key
come from E2B_API_URL (default http://127.0.0.1:3000) and E2B_API_KEY.";

/// What every seed scenario shares.
#[derive(Debug, Args, Clone)]
pub struct BenchCommonArgs {
    /// Template to create sandboxes from.
    #[arg(long, short, default_value = "base")]
    pub template: String,
    /// Also measure the peers (crun, runc, bubblewrap, runsc, CRIU) in the same run.
    #[arg(long)]
    pub peers: bool,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Write a Markdown report, results.json and SVG charts into this directory.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchCreateArgs {
    /// Workers creating sandboxes at the same time.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,
    /// Sandboxes to create in the measured part.
    #[arg(long = "requests", short = 'n', default_value_t = 20)]
    pub requests: usize,
    /// Warm-up rounds (one create per worker each), not counted.
    #[arg(long, short = 'w', default_value_t = 3)]
    pub warmup: usize,
    /// `create-only` keeps the sandboxes alive (until --timeout) instead of killing them.
    #[arg(long, short = 'm', value_name = "MODE")]
    pub mode: Option<String>,
    /// Lifetime of the sandboxes, seconds (create-only keeps them this long).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    #[command(flatten)]
    pub common: BenchCommonArgs,
}

#[derive(Debug, Args)]
pub struct BenchDensityArgs {
    /// Batch sizes, comma-separated (the seed's: cumulative 1, 5, 10, 20).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 5, 10])]
    pub batches: Vec<usize>,
    #[command(flatten)]
    pub common: BenchCommonArgs,
}

#[derive(Debug, Args)]
pub struct BenchBatchArgs {
    /// Operations sent at once (one sandbox each).
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,
    /// Measured rounds.
    #[arg(long = "rounds", short = 'n', default_value_t = 5)]
    pub rounds: usize,
    /// Warm-up rounds, not counted.
    #[arg(long, short = 'w', default_value_t = 1)]
    pub warmup: usize,
    #[command(flatten)]
    pub common: BenchCommonArgs,
}

#[derive(Debug, Args)]
pub struct BenchDirtyArgs {
    /// MB (MiB) written into /dev/shm before the snapshot.
    #[arg(long = "dirty", short = 'd', value_name = "MB", default_value_t = 0)]
    pub dirty_mb: u64,
    /// Measured rounds.
    #[arg(long = "rounds", short = 'n', default_value_t = 3)]
    pub rounds: usize,
    /// Warm-up rounds, not counted.
    #[arg(long, short = 'w', default_value_t = 1)]
    pub warmup: usize,
    #[command(flatten)]
    pub common: BenchCommonArgs,
}

#[derive(Debug, Args)]
pub struct BenchCloneArgs {
    /// Clones per round.
    #[arg(short = 'n', default_value_t = 1)]
    pub clones: usize,
    /// Fork requests at once (the clones are split evenly between them).
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,
    /// Measured rounds.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Warm-up rounds, not counted.
    #[arg(long, short = 'w', default_value_t = 1)]
    pub warmup: usize,
    #[command(flatten)]
    pub common: BenchCommonArgs,
}

#[derive(Debug, Args)]
pub struct BenchAllArgs {
    #[command(flatten)]
    pub common: BenchCommonArgs,
}

const BENCH_SNAPSHOT_HELP: &str = "\
Reported per operation in milliseconds: n, min, p50, p90, p99, max, avg, the seed's figure
(its c=1 average, chapter 4) and p50 / seed; the 5-clone fork is reported per clone (the
call's time / 5). Also the snapshots' image sizes (sizeBytes) and the dirtying process's
RSS. Warm-up rounds (-w) run the same operations first and are not counted. Failed
operations are counted and listed, what depends on them is skipped; the exit code is 1 if
any operation, set-up step, kill or delete failed. Bad parameters, or a daemon that cannot
be reached, refuses the key or lacks the template exit 2. The daemon and key come from
E2B_API_URL (default http://127.0.0.1:3000) and E2B_API_KEY; commands reach sandboxes
through E2B_SANDBOX_URL (default: E2B_API_URL). The template needs python3 and bash.";

#[derive(Debug, Args)]
pub struct BenchSnapshotArgs {
    /// Measured rounds (each operation once per round).
    #[arg(long = "rounds", short = 'n', default_value_t = 10)]
    pub rounds: usize,
    /// Warm-up rounds, not counted.
    #[arg(long, short, default_value_t = 1)]
    pub warmup: usize,
    /// Template to create sandboxes from.
    #[arg(long, short, default_value = "base")]
    pub template: String,
    /// MiB of memory made dirty in the second sandbox before its snapshot and clones.
    #[arg(long, value_name = "MIB", default_value_t = 8)]
    pub dirty_mib: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

const BENCH_CODE_INTERPRETER_HELP: &str = "\
Reported: create, first and second run_code latency in milliseconds (n, min, p50, p90,
p99, max, avg); per-sandbox PSS, USS (Private_Clean + Private_Dirty) and RSS in MiB
(min, p50, p90, max, avg, sum); MemAvailable before the first measured create and with
all N idle; the template zygote's PSS/USS/RSS (a one-time cost per template), before
and with the sandboxes. Warm-up sandboxes (-w) are created, used and killed first, not
counted. Failed creates or runs are counted and listed; the exit code is 1 if any failed.
Bad parameters, not being root, or a daemon that cannot be reached, refuses the key,
lacks the template or whose sandboxes are not in this host's cgroups for --data-dir
exit 2. The daemon and key come from E2B_API_URL (default http://127.0.0.1:3000) and
E2B_API_KEY; the sandboxes' cgroups are found from --data-dir (the daemon's data dir).";

const BENCH_API_HELP: &str = "\
Reported in milliseconds: n, avg, min, p50, p90, p95, p99, max of the successful creates;
wall = first create sent -> last sandbox created and killed; per = wall / N. A warm-up
round is one create+kill per worker, all workers at once, and is not counted.
Failed creates are counted and listed (success rate); the exit code is 1 if any failed.
Bad parameters (zero, C > N) or a daemon that cannot be reached or refuses the key exit 2.
The daemon and key come from E2B_API_URL (default http://127.0.0.1:3000) and E2B_API_KEY.";

#[derive(Debug, Args)]
pub struct BenchApiCreateArgs {
    /// Workers creating sandboxes at the same time.
    #[arg(long, short = 'c', default_value_t = 1)]
    pub concurrency: usize,
    /// Sandboxes to create in the measured part.
    #[arg(long = "requests", short = 'n', default_value_t = 100)]
    pub requests: usize,
    /// Warm-up rounds (one create per worker each), not counted.
    #[arg(long, short = 'w', default_value_t = 3)]
    pub warmup: usize,
    /// Template to create sandboxes from.
    #[arg(long, short, default_value = "base")]
    pub template: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchCodeInterpreterArgs {
    /// Sandboxes to create and keep alive together.
    #[arg(long = "sandboxes", short = 'n', default_value_t = 50)]
    pub sandboxes: usize,
    /// Warm-up sandboxes (created, used and killed before measuring), not counted.
    #[arg(long, short, default_value_t = 1)]
    pub warmup: usize,
    /// Template to create sandboxes from (must have the code interpreter).
    #[arg(long, short, default_value = "code-interpreter")]
    pub template: String,
    /// Longest wait, in seconds, for the sandboxes to stop using CPU before memory is
    /// read.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub idle_timeout: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
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
    /// Peers to measure in the same run: crun, runc, bwrap, runsc (repeatable).
    #[arg(long = "peer", value_name = "PEER")]
    pub peers: Vec<String>,
    /// Give each Cubicle sandbox a writable layer of this size (its own filesystem),
    /// to measure what the limit costs.
    #[arg(long, value_parser = parse_layer_size, value_name = "SIZE")]
    pub writable_layer_size: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TplCommand {
    /// Build a built-in template: `base`, or `code-interpreter` (alias
    /// `code-interpreter-v1`), a layer on `base`. Does nothing when the template is
    /// already built from the current recipe, unless --rebuild is given. A layer's
    /// parent is built first when it is missing or outdated.
    Build(TplBuildArgs),
    /// Build a template from a container image: an OCI image layout directory, an OCI
    /// archive (a tar of one, optionally gzipped) or a `docker save` tarball.
    ///
    /// The daemon builds it as a job (E2B_API_URL, E2B_API_KEY as for every client
    /// command; paths are the daemon host's): this command submits it and follows its
    /// phases (queued, pulling, unpacking, building, snapshotting) and log until it is
    /// ready (exit 0, with the template's summary) or failed (exit 1, with the reason).
    /// The build takes the image's linux/amd64 variant, checks every layer's sha256
    /// digest, applies the layers with their whiteouts, adds the account `user` (uid
    /// 1000) if the image lacks it (the image must have /bin/sh; the agent is
    /// Cubicle's), and records the image config in template.json.
    #[command(after_help = API_ENV_HELP)]
    CreateFromImage(Box<TplCreateFromImageArgs>),
    /// List templates: the daemon's, or with --local those built in the data dir.
    ///
    /// With an API key in the environment (E2B_API_KEY or CUBICLE_API_KEY) this asks the
    /// daemon at E2B_API_URL (GET /templates), like every other client command. Without
    /// one, or with --local, it reads the data dir and needs no daemon.
    #[command(alias = "list")]
    Ls(TplLsArgs),
    /// Show everything known about a template: source (recipe or image: format,
    /// digest, platform, layers), size, build time, sandbox defaults, service, probe,
    /// exposed ports and (through the daemon) its builds.
    ///
    /// With an API key in the environment this asks the daemon (GET /templates/{id});
    /// without one, or with --local, it reads the data dir.
    #[command(alias = "inspect", after_help = API_ENV_HELP)]
    Info(TplInfoArgs),
    /// Delete a template. Refused while sandboxes (running or paused), snapshots or
    /// templates built on it use it.
    ///
    /// With an API key in the environment this goes through the daemon (DELETE
    /// /templates/{id}), which checks every use; when no daemon answers, or without a
    /// key, the data dir is changed directly (only templates built on it are checked
    /// then).
    #[command(alias = "remove", after_help = API_ENV_HELP)]
    Rm(TplRmArgs),
    /// Build a template again from its source: a built-in template as `tpl build
    /// --rebuild` does (locally); a template from an image through the daemon, from the
    /// request of its last build (registry credentials are never stored: give them
    /// again). Refused while the template is in use.
    #[command(after_help = API_ENV_HELP)]
    Rebuild(TplRebuildArgs),
}

#[derive(Debug, Args)]
pub struct TplBuildArgs {
    /// Which built-in template (name or alias).
    #[arg(default_value = "base")]
    pub name: String,
    /// Build again even if the recipe did not change (only this template, not its
    /// parent).
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
pub struct TplCreateFromImageArgs {
    /// The image: a path (an OCI layout directory, an OCI archive or a `docker save`
    /// tarball) or a registry reference (`host[:port]/repo[:tag]` or
    /// `host[:port]/repo@sha256:<hex>`).
    ///
    /// It is a path if it starts with `/`, `./`, `../` or `~`, or if it exists;
    /// otherwise a reference, whose first component must be a registry host (with a `.`
    /// or `:`, or `localhost`): Docker Hub images are spelled out, e.g.
    /// `docker.io/library/debian:12`. Registries are reached over HTTPS, loopback ones
    /// (127.0.0.0/8, ::1, localhost) over plain HTTP. Multi-platform images resolve to
    /// linux/amd64. Layers are cached by digest in <data>/cache/blobs and shared by all
    /// templates: a layer already there is not downloaded again.
    #[arg(long)]
    pub image: String,
    /// Name of the new template (default: a generated `tpl-...`). Must not be taken.
    #[arg(long = "template-id")]
    pub template_id: Option<String>,
    /// User name for the registry.
    #[arg(long, requires = "registry_password")]
    pub registry_username: Option<String>,
    /// Password (or token) for the registry.
    #[arg(
        long,
        env = "CUBICLE_REGISTRY_PASSWORD",
        hide_env_values = true,
        requires = "registry_username"
    )]
    pub registry_password: Option<String>,
    /// Size limit of each sandbox's writable layer, e.g. `1G` or `512M`: writes past it
    /// fail with ENOSPC inside the sandbox.
    #[arg(long, value_parser = parse_layer_size, value_name = "SIZE")]
    pub writable_layer_size: Option<u64>,
    /// A TCP port the image's service listens on (repeatable); reachable as
    /// `{port}-{sandbox id}.{domain}` through the daemon.
    #[arg(long = "expose-port", value_name = "PORT")]
    pub expose_ports: Vec<u16>,
    /// The template is ready when an HTTP GET on this port inside a sandbox answers.
    #[arg(long, value_name = "PORT")]
    pub probe: Option<u16>,
    /// Path of the probe's request.
    #[arg(long, default_value = "/", requires = "probe")]
    pub probe_path: String,
    /// How long the probe may take before the build fails, seconds.
    #[arg(long, default_value_t = 60, requires = "probe")]
    pub probe_timeout: u64,
    /// Program to run instead of the image's entrypoint.
    #[arg(long)]
    pub cmd: Option<String>,
    /// Argument replacing the image's cmd (repeatable).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// Environment variable `K=V` added to the image's (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory instead of the image's.
    #[arg(long)]
    pub workdir: Option<String>,
    /// User the service runs as instead of the image's (name or uid[:gid]).
    #[arg(long)]
    pub user: Option<String>,
    /// CPUs of each sandbox of the template (default: the daemon's).
    #[arg(long)]
    pub cpu: Option<u32>,
    /// Memory of each sandbox of the template, e.g. `512M` or `2G` (default: the
    /// daemon's).
    #[arg(long, value_parser = parse_size_mib, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Build in this process, in the data dir, instead of as a daemon job (no daemon
    /// needed; the data dir must be the daemon's for it to see the template).
    #[arg(long)]
    pub local: bool,
}

/// `512M`, `1G`, `1.5G`, `2048` (MiB) → MiB.
pub fn parse_size_mib(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let unit = t[i..].to_ascii_uppercase();
            let mult = match unit.as_str() {
                "M" => 1.0,
                "G" => 1024.0,
                "T" => 1024.0 * 1024.0,
                _ => return Err(format!("unknown unit in '{s}': use M, G or T")),
            };
            (&t[..i], mult)
        }
        _ => (t, 1.0),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512M, 1G)"))?;
    let mib = (n * mult).round();
    if !(mib >= 1.0 && mib < (1u64 << 40) as f64) {
        return Err(format!("'{s}' is not a size of at least 1M"));
    }
    Ok(mib as u64)
}

/// `--writable-layer-size`: a size ([`parse_size_mib`]) in the range a writable layer
/// may have (16 MiB to 16 TiB).
pub fn parse_layer_size(s: &str) -> Result<u64, String> {
    let mib = parse_size_mib(s)?;
    let (min, max) = cubicle_core::Limits::WRITABLE_LAYER_MIB;
    if !(min..=max).contains(&mib) {
        return Err(format!(
            "'{s}' is out of range for a writable layer: {min}M to {}T",
            max >> 20
        ));
    }
    Ok(mib)
}

/// `K=V` → `(K, V)`.
fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => Err(format!("'{s}' is not K=V")),
    }
}

#[derive(Debug, Args)]
pub struct TplLsArgs {
    /// Read the data dir instead of asking the daemon (`GET /templates`), which is what
    /// happens whenever E2B_API_KEY (or CUBICLE_API_KEY) is set.
    #[arg(long)]
    pub local: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TplRmArgs {
    /// The template to delete.
    pub name: String,
    /// Change the data dir directly instead of asking the daemon.
    #[arg(long)]
    pub local: bool,
}

#[derive(Debug, Args)]
pub struct TplInfoArgs {
    /// The template (name or alias).
    pub name: String,
    /// Read the data dir instead of asking the daemon.
    #[arg(long)]
    pub local: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TplRebuildArgs {
    /// The template to build again.
    pub name: String,
    /// User name for the registry (image templates).
    #[arg(long, requires = "registry_password")]
    pub registry_username: Option<String>,
    /// Password (or token) for the registry.
    #[arg(
        long,
        env = "CUBICLE_REGISTRY_PASSWORD",
        hide_env_values = true,
        requires = "registry_username"
    )]
    pub registry_password: Option<String>,
    /// Debian mirror URL (built-in templates).
    #[arg(long, env = "CUBICLE_DEBIAN_MIRROR")]
    pub mirror: Option<String>,
    /// Print the result as JSON (image templates).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_in_mib() {
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("1.5g"), Ok(1536));
        assert_eq!(parse_size_mib("2048"), Ok(2048));
        for bad in ["", "G", "1K", "-1G", "0", "abc", "1e40"] {
            assert!(parse_size_mib(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn writable_layer_sizes_have_a_floor() {
        assert_eq!(parse_layer_size("64M"), Ok(64));
        assert_eq!(parse_layer_size("1G"), Ok(1024));
        let small = parse_layer_size("1M").unwrap_err();
        assert!(
            small.contains("out of range for a writable layer: 16M"),
            "{small}"
        );
        assert!(parse_layer_size("1.2.3M")
            .unwrap_err()
            .contains("is not a size"));
    }

    #[test]
    fn env_overrides_are_k_equals_v() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }
}
