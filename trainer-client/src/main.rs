//! The `halfstep-train` binary. The trainer (issue 7) is not built yet; until it is, the binary
//! says so and fails instead of pretending to run.

fn main() {
    eprintln!(
        "halfstep-train: the trainer (typed client, FP16 policy-gradient steps, RL loop) is not \
         implemented yet; the server side (halfstep serve, trainer hooks) is ready for it"
    );
    std::process::exit(2);
}
