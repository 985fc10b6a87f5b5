//! # courier-web
//!
//! Browsers on a Courier broker: a WebSocket gateway that gives any
//! WebSocket client (a web page, Node, a test) the pub/sub face of a
//! [`Bus`](courier_pubsub::Bus) — publish, subscribe with wildcards and
//! queue groups, request-reply with a timeout — in JSON text frames, under
//! the same authentication, permissions and counters as the broker's Rust
//! clients. The protocol is
//! [`PROTOCOL.md`](https://example.invalid/courier/crates/web/PROTOCOL.md)
//! (in this crate's folder); the JavaScript client that speaks it is
//! [`COURIER_JS`], served by the gateway at `/courier.js`.
//!
//! - [`Gateway`]: built over a bus with [`GatewayConfig`]'s limits, an
//!   optional [`PubSubAccess`](courier_pubsub::remote::PubSubAccess) (what
//!   each identity may publish, request and subscribe to), an
//!   [`Authenticator`](courier_rpc::Authenticator) for `connect` tokens,
//!   shared [`HostCounters`](courier_pubsub::remote::HostCounters) and
//!   durable subscriptions. [`Gateway::router`] is its axum router;
//!   [`Gateway::serve`] runs it on a TCP listener of its own, plain
//!   (`ws://`) or with TLS (`wss://`, [`tls_config_from_pem`]).
//! - Every connection is bounded: its subscriptions, its requests in
//!   flight, the frames queued for it (by count and bytes), the names and
//!   ids it sends. A browser that does not read loses messages to its
//!   subscriptions' slow-consumer policy (counted, and told once per burst
//!   as a `Busy` error), never the broker's memory.
//! - Requests go out at once, in order with the connection's publishes,
//!   to an inbox of the connection's own (random per connection and per
//!   request, never shown in a `reply` frame); no browser may subscribe to `_inbox` subjects, and a
//!   subscription starting with a wildcard is never given one.
//! - [`GatewayConfig::allowed_origins`] lists the pages' origins that may
//!   connect (HTTP 403 for others; by default any).
//! - [`WebServer::shutdown`] closes that listener's connections with 1001
//!   (the gateway's other listeners go on).
//!
//! The courier-broker crate starts a gateway for every `ws://` or `wss://`
//! listen address (`courier serve --listen ws://127.0.0.1:7880`).
//!
//! ## Example
//!
//! A gateway on a free port over an in-process bus; a WebSocket client
//! subscribes, and a message published on the bus reaches it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use courier_pubsub::Bus;
//! use courier_web::{Gateway, GatewayConfig};
//! use futures_util::{SinkExt, StreamExt};
//! use tokio_tungstenite::tungstenite::Message;
//!
//! let bus = Bus::new();
//! let gateway = Gateway::new(bus.clone(), GatewayConfig::default());
//! let server = gateway.bind("127.0.0.1:0", None).await?;
//!
//! let (mut ws, _) = tokio_tungstenite::connect_async(server.url()).await?;
//! ws.send(Message::text(r#"{"op":"connect","name":"doc"}"#)).await?;
//! ws.send(Message::text(r#"{"op":"sub","id":1,"sid":"a","subject":"orders.>"}"#)).await?;
//! let mut frames = Vec::new();
//! while frames.len() < 2 {
//!     if let Some(Message::Text(text)) = ws.next().await.transpose()? {
//!         frames.push(serde_json::from_str::<serde_json::Value>(&text)?);
//!     }
//! }
//! assert_eq!(frames[0]["op"], "connected");
//! assert_eq!(frames[1]["op"], "ok");
//!
//! bus.publish("orders.eu.created", "tea").await?;
//! let msg = loop {
//!     if let Some(Message::Text(text)) = ws.next().await.transpose()? {
//!         break serde_json::from_str::<serde_json::Value>(&text)?;
//!     }
//! };
//! assert_eq!(msg["op"], "msg");
//! assert_eq!(msg["sid"], "a");
//! assert_eq!(msg["data"], "tea");
//!
//! server.shutdown(std::time::Duration::from_secs(1)).await;
//! # Ok(()) }
//! ```
//!
//! Dependencies beyond the workspace's usual ones: axum (HTTP routes and
//! the WebSocket upgrade) on hyper and hyper-util (the gateway's own
//! listener, so TLS and handshake timeouts are its own), tower-service,
//! futures-util (splitting the socket), base64 (`data64`), serde_json, and
//! tokio-tungstenite (axum's own WebSocket crate, named only to recognise
//! its "frame too large" error).

#![warn(missing_docs)]

mod config;
mod conn;
mod frames;
mod gateway;

pub use config::{
    frame_limit_for, GatewayConfig, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HANDSHAKES,
    DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_REQUESTS_IN_FLIGHT, DEFAULT_MAX_SUBSCRIPTIONS,
    DEFAULT_OUTBOUND_BYTES, DEFAULT_OUTBOUND_MESSAGES, DEFAULT_SUBSCRIPTION_BUFFER, MAX_NAME_LEN,
};
pub use gateway::{tls_config, tls_config_from_pem, Gateway, WebError, WebServer};

/// The JavaScript client module, as the broker serves it at `/courier.js`.
pub const COURIER_JS: &str = include_str!("../js/courier.js");
