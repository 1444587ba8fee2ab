//! Criterion benchmarks of imshard's hot paths, one group per layer:
//!
//! - `ws`: WebSocket frame encode (server -> client) and decode of a masked client frame
//!   (parse + unmask + assemble), through `proto::ws`.
//! - `proto`: protobuf encode/decode of a `MsgItem` and of a `ClientFrame` carrying a
//!   `SendMessageRequest`, and the whole `push_frame` (MsgItem -> envelope -> WS frame);
//!   `json_*`: the same for a connection of the `imshard.v1.json` subprotocol (the
//!   push frame converted to a JSON text frame, then the same push for the next JSON
//!   recipient on the shard, a JSON ClientFrame decoded).
//! - `ring`: `ShardMsg` throughput between two threads over the real `shard::ring` mesh.
//! - `seq_dedupe`: the in-memory work of a send on the conversation's shard.
//! - `fanout`: grouping a 1,000-member group's members by owner shard.
//! - `store`: one group commit of N messages on the embedded store, until durable.
//!
//! Run: `cargo bench --bench core -- --warm-up-time 1 --measurement-time 3`.
//! Results and the host they were measured on: `benches/README.md`.

use std::cell::Cell;
use std::collections::HashMap;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::task::Poll;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use prost::Message as _;

use imshard::chat::conv::split_by_shard;
use imshard::chat::fanout::{Delivery, Recipients};
use imshard::chat::Chat;
use imshard::proto::envelope::{decode_client_frame, peek_push_ack, push_frame};
use imshard::proto::pb::{
    self as pb, client_frame::Body, ClientFrame, ConvType, MsgItem, PushAck, SendMessageRequest,
};
use imshard::proto::store_pb::DedupeRecord;
use imshard::proto::{json, ws};
use imshard::rt::bell::Bell;
use imshard::shard::acks::AckTable;
use imshard::shard::msg::ShardMsg;

/// Where a send's answer goes (`shard::msg::ReplyTo`: a shard id and a call token).
type ReplyTo = (usize, u64);
use imshard::shard::{ring, yield_now};
use imshard::store::embedded::WriteSet;
use imshard::store::ShardStore;

/// The largest client message the server accepts in these benches (1 MiB).
const MAX_MESSAGE: usize = 1 << 20;

/// A 100-byte JSON text body, the size of a typical chat line.
fn content_100() -> String {
    let head = r#"{"text":""#;
    let tail = r#""}"#;
    let mut s = String::with_capacity(100);
    s.push_str(head);
    s.extend(std::iter::repeat_n('x', 100 - head.len() - tail.len()));
    s.push_str(tail);
    assert_eq!(s.len(), 100);
    s
}

/// A stored p2p message as the server builds it in `chat::conv::handle_send`.
fn msg_item(seq: i64) -> MsgItem {
    MsgItem {
        msg_id: ulid::Ulid::new().to_string(),
        client_msg_id: "c1b7f3a2-5d2e-4b8e-9f1a-0c3d4e5f6a7b".into(),
        conv_id: "p2p-alice_00042-bob_00117".into(),
        seq,
        from_uuid: "alice_00042".into(),
        msg_type: 1,
        content: content_100(),
        status: 0,
        send_time: 1_760_000_000_000 + seq,
        reply_to_msg_id: String::new(),
        at_users: Vec::new(),
    }
}

/// A client's send, as it arrives in a binary WebSocket message.
fn send_frame() -> ClientFrame {
    ClientFrame {
        req_id: 4711,
        body: Some(Body::Send(SendMessageRequest {
            conv_type: ConvType::P2p as i32,
            target: "bob_00117".into(),
            client_msg_id: "c1b7f3a2-5d2e-4b8e-9f1a-0c3d4e5f6a7b".into(),
            msg_type: 1,
            content: content_100(),
            reply_to_msg_id: String::new(),
            at_users: Vec::new(),
        })),
    }
}

