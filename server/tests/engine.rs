//! The engine end to end on the tiny model (and the default model where present): parity of
//! tokens and logprobs across batching, prefix caching, preemption and n > 1; stop handling;
//! aborts; no leaked K/V blocks.

use half::f16;
use halfstep_model::kernels::softmax::log_softmax;
use halfstep_model::testmodel::TinyModelSpec;
use halfstep_model::{Checkpoint, ContiguousKv, Elem, Kernels, LogitsFor, Model, Span, Tokenizer};
use halfstep_server::engine::{
    start_engine, EngineConfig, EngineError, EngineHandle, FinishReason, GeneratedToken,
    RequestOutput, SamplingParams, StopReason, TokenLogprob,
};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../../tests/common/scratch.rs"]
mod scratch;
use scratch::scratch;

fn tiny_dir() -> PathBuf {
    let dir = scratch("tiny");
    if !dir.join("model.safetensors").exists() {
        let tmp = dir.with_extension(
            format!("tmp{:?}", std::thread::current().id()).replace(['(', ')'], ""),
        );
        TinyModelSpec::default().write(&tmp).unwrap();
        let _ = std::fs::rename(&tmp, &dir);
    }
    dir
}

fn tiny<T: Elem>() -> (Model<T>, Arc<Tokenizer>) {
    let dir = tiny_dir();
    let ck = Checkpoint::open(&dir).unwrap();
    let m = Model::<T>::load(ck.config, &*ck.tensors, Kernels::global()).unwrap();
    (m, Arc::new(Tokenizer::from_hf_dir(&dir).unwrap()))
}

fn engine_with(cfg: EngineConfig) -> (EngineHandle, Model<f16>) {
    let (m, t) = tiny::<f16>();
    (start_engine(m.clone(), t, cfg), m)
}

fn engine() -> (EngineHandle, Model<f16>) {
    engine_with(EngineConfig::default())
}

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    tokens: Vec<GeneratedToken>,
    text: String,
    finish: Option<FinishReason>,
    stop: Option<StopReason>,
    deltas: usize,
    cached: usize,
}

#[derive(Debug)]
struct Done {
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    samples: Vec<Sample>,
}

fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<RequestOutput>, n: usize) -> Done {
    let mut d = Done {
        prompt_logprobs: None,
        samples: vec![
            Sample {
                tokens: vec![],
                text: String::new(),
                finish: None,
                stop: None,
                deltas: 0,
                cached: 0
            };
            n
        ],
    };
    while let Some(o) = rx.blocking_recv() {
        match o {
            RequestOutput::PromptLogprobs(p) => {
                assert!(
                    d.samples.iter().all(|s| s.tokens.is_empty()),
                    "prompt logprobs come first"
                );
                d.prompt_logprobs = Some(p)
            }
            RequestOutput::Sample(s) => {
                let x = &mut d.samples[s.index];
                assert!(x.finish.is_none(), "output after finish");
                x.tokens.extend(s.tokens);
                x.text.push_str(&s.text);
                x.finish = s.finish_reason;
                x.stop = s.stop_reason;
                x.deltas += 1;
                x.cached = s.num_cached_tokens;
            }
            RequestOutput::Error(e) => panic!("request failed: {e}"),
        }
    }
    assert!(
        d.samples.iter().all(|s| s.finish.is_some()),
        "a sample never finished"
    );
    d
}

fn run(e: &EngineHandle, id: &str, prompt: Vec<u32>, p: SamplingParams) -> Done {
    let n = p.n;
    collect(e.submit(id.into(), prompt, p).unwrap(), n)
}

/// Waits until the engine reports every block unowned.
fn assert_no_leak(e: &EngineHandle) {
    let t0 = Instant::now();
    while !e.stats().all_blocks_free.load(Ordering::Relaxed)
        || e.stats().running.load(Ordering::Relaxed) > 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "K/V blocks still owned after all requests ended"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (i * 17 + seed * 31) % 256)
        .collect()
}

