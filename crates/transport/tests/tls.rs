//! `tls://`: round trips, mutual TLS identities, and every way it must
//! refuse: plain peers on either side, untrusted and expired certificates,
//! missing settings, and bytes altered in transit.

use courier_test_support::TempDir;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use courier_transport::tls::{generate_dev_certs, DevCerts, Validity};
use courier_transport::{
    bind, connect, Address, ConnectError, Frame, FrameKind, HandshakeError, TlsClient, TlsServer,
    TransportConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn certs(dir: &TempDir, validity: Validity) -> DevCerts {
    generate_dev_certs(
        &dir.0,
        &["localhost".into(), "127.0.0.1".into()],
        &["alice".into()],
        validity,
    )
    .unwrap()
}

fn server_config(certs: &DevCerts) -> TransportConfig {
    TransportConfig::default()
        .with_tls_server(TlsServer::from_pem_files(&certs.server_cert, &certs.server_key).unwrap())
}

fn client_config(certs: &DevCerts) -> TransportConfig {
    TransportConfig::default().with_tls_client(TlsClient::trusting(&certs.ca_cert).unwrap())
}

fn tls_localhost() -> Address {
    "tls://127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn frames_round_trip_over_tls_and_the_certificate_files_are_private() {
    let dir = TempDir::new("roundtrip");
    let certs = certs(&dir, Validity::default());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&certs.ca_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let mut listener = bind(&tls_localhost(), &server_config(&certs))
        .await
        .unwrap();
    assert_eq!(listener.local_addr().scheme(), "tls");
    let mut client = connect(listener.local_addr(), &client_config(&certs))
        .await
        .unwrap();
    let mut server = listener.accept().await.unwrap();
    assert_eq!(server.peer_identity(), None, "no client certificate");
    for size in [0, 100, 1 << 20] {
        client
            .send(Frame::new(FrameKind::Data, size as u64, vec![7u8; size]))
            .await
            .unwrap();
        let frame = server.recv().await.unwrap().unwrap();
        assert_eq!((frame.id, frame.payload.len()), (size as u64, size));
        server.send(frame).await.unwrap();
        assert_eq!(client.recv().await.unwrap().unwrap().payload.len(), size);
    }
}

#[tokio::test]
async fn mutual_tls_names_the_client_and_refuses_one_without_a_certificate() {
    let dir = TempDir::new("mutual");
    let certs = certs(&dir, Validity::default());
    let server = TransportConfig::default().with_tls_server(
        TlsServer::with_mutual_tls(&certs.server_cert, &certs.server_key, &certs.ca_cert).unwrap(),
    );
    let mut listener = bind(&tls_localhost(), &server).await.unwrap();
    let (_, alice_cert, alice_key) = &certs.clients[0];
    let alice = TransportConfig::default()
        .with_tls_client(TlsClient::with_identity(&certs.ca_cert, alice_cert, alice_key).unwrap());
    let client = connect(listener.local_addr(), &alice).await.unwrap();
    let mut accepted = listener.accept().await.unwrap();
    assert_eq!(accepted.peer_identity(), Some("alice"));
    client
        .send(Frame::new(FrameKind::Data, 1, "hi"))
        .await
        .unwrap();
    assert_eq!(accepted.recv().await.unwrap().unwrap().id, 1);

    // Without a certificate: the server refuses, and the client learns of
    // it no later than its first read.
    let anonymous = connect(listener.local_addr(), &client_config(&certs)).await;
    if let Ok(mut anonymous) = anonymous {
        assert!(anonymous.recv().await.is_err(), "refused by the server");
    }
    let stats = listener.stats();
    assert!(stats.refused >= 1 || stats.accepted == 1, "{stats:?}");
}

#[tokio::test]
async fn plain_and_tls_peers_never_talk_and_fail_cleanly_on_both_sides() {
    let dir = TempDir::new("mismatch");
    let certs = certs(&dir, Validity::default());
    let fast = |mut config: TransportConfig| {
        config.handshake_timeout = Duration::from_secs(2);
        config
    };

    // A plain client at a TLS listener.
    let mut tls_listener = bind(&tls_localhost(), &fast(server_config(&certs)))
        .await
        .unwrap();
    let Address::Tls { host, port } = tls_listener.local_addr().clone() else {
        panic!()
    };
    let plain: Address = format!("tcp://{host}:{port}").parse().unwrap();
    let err = connect(&plain, &fast(TransportConfig::default()))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err}");

    // A TLS client at a plain listener: no fallback to plain text.
    let plain_listener = bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
        .await
        .unwrap();
    let Address::Tcp { host, port } = plain_listener.local_addr().clone() else {
        panic!()
    };
    let tls: Address = format!("tls://{host}:{port}").parse().unwrap();
    let err = connect(&tls, &fast(client_config(&certs)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Handshake {
                source: HandshakeError::Tls(_),
                ..
            }
        ),
        "{err}"
    );

    // A tls:// address with no TLS settings is refused outright.
    let err = connect(tls_listener.local_addr(), &TransportConfig::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("with_tls_client"), "{err}");
    let err = bind(&tls_localhost(), &TransportConfig::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("with_tls_server"), "{err}");

    // The TLS listener still serves a proper client.
    let client = connect(tls_listener.local_addr(), &client_config(&certs))
        .await
        .unwrap();
    let mut server = tls_listener.accept().await.unwrap();
    client
        .send(Frame::new(FrameKind::Data, 9, "ok"))
        .await
        .unwrap();
    assert_eq!(server.recv().await.unwrap().unwrap().id, 9);
    assert!(tls_listener.stats().refused >= 1);
}

