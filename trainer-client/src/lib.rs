//! halfstep-trainer: typed client, trainer and RL loop.
