//! Sampler/learner mismatch statistics: how far the trainer's logprobs of sampled tokens are from
//! the ones the sampler reported (definitions in numerics.md, "Measuring mismatch").
//!
//! With a_t the sampler's logprob of sampled token y_t and b_t the learner's:
//! `max_abs`/`mean_abs` of |a − b|, `k1` = mean (a − b) (KL(sampler‖learner) with tokens drawn
//! from the sampler), `k3` = mean (r − 1 − log r) with r = exp(b − a), the extremes of r, and per
//! sequence the sum of a − b (the log of the sequence-level importance ratio's inverse).

use halfstep_model::DType;
use serde_json::json;
use std::fmt;

/// Input that cannot be turned into mismatch statistics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MismatchError {
    /// The two sides scored a different number of tokens.
    #[error("sampler gave {sampler} logprobs but the learner gave {learner}")]
    LengthMismatch {
        /// Sampler logprobs.
        sampler: usize,
        /// Learner logprobs.
        learner: usize,
    },
    /// A logprob is NaN or infinite, so no ratio can be formed.
    #[error("token {index}: logprobs must be finite (sampler {sampler}, learner {learner})")]
    NonFinite {
        /// Token index within the sequence.
        index: usize,
        /// The sampler's value.
        sampler: f64,
        /// The learner's value.
        learner: f64,
    },
}

/// Mismatch between sampler and learner logprobs over a set of sequences, accumulated
/// incrementally. With no tokens every figure is 0 and every ratio 1.
#[derive(Debug, Clone, PartialEq)]
pub struct MismatchStats {
    /// Tokens compared.
    pub tokens: usize,
    /// Non-empty sequences compared.
    pub sequences: usize,
    /// max_t |a_t − b_t|.
    pub max_abs: f64,
    /// mean_t |a_t − b_t|.
    pub mean_abs: f64,
    /// mean_t (a_t − b_t): the k1 estimate of KL(sampler‖learner).
    pub k1: f64,
    /// mean_t (r_t − 1 − log r_t), r_t = exp(b_t − a_t): the k3 estimate of the same KL.
    pub k3: f64,
    /// min_t r_t.
    pub ratio_min: f64,
    /// max_t r_t.
    pub ratio_max: f64,
    /// max over sequences of |Σ_t (a_t − b_t)|.
    pub seq_log_ratio_max_abs: f64,
    /// min over sequences of exp(Σ_t (b_t − a_t)), the sequence-level importance ratio.
    pub seq_ratio_min: f64,
    /// max over sequences of exp(Σ_t (b_t − a_t)).
    pub seq_ratio_max: f64,
    // Sums behind the means, kept so that `merge` is exact rather than a mean of means.
    sum_abs: f64,
    sum_k1: f64,
    sum_k3: f64,
}

impl Default for MismatchStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Column names of [`MismatchStats::to_csv_row`], in order.
const CSV_COLUMNS: [&str; 11] = [
    "tokens",
    "sequences",
    "max_abs",
    "mean_abs",
    "k1",
    "k3",
    "ratio_min",
    "ratio_max",
    "seq_log_ratio_max_abs",
    "seq_ratio_min",
    "seq_ratio_max",
];

impl MismatchStats {
    /// Statistics of nothing yet.
    pub fn new() -> MismatchStats {
        MismatchStats {
            tokens: 0,
            sequences: 0,
            max_abs: 0.0,
            mean_abs: 0.0,
            k1: 0.0,
            k3: 0.0,
            ratio_min: 1.0,
            ratio_max: 1.0,
            seq_log_ratio_max_abs: 0.0,
            seq_ratio_min: 1.0,
            seq_ratio_max: 1.0,
            sum_abs: 0.0,
            sum_k1: 0.0,
            sum_k3: 0.0,
        }
    }

