//! The trainer on the tiny model: dynamic loss scaling (overflow skips the step, halves the
//! scale, leaves the weights alone; clean steps grow it), a policy-gradient step raises the
//! log-probability of a positively rewarded completion, and checkpoints resume exactly.

use half::f16;
use halfstep_model::testmodel::TinyModelSpec;
use halfstep_model::{Checkpoint, Kernels, Model};
use halfstep_trainer::optim::{LossScaler, LrSchedule};
use halfstep_trainer::trainer::{Rollout, Trainer, TrainerConfig};

#[path = "../../tests/common/scratch.rs"]
mod scratch;
use scratch::scratch;

fn tiny() -> Model<f16> {
    let dir = scratch("tiny");
    if !dir.join("model.safetensors").exists() {
        let tmp = dir
            .with_extension(format!("{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        TinyModelSpec::default().write(&tmp).unwrap();
        let _ = std::fs::rename(&tmp, &dir);
    }
    let ck = Checkpoint::open(&dir).unwrap();
    Model::load(ck.config, &*ck.tensors, Kernels::global()).unwrap()
}

/// A rollout whose sampler logprobs are the trainer's own (on-policy, no mismatch).
fn rollout(t: &Trainer<f16>, tokens: &[u32], prompt_len: usize, advantage: f32) -> Rollout {
    Rollout {
        tokens: tokens.to_vec(),
        prompt_len,
        sampler_logprobs: t.logprobs(tokens, prompt_len).unwrap(),
        advantage,
    }
}

fn masters(t: &Trainer<f16>) -> Vec<Vec<f32>> {
    t.trainable_names()
        .iter()
        .map(|n| t.master(n).unwrap().to_vec())
        .collect()
}

const SEQ: [u32; 10] = [3, 72, 101, 108, 108, 111, 32, 119, 111, 114];

#[test]
fn an_overflowing_step_is_skipped_halves_the_scale_and_changes_nothing() {
    let mut t = Trainer::new(tiny(), TrainerConfig::default()).unwrap();
    assert_eq!(t.scaler().scale, 65536.0);
    let before = masters(&t);
    let model_before = t.logprobs(&SEQ, 4).unwrap();
    // An advantage this large makes scaled gradients exceed f16's 65504.
    let r = rollout(&t, &SEQ, 4, 1e6);
    let rep = t.step(&[r]).unwrap();
    assert!(rep.skipped, "{rep:?}");
    assert_eq!(rep.loss_scale, 65536.0);
    assert_eq!(t.scaler().scale, 32768.0);
    assert_eq!(t.scaler().skipped, 1);
    assert_eq!(masters(&t), before, "master weights unchanged");
    assert_eq!(
        t.logprobs(&SEQ, 4).unwrap(),
        model_before,
        "run-dtype model unchanged"
    );
    // A normal step afterwards goes through at the halved scale.
    let r = rollout(&t, &SEQ, 4, 1.0);
    let rep = t.step(&[r]).unwrap();
    assert!(!rep.skipped);
    assert_eq!(rep.loss_scale, 32768.0);
    assert_ne!(masters(&t), before);
}

#[test]
fn the_scale_doubles_after_a_run_of_clean_steps() {
    let cfg = TrainerConfig {
        scaler: LossScaler::new(1024.0, 3),
        ..TrainerConfig::default()
    };
    let mut t = Trainer::new(tiny(), cfg).unwrap();
    for i in 0..3 {
        assert_eq!(t.scaler().scale, 1024.0, "step {i}");
        let r = rollout(&t, &SEQ, 4, 0.5);
        assert!(!t.step(&[r]).unwrap().skipped);
    }
    assert_eq!(t.scaler().scale, 2048.0);
    assert_eq!(t.scaler().good_steps, 0);
}

#[test]
fn a_rewarded_completion_becomes_more_likely_and_a_penalised_one_less() {
    let cfg = TrainerConfig {
        schedule: LrSchedule::constant(1e-3),
        ..TrainerConfig::default()
    };
    let mut t = Trainer::new(tiny(), cfg).unwrap();
    let good = [3u32, 65, 66, 67, 68, 69];
    let bad = [3u32, 65, 66, 90, 91, 92];
    let sum = |t: &Trainer<f16>, s: &[u32]| t.logprobs(s, 3).unwrap().iter().sum::<f32>();
    let (g0, b0) = (sum(&t, &good), sum(&t, &bad));
    for _ in 0..3 {
        let batch = [rollout(&t, &good, 3, 1.0), rollout(&t, &bad, 3, -1.0)];
        let rep = t.step(&batch).unwrap();
        assert!(!rep.skipped);
        assert_eq!(rep.mismatch.max_abs, 0.0);
    }
    let (g1, b1) = (sum(&t, &good), sum(&t, &bad));
    assert!(g1 > g0 + 0.1, "good {g0} -> {g1}");
    assert!(b1 < b0 - 0.1, "bad {b0} -> {b1}");
}

#[test]
fn a_resumed_checkpoint_continues_exactly() {
    let cfg = TrainerConfig {
        schedule: LrSchedule::constant(1e-3),
        ..TrainerConfig::default()
    };
    let mut a = Trainer::new(tiny(), cfg).unwrap();
    let r = rollout(&a, &SEQ, 4, 1.0);
    a.step(&[r]).unwrap();
    let dir = scratch("ckpt");
    a.save_checkpoint(&dir).unwrap();
    let mut b = Trainer::load_checkpoint(tiny(), &dir).unwrap();
    assert_eq!(masters(&a), masters(&b));
    assert_eq!(b.steps_taken(), 1);
    let ra = rollout(&a, &SEQ, 4, -0.5);
    let rb = rollout(&b, &SEQ, 4, -0.5);
    assert_eq!(ra.sampler_logprobs, rb.sampler_logprobs);
    a.step(&[ra]).unwrap();
    b.step(&[rb]).unwrap();
    assert_eq!(
        masters(&a),
        masters(&b),
        "AdamW moments and step count were restored"
    );
    assert_eq!(
        a.weights_safetensors(false).unwrap(),
        b.weights_safetensors(false).unwrap()
    );
}
