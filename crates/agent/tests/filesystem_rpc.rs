//! `filesystem.Filesystem` against real sandboxes: Stat, MakeDir, Move, ListDir,
//! Remove, the WatchDir stream and the polling watchers.

mod support;

use std::time::Duration;

use bytes::Bytes;
use cubicle_envd::client::{self, ClientError, ServerStream};
use cubicle_envd::connect::{self, Code, EnvelopeDecoder};
use cubicle_envd::proto::{
    CreateWatcherResponse, Empty, EntryInfo, EntryResponse, EventType, FileType, FilesystemEvent,
    GetWatcherEventsResponse, ListDirRequest, ListDirResponse, MoveRequest, PathRequest,
    WatchDirResponse, WatchRequest, WatcherRequest,
};
use http::{header, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{Sandbox, TestEnv};

const FS: &str = "/filesystem.Filesystem";

async fn call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
    sbx: &Sandbox,
    method: &str,
    req: &Req,
    user: Option<&str>,
) -> Result<Resp, ClientError> {
    sbx.client.unary(&format!("{FS}/{method}"), req, user).await
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    match r {
        Err(ClientError::Rpc(e)) => e.code,
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

fn path(p: &str) -> PathRequest {
    PathRequest { path: p.into() }
}

async fn stat(sbx: &Sandbox, p: &str) -> Result<EntryInfo, ClientError> {
    call::<_, EntryResponse>(sbx, "Stat", &path(p), None)
        .await
        .map(|r| r.entry)
}

async fn list(sbx: &Sandbox, p: &str, depth: u32) -> Result<Vec<EntryInfo>, ClientError> {
    let req = ListDirRequest {
        path: p.into(),
        depth,
    };
    call::<_, ListDirResponse>(sbx, "ListDir", &req, None)
        .await
        .map(|r| r.entries)
}

fn paths(entries: &[EntryInfo]) -> Vec<&str> {
    entries.iter().map(|e| e.path.as_str()).collect()
}

#[tokio::test]
async fn stat_list_make_move_remove() {
    let env = TestEnv::new();
    let sbx = env.create().await;

    // MakeDir is mkdir -p, owned by the user, relative to home.
    let made: EntryResponse = call(&sbx, "MakeDir", &path("proj/a/b"), None)
        .await
        .unwrap();
    assert_eq!(made.entry.path, "/home/user/proj/a/b");
    assert_eq!(made.entry.file_type, FileType::Directory);
    assert_eq!(made.entry.owner, "user");
    let owners = sbx
        .sh("stat -c %u:%g:%a ~/proj ~/proj/a ~/proj/a/b")
        .await
        .stdout_text();
    assert_eq!(owners, "1000:1000:755\n".repeat(3));
    assert_eq!(
        code(call::<_, EntryResponse>(&sbx, "MakeDir", &path("~/proj/a"), None).await),
        Code::AlreadyExists
    );
    sbx.sh("echo -n hello > ~/proj/f.txt && ln -s a ~/proj/link && ln -s /nowhere ~/proj/dangling")
        .await;
    assert_eq!(
        code(call::<_, EntryResponse>(&sbx, "MakeDir", &path("proj/f.txt"), None).await),
        Code::InvalidArgument
    );
    // Created as root: owned by root.
    let _: EntryResponse = call(&sbx, "MakeDir", &path("/opt/rootdir"), Some("root"))
        .await
        .unwrap();
    assert_eq!(sbx.sh("stat -c %u /opt/rootdir").await.stdout_text(), "0\n");

    // Stat.
    let f = stat(&sbx, "/home/user/proj/f.txt").await.unwrap();
    assert_eq!(
        (f.name.as_str(), f.file_type, f.size),
        ("f.txt", FileType::File, 5)
    );
    assert_eq!((f.mode, f.permissions.as_str()), (0o644, "-rw-r--r--"));
    assert_eq!((f.owner.as_str(), f.group.as_str()), ("user", "user"));
    let mtime = chrono::DateTime::parse_from_rfc3339(&f.modified_time).unwrap();
    assert!((chrono::Utc::now() - mtime.to_utc()).num_seconds().abs() < 120);
    let link = stat(&sbx, "proj/link").await.unwrap();
    assert_eq!(link.file_type, FileType::Directory);
    assert!(link.is_symlink);
    assert_eq!(link.symlink_target.as_deref(), Some("/home/user/proj/a"));
    assert_eq!(link.permissions, "lrwxrwxrwx");
    let dangling = stat(&sbx, "proj/dangling").await.unwrap();
    assert_eq!(
        (dangling.file_type, dangling.symlink_target.as_deref()),
        (FileType::Symlink, Some("/nowhere"))
    );
    let missing = stat(&sbx, "proj/nope").await;
    match missing {
        Err(ClientError::Rpc(e)) => {
            assert_eq!(e.code, Code::NotFound);
            assert_eq!(e.message, "path '/home/user/proj/nope' does not exist");
        }
        other => panic!("{other:?}"),
    }
    // `..` never leaves the sandbox: the sandbox's own /etc/hostname.
    let host = stat(&sbx, "/../../../etc/hostname").await.unwrap();
    assert_eq!(host.path, "/etc/hostname");
    let inside = sbx.sh("wc -c < /etc/hostname").await.stdout_text();
    assert_eq!(host.size.to_string(), inside.trim());

    // ListDir: depth 0 = 1, symlinks listed but not followed, sorted by name.
    let one = list(&sbx, "proj", 0).await.unwrap();
    assert_eq!(
        paths(&one),
        [
            "/home/user/proj/a",
            "/home/user/proj/dangling",
            "/home/user/proj/f.txt",
            "/home/user/proj/link"
        ]
    );
    assert_eq!(list(&sbx, "/home/user/proj", 1).await.unwrap(), one);
    let all = list(&sbx, "proj", 5).await.unwrap();
    assert_eq!(
        paths(&all),
        [
            "/home/user/proj/a",
            "/home/user/proj/a/b",
            "/home/user/proj/dangling",
            "/home/user/proj/f.txt",
            "/home/user/proj/link"
        ]
    );
    // Through a symlinked directory.
    assert_eq!(
        paths(&list(&sbx, "proj/link", 1).await.unwrap()),
        ["/home/user/proj/link/b"]
    );
    assert_eq!(code(list(&sbx, "proj/nope", 1).await), Code::NotFound);
    assert_eq!(
        code(list(&sbx, "proj/f.txt", 1).await),
        Code::InvalidArgument
    );

    // Move: creates the destination's parents (owned by the user).
    let moved: EntryResponse = call(
        &sbx,
        "Move",
        &MoveRequest {
            source: "proj/f.txt".into(),
            destination: "/home/user/other/deeper/g.txt".into(),
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!((moved.entry.name.as_str(), moved.entry.size), ("g.txt", 5));
    assert_eq!(
        sbx.sh("cat ~/other/deeper/g.txt; stat -c %u ~/other/deeper")
            .await
            .stdout_text(),
        "hello1000\n"
    );
    let gone = call::<_, EntryResponse>(
        &sbx,
        "Move",
        &MoveRequest {
            source: "proj/f.txt".into(),
            destination: "x".into(),
        },
        None,
    )
    .await;
    assert_eq!(code(gone), Code::NotFound);
    // Directories: the sandbox's overlay refuses rename(2) of any directory (EXDEV),
    // the agent copies instead, keeping owners and modes.
    let dir_moved: EntryResponse = call(
        &sbx,
        "Move",
        &MoveRequest {
            source: "proj/a".into(),
            destination: "moved/a2".into(),
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(dir_moved.entry.path, "/home/user/moved/a2");
    let check = sbx
        .sh("test -e ~/proj/a && echo still; stat -c %u:%a ~/moved/a2 ~/moved/a2/b")
        .await;
    assert_eq!(check.stdout_text(), "1000:755\n1000:755\n");
    sbx.sh("mv ~/moved/a2 ~/proj/a").await;
    // A directory of the template's (read-only) layer: the overlay refuses rename(2)
    // with EXDEV, the agent copies instead.
    let skel: EntryResponse = call(
        &sbx,
        "Move",
        &MoveRequest {
            source: "/etc/skel".into(),
            destination: "/srv/skel-moved".into(),
        },
        Some("root"),
    )
    .await
    .unwrap();
    assert_eq!(skel.entry.file_type, FileType::Directory);
    let check = sbx.sh("test -e /etc/skel && echo still; ls -A /srv/skel-moved | tr '\\n' ' '; stat -c %u /srv/skel-moved/.bashrc").await;
    assert_eq!(check.stdout_text(), ".bash_logout .bashrc .profile 0\n");

    // Remove: rm -rf, fine when missing.
    let _: Empty = call(&sbx, "Remove", &path("proj"), None).await.unwrap();
    let _: Empty = call(&sbx, "Remove", &path("proj"), None).await.unwrap();
    assert_eq!(code(stat(&sbx, "proj").await), Code::NotFound);
    assert_eq!(
        code(call::<_, Empty>(&sbx, "Remove", &path("/"), Some("root")).await),
        Code::InvalidArgument
    );

    // Users: unknown → unauthenticated; root's home for relative paths.
    assert_eq!(
        code(call::<_, EntryResponse>(&sbx, "Stat", &path("x"), Some("ghost")).await),
        Code::Unauthenticated
    );
    let root_home: EntryResponse = call(&sbx, "Stat", &path(""), Some("root")).await.unwrap();
    assert_eq!(root_home.entry.path, "/root");

    // Unknown methods are unimplemented (not a plain 404, which the SDK reads as missing files).
    assert_eq!(
        code(call::<_, Empty>(&sbx, "Frobnicate", &Empty {}, None).await),
        Code::Unimplemented
    );
    sbx.destroy().await;
}

async fn watch(
    sbx: &Sandbox,
    p: &str,
    recursive: bool,
) -> Result<ServerStream<WatchDirResponse>, ClientError> {
    let req = WatchRequest {
        path: p.into(),
        recursive,
        include_entry: true,
        allow_network_mounts: false,
    };
    let mut stream = sbx
        .client
        .server_stream(&format!("{FS}/WatchDir"), &req, None, None)
        .await?;
    match stream.next().await {
        Some(Ok(WatchDirResponse::Start {})) => Ok(stream),
        Some(Err(e)) => Err(e),
        other => panic!("expected start, got {other:?}"),
    }
}

/// Events until one named `name` of type `t` (fails after 10 s).
async fn until(
    stream: &mut ServerStream<WatchDirResponse>,
    name: &str,
    t: EventType,
) -> Vec<FilesystemEvent> {
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap_or_else(|_| panic!("no {t:?} of {name} within 10 s; saw {seen:?}"))
            .expect("stream open")
            .expect("event");
        if let WatchDirResponse::Filesystem(e) = msg {
            let done = e.name == name && e.event_type == t;
            seen.push(*e);
            if done {
                return seen;
            }
        }
    }
}

#[tokio::test]
async fn watch_dir_stream() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    sbx.sh("mkdir -p ~/w/old && echo x > ~/notdir").await;

    assert_eq!(
        code(watch(&sbx, "nope", false).await.map(|_| ())),
        Code::NotFound
    );
    assert_eq!(
        code(watch(&sbx, "notdir", false).await.map(|_| ())),
        Code::InvalidArgument
    );

    let mut w = watch(&sbx, "w", true).await.unwrap();
    sbx.sh("echo hello > ~/w/new.txt").await;
    let seen = until(&mut w, "new.txt", EventType::Write).await;
    assert_eq!(seen[0].name, "new.txt");
    assert_eq!(seen[0].event_type, EventType::Create);
    let entry = seen[0].entry.as_ref().expect("includeEntry");
    assert_eq!(entry.path, "/home/user/w/new.txt");

    // Recursive: existing and new subdirectories.
    sbx.sh("echo 1 > ~/w/old/in-old").await;
    until(&mut w, "old/in-old", EventType::Write).await;
    // What is created in a new directory before its watch is in place is reported
    // as created by the scan that adds the watch.
    sbx.sh("mkdir -p ~/w/n1/n2 && echo 2 > ~/w/n1/n2/deep")
        .await;
    until(&mut w, "n1/n2/deep", EventType::Create).await;
    sbx.sh("echo 3 >> ~/w/n1/n2/deep").await;
    until(&mut w, "n1/n2/deep", EventType::Write).await;
    sbx.sh("chmod 600 ~/w/new.txt; mv ~/w/new.txt ~/w/renamed.txt; rm ~/w/renamed.txt")
        .await;
    let seen = until(&mut w, "renamed.txt", EventType::Remove).await;
    let kinds: Vec<_> = seen
        .iter()
        .map(|e| (e.name.as_str(), e.event_type))
        .collect();
    for want in [
        ("new.txt", EventType::Chmod),
        ("new.txt", EventType::Rename),
        ("renamed.txt", EventType::Create),
    ] {
        assert!(kinds.contains(&want), "{want:?} missing in {kinds:?}");
    }

    // An upload through /files: CREATE and WRITE of the file itself, nothing else.
    let up = client::request(Method::POST, "/files?path=%2Fhome%2Fuser%2Fw%2Fup.bin")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Full::new(Bytes::from_static(b"uploaded")))
        .unwrap();
    assert_eq!(sbx.client.send(up).await.unwrap().status(), StatusCode::OK);
    let seen = until(&mut w, "up.bin", EventType::Write).await;
    assert!(seen.iter().all(|e| e.name == "up.bin"), "{seen:?}");
    assert_eq!(seen[0].event_type, EventType::Create);

    // Not recursive: only direct children.
    let mut flat = watch(&sbx, "w", false).await.unwrap();
    sbx.sh("echo 3 > ~/w/old/ignored; touch ~/w/top").await;
    let seen = until(&mut flat, "top", EventType::Create).await;
    assert!(seen.iter().all(|e| !e.name.contains('/')), "{seen:?}");
    sbx.destroy().await;
}

#[tokio::test]
async fn watch_dir_keepalive_and_disconnect() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    let body = connect::message_envelope(&WatchRequest {
        path: "/tmp".into(),
        ..Default::default()
    });
    let req = client::request(Method::POST, "/filesystem.Filesystem/WatchDir")
        .header(header::CONTENT_TYPE, connect::CONTENT_TYPE_STREAM)
        .header("keepalive-ping-interval", "1")
        .body(Full::new(body))
        .unwrap();
    let resp = sbx.client.send(req).await.unwrap();
    assert_eq!(
        resp.headers()[header::CONTENT_TYPE],
        connect::CONTENT_TYPE_STREAM
    );
    let mut body = resp.into_body();
    let mut decoder = EnvelopeDecoder::default();
    let mut messages = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while messages.len() < 3 {
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .expect("keepalives within 10 s")
            .unwrap()
            .unwrap();
        decoder.push(&frame.into_data().unwrap());
        while let Some(env) = decoder.next_envelope().unwrap() {
            messages.push(serde_json::from_slice::<WatchDirResponse>(&env.data).unwrap());
        }
    }
    assert_eq!(messages[0], WatchDirResponse::Start {});
    assert_eq!(messages[1], WatchDirResponse::Keepalive {});
    drop(body);
    // The watch goes away with its client: count the agent's inotify instances
    // from the host.
    let mut n = usize::MAX;
    for _ in 0..100 {
        n = inotify_instances(sbx.info.pid);
        if n == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(n, 0, "inotify instances left in the agent");
    sbx.destroy().await;
}

/// How many inotify instances the process `pid` (a host pid) has open.
fn inotify_instances(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| t.to_string_lossy().contains("inotify"))
        .count()
}

#[tokio::test]
async fn polling_watchers() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    sbx.sh("mkdir -p ~/pw/sub").await;
    let req = WatchRequest {
        path: "pw".into(),
        recursive: true,
        include_entry: false,
        allow_network_mounts: false,
    };
    let created: CreateWatcherResponse = call(&sbx, "CreateWatcher", &req, None).await.unwrap();
    let id = WatcherRequest {
        watcher_id: created.watcher_id.clone(),
    };
    sbx.sh("echo a > ~/pw/a.txt; echo b > ~/pw/sub/b.txt").await;
    let mut events = Vec::new();
    for _ in 0..50 {
        let got: GetWatcherEventsResponse =
            call(&sbx, "GetWatcherEvents", &id, None).await.unwrap();
        events.extend(got.events.into_iter().map(|e| (e.name, e.event_type)));
        if events.contains(&("sub/b.txt".to_owned(), EventType::Write)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        events.first(),
        Some(&("a.txt".to_owned(), EventType::Create)),
        "{events:?}"
    );
    assert!(
        events.contains(&("a.txt".to_owned(), EventType::Write)),
        "{events:?}"
    );
    assert!(
        events.contains(&("sub/b.txt".to_owned(), EventType::Write)),
        "{events:?}"
    );
    assert_eq!(inotify_instances(sbx.info.pid), 1);
    let _: Empty = call(&sbx, "RemoveWatcher", &id, None).await.unwrap();
    for _ in 0..50 {
        if inotify_instances(sbx.info.pid) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(inotify_instances(sbx.info.pid), 0);
    assert_eq!(
        code(call::<_, GetWatcherEventsResponse>(&sbx, "GetWatcherEvents", &id, None).await),
        Code::NotFound
    );
    assert_eq!(
        code(call::<_, Empty>(&sbx, "RemoveWatcher", &id, None).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            call::<_, CreateWatcherResponse>(
                &sbx,
                "CreateWatcher",
                &WatchRequest {
                    path: "nope".into(),
                    ..Default::default()
                },
                None
            )
            .await
        ),
        Code::NotFound
    );
    sbx.destroy().await;
}
