//! A typed client for the daemon's E2B-compatible REST API (`cubicle serve`), used by
//! the CLI and the load generator. Plain `http://` only, HTTP/1.1 with keep-alive
//! pooling (one pool per [`ApiClient`]; clones share it).
//!
//! ```no_run
//! # async fn demo() -> Result<(), cubicle_client::ClientError> {
//! use cubicle_client::{ApiClient, CreateSandbox};
//! let api = ApiClient::from_env()?; // E2B_API_URL, E2B_API_KEY
//! let sbx = api.create(&CreateSandbox::new("base")).await?;
//! assert!(api.kill(&sbx.sandbox_id).await?);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod code;
mod error;
pub mod models;

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;

pub use crate::code::{CodeEvent, CodeResult, CodeRun, RunCode, INTERPRETER_PORT};
pub use crate::error::ClientError;
pub use crate::models::{
    BuildLayer, BuildReason, BuildStarted, BuildStatus, CreateSandbox, ForkResult, Health,
    ImageBuild, ImageProbe, ListParams, Order, Page, Sandbox, SandboxDetail, SandboxMetric,
    SandboxState, Snapshot, Template,
};

/// Where the API is when `E2B_API_URL` is not set: `cubicle serve`'s default listen address.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:3000";
/// How long one call may take by default (the E2B SDK's request timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Characters escaped in a path segment: everything but `[A-Za-z0-9_-]`.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// A client for one daemon and API key. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    sandbox_url: String,
    api_key: HeaderValue,
    timeout: Duration,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .field("sandbox_url", &self.sandbox_url)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client for the API at `base_url` (`http://host:port`, optionally with a path
    /// prefix) authenticating with `api_key`. Sandbox traffic goes to the same URL
    /// unless [`ApiClient::with_sandbox_url`] says otherwise.
    pub fn new(base_url: &str, api_key: &str) -> Result<Self, ClientError> {
        let base = check_url(base_url)?;
        if api_key.trim().is_empty() {
            return Err(ClientError::NoApiKey);
        }
        let mut api_key =
            HeaderValue::from_str(api_key.trim()).map_err(|_| ClientError::InvalidUrl {
                url: base.clone(),
                reason: "the API key contains characters a header cannot carry".into(),
            })?;
        api_key.set_sensitive(true);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(ApiClient {
            sandbox_url: base.clone(),
            base,
            api_key,
            timeout: DEFAULT_TIMEOUT,
            http,
        })
    }

    /// A client configured like the E2B SDK: `E2B_API_URL` (default
    /// [`DEFAULT_API_URL`]), `E2B_API_KEY` (or `CUBICLE_API_KEY`), `E2B_SANDBOX_URL`
    /// (default: the API URL). Empty variables count as unset.
    pub fn from_env() -> Result<Self, ClientError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`ApiClient::from_env`] with another source of variables (for tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ClientError> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let url = var("E2B_API_URL").unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        let key = var("E2B_API_KEY")
            .or_else(|| var("CUBICLE_API_KEY"))
            .ok_or(ClientError::NoApiKey)?;
        let client = ApiClient::new(&url, &key)?;
        match var("E2B_SANDBOX_URL") {
            Some(sandbox_url) => client.with_sandbox_url(&sandbox_url),
            None => Ok(client),
        }
    }

    /// Sends sandbox (envd) traffic to `url` instead of the API URL.
    pub fn with_sandbox_url(mut self, url: &str) -> Result<Self, ClientError> {
        self.sandbox_url = check_url(url)?;
        Ok(self)
    }

    /// Gives every call `timeout` instead of [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The API's base URL (no trailing `/`).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Where sandbox traffic goes (`E2B_SANDBOX_URL`, default the API URL), for
    /// `cubicle_envd::client::EnvdClient::via_proxy`.
    pub fn sandbox_url(&self) -> &str {
        &self.sandbox_url
    }

    /// `POST /v2/sandboxes`: starts a sandbox; returns once its envd answers.
    pub async fn create(&self, request: &CreateSandbox) -> Result<Sandbox, ClientError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = &request.idempotency_key {
            let value = HeaderValue::from_str(key).map_err(|_| ClientError::Api {
                status: StatusCode::BAD_REQUEST,
                code: None,
                message: "the idempotency key must be ASCII".into(),
            })?;
            headers.insert("idempotency-key", value);
        }
        let body = serde_json::to_vec(request).expect("CreateSandbox serializes");
        let (url, resp) = self
            .call(Method::POST, "/v2/sandboxes", headers, Some(body))
            .await?;
        resp.json(&url)
    }

    /// `GET /v2/sandboxes`: one page.
    pub async fn list(&self, params: &ListParams) -> Result<Page<SandboxDetail>, ClientError> {
        let query = params.query();
        let path = if query.is_empty() {
            "/v2/sandboxes".to_owned()
        } else {
            format!("/v2/sandboxes?{query}")
        };
        let (url, resp) = self
            .call(Method::GET, &path, HeaderMap::new(), None)
            .await?;
        let next_token = resp
            .headers
            .get("x-next-token")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        Ok(Page {
            items: resp.json(&url)?,
            next_token,
        })
    }

    /// Every page of `GET /v2/sandboxes` from `params.next_token` on.
    pub async fn list_all(&self, params: &ListParams) -> Result<Vec<SandboxDetail>, ClientError> {
        let mut params = params.clone();
        let mut all = Vec::new();
        loop {
            let page = self.list(&params).await?;
            all.extend(page.items);
            match page.next_token {
                // A server that hands out the same cursor again would loop forever.
                Some(t) if params.next_token.as_ref() != Some(&t) => params.next_token = Some(t),
                _ => return Ok(all),
            }
        }
    }

    /// `GET /sandboxes/{id}` (includes the envd access token).
    pub async fn get(&self, id: &str) -> Result<SandboxDetail, ClientError> {
        let (url, resp) = self
            .call(Method::GET, &sandbox_path(id, ""), HeaderMap::new(), None)
            .await?;
        resp.json(&url)
    }

    /// `DELETE /sandboxes/{id}`: `true` if it was killed, `false` if there was no such
    /// sandbox (any more), as the E2B SDK's `kill` answers.
    pub async fn kill(&self, id: &str) -> Result<bool, ClientError> {
        match self
            .call(
                Method::DELETE,
                &sandbox_path(id, ""),
                HeaderMap::new(),
                None,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `POST /sandboxes/{id}/pause`: `true` once paused, `false` if it already was.
    pub async fn pause(&self, id: &str) -> Result<bool, ClientError> {
        self.pause_with(id, false).await
    }

    /// `POST /sandboxes/{id}/pause` with Cubicle's `hibernate`: the memory is
    /// checkpointed to disk and freed. `true` once hibernated, `false` if it already was.
    pub async fn hibernate(&self, id: &str) -> Result<bool, ClientError> {
        self.pause_with(id, true).await
    }

    async fn pause_with(&self, id: &str, hibernate: bool) -> Result<bool, ClientError> {
        let body: &[u8] = if hibernate {
            br#"{"hibernate":true}"#
        } else {
            b"{}"
        };
        match self
            .call(
                Method::POST,
                &sandbox_path(id, "/pause"),
                HeaderMap::new(),
                Some(body.to_vec()),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(StatusCode::CONFLICT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `POST /sandboxes/{id}/timeout`: the sandbox is killed `secs` seconds from now.
    pub async fn set_timeout(&self, id: &str, secs: u64) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&serde_json::json!({ "timeout": secs })).expect("json");
        self.call(
            Method::POST,
            &sandbox_path(id, "/timeout"),
            HeaderMap::new(),
            Some(body),
        )
        .await?;
        Ok(())
    }

    /// `POST /v2/sandboxes/{id}/connect`: the sandbox (with its current access token),
    /// resumed if it was paused, its lifetime extended to `timeout` seconds from now if
    /// that is later.
    pub async fn connect(&self, id: &str, timeout: Option<u64>) -> Result<Sandbox, ClientError> {
        let body = match timeout {
            Some(t) => serde_json::json!({ "timeout": t }),
            None => serde_json::json!({}),
        };
        let path = format!("/v2{}", sandbox_path(id, "/connect"));
        let (url, resp) = self
            .call(
                Method::POST,
                &path,
                HeaderMap::new(),
                Some(serde_json::to_vec(&body).expect("json")),
            )
            .await?;
        resp.json(&url)
    }

    /// `POST /sandboxes/{id}/snapshots`: a snapshot of the sandbox (memory, processes,
    /// files), optionally named.
    pub async fn snapshot(&self, id: &str, name: Option<&str>) -> Result<Snapshot, ClientError> {
        let body = match name {
            Some(n) => serde_json::json!({ "name": n }),
            None => serde_json::json!({}),
        };
        let (url, resp) = self
            .call(
                Method::POST,
                &sandbox_path(id, "/snapshots"),
                HeaderMap::new(),
                Some(serde_json::to_vec(&body).expect("json")),
            )
            .await?;
        resp.json(&url)
    }

    /// Every snapshot of the key (`GET /snapshots`, all pages), optionally only those of
    /// one sandbox; newest first.
    pub async fn snapshots(&self, sandbox: Option<&str>) -> Result<Vec<Snapshot>, ClientError> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = form_urlencoded_pairs(&[
                ("limit", Some("1000")),
                ("sandboxID", sandbox),
                ("nextToken", token.as_deref()),
            ]);
            if !query.is_empty() {
                query.insert(0, '?');
            }
            let (url, resp) = self
                .call(
                    Method::GET,
                    &format!("/snapshots{query}"),
                    HeaderMap::new(),
                    None,
                )
                .await?;
            let next = resp
                .headers
                .get("x-next-token")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_owned);
            let items: Vec<Snapshot> = resp.json(&url)?;
            all.extend(items);
            match next {
                Some(t) if token.as_ref() != Some(&t) => token = Some(t),
                _ => return Ok(all),
            }
        }
    }

    /// `DELETE /templates/{id}` for a snapshot: `true` if deleted, `false` if there was
    /// no such snapshot (as the SDK's `delete_snapshot`).
    pub async fn delete_snapshot(&self, id: &str) -> Result<bool, ClientError> {
        let path = format!("/templates/{}", utf8_percent_encode(id, SEGMENT));
        match self
            .call(Method::DELETE, &path, HeaderMap::new(), None)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `POST /sandboxes/{id}/fork`: `count` new sandboxes from one checkpoint of `id`,
    /// each living `timeout` seconds (the daemon's fork default if `None`).
    pub async fn fork(
        &self,
        id: &str,
        count: u32,
        timeout: Option<u64>,
    ) -> Result<Vec<ForkResult>, ClientError> {
        let mut body = serde_json::json!({ "count": count });
        if let Some(t) = timeout {
            body["timeout"] = t.into();
        }
        let (url, resp) = self
            .call(
                Method::POST,
                &sandbox_path(id, "/fork"),
                HeaderMap::new(),
                Some(serde_json::to_vec(&body).expect("json")),
            )
            .await?;
        resp.json(&url)
    }

    /// `POST /sandboxes/{id}/rollback` (Cubicle's own): the sandbox back at one of its
    /// snapshots, same id and token, running.
    pub async fn rollback(&self, id: &str, snapshot: &str) -> Result<Sandbox, ClientError> {
        let body = serde_json::json!({ "snapshotID": snapshot });
        let (url, resp) = self
            .call(
                Method::POST,
                &sandbox_path(id, "/rollback"),
                HeaderMap::new(),
                Some(serde_json::to_vec(&body).expect("json")),
            )
            .await?;
        resp.json(&url)
    }

    /// `GET /sandboxes/{id}/metrics`: resource samples, oldest first.
    pub async fn metrics(&self, id: &str) -> Result<Vec<SandboxMetric>, ClientError> {
        let (url, resp) = self
            .call(
                Method::GET,
                &sandbox_path(id, "/metrics"),
                HeaderMap::new(),
                None,
            )
            .await?;
        resp.json(&url)
    }

    /// `GET /templates`.
    pub async fn templates(&self) -> Result<Vec<Template>, ClientError> {
        let (url, resp) = self
            .call(Method::GET, "/templates", HeaderMap::new(), None)
            .await?;
        resp.json(&url)
    }

    /// `GET /templates/{id}`: one template by name or alias, with its builds and its
    /// `template.json` (`meta`).
    pub async fn template(&self, name: &str) -> Result<Template, ClientError> {
        let (url, resp) = self
            .call(
                Method::GET,
                &template_path(name, ""),
                HeaderMap::new(),
                None,
            )
            .await?;
        resp.json(&url)
    }

    /// `DELETE /templates/{id}` for a template: refused (409, saying what uses it) while
    /// sandboxes, snapshots or other templates use it.
    pub async fn delete_template(&self, name: &str) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &template_path(name, ""),
            HeaderMap::new(),
            None,
        )
        .await?;
        Ok(())
    }

    /// `POST /templates/images` (Cubicle's own): starts building a template from a
    /// container image; follow it with [`ApiClient::build_status`].
    pub async fn build_image(&self, build: &ImageBuild) -> Result<BuildStarted, ClientError> {
        let (url, resp) = self
            .call(
                Method::POST,
                "/templates/images",
                HeaderMap::new(),
                Some(serde_json::to_vec(build).expect("json")),
            )
            .await?;
        resp.json(&url)
    }

    /// `POST /templates/{id}/rebuild` (Cubicle's own): builds the template again from
    /// its recorded source; registry credentials, which are never stored, again.
    pub async fn rebuild_template(
        &self,
        name: &str,
        registry: Option<(&str, &str)>,
    ) -> Result<BuildStarted, ClientError> {
        let body = match registry {
            Some((u, p)) => serde_json::json!({"registryUsername": u, "registryPassword": p}),
            None => serde_json::json!({}),
        };
        let (url, resp) = self
            .call(
                Method::POST,
                &template_path(name, "/rebuild"),
                HeaderMap::new(),
                Some(serde_json::to_vec(&body).expect("json")),
            )
            .await?;
        resp.json(&url)
    }

    /// `GET /templates/{id}/builds/{buildID}/status?logsOffset=`: the build's status
    /// and its log lines from number `logs_offset` on.
    pub async fn build_status(
        &self,
        template: &str,
        build: &str,
        logs_offset: u64,
    ) -> Result<BuildStatus, ClientError> {
        let path = template_path(
            template,
            &format!(
                "/builds/{}/status?logsOffset={logs_offset}",
                utf8_percent_encode(build, SEGMENT)
            ),
        );
        let (url, resp) = self
            .call(Method::GET, &path, HeaderMap::new(), None)
            .await?;
        resp.json(&url)
    }

    /// `GET /health` (needs no key; tells whether the daemon is up).
    pub async fn health(&self) -> Result<Health, ClientError> {
        let (url, resp) = self
            .call(Method::GET, "/health", HeaderMap::new(), None)
            .await?;
        resp.json(&url)
    }

    /// Sends one request and reads the whole answer; non-2xx answers become
    /// [`ClientError::Api`].
    async fn call(
        &self,
        method: Method,
        path: &str,
        mut headers: HeaderMap,
        body: Option<Vec<u8>>,
    ) -> Result<(String, Answer), ClientError> {
        let url = format!("{}{path}", self.base);
        let uri: Uri = url.parse().map_err(|e| ClientError::InvalidUrl {
            url: url.clone(),
            reason: format!("{e}"),
        })?;
        headers.insert("x-api-key", self.api_key.clone());
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("cubicle-client/", env!("CARGO_PKG_VERSION"))),
        );
        if body.is_some() {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("valid request");
        *req.headers_mut() = headers;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| self.transport(&url, e))?;
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| ClientError::Transport {
                    url: url.clone(),
                    source: Box::new(e),
                })?
                .to_bytes();
            Ok::<_, ClientError>(Answer {
                status: parts.status,
                headers: parts.headers,
                body: bytes,
            })
        };
        let answer = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                after: self.timeout,
            })??;
        if !answer.status.is_success() {
            return Err(ClientError::from_response(answer.status, &answer.body));
        }
        Ok((url, answer))
    }

    fn transport(&self, url: &str, e: hyper_util::client::legacy::Error) -> ClientError {
        if e.is_connect() {
            return ClientError::Unreachable {
                url: self.base.clone(),
                reason: connect_reason(&e),
            };
        }
        ClientError::Transport {
            url: url.to_owned(),
            source: Box::new(e),
        }
    }
}

