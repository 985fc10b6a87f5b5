//! Every limit and timeout of the transport layer, in one place.

use std::time::Duration;

use courier_wire::{Checksum, FrameCodec, DEFAULT_MAX_FRAME_SIZE};

/// Liveness checking for a connection.
///
/// When set, the sending half sends a `Ping` after `interval` without
/// sending anything else, and the receiving half fails with
/// [`crate::RecvError::PeerSilent`] when nothing at all (data, ping or pong)
/// has arrived for `timeout`. Every connection answers pings with pongs
/// whether or not it has heartbeats configured itself, so one side can watch
/// the other alone — as long as the other side is calling `recv`: a peer that
/// never reads is, rightly, indistinguishable from a frozen one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// Idle time after which a ping is sent.
    pub interval: Duration,
    /// Silence after which the peer is declared dead. Should be several intervals.
    pub timeout: Duration,
}

impl Heartbeat {
    /// Pings every `interval`, declares the peer dead after three intervals of silence.
    pub fn every(interval: Duration) -> Heartbeat {
        Heartbeat {
            interval,
            timeout: interval * 3,
        }
    }
}

/// Limits and timeouts for listeners and connections.
///
/// `Default` gives values suited to a LAN service; every field can be
/// changed:
///
/// ```
/// use std::time::Duration;
/// use courier_transport::{Heartbeat, TransportConfig};
/// let mut config = TransportConfig::default();
/// config.max_frame_size = 64 * 1024;
/// config.heartbeat = Some(Heartbeat::every(Duration::from_secs(5)));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TransportConfig {
    /// Largest frame sent or accepted (bytes after the length prefix).
    /// Default 4 MiB. Both sides enforce it: an oversized frame is refused
    /// before any I/O on send, and ends the connection on receive.
    pub max_frame_size: usize,
    /// CRC32C on stream connections. Default off: TCP and Unix sockets have
    /// their own checks. UDP always uses CRC32C, whatever this says.
    pub stream_checksum: Checksum,
    /// How long `connect` may take to establish a socket. Default 10 s.
    pub connect_timeout: Duration,
    /// How long the preamble exchange may take on either side. Default 5 s.
    /// A client that opens a socket and says nothing is dropped after this.
    pub handshake_timeout: Duration,
    /// Optional liveness checking. Default none.
    pub heartbeat: Option<Heartbeat>,
    /// Bytes of encoded frames a stream connection buffers before senders
    /// wait for the socket. Default 256 KiB. It also bounds what a peer
    /// that does not read can make us queue for it: pongs (and our own
    /// pings) that find the buffer this full are not sent at all.
    pub send_buffer: usize,
    /// How long a stream connection keeps writing what is still queued
    /// after its last [`crate::FrameSender`] is dropped; what the peer has
    /// not taken by then is discarded and the socket closed. Default 5 s.
    pub linger: Duration,
    /// Sends an in-process (`mem://`) connection buffers per direction, each
    /// one frame, or a batch of up to 64 frames that were `feed`-ed.
    /// Default 1024.
    pub mem_capacity: usize,
    /// Largest UDP datagram sent or accepted. Default 65,507 (the IPv4
    /// maximum); lower it to the path MTU (e.g. 1,472) to avoid IP fragmentation.
    pub max_datagram_size: usize,
    /// Datagrams buffered per UDP peer before further ones are dropped (and
    /// counted). Default 1024.
    pub udp_peer_queue: usize,
    /// Peers a UDP listener tracks at once; datagrams from further peers are
    /// dropped (and counted). Default 1024.
    pub max_udp_peers: usize,
    /// Connections that finished their handshake and wait for `accept`.
    /// Default 128. When full, the listener stops accepting (the kernel's
    /// backlog holds further clients).
    pub accept_queue: usize,
    /// Handshakes a listener runs at once. Default 256. Bounds the cost of
    /// clients that connect and stall: when full, the oldest handshake is
    /// dropped for the new one, so stallers cannot starve real clients.
    pub max_pending_handshakes: usize,
    /// Certificate and key for `tls://` listeners. Default none (binding a
    /// `tls://` address then fails).
    pub tls_server: Option<crate::TlsServer>,
    /// Bytes of each `shm://` ring (one per direction), a power of two.
    /// Default 1 MiB. Frames larger than a ring pass through it in pieces.
    pub shm_ring_size: usize,
    /// How long an `shm://` side keeps looking at its ring, when it finds
    /// nothing to do, before it sleeps until the peer rings — and only
    /// while the peer runs on another CPU (one on the same CPU is never
    /// waited for: the side sleeps at once so the peer can run). The spin
    /// is cooperative: between looks the task returns `Pending` and lets
    /// the runtime's other tasks, I/O and timers run first, so it never
    /// holds a thread, even on a current-thread runtime. Default 20 µs:
    /// long enough to catch a reply from a busy peer on another CPU, short
    /// enough that an idle connection costs nothing. Zero never spins.
    pub shm_spin: Duration,
    /// Trusted CAs (and an identity, for mutual TLS) for `tls://`
    /// connections. Default none (connecting to `tls://` then fails: there
    /// is no fallback to plain text).
    pub tls_client: Option<crate::TlsClient>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            stream_checksum: Checksum::Off,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            heartbeat: None,
            send_buffer: 256 * 1024,
            linger: Duration::from_secs(5),
            mem_capacity: 1024,
            max_datagram_size: 65_507,
            udp_peer_queue: 1024,
            max_udp_peers: 1024,
            accept_queue: 128,
            max_pending_handshakes: 256,
            tls_server: None,
            tls_client: None,
            shm_ring_size: 1 << 20,
            shm_spin: Duration::from_micros(20),
        }
    }
}

impl TransportConfig {
    /// The same configuration with heartbeats.
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> TransportConfig {
        self.heartbeat = Some(heartbeat);
        self
    }

    /// The same configuration serving `tls://` with `server`.
    pub fn with_tls_server(mut self, server: crate::TlsServer) -> TransportConfig {
        self.tls_server = Some(server);
        self
    }

    /// The same configuration connecting to `tls://` with `client`.
    pub fn with_tls_client(mut self, client: crate::TlsClient) -> TransportConfig {
        self.tls_client = Some(client);
        self
    }

    /// The same configuration with another frame size limit.
    pub fn with_max_frame_size(mut self, limit: usize) -> TransportConfig {
        self.max_frame_size = limit;
        self
    }

    pub(crate) fn stream_codec(&self) -> FrameCodec {
        FrameCodec::new()
            .max_frame_size(self.max_frame_size)
            .checksum(self.stream_checksum)
    }

    pub(crate) fn datagram_codec(&self) -> FrameCodec {
        let limit = self.max_frame_size.min(
            self.max_datagram_size
                .saturating_sub(courier_wire::LENGTH_PREFIX_LEN),
        );
        FrameCodec::new()
            .max_frame_size(limit)
            .checksum(Checksum::Crc32c)
    }
}
