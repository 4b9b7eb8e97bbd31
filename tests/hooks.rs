//! Black-box tests of the trainer hooks: weight updates (upload, disk, multi-part, partial),
//! rejected updates leaving everything unchanged, pause/resume, weight versions on responses
//! under load, and `/v1/logprobs` agreeing with sampling.

mod common;

use common::{client, post, post_stream, Server};
use halfstep_model::testmodel::{encode, write_safetensors, TinyModelSpec};
use halfstep_model::DType;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const ADMIN: &str = "admin-secret";

fn model_with_seed(seed: u64, tag: &str) -> PathBuf {
    let dir = common::scratch(tag);
    let _ = std::fs::remove_dir_all(&dir);
    TinyModelSpec {
        seed,
        ..Default::default()
    }
    .write(&dir)
    .unwrap();
    dir
}

/// A safetensors file (bytes) of the given tensors in f32.
fn safetensors(tensors: &[(String, Vec<usize>, Vec<f32>)], tag: &str) -> Vec<u8> {
    let p = common::scratch(&format!("{tag}.safetensors"));
    let enc: Vec<_> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), encode(DType::Float32, v)))
        .collect();
    write_safetensors(&p, DType::Float32, &enc).unwrap();
    let b = std::fs::read(&p).unwrap();
    let _ = std::fs::remove_file(&p);
    b
}

fn admin_post(url: &str, body: Vec<u8>) -> (u16, Value) {
    let r = client()
        .post(url)
        .bearer_auth(ADMIN)
        .body(body)
        .send()
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().unwrap_or(Value::Null))
}

