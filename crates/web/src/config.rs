//! The gateway's limits and timeouts.

use std::time::Duration;

/// Default [`GatewayConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default [`GatewayConfig::max_handshakes`].
pub const DEFAULT_MAX_HANDSHAKES: usize = 1_024;
/// Default [`GatewayConfig::max_payload`]: 1 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// Default [`GatewayConfig::max_subscriptions`].
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 256;
/// Default [`GatewayConfig::max_requests_in_flight`].
pub const DEFAULT_MAX_REQUESTS_IN_FLIGHT: usize = 64;
/// Default [`GatewayConfig::outbound_messages`].
pub const DEFAULT_OUTBOUND_MESSAGES: usize = 256;
/// Default [`GatewayConfig::outbound_bytes`]: 4 MiB.
pub const DEFAULT_OUTBOUND_BYTES: usize = 4 << 20;
/// Default [`GatewayConfig::subscription_buffer`].
pub const DEFAULT_SUBSCRIPTION_BUFFER: usize = 256;
/// The longest any timeout is taken to be (longer ones, up to
/// `Duration::MAX`, mean "never" and are cut to this, so that no deadline
/// overflows a clock): a year.
pub(crate) const LONGEST_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest `sid`, `id` (as a string) or connection `name`, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// The frame limit for a payload limit: base64 makes a payload 4/3 as
/// large, and a client is expected to send text as `data` only while JSON
/// escaping at most doubles it (courier.js sends `data64` past that: text
/// of control characters escapes to six times its size); so twice the
/// payload, plus room for the subject, headers and the rest of the object.
pub fn frame_limit_for(max_payload: usize) -> usize {
    max_payload.saturating_mul(2).saturating_add(64 << 10)
}

/// What a [`Gateway`](crate::Gateway) allows each browser, and how long it
/// waits. Every bound is on something a client could otherwise make grow.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// WebSocket connections open at once; one more is answered with a
    /// `Busy` error and closed with 1013 (try again later). Default
    /// [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// TCP connections accepted by [`Gateway::serve`](crate::Gateway::serve)
    /// that are not yet WebSockets (in their TLS or HTTP handshake); more
    /// are closed at once. Each may stay at most `connect_timeout +
    /// write_timeout` before it upgrades (an HTTP client keeping its
    /// connection alive after fetching `/courier.js` is closed then).
    /// Default [`DEFAULT_MAX_HANDSHAKES`].
    pub max_handshakes: usize,
    /// Largest payload a browser may publish or request with (decoded
    /// bytes); announced in `connected`. Default [`DEFAULT_MAX_PAYLOAD`].
    pub max_payload: usize,
    /// Largest WebSocket message (and frame) read from a browser; past it
    /// the connection is closed with 1009. Default
    /// [`frame_limit_for`]`(max_payload)`.
    pub max_frame: usize,
    /// Subscriptions open at once per connection. Default
    /// [`DEFAULT_MAX_SUBSCRIPTIONS`].
    pub max_subscriptions: usize,
    /// Requests awaiting their reply per connection; more are `Busy`.
    /// Default [`DEFAULT_MAX_REQUESTS_IN_FLIGHT`].
    pub max_requests_in_flight: usize,
    /// How long each step of connecting may take: the TLS handshake, the
    /// HTTP upgrade request, and the `connect` frame. Default 5 s.
    pub connect_timeout: Duration,
    /// A connection with nothing to read for this long is closed (1001).
    /// Default `None`: idle connections stay open.
    pub idle_timeout: Option<Duration>,
    /// A write to a browser that does not complete within this closes the
    /// connection (it has stopped reading altogether). Default 30 s.
    pub write_timeout: Duration,
    /// A request's `timeout_ms` when it has none. Default 5 s.
    pub default_request_timeout: Duration,
    /// The longest `timeout_ms` honoured (longer ones are cut to this).
    /// Default 60 s.
    pub max_request_timeout: Duration,
    /// Frames queued for a connection's writer, by count: answers wait for
    /// room (so a client that sends but does not read is slowed down), and
    /// subscriptions stop taking messages from the bus, whose
    /// slow-consumer policy then drops them. Default
    /// [`DEFAULT_OUTBOUND_MESSAGES`].
    pub outbound_messages: usize,
    /// The same bound, in bytes of JSON text (a single larger frame is
    /// still sent, alone). Default [`DEFAULT_OUTBOUND_BYTES`].
    pub outbound_bytes: usize,
    /// Messages the bus buffers for each browser subscription before it
    /// drops the oldest (counted, and told to the browser as a `Busy`
    /// error with the `sid`, once per burst). The bus's byte caps apply
    /// too. Default [`DEFAULT_SUBSCRIPTION_BUFFER`].
    pub subscription_buffer: usize,
    /// The `server` field of `connected`. Default `courier <version>`.
    pub server_name: String,
    /// The origins (`https://app.example.com`: scheme, host and port if not
    /// the default) whose pages may open a WebSocket; an upgrade request
    /// whose `Origin` header is another gets HTTP 403. Compared without
    /// ASCII case. A request without `Origin` (not from a browser: browsers
    /// always send it) is let in: the check stops other websites' pages,
    /// in a user's browser, from using the gateway with that user's
    /// network position (cross-site WebSocket hijacking).
    ///
    /// Default empty: **any origin**, so that a page served from anywhere
    /// can connect. A gateway reachable from browsers that also visit
    /// untrusted sites (say one on `127.0.0.1` or an intranet, without
    /// tokens) should list its pages' origins.
    pub allowed_origins: Vec<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_frame: frame_limit_for(DEFAULT_MAX_PAYLOAD),
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_requests_in_flight: DEFAULT_MAX_REQUESTS_IN_FLIGHT,
            connect_timeout: Duration::from_secs(5),
            idle_timeout: None,
            write_timeout: Duration::from_secs(30),
            default_request_timeout: Duration::from_secs(5),
            max_request_timeout: Duration::from_secs(60),
            outbound_messages: DEFAULT_OUTBOUND_MESSAGES,
            outbound_bytes: DEFAULT_OUTBOUND_BYTES,
            subscription_buffer: DEFAULT_SUBSCRIPTION_BUFFER,
            server_name: format!("courier {}", env!("CARGO_PKG_VERSION")),
            allowed_origins: Vec::new(),
        }
    }
}

