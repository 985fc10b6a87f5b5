//! Errors of the messaging shell, one enum per operation, each saying
//! whether trying again can succeed.

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
    /// Whether sending again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SendErrorKind::Full | SendErrorKind::Unavailable(_) | SendErrorKind::Expired(_)
        )
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
    /// Whether asking again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            RequestError::Timeout
                | RequestError::Unavailable(_)
                | RequestError::PeerDead(_)
                | RequestError::Full
        )
    }
}
