//! The operator's loop, in headless Chromium: on a board the line produced (no labels), the
//! review starts from the model's boxes; the operator deletes a false one, draws a missed
//! one and saves. The label revision appears on `pcb.images.raw` with who and when, the
//! board's record in the shards (what the next training snapshot reads) carries the
//! corrected labels, the board page shows the history, and the detector does not answer
//! the board twice.

use std::time::Duration;

use pcb_schemas::{
    decode, Detection, RawImage, ShardRecord, DEFAULT_SHARD_COUNT, STREAM_DETECTIONS,
    STREAM_IMAGES, STREAM_SHARDS,
};
use pcb_tests::up::{detections, Pipeline};
use pcb_tests::{browser, drop_into, files_under, read_all, synth_sized, wait_until};

/// The box the operator draws (image pixels) and its class.
const DRAWN: [f32; 4] = [6.0, 70.0, 40.0, 100.0];
const DRAWN_CLASS: &str = "spur";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_correction_in_the_viewer_becomes_the_boards_training_labels() {
    let p = Pipeline::up(&[]).await;
    // Boards as a line produces them: images and templates, no labels, no split lists.
    let boards = p.dir.path().join("boards");
    synth_sized(&boards, 3, 41, 128, 0.0);
    for e in files_under(&boards) {
        let name = e.to_string_lossy().into_owned();
        if name.ends_with(".txt") {
            std::fs::remove_file(&e).expect("remove labels");
        }
    }
    drop_into(&boards, &p.inbox().join("line-1"));
    p.wait_detections(3).await;

    // A board on which the model found something: the review starts from its boxes.
    let answers: Vec<Detection> = read_all(&p.js, STREAM_DETECTIONS, "pcb.detections")
        .await
        .iter()
        .map(|(_, payload)| decode(payload, None).expect("a detection"))
        .collect();
    let d = answers
        .iter()
        .find(|d| d.defects.len() >= 2)
        .or_else(|| answers.iter().find(|d| !d.defects.is_empty()))
        .expect("the model finds a defect on some board");
    let url = std::fs::read_to_string(p.data.join("viewer.url")).expect("viewer url");
    let opts = serde_json::json!({
        "board": d.image_id,
        "delete": 0,
        "draw": {"x1": DRAWN[0], "y1": DRAWN[1], "x2": DRAWN[2], "y2": DRAWN[3], "class": DRAWN_CLASS},
        "by": "ana",
        "note": "first box is dust; missed spur",
        "shots": std::env::var("PCB_SHOTS").ok(),
    });
    let out = tokio::task::spawn_blocking(move || browser("review", url.trim(), &opts))
        .await
        .expect("join");
    eprintln!("{out:#}");
    assert_eq!(out["error"], "", "{out}");
    assert_eq!(out["page_errors"], serde_json::json!([]), "{out}");

    // The page: the model's boxes to start with, one deleted, one drawn.
    let before = out["before"].as_array().expect("before");
    assert_eq!(before.len(), d.defects.len(), "{out}");
    assert_eq!(
        out["after_delete"].as_array().map(Vec::len),
        Some(before.len() - 1)
    );
    let after = out["after_draw"].as_array().expect("after");
    assert_eq!(after.len(), before.len(), "{out}");
    let drawn = after.last().expect("drawn box");
    assert_eq!(drawn["class"], DRAWN_CLASS);
    let drawn_box: Vec<f64> = drawn["box"]
        .as_array()
        .expect("box")
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    for (got, want) in drawn_box.iter().zip(DRAWN) {
        assert!((got - f64::from(want)).abs() <= 1.0, "drawn {drawn_box:?}");
    }
    assert!(
        out["status"]
            .as_str()
            .is_some_and(|s| s.contains("is in the history")),
        "{out}"
    );
    let history = out["history"].as_array().expect("history");
    assert_eq!(
        history.len(),
        2,
        "the board as it came, then the revision: {out}"
    );
    let newest: Vec<&str> = history[0]["cells"]
        .as_array()
        .expect("cells")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    assert_eq!(newest[1..4], ["viewer", "ana", &after.len().to_string()]);
    assert_eq!(out["history_after_reload"], 2);

    // The review queue: the corrected board is counted and no longer waits.
    let (qb, qa) = (&out["queue_before"], &out["queue_after"]);
    assert_eq!(
        (qb["corrected"].as_u64(), qa["corrected"].as_u64()),
        (Some(0), Some(1)),
        "{out}"
    );
    let listed = |q: &serde_json::Value| {
        q["ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|i| i == d.image_id.as_str()))
    };
    assert!(!listed(qa), "{out}");
    let was = u64::from(listed(qb));
    assert_eq!(
        qa["waiting"].as_u64(),
        qb["waiting"].as_u64().map(|w| w - was),
        "{out}"
    );

    // The revision on the ingester's subject: the board's own image, the corrected labels,
    // who and when, and the answer that was reviewed.
    let expected: Vec<(String, [f32; 4])> = d.defects[1..]
        .iter()
        .map(|x| (x.class.clone(), [x.x1, x.y1, x.x2, x.y2]))
        .chain([(DRAWN_CLASS.to_string(), DRAWN)])
        .collect();
    let same = |labels: &[pcb_schemas::BoxLabel]| {
        labels.len() == expected.len()
            && labels.iter().zip(&expected).all(|(l, (class, b))| {
                &l.class == class
                    && [l.x1, l.y1, l.x2, l.y2]
                        .iter()
                        .zip(b)
                        .all(|(x, y)| (x - y).abs() <= 1.0)
            })
    };
    let revisions: Vec<RawImage> = read_all(&p.js, STREAM_IMAGES, "pcb.images.raw")
        .await
        .iter()
        .map(|(_, payload)| decode::<RawImage>(payload, None).expect("raw"))
        .filter(|r| r.image_id == d.image_id && r.revision.is_some())
        .collect();
    assert_eq!(revisions.len(), 1);
    let r = &revisions[0];
    let mark = r.revision.as_ref().expect("revision");
    assert_eq!(mark.by, "ana");
    assert_eq!(mark.note.as_deref(), Some("first box is dust; missed spur"));
    assert_eq!(mark.replaces, None, "the board had no labels");
    assert_eq!(mark.reviewed.as_ref(), Some(&d.model));
    assert!(same(r.labels.as_deref().expect("labels")), "{:?}", r.labels);
    // The deleted box is recorded as the model gave it, unless a kept box of its class
    // covers it (then it was not deleted but kept).
    let first = &d.defects[0];
    let covered = d.defects[1..].iter().any(|x| {
        x.class == first.class
            && pcb_evaluation::iou(
                [x.x1, x.y1, x.x2, x.y2],
                [first.x1, first.y1, first.x2, first.y2],
            ) >= 0.5
    });
    let deleted: Vec<(&str, [f32; 4])> = mark
        .deleted
        .iter()
        .map(|b| (b.class.as_str(), [b.x1, b.y1, b.x2, b.y2]))
        .collect();
    eprintln!("deleted {deleted:?}; covered by a kept box: {covered}");
    if covered {
        assert!(deleted.is_empty(), "{deleted:?}");
    } else {
        assert_eq!(
            deleted,
            [(
                first.class.as_str(),
                [first.x1, first.y1, first.x2, first.y2]
            )]
        );
    }
    assert_eq!(
        out["revision"],
        pcb_schemas::record_id(&r.image_id, r.labels.as_deref())
    );

    // The shards: the board is now a labelled record, and the trainer's own snapshot reader
    // (what the next job reads) gets the corrected boxes.
    let routed = wait_until(Duration::from_secs(60), || async {
        shard_records(&p, &d.image_id).await.len() == 1
    })
    .await;
    assert!(routed, "the revision reaches the shards");
    let record = &shard_records(&p, &d.image_id).await[0];
    assert!(same(record.record.labels.as_deref().expect("labels")));
    assert_eq!(
        record.record.revision.as_ref().map(|v| v.by.as_str()),
        Some("ana")
    );
    let last = pcb_trainer::data::last_sequence(&p.js, STREAM_SHARDS)
        .await
        .expect("last");
    let all: Vec<u32> = (0..DEFAULT_SHARD_COUNT).collect();
    let snapshot = pcb_trainer::data::read_snapshot(
        &p.js,
        STREAM_SHARDS,
        &all,
        &all,
        DEFAULT_SHARD_COUNT,
        last,
    )
    .await
    .expect("snapshot");
    let item = snapshot
        .train
        .iter()
        .chain(&snapshot.val)
        .find(|it| it.image_id == d.image_id)
        .expect("the corrected board is in the snapshot");
    let classes: Vec<i64> = item.boxes.iter().map(|(_, c)| *c).collect();
    // The corrected labels, then the deleted box as a hard negative.
    let want: Vec<i64> = expected
        .iter()
        .map(|(c, _)| {
            pcb_schemas::CLASS_NAMES
                .iter()
                .position(|n| n == c)
                .expect("class") as i64
                + 1
        })
        .chain(
            mark.deleted
                .iter()
                .map(|_| pcb_vision::model::HARD_NEGATIVE),
        )
        .collect();
    assert_eq!(classes, want);
    if let Some(((b, _), del)) = item.boxes.last().zip(mark.deleted.first()) {
        assert_eq!(*b, [del.x1, del.y1, del.x2, del.y2]);
    }
    assert_eq!(
        snapshot.train.len() + snapshot.val.len(),
        1,
        "only it is labelled"
    );

    // The detector answered each board once: the revision is not a new board.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(detections(&p.js).await, 3);
}

async fn shard_records(p: &Pipeline, image_id: &str) -> Vec<ShardRecord> {
    read_all(&p.js, STREAM_SHARDS, "pcb.shards.*")
        .await
        .iter()
        .map(|(_, payload)| decode::<ShardRecord>(payload, None).expect("shard record"))
        .filter(|r| r.record.image_id == image_id)
        .collect()
}
