//! What can go wrong with a call. Framework errors ([`RpcError`]) are kept
//! apart from the service's own errors, which are part of the method's
//! return type (`Result<T, E>` arrives as `Ok(Err(e))`).
//!
//! [`RpcError::kind`] says what kind of failure a call's error is, as an
//! [`ErrorKind`] shared by every Courier mechanism: a permission denial is
//! [`ErrorKind::Refused`] here as it is for queues, pub/sub and the
//! cluster.

use courier_transport::ErrorKind;
use serde::{Deserialize, Serialize};

/// A refusal or failure reported by the server, on the wire.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcFault {
    /// The server hosts no service of that name.
    #[error("the server has no service named {service:?}")]
    UnknownService {
        /// The name asked for.
        service: String,
    },
    /// The service has no method of that name.
    #[error("service {service:?} has no method {method:?}")]
    UnknownMethod {
        /// The service.
        service: String,
        /// The name asked for.
        method: String,
    },
    /// Client and server were built from different definitions of the
    /// method: its fingerprint (see the crate docs, "Versioning") differs.
    #[error(
        "client and server disagree on the definition of method {method:?} of service {service:?} (rebuild one of them)"
    )]
    Mismatch {
        /// The service.
        service: String,
        /// The method whose definitions differ.
        method: String,
    },
    /// The call's deadline passed on the server; the handler was stopped.
    #[error("deadline exceeded on the server")]
    DeadlineExceeded,
    /// The server stopped the call because it is shutting down.
    #[error("cancelled by the server, which is shutting down")]
    Cancelled,
    /// The server could not decode the arguments.
    #[error("the server could not decode the arguments: {reason}")]
    Malformed {
        /// What failed.
        reason: String,
    },
    /// The connection already has as many streams open as the server allows.
    #[error("the server allows at most {limit} open streams per connection")]
    TooManyStreams {
        /// The server's limit.
        limit: u32,
    },
    /// The hello was refused: no or a wrong token, or no hello at all.
    #[error("not authenticated: {reason}")]
    Unauthenticated {
        /// Why (never containing the token).
        reason: String,
    },
    /// The caller may not do this.
    #[error("permission denied: {what}")]
    PermissionDenied {
        /// What was refused.
        what: String,
    },
    /// The server has as many connections (in total, or for this identity)
    /// as it allows.
    #[error("the server allows at most {limit} connections{scope}")]
    TooManyConnections {
        /// The limit reached.
        limit: u32,
        /// "" for the total, " per identity" for an identity's.
        scope: String,
    },
    /// The handler panicked (or its reply could not be sent). The panic is
    /// logged on the server with the service and method; the reason here
    /// says no more than that.
    #[error("internal error on the server: {reason}")]
    Internal {
        /// What failed, without the server's internals.
        reason: String,
    },
    /// A streaming handler produced an item that could not be sent (too
    /// large for a frame, or not serializable); the stream ended there.
    #[error("the server could not send a stream item: {reason}")]
    ItemNotSent {
        /// Why.
        reason: String,
    },
    /// The connection's client-stream items, unread by their handlers,
    /// would pass the server's `inbound_buffer_bytes`: this call ended.
    #[error(
        "client-stream items unread on this connection passed the server's limit of {limit} bytes"
    )]
    InboundBufferFull {
        /// The server's limit.
        limit: u64,
    },
}

