//! `ClientConfig`'s builders: each changes its field only, and a built
//! config behaves as one set by assignment.

use std::sync::Arc;
use std::time::Duration;

use courier_rpc::{
    caller, Authenticator, Client, ClientConfig, RpcError, Secret, Server, ServerConfig,
    DEFAULT_HEARTBEAT,
};
use courier_transport::{Heartbeat, TransportConfig};

#[courier_rpc::service]
trait Whoami {
    async fn whoami(&self) -> Option<String>;
    async fn sleep(&self, ms: u64);
}

struct Host;

impl Whoami for Host {
    async fn whoami(&self) -> Option<String> {
        caller().map(|who| who.to_string())
    }
    async fn sleep(&self, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

struct Tokens;

impl Authenticator for Tokens {
    fn authenticate(&self, token: &Secret) -> Option<String> {
        token
            .matches(&Secret::new("ada-token"))
            .then(|| "ada".into())
    }
}

#[test]
fn each_builder_sets_its_field_and_leaves_the_rest() {
    let default = ClientConfig::default();
    let config = ClientConfig::default().with_timeout(Duration::from_millis(1_500));
    assert_eq!(config.timeout, Duration::from_millis(1_500));
    assert_eq!(config.max_in_flight, default.max_in_flight);
    assert!(config.token.is_none());
    assert_eq!(config.transport.heartbeat, Some(DEFAULT_HEARTBEAT));

    let config = ClientConfig::default().with_max_in_flight(7);
    assert_eq!(config.max_in_flight, 7);
    assert_eq!(config.timeout, default.timeout);

    let config = ClientConfig::default().with_token(Secret::new("t"));
    assert!(config.token.as_ref().unwrap().matches(&Secret::new("t")));
    assert_eq!(config.timeout, default.timeout);

    let transport = TransportConfig::default().with_max_frame_size(4096);
    let config = ClientConfig::default().with_transport(transport);
    assert_eq!(config.transport.max_frame_size, 4096);
    assert_eq!(
        config.transport.heartbeat, None,
        "a replaced transport keeps its own heartbeat"
    );

    let every = Heartbeat::every(Duration::from_secs(3));
    let config = ClientConfig::default()
        .with_transport(TransportConfig::default().with_max_frame_size(4096))
        .with_heartbeat(Some(every));
    assert_eq!(config.transport.heartbeat, Some(every));
    assert_eq!(
        config.transport.max_frame_size, 4096,
        "the heartbeat builder keeps the rest"
    );
    assert_eq!(
        ClientConfig::default()
            .with_heartbeat(None)
            .transport
            .heartbeat,
        None
    );
}

#[test]
fn builders_and_assignment_make_the_same_config() {
    let built = ClientConfig::default()
        .with_timeout(Duration::from_secs(3))
        .with_max_in_flight(12)
        .with_token(Secret::new("x"))
        .with_heartbeat(None);
    let mut assigned = ClientConfig::default();
    assigned.timeout = Duration::from_secs(3);
    assigned.max_in_flight = 12;
    assigned.token = Some(Secret::new("x"));
    assigned.transport.heartbeat = None;
    assert_eq!(format!("{built:?}"), format!("{assigned:?}"));
}

#[tokio::test]
async fn a_built_config_authenticates_and_sets_the_deadline() {
    let listener =
        courier_transport::bind(&"mem://client-config".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    let server = Server::new(ServerConfig::default().with_authenticator(Arc::new(Tokens), true))
        .service(WhoamiServer::new(Host))
        .spawn(listener);
    let config = ClientConfig::default()
        .with_token(Secret::new("ada-token"))
        .with_timeout(Duration::from_millis(100));
    let client = WhoamiClient::new(Client::connect(server.local_addr(), config).await.unwrap());
    assert_eq!(client.client().timeout(), Some(Duration::from_millis(100)));
    assert_eq!(client.whoami().await.unwrap().as_deref(), Some("ada"));
    assert_eq!(
        client.sleep(5_000).await.unwrap_err(),
        RpcError::DeadlineExceeded
    );
}
