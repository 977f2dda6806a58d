//! Training for one process: Adam with a step schedule or SGD with momentum, flips and
//! quarter turns, boards without defects as negatives, and checkpoints (weights, optimizer
//! state, progress) in safetensors that a restarted run resumes from. A warm-up, gradient
//! clipping and the loss-spike guard of [`crate::stability`] keep a run converging.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::data::{BoardFile, Symmetry};
use crate::model::{Detector, Target};
use crate::stability::{
    clip_grad_norm, warmup_factor, GradStats, Recovery, SpikeGuard, SpikeGuardConfig, Verdict,
};
use crate::transform::compose;
use crate::VisionError;

/// Which optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// Adam (the reference system's choice).
    Adam,
    /// SGD with momentum.
    Sgd,
}

/// How to train.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Learning rate at the start.
    pub lr: f64,
    /// Momentum (SGD).
    pub momentum: f64,
    /// L2 weight decay.
    pub weight_decay: f64,
    /// Multiply the learning rate by `lr_gamma` every `lr_step_epochs` epochs.
    pub lr_step_epochs: usize,
    /// The factor.
    pub lr_gamma: f64,
    /// Epochs in all.
    pub epochs: usize,
    /// Boards per step.
    pub batch_size: usize,
    /// Random flips and quarter turns.
    pub augment: bool,
    /// Seed of the shuffling and augmentation.
    pub seed: u64,
    /// Train on random square crops of this side (0: whole boards).
    #[serde(default)]
    pub crop: i64,
    /// Clip the gradients' global L2 norm to this before every step (0: no clipping).
    pub clip_grad_norm: f64,
    /// Optimiser steps over which the learning rate ramps up linearly (0: no warm-up).
    pub warmup_steps: usize,
    /// The fraction of the learning rate the warm-up starts from.
    pub warmup_start: f64,
    /// The loss-spike guard: back to the last good checkpoint with a lower learning rate.
    pub spike: SpikeGuardConfig,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optimizer: OptimizerKind::Adam,
            lr: 1e-4,
            momentum: 0.9,
            weight_decay: 0.0,
            lr_step_epochs: 3,
            lr_gamma: 0.1,
            epochs: 12,
            batch_size: 2,
            augment: true,
            seed: 1,
            crop: 0,
            clip_grad_norm: DEFAULT_CLIP_GRAD_NORM,
            warmup_steps: 250,
            warmup_start: 0.001,
            spike: SpikeGuardConfig::default(),
        }
    }
}

/// The default limit of the gradients' global norm. Measured on the CPU recipe (ResNet-18
/// FPN-128 from scratch, Adam 1e-3, batch 4): see README, "Training that converges".
pub const DEFAULT_CLIP_GRAD_NORM: f64 = 10.0;

impl TrainConfig {
    /// The learning rate during `epoch` (0-based).
    pub fn lr_at(&self, epoch: usize) -> f64 {
        let steps = epoch.checked_div(self.lr_step_epochs.max(1)).unwrap_or(0);
        self.lr * self.lr_gamma.powi(steps as i32)
    }

    /// The learning rate of the optimiser step after `step` steps (0-based) in `epoch`: the
    /// step schedule, times the warm-up, times the guard's `scale` (1 until a recovery).
    /// The warm-up lasts `warmup_steps` but at most the first epoch (`steps_per_epoch`), as
    /// torchvision's reference does, so a short run is not spent warming up.
    pub fn lr_for(&self, epoch: usize, step: i64, scale: f64, steps_per_epoch: usize) -> f64 {
        let warmup = self.warmup_steps.min(steps_per_epoch);
        self.lr_at(epoch) * scale * warmup_factor(step, warmup, self.warmup_start)
    }

    /// Problems with the convergence settings, as (field, message) pairs (empty: fine).
    pub fn stability_problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !(self.clip_grad_norm >= 0.0 && self.clip_grad_norm.is_finite()) {
            out.push((
                "clip_grad_norm",
                "must be 0 (off) or a positive number".into(),
            ));
        }
        if !(self.warmup_start > 0.0 && self.warmup_start <= 1.0) {
            out.push(("warmup_start", "must be in (0, 1]".into()));
        }
        let g = &self.spike;
        if !(g.factor == 0.0 || (g.factor > 1.0 && g.factor.is_finite())) {
            out.push(("spike.factor", "must be 0 (off) or above 1".into()));
        }
        if g.window_steps == 0 {
            out.push(("spike.window_steps", "must be at least 1".into()));
        }
        if !(g.lr_factor > 0.0 && g.lr_factor < 1.0) {
            out.push(("spike.lr_factor", "must be in (0, 1)".into()));
        }
        out
    }
}

