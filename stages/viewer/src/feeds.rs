//! The viewer's readers of the streams: detections into the index, encoded images' stream
//! sequences (headers only), training progress, registry events, dead letters and shadow
//! versions' answers; each follows its
//! subject from the first message and resumes after its last one when the server drops it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use futures::StreamExt;
use pcb_common::Shutdown;
use pcb_schemas::{
    decode, DeadLetter, Detection, ModelEvent, TrainProgress, STREAM_DETECTIONS, STREAM_IMAGES,
    STREAM_REJECTED, STREAM_SHADOW, STREAM_TRAINING, SUBJECT_DETECTIONS, SUBJECT_ENCODED,
    SUBJECT_MODEL_EVENTS, SUBJECT_SHADOW_DETECTIONS, SUBJECT_TRAIN_PROGRESS,
};

use crate::{Event, Job, State};

/// Starts every reader; they stop with `shutdown` (or when aborted).
pub fn spawn_all(state: Arc<State>, shutdown: Shutdown) -> Vec<tokio::task::JoinHandle<()>> {
    let follow = |stream: &'static str,
                  subject: &'static str,
                  headers_only: bool,
                  from_new: bool,
                  handle: fn(&State, async_nats::jetstream::Message)| {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = follow(&state, stream, subject, headers_only, from_new, handle) => {}
            }
        })
    };
    vec![
        follow(
            STREAM_DETECTIONS,
            SUBJECT_DETECTIONS,
            false,
            false,
            on_detection,
        ),
        follow(STREAM_IMAGES, SUBJECT_ENCODED, true, false, on_image),
        follow(
            STREAM_TRAINING,
            SUBJECT_TRAIN_PROGRESS,
            false,
            false,
            on_progress,
        ),
        follow(
            STREAM_TRAINING,
            SUBJECT_MODEL_EVENTS,
            false,
            true,
            on_model_event,
        ),
        follow(STREAM_REJECTED, "pcb.rejected.>", false, true, on_rejected),
        follow(
            STREAM_SHADOW,
            SUBJECT_SHADOW_DETECTIONS,
            false,
            false,
            on_shadow,
        ),
        {
            let (state, shutdown) = (state.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = evict(&state) => {}
                }
            })
        },
    ]
}

/// How often the index is brought in step with the streams' retention.
const EVICT_EVERY: Duration = Duration::from_secs(30);

/// Forgets, every [`EVICT_EVERY`], the boards and images the streams no longer hold (aged
/// out, or removed for room), so the viewer's memory follows the streams' and stays flat.
async fn evict(state: &State) {
    loop {
        tokio::time::sleep(EVICT_EVERY).await;
        evict_once(state).await;
    }
}

/// One round of [`evict`]; a stream that cannot be read now is tried next round.
pub async fn evict_once(state: &State) {
    let first = |stream: &'static str| async move {
        let mut s = state.js.get_stream(stream).await.ok()?;
        s.info().await.ok().map(|i| i.state.first_sequence)
    };
    if let Some(first) = first(STREAM_DETECTIONS).await {
        let gone = match state.index.write() {
            Ok(mut ix) => ix.evict_before(first),
            Err(_) => 0,
        };
        if gone > 0 {
            tracing::debug!(
                gone,
                first,
                "boards no longer in the detections stream forgotten"
            );
        }
    }
    if let Some(first) = first(STREAM_SHADOW).await {
        if let Ok(mut shadow) = state.shadow.write() {
            shadow.evict_before(first);
        }
    }
    if let Some(first) = first(STREAM_IMAGES).await {
        if let Ok(mut corrected) = state.corrected.write() {
            corrected.retain(|_, (seq, _)| *seq >= first);
        }
        if let Ok(mut images) = state.images.write() {
            images.retain(|_, seqs| {
                seqs.retain(|seq| *seq >= first);
                !seqs.is_empty()
            });
        }
    }
}

