//! The verifiable-reward task of the RL loop: small additions asked through chat, rewarded
//! when the model's answer ends, by itself, on the correct sum.
//!
//! The default model knows these sums (greedy decoding gets most of them right when it writes
//! "3 + 4 = 7") but samples at temperature 1 wander off or run past the token limit, so the
//! reward starts near 0.1: what RL has to teach is to answer briefly and stop.

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
            prompt: format!("What is {a} + {b}? Answer briefly."),
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

/// 1.0 when the completion ended by itself (`finished`: an end-of-sequence token or a stop,
/// not the token limit) and the last integer in it is the answer; 0.0 otherwise.
///
/// "7", "3 + 4 = 7" and "The answer is 7." earn 1; "7 or 8", "-7", "7.5" (last integer 5) and
/// a truncated "3 + 4 = 7 and then" earn nothing.
pub fn reward(problem: &Problem, completion: &str, finished: bool) -> f64 {
    if finished && last_integer(completion) == Some(problem.answer) {
        1.0
    } else {
        0.0
    }
}

/// The last run of ASCII digits in `text` as an integer, negative when a `-` precedes it.
fn last_integer(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let end = b.iter().rposition(u8::is_ascii_digit)? + 1;
    let start = b[..end]
        .iter()
        .rposition(|c| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    let v: i64 = text[start..end].parse().ok()?;
    Some(if start > 0 && b[start - 1] == b'-' {
        -v
    } else {
        v
    })
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
                format!("What is {} + {}? Answer briefly.", q.a, q.b)
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
            json!([{"role": "user", "content": "What is 3 + 4? Answer briefly."}])
        );
    }

    #[test]
    fn reward_wants_the_sum_last_and_a_finished_answer() {
        let q = Problem::new(3, 4);
        for ok in [
            "7",
            " 7.",
            "3 + 4 = 7",
            "The answer is 7.",
            "3 + 4 is 7\n",
            "07",
        ] {
            assert_eq!(reward(&q, ok, true), 1.0, "{ok:?}");
            assert_eq!(
                reward(&q, ok, false),
                0.0,
                "{ok:?} cut off by the token limit"
            );
        }
        for bad in [
            "",
            "8",
            "7 or 8",
            "-7",
            "7.5",
            "seven",
            "3 + 4 = 77",
            "3 + 4",
        ] {
            assert_eq!(reward(&q, bad, true), 0.0, "{bad:?}");
        }
    }

    #[test]
    fn reward_handles_two_digit_zero_and_negative_answers() {
        assert_eq!(reward(&Problem::new(9, 9), "9 + 9 = 18", true), 1.0);
        assert_eq!(reward(&Problem::new(9, 9), "1 8", true), 0.0);
        assert_eq!(reward(&Problem::new(0, 0), "0", true), 1.0);
        let neg = Problem {
            answer: -3,
            ..Problem::new(0, 0)
        };
        assert_eq!(reward(&neg, "1 - 4 = -3", true), 1.0);
        assert_eq!(reward(&neg, "3", true), 0.0);
    }
}
