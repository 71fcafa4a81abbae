//! `process.Process` against real sandboxes: output, exit codes, env, cwd, stdin,
//! signals, Connect from a second client, List, PTYs, large output, timeouts.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use cubicle_envd::client::{ClientError, ServerStream};
use cubicle_envd::connect::Code;
use cubicle_envd::proto::{
    CloseStdinRequest, ConnectRequest, DataEvent, Empty, ListResponse, ProcessConfig, ProcessEvent,
    ProcessInput, ProcessSelector, ProcessStreamMessage, Pty, PtySize, SendInputRequest,
    SendSignalRequest, Signal, StartRequest, StreamInputRequest, UpdateRequest,
};
use support::{Sandbox, TestEnv};

fn bash(cmd: &str) -> StartRequest {
    StartRequest::shell(cmd)
}

async fn start(sbx: &Sandbox, req: &StartRequest) -> (u32, ServerStream<ProcessStreamMessage>) {
    let mut stream = sbx.client.start(req, None, None).await.expect("start");
    let pid = match stream.next().await.expect("first event").expect("ok").event {
        ProcessEvent::Start { pid } => pid,
        other => panic!("expected start, got {other:?}"),
    };
    (pid, stream)
}

#[tokio::test]
async fn stdout_stderr_exit_codes_env_and_cwd() {
    let env = TestEnv::new();
    let sbx = env.create().await;

    let out = sbx.sh("echo out; echo err >&2; exit 3").await;
    assert_eq!(out.stdout_text(), "out\n");
    assert_eq!(out.stderr_text(), "err\n");
    assert_eq!(out.end.exit_code, 3);
    assert!(out.end.exited);
    assert_eq!(out.end.status, "exit status 3");
    assert_eq!(out.end.error.as_deref(), Some("exit status 3"));

    let ok = sbx.sh("true").await;
    assert_eq!((ok.end.exit_code, ok.end.error), (0, None));

    // Default user, its home as cwd, login environment.
    let who = sbx.sh("id -un; pwd; echo $HOME $USER").await;
    assert_eq!(who.stdout_text(), "user\n/home/user\n/home/user user\n");
    let root = sbx.root_sh("id -u; pwd").await;
    assert_eq!(root.stdout_text(), "0\n/root\n");

    // Request env wins over nothing; cwd is honoured; a missing cwd is invalid_argument.
    let mut req = bash("echo $FOO; pwd");
    req.process.envs = BTreeMap::from([("FOO".into(), "bar baz".into())]);
    req.process.cwd = Some("/tmp".into());
    let out = sbx
        .client
        .start(&req, None, None)
        .await
        .unwrap()
        .collect_output()
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "bar baz\n/tmp\n");
    req.process.cwd = Some("/nope".into());
    match sbx
        .client
        .start(&req, None, None)
        .await
        .unwrap()
        .next()
        .await
    {
        Some(Err(ClientError::Rpc(e))) => {
            assert_eq!(e.code, Code::InvalidArgument);
            assert_eq!(e.message, "cwd '/nope' does not exist");
        }
        other => panic!("expected invalid_argument, got {other:?}"),
    }
    // An unknown user is a clear error, not a crash.
    match sbx
        .client
        .start(&bash("true"), Some("ghost"), None)
        .await
        .unwrap()
        .next()
        .await
    {
        Some(Err(ClientError::Rpc(e))) => {
            assert_eq!(e.code, Code::Unauthenticated);
            assert!(e.message.contains("ghost"), "{e:?}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    sbx.destroy().await;
}

#[tokio::test]
async fn sandbox_env_vars_reach_every_process() {
    let env = TestEnv::new();
    let mut spec = env.spec();
    spec.agent.env_vars = BTreeMap::from([("SBX_VAR".into(), "from-create".into())]);
    let sbx = env.create_spec(spec).await.unwrap();
    assert_eq!(sbx.sh("echo $SBX_VAR").await.stdout_text(), "from-create\n");
    let mut req = bash("echo $SBX_VAR");
    req.process.envs = BTreeMap::from([("SBX_VAR".into(), "overridden".into())]);
    let out = sbx
        .client
        .start(&req, None, None)
        .await
        .unwrap()
        .collect_output()
        .await
        .unwrap();
    assert_eq!(out.stdout_text(), "overridden\n");
}

#[tokio::test]
async fn stdin_send_input_stream_input_and_close() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    let mut req = bash("cat; echo done");
    req.stdin = Some(true);
    let (pid, stream) = start(&sbx, &req).await;
    let sel = ProcessSelector::Pid(pid);
    let _: Empty = sbx
        .client
        .unary(
            "/process.Process/SendInput",
            &SendInputRequest {
                process: sel.clone(),
                input: ProcessInput::Stdin(b"hello ".to_vec()),
            },
            None,
        )
        .await
        .unwrap();
    // StreamInput: start, data, keepalive, data; exactly one response message.
    let msgs = [
        StreamInputRequest::Start {
            process: sel.clone(),
        },
        StreamInputRequest::Data {
            input: ProcessInput::Stdin(b"streamed".to_vec()),
        },
        StreamInputRequest::Keepalive {},
        StreamInputRequest::Data {
            input: ProcessInput::Stdin(b"\n".to_vec()),
        },
    ];
    let mut resp = sbx
        .client
        .client_and_server_stream::<_, Empty>("/process.Process/StreamInput", &msgs, None, None)
        .await
        .unwrap();
    assert_eq!(resp.next().await.unwrap().unwrap(), Empty {});
    assert!(resp.next().await.is_none());
    let _: Empty = sbx
        .client
        .unary(
            "/process.Process/CloseStdin",
            &CloseStdinRequest { process: sel },
            None,
        )
        .await
        .unwrap();
    let out = stream.collect_output_after_start().await;
    assert_eq!(out.stdout_text(), "hello streamed\ndone\n");
    assert_eq!(out.end.exit_code, 0);

    // Input for a process without stdin, or an unknown pid, is refused clearly.
    let err = sbx
        .client
        .unary::<_, Empty>(
            "/process.Process/SendInput",
            &SendInputRequest {
                process: ProcessSelector::Pid(999_999),
                input: ProcessInput::Stdin(b"x".to_vec()),
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Rpc(e) if e.code == Code::NotFound));
}

#[tokio::test]
async fn signals_and_background_process_with_connect_and_list() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    let mut req = bash(
        "echo started; sleep 0.2; for i in 1 2 3 4 5; do echo tick $i; sleep 0.2; done; sleep 600",
    );
    req.tag = Some("bg".into());
    let (pid, first) = start(&sbx, &req).await;
    // The starting client goes away: the process keeps running.
    drop(first);

    let list: ListResponse = sbx
        .client
        .unary("/process.Process/List", &Empty {}, None)
        .await
        .unwrap();
    let listed = list
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .expect("listed");
    assert_eq!(listed.tag.as_deref(), Some("bg"));
    assert_eq!(listed.config.args[2], req.process.args[2]);

    // A second client attaches by tag and sees start, then live output.
    let mut attached = sbx
        .client
        .server_stream::<_, ProcessStreamMessage>(
            "/process.Process/Connect",
            &ConnectRequest {
                process: ProcessSelector::Tag("bg".into()),
            },
            None,
            None,
        )
        .await
        .unwrap();
    match attached.next().await.unwrap().unwrap().event {
        ProcessEvent::Start { pid: p } => assert_eq!(p, pid),
        other => panic!("expected start, got {other:?}"),
    }
    let mut seen = String::new();
    while !seen.contains("tick 5") {
        match attached.next().await.unwrap().unwrap().event {
            ProcessEvent::Data(DataEvent::Stdout(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            ProcessEvent::Keepalive {} => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    // SIGTERM ends it; the attached stream gets an end event with a non-zero code.
    let _: Empty = sbx
        .client
        .unary(
            "/process.Process/SendSignal",
            &SendSignalRequest {
                process: ProcessSelector::Pid(pid),
                signal: Signal::Sigterm,
            },
            None,
        )
        .await
        .unwrap();
    let out = attached.collect_output_after_start().await;
    assert_eq!(out.end.exit_code, -1);
    assert_eq!(out.end.status, "signal: terminated");
    let list: ListResponse = sbx
        .client
        .unary("/process.Process/List", &Empty {}, None)
        .await
        .unwrap();
    assert!(list.processes.iter().all(|p| p.pid != pid));

    // Signals to unknown processes: not_found (the SDK turns it into False).
    let err = sbx
        .client
        .unary::<_, Empty>(
            "/process.Process/SendSignal",
            &SendSignalRequest {
                process: ProcessSelector::Pid(pid),
                signal: Signal::Sigkill,
            },
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Rpc(e) if e.code == Code::NotFound));
}

#[tokio::test]
async fn sigkill_does_not_wait_for_grandchildren_holding_the_pipes() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    // The background sleep keeps stdout open in another process group.
    let (pid, stream) = start(&sbx, &bash("setsid sleep 600 & echo ready; sleep 600")).await;
    let kill = async {
        let _: Empty = sbx
            .client
            .unary(
                "/process.Process/SendSignal",
                &SendSignalRequest {
                    process: ProcessSelector::Pid(pid),
                    signal: Signal::Sigkill,
                },
                None,
            )
            .await
            .unwrap();
    };
    kill.await;
    let out = tokio::time::timeout(Duration::from_secs(10), stream.collect_output_after_start())
        .await
        .expect("end event arrives although a grandchild holds stdout");
    assert_eq!(out.end.status, "signal: killed");
}

#[tokio::test]
async fn connect_timeout_kills_the_process() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    let started = std::time::Instant::now();
    let out = sbx
        .client
        .start(&bash("sleep 60"), None, Some(Duration::from_millis(300)))
        .await
        .unwrap()
        .collect_output()
        .await
        .unwrap();
    assert_eq!(out.end.status, "signal: killed");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn pty_session_with_resize() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    let req = StartRequest {
        process: ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-i".into(), "-l".into()],
            envs: BTreeMap::from([("TERM".into(), "xterm-256color".into())]),
            cwd: None,
        },
        pty: Some(Pty {
            size: PtySize { cols: 80, rows: 24 },
        }),
        ..Default::default()
    };
    let (pid, mut stream) = start(&sbx, &req).await;
    let sel = ProcessSelector::Pid(pid);
    let send = |bytes: &'static [u8]| {
        let sel = sel.clone();
        let client = sbx.client.clone();
        async move {
            let _: Empty = client
                .unary(
                    "/process.Process/SendInput",
                    &SendInputRequest {
                        process: sel,
                        input: ProcessInput::Pty(bytes.to_vec()),
                    },
                    None,
                )
                .await
                .unwrap();
        }
    };
    let _: Empty = sbx
        .client
        .unary(
            "/process.Process/Update",
            &UpdateRequest {
                process: sel.clone(),
                pty: Some(Pty {
                    size: PtySize {
                        cols: 123,
                        rows: 45,
                    },
                }),
            },
            None,
        )
        .await
        .unwrap();
    send(b"stty size; tty; echo $TERM\n").await;
    let mut seen = String::new();
    while !(seen.contains("45 123")
        && seen.contains("/dev/pts/")
        && seen.contains("xterm-256color\r\n"))
    {
        match stream.next().await.unwrap().unwrap().event {
            ProcessEvent::Data(DataEvent::Pty(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
            ProcessEvent::Keepalive {} => {}
            other => panic!("unexpected {other:?} after {seen:?}"),
        }
    }
    send(b"exit 7\n").await;
    let out = stream.collect_output_after_start().await;
    assert_eq!(out.end.exit_code, 7);
}

#[tokio::test]
async fn ten_megabytes_of_stdout_arrive_intact() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    // 10 MiB of a deterministic, non-repeating-per-line pattern; compare hashes.
    let out = sbx
        .sh("python3 -c \"import sys\nfor i in range(163840): sys.stdout.write('%063d\\n' % i)\"")
        .await;
    assert_eq!(out.end.exit_code, 0, "{}", out.stderr_text());
    assert_eq!(out.stdout.len(), 10 * 1024 * 1024);
    let expected: String = (0..163840).map(|i| format!("{i:063}\n")).collect();
    assert!(
        out.stdout == expected.as_bytes(),
        "stdout differs from the expected stream"
    );
}

