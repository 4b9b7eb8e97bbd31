//! The `halfstep` command line: `serve`, `generate` and `openapi`, with vLLM's flag names.

use crate::api::{self, ApiConfig, AppState};
use crate::engine::{EngineConfig, LogprobsMode, RequestOutput, SamplingParams};
use crate::loader;
use crate::metrics::Metrics;
use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use halfstep_model::{DType, KernelMode};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// halfstep: an FP16 inference server with trainer hooks for RL fine-tuning.
#[derive(Debug, Parser)]
#[command(name = "halfstep", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a model over the OpenAI/vLLM-compatible HTTP API.
    Serve(ServeArgs),
    /// Generate from a prompt on the command line (the engine without HTTP).
    Generate(GenerateArgs),
    /// Write the seeded tiny test model (HF directory: config, safetensors, tokenizer).
    TinyModel {
        /// Directory to create.
        dir: PathBuf,
        /// Weight seed.
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
    },
    /// Print (or write) the OpenAPI document of the HTTP API.
    Openapi {
        /// Write to this file instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Measure the machine's memory read bandwidth and peak f32 FMA rate (decode and batching limits).
    Bandwidth {
        /// Buffer size in MiB (well beyond the last-level cache).
        #[arg(long, default_value_t = 512)]
        mib: usize,
    },
}

/// Model and engine flags shared by `serve` and `generate`.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// A GGUF file or a Hugging Face model directory (default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    pub model: Option<PathBuf>,
    /// Run dtype: float16 (default; `auto` and `half` mean float16), bfloat16 or float32.
    #[arg(long, default_value = "float16")]
    pub dtype: String,
    /// Matrix-product kernels: `parity` (default; bitwise equal to the trainer's) or `fast`
    /// (AMX tiles where the CPU has them; not bitwise equal, see README "Fast kernels").
    #[arg(long, default_value = "parity", env = "HALFSTEP_KERNELS",
          value_parser = ["parity", "fast"])]
    pub kernels: String,
    /// Longest prompt + output (default: the model's context).
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Most tokens computed in one engine step (prompts are chunked to fit).
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Bytes of K/V cache, e.g. 536870912, 512MiB or 2GiB.
    #[arg(long, default_value = "512MiB", value_parser = parse_bytes)]
    pub kv_cache_memory: usize,
    /// Number of K/V blocks (overrides --kv-cache-memory).
    #[arg(long)]
    pub num_kv_blocks: Option<usize>,
    /// Positions per K/V block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Seed of requests that give none.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest `logprobs`/`top_logprobs`/`prompt_logprobs` a request may ask for.
    #[arg(long, default_value_t = 20)]
    pub max_logprobs: usize,
    /// raw_logprobs (the model's distribution) or processed_logprobs (the one sampled from).
    #[arg(long, default_value = "raw_logprobs")]
    pub logprobs_mode: String,
    /// Turn off automatic prefix caching.
    #[arg(long)]
    pub no_enable_prefix_caching: bool,
}

/// `halfstep serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model and engine.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Name clients use for the model (default: the file or directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1 routes.
    #[arg(long, env = "HALFSTEP_API_KEY")]
    pub api_key: Option<String>,
    /// Largest request body.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    pub max_body_bytes: usize,
    /// Largest total size of a request's headers (names and values); larger gets 431.
    #[arg(long, default_value = "32KiB", value_parser = parse_bytes)]
    pub max_header_bytes: usize,
    /// Seconds a request may take to produce its response head.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Require `Authorization: Bearer <key>` on the trainer hooks (weight updates, pause...).
    #[arg(long, env = "HALFSTEP_ADMIN_KEY")]
    pub admin_key: Option<String>,
    /// Turn the trainer hooks on without an admin key (anyone who can connect may use them).
    #[arg(long)]
    pub enable_weight_updates: bool,
    /// The only directory `/update_weights_from_disk` may read from.
    #[arg(long)]
    pub allowed_weight_dir: Option<PathBuf>,
    /// Seconds in-flight requests may take to finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
}

/// `halfstep generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Model and engine.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// The prompt.
    #[arg(long, short)]
    pub prompt: String,
    /// Render the prompt as one user message with the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed.
    #[arg(long)]
    pub request_seed: Option<u64>,
}

/// Parses a byte count with an optional KB/MB/GB/KiB/MiB/GiB suffix.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a byte count"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "mb" | "m" => 1e6,
        "gb" | "g" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("unknown unit '{u}' in '{s}'")),
    };
    Ok((v * mult) as usize)
}

impl EngineArgs {
    fn dtype(&self) -> anyhow::Result<DType> {
        if self.dtype == "auto" {
            return Ok(DType::Float16);
        }
        Ok(self.dtype.parse::<DType>()?)
    }

