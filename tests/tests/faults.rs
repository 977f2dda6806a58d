//! Faults under load, each settled with a ledger: every board dropped ends with exactly one
//! detection per model version or a dead letter; nothing lost, nothing duplicated.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pcb_tests::up::{detections, Pipeline};
use pcb_tests::{pids_with_arg, wait_until, Ledger};

/// SIGKILLs the one server running on `conf`; returns its pid.
fn kill_server(conf: &std::path::Path) -> Vec<i32> {
    let pids = pids_with_arg(&conf.display().to_string());
    assert_eq!(pids.len(), 1, "one server on {}: {pids:?}", conf.display());
    // SAFETY: kill(2) on a server pid read from /proc just now.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    pids
}

/// Waits until `pcb up` has started a new server on `conf` in place of `old`.
async fn wait_restarted(p: &Pipeline, conf: &std::path::Path, old: &[i32]) {
    let back = wait_until(Duration::from_secs(60), || async {
        let now = pids_with_arg(&conf.display().to_string());
        !now.is_empty() && now != old
    })
    .await;
    assert!(back, "{} was not restarted:\n{}", conf.display(), p.said());
}

/// Time until a board of `wave` (dropped after a fault) has its detection.
async fn first_detection_of(p: &Pipeline, wave: &BTreeSet<String>) -> bool {
    wait_until(Duration::from_secs(240), || async {
        Ledger::read(&p.js, wave).await.detected > 0
    })
    .await
}

/// The private server SIGKILLed mid-stream: `pcb up` restarts it on the same port and
/// store, every stage reconnects, the ingester holds the boards dropped while it was down,
/// and every board gets its one detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_mid_stream_is_restarted_and_loses_nothing() {
    let p = Pipeline::up(&[]).await;
    let mut boards = p.wave("wave1", 10, 11);
    p.wait_detections(3).await;
    let conf = p.data.join("nats").join("nats-server.conf");
    let pids = kill_server(&conf);
    let killed = Instant::now();
    // Boards dropped while the server is down wait in the inbox.
    let wave2 = p.wave("wave2", 10, 12);
    boards.extend(wave2.clone());
    wait_restarted(&p, &conf, &pids).await;
    let restarted_after = killed.elapsed();
    assert!(
        first_detection_of(&p, &wave2).await,
        "no board dropped after the fault was detected:\n{}",
        p.said()
    );
    let resumed_after = killed.elapsed();
    boards.extend(p.wave("wave3", 10, 13));

    let (settled, ledger) = p.settle(&boards).await;
    println!(
        "server SIGKILL: {ledger}; restarted after {:.1} s, first board dropped after the \
         kill detected after {:.1} s",
        restarted_after.as_secs_f64(),
        resumed_after.as_secs_f64()
    );
    assert!(settled && ledger.balanced(), "{ledger}\n{}", p.said());
    assert_eq!(ledger.boards, 30);
    assert!(p.said().contains("nats-server nats://"), "{}", p.said());
    assert!(p.said().contains("exited"), "{}", p.said());
}

