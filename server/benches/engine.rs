//! `cargo bench -p halfstep-server --bench engine`: the engine on the default model in FP16,
//! without HTTP: decode throughput at 1, 8, 32 and 64 concurrent sequences, time to first
//! token of a 512-token prompt, and the prefix-cache speed-up when that prompt repeats; then
//! 64 streams of 256 tokens from short prompts (the batched-decode regime of RL rollouts) against
//! the compute limit. Sections can be picked: `-- streams metrics ttft decode64`.

use halfstep_server::engine::{EngineConfig, EngineHandle, RequestOutput, SamplingParams};
use halfstep_server::loader;
use std::time::{Duration, Instant};

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 200 + (i * 7919 + seed * 104_729) % 40_000)
        .collect()
}

/// Runs `c` sequences of `out` tokens each, greedy; returns (output tokens/s, mean TTFT).
fn throughput(
    e: &EngineHandle,
    c: usize,
    prompt_len: usize,
    out: usize,
    round: u32,
) -> (f64, Duration) {
    throughput_at(e, c, prompt_len, out, round, 0.0)
}

/// [`throughput`] sampling at `temperature` (seeded).
fn throughput_at(
    e: &EngineHandle,
    c: usize,
    prompt_len: usize,
    out: usize,
    round: u32,
    temperature: f32,
) -> (f64, Duration) {
    let params = SamplingParams {
        temperature,
        seed: Some(u64::from(round)),
        max_tokens: out,
        ignore_eos: true,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut rxs: Vec<_> = (0..c)
        .map(|i| {
            e.submit(
                format!("b{round}-{i}"),
                prompt(round * 1000 + i as u32, prompt_len),
                params.clone(),
            )
            .unwrap()
        })
        .collect();
    // One reader per request, so every first token is timed when it arrives.
    let readers: Vec<_> = rxs
        .drain(..)
        .map(|mut rx| {
            std::thread::spawn(move || {
                let (mut tokens, mut ttft) = (0, None);
                while let Some(o) = rx.blocking_recv() {
                    if let RequestOutput::Sample(s) = o {
                        if ttft.is_none() && !s.tokens.is_empty() {
                            ttft = Some(t0.elapsed());
                        }
                        tokens += s.tokens.len();
                    }
                }
                (tokens, ttft.unwrap_or_default())
            })
        })
        .collect();
    let mut tokens = 0;
    let mut ttft = Duration::ZERO;
    for r in readers {
        let (n, t) = r.join().unwrap();
        tokens += n;
        ttft += t;
    }
    (tokens as f64 / t0.elapsed().as_secs_f64(), ttft / c as u32)
}

fn time_to_first_token(e: &EngineHandle, id: &str, p: Vec<u32>) -> Duration {
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: 1,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut rx = e.submit(id.into(), p, params).unwrap();
    let mut t = Duration::ZERO;
    while let Some(o) = rx.blocking_recv() {
        if matches!(o, RequestOutput::Sample(_)) && t.is_zero() {
            t = t0.elapsed();
        }
    }
    t
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("engine bench: run with `cargo bench -p halfstep-server --bench engine`");
        return;
    }
    let picked: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |section: &str| picked.is_empty() || picked.contains(&section);
    let Some(path) = loader::default_model_path() else {
        println!("default model not found: run scripts/fetch-default-model.sh");
        return;
    };
    let metrics = std::sync::Arc::new(halfstep_server::metrics::Metrics::new("bench", 8192));
    let cfg = EngineConfig {
        metrics: Some(metrics),
        ..EngineConfig::default()
    };
    // HALFSTEP_KERNELS=fast measures the fast kernels (AMX where present).
    let mode = halfstep_model::KernelMode::from_env();
    let (e, loaded) = loader::start(
        &path,
        halfstep_model::DType::Float16,
        mode,
        cfg,
        &mut |_, _| {},
    )
    .expect("loading the default model");
    println!(
        "engine bench: {} in {}, {} threads, SIMD {:?}, {} kernels",
        path.display(),
        loaded.dtype,
        halfstep_model::kernels::default_threads(),
        halfstep_model::SimdLevel::from_env(),
        if mode.is_active() {
            "fast (AMX)"
        } else {
            "parity"
        }
    );
    // Warm up caches and the worker pool.
    throughput(&e, 2, 16, 8, 0);
    if want("streams") {
        println!(
            "\n{:>12} {:>16} {:>14}",
            "concurrency", "output tok/s", "mean TTFT ms"
        );
        for (round, c) in [1usize, 8, 32, 64].into_iter().enumerate() {
            let (tps, ttft) = throughput(&e, c, 32, 64, round as u32 + 1);
            println!("{c:>12} {tps:>16.1} {:>14.1}", ttft.as_secs_f64() * 1e3);
        }
    }
    if want("decode64") {
        decode64(&e, &loaded);
    }
    if want("metrics") {
        metrics_cost(&e);
    }
    if want("ttft") {
        ttft(&e);
    }
    e.shutdown();
}

