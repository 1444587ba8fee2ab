//! 1:1 messaging against the real binary: delivery across shards, seq order under
//! concurrency, dedupe, durability across kill -9.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{users_on_shards, Server};
use imshard::ids::p2p_conv_id;
use imshard::proto::pb::PullDirection;

#[test]
fn users_on_different_shards_exchange_messages_and_other_devices_get_pushes() {
    let server = Server::start(2, &[]);
    let (alice, bob) = users_on_shards(2, "xs", false);
    let mut a1 = server.connect(&alice, "phone");
    let mut a2 = server.connect(&alice, "laptop");
    let mut b1 = server.connect(&bob, "phone");

    let sent = a1
        .send_p2p(&bob, "m1", r#"{"text":"hi bob"}"#)
        .expect("send");
    assert_eq!(sent.seq, 1);
    assert_eq!(sent.conv_id, p2p_conv_id(&alice, &bob));
    assert_eq!(sent.msg_id.len(), 26, "msg_id is a ULID");

    let got = b1.next_push().expect("bob gets the push");
    assert_eq!(
        (got.seq, got.from_uuid.as_str(), got.content.as_str()),
        (1, alice.as_str(), r#"{"text":"hi bob"}"#)
    );
    assert_eq!(got.msg_id, sent.msg_id);
    let other = a2.next_push().expect("alice's other device gets the push");
    assert_eq!(other.msg_id, sent.msg_id);

    let reply = b1
        .send_p2p(&alice, "r1", r#"{"text":"hi alice"}"#)
        .expect("reply");
    assert_eq!(reply.seq, 2);
    assert_eq!(a1.next_push().expect("alice phone").seq, 2);
    assert_eq!(a2.next_push().expect("alice laptop").seq, 2);

    // The sending device never gets its own push.
    a1.set_timeout(Duration::from_millis(500));
    b1.set_timeout(Duration::from_millis(500));
    assert!(
        a1.next_push().is_none(),
        "sender device got its own message"
    );
    assert!(
        b1.next_push().is_none(),
        "bob's sending device got its own reply"
    );
}

#[test]
fn ten_clients_send_a_thousand_messages_into_one_conversation() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let (alice, bob) = users_on_shards(2, "conc", false);
    let devices: Vec<(String, String)> = (0..10)
        .map(|i| {
            (
                if i % 2 == 0 {
                    alice.clone()
                } else {
                    bob.clone()
                },
                format!("d{i}"),
            )
        })
        .collect();
    let mut clients: Vec<_> = devices.iter().map(|(u, d)| server.connect(u, d)).collect();
    let handles: Vec<_> = clients
        .drain(..)
        .zip(devices.clone())
        .map(|(mut c, (user, dev))| {
            let peer = if user == alice {
                bob.clone()
            } else {
                alice.clone()
            };
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for i in 0..100 {
                    let r = c
                        .send_p2p(&peer, &format!("{dev}-{i}").replace('-', "_"), "{}")
                        .expect("send");
                    seqs.push(r.seq);
                }
                (c, seqs)
            })
        })
        .collect();
    let mut all_seqs = Vec::new();
    let mut clients = Vec::new();
    for h in handles {
        let (c, seqs) = h.join().expect("sender thread");
        all_seqs.extend(seqs.iter().copied());
        clients.push((c, seqs));
    }
    all_seqs.sort_unstable();
    assert_eq!(
        all_seqs,
        (1..=1000).collect::<Vec<i64>>(),
        "seqs are exactly 1..1000"
    );

    for (c, own) in clients.iter_mut() {
        let own: HashSet<i64> = own.iter().copied().collect();
        let mut got = Vec::new();
        while got.len() < 900 {
            match c.next_push() {
                Some(m) => got.push(m.seq),
                None => break,
            }
        }
        assert_eq!(
            got.len(),
            900,
            "each device gets the 900 messages it did not send"
        );
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "pushes arrive in seq order, once each"
        );
        assert!(
            got.iter().all(|s| !own.contains(s)),
            "no device gets its own messages"
        );
    }
}

