//! `pcb status` agrees with what a plain NATS client in another language (Python's nats-py)
//! reads from the streams, and that client decodes every message.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pcb_schemas::{STREAM_IMAGES, STREAM_SHARDS};
use pcb_tests::{synth, wait_until, Env};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_matches_a_python_reader() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run deploy/setup.sh (it creates the venv with nats-py and msgpack)",
        python.display()
    );
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
    let done = wait_until(Duration::from_secs(60), || async {
        env.count(STREAM_SHARDS, "pcb.shards.").await >= 30
    })
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

    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("py/read_streams.py"))
        .arg(env.server.url())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
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
