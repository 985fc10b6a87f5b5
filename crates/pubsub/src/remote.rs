//! The bus served to other processes: a courier-rpc service whose
//! subscriptions are server streams under credit.
//!
//! A subscription is active at the host before [`RemotePubSub::subscribe`]
//! returns (the stream opens with an `Active` marker sent after the host
//! subscribed), so a message published after that is delivered: no slow
//! joiner loss. Slow-consumer policies apply at the host, per
//! subscription, exactly as in process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use courier_rpc::{Client, ClientConfig, ItemStream, Items, RpcError};
use courier_transport::Address;

use crate::{Bus, Event, Message, Publisher, SlowConsumer, Subject, SubscribeOptions};

/// A pub/sub error as it crosses the network.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The subject or filter is invalid (the message names the token).
    #[error("{0}")]
    Invalid(String),
}

/// One item of a subscription stream.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WireEvent {
    /// The subscription is active at the host.
    Active,
    /// A message.
    Message {
        /// Its subject.
        subject: String,
        /// Its bytes.
        payload: Bytes,
        /// The publisher.
        publisher: u64,
        /// Per-publisher sequence number, for this subscription.
        seq: u64,
        /// Where to reply, for request-reply.
        reply_to: Option<String>,
    },
    /// Messages `from..to` of `publisher` were dropped.
    Gap {
        /// The publisher.
        publisher: u64,
        /// First missing.
        from: u64,
        /// One past the last missing.
        to: u64,
    },
}

/// The pub/sub protocol.
#[courier_rpc::service]
pub trait PubSubService {
    /// Publishes under the client-chosen publisher identity `publisher`,
    /// asking for replies on `reply_to` if given.
    async fn publish(
        &self,
        publisher: u64,
        subject: String,
        reply_to: Option<String>,
        payload: Bytes,
    ) -> Result<u64, RemoteError>;
    /// Subscribes; the stream starts with `Active`. `policy`: 0 drop oldest,
    /// 1 drop newest, 2 disconnect, 3 backpressure.
    async fn subscribe(
        &self,
        filter: String,
        buffer: u32,
        policy: u8,
        group: Option<String>,
        items: Items<Result<WireEvent, RemoteError>>,
    );
}

/// Serves a [`Bus`] to other processes.
#[derive(Debug, Default)]
pub struct PubSubHost {
    bus: Bus,
    publishers: Mutex<HashMap<u64, Publisher>>,
}

impl PubSubHost {
    /// A host for `bus` (which local publishers and subscribers may share).
    pub fn new(bus: Bus) -> PubSubHost {
        PubSubHost {
            bus,
            publishers: Mutex::new(HashMap::new()),
        }
    }
}

fn policy_code(policy: SlowConsumer) -> u8 {
    match policy {
        SlowConsumer::DropOldest => 0,
        SlowConsumer::DropNewest => 1,
        SlowConsumer::Disconnect => 2,
        SlowConsumer::Backpressure => 3,
    }
}

fn policy_from(code: u8) -> SlowConsumer {
    match code {
        1 => SlowConsumer::DropNewest,
        2 => SlowConsumer::Disconnect,
        3 => SlowConsumer::Backpressure,
        _ => SlowConsumer::DropOldest,
    }
}

impl PubSubService for PubSubHost {
    async fn publish(
        &self,
        publisher: u64,
        subject: String,
        reply_to: Option<String>,
        payload: Bytes,
    ) -> Result<u64, RemoteError> {
        let invalid = |e: crate::SubjectError| RemoteError::Invalid(e.to_string());
        let subject = Subject::new(&subject).map_err(invalid)?;
        let reply_to = reply_to
            .map(|r| Subject::new(&r))
            .transpose()
            .map_err(invalid)?;
        let local = {
            let mut publishers = self.publishers.lock().unwrap_or_else(|p| p.into_inner());
            publishers
                .entry(publisher)
                .or_insert_with(|| self.bus.publisher())
                .clone()
        };
        Ok(local.send(&subject, reply_to, payload).await as u64)
    }

    async fn subscribe(
        &self,
        filter: String,
        buffer: u32,
        policy: u8,
        group: Option<String>,
        items: Items<Result<WireEvent, RemoteError>>,
    ) {
        let mut options = SubscribeOptions::default()
            .buffer(buffer as usize)
            .policy(policy_from(policy));
        if let Some(group) = group {
            options = options.group(group);
        }
        let mut subscription = match self.bus.subscribe(&filter, options) {
            Ok(subscription) => subscription,
            Err(err) => {
                let _ = items.send(Err(RemoteError::Invalid(err.to_string()))).await;
                return;
            }
        };
        if items.send(Ok(WireEvent::Active)).await.is_err() {
            return;
        }
        // Ends when the client goes away (the call is cancelled and the
        // subscription dropped) or the subscription is disconnected.
        while let Some(event) = subscription.recv().await {
            let wire = match event {
                Event::Message(m) => WireEvent::Message {
                    subject: m.subject.as_str().to_string(),
                    payload: m.payload,
                    publisher: m.publisher,
                    seq: m.seq,
                    reply_to: m.reply_to.map(|r| r.as_str().to_string()),
                },
                Event::Gap {
                    publisher,
                    from,
                    to,
                } => WireEvent::Gap {
                    publisher,
                    from,
                    to,
                },
            };
            if items.send(Ok(wire)).await.is_err() {
                return;
            }
        }
    }
}

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
}

