//! `cubicle sandbox ...`: sandboxes through the daemon's E2B API (`cubicle serve` owns
//! them), found through `E2B_API_URL` / `E2B_API_KEY` like the E2B SDK finds it. `exec`
//! goes through the daemon's sandbox proxy (`E2B_SANDBOX_URL`), as the SDK's
//! `commands.run` does.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use chrono::{DateTime, Utc};
use cubicle_client::{
    ApiClient, ClientError, CodeEvent, CodeResult, CreateSandbox, ListParams, RunCode,
    SandboxDetail, SandboxState,
};
use cubicle_envd::client::{ClientError as EnvdError, EnvdClient};
use cubicle_envd::proto::{DataEvent, ProcessEvent, StartRequest};

use crate::args::{
    SandboxCommand, SandboxCreateArgs, SandboxExecArgs, SandboxLsArgs, SandboxRunCodeArgs, StateArg,
};

/// Runs one `sandbox` subcommand.
pub async fn run(cmd: SandboxCommand) -> anyhow::Result<ExitCode> {
    let api = ApiClient::from_env()?;
    let result = match cmd {
        SandboxCommand::Create(args) => create(&api, args).await,
        SandboxCommand::Ls(args) => ls(&api, args).await,
        SandboxCommand::Get(args) => {
            let detail = api.get(&args.id).await?;
            let mut out = std::io::stdout().lock();
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&detail)?)?;
            } else {
                write!(out, "{}", describe(&detail, Utc::now()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Exec(args) => exec(&api, args).await,
        SandboxCommand::RunCode(args) => run_code(&api, args).await,
        SandboxCommand::Kill(args) => kill(&api, &args.ids).await,
        SandboxCommand::Pause(args) => pause(&api, &args.ids, args.hibernate).await,
        SandboxCommand::Resume(args) => resume(&api, &args.ids, args.timeout).await,
        SandboxCommand::Snapshot(args) => {
            let snap = api.snapshot(&args.id, args.name.as_deref()).await?;
            println!("{}", snap.snapshot_id);
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Rollback(args) => {
            let sbx = api.rollback(&args.id, &args.snapshot).await?;
            eprintln!("rolled back {} to {}", sbx.sandbox_id, args.snapshot);
            Ok(ExitCode::SUCCESS)
        }
        SandboxCommand::Clone(args) => clone(&api, &args.id, args.count, args.timeout).await,
    };
    result.map_err(|e| super::explain(e, &api))
}

async fn create(api: &ApiClient, args: SandboxCreateArgs) -> anyhow::Result<ExitCode> {
    let mut request = CreateSandbox::new(args.template);
    request.timeout = args.timeout;
    request.env_vars = args.env.into_iter().collect();
    request.metadata = args.metadata.into_iter().collect();
    let sandbox = api.create(&request).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&sandbox)?);
    } else {
        println!("{}", sandbox.sandbox_id);
    }
    Ok(ExitCode::SUCCESS)
}

