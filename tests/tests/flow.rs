//! 200 boards dropped while the pipeline runs: each image once in every stream, nothing
//! new when dropped again, and the same split and shard from an empty store.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use pcb_schemas::{decode, ShardRecord, Split, STREAM_IMAGES, STREAM_SHARDS};
use pcb_tests::{drop_into, stop_stages, synth, wait_until, Env};

async fn run_once(sample: &std::path::Path, drop_twice: bool) -> BTreeMap<String, (Split, u32)> {
    let env = Env::start().await;
    let (shutdown, mut handles) = env.start_encoder_router();
    handles.push(env.start_ingester(&shutdown));
    assert_eq!(drop_into(sample, &env.watch_dir()), 602);
    let done = wait_until(Duration::from_secs(180), || async {
        env.count(STREAM_SHARDS, "pcb.shards.").await >= 200
            && pcb::pairing_count(&env.watch_dir()) == 0
    })
    .await;
    assert!(
        done,
        "not all 200 boards reached the shards: images {:?}, shards {}, left in the watched folder {:?}",
        env.subject_counts(STREAM_IMAGES).await,
        env.count(STREAM_SHARDS, "pcb.shards.").await,
        pcb_ingester::pairing::scan(&env.watch_dir(), &[env.watch_dir().join("processed"), env.watch_dir().join("rejected")]).iter().take(5).collect::<Vec<_>>()
    );
    let images = env.subject_counts(STREAM_IMAGES).await;
    assert_eq!(images.get("pcb.images.raw"), Some(&200));
    assert_eq!(images.get("pcb.images.encoded"), Some(&200));

    if drop_twice {
        // The same files again, as an operator re-dropping a batch would.
        drop_into(sample, &env.watch_dir());
        let filed = wait_until(Duration::from_secs(120), || async {
            pcb::pairing_count(&env.watch_dir()) == 0
        })
        .await;
        assert!(filed, "re-dropped files were not filed away");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let images = env.subject_counts(STREAM_IMAGES).await;
        assert_eq!(
            images.get("pcb.images.raw"),
            Some(&200),
            "re-drop stored new raw records"
        );
        assert_eq!(images.get("pcb.images.encoded"), Some(&200));
        assert_eq!(env.count(STREAM_SHARDS, "pcb.shards.").await, 200);
    }

    let records = env.read_all(STREAM_SHARDS, "pcb.shards.>").await;
    assert_eq!(records.len(), 200);
    let mut placement = BTreeMap::new();
    for (subject, payload) in records {
        let r: ShardRecord = decode(&payload, None).expect("shard record");
        assert_eq!(subject, format!("pcb.shards.{}", r.shard));
        assert!(r.record.labels.is_some());
        assert!(
            placement
                .insert(r.record.image_id.clone(), (r.split, r.shard))
                .is_none(),
            "image twice"
        );
    }
    let ids: HashSet<_> = placement.keys().collect();
    assert_eq!(ids.len(), 200);
    // The DeepPCB lists written by the generator decide the split.
    let val = placement.values().filter(|(s, _)| *s == Split::Val).count();
    assert_eq!(val, 40, "test.txt lists 20% of 200 boards");

    stop_stages(&shutdown, handles).await;
    placement
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn boards_flow_once_and_land_in_stable_shards() {
    let sample = tempfile::tempdir().expect("tempdir");
    synth(sample.path(), 200, 42);
    let first = run_once(sample.path(), true).await;
    let second = run_once(sample.path(), false).await;
    assert_eq!(
        first, second,
        "split or shard changed between runs from an empty store"
    );
}