    /// Statistics of a list of `(sampler, learner)` logprob sequences.
    pub fn from_sequences<A, B>(seqs: &[(&[A], &[B])]) -> Result<MismatchStats, MismatchError>
    where
        A: Copy + Into<f64>,
        B: Copy + Into<f64>,
    {
        let mut s = MismatchStats::new();
        for (a, b) in seqs {
            s.add_sequence(a, b)?;
        }
        Ok(s)
    }

    /// Adds one sequence: the sampler's and the learner's logprobs of the same sampled tokens.
    ///
    /// On error nothing is added. An empty sequence adds nothing.
    pub fn add_sequence<A, B>(&mut self, sampler: &[A], learner: &[B]) -> Result<(), MismatchError>
    where
        A: Copy + Into<f64>,
        B: Copy + Into<f64>,
    {
        if sampler.len() != learner.len() {
            return Err(MismatchError::LengthMismatch {
                sampler: sampler.len(),
                learner: learner.len(),
            });
        }
        // Validate first so that a bad token cannot leave the statistics half updated.
        for (index, (&a, &b)) in sampler.iter().zip(learner).enumerate() {
            let (a, b) = (a.into(), b.into());
            if !(a.is_finite() && b.is_finite()) {
                return Err(MismatchError::NonFinite {
                    index,
                    sampler: a,
                    learner: b,
                });
            }
        }
        if sampler.is_empty() {
            return Ok(());
        }
        let mut part = MismatchStats::new();
        let mut seq_sum = 0.0;
        for (&a, &b) in sampler.iter().zip(learner) {
            // d = log(p_sampler / p_learner); log r = −d.
            let d = a.into() - b.into();
            let r = (-d).exp();
            let first = part.tokens == 0;
            part.tokens += 1;
            part.max_abs = part.max_abs.max(d.abs());
            part.sum_abs += d.abs();
            part.sum_k1 += d;
            part.sum_k3 += k3_term(d);
            part.ratio_min = if first { r } else { part.ratio_min.min(r) };
            part.ratio_max = if first { r } else { part.ratio_max.max(r) };
            seq_sum += d;
        }
        part.sequences = 1;
        part.seq_log_ratio_max_abs = seq_sum.abs();
        part.seq_ratio_min = (-seq_sum).exp();
        part.seq_ratio_max = part.seq_ratio_min;
        part.update_means();
        self.merge(&part);
        Ok(())
    }

    /// Folds in statistics gathered elsewhere (another batch, another worker).
    pub fn merge(&mut self, other: &MismatchStats) {
        if other.tokens == 0 {
            return;
        }
        if self.tokens == 0 {
            *self = other.clone();
            return;
        }
        self.tokens += other.tokens;
        self.sequences += other.sequences;
        self.max_abs = self.max_abs.max(other.max_abs);
        self.sum_abs += other.sum_abs;
        self.sum_k1 += other.sum_k1;
        self.sum_k3 += other.sum_k3;
        self.ratio_min = self.ratio_min.min(other.ratio_min);
        self.ratio_max = self.ratio_max.max(other.ratio_max);
        self.seq_log_ratio_max_abs = self.seq_log_ratio_max_abs.max(other.seq_log_ratio_max_abs);
        self.seq_ratio_min = self.seq_ratio_min.min(other.seq_ratio_min);
        self.seq_ratio_max = self.seq_ratio_max.max(other.seq_ratio_max);
        self.update_means();
    }

    fn update_means(&mut self) {
        let n = self.tokens as f64;
        self.mean_abs = self.sum_abs / n;
        self.k1 = self.sum_k1 / n;
        self.k3 = self.sum_k3 / n;
    }

    /// Whether sampler and learner agreed exactly on every token (parity).
    pub fn is_exact(&self) -> bool {
        self.max_abs == 0.0
    }

    /// The CSV header line matching [`MismatchStats::to_csv_row`] (no newline).
    pub fn to_csv_header() -> String {
        CSV_COLUMNS.join(",")
    }

