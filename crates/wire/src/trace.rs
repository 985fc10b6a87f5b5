//! W3C trace context, so one request can be followed across processes.
//!
//! A [`TraceContext`] names a trace (16 bytes shared by every operation of
//! one request) and the operation that caused the current one (8 bytes). It
//! travels as the `traceparent` header of the
//! [W3C Trace Context](https://www.w3.org/TR/trace-context/) recommendation,
//! so tools that speak it (OpenTelemetry among them) can join in. This
//! module reads and writes it; `courier_transport::trace` keeps the one
//! current in a task.
//!
//! ```
//! use courier_wire::trace::TraceContext;
//!
//! let root = TraceContext::root();
//! let header = root.to_traceparent();
//! assert_eq!(TraceContext::parse(&header), Some(root));
//! assert_eq!(root.child().trace_id, root.trace_id);
//! ```

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// One operation's place in a trace.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The whole trace's id: never all zero.
    pub trace_id: [u8; 16],
    /// This operation's id, the parent of whatever it causes: never all zero.
    pub span_id: [u8; 8],
    /// Whether the trace is being recorded (the `sampled` flag).
    pub sampled: bool,
}

impl TraceContext {
    /// The start of a new trace, sampled.
    pub fn root() -> TraceContext {
        let (a, b) = (random_u64(), random_u64());
        let mut trace_id = [0; 16];
        trace_id[..8].copy_from_slice(&a.to_be_bytes());
        trace_id[8..].copy_from_slice(&b.to_be_bytes());
        TraceContext {
            trace_id,
            span_id: random_span_id(),
            sampled: true,
        }
    }

    /// An operation caused by this one: the same trace, a new span id.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: random_span_id(),
            ..*self
        }
    }

    /// Reads a `traceparent` header; `None` when it is not a valid one (the
    /// recommendation says to start a new trace then, not to fail).
    ///
    /// Version `00` must be exactly `00-<32 hex>-<16 hex>-<2 hex>`; a later
    /// version may append fields after a `-`, which are ignored.
    pub fn parse(header: &str) -> Option<TraceContext> {
        let header = header.trim();
        let bytes = header.as_bytes();
        if bytes.len() < 55 || !header.is_ascii() {
            return None;
        }
        let version = hex_u8(&header[0..2])?;
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if bytes.len() > 55 && bytes[55] != b'-' {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, byte) in trace_id.iter_mut().enumerate() {
            *byte = hex_u8(&header[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, byte) in span_id.iter_mut().enumerate() {
            *byte = hex_u8(&header[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_u8(&header[53..55])?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header value (version `00`).
    pub fn to_traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            u8::from(self.sampled)
        )
    }

    /// The trace id as 32 lowercase hex digits (what logs show).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_traceparent())
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_traceparent())
    }
}

fn hex_u8(two: &str) -> Option<u8> {
    // Upper case is invalid in traceparent.
    if two.len() != 2
        || !two
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u8::from_str_radix(two, 16).ok()
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// Unpredictable enough for ids that only need to be unique: std's
/// per-process random SipHash keys over a counter. Never zero.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static KEYS: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    let mut hasher = KEYS.get_or_init(RandomState::new).build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish().max(1)
}

fn random_span_id() -> [u8; 8] {
    random_u64().to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn parses_the_recommendations_example() {
        let ctx = TraceContext::parse(EXAMPLE).unwrap();
        assert_eq!(ctx.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(ctx.span_id_hex(), "b7ad6b7169203331");
        assert!(ctx.sampled);
        assert_eq!(ctx.to_traceparent(), EXAMPLE);
    }

    #[test]
    fn refuses_what_the_recommendation_refuses() {
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333é-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may carry more fields.
        let later = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-more";
        assert!(!TraceContext::parse(later).unwrap().sampled);
    }

    #[test]
    fn roots_differ_and_children_keep_the_trace() {
        let (a, b) = (TraceContext::root(), TraceContext::root());
        assert_ne!(a.trace_id, b.trace_id);
        let child = a.child();
        assert_eq!(child.trace_id, a.trace_id);
        assert_ne!(child.span_id, a.span_id);
        assert_eq!(TraceContext::parse(&child.to_traceparent()), Some(child));
    }
}
