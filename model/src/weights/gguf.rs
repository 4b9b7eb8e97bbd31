//! GGUF files: metadata, tensor directory and tensor data (memory-mapped).
//!
//! Every length and offset read from the file is checked against the file's size before it is
//! used, so a malformed or hostile file gives an error, never a panic or a huge allocation.

use super::quant::{dequantize, GgmlType};
use super::{SourceDType, TensorInfo, TensorSource, WeightError};
use crate::config::{Architecture, ModelConfig};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string (invalid bytes replaced).
    Str(String),
    /// Array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U64(v) => Some(v),
            GgufValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    /// As a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's directory entry.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    /// GGUF name (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGML order (innermost first).
    pub dims: Vec<usize>,
    /// Storage type.
    pub ggml_type: Result<GgmlType, u32>,
    /// Absolute byte range in the file.
    pub range: std::ops::Range<usize>,
}

/// A parsed GGUF file.
pub struct GgufFile {
    bytes: Vec<u8>,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor directory in file order.
    pub tensors: Vec<GgufTensor>,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

fn err<T>(m: impl Into<String>) -> Result<T, WeightError> {
    Err(WeightError::Gguf(m.into()))
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WeightError> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                let s = &self.b[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => err(format!(
                "truncated: need {n} bytes at offset {} of {}",
                self.pos,
                self.b.len()
            )),
        }
    }
    fn u8(&mut self) -> Result<u8, WeightError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WeightError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, WeightError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes(s.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WeightError> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes(s.try_into().expect("8 bytes")))
    }
    fn len(&mut self, min_elem: usize) -> Result<usize, WeightError> {
        let n = self.u64()?;
        // Each element takes at least `min_elem` bytes, so a count the rest of the file cannot
        // hold is rejected before anything is allocated for it.
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_elem.max(1) as u64) > left {
            return err(format!(
                "declared length {n} exceeds the file at offset {}",
                self.pos
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, WeightError> {
        let n = self.len(1)?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, WeightError> {
        Ok(match ty {
            0 => GgufValue::U64(self.u8()? as u64),
            1 => GgufValue::I64(self.u8()? as i8 as i64),
            2 => GgufValue::U64(self.u16()? as u64),
            3 => GgufValue::I64(self.u16()? as i16 as i64),
            4 => GgufValue::U64(self.u32()? as u64),
            5 => GgufValue::I64(self.u32()? as i32 as i64),
            6 => GgufValue::F64(f32::from_bits(self.u32()?) as f64),
            7 => GgufValue::Bool(self.u8()? != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return err("arrays nested too deeply");
                }
                let ety = self.u32()?;
                let min = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => return err(format!("unknown metadata value type {ety}")),
                };
                let n = self.len(min)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64()?),
            11 => GgufValue::I64(self.u64()? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64()?)),
            _ => return err(format!("unknown metadata value type {ty}")),
        })
    }
}

impl GgufFile {
    /// Reads and parses a GGUF file.
    pub fn open(path: &Path) -> Result<GgufFile, WeightError> {
        Self::parse(super::read_file(path)?)
    }