/// The optimiser and its state, kept by parameter name so that it can be saved.
#[derive(Debug)]
pub struct Optimizer {
    kind: OptimizerKind,
    momentum: f64,
    weight_decay: f64,
    /// Steps taken.
    pub step: i64,
    /// Per parameter: first moment (Adam) or momentum buffer (SGD).
    first: BTreeMap<String, Tensor>,
    /// Per parameter: second moment (Adam).
    second: BTreeMap<String, Tensor>,
}

impl Optimizer {
    /// A fresh optimiser.
    pub fn new(cfg: &TrainConfig) -> Self {
        Optimizer {
            kind: cfg.optimizer,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            step: 0,
            first: BTreeMap::new(),
            second: BTreeMap::new(),
        }
    }

    /// Clears the gradients of `params` before a backward pass.
    pub fn zero_grad(params: &[(String, Tensor)]) {
        for (_, p) in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// One update of the trainable `params` from their gradients, as torch.optim does.
    pub fn apply(&mut self, params: &[(String, Tensor)], lr: f64) {
        self.step += 1;
        let t = self.step as i32;
        tch::no_grad(|| {
            for (name, p) in params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = if self.weight_decay != 0.0 {
                    &g + p * self.weight_decay
                } else {
                    g
                };
                match self.kind {
                    OptimizerKind::Adam => {
                        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
                        let m = match self.first.get(name) {
                            Some(m) => m * b1 + &g * (1.0 - b1),
                            None => &g * (1.0 - b1),
                        };
                        let v = match self.second.get(name) {
                            Some(v) => v * b2 + &g * &g * (1.0 - b2),
                            None => &g * &g * (1.0 - b2),
                        };
                        let c1 = 1.0 - b1.powi(t);
                        let c2 = 1.0 - b2.powi(t);
                        let denom = (&v / c2).sqrt() + eps;
                        let update = (&m / c1) / denom * lr;
                        let _ = p.shallow_clone().f_sub_(&update);
                        self.first.insert(name.clone(), m);
                        self.second.insert(name.clone(), v);
                    }
                    OptimizerKind::Sgd => {
                        let buf = match self.first.get(name) {
                            Some(b) => b * self.momentum + &g,
                            None => g.copy(),
                        };
                        let _ = p.shallow_clone().f_sub_(&(&buf * lr));
                        self.first.insert(name.clone(), buf);
                    }
                }
            }
        });
    }

    /// The state as named tensors (`first.<param>`, `second.<param>`).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        for (k, v) in &self.first {
            out.push((format!("first.{k}"), v.shallow_clone()));
        }
        for (k, v) in &self.second {
            out.push((format!("second.{k}"), v.shallow_clone()));
        }
        out
    }

    /// Restores the state saved by [`Optimizer::tensors`].
    pub fn restore(&mut self, tensors: Vec<(String, Tensor)>, step: i64) {
        self.step = step;
        for (k, v) in tensors {
            if let Some(name) = k.strip_prefix("first.") {
                self.first.insert(name.to_string(), v);
            } else if let Some(name) = k.strip_prefix("second.") {
                self.second.insert(name.to_string(), v);
            }
        }
    }
}

/// Progress of a run, saved beside the weights.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunState {
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimiser steps taken.
    pub step: i64,
    /// Mean loss of each completed epoch.
    pub epoch_losses: Vec<f64>,
    /// Training seconds so far.
    pub seconds: f64,
    /// The spike guard's recoveries, in order (the last one's scale holds from then on).
    #[serde(default)]
    pub recoveries: Vec<Recovery>,
    /// Gradient norms of each completed epoch.
    #[serde(default)]
    pub grad_stats: Vec<GradStats>,
}

pub use crate::stability::lr_scale;

/// What the progress callback sees after each step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Boards done in this epoch.
    pub done: usize,
    /// Boards per epoch.
    pub total: usize,
    /// Loss of the last step.
    pub loss: f64,
    /// Boards per second over this epoch.
    pub images_per_sec: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Global gradient norm of the last step, before clipping.
    pub grad_norm: f64,
    /// Mean step loss of this epoch so far.
    pub mean_loss: f64,
    /// Gradient norms of this epoch so far.
    pub grads: GradStats,
    /// Set on the first report after the spike guard sent the run back.
    pub recovery: Option<Recovery>,
}