#[test]
fn same_client_msg_id_twice_stores_one_message() {
    let server = Server::start(2, &[]);
    let (alice, bob) = users_on_shards(2, "dd", false);
    let mut a = server.connect(&alice, "phone");
    let first = a
        .send_p2p(&bob, "same-id".replace('-', "_").as_str(), r#"{"n":1}"#)
        .expect("first");
    let again = a.send_p2p(&bob, "same_id", r#"{"n":2}"#).expect("again");
    assert_eq!(
        (again.msg_id.as_str(), again.seq),
        (first.msg_id.as_str(), first.seq)
    );
    let next = a.send_p2p(&bob, "other_id", "{}").expect("next");
    assert_eq!(next.seq, first.seq + 1, "a duplicate consumes no seq");
    let pulled = a
        .pull(&first.conv_id, 0, 50, PullDirection::Forward)
        .expect("pull");
    assert_eq!(pulled.messages.len(), 2);
    assert_eq!(
        pulled.messages[0].content, r#"{"n":1}"#,
        "the first content is kept"
    );
    assert_eq!(pulled.max_seq, 2);
}

#[test]
fn answered_sends_survive_kill_9() {
    let mut server = Server::start(2, &["--rate-limit", "0"]);
    let (alice, bob) = users_on_shards(2, "k9", false);
    let conv;
    let mut ids = Vec::new();
    {
        let mut a = server.connect(&alice, "phone");
        for i in 0..50 {
            let r = a
                .send_p2p(&bob, &format!("k{i}"), &format!(r#"{{"i":{i}}}"#))
                .expect("send");
            ids.push((r.seq, r.msg_id));
        }
        conv = p2p_conv_id(&alice, &bob);
        // Killed right after the last answer, with the socket still open.
        server.kill9();
    }
    server.restart();
    let mut b = server.connect(&bob, "tablet");
    let mut seen = Vec::new();
    let mut anchor = 0;
    loop {
        let page = b
            .pull(&conv, anchor, 20, PullDirection::Forward)
            .expect("pull");
        seen.extend(page.messages.iter().map(|m| (m.seq, m.msg_id.clone())));
        anchor = page.messages.last().map_or(anchor, |m| m.seq);
        if !page.has_more {
            assert_eq!(page.max_seq, 50);
            break;
        }
    }
    assert_eq!(
        seen, ids,
        "every answered message is back with its seq and msg_id"
    );
    let next = b
        .send_p2p(&alice, "after", "{}")
        .expect("send after restart");
    assert_eq!(next.seq, 51);
    // A resend of an acknowledged client_msg_id is still deduplicated after the restart.
    let mut a = server.connect(&alice, "phone");
    let again = a.send_p2p(&bob, "k7", "{}").expect("dedupe after restart");
    assert_eq!(
        (again.seq, again.msg_id.as_str()),
        (ids[7].0, ids[7].1.as_str())
    );
}

#[test]
fn pull_directions_limits_and_membership() {
    let server = Server::start(2, &["--rate-limit", "0"]);
    let (alice, bob) = users_on_shards(2, "pl", true);
    let mut a = server.connect(&alice, "phone");
    for i in 0..60 {
        a.send_p2p(&bob, &format!("p{i}"), "{}").expect("send");
    }
    let conv = p2p_conv_id(&alice, &bob);
    let fwd = a
        .pull(&conv, 40, 50, PullDirection::Forward)
        .expect("forward");
    assert_eq!(
        fwd.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (41..=60).collect::<Vec<_>>()
    );
    assert!(!fwd.has_more);
    let unspecified = a
        .pull(&conv, 0, 0, PullDirection::Unspecified)
        .expect("default limit");
    assert_eq!(unspecified.messages.len(), 50);
    assert!(unspecified.has_more);
    let back = a
        .pull(&conv, 0, 10, PullDirection::Backward)
        .expect("backward newest");
    assert_eq!(
        back.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (51..=60).collect::<Vec<_>>()
    );
    assert!(back.has_more);
    let back2 = a
        .pull(&conv, 51, 100, PullDirection::Backward)
        .expect("backward below 51");
    assert_eq!(back2.messages.first().map(|m| m.seq), Some(1));
    assert_eq!(back2.messages.len(), 50);
    assert!(!back2.has_more);
    // Someone else's conversation.
    let mut eve = server.connect("eve", "phone");
    assert_eq!(
        eve.pull(&conv, 0, 10, PullDirection::Forward).unwrap_err(),
        40301
    );
}

#[test]
fn frames_larger_than_one_read_arrive_whole() {
    // A 64 KiB content makes a frame larger than the server's 64 KiB read buffer, so it
    // takes several reads and the partial-frame path.
    let server = Server::start(2, &[]);
    let (alice, bob) = users_on_shards(2, "big", false);
    let mut a = server.connect(&alice, "d");
    let mut b = server.connect(&bob, "d");
    let content: String = (0..65536)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    for i in 0..3 {
        let r = a
            .send_p2p(&bob, &format!("big{i}"), &content)
            .expect("send");
        assert_eq!(r.seq, i + 1);
        let m = b.next_push().expect("push");
        assert_eq!(m.content, content);
    }
}
