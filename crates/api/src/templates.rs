//! Templates: E2B's `GET /templates`, `GET /templates/{id}`, `DELETE /templates/{id}`
//! (a snapshot, else a template), `GET /templates/aliases/{alias}` (the SDK's
//! `Template.exists`), `GET /templates/{id}/builds/{buildID}/status`; Cubicle's build
//! jobs `POST /templates/images` and `POST /templates/{id}/rebuild`. E2B's own build
//! endpoints (a Dockerfile-like build context uploaded by the SDK) answer 501.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cubicle_control::{ControlError, TemplateSummary};
use cubicle_store::BuildRecord;
use cubicle_template::{ImageBuildRequest, Probe, RegistryAuth, RunOverrides, SandboxDefaults};
use http::StatusCode;

use crate::auth::Owner;
use crate::error::ApiError;
use crate::models::{BuildStarted, ImageBuildBody, RebuildBody, Template, TemplateBuildInfo};
use crate::sandboxes::JsonBody;
use crate::AppState;

fn model(
    state: &AppState,
    owner: Owner,
    t: &TemplateSummary,
    builds: &[BuildRecord],
) -> Result<Template, ApiError> {
    let usage = state
        .controller
        .store()
        .template_usage(owner.0, &t.name)
        .map_err(ControlError::from)?;
    let config = state.controller.config();
    let limits = (
        t.cpu_count.unwrap_or(config.limits.cpu_count),
        t.memory_mb.unwrap_or(config.limits.memory_mb),
        config.disk_mb,
    );
    Ok(Template::new(
        t,
        usage.count,
        usage.last_created_ms,
        limits,
        builds,
    ))
}

/// `GET /templates`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    owner: Owner,
) -> Result<Json<Vec<Template>>, ApiError> {
    let templates = state.controller.templates()?;
    let out = templates
        .iter()
        .map(|t| {
            let builds = state.controller.template_builds(&t.name)?;
            Ok(model(&state, owner, t, &builds)?.summary_only())
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(Json(out))
}

/// `GET /templates/{id}`: the template with its builds and, as `meta`, its
/// `template.json`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
) -> Result<Json<Template>, ApiError> {
    let t = state.controller.template(&id)?;
    let builds = state.controller.template_builds(&t.name)?;
    let details = state.controller.template_details(&t.name)?;
    let meta = serde_json::to_value(&details.meta)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(model(&state, owner, &t, &builds)?.with_meta(meta)))
}

/// `DELETE /templates/{id}`: 204 for one of the caller's snapshots (the SDK's
/// `delete_snapshot`, id percent-decoded by the router), else for a template nobody
/// uses (409 naming the sandboxes, snapshots or templates that use it); 404 for an
/// unknown id.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    match state.controller.delete_snapshot(owner.0, &id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(ControlError::SnapshotNotFound(_)) if state.controller.template(&id).is_ok() => {
            state.controller.delete_template(&id).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        Err(ControlError::SnapshotNotFound(_)) => {
            Err(ControlError::TemplateNotFound(id.clone()).into())
        }
        Err(e) => Err(e.into()),
    }
}

/// `GET /templates/aliases/{alias}`: `{"templateID", "public"}` of the template with
/// this name or alias, 404 if none (what the SDK's `Template.exists(name)` asks).
pub async fn alias(
    State(state): State<Arc<AppState>>,
    _owner: Owner,
    Path(alias): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let t = state.controller.template(&alias)?;
    Ok(Json(
        serde_json::json!({"templateID": t.name, "public": false}),
    ))
}

/// `GET /templates/{id}/builds/{buildID}/status?logsOffset=&limit=`: the build's
/// status (E2B's `building`, `ready`, `error`), Cubicle's `phase`, its log lines from
/// `logsOffset` on, and while it runs the progress of each layer of its image
/// (Cubicle's `layers`).
pub async fn build_status(
    State(state): State<Arc<AppState>>,
    _owner: Owner,
    Path((id, build)): Path<(String, String)>,
    RawQuery(query): RawQuery,
) -> Result<Json<TemplateBuildInfo>, ApiError> {
    let mut offset = 0u64;
    let mut limit = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let number = |what: &str| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("{what} must be a non-negative integer, got {v:?}"))
            })
        };
        match k.as_ref() {
            "logsOffset" => offset = number("logsOffset")?,
            "limit" => limit = Some(usize::try_from(number("limit")?).unwrap_or(usize::MAX)),
            _ => {}
        }
    }
    let (record, layers) = state.controller.template_build(&id, &build)?;
    Ok(Json(TemplateBuildInfo::new(&record, offset, limit, layers)))
}

/// `POST /templates/images` (Cubicle's own): builds a template from a container image
/// in the background. 202 `{"templateID", "buildID", "phase"}`; the status endpoint
/// follows it.
pub async fn build_image(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    JsonBody(body): JsonBody<ImageBuildBody>,
) -> Result<Response, ApiError> {
    let registry_auth = auth(body.registry_username, body.registry_password)?;
    let request = ImageBuildRequest {
        image: body.image,
        registry_auth,
        overrides: RunOverrides {
            cmd: body.cmd,
            args: body.args,
            env: body.env.into_iter().collect(),
            workdir: body.workdir,
            user: body.user,
        },
        defaults: SandboxDefaults {
            cpu_count: body.cpu_count,
            memory_mb: body.memory_mb,
            writable_layer_mib: body.writable_layer_size_mb,
            expose_ports: body.expose_ports,
            probe: body.probe.map(|p| Probe {
                port: p.port,
                path: p.path.unwrap_or_else(|| "/".into()),
                timeout_secs: p.timeout_secs.unwrap_or(60),
            }),
            ..Default::default()
        },
    };
    let record =
        state
            .controller
            .submit_image_build(owner.0, body.template_id.as_deref(), request)?;
    Ok(accepted(&record))
}

/// `POST /templates/{id}/rebuild` (Cubicle's own) with `{}` or the registry
/// credentials: builds the template again from its recorded source. 202 as for
/// `POST /templates/images`; 409 while it is in use.
pub async fn rebuild(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RebuildBody>,
) -> Result<Response, ApiError> {
    let auth = auth(body.registry_username, body.registry_password)?;
    let record = state.controller.rebuild_template(owner.0, &id, auth)?;
    Ok(accepted(&record))
}

/// E2B's template build endpoints (`POST /v3/templates`, `/v2/templates/…`,
/// `/templates`, `/templates/{id}`, `/templates/{id}/builds/{buildID}`): not built.
pub async fn e2b_build(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!(
            "{} {}: E2B's template build API is not supported by Cubicle; build templates \
             from container images with `cubicle tpl create-from-image --image <ref>` \
             (or POST /templates/images)",
            req.method(),
            req.uri().path()
        ),
    )
}

fn auth(
    username: Option<String>,
    password: Option<String>,
) -> Result<Option<RegistryAuth>, ApiError> {
    match (username, password) {
        (None, None) => Ok(None),
        (Some(username), Some(password)) => Ok(Some(RegistryAuth { username, password })),
        _ => Err(ApiError::bad_request(
            "registryUsername and registryPassword go together",
        )),
    }
}

fn accepted(record: &BuildRecord) -> Response {
    (
        StatusCode::ACCEPTED,
        Json(BuildStarted::from_record(record)),
    )
        .into_response()
}
