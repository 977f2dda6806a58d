//! A stage killed with SIGKILL mid-stream and restarted: every image processed, none twice.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;

use pcb_schemas::{decode, EncodedImage, ShardRecord, STREAM_IMAGES, STREAM_SHARDS};
use pcb_tests::{bin, synth, wait_until, Env};

fn spawn(stage: &str, config: &std::path::Path, log: &std::path::Path) -> Child {
    let out = std::fs::File::create(log).expect("log");
    Command::new(bin(stage))
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .expect("spawn stage")
}

fn sigkill(child: &mut Child) {
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
}

/// Freezes the child at once, so it cannot finish between "seen N outputs" and the kill;
/// a poll of the stream counts was too slow on a fast machine (the router ran all 500).
fn sigstop(child: &Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    let rc = unsafe { libc::kill(pid, libc::SIGSTOP) };
    assert_eq!(rc, 0, "SIGSTOP failed");
}

/// Kills `stage` once `count(subject)` passed `kill_at`, restarts it, and checks that
/// `want` distinct images came out on `subject`, each once.
async fn kill_and_resume(env: &Env, stage: &str, stream: &str, prefix: &str, want: u64) {
    let config = env.config_file(
        &format!("{stage}.toml"),
        &format!("[{stage}]\nack_wait_secs = 3\n"),
    );
    let log = env.dir.path().join(format!("{stage}.log"));
    // Core NATS sees every publish as it happens, so the stage is stopped within
    // a message or two of the 50th output.
    let filter = if prefix.ends_with('.') {
        format!("{prefix}>")
    } else {
        prefix.to_string()
    };
    let mut live = env.client.subscribe(filter).await.expect("subscribe");
    env.client.flush().await.expect("flush");
    let mut child = spawn(stage, &config, &log);
    let mut seen = 0;
    let started = tokio::time::timeout(Duration::from_secs(120), async {
        while seen < 50 {
            if live.next().await.is_none() {
                break;
            }
            seen += 1;
        }
    })
    .await;
    if seen >= 50 {
        sigstop(&child);
    }
    assert!(
        started.is_ok() && seen >= 50,
        "{stage} made no progress; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    drop(live);
    sigkill(&mut child);
    let at_kill = env.count(stream, prefix).await;
    assert!(
        at_kill < want,
        "{stage} finished before it could be killed ({at_kill})"
    );
    let mut child = spawn(
        stage,
        &config,
        &env.dir.path().join(format!("{stage}-2.log")),
    );
    let done = wait_until(Duration::from_secs(180), || async {
        env.count(stream, prefix).await >= want
    })
    .await;
    // Give redeliveries of messages in flight at the kill time to show up if they would.
    tokio::time::sleep(Duration::from_secs(4)).await;
    sigkill(&mut child);
    assert!(
        done,
        "{stage} did not finish after restart: {}",
        env.count(stream, prefix).await
    );
    assert_eq!(
        env.count(stream, prefix).await,
        want,
        "{stage} produced duplicates"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn encoder_and_router_resume_after_sigkill() {
    let env = Env::start().await;
    let sample = env.dir.path().join("sample");
    synth(&sample, 500, 9);
    let summary = env.import(&sample).await;
    assert_eq!(summary.published, 500, "{summary}");

    kill_and_resume(&env, "encoder", STREAM_IMAGES, "pcb.images.encoded", 500).await;
    let encoded = env.read_all(STREAM_IMAGES, "pcb.images.encoded").await;
    let ids: HashSet<String> = encoded
        .iter()
        .map(|(_, p)| decode::<EncodedImage>(p, None).expect("encoded").image_id)
        .collect();
    assert_eq!(ids.len(), 500);

    kill_and_resume(&env, "router", STREAM_SHARDS, "pcb.shards.", 500).await;
    let shards = env.read_all(STREAM_SHARDS, "pcb.shards.>").await;
    let ids2: HashSet<String> = shards
        .iter()
        .map(|(_, p)| {
            decode::<ShardRecord>(p, None)
                .expect("shard")
                .record
                .image_id
        })
        .collect();
    assert_eq!(ids2, ids);
}
