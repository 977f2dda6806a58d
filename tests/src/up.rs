//! `pcb up` as a child process for whole-pipeline tests: its pipeline file, data dir and log,
//! the admin's JetStream, and boards dropped into its inbox.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use pcb_common::{Identity, IdentityStore};

use crate::{bin, board_sources, wait_until, Ledger};

/// `pcb up`, stopped with SIGTERM on drop.
pub struct Up(pub Child);

impl Drop for Up {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Drops `count` synthetic boards into `inbox/<wave>`; returns their sources.
pub fn drop_wave(
    dir: &Path,
    inbox: &Path,
    wave: &str,
    count: usize,
    seed: u64,
) -> BTreeSet<String> {
    let boards = dir.join(format!("boards-{wave}"));
    crate::synth_sized(&boards, count, seed, 128, 0.25);
    let sources = board_sources(&boards, &boards)
        .into_iter()
        .map(|s| format!("{wave}/{s}"))
        .collect();
    crate::drop_into(&boards, &inbox.join(wave));
    sources
}

pub async fn detections(js: &jetstream::Context) -> u64 {
    match js.get_stream(pcb_schemas::STREAM_DETECTIONS).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// `pcb up` on a fresh data dir with `args`; its log, the admin's JetStream and the inbox.
pub struct Pipeline {
    _up: Up,
    /// Scratch space (boards, the pipeline file, the log).
    pub dir: tempfile::TempDir,
    /// The pipeline's data dir.
    pub data: std::path::PathBuf,
    /// What `pcb up` printed on stderr.
    pub log: std::path::PathBuf,
    /// JetStream as the admin.
    pub js: jetstream::Context,
}

impl Pipeline {
    /// Starts `pcb up args` with a pipeline file of `data_dir` and `extra` lines.
    pub async fn up(args: &[&str]) -> Pipeline {
        Pipeline::up_with(args, "").await
    }

    /// [`Pipeline::up`] with more pipeline file lines.
    pub async fn up_with(args: &[&str], extra: &str) -> Pipeline {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let pipeline = dir.path().join("pipeline.toml");
        std::fs::write(
            &pipeline,
            format!(
                "[pipeline]\ndata_dir = {:?}\n[nats]\nurl = \"\"\n{extra}",
                data.display().to_string()
            ),
        )
        .expect("pipeline");
        let p = pipeline.to_str().expect("utf-8");
        let log = dir.path().join("pcb-up.log");
        let up = Up(Command::new(bin("pcb"))
            .args(["up", "--pipeline", p, "--viewer-addr", "127.0.0.1:0"])
            .args(args)
            .env_remove("PCB_PIPELINE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("pcb up"));
        let url_file = data.join("run").join("nats.url");
        let started = wait_until(Duration::from_secs(90), || {
            let ready = url_file.exists();
            async move { ready }
        })
        .await;
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(started, "pcb up did not start:\n{said}");
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
        Pipeline {
            _up: up,
            js: jetstream::new(admin),
            dir,
            data,
            log,
        }
    }

    /// Waits (4 minutes at most) until `pcb.detections` holds `n` messages.
    pub async fn wait_detections(&self, n: u64) {
        assert!(
            wait_until(Duration::from_secs(240), || async {
                detections(&self.js).await >= n
            })
            .await,
            "fewer than {n} detections:\n{}",
            self.said()
        );
    }

    /// What `pcb up` printed so far.
    pub fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The watched folder.
    pub fn inbox(&self) -> std::path::PathBuf {
        self.data.join("inbox")
    }

    /// Drops `count` synthetic boards into `inbox/<wave>`; returns their sources.
    pub fn wave(&self, wave: &str, count: usize, seed: u64) -> BTreeSet<String> {
        drop_wave(self.dir.path(), &self.inbox(), wave, count, seed)
    }

    /// Waits until every board has its detection or dead letter, then for stragglers, and
    /// returns the ledger.
    pub async fn settle(&self, boards: &BTreeSet<String>) -> (bool, Ledger) {
        let settled = wait_until(Duration::from_secs(300), || async {
            Ledger::read(&self.js, boards).await.lost.is_empty()
        })
        .await;
        // Late duplicates (a redelivery after the fault) would land within an ack wait.
        tokio::time::sleep(Duration::from_secs(5)).await;
        (settled, Ledger::read(&self.js, boards).await)
    }
}
