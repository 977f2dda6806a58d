//! The image files' bucket (`pcb_image_files`, issue 17 item 5 follow-ups): its size is a
//! pipeline setting that `pcb init` applies to an existing bucket (never below what it
//! holds); the housekeeping deletes exactly the files that no record names and that are
//! older than the grace period, as the `keeper` identity; and two writers storing the same
//! file at once (two ingester replicas) leave one whole copy, no stray chunks.

use std::time::Duration;

use async_nats::jetstream;
use pcb_common::topology::Provisioned;
use pcb_common::{FilesError, Identity, ImageFiles, Topology};
use pcb_schemas::{
    encode, headers_for, EncodedImage, ObjectRef, RawImage, ShardRecord, Split,
    OBJECTS_IMAGE_FILES, STREAM_IMAGES, SUBJECT_RAW,
};
use pcb_tests::Env;

const BUCKET_STREAM: &str = "OBJ_pcb_image_files";

/// `n` bytes no other call returns (a file of its own, several chunks long).
fn file(tag: u8, n: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9u32 ^ u32::from(tag).wrapping_mul(2_654_435_761);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

async fn bucket_state(js: &jetstream::Context) -> (i64, u64, u64) {
    let mut s = js.get_stream(BUCKET_STREAM).await.expect("bucket stream");
    let info = s.info().await.expect("info");
    (info.config.max_bytes, info.state.bytes, info.state.messages)
}

/// A JetStream context as `id` on the secured server of `env`.
async fn js_as(env: &Env, id: Identity) -> jetstream::Context {
    let ids = env.identities.as_ref().expect("a secured server");
    let nats = ids.connection(
        id,
        &pcb_common::NatsConfig {
            url: env.server.url(),
            ..Default::default()
        },
    );
    let client = pcb_common::nats::connect_now(&nats, id.name())
        .await
        .expect("connect");
    jetstream::new(client)
}

fn raw_naming(image: &ObjectRef, template: Option<&ObjectRef>, board: &str) -> RawImage {
    RawImage {
        image_id: image.sha256.clone(),
        image: Vec::new(),
        template: None,
        labels: None,
        label_format: None,
        board_id: board.into(),
        line_id: "line-1".into(),
        source: format!("{board}.tiff"),
        captured_at_ms: 1,
        split_hint: None,
        revision: None,
        image_ref: Some(image.clone()),
        template_ref: template.cloned(),
    }
}

/// Publishes `msg` on `subject` as a stage would; returns its stream sequence.
async fn publish<T: pcb_schemas::Envelope>(js: &jetstream::Context, subject: &str, msg: &T) -> u64 {
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in headers_for(msg) {
        headers.insert(k, v.as_str());
    }
    js.publish_with_headers(
        subject.to_string(),
        headers,
        encode(msg).expect("encode").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored")
    .sequence
}

/// Every object's size and chunk count, and how many messages the bucket's stream should
/// then hold: each live object's chunks and metadata, and a metadata per deleted one.
async fn expected_messages(files: &ImageFiles) -> u64 {
    files
        .list()
        .await
        .expect("list")
        .iter()
        .map(|m| 1 + m.info.chunks as u64)
        .sum()
}

#[tokio::test]
async fn the_bucket_size_is_a_setting_that_init_applies_to_an_existing_bucket() {
    let env = Env::start().await;
    // Provisioned with the defaults: 8 GiB.
    assert_eq!(bucket_state(&env.js).await.0, 8 << 30);

    // `pcb init` with a pipeline file that sets another size resizes the bucket in place.
    let pipeline = env.dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        "[streams.image_files]\nmax_bytes = 67108864\ncleanup_grace_secs = 900\n",
    )
    .expect("pipeline file");
    let init = |pipeline: &std::path::Path| {
        let out = std::process::Command::new(pcb_tests::bin("pcb"))
            .args(["init", "--nats-url", &env.server.url(), "--pipeline"])
            .arg(pipeline)
            .env_remove("PCB_PIPELINE")
            .output()
            .expect("pcb init");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, said) = init(&pipeline);
    assert!(ok, "{said}");
    assert!(
        said.lines()
            .any(|l| l.contains("pcb_image_files") && l.contains("updated")),
        "{said}"
    );
    assert_eq!(bucket_state(&env.js).await.0, 64 << 20);
    let (ok, said) = init(&pipeline);
    assert!(ok, "{said}");
    assert!(
        said.lines()
            .any(|l| l.contains("pcb_image_files") && l.contains("unchanged")),
        "{said}"
    );

    // Never below what it holds: that would delete stored chunks.
    let files = ImageFiles::open(&env.js).await.expect("bucket");
    files.put(&file(1, 3 << 20)).await.expect("put");
    let (_, held, _) = bucket_state(&env.js).await;
    assert!(held > 3 << 20, "{held}");
    let mut small = Topology::default();
    small.image_files.max_bytes = 1 << 20;
    let err = pcb_common::provision(&env.js, &small, &[])
        .await
        .expect_err("a cap below what the bucket holds is refused");
    assert!(
        err.to_string().contains(BUCKET_STREAM) && err.to_string().contains("max_bytes"),
        "{err}"
    );
    assert_eq!(bucket_state(&env.js).await.0, 64 << 20, "left as it was");

    // A bad value is refused with its key, with every other problem of the file.
    std::fs::write(
        &pipeline,
        "[streams.image_files]\nmax_bytes = 0\ncleanup_grace_secs = 1\n",
    )
    .expect("pipeline file");
    let (ok, said) = init(&pipeline);
    assert!(!ok, "{said}");
    assert!(said.contains("streams.image_files.max_bytes"), "{said}");
    assert!(
        said.contains("streams.image_files.cleanup_grace_secs"),
        "{said}"
    );

    // Raised again, through the library as `pcb up` provisions.
    let mut big = Topology::default();
    big.image_files.max_bytes = 2 << 30;
    let made = pcb_common::provision(&env.js, &big, &[])
        .await
        .expect("raised");
    assert!(
        made.buckets
            .contains(&(OBJECTS_IMAGE_FILES, Provisioned::Updated)),
        "{made:?}"
    );
    assert_eq!(bucket_state(&env.js).await.0, 2 << 30);
}

#[tokio::test]
async fn files_no_record_names_are_deleted_once_past_the_grace_period() {
    let env = Env::start_secured().await;
    // The ingester stores the files, the keeper sweeps: each as itself.
    let ingester =
        ImageFiles::open(&js_as(&env, Identity::Stage(pcb_schemas::StageName::Ingester)).await)
            .await
            .expect("bucket as the ingester");
    let keeper = js_as(&env, Identity::Keeper).await;

    let bytes: Vec<Vec<u8>> = (0..6)
        .map(|i| file(i, 300_000 + 1000 * usize::from(i)))
        .collect();
    let mut refs = Vec::new();
    for b in &bytes[..5] {
        refs.push(ingester.put(b).await.expect("put"));
    }
    let [named_raw, named_shard, named_then_removed, never_named, refreshed] =
        <[ObjectRef; 5]>::try_from(refs).expect("five");

    // A raw record names one file; a shard record another (as a template).
    publish(&env.js, SUBJECT_RAW, &raw_naming(&named_raw, None, "raw")).await;
    let encoded = EncodedImage {
        image_id: "i".repeat(64),
        board_id: "shard".into(),
        line_id: "line-1".into(),
        source: "shard.tiff".into(),
        captured_at_ms: 1,
        encoded_at_ms: 2,
        image_b64: String::new(),
        width: 1,
        height: 1,
        channels: 3,
        format: "tiff".into(),
        sha256: "i".repeat(64),
        labels: Some(Vec::new()),
        label_format: Some("deeppcb".into()),
        template_b64: None,
        split_hint: None,
        revision: None,
        image_ref: Some(named_raw.clone()),
        template_ref: Some(named_shard.clone()),
    };
    let shard = ShardRecord {
        split: Split::Train,
        shard: 0,
        shard_count: 8,
        routed_at_ms: 3,
        record: encoded,
    };
    publish(&env.js, "pcb.shards.0", &shard).await;
    // A record that named a file and was removed since (as make_room removes them).
    let seq = publish(
        &env.js,
        SUBJECT_RAW,
        &raw_naming(&named_then_removed, None, "removed"),
    )
    .await;
    env.js
        .get_stream(STREAM_IMAGES)
        .await
        .expect("images")
        .delete_message(seq)
        .await
        .expect("removed");

    let grace = Duration::from_secs(3);
    tokio::time::sleep(grace + Duration::from_millis(500)).await;
    // Stored again past the grace (a board dropped again): refreshed, so young again.
    ingester.put(&bytes[4]).await.expect("put again");
    // Stored just now, its record not yet published: young.
    let young = ingester.put(&bytes[5]).await.expect("put");

    let mut memory = pcb_common::SweepMemory::default();
    let swept = pcb_common::sweep_image_files(&keeper, grace, &mut memory)
        .await
        .expect("sweep as the keeper");
    assert_eq!(swept.files, 6, "{swept:?}");
    assert_eq!(swept.old, 4, "{swept:?}");
    assert_eq!(swept.deleted, 2, "{swept:?}");
    assert_eq!(
        swept.deleted_bytes,
        named_then_removed.size + never_named.size,
        "{swept:?}"
    );
    for (r, gone) in [
        (&named_raw, false),
        (&named_shard, false),
        (&named_then_removed, true),
        (&never_named, true),
        (&refreshed, false),
        (&young, false),
    ] {
        match ingester.get(r).await {
            Ok(_) => assert!(!gone, "{} should be deleted", r.name),
            Err(FilesError::Gone { .. }) => assert!(gone, "{} should be kept", r.name),
            Err(e) => panic!("{}: {e}", r.name),
        }
    }
    // The deleted files' chunks are gone too: the stream holds the live files' chunks
    // and one metadata message per file.
    assert_eq!(
        bucket_state(&env.js).await.2,
        expected_messages(&ingester).await
    );
    // The raw record naming named_raw and the shard record (the removed one is gone).
    assert_eq!(swept.records_read, 2, "{swept:?}");
    let again = pcb_common::sweep_image_files(&keeper, grace, &mut memory)
        .await
        .expect("sweep");
    assert_eq!(again.deleted, 0, "{again:?}");
    // The records were read once: the next sweep reads only what came since (nothing).
    assert_eq!(again.records_read, 0, "{again:?}");
    // A record stored after a sweep, naming a file that is old by then, is read by the
    // next sweep (and only it): the file stays.
    let mut late = shard.clone();
    late.record.image_ref = Some(refreshed.clone());
    late.record.template_ref = None;
    // Its own record (the stream would take the same id for a duplicate).
    late.record.image_id = refreshed.sha256.clone();
    late.record.sha256 = refreshed.sha256.clone();
    let late_seq = publish(&env.js, "pcb.shards.1", &late).await;
    assert_eq!(late_seq, 2, "the late shard record is stored");

    // A deletion loses to a put that refreshed the file after the sweep listed it.
    let listed = ingester
        .meta(&young.name)
        .await
        .expect("meta")
        .expect("there");
    ingester.put(&bytes[5]).await.expect("refreshed");
    let keeper_files = ImageFiles::open(&keeper)
        .await
        .expect("bucket as the keeper");
    assert!(!keeper_files
        .delete_unchanged(&young.name, listed.seq)
        .await
        .expect("conditional delete"));
    assert_eq!(ingester.get(&young).await.expect("kept"), bytes[5]);

    // And a file deleted while a writer was about to reuse it is stored again whole.
    let m = ingester
        .meta(&young.name)
        .await
        .expect("meta")
        .expect("there");
    assert!(keeper_files
        .delete_unchanged(&young.name, m.seq)
        .await
        .expect("delete"));
    assert!(matches!(
        ingester.get(&young).await,
        Err(FilesError::Gone { .. })
    ));
    ingester.put(&bytes[5]).await.expect("stored again");
    assert_eq!(ingester.get(&young).await.expect("back"), bytes[5]);

    // Once the raw record goes, the file only the shard names stays, the other goes.
    env.js
        .get_stream(STREAM_IMAGES)
        .await
        .expect("images")
        .purge()
        .await
        .expect("purged");
    tokio::time::sleep(grace + Duration::from_millis(500)).await;
    let last = pcb_common::sweep_image_files(&keeper, grace, &mut memory)
        .await
        .expect("sweep");
    // named_raw is still named by the shard's encoded record (its image): kept; so is the
    // refreshed file, named by the late shard record; the one stored again is named by
    // nothing: deleted. Only the late record was read.
    assert_eq!(last.deleted, 1, "{last:?}");
    assert_eq!(last.records_read, 1, "{last:?}");
    assert!(ingester.get(&named_raw).await.is_ok());
    assert!(ingester.get(&named_shard).await.is_ok());
    assert!(ingester.get(&refreshed).await.is_ok());
    assert!(matches!(
        ingester.get(&young).await,
        Err(FilesError::Gone { .. })
    ));
    assert_eq!(
        bucket_state(&env.js).await.2,
        expected_messages(&ingester).await
    );
}

#[tokio::test]
async fn two_writers_storing_one_file_at_once_leave_one_whole_copy() {
    let env = Env::start_secured().await;
    let ingester = Identity::Stage(pcb_schemas::StageName::Ingester);
    // Two processes' worth: two connections, two bucket handles, nothing shared.
    let a = ImageFiles::open(&js_as(&env, ingester).await)
        .await
        .expect("a");
    let b = ImageFiles::open(&js_as(&env, ingester).await)
        .await
        .expect("b");
    let mut stored = Vec::new();
    for round in 0..8u8 {
        let bytes = file(100 + round, 700_000 + usize::from(round) * 4096);
        let (ra, rb) = tokio::join!(a.put(&bytes), b.put(&bytes));
        let (ra, rb) = (ra.expect("a stored"), rb.expect("b stored"));
        assert_eq!(ra, rb);
        stored.push((ra, bytes));
    }
    let listed = a.list().await.expect("list");
    assert_eq!(listed.len(), stored.len(), "one object per file");
    for (r, bytes) in &stored {
        assert_eq!(&b.get(r).await.expect("read back"), bytes);
        let m = a.meta(&r.name).await.expect("meta").expect("there");
        assert_eq!(m.info.size as u64, r.size);
        assert!(!m.info.deleted);
    }
    // Nothing stray: exactly the chunks of one copy of each file, and its metadata.
    let (_, _, messages) = bucket_state(&env.js).await;
    let want: u64 = stored
        .iter()
        .map(|(r, _)| 1 + r.size.div_ceil(128 * 1024))
        .sum();
    assert_eq!(messages, want, "stray chunks of a lost put left behind");
}
