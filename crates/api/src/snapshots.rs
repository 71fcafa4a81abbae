//! Snapshots, fork and rollback: `POST /sandboxes/{id}/snapshots`, `GET /snapshots`,
//! `POST /sandboxes/{id}/fork` (and its alias `/clone`), and Cubicle's own
//! `POST /sandboxes/{id}/rollback`. Snapshots are deleted with `DELETE /templates/{id}`
//! (see `templates`).

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cubicle_control::{ControlError, SnapshotListRequest};
use http::StatusCode;

use crate::auth::Owner;
use crate::error::ApiError;
use crate::models::{ForkBody, ForkResult, RollbackBody, Sandbox, SnapshotBody, SnapshotInfo};
use crate::sandboxes::{sandbox_id, seconds, JsonBody};
use crate::AppState;

/// `POST /sandboxes/{id}/snapshots` with `{}` or `{"name": …}`: 201 `SnapshotInfo`.
/// `memory: false` (filesystem only) is not built: 501.
pub async fn create(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<SnapshotBody>,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    if body.memory == Some(false) {
        // An unknown sandbox is a 404 whatever the body says.
        state.controller.get(owner.0, &id)?;
        return Err(
            ControlError::NotImplemented("filesystem-only snapshots (memory: false)").into(),
        );
    }
    let snapshot = state.controller.snapshot(owner.0, &id, body.name).await?;
    let names = state.controller.snapshot_names(&snapshot)?;
    Ok((
        StatusCode::CREATED,
        Json(SnapshotInfo::from_record(&snapshot, names)),
    )
        .into_response())
}

/// `GET /snapshots?sandboxID=&name=&limit=&nextToken=`: the caller's snapshots, newest
/// first, the next page's cursor in `x-next-token`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let mut request = SnapshotListRequest::default();
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "sandboxID" if !v.is_empty() => request.sandbox_id = Some(v.into_owned()),
            "name" if !v.is_empty() => request.name = Some(v.into_owned()),
            "limit" => {
                request.limit = v.parse().map_err(|_| {
                    ApiError::bad_request(format!("limit must be a positive integer, got {v:?}"))
                })?
            }
            "nextToken" if !v.is_empty() => request.cursor = Some(v.into_owned()),
            _ => {}
        }
    }
    let page = state.controller.list_snapshots(owner.0, &request)?;
    let items = page
        .items
        .iter()
        .map(|s| {
            Ok(SnapshotInfo::from_record(
                s,
                state.controller.snapshot_names(s)?,
            ))
        })
        .collect::<Result<Vec<_>, ControlError>>()?;
    let mut resp = Json(items).into_response();
    if let Some(next) = page.next_cursor {
        if let Ok(v) = http::HeaderValue::from_str(&next) {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(resp)
}

/// `POST /sandboxes/{id}/fork` (and `/clone`) with `{"count", "timeout"}`: 201 with one
/// entry per fork, `{"sandbox": …}` or `{"error": {"code", "message"}}`.
pub async fn fork(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ForkBody>,
) -> Result<Response, ApiError> {
    let id = sandbox_id(&id)?;
    let count = match body.count {
        None => 1,
        Some(c) => u32::try_from(c).map_err(|_| {
            ApiError::bad_request(format!(
                "count must be between 1 and {}, got {c}",
                cubicle_control::MAX_FORKS
            ))
        })?,
    };
    let timeout = body.timeout.map(|t| seconds("timeout", t)).transpose()?;
    let results = state.controller.fork(owner.0, &id, count, timeout).await?;
    let out: Vec<ForkResult> = results
        .into_iter()
        .map(|r| match r {
            Ok(record) => {
                ForkResult::sandbox(Sandbox::from_record(&record, state.domain.as_deref()))
            }
            Err(e) => {
                let e = ApiError::from(e);
                ForkResult::error(e.status.as_u16(), e.message)
            }
        })
        .collect();
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

/// `POST /sandboxes/{id}/rollback` with `{"snapshotID": …, "timeout"?: s}` (Cubicle's
/// own): 200 with the Sandbox object (same id and access token). 404 for an unknown
/// sandbox or snapshot, 409 for another sandbox's snapshot.
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RollbackBody>,
) -> Result<Json<Sandbox>, ApiError> {
    let id = sandbox_id(&id)?;
    let timeout = body.timeout.map(|t| seconds("timeout", t)).transpose()?;
    let record = state
        .controller
        .rollback(owner.0, &id, &body.snapshot_id, timeout)
        .await?;
    Ok(Json(Sandbox::from_record(&record, state.domain.as_deref())))
}