/// Why a call did not produce the method's return value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// No reply before the deadline (on either side). Retryable if the
    /// method is idempotent: it may have run.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// The server cannot be reached, or the connection died with the call
    /// in flight. Retryable (the client reconnects on the next call).
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The server cancelled the call (it is shutting down). Retryable.
    #[error("the server cancelled the call")]
    Cancelled,
    /// The server has no such service. Not retryable.
    #[error("unknown service {service:?}")]
    UnknownService {
        /// The name asked for.
        service: String,
    },
    /// The service has no such method. Not retryable.
    #[error("unknown method {method:?} of service {service:?}")]
    UnknownMethod {
        /// The service.
        service: String,
        /// The name asked for.
        method: String,
    },
    /// Client and server were built from different definitions of the
    /// method called (its name, kind, argument types or result type
    /// differ: see the crate docs, "Versioning"), or the server could not
    /// decode the arguments. Not retryable. Other methods of the service
    /// may still work.
    #[error(
        "protocol mismatch: client and server disagree on method {method:?} of service {service:?}"
    )]
    ProtocolMismatch {
        /// The service.
        service: String,
        /// The method called (empty when the server could not decode the
        /// arguments: its report names no method).
        method: String,
    },
    /// Too many calls in flight on this connection for the deadline to allow
    /// another. Retryable.
    #[error("too many calls in flight")]
    Overloaded,
    /// The connection has as many streams (subscriptions, consumers) open
    /// as the server allows; close one first. Not retryable as such.
    #[error("the server allows at most {limit} open streams per connection")]
    TooManyStreams {
        /// The server's limit.
        limit: u32,
    },
    /// The server did not accept the credentials (or their absence). Not
    /// retryable with the same credentials.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The caller's identity may not call this service. Not retryable. The
    /// connection stays usable for what is allowed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The server refused the connection: it has as many as it allows.
    /// Retryable later.
    #[error("the server allows at most {limit} connections{scope}")]
    TooManyConnections {
        /// The limit reached.
        limit: u32,
        /// "" for the total, " per identity" for an identity's.
        scope: String,
    },
    /// The arguments could not be serialized. Not retryable. (A request too
    /// large for the frame limit is [`RpcError::TooLarge`].)
    #[error("arguments could not be sent: {0}")]
    Serialize(String),
    /// The reply, or the server's report, could not be decoded. Not retryable.
    #[error("reply could not be decoded: {0}")]
    Decode(String),
    /// The request exceeds the frame limit: the smaller of this client's
    /// `max_frame_size` and the one the server announced in its welcome.
    /// Refused before any I/O; the connection stays usable. Not retryable.
    #[error("a request of {size} bytes exceeds the frame limit of {limit} bytes")]
    TooLarge {
        /// The encoded request's size (frame header included).
        size: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The server failed while handling the call: its handler panicked, or
    /// its reply could not be sent. Answered at once (not at the deadline).
    /// Not retryable by default: the same call is likely to fail the same way.
    #[error("internal error on the server: {0}")]
    Internal(String),
    /// The server's handler produced a stream item it could not send (too
    /// large for a frame, or not serializable), so the stream ended early:
    /// items after it were never sent. Not retryable as such.
    #[error("the stream ended because the server could not send an item: {0}")]
    ItemNotSent(String),
    /// The server does not support what the call needs (client or
    /// bidirectional streaming: it is older than them, or has them turned
    /// off). Refused before anything was sent. Not retryable against that
    /// server.
    #[error("not supported by the server: {0}")]
    NotSupported(String),
    /// The server takes no more items for this call: it already answered
    /// or failed it, or its handler stopped reading them. For a
    /// client-streaming call, `finish` gives the answer. Not retryable as
    /// such.
    #[error("the server takes no more items for this call")]
    InputClosed,
    /// The server ended this client-streaming call: items unread by the
    /// handlers of this connection's streams would have passed its
    /// `inbound_buffer_bytes`. Retryable once they have read.
    #[error(
        "client-stream items unread on this connection passed the server's limit of {limit} bytes"
    )]
    InboundBufferFull {
        /// The server's limit.
        limit: u64,
    },
}

impl RpcError {
    /// What kind of failure this is. Every variant is mapped here by hand:
    ///
    /// - [`ErrorKind::TimedOut`] for `DeadlineExceeded`.
    /// - [`ErrorKind::Unavailable`] for `Unavailable`, `Cancelled` (the server
    ///   is shutting down).
    /// - [`ErrorKind::Busy`] for `Overloaded`, `TooManyConnections`,
    ///   `InboundBufferFull`.
    /// - [`ErrorKind::Refused`] for `Unauthenticated`, `PermissionDenied`.
    /// - [`ErrorKind::Unsupported`] for `UnknownService`, `UnknownMethod`,
    ///   `ProtocolMismatch`, `Decode`, `NotSupported` (the server does not
    ///   offer the call, or speaks another version of it).
    /// - [`ErrorKind::Conflict`] for `InputClosed` (the call is past taking
    ///   items).
    /// - [`ErrorKind::LimitExceeded`] for `TooLarge`, `TooManyStreams`.
    /// - [`ErrorKind::InvalidInput`] for `Serialize`.
    /// - [`ErrorKind::Internal`] for `Internal`, `ItemNotSent`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RpcError::DeadlineExceeded => ErrorKind::TimedOut,
            RpcError::Unavailable(_) | RpcError::Cancelled => ErrorKind::Unavailable,
            RpcError::Overloaded
            | RpcError::TooManyConnections { .. }
            | RpcError::InboundBufferFull { .. } => ErrorKind::Busy,
            RpcError::Unauthenticated(_) | RpcError::PermissionDenied(_) => ErrorKind::Refused,
            RpcError::UnknownService { .. }
            | RpcError::UnknownMethod { .. }
            | RpcError::ProtocolMismatch { .. }
            | RpcError::Decode(_)
            | RpcError::NotSupported(_) => ErrorKind::Unsupported,
            RpcError::InputClosed => ErrorKind::Conflict,
            RpcError::TooLarge { .. } | RpcError::TooManyStreams { .. } => ErrorKind::LimitExceeded,
            RpcError::Serialize(_) => ErrorKind::InvalidInput,
            RpcError::Internal(_) | RpcError::ItemNotSent(_) => ErrorKind::Internal,
        }
    }

    /// Whether calling again may succeed: whether its
    /// [`kind`](Self::kind) is retryable.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

