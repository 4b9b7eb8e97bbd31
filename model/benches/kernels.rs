//! `cargo bench -p halfstep-model`: GEMM/GEMV throughput on the default model's shapes beside
//! the machine's measured FMA peak and read bandwidth, then the full forward: prefill of a
//! 512-token prompt, decode time per token at batch 1, and one decode step of 64 sequences.
//!
//! `cargo bench -p halfstep-model --bench kernels -- prefill decode` runs only those sections
//! (gemm, gemv, levels, attention, prefill, decode, decode64), e.g. under a profiler.
//!
//! Figures are only comparable within one run; the machine's bandwidth moves from minute to
//! minute, so it is measured beside every figure.

use half::f16;
use halfstep_model::kernels::attention::{attention, AttentionShape};
use halfstep_model::kernels::bandwidth::{peak_fma_gflops, read_bandwidth_gbs};
use halfstep_model::kernels::gemm::{matmul, Output};
use halfstep_model::{
    Checkpoint, ContiguousKv, KernelMode, Kernels, KvCache, LogitsFor, Model, SimdLevel, Span,
};
use std::time::Instant;

fn gemv_gbs(kern: &Kernels, k: usize, n: usize, copies: usize, iters: usize) -> (f64, f64) {
    let ws: Vec<Vec<f16>> = (0..copies)
        .map(|c| {
            (0..n * k)
                .map(|i| f16::from_f32(((i * 7 + c) % 13) as f32 * 0.01))
                .collect()
        })
        .collect();
    let x: Vec<f32> = (0..k).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut out = vec![0f32; n];
    for w in &ws {
        matmul(kern, &x, 1, k, w, n, None, Output::Round, &mut out);
    }
    let t0 = Instant::now();
    for it in 0..iters {
        matmul(
            kern,
            &x,
            1,
            k,
            &ws[it % copies],
            n,
            None,
            Output::Round,
            &mut out,
        );
    }
    let dt = t0.elapsed().as_secs_f64() / iters as f64;
    std::hint::black_box(&out);
    ((n * k * 2) as f64 / dt / 1e9, dt * 1e6)
}

/// GFLOP/s of `m` rows through an `[n x k]` f16 matrix: weights hot in cache with `copies` 1,
/// or taken in turn from `copies` matrices (from memory once they outgrow the caches, as a
/// decode step reads them).
fn gemm_gflops(kern: &Kernels, m: usize, k: usize, n: usize, copies: usize) -> f64 {
    let ws: Vec<Vec<f16>> = (0..copies)
        .map(|c| {
            (0..n * k)
                .map(|i| f16::from_f32(((i * 7 + c) % 13) as f32 * 0.01))
                .collect()
        })
        .collect();
    let x: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut out = vec![0f32; m * n];
    let flops = (2 * m * n * k) as f64;
    let iters = ((3e9 / flops) as usize).clamp(3, 20_000);
    for w in &ws {
        matmul(kern, &x, m, k, w, n, None, Output::Round, &mut out);
    }
    let t0 = Instant::now();
    for it in 0..iters {
        let w = &ws[it % copies];
        matmul(kern, &x, m, k, w, n, None, Output::Round, &mut out);
    }
    let dt = t0.elapsed().as_secs_f64() / iters as f64;
    std::hint::black_box(&out);
    flops / dt / 1e9
}

/// The server's K/V layout: one huge-page arena per K and V, `[layer][block][slot][kv_dim]`,
/// block tables per sequence.
struct PoolKv {
    kv_dim: usize,
    block_size: usize,
    num_blocks: usize,
    keys: Vec<f16>,
    values: Vec<f16>,
    tables: Vec<Vec<usize>>,
}