/// A final, masked client frame (opcode 2) as a browser would send it.
fn masked_client_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let len = payload.len();
    let mut v = vec![0x82];
    if len < 126 {
        v.push(0x80 | len as u8);
    } else if len < 65536 {
        v.push(0x80 | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.push(0x80 | 127);
        v.extend_from_slice(&(len as u64).to_be_bytes());
    }
    v.extend_from_slice(&mask);
    let mut masked = payload.to_vec();
    ws::unmask(&mut masked, mask);
    v.extend_from_slice(&masked);
    v
}

fn bench_ws(c: &mut Criterion) {
    let mut g = c.benchmark_group("ws");
    for size in [64usize, 1024, 16 * 1024] {
        let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, p| {
            b.iter(|| ws::frame(ws::BINARY, black_box(p)))
        });
        let wire = masked_client_frame(&payload, [0x37, 0xfa, 0x21, 0x3d]);
        g.bench_with_input(BenchmarkId::new("decode", size), &wire, |b, wire| {
            let mut assembler = ws::Assembler::default();
            b.iter(|| {
                let (frame, used) = ws::parse_client_frame(black_box(wire), MAX_MESSAGE)
                    .expect("valid frame")
                    .expect("complete frame");
                let msg = assembler
                    .push(frame, MAX_MESSAGE)
                    .expect("valid message")
                    .expect("complete message");
                (msg, used)
            })
        });
        // What the connection does with a whole frame: unmask it where it lies. The
        // buffer is re-masked by unmasking again (XOR), so each iteration reads the
        // same bytes.
        g.bench_with_input(
            BenchmarkId::new("decode_in_place", size),
            &wire,
            |b, wire| {
                let mut buf = wire.clone();
                b.iter(|| {
                    let (frame, used) = ws::unmask_client_frame(black_box(&mut buf), MAX_MESSAGE)
                        .expect("valid frame")
                        .expect("complete frame");
                    let sum = black_box(&buf[frame.payload.clone()])[0];
                    ws::unmask(&mut buf[frame.payload.clone()], [0x37, 0xfa, 0x21, 0x3d]);
                    (sum, used)
                })
            },
        );
    }
    g.finish();
}

fn bench_proto(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto");
    let item = msg_item(1234);
    let item_bytes = item.encode_to_vec();
    g.throughput(Throughput::Elements(1));
    g.bench_function("msg_item_encode", |b| {
        b.iter(|| black_box(&item).encode_to_vec())
    });
    g.bench_function("msg_item_decode", |b| {
        b.iter(|| MsgItem::decode(black_box(item_bytes.as_slice())).expect("valid MsgItem"))
    });
    let frame = send_frame();
    let frame_bytes = frame.encode_to_vec();
    g.bench_function("client_frame_send_encode", |b| {
        b.iter(|| black_box(&frame).encode_to_vec())
    });
    g.bench_function("client_frame_send_decode", |b| {
        b.iter(|| decode_client_frame(black_box(frame_bytes.as_slice())).expect("valid frame"))
    });
    g.bench_function("push_frame", |b| b.iter(|| push_frame(black_box(&item))));
    let pushed = push_frame(&item);
    g.bench_function("json_push_convert", |b| {
        b.iter(|| json::convert(black_box(&pushed), None).expect("converts"))
    });
    g.bench_function("json_push_text_frame_next_recipient", |b| {
        b.iter(|| json::text_frame(black_box(&pushed), None).expect("converts"))
    });
    let frame_json = serde_json::json!({"req_id": 1, "send": {
        "conv_type": "CONV_TYPE_P2P", "target": "bob_00117",
        "client_msg_id": "c1b7f3a2-5d2e-4b8e-9f1a-0c3d4e5f6a7b", "content": content_100()}})
    .to_string();
    g.bench_function("json_client_frame_send_decode", |b| {
        b.iter(|| json::decode_client_frame(black_box(frame_json.as_bytes())).expect("valid"))
    });
    // A cumulative PushAck of a group conversation, as a client batches them.
    let ack_bytes = ClientFrame {
        req_id: 0,
        body: Some(Body::PushAck(PushAck {
            conv_id: "grp-lgmiq0k2xg17".into(),
            seq: 123_456,
        })),
    }
    .encode_to_vec();
    g.bench_function("push_ack_full_decode", |b| {
        b.iter(|| decode_client_frame(black_box(ack_bytes.as_slice())).expect("valid frame"))
    });
    g.bench_function("push_ack_peek", |b| {
        b.iter(|| peek_push_ack(black_box(ack_bytes.as_slice())).expect("an ack"))
    });
    // Peek, check the conv_id and move the connection's acked seq (the conversation
    // is in a table of 10,000 connections with 4 conversations each), as
    // `shard::conn` handles an ack.
    let mut table = AckTable::default();
    for conn in 0..10_000u64 {
        for c in 0..4 {
            table.ack(conn, &format!("grp-lgmiq0k2xg{c}"), 1);
        }
        table.ack(conn, "grp-lgmiq0k2xg17", 1);
    }
    let mut seq = 1;
    g.bench_function("push_ack_handle", |b| {
        b.iter(|| {
            let ack = peek_push_ack(black_box(ack_bytes.as_slice())).expect("an ack");
            seq += 1;
            if imshard::ids::is_valid_conv_id(ack.conv_id) {
                table.ack(black_box(4_321), ack.conv_id, seq);
            }
        })
    });
    g.finish();
}

