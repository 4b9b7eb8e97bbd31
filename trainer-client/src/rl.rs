//! The RL loop: sample G completions per prompt from the server(s) with their logprobs, score
//! them with the verifiable reward, take a policy-gradient step, push the new weights to every
//! replica, log and plot.

use crate::client::Replicas;
use crate::loss::group_advantages;
use crate::mismatch::MismatchStats;
use crate::protocol::{
    ChatCompletionRequest, ChatMessage, MismatchReport, UpdateMode, UpdateOptions,
};
use crate::task::{problems, reward, Problem};
use crate::trainer::{Rollout, StepReport, Trainer};
use anyhow::{bail, Context, Result};
use halfstep_model::Elem;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Settings of one RL run.
#[derive(Debug, Clone)]
pub struct RlConfig {
    /// Optimiser steps.
    pub steps: u64,
    /// Prompts per step.
    pub prompts_per_step: usize,
    /// Samples per prompt (the GRPO group).
    pub group_size: u32,
    /// Longest completion in tokens.
    pub max_tokens: u32,
    /// Sampling temperature.
    pub temperature: f64,
    /// Seed of the prompt stream.
    pub seed: u64,
    /// Where the CSV log, plots and checkpoints go.
    pub out_dir: PathBuf,
    /// Report each step's mismatch to the servers' `/v1/mismatch_report`.
    pub report_mismatch: bool,
    /// Save a trainer checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Show a progress bar.
    pub progress: bool,
}

/// One step's row of the CSV log.
#[derive(Debug, Clone)]
pub struct StepLog {
    /// The trainer's report.
    pub report: StepReport,
    /// Mean reward of the batch sampled for this step (from the weights before it).
    pub reward_mean: f64,
    /// Fraction of groups with differing rewards (the ones that carry signal).
    pub informative_groups: f64,
    /// Weight version the servers hold afterwards.
    pub weight_version: u64,
    /// Seconds spent sampling.
    pub sample_seconds: f64,
    /// Seconds spent pushing weights.
    pub push_seconds: f64,
}

/// Header of the CSV log.
pub fn csv_header() -> String {
    format!(
        "step,reward_mean,informative_groups,loss,grad_norm,loss_scale,skipped,lr,completion_tokens,weight_version,sample_s,train_s,push_s,{}",
        MismatchStats::to_csv_header()
    )
}

impl StepLog {
    /// This step as a CSV row.
    pub fn csv_row(&self) -> String {
        let r = &self.report;
        format!(
            "{},{:.6},{:.4},{:.6e},{:.6e},{},{},{:.3e},{},{},{:.3},{:.3},{:.3},{}",
            r.step,
            self.reward_mean,
            self.informative_groups,
            r.loss,
            r.grad_norm,
            r.loss_scale,
            r.skipped as u8,
            r.lr,
            r.tokens,
            self.weight_version,
            self.sample_seconds,
            r.seconds,
            self.push_seconds,
            r.mismatch.to_csv_row()
        )
    }
}

/// Samples one group per problem; returns the rollouts (advantages filled in), the mean reward
/// and the fraction of informative groups.
pub async fn sample(
    replicas: &Replicas,
    probs: &[Problem],
    cfg: &RlConfig,
    step: u64,
) -> Result<(Vec<Rollout>, f64, f64)> {
    let futs = probs.iter().enumerate().map(|(i, p)| {
        let client = replicas.pick(i).clone();
        let mut req = ChatCompletionRequest::new(vec![ChatMessage::user(p.prompt.clone())]);
        req.logprobs = Some(true);
        req.sampling.n = Some(cfg.group_size);
        req.sampling.temperature = Some(cfg.temperature);
        req.sampling.max_tokens = Some(cfg.max_tokens);
        req.sampling.return_token_ids = Some(true);
        req.sampling.seed = Some((cfg.seed ^ (step << 20) ^ i as u64) as i64);
        async move { client.chat(&req).await }
    });
    let responses = futures::future::join_all(futs).await;
    let mut rollouts = Vec::new();
    let (mut total, mut count, mut informative) = (0.0, 0usize, 0usize);
    for (p, resp) in probs.iter().zip(responses) {
        let resp = resp.context("sampling request")?;
        let prompt = resp
            .prompt_token_ids
            .clone()
            .context("the server did not return prompt_token_ids")?;
        let mut group = Vec::new();
        let mut rewards = Vec::new();
        for c in &resp.choices {
            let ids = c.token_ids.clone().context("no token_ids in a choice")?;
            let lps: Vec<f32> = c
                .logprobs
                .as_ref()
                .and_then(|l| l.content.as_ref())
                .context("no logprobs in a choice")?
                .iter()
                .map(|t| t.logprob)
                .collect();
            if lps.len() != ids.len() {
                bail!("{} token ids but {} logprobs", ids.len(), lps.len());
            }
            let text = c.message.content.clone().unwrap_or_default();
            let r = reward(p, &text, c.finish_reason.as_deref() == Some("stop"));
            rewards.push(r);
            let mut tokens = prompt.clone();
            tokens.extend(&ids);
            group.push(Rollout {
                tokens,
                prompt_len: prompt.len(),
                sampler_logprobs: lps,
                advantage: 0.0,
            });
        }
        let adv = group_advantages(&rewards);
        if adv.iter().any(|&a| a != 0.0) {
            informative += 1;
        }
        for (mut g, a) in group.into_iter().zip(adv) {
            g.advantage = a;
            rollouts.push(g);
        }
        total += rewards.iter().sum::<f64>();
        count += rewards.len();
    }
    Ok((
        rollouts,
        total / count.max(1) as f64,
        informative as f64 / probs.len().max(1) as f64,
    ))
}

