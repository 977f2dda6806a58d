//! `pcb demo` (README's main command, on a small sample) ends with a summary that counts
//! images per stream and a detection per image, the shipped default model answering, and
//! sets the verdicts on the real DeepPCB boards against their annotations; a second run
//! finds only duplicates.

use std::process::Command;

use pcb_tests::bin;

fn demo(data: &std::path::Path) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(bin("pcb"))
        .current_dir(&root)
        .args([
            "demo",
            "--count",
            "20",
            "--timeout-secs",
            "900",
            // A free port: 8080 (the default) may be taken on a test machine.
            "--viewer-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data)
        .output()
        .expect("run pcb demo");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn line_count(text: &str, subject: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(subject))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {subject} line in {text}"))
}

#[test]
fn demo_prints_counts_per_stream_and_is_idempotent() {
    let data = tempfile::tempdir().expect("tempdir");
    // 20 synthetic boards and the 8 real ones named in pipelines/demo/deeppcb-sample.txt,
    // copied from ../shared/datasets/deeppcb (the default --deeppcb).
    let boards = 28;
    for run in 0..2 {
        let text = demo(data.path());
        assert!(
            text.contains("== demo summary (28 boards dropped: 20 synthetic, 8 DeepPCB) =="),
            "{text}"
        );
        assert_eq!(line_count(&text, "pcb.images.raw"), boards);
        assert_eq!(line_count(&text, "pcb.images.encoded"), boards);
        assert_eq!(line_count(&text, "pcb.shards.* (all shards)"), boards);
        assert_eq!(line_count(&text, "pcb.rejected.* (dead letters)"), 0);
        // The first run registers the shipped default and makes it live; the second finds
        // it live. Either way every image is answered on pcb.detections, without training.
        if run == 0 {
            assert!(
                text.contains("pcb-defects@1 is live, the DeepPCB compact default"),
                "{text}"
            );
        }
        assert!(
            text.contains("pcb-defects@1 is live: no training needed"),
            "{text}"
        );
        assert_eq!(line_count(&text, "pcb.detections"), boards);
        assert!(
            text.contains("real DeepPCB boards: ") && text.contains(" of 8 verdicts agree"),
            "the demo compares verdicts with the annotations: {text}"
        );
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("viewer:") && l.contains("http://127.0.0.1:")),
            "the demo prints the viewer's URL: {text}"
        );
    }
}
