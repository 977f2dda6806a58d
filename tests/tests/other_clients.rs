//! `pcb status` agrees with what a plain NATS client in another language (Python's nats-py)
//! reads from the streams, and that client decodes every message.

use std::collections::BTreeMap;
use std::time::Duration;

use pcb_schemas::{STREAM_IMAGES, STREAM_SHARDS};
use pcb_tests::{synth, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_matches_a_python_reader() {
    let python = pcb_tests::venv_python();
    let env = Env::start().await;
    let sample = env.dir.path().join("sample");
    synth(&sample, 30, 5);
    std::fs::write(sample.join("group90000/90000/junk_test.jpg"), b"junk").expect("write");
    let (shutdown, handles) = env.start_encoder_router();
    let summary = env.import(&sample).await;
    assert_eq!(
        (summary.published, summary.rejected_total()),
        (30, 1),
        "{summary}"
    );
    let done = env
        .wait_count(STREAM_SHARDS, "pcb.shards.", 30, Duration::from_secs(60))
        .await;
    assert!(done);
    shutdown.trigger();
    for h in handles {
        let _ = h.await;
    }
    let status = pcb::status::collect(&env.js).await.expect("status");
    let ours: BTreeMap<String, u64> = status.iter().flat_map(|s| s.subjects.clone()).collect();
    assert_eq!(ours.get("pcb.images.raw"), Some(&30));
    assert_eq!(ours.get("pcb.rejected.ingester"), Some(&1));
    // Every durable exists (provisioned as `pcb init` does); those of the stages this test
    // ran are drained.
    assert!(pcb::status::drained_for(&status, &["encoder", "router"]));

    let text = pcb_tests::run_python(&python, "py/read_streams.py", &[&env.server.url()]);
    // Minimal JSON reading without a JSON dependency: `"subject": count` pairs.
    let counts_part = text.split("\"fields\"").next().unwrap_or_default();
    let mut theirs = BTreeMap::new();
    for piece in counts_part.split(',') {
        let piece = piece.trim_matches(|c: char| c == '{' || c == '}' || c.is_whitespace());
        let piece = piece.trim_start_matches("\"counts\": {");
        if let Some((k, v)) = piece.rsplit_once(':') {
            let k = k.trim().trim_matches('"').to_string();
            if let Ok(n) = v.trim().trim_matches('}').trim().parse::<u64>() {
                theirs.insert(k, n);
            }
        }
    }
    assert_eq!(theirs, ours, "pcb status and nats-py disagree");
    for field in [
        "\"image_b64\"",
        "\"split\"",
        "\"reason_code\"",
        "\"labels\"",
    ] {
        assert!(
            text.contains(field),
            "python did not decode {field}: {text}"
        );
    }
    let _ = (STREAM_IMAGES,);
}
