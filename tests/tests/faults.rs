//! Faults under load, each settled with a ledger: every board dropped ends with exactly one
//! detection per model version or a dead letter; nothing lost, nothing duplicated.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use pcb_common::{Identity, IdentityStore};
use pcb_tests::{bin, board_sources, pids_with_arg, wait_until, Ledger};

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Drops `count` synthetic boards into `inbox/<wave>`; returns their sources.
fn drop_wave(dir: &Path, inbox: &Path, wave: &str, count: usize, seed: u64) -> BTreeSet<String> {
    let boards = dir.join(format!("boards-{wave}"));
    pcb_tests::synth_sized(&boards, count, seed, 128, 0.25);
    let sources = board_sources(&boards, &boards)
        .into_iter()
        .map(|s| format!("{wave}/{s}"))
        .collect();
    pcb_tests::drop_into(&boards, &inbox.join(wave));
    sources
}

async fn detections(js: &jetstream::Context) -> u64 {
    match js.get_stream(pcb_schemas::STREAM_DETECTIONS).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// The private server SIGKILLed mid-stream: `pcb up` restarts it on the same port and
/// store, every stage reconnects, the ingester holds the boards dropped while it was down,
/// and every board gets its one detection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_mid_stream_is_restarted_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let pipeline = dir.path().join("pipeline.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[pipeline]\ndata_dir = {:?}\n[nats]\nurl = \"\"\n",
            data.display().to_string()
        ),
    )
    .expect("pipeline");
    let p = pipeline.to_str().expect("utf-8");
    let log = dir.path().join("pcb-up.log");
    let _up = Up(Command::new(bin("pcb"))
        .args(["up", "--pipeline", p, "--viewer-addr", "127.0.0.1:0"])
        .env_remove("PCB_PIPELINE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("pcb up"));
    let said = || std::fs::read_to_string(&log).unwrap_or_default();
    let url_file = data.join("run").join("nats.url");
    assert!(
        wait_until(Duration::from_secs(60), || {
            let ready = url_file.exists();
            async move { ready }
        })
        .await,
        "pcb up did not start:\n{}",
        said()
    );
    let url = std::fs::read_to_string(&url_file).expect("url");
    let ids = IdentityStore::ensure(&data.join("identities")).expect("identities");
    let admin = pcb_common::nats::connect_now(
        &ids.connection(
            Identity::Admin,
            &pcb_common::NatsConfig {
                url: url.trim().to_string(),
                ..Default::default()
            },
        ),
        "faults",
    )
    .await
    .expect("admin");
    let js = jetstream::new(admin);
    let inbox = data.join("inbox");

    let mut boards = drop_wave(dir.path(), &inbox, "wave1", 10, 11);
    assert!(
        wait_until(Duration::from_secs(240), || async {
            detections(&js).await >= 3
        })
        .await,
        "no detections before the fault:\n{}",
        said()
    );
    let conf = data.join("nats").join("nats-server.conf");
    let pids = pids_with_arg(&conf.display().to_string());
    assert_eq!(pids.len(), 1, "one server: {pids:?}");
    let before = detections(&js).await;
    // SAFETY: kill(2) on the private server's pid, read from /proc just now.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    let killed = Instant::now();
    // Boards dropped while the server is down wait in the inbox.
    boards.extend(drop_wave(dir.path(), &inbox, "wave2", 10, 12));
    let back = wait_until(Duration::from_secs(60), || async {
        let now = pids_with_arg(&conf.display().to_string());
        !now.is_empty() && now != pids
    })
    .await;
    assert!(back, "the server was not restarted:\n{}", said());
    let restarted_after = killed.elapsed();
    let resumed = wait_until(Duration::from_secs(240), || async {
        detections(&js).await > before
    })
    .await;
    assert!(resumed, "no detection after the restart:\n{}", said());
    let resumed_after = killed.elapsed();
    boards.extend(drop_wave(dir.path(), &inbox, "wave3", 10, 13));

    let settled = wait_until(Duration::from_secs(300), || async {
        let l = Ledger::read(&js, &boards).await;
        l.lost.is_empty()
    })
    .await;
    // Late duplicates (a redelivery after the restart) would land within an ack wait.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ledger = Ledger::read(&js, &boards).await;
    println!(
        "server SIGKILL: {ledger}; restarted after {:.1} s, first detection after {:.1} s",
        restarted_after.as_secs_f64(),
        resumed_after.as_secs_f64()
    );
    assert!(settled && ledger.balanced(), "{ledger}\n{}", said());
    assert_eq!(ledger.boards, 30);
    assert!(said().contains("nats-server exited"), "{}", said());
}
