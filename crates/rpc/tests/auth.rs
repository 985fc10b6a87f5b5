//! Who may connect and call: the hello exchange, tokens, identities seen by
//! handlers, service permissions, connection limits and idle connections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_rpc::{
    caller, Authenticator, Client, ClientConfig, RpcError, RpcFault, Secret, Server, ServerConfig,
    ServerHandle,
};
use courier_transport::{bind, Address, FrameKind, TransportConfig};

#[courier_rpc::service]
trait Who {
    async fn who(&self) -> Option<String>;
}

#[courier_rpc::service]
trait Admin {
    async fn reset(&self) -> bool;
}

struct Host;

impl Who for Host {
    async fn who(&self) -> Option<String> {
        caller().map(|c| c.to_string())
    }
}

impl Admin for Host {
    async fn reset(&self) -> bool {
        true
    }
}

struct Tokens;

impl Authenticator for Tokens {
    fn authenticate(&self, token: &Secret) -> Option<String> {
        [("alice-token", "alice"), ("bob-token", "bob")]
            .into_iter()
            .find(|(t, _)| token.matches(&Secret::new(*t)))
            .map(|(_, who)| who.to_string())
    }
}

fn mem() -> Address {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Address::mem(format!(
        "auth-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

async fn serve(config: ServerConfig) -> ServerHandle {
    let listener = bind(&mem(), &TransportConfig::default()).await.unwrap();
    Server::new(config)
        .service(WhoServer::new(Host))
        .service(AdminServer::new(Host))
        .spawn(listener)
}

fn as_user(token: Option<&str>) -> ClientConfig {
    let mut config = ClientConfig::default();
    config.token = token.map(Secret::new);
    config
}

fn guarded() -> ServerConfig {
    ServerConfig::default().with_authenticator(Arc::new(Tokens), true)
}

#[tokio::test]
async fn tokens_name_the_caller_and_wrong_or_missing_ones_are_refused_without_echoing_them() {
    let server = serve(guarded()).await;
    let alice = WhoClient::new(
        Client::connect(server.local_addr(), as_user(Some("alice-token")))
            .await
            .unwrap(),
    );
    assert_eq!(alice.who().await.unwrap().as_deref(), Some("alice"));

    let err = Client::connect(server.local_addr(), as_user(Some("stolen-guess")))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Unauthenticated(_)), "{err}");
    assert!(!err.to_string().contains("stolen-guess"), "{err}");
    assert!(!format!("{err:?}").contains("stolen-guess"));
    assert!(!format!("{:?}", as_user(Some("stolen-guess"))).contains("stolen-guess"));

    let err = Client::connect(server.local_addr(), as_user(None))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Unauthenticated(_)), "{err}");

    // Without an authenticator tokens are ignored and callers anonymous.
    let open = serve(ServerConfig::default()).await;
    let anyone = WhoClient::new(
        Client::connect(open.local_addr(), as_user(Some("whatever")))
            .await
            .unwrap(),
    );
    assert_eq!(anyone.who().await.unwrap(), None);
}

