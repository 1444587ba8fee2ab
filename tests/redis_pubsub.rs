//! The pub/sub connection against a real `redis-server` on a free loopback port:
//! subscribe and receive, one write per turn, unsubscribe stops delivery, kill and
//! restart on the same port brings a `Resubscribed` event and delivery back.

#[path = "common/redis_server.rs"]
mod redis_server;

#[path = "common/on_loop.rs"]
mod on_loop;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use imshard::store::redis::{publish, PubSubConn, PubSubEvent, RedisConn};
use on_loop::{eventually, run};
use redis_server::RedisServer;

type Events = Rc<RefCell<Vec<PubSubEvent>>>;

fn start(server: &RedisServer) -> (PubSubConn, Events) {
    let events: Events = Rc::default();
    let sink = events.clone();
    let conn = PubSubConn::start(server.quick_config(), move |e| sink.borrow_mut().push(e))
        .expect("start pub/sub");
    (conn, events)
}

fn messages(events: &Events) -> Vec<(String, String)> {
    events
        .borrow()
        .iter()
        .filter_map(|e| match e {
            PubSubEvent::Message { channel, payload } => Some((
                String::from_utf8_lossy(channel).into_owned(),
                String::from_utf8_lossy(payload).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn subscribe_publish_unsubscribe() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let publisher = RedisConn::connect(server.quick_config(), Duration::from_secs(5))
            .await
            .expect("publisher");
        let (sub, events) = start(&server);
        // Changes of one turn: three channels, one dropped again before the write.
        sub.subscribe(Bytes::from_static(b"a"));
        sub.subscribe(Bytes::from_static(b"b"));
        sub.subscribe(Bytes::from_static(b"c"));
        sub.unsubscribe(b"c");
        assert!(sub.is_held(b"a") && !sub.is_held(b"c"));
        assert!(
            eventually(Duration::from_secs(5), || sub.is_confirmed(b"a")
                && sub.is_confirmed(b"b"))
            .await,
            "subscriptions confirmed"
        );
        assert!(!sub.is_confirmed(b"c"));
        let writes = sub.stats().writes;
        assert_eq!(writes, 1, "the first turn's changes went out in one write");

        // A payload with every byte value survives.
        let binary: Vec<u8> = (0..=255u8).collect();
        assert_eq!(publish(&publisher, b"a", b"hello a").await.unwrap(), 1);
        assert_eq!(publish(&publisher, b"b", &binary).await.unwrap(), 1);
        assert_eq!(publish(&publisher, b"c", b"nobody").await.unwrap(), 0);
        assert_eq!(publish(&publisher, b"a", b"second").await.unwrap(), 1);
        assert!(eventually(Duration::from_secs(5), || messages(&events).len() == 3).await);
        let got = messages(&events);
        assert_eq!(got[0], ("a".into(), "hello a".into()));
        assert_eq!(got[2], ("a".into(), "second".into()));
        assert!(events.borrow().iter().any(|e| matches!(e,
            PubSubEvent::Message { channel, payload } if &channel[..] == b"b" && payload[..] == binary[..])));

        // Unsubscribe: nothing more for `a`, even what is published at once.
        sub.unsubscribe(b"a");
        // Published in the same turn as the UNSUBSCRIBE: Redis may still hand it over,
        // and then it is dropped on arrival.
        let late = publish(&publisher, b"a", b"late").await.unwrap();
        assert!(eventually(Duration::from_secs(5), || !sub.is_confirmed(b"a")).await);
        assert!(eventually(Duration::from_secs(5), || sub.stats().dropped == late).await);
        assert_eq!(publish(&publisher, b"a", b"after").await.unwrap(), 0);
        assert_eq!(publish(&publisher, b"b", b"still").await.unwrap(), 1);
        assert!(eventually(Duration::from_secs(5), || messages(&events).len() == 4).await);
        monoio::time::sleep(Duration::from_millis(100)).await;
        let got = messages(&events);
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got[3], ("b".into(), "still".into()));
        let stats = sub.stats();
        assert_eq!(stats.channels, 1);
        assert_eq!(stats.messages, 4);
        assert!(!events
            .borrow()
            .iter()
            .any(|e| matches!(e, PubSubEvent::Disconnected { .. })));
    });
}

#[test]
fn many_channels_one_write() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let publisher = RedisConn::connect(server.quick_config(), Duration::from_secs(5))
            .await
            .expect("publisher");
        let (sub, events) = start(&server);
        assert!(eventually(Duration::from_secs(5), || sub.is_connected()).await);
        let before = sub.stats().writes;
        for i in 0..2000 {
            sub.subscribe(format!("user:{i}"));
        }
        assert!(
            eventually(Duration::from_secs(5), || (0..2000)
                .all(|i| sub.is_confirmed(format!("user:{i}").as_bytes())))
            .await
        );
        assert_eq!(
            sub.stats().writes - before,
            1,
            "2000 subscribes of one turn, one write"
        );
        for i in (0..2000).step_by(100) {
            assert_eq!(
                publish(&publisher, format!("user:{i}").as_bytes(), b"x")
                    .await
                    .unwrap(),
                1
            );
        }
        assert!(eventually(Duration::from_secs(5), || messages(&events).len() == 20).await);
    });
}