/// 64 streams of 256 tokens from 32-token prompts, sampled at temperature 1 as RL rollouts are:
/// nearly all work is batched decode, so the output rate is set against the compute limit (FMA
/// peak over 2 FLOP per parameter), measured beside it.
fn decode64(e: &EngineHandle, loaded: &loader::LoadedModel) {
    let kern = halfstep_model::kernels::Kernels::global();
    let params = (loaded.weight_bytes / loaded.dtype.size_of()) as f64;
    let peak = halfstep_model::kernels::bandwidth::peak_fma_gflops(&kern, 3);
    let (tps, _) = throughput_at(e, 64, 32, 256, 70, 1.0);
    let peak_after = halfstep_model::kernels::bandwidth::peak_fma_gflops(&kern, 3);
    let limit = peak.max(peak_after) * 1e9 / (2.0 * params);
    println!(
        "\n64 streams x 256 tokens (32-token prompts, temperature 1): {tps:.1} tok/s; FMA peak {peak:.0}/{peak_after:.0} GFLOP/s before/after => compute limit {limit:.0} tok/s; at {:.0}% of it",
        100.0 * tps / limit
    );
}

/// Metrics cost: the same load with and without a scraper rendering /metrics every 100 ms.
fn metrics_cost(e: &EngineHandle) {
    let metrics = e.metrics().expect("bench engine keeps metrics");
    // Alternate quiet and scraped rounds so drift of the shared host hits both alike.
    let (mut quiet, mut scraped, mut scrapes) = (0.0, 0.0, 0);
    for round in 0..3u32 {
        quiet += throughput(e, 32, 32, 64, 90 + 2 * round).0;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scraper = {
            let (m, stop) = (metrics.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::black_box(m.render());
                    n += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                n
            })
        };
        scraped += throughput(e, 32, 32, 64, 91 + 2 * round).0;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        scrapes += scraper.join().unwrap();
    }
    let t0 = Instant::now();
    for _ in 0..100 {
        std::hint::black_box(metrics.render());
    }
    let render_us = t0.elapsed().as_secs_f64() * 1e4;
    println!(
        "\n32 streams, 3 alternating rounds each: {:.1} tok/s without a scraper, {:.1} tok/s with /metrics rendered every 100 ms ({scrapes} scrapes): ratio {:.3}; one render takes {render_us:.0} us",
        quiet / 3.0,
        scraped / 3.0,
        scraped / quiet
    );
}

/// Time to first token of a 512-token prompt, cold and again from the prefix cache.
fn ttft(e: &EngineHandle) {
    let p512 = prompt(424_242, 512);
    let cold = time_to_first_token(e, "ttft-cold", p512.clone());
    let warm = time_to_first_token(e, "ttft-warm", p512);
    println!(
        "\nTTFT, 512-token prompt: {:.1} ms",
        cold.as_secs_f64() * 1e3
    );
    println!(
        "TTFT, same prompt again (prefix cache): {:.1} ms => speed-up {:.1}x",
        warm.as_secs_f64() * 1e3,
        cold.as_secs_f64() / warm.as_secs_f64()
    );
}
