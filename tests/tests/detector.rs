//! The registry and the online detector as real processes over a real nats-server: one
//! detection per image, readable from Python; a promotion under load with two replicas,
//! a corrupt version refused; a replica killed and restarted; an undecodable image rejected.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use pcb_registry::Registry;
use pcb_schemas::{
    decode, DeadLetter, Detection, EncodedImage, STREAM_DETECTIONS, STREAM_IMAGES, STREAM_REJECTED,
    SUBJECT_ENCODED,
};
use pcb_tests::models::model_events;
use pcb_tests::{wait_until, Env};

const MODEL: &str = "pcb-test";

async fn register(registry: &Registry, dir: &Path, seed: i64) -> u64 {
    pcb_tests::register_random_model(registry, MODEL, dir, seed).await
}

/// Stops the encoder and the detector processes at the end of a test.
async fn finish(
    stop: pcb_common::Shutdown,
    enc: tokio::task::JoinHandle<Result<(), String>>,
    detectors: &mut [&mut Child],
) {
    stop.trigger();
    let _ = enc.await;
    for d in detectors {
        let _ = d.kill();
    }
}

/// A test server whose registry serves a random model of `seed` as live.
/// Returns it with the live version.
async fn with_live_model(seed: i64) -> (Env, u64) {
    // Authentication on, as `pcb up` runs it: each detector process is the `detector`
    // identity, held to what the topology gives it.
    let env = Env::start_secured().await;
    let registry = Registry::open(&env.js).await.expect("registry");
    let v = register(&registry, env.dir.path(), seed).await;
    registry.promote(MODEL, v, "test").await.expect("promote");
    (env, v)
}

fn spawn_detector(env: &Env, name: &str) -> (Child, PathBuf) {
    pcb_tests::spawn_detector(env, name, MODEL)
}

/// Drops `count` synthetic boards of 64 px through the ingester and encoder.
async fn feed(env: &Env, count: usize, seed: u64) {
    let boards = env.dir.path().join(format!("boards-{seed}"));
    pcb_tests::synth_sized(&boards, count, seed, 64, 0.2);
    env.import(&boards).await;
}

/// Waits up to `secs` until `pcb.detections` holds at least `count` detections.
async fn detections_reach(env: &Env, count: u64, secs: u64) -> bool {
    env.wait_count(
        STREAM_DETECTIONS,
        "pcb.detections",
        count,
        Duration::from_secs(secs),
    )
    .await
}

/// Waits up to `secs` until `pcb.detections` holds at least `count` detections and the
/// detector has written a dead letter.
async fn detections_and_a_letter(env: &Env, count: u64, secs: u64) -> bool {
    wait_until(Duration::from_secs(secs), || async {
        env.count(STREAM_DETECTIONS, "pcb.detections").await >= count
            && env.count(STREAM_REJECTED, "pcb.rejected.detector").await >= 1
    })
    .await
}

/// The detector's dead letters, in stream order.
async fn detector_letters(env: &Env) -> Vec<DeadLetter> {
    env.read_all(STREAM_REJECTED, "pcb.rejected.detector")
        .await
        .iter()
        .map(|(_, p)| decode(p, None).expect("dead letter"))
        .collect()
}

