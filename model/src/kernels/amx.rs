//! The `--kernels fast` matrix product on Intel AMX tiles (Sapphire Rapids and later).
//!
//! AMX multiplies pairs of BF16 values into f32 accumulators. An f16 value (11 significant
//! bits) is exactly the sum of two BF16 values: `hi`, its upper 8 bits, and `lo = x − hi`
//! (at most 3 significant bits). With weights and activations both split,
//! `x·w = xh·wh + xh·wl + xl·wh + xl·wl`, every product exact in f32. This path keeps the first
//! three (the fourth is below 2⁻¹⁴ of the product) and sums them in the tile unit's order, not
//! the striped order of numerics.md: results are within f32 summation error of the parity
//! kernels', not bit for bit. BF16 runs need one product (their `lo` is zero).
//!
//! Each output element still depends only on its own activation row and weight row, so results
//! do not change with the number of rows (from 16 on) or of threads.
//!
//! Activations must hold values of the run dtype (every kernel rounds its output to it); an f32
//! value with more bits keeps only the 16 that `hi + lo` carry.

use super::SharedOut;
use crate::dtype::{Elem, ElemKind};
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// Rows (and BF16 pairs) of a tile: 16 rows of 64 bytes.
const TR: usize = 16;
/// Reduction length of one tile product: 16 rows of 32 BF16 values.
const TK: usize = 32;
/// Weight rows (output columns) converted at a time: two tiles' worth.
pub(crate) const PANEL_COLS: usize = 2 * TR;

/// Whether this CPU and kernel can run the AMX path (checked once per process).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let simd = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("f16c");
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let edx = if simd { __cpuid_count(7, 0).edx } else { 0 };
        let amx = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
        amx && request_tile_state()
    })
}

/// Asks Linux for the 8 KiB tile register state, which it grants only on request.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The operand of `ldtilecfg`: every tile 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
    reserved2: [u8; 16],
}

/// One tile's bytes (256 f32 or 256 BF16 pairs) on cache lines of their own.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Tile([u32; TR * TR]);

impl Default for Tile {
    fn default() -> Tile {
        Tile([0; TR * TR])
    }
}

/// 32 BF16 values (one tile row of a weight panel) on a cache line of their own.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u16; TK]);

thread_local! {
    /// The calling thread's packed activations, reused across calls (grown only).
    pub(crate) static XTILES: RefCell<Vec<Tile>> = const { RefCell::new(Vec::new()) };
    /// A worker's two weight-chunk buffers and the accumulators that wait between chunks
    /// (grown only).
    static PANEL: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Splits a block of 32 values (`a` = values 0..16, `b` = 16..32) into BF16 `hi` and `lo`
/// vectors whose 32-bit lane `i` holds values `i` (low half) and `16 + i` (high half): the pair
/// a tile product multiplies together. Weights and activations use the same pairing, so each
/// input still meets its own weight. `hi` is the upper half of the f32 (8 significant bits,
/// truncated), `lo = x − hi` exactly, which for an f16 value has at most 3 significant bits.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn split32(a: __m512, b: __m512) -> (__m512i, __m512i) {
    // (x & C) | y: the upper half of each lane of x over a lane whose upper half is zero.
    const UPPER_OR: i32 = 0xEC;
    let mask = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let (ai, bi) = (_mm512_castps_si512(a), _mm512_castps_si512(b));
    let hi = _mm512_ternarylogic_epi32::<UPPER_OR>(bi, _mm512_srli_epi32::<16>(ai), mask);
    let la = _mm512_sub_ps(a, _mm512_castsi512_ps(_mm512_and_si512(ai, mask)));
    let lb = _mm512_sub_ps(b, _mm512_castsi512_ps(_mm512_and_si512(bi, mask)));
    let lo = _mm512_ternarylogic_epi32::<UPPER_OR>(
        _mm512_castps_si512(lb),
        _mm512_srli_epi32::<16>(_mm512_castps_si512(la)),
        mask,
    );
    (hi, lo)
}

