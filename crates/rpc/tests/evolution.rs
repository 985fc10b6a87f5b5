//! Services that evolve: each request carries the fingerprint of the one
//! method it calls, so adding a method keeps old clients working against a
//! new server and new clients against an old one, while a method whose
//! types changed is refused with an error naming it.

use std::sync::atomic::{AtomicUsize, Ordering};

use courier_rpc::{Client, ClientConfig, Items, RpcError, Server, ServerConfig, ServerHandle};
use courier_transport::{bind, Address, TransportConfig};

/// The error type `b` returns, shared by both versions.
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
pub enum Refusal {
    Empty,
    TooLong(usize),
}

/// The first version: methods `a`, `b` and the streaming `s`.
mod v1 {
    use super::Refusal;
    use courier_rpc::Items;

    #[courier_rpc::service]
    pub trait Shop {
        async fn a(&self, x: u32) -> u32;
        async fn b(&self, name: String) -> Result<String, Refusal>;
        async fn s(&self, to: u32, items: Items<u32>);
    }
}

/// The second version: the same methods, declared in another order (with an
/// argument renamed), and a new method `c`.
mod v2 {
    use super::Refusal;
    use courier_rpc::Items;

    #[courier_rpc::service]
    pub trait Shop {
        async fn b(&self, name: String) -> Result<String, Refusal>;
        async fn c(&self, x: u64) -> u64;
        async fn a(&self, renamed: u32) -> u32;
        async fn s(&self, to: u32, items: Items<u32>);
    }
}

/// `b` takes bytes where it took a string; `a` is unchanged.
mod changed {
    use super::Refusal;

    #[courier_rpc::service]
    pub trait Shop {
        async fn a(&self, x: u32) -> u32;
        async fn b(&self, name: Vec<u8>) -> Result<String, Refusal>;
    }
}

/// `b`'s error type has one more variant, at the end.
mod grown {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    pub enum Refusal {
        Empty,
        TooLong(usize),
        Closed,
    }

    #[courier_rpc::service]
    pub trait Shop {
        async fn a(&self, x: u32) -> u32;
        async fn b(&self, name: String) -> Result<String, Refusal>;
    }
}

struct Impl;

async fn b(name: String) -> Result<String, Refusal> {
    match name.len() {
        0 => Err(Refusal::Empty),
        n if n > 8 => Err(Refusal::TooLong(n)),
        _ => Ok(name.to_uppercase()),
    }
}

async fn s(to: u32, items: Items<u32>) {
    for n in 1..=to {
        if items.send(n).await.is_err() {
            return;
        }
    }
}

impl v1::Shop for Impl {
    async fn a(&self, x: u32) -> u32 {
        x + 1
    }
    async fn b(&self, name: String) -> Result<String, Refusal> {
        b(name).await
    }
    async fn s(&self, to: u32, items: Items<u32>) {
        s(to, items).await
    }
}

impl v2::Shop for Impl {
    async fn b(&self, name: String) -> Result<String, Refusal> {
        b(name).await
    }
    async fn c(&self, x: u64) -> u64 {
        x * 2
    }
    async fn a(&self, renamed: u32) -> u32 {
        renamed + 1
    }
    async fn s(&self, to: u32, items: Items<u32>) {
        s(to, items).await
    }
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "evolution-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn serve_v1() -> ServerHandle {
    let listener = bind(&mem(), &TransportConfig::default()).await.unwrap();
    Server::new(ServerConfig::default())
        .service(v1::ShopServer::new(Impl))
        .spawn(listener)
}

async fn serve_v2() -> ServerHandle {
    let listener = bind(&mem(), &TransportConfig::default()).await.unwrap();
    Server::new(ServerConfig::default())
        .service(v2::ShopServer::new(Impl))
        .spawn(listener)
}

async fn connect(server: &ServerHandle) -> Client {
    Client::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap()
}

async fn sum(mut items: courier_rpc::ItemStream<u32>) -> u32 {
    let mut total = 0;
    while let Some(n) = items.next().await {
        total += n.unwrap();
    }
    total
}

#[tokio::test]
async fn a_v1_client_works_against_a_v2_server() {
    let server = serve_v2().await;
    let shop = v1::ShopClient::new(connect(&server).await);
    assert_eq!(shop.a(41).await.unwrap(), 42);
    assert_eq!(shop.b("tea".into()).await.unwrap(), Ok("TEA".into()));
    assert_eq!(shop.b(String::new()).await.unwrap(), Err(Refusal::Empty));
    assert_eq!(sum(shop.s(10).await.unwrap()).await, 55);
}

