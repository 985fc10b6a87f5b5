//! The queue protocol as a broker serves it: queues named by `[cluster]
//! replicated_queues` go to [`Replicated`] (their tokens carry
//! [`REPLICATED_TOKEN`]), every other queue to the local [`QueueHost`].

use std::sync::Arc;

use courier_queue::core::QueueStats;
use courier_queue::remote::{
    QueueAccess, QueueHost, QueueService, RemoteError, WireAnswer, WireDelivery,
};
use courier_queue::{Enqueued, Message, Peeked, QueueDeclaration};
use courier_rpc::Items;

use crate::replicated::{DeliverySink, Replicated, REPLICATED_TOKEN};

/// The queue protocol as a cluster member serves it: replicated queues
/// through [`Replicated`], every other queue by the local [`QueueHost`].
pub(crate) struct BrokerQueues {
    host: QueueHost,
    replicated: Option<Arc<Replicated>>,
    access: Option<Arc<dyn QueueAccess>>,
}

impl BrokerQueues {
    pub(crate) fn new(
        host: QueueHost,
        replicated: Option<Arc<Replicated>>,
        access: Option<Arc<dyn QueueAccess>>,
    ) -> BrokerQueues {
        BrokerQueues {
            host,
            replicated,
            access,
        }
    }

    /// The replicated queues, if `queue` is one.
    fn replicated(&self, queue: &str) -> Option<&Replicated> {
        self.replicated.as_deref().filter(|r| r.handles(queue))
    }

    fn check(
        &self,
        queue: &str,
        allowed: impl FnOnce(&dyn QueueAccess, Option<&str>) -> bool,
        doing: &str,
    ) -> Result<(), RemoteError> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let who = courier_rpc::caller();
        if allowed(access.as_ref(), who.as_deref()) {
            Ok(())
        } else {
            Err(RemoteError::PermissionDenied(format!(
                "{doing} queue {queue}"
            )))
        }
    }

    fn may_consume(&self, queue: &str) -> Result<(), RemoteError> {
        self.check(queue, |a, who| a.may_consume(who, queue), "consuming from")
    }
}

/// Answers with their places in a call.
type Indexed = Vec<(usize, WireAnswer)>;

struct SingleSink(Items<Result<WireDelivery, RemoteError>>);

impl DeliverySink for SingleSink {
    async fn send(&self, group: Vec<WireDelivery>) -> bool {
        for delivery in group {
            if self.0.send(Ok(delivery)).await.is_err() {
                return false;
            }
        }
        true
    }
    async fn fail(&self, err: RemoteError) {
        let _ = self.0.send(Err(err)).await;
    }
}

struct BatchedSink(Items<Result<Vec<WireDelivery>, RemoteError>>);

impl DeliverySink for BatchedSink {
    async fn send(&self, group: Vec<WireDelivery>) -> bool {
        self.0.send(Ok(group)).await.is_ok()
    }
    async fn fail(&self, err: RemoteError) {
        let _ = self.0.send(Err(err)).await;
    }
}

impl QueueService for BrokerQueues {
    async fn enqueue(
        &self,
        queue: String,
        messages: Vec<Message>,
    ) -> Result<Vec<Enqueued>, RemoteError> {
        match self.replicated(&queue) {
            Some(replicated) => {
                self.check(&queue, |a, who| a.may_produce(who, &queue), "producing to")?;
                replicated.enqueue(&queue, messages).await
            }
            None => self.host.enqueue(queue, messages).await,
        }
    }

    async fn consume(
        &self,
        queue: String,
        prefetch: u32,
        items: Items<Result<WireDelivery, RemoteError>>,
    ) {
        match self.replicated(&queue) {
            Some(replicated) => {
                if let Err(e) = self.may_consume(&queue) {
                    let _ = items.send(Err(e)).await;
                    return;
                }
                replicated
                    .consume(&queue, prefetch, SingleSink(items))
                    .await
            }
            None => self.host.consume(queue, prefetch, items).await,
        }
    }

    async fn consume_batched(
        &self,
        queue: String,
        prefetch: u32,
        items: Items<Result<Vec<WireDelivery>, RemoteError>>,
    ) {
        match self.replicated(&queue) {
            Some(replicated) => {
                if let Err(e) = self.may_consume(&queue) {
                    let _ = items.send(Err(e)).await;
                    return;
                }
                replicated
                    .consume(&queue, prefetch, BatchedSink(items))
                    .await
            }
            None => self.host.consume_batched(queue, prefetch, items).await,
        }
    }

    async fn ack(&self, token: u64) -> Result<(), RemoteError> {
        self.answer_one(WireAnswer::Ack { token }).await
    }

