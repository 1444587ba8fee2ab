//! The node-to-node link between two monoio runtimes on two threads over loopback:
//! replies by correlation id, one write per turn, timeouts that keep the
//! connection, refusals, a peer that goes away and comes back, a peer removed from
//! the live set, a stale address now held by another node.

#[path = "common/on_loop.rs"]
mod on_loop;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use imshard::cluster::link::{LinkConfig, LinkError, LinkServer, Links, Responder};
use imshard::cluster::NodeId;
use on_loop::run;

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn config() -> LinkConfig {
    LinkConfig {
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        max_payload: 1 << 20,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
    }
}

/// A node's link server on its own thread and runtime. Requests: `never` is kept
/// unanswered, `drop` is dropped, `slow` is answered after 300 ms, `whoami` answers
/// the caller's node id, anything else is echoed after `re:`.
struct Node {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Node {
    fn start(name: &str, addr: SocketAddr) -> Node {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let flag = stop.clone();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            run(async move {
                let parked: Rc<RefCell<Vec<Responder>>> = Rc::default();
                let server =
                    LinkServer::bind(
                        addr,
                        id(&name),
                        config(),
                        move |payload, r| match &payload[..] {
                            b"never" => parked.borrow_mut().push(r),
                            b"drop" => drop(r),
                            b"slow" => {
                                monoio::spawn(async move {
                                    monoio::time::sleep(Duration::from_millis(300)).await;
                                    r.reply(b"slow done");
                                });
                            }
                            b"whoami" => {
                                let from = r.from().to_string();
                                r.reply(from.as_bytes());
                            }
                            p => {
                                let mut v = b"re:".to_vec();
                                v.extend_from_slice(p);
                                r.reply(&v);
                            }
                        },
                    )
                    .expect("link server");
                tx.send(server.local_addr()).unwrap();
                while !flag.load(Ordering::SeqCst) {
                    monoio::time::sleep(Duration::from_millis(5)).await;
                }
                drop(server);
                monoio::time::sleep(Duration::from_millis(20)).await;
            })
        });
        let addr = rx.recv().expect("server address");
        Node {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn many_requests_one_turn_one_write_and_replies_matched() {
    let b = Node::start("b", "127.0.0.1:0".parse().unwrap());
    run(async {
        let links = Links::new(id("a"), config());
        links.set_peers([(id("b"), b.addr), (id("a"), "127.0.0.1:1".parse().unwrap())]);
        assert_eq!(links.peers(), vec![(id("b"), b.addr)], "self is skipped");
        assert_eq!(links.request(&id("b"), b"whoami").await.unwrap(), &b"a"[..]);
        let writes = links.stats().writes;
        let tasks: Vec<_> = (0..1000)
            .map(|i| {
                let links = links.clone();
                monoio::spawn(async move {
                    let got = links
                        .request(&id("b"), format!("m{i}").as_bytes())
                        .await
                        .expect("reply");
                    assert_eq!(got, format!("re:m{i}").as_bytes());
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        assert_eq!(
            links.stats().writes - writes,
            1,
            "1000 requests of one turn went out in one write"
        );
        let big = vec![7u8; 300_000];
        let got = links.request(&id("b"), &big).await.unwrap();
        assert_eq!(got.len(), 300_003);
        assert!(matches!(
            links.request(&id("b"), &vec![0u8; (1 << 20) + 1]).await,
            Err(LinkError::TooLarge { .. })
        ));
        assert!(matches!(
            links.request(&id("zz"), b"x").await,
            Err(LinkError::UnknownNode(_))
        ));
        let s = links.stats();
        assert_eq!(s.connects, 1);
        assert_eq!(s.replies, 1002);
    });
}

#[test]
fn timeouts_and_refusals_keep_the_connection() {
    let b = Node::start("b", "127.0.0.1:0".parse().unwrap());
    run(async {
        let links = Links::new(id("a"), config());
        links.set_peers([(id("b"), b.addr)]);
        let ask = |payload: &'static [u8]| {
            let links = links.clone();
            monoio::spawn(async move { links.request(&id("b"), payload).await })
        };
        let (slow, never, dropped) = (ask(b"slow"), ask(b"never"), ask(b"drop"));
        let (slow, never, dropped) = (slow.await, never.await, dropped.await);
        assert_eq!(slow.unwrap(), &b"slow done"[..]);
        let never = never.unwrap_err();
        assert!(matches!(never, LinkError::Timeout { .. }), "{never:?}");
        assert!(never.outcome_unknown() && never.is_retryable());
        let dropped = dropped.unwrap_err();
        assert!(
            matches!(&dropped, LinkError::Refused { reason, .. } if reason.contains("dropped")),
            "{dropped:?}"
        );
        assert!(!dropped.is_retryable());
        assert_eq!(links.request(&id("b"), b"ok").await.unwrap(), &b"re:ok"[..]);
        assert_eq!(links.stats().connects, 1, "no reconnect after a timeout");
    });
}

#[test]
fn peer_restart_and_removal() {
    let mut b = Node::start("b", "127.0.0.1:0".parse().unwrap());
    let addr = b.addr;
    run(async {
        let links = Links::new(id("a"), config());
        links.set_peers([(id("b"), addr)]);
        assert!(links.request(&id("b"), b"1").await.is_ok());

        // The peer goes away with a request in flight.
        let pending = {
            let links = links.clone();
            monoio::spawn(async move { links.request(&id("b"), b"slow").await })
        };
        monoio::time::sleep(Duration::from_millis(50)).await;
        b.stop();
        let e = pending.await.unwrap_err();
        assert!(matches!(e, LinkError::Disconnected { .. }), "{e:?}");
        assert!(!links.is_connected(&id("b")));
        let e = links.request(&id("b"), b"2").await.unwrap_err();
        assert!(matches!(e, LinkError::Unreachable { .. }), "{e:?}");
        assert!(!e.outcome_unknown());

        // Back on the same address: requests work again once the backoff passed.
        let _b2 = Node::start("b", addr);
        let mut ok = false;
        for _ in 0..100 {
            if links.request(&id("b"), b"3").await.is_ok() {
                ok = true;
                break;
            }
            monoio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok, "no reconnect to the restarted peer");

        // Removed from the live set while a request waits.
        let pending = {
            let links = links.clone();
            monoio::spawn(async move { links.request(&id("b"), b"never").await })
        };
        monoio::time::sleep(Duration::from_millis(50)).await;
        links.set_peers([]);
        assert_eq!(pending.await, Err(LinkError::NodeGone(id("b"))));
        assert!(matches!(
            links.request(&id("b"), b"4").await,
            Err(LinkError::UnknownNode(_))
        ));
    });
}

#[test]
fn a_stale_address_now_held_by_another_node_is_refused() {
    let c = Node::start("c", "127.0.0.1:0".parse().unwrap());
    run(async {
        let links = Links::new(id("a"), config());
        // The live set still says b is at this address, but c listens there now.
        links.set_peers([(id("b"), c.addr)]);
        let e = links.request(&id("b"), b"x").await.unwrap_err();
        assert!(
            matches!(&e, LinkError::Unreachable { reason, .. } if reason.contains("this is node c, not b")),
            "{e:?}"
        );
        // The address is corrected: it works.
        links.set_peers([(id("c"), c.addr)]);
        assert_eq!(links.request(&id("c"), b"x").await.unwrap(), &b"re:x"[..]);
    });
}

#[test]
fn dropping_the_server_closes_listener_and_connections() {
    run(async {
        let server = LinkServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            id("b"),
            config(),
            |payload, r| r.reply(&payload),
        )
        .expect("link server");
        let addr = server.local_addr();
        // Nobody else may listen on the same port while it runs (no SO_REUSEPORT).
        assert!(LinkServer::bind(addr, id("x"), config(), |_, _| {}).is_err());
        let links = Links::new(id("a"), config());
        links.set_peers([(id("b"), addr)]);
        assert_eq!(links.request(&id("b"), b"x").await.unwrap(), &b"x"[..]);
        assert_eq!(server.connections(), 1);
        drop(server);
        let e = links.request(&id("b"), b"y").await.unwrap_err();
        assert!(
            matches!(
                &e,
                LinkError::Disconnected { .. } | LinkError::Unreachable { .. }
            ),
            "{e:?}"
        );
        monoio::time::sleep(Duration::from_millis(150)).await;
        let e = links.request(&id("b"), b"z").await.unwrap_err();
        assert!(
            matches!(&e, LinkError::Unreachable { reason, .. } if reason.contains("refused")),
            "the listener is closed: {e:?}"
        );
    });
}