/// The two index vectors of the transpose stage that swaps bit `$s` of the row index with bit
/// `$s` of the column index: one two-source permute per output row.
macro_rules! stage_indices {
    ($s:expr) => {{
        const S: usize = $s;
        const IA: [i32; 16] = {
            let mut a = [0i32; 16];
            let mut c = 0;
            while c < 16 {
                a[c] = if c & S == 0 {
                    c as i32
                } else {
                    (16 + c - S) as i32
                };
                c += 1;
            }
            a
        };
        const IB: [i32; 16] = {
            let mut a = [0i32; 16];
            let mut c = 0;
            while c < 16 {
                a[c] = if c & S == 0 {
                    (c + S) as i32
                } else {
                    (16 + c) as i32
                };
                c += 1;
            }
            a
        };
        (
            _mm512_loadu_si512(IA.as_ptr() as *const _),
            _mm512_loadu_si512(IB.as_ptr() as *const _),
        )
    }};
}

/// One transpose stage (see [`stage_indices`]) over rows `$r[0..16]`.
macro_rules! stage {
    ($r:ident, $s:expr) => {{
        let (ia, ib) = stage_indices!($s);
        for i in 0..16 {
            if i & $s == 0 {
                let (a, b) = ($r[i], $r[i + $s]);
                $r[i] = _mm512_permutex2var_epi32(a, ia, b);
                $r[i + $s] = _mm512_permutex2var_epi32(a, ib, b);
            }
        }
    }};
}

/// Transposes a 16 × 16 matrix of 32-bit values held one row per register.
///
/// Swapping bit s of the row index with bit s of the column index, for s = 8, 4, 2, 1,
/// transposes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: &mut [__m512i; 16]) {
    stage!(r, 8);
    stage!(r, 4);
    stage!(r, 2);
    stage!(r, 1);
}

/// [`transpose16`] of the 16 rows at `p` (64-byte aligned).
///
/// The first stage reads memory itself: loading the rows into an array first compiled to a
/// memcpy call per tile.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_transposed16(p: *const __m512i) -> [__m512i; 16] {
    let mut r = [_mm512_setzero_si512(); 16];
    let (ia, ib) = stage_indices!(8);
    for i in 0..8 {
        let (a, b) = (_mm512_load_si512(p.add(i)), _mm512_load_si512(p.add(i + 8)));
        r[i] = _mm512_permutex2var_epi32(a, ia, b);
        r[i + 8] = _mm512_permutex2var_epi32(a, ib, b);
    }
    stage!(r, 4);
    stage!(r, 2);
    stage!(r, 1);
    r
}

/// Load masks of the two 16-value halves of a block holding `n` (1..=32) values.
fn block_masks(n: usize) -> (u16, u16) {
    let all = if n >= TK { !0u32 } else { (1u32 << n) - 1 };
    (all as u16, (all >> 16) as u16)
}

/// Tiles [`pack_x`] writes for `m` rows of `k` inputs.
pub(crate) fn packed_len(m: usize, k: usize) -> usize {
    m.div_ceil(TR) * k.div_ceil(TK) * 2
}

/// Packs row blocks `blocks` (16 rows each) of `x` (m × k f32) as tiles of the second product
/// operand: for each block and 32 inputs, a `hi` tile then a `lo` tile whose row `p` holds the
/// pairs (inputs `p` and `16 + p`, see [`split32`]) of the block's rows side by side,
/// zero-padded in rows and k.
///
/// # Safety
/// [`available`] returned true; `dst` holds [`packed_len`] tiles, of which this call writes
/// only those of `blocks`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn pack_x(
    x: &[f32],
    m: usize,
    k: usize,
    blocks: std::ops::Range<usize>,
    dst: *mut Tile,
) {
    let kbs = k.div_ceil(TK);
    for mb in blocks {
        for kb in 0..kbs {
            let mut hi = [_mm512_setzero_si512(); TR];
            let mut lo = [_mm512_setzero_si512(); TR];
            let (ma, mb_) = block_masks((k - kb * TK).min(TK));
            for r in 0..TR.min(m - mb * TR) {
                let p = x.as_ptr().add((mb * TR + r) * k + kb * TK);
                let a = _mm512_maskz_loadu_ps(ma, p);
                let b = _mm512_maskz_loadu_ps(mb_, p.add(16));
                (hi[r], lo[r]) = split32(a, b);
            }
            transpose16(&mut hi);
            transpose16(&mut lo);
            let t = dst.add((mb * kbs + kb) * 2) as *mut __m512i;
            for r in 0..TR {
                _mm512_store_si512(t.add(r), hi[r]);
                _mm512_store_si512(t.add(TR + r), lo[r]);
            }
        }
    }
}

/// Tile products (of 32 inputs each) per weight chunk: a chunk (16 KiB split), its successor
/// being split, and the activation tiles in use stay in L1.
const CHUNK_KB: usize = 4;
/// Lines of one chunk buffer: `hi` rows 0..32 then `lo` rows 32..64, `CHUNK_KB` lines each.
const CHUNK_LINES: usize = 2 * PANEL_COLS * CHUNK_KB;

