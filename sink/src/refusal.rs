//! `Refusal`: an error the sink reports to the agent (as an `Error` frame and the connection's
//! close reason) with a protocol error code and a message written for the operator.

use blockship_proto::pb::ErrorCode;

use crate::auth::AuthError;
use crate::state::StateError;
use crate::targets::TargetError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal { code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Refusal::new(ErrorCode::BadRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Refusal::new(ErrorCode::Internal, message)
    }
}

impl From<TargetError> for Refusal {
    fn from(e: TargetError) -> Self {
        let code = match &e {
            TargetError::BadName { .. }
            | TargetError::NotFound { .. }
            | TargetError::OutsideRoot { .. }
            | TargetError::Disabled(_) => ErrorCode::BadTarget,
            TargetError::WouldShrink { .. } => ErrorCode::Size,
            TargetError::Io { .. } | TargetError::Ceph { .. } => ErrorCode::TargetIo,
            TargetError::BadState { .. } => ErrorCode::BadTarget,
            TargetError::Busy { .. } => ErrorCode::Busy,
        };
        Refusal::new(code, e.to_string())
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        Refusal::new(ErrorCode::Unauthorized, e.to_string())
    }
}

impl From<StateError> for Refusal {
    fn from(e: StateError) -> Self {
        let code = match e {
            StateError::Locked { .. } => ErrorCode::Busy,
            _ => ErrorCode::Internal,
        };
        Refusal::new(code, e.to_string())
    }
}

impl From<blockship_proto::codec::CodecError> for Refusal {
    fn from(e: blockship_proto::codec::CodecError) -> Self {
        use blockship_proto::codec::CodecError;
        let code = match e {
            CodecError::Checksum { .. } => ErrorCode::Checksum,
            _ => ErrorCode::BadRequest,
        };
        Refusal::new(code, e.to_string())
    }
}

impl From<blockship_transport::TransportError> for Refusal {
    fn from(e: blockship_transport::TransportError) -> Self {
        Refusal::bad_request(e.to_string())
    }
}

/// A join error from a blocking task (a panic or cancellation inside the sink).
pub fn join(what: &str, e: tokio::task::JoinError) -> Refusal {
    Refusal::internal(format!("{what}: {e}"))
}
