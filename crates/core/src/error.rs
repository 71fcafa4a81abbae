/// What kind of failure an error is, independent of where it came from.
///
/// Every module error in Cubicle exposes `kind()`, and the edges (HTTP API, CLI exit
/// codes) map this kind, never the concrete error type, to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller asked for something malformed or out of range.
    InvalidInput,
    /// The thing asked for does not exist.
    NotFound,
    /// The thing exists but is in a state that does not allow the operation.
    Conflict,
    /// A configured limit (size, count, quota) was exceeded.
    LimitExceeded,
    /// The caller may not do this.
    PermissionDenied,
    /// A dependency of the host (kernel feature, binary, disk space) is missing or failing.
    Unavailable,
    /// A bug or an unexpected failure of the host.
    Internal,
}
