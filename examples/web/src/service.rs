//! The ticket service: one instance of `svc.tickets`. Every instance
//! subscribes in the queue group `svc.tickets`, so the broker gives each
//! request to one of them; an instance that dies loses its subscription
//! with its connection and the others take its share.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use courier_pubsub::remote::{Address, ClientConfig, RemotePubSub, RemotePublisher};
use courier_pubsub::{Event, Message, Publish, SubscribeOptions};
use tokio::sync::Semaphore;

use crate::db::{DatabaseUrl, Db};
use crate::model::{validate_id, validate_query, ReadOutcome, ReadReply, ReadRequest};
use crate::model::{MAX_RESULTS, SERVICE_SUBJECT};
use crate::Shutdown;

/// Requests answered at once by one instance (more wait in the
/// subscription's buffer).
pub const MAX_IN_FLIGHT: usize = 16;
/// Requests the broker holds for this instance before its slow-consumer
/// policy applies.
pub const REQUEST_BUFFER: usize = 1024;
/// How long a stopping instance lets requests it took finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one instance until SIGINT/SIGTERM.
pub async fn run(broker: Address, url: DatabaseUrl, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let shown = Db::path(&url).map_or_else(|| ":memory:".into(), |p| p.display().to_string());
    let db = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || Db::open(&url))
            .await
            .context("the database task failed")?
            .with_context(|| format!("cannot open the database {shown}"))?
    };
    match db.count() {
        Ok(n) => tracing::info!(tickets = n, "database open"),
        Err(err) => tracing::warn!(%err, "cannot count the tickets"),
    }
    let db = Arc::new(Mutex::new(db));
    let bus = RemotePubSub::connect(&broker, ClientConfig::default())
        .await
        .with_context(|| format!("cannot reach the broker at {broker}"))?;
    let mut requests = bus
        .subscribe(
            SERVICE_SUBJECT,
            SubscribeOptions::default()
                .group(SERVICE_SUBJECT)
                .buffer(REQUEST_BUFFER),
        )
        .await
        .context("cannot subscribe to svc.tickets")?;
    let replier = bus.publisher();
    let served_by = format!("service-{}", std::process::id());
    tracing::info!(%broker, database = %shown, %served_by, "answering {SERVICE_SUBJECT}");
    crate::announce("service ready");

    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let outcome = loop {
        let event = tokio::select! {
            () = shutdown.wait() => break Ok(()),
            event = requests.recv() => event,
        };
        match event {
            Some(Ok(Event::Message(request))) => {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break Ok(());
                };
                let (db, replier, served_by) = (db.clone(), replier.clone(), served_by.clone());
                tokio::spawn(async move {
                    answer(&db, &replier, &served_by, request).await;
                    drop(permit);
                });
            }
            Some(Ok(Event::Restored)) => {
                tracing::warn!(
                    "reconnected to the broker; requests sent meanwhile went to the others"
                )
            }
            Some(Ok(other)) => tracing::warn!(?other, "requests were dropped (too slow)"),
            Some(Err(err)) => {
                break Err(anyhow::Error::new(err).context("svc.tickets subscription failed"))
            }
            None => {
                break Err(anyhow::anyhow!(
                    "the broker ended the svc.tickets subscription"
                ))
            }
        }
    };
    // Unsubscribe first, so the broker sends new requests to the others,
    // then let those taken finish.
    drop(requests);
    let drained =
        tokio::time::timeout(DRAIN_TIMEOUT, permits.acquire_many(MAX_IN_FLIGHT as u32)).await;
    if drained.is_err() {
        tracing::warn!("requests still running after {DRAIN_TIMEOUT:?}; leaving them");
    }
    if let Err(err) = replier.flush().await {
        tracing::warn!(%err, "replies may not have reached the broker");
    }
    outcome
}

/// Answers one request; a reply that cannot be sent is logged (the
/// requester times out and retries).
async fn answer(db: &Arc<Mutex<Db>>, replier: &RemotePublisher, served_by: &str, request: Message) {
    let outcome = match courier_pubsub::typed::decode::<ReadRequest, std::convert::Infallible>(
        request.clone(),
    ) {
        Ok(read) => {
            let db = db.clone();
            tokio::task::spawn_blocking(move || read_db(&db, read.value))
                .await
                .unwrap_or_else(|err| {
                    ReadOutcome::Failed(format!("the database task failed: {err}"))
                })
        }
        Err(err) => ReadOutcome::Invalid(format!("not a ticket read: {err}")),
    };
    if let ReadOutcome::Failed(reason) = &outcome {
        tracing::error!(%reason, "read failed");
    }
    let reply = ReadReply {
        served_by: served_by.to_string(),
        outcome,
    };
    if let Err(err) = replier.reply_typed(&request, &reply).await {
        tracing::warn!(%err, "cannot send a reply");
    }
}

/// Runs a read on the database (a blocking call).
fn read_db(db: &Mutex<Db>, read: ReadRequest) -> ReadOutcome {
    // Requests come from the network: checked again here, whoever sent them.
    let db = db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    match read {
        ReadRequest::Search { query, limit } => match validate_query(&query) {
            Ok(query) => db
                .search(&query, limit.min(MAX_RESULTS))
                .map_or_else(|e| ReadOutcome::Failed(e.to_string()), ReadOutcome::Tickets),
            Err(err) => ReadOutcome::Invalid(err.to_string()),
        },
        ReadRequest::Get { id } => match validate_id(&id) {
            Ok(()) => db
                .get(&id)
                .map_or_else(|e| ReadOutcome::Failed(e.to_string()), ReadOutcome::Ticket),
            Err(err) => ReadOutcome::Invalid(err.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_checked_and_answered_from_the_database() {
        let db = Mutex::new(Db::open(&DatabaseUrl::SqliteMemory).unwrap());
        let search = |query: &str, limit| {
            read_db(
                &db,
                ReadRequest::Search {
                    query: query.into(),
                    limit,
                },
            )
        };
        assert!(matches!(search("printer", 10), ReadOutcome::Tickets(t) if t.len() == 1));
        assert!(
            matches!(search("", 1000), ReadOutcome::Tickets(t) if t.len() <= MAX_RESULTS as usize)
        );
        assert!(matches!(
            search(&"x".repeat(10_000), 10),
            ReadOutcome::Invalid(_)
        ));
        let get = |id: &str| read_db(&db, ReadRequest::Get { id: id.into() });
        assert!(matches!(get("seed-01"), ReadOutcome::Ticket(Some(t)) if t.id == "seed-01"));
        assert_eq!(get("seed-99"), ReadOutcome::Ticket(None));
        assert!(matches!(get("bad id!"), ReadOutcome::Invalid(_)));
    }
}
