//! Schema fingerprints: a hash of a message type's serde shape, so that two
//! nodes built with different versions of a type refuse each other with an
//! error naming the type, instead of decoding garbage.
//!
//! The shape is found by tracing the type's `Deserialize` implementation
//! with a deserializer that records every request (struct and field names,
//! primitive kinds, sequences, maps, options, enum variants) and answers it
//! with a placeholder value. Enums are traced once per variant index, so a
//! change inside any variant changes the fingerprint. Recursive types are
//! cut off at a fixed depth.
//!
//! What counts: names of structs, fields, enums and variants, and the kind
//! of every value. What does not: the module path (moving a type does not
//! change its fingerprint) and anything serde never sees.
//!
//! This lives in the wire crate, below everything that checks types, so
//! that messaging, RPC, pub/sub and queues compare one fingerprint computed
//! one way, and the workspace has one FNV-1a ([`Fnv1a`]).
//!
//! ```
//! use courier_wire::schema::Schema;
//!
//! #[derive(serde::Deserialize)]
//! struct OrderV1 { id: u64, item: String }
//! #[derive(serde::Deserialize)]
//! struct OrderV2 { id: u64, item: String, quantity: u32 }
//!
//! let v1 = Schema::of::<OrderV1>();
//! assert_eq!(v1.shape, "OrderV1{id:u64,item:str}");
//! assert_ne!(v1.fingerprint, Schema::of::<OrderV2>().fingerprint);
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// Nesting beyond this is cut off (recursive types).
const MAX_DEPTH: usize = 24;
/// Enums with more variants than this are traced for the first ones only.
const MAX_VARIANT_PASSES: usize = 64;

/// A message type's identity on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema {
    /// The Rust type name, for error messages.
    pub type_name: &'static str,
    /// FNV-1a hash of `shape`: stable across builds, platforms and Rust versions.
    pub fingerprint: u64,
    /// The traced shape, readable (for the first variant of every enum).
    pub shape: String,
}

impl Schema {
    /// Traces `T`'s serde shape.
    pub fn of<T: DeserializeOwned>() -> Schema {
        let mut choices = Choices::default();
        let mut shapes: Vec<String> = Vec::new();
        for pass in 0..MAX_VARIANT_PASSES {
            choices.pass = pass;
            let mut out = String::new();
            let traced = T::deserialize(Tracer {
                out: &mut out,
                depth: 0,
                choices: &mut choices,
            });
            if let Err(TraceError(reason)) = traced {
                // The shape traced up to the failure stays in: without it
                // every type that fails the same way (a NonZeroU64 field,
                // a `try_from` refusing the tracer's zero) would share one
                // fingerprint, and a typed receiver could take one for
                // another.
                out = format!("untraceable({out}: {reason})");
            }
            if !shapes.contains(&out) {
                shapes.push(out);
            }
            if pass + 1 >= choices.most_variants {
                break;
            }
        }
        let mut hash = Fnv1a::new();
        for shape in &shapes {
            hash.write(shape.as_bytes());
            hash.write(b"\n");
        }
        Schema {
            type_name: std::any::type_name::<T>(),
            fingerprint: hash.finish(),
            shape: shapes.swap_remove(0),
        }
    }
}

/// 64-bit FNV-1a: the one hash behind every Courier fingerprint.
///
/// Chosen over `std`'s hashers because its output is fixed by its
/// definition, not by the build: fingerprints are compared between
/// processes built apart, so the same bytes must give the same value on
/// every platform and Rust version. It is not a defence against an
/// adversary; it tells honest versions apart. Multi-byte values must be
/// written in a fixed byte order (say `to_le_bytes`) for the same reason,
/// which is why this is not a [`std::hash::Hasher`] (whose integer methods
/// write native-endian bytes).
///
/// ```
/// use courier_wire::schema::Fnv1a;
///
/// let mut hash = Fnv1a::new();
/// hash.write(b"u64\n");
/// assert_eq!(hash.finish(), 0xbfdc_abe5_4a45_f768);
/// assert_eq!(Fnv1a::hash(b"u64\n"), hash.finish());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fnv1a(u64);

