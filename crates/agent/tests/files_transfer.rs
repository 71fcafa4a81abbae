//! `GET/POST /files` against real sandboxes: large uploads and downloads (multipart,
//! octet-stream, chunked, gzip), ownership, users, the size limit, access tokens and
//! signed URLs, and bad paths.

mod support;

use std::io::{Read, Write};
use std::path::Path;

use bytes::Bytes;
use cubicle_envd::client::{self, EnvdClient};
use futures_util::StreamExt;
use http::{header, HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::{Sandbox, TestEnv};

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut buf)
        .unwrap();
    buf
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn send(client: &EnvdClient, req: Request<Full<Bytes>>) -> Reply {
    let resp = client.send(req).await.expect("send");
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("response body").to_bytes(),
    }
}

async fn get(client: &EnvdClient, query: &str) -> Reply {
    let req = client::request(Method::GET, &format!("/files?{query}"))
        .body(Full::default())
        .unwrap();
    send(client, req).await
}

fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "cubicle-test-boundary-7d3f";
    let mut body = Vec::new();
    for (filename, data) in parts {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .unwrap();
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn post_multipart(client: &EnvdClient, query: &str, parts: &[(&str, &[u8])]) -> Reply {
    let (ct, body) = multipart(parts);
    let req = client::request(Method::POST, &format!("/files?{query}"))
        .header(header::CONTENT_TYPE, ct)
        .body(Full::new(body.into()))
        .unwrap();
    send(client, req).await
}

async fn post_raw(client: &EnvdClient, query: &str, data: Vec<u8>, gzip: bool) -> Reply {
    let mut req = client::request(Method::POST, &format!("/files?{query}"))
        .header(header::CONTENT_TYPE, "application/octet-stream");
    if gzip {
        req = req.header(header::CONTENT_ENCODING, "gzip");
    }
    send(client, req.body(Full::new(data.into())).unwrap()).await
}

/// Uploads `data` as a chunked octet-stream body (no Content-Length), as the SDK
/// does for file-like data.
async fn post_chunked(socket: &Path, query: &str, data: &[u8], chunk: usize) -> Reply {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = data
        .chunks(chunk)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks).boxed());
    let req = Request::post(format!("/files?{query}"))
        .header(header::HOST, "localhost")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

async fn sandbox_sha256(sbx: &Sandbox, path: &str) -> String {
    let out = sbx
        .root_sh(&format!("sha256sum {path}"))
        .await
        .stdout_text();
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn large_files_round_trip() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    let data = random_bytes(50 << 20);
    let digest = sha256_hex(&data);

    // Multipart, ?path= wins over the filename.
    let up = post_multipart(
        &sbx.client,
        "path=%2Fhome%2Fuser%2Fbig.bin",
        &[("ignored.bin", &data)],
    )
    .await;
    assert_eq!(
        up.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&up.body)
    );
    assert_eq!(
        up.json(),
        json!([{"name": "big.bin", "type": "file", "path": "/home/user/big.bin"}])
    );
    assert_eq!(sandbox_sha256(&sbx, "/home/user/big.bin").await, digest);
    let down = get(&sbx.client, "path=big.bin").await;
    assert_eq!(down.status, StatusCode::OK);
    assert_eq!(
        down.headers[header::CONTENT_TYPE],
        "application/octet-stream"
    );
    assert_eq!(
        down.headers[header::CONTENT_LENGTH],
        (50u64 << 20).to_string().as_str()
    );
    assert_eq!(sha256_hex(&down.body), digest);

    // Octet-stream, chunked.
    let up = post_chunked(&sbx.info.agent_socket, "path=big2.bin", &data, 1 << 20).await;
    assert_eq!(
        up.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&up.body)
    );
    assert_eq!(
        up.json(),
        json!([{"name": "big2.bin", "type": "file", "path": "/home/user/big2.bin"}])
    );
    let down = get(&sbx.client, "path=%2Fhome%2Fuser%2Fbig2.bin").await;
    assert_eq!(sha256_hex(&down.body), digest);

    // Octet-stream with Content-Length, gzip-compressed.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&data[..8 << 20]).unwrap();
    let up = post_raw(&sbx.client, "path=gz.bin", gz.finish().unwrap(), true).await;
    assert_eq!(
        up.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&up.body)
    );
    assert_eq!(
        sandbox_sha256(&sbx, "/home/user/gz.bin").await,
        sha256_hex(&data[..8 << 20])
    );

    let owners = sbx
        .sh("stat -c %u:%g:%a ~/big.bin ~/big2.bin ~/gz.bin; ls -A ~ | grep -c cubicle-upload")
        .await;
    assert_eq!(owners.stdout_text(), "1000:1000:644\n".repeat(3) + "0\n");
    sbx.destroy().await;
}

