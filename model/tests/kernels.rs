//! Each kernel against a naive f64 reference, for f32, f16 and bf16 storage, at odd sizes, and
//! bitwise agreement of every SIMD level and thread count.

mod common;

use half::{bf16, f16};
use halfstep_model::dtype::to_elems;
use halfstep_model::kernels::act::silu_gate;
use halfstep_model::kernels::attention::{attention, AttentionShape};
use halfstep_model::kernels::dot::dot;
use halfstep_model::kernels::gemm::{matmul, matmul_gate_up, matmul_many, Output, Proj};
use halfstep_model::kernels::math::silu;
use halfstep_model::kernels::norm::{residual_norm, rms_norm};
use halfstep_model::kernels::rope::Rope;
use halfstep_model::kernels::softmax::{log_softmax, softmax_in_place};
use halfstep_model::{ContiguousKv, Elem, KernelMode, Kernels, KvCache, PagedKv, SimdLevel};

/// Unit roundoff of the storage type.
fn unit<T: Elem>() -> f64 {
    match T::DTYPE {
        halfstep_model::DType::Float16 => 2f64.powi(-11),
        halfstep_model::DType::Bfloat16 => 2f64.powi(-8),
        halfstep_model::DType::Float32 => 2f64.powi(-24),
    }
}

fn rounded<T: Elem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::round(x)).collect()
}

