//! A full stream pushes back and deletes nothing: with `PCB_IMAGES` capped, the ingester
//! leaves the boards that do not fit in the inbox (deferred `stream-full`); with
//! `PCB_SHARDS` capped, the router holds the records it cannot store, longer than its
//! `max_deliver` retries would last, without a dead letter; once the admin step raises the
//! limits every board drains through, once. Lowering a limit below what a stream holds is
//! refused.

use std::collections::BTreeSet;
use std::time::Duration;

use pcb_common::topology::TopologyError;
use pcb_schemas::{STREAM_IMAGES, STREAM_REJECTED, STREAM_SHARDS};
use pcb_tests::Env;

/// The default topology with `max_msgs` on images and shards.
fn limits(images: i64, shards: i64) -> pcb_common::Topology {
    let mut t = pcb_common::Topology::default();
    t.images.max_msgs = images;
    t.shards.max_msgs = shards;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_holds_back_its_writers_and_everything_drains_once_it_has_room() {
    let env = Env::start().await;
    let boards = env.dir.path().join("boards");
    pcb_tests::synth_sized(&boards, 12, 21, 64, 0.0);

    // PCB_IMAGES takes 8 messages. The ingester stops taking boards at 85% (the rest is
    // the encoder's); boards already on their way when it got there may take it to 8.
    pcb_common::apply_streams(&env.js, &limits(8, 3))
        .await
        .expect("limits applied");
    let first = env.import(&boards).await;
    let held = first.deferred.get("stream-full").copied().unwrap_or(0);
    assert!((7..=8).contains(&first.published), "{first}");
    assert_eq!(first.published + held, 12, "{first}");
    assert_eq!(first.rejected_total(), 0, "{first}");
    assert!(env.count(STREAM_IMAGES, "pcb.images.").await <= 8);

    // Room for the encoded records: the encoder and router run; PCB_SHARDS takes 3.
    pcb_common::apply_streams(&env.js, &limits(-1, 3))
        .await
        .expect("images raised");
    let (shutdown, handles) = env.start_encoder_router();
    assert!(
        env.wait_count(STREAM_SHARDS, "pcb.shards.", 3, Duration::from_secs(60))
            .await,
        "3 shard records"
    );
    // Longer than the router's 5 deliveries 2 s apart: back-pressure is not a failure.
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(env.count(STREAM_SHARDS, "pcb.shards.").await, 3);
    assert_eq!(env.count(STREAM_REJECTED, "pcb.rejected.").await, 0);
    let images = env.js.get_stream(STREAM_IMAGES).await.expect("images");
    let router = images.consumer_info("router").await.expect("router");
    assert!(
        router.num_ack_pending + router.num_pending as usize >= 5,
        "the router holds the rest: {router:?}"
    );

    // The admin step raises the limits; the rest of the inbox and the held records drain.
    pcb_common::apply_streams(&env.js, &pcb_common::Topology::default())
        .await
        .expect("limits raised");
    let second = env.import(&boards).await;
    assert_eq!(
        (second.published, second.duplicates),
        (held, first.published),
        "{second}"
    );
    assert!(
        env.wait_count(STREAM_SHARDS, "pcb.shards.", 12, Duration::from_secs(120))
            .await,
        "every board routed"
    );
    shutdown.trigger();
    for h in handles {
        let _ = h.await;
    }
    let records = env.read_all(STREAM_SHARDS, "pcb.shards.>").await;
    let ids: BTreeSet<String> = records
        .iter()
        .map(|(_, p)| {
            let r: pcb_schemas::ShardRecord = pcb_schemas::decode(p, None).expect("record");
            r.record.image_id
        })
        .collect();
    assert_eq!((records.len(), ids.len()), (12, 12), "each board once");
    assert_eq!(env.count(STREAM_REJECTED, "pcb.rejected.").await, 0);

    // Lowering a limit below what a stream holds would delete: refused, nothing changes.
    let err = pcb_common::apply_streams(&env.js, &limits(-1, 5))
        .await
        .expect_err("shrinking below the content");
    assert!(matches!(err, TopologyError::Shrink { .. }), "{err}");
    assert!(err.to_string().contains("PCB_SHARDS holds 12"), "{err}");
    assert_eq!(env.count(STREAM_SHARDS, "pcb.shards.").await, 12);
}

/// Room is made from what every stage has processed, oldest first, and only from that:
/// past 80% of its limit `PCB_IMAGES` loses its oldest raw records the encoder acknowledged
/// and its oldest encoded records both the router and the detector acknowledged, down to
/// 70%, passing over those not yet processed; a record one of them has not acknowledged
/// stays, however full the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_is_made_only_from_what_every_consumer_acknowledged() {
    use async_nats::jetstream::consumer::pull;
    use futures::StreamExt;

    let env = Env::start().await;
    let topo = limits(20, -1);
    pcb_common::apply_streams(&env.js, &topo)
        .await
        .expect("limits");
    let consumers = pcb_common::topology::default_consumers();
    let publish = |subject: &'static str, n: usize| {
        let js = env.js.clone();
        async move {
            for i in 0..n {
                js.publish(subject, format!("{subject} {i}").into())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored");
            }
        }
    };
    // Sequences 1-10 raw, 11-18 encoded: 18 of 20, 90%.
    publish("pcb.images.raw", 10).await;
    publish("pcb.images.encoded", 8).await;
    let stream = env.js.get_stream(STREAM_IMAGES).await.expect("stream");
    let ack = |durable: &'static str, n: usize| {
        let stream = stream.clone();
        async move {
            let c: async_nats::jetstream::consumer::Consumer<pull::Config> =
                stream.get_consumer(durable).await.expect("durable");
            let mut got = c.fetch().max_messages(n).messages().await.expect("fetch");
            let mut acked = 0;
            while let Some(m) = got.next().await {
                m.expect("message").double_ack().await.expect("ack");
                acked += 1;
            }
            assert_eq!(acked, n, "{durable}");
        }
    };
    ack("encoder", 6).await; // raw 1-6
    ack("router", 8).await; // encoded 11-18
    ack("detector", 3).await; // encoded 11-13

    let seqs = || async {
        let mut out = Vec::new();
        let mut s = env.js.get_stream(STREAM_IMAGES).await.expect("stream");
        let last = s.info().await.expect("info").state.last_sequence;
        for seq in 1..=last {
            if s.get_raw_message(seq).await.is_ok() {
                out.push(seq);
            }
        }
        out
    };
    // 18 - 14 = 4 go: the four oldest, raw 1-4, all acknowledged.
    let made = pcb_common::make_room(&env.js, &topo, &consumers)
        .await
        .expect("room");
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(
        (made[0].subject.as_str(), made[0].removed),
        ("pcb.images.raw", 4)
    );
    assert_eq!(seqs().await, (5..=18).collect::<Vec<u64>>());
    // Below 80% nothing more goes.
    assert!(pcb_common::make_room(&env.js, &topo, &consumers)
        .await
        .expect("room")
        .is_empty());

    // Full again (19 of 20): 5 go, the oldest processed by everyone: raw 5-6, then past
    // raw 7-10 (the encoder has not acknowledged them) encoded 11-13.
    publish("pcb.images.raw", 5).await; // 19-23
    let made = pcb_common::make_room(&env.js, &topo, &consumers)
        .await
        .expect("room");
    let removed: u64 = made.iter().map(|t| t.removed).sum();
    assert_eq!(removed, 5, "{made:?}");
    let mut left: Vec<u64> = (7..=10).collect();
    left.extend(14..=23);
    assert_eq!(seqs().await, left);

    // Full once more, with nothing processed left: nothing goes, the stream pushes back.
    publish("pcb.images.raw", 5).await; // 24-28
    assert!(pcb_common::make_room(&env.js, &topo, &consumers)
        .await
        .expect("room")
        .is_empty());
    assert_eq!(seqs().await.len(), 19);
}