/// Sends `count` messages from shard 0 to shard 1 of a real two-shard mesh
/// (`shard::ring::mesh`, `Endpoint::send` and `Endpoint::consume`), each end on its own
/// thread with its own io_uring runtime, as in the server. Returns the time from the
/// first send to the consumer handling the last message.
///
/// The producer keeps at most `ring::RING_CAPACITY` messages in flight (the consumer
/// publishes how many it has handled), so every send goes straight into the ring and
/// the outbox is never used: the number is about the ring itself. Each end runs its
/// shard's bell listener, as the server does (wake-ups of a parked consumer go
/// through it).
///
/// With `overflow` the producer sends everything at once: past `RING_CAPACITY` the
/// messages wait in the outbox and the flusher moves them as the consumer frees space
/// (woken through the shard bells), which is what a burst to a busy shard costs.
fn ring_run<M: Send + 'static>(
    count: u64,
    make: Arc<dyn Fn(u64) -> M + Send + Sync>,
    overflow: bool,
) -> Duration {
    let mut parts = ring::mesh(2).expect("eventfds");
    let consumer_parts = parts.pop().expect("two endpoints");
    let producer_parts = parts.pop().expect("two endpoints");
    let ready = Arc::new(Barrier::new(2));
    let consumer_ready = ready.clone();
    let handled = Arc::new(AtomicU64::new(0));
    let producer_handled = handled.clone();
    let consumer = std::thread::spawn(move || {
        let mut rt = uring_runtime();
        rt.block_on(async move {
            let bell = consumer_parts.bell();
            let ep = Rc::new(consumer_parts.into_endpoint());
            listen(&ep, bell);
            let seen = Rc::new(Cell::new(0u64));
            let counter = seen.clone();
            let consume = ep.consume(move |msg| {
                black_box(msg);
                let n = counter.get() + 1;
                counter.set(n);
                handled.store(n, Ordering::Release);
            });
            // `consume` never returns; it yields after each drained batch, which
            // lets this branch notice the last message.
            let all_seen = std::future::poll_fn(|_| {
                if seen.get() >= count {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            });
            consumer_ready.wait();
            monoio::select! {
                _ = consume => {}
                _ = all_seen => {}
            }
            Instant::now()
        })
    });
    let producer = std::thread::spawn(move || {
        let mut rt = uring_runtime();
        rt.block_on(async move {
            let bell = producer_parts.bell();
            let ep = Rc::new(producer_parts.into_endpoint());
            listen(&ep, bell);
            let capacity = ring::RING_CAPACITY as u64;
            let mut known_handled = 0u64;
            ready.wait();
            let start = Instant::now();
            for i in 0..count {
                while !overflow && i - known_handled >= capacity {
                    known_handled = producer_handled.load(Ordering::Acquire);
                    if i - known_handled >= capacity {
                        yield_now().await;
                    }
                }
                ep.send(1, make(i));
            }
            if overflow {
                // Keep this runtime (and its outbox flusher) running until all arrived.
                while producer_handled.load(Ordering::Acquire) < count {
                    yield_now().await;
                }
            } else {
                assert_eq!(ep.backlog(), 0, "every send went straight into the ring");
            }
            start
        })
    });
    let start = producer.join().expect("producer thread");
    let end = consumer.join().expect("consumer thread");
    end - start
}

/// Runs a shard's bell listener on this thread, as the server does.
fn listen<M: 'static>(ep: &Rc<ring::Endpoint<M>>, bell: Arc<Bell>) {
    let ep = ep.clone();
    monoio::spawn(async move {
        bell.listen(|| ep.wake_local()).await;
    });
}

