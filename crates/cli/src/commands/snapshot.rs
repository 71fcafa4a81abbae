//! `cubicle snapshot ...`: the key's snapshots through the daemon's API (`cubicle
//! sandbox snapshot` takes them).

use std::io::Write;
use std::process::ExitCode;

use cubicle_client::{ApiClient, ClientError, Snapshot};

use crate::args::SnapshotCommand;

/// Runs one `snapshot` subcommand.
pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<ExitCode> {
    let api = ApiClient::from_env()?;
    let result = match cmd {
        SnapshotCommand::Ls(args) => ls(&api, args.sandbox.as_deref(), args.json).await,
        SnapshotCommand::Rm(args) => rm(&api, &args.ids).await,
    };
    result.map_err(|e| super::explain(e, &api))
}

async fn ls(api: &ApiClient, sandbox: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let snapshots = api.snapshots(sandbox).await?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&snapshots)?)?;
    } else {
        write!(out, "{}", table(&snapshots))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The `ls` table, columns padded to their widest cell.
fn table(snapshots: &[Snapshot]) -> String {
    let header = ["ID", "SANDBOX", "TEMPLATE", "SIZE", "CREATED"];
    let rows: Vec<[String; 5]> = snapshots
        .iter()
        .map(|s| {
            [
                s.snapshot_id.clone(),
                s.sandbox_id.clone().unwrap_or_default(),
                s.template_id.clone().unwrap_or_default(),
                s.size_bytes.map(size).unwrap_or_default(),
                s.created_at
                    .map(|t| super::when(t.timestamp_millis()))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    super::columns(header, rows)
}

/// Bytes as `12.3 MiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Deletes each snapshot; missing ones are reported and skipped. Transport and key
/// problems stop at once. Exit code 1 if any was missing or failed.
async fn rm(api: &ApiClient, ids: &[String]) -> anyhow::Result<ExitCode> {
    let mut failed = 0;
    for id in ids {
        match api.delete_snapshot(id).await {
            Ok(true) => eprintln!("deleted {id}"),
            Ok(false) => {
                eprintln!("snapshot {id} not found");
                failed += 1;
            }
            Err(e @ (ClientError::Unreachable { .. } | ClientError::NoApiKey)) => {
                return Err(e.into())
            }
            Err(e) if e.is_unauthorized() => return Err(e.into()),
            Err(e) => {
                eprintln!("error: {id}: {e}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_table() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
        let s: Snapshot = serde_json::from_value(serde_json::json!({
            "snapshotID": "my-snap:default", "names": ["main/my-snap:default"],
            "sandboxID": "abc", "templateID": "base",
            "createdAt": "2026-01-02T03:04:05.000Z", "sizeBytes": 2097152
        }))
        .unwrap();
        let t = table(&[s]);
        let lines: Vec<_> = t.lines().collect();
        assert_eq!(
            lines[0],
            "ID               SANDBOX  TEMPLATE  SIZE     CREATED"
        );
        assert_eq!(
            lines[1],
            "my-snap:default  abc      base      2.0 MiB  2026-01-02 03:04"
        );
    }
}