/// Paths of a checkpoint in `dir`.
pub fn checkpoint_paths(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    (
        dir.join("model.safetensors"),
        dir.join("optimizer.safetensors"),
        dir.join("state.json"),
    )
}

fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), VisionError>,
) -> Result<(), VisionError> {
    let tmp = path.with_extension("tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| VisionError::Data(format!("renaming {}: {e}", tmp.display())))
}

/// Writes weights, optimiser state and progress into `dir`, each file atomically.
pub fn save_checkpoint<S: serde::Serialize>(
    dir: &Path,
    det: &Detector,
    optimizer: &Optimizer,
    state: &S,
) -> Result<(), VisionError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| VisionError::Data(format!("creating {}: {e}", dir.display())))?;
    let (model_path, optim_path, state_path) = checkpoint_paths(dir);
    write_atomic(&model_path, |p| det.save(p))?;
    write_atomic(&optim_path, |p| {
        Tensor::write_safetensors(&optimizer.tensors(), p).map_err(|e| VisionError::Checkpoint {
            path: p.display().to_string(),
            message: e.to_string(),
        })
    })?;
    let json = serde_json::to_string_pretty(state).map_err(|e| VisionError::Data(e.to_string()))?;
    write_atomic(&state_path, |p| {
        std::fs::write(p, &json)
            .map_err(|e| VisionError::Data(format!("writing {}: {e}", p.display())))
    })
}

/// Restores weights and optimiser state from `dir` and returns the saved progress; `None`
/// when `dir` holds no checkpoint.
pub fn load_checkpoint<S: serde::de::DeserializeOwned + HasStep>(
    dir: &Path,
    det: &mut Detector,
    optimizer: &mut Optimizer,
) -> Result<Option<S>, VisionError> {
    let (model_path, optim_path, state_path) = checkpoint_paths(dir);
    if !state_path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&state_path)
        .map_err(|e| VisionError::Data(format!("reading {}: {e}", state_path.display())))?;
    let state: S = serde_json::from_str(&text)
        .map_err(|e| VisionError::Data(format!("parsing {}: {e}", state_path.display())))?;
    det.load(&model_path)?;
    let tensors = Tensor::read_safetensors(&optim_path).map_err(|e| VisionError::Checkpoint {
        path: optim_path.display().to_string(),
        message: e.to_string(),
    })?;
    // The file loads onto the CPU; the moments must sit with the parameters (a GPU).
    let device = det.vs.device();
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_device(device)))
        .collect();
    optimizer.restore(tensors, state.step());
    Ok(Some(state))
}

/// Progress records that know the optimiser step they were saved at.
pub trait HasStep {
    /// Optimiser steps taken when saved.
    fn step(&self) -> i64;
}

impl HasStep for RunState {
    fn step(&self) -> i64 {
        self.step
    }
}

/// Work done ahead of its reader on worker threads and handed over in order: the boards of
/// an epoch decoded while the model trains on earlier ones (on a GPU the step outruns one
/// thread's decoding). Item `j` is `make(j)`; worker `w` makes items `w, w + n, ...` into a
/// bounded lane of its own, so at most `n × depth` items wait in memory, and reading the
/// lanes in turn restores the order without a reorder buffer. Used by `train` here and by
/// the trainer ranks.
pub struct Prefetch<T> {
    lanes: Vec<Receiver<T>>,
    next: usize,
}

impl<T: Send> Prefetch<T> {
    /// Starts `workers` threads (at least 1) in `scope` making items `0..count`.
    pub fn start<'scope, 'env, F>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        count: usize,
        workers: usize,
        depth: usize,
        make: F,
    ) -> Prefetch<T>
    where
        T: 'scope,
        F: Fn(usize) -> T + Send + Sync + 'scope,
    {
        let workers = workers.clamp(1, count.max(1));
        let make = std::sync::Arc::new(make);
        let lanes = (0..workers)
            .map(|w| {
                let (tx, rx) = sync_channel(depth.max(1));
                let make = make.clone();
                scope.spawn(move || {
                    for j in (w..count).step_by(workers) {
                        // A closed lane means the reader stopped early (an error): stop.
                        if tx.send(make(j)).is_err() {
                            break;
                        }
                    }
                });
                rx
            })
            .collect();
        Prefetch { lanes, next: 0 }
    }

    /// The next item in order; `None` after the last one (or if a worker died).
    pub fn next_item(&mut self) -> Option<T> {
        let lane = &self.lanes[self.next % self.lanes.len()];
        self.next += 1;
        lane.recv().ok()
    }
}

