//! `pcb bench pipeline`: bare image decoding against ingester → encoder → router over a
//! real JetStream, on the same boards and machine, in one run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pcb_schemas::STREAM_SHARDS;

use crate::server::NatsServer;

/// The Python that runs a benchmark's reference side (torchvision and friends).
#[derive(clap::Args, Clone, Debug)]
pub struct ReferencePython {
    /// Python with torch 2.11 and torchvision 0.26, and for `pcb bench vision` onnxruntime
    /// and openvino (deploy/requirements-bench.txt).
    #[arg(
        long,
        env = "PCB_BENCH_PYTHON",
        default_value = ".venv-bench/bin/python"
    )]
    pub python: String,
}

impl ReferencePython {
    /// Runs `script` with `--flag value` pairs and parses the JSON it prints on stdout (its
    /// progress goes to our stderr).
    pub fn run_json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        script: &Path,
        flags: &[(&str, String)],
    ) -> anyhow::Result<T> {
        if !script.exists() {
            bail!("{} not found: run from the project root", script.display());
        }
        eprintln!("bench: {what} ({})", self.python);
        let mut cmd = std::process::Command::new(&self.python);
        cmd.arg(script);
        for (flag, value) in flags {
            cmd.arg(flag).arg(value);
        }
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| {
                format!(
                    "running {} (install deploy/requirements-bench.txt)",
                    self.python
                )
            })?;
        if !out.status.success() {
            bail!("{} failed ({})", script.display(), out.status);
        }
        serde_json::from_slice(&out.stdout).context("reference JSON")
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// Boards handled.
    pub boards: usize,
    /// Wall time.
    pub seconds: f64,
}

impl Row {
    /// Boards per second.
    pub fn rate(&self) -> f64 {
        self.boards as f64 / self.seconds.max(1e-9)
    }
}

fn board_files(dir: &Path) -> Vec<(PathBuf, Option<PathBuf>)> {
    pcb_ingester::pairing::scan(dir, &[])
        .into_iter()
        .filter_map(|p| {
            let unit = pcb_ingester::pairing::pair(&p, dir).ok()?;
            Some((unit.image, unit.template))
        })
        .collect()
}