fn admin_get(url: &str) -> Value {
    client()
        .get(url)
        .bearer_auth(ADMIN)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn greedy(s: &Server, prompt: &str) -> (String, Vec<f64>) {
    let (st, r) = post(
        &client(),
        &s.url("/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": true, "logprobs": 0}),
    );
    assert_eq!(st, 200, "{r}");
    let lps = r["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (r["choices"][0]["text"].as_str().unwrap().to_string(), lps)
}

fn server(model: &Path, extra: &[&str]) -> Server {
    let mut args = vec!["--admin-key", ADMIN];
    args.extend_from_slice(extra);
    Server::start(model, &args)
}

#[test]
fn full_upload_serves_the_new_checkpoint_and_bumps_the_version() {
    let a = model_with_seed(1, "up-a");
    let b = model_with_seed(2, "up-b");
    let sa = server(&a, &[]);
    let sb = server(&b, &[]);
    let want = greedy(&sb, "hello");
    assert_ne!(greedy(&sa, "hello"), want);
    let body = std::fs::read(b.join("model.safetensors")).unwrap();
    let (st, r) = admin_post(&sa.url("/update_weights?weight_version=7"), body);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["success"], true);
    assert_eq!(r["weight_version"], 7);
    assert_eq!(
        greedy(&sa, "hello"),
        want,
        "outputs equal a server started on the new checkpoint"
    );
    let ia = admin_get(&sa.url("/weight_info"));
    let ib = admin_get(&sb.url("/weight_info"));
    assert_eq!(ia["checksum"], ib["checksum"]);
    assert_eq!(ia["weight_version"], 7);
    assert_eq!(ia["dtype"], "float16");
    let (_, r) = post(
        &client(),
        &sa.url("/v1/completions"),
        &json!({"prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(r["choices"][0]["weight_version"], 7);
}

#[test]
fn update_from_disk_and_multi_part_upload_are_atomic_and_equal() {
    let a = model_with_seed(3, "disk-a");
    let allowed = common::scratch("allowed");
    let _ = std::fs::remove_dir_all(&allowed);
    std::fs::create_dir_all(&allowed).unwrap();
    TinyModelSpec {
        seed: 4,
        ..Default::default()
    }
    .write(&allowed.join("ckpt"))
    .unwrap();
    let sa = server(&a, &["--allowed-weight-dir", allowed.to_str().unwrap()]);
    let sb = server(&allowed.join("ckpt"), &[]);
    let want = greedy(&sb, "disk");
    let (st, r) = admin_post(
        &sa.url("/update_weights_from_disk"),
        json!({"model_path": "ckpt", "weight_version": "3"})
            .to_string()
            .into_bytes(),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["weight_version"], 3);
    assert_eq!(greedy(&sa, "disk"), want);

    // Multi-part: two halves become visible only at finish.
    let s2 = server(&a, &[]);
    let before = greedy(&s2, "disk");
    let t = TinyModelSpec {
        seed: 4,
        ..Default::default()
    }
    .tensors();
    let (h1, h2) = t.split_at(t.len() / 2);
    assert_eq!(admin_post(&s2.url("/start_weight_update"), vec![]).0, 200);
    assert_eq!(admin_post(&s2.url("/start_weight_update"), vec![]).0, 409);
    assert_eq!(
        admin_post(&s2.url("/update_weights"), safetensors(h1, "h1")).0,
        200
    );
    assert_eq!(greedy(&s2, "disk"), before, "nothing visible before finish");
    assert_eq!(
        admin_post(&s2.url("/update_weights"), safetensors(h2, "h2")).0,
        200
    );
    let (st, r) = admin_post(&s2.url("/finish_weight_update"), vec![]);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["weight_version"], 1);
    assert_eq!(greedy(&s2, "disk"), want);
    assert_eq!(admin_post(&s2.url("/finish_weight_update"), vec![]).0, 409);
}

#[test]
fn partial_update_changes_only_the_named_tensor() {
    let a = model_with_seed(5, "part");
    let s = server(&a, &[]);
    let info0 = admin_get(&s.url("/weight_info"));
    let norm0 = admin_get(&s.url("/get_weights_by_name?name=model.norm.weight"));
    let q0 = admin_get(
        &s.url("/get_weights_by_name?name=model.layers.0.self_attn.q_proj.weight&truncate_size=2"),
    );
    let new_norm: Vec<f32> = (0..72).map(|i| 0.5 + i as f32 / 64.0).collect();
    let (st, r) = admin_post(
        &s.url("/update_weights"),
        safetensors(
            &[("model.norm.weight".into(), vec![72], new_norm.clone())],
            "norm",
        ),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["num_tensors"], 1);
    let norm1 = admin_get(&s.url("/get_weights_by_name?name=model.norm.weight"));
    let want: Vec<f64> = new_norm
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32() as f64)
        .collect();
    assert_eq!(norm1, json!(want));
    assert_ne!(norm1, norm0);
    assert_eq!(
        admin_get(&s.url(
            "/get_weights_by_name?name=model.layers.0.self_attn.q_proj.weight&truncate_size=2"
        )),
        q0
    );
    assert_eq!(q0.as_array().unwrap().len(), 2);
    let info1 = admin_get(&s.url("/weight_info"));
    assert_ne!(info1["checksum"], info0["checksum"]);
    assert_eq!(info1["weight_version"], 1);
}

#[test]
fn every_kind_of_bad_update_is_refused_and_changes_nothing() {
    let a = model_with_seed(6, "bad");
    let allowed = common::scratch("allowed-bad");
    let _ = std::fs::remove_dir_all(&allowed);
    std::fs::create_dir_all(&allowed).unwrap();
    let outside = model_with_seed(7, "outside");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
    let s = server(&a, &["--allowed-weight-dir", allowed.to_str().unwrap()]);
    let info0 = admin_get(&s.url("/weight_info"));
    let out0 = greedy(&s, "same");
    let good = TinyModelSpec {
        seed: 8,
        ..Default::default()
    }
    .tensors();
    let mut wrong_shape = good.clone();
    wrong_shape[2].1 = vec![72, 71];
    wrong_shape[2].2.truncate(72 * 71);
    let mut nan = good.clone();
    nan[5].2[3] = f32::NAN;
    let mut unknown = good.clone();
    unknown.push((
        "model.layers.9.mlp.gate_proj.weight".into(),
        vec![2],
        vec![0.0, 0.0],
    ));
    let full = safetensors(&good, "good");
    let cases: Vec<(&str, Vec<u8>, u16, String)> = vec![
        (
            "/update_weights",
            safetensors(&wrong_shape, "ws"),
            400,
            good[2].0.clone(),
        ),
        (
            "/update_weights",
            safetensors(&nan, "nan"),
            400,
            good[5].0.clone(),
        ),
        (
            "/update_weights",
            safetensors(&unknown, "unk"),
            400,
            "model.layers.9.mlp.gate_proj.weight".into(),
        ),
        (
            "/update_weights",
            full[..full.len() - 1000].to_vec(),
            400,
            "ended".into(),
        ),
        ("/update_weights", full[..5].to_vec(), 400, "header".into()),
        (
            "/update_weights?mode=sideways",
            full.clone(),
            400,
            "mode".into(),
        ),
        (
            "/update_weights_from_disk",
            json!({"model_path": outside.to_str().unwrap()})
                .to_string()
                .into_bytes(),
            403,
            "outside".into(),
        ),
        (
            "/update_weights_from_disk",
            json!({"model_path": "link"}).to_string().into_bytes(),
            403,
            "outside".into(),
        ),
        (
            "/update_weights_from_disk",
            json!({"model_path": "../x"}).to_string().into_bytes(),
            400,
            "..".into(),
        ),
        (
            "/update_weights_from_disk",
            json!({"model_path": "missing"}).to_string().into_bytes(),
            400,
            "missing".into(),
        ),
    ];
    for (path, body, status, needle) in cases {
        let (st, r) = admin_post(&s.url(path), body);
        assert_eq!(st, status, "{path}: {r}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(&needle),
            "{path}: '{msg}' should name '{needle}'"
        );
    }
    // Wrong or missing admin key.
    let r = client()
        .post(s.url("/update_weights"))
        .bearer_auth("wrong")
        .body(full.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .post(s.url("/update_weights"))
        .body(full)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // Neither the key the server was started with nor the wrong one offered reaches the log.
    let log = s.log();
    assert!(!log.is_empty());
    assert!(!log.contains(ADMIN) && !log.contains("wrong"), "{log}");
    let info1 = admin_get(&s.url("/weight_info"));
    assert_eq!(info1["checksum"], info0["checksum"]);
    assert_eq!(info1["weight_version"], 0);
    assert_eq!(greedy(&s, "same"), out0);
}

#[test]
fn hooks_are_off_without_an_admin_key_unless_enabled() {
    let a = model_with_seed(9, "off");
    let s = Server::start(&a, &[]);
    let r = client().post(s.url("/pause")).send().unwrap();
    assert_eq!(r.status(), 403);
    let s2 = Server::start(&a, &["--enable-weight-updates"]);
    let r = client().post(s2.url("/reset_prefix_cache")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        s2.log().contains("without --admin-key"),
        "a warning is logged"
    );
}

#[test]
fn scored_logprobs_equal_the_sampled_ones() {
    let a = model_with_seed(10, "score");
    let s = server(&a, &[]);
    let (st, r) = post(
        &client(),
        &s.url("/v1/completions"),
        &json!({"prompt": "score me", "max_tokens": 12, "temperature": 1.0, "seed": 5, "logprobs": 2, "return_token_ids": true, "ignore_eos": true}),
    );
    assert_eq!(st, 200);
    let ch = &r["choices"][0];
    let prompt: Vec<u64> = ch["prompt_token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let out: Vec<u64> = ch["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let mut all = prompt.clone();
    all.extend(&out);
    let (st, sc) = post(
        &client(),
        &s.url("/v1/logprobs"),
        &json!({"sequences": [all], "prompt_lengths": [prompt.len()], "top_logprobs": 2, "return_entropy": true}),
    );
    assert_eq!(st, 200, "{sc}");
    assert_eq!(sc["weight_version"], 0);
    let d = &sc["data"][0];
    let lps = d["logprobs"].as_array().unwrap();
    assert!(lps[..prompt.len()].iter().all(Value::is_null));
    for (i, want) in ch["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let got = lps[prompt.len() + i].as_f64().unwrap() as f32;
        assert_eq!(
            got.to_bits(),
            (want.as_f64().unwrap() as f32).to_bits(),
            "token {i}"
        );
    }
    let h = d["entropy"][prompt.len()].as_f64().unwrap();
    assert!(h > 0.0 && h < (259f64).ln());
}

#[test]
fn pause_abort_wait_keep_and_resume() {
    let a = model_with_seed(11, "pause");
    let s = server(&a, &[]);
    let long = json!({"prompt": "go", "max_tokens": 1000, "temperature": 0, "ignore_eos": true, "stream": true});
    // abort: in-flight streams end with finish_reason "abort"; new requests get 503.
    let url = s.url("/v1/completions");
    let h = std::thread::spawn(move || post_stream(&client(), &url, &long));
    common::wait_running(&s);
    assert_eq!(
        admin_post(&s.url("/pause?mode=abort"), vec![]).1,
        json!({"is_paused": true})
    );
    let (chunks, done) = h.join().unwrap();
    assert!(done);
    let fin: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter(|c| !c["finish_reason"].is_null())
        .collect();
    assert_eq!(fin[0]["finish_reason"], "abort");
    let (st, _) = post(
        &client(),
        &s.url("/v1/completions"),
        &json!({"prompt": "x"}),
    );
    assert_eq!(st, 503);
    assert_eq!(admin_get(&s.url("/is_paused")), json!({"is_paused": true}));
    assert_eq!(
        client().get(s.url("/health")).send().unwrap().status(),
        200,
        "a paused server is healthy"
    );
    assert_eq!(
        admin_post(&s.url("/resume"), vec![]).1,
        json!({"is_paused": false})
    );
    let reference = greedy(&s, "keep me");
    // keep: a request sent while paused waits, then completes after resume, unchanged.
    assert_eq!(admin_post(&s.url("/pause?mode=keep"), vec![]).0, 200);
    let url = s.url("/v1/completions");
    let h = std::thread::spawn(move || {
        post(
            &client(),
            &url,
            &json!({"prompt": "keep me", "max_tokens": 16, "temperature": 0, "ignore_eos": true, "logprobs": 0}),
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!h.is_finished(), "frozen while paused");
    admin_post(&s.url("/resume"), vec![]);
    let (_, r) = h.join().unwrap();
    assert_eq!(r["choices"][0]["text"].as_str().unwrap(), reference.0);
    // wait: returns once in-flight requests are done.
    let url = s.url("/v1/completions");
    let h = std::thread::spawn(move || {
        post(
            &client(),
            &url,
            &json!({"prompt": "w", "max_tokens": 200, "temperature": 0, "ignore_eos": true}),
        )
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(admin_post(&s.url("/pause?mode=wait"), vec![]).0, 200);
    assert!(
        h.is_finished() || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            h.is_finished()
        }
    );
    let (_, r) = h.join().unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    admin_post(&s.url("/resume"), vec![]);
}

/// 16 streaming clients while 20 updates run back to back, in each mode.
#[test]
fn updates_under_load_in_wait_continue_and_abort_modes() {
    let a = model_with_seed(12, "load");
    let s = server(&a, &["--max-num-seqs", "64"]);
    let bodies: Vec<Vec<u8>> = (0..2u64)
        .map(|i| {
            safetensors(
                &TinyModelSpec {
                    seed: 100 + i,
                    ..Default::default()
                }
                .tensors(),
                &format!("load{i}"),
            )
        })
        .collect();
    for mode in ["wait", "continue", "abort"] {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients: Vec<_> = (0..16)
            .map(|i| {
                let url = s.url("/v1/completions");
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut results = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let body = json!({"prompt": format!("client {i}"), "max_tokens": 24, "temperature": 1.0, "seed": i, "ignore_eos": true, "stream": true, "return_token_ids": true});
                        results.push(post_stream(&client(), &url, &body));
                    }
                    results
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(100));
        for k in 0..20 {
            let (st, r) = admin_post(
                &s.url(&format!("/update_weights?mode={mode}")),
                bodies[k % 2].clone(),
            );
            assert_eq!(st, 200, "{mode} update {k}: {r}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut aborted = 0;
        let mut spanning = 0;
        for c in clients {
            for (chunks, done) in c.join().unwrap() {
                assert!(done, "every stream ends with [DONE]");
                let choices: Vec<&Value> = chunks
                    .iter()
                    .flat_map(|c| c["choices"].as_array().unwrap())
                    .collect();
                let fin = choices
                    .iter()
                    .find(|c| !c["finish_reason"].is_null())
                    .expect("a final chunk");
                let versions: Vec<u64> = choices
                    .iter()
                    .filter_map(|c| c["weight_version"].as_u64())
                    .collect();
                let distinct: std::collections::BTreeSet<_> = versions.iter().collect();
                match mode {
                    "wait" => {
                        assert_eq!(fin["finish_reason"], "length");
                        assert_eq!(distinct.len(), 1, "wait mode: one version per response");
                    }
                    "continue" => {
                        assert_eq!(fin["finish_reason"], "length");
                        assert!(
                            versions.windows(2).all(|w| w[0] <= w[1]),
                            "versions only move forward"
                        );
                        spanning += (distinct.len() > 1) as usize;
                    }
                    _ => {
                        if fin["finish_reason"] == "abort" {
                            aborted += 1;
                        } else {
                            assert_eq!(fin["finish_reason"], "length");
                            assert_eq!(distinct.len(), 1);
                        }
                    }
                }
            }
        }
        eprintln!("{mode}: {aborted} aborted, {spanning} spanning versions");
        // Every request, aborted or not, gave its K/V blocks back.
        common::wait_idle(&s);
        if mode == "abort" {
            assert!(aborted > 0, "abort mode aborts in-flight requests");
        }
    }
    // A continue-mode response reports its spans. The request is frozen mid-generation
    // (pause in keep mode) while the update lands, so the test does not depend on how fast
    // the server decodes.
    let url = s.url("/v1/completions");
    let h = std::thread::spawn(move || {
        post(
            &client(),
            &url,
            &json!({"prompt": "span", "max_tokens": 1000, "temperature": 0, "ignore_eos": true}),
        )
    });
    common::wait_running(&s);
    let (st, _) = admin_post(&s.url("/pause?mode=keep"), Vec::new());
    assert_eq!(st, 200);
    let (st, _) = admin_post(
        &s.url("/update_weights?mode=continue&weight_version=1000"),
        bodies[0].clone(),
    );
    assert_eq!(st, 200);
    let (st, _) = admin_post(&s.url("/resume"), Vec::new());
    assert_eq!(st, 200);
    let (_, r) = h.join().unwrap();
    let ch = &r["choices"][0];
    assert_eq!(ch["weight_version"], 1000);
    let spans = ch["weight_versions"]
        .as_array()
        .expect("a response that spans an update lists its versions");
    assert!(spans.len() >= 2, "{spans:?}");
    assert_ne!(spans[0]["version"], 1000);
    assert_eq!(spans.last().unwrap()["version"], 1000);
    assert_eq!(spans[0]["start"], 0);
    assert_eq!(spans.last().unwrap()["end"], 1000);
    for w in spans.windows(2) {
        assert_eq!(w[0]["end"], w[1]["start"]);
    }
}

#[test]
fn an_upload_cut_off_halfway_changes_nothing_and_the_next_update_works() {
    use std::io::Write;
    let a = model_with_seed(13, "cut");
    let s = server(&a, &[]);
    let info0 = admin_get(&s.url("/weight_info"));
    let out0 = greedy(&s, "cut");
    let body = std::fs::read(model_with_seed(14, "cut-b").join("model.safetensors")).unwrap();
    let addr = s.base.trim_start_matches("http://").to_string();
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        tcp,
        "POST /update_weights HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    tcp.write_all(&body[..body.len() / 2]).unwrap();
    drop(tcp); // the trainer died mid-upload
    std::thread::sleep(std::time::Duration::from_millis(300));
    let info1 = admin_get(&s.url("/weight_info"));
    assert_eq!(info1["checksum"], info0["checksum"]);
    assert_eq!(info1["weight_version"], 0);
    assert_eq!(greedy(&s, "cut"), out0);
    // The update lock was released: a complete upload goes through.
    let (st, r) = admin_post(&s.url("/update_weights"), body);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["weight_version"], 1);
}

#[test]
fn racing_updates_serialise_and_the_last_one_wins_whole() {
    let a = model_with_seed(15, "race");
    let b = model_with_seed(16, "race-b");
    let c = model_with_seed(17, "race-c");
    let s = server(&a, &[]);
    let (sb, sc) = (server(&b, &[]), server(&c, &[]));
    let (want_b, want_c) = (greedy(&sb, "race"), greedy(&sc, "race"));
    let bodies = [
        (std::fs::read(b.join("model.safetensors")).unwrap(), 5),
        (std::fs::read(c.join("model.safetensors")).unwrap(), 6),
    ];
    let threads: Vec<_> = bodies
        .into_iter()
        .map(|(body, v)| {
            let url = s.url(&format!("/update_weights?weight_version={v}"));
            std::thread::spawn(move || admin_post(&url, body))
        })
        .collect();
    for t in threads {
        let (st, r) = t.join().unwrap();
        assert_eq!(st, 200, "{r}");
    }
    let info = admin_get(&s.url("/weight_info"));
    let out = greedy(&s, "race");
    match info["weight_version"].as_u64().unwrap() {
        5 => assert_eq!(out, want_b),
        6 => assert_eq!(out, want_c),
        v => panic!("unexpected version {v}"),
    }
}

#[test]
fn checkpoints_rewritten_or_deleted_during_loads_cost_an_error_not_the_server() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let a = model_with_seed(18, "vanish");
    let b = model_with_seed(19, "vanish-b");
    let allowed = common::scratch("allowed-vanish");
    let _ = std::fs::remove_dir_all(&allowed);
    let ckpt = allowed.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    let s = server(&a, &["--allowed-weight-dir", allowed.to_str().unwrap()]);
    let want_b = greedy(&server(&b, &[]), "vanish");
    let out_a = greedy(&s, "vanish");
    assert_ne!(out_a, want_b);
    let bytes = std::fs::read(b.join("model.safetensors")).unwrap();
    let file = ckpt.join("model.safetensors");
    std::fs::write(&file, &bytes).unwrap();
    // A trainer that rewrites its checkpoint in place (truncate, then write in pieces) and
    // sometimes deletes it, while the server loads it: with memory-mapped files a load that
    // meets the truncation dies of SIGBUS.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, file, bytes) = (stop.clone(), file.clone(), bytes.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                if i.is_multiple_of(5) {
                    let _ = std::fs::remove_file(&file);
                    std::thread::yield_now();
                }
                let Ok(mut f) = std::fs::File::create(&file) else {
                    continue;
                };
                for chunk in bytes.chunks(bytes.len() / 4 + 1) {
                    let _ = f.write_all(chunk);
                    let _ = f.flush();
                }
            }
            i
        })
    };
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..40 {
        let (st, r) = admin_post(
            &s.url("/update_weights_from_disk"),
            json!({"model_path": "ckpt"}).to_string().into_bytes(),
        );
        match st {
            200 => ok += 1,
            400 => {
                refused += 1;
                assert!(r["error"]["message"].as_str().is_some(), "{r}");
            }
            _ => panic!("update during rewrite answered {st}: {r}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let rewrites = writer.join().unwrap();
    eprintln!("{ok} loads succeeded, {refused} refused, over {rewrites} rewrites");
    // Each load is all or nothing: the outputs are those of A or of B, never a mixture.
    let out = greedy(&s, "vanish");
    let info = admin_get(&s.url("/weight_info"));
    assert_eq!(info["weight_version"].as_u64().unwrap(), ok);
    if ok == 0 {
        assert_eq!(out, out_a);
    } else {
        assert_eq!(out, want_b);
    }
    // The file whole again: the next load succeeds and serves B.
    std::fs::write(&file, &bytes).unwrap();
    let (st, r) = admin_post(
        &s.url("/update_weights_from_disk"),
        json!({"model_path": "ckpt"}).to_string().into_bytes(),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(greedy(&s, "vanish"), want_b);
}

/// Every field or query parameter of the API whose name suggests a file system location.
fn path_like_inputs(spec: &Value) -> Vec<String> {
    fn walk(v: &Value, at: &str, out: &mut Vec<String>) {
        let looks = |k: &str| {
            let k = k.to_ascii_lowercase();
            ["path", "file", "dir", "url", "uri", "template", "load"]
                .iter()
                .any(|w| k.contains(w))
        };
        if let Some(props) = v.get("properties").and_then(Value::as_object) {
            for (k, p) in props {
                if looks(k) {
                    out.push(format!("{at}.{k}"));
                }
                walk(p, &format!("{at}.{k}"), out);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(x) = v.get(key) {
                walk(x, at, out);
            }
        }
        for key in ["oneOf", "anyOf", "allOf"] {
            for x in v.get(key).and_then(Value::as_array).into_iter().flatten() {
                walk(x, at, out);
            }
        }
    }
    let mut out = Vec::new();
    for (name, schema) in spec["components"]["schemas"].as_object().unwrap() {
        walk(schema, name, &mut out);
    }
    for (path, ops) in spec["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let n = p["name"].as_str().unwrap();
                if ["path", "file", "dir", "url", "uri"]
                    .iter()
                    .any(|w| n.to_ascii_lowercase().contains(w))
                {
                    out.push(format!("{method} {path}?{n}"));
                }
            }
        }
    }
    out
}

#[test]
fn no_route_reads_files_outside_the_allowed_weight_dir() {
    // The spec is checked against the router by the server's staleness test: this is the
    // whole input surface. One field names a file; `chat_template_kwargs` only passes
    // variables to the model's own template, whose environment has no file loader.
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../openapi/openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        path_like_inputs(&spec),
        [
            "ChatCompletionRequest.chat_template_kwargs",
            "UpdateFromDiskRequest.model_path"
        ]
    );
    let a = model_with_seed(20, "files");
    let other = model_with_seed(21, "files-other");
    // Hooks on, no --allowed-weight-dir: disk updates are off altogether.
    let s = server(&a, &[]);
    let (st, r) = admin_post(
        &s.url("/update_weights_from_disk"),
        json!({"model_path": other.to_str().unwrap()})
            .to_string()
            .into_bytes(),
    );
    assert_eq!(st, 403, "{r}");
    assert_eq!(admin_get(&s.url("/weight_info"))["weight_version"], 0);
    // With a dir: absolute paths elsewhere, system files and encoded traversal are refused
    // without echoing any file content.
    let allowed = common::scratch("allowed-files");
    let _ = std::fs::remove_dir_all(&allowed);
    std::fs::create_dir_all(&allowed).unwrap();
    let s = server(&a, &["--allowed-weight-dir", allowed.to_str().unwrap()]);
    for p in [
        "/etc/passwd",
        "/proc/self/environ",
        other.to_str().unwrap(),
        "./../../../../etc/passwd",
    ] {
        let (st, r) = admin_post(
            &s.url("/update_weights_from_disk"),
            json!({ "model_path": p }).to_string().into_bytes(),
        );
        assert!(st == 403 || st == 400, "{p}: {st} {r}");
        assert!(!r.to_string().contains("root:"), "{p}: {r}");
    }
    for url in [
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/v1/..%2f..%2fetc%2fpasswd",
        "/static/../../etc/passwd",
    ] {
        let r = client().get(s.url(url)).send().unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        assert!(status == 404 || status == 400, "{url}: {status}");
        assert!(!text.contains("root:"), "{url}: {text}");
    }
    // `model` names the served model; a path there is an unknown model, not a file to open.
    let (st, r) = post(
        &client(),
        &s.url("/v1/completions"),
        &json!({"model": "/etc/passwd", "prompt": "x", "max_tokens": 1}),
    );
    assert_eq!(st, 404, "{r}");
    assert_eq!(admin_get(&s.url("/weight_info"))["weight_version"], 0);
}
