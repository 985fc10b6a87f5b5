//! Encoding frames into bytes and decoding them back.
//!
//! # Layout
//!
//! All integers are little-endian.
//!
//! ```text
//!  0       4       5       6       7       8                              16
//! +-------+-------+-------+-------+-------+------------------------------+----------+---------+
//! |length |version| kind  | flags | 0x00  |  id (u64)                    | payload  | crc32c? |
//! | (u32) |  (u8) | (u8)  | (u8)  |       |                              | (length  | (u32)   |
//! |       |       |       |       |       |                              |  - 12    |         |
//! |       |       |       |       |       |                              |  [- 4])  |         |
//! +-------+-------+-------+-------+-------+------------------------------+----------+---------+
//! ```
//!
//! `length` counts every byte after itself. When flag bit 0 is set, the last
//! four bytes are a CRC32C of everything between `length` and the checksum
//! (header and payload).
//!
//! # Limits
//!
//! `length` is checked against [`FrameCodec::max_frame_size`] as soon as the
//! four prefix bytes arrive, and the header is validated as soon as its twelve
//! bytes arrive: a lying or hostile peer can make the decoder hold at most one
//! frame of the maximum size, never more.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{CHECKSUM_LEN, DEFAULT_MAX_FRAME_SIZE, HEADER_LEN, LENGTH_PREFIX_LEN};
use crate::{payload, DecodeError, EncodeError, Flags, Frame, FrameKind, PROTOCOL_VERSION};

/// Whether frames carry a CRC32C trailer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Checksum {
    /// No trailer is added. A frame that arrives with one is still verified.
    /// Right for TCP and Unix sockets, whose own checks (and TLS) suffice.
    #[default]
    Off,
    /// Every frame sent carries a trailer and every frame received must.
    /// Used on datagram transports, where the network's checksum is weak or
    /// absent.
    Crc32c,
}

/// Encodes and decodes [`Frame`]s, enforcing a maximum frame size and an
/// optional checksum. Cheap to copy; one per connection.
///
/// Implements tokio-util's [`Encoder`] and [`Decoder`], so
/// `FramedRead`/`FramedWrite` can frame any `AsyncRead`/`AsyncWrite`.
///
/// ```
/// use bytes::BytesMut;
/// use courier_wire::{Frame, FrameCodec, FrameKind};
///
/// let codec = FrameCodec::new().max_frame_size(64 * 1024);
/// let mut buf = BytesMut::new();
/// codec.encode_frame(&Frame::data(7, &b"hello"[..]), &mut buf)?;
/// codec.encode_message(FrameKind::Request, 8, &("add", 2u32, 3u32), &mut buf)?;
///
/// let first = codec.decode_frame(&mut buf)?.expect("a whole frame is buffered");
/// assert_eq!(&first.payload[..], b"hello");
/// let second = codec.decode_frame(&mut buf)?.unwrap();
/// assert_eq!(second.decode_payload::<(&str, u32, u32)>()?, ("add", 2, 3));
/// assert!(buf.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct FrameCodec {
    max_frame_size: usize,
    checksum: Checksum,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new()
    }
}

impl FrameCodec {
    /// A codec with the default limit ([`DEFAULT_MAX_FRAME_SIZE`]) and no checksum.
    pub fn new() -> FrameCodec {
        FrameCodec {
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            checksum: Checksum::Off,
        }
    }

    /// Sets the largest `length` accepted or produced (header, payload and
    /// checksum; the prefix itself is not counted). Values below the header
    /// size are raised to it; values above `u32::MAX` are lowered to it.
    pub fn max_frame_size(mut self, limit: usize) -> FrameCodec {
        let minimum = HEADER_LEN + CHECKSUM_LEN;
        self.max_frame_size = limit.clamp(minimum, u32::MAX as usize);
        self
    }

    /// Sets the checksum policy.
    pub fn checksum(mut self, checksum: Checksum) -> FrameCodec {
        self.checksum = checksum;
        self
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.max_frame_size
    }

    /// The configured checksum policy.
    pub fn checksum_policy(&self) -> Checksum {
        self.checksum
    }

    /// The largest payload a frame can carry under this codec's settings.
    pub fn max_payload_len(&self) -> usize {
        self.max_frame_size - HEADER_LEN - self.trailer_len()
    }

