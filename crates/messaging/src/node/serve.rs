//! The server side: accepting connections and serving each one (hello,
//! schema checks, de-duplication, delivery into mailboxes, acks, request
//! handlers).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use courier_transport::{Connection, Flags, Frame, FrameKind, FrameSender};
use tokio::sync::{mpsc, Semaphore};

use super::registry::{lock, Endpoint, Incoming, NodeInner};
use crate::protocol::{self, Hello, Rejection, ABOUT_REQUEST};
use crate::NodeId;

pub(super) async fn accept_loop(node: Weak<NodeInner>, mut listener: courier_transport::Listener) {
    while let Ok(connection) = listener.accept().await {
        let Some(inner) = node.upgrade() else { return };
        let task = tokio::spawn(serve(Arc::downgrade(&inner), connection));
        let mut tasks = lock(&inner.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

/// Serves one incoming connection: delivers data to mailboxes (acknowledging
/// and de-duplicating as each message asks) and runs request handlers.
async fn serve(node: Weak<NodeInner>, connection: Connection) {
    let (sender, mut receiver) = connection.split();
    let Some((me, handshake_timeout, max_handlers)) = node.upgrade().map(|n| {
        (
            Hello {
                node: n.id.as_u128(),
                incarnation: n.incarnation,
            },
            n.config.transport.handshake_timeout,
            n.config.max_handlers,
        )
    }) else {
        return;
    };
    let peer = match tokio::time::timeout(handshake_timeout, receiver.recv()).await {
        Ok(Ok(Some(frame))) if frame.kind == FrameKind::Hello => {
            match protocol::decode_body::<Hello>(&frame.payload) {
                Ok(hello) => hello,
                Err(_) => return,
            }
        }
        _ => return,
    };
    if peer.node == me.node {
        let _ = sender
            .send_message(FrameKind::Error, 0, &Rejection::DuplicateNodeId)
            .await;
        let _ = sender.close().await;
        return;
    }
    if sender.send_message(FrameKind::Hello, 0, &me).await.is_err() {
        return;
    }
    let from = NodeId::from_u128(peer.node);
    let stream = (from, peer.incarnation);
    let handlers = Arc::new(Semaphore::new(max_handlers.max(1)));
    loop {
        // Handle everything a read brought in, then flush the acks once.
        let next = match receiver.try_recv() {
            Some(next) => next,
            None => {
                if sender.flush().await.is_err() {
                    return;
                }
                receiver.recv().await
            }
        };
        let Ok(Some(frame)) = next else { return };
        let Some(inner) = node.upgrade() else { return };
        match frame.kind {
            FrameKind::Data => {
                if let Err(rejection) = deliver(&inner, from, stream, &frame, &sender).await {
                    let refusal = Frame::new(
                        FrameKind::Error,
                        frame.id,
                        postcard::to_stdvec(&rejection).unwrap_or_default(),
                    );
                    let _ = sender.feed(refusal).await;
                }
            }
            FrameKind::Request => {
                let Ok(permit) = handlers.clone().acquire_owned().await else {
                    return;
                };
                let sender = sender.clone();
                match start_request(&inner, &frame.payload) {
                    Ok(work) => {
                        tokio::spawn(async move {
                            let reply = work.await;
                            let _ = sender
                                .send(Frame::new(FrameKind::Response, frame.id, reply))
                                .await;
                            drop(permit);
                        });
                    }
                    Err(rejection) => {
                        let refusal = Frame::new(
                            FrameKind::Error,
                            frame.id,
                            postcard::to_stdvec(&rejection).unwrap_or_default(),
                        )
                        .with_flags(Flags::from_bits(ABOUT_REQUEST));
                        let _ = sender.send(refusal).await;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Delivers one data frame; `Err` is the refusal to send back.
async fn deliver(
    inner: &NodeInner,
    from: NodeId,
    stream: (NodeId, u64),
    frame: &Frame,
    sender: &FrameSender,
) -> Result<(), Rejection> {
    let (low_water, header, body) =
        protocol::parse_data(&frame.payload).map_err(|err| Rejection::Malformed {
            reason: err.to_string(),
        })?;
    let fresh = if header.dedup {
        match lock(&inner.inbox).handle_data(&stream, frame.id, low_water) {
            crate::Verdict::Deliver => true,
            crate::Verdict::Duplicate => false,
            crate::Verdict::Refuse => return Ok(()),
        }
    } else {
        true
    };
    if fresh {
        let (tx, value) = {
            let endpoints = lock(&inner.endpoints);
            match endpoints.get(header.endpoint) {
                Some(Endpoint::Mailbox { schema, decode, tx }) => {
                    if schema.fingerprint != header.fingerprint {
                        return Err(Rejection::SchemaMismatch {
                            endpoint: header.endpoint.to_string(),
                            expected_type: schema.type_name.to_string(),
                        });
                    }
                    (
                        tx.clone(),
                        decode(body).map_err(|reason| Rejection::Malformed { reason })?,
                    )
                }
                _ => {
                    return Err(Rejection::NoSuchEndpoint {
                        endpoint: header.endpoint.to_string(),
                    })
                }
            }
        };
        // A full mailbox makes this connection wait: backpressure, not loss.
        // Acks already fed go out first, so the sender does not retransmit
        // what was delivered.
        let incoming = Incoming { from, body: value };
        let sent = match tx.try_send(incoming) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(incoming)) => {
                let _ = sender.flush().await;
                tx.send(incoming).await.map_err(|_| ())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        };
        if sent.is_err() {
            return Err(Rejection::NoSuchEndpoint {
                endpoint: header.endpoint.to_string(),
            });
        }
    }
    if header.reliable {
        // Fed, not sent: the serving loop flushes acks once it has handled
        // everything already received.
        let _ = sender
            .feed(Frame::new(FrameKind::Ack, frame.id, Bytes::new()))
            .await;
    }
    Ok(())
}

fn start_request(
    inner: &NodeInner,
    payload: &[u8],
) -> Result<Pin<Box<dyn Future<Output = Bytes> + Send>>, Rejection> {
    let (header, body) = protocol::parse_request(payload).map_err(|err| Rejection::Malformed {
        reason: err.to_string(),
    })?;
    let endpoints = lock(&inner.endpoints);
    match endpoints.get(header.endpoint) {
        Some(Endpoint::Responder {
            schema,
            reply_schema,
            handler,
        }) => {
            if schema.fingerprint != header.fingerprint
                || reply_schema.fingerprint != header.reply_fingerprint
            {
                return Err(Rejection::SchemaMismatch {
                    endpoint: header.endpoint.to_string(),
                    expected_type: format!("{} -> {}", schema.type_name, reply_schema.type_name),
                });
            }
            handler(body)
        }
        _ => Err(Rejection::NoSuchEndpoint {
            endpoint: header.endpoint.to_string(),
        }),
    }
}