fn uring_runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .expect("io_uring runtime (Linux 5.6+ with io_uring enabled)")
}

fn bench_ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    // A call's reply: the most frequent message, a send's typed answer, boxed.
    type Msg = ShardMsg<Chat>;
    let reply: Arc<dyn Fn(u64) -> Msg + Send + Sync> = Arc::new(move |i| ShardMsg::Reply {
        token: i,
        value: Box::new(Ok::<_, imshard::codes::ApiError>(pb::SendMessageResponse {
            msg_id: "01JBQ7Z8Y3K2M4N5P6Q7R8S9T0".into(),
            conv_id: "p2p-alice_00042-bob_00117".into(),
            seq: i as i64,
            send_time: 1_760_000_000_000,
        })),
    });
    g.bench_function("reply", |b| {
        b.iter_custom(|iters| ring_run(iters, reply.clone(), false))
    });
    // A delivery of a pushed message to one user of the target shard: the frame is
    // shared (a refcount), the rest is allocated per message as in `conv::deliver_chunk`.
    let frame = push_frame(&msg_item(7));
    let deliver: Arc<dyn Fn(u64) -> Msg + Send + Sync> = Arc::new(move |i| {
        let d = Delivery {
            frame: frame.clone(),
            conv_id: "p2p-alice_00042-bob_00117".into(),
            seq: i as i64,
            send_time: 1_760_000_000_000,
            users: vec![std::sync::Arc::<str>::from("bob_00117")].into(),
            except_user: "alice_00042".into(),
            except_device: "phone".into(),
            left: Vec::new(),
            push: true,
        };
        // As `chat::conv::deliver` posts it: a job that runs `user::deliver` there.
        let job: imshard::shard::msg::Job<Chat> =
            Box::new(move |shard| imshard::chat::user::deliver(shard, &d));
        ShardMsg::Run(job)
    });
    g.bench_function("deliver", |b| {
        b.iter_custom(|iters| ring_run(iters, deliver.clone(), false))
    });
    // A burst of 4x the ring capacity sent at once, through the outbox.
    g.bench_function("reply_overflow_burst", |b| {
        b.iter_custom(|iters| {
            let burst = 4 * ring::RING_CAPACITY as u64;
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(burst).max(1);
                // Bursts shorter than the ring do not overflow; pad them to a full burst
                // and scale the time back.
                let t = ring_run(burst, reply.clone(), true);
                total += t.mul_f64(n as f64 / burst as f64);
                left -= n;
            }
            total
        })
    });
    g.finish();
}

