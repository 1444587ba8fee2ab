//! Cluster mode: three real `imshard` nodes on one real `redis-server`, each with two
//! shards, speaking real WebSocket and HTTP on loopback. A user may connect to any
//! node; conversations are owned by one node (slot map over the live set) and
//! everything of the contract works across nodes.

mod common;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{free_port, Client, Server};
use imshard::cluster::slots::SlotMap;
use imshard::cluster::NodeId;
use imshard::proto::pb::{self, client_frame::Body, ConvType, PullDirection};
use prost::Message as _;

const LEASE: &str = "2s";

struct Cluster {
    redis: RedisServer,
    nodes: Vec<Server>,
    ids: Vec<String>,
}

fn start_node(redis: &RedisServer, id: &str) -> Server {
    start_node_with(redis, id, &[])
}

fn start_node_with(redis: &RedisServer, id: &str, more: &[&str]) -> Server {
    let link = format!("127.0.0.1:{}", free_port());
    let url = redis.url();
    let mut args = vec![
        "--store",
        "redis",
        "--redis-url",
        &url,
        "--node-id",
        id,
        "--node-listen",
        &link,
        "--cluster-lease",
        LEASE,
    ];
    args.extend_from_slice(more);
    Server::start(2, &args)
}

impl Cluster {
    /// Three nodes, each seeing all three and holding its lease.
    fn start() -> Option<Cluster> {
        Cluster::start_on(RedisServer::start()?, 3)
    }

    /// `n` nodes on `redis`.
    fn start_on(redis: RedisServer, n: usize) -> Option<Cluster> {
        Cluster::start_with(redis, n, &[])
    }

    /// `n` nodes on `redis`, each with `more` flags.
    fn start_with(redis: RedisServer, n: usize, more: &[&str]) -> Option<Cluster> {
        let ids: Vec<String> = ["n1", "n2", "n3"][..n]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let nodes: Vec<Server> = ids
            .iter()
            .map(|id| start_node_with(&redis, id, more))
            .collect();
        let c = Cluster { redis, nodes, ids };
        c.wait_formed(n as u64);
        Some(c)
    }

