//! Every error the API answers: a status and E2B's body `{"code": <status>, "message"}`.

use axum::response::{IntoResponse, Response};
use cubicle_control::ControlError;
use cubicle_core::ErrorKind;
use http::StatusCode;

/// An HTTP error response.
#[derive(Debug)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// The message (no internal details for 5xx beyond the error chain's text).
    pub message: String,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 for a sandbox id, with E2B's wording.
    pub fn sandbox_not_found(id: &str) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, format!("sandbox {id} not found"))
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            _ => status_of(e.kind()),
        };
        if status.is_server_error() {
            tracing::error!(error = %e.chain(), "request failed");
        }
        let message = match &e {
            // Only the top message for the caller's own mistakes; the chain for faults.
            ControlError::InvalidInput(_)
            | ControlError::SandboxNotFound(_)
            | ControlError::TemplateNotFound(_)
            | ControlError::BuildNotFound(_)
            | ControlError::SnapshotNotFound(_)
            | ControlError::Conflict(_)
            | ControlError::NotImplemented(_) => e.to_string(),
            _ => e.chain(),
        };
        ApiError::new(status, message)
    }
}

/// The one place that turns an error kind into an HTTP status.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidInput => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.status.as_u16(), "message": self.message});
        let mut resp = (self.status, axum::Json(body)).into_response();
        // The SDK retries 5xx without this header; our 5xx are not transient.
        if self.status.is_server_error() {
            resp.headers_mut()
                .insert("should-retry", http::HeaderValue::from_static("false"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn body_is_e2b_error_json() {
        let resp = ApiError::bad_request("bad timeout").into_response();
        assert_eq!(resp.status(), 400);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"code": 400, "message": "bad timeout"})
        );
    }

    #[test]
    fn kinds_map_to_statuses() {
        assert_eq!(status_of(ErrorKind::NotFound), 404);
        assert_eq!(status_of(ErrorKind::InvalidInput), 400);
        assert_eq!(status_of(ErrorKind::Internal), 500);
        let e: ApiError = ControlError::NotImplemented("pause").into();
        assert_eq!(e.status, 501);
        assert_eq!(e.message, "pause is not implemented yet");
    }
}
