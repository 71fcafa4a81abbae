//! `/sandboxes` and `/v2/sandboxes`: one handler per E2B endpoint, each a thin adapter
//! from JSON to a [`cubicle_control::Controller`] call.

use std::sync::Arc;

use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use cubicle_control::{CreateRequest, ListRequest};
use cubicle_core::{SandboxId, SandboxState};
use cubicle_store::Order;
use http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use crate::auth::Owner;
use crate::error::ApiError;
use crate::models::{
    ConnectBody, NewSandbox, PauseBody, RefreshBody, Sandbox, SandboxDetail, SandboxMetric,
    TimeoutBody,
};
use crate::AppState;

/// A JSON request body: an empty body is `{}`; malformed JSON, unknown fields and
/// oversized bodies are `{code, message}` errors.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // The body is already in memory and within `MAX_BODY` (`crate::body::read_whole`).
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            ApiError::bad_request(format!("cannot read the request body: {rejection}"))
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        // Objects only: serde would also read a JSON array as a struct's fields in order.
        // (Checked on the bytes: going through `Value` would hide duplicate keys.)
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

pub(crate) fn sandbox_id(id: &str) -> Result<SandboxId, ApiError> {
    id.parse().map_err(|_| ApiError::sandbox_not_found(id))
}

/// A timeout in seconds from a signed JSON number.
pub(crate) fn seconds(field: &str, value: i64) -> Result<u64, ApiError> {
    u64::try_from(value)
        .map_err(|_| ApiError::bad_request(format!("{field} must not be negative, got {value}")))
}

fn create_request(
    body: NewSandbox,
    secure: bool,
    headers: &HeaderMap,
) -> Result<CreateRequest, ApiError> {
    let auto_pause = body.auto_pause.unwrap_or(false);
    if auto_pause && body.auto_pause_memory == Some(false) {
        return Err(cubicle_control::ControlError::NotImplemented(
            "pausing with the filesystem only (autoPauseMemory: false)",
        )
        .into());
    }
    let auto_resume = body
        .auto_resume
        .as_ref()
        .and_then(|v| v.get("enabled"))
        .and_then(serde_json::Value::as_bool);
    if auto_resume == Some(true) {
        return Err(cubicle_control::ControlError::NotImplemented(
            "resuming a paused sandbox on traffic (autoResume)",
        )
        .into());
    }
    Ok(CreateRequest {
        template: body.template_id,
        timeout_secs: body.timeout.map(|t| seconds("timeout", t)).transpose()?,
        metadata: body.metadata.unwrap_or_default(),
        env_vars: body.env_vars.unwrap_or_default(),
        secure,
        allow_internet_access: body.allow_internet_access.unwrap_or(true),
        auto_pause,
        idempotency_key: headers
            .get("idempotency-key")
            .map(|v| v.to_str().map(str::to_owned))
            .transpose()
            .map_err(|_| ApiError::bad_request("Idempotency-Key must be ASCII"))?,
    })
}

/// `POST /sandboxes` (v1: `secure` decides whether envd needs a token).
pub async fn create_v1(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    headers: HeaderMap,
    JsonBody(body): JsonBody<NewSandbox>,
) -> Result<Response, ApiError> {
    let secure = body.secure.unwrap_or(false);
    create(state, owner, create_request(body, secure, &headers)?).await
}

/// `POST /v2/sandboxes` (every v2 sandbox's envd requires its access token).
pub async fn create_v2(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    headers: HeaderMap,
    JsonBody(body): JsonBody<NewSandbox>,
) -> Result<Response, ApiError> {
    create(state, owner, create_request(body, true, &headers)?).await
}

