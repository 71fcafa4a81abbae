//! `ns-create`: from "create" to an agent answering `GET /health`, one sandbox at a
//! time, interleaved round by round with the peers so drift hits everyone alike.

use std::time::{Duration, Instant};

use cubicle_envd::client::EnvdClient;
use cubicle_runtime::{Runtime, SandboxSpec};
use serde::Serialize;

use crate::peers::{Peer, PeerError};
use crate::stats::Summary;

/// What one contender measured.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Contender.
    pub name: String,
    /// What was timed.
    pub what: String,
    /// Statistics in ms.
    pub summary: Summary,
}

/// Why the scenario failed.
#[derive(Debug, thiserror::Error)]
pub enum NsCreateError {
    /// Creating or destroying a sandbox failed.
    #[error("sandbox")]
    Runtime(#[from] cubicle_runtime::RuntimeError),
    /// The agent did not answer.
    #[error("agent health check")]
    Health(#[from] cubicle_envd::client::ClientError),
    /// A peer failed.
    #[error("peer")]
    Peer(#[from] PeerError),
}

/// Runs `warmup + runs` rounds; each round creates one sandbox (timed until /health
/// answers 2xx), destroys it (untimed), then runs each peer once.
pub async fn run(
    runtime: &dyn Runtime,
    mut spec: impl FnMut() -> SandboxSpec,
    peers: Vec<Box<dyn Peer>>,
    runs: usize,
    warmup: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Row>, NsCreateError> {
    let mut ours = Vec::with_capacity(runs);
    let mut theirs: Vec<Vec<Duration>> = vec![Vec::with_capacity(runs); peers.len()];
    for round in 0..warmup + runs {
        progress(round + 1, warmup + runs);
        let spec = spec();
        let id = spec.id.clone();
        let started = Instant::now();
        let info = runtime.create(spec).await?;
        let status = EnvdClient::new(&info.agent_socket).health().await?;
        let took = started.elapsed();
        runtime.destroy(&id).await?;
        if !status.is_success() {
            return Err(NsCreateError::Health(
                cubicle_envd::client::ClientError::Status {
                    status,
                    body: "health check failed".into(),
                },
            ));
        }
        let mut peer_times = Vec::with_capacity(peers.len());
        for peer in peers.iter() {
            peer_times.push(peer.run_once()?);
        }
        if round >= warmup {
            ours.push(took);
            for (all, t) in theirs.iter_mut().zip(peer_times) {
                all.push(t);
            }
        }
    }
    let mut rows = vec![Row {
        name: format!("cubicle ({})", runtime.name()),
        what: "create → agent answers /health".into(),
        summary: Summary::of(&ours).expect("runs > 0"),
    }];
    for (peer, samples) in peers.iter().zip(theirs) {
        rows.push(Row {
            name: peer.name().to_owned(),
            what: "run /bin/true to exit".into(),
            summary: Summary::of(&samples).expect("runs > 0"),
        });
    }
    Ok(rows)
}
