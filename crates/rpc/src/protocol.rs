//! RPC frames on a courier-transport connection.
//!
//! | frame kind | id | payload | direction |
//! |---|---|---|---|
//! | `Request` | call id | [`RequestHeader`], then (with [`EXTENDED`]) a [`RequestExt`] as length-prefixed bytes, then the arguments tuple | client → server |
//! | `Response` | call id | the method's return value | server → client |
//! | `Error` | call id | [`crate::RpcFault`] | server → client |
//! | `Cancel` | call id | empty | client → server: stop the call |
//! | `Cancel` | call id | empty | server → client: the handler stopped reading the client's items; send no more |
//! | `StreamItem` | call id | one item | server → client (server and bidirectional streaming) |
//! | `StreamItem` | call id | one item | client → server (client and bidirectional streaming) |
//! | `StreamEnd` | call id | empty | server → client: the handler finished |
//! | `StreamEnd` | call id | empty | client → server: the client finished sending; with [`ABANDONED`], it dropped its sender without finishing |
//! | `Credit` | call id | u32: items the receiver can take beyond those granted | from whichever side receives the items of that call |
//!
//! The frame kinds are the same in both directions: a call's id says which
//! call a frame belongs to, and which way it travels says whose items
//! (or credit) it carries. A server never sends a client items for a call
//! that did not ask for them, and the reverse.
//!
//! A `Request` with the [`ONEWAY`] flag wants no reply: the server runs it
//! inline, in arrival order, before reading the next frame, and answers
//! nothing, not even an error (see [`crate::Client::notify`]).
//!
//! A streaming call carries a non-zero `window` in its header: the server
//! may send that many items, and more only as the client grants credit, so
//! a slow client bounds what the server buffers.
//!
//! A call with client streaming (its [`RequestExt`] says `inbound`) works
//! the same the other way: the client may send as many items as the
//! server announced in its welcome (`inbound_window`), and more only as the
//! server grants credit, so a slow handler bounds what the client sends
//! and what the server buffers (at most the window per stream, and at most
//! `max_streams` streams per connection). A server announces a window only
//! if it supports client streaming: a client never sends such a call to a
//! server that did not, and fails it locally with
//! [`crate::RpcError::NotSupported`] instead.
//!
//! The deadline travels as the time remaining, in milliseconds, not as a
//! clock reading: client and server clocks need not agree.
//!
//! ## Hello extensions
//!
//! The connection opens with the client's `Hello` and the server's `Welcome`
//! (see [`crate::auth`]). Each side may append a [`HelloExt`] (client) or
//! [`WelcomeExt`] (server) after its message, in the same frame:
//!
//! - a server of any version decodes the client's hello and ignores what
//!   follows it, so a client always appends its extension;
//! - a client before extensions refuses trailing bytes after the welcome,
//!   so a server appends its extension only when the client's hello
//!   carried one.
//!
//! Each extension is a postcard struct whose fields are only ever added at
//! the end; a reader decodes the fields it knows and ignores the rest.
//! Today they carry each side's `max_frame_size`, so a request or reply too
//! large for the peer is refused locally, before any I/O, with the peer's
//! limit, instead of ending the connection at the peer. The welcome also
//! carries the server's `features` (bits: [`FEATURE_REQUEST_EXT`],
//! [`FEATURE_TRACE`]) and its `inbound_window` (0: no client streaming),
//! fields a server before them does not send: a client reads what is there
//! and takes the rest as "not supported".
//!
//! ## Request extension
//!
//! A `Request` with the [`EXTENDED`] flag has a [`RequestExt`] after its
//! header, as length-prefixed bytes (so fields can be added to it without
//! moving the arguments). A client sets the flag only when the server's
//! welcome had [`FEATURE_REQUEST_EXT`]: an older server would read the
//! extension as arguments. A request without the flag is laid out as it
//! always was, and every server decodes it.

use serde::{Deserialize, Serialize};

/// Flag on a `Request` frame: a one-way call, never answered.
pub const ONEWAY: u8 = 0b0000_0010;

