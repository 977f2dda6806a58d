//! The registry's live alias under concurrent changes: promotions from several operators at
//! once (the viewer, `pcb models`, the registry stage) each land, and none is lost from the
//! history, because every change of the live key is a compare-and-set on its KV revision.

use std::collections::BTreeSet;

use pcb_registry::Registry;
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
