//! Typed faces: values in, values out, and a message of another type is a
//! typed error for that message alone, on both faces.

use std::time::Duration;

use courier_pubsub::remote::{PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::typed::{self, TypeError, TypedEvent, TypedSubscription};
use courier_pubsub::{Bus, Event, PubSub, Publish, SubscribeOptions, Subscriber};
use courier_rpc::{ClientConfig, Server, ServerConfig, ServerHandle};

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
struct Order {
    id: u64,
    item: String,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
struct Invoice {
    number: String,
    cents: i64,
    paid: bool,
}

async fn next<S: Subscriber, T: serde::de::DeserializeOwned + 'static>(
    sub: &mut TypedSubscription<S, T>,
) -> Result<TypedEvent<T>, TypeError<S::Error>> {
    tokio::time::timeout(Duration::from_secs(30), sub.recv())
        .await
        .expect("an event within 30 s")
        .expect("the subscription is open")
}

fn order(id: u64) -> Order {
    Order {
        id,
        item: format!("item {id}"),
    }
}

/// The program, on either face: a typed subscriber gets its values, a
/// message of another type as `WrongType` naming both, bytes that are not
/// an `Order` as `Undecodable`, and carries on after each.
async fn typed_program<P: PubSub>(bus: P) {
    let mut orders = bus
        .subscribe_typed::<Order>("shop.>", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = bus.publisher();
    publisher
        .publish_typed("shop.orders", &order(1))
        .await
        .unwrap();
    let invoice = Invoice {
        number: "F-1".into(),
        cents: 995,
        paid: false,
    };
    publisher
        .publish_typed("shop.invoices", &invoice)
        .await
        .unwrap();
    publisher.publish("shop.raw", "not an order").await.unwrap();
    // Untagged bytes that are exactly an Order are taken.
    publisher
        .publish("shop.raw", postcard::to_allocvec(&order(3)).unwrap())
        .await
        .unwrap();
    publisher
        .publish_typed("shop.orders", &order(2))
        .await
        .unwrap();
    publisher.flush().await.unwrap();

    match next(&mut orders).await {
        Ok(TypedEvent::Message(m)) => {
            assert_eq!(m.value, order(1));
            assert_eq!(m.message.subject.as_str(), "shop.orders");
            assert_eq!(
                m.message.headers.type_tag(),
                Some(typed::type_tag::<Order>())
            );
        }
        other => panic!("{other:?}"),
    }
    match next(&mut orders).await {
        Err(err @ TypeError::WrongType { .. }) => {
            let text = err.to_string();
            assert!(text.contains("Order") && text.contains("Invoice"), "{text}");
            let TypeError::WrongType {
                expected,
                found,
                message,
            } = err
            else {
                unreachable!()
            };
            assert_eq!(expected, typed::type_tag::<Order>());
            assert_eq!(found, typed::type_tag::<Invoice>());
            // The bytes are still there, for whoever knows the type.
            let invoice_back: typed::TypedMessage<Invoice> =
                typed::decode::<Invoice, ()>(*message).unwrap();
            assert_eq!(invoice_back.value, invoice);
        }
        other => panic!("expected WrongType, got {other:?}"),
    }
    match next(&mut orders).await {
        Err(TypeError::Undecodable { found: None, .. }) => {}
        other => panic!("expected Undecodable, got {other:?}"),
    }
    match next(&mut orders).await {
        Ok(TypedEvent::Message(m)) => assert_eq!(m.value, order(3)),
        other => panic!("{other:?}"),
    }
    match next(&mut orders).await {
        Ok(TypedEvent::Message(m)) => assert_eq!(m.value, order(2)),
        other => panic!("the subscription did not carry on: {other:?}"),
    }

    // Typed request-reply: a typed responder, the reply decoded as its type.
    let mut requests = bus
        .subscribe_typed::<Order>("shop.price", SubscribeOptions::default().group("svc"))
        .await
        .unwrap();
    let responder = bus.publisher();
    let service = tokio::spawn(async move {
        while let Some(Ok(TypedEvent::Message(request))) = requests.recv().await {
            let invoice = Invoice {
                number: format!("F-{}", request.value.id),
                cents: 100 * request.value.id as i64,
                paid: true,
            };
            responder
                .reply_typed(&request.message, &invoice)
                .await
                .unwrap();
        }
    });
    let reply = bus
        .request_typed::<Order, Invoice>("shop.price", &order(7), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(reply.value.number, "F-7");
    assert_eq!(reply.value.cents, 700);
    // A reply of another type is a typed error naming both.
    match bus
        .request_typed::<Order, Order>("shop.price", &order(8), Duration::from_secs(30))
        .await
    {
        Err(TypeError::WrongType {
            expected, found, ..
        }) => {
            assert_eq!(expected, typed::type_tag::<Order>());
            assert_eq!(found, typed::type_tag::<Invoice>());
        }
        other => panic!("expected WrongType, got {other:?}"),
    }
    service.abort();
}

#[tokio::test]
async fn typed_faces_in_process() {
    typed_program(Bus::new()).await;
}

async fn host() -> ServerHandle {
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(Bus::new())))
        .spawn(listener)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_type_over_the_remote_face_is_an_error_not_a_closed_connection() {
    let server = host().await;
    let remote = RemotePubSub::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    typed_program(remote).await;
}

#[tokio::test]
async fn gaps_and_other_events_pass_through_a_typed_subscription() {
    let bus = Bus::new();
    let mut orders = bus
        .subscribe_typed::<Order>(
            "g",
            SubscribeOptions::default()
                .buffer(1)
                .policy(courier_pubsub::SlowConsumer::DropOldest),
        )
        .await
        .unwrap();
    let publisher = bus.publisher();
    for id in 0..3 {
        publisher.publish_typed("g", &order(id)).await.unwrap();
    }
    match next(&mut orders).await {
        Ok(TypedEvent::Other(Event::Gap { from: 0, to: 2, .. })) => {}
        other => panic!("expected the gap first, got {other:?}"),
    }
    match next(&mut orders).await {
        Ok(TypedEvent::Message(m)) => assert_eq!(m.value, order(2)),
        other => panic!("{other:?}"),
    }
}
