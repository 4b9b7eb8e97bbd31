//! Weight hot-swap: stage → validate → swap between two engine steps → bump `weight_version`
//! → flush the prefix cache. Staging converts tensors to the run dtype as they arrive and checks
//! each one (name, shape, dtype, finite values); a rejected update never reaches the engine.

pub mod staging;
pub mod upload;

pub use staging::{StagedUpdate, Staging, WeightsView};