fn sampled(seed: u64, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        max_tokens,
        ignore_eos: true,
        logprobs: Some(3),
        ..Default::default()
    }
}

/// (token, logprob bits, top (id, logprob bits)) per generated token.
type TokenBits = (u32, u32, Vec<(u32, u32)>);

fn bits(s: &Sample) -> Vec<TokenBits> {
    s.tokens
        .iter()
        .map(|t| {
            let lp = t.logprob.as_ref().unwrap();
            (
                t.token,
                lp.logprob.to_bits(),
                lp.top.iter().map(|(i, v)| (*i, v.to_bits())).collect(),
            )
        })
        .collect()
}

/// Recomputes every generated token's raw logprob with one full forward, no cache, no batch.
fn assert_matches_full_recompute<T: Elem>(m: &Model<T>, prompt: &[u32], s: &Sample) {
    let c = m.config();
    let mut all = prompt.to_vec();
    all.extend(s.tokens.iter().map(|t| t.token));
    let mut kv = ContiguousKv::<T>::new(c.num_hidden_layers, c.kv_dim());
    let logits = m
        .forward(
            &[Span {
                seq: 0,
                start_pos: 0,
                tokens: &all,
                logits: LogitsFor::All,
            }],
            &mut kv,
        )
        .unwrap();
    let v = c.vocab_size;
    let mut lp = vec![0f32; v];
    for (i, t) in s.tokens.iter().enumerate() {
        let pos = prompt.len() + i - 1;
        log_softmax(&logits[pos * v..(pos + 1) * v], &mut lp);
        let got = t.logprob.as_ref().unwrap().logprob;
        assert_eq!(
            got.to_bits(),
            lp[t.token as usize].to_bits(),
            "token {i}: {got} vs {}",
            lp[t.token as usize]
        );
    }
}

#[test]
fn sequence_is_bitwise_identical_alone_batched_cached_preempted_and_as_one_of_n() {
    let a_prompt = prompt(1, 37);
    let a = sampled(5, 24);
    // Alone.
    let (e, m) = engine();
    let alone = run(&e, "a", a_prompt.clone(), a.clone()).samples.remove(0);
    assert_eq!(alone.tokens.len(), 24);
    assert_matches_full_recompute(&m, &a_prompt, &alone);
    assert_no_leak(&e);

    // In a batch with others of different lengths and parameters.
    let (e, _) = engine();
    let others: Vec<_> = (0..6)
        .map(|i| {
            let p = SamplingParams {
                n: 1 + i % 3,
                top_p: 0.9,
                ..sampled(100 + i as u64, 10 + 7 * i)
            };
            (
                e.submit(
                    format!("o{i}"),
                    prompt(10 + i as u32, 5 + 13 * i),
                    p.clone(),
                )
                .unwrap(),
                p.n,
            )
        })
        .collect();
    let rx = e.submit("a".into(), a_prompt.clone(), a.clone()).unwrap();
    let batched = collect(rx, 1).samples.remove(0);
    for (rx, n) in others {
        collect(rx, n);
    }
    assert_eq!(bits(&batched), bits(&alone));
    assert_eq!(batched.text, alone.text);
    assert_no_leak(&e);

    // After a prefix-cache hit.
    let (e, _) = engine();
    run(
        &e,
        "warm",
        a_prompt.clone(),
        SamplingParams {
            max_tokens: 1,
            ..Default::default()
        },
    );
    let cached = run(&e, "a", a_prompt.clone(), a.clone()).samples.remove(0);
    assert_eq!(
        cached.cached, 32,
        "two full 16-token blocks come from the cache"
    );
    assert_eq!(bits(&cached), bits(&alone));
    assert_no_leak(&e);

    // Preempted and recomputed: a cache of 12 blocks cannot hold five 60-token sequences.
    let (e, _) = engine_with(EngineConfig {
        num_kv_blocks: Some(12),
        ..Default::default()
    });
    let hogs: Vec<_> = (0..4)
        .map(|i| {
            e.submit(format!("h{i}"), prompt(20 + i, 30), sampled(i as u64, 40))
                .unwrap()
        })
        .collect();
    let rx = e.submit("a".into(), a_prompt.clone(), a.clone()).unwrap();
    let preempted = collect(rx, 1).samples.remove(0);
    for rx in hogs {
        collect(rx, 1);
    }
    assert!(
        e.stats().preemptions.load(Ordering::Relaxed) > 0,
        "the test must force preemption"
    );
    assert_eq!(bits(&preempted), bits(&alone));
    assert_no_leak(&e);

    // As sample 0 of n = 4 (sharing the prompt's blocks, copy-on-write); every sample matches a
    // full recompute.
    let (e, m) = engine();
    let many = run(
        &e,
        "a",
        a_prompt.clone(),
        SamplingParams { n: 4, ..a.clone() },
    );
    assert_eq!(bits(&many.samples[0]), bits(&alone));
    for s in &many.samples {
        assert_matches_full_recompute(&m, &a_prompt, s);
    }
    assert_ne!(bits(&many.samples[1]), bits(&many.samples[2]));
    assert_no_leak(&e);
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let (e, _) = engine();
    let p = prompt(3, 9);
    let x = run(&e, "x", p.clone(), sampled(42, 20)).samples.remove(0);
    let y = run(&e, "y", p.clone(), sampled(42, 20)).samples.remove(0);
    let z = run(&e, "z", p, sampled(43, 20)).samples.remove(0);
    assert_eq!(bits(&x), bits(&y));
    assert_ne!(x.tokens, z.tokens);
}

