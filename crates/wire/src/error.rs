//! Errors of the wire layer, one enum per operation.
//!
//! "Retryable" throughout Courier means: the same operation, with the same
//! input, may succeed if tried again (perhaps on a fresh connection). A frame
//! that is too large or malformed is not retryable: it will fail again.

use std::io;

/// Why bytes read from a peer could not be turned into a [`crate::Frame`].
///
/// Every variant is a protocol violation by the peer (or corruption in
/// transit); on a stream the connection cannot be trusted after it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announces more than the configured limit. Detected
    /// before any buffer grows. Not retryable.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Announced length (bytes after the prefix).
        size: usize,
        /// The configured maximum.
        limit: usize,
    },
    /// The length prefix is smaller than the fixed header: it lies. Not retryable.
    #[error("frame length {length} is shorter than the {minimum}-byte header")]
    LengthTooShort {
        /// Announced length.
        length: usize,
        /// Smallest valid length.
        minimum: usize,
    },
    /// A datagram's length prefix disagrees with the datagram's size. Not retryable.
    #[error("frame length {declared} disagrees with the {actual} bytes received")]
    LengthMismatch {
        /// Length the prefix announced.
        declared: usize,
        /// Bytes actually present after the prefix.
        actual: usize,
    },
    /// The input ended inside a frame (a truncated header or payload).
    /// Retryable: the peer may have died mid-frame.
    #[error("input ended inside a frame: {received} of {expected} bytes")]
    Truncated {
        /// Bytes of the frame that arrived (including the prefix).
        received: usize,
        /// Bytes needed to complete what arrived, when known.
        expected: usize,
    },
    /// The header names a protocol version this build does not speak. Not retryable.
    #[error("unsupported protocol version {found} (this build speaks version {supported})")]
    UnsupportedVersion {
        /// Version in the frame.
        found: u8,
        /// Version of this build.
        supported: u8,
    },
    /// The header names a frame kind that does not exist. Not retryable.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The reserved header byte is not zero. Not retryable.
    #[error("reserved header byte is {0:#04x}, expected 0")]
    ReservedNotZero(u8),
    /// The CRC32C trailer does not match the frame: corrupted in transit.
    /// Retryable: a resend will probably arrive intact.
    #[error("checksum mismatch: frame says {expected:#010x}, content hashes to {actual:#010x}")]
    ChecksumMismatch {
        /// Checksum carried by the frame.
        expected: u32,
        /// Checksum of what arrived.
        actual: u32,
    },
    /// The connection requires checksums and this frame has none. Not retryable.
    #[error("frame has no checksum but this connection requires one")]
    MissingChecksum,
    /// Reading from the underlying source failed (only through the
    /// tokio-util `Decoder` impl). Retryable when the I/O error is transient.
    #[error("i/o error while reading frames: {0}")]
    Io(#[from] io::Error),
}

impl DecodeError {
    /// Whether trying again (on a fresh connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            DecodeError::Truncated { .. } | DecodeError::ChecksumMismatch { .. } => true,
            DecodeError::Io(err) => io_is_retryable(err),
            _ => false,
        }
    }
}

/// Why a frame could not be encoded. The output buffer is left as it was
/// before the call, so the connection stays usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The frame would exceed the configured limit; refused before any I/O.
    /// Not retryable.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Encoded length the frame would have (bytes after the prefix).
        size: usize,
        /// The configured maximum.
        limit: usize,
    },
    /// The value could not be serialized. Not retryable.
    #[error("payload could not be serialized: {0}")]
    Serialize(#[source] postcard::Error),
    /// Writing to the underlying sink failed (only through the tokio-util
    /// `Encoder` impl). Retryable when the I/O error is transient.
    #[error("i/o error while writing frames: {0}")]
    Io(#[from] io::Error),
}

impl EncodeError {
    /// Whether trying again (on a fresh connection) may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            EncodeError::Io(err) => io_is_retryable(err),
            _ => false,
        }
    }
}

/// Why a payload could not be decoded into the requested type.
/// Not retryable: the bytes will not change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    /// The bytes are not a valid postcard encoding of the type.
    #[error("payload does not decode as the expected type: {0}")]
    Malformed(#[source] postcard::Error),
    /// The value decoded but bytes were left over: the peer sent a different
    /// (longer) type.
    #[error("payload decoded with {count} bytes left over")]
    TrailingBytes {
        /// Bytes left after the value.
        count: usize,
    },
}

impl PayloadError {
    /// Always false: the same bytes will fail the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Why a peer's stream preamble was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreambleError {
    /// The peer does not speak Courier (an HTTP client, another protocol).
    /// Not retryable.
    #[error("peer does not speak Courier: it sent {received:?}")]
    NotCourier {
        /// The first bytes the peer sent, escaped for display.
        received: String,
    },
    /// The peer speaks another version of Courier. Not retryable.
    #[error("peer speaks Courier protocol version {theirs}, this build speaks version {ours}")]
    VersionMismatch {
        /// Our version.
        ours: u8,
        /// The peer's version.
        theirs: u8,
    },
}

impl PreambleError {
    /// Always false: the peer will answer the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Transient I/O failures: the peer went away or the operation was interrupted.
pub fn io_is_retryable(err: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        err.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | NotConnected
            | BrokenPipe
            | TimedOut
            | Interrupted
            | WouldBlock
            | UnexpectedEof
            | AddrNotAvailable
    )
}
