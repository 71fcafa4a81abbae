//! `cubicle keys ...`: API keys, managed directly in the data dir's database (this needs
//! access to the data dir, i.e. the machine's administrator).

use std::process::ExitCode;

use anyhow::Context;
use cubicle_core::DataDir;
use cubicle_store::Store;

use crate::args::KeysCommand;

/// The daemon's database in the data dir.
pub fn open_store(data: &DataDir) -> anyhow::Result<Store> {
    let path = data.root().join("cubicle.db");
    Store::open(&path).with_context(|| format!("opening {}", path.display()))
}

/// Runs one `keys` subcommand.
pub fn run(data: &DataDir, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    let store = open_store(data)?;
    match cmd {
        KeysCommand::Create(args) => {
            let (record, key) = store.create_key(&args.name)?;
            eprintln!(
                "created API key '{}' (shown once, store it now):",
                record.name
            );
            println!("{key}");
        }
        KeysCommand::Ls(flags) => {
            let keys = store.list_keys()?;
            if flags.json {
                let out: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "name": k.name, "prefix": k.prefix,
                            "createdAtMs": k.created_at_ms, "lastUsedAtMs": k.last_used_at_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!(
                    "{:<24} {:<14} {:<20} LAST USED",
                    "NAME", "PREFIX", "CREATED"
                );
                for k in keys {
                    println!(
                        "{:<24} e2b_{:<10} {:<20} {}",
                        k.name,
                        k.prefix,
                        super::when(k.created_at_ms),
                        k.last_used_at_ms
                            .map(super::when)
                            .unwrap_or_else(|| "never".into())
                    );
                }
            }
        }
        KeysCommand::Rm(args) => {
            if !store.delete_key(&args.name)? {
                anyhow::bail!("no API key named '{}'", args.name);
            }
            eprintln!("deleted API key '{}'", args.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