/// Flag on a `Request` frame: a [`RequestExt`] follows the header.
pub const EXTENDED: u8 = 0b0000_0100;

/// Flag on a client's `StreamEnd`: the client dropped its sender without
/// finishing, so the handler sees an error rather than a clean end.
pub const ABANDONED: u8 = 0b0000_1000;

/// A welcome feature: the server decodes [`EXTENDED`] requests.
pub const FEATURE_REQUEST_EXT: u64 = 1;

/// A welcome feature: the server takes a `traceparent` from the
/// [`RequestExt`] as the parent of the handler's span.
pub const FEATURE_TRACE: u64 = 1 << 1;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHeader<'a> {
    #[serde(borrow)]
    pub service: &'a str,
    #[serde(borrow)]
    pub method: &'a str,
    /// The fingerprint of `method` (not of the whole service), checked
    /// against that method's alone.
    pub fingerprint: u64,
    pub timeout_ms: u64,
    /// Items the server may send before more credit arrives; 0 for a unary call.
    pub window: u32,
}

/// What a client appends to its `Hello`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HelloExt {
    /// The largest frame the client accepts.
    pub max_frame_size: u64,
}

/// What a server appends to its `Welcome` when the client's hello had a
/// [`HelloExt`]. Encoded as its fields in order; read with
/// [`WelcomeExt::decode`], which takes the fields an older server did not
/// send as absent.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WelcomeExt {
    /// The largest frame the server accepts.
    pub max_frame_size: u64,
    /// `FEATURE_*` bits: what the server understands.
    pub features: u64,
    /// Items a client may send ahead on a client-streaming call; 0 when
    /// the server does not support client streaming.
    pub inbound_window: u32,
}

impl WelcomeExt {
    /// The extension after a welcome; `None` when there is none or its
    /// first field is unreadable. Later fields missing (an older server)
    /// read as 0; fields after those known are ignored.
    pub fn decode(rest: &[u8]) -> Option<WelcomeExt> {
        let (max_frame_size, rest) = take::<u64>(rest)?;
        let (features, rest) = take::<u64>(rest).unwrap_or((0, &[]));
        let (inbound_window, _) = take::<u32>(rest).unwrap_or((0, &[]));
        Some(WelcomeExt {
            max_frame_size,
            features,
            inbound_window,
        })
    }
}

/// What follows the header of an [`EXTENDED`] request, as length-prefixed
/// bytes: its fields in order, fields only ever added at the end. A reader
/// takes missing fields as their defaults and ignores unknown ones.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RequestExt<'a> {
    /// The client will send items (client or bidirectional streaming).
    pub inbound: bool,
    /// The call has no deadline (`timeout_ms` is then meaningless): it
    /// lives until either side ends it or the connection closes.
    pub no_deadline: bool,
    /// The caller's W3C `traceparent`, if it had a trace context.
    pub traceparent: Option<&'a str>,
}

