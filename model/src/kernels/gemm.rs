//! Matrix products `y = x · Wᵀ (+ b)` with weights in Linear layout `[out, in]`.
//!
//! Each output element is one [`dot`](super::dot) by the striped definition, whatever tile
//! computes it; register tiles only let one weight load serve several activation rows. Work is
//! split over output columns, never over the reduction axis.

use super::dot::{dot_portable, LANES};
use super::share::Shares;
use super::{Kernels, SharedOut, SimdLevel};
use crate::dtype::Elem;

/// Weight rows per cache block: the block's weights stay in L2 while all rows stream past.
const COL_BLOCK: usize = 96;
/// From this many rows on, the AVX-512 path sweeps every activation row past each 6-row weight
/// panel, 4 rows at a time (both operands read in place, or packed and widened first, see
/// `x86::in_place`).
const PACK_MIN_ROWS: usize = 16;
/// Columns of the wide-panel path's register tile.
const NR_PACKED: usize = 6;
/// Weight bytes a thread claims at a time on the one-row paths (bound by reading the weights).
/// Batch-1 decode on Zen 4, 12 alternating rounds of 24 tokens in one process, twice: 128 and
/// 256 KB about 2% less time per token than 32 and 64 KB.
const PIECE_BYTES: usize = 128 << 10;
/// Multiply-adds a thread claims at a time on the wide-panel paths, in at least
/// [`PIECE_MIN_COLS`] columns.
const PIECE_MACS: usize = 1 << 21;
/// Fewest columns a wide-panel thread claims at a time.
const PIECE_MIN_COLS: usize = 48;
/// Below this many multiply-adds a call runs on one thread (waking workers costs more).
const PARALLEL_MIN_WORK: usize = 1 << 15;
/// From this many rows on, `--kernels fast` runs products on AMX tiles (16 rows per tile;
/// fewer rows are bound by reading the weights, which the parity kernels already do at speed).
const AMX_MIN_ROWS: usize = 16;

/// What to do with each accumulated output element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Round to the weights' dtype (projections).
    Round,
    /// Keep f32 (logits).
    F32,
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
    matmul_many(kern, x, m, k, &mut [Proj { w, n, bias, out }], mode);
}

/// One projection of a [`matmul_many`] call: weights `[n, k]`, optional bias, `m × n` output.
pub struct Proj<'a, T: Elem> {
    /// Weights in Linear layout `[n, k]`.
    pub w: &'a [T],
    /// Output features.
    pub n: usize,
    /// Optional bias of length `n`.
    pub bias: Option<&'a [T]>,
    /// The `m × n` result.
    pub out: &'a mut [f32],
}

