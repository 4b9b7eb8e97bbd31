//! halfstep-server: the inference server (engine, HTTP API, metrics, weight hot-swap).

pub mod engine;