impl GatewayConfig {
    /// With another connection bound (at least 1).
    pub fn with_max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// With another bound on connections still in their handshake (at
    /// least 1).
    pub fn with_max_handshakes(mut self, handshakes: usize) -> Self {
        self.max_handshakes = handshakes.max(1);
        self
    }

    /// With another payload limit (at least 1), and the frame limit that
    /// goes with it ([`frame_limit_for`]; set another after this with
    /// [`with_max_frame`](Self::with_max_frame)).
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes.max(1);
        self.max_frame = frame_limit_for(self.max_payload);
        self
    }

    /// With another frame limit (at least 1 KiB).
    pub fn with_max_frame(mut self, bytes: usize) -> Self {
        self.max_frame = bytes.max(1024);
        self
    }

    /// With another per-connection subscription bound.
    pub fn with_max_subscriptions(mut self, subscriptions: usize) -> Self {
        self.max_subscriptions = subscriptions;
        self
    }

    /// With another per-connection bound on requests in flight.
    pub fn with_max_requests_in_flight(mut self, requests: usize) -> Self {
        self.max_requests_in_flight = requests;
        self
    }

    /// With another time for each connecting step (at least 1 ms, at
    /// most a year).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.clamp(Duration::from_millis(1), LONGEST_TIMEOUT);
        self
    }

    /// Closing connections idle this long (`None`: never).
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// With another write timeout (at least 1 ms, at most a year).
    pub fn with_write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout.clamp(Duration::from_millis(1), LONGEST_TIMEOUT);
        self
    }

    /// With other request timeouts: the default, and the ceiling (at least
    /// 1 ms; the default is cut to the ceiling).
    pub fn with_request_timeouts(mut self, default: Duration, max: Duration) -> Self {
        self.max_request_timeout = max.max(Duration::from_millis(1));
        self.default_request_timeout =
            default.clamp(Duration::from_millis(1), self.max_request_timeout);
        self
    }

    /// Letting browsers in only from pages of these origins (empty: any);
    /// see [`allowed_origins`](Self::allowed_origins).
    pub fn with_allowed_origins<S: Into<String>>(
        mut self,
        origins: impl IntoIterator<Item = S>,
    ) -> Self {
        self.allowed_origins = origins.into_iter().map(Into::into).collect();
        self
    }

    /// With other outbound queue bounds (at least 1 each).
    pub fn with_outbound(mut self, messages: usize, bytes: usize) -> Self {
        self.outbound_messages = messages.max(1);
        self.outbound_bytes = bytes.max(1);
        self
    }

    /// With another bus buffer per browser subscription (at least 1).
    pub fn with_subscription_buffer(mut self, messages: usize) -> Self {
        self.subscription_buffer = messages.max(1);
        self
    }

    /// With another `server` name in `connected`.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }
}
