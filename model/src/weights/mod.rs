//! Checkpoint tensors: readers for safetensors and GGUF, the expected tensor list of a config,
//! and the one validation function used at load and at every weight update.

pub mod gguf;
pub mod quant;
pub mod safetensors;

use crate::config::ModelConfig;
use std::collections::HashMap;
use std::path::Path;

pub use self::gguf::GgufFile;

/// Reads a whole checkpoint file into memory.
///
/// Files are read, not memory-mapped: a trainer that rewrites or truncates a checkpoint while
/// the server loads it must cost that load an error, not the process a SIGBUS.
pub fn read_file(path: &Path) -> Result<Vec<u8>, WeightError> {
    use std::io::Read;
    let io = |source| WeightError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    // The length is a hint only: the file may shrink or grow while it is read.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}
pub use self::quant::GgmlType;
pub use self::safetensors::SafetensorsCheckpoint;

/// Errors reading or validating checkpoint tensors.
#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The safetensors file is malformed or truncated.
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The GGUF file is malformed or truncated.
    #[error("invalid GGUF file: {0}")]
    Gguf(String),
    /// A tensor the config requires is absent.
    #[error("missing tensor '{0}'")]
    Missing(String),
    /// A tensor the model does not have.
    #[error("unexpected tensor '{0}' (not a parameter of this model)")]
    Unexpected(String),
    /// A tensor with the wrong shape.
    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// What the config implies.
        expected: Vec<usize>,
        /// What the file holds.
        got: Vec<usize>,
    },
    /// A tensor stored in a type that cannot be converted.
    #[error("tensor '{name}' has unsupported dtype {dtype}")]
    DType {
        /// The tensor.
        name: String,
        /// The file's dtype name.
        dtype: String,
    },
    /// A tensor with NaN or infinite values (after rounding to the run dtype).
    #[error("tensor '{name}' has a non-finite value at index {index}")]
    NonFinite {
        /// The tensor.
        name: String,
        /// First offending element.
        index: usize,
    },
    /// The path is neither a GGUF file nor a directory/file with safetensors.
    #[error("no model found at {0} (expected a .gguf file, a .safetensors file or a directory with config.json and *.safetensors)")]
    NotAModel(String),
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// How a tensor is stored in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// A GGML block-quantised type (dequantised at load).
    Ggml(GgmlType),
    /// Any other dtype, by its file's name for it (rejected by validation).
    Other(&'static str),
}

impl std::fmt::Display for SourceDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceDType::F32 => f.write_str("F32"),
            SourceDType::F16 => f.write_str("F16"),
            SourceDType::Bf16 => f.write_str("BF16"),
            SourceDType::Ggml(t) => write!(f, "{t:?}"),
            SourceDType::Other(s) => f.write_str(s),
        }
    }
}

/// Name-independent facts about one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Shape in PyTorch order (`[out, in]` for Linear weights).
    pub shape: Vec<usize>,
    /// Storage type.
    pub dtype: SourceDType,
}

/// A set of named tensors that can be read as f32 (HF names).
pub trait TensorSource: Send + Sync {
    /// Every tensor with its shape and dtype, in file order.
    fn tensor_infos(&self) -> Vec<(String, TensorInfo)>;
    /// The values of one tensor, widened or dequantised to f32.
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, WeightError>;
    /// The stored little-endian bytes of an F32/F16/BF16 tensor, when the source can lend them.
    fn raw_bytes(&self, _name: &str) -> Option<(SourceDType, &[u8])> {
        None
    }
}

/// One parameter the model expects: HF name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// HF tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape in PyTorch order.
    pub shape: Vec<usize>,
}

