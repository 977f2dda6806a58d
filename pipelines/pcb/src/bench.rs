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

    // The pipeline on a server without authentication and on one that admits only the
    // identities `pcb up` issues (each stage its own, held to its permissions),
    // alternately, twice each: the best of each pair goes in the table.
    // and with every write synced to disk before its ack (`sync_interval: always`) against
    // the server's default (every 2 minutes).
    let variants = [
        Variant {
            auth: false,
            sync_always: false,
        },
        Variant {
            auth: true,
            sync_always: false,
        },
        Variant {
            auth: false,
            sync_always: true,
        },
    ];
    let mut best: Vec<Option<Row>> = vec![None; variants.len()];
    let mut stored = (0u64, 0u64);
    for round in 0..2 {
        for (i, v) in variants.iter().enumerate() {
            eprintln!(
                "bench: pipeline over JetStream, {} (round {})",
                v.label(),
                round + 1
            );
            let (row, bytes) = piped(tmp.path(), &sample, files.len(), *v).await?;
            stored = bytes;
            if best[i].as_ref().is_none_or(|b| row.seconds < b.seconds) {
                best[i] = Some(row);
            }
        }
    }
    let Some(rows) = best.into_iter().collect::<Option<Vec<Row>>>() else {
        bail!("no pipeline run");
    };

    // What storing the pipeline's own bytes costs the server on these cores, with no
    // decoding at all: the server shares the machine with the stages, so it bounds the
    // pipeline together with the decode.
    let (messages, bytes) = stored;
    eprintln!("bench: JetStream alone ({messages} messages, {bytes} bytes)");
    let nats_dir = tmp.path().join("nats-store");
    let mut server = tokio::task::spawn_blocking(move || NatsServer::start(&nats_dir, 0)).await??;
    let client = pcb_common::connect(
        &pcb_common::NatsConfig {
            url: server.url(),
            ..Default::default()
        },
        "pcb-bench",
    )
    .await?;
    let js = async_nats::jetstream::new(client);
    let store = store_alone(&js, messages, bytes, files.len()).await?;
    drop(js);
    server.stop();
    let ceiling = Row {
        name: "ceiling: decode and JetStream on one machine".into(),
        boards: files.len(),
        seconds: bare.seconds + store.seconds,
    };
    let mut out = vec![bare];
    out.extend(rows);
    out.extend([store, ceiling]);
    Ok(out)
}

/// One way of running the server in the pipeline rows.
#[derive(Debug, Clone, Copy)]
struct Variant {
    /// Authentication on, each stage its own identity.
    auth: bool,
    /// `sync_interval: always` instead of the server's default.
    sync_always: bool,
}

impl Variant {
    fn label(self) -> &'static str {
        match (self.auth, self.sync_always) {
            (false, false) => "ingester → encoder → router (JetStream)",
            (true, false) => "the same, authentication on",
            (false, true) => "the same, sync_interval always",
            (true, true) => "the same, authentication and sync always",
        }
    }
}

