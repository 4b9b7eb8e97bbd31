//! Training-step benchmark: seconds per policy-gradient step and tokens/s through forward +
//! backward, on the default model when fetched (else the tiny model), for the `rl` command's
//! default trainable set (last 4 layers + final norm) and for the whole model.
//!
//! `cargo bench -p halfstep-trainer --bench train`

use half::f16;
use halfstep_model::backward::GradOptions;
use halfstep_model::testmodel::TinyModelSpec;
use halfstep_model::{Checkpoint, Kernels, Model};
use halfstep_trainer::trainer::{Rollout, Trainer, TrainerConfig};
use std::path::PathBuf;
use std::time::Instant;

fn model() -> (String, Model<f16>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let gguf = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (name, path) = if gguf.is_file() {
        ("SmolLM2-135M (f16)".to_string(), gguf)
    } else {
        let dir = std::env::temp_dir().join(format!("halfstep-bench-tiny-{}", std::process::id()));
        TinyModelSpec::default().write(&dir).unwrap();
        (
            "tiny test model (f16; run scripts/fetch-default-model.sh for the real one)"
                .to_string(),
            dir,
        )
    };
    let ck = Checkpoint::open(&path).unwrap();
    (
        name,
        Model::load(ck.config, &*ck.tensors, Kernels::global()).unwrap(),
    )
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let (name, m) = model();
    let vocab = m.config().vocab_size as u64;
    let (batch, prompt, completion) = (8usize, 40usize, 24usize);
    println!(
        "model: {name}; {} threads",
        halfstep_model::kernels::default_threads()
    );
    println!("batch: {batch} sequences of {prompt} prompt + {completion} completion tokens");
    println!(
        "{:<22} {:>8} {:>15} {:>13}",
        "trainable", "s/step", "fwd+bwd tok/s", "score tok/s"
    );
    let mut seed = 1u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) % (vocab - 10)) as u32 + 10
    };
    let seqs: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..prompt + completion).map(|_| next()).collect())
        .collect();
    let layers = m.config().num_hidden_layers;
    for (label, grad) in [
        (
            "last 4 layers + norm",
            GradOptions {
                first_trainable_layer: layers.saturating_sub(4),
                train_embeddings: false,
                train_final_norm: true,
                train_lm_head: false,
            },
        ),
        ("whole model", GradOptions::default()),
    ] {
        let cfg = TrainerConfig {
            grad,
            ..TrainerConfig::default()
        };
        let mut t = Trainer::new(m.clone(), cfg).unwrap();
        let rollouts: Vec<Rollout> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| Rollout {
                tokens: s.clone(),
                prompt_len: prompt,
                sampler_logprobs: t.logprobs(s, prompt).unwrap(),
                advantage: if i % 2 == 0 { 1.0 } else { -1.0 },
            })
            .collect();
        let t0 = Instant::now();
        for s in &seqs {
            t.logprobs(s, prompt).unwrap();
        }
        let score_tps = (batch * (prompt + completion)) as f64 / t0.elapsed().as_secs_f64();
        let (mut secs, mut fb, mut toks) = (0.0, 0.0, 0usize);
        let reps = 2;
        for _ in 0..reps {
            let r = t.step(&rollouts).unwrap();
            secs += r.seconds;
            fb += r.fwd_bwd_seconds;
            toks += r.tokens_processed;
        }
        println!(
            "{:<22} {:>8.2} {:>15.1} {:>13.1}",
            label,
            secs / reps as f64,
            toks as f64 / fb,
            score_tps
        );
    }
}
