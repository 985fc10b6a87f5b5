//! Payload bytes decoded as slices of the frame that carried them, not
//! copies.
//!
//! A payload inside a postcard value is one length-prefixed run of bytes,
//! so the received frame already holds it whole. `bytes::Bytes`'s own
//! `Deserialize` cannot know that frame and copies every payload into a new
//! allocation. Here the decoder of a frame names the frame first
//! ([`with_source`]); a payload field decoded with [`deserialize`] (or as
//! [`SharedBytes`]) then becomes a reference-counted slice of it. The wire
//! form is exactly `Bytes`'s, so peers cannot tell, and schema
//! fingerprints do not change.
//!
//! A slice keeps its whole frame allocation alive (and the frames read into
//! the same buffer with it), so whoever decodes chooses how much sharing
//! may retain with [`Sharing`]: a subscriber's client shares every payload
//! (what it keeps is its own choice, as with hyper's bodies), while a
//! broker, which holds payloads for slow consumers under a memory bound,
//! shares only large payloads that are a good part of their frame.
//!
//! ```
//! use bytes::Bytes;
//! use courier_wire::shared::{self, Sharing};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Message {
//!     subject: String,
//!     #[serde(deserialize_with = "shared::deserialize")]
//!     payload: Bytes,
//! }
//!
//! let frame = Bytes::from(postcard::to_stdvec(&Message {
//!     subject: "a.b".into(),
//!     payload: Bytes::from_static(b"hello"),
//! })?);
//! let decoded: Message =
//!     shared::with_source(&frame, Sharing::Always, || postcard::from_bytes(&frame))?;
//! assert_eq!(decoded.payload, "hello");
//! // The payload is the frame's own bytes: no copy was made.
//! assert_eq!(decoded.payload.as_ptr(), frame[frame.len() - 5..].as_ptr());
//! # Ok::<(), postcard::Error>(())
//! ```

use std::cell::RefCell;

use bytes::Bytes;

/// How much of its frame a decoded payload may keep alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Every payload is a slice of the frame.
    Always,
    /// Only a payload of at least [`LARGE`] bytes that is at least a
    /// quarter of its frame is a slice; smaller ones are copied. With
    /// Courier's stream reader, which reads small frames into buffers of
    /// at most 128 KiB and moves what follows a large frame out of that
    /// frame's buffer, a held payload keeps at most about eight times its
    /// own size alive, so a store bounded in payload bytes stays bounded in
    /// memory, while a batch of a few large messages (a publisher's sender
    /// joins them up to 256 KiB a frame) is forwarded without a copy.
    Large,
    /// Every payload is copied.
    Never,
}

/// The smallest payload [`Sharing::Large`] shares.
pub const LARGE: usize = 32 * 1024;

impl Sharing {
    fn shares(self, payload: usize, frame: usize) -> bool {
        match self {
            Sharing::Always => true,
            Sharing::Large => payload >= LARGE && payload.saturating_mul(4) >= frame,
            Sharing::Never => false,
        }
    }
}

std::thread_local! {
    /// The frame being decoded on this thread, if its decoder named it.
    static SOURCE: RefCell<Option<(Bytes, Sharing)>> = const { RefCell::new(None) };
}

/// Restores the source that was current before, even if decoding panics.
struct Restore(Option<(Bytes, Sharing)>);

impl Drop for Restore {
    fn drop(&mut self) {
        let previous = self.0.take();
        // `try_with`: during thread teardown there is nothing to restore.
        let _ = SOURCE.try_with(|source| *source.borrow_mut() = previous);
    }
}

/// Runs `decode` with `frame` as the source of payloads decoded by
/// [`deserialize`] on this thread. Decoding is synchronous, so the source
/// is this decode's alone; nested calls restore the outer source on return.
/// A payload that does not lie inside `frame` is copied.
pub fn with_source<R>(frame: &Bytes, sharing: Sharing, decode: impl FnOnce() -> R) -> R {
    let previous = SOURCE.with(|source| source.replace(Some((frame.clone(), sharing))));
    let _restore = Restore(previous);
    decode()
}

/// Decodes a `Bytes` field (`#[serde(deserialize_with = ...)]`) as a slice
/// of the frame named by [`with_source`], where [`Sharing`] allows; as a
/// copy otherwise, or when the deserializer does not lend its input.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
    deserializer.deserialize_bytes(Visitor)
}