async fn ls(api: &ApiClient, args: SandboxLsArgs) -> anyhow::Result<ExitCode> {
    let params = ListParams {
        metadata: args.metadata,
        states: args
            .state
            .iter()
            .map(|s| match s {
                StateArg::Running => SandboxState::Running,
                StateArg::Paused => SandboxState::Paused,
            })
            .collect(),
        limit: Some(1000),
        ..ListParams::default()
    };
    let sandboxes = api.list_all(&params).await?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&sandboxes)?)?;
    } else {
        write!(out, "{}", table(&sandboxes, Utc::now()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The `ls` table: a header and one row per sandbox, columns padded to their widest cell.
fn table(sandboxes: &[SandboxDetail], now: DateTime<Utc>) -> String {
    let header = ["ID", "TEMPLATE", "STATE", "STARTED", "ENDS", "METADATA"];
    let rows: Vec<[String; 6]> = sandboxes
        .iter()
        .map(|s| {
            [
                s.sandbox_id.clone(),
                s.template_id.clone(),
                s.state.clone(),
                clock(s.started_at),
                until(s.end_at, now),
                labels(s),
            ]
        })
        .collect();
    super::columns(header, rows)
}

/// `get`'s summary (no access token: that is for `--json`).
fn describe(s: &SandboxDetail, now: DateTime<Utc>) -> String {
    let fields = [
        ("ID", s.sandbox_id.clone()),
        ("TEMPLATE", s.template_id.clone()),
        ("STATE", s.state.clone()),
        ("STARTED", format!("{} UTC", clock(s.started_at))),
        (
            "ENDS",
            format!("{} UTC ({})", clock(s.end_at), until(s.end_at, now)),
        ),
        ("CPUS", s.cpu_count.to_string()),
        ("MEMORY", format!("{} MiB", s.memory_mb)),
        ("DISK", format!("{} MiB", s.disk_size_mb)),
        ("ENVD", s.envd_version.clone()),
        ("METADATA", labels(s)),
    ];
    fields
        .iter()
        .map(|(k, v)| format!("{k:<10}{v}\n"))
        .collect()
}

/// `2026-05-20 14:31:02` (UTC).
fn clock(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// How long until `end`: `in 4m 59s`, `in 2h 05m`, or `now` once it has passed.
fn until(end: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (end - now).num_seconds();
    match secs {
        ..=0 => "now".into(),
        1..=59 => format!("in {secs}s"),
        60..=3599 => format!("in {}m {:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("in {}h {:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("in {}d {}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// `k=v,k2=v2`, or `-` without labels.
fn labels(s: &SandboxDetail) -> String {
    if s.metadata.is_empty() {
        return "-".into();
    }
    s.metadata
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Kills each sandbox. Missing ones are reported and skipped; the daemon being
/// unreachable or refusing the key stops at once.
async fn kill(api: &ApiClient, ids: &[String]) -> anyhow::Result<ExitCode> {
    let (mut killed, mut failed) = (0, 0);
    for id in ids {
        match api.kill(id).await {
            Ok(true) => {
                eprintln!("killed {id}");
                killed += 1;
            }
            Ok(false) => eprintln!("sandbox {id} not found"),
            Err(e @ (ClientError::Unreachable { .. } | ClientError::NoApiKey)) => {
                return Err(e.into())
            }
            Err(e) if e.is_unauthorized() => return Err(e.into()),
            Err(e) => {
                eprintln!("error: killing {id}: {e}");
                failed += 1;
            }
        }
    }
    Ok(if failed == 0 && killed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn pause(api: &ApiClient, ids: &[String], hibernate: bool) -> anyhow::Result<ExitCode> {
    each(ids, |id| async move {
        let done = match hibernate {
            true => api.hibernate(&id).await?,
            false => api.pause(&id).await?,
        };
        Ok(match (done, hibernate) {
            (true, false) => format!("paused {id}"),
            (true, true) => format!("hibernated {id}"),
            (false, _) => format!("sandbox {id} is already paused"),
        })
    })
    .await
}

async fn resume(api: &ApiClient, ids: &[String], timeout: Option<u64>) -> anyhow::Result<ExitCode> {
    each(ids, |id| async move {
        let was = api.get(&id).await?.state;
        api.connect(&id, timeout).await?;
        Ok(match was.as_str() {
            "paused" => format!("resumed {id}"),
            _ => format!("sandbox {id} is already running"),
        })
    })
    .await
}

/// Prints each clone's id on stdout, each failure on stderr; exit code 1 if any failed.
async fn clone(api: &ApiClient, id: &str, count: u32, timeout: u64) -> anyhow::Result<ExitCode> {
    let results = api.fork(id, count, Some(timeout)).await?;
    let mut failed = 0;
    for r in results {
        match (r.sandbox, r.error) {
            (Some(s), _) => println!("{}", s.sandbox_id),
            (None, error) => {
                failed += 1;
                let message = error
                    .as_ref()
                    .and_then(|e| e.get("message"))
                    .and_then(|m| m.as_str())
                    .unwrap_or("the clone did not start")
                    .to_owned();
                eprintln!("error: clone of {id}: {message}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Runs `op` on every id, reporting each outcome on stderr; transport and key problems
/// stop at once. Exit code 1 if any failed.
async fn each<F, Fut>(ids: &[String], op: F) -> anyhow::Result<ExitCode>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Result<String, ClientError>>,
{
    let mut failed = 0;
    for id in ids {
        match op(id.clone()).await {
            Ok(done) => eprintln!("{done}"),
            Err(e @ (ClientError::Unreachable { .. } | ClientError::NoApiKey)) => {
                return Err(e.into())
            }
            Err(e) if e.is_unauthorized() => return Err(e.into()),
            Err(e) if e.is_not_found() => {
                eprintln!("sandbox {id} not found");
                failed += 1;
            }
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

async fn exec(api: &ApiClient, args: SandboxExecArgs) -> anyhow::Result<ExitCode> {
    let sandbox = api.get(&args.id).await?;
    if sandbox.state != "running" {
        bail!(
            "sandbox {} is {}, not running",
            sandbox.sandbox_id,
            sandbox.state
        );
    }
    let client = EnvdClient::via_proxy(
        api.sandbox_url(),
        &sandbox.sandbox_id,
        sandbox.envd_access_token.as_deref(),
    )?;
    let mut request = StartRequest::shell(args.command.join(" "));
    request.process.envs = args.env.into_iter().collect();
    request.process.cwd = args.cwd;
    let timeout = args.timeout.map(Duration::from_secs);
    let id = &sandbox.sandbox_id;
    let mut stream = client
        .start(&request, args.user.as_deref(), timeout)
        .await
        .map_err(|e| envd_error(id, e))?;
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    while let Some(msg) = stream.next().await {
        match msg.map_err(|e| envd_error(id, e))?.event {
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

async fn run_code(api: &ApiClient, args: SandboxRunCodeArgs) -> anyhow::Result<ExitCode> {
    let code = if args.code == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        args.code
    };
    let sandbox = api.get(&args.id).await?;
    if sandbox.state != "running" {
        bail!(
            "sandbox {} is {}, not running",
            sandbox.sandbox_id,
            sandbox.state
        );
    }
    let request = RunCode {
        code,
        language: args.language,
        context_id: args.context,
        env_vars: args.env.into_iter().collect(),
    };
    let id = &sandbox.sandbox_id;
    let mut run = api
        .run_code(id, sandbox.envd_access_token.as_deref(), &request)
        .await
        .map_err(|e| code_error(id, e))?;
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    let mut failed = false;
    let stream = async {
        while let Some(event) = run.next().await {
            match event.map_err(|e| code_error(id, e))? {
                CodeEvent::Stdout { text } => {
                    stdout.write_all(text.as_bytes())?;
                    stdout.flush()?;
                }
                CodeEvent::Stderr { text } => {
                    stderr.write_all(text.as_bytes())?;
                    stderr.flush()?;
                }
                CodeEvent::Result(result) => {
                    stdout.write_all(show_result(&result).as_bytes())?;
                    stdout.flush()?;
                }
                CodeEvent::Error {
                    name,
                    value,
                    traceback,
                } => {
                    failed = true;
                    let text = if traceback.trim().is_empty() {
                        format!("{name}: {value}")
                    } else {
                        traceback
                    };
                    writeln!(stderr, "{}", text.trim_end())?;
                }
                CodeEvent::EndOfExecution | CodeEvent::UnexpectedEndOfExecution => return Ok(true),
                CodeEvent::NumberOfExecutions { .. } | CodeEvent::Unknown => {}
            }
        }
        Ok::<_, anyhow::Error>(false)
    };
    let ended = match args.timeout {
        Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), stream).await {
            Ok(ended) => ended?,
            Err(_) => {
                // Dropping the answer makes the interpreter interrupt the run.
                eprintln!("error: the code did not finish within {secs} s; interrupted");
                return Ok(ExitCode::from(124));
            }
        },
        None => stream.await?,
    };
    if !ended {
        bail!("the interpreter's answer ended before the execution did");
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// How `run-code` prints a result: its text, followed by the names of what text cannot
/// show (images, charts); a result without text by the names of all its formats.
fn show_result(result: &CodeResult) -> String {
    /// Formats that are other renderings of what the text says.
    const TEXTUAL: &[&str] = &["html", "markdown", "latex", "json", "data", "javascript"];
    let text = result.text.as_deref().unwrap_or_default();
    let formats: Vec<&str> = result
        .other_formats()
        .into_iter()
        .filter(|f| text.is_empty() || !TEXTUAL.contains(f))
        .collect();
    let mut out = text.to_owned();
    for f in formats {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("[{f}]"));
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// One readable line for a code interpreter failure: the interpreter's or the proxy's
/// message.
fn code_error(id: &str, e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api {
            status, message, ..
        } => {
            let message = message
                .strip_prefix(&format!("{}: ", status.as_u16()))
                .unwrap_or(&message)
                .to_owned();
            if status == 502 && message.contains("was not found") {
                anyhow!("sandbox {id} was not found (killed or timed out)")
            } else if status == 502 {
                anyhow!(
                    "sandbox {id} has no code interpreter answering on port {} ({message}); \
                     start it from a template with one, e.g. `--template code-interpreter`",
                    cubicle_client::INTERPRETER_PORT
                )
            } else {
                anyhow!("the code interpreter answered {status}: {message}")
            }
        }
        other => anyhow::Error::new(other).context(format!("running code in {id}")),
    }
}

/// One readable line for an envd or proxy failure: the agent's own message for Connect
/// errors, the proxy's `message` for its JSON errors ("The sandbox was not found" once
/// the sandbox is gone).
fn envd_error(id: &str, e: EnvdError) -> anyhow::Error {
    match e {
        EnvdError::Rpc(e) => anyhow!("{}", e.message),
        EnvdError::Status { status, body } => {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| body.trim().to_owned());
            if status == 502 && message.contains("was not found") {
                anyhow!("sandbox {id} was not found (killed or timed out)")
            } else {
                anyhow!("the sandbox answered {status}: {message}")
            }
        }
        other => anyhow::Error::new(other).context(format!("running a command in {id}")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn detail(id: &str, metadata: &[(&str, &str)]) -> SandboxDetail {
        serde_json::from_value(serde_json::json!({
            "templateID": "base", "sandboxID": id, "clientID": "cubicle",
            "startedAt": "2026-05-20T14:31:02.123Z", "endAt": "2026-05-20T14:36:02.123Z",
            "envdVersion": "0.6.4", "cpuCount": 2, "memoryMB": 2048, "diskSizeMB": 10240,
            "state": "running",
            "metadata": metadata.iter().map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        }))
        .unwrap()
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn ls_table() {
        let now = at("2026-05-20T14:31:03.123Z");
        let rows = [
            detail("i8f3k2m9q1w7e5r4t6y0", &[("owner", "ci"), ("run", "7")]),
            detail("abc", &[]),
        ];
        assert_eq!(
            table(&rows, now),
            "\
ID                    TEMPLATE  STATE    STARTED              ENDS       METADATA
i8f3k2m9q1w7e5r4t6y0  base      running  2026-05-20 14:31:02  in 4m 59s  owner=ci,run=7
abc                   base      running  2026-05-20 14:31:02  in 4m 59s  -
"
        );
        assert_eq!(
            table(&[], now),
            "ID  TEMPLATE  STATE  STARTED  ENDS  METADATA\n"
        );
    }

    #[test]
    fn get_summary() {
        let text = describe(&detail("abc", &[("k", "v")]), at("2026-05-20T14:31:02Z"));
        assert!(text.starts_with("ID        abc\nTEMPLATE  base\nSTATE     running\n"));
        assert!(text.contains("ENDS      2026-05-20 14:36:02 UTC (in 5m 00s)\n"));
        assert!(text.ends_with("METADATA  k=v\n"), "{text}");
    }

    #[test]
    fn results_print_their_text_and_formats() {
        let result = |v: serde_json::Value| -> CodeResult { serde_json::from_value(v).unwrap() };
        let r = result(serde_json::json!({"is_main_result": true, "text": "42"}));
        assert_eq!(show_result(&r), "42\n");
        // A DataFrame: text, html and data; the text says it all.
        let r = result(
            serde_json::json!({"text": "   a\n0  1", "html": "<table>", "data": {"a": [1]}}),
        );
        assert_eq!(show_result(&r), "   a\n0  1\n");
        // A figure: text is its repr, the image is the point.
        let r = result(
            serde_json::json!({"text": "<Figure>", "png": "iVBO", "chart": {}, "extra": {}}),
        );
        assert_eq!(show_result(&r), "<Figure> [chart] [png]\n");
        let r = result(serde_json::json!({"html": "<b>x</b>"}));
        assert_eq!(show_result(&r), "[html]\n");
        assert_eq!(show_result(&result(serde_json::json!({}))), "");
    }

    #[test]
    fn remaining_time() {
        let now = at("2026-01-01T00:00:00Z");
        let plus = |s: i64| now + chrono::Duration::seconds(s);
        assert_eq!(until(plus(-5), now), "now");
        assert_eq!(until(plus(42), now), "in 42s");
        assert_eq!(until(plus(299), now), "in 4m 59s");
        assert_eq!(until(plus(7500), now), "in 2h 05m");
        assert_eq!(until(plus(90_000), now), "in 1d 1h");
    }

    #[test]
    fn envd_errors_read_well() {
        let gone = EnvdError::Status {
            status: 502u16.try_into().unwrap(),
            body: r#"{"sandboxId":"abc","code":502,"message":"The sandbox was not found"}"#.into(),
        };
        assert_eq!(
            envd_error("abc", gone).to_string(),
            "sandbox abc was not found (killed or timed out)"
        );
        let rpc = EnvdError::Rpc(cubicle_envd::connect::ConnectError::new(
            cubicle_envd::connect::Code::InvalidArgument,
            "cwd '/nope' does not exist",
        ));
        assert_eq!(
            envd_error("abc", rpc).to_string(),
            "cwd '/nope' does not exist"
        );
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