#[test]
fn restart_resubscribes_and_delivery_resumes() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    run(async {
        let (sub, events) = start(&server);
        sub.subscribe(Bytes::from_static(b"connect:events:kick"));
        sub.subscribe(Bytes::from_static(b"imshard:nodes:changed"));
        assert!(
            eventually(Duration::from_secs(5), || sub
                .is_confirmed(b"connect:events:kick"))
            .await
        );

        server.kill();
        assert!(
            eventually(Duration::from_secs(5), || events
                .borrow()
                .iter()
                .any(|e| matches!(e, PubSubEvent::Disconnected { .. })))
            .await,
            "the break is reported"
        );
        assert!(!sub.is_confirmed(b"connect:events:kick"));
        // Changes while disconnected are kept and applied on the next connection.
        sub.subscribe(Bytes::from_static(b"while-down"));
        sub.unsubscribe(b"imshard:nodes:changed");
        server.restart();

        assert!(
            eventually(Duration::from_secs(10), || events
                .borrow()
                .iter()
                .any(|e| matches!(e, PubSubEvent::Resubscribed { .. })))
            .await,
            "resubscribed after restart: {:?}",
            events.borrow()
        );
        let resubscribed = events
            .borrow()
            .iter()
            .find_map(|e| match e {
                PubSubEvent::Resubscribed { channels } => Some(*channels),
                _ => None,
            })
            .unwrap();
        assert_eq!(resubscribed, 2);
        assert!(sub.is_confirmed(b"connect:events:kick") && sub.is_confirmed(b"while-down"));
        assert_eq!(sub.stats().reconnects, 1);

        let publisher = RedisConn::connect(server.quick_config(), Duration::from_secs(5))
            .await
            .expect("publisher");
        assert_eq!(
            publish(&publisher, b"connect:events:kick", b"k1")
                .await
                .unwrap(),
            1
        );
        assert_eq!(publish(&publisher, b"while-down", b"w1").await.unwrap(), 1);
        assert_eq!(
            publish(&publisher, b"imshard:nodes:changed", b"gone")
                .await
                .unwrap(),
            0
        );
        assert!(eventually(Duration::from_secs(5), || messages(&events).len() == 2).await);
        assert_eq!(
            messages(&events),
            vec![
                ("connect:events:kick".into(), "k1".into()),
                ("while-down".into(), "w1".into())
            ]
        );
    });
}

#[test]
fn frozen_server_is_noticed_by_ping() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let (sub, events) = start(&server);
        sub.subscribe(Bytes::from_static(b"x"));
        assert!(eventually(Duration::from_secs(5), || sub.is_confirmed(b"x")).await);
        server.pause(true);
        let noticed = eventually(Duration::from_secs(5), || {
            events.borrow().iter().any(
                |e| matches!(e, PubSubEvent::Disconnected { reason } if reason.contains("PONG")),
            )
        })
        .await;
        server.pause(false);
        assert!(noticed, "{:?}", events.borrow());
        assert!(
            eventually(Duration::from_secs(10), || events
                .borrow()
                .iter()
                .any(|e| matches!(e, PubSubEvent::Resubscribed { channels: 1 })))
            .await
        );
    });
}

#[test]
fn dropping_the_handle_ends_the_connection_quietly() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let publisher = RedisConn::connect(server.quick_config(), Duration::from_secs(5))
            .await
            .expect("publisher");
        let (sub, events) = start(&server);
        sub.subscribe(Bytes::from_static(b"x"));
        assert!(eventually(Duration::from_secs(5), || sub.is_confirmed(b"x")).await);
        drop(sub);
        // PUBLISH answers how many subscribers got it: none once the socket is gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while publish(&publisher, b"x", b"y").await.unwrap() != 0 {
            assert!(
                Instant::now() < deadline,
                "the dropped connection still subscribes"
            );
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(events.borrow().is_empty(), "{:?}", events.borrow());
    });
}

/// A connection that holds no channel is not in subscribed mode and Redis answers its
/// PING with a plain `+PONG`: that is a pong, not a broken connection (it once made
/// every idle subscription reconnect, and cluster clients got needless RESYNCs).
#[test]
fn a_connection_with_no_channels_survives_its_pings() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    run(async {
        let (sub, events) = start(&server);
        assert!(eventually(Duration::from_secs(5), || sub.is_connected()).await);
        // Several ping periods (the timeout is 500 ms).
        monoio::time::sleep(Duration::from_millis(2_000)).await;
        assert!(
            events
                .borrow()
                .iter()
                .all(|e| !matches!(e, PubSubEvent::Disconnected { .. })),
            "{:?}",
            events.borrow()
        );
        // And it still subscribes and delivers afterwards.
        sub.subscribe(Bytes::from_static(b"later"));
        assert!(eventually(Duration::from_secs(5), || sub.is_confirmed(b"later")).await);
    });
}
