//! The JSON frames of PROTOCOL.md: what a browser sends (parsed leniently:
//! unknown fields are ignored) and what the gateway sends back.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use courier_pubsub::{Headers, Message};
use courier_wire::ErrorKind;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::MAX_NAME_LEN;

/// A frame from the browser. Every field but `op` is optional here; each
/// operation checks the ones it needs. Deserialized straight from the text
/// (unknown fields are skipped without being built, so a deeply nested
/// one costs no memory; serde_json's recursion limit ends a nesting bomb).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Inbound {
    pub op: String,
    #[serde(default)]
    pub id: RawId,
    pub token: Option<String>,
    pub name: Option<String>,
    pub sid: Option<String>,
    pub subject: Option<String>,
    pub queue: Option<String>,
    pub data: Option<String>,
    pub data64: Option<String>,
    pub reply: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub timeout_ms: Option<u64>,
}

/// An operation's `id`: a short string or an integer, echoed as given.
pub(crate) type Id = Value;

/// A frame the browser's request could not be taken as, and why.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorKind::InvalidInput, message)
    }
}

/// An `id` as sent: absent (or null), usable, or not (any other JSON
/// value, skipped without being built).
#[derive(Debug, Default)]
pub(crate) enum RawId {
    #[default]
    Absent,
    Valid(Id),
    Invalid,
}

impl<'de> Deserialize<'de> for RawId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<RawId, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawId;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an integer")
            }
            fn visit_unit<E>(self) -> Result<RawId, E> {
                Ok(RawId::Absent)
            }
            fn visit_none<E>(self) -> Result<RawId, E> {
                Ok(RawId::Absent)
            }
            fn visit_str<E>(self, s: &str) -> Result<RawId, E> {
                Ok(if s.len() <= MAX_NAME_LEN {
                    RawId::Valid(Value::String(s.to_string()))
                } else {
                    RawId::Invalid
                })
            }
            fn visit_i64<E>(self, n: i64) -> Result<RawId, E> {
                Ok(RawId::Valid(Value::from(n)))
            }
            fn visit_u64<E>(self, n: u64) -> Result<RawId, E> {
                Ok(RawId::Valid(Value::from(n)))
            }
            fn visit_f64<E>(self, _: f64) -> Result<RawId, E> {
                Ok(RawId::Invalid)
            }
            fn visit_bool<E>(self, _: bool) -> Result<RawId, E> {
                Ok(RawId::Invalid)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawId, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(RawId::Invalid)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawId, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(RawId::Invalid)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Only the `id` of a frame that is otherwise wrong, so its error can
/// carry it (every other field is skipped, whatever its type).
#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: RawId,
}

/// Parses a text frame: its `id` (kept even when the rest is wrong, so the
/// error can carry it) and the frame.
pub(crate) fn parse(text: &str) -> (Option<Id>, Result<Inbound, Refusal>) {
    let bad_id = || {
        Refusal::invalid(format!(
            "id: a string of at most {MAX_NAME_LEN} bytes or an integer"
        ))
    };
    match serde_json::from_str::<Inbound>(text) {
        Ok(mut frame) => match std::mem::take(&mut frame.id) {
            RawId::Absent => (None, Ok(frame)),
            RawId::Valid(id) => (Some(id), Ok(frame)),
            RawId::Invalid => (None, Err(bad_id())),
        },
        Err(err) => {
            // Leniently, for the error's sake: a frame whose only fault is
            // a field of the wrong type (or a lone surrogate in a string
            // skipped here) still has its id read.
            let id = match serde_json::from_str::<IdOnly>(text) {
                Ok(IdOnly {
                    id: RawId::Valid(id),
                }) => Some(id),
                Ok(IdOnly { id: RawId::Invalid }) => return (None, Err(bad_id())),
                _ => None,
            };
            let message = if err.is_data() {
                format!("bad frame: {err}")
            } else {
                format!("not a JSON object: {err}")
            };
            (id, Err(Refusal::invalid(message)))
        }
    }
}

/// The payload of a `pub` or `req`: `data` (text) or `data64` (base64).
pub(crate) fn payload(frame: &Inbound, max: usize) -> Result<Bytes, Refusal> {
    let bytes = match (&frame.data, &frame.data64) {
        (Some(_), Some(_)) => return Err(Refusal::invalid("both data and data64")),
        (Some(text), None) => Bytes::from(text.clone()),
        (None, Some(encoded)) => {
            // Checked before decoding, so no large buffer is made for it.
            if encoded.len() / 4 * 3 > max.saturating_add(3) {
                return Err(too_large(encoded.len() / 4 * 3, max));
            }
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map(Bytes::from)
                .map_err(|err| Refusal::invalid(format!("data64: {err}")))?
        }
        (None, None) => Bytes::new(),
    };
    if bytes.len() > max {
        return Err(too_large(bytes.len(), max));
    }
    Ok(bytes)
}

