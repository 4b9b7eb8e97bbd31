//! Loading checkpoints: safetensors and GGUF give the same model; malformed files give errors
//! that name the problem, never a panic; GGUF dequantisation equals gguf-py's reference.

mod common;

use halfstep_model::testmodel::{encode, write_safetensors, TinyModelSpec};
use halfstep_model::weights::gguf::GgufFile;
use halfstep_model::weights::quant::{dequantize, GgmlType};
use halfstep_model::{Checkpoint, ContiguousKv, DType, LogitsFor, Model, Span, WeightError};
use std::path::{Path, PathBuf};

fn open_err(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Err(e) => e.to_string(),
        Ok(ck) => match Model::<f32>::load(ck.config, &*ck.tensors, common::kernels1()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("loading {} succeeded", dir.display()),
        },
    }
}

/// Rewrites the tiny model's weights after `edit` changes the tensor list.
fn with_tensors(tag: &str, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) -> PathBuf {
    let spec = TinyModelSpec::default();
    let dir = common::tiny_model_dir(&spec, tag);
    let mut t = spec.tensors();
    edit(&mut t);
    let enc: Vec<_> = t
        .into_iter()
        .map(|(n, s, v)| (n, s, encode(DType::Float32, &v)))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), DType::Float32, &enc).unwrap();
    dir
}

