//! `pcb up`: the pipeline until Ctrl-C or SIGTERM, with the shipped default model when
//! the registry is empty and the retraining policy when the pipeline file asks for it.

use std::time::Duration;

use crate::retrain::Retrainer;
use crate::supervisor::{Running, UpOptions};

/// `pcb up`: runs until `shutdown` (Ctrl-C, SIGTERM).
pub async fn up(opts: UpOptions, shutdown: &pcb_common::Shutdown) -> anyhow::Result<()> {
    let mut running = tokio::select! {
        biased;
        r = Running::start(&opts) => r?,
        _ = shutdown.cancelled() => anyhow::bail!("interrupted while starting; everything started was stopped"),
    };
    print_banner(&running);
    if opts.default_model {
        ensure_default_model(&running).await;
    }
    println!("Ctrl-C or SIGTERM stops every stage cleanly.");
    let mut retrainer = Retrainer::new(&running, &opts.pipeline);
    let js = match &retrainer {
        Some(r) => {
            println!(
                "  retraining:  a job every {} new labelled images",
                r.every()
            );
            Some(running.jetstream("pcb-retrain").await?)
        }
        None => None,
    };
    // Room in the streams that push back, made from what every stage has processed; and
    // the image files no record names any more. The housekeeping's own identity.
    let keeper = running
        .jetstream_as(pcb_common::Identity::Keeper, "pcb-keeper")
        .await?;
    let consumers = running.pipeline.consumers();
    let mut room_checked = std::time::Instant::now();
    let files = running.pipeline.streams.image_files.clone();
    let mut sweep: Option<tokio::task::JoinHandle<()>> = None;
    // What the sweeps have read: each reads only the records stored since the last.
    let memory = std::sync::Arc::new(tokio::sync::Mutex::new(pcb_common::SweepMemory::default()));
    let mut swept_at = std::time::Instant::now();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Err(e) = running.check_children() {
                    break Err(e);
                }
                if room_checked.elapsed() >= ROOM_EVERY {
                    room_checked = std::time::Instant::now();
                    make_room(&keeper, &running, &consumers).await;
                }
                // A sweep reads whole streams: it runs beside the supervision, one at a time.
                let idle = sweep.as_ref().is_none_or(|h| h.is_finished());
                if files.cleanup
                    && idle
                    && swept_at.elapsed() >= Duration::from_secs(files.cleanup_every_secs)
                {
                    swept_at = std::time::Instant::now();
                    let grace = Duration::from_secs(files.cleanup_grace_secs);
                    sweep = Some(tokio::spawn(sweep_files(keeper.clone(), grace, memory.clone())));
                }
                if let (Some(r), Some(js)) = (retrainer.as_mut(), js.as_ref()) {
                    if let Err(e) = r.poll(js).await {
                        eprintln!("pcb: retraining policy: {e:#}");
                    }
                }
            }
        }
    };
    if let Some(h) = sweep {
        h.abort();
    }
    if let Some(r) = retrainer.as_mut() {
        r.stop();
    }
    eprintln!("pcb: stopping stages");
    tokio::task::spawn_blocking(move || running.stop()).await?;
    result
}

/// How often `pcb up` makes room in the streams that push back.
const ROOM_EVERY: Duration = Duration::from_secs(5);

/// One round of [`pcb_common::make_room`]; what it removed is logged, a failure warned
/// about (the next round tries again).
async fn make_room(
    js: &async_nats::jetstream::Context,
    running: &Running,
    consumers: &[pcb_common::ConsumerSpec],
) {
    let round = pcb_common::make_room(js, &running.pipeline.streams, consumers);
    match tokio::time::timeout(Duration::from_secs(10), round).await {
        Ok(Ok(trimmed)) => {
            for t in trimmed {
                tracing::info!(
                    stream = t.stream,
                    subject = %t.subject,
                    removed = t.removed,
                    fill_before_pct = t.fill_before_pct,
                    "made room: removed messages every consumer had acknowledged"
                );
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "making room in the streams"),
        Err(_) => tracing::warn!("making room in the streams took over 10 s"),
    }
}

/// One sweep of the image files' bucket ([`pcb_common::sweep_image_files`]): a summary at
/// info when it deleted something, a warning when it failed (the next one tries again).
async fn sweep_files(
    js: async_nats::jetstream::Context,
    grace: Duration,
    memory: std::sync::Arc<tokio::sync::Mutex<pcb_common::SweepMemory>>,
) {
    let started = std::time::Instant::now();
    let mut memory = memory.lock().await;
    match pcb_common::sweep_image_files(&js, grace, &mut memory).await {
        Ok(s) if s.deleted > 0 => tracing::info!(
            deleted = s.deleted,
            deleted_bytes = s.deleted_bytes,
            files = s.files,
            records_read = s.records_read,
            secs = started.elapsed().as_secs_f64(),
            "deleted image files no record names any more"
        ),
        Ok(s) => tracing::debug!(
            files = s.files,
            old = s.old,
            records_read = s.records_read,
            "image files: none to delete"
        ),
        Err(e) => tracing::warn!(error = %e, "sweeping the image files' bucket"),
    }
}

/// Registers the shipped default model and makes it live when the registry holds no
/// version of the detector's model; says so. A failure is reported and the pipeline runs
/// on (without a live model the detector waits, as before).
pub(crate) async fn ensure_default_model(running: &Running) {
    let name = running.pipeline.stages.detector.settings.model_name.clone();
    let outcome = async {
        let js = running.jetstream("pcb-default-model").await?;
        crate::default_model::register_if_empty(&js, &name).await
    }
    .await;
    match outcome {
        Ok(Some(v)) => println!(
            "  model:       {name}@{v} is live, the {}",
            crate::default_model::summary()
        ),
        Ok(None) => {}
        Err(e) => eprintln!("pcb: could not register the shipped default model: {e:#}"),
    }
}

pub(crate) fn print_banner(r: &Running) {
    println!("pipeline up");
    println!("  NATS:        {}", r.nats_url);
    println!("  drop images: {}", r.watch_dir.display());
    println!("  processed:   {}", r.watch_dir.join("processed").display());
    println!("  rejected:    {}", r.watch_dir.join("rejected").display());
    for (name, log) in r.logs() {
        println!("  log {name:<12} {}", log.display());
    }
    println!("  status:      pcb status --nats-url {}", r.nats_url);
    match r.viewer_url(Duration::from_secs(15)) {
        Some(url) => println!("  viewer:      {url}"),
        None if r.pipeline.stages.viewer.replicas > 0 => {
            println!("  viewer:      not listening yet; see its log")
        }
        None => {}
    }
}
