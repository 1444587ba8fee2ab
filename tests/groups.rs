//! Groups: create, membership, roles, fan-out and unread, against the real binary with
//! two shards, over WebSocket and HTTP.

mod common;

use std::time::Duration;

use common::{Client, Resp, Server};
use imshard::ids::group_conv_id;
use imshard::proto::pb::{self, client_frame::Body, ConvType, PullDirection};
use prost::Message as _;
use serde_json::Value;

fn ok<T: prost::Message + Default>(r: Resp) -> T {
    assert_eq!(r.code, 0, "{}", r.message);
    T::decode(&*r.body).expect("decode")
}

fn create(c: &mut Client, group_id: &str, members: &[&str]) -> Resp {
    c.request(Body::CreateGroup(pb::CreateGroupRequest {
        group_id: group_id.into(),
        name: format!("group {group_id}"),
        members: members.iter().map(|m| m.to_string()).collect(),
    }))
}

fn update(c: &mut Client, group_id: &str, add: &[&str], remove: &[&str], admins: &[&str]) -> Resp {
    let v = |l: &[&str]| l.iter().map(|m| m.to_string()).collect();
    c.request(Body::UpdateMembers(pb::UpdateGroupMembersRequest {
        group_id: group_id.into(),
        add: v(add),
        remove: v(remove),
        add_admins: v(admins),
    }))
}

fn send_group(
    c: &mut Client,
    group_id: &str,
    content: &str,
) -> Result<pb::SendMessageResponse, i32> {
    let r = c.request(Body::Send(pb::SendMessageRequest {
        conv_type: ConvType::Group as i32,
        target: group_id.into(),
        content: content.into(),
        ..Default::default()
    }));
    if r.code == 0 {
        Ok(pb::SendMessageResponse::decode(&*r.body).expect("decode"))
    } else {
        Err(r.code)
    }
}

/// The next push, skipping system messages (msg_type >= 100).
fn next_user_push(c: &mut Client) -> Option<pb::MsgItem> {
    loop {
        let m = c.next_push()?;
        if m.msg_type < 100 {
            return Some(m);
        }
    }
}

/// Nothing more of `kind` arrives within a short wait.
fn assert_quiet(c: &mut Client, kind: &str) {
    c.set_timeout(Duration::from_millis(300));
    assert!(c.next_of(kind).is_none(), "unexpected {kind}");
    c.set_timeout(Duration::from_secs(10));
}

fn recall(c: &mut Client, conv_id: &str, msg_id: &str) -> i32 {
    c.request(Body::Recall(pb::RecallMessageRequest {
        conv_id: conv_id.into(),
        msg_id: msg_id.into(),
    }))
    .code
}

#[test]
fn three_members_each_get_one_push_but_not_the_sending_device() {
    let server = Server::start(2, &[]);
    let mut a1 = server.connect("ga", "phone");
    let mut a2 = server.connect("ga", "laptop");
    let mut b = server.connect("gb", "phone");
    let mut c = server.connect("gc", "phone");
    let created: pb::CreateGroupResponse = ok(create(&mut a1, "g3", &["gb", "gc"]));
    assert_eq!(created.group_id, "g3");
    assert_eq!(created.conv_id, "grp-g3");
    // The creation is a system message everyone (but the creating device) sees.
    for cl in [&mut a2, &mut b, &mut c] {
        let m = cl.next_push().expect("created push");
        assert_eq!((m.seq, m.msg_type), (1, 100));
        let v: Value = serde_json::from_str(&m.content).expect("json");
        assert_eq!(v["event"], "group_created");
        assert_eq!(v["member_count"], 3);
    }
    let sent = send_group(&mut a1, "g3", "hello").expect("send");
    assert_eq!(sent.seq, 2);
    for cl in [&mut a2, &mut b, &mut c] {
        let m = next_user_push(cl).expect("push");
        assert_eq!(
            (m.seq, m.content.as_str(), m.from_uuid.as_str()),
            (2, "hello", "ga")
        );
        assert_eq!(m.conv_id, "grp-g3");
    }
    for cl in [&mut a1, &mut a2, &mut b, &mut c] {
        assert_quiet(cl, "MSG_PUSH");
    }
}

