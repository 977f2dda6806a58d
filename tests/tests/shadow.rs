//! A shadow version beside the live one, as real processes over a secured nats-server:
//! `pcb models shadow` marks it, the detector runs both on 100 boards, the shadow's 100
//! answers are on `pcb.shadow.detections` only (`pcb.detections` and the line-side verdicts
//! hold the live ones), the viewer's Models API reports their agreement, and `pcb models
//! unshadow` ends the shadow period.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pcb_registry::Registry;
use pcb_schemas::{
    Detection, ModelEventKind, Verdict, STREAM_DETECTIONS, STREAM_SHADOW, SUBJECT_DETECTIONS,
    SUBJECT_SHADOW_DETECTIONS,
};
use pcb_tests::models::{
    admin_pipeline, detections_of, model_events, models_entry, pcb_models, pcb_models_try,
};
use pcb_tests::{wait_until, Env};

const MODEL: &str = "pcb-shadow";
const BOARDS: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_version_answers_every_board_on_its_own_subject_and_the_models_page_compares() {
    // Each process is its own identity, held to what the topology gives it.
    let env = Env::start_secured().await;
    let registry = Registry::open(&env.js).await.expect("registry");
    let v1 = pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), 1).await;
    let v2 = pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), 2).await;
    registry.promote(MODEL, v1, "test").await.expect("promote");

    // `pcb models` as the admin identity, from a pipeline file naming the identities.
    let pipeline = admin_pipeline(&env);
    let (ok, said) = pcb_models_try(&pipeline, &["shadow", &format!("{MODEL}@{v1}")]);
    assert!(
        !ok && said.contains("is the live version"),
        "the live version cannot be its own shadow: {said}"
    );
    let said = pcb_models(&pipeline, &["shadow", &format!("{MODEL}@{v2}")]);
    assert!(said.contains("runs in shadow"), "{said}");
    let listed = pcb_models(&pipeline, &["list", MODEL]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with('~') && l.contains(MODEL)),
        "the shadow version is marked:\n{listed}"
    );

    // Line-side verdicts, live on core NATS: counted from before the first board.
    let verdicts = Arc::new(AtomicU64::new(0));
    let mut sub = env.client.subscribe("pcb.verdicts.>").await.expect("sub");
    env.client.flush().await.expect("flush");
    let counted = verdicts.clone();
    let counter = tokio::spawn(async move {
        while sub.next().await.is_some() {
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });

    // The two random versions' best scores differ (v1's mostly 0.8 to 0.97, v2's above
    // 0.98): at 0.95 the live version passes most boards and the shadow fails them, so
    // the comparison has both agreements and changes.
    let (mut det, det_log) =
        pcb_tests::spawn_detector_with(&env, "det", MODEL, "fail_threshold = 0.95\n");
    let log = || std::fs::read_to_string(&det_log).unwrap_or_default();
    // The shadow must be loaded before the first board, or that board has no shadow answer.
    let loaded = wait_until(Duration::from_secs(120), || async {
        let e = model_events(&env).await;
        let has = |v: u64, shadow: bool| {
            e.iter().any(|e| {
                e.kind == ModelEventKind::Loaded
                    && e.model.version == v
                    && e.reason.as_deref() == shadow.then_some("as the shadow version")
            })
        };
        has(v1, false) && has(v2, true)
    })
    .await;
    assert!(
        loaded,
        "the detector did not load both versions:\n{}",
        log()
    );
    let kinds: Vec<ModelEventKind> = model_events(&env).await.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&ModelEventKind::Shadowed), "{kinds:?}");

    let viewer = env.start_viewer("").await;
    let addr = viewer.addr;

    let stop = pcb_common::Shutdown::new();
    let enc = env.spawn_stage::<pcb_encoder::Encoder>("", &stop);
    let boards = env.dir.path().join("boards");
    pcb_tests::synth_sized(&boards, BOARDS as usize, 7, 64, 0.2);
    env.import(&boards).await;
    let done = wait_until(Duration::from_secs(300), || async {
        env.count(STREAM_DETECTIONS, SUBJECT_DETECTIONS).await >= BOARDS
            && env.count(STREAM_SHADOW, SUBJECT_SHADOW_DETECTIONS).await >= BOARDS
            && verdicts.load(Ordering::SeqCst) >= BOARDS
    })
    .await;
    assert!(done, "not {BOARDS} live and shadow answers:\n{}", log());
    // Anything extra would have arrived by now.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let live = detections_of(env.read_all(STREAM_DETECTIONS, SUBJECT_DETECTIONS).await);
    let shadow = detections_of(env.read_all(STREAM_SHADOW, SUBJECT_SHADOW_DETECTIONS).await);
    let live_ids: BTreeSet<&str> = live.iter().map(|d| d.image_id.as_str()).collect();
    let shadow_ids: BTreeSet<&str> = shadow.iter().map(|d| d.image_id.as_str()).collect();
    assert_eq!(
        (live.len(), live_ids.len()),
        (100, 100),
        "one live answer per board"
    );
    assert_eq!(
        (shadow.len(), shadow_ids.len()),
        (100, 100),
        "one shadow answer per board"
    );
    assert_eq!(live_ids, shadow_ids, "the same images");
    assert!(
        live.iter().all(|d| d.model.version == v1),
        "pcb.detections holds the live version's answers only"
    );
    assert!(shadow.iter().all(|d| d.model.version == v2));
    assert_eq!(
        verdicts.load(Ordering::SeqCst),
        BOARDS,
        "the lines got the live verdicts only"
    );

    // The truth, from the two subjects.
    let live_by: BTreeMap<&str, &Detection> =
        live.iter().map(|d| (d.image_id.as_str(), d)).collect();
    let changed: BTreeSet<&str> = shadow
        .iter()
        .filter(|s| live_by[s.image_id.as_str()].verdict != s.verdict)
        .map(|s| s.image_id.as_str())
        .collect();
    let agree = BOARDS - changed.len() as u64;
    let mut classes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for d in &live {
        for x in &d.defects {
            classes.entry(x.class.clone()).or_default().0 += 1;
        }
    }
    for d in &shadow {
        for x in &d.defects {
            classes.entry(x.class.clone()).or_default().1 += 1;
        }
    }

    let compared = wait_until(Duration::from_secs(60), || async {
        models_entry(addr, MODEL).await["shadow"]["comparison"]["boards"] == BOARDS
    })
    .await;
    let m = models_entry(addr, MODEL).await;
    assert!(compared, "the viewer did not compare {BOARDS} boards: {m}");
    let c = &m["shadow"]["comparison"];
    assert_eq!(m["live"], v1);
    assert_eq!(m["shadow"]["version"], v2);
    assert_eq!(c["agree"], agree, "{c}");
    assert_eq!(c["changed"], changed.len() as u64, "{c}");
    assert!(
        !changed.is_empty() && agree > 0,
        "both agreements and changes to compare: {c}"
    );
    let agreement = c["agreement"].as_f64().expect("an agreement");
    assert!(
        (agreement - agree as f64 / BOARDS as f64).abs() < 1e-9,
        "{c}"
    );
    for b in c["changed_boards"].as_array().expect("list") {
        let id = b["image_id"].as_str().expect("id");
        assert!(changed.contains(id), "{id} did not change");
        assert_eq!(b["live"], live_by[id].verdict.as_str());
        assert_ne!(b["live"], b["shadow"]);
    }
    let per_class: BTreeMap<String, (u64, u64)> = c["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .map(|k| {
            (
                k["class"].as_str().expect("class").to_string(),
                (
                    k["live"].as_u64().expect("n"),
                    k["shadow"].as_u64().expect("n"),
                ),
            )
        })
        .collect();
    assert_eq!(per_class, classes, "defects per class, live and shadow");
    let fails = live.iter().filter(|d| d.verdict == Verdict::Fail).count();
    println!(
        "{BOARDS} boards: live v{v1} {fails} fail; shadow v{v2} agreement {:.1}% ({agree}/{BOARDS}), {} would change",
        agreement * 100.0,
        changed.len()
    );

    // Unshadowed: the next boards get live answers only.
    let said = pcb_models(&pipeline, &["unshadow", MODEL]);
    assert!(said.contains("no longer runs in shadow"), "{said}");
    let stopped = wait_until(Duration::from_secs(30), || async {
        log().contains("shadow period ended")
    })
    .await;
    assert!(stopped, "the detector kept the shadow:\n{}", log());
    let more = env.dir.path().join("more");
    pcb_tests::synth_sized(&more, 10, 8, 64, 0.2);
    env.import(&more).await;
    let answered = env
        .wait_count(
            STREAM_DETECTIONS,
            SUBJECT_DETECTIONS,
            BOARDS + 10,
            Duration::from_secs(120),
        )
        .await;
    assert!(answered, "10 more boards not answered:\n{}", log());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.count(STREAM_SHADOW, SUBJECT_SHADOW_DETECTIONS).await,
        BOARDS,
        "no shadow answers once unshadowed"
    );
    assert!(models_entry(addr, MODEL).await["shadow"].is_null());

    stop.trigger();
    let _ = enc.await;
    viewer.stop().await;
    counter.abort();
    let _ = det.kill();
    let _ = det.wait();
}
