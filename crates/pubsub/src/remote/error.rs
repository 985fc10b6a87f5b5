//! What a client of a remote bus sees go wrong.

use std::time::Duration;

use courier_rpc::RpcError;
use courier_transport::ErrorKind;

use super::wire::RemoteError;

/// What can go wrong using a remote bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemotePubSubError {
    /// The call failed (host unreachable, deadline, ...).
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// The host refused.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The host broke the protocol (a stream that did not start with `Active`).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A request found nobody subscribed to its subject.
    #[error("no responders for {0}")]
    NoResponders(String),
    /// A request got no reply within its timeout.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// [`RemotePublisher::flush`](super::RemotePublisher::flush): the connection was lost after one-way
    /// publishes since the last flush were sent, so some may never have
    /// reached the host. Retryable (publish them again if they matter, or
    /// use [`RemotePublisher::publish_confirmed`](super::RemotePublisher::publish_confirmed)).
    #[error(
        "the connection to the host was lost after publishes were sent; some may not have arrived"
    )]
    PublishesLost,
    /// A typed publish's value could not be encoded. Not retryable.
    #[error(transparent)]
    Encode(#[from] crate::typed::EncodeError),
}

impl RemotePubSubError {
    /// What kind of failure this is: the call's ([`RpcError::kind`]) or
    /// the host's ([`RemoteError::kind`]), so a permission denial is
    /// [`ErrorKind::Refused`] either way; a request that got no reply, or
    /// found nobody to answer it, is [`ErrorKind::TimedOut`]; publishes
    /// lost with the connection [`ErrorKind::Unavailable`]; a host that
    /// broke the protocol [`ErrorKind::Unsupported`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            RemotePubSubError::Rpc(err) => err.kind(),
            RemotePubSubError::Remote(err) => err.kind(),
            RemotePubSubError::Protocol(_) => ErrorKind::Unsupported,
            RemotePubSubError::NoResponders(_) | RemotePubSubError::Timeout(_) => {
                ErrorKind::TimedOut
            }
            RemotePubSubError::PublishesLost => ErrorKind::Unavailable,
            RemotePubSubError::Encode(err) => err.kind(),
        }
    }

    /// Whether trying again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.kind().is_retryable()
    }
}
