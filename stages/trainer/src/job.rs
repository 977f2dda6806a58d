//! One rank's training loop: identical replicas kept in step by averaging gradients
//! after every backward pass, a decoder thread feeding batches, rank 0 evaluating and
//! checkpointing after every epoch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pcb_schemas::{Snapshot, TrainProgress};
use pcb_vision::evaluate::{evaluate_boards, DEEPPCB_CLASSES};
use pcb_vision::stability::{clip_grad_norm, GradStats, Recovery, SpikeGuard, Verdict};
use pcb_vision::train::{
    load_checkpoint, lr_scale, save_checkpoint, training_example, HasStep, Optimizer, Prefetch,
};
use pcb_vision::{Detector, InferenceOptions, ModelConfig, Sampling, Target};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use crate::data::{Item, RankData};
use crate::dist::{DistError, GradSync, ProcessGroup};

/// Why a rank stopped before the end of its job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A peer rank died or stalled; names it when the store can tell.
    #[error("lost peer {who} at epoch {epoch} step {step}: {cause}")]
    PeerLost {
        /// Which rank(s) and what is known of them.
        who: String,
        /// Epoch (0-based) when it happened.
        epoch: usize,
        /// Step within the epoch (1-based).
        step: usize,
        /// The collective's own error.
        cause: String,
    },
    /// Setting up or using the process group failed outside a training step.
    #[error(transparent)]
    Dist(#[from] DistError),
    /// The model, a checkpoint or a board failed.
    #[error(transparent)]
    Vision(#[from] pcb_vision::VisionError),
    /// The loss stopped being a number, or kept spiking after the guard's recoveries.
    #[error(
        "loss {loss} at epoch {epoch} step {step} (a spike before the first checkpoint or \
         after the last allowed recovery); lower the learning rate or raise the warm-up"
    )]
    Diverged {
        /// The loss.
        loss: f64,
        /// Epoch.
        epoch: usize,
        /// Step.
        step: usize,
    },
    /// The decoder thread stopped.
    #[error("the batch decoder stopped: {0}")]
    Decoder(String),
    /// A file of the job could not be written.
    #[error("writing {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        message: String,
    },
    /// The shutdown signal came.
    #[error("interrupted at epoch {epoch} step {step}; the job resumes from its last checkpoint")]
    Interrupted {
        /// Epoch.
        epoch: usize,
        /// Step.
        step: usize,
    },
}

/// What a job does, the same on every rank.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The job's name.
    pub job: String,
    /// Its folder: `checkpoint/` and `candidate/` live there (rank 0 writes them).
    pub dir: PathBuf,
    /// The network.
    pub model: ModelConfig,
    /// Optimiser, schedule, epochs, batch size per rank, crops and augmentation.
    pub optim: pcb_vision::train::TrainConfig,
    /// How the box heads sample proposals and anchors.
    pub sampling: Sampling,
    /// Gradient bucket size for the all-reduce.
    pub bucket_bytes: usize,
    /// Rank 0 evaluates on the val split after every epoch.
    pub eval: bool,
    /// Publish a digest of the parameters after every step.
    pub param_digest: bool,
    /// Batches decoded ahead of the model.
    pub prefetch: usize,
    /// `auto` (a GPU when CUDA is present), `cpu` or `cuda`.
    pub device: String,
}

/// Progress of a job, saved with its checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimiser steps taken.
    pub step: i64,
    /// Job-wide mean loss of each completed epoch.
    pub epoch_losses: Vec<f64>,
    /// Validation mAP (DeepPCB protocol) after each epoch, when evaluated.
    pub val_maps: Vec<f64>,
    /// Training seconds so far.
    pub seconds: f64,
    /// The snapshot the job trains on (fixed at its first start).
    pub snapshot: Option<Snapshot>,
    /// The last evaluation's report (`pcb_evaluation::Report` as JSON).
    pub last_report: Option<serde_json::Value>,
    /// The spike guard's recoveries, in order (the last one's scale holds from then on).
    #[serde(default)]
    pub recoveries: Vec<Recovery>,
    /// Gradient norms (job-wide, after the all-reduce) of each completed epoch.
    #[serde(default)]
    pub grad_stats: Vec<GradStats>,
}

