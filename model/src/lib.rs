//! halfstep-model: the numerics the server and the trainer share.
//!
//! Config and weight loading (safetensors, GGUF), the tokenizer, parity-safe kernels and the
//! batched transformer forward. Both sides run this code, so a token's probability is computed
//! the same way, bit for bit, when it is sampled and when it is learned from.

#![warn(missing_docs)]

pub mod backward;
pub mod config;
pub mod dtype;
pub mod forward;
pub mod kernels;
pub mod kv;
pub mod mem;
pub mod testmodel;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use dtype::{DType, Elem};
pub use forward::{ForwardError, LogitsFor, Model, Param, Span};
pub use kernels::{KernelMode, Kernels, SimdLevel};
pub use kv::{ContiguousKv, KvCache, PagedKv};
pub use tokenizer::Tokenizer;
pub use weights::{Checkpoint, WeightError};
