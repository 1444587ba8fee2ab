//! The cluster channels against a real `redis-server`: two nodes' subscribed
//! connections both receive a kick and a broadcast published by a third, decoded;
//! a payload that does not decode is an error for the receiver, not a crash.

#[path = "common/redis_server.rs"]
mod redis_server;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use imshard::cluster::events::{
    decode_event, publish_broadcast, publish_kick, subscribe_cluster_channels, ClusterEvent,
    EventError, BROADCAST_CHANNEL, KICK_CHANNEL,
};
use imshard::cluster::membership::NODES_CHANGED_CHANNEL;
use imshard::proto::pb;
use imshard::store::redis::{publish, PubSubConn, PubSubEvent, RedisConfig, RedisConn};
use redis_server::RedisServer;

type Got = Rc<RefCell<Vec<Result<ClusterEvent, EventError>>>>;

#[test]
fn every_node_gets_kicks_and_broadcasts() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("monoio runtime")
        .block_on(async {
            let node = || {
                let got: Got = Rc::default();
                let sink = got.clone();
                let sub = PubSubConn::start(RedisConfig::new(server.url()), move |e| {
                    if let PubSubEvent::Message { channel, payload } = e {
                        sink.borrow_mut().push(decode_event(&channel, payload));
                    }
                })
                .expect("pub/sub");
                subscribe_cluster_channels(&sub);
                (sub, got)
            };
            let (a, got_a) = node();
            let (b, got_b) = node();
            let deadline = Instant::now() + Duration::from_secs(5);
            for ch in [KICK_CHANNEL, BROADCAST_CHANNEL, NODES_CHANGED_CHANNEL] {
                while !(a.is_confirmed(ch.as_bytes()) && b.is_confirmed(ch.as_bytes())) {
                    assert!(Instant::now() < deadline, "{ch} not confirmed");
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            let conn = RedisConn::connect(RedisConfig::new(server.url()), Duration::from_secs(5))
                .await
                .expect("publisher");
            let kick = pb::KickEvent {
                user_uuid: "alice".into(),
                device_id: "ALL".into(),
                reason: "admin".into(),
            };
            assert_eq!(publish_kick(&conn, &kick).await.unwrap(), 2);
            let broadcast = pb::BroadcastEvent {
                user_uuids: vec!["bob".into()],
                message: Some(pb::MessageEnvelope {
                    r#type: "NOTICE".into(),
                    data: bytes::Bytes::from_static(b"maintenance"),
                    ..Default::default()
                }),
            };
            assert_eq!(publish_broadcast(&conn, &broadcast).await.unwrap(), 2);
            assert_eq!(
                publish(&conn, KICK_CHANNEL.as_bytes(), b"\xff\xff")
                    .await
                    .unwrap(),
                2
            );
            while got_a.borrow().len() < 3 || got_b.borrow().len() < 3 {
                assert!(Instant::now() < deadline + Duration::from_secs(5));
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            for got in [&got_a, &got_b] {
                let got = got.borrow();
                assert_eq!(got[0], Ok(ClusterEvent::Kick(kick.clone())));
                assert_eq!(got[1], Ok(ClusterEvent::Broadcast(broadcast.clone())));
                assert!(matches!(got[2], Err(EventError::Undecodable { .. })));
            }
        });
}
