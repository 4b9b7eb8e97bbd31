//! The verifiable-reward task of the RL loop: small additions asked through chat, rewarded only
//! when the model answers with the number and nothing else.

use serde_json::json;

/// The largest operand of a question.
pub const MAX_OPERAND: i64 = 9;

/// One question and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The user message: the question and the instruction on the answer's format.
    pub prompt: String,
    /// The first operand.
    pub a: i64,
    /// The second operand.
    pub b: i64,
    /// The correct answer, `a + b`.
    pub answer: i64,
}

impl Problem {
    /// The question `a + b` in the task's wording.
    pub fn new(a: i64, b: i64) -> Problem {
        Problem {
            prompt: format!("What is {a} + {b}? Answer with only the number."),
            a,
            b,
            answer: a + b,
        }
    }

    /// The chat messages to send (`messages` of `/v1/chat/completions`).
    pub fn messages(&self) -> serde_json::Value {
        json!([{ "role": "user", "content": self.prompt }])
    }
}

/// `n` problems drawn deterministically from `seed`, operands in `0..=MAX_OPERAND`.
pub fn problems(seed: u64, n: usize) -> Vec<Problem> {
    let mut rng = SplitMix64(seed);
    let span = (MAX_OPERAND + 1) as u64;
    (0..n)
        .map(|_| {
            let a = rng.below(span) as i64;
            let b = rng.below(span) as i64;
            Problem::new(a, b)
        })
        .collect()
}

/// 1.0 when `completion`, trimmed and with at most one trailing period, is exactly the answer's
/// decimal digits (a `-` first if negative); 0.0 otherwise.
///
/// Strict on purpose: the task teaches the model to answer with only the number, so "7 apples",
/// "The answer is 7", "07" or "+7" earn nothing.
pub fn reward(problem: &Problem, completion: &str) -> f64 {
    let text = completion.trim();
    let text = text.strip_suffix('.').unwrap_or(text);
    if text == problem.answer.to_string() {
        1.0
    } else {
        0.0
    }
}

/// SplitMix64: a small seeded generator, enough to make problem sets reproducible.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias for n this small is below 2^-60.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_the_same_problems_and_another_seed_others() {
        let p = problems(42, 50);
        assert_eq!(p, problems(42, 50));
        assert_ne!(p, problems(43, 50));
        assert_eq!(problems(42, 10), p[..10]);
        assert!(problems(1, 0).is_empty());
    }

    #[test]
    fn problems_are_small_additions_with_correct_answers() {
        let p = problems(7, 500);
        for q in &p {
            assert!((0..=MAX_OPERAND).contains(&q.a) && (0..=MAX_OPERAND).contains(&q.b));
            assert_eq!(q.answer, q.a + q.b);
            assert_eq!(
                q.prompt,
                format!("What is {} + {}? Answer with only the number.", q.a, q.b)
            );
        }
        // Every operand value shows up, so the set is not degenerate.
        for v in 0..=MAX_OPERAND {
            assert!(
                p.iter().any(|q| q.a == v) && p.iter().any(|q| q.b == v),
                "{v}"
            );
        }
    }

    #[test]
    fn messages_are_one_user_turn_with_the_prompt() {
        let q = Problem::new(3, 4);
        assert_eq!(
            q.messages(),
            json!([{"role": "user", "content": "What is 3 + 4? Answer with only the number."}])
        );
    }

    #[test]
    fn reward_accepts_only_the_bare_number() {
        let q = Problem::new(3, 4);
        for ok in ["7", " 7", "7\n", "7.", "  7.  ", "\n7.\n"] {
            assert_eq!(reward(&q, ok), 1.0, "{ok:?}");
        }
        for bad in [
            "",
            "8",
            "07",
            "+7",
            "7..",
            "7.0",
            "7 apples",
            "The answer is 7",
            "3 + 4 = 7",
            "7!",
            "seven",
            "7\n7",
            "7 .",
            "77",
        ] {
            assert_eq!(reward(&q, bad), 0.0, "{bad:?}");
        }
    }

    #[test]
    fn reward_handles_two_digit_and_zero_answers() {
        assert_eq!(reward(&Problem::new(9, 9), "18"), 1.0);
        assert_eq!(reward(&Problem::new(9, 9), "1 8"), 0.0);
        assert_eq!(reward(&Problem::new(0, 0), "0"), 1.0);
        assert_eq!(reward(&Problem::new(0, 0), "-0"), 0.0);
        let neg = Problem {
            answer: -3,
            ..Problem::new(0, 0)
        };
        assert_eq!(reward(&neg, "-3"), 1.0);
        assert_eq!(reward(&neg, "3"), 0.0);
    }
}
