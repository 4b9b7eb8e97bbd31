//! Compute kernels shared by the server and the trainer.
//!
//! Every kernel accumulates in f32 with a reduction order fixed per output element (see
//! numerics.md): results never depend on batch size, thread count, K/V layout or SIMD level.

pub mod act;
#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod bandwidth;
pub mod dot;
pub mod gemm;
pub mod math;
pub mod norm;
pub mod pool;
pub mod rope;
pub mod round;
pub mod share;
pub mod softmax;

use std::sync::{Arc, OnceLock};

pub use pool::ThreadPool;

/// The instruction-set level a kernel call runs at. All levels compute the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 (F, BW, VL) + FMA + F16C.
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU supports.
    pub fn detect() -> SimdLevel {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl");
            if avx512 {
                return SimdLevel::Avx512;
            }
            if avx2 {
                return SimdLevel::Avx2;
            }
        }
        SimdLevel::Portable
    }

    /// Every level this CPU can run, lowest first (what parity tests iterate over).
    pub fn available() -> Vec<SimdLevel> {
        let best = Self::detect();
        [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512]
            .into_iter()
            .filter(|l| *l <= best)
            .collect()
    }

    /// Parses `portable`, `avx2` or `avx512`.
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" => Some(SimdLevel::Portable),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" | "avx-512" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    /// [`from_env`](Self::from_env), read once per process (for code without a [`Kernels`]).
    pub fn cached() -> SimdLevel {
        static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
        *LEVEL.get_or_init(Self::from_env)
    }

    /// The level to use by default: `HALFSTEP_SIMD` if set (capped at what the CPU has), else
    /// the best detected.
    pub fn from_env() -> SimdLevel {
        let best = Self::detect();
        match std::env::var("HALFSTEP_SIMD")
            .ok()
            .as_deref()
            .and_then(Self::parse)
        {
            Some(l) => l.min(best),
            None => best,
        }
    }
}

/// The execution context of kernel calls: SIMD level and worker pool.
#[derive(Clone)]
pub struct Kernels {
    /// Instruction-set level.
    pub level: SimdLevel,
    /// Workers that split output columns/rows.
    pub pool: Arc<ThreadPool>,
    /// Matrix products may take the faster path that is not bitwise equal to the parity
    /// kernels (`--kernels fast`, see [`KernelMode`]).
    pub fast: bool,
}

/// Which matrix-product kernels a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelMode {
    /// The striped-order kernels of numerics.md: bitwise equal on every CPU and dispatch level.
    #[default]
    Parity,
    /// Products of 16 or more rows in f16 or bf16 on AMX tiles where the CPU has them (Intel
    /// Sapphire Rapids and later), within f32 summation error of parity; elsewhere the parity
    /// kernels.
    Fast,
}

impl KernelMode {
    /// Parses `parity` or `fast`.
    pub fn parse(s: &str) -> Option<KernelMode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "parity" => Some(KernelMode::Parity),
            "fast" => Some(KernelMode::Fast),
            _ => None,
        }
    }

    /// `HALFSTEP_KERNELS` if set to a known mode, else parity.
    pub fn from_env() -> KernelMode {
        std::env::var("HALFSTEP_KERNELS")
            .ok()
            .as_deref()
            .and_then(Self::parse)
            .unwrap_or_default()
    }

    /// Whether this mode changes any result on this CPU (fast, and AMX present).
    pub fn is_active(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            self == KernelMode::Fast && amx::available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels")
            .field("level", &self.level)
            .field("threads", &self.pool.threads())
            .field("fast", &self.fast)
            .finish()
    }
}

impl Kernels {
    /// A context with an explicit level and pool.
    pub fn new(level: SimdLevel, pool: Arc<ThreadPool>) -> Kernels {
        Kernels {
            level,
            pool,
            fast: false,
        }
    }

    /// The same context with the fast (non-parity) matrix products on or off.
    pub fn with_mode(mut self, mode: KernelMode) -> Kernels {
        self.fast = mode == KernelMode::Fast;
        self
    }

    /// A context with a new pool of `threads` workers (including the caller).
    pub fn with_threads(level: SimdLevel, threads: usize) -> Kernels {
        Kernels::new(level, Arc::new(ThreadPool::new(threads)))
    }

    /// The process-wide default: level from `HALFSTEP_SIMD`, kernel mode from
    /// `HALFSTEP_KERNELS`, threads from `HALFSTEP_NUM_THREADS` or the number of cores.
    pub fn global() -> Kernels {
        static POOL: OnceLock<Arc<ThreadPool>> = OnceLock::new();
        let pool = POOL.get_or_init(|| Arc::new(ThreadPool::new(default_threads())));
        Kernels::new(SimdLevel::from_env(), pool.clone()).with_mode(KernelMode::from_env())
    }
}

/// Threads to use by default: `HALFSTEP_NUM_THREADS`, else the available cores.
pub fn default_threads() -> usize {
    std::env::var("HALFSTEP_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// A buffer shared with the pool's threads, each of which writes a disjoint part of it.
pub(crate) struct SharedOut<T = f32>(*mut T);
// SAFETY: callers hand each thread a disjoint part of the buffer (see every use).
unsafe impl<T> Send for SharedOut<T> {}
unsafe impl<T> Sync for SharedOut<T> {}

// Copy without requiring `T: Copy` (the wrapper is only a pointer).
impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// Wraps `buf`, which must outlive every use of the copies.
    pub(crate) fn new(buf: &mut [T]) -> SharedOut<T> {
        SharedOut(buf.as_mut_ptr())
    }

    // A method call makes closures capture the whole wrapper (Sync), not its raw field.
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Splits `n` items into `parts` contiguous ranges whose starts are multiples of `align`.
pub(crate) fn split_range(n: usize, parts: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    (0..parts.max(1))
        .map(|p| part_range(n, parts, align, p))
        .collect()
}

/// Range `p` of [`split_range`]`(n, parts, align)`, without building the others (a kernel
/// call hands each thread its own this way, allocating nothing).
pub(crate) fn part_range(n: usize, parts: usize, align: usize, p: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(align).div_ceil(parts.max(1));
    (p * per * align).min(n)..((p + 1) * per * align).min(n)
}
