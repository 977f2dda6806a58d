//! The pipeline file's retraining policy (`stages.trainer.settings.retrain_every_images`):
//! `pcb up` starts a `pcb train` job each time that many new labelled images reached the
//! shard stream.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::supervisor::{absolute, Running};

/// The pipeline file's retraining policy: a `pcb train` job each time
/// `retrain_every_images` new labelled images reached the shard stream.
pub struct Retrainer {
    every: u64,
    state_file: PathBuf,
    last_seq: u64,
    job: Option<(String, Child)>,
    args: Vec<std::ffi::OsString>,
    log: PathBuf,
    last_check: Instant,
}

impl Retrainer {
    /// New labelled images that start a job.
    pub fn every(&self) -> u64 {
        self.every
    }

    /// The policy of a started pipeline; `None` when it is off.
    pub fn new(running: &Running, pipeline_file: &Path) -> Option<Retrainer> {
        let every = running
            .pipeline
            .stages
            .trainer
            .settings
            .retrain_every_images;
        if every == 0 {
            return None;
        }
        let state_file = running.data_dir.join("run").join("retrain.seq");
        let last_seq = std::fs::read_to_string(&state_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Some(Retrainer {
            every,
            state_file,
            last_seq,
            job: None,
            args: vec![
                "train".into(),
                "--nats-url".into(),
                running.nats_url.clone().into(),
                "--pipeline".into(),
                absolute(pipeline_file).into(),
                "--data-dir".into(),
                running.data_dir.clone().into(),
            ],
            log: running.data_dir.join("logs").join("retrain.log"),
            last_check: Instant::now() - Duration::from_secs(60),
        })
    }

    /// Starts a job when enough new labelled images arrived and none is running.
    pub async fn poll(&mut self, js: &async_nats::jetstream::Context) -> anyhow::Result<()> {
        if let Some((name, child)) = &mut self.job {
            match child.try_wait()? {
                None => return Ok(()),
                Some(status) => {
                    eprintln!(
                        "pcb: retraining job {name} ended ({status}); see {}",
                        self.log.display()
                    );
                    self.job = None;
                }
            }
        }
        if self.last_check.elapsed() < Duration::from_secs(5) {
            return Ok(());
        }
        self.last_check = Instant::now();
        let mut stream = js.get_stream(pcb_schemas::STREAM_SHARDS).await?;
        let last = stream.info().await?.state.last_sequence;
        if last < self.last_seq + self.every {
            return Ok(());
        }
        let name = format!("auto-{last}");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(&self.args)
            .arg("--job")
            .arg(&name)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = crate::process::spawn_tied(cmd).context("starting a retraining job")?;
        eprintln!(
            "pcb: {} new labelled images since sequence {}: retraining job {name} started (log {})",
            last - self.last_seq,
            self.last_seq,
            self.log.display()
        );
        self.last_seq = last;
        std::fs::write(&self.state_file, last.to_string())?;
        self.job = Some((name, child));
        Ok(())
    }

    /// Stops a running job (it resumes from its checkpoint under the same name).
    pub fn stop(&mut self) {
        if let Some((_, child)) = &mut self.job {
            crate::process::terminate(child, Duration::from_secs(15));
        }
    }
}
