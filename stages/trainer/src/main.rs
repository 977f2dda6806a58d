//! `trainer` binary: one rank of a training job; loads config, starts tracing and the
//! shutdown signal, runs the stage.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// One rank of a data-parallel training job over the shard streams.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML config file; `PCB_<SECTION>__<KEY>` environment variables override it, and
    /// `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` override those.
    #[arg(long, short, env = "PCB_CONFIG")]
    config: Option<PathBuf>,
    /// This rank (overrides the config and `RANK`).
    #[arg(long)]
    rank: Option<usize>,
    /// Ranks in the job (overrides the config and `WORLD_SIZE`).
    #[arg(long)]
    world_size: Option<usize>,
    /// Address of rank 0 (overrides the config and `MASTER_ADDR`).
    #[arg(long)]
    master_addr: Option<String>,
    /// Port of rank 0's store (overrides the config and `MASTER_PORT`).
    #[arg(long)]
    master_port: Option<u16>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Flags go through the same environment layer so that validation sees them.
    for (name, value) in [
        ("RANK", args.rank.map(|v| v.to_string())),
        ("WORLD_SIZE", args.world_size.map(|v| v.to_string())),
        ("MASTER_ADDR", args.master_addr.clone()),
        ("MASTER_PORT", args.master_port.map(|v| v.to_string())),
    ] {
        if let Some(v) = value {
            std::env::set_var(name, v);
        }
    }
    let config = pcb_trainer::Config::load(args.config.as_deref())?;
    pcb_common::init_tracing(&config.log);
    let client = pcb_common::connect(&config.nats, "pcb-trainer")
        .await
        .context("trainer cannot start")?;
    let shutdown = pcb_common::Shutdown::on_signals();
    let rank = config.dist.rank;
    pcb_trainer::run(config, client, shutdown)
        .await
        .with_context(|| format!("trainer rank {rank} failed"))?;
    Ok(())
}