async fn create(
    state: Arc<AppState>,
    owner: Owner,
    request: CreateRequest,
) -> Result<Response, ApiError> {
    let record = state.controller.create(owner.0, request).await?;
    let body = Sandbox::from_record(&record, state.domain.as_deref());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /sandboxes/{id}`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
) -> Result<Json<SandboxDetail>, ApiError> {
    let record = state.controller.get(owner.0, &sandbox_id(&id)?)?;
    Ok(Json(SandboxDetail::from_record(
        &record,
        true,
        state.domain.as_deref(),
    )))
}

/// `DELETE /sandboxes/{id}`: 204, or 404 when it does not exist (any more).
pub async fn kill(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.controller.kill(owner.0, &sandbox_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/timeout`: expire `timeout` seconds from now.
pub async fn set_timeout(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<TimeoutBody>,
) -> Result<StatusCode, ApiError> {
    let secs = seconds("timeout", body.timeout)?;
    state
        .controller
        .set_timeout(owner.0, &sandbox_id(&id)?, secs)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/refreshes`: keep alive for `duration` more seconds.
pub async fn refresh(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RefreshBody>,
) -> Result<StatusCode, ApiError> {
    let secs = body.duration.map(|d| seconds("duration", d)).transpose()?;
    let secs = secs.unwrap_or(state.controller.config().default_timeout.as_secs());
    state
        .controller
        .extend(owner.0, &sandbox_id(&id)?, Some(secs))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /sandboxes/{id}/connect` and `POST /v2/sandboxes/{id}/connect`: 200 for a
/// running sandbox, 201 when it had to be resumed.
pub async fn connect(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ConnectBody>,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    let timeout = body.timeout.map(|t| seconds("timeout", t)).transpose()?;
    refuse_reboot(&state, owner.0, &id, &body)?;
    let (record, resumed) = state.controller.connect(owner.0, &id, timeout).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(Sandbox::from_record(&record, state.domain.as_deref())),
    )
        .into_response())
}

/// `POST /sandboxes/{id}/resume` (v1): resumes a paused sandbox (201); a running one is
/// a conflict (409).
pub async fn resume(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ConnectBody>,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    let timeout = body.timeout.map(|t| seconds("timeout", t)).transpose()?;
    refuse_reboot(&state, owner.0, &id, &body)?;
    let record = state.controller.resume(owner.0, &id, timeout).await?;
    Ok((
        StatusCode::CREATED,
        Json(Sandbox::from_record(&record, state.domain.as_deref())),
    )
        .into_response())
}

/// `memory: false` asks to cold-boot a paused sandbox from its files alone, which
/// Cubicle cannot do yet; for a running sandbox the field means nothing.
fn refuse_reboot(
    state: &AppState,
    owner: i64,
    id: &cubicle_core::SandboxId,
    body: &ConnectBody,
) -> Result<(), ApiError> {
    if body.memory == Some(false)
        && state.controller.get(owner, id)?.state == cubicle_core::SandboxState::Paused
    {
        return Err(cubicle_control::ControlError::NotImplemented(
            "resuming a paused sandbox by rebooting it (memory: false)",
        )
        .into());
    }
    Ok(())
}

