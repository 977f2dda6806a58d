//! What keeps a run from diverging, shared by `pcb train` on a folder and the trainer
//! ranks: a linear learning-rate warm-up, clipping of the gradients' global norm, and a
//! guard that notices a loss spike and sends the run back to its last good checkpoint with
//! a lower learning rate.
//!
//! Why all three: Adam divides each update by the running RMS of its gradients, so one
//! batch whose gradient is many times the usual moves every weight by several learning
//! rates at once, in the direction of that one batch. With batch norm trained from scratch
//! at the start of a run the statistics are not settled, and such a step can knock the
//! network into a region it climbs out of only slowly (the README's recipe lost four
//! epochs that way on one CPU). The warm-up keeps the first steps small while the moments
//! and the norms settle; clipping bounds any single step; the guard is the last resort
//! when a run diverges anyway, and it says so (logged, counted in the run's state).

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How the loss-spike guard decides and what it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpikeGuardConfig {
    /// A spike is a running mean of the step losses (or an epoch's mean) above this many
    /// times the mean loss of the last good epoch (0: no guard).
    pub factor: f64,
    /// Steps in the running mean; the guard watches once an epoch has this many.
    pub window_steps: usize,
    /// The learning rate is multiplied by this after each recovery.
    pub lr_factor: f64,
    /// Recoveries allowed in one run; one more spike ends the run with an error.
    pub max_recoveries: usize,
}

impl Default for SpikeGuardConfig {
    fn default() -> Self {
        SpikeGuardConfig {
            factor: 1.5,
            window_steps: 50,
            lr_factor: 0.5,
            max_recoveries: 3,
        }
    }
}

/// One recovery from a spike, as kept in a run's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// Epoch (0-based) in which the spike was seen.
    pub epoch: usize,
    /// Step within that epoch (1-based).
    pub step: usize,
    /// The running or epoch mean that tripped the guard (NaN is written as null).
    pub loss: Option<f64>,
    /// The last good epoch's mean loss it was compared with.
    pub reference: f64,
    /// The learning-rate scale from then on.
    pub lr_scale: f64,
}

impl Recovery {
    /// The recovery from a spike seen at `epoch` (0-based), `step` (1-based): the learning
    /// rate scale of the `previous` recoveries times `lr_factor`.
    pub fn after(
        previous: &[Recovery],
        epoch: usize,
        step: usize,
        loss: f64,
        reference: f64,
        lr_factor: f64,
    ) -> Recovery {
        Recovery {
            epoch,
            step,
            loss: loss.is_finite().then_some(loss),
            reference,
            lr_scale: lr_scale(previous) * lr_factor,
        }
    }
}

/// The learning-rate scale after `recoveries` (1 before the first).
pub fn lr_scale(recoveries: &[Recovery]) -> f64 {
    recoveries.last().map_or(1.0, |r| r.lr_scale)
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let loss = self
            .loss
            .map_or_else(|| "not a number".to_string(), |l| format!("{l:.3}"));
        write!(
            f,
            "loss spike at epoch {} step {}: {} against {:.3} for the last good epoch; \
             restored that epoch's checkpoint, learning rate now x{}",
            self.epoch + 1,
            self.step,
            loss,
            self.reference,
            self.lr_scale
        )
    }
}

/// What the guard says about the latest loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Go on.
    Fine,
    /// Go back: `loss` (running or epoch mean, or a non-finite step loss) is too high
    /// against `reference`.
    Spike {
        /// The value that tripped the guard.
        loss: f64,
        /// The last good epoch's mean loss.
        reference: f64,
    },
}

/// Watches the step losses of one epoch against the last good epoch's mean.
#[derive(Debug, Clone)]
pub struct SpikeGuard {
    cfg: SpikeGuardConfig,
    reference: Option<f64>,
    window: std::collections::VecDeque<f64>,
}

impl SpikeGuard {
    /// A guard comparing with `reference`, the last good epoch's mean loss (`None` before
    /// the first epoch ends: nothing to compare with, so only non-finite losses count).
    pub fn new(cfg: SpikeGuardConfig, reference: Option<f64>) -> SpikeGuard {
        SpikeGuard {
            cfg,
            reference: reference.filter(|r| r.is_finite() && *r > 0.0),
            window: Default::default(),
        }
    }

    /// Starts a new epoch (or the same one again after a recovery) against `reference`.
    pub fn restart(&mut self, reference: Option<f64>) {
        *self = SpikeGuard::new(self.cfg.clone(), reference);
    }

    fn too_high(&self, value: f64) -> Verdict {
        match self.reference {
            Some(reference) if self.cfg.factor > 0.0 && value > self.cfg.factor * reference => {
                Verdict::Spike {
                    loss: value,
                    reference,
                }
            }
            _ => Verdict::Fine,
        }
    }

