//! `halfstep-train`: RL fine-tuning against running halfstep servers, and the sampler/learner
//! mismatch measurement.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use half::{bf16, f16};
use halfstep_model::backward::GradOptions;
use halfstep_model::{Checkpoint, DType, Elem, Kernels, Model};
use halfstep_trainer::client::{Client, Replicas};
use halfstep_trainer::independent;
use halfstep_trainer::loss::LossKind;
use halfstep_trainer::mismatch::MismatchStats;
use halfstep_trainer::optim::{AdamConfig, LossScaler, LrSchedule};
use halfstep_trainer::protocol::CompletionRequest;
use halfstep_trainer::rl::{self, RlConfig};
use halfstep_trainer::trainer::{score, Trainer, TrainerConfig};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "halfstep-train",
    version,
    about = "FP16 RL fine-tuning against halfstep servers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an RL loop: sample from the server(s), learn, push weights, repeat.
    Rl(RlArgs),
    /// Measure sampler/learner mismatch of a server against three learners.
    Mismatch(MismatchArgs),
}

#[derive(Args)]
struct ServerArgs {
    /// Server URL (repeat for replicas; updates go to all of them).
    #[arg(long = "server", default_value = "http://127.0.0.1:8000")]
    servers: Vec<String>,
    /// The server's admin key (its --admin-key).
    #[arg(long, env = "HALFSTEP_ADMIN_KEY")]
    admin_key: Option<String>,
    /// The server's API key (its --api-key).
    #[arg(long, env = "HALFSTEP_API_KEY")]
    api_key: Option<String>,
}

#[derive(Args)]
struct RlArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The checkpoint the server was started from (GGUF file or HF directory).
    #[arg(long)]
    model: PathBuf,
    /// Optimiser steps.
    #[arg(long, default_value_t = 50)]
    steps: u64,
    /// Prompts per step.
    #[arg(long, default_value_t = 8)]
    prompts_per_step: usize,
    /// Samples per prompt (the group of group-normalised advantages).
    #[arg(long, default_value_t = 8)]
    group_size: u32,
    /// Longest completion.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Sampling temperature.
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Cosine decay over this many steps after warm-up, down to a tenth (0: constant).
    #[arg(long, default_value_t = 0)]
    decay_steps: u64,
    /// Loss: grpo, ppo-clip or tis.
    #[arg(long, default_value = "grpo")]
    loss: LossKind,
    /// Largest gradient norm (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Train the last N decoder layers and the final norm (0: all layers and the embedding).
    #[arg(long, default_value_t = 4)]
    train_layers: usize,
    /// Also train the LM head (the token embedding, when tied).
    #[arg(long)]
    train_lm_head: bool,
    /// Initial loss scale.
    #[arg(long, default_value_t = 65536.0)]
    loss_scale: f32,
    /// Where rl.csv, the plots and the trainer checkpoint go.
    #[arg(long, default_value = "runs/rl")]
    out: PathBuf,
    /// Seed of the prompt stream and of sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Report each step's mismatch to /v1/mismatch_report.
    #[arg(long)]
    report_mismatch: bool,
    /// Resume from a trainer checkpoint directory (the server must hold its weights).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    /// Print one line per step instead of a progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct MismatchArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// The checkpoint the server was started from (GGUF file or HF directory).
    #[arg(long)]
    model: PathBuf,
    /// Samples per prompt.
    #[arg(long, default_value_t = 2)]
    n: u32,
    /// Longest completion.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Seed of sampling.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Add the `torch` row (scripts/mismatch_torch.py, Hugging Face transformers).
    #[arg(long)]
    torch: bool,
}

/// The prompts the mismatch command samples from.
const PROMPTS: [&str; 6] = [
    "The quick brown fox jumps over the lazy dog. Once upon a time,",
    "def fibonacci(n):",
    "The capital of France is",
    "Q: What is 12 + 30?\nA:",
    "In 1905, Albert Einstein published",
    "List three colours:",
];

fn replicas(a: &ServerArgs) -> Result<Replicas> {
    let mut r = Replicas::new(&a.servers)?;
    if let Some(k) = &a.api_key {
        r = r.with_api_key(k);
    }
    if let Some(k) = &a.admin_key {
        r = r.with_admin_key(k);
    }
    Ok(r)
}