/// Several projections of the same input (q/k/v, gate/up) in one call: one dispatch to the
/// workers and one packing of `x`, with the threads splitting all output columns together.
/// Each result is bitwise what [`matmul`] gives for that projection alone.
pub fn matmul_many<T: Elem>(
    kern: &Kernels,
    x: &[f32],
    m: usize,
    k: usize,
    projs: &mut [Proj<'_, T>],
    mode: Output,
) {
    projections(kern, x, m, k, projs, mode, false);
}

/// The gate and up projections of a gated MLP, then `g = round(round(silu(g)) · u)` (as
/// PyTorch computes `act(gate) * up` in the run dtype); `u` keeps the up projection.
/// Bitwise [`matmul_many`] then [`silu_gate`](super::act::silu_gate). The AMX path gates each
/// tile of outputs as it is stored, on the thread that computed it.
#[allow(clippy::too_many_arguments)]
pub fn matmul_gate_up<T: Elem>(
    kern: &Kernels,
    x: &[f32],
    m: usize,
    k: usize,
    (wg, wu): (&[T], &[T]),
    n: usize,
    g: &mut [f32],
    u: &mut [f32],
) {
    let mut projs = [
        Proj {
            w: wg,
            n,
            bias: None,
            out: g,
        },
        Proj {
            w: wu,
            n,
            bias: None,
            out: u,
        },
    ];
    if !projections(kern, x, m, k, &mut projs, Output::Round, true) {
        super::act::silu_gate::<T>(kern, g, u);
    }
}

/// [`matmul_many`]; with `gated` (a gate/up pair), also gates the outputs where the path can
/// do it as it stores them, and says whether it did.
fn projections<T: Elem>(
    kern: &Kernels,
    x: &[f32],
    m: usize,
    k: usize,
    projs: &mut [Proj<'_, T>],
    mode: Output,
    gated: bool,
) -> bool {
    assert_eq!(
        x.len(),
        m * k,
        "matmul: x has {} values, expected {m}x{k}",
        x.len()
    );
    for p in projs.iter() {
        let n = p.n;
        assert_eq!(
            p.w.len(),
            n * k,
            "matmul: w has {} values, expected {n}x{k}",
            p.w.len()
        );
        assert_eq!(
            p.out.len(),
            m * n,
            "matmul: out has {} values, expected {m}x{n}",
            p.out.len()
        );
        if let Some(b) = p.bias {
            assert_eq!(
                b.len(),
                n,
                "matmul: bias has {} values, expected {n}",
                b.len()
            );
        }
    }
    if projs.len() > MAX_PROJS {
        for group in projs.chunks_mut(MAX_PROJS) {
            projections(kern, x, m, k, group, mode, false);
        }
        return false;
    }
    let total: usize = projs.iter().map(|p| p.n).sum();
    if m == 0 || total == 0 {
        return false;
    }
    // Each projection with the position of its columns among all the call's outputs, in an
    // array rather than a vector: a decode step allocates nothing.
    let mut slots: [Option<Part<'_, T>>; MAX_PROJS] = [None; MAX_PROJS];
    let mut first = 0;
    for (slot, p) in slots.iter_mut().zip(projs.iter_mut()) {
        *slot = Some(Part {
            w: p.w,
            n: p.n,
            bias: p.bias,
            out: SharedOut::new(p.out),
            first,
        });
        first += p.n;
    }
    let parts = &slots[..projs.len()];
    let threads = if m * total * k < PARALLEL_MIN_WORK {
        1
    } else {
        kern.pool.threads()
    };
    let level = kern.level;
    #[cfg(target_arch = "x86_64")]
    let packed =
        level == SimdLevel::Avx512 && m >= PACK_MIN_ROWS && T::KIND != crate::dtype::ElemKind::F32;
    #[cfg(not(target_arch = "x86_64"))]
    let packed = false;
    #[cfg(target_arch = "x86_64")]
    let amx = kern.fast
        && m >= AMX_MIN_ROWS
        && k > 0
        && T::KIND != crate::dtype::ElemKind::F32
        && super::amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    let amx = false;
    // Every path but AMX gives each thread an even contiguous share of the columns, walked in
    // pieces, and a thread whose share is done takes over the back half of a slower one's (see
    // `share`). Each thread still streams forward ranges of weights, which the prefetchers
    // follow best: measured with 2 threads on Sapphire Rapids, ranges handed out from a shared
    // counter (half an even share of what is left, at least 24 columns) cost batch-1 decode
    // 3-4% per token against fixed even shares, and compute-bound calls 3-5%. Taking over only
    // the tail, on Zen 4, batch-1 decode (one binary, 12 alternating rounds of 24 tokens): the
    // caller's wait for the other thread went from 600-700 to 320-390 µs per token, 1-4% less
    // time per token. The AMX path hands out panels itself (see `amx::Panels`).
    let piece = if m < PACK_MIN_ROWS {
        (PIECE_BYTES / (k * std::mem::size_of::<T>()).max(1)).max(1)
    } else {
        (PIECE_MACS / (m * k).max(1)).max(PIECE_MIN_COLS)
    };
    let shares = Shares::new(total, threads, piece, NR_PACKED);
    // Calls `f(projection, local columns)` for each piece of every range thread `t` takes.
    let pieces = |t: usize, f: &mut dyn FnMut(&Part<'_, T>, std::ops::Range<usize>)| {
        while let Some(g) = shares.next(t) {
            for p in parts.iter().flatten() {
                let (a, b) = (g.start.max(p.first), g.end.min(p.first + p.n));
                if a < b {
                    f(p, a - p.first..b - p.first);
                }
            }
        }
    };
    #[cfg(target_arch = "x86_64")]
    if amx {
        super::amx::XTILES.with(|cell| {
            let mut xt = cell.borrow_mut();
            let len = super::amx::packed_len(m, k);
            // Grows only: packing writes every tile.
            if xt.len() < len {
                xt.resize(len, Default::default());
            }
            // Both threads pack a share of the row blocks, then both compute.
            let dst = SharedOut::new(&mut xt[..len]);
            let blocks = m.div_ceil(16);
            let per = blocks.div_ceil(threads);
            let pack = |t: usize| {
                let mine = (t * per).min(blocks)..((t + 1) * per).min(blocks);
                // SAFETY: `amx` implies the AMX path's features; threads write disjoint blocks.
                unsafe { super::amx::pack_x(x, m, k, mine, dst.get()) };
            };
            run_on(kern, threads, &pack);
            let xt = &xt[..len];
            // Outputs are rounded as the tiles are stored, not in a second pass.
            let round = match (mode, T::KIND) {
                (Output::F32, _) => super::amx::StoreRound::None,
                (Output::Round, crate::dtype::ElemKind::F16) => super::amx::StoreRound::F16,
                (Output::Round, _) => super::amx::StoreRound::Elem(level),
            };
            let amx_parts: Vec<super::amx::Part<'_, T>> = parts
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, p)| super::amx::Part {
                    w: p.w,
                    n: p.n,
                    bias: p.bias,
                    out: p.out,
                    gate: parts[0].filter(|_| gated && i == 1).map(|g| g.out),
                })
                .collect();
            let panels =
                super::amx::Panels::new(parts.iter().flatten().map(|p| p.n), m, threads, gated);
            let job = |t: usize| {
                // SAFETY: threads write only the panels they take from `panels`.
                unsafe {
                    super::amx::matmul_panels(xt, m, k, &amx_parts, &panels, t, round);
                }
            };
            run_on(kern, threads, &job);
        });
        return gated;
    }
    #[cfg(target_arch = "x86_64")]
    if packed {
        XPACK.with(|cell| {
            let mut xpk = cell.borrow_mut();
            let acts = if x86::in_place() && k.is_multiple_of(LANES) {
                x86::Acts::InPlace(x)
            } else {
                // SAFETY: `packed` implies AVX-512.
                unsafe { pack_rows(x, m, k, &mut xpk) };
                x86::Acts::Packed(&xpk[..])
            };
            let job = |t: usize| {
                pieces(t, &mut |p, cols| {
                    // SAFETY: each thread writes only its columns of every row; AVX-512 is
                    // available at this level.
                    unsafe {
                        let sink = x86::Sink {
                            out: p.out.get(),
                            n: p.n,
                            m,
                            bias: p.bias,
                            round: mode == Output::Round,
                        };
                        x86::packed_avx512(acts, m, k, p.w, cols, &sink);
                    }
                });
            };
            run_on(kern, threads, &job);
        });
        return false;
    }
    let job = |t: usize| {
        pieces(t, &mut |p, cols| {
            // SAFETY: each thread writes only its columns of every row.
            unsafe { matmul_cols(level, x, m, k, p.w, p.n, p.bias, mode, p.out.get(), cols) };
        });
    };
    run_on(kern, threads, &job);
    false
}

/// Runs `job` on the calling thread alone when `threads` is 1, else on every pool thread.
fn run_on(kern: &Kernels, threads: usize, job: &(dyn Fn(usize) + Sync)) {
    if threads == 1 {
        job(0);
    } else {
        kern.pool.run(job);
    }
}

/// Projections one call of [`matmul_many`] shares out at once; more are done in groups.
const MAX_PROJS: usize = 4;

/// A projection of [`matmul_many`] as the worker threads see it.
#[derive(Clone, Copy)]
struct Part<'a, T: Elem> {
    w: &'a [T],
    n: usize,
    bias: Option<&'a [T]>,
    /// Threads write disjoint column ranges of it.
    out: SharedOut,
    /// First column of this projection among all the call's output columns.
    first: usize,
}

/// 16 f32 values on a cache line of their own, so every load of a packed operand is aligned.
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct Chunk([f32; LANES]);

thread_local! {
    /// The calling thread's packed activations, reused across calls (no per-call allocation).
    static XPACK: std::cell::RefCell<Vec<Chunk>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows of a register tile on the wide-panel path.
const PACK_MR: usize = 4;

/// Packs `x` (m × k) as tiles of 4 rows: chunk `(tile · kc + c) · 4 + r` holds lanes
/// `16c..16c+16` of row `4·tile + r`, zero-padded in k and in rows, so the 4 rows of a tile
/// stream from one sequential run of memory.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows(x: &[f32], m: usize, k: usize, xpk: &mut Vec<Chunk>) {
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_store_ps};
    let kc = k.div_ceil(LANES);
    let tiles = m.div_ceil(PACK_MR);
    // Grows only: every chunk is written below, so reuse needs no clearing.
    if xpk.len() < tiles * kc * PACK_MR {
        xpk.resize(tiles * kc * PACK_MR, Chunk::default());
    }
    // The packed buffer is written in order, a whole line a store: written piecemeal (16-byte
    // moves, row by row) each line waited on its read-for-ownership.
    let full = k / LANES;
    let mut dst = xpk.as_mut_ptr();
    for tile in 0..tiles {
        let r0 = tile * PACK_MR;
        if r0 + PACK_MR <= m {
            let src = x.as_ptr().add(r0 * k);
            for c in 0..full {
                for rr in 0..PACK_MR {
                    let v = _mm512_loadu_ps(src.add(rr * k + c * LANES));
                    _mm512_store_ps((*dst).0.as_mut_ptr(), v);
                    dst = dst.add(1);
                }
            }
        }
        let first = if r0 + PACK_MR <= m { full } else { 0 };
        for c in first..kc {
            for rr in 0..PACK_MR {
                // Chunks with padding: past the end of k or past the last row.
                let mut chunk = [0f32; LANES];
                let (r, a, b) = (r0 + rr, c * LANES, ((c + 1) * LANES).min(k));
                if r < m {
                    chunk[..b - a].copy_from_slice(&x[r * k + a..r * k + b]);
                }
                (*dst).0 = chunk;
                dst = dst.add(1);
            }
        }
    }
}