    /// The loss of one step. A non-finite loss is always a spike.
    pub fn step(&mut self, loss: f64) -> Verdict {
        if !loss.is_finite() {
            return Verdict::Spike {
                loss,
                reference: self.reference.unwrap_or(f64::NAN),
            };
        }
        let n = self.cfg.window_steps.max(1);
        self.window.push_back(loss);
        while self.window.len() > n {
            self.window.pop_front();
        }
        if self.window.len() < n {
            return Verdict::Fine;
        }
        // Summed afresh each step (a window is tens of values): no drifting running sum.
        self.too_high(self.window.iter().sum::<f64>() / n as f64)
    }

    /// The mean loss of a finished epoch (short epochs never fill the window).
    pub fn epoch_end(&self, mean: f64) -> Verdict {
        if !mean.is_finite() {
            return Verdict::Spike {
                loss: mean,
                reference: self.reference.unwrap_or(f64::NAN),
            };
        }
        self.too_high(mean)
    }
}

/// The warm-up's factor at optimiser step `step` (0-based): linear from `start` to 1 over
/// `steps` steps, as torchvision's detection reference warms up (`start` 0.001).
pub fn warmup_factor(step: i64, steps: usize, start: f64) -> f64 {
    if steps == 0 || step >= steps as i64 {
        return 1.0;
    }
    let alpha = step.max(0) as f64 / steps as f64;
    start * (1.0 - alpha) + alpha
}

/// The global L2 norm of the gradients of `params`, then, when `max_norm` > 0 and the norm
/// is above it, every gradient scaled by `max_norm / norm` (`torch.nn.utils.
/// clip_grad_norm_`). Returns the norm before clipping (NaN when a gradient is not finite:
/// the caller must not step then).
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let norms: Vec<Tensor> = params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.to_kind(Kind::Float).norm())
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        // The norms stay where the parameters are: one transfer for the total, not one per
        // parameter (on a GPU each would wait for the device).
        let total = Tensor::stack(&norms, 0).norm().double_value(&[]);
        if max_norm > 0.0 && total.is_finite() && total > max_norm {
            let scale = max_norm / (total + 1e-6);
            for (_, p) in params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.g_mul_scalar_(scale);
                }
            }
        }
        total
    })
}

/// Gradient norms and clipping over one epoch, kept in a run's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GradStats {
    /// Steps seen.
    pub steps: usize,
    /// Mean global gradient norm before clipping.
    pub mean_norm: f64,
    /// Largest global gradient norm before clipping.
    pub max_norm: f64,
    /// Steps whose gradients were clipped.
    pub clipped: usize,
}

impl GradStats {
    /// Adds one step's norm (before clipping) under the limit `max_norm` (0: none).
    pub fn add(&mut self, norm: f64, max_norm: f64) {
        if !norm.is_finite() {
            return;
        }
        self.mean_norm = (self.mean_norm * self.steps as f64 + norm) / (self.steps + 1) as f64;
        self.steps += 1;
        self.max_norm = self.max_norm.max(norm);
        if max_norm > 0.0 && norm > max_norm {
            self.clipped += 1;
        }
    }
}