fn load<T: Elem>(path: &Path) -> Result<Model<T>> {
    let ck = Checkpoint::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Model::<T>::load(
        ck.config,
        &*ck.tensors,
        Kernels::global(),
    )?)
}

/// The run dtype a server reports in /weight_info.
async fn server_dtype(c: &Client) -> Result<DType> {
    let info = c.weight_info().await.context("GET /weight_info")?;
    info.dtype
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown dtype {}", info.dtype))
}

async fn rl_main<T: Elem>(a: RlArgs) -> Result<()> {
    let reps = replicas(&a.server)?;
    let model = load::<T>(&a.model)?;
    let layers = model.config().num_hidden_layers;
    let cfg = TrainerConfig {
        schedule: LrSchedule {
            lr: a.lr,
            warmup_steps: a.warmup,
            decay_steps: a.decay_steps,
            min_ratio: 0.1,
        },
        adam: AdamConfig::default(),
        max_grad_norm: a.max_grad_norm,
        loss: a.loss,
        grad: GradOptions {
            first_trainable_layer: if a.train_layers == 0 {
                0
            } else {
                layers.saturating_sub(a.train_layers)
            },
            train_embeddings: a.train_layers == 0,
            train_final_norm: true,
            train_lm_head: a.train_lm_head,
        },
        scaler: LossScaler::new(a.loss_scale, 2000),
    };
    let mut trainer = match &a.resume {
        Some(dir) => Trainer::load_checkpoint(model, dir)?,
        None => Trainer::new(model, cfg)?,
    };
    eprintln!(
        "training {} tensors in {}; {} steps of {} prompts x {} samples",
        trainer.trainable_names().len(),
        T::DTYPE.name(),
        a.steps,
        a.prompts_per_step,
        a.group_size
    );
    let cfg = RlConfig {
        steps: a.steps,
        prompts_per_step: a.prompts_per_step,
        group_size: a.group_size,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        out_dir: a.out.clone(),
        report_mismatch: a.report_mismatch,
        checkpoint_every: a.checkpoint_every,
        progress: !a.no_progress,
    };
    let logs = rl::run(&reps, &mut trainer, &cfg).await?;
    let first = logs.first().map(|l| l.reward_mean).unwrap_or(0.0);
    let last: Vec<f64> = logs.iter().rev().take(3).map(|l| l.reward_mean).collect();
    println!(
        "reward: first step {:.3}, mean of the last {} steps {:.3}; log {}",
        first,
        last.len(),
        last.iter().sum::<f64>() / last.len().max(1) as f64,
        a.out.join("rl.csv").display()
    );
    Ok(())
}

/// Sampled sequences: (tokens, prompt length, sampler logprobs).
type Samples = Vec<(Vec<u32>, usize, Vec<f32>)>;

async fn sample_for_mismatch(c: &Client, a: &MismatchArgs) -> Result<Samples> {
    let mut out = Vec::new();
    // Concurrent requests, so the server batches them as under real traffic.
    let futs = PROMPTS.iter().enumerate().map(|(i, p)| {
        let mut req = CompletionRequest::new(*p);
        req.logprobs = Some(0);
        req.sampling.n = Some(a.n);
        req.sampling.temperature = Some(1.0);
        req.sampling.max_tokens = Some(a.max_tokens);
        req.sampling.return_token_ids = Some(true);
        req.sampling.seed = Some(a.seed + i as i64);
        let c = c.clone();
        async move { c.completions(&req).await }
    });
    for r in futures::future::join_all(futs).await {
        for ch in r?.choices {
            let prompt = ch.prompt_token_ids.context("no prompt_token_ids")?;
            let ids = ch.token_ids.context("no token_ids")?;
            let lps: Vec<f32> = ch
                .logprobs
                .context("no logprobs")?
                .token_logprobs
                .into_iter()
                .map(|x| x.unwrap_or(f32::NEG_INFINITY))
                .collect();
            let mut toks = prompt.clone();
            toks.extend(&ids);
            out.push((toks, prompt.len(), lps));
        }
    }
    Ok(out)
}

