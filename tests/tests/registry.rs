//! The registry's live alias under concurrent changes: promotions from several operators at
//! once (the viewer, `pcb models`, the registry stage) each land, and none is lost from the
//! history, because every change of the live key is a compare-and-set on its KV revision;
//! and crafted training candidates (a local path, an object that is not safetensors, wrong
//! shapes, a wrong digest, an oversized object) are refused without the registry reading
//! any file.

use std::collections::BTreeSet;
use std::time::Duration;

use pcb_registry::Registry;
use pcb_schemas::{
    decode, DeadLetter, Snapshot, TrainCandidate, OBJECTS_CANDIDATES, STREAM_REJECTED,
    SUBJECT_TRAIN_CANDIDATES,
};
use pcb_tests::Env;

const MODEL: &str = "pcb-concurrent";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_promotions_lose_no_version_from_the_history() {
    let env = Env::start().await;
    let registry = Registry::open(&env.js).await.expect("registry");
    let mut versions = Vec::new();
    for seed in 0..8 {
        versions
            .push(pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), seed).await);
    }
    registry
        .promote(MODEL, versions[0], "test")
        .await
        .expect("first promotion");
    // Every other version promoted at the same moment, each by its own client (connected
    // and opened first, then released together).
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(versions.len() - 1));
    let mut tasks = Vec::new();
    for &v in &versions[1..] {
        let client = async_nats::connect(env.server.url())
            .await
            .expect("connect");
        let r = Registry::open(&async_nats::jetstream::new(client))
            .await
            .expect("registry");
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            r.promote(MODEL, v, "operator").await.expect("promote")
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let live = registry
        .live(MODEL)
        .await
        .expect("live")
        .expect("a live version");
    let mut seen: BTreeSet<u64> = live.history.iter().copied().collect();
    assert_eq!(
        seen.len(),
        live.history.len(),
        "a version twice in {live:?}"
    );
    seen.insert(live.version);
    assert_eq!(
        seen,
        versions.iter().copied().collect::<BTreeSet<u64>>(),
        "every promoted version is live or in the history: {live:?}"
    );
    // Rollbacks walk that history back, one version each, down to the first.
    let mut order = vec![live.version];
    for _ in 1..versions.len() {
        order.push(
            registry
                .rollback(MODEL, "test")
                .await
                .expect("rollback")
                .version,
        );
    }
    assert_eq!(*order.last().expect("rolled back"), versions[0]);
    assert!(
        registry.rollback(MODEL, "test").await.is_err(),
        "nothing left to roll back to"
    );
}

/// A random network's weights (the registry's tests need a real safetensors file).
async fn random_weights(dir: &std::path::Path) -> (Vec<u8>, serde_json::Value) {
    use pcb_vision::{Depth, Detector, ModelConfig, Norm, Sampling};
    let config = ModelConfig {
        backbone: Depth::R18,
        norm: Norm::Batch,
        backbone_width: 16,
        fpn_channels: 16,
        representation_size: 64,
        ..ModelConfig::default()
    };
    let path = dir.join("candidate.safetensors");
    let (c, p) = (config.clone(), path.clone());
    tokio::task::spawn_blocking(move || {
        tch::manual_seed(3);
        Detector::new(c, tch::Device::Cpu, Sampling::Random)
            .save(&p)
            .expect("save weights");
    })
    .await
    .expect("join");
    (
        std::fs::read(&path).expect("read weights"),
        serde_json::to_value(&config).expect("config json"),
    )
}

/// `weights` without `backbone.body.layer3.0.conv2.weight`, and with an extra tensor.
fn edited_weights(dir: &std::path::Path, weights: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let path = dir.join("edit.safetensors");
    std::fs::write(&path, weights).expect("write");
    let tensors = tch::Tensor::read_safetensors(&path).expect("read");
    let write = |named: Vec<(String, tch::Tensor)>| {
        let out = dir.join("edited.safetensors");
        tch::Tensor::write_safetensors(&named, &out).expect("write safetensors");
        std::fs::read(&out).expect("read back")
    };
    let missing: Vec<(String, tch::Tensor)> = tensors
        .iter()
        .filter(|(n, _)| n != "backbone.body.layer3.0.conv2.weight")
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    assert_eq!(
        missing.len() + 1,
        tensors.len(),
        "the tensor is there to leave out"
    );
    let mut extra: Vec<(String, tch::Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    extra.push((
        "backdoor.weight".into(),
        tch::Tensor::zeros([4], tch::kind::FLOAT_CPU),
    ));
    (write(missing), write(extra))
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes))
}

