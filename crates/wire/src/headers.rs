//! Text headers carried beside a message's payload: its type, its trace
//! context, and whatever an application adds.
//!
//! Headers come from the network and from disk, so a [`Headers`] is bounded
//! however it was made: at most [`MAX_ENTRIES`] entries, names of at most
//! [`MAX_NAME_LEN`] bytes drawn from `a-z 0-9 - _ .`, values of at most
//! [`MAX_VALUE_LEN`] bytes, and [`MAX_TOTAL_LEN`] bytes in all. The limits
//! are checked by [`Headers::insert`] and again while deserializing, entry
//! by entry, so a peer that sends a million headers is refused after the
//! 33rd instead of being allocated for.
//!
//! An empty `Headers` allocates nothing and costs one byte in postcard, so
//! messages that carry none pay almost nothing for the field.
//!
//! ```
//! use courier_wire::headers::{Headers, TypeTag};
//!
//! let mut headers = Headers::new();
//! headers.insert("tenant", "acme")?;
//! headers.set_type(&TypeTag::new(0x1234, "shop::Order"))?;
//!
//! let bytes = postcard::to_stdvec(&headers)?;
//! let back: Headers = postcard::from_bytes(&bytes)?;
//! assert_eq!(back.get("tenant"), Some("acme"));
//! assert_eq!(back.type_tag(), Some(TypeTag::new(0x1234, "shop::Order")));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// At most this many entries.
pub const MAX_ENTRIES: usize = 32;
/// A name is at most this many bytes.
pub const MAX_NAME_LEN: usize = 64;
/// A value is at most this many bytes.
pub const MAX_VALUE_LEN: usize = 1024;
/// Names and values together are at most this many bytes.
pub const MAX_TOTAL_LEN: usize = 4096;

/// The W3C trace context of the operation that sent the message
/// (`00-<trace id>-<parent id>-<flags>`).
pub const TRACEPARENT: &str = "traceparent";
/// The type of a typed payload, as [`TypeTag::to_value`] writes it.
pub const TYPE: &str = "courier-type";

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The name is empty, too long, or has a byte outside `a-z 0-9 - _ .`.
    #[error("invalid header name {0:?}: 1 to 64 bytes of a-z, 0-9, '-', '_' or '.'")]
    InvalidName(String),
    /// The value is longer than [`MAX_VALUE_LEN`] or has a control character.
    #[error("header {name:?}: value of {len} bytes is too long or has a control character")]
    InvalidValue {
        /// The header's name.
        name: String,
        /// The value's length in bytes.
        len: usize,
    },
    /// There would be more than [`MAX_ENTRIES`] entries.
    #[error("more than {MAX_ENTRIES} headers")]
    TooMany,
    /// Names and values together would pass [`MAX_TOTAL_LEN`] bytes.
    #[error("headers larger than {MAX_TOTAL_LEN} bytes")]
    TooLarge,
}