#[test]
fn prompt_logprobs_match_a_full_forward_and_start_with_none() {
    let (e, m) = engine_with(EngineConfig {
        max_num_batched_tokens: 8,
        ..Default::default()
    });
    let p = prompt(4, 21);
    // Chunked prefill (8-token budget) must still give every prompt position.
    let d = run(
        &e,
        "p",
        p.clone(),
        SamplingParams {
            prompt_logprobs: Some(2),
            max_tokens: 2,
            ..Default::default()
        },
    );
    let pl = d.prompt_logprobs.unwrap();
    assert_eq!(pl.len(), p.len());
    assert!(pl[0].is_none());
    let c = m.config();
    let mut kv = ContiguousKv::<f16>::new(c.num_hidden_layers, c.kv_dim());
    let logits = m
        .forward(
            &[Span {
                seq: 0,
                start_pos: 0,
                tokens: &p,
                logits: LogitsFor::All,
            }],
            &mut kv,
        )
        .unwrap();
    let v = c.vocab_size;
    let mut lp = vec![0f32; v];
    for i in 1..p.len() {
        log_softmax(&logits[(i - 1) * v..i * v], &mut lp);
        let e = pl[i].as_ref().unwrap();
        assert_eq!(e.logprob.to_bits(), lp[p[i] as usize].to_bits());
        assert_eq!(
            e.rank,
            1 + lp.iter().filter(|&&x| x > lp[p[i] as usize]).count()
        );
        assert_eq!(e.top.len(), 2);
    }
    assert_no_leak(&e);
}