impl<'a> RequestExt<'a> {
    /// Reads an extension, tolerating missing and unknown trailing fields.
    /// `None` if a field that is there does not decode.
    pub fn decode(bytes: &'a [u8]) -> Option<RequestExt<'a>> {
        let mut ext = RequestExt::default();
        let Some((inbound, rest)) = take_borrowed::<bool>(bytes) else {
            return bytes.is_empty().then_some(ext);
        };
        ext.inbound = inbound;
        let Some((no_deadline, rest)) = take_borrowed::<bool>(rest) else {
            return rest.is_empty().then_some(ext);
        };
        ext.no_deadline = no_deadline;
        let Some((traceparent, _)) = take_borrowed::<Option<&str>>(rest) else {
            return rest.is_empty().then_some(ext);
        };
        ext.traceparent = traceparent;
        Some(ext)
    }

    /// Whether any field differs from its default: only then is the
    /// extension worth sending.
    pub fn is_needed(&self) -> bool {
        *self != RequestExt::default()
    }
}

/// One postcard value from the front of `bytes`, and what follows it.
fn take<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<(T, &[u8])> {
    if bytes.is_empty() {
        return None;
    }
    postcard::take_from_bytes::<T>(bytes).ok()
}

fn take_borrowed<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Option<(T, &'a [u8])> {
    if bytes.is_empty() {
        return None;
    }
    postcard::take_from_bytes::<T>(bytes).ok()
}

/// Splits a request's payload into its header, its extension (only with
/// [`EXTENDED`]; the default otherwise) and its arguments.
pub(crate) fn split_request(
    payload: &[u8],
    extended: bool,
) -> Result<(RequestHeader<'_>, RequestExt<'_>, &[u8]), String> {
    let (header, rest): (RequestHeader<'_>, &[u8]) =
        postcard::take_from_bytes(payload).map_err(|err| err.to_string())?;
    if !extended {
        return Ok((header, RequestExt::default(), rest));
    }
    let (ext_bytes, args): (&[u8], &[u8]) =
        postcard::take_from_bytes(rest).map_err(|err| format!("request extension: {err}"))?;
    let ext = RequestExt::decode(ext_bytes).ok_or("undecodable request extension")?;
    Ok((header, ext, args))
}

/// Decodes an extension that may be followed by fields of later versions
/// (ignored); `None` when there is none or it is unreadable.
pub(crate) fn decode_ext<T: serde::de::DeserializeOwned>(rest: &[u8]) -> Option<T> {
    take::<T>(rest).map(|(ext, _)| ext)
}

/// Saturating conversion for limits sent as u64.
pub(crate) fn limit_from_wire(limit: u64) -> usize {
    usize::try_from(limit).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_welcome_extension_of_an_older_server_reads_as_no_features() {
        let old = postcard::to_stdvec(&(1_000u64,)).unwrap();
        assert_eq!(
            WelcomeExt::decode(&old),
            Some(WelcomeExt {
                max_frame_size: 1_000,
                features: 0,
                inbound_window: 0
            })
        );
        let new = WelcomeExt {
            max_frame_size: 7,
            features: FEATURE_REQUEST_EXT | FEATURE_TRACE,
            inbound_window: 16,
        };
        let mut bytes = postcard::to_stdvec(&new).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]); // a later version's fields
        assert_eq!(WelcomeExt::decode(&bytes), Some(new));
        assert_eq!(WelcomeExt::decode(&[]), None);
    }

    #[test]
    fn a_request_extension_tolerates_missing_and_unknown_fields() {
        let full = RequestExt {
            inbound: true,
            no_deadline: true,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        };
        let mut bytes = postcard::to_stdvec(&full).unwrap();
        assert_eq!(RequestExt::decode(&bytes), Some(full));
        bytes.push(9); // a later field
        assert_eq!(RequestExt::decode(&bytes), Some(full));
        let first_only = postcard::to_stdvec(&(true,)).unwrap();
        assert_eq!(
            RequestExt::decode(&first_only),
            Some(RequestExt {
                inbound: true,
                ..RequestExt::default()
            })
        );
        assert_eq!(RequestExt::decode(&[]), Some(RequestExt::default()));
        assert_eq!(RequestExt::decode(&[7]), None, "not a bool");
    }

    #[test]
    fn a_request_splits_with_and_without_its_extension() {
        let header = RequestHeader {
            service: "S",
            method: "m",
            fingerprint: 1,
            timeout_ms: 5,
            window: 0,
        };
        let old = postcard::to_stdvec(&(&header, (3u32,))).unwrap();
        let (h, ext, args) = split_request(&old, false).unwrap();
        assert_eq!((h, ext), (header.clone(), RequestExt::default()));
        assert_eq!(postcard::from_bytes::<(u32,)>(args).unwrap(), (3,));
        let ext = RequestExt {
            no_deadline: true,
            ..RequestExt::default()
        };
        let ext_bytes = postcard::to_stdvec(&ext).unwrap();
        let new = postcard::to_stdvec(&(&header, ext_bytes.as_slice(), (3u32,))).unwrap();
        let (h, got, args) = split_request(&new, true).unwrap();
        assert_eq!((h, got), (header, ext));
        assert_eq!(postcard::from_bytes::<(u32,)>(args).unwrap(), (3,));
    }
}