impl PoolKv {
    /// Zeroed K/V for `seqs` sequences of `positions` each over `layers` layers, in blocks of
    /// `block_size`. Block b of sequence s is id b·seqs + s: neighbours in a table are far
    /// apart, as when a pool fills with interleaved sequences.
    fn new(layers: usize, seqs: usize, positions: usize, kv_dim: usize, block_size: usize) -> Self {
        let per_seq = positions.div_ceil(block_size);
        let num_blocks = seqs * per_seq;
        let n = layers * num_blocks * block_size * kv_dim;
        PoolKv {
            kv_dim,
            block_size,
            num_blocks,
            keys: halfstep_model::mem::huge_vec(n, f16::ZERO),
            values: halfstep_model::mem::huge_vec(n, f16::ZERO),
            tables: (0..seqs)
                .map(|s| (0..per_seq).map(|b| b * seqs + s).collect())
                .collect(),
        }
    }

    fn offset(&self, layer: usize, block: usize, slot: usize) -> usize {
        ((layer * self.num_blocks + block) * self.block_size + slot) * self.kv_dim
    }
}

impl KvCache<f16> for PoolKv {
    fn write(&mut self, layer: usize, seq: usize, pos: usize, k: &[f16], v: &[f16]) {
        let o = self.offset(
            layer,
            self.tables[seq][pos / self.block_size],
            pos % self.block_size,
        );
        self.keys[o..o + self.kv_dim].copy_from_slice(k);
        self.values[o..o + self.kv_dim].copy_from_slice(v);
    }

    fn read<'s>(
        &'s self,
        layer: usize,
        seq: usize,
        len: usize,
        f: &mut halfstep_model::kv::KvVisitor<'_, 's, f16>,
    ) {
        let (bs, d) = (self.block_size, self.kv_dim);
        let mut p = 0;
        for &block in &self.tables[seq] {
            if p >= len {
                break;
            }
            let n = bs.min(len - p);
            let o = self.offset(layer, block, 0);
            f(p, &self.keys[o..o + n * d], &self.values[o..o + n * d]);
            p += n;
        }
    }
}

/// Decode attention of `seqs` sequences with `ctx` cached positions each, the default model's
/// shape (9 heads, 3 K/V heads of 64) over `layers` layers, in the server's paged layout (blocks
/// of 16, handed out interleaved across sequences as a pool fills). 64 sequences × 30 layers
/// (295 MB) fit in no cache level, as in serving; 8 × 1 (1.2 MB) stays in cache and shows the
/// compute alone. Returns microseconds per layer.
fn attention_us(kern: &Kernels, layers: usize, seqs: usize, ctx: usize, rounds: usize) -> f64 {
    let bs = 16;
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
    };
    let kvd = 192;
    let mut kv = PoolKv::new(layers, seqs, ctx, kvd, bs);
    let row: Vec<f16> = (0..kvd)
        .map(|i| f16::from_f32((i % 7) as f32 * 0.1))
        .collect();
    for p in 0..ctx {
        for s in 0..seqs {
            for l in 0..layers {
                kv.write(l, s, p, &row, &row);
            }
        }
    }
    let q: Vec<f32> = (0..seqs * 576).map(|i| (i % 11) as f32 * 0.01).collect();
    let seq_ids: Vec<usize> = (0..seqs).collect();
    let positions = vec![ctx - 1; seqs];
    let mut out = vec![0f32; seqs * 576];
    let t0 = Instant::now();
    for _ in 0..rounds {
        for l in 0..layers {
            attention::<f16>(kern, shape, l, &q, &seq_ids, &positions, &kv, &mut out);
        }
    }
    t0.elapsed().as_secs_f64() / (rounds * layers) as f64 * 1e6
}

