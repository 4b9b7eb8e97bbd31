//! Matrix products `y = x · Wᵀ (+ b)` with weights in Linear layout `[out, in]`.
//!
//! Each output element is one [`dot`](super::dot) by the striped definition, whatever tile
//! computes it; register tiles only let one weight load serve several activation rows. Work is
//! split over output columns, never over the reduction axis.

use super::dot::{dot_portable, LANES};
use super::{split_range, Kernels, SimdLevel};
use crate::dtype::Elem;

/// Weight rows per cache block: the block's weights stay in L2 while all rows stream past.
const COL_BLOCK: usize = 96;
/// Below this many multiply-adds a call runs on one thread (waking workers costs more).
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// What to do with each accumulated output element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Round to the weights' dtype (projections).
    Round,
    /// Keep f32 (logits).
    F32,
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint column ranges of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method call makes closures capture the whole wrapper (Sync), not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `out[r, j] = Σ_k x[r, k] · w[j, k] (+ bias[j])` for `m` rows, `k` inputs, `n` outputs.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Elem>(
    kern: &Kernels,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[T],
    n: usize,
    bias: Option<&[T]>,
    mode: Output,
    out: &mut [f32],
) {
    assert_eq!(
        x.len(),
        m * k,
        "matmul: x has {} values, expected {m}x{k}",
        x.len()
    );
    assert_eq!(
        w.len(),
        n * k,
        "matmul: w has {} values, expected {n}x{k}",
        w.len()
    );
    assert_eq!(
        out.len(),
        m * n,
        "matmul: out has {} values, expected {m}x{n}",
        out.len()
    );
    if let Some(b) = bias {
        assert_eq!(
            b.len(),
            n,
            "matmul: bias has {} values, expected {n}",
            b.len()
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    let threads = if m * n * k < PARALLEL_MIN_WORK {
        1
    } else {
        kern.pool.threads()
    };
    let ranges = split_range(n, threads, 8);
    let op = OutPtr(out.as_mut_ptr());
    let level = kern.level;
    let job = |t: usize| {
        let cols = ranges[t].clone();
        if cols.is_empty() {
            return;
        }
        // SAFETY: each thread writes only columns `cols` of every row.
        unsafe { matmul_cols(level, x, m, k, w, n, bias, mode, op.get(), cols) };
    };
    if threads == 1 {
        job(0);
    } else {
        kern.pool.run(&job);
    }
}

/// Computes columns `cols` of all rows.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_cols<T: Elem>(
    level: SimdLevel,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[T],
    n: usize,
    bias: Option<&[T]>,
    mode: Output,
    out: *mut f32,
    cols: std::ops::Range<usize>,
) {
    // Sums (+ bias) go out as f32; rounding to the run dtype is one vectorised pass below.
    let store = |r: usize, j: usize, acc: f32| {
        let v = match bias {
            Some(b) => acc + b[j].to_f32(),
            None => acc,
        };
        *out.add(r * n + j) = v;
    };
    let mut j0 = cols.start;
    while j0 < cols.end {
        let j1 = (j0 + COL_BLOCK).min(cols.end);
        match level {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => x86::block_avx512(x, m, k, w, j0..j1, &store),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => x86::block_avx2(x, m, k, w, j0..j1, &store),
            _ => {
                for r in 0..m {
                    let xr = &x[r * k..(r + 1) * k];
                    for j in j0..j1 {
                        store(r, j, dot_portable(xr, &w[j * k..(j + 1) * k]));
                    }
                }
            }
        }
        j0 = j1;
    }
    if mode == Output::Round {
        for r in 0..m {
            // SAFETY: this thread owns columns `cols` of every row.
            let row = std::slice::from_raw_parts_mut(out.add(r * n + cols.start), cols.len());
            super::round::round_in_place::<T>(level, row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
// Register tiles index accumulators by (row, column); iterator chains would hide that.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::super::dot::pad_tail;
    use super::super::dot::x86::{hsum256_pair, hsum512, load16_512, load8_256};
    use super::*;
    use std::arch::x86_64::*;

    /// Rows and columns of the AVX-512 register tile (24 accumulators).
    const MR512: usize = 4;
    const NR512: usize = 6;
    /// Rows and columns of the AVX2 register tile (4 accumulator pairs).
    const MR256: usize = 2;
    const NR256: usize = 2;

    pub(super) unsafe fn block_avx512<T: Elem>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[T],
        cols: std::ops::Range<usize>,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut r = 0;
        while r + MR512 <= m {
            cols_avx512::<T, MR512>(x, r, k, w, cols.clone(), store);
            r += MR512;
        }
        while r < m {
            cols_avx512::<T, 1>(x, r, k, w, cols.clone(), store);
            r += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn cols_avx512<T: Elem, const MR: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        cols: std::ops::Range<usize>,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut j = cols.start;
        while j + NR512 <= cols.end {
            let acc = tile512::<T, MR, NR512>(x, r0, k, w, j);
            for (dr, row) in acc.iter().enumerate() {
                for (dj, &v) in row.iter().enumerate() {
                    store(r0 + dr, j + dj, v);
                }
            }
            j += NR512;
        }
        while j < cols.end {
            let acc = tile512::<T, MR, 1>(x, r0, k, w, j);
            for (dr, row) in acc.iter().enumerate() {
                store(r0 + dr, j, row[0]);
            }
            j += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn tile512<T: Elem, const MR: usize, const NR: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        j0: usize,
    ) -> [[f32; NR]; MR] {
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let xp = x.as_ptr().add(r0 * k);
        let wp = w.as_ptr().add(j0 * k);
        let full = k - k % LANES;
        let mut c = 0;
        while c < full {
            let mut xv = [_mm512_setzero_ps(); MR];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add(r * k + c));
            }
            for j in 0..NR {
                let wv = load16_512(wp.add(j * k + c));
                for r in 0..MR {
                    acc[r][j] = _mm512_fmadd_ps(xv[r], wv, acc[r][j]);
                }
            }
            c += LANES;
        }
        if full < k {
            for j in 0..NR {
                let wr = &w[(j0 + j) * k..(j0 + j + 1) * k];
                for r in 0..MR {
                    let xr = &x[(r0 + r) * k..(r0 + r + 1) * k];
                    let (xb, wb) = pad_tail(xr, wr, full);
                    acc[r][j] = _mm512_fmadd_ps(
                        _mm512_loadu_ps(xb.as_ptr()),
                        _mm512_loadu_ps(wb.as_ptr()),
                        acc[r][j],
                    );
                }
            }
        }
        let mut out = [[0f32; NR]; MR];
        for r in 0..MR {
            for j in 0..NR {
                out[r][j] = hsum512(acc[r][j]);
            }
        }
        out
    }

    pub(super) unsafe fn block_avx2<T: Elem>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[T],
        cols: std::ops::Range<usize>,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut r = 0;
        while r + MR256 <= m {
            cols_avx2::<T, MR256>(x, r, k, w, cols.clone(), store);
            r += MR256;
        }
        while r < m {
            cols_avx2::<T, 1>(x, r, k, w, cols.clone(), store);
            r += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn cols_avx2<T: Elem, const MR: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        cols: std::ops::Range<usize>,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut j = cols.start;
        while j + NR256 <= cols.end {
            let acc = tile256::<T, MR, NR256>(x, r0, k, w, j);
            for (dr, row) in acc.iter().enumerate() {
                for (dj, &v) in row.iter().enumerate() {
                    store(r0 + dr, j + dj, v);
                }
            }
            j += NR256;
        }
        while j < cols.end {
            let acc = tile256::<T, MR, 1>(x, r0, k, w, j);
            for (dr, row) in acc.iter().enumerate() {
                store(r0 + dr, j, row[0]);
            }
            j += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile256<T: Elem, const MR: usize, const NR: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        j0: usize,
    ) -> [[f32; NR]; MR] {
        let mut lo = [[_mm256_setzero_ps(); NR]; MR];
        let mut hi = [[_mm256_setzero_ps(); NR]; MR];
        let xp = x.as_ptr().add(r0 * k);
        let wp = w.as_ptr().add(j0 * k);
        let full = k - k % LANES;
        let mut c = 0;
        while c < full {
            let mut xl = [_mm256_setzero_ps(); MR];
            let mut xh = [_mm256_setzero_ps(); MR];
            for r in 0..MR {
                xl[r] = _mm256_loadu_ps(xp.add(r * k + c));
                xh[r] = _mm256_loadu_ps(xp.add(r * k + c + 8));
            }
            for j in 0..NR {
                let wl = load8_256(wp.add(j * k + c));
                let wh = load8_256(wp.add(j * k + c + 8));
                for r in 0..MR {
                    lo[r][j] = _mm256_fmadd_ps(xl[r], wl, lo[r][j]);
                    hi[r][j] = _mm256_fmadd_ps(xh[r], wh, hi[r][j]);
                }
            }
            c += LANES;
        }
        if full < k {
            for j in 0..NR {
                let wr = &w[(j0 + j) * k..(j0 + j + 1) * k];
                for r in 0..MR {
                    let xr = &x[(r0 + r) * k..(r0 + r + 1) * k];
                    let (xb, wb) = pad_tail(xr, wr, full);
                    lo[r][j] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xb.as_ptr()),
                        _mm256_loadu_ps(wb.as_ptr()),
                        lo[r][j],
                    );
                    hi[r][j] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xb.as_ptr().add(8)),
                        _mm256_loadu_ps(wb.as_ptr().add(8)),
                        hi[r][j],
                    );
                }
            }
        }
        let mut out = [[0f32; NR]; MR];
        for r in 0..MR {
            for j in 0..NR {
                out[r][j] = hsum256_pair(lo[r][j], hi[r][j]);
            }
        }
        out
    }
}