impl Fnv1a {
    /// The FNV-1a 64-bit offset basis.
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    /// The FNV-1a 64-bit prime.
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    /// A hash of nothing yet.
    pub const fn new() -> Fnv1a {
        Fnv1a(Self::OFFSET_BASIS)
    }

    /// Adds `bytes` to the hash.
    pub fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// The hash of everything written so far.
    pub const fn finish(&self) -> u64 {
        self.0
    }

    /// The hash of `bytes` alone.
    pub fn hash(bytes: &[u8]) -> u64 {
        let mut hash = Fnv1a::new();
        hash.write(bytes);
        hash.finish()
    }
}

impl Default for Fnv1a {
    fn default() -> Fnv1a {
        Fnv1a::new()
    }
}

/// Which variant each pass picks: variant `pass`, or the last one.
#[derive(Default)]
struct Choices {
    pass: usize,
    most_variants: usize,
}

impl Choices {
    fn pick(&mut self, variants: usize) -> usize {
        self.most_variants = self.most_variants.max(variants);
        self.pass.min(variants.saturating_sub(1))
    }
}

#[derive(Debug)]
struct TraceError(String);

impl std::fmt::Display for TraceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

impl de::Error for TraceError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        TraceError(msg.to_string())
    }
}

struct Tracer<'a> {
    out: &'a mut String,
    depth: usize,
    choices: &'a mut Choices,
}

impl Tracer<'_> {
    fn nested(&mut self) -> Tracer<'_> {
        Tracer {
            out: self.out,
            depth: self.depth + 1,
            choices: self.choices,
        }
    }

    fn too_deep(&self) -> bool {
        self.depth >= MAX_DEPTH
    }
}

macro_rules! primitive {
    ($($method:ident => $visit:ident($($value:expr)?), $name:literal;)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
                self.out.push_str($name);
                visitor.$visit($($value)?)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = TraceError;

    primitive! {
        deserialize_bool => visit_bool(false), "bool";
        deserialize_i8 => visit_i8(0), "i8";
        deserialize_i16 => visit_i16(0), "i16";
        deserialize_i32 => visit_i32(0), "i32";
        deserialize_i64 => visit_i64(0), "i64";
        deserialize_i128 => visit_i128(0), "i128";
        deserialize_u8 => visit_u8(0), "u8";
        deserialize_u16 => visit_u16(0), "u16";
        deserialize_u32 => visit_u32(0), "u32";
        deserialize_u64 => visit_u64(0), "u64";
        deserialize_u128 => visit_u128(0), "u128";
        deserialize_f32 => visit_f32(0.0), "f32";
        deserialize_f64 => visit_f64(0.0), "f64";
        deserialize_char => visit_char('\0'), "char";
        deserialize_str => visit_str(""), "str";
        deserialize_string => visit_string(String::new()), "str";
        deserialize_bytes => visit_bytes(&[]), "bytes";
        deserialize_byte_buf => visit_byte_buf(Vec::new()), "bytes";
        deserialize_unit => visit_unit(), "()";
        deserialize_ignored_any => visit_unit(), "_";
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, TraceError> {
        // Self-describing types cannot be traced, and postcard cannot carry them either.
        Err(TraceError(
            "uses deserialize_any, which postcard does not support".into(),
        ))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, TraceError> {
        visitor.visit_u32(0)
    }

    fn deserialize_option<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        if self.too_deep() {
            self.out.push_str("option<…>");
            return visitor.visit_none();
        }
        self.out.push_str("option<");
        let value = visitor.visit_some(self.nested())?;
        self.out.push('>');
        Ok(value)
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.out.push_str(name);
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        mut self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let _ = write!(self.out, "{name}(");
        let value = visitor.visit_newtype_struct(self.nested())?;
        self.out.push(')');
        Ok(value)
    }

    fn deserialize_seq<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        self.out.push_str("seq<");
        let elements = usize::from(!self.too_deep());
        let value = visitor.visit_seq(Elements {
            tracer: self.nested(),
            remaining: elements,
            names: None,
            index: 0,
        })?;
        self.out.push('>');
        Ok(value)
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        mut self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.out.push('(');
        let value = visitor.visit_seq(Elements {
            tracer: self.nested(),
            remaining: len,
            names: None,
            index: 0,
        })?;
        self.out.push(')');
        Ok(value)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.out.push_str(name);
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, TraceError> {
        self.out.push_str("map<");
        let entries = usize::from(!self.too_deep());
        let value = visitor.visit_map(Entries {
            tracer: self.nested(),
            remaining: entries,
        })?;
        self.out.push('>');
        Ok(value)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        mut self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        let _ = write!(self.out, "{name}{{");
        let value = visitor.visit_seq(Elements {
            tracer: self.nested(),
            remaining: fields.len(),
            names: Some(fields),
            index: 0,
        })?;
        self.out.push('}');
        Ok(value)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        mut self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        // Past the depth limit an enum takes its first variant, which for
        // most recursive types (an error holding the first of several, a
        // tree of nodes) is a leaf; one whose first variant recurses again
        // is cut off at twice the limit with an error, so the trace (and
        // the stack) stays bounded whatever the type.
        if self.depth >= 2 * MAX_DEPTH {
            return Err(TraceError(format!(
                "{name} nests deeper than {} levels",
                2 * MAX_DEPTH
            )));
        }
        let index = if self.too_deep() {
            0
        } else {
            self.choices.pick(variants.len())
        };
        let _ = write!(
            self.out,
            "{name}[{}]::{}",
            variants.join("|"),
            variants.get(index).copied().unwrap_or("?")
        );
        visitor.visit_enum(Variant {
            tracer: self.nested(),
            index,
        })
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

/// Sequence, tuple and struct contents: `remaining` elements, each traced.
struct Elements<'a> {
    tracer: Tracer<'a>,
    remaining: usize,
    names: Option<&'static [&'static str]>,
    index: usize,
}

impl<'de> de::SeqAccess<'de> for Elements<'_> {
    type Error = TraceError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, TraceError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        if self.index > 0 {
            self.tracer.out.push(',');
        }
        if let Some(name) = self.names.and_then(|names| names.get(self.index)) {
            let _ = write!(self.tracer.out, "{name}:");
        }
        self.index += 1;
        seed.deserialize(self.tracer.nested()).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.remaining)
    }
}

