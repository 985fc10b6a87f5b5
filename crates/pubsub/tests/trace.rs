//! A publish made inside a trace scope carries the trace's `traceparent`,
//! on both faces, for plain publishes and requests alike.

use std::time::Duration;

use courier_pubsub::remote::{PubSubHost, PubSubServiceServer, RemotePubSub};
use courier_pubsub::{Bus, Event, Headers, Message, PubSub, Publish, SubscribeOptions, Subscriber};
use courier_rpc::{ClientConfig, Server, ServerConfig};
use courier_transport::trace::{self, TraceContext};

async fn message<S: Subscriber>(sub: &mut S) -> Message {
    match tokio::time::timeout(Duration::from_secs(30), sub.recv()).await {
        Ok(Some(Ok(Event::Message(m)))) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

async fn traced_program<P: PubSub>(bus: P) {
    let mut sub = bus
        .subscribe("t.>", SubscribeOptions::default())
        .await
        .unwrap();
    let publisher = bus.publisher();
    let ctx = TraceContext::root();

    trace::scope(ctx, publisher.publish("t.in", "x"))
        .await
        .unwrap();
    publisher.publish("t.out", "y").await.unwrap();
    // A traceparent the publisher set itself is kept.
    let own = TraceContext::root();
    let mut headers = Headers::new();
    headers
        .insert(courier_wire::headers::TRACEPARENT, own.to_traceparent())
        .unwrap();
    trace::scope(ctx, publisher.publish_with_headers("t.own", headers, "z"))
        .await
        .unwrap();
    publisher.flush().await.unwrap();

    let inside = message(&mut sub).await;
    assert_eq!(
        inside.trace_context(),
        Some(ctx),
        "published inside the scope"
    );
    assert_eq!(
        message(&mut sub).await.trace_context(),
        None,
        "outside any scope"
    );
    assert_eq!(message(&mut sub).await.trace_context(), Some(own));

    // A request made in a scope reaches its responder with the trace.
    let mut requests = bus
        .subscribe("svc.trace", SubscribeOptions::default())
        .await
        .unwrap();
    let responder = bus.publisher();
    let service = tokio::spawn(async move {
        let request = message(&mut requests).await;
        let seen = request
            .trace_context()
            .map(|c| c.trace_id_hex())
            .unwrap_or_default();
        responder.reply(&request, seen).await.unwrap();
    });
    let reply = trace::scope(ctx, bus.request("svc.trace", "?", Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&reply.payload), ctx.trace_id_hex());
    service.await.unwrap();
}

#[tokio::test]
async fn a_publish_in_a_trace_scope_carries_traceparent_in_process() {
    traced_program(Bus::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_in_a_trace_scope_carries_traceparent_through_a_host() {
    let listener =
        courier_transport::bind(&"tcp://127.0.0.1:0".parse().unwrap(), &Default::default())
            .await
            .unwrap();
    let server = Server::new(ServerConfig::default())
        .service(PubSubServiceServer::new(PubSubHost::new(Bus::new())))
        .spawn(listener);
    let remote = RemotePubSub::connect(server.local_addr(), ClientConfig::default())
        .await
        .unwrap();
    traced_program(remote).await;
}
