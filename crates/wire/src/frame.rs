//! The frame: what travels on the wire, independent of how it is encoded.

use bytes::Bytes;

/// The protocol version this build speaks. It is carried in every frame header
/// and in the stream preamble; a peer with another version is refused.
pub const PROTOCOL_VERSION: u8 = 1;

/// Bytes of the length prefix that precedes every frame.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Bytes of the fixed header that follows the length prefix
/// (version, kind, flags, reserved, id).
pub const HEADER_LEN: usize = 12;

/// Bytes of the optional CRC32C trailer.
pub const CHECKSUM_LEN: usize = 4;

/// Default limit on a frame's length (header + payload + checksum): 4 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 4 * 1024 * 1024;

/// What a frame means. The wire layer only validates the value; the layers
/// above give each kind its meaning, as noted per variant.
///
/// Values are part of the protocol: a new kind takes a new number, never an
/// old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum FrameKind {
    /// Connection or channel handshake (messaging: node id, schema fingerprints).
    Hello = 1,
    /// An application message (messaging, pub/sub deliveries, raw users).
    Data = 2,
    /// A request expecting a [`FrameKind::Response`] with the same id (rpc, messaging).
    Request = 3,
    /// The answer to the [`FrameKind::Request`] with the same id.
    Response = 4,
    /// Acknowledges delivery of the message with the same id (at-least-once, queues).
    Ack = 5,
    /// Cancels the request or stream with the same id (rpc).
    Cancel = 6,
    /// Liveness probe; answered with [`FrameKind::Pong`] by the transport itself.
    Ping = 7,
    /// Answer to a [`FrameKind::Ping`].
    Pong = 8,
    /// Orderly end of a connection or channel, with an optional reason.
    Close = 9,
    /// A protocol-level error report for the request or stream with the same id.
    Error = 10,
    /// One item of a server stream (rpc streaming, queue deliveries).
    StreamItem = 11,
    /// The end of the stream with the same id.
    StreamEnd = 12,
    /// Flow-control credit granted to the peer for the stream with the same id.
    Credit = 13,
}

impl FrameKind {
    /// Every kind, in wire-value order.
    pub const ALL: [FrameKind; 13] = [
        FrameKind::Hello,
        FrameKind::Data,
        FrameKind::Request,
        FrameKind::Response,
        FrameKind::Ack,
        FrameKind::Cancel,
        FrameKind::Ping,
        FrameKind::Pong,
        FrameKind::Close,
        FrameKind::Error,
        FrameKind::StreamItem,
        FrameKind::StreamEnd,
        FrameKind::Credit,
    ];

    /// The kind with this wire value, if there is one.
    pub fn from_u8(value: u8) -> Option<FrameKind> {
        FrameKind::ALL
            .get(usize::from(value).checked_sub(1)?)
            .copied()
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// Per-frame flag bits.
///
/// Bit 0 belongs to the wire layer (a CRC32C trailer follows the payload) and
/// is set and cleared by the codec; [`Frame::flags`] never shows it. Bits 1–7
/// are free for the layers above, which define them per [`FrameKind`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u8);

impl Flags {
    /// No flags set.
    pub const EMPTY: Flags = Flags(0);
    /// Reserved for the codec: a CRC32C trailer is present.
    pub(crate) const CHECKSUM: u8 = 0b0000_0001;
    /// The bits upper layers may use.
    pub const USER_MASK: u8 = !Flags::CHECKSUM;

    /// Flags from raw bits; the checksum bit is ignored.
    pub fn from_bits(bits: u8) -> Flags {
        Flags(bits & Flags::USER_MASK)
    }

    /// The raw bits (never including the checksum bit).
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether every bit of `mask` is set.
    pub fn contains(self, mask: u8) -> bool {
        self.0 & mask == mask
    }
}

/// One frame: a kind, flags, a 64-bit correlation or stream id, and an opaque
/// payload (usually a postcard-encoded value, see [`crate::payload`]).
///
/// The payload is [`Bytes`], so cloning a frame or moving it through an
/// in-process channel copies no payload bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What the frame means.
    pub kind: FrameKind,
    /// Upper-layer flag bits.
    pub flags: Flags,
    /// Correlation id (request/response), stream id or sequence number.
    pub id: u64,
    /// The body.
    pub payload: Bytes,
}

impl Frame {
    /// A frame with no flags.
    pub fn new(kind: FrameKind, id: u64, payload: impl Into<Bytes>) -> Frame {
        Frame {
            kind,
            flags: Flags::EMPTY,
            id,
            payload: payload.into(),
        }
    }

    /// A [`FrameKind::Data`] frame.
    pub fn data(id: u64, payload: impl Into<Bytes>) -> Frame {
        Frame::new(FrameKind::Data, id, payload)
    }

    /// The same frame with these flags.
    pub fn with_flags(mut self, flags: Flags) -> Frame {
        self.flags = flags;
        self
    }

    /// Bytes this frame occupies after the length prefix, without a checksum.
    /// This is the number compared with the maximum frame size (plus
    /// [`CHECKSUM_LEN`] when checksums are on).
    pub fn body_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Decodes the payload as `T`, borrowing from it where `T` allows.
    pub fn decode_payload<'a, T: serde::Deserialize<'a>>(
        &'a self,
    ) -> Result<T, crate::PayloadError> {
        crate::payload::decode(&self.payload)
    }
}