#[test]
fn stop_strings_are_found_across_token_boundaries_and_excluded_or_included() {
    let (e, _) = engine();
    let p = prompt(5, 6);
    let greedy = SamplingParams {
        temperature: 0.0,
        max_tokens: 40,
        ignore_eos: true,
        skip_special_tokens: false,
        ..Default::default()
    };
    let full = run(&e, "g", p.clone(), greedy.clone()).samples.remove(0);
    let chars: Vec<char> = full.text.chars().collect();
    assert!(
        chars.len() >= 12,
        "tiny model text too short: {:?}",
        full.text
    );
    // A three-character stop string from the middle spans three byte-level tokens.
    let stop: String = chars[6..9].iter().collect();
    let at = full.text.find(&stop).unwrap();
    let ex = run(
        &e,
        "s1",
        p.clone(),
        SamplingParams {
            stop: vec![stop.clone()],
            ..greedy.clone()
        },
    )
    .samples
    .remove(0);
    assert_eq!(ex.text, full.text[..at]);
    assert_eq!(ex.finish, Some(FinishReason::Stop));
    assert_eq!(ex.stop, Some(StopReason::Text(stop.clone())));
    let inc = run(
        &e,
        "s2",
        p.clone(),
        SamplingParams {
            stop: vec![stop.clone()],
            include_stop_str_in_output: true,
            ..greedy.clone()
        },
    )
    .samples
    .remove(0);
    assert_eq!(inc.text, full.text[..at + stop.len()]);
    // A stop token id ends the output with that id as the stop reason.
    let t = full.tokens[3].token;
    let st = run(
        &e,
        "s3",
        p.clone(),
        SamplingParams {
            stop_token_ids: vec![t],
            ..greedy.clone()
        },
    )
    .samples
    .remove(0);
    let first = full.tokens.iter().position(|x| x.token == t).unwrap();
    assert_eq!(st.tokens.len(), first + 1);
    assert_eq!(st.stop, Some(StopReason::Token(t)));
    // min_tokens holds stop conditions back; max_tokens ends with "length".
    let mt = run(
        &e,
        "s4",
        p.clone(),
        SamplingParams {
            stop_token_ids: vec![t],
            min_tokens: first + 2,
            ..greedy.clone()
        },
    )
    .samples
    .remove(0);
    assert!(mt.tokens.len() > first + 1);
    let short = run(
        &e,
        "s5",
        p,
        SamplingParams {
            max_tokens: 5,
            ..greedy
        },
    )
    .samples
    .remove(0);
    assert_eq!(
        (short.tokens.len(), short.finish),
        (5, Some(FinishReason::Length))
    );
    assert_no_leak(&e);
}

#[test]
fn streamed_text_deltas_concatenate_to_the_text_and_are_valid_utf8() {
    let (e, _) = engine();
    for seed in 0..8 {
        let d = run(
            &e,
            &format!("u{seed}"),
            prompt(seed, 4),
            sampled(seed as u64, 30),
        )
        .samples
        .remove(0);
        assert!(d.deltas >= 2);
        let tok = e.tokenizer();
        let ids: Vec<u32> = d.tokens.iter().map(|t| t.token).collect();
        assert_eq!(d.text, tok.decode(&ids, true).unwrap());
    }
}

#[test]
fn cache_too_small_for_a_request_is_an_error_and_others_still_run() {
    let (e, _) = engine_with(EngineConfig {
        num_kv_blocks: Some(3),
        ..Default::default()
    });
    let err = e
        .submit("big".into(), prompt(6, 60), SamplingParams::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::CacheTooSmall {
                needed: 4,
                available: 3
            }
        ),
        "{err}"
    );
    let ok = run(
        &e,
        "ok",
        prompt(6, 20),
        SamplingParams {
            max_tokens: 8,
            ..Default::default()
        },
    );
    let n = ok.samples[0].tokens.len();
    assert!((1..=8).contains(&n), "{n} tokens");
    assert_no_leak(&e);
}

#[test]
fn invalid_requests_are_refused_before_queuing() {
    let (e, _) = engine_with(EngineConfig {
        max_model_len: 64,
        ..Default::default()
    });
    let long = e.submit(
        "l".into(),
        prompt(1, 60),
        SamplingParams {
            max_tokens: 10,
            ..Default::default()
        },
    );
    assert!(matches!(long, Err(EngineError::ContextTooLong { .. })));
    let bad = e.submit("b".into(), vec![1, 9999], SamplingParams::default());
    assert!(matches!(
        bad,
        Err(EngineError::InvalidRequest {
            param: "prompt",
            ..
        })
    ));
    let tp = e.submit(
        "t".into(),
        vec![5],
        SamplingParams {
            top_p: 7.0,
            ..Default::default()
        },
    );
    assert!(matches!(
        tp,
        Err(EngineError::InvalidRequest { param: "top_p", .. })
    ));
}