#[test]
fn mis_shaped_tensor_is_named_in_the_error() {
    let dir = with_tensors("shape", |t| {
        let e = t
            .iter_mut()
            .find(|e| e.0.ends_with("layers.1.self_attn.k_proj.weight"))
            .unwrap();
        e.1 = vec![35, 72];
        e.2.truncate(35 * 72);
    });
    let e = open_err(&dir);
    assert!(
        e.contains("model.layers.1.self_attn.k_proj.weight") && e.contains("[35, 72]"),
        "{e}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = with_tensors("missing", |t| t.retain(|e| e.0 != "model.norm.weight"));
    let e = open_err(&dir);
    assert!(e.contains("missing tensor 'model.norm.weight'"), "{e}");
    let dir = with_tensors("extra", |t| {
        t.push(("model.extra.weight".into(), vec![2], vec![0.0; 2]))
    });
    let e = open_err(&dir);
    assert!(e.contains("unexpected tensor 'model.extra.weight'"), "{e}");
}

#[test]
fn non_finite_value_is_rejected_with_the_tensor_name() {
    let dir = with_tensors("nan", |t| t[3].2[5] = f32::NAN);
    let name = TinyModelSpec::default().tensors()[3].0.clone();
    let e = open_err(&dir);
    assert!(e.contains(&name) && e.contains("non-finite"), "{e}");
}

#[test]
fn truncated_safetensors_file_is_an_error() {
    let dir = common::tiny_model_dir(&TinyModelSpec::default(), "trunc");
    let f = dir.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    for cut in [len - 1, len / 2, 100, 9, 3] {
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_len(cut).unwrap();
        let e = open_err(&dir);
        assert!(e.contains("invalid safetensors"), "cut {cut}: {e}");
    }
}

#[test]
fn unknown_architecture_is_named() {
    let dir = common::tiny_model_dir(&TinyModelSpec::default(), "arch");
    let cfg = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("LlamaForCausalLM", "FalconForCausalLM");
    std::fs::write(&cfg, text).unwrap();
    let e = open_err(&dir);
    assert!(
        e.contains("unsupported model architecture 'FalconForCausalLM'"),
        "{e}"
    );
}

#[test]
fn sharded_safetensors_index_loads_the_same_model() {
    let spec = TinyModelSpec::default();
    let dir = common::tiny_model_dir(&spec, "shard");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let t = spec.tensors();
    let (a, b) = t.split_at(t.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let enc: Vec<_> = part
            .iter()
            .map(|(n, s, v)| (n.clone(), s.clone(), encode(DType::Float16, v)))
            .collect();
        write_safetensors(&dir.join(&file), DType::Float16, &enc).unwrap();
        for (n, _, _) in part.iter() {
            map.insert(n.clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let m = Model::<half::f16>::load(ck.config, &*ck.tensors, common::kernels1()).unwrap();
    let p = m.param("model.layers.1.mlp.down_proj.weight").unwrap();
    let want = &t
        .iter()
        .find(|e| e.0 == "model.layers.1.mlp.down_proj.weight")
        .unwrap()
        .2;
    assert!(p
        .data
        .iter()
        .zip(want)
        .all(|(a, &b)| *a == half::f16::from_f32(b)));
}

// ---- GGUF ----

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

enum Meta<'a> {
    U32(u32),
    F32(f32),
    Str(&'a str),
}

/// A GGUF v3 file of the tiny model's tensors as F32, with Q/K rows permuted as llama.cpp's
/// converter does, so loading must undo it.
fn tiny_gguf(spec: &TinyModelSpec) -> Vec<u8> {
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

#[test]
fn gguf_and_safetensors_of_the_same_weights_give_identical_logits() {
    let spec = TinyModelSpec::default();
    let dir = common::tiny_model_dir(&spec, "gguf");
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, tiny_gguf(&spec)).unwrap();
    let from_gguf = {
        let ck = Checkpoint::open(&path).unwrap();
        assert_eq!(ck.config.num_key_value_heads, 2);
        assert!(!ck.config.tie_word_embeddings);
        Model::<f32>::load(ck.config, &*ck.tensors, common::kernels1()).unwrap()
    };
    let from_st = common::load_tiny::<f32>(&spec, "gguf-st", common::kernels1());
    let toks: Vec<u32> = (0..30).map(|i| (i * 37 + 5) % 259).collect();
    let run = |m: &Model<f32>| {
        let c = m.config();
        let mut kv = ContiguousKv::<f32>::new(c.num_hidden_layers, c.kv_dim());
        m.forward(
            &[Span {
                seq: 0,
                start_pos: 0,
                tokens: &toks,
                logits: LogitsFor::All,
            }],
            &mut kv,
        )
        .unwrap()
    };
    assert_eq!(run(&from_gguf), run(&from_st));
}

#[test]
fn truncated_or_corrupt_gguf_is_an_error_never_a_panic() {
    let bytes = tiny_gguf(&TinyModelSpec::default());
    // Every cut inside the header and directory, and a few in the data.
    let header_end = 2000.min(bytes.len());
    for cut in (0..header_end).chain([bytes.len() / 2, bytes.len() - 1]) {
        let r = GgufFile::from_bytes(bytes[..cut].to_vec());
        assert!(
            matches!(r, Err(WeightError::Gguf(_))),
            "cut at {cut} parsed"
        );
    }
    // A declared string length of 2^60 must be refused before anything is allocated.
    let mut huge = bytes.clone();
    huge[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(GgufFile::from_bytes(huge).is_err());
    // A declared tensor count far beyond the file.
    let mut many = bytes.clone();
    many[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(GgufFile::from_bytes(many).is_err());
    // Flipping single bytes anywhere in the header gives an error or a parse, never a panic.
    for i in 0..header_end {
        let mut b = bytes.clone();
        b[i] ^= 0xA5;
        let _ = GgufFile::from_bytes(b).map(|g| g.model_config());
    }
}

#[test]
fn dequantisation_equals_gguf_py_reference_bitwise() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf_dequant.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let mut seen = Vec::new();
    for case in v["cases"].as_array().unwrap() {
        let id: u32 = case["ggml_type_id"]
            .as_u64()
            .map(|x| x as u32)
            .unwrap_or_else(|| case["ggml_type_id"].as_str().unwrap().parse().unwrap());
        let t = GgmlType::from_id(id).unwrap();
        let hex = case["bytes_hex"].as_str().unwrap();
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        let got = dequantize(t, &bytes);
        assert_eq!(got.len(), want.len(), "{t:?}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{t:?} value {i}: {a} vs {b}");
        }
        seen.push(t);
    }
    for t in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        assert!(seen.contains(&t), "no fixture for {t:?}");
    }
}
