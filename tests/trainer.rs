//! Black-box tests of the trainer against the real `halfstep` binary: the trainer's
//! log-probabilities of server-sampled tokens are bitwise the server's (f16 and bf16, n > 1,
//! batched with other traffic), and one RL step pushed over HTTP makes every replica serve
//! exactly the trainer's model.

mod common;

use common::Server;
use half::{bf16, f16};
use halfstep_model::{Checkpoint, Elem, Kernels, Model};
use halfstep_trainer::client::{Client, Replicas};
use halfstep_trainer::mismatch::MismatchStats;
use halfstep_trainer::optim::LrSchedule;
use halfstep_trainer::protocol::{CompletionRequest, UpdateMode, UpdateOptions};
use halfstep_trainer::trainer::{score, Rollout, Trainer, TrainerConfig};
use std::path::Path;

const ADMIN: &str = "trainer-admin";

fn load<T: Elem>(dir: &Path) -> Model<T> {
    let ck = Checkpoint::open(dir).unwrap();
    Model::<T>::load(ck.config, &*ck.tensors, Kernels::global()).unwrap()
}

/// Sampled completions: (prompt + completion tokens, prompt length, the server's logprobs).
async fn sample(
    c: &Client,
    prompts: &[&str],
    n: u32,
    max_tokens: u32,
    greedy: bool,
) -> Vec<(Vec<u32>, usize, Vec<f32>)> {
    let futs = prompts.iter().enumerate().map(|(i, p)| {
        let mut req = CompletionRequest::new(*p);
        req.logprobs = Some(0);
        req.sampling.n = Some(n);
        req.sampling.temperature = Some(if greedy { 0.0 } else { 1.0 });
        req.sampling.max_tokens = Some(max_tokens);
        req.sampling.ignore_eos = Some(true);
        req.sampling.return_token_ids = Some(true);
        req.sampling.seed = Some(i as i64 + 11);
        let c = c.clone();
        async move { c.completions(&req).await.unwrap() }
    });
    let mut out = Vec::new();
    for r in futures::future::join_all(futs).await {
        for ch in r.choices {
            let mut toks = ch.prompt_token_ids.unwrap();
            let from = toks.len();
            toks.extend(ch.token_ids.unwrap());
            let lps = ch
                .logprobs
                .unwrap()
                .token_logprobs
                .into_iter()
                .map(|x| x.unwrap())
                .collect();
            out.push((toks, from, lps));
        }
    }
    out
}

/// A runtime for the async client; servers start outside it (their readiness probe blocks).
fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn parity_in<T: Elem>(dtype: &str) {
    let dir = common::tiny_model();
    let s = Server::start(&dir, &["--dtype", dtype, "--max-num-seqs", "16"]);
    rt().block_on(parity_async::<T>(&dir, &s.base, dtype));
}

async fn parity_async<T: Elem>(dir: &Path, base: &str, dtype: &str) {
    let c = Client::new(base).unwrap();
    let model = load::<T>(dir);
    // Other traffic at the same time: long streaming requests batched with the sampled ones.
    let noise: Vec<_> = (0..3)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                let mut req = CompletionRequest::new(format!("background request {i} "));
                req.sampling.max_tokens = Some(48);
                req.sampling.ignore_eos = Some(true);
                req.sampling.temperature = Some(0.7);
                c.completions(&req).await.unwrap()
            })
        })
        .collect();
    let prompts = ["hello there", "a", "The quick brown fox", "1 + 1 = ", "zzz"];
    let samples = sample(&c, &prompts, 3, 24, false).await;
    for h in noise {
        h.await.unwrap();
    }
    assert_eq!(samples.len(), 15);
    let mut stats = MismatchStats::new();
    for (toks, from, lps) in &samples {
        let mine = score(&model, toks, *from).unwrap();
        assert_eq!(mine.len(), lps.len());
        for (a, b) in mine.iter().zip(lps) {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{dtype}: trainer {a} vs server {b}"
            );
        }
        stats.add_sequence(lps, &mine).unwrap();
    }
    assert_eq!(stats.tokens, 15 * 24);
    assert_eq!(stats.max_abs, 0.0, "{dtype}: {stats}");
    assert_eq!((stats.ratio_min, stats.ratio_max), (1.0, 1.0));
}

#[test]
fn trainer_logprobs_of_sampled_tokens_are_bitwise_the_servers_in_f16() {
    parity_in::<f16>("float16");
}

#[test]
fn trainer_logprobs_of_sampled_tokens_are_bitwise_the_servers_in_bf16() {
    parity_in::<bf16>("bfloat16");
}

#[test]
fn one_rl_step_pushed_to_two_replicas_makes_them_serve_the_trainers_model() {
    let dir = common::tiny_model();
    let (a, b) = (
        Server::start(&dir, &["--admin-key", ADMIN]),
        Server::start(&dir, &["--admin-key", ADMIN]),
    );
    rt().block_on(rl_step(&dir, &a.base, &b.base));
}