/// Runs the loop; returns every step's log.
pub async fn run<T: Elem>(
    replicas: &Replicas,
    trainer: &mut Trainer<T>,
    cfg: &RlConfig,
) -> Result<Vec<StepLog>> {
    std::fs::create_dir_all(&cfg.out_dir)?;
    let csv_path = cfg.out_dir.join("rl.csv");
    let mut csv = std::fs::File::create(&csv_path)?;
    writeln!(csv, "{}", csv_header())?;
    let bar = if cfg.progress {
        indicatif::ProgressBar::new(cfg.steps)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?
            .progress_chars("=> "),
    );
    let base_version = replicas
        .pick(0)
        .weight_info()
        .await
        .context("GET /weight_info (is the server started with --admin-key?)")?
        .weight_version;
    let mut logs: Vec<StepLog> = Vec::new();
    for step in 0..cfg.steps {
        let probs = problems(cfg.seed.wrapping_add(step * 7919), cfg.prompts_per_step);
        let t = std::time::Instant::now();
        let (rollouts, reward_mean, informative) = sample(replicas, &probs, cfg, step).await?;
        let sample_seconds = t.elapsed().as_secs_f64();
        let report = tokio::task::block_in_place(|| trainer.step(&rollouts))?;
        let t = std::time::Instant::now();
        let mut version = base_version + logs.iter().filter(|l| !l.report.skipped).count() as u64;
        if !report.skipped {
            version += 1;
            let bytes = tokio::task::block_in_place(|| trainer.weights_safetensors(true))?;
            let up = replicas
                .update_weights(
                    bytes,
                    &UpdateOptions {
                        weight_version: Some(version),
                        mode: Some(UpdateMode::Wait),
                    },
                )
                .await;
            let failed: Vec<String> = up.failures().map(|(u, e)| format!("{u}: {e}")).collect();
            if !failed.is_empty() {
                bail!("pushing weights failed: {}", failed.join("; "));
            }
        }
        let push_seconds = t.elapsed().as_secs_f64();
        if cfg.report_mismatch {
            let body: MismatchReport = serde_json::from_value(
                report.mismatch.to_report_json(T::DTYPE, "halfstep-trainer"),
            )?;
            for c in replicas.clients() {
                c.mismatch_report(&body).await.context("mismatch report")?;
            }
        }
        let log = StepLog {
            report,
            reward_mean,
            informative_groups: informative,
            weight_version: version,
            sample_seconds,
            push_seconds,
        };
        writeln!(csv, "{}", log.csv_row())?;
        csv.flush()?;
        bar.set_message(format!(
            "reward {:.3}  mismatch max {:.1e}  scale {}{}",
            log.reward_mean,
            log.report.mismatch.max_abs,
            log.report.loss_scale,
            if log.report.skipped {
                "  (skipped)"
            } else {
                ""
            }
        ));
        bar.inc(1);
        if !cfg.progress {
            eprintln!("step {}: {}", step + 1, log.csv_row());
        }
        logs.push(log);
        if cfg.checkpoint_every > 0 && (step + 1) % cfg.checkpoint_every == 0 {
            tokio::task::block_in_place(|| {
                trainer.save_checkpoint(&cfg.out_dir.join("checkpoint"))
            })?;
        }
        if (step + 1) % 5 == 0 || step + 1 == cfg.steps {
            plots(&cfg.out_dir, &logs);
        }
    }
    bar.finish();
    tokio::task::block_in_place(|| trainer.save_checkpoint(&cfg.out_dir.join("checkpoint")))?;
    Ok(logs)
}

/// Writes reward, mismatch and loss-scale plots (a missing font costs the plots, not the run).
pub fn plots(dir: &Path, logs: &[StepLog]) {
    let xs = |f: &dyn Fn(&StepLog) -> f64| -> Vec<(f64, f64)> {
        logs.iter().map(|l| (l.report.step as f64, f(l))).collect()
    };
    let reward = xs(&|l| l.reward_mean);
    let mismatch = xs(&|l| l.report.mismatch.max_abs);
    let k3 = xs(&|l| l.report.mismatch.k3);
    let scale = xs(&|l| (l.report.loss_scale as f64).log2());
    crate::plot::line_chart_or_warn(
        &dir.join("reward.png"),
        "mean reward",
        "step",
        &[("reward", &reward)],
    );
    crate::plot::line_chart_or_warn(
        &dir.join("mismatch.png"),
        "sampler/learner mismatch",
        "step",
        &[("max |dlogp|", &mismatch), ("k3", &k3)],
    );
    crate::plot::line_chart_or_warn(
        &dir.join("loss_scale.png"),
        "log2 loss scale",
        "step",
        &[("log2 scale", &scale)],
    );
}
