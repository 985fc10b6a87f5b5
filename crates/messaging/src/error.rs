//! Errors of the messaging shell, one enum per operation, each saying
//! whether trying again can succeed and what [`ErrorKind`] of failure it
//! is (`kind()`), the shape every Courier error shares.

use courier_transport::ErrorKind;

use crate::protocol::Rejection;

/// Why [`crate::Node::start`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A listen address could not be bound.
    #[error(transparent)]
    Bind(courier_transport::BindError),
    /// The blocking face could not start its runtime.
    #[error("cannot start the node's runtime: {0}")]
    Runtime(String),
}

/// Why an endpoint could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// Another mailbox or responder on this node has the name.
    #[error("endpoint {0:?} is already open on this node")]
    InUse(String),
    /// Names are 1 to 255 bytes.
    #[error("invalid endpoint name {0:?}: expected 1 to 255 bytes")]
    InvalidName(String),
}

impl StartError {
    /// What kind of failure this is: a bind's own kind
    /// ([`courier_transport::BindError::kind`]), or
    /// [`ErrorKind::Internal`] for a runtime that would not start.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StartError::Bind(err) => err.kind(),
            StartError::Runtime(_) => ErrorKind::Internal,
        }
    }
}

impl EndpointError {
    /// [`ErrorKind::Conflict`] for a name in use,
    /// [`ErrorKind::InvalidInput`] for an invalid one.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EndpointError::InUse(_) => ErrorKind::Conflict,
            EndpointError::InvalidName(_) => ErrorKind::InvalidInput,
        }
    }
}

impl Rejection {
    /// What kind of refusal this is: no such endpoint is
    /// [`ErrorKind::NotFound`]; another version of the message type, or
    /// bytes the receiver cannot decode, [`ErrorKind::Unsupported`]; a
    /// connection claiming the receiver's own id [`ErrorKind::Conflict`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            Rejection::NoSuchEndpoint { .. } => ErrorKind::NotFound,
            Rejection::SchemaMismatch { .. } | Rejection::Malformed { .. } => {
                ErrorKind::Unsupported
            }
            Rejection::DuplicateNodeId => ErrorKind::Conflict,
        }
    }
}

/// Why a message was not sent, or not confirmed as its mode promises.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendErrorKind {
    /// `try_send` found the peer's queue full. Retryable.
    #[error("the queue for this peer is full")]
    Full,
    /// At-most-once: no connection to the peer could be had. Retryable.
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// At-least-once: not acknowledged before the send deadline. The
    /// message may or may not have been delivered. Retryable.
    #[error("not acknowledged before the deadline (last connection error: {0})")]
    Expired(String),
    /// The receiving node refused it: no such endpoint, or a different
    /// version of the message type. Not retryable.
    #[error("refused by the receiver: {0}")]
    Rejected(Rejection),
    /// The message could not be serialized. Not retryable.
    #[error("message could not be serialized: {0}")]
    Serialize(String),
    /// This node is shutting down. Not retryable here.
    #[error("the node is shutting down")]
    NodeShutdown,
}

impl SendErrorKind {
    /// What kind of failure this is: a full queue is [`ErrorKind::Busy`],
    /// an unreachable peer [`ErrorKind::Unavailable`], no acknowledgement
    /// by the deadline [`ErrorKind::TimedOut`], a refusal the
    /// [`Rejection`]'s kind, this node shutting down
    /// [`ErrorKind::Internal`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            SendErrorKind::Full => ErrorKind::Busy,
            SendErrorKind::Unavailable(_) => ErrorKind::Unavailable,
            SendErrorKind::Expired(_) => ErrorKind::TimedOut,
            SendErrorKind::Rejected(rejection) => rejection.kind(),
            SendErrorKind::Serialize(_) => ErrorKind::InvalidInput,
            SendErrorKind::NodeShutdown => ErrorKind::Internal,
        }
    }

    /// Whether sending again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// A failed send, with the message handed back.
#[derive(thiserror::Error)]
#[error("{kind}")]
pub struct SendError<T> {
    /// What went wrong.
    pub kind: SendErrorKind,
    /// The message that was not sent.
    pub message: T,
}

impl<T> std::fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendError")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl<T> SendError<T> {
    /// The message, to send again or elsewhere.
    pub fn into_inner(self) -> T {
        self.message
    }

    /// What kind of failure this is (that of its
    /// [`kind`](SendError::kind) field, a [`SendErrorKind`]).
    pub fn kind(&self) -> ErrorKind {
        self.kind.kind()
    }

    /// Whether sending again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }
}

/// Why a request got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No reply within the timeout. Retryable (if the request is idempotent).
    #[error("no reply within the timeout")]
    Timeout,
    /// No connection to the peer could be had. Retryable.
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// The connection died with the request in flight. Retryable (if the
    /// request is idempotent: it may have been handled).
    #[error("connection to the peer lost with the request in flight: {0}")]
    PeerDead(String),
    /// The peer refused the request. Not retryable.
    #[error("refused by the peer: {0}")]
    Rejected(Rejection),
    /// Too many requests in flight to this peer. Retryable.
    #[error("too many requests in flight to this peer")]
    Full,
    /// The request could not be serialized. Not retryable.
    #[error("request could not be serialized: {0}")]
    Serialize(String),
    /// The reply did not decode as the expected type. Not retryable.
    #[error("reply could not be decoded: {0}")]
    Decode(String),
    /// This node is shutting down. Not retryable here.
    #[error("the node is shutting down")]
    NodeShutdown,
}

impl RequestError {
    /// What kind of failure this is: no reply in time is
    /// [`ErrorKind::TimedOut`], an unreachable or lost peer
    /// [`ErrorKind::Unavailable`], too many in flight [`ErrorKind::Busy`],
    /// a refusal the [`Rejection`]'s kind, a reply of another type
    /// [`ErrorKind::Unsupported`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            RequestError::Timeout => ErrorKind::TimedOut,
            RequestError::Unavailable(_) | RequestError::PeerDead(_) => ErrorKind::Unavailable,
            RequestError::Rejected(rejection) => rejection.kind(),
            RequestError::Full => ErrorKind::Busy,
            RequestError::Serialize(_) => ErrorKind::InvalidInput,
            RequestError::Decode(_) => ErrorKind::Unsupported,
            RequestError::NodeShutdown => ErrorKind::Internal,
        }
    }

    /// Whether asking again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_variants() {
        let missing = Rejection::NoSuchEndpoint {
            endpoint: "nobody".into(),
        };
        assert_eq!(
            RequestError::Rejected(missing.clone()).kind(),
            ErrorKind::NotFound
        );
        assert_eq!(SendErrorKind::Rejected(missing).kind(), ErrorKind::NotFound);
        assert_eq!(RequestError::Timeout.kind(), ErrorKind::TimedOut);
        assert_eq!(
            SendErrorKind::Expired("gone".into()).kind(),
            ErrorKind::TimedOut
        );
        let unreachable = RequestError::Unavailable("connection refused".into());
        assert_eq!(unreachable.kind(), ErrorKind::Unavailable);
        assert!(unreachable.is_retryable());
        assert_eq!(EndpointError::InUse("a".into()).kind(), ErrorKind::Conflict);
        let send = SendError {
            kind: SendErrorKind::Full,
            message: (),
        };
        assert_eq!(send.kind(), ErrorKind::Busy);
        assert!(send.is_retryable());
        assert!(!RequestError::NodeShutdown.is_retryable());
    }
}
