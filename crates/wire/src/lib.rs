//! # courier-wire
//!
//! Courier's frame format, and nothing else: no sockets, no clock, no tasks.
//! Every Courier connection, whatever its transport, carries the frames
//! defined here.
//!
//! - [`Frame`]: kind, flags, 64-bit correlation/stream id and payload bytes.
//! - [`FrameCodec`]: length-prefixed encoding into and decoding out of
//!   [`bytes::BytesMut`], with a maximum frame size and optional CRC32C; also
//!   a tokio-util `Encoder`/`Decoder`. The byte layout is drawn in [`codec`].
//! - [`payload`]: serde values as postcard, serialized straight into the
//!   output buffer and decoded borrowing from the input.
//! - [`headers`]: bounded text headers beside a message's payload (its
//!   type, its trace context), checked while they are decoded.
//! - [`trace`]: the W3C trace context (`traceparent`) carried in those
//!   headers.
//! - [`preamble`]: the eight bytes that open every stream connection, so
//!   strangers are refused before their bytes are read as frames.
//! - [`shared`]: payload bytes decoded as slices of the received frame
//!   rather than copies, bounded by what the decoder lets them keep alive.
//! - [`schema`]: a type's serde shape and its fingerprint, which every
//!   typed face (messages, RPC, pub/sub, queues) carries so that a peer
//!   built with another version of the type is refused, not misread.
//!
//! ## Guarantees on untrusted input
//!
//! Decoding never panics and never allocates more than one frame of the
//! configured maximum size: the length prefix is checked before any buffer
//! grows, the header is checked as soon as it arrives, and each way of being
//! wrong is its own [`DecodeError`] variant. These properties are tested with
//! proptest and by `cargo xtask fuzz`.
//!
//! ## Example
//!
//! ```
//! use bytes::BytesMut;
//! use courier_wire::{Checksum, DecodeError, Frame, FrameCodec};
//!
//! let codec = FrameCodec::new().max_frame_size(1024).checksum(Checksum::Crc32c);
//! let mut wire = BytesMut::new();
//! codec.encode_frame(&Frame::data(1, &b"ping"[..]), &mut wire)?;
//!
//! // A bit flipped in transit is caught by the checksum.
//! let mut damaged = wire.clone();
//! damaged[20] ^= 0x01;
//! assert!(matches!(
//!     codec.decode_frame(&mut damaged),
//!     Err(DecodeError::ChecksumMismatch { .. })
//! ));
//!
//! let frame = codec.decode_frame(&mut wire)?.unwrap();
//! assert_eq!(&frame.payload[..], b"ping");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## Dependencies
//!
//! `crc32c` is the one crate beyond the project's usual set: it computes
//! CRC32C with the SSE4.2/ARMv8 instructions where present, which a
//! hand-written table could not match.

#![warn(missing_docs)]

pub mod codec;
mod error;
mod frame;
pub mod headers;
mod kind;
pub mod payload;
pub mod preamble;
pub mod schema;
pub mod shared;
pub mod trace;

pub use codec::{Checksum, FrameCodec};
pub use error::{io_is_retryable, DecodeError, EncodeError, PayloadError, PreambleError};
pub use frame::{
    Flags, Frame, FrameKind, CHECKSUM_LEN, DEFAULT_MAX_FRAME_SIZE, HEADER_LEN, LENGTH_PREFIX_LEN,
    PROTOCOL_VERSION,
};
pub use kind::ErrorKind;
