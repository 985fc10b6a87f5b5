//! The writer: takes accepted tickets from the durable queue
//! `tickets.writes`, stores each (idempotently, by its id), acknowledges
//! it only once committed, then announces it on `tickets.changed` for the
//! browsers. A crash between the commit and the ack redelivers the write,
//! which stores nothing new and announces the ticket again (the page
//! shows each id once).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use courier_pubsub::remote::{Address, ClientConfig, RemotePubSub, RemotePublisher};
use courier_queue::remote::RemoteQueue;
use courier_queue::{ErrorKind, QueueDeclaration, TypedQueue};

use crate::db::{DatabaseUrl, Db, DbError};
use crate::model::{validate_id, NewTicket, TicketWrite, CHANGES_SUBJECT, WRITES_QUEUE};
use crate::Shutdown;

/// Writes held unacknowledged at once.
pub const PREFETCH: u32 = 16;
/// How long a write whose insert failed waits before it comes back.
pub const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Pause before making a new consumer after the broker ended one.
pub const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// The first pause before storing a write again after a transient
/// database error (busy, locked, I/O, disk full); doubled each try.
pub const TRANSIENT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest pause between two tries of one write.
pub const TRANSIENT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How far a held write's lease is extended on each try, so that a long
/// outage neither hands it to someone else nor uses up its deliveries.
pub const LEASE_EXTENSION: Duration = Duration::from_secs(30);
/// Deliveries of one write before it goes to `tickets.writes.dlq`.
pub const MAX_DELIVERIES: u32 = 5;

/// The queue's declaration, made by the gateway and the worker alike (a
/// queue's options are stored with it, and a different one is refused).
pub fn declaration() -> QueueDeclaration {
    QueueDeclaration::new().with_max_deliveries(MAX_DELIVERIES)
}

/// Declares `tickets.writes`; a conflict (someone made it with other
/// options) is logged, not fatal: writes still flow.
pub async fn declare(queue: &RemoteQueue) -> anyhow::Result<()> {
    match queue.declare(declaration()).await {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == ErrorKind::Conflict => {
            tracing::warn!(%err, "{WRITES_QUEUE} exists with other options; using them");
            Ok(())
        }
        Err(err) => Err(anyhow::Error::new(err).context(format!("cannot declare {WRITES_QUEUE}"))),
    }
}

/// Runs the worker until SIGINT/SIGTERM.
pub async fn run(broker: Address, url: DatabaseUrl, mut shutdown: Shutdown) -> anyhow::Result<()> {
    let db = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || Db::open(&url))
            .await
            .context("the database task failed")?
            .context("cannot open the database")?
    };
    let db = Arc::new(Mutex::new(db));
    let bus = RemotePubSub::connect(&broker, ClientConfig::default())
        .await
        .with_context(|| format!("cannot reach the broker at {broker}"))?;
    let queue = RemoteQueue::with_client(bus.client().clone(), WRITES_QUEUE);
    declare(&queue).await?;
    let writes = TypedQueue::<_, TicketWrite>::new(queue);
    let publisher = bus.publisher();
    let mut consumer = writes
        .consumer(PREFETCH)
        .await
        .context("cannot consume tickets.writes")?;
    tracing::info!(%broker, "storing {WRITES_QUEUE}, announcing on {CHANGES_SUBJECT}");
    crate::announce("worker ready");

    loop {
        let delivery = tokio::select! {
            () = shutdown.wait() => break,
            delivery = consumer.recv() => delivery,
        };
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(err) => {
                // The broker ended the stream (restart, failover): writes
                // not acknowledged come back to whoever consumes next.
                tracing::warn!(%err, "consumer ended; making a new one");
                tokio::select! {
                    () = shutdown.wait() => break,
                    () = tokio::time::sleep(RECONNECT_PAUSE) => {}
                }
                match writes.consumer(PREFETCH).await {
                    Ok(fresh) => consumer = fresh,
                    Err(err) => tracing::warn!(%err, "cannot consume yet"),
                }
                continue;
            }
        };
        let (value, delivery) = delivery.into_parts();
        let ticket = match value.map_err(anyhow::Error::new).and_then(checked) {
            Ok(ticket) => ticket,
            Err(err) => {
                // Will never store: to the dead letters, not round again.
                tracing::warn!(%err, "rejecting a write");
                if let Err(err) = delivery.reject().await {
                    tracing::warn!(%err, "cannot reject");
                }
                continue;
            }
        };
        // An accepted write (the page was told 202) is only given up if it
        // is poison (above) or the database refuses it for good: while the
        // database is busy, locked, full or failing I/O, the write is held,
        // its lease extended, and stored again after a backoff.
        let mut pause = TRANSIENT_BACKOFF_MIN;
        let stored = loop {
            let stored = {
                let (db, ticket) = (db.clone(), ticket.clone());
                tokio::task::spawn_blocking(move || {
                    let db = db.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    store(&db, ticket)
                })
                .await
            };
            match stored {
                Ok(Err(err)) if err.is_transient() => {
                    tracing::warn!(%err, id = %ticket.id, ?pause, "database unavailable; holding the write");
                    if let Err(err) = delivery.extend(LEASE_EXTENSION).await {
                        tracing::warn!(%err, id = %ticket.id, "cannot extend the lease");
                    }
                    tokio::select! {
                        () = shutdown.wait() => break None,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(TRANSIENT_BACKOFF_MAX);
                }
                other => break Some(other),
            }
        };
        let Some(stored) = stored else {
            // Shutting down while the database is away: dropping the
            // delivery gives the write back for the next worker.
            drop(delivery);
            break;
        };
        match stored {
            Ok(Ok((new, shown))) => {
                // Acknowledged only now that the row is committed.
                if let Err(err) = delivery.ack().await {
                    tracing::warn!(%err, id = %ticket.id, "stored, but the ack failed; it will be redelivered");
                    continue;
                }
                tracing::info!(id = %ticket.id, new, "stored");
                announce(&publisher, &shown).await;
            }
            Ok(Err(err)) => {
                tracing::error!(%err, id = %ticket.id, "insert failed; retrying later");
                if let Err(err) = delivery.nack(RETRY_DELAY).await {
                    tracing::warn!(%err, "cannot give the write back; its lease will");
                }
            }
            Err(err) => {
                tracing::error!(%err, "the database task failed");
                let _ = delivery.nack(RETRY_DELAY).await;
            }
        }
    }
    drop(consumer); // Unacknowledged writes go back to the queue at once.
    if let Err(err) = publisher.flush().await {
        tracing::warn!(%err, "announcements may not have reached the broker");
    }
    Ok(())
}

