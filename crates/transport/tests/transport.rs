//! Every transport at its own boundary: round trips, concurrency, close,
//! limits and hostile input.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{fresh, pair, ALL, STREAMS};
use courier_transport::*;
use courier_wire::{DecodeError, FrameCodec, PreambleError, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn large_payload(kind: &str) -> Bytes {
    // UDP frames must fit one datagram; the others take a 1 MiB frame.
    let size = if kind == "udp" { 60_000 } else { 1 << 20 };
    (0..size)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn every_transport_round_trips_small_and_large_frames() {
    let config = TransportConfig::default();
    for kind in ALL {
        let (_listener, mut client, mut server) = pair(kind, &config).await;
        let frames = [
            Frame::data(1, Bytes::new()),
            Frame::data(2, &b"small"[..]).with_flags(Flags::from_bits(0x80)),
            Frame::new(FrameKind::Request, u64::MAX, large_payload(kind)),
        ];
        for frame in &frames {
            // Send and receive concurrently: a 1 MiB frame does not fit in
            // the kernel's socket buffers on its own.
            let (sent, got) = tokio::join!(client.send(frame.clone()), server.recv());
            sent.unwrap();
            let got = got.unwrap().expect("frame");
            assert_eq!(&got, frame, "{kind}: server side");
            let (sent, echoed) = tokio::join!(server.send(got), client.recv());
            sent.unwrap();
            assert_eq!(&echoed.unwrap().unwrap(), frame, "{kind}: client side");
        }
    }
}

#[tokio::test]
async fn typed_messages_travel_on_every_transport() {
    let config = TransportConfig::default();
    for kind in ALL {
        let (_listener, client, mut server) = pair(kind, &config).await;
        client
            .send_message(FrameKind::Request, 9, &("sum", vec![1u32, 2, 3]))
            .await
            .unwrap();
        let frame = server.recv().await.unwrap().unwrap();
        let (op, args): (&str, Vec<u32>) = frame.decode_payload().unwrap();
        assert_eq!(
            (frame.kind, frame.id, op, args),
            (FrameKind::Request, 9, "sum", vec![1, 2, 3]),
            "{kind}"
        );
    }
}

#[tokio::test]
async fn oversized_frames_are_refused_by_the_sender_and_the_connection_stays_usable() {
    let config = TransportConfig::default().with_max_frame_size(1000);
    for kind in ALL {
        let (_listener, client, mut server) = pair(kind, &config).await;
        let err = client
            .send(Frame::data(1, vec![0u8; 2000]))
            .await
            .unwrap_err();
        match &err {
            SendError::FrameTooLarge { size, limit } => {
                // header + payload, plus the checksum trailer UDP always carries
                let expected = if kind == "udp" { 2016 } else { 2012 };
                assert_eq!(*size, expected, "{kind}");
                assert!(*limit <= 1000, "{kind}");
            }
            other => panic!("{kind}: {other:?}"),
        }
        assert!(!err.is_retryable());
        let err = client
            .send_message(FrameKind::Data, 1, &vec![0u8; 2000])
            .await
            .unwrap_err();
        assert!(
            matches!(err, SendError::FrameTooLarge { .. }),
            "{kind}: {err:?}"
        );

        client.send(Frame::data(2, &b"fits"[..])).await.unwrap();
        assert_eq!(server.recv().await.unwrap().unwrap().id, 2, "{kind}");
    }
}

#[tokio::test]
async fn udp_refuses_frames_larger_than_a_datagram() {
    let mut config = TransportConfig::default();
    config.max_datagram_size = 1472;
    let (_listener, client, _server) = pair("udp", &config).await;
    let err = client
        .send(Frame::data(1, vec![0u8; 1500]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SendError::FrameTooLarge { limit: 1468, .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_halves_work_from_many_tasks_at_once() {
    const TASKS: u64 = 8;
    const PER_TASK: u64 = 2000;
    let config = TransportConfig::default();
    for kind in STREAMS {
        let (_listener, client, server) = pair(kind, &config).await;
        let (_server_tx, mut server_rx) = server.split();
        let (client_tx, _client_rx) = client.split();

        let senders: Vec<_> = (0..TASKS)
            .map(|task| {
                let tx = client_tx.clone();
                tokio::spawn(async move {
                    for seq in 0..PER_TASK {
                        let frame = Frame::data(task << 32 | seq, vec![task as u8; 100]);
                        if seq % 3 == 0 {
                            tx.feed(frame).await.unwrap();
                        } else {
                            tx.send(frame).await.unwrap();
                        }
                    }
                    tx.flush().await.unwrap();
                })
            })
            .collect();

        let mut next: HashMap<u64, u64> = HashMap::new();
        for _ in 0..TASKS * PER_TASK {
            let frame = server_rx.recv().await.unwrap().expect("frame");
            let (task, seq) = (frame.id >> 32, frame.id & 0xFFFF_FFFF);
            let expected = next.entry(task).or_default();
            assert_eq!(seq, *expected, "{kind}: task {task} out of order");
            assert!(frame.payload.iter().all(|&b| b == task as u8));
            *expected += 1;
        }
        for sender in senders {
            sender.await.unwrap();
        }
        assert!(next.values().all(|&n| n == PER_TASK));
    }
}

#[tokio::test]
async fn close_flushes_everything_queued_then_ends_the_stream() {
    let config = TransportConfig::default();
    for kind in STREAMS {
        let (_listener, client, mut server) = pair(kind, &config).await;
        let receiver = tokio::spawn(async move {
            let mut count = 0u64;
            while let Some(frame) = server.recv().await.unwrap() {
                assert_eq!(frame.id, count);
                count += 1;
            }
            count
        });
        for id in 0..10_000 {
            client
                .feed(Frame::data(id, &b"0123456789"[..]))
                .await
                .unwrap();
        }
        let sender = client.sender();
        client.close().await.unwrap();
        assert_eq!(receiver.await.unwrap(), 10_000, "{kind}");
        assert!(matches!(
            sender.send(Frame::data(0, Bytes::new())).await,
            Err(SendError::Closed)
        ));
    }
}

#[tokio::test]
async fn dropping_one_end_is_seen_as_closed_by_the_other() {
    let config = TransportConfig::default();
    for kind in STREAMS {
        let (_listener, client, mut server) = pair(kind, &config).await;
        drop(client);
        assert!(
            server.recv().await.unwrap().is_none(),
            "{kind}: recv sees the end"
        );
        if kind == "mem" {
            let err = server.send(Frame::data(1, Bytes::new())).await.unwrap_err();
            assert!(matches!(err, SendError::Closed), "{kind}: {err:?}");
        }
    }
}

#[tokio::test]
async fn an_http_request_is_refused_and_the_listener_keeps_serving() {
    let config = TransportConfig::default();
    let mut listener = bind(&fresh("tcp"), &config).await.unwrap();
    let Address::Tcp { port, .. } = listener.local_addr().clone() else {
        unreachable!()
    };

    let mut http = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    // The server answers with its preamble and hangs up; it never treats
    // "GET " as a frame length.
    let _ = http.read_to_end(&mut reply).await;
    assert!(reply.starts_with(b"COURIER"), "{reply:?}");
    assert_eq!(reply.len(), 8);

    // A real client still gets through.
    let client = connect(listener.local_addr(), &config).await.unwrap();
    client.send(Frame::data(1, &b"after"[..])).await.unwrap();
    let mut server = listener.accept().await.unwrap();
    assert_eq!(&server.recv().await.unwrap().unwrap().payload[..], b"after");
    assert_eq!(listener.stats().refused, 1);
    assert_eq!(listener.stats().accepted, 1);
}

/// A TCP server that answers every connection with `reply` and hangs up.
async fn fake_server(reply: &'static [u8]) -> Address {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = Address::tcp(listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket.write_all(reply).await;
        }
    });
    address
}

#[tokio::test]
async fn a_client_refuses_a_server_that_is_not_courier() {
    let address = fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    let err = connect(&address, &TransportConfig::default())
        .await
        .unwrap_err();
    assert!(!err.is_retryable());
    let ConnectError::Handshake {
        source: HandshakeError::Preamble(PreambleError::NotCourier { received }),
        ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(received, "HTTP/1.1");
    assert!(err.to_string().contains("does not speak Courier"), "{err}");
}

#[tokio::test]
async fn a_client_refuses_a_server_of_another_version() {
    const FUTURE: &[u8] = b"COURIER\x09";
    let address = fake_server(FUTURE).await;
    let err = connect(&address, &TransportConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Handshake {
                source: HandshakeError::Preamble(PreambleError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: 9
                }),
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_server_refuses_a_client_of_another_version() {
    let listener = bind(&fresh("tcp"), &TransportConfig::default())
        .await
        .unwrap();
    let Address::Tcp { port, .. } = listener.local_addr().clone() else {
        unreachable!()
    };
    let mut raw = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    raw.write_all(b"COURIER\x09").await.unwrap();
    let mut reply = Vec::new();
    let _ = raw.read_to_end(&mut reply).await;
    assert_eq!(reply, courier_wire::preamble::preamble());
    while listener.stats().refused == 0 {
        tokio::task::yield_now().await;
    }
}

/// A raw TCP client that has completed the preamble exchange.
async fn raw_client(listener: &Listener) -> TcpStream {
    let Address::Tcp { port, .. } = listener.local_addr().clone() else {
        unreachable!()
    };
    let mut raw = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    raw.write_all(&courier_wire::preamble::preamble())
        .await
        .unwrap();
    let mut theirs = [0u8; 8];
    raw.read_exact(&mut theirs).await.unwrap();
    raw
}

#[tokio::test]
async fn a_peer_dying_mid_frame_is_an_unexpected_eof_not_a_partial_frame() {
    let mut listener = bind(&fresh("tcp"), &TransportConfig::default())
        .await
        .unwrap();
    let mut raw = raw_client(&listener).await;
    let mut wire = BytesMut::new();
    FrameCodec::new()
        .encode_frame(&Frame::data(1, vec![7u8; 100]), &mut wire)
        .unwrap();
    raw.write_all(&wire[..50]).await.unwrap();
    drop(raw);

    let mut server = listener.accept().await.unwrap();
    let err = server.recv().await.unwrap_err();
    assert!(
        matches!(err, RecvError::UnexpectedEof { buffered: 50 }),
        "{err:?}"
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn garbage_and_oversized_frames_end_only_their_own_connection() {
    let config = TransportConfig::default().with_max_frame_size(64 * 1024);
    let mut listener = bind(&fresh("tcp"), &config).await.unwrap();

    let mut oversized = raw_client(&listener).await;
    let mut header = BytesMut::new();
    header.put_u32_le(u32::MAX);
    oversized.write_all(&header).await.unwrap();
    let mut bad_oversized = listener.accept().await.unwrap();

    let mut garbage = raw_client(&listener).await;
    garbage.write_all(&[0xFF; 64]).await.unwrap();
    let mut bad_garbage = listener.accept().await.unwrap();

    let good = connect(listener.local_addr(), &config).await.unwrap();
    let mut good_server = listener.accept().await.unwrap();

    let err = bad_oversized.recv().await.unwrap_err();
    assert!(
        matches!(err, RecvError::Decode(DecodeError::FrameTooLarge { size, limit: 65536 }) if size == u32::MAX as usize),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    let err = bad_garbage.recv().await.unwrap_err();
    assert!(
        matches!(err, RecvError::Decode(DecodeError::FrameTooLarge { .. })),
        "{err:?}"
    );

    // The offender's connection is closed: it reads the end of the stream,
    // and the server's side refuses to send on it.
    for raw in [&mut oversized, &mut garbage] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut rest)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");
    }
    let refused = bad_garbage
        .send(Frame::data(9, Bytes::new()))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, SendError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData),
        "{refused:?}"
    );

    good.send(Frame::data(3, &b"unaffected"[..])).await.unwrap();
    assert_eq!(
        &good_server.recv().await.unwrap().unwrap().payload[..],
        b"unaffected"
    );
}

#[tokio::test]
async fn a_bad_header_is_refused_before_its_payload_arrives() {
    let mut listener = bind(&fresh("tcp"), &TransportConfig::default())
        .await
        .unwrap();
    let mut raw = raw_client(&listener).await;
    let mut header = BytesMut::new();
    header.put_u32_le(1000); // announces a payload that never comes
    header.put_slice(&[PROTOCOL_VERSION, 99, 0, 0]);
    header.put_u64_le(0);
    raw.write_all(&header).await.unwrap();
    let mut server = listener.accept().await.unwrap();
    let err = server.recv().await.unwrap_err();
    assert!(
        matches!(err, RecvError::Decode(DecodeError::UnknownKind(99))),
        "{err:?}"
    );
    drop(raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_on_one_listener() {
    const CLIENTS: u64 = 1000;
    // Room for every handshake at once: with the default 256, a handshake
    // slower than 100 ms (a loaded 2-core machine) is taken for a staller
    // and dropped to make room, which is that policy's job, not this
    // test's subject.
    let mut config = TransportConfig::default();
    config.max_pending_handshakes = CLIENTS as usize;
    let mut listener = bind(&fresh("tcp"), &config).await.unwrap();
    let address = listener.local_addr().clone();
    let server = tokio::spawn(async move {
        for _ in 0..CLIENTS {
            let mut conn = listener.accept().await.unwrap();
            tokio::spawn(async move {
                while let Ok(Some(frame)) = conn.recv().await {
                    conn.send(frame).await.unwrap();
                }
            });
        }
        listener
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (address, config) = (address.clone(), config.clone());
            tokio::spawn(async move {
                let mut conn = connect(&address, &config).await.unwrap();
                conn.send(Frame::data(id, id.to_le_bytes().to_vec()))
                    .await
                    .unwrap();
                let echo = conn.recv().await.unwrap().unwrap();
                assert_eq!(echo.id, id);
                conn
            })
        })
        .collect();
    let mut open = Vec::new();
    for client in clients {
        open.push(client.await.unwrap());
    }
    let listener = server.await.unwrap();
    assert_eq!(listener.stats().accepted, CLIENTS);
    assert_eq!(open.len() as u64, CLIENTS);
}

#[tokio::test]
async fn a_corrupt_udp_datagram_is_dropped_and_counted_never_delivered() {
    let config = TransportConfig::default();
    let mut listener = bind(&fresh("udp"), &config).await.unwrap();
    let Address::Udp { port, .. } = listener.local_addr().clone() else {
        unreachable!()
    };
    let raw = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    raw.connect(("127.0.0.1", port)).await.unwrap();
    let codec = FrameCodec::new().checksum(Checksum::Crc32c);
    let datagram = |id: u64, corrupt: bool| {
        let mut buf = BytesMut::new();
        codec
            .encode_frame(&Frame::data(id, &b"payload"[..]), &mut buf)
            .unwrap();
        if corrupt {
            buf[18] ^= 0x40;
        }
        buf
    };

    // Noise from a new peer creates no connection.
    raw.send(&datagram(0, true)).await.unwrap();
    raw.send(&datagram(1, false)).await.unwrap();
    raw.send(&datagram(2, true)).await.unwrap();
    raw.send(&datagram(3, false)).await.unwrap();

    let mut server = listener.accept().await.unwrap();
    assert_eq!(server.recv().await.unwrap().unwrap().id, 1);
    assert_eq!(server.recv().await.unwrap().unwrap().id, 3);
    assert_eq!(server.discarded_datagrams(), 1);
    assert_eq!(listener.stats().dropped_datagrams, 1);
    assert_eq!(listener.stats().accepted, 1);
}

#[tokio::test]
async fn unix_listeners_replace_stale_files_refuse_live_ones_and_clean_up() {
    let config = TransportConfig::default();
    let address = fresh("unix");
    let Address::Unix(path) = &address else {
        unreachable!()
    };

    // A file left behind by a crashed process.
    let stale = std::os::unix::net::UnixListener::bind(path).unwrap();
    drop(stale);
    assert!(path.exists());
    let listener = bind(&address, &config).await.unwrap();

    let err = bind(&address, &config).await.unwrap_err();
    assert!(matches!(err, BindError::InUse { .. }), "{err:?}");

    drop(listener);
    assert!(!path.exists(), "socket file removed on drop");
}

#[tokio::test]
async fn mem_names_are_exclusive_until_released() {
    let config = TransportConfig::default();
    let address = fresh("mem");
    let err = connect(&address, &config).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::NoListener { .. }) && err.is_retryable(),
        "{err:?}"
    );

    let listener = bind(&address, &config).await.unwrap();
    assert!(matches!(
        bind(&address, &config).await,
        Err(BindError::InUse { .. })
    ));
    drop(listener);
    let _again = bind(&address, &config).await.unwrap();
}

#[tokio::test]
async fn connection_refused_is_a_clear_retryable_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = Address::tcp(listener.local_addr().unwrap());
    drop(listener);
    let err = connect(&address, &TransportConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ConnectError::Io { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(err.to_string().contains(&address.to_string()));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let mut config = TransportConfig::default();
    config.handshake_timeout = Duration::from_secs(2);
    let listener = bind(&fresh("unix"), &config).await.unwrap();
    let Address::Unix(path) = listener.local_addr().clone() else {
        unreachable!()
    };
    let mut silent = tokio::net::UnixStream::connect(&path).await.unwrap();
    // Says nothing; the server gives up after the handshake timeout.
    let mut reply = Vec::new();
    let _ = silent.read_to_end(&mut reply).await;
    assert_eq!(reply.len(), 8, "only the server's preamble");
    while listener.stats().refused == 0 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn try_recv_returns_what_has_arrived_without_waiting() {
    let config = TransportConfig::default();
    for kind in STREAMS {
        let (_listener, client, mut server) = pair(kind, &config).await;
        assert!(server.try_recv().is_none(), "{kind}: nothing yet");
        for id in 0..3 {
            client.feed(Frame::data(id, &b"x"[..])).await.unwrap();
        }
        client.flush().await.unwrap();
        // The first recv waits for the read; the rest are already buffered.
        assert_eq!(server.recv().await.unwrap().unwrap().id, 0);
        let mut rest = Vec::new();
        while rest.len() < 2 {
            match server.try_recv() {
                Some(frame) => rest.push(frame.unwrap().unwrap().id),
                None => rest.push(server.recv().await.unwrap().unwrap().id),
            }
        }
        assert_eq!(rest, [1, 2], "{kind}");
        drop(client);
        assert!(server.recv().await.unwrap().is_none(), "{kind}");
        assert!(matches!(server.try_recv(), Some(Ok(None)) | None), "{kind}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_stall_cannot_starve_a_real_client() {
    let mut config = TransportConfig::default();
    config.max_pending_handshakes = 8;
    config.handshake_timeout = Duration::from_secs(20);
    let mut listener = bind(&"tcp://127.0.0.1:0".parse().unwrap(), &config)
        .await
        .unwrap();
    let Address::Tcp { port, .. } = listener.local_addr().clone() else {
        panic!()
    };
    // Fifty clients that connect and say nothing: with handshakes simply
    // queued, the real client below would wait behind all of them
    // (50 / 8 x 20 s) and time out.
    let mut stallers = Vec::new();
    for _ in 0..50 {
        stallers.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let mut client_config = TransportConfig::default();
    client_config.connect_timeout = Duration::from_secs(10);
    client_config.handshake_timeout = Duration::from_secs(10);
    let client = connect(listener.local_addr(), &client_config)
        .await
        .unwrap();
    let mut server = listener.accept().await.unwrap();
    client
        .send(Frame::new(FrameKind::Data, 1, "through"))
        .await
        .unwrap();
    assert_eq!(server.recv().await.unwrap().unwrap().id, 1);
    assert!(listener.stats().refused >= 1, "stallers were dropped");
    drop(stallers);
}

/// A peer that sends its preamble and then pings without ever reading our
/// pongs is a slow consumer: what we queue for it stays within the send
/// buffer, and the pongs that do not fit are dropped, not queued.
#[tokio::test]
async fn a_peer_that_pings_and_never_reads_cannot_grow_our_send_buffer() {
    let mut config = TransportConfig::default();
    config.send_buffer = 64 * 1024;
    let mut listener = bind(&fresh("tcp"), &config).await.unwrap();
    let mut raw = raw_client(&listener).await;
    let mut server = listener.accept().await.unwrap();
    let sender = server.sender();
    let reader = tokio::spawn(async move {
        // Pings are absorbed (and answered) inside recv; the data frame at
        // the end says every ping before it has been seen.
        let last = server.recv().await.unwrap().unwrap();
        assert_eq!(last.kind, FrameKind::Data);
        server
    });

    // 16 bytes a ping: 400,000 pings are 6.4 MB of pongs owed, far more
    // than the socket buffers of both sides hold.
    let codec = FrameCodec::new();
    let mut pings = BytesMut::new();
    for id in 0..400_000u64 {
        codec
            .encode_frame(&Frame::new(FrameKind::Ping, id, Bytes::new()), &mut pings)
            .unwrap();
    }
    codec
        .encode_frame(&Frame::data(0, &b"end"[..]), &mut pings)
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), raw.write_all(&pings))
        .await
        .expect("the server keeps reading")
        .unwrap();
    let _server = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("every ping read")
        .unwrap();

    let buffered = sender.buffered_bytes();
    assert!(
        buffered <= config.send_buffer + 64,
        "{buffered} bytes queued for a peer that does not read"
    );
    assert!(sender.dropped_control_frames() > 0, "pongs were dropped");
    drop(raw);
}

/// Two tasks send against a reader that is not reading yet; the one that is
/// writing is cancelled mid-write. The other's frame (and the cancelled
/// one's, already handed to the link) still arrive, with no further send.
#[tokio::test]
async fn a_send_cancelled_mid_write_strands_no_other_frame() {
    // Larger than the socket buffers of both ends together, even on a
    // loopback that autotunes them to several MiB.
    let config = TransportConfig::default().with_max_frame_size(64 << 20);
    let (_listener, client, mut server) = pair("tcp", &config).await;
    let big = Bytes::from(vec![1u8; 32 << 20]);
    let writing = tokio::spawn({
        let sender = client.sender();
        let big = big.clone();
        async move { sender.send(Frame::data(1, big)).await }
    });
    // Let it start writing: the socket fills long before 32 MiB are taken.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !writing.is_finished(),
        "a 32 MiB frame waits for the reader"
    );
    client.send(Frame::data(2, &b"small"[..])).await.unwrap();
    writing.abort();
    assert!(writing.await.unwrap_err().is_cancelled());

    let mut ids = Vec::new();
    while ids.len() < 2 {
        let frame = tokio::time::timeout(Duration::from_secs(30), server.recv())
            .await
            .expect("no frame is stranded")
            .unwrap()
            .unwrap();
        ids.push(frame.id);
    }
    assert_eq!(ids, vec![1, 2]);
    drop(client);
}