impl From<RpcFault> for RpcError {
    fn from(fault: RpcFault) -> RpcError {
        match fault {
            RpcFault::UnknownService { service } => RpcError::UnknownService { service },
            RpcFault::UnknownMethod { service, method } => {
                RpcError::UnknownMethod { service, method }
            }
            RpcFault::Mismatch { service, method } => {
                RpcError::ProtocolMismatch { service, method }
            }
            RpcFault::DeadlineExceeded => RpcError::DeadlineExceeded,
            RpcFault::Cancelled => RpcError::Cancelled,
            // The fault names no service or method: the reason goes where
            // the service would, and the method is left empty.
            RpcFault::Malformed { reason } => RpcError::ProtocolMismatch {
                service: format!("(arguments refused: {reason})"),
                method: String::new(),
            },
            RpcFault::TooManyStreams { limit } => RpcError::TooManyStreams { limit },
            RpcFault::Unauthenticated { reason } => RpcError::Unauthenticated(reason),
            RpcFault::PermissionDenied { what } => RpcError::PermissionDenied(what),
            RpcFault::TooManyConnections { limit, scope } => {
                RpcError::TooManyConnections { limit, scope }
            }
            RpcFault::ItemNotSent { reason } => RpcError::ItemNotSent(reason),
            RpcFault::Internal { reason } => RpcError::Internal(reason),
            RpcFault::InboundBufferFull { limit } => RpcError::InboundBufferFull { limit },
        }
    }
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    #[test]
    fn refusals_deadlines_and_unreachable_servers_have_their_kinds() {
        let denied: RpcError = RpcFault::PermissionDenied {
            what: "queue.consume jobs".into(),
        }
        .into();
        assert_eq!(denied.kind(), ErrorKind::Refused);
        let unauthenticated: RpcError = RpcFault::Unauthenticated {
            reason: "no token".into(),
        }
        .into();
        assert_eq!(unauthenticated.kind(), ErrorKind::Refused);
        assert_eq!(RpcError::DeadlineExceeded.kind(), ErrorKind::TimedOut);
        let server: RpcError = RpcFault::DeadlineExceeded.into();
        assert_eq!(server.kind(), ErrorKind::TimedOut);
        let refused = RpcError::Unavailable("connection refused".into());
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert!(refused.is_retryable());
        let unknown: RpcError = RpcFault::UnknownService {
            service: "Nope".into(),
        }
        .into();
        assert_eq!(unknown.kind(), ErrorKind::Unsupported);
        let too_large = RpcError::TooLarge { size: 2, limit: 1 };
        assert_eq!(too_large.kind(), ErrorKind::LimitExceeded);
    }

    #[test]
    fn retryable_calls_are_exactly_those_of_a_retryable_kind() {
        let retryable = [
            RpcError::DeadlineExceeded,
            RpcError::Unavailable(String::new()),
            RpcError::Cancelled,
            RpcError::Overloaded,
            RpcError::TooManyConnections {
                limit: 1,
                scope: String::new(),
            },
        ];
        for err in &retryable {
            assert!(err.is_retryable(), "{err:?}");
        }
        let not = [
            RpcError::TooManyStreams { limit: 1 },
            RpcError::PermissionDenied(String::new()),
            RpcError::Internal(String::new()),
            RpcError::Serialize(String::new()),
        ];
        for err in &not {
            assert!(!err.is_retryable(), "{err:?}");
        }
    }
}