    fn model_path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(p) => Ok(p.clone()),
            None => loader::default_model_path().context(
                "no MODEL given and the default model is missing: run scripts/fetch-default-model.sh \
                 (it downloads SmolLM2-135M-Instruct into models/), or pass a GGUF file or HF directory",
            ),
        }
    }

    fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        let mode: LogprobsMode = self.logprobs_mode.parse().map_err(anyhow::Error::msg)?;
        if self.block_size == 0 || self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be positive");
        }
        Ok(EngineConfig {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            block_size: self.block_size,
            num_kv_blocks: self.num_kv_blocks,
            kv_cache_memory: self.kv_cache_memory,
            max_model_len: self.max_model_len.unwrap_or(usize::MAX),
            max_logprobs: self.max_logprobs,
            logprobs_mode: mode,
            seed: self.seed,
            enable_prefix_caching: !self.no_enable_prefix_caching,
            metrics: None,
        })
    }

    fn start(
        &self,
        metrics: Option<Arc<Metrics>>,
    ) -> anyhow::Result<(crate::engine::EngineHandle, loader::LoadedModel, PathBuf)> {
        let path = self.model_path()?;
        let dtype = self.dtype()?;
        let kernels = KernelMode::parse(&self.kernels)
            .with_context(|| format!("--kernels {:?}: expected parity or fast", self.kernels))?;
        let fast = kernels.is_active() && dtype != DType::Float32;
        if kernels == KernelMode::Fast && !fast {
            tracing::warn!(
                "--kernels fast: {}; running the parity kernels",
                if dtype == DType::Float32 {
                    "the fast kernels are for float16 and bfloat16"
                } else {
                    "this CPU has no AMX (or the OS refused its tile state)"
                }
            );
        }
        tracing::info!(
            "loading {} in {dtype}, {} kernels",
            path.display(),
            if fast { "fast (AMX)" } else { "parity" }
        );
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading weights {bar:40} {pos}/{len} tensors")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let t0 = std::time::Instant::now();
        let cfg = EngineConfig {
            metrics,
            ..self.engine_config()?
        };
        let (engine, loaded) = loader::start(&path, dtype, kernels, cfg, &mut |d, t| {
            bar.set_length(t as u64);
            bar.set_position(d as u64);
        })?;
        bar.finish_and_clear();
        let info = engine.info();
        tracing::info!(
            "loaded {:?} ({} layers, {:.0} MB in {}) in {:.1}s; K/V cache {} blocks of {} tokens; max_model_len {}",
            loaded.config.architecture,
            loaded.config.num_hidden_layers,
            loaded.weight_bytes as f64 / 1e6,
            loaded.dtype,
            t0.elapsed().as_secs_f64(),
            info.num_blocks,
            info.block_size,
            info.max_model_len
        );
        Ok((engine, loaded, path))
    }
}

/// Runs `halfstep serve` until SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let path = args.engine.model_path()?;
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        path.file_stem()
            .or(path.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let metrics = Arc::new(Metrics::new(
        &name,
        args.engine.max_model_len.unwrap_or(131_072),
    ));
    let (engine, _loaded, path) = args.engine.start(Some(metrics.clone()))?;
    let cfg = ApiConfig {
        served_model_name: name,
        model_root: path.display().to_string(),
        api_key: args.api_key.clone(),
        max_body_bytes: args.max_body_bytes,
        max_header_bytes: args.max_header_bytes,
        request_timeout: Duration::from_secs(args.request_timeout),
        admin_key: args.admin_key.clone(),
        enable_weight_updates: args.enable_weight_updates,
        allowed_weight_dir: args.allowed_weight_dir.clone(),
    };
    if cfg.admin_key.is_none() && cfg.enable_weight_updates {
        tracing::warn!(
            "trainer hooks are on without --admin-key: anyone who can reach this port can replace the model's weights"
        );
    }
    if let Some(d) = &cfg.allowed_weight_dir {
        if !d.is_dir() {
            bail!("--allowed-weight-dir {} is not a directory", d.display());
        }
    }
    let state = Arc::new(AppState::new(engine.clone(), &cfg).with_metrics(metrics));
    let app = api::router(state.clone(), &cfg);
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(
        "serving '{}' on http://{}",
        cfg.served_model_name,
        listener.local_addr()?
    );
    // On SIGTERM/SIGINT: refuse new requests (503), let in-flight ones finish for up to
    // --shutdown-timeout, then stop whatever is left and exit 0.
    let signalled = Arc::new(tokio::sync::Notify::new());
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let signalled = signalled.clone();
        async move {
            shutdown_signal(state).await;
            signalled.notify_one();
        }
    });
    let deadline = async {
        signalled.notified().await;
        tokio::time::sleep(Duration::from_secs_f64(args.shutdown_timeout)).await;
    };
    let engine_died = {
        let engine = engine.clone();
        async move {
            while !engine
                .stats()
                .engine_dead
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    tokio::select! {
        r = server => r?,
        _ = engine_died => bail!("the engine thread panicked; exiting so a supervisor can restart the server"),
        _ = deadline => tracing::warn!(
            "--shutdown-timeout ({} s) passed with requests still running; stopping them",
            args.shutdown_timeout
        ),
    }
    engine.shutdown();
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal(state: Arc<AppState>) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: finishing in-flight requests");
    state
        .accepting
        .store(false, std::sync::atomic::Ordering::Relaxed);
}

/// Runs `halfstep generate`, streaming text to stdout.
pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let (engine, _, _) = args.engine.start(None)?;
    let tok = engine.tokenizer().clone();
    let text = if args.chat {
        let msgs = serde_json::json!([{"role": "user", "content": args.prompt}]);
        tok.apply_chat_template(&msgs, true, None)?
    } else {
        args.prompt.clone()
    };
    let ids = tok.encode(&text, !args.chat)?;
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.request_seed,
        ..Default::default()
    };
    let mut rx = engine.submit("generate".into(), ids, params)?;
    let t0 = std::time::Instant::now();
    let mut n = 0;
    let mut out = std::io::stdout();
    while let Some(o) = rx.blocking_recv() {
        if let RequestOutput::Sample(s) = o {
            n += s.tokens.len();
            write!(out, "{}", s.text)?;
            out.flush()?;
            if let Some(f) = s.finish_reason {
                writeln!(out)?;
                eprintln!(
                    "[{} tokens in {:.2}s, finish_reason {}]",
                    n,
                    t0.elapsed().as_secs_f64(),
                    f.as_str()
                );
            }
        }
    }
    engine.shutdown();
    Ok(())
}
