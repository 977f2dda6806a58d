//! A canary version, as real processes over a secured nats-server: `pcb models canary
//! NAME@V --share 0.25` lets it answer the boards whose id hashes below 0.25, for real (on
//! `pcb.detections` with its version, verdicts to the line), and the live version the rest,
//! every board exactly once; `--line` gives it one line's boards only; the viewer's Models
//! API counts what each answered; promoting the canary ends it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use pcb_registry::{board_unit, Registry};
use pcb_schemas::{Detection, ModelEventKind, Verdict, STREAM_DETECTIONS, SUBJECT_DETECTIONS};
use pcb_tests::models::{
    admin_pipeline, detections_of, http_get, model_events, models_entry, pcb_models, pcb_models_try,
};
use pcb_tests::{wait_until, Env};

const MODEL: &str = "pcb-canary";
const BOARDS: u64 = 80;
const SHARE: f64 = 0.25;

/// Imports `dir` once with the in-process ingester, every board on `line`.
async fn import_on(env: &Env, dir: &std::path::Path, line: &str) {
    let cfg: pcb_ingester::FileConfig = toml::from_str(&env.base_config("")).expect("toml");
    let mut s = cfg.validate().expect("valid").config;
    s.file.watch_dir = dir.to_path_buf();
    s.file.line_id = line.into();
    pcb_ingester::import(
        env.js.clone(),
        s,
        env.client.server_info().max_payload,
        false,
        |_, _| {},
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_answers_its_share_of_boards_for_real_and_the_live_version_the_rest() {
    let env = Env::start_secured().await;
    let registry = Registry::open(&env.js).await.expect("registry");
    let v1 = pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), 1).await;
    let v2 = pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), 2).await;
    registry.promote(MODEL, v1, "test").await.expect("promote");

    let pipeline = admin_pipeline(&env);
    let (ok, said) = pcb_models_try(
        &pipeline,
        &["canary", &format!("{MODEL}@{v1}"), "--share", "0.25"],
    );
    assert!(!ok && said.contains("is the live version"), "{said}");
    let (ok, said) = pcb_models_try(
        &pipeline,
        &["canary", &format!("{MODEL}@{v2}"), "--share", "1.5"],
    );
    assert!(!ok && said.contains("not above 0 and at most 1"), "{said}");
    let said = pcb_models(
        &pipeline,
        &["canary", &format!("{MODEL}@{v2}"), "--share", "0.25"],
    );
    assert!(said.contains("answers 25.0% of the boards"), "{said}");
    let listed = pcb_models(&pipeline, &["list", MODEL]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with('+') && l.contains(MODEL)),
        "the canary is marked:\n{listed}"
    );

    // Line-side verdicts, live on core NATS, by model: counted from before the first board.
    let verdicts: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Default::default();
    let n_verdicts = Arc::new(AtomicU64::new(0));
    let mut sub = env.client.subscribe("pcb.verdicts.>").await.expect("sub");
    env.client.flush().await.expect("flush");
    let (got, n) = (verdicts.clone(), n_verdicts.clone());
    let counter = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                got.lock().expect("lock").push(v);
            }
            n.fetch_add(1, Ordering::SeqCst);
        }
    });

    let metrics_port = pcb::server::free_port().expect("port");
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    let (mut det, det_log) = pcb_tests::spawn_detector_serving(
        &env,
        "det",
        &format!(
            "model_name = {MODEL:?}\nmax_batch = 8\nmax_wait_ms = 20\nthreads = 1\n\
             ack_wait_secs = 10\nreport_threshold = 0.0\nfail_threshold = 0.95\n"
        ),
        &metrics.to_string(),
    );
    let log = || std::fs::read_to_string(&det_log).unwrap_or_default();
    let loaded = wait_until(Duration::from_secs(120), || async {
        let e = model_events(&env).await;
        let live = e.iter().any(|e| {
            e.kind == ModelEventKind::Loaded && e.model.version == v1 && e.reason.is_none()
        });
        let canary = e.iter().any(|e| {
            e.kind == ModelEventKind::Loaded
                && e.model.version == v2
                && e.reason.as_deref() == Some("as the canary version, for 25.0% of the boards")
        });
        live && canary
    })
    .await;
    assert!(
        loaded,
        "the detector did not load both versions:\n{}",
        log()
    );
    let kinds: Vec<ModelEventKind> = model_events(&env).await.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&ModelEventKind::Canaried), "{kinds:?}");

    let viewer = env.start_viewer("").await;
    let addr = viewer.addr;

    let stop = pcb_common::Shutdown::new();
    let enc = env.spawn_stage::<pcb_encoder::Encoder>("", &stop);
    let boards = env.dir.path().join("boards");
    pcb_tests::synth_sized(&boards, BOARDS as usize, 7, 64, 0.2);
    import_on(&env, &boards, "line-a").await;
    let done = wait_until(Duration::from_secs(300), || async {
        env.count(STREAM_DETECTIONS, SUBJECT_DETECTIONS).await >= BOARDS
            && n_verdicts.load(Ordering::SeqCst) >= BOARDS
    })
    .await;
    assert!(done, "not {BOARDS} answers:\n{}", log());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Every board exactly once, by the version the hash rule names.
    let all = detections_of(env.read_all(STREAM_DETECTIONS, SUBJECT_DETECTIONS).await);
    let ids: BTreeSet<&str> = all.iter().map(|d| d.image_id.as_str()).collect();
    assert_eq!(
        (all.len(), ids.len()),
        (BOARDS as usize, BOARDS as usize),
        "one answer per board"
    );
    let wrong: Vec<(String, u64, f64)> = all
        .iter()
        .filter(|d| (d.model.version == v2) != (board_unit(&d.board_id) < SHARE))
        .map(|d| (d.board_id.clone(), d.model.version, board_unit(&d.board_id)))
        .collect();
    assert!(
        wrong.is_empty(),
        "answered against the hash rule: {wrong:?}"
    );
    assert!(all
        .iter()
        .all(|d| d.model.version == v1 || d.model.version == v2));
    let by_canary: Vec<&Detection> = all.iter().filter(|d| d.model.version == v2).collect();
    let share = by_canary.len() as f64 / BOARDS as f64;
    assert!((0.15..=0.35).contains(&share), "canary share {share}");
    // The lines got every board's verdict, the canary's with its version.
    assert_eq!(n_verdicts.load(Ordering::SeqCst), BOARDS);
    let line_models: BTreeMap<String, String> = verdicts
        .lock()
        .expect("lock")
        .iter()
        .map(|v| {
            (
                v["image_id"].as_str().unwrap_or_default().to_string(),
                v["model"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for d in &all {
        assert_eq!(
            line_models.get(&d.image_id).map(String::as_str),
            Some(format!("{MODEL}@{}", d.model.version).as_str()),
            "the line got {}'s verdict from its answering version",
            d.image_id
        );
    }
    let fails = |v: u64| {
        all.iter()
            .filter(|d| d.model.version == v && d.verdict == Verdict::Fail)
            .count() as u64
    };
    let canary_n = by_canary.len() as u64;
    let live_n = BOARDS - canary_n;

    // The Models page: what each answered since the canary was set.
    let counted = wait_until(Duration::from_secs(60), || async {
        let m = models_entry(addr, MODEL).await;
        m["canary"]["canary"]["boards"] == canary_n && m["canary"]["live"]["boards"] == live_n
    })
    .await;
    let m = models_entry(addr, MODEL).await;
    assert!(counted, "the viewer did not count {BOARDS} boards: {m}");
    let ca = &m["canary"];
    assert_eq!(ca["version"], v2);
    assert_eq!(ca["rule"]["share"], SHARE);
    assert_eq!(ca["canary"]["failed"], fails(v2), "{ca}");
    assert_eq!(ca["live"]["failed"], fails(v1), "{ca}");
    assert!(
        ca["canary"]["accuracy"].is_null(),
        "no corrected board: {ca}"
    );
    // The same figures on the Models page, in headless Chromium.
    let page = pcb_tests::browser("models", &format!("http://{addr}/"), &serde_json::json!({}));
    let pct = |failed: u64, n: u64| format!("{:.1}%", failed as f64 * 100.0 / n as f64);
    let row = |who: &str| {
        page["rows"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["who"] == who).cloned())
            .unwrap_or_default()
    };
    let (c_row, l_row) = (row("canary"), row("live"));
    println!(
        "Models page: {}; canary row {c_row}; live row {l_row}",
        page["heading"]
    );
    assert_eq!(page["error"], "", "{page}");
    assert_eq!(page["page_errors"], serde_json::json!([]), "{page}");
    assert!(
        page["heading"]
            .as_str()
            .is_some_and(|h| h.starts_with(&format!("Canary @{v2} for"))),
        "{page}"
    );
    assert_eq!(
        page["badges"], 1,
        "the canary version is marked once: {page}"
    );
    // Each row: its version, the boards it answered and the stream's fail rate; no board
    // corrected, so no accuracy.
    for (row, v, n) in [(&c_row, v2, canary_n), (&l_row, v1, live_n)] {
        let seen = (
            &row["version"],
            &row["boards"],
            &row["fail_rate"],
            &row["accuracy"],
        );
        let want = (
            format!("@{v}"),
            n.to_string(),
            pct(fails(v), n),
            "–".to_string(),
        );
        assert_eq!(
            seen,
            (
                &serde_json::json!(want.0),
                &serde_json::json!(want.1),
                &serde_json::json!(want.2),
                &serde_json::json!(want.3)
            ),
            "{page}"
        );
    }
    println!(
        "{BOARDS} boards at share {SHARE}: canary v{v2} answered {canary_n} ({:.1}%, fail rate {:.1}%), live v{v1} {live_n} (fail rate {:.1}%); all {BOARDS} match the hash rule",
        share * 100.0,
        fails(v2) as f64 * 100.0 / canary_n.max(1) as f64,
        fails(v1) as f64 * 100.0 / live_n.max(1) as f64,
    );

    // One line: the same version, another rule (no reload).
    let said = pcb_models(
        &pipeline,
        &["canary", &format!("{MODEL}@{v2}"), "--line", "line-b"],
    );
    assert!(said.contains("answers line line-b"), "{said}");
    let ruled = wait_until(Duration::from_secs(30), || async {
        log().contains("canary rule changed")
    })
    .await;
    assert!(ruled, "the detector did not take the new rule:\n{}", log());
    let (a, b) = (env.dir.path().join("on-a"), env.dir.path().join("on-b"));
    pcb_tests::synth_sized(&a, 10, 8, 64, 0.2);
    pcb_tests::synth_sized(&b, 10, 9, 64, 0.2);
    import_on(&env, &a, "line-a").await;
    import_on(&env, &b, "line-b").await;
    let answered = env
        .wait_count(
            STREAM_DETECTIONS,
            SUBJECT_DETECTIONS,
            BOARDS + 20,
            Duration::from_secs(120),
        )
        .await;
    assert!(answered, "20 more boards not answered:\n{}", log());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = detections_of(env.read_all(STREAM_DETECTIONS, SUBJECT_DETECTIONS).await);
    let later = &all[BOARDS as usize..];
    assert_eq!(later.len(), 20, "one answer per board");
    let by_line: BTreeMap<(String, u64), usize> = later.iter().fold(BTreeMap::new(), |mut m, d| {
        *m.entry((d.line_id.clone(), d.model.version)).or_default() += 1;
        m
    });
    println!("--line line-b: answers by (line, version): {by_line:?}");
    assert_eq!(
        by_line,
        BTreeMap::from([
            (("line-a".to_string(), v1), 10),
            (("line-b".to_string(), v2), 10)
        ])
    );

    // Uncanaried by hand: told on pcb.models.events, and the detector drops it.
    let said = pcb_models(&pipeline, &["uncanary", MODEL]);
    assert!(said.contains("no longer answers as a canary"), "{said}");
    let ended = |n: usize| {
        let log = &log;
        async move {
            wait_until(Duration::from_secs(30), || async {
                log().matches("canary ended").count() >= n
            })
            .await
        }
    };
    assert!(ended(1).await, "the detector kept the canary:\n{}", log());
    let kinds: Vec<ModelEventKind> = model_events(&env).await.iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&ModelEventKind::Uncanaried), "{kinds:?}");
    // Promoting the canary version ends its canary.
    pcb_models(
        &pipeline,
        &["canary", &format!("{MODEL}@{v2}"), "--share", "0.5"],
    );
    pcb_models(&pipeline, &["promote", &format!("{MODEL}@{v2}")]);
    assert_eq!(registry.canary(MODEL).await.expect("canary"), None);
    assert!(
        ended(2).await,
        "the detector kept the promoted canary:\n{}",
        log()
    );
    let said = pcb_models(&pipeline, &["uncanary", MODEL]);
    assert!(said.contains("has no canary version"), "{said}");

    // A canary that does not load: its boards go to the live version (now v2).
    let v3 = pcb_tests::register_random_model(&registry, MODEL, env.dir.path(), 3).await;
    let v3_meta = registry.version(MODEL, v3).await.expect("v3");
    registry
        .overwrite_weights(&v3_meta, b"not the registered weights")
        .await
        .expect("corrupt v3");
    pcb_models(
        &pipeline,
        &["canary", &format!("{MODEL}@{v3}"), "--share", "1"],
    );
    let refused = wait_until(Duration::from_secs(60), || async {
        model_events(&env).await.iter().any(|e| {
            e.kind == ModelEventKind::LoadFailed
                && e.model.version == v3
                && e.reason.as_deref().is_some_and(|r| {
                    r.starts_with("as the canary version")
                        && r.ends_with("the live version answers its boards")
                })
        })
    })
    .await;
    assert!(
        refused,
        "no load-failed event for the corrupt canary:\n{}",
        log()
    );
    let five = env.dir.path().join("five");
    pcb_tests::synth_sized(&five, 5, 10, 64, 0.2);
    import_on(&env, &five, "line-a").await;
    let answered = env
        .wait_count(
            STREAM_DETECTIONS,
            SUBJECT_DETECTIONS,
            BOARDS + 25,
            Duration::from_secs(120),
        )
        .await;
    assert!(answered, "5 more boards not answered:\n{}", log());
    let all = detections_of(env.read_all(STREAM_DETECTIONS, SUBJECT_DETECTIONS).await);
    let last: Vec<u64> = all[BOARDS as usize + 20..]
        .iter()
        .map(|d| d.model.version)
        .collect();
    assert_eq!(
        last, [v2; 5],
        "the live version answers the canary's boards"
    );

    // The detector's counters: every board the canary answered (its share, then line-b's
    // 10), and the 5 the live version answered in its place.
    let (status, text) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    let metric = |outcome: &str| {
        let key = format!("pcb_messages_total{{stage=\"detector\",outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let (answered, fallback) = (metric("canary-answered"), metric("canary-fallback"));
    println!("/metrics: canary-answered {answered:?}, canary-fallback {fallback:?}");
    assert_eq!(answered, Some(canary_n + 10), "{text}");
    assert_eq!(fallback, Some(5), "{text}");

    stop.trigger();
    let _ = enc.await;
    viewer.stop().await;
    counter.abort();
    let _ = det.kill();
    let _ = det.wait();
}