fn row(name: &str, dtype: DType, s: &MismatchStats) {
    println!(
        "{:<12} {:<9} {:>10.3e} {:>10.3e} {:>11.3e} {:>11.3e} {:>10.6} {:>10.6}",
        name,
        dtype.name(),
        s.max_abs,
        s.mean_abs,
        s.k1,
        s.k3,
        s.ratio_min,
        s.ratio_max
    );
}

async fn mismatch_main<T: Elem>(a: MismatchArgs, c: Client) -> Result<()> {
    let model = load::<T>(&a.model)?;
    let samples = sample_for_mismatch(&c, &a).await?;
    let mut parity = MismatchStats::new();
    let mut indep = MismatchStats::new();
    for (toks, from, lps) in &samples {
        parity.add_sequence(lps, &score(&model, toks, *from)?)?;
        indep.add_sequence(lps, &independent::try_logprobs(&model, toks, *from)?)?;
    }
    println!(
        "{} sequences, {} sampled tokens from {} ({})",
        parity.sequences,
        parity.tokens,
        c.base_url(),
        T::DTYPE.name()
    );
    println!(
        "{:<12} {:<9} {:>10} {:>10} {:>11} {:>11} {:>10} {:>10}",
        "learner", "dtype", "max_abs", "mean_abs", "k1", "k3", "ratio_min", "ratio_max"
    );
    row("parity", T::DTYPE, &parity);
    row("independent", T::DTYPE, &indep);
    if a.torch {
        match torch_logprobs(&a.model, T::DTYPE, &samples) {
            Ok(all) => {
                let mut t = MismatchStats::new();
                for ((_, _, lps), l) in samples.iter().zip(all) {
                    t.add_sequence(lps, &l)?;
                }
                row("torch", T::DTYPE, &t);
            }
            Err(e) => println!("torch        (not run: {e:#})"),
        }
    }
    Ok(())
}

/// Scores the samples with Hugging Face transformers through scripts/mismatch_torch.py.
fn torch_logprobs(model: &Path, dtype: DType, samples: &Samples) -> Result<Vec<Vec<f32>>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let script = root.join("scripts/mismatch_torch.py");
    let python = std::env::var_os("HALFSTEP_TORCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".venv-golden/bin/python"));
    if !python.exists() {
        bail!(
            "{} not found: run scripts/golden/setup-venv.sh (or set HALFSTEP_TORCH_PYTHON)",
            python.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("halfstep-mismatch-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let input = dir.join("in.json");
    let output = dir.join("out.json");
    let seqs: Vec<_> = samples
        .iter()
        .map(|(t, from, _)| serde_json::json!({"tokens": t, "from": from}))
        .collect();
    std::fs::write(
        &input,
        serde_json::to_vec(&serde_json::json!({"sequences": seqs}))?,
    )?;
    let st = std::process::Command::new(&python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--dtype")
        .arg(dtype.name())
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .status()
        .context("running scripts/mismatch_torch.py")?;
    if !st.success() {
        bail!("scripts/mismatch_torch.py failed ({st})");
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&output)?)?;
    let _ = std::fs::remove_dir_all(&dir);
    v["logprobs"]
        .as_array()
        .context("no logprobs in the script's output")?
        .iter()
        .map(|s| {
            s.as_array()
                .context("bad row")?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32).context("bad value"))
                .collect()
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Rl(a) => {
            let reps = replicas(&a.server)?;
            match server_dtype(reps.pick(0)).await? {
                DType::Float16 => rl_main::<f16>(a).await,
                DType::Bfloat16 => rl_main::<bf16>(a).await,
                DType::Float32 => rl_main::<f32>(a).await,
            }
        }
        Cmd::Mismatch(a) => {
            let c = replicas(&a.server)?.pick(0).clone();
            match server_dtype(&c).await? {
                DType::Float16 => mismatch_main::<f16>(a, c).await,
                DType::Bfloat16 => mismatch_main::<bf16>(a, c).await,
                DType::Float32 => mismatch_main::<f32>(a, c).await,
            }
        }
    }
}
