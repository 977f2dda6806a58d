//! `pcb bench detector`: the bare model's images/s beside the online detector's through
//! JetStream, and latency from a file landing in the watched folder to its detection
//! message, on the same machine, threads and weights, in one run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use pcb_registry::{NewVersion, Registry};
use pcb_schemas::{EncodedImage, STREAM_DETECTIONS, SUBJECT_ENCODED};
use pcb_vision::{compose, Detector, InferenceOptions, Sampling};

use crate::supervisor::{Running, UpOptions};

/// Flags of `pcb bench detector`.
#[derive(clap::Args, Clone, Debug)]
pub struct DetectorBenchArgs {
    /// Boards for the throughput phases.
    #[arg(long, default_value_t = 64)]
    pub count: usize,
    /// Boards dropped one by one for the latency phase.
    #[arg(long, default_value_t = 40)]
    pub latency_count: usize,
    /// Board side in pixels.
    #[arg(long, default_value_t = 640)]
    pub size: u32,
    /// Images per forward pass (the detector's max_batch).
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Pipeline file (its detector, trainer model and streams settings are used).
    #[arg(long, default_value = "pipelines/local.toml")]
    pub pipeline: std::path::PathBuf,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn count(js: &async_nats::jetstream::Context) -> anyhow::Result<u64> {
    Ok(js
        .get_stream(STREAM_DETECTIONS)
        .await?
        .info()
        .await?
        .state
        .messages)
}

async fn wait_for(
    js: &async_nats::jetstream::Context,
    running: &mut Running,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while count(js).await? < n {
        running.check_children()?;
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} detections within {timeout:?}",
                count(js).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// One timed pass of the bare model over the boards.
struct Bare {
    rate: f64,
    batch_secs: f64,
    cpu_per_image: f64,
}

/// Times the bare model (the pipeline's training recipe with deterministic weights, as the
/// detector stage serves it) over `inputs` in batches of `batch`, after one warm-up batch;
/// saves the weights to `save` when given.
async fn bare_pass(
    config: &pcb_vision::ModelConfig,
    inputs: &[(Vec<u8>, Option<Vec<u8>>)],
    batch: usize,
    save: Option<&std::path::Path>,
) -> anyhow::Result<Bare> {
    let (config, inputs) = (config.clone(), inputs.to_vec());
    let save = save.map(|p| p.to_path_buf());
    tokio::task::spawn_blocking(move || -> anyhow::Result<Bare> {
        tch::manual_seed(5);
        let mut det = Detector::new(config.clone(), tch::Device::Cpu, Sampling::Random);
        if let Some(path) = &save {
            det.save(path)?;
        }
        // As the detector stage serves it by default.
        det.model
            .prepare_inference(InferenceOptions::fast(pcb_vision::Bf16::Auto));
        let tensors = inputs
            .iter()
            .map(|(i, t)| {
                let img = pcb_vision::data::decode_grey(i, "bench")?;
                let tpl = t
                    .as_ref()
                    .map(|t| pcb_vision::data::decode_grey(t, "bench"))
                    .transpose()?;
                compose(config.input, &img, tpl.as_ref())
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Warm-up, then the timed pass over every board in batches.
        tch::no_grad(|| det.model.detect(&tensors[..batch.min(tensors.len())]))?;
        let started = Instant::now();
        let cpu_before = own_cpu_secs();
        let mut batches = 0;
        for chunk in tensors.chunks(batch) {
            tch::no_grad(|| det.model.detect(chunk))?;
            batches += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = own_cpu_secs() - cpu_before;
        Ok(Bare {
            rate: tensors.len() as f64 / secs,
            batch_secs: secs / batches as f64,
            cpu_per_image: cpu / tensors.len() as f64,
        })
    })
    .await?
}

/// This process's CPU time (user + system, every thread), in seconds.
fn own_cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Another process's CPU time (user + system) from `/proc/PID/stat`, in seconds.
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields that follow it start after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// The detector's own model time over the first `n` detections, read back from their
/// `inference_ms` (each batch's time shared among its images, so a batch is the images
/// with the same value).
struct ModelTime {
    total_secs: f64,
    first_batch_secs: f64,
    median_batch_secs: f64,
    batches: usize,
    /// How many batches had each size, e.g. "4×12".
    sizes: String,
}

/// Reads the first `n` detections back and sums the detector's model time by batch.
async fn model_time(js: &async_nats::jetstream::Context, n: usize) -> anyhow::Result<ModelTime> {
    let consumer = js
        .get_stream(STREAM_DETECTIONS)
        .await?
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?;
    // Batches in the order their first answer was stored.
    let mut batches: Vec<(u64, usize)> = Vec::new();
    for _ in 0..n {
        let Some(m) = futures::StreamExt::next(&mut messages).await else {
            break;
        };
        let d: pcb_schemas::Detection = pcb_schemas::decode(&m?.payload, None)?;
        let key = d.inference_ms.to_bits();
        match batches.iter_mut().find(|(k, _)| *k == key) {
            Some((_, count)) => *count += 1,
            None => batches.push((key, 1)),
        }
    }
    let secs: Vec<f64> = batches
        .iter()
        .map(|(k, count)| f64::from_bits(*k) * *count as f64 / 1000.0)
        .collect();
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let mut by_size = std::collections::BTreeMap::new();
    for (_, count) in &batches {
        *by_size.entry(*count).or_insert(0) += 1;
    }
    Ok(ModelTime {
        total_secs: secs.iter().sum(),
        first_batch_secs: secs.first().copied().unwrap_or(f64::NAN),
        median_batch_secs: pct(&sorted, 0.5),
        batches: batches.len(),
        sizes: by_size
            .iter()
            .map(|(size, k)| format!("{size}×{k}"))
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// Runs the benchmark and prints its table.
pub async fn run(args: &DetectorBenchArgs) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let sample = tmp.path().join("sample");
    let total = args.count + args.latency_count;
    eprintln!(
        "bench: generating {total} synthetic boards of {} px",
        args.size
    );
    {
        let (dir, size) = (sample.clone(), args.size);
        tokio::task::spawn_blocking(move || {
            pcb_synth::generate(
                &pcb_synth::SynthOptions {
                    count: total,
                    seed: 21,
                    size,
                    val_fraction: 0.0,
                },
                &dir,
                &mut |_, _| {},
            )
        })
        .await??;
    }
    let mut boards = Vec::new();
    for unit in pcb_ingester::pairing::scan(&sample, &[]) {
        let Ok(u) = pcb_ingester::pairing::pair(&unit, &sample) else {
            continue;
        };
        let image = std::fs::read(&u.image)?;
        let template = u.template.as_ref().map(std::fs::read).transpose()?;
        boards.push((u.image.clone(), image, template));
    }
    boards.sort_by(|a, b| a.0.cmp(&b.0));
    if boards.len() < total {
        bail!("generated {} boards, wanted {total}", boards.len());
    }

    // The model every row uses: the pipeline's training recipe, deterministic weights.
    let mut pipeline = crate::pipeline::PipelineFile::load(&args.pipeline)?;
    let config = pipeline.stages.trainer.settings.model.clone();
    let weights = tmp.path().join("weights.safetensors");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let inputs: Vec<(Vec<u8>, Option<Vec<u8>>)> = boards[..args.count]
        .iter()
        .map(|(_, i, t)| (i.clone(), t.clone()))
        .collect();
    let bare_before = bare_pass(&config, &inputs, args.batch, Some(&weights)).await?;
    let (batch_secs, bare_cpu) = (bare_before.batch_secs, bare_before.cpu_per_image);
    eprintln!(
        "bench: bare model {:.2} images/s, {batch_secs:.3} s per batch of {}",
        bare_before.rate, args.batch
    );

    // The pipeline with the detector serving those weights.
    let data = tmp.path().join("data");
    pipeline.stages.ingester.settings.settle_ms = 50;
    pipeline.stages.ingester.settings.rescan_secs = 1;
    pipeline.stages.detector.settings.max_batch = args.batch;
    pipeline.stages.detector.settings.threads = threads;
    pipeline.stages.registry.settings.promote = pcb_registry::Promotion::Never;
    let file = tmp.path().join("pipeline.toml");
    std::fs::write(&file, toml::to_string_pretty(&pipeline)?)?;
    let mut running = Running::start(&UpOptions {
        pipeline: file,
        nats_url: None,
        watch: None,
        data_dir: Some(data),
        viewer_addr: Some("127.0.0.1:0".into()),
        default_model: false,
        cluster: None,
    })
    .await?;
    let js = running.jetstream("pcb-bench").await?;
    let registry = Registry::open(&js).await?;
    let name = pipeline.stages.detector.settings.model_name.clone();
    let v = registry
        .register(
            &name,
            &std::fs::read(&weights)?,
            NewVersion {
                model_config: serde_json::to_value(&config)?,
                origin: "import".into(),
                ..Default::default()
            },
        )
        .await?;
    registry.promote(&name, v.version, "bench").await?;
    // Served once the detector's consumer exists.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = js.get_stream(pcb_schemas::STREAM_IMAGES).await?;
        let durable = pipeline
            .stages
            .detector
            .consumer
            .as_ref()
            .map_or(pcb_schemas::StageName::Detector.name(), |c| {
                c.durable.as_str()
            });
        if s.consumer_info(durable).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the detector did not start serving");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Throughput through JetStream: the boards as encoded records, in one burst.
    let b64 = base64::engine::general_purpose::STANDARD;
    let records: Vec<EncodedImage> = boards[..args.count]
        .iter()
        .enumerate()
        .map(|(i, (path, image, template))| EncodedImage {
            image_id: format!("{:064x}", i + 1),
            board_id: format!("bench-{i}"),
            line_id: "bench".into(),
            source: path.display().to_string(),
            captured_at_ms: pcb_common::now_ms(),
            encoded_at_ms: pcb_common::now_ms(),
            image_b64: b64.encode(image),
            width: args.size,
            height: args.size,
            channels: 1,
            format: "jpeg".into(),
            sha256: format!("{:064x}", i + 1),
            labels: None,
            label_format: None,
            template_b64: template.as_ref().map(|t| b64.encode(t)),
            split_hint: None,
            revision: None,
            image_ref: None,
            template_ref: None,
        })
        .collect();
    let detector_pid = running
        .stage_pids()
        .into_iter()
        .find(|(stage, _)| *stage == pcb_schemas::StageName::Detector)
        .map(|(_, pid)| pid);
    let detector_cpu_before = detector_pid.and_then(proc_cpu_secs);
    let started = Instant::now();
    for r in &records {
        pcb_common::publish(&js, SUBJECT_ENCODED.into(), r)
            .await
            .context("publishing an encoded record")?;
    }
    wait_for(
        &js,
        &mut running,
        args.count as u64,
        Duration::from_secs(3600),
    )
    .await?;
    let wall = started.elapsed().as_secs_f64();
    let through = args.count as f64 / wall;
    let detector_cpu = match (detector_pid.and_then(proc_cpu_secs), detector_cpu_before) {
        (Some(after), Some(before)) => Some((after - before) / args.count as f64),
        _ => None,
    };
    let busy = model_time(&js, args.count).await?;

    // Latency: boards landing one by one in the watched folder, spaced so that each finds
    // the detector idle (the latency of one board, not of a queue).
    let spacing = Duration::from_secs_f64(batch_secs * 1.5 + 0.1);
    let before = count(&js).await?;
    let mut landed = Vec::new();
    for (k, (path, _, _)) in boards[args.count..].iter().enumerate() {
        let rel = path.strip_prefix(&sample)?;
        let dest = running.watch_dir.join(rel);
        if let Some(d) = dest.parent() {
            std::fs::create_dir_all(d)?;
        }
        // Template and labels first, as an uploader does; then the board by rename.
        if let Some(tpl) = pcb_datasets::template_of(path) {
            if let Some(name) = tpl.file_name() {
                std::fs::copy(&tpl, dest.with_file_name(name))?;
            }
        }
        let part = dest.with_extension("part");
        std::fs::copy(path, &part)?;
        std::fs::rename(&part, &dest)?;
        landed.push(pcb_common::now_ms());
        wait_for(
            &js,
            &mut running,
            before + k as u64 + 1,
            Duration::from_secs(120),
        )
        .await?;
        tokio::time::sleep(spacing).await;
    }
    let stream = js.get_stream(STREAM_DETECTIONS).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: before + 1,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut latencies = Vec::new();
    for landed_ms in &landed {
        let Some(m) = futures::StreamExt::next(&mut messages).await else {
            break;
        };
        let d: pcb_schemas::Detection = pcb_schemas::decode(&m?.payload, None)?;
        latencies.push((d.detected_at - landed_ms) as f64 / 1000.0);
    }
    // Our connection closes before the server stops: otherwise its reconnect attempts log
    // errors under the table.
    drop((messages, stream, registry));
    let client = js.client();
    drop(js);
    if let Err(e) = client.drain().await {
        tracing::debug!(error = %e, "draining the bench's connection");
    }
    tokio::task::spawn_blocking(move || running.stop()).await?;
    // The bare model again: a machine whose speed drifted during the run shows here, and
    // the detector is compared with the mean of both passes.
    let bare_after = bare_pass(&config, &inputs, args.batch, None).await?;
    let bare_rate = (bare_before.rate + bare_after.rate) / 2.0;
    latencies.sort_by(f64::total_cmp);
    let (p50, p99) = (pct(&latencies, 0.5), pct(&latencies, 0.99));
    println!(
        "\nmodel: {:?} FPN-{} at {} px, batch {}, {threads} threads, {} boards",
        config.backbone, config.fpn_channels, args.size, args.batch, args.count
    );
    println!("{:<46} {:>12}", "row", "value");
    println!(
        "{:<46} {:>12}",
        "bare model, images/s (before / after)",
        format!("{:.2} / {:.2}", bare_before.rate, bare_after.rate)
    );
    println!(
        "{:<46} {:>12.2}",
        "detector through JetStream, images/s", through
    );
    println!(
        "{:<46} {:>11.0}%",
        "detector / mean bare (goal ≥ 90%)",
        100.0 * through / bare_rate
    );
    println!("{:<46} {:>12.3}", "model time for one batch, s", batch_secs);
    println!(
        "{:<46} {:>12.3}",
        "  in the detector, median batch, s", busy.median_batch_secs
    );
    println!(
        "{:<46} {:>12.3}",
        "  in the detector, first batch, s", busy.first_batch_secs
    );
    println!(
        "{:<46} {:>12}",
        "  in the detector, batches (sizes)",
        format!("{} ({})", busy.batches, busy.sizes)
    );
    println!(
        "{:<46} {:>11.0}%",
        "  detector's model busy / wall",
        100.0 * busy.total_secs / wall
    );
    println!(
        "{:<46} {:>12}",
        "CPU s per image: bare / detector process",
        format!(
            "{bare_cpu:.2} / {}",
            detector_cpu.map_or("?".to_string(), |c| format!("{c:.2}"))
        )
    );
    println!(
        "{:<46} {:>12.3}",
        "latency file landed → detection p50, s", p50
    );
    println!(
        "{:<46} {:>12.3}",
        "latency file landed → detection p99, s", p99
    );
    println!(
        "{:<46} {:>12.2}",
        "p99 / one batch (goal ≤ 1.2)",
        p99 / batch_secs
    );
    println!(
        "(latency over {} boards dropped one at a time; the ingester's settle_ms set to 50)",
        latencies.len()
    );
    Ok(())
}
