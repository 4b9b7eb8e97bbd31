//! halfstep-trainer: typed client, trainer and RL loop (not implemented yet; the crate holds
//! its place in the workspace layout).