#[test]
fn offline_member_finds_unread_on_connect_and_rows_list_the_group() {
    let server = Server::start(2, &[]);
    let mut a = server.connect("oa", "d");
    ok::<pb::CreateGroupResponse>(create(&mut a, "off", &["ob", "oc"]));
    for i in 0..3 {
        send_group(&mut a, "off", &format!("m{i}")).expect("send");
    }
    let mut c = server.connect("oc", "d");
    let unread: pb::GetUnreadResponse =
        ok(c.request(Body::GetUnread(pb::GetUnreadRequest { per_conv_limit: 10 })));
    assert_eq!(unread.conversations.len(), 1);
    let conv = &unread.conversations[0];
    let item = conv.conversation.as_ref().expect("item");
    assert_eq!(item.conv_id, "grp-off");
    assert_eq!(item.conv_type, ConvType::Group as i32);
    assert_eq!(item.target_uuid, "off");
    // The creation message and the three sends.
    assert_eq!(item.unread_count, 4);
    assert_eq!(unread.total_unread, 4);
    let user_msgs: Vec<_> = conv
        .messages
        .iter()
        .filter(|m| m.msg_type < 100)
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(user_msgs, ["m0", "m1", "m2"]);
    // MarkRead works for groups as for 1:1.
    let r: pb::MarkReadResponse = ok(c.request(Body::MarkRead(pb::MarkReadRequest {
        conv_id: "grp-off".into(),
        read_seq: 3,
    })));
    assert_eq!(r.unread_count, 1);
    // The sender has read everything it sent.
    let list: pb::GetConversationsResponse = ok(a.request(Body::GetConversations(
        pb::GetConversationsRequest::default(),
    )));
    assert_eq!(list.conversations.len(), 1);
    assert_eq!(list.conversations[0].unread_count, 0);
    assert_eq!(list.conversations[0].max_seq, 4);
}

#[test]
fn a_message_in_one_group_never_reaches_another_groups_members() {
    let server = Server::start(2, &[]);
    let mut a = server.connect("ia", "d");
    let mut b = server.connect("ib", "d");
    let mut c = server.connect("ic", "d");
    ok::<pb::CreateGroupResponse>(create(&mut a, "iso1", &["ib"]));
    ok::<pb::CreateGroupResponse>(create(&mut a, "iso2", &["ic"]));
    assert_eq!(b.next_push().expect("created").conv_id, "grp-iso1");
    assert_eq!(c.next_push().expect("created").conv_id, "grp-iso2");
    send_group(&mut a, "iso1", "for group 1").expect("send");
    assert_eq!(next_user_push(&mut b).expect("push").content, "for group 1");
    assert_quiet(&mut c, "MSG_PUSH");
    send_group(&mut a, "iso2", "for group 2").expect("send");
    assert_eq!(next_user_push(&mut c).expect("push").content, "for group 2");
    assert_quiet(&mut b, "MSG_PUSH");
    // c cannot read group 1 either, nor touch its conversation row.
    assert_eq!(
        c.pull("grp-iso1", 0, 50, PullDirection::Forward).err(),
        Some(40301)
    );
    let r = c.request(Body::MarkRead(pb::MarkReadRequest {
        conv_id: "grp-iso1".into(),
        read_seq: 1,
    }));
    assert_eq!(r.code, 40301);
    let r = c.request(Body::DeleteConversation(pb::DeleteConversationRequest {
        conv_id: "grp-iso1".into(),
    }));
    assert_eq!(r.code, 40301);
    let r = c.request(Body::GetByIds(pb::GetMessagesByIdsRequest {
        conv_id: "grp-iso1".into(),
        msg_ids: vec![ulid::Ulid::new().to_string()],
    }));
    assert_eq!(r.code, 40301);
}