#[tokio::test]
async fn a_v2_client_works_against_a_v1_server_except_for_the_new_method() {
    let server = serve_v1().await;
    let shop = v2::ShopClient::new(connect(&server).await);
    assert_eq!(shop.a(1).await.unwrap(), 2);
    assert_eq!(
        shop.b("a long name".into()).await.unwrap(),
        Err(Refusal::TooLong(11))
    );
    assert_eq!(sum(shop.s(4).await.unwrap()).await, 10);
    let err = shop.c(21).await.unwrap_err();
    assert_eq!(
        err,
        RpcError::UnknownMethod {
            service: "Shop".into(),
            method: "c".into()
        }
    );
    assert!(!err.is_retryable());
    // The refusal leaves the connection usable for the methods both know.
    assert_eq!(shop.a(2).await.unwrap(), 3);
}

#[tokio::test]
async fn a_method_whose_argument_type_changed_fails_naming_it() {
    for server in [serve_v1().await, serve_v2().await] {
        let shop = changed::ShopClient::new(connect(&server).await);
        let err = shop.b(b"tea".to_vec()).await.unwrap_err();
        assert_eq!(
            err,
            RpcError::ProtocolMismatch {
                service: "Shop".into(),
                method: "b".into()
            }
        );
        assert!(err.to_string().contains("\"b\""), "{err}");
        assert!(!err.is_retryable());
        // The method that did not change still works.
        assert_eq!(shop.a(9).await.unwrap(), 10);
    }
}

#[tokio::test]
async fn an_enum_variant_added_even_at_the_end_changes_the_methods_using_it() {
    // Postcard could decode the old variants, but the fingerprint traces
    // every variant, so `b` is refused rather than risk a variant the other
    // side cannot decode.
    let server = serve_v1().await;
    let shop = grown::ShopClient::new(connect(&server).await);
    assert_eq!(
        shop.b("tea".into()).await.unwrap_err(),
        RpcError::ProtocolMismatch {
            service: "Shop".into(),
            method: "b".into()
        }
    );
    assert_eq!(shop.a(0).await.unwrap(), 1);
}

#[test]
fn fingerprints_are_per_method_and_ignore_order_and_argument_names() {
    for method in ["a", "b", "s"] {
        let old = v1::ShopClient::method_fingerprint(method);
        assert!(old.is_some(), "{method}");
        assert_eq!(old, v2::ShopClient::method_fingerprint(method), "{method}");
    }
    assert_eq!(v1::ShopClient::method_fingerprint("c"), None);
    assert!(v2::ShopClient::method_fingerprint("c").is_some());
    assert_eq!(v1::ShopClient::METHODS, ["a", "b", "s"]);
    assert_eq!(v2::ShopClient::METHODS, ["b", "c", "a", "s"]);
    assert_eq!(
        changed::ShopClient::method_fingerprint("a"),
        v1::ShopClient::method_fingerprint("a")
    );
    for other in [
        changed::ShopClient::method_fingerprint("b"),
        grown::ShopClient::method_fingerprint("b"),
    ] {
        assert_ne!(other, v1::ShopClient::method_fingerprint("b"));
    }
    // Two methods of identical types still differ: the name counts.
    assert_ne!(
        v2::ShopClient::method_fingerprint("a"),
        v2::ShopClient::method_fingerprint("c")
    );
}

mod order_v1 {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    pub struct Order {
        pub id: u64,
    }
}

mod order_v2 {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    pub struct Order {
        pub id: u64,
        #[serde(default)]
        pub note: String,
    }
}

#[test]
fn a_defaulted_trailing_field_is_not_compatible_with_postcard() {
    // Postcard is not self-describing: a struct is its fields in order, with
    // no count, so a reader expecting `note` runs out of bytes instead of
    // taking the default. Read the other way, an old reader leaves `note`'s
    // bytes unread, to be misread as whatever comes next (or refused as
    // trailing bytes). The fingerprint changes with the field, so calls of
    // the methods taking `Order` are refused up front as a mismatch.
    let old = postcard::to_stdvec(&order_v1::Order { id: 7 }).unwrap();
    assert!(postcard::from_bytes::<order_v2::Order>(&old).is_err());
    let new = postcard::to_stdvec(&order_v2::Order {
        id: 7,
        note: "x".into(),
    })
    .unwrap();
    let (read, rest) = postcard::take_from_bytes::<order_v1::Order>(&new).unwrap();
    assert_eq!((read.id, rest.is_empty()), (7, false));
    assert_ne!(
        courier_wire::schema::Schema::of::<order_v1::Order>().fingerprint,
        courier_wire::schema::Schema::of::<order_v2::Order>().fingerprint
    );
}