/// One weight chunk of a thread's panel: the panel's weight rows, inputs
/// `32·kb0..32·(kb0 + len)`, for row tiles `tiles`.
#[derive(Clone)]
struct Item {
    pan: Pan,
    kb0: usize,
    len: usize,
    tiles: std::ops::Range<usize>,
    /// Addresses of the weights to prefetch meanwhile: a share of the next panel's.
    ahead: std::ops::Range<usize>,
}

impl Item {
    /// Chunk `q` of `pan` for row tiles `tiles`, prefetching its share of `upcoming`.
    fn new<T: Elem>(
        parts: &[Part<'_, T>],
        k: usize,
        pan: Pan,
        q: usize,
        tiles: std::ops::Range<usize>,
        upcoming: Option<Pan>,
    ) -> Item {
        let kbs = k.div_ceil(TK);
        let nchunks = kbs.div_ceil(CHUNK_KB);
        // The next panel's rows are one contiguous run of memory; each chunk of this panel
        // asks for its share, so the split finds them in cache (decode reads every weight from
        // memory once a step).
        let ahead = upcoming.map_or(0..0, |u| {
            let size = std::mem::size_of::<T>();
            let bytes = u.nr * k * size;
            let share = bytes.div_ceil(nchunks).next_multiple_of(64);
            let base = parts[u.part].w.as_ptr() as usize + u.j * k * size;
            base + (q * share).min(bytes)..base + ((q + 1) * share).min(bytes)
        });
        Item {
            pan,
            kb0: q * CHUNK_KB,
            len: (kbs - q * CHUNK_KB).min(CHUNK_KB),
            tiles,
            ahead,
        }
    }
}

/// A projection of one AMX call: weights `[n, k]`, optional bias, and the `m × n` output that
/// threads write in disjoint columns.
#[derive(Clone, Copy)]
pub(crate) struct Part<'a, T: Elem> {
    /// Weights, `n` rows of `k`.
    pub w: &'a [T],
    /// Output columns.
    pub n: usize,
    /// Added to every row.
    pub bias: Option<&'a [T]>,
    /// `m × n` outputs.
    pub out: SharedOut,
    /// When this is the `up` projection of a gate/up pair: the gate's outputs, which become
    /// the gated activation as the up outputs are stored (see [`super::act::silu_gate`]).
    pub gate: Option<SharedOut>,
}

/// A panel: weight rows (output columns) `j..j + nr` of projection `part`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pan {
    part: usize,
    j: usize,
    nr: usize,
}

/// The panels of one call's projections, handed out to its threads.
///
/// Each group of row tiles sweeps every panel. Within a group, each thread owns an even,
/// contiguous share of the panels and takes them from its front; a thread done with its share
/// takes the others' from their back. A thread held up (by the host, an interrupt, a
/// neighbour's process) then no longer keeps the others waiting at the end of the call, and
/// each thread still streams contiguous weights almost all of the time.
pub(crate) struct Panels {
    /// Output columns of each projection, in order.
    ns: Vec<usize>,
    /// Gate/up pairs: a thread takes panel `i` of both projections, gate first, so it can gate
    /// the outputs as the up tiles are stored.
    paired: bool,
    threads: usize,
    /// Per group, per thread: the share's next (low 32 bits) and end (high 32 bits) panel.
    shares: Vec<Share>,
}

/// One thread's share of a group's panels, on a cache line of its own: its owner updates it at
/// every panel, and sharing a line with another thread's share would bounce it between cores.
#[repr(align(64))]
struct Share(std::sync::atomic::AtomicU64);

impl Panels {
    /// Panels of projections with `ns` output columns each, for `m` rows and `threads`;
    /// `paired` for a gate/up pair (two projections of equal width).
    pub(crate) fn new(
        ns: impl IntoIterator<Item = usize>,
        m: usize,
        threads: usize,
        paired: bool,
    ) -> Panels {
        let ns: Vec<usize> = ns.into_iter().collect();
        assert!(
            !paired || (ns.len() == 2 && ns[0] == ns[1]),
            "gate/up widths {ns:?}"
        );
        let groups = m.div_ceil(TR).div_ceil(GROUP_TILES);
        let panels = |n: &usize| n.div_ceil(PANEL_COLS);
        let total: usize = if paired {
            panels(&ns[0])
        } else {
            ns.iter().map(panels).sum()
        };
        assert!(total < 1 << 32, "too many panels");
        let shares = (0..groups)
            .flat_map(|_| {
                (0..threads).map(move |t| {
                    let (a, b) = (total * t / threads, total * (t + 1) / threads);
                    Share(std::sync::atomic::AtomicU64::new(
                        a as u64 | (b as u64) << 32,
                    ))
                })
            })
            .collect();
        Panels {
            ns,
            paired,
            threads,
            shares,
        }
    }

