//! halfstep-trainer: a typed client for halfstep servers, an FP16 policy-gradient trainer that
//! scores tokens with the server's own kernels, mismatch statistics and an RL loop.

pub mod client;
pub mod independent;
pub mod loss;
pub mod mismatch;
pub mod optim;
pub mod plot;
pub mod protocol;
pub mod rl;
pub mod task;
pub mod trainer;
