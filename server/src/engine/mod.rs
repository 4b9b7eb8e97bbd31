//! The inference engine: sequences, K/V blocks, scheduling, sampling, and the loop that owns
//! the model. No HTTP here; the API layer talks to it through [`EngineHandle`].

pub mod block_manager;
pub mod detokenizer;
// The loop lives in engine/engine.rs, as in the layout of style.md.
#[allow(clippy::module_inception)]
pub mod engine;
pub mod hooks;
pub mod kv_pool;
pub mod sampler;
pub mod sampling_params;
pub mod scheduler;
pub mod sequence;

pub use engine::{
    start_engine, EngineConfig, EngineError, EngineHandle, EngineInfo, EngineStats, RequestOutput,
    SampleOutput,
};
pub use hooks::{PauseMode, ScoreRequest, ScoreResult, ScoredToken, UpdateMode, UpdateReport};
pub use sampler::{LogprobsMode, TokenLogprob};
pub use sampling_params::SamplingParams;
pub use sequence::{FinishReason, GeneratedToken, StopReason};