/// The per-conversation state that a send touches on the conversation's shard: the
/// same fields and types as `chat::conv::ConvState` (whose fields are private to that
/// module).
struct ConvSeq {
    next_seq: i64,
    in_flight: HashMap<(String, String), Vec<ReplyTo>>,
}

/// The dedupe key of a send: (sender, client_msg_id).
type DedupeKey = (String, String);

/// A new send's seq and the members it goes to.
type Assigned = (i64, Rc<Vec<String>>);

/// The in-memory steps of `chat::conv::handle_send` for a p2p send with a
/// client_msg_id, in the same order, with the same maps and the same clones: build the
/// dedupe key, look the conversation up and check the in-flight sends, look it up
/// again to take the members (an `Rc` of the two parties), the next seq, and mark the
/// key in flight. (The store's dedupe lookup between the two lookups is a disk read
/// and is left out.) Returns the seq and members, or `None` for a resend that now
/// waits for the first; and the key, which the durable-write task keeps.
fn assign_seq(
    convs: &mut HashMap<String, ConvSeq>,
    conv_id: &str,
    sender: &str,
    client_msg_id: &str,
    parties: &[String],
    reply: ReplyTo,
) -> (Option<Assigned>, DedupeKey) {
    let dedupe_key = (sender.to_string(), client_msg_id.to_string());
    let conv = convs.get_mut(conv_id).expect("conversation is loaded");
    if let Some(waiters) = conv.in_flight.get_mut(&dedupe_key) {
        waiters.push(reply);
        return (None, dedupe_key);
    }
    let conv = convs.get_mut(conv_id).expect("conversation is loaded");
    let members = Rc::new(parties.to_vec());
    let seq = conv.next_seq;
    conv.next_seq += 1;
    conv.in_flight.insert(dedupe_key.clone(), Vec::new());
    (Some((seq, members)), dedupe_key)
}

/// What the durable-write task then does with the dedupe window: take the waiters.
fn settle(convs: &mut HashMap<String, ConvSeq>, conv_id: &str, key: &DedupeKey) {
    let waiters = convs
        .get_mut(conv_id)
        .and_then(|c| c.in_flight.remove(key))
        .unwrap_or_default();
    black_box(waiters);
}

fn bench_seq_dedupe(c: &mut Criterion) {
    let mut g = c.benchmark_group("seq_dedupe");
    g.throughput(Throughput::Elements(1));
    // 10,000 loaded conversations, each with 8 sends in flight.
    let conv_ids: Vec<String> = (0..10_000)
        .map(|i| format!("p2p-user_{i:06}-user_{:06}", i + 1))
        .collect();
    let mut convs: HashMap<String, ConvSeq> = conv_ids
        .iter()
        .map(|id| {
            let in_flight = (0..8)
                .map(|k| (("user_x".to_string(), format!("cmid-{k}")), Vec::new()))
                .collect();
            (
                id.clone(),
                ConvSeq {
                    next_seq: 1,
                    in_flight,
                },
            )
        })
        .collect();
    let reply: ReplyTo = (1, 9);
    let parties = vec!["user_a".to_string(), "user_b".to_string()];
    let cmids: Vec<String> = (0..1024)
        .map(|i| format!("c1b7f3a2-5d2e-4b8e-9f1a-{i:012}"))
        .collect();
    let mut i = 0usize;
    // A first send: assign a seq, mark it in flight, then settle it once durable.
    g.bench_function("new_send", |b| {
        b.iter(|| {
            i += 1;
            let conv = &conv_ids[i % conv_ids.len()];
            let cmid = &cmids[i % cmids.len()];
            let (seq, key) = assign_seq(&mut convs, conv, "user_a", cmid, &parties, reply);
            settle(&mut convs, conv, &key);
            seq
        })
    });
    // A resend while the first is in flight: it joins the waiters (emptied again
    // after each round so the list does not grow; that costs one more lookup).
    g.bench_function("resend_in_flight", |b| {
        b.iter(|| {
            i += 1;
            let conv = &conv_ids[i % conv_ids.len()];
            let (seq, key) = assign_seq(&mut convs, conv, "user_x", "cmid-3", &parties, reply);
            if let Some(w) = convs
                .get_mut(conv.as_str())
                .and_then(|c| c.in_flight.get_mut(&key))
            {
                w.clear();
            }
            seq
        })
    });
    g.finish();
}