impl HasStep for JobState {
    fn step(&self) -> i64 {
        self.step
    }
}

/// The checkpoint folder of a job.
pub fn checkpoint_dir(job_dir: &Path) -> PathBuf {
    job_dir.join("checkpoint")
}

/// Reads the state saved with a job's checkpoint, if there is one.
pub fn saved_state(job_dir: &Path) -> Result<Option<JobState>, JobError> {
    let path = pcb_vision::train::checkpoint_paths(&checkpoint_dir(job_dir)).2;
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| JobError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| JobError::Io {
            path: path.display().to_string(),
            message: format!("not a job state: {e}"),
        })
}

/// The outcome on rank 0.
#[derive(Debug)]
pub struct Finished {
    /// Final state.
    pub state: JobState,
    /// The weights of the trained model, when this rank wrote them.
    pub artifact: Option<PathBuf>,
}

// Validation stays in f32 so that the mAP a candidate carries does not depend on the CPU
// it was measured on.
const SPEED: InferenceOptions = InferenceOptions {
    fold_bn: true,
    channels_last: true,
    bf16: false,
    bf16_train: false,
    fused: false,
};

/// One batch for one step: this rank's share, possibly empty.
struct Batch {
    images: Vec<Tensor>,
    targets: Vec<Target>,
}

