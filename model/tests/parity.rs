//! Parity: a row's logits are bitwise identical alone or in a ragged batch of 1..64 rows, with 1
//! or 2 threads, with K/V paged (any block size) or contiguous, prefilled whole or in chunks,
//! and at every SIMD level the machine has.

mod common;

use half::{bf16, f16};
use halfstep_model::testmodel::TinyModelSpec;
use halfstep_model::{
    Architecture, ContiguousKv, Elem, Kernels, KvCache, LogitsFor, Model, PagedKv, SimdLevel, Span,
};

/// 64 sequences of lengths 1..=40 over the tiny vocabulary.
fn sequences() -> Vec<Vec<u32>> {
    let mut rng = halfstep_model::testmodel::SeededNormal::new(99);
    (0..64)
        .map(|i| {
            let len = 1 + (i * 7) % 40;
            (0..len)
                .map(|_| (rng.uniform() * 259.0) as u32 % 259)
                .collect()
        })
        .collect()
}

/// Logits at every position of `seq`, computed alone with contiguous K/V on one thread.
fn alone<T: Elem>(m: &Model<T>, seq: &[u32]) -> Vec<f32> {
    let c = m.config();
    let mut kv = ContiguousKv::<T>::new(c.num_hidden_layers, c.kv_dim());
    let span = Span {
        seq: 0,
        start_pos: 0,
        tokens: seq,
        logits: LogitsFor::All,
    };
    m.forward(&[span], &mut kv).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Prefills every sequence in one ragged batch with `kv`, then checks each row.
fn batched_matches_alone<T: Elem>(m: &Model<T>, kv: &mut dyn KvCache<T>, refs: &[Vec<f32>]) {
    let seqs = sequences();
    let spans: Vec<Span> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| Span {
            seq: i,
            start_pos: 0,
            tokens: s,
            logits: LogitsFor::All,
        })
        .collect();
    let out = m.forward(&spans, kv).unwrap();
    let mut off = 0;
    for (i, r) in refs.iter().enumerate() {
        assert_eq!(bits(&out[off..off + r.len()]), bits(r), "sequence {i}");
        off += r.len();
    }
    assert_eq!(off, out.len());
}

/// Decodes the last token of every sequence as a batch of the first `b` sequences, after
/// prefilling all but the last token in chunks of `chunk`.
fn decode_step_matches_alone<T: Elem>(m: &Model<T>, refs: &[Vec<f32>], b: usize, chunk: usize) {
    let c = m.config();
    let vocab = c.vocab_size;
    let seqs = sequences();
    let mut kv = PagedKv::<T>::new(c.num_hidden_layers, c.kv_dim(), 4);
    for (i, s) in seqs.iter().enumerate().take(b) {
        let body = &s[..s.len() - 1];
        for (ci, part) in body.chunks(chunk).enumerate() {
            let span = Span {
                seq: i,
                start_pos: ci * chunk,
                tokens: part,
                logits: LogitsFor::Last,
            };
            let out = m.forward(&[span], &mut kv).unwrap();
            let p = ci * chunk + part.len() - 1;
            assert_eq!(
                bits(&out),
                bits(&refs[i][p * vocab..(p + 1) * vocab]),
                "chunk {ci}"
            );
        }
    }
    let spans: Vec<Span> = seqs
        .iter()
        .enumerate()
        .take(b)
        .map(|(i, s)| Span {
            seq: i,
            start_pos: s.len() - 1,
            tokens: &s[s.len() - 1..],
            logits: LogitsFor::Last,
        })
        .collect();
    let out = m.forward(&spans, &mut kv).unwrap();
    for (i, s) in seqs.iter().enumerate().take(b) {
        let p = s.len() - 1;
        assert_eq!(
            bits(&out[i * vocab..(i + 1) * vocab]),
            bits(&refs[i][p * vocab..(p + 1) * vocab]),
            "batch {b}, sequence {i}"
        );
    }
}

fn parity<T: Elem>(arch: Architecture) {
    let spec = TinyModelSpec {
        architecture: arch,
        ..TinyModelSpec::default()
    };
    let tag = format!("parity-{:?}-{}", arch, T::DTYPE);
    let base = common::load_tiny::<T>(&spec, &tag, Kernels::with_threads(SimdLevel::detect(), 1));
    let refs: Vec<Vec<f32>> = sequences().iter().map(|s| alone(&base, s)).collect();
    let c = base.config().clone();
    for level in SimdLevel::available() {
        for threads in [1, 2] {
            let m = base.with_kernels(Kernels::with_threads(level, threads));
            let mut contiguous = ContiguousKv::<T>::new(c.num_hidden_layers, c.kv_dim());
            batched_matches_alone(&m, &mut contiguous, &refs);
            for block in [1, 3, 16] {
                let mut paged = PagedKv::<T>::new(c.num_hidden_layers, c.kv_dim(), block);
                batched_matches_alone(&m, &mut paged, &refs);
            }
        }
    }
    let m2 = base.with_kernels(Kernels::with_threads(SimdLevel::detect(), 2));
    for b in [1, 2, 5, 17, 64] {
        decode_step_matches_alone(&m2, &refs, b, 7);
    }
    decode_step_matches_alone(&base, &refs, 64, 1);
}

#[test]
fn llama_f16_rows_are_bitwise_identical_in_any_batch_layout_level_and_thread_count() {
    parity::<f16>(Architecture::Llama);
}

#[test]
fn llama_bf16_rows_are_bitwise_identical_in_any_batch_layout_level_and_thread_count() {
    parity::<bf16>(Architecture::Llama);
}

#[test]
fn llama_f32_rows_are_bitwise_identical_in_any_batch_layout_level_and_thread_count() {
    parity::<f32>(Architecture::Llama);
}

#[test]
fn qwen2_with_qkv_bias_f16_rows_are_bitwise_identical() {
    parity::<f16>(Architecture::Qwen2);
}

#[test]
fn tiny_model_greedy_output_is_not_degenerate() {
    let m = common::load_tiny::<f32>(&TinyModelSpec::default(), "greedy", common::kernels1());
    let c = m.config().clone();
    let mut kv = ContiguousKv::<f32>::new(c.num_hidden_layers, c.kv_dim());
    let mut toks = vec![3 + b'H' as u32, 3 + b'i' as u32];
    for _ in 0..24 {
        let span = Span {
            seq: 0,
            start_pos: 0,
            tokens: &toks,
            logits: LogitsFor::Last,
        };
        kv.clear(0);
        let l = m.forward(&[span], &mut kv).unwrap();
        let next = (0..c.vocab_size)
            .max_by(|&a, &b| l[a].total_cmp(&l[b]))
            .unwrap();
        toks.push(next as u32);
    }
    let distinct: std::collections::HashSet<_> = toks[2..].iter().collect();
    assert!(
        distinct.len() >= 4,
        "greedy output repeats one token: {toks:?}"
    );
}
