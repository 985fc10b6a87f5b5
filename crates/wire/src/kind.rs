//! [`ErrorKind`]: the one shape every Courier error can be matched by.
//!
//! Each mechanism keeps its own error enums, which say exactly what went
//! wrong; each of them also has a `kind()` returning an [`ErrorKind`], so a
//! caller that only needs to decide what to do next (try again, ask for
//! credentials, report bad input) matches one enum whatever the mechanism.
//! A permission denial is [`ErrorKind::Refused`] whether it came from RPC,
//! a queue, pub/sub or the cluster's store.
//!
//! It lives here, in the wire crate, because every mechanism depends on this
//! crate, including the embedded queue and bus that need the kinds but no
//! network; `courier-transport` re-exports it as
//! `courier_transport::ErrorKind`, where most callers find it.

use std::io;

use crate::io_is_retryable;

/// What kind of failure an error is, for deciding what to do about it.
///
/// New kinds may be added, so a `match` on it needs a `_` arm; the
/// mechanisms' own `kind()` methods match their variants one by one, so a
/// new variant there forces a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The other side cannot be reached, or the connection was lost, or it
    /// is shutting down or not the one to ask (a follower, not the leader).
    /// Retryable.
    Unavailable,
    /// The other side is reachable but at capacity: a full queue, too many
    /// calls in flight, as many connections as it allows. Retryable later.
    Busy,
    /// Nothing came in time: a deadline passed, or nobody was there to
    /// answer a request (no responders). Retryable; a write may have taken
    /// effect.
    TimedOut,
    /// Not authenticated (no, wrong or untrusted credentials) or not
    /// permitted. Not retryable with the same credentials.
    Refused,
    /// What was named does not exist: a queue, an endpoint, a key's lease,
    /// a delivery's history. Not retryable.
    NotFound,
    /// The request itself is wrong: an invalid name, subject or address,
    /// a value that cannot be serialized, a bad configuration. Not
    /// retryable.
    InvalidInput,
    /// The request exceeds a fixed limit: too large for a frame or a
    /// record, more streams than a connection may have. Not retryable as
    /// it is (make it smaller, or close something first).
    LimitExceeded,
    /// The request conflicts with the current state: a failed
    /// compare-and-set, a name already in use, a delivery already
    /// answered or whose lease was lost. Not retryable as it is.
    Conflict,
    /// The other side does not offer or understand this: no such service
    /// or method, another version of a protocol or message type, a peer
    /// that is not Courier. Not retryable until one side is rebuilt.
    Unsupported,
    /// A failure of the system rather than of the request: storage failed,
    /// a handler panicked, this side is shutting down. Not retryable as
    /// such.
    Internal,
}

impl ErrorKind {
    /// Whether trying again (perhaps later, perhaps on a new connection)
    /// may succeed: [`Unavailable`](Self::Unavailable),
    /// [`Busy`](Self::Busy) and [`TimedOut`](Self::TimedOut).
    pub fn is_retryable(self) -> bool {
        match self {
            ErrorKind::Unavailable | ErrorKind::Busy | ErrorKind::TimedOut => true,
            ErrorKind::Refused
            | ErrorKind::NotFound
            | ErrorKind::InvalidInput
            | ErrorKind::LimitExceeded
            | ErrorKind::Conflict
            | ErrorKind::Unsupported
            | ErrorKind::Internal => false,
        }
    }

    /// The kind of an I/O error, consistent with
    /// [`crate::io_is_retryable`]: what it calls transient is
    /// [`TimedOut`](Self::TimedOut) (for a timeout) or
    /// [`Unavailable`](Self::Unavailable); otherwise a denied permission is
    /// [`Refused`](Self::Refused), a missing file or socket
    /// [`NotFound`](Self::NotFound), and the rest
    /// [`Internal`](Self::Internal).
    pub fn of_io(err: &io::Error) -> ErrorKind {
        if io_is_retryable(err) {
            return match err.kind() {
                io::ErrorKind::TimedOut => ErrorKind::TimedOut,
                _ => ErrorKind::Unavailable,
            };
        }
        match err.kind() {
            io::ErrorKind::PermissionDenied => ErrorKind::Refused,
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::AddrInUse => ErrorKind::Conflict,
            io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            _ => ErrorKind::Internal,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Busy => "busy",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::Refused => "refused",
            ErrorKind::NotFound => "not found",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::LimitExceeded => "limit exceeded",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Internal => "internal",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unavailable_busy_and_timed_out_are_retryable() {
        let retryable: Vec<ErrorKind> = [
            ErrorKind::Unavailable,
            ErrorKind::Busy,
            ErrorKind::TimedOut,
            ErrorKind::Refused,
            ErrorKind::NotFound,
            ErrorKind::InvalidInput,
            ErrorKind::LimitExceeded,
            ErrorKind::Conflict,
            ErrorKind::Unsupported,
            ErrorKind::Internal,
        ]
        .into_iter()
        .filter(|kind| kind.is_retryable())
        .collect();
        assert_eq!(
            retryable,
            [ErrorKind::Unavailable, ErrorKind::Busy, ErrorKind::TimedOut]
        );
    }

    #[test]
    fn io_errors_have_the_kind_their_retryability_says() {
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::TimedOut,
            io::ErrorKind::PermissionDenied,
            io::ErrorKind::NotFound,
            io::ErrorKind::AddrInUse,
            io::ErrorKind::Other,
        ] {
            let err = io::Error::from(kind);
            assert_eq!(
                ErrorKind::of_io(&err).is_retryable(),
                io_is_retryable(&err),
                "{kind:?}"
            );
        }
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(ErrorKind::of_io(&refused), ErrorKind::Unavailable);
        let timeout = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(ErrorKind::of_io(&timeout), ErrorKind::TimedOut);
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(ErrorKind::of_io(&denied), ErrorKind::Refused);
    }
}