#[tokio::test]
async fn nothing_but_a_hello_is_read_from_a_new_connection() {
    let mut config = guarded();
    config.hello_timeout = Duration::from_millis(200);
    let server = serve(config).await;

    // A request before any hello: refused, connection closed, nothing run.
    let mut raw = courier_transport::connect(server.local_addr(), &TransportConfig::default())
        .await
        .unwrap();
    raw.send(courier_transport::Frame::new(FrameKind::Request, 1, "junk"))
        .await
        .unwrap();
    let refusal = raw.recv().await.unwrap().unwrap();
    assert_eq!(refusal.kind, FrameKind::Error);
    let fault: RpcFault = postcard::from_bytes(&refusal.payload).unwrap();
    assert!(matches!(fault, RpcFault::Unauthenticated { .. }), "{fault}");
    assert!(matches!(raw.recv().await, Ok(None) | Err(_)), "closed");

    // Silence: dropped after the hello timeout.
    let mut silent = courier_transport::connect(server.local_addr(), &TransportConfig::default())
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.recv().await {
                Ok(Some(frame)) if frame.kind == FrameKind::Error => continue,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a silent connection is closed");
}

#[tokio::test]
async fn a_denied_service_is_refused_and_the_connection_serves_the_rest() {
    let access: courier_rpc::ServiceAccess =
        Arc::new(|who: Option<&str>, service: &str| service != "Admin" || who == Some("alice"));
    let server = serve(guarded().with_service_access(access)).await;
    let bob = Client::connect(server.local_addr(), as_user(Some("bob-token")))
        .await
        .unwrap();
    let err = AdminClient::new(bob.clone()).reset().await.unwrap_err();
    assert_eq!(
        err,
        RpcError::PermissionDenied("calling service Admin".into())
    );
    assert_eq!(
        WhoClient::new(bob).who().await.unwrap().as_deref(),
        Some("bob"),
        "same connection, allowed service"
    );
    let alice = Client::connect(server.local_addr(), as_user(Some("alice-token")))
        .await
        .unwrap();
    assert!(AdminClient::new(alice).reset().await.unwrap());
}

#[tokio::test]
async fn connections_are_limited_in_total_and_per_identity() {
    let server = serve(guarded().with_max_connections(3, 2)).await;
    let connect = |token: &'static str| {
        let address = server.local_addr().clone();
        async move { Client::connect(&address, as_user(Some(token))).await }
    };
    let a1 = connect("alice-token").await.unwrap();
    let _a2 = connect("alice-token").await.unwrap();
    let err = connect("alice-token").await.unwrap_err();
    assert!(
        matches!(&err, RpcError::TooManyConnections { limit: 2, scope } if scope == " per identity"),
        "{err}"
    );
    let _b1 = connect("bob-token").await.unwrap();
    let err = connect("bob-token").await.unwrap_err();
    assert!(
        matches!(&err, RpcError::TooManyConnections { limit: 3, .. }),
        "{err}"
    );
    assert!(err.is_retryable());
    // A connection closing frees its place.
    drop(a1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while connect("bob-token").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn reserved_connections_let_an_operator_into_a_full_server() {
    let operators: courier_rpc::Privileged = Arc::new(|who: &str| who == "alice");
    let server = serve(
        guarded()
            .with_max_connections(3, 10)
            .with_reserved_connections(1, operators),
    )
    .await;
    let connect = |token: &'static str| {
        let address = server.local_addr().clone();
        async move { Client::connect(&address, as_user(Some(token))).await }
    };
    let _b1 = connect("bob-token").await.unwrap();
    let _b2 = connect("bob-token").await.unwrap();
    let err = connect("bob-token").await.unwrap_err();
    assert!(
        matches!(&err, RpcError::TooManyConnections { limit: 2, .. }),
        "everyone else stops short of the reserved one: {err}"
    );
    let alice = connect("alice-token").await.unwrap();
    assert_eq!(
        WhoClient::new(alice.clone())
            .who()
            .await
            .unwrap()
            .as_deref(),
        Some("alice")
    );
    let err = connect("alice-token").await.unwrap_err();
    assert!(
        matches!(&err, RpcError::TooManyConnections { limit: 3, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_the_client_reconnects_on_its_next_call() {
    let server = serve(ServerConfig::default().with_idle_timeout(Duration::from_millis(100))).await;
    let who = WhoClient::new(
        Client::connect(server.local_addr(), ClientConfig::default())
            .await
            .unwrap(),
    );
    assert_eq!(who.who().await.unwrap(), None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while server.connections() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "closed when idle");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next call may find the old link closed; it reconnects.
    let again = match who.who().await {
        Err(RpcError::Unavailable(_)) => who.who().await,
        other => other,
    };
    assert_eq!(again.unwrap(), None);
}
