//! The REST API through the real router, over a controller with a fake runtime: status
//! codes, E2B's JSON shapes, auth, and `{code, message}` for every kind of bad input.

use std::sync::Arc;

use axum::body::Body;
use cubicle_api::AppState;
use cubicle_control::testing::{fake_templates, FakeRuntime};
use cubicle_control::{ControlConfig, Controller};
use cubicle_store::Store;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Api {
    app: axum::Router,
    key: String,
    other_key: String,
    runtime: Arc<FakeRuntime>,
    _templates: tempfile::TempDir,
}

async fn api() -> Api {
    let store = Store::open_in_memory().unwrap();
    let (_, key) = store.create_key("main").unwrap();
    let (_, other_key) = store.create_key("other").unwrap();
    let runtime = Arc::new(FakeRuntime::default());
    let (tmp, templates) = fake_templates();
    let controller = Controller::start(ControlConfig::default(), runtime.clone(), store, templates)
        .await
        .unwrap();
    let app = cubicle_api::app(AppState::new(controller, Some("localhost:3000".into())));
    Api {
        app,
        key,
        other_key,
        runtime,
        _templates: tmp,
    }
}

impl Api {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        key: Option<&str>,
        body: &str,
    ) -> (StatusCode, http::HeaderMap, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "non-JSON body for {uri}: {:?}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, headers, value)
    }

    async fn key(&self, method: Method, uri: &str, body: &str) -> (StatusCode, Value) {
        let (s, _, v) = self.call(method, uri, Some(&self.key), body).await;
        (s, v)
    }

    /// Sandbox traffic: no API key, routed by headers.
    async fn call_headers(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn create(&self, body: Value) -> Value {
        let (s, v) = self
            .key(Method::POST, "/v2/sandboxes", &body.to_string())
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v
    }
}

/// An error must be `{"code": <status>, "message": <non-empty string>}`.
fn assert_error(status: StatusCode, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["code"], json!(expected.as_u16()), "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn auth_is_required_and_keys_are_isolated() {
    let api = api().await;
    let (s, _, v) = api.call(Method::GET, "/health", None, "").await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("ok")));
    for key in [
        None,
        Some("wrong"),
        Some("e2b_0000000000000000000000000000000000000000"),
    ] {
        let (s, _, v) = api
            .call(
                Method::POST,
                "/v2/sandboxes",
                key,
                r#"{"templateID":"base"}"#,
            )
            .await;
        assert_error(s, &v, StatusCode::UNAUTHORIZED);
        assert_eq!(v["message"], "Invalid API key");
    }
    // Bearer works as well as X-API-KEY.
    let resp = api
        .app
        .clone()
        .oneshot(
            Request::get("/v2/sandboxes")
                .header("authorization", format!("Bearer {}", api.key))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    let sbx = api.create(json!({"templateID": "base"})).await;
    let id = sbx["sandboxID"].as_str().unwrap();
    for (m, uri, body) in [
        (Method::GET, format!("/sandboxes/{id}"), ""),
        (Method::DELETE, format!("/sandboxes/{id}"), ""),
        (
            Method::POST,
            format!("/sandboxes/{id}/timeout"),
            r#"{"timeout": 60}"#,
        ),
        (Method::POST, format!("/v2/sandboxes/{id}/connect"), "{}"),
        (Method::GET, format!("/sandboxes/{id}/metrics"), ""),
    ] {
        let (s, _, v) = api.call(m.clone(), &uri, Some(&api.other_key), body).await;
        assert_error(s, &v, StatusCode::NOT_FOUND);
    }
    let (_, _, list) = api
        .call(Method::GET, "/v2/sandboxes", Some(&api.other_key), "")
        .await;
    assert_eq!(list, json!([]));
}

