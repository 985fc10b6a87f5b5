//! The schema tracing lives in courier-wire; messaging's names for it must
//! stay the same type, so code written against either keeps compiling and
//! compares the same fingerprints.

use courier_messaging::schema::SchemaCache;
use courier_messaging::Schema;

#[derive(serde::Deserialize)]
struct Order {
    _id: u64,
}

#[test]
fn messaging_reexports_the_wire_schema() {
    let ours: courier_wire::schema::Schema = Schema::of::<Order>();
    assert_eq!(ours.shape, "Order{_id:u64}");
    let mut cache: courier_wire::schema::SchemaCache = SchemaCache::default();
    assert_eq!(cache.get::<Order>(), &ours);
}
