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
//! A streaming call carries a non-zero `window` in its header: the server
//! may send that many items, and more only as the client grants credit, so
//! a slow client bounds what the server buffers.
//!
//! The deadline travels as the time remaining, in milliseconds, not as a
//! clock reading: client and server clocks need not agree.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHeader<'a> {
    #[serde(borrow)]
    pub service: &'a str,
    #[serde(borrow)]
    pub method: &'a str,
    pub fingerprint: u64,
    pub timeout_ms: u64,
    /// Items the server may send before more credit arrives; 0 for a unary call.
    pub window: u32,
}