/// A small, bounded, ordered list of `name: value` text pairs, each name at
/// most once. See the [module docs](self).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    /// No headers (allocates nothing).
    pub const fn new() -> Headers {
        Headers {
            entries: Vec::new(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, replacing an earlier value of the same name.
    /// Refused, changing nothing, when a limit would be passed.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<(), HeaderError> {
        let (name, value) = (name.into(), value.into());
        check_entry(&name, &value)?;
        let existing = self.entries.iter().position(|(n, _)| *n == name);
        let total = self.total_len() + name.len() + value.len()
            - existing.map_or(0, |i| self.entries[i].0.len() + self.entries[i].1.len());
        if total > MAX_TOTAL_LEN {
            return Err(HeaderError::TooLarge);
        }
        match existing {
            Some(i) => self.entries[i].1 = value,
            None if self.entries.len() >= MAX_ENTRIES => return Err(HeaderError::TooMany),
            None => self.entries.push((name, value)),
        }
        Ok(())
    }

    /// Removes `name`, giving back its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        let i = self.entries.iter().position(|(n, _)| n == name)?;
        Some(self.entries.remove(i).1)
    }

    /// Every entry, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Names and values together, in bytes.
    pub fn total_len(&self) -> usize {
        self.entries.iter().map(|(n, v)| n.len() + v.len()).sum()
    }

    /// What holding these headers costs in memory, estimated: the entries'
    /// table and every string's allocation with the allocator's rounding,
    /// not only the text. What byte caps on buffered messages should count:
    /// 32 one-byte names with empty values are 32 bytes of text but some
    /// 2 KiB of memory.
    pub fn memory_cost(&self) -> usize {
        /// Per allocation: the allocator's header and rounding.
        const ALLOCATION: usize = 16;
        let table = match self.entries.capacity() {
            0 => 0,
            slots => slots * std::mem::size_of::<(String, String)>() + ALLOCATION,
        };
        let strings: usize = self
            .entries
            .iter()
            .flat_map(|(n, v)| [n.capacity(), v.capacity()])
            .filter(|capacity| *capacity > 0)
            .map(|capacity| capacity + ALLOCATION)
            .sum();
        table + strings
    }

    /// Tags the payload as a value of `tag`'s type (the [`TYPE`] header).
    pub fn set_type(&mut self, tag: &TypeTag) -> Result<(), HeaderError> {
        self.insert(TYPE, tag.to_value())
    }

    /// The payload's type, when tagged and the tag is well formed.
    pub fn type_tag(&self) -> Option<TypeTag> {
        self.get(TYPE).and_then(TypeTag::parse)
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

fn check_entry(name: &str, value: &str) -> Result<(), HeaderError> {
    let name_ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !name_ok {
        return Err(HeaderError::InvalidName(truncated(name)));
    }
    // Control characters would let a value forge lines in a log or in a
    // text protocol that prints headers.
    if value.len() > MAX_VALUE_LEN || value.chars().any(char::is_control) {
        return Err(HeaderError::InvalidValue {
            name: name.to_string(),
            len: value.len(),
        });
    }
    Ok(())
}

/// A bad name echoed into an error is cut short, so the error stays small.
fn truncated(name: &str) -> String {
    let mut end = name.len().min(MAX_NAME_LEN);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.entries.len()))?;
        for entry in &self.entries {
            seq.serialize_element(entry)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Headers, D::Error> {
        struct HeadersVisitor;

        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = Headers;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {MAX_ENTRIES} headers of {MAX_TOTAL_LEN} bytes")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Headers, A::Error> {
                // The announced length is the peer's claim: never trusted
                // for an allocation beyond the limit.
                if seq.size_hint().is_some_and(|n| n > MAX_ENTRIES) {
                    return Err(de::Error::custom(HeaderError::TooMany));
                }
                let mut headers = Headers::new();
                while let Some((name, value)) = seq.next_element::<(String, String)>()? {
                    if headers.get(&name).is_some() {
                        return Err(de::Error::custom(format!("header {name:?} twice")));
                    }
                    headers.insert(name, value).map_err(de::Error::custom)?;
                }
                Ok(headers)
            }
        }

        deserializer.deserialize_seq(HeadersVisitor)
    }
}

/// The type of a typed payload: its schema fingerprint and its Rust name.
///
/// The fingerprint decides whether two types agree; the name is there so
/// that an error can say which type was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeTag {
    /// The schema fingerprint (see [`crate::schema`] where present, or any
    /// stable hash of the type's serde shape).
    pub fingerprint: u64,
    /// The type's name, for messages.
    pub name: String,
}

impl TypeTag {
    /// The tag of a type with this fingerprint and name.
    pub fn new(fingerprint: u64, name: impl Into<String>) -> TypeTag {
        TypeTag {
            fingerprint,
            name: name.into(),
        }
    }

    /// The header value: sixteen hex digits, a space, the name (cut at a
    /// character boundary so the value fits [`MAX_VALUE_LEN`]).
    pub fn to_value(&self) -> String {
        let mut value = format!("{:016x} {}", self.fingerprint, self.name);
        if value.len() > MAX_VALUE_LEN {
            let mut end = MAX_VALUE_LEN;
            while !value.is_char_boundary(end) {
                end -= 1;
            }
            value.truncate(end);
        }
        value.retain(|c| !c.is_control());
        value
    }

    /// Reads a header value written by [`TypeTag::to_value`]; `None` when it
    /// is not one.
    pub fn parse(value: &str) -> Option<TypeTag> {
        let (hex, name) = value.split_once(' ')?;
        if hex.len() != 16 {
            return None;
        }
        let fingerprint = u64::from_str_radix(hex, 16).ok()?;
        Some(TypeTag::new(fingerprint, name))
    }
}

