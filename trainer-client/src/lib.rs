//! halfstep-trainer: a typed client for halfstep servers, an FP16 policy-gradient trainer that
//! scores tokens with the server's own kernels, mismatch statistics and an RL loop.

pub mod client;
pub mod independent;
pub mod mismatch;
pub mod plot;
pub mod protocol;
pub mod task;
pub mod loss;
pub mod optim;
pub mod trainer;
pub mod rl;
