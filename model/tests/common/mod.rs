//! Helpers shared by the model crate's integration tests.
#![allow(dead_code)]

use halfstep_model::testmodel::TinyModelSpec;
use halfstep_model::{Checkpoint, Elem, Kernels, Model, SimdLevel};
use std::path::PathBuf;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The default model's GGUF, if `scripts/fetch-default-model.sh` has fetched it.
///
/// In CI (`CI` set) its absence is a failure: `.ci/run` fetches it first.
pub fn default_model() -> Option<PathBuf> {
    let p = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{} is missing; run scripts/fetch-default-model.sh",
            p.display()
        );
    }
    eprintln!(
        "skipping: {} not found (run scripts/fetch-default-model.sh)",
        p.display()
    );
    None
}

/// Writes a tiny model into a fresh temporary directory and returns the directory.
pub fn tiny_model_dir(spec: &TinyModelSpec, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "halfstep-test-{}-{}-{}",
        tag,
        std::process::id(),
        spec.seed
    ));
    let _ = std::fs::remove_dir_all(&dir);
    spec.write(&dir).expect("writing the tiny model");
    dir
}

/// Loads the tiny model in run dtype `T` on the given kernels.
pub fn load_tiny<T: Elem>(spec: &TinyModelSpec, tag: &str, kernels: Kernels) -> Model<T> {
    let dir = tiny_model_dir(spec, tag);
    let ck = Checkpoint::open(&dir).expect("opening the tiny model");
    let m = Model::<T>::load(ck.config, &*ck.tensors, kernels).expect("loading the tiny model");
    let _ = std::fs::remove_dir_all(&dir);
    m
}

/// One-thread kernels at the best level.
pub fn kernels1() -> Kernels {
    Kernels::with_threads(SimdLevel::detect(), 1)
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = halfstep_model::testmodel::SeededNormal::new(seed);
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
}