/// A whole answer.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json<T: DeserializeOwned>(&self, url: &str) -> Result<T, ClientError> {
        serde_json::from_slice(&self.body).map_err(|source| ClientError::Decode {
            url: url.to_owned(),
            source,
            body: error::truncate(&String::from_utf8_lossy(&self.body), 200),
        })
    }
}

/// `/sandboxes/<id><rest>` with the id escaped.
/// `k=v&k2=v2` of the pairs that have a value, percent-encoded.
fn form_urlencoded_pairs(pairs: &[(&str, Option<&str>)]) -> String {
    pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", utf8_percent_encode(v, SEGMENT))))
        .collect::<Vec<_>>()
        .join("&")
}

fn template_path(name: &str, rest: &str) -> String {
    format!("/templates/{}{rest}", utf8_percent_encode(name, SEGMENT))
}

fn sandbox_path(id: &str, rest: &str) -> String {
    format!("/sandboxes/{}{rest}", utf8_percent_encode(id, SEGMENT))
}

/// The innermost description of a connect failure ("Connection refused (os error
/// 111)" → "connection refused").
fn connect_reason(e: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
                std::io::ErrorKind::TimedOut => "connect timed out".into(),
                _ => io.to_string(),
            };
        }
        last = Some(s.to_string());
        source = s.source();
    }
    last.unwrap_or_else(|| e.to_string())
}