/// Runs the encoder in-process until dropped.
fn start_encoder(
    env: &Env,
) -> (
    pcb_common::Shutdown,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let shutdown = pcb_common::Shutdown::new();
    let h = env.spawn_stage::<pcb_encoder::Encoder>("", &shutdown);
    (shutdown, h)
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hundred_boards_give_three_hundred_detections_that_python_reads() {
    let python = pcb_tests::venv_python();
    let (env, v) = with_live_model(1).await;
    let (mut det, log) = spawn_detector(&env, "det");
    let (stop, enc) = start_encoder(&env);
    feed(&env, 300, 3).await;
    let done = detections_reach(&env, 300, 300).await;
    assert!(done, "not 300 detections; detector log:\n{}", log_of(&log));
    let all = env.detections().await;
    let ids: BTreeSet<&str> = all.iter().map(|d| d.image_id.as_str()).collect();
    assert_eq!(
        (all.len(), ids.len()),
        (300, 300),
        "one detection per image"
    );
    assert!(all
        .iter()
        .all(|d| d.model.name == MODEL && d.model.version == v));
    assert!(all
        .iter()
        .all(|d| d.verdict == "pass" || d.verdict == "fail"));

    let url = env.server.url();
    // The line-side reader as the read-only identity.
    let reader = env
        .identities
        .as_ref()
        .expect("secured")
        .seed_file(pcb_common::Identity::Reader);
    let reader = reader.display().to_string();
    let text = pcb_tests::run_python(
        &python,
        "py/line_side.py",
        &[&url, "--count", "300", "--nkey", &reader],
    );
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with("received 300 "), "{last}");
    let fails = all.iter().filter(|d| d.verdict == "fail").count();
    assert_eq!(
        last,
        format!("received 300 pass {} fail {fails}", 300 - fails),
        "Python sees the verdicts Rust sees"
    );
    finish(stop, enc, &mut [&mut det]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promotion_under_load_answers_every_image_once_and_a_corrupt_version_is_refused() {
    let env = Env::start().await;
    let registry = Registry::open(&env.js).await.expect("registry");
    let v1 = register(&registry, env.dir.path(), 1).await;
    let v2 = register(&registry, env.dir.path(), 2).await;
    registry
        .promote(MODEL, v1, "test")
        .await
        .expect("promote v1");
    let (mut a, log_a) = spawn_detector(&env, "det-a");
    let (mut b, log_b) = spawn_detector(&env, "det-b");
    let logs = || format!("{}\n{}", log_of(&log_a), log_of(&log_b));
    let (stop, enc) = start_encoder(&env);
    feed(&env, 1000, 4).await;
    let started = detections_reach(&env, 200, 300).await;
    assert!(started, "no progress:\n{}", logs());
    registry
        .promote(MODEL, v2, "test")
        .await
        .expect("promote v2");
    let done = detections_reach(&env, 1000, 600).await;
    assert!(done, "not 1000 detections:\n{}", logs());
    let all = env.detections().await;
    let mut per_image: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for d in &all {
        per_image
            .entry(&d.image_id)
            .or_default()
            .push(d.model.version);
    }
    assert_eq!(per_image.len(), 1000, "every image answered");
    let twice: Vec<_> = per_image.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    let by_v1 = all.iter().filter(|d| d.model.version == v1).count();
    let by_v2 = all.iter().filter(|d| d.model.version == v2).count();
    assert!(
        by_v1 >= 200 && by_v2 > 0,
        "the switch shows: v1 {by_v1}, v2 {by_v2}"
    );
    println!("1000 images: {by_v1} answered by v{v1}, {by_v2} by v{v2}");

    // A corrupt artifact: promoted, refused by both replicas, v2 keeps serving.
    let v3 = register(&registry, env.dir.path(), 3).await;
    let meta = registry.version(MODEL, v3).await.expect("v3");
    registry
        .overwrite_weights(&meta, b"definitely not safetensors")
        .await
        .expect("corrupt");
    registry
        .promote(MODEL, v3, "test")
        .await
        .expect("promote v3");
    let refused = wait_until(Duration::from_secs(60), || async {
        model_events(&env)
            .await
            .iter()
            .filter(|e| e.kind == "load-failed" && e.model.version == v3)
            .count()
            >= 2
    })
    .await;
    assert!(
        refused,
        "both replicas should refuse v3:\n{}",
        log_of(&log_a)
    );
    let why = model_events(&env)
        .await
        .into_iter()
        .find(|e| e.kind == "load-failed")
        .and_then(|e| e.reason)
        .unwrap_or_default();
    assert!(
        why.contains("sha256") && why.contains(&format!("v{v2} keeps serving")),
        "{why}"
    );
    feed(&env, 20, 5).await;
    let more = detections_reach(&env, 1020, 120).await;
    assert!(more, "the old version stopped serving");
    let later: Vec<Detection> = env.detections().await.into_iter().skip(1000).collect();
    assert!(
        later.iter().all(|d| d.model.version == v2),
        "v2 answered after the refusal"
    );
    finish(stop, enc, &mut [&mut a, &mut b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_no_image_and_repeats_none() {
    let (env, _) = with_live_model(1).await;
    let (mut a, log_a) = spawn_detector(&env, "det-a");
    let (mut b, _) = spawn_detector(&env, "det-b");
    let (stop, enc) = start_encoder(&env);
    feed(&env, 400, 6).await;
    let going = detections_reach(&env, 100, 300).await;
    assert!(going, "no progress:\n{}", log_of(&log_a));
    a.kill().expect("SIGKILL");
    let _ = a.wait();
    let (mut a2, _) = spawn_detector(&env, "det-a2");
    let done = detections_reach(&env, 400, 300).await;
    assert!(done, "images lost after the kill");
    // Redeliveries of what the killed replica held reach the stream only once.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let all = env.detections().await;
    let ids: BTreeSet<&str> = all.iter().map(|d| d.image_id.as_str()).collect();
    assert_eq!(ids.len(), 400, "every image answered");
    assert_eq!(
        all.len(),
        400,
        "no image answered twice by the same version"
    );
    finish(stop, enc, &mut [&mut b, &mut a2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_that_does_not_decode_is_rejected_and_the_detector_carries_on() {
    let (env, _) = with_live_model(1).await;
    let (mut det, log) = spawn_detector(&env, "det");
    publish_undecodable(&env, 'f').await;
    let (stop, enc) = start_encoder(&env);
    feed(&env, 10, 7).await;
    let done = detections_and_a_letter(&env, 10, 120).await;
    assert!(done, "detector log:\n{}", log_of(&log));
    let letter = &detector_letters(&env).await[0];
    assert_eq!(letter.reason_code, "not-an-image");
    assert!(letter.reason.contains("broken.jpg"), "{}", letter.reason);
    assert_eq!(env.count(STREAM_IMAGES, SUBJECT_ENCODED).await, 11);
    finish(stop, enc, &mut [&mut det]).await;
}

/// Publishes the record of an image that cannot be decoded (its bytes are text), with an
/// id of 64 `id`s, on `pcb.images.encoded`.
async fn publish_undecodable(env: &Env, id: char) {
    let record = EncodedImage {
        image_id: id.to_string().repeat(64),
        board_id: "broken".into(),
        line_id: "line-1".into(),
        source: "broken.jpg".into(),
        captured_at_ms: 0,
        encoded_at_ms: 0,
        image_b64: "bm90IGFuIGltYWdl".into(),
        width: 64,
        height: 64,
        channels: 1,
        format: "jpeg".into(),
        sha256: id.to_string().repeat(64),
        labels: None,
        label_format: None,
        template_b64: None,
        split_hint: None,
        revision: None,
        image_ref: None,
        template_ref: None,
    };
    pcb_common::publish(&env.js, SUBJECT_ENCODED.into(), &record)
        .await
        .expect("publish");
}

/// A detector process serving the test model with exactly these other settings.
fn spawn_detector_config(env: &Env, name: &str, lines: &str) -> (Child, PathBuf) {
    pcb_tests::spawn_detector_lines(
        env,
        name,
        &format!("model_name = {MODEL:?}\nthreads = 1\nreport_threshold = 0.0\n{lines}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_bad_image_in_a_batch_of_four_is_rejected_alone_and_the_three_others_answered() {
    let (env, _) = with_live_model(1).await;
    // Three good records and one bad one wait in the stream before the detector starts,
    // so its first batch (4 at most, 2 s to fill) holds all four.
    let (stop, enc) = start_encoder(&env);
    feed(&env, 3, 11).await;
    let encoded = env
        .wait_count(STREAM_IMAGES, SUBJECT_ENCODED, 3, Duration::from_secs(60))
        .await;
    assert!(encoded, "the encoder did not encode 3 boards");
    publish_undecodable(&env, 'e').await;
    let (mut det, log) = spawn_detector_config(
        &env,
        "det-batch",
        "max_batch = 4\nmax_wait_ms = 2000\nconcurrency = 1\n",
    );
    let done = detections_and_a_letter(&env, 3, 120).await;
    assert!(done, "detector log:\n{}", log_of(&log));
    // Nothing more comes: the three are answered once, the bad one rejected once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let detections = env.detections().await;
    assert_eq!(detections.len(), 3, "detector log:\n{}", log_of(&log));
    assert!(detections.iter().all(|d| d.board_id != "broken"));
    let letters = detector_letters(&env).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason_code, "not-an-image");
    finish(stop, enc, &mut [&mut det]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_that_runs_out_of_deliveries_becomes_one_retries_exhausted_dead_letter() {
    let (env, _) = with_live_model(2).await;
    let (mut det, log) = spawn_detector_config(
        &env,
        "det-retry",
        "max_batch = 1\nmax_deliver = 2\nretry_delay_ms = 100\n",
    );
    let serving = wait_until(Duration::from_secs(60), || async {
        model_events(&env).await.iter().any(|e| e.kind == "loaded")
    })
    .await;
    assert!(serving, "detector log:\n{}", log_of(&log));
    // With its output stream gone, every answer fails to publish: a transient failure,
    // retried until the delivery limit.
    env.js
        .delete_stream(STREAM_DETECTIONS)
        .await
        .expect("delete PCB_DETECTIONS");
    let (stop, enc) = start_encoder(&env);
    feed(&env, 1, 12).await;
    // Not through `pcb.detections`: that stream is gone.
    let lettered = env
        .wait_count(
            STREAM_REJECTED,
            "pcb.rejected.detector",
            1,
            Duration::from_secs(120),
        )
        .await;
    assert!(lettered, "detector log:\n{}", log_of(&log));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let letters = detector_letters(&env).await;
    assert_eq!(letters.len(), 1, "one dead letter, not one per delivery");
    let letter = &letters[0];
    assert_eq!(letter.reason_code, "retries-exhausted");
    assert!(
        letter.reason.contains("2 deliveries") && letter.reason.contains("publishing"),
        "{}",
        letter.reason
    );
    finish(stop, enc, &mut [&mut det]).await;
}