fn candidate(
    job: &str,
    artifact: &str,
    sha256: &str,
    config: &serde_json::Value,
) -> TrainCandidate {
    TrainCandidate {
        job: job.into(),
        model: "pcb-crafted".into(),
        artifact: artifact.into(),
        sha256: sha256.into(),
        model_config: config.clone(),
        hyperparameters: serde_json::json!({}),
        metrics: None,
        snapshot: Snapshot {
            stream: "PCB_SHARDS".into(),
            first_seq: 1,
            last_seq: 1,
            train_images: 1,
            val_images: 0,
            boxes_per_class: Default::default(),
        },
        epoch_losses: vec![],
        git_revision: None,
        created_at_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_can_never_make_the_registry_read_a_local_file() {
    let env = Env::start().await;
    let (weights, config) = random_weights(env.dir.path()).await;
    let good_sha = sha256(&weights);
    let store = env
        .js
        .get_object_store(OBJECTS_CANDIDATES)
        .await
        .expect("candidates' store");
    let put = |name: &'static str, bytes: Vec<u8>| {
        let store = store.clone();
        async move {
            store
                .put(name, &mut bytes.as_slice())
                .await
                .expect("put object");
        }
    };
    put("m/good/w.safetensors", weights.clone()).await;
    put("m/text/w.safetensors", b"hello, not weights".to_vec()).await;
    put("m/shapes/w.safetensors", weights.clone()).await;
    put("m/digest/w.safetensors", weights.clone()).await;
    // The same weights with one layer-3 tensor left out, and with one tensor too many.
    let (missing, extra) = edited_weights(env.dir.path(), &weights);
    put("m/missing/w.safetensors", missing.clone()).await;
    put("m/extra/w.safetensors", extra.clone()).await;
    let secret = env.dir.path().join("secret.safetensors");
    std::fs::write(&secret, &weights).expect("a local file");
    let mut fewer_classes = config.clone();
    fewer_classes["num_classes"] = serde_json::json!(5);
    let crafted = [
        // A local path, even of a real weights file with its true digest.
        (
            candidate("path", &secret.display().to_string(), &good_sha, &config),
            "artifact-missing",
        ),
        (
            candidate("passwd", "/etc/passwd", &good_sha, &config),
            "artifact-missing",
        ),
        (
            candidate(
                "text",
                "m/text/w.safetensors",
                &sha256(b"hello, not weights"),
                &config,
            ),
            "artifact-format",
        ),
        (
            candidate(
                "shapes",
                "m/shapes/w.safetensors",
                &good_sha,
                &fewer_classes,
            ),
            "artifact-shapes",
        ),
        (
            candidate("digest", "m/digest/w.safetensors", &"0".repeat(64), &config),
            "artifact-digest",
        ),
        (
            candidate(
                "missing",
                "m/missing/w.safetensors",
                &sha256(&missing),
                &config,
            ),
            "artifact-shapes",
        ),
        (
            candidate("extra", "m/extra/w.safetensors", &sha256(&extra), &config),
            "artifact-shapes",
        ),
    ];
    let stop = pcb_common::Shutdown::new();
    let registry_stage = env.spawn_stage::<pcb_registry::RegistryStage>("", &stop);
    let good = candidate("good", "m/good/w.safetensors", &good_sha, &config);
    // The good one twice (a redelivery, or the trainer offering it again): one version.
    for c in crafted.iter().map(|(c, _)| c).chain([&good, &good]) {
        pcb_common::publish(&env.js, SUBJECT_TRAIN_CANDIDATES.into(), c)
            .await
            .expect("publish");
    }
    assert!(
        env.wait_count(
            STREAM_REJECTED,
            "pcb.rejected.registry",
            crafted.len() as u64,
            Duration::from_secs(60)
        )
        .await,
        "a dead letter for every crafted candidate"
    );
    let letters: Vec<DeadLetter> = env
        .read_all(STREAM_REJECTED, "pcb.rejected.registry")
        .await
        .into_iter()
        .map(|(_, p)| decode(&p, None).expect("dead letter"))
        .collect();
    for (c, code) in &crafted {
        let l = letters
            .iter()
            .find(|l| l.source == c.artifact)
            .unwrap_or_else(|| panic!("no dead letter for {}: {letters:?}", c.job));
        assert_eq!(l.reason_code, *code, "{}: {}", c.job, l.reason);
        assert!(
            !l.reason.contains(&good_sha),
            "a digest echoed: {}",
            l.reason
        );
    }
    // Every tensor is held to the declared network, not only the head.
    let reason = |artifact: &str| {
        letters
            .iter()
            .find(|l| l.source == artifact)
            .map(|l| l.reason.clone())
            .unwrap_or_default()
    };
    let r = reason("m/missing/w.safetensors");
    assert!(
        r.contains("no tensor backbone.body.layer3.0.conv2.weight"),
        "{r}"
    );
    let r = reason("m/extra/w.safetensors");
    assert!(
        r.contains("backdoor.weight is not a tensor of the declared network"),
        "{r}"
    );
    let r = reason("m/shapes/w.safetensors");
    assert!(
        r.contains("roi_heads.box_predictor.cls_score.weight is [7, 64]"),
        "{r}"
    );
    let registry = Registry::open(&env.js).await.expect("registry");
    assert!(
        pcb_tests::wait_until(Duration::from_secs(60), || async {
            registry
                .list(Some("pcb-crafted"))
                .await
                .map(|v| v.len())
                .unwrap_or(0)
                == 1
        })
        .await,
        "the good candidate registered"
    );
    // Let the second copy of the good one be processed too, then count again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let versions = registry.list(Some("pcb-crafted")).await.expect("list");
    assert_eq!(
        versions.len(),
        1,
        "one version for one job and digest: {versions:?}"
    );
    assert_eq!(versions[0].sha256, good_sha);
    assert_eq!(
        letters.len(),
        crafted.len(),
        "only the crafted ones refused"
    );
    // Over the size cap: refused before it is read.
    let big = candidate("big", "m/shapes/w.safetensors", &good_sha, &config);
    let r = pcb_registry::candidate_weights(&env.js, &big, 1000)
        .await
        .expect_err("over the cap");
    assert_eq!(r.reason_code, "artifact-too-large", "{}", r.reason);
    stop.trigger();
    let _ = registry_stage.await;
}
