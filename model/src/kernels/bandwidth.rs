//! Measures the machine's memory read bandwidth, the yardstick of memory-bound decode.

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