/// The tensors a model with this config has, in a canonical order.
pub fn expected_tensors(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, i, q, kv) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
    let spec = |name: String, shape: Vec<usize>| TensorSpec { name, shape };
    let mut v = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, h],
    )];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.push(spec(format!("{p}.input_layernorm.weight"), vec![h]));
        v.push(spec(format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        v.push(spec(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        v.push(spec(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        if c.attention_bias {
            v.push(spec(format!("{p}.self_attn.q_proj.bias"), vec![q]));
            v.push(spec(format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            v.push(spec(format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        v.push(spec(format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        v.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
        ));
        v.push(spec(format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        v.push(spec(format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        v.push(spec(format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    v.push(spec("model.norm.weight".into(), vec![h]));
    if !c.tie_word_embeddings {
        v.push(spec("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    v
}

/// Whether a tensor set must hold every parameter or may hold a subset (partial update).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Every expected tensor must be present.
    Full,
    /// Any subset of the expected tensors.
    Partial,
}

/// Tensors that checkpoints carry but the model derives itself; skipped, never an error.
pub fn is_ignorable(name: &str, c: &ModelConfig) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (c.tie_word_embeddings && name == "lm_head.weight")
}

/// Checks names, shapes and dtypes of `tensors` against the model `c` describes.
///
/// The first problem found is returned, naming the tensor.
pub fn validate(
    c: &ModelConfig,
    tensors: &[(String, TensorInfo)],
    coverage: Coverage,
) -> Result<(), WeightError> {
    let expected: HashMap<String, Vec<usize>> = expected_tensors(c)
        .into_iter()
        .map(|t| (t.name, t.shape))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for (name, info) in tensors {
        if is_ignorable(name, c) {
            continue;
        }
        let Some(shape) = expected.get(name) else {
            return Err(WeightError::Unexpected(name.clone()));
        };
        if &info.shape != shape {
            return Err(WeightError::Shape {
                name: name.clone(),
                expected: shape.clone(),
                got: info.shape.clone(),
            });
        }
        if let SourceDType::Other(d) = info.dtype {
            return Err(WeightError::DType {
                name: name.clone(),
                dtype: d.to_string(),
            });
        }
        seen.insert(name.as_str());
    }
    if coverage == Coverage::Full {
        for t in expected_tensors(c) {
            if !seen.contains(t.name.as_str()) {
                return Err(WeightError::Missing(t.name));
            }
        }
    }
    Ok(())
}

/// A checkpoint on disk: its config and its tensors.
pub struct Checkpoint {
    /// The model configuration (from config.json or GGUF metadata).
    pub config: ModelConfig,
    /// The tensors, by HF name.
    pub tensors: Box<dyn TensorSource>,
    /// The GGUF file, when the checkpoint is one (it also carries the tokenizer).
    pub gguf: Option<std::sync::Arc<GgufFile>>,
}

/// Opens only the tensors at `path` (a `.gguf` file, a `.safetensors` file, or a directory of
/// safetensors), with no config needed: what a weight update reads.
pub fn open_tensors(path: &Path) -> Result<Box<dyn TensorSource>, WeightError> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let g = std::sync::Arc::new(GgufFile::open(path)?);
        return Ok(Box::new(gguf::GgufTensors(g)));
    }
    if path.is_file() {
        return Ok(Box::new(SafetensorsCheckpoint::open_files(&[
            path.to_path_buf()
        ])?));
    }
    if path.is_dir() {
        return Ok(Box::new(SafetensorsCheckpoint::open_dir(path)?));
    }
    Err(WeightError::NotAModel(path.display().to_string()))
}

impl Checkpoint {
    /// Opens a `.gguf` file, a `.safetensors` file (config.json beside it) or an HF directory.
    pub fn open(path: &Path) -> Result<Checkpoint, WeightError> {
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            let g = std::sync::Arc::new(GgufFile::open(path)?);
            let config = g.model_config()?;
            return Ok(Checkpoint {
                config,
                tensors: Box::new(gguf::GgufTensors(g.clone())),
                gguf: Some(g),
            });
        }
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            path.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(WeightError::NotAModel(path.display().to_string()));
        }
        let config = ModelConfig::from_file(&cfg_path)?;
        let tensors = if path.is_file() {
            SafetensorsCheckpoint::open_files(&[path.to_path_buf()])?
        } else {
            SafetensorsCheckpoint::open_dir(&dir)?
        };
        Ok(Checkpoint {
            config,
            tensors: Box::new(tensors),
            gguf: None,
        })
    }
}
