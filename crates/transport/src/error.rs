//! Errors of the transport layer, one enum per operation. Each says whether
//! trying again (on a fresh connection) may succeed.

use std::io;
use std::time::Duration;

use courier_wire::{io_is_retryable, DecodeError, EncodeError, PreambleError};

use crate::Address;

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
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            HandshakeError::Preamble(err) => err.is_retryable(),
            HandshakeError::Timeout(_) => true,
            HandshakeError::Io(err) => {
                io_is_retryable(err) || err.kind() == io::ErrorKind::UnexpectedEof
            }
            HandshakeError::Tls(_) | HandshakeError::TlsNotConfigured(_) => false,
        }
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
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BindError::InUse { .. } | BindError::Resolve { .. } => true,
            BindError::Io { source, .. } => io_is_retryable(source),
        }
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
    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConnectError::Resolve { .. }
            | ConnectError::Timeout { .. }
            | ConnectError::NoListener { .. } => true,
            ConnectError::Io { source, .. } => io_is_retryable(source),
            ConnectError::Handshake { source, .. } => source.is_retryable(),
        }
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
    /// Whether trying again (on a new connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            SendError::FrameTooLarge { .. } | SendError::Serialize(_) => false,
            SendError::Closed => true,
            SendError::Io(err) => io_is_retryable(err),
        }
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
    /// Whether trying again (on a new connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RecvError::Decode(_) => false,
            RecvError::UnexpectedEof { .. } | RecvError::PeerSilent { .. } => true,
            RecvError::Io(err) => io_is_retryable(err),
        }
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
    /// Always false for this listener.
    pub fn is_retryable(&self) -> bool {
        false
    }
}
