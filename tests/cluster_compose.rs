//! The cluster pieces composed as `src/cluster/mod.rs` describes, two nodes on two
//! threads sharing a real `redis-server`: membership feeds the slot map and the
//! link's peer table, a request for a conversation owned by the other node goes to
//! it in one hop, and its owner agrees it owns it; after a graceful leave the slot
//! map and the peer table follow.

#[path = "common/redis_server.rs"]
mod redis_server;

#[path = "common/on_loop.rs"]
mod on_loop;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imshard::cluster::events::{decode_event, subscribe_cluster_channels, ClusterEvent};
use imshard::cluster::link::{LinkConfig, LinkError, LinkServer, Links};
use imshard::cluster::membership::{Membership, MembershipConfig, MembershipEvent};
use imshard::cluster::slots::SlotMap;
use imshard::cluster::NodeId;
use imshard::store::redis::{PubSubConn, PubSubEvent, RedisConfig, RedisConn};
use on_loop::{eventually, run};
use redis_server::RedisServer;

/// One node: link server, membership, cluster channels, links to the others.
struct Node {
    membership: Membership,
    links: Links,
    _server: LinkServer,
    _sub: PubSubConn,
}

impl Node {
    fn start(url: &str, name: &str) -> Node {
        let me = NodeId::new(name).unwrap();
        let membership_slot: Rc<RefCell<Option<Membership>>> = Rc::default();
        // The handler answers only for conversations this node owns by its own map.
        let owner_view = membership_slot.clone();
        let me_for_handler = me.clone();
        let server = LinkServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            me.clone(),
            LinkConfig::default(),
            move |payload, r| {
                let conv = String::from_utf8_lossy(&payload).into_owned();
                let map = owner_view.borrow().as_ref().map(|m: &Membership| {
                    let live = m.live();
                    SlotMap::new(live.epoch, live.ids().cloned())
                });
                match map.as_ref().and_then(|m| m.owner_of_conv(&conv)) {
                    Some(owner) if *owner == me_for_handler => {
                        r.reply(format!("{me_for_handler} owns {conv}").as_bytes())
                    }
                    other => r.refuse(&format!("not the owner of {conv}: {other:?}")),
                }
            },
        )
        .expect("link server");
        let links = Links::new(me.clone(), LinkConfig::default());
        let peers: Rc<RefCell<HashMap<NodeId, SocketAddr>>> = Rc::default();
        let sink_links = links.clone();
        let mut config = MembershipConfig::new(me, server.local_addr());
        config.lease = Duration::from_millis(1500);
        let conn = RedisConn::start(RedisConfig::new(url)).expect("redis");
        let membership = Membership::start(conn, config, move |e| {
            if let MembershipEvent::Changed { joined, left, .. } = e {
                let mut p = peers.borrow_mut();
                for n in left {
                    p.remove(&n.id);
                }
                for n in joined {
                    p.insert(n.id, n.addr);
                }
                sink_links.set_peers(p.iter().map(|(id, addr)| (id.clone(), *addr)));
            }
        })
        .expect("membership");
        *membership_slot.borrow_mut() = Some(membership.clone());
        let notify = membership.clone();
        let sub = PubSubConn::start(RedisConfig::new(url), move |e| match e {
            PubSubEvent::Message { channel, payload } => {
                if let Ok(ClusterEvent::NodesChanged(_)) = decode_event(&channel, payload) {
                    notify.refresh_now();
                }
            }
            PubSubEvent::Resubscribed { .. } => notify.refresh_now(),
            PubSubEvent::Disconnected { .. } => {}
        })
        .expect("pub/sub");
        subscribe_cluster_channels(&sub);
        Node {
            membership,
            links,
            _server: server,
            _sub: sub,
        }
    }

    fn map(&self) -> SlotMap {
        let live = self.membership.live();
        SlotMap::new(live.epoch, live.ids().cloned())
    }
}

#[test]
fn a_request_reaches_the_owner_in_one_hop_and_follows_a_leave() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let stop = Arc::new(AtomicBool::new(false));
    let b_thread = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            run(async move {
                let b = Node::start(&url, "b");
                while !stop.load(Ordering::SeqCst) {
                    monoio::time::sleep(Duration::from_millis(5)).await;
                }
                b.membership.leave().await.expect("b leaves");
            })
        })
    };
    run(async {
        let a = Node::start(&url, "a");
        let (na, nb) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
        assert!(
            eventually(Duration::from_secs(10), || a.membership.is_active()
                && a.map().nodes().len() == 2
                && a.links.peers().len() == 1)
            .await,
            "a sees b"
        );
        let map = a.map();
        let on_b = (0..)
            .map(|i| format!("grp-g{i}"))
            .find(|c| map.owner_of_conv(c) == Some(&nb))
            .unwrap();
        let on_a = (0..)
            .map(|i| format!("grp-g{i}"))
            .find(|c| map.owner_of_conv(c) == Some(&na))
            .unwrap();
        // b may not have read the live set with a in it yet: retry until it agrees.
        let mut reply = Err(LinkError::UnknownNode(nb.clone()));
        for _ in 0..200 {
            reply = a.links.request(&nb, on_b.as_bytes()).await;
            if reply.is_ok() {
                break;
            }
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(reply.unwrap(), format!("b owns {on_b}").as_bytes());
        let e = a.links.request(&nb, on_a.as_bytes()).await.unwrap_err();
        assert!(matches!(e, LinkError::Refused { .. }), "{e:?}");

        // b leaves: a owns everything and has no peer left.
        stop.store(true, Ordering::SeqCst);
        assert!(
            eventually(Duration::from_secs(10), || a.map().nodes().len() == 1).await,
            "a saw b leave"
        );
        assert_eq!(a.map().owner_of_conv(&on_b), Some(&na));
        assert!(eventually(Duration::from_secs(5), || a.links.peers().is_empty()).await);
        assert!(matches!(
            a.links.request(&nb, on_b.as_bytes()).await,
            Err(LinkError::UnknownNode(_))
        ));
    });
    b_thread.join().expect("node b");
}