/// The epilogue of every path: sum (+ bias) stored as f32 at (row, column).
fn store_fn<T: Elem>(
    bias: Option<&[T]>,
    out: *mut f32,
    n: usize,
) -> impl Fn(usize, usize, f32) + '_ {
    move |r, j, acc| {
        let v = match bias {
            Some(b) => acc + b[j].to_f32(),
            None => acc,
        };
        // SAFETY: callers pass in-bounds (row, column) pairs of columns they own.
        unsafe { *out.add(r * n + j) = v };
    }
}

/// Rounds columns `cols` of every row to the run dtype when `mode` asks for it.
///
/// # Safety
/// The caller owns columns `cols` of the m × n output at `out`.
unsafe fn round_cols<T: Elem>(
    level: SimdLevel,
    mode: Output,
    out: *mut f32,
    m: usize,
    n: usize,
    cols: std::ops::Range<usize>,
) {
    if mode == Output::Round {
        for r in 0..m {
            let row = std::slice::from_raw_parts_mut(out.add(r * n + cols.start), cols.len());
            super::round::round_in_place::<T>(level, row);
        }
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
    let store = store_fn(bias, out, n);
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && cols.start < cols.end {
        // The tiles prefetch their successors; the first one of a range has no predecessor,
        // so ask for all its lines at once rather than one miss at a time.
        let first = &w[cols.start * k..(cols.start + 6).min(cols.end) * k];
        let bytes = std::mem::size_of_val(first);
        let p = first.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                p.wrapping_add(off),
            );
        }
    }
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
    round_cols::<T>(level, mode, out, m, n, cols);
}

