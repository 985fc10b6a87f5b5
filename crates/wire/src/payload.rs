//! Typed payloads: serde values encoded with postcard.
//!
//! Encoding writes straight into the caller's [`BytesMut`] (no intermediate
//! `Vec`) and stops storing bytes once a size limit is passed, so an
//! oversized value costs no more memory than the limit. Decoding borrows from
//! the input where the type allows (`&str`, `&[u8]`).

use bytes::{BufMut, BytesMut};
use postcard::ser_flavors::Flavor;
use serde::{Deserialize, Serialize};

use crate::{EncodeError, PayloadError};

/// A postcard flavor that appends to a `BytesMut` up to `limit` bytes, and
/// past the limit only counts, so the caller learns the exact size.
struct LimitedBytesMut<'a> {
    buf: &'a mut BytesMut,
    written: usize,
    limit: usize,
}

impl Flavor for LimitedBytesMut<'_> {
    type Output = usize;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        // Hot for byte sequences, which postcard pushes one byte at a time.
        if self.written < self.limit {
            self.buf.put_u8(data);
        }
        self.written += 1;
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let after = self.written + data.len();
        if after <= self.limit {
            self.buf.put_slice(data);
        }
        self.written = after;
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.written)
    }
}

/// Appends the postcard encoding of `value` to `dst`, refusing values whose
/// encoding exceeds `limit` bytes. Returns the number of bytes appended.
///
/// On error `dst` is left exactly as it was.
///
/// ```
/// # use bytes::BytesMut;
/// let mut buf = BytesMut::new();
/// let n = courier_wire::payload::encode_into(&("hello", 7u32), &mut buf, 1024).unwrap();
/// assert_eq!(n, buf.len());
/// let (s, x): (&str, u32) = courier_wire::payload::decode(&buf).unwrap();
/// assert_eq!((s, x), ("hello", 7));
/// ```
pub fn encode_into<T: Serialize + ?Sized>(
    value: &T,
    dst: &mut BytesMut,
    limit: usize,
) -> Result<usize, EncodeError> {
    let start = dst.len();
    let flavor = LimitedBytesMut {
        buf: dst,
        written: 0,
        limit,
    };
    match postcard::serialize_with_flavor(value, flavor) {
        Ok(written) if written <= limit => Ok(written),
        Ok(written) => {
            dst.truncate(start);
            Err(EncodeError::FrameTooLarge {
                size: written,
                limit,
            })
        }
        Err(err) => {
            dst.truncate(start);
            Err(EncodeError::Serialize(err))
        }
    }
}

/// Decodes a whole payload as `T`, borrowing from `bytes` where `T` allows.
/// Bytes left over after the value are an error: they mean the peer encoded
/// a different type.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, PayloadError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(PayloadError::Malformed)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(PayloadError::TrailingBytes { count: rest.len() })
    }
}
