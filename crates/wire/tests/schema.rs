//! Schema fingerprints change when the shape changes, and only then.

// The message types here exist to be traced, never read.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use courier_wire::schema::{Fnv1a, Schema, SchemaCache};
use serde::Deserialize;

mod v1 {
    #[derive(serde::Deserialize)]
    pub struct Order {
        pub id: u64,
        pub item: String,
        pub lines: Vec<(u32, f64)>,
    }
}

mod moved {
    #[derive(serde::Deserialize)]
    pub struct Order {
        pub id: u64,
        pub item: String,
        pub lines: Vec<(u32, f64)>,
    }
}

mod renamed_field {
    #[derive(serde::Deserialize)]
    pub struct Order {
        pub id: u64,
        pub product: String,
        pub lines: Vec<(u32, f64)>,
    }
}

mod wider_field {
    #[derive(serde::Deserialize)]
    pub struct Order {
        pub id: u128,
        pub item: String,
        pub lines: Vec<(u32, f64)>,
    }
}

mod extra_field {
    #[derive(serde::Deserialize)]
    pub struct Order {
        pub id: u64,
        pub item: String,
        pub lines: Vec<(u32, f64)>,
        pub note: Option<String>,
    }
}

fn fingerprint<T: serde::de::DeserializeOwned>() -> u64 {
    Schema::of::<T>().fingerprint
}

#[test]
fn shapes_read_as_the_type_does() {
    assert_eq!(
        Schema::of::<v1::Order>().shape,
        "Order{id:u64,item:str,lines:seq<(u32,f64)>}"
    );
    assert_eq!(
        Schema::of::<HashMap<String, Vec<u8>>>().shape,
        "map<str=>seq<u8>>"
    );
    assert_eq!(
        Schema::of::<Option<[u16; 3]>>().shape,
        "option<(u16,u16,u16)>"
    );
    assert!(Schema::of::<v1::Order>().type_name.ends_with("v1::Order"));
}

#[test]
fn any_change_of_shape_changes_the_fingerprint() {
    let base = fingerprint::<v1::Order>();
    assert_eq!(
        base,
        fingerprint::<moved::Order>(),
        "the module path does not count"
    );
    for (what, other) in [
        ("renamed field", fingerprint::<renamed_field::Order>()),
        ("wider field", fingerprint::<wider_field::Order>()),
        ("extra field", fingerprint::<extra_field::Order>()),
    ] {
        assert_ne!(base, other, "{what}");
    }
    assert_ne!(fingerprint::<u32>(), fingerprint::<i32>());
    assert_ne!(fingerprint::<Vec<u8>>(), fingerprint::<BTreeMap<u8, u8>>());
    assert_ne!(fingerprint::<(u8, u8)>(), fingerprint::<(u8, u8, u8)>());
}

mod events_a {
    #[derive(serde::Deserialize)]
    pub enum Event {
        Created { id: u64 },
        Renamed(String),
        Deleted,
    }
}

mod events_b {
    /// The same, except for the content of the second variant.
    #[derive(serde::Deserialize)]
    pub enum Event {
        Created { id: u64 },
        Renamed(String, u32),
        Deleted,
    }
}

mod events_c {
    /// The same, with one more variant.
    #[derive(serde::Deserialize)]
    pub enum Event {
        Created { id: u64 },
        Renamed(String),
        Deleted,
        Restored,
    }
}

#[test]
fn every_enum_variant_is_part_of_the_fingerprint() {
    let a = fingerprint::<events_a::Event>();
    assert_ne!(
        a,
        fingerprint::<events_b::Event>(),
        "a change inside a later variant"
    );
    assert_ne!(a, fingerprint::<events_c::Event>(), "an added variant");
    assert_eq!(a, fingerprint::<events_a::Event>(), "stable");
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Tree {
    value: u32,
    children: Vec<Tree>,
    parent: Option<Box<Tree>>,
}

#[test]
fn recursive_types_are_traced_to_a_bounded_depth() {
    let schema = Schema::of::<Tree>();
    assert!(schema
        .shape
        .starts_with("Tree{value:u32,children:seq<Tree{"));
    assert!(schema.shape.len() < 100_000);
}

#[test]
fn fingerprints_are_stable_across_builds() {
    // FNV-1a of a fixed shape: if this changes, every deployed node's
    // fingerprints change with it, which must be a conscious protocol change.
    assert_eq!(Schema::of::<u64>().shape, "u64");
    // Computed independently: FNV-1a 64 of the bytes "u64\n".
    assert_eq!(Schema::of::<u64>().fingerprint, 0xbfdc_abe5_4a45_f768);
}

#[test]
fn the_cache_traces_each_type_once() {
    let mut cache = SchemaCache::default();
    let first = cache.get::<v1::Order>().clone();
    assert_eq!(cache.get::<v1::Order>(), &first);
    assert_ne!(cache.get::<u8>().fingerprint, first.fingerprint);
}

/// An error that holds another, as error types often do.
#[derive(serde::Serialize, serde::Deserialize)]
enum Nested {
    Leaf(String),
    Wrapped { count: u64, first: Box<Nested> },
}

/// A list whose first variant recurses.
#[derive(serde::Serialize, serde::Deserialize)]
enum List {
    Cons(u8, Box<List>),
    Nil,
}

#[test]
fn recursive_types_are_traced_within_bounds() {
    // These overflowed the stack before: the recursive variant was chosen
    // at every depth.
    let nested = Schema::of::<Nested>();
    assert!(nested.shape.contains("Nested"), "{}", nested.shape);
    assert_eq!(nested.fingerprint, Schema::of::<Nested>().fingerprint);
    let list = Schema::of::<List>();
    assert_eq!(list.fingerprint, Schema::of::<List>().fingerprint);
    assert_ne!(nested.fingerprint, list.fingerprint);
}

#[test]
fn fnv1a_matches_the_published_test_vectors() {
    // From the FNV reference (Fowler, Noll, Vo): FNV-1a 64-bit.
    assert_eq!(Fnv1a::hash(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(Fnv1a::hash(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(Fnv1a::hash(b"foobar"), 0x8594_4171_f739_67e8);
    // Writing in pieces is writing the whole.
    let mut pieces = Fnv1a::default();
    pieces.write(b"foo");
    pieces.write(b"");
    pieces.write(b"bar");
    assert_eq!(pieces.finish(), Fnv1a::hash(b"foobar"));
}

/// Types the tracer cannot finish (a `NonZeroU64` refuses its zero) still
/// differ by what was traced before the failure, so two of them never
/// share a fingerprint just because they fail the same way.
#[test]
fn untraceable_types_keep_distinct_fingerprints() {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Order {
        id: std::num::NonZeroU64,
        qty: u32,
    }
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Refund {
        id: std::num::NonZeroU64,
        amount: u64,
    }
    let (order, refund) = (Schema::of::<Order>(), Schema::of::<Refund>());
    assert!(order.shape.contains("untraceable"), "{}", order.shape);
    assert_ne!(
        order.fingerprint, refund.fingerprint,
        "{} / {}",
        order.shape, refund.shape
    );
}
