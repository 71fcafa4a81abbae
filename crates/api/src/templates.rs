//! `GET /templates` and `GET /templates/{id}` (what `e2b template list` reads).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use cubicle_control::TemplateSummary;

use crate::auth::Owner;
use crate::error::ApiError;
use crate::models::Template;
use crate::AppState;

fn model(
    state: &AppState,
    owner: Owner,
    t: &TemplateSummary,
    with_builds: bool,
) -> Result<Template, ApiError> {
    let usage = state
        .controller
        .store()
        .template_usage(owner.0, &t.name)
        .map_err(cubicle_control::ControlError::from)?;
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
        with_builds,
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
        .map(|t| model(&state, owner, t, false))
        .collect::<Result<_, _>>()?;
    Ok(Json(out))
}

/// `GET /templates/{id}`.
pub async fn get(
    State(state): State<Arc<AppState>>,
    owner: Owner,
    Path(id): Path<String>,
) -> Result<Json<Template>, ApiError> {
    let t = state.controller.template(&id)?;
    Ok(Json(model(&state, owner, &t, true)?))
}