/// Map contents: one traced entry.
struct Entries<'a> {
    tracer: Tracer<'a>,
    remaining: usize,
}

impl<'de> de::MapAccess<'de> for Entries<'_> {
    type Error = TraceError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, TraceError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        seed.deserialize(self.tracer.nested()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, TraceError> {
        self.tracer.out.push_str("=>");
        seed.deserialize(self.tracer.nested())
    }
}

/// One enum variant, chosen by index.
struct Variant<'a> {
    tracer: Tracer<'a>,
    index: usize,
}

impl<'de, 'a> de::EnumAccess<'de> for Variant<'a> {
    type Error = TraceError;
    type Variant = Variant<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Variant<'a>), TraceError> {
        let index =
            u32::try_from(self.index).map_err(|_| TraceError("too many variants".into()))?;
        let tag: de::value::U32Deserializer<TraceError> = index.into_deserializer();
        let value = seed.deserialize(tag)?;
        Ok((value, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_> {
    type Error = TraceError;

    fn unit_variant(self) -> Result<(), TraceError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        mut self,
        seed: T,
    ) -> Result<T::Value, TraceError> {
        self.tracer.out.push('(');
        let value = seed.deserialize(self.tracer.nested())?;
        self.tracer.out.push(')');
        Ok(value)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        de::Deserializer::deserialize_tuple(self.tracer, len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        mut self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, TraceError> {
        self.tracer.out.push('{');
        let value = visitor.visit_seq(Elements {
            tracer: self.tracer.nested(),
            remaining: fields.len(),
            names: Some(fields),
            index: 0,
        })?;
        self.tracer.out.push('}');
        Ok(value)
    }
}

/// Fingerprints computed once per type and kept for the process's life.
#[derive(Debug, Default)]
pub struct SchemaCache {
    known: HashMap<std::any::TypeId, Schema>,
}

impl SchemaCache {
    /// The schema of `T`, traced on first use.
    pub fn get<T: DeserializeOwned + 'static>(&mut self) -> &Schema {
        self.known
            .entry(std::any::TypeId::of::<T>())
            .or_insert_with(Schema::of::<T>)
    }
}
