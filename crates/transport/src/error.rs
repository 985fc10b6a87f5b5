//! Errors of the transport layer, one enum per operation. Each says whether
//! trying again (on a fresh connection) may succeed, and what
//! [`ErrorKind`] of failure it is (`kind()`), the shape every Courier
//! error shares.

use std::io;
use std::time::Duration;

use courier_wire::{DecodeError, EncodeError, PreambleError};

use crate::{Address, AddressError, ErrorKind};

/// Why the preamble exchange that opens a stream connection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer is not Courier, or another version of it. Not retryable.
    #[error(transparent)]
    Preamble(#[from] PreambleError),
    /// The peer did not finish the exchange in time. Retryable.
    #[error("peer did not complete the handshake within {0:?}")]
    Timeout(Duration),
    /// The socket failed during the exchange. Retryable when transient.
    #[error("i/o error during handshake: {0}")]
    Io(#[from] io::Error),
    /// The TLS handshake failed: an untrusted or expired certificate, a
    /// name mismatch, a peer that does not speak TLS. Not retryable.
    #[error("tls handshake failed: {0}")]
    Tls(String),
    /// A `tls://` address without TLS settings in the configuration.
    #[error("tls:// needs {0} in the TransportConfig")]
    TlsNotConfigured(&'static str),
}

impl HandshakeError {
    /// What kind of failure this is: a peer that is not Courier (or
    /// another version) is [`ErrorKind::Unsupported`], a refused or
    /// untrusted certificate [`ErrorKind::Refused`], missing TLS settings
    /// [`ErrorKind::InvalidInput`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            HandshakeError::Preamble(err) => match err.is_retryable() {
                true => ErrorKind::Unavailable,
                false => ErrorKind::Unsupported,
            },
            HandshakeError::Timeout(_) => ErrorKind::TimedOut,
            HandshakeError::Io(err) => match err.kind() {
                io::ErrorKind::UnexpectedEof => ErrorKind::Unavailable,
                _ => ErrorKind::of_io(err),
            },
            HandshakeError::Tls(_) => ErrorKind::Refused,
            HandshakeError::TlsNotConfigured(_) => ErrorKind::InvalidInput,
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Why [`crate::bind`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BindError {
    /// Another listener holds the address. Retryable (it may go away).
    #[error("{address} is already in use")]
    InUse {
        /// The address asked for.
        address: Address,
    },
    /// The host name did not resolve. Retryable.
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        /// The address asked for.
        address: Address,
        /// What the resolver said.
        source: io::Error,
    },
    /// The operating system refused. Retryable when transient.
    #[error("cannot listen on {address}: {source}")]
    Io {
        /// The address asked for.
        address: Address,
        /// What the system said.
        source: io::Error,
    },
}

impl BindError {
    /// What kind of failure this is: an address in use or a name that does
    /// not resolve is [`ErrorKind::Unavailable`] (both may change).
    pub fn kind(&self) -> ErrorKind {
        match self {
            BindError::InUse { .. } | BindError::Resolve { .. } => ErrorKind::Unavailable,
            BindError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Why [`crate::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The host name did not resolve. Retryable.
    #[error("cannot resolve {address}: {source}")]
    Resolve {
        /// The address asked for.
        address: Address,
        /// What the resolver said.
        source: io::Error,
    },
    /// No socket could be opened (refused, unreachable, ...). Retryable when transient.
    #[error("cannot connect to {address}: {source}")]
    Io {
        /// The address asked for.
        address: Address,
        /// What the system said.
        source: io::Error,
    },
    /// Nothing answered within the connect timeout. Retryable.
    #[error("connecting to {address} timed out after {after:?}")]
    Timeout {
        /// The address asked for.
        address: Address,
        /// The configured timeout.
        after: Duration,
    },
    /// No in-process listener has that name. Retryable (it may be bound later).
    #[error("no listener is bound at {address}")]
    NoListener {
        /// The address asked for.
        address: Address,
    },
    /// The socket opened but the peer's preamble was refused or never came.
    #[error("handshake with {address} failed: {source}")]
    Handshake {
        /// The address asked for.
        address: Address,
        /// What went wrong.
        source: HandshakeError,
    },
}

impl ConnectError {
    /// What kind of failure this is: a refused connection, an unresolved
    /// name or a missing listener is [`ErrorKind::Unavailable`], the
    /// connect timeout [`ErrorKind::TimedOut`]; a failed handshake has its
    /// own kind ([`HandshakeError::kind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConnectError::Resolve { .. } | ConnectError::NoListener { .. } => {
                ErrorKind::Unavailable
            }
            ConnectError::Timeout { .. } => ErrorKind::TimedOut,
            ConnectError::Io { source, .. } => ErrorKind::of_io(source),
            ConnectError::Handshake { source, .. } => source.kind(),
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Why a frame could not be sent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The frame exceeds the connection's limit (for UDP: the datagram
    /// limit). Refused before any I/O; the connection stays usable. Not retryable.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes; nothing was sent")]
    FrameTooLarge {
        /// Encoded size (bytes after the length prefix).
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The value could not be serialized. The connection stays usable. Not retryable.
    #[error("message could not be serialized: {0}")]
    Serialize(#[source] EncodeError),
    /// The connection was closed, by [`crate::FrameSender::close`] or by the
    /// peer. Retryable on a new connection.
    #[error("connection is closed")]
    Closed,
    /// Writing to the socket failed; the connection is broken. Retryable on a
    /// new connection when transient.
    #[error("connection broken: {0}")]
    Io(#[from] io::Error),
}

impl SendError {
    /// What kind of failure this is: a frame over the limit is
    /// [`ErrorKind::LimitExceeded`], a value that does not serialize
    /// [`ErrorKind::InvalidInput`], a closed connection
    /// [`ErrorKind::Unavailable`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            SendError::FrameTooLarge { .. } => ErrorKind::LimitExceeded,
            SendError::Serialize(_) => ErrorKind::InvalidInput,
            SendError::Closed => ErrorKind::Unavailable,
            SendError::Io(err) => ErrorKind::of_io(err),
        }
    }

    /// Whether trying again (on a new connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

impl From<EncodeError> for SendError {
    fn from(err: EncodeError) -> SendError {
        match err {
            EncodeError::FrameTooLarge { size, limit } => SendError::FrameTooLarge { size, limit },
            EncodeError::Io(err) => SendError::Io(err),
            other => SendError::Serialize(other),
        }
    }
}

/// Why a frame could not be received. After any of these the connection is
/// finished: further `recv` calls return the same kind of error or `None`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecvError {
    /// The peer sent bytes that are not valid frames (garbage, an oversized
    /// frame, a bad version). Not retryable: it will do it again.
    #[error("peer sent an invalid frame: {0}")]
    Decode(#[from] DecodeError),
    /// The connection ended in the middle of a frame (the peer died mid-write).
    /// Retryable.
    #[error("connection ended inside a frame ({buffered} bytes of it had arrived)")]
    UnexpectedEof {
        /// Bytes of the unfinished frame that arrived.
        buffered: usize,
    },
    /// Heartbeats are on and nothing arrived for the configured timeout: the
    /// peer is frozen or the network path is gone. Retryable.
    #[error("peer silent for {after:?}; considered dead")]
    PeerSilent {
        /// The heartbeat timeout.
        after: Duration,
    },
    /// Reading from the socket failed. Retryable when transient.
    #[error("connection broken: {0}")]
    Io(#[from] io::Error),
}

impl RecvError {
    /// What kind of failure this is: a peer sending what is not valid
    /// frames is [`ErrorKind::Unsupported`]; a connection that ended or
    /// went silent is [`ErrorKind::Unavailable`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            RecvError::Decode(_) => ErrorKind::Unsupported,
            RecvError::UnexpectedEof { .. } | RecvError::PeerSilent { .. } => {
                ErrorKind::Unavailable
            }
            RecvError::Io(err) => ErrorKind::of_io(err),
        }
    }

    /// Whether trying again (on a new connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}

/// Why [`crate::Listener::accept`] returned no connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// The listener's background task has stopped (its socket failed
    /// permanently). Not retryable on this listener; bind again.
    #[error("listener on {address} has stopped")]
    Stopped {
        /// The listener's address.
        address: Address,
    },
}

impl AcceptError {
    /// [`ErrorKind::Internal`]: the listener itself failed.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AcceptError::Stopped { .. } => ErrorKind::Internal,
        }
    }

    /// Always false for this listener.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

impl AddressError {
    /// [`ErrorKind::InvalidInput`], always: the text is not an address.
    pub fn kind(&self) -> ErrorKind {
        match self {
            AddressError::MissingScheme(_)
            | AddressError::UnsupportedScheme { .. }
            | AddressError::InvalidHostPort { .. }
            | AddressError::InvalidUnixPath { .. }
            | AddressError::EmptyListEntry { .. }
            | AddressError::TooManyAddresses { .. }
            | AddressError::InvalidMemName { .. } => ErrorKind::InvalidInput,
        }
    }
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_unavailable_and_retryable() {
        // A port that was just free: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address: Address = format!("tcp://127.0.0.1:{port}").parse().unwrap();
        let err = crate::connect(&address, &crate::TransportConfig::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.is_retryable());
        let missing: Address = "mem://kind-tests-nobody".parse().unwrap();
        let err = crate::connect(&missing, &crate::TransportConfig::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    }

    #[test]
    fn each_error_has_the_kind_its_variant_says() {
        let address: Address = "tcp://127.0.0.1:1".parse().unwrap();
        let timeout = ConnectError::Timeout {
            address: address.clone(),
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.kind(), ErrorKind::TimedOut);
        let not_courier = ConnectError::Handshake {
            address,
            source: HandshakeError::Preamble(PreambleError::VersionMismatch { ours: 1, theirs: 2 }),
        };
        assert_eq!(not_courier.kind(), ErrorKind::Unsupported);
        assert!(!not_courier.is_retryable());
        assert_eq!(
            HandshakeError::Tls("unknown issuer".into()).kind(),
            ErrorKind::Refused
        );
        let too_large = SendError::FrameTooLarge { size: 2, limit: 1 };
        assert_eq!(too_large.kind(), ErrorKind::LimitExceeded);
        assert_eq!(SendError::Closed.kind(), ErrorKind::Unavailable);
        let silent = RecvError::PeerSilent {
            after: Duration::from_secs(1),
        };
        assert_eq!(silent.kind(), ErrorKind::Unavailable);
        assert_eq!(
            "nonsense".parse::<Address>().unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}
