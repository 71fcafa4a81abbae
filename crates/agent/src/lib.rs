//! The in-sandbox agent: pid 1 of every sandbox and its envd server.
//!
//! It listens on a unix socket that the runtime shares with the host
//! (`/run/cubicle/agent.sock` inside, `sandboxes/<id>/run/agent.sock` outside) and
//! serves, over HTTP/1.1:
//! - envd's Connect RPCs: `process.Process/*` ([`process`]) and
//!   `filesystem.Filesystem/*` ([`filesystem`], [`watch`]);
//! - `GET/POST /files` ([`files`]), `GET /health`, `GET /envs`;
//! - `CONNECT 127.0.0.1:<port>` tunnels to any TCP port inside the sandbox, for the
//!   host only ([`tunnel`]).
//!
//! In templates that enable it, it also serves E2B's code interpreter on
//! `127.0.0.1:49999` ([`interpreter`]); in templates with a main service (an image's
//! entrypoint) it starts and watches that service ([`service`]).
//!
//! It runs on a single-threaded tokio runtime and never needs a new thread, so a fork
//! bomb that exhausts the sandbox's pids limit cannot take it down; as pid 1 it reaps
//! every orphan ([`reaper`]).

pub mod auth;
pub mod files;
pub mod filesystem;
pub mod interpreter;
pub mod paths;
pub mod process;
pub mod reaper;
pub mod rpc;
pub mod server;
pub mod service;
pub mod tunnel;
pub mod users;
pub mod watch;

use std::fs::File;
use std::os::fd::FromRawFd;

use cubicle_runtime::AgentConfig;

/// Entry point of `cubicle-agent serve`: reads the configuration from `config_fd`,
/// binds the socket, reports readiness and serves until killed.
pub fn serve_main(config_fd: i32) -> ! {
    // SAFETY: the init process passed us this memfd; nothing else owns it.
    let file = unsafe { File::from_raw_fd(config_fd) };
    let config: AgentConfig = match serde_json::from_reader(file) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cubicle-agent: bad configuration: {e}");
            std::process::exit(2)
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("CUBICLE_AGENT_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .with_ansi(false)
        .init();
    // Nobody inside the sandbox, not even its root, may ptrace us or read our memory.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cubicle-agent: tokio runtime: {e}");
            std::process::exit(1)
        }
    };
    let result = runtime.block_on(server::run(config));
    if let Err(e) = result {
        tracing::error!(error = %e, "agent stopped");
        eprintln!("cubicle-agent: {e}");
    }
    std::process::exit(1)
}
