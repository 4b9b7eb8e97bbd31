//! A seeded tiny model for tests: config.json, safetensors weights, a byte-level tokenizer and a
//! chat template, written as a Hugging Face model directory. No Python or downloads needed.

use crate::config::{Architecture, ModelConfig};
use crate::dtype::DType;
use crate::weights::expected_tensors;
use serde_json::json;
use std::path::Path;

/// Special tokens of the tiny tokenizer, ids 0..3; bytes follow at ids 3..259.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The shape and seed of a tiny model. Sizes are deliberately not multiples of the SIMD width.
#[derive(Debug, Clone)]
pub struct TinyModelSpec {
    /// RNG seed of the weights.
    pub seed: u64,
    /// Family (Qwen2 adds q/k/v biases).
    pub architecture: Architecture,
    /// Dtype written to the safetensors file.
    pub file_dtype: DType,
    /// Decoder layers.
    pub layers: usize,
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Query heads.
    pub heads: usize,
    /// K/V heads.
    pub kv_heads: usize,
    /// Context length.
    pub max_positions: usize,
}

impl Default for TinyModelSpec {
    fn default() -> Self {
        TinyModelSpec {
            seed: 0x5eed,
            architecture: Architecture::Llama,
            file_dtype: DType::Float32,
            layers: 2,
            hidden: 72,
            intermediate: 136,
            heads: 4,
            kv_heads: 2,
            max_positions: 1024,
        }
    }
}

/// Deterministic normal samples (SplitMix64 + Box–Muller); the test weights' only randomness.
pub struct SeededNormal(u64);

impl SeededNormal {
    /// A generator with `seed`.
    pub fn new(seed: u64) -> Self {
        SeededNormal(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

impl TinyModelSpec {
    /// The model configuration.
    pub fn config(&self) -> ModelConfig {
        ModelConfig {
            architecture: self.architecture,
            vocab_size: 256 + SPECIAL_TOKENS.len(),
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            head_dim: self.hidden / self.heads,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: self.max_positions,
            tie_word_embeddings: false,
            attention_bias: self.architecture == Architecture::Qwen2,
            torch_dtype: Some(self.file_dtype),
            bos_token_id: None,
            eos_token_ids: vec![2],
        }
    }

    /// Every tensor (HF name, shape, f32 values) in canonical order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut rng = SeededNormal::new(self.seed);
        expected_tensors(&self.config())
            .into_iter()
            .map(|t| {
                let n: usize = t.shape.iter().product();
                let fan_in = *t.shape.last().unwrap_or(&1) as f64;
                let values = if t.name.ends_with("norm.weight") {
                    (0..n).map(|_| (1.0 + 0.1 * rng.normal()) as f32).collect()
                } else if t.name.ends_with(".bias") {
                    (0..n).map(|_| (0.1 * rng.normal()) as f32).collect()
                } else if t.name == "model.embed_tokens.weight" {
                    (0..n).map(|_| rng.normal() as f32).collect()
                } else {
                    // Scaled so activations stay O(1) and logits spread out.
                    let std = 1.5 / fan_in.sqrt();
                    (0..n).map(|_| (std * rng.normal()) as f32).collect()
                };
                (t.name, t.shape, values)
            })
            .collect()
    }

    /// Writes the model directory (config, weights, tokenizer, template) to `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let cfg = self.config();
        let arch = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Mistral => ("MistralForCausalLM", "mistral"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        let config = json!({
            "architectures": [arch.0], "model_type": arch.1,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": false, "torch_dtype": self.file_dtype.name(),
            "eos_token_id": 2, "hidden_act": "silu"
        });
        write_json(&dir.join("config.json"), &config)?;
        write_json(
            &dir.join("generation_config.json"),
            &json!({"eos_token_id": 2}),
        )?;
        write_json(&dir.join("tokenizer.json"), &byte_level_tokenizer_json())?;
        write_json(
            &dir.join("tokenizer_config.json"),
            &json!({
                "eos_token": "<|im_end|>", "bos_token": null, "add_bos_token": false,
                "chat_template": CHATML_TEMPLATE
            }),
        )?;
        let tensors = self.tensors();
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .into_iter()
            .map(|(n, s, v)| (n, s, encode(self.file_dtype, &v)))
            .collect();
        write_safetensors(&dir.join("model.safetensors"), self.file_dtype, &bytes)
    }
}

/// A ChatML template like SmolLM2's, without the default system prompt.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn write_json(path: &Path, v: &serde_json::Value) -> std::io::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(v)?)
}

/// Little-endian bytes of `values` in `dtype`.
pub fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    match dtype {
        DType::Float32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::Float16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        DType::Bfloat16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// Writes named tensors (already encoded in `dtype`) as one safetensors file.
pub fn write_safetensors(
    path: &Path,
    dtype: DType,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> std::io::Result<()> {
    let st = match dtype {
        DType::Float32 => safetensors::Dtype::F32,
        DType::Float16 => safetensors::Dtype::F16,
        DType::Bfloat16 => safetensors::Dtype::BF16,
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(st, s.clone(), b)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok((n.clone(), view))
        })
        .collect::<std::io::Result<_>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// GPT-2's byte → printable character table used by byte-level BPE.
pub fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in printable.into_iter().zip(chars) {
        table[b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

/// A `tokenizer.json` whose tokens are the three specials and the 256 bytes (no merges).
pub fn byte_level_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for (b, c) in bytes_to_unicode().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(b + SPECIAL_TOKENS.len()));
    }
    let added: Vec<_> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}