/// Reads `subject` forever, from the start (or only new messages), restarting after the
/// last sequence seen when the consumer fails.
async fn follow(
    state: &State,
    stream: &'static str,
    subject: &'static str,
    headers_only: bool,
    from_new: bool,
    handle: fn(&State, async_nats::jetstream::Message),
) {
    let mut next: Option<u64> = None;
    loop {
        let deliver_policy = match (next, from_new) {
            (Some(seq), _) => DeliverPolicy::ByStartSequence {
                start_sequence: seq,
            },
            (None, true) => DeliverPolicy::New,
            (None, false) => DeliverPolicy::All,
        };
        let consumer = match state.js.get_stream(stream).await {
            Ok(s) => {
                s.create_consumer(OrderedConfig {
                    filter_subject: subject.to_string(),
                    headers_only,
                    deliver_policy,
                    ..Default::default()
                })
                .await
            }
            Err(e) => {
                tracing::warn!(stream, error = %e, "stream unavailable; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(stream, subject, error = %e, "reading failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(stream, subject, error = %e, "consumer failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        tracing::debug!(stream, subject, ?next, "following");
        while let Some(m) = messages.next().await {
            match m {
                Ok(m) => {
                    if let Ok(info) = m.info() {
                        next = Some(info.stream_sequence + 1);
                    }
                    handle(state, m);
                }
                Err(e) => {
                    tracing::warn!(stream, subject, error = %e, "consumer interrupted; resuming");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The message's schema header, which `decode` checks.
fn schema(m: &async_nats::jetstream::Message) -> Option<&str> {
    m.headers
        .as_ref()
        .and_then(|h| h.get(pcb_schemas::SCHEMA_HEADER))
        .map(|v| v.as_str())
}

fn emit(state: &State, kind: &'static str, data: impl serde::Serialize) {
    if let Ok(data) = serde_json::to_string(&data) {
        // No page listening is not an error.
        let _ = state.events.send(Event { kind, data });
    }
}

fn on_detection(state: &State, m: async_nats::jetstream::Message) {
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
    match decode::<Detection>(&m.payload, schema(&m)) {
        Ok(d) => {
            let changed = match state.index.write() {
                Ok(mut ix) => ix.add(&d, seq),
                Err(_) => None,
            };
            state.metrics.count("indexed");
            if let Some(summary) = changed {
                emit(state, "detection", summary);
            }
        }
        Err(e) => {
            state.metrics.count_rejection("undecodable");
            tracing::warn!(seq, error = %e, "skipping an undecodable detection");
        }
    }
}

fn on_shadow(state: &State, m: async_nats::jetstream::Message) {
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
    match decode::<Detection>(&m.payload, schema(&m)) {
        Ok(d) => {
            if let Ok(mut shadow) = state.shadow.write() {
                shadow.add(&d, seq);
            }
            state.metrics.count("shadow-indexed");
        }
        Err(e) => {
            state.metrics.count_rejection("undecodable");
            tracing::warn!(seq, error = %e, "skipping an undecodable shadow answer");
        }
    }
}

fn on_image(state: &State, m: async_nats::jetstream::Message) {
    let seq = m.info().map(|i| i.stream_sequence).unwrap_or_default();
    let id = m
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        // `<image_id>[.l<labels digest>].encoded`: the image id is what pages ask for.
        .and_then(|v| v.as_str().split('.').next().map(str::to_string));
    tracing::trace!(seq, ?id, "image record");
    let header = |name: &str| {
        m.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    let revision = header(pcb_schemas::REVISION_HEADER).is_some();
    let boxes = header(pcb_schemas::REVISION_BOXES_HEADER).and_then(|b| b.parse().ok());
    if let (Some(id), true, Ok(mut corrected)) = (&id, revision, state.corrected.write()) {
        corrected.insert(id.clone(), (seq, boxes.unwrap_or(0)));
    }
    if let (Some(id), Ok(mut images)) = (id, state.images.write()) {
        let seqs = images.entry(id).or_default();
        // A consumer resumed after a failure may deliver a record again.
        if seqs.last().is_none_or(|last| *last < seq) {
            seqs.push(seq);
        }
    }
}

fn on_progress(state: &State, m: async_nats::jetstream::Message) {
    let Ok(p) = decode::<TrainProgress>(&m.payload, schema(&m)) else {
        return;
    };
    // Every rank reports its own loss; rank 0's speaks for the job.
    if p.rank != 0 {
        return;
    }
    let points = state.config.loss_points;
    let snapshot = {
        let Ok(mut jobs) = state.jobs.write() else {
            return;
        };
        let job = jobs.entry(p.job.clone()).or_insert_with(|| Job {
            job: p.job.clone(),
            epoch: 0,
            epochs: 0,
            step: 0,
            steps: 0,
            loss: f64::NAN,
            images_per_sec: 0.0,
            val_map: None,
            updated_at: 0,
            done: false,
            losses: Vec::new(),
        });
        job.epoch = p.epoch + 1;
        job.epochs = p.epochs;
        job.step = p.step;
        job.steps = p.steps_per_epoch;
        job.loss = p.loss;
        job.images_per_sec = p.images_per_sec;
        if p.val_map.is_some() {
            job.val_map = p.val_map;
        }
        job.updated_at = p.at_ms;
        job.done = p.epoch + 1 >= p.epochs && p.step >= p.steps_per_epoch;
        if p.loss.is_finite() {
            job.losses.push((p.global_step, p.loss));
            if job.losses.len() > points {
                // Thin the older half so a long job keeps its whole curve in bounded memory.
                let half = job.losses.len() / 2;
                let mut kept: Vec<(u64, f64)> =
                    job.losses[..half].iter().step_by(2).copied().collect();
                kept.extend_from_slice(&job.losses[half..]);
                job.losses = kept;
            }
        }
        let mut j = job.clone();
        j.losses.clear();
        j
    };
    emit(state, "progress", snapshot);
}

fn on_model_event(state: &State, m: async_nats::jetstream::Message) {
    if let Ok(e) = decode::<ModelEvent>(&m.payload, schema(&m)) {
        emit(
            state,
            "model",
            serde_json::json!({"name": e.model.name, "version": e.model.version, "kind": e.kind}),
        );
    }
}

/// Refusals from here on, so a page waiting for an upload's detection can say why none
/// will come.
fn on_rejected(state: &State, m: async_nats::jetstream::Message) {
    if let Ok(d) = decode::<DeadLetter>(&m.payload, schema(&m)) {
        emit(
            state,
            "rejected",
            serde_json::json!({
                "image_id": d.image_id,
                "stage": d.stage,
                "reason_code": d.reason_code,
                "reason": d.reason,
                "source": d.source,
            }),
        );
    }
}
