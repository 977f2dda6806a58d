//! The wire contract pinned: one message of every schema, encoded, must equal the bytes in
//! `tests/golden/<schema>.hex`, with the headers every message carries. Refactors must not
//! change a byte; a deliberate change regenerates the files with `tests/golden/regenerate.sh`
//! and says why in its commit.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pcb_schemas::*;

fn label() -> BoxLabel {
    BoxLabel {
        x1: 10.0,
        y1: 20.5,
        x2: 30.0,
        y2: 40.25,
        class_id: 4,
        class: "spur".into(),
    }
}

fn encoded() -> EncodedImage {
    EncodedImage {
        image_id: "ab".repeat(32),
        board_id: "00041000_test".into(),
        line_id: "line-1".into(),
        source: "group00041/00041/00041000_test.jpg".into(),
        captured_at_ms: 1_700_000_000_000,
        encoded_at_ms: 1_700_000_000_123,
        image_b64: "aGVsbG8=".into(),
        width: 640,
        height: 640,
        channels: 1,
        format: "jpeg".into(),
        sha256: "ab".repeat(32),
        labels: Some(vec![label()]),
        label_format: Some("deeppcb".into()),
        template_b64: Some("dGVtcGw=".into()),
        split_hint: Some(Split::Val),
        revision: None,
        image_ref: None,
        template_ref: None,
    }
}

fn model() -> ModelRef {
    ModelRef {
        name: "pcb-defects".into(),
        version: 3,
    }
}

/// A message type's name, its encoding and its headers.
type Encoded = (&'static str, Vec<u8>, Vec<(String, String)>);

fn one_of_each() -> Vec<Encoded> {
    fn e<T: Envelope>(m: &T) -> Encoded {
        let bytes = encode(m).expect("encodes");
        let headers = headers_for(m)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        (T::SCHEMA, bytes, headers)
    }
    let raw = RawImage {
        image_id: "cd".repeat(32),
        image: vec![0xff, 0xd8, 0xff, 0xe0],
        template: Some(vec![0x89, 0x50]),
        labels: Some(vec![label()]),
        label_format: Some("voc".into()),
        board_id: "b1".into(),
        line_id: "line-1".into(),
        source: "b1.jpg".into(),
        captured_at_ms: 1_700_000_000_000,
        split_hint: None,
        revision: None,
        image_ref: None,
        template_ref: None,
    };
    let shard = ShardRecord {
        split: Split::Train,
        shard: 5,
        shard_count: 8,
        routed_at_ms: 1_700_000_000_456,
        record: encoded(),
    };
    let letter = DeadLetter {
        stage: "encoder".into(),
        reason_code: "not-an-image".into(),
        reason: "bytes start ff 00, not an image".into(),
        image_id: Some("ef".repeat(32)),
        source: "x.jpg".into(),
        moved_to: Some("rejected/x.jpg".into()),
        subject: Some("pcb.images.raw".into()),
        stream_seq: Some(42),
        at_ms: 1_700_000_000_789,
    };
    let progress = TrainProgress {
        job: "demo".into(),
        rank: 1,
        world: 2,
        epoch: 3,
        epochs: 24,
        step: 100,
        steps_per_epoch: 250,
        global_step: 850,
        images: 8,
        loss: 0.3125,
        lr: 0.001,
        images_per_sec: 7.5,
        eta_secs: 1234.5,
        param_digest: None,
        val_map: Some(0.973),
        at_ms: 1_700_000_001_000,
    };
    let candidate = TrainCandidate {
        job: "demo".into(),
        model: "pcb-defects".into(),
        artifact: "jobs/demo/model.safetensors".into(),
        sha256: "12".repeat(32),
        model_config: serde_json::json!({"backbone": "r18", "fpn_channels": 64}),
        hyperparameters: serde_json::json!({"lr": 0.001, "epochs": 24}),
        metrics: Some(serde_json::json!({"map": 0.97})),
        snapshot: Snapshot {
            stream: "PCB_SHARDS".into(),
            first_seq: 1,
            last_seq: 1250,
            train_images: 1000,
            val_images: 250,
            boxes_per_class: BTreeMap::from([("open".into(), 324), ("spur".into(), 246)]),
        },
        epoch_losses: vec![1.25, 0.5],
        git_revision: Some("9dc2ce0".into()),
        created_at_ms: 1_700_000_002_000,
    };
    let detection = Detection {
        image_id: "ab".repeat(32),
        board_id: "00041000_test".into(),
        line_id: "line-1".into(),
        source: "group00041/00041/00041000_test.jpg".into(),
        captured_at: 1_700_000_000_000,
        detected_at: 1_700_000_000_321,
        model: model(),
        defects: vec![Defect {
            x1: 1.5,
            y1: 2.5,
            x2: 11.5,
            y2: 12.5,
            class_id: 1,
            class: "open".into(),
            score: 0.875,
        }],
        verdict: Verdict::Fail,
        inference_ms: 12.25,
    };
    let event = ModelEvent {
        kind: ModelEventKind::Promoted,
        model: model(),
        by: "registry".into(),
        reason: Some("val mAP 97.3% >= live 96.0% - 1.0%".into()),
        at_ms: 1_700_000_003_000,
    };
    // MQTT carries no headers: the verdict is JSON with its schema inside.
    let verdict = LineVerdict::of(&detection);
    let verdict = (
        LineVerdict::SCHEMA,
        verdict.to_json(),
        vec![("Content-Type".to_string(), "application/json".to_string())],
    );
    vec![
        verdict,
        e(&raw),
        e(&encoded()),
        e(&shard),
        e(&letter),
        e(&progress),
        e(&candidate),
        e(&detection),
        e(&event),
    ]
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn file_of(schema: &str) -> PathBuf {
    golden_dir().join(format!("{}.hex", schema.replace('/', "_")))
}

fn render(bytes: &[u8], headers: &[(String, String)]) -> String {
    let mut out = String::new();
    for (k, v) in headers {
        // The message id is derived from the content; its presence is the contract.
        let v = if k == "Nats-Msg-Id" {
            "<id>"
        } else {
            v.as_str()
        };
        out.push_str(&format!("# {k}: {v}\n"));
    }
    for chunk in bytes.chunks(32) {
        out.push_str(&hex::encode(chunk));
        out.push('\n');
    }
    out
}

#[test]
fn every_schema_encodes_to_its_golden_bytes() {
    let write = std::env::var_os("PCB_WRITE_GOLDEN").is_some();
    let messages = one_of_each();
    let schemas: Vec<&str> = messages.iter().map(|(s, _, _)| *s).collect();
    // One golden per schema the topology declares, and no other.
    let mut declared: Vec<&str> = topology::SUBJECTS.iter().map(|s| s.schema).collect();
    declared.sort();
    declared.dedup();
    let mut ours = schemas.clone();
    ours.sort();
    assert_eq!(ours, declared, "one golden message per declared schema");
    for (schema, bytes, headers) in messages {
        let text = render(&bytes, &headers);
        let path = file_of(schema);
        if write {
            std::fs::write(&path, &text).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run tests/golden/regenerate.sh)", path.display()));
        assert_eq!(text, want, "{schema}: the bytes on the wire changed");
    }
}

#[test]
fn golden_bytes_decode_back_to_the_same_messages() {
    for (schema, bytes, _) in one_of_each() {
        let want = std::fs::read_to_string(file_of(schema)).expect("golden");
        let hex: String = want.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(hex::decode(hex).expect("hex"), bytes, "{schema}");
    }
}
