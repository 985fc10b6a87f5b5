//! Client streaming: items the client sends and the handler pulls, with the
//! same credit-based flow control as server streaming, the other way.
//!
//! The server announces its window in the welcome (`inbound_window`); the
//! client may have that many items unread at the server and sends more only
//! as the handler reads and the server grants credit, so a handler that
//! does not read holds the client to the window, and the server never
//! buffers more than the window per stream.

use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use courier_transport::{Flags, Frame, FrameKind, FrameSender, SendError};
use courier_wire::shared::Sharing;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::client::{CallGuard, Link};
use crate::protocol::ABANDONED;
use crate::RpcError;

/// What the connection's reader hands a client-streaming handler.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// An item, and its share of the connection's inbound byte budget
    /// (given back when the item is dropped: read, or the call gone).
    Item(Bytes, Option<tokio::sync::OwnedSemaphorePermit>),
    /// The client finished sending.
    End,
    /// The client dropped its sender without finishing.
    Abandoned,
}

/// Why [`Incoming::next`] returned no item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IncomingError {
    /// The client dropped its sender without finishing: the items so far
    /// may be incomplete. No more come.
    #[error("the client abandoned its stream without finishing it")]
    Abandoned,
    /// An item could not be decoded (client and server disagree on its
    /// type). The stream goes on with the next item.
    #[error("a stream item from the client could not be decoded: {0}")]
    Decode(String),
}

/// The handler's end of a client-streaming (or bidirectional) call: the
/// items the client sends, in order.
///
/// Reading grants the client credit for more; a handler that stops reading
/// holds the client to the server's window
/// ([`crate::ServerConfig::inbound_window`]). Dropping it tells the client
/// to stop sending (its sends fail with [`RpcError::InputClosed`]) without
/// ending the call: the handler may still answer.
pub struct Incoming<T> {
    items: mpsc::Receiver<Inbound>,
    sender: FrameSender,
    id: u64,
    window: u32,
    consumed: u32,
    finished: bool,
    _type: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Incoming<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("call", &self.id)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl<T> Incoming<T> {
    pub(crate) fn new(
        items: mpsc::Receiver<Inbound>,
        sender: FrameSender,
        id: u64,
        window: u32,
    ) -> Incoming<T> {
        Incoming {
            items,
            sender,
            id,
            window,
            consumed: 0,
            finished: false,
            _type: PhantomData,
        }
    }
}

impl<T: DeserializeOwned> Incoming<T> {
    /// The next item; `None` once the client finished sending (or the call
    /// is being torn down). [`IncomingError::Abandoned`] if the client
    /// dropped its sender without finishing.
    ///
    /// Cancel-safe, as [`crate::ItemStream::next`]: credit for what was
    /// read is granted at the start of the next call and counted as given
    /// once its frame is queued; an item, once taken, is returned without
    /// another await.
    pub async fn next(&mut self) -> Option<Result<T, IncomingError>> {
        if self.finished {
            return None;
        }
        if self.consumed > 0 && self.consumed >= (self.window / 2).max(1) {
            let credit = Frame::new(
                FrameKind::Credit,
                self.id,
                Bytes::from(self.consumed.to_le_bytes().to_vec()),
            );
            // As in `ItemStream::next`: counted before the await.
            self.consumed = 0;
            let granted = match self.sender.feed(credit).await {
                Ok(()) => self.sender.flush().await,
                Err(err) => Err(err),
            };
            if granted.is_err() {
                // The connection is gone: so is the call.
                self.finished = true;
                return None;
            }
        }
        match self.items.recv().await {
            Some(Inbound::Item(bytes, _budget)) => {
                self.consumed += 1;
                Some(
                    // The handler may keep what it receives: only large
                    // payloads share their frame (see `Sharing::Large`).
                    crate::__private::decode_shared(&bytes, Sharing::Large)
                        .map_err(|err| IncomingError::Decode(err.to_string())),
                )
            }
            Some(Inbound::Abandoned) => {
                self.finished = true;
                Some(Err(IncomingError::Abandoned))
            }
            Some(Inbound::End) | None => {
                self.finished = true;
                None
            }
        }
    }
}

impl<T> Drop for Incoming<T> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Stop the client sending what nobody will read. Sent from a task:
        // a drop cannot wait, and the frame is small.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (sender, id) = (self.sender.clone(), self.id);
            runtime.spawn(async move {
                let _ = sender
                    .send(Frame::new(FrameKind::Cancel, id, Bytes::new()))
                    .await;
            });
        }
    }
}

/// The client's sending end of a client-streaming or bidirectional call.
///
/// [`send`](Self::send) waits while the server's window is full (the
/// handler is behind), so a slow handler slows the sender down. Finish with
/// [`finish`](Self::finish): the handler then sees the end of its items.
/// Dropping it without finishing tells the handler the items were
/// abandoned ([`IncomingError::Abandoned`]).
pub struct ItemSender<T> {
    pub(crate) link: Arc<Link>,
    pub(crate) id: u64,
    /// Items the server can still take; closed once the call ends or the
    /// handler stops reading.
    pub(crate) credit: Arc<Semaphore>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) finished: bool,
    pub(crate) _type: PhantomData<fn(T)>,
}

impl<T> std::fmt::Debug for ItemSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ItemSender")
            .field("call", &self.id)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

