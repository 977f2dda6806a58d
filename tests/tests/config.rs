//! A stage refuses to start on a config with an unknown key or a bad value, naming the key
//! and the file.

use std::process::Command;

use pcb_tests::bin;

fn refuse(stage: &str, text: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("{stage}-bad.toml"));
    std::fs::write(&path, text).expect("write");
    let out = Command::new(bin(stage))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success(), "{stage} started with a bad config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{stage}-bad.toml")),
        "file not named: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{n:?} not named: {err}");
    }
}

#[test]
fn unknown_keys_are_refused_by_name() {
    refuse("encoder", "[encoder]\nmax_widht = 10\n", &["max_widht"]);
    refuse("router", "[routr]\nshard_count = 4\n", &["routr"]);
    refuse(
        "ingester",
        "[ingester]\nwatch_dri = \"x\"\n",
        &["watch_dri"],
    );
}

#[test]
fn bad_values_are_refused_by_name_all_at_once() {
    refuse(
        "encoder",
        "[encoder]\nmax_width = \"wide\"\n",
        &["max_width"],
    );
    refuse(
        "router",
        "[router]\nshard_count = 0\nval_fraction = 2.0\n[log]\nfilter = \"pcb=loud\"\n",
        &["router.shard_count", "router.val_fraction", "log.filter"],
    );
    // A choice outside its set does not parse: named with the choices.
    refuse(
        "router",
        "[log]\nformat = \"xml\"\n",
        &["[log] format", "xml", "text", "json"],
    );
}

#[test]
fn pcb_refuses_a_bad_pipeline_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad-pipeline.toml");
    std::fs::write(
        &path,
        "[streams.images]\nstorage = \"tape\"\n[stages.encoder]\nreplica = 2\n",
    )
    .expect("write");
    let out = Command::new(bin("pcb"))
        .args(["up", "--pipeline"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad-pipeline.toml") && err.contains("replica"),
        "{err}"
    );
}
