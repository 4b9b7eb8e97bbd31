//! A decode step allocates nothing once its buffers have grown: the forward pass, the matrix
//! products, the norms and attention keep their buffers between calls, at every SIMD level,
//! with one thread or two, from one decoding sequence to a batch on the wide-panel path.
//!
//! Every allocation of the process goes through the counting allocator below, so this file
//! holds a single test: nothing else runs while a step is counted.

mod common;

use half::f16;
use halfstep_model::testmodel::TinyModelSpec;
use halfstep_model::{Elem, Kernels, LogitsFor, Model, PagedKv, SimdLevel, Span};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting allocations (and reallocations).
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Decodes `batch` sequences (prompts of 5 tokens, then steps of one token each) and returns
/// how many allocations each of the last two steps made; what runs before grows the buffers.
fn allocations_per_step<T: Elem>(m: &Model<T>, batch: usize) -> [usize; 2] {
    let c = m.config();
    // Blocks of 64 positions: the steps below stay inside the first block of each sequence,
    // so the cache itself has nothing to allocate either.
    let mut kv = PagedKv::<T>::new(c.num_hidden_layers, c.kv_dim(), 64);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|i| (0..5).map(|j| (3 + 17 * i + 5 * j) as u32 % 259).collect())
        .collect();
    let spans: Vec<Span> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Span {
            seq: i,
            start_pos: 0,
            tokens: p,
            logits: LogitsFor::Last,
        })
        .collect();
    let mut logits = Vec::new();
    m.forward_into(&spans, &mut kv, &mut logits).unwrap();
    // Per-thread buffers grow with the context (amortised, as vectors do); a longer sequence
    // first sizes them beyond what the steps below attend to.
    let long: Vec<u32> = (0..48).map(|j| 3 + j % 250).collect();
    let warm = [Span {
        seq: batch,
        start_pos: 0,
        tokens: &long,
        logits: LogitsFor::Last,
    }];
    m.forward_into(&warm, &mut kv, &mut logits).unwrap();
    let mut next: Vec<[u32; 1]> = (0..batch).map(|i| [(40 + i) as u32]).collect();
    let mut counts = Vec::new();
    for step in 0..4 {
        let spans: Vec<Span> = next
            .iter()
            .enumerate()
            .map(|(i, t)| Span {
                seq: i,
                start_pos: 5 + step,
                tokens: t,
                logits: LogitsFor::Last,
            })
            .collect();
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        m.forward_into(&spans, &mut kv, &mut logits).unwrap();
        counts.push(ALLOCATIONS.load(Ordering::SeqCst) - before);
        drop(spans);
        for (i, t) in next.iter_mut().enumerate() {
            // Greedy, so the steps depend on the logits and cannot be skipped.
            let row = &logits[i * c.vocab_size..(i + 1) * c.vocab_size];
            let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]));
            t[0] = best.unwrap() as u32;
        }
    }
    [counts[2], counts[3]]
}

#[test]
fn decode_steps_allocate_nothing_once_warm() {
    // Wide enough that the products and norms are shared out over two threads and batches of
    // 16 or more rows take the wide-panel path where the CPU has AVX-512.
    let spec = TinyModelSpec {
        hidden: 256,
        intermediate: 512,
        heads: 8,
        kv_heads: 2,
        ..TinyModelSpec::default()
    };
    let base = common::load_tiny::<f16>(&spec, "alloc", common::kernels1());
    for level in SimdLevel::available() {
        for threads in [1, 2] {
            let m = base.with_kernels(Kernels::with_threads(level, threads));
            for batch in [1, 3, 20] {
                let counts = allocations_per_step(&m, batch);
                assert_eq!(
                    counts,
                    [0, 0],
                    "allocations in a decode step at {level:?}, {threads} threads, batch {batch}"
                );
            }
        }
    }
}