impl<T: Serialize> ItemSender<T> {
    /// Sends one item, waiting while the server's window is full.
    ///
    /// Fails with [`RpcError::InputClosed`] once the server takes no more
    /// items for this call (it answered or failed it, or the handler
    /// dropped its [`Incoming`]), [`RpcError::DeadlineExceeded`] at the
    /// call's deadline, and [`RpcError::TooLarge`] or
    /// [`RpcError::Serialize`] for an item that cannot be sent (nothing was
    /// sent then, and the sender stays usable).
    ///
    /// Cancel-safe in the sense that matters: dropped while waiting for
    /// credit, nothing was sent and no credit spent; once the item is
    /// queued its credit is spent, whatever happens to this future.
    pub async fn send(&self, item: T) -> Result<(), RpcError> {
        if self.finished {
            return Err(RpcError::InputClosed);
        }
        let permit = match self.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, self.credit.acquire())
                .await
                .map_err(|_| RpcError::DeadlineExceeded)?,
            None => self.credit.acquire().await,
        };
        permit.map_err(|_| RpcError::InputClosed)?.forget();
        match self
            .link
            .sender
            .send_message(FrameKind::StreamItem, self.id, &item)
            .await
        {
            Ok(()) => Ok(()),
            Err(SendError::FrameTooLarge { size, limit }) => {
                self.credit.add_permits(1);
                Err(RpcError::TooLarge { size, limit })
            }
            Err(err @ SendError::Serialize(_)) => {
                self.credit.add_permits(1);
                Err(RpcError::Serialize(err.to_string()))
            }
            Err(err) => Err(RpcError::Unavailable(err.to_string())),
        }
    }
}

impl<T> ItemSender<T> {
    /// Ends the items: the handler's [`Incoming::next`] returns `None`
    /// after the last one.
    pub async fn finish(mut self) -> Result<(), RpcError> {
        self.finished = true;
        self.link
            .sender
            .send(Frame::new(FrameKind::StreamEnd, self.id, Bytes::new()))
            .await
            .map_err(|err| RpcError::Unavailable(err.to_string()))
    }

    /// Items the server can take now without waiting (the rest of its
    /// window).
    pub fn credit(&self) -> usize {
        self.credit.available_permits()
    }
}

impl<T> Drop for ItemSender<T> {
    fn drop(&mut self) {
        if self.finished || self.credit.is_closed() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (sender, id) = (self.link.sender.clone(), self.id);
            runtime.spawn(async move {
                let end = Frame::new(FrameKind::StreamEnd, id, Bytes::new())
                    .with_flags(Flags::from_bits(ABANDONED));
                let _ = sender.send(end).await;
            });
        }
    }
}

/// A client-streaming call in progress: send items with
/// [`send`](Self::send), then [`finish`](Self::finish) to get the reply.
/// Dropping it before the reply cancels the call on the server.
pub struct ClientStream<In, R> {
    pub(crate) items: ItemSender<In>,
    pub(crate) reply: oneshot::Receiver<Result<Bytes, RpcError>>,
    pub(crate) guard: CallGuard,
    /// An answer that came while sending (the handler replied early, or
    /// the call failed), kept for [`finish`](Self::finish).
    pub(crate) early: Option<Result<Bytes, RpcError>>,
    pub(crate) _type: PhantomData<fn() -> R>,
}

impl<In, R> std::fmt::Debug for ClientStream<In, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStream")
            .field("call", &self.items.id)
            .finish_non_exhaustive()
    }
}

impl<In: Serialize, R: DeserializeOwned> ClientStream<In, R> {
    /// Sends one item, waiting while the server's window is full. If the
    /// call already failed, its error (a deadline, a refusal); if the
    /// server answered before taking every item, [`RpcError::InputClosed`]
    /// (call [`finish`](Self::finish) for the answer).
    pub async fn send(&mut self, item: In) -> Result<(), RpcError> {
        match self.items.send(item).await {
            Err(RpcError::InputClosed) => {
                if self.early.is_none() {
                    if let Ok(answer) = self.reply.try_recv() {
                        self.guard.answered = true;
                        self.early = Some(answer);
                    }
                }
                match &self.early {
                    Some(Err(err)) => Err(err.clone()),
                    _ => Err(RpcError::InputClosed),
                }
            }
            other => other,
        }
    }

    /// Items the server can take now without waiting.
    pub fn credit(&self) -> usize {
        self.items.credit()
    }

    /// Ends the items and waits for the handler's reply, within the call's
    /// deadline.
    pub async fn finish(mut self) -> Result<R, RpcError> {
        let answer = match self.early.take() {
            Some(answer) => answer,
            None => {
                let deadline = self.items.deadline;
                let items = std::mem::replace(
                    &mut self.items,
                    ItemSender {
                        link: self.guard.link.clone(),
                        id: self.guard.id,
                        credit: Arc::new(Semaphore::new(0)),
                        deadline,
                        finished: true,
                        _type: PhantomData,
                    },
                );
                // A server that already answered takes no end: that is fine.
                if !items.credit.is_closed() {
                    items.finish().await?;
                } else {
                    drop(items);
                }
                let reply = &mut self.reply;
                let answer = match deadline {
                    Some(deadline) => tokio::time::timeout_at(deadline, reply)
                        .await
                        .map_err(|_| RpcError::DeadlineExceeded)?,
                    None => reply.await,
                };
                self.guard.answered = true;
                answer.unwrap_or_else(|_| Err(RpcError::Unavailable("connection closed".into())))
            }
        };
        self.guard.answered = true;
        let bytes = answer?;
        crate::__private::decode_shared(&bytes, Sharing::Always)
            .map_err(|err| RpcError::Decode(err.to_string()))
    }
}