/// `POST /sandboxes/{id}/pause` with `{}` or `{"memory": true}`: 204; 409 if it is
/// already paused.
pub async fn pause(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PauseBody>,
) -> Result<StatusCode, ApiError> {
    let id = sandbox_id(&id)?;
    if body.memory == Some(false) {
        // Look the sandbox up first: an unknown sandbox is a 404 whatever the body says.
        state.controller.get(owner.0, &id)?;
        return Err(cubicle_control::ControlError::NotImplemented(
            "pausing with the filesystem only (memory: false)",
        )
        .into());
    }
    if body.hibernate == Some(true) {
        state.controller.hibernate(owner.0, &id).await?;
    } else {
        state.controller.pause(owner.0, &id).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /sandboxes/{id}/metrics?start=&end=` (unix seconds).
pub async fn metrics(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<SandboxMetric>>, ApiError> {
    let mut start = None;
    let mut end = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let secs = || {
            v.parse::<i64>()
                .ok()
                .and_then(|s| s.checked_mul(1000))
                .ok_or_else(|| {
                    ApiError::bad_request(format!("{k} must be unix seconds, got {v:?}"))
                })
        };
        match k.as_ref() {
            "start" => start = Some(secs()?),
            "end" => end = Some(secs()?),
            _ => {}
        }
    }
    let samples = state
        .controller
        .metrics(owner.0, &sandbox_id(&id)?, start, end)
        .await?;
    Ok(Json(samples.iter().map(SandboxMetric::from).collect()))
}

/// `GET /v2/sandboxes`: filters, order and pagination (`x-next-token`).
pub async fn list_v2(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let request = list_request(query.as_deref().unwrap_or_default())?;
    let page = state.controller.list(owner.0, &request)?;
    let items: Vec<SandboxDetail> = page
        .items
        .iter()
        .map(|r| SandboxDetail::from_record(r, false, state.domain.as_deref()))
        .collect();
    let mut resp = Json(items).into_response();
    if let Some(next) = page.next_cursor {
        if let Ok(v) = http::HeaderValue::from_str(&next) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(resp)
}

/// `GET /sandboxes` (v1): every running sandbox of the caller, optionally filtered by
/// metadata; no pagination.
pub async fn list_v1(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    RawQuery(query): RawQuery,
) -> Result<Json<Vec<SandboxDetail>>, ApiError> {
    let mut request = list_request(query.as_deref().unwrap_or_default())?;
    request.limit = ListRequest::MAX_LIMIT;
    let mut items = Vec::new();
    loop {
        let page = state.controller.list(owner.0, &request)?;
        items.extend(
            page.items
                .iter()
                .map(|r| SandboxDetail::from_record(r, false, state.domain.as_deref())),
        );
        match page.next_cursor {
            Some(c) => request.cursor = Some(c),
            None => return Ok(Json(items)),
        }
    }
}

/// Parses the list query. `metadata` is itself a query string (`k=v&k2=v2`), which the
/// SDK percent-encodes a second time.
pub fn list_request(query: &str) -> Result<ListRequest, ApiError> {
    let mut req = ListRequest::default();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "metadata" => {
                // The SDK quotes each key and value, url-encodes the pairs, and its HTTP
                // client encodes the parameter: three layers (E2B's API decodes three).
                req.metadata = form_urlencoded::parse(value.as_bytes())
                    .map(|(k, v)| (percent_decode(&k), percent_decode(&v)))
                    .collect()
            }
            "state" => {
                req.states = value
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        s.parse::<SandboxState>()
                            .map_err(|e| ApiError::bad_request(format!("state: {e}")))
                    })
                    .collect::<Result<_, _>>()?
            }
            "limit" => {
                req.limit = value.parse().map_err(|_| {
                    ApiError::bad_request(format!(
                        "limit must be a positive integer, got {value:?}"
                    ))
                })?
            }
            "nextToken" if !value.is_empty() => req.cursor = Some(value.into_owned()),
            "order" => {
                req.order = match value.as_ref() {
                    "asc" => Order::Asc,
                    "desc" => Order::Desc,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "order must be asc or desc, got {other:?}"
                        )))
                    }
                }
            }
            "startedAfter" => {
                let t = chrono::DateTime::parse_from_rfc3339(&value).map_err(|e| {
                    ApiError::bad_request(format!("startedAfter must be RFC 3339: {e}"))
                })?;
                req.started_after_ms = Some(t.timestamp_millis());
            }
            "template" if !value.is_empty() => req.template = Some(value.into_owned()),
            _ => {}
        }
    }
    Ok(req)
}

/// One percent-decoding (`%20` → space); malformed escapes stay as they are.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_as_the_sdk_sends_it() {
        // What SDK 2.63 sends for metadata={"acc": "x", "role": "b c", "k.1": "a&b=c"},
        // state=[running, paused], limit=5 (quote, then urlencode, then httpx).
        let q = "metadata=acc%3Dx%26role%3Db%252520c%26k.1%3Da%252526b%25253Dc&state=running%2Cpaused&limit=5&nextToken=abc&order=asc&startedAfter=2025-01-01T00%3A00%3A00%2B00%3A00";
        let r = list_request(q).unwrap();
        assert_eq!(
            r.metadata,
            vec![
                ("acc".into(), "x".into()),
                ("role".into(), "b c".into()),
                ("k.1".into(), "a&b=c".into())
            ]
        );
        assert_eq!(r.states, vec![SandboxState::Running, SandboxState::Paused]);
        assert_eq!(
            (r.limit, r.cursor.as_deref(), r.order),
            (5, Some("abc"), Order::Asc)
        );
        assert_eq!(r.started_after_ms, Some(1_735_689_600_000));
    }

    #[test]
    fn bad_list_queries_are_400() {
        for q in [
            "state=dead",
            "limit=x",
            "limit=-1",
            "order=up",
            "startedAfter=yesterday",
        ] {
            assert_eq!(list_request(q).unwrap_err().status, 400, "{q}");
        }
    }
}