    /// The statistics as one CSV line (no newline), full precision.
    pub fn to_csv_row(&self) -> String {
        // Debug formatting is the shortest round-trip form and switches to exponent notation
        // for tiny values, which mismatch figures often are.
        let f = [
            self.max_abs,
            self.mean_abs,
            self.k1,
            self.k3,
            self.ratio_min,
            self.ratio_max,
            self.seq_log_ratio_max_abs,
            self.seq_ratio_min,
            self.seq_ratio_max,
        ];
        let mut row = format!("{},{}", self.tokens, self.sequences);
        for v in f {
            row.push_str(&format!(",{v:?}"));
        }
        row
    }

    /// The JSON body of the server's `POST /v1/mismatch_report` for run dtype `dtype` and the
    /// learner that recomputed the logprobs (`parity`, `independent`, ...).
    pub fn to_report_json(&self, dtype: DType, learner: &str) -> serde_json::Value {
        // A non-finite optional figure (a ratio that overflowed) becomes null, which the route
        // accepts as "not reported"; it would reject the number.
        let opt = |v: f64| v.is_finite().then_some(v);
        json!({
            "dtype": dtype.name(),
            "learner": learner,
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "k1": opt(self.k1),
            "k3": opt(self.k3),
            "ratio_min": opt(self.ratio_min),
            "ratio_max": opt(self.ratio_max),
        })
    }
}

/// r − 1 − log r for r = exp(−d), written with expm1 so that tiny d (the usual case) does not
/// lose every digit to cancellation.
fn k3_term(d: f64) -> f64 {
    (-d).exp_m1() + d
}

