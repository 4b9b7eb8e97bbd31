//! Helpers shared by the model crate's integration tests.
#![allow(dead_code)]

use halfstep_model::testmodel::TinyModelSpec;
use halfstep_model::{Checkpoint, Elem, Kernels, Model, SimdLevel};
use std::path::PathBuf;

#[path = "../../../tests/common/scratch.rs"]
mod scratch;
pub use scratch::scratch;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The default model's GGUF, if `scripts/fetch-default-model.sh` has fetched it.
///
/// In CI (`CI` set) its absence is a failure: `.ci/run` fetches it first.
pub fn default_model() -> Option<PathBuf> {
    let p = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.is_file() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{} is missing; run scripts/fetch-default-model.sh",
            p.display()
        );
    }
    eprintln!(
        "skipping: {} not found (run scripts/fetch-default-model.sh)",
        p.display()
    );
    None
}

/// Writes a tiny model into a fresh temporary directory and returns the directory.
pub fn tiny_model_dir(spec: &TinyModelSpec, tag: &str) -> PathBuf {
    let dir = scratch(&format!("{tag}-{}", spec.seed));
    let _ = std::fs::remove_dir_all(&dir);
    spec.write(&dir).expect("writing the tiny model");
    dir
}

/// Loads the tiny model in run dtype `T` on the given kernels.
pub fn load_tiny<T: Elem>(spec: &TinyModelSpec, tag: &str, kernels: Kernels) -> Model<T> {
    let dir = tiny_model_dir(spec, tag);
    let ck = Checkpoint::open(&dir).expect("opening the tiny model");
    let m = Model::<T>::load(ck.config, &*ck.tensors, kernels).expect("loading the tiny model");
    let _ = std::fs::remove_dir_all(&dir);
    m
}

/// One-thread kernels at the best level.
pub fn kernels1() -> Kernels {
    Kernels::with_threads(SimdLevel::detect(), 1)
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = halfstep_model::testmodel::SeededNormal::new(seed);
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
}

// ---- GGUF ----

/// Appends a GGUF string (u64 length, bytes).
pub fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// A GGUF metadata value.
pub enum Meta<'a> {
    U32(u32),
    F32(f32),
    Str(&'a str),
}

/// A GGUF v3 file of the tiny model's tensors as F32, with Q/K rows permuted as llama.cpp's
/// converter does, so loading must undo it.
pub fn tiny_gguf(spec: &TinyModelSpec) -> Vec<u8> {
    let c = spec.config();
    let meta: Vec<(&str, Meta)> = vec![
        ("general.architecture", Meta::Str("llama")),
        ("llama.block_count", Meta::U32(c.num_hidden_layers as u32)),
        (
            "llama.context_length",
            Meta::U32(c.max_position_embeddings as u32),
        ),
        ("llama.embedding_length", Meta::U32(c.hidden_size as u32)),
        (
            "llama.feed_forward_length",
            Meta::U32(c.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count",
            Meta::U32(c.num_attention_heads as u32),
        ),
        (
            "llama.attention.head_count_kv",
            Meta::U32(c.num_key_value_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(c.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base", Meta::F32(c.rope_theta as f32)),
        ("llama.vocab_size", Meta::U32(c.vocab_size as u32)),
    ];
    let gguf_name = |hf: &str| -> String {
        let r = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = r.iter().find(|(h, _)| *h == hf) {
            return g.to_string();
        }
        let rest = hf.strip_prefix("model.layers.").unwrap();
        let (l, rest) = rest.split_once('.').unwrap();
        let map = [
            ("input_layernorm.weight", "attn_norm.weight"),
            ("post_attention_layernorm.weight", "ffn_norm.weight"),
            ("self_attn.q_proj.weight", "attn_q.weight"),
            ("self_attn.k_proj.weight", "attn_k.weight"),
            ("self_attn.v_proj.weight", "attn_v.weight"),
            ("self_attn.o_proj.weight", "attn_output.weight"),
            ("mlp.gate_proj.weight", "ffn_gate.weight"),
            ("mlp.up_proj.weight", "ffn_up.weight"),
            ("mlp.down_proj.weight", "ffn_down.weight"),
        ];
        let g = map.iter().find(|(h, _)| *h == rest).unwrap().1;
        format!("blk.{l}.{g}")
    };
    // llama.cpp: reshape(heads, 2, hd/2, cols).swapaxes(1, 2)
    let permute = |v: &[f32], rows: usize, cols: usize, heads: usize| -> Vec<f32> {
        let (hd, half) = (rows / heads, rows / heads / 2);
        let mut out = vec![0f32; v.len()];
        for h in 0..heads {
            for a in 0..2 {
                for i in 0..half {
                    let src = h * hd + a * half + i;
                    let dst = h * hd + 2 * i + a;
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&v[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    };
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = spec
        .tensors()
        .into_iter()
        .map(|(n, s, v)| {
            let v = if n.ends_with("q_proj.weight") {
                permute(&v, s[0], s[1], c.num_attention_heads)
            } else if n.ends_with("k_proj.weight") {
                permute(&v, s[0], s[1], c.num_key_value_heads)
            } else {
                v
            };
            (gguf_name(&n), s, v)
        })
        .collect();
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::Str(s) => {
                b.extend(8u32.to_le_bytes());
                put_str(&mut b, s);
            }
        }
    }
    let mut off = 0u64;
    for (n, s, v) in &tensors {
        put_str(&mut b, n);
        b.extend((s.len() as u32).to_le_bytes());
        for d in s.iter().rev() {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(0u32.to_le_bytes());
        b.extend(off.to_le_bytes());
        off += (v.len() * 4).div_ceil(32) as u64 * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for (_, _, v) in &tensors {
        let start = b.len();
        b.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        while (b.len() - start) % 32 != 0 {
            b.push(0);
        }
    }
    b
}
