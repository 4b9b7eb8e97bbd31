//! halfstep-server: the inference server (engine, HTTP API, metrics, weight hot-swap).

pub mod api;
pub mod cli;
pub mod engine;
pub mod loader;
pub mod metrics;
pub mod weights;
