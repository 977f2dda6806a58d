//! The `pcb` launcher's library: the pipeline file, the private nats-server, `up`, `demo`,
//! `status` and `bench`; also used by the cross-stage tests.

pub mod bench;
pub mod bench_detector;
pub mod bench_trainer;
pub mod bench_viewer;
pub mod bench_vision;
pub mod default_model;
pub mod demo;
pub mod models_cli;
pub mod pipeline;
pub mod process;
pub mod reach;
pub mod retrain;
pub mod server;
pub mod status;
pub mod supervisor;
pub mod train_job;
pub mod up;
pub mod vision_cli;

use std::path::Path;

/// The pipeline file every command reads unless told otherwise.
pub const DEFAULT_PIPELINE: &str = "pipelines/local.toml";

/// Board images still waiting in a watched folder (outside `processed/` and `rejected/`).
pub fn pairing_count(watch_dir: &Path) -> usize {
    pcb_ingester::pairing::scan(
        watch_dir,
        &[watch_dir.join("processed"), watch_dir.join("rejected")],
    )
    .len()
}