    /// Waits until every running node's shards see `n` live nodes and hold the lease.
    fn wait_formed(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let formed = self.nodes.iter().all(|s| {
                s.metric("imshard_cluster_nodes") == n * s.shards as u64
                    && s.metric("imshard_cluster_active") == s.shards as u64
            });
            if formed {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not form");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node (index) that owns `key` with these nodes live.
    fn owner(&self, live: &[&str], key: &str) -> usize {
        let map = SlotMap::new(0, live.iter().map(|i| NodeId::new(*i).expect("id")));
        let owner = map.owner_of_conv(key).expect("owner").as_str().to_string();
        self.ids
            .iter()
            .position(|i| *i == owner)
            .expect("known node")
    }
}

/// Waits until `node`'s shards hold at least `n` channels (subscriptions are made as
/// users connect and groups are learnt; pushes published before are not delivered:
/// pub/sub is at most once), plus a moment for Redis to confirm them.
fn wait_channels(node: &Server, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.metric("imshard_channels") < n {
        assert!(
            Instant::now() < deadline,
            "the node did not subscribe: {} < {n}",
            node.metric("imshard_channels")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
}

/// A user id whose rows the node `want` owns (so tests can place owners).
fn user_owned_by(c: &Cluster, want: usize, prefix: &str) -> String {
    let live = ["n1", "n2", "n3"];
    (0..10_000)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| c.owner(&live, u) == want)
        .expect("a user for that node")
}

fn p2p(a: &str, b: &str) -> String {
    imshard::ids::p2p_conv_id(a, b)
}

#[test]
fn a_user_on_one_node_gets_a_message_sent_on_another() {
    let Some(c) = Cluster::start() else { return };
    // alice's rows live on n2, bob's on n3, and both connect elsewhere: alice to n1,
    // bob to n3... and the conversation is owned by whichever node its slot says.
    let alice = user_owned_by(&c, 1, "alice");
    let bob = user_owned_by(&c, 2, "bob");
    let mut a = c.nodes[0].connect(&alice, "phone");
    let mut b = c.nodes[2].connect(&bob, "phone");
    let mut a2 = c.nodes[1].connect(&alice, "laptop");
    // Subscriptions are made on connect.
    for i in 0..3 {
        wait_channels(&c.nodes[i], 1);
    }
    let sent = b
        .send_p2p(&alice, "c1", "hello across nodes")
        .expect("send");
    assert_eq!(sent.seq, 1);
    let push = a.next_push().expect("alice's phone on n1 gets the push");
    assert_eq!(push.content, "hello across nodes");
    assert_eq!(push.seq, 1);
    let push2 = a2.next_push().expect("alice's laptop on n2 gets it too");
    assert_eq!(push2.msg_id, sent.msg_id);
    // A resend with the same client_msg_id from another node is deduplicated.
    let mut b2 = c.nodes[0].connect(&bob, "tablet");
    let again = b2
        .send_p2p(&alice, "c1", "hello across nodes")
        .expect("resend");
    assert_eq!(again.msg_id, sent.msg_id);
    let conv = p2p(&alice, &bob);
    // Mark read on n1 reaches alice's other device on n2.
    let mr = a.request(Body::MarkRead(pb::MarkReadRequest {
        conv_id: conv.clone(),
        read_seq: 1,
    }));
    assert_eq!(mr.code, 0, "{}", mr.message);
    assert!(
        a2.next_of("MSG_MARK_READ").is_some(),
        "read mark reaches the other node"
    );
    // Alice replies from n1; seqs continue.
    let r = a.send_p2p(&bob, "c2", "hi bob").expect("reply");
    assert_eq!(r.seq, 2);
    assert_eq!(b.next_push().expect("bob gets the reply").seq, 2);
    // Pull, conversation list and unread from any node.
    let page = a2.pull(&conv, 0, 10, PullDirection::Forward).expect("pull");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let list = b2.request(Body::GetConversations(
        pb::GetConversationsRequest::default(),
    ));
    assert_eq!(list.code, 0, "{}", list.message);
    let list = pb::GetConversationsResponse::decode(&*list.body).expect("list");
    assert_eq!(list.conversations.len(), 1);
    assert_eq!(list.conversations[0].max_seq, 2);
    // Recall from bob on n3 reaches alice on n1.
    let rc = b.request(Body::Recall(pb::RecallMessageRequest {
        conv_id: conv.clone(),
        msg_id: sent.msg_id.clone(),
    }));
    assert_eq!(rc.code, 0, "{}", rc.message);
    assert!(a.next_of("MSG_RECALL").is_some(), "recall reaches n1");
    // Work moved between nodes.
    let forwarded: u64 = c
        .nodes
        .iter()
        .map(|s| s.metric("imshard_node_requests_forwarded_total"))
        .sum();
    let served: u64 = c
        .nodes
        .iter()
        .map(|s| s.metric("imshard_node_requests_served_total"))
        .sum();
    assert!(
        forwarded > 0 && served > 0,
        "forwarded {forwarded}, served {served}"
    );
}

#[test]
fn group_members_on_every_node_and_a_node_without_members_hears_nothing() {
    let Some(c) = Cluster::start() else { return };
    let (u1, u2, u3) = ("gm_one", "gm_two", "gm_three");
    let mut c1 = c.nodes[0].connect(u1, "d");
    let mut c2 = c.nodes[1].connect(u2, "d");
    wait_channels(&c.nodes[0], 1);
    wait_channels(&c.nodes[1], 1);
    let created = c2.request(Body::CreateGroup(pb::CreateGroupRequest {
        group_id: "gx".into(),
        name: "across".into(),
        members: vec![u1.into(), u3.into()],
    }));
    assert_eq!(created.code, 0, "{}", created.message);
    // u1 hears of the group being created (its node subscribes to the group).
    let first = c1.next_push().expect("u1 gets the created message");
    assert_eq!(first.seq, 1);
    // The third member connects to n3 after the group exists.
    let mut c3 = c.nodes[2].connect(u3, "d");
    // n3 reads u3's groups from the store and subscribes: u:{u3} and g:{gx}.
    wait_channels(&c.nodes[2], 2);
    // n1 learnt that u1 joined gx (u:{u1} and g:{gx}).
    wait_channels(&c.nodes[0], 2);
    let heard_before: u64 = c.nodes[2].metric("imshard_channel_messages_total");
    let r = c1.request(Body::Send(pb::SendMessageRequest {
        conv_type: ConvType::Group as i32,
        target: "gx".into(),
        client_msg_id: "g1".into(),
        content: "to everyone".into(),
        ..Default::default()
    }));
    assert_eq!(r.code, 0, "{}", r.message);
    assert_eq!(c2.next_push().expect("u2 on n2").content, "to everyone");
    assert_eq!(c3.next_push().expect("u3 on n3").content, "to everyone");
    assert!(c.nodes[2].metric("imshard_channel_messages_total") > heard_before);
    // A member added later, connected to n3, hears of it and of what follows.
    let mut c4 = c.nodes[2].connect("gm_four", "d");
    let n3_channels = c.nodes[2].metric("imshard_channels");
    wait_channels(&c.nodes[2], n3_channels.max(3));
    let added = c2.request(Body::UpdateMembers(pb::UpdateGroupMembersRequest {
        group_id: "gx".into(),
        add: vec!["gm_four".into()],
        ..Default::default()
    }));
    assert_eq!(added.code, 0, "{}", added.message);
    let notice = c4.next_push().expect("the new member gets the change");
    assert!(notice.msg_type >= 100, "a system message: {notice:?}");
    // n3 already held g:{gx} for u3, so no new channel: wait for the group message.
    let r = c3.request(Body::Send(pb::SendMessageRequest {
        conv_type: ConvType::Group as i32,
        target: "gx".into(),
        client_msg_id: "g2".into(),
        content: "welcome".into(),
        ..Default::default()
    }));
    assert_eq!(r.code, 0, "{}", r.message);
    assert_eq!(c4.next_push().expect("u4 on n3").content, "welcome");
    // (u1 sent "to everyone" itself: its device gets no push of it.)
    assert_eq!(c1.next_push().expect("u1 on n1").msg_type, notice.msg_type);
    assert_eq!(c1.next_push().expect("u1 on n1").content, "welcome");
    // A group whose members are all on n1 and n2: n3 receives nothing for it.
    let mut c1b = c.nodes[0].connect("solo_a", "d");
    let mut c2b = c.nodes[1].connect("solo_b", "d");
    let n2_channels = c.nodes[1].metric("imshard_channels");
    wait_channels(&c.nodes[0], 3);
    wait_channels(&c.nodes[1], n2_channels.max(1));
    let r = c1b.request(Body::CreateGroup(pb::CreateGroupRequest {
        group_id: "gy".into(),
        name: "two nodes".into(),
        members: vec!["solo_b".into()],
    }));
    assert_eq!(r.code, 0, "{}", r.message);
    assert!(c2b.next_push().is_some());
    // solo_b's node learnt of the new group.
    wait_channels(&c.nodes[1], n2_channels + 1);
    let n3_before = c.nodes[2].metric("imshard_channel_messages_total");
    for i in 0..20 {
        let r = c1b.request(Body::Send(pb::SendMessageRequest {
            conv_type: ConvType::Group as i32,
            target: "gy".into(),
            client_msg_id: format!("y{i}"),
            content: format!("m{i}"),
            ..Default::default()
        }));
        assert_eq!(r.code, 0, "{}", r.message);
        assert_eq!(
            c2b.next_push().expect("solo_b gets it").content,
            format!("m{i}")
        );
    }
    assert_eq!(
        c.nodes[2].metric("imshard_channel_messages_total"),
        n3_before,
        "a node with no member of the group receives nothing for it"
    );
    drop(c1b);
}

/// Senders on three nodes at once: the group's owner stores several messages in a
/// loop turn, and their row updates leave for each member's owner node batched per
/// turn. Every member's row, on whichever node owns it, must end up with what those
/// messages change: a sender has read up to its own last message, an offline reader
/// has everything unread.
#[test]
fn concurrent_group_sends_update_every_members_rows_on_its_owner_node() {
    const PER_SENDER: i64 = 25;
    let Some(c) = Cluster::start() else { return };
    let senders: Vec<String> = (0..3)
        .map(|n| user_owned_by(&c, n, &format!("rs{n}_")))
        .collect();
    let readers: Vec<String> = (0..3)
        .map(|n| user_owned_by(&c, n, &format!("rr{n}_")))
        .collect();
    let mut owner = c.nodes[0].connect(&senders[0], "d");
    let mut members: Vec<String> = senders[1..].to_vec();
    members.extend(readers.iter().cloned());
    let created = owner.request(Body::CreateGroup(pb::CreateGroupRequest {
        group_id: "rowsgrp".into(),
        name: "rows".into(),
        members,
    }));
    assert_eq!(created.code, 0, "{}", created.message);
    drop(owner);
    let workers: Vec<_> = senders
        .iter()
        .enumerate()
        .map(|(i, user)| {
            // Each sender on a node that does not own its rows.
            let node = &c.nodes[(i + 1) % 3];
            let (addr, token, user) = (node.addr, node.token(user, "d"), user.clone());
            std::thread::spawn(move || {
                let mut client = Client::connect(addr, &token);
                let mut last = 0;
                for k in 0..PER_SENDER {
                    let r = client.request(Body::Send(pb::SendMessageRequest {
                        conv_type: ConvType::Group as i32,
                        target: "rowsgrp".into(),
                        client_msg_id: format!("{user}-{k}"),
                        content: format!("{k}"),
                        ..Default::default()
                    }));
                    assert_eq!(r.code, 0, "{user}: {}", r.message);
                    last = pb::SendMessageResponse::decode(&*r.body).expect("sent").seq;
                }
                (user, last)
            })
        })
        .collect();
    let lasts: Vec<(String, i64)> = workers
        .into_iter()
        .map(|w| w.join().expect("sender"))
        .collect();
    let max_seq = 1 + 3 * PER_SENDER;
    let row = |node: usize, user: &str| -> Option<pb::ConversationItem> {
        let mut cl = c.nodes[node].connect(user, "check");
        let list = cl.request(Body::GetConversations(
            pb::GetConversationsRequest::default(),
        ));
        assert_eq!(list.code, 0, "{}", list.message);
        pb::GetConversationsResponse::decode(&*list.body)
            .expect("list")
            .conversations
            .into_iter()
            .find(|i| i.conv_type == ConvType::Group as i32)
    };
    // Row updates travel asynchronously after the replies: allow them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, (user, last)) in lasts.iter().enumerate() {
        loop {
            let item = row((i + 2) % 3, user).expect("the sender's row");
            assert_eq!(item.max_seq, max_seq);
            if item.read_seq == *last {
                assert_eq!(i64::from(item.unread_count), max_seq - last);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{user}: read_seq {} != its last message {last}",
                item.read_seq
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for (i, user) in readers.iter().enumerate() {
        let item = row((i + 1) % 3, user).expect("the reader's row");
        assert_eq!(item.max_seq, max_seq);
        assert_eq!(item.read_seq, 0);
        assert_eq!(i64::from(item.unread_count), max_seq);
    }
}

#[test]
fn kick_broadcast_and_presence_across_nodes() {
    let Some(c) = Cluster::start() else { return };
    let mut k = c.nodes[2].connect("kicked_user", "phone");
    let mut others: Vec<Client> = (0..3)
        .map(|i| c.nodes[i].connect(&format!("listener{i}"), "d"))
        .collect();
    wait_channels(&c.nodes[2], 2);
    let admin = c.nodes[0].admin_token();
    // Presence on n1 sees the device on n3.
    let (st, body) = c.nodes[0]
        .http(
            "GET",
            "/api/v1/admin/presence?uuids=kicked_user,nobody",
            Some(&admin),
            "",
        )
        .expect("presence");
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        v["data"]["online"]["kicked_user"],
        serde_json::json!(["phone"]),
        "{body}"
    );
    assert_eq!(
        v["data"]["online"]["nobody"],
        serde_json::json!([]),
        "{body}"
    );
    // Broadcast on n2 reaches everyone on every node, once.
    let (st, body) = c.nodes[1]
        .http(
            "POST",
            "/api/v1/admin/broadcast",
            Some(&admin),
            r#"{"message": {"type": "SYSTEM_NOTICE", "data": "aGk="}}"#,
        )
        .expect("broadcast");
    assert_eq!(st, 200, "{body}");
    for o in others.iter_mut() {
        let env = o.next_of("SYSTEM_NOTICE").expect("the broadcast arrives");
        assert_eq!(&env.data[..], b"hi");
        o.set_timeout(Duration::from_millis(500));
        assert!(o.next_of("SYSTEM_NOTICE").is_none(), "only once");
        o.set_timeout(Duration::from_secs(10));
    }
    // Kick on n1 with a reason; the device is on n3.
    let (st, body) = c.nodes[0]
        .http(
            "POST",
            "/api/v1/admin/kick",
            Some(&admin),
            r#"{"user_uuid": "kicked_user", "device_id": "ALL", "reason": "banned"}"#,
        )
        .expect("kick");
    assert_eq!(st, 200, "{body}");
    let env = k.next_of("KICKOUT").expect("kicked across nodes");
    let notice = pb::KickoutNotice::decode(&*env.data).expect("notice");
    assert_eq!(notice.reason, "banned");
    // Any publisher may kick: a KickEvent published straight on the channel.
    let mut kk = c.nodes[1].connect("kicked_two", "tab");
    wait_channels(&c.nodes[1], 2);
    let ev = pb::KickEvent {
        user_uuid: "kicked_two".into(),
        device_id: "tab".into(),
        reason: String::new(),
    };
    c.redis.publish("connect:events:kick", &ev.encode_to_vec());
    let env = kk.next_of("KICKOUT").expect("kicked by a raw publish");
    assert_eq!(
        pb::KickoutNotice::decode(&*env.data).expect("n").reason,
        "admin"
    );
}

#[test]
fn a_node_killed_mid_load_loses_nothing_and_seqs_stay_contiguous() {
    let Some(mut c) = Cluster::start() else {
        return;
    };
    // A conversation owned by n3, users connected to n1 and n2.
    let live = ["n1", "n2", "n3"];
    let (alice, bob) = (0..10_000)
        .map(|i| (format!("ka{i}"), format!("kb{i}")))
        .find(|(a, b)| {
            c.owner(&live, &p2p(a, b)) == 2 && c.owner(&live, a) != 2 && c.owner(&live, b) != 2
        })
        .expect("a conversation owned by n3");
    let conv = p2p(&alice, &bob);
    let mut a = c.nodes[0].connect(&alice, "d");
    // bob is connected to the node that will die.
    let mut b = c.nodes[2].connect(&bob, "d");
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut next = 0;
    let send = |a: &mut Client, acked: &mut Vec<(String, i64)>, i: usize| -> bool {
        let cmid = format!("k{i}");
        match a.send_p2p(&bob, &cmid, &format!("m{i}")) {
            Ok(r) => {
                acked.push((r.msg_id, r.seq));
                true
            }
            Err(code) => {
                assert!(
                    code == 50301,
                    "only 50301 while the cluster changes, got {code}"
                );
                false
            }
        }
    };
    while next < 30 {
        assert!(send(&mut a, &mut acked, next));
        next += 1;
    }
    c.nodes[2].kill9();
    let nodes_left = c.nodes.remove(2);
    drop(nodes_left);
    // bob's connection ends with it; bob reconnects to another node.
    b.set_timeout(Duration::from_secs(5));
    while b.read_envelope().is_some() {}
    let mut b = c.nodes[1].connect(&bob, "d");
    // Keep sending (each message retried with its client_msg_id until stored) while the
    // dead node's lease runs out and its slots move.
    let deadline = Instant::now() + Duration::from_secs(30);
    while next < 60 {
        if send(&mut a, &mut acked, next) {
            next += 1;
        } else {
            assert!(
                Instant::now() < deadline,
                "sends did not recover after the node died"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    c.wait_formed(2);
    let page = a.pull(&conv, 0, 100, PullDirection::Forward).expect("pull");
    let seqs: Vec<i64> = page.messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=60).collect::<Vec<i64>>(),
        "contiguous, no loss, no duplicate"
    );
    for (msg_id, seq) in &acked {
        let m = &page.messages[(*seq - 1) as usize];
        assert_eq!(
            &m.msg_id, msg_id,
            "an acknowledged message is where it was acked"
        );
    }
    let contents: Vec<String> = page.messages.iter().map(|m| m.content.clone()).collect();
    assert_eq!(
        contents,
        (0..60).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    // bob, now on n2, reads the same history.
    let bobs = b
        .pull(&conv, 0, 100, PullDirection::Forward)
        .expect("bob pulls");
    assert_eq!(bobs.messages, page.messages);
    // The killed node rejoins.
    c.nodes.push(start_node(&c.redis, "n3"));
    c.wait_formed(3);
    let r = a
        .send_p2p(&bob, "after-rejoin", "back")
        .expect("send after the rejoin");
    assert_eq!(r.seq, 61);
}

#[test]
fn redis_restarted_writes_fail_fast_then_everything_recovers_with_a_resync() {
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let Some(mut c) = redis.and_then(|r| Cluster::start_on(r, 2)) else {
        return;
    };
    let mut a = c.nodes[0].connect("rr_alice", "d");
    let mut b = c.nodes[1].connect("rr_bob", "d");
    wait_channels(&c.nodes[0], 1);
    wait_channels(&c.nodes[1], 1);
    assert_eq!(a.send_p2p("rr_bob", "r1", "before").expect("send").seq, 1);
    assert!(b.next_push().is_some());
    c.redis.kill();
    // Redis is down: a send fails fast with 50301 (no hang past redis_timeout).
    let started = Instant::now();
    assert_eq!(a.send_p2p("rr_bob", "r2", "during"), Err(50301));
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    c.redis.restart();
    // Subscriptions come back and every connection is told to resync.
    let env = b.next_of("RESYNC").expect("bob is told to resync");
    let notice = pb::ResyncNotice::decode(&*env.data).expect("notice");
    assert_eq!(notice.reason, "subscription_restored");
    assert!(a.next_of("RESYNC").is_some(), "alice too");
    // Writes recover by themselves; the retried send is stored once, seqs contiguous.
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        match a.send_p2p("rr_bob", "r2", "during") {
            Ok(r) => break r,
            Err(50301) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(code) => panic!("send after Redis came back: {code}"),
        }
    };
    assert_eq!(r.seq, 2);
    let page = b
        .pull(&p2p("rr_alice", "rr_bob"), 0, 10, PullDirection::Forward)
        .expect("pull");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

#[test]
fn a_node_stopped_gracefully_leaves_and_the_others_carry_on() {
    let Some(mut c) = Cluster::start() else {
        return;
    };
    let mut a = c.nodes[0].connect("gl_alice", "d");
    assert!(a.send_p2p("gl_bob", "g1", "one").is_ok());
    c.nodes[1].signal(libc::SIGTERM);
    let status = c.nodes[1]
        .wait_exit(Duration::from_secs(20))
        .expect("the node exits");
    assert!(status.success(), "{status:?}");
    c.nodes.remove(1);
    // It gave its lease up: the others see two nodes (without waiting for the lease).
    c.wait_formed(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        match a.send_p2p("gl_bob", "g2", "two") {
            Ok(r) => break r,
            Err(50301) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(code) => panic!("{code}"),
        }
    };
    assert_eq!(r.seq, 2);
}

#[test]
fn events_of_a_conversation_reach_kafka_in_seq_order_and_offline_users_get_offline_pushes() {
    let Some(kafka) = common::tansu::Tansu::start(&["imshard.events", "imshard.offline"]) else {
        return;
    };
    let brokers = kafka.brokers();
    let redis = RedisServer::start();
    let Some(c) = redis.and_then(|r| Cluster::start_with(r, 3, &["--kafka-brokers", &brokers]))
    else {
        return;
    };
    let conv = p2p("kf_alice", "kf_bob");
    let mut a = c.nodes[0].connect("kf_alice", "d");
    // bob is offline for the first ten messages.
    for i in 1..=10 {
        let r = a
            .send_p2p("kf_bob", &format!("k{i}"), &format!("m{i}"))
            .expect("send");
        assert_eq!(r.seq, i);
    }
    let offline = common::tansu::consume(&brokers, "imshard.offline", 10);
    let mut seqs: Vec<i64> = offline
        .iter()
        .map(|g| match &g.event.body {
            Some(imshard::proto::events_pb::event::Body::OfflinePush(p)) => {
                assert_eq!(p.user, "kf_bob");
                assert_eq!(g.key, b"kf_bob");
                p.seq
            }
            other => panic!("not an offline push: {other:?}"),
        })
        .collect();
    seqs.sort();
    assert_eq!(seqs, (1..=10).collect::<Vec<i64>>());
    // bob comes online on n3, reads, and alice recalls the last message.
    let mut b = c.nodes[2].connect("kf_bob", "d");
    wait_channels(&c.nodes[2], 1);
    let r = a.send_p2p("kf_bob", "k11", "m11").expect("send");
    assert_eq!(b.next_push().expect("push").seq, r.seq);
    let mr = b.request(Body::MarkRead(pb::MarkReadRequest {
        conv_id: conv.clone(),
        read_seq: 11,
    }));
    assert_eq!(mr.code, 0, "{}", mr.message);
    let rc = a.request(Body::Recall(pb::RecallMessageRequest {
        conv_id: conv.clone(),
        msg_id: r.msg_id.clone(),
    }));
    assert_eq!(rc.code, 0, "{}", rc.message);
    // 11 stored, 1 read mark, 1 recall, in the conversation's order on one partition.
    let got = common::tansu::consume(&brokers, "imshard.events", 13);
    let mine: Vec<_> = got.iter().filter(|g| g.event.conv_id == conv).collect();
    assert_eq!(mine.len(), 13, "{got:?}");
    assert!(mine
        .iter()
        .all(|g| g.partition == mine[0].partition && g.key == conv.as_bytes()));
    let stored: Vec<i64> = mine
        .iter()
        .filter(|g| {
            matches!(
                g.event.body,
                Some(imshard::proto::events_pb::event::Body::Stored(_))
            )
        })
        .map(|g| g.event.seq)
        .collect();
    assert_eq!(stored, (1..=11).collect::<Vec<i64>>(), "in seq order");
    // The conversation's owner made the stored and recalled events: the recall comes
    // after every stored message. (The read mark comes from bob's owner node: it is
    // ordered with that user's other read marks, not with the owner's events.)
    let recall_at = mine
        .iter()
        .position(|g| {
            matches!(
                g.event.body,
                Some(imshard::proto::events_pb::event::Body::Recalled(_))
            )
        })
        .expect("the recall");
    let last_stored = mine
        .iter()
        .rposition(|g| {
            matches!(
                g.event.body,
                Some(imshard::proto::events_pb::event::Body::Stored(_))
            )
        })
        .expect("stored");
    assert!(recall_at > last_stored, "the recall after the messages");
    assert!(mine.iter().any(|g| matches!(
        &g.event.body,
        Some(imshard::proto::events_pb::event::Body::ReadMark(m)) if m.read_seq == 11 && m.user == "kf_bob"
    )));
    drop(b);
}

#[test]
fn under_concurrent_load_a_killed_node_loses_no_acknowledged_message() {
    const SENDERS: usize = 6;
    const PER_SENDER: usize = 150;
    let Some(mut c) = Cluster::start() else {
        return;
    };
    // Six conversations, two owned by each node; senders on n1 and n2.
    let addrs = [c.nodes[0].addr, c.nodes[1].addr];
    let tokens: Vec<(String, String, String)> = (0..SENDERS)
        .map(|i| {
            // Conversation i is owned by node i % 3 (two of them by the node killed).
            let live = ["n1", "n2", "n3"];
            let (from, to) = (0..10_000)
                .map(|j| (format!("load_s{i}_{j}"), format!("load_r{i}_{j}")))
                .find(|(f, t)| c.owner(&live, &p2p(f, t)) == i % 3)
                .expect("a conversation for that node");
            let token = c.nodes[0].token(&from, "d");
            (from, to, token)
        })
        .collect();
    let workers: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, (from, to, token))| {
            let addr = addrs[i % 2];
            std::thread::spawn(move || {
                let mut client = Client::connect(addr, &token);
                let mut acked: Vec<(String, i64)> = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut k = 0;
                while k < PER_SENDER {
                    match client.send_p2p(&to, &format!("{from}-{k}"), &format!("{k}")) {
                        Ok(r) => {
                            acked.push((r.msg_id, r.seq));
                            k += 1;
                        }
                        Err(50301) => {
                            assert!(Instant::now() < deadline, "sends did not recover");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(code) => panic!("{from}: send {k} answered {code}"),
                    }
                }
                (from, to, acked, client)
            })
        })
        .collect();
    // Kill n3 while the senders run.
    std::thread::sleep(Duration::from_millis(400));
    c.nodes[2].kill9();
    c.nodes.remove(2);
    for w in workers {
        let (from, to, acked, mut client) = w.join().expect("sender thread");
        let conv = p2p(&from, &to);
        let mut all = Vec::new();
        let mut anchor = 0;
        loop {
            let page = client
                .pull(&conv, anchor, 100, PullDirection::Forward)
                .expect("pull");
            anchor = page.messages.last().map_or(anchor, |m| m.seq);
            let more = page.has_more;
            all.extend(page.messages);
            if !more {
                break;
            }
        }
        let seqs: Vec<i64> = all.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=PER_SENDER as i64).collect::<Vec<_>>(),
            "{conv}: contiguous, one message per acknowledged send"
        );
        for (msg_id, seq) in &acked {
            assert_eq!(
                &all[(*seq - 1) as usize].msg_id,
                msg_id,
                "{conv}: acked and stored"
            );
        }
        let contents: Vec<String> = all.iter().map(|m| m.content.clone()).collect();
        assert_eq!(
            contents,
            (0..PER_SENDER).map(|k| k.to_string()).collect::<Vec<_>>(),
            "{conv}: each send stored once, in order"
        );
    }
}
