//! Opens a checkpoint (GGUF file or Hugging Face directory) and starts an engine on it in the
//! requested run dtype.

use crate::engine::{start_engine, EngineConfig, EngineHandle};
use anyhow::Context;
use half::{bf16, f16};
use halfstep_model::{Checkpoint, DType, Elem, KernelMode, Kernels, Model, ModelConfig, Tokenizer};
use std::path::Path;
use std::sync::Arc;

/// What was loaded, for `/v1/models` and logs.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The model's configuration.
    pub config: ModelConfig,
    /// Run dtype.
    pub dtype: DType,
    /// Bytes of weights in the run dtype.
    pub weight_bytes: usize,
}

/// The tokenizer of a checkpoint: from GGUF metadata or `tokenizer.json` beside the weights.
pub fn load_tokenizer(path: &Path, ck: &Checkpoint) -> anyhow::Result<Tokenizer> {
    if let Some(g) = &ck.gguf {
        return Tokenizer::from_gguf(g).context("building the tokenizer from GGUF metadata");
    }
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    Tokenizer::from_hf_dir(dir)
        .with_context(|| format!("loading the tokenizer of {}", dir.display()))
}

/// Loads `path` in `dtype` and starts the engine; `progress(done, total)` follows the tensors.
pub fn start(
    path: &Path,
    dtype: DType,
    kernels: KernelMode,
    cfg: EngineConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<(EngineHandle, LoadedModel)> {
    let ck = Checkpoint::open(path).with_context(|| format!("opening {}", path.display()))?;
    let tokenizer = Arc::new(load_tokenizer(path, &ck)?);
    let config = ck.config.clone();
    let loaded = LoadedModel {
        weight_bytes: config.num_parameters() * dtype.size_of(),
        config,
        dtype,
    };
    fn go<T: Elem>(
        ck: Checkpoint,
        tok: Arc<Tokenizer>,
        kern: Kernels,
        cfg: EngineConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<EngineHandle> {
        let m = Model::<T>::load_with_progress(ck.config, &*ck.tensors, kern, progress)?;
        Ok(start_engine(m, tok, cfg))
    }
    let kern = Kernels::global().with_mode(kernels);
    let handle = match dtype {
        DType::Float16 => go::<f16>(ck, tokenizer, kern, cfg, progress)?,
        DType::Bfloat16 => go::<bf16>(ck, tokenizer, kern, cfg, progress)?,
        DType::Float32 => go::<f32>(ck, tokenizer, kern, cfg, progress)?,
    };
    Ok((handle, loaded))
}

/// Where the default model lives, relative to the working directory or the executable's repo.
pub fn default_model_path() -> Option<std::path::PathBuf> {
    const NAME: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    let mut candidates = vec![std::path::PathBuf::from(NAME)];
    if let Ok(exe) = std::env::current_exe() {
        // target/release/halfstep → repository root.
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join(NAME));
        }
    }
    candidates.into_iter().find(|p| p.is_file())
}
