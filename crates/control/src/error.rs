//! What the control plane answers when it cannot do what was asked.

use cubicle_core::{ErrorKind, SandboxId};

/// A failed control-plane operation.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request is malformed or out of range.
    #[error("{0}")]
    InvalidInput(String),
    /// No such sandbox (or not the caller's).
    #[error("sandbox {0} not found")]
    SandboxNotFound(SandboxId),
    /// No such snapshot (or not the caller's).
    #[error("snapshot '{0}' not found")]
    SnapshotNotFound(String),
    /// No such template.
    #[error("template '{0}' not found")]
    TemplateNotFound(String),
    /// No such template build.
    #[error("build '{0}' not found")]
    BuildNotFound(String),
    /// The sandbox is in a state that does not allow this.
    #[error("{0}")]
    Conflict(String),
    /// The feature exists in the E2B API but not in Cubicle yet.
    #[error("{0} is not implemented yet")]
    NotImplemented(&'static str),
    /// A template's service did not become ready (it ended, or its probe never
    /// answered); the message says how and shows the end of its output.
    #[error("{0}")]
    ServiceNotReady(String),
    /// The daemon is shutting down or over capacity.
    #[error("{0}")]
    Unavailable(String),
    /// The runtime failed.
    #[error("sandbox runtime")]
    Runtime(#[from] cubicle_runtime::RuntimeError),
    /// The store failed.
    #[error("store")]
    Store(#[from] cubicle_store::StoreError),
    /// A template could not be read.
    #[error("template store")]
    Template(#[from] cubicle_template::TemplateError),
}

impl ControlError {
    /// The coarse kind, which the API maps to an HTTP status.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ControlError::InvalidInput(_) | ControlError::ServiceNotReady(_) => {
                ErrorKind::InvalidInput
            }
            ControlError::SandboxNotFound(_)
            | ControlError::TemplateNotFound(_)
            | ControlError::BuildNotFound(_)
            | ControlError::SnapshotNotFound(_) => ErrorKind::NotFound,
            ControlError::Conflict(_) => ErrorKind::Conflict,
            ControlError::NotImplemented(_) | ControlError::Unavailable(_) => {
                ErrorKind::Unavailable
            }
            ControlError::Runtime(e) => match e.kind() {
                // The caller's input was checked before the runtime saw it: anything the
                // runtime rejects now is a fault of the host, not of the request.
                ErrorKind::InvalidInput | ErrorKind::NotFound => ErrorKind::Internal,
                k => k,
            },
            ControlError::Store(e) => e.kind(),
            ControlError::Template(e) => e.kind(),
        }
    }

    /// The message with its causes, for logs and error bodies.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            out.push_str(": ");
            out.push_str(&s.to_string());
            source = s.source();
        }
        out
    }
}