/// Decoding threads for training: a quarter of the cores, 1 to 4 (decoding a board takes
/// a few milliseconds, a step on a CPU hundreds).
fn decode_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() / 4)
        .unwrap_or(1)
        .clamp(1, 4)
}

/// One training example from a board: composed input, then (per `cfg`) a random crop and
/// a random flip or quarter turn, with the boxes following; on `device`.
pub fn training_example(
    board: &crate::data::Board,
    mode: crate::transform::InputMode,
    cfg: &TrainConfig,
    device: tch::Device,
) -> Result<(Tensor, Target), VisionError> {
    let mut input = compose(mode, &board.image, board.template.as_ref())?;
    let (mut boxes, mut labels) = (board.boxes.shallow_clone(), board.labels.shallow_clone());
    let (h, w) = (input.size()[1], input.size()[2]);
    if cfg.crop > 0 && (h > cfg.crop || w > cfg.crop) {
        let c = cfg.crop.min(h).min(w);
        let pick = |n: i64| {
            Tensor::randint(n - c + 1, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0])
        };
        let (y0, x0) = (pick(h), pick(w));
        input = input.narrow(1, y0, c).narrow(2, x0, c);
        (boxes, labels) = crate::data::crop_boxes(&boxes, &labels, x0, y0, c);
    }
    let (h, w) = (input.size()[1], input.size()[2]);
    let sym = if cfg.augment {
        Symmetry::nth(
            (Tensor::randint(8, [1], (Kind::Int64, tch::Device::Cpu)).int64_value(&[0])) as u8,
        )
    } else {
        Symmetry::nth(0)
    };
    Ok((
        sym.image(&input).to_device(device),
        Target {
            boxes: sym.boxes(&boxes, h, w).to_device(device),
            labels: labels.to_device(device),
        },
    ))
}

/// How one pass over an epoch ended.
enum EpochEnd {
    /// Every step ran: the epoch's loss sum, steps and gradient norms.
    Done(f64, usize, GradStats),
    /// The guard saw a spike at this step (1-based).
    Spike(usize, f64, f64),
}

