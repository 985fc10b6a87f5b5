//! Node identity.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::str::FromStr;

/// A node's unique identity: 128 random bits, printed as 32 lowercase hex
/// digits in five dash-separated groups (`8-4-4-4-12`, like a UUID).
///
/// ```
/// use courier_messaging::NodeId;
/// let id = NodeId::random();
/// let printed = id.to_string();
/// assert_eq!(printed.len(), 36);
/// assert_eq!(printed.parse::<NodeId>().unwrap(), id);
/// assert_ne!(NodeId::random(), id);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u128);

impl NodeId {
    /// A fresh random id.
    ///
    /// The randomness comes from the standard library's per-process random
    /// hash keys, mixed with the time, the process id and a counter, so no
    /// random-number crate is needed; collisions are as unlikely as for a
    /// random UUID, and the handshake reports one if it ever happens.
    pub fn random() -> NodeId {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let half = |salt: u64| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(salt);
            hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
            hasher.write_u32(std::process::id());
            if let Ok(elapsed) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
            {
                hasher.write_u128(elapsed.as_nanos());
            }
            hasher.finish()
        };
        NodeId(u128::from(half(0x9E37)) << 64 | u128::from(half(0x79B9)))
    }

    /// The id with these bits (for tests and persisted identities).
    pub const fn from_u128(bits: u128) -> NodeId {
        NodeId(bits)
    }

    /// The bits.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Why a string is not a [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid node id {input:?}: expected 32 hex digits, optionally grouped 8-4-4-4-12 with dashes"
)]
pub struct NodeIdError {
    input: String,
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<NodeId, NodeIdError> {
        let err = || NodeIdError {
            input: s.to_string(),
        };
        let digits: String = s.chars().filter(|c| *c != '-').collect();
        let grouped_ok = !s.contains('-') || s.split('-').map(str::len).eq([8, 4, 4, 4, 12]);
        if digits.len() != 32 || !grouped_ok || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(err());
        }
        u128::from_str_radix(&digits, 16)
            .map(NodeId)
            .map_err(|_| err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse_and_reject_nonsense() {
        let id = NodeId::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(id.to_string(), "01234567-89ab-cdef-0011-223344556677");
        assert_eq!(
            "0123456789abcdef0011223344556677"
                .parse::<NodeId>()
                .unwrap(),
            id
        );
        assert_eq!(
            "01234567-89AB-cdef-0011-223344556677"
                .parse::<NodeId>()
                .unwrap(),
            id
        );
        for bad in [
            "",
            "xyz",
            "0123456789abcdef001122334455667",
            "0123-456789ab-cdef-0011-223344556677",
            "0123456789abcdef001122334455667g",
        ] {
            let err = bad.parse::<NodeId>().unwrap_err();
            assert!(err.to_string().contains("32 hex digits"), "{bad}");
        }
    }

    #[test]
    fn random_ids_differ() {
        let ids: std::collections::HashSet<_> = (0..10_000).map(|_| NodeId::random()).collect();
        assert_eq!(ids.len(), 10_000);
    }
}
