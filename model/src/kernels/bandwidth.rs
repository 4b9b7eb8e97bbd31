//! Measures the machine's memory read bandwidth and peak f32 multiply-add rate, the yardsticks
//! of memory-bound decode and compute-bound batching.

use super::Kernels;
use std::time::Instant;

/// Reads a `bytes`-sized buffer `reps` times on all pool threads and returns the best GB/s.
pub fn read_bandwidth_gbs(kern: &Kernels, bytes: usize, reps: usize) -> f64 {
    let n = bytes / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let threads = kern.pool.threads();
    let chunk = n.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..reps {
        let sums: Vec<std::sync::atomic::AtomicU64> =
            (0..threads).map(|_| Default::default()).collect();
        let t0 = Instant::now();
        kern.pool.run(&|t| {
            let part = &buf[(t * chunk).min(n)..((t + 1) * chunk).min(n)];
            sums[t].store(sum_u64(part), std::sync::atomic::Ordering::Relaxed);
        });
        let dt = t0.elapsed().as_secs_f64();
        std::hint::black_box(&sums);
        best = best.max(bytes as f64 / dt / 1e9);
    }
    best
}

/// Peak f32 fused-multiply-add rate of all pool threads together, in GFLOP/s (2 flops per FMA).
///
/// Each thread runs independent FMA chains in registers (no memory traffic); best of `reps`.
pub fn peak_fma_gflops(kern: &Kernels, reps: usize) -> f64 {
    const ITERS: u64 = 20_000_000;
    let threads = kern.pool.threads();
    let mut best = 0f64;
    for _ in 0..reps {
        let flops: Vec<std::sync::atomic::AtomicU64> =
            (0..threads).map(|_| Default::default()).collect();
        let t0 = Instant::now();
        kern.pool.run(&|t| {
            let f = fma_chains(ITERS / 8);
            flops[t].store(f, std::sync::atomic::Ordering::Relaxed);
        });
        let dt = t0.elapsed().as_secs_f64();
        let total: u64 = flops
            .iter()
            .map(|f| f.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        best = best.max(total as f64 / dt / 1e9);
    }
    best
}

/// Runs `iters` rounds of independent FMA chains and returns the flops done.
fn fma_chains(iters: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        return unsafe { fma_chains_avx512(iters) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are present.
        return unsafe { fma_chains_avx2(iters) };
    }
    let mut acc = [1f32; 8];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iters * 8 * 2
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn fma_chains_avx512(iters: u64) -> u64 {
    use std::arch::x86_64::*;
    // 12 chains cover the FMA latency (4 cycles) on two ports.
    let mut acc = [_mm512_set1_ps(1.0); 12];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    std::hint::black_box(acc);
    iters * 12 * 16 * 2
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: u64) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(1.0); 12];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    std::hint::black_box(acc);
    iters * 12 * 8 * 2
}

fn sum_u64(v: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present.
        return unsafe { sum_u64_avx512(v) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present.
        return unsafe { sum_u64_avx2(v) };
    }
    v.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_u64_avx2(v: &[u64]) -> u64 {
    // Eight independent lanes-of-4 sums so the loop is bound by loads, not by add latency.
    let mut acc = [0u64; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] = acc[i].wrapping_add(c[i]);
        }
    }
    acc.iter().chain(rest).fold(0u64, |a, &b| a.wrapping_add(b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_u64_avx512(v: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_si512(); 4];
    let chunks = v.chunks_exact(32);
    let rest = chunks.remainder();
    for c in chunks {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm512_add_epi64(*a, _mm512_loadu_si512(c.as_ptr().add(8 * i) as *const _));
        }
    }
    let mut lanes = [0u64; 8];
    let total = _mm512_add_epi64(
        _mm512_add_epi64(acc[0], acc[1]),
        _mm512_add_epi64(acc[2], acc[3]),
    );
    _mm512_storeu_si512(lanes.as_mut_ptr() as *mut _, total);
    lanes
        .iter()
        .chain(rest)
        .fold(0u64, |a, &b| a.wrapping_add(b))
}
