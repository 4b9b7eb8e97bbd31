//! Policy-gradient losses on sampled tokens: each gives the loss and, per token, the
//! derivative of the loss with respect to that token's log-probability.

use serde::{Deserialize, Serialize};

/// Which objective a step minimises.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum LossKind {
    /// REINFORCE with group-normalised advantages (GRPO without clipping): `-A · log p`.
    Grpo,
    /// PPO's clipped surrogate against the sampler's log-probabilities.
    PpoClip {
        /// Clip range ε: ratios outside [1-ε, 1+ε] stop contributing gradient.
        eps: f32,
    },
    /// REINFORCE weighted by the token-level importance ratio learner/sampler, truncated at
    /// `cap` and treated as a constant.
    Tis {
        /// Largest weight.
        cap: f32,
    },
}

impl std::str::FromStr for LossKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpo" | "reinforce" => Ok(LossKind::Grpo),
            "ppo" | "ppo-clip" => Ok(LossKind::PpoClip { eps: 0.2 }),
            "tis" => Ok(LossKind::Tis { cap: 2.0 }),
            _ => Err(format!("unknown loss '{s}' (grpo, ppo-clip, tis)")),
        }
    }
}

/// Group-normalised advantages: `(r - mean) / (std + 1e-6)` within the group of samples of one
/// prompt; a group whose rewards are all equal gets zeros (it carries no signal).
pub fn group_advantages(rewards: &[f64]) -> Vec<f32> {
    let n = rewards.len() as f64;
    if rewards.is_empty() {
        return Vec::new();
    }
    let mean = rewards.iter().sum::<f64>() / n;
    let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    let std = var.sqrt();
    rewards
        .iter()
        .map(|r| ((r - mean) / (std + 1e-6)) as f32)
        .collect()
}

/// The loss of one token and `d loss / d log p_learner`, before normalisation by the token count.
///
/// `learner` is the learner's log-probability of the token at the current weights, `sampler` the
/// one the sampler reported, `adv` the sequence's advantage.
pub fn token_loss(kind: LossKind, learner: f32, sampler: f32, adv: f32) -> (f64, f32) {
    let (lp, adv) = (learner as f64, adv as f64);
    match kind {
        LossKind::Grpo => (-adv * lp, -adv as f32),
        LossKind::PpoClip { eps } => {
            let r = (lp - sampler as f64).exp();
            let clipped = r.clamp(1.0 - eps as f64, 1.0 + eps as f64);
            let (a, b) = (r * adv, clipped * adv);
            // min(r·A, clip(r)·A): the gradient flows only when the unclipped term is the min.
            if a <= b {
                (-a, (-adv * r) as f32)
            } else {
                (-b, 0.0)
            }
        }
        LossKind::Tis { cap } => {
            let w = (lp - sampler as f64).exp().min(cap as f64);
            (-w * adv * lp, (-w * adv) as f32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central difference of the loss in the learner log-probability.
    fn numeric(kind: LossKind, lp: f32, s: f32, a: f32) -> f64 {
        let h = 1e-3f32;
        let f = |x: f32| match kind {
            // TIS treats the weight as a constant: differentiate with it frozen at `lp`.
            LossKind::Tis { cap } => {
                let w = ((lp - s) as f64).exp().min(cap as f64);
                -w * a as f64 * x as f64
            }
            _ => token_loss(kind, x, s, a).0,
        };
        (f(lp + h) - f(lp - h)) / (2.0 * h as f64)
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let kinds = [
            LossKind::Grpo,
            LossKind::PpoClip { eps: 0.2 },
            LossKind::Tis { cap: 2.0 },
        ];
        for kind in kinds {
            for (lp, s) in [(-1.0f32, -1.0f32), (-0.5, -1.0), (-2.0, -1.0), (-1.1, -1.0)] {
                for a in [1.5f32, -0.7] {
                    let (_, d) = token_loss(kind, lp, s, a);
                    let n = numeric(kind, lp, s, a);
                    assert!(
                        (d as f64 - n).abs() < 1e-3,
                        "{kind:?} lp={lp} s={s} a={a}: {d} vs {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn ppo_clips_and_tis_truncates() {
        // Ratio e^0.5 ≈ 1.65 > 1.2 with a positive advantage: clipped, no gradient.
        let (l, d) = token_loss(LossKind::PpoClip { eps: 0.2 }, -0.5, -1.0, 1.0);
        assert_eq!(d, 0.0);
        assert!((l + 1.2).abs() < 1e-6);
        // The same ratio with a negative advantage keeps the unclipped (pessimistic) term.
        let (_, d) = token_loss(LossKind::PpoClip { eps: 0.2 }, -0.5, -1.0, -1.0);
        assert!((d as f64 - 0.5f64.exp()).abs() < 1e-6);
        // On policy every loss is plain REINFORCE.
        for k in [LossKind::PpoClip { eps: 0.2 }, LossKind::Tis { cap: 2.0 }] {
            assert_eq!(token_loss(k, -1.3, -1.3, 0.8).1, -0.8);
        }
        // TIS weight capped at 2.
        assert_eq!(
            token_loss(LossKind::Tis { cap: 2.0 }, 0.0, -3.0, 1.0).1,
            -2.0
        );
    }

    #[test]
    fn advantages_are_group_normalised() {
        let a = group_advantages(&[1.0, 0.0, 0.0, 1.0]);
        assert!(a
            .iter()
            .zip([1.0, -1.0, -1.0, 1.0])
            .all(|(x, y)| (x - y).abs() < 1e-5));
        assert_eq!(group_advantages(&[1.0, 1.0, 1.0]), vec![0.0; 3]);
        let a = group_advantages(&[3.0, 1.0, 2.0]);
        assert!(a.iter().sum::<f32>().abs() < 1e-6);
        assert!(a[0] > a[2] && a[2] > a[1]);
    }
}
