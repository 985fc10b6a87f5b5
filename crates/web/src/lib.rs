//! # courier-web
//!
//! Browsers on a Courier broker (work in progress; see `PROTOCOL.md`).

/// The JavaScript client module, as the broker serves it at `/courier.js`.
pub const COURIER_JS: &str = include_str!("../js/courier.js");
