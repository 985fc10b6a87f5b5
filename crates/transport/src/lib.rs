//! # courier-transport
//!
//! Framed connections over every kind of link Courier supports, behind one
//! API. Whatever the address — `tcp://`, `tls://`, `unix://`, `udp://` or `mem://` —
//! [`bind`] gives a [`Listener`], [`connect`] gives a [`Connection`], and a
//! connection sends and receives [`Frame`]s of the
//! [courier-wire](courier_wire) format. Upper layers (messaging, rpc, queues,
//! pub/sub) are written once against this API.
//!
//! | transport | framing | integrity | notes |
//! |---|---|---|---|
//! | `tcp://host:port` | length-prefixed stream | TCP (+ optional CRC32C) | `TCP_NODELAY`, writes coalesced |
//! | `tls://host:port` | the same, inside TLS 1.2/1.3 | authenticated encryption | rustls (ring); optional mutual TLS; see [`tls`] |
//! | `unix:///path` | length-prefixed stream | kernel | stale socket files replaced on bind, removed on drop |
//! | `udp://host:port` | one frame per datagram | CRC32C on every frame | lossy: bad or excess datagrams dropped and counted |
//! | `mem://name` | frames as values in channels | n/a | in-process, no sockets, no copies |
//! | `shm://name` | length-prefixed bytes through shared-memory rings | shared memory (indices checked) | same machine, Linux; see [`shm`] |
//!
//! Stream connections open with an eight-byte preamble (magic and protocol
//! version) from both sides, so a stray client is turned away with a clear
//! error before any frame is read.
//!
//! [`trace`] holds the W3C trace context that every layer above carries in
//! its headers, so one request can be followed from process to process.
//!
//! ## Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! use courier_transport::{bind, connect, Address, Frame, TransportConfig};
//!
//! let config = TransportConfig::default();
//! for address in ["tcp://127.0.0.1:0", "udp://127.0.0.1:0", "mem://doc-example"] {
//!     let mut listener = bind(&address.parse::<Address>()?, &config).await?;
//!     let mut client = connect(listener.local_addr(), &config).await?;
//!     client.send(Frame::data(1, &b"hello"[..])).await?;
//!
//!     let mut server = listener.accept().await?;
//!     let frame = server.recv().await?.expect("a frame");
//!     assert_eq!(&frame.payload[..], b"hello");
//! }
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! - Bad input never panics and never grows memory past one maximum-size
//!   frame per connection; a stream peer that sends garbage gets a
//!   [`RecvError::Decode`] on its connection and no other connection notices.
//! - Every buffer is bounded: the send buffer ([`TransportConfig::send_buffer`]),
//!   in-process channels, UDP peer queues, the accept queue and concurrent
//!   handshakes.
//! - Nothing waits forever when asked not to: connects and handshakes have
//!   timeouts, and [`Heartbeat`]s detect a peer that went silent.
//! - Errors are one enum per operation, each with `is_retryable()` and a
//!   `kind()`: the [`ErrorKind`] every Courier error shares, so callers
//!   match one enum whatever the mechanism.
//!
//! ## Why an enum of links and not a trait object
//!
//! The set of transports is closed and known to this crate, so a
//! [`Connection`] holds an enum of link kinds: no boxing per frame, no
//! `async-trait`, and the compiler sees every case. Byte streams (TCP, Unix,
//! TLS) share one implementation over boxed `AsyncRead`/`AsyncWrite`
//! halves, whose cost is one virtual call per syscall.
//!
//! Dependencies beyond the workspace's usual ones: `memmap2` (mapping the
//! `shm://` rings), `libc` (`sched_getcpu`, pipes and `pwritev2` for the
//! `shm://` waits and doorbells; already in every build through tokio),
//! `rustls`,
//! `tokio-rustls` and `rustls-webpki` (TLS without OpenSSL, with the *ring*
//! provider), and, only with the `dev-certs` feature, `rcgen`.
//!
//! ## Feature flags
//!
//! - `dev-certs` (off by default): `tls::generate_dev_certs`, which writes a
//!   development CA and certificates signed by it (`courier cert generate`,
//!   tests). Without it the crate reads certificates from PEM files only
//!   and does not compile `rcgen`.

#![warn(missing_docs)]

mod address;
mod backoff;
mod config;
mod connection;
mod dial;
mod error;
mod establish;
mod listener;
mod mem;
#[cfg(target_os = "linux")]
pub mod shm;
mod stream;
pub mod tls;
pub mod trace;
mod udp;

pub use address::{Address, AddressError, MAX_MEM_NAME, MAX_UNIX_PATH};
pub use backoff::{connect_with_backoff, Backoff};
pub use config::{Heartbeat, TransportConfig};
pub use connection::{Connection, FrameReceiver, FrameSender};
/// Defined in courier-wire, so crates that need the kinds but no network
/// (the embedded queue and bus) need not build one.
pub use courier_wire::ErrorKind;
pub use courier_wire::{Checksum, Flags, Frame, FrameKind};
pub use error::{AcceptError, BindError, ConnectError, HandshakeError, RecvError, SendError};
pub use listener::{Listener, ListenerStats};
pub use tls::{TlsClient, TlsError, TlsServer};

/// Listens on `address`. Port 0 picks a free port; see [`Listener::local_addr`].
pub async fn bind(address: &Address, config: &TransportConfig) -> Result<Listener, BindError> {
    listener::bind(address, config).await
}

/// Opens a connection to `address`, completing the handshake on stream
/// transports. UDP "connects" without a round trip: a missing peer shows up
/// as an error on a later `recv`, or as silence caught by heartbeats.
pub async fn connect(
    address: &Address,
    config: &TransportConfig,
) -> Result<Connection, ConnectError> {
    dial::connect(address, config).await
}