/// Fan-out to a 1,000-member group. `split` is `chat::conv::split_by_shard`, the
/// grouping of members by owner shard that a group now does once per membership change;
/// `per_message` is what every message then costs on the conversation's shard: one
/// `Deliver` per target shard carrying a shared slice of that shard's list (built here
/// as `chat::conv` builds it, without posting it to a live shard).
fn bench_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    let members: Vec<std::sync::Arc<str>> = (0..1000)
        .map(|i| std::sync::Arc::from(format!("user_{i:06}")))
        .collect();
    g.throughput(Throughput::Elements(members.len() as u64));
    let frame = push_frame(&msg_item(7));
    for shards in [2usize, 8] {
        g.bench_with_input(
            BenchmarkId::new("split_1000_members", shards),
            &shards,
            |b, &n| b.iter(|| split_by_shard(n, black_box(&members).iter().cloned())),
        );
        let by_shard = split_by_shard(shards, members.iter().cloned());
        g.bench_with_input(
            BenchmarkId::new("per_message_1000_members", shards),
            &shards,
            |b, _| {
                b.iter(|| {
                    let deliveries: Vec<Box<Delivery>> = by_shard
                        .iter()
                        .filter(|l| !l.is_empty())
                        .map(|l| {
                            Box::new(Delivery {
                                frame: frame.clone(),
                                conv_id: "grp-g1".into(),
                                seq: 1,
                                send_time: 1_760_000_000_000,
                                users: Recipients::all(l.clone()),
                                except_user: "user_000000".into(),
                                except_device: "phone".into(),
                                left: Vec::new(),
                                push: true,
                            })
                        })
                        .collect();
                    black_box(deliveries)
                })
            },
        );
    }
    g.finish();
}

fn bench_store(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    g.sample_size(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rt = uring_runtime();
    // The store's completion task stays in this runtime between block_on calls.
    // So are the store's completion task and the bell listener that wakes it.
    let store = rt.block_on(async {
        let bell = Arc::new(Bell::new().expect("eventfd"));
        let store = ShardStore::open(dir.path(), 0, bell.clone()).expect("open store");
        let s = store.clone();
        monoio::spawn(async move {
            bell.listen(|| s.wake_local()).await;
        });
        store
    });
    let mut seq = 0i64;
    for n in [1usize, 64, 512] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("commit_durable", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    (0..n)
                        .map(|_| {
                            seq += 1;
                            msg_item(seq)
                        })
                        .collect::<Vec<_>>()
                },
                |msgs| {
                    rt.block_on(async {
                        // Staged in one loop turn, so they form one batch and one fsync;
                        // each is encoded as `handle_send` does (message, id index, dedupe;
                        // the msg_id stands in for a client_msg_id, so keys never repeat).
                        let pending: Vec<_> = msgs
                            .iter()
                            .map(|m| {
                                let mut w = WriteSet::new();
                                w.message(m).dedupe(
                                    &m.conv_id,
                                    &m.from_uuid,
                                    &m.msg_id,
                                    &DedupeRecord {
                                        msg_id: m.msg_id.clone(),
                                        seq: m.seq,
                                        send_time: m.send_time,
                                    },
                                );
                                store.stage(w)
                            })
                            .collect();
                        for rx in pending {
                            rx.await.expect("store open").expect("durable");
                        }
                    })
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_ws,
    bench_proto,
    bench_ring,
    bench_seq_dedupe,
    bench_fanout,
    bench_store
);
criterion_main!(benches);
