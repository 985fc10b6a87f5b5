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
/// operation checks the ones it needs.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Inbound {
    pub op: String,
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

/// Parses a text frame: its `id` (kept even when the rest is wrong, so the
/// error can carry it) and the frame.
pub(crate) fn parse(text: &str) -> (Option<Id>, Result<Inbound, Refusal>) {
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(err) => return (None, Err(Refusal::invalid(format!("not JSON: {err}")))),
    };
    let Value::Object(mut object) = value else {
        return (None, Err(Refusal::invalid("a frame is a JSON object")));
    };
    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= MAX_NAME_LEN => Some(Value::String(s)),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Some(Value::Number(n)),
        Some(_) => {
            return (
                None,
                Err(Refusal::invalid(format!(
                    "id: a string of at most {MAX_NAME_LEN} bytes or an integer"
                ))),
            )
        }
    };
    let frame = serde_json::from_value::<Inbound>(Value::Object(object))
        .map_err(|err| Refusal::invalid(format!("bad frame: {err}")));
    (id, frame)
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
    Reply {
        id: &'a Id,
        subject: &'a str,
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
#[derive(Debug, Serialize)]
pub(crate) struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<BTreeMap<&'a str, &'a str>>,
}

impl<'a> Body<'a> {
    pub fn of(message: &'a Message) -> Body<'a> {
        let (data, data64) = match std::str::from_utf8(&message.payload) {
            Ok(text) => (Some(text), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&message.payload)),
            ),
        };
        let headers = (!message.headers.is_empty()).then(|| message.headers.iter().collect());
        Body {
            data,
            data64,
            headers,
        }
    }
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
}