/// Checks a base URL and returns it without a trailing `/`.
fn check_url(url: &str) -> Result<String, ClientError> {
    let invalid = |reason: &str| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = url.trim().trim_end_matches('/');
    let uri: Uri = trimmed
        .parse()
        .map_err(|_| invalid("not a URL (expected http://host:port)"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(invalid(
            "https is not supported by this client; use http:// (cubicle serve speaks plain http)",
        )),
        _ => return Err(invalid("expected http://host:port")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if uri.query().is_some() {
        return Err(invalid("a base URL has no query"));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            check_url("http://127.0.0.1:3000/").unwrap(),
            "http://127.0.0.1:3000"
        );
        assert_eq!(
            check_url("http://host/prefix").unwrap(),
            "http://host/prefix"
        );
        for bad in ["", "127.0.0.1:3000", "ftp://x", "http://", "http://h/?q=1"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        let e = check_url("https://api.e2b.app").unwrap_err();
        assert!(e.to_string().contains("https is not supported"), "{e}");
    }

    #[test]
    fn ids_are_escaped_in_paths() {
        assert_eq!(
            sandbox_path("abc123", "/timeout"),
            "/sandboxes/abc123/timeout"
        );
        assert_eq!(sandbox_path("../x y", ""), "/sandboxes/%2E%2E%2Fx%20y");
    }

    #[test]
    fn configuration_from_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let e = ApiClient::from_lookup(env(&[])).unwrap_err();
        assert!(matches!(e, ClientError::NoApiKey));
        assert_eq!(
            e.to_string(),
            "no API key: set E2B_API_KEY; `cubicle keys create <name>` makes one"
        );
        let e = ApiClient::from_lookup(env(&[("E2B_API_KEY", " ")])).unwrap_err();
        assert!(matches!(e, ClientError::NoApiKey));
        let c = ApiClient::from_lookup(env(&[("CUBICLE_API_KEY", "k")])).unwrap();
        assert_eq!(
            (c.base_url(), c.sandbox_url()),
            (DEFAULT_API_URL, DEFAULT_API_URL)
        );
        let c = ApiClient::from_lookup(env(&[
            ("E2B_API_KEY", "k"),
            ("E2B_API_URL", "http://10.0.0.1:8080/"),
            ("E2B_SANDBOX_URL", "http://10.0.0.2:8080"),
        ]))
        .unwrap();
        assert_eq!(
            (c.base_url(), c.sandbox_url()),
            ("http://10.0.0.1:8080", "http://10.0.0.2:8080")
        );
        assert!(!format!("{c:?}").contains("\"k\""));
    }
}