    fn trailer_len(&self) -> usize {
        match self.checksum {
            Checksum::Off => 0,
            Checksum::Crc32c => CHECKSUM_LEN,
        }
    }

    /// Appends `frame` to `dst`. An oversized frame is refused and `dst` is
    /// left untouched.
    pub fn encode_frame(&self, frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let length = frame.body_len() + self.trailer_len();
        if length > self.max_frame_size {
            return Err(EncodeError::FrameTooLarge {
                size: length,
                limit: self.max_frame_size,
            });
        }
        dst.reserve(LENGTH_PREFIX_LEN + length);
        let start = dst.len();
        dst.put_u32_le(length as u32);
        self.put_header(frame.kind, frame.flags, frame.id, dst);
        dst.put_slice(&frame.payload);
        self.finish(start, dst);
        Ok(())
    }

    /// Appends a frame whose payload is the postcard encoding of `value`,
    /// serialized straight into `dst` with no intermediate buffer. A value
    /// too large for the limit is refused with its exact encoded size, and
    /// `dst` is left untouched.
    pub fn encode_message<T: Serialize + ?Sized>(
        &self,
        kind: FrameKind,
        id: u64,
        value: &T,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        self.encode_message_with_flags(kind, Flags::EMPTY, id, value, dst)
    }

    /// [`FrameCodec::encode_message`] with flags.
    pub fn encode_message_with_flags<T: Serialize + ?Sized>(
        &self,
        kind: FrameKind,
        flags: Flags,
        id: u64,
        value: &T,
        dst: &mut BytesMut,
    ) -> Result<(), EncodeError> {
        let start = dst.len();
        dst.put_u32_le(0); // patched below, once the payload length is known
        self.put_header(kind, flags, id, dst);
        match payload::encode_into(value, dst, self.max_payload_len()) {
            Ok(payload_len) => {
                let length = HEADER_LEN + payload_len + self.trailer_len();
                dst[start..start + LENGTH_PREFIX_LEN]
                    .copy_from_slice(&(length as u32).to_le_bytes());
                self.finish(start, dst);
                Ok(())
            }
            Err(err) => {
                dst.truncate(start);
                Err(match err {
                    EncodeError::FrameTooLarge { size, .. } => EncodeError::FrameTooLarge {
                        size: HEADER_LEN + size + self.trailer_len(),
                        limit: self.max_frame_size,
                    },
                    other => other,
                })
            }
        }
    }

    fn put_header(&self, kind: FrameKind, flags: Flags, id: u64, dst: &mut BytesMut) {
        let mut flag_bits = flags.bits();
        if self.checksum == Checksum::Crc32c {
            flag_bits |= Flags::CHECKSUM;
        }
        dst.put_u8(PROTOCOL_VERSION);
        dst.put_u8(kind.as_u8());
        dst.put_u8(flag_bits);
        dst.put_u8(0);
        dst.put_u64_le(id);
    }

    /// Appends the checksum, if on, over the frame starting at `start`.
    fn finish(&self, start: usize, dst: &mut BytesMut) {
        if self.checksum == Checksum::Crc32c {
            let crc = crc32c::crc32c(&dst[start + LENGTH_PREFIX_LEN..]);
            dst.put_u32_le(crc);
        }
    }

    /// Takes one frame off the front of `src`.
    ///
    /// `Ok(None)` means more bytes are needed; `src` may have been given
    /// capacity for the rest of the frame (never more than the limit).
    /// After an error the stream is unusable: its framing is lost.
    pub fn decode_frame(&self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        let Some(length) = self.peek_length(src)? else {
            src.reserve(LENGTH_PREFIX_LEN + HEADER_LEN);
            return Ok(None);
        };
        // `length` is at least HEADER_LEN, so a whole frame includes a whole header.
        let total = LENGTH_PREFIX_LEN + length;
        if src.len() < LENGTH_PREFIX_LEN + HEADER_LEN {
            src.reserve(total - src.len());
            return Ok(None);
        }
        // Validate the header before waiting for a payload of up to the
        // limit: garbage is refused as early as possible.
        let kind = check_header(&src[LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + HEADER_LEN])?;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut bytes = src.split_to(total);
        bytes.advance(LENGTH_PREFIX_LEN);
        self.parse_checked_body(kind, bytes.freeze()).map(Some)
    }

