//! Server streaming: items pushed by the handler, pulled by the client,
//! with credit-based flow control.

use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use courier_transport::{Frame, FrameKind, FrameSender, SendError};
use courier_wire::shared::Sharing;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

use crate::client::{CallGuard, Link};
use crate::{RpcError, RpcFault};

/// Items a client asks for at a time, and grants again as it consumes.
pub(crate) const WINDOW: u32 = 32;

/// Where a streaming handler sends its items.
///
/// Each [`send`](Items::send) waits while the client has no credit left,
/// so a slow client slows the handler down instead of filling the server's
/// memory.
pub struct Items<T> {
    sink: ItemSink,
    _type: PhantomData<fn(T)>,
}

impl<T> std::fmt::Debug for Items<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Items")
            .field("call", &self.sink.id)
            .finish_non_exhaustive()
    }
}

/// The client went away (or cancelled the call): stop producing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the client is no longer receiving this stream")]
pub struct StreamClosed;

/// Why [`Items::send_checked`] did not send an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ItemError {
    /// The client went away (or cancelled the call): stop producing.
    #[error(transparent)]
    Closed(#[from] StreamClosed),
    /// The encoded item exceeds the connection's frame limit. Nothing was
    /// sent, the credit was kept and the stream stays usable: send it in
    /// smaller pieces.
    #[error("a stream item of {size} bytes exceeds the frame limit of {limit} bytes")]
    TooLarge {
        /// Its encoded size (frame header included).
        size: usize,
        /// The connection's limit.
        limit: usize,
    },
    /// The item could not be serialized. Nothing was sent; the stream
    /// stays usable.
    #[error("a stream item could not be serialized: {0}")]
    Encode(String),
}

impl<T: Serialize> Items<T> {
    /// Sends one item, waiting for credit if the client is behind.
    ///
    /// An item that cannot be sent (too large for a frame, or not
    /// serializable) ends the stream: the client's
    /// [`ItemStream::next`] returns an error rather than a silent end, and
    /// this returns [`StreamClosed`], as every later send does. Use
    /// [`send_checked`](Self::send_checked) to handle such items yourself.
    pub async fn send(&self, item: T) -> Result<(), StreamClosed> {
        match self.send_checked(&item).await {
            Ok(()) => Ok(()),
            Err(ItemError::Closed(closed)) => Err(closed),
            Err(err) => {
                self.sink.fail(&err.to_string()).await;
                Err(StreamClosed)
            }
        }
    }

    /// Sends one item, waiting for credit if the client is behind; an item
    /// that cannot be sent is refused before any I/O and the stream goes on.
    pub async fn send_checked(&self, item: &T) -> Result<(), ItemError> {
        let (Some(credit), Some(sender)) = (&self.sink.credit, &self.sink.sender) else {
            return Err(StreamClosed.into());
        };
        // Spent before the send: the item is encoded straight into the
        // connection's buffer in the send's first poll, so a send dropped
        // at its await has already queued the item and used the credit.
        credit.acquire().await.map_err(|_| StreamClosed)?.forget();
        match sender
            .send_message(FrameKind::StreamItem, self.sink.id, item)
            .await
        {
            Ok(()) => Ok(()),
            // Refused before any byte was queued: the credit comes back.
            Err(SendError::FrameTooLarge { size, limit }) => {
                credit.add_permits(1);
                Err(ItemError::TooLarge { size, limit })
            }
            Err(SendError::Serialize(err)) => {
                credit.add_permits(1);
                Err(ItemError::Encode(err.to_string()))
            }
            Err(_) => Err(StreamClosed.into()),
        }
    }
}

/// The untyped sink the server hands to generated dispatch code.
#[doc(hidden)]
pub struct ItemSink {
    pub(crate) id: u64,
    /// The connection, for a streaming call (`None` for a unary one, which
    /// sends no items: it need not hold the connection).
    pub(crate) sender: Option<FrameSender>,
    /// `None` for a unary call: sending items there is a protocol error.
    /// Closed once an item could not be sent and the stream was ended with
    /// an error, so later sends fail instead of reaching a client that saw
    /// it end.
    pub(crate) credit: Option<Arc<Semaphore>>,
    /// For a client-streaming call: the client's items, and the window the
    /// server announced.
    pub(crate) inbound: Option<(mpsc::Receiver<crate::inbound::Inbound>, u32)>,
}

impl std::fmt::Debug for ItemSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemSink")
            .field("call", &self.id)
            .finish_non_exhaustive()
    }
}

impl ItemSink {
    /// Ends the stream with an error the client sees, because an item could
    /// not be sent (it would otherwise see a clean end when the handler
    /// returns, and never know items were lost). The end the server sends
    /// when the handler returns then reaches no one.
    async fn fail(&self, reason: &str) {
        let (Some(credit), Some(sender)) = (&self.credit, &self.sender) else {
            return;
        };
        // A permit is held while the report is sent, so the client's
        // channel (as large as the window) has room for it.
        let Ok(permit) = credit.acquire().await else {
            return; // Already failed.
        };
        credit.close();
        let fault = RpcFault::ItemNotSent {
            reason: reason.to_string(),
        };
        let payload = postcard::to_stdvec(&fault).unwrap_or_default();
        let _ = sender
            .send(Frame::new(FrameKind::Error, self.id, payload))
            .await;
        drop(permit);
    }

    /// The client's items, for a client-streaming or bidirectional method;
    /// a fault if the request did not say it would send any (a client
    /// built from another definition of the method).
    pub fn incoming<T>(&mut self) -> Result<crate::Incoming<T>, RpcFault> {
        match (self.inbound.take(), &self.sender) {
            (Some((items, window)), Some(sender)) => {
                Ok(crate::Incoming::new(items, sender.clone(), self.id, window))
            }
            _ => Err(RpcFault::Malformed {
                reason: "a client-streaming method called without a stream".into(),
            }),
        }
    }

