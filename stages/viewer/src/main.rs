//! `viewer` binary: loads config, starts tracing and the shutdown signal, runs the stage.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Serves the inspection viewer (boards, overview, models) from the live streams.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML config file; `PCB_<SECTION>__<KEY>` environment variables override it.
    #[arg(long, short, env = "PCB_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = pcb_viewer::Config::load(args.config.as_deref())?;
    pcb_common::init_tracing(&config.log);
    let client = pcb_common::connect(&config.nats, "pcb-viewer")
        .await
        .context("viewer cannot start")?;
    let shutdown = pcb_common::Shutdown::on_signals();
    pcb_viewer::run(config, client, shutdown).await?;
    Ok(())
}