/// Trains `det` on `files` for `cfg.epochs`, checkpointing into `out` after every epoch
/// and resuming from the checkpoint found there. When the spike guard trips, the run goes
/// back to that checkpoint with the learning rate scaled down (at most
/// `cfg.spike.max_recoveries` times; a spike before the first checkpoint is an error).
pub fn train(
    det: &mut Detector,
    files: &[BoardFile],
    cfg: &TrainConfig,
    out: &Path,
    mut progress: impl FnMut(&Progress),
) -> Result<RunState, VisionError> {
    if files.is_empty() {
        return Err(VisionError::Data("no boards to train on".into()));
    }
    std::fs::create_dir_all(out)
        .map_err(|e| VisionError::Data(format!("creating {}: {e}", out.display())))?;
    let mut optimizer = Optimizer::new(cfg);
    let mut state = RunState::default();
    if let Some(saved) = load_checkpoint(out, det, &mut optimizer)? {
        state = saved;
        tracing::info!(
            epochs_done = state.epochs_done,
            step = state.step,
            lr_scale = lr_scale(&state.recoveries),
            "resuming"
        );
    }
    let params = det.trainable();
    let mode = det.model.config.input;
    let mut guard = SpikeGuard::new(cfg.spike.clone(), state.epoch_losses.last().copied());
    let mut recovered: Option<Recovery> = None;
    while state.epochs_done < cfg.epochs {
        let epoch = state.epochs_done;
        // Same order for an epoch whether or not the run was interrupted before it.
        tch::manual_seed((cfg.seed.wrapping_mul(1000) + epoch as u64) as i64);
        let order = Vec::<i64>::try_from(&Tensor::randperm(
            files.len() as i64,
            (Kind::Int64, tch::Device::Cpu),
        ))
        .map_err(VisionError::Torch)?;
        let started = Instant::now();
        guard.restart(state.epoch_losses.last().copied());
        let end = std::thread::scope(|scope| -> Result<EpochEnd, VisionError> {
            let order = &order;
            let mut boards = Prefetch::start(
                scope,
                order.len(),
                decode_workers(),
                2 * cfg.batch_size.max(1),
                move |j| files[order[j] as usize].load(),
            );
            let (mut sum, mut steps, mut grads) = (0.0, 0usize, GradStats::default());
            for (b, chunk) in order.chunks(cfg.batch_size.max(1)).enumerate() {
                let mut images = Vec::new();
                let mut targets = Vec::new();
                for _ in chunk {
                    let board = boards
                        .next_item()
                        .ok_or_else(|| VisionError::Data("the board decoder stopped".into()))??;
                    let (image, target) = training_example(&board, mode, cfg, det.vs.device())?;
                    images.push(image);
                    targets.push(target);
                }
                let losses = det.model.losses(&images, &targets)?;
                let total = losses.total();
                let loss = total.double_value(&[]);
                if let Verdict::Spike { loss, reference } = guard.step(loss) {
                    return Ok(EpochEnd::Spike(b + 1, loss, reference));
                }
                Optimizer::zero_grad(&params);
                total.backward();
                let norm = clip_grad_norm(&params, cfg.clip_grad_norm);
                if !norm.is_finite() {
                    return Ok(EpochEnd::Spike(b + 1, norm, f64::NAN));
                }
                grads.add(norm, cfg.clip_grad_norm);
                let lr = cfg.lr_for(
                    epoch,
                    optimizer.step,
                    lr_scale(&state.recoveries),
                    files.len().div_ceil(cfg.batch_size.max(1)),
                );
                optimizer.apply(&params, lr);
                sum += loss;
                steps += 1;
                let done = ((b + 1) * cfg.batch_size).min(files.len());
                progress(&Progress {
                    epoch,
                    done,
                    total: files.len(),
                    loss,
                    images_per_sec: done as f64 / started.elapsed().as_secs_f64().max(1e-9),
                    lr,
                    grad_norm: norm,
                    mean_loss: sum / steps as f64,
                    grads: grads.clone(),
                    recovery: recovered.take(),
                });
            }
            Ok(EpochEnd::Done(sum, steps, grads))
        })?;
        let (at_step, loss, reference) = match end {
            EpochEnd::Done(sum, steps, grads) => {
                let mean = sum / steps.max(1) as f64;
                match guard.epoch_end(mean) {
                    Verdict::Fine => {
                        state.epochs_done = epoch + 1;
                        state.step = optimizer.step;
                        state.epoch_losses.push(mean);
                        state.seconds += started.elapsed().as_secs_f64();
                        tracing::info!(epoch, loss = mean, %grads, "epoch done");
                        state.grad_stats.push(grads);
                        save_checkpoint(out, det, &optimizer, &state)?;
                        continue;
                    }
                    Verdict::Spike { loss, reference } => (steps, loss, reference),
                }
            }
            EpochEnd::Spike(step, loss, reference) => (step, loss, reference),
        };
        // Back to the last good checkpoint, with a lower learning rate from now on.
        let seconds = state.seconds + started.elapsed().as_secs_f64();
        // Whatever comes next, the model in memory is the last good one again.
        let mut fresh = Optimizer::new(cfg);
        let Some(mut good) = load_checkpoint::<RunState>(out, det, &mut fresh)? else {
            return Err(VisionError::Data(format!(
                "loss became {loss} at epoch {} step {at_step}, before the first checkpoint; \
                 lower the learning rate (--lr) or raise the warm-up",
                epoch + 1
            )));
        };
        if state.recoveries.len() >= cfg.spike.max_recoveries {
            return Err(VisionError::Data(format!(
                "loss {loss} at epoch {} step {at_step} after {} recoveries from loss spikes; \
                 lower the learning rate (--lr) or raise the warm-up",
                epoch + 1,
                state.recoveries.len()
            )));
        }
        optimizer = fresh;
        let recovery = Recovery::after(
            &state.recoveries,
            epoch,
            at_step,
            loss,
            reference,
            cfg.spike.lr_factor,
        );
        tracing::warn!(%recovery, "loss spike");
        good.recoveries = state.recoveries.clone();
        good.recoveries.push(recovery.clone());
        // The time spent on the lost steps counts: the run took it.
        good.seconds = seconds;
        save_checkpoint(out, det, &optimizer, &good)?;
        state = good;
        recovered = Some(recovery);
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_hands_items_over_in_order_and_passes_errors_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Board i is i + 1 pixels wide, so its width tells which board arrived.
        let files: Vec<BoardFile> = (0..7u32)
            .map(|i| {
                let image = dir.path().join(format!("{i}.png"));
                if i != 5 {
                    image::GrayImage::new(i + 1, 3).save(&image).expect("png");
                }
                BoardFile {
                    name: format!("{i}"),
                    image,
                    template: None,
                    boxes: vec![],
                }
            })
            .collect();
        let order = [3usize, 0, 6, 4, 1, 2, 5];
        for workers in [1, 3, 9] {
            let widths = std::thread::scope(|scope| {
                let (files, order) = (&files, &order);
                let mut boards = Prefetch::start(scope, order.len(), workers, 1, move |j| {
                    files[order[j]].load()
                });
                let mut widths = Vec::new();
                for _ in 0..6 {
                    let board = boards.next_item().expect("an item").expect("a board");
                    widths.push(board.image.size()[2]);
                }
                let err = boards
                    .next_item()
                    .expect("an item")
                    .expect_err("board 5 has no file");
                assert!(err.to_string().contains("5.png"), "{err}");
                assert!(boards.next_item().is_none(), "7 items, no more");
                widths
            });
            assert_eq!(widths, [4, 1, 7, 5, 2, 3], "{workers} workers");
        }
        // A reader that stops early leaves its workers blocked on full lanes: the scope
        // must still end.
        std::thread::scope(|scope| {
            let mut items = Prefetch::start(scope, 100, 2, 1, |j| j);
            assert_eq!(items.next_item(), Some(0));
        });
    }

    #[test]
    fn warm_up_lasts_at_most_the_first_epoch_and_scales_with_the_guard() {
        let c = TrainConfig {
            lr: 1.0,
            lr_step_epochs: 3,
            warmup_steps: 100,
            warmup_start: 0.0,
            ..TrainConfig::default()
        };
        assert_eq!(c.lr_for(0, 0, 1.0, 1000), 0.0);
        assert!((c.lr_for(0, 50, 1.0, 1000) - 0.5).abs() < 1e-12);
        assert_eq!(c.lr_for(0, 100, 1.0, 1000), 1.0);
        // 20 steps per epoch: the warm-up is over after 20.
        assert!((c.lr_for(0, 10, 1.0, 20) - 0.5).abs() < 1e-12);
        assert_eq!(c.lr_for(1, 20, 1.0, 20), 1.0);
        assert!(
            (c.lr_for(3, 500, 0.5, 20) - 0.05).abs() < 1e-12,
            "step x guard"
        );
    }

    #[test]
    fn step_schedule() {
        let c = TrainConfig {
            lr: 1.0,
            lr_step_epochs: 3,
            lr_gamma: 0.1,
            ..TrainConfig::default()
        };
        assert_eq!(c.lr_at(0), 1.0);
        assert_eq!(c.lr_at(2), 1.0);
        assert!((c.lr_at(3) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(6) - 0.01).abs() < 1e-12);
    }

    #[test]
    fn adam_and_sgd_match_torch_optim_on_a_quadratic() {
        // Reference values printed by torch 2.11's torch.optim.Adam(lr=0.1) and
        // SGD(lr=0.1, momentum=0.9) on p = [1, -2], loss = sum(p^2), 3 steps. By hand for SGD: p1 = p0 - 0.1*2p0 = 0.8p0; buf2 = 0.9*2p0 + 2*0.8p0 = 3.4p0,
        // p2 = 0.8p0 - 0.34p0 = 0.46p0; buf3 = 0.9*3.4p0 + 2*0.46p0 = 3.98p0,
        // p3 = 0.46p0 - 0.398p0 = 0.062p0.
        for (kind, want) in [
            (OptimizerKind::Adam, [0.701_586_3f64, -1.700_623_4]),
            (OptimizerKind::Sgd, [0.062, -0.124]),
        ] {
            let p = Tensor::from_slice(&[1f32, -2.]).set_requires_grad(true);
            let params = vec![("p".to_string(), p.shallow_clone())];
            let cfg = TrainConfig {
                optimizer: kind,
                ..TrainConfig::default()
            };
            let mut opt = Optimizer::new(&cfg);
            for _ in 0..3 {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
                (&p * &p).sum(Kind::Float).backward();
                opt.apply(&params, 0.1);
            }
            let got = Vec::<f32>::try_from(&p.detach()).unwrap();
            for (a, b) in got.iter().zip(want) {
                assert!(
                    (*a as f64 - b).abs() < 1e-6,
                    "{kind:?}: {got:?} vs {want:?}"
                );
            }
        }
    }
}
