//! What a send promises and how far a message got: the vocabulary shared by
//! the node's public API and its peer drivers.

use crate::NodeId;

/// What a send promises. Each mode's `send` returns only once its promise
/// is kept, and its `Ok` never claims more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Fire and forget: `send` returns [`Progress::Written`] once the message
    /// is handed to the connection. It may be lost, and is never retried.
    AtMostOnce,
    /// Retransmitted until the receiving node acknowledges it (it is in the
    /// endpoint's mailbox) or the send deadline passes: `send` returns
    /// [`Progress::Acknowledged`]. The handler may see it more than once.
    AtLeastOnce,
    /// At-least-once, and the receiver drops duplicates by (sender,
    /// sequence number) within a bounded window, so the handler sees each
    /// message once. Across a receiver restart, duplicates are possible again.
    EffectivelyOnce,
}

/// How far a message got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Progress {
    /// In this node's bounded queue for the peer ([`Sender::try_send`](crate::Sender::try_send)).
    Queued,
    /// Written to the connection (at-most-once).
    Written,
    /// Acknowledged by the receiving node (at-least-once, effectively-once).
    Acknowledged,
}

/// A message received by a [`Mailbox`](crate::Mailbox).
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T> {
    /// The node that sent it.
    pub from: NodeId,
    /// The message.
    pub body: T,
}