    async fn nack(&self, token: u64, delay_ms: u64) -> Result<(), RemoteError> {
        self.answer_one(WireAnswer::Nack { token, delay_ms }).await
    }

    async fn answer_batch(
        &self,
        answers: Vec<WireAnswer>,
    ) -> Result<Vec<Result<(), RemoteError>>, RemoteError> {
        let Some(replicated) = &self.replicated else {
            return self.host.answer_batch(answers).await;
        };
        if answers.iter().all(|a| a.token() & REPLICATED_TOKEN == 0) {
            return self.host.answer_batch(answers).await;
        }
        if answers.len() > courier_queue::remote::MAX_ANSWER_BATCH {
            return Err(RemoteError::Queue {
                reason: format!(
                    "{} answers in one call; at most {}",
                    answers.len(),
                    courier_queue::remote::MAX_ANSWER_BATCH
                ),
                retryable: false,
            });
        }
        let (ours, theirs): (Indexed, Indexed) = answers
            .iter()
            .copied()
            .enumerate()
            .partition(|(_, a)| a.token() & REPLICATED_TOKEN == 0);
        let (our_indices, our_answers): (Vec<usize>, Vec<WireAnswer>) = ours.into_iter().unzip();
        let (their_indices, their_answers): (Vec<usize>, Vec<WireAnswer>) =
            theirs.into_iter().unzip();
        let who = courier_rpc::caller();
        let local = async {
            if our_answers.is_empty() {
                Ok(Vec::new())
            } else {
                self.host.answer_batch(our_answers).await
            }
        };
        let (local, replicated) = tokio::join!(local, replicated.answer(&their_answers, &who));
        let mut outcomes: Vec<Result<(), RemoteError>> =
            vec![Err(RemoteError::UnknownDelivery); answers.len()];
        match local {
            Ok(results) => {
                for (index, result) in our_indices.into_iter().zip(results) {
                    outcomes[index] = result;
                }
            }
            Err(e) => {
                for index in our_indices {
                    outcomes[index] = Err(e.clone());
                }
            }
        }
        for (index, result) in their_indices.into_iter().zip(replicated) {
            outcomes[index] = result;
        }
        Ok(outcomes)
    }

    async fn extend(&self, token: u64, by_ms: u64) -> Result<(), RemoteError> {
        match &self.replicated {
            Some(replicated) if token & REPLICATED_TOKEN != 0 => {
                replicated
                    .extend(token, by_ms, &courier_rpc::caller())
                    .await
            }
            _ => self.host.extend(token, by_ms).await,
        }
    }

    async fn stats(&self, queue: String) -> Result<QueueStats, RemoteError> {
        match self.replicated(&queue) {
            Some(replicated) => {
                self.may_consume(&queue)?;
                replicated.stats(&queue).await
            }
            None => self.host.stats(queue).await,
        }
    }

    async fn purge(&self, queue: String) -> Result<u64, RemoteError> {
        match self.replicated(&queue) {
            Some(replicated) => {
                self.check(&queue, |a, who| a.may_purge(who, &queue), "purging")?;
                replicated.purge(&queue).await
            }
            None => self.host.purge(queue).await,
        }
    }

    async fn peek(&self, queue: String, count: u32) -> Result<Vec<Peeked>, RemoteError> {
        match self.replicated(&queue) {
            Some(replicated) => {
                self.may_consume(&queue)?;
                replicated.peek(&queue, count).await
            }
            None => self.host.peek(queue, count).await,
        }
    }

    async fn declare(&self, queue: String, options: QueueDeclaration) -> Result<(), RemoteError> {
        match self.replicated(&queue) {
            Some(replicated) => {
                self.check(&queue, |a, who| a.may_declare(who, &queue), "declaring")?;
                replicated.declare(&queue, &options).await
            }
            None => self.host.declare(queue, options).await,
        }
    }
}

impl BrokerQueues {
    async fn answer_one(&self, answer: WireAnswer) -> Result<(), RemoteError> {
        match &self.replicated {
            Some(replicated) if answer.token() & REPLICATED_TOKEN != 0 => replicated
                .answer(&[answer], &courier_rpc::caller())
                .await
                .pop()
                .unwrap_or(Err(RemoteError::UnknownDelivery)),
            _ => match answer {
                WireAnswer::Ack { token } => self.host.ack(token).await,
                WireAnswer::Nack { token, delay_ms } => self.host.nack(token, delay_ms).await,
                WireAnswer::Reject { .. } => self
                    .host
                    .answer_batch(vec![answer])
                    .await?
                    .pop()
                    .unwrap_or(Err(RemoteError::UnknownDelivery)),
            },
        }
    }
}
