//! The bus served over TCP: no slow joiners, wildcards and groups, gaps.

use std::time::Duration;

use courier_pubsub::remote::{PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::{Bus, Event, SlowConsumer, SubscribeOptions};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};

async fn host() -> ServerHandle {
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(Bus::new())))
        .spawn(listener)
}

async fn connect(server: &ServerHandle) -> RemotePubSub {
    RemotePubSub::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap()
}

async fn next(sub: &mut courier_pubsub::remote::RemoteSubscription) -> Event {
    tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .expect("an event within 30 s")
        .expect("the subscription is open")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_right_after_subscribe_returns_is_delivered() {
    let server = host().await;
    // Publisher connected before the subscriber, and after it.
    let early = connect(&server).await.publisher();
    for round in 0..1000u32 {
        let subscriber = connect(&server).await;
        let mut sub = subscriber
            .subscribe("race.>", SubscribeOptions::default())
            .await
            .unwrap();
        let publisher = if round % 2 == 0 {
            early.clone()
        } else {
            connect(&server).await.publisher()
        };
        // At least this subscription (earlier rounds' may still be closing).
        assert!(
            publisher
                .publish("race.now", round.to_le_bytes().to_vec())
                .await
                .unwrap()
                >= 1
        );
        let Event::Message(m) = next(&mut sub).await else {
            panic!("a message")
        };
        assert_eq!(&m.payload[..], &round.to_le_bytes());
    }
}

#[tokio::test]
async fn wildcards_and_queue_groups_work_through_the_host() {
    let server = host().await;
    let bus = connect(&server).await;
    let mut all = bus
        .subscribe("orders.>", SubscribeOptions::default())
        .await
        .unwrap();
    let mut eu = bus
        .subscribe("orders.eu.*", SubscribeOptions::default())
        .await
        .unwrap();
    let mut a = bus
        .subscribe("jobs", SubscribeOptions::default().group("g"))
        .await
        .unwrap();
    let mut b = bus
        .subscribe("jobs", SubscribeOptions::default().group("g"))
        .await
        .unwrap();
    let publisher = bus.publisher();
    assert_eq!(
        publisher.publish("orders.eu.created", "1").await.unwrap(),
        2
    );
    assert_eq!(
        publisher.publish("orders.us.created", "2").await.unwrap(),
        1
    );
    for _ in 0..10 {
        assert_eq!(
            publisher.publish("jobs", "j").await.unwrap(),
            1,
            "one group member each time"
        );
    }
    let Event::Message(m) = next(&mut eu).await else {
        panic!()
    };
    assert_eq!(m.subject.as_str(), "orders.eu.created");
    for expected in ["orders.eu.created", "orders.us.created"] {
        let Event::Message(m) = next(&mut all).await else {
            panic!()
        };
        assert_eq!(m.subject.as_str(), expected);
    }
    for _ in 0..5 {
        assert!(matches!(next(&mut a).await, Event::Message(_)));
        assert!(matches!(next(&mut b).await, Event::Message(_)));
    }
}

#[tokio::test]
async fn a_stalled_remote_subscriber_is_told_what_it_missed() {
    let server = host().await;
    let bus = connect(&server).await;
    let mut slow = bus
        .subscribe(
            "flood",
            SubscribeOptions::default()
                .buffer(4)
                .policy(SlowConsumer::DropOldest),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    for n in 0..200u32 {
        publisher
            .publish("flood", n.to_le_bytes().to_vec())
            .await
            .unwrap();
    }
    publisher.publish("flood", "marker").await.unwrap();
    // Every message is either delivered or counted in a reported gap.
    let (mut delivered, mut missed) = (0u64, 0u64);
    loop {
        match next(&mut slow).await {
            Event::Message(m) if &m.payload[..] == b"marker" => {
                delivered += 1;
                break;
            }
            Event::Message(_) => delivered += 1,
            Event::Gap { from, to, .. } => missed += to - from,
        }
    }
    assert!(
        missed > 0,
        "the host dropped some for the stalled subscriber"
    );
    assert_eq!(delivered + missed, 201);
}

#[tokio::test]
async fn a_remote_service_answers_requests_by_subject() {
    let server = host().await;
    let service = connect(&server).await;
    let mut requests = service
        .subscribe("svc.echo", SubscribeOptions::default().group("echo"))
        .await
        .unwrap();
    let replier = service.publisher();
    tokio::spawn(async move {
        while let Some(Ok(Event::Message(request))) = requests.recv().await {
            replier
                .reply(&request, request.payload.clone())
                .await
                .unwrap();
        }
    });
    let client = connect(&server).await;
    for n in 0..20u32 {
        let reply = client
            .request(
                "svc.echo",
                n.to_le_bytes().to_vec(),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(&reply.payload[..], &n.to_le_bytes());
    }
    let err = client
        .request("svc.nobody", "x", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            courier_pubsub::remote::RemotePubSubError::NoResponders(_)
        ),
        "{err:?}"
    );
}