/// One run of ingester → encoder → router over a fresh private server, each stage with a
/// client of its own (with `auth`, its own identity on a server that admits only those);
/// returns the row and the messages and bytes the server stored.
async fn piped(
    scratch: &Path,
    sample: &Path,
    boards: usize,
    variant: Variant,
) -> anyhow::Result<(Row, (u64, u64))> {
    let auth = variant.auth;
    use pcb_common::{Identity, IdentityStore};
    let run = tempfile::tempdir_in(scratch)?;
    let nats_dir = run.path().join("nats");
    let ids = if auth {
        Some(IdentityStore::ensure(&run.path().join("identities"))?)
    } else {
        None
    };
    let for_server = ids.clone();
    let sync_interval = variant.sync_always.then(|| "always".to_string());
    let mut server = tokio::task::spawn_blocking(move || {
        NatsServer::start_opts(
            &nats_dir,
            0,
            &crate::server::ServerOptions {
                identities: for_server.as_ref(),
                sync_interval,
                ..Default::default()
            },
        )
    })
    .await??;
    let base = pcb_common::NatsConfig {
        url: server.url(),
        ..Default::default()
    };
    let nats_as = |id: Identity| IdentityStore::connection_of(ids.as_ref(), id, &base);
    let connect = |id: Identity| {
        let nats = nats_as(id);
        async move { pcb_common::nats::connect_now(&nats, id.name()).await }
    };
    let admin = async_nats::jetstream::new(connect(Identity::Admin).await?);
    pcb_common::topology::provision_defaults(&admin).await?;
    let shutdown = pcb_common::Shutdown::new();
    let config = |id: Identity| -> anyhow::Result<String> {
        let nats = toml::Value::try_from(nats_as(id))?;
        let mut t = toml::Table::new();
        t.insert("nats".into(), nats);
        Ok(format!(
            "{}\n[metrics]\naddr = \"\"\n",
            toml::to_string(&t)?
        ))
    };
    let encoder = Identity::Stage(pcb_schemas::StageName::Encoder);
    let router = Identity::Stage(pcb_schemas::StageName::Router);
    let ingester = Identity::Stage(pcb_schemas::StageName::Ingester);
    let enc_cfg: pcb_encoder::FileConfig = toml::from_str(&config(encoder)?)?;
    let rt_cfg: pcb_router::FileConfig = toml::from_str(&config(router)?)?;
    let enc = tokio::spawn(pcb_common::stage::run(
        enc_cfg,
        connect(encoder).await?,
        shutdown.clone(),
    ));
    let rt = tokio::spawn(pcb_common::stage::run(
        rt_cfg,
        connect(router).await?,
        shutdown.clone(),
    ));
    let ing_cfg: pcb_ingester::FileConfig = toml::from_str(&config(ingester)?)?;
    let mut ing = ing_cfg
        .validate()
        .map_err(|p| anyhow::anyhow!("{p}"))?
        .config;
    ing.file.watch_dir = sample.to_path_buf();
    let ing_client = connect(ingester).await?;
    let max_payload = ing_client.server_info().max_payload;
    let started = Instant::now();
    let summary = pcb_ingester::import(
        async_nats::jetstream::new(ing_client),
        ing,
        max_payload,
        false,
        |_, _| {},
    )
    .await;
    if summary.published != boards {
        bail!(
            "ingester published {} of {boards} boards:\n{summary}",
            summary.published
        );
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut stream = admin
            .get_stream(STREAM_SHARDS)
            .await
            .context("shards stream")?;
        if stream.info().await?.state.messages as usize >= boards {
            break;
        }
        if Instant::now() > deadline {
            bail!("pipeline did not route every board within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let row = Row {
        name: variant.label().into(),
        boards,
        seconds: started.elapsed().as_secs_f64(),
    };
    shutdown.trigger();
    let _ = enc.await;
    let _ = rt.await;
    let (mut messages, mut bytes) = (0u64, 0u64);
    for name in [pcb_schemas::STREAM_IMAGES, STREAM_SHARDS] {
        let state = admin.get_stream(name).await?.info().await?.state.clone();
        messages += state.messages;
        bytes += state.bytes;
    }
    // Clients first: one that outlives its server only logs reconnection attempts.
    drop(admin);
    server.stop();
    Ok((row, (messages, bytes)))
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
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix));
    let piped = find("ingester →");
    if let (Some(piped), Some(ceiling)) = (piped, find("ceiling")) {
        out.push_str(&format!(
            "pipeline at {:.0}% of the ceiling (1 / (1/decode + 1/JetStream alone))\n",
            100.0 * piped.rate() / ceiling.rate().max(1e-9)
        ));
    }
    for (prefix, what) in [
        ("the same, authentication on", "authentication on"),
        ("the same, sync_interval always", "sync_interval always"),
    ] {
        if let (Some(piped), Some(other)) = (piped, find(prefix)) {
            out.push_str(&format!(
                "{what}: {:.0}% of the rate without ({:+.1}% time)\n",
                100.0 * other.rate() / piped.rate().max(1e-9),
                100.0 * (other.seconds / piped.seconds.max(1e-9) - 1.0)
            ));
        }
    }
    out
}
