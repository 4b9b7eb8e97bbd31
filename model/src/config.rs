//! Model configuration from Hugging Face `config.json` or GGUF metadata.

use crate::dtype::DType;
use serde_json::Value;
use std::path::Path;

/// Errors reading a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The JSON is malformed.
    #[error("invalid config.json: {0}")]
    Json(#[from] serde_json::Error),
    /// An architecture this crate does not implement.
    #[error("unsupported model architecture '{0}' (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    /// A required field is missing or has the wrong type.
    #[error("config is missing '{0}' (or it has the wrong type)")]
    Missing(&'static str),
    /// A field has a value the model cannot run with.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Model families with the same decoder-only layout (RMSNorm, RoPE, GQA, SiLU-gated MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3, SmolLM, TinyLlama…
    Llama,
    /// Mistral (Llama layout).
    Mistral,
    /// Qwen2 / Qwen2.5 (q/k/v projections carry biases).
    Qwen2,
}

impl Architecture {
    /// Parses an HF `model_type`/`architectures` entry or a GGUF `general.architecture`.
    pub fn parse(s: &str) -> Result<Architecture, ConfigError> {
        let l = s.to_ascii_lowercase();
        let base = l.trim_end_matches("forcausallm");
        match base {
            "llama" => Ok(Architecture::Llama),
            "mistral" => Ok(Architecture::Mistral),
            "qwen2" => Ok(Architecture::Qwen2),
            _ => Err(ConfigError::UnsupportedArchitecture(s.to_string())),
        }
    }
}

/// Llama 3 style frequency scaling of RoPE (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RopeScaling {
    /// Overall scale factor.
    pub factor: f64,
    /// Wavelength factor below which frequencies are kept.
    pub high_freq_factor: f64,
    /// Wavelength factor above which frequencies are divided by `factor`.
    pub low_freq_factor: f64,
    /// Context length the model was trained with before scaling.
    pub original_max_position_embeddings: f64,
}

impl RopeScaling {
    /// Applies the llama3 rule to one inverse frequency.
    pub fn scale_inv_freq(&self, inv_freq: f64) -> f64 {
        let low_wavelen = self.original_max_position_embeddings / self.low_freq_factor;
        let high_wavelen = self.original_max_position_embeddings / self.high_freq_factor;
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        if wavelen < high_wavelen {
            inv_freq
        } else if wavelen > low_wavelen {
            inv_freq / self.factor
        } else {
            let smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * inv_freq / self.factor + smooth * inv_freq
        }
    }
}

