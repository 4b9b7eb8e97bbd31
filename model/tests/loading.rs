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

#[test]
fn gguf_and_safetensors_of_the_same_weights_give_identical_logits() {
    let spec = TinyModelSpec::default();
    let dir = common::tiny_model_dir(&spec, "gguf");
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, common::tiny_gguf(&spec)).unwrap();
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
    let bytes = common::tiny_gguf(&TinyModelSpec::default());
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
