//! Optimiser pieces: AdamW over f32 master weights, dynamic loss scaling, gradient clipping and
//! the learning-rate schedule.

use serde::{Deserialize, Serialize};

/// Dynamic loss scaling for run-dtype gradients (numerics.md: FP16 needs it, BF16 tolerates it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LossScaler {
    /// The current scale the loss is multiplied by.
    pub scale: f32,
    /// Clean steps since the scale last changed.
    pub good_steps: u64,
    /// Clean steps after which the scale doubles.
    pub growth_interval: u64,
    /// Steps skipped for non-finite gradients so far.
    pub skipped: u64,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler::new(65536.0, 2000)
    }
}

impl LossScaler {
    /// A scaler starting at `scale`, doubling after `growth_interval` clean steps.
    pub fn new(scale: f32, growth_interval: u64) -> LossScaler {
        LossScaler {
            scale,
            good_steps: 0,
            growth_interval: growth_interval.max(1),
            skipped: 0,
        }
    }

    /// Records a step's outcome: halve on overflow (the step is skipped), grow after a run of
    /// clean steps. Returns whether the step may be applied.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            // Never below 1: a scale under 1 would push small gradients into subnormals.
            self.scale = (self.scale * 0.5).max(1.0);
            self.good_steps = 0;
            self.skipped += 1;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps >= self.growth_interval {
            // f32 holds any power of two the gradients could use.
            self.scale = (self.scale * 2.0).min(2f32.powi(24));
            self.good_steps = 0;
        }
        true
    }
}

/// Learning rate at a step: linear warm-up, then constant or cosine decay to a floor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: u64,
    /// Steps of cosine decay after warm-up (0: constant).
    pub decay_steps: u64,
    /// Floor of the decay as a fraction of `lr`.
    pub min_ratio: f64,
}

impl LrSchedule {
    /// A constant learning rate.
    pub fn constant(lr: f64) -> LrSchedule {
        LrSchedule {
            lr,
            warmup_steps: 0,
            decay_steps: 0,
            min_ratio: 1.0,
        }
    }

    /// The learning rate of step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.decay_steps == 0 {
            return self.lr;
        }
        let t = ((step - self.warmup_steps) as f64 / self.decay_steps as f64).min(1.0);
        let floor = self.lr * self.min_ratio;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AdamConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
    /// Decoupled weight decay (matrices only; norms are not decayed).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW moments of one tensor.
#[derive(Debug, Clone, Default)]
pub struct Moments {
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
}

/// One AdamW update of `p` with gradient `g` at 1-based step `t`.
pub fn adamw_update(
    cfg: &AdamConfig,
    lr: f64,
    t: u64,
    decay: bool,
    p: &mut [f32],
    g: &[f32],
    st: &mut Moments,
) {
    if st.m.len() != p.len() {
        st.m = vec![0.0; p.len()];
        st.v = vec![0.0; p.len()];
    }
    let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
    let c1 = 1.0 / (1.0 - cfg.beta1.powi(t as i32)) as f32;
    let c2 = 1.0 / (1.0 - cfg.beta2.powi(t as i32)) as f32;
    let (lr, eps) = (lr as f32, cfg.eps as f32);
    let wd = if decay { cfg.weight_decay as f32 } else { 0.0 };
    for i in 0..p.len() {
        let gi = g[i];
        st.m[i] = b1 * st.m[i] + (1.0 - b1) * gi;
        st.v[i] = b2 * st.v[i] + (1.0 - b2) * gi * gi;
        let mhat = st.m[i] * c1;
        let vhat = st.v[i] * c2;
        p[i] -= lr * (mhat / (vhat.sqrt() + eps) + wd * p[i]);
    }
}

/// The global L2 norm of several gradient tensors (accumulated in f64).
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    grads
        .into_iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// The factor that scales gradients of norm `norm` down to `max_norm` (1 when within it or
/// when clipping is off).
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaler_halves_on_overflow_and_doubles_after_clean_runs() {
        let mut s = LossScaler::new(65536.0, 3);
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.skipped, 1);
        assert!(s.update(true) && s.update(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.good_steps, 0);
        // An overflow resets the run.
        s.update(true);
        s.update(false);
        s.update(true);
        s.update(true);
        assert_eq!(s.scale, 32768.0);
        let d = LossScaler::default();
        assert_eq!((d.scale, d.growth_interval), (65536.0, 2000));
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = LrSchedule {
            lr: 1.0,
            warmup_steps: 4,
            decay_steps: 10,
            min_ratio: 0.1,
        };
        assert_eq!(s.at(0), 0.25);
        assert_eq!(s.at(3), 1.0);
        assert!((s.at(4) - 1.0).abs() < 1e-12);
        assert!(
            (s.at(9) - (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * 0.5).cos()))).abs()
                < 1e-12
        );
        assert!((s.at(14) - 0.1).abs() < 1e-12);
        assert!((s.at(100) - 0.1).abs() < 1e-12);
        assert_eq!(LrSchedule::constant(0.5).at(1000), 0.5);
    }

    #[test]
    fn adamw_matches_a_hand_computed_first_step() {
        // First step: mhat = g, vhat = g², so the update is lr * g / (|g| + eps) = lr * sign(g).
        let cfg = AdamConfig {
            weight_decay: 0.1,
            ..AdamConfig::default()
        };
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.3f32, -0.001, 0.0];
        let mut st = Moments::default();
        adamw_update(&cfg, 0.01, 1, true, &mut p, &g, &mut st);
        let want = [
            1.0 - 0.01 * (1.0 + 0.1),
            -2.0 + 0.01 * (1.0 + 0.1 * 2.0),
            0.5 - 0.01 * 0.05,
        ];
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!((global_norm([&g[..]]) - (0.09f64 + 1e-6).sqrt()).abs() < 1e-6);
        assert_eq!(clip_factor(2.0, 1.0), 1.0 / (2.0 + 1e-6));
        assert_eq!(clip_factor(0.5, 1.0), 1.0);
        assert_eq!(clip_factor(5.0, 0.0), 1.0);
    }
}