/// The facts about a model that the forward needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// Family.
    pub architecture: Architecture,
    /// Vocabulary rows of the embedding.
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases (Qwen2).
    pub attention_bias: bool,
    /// The checkpoint's own dtype, if it says.
    pub torch_dtype: Option<DType>,
    /// BOS token id, if known.
    pub bos_token_id: Option<u32>,
    /// EOS token ids (several for some chat models).
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Reads `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<ModelConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Parses the text of an HF `config.json`.
    pub fn from_json_str(text: &str) -> Result<ModelConfig, ConfigError> {
        let v: Value = serde_json::from_str(text)?;
        Self::from_json(&v)
    }

    /// Builds the config from a parsed HF `config.json`.
    pub fn from_json(v: &Value) -> Result<ModelConfig, ConfigError> {
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| v.get("model_type").and_then(Value::as_str))
            .ok_or(ConfigError::Missing("architectures or model_type"))?;
        let architecture = Architecture::parse(arch_name)?;
        let usize_of = |key: &'static str| -> Result<usize, ConfigError> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or(ConfigError::Missing(key))
        };
        let hidden_size = usize_of("hidden_size")?;
        let num_attention_heads = usize_of("num_attention_heads")?;
        let num_key_value_heads = usize_of("num_key_value_heads").unwrap_or(num_attention_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(Value::as_u64)
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        // transformers ≥ 4.56 moved rope settings into `rope_parameters`.
        let rope = v.get("rope_parameters").or_else(|| v.get("rope_scaling"));
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                v.get("rope_parameters")
                    .and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        let rope_scaling = parse_rope_scaling(rope)?;
        let dtype = v
            .get("dtype")
            .or_else(|| v.get("torch_dtype"))
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<DType>().ok());
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: usize_of("vocab_size")?,
            hidden_size,
            intermediate_size: usize_of("intermediate_size")?,
            num_hidden_layers: usize_of("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: usize_of("max_position_embeddings").unwrap_or(2048),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(architecture == Architecture::Qwen2),
            torch_dtype: dtype,
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_ids,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks the invariants the forward relies on.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim ({}) must be even and positive",
                self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "rms_norm_eps ({}) must be non-negative",
                self.rms_norm_eps
            ));
        }
        if self.max_position_embeddings == 0 || self.max_position_embeddings > 1 << 20 {
            return bad(format!(
                "max_position_embeddings ({}) out of range",
                self.max_position_embeddings
            ));
        }
        Ok(())
    }

    /// Width of the query projection output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of one token's K (or V) across all K/V heads.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Parameters of the model (embedding, layers, norm, LM head if untied).
    pub fn num_parameters(&self) -> usize {
        crate::weights::expected_tensors(self)
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }
}

fn parse_rope_scaling(rope: Option<&Value>) -> Result<Option<RopeScaling>, ConfigError> {
    let Some(r) = rope.filter(|r| r.is_object()) else {
        return Ok(None);
    };
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let f = |k: &'static str| {
                r.get(k)
                    .and_then(Value::as_f64)
                    .ok_or(ConfigError::Missing(k))
            };
            Ok(Some(RopeScaling {
                factor: f("factor")?,
                high_freq_factor: f("high_freq_factor")?,
                low_freq_factor: f("low_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")?,
            }))
        }
        other => Err(ConfigError::Invalid(format!(
            "unsupported rope scaling type '{other}' (supported: default, llama3)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = r#"{"architectures":["LlamaForCausalLM"],"bos_token_id":1,
      "eos_token_id":2,"hidden_act":"silu","hidden_size":576,"intermediate_size":1536,
      "max_position_embeddings":8192,"model_type":"llama","num_attention_heads":9,
      "num_hidden_layers":30,"num_key_value_heads":3,"rms_norm_eps":1e-05,
      "rope_theta":100000,"tie_word_embeddings":true,"torch_dtype":"bfloat16","vocab_size":49152}"#;

    #[test]
    fn reads_llama_config_with_gqa_and_tied_embeddings() {
        let c = ModelConfig::from_json_str(SMOLLM2).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (9, 3, 64)
        );
        assert!(c.tie_word_embeddings);
        assert_eq!(c.rope_theta, 100000.0);
        assert_eq!(c.torch_dtype, Some(DType::Bfloat16));
        assert_eq!(c.eos_token_ids, vec![2]);
        assert!(!c.attention_bias);
    }

    #[test]
    fn reads_rope_parameters_and_dtype_of_new_transformers() {
        let text = SMOLLM2
            .replace(
                r#""rope_theta":100000,"#,
                r#""rope_parameters":{"rope_theta":500000.0,"rope_type":"default"},"#,
            )
            .replace("torch_dtype", "dtype");
        let c = ModelConfig::from_json_str(&text).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.torch_dtype, Some(DType::Bfloat16));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_mistral_parses() {
        let q = SMOLLM2.replace("LlamaForCausalLM", "Qwen2ForCausalLM");
        assert!(ModelConfig::from_json_str(&q).unwrap().attention_bias);
        let m = SMOLLM2.replace("LlamaForCausalLM", "MistralForCausalLM");
        assert_eq!(
            ModelConfig::from_json_str(&m).unwrap().architecture,
            Architecture::Mistral
        );
    }

    #[test]
    fn unknown_architecture_is_named_in_the_error() {
        let t = SMOLLM2.replace("LlamaForCausalLM", "GPTNeoXForCausalLM");
        let e = ModelConfig::from_json_str(&t).unwrap_err().to_string();
        assert!(e.contains("GPTNeoXForCausalLM"), "{e}");
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
        let s = RopeScaling {
            factor: 8.0,
            high_freq_factor: 4.0,
            low_freq_factor: 1.0,
            original_max_position_embeddings: 8192.0,
        };
        assert_eq!(s.scale_inv_freq(1.0), 1.0);
        let low = 2.0 * std::f64::consts::PI / 100000.0;
        assert!((s.scale_inv_freq(low) - low / 8.0).abs() < 1e-18);
    }
}
