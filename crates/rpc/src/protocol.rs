//! RPC frames on a courier-transport connection.
//!
//! | frame kind | id | payload | direction |
//! |---|---|---|---|
//! | `Request` | call id | [`RequestHeader`], then the arguments tuple | client → server |
//! | `Response` | call id | the method's return value | server → client |
//! | `Error` | call id | [`crate::RpcFault`] | server → client |
//! | `Cancel` | call id | empty | client → server |
//! | `StreamItem` | call id | one item | server → client |
//! | `StreamEnd` | call id | empty | server → client |
//! | `Credit` | call id | u32: items the client can take beyond those granted | client → server |
//!
//! A `Request` with the [`ONEWAY`] flag wants no reply: the server runs it
//! inline, in arrival order, before reading the next frame, and answers
//! nothing, not even an error (see [`crate::Client::notify`]).
//!
//! A streaming call carries a non-zero `window` in its header: the server
//! may send that many items, and more only as the client grants credit, so
//! a slow client bounds what the server buffers.
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
//! limit, instead of ending the connection at the peer.

use serde::{Deserialize, Serialize};

/// Flag on a `Request` frame: a one-way call, never answered.
pub const ONEWAY: u8 = 0b0000_0010;

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
/// [`HelloExt`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WelcomeExt {
    /// The largest frame the server accepts.
    pub max_frame_size: u64,
}

/// Decodes an extension that may be followed by fields of later versions
/// (ignored); `None` when there is none or it is unreadable.
pub(crate) fn decode_ext<T: serde::de::DeserializeOwned>(rest: &[u8]) -> Option<T> {
    if rest.is_empty() {
        return None;
    }
    postcard::take_from_bytes::<T>(rest)
        .ok()
        .map(|(ext, _)| ext)
}

/// Saturating conversion for limits sent as u64.
pub(crate) fn limit_from_wire(limit: u64) -> usize {
    usize::try_from(limit).unwrap_or(usize::MAX)
}