fn too_large(len: usize, max: usize) -> Refusal {
    Refusal::new(
        ErrorKind::LimitExceeded,
        format!("payload of {len} bytes is over max_payload ({max})"),
    )
}

/// The `headers` object as Headers, within their bounds.
pub(crate) fn headers(frame: &Inbound) -> Result<Headers, Refusal> {
    let mut headers = Headers::new();
    for (name, value) in frame.headers.iter().flatten() {
        headers.insert(name.clone(), value.clone()).map_err(|err| {
            let kind = match err {
                courier_pubsub::HeaderError::TooMany | courier_pubsub::HeaderError::TooLarge => {
                    ErrorKind::LimitExceeded
                }
                _ => ErrorKind::InvalidInput,
            };
            Refusal::new(kind, err.to_string())
        })?;
    }
    Ok(headers)
}

/// The name PROTOCOL.md gives a kind.
pub(crate) fn kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Unavailable => "Unavailable",
        ErrorKind::Busy => "Busy",
        ErrorKind::TimedOut => "TimedOut",
        ErrorKind::Refused => "Refused",
        ErrorKind::NotFound => "NotFound",
        ErrorKind::InvalidInput => "InvalidInput",
        ErrorKind::LimitExceeded => "LimitExceeded",
        ErrorKind::Conflict => "Conflict",
        ErrorKind::Unsupported => "Unsupported",
        _ => "Internal",
    }
}

/// A frame to the browser.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(crate) enum Outbound<'a> {
    Connected {
        server: &'a str,
        identity: Option<&'a str>,
        max_payload: usize,
    },
    Ok {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Id>,
    },
    Msg {
        sid: &'a str,
        subject: &'a str,
        #[serde(flatten)]
        body: Body<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reply: Option<&'a str>,
    },
    /// No subject: the reply's is the connection's inbox, which no other
    /// browser may learn.
    Reply {
        id: &'a Id,
        #[serde(flatten)]
        body: Body<'a>,
    },
    Error {
        kind: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Id>,
        #[serde(skip_serializing_if = "Option::is_none")]
        sid: Option<&'a str>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Id>,
    },
}

/// A message's payload and headers, as `msg` and `reply` carry them.
///
/// The payload goes as `data` when it is UTF-8 and its JSON escaping is no
/// longer than base64 would be (control characters escape to six bytes
/// each, so such text goes as `data64`, at most 4/3 of the payload).
/// Nothing is encoded until the frame is serialized, so a frame's size can
/// be known (and its room reserved) before it is built.
#[derive(Debug)]
pub(crate) struct Body<'a> {
    payload: Payload<'a>,
    headers: &'a Headers,
    /// The JSON text of the payload and headers fields, at most.
    len: usize,
}

#[derive(Debug)]
enum Payload<'a> {
    Text(&'a str),
    Base64(&'a [u8]),
}

impl<'a> Body<'a> {
    pub fn of(message: &'a Message) -> Body<'a> {
        let bytes = &message.payload[..];
        let base64 = base64_len(bytes.len());
        let (payload, payload_len) = match std::str::from_utf8(bytes) {
            Ok(text) => {
                let escaped = json_len(text);
                // Quotes apart, as base64's are.
                if escaped - 2 <= base64 {
                    (Payload::Text(text), escaped)
                } else {
                    (Payload::Base64(bytes), base64 + 2)
                }
            }
            Err(_) => (Payload::Base64(bytes), base64 + 2),
        };
        let headers_len = if message.headers.is_empty() {
            0
        } else {
            // `,"headers":{` and `}`, then `"k":"v",` for each.
            14 + message
                .headers
                .iter()
                .map(|(k, v)| json_len(k) + json_len(v) + 2)
                .sum::<usize>()
        };
        Body {
            payload,
            headers: &message.headers,
            // `,"data64":` and the value's quotes (counted above).
            len: 10 + payload_len + headers_len,
        }
    }

    /// The most JSON text these fields take.
    pub fn len(&self) -> usize {
        self.len
    }
}

impl Serialize for Body<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        match self.payload {
            Payload::Text(text) => map.serialize_entry("data", text)?,
            Payload::Base64(bytes) => map.serialize_entry("data64", &Base64(bytes))?,
        }
        if !self.headers.is_empty() {
            let headers: BTreeMap<&str, &str> = self.headers.iter().collect();
            map.serialize_entry("headers", &headers)?;
        }
        map.end()
    }
}

/// Bytes serialized as a base64 string, encoded straight into the output.
struct Base64<'a>(&'a [u8]);

impl Serialize for Base64<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&base64::display::Base64Display::new(
            self.0,
            &base64::engine::general_purpose::STANDARD,
        ))
    }
}

/// The length of base64 (padded) for `n` bytes.
pub(crate) fn base64_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

/// The length of `text` as a JSON string, quotes included, as serde_json
/// writes it: `"` and `\` and the short control escapes take two bytes,
/// other control characters six (`\u00XX`), everything else itself.
pub(crate) fn json_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