/// Stores `ticket` unless its id is there already; returns whether it was
/// new and the ticket to announce. A write whose id is stored already (a
/// redelivery, or someone reusing an id) announces the stored row, not its
/// payload: the pages show what the database holds.
fn store(db: &Db, ticket: TicketWrite) -> Result<(bool, TicketWrite), DbError> {
    if db.insert(&ticket)? {
        return Ok((true, ticket));
    }
    Ok((false, db.get(&ticket.id)?.unwrap_or(ticket)))
}

/// A write from the queue, checked as the gateway checked it (the queue
/// may hold writes from anyone allowed to enqueue).
fn checked(ticket: TicketWrite) -> anyhow::Result<TicketWrite> {
    validate_id(&ticket.id)?;
    let valid = NewTicket {
        title: ticket.title,
        body: ticket.body,
    }
    .validate()?;
    Ok(TicketWrite {
        title: valid.title,
        body: valid.body,
        ..ticket
    })
}

/// The change as JSON on `tickets.changed`: `{id, title, body, created_at}`.
pub fn change_json(ticket: &TicketWrite) -> Vec<u8> {
    serde_json::to_vec(ticket).unwrap_or_default()
}

async fn announce(publisher: &RemotePublisher, ticket: &TicketWrite) {
    // One way: a lost announcement costs a live update, never the ticket.
    if let Err(err) = publisher
        .publish(CHANGES_SUBJECT, change_json(ticket))
        .await
    {
        tracing::warn!(%err, id = %ticket.id, "cannot announce");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_the_tickets_json() {
        let ticket = TicketWrite {
            id: "t-1".into(),
            title: "Lamp".into(),
            body: "is \"off\"".into(),
            created_at: 7,
        };
        let json: serde_json::Value = serde_json::from_slice(&change_json(&ticket)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": "t-1", "title": "Lamp", "body": "is \"off\"", "created_at": 7})
        );
    }

    #[test]
    fn a_write_with_a_stored_id_announces_the_stored_row() {
        let dir = std::env::temp_dir().join(format!("courier-web-worker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::open(&DatabaseUrl::Sqlite(dir.join("t.db"))).unwrap();
        let first = TicketWrite {
            id: "t-1".into(),
            title: "Lamp".into(),
            body: String::new(),
            created_at: 7,
        };
        assert_eq!(store(&db, first.clone()).unwrap(), (true, first.clone()));
        let reused = TicketWrite {
            title: "Something else".into(),
            ..first.clone()
        };
        assert_eq!(store(&db, reused).unwrap(), (false, first));
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn writes_from_the_queue_are_checked_again() {
        let ok = TicketWrite {
            id: "t-1".into(),
            title: " Lamp ".into(),
            body: String::new(),
            created_at: 7,
        };
        assert_eq!(checked(ok.clone()).unwrap().title, "Lamp");
        assert!(checked(TicketWrite {
            id: "../x".into(),
            ..ok.clone()
        })
        .is_err());
        assert!(checked(TicketWrite {
            title: "x".repeat(10_000),
            ..ok
        })
        .is_err());
    }
}
