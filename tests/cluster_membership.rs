//! Cluster membership against a real `redis-server` on a free loopback port: join,
//! fast notice over pub/sub, graceful leave, lease expiry, stepping down while Redis
//! is unreachable (and before the others drop the node), one instance per node id.
//! Several nodes run on one monoio runtime, each with its own Redis connections.

#[path = "common/redis_server.rs"]
mod redis_server;

#[path = "common/on_loop.rs"]
mod on_loop;

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use imshard::cluster::membership::{
    Membership, MembershipConfig, MembershipError, MembershipEvent, NODES_CHANGED_CHANNEL,
};
use imshard::cluster::slots::SlotMap;
use imshard::cluster::NodeId;
use imshard::store::redis::{PubSubConn, PubSubEvent, RedisConfig, RedisConn};
use on_loop::{eventually, run};
use redis_server::RedisServer;

fn redis_config(url: String) -> RedisConfig {
    let mut c = RedisConfig::new(url);
    c.timeout = Duration::from_millis(300);
    c.connect_timeout = Duration::from_millis(300);
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(100);
    c
}

type Log = Rc<RefCell<Vec<(Instant, MembershipEvent)>>>;

struct Node {
    m: Membership,
    log: Log,
    _sub: Option<PubSubConn>,
}

impl Node {
    /// A node over `url` with `lease`; with `notice`, it also subscribes to the
    /// changes channel and reads the live set on each message.
    fn start(url: &str, id: &str, port: u16, lease: Duration, notice: bool) -> Node {
        let conn = RedisConn::start(redis_config(url.to_string())).expect("redis conn");
        let mut config = MembershipConfig::new(
            NodeId::new(id).unwrap(),
            format!("127.0.0.1:{port}").parse().unwrap(),
        );
        config.lease = lease;
        let log: Log = Rc::default();
        let sink = log.clone();
        let m = Membership::start(conn, config, move |e| {
            sink.borrow_mut().push((Instant::now(), e))
        })
        .expect("start membership");
        let sub = notice.then(|| {
            let target = m.clone();
            let sub = PubSubConn::start(redis_config(url.to_string()), move |e| {
                if let PubSubEvent::Message { .. } | PubSubEvent::Resubscribed { .. } = e {
                    target.refresh_now();
                }
            })
            .expect("pub/sub");
            sub.subscribe(Bytes::from_static(NODES_CHANGED_CHANNEL.as_bytes()));
            sub
        });
        Node { m, log, _sub: sub }
    }

    fn sees(&self, ids: &[&str]) -> bool {
        let live = self.m.live();
        live.ids().map(NodeId::as_str).collect::<Vec<_>>() == ids
    }

    fn saw(&self, f: impl Fn(&MembershipEvent) -> bool) -> Option<Instant> {
        self.log
            .borrow()
            .iter()
            .find(|(_, e)| f(e))
            .map(|(t, _)| *t)
    }
}

fn left(id: &'static str) -> impl Fn(&MembershipEvent) -> bool {
    move |e| matches!(e, MembershipEvent::Changed { left, .. } if left.iter().any(|n| n.id.as_str() == id))
}

fn joined(id: &'static str) -> impl Fn(&MembershipEvent) -> bool {
    move |e| matches!(e, MembershipEvent::Changed { joined, .. } if joined.iter().any(|n| n.id.as_str() == id))
}

fn stepped_down(e: &MembershipEvent) -> bool {
    matches!(e, MembershipEvent::SteppedDown { .. })
}

/// Renew every 500 ms, renew timeout 250 ms, active for 1.25 s after a renew: short
/// enough for quick tests, long enough not to flap on a loaded 2-core box.
const SHORT: Duration = Duration::from_millis(1500);

#[test]
fn join_same_epoch_leave_and_expiry() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    run(async {
        let n1 = Node::start(&url, "n1", 7001, SHORT, true);
        let n2 = Node::start(&url, "n2", 7002, SHORT, true);
        let n3 = Node::start(&url, "n3", 7003, SHORT, true);
        assert!(
            eventually(Duration::from_secs(5), || [&n1, &n2, &n3]
                .iter()
                .all(|n| n.m.is_active() && n.sees(&["n1", "n2", "n3"])))
            .await,
            "all three join"
        );
        assert!(n1.saw(|e| *e == MembershipEvent::Active).is_some());
        assert!(n1.saw(joined("n3")).is_some());
        // Same live set, same epoch (the epoch is Redis', not a local counter).
        assert!(
            eventually(Duration::from_secs(5), || {
                let e = n1.m.live().epoch;
                n2.m.live().epoch == e && n3.m.live().epoch == e
            })
            .await
        );
        // Same live set, same slot owners on every node.
        let map = |n: &Node| {
            let live = n.m.live();
            SlotMap::new(live.epoch, live.ids().cloned())
        };
        assert_eq!(map(&n1), map(&n2));
        assert_eq!(map(&n1), map(&n3));
        assert_eq!(map(&n1).nodes().len(), 3);
        let live = n1.m.live();
        let info = live.get(&NodeId::new("n2").unwrap()).unwrap();
        assert_eq!(info.addr, "127.0.0.1:7002".parse().unwrap());
        assert_eq!(info.instance, n2.m.instance());

        // Graceful leave: gone from the others' view, not active, reported.
        let epoch_before = n1.m.live().epoch;
        let epoch = n2.m.leave().await.expect("leave");
        assert!(epoch > epoch_before);
        assert!(!n2.m.is_active());
        assert!(n2.saw(stepped_down).is_some());
        assert!(
            eventually(Duration::from_secs(5), || n1.sees(&["n1", "n3"])
                && n3.sees(&["n1", "n3"]))
            .await
        );
        assert!(n1.saw(left("n2")).is_some());

        // Expiry: n3 stops renewing without leaving; it is dropped after the lease.
        drop(n3);
        assert!(eventually(Duration::from_secs(5), || n1.sees(&["n1"])).await);
        assert!(n1.saw(left("n3")).is_some());
        assert!(n1.m.is_active());
    });
}

