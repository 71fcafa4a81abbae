//! `cubicle sandbox ...`: sandboxes driven directly through the `ns` runtime. (The
//! daemon's API takes over these commands once it exists; the output stays the same.)

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use cubicle_core::{DataDir, Limits, SandboxId, TemplateName};
use cubicle_envd::client::EnvdClient;
use cubicle_envd::proto::{DataEvent, ProcessEvent, StartRequest};
use cubicle_runtime::{AgentConfig, Runtime, SandboxSpec};
use cubicle_template::TemplateStore;

use crate::args::{SandboxCommand, SandboxCreateArgs, SandboxExecArgs};

/// Runs one `sandbox` subcommand.
pub async fn run(
    data: &DataDir,
    agent_bin: Option<PathBuf>,
    cmd: SandboxCommand,
) -> anyhow::Result<ExitCode> {
    let runtime = super::ns_runtime(data, agent_bin)?;
    match cmd {
        SandboxCommand::Create(args) => create(data, &runtime, args).await,
        SandboxCommand::Ls(flags) => {
            let sandboxes = runtime.list().await?;
            if flags.json {
                println!("{}", serde_json::to_string_pretty(&sandboxes)?);
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{:<22} {:>8}  TEMPLATE", "ID", "PID")?;
                for s in sandboxes {
                    writeln!(out, "{:<22} {:>8}  {}", s.id, s.pid, template_of(&s.rootfs))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Exec(args) => exec(&runtime, args).await,
        SandboxCommand::Kill(args) => {
            for id in &args.ids {
                let id: SandboxId = id.parse()?;
                runtime
                    .destroy(&id)
                    .await
                    .with_context(|| format!("killing sandbox {id}"))?;
                eprintln!("killed {id}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn create(
    data: &DataDir,
    runtime: &cubicle_runtime::ns::NsRuntime,
    args: SandboxCreateArgs,
) -> anyhow::Result<ExitCode> {
    let name: TemplateName = args.template.parse()?;
    let template = TemplateStore::new(data.clone()).get(&name)?;
    let id = SandboxId::generate();
    let mut agent = AgentConfig::new(id.to_string());
    agent.env_vars = parse_env(&args.env)?;
    let spec = SandboxSpec {
        id,
        rootfs: template.rootfs.clone(),
        uid_shift: template.meta.uid_shift,
        limits: Limits {
            cpu_count: args.cpu,
            memory_mb: args.memory_mb,
            pids: args.pids,
        },
        agent,
    };
    let info = runtime.create(spec).await.context("creating the sandbox")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{}", info.id);
    }
    Ok(ExitCode::SUCCESS)
}

async fn exec(
    runtime: &cubicle_runtime::ns::NsRuntime,
    args: SandboxExecArgs,
) -> anyhow::Result<ExitCode> {
    let id: SandboxId = args.id.parse()?;
    let Some(info) = runtime.list().await?.into_iter().find(|s| s.id == id) else {
        bail!("sandbox {id} is not running");
    };
    let client = EnvdClient::new(&info.agent_socket);
    let mut request = StartRequest::shell(args.command.join(" "));
    request.process.envs = parse_env(&args.env)?;
    request.process.cwd = args.cwd;
    let timeout = args.timeout.map(Duration::from_secs);
    let mut stream = client
        .start(&request, args.user.as_deref(), timeout)
        .await?;
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    while let Some(msg) = stream.next().await {
        match msg?.event {
            ProcessEvent::Data(DataEvent::Stdout(b)) | ProcessEvent::Data(DataEvent::Pty(b)) => {
                stdout.write_all(&b)?;
                stdout.flush()?;
            }
            ProcessEvent::Data(DataEvent::Stderr(b)) => {
                stderr.write_all(&b)?;
                stderr.flush()?;
            }
            ProcessEvent::End(end) => return Ok(ExitCode::from(shell_exit_code(&end))),
            ProcessEvent::Start { .. } | ProcessEvent::Keepalive {} => {}
        }
    }
    bail!("the command's stream ended without an end event")
}

/// The exit code a shell would report: the process's own, or 128 + signal.
fn shell_exit_code(end: &cubicle_envd::proto::EndEvent) -> u8 {
    if end.exited {
        return end.exit_code.clamp(0, 255) as u8;
    }
    match end.status.as_str() {
        "signal: killed" => 137,
        "signal: terminated" => 143,
        "signal: interrupt" => 130,
        _ => 1,
    }
}

/// `KEY=VALUE` pairs.
pub fn parse_env(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("environment variable {p:?} is not KEY=VALUE"),
        })
        .collect()
}

/// The template name of a rootfs path (`.../templates/<name>/rootfs`).
fn template_of(rootfs: &std::path::Path) -> String {
    rootfs
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "x=y");
        assert_eq!(env["C"], "");
        assert!(parse_env(&["NOEQUALS".into()]).is_err());
        assert!(parse_env(&["=v".into()]).is_err());
    }

    #[test]
    fn exit_codes() {
        let end = |exited, exit_code, status: &str| cubicle_envd::proto::EndEvent {
            exit_code,
            exited,
            status: status.into(),
            error: None,
        };
        assert_eq!(shell_exit_code(&end(true, 3, "exit status 3")), 3);
        assert_eq!(shell_exit_code(&end(false, -1, "signal: killed")), 137);
    }
}