    /// Parses GGUF bytes held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, WeightError> {
        Self::parse(bytes)
    }

    fn parse(bytes: Vec<u8>) -> Result<GgufFile, WeightError> {
        let (version, metadata, tensors) = {
            let mut r = Reader { b: &bytes, pos: 0 };
            if r.take(4)? != b"GGUF" {
                return err("bad magic (not a GGUF file)");
            }
            let version = r.u32()?;
            if !(2..=3).contains(&version) {
                return err(format!("unsupported GGUF version {version}"));
            }
            // A tensor entry takes at least 24 bytes, a key/value at least 13.
            let n_tensors = r.u64()?;
            let n_kv = r.u64()?;
            if n_tensors.saturating_mul(24) > bytes.len() as u64
                || n_kv.saturating_mul(13) > bytes.len() as u64
            {
                return err("declared tensor or metadata count exceeds the file");
            }
            let mut metadata = BTreeMap::new();
            for _ in 0..n_kv {
                let key = r.string()?;
                let ty = r.u32()?;
                let v = r.value(ty, 0)?;
                metadata.insert(key, v);
            }
            let mut raw = Vec::with_capacity(n_tensors as usize);
            for _ in 0..n_tensors {
                let name = r.string()?;
                let nd = r.u32()? as usize;
                if nd == 0 || nd > 4 {
                    return err(format!("tensor '{name}' has {nd} dimensions"));
                }
                let mut dims = Vec::with_capacity(nd);
                for _ in 0..nd {
                    dims.push(r.u64()?);
                }
                let ty = r.u32()?;
                let off = r.u64()?;
                raw.push((name, dims, ty, off));
            }
            let align = metadata
                .get("general.alignment")
                .and_then(GgufValue::as_u64)
                .unwrap_or(32);
            if align == 0 || align > 1 << 20 || !align.is_power_of_two() {
                return err(format!("bad alignment {align}"));
            }
            let data_start = (r.pos as u64).div_ceil(align) * align;
            let mut tensors = Vec::with_capacity(raw.len());
            for (name, dims, ty, off) in raw {
                let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
                let ggml_type = GgmlType::from_id(ty).ok_or(ty);
                let size = match (n, ggml_type) {
                    (Some(n), Ok(t)) => usize::try_from(n)
                        .ok()
                        .and_then(|n| t.bytes_for(n))
                        .ok_or_else(|| {
                            WeightError::Gguf(format!(
                                "tensor '{name}' has {n} values, not whole {t:?} blocks"
                            ))
                        })?,
                    (None, _) => return err(format!("tensor '{name}' size overflows")),
                    // Unknown types are kept so that the error can name the tensor later.
                    (Some(_), Err(_)) => 0,
                };
                let start = data_start
                    .checked_add(off)
                    .filter(|&s| s <= bytes.len() as u64);
                let end = start.and_then(|s| s.checked_add(size as u64));
                match (start, end) {
                    (Some(s), Some(e)) if e <= bytes.len() as u64 => tensors.push(GgufTensor {
                        name,
                        dims: dims.iter().map(|&d| d as usize).collect(),
                        ggml_type,
                        range: s as usize..e as usize,
                    }),
                    _ => {
                        return err(format!(
                        "tensor '{name}' data lies outside the file (offset {off}, {size} bytes)"
                    ))
                    }
                }
            }
            (version, metadata, tensors)
        };
        Ok(GgufFile {
            bytes,
            version,
            metadata,
            tensors,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(GgufValue::as_str)
    }

    /// The model configuration the metadata describes.
    pub fn model_config(&self) -> Result<ModelConfig, WeightError> {
        use crate::config::ConfigError;
        let arch_name = self
            .architecture()
            .ok_or(ConfigError::Missing("general.architecture"))?;
        let architecture = Architecture::parse(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let uint = |k: &'static str| -> Result<usize, ConfigError> {
            self.get(&key(k))
                .and_then(GgufValue::as_u64)
                .map(|v| v as usize)
                .ok_or(ConfigError::Missing(k))
        };
        let hidden_size = uint("embedding_length")?;
        let n_heads = uint("attention.head_count")?;
        let n_kv = uint("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = uint("attention.key_length")
            .or_else(|_| uint("rope.dimension_count"))
            .unwrap_or(hidden_size / n_heads.max(1));
        let embd = self.tensors.iter().find(|t| t.name == "token_embd.weight");
        let vocab_size = match uint("vocab_size") {
            Ok(v) => v,
            Err(_) => self
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(|a| a.len())
                .or_else(|| embd.and_then(|t| t.dims.get(1).copied()))
                .ok_or(ConfigError::Missing("vocab_size"))?,
        };
        let tied = !self.tensors.iter().any(|t| t.name == "output.weight");
        let bias = self.tensors.iter().any(|t| t.name.ends_with("attn_q.bias"));
        if self.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
            return Err(ConfigError::Invalid(
                "GGUF rope_freqs (llama3 rope scaling) is not supported; load the HF checkpoint"
                    .into(),
            )
            .into());
        }
        let id = |k: &str| self.get(k).and_then(GgufValue::as_u64).map(|v| v as u32);
        let cfg = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: uint("feed_forward_length")?,
            num_hidden_layers: uint("block_count")?,
            num_attention_heads: n_heads,
            num_key_value_heads: n_kv,
            head_dim,
            rms_norm_eps: self
                .get(&key("attention.layer_norm_rms_epsilon"))
                .and_then(GgufValue::as_f64)
                // Stored as f32: recover the decimal value the checkpoint was written with.
                .map(|e| format!("{}", e as f32).parse::<f64>().unwrap_or(e))
                .unwrap_or(1e-5),
            rope_theta: self
                .get(&key("rope.freq_base"))
                .and_then(GgufValue::as_f64)
                .unwrap_or(10000.0),
            rope_scaling: None,
            max_position_embeddings: uint("context_length").unwrap_or(2048),
            tie_word_embeddings: tied,
            attention_bias: bias,
            torch_dtype: None,
            bos_token_id: id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Raw bytes of a tensor's data.
    pub fn tensor_bytes(&self, t: &GgufTensor) -> &[u8] {
        &self.bytes[t.range.clone()]
    }
}

/// Maps a GGUF tensor name to the Hugging Face name.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let top = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, kind) = rest.rsplit_once('.')?;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The tensors of a GGUF file under Hugging Face names, dequantised to f32.
pub struct GgufTensors(pub Arc<GgufFile>);

impl GgufTensors {
    fn find(&self, name: &str) -> Option<&GgufTensor> {
        self.0
            .tensors
            .iter()
            .find(|t| hf_name(&t.name).as_deref().unwrap_or(&t.name) == name)
    }

    /// Heads to undo llama.cpp's Q/K row permutation with, if `name` needs it.
    fn unpermute_heads(&self, name: &str) -> Option<usize> {
        // llama.cpp's converter interleaves the rotary halves of Q and K rows for the "llama"
        // architecture (its RoPE is the interleaved kind); Qwen2 keeps the HF layout.
        if self.0.architecture() != Some("llama") {
            return None;
        }
        let cfg = self.0.model_config().ok()?;
        if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
            Some(cfg.num_attention_heads)
        } else if name.ends_with("self_attn.k_proj.weight")
            || name.ends_with("self_attn.k_proj.bias")
        {
            Some(cfg.num_key_value_heads)
        } else {
            None
        }
    }
}

/// Undoes llama.cpp's permutation of Q/K rows: within each head, rows `(2i, 2i+1)` become
/// `(i, i + head_dim/2)`.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for (j, src) in [2 * i, 2 * i + 1].into_iter().enumerate() {
                let dst = h * hd + i + j * half;
                let s = h * hd + src;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[s * cols..(s + 1) * cols]);
            }
        }
    }
    out
}