    /// Decodes a datagram holding exactly one frame. The length prefix must
    /// match the datagram's size.
    pub fn decode_datagram(&self, mut datagram: Bytes) -> Result<Frame, DecodeError> {
        if datagram.len() < LENGTH_PREFIX_LEN + HEADER_LEN {
            return Err(DecodeError::Truncated {
                received: datagram.len(),
                expected: LENGTH_PREFIX_LEN + HEADER_LEN,
            });
        }
        let length = self
            .peek_length(&datagram)?
            .expect("datagram holds a length prefix");
        let actual = datagram.len() - LENGTH_PREFIX_LEN;
        if length != actual {
            return Err(DecodeError::LengthMismatch {
                declared: length,
                actual,
            });
        }
        datagram.advance(LENGTH_PREFIX_LEN);
        self.parse_body(datagram)
    }

    /// Reads and checks the length prefix, if four bytes are there.
    fn peek_length(&self, src: &[u8]) -> Result<Option<usize>, DecodeError> {
        let Some(prefix) = src.get(..LENGTH_PREFIX_LEN) else {
            return Ok(None);
        };
        let length = u32::from_le_bytes(prefix.try_into().expect("four bytes")) as usize;
        if length > self.max_frame_size {
            return Err(DecodeError::FrameTooLarge {
                size: length,
                limit: self.max_frame_size,
            });
        }
        if length < HEADER_LEN {
            return Err(DecodeError::LengthTooShort {
                length,
                minimum: HEADER_LEN,
            });
        }
        Ok(Some(length))
    }

    /// Parses header, payload and trailer of one frame (prefix removed).
    fn parse_body(&self, body: Bytes) -> Result<Frame, DecodeError> {
        let kind = check_header(&body[..HEADER_LEN])?;
        self.parse_checked_body(kind, body)
    }

    /// [`Self::parse_body`] for a body whose header was already checked.
    fn parse_checked_body(&self, kind: FrameKind, mut body: Bytes) -> Result<Frame, DecodeError> {
        let flag_bits = body[2];
        let id = u64::from_le_bytes(body[4..12].try_into().expect("eight bytes"));
        if flag_bits & Flags::CHECKSUM != 0 {
            if body.len() < HEADER_LEN + CHECKSUM_LEN {
                return Err(DecodeError::LengthTooShort {
                    length: body.len(),
                    minimum: HEADER_LEN + CHECKSUM_LEN,
                });
            }
            let trailer = body.split_off(body.len() - CHECKSUM_LEN);
            let expected = u32::from_le_bytes(trailer[..].try_into().expect("four bytes"));
            let actual = crc32c::crc32c(&body);
            if expected != actual {
                return Err(DecodeError::ChecksumMismatch { expected, actual });
            }
        } else if self.checksum == Checksum::Crc32c {
            return Err(DecodeError::MissingChecksum);
        }
        body.advance(HEADER_LEN);
        Ok(Frame {
            kind,
            flags: Flags::from_bits(flag_bits),
            id,
            payload: body,
        })
    }
}

/// Validates version, kind and reserved byte of a 12-byte header.
fn check_header(header: &[u8]) -> Result<FrameKind, DecodeError> {
    if header[0] != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            found: header[0],
            supported: PROTOCOL_VERSION,
        });
    }
    let kind = FrameKind::from_u8(header[1]).ok_or(DecodeError::UnknownKind(header[1]))?;
    if header[3] != 0 {
        return Err(DecodeError::ReservedNotZero(header[3]));
    }
    Ok(kind)
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        self.decode_frame(src)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        match self.decode_frame(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(truncated(src, self)),
        }
    }
}

/// The error for bytes left over when the input ends mid-frame.
pub(crate) fn truncated(src: &[u8], codec: &FrameCodec) -> DecodeError {
    let expected = match codec.peek_length(src) {
        Ok(Some(length)) => LENGTH_PREFIX_LEN + length,
        _ => LENGTH_PREFIX_LEN + HEADER_LEN,
    };
    DecodeError::Truncated {
        received: src.len(),
        expected,
    }
}

impl FrameCodec {
    /// The error describing `src` as the unfinished remains of a frame, for
    /// use when a stream ends with bytes still buffered.
    pub fn truncated_error(&self, src: &[u8]) -> DecodeError {
        truncated(src, self)
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_frame(&frame, dst)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        self.encode_frame(frame, dst)
    }
}