    /// The next panel of group `g` for thread `t`: its own share's front, else another's back.
    /// `held` keeps the up half of a gate/up pair until it is asked for.
    fn claim(&self, g: usize, t: usize, held: &mut Option<Pan>) -> Option<Pan> {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(up) = held.take() {
            return Some(up);
        }
        let take = |u: usize, front: bool| {
            let s = &self.shares[g * self.threads + u].0;
            let mut cur = s.load(Relaxed);
            loop {
                let (a, b) = (cur & 0xFFFF_FFFF, cur >> 32);
                if a >= b {
                    return None;
                }
                let (new, got) = if front {
                    ((a + 1) | b << 32, a)
                } else {
                    (a | (b - 1) << 32, b - 1)
                };
                match s.compare_exchange_weak(cur, new, Relaxed, Relaxed) {
                    Ok(_) => return Some(got as usize),
                    Err(now) => cur = now,
                }
            }
        };
        let idx = take(t, true)
            .or_else(|| (1..self.threads).find_map(|d| take((t + d) % self.threads, false)))?;
        if self.paired {
            let j = idx * PANEL_COLS;
            let nr = (self.ns[0] - j).min(PANEL_COLS);
            *held = Some(Pan { part: 1, j, nr });
            return Some(Pan { part: 0, j, nr });
        }
        // Panel `idx` among all projections' panels, in order.
        let mut first = 0;
        for (part, &n) in self.ns.iter().enumerate() {
            let c = n.div_ceil(PANEL_COLS);
            if idx < first + c {
                let j = (idx - first) * PANEL_COLS;
                return Some(Pan {
                    part,
                    j,
                    nr: (n - j).min(PANEL_COLS),
                });
            }
            first += c;
        }
        unreachable!("panel {idx} beyond the call's panels")
    }
}

/// How stored outputs are rounded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreRound {
    /// Kept f32.
    None,
    /// To f16, in registers.
    F16,
    /// To the weights' dtype, per stored row slice.
    Elem(super::SimdLevel),
}

/// Splits units `units` of a chunk (unit `u` = 32 inputs, block `u % len`, of row `u / len`)
/// into its buffer, zero-padded in k. Rows a chunk does not fill keep stale values: they only
/// reach outputs that are never stored.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn split_units<T: Elem>(
    w: &[T],
    k: usize,
    it: &Item,
    units: std::ops::Range<usize>,
    buf: &mut [Line],
) {
    if units.is_empty() {
        return;
    }
    debug_assert!(units.end <= it.pan.nr * it.len && buf.len() >= CHUNK_LINES);
    // Only the k tail's block is partial.
    let full = block_masks(TK);
    let tail = block_masks(k - (k.div_ceil(TK) - 1) * TK);
    let last = it.kb0 + it.len == k.div_ceil(TK);
    let hi = buf.as_mut_ptr() as *mut __m512i;
    let lo = hi.add(PANEL_COLS * CHUNK_KB);
    let (mut dj, mut b) = (units.start / it.len, units.start % it.len);
    let mut left = units.len();
    while left > 0 {
        let row = (w.as_ptr() as *const i16).add((it.pan.j + dj) * k + it.kb0 * TK);
        let end = (b + left).min(it.len);
        for b in b..end {
            let (ma, mb) = if last && b + 1 == it.len { tail } else { full };
            let src = row.add(b * TK);
            let at = dj * CHUNK_KB + b;
            if T::KIND == ElemKind::F16 {
                let xa = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(ma, src));
                let xb = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mb, src.add(16)));
                let (h, l) = split32(xa, xb);
                _mm512_store_si512(hi.add(at), h);
                _mm512_store_si512(lo.add(at), l);
            } else {
                // BF16 weights are their own `hi` (their `lo` pass is skipped), same pairing.
                let xa = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(ma, src));
                let xb = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mb, src.add(16)));
                _mm512_store_si512(hi.add(at), _mm512_or_si512(xa, _mm512_slli_epi32::<16>(xb)));
            }
        }
        left -= end - b;
        (dj, b) = (dj + 1, 0);
    }
}