#[test]
fn membership_rules_non_members_removed_members_and_roles() {
    let server = Server::start(2, &[]);
    let mut owner = server.connect("mo", "d");
    let mut adm = server.connect("ma", "d");
    let mut mem = server.connect("mm", "d");
    let mut out = server.connect("mx", "d");
    ok::<pb::CreateGroupResponse>(create(&mut owner, "mg", &["ma", "mm"]));
    // Taken ids are refused.
    assert_eq!(create(&mut out, "mg", &[]).code, 40001);
    // Non-member: send, pull, change members.
    assert_eq!(send_group(&mut out, "mg", "hi").err(), Some(40301));
    assert_eq!(
        out.pull("grp-mg", 0, 50, PullDirection::Forward).err(),
        Some(40301)
    );
    assert_eq!(update(&mut out, "mg", &["mx"], &[], &[]).code, 40301);
    // Unknown group.
    assert_eq!(send_group(&mut out, "nosuch", "hi").err(), Some(40401));
    // Plain members may not add or name admins; only the owner names admins.
    assert_eq!(update(&mut mem, "mg", &["mx"], &[], &[]).code, 40301);
    assert_eq!(update(&mut mem, "mg", &[], &[], &["mm"]).code, 40301);
    let r: pb::UpdateGroupMembersResponse = ok(update(&mut owner, "mg", &[], &[], &["ma"]));
    assert_eq!(r.members, ["ma", "mm", "mo"]);
    // An admin adds someone; the new member gets a row and pushes.
    ok::<pb::UpdateGroupMembersResponse>(update(&mut adm, "mg", &["mx"], &[], &[]));
    let joined = out.next_push().expect("joined push");
    assert_eq!(joined.msg_type, 101);
    let v: Value = serde_json::from_str(&joined.content).expect("json");
    assert_eq!(v["added"][0], "mx");
    // Recall: a plain member may not recall someone else's message; an admin may.
    let m = send_group(&mut owner, "mg", "to recall").expect("send");
    let m2 = send_group(&mut mem, "mg", "mine").expect("send");
    assert_eq!(recall(&mut out, "grp-mg", &m.msg_id), 40301);
    assert_eq!(recall(&mut adm, "grp-mg", &m2.msg_id), 0);
    assert_eq!(recall(&mut mem, "grp-mg", &m.msg_id), 40301);
    let n = out.next_of("MSG_RECALL").expect("recall notice");
    let notice = pb::RecallNotice::decode(&*n.data).expect("decode");
    assert_eq!(notice.msg_id, m2.msg_id);
    // The admin removes mx: mx hears of it, then nothing more.
    assert_eq!(out.next_push().expect("push").content, "to recall");
    assert_eq!(out.next_push().expect("push").content, "mine");
    ok::<pb::UpdateGroupMembersResponse>(update(&mut adm, "mg", &[], &["mx"], &[]));
    let removed = out.next_push().expect("removed push");
    let v: Value = serde_json::from_str(&removed.content).expect("json");
    assert_eq!(v["removed"][0], "mx");
    send_group(&mut owner, "mg", "after removal").expect("send");
    assert_quiet(&mut out, "MSG_PUSH");
    assert_eq!(send_group(&mut out, "mg", "hi").err(), Some(40301));
    assert_eq!(
        out.pull("grp-mg", 0, 50, PullDirection::Backward).err(),
        Some(40301)
    );
    // mx's row stops at the removal: no unread from later messages.
    let list: pb::GetConversationsResponse = ok(out.request(Body::GetConversations(
        pb::GetConversationsRequest::default(),
    )));
    assert_eq!(list.conversations[0].max_seq, removed.seq);
    // A member may leave by itself; an admin may not remove the owner.
    assert_eq!(update(&mut adm, "mg", &[], &["mo"], &[]).code, 40301);
    let r: pb::UpdateGroupMembersResponse = ok(update(&mut mem, "mg", &[], &["mm"], &[]));
    assert_eq!(r.members, ["ma", "mo"]);
    // An admin may not remove another admin... but the owner may.
    let r: pb::UpdateGroupMembersResponse = ok(update(&mut owner, "mg", &[], &["ma"], &[]));
    assert_eq!(r.members, ["mo"]);
    // Bad input changes nothing.
    assert_eq!(update(&mut owner, "mg", &["bad-id"], &[], &[]).code, 40001);
    assert_eq!(update(&mut owner, "mg", &[], &[], &[]).code, 40001);
    assert_eq!(create(&mut owner, "bad-group", &[]).code, 40001);
}