impl std::fmt::Display for GradStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gradient norm mean {:.2} max {:.2}, clipped {} of {} steps",
            self.mean_norm, self.max_norm, self.clipped, self.steps
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_ramps_linearly_then_stays_at_one() {
        assert_eq!(warmup_factor(0, 100, 0.001), 0.001);
        assert!((warmup_factor(50, 100, 0.001) - 0.5005).abs() < 1e-12);
        assert!((warmup_factor(99, 100, 0.0) - 0.99).abs() < 1e-12);
        assert_eq!(warmup_factor(100, 100, 0.001), 1.0);
        assert_eq!(warmup_factor(5000, 100, 0.001), 1.0);
        assert_eq!(warmup_factor(0, 0, 0.001), 1.0, "no warm-up");
    }

    #[test]
    fn clipping_scales_the_global_norm_down_and_leaves_small_gradients_alone() {
        let a = Tensor::from_slice(&[1f32, 2.]).set_requires_grad(true);
        let b = Tensor::from_slice(&[2f32]).set_requires_grad(true);
        let params = vec![
            ("a".to_string(), a.shallow_clone()),
            ("b".to_string(), b.shallow_clone()),
        ];
        // loss = 1.5 (a0² + a1² + b²): gradients 3a and 3b = [3, 6] and [6], norm 9.
        let backward = || {
            for (_, p) in &params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            ((&a * &a).sum(Kind::Float) * 1.5 + (&b * &b).sum(Kind::Float) * 1.5).backward();
        };
        backward();
        let norm = clip_grad_norm(&params, 3.0);
        assert!((norm - 9.0).abs() < 1e-5, "{norm}");
        let ga = Vec::<f32>::try_from(&a.grad()).unwrap();
        let gb = Vec::<f32>::try_from(&b.grad()).unwrap();
        // Scaled by 3/9: [1, 2] and [2], norm 3.
        for (got, want) in ga.iter().chain(gb.iter()).zip([1f32, 2., 2.]) {
            assert!((got - want).abs() < 1e-5, "{ga:?} {gb:?}");
        }
        backward();
        let norm = clip_grad_norm(&params, 100.0);
        assert!((norm - 9.0).abs() < 1e-5);
        assert_eq!(Vec::<f32>::try_from(&a.grad()).unwrap(), [3f32, 6.]);
        backward();
        clip_grad_norm(&params, 0.0);
        assert_eq!(Vec::<f32>::try_from(&b.grad()).unwrap(), [6f32], "0: off");
    }

    #[test]
    fn a_non_finite_gradient_gives_a_nan_norm_and_is_left_for_the_caller() {
        let a = Tensor::from_slice(&[1f32]).set_requires_grad(true);
        let params = vec![("a".to_string(), a.shallow_clone())];
        (&a * f64::NAN).sum(Kind::Float).backward();
        assert!(clip_grad_norm(&params, 1.0).is_nan());
    }

    fn guard(reference: Option<f64>, window_steps: usize) -> SpikeGuard {
        SpikeGuard::new(
            SpikeGuardConfig {
                factor: 1.5,
                window_steps,
                ..SpikeGuardConfig::default()
            },
            reference,
        )
    }

    #[test]
    fn the_guard_trips_on_a_running_mean_above_the_factor_and_not_on_one_bad_step() {
        // The shape of the README recipe's failure: epochs at 0.64, then steps above 2.
        // The limit is 1.5 x 0.64 = 0.96.
        let mut g = guard(Some(0.64), 8);
        // One step at 2.5 among 0.6s: the mean of eight is 6.7 / 8 = 0.8375, then
        // 6.6 / 8 = 0.825 once 0.7 leaves the window.
        for loss in [0.6, 0.7, 0.5, 0.6, 2.5, 0.6, 0.6, 0.6, 0.5] {
            assert_eq!(g.step(loss), Verdict::Fine, "{loss}");
        }
        // A second step above 2 (0.7 leaves): (6.6 - 0.7 + 2.2) / 8 = 1.0125 > 0.96.
        match g.step(2.2) {
            Verdict::Spike { loss, reference } => {
                assert!((loss - 1.0125).abs() < 1e-12, "{loss}");
                assert_eq!(reference, 0.64);
            }
            other => panic!("expected a spike, got {other:?}"),
        }
    }

    #[test]
    fn the_guard_checks_epoch_means_and_non_finite_losses_and_is_silent_without_reference() {
        let g = guard(Some(1.0), 4);
        assert_eq!(g.epoch_end(1.4), Verdict::Fine);
        assert!(matches!(g.epoch_end(1.6), Verdict::Spike { loss, .. } if loss == 1.6));
        let mut first = guard(None, 4);
        for _ in 0..10 {
            assert_eq!(first.step(50.0), Verdict::Fine, "no reference yet");
        }
        assert_eq!(first.epoch_end(50.0), Verdict::Fine);
        assert!(matches!(first.step(f64::NAN), Verdict::Spike { .. }));
        assert!(matches!(first.step(f64::INFINITY), Verdict::Spike { .. }));
        let mut off = SpikeGuard::new(
            SpikeGuardConfig {
                factor: 0.0,
                window_steps: 1,
                ..SpikeGuardConfig::default()
            },
            Some(1.0),
        );
        assert_eq!(off.step(100.0), Verdict::Fine, "factor 0: off");
        let mut g = guard(Some(1.0), 4);
        for _ in 0..4 {
            g.step(3.0);
        }
        g.restart(Some(1.0));
        assert_eq!(g.step(3.0), Verdict::Fine, "window emptied by restart");
    }

    #[test]
    fn grad_stats_count_clipped_steps() {
        let mut s = GradStats::default();
        for n in [1.0, 3.0, 20.0, f64::NAN] {
            s.add(n, 10.0);
        }
        assert_eq!((s.steps, s.clipped), (3, 1));
        assert!((s.mean_norm - 8.0).abs() < 1e-12);
        assert_eq!(s.max_norm, 20.0);
        assert_eq!(
            s.to_string(),
            "gradient norm mean 8.00 max 20.00, clipped 1 of 3 steps"
        );
    }
}
