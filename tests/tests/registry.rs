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

/// A detection of `image` by `version` of `model` with `verdict`, as a detector stores it.
fn answer(model: &str, version: u64, image: &str, fail: bool) -> pcb_schemas::Detection {
    pcb_schemas::Detection {
        image_id: image.into(),
        board_id: image.into(),
        line_id: "line-1".into(),
        source: format!("{image}.jpg"),
        captured_at: 1,
        detected_at: 2,
        model: pcb_schemas::ModelRef {
            name: model.into(),
            version,
        },
        defects: vec![],
        verdict: if fail {
            pcb_schemas::Verdict::Fail
        } else {
            pcb_schemas::Verdict::Pass
        },
        inference_ms: 1.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shadow_a_candidate_runs_in_shadow_and_goes_live_once_it_agreed_enough() {
    use pcb_registry::{judge_shadows, take_candidate, Policy, Promotion, ShadowGate};
    const GATED: &str = "pcb-gated";
    let env = Env::start().await;
    let registry = Registry::open(&env.js).await.expect("registry");
    let (weights, config) = random_weights(env.dir.path()).await;
    let sha = sha256(&weights);
    let store = env
        .js
        .get_object_store(OBJECTS_CANDIDATES)
        .await
        .expect("candidates' store");
    let gate = ShadowGate {
        min_boards: 20,
        min_agreement: 0.9,
        every: Duration::from_secs(1),
        ..ShadowGate::default()
    };
    let policy = Policy {
        promote: Promotion::AfterShadow,
        tolerance_map: 0.01,
        max_artifact_bytes: 1 << 30,
        shadow: gate,
    };
    let take = |job: &'static str, map: f64| {
        let (store, registry, js, weights) = (
            store.clone(),
            registry.clone(),
            env.js.clone(),
            weights.clone(),
        );
        let mut c = candidate(job, &format!("m/{job}/w.safetensors"), &sha, &config);
        c.model = GATED.into();
        c.metrics = Some(serde_json::json!({ "map_deeppcb": map }));
        async move {
            store
                .put(c.artifact.as_str(), &mut weights.as_slice())
                .await
                .expect("put");
            take_candidate(&registry, &js, &c, policy)
                .await
                .expect("taken")
                .version
        }
    };
    // The first version of a name has nothing to be compared with: it goes live.
    let v1 = take("job-1", 0.90).await;
    assert_eq!(
        registry.live(GATED).await.expect("live").map(|l| l.version),
        Some(v1)
    );
    assert_eq!(registry.shadow(GATED).await.expect("shadow"), None);
    // A better one runs in shadow first; a worse one is not even shadowed.
    let v2 = take("job-2", 0.91).await;
    let shadow = registry.shadow(GATED).await.expect("shadow").expect("set");
    assert_eq!((shadow.version, shadow.by.as_str()), (v2, "policy"));
    assert_eq!(
        registry.live(GATED).await.expect("live").map(|l| l.version),
        Some(v1)
    );
    let v3 = take("job-3", 0.50).await;
    assert_eq!(
        registry
            .shadow(GATED)
            .await
            .expect("shadow")
            .map(|s| s.version),
        Some(v2)
    );
    assert_ne!(v3, v2);

    // 20 boards answered by both since the shadow period began: they agree on 19.
    for i in 0..20 {
        let image = format!("img{i:02}");
        let live_fail = i % 2 == 0;
        let shadow_fail = if i == 0 { !live_fail } else { live_fail };
        pcb_common::publish(
            &env.js,
            pcb_schemas::SUBJECT_DETECTIONS.into(),
            &answer(GATED, v1, &image, live_fail),
        )
        .await
        .expect("live answer");
        pcb_common::publish(
            &env.js,
            pcb_schemas::SUBJECT_SHADOW_DETECTIONS.into(),
            &answer(GATED, v2, &image, shadow_fail),
        )
        .await
        .expect("shadow answer");
    }
    let judged = |g: ShadowGate| {
        let (registry, js) = (registry.clone(), env.js.clone());
        async move {
            let mut corrections = pcb_registry::Corrections::default();
            judge_shadows(&registry, &js, g, &mut corrections)
                .await
                .expect("judged")
        }
    };
    let wait = judged(ShadowGate {
        min_boards: 25,
        ..gate
    })
    .await;
    assert_eq!(wait.len(), 1);
    assert!(!wait[0].1);
    assert!(
        wait[0]
            .2
            .contains("agreed with live v1 on 19 of 20 boards (95.0%); waiting for 25 boards"),
        "{wait:?}"
    );
    let below = judged(ShadowGate {
        min_agreement: 0.96,
        ..gate
    })
    .await;
    assert!(!below[0].1 && below[0].2.ends_with("< 96.0%"), "{below:?}");
    assert_eq!(
        registry.live(GATED).await.expect("live").map(|l| l.version),
        Some(v1)
    );
    let pass = judged(gate).await;
    assert!(pass[0].1, "{pass:?}");
    eprintln!("{}", pass[0].2);
    // Told on pcb.models.events, with the figures.
    let events: Vec<pcb_schemas::ModelEvent> =
        pcb_tests::read_all(&env.js, pcb_schemas::STREAM_TRAINING, "pcb.models.events")
            .await
            .iter()
            .map(|(_, p)| decode(p, None).expect("event"))
            .collect();
    let kinds: Vec<(pcb_schemas::ModelEventKind, u64)> = events
        .iter()
        .filter(|e| e.model.name == GATED && e.kind != pcb_schemas::ModelEventKind::Registered)
        .map(|e| (e.kind, e.model.version))
        .collect();
    use pcb_schemas::ModelEventKind::{NotPromoted, Promoted, Shadowed};
    assert_eq!(
        kinds,
        [
            (Promoted, v1),
            (Shadowed, v2),
            (NotPromoted, v3),
            (Promoted, v2)
        ]
    );
    assert_eq!(
        events.last().and_then(|e| e.reason.as_deref()),
        Some(pass[0].2.as_str())
    );
    assert_eq!(
        registry.live(GATED).await.expect("live").map(|l| l.version),
        Some(v2)
    );
    assert_eq!(registry.shadow(GATED).await.expect("shadow"), None);
    // A shadow a person set is theirs to end: the policy leaves it.
    registry.set_shadow(GATED, v3, "cli").await.expect("shadow");
    assert!(judged(gate).await.is_empty());
}

/// One round of the shadow judge on the one model under test: promoted, and why (printed).
async fn judge(
    registry: &Registry,
    js: &async_nats::jetstream::Context,
    gate: pcb_registry::ShadowGate,
    corrections: &mut pcb_registry::Corrections,
) -> (bool, String) {
    let mut out = pcb_registry::judge_shadows(registry, js, gate, corrections)
        .await
        .expect("judged");
    assert_eq!(out.len(), 1, "{out:?}");
    let (_, promoted, why) = out.remove(0);
    eprintln!("{}: {why}", if promoted { "promoted" } else { "waits" });
    (promoted, why)
}

/// A label revision of `image` as the viewer publishes it on `pcb.images.raw`: `fail` saves
/// one box, `pass` none.
fn revision(image: &str, fail: bool, by: &str) -> pcb_schemas::RawImage {
    let mut r = plain_record(image);
    r.labels = Some(if fail {
        vec![pcb_schemas::BoxLabel::new([1.0, 1.0, 5.0, 5.0], 1, "open")]
    } else {
        vec![]
    });
    r.revision = Some(pcb_schemas::LabelRevision {
        by: by.into(),
        at_ms: 1,
        replaces: None,
        reviewed: None,
        note: None,
        deleted: Vec::new(),
    });
    r
}

/// A board as the ingester publishes it (no revision).
fn plain_record(image: &str) -> pcb_schemas::RawImage {
    pcb_schemas::RawImage {
        image_id: image.into(),
        image: b"not decoded by the registry".to_vec(),
        template: None,
        labels: None,
        label_format: None,
        board_id: image.into(),
        line_id: "line-1".into(),
        source: format!("{image}.jpg"),
        captured_at_ms: 1,
        split_hint: None,
        revision: None,
        image_ref: None,
        template_ref: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shadow_the_corrected_boards_must_find_the_shadow_right_often_enough() {
    use pcb_common::{Identity, IdentityStore};
    use pcb_registry::{CorrectedRule, Corrections, NewVersion, ShadowGate};
    use pcb_schemas::{StageName, SUBJECT_DETECTIONS, SUBJECT_RAW, SUBJECT_SHADOW_DETECTIONS};
    const CORRECTED: &str = "pcb-corrected";
    // A secured server: the registry reads the label revisions as its own identity, with
    // the permissions the topology gives it.
    let env = Env::start_secured().await;
    let base = pcb_common::NatsConfig {
        url: env.server.url(),
        ..Default::default()
    };
    let nats = IdentityStore::connection_of(
        env.identities.as_ref(),
        Identity::Stage(StageName::Registry),
        &base,
    );
    let client = pcb_common::nats::connect_now(&nats, "registry-under-test")
        .await
        .expect("the registry connects");
    let js = async_nats::jetstream::new(client);
    let registry = Registry::open(&js).await.expect("registry");
    // An identity the topology gives no view of the images (the trainer's) cannot read
    // them: the registry's reading rests on its declared input.
    let trainer = IdentityStore::connection_of(
        env.identities.as_ref(),
        Identity::Stage(StageName::Trainer),
        &base,
    );
    let trainer = pcb_common::nats::connect_now(&trainer, "trainer-under-test")
        .await
        .expect("the trainer connects");
    let refused = Corrections::default()
        .update(&async_nats::jetstream::new(trainer))
        .await
        .expect_err("the trainer may not read pcb.images.raw");
    eprintln!("as the trainer: {refused}");
    let meta = || NewVersion {
        origin: "import".into(),
        ..Default::default()
    };
    let v1 = registry
        .register(CORRECTED, b"weights of v1", meta())
        .await
        .expect("v1")
        .version;
    let v2 = registry
        .register(CORRECTED, b"weights of v2", meta())
        .await
        .expect("v2")
        .version;
    registry
        .promote(CORRECTED, v1, "policy")
        .await
        .expect("live");
    registry
        .set_shadow(CORRECTED, v2, "policy")
        .await
        .expect("shadow");

    // 20 boards both answered; they disagree on img00 and img01 (90% agreement).
    let verdicts = |i: usize| {
        let live_fail = i.is_multiple_of(2);
        let shadow_fail = if i < 2 { !live_fail } else { live_fail };
        (live_fail, shadow_fail)
    };
    for i in 0..20 {
        let image = format!("img{i:02}");
        let (live_fail, shadow_fail) = verdicts(i);
        pcb_common::publish(
            &env.js,
            SUBJECT_DETECTIONS.into(),
            &answer(CORRECTED, v1, &image, live_fail),
        )
        .await
        .expect("live answer");
        pcb_common::publish(
            &env.js,
            SUBJECT_SHADOW_DETECTIONS.into(),
            &answer(CORRECTED, v2, &image, shadow_fail),
        )
        .await
        .expect("shadow answer");
    }
    // Corrections: the label revisions of some boards, among boards as the ingester sends
    // them (no revision: not a correction) and a revision of a board neither answered.
    let correct = |image: String, fail: bool| {
        let js = env.js.clone();
        async move {
            pcb_common::publish(&js, SUBJECT_RAW.into(), &revision(&image, fail, "ana"))
                .await
                .expect("revision stored");
        }
    };
    for i in 0..20 {
        pcb_common::publish(
            &env.js,
            SUBJECT_RAW.into(),
            &plain_record(&format!("img{i:02}")),
        )
        .await
        .expect("board stored");
    }
    correct("img99".into(), true).await;
    // img00 and img01 corrected to the live verdict, img02..img04 to the one both gave.
    for i in 0..5 {
        correct(format!("img{i:02}"), verdicts(i).0).await;
    }
    let gate = ShadowGate {
        min_boards: 20,
        min_agreement: 0.9,
        min_corrected: 8,
        ..ShadowGate::default()
    };
    let mut corrections = Corrections::default();
    let (promoted, why) = judge(&registry, &js, gate, &mut corrections).await;
    assert!(!promoted);
    assert!(
        why.contains("on 5 corrected boards shadow right on 3 (60.0%), live on 5 (100.0%); waiting for 8 corrected boards"),
        "{why}"
    );
    // Three more, to the verdict both gave: 8 corrected boards; the live one right on all
    // 8, the shadow on 6.
    for i in 5..8 {
        correct(format!("img{i:02}"), verdicts(i).0).await;
    }
    let (promoted, why) = judge(&registry, &js, gate, &mut corrections).await;
    assert!(!promoted);
    assert!(
        why.contains("on 8 corrected boards shadow right on 6 (75.0%), live on 8 (100.0%): the shadow version is right less often"),
        "{why}"
    );
    let (promoted, why) = judge(
        &registry,
        &js,
        ShadowGate {
            corrected_rule: CorrectedRule::MinAccuracy,
            min_corrected_accuracy: 0.8,
            ..gate
        },
        &mut corrections,
    )
    .await;
    assert!(
        !promoted && why.ends_with("(75.0%), live on 8 (100.0%) < 80.0%"),
        "{why}"
    );
    assert_eq!(
        registry
            .live(CORRECTED)
            .await
            .expect("live")
            .map(|l| l.version),
        Some(v1)
    );
    // A second look at img00 and img01: the shadow version was right. The latest revision
    // of a board is its truth.
    for i in 0..2 {
        correct(format!("img{i:02}"), verdicts(i).1).await;
    }
    let (promoted, why) = judge(&registry, &js, gate, &mut corrections).await;
    assert!(promoted, "{why}");
    assert!(
        why.contains("on 8 corrected boards shadow right on 8 (100.0%), live on 6 (75.0%): not worse than live on ≥ 8 corrected boards"),
        "{why}"
    );
    assert_eq!(corrections.len(), 9, "img00..img07 and img99");
    assert_eq!(
        registry
            .live(CORRECTED)
            .await
            .expect("live")
            .map(|l| l.version),
        Some(v2)
    );
    assert_eq!(registry.shadow(CORRECTED).await.expect("shadow"), None);
}