impl fmt::Display for TypeTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:016x})", self.name, self.fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_replaces_and_keeps_order() {
        let mut h = Headers::new();
        h.insert("a", "1").unwrap();
        h.insert("b", "2").unwrap();
        h.insert("a", "3").unwrap();
        assert_eq!(h.iter().collect::<Vec<_>>(), [("a", "3"), ("b", "2")]);
        assert_eq!(h.remove("a").as_deref(), Some("3"));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn limits_are_enforced_on_insert() {
        let mut h = Headers::new();
        assert!(matches!(
            h.insert("", "x"),
            Err(HeaderError::InvalidName(_))
        ));
        assert!(matches!(
            h.insert("Upper", "x"),
            Err(HeaderError::InvalidName(_))
        ));
        assert!(matches!(
            h.insert("a b", "x"),
            Err(HeaderError::InvalidName(_))
        ));
        let long = "n".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            h.insert(long, "x"),
            Err(HeaderError::InvalidName(_))
        ));
        assert!(matches!(
            h.insert("v", "x".repeat(MAX_VALUE_LEN + 1)),
            Err(HeaderError::InvalidValue { .. })
        ));
        assert!(matches!(
            h.insert("v", "a\nb"),
            Err(HeaderError::InvalidValue { .. })
        ));
        for i in 0..MAX_ENTRIES {
            h.insert(format!("h{i}"), "").unwrap();
        }
        assert_eq!(h.insert("one-more", ""), Err(HeaderError::TooMany));
        // Replacing an existing name is still allowed when full.
        h.insert("h0", "new").unwrap();
        assert_eq!(h.len(), MAX_ENTRIES);
    }

    #[test]
    fn total_size_is_bounded() {
        let mut h = Headers::new();
        let value = "v".repeat(1000);
        for i in 0..4 {
            h.insert(format!("k{i}"), value.clone()).unwrap();
        }
        assert_eq!(h.insert("k4", value.clone()), Err(HeaderError::TooLarge));
        // Replacing one with a shorter value frees room.
        h.insert("k0", "").unwrap();
        h.insert("k4", value).unwrap();
        assert!(h.total_len() <= MAX_TOTAL_LEN);
    }

    #[test]
    fn memory_cost_counts_more_than_the_text() {
        assert_eq!(Headers::new().memory_cost(), 0);
        let mut h = Headers::new();
        for i in 0..MAX_ENTRIES {
            h.insert(
                format!("{}", (b'a' + (i % 26) as u8) as char).repeat(1 + i / 26),
                "",
            )
            .unwrap();
        }
        assert!(h.total_len() < 64);
        assert!(h.memory_cost() > 32 * std::mem::size_of::<(String, String)>());
    }

    #[test]
    fn round_trips_through_postcard_and_empty_costs_one_byte() {
        let empty = postcard::to_stdvec(&Headers::new()).unwrap();
        assert_eq!(empty, [0]);
        let mut h = Headers::new();
        h.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .unwrap();
        let bytes = postcard::to_stdvec(&h).unwrap();
        assert_eq!(postcard::from_bytes::<Headers>(&bytes).unwrap(), h);
    }

    /// What a peer sends is checked entry by entry while decoding.
    #[test]
    fn decoding_refuses_what_insert_would() {
        let too_many: Vec<(String, String)> = (0..MAX_ENTRIES + 1)
            .map(|i| (format!("h{i}"), String::new()))
            .collect();
        let bytes = postcard::to_stdvec(&too_many).unwrap();
        assert!(postcard::from_bytes::<Headers>(&bytes).is_err());

        let bad_name = vec![("Bad Name".to_string(), String::new())];
        let bytes = postcard::to_stdvec(&bad_name).unwrap();
        assert!(postcard::from_bytes::<Headers>(&bytes).is_err());

        let twice = vec![
            ("a".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
        ];
        let bytes = postcard::to_stdvec(&twice).unwrap();
        assert!(postcard::from_bytes::<Headers>(&bytes).is_err());

        // A length prefix claiming four billion entries, then nothing.
        let bytes = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(postcard::from_bytes::<Headers>(&bytes).is_err());
    }

    #[test]
    fn type_tags_round_trip_and_bad_ones_are_none() {
        let tag = TypeTag::new(0xdead_beef, "shop::Order");
        assert_eq!(tag.to_value(), "00000000deadbeef shop::Order");
        assert_eq!(TypeTag::parse(&tag.to_value()), Some(tag.clone()));
        assert_eq!(TypeTag::parse("xyz shop::Order"), None);
        assert_eq!(TypeTag::parse("00000000deadbeef"), None);
        let mut h = Headers::new();
        h.set_type(&tag).unwrap();
        assert_eq!(h.type_tag(), Some(tag));
        // A name long enough to pass the value limit is cut, not refused.
        let long = TypeTag::new(1, "é".repeat(MAX_VALUE_LEN));
        assert!(long.to_value().len() <= MAX_VALUE_LEN);
        Headers::new().set_type(&long).unwrap();
    }
}