impl TensorSource for GgufTensors {
    fn tensor_infos(&self) -> Vec<(String, TensorInfo)> {
        self.0
            .tensors
            .iter()
            .map(|t| {
                let name = hf_name(&t.name).unwrap_or_else(|| t.name.clone());
                let dtype = match t.ggml_type {
                    Ok(GgmlType::F32) => SourceDType::F32,
                    Ok(GgmlType::F16) => SourceDType::F16,
                    Ok(GgmlType::BF16) => SourceDType::Bf16,
                    Ok(q) => SourceDType::Ggml(q),
                    Err(_) => SourceDType::Other("unsupported GGML type"),
                };
                let shape = t.dims.iter().rev().copied().collect();
                (name, TensorInfo { shape, dtype })
            })
            .collect()
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>, WeightError> {
        let t = self
            .find(name)
            .ok_or_else(|| WeightError::Missing(name.to_string()))?;
        let ty = t.ggml_type.map_err(|id| WeightError::DType {
            name: name.to_string(),
            dtype: format!("GGML type {id}"),
        })?;
        let v = dequantize(ty, self.0.tensor_bytes(t));
        match self.unpermute_heads(name) {
            Some(heads) => {
                let rows = if t.dims.len() == 2 {
                    t.dims[1]
                } else {
                    t.dims[0]
                };
                let cols = if t.dims.len() == 2 { t.dims[0] } else { 1 };
                if heads == 0 || rows % heads != 0 || (rows / heads) % 2 != 0 {
                    return Err(WeightError::Gguf(format!(
                        "tensor '{name}' rows ({rows}) do not split into {heads} heads"
                    )));
                }
                Ok(unpermute_rows(&v, rows, cols, heads))
            }
            None => Ok(v),
        }
    }
}
