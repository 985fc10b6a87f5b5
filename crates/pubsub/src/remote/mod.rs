//! The bus served to other processes: a courier-rpc service whose
//! subscriptions are server streams under credit.
//!
//! A subscription is active at the host before [`RemotePubSub::subscribe`]
//! returns (the stream opens with an `Active` marker sent after the host
//! subscribed), so a message published after that is delivered: no slow
//! joiner loss. Slow-consumer policies apply at the host, per
//! subscription, exactly as in process.
//!
//! Messages travel in batches both ways: [`RemotePublisher::publish_batch`]
//! sends many in one call, and a subscription stream carries whatever the
//! host has buffered for it (up to [`MAX_EVENTS_PER_ITEM`] events and
//! [`HostConfig::max_batch_bytes`]) in one frame. A message too large to
//! travel in a frame of its own is dropped, counted and reported as a gap;
//! every message is either received or counted.
//!
//! The host's per-subscription drop count travels with the events, so
//! [`RemoteSubscription::dropped`] is what the host counted, and gaps
//! (including those at the end of a publisher's run) arrive as in process.
//!
//! Client-chosen publisher identities cost the host a bounded map
//! ([`HostConfig::max_publishers`]), and each subscription a bounded one
//! ([`crate::BusConfig::max_publishers_per_subscription`]).
//!
//! A [`RemoteSubscription`] whose host goes away (restart, crash, cut
//! connection) subscribes again by itself, with backoff, and reports
//! [`Event::Restored`](crate::Event::Restored) so the subscriber knows it may have missed messages.
//! Durable subscriptions ([`crate::durable`]) keep what a subscriber misses.

mod client;
mod error;
mod host;
mod id;
mod subscription;
mod wire;

pub use client::*;
pub use error::*;
pub use host::*;
pub(crate) use id::fresh_id;
pub use subscription::*;
pub use wire::*;

/// Re-exported: what [`RemotePubSub::connect`] takes, so a client needs no
/// other Courier crate.
pub use courier_rpc::ClientConfig;
/// Re-exported, as [`ClientConfig`].
pub use courier_transport::Address;

#[cfg(test)]
mod kind_tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use courier_rpc::{Server, ServerConfig};

    use std::sync::Arc;
    use std::time::Duration;

    use courier_rpc::RpcError;
    use courier_transport::ErrorKind;

    use crate::durable::DurableError;
    use crate::{Bus, Subject, SubscribeOptions};

    use super::*;
    use crate::Filter;

    static NEXT: AtomicU64 = AtomicU64::new(0);

    struct NobodyMay;

    impl PubSubAccess for NobodyMay {
        fn may_publish(&self, _who: Option<&str>, _subject: &Subject) -> bool {
            false
        }
        fn may_request(&self, _who: Option<&str>, _subject: &Subject) -> bool {
            false
        }
        fn may_subscribe(&self, _who: Option<&str>, _filter: &Filter) -> bool {
            false
        }
    }

    async fn serve(host: PubSubHost) -> (courier_rpc::ServerHandle, RemotePubSub) {
        let address: Address = format!(
            "mem://pubsub-kind-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
        .parse()
        .unwrap();
        let listener = courier_transport::bind(&address, &Default::default())
            .await
            .unwrap();
        let server = Server::new(ServerConfig::default())
            .service(PubSubServiceServer::new(host))
            .spawn(listener);
        let bus = RemotePubSub::connect(&address, ClientConfig::default())
            .await
            .unwrap();
        (server, bus)
    }

    #[tokio::test]
    async fn denied_publishes_and_subscriptions_are_refused() {
        let (_server, bus) =
            serve(PubSubHost::new(Bus::new()).with_access(Arc::new(NobodyMay))).await;
        let err = bus
            .publisher()
            .publish_confirmed("orders.new", "x")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
        let err = bus
            .subscribe("orders.*", SubscribeOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
        assert!(!err.is_retryable());
    }

    #[tokio::test]
    async fn no_responders_is_timed_out_and_a_bad_subject_invalid_input() {
        let (_server, bus) = serve(PubSubHost::new(Bus::new())).await;
        let err = bus
            .request("nobody.home", "?", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
        assert!(err.is_retryable());
        let err = bus
            .publisher()
            .publish_confirmed("bad..subject", "x")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
    }

    #[test]
    fn kinds_follow_the_variants() {
        let refused = RemoteError::Refused {
            count: 2,
            first: Box::new(RemoteError::PermissionDenied("orders.new".into())),
        };
        assert_eq!(refused.kind(), ErrorKind::Refused);
        assert_eq!(
            RemotePubSubError::Timeout(Duration::from_secs(1)).kind(),
            ErrorKind::TimedOut
        );
        let down = RemotePubSubError::Rpc(RpcError::Unavailable("connection refused".into()));
        assert_eq!(down.kind(), ErrorKind::Unavailable);
        assert!(down.is_retryable());
        assert_eq!(RemoteError::NoDurable.kind(), ErrorKind::Unsupported);
        let conflict = DurableError::FilterConflict {
            name: "d".into(),
            existing: "a".into(),
            requested: "b".into(),
        };
        assert_eq!(conflict.kind(), ErrorKind::Conflict);
        // Crossing the network keeps only whether it is retryable.
        assert_eq!(RemoteError::from(conflict).kind(), ErrorKind::Internal);
        let invalid = DurableError::InvalidName("no spaces".into());
        assert_eq!(invalid.kind(), ErrorKind::InvalidInput);
    }
}