#[test]
fn groups_over_http_match_websocket() {
    let server = Server::start(2, &[]);
    let token = server.token("ha", "web");
    let (status, text) = server
        .http(
            "POST",
            "/api/v1/auth/groups",
            Some(&token),
            r#"{"name":"http group","members":["hb","hc"]}"#,
        )
        .expect("http");
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let group_id = v["data"]["group_id"]
        .as_str()
        .expect("server-made id")
        .to_string();
    assert_eq!(v["data"]["conv_id"], group_conv_id(&group_id));
    let (status, text) = server
        .http(
            "POST",
            &format!("/api/v1/auth/groups/{group_id}/members"),
            Some(&token),
            r#"{"add":["hd"],"remove":["hc"]}"#,
        )
        .expect("http");
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["data"]["members"], serde_json::json!(["ha", "hb", "hd"]));
    // Someone else's group over HTTP: 403 with 40301, and malformed bodies 400.
    let other = server.token("hz", "web");
    let (status, text) = server
        .http(
            "POST",
            &format!("/api/v1/auth/groups/{group_id}/members"),
            Some(&other),
            r#"{"add":["hz"]}"#,
        )
        .expect("http");
    assert_eq!(status, 403, "{text}");
    let (status, _) = server
        .http(
            "POST",
            "/api/v1/auth/groups",
            Some(&token),
            r#"{"members":"hb"}"#,
        )
        .expect("http");
    assert_eq!(status, 400);
    // The WebSocket view of the same group.
    let mut hd = server.connect("hd", "d");
    let page = hd
        .pull(&group_conv_id(&group_id), 0, 50, PullDirection::Forward)
        .expect("pull");
    assert_eq!(page.messages.len(), 2);
    assert!(page.messages.iter().all(|m| m.msg_type >= 100));
}

#[test]
fn twenty_thousand_members_500_online_each_get_every_message_once_in_order() {
    let server = Server::start(2, &[]);
    let mut owner = server.connect("big_owner", "d");
    let members: Vec<String> = (0..20_000).map(|i| format!("bm{i}")).collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let r: pb::CreateGroupResponse = ok(create(&mut owner, "big", &refs));
    assert_eq!(r.conv_id, "grp-big");
    // 500 members online, spread over both shards (ids hash evenly).
    let mut online: Vec<Client> = members[..500]
        .iter()
        .map(|m| server.connect(m, "d"))
        .collect();
    let shards: std::collections::HashSet<usize> = members[..500]
        .iter()
        .map(|m| imshard::shard::shard_of_user(m, 2))
        .collect();
    assert_eq!(shards.len(), 2);
    // A 1:1 conversation on the same server keeps getting its pushes meanwhile.
    let (p, q) = common::users_on_shards(2, "side", false);
    let mut pc = server.connect(&p, "d");
    let mut qc = server.connect(&q, "d");
    for i in 0..20 {
        let sent = send_group(&mut owner, "big", &format!("big {i}")).expect("group send");
        assert_eq!(sent.seq, i + 2);
        pc.send_p2p(&q, &format!("side{i}"), &format!("side {i}"))
            .expect("p2p send");
    }
    for i in 0..20 {
        let m = qc.next_push().expect("1:1 push");
        assert_eq!(m.content, format!("side {i}"));
    }
    for c in online.iter_mut() {
        for i in 0..20 {
            // The creation's own push may still reach members who connected while its
            // fan-out was under way: skip system messages.
            let m = next_user_push(c).expect("group push");
            assert_eq!((m.seq, m.content.clone()), (i + 2, format!("big {i}")));
        }
    }
    for c in online.iter_mut().take(20) {
        assert_quiet(c, "MSG_PUSH");
    }
}

#[test]
fn groups_and_roles_survive_kill_9() {
    let mut server = Server::start(2, &[]);
    {
        let mut a = server.connect("ka", "d");
        ok::<pb::CreateGroupResponse>(create(&mut a, "kg", &["kb", "kc"]));
        ok::<pb::UpdateGroupMembersResponse>(update(&mut a, "kg", &[], &["kc"], &["kb"]));
        assert_eq!(send_group(&mut a, "kg", "before").expect("send").seq, 3);
    }
    server.kill9();
    server.restart();
    let mut a = server.connect("ka", "d");
    let mut b = server.connect("kb", "d");
    let mut c = server.connect("kc", "d");
    assert_eq!(send_group(&mut a, "kg", "after").expect("send").seq, 4);
    assert_eq!(next_user_push(&mut b).expect("push").content, "after");
    assert_eq!(send_group(&mut c, "kg", "hi").err(), Some(40301));
    // kb is still an admin: it may recall ka's message.
    let page = b
        .pull("grp-kg", 0, 50, PullDirection::Forward)
        .expect("pull");
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(recall(&mut b, "grp-kg", &page.messages[3].msg_id), 0);
    assert_eq!(create(&mut c, "kg", &[]).code, 40001);
}