fn matmul_matches_reference<T: Elem>() {
    // Odd sizes exercise the tails of the 16-lane stripes and of the register tiles.
    for &(m, k, n) in &[
        (1, 1, 1),
        (3, 17, 5),
        (5, 31, 13),
        (7, 100, 29),
        (64, 72, 40),
    ] {
        let x = rounded::<T>(&common::values(1, m * k));
        let w: Vec<T> = to_elems(&common::values(2, n * k));
        let b: Vec<T> = to_elems(&common::values(3, n));
        for level in SimdLevel::available() {
            for threads in [1, 2] {
                let kern = Kernels::with_threads(level, threads);
                for (bias, mode) in [(None, Output::F32), (Some(&b[..]), Output::Round)] {
                    let mut out = vec![0f32; m * n];
                    matmul(&kern, &x, m, k, &w, n, bias, mode, &mut out);
                    for r in 0..m {
                        for j in 0..n {
                            let (mut want, mut mag) = (0f64, 0f64);
                            for i in 0..k {
                                let p = x[r * k + i] as f64 * w[j * k + i].to_f32() as f64;
                                want += p;
                                mag += p.abs();
                            }
                            if let Some(b) = bias {
                                want += b[j].to_f32() as f64;
                                mag += b[j].to_f32().abs() as f64;
                            }
                            let round = if mode == Output::Round {
                                unit::<T>()
                            } else {
                                0.0
                            };
                            let tol = round * want.abs() * 1.01 + (k as f64 + 2.0) * 6e-8 * mag;
                            let got = out[r * n + j] as f64;
                            assert!(
                                (got - want).abs() <= tol + 1e-30,
                                "{:?} {level:?} m{m} k{k} n{n} [{r},{j}]: {got} vs {want}",
                                T::DTYPE
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn matmul_matches_f64_reference_f32() {
    matmul_matches_reference::<f32>();
}
#[test]
fn matmul_matches_f64_reference_f16() {
    matmul_matches_reference::<f16>();
}
#[test]
fn matmul_matches_f64_reference_bf16() {
    matmul_matches_reference::<bf16>();
}

fn matmul_bits_independent_of_level_threads_and_batch<T: Elem>() {
    let (k, n) = (157, 83);
    let rows = 37;
    let x = rounded::<T>(&common::values(4, rows * k));
    let w: Vec<T> = to_elems(&common::values(5, n * k));
    let b: Vec<T> = to_elems(&common::values(9, n));
    // Plain f32 sums, and sums with a bias rounded to T (the paths store and round in their
    // own epilogues).
    for (bias, mode) in [(None, Output::F32), (Some(&b[..]), Output::Round)] {
        let reference = {
            let kern = Kernels::with_threads(SimdLevel::Portable, 1);
            let mut out = vec![0f32; rows * n];
            matmul(&kern, &x, rows, k, &w, n, bias, mode, &mut out);
            out
        };
        for level in SimdLevel::available() {
            for threads in [1, 2, 3] {
                let kern = Kernels::with_threads(level, threads);
                // Every prefix length of the batch: row r's bits must not depend on batch size.
                for m in [1, 2, 3, 4, 5, 9, 17, 21, 24, 37] {
                    let mut out = vec![0f32; m * n];
                    matmul(&kern, &x[..m * k], m, k, &w, n, bias, mode, &mut out);
                    for (i, (a, b)) in out.iter().zip(&reference).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{level:?} t{threads} m{m} {mode:?} elem {i}"
                        );
                    }
                }
                // A single row placed last in a batch equals the row alone.
                let mut alone = vec![0f32; n];
                matmul(&kern, &x[36 * k..], 1, k, &w, n, bias, mode, &mut alone);
                assert_eq!(alone, reference[36 * n..]);
            }
        }
    }
}

#[test]
fn matmul_bits_hold_across_row_blocks_of_long_reductions() {
    // k = 4100 makes the wide-panel path walk 70 rows (18 tiles) in blocks of a few tiles (3
    // with a 1 MiB L2, 7 with 2 MiB), the last one short, in 6 k-blocks.
    let (m, k, n) = (70, 4100, 13);
    let x = rounded::<f16>(&common::values(6, m * k));
    let w: Vec<f16> = to_elems(&common::values(7, n * k));
    let b: Vec<f16> = to_elems(&common::values(8, n));
    let mut first: Option<Vec<f32>> = None;
    for level in SimdLevel::available() {
        for threads in [1, 2] {
            let kern = Kernels::with_threads(level, threads);
            let mut out = vec![0f32; m * n];
            matmul(&kern, &x, m, k, &w, n, Some(&b), Output::Round, &mut out);
            match &first {
                None => first = Some(out),
                Some(f) => assert_eq!(f, &out, "{level:?} t{threads}"),
            }
        }
    }
    // Row 69 alone (the one-row path) equals row 69 of the batch.
    let kern = Kernels::with_threads(SimdLevel::detect(), 2);
    let mut alone = vec![0f32; n];
    matmul(
        &kern,
        &x[69 * k..],
        1,
        k,
        &w,
        n,
        Some(&b),
        Output::Round,
        &mut alone,
    );
    assert_eq!(alone, first.unwrap()[69 * n..]);
}

#[test]
fn matmul_bits_do_not_depend_on_level_threads_or_batch_f16() {
    matmul_bits_independent_of_level_threads_and_batch::<f16>();
}
#[test]
fn matmul_bits_do_not_depend_on_level_threads_or_batch_bf16() {
    matmul_bits_independent_of_level_threads_and_batch::<bf16>();
}
#[test]
fn matmul_bits_do_not_depend_on_level_threads_or_batch_f32() {
    matmul_bits_independent_of_level_threads_and_batch::<f32>();
}

/// `--kernels fast` (AMX tiles where present, else the parity kernels): close to the f64
/// reference and to parity after rounding, and row bits independent of the batch and the
/// thread count.
fn fast_matmul_checks<T: Elem>() {
    let fast =
        |threads| Kernels::with_threads(SimdLevel::detect(), threads).with_mode(KernelMode::Fast);
    // 16 rows and up take the tile path; odd sizes exercise row, column and k padding.
    for &(m, k, n) in &[
        (16, 31, 13),
        (17, 40, 33),
        (33, 100, 29),
        (64, 576, 70),
        (20, 1100, 7),
    ] {
        let x = rounded::<T>(&common::values(11, m * k));
        let w: Vec<T> = to_elems(&common::values(12, n * k));
        let b: Vec<T> = to_elems(&common::values(13, n));
        for threads in [1, 2] {
            let mut got = vec![0f32; m * n];
            matmul(
                &fast(threads),
                &x,
                m,
                k,
                &w,
                n,
                Some(&b),
                Output::F32,
                &mut got,
            );
            let mut rounded_fast = vec![0f32; m * n];
            matmul(
                &fast(threads),
                &x,
                m,
                k,
                &w,
                n,
                Some(&b),
                Output::Round,
                &mut rounded_fast,
            );
            let mut parity = vec![0f32; m * n];
            let kern = Kernels::with_threads(SimdLevel::detect(), threads);
            matmul(&kern, &x, m, k, &w, n, Some(&b), Output::Round, &mut parity);
            for r in 0..m {
                for j in 0..n {
                    let (mut want, mut mag) = (b[j].to_f32() as f64, b[j].to_f32().abs() as f64);
                    for i in 0..k {
                        let p = x[r * k + i] as f64 * w[j * k + i].to_f32() as f64;
                        want += p;
                        mag += p.abs();
                    }
                    // f32 accumulation, plus the dropped lo·lo products (below 2^-14 each).
                    let tol = (k as f64 + 2.0) * 6e-8 * mag + 2f64.powi(-14) * mag;
                    let at = r * n + j;
                    assert!(
                        (got[at] as f64 - want).abs() <= tol,
                        "{:?} m{m} k{k} n{n} t{threads} [{r},{j}]: {} vs {want}",
                        T::DTYPE,
                        got[at]
                    );
                    // Output::Round is the F32 output rounded to T, whichever pass rounds it.
                    assert_eq!(
                        rounded_fast[at].to_bits(),
                        T::round(got[at]).to_bits(),
                        "{:?} m{m} k{k} n{n} [{r},{j}]",
                        T::DTYPE
                    );
                    // Both sums are within `tol` of the exact one, then each rounding moves it by
                    // at most half an ulp.
                    let ulp = unit::<T>() * 2.0 * want.abs();
                    assert!(
                        (rounded_fast[at] as f64 - parity[at] as f64).abs() <= 2.0 * tol + ulp,
                        "{:?} m{m} k{k} n{n} [{r},{j}]: fast {} parity {}",
                        T::DTYPE,
                        rounded_fast[at],
                        parity[at]
                    );
                }
            }
        }
    }
    // Row bits do not depend on how many rows share the call or on the thread count.
    let (rows, k, n) = (37, 157, 83);
    let x = rounded::<T>(&common::values(14, rows * k));
    let w: Vec<T> = to_elems(&common::values(15, n * k));
    let mut reference = vec![0f32; rows * n];
    matmul(
        &fast(1),
        &x,
        rows,
        k,
        &w,
        n,
        None,
        Output::F32,
        &mut reference,
    );
    for threads in [1, 2, 3] {
        for m in [16, 17, 31, 32, 33, 37] {
            let mut out = vec![0f32; m * n];
            matmul(
                &fast(threads),
                &x[..m * k],
                m,
                k,
                &w,
                n,
                None,
                Output::F32,
                &mut out,
            );
            assert_eq!(out, reference[..m * n], "t{threads} m{m}");
        }
    }
    // Several projections in one call, over several groups of row tiles: every thread count
    // gives each projection the bits it gets alone on one thread.
    let (m, k) = (300, 70);
    let ns = [83, 40, 7];
    let x = rounded::<T>(&common::values(16, m * k));
    let ws: Vec<Vec<T>> = ns
        .iter()
        .zip(17..)
        .map(|(&n, seed)| to_elems(&common::values(seed, n * k)))
        .collect();
    let alone: Vec<Vec<f32>> = ns
        .iter()
        .zip(&ws)
        .map(|(&n, w)| {
            let mut out = vec![0f32; m * n];
            matmul(&fast(1), &x, m, k, w, n, None, Output::Round, &mut out);
            out
        })
        .collect();
    for threads in [1, 2, 3] {
        let mut outs: Vec<Vec<f32>> = ns.iter().map(|&n| vec![0f32; m * n]).collect();
        let mut projs: Vec<Proj<'_, T>> = ns
            .iter()
            .zip(&ws)
            .zip(outs.iter_mut())
            .map(|((&n, w), out)| Proj {
                w,
                n,
                bias: None,
                out,
            })
            .collect();
        matmul_many(&fast(threads), &x, m, k, &mut projs, Output::Round);
        assert_eq!(outs, alone, "t{threads}");
    }
}

/// The fused gate/up product gives the bits of the two projections followed by the gated
/// activation, in both kernel modes, on any thread count and row count (AMX gates the tiles as
/// it stores them; other paths gate afterwards).
fn gate_up_checks<T: Elem>() {
    let (k, n) = (70, 100);
    let wg: Vec<T> = to_elems(&common::values(21, n * k));
    let wu: Vec<T> = to_elems(&common::values(22, n * k));
    for mode in [KernelMode::Parity, KernelMode::Fast] {
        for threads in [1, 2, 3] {
            let kern = Kernels::with_threads(SimdLevel::detect(), threads).with_mode(mode);
            for m in [1, 5, 16, 64, 300] {
                let x = rounded::<T>(&common::values(20, m * k));
                let (mut g, mut u) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul_gate_up(&kern, &x, m, k, (&wg, &wu), n, &mut g, &mut u);
                let (mut wg_out, mut wu_out) = (vec![0f32; m * n], vec![0f32; m * n]);
                matmul(&kern, &x, m, k, &wg, n, None, Output::Round, &mut wg_out);
                matmul(&kern, &x, m, k, &wu, n, None, Output::Round, &mut wu_out);
                silu_gate::<T>(&kern, &mut wg_out, &wu_out);
                let what = format!("{:?} {mode:?} t{threads} m{m}", T::DTYPE);
                assert_eq!(u, wu_out, "{what}: up");
                assert_eq!(g, wg_out, "{what}: gated");
            }
        }
    }
}

#[test]
fn gate_up_is_the_projections_then_the_gated_activation() {
    gate_up_checks::<f16>();
    gate_up_checks::<bf16>();
    gate_up_checks::<f32>();
}

#[test]
fn fast_matmul_is_close_and_batch_invariant_f16() {
    fast_matmul_checks::<f16>();
}
#[test]
fn fast_matmul_is_close_and_batch_invariant_bf16() {
    fast_matmul_checks::<bf16>();
}
#[test]
fn fast_matmul_is_close_and_batch_invariant_f32() {
    fast_matmul_checks::<f32>();
}

#[test]
fn dot_is_identical_at_every_level() {
    for n in [0, 1, 15, 16, 17, 33, 64, 100, 1000] {
        let x = common::values(6, n);
        let w: Vec<f16> = to_elems(&common::values(7, n));
        let r = dot(SimdLevel::Portable, &x, &w);
        for level in SimdLevel::available() {
            assert_eq!(dot(level, &x, &w).to_bits(), r.to_bits(), "{level:?} n{n}");
        }
    }
}

fn rms_norm_matches_reference<T: Elem>() {
    for d in [1, 7, 72, 129] {
        let rows = 3;
        let x = rounded::<T>(&common::values(8, rows * d));
        let w: Vec<T> = to_elems(&common::values(9, d));
        for level in SimdLevel::available() {
            let mut out = vec![0f32; rows * d];
            rms_norm(level, &x, &w, 1e-5, &mut out);
            for r in 0..rows {
                let row = &x[r * d..(r + 1) * d];
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + 1e-5).sqrt();
                for i in 0..d {
                    let want = row[i] as f64 * inv * w[i].to_f32() as f64;
                    // Two roundings to T plus f32 error in the mean square.
                    let tol = want.abs() * (2.02 * unit::<T>() + 1e-6) + 1e-30;
                    let got = out[r * d + i] as f64;
                    assert!(
                        (got - want).abs() <= tol,
                        "{:?} d{d}: {got} vs {want}",
                        T::DTYPE
                    );
                }
            }
        }
    }
}

#[test]
fn rms_norm_matches_f64_reference() {
    rms_norm_matches_reference::<f32>();
    rms_norm_matches_reference::<f16>();
    rms_norm_matches_reference::<bf16>();
}

/// The residual add and norm that join two layers: h + add rounded to `T`, then rms_norm, per
/// row; the same bits whichever threads share the rows.
fn residual_norm_matches_reference<T: Elem>() {
    let d = 72;
    for rows in [1, 15, 16, 17, 40] {
        let h0 = rounded::<T>(&common::values(10, rows * d));
        let add = rounded::<T>(&common::values(11, rows * d));
        let w: Vec<T> = to_elems(&common::values(12, d));
        let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
        for threads in [1, 2, 3] {
            let kern = Kernels::with_threads(SimdLevel::detect(), threads);
            let (mut h, mut out) = (h0.clone(), vec![0f32; rows * d]);
            residual_norm(&kern, &mut h, Some(&add), &w, 1e-5, &mut out);
            for r in 0..rows {
                let span = r * d..(r + 1) * d;
                for i in span.clone() {
                    let want = (h0[i] as f64 + add[i] as f64) as f32;
                    assert_eq!(h[i], T::round(want), "{:?} rows {rows} h[{i}]", T::DTYPE);
                }
                let row = &h[span.clone()];
                let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + 1e-5).sqrt();
                for (i, &v) in row.iter().enumerate() {
                    let want = v as f64 * inv * w[i].to_f32() as f64;
                    let tol = want.abs() * (2.02 * unit::<T>() + 1e-6) + 1e-30;
                    let got = out[r * d + i] as f64;
                    assert!((got - want).abs() <= tol, "{:?}: {got} vs {want}", T::DTYPE);
                }
            }
            match &first {
                None => first = Some((h, out)),
                Some((h1, o1)) => {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&h), bits(h1), "rows {rows}, {threads} threads");
                    assert_eq!(bits(&out), bits(o1), "rows {rows}, {threads} threads");
                }
            }
        }
    }
}

#[test]
fn residual_norm_matches_f64_reference_on_any_thread_count() {
    residual_norm_matches_reference::<f32>();
    residual_norm_matches_reference::<f16>();
    residual_norm_matches_reference::<bf16>();
}

#[test]
fn rope_is_identical_at_every_level() {
    // Head widths 64 and 128 take the 16-lane path; 18 falls back to the scalar definition.
    for hd in [18, 64, 128] {
        let rope = Rope::new(hd, 10000.0, 300, None);
        for pos in [0, 1, 77, 299] {
            let x = rounded::<f16>(&common::values(40 + pos as u64, 5 * hd));
            let mut want = x.clone();
            rope.apply::<f16>(&mut want, pos);
            for level in SimdLevel::available() {
                let mut got = x.clone();
                rope.apply_at::<f16>(level, &mut got, pos);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "hd {hd} pos {pos} {level:?}");
            }
        }
    }
}

fn rope_matches_reference<T: Elem>() {
    let (hd, heads) = (18, 3);
    let rope = Rope::new(hd, 10000.0, 64, None);
    for pos in [0, 1, 17, 63] {
        let x = rounded::<T>(&common::values(10 + pos as u64, heads * hd));
        let mut y = x.clone();
        rope.apply::<T>(&mut y, pos);
        for h in 0..heads {
            for i in 0..hd / 2 {
                let f = 1.0 / 10000f64.powf(2.0 * i as f64 / hd as f64);
                let (c, s) = ((pos as f64 * f).cos(), (pos as f64 * f).sin());
                let (a, b) = (x[h * hd + i] as f64, x[h * hd + i + hd / 2] as f64);
                let want = [a * c - b * s, b * c + a * s];
                for (j, w) in want.iter().enumerate() {
                    let got = y[h * hd + i + j * hd / 2] as f64;
                    let tol = w.abs() * unit::<T>() * 1.01 + 4e-7 * (a.abs() + b.abs());
                    assert!(
                        (got - w).abs() <= tol,
                        "{:?} pos{pos}: {got} vs {w}",
                        T::DTYPE
                    );
                }
            }
        }
    }
}

#[test]
fn rope_matches_f64_reference() {
    rope_matches_reference::<f32>();
    rope_matches_reference::<f16>();
    rope_matches_reference::<bf16>();
}

#[test]
fn silu_gate_matches_reference() {
    for x in common::values(20, 500) {
        let x = x * 12.0;
        let want = x as f64 / (1.0 + (-(x as f64)).exp());
        let got = silu(x) as f64;
        assert!(
            (got - want).abs() <= 3e-7 * want.abs() + 1e-30,
            "{x}: {got} vs {want}"
        );
    }
}

#[test]
fn softmax_and_log_softmax_match_reference() {
    for n in [1, 5, 49, 1000] {
        let row: Vec<f32> = common::values(21, n).iter().map(|v| v * 30.0).collect();
        let m = row.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
        let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        let mut ls = vec![0f32; n];
        log_softmax(&row, &mut ls);
        let mut p = row.clone();
        softmax_in_place(&mut p);
        for i in 0..n {
            let want = row[i] as f64 - m - z.ln();
            assert!(
                (ls[i] as f64 - want).abs() <= 2e-5 * (1.0 + want.abs()),
                "n{n} {i}"
            );
            assert!((p[i] as f64 - want.exp()).abs() <= 1e-6 * (1.0 + want.exp()) * 4.0);
        }
    }
}

/// Naive causal attention in f64 for one query of one head.
fn attention_reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f64> {
    let hd = q.len();
    let scale = 1.0 / (hd as f64).sqrt();
    let s: Vec<f64> = keys
        .iter()
        .map(|k| {
            q.iter()
                .zip(k)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = s.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    (0..hd)
        .map(|d| e.iter().zip(values).map(|(p, v)| p / z * v[d] as f64).sum())
        .collect()
}

fn attention_matches_reference<T: Elem>(shape: AttentionShape, len: usize, positions: Vec<usize>) {
    let kvd = shape.n_kv_heads * shape.head_dim;
    let qd = shape.n_heads * shape.head_dim;
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let keys = rounded::<T>(&common::values(30, len * kvd));
    let vals = rounded::<T>(&common::values(31, len * kvd));
    let mut contiguous = ContiguousKv::<T>::new(1, kvd);
    let mut paged = PagedKv::<T>::new(1, kvd, 5);
    for p in 0..len {
        let k: Vec<T> = to_elems(&keys[p * kvd..(p + 1) * kvd]);
        let v: Vec<T> = to_elems(&vals[p * kvd..(p + 1) * kvd]);
        contiguous.write(0, 0, p, &k, &v);
        paged.write(0, 0, p, &k, &v);
    }
    // Queries at several positions of the one sequence.
    let q = rounded::<T>(&common::values(32, positions.len() * qd));
    let seqs = vec![0; positions.len()];
    let mut first: Option<Vec<f32>> = None;
    for level in SimdLevel::available() {
        for threads in [1, 2, 3] {
            let kern = Kernels::with_threads(level, threads);
            for store in [&contiguous as &dyn KvCache<T>, &paged as &dyn KvCache<T>] {
                let mut out = vec![0f32; positions.len() * qd];
                attention::<T>(&kern, shape, 0, &q, &seqs, &positions, store, &mut out);
                match &first {
                    None => first = Some(out.clone()),
                    Some(f) => assert_eq!(f, &out, "{level:?} t{threads}"),
                }
            }
        }
    }
    let out = first.unwrap();
    for (i, &pos) in positions.iter().enumerate() {
        for h in 0..shape.n_heads {
            let kvh = h / group;
            let ks: Vec<Vec<f32>> = (0..=pos)
                .map(|p| keys[p * kvd + kvh * hd..p * kvd + kvh * hd + hd].to_vec())
                .collect();
            let vs: Vec<Vec<f32>> = (0..=pos)
                .map(|p| vals[p * kvd + kvh * hd..p * kvd + kvh * hd + hd].to_vec())
                .collect();
            let want = attention_reference(&q[i * qd + h * hd..i * qd + h * hd + hd], &ks, &vs);
            for d in 0..hd {
                let got = out[i * qd + h * hd + d] as f64;
                let tol = want[d].abs() * unit::<T>() * 1.01 + 2e-6;
                assert!(
                    (got - want[d]).abs() <= tol,
                    "{:?} pos{pos} h{h} d{d}",
                    T::DTYPE
                );
            }
        }
    }
}

#[test]
fn attention_matches_reference_for_paged_and_contiguous_kv() {
    let shape = |n_heads, n_kv_heads, head_dim| AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
    };
    // Odd head widths and group sizes exercise the masked tails and the head/chunk passes of
    // the AVX-512 path; 9/3/64 is the default model's shape.
    let cases = [
        (shape(4, 2, 18), 23, vec![0, 4, 5, 22]),
        (shape(9, 3, 64), 70, vec![0, 15, 16, 17, 31, 69]),
        // Enough query tokens that work items are whole tokens, shared by several threads.
        (shape(9, 3, 64), 70, (0..70).step_by(5).collect()),
        (shape(8, 2, 128), 40, vec![3, 39]),
        (shape(10, 2, 80), 33, vec![0, 32]),
        (shape(3, 3, 16), 20, vec![19]),
        // One query token with enough work to share: every thread scores a range of its
        // positions, whose ends fall inside runs of the paged store.
        (shape(9, 3, 64), 300, vec![299]),
        (shape(8, 2, 128), 77, vec![76]),
        // A few tokens with long contexts: each shared by all threads, one after the other.
        (shape(9, 3, 64), 300, vec![130, 299]),
        (shape(9, 3, 64), 300, vec![100, 150, 200, 250, 299]),
        // A width off whole chunks keeps one item per (token, K/V head).
        (shape(10, 2, 80), 200, vec![199]),
    ];
    for (s, len, positions) in cases {
        attention_matches_reference::<f32>(s, len, positions.clone());
        attention_matches_reference::<f16>(s, len, positions.clone());
        attention_matches_reference::<bf16>(s, len, positions);
    }
}
