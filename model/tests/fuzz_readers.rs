//! Property tests of the checkpoint readers on malformed input: truncations, flipped bytes,
//! huge declared lengths and counts, offsets out of range. Each must give an error (or a
//! parse), never a panic, and never an allocation of a declared size the file cannot hold.

mod common;

use halfstep_model::testmodel::{encode, write_safetensors, TinyModelSpec};
use halfstep_model::weights::gguf::{GgufFile, GgufTensors};
use halfstep_model::weights::{SafetensorsCheckpoint, TensorSource};
use halfstep_model::DType;
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::{Arc, OnceLock};

/// The system allocator, remembering the largest single allocation of each thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(layout.size())));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(new)));
        System.realloc(ptr, layout, new)
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Runs `f` and returns the largest allocation it made on this thread.
fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.with(|m| m.set(0));
    f();
    LARGEST.with(|m| m.get())
}

fn gguf_seed() -> &'static [u8] {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| common::tiny_gguf(&TinyModelSpec::default()))
}

fn safetensors_seed() -> &'static [u8] {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| {
        let spec = TinyModelSpec::default();
        let p = common::scratch("seed.safetensors");
        let enc: Vec<_> = spec
            .tensors()
            .into_iter()
            .take(4)
            .map(|(n, s, v)| (n, s, encode(DType::Float16, &v)))
            .collect();
        write_safetensors(&p, DType::Float16, &enc).unwrap();
        let b = std::fs::read(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        b
    })
}

/// One edit of a valid file.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Flip(usize, u8),
    /// Overwrite 8 bytes with a large little-endian integer (a length, count or offset).
    Huge(usize, u64),
    /// Overwrite 4 bytes (a type tag or dimension count).
    Word(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let big = prop_oneof![
        Just(u64::MAX),
        Just(1u64 << 62),
        Just(1u64 << 40),
        Just(u32::MAX as u64),
        any::<u64>(),
    ];
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), big).prop_map(|(i, v)| Mutation::Huge(i, v)),
        (any::<usize>(), any::<u32>()).prop_map(|(i, v)| Mutation::Word(i, v)),
    ]
}

/// Applies mutations; positions mostly land in the header, where lengths and offsets live.
fn mutate(seed: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = seed.to_vec();
    let at = |i: usize, len: usize, w: usize| {
        let span = if i.is_multiple_of(4) {
            len
        } else {
            4096.min(len)
        };
        (i / 4) % span.saturating_sub(w).max(1)
    };
    for m in muts {
        match *m {
            Mutation::Truncate(n) => {
                let n = n % (b.len() + 1);
                b.truncate(n)
            }
            Mutation::Flip(i, x) if !b.is_empty() => {
                let i = at(i, b.len(), 1);
                b[i] ^= x
            }
            Mutation::Huge(i, v) if b.len() >= 8 => {
                let i = at(i, b.len(), 8);
                b[i..i + 8].copy_from_slice(&v.to_le_bytes())
            }
            Mutation::Word(i, v) if b.len() >= 4 => {
                let i = at(i, b.len(), 4);
                b[i..i + 4].copy_from_slice(&v.to_le_bytes())
            }
            _ => {}
        }
    }
    b
}

/// Reads every tensor a source lists, the way a load does.
fn read_all(src: &dyn TensorSource) {
    for (name, _) in src.tensor_infos() {
        let _ = src.read_f32(&name);
        let _ = src.raw_bytes(&name);
    }
}

/// Allocations may be a few times the input (tensors widened to f32), never a declared size.
fn allocation_bound(input: usize) -> usize {
    8 * input + (1 << 20)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_gguf_is_an_error_or_a_model_never_a_panic(
        muts in proptest::collection::vec(mutation(), 1..4)
    ) {
        let bytes = mutate(gguf_seed(), &muts);
        let n = bytes.len();
        let peak = largest_allocation(|| {
            if let Ok(g) = GgufFile::from_bytes(bytes) {
                let _ = g.model_config();
                read_all(&GgufTensors(Arc::new(g)));
            }
        });
        prop_assert!(peak <= allocation_bound(n), "allocated {peak} bytes for a {n}-byte file");
    }

    #[test]
    fn mutated_safetensors_is_an_error_or_tensors_never_a_panic(
        muts in proptest::collection::vec(mutation(), 1..4)
    ) {
        let bytes = mutate(safetensors_seed(), &muts);
        let n = bytes.len();
        let peak = largest_allocation(|| {
            if let Ok(st) = SafetensorsCheckpoint::from_bytes(bytes) {
                read_all(&st);
            }
        });
        prop_assert!(peak <= allocation_bound(n), "allocated {peak} bytes for a {n}-byte file");
    }

    #[test]
    fn random_bytes_behind_a_valid_magic_are_an_error(
        tail in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        let mut g = b"GGUF\x03\x00\x00\x00".to_vec();
        g.extend(&tail);
        let n = g.len();
        let peak = largest_allocation(|| {
            let _ = GgufFile::from_bytes(g).map(|g| read_all(&GgufTensors(Arc::new(g))));
        });
        prop_assert!(peak <= allocation_bound(n));
        let mut s = (tail.len() as u64).to_le_bytes().to_vec();
        s.extend(&tail);
        let n = s.len();
        let peak = largest_allocation(|| {
            let _ = SafetensorsCheckpoint::from_bytes(s).map(|st| read_all(&st));
        });
        prop_assert!(peak <= allocation_bound(n));
    }
}