/// A 3-node cluster (`pcb up --cluster 3`, every stream and bucket R3): the node leading
/// `PCB_IMAGES` is SIGKILLed under load; the others elect new leaders, the stages move to
/// them, `pcb up` restarts the node, and every board gets its one detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_loses_its_stream_leader_under_load_and_loses_nothing() {
    let p = Pipeline::up(&["--cluster", "3"]).await;
    let mut images =
        p.js.get_stream(pcb_schemas::STREAM_IMAGES)
            .await
            .expect("stream");
    let info = images.info().await.expect("info").clone();
    assert_eq!(info.config.num_replicas, 3, "PCB_IMAGES is R3");
    let kv =
        p.js.get_stream("KV_pcb_models")
            .await
            .expect("registry bucket");
    assert_eq!(
        kv.cached_info().config.num_replicas,
        3,
        "the registry is R3"
    );

    let mut boards = p.wave("wave1", 10, 21);
    p.wait_detections(3).await;
    let leader = images
        .info()
        .await
        .expect("info")
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("a leader");
    let node = leader.strip_prefix("pcb-").expect("a pcb node name");
    let conf = p.data.join("nats").join(node).join("nats-server.conf");
    let pids = kill_server(&conf);
    let killed = Instant::now();
    let wave2 = p.wave("wave2", 10, 22);
    boards.extend(wave2.clone());
    assert!(
        first_detection_of(&p, &wave2).await,
        "no board dropped after the leader died was detected:\n{}",
        p.said()
    );
    let resumed_after = killed.elapsed();
    let new_leader = images
        .info()
        .await
        .ok()
        .and_then(|i| i.cluster.clone())
        .and_then(|c| c.leader)
        .unwrap_or_default();
    wait_restarted(&p, &conf, &pids).await;
    boards.extend(p.wave("wave3", 10, 23));

    let (settled, ledger) = p.settle(&boards).await;
    println!(
        "cluster leader {leader} SIGKILL: {ledger}; first board dropped after the kill \
         detected after {:.1} s (new leader {new_leader})",
        resumed_after.as_secs_f64()
    );
    assert!(settled && ledger.balanced(), "{ledger}\n{}", p.said());
    assert_eq!(ledger.boards, 30);
}

/// `PCB_IMAGES` capped at 40 messages, 50 boards, its detector paused (no live model yet):
/// the stream fills with boards the detector has not answered, the ingester holds the rest
/// in the inbox, nothing is deleted; once a model goes live the detector catches up, `pcb
/// up` removes what every stage has processed, and every board drains through without the
/// limit being raised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_filled_while_its_consumer_is_paused_pushes_back_then_drains() {
    let p = Pipeline::up_with(&["--no-default-model"], "[streams.images]\nmax_msgs = 40\n").await;
    let boards = p.wave("wave1", 50, 41);
    // The encoded records of 50 boards alone need 50 messages: the encoder's processed raw
    // ones make room, the detector's unanswered encoded ones cannot.
    let full = wait_until(Duration::from_secs(120), || async {
        let Ok(mut s) = p.js.get_stream(pcb_schemas::STREAM_IMAGES).await else {
            return false;
        };
        s.info()
            .await
            .map(|i| i.state.messages >= 36)
            .unwrap_or(false)
    })
    .await;
    assert!(full, "PCB_IMAGES did not fill:\n{}", p.said());
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut images =
        p.js.get_stream(pcb_schemas::STREAM_IMAGES)
            .await
            .expect("stream");
    let held = images.info().await.expect("info").state.clone();
    let waiting = pcb_tests::board_sources(&p.inbox(), &p.inbox())
        .into_iter()
        .filter(|s| s.starts_with("wave1/"))
        .count();
    assert!(held.messages <= 40, "{held:?}");
    assert!(
        waiting > 0,
        "the ingester should hold boards back: {held:?}"
    );
    assert_eq!(detections(&p.js).await, 0);
    let encoded = pcb_tests::count(&p.js, pcb_schemas::STREAM_IMAGES, "pcb.images.encoded").await;

    // A model goes live: the detector answers, room is made, the rest flows.
    let v = pcb::default_model::register_if_empty(&p.js, "pcb-defects")
        .await
        .expect("register")
        .expect("a first version");
    let (settled, ledger) = p.settle(&boards).await;
    let limit = images.info().await.expect("info").config.max_messages;
    println!(
        "paused consumer: PCB_IMAGES held {} of 40 ({encoded} encoded, unanswered), {waiting} \
         boards waited in the inbox; after v{v} went live: {ledger}",
        held.messages
    );
    assert!(settled && ledger.balanced(), "{ledger}\n{}", p.said());
    assert_eq!(ledger.detected, 50);
    assert_eq!(limit, 40, "the limit was not raised");
}