fn attention_bench(kern: &Kernels, bw: f64) {
    println!();
    let cold = attention_us(kern, 30, 64, 200, 5);
    let gbs = (64 * 200 * 192 * 2 * 2) as f64 / cold / 1e3;
    println!(
        "attention, 64 decode rows x 200 positions (paged f16, 30 layers): {cold:.0} us per layer = {gbs:.1} GB/s of K/V ({:.0}% of read bandwidth)",
        100.0 * gbs / bw
    );
    let hot = attention_us(kern, 1, 8, 200, 2000);
    println!(
        "attention in cache, 8 decode rows x 200 positions (1 layer): {hot:.1} us per layer = {:.0} us for 64 rows",
        hot * 8.0
    );
    // One sequence with a long context, as in batch-1 decode of a long RL rollout, and a few
    // of them: enough layers that the K/V (at least 128 MB) is out of cache from one pass to
    // the next, as when the weights stream through between them.
    for (seqs, ctx) in [(1usize, 256usize), (1, 1024), (1, 4096), (4, 1024)] {
        let bytes = seqs * ctx * 192 * 2 * 2;
        let layers = (128usize << 20).div_ceil(bytes).max(30);
        let us = attention_us(kern, layers, seqs, ctx, 3);
        let gbs = bytes as f64 / us / 1e3;
        println!(
            "attention, {seqs} decode row(s) x {ctx} positions (paged f16, cold): {us:.1} us per layer = {gbs:.1} GB/s of K/V ({:.0}% of read bandwidth)",
            100.0 * gbs / bw,
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs bench binaries without `--bench`: stay quick there.
    if !args.iter().any(|a| a == "--bench") {
        println!("kernels bench: run with `cargo bench -p halfstep-model`");
        return;
    }
    let picked: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |section: &str| picked.is_empty() || picked.contains(&section);
    let kern = Kernels::global();
    println!(
        "halfstep-model kernels bench: SIMD {:?}, {} threads",
        kern.level,
        kern.pool.threads()
    );
    let bw = read_bandwidth_gbs(&kern, 512 << 20, 5);
    println!("memory read bandwidth: {bw:.1} GB/s (512 MiB, best of 5, all threads)");
    let peak = peak_fma_gflops(&kern, 3);
    println!("peak f32 FMA: {peak:.1} GFLOP/s (best of 3, all threads)");
    // `--kernels fast` where this CPU has AMX: the same tables once more with it.
    let mut modes = vec![("parity", kern.clone())];
    if KernelMode::Fast.is_active() {
        modes.push(("fast (AMX)", kern.clone().with_mode(KernelMode::Fast)));
    }
    if want("gemm") {
        for (mode, kern) in &modes {
            println!();
            println!(
                "GEMM, {mode} kernels (f16 weights hot; cold: from memory), GFLOP/s and share of the f32 FMA peak:"
            );
            println!(
                "{:<22} {:>12} {:>12} {:>12} {:>12} {:>12}",
                "shape [out x in]", "m=4", "m=16", "m=64", "m=512", "m=64 cold"
            );
            for (name, n, k) in [
                ("gate/up_proj", 1536, 576),
                ("down_proj", 576, 1536),
                ("q_proj", 576, 576),
                ("lm_head", 49152, 576),
            ] {
                // Cold: 64 MiB of copies, twice the largest L3 of these hosts.
                let cold = (64 << 20) / (n * k * 2) + 1;
                let cells: Vec<String> = [(4, 1), (16, 1), (64, 1), (512, 1), (64, cold)]
                    .iter()
                    .map(|&(m, copies)| {
                        let g = gemm_gflops(kern, m, k, n, copies);
                        format!("{g:.0} ({:.0}%)", 100.0 * g / peak)
                    })
                    .collect();
                println!(
                    "{:<22} {:>12} {:>12} {:>12} {:>12} {:>12}",
                    format!("{name} [{n}x{k}]"),
                    cells[0],
                    cells[1],
                    cells[2],
                    cells[3],
                    cells[4]
                );
            }
        }
    }
    if want("gemv") {
        println!();
        println!("GEMV (1 row, f16 weights), default model shapes:");
        println!(
            "{:<22} {:>10} {:>12} {:>10} {:>12} {:>10}",
            "shape [out x in]", "hot GB/s", "hot us", "DRAM GB/s", "DRAM us", "DRAM/bw"
        );
        let shapes = [
            ("q_proj/o_proj", 576, 576),
            ("k_proj/v_proj", 192, 576),
            ("gate/up_proj", 1536, 576),
            ("down_proj", 576, 1536),
            ("lm_head", 49152, 576),
        ];
        for (name, n, k) in shapes {
            let (hot, hot_us) = gemv_gbs(&kern, k, n, 1, 2000.min(2_000_000_000 / (n * k)));
            // Enough copies that the working set (~300 MB) exceeds every cache, as in decode.
            let copies = (300_000_000 / (n * k * 2)).max(2);
            let (cold, cold_us) = gemv_gbs(&kern, k, n, copies, 300);
            println!(
                "{:<22} {:>10.1} {:>12.1} {:>10.1} {:>12.1} {:>9.0}%",
                format!("{name} [{n}x{k}]"),
                hot,
                hot_us,
                cold,
                cold_us,
                100.0 * cold / bw
            );
        }
    }
    if want("levels") {
        println!();
        println!("GEMV gate_proj [1536x576], hot, by SIMD level (same bits at every level):");
        for level in SimdLevel::available() {
            let k = Kernels::new(level, kern.pool.clone());
            let (g, us) = gemv_gbs(&k, 576, 1536, 1, 500);
            println!("  {level:?}: {g:.1} GB/s ({us:.1} us)");
        }
    }
    if want("attention") {
        attention_bench(&kern, bw);
    }
    if !want("prefill") && !want("decode") && !want("decode64") {
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        println!("\ndefault model not found (scripts/fetch-default-model.sh); skipping the model");
        return;
    }
    let ck = Checkpoint::open(&path).expect("default model");
    let m = Model::<f16>::load(ck.config, &*ck.tensors, kern.clone()).expect("load");
    let c = m.config().clone();
    let weight_bytes = c.num_parameters() * 2;
    println!();
    for (mode, mk) in modes.iter().filter(|_| want("prefill")) {
        // Time to first token without HTTP: a 512-token prompt, logits of its last position.
        let m = m.with_kernels(mk.clone());
        let long: Vec<u32> = (0..512).map(|i| 100 + (i * 37) % 20000).collect();
        let mut times = Vec::new();
        for _ in 0..5 {
            let mut kv = ContiguousKv::<f16>::new(c.num_hidden_layers, c.kv_dim());
            let t0 = Instant::now();
            let l = m
                .forward(
                    &[Span {
                        seq: 0,
                        start_pos: 0,
                        tokens: &long,
                        logits: LogitsFor::Last,
                    }],
                    &mut kv,
                )
                .unwrap();
            times.push(t0.elapsed().as_secs_f64());
            std::hint::black_box(l);
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        // Projections of every layer (the LM head runs for one row only).
        let flops = 2.0 * 512.0 * (c.num_parameters() - c.vocab_size * c.hidden_size) as f64;
        println!(
            "prefill, default model f16, {mode} kernels, 512 tokens: {:.0} ms (median of 5); projections at {:.0} GFLOP/s overall = {:.0}% of the f32 FMA peak",
            t * 1e3,
            flops / t / 1e9,
            100.0 * flops / t / 1e9 / peak
        );
    }
    if want("decode64") {
        decode_batch_bench(&m, &kern, peak);
    }
    if !want("decode") {
        return;
    }
    let mut kv = ContiguousKv::<f16>::new(c.num_hidden_layers, c.kv_dim());
    let prompt: Vec<u32> = (0..16).map(|i| 100 + i * 31).collect();
    let logits = m
        .forward(
            &[Span {
                seq: 0,
                start_pos: 0,
                tokens: &prompt,
                logits: LogitsFor::Last,
            }],
            &mut kv,
        )
        .unwrap();
    let mut next = argmax(&logits);
    let steps = 256;
    let bw_before = read_bandwidth_gbs(&kern, 512 << 20, 3);
    let t0 = Instant::now();
    for i in 0..steps {
        let tok = [next];
        let l = m
            .forward(
                &[Span {
                    seq: 0,
                    start_pos: 16 + i,
                    tokens: &tok,
                    logits: LogitsFor::Last,
                }],
                &mut kv,
            )
            .unwrap();
        next = argmax(&l);
    }
    let dt = t0.elapsed().as_secs_f64() / steps as f64;
    let bw_after = read_bandwidth_gbs(&kern, 512 << 20, 3);
    let bw_now = bw_before.max(bw_after);
    let limit = bw_now * 1e9 / weight_bytes as f64;
    println!(
        "decode, default model f16, batch 1: {:.2} ms/token = {:.1} tokens/s",
        dt * 1e3,
        1.0 / dt
    );
    println!(
        "  weights {:.0} MB/token; bandwidth now {:.1} GB/s => limit {:.1} tokens/s; at {:.0}% of the limit",
        weight_bytes as f64 / 1e6,
        bw_now,
        limit,
        100.0 / dt / limit
    );
}

/// One decode step of 64 sequences, each with 160 positions cached (the engine bench's decode64
/// workload averages about that), through the model alone: no sampling, scheduler or HTTP.
/// K/V hold synthetic values; attention's cost depends only on the lengths.
fn decode_batch_bench(m: &Model<f16>, kern: &Kernels, peak: f64) {
    let c = m.config().clone();
    let (seqs, ctx, steps, bs) = (64usize, 160usize, 16usize, 16usize);
    let mut kv = PoolKv::new(c.num_hidden_layers, seqs, ctx + steps, c.kv_dim(), bs);
    for (i, (k, v)) in kv.keys.iter_mut().zip(kv.values.iter_mut()).enumerate() {
        *k = f16::from_f32(((i * 7) % 23) as f32 * 0.02 - 0.2);
        *v = f16::from_f32(((i * 5) % 19) as f32 * 0.03 - 0.25);
    }
    let mut tokens: Vec<[u32; 1]> = (0..seqs).map(|s| [100 + s as u32 * 13]).collect();
    let mut logits = Vec::new();
    let mut step = |pos: usize, tokens: &mut Vec<[u32; 1]>, logits: &mut Vec<f32>| {
        let spans: Vec<Span<'_>> = tokens
            .iter()
            .enumerate()
            .map(|(s, t)| Span {
                seq: s,
                start_pos: pos,
                tokens: t,
                logits: LogitsFor::Last,
            })
            .collect();
        m.forward_into(&spans, &mut kv, logits).unwrap();
        let v = c.vocab_size;
        let next: Vec<u32> = (0..seqs)
            .map(|s| argmax(&logits[s * v..(s + 1) * v]))
            .collect();
        for (t, n) in tokens.iter_mut().zip(next) {
            t[0] = n;
        }
    };
    step(ctx, &mut tokens, &mut logits);
    let t0 = Instant::now();
    for i in 1..steps {
        step(ctx + i, &mut tokens, &mut logits);
    }
    let dt = t0.elapsed().as_secs_f64() / (steps - 1) as f64;
    let peak_now = peak.max(peak_fma_gflops(kern, 3));
    let limit = peak_now * 1e9 / (2.0 * c.num_parameters() as f64);
    let tps = seqs as f64 / dt;
    println!(
        "\ndecode, default model f16, batch {seqs} at {ctx} positions (model alone): {:.1} ms/step = {tps:.0} tokens/s; FMA peak {peak_now:.0} GFLOP/s => compute limit {limit:.0} tokens/s; at {:.0}% of it",
        dt * 1e3,
        100.0 * tps / limit
    );
}

fn argmax(v: &[f32]) -> u32 {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap() as u32
}