#[tokio::test]
async fn untrusted_and_expired_certificates_are_refused() {
    let ours = TempDir::new("ours");
    let theirs = TempDir::new("theirs");
    let expired = TempDir::new("expired");
    let ours = certs(&ours, Validity::default());
    let theirs = certs(&theirs, Validity::default());
    let expired = certs(
        &expired,
        Validity {
            from_days_ago: 30,
            until_days_from_now: -1,
        },
    );
    for (server, why) in [(&theirs, "issuer"), (&expired, "expired")] {
        let listener = bind(&tls_localhost(), &server_config(server))
            .await
            .unwrap();
        let err = connect(listener.local_addr(), &client_config(&ours))
            .await
            .unwrap_err();
        let message = err.to_string().to_lowercase();
        assert!(message.contains("certificate"), "{message}");
        // Another CA with the same name shows as a bad signature.
        assert!(
            message.contains(why) || message.contains("unknown") || message.contains("signature"),
            "{why}: {message}"
        );
    }
    // Trusting the right CA but asking for the wrong name.
    let listener = bind(&tls_localhost(), &server_config(&ours)).await.unwrap();
    let Address::Tls { port, .. } = listener.local_addr().clone() else {
        panic!()
    };
    let wrong_name: Address = format!("tls://127.0.0.2:{port}").parse().unwrap();
    if let Err(err) = connect(&wrong_name, &client_config(&ours)).await {
        let message = err.to_string().to_lowercase();
        assert!(
            message.contains("certificate") || message.contains("refused"),
            "{message}"
        );
    } else {
        panic!("a certificate for 127.0.0.1 accepted for 127.0.0.2");
    }
}

/// Forwards bytes to `target`; while `tamper` is set, flips one bit in
/// each chunk going client → server.
async fn tampering_proxy(target: std::net::SocketAddr, tamper: Arc<AtomicBool>) -> Address {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(target).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let tamper = tamper.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 * 1024];
                while let Ok(n) = client_read.read(&mut buffer).await {
                    if n == 0 {
                        return;
                    }
                    if tamper.load(Ordering::Acquire) {
                        buffer[n - 1] ^= 0x01;
                    }
                    if server_write.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
        }
    });
    format!("tls://localhost:{}", address.port())
        .parse()
        .unwrap()
}

#[tokio::test]
async fn bytes_altered_in_transit_end_the_connection_and_are_never_delivered() {
    let dir = TempDir::new("tamper");
    let certs = certs(&dir, Validity::default());
    let mut listener = bind(&tls_localhost(), &server_config(&certs))
        .await
        .unwrap();
    let Address::Tls { port, .. } = listener.local_addr().clone() else {
        panic!()
    };
    let tamper = Arc::new(AtomicBool::new(false));
    let proxied = tampering_proxy(([127, 0, 0, 1], port).into(), tamper.clone()).await;
    let client = connect(&proxied, &client_config(&certs)).await.unwrap();
    let mut server = listener.accept().await.unwrap();
    client
        .send(Frame::new(FrameKind::Data, 1, "intact"))
        .await
        .unwrap();
    assert_eq!(
        &server.recv().await.unwrap().unwrap().payload[..],
        b"intact"
    );

    tamper.store(true, Ordering::Release);
    client
        .send(Frame::new(FrameKind::Data, 2, "altered on the way"))
        .await
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), server.recv())
        .await
        .expect("the server noticed within 10 s");
    assert!(outcome.is_err(), "delivered despite tampering: {outcome:?}");
}