/// Row tiles swept past one weight panel before the next panel: their packed activations
/// (4 KiB per tile and 32 inputs) stay in L2.
const GROUP_TILES: usize = 8;

/// Every group of row tiles times the panels this thread takes from `panels`:
/// `out[r, j] = Σ x[r, k]·w[j, k] (+ bias[j])` for each projection of `parts`, from `xt`
/// (packed by [`pack_x`]), rounded as `round` says on the way out; the up projection of a
/// gate/up pair also gates the gate's outputs (see [`Part::gate`]).
///
/// # Safety
/// [`available`] returned true, `xt` holds `x` packed for these `m` and `k`, every projection's
/// output has `m × n` values, and the threads sharing `panels` are the only writers of them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn matmul_panels<T: Elem>(
    xt: &[Tile],
    m: usize,
    k: usize,
    parts: &[Part<'_, T>],
    panels: &Panels,
    t: usize,
    round: StoreRound,
) {
    let kbs = k.div_ceil(TK);
    let mbs = m.div_ceil(TR);
    let two_pass = T::KIND == ElemKind::F16;
    let mut bufs = PANEL.with(|p| std::mem::take(&mut *p.borrow_mut()));
    // Two chunk buffers, then accumulators waiting between chunks (4 tiles per pair of rows).
    let saved_at = 2 * CHUNK_LINES;
    let saved_lines = GROUP_TILES.div_ceil(2) * 4 * std::mem::size_of::<Tile>() / 64;
    if bufs.len() < saved_at + saved_lines {
        bufs.resize(saved_at + saved_lines, Line::default());
    }
    let cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
        reserved2: [0; 16],
    };
    asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
    // Weight tiles are rows of a chunk: CHUNK_KB lines apart.
    let ws = CHUNK_KB * 64;
    let xs = 64usize;
    // Finished accumulators go out one row pair late, so reading them back does not wait on the
    // tile store just issued.
    let mut c = [[Tile::default(); 4]; 2];
    let mut pending: Option<(usize, usize, bool, Pan)> = None;
    let mut slot = 0;
    // Work items: (group of row tiles, panel of 32 columns, chunk of inputs), chunks innermost.
    // While one item's tile products run, the next item's chunk is split a slice at a time
    // between them, so the tile unit and the vector units can work at once (measured: they
    // overlap only in part; splitting costs about as much as the products at 64 rows). The
    // panel after the current one is taken as the current one starts, so its weights can be
    // prefetched meanwhile.
    let mut parity = 0;
    for g in 0..mbs.div_ceil(GROUP_TILES) {
        let tiles = g * GROUP_TILES..((g + 1) * GROUP_TILES).min(mbs);
        let mut held = None;
        let Some(first_pan) = panels.claim(g, t, &mut held) else {
            continue;
        };
        let mut upcoming = panels.claim(g, t, &mut held);
        let mut cur = Item::new(parts, k, first_pan, 0, tiles.clone(), upcoming);
        let buf = if parity == 0 {
            &mut bufs[..CHUNK_LINES]
        } else {
            &mut bufs[CHUNK_LINES..2 * CHUNK_LINES]
        };
        split_units(parts[cur.pan.part].w, k, &cur, 0..cur.pan.nr * cur.len, buf);
        loop {
            let next = if cur.kb0 + cur.len < kbs {
                Some(Item::new(
                    parts,
                    k,
                    cur.pan,
                    cur.kb0 / CHUNK_KB + 1,
                    tiles.clone(),
                    upcoming,
                ))
            } else if let Some(pan) = upcoming {
                upcoming = panels.claim(g, t, &mut held);
                Some(Item::new(parts, k, pan, 0, tiles.clone(), upcoming))
            } else {
                None
            };
            let next_units = next.as_ref().map_or(0, |it| it.pan.nr * it.len);
            let (a, rest) = bufs.split_at_mut(CHUNK_LINES);
            let (b, saved) = rest.split_at_mut(CHUNK_LINES);
            let (now, then) = if parity == 0 { (a, b) } else { (b, a) };
            let saved = saved.as_mut_ptr() as *mut Tile;
            let steps = cur.tiles.len().div_ceil(2) * cur.len;
            let per_step = next_units.div_ceil(steps);
            let mut unit = 0;
            let lines_per_step = cur.ahead.len().div_ceil(64 * steps);
            let mut ahead = cur.ahead.start;
            let wh = now.as_ptr() as *const u8;
            let wl = now.as_ptr().add(PANEL_COLS * CHUNK_KB) as *const u8;
            let (first, last) = (cur.kb0 == 0, cur.kb0 + cur.len == kbs);
            let mut mb = cur.tiles.start;
            while mb < cur.tiles.end {
                let pair = mb + 1 < cur.tiles.end;
                let s = saved.add((mb - cur.tiles.start) / 2 * 4) as *const u8;
                if first {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem)
                    );
                } else {
                    asm!(
                        "tileloadd tmm0, [{c} + {xs}*1]",
                        "tileloadd tmm1, [{c} + {xs}*1 + 1024]",
                        "tileloadd tmm2, [{c} + {xs}*1 + 2048]",
                        "tileloadd tmm3, [{c} + {xs}*1 + 3072]",
                        c = in(reg) s, xs = in(reg) xs,
                        options(nostack, readonly)
                    );
                }
                for b in 0..cur.len {
                    let kb = cur.kb0 + b;
                    let w0h = wh.add(b * 64);
                    let w1h = w0h.add(TR * ws);
                    let w0l = wl.add(b * 64);
                    let w1l = w0l.add(TR * ws);
                    let x0 = xt.as_ptr().add((mb * kbs + kb) * 2) as *const u8;
                    let x0l = x0.add(std::mem::size_of::<Tile>());
                    // tmm0..3 = (weight tile 0/1) × (row tile 0/1); tmm4/5 weights, tmm6/7 rows.
                    if pair {
                        let x1 = xt.as_ptr().add(((mb + 1) * kbs + kb) * 2) as *const u8;
                        let x1l = x1.add(std::mem::size_of::<Tile>());
                        if two_pass {
                            // Wh·Xl, then Wh·Xh, then Wl·Xh: each operand tile loads once, and
                            // just before its first use, so that it waits only on the product
                            // that last read its register while the others run (tile registers
                            // are not renamed). Measured at 64 rows: 3–10% faster than loading
                            // each pass's operands together.
                            asm!(
                                "tileloadd tmm4, [{w0} + {ws}*1]",
                                "tileloadd tmm6, [{x0l} + {xs}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm7, [{x1l} + {xs}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tileloadd tmm5, [{w1} + {ws}*1]",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                "tileloadd tmm6, [{x0} + {xs}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm7, [{x1} + {xs}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                "tileloadd tmm4, [{w0l} + {ws}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm5, [{w1l} + {ws}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                w0 = in(reg) w0h, w1 = in(reg) w1h, w0l = in(reg) w0l,
                                w1l = in(reg) w1l, x0 = in(reg) x0, x1 = in(reg) x1,
                                x0l = in(reg) x0l, x1l = in(reg) x1l,
                                ws = in(reg) ws, xs = in(reg) xs,
                                options(nostack, readonly)
                            );
                        } else {
                            asm!(
                                "tileloadd tmm4, [{w0} + {ws}*1]",
                                "tileloadd tmm6, [{x0} + {xs}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tileloadd tmm7, [{x1} + {xs}*1]",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tileloadd tmm5, [{w1} + {ws}*1]",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                w0 = in(reg) w0h, w1 = in(reg) w1h, x0 = in(reg) x0, x1 = in(reg) x1,
                                ws = in(reg) ws, xs = in(reg) xs,
                                options(nostack, readonly)
                            );
                        }
                    } else if two_pass {
                        asm!(
                            "tileloadd tmm4, [{w0} + {ws}*1]",
                            "tileloadd tmm5, [{w1} + {ws}*1]",
                            "tileloadd tmm6, [{x0l} + {xs}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tileloadd tmm6, [{x0} + {xs}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tileloadd tmm4, [{w0l} + {ws}*1]",
                            "tileloadd tmm5, [{w1l} + {ws}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            w0 = in(reg) w0h, w1 = in(reg) w1h, w0l = in(reg) w0l, w1l = in(reg) w1l,
                            x0 = in(reg) x0, x0l = in(reg) x0l,
                            ws = in(reg) ws, xs = in(reg) xs,
                            options(nostack, readonly)
                        );
                    } else {
                        asm!(
                            "tileloadd tmm4, [{w0} + {ws}*1]",
                            "tileloadd tmm5, [{w1} + {ws}*1]",
                            "tileloadd tmm6, [{x0} + {xs}*1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            w0 = in(reg) w0h, w1 = in(reg) w1h, x0 = in(reg) x0,
                            ws = in(reg) ws, xs = in(reg) xs,
                            options(nostack, readonly)
                        );
                    }
                    for _ in 0..lines_per_step {
                        if ahead < cur.ahead.end {
                            let p = ahead as *const i8;
                            _mm_prefetch::<_MM_HINT_T1>(p);
                            ahead += 64;
                        }
                    }
                    if let Some(nx) = &next {
                        let u1 = (unit + per_step).min(next_units);
                        split_units(parts[nx.pan.part].w, k, nx, unit..u1, then);
                        unit = u1;
                    }
                }
                if last {
                    asm!(
                        "tilestored [{c} + {xs}*1], tmm0",
                        "tilestored [{c} + {xs}*1 + 1024], tmm1",
                        "tilestored [{c} + {xs}*1 + 2048], tmm2",
                        "tilestored [{c} + {xs}*1 + 3072], tmm3",
                        c = in(reg) c[slot].as_mut_ptr(), xs = in(reg) xs,
                        options(nostack)
                    );
                    if let Some((s, mb, pair, pan)) = pending {
                        store_tiles(&c[s], m, mb, pair, pan, parts, round);
                    }
                    pending = Some((slot, mb, pair, cur.pan));
                    slot ^= 1;
                } else {
                    // Accumulators wait in memory for the next chunk (exact: f32 in, f32 out).
                    asm!(
                        "tilestored [{c} + {xs}*1], tmm0",
                        "tilestored [{c} + {xs}*1 + 1024], tmm1",
                        "tilestored [{c} + {xs}*1 + 2048], tmm2",
                        "tilestored [{c} + {xs}*1 + 3072], tmm3",
                        c = in(reg) s, xs = in(reg) xs,
                        options(nostack)
                    );
                }
                mb += 1 + pair as usize;
            }
            let Some(nx) = next else { break };
            split_units(parts[nx.pan.part].w, k, &nx, unit..next_units, then);
            cur = nx;
            parity ^= 1;
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    if let Some((s, mb, pair, pan)) = pending {
        store_tiles(&c[s], m, mb, pair, pan, parts, round);
    }
    PANEL.with(|p| *p.borrow_mut() = bufs);
}

/// Writes the accumulator tiles of row tiles `mb` (and `mb + 1` when `pair`) and panel `pan`
/// to its projection's output, adding the bias and rounding as `round` says. Tile (weight tile
/// a, row tile b) is `c[2a + b]`, laid out [column][row].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn store_tiles<T: Elem>(
    c: &[Tile; 4],
    m: usize,
    mb: usize,
    pair: bool,
    pan: Pan,
    parts: &[Part<'_, T>],
    round: StoreRound,
) {
    let Part {
        n, bias, out, gate, ..
    } = parts[pan.part];
    let (j, nr) = (pan.j, pan.nr);
    for a in 0..2 {
        let j0 = j + a * TR;
        if j0 >= j + nr {
            continue;
        }
        let ncols = (j + nr - j0).min(TR);
        let cmask: u16 = if ncols == TR {
            !0
        } else {
            ((1u32 << ncols) - 1) as u16
        };
        let bv = match bias {
            Some(b) => {
                let mut v = [0f32; TR];
                for (d, x) in v.iter_mut().enumerate().take(ncols) {
                    *x = b[j0 + d].to_f32();
                }
                _mm512_loadu_ps(v.as_ptr())
            }
            None => _mm512_setzero_ps(),
        };
        for b in 0..(1 + pair as usize) {
            let rows = load_transposed16(c[2 * a + b].0.as_ptr() as *const __m512i);
            let r0 = (mb + b) * TR;
            for (i, r) in rows.iter().enumerate().take(m.saturating_sub(r0).min(TR)) {
                let mut v = _mm512_add_ps(_mm512_castsi512_ps(*r), bv);
                if round == StoreRound::F16 {
                    // Round to nearest even, as every other f16 rounding in the crate.
                    v = _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
                }
                let dst = out.get().add((r0 + i) * n + j0);
                _mm512_mask_storeu_ps(dst, cmask, v);
                if let StoreRound::Elem(level) = round {
                    let row = std::slice::from_raw_parts_mut(dst, ncols);
                    super::round::round_in_place::<T>(level, row);
                }
                if let Some(g) = gate {
                    // The gate's tiles of these rows went out before this panel's first store.
                    let at = (r0 + i) * n + j0;
                    super::act::silu_gate_range::<T>(
                        super::SimdLevel::Avx512,
                        std::slice::from_raw_parts_mut(g.get().add(at), ncols),
                        std::slice::from_raw_parts(dst, ncols),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_panel_is_taken_once_and_idle_shares_are_taken_by_the_others() {
        let ns = [100, 37, 64, 1];
        let want: Vec<Pan> = [(0, 0, 32), (0, 32, 32), (0, 64, 32), (0, 96, 4), (1, 0, 32)]
            .into_iter()
            .chain([(1, 32, 5), (2, 0, 32), (2, 32, 32), (3, 0, 1)])
            .map(|(part, j, nr)| Pan { part, j, nr })
            .collect();
        // 300 rows: three groups of up to 8 row tiles.
        let panels = Panels::new(ns, 300, 3, false);
        // Threads 0 and 1 run to the end; thread 2 comes too late for any of its share.
        let taken: Vec<Vec<Vec<Pan>>> = std::thread::scope(|s| {
            let run = |t| {
                let panels = &panels;
                s.spawn(move || {
                    (0..3)
                        .map(|g| {
                            let mut held = None;
                            std::iter::from_fn(|| panels.claim(g, t, &mut held)).collect()
                        })
                        .collect()
                })
            };
            let (a, b) = (run(0), run(1));
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        for g in 0..3 {
            assert_eq!(panels.claim(g, 2, &mut None), None, "group {g}");
            let mut got: Vec<Pan> = taken.iter().flat_map(|t| t[g].clone()).collect();
            got.sort_by_key(|p| (p.part, p.j));
            assert_eq!(got, want, "group {g}");
        }
        // A thread starts at the front of its own share, in order. Checked on a thread alone:
        // beside it, a thread that starts first (as under an emulator or on a loaded host) may
        // take its whole share from the back before it claims anything.
        let alone = Panels::new(ns, 300, 3, false);
        let mut held = None;
        let first: Vec<Pan> = (0..3).map_while(|_| alone.claim(0, 0, &mut held)).collect();
        assert_eq!(first, want[..3]);
    }

    #[test]
    fn transpose16_transposes() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut src = Tile::default();
        for (i, v) in src.0.iter_mut().enumerate() {
            *v = i as u32;
        }
        // SAFETY: AVX-512F checked above; a tile's rows are 64-byte aligned.
        unsafe {
            let mut r = [_mm512_setzero_si512(); 16];
            for (i, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(src.0.as_ptr().add(16 * i) as *const _);
            }
            transpose16(&mut r);
            let loaded = load_transposed16(src.0.as_ptr() as *const __m512i);
            for rows in [r, loaded] {
                let mut got = [0u32; 256];
                for (i, v) in rows.iter().enumerate() {
                    _mm512_storeu_si512(got.as_mut_ptr().add(16 * i) as *mut _, *v);
                }
                for i in 0..16 {
                    for j in 0..16 {
                        assert_eq!(got[i * 16 + j], src.0[j * 16 + i], "({i}, {j})");
                    }
                }
            }
        }
    }

    #[test]
    fn split_is_exact_for_f16_values() {
        if !(is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")) {
            return;
        }
        let xs: Vec<f32> = (0..32)
            .map(|i| half::f16::from_f32(0.37 * (i as f32 - 13.5).powi(3) + 1e-3).to_f32())
            .collect();
        // SAFETY: AVX-512 F/BW/VL checked above.
        let (hi, lo) = unsafe {
            split32(
                _mm512_loadu_ps(xs.as_ptr()),
                _mm512_loadu_ps(xs.as_ptr().add(16)),
            )
        };
        // SAFETY: a vector is 32 u16 values.
        let (hi, lo) = unsafe {
            (
                std::mem::transmute::<__m512i, [u16; 32]>(hi),
                std::mem::transmute::<__m512i, [u16; 32]>(lo),
            )
        };
        // Word 2i holds value i, word 2i + 1 value 16 + i.
        for (word, want) in (0..16).flat_map(|i| [(2 * i, xs[i]), (2 * i + 1, xs[16 + i])]) {
            let h = half::bf16::from_bits(hi[word]).to_f32();
            let l = half::bf16::from_bits(lo[word]).to_f32();
            assert_eq!(h + l, want, "word {word}");
            assert!(
                l.abs() <= h.abs() * 2f32.powi(-7),
                "word {word}: lo {l} hi {h}"
            );
        }
    }
}
