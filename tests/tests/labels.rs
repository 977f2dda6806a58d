//! Labels are never dropped: the same image with other labels is a new record (reported as
//! relabelled, not as a duplicate), the same image with the same labels is a duplicate, and
//! labels that come after their board was published bring the board back, labelled.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pcb_schemas::{decode, RawImage, STREAM_IMAGES, STREAM_SHARDS};
use pcb_tests::{wait_until, Env};

/// One synthetic DeepPCB board: (image, template, labels) under `dir`.
fn board(dir: &Path, seed: u64) -> (PathBuf, PathBuf, PathBuf) {
    pcb_tests::synth_sized(dir, 1, seed, 64, 0.0);
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("dir").flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    let find = |f: &dyn Fn(&str) -> bool| {
        files
            .iter()
            .find(|p| f(&p.to_string_lossy()))
            .cloned()
            .expect("synth file")
    };
    (
        find(&|p| p.ends_with("_test.jpg")),
        find(&|p| p.ends_with("_temp.jpg")),
        find(&|p| p.contains("_not/") && p.ends_with(".txt")),
    )
}

/// Copies `file` from under `src` to the same place under `inbox`.
fn put(src: &Path, file: &Path, inbox: &Path) -> PathBuf {
    let to = inbox.join(file.strip_prefix(src).expect("under src"));
    std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
    std::fs::copy(file, &to).expect("copy");
    to
}

/// One import of `inbox` that files what it publishes in `processed/`, as the watching
/// ingester does.
async fn import_moving(env: &Env, inbox: &Path) -> pcb_ingester::Summary {
    let cfg: pcb_ingester::FileConfig = toml::from_str(&env.base_config(&format!(
        "[ingester]\nwatch_dir = {:?}\n",
        inbox.display().to_string()
    )))
    .expect("toml");
    let s = cfg.validate().expect("valid").config;
    let max_payload = env.client.server_info().max_payload;
    pcb_ingester::import(env.js.clone(), s, max_payload, true, |_, _| {}).await
}

async fn raw_records(env: &Env) -> Vec<RawImage> {
    env.read_all(STREAM_IMAGES, "pcb.images.raw")
        .await
        .into_iter()
        .map(|(_, p)| decode(&p, None).expect("raw record"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relabel_is_a_new_record_and_a_repeat_is_a_duplicate() {
    let env = Env::start().await;
    let src = env.dir.path().join("src");
    let (image, template, labels) = board(&src, 31);
    let inbox = env.dir.path().join("inbox");
    let original = std::fs::read_to_string(&labels).expect("labels");
    let boxes = original.lines().count();
    assert!(boxes >= 2, "{original}");

    for f in [&image, &template, &labels] {
        put(&src, f, &inbox);
    }
    let first = import_moving(&env, &inbox).await;
    assert_eq!((first.published, first.relabelled), (1, 0), "{first}");

    // The same image again, one box fewer: a correction.
    put(&src, &image, &inbox);
    put(&src, &template, &inbox);
    let corrected: String = original.lines().skip(1).map(|l| format!("{l}\n")).collect();
    let in_inbox = put(&src, &labels, &inbox);
    std::fs::write(&in_inbox, &corrected).expect("relabel");
    let second = import_moving(&env, &inbox).await;
    assert_eq!(
        (second.published, second.relabelled, second.duplicates),
        (0, 1, 0),
        "{second}"
    );

    // And once more with the same correction: a duplicate.
    put(&src, &image, &inbox);
    put(&src, &template, &inbox);
    std::fs::write(put(&src, &labels, &inbox), &corrected).expect("labels");
    let third = import_moving(&env, &inbox).await;
    assert_eq!((third.relabelled, third.duplicates), (0, 1), "{third}");

    let raw = raw_records(&env).await;
    assert_eq!(raw.len(), 2, "one record per distinct labelling");
    assert_eq!(raw[0].image_id, raw[1].image_id);
    let counts: Vec<usize> = raw
        .iter()
        .map(|r| r.labels.as_ref().map_or(0, |l| l.len()))
        .collect();
    assert_eq!(counts, [boxes, boxes - 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_that_come_late_bring_their_board_back_labelled() {
    let env = Env::start().await;
    let (stages, handles) = env.start_encoder_router();
    let ingester = env.start_ingester(&stages);
    let src = env.dir.path().join("src");
    let (image, template, labels) = board(&src, 32);
    let inbox = env.watch_dir();
    put(&src, &template, &inbox);
    put(&src, &image, &inbox);

    // Published unlabelled, filed, not routed to training.
    let filed = env
        .watch_dir()
        .join("processed")
        .join(image.strip_prefix(&src).expect("rel"));
    assert!(
        wait_until(Duration::from_secs(60), || {
            let f = filed.clone();
            async move { f.exists() }
        })
        .await,
        "the board was not filed"
    );
    assert_eq!(env.count(STREAM_IMAGES, "pcb.images.raw").await, 1);

    // Its labels come: the board is published again with them and goes to training.
    put(&src, &labels, &inbox);
    assert!(
        env.wait_count(STREAM_SHARDS, "pcb.shards.", 1, Duration::from_secs(60))
            .await,
        "the late labels did not bring the board to training"
    );
    let raw = raw_records(&env).await;
    assert_eq!(raw.len(), 2);
    assert!(raw[0].labels.is_none());
    let want = std::fs::read_to_string(&labels)
        .expect("labels")
        .lines()
        .count();
    assert_eq!(raw[1].labels.as_ref().map(|l| l.len()), Some(want));
    assert_eq!(raw[0].image_id, raw[1].image_id);
    // The labels were filed with it; nothing is left in the inbox but the filed trees.
    let late = inbox.join(labels.strip_prefix(&src).expect("rel"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            let l = late.clone();
            async move { !l.exists() }
        })
        .await,
        "the label file stayed in the inbox"
    );

    let mut all = handles;
    all.push(ingester);
    pcb_tests::stop_stages(&stages, all).await;
}