#[test]
fn a_join_is_noticed_through_the_channel_before_the_periodic_read() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    run(async {
        // A 9 s lease: periodic reads every 3 s. The join must show up through the
        // changes channel, long before the next periodic read.
        let lease = Duration::from_secs(9);
        let n1 = Node::start(&url, "n1", 7001, lease, true);
        assert!(eventually(Duration::from_secs(5), || n1.sees(&["n1"])).await);
        // Let the subscription settle so the next change is a channel message.
        monoio::time::sleep(Duration::from_millis(200)).await;
        let reads_before = n1.m.stats().reads;
        let n2 = Node::start(&url, "n2", 7002, lease, false);
        assert!(
            eventually(Duration::from_millis(2500), || n1.sees(&["n1", "n2"])).await,
            "n1 did not hear of n2's join"
        );
        assert!(n1.m.stats().reads > reads_before);
        n2.m.leave().await.expect("leave");
        assert!(eventually(Duration::from_millis(2500), || n1.sees(&["n1"])).await);
    });
}

#[test]
fn redis_gone_means_step_down_and_back() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    run(async {
        let n1 = Node::start(&url, "n1", 7001, SHORT, false);
        assert!(eventually(Duration::from_secs(5), || n1.m.is_active()).await);
        server.kill();
        assert!(
            eventually(Duration::from_secs(5), || n1.saw(stepped_down).is_some()).await,
            "no step-down without Redis: {:?}",
            n1.log.borrow()
        );
        assert!(!n1.m.is_active());
        assert!(matches!(n1.m.last_error(), Some(MembershipError::Redis(_))));
        server.restart();
        // The restarted Redis is empty: the node registers again and is active.
        assert!(
            eventually(Duration::from_secs(5), || n1.m.is_active()
                && n1.sees(&["n1"]))
            .await
        );
        let log = n1.log.borrow();
        let down = log.iter().position(|(_, e)| stepped_down(e)).unwrap();
        assert!(
            log[down..]
                .iter()
                .any(|(_, e)| *e == MembershipEvent::Active),
            "active again after the restart: {log:?}"
        );
    });
}

#[test]
fn a_cut_off_node_steps_down_before_the_others_drop_it() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let proxy = Blackhole::start(server.port);
    run(async {
        let n1 = Node::start(&server.url(), "n1", 7001, SHORT, true);
        let n2 = Node::start(&proxy.url(), "n2", 7002, SHORT, false);
        assert!(
            eventually(Duration::from_secs(5), || n2.m.is_active()
                && n1.sees(&["n1", "n2"]))
            .await
        );
        // n2's Redis traffic vanishes (no RST, no answer): renews stop arriving.
        proxy.cut();
        assert!(
            eventually(Duration::from_secs(5), || n1.saw(left("n2")).is_some()).await,
            "n1 never dropped n2"
        );
        let stepped = n2.saw(stepped_down).expect("n2 stepped down");
        let dropped = n1.saw(left("n2")).expect("n1 dropped n2");
        assert!(
            stepped < dropped,
            "n2 stepped down {:?} after n1 dropped it",
            stepped.duration_since(dropped)
        );
        assert!(!n2.m.is_active());
        assert!(n1.m.is_active());
    });
}

#[test]
fn one_live_instance_per_node_id() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    run(async {
        let first = Node::start(&url, "n1", 7001, SHORT, false);
        assert!(eventually(Duration::from_secs(5), || first.m.is_active()).await);
        let second = Node::start(&url, "n1", 7009, SHORT, false);
        assert!(
            eventually(Duration::from_secs(5), || matches!(
                second.m.last_error(),
                Some(MembershipError::NodeIdInUse(_))
            ))
            .await
        );
        assert!(!second.m.is_active());
        assert!(first.m.is_active());
        // The first dies without leaving: the second gets the id once the lease ran out.
        let first_instance = first.m.instance();
        drop(first);
        assert!(eventually(Duration::from_secs(5), || second.m.is_active()).await);
        assert!(
            eventually(Duration::from_secs(5), || {
                let live = second.m.live();
                live.nodes.len() == 1
                    && live.nodes[0].instance == second.m.instance()
                    && live.nodes[0].instance != first_instance
                    && live.nodes[0].addr.port() == 7009
            })
            .await
        );
    });
}

/// A TCP proxy to Redis that can be cut: from then on it forwards nothing in either
/// direction but keeps the sockets open, like a partition.
struct Blackhole {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl Blackhole {
    fn start(target: u16) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else {
                    return;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if !flag.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Blackhole { port, cut }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}