#[tokio::test]
async fn create_get_list_timeout_kill_shapes() {
    let api = api().await;
    let sbx = api
        .create(json!({"templateID": "base", "timeout": 120, "metadata": {"user": "ana"}, "envVars": {"A": "1"}}))
        .await;
    assert_eq!(sbx["templateID"], "base");
    assert_eq!(sbx["envdVersion"], "0.6.4");
    assert_eq!(sbx["envdAccessToken"].as_str().map(str::len), Some(64));
    assert_eq!(sbx["trafficAccessToken"], Value::Null);
    assert_eq!(sbx["domain"], "localhost:3000");
    let id = sbx["sandboxID"].as_str().unwrap().to_owned();

    let (s, detail) = api.key(Method::GET, &format!("/sandboxes/{id}"), "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(detail["state"], "running");
    assert_eq!(detail["metadata"], json!({"user": "ana"}));
    assert_eq!(detail["cpuCount"], 2);
    assert_eq!(detail["memoryMB"], 2048);
    assert_eq!(detail["envdAccessToken"], sbx["envdAccessToken"]);
    let started =
        chrono::DateTime::parse_from_rfc3339(detail["startedAt"].as_str().unwrap()).unwrap();
    let end = chrono::DateTime::parse_from_rfc3339(detail["endAt"].as_str().unwrap()).unwrap();
    assert!((end - started).num_seconds() >= 119);

    let (s, _) = api
        .key(
            Method::POST,
            &format!("/sandboxes/{id}/timeout"),
            r#"{"timeout": 600}"#,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, after) = api.key(Method::GET, &format!("/sandboxes/{id}"), "").await;
    assert_ne!(after["endAt"], detail["endAt"]);

    // v1 create without `secure` gets no token.
    let (s, v1) = api
        .key(Method::POST, "/sandboxes", r#"{"templateID":"base"}"#)
        .await;
    assert_eq!(s, StatusCode::CREATED);
    assert!(v1.get("envdAccessToken").is_none(), "{v1}");

    let (s, list) = api
        .key(Method::GET, "/v2/sandboxes?metadata=user%3Dana", "")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["sandboxID"], json!(id));
    assert!(
        list[0].get("envdAccessToken").is_none(),
        "list never shows tokens"
    );

    let (s, _) = api
        .key(Method::DELETE, &format!("/sandboxes/{id}"), "")
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api
        .key(Method::DELETE, &format!("/sandboxes/{id}"), "")
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let (s, v) = api.key(Method::GET, &format!("/sandboxes/{id}"), "").await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    assert_eq!(v["message"], format!("sandbox {id} not found"));
}

#[tokio::test]
async fn pagination_walks_every_sandbox_once() {
    let api = api().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(api.create(json!({"templateID": "base"})).await["sandboxID"].clone());
    }
    let mut seen = Vec::new();
    let mut uri = "/v2/sandboxes?limit=2".to_string();
    loop {
        let (s, headers, page) = api.call(Method::GET, &uri, Some(&api.key), "").await;
        assert_eq!(s, StatusCode::OK);
        seen.extend(
            page.as_array()
                .unwrap()
                .iter()
                .map(|s| s["sandboxID"].clone()),
        );
        match headers.get("x-next-token") {
            Some(t) => uri = format!("/v2/sandboxes?limit=2&nextToken={}", t.to_str().unwrap()),
            None => break,
        }
    }
    seen.sort_by_key(|v| v.to_string());
    ids.sort_by_key(|v| v.to_string());
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn bad_input_is_a_4xx_json_error_and_changes_nothing() {
    let api = api().await;
    let cases: Vec<(Method, &str, String, StatusCode)> = vec![
        (
            Method::POST,
            "/v2/sandboxes",
            "{not json".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            "".into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","tiemout":5}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":5}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"nope"}"#.into(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"../../etc"}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","timeout":-5}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","timeout":0}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","timeout":99999999999}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","timeout":1e400}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            r#"{"templateID":"base","envVars":{"A=B":"x"}}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/v2/sandboxes",
            format!(
                r#"{{"templateID":"base","metadata":{{"k":"{}"}}}}"#,
                "x".repeat(2 << 20)
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            Method::GET,
            "/v2/sandboxes?limit=0",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v2/sandboxes?state=dead",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/v2/sandboxes?nextToken=garbage",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/sandboxes/..%2F..%2Fetc",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/sandboxes/UPPER",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/sandboxes/abc/timeout",
            r#"{"timeout":"soon"}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/no/such/route",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::PUT,
            "/v2/sandboxes",
            String::new(),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            Method::POST,
            "/sandboxes/abc/pause",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/sandboxes/abc/snapshots",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/sandboxes/abc/fork",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/sandboxes/abc/rollback",
            r#"{"snapshotID":"x:default"}"#.into(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            "/templates/nope%3Adefault",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::DELETE,
            "/templates/base",
            String::new(),
            StatusCode::CONFLICT,
        ),
        (
            Method::POST,
            "/v3/templates",
            "{}".into(),
            StatusCode::NOT_IMPLEMENTED,
        ),
        (
            Method::POST,
            "/v2/templates/base/builds/x",
            "{}".into(),
            StatusCode::NOT_IMPLEMENTED,
        ),
        (
            Method::GET,
            "/templates/base/builds/nope/status",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::GET,
            "/templates/aliases/nope",
            String::new(),
            StatusCode::NOT_FOUND,
        ),
        (
            Method::POST,
            "/templates/images",
            r#"{"image":""}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/templates/images",
            r#"{"image":"/x","templateID":"base"}"#.into(),
            StatusCode::CONFLICT,
        ),
        (
            Method::POST,
            "/templates/images",
            r#"{"image":"/x","templateID":"Bad Name"}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/templates/images",
            r#"{"image":"/x","registryUsername":"u"}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/templates/images",
            r#"{"image":"/x","probe":{"port":80,"path":"nope"}}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::POST,
            "/templates/images",
            r#"{"image":"/x","tmplateID":"a"}"#.into(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/snapshots?limit=0",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/snapshots?limit=x",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
        (
            Method::GET,
            "/snapshots?nextToken=garbage!",
            String::new(),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (method, uri, body, expected) in cases {
        let (s, v) = api.key(method.clone(), uri, &body).await;
        assert_error(s, &v, expected);
        if s.is_server_error() {
            assert_eq!(s, StatusCode::NOT_IMPLEMENTED, "{method} {uri}");
        }
    }
    // Regressions found by the SDK suite's fuzzing.
    let many_pairs = (0..1000)
        .map(|i| format!("k{i}%3Dv"))
        .collect::<Vec<_>>()
        .join("%26");
    let regressions = [
        // serde reads a JSON array as a struct's fields in order.
        (Method::POST, "/v2/sandboxes".to_string(), r#"["base", 30]"#),
        (Method::POST, "/v2/sandboxes".to_string(), r#""base""#),
        (
            Method::POST,
            "/v2/sandboxes".to_string(),
            r#"{"templateID":"base","templateID":"base"}"#,
        ),
        // 1000 metadata pairs overflowed SQLite's expression depth (was a 500).
        (
            Method::GET,
            format!("/v2/sandboxes?metadata={many_pairs}"),
            "",
        ),
        (Method::GET, format!("/sandboxes?metadata={many_pairs}"), ""),
        // start * 1000 overflowed.
        (
            Method::GET,
            "/sandboxes/abc/metrics?start=9223372036854775807".to_string(),
            "",
        ),
    ];
    for (method, uri, body) in regressions {
        let (s, v) = api.key(method, &uri, body).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST);
    }
    assert!(
        api.runtime.created.lock().unwrap().is_empty(),
        "bad input created a sandbox"
    );
}

#[tokio::test]
async fn sandbox_traffic_for_unknown_sandboxes_is_e2b_502() {
    let api = api().await;
    let req = |headers: &[(&str, &str)]| {
        let mut b = Request::post("/process.Process/Start");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    };
    let resp = api
        .app
        .clone()
        .oneshot(req(&[("e2b-sandbox-id", "nosuchsandbox")]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["message"], "The sandbox was not found");
    assert_eq!(v["sandboxId"], "nosuchsandbox");
    // Host-based routing reaches the proxy too.
    let resp = api
        .app
        .clone()
        .oneshot(req(&[("host", "8080-nosuch.localhost:3000")]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let resp = api
        .app
        .clone()
        .oneshot(req(&[
            ("e2b-sandbox-id", "x"),
            ("e2b-sandbox-port", "nope"),
        ]))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn templates_have_the_fields_the_sdk_requires() {
    let api = api().await;
    api.create(json!({"templateID": "base"})).await;
    let (s, list) = api.key(Method::GET, "/templates", "").await;
    assert_eq!(s, StatusCode::OK);
    let t = &list[0];
    for field in [
        "templateID",
        "buildID",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "public",
        "aliases",
        "names",
        "createdAt",
        "updatedAt",
        "createdBy",
        "lastSpawnedAt",
        "spawnCount",
        "buildCount",
        "envdVersion",
        "buildStatus",
    ] {
        assert!(t.get(field).is_some(), "missing {field}: {t}");
    }
    assert_eq!(t["spawnCount"], 1);
    let (s, one) = api.key(Method::GET, "/templates/base", "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["builds"][0]["status"], "ready");
    let (s, v) = api.key(Method::GET, "/templates/nope", "").await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn deleting_a_template_in_use_is_refused_and_says_what_uses_it() {
    let api = api().await;
    let sbx = api
        .create(json!({"templateID": "code-interpreter-v1"}))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap();
    let (s, v) = api
        .key(Method::DELETE, "/templates/code-interpreter", "")
        .await;
    assert_error(s, &v, StatusCode::CONFLICT);
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("cannot delete template 'code-interpreter': it is in use: sandboxes")
            && msg.contains(id),
        "{msg}"
    );
    // The parent: its child uses it.
    let (s, v) = api.key(Method::DELETE, "/templates/base", "").await;
    assert_error(s, &v, StatusCode::CONFLICT);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("templates built on it: code-interpreter"),
        "{v}"
    );
    // A rebuild is refused the same way.
    let (s, v) = api
        .key(Method::POST, "/templates/code-interpreter/rebuild", "{}")
        .await;
    assert_error(s, &v, StatusCode::CONFLICT);
    // Paused still counts; killed does not.
    let (s, _) = api
        .key(Method::POST, &format!("/sandboxes/{id}/pause"), "{}")
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = api
        .key(Method::DELETE, "/templates/code-interpreter-v1", "")
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // A snapshot of it needs its layer, even once the sandbox is gone.
    let (s, snap) = api
        .key(
            Method::POST,
            &format!("/sandboxes/{id}/snapshots"),
            r#"{"name":"keep-ci"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{snap}");
    let (s, _) = api
        .key(Method::DELETE, &format!("/sandboxes/{id}"), "")
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api
        .key(Method::DELETE, "/templates/code-interpreter", "")
        .await;
    assert_error(s, &v, StatusCode::CONFLICT);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .ends_with("it is in use: snapshots keep-ci:default"),
        "{v}"
    );
    let (s, _) = api
        .key(Method::DELETE, "/templates/keep-ci:default", "")
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // By alias: the template itself goes.
    let (s, v) = api
        .key(Method::DELETE, "/templates/code-interpreter-v1", "")
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, v) = api
        .key(Method::GET, "/templates/code-interpreter", "")
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let (s, v) = api
        .key(Method::GET, "/templates/aliases/code-interpreter-v1", "")
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let (s, v) = api.key(Method::GET, "/templates/aliases/base", "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"templateID": "base", "public": false}));
}

#[tokio::test]
async fn templates_list_their_aliases_and_are_found_by_them() {
    let api = api().await;
    let created = api
        .create(json!({"templateID": "code-interpreter-v1"}))
        .await;
    assert_eq!(created["templateID"], "code-interpreter");
    assert_eq!(created["alias"], "code-interpreter-v1");
    let (s, list) = api.key(Method::GET, "/templates", "").await;
    assert_eq!(s, StatusCode::OK);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["templateID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "code-interpreter"]);
    assert_eq!(list[0]["aliases"], json!(["base"]));
    assert_eq!(
        list[1]["aliases"],
        json!(["code-interpreter", "code-interpreter-v1"])
    );
    assert_eq!(list[1]["names"], list[1]["aliases"]);
    assert_eq!(list[1]["spawnCount"], 1);
    let (s, one) = api
        .key(Method::GET, "/templates/code-interpreter-v1", "")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(one["templateID"], "code-interpreter");
}

#[tokio::test]
async fn pause_connect_and_resume_have_e2b_statuses() {
    let api = api().await;
    let sbx = api.create(json!({"templateID": "base"})).await;
    let id = sbx["sandboxID"].as_str().unwrap();
    let path = |p: &str| format!("/sandboxes/{id}{p}");

    let (s, v) = api.key(Method::POST, &path("/pause"), "{}").await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, v) = api.key(Method::GET, &path(""), "").await;
    assert_eq!((s, v["state"].as_str()), (StatusCode::OK, Some("paused")));
    // The SDK reads 409 as "already paused".
    let (s, v) = api.key(Method::POST, &path("/pause"), "").await;
    assert_error(s, &v, StatusCode::CONFLICT);
    // Traffic to a paused sandbox is E2B's 502.
    let (s, v) = api
        .call_headers(
            Method::POST,
            "/process.Process/Start",
            &[("e2b-sandbox-id", id)],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{v}");
    // Not yet: cold reboot and filesystem-only pause.
    let (s, v) = api
        .key(
            Method::POST,
            &format!("/v2{}", path("/connect")),
            r#"{"memory":false}"#,
        )
        .await;
    assert_error(s, &v, StatusCode::NOT_IMPLEMENTED);

    // connect resumes: 201, then 200 while it runs.
    let (s, v) = api
        .key(
            Method::POST,
            &format!("/v2{}", path("/connect")),
            r#"{"timeout":60}"#,
        )
        .await;
    assert_eq!(
        (s, v["sandboxID"].as_str()),
        (StatusCode::CREATED, Some(id))
    );
    let (_, v) = api.key(Method::GET, &path(""), "").await;
    assert_eq!(v["state"], "running");
    let (s, _) = api
        .key(Method::POST, &format!("/v2{}", path("/connect")), "{}")
        .await;
    assert_eq!(s, StatusCode::OK);
    // v1 resume: 409 while running, 201 when paused.
    let (s, v) = api.key(Method::POST, &path("/resume"), "{}").await;
    assert_error(s, &v, StatusCode::CONFLICT);
    api.key(Method::POST, &path("/pause"), "{}").await;
    let (s, v) = api.key(Method::POST, &path("/resume"), "{}").await;
    assert_eq!(
        (s, v["sandboxID"].as_str()),
        (StatusCode::CREATED, Some(id))
    );

    let (s, v) = api
        .key(Method::POST, &path("/pause"), r#"{"memory":false}"#)
        .await;
    assert_error(s, &v, StatusCode::NOT_IMPLEMENTED);
    let (s, v) = api
        .key(Method::POST, &path("/pause"), r#"{"nope":1}"#)
        .await;
    assert_error(s, &v, StatusCode::BAD_REQUEST);

    // Killed: pause and connect are 404.
    api.key(Method::POST, &path("/pause"), "{}").await;
    let (s, _) = api.key(Method::DELETE, &path(""), "").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api.key(Method::POST, &path("/pause"), "{}").await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let (s, v) = api
        .key(Method::POST, &format!("/v2{}", path("/connect")), "{}")
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn snapshots_fork_rollback_have_e2b_shapes_and_statuses() {
    let api = api().await;
    let sbx = api
        .create(json!({"templateID": "base", "envVars": {"A": "1"}}))
        .await;
    let id = sbx["sandboxID"].as_str().unwrap();
    let path = |p: &str| format!("/sandboxes/{id}{p}");

    // Create: 201 {snapshotID, names}.
    let (s, v) = api
        .key(Method::POST, &path("/snapshots"), r#"{"name":"snap-1"}"#)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["snapshotID"], "snap-1:default");
    assert_eq!(v["names"], json!(["main/snap-1:default"]));
    assert_eq!(v["sandboxID"], id);
    let (s, unnamed) = api.key(Method::POST, &path("/snapshots"), "{}").await;
    assert_eq!(s, StatusCode::CREATED, "{unnamed}");
    assert_eq!(unnamed["names"], json!([]));
    let unnamed_id = unnamed["snapshotID"].as_str().unwrap().to_owned();
    assert!(unnamed_id.ends_with(":default"));
    // Same name again → 409; bad name, unknown field → 400; memory:false → 501;
    // another key → 404.
    let (s, v) = api
        .key(Method::POST, &path("/snapshots"), r#"{"name":"snap-1"}"#)
        .await;
    assert_error(s, &v, StatusCode::CONFLICT);
    for body in [
        r#"{"name":"Bad Name"}"#,
        r#"{"name":""}"#,
        r#"{"nme":"x"}"#,
        r#"{"name":5}"#,
        "[]",
    ] {
        let (s, v) = api.key(Method::POST, &path("/snapshots"), body).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST);
    }
    let (s, v) = api
        .key(Method::POST, &path("/snapshots"), r#"{"memory":false}"#)
        .await;
    assert_error(s, &v, StatusCode::NOT_IMPLEMENTED);
    let (s, _, v) = api
        .call(
            Method::POST,
            &path("/snapshots"),
            Some(&api.other_key),
            "{}",
        )
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);

    // List: SnapshotInfo items, pagination through x-next-token, filters.
    let (s, h, v) = api
        .call(Method::GET, "/snapshots?limit=1", Some(&api.key), "")
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert!(v[0]["snapshotID"].is_string() && v[0]["names"].is_array());
    let next = h["x-next-token"].to_str().unwrap().to_owned();
    let (_, h2, v2) = api
        .call(
            Method::GET,
            &format!("/snapshots?limit=1&nextToken={next}"),
            Some(&api.key),
            "",
        )
        .await;
    assert_eq!(v2.as_array().unwrap().len(), 1);
    assert!(h2.get("x-next-token").is_none());
    assert_ne!(v[0]["snapshotID"], v2[0]["snapshotID"]);
    let (_, v) = api
        .key(
            Method::GET,
            &format!("/snapshots?sandboxID={id}&name=snap-1"),
            "",
        )
        .await;
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (_, _, v) = api
        .call(Method::GET, "/snapshots", Some(&api.other_key), "")
        .await;
    assert_eq!(v, json!([]));

    // Create from the snapshot: a plain create naming it.
    let copy = api.create(json!({"templateID": "snap-1:default"})).await;
    assert_ne!(copy["sandboxID"], sbx["sandboxID"]);
    assert_eq!(copy["templateID"], "base");
    assert_eq!(copy["alias"], "snap-1:default");
    assert_eq!(api.runtime.restored.lock().unwrap().len(), 1);
    let (s, _, v) = api
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(&api.other_key),
            r#"{"templateID":"snap-1:default"}"#,
        )
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);

    // Fork: 201, one entry per fork.
    let (s, v) = api
        .key(Method::POST, &path("/fork"), r#"{"count":3,"timeout":60}"#)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let forks = v.as_array().unwrap();
    assert_eq!(forks.len(), 3);
    for f in forks {
        assert!(f["sandbox"]["sandboxID"].is_string(), "{f}");
        assert!(f["sandbox"]["envdAccessToken"].is_string(), "{f}");
        assert!(f.get("error").is_none());
    }
    let (s, v) = api.key(Method::POST, &path("/clone"), "").await;
    assert_eq!(
        (s, v.as_array().map(Vec::len)),
        (StatusCode::CREATED, Some(1))
    );
    *api.runtime.fail_next_restore.lock().unwrap() = true;
    let (s, v) = api
        .key(Method::POST, &path("/fork"), r#"{"count":2}"#)
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let errors: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f.get("error").is_some())
        .collect();
    assert_eq!(errors.len(), 1, "{v}");
    assert_eq!(errors[0]["error"]["code"], 500);
    assert!(errors[0]["error"]["message"].is_string());
    for body in [
        r#"{"count":0}"#,
        r#"{"count":21}"#,
        r#"{"count":-1}"#,
        r#"{"timeout":-5}"#,
        r#"{"cnt":1}"#,
    ] {
        let (s, v) = api.key(Method::POST, &path("/fork"), body).await;
        assert_error(s, &v, StatusCode::BAD_REQUEST);
    }

    // Rollback: 200 Sandbox, same id and token.
    let (s, v) = api
        .key(
            Method::POST,
            &path("/rollback"),
            r#"{"snapshotID":"snap-1:default"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["sandboxID"], id);
    assert_eq!(v["envdAccessToken"], sbx["envdAccessToken"]);
    let copy_id = copy["sandboxID"].as_str().unwrap();
    let (s, v) = api
        .key(
            Method::POST,
            &format!("/sandboxes/{copy_id}/rollback"),
            r#"{"snapshotID":"snap-1:default"}"#,
        )
        .await;
    assert_error(s, &v, StatusCode::CONFLICT);
    for (body, status) in [
        (r#"{"snapshotID":"nope:default"}"#, StatusCode::NOT_FOUND),
        ("{}", StatusCode::BAD_REQUEST),
        (r#"{"snapshotID":"snap-1","x":1}"#, StatusCode::BAD_REQUEST),
    ] {
        let (s, v) = api.key(Method::POST, &path("/rollback"), body).await;
        assert_error(s, &v, status);
    }

    // Delete: percent-encoded ids, 204 then 404; other keys 404.
    let (s, _, v) = api
        .call(
            Method::DELETE,
            "/templates/snap-1%3Adefault",
            Some(&api.other_key),
            "",
        )
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let (s, _) = api
        .key(Method::DELETE, "/templates/main%2Fsnap-1%3Adefault", "")
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api
        .key(Method::DELETE, "/templates/snap-1%3Adefault", "")
        .await;
    assert_error(s, &v, StatusCode::NOT_FOUND);
    let enc = unnamed_id.replace(':', "%3A");
    let (s, _) = api
        .key(Method::DELETE, &format!("/templates/{enc}"), "")
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (_, v) = api.key(Method::GET, "/snapshots", "").await;
    assert_eq!(v, json!([]));
}

#[tokio::test]
async fn the_agents_control_requests_are_not_reachable_through_the_proxy() {
    let api = api().await;
    let sbx = api.create(json!({"templateID": "base"})).await;
    let id = sbx["sandboxID"].as_str().unwrap();
    for path in [
        "/_cubicle/identity",
        "/_cubicle/quiesce",
        "/%5Fcubicle/identity",
    ] {
        let (s, v) = api
            .call_headers(Method::POST, path, &[("e2b-sandbox-id", id)])
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}: {v}");
        assert_eq!(v["message"], "no such endpoint in the sandbox");
    }
}
