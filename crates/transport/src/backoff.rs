//! Reconnecting with capped exponential backoff and jitter.

use std::time::Duration;

use tokio::time::Instant;

use crate::{connect, Address, ConnectError, Connection, TransportConfig};

/// Delays between reconnection attempts: exponential from `base`, capped at
/// `cap`, with "equal jitter" (each delay is uniformly random in the upper
/// half of its exponential step) so that many clients cut off together do
/// not reconnect in lockstep.
///
/// The randomness is a seeded generator, so a test can replay a sequence.
///
/// ```
/// use std::time::Duration;
/// use courier_transport::Backoff;
/// let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1), 42);
/// let first = backoff.next_delay();
/// assert!(first >= Duration::from_millis(5) && first <= Duration::from_millis(10));
/// for _ in 0..20 { assert!(backoff.next_delay() <= Duration::from_secs(1)); }
/// ```
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff starting at `base`, never exceeding `cap`, jittered from `seed`.
    pub fn new(base: Duration, cap: Duration, seed: u64) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
            rng: seed,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(31))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let jitter = (self.next_random() as u128 * (step - half).as_nanos()) >> 64;
        half + Duration::from_nanos(jitter as u64)
    }

    /// Starts over from `base` (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// splitmix64: small, fast and good enough for jitter.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Connects, retrying retryable failures with `backoff` until `deadline`.
/// Returns the last error when the deadline passes or the error is not
/// retryable (a peer that is not Courier will not become one).
pub async fn connect_with_backoff(
    address: &Address,
    config: &TransportConfig,
    backoff: &mut Backoff,
    deadline: Instant,
) -> Result<Connection, ConnectError> {
    loop {
        match connect(address, config).await {
            Ok(conn) => {
                backoff.reset();
                return Ok(conn);
            }
            Err(err) if !err.is_retryable() => return Err(err),
            Err(err) => {
                let delay = backoff.next_delay();
                if Instant::now() + delay >= deadline {
                    return Err(err);
                }
                tracing::debug!(%address, %err, ?delay, "connect failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}