/// Decodes every board (image and template) from memory on `threads` threads.
pub fn bare_decode(boards: &[(Vec<u8>, Option<Vec<u8>>)], threads: usize) -> anyhow::Result<Row> {
    let started = Instant::now();
    let chunk = boards.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = boards
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || -> anyhow::Result<()> {
                    for (img, tpl) in part {
                        image::load_from_memory(img)?;
                        if let Some(t) = tpl {
                            image::load_from_memory(t)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("decode thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(Row {
        name: format!("bare decode, image crate ({threads} threads)"),
        boards: boards.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Runs the benchmark on the boards of `dir`, or on `count` synthetic boards when `dir`
/// is `None`, and returns the table's rows.
pub async fn pipeline(count: usize, seed: u64, dir: Option<&Path>) -> anyhow::Result<Vec<Row>> {
    let tmp = tempfile::tempdir()?;
    let sample = match dir {
        Some(d) => {
            if !d.is_dir() {
                bail!("{} is not a folder", d.display());
            }
            d.to_path_buf()
        }
        None => {
            let sample = tmp.path().join("sample");
            eprintln!("bench: generating {count} synthetic boards");
            let dir = sample.clone();
            tokio::task::spawn_blocking(move || {
                pcb_synth::generate(
                    &pcb_synth::SynthOptions {
                        count,
                        seed,
                        ..Default::default()
                    },
                    &dir,
                    &mut |_, _| {},
                )
            })
            .await??;
            sample
        }
    };
    let files = board_files(&sample);
    if files.is_empty() {
        bail!("no board images found under {}", sample.display());
    }
    eprintln!("bench: {} boards from {}", files.len(), sample.display());
    let mut boards = Vec::with_capacity(files.len());
    for (img, tpl) in &files {
        boards.push((
            std::fs::read(img)?,
            tpl.as_ref().map(std::fs::read).transpose()?,
        ));
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!("bench: bare decode");
    let bare = tokio::task::spawn_blocking(move || bare_decode(&boards, threads)).await??;

    eprintln!("bench: pipeline over JetStream");
    let nats_dir = tmp.path().join("nats");
    let mut server = tokio::task::spawn_blocking(move || NatsServer::start(&nats_dir, 0)).await??;
    let nats = pcb_common::NatsConfig {
        url: server.url(),
        ..Default::default()
    };
    let client = pcb_common::connect(&nats, "pcb-bench").await?;
    let js = async_nats::jetstream::new(client.clone());
    pcb_common::provision(
        &js,
        &pcb_common::Topology::default(),
        &pcb_common::topology::default_consumers(),
    )
    .await?;
    let shutdown = pcb_common::Shutdown::new();
    let base = |c: &str| -> anyhow::Result<String> {
        Ok(format!(
            "[nats]\nurl = {:?}\n[metrics]\naddr = \"\"\n{c}",
            server.url()
        ))
    };
    let enc_cfg: pcb_encoder::FileConfig = toml::from_str(&base("")?)?;
    let rt_cfg: pcb_router::FileConfig = toml::from_str(&base("")?)?;
    let enc = tokio::spawn(pcb_common::stage::run(
        enc_cfg,
        client.clone(),
        shutdown.clone(),
    ));
    let rt = tokio::spawn(pcb_common::stage::run(
        rt_cfg,
        client.clone(),
        shutdown.clone(),
    ));
    let ing_cfg: pcb_ingester::FileConfig = toml::from_str(&base("")?)?;
    let mut ing = ing_cfg
        .validate()
        .map_err(|p| anyhow::anyhow!("{p}"))?
        .config;
    ing.file.watch_dir = sample.clone();
    let started = Instant::now();
    let summary = pcb_ingester::import(
        js.clone(),
        ing,
        client.server_info().max_payload,
        false,
        |_, _| {},
    )
    .await;
    if summary.published != files.len() {
        bail!(
            "ingester published {} of {} boards:\n{summary}",
            summary.published,
            files.len()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut stream = js
            .get_stream(STREAM_SHARDS)
            .await
            .context("shards stream")?;
        if stream.info().await?.state.messages as usize >= files.len() {
            break;
        }
        if Instant::now() > deadline {
            bail!("pipeline did not route every board within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let piped = Row {
        name: "ingester → encoder → router (JetStream)".into(),
        boards: files.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    shutdown.trigger();
    let _ = enc.await;
    let _ = rt.await;

    // What storing the pipeline's own bytes costs the server on these cores, with no
    // decoding at all: the server shares the machine with the stages, so it bounds the
    // pipeline together with the decode.
    let (mut messages, mut bytes) = (0u64, 0u64);
    for name in [pcb_schemas::STREAM_IMAGES, STREAM_SHARDS] {
        let state = js.get_stream(name).await?.info().await?.state.clone();
        messages += state.messages;
        bytes += state.bytes;
    }
    eprintln!("bench: JetStream alone ({messages} messages, {bytes} bytes)");
    let store = store_alone(&js, messages, bytes, files.len()).await?;
    server.stop();
    let ceiling = Row {
        name: "ceiling: decode and JetStream on one machine".into(),
        boards: files.len(),
        seconds: bare.seconds + store.seconds,
    };
    Ok(vec![bare, piped, store, ceiling])
}

/// Publishes `messages` messages totalling `bytes` to a scratch file stream, 256 acks
/// in flight, and reports it per board.
async fn store_alone(
    js: &async_nats::jetstream::Context,
    messages: u64,
    bytes: u64,
    boards: usize,
) -> anyhow::Result<Row> {
    let name = "PCB_BENCH_STORE";
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec!["pcb-bench.store".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .context("creating the scratch stream")?;
    let size = (bytes / messages.max(1)) as usize;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for _ in 0..messages {
        if acks.len() >= 256 {
            if let Some(ack) = acks.pop_front() {
                let ack: async_nats::jetstream::context::PublishAckFuture = ack;
                ack.await?;
            }
        }
        acks.push_back(js.publish("pcb-bench.store", payload.clone()).await?);
    }
    for ack in acks {
        ack.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    js.delete_stream(name).await.ok();
    Ok(Row {
        name: format!("JetStream alone ({messages} msgs of {} KB)", size / 1024),
        boards,
        seconds,
    })
}

/// The table, with each row's rate relative to the first; when a ceiling row is present,
/// the pipeline's share of it follows.
pub fn render(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<44} {:>7} {:>9} {:>10} {:>8}\n",
        "path", "boards", "seconds", "boards/s", "ratio"
    );
    let base = rows.first().map_or(1.0, Row::rate);
    for r in rows {
        out.push_str(&format!(
            "{:<44} {:>7} {:>9.2} {:>10.1} {:>7.0}%\n",
            r.name,
            r.boards,
            r.seconds,
            r.rate(),
            100.0 * r.rate() / base
        ));
    }
    if let (Some(piped), Some(ceiling)) = (rows.get(1), rows.get(3)) {
        out.push_str(&format!(
            "pipeline at {:.0}% of the ceiling (1 / (1/decode + 1/JetStream alone))\n",
            100.0 * piped.rate() / ceiling.rate().max(1e-9)
        ));
    }
    out
}
