//! `wss://`: the gateway behind TLS with a self-signed certificate.

mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use courier_pubsub::Bus;
use courier_web::{tls_config, Gateway, GatewayConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::json;
use support::{Client, WAIT};

#[tokio::test]
async fn a_browser_speaks_the_protocol_over_wss() -> Result<()> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let bus = Bus::new();
    let server = Gateway::new(bus.clone(), GatewayConfig::default())
        .bind("127.0.0.1:0", Some(tls_config(vec![cert.clone()], key)?))
        .await?;
    assert!(
        server.url().starts_with("wss://127.0.0.1:"),
        "{}",
        server.url()
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(server.local_addr()).await?;
    let tls = tokio::time::timeout(
        WAIT,
        connector.connect(ServerName::try_from("localhost")?, tcp),
    )
    .await
    .context("TLS handshake timed out")??;
    let url = format!("wss://localhost:{}/", server.local_addr().port());
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .context("WebSocket handshake timed out")??;
    let mut client = Client { ws };
    client.send(json!({"op": "connect"})).await?;
    assert_eq!(client.frame().await?["op"], "connected");
    client.subscribe("s", "secure.>", None).await?;
    bus.publish("secure.channel", "sealed").await?;
    assert_eq!(client.frame().await?["data"], "sealed");

    // Plain text to a TLS port gets no WebSocket.
    let plain = format!("ws://{}", server.local_addr());
    assert!(support::open(&plain).await.is_err());
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
