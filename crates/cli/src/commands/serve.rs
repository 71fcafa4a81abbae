//! `cubicle serve`: the daemon. One process per data dir (a lock file enforces it); on
//! start it reconciles the store with the sandboxes that still run (they survive daemon
//! restarts), and on the very first start it creates an API key and prints it.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cubicle_control::{ControlConfig, Controller};
use cubicle_core::DataDir;
use cubicle_template::TemplateStore;

use crate::args::ServeArgs;

/// How long open requests may run on after a stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// File holding the key created on first start (0600), for the admin's set-up script.
pub const INITIAL_KEY_FILE: &str = "initial-api-key";

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(
    data: &DataDir,
    agent_bin: Option<PathBuf>,
    args: ServeArgs,
) -> anyhow::Result<ExitCode> {
    if nix::unistd::geteuid().as_raw() != 0 {
        bail!("cubicle serve must run as root (sandboxes need namespaces and cgroups)");
    }
    std::fs::create_dir_all(data.root())
        .with_context(|| format!("creating {}", data.root().display()))?;
    let _lock = lock_data_dir(data)?;
    let store = super::keys::open_store(data)?;
    if store.key_count()? == 0 {
        let (record, key) = store.create_key("default")?;
        let path = data.root().join(INITIAL_KEY_FILE);
        write_secret(&path, &key)?;
        // Printed once, on stdout, for whoever started the daemon.
        println!("created API key '{}': {key}", record.name);
        println!(
            "(shown once; also in {} for the set-up script)",
            path.display()
        );
    }
    let runtime = Arc::new(super::ns_runtime(data, agent_bin)?);
    let config = ControlConfig {
        default_timeout: Duration::from_secs(args.default_timeout),
        max_timeout: Duration::from_secs(args.max_timeout),
        hibernate_after: (args.hibernate_after > 0)
            .then(|| Duration::from_secs(args.hibernate_after)),
        hibernate_below_mib: (args.hibernate_below_mib > 0).then_some(args.hibernate_below_mib),
        ..ControlConfig::default()
    };
    let ns = runtime.clone();
    let controller = Controller::start(
        config,
        runtime,
        store,
        TemplateStore::new(data.clone()).deleting_in_background(),
    )
    .await
    .context("starting the control plane")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let domain = args
        .domain
        .unwrap_or_else(|| format!("localhost:{}", args.listen.port()));
    tracing::info!(listen = %args.listen, %domain, data_dir = %data.root().display(), "cubicle serve ready");
    eprintln!("cubicle serve listening on http://{}", args.listen);
    let state = cubicle_api::AppState::new(controller, Some(domain));
    // On SIGTERM/SIGINT stop accepting, let open requests finish for a while, then go:
    // a client streaming a long command must not keep the daemon alive forever (the
    // sandbox and its command keep running either way).
    let stopping = Arc::new(tokio::sync::Notify::new());
    let signalled = stopping.clone();
    let shutdown = async move {
        shutdown_signal().await;
        signalled.notify_one();
    };
    let server = cubicle_api::serve(listener, state, shutdown);
    tokio::select! {
        served = server => served.context("serving")?,
        _ = async {
            stopping.notified().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still open after the grace period; stopping anyway");
        }
    }
    // Ready-made writable layers are mounts; sandboxes' own layers stay with them.
    ns.drain_layer_pool();
    tracing::info!("stopped; sandboxes keep running and are adopted by the next start");
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}

/// Holds `<data>/serve.lock` for the life of the daemon: two daemons on one data dir
/// would reconcile away each other's sandboxes.
fn lock_data_dir(data: &DataDir) -> anyhow::Result<nix::fcntl::Flock<File>> {
    let path = data.root().join("serve.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another cubicle serve already runs on {} ({e})",
            data.root().display()
        )
    })
}

fn write_secret(path: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{secret}")?;
    Ok(())
}