#[test]
fn dropping_the_receiver_or_aborting_frees_the_blocks() {
    let (e, _) = engine();
    let rx = e
        .submit("d".into(), prompt(7, 30), sampled(1, 500))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop(rx);
    assert_no_leak(&e);
    let rx = e
        .submit(
            "x".into(),
            prompt(7, 30),
            SamplingParams {
                n: 3,
                ..sampled(1, 500)
            },
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    e.abort("x");
    let d = collect(rx, 3);
    assert!(d
        .samples
        .iter()
        .all(|s| s.finish == Some(FinishReason::Abort)));
    assert_no_leak(&e);
}

#[test]
fn default_model_greedy_output_equals_transformers_greedy() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "default model missing in CI"
        );
        eprintln!("skipping: default model not fetched");
        return;
    }
    let ck = Checkpoint::open(&path).unwrap();
    let tok = Arc::new(Tokenizer::from_gguf(ck.gguf.as_ref().unwrap()).unwrap());
    let m = Model::<f32>::load(ck.config, &*ck.tensors, Kernels::global()).unwrap();
    let e = start_engine(m, tok, EngineConfig::default());
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/golden/smollm2-135m-instruct.json")).unwrap(),
    )
    .unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let rxs: Vec<_> = g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let params = SamplingParams {
                temperature: 0.0,
                max_tokens: 16,
                skip_special_tokens: false,
                ..Default::default()
            };
            (
                e.submit(format!("g{i}"), ids(&p["ids"]), params).unwrap(),
                ids(&p["greedy"]),
                p["greedy_text"].clone(),
            )
        })
        .collect();
    for (rx, want, text) in rxs {
        let d = collect(rx, 1).samples.remove(0);
        let got: Vec<u32> = d.tokens.iter().map(|t| t.token).collect();
        assert_eq!(got, want);
        if let Some(t) = text.as_str() {
            assert_eq!(d.text, t);
        }
    }
    assert_no_leak(&e);
}

#[test]
fn aborting_an_n_request_before_its_samples_fork_ends_every_sample() {
    // A chunked prefill of 8 tokens a step keeps the 200-token prompt unforked for a while.
    let (e, _) = engine_with(EngineConfig {
        max_num_batched_tokens: 8,
        ..Default::default()
    });
    let rx = e
        .submit(
            "early".into(),
            prompt(9, 200),
            SamplingParams {
                n: 3,
                ..sampled(1, 20)
            },
        )
        .unwrap();
    e.abort("early");
    let d = collect(rx, 3);
    assert!(
        d.samples
            .iter()
            .all(|s| s.finish == Some(FinishReason::Abort)),
        "{:?}",
        d.samples
    );
    assert_no_leak(&e);
}

#[test]
fn an_n_request_whose_sequence_outgrows_the_cache_still_finishes_every_sample() {
    // 4 blocks of 16: a 60-token prompt fits, its growth past 64 positions does not.
    let (e, _) = engine_with(EngineConfig {
        num_kv_blocks: Some(4),
        ..Default::default()
    });
    let rx = e
        .submit(
            "big".into(),
            prompt(10, 60),
            SamplingParams {
                n: 2,
                ..sampled(2, 30)
            },
        )
        .unwrap();
    let d = collect(rx, 2);
    assert!(
        d.samples
            .iter()
            .all(|s| s.finish == Some(FinishReason::Length)),
        "{:?}",
        d.samples
    );
    assert_no_leak(&e);
}