impl fmt::Display for MismatchStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tokens={} seqs={} max_abs={:.3e} mean_abs={:.3e} k1={:.3e} k3={:.3e} \
             ratio=[{:.6}, {:.6}] seq_max_abs={:.3e} seq_ratio=[{:.6}, {:.6}]",
            self.tokens,
            self.sequences,
            self.max_abs,
            self.mean_abs,
            self.k1,
            self.k3,
            self.ratio_min,
            self.ratio_max,
            self.seq_log_ratio_max_abs,
            self.seq_ratio_min,
            self.seq_ratio_max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use halfstep_model::testmodel::SeededNormal;

    /// Every statistic straight from its definition, over all tokens at once.
    fn naive(seqs: &[(Vec<f64>, Vec<f64>)]) -> MismatchStats {
        let pairs: Vec<(f64, f64)> = seqs
            .iter()
            .flat_map(|(a, b)| a.iter().copied().zip(b.iter().copied()))
            .collect();
        let n = pairs.len() as f64;
        let ratios: Vec<f64> = pairs.iter().map(|(a, b)| (b - a).exp()).collect();
        let seq_sums: Vec<f64> = seqs
            .iter()
            .filter(|(a, _)| !a.is_empty())
            .map(|(a, b)| a.iter().sum::<f64>() - b.iter().sum::<f64>())
            .collect();
        let seq_ratios: Vec<f64> = seq_sums.iter().map(|s| (-s).exp()).collect();
        let mut s = MismatchStats::new();
        s.tokens = pairs.len();
        s.sequences = seq_sums.len();
        s.max_abs = pairs.iter().map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        s.mean_abs = pairs.iter().map(|(a, b)| (a - b).abs()).sum::<f64>() / n;
        s.k1 = pairs.iter().map(|(a, b)| a - b).sum::<f64>() / n;
        s.k3 = ratios.iter().map(|r| r - 1.0 - r.ln()).sum::<f64>() / n;
        s.ratio_min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        s.ratio_max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        s.seq_log_ratio_max_abs = seq_sums.iter().map(|x| x.abs()).fold(0.0, f64::max);
        s.seq_ratio_min = seq_ratios.iter().copied().fold(f64::INFINITY, f64::min);
        s.seq_ratio_max = seq_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        s
    }

    fn random_sequences(seed: u64, n: usize, noise: f64) -> Vec<(Vec<f64>, Vec<f64>)> {
        let mut rng = SeededNormal::new(seed);
        (0..n)
            .map(|i| {
                let len = 1 + (rng.uniform() * 40.0) as usize + i % 3;
                let a: Vec<f64> = (0..len).map(|_| -3.0 * rng.uniform()).collect();
                let b = a.iter().map(|x| x + noise * rng.normal()).collect();
                (a, b)
            })
            .collect()
    }

    fn assert_close(got: &MismatchStats, want: &MismatchStats) {
        assert_eq!(got.tokens, want.tokens);
        assert_eq!(got.sequences, want.sequences);
        let pairs = [
            ("max_abs", got.max_abs, want.max_abs),
            ("mean_abs", got.mean_abs, want.mean_abs),
            ("k1", got.k1, want.k1),
            ("k3", got.k3, want.k3),
            ("ratio_min", got.ratio_min, want.ratio_min),
            ("ratio_max", got.ratio_max, want.ratio_max),
            (
                "seq_abs",
                got.seq_log_ratio_max_abs,
                want.seq_log_ratio_max_abs,
            ),
            ("seq_ratio_min", got.seq_ratio_min, want.seq_ratio_min),
            ("seq_ratio_max", got.seq_ratio_max, want.seq_ratio_max),
        ];
        for (name, g, w) in pairs {
            assert!(
                (g - w).abs() <= 1e-9 * w.abs().max(1e-6),
                "{name}: got {g}, want {w}"
            );
        }
    }

    #[test]
    fn incremental_statistics_match_the_direct_definitions_on_random_data() {
        for (seed, noise) in [(1, 1e-3), (2, 0.05), (3, 0.5)] {
            let seqs = random_sequences(seed, 25, noise);
            let mut s = MismatchStats::new();
            for (a, b) in &seqs {
                s.add_sequence(a, b).unwrap();
            }
            assert_close(&s, &naive(&seqs));
        }
    }

    #[test]
    fn merging_halves_equals_adding_everything() {
        let seqs = random_sequences(7, 30, 0.02);
        let (x, y) = seqs.split_at(11);
        let build = |part: &[(Vec<f64>, Vec<f64>)]| {
            let mut s = MismatchStats::new();
            for (a, b) in part {
                s.add_sequence(a, b).unwrap();
            }
            s
        };
        let mut merged = build(x);
        merged.merge(&build(y));
        merged.merge(&MismatchStats::new());
        assert_close(&merged, &build(&seqs));
        let mut from_empty = MismatchStats::new();
        from_empty.merge(&merged);
        assert_eq!(from_empty, merged);
    }

    #[test]
    fn identical_logprobs_give_zero_mismatch_and_unit_ratios() {
        let a = [-0.5f32, -2.25, -0.001, -7.0];
        let mut s = MismatchStats::new();
        s.add_sequence(&a, &a).unwrap();
        s.add_sequence(&a[..2], &a[..2]).unwrap();
        assert!(s.is_exact());
        assert_eq!((s.tokens, s.sequences), (6, 2));
        for v in [s.max_abs, s.mean_abs, s.k1, s.k3, s.seq_log_ratio_max_abs] {
            assert_eq!(v, 0.0);
        }
        for v in [s.ratio_min, s.ratio_max, s.seq_ratio_min, s.seq_ratio_max] {
            assert_eq!(v, 1.0);
        }
    }

    #[test]
    fn hand_computed_two_token_case() {
        // a − b = +ln 2 (learner half as likely) and −ln 2 (learner twice as likely).
        let ln2 = std::f64::consts::LN_2;
        let a = [-1.0, -2.0];
        let b = [a[0] - ln2, a[1] + ln2];
        let mut s = MismatchStats::new();
        s.add_sequence(&a, &b).unwrap();
        assert!((s.max_abs - ln2).abs() < 1e-15);
        assert!((s.mean_abs - ln2).abs() < 1e-15);
        assert!(s.k1.abs() < 1e-15);
        // r = 1/2: 1/2 − 1 + ln 2; r = 2: 2 − 1 − ln 2; mean = 1/4.
        assert!((s.k3 - 0.25).abs() < 1e-15, "{}", s.k3);
        assert!((s.ratio_min - 0.5).abs() < 1e-15);
        assert!((s.ratio_max - 2.0).abs() < 1e-15);
        // The two tokens cancel at sequence level.
        assert!(s.seq_log_ratio_max_abs < 1e-15);
        assert!((s.seq_ratio_min - 1.0).abs() < 1e-15);
    }

    #[test]
    fn k1_is_positive_when_the_learner_undervalues_sampled_tokens() {
        let mut s = MismatchStats::new();
        s.add_sequence(&[-1.0f64, -1.0], &[-1.1f64, -1.2]).unwrap();
        assert!((s.k1 - 0.15).abs() < 1e-12);
        assert!((s.seq_log_ratio_max_abs - 0.3).abs() < 1e-12);
        assert!((s.seq_ratio_max - (-0.3f64).exp()).abs() < 1e-12);
        assert!(s.k3 > 0.0 && s.ratio_max < 1.0);
    }

    #[test]
    fn tiny_differences_keep_their_k3() {
        let d = 1e-6;
        let mut s = MismatchStats::new();
        s.add_sequence(&[-1.0f64], &[-1.0 - d]).unwrap();
        assert!((s.k3 / (d * d / 2.0) - 1.0).abs() < 1e-6, "{}", s.k3);
    }

    #[test]
    fn bad_input_is_rejected_and_leaves_the_statistics_unchanged() {
        let mut s = MismatchStats::new();
        s.add_sequence(&[-1.0f64], &[-1.5f64]).unwrap();
        let before = s.clone();
        assert_eq!(
            s.add_sequence(&[-1.0f64, -2.0], &[-1.0f64]),
            Err(MismatchError::LengthMismatch {
                sampler: 2,
                learner: 1
            })
        );
        let e = s
            .add_sequence(&[-1.0f64, -2.0], &[-1.0f64, f64::NEG_INFINITY])
            .unwrap_err();
        assert!(matches!(e, MismatchError::NonFinite { index: 1, .. }));
        assert_eq!(s, before);
        s.add_sequence::<f64, f64>(&[], &[]).unwrap();
        assert_eq!(s, before);
    }

    #[test]
    fn csv_row_has_one_value_per_header_column() {
        let mut s = MismatchStats::new();
        s.add_sequence(&[-1.0f32, -0.25], &[-1.0f32, -0.5]).unwrap();
        let header = MismatchStats::to_csv_header();
        let row = s.to_csv_row();
        assert_eq!(header.split(',').count(), row.split(',').count());
        assert!(header.starts_with("tokens,sequences,max_abs"));
        assert!(row.starts_with("2,1,0.25,0.125,"), "{row}");
        for v in row.split(',') {
            v.parse::<f64>().unwrap();
        }
        let line = s.to_string();
        assert!(!line.contains('\n') && line.contains("tokens=2"), "{line}");
    }

    #[test]
    fn report_json_has_the_fields_of_the_mismatch_report_route() {
        let mut s = MismatchStats::new();
        s.add_sequence(&[-1.0f64, -2.0], &[-1.5f64, -2.0]).unwrap();
        let v = s.to_report_json(DType::Float16, "independent");
        assert_eq!(v["dtype"], "float16");
        assert_eq!(v["learner"], "independent");
        assert_eq!(v["max_abs"], 0.5);
        assert_eq!(v["mean_abs"], 0.25);
        assert_eq!(v["k1"], 0.25);
        for k in ["k3", "ratio_min", "ratio_max"] {
            assert!(v[k].as_f64().unwrap().is_finite(), "{k}");
        }
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "dtype",
                "k1",
                "k3",
                "learner",
                "max_abs",
                "mean_abs",
                "ratio_max",
                "ratio_min"
            ]
        );
        // A ratio that overflows is left out rather than sent as a non-number.
        let mut huge = MismatchStats::new();
        huge.add_sequence(&[-1000.0f64], &[0.0f64]).unwrap();
        let v = huge.to_report_json(DType::Bfloat16, "parity");
        assert!(v["ratio_max"].is_null());
        assert_eq!(v["max_abs"], 1000.0);
    }
}
