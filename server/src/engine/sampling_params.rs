//! What a request asks of the sampler, validated before it reaches the engine.

/// Sampling and stopping parameters of one request (vLLM's `SamplingParams`).
///
/// Construct with [`SamplingParams::default`] and fields, then call [`SamplingParams::validate`];
/// the engine only accepts validated parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Completions to sample for the prompt.
    pub n: usize,
    /// Softmax temperature; 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass to keep (1 = all).
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` × the top probability.
    pub min_p: f32,
    /// Subtracted from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a token in the output.
    pub frequency_penalty: f32,
    /// Divides positive (multiplies negative) logits of tokens in prompt or output.
    pub repetition_penalty: f32,
    /// Per-request seed; the same seed gives the same output whatever else runs.
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Fewest tokens before EOS or a stop token may end the output.
    pub min_tokens: usize,
    /// Strings that end the output.
    pub stop: Vec<String>,
    /// Token ids that end the output.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS.
    pub ignore_eos: bool,
    /// Keep the matched stop string in the output text.
    pub include_stop_str_in_output: bool,
    /// Top log-probabilities to return per generated token (`Some(0)` = only the sampled one).
    pub logprobs: Option<usize>,
    /// Top log-probabilities to return per prompt token.
    pub prompt_logprobs: Option<usize>,
    /// Leave special tokens out of the output text.
    pub skip_special_tokens: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            n: 1,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            max_tokens: 16,
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            include_stop_str_in_output: false,
            logprobs: None,
            prompt_logprobs: None,
            skip_special_tokens: true,
        }
    }
}

/// A parameter outside its allowed range: `(parameter, message)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidParam {
    /// The offending parameter's name.
    pub param: &'static str,
    /// What is wrong.
    pub message: String,
}

fn invalid(param: &'static str, message: String) -> Result<(), InvalidParam> {
    Err(InvalidParam { param, message })
}

impl SamplingParams {
    /// Whether sampling is greedy (argmax).
    pub fn greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    /// Checks every range; `max_logprobs` is the server's cap on `logprobs`/`prompt_logprobs`.
    pub fn validate(&self, max_logprobs: usize) -> Result<(), InvalidParam> {
        if self.n == 0 || self.n > 128 {
            return invalid("n", format!("n must be between 1 and 128, got {}", self.n));
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return invalid(
                "temperature",
                format!("temperature must be non-negative, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            );
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid(
                "min_p",
                format!("min_p must be in [0, 1], got {}", self.min_p),
            );
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return invalid(name, format!("{name} must be in [-2, 2], got {v}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return invalid(
                "repetition_penalty",
                format!(
                    "repetition_penalty must be positive, got {}",
                    self.repetition_penalty
                ),
            );
        }
        if self.max_tokens == 0 {
            return invalid("max_tokens", "max_tokens must be at least 1".into());
        }
        if self.min_tokens > self.max_tokens {
            return invalid(
                "min_tokens",
                format!(
                    "min_tokens ({}) must not exceed max_tokens ({})",
                    self.min_tokens, self.max_tokens
                ),
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return invalid("stop", "stop strings must not be empty".into());
        }
        for (name, v) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if let Some(k) = v {
                if k > max_logprobs {
                    return invalid(
                        name,
                        format!("{name} must be at most {max_logprobs} (--max-logprobs), got {k}"),
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_name_their_parameter() {
        let bad = [
            (
                SamplingParams {
                    top_p: 7.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    n: 0,
                    ..Default::default()
                },
                "n",
            ),
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    min_p: 2.0,
                    ..Default::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    logprobs: Some(21),
                    ..Default::default()
                },
                "logprobs",
            ),
            (
                SamplingParams {
                    max_tokens: 0,
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    min_tokens: 20,
                    max_tokens: 5,
                    ..Default::default()
                },
                "min_tokens",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
        ];
        for (p, name) in bad {
            assert_eq!(p.validate(20).unwrap_err().param, name);
        }
        assert!(SamplingParams::default().validate(20).is_ok());
    }
}