#[cfg(target_arch = "x86_64")]
// Register tiles index accumulators by (row, column); iterator chains would hide that.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::super::dot::pad_tail;
    use super::super::dot::x86::{
        hsum256_pair, hsum512, load16_512, load8_256, reduce16x16, round_f16_512,
    };
    use super::*;
    use crate::dtype::ElemKind;
    use std::arch::x86_64::*;

    /// Rows and columns of the AVX-512 register tile (24 accumulators).
    const MR512: usize = 4;
    const NR512: usize = 6;
    /// Rows and columns of the AVX2 register tile for the 2 or 3 rows left after the 4-row
    /// tiles (4 accumulator pairs).
    const MR256: usize = 2;
    const NR256: usize = 2;
    /// How far ahead an AVX2 one-row product asks for weights, in bytes: it reads one weight
    /// row after the other, so this runs ahead into the following rows. Measured on Zen 3 from
    /// DRAM (2 threads): 2.3–3.5 KB ahead reached 85–90% of a plain sequential read, none 72%.
    /// (On Zen 4 the AVX-512 stream is faster without it, see `tile512`.)
    const PF_ONE_BYTES: usize = 3456;

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
        let stream = one_row_stream();
        while r < m {
            one_row_avx512::<T>(x, r, k, w, cols.clone(), store, stream);
            r += 1;
        }
    }

    /// Whether one-row AVX-512 products read the weights as one stream rather than in column
    /// tiles: on AMD CPUs, unless `HALFSTEP_ONE_ROW` says `stream` or `tiles`.
    ///
    /// Both give the same bits; they differ in how the CPU's prefetchers take the reads. Batch-1
    /// decode from DRAM (2 threads, default model): on Zen 4 the single stream reached 79–92% of
    /// the bandwidth limit against 52% for 6-column tiles; on Sapphire Rapids the tiles reached
    /// 79–84% against 65–66% (and about the same as a stream that also prefetches 16–27 KB
    /// ahead into L2).
    pub(super) fn one_row_stream() -> bool {
        static STREAM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *STREAM.get_or_init(|| match std::env::var("HALFSTEP_ONE_ROW").as_deref() {
            Ok("stream") => true,
            Ok("tiles") => false,
            _ => is_amd(),
        })
    }

    /// Whether the wide-panel path reads both operands in place (activation rows as given,
    /// f16/bf16 weights as stored, converted in the inner loop) rather than packing the
    /// activations and widening each weight panel to f32 first: on AMD CPUs, unless
    /// `HALFSTEP_PANEL` says `in-place` or `packed`.
    ///
    /// Both give the same bits (the conversion is exact, the adds are the same). On Zen 4 the
    /// conversions run beside the multiply-adds and four row streams load as fast as one: in a
    /// standalone loop a 4 × 6 tile converting its 6 weight vectors per 24 multiply-adds, from
    /// row-major activations in L2, ran at 96–98% of the register-only FMA peak, as fast as
    /// with packed f32 operands, so packing and widening (7% and, serial on the caller, 2–4% of
    /// 64-stream decode) were pure cost. On Sapphire Rapids the conversions share ports with
    /// the multiply-adds.
    pub(super) fn in_place() -> bool {
        static IN_PLACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *IN_PLACE.get_or_init(|| match std::env::var("HALFSTEP_PANEL").as_deref() {
            Ok("in-place") => true,
            Ok("packed") => false,
            _ => is_amd(),
        })
    }

    /// The activations of the wide-panel path.
    #[derive(Clone, Copy)]
    pub(super) enum Acts<'a> {
        /// The `m × k` rows as given, `k` whole chunks; weights are then read as stored too.
        InPlace(&'a [f32]),
        /// Packed by [`pack_rows`]; weight panels are then widened to f32.
        Packed(&'a [Chunk]),
    }

    impl Acts<'_> {
        /// Where row `r` of tile `t` starts and how many f32 separate its chunks (rows past
        /// `m` repeat the last row: their sums are never stored).
        // Called for every tile of every panel: a call of its own showed at 1% of decode.
        #[inline(always)]
        fn row(&self, t: usize, r: usize, m: usize, k: usize) -> (*const f32, usize) {
            match *self {
                Acts::InPlace(x) => {
                    let row = (t * PACK_MR + r).min(m - 1);
                    (x[row * k..].as_ptr(), LANES)
                }
                Acts::Packed(xpk) => {
                    let kc = k.div_ceil(LANES);
                    let tile = &xpk[t * kc * PACK_MR..(t + 1) * kc * PACK_MR];
                    (tile[r..].as_ptr() as *const f32, PACK_MR * LANES)
                }
            }
        }
    }

    /// The size of one core's L2 cache in bytes (CPUID leaf 0x8000_0006, which AMD and Intel
    /// both give; 1 MiB where it is missing).
    fn l2_bytes() -> usize {
        static L2: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *L2.get_or_init(|| {
            // SAFETY: CPUID exists on every x86_64 CPU; leaf 0x8000_0000 gives the highest
            // extended leaf, checked before 0x8000_0006 is read.
            #[allow(unused_unsafe)]
            let kib = unsafe {
                if __cpuid(0x8000_0000).eax >= 0x8000_0006 {
                    (__cpuid(0x8000_0006).ecx >> 16) as usize
                } else {
                    0
                }
            };
            if kib == 0 {
                1 << 20
            } else {
                kib << 10
            }
        })
    }

    /// Whether the CPU's vendor string is "AuthenticAMD".
    fn is_amd() -> bool {
        // SAFETY: CPUID leaf 0 exists on every x86_64 CPU.
        #[allow(unused_unsafe)]
        let id = unsafe { __cpuid(0) };
        // The vendor string is split over ebx, edx, ecx.
        (id.ebx, id.edx, id.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163)
    }

    /// Columns `cols` of row `r0`, one column at a time (`stream`) or in column tiles.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn one_row_avx512<T: Elem>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        cols: std::ops::Range<usize>,
        store: &impl Fn(usize, usize, f32),
        stream: bool,
    ) {
        if !stream {
            return cols_avx512::<T, 1>(x, r0, k, w, cols, store);
        }
        for j in cols {
            let acc = tile512::<T, 1, 1>(x, r0, k, w, j);
            store(r0, j, acc[0][0]);
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
        // A one-row product that reads one weight row after the other as a single stream (see
        // `one_row_stream`) leaves the reads to the hardware prefetchers: on Zen 4, asking for
        // the line 3.4 KB ahead (as the AVX2 path does) made batch-1 decode 6-10% slower (one
        // binary, 12 alternating rounds of 24 tokens, 11 of 12 won without it; a standalone
        // loop over the model's matrices with 2 threads agreed). Two or four such streams side
        // by side (halves or quarters of a piece's columns, to hide the accumulator's FMA
        // latency) were 2-15% slower than one. Column tiles read NR rows interleaved; on Zen 4
        // that pattern read DRAM at about 20 GB/s against 50 for one stream, whatever was
        // prefetched (measured with 2 threads on the default model's matrices), which is why
        // decode there does not use them.
        //
        // Column tiles prefetch the next tile's weights once per row and 64-byte line, and
        // the same lines four tiles ahead into L2, which keeps more lines in flight than the
        // line-fill buffers alone allow (measured on Sapphire Rapids: lm_head from DRAM 27 → 30
        // GB/s; cache-hot products lose a little to the extra instructions).
        let stream = MR == 1 && NR == 1;
        let pf = NR * k;
        let line = (64 / std::mem::size_of::<T>()).max(LANES);
        let mut c = 0;
        while c < full {
            let mut xv = [_mm512_setzero_ps(); MR];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add(r * k + c));
            }
            for j in 0..NR {
                if !stream && c % line == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(j * k + c + pf) as *const i8);
                    _mm_prefetch::<_MM_HINT_T2>(wp.wrapping_add(j * k + c + 4 * pf) as *const i8);
                }
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

    /// Columns `cols` of all `m` rows from packed activations and f32 weight panels (see
    /// [`PACK_MIN_ROWS`] and [`pack_rows`]).
    ///
    /// Long reductions are walked in k-blocks so a panel and an activation tile fit in L1
    /// together; each tile's lane accumulators wait in memory between blocks and resume, so
    /// every lane still adds its products in increasing k (the same bits).
    ///
    /// With activations in place (see [`in_place`]) full weight panels are read as stored,
    /// converted in the inner loop; otherwise they are widened to f32 first.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn packed_avx512<T: Elem>(
        acts: Acts<'_>,
        m: usize,
        k: usize,
        w: &[T],
        cols: std::ops::Range<usize>,
        sink: &Sink<'_, T>,
    ) {
        let direct = matches!(acts, Acts::InPlace(_));
        // A partial last chunk would read into the next row.
        assert!(
            !direct || k.is_multiple_of(LANES),
            "in-place activations need whole chunks"
        );
        const KB: usize = 48;
        let kc = k.div_ceil(LANES);
        let tiles = m.div_ceil(PACK_MR);
        // Tiles per block: their activations (256·kc bytes a tile) take a quarter of the L2, so
        // they stay there beside the weights. Measured on Zen 4 (1 MiB L2) at 512 rows: 1 MiB
        // blocks ran about 5% slower than 256 KiB. On Sapphire Rapids (2 MiB) 512 KiB blocks
        // keep the down projection (k = 1536) of 64 rows in one block instead of 10 + 6 tiles:
        // from memory it went from 187–202 to 210–228 GFLOP/s, 64-sequence decode 1–3% faster
        // (7 of 7 alternating rounds); at 512 rows no change beyond the noise.
        let tiles_per_block = (l2_bytes() / 4 / (256 * kc)).max(1);
        // The thread's widened panel and saved accumulators, reused across calls; every element
        // is written before it is read.
        let mut bufs = PANEL.with(|b| std::mem::take(&mut *b.borrow_mut()));
        let (panel, saved) = &mut bufs;
        if panel.len() < NR512 * kc {
            panel.resize(NR512 * kc, Chunk::default());
        }
        if saved.len() < tiles_per_block.min(tiles) {
            saved.resize(
                tiles_per_block.min(tiles),
                [[_mm512_setzero_ps(); NR512]; PACK_MR],
            );
        }
        let mut t0 = 0;
        while t0 < tiles {
            let t1 = (t0 + tiles_per_block).min(tiles);
            let mut j = cols.start;
            while j < cols.end {
                let nr = (cols.end - j).min(NR512);
                if nr < NR512 {
                    for dj in 0..nr {
                        widen_rows::<T, 1>(
                            &w[(j + dj) * k..(j + dj + 1) * k],
                            k,
                            &mut panel[dj * kc..(dj + 1) * kc],
                        );
                    }
                } else if !direct {
                    widen_rows::<T, NR512>(&w[j * k..(j + NR512) * k], k, &mut panel[..NR512 * kc]);
                }
                if nr == NR512 {
                    let wj = &w[j * k..(j + NR512) * k];
                    let (bias4, bias2) = sink.biases(j);
                    // Columns 4 and 5 of the tile before, waiting to share one full reduction
                    // with the next tile's.
                    let mut pending: Option<(usize, [__m512; 8])> = None;
                    // The next panel's weights come from memory (decode reads every weight
                    // once a step): fetch them a few lines per tile while this panel computes,
                    // so widening it does not stall. Past the end of `cols` too: the thread's
                    // next piece usually starts there.
                    let n = w.len() / k;
                    let next = (j + NR512).min(n)..(j + 2 * NR512).min(n);
                    let nbytes = next.len() * k * std::mem::size_of::<T>();
                    let nbase = w.as_ptr().wrapping_add(next.start * k) as *const i8;
                    let lines = nbytes.div_ceil(64);
                    let per_tile = lines.div_ceil(t1 - t0);
                    let mut line = 0;
                    let mut c0 = 0;
                    while c0 < kc {
                        let c1 = (c0 + KB).min(kc);
                        for t in t0..t1 {
                            let end = (line + per_tile).min(lines);
                            while line < end {
                                _mm_prefetch::<_MM_HINT_T1>(nbase.wrapping_add(line * 64));
                                line += 1;
                            }
                            let xt = tile_rows(&acts, t, m, k);
                            // Accumulators start at zero and go through memory only between
                            // k-blocks of long reductions.
                            let mut acc = if c0 == 0 {
                                [[_mm512_setzero_ps(); NR512]; PACK_MR]
                            } else {
                                saved[t - t0]
                            };
                            if direct {
                                packed_tile::<T, NR512, true, false>(
                                    &xt,
                                    kc,
                                    panel,
                                    wj,
                                    c0..c1,
                                    &mut acc,
                                );
                            } else {
                                packed_tile::<T, NR512, false, true>(
                                    &xt,
                                    kc,
                                    panel,
                                    wj,
                                    c0..c1,
                                    &mut acc,
                                );
                            }
                            if c1 < kc {
                                saved[t - t0] = acc;
                                continue;
                            }
                            // Lane 4l + s of each reduction holds row l, column s.
                            let mut v = [_mm512_setzero_ps(); 16];
                            for l in 0..PACK_MR {
                                for s in 0..4 {
                                    v[4 * s + l] = acc[l][s];
                                }
                            }
                            sink.put(reduce16x16(&v), bias4, [(t, j), (t, j + 2)]);
                            let mut rest = [_mm512_setzero_ps(); 8];
                            for l in 0..PACK_MR {
                                for s in 0..2 {
                                    rest[4 * s + l] = acc[l][4 + s];
                                }
                            }
                            if let Some((ta, before)) = pending.take() {
                                v[..8].copy_from_slice(&before);
                                v[8..].copy_from_slice(&rest);
                                sink.put(reduce16x16(&v), bias2, [(ta, j + 4), (t, j + 4)]);
                            } else {
                                pending = Some((t, rest));
                            }
                        }
                        c0 = c1;
                    }
                    if let Some((ta, before)) = pending {
                        let mut v = [_mm512_setzero_ps(); 16];
                        v[..8].copy_from_slice(&before);
                        sink.put(reduce16x16(&v), bias2, [(ta, j + 4), (usize::MAX, 0)]);
                    }
                } else {
                    // Column tail: one panel row at a time, whole k (a short panel fits L1).
                    for dj in 0..nr {
                        for t in t0..t1 {
                            let xt = tile_rows(&acts, t, m, k);
                            let mut acc = [[_mm512_setzero_ps(); 1]; PACK_MR];
                            let row = &panel[dj * kc..(dj + 1) * kc];
                            if direct {
                                packed_tile::<T, 1, false, false>(
                                    &xt,
                                    kc,
                                    row,
                                    &[],
                                    0..kc,
                                    &mut acc,
                                );
                            } else {
                                packed_tile::<T, 1, false, true>(
                                    &xt,
                                    kc,
                                    row,
                                    &[],
                                    0..kc,
                                    &mut acc,
                                );
                            }
                            let rows = (m - t * PACK_MR).min(PACK_MR);
                            for (dr, a) in acc.iter().enumerate().take(rows) {
                                sink.one(t * PACK_MR + dr, j + dj, hsum512(a[0]));
                            }
                        }
                    }
                }
                j += nr;
            }
            t0 = t1;
        }
        PANEL.with(|b| *b.borrow_mut() = bufs);
    }

    /// Register tiles' accumulators waiting between k-blocks, one per activation tile.
    type Saved = [[__m512; NR512]; PACK_MR];

    thread_local! {
        /// The calling thread's widened weight panel and saved accumulators (grown only).
        static PANEL: std::cell::RefCell<(Vec<Chunk>, Vec<Saved>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }

    /// Widens `NR` weight rows (`rows`, `k` each) to f32, chunk-major: chunk `c` of row `j`
    /// goes to `dst[c · NR + j]`, zero-padded to whole chunks (one row: its chunks in order).
    ///
    /// The tile then finds a panel's 6 vectors of a chunk at fixed offsets from one pointer.
    /// Row-major, it needed a register per row for the row offsets, and with 4 activation
    /// pointers besides, 4 of them were reloaded from the stack every chunk (seen in the
    /// annotated loop on Sapphire Rapids: 14 loads per 24 multiply-adds instead of 10).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn widen_rows<T: Elem, const NR: usize>(rows: &[T], k: usize, dst: &mut [Chunk]) {
        let (nr, kc, full) = (NR, k.div_ceil(LANES), k / LANES);
        debug_assert!(rows.len() == nr * k && dst.len() == nr * kc);
        for c in 0..full {
            for j in 0..nr {
                _mm512_store_ps(
                    dst[c * nr + j].0.as_mut_ptr(),
                    load16_512(rows.as_ptr().add(j * k + c * LANES)),
                );
            }
        }
        if full < kc {
            for j in 0..nr {
                let mut last = Chunk::default();
                let tail = &rows[j * k + full * LANES..(j + 1) * k];
                for (d, s) in last.0.iter_mut().zip(tail) {
                    *d = s.to_f32();
                }
                dst[full * nr + j] = last;
            }
        }
    }

    /// The 4 rows of activation tile `t`: where each starts, and the f32 step between chunks.
    #[inline(always)]
    fn tile_rows(acts: &Acts<'_>, t: usize, m: usize, k: usize) -> ([*const f32; PACK_MR], usize) {
        let mut rows = [std::ptr::null(); PACK_MR];
        let mut step = 0;
        for (r, p) in rows.iter_mut().enumerate() {
            (*p, step) = acts.row(t, r, m, k);
        }
        (rows, step)
    }

    /// Adds chunks `chunks` of one tile of 4 activation rows (`xt`: their starts and chunk
    /// step) against `NR` weight rows into `acc`: rows of the widened `panel` (chunk-major, see
    /// [`widen_rows`]; one row is both layouts), or with `DIRECT` the rows of `w` as stored
    /// (`kc` whole chunks each). With `PACKED_X` the rows are a tile of [`pack_rows`], each
    /// one chunk after the one before, so they too are fixed offsets from one pointer. Zero
    /// padding adds fma(0, 0, acc) = acc, as the striped dot's padded tail.
    ///
    /// Each chunk loads 10 vectors for 24 multiply-adds. On Sapphire Rapids that mix, with
    /// every operand in L1, ran at about 81% of the register-only FMA peak in a standalone
    /// loop (4 loads per 24: 93%); no dot-form tile that fits 32 registers loads fewer.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn packed_tile<T: Elem, const NR: usize, const DIRECT: bool, const PACKED_X: bool>(
        xt: &([*const f32; PACK_MR], usize),
        kc: usize,
        panel: &[Chunk],
        w: &[T],
        chunks: std::ops::Range<usize>,
        acc: &mut [[__m512; NR]; PACK_MR],
    ) {
        const MR: usize = PACK_MR;
        let mut a = *acc;
        let (xr, step) = *xt;
        debug_assert!(!PACKED_X || step == MR * LANES);
        let pp = panel.as_ptr() as *const f32;
        let wp = w.as_ptr();
        let k = kc * LANES;
        for c in chunks {
            let mut xv = [_mm512_setzero_ps(); MR];
            for (r, v) in xv.iter_mut().enumerate() {
                let p = if PACKED_X {
                    xr[0].add((c * MR + r) * LANES)
                } else {
                    xr[r].add(c * step)
                };
                *v = _mm512_loadu_ps(p);
            }
            for j in 0..NR {
                let wv = if DIRECT {
                    load16_512(wp.add(j * k + c * LANES))
                } else {
                    _mm512_load_ps(pp.add((c * NR + j) * LANES))
                };
                for r in 0..MR {
                    a[r][j] = _mm512_fmadd_ps(xv[r], wv, a[r][j]);
                }
            }
        }
        *acc = a;
    }

    /// Where the wide-panel path puts its sums: bias added, rounded to the run dtype when
    /// asked, stored as f32 in the `m × n` output. Rounding here, while the sums are in
    /// registers, saves a second pass over the output.
    pub(super) struct Sink<'a, T: Elem> {
        pub(super) out: *mut f32,
        pub(super) n: usize,
        pub(super) m: usize,
        pub(super) bias: Option<&'a [T]>,
        pub(super) round: bool,
    }

    impl<T: Elem> Sink<'_, T> {
        /// The bias of columns `j..j + 4` in the lanes of a 4 × 4 block, and of `j + 4, j + 5`
        /// in the lanes of a block of two tiles' columns 4 and 5 (zero without a bias).
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn biases(&self, j: usize) -> (__m512, __m512) {
            let Some(b) = self.bias else {
                return (_mm512_setzero_ps(), _mm512_setzero_ps());
            };
            let f = |d: usize| b[j + d].to_f32();
            let quad = _mm_setr_ps(f(0), f(1), f(2), f(3));
            let pair = _mm_setr_ps(f(4), f(5), f(4), f(5));
            (_mm512_broadcast_f32x4(quad), _mm512_broadcast_f32x4(pair))
        }

        /// Stores the sums `v` of two half-blocks: lanes 4l, 4l + 1 go to row l of tile
        /// `halves[0].0` at columns `halves[0].1`, `+ 1`, lanes 4l + 2, 4l + 3 likewise for
        /// `halves[1]` (a tile of `usize::MAX` is none). Rows past `m` are padding.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn put(&self, v: __m512, bias: __m512, halves: [(usize, usize); 2]) {
            // The same add, then the same rounding, as `store_fn` and `round_in_place`.
            let v = if self.bias.is_some() {
                _mm512_add_ps(v, bias)
            } else {
                v
            };
            let mut lanes = [0f32; 16];
            if self.round && T::KIND == ElemKind::F16 {
                _mm512_storeu_ps(lanes.as_mut_ptr(), round_f16_512(v));
            } else {
                _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                if self.round {
                    for x in &mut lanes {
                        *x = T::round(*x);
                    }
                }
            }
            let src = lanes.as_ptr() as *const f64;
            for (h, &(t, j)) in halves.iter().enumerate() {
                if t == usize::MAX {
                    continue;
                }
                let rows = self.m.saturating_sub(t * PACK_MR).min(PACK_MR);
                for l in 0..rows {
                    // Two f32 columns of one row as one 8-byte move.
                    let dst = self.out.add((t * PACK_MR + l) * self.n + j) as *mut f64;
                    dst.write_unaligned(src.add(2 * l + h).read_unaligned());
                }
            }
        }

        /// Stores one sum at (row, column).
        #[inline]
        fn one(&self, r: usize, j: usize, acc: f32) {
            let v = match self.bias {
                Some(b) => acc + b[j].to_f32(),
                None => acc,
            };
            let v = if self.round { T::round(v) } else { v };
            // SAFETY: the caller owns this in-bounds (row, column) element.
            unsafe { *self.out.add(r * self.n + j) = v };
        }
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
        while r + PACK_MR <= m {
            quad_cols_avx2::<T>(x, r, k, w, cols.clone(), store);
            r += PACK_MR;
        }
        while r + MR256 <= m {
            cols_avx2::<T, MR256, NR256>(x, r, k, w, cols.clone(), store);
            r += MR256;
        }
        while r < m {
            if k / LANES >= SKEW && !one_row_single_cursor() {
                skewed_avx2::<T, SKEW>(x, r, k, w, cols.clone(), store);
            } else {
                cols_avx2::<T, 1, 1>(x, r, k, w, cols.clone(), store);
            }
            r += 1;
        }
    }

    /// Cursors of [`skewed_avx2`].
    const SKEW: usize = 2;

    /// Whether AVX2 one-row products read with one cursor rather than [`skewed_avx2`]'s: only
    /// when `HALFSTEP_ONE_ROW` says `stream` (the same bits; for comparing the two).
    fn one_row_single_cursor() -> bool {
        static ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ONE.get_or_init(|| std::env::var("HALFSTEP_ONE_ROW").as_deref() == Ok("stream"))
    }

    /// Columns `cols` of row `r0`, reading the weights as one forward stream, with `S` cursors
    /// a fraction of a row apart: in each period cursor `s` adds the `s`-th of `S` runs of
    /// chunks of weight row `j - s`, and hands its sums to cursor `s + 1` for the next run.
    ///
    /// Every lane still adds its chunks in increasing k (the same bits as one cursor), but a
    /// period has `2S` independent accumulator chains instead of 2. One cursor is bound by the
    /// multiply-add latency: 16 weights per latency (5 cycles on Zen 3), about 20 GB/s of f16
    /// a core at 3.5 GHz, below what 2 cores of a Zen 3 host read from DRAM (32 GB/s on one,
    /// where batch-1 decode over HTTP reached 52% of the bandwidth limit with one cursor). On
    /// Sapphire Rapids at the AVX2 level, 2 cursors took cache-hot one-row products from
    /// 40–56 to 74–78 GB/s (gate/up and down, 3 alternating rounds); from DRAM, and in batch-1
    /// decode, both read at the same speed within the noise. Not yet measured on Zen 3.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn skewed_avx2<T: Elem, const S: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        cols: std::ops::Range<usize>,
        store: &impl Fn(usize, usize, f32),
    ) {
        let full = k / LANES;
        // Cursor s adds chunks s·q .. (s + 1)·q; the last also the rest, then the partial tail.
        let q = full / S;
        debug_assert!(q >= 1);
        let xp = x.as_ptr().add(r0 * k);
        let ahead = PF_ONE_BYTES / std::mem::size_of::<T>();
        let line = (64 / std::mem::size_of::<T>()).max(LANES);
        let n = cols.len();
        let mut lo = [_mm256_setzero_ps(); S];
        let mut hi = [_mm256_setzero_ps(); S];
        // Period p: cursor s works on column cols.start + p - s, where that is one of `cols`;
        // outside (the first and last S - 1 periods) it reads the nearest column of `cols`,
        // and its sums are dropped.
        for p in 0..n + S - 1 {
            let mut wp = [std::ptr::null::<T>(); S];
            for (s, ptr) in wp.iter_mut().enumerate() {
                let j = cols.start + (p.saturating_sub(s)).min(n - 1);
                *ptr = w.as_ptr().add(j * k + s * q * LANES);
            }
            // One prefetch stream at the rate the cursors together read, a fixed distance
            // ahead of the front one: its addresses only go forward.
            let pf0 = w.as_ptr().wrapping_add((cols.start + p) * k + ahead);
            for t in 0..q {
                let c = t * LANES;
                for l in (0..S * LANES).step_by(line) {
                    _mm_prefetch::<_MM_HINT_T0>(pf0.wrapping_add(S * c + l) as *const i8);
                }
                for s in 0..S {
                    let xo = xp.add(s * q * LANES + c);
                    let (xl, xh) = (_mm256_loadu_ps(xo), _mm256_loadu_ps(xo.add(8)));
                    lo[s] = _mm256_fmadd_ps(xl, load8_256(wp[s].add(c)), lo[s]);
                    hi[s] = _mm256_fmadd_ps(xh, load8_256(wp[s].add(c + 8)), hi[s]);
                }
            }
            // The last cursor's column is complete after the chunks past S·q and the tail.
            let last = S - 1;
            if p >= last {
                let j = cols.start + p - last;
                let wr = w.as_ptr().add(j * k);
                let (mut l, mut h) = (lo[last], hi[last]);
                for c in (S * q * LANES..full * LANES).step_by(LANES) {
                    l = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(c)), load8_256(wr.add(c)), l);
                    h = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xp.add(c + 8)),
                        load8_256(wr.add(c + 8)),
                        h,
                    );
                }
                if full * LANES < k {
                    l = tail256(x, w, k, r0, j, 0, l);
                    h = tail256(x, w, k, r0, j, 8, h);
                }
                store(r0, j, hsum256_pair(l, h));
            }
            // Each cursor's sums go on with the next cursor; cursor 0 starts a new column.
            for s in (1..S).rev() {
                lo[s] = lo[s - 1];
                hi[s] = hi[s - 1];
            }
            lo[0] = _mm256_setzero_ps();
            hi[0] = _mm256_setzero_ps();
        }
    }

    /// Columns `cols` of rows `r0..r0 + 4` in tiles of 3 columns, each tile the low 8 lanes of
    /// every chunk over the whole reduction, then the high 8.
    ///
    /// Lanes accumulate independently, so the halves can run one after the other: a half needs
    /// 12 accumulators where the whole 4 × 3 tile would need 24 of the 16 registers, and each
    /// multiply-add then needs fewer loads than with the 2 × 2 tile (7 per 12 against 8 per 8).
    /// Measured on Zen 3 at 16, 64 and 512 rows (weights in cache, best of 40 runs side by
    /// side): 6–21% more GFLOP/s than the 2 × 2 tile. Software prefetch costs these cached
    /// products more than it gives the first rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quad_cols_avx2<T: Elem>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        cols: std::ops::Range<usize>,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut j = cols.start;
        while j < cols.end {
            let nr = (cols.end - j).min(3);
            let mut sums = [[0f32; 3]; PACK_MR];
            match nr {
                3 => quad_tile::<T, 3>(x, r0, k, w, j, &mut sums),
                2 => quad_tile::<T, 2>(x, r0, k, w, j, &mut sums),
                _ => quad_tile::<T, 1>(x, r0, k, w, j, &mut sums),
            }
            for (dr, row) in sums.iter().enumerate() {
                for (dj, &v) in row.iter().enumerate().take(nr) {
                    store(r0 + dr, j + dj, v);
                }
            }
            j += nr;
        }
    }

    /// One 4 × 3 (or narrower) tile of [`quad_cols_avx2`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quad_tile<T: Elem, const NR: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        j0: usize,
        sums: &mut [[f32; 3]; PACK_MR],
    ) {
        let lo = quad_half::<T, NR>(x, r0, k, w, j0, 0);
        let hi = quad_half::<T, NR>(x, r0, k, w, j0, 8);
        for r in 0..PACK_MR {
            for j in 0..NR {
                sums[r][j] = hsum256_pair(lo[r][j], hi[r][j]);
            }
        }
    }

    /// Lanes `off..off + 8` of every chunk of a [`quad_tile`], over the whole reduction.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn quad_half<T: Elem, const NR: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        j0: usize,
        off: usize,
    ) -> [[__m256; NR]; PACK_MR] {
        let mut acc = [[_mm256_setzero_ps(); NR]; PACK_MR];
        let xp = x.as_ptr().add(r0 * k + off);
        let wp = w.as_ptr().add(j0 * k + off);
        let full = k - k % LANES;
        let mut c = 0;
        while c < full {
            let mut wv = [_mm256_setzero_ps(); NR];
            for j in 0..NR {
                wv[j] = load8_256(wp.add(j * k + c));
            }
            for r in 0..PACK_MR {
                let xv = _mm256_loadu_ps(xp.add(r * k + c));
                for j in 0..NR {
                    acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
                }
            }
            c += LANES;
        }
        if full < k {
            for j in 0..NR {
                for r in 0..PACK_MR {
                    acc[r][j] = tail256(x, w, k, r0 + r, j0 + j, off, acc[r][j]);
                }
            }
        }
        acc
    }

    /// `acc` plus lanes `off..off + 8` of the last, partial chunk of row `r` of `x` times
    /// weight row `j`, zero-padded as the striped dot pads its tail.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tail256<T: Elem>(
        x: &[f32],
        w: &[T],
        k: usize,
        r: usize,
        j: usize,
        off: usize,
        acc: __m256,
    ) -> __m256 {
        let xr = &x[r * k..(r + 1) * k];
        let (xb, wb) = pad_tail(xr, &w[j * k..(j + 1) * k], k - k % LANES);
        _mm256_fmadd_ps(
            _mm256_loadu_ps(xb.as_ptr().add(off)),
            _mm256_loadu_ps(wb.as_ptr().add(off)),
            acc,
        )
    }

    /// Columns `cols` of rows `r0..r0 + MR` in tiles of `NR` columns. With one column per
    /// tile the weights are read in memory order, a single stream: the hardware prefetcher
    /// keeps up with one stream but loses several interleaved ones (measured on Zen 3 from
    /// DRAM: two interleaved rows read at 55–75% of the speed of one).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn cols_avx2<T: Elem, const MR: usize, const NR: usize>(
        x: &[f32],
        r0: usize,
        k: usize,
        w: &[T],
        cols: std::ops::Range<usize>,
        store: &impl Fn(usize, usize, f32),
    ) {
        let mut j = cols.start;
        while j + NR <= cols.end {
            let acc = tile256::<T, MR, NR>(x, r0, k, w, j);
            for (dr, row) in acc.iter().enumerate() {
                for (dj, &v) in row.iter().enumerate() {
                    store(r0 + dr, j + dj, v);
                }
            }
            j += NR;
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
        // One-row products are bound by memory: ask for the lines a fixed distance ahead.
        let ahead = PF_ONE_BYTES / std::mem::size_of::<T>();
        let line = (64 / std::mem::size_of::<T>()).max(LANES);
        let mut c = 0;
        while c < full {
            let mut xl = [_mm256_setzero_ps(); MR];
            let mut xh = [_mm256_setzero_ps(); MR];
            for r in 0..MR {
                xl[r] = _mm256_loadu_ps(xp.add(r * k + c));
                xh[r] = _mm256_loadu_ps(xp.add(r * k + c + 8));
            }
            if MR == 1 && NR == 1 && c % line == 0 {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(c + ahead) as *const i8);
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
                for r in 0..MR {
                    lo[r][j] = tail256(x, w, k, r0 + r, j0 + j, 0, lo[r][j]);
                    hi[r][j] = tail256(x, w, k, r0 + r, j0 + j, 8, hi[r][j]);
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::testmodel::SeededNormal::new(seed);
        (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
    }

    fn one_row_layouts_match_portable<T: Elem>() {
        if SimdLevel::detect() < SimdLevel::Avx512 {
            eprintln!("no AVX-512 here: one-row layouts not compared");
            return;
        }
        // Reductions with and without a tail, and column counts that leave partial tiles.
        for (k, n) in [(576, 13), (100, 7), (1536, 6), (17, 1)] {
            let x = values(2 * k, 1);
            let w: Vec<T> = values(n * k, 2).into_iter().map(T::from_f32).collect();
            for r0 in 0..2 {
                let want: Vec<u32> = (0..n)
                    .map(|j| {
                        dot_portable(&x[r0 * k..(r0 + 1) * k], &w[j * k..(j + 1) * k]).to_bits()
                    })
                    .collect();
                for stream in [true, false] {
                    let got: Vec<std::cell::Cell<u32>> =
                        (0..n).map(|_| Default::default()).collect();
                    let store = |r: usize, j: usize, v: f32| {
                        assert_eq!(r, r0);
                        got[j].set(v.to_bits());
                    };
                    // SAFETY: AVX-512 checked above; x holds 2 rows of k, w holds n rows of k.
                    unsafe { x86::one_row_avx512(&x, r0, k, &w, 0..n, &store, stream) };
                    let got: Vec<u32> = got.iter().map(|c| c.get()).collect();
                    assert_eq!(got, want, "k {k}, n {n}, row {r0}, stream {stream}");
                }
            }
        }
    }

    fn panels_match_portable<T: Elem>() {
        if SimdLevel::detect() < SimdLevel::Avx512 {
            eprintln!("no AVX-512 here: wide-panel layouts not compared");
            return;
        }
        // Whole chunks (read in place or packed), a tail chunk (packed only), k-blocks (1536 =
        // 2 blocks), odd tile counts and partial last tiles, and partial last panels.
        for (m, k, n) in [
            (16, 576, 12),
            (17, 576, 13),
            (21, 100, 7),
            (23, 1536, 8),
            (18, 64, 6),
        ] {
            let x = values(m * k, 3);
            let w: Vec<T> = values(n * k, 4).into_iter().map(T::from_f32).collect();
            let bias: Vec<T> = values(n, 5).into_iter().map(T::from_f32).collect();
            for (with_bias, round) in [(false, false), (true, true)] {
                let b = with_bias.then_some(&bias[..]);
                let want: Vec<u32> = (0..m * n)
                    .map(|i| {
                        let (r, j) = (i / n, i % n);
                        let mut v = dot_portable(&x[r * k..(r + 1) * k], &w[j * k..(j + 1) * k]);
                        if let Some(b) = b {
                            v += b[j].to_f32();
                        }
                        if round {
                            v = T::round(v);
                        }
                        v.to_bits()
                    })
                    .collect();
                for direct in [true, false] {
                    if direct && !k.is_multiple_of(LANES) {
                        continue;
                    }
                    let mut out = vec![f32::NAN; m * n];
                    let mut xpk = Vec::new();
                    let sink = x86::Sink {
                        out: out.as_mut_ptr(),
                        n,
                        m,
                        bias: b,
                        round,
                    };
                    // SAFETY: AVX-512 checked above; `out` holds m × n, `xpk` is packed from
                    // m × k activations, `w` holds n rows of k.
                    unsafe {
                        let acts = if direct {
                            x86::Acts::InPlace(&x)
                        } else {
                            pack_rows(&x, m, k, &mut xpk);
                            x86::Acts::Packed(&xpk)
                        };
                        x86::packed_avx512(acts, m, k, &w, 0..n, &sink);
                    }
                    let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(
                        got, want,
                        "m {m}, k {k}, n {n}, bias {with_bias}, direct {direct}"
                    );
                }
            }
        }
    }

    #[test]
    fn in_place_and_packed_operands_give_the_portable_bits() {
        panels_match_portable::<f16>();
        panels_match_portable::<bf16>();
    }

    fn skewed_matches_portable<T: Elem>() {
        if SimdLevel::detect() < SimdLevel::Avx2 {
            eprintln!("no AVX2 here: skewed one-row products not compared");
            return;
        }
        // Chunk counts that split evenly, leave one chunk for the last cursor, or that and a
        // partial tail; one column or several, starting at 0 or further in.
        for (k, n, cols) in [
            (576, 13, 0..13),
            (100, 7, 0..7),
            (80, 5, 2..5),
            (90, 4, 3..4),
            (1536, 6, 1..6),
            (32, 3, 0..3),
        ] {
            let x = values(2 * k, 1);
            let w: Vec<T> = values(n * k, 2).into_iter().map(T::from_f32).collect();
            for r0 in 0..2 {
                let want: Vec<u32> = cols
                    .clone()
                    .map(|j| {
                        dot_portable(&x[r0 * k..(r0 + 1) * k], &w[j * k..(j + 1) * k]).to_bits()
                    })
                    .collect();
                let got: Vec<std::cell::Cell<Option<u32>>> =
                    (0..n).map(|_| Default::default()).collect();
                let store = |r: usize, j: usize, v: f32| {
                    assert_eq!(r, r0);
                    assert!(
                        got[j].replace(Some(v.to_bits())).is_none(),
                        "column {j} twice"
                    );
                };
                // SAFETY: AVX2 checked above; x holds 2 rows of k, w holds n rows of k.
                unsafe { x86::skewed_avx2::<T, 2>(&x, r0, k, &w, cols.clone(), &store) };
                let mut outside = (0..n).filter(|j| !cols.contains(j));
                assert!(
                    outside.all(|j| got[j].get().is_none()),
                    "wrote outside {cols:?}"
                );
                let got: Vec<u32> = cols.clone().map(|j| got[j].get().unwrap()).collect();
                assert_eq!(got, want, "k {k}, cols {cols:?}, row {r0}");
            }
        }
    }

    #[test]
    fn skewed_cursors_give_the_portable_bits() {
        skewed_matches_portable::<f16>();
        skewed_matches_portable::<bf16>();
        skewed_matches_portable::<f32>();
    }

    #[test]
    fn one_row_stream_and_tiles_give_the_portable_bits() {
        one_row_layouts_match_portable::<f16>();
        one_row_layouts_match_portable::<bf16>();
        one_row_layouts_match_portable::<f32>();
    }
}