/// `Bytes` decoded as [`deserialize`] does, for places where a field
/// attribute cannot go (a tuple of RPC arguments); serialized as `Bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SharedBytes(pub Bytes);

impl From<SharedBytes> for Bytes {
    fn from(shared: SharedBytes) -> Bytes {
        shared.0
    }
}

impl serde::Serialize for SharedBytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SharedBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize(deserializer).map(SharedBytes)
    }
}

/// A slice of the current source if `payload` lies inside it and sharing
/// allows, else a copy.
fn share(payload: &[u8]) -> Bytes {
    if payload.is_empty() {
        return Bytes::new();
    }
    SOURCE
        .try_with(|source| {
            let source = source.borrow();
            match &*source {
                Some((frame, sharing))
                    if sharing.shares(payload.len(), frame.len()) && inside(frame, payload) =>
                {
                    Some(frame.slice_ref(payload))
                }
                _ => None,
            }
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| Bytes::copy_from_slice(payload))
}

/// Whether `part` lies within `whole`'s memory (`Bytes::slice_ref` panics
/// otherwise, so this is checked first).
fn inside(whole: &[u8], part: &[u8]) -> bool {
    let start = whole.as_ptr() as usize;
    let end = start + whole.len();
    let at = part.as_ptr() as usize;
    at >= start
        && at
            .checked_add(part.len())
            .is_some_and(|part_end| part_end <= end)
}

struct Visitor;

impl<'de> serde::de::Visitor<'de> for Visitor {
    type Value = Bytes;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, bytes: &'de [u8]) -> Result<Bytes, E> {
        Ok(share(bytes))
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(bytes))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Bytes, E> {
        Ok(Bytes::from(bytes))
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<Bytes, E> {
        Ok(share(text.as_bytes()))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Bytes, E> {
        Ok(Bytes::copy_from_slice(text.as_bytes()))
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Bytes, E> {
        Ok(Bytes::from(text))
    }

    /// A self-describing format (JSON) writes bytes as a sequence of
    /// numbers; grown as they arrive, never from the claimed size.
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(byte) = seq.next_element::<u8>()? {
            bytes.push(byte);
        }
        Ok(Bytes::from(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Message {
        id: u32,
        #[serde(deserialize_with = "deserialize")]
        payload: Bytes,
    }

    fn frame_of(payload: &[u8]) -> Bytes {
        Bytes::from(
            postcard::to_stdvec(&Message {
                id: 7,
                payload: Bytes::copy_from_slice(payload),
            })
            .unwrap(),
        )
    }

    fn decode(frame: &Bytes, sharing: Sharing) -> Message {
        with_source(frame, sharing, || postcard::from_bytes(frame)).unwrap()
    }

    fn is_slice_of(payload: &Bytes, frame: &Bytes) -> bool {
        !payload.is_empty() && inside(frame, payload)
    }

    #[test]
    fn always_slices_and_the_value_is_the_same_as_bytes_own_decoding() {
        let frame = frame_of(b"hello");
        let decoded = decode(&frame, Sharing::Always);
        assert_eq!(decoded.payload, "hello");
        assert!(is_slice_of(&decoded.payload, &frame));
        // The wire form is `Bytes`'s: its own deserializer reads it alike.
        #[derive(serde::Deserialize)]
        struct Plain {
            _id: u32,
            payload: Bytes,
        }
        let plain: Plain = postcard::from_bytes(&frame).unwrap();
        assert_eq!(plain.payload, decoded.payload);
    }

    #[test]
    fn never_copies_and_without_a_source_it_copies() {
        let frame = frame_of(b"hello");
        assert!(!is_slice_of(
            &decode(&frame, Sharing::Never).payload,
            &frame
        ));
        let copied: Message = postcard::from_bytes(&frame).unwrap();
        assert_eq!(copied.payload, "hello");
        assert!(!is_slice_of(&copied.payload, &frame));
    }

    #[test]
    fn large_shares_only_big_payloads_that_are_most_of_their_frame() {
        let small = frame_of(&[1; 1024]);
        assert!(!is_slice_of(
            &decode(&small, Sharing::Large).payload,
            &small
        ));
        let big = frame_of(&vec![2; LARGE]);
        assert!(is_slice_of(&decode(&big, Sharing::Large).payload, &big));
        // A big payload inside a much bigger frame would keep the rest alive.
        let mut padded = big.to_vec();
        padded.resize(LARGE * 4, 0);
        let quarter = Bytes::from(padded.clone());
        let decoded: Message = with_source(&quarter, Sharing::Large, || {
            postcard::take_from_bytes(&quarter).map(|(m, _)| m)
        })
        .unwrap();
        assert!(
            is_slice_of(&decoded.payload, &quarter),
            "a quarter of its frame"
        );
        padded.resize(LARGE * 5, 0);
        let padded = Bytes::from(padded);
        let decoded: Message = with_source(&padded, Sharing::Large, || {
            postcard::take_from_bytes(&padded).map(|(m, _)| m)
        })
        .unwrap();
        assert_eq!(decoded.payload.len(), LARGE);
        assert!(!is_slice_of(&decoded.payload, &padded));
    }

    #[test]
    fn a_payload_outside_the_named_frame_is_copied_not_a_panic() {
        let named = frame_of(b"other");
        let actual = frame_of(b"hello");
        let decoded: Message =
            with_source(&named, Sharing::Always, || postcard::from_bytes(&actual)).unwrap();
        assert_eq!(decoded.payload, "hello");
        assert!(!is_slice_of(&decoded.payload, &named));
    }

    #[test]
    fn nested_sources_restore_the_outer_one_even_after_a_panic() {
        let outer = frame_of(b"outer");
        let inner = frame_of(b"inner");
        let decoded = with_source(&outer, Sharing::Always, || {
            let inner_decoded = decode(&inner, Sharing::Always);
            assert!(is_slice_of(&inner_decoded.payload, &inner));
            let caught = std::panic::catch_unwind(|| {
                with_source(&inner, Sharing::Never, || panic!("decoder panicked"))
            });
            assert!(caught.is_err());
            postcard::from_bytes::<Message>(&outer).unwrap()
        });
        assert!(is_slice_of(&decoded.payload, &outer));
        // And nothing is left behind afterwards.
        let after: Message = postcard::from_bytes(&outer).unwrap();
        assert!(!is_slice_of(&after.payload, &outer));
    }

    #[test]
    fn shared_bytes_decodes_in_a_tuple_and_truncated_input_is_an_error() {
        let frame = Bytes::from(postcard::to_stdvec(&(5u8, Bytes::from_static(b"xyz"))).unwrap());
        let (n, payload): (u8, SharedBytes) =
            with_source(&frame, Sharing::Always, || postcard::from_bytes(&frame)).unwrap();
        assert_eq!((n, &payload.0[..]), (5, &b"xyz"[..]));
        assert!(is_slice_of(&payload.0, &frame));
        let cut = frame.slice(..frame.len() - 1);
        let result: Result<(u8, SharedBytes), _> =
            with_source(&cut, Sharing::Always, || postcard::from_bytes(&cut));
        assert!(result.is_err());
    }

    #[test]
    fn a_shared_field_keeps_the_fingerprint_of_a_plain_one() {
        mod plain {
            #[derive(serde::Deserialize)]
            pub struct Message {
                pub _id: u32,
                pub _payload: bytes::Bytes,
            }
        }
        mod shared {
            #[derive(serde::Deserialize)]
            pub struct Message {
                pub _id: u32,
                #[serde(deserialize_with = "super::super::deserialize")]
                pub _payload: bytes::Bytes,
            }
        }
        let of = |schema: crate::schema::Schema| (schema.shape, schema.fingerprint);
        assert_eq!(
            of(crate::schema::Schema::of::<shared::Message>()),
            of(crate::schema::Schema::of::<plain::Message>())
        );
        assert_eq!(
            of(crate::schema::Schema::of::<(u8, SharedBytes)>()),
            of(crate::schema::Schema::of::<(u8, Bytes)>())
        );
    }

    #[test]
    fn json_bytes_as_numbers_decode_too() {
        let decoded: SharedBytes = serde_json::from_str("[104, 105]").unwrap();
        assert_eq!(decoded.0, "hi");
    }
}