async fn rl_step(dir: &Path, a: &str, b: &str) {
    let reps = Replicas::new([a, b]).unwrap().with_admin_key(ADMIN);
    let c = reps.pick(0).clone();
    let prompts = ["learn this", "and that"];
    let before = sample(&c, &prompts, 1, 12, true).await;
    // Rollouts from the server with advantages of both signs.
    let rollouts: Vec<Rollout> = sample(&c, &prompts, 4, 12, false)
        .await
        .into_iter()
        .enumerate()
        .map(|(i, (tokens, prompt_len, lps))| Rollout {
            tokens,
            prompt_len,
            sampler_logprobs: lps,
            advantage: if i % 2 == 0 { 1.0 } else { -1.0 },
        })
        .collect();
    let cfg = TrainerConfig {
        schedule: LrSchedule::constant(1e-2),
        ..TrainerConfig::default()
    };
    let mut t = Trainer::new(load::<f16>(dir), cfg).unwrap();
    let report = tokio::task::block_in_place(|| t.step(&rollouts)).unwrap();
    assert!(!report.skipped, "{report:?}");
    assert_eq!(report.mismatch.max_abs, 0.0, "sampled by the same weights");
    let bytes = t.weights_safetensors(true).unwrap();
    let up = reps
        .update_weights(
            bytes,
            &UpdateOptions {
                weight_version: Some(1),
                mode: Some(UpdateMode::Wait),
            },
        )
        .await;
    assert!(
        up.all_ok(),
        "{:?}",
        up.failures()
            .map(|(u, e)| format!("{u}: {e}"))
            .collect::<Vec<_>>()
    );
    let versions = reps.versions().await;
    assert_eq!(
        versions.consistent(),
        Some(1),
        "both replicas hold version 1 with one checksum"
    );
    // Both replicas now answer with the trainer's model: greedy tokens and their logprobs.
    for r in reps.clients() {
        let after = sample(r, &prompts, 1, 12, true).await;
        assert_ne!(after, before, "the step changed the outputs");
        for (toks, from, lps) in &after {
            let mine = t.logprobs(toks, *from).unwrap();
            assert_eq!(&mine, lps);
            // Greedy: each sampled token is the trainer model's argmax.
            let m = t.model();
            let vocab = m.config().vocab_size;
            let mut kv = halfstep_model::ContiguousKv::<f16>::new(
                m.config().num_hidden_layers,
                m.config().kv_dim(),
            );
            let logits = m
                .forward(
                    &[halfstep_model::Span {
                        seq: 0,
                        start_pos: 0,
                        tokens: &toks[..toks.len() - 1],
                        logits: halfstep_model::LogitsFor::All,
                    }],
                    &mut kv,
                )
                .unwrap();
            for pos in *from..toks.len() {
                let row = &logits[(pos - 1) * vocab..pos * vocab];
                let best = row
                    .iter()
                    .enumerate()
                    .fold(0, |bi, (i, &x)| if x > row[bi] { i } else { bi });
                assert_eq!(best as u32, toks[pos]);
            }
        }
    }
}

#[test]
fn the_rl_loop_samples_steps_pushes_logs_and_reports_mismatch() {
    let dir = common::tiny_model();
    let s = Server::start(&dir, &["--admin-key", ADMIN]);
    let out = common::scratch("rl-loop");
    let _ = std::fs::remove_dir_all(&out);
    let cfg = halfstep_trainer::rl::RlConfig {
        steps: 2,
        prompts_per_step: 2,
        group_size: 4,
        max_tokens: 6,
        temperature: 1.0,
        seed: 5,
        out_dir: out.clone(),
        report_mismatch: true,
        checkpoint_every: 1,
        progress: false,
    };
    let reps = Replicas::new([s.base.clone()])
        .unwrap()
        .with_admin_key(ADMIN);
    let mut t = Trainer::new(load::<f16>(&dir), TrainerConfig::default()).unwrap();
    let logs = rt().block_on(async {
        halfstep_trainer::rl::run(&reps, &mut t, &cfg)
            .await
            .unwrap()
    });
    assert_eq!(logs.len(), 2);
    for l in &logs {
        assert_eq!(l.report.mismatch.sequences, 8);
        assert_eq!(
            l.report.mismatch.max_abs, 0.0,
            "the server runs the trainer's weights"
        );
    }
    let applied = logs.iter().filter(|l| !l.report.skipped).count() as u64;
    let info = rt().block_on(reps.pick(0).weight_info()).unwrap();
    assert_eq!(info.weight_version, applied);
    assert_eq!(logs.last().unwrap().weight_version, applied);
    let csv = std::fs::read_to_string(out.join("rl.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3);
    let cols = lines[0].split(',').count();
    assert!(lines.iter().all(|l| l.split(',').count() == cols), "{csv}");
    assert!(out.join("checkpoint/trainer.safetensors").is_file());
    assert!(out.join("checkpoint/trainer_state.json").is_file());
    // The mismatch reached the server's metrics.
    let metrics = rt().block_on(reps.pick(0).metrics()).unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("halfstep_mismatch_reports_total"))
        .unwrap();
    assert!(line.ends_with(" 2"), "{line}");
}
