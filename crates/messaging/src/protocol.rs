//! The frames nodes exchange, on top of courier-wire frames.
//!
//! | frame kind | id | payload |
//! |---|---|---|
//! | `Hello` | 0 | [`Hello`] |
//! | `Data` | sequence number (0 when unreliable) | varint low-water mark, [`DataHeader`], body |
//! | `Ack` | sequence number | empty |
//! | `Request` | request id | [`RequestHeader`], body |
//! | `Response` | request id | body |
//! | `Error` | sequence number or request id | [`Rejection`] |
//!
//! Bodies are the postcard encoding of the user's message type; headers
//! carry the schema fingerprint of that type, checked by the receiver
//! before it decodes anything.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Flag on an `Error` frame: it refuses a request, not a data message.
pub(crate) const ABOUT_REQUEST: u8 = 0b0000_0010;

/// Sent by both sides when a connection opens.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub node: u128,
    /// Random per process start: tells a restarted peer from the old one.
    pub incarnation: u64,
}

/// Addressing and checks for one data message.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct DataHeader<'a> {
    #[serde(borrow)]
    pub endpoint: &'a str,
    pub fingerprint: u64,
    /// Acknowledge this message (at-least-once).
    pub reliable: bool,
    /// De-duplicate it at the receiver (effectively-once).
    pub dedup: bool,
}

/// Addressing and checks for one request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHeader<'a> {
    #[serde(borrow)]
    pub endpoint: &'a str,
    pub fingerprint: u64,
    pub reply_fingerprint: u64,
}

/// Why a receiver refused a message or request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// No mailbox or responder of that name on the receiving node.
    NoSuchEndpoint {
        /// The name asked for.
        endpoint: String,
    },
    /// The endpoint exists but was built for another message type.
    SchemaMismatch {
        /// The name asked for.
        endpoint: String,
        /// The type the endpoint expects, as the receiver names it.
        expected_type: String,
    },
    /// The connection claimed the receiver's own node id.
    DuplicateNodeId,
    /// The receiver could not decode what it was sent.
    Malformed {
        /// What failed.
        reason: String,
    },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::NoSuchEndpoint { endpoint } => write!(f, "no endpoint named {endpoint:?}"),
            Rejection::SchemaMismatch {
                endpoint,
                expected_type,
            } => {
                write!(f, "endpoint {endpoint:?} expects a different version of the message type (its type is {expected_type})")
            }
            Rejection::DuplicateNodeId => write!(f, "the peer claims this node's own id"),
            Rejection::Malformed { reason } => write!(f, "malformed message: {reason}"),
        }
    }
}

/// `varint(low_water) ++ rest`: the low-water mark changes per transmission,
/// the rest is stored once in the outbox.
pub(crate) fn data_payload(low_water: u64, rest: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(10 + rest.len());
    let mut n = low_water;
    while n >= 0x80 {
        buf.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    buf.put_u8(n as u8);
    buf.put_slice(rest);
    buf.freeze()
}

/// Header and body of a data message, encoded once for the outbox.
pub(crate) fn data_rest<T: Serialize>(
    header: &DataHeader<'_>,
    body: &T,
) -> Result<Bytes, postcard::Error> {
    Ok(Bytes::from(postcard::to_stdvec(&(header, body))?))
}

/// Splits a data payload into low-water mark, header and body bytes.
pub(crate) fn parse_data(payload: &[u8]) -> Result<(u64, DataHeader<'_>, &[u8]), postcard::Error> {
    let (low_water, rest): (u64, &[u8]) = postcard::take_from_bytes(payload)?;
    let (header, body): (DataHeader<'_>, &[u8]) = postcard::take_from_bytes(rest)?;
    Ok((low_water, header, body))
}

/// Splits a request payload into header and body bytes.
pub(crate) fn parse_request(payload: &[u8]) -> Result<(RequestHeader<'_>, &[u8]), postcard::Error> {
    postcard::take_from_bytes(payload)
}

/// Decodes a whole body, refusing trailing bytes.
pub(crate) fn decode_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<T, postcard::Error> {
    let (value, rest) = postcard::take_from_bytes(body)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(postcard::Error::DeserializeBadEncoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_payloads_round_trip() {
        let header = DataHeader {
            endpoint: "orders",
            fingerprint: 42,
            reliable: true,
            dedup: false,
        };
        let rest = data_rest(&header, &("body", 7u32)).unwrap();
        for low_water in [0, 1, 127, 128, 300, u64::MAX] {
            let payload = data_payload(low_water, &rest);
            let (lw, parsed, body) = parse_data(&payload).unwrap();
            assert_eq!((lw, &parsed), (low_water, &header));
            assert_eq!(
                decode_body::<(String, u32)>(body).unwrap(),
                ("body".to_string(), 7)
            );
        }
        assert!(parse_data(&[0xFF; 3]).is_err());
    }
}
