//! API keys: `X-API-KEY: <key>` (what the E2B SDK sends) or `Authorization: Bearer <key>`.
//! Keys are stored hashed; a key only ever sees its own sandboxes.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use http::request::Parts;
use http::StatusCode;

use crate::error::ApiError;
use crate::AppState;

/// The authenticated caller: the id of its API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner(pub i64);

impl FromRequestParts<Arc<AppState>> for Owner {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let key = parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            })
            .map(str::trim);
        let invalid = || ApiError::new(StatusCode::UNAUTHORIZED, "Invalid API key");
        let key = key.filter(|k| !k.is_empty()).ok_or_else(invalid)?;
        match state.controller.store().authenticate(key) {
            Ok(Some(record)) => Ok(Owner(record.id)),
            Ok(None) => Err(invalid()),
            Err(e) => {
                tracing::error!(error = %e, "authenticating an API key");
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cannot check the API key right now",
                ))
            }
        }
    }
}