/// Subscriptions stay open this long (they end when dropped, not by deadline).
const SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A bus on a [`PubSubHost`] in another process.
#[derive(Clone, Debug)]
pub struct RemotePubSub {
    client: PubSubServiceClient,
}

impl RemotePubSub {
    /// Connects to the host at `address`.
    pub async fn connect(
        address: &Address,
        config: ClientConfig,
    ) -> Result<RemotePubSub, RemotePubSubError> {
        Ok(RemotePubSub {
            client: PubSubServiceClient::new(Client::connect(address, config).await?),
        })
    }

    /// A publisher with a fresh identity.
    pub fn publisher(&self) -> RemotePublisher {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        RemotePublisher {
            client: self.client.clone(),
            id: hasher.finish(),
        }
    }

    /// Sends a request to `subject` and waits at most `timeout` for the
    /// first reply; see [`Bus::request`].
    pub async fn request(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
        timeout: Duration,
    ) -> Result<Message, RemotePubSubError> {
        let publisher = self.publisher();
        let inbox = format!("_inbox.{}", publisher.id);
        let mut replies = self
            .subscribe(&inbox, SubscribeOptions::default().buffer(1))
            .await?;
        let delivered = self
            .client
            .publish(
                publisher.id,
                subject.to_string(),
                Some(inbox),
                payload.into(),
            )
            .await??;
        if delivered == 0 {
            return Err(RemotePubSubError::NoResponders(subject.to_string()));
        }
        match tokio::time::timeout(timeout, replies.recv()).await {
            Ok(Some(Ok(Event::Message(reply)))) => Ok(reply),
            Ok(Some(Err(err))) => Err(err),
            Ok(_) => Err(RemotePubSubError::NoResponders(subject.to_string())),
            Err(_) => Err(RemotePubSubError::Timeout(timeout)),
        }
    }

    /// Subscribes; returns once the subscription is active at the host.
    pub async fn subscribe(
        &self,
        filter: &str,
        options: SubscribeOptions,
    ) -> Result<RemoteSubscription, RemotePubSubError> {
        let mut stream = self
            .client
            .with_timeout(SUBSCRIPTION_LIFETIME)
            .subscribe(
                filter.to_string(),
                options.buffer as u32,
                policy_code(options.policy),
                options.group.clone(),
            )
            .await?;
        match stream.next().await {
            Some(Ok(Ok(WireEvent::Active))) => Ok(RemoteSubscription { stream }),
            Some(Ok(Err(err))) => Err(err.into()),
            Some(Err(err)) => Err(err.into()),
            other => Err(RemotePubSubError::Protocol(format!(
                "expected Active, got {other:?}"
            ))),
        }
    }
}

/// Publishes to a remote bus under one identity.
#[derive(Clone, Debug)]
pub struct RemotePublisher {
    client: PubSubServiceClient,
    id: u64,
}

impl RemotePublisher {
    /// Publishes; returns how many subscriptions it was delivered (or
    /// dropped) to, once the host has done so.
    pub async fn publish(
        &self,
        subject: &str,
        payload: impl Into<Bytes>,
    ) -> Result<u64, RemotePubSubError> {
        Ok(self
            .client
            .publish(self.id, subject.to_string(), None, payload.into())
            .await??)
    }

    /// Answers `request` on its `reply_to` subject; 0 if it wants no reply.
    pub async fn reply(
        &self,
        request: &Message,
        payload: impl Into<Bytes>,
    ) -> Result<u64, RemotePubSubError> {
        match &request.reply_to {
            Some(inbox) => self.publish(inbox.as_str(), payload).await,
            None => Ok(0),
        }
    }
}

/// A subscription on a remote bus. Dropping it unsubscribes; the host
/// tears the subscription down when the cancellation reaches it, so a
/// message published in that moment may still be counted for it.
#[derive(Debug)]
pub struct RemoteSubscription {
    stream: ItemStream<Result<WireEvent, RemoteError>>,
}

impl RemoteSubscription {
    /// The next event; `None` when the subscription ended.
    pub async fn recv(&mut self) -> Option<Result<Event, RemotePubSubError>> {
        let wire = match self.stream.next().await? {
            Ok(Ok(wire)) => wire,
            Ok(Err(err)) => return Some(Err(err.into())),
            Err(err) => return Some(Err(err.into())),
        };
        Some(match wire {
            WireEvent::Message {
                subject,
                payload,
                publisher,
                seq,
                reply_to,
            } => match Subject::new(&subject) {
                Ok(subject) => Ok(Event::Message(Message {
                    subject,
                    payload,
                    publisher,
                    seq,
                    reply_to: reply_to.and_then(|r| Subject::new(&r).ok()),
                })),
                Err(err) => Err(RemotePubSubError::Protocol(err.to_string())),
            },
            WireEvent::Gap {
                publisher,
                from,
                to,
            } => Ok(Event::Gap {
                publisher,
                from,
                to,
            }),
            WireEvent::Active => Err(RemotePubSubError::Protocol("a second Active".into())),
        })
    }
}
