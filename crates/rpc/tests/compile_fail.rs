//! The `#[service]` attribute's own errors, as the compiler shows them.
//! Each `ui/*.rs` must fail to build with exactly its `.stderr`; after a
//! deliberate change of a message, regenerate them with
//! `TRYBUILD=overwrite cargo test -p courier-rpc --test compile_fail` and
//! read the diff.

#[test]
fn service_macro_errors() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}

// What the borrow check lets through: `'static` lifetimes in types that
// still deserialize into owned values, and arrays and tuples of owned types.
#[courier_rpc::service]
#[allow(dead_code)]
trait Owned {
    async fn label(&self, text: std::borrow::Cow<'static, str>) -> std::borrow::Cow<'static, str>;
    async fn pair(&self, pair: ([u8; 4], Option<String>)) -> Vec<(String, u64)>;
}