/// sha256 over every trainable parameter's bytes, in name order.
pub fn param_digest(params: &[(String, Tensor)]) -> String {
    let mut sorted: Vec<&(String, Tensor)> = params.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    for (name, t) in sorted {
        h.update(name.as_bytes());
        let flat = t.detach().to_kind(Kind::Float).contiguous().reshape([-1]);
        let values = Vec::<f32>::try_from(&flat).unwrap_or_default();
        for v in values {
            h.update(v.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Names the ranks that did not report the failure within a short grace: survivors all
/// see a collective fail and say so in the store; a dead or stalled rank does not.
fn who_is_lost(group: &ProcessGroup, step_key: &str) -> String {
    let me = group.rank();
    if group
        .store_set(&format!("failed/{step_key}/{me}"), b"1")
        .is_err()
    {
        return if me == 0 {
            "unknown (the job's store does not answer)".into()
        } else {
            "rank 0 (it hosts the job's store, which no longer answers)".into()
        };
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut silent = Vec::new();
        for r in (0..group.world()).filter(|r| *r != me) {
            match group.store_check(&format!("failed/{step_key}/{r}")) {
                Ok(true) => {}
                Ok(false) => silent.push(r),
                Err(_) => {
                    return "rank 0 (it hosts the job's store, which no longer answers)".into()
                }
            }
        }
        if silent.is_empty() {
            return "unknown (every rank saw the failure)".into();
        }
        if Instant::now() >= deadline {
            let names: Vec<String> = silent.iter().map(|r| format!("rank {r}")).collect();
            return format!("{} (dead or stalled)", names.join(", "));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn lost(group: &ProcessGroup, epoch: usize, step: usize, e: DistError) -> JobError {
    match e {
        DistError::Collective { message, .. } => JobError::PeerLost {
            who: who_is_lost(group, &format!("{epoch}.{step}")),
            epoch,
            step,
            cause: message,
        },
        other => JobError::Dist(other),
    }
}

/// Copies rank 0's values of every variable (parameters and buffers) to all ranks.
fn broadcast_all(group: &ProcessGroup, tensors: &[Tensor]) -> Result<(), DistError> {
    // Gloo takes host tensors (GPU ones travel through host copies); NCCL takes the
    // rank's GPU ones in place.
    let here = group.device();
    let on_host: Vec<Tensor> = tch::no_grad(|| {
        tensors
            .iter()
            .map(|t| t.detach().to_device(here).contiguous())
            .collect()
    });
    group.broadcast(&on_host, 0)?;
    tch::no_grad(|| {
        for (t, h) in tensors.iter().zip(&on_host) {
            if t.device() != here || !t.is_contiguous() {
                t.detach().copy_(h);
            }
        }
    });
    Ok(())
}

/// Gives every rank rank 0's optimiser state: rank 0 says what it holds, the others make
/// room for it, and a broadcast fills it in. `round` keeps the store keys of a resume (0)
/// and of each later recovery apart.
fn share_optimizer(
    group: &ProcessGroup,
    cfg: &pcb_vision::train::TrainConfig,
    optimizer: &mut Optimizer,
    device: tch::Device,
    step: i64,
    round: usize,
) -> Result<(), JobError> {
    let key = format!("optimizer-layout-{round}");
    let rank = group.rank();
    let names: Vec<(String, Vec<i64>)> = if rank == 0 {
        let list: Vec<(String, Vec<i64>)> = optimizer
            .tensors()
            .iter()
            .map(|(n, t)| (n.clone(), t.size()))
            .collect();
        let json = serde_json::to_vec(&list).unwrap_or_default();
        group.store_set(&key, &json)?;
        list
    } else {
        let json = group.store_get(&key)?;
        serde_json::from_slice(&json).map_err(|e| JobError::Io {
            path: format!("store:{key}"),
            message: e.to_string(),
        })?
    };
    let tensors: Vec<(String, Tensor)> = if rank == 0 {
        optimizer.tensors()
    } else {
        names
            .iter()
            .map(|(n, shape)| {
                (
                    n.clone(),
                    Tensor::zeros(shape.as_slice(), (Kind::Float, device)),
                )
            })
            .collect()
    };
    let only: Vec<Tensor> = tensors.iter().map(|(_, t)| t.shallow_clone()).collect();
    broadcast_all(group, &only)?;
    if rank != 0 {
        *optimizer = Optimizer::new(cfg);
        optimizer.restore(tensors, step);
    } else {
        optimizer.step = step;
    }
    Ok(())
}

/// Trains this rank's share for the job's remaining epochs. `steps_per_epoch` is agreed
/// by every rank; `resume` holds rank 0's saved state when the job restarts.
#[allow(clippy::too_many_arguments)]
pub fn train_rank(
    group: &ProcessGroup,
    spec: &JobSpec,
    data: &RankData,
    steps_per_epoch: usize,
    snapshot: &Snapshot,
    resume: Option<&JobState>,
    mut report: impl FnMut(&'static str, TrainProgress),
    stop: &AtomicBool,
) -> Result<Finished, JobError> {
    let (rank, world) = (group.rank(), group.world());
    tch::manual_seed(spec.optim.seed as i64);
    let device = pcb_vision::cuda::device_for(&spec.device, rank)
        .map_err(|e| JobError::Dist(DistError::Argument(e.to_string())))?;
    let mut det = Detector::new(spec.model.clone(), device, spec.sampling);
    let mut optimizer = Optimizer::new(&spec.optim);
    let mut state = JobState {
        snapshot: Some(snapshot.clone()),
        ..JobState::default()
    };
    if let Some(saved) = resume {
        if rank == 0 {
            let loaded: Option<JobState> =
                load_checkpoint(&checkpoint_dir(&spec.dir), &mut det, &mut optimizer)?;
            state = loaded.unwrap_or_else(|| saved.clone());
        } else {
            state = saved.clone();
        }
        share_optimizer(group, &spec.optim, &mut optimizer, device, state.step, 0)?;
    }
    let params = det.trainable();
    let trainable: std::collections::BTreeSet<String> =
        params.iter().map(|(n, _)| n.clone()).collect();
    let mut variables: Vec<(String, Tensor)> = det.vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let all: Vec<Tensor> = variables.iter().map(|(_, t)| t.shallow_clone()).collect();
    // Buffers (batch-norm running statistics) follow rank 0 before every step, as DDP's
    // broadcast_buffers does; parameters stay equal by construction.
    let buffers: Vec<Tensor> = variables
        .iter()
        .filter(|(n, _)| !trainable.contains(n))
        .map(|(_, t)| t.shallow_clone())
        .collect();
    broadcast_all(group, &all)?;
    // Frozen norms folded into the convolutions and channels-last tensors, as `pcb train`
    // on a folder does; folded copies are refreshed before every evaluation.
    det.model.prepare_inference(SPEED);
    let sync = GradSync::new(
        params.iter().map(|(_, t)| t.shallow_clone()).collect(),
        spec.bucket_bytes,
    );
    tracing::info!(
        rank,
        world,
        train_images = data.train.len(),
        steps_per_epoch,
        buckets = sync.bucket_count(),
        from_epoch = state.epochs_done,
        "training"
    );
    let epochs = spec.optim.epochs;
    let job_started = Instant::now();
    let steps_at_start = state.step;
    let total_steps = (epochs * steps_per_epoch) as i64;
    let mut guard = SpikeGuard::new(spec.optim.spike.clone(), state.epoch_losses.last().copied());
    // What every rank goes back to on a loss spike: the state saved with the last
    // checkpoint (rank 0 reloads its weights and optimiser from disk and shares them).
    let mut good = (state.epochs_done > 0).then(|| state.clone());
    while state.epochs_done < epochs {
        let epoch = state.epochs_done;
        let mut lr = spec.optim.lr_for(
            epoch,
            optimizer.step,
            lr_scale(&state.recoveries),
            steps_per_epoch,
        );
        guard.restart(state.epoch_losses.last().copied());
        let mut grads = GradStats::default();
        let seed = spec
            .optim
            .seed
            .wrapping_mul(1_000_003)
            .wrapping_add((epoch * world + rank) as u64);
        tch::manual_seed(seed as i64);
        let order = Vec::<i64>::try_from(&Tensor::randperm(
            data.train.len() as i64,
            (Kind::Int64, tch::Device::Cpu),
        ))
        .map_err(pcb_vision::VisionError::Torch)?;
        let started = Instant::now();
        let (mut loss_sum, mut loss_steps, mut images_done) = (0.0, 0usize, 0.0);
        let outcome = std::thread::scope(|scope| -> Result<Option<(usize, f64, f64)>, JobError> {
            let batch_size = spec.optim.batch_size.max(1);
            let (order, optim) = (&order, &spec.optim);
            let mode = spec.model.input;
            // One decoding thread, `prefetch` batches ahead.
            let mut examples = Prefetch::start(
                scope,
                order.len().min(steps_per_epoch * batch_size),
                1,
                spec.prefetch.max(1) * batch_size,
                move |j| {
                    let item: &Item = &data.train[order[j] as usize];
                    let board = item.board()?;
                    training_example(&board, mode, optim, device)
                },
            );
            for step in 1..=steps_per_epoch {
                if stop.load(Ordering::Relaxed) {
                    return Err(JobError::Interrupted { epoch, step });
                }
                let from = ((step - 1) * batch_size).min(order.len());
                let to = (step * batch_size).min(order.len());
                let batch = (from..to)
                    .map(|_| {
                        examples
                            .next_item()
                            .ok_or_else(|| {
                                JobError::Decoder("the decoder thread ended early".into())
                            })?
                            .map_err(|e| JobError::Decoder(e.to_string()))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let (images, targets): (Vec<Tensor>, Vec<Target>) = batch.into_iter().unzip();
                let batch = Batch { images, targets };
                broadcast_all(group, &buffers).map_err(|e| lost(group, epoch, step, e))?;
                Optimizer::zero_grad(&params);
                let n = batch.images.len();
                let mut loss = f64::NAN;
                if n > 0 {
                    let losses = det.model.losses(&batch.images, &batch.targets)?;
                    let total = losses.total();
                    loss = total.double_value(&[]);
                    // A non-finite loss is not stepped on; it travels in the average so
                    // that every rank sees it and the guard decides the same everywhere.
                    if loss.is_finite() {
                        total.backward();
                    }
                }
                let (images, job_loss) = sync
                    .average(group, n, if n > 0 { loss } else { 0.0 })
                    .map_err(|e| lost(group, epoch, step, e))?;
                if images > 0.0 {
                    // Every rank holds the same averaged gradients and job loss, so the
                    // clipping and the guard agree without another collective.
                    if let Verdict::Spike { loss, reference } = guard.step(job_loss) {
                        return Ok(Some((step, loss, reference)));
                    }
                    let norm = clip_grad_norm(&params, spec.optim.clip_grad_norm);
                    if !norm.is_finite() {
                        return Ok(Some((step, norm, f64::NAN)));
                    }
                    grads.add(norm, spec.optim.clip_grad_norm);
                    lr = spec.optim.lr_for(
                        epoch,
                        optimizer.step,
                        lr_scale(&state.recoveries),
                        steps_per_epoch,
                    );
                    optimizer.apply(&params, lr);
                    loss_sum += job_loss;
                    loss_steps += 1;
                    images_done += images;
                }
                let elapsed = started.elapsed().as_secs_f64().max(1e-9);
                let done_steps = optimizer.step - steps_at_start;
                let per_step = job_started.elapsed().as_secs_f64() / done_steps.max(1) as f64;
                report(
                    "step",
                    TrainProgress {
                        job: spec.job.clone(),
                        rank: rank as u32,
                        world: world as u32,
                        epoch: epoch as u32,
                        epochs: epochs as u32,
                        step: step as u32,
                        steps_per_epoch: steps_per_epoch as u32,
                        global_step: optimizer.step as u64,
                        images: images as u32,
                        loss: job_loss,
                        lr,
                        images_per_sec: images_done / elapsed,
                        eta_secs: per_step * (total_steps - optimizer.step).max(0) as f64,
                        param_digest: spec.param_digest.then(|| param_digest(&params)),
                        val_map: None,
                        at_ms: pcb_common::now_ms(),
                    },
                );
            }
            Ok(None)
        });
        let mut spike = outcome?;
        let mean = loss_sum / loss_steps.max(1) as f64;
        if spike.is_none() {
            if let Verdict::Spike { loss, reference } = guard.epoch_end(mean) {
                spike = Some((steps_per_epoch, loss, reference));
            }
        }
        if let Some((step, loss, reference)) = spike {
            let restored = match &good {
                Some(g) if state.recoveries.len() < spec.optim.spike.max_recoveries => g,
                _ => return Err(JobError::Diverged { loss, epoch, step }),
            };
            let recovery = Recovery::after(
                &state.recoveries,
                epoch,
                step,
                loss,
                reference,
                spec.optim.spike.lr_factor,
            );
            tracing::warn!(rank, %recovery, "loss spike");
            let mut back = restored.clone();
            back.recoveries = state.recoveries.clone();
            back.recoveries.push(recovery);
            back.seconds = state.seconds + started.elapsed().as_secs_f64();
            let dir = checkpoint_dir(&spec.dir);
            optimizer = Optimizer::new(&spec.optim);
            if rank == 0 {
                let _: Option<JobState> = load_checkpoint(&dir, &mut det, &mut optimizer)?;
            }
            share_optimizer(
                group,
                &spec.optim,
                &mut optimizer,
                device,
                back.step,
                back.recoveries.len(),
            )?;
            broadcast_all(group, &all).map_err(|e| lost(group, epoch, step, e))?;
            det.model.prepare_inference(SPEED);
            if rank == 0 {
                // The lower learning rate must survive a restart of the job.
                save_checkpoint(&dir, &det, &optimizer, &back)?;
            }
            state = back;
            group.barrier().map_err(|e| lost(group, epoch, step, e))?;
            continue;
        }
        state.epochs_done = epoch + 1;
        state.step = optimizer.step;
        state.epoch_losses.push(mean);
        state.grad_stats.push(grads);
        state.seconds += started.elapsed().as_secs_f64();
        let mut val_map = None;
        if rank == 0 {
            if spec.eval && !data.val.is_empty() {
                det.model.prepare_inference(SPEED);
                let (rep, _) = evaluate_boards(
                    &det,
                    data.val.len(),
                    |i| Ok((data.val[i].image_id.clone(), data.val[i].board()?)),
                    &DEEPPCB_CLASSES,
                    |_| {},
                )?;
                val_map = rep.map_deeppcb;
                state.val_maps.push(rep.map_deeppcb.unwrap_or(f64::NAN));
                state.last_report = serde_json::to_value(&rep).ok();
            }
            save_checkpoint(&checkpoint_dir(&spec.dir), &det, &optimizer, &state)?;
        }
        good = Some(state.clone());
        tracing::info!(
            rank,
            epoch,
            loss = state.epoch_losses.last().copied().unwrap_or(f64::NAN),
            val_map = val_map.unwrap_or(f64::NAN),
            seconds = started.elapsed().as_secs_f64(),
            "epoch done"
        );
        if rank == 0 {
            report(
                "epoch",
                TrainProgress {
                    job: spec.job.clone(),
                    rank: 0,
                    world: world as u32,
                    epoch: epoch as u32,
                    epochs: epochs as u32,
                    step: steps_per_epoch as u32,
                    steps_per_epoch: steps_per_epoch as u32,
                    global_step: optimizer.step as u64,
                    images: 0,
                    loss: state.epoch_losses.last().copied().unwrap_or(f64::NAN),
                    lr,
                    images_per_sec: images_done / started.elapsed().as_secs_f64().max(1e-9),
                    eta_secs: 0.0,
                    param_digest: None,
                    val_map,
                    at_ms: pcb_common::now_ms(),
                },
            );
        }
        // Others wait here while rank 0 evaluates and writes the checkpoint.
        group
            .barrier()
            .map_err(|e| lost(group, epoch, steps_per_epoch, e))?;
    }
    let mut artifact = None;
    if rank == 0 {
        let dir = spec.dir.join("candidate");
        std::fs::create_dir_all(&dir).map_err(|e| JobError::Io {
            path: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let path = dir.join("model.safetensors");
        det.save(&path)?;
        artifact = Some(path);
    }
    Ok(Finished { state, artifact })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_changes_with_any_bit_and_ignores_listing_order() {
        let a = Tensor::from_slice(&[1f32, 2., 3.]);
        let b = Tensor::from_slice(&[4f32]);
        let one = param_digest(&[
            ("a".into(), a.shallow_clone()),
            ("b".into(), b.shallow_clone()),
        ]);
        let two = param_digest(&[
            ("b".into(), b.shallow_clone()),
            ("a".into(), a.shallow_clone()),
        ]);
        assert_eq!(one, two);
        let nudged = Tensor::from_slice(&[1f32, 2., f32::from_bits(3f32.to_bits() + 1)]);
        let three = param_digest(&[("a".into(), nudged), ("b".into(), b)]);
        assert_ne!(one, three);
    }

    /// Four 96-px boards with one bright square defect each, as shard items.
    fn items() -> Vec<Item> {
        (0..4u32)
            .map(|i| {
                let template = image::GrayImage::from_pixel(96, 96, image::Luma([40]));
                let mut board = template.clone();
                let (x, y) = (10 + (i * 17) % 50, 20 + (i * 11) % 40);
                for dy in 0..24 {
                    for dx in 0..24 {
                        board.put_pixel(x + dx, y + dy, image::Luma([230]));
                    }
                }
                let png = |img: &image::GrayImage| {
                    let mut out = std::io::Cursor::new(Vec::new());
                    img.write_to(&mut out, image::ImageFormat::Png)
                        .expect("png");
                    out.into_inner()
                };
                Item {
                    image_id: format!("board{i}"),
                    seq: u64::from(i) + 1,
                    image: png(&board),
                    template: Some(png(&template)),
                    boxes: vec![(
                        [x as f32, y as f32, (x + 24) as f32, (y + 24) as f32],
                        1 + i64::from(i % 6),
                    )],
                }
            })
            .collect()
    }

    fn spec(dir: &Path, optim: pcb_vision::train::TrainConfig) -> JobSpec {
        JobSpec {
            job: "spike".into(),
            dir: dir.to_path_buf(),
            model: ModelConfig {
                num_classes: 7,
                backbone: pcb_vision::Depth::R18,
                norm: pcb_vision::Norm::Batch,
                input: pcb_vision::InputMode::ImageTemplateDiff,
                transform: pcb_vision::Transform {
                    min_size: 96,
                    max_size: 96,
                    ..pcb_vision::Transform::default()
                },
                fpn_channels: 32,
                box_batch_size_per_image: 64,
                backbone_width: 64,
                representation_size: 1024,
                test_proposals: 1000,
            },
            optim,
            sampling: Sampling::Random,
            bucket_bytes: 1 << 20,
            eval: false,
            param_digest: true,
            prefetch: 1,
            device: "cpu".into(),
        }
    }

    #[test]
    fn ranks_recover_from_a_loss_spike_together_and_keep_the_lower_rate() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let snapshot = Snapshot {
            stream: "PCB_SHARDS".into(),
            first_seq: 1,
            last_seq: 4,
            train_images: 4,
            val_images: 0,
            boxes_per_class: Default::default(),
        };
        let quiet = pcb_vision::train::TrainConfig {
            lr: 1e-5,
            epochs: 1,
            batch_size: 1,
            warmup_steps: 0,
            lr_step_epochs: 100,
            clip_grad_norm: 0.0,
            spike: pcb_vision::stability::SpikeGuardConfig {
                factor: 3.0,
                window_steps: 1,
                // After one recovery the learning rate is back to a quiet 1e-5.
                lr_factor: 1e-9,
                max_recoveries: 3,
            },
            ..Default::default()
        };
        // Epoch 1 at a quiet rate; then epoch 2 at a rate that blows the loss up at once.
        let wild = pcb_vision::train::TrainConfig {
            lr: 1e4,
            epochs: 2,
            ..quiet.clone()
        };
        for (round, optim) in [quiet, wild].into_iter().enumerate() {
            let (dir, snapshot) = (dir.clone(), snapshot.clone());
            let outcomes = crate::dist::tests::with_ranks(2, move |g| {
                let all = items();
                let data = RankData {
                    train: all.into_iter().skip(g.rank()).step_by(2).collect(),
                    val: Vec::new(),
                    rejected: Vec::new(),
                    superseded: 0,
                };
                let resume = saved_state(&dir).expect("state");
                let mut digests = Vec::new();
                let stop = AtomicBool::new(false);
                let done = train_rank(
                    &g,
                    &spec(&dir, optim.clone()),
                    &data,
                    2,
                    &snapshot,
                    resume.as_ref(),
                    |_, p| digests.extend(p.param_digest),
                    &stop,
                )
                .map(|f| f.state);
                (done, digests)
            });
            let mut last_digests = Vec::new();
            for (done, digests) in outcomes {
                let state = done.unwrap_or_else(|e| panic!("round {round}: {e}"));
                assert_eq!(state.epochs_done, round + 1);
                if round == 1 {
                    assert_eq!(state.recoveries.len(), 1, "{:?}", state.recoveries);
                    let r = &state.recoveries[0];
                    assert_eq!((r.epoch, r.lr_scale), (1, 1e-9));
                    assert_eq!(state.epoch_losses.len(), 2);
                    assert!(state.epoch_losses[1] < 3.0 * state.epoch_losses[0]);
                }
                last_digests.push(digests.last().cloned().expect("a digest"));
            }
            assert_eq!(last_digests[0], last_digests[1], "ranks stay identical");
        }
        // The lower rate is in the checkpoint, so a restarted job keeps it.
        let saved = saved_state(&dir).expect("state").expect("a checkpoint");
        assert_eq!(saved.recoveries.len(), 1);
        assert_eq!(saved.epochs_done, 2);
    }
}
