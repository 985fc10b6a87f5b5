//! Calls and streams without a deadline: none on the wire, none on the
//! server, and a stream that outlives any timeout; an older server gets
//! the long timeout it always got instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use courier_rpc::{CallContext, Client, ClientConfig, Items, RpcError, Server, ServerConfig};
use courier_transport::{bind, Address, FrameKind, TransportConfig};

#[courier_rpc::service]
pub trait Clock {
    /// The call's deadline as the handler sees it: `None` for none.
    async fn remaining_ms(&self) -> Option<u64>;
    /// One item a year, for ever.
    async fn years(&self, items: Items<u64>);
    /// Records whether the one-way call had a deadline on the server.
    #[oneway]
    async fn note(&self);
    /// What `note` saw, oldest first.
    async fn noted(&self) -> Vec<bool>;
}

/// Whether each `note` had a deadline.
static NOTED: std::sync::Mutex<Vec<bool>> = std::sync::Mutex::new(Vec::new());

struct Host;

impl Clock for Host {
    async fn remaining_ms(&self) -> Option<u64> {
        let call = CallContext::current().expect("inside a handler");
        assert_eq!(call.deadline().is_none(), call.remaining().is_none());
        assert_eq!(
            courier_rpc::remaining().is_none(),
            call.deadline().is_none()
        );
        call.remaining().map(|left| left.as_millis() as u64)
    }
    async fn years(&self, items: Items<u64>) {
        for year in 0.. {
            if items.send(year).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)).await;
        }
    }
    async fn note(&self) {
        let call = CallContext::current().expect("inside a handler");
        NOTED.lock().unwrap().push(call.deadline().is_some());
    }
    async fn noted(&self) -> Vec<bool> {
        NOTED.lock().unwrap().clone()
    }
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "no-deadline-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn clock() -> (courier_rpc::ServerHandle, ClockClient) {
    let listener = bind(&mem(), &TransportConfig::default()).await.unwrap();
    let server = Server::new(ServerConfig::default())
        .service(ClockServer::new(Host))
        .spawn(listener);
    // No heartbeats: under paused time, years pass in one step only when
    // no timer is due before.
    let config = ClientConfig::default().with_heartbeat(None);
    let client = ClockClient::new(Client::connect(server.local_addr(), config).await.unwrap());
    (server, client)
}

#[tokio::test]
async fn a_call_without_a_deadline_has_none_on_the_server() {
    let (_server, clock) = clock().await;
    let bounded = clock.remaining_ms().await.unwrap();
    assert!(matches!(bounded, Some(ms) if ms <= 10_000), "{bounded:?}");
    let open = clock.without_deadline();
    assert_eq!(open.client().timeout(), None);
    assert_eq!(open.remaining_ms().await.unwrap(), None);
    // `with_timeout` puts one back.
    let again = open.with_timeout(Duration::from_secs(3));
    assert!(matches!(again.remaining_ms().await.unwrap(), Some(ms) if ms <= 3_000));
}

#[tokio::test(start_paused = true)]
async fn a_stream_without_a_deadline_outlives_the_old_ten_year_timeout() {
    let (server, clock) = clock().await;
    let mut years = clock.without_deadline().years().await.unwrap();
    for expected in 0..12 {
        assert_eq!(years.next().await.unwrap().unwrap(), expected);
    }
    assert_eq!(server.open_streams(), 1);
    drop(years);
    while server.open_streams() != 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // With a deadline, the same stream ends at it.
    let mut bounded = clock
        .with_timeout(Duration::from_secs(3 * 365 * 24 * 3600))
        .years()
        .await
        .unwrap();
    let mut outcome = None;
    while let Some(year) = bounded.next().await {
        if let Err(err) = year {
            outcome = Some(err);
        }
    }
    assert_eq!(outcome, Some(RpcError::DeadlineExceeded));
}

/// A server from before "no deadline" (its welcome has no extension):
/// the client sends the request in the old layout with the long timeout
/// such callers always sent, and no extension it could not read.
#[tokio::test]
async fn an_older_server_gets_the_old_layout_and_a_long_timeout() {
    let mut listener = bind(&mem(), &TransportConfig::default()).await.unwrap();
    let address = listener.local_addr().clone();
    let old = tokio::spawn(async move {
        let mut conn = listener.accept().await.unwrap();
        let hello = conn.recv().await.unwrap().unwrap();
        assert_eq!(hello.kind, FrameKind::Hello);
        conn.send_message(
            FrameKind::Hello,
            0,
            &courier_rpc::auth::Welcome { identity: None },
        )
        .await
        .unwrap();
        let request = conn.recv().await.unwrap().unwrap();
        assert_eq!(request.kind, FrameKind::Request);
        type OldHeader = (String, String, u64, u64, u32);
        let ((_, method, _, timeout_ms, window), args): (OldHeader, (u32,)) =
            postcard::from_bytes(&request.payload).expect("the old layout");
        assert_eq!(method, "remaining_ms");
        assert_eq!(args, (7,), "arguments right after the header");
        assert_eq!(request.flags.bits(), 0, "no extension flag");
        assert_eq!(window, 0);
        let reply: Option<u64> = Some(timeout_ms);
        conn.send_message(FrameKind::Response, request.id, &reply)
            .await
            .unwrap();
        std::future::pending::<()>().await;
    });
    let client = Client::connect(&address, ClientConfig::default())
        .await
        .unwrap()
        .without_deadline();
    let timeout_ms: Option<u64> = client
        .call("Clock", "remaining_ms", 0, &(7u32,))
        .await
        .unwrap();
    assert_eq!(timeout_ms, Some(10 * 365 * 24 * 3600 * 1000));
    old.abort();
}

/// A one-way call runs inline on the server's reader and cannot be
/// cancelled: even from a client without a deadline it carries one, so a
/// handler that never returned could not stop the connection for good.
#[tokio::test]
async fn a_one_way_call_has_a_deadline_even_from_a_client_without_one() {
    let (_server, clock) = clock().await;
    clock.note().await.unwrap();
    clock.without_deadline().note().await.unwrap();
    // A later call on the same connection is answered after both ran.
    assert_eq!(clock.noted().await.unwrap(), [true, true]);
}