    /// The typed view for a streaming method.
    pub fn typed<T>(self) -> Items<T> {
        Items {
            sink: self,
            _type: PhantomData,
        }
    }
}

/// The client's end of a streaming call: items in the order the handler
/// sent them. Dropping it cancels the call on the server.
pub struct ItemStream<T> {
    pub(crate) items: mpsc::Receiver<Result<Option<Bytes>, RpcError>>,
    pub(crate) guard: CallGuard,
    pub(crate) link: Arc<Link>,
    /// `None`: the stream has no deadline.
    pub(crate) deadline: Option<Instant>,
    pub(crate) consumed: u32,
    pub(crate) finished: bool,
    pub(crate) _type: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for ItemStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemStream")
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> ItemStream<T> {
    /// The next item; `None` when the handler finished. An error ends the
    /// stream (the deadline passed, the connection died, the server
    /// refused or cancelled the call).
    ///
    /// Cancel-safe: dropping the future (in `select!`, under a `timeout`)
    /// loses no item and no credit. Credit for what was consumed is granted
    /// at the start of the next call, before waiting, and counted as given
    /// only once its frame is queued; an item, once taken, is returned
    /// without another await.
    pub async fn next(&mut self) -> Option<Result<T, RpcError>> {
        if self.finished {
            return None;
        }
        if self.consumed >= WINDOW / 2 {
            // Grant what was consumed, keeping the window full.
            let credit = Frame::new(
                FrameKind::Credit,
                self.guard.id,
                Bytes::from(self.consumed.to_le_bytes().to_vec()),
            );
            // Counted as granted before any await: `feed` queues the frame
            // at once (it may then wait for buffer room), and a frame queued
            // is the connection's writer's to deliver even if this future
            // is dropped. Reset after the await, a cancelled call would
            // grant the same credit again.
            self.consumed = 0;
            let granted = match self.link.sender.feed(credit).await {
                Ok(()) => self.link.sender.flush().await,
                Err(err) => Err(err),
            };
            if let Err(err) = granted {
                self.finished = true;
                return Some(Err(RpcError::Unavailable(err.to_string())));
            }
        }
        let received = match self.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, self.items.recv()).await,
            None => Ok(self.items.recv().await),
        };
        let next = match received {
            Ok(Some(next)) => next,
            Ok(None) => Err(RpcError::Unavailable("connection closed".into())),
            Err(_) => Err(RpcError::DeadlineExceeded),
        };
        match next {
            Ok(Some(bytes)) => {
                self.consumed += 1;
                Some(
                    crate::__private::decode_shared(&bytes, Sharing::Always)
                        .map_err(|err| RpcError::Decode(err.to_string())),
                )
            }
            Ok(None) => {
                self.finished = true;
                self.guard.answered = true;
                None
            }
            Err(err) => {
                self.finished = true;
                self.guard.answered = !matches!(err, RpcError::DeadlineExceeded);
                Some(Err(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_transport::{bind, connect, Address, TransportConfig};
    use std::time::Duration;

    /// `next` polled once and dropped whenever it is not ready, over a link
    /// whose writes block until the test lets the peer read: the credit it
    /// grants waits, and no item may be lost while it does.
    #[tokio::test]
    async fn next_cancelled_while_its_credit_waits_loses_no_item() {
        let address = Address::mem(format!("stream-unit-{}", std::process::id()));
        let config = TransportConfig::default();
        let mut listener = bind(&address, &config).await.unwrap();
        let (client, server) = tokio::join!(connect(&address, &config), listener.accept());
        let (sender, _client_receiver) = client.unwrap().split();
        let (_server_sender, mut server_receiver) = server.unwrap().split();
        // Fill the link: the peer reads nothing until told to.
        let mut filled = 0;
        loop {
            let frame = Frame::new(FrameKind::Data, 0, Bytes::from_static(b"filler"));
            match tokio::time::timeout(Duration::ZERO, sender.feed(frame)).await {
                Ok(Ok(())) => filled += 1,
                Ok(Err(err)) => panic!("{err}"),
                Err(_) => break,
            }
            assert!(filled < 1_000_000, "the link never filled");
        }
        let link = Link::for_test(sender);
        let (tx, rx) = mpsc::channel(WINDOW as usize);
        let total = WINDOW as u64;
        for n in 0..total {
            tx.send(Ok(Some(Bytes::from(postcard::to_stdvec(&n).unwrap()))))
                .await
                .unwrap();
        }
        let mut stream: ItemStream<u64> = ItemStream {
            items: rx,
            guard: CallGuard {
                link: link.clone(),
                id: 1,
                answered: true,
            },
            link,
            deadline: Some(Instant::now() + Duration::from_secs(60)),
            consumed: 0,
            finished: false,
            _type: PhantomData,
        };
        let mut expected = 0;
        let mut stalls = 0;
        while expected < total {
            match tokio::time::timeout(Duration::ZERO, stream.next()).await {
                Ok(Some(Ok(n))) => {
                    assert_eq!(n, expected, "an item was lost while credit waited");
                    expected += 1;
                }
                Ok(other) => panic!("{other:?}"),
                Err(_) => {
                    // Blocked on the credit: let the peer read a little.
                    stalls += 1;
                    assert!(stalls < 10_000, "stuck at {expected}");
                    for _ in 0..64 {
                        match server_receiver.try_recv() {
                            Some(Ok(Some(_))) => {}
                            _ => break,
                        }
                    }
                    tokio::task::yield_now().await;
                }
            }
        }
        assert!(
            stalls > 0,
            "the credit never had to wait: the test proves nothing"
        );
    }
}