/// Helpers for streams whose `start` event was already consumed.
trait AfterStart {
    async fn collect_output_after_start(self) -> cubicle_envd::client::CommandOutput;
}

impl AfterStart for ServerStream<ProcessStreamMessage> {
    async fn collect_output_after_start(mut self) -> cubicle_envd::client::CommandOutput {
        let mut out = cubicle_envd::client::CommandOutput::default();
        let mut ended = false;
        while let Some(msg) = self.next().await {
            match msg.expect("stream message").event {
                ProcessEvent::Data(DataEvent::Stdout(b)) => out.stdout.extend(b),
                ProcessEvent::Data(DataEvent::Stderr(b)) => out.stderr.extend(b),
                ProcessEvent::Data(DataEvent::Pty(b)) => out.pty.extend(b),
                ProcessEvent::End(e) => {
                    out.end = e;
                    ended = true;
                }
                ProcessEvent::Keepalive {} => {}
                ProcessEvent::Start { .. } => panic!("second start event"),
            }
        }
        assert!(ended, "stream closed without an end event");
        out
    }
}

/// One keep-alive connection to the agent, as the daemon's proxy pools them: after a
/// command (server-streaming request) it must serve the next request, and an error
/// answer that leaves a request body unread must say `Connection: close` (otherwise the
/// proxy reuses a connection hyper is closing: "connection closed before message
/// completed", seen as flaky SDK failures).
#[tokio::test]
async fn pooled_connections_survive_commands_and_say_when_they_close() {
    use bytes::Bytes;
    use http::{header, Request, StatusCode};
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::TokioIo;

    type Body = BoxBody<Bytes, std::io::Error>;
    let full = |b: &'static [u8]| -> Body {
        Full::new(Bytes::from_static(b))
            .map_err(|e| match e {})
            .boxed()
    };
    // Chunked, as the SDK sends it; the body ends only once the answer has been read
    // (`end` is dropped), as when its last chunk is late.
    let start = |req: &StartRequest| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        tx.send(cubicle_envd::connect::message_envelope(req))
            .unwrap();
        let rx = futures_util::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok::<_, std::io::Error>(Frame::data(data)), rx))
        });
        let req = Request::post("/process.Process/Start")
            .header(header::HOST, "localhost")
            .header(header::CONTENT_TYPE, "application/connect+json")
            .header("connect-protocol-version", "1")
            .body(BodyExt::boxed(StreamBody::new(rx)))
            .unwrap();
        (req, tx)
    };

    let env = TestEnv::new();
    let sbx = env.create().await;
    let stream = tokio::net::UnixStream::connect(&sbx.info.agent_socket)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut missing_cwd = bash("pwd");
    missing_cwd.process.cwd = Some("/no/such/dir".into());
    for round in 0..20 {
        // A command that runs, one that fails to start (the error is in the stream),
        // and a health check, all on the same connection.
        for (req, end) in [start(&bash("true")), start(&missing_cwd)] {
            sender
                .ready()
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let resp = sender
                .send_request(req)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(resp.status(), StatusCode::OK);
            assert!(resp.headers().get(header::CONNECTION).is_none());
            resp.into_body().collect().await.unwrap();
            drop(end);
        }
        sender
            .ready()
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let health = Request::get("/health")
            .header(header::HOST, "localhost")
            .body(full(b""))
            .unwrap();
        let resp = sender.send_request(health).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        resp.into_body().collect().await.unwrap();
    }

    // A refusal that never reads the body closes the connection, and says so.
    sender.ready().await.unwrap();
    let refused = Request::post("/no/such/route")
        .header(header::HOST, "localhost")
        .body(full(b"unread body"))
        .unwrap();
    let resp = sender.send_request(refused).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()[header::CONNECTION], "close");
    sbx.destroy().await;
}
