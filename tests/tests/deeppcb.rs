//! The real DeepPCB dataset (when `../shared/datasets/deeppcb` is present) imported through
//! the pipeline: every pair published, encoded and routed, its split taken from the
//! dataset's own `trainval.txt` / `val.txt`.

use std::path::Path;
use std::time::Duration;

use pcb_schemas::{decode, ShardRecord, Split, STREAM_SHARDS};
use pcb_tests::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deeppcb_imports_with_its_own_split() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/datasets/deeppcb");
    if !data.join("trainval.txt").is_file() {
        eprintln!(
            "SKIPPED: DeepPCB not found at {} (see README, Data)",
            data.display()
        );
        return;
    }
    let env = Env::start().await;
    let (shutdown, handles) = env.start_encoder_router();
    let summary = env.import(&data).await;
    assert_eq!(summary.published, 1250, "{summary}");
    assert_eq!(summary.rejected_total(), 0, "{summary}");
    let done = env
        .wait_count(STREAM_SHARDS, "pcb.shards.", 1250, Duration::from_secs(300))
        .await;
    assert!(
        done,
        "routed {}",
        env.count(STREAM_SHARDS, "pcb.shards.").await
    );
    shutdown.trigger();
    for h in handles {
        let _ = h.await;
    }
    let records = env.read_all(STREAM_SHARDS, "pcb.shards.>").await;
    let val = records
        .iter()
        .filter(|(_, p)| decode::<ShardRecord>(p, None).expect("record").split == Split::Val)
        .count();
    assert_eq!((records.len(), val), (1250, 250));
    let first: ShardRecord = decode(&records[0].1, None).expect("record");
    assert_eq!((first.record.width, first.record.height), (640, 640));
    assert!(first.record.template_b64.is_some());
}
