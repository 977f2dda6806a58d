//! `ingester` binary: watches a directory (or imports one with `--once`) into
//! `pcb.images.raw`.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Publishes board images dropped into a watched directory to JetStream.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML config file; `PCB_<SECTION>__<KEY>` environment variables override it.
    #[arg(long, short, env = "PCB_CONFIG")]
    config: Option<PathBuf>,
    /// Import every board under DIR once, print a summary and exit (files stay in place).
    #[arg(long, value_name = "DIR")]
    once: Option<PathBuf>,
    /// With --once: move files to processed/ and rejected/ as the watcher does.
    #[arg(long, requires = "once")]
    move_files: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = pcb_ingester::Config::load(args.config.as_deref())?;
    pcb_common::init_tracing(&config.log);
    let client = pcb_common::connect(&config.nats, "pcb-ingester")
        .await
        .context("ingester cannot start")?;
    let shutdown = pcb_common::Shutdown::on_signals();
    let Some(dir) = args.once else {
        pcb_ingester::run(config, client, shutdown).await?;
        return Ok(());
    };
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    config.settings.watch_dir = dir.clone();
    if config.settings.processed_dir.starts_with("inbox") {
        config.settings.processed_dir = dir.join("processed");
        config.settings.rejected_dir = dir.join("rejected");
    }
    let js = async_nats::jetstream::new(client.clone());
    pcb_common::apply_topology(&js, &config.streams).await?;
    let bar = indicatif::ProgressBar::new(0);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} importing [{bar:40}] {pos}/{len} files {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let max_payload = client.server_info().max_payload;
    let started = std::time::Instant::now();
    let summary = tokio::select! {
        s = pcb_ingester::import(js, config.settings, max_payload, args.move_files, |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }) => s,
        _ = shutdown.cancelled() => anyhow::bail!("import interrupted; run it again: duplicates are skipped"),
    };
    bar.finish_and_clear();
    println!(
        "imported {} in {:.1}s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    print!("{summary}");
    client.flush().await.ok();
    Ok(())
}