impl Outbound<'_> {
    /// As JSON text. Serializing these types cannot fail (string keys,
    /// no maps with other keys, no floats).
    pub fn text(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"op":"error","kind":"Internal","message":"unencodable frame"}"#.to_string()
        })
    }
}

/// An `error` frame.
pub(crate) fn error(refusal: &Refusal, id: Option<&Id>, sid: Option<&str>) -> String {
    Outbound::Error {
        kind: kind_name(refusal.kind),
        message: &refusal.message,
        id,
        sid,
    }
    .text()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_a_bad_frame_and_unknown_fields_are_ignored() {
        let (id, frame) = parse(r#"{"op":"sub","id":7,"sid":3}"#);
        assert_eq!(id, Some(Value::from(7)));
        assert!(frame.is_err());
        let (id, frame) = parse(r#"{"op":"ping","id":"a","future":{"x":1}}"#);
        assert_eq!(id, Some(Value::from("a")));
        assert_eq!(frame.unwrap().op, "ping");
        let (id, frame) = parse(&format!(r#"{{"op":"ping","id":"{}"}}"#, "x".repeat(65)));
        assert!(id.is_none() && frame.is_err());
        assert!(parse("[1]").1.is_err());
    }

    #[test]
    fn payloads_are_text_or_base64_within_the_limit() {
        let frame = |data: Option<&str>, data64: Option<&str>| Inbound {
            data: data.map(Into::into),
            data64: data64.map(Into::into),
            ..Inbound::default()
        };
        assert_eq!(payload(&frame(Some("hi"), None), 8).unwrap(), "hi");
        assert_eq!(
            payload(&frame(None, Some("AAEC")), 8).unwrap()[..],
            [0, 1, 2]
        );
        assert_eq!(payload(&frame(None, None), 8).unwrap().len(), 0);
        let err = payload(&frame(Some("123456789"), None), 8).unwrap_err();
        assert_eq!(err.kind, ErrorKind::LimitExceeded);
        let err = payload(&frame(None, Some(&"A".repeat(400))), 8).unwrap_err();
        assert_eq!(err.kind, ErrorKind::LimitExceeded);
        let err = payload(&frame(None, Some("!!")), 8).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        let err = payload(&frame(Some("a"), Some("YQ==")), 8).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn messages_carry_text_or_base64_and_headers() {
        let mut headers = Headers::new();
        headers.insert("k", "v").unwrap();
        let message = Message {
            subject: courier_pubsub::Subject::new("a.b").unwrap(),
            payload: Bytes::from_static(&[0xff, 0]),
            publisher: 1,
            seq: 0,
            reply_to: None,
            headers,
        };
        let text = Outbound::Msg {
            sid: "s",
            subject: "a.b",
            body: Body::of(&message),
            reply: Some("_inbox.1"),
        }
        .text();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["op"], "msg");
        assert_eq!(value["data64"], "/wA=");
        assert!(value.get("data").is_none());
        assert_eq!(value["headers"]["k"], "v");
        assert_eq!(value["reply"], "_inbox.1");
    }

    #[test]
    fn a_body_is_never_longer_than_its_estimate_and_escapes_go_as_base64() {
        let mut headers = Headers::new();
        headers.insert("quote", r#"say "hi" \ back"#).unwrap();
        let payloads: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"tea".to_vec(),
            "caf\u{e9} \u{1f375}".as_bytes().to_vec(),
            b"\"\\\"\\".repeat(100),
            vec![1u8; 1000],
            vec![0xff, 0, 1, 2],
            b"line\nline\ttab\r".repeat(50),
        ];
        for payload in payloads {
            for headers in [Headers::new(), headers.clone()] {
                let message = Message {
                    subject: courier_pubsub::Subject::new("a.b").unwrap(),
                    payload: Bytes::from(payload.clone()),
                    publisher: 1,
                    seq: 0,
                    reply_to: None,
                    headers,
                };
                let body = Body::of(&message);
                let estimate = body.len();
                let id = Value::from("i".repeat(MAX_NAME_LEN));
                let text = Outbound::Reply { id: &id, body }.text();
                // The gateway reserves 96 bytes for the rest of a reply.
                assert!(text.len() <= 96 + estimate, "{text}");
                // Never more than base64's 4/3 for the payload.
                assert!(
                    estimate <= 16 + base64_len(payload.len()) + 4096 * 2,
                    "{text}"
                );
            }
        }
        let control = Message {
            subject: courier_pubsub::Subject::new("a.b").unwrap(),
            payload: Bytes::from(vec![1u8; 30]),
            publisher: 1,
            seq: 0,
            reply_to: None,
            headers: Headers::new(),
        };
        let id = Value::from(1);
        let text = Outbound::Reply {
            id: &id,
            body: Body::of(&control),
        }
        .text();
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["data64"], "AQEB".repeat(10));
        assert!(value.get("data").is_none());
    }
}
