//! The store's error type.

use cubicle_core::{ErrorKind, SandboxId, SandboxState};
use rusqlite::ErrorCode;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No sandbox with this id (or, for [`Store::set_end_at`](crate::Store::set_end_at),
    /// no live one).
    #[error("sandbox {0} not found")]
    NotFound(SandboxId),
    /// The row already exists (duplicate sandbox id or key name).
    #[error("{0}")]
    Conflict(String),
    /// The caller passed something malformed (a key name, a cursor, a value out of
    /// range).
    #[error("{0}")]
    InvalidInput(String),
    /// The lifecycle does not allow `from → to`.
    #[error("sandbox {id} cannot go from {from} to {to}")]
    InvalidTransition {
        /// The sandbox.
        id: SandboxId,
        /// Its current state.
        from: SandboxState,
        /// The state asked for.
        to: SandboxState,
    },
    /// A row holds something this code cannot read back.
    #[error("corrupt store row: {0}")]
    Corrupt(String),
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A file-system or OS call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path if there is one.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The database was written by a newer Cubicle.
    #[error(
        "database schema version {found} is newer than this build supports ({supported}); \
         run a newer cubicle or use another data directory"
    )]
    TooNew {
        /// The database's `user_version`.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
}

impl StoreError {
    /// The coarse kind, for mapping to HTTP statuses and exit codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::NotFound(_) => ErrorKind::NotFound,
            StoreError::Conflict(_) | StoreError::InvalidTransition { .. } => ErrorKind::Conflict,
            StoreError::InvalidInput(_) => ErrorKind::InvalidInput,
            StoreError::Corrupt(_) => ErrorKind::Internal,
            StoreError::Io { .. } | StoreError::TooNew { .. } => ErrorKind::Unavailable,
            StoreError::Sqlite(e) => match e.sqlite_error_code() {
                Some(
                    ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::DiskFull
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::CannotOpen
                    | ErrorCode::ReadOnly
                    | ErrorCode::PermissionDenied
                    | ErrorCode::OutOfMemory,
                ) => ErrorKind::Unavailable,
                _ => ErrorKind::Internal,
            },
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Whether `e` is a UNIQUE or PRIMARY KEY constraint violation.
pub(crate) fn is_unique_violation(e: &rusqlite::Error) -> bool {
    e.sqlite_error().is_some_and(|f| {
        f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_messages() {
        let id: SandboxId = "abc".parse().unwrap();
        let e = StoreError::InvalidTransition {
            id: id.clone(),
            from: SandboxState::Killed,
            to: SandboxState::Running,
        };
        assert_eq!(e.kind(), ErrorKind::Conflict);
        assert_eq!(
            e.to_string(),
            "sandbox abc cannot go from killed to running"
        );
        assert_eq!(StoreError::NotFound(id).kind(), ErrorKind::NotFound);
        let too_new = StoreError::TooNew {
            found: 9,
            supported: 1,
        };
        assert_eq!(too_new.kind(), ErrorKind::Unavailable);
        assert!(too_new.to_string().starts_with("database schema version 9"));
        let busy = StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        ));
        assert_eq!(busy.kind(), ErrorKind::Unavailable);
    }
}