#[tokio::test]
async fn owners_users_and_overwrites() {
    let env = TestEnv::new();
    let sbx = env.create().await;

    // Parent directories are created for (and owned by) the user.
    let up = post_multipart(
        &sbx.client,
        "",
        &[("new/dir/a.txt", b"A"), ("/tmp/abs/b.txt", b"B")],
    )
    .await;
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(
        up.json(),
        json!([
            {"name": "a.txt", "type": "file", "path": "/home/user/new/dir/a.txt"},
            {"name": "b.txt", "type": "file", "path": "/tmp/abs/b.txt"}
        ])
    );
    let owners = sbx
        .sh("stat -c %u ~/new ~/new/dir ~/new/dir/a.txt /tmp/abs /tmp/abs/b.txt")
        .await;
    assert_eq!(owners.stdout_text(), "1000\n".repeat(5));

    // As root: relative to /root, owned by root, readable back as root.
    let up = post_raw(
        &sbx.client,
        "username=root&path=r.txt",
        b"root data".to_vec(),
        false,
    )
    .await;
    assert_eq!(up.json()[0]["path"], "/root/r.txt");
    assert_eq!(
        sbx.root_sh("stat -c %u:%g /root/r.txt").await.stdout_text(),
        "0:0\n"
    );
    assert_eq!(
        get(&sbx.client, "username=root&path=r.txt")
            .await
            .body
            .as_ref(),
        b"root data"
    );
    assert_eq!(
        get(&sbx.client, "path=%2Froot%2Fr.txt").await.status,
        StatusCode::OK
    );

    // Unknown user: 401.
    let r = get(&sbx.client, "username=ghost&path=x").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["code"], 401);
    assert_eq!(
        post_raw(&sbx.client, "username=ghost&path=x", b"x".to_vec(), false)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );

    // Overwriting keeps the mode and replaces the content.
    sbx.sh("printf '#!/bin/sh\\necho one\\n' > ~/run.sh && chmod 755 ~/run.sh")
        .await;
    post_raw(
        &sbx.client,
        "path=run.sh",
        b"#!/bin/sh\necho two\n".to_vec(),
        false,
    )
    .await;
    assert_eq!(
        sbx.sh("~/run.sh; stat -c %a ~/run.sh").await.stdout_text(),
        "two\n755\n"
    );

    // X-Metadata-* headers become user.e2b.* xattrs, shown by Stat.
    let req = client::request(Method::POST, "/files?path=meta.txt")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("X-Metadata-Project", "cubicle")
        .body(Full::new(Bytes::from_static(b"m")))
        .unwrap();
    let up = send(&sbx.client, req).await;
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(up.json()[0]["metadata"], json!({"project": "cubicle"}));
    let stat: cubicle_envd::proto::EntryResponse = sbx
        .client
        .unary(
            "/filesystem.Filesystem/Stat",
            &cubicle_envd::proto::PathRequest {
                path: "meta.txt".into(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        stat.entry.metadata.get("project").map(String::as_str),
        Some("cubicle")
    );

    // Same path twice: 400, the first one is written.
    let r = post_multipart(
        &sbx.client,
        "",
        &[("twice.txt", b"1"), ("/home/user/twice.txt", b"2")],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["message"].as_str().unwrap().contains("same path"));
    assert_eq!(get(&sbx.client, "path=twice.txt").await.body.as_ref(), b"1");

    // Raw upload needs ?path=; a directory is not a file.
    assert_eq!(
        post_raw(&sbx.client, "", b"x".to_vec(), false).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post_raw(&sbx.client, "path=new", b"x".to_vec(), false)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    sbx.destroy().await;
}

#[tokio::test]
async fn download_errors_and_paths() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    let r = get(&sbx.client, "path=%2Fnope%2Fmissing.txt").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.json(),
        json!({"code": 404, "message": "path '/nope/missing.txt' does not exist"})
    );
    let r = get(&sbx.client, "path=%2Ftmp").await;
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (StatusCode::BAD_REQUEST, json!(400))
    );
    // Not a regular file: refused instead of read forever.
    assert_eq!(
        get(&sbx.client, "path=%2Fdev%2Fzero").await.status,
        StatusCode::BAD_REQUEST
    );

    // Not UTF-8 after decoding, or a NUL: 400.
    let r = get(&sbx.client, "path=%2Ftmp%2F%FF%FE").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["message"].as_str().unwrap().contains("UTF-8"));
    assert_eq!(
        get(&sbx.client, "path=%2Fetc%2Fpass%00wd").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post_raw(&sbx.client, "path=a%00b", b"x".to_vec(), false)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        post_raw(&sbx.client, "path=%C3%28", b"x".to_vec(), false)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    // `..` resolves inside the sandbox: its own /etc/hostname, never the host's.
    let inside = sbx.sh("cat /etc/hostname").await.stdout;
    let r = get(&sbx.client, &format!("path={}", enc("/../../etc/hostname"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.as_ref(), inside.as_slice());
    let r = get(
        &sbx.client,
        &format!("path={}", enc("../../../../etc/hostname")),
    )
    .await;
    assert_eq!(r.body.as_ref(), inside.as_slice());
    if let Ok(host) = std::fs::read("/etc/hostname") {
        assert_ne!(
            host, inside,
            "the test needs a host name that differs from the sandbox's"
        );
    }
    sbx.destroy().await;
}

#[tokio::test]
async fn upload_size_limit() {
    let env = TestEnv::new();
    let mut spec = env.spec();
    spec.agent.max_upload_bytes = 1 << 20;
    let sbx = env.create_spec(spec).await.unwrap();
    let too_big = random_bytes((1 << 20) + 1);

    let r = post_raw(&sbx.client, "path=big.bin", too_big.clone(), false).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        r.json(),
        json!({"code": 413, "message": "upload exceeds 1048576 bytes"})
    );
    let r = post_chunked(&sbx.info.agent_socket, "path=big.bin", &too_big, 64 << 10).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    let r = post_multipart(&sbx.client, "", &[("big.bin", &too_big)]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Nothing is left behind: no file, no temporary file.
    assert_eq!(
        sbx.sh("ls -A ~ | grep -c -e big.bin -e cubicle-upload")
            .await
            .stdout_text(),
        "0\n"
    );

    // Exactly the limit is fine.
    let r = post_raw(
        &sbx.client,
        "path=ok.bin",
        too_big[..1 << 20].to_vec(),
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        sandbox_sha256(&sbx, "/home/user/ok.bin").await,
        sha256_hex(&too_big[..1 << 20])
    );
    sbx.destroy().await;
}

#[tokio::test]
async fn access_token_and_signatures() {
    let env = TestEnv::new();
    let mut spec = env.spec();
    spec.agent.access_token = Some("s3cret-token".into());
    let sbx = env.create_spec(spec).await.unwrap();
    let with_token = &sbx.client;
    let bare = EnvdClient::new(&sbx.info.agent_socket);
    let wrong = EnvdClient::new(&sbx.info.agent_socket).with_access_token("nope");

    let up = post_raw(with_token, "path=s.txt", b"signed".to_vec(), false).await;
    assert_eq!(up.status, StatusCode::OK);
    let r = get(&bare, "path=s.txt").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["code"], 401);
    assert_eq!(
        get(&wrong, "path=s.txt").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        post_raw(&bare, "path=t.txt", b"x".to_vec(), false)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(get(with_token, "path=s.txt").await.body.as_ref(), b"signed");

    // Signed URLs (as the SDK's download_url/upload_url build them).
    let sign = |path: &str, op, user: &str, exp: Option<u64>| {
        enc(&cubicle_agent::auth::signature(
            path,
            op,
            user,
            "s3cret-token",
            exp,
        ))
    };
    use cubicle_agent::auth::FileOperation::{Read, Write};
    let r = get(
        &bare,
        &format!("path=s.txt&signature={}", sign("s.txt", Read, "", None)),
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_ref()),
        (StatusCode::OK, b"signed".as_ref())
    );
    let later = chrono::Utc::now().timestamp() as u64 + 600;
    let q = format!(
        "path=s.txt&username=user&signature={}&signature_expiration={later}",
        sign("s.txt", Read, "user", Some(later))
    );
    assert_eq!(get(&bare, &q).await.status, StatusCode::OK);
    // Wrong operation, path, user or token; expired.
    for q in [
        format!("path=s.txt&signature={}", sign("s.txt", Write, "", None)),
        format!("path=other.txt&signature={}", sign("s.txt", Read, "", None)),
        format!(
            "path=s.txt&username=root&signature={}",
            sign("s.txt", Read, "", None)
        ),
        format!(
            "path=s.txt&signature={}",
            enc(&cubicle_agent::auth::signature(
                "s.txt", Read, "", "other", None
            ))
        ),
        format!(
            "path=s.txt&signature={}&signature_expiration=1000",
            sign("s.txt", Read, "", Some(1000))
        ),
        "path=s.txt&signature=v1_garbage".to_owned(),
    ] {
        let r = get(&bare, &q).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{q}");
        assert_eq!(r.json()["code"], 401);
    }
    let up = post_raw(
        &bare,
        &format!("path=w.txt&signature={}", sign("w.txt", Write, "", None)),
        b"w".to_vec(),
        false,
    )
    .await;
    assert_eq!(up.status, StatusCode::OK);
    assert_eq!(
        sbx.sh("cat ~/w.txt; stat -c %u ~/w.txt")
            .await
            .stdout_text(),
        "w1000\n"
    );
    let up = post_raw(
        &bare,
        &format!("path=w.txt&signature={}", sign("w.txt", Read, "", None)),
        b"x".to_vec(),
        false,
    )
    .await;
    assert_eq!(up.status, StatusCode::UNAUTHORIZED);
    sbx.destroy().await;
}
