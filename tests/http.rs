//! Black-box tests of the HTTP API: the real `halfstep` binary on a loopback port, checked
//! route by route and field by field against vLLM's shapes (shared/design/api.md).

mod common;

use common::{client, post, post_stream, Server};
use serde_json::{json, Value};

fn tiny_server(args: &[&str]) -> Server {
    Server::start(&common::tiny_model(), args)
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[test]
fn completion_response_has_vllm_fields() {
    let s = tiny_server(&["--served-model-name", "tiny"]);
    let c = client();
    let (st, r) = post(
        &c,
        &s.url("/v1/completions"),
        &json!({"model": "tiny", "prompt": "Hello", "max_tokens": 7, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        keys(&r),
        ["choices", "created", "id", "model", "object", "usage"]
    );
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(r["object"], "text_completion");
    assert_eq!(r["model"], "tiny");
    assert!(r["created"].as_u64().unwrap() > 1_600_000_000);
    let ch = &r["choices"][0];
    assert_eq!(
        keys(ch),
        [
            "finish_reason",
            "index",
            "logprobs",
            "stop_reason",
            "text",
            "weight_version"
        ]
    );
    assert_eq!(ch["index"], 0);
    assert_eq!(ch["finish_reason"], "length");
    assert_eq!(ch["logprobs"], Value::Null);
    assert_eq!(ch["stop_reason"], Value::Null);
    assert_eq!(ch["weight_version"], 0);
    // Byte-level tokenizer: "Hello" is five tokens.
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12})
    );
    // Greedy is deterministic; the model name may be omitted.
    let (_, r2) = post(
        &c,
        &s.url("/v1/completions"),
        &json!({"prompt": "Hello", "max_tokens": 7, "temperature": 0}),
    );
    assert_eq!(r2["choices"][0]["text"], ch["text"]);
}

#[test]
fn logprobs_echo_prompt_logprobs_and_token_ids() {
    let s = tiny_server(&[]);
    let c = client();
    let body = json!({"prompt": "abc", "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": true,
                      "prompt_logprobs": 1, "return_token_ids": true});
    let (st, r) = post(&c, &s.url("/v1/completions"), &body);
    assert_eq!(st, 200, "{r}");
    let ch = &r["choices"][0];
    let lp = &ch["logprobs"];
    assert_eq!(
        keys(lp),
        ["text_offset", "token_logprobs", "tokens", "top_logprobs"]
    );
    // Echo: prompt tokens first, the first without a logprob.
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 3 + 4);
    assert_eq!(
        lp["tokens"].as_array().unwrap()[..3],
        json!(["a", "b", "c"]).as_array().unwrap()[..]
    );
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    assert!(ch["text"].as_str().unwrap().starts_with("abc"));
    // text_offset is the running character offset into the choice's text.
    let text = ch["text"].as_str().unwrap();
    let mut off = 0;
    for (i, t) in lp["tokens"].as_array().unwrap().iter().enumerate() {
        assert_eq!(lp["text_offset"][i], off);
        off += t.as_str().unwrap().chars().count();
    }
    assert_eq!(off, text.chars().count());
    // Greedy: each generated token is the most likely in its top_logprobs; like vLLM, the
    // chosen token comes first in the object.
    let raw = c
        .post(s.url("/v1/completions"))
        .json(&body)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let first_key = raw
        .split("\"top_logprobs\":[null,{\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert_eq!(first_key, lp["tokens"][1].as_str().unwrap());
    for i in 3..7 {
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(top.len() <= 3);
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(lp["token_logprobs"][i].as_f64().unwrap(), best);
    }
    // prompt_logprobs: [null, {"<id>": {logprob, rank, decoded_token}}, ...].
    let pl = ch["prompt_logprobs"].as_array().unwrap();
    assert_eq!(pl.len(), 3);
    assert_eq!(pl[0], Value::Null);
    let e = pl[1].as_object().unwrap();
    let b_id = (b'b' as u32 + 3).to_string();
    assert_eq!(keys(&e[&b_id]), ["decoded_token", "logprob", "rank"]);
    assert_eq!(e[&b_id]["decoded_token"], "b");
    assert!(e.len() <= 2);
    assert_eq!(ch["prompt_token_ids"], json!([100, 101, 102]));
    assert_eq!(ch["token_ids"].as_array().unwrap().len(), 4);
    // Tokens as ids.
    let (_, r) = post(
        &c,
        &s.url("/v1/completions"),
        &json!({"prompt": "abc", "max_tokens": 2, "logprobs": 0, "return_tokens_as_token_ids": true}),
    );
    for t in r["choices"][0]["logprobs"]["tokens"].as_array().unwrap() {
        assert!(t.as_str().unwrap().starts_with("token_id:"), "{t}");
    }
}

#[test]
fn n_seed_batch_prompts_and_stop() {
    let s = tiny_server(&[]);
    let c = client();
    let body =
        json!({"prompt": ["one", "two"], "n": 3, "seed": 11, "max_tokens": 6, "temperature": 1.0});
    let (st, r) = post(&c, &s.url("/v1/completions"), &body);
    assert_eq!(st, 200, "{r}");
    let idx: Vec<u64> = r["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2, 3, 4, 5]);
    assert_eq!(r["usage"]["prompt_tokens"], 6);
    let total: usize = r["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().len())
        .sum();
    assert!(total > 0);
    let (_, again) = post(&c, &s.url("/v1/completions"), &body);
    assert_eq!(r["choices"], again["choices"], "same seed, same samples");
    // Stop string: the greedy text cut before it, stop_reason names it.
    let (_, g) = post(
        &c,
        &s.url("/v1/completions"),
        &json!({"prompt": "Hi", "max_tokens": 30, "temperature": 0, "ignore_eos": true}),
    );
    let text = g["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[4..6].iter().collect();
    let (_, r) = post(
        &c,
        &s.url("/v1/completions"),
        &json!({"prompt": "Hi", "max_tokens": 30, "temperature": 0, "ignore_eos": true, "stop": stop}),
    );
    let ch = &r["choices"][0];
    assert_eq!(
        ch["text"].as_str().unwrap(),
        &text[..text.find(&stop).unwrap()]
    );
    assert_eq!(ch["finish_reason"], "stop");
    assert_eq!(ch["stop_reason"], json!(stop));
}

#[test]
fn streaming_completion_and_chat_match_non_streaming() {
    let s = tiny_server(&[]);
    let c = client();
    let body =
        json!({"prompt": "stream me", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let (_, whole) = post(&c, &s.url("/v1/completions"), &body);
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = post_stream(&c, &s.url("/v1/completions"), &sb);
    assert!(done, "stream ends with [DONE]");
    let text: String = chunks
        .iter()
        .flat_map(|ch| {
            ch["choices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["text"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);
    let fin: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter(|c| !c["finish_reason"].is_null())
        .collect();
    assert_eq!(fin.len(), 1);
    assert_eq!(fin[0]["finish_reason"], "length");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "text_completion" && c["id"] == chunks[0]["id"]));
    // Streamed logprobs: text_offset runs over the whole text; continuous usage counts up.
    let mut lb = body.clone();
    lb["stream"] = json!(true);
    lb["logprobs"] = json!(1);
    lb["echo"] = json!(true);
    lb["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
    let (chunks, _) = post_stream(&c, &s.url("/v1/completions"), &lb);
    let mut offsets = Vec::new();
    let mut text = String::new();
    let mut last_usage = 0;
    for ch in &chunks {
        for c in ch["choices"].as_array().unwrap() {
            text.push_str(c["text"].as_str().unwrap());
            offsets.extend(
                c["logprobs"]["text_offset"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap()),
            );
        }
        let u = ch["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(u >= last_usage);
        last_usage = u;
    }
    assert_eq!(last_usage, 12);
    assert!(text.starts_with("stream me"));
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    assert_eq!(offsets.len(), 9 + 12);

    let chat = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let (st, whole) = post(&c, &s.url("/v1/chat/completions"), &chat);
    assert_eq!(st, 200, "{whole}");
    let mut sc = chat.clone();
    sc["stream"] = json!(true);
    let (chunks, done) = post_stream(&c, &s.url("/v1/chat/completions"), &sc);
    assert!(done);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .flat_map(|ch| {
            ch["choices"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|c| c["delta"]["content"].as_str().map(str::to_string))
        })
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(
        chunks.iter().all(|c| c["usage"].is_null()),
        "no usage unless asked"
    );
}

#[test]
fn chat_response_shape_and_logprobs() {
    let s = tiny_server(&["--logprobs-mode", "processed_logprobs"]);
    let c = client();
    let body = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                      "max_completion_tokens": 5, "temperature": 1.0, "top_k": 1, "seed": 3, "logprobs": true, "top_logprobs": 2, "ignore_eos": true});
    let (st, r) = post(&c, &s.url("/v1/chat/completions"), &body);
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        keys(&r),
        ["choices", "created", "id", "model", "object", "usage"]
    );
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["object"], "chat.completion");
    let ch = &r["choices"][0];
    assert_eq!(ch["message"]["role"], "assistant");
    assert_eq!(ch["message"]["tool_calls"], json!([]));
    let content = ch["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for e in content {
        assert_eq!(keys(e), ["bytes", "logprob", "token", "top_logprobs"]);
        let tok = e["token"].as_str().unwrap();
        assert_eq!(e["bytes"], json!(tok.as_bytes()));
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // top_k = 1 leaves one token in the processed distribution: its logprob is 0 and the
        // runner-up's is -inf, written as -9999.0.
        assert_eq!(e["logprob"].as_f64().unwrap(), 0.0);
        assert_eq!(top[1]["logprob"].as_f64().unwrap(), -9999.0);
    }
    // The prompt is the template rendering of both messages.
    let (_, t) = post(
        &c,
        &s.url("/tokenize"),
        &json!({"messages": body["messages"]}),
    );
    assert_eq!(r["usage"]["prompt_tokens"], t["count"]);
    assert_eq!(r["usage"]["completion_tokens"], 5);
}

#[test]
fn models_tokenize_detokenize_health_ping_version() {
    let s = tiny_server(&["--served-model-name", "tiny", "--max-model-len", "512"]);
    let c = client();
    let m: Value = c.get(s.url("/v1/models")).send().unwrap().json().unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "tiny");
    assert_eq!(m["data"][0]["object"], "model");
    assert_eq!(m["data"][0]["owned_by"], "halfstep");
    assert_eq!(m["data"][0]["max_model_len"], 512);
    let (st, t) = post(
        &c,
        &s.url("/tokenize"),
        &json!({"prompt": "hé", "return_token_strs": true}),
    );
    assert_eq!(st, 200);
    assert_eq!(t["count"], 3);
    assert_eq!(t["max_model_len"], 512);
    assert_eq!(t["tokens"], json!([107, 198, 172]));
    assert_eq!(t["token_strs"].as_array().unwrap().len(), 3);
    let (st, d) = post(
        &c,
        &s.url("/detokenize"),
        &json!({"tokens": [107, 198, 172]}),
    );
    assert_eq!(st, 200);
    assert_eq!(d, json!({"prompt": "hé"}));
    let (_, t) = post(&c, &s.url("/tokenize"), &json!({"prompt": "x"}));
    assert_eq!(t["token_strs"], Value::Null);
    assert_eq!(c.get(s.url("/health")).send().unwrap().status(), 200);
    assert_eq!(c.get(s.url("/ping")).send().unwrap().status(), 200);
    let v: Value = c.get(s.url("/version")).send().unwrap().json().unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

fn assert_error(status: u16, body: &Value, want: u16) {
    assert_eq!(status, want, "{body}");
    let e = &body["error"];
    assert_eq!(keys(e), ["code", "message", "param", "type"], "{body}");
    assert_eq!(e["code"], want);
    assert!(!e["message"].as_str().unwrap().is_empty());
}

#[test]
fn errors_have_the_openai_shape_and_status() {
    let s = tiny_server(&[
        "--api-key",
        "sekrit",
        "--max-body-bytes",
        "64KiB",
        "--max-model-len",
        "256",
    ]);
    let c = client();
    let url = s.url("/v1/completions");
    let authed = |b: &Value| {
        let r = c.post(&url).bearer_auth("sekrit").json(b).send().unwrap();
        let st = r.status().as_u16();
        (st, r.json::<Value>().unwrap())
    };
    // 401 without or with a wrong key.
    let (st, b) = post(&c, &url, &json!({"prompt": "x"}));
    assert_error(st, &b, 401);
    let r = c
        .post(&url)
        .bearer_auth("nope")
        .json(&json!({"prompt": "x"}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // 404: unknown model and unknown route.
    let (st, b) = authed(&json!({"prompt": "x", "model": "gpt-5"}));
    assert_error(st, &b, 404);
    assert_eq!(b["error"]["param"], "model");
    let r = c.get(s.url("/v2/nothing")).send().unwrap();
    assert_eq!(r.status(), 404);
    assert_error(404, &r.json().unwrap(), 404);
    // 405 on a wrong method.
    let r = c.get(s.url("/tokenize")).send().unwrap();
    assert_error(r.status().as_u16(), &r.json().unwrap(), 405);
    // 413 on a body over --max-body-bytes.
    let big = json!({"prompt": "a".repeat(100_000)});
    let (st, b) = authed(&big);
    assert_error(st, &b, 413);
    // 400s, each naming its parameter.
    for (body, param) in [
        (json!({"prompt": "x", "max_tokens": 1000}), "max_tokens"),
        (json!({"prompt": "x", "temperature": -1}), "temperature"),
        (json!({"prompt": "x", "top_p": 7}), "top_p"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "logprobs": 21}), "logprobs"),
        (json!({"prompt": [1, 99999]}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (
            json!({"prompt": "x", "stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (json!({"prompt": "a".repeat(300)}), "prompt"),
    ] {
        let (st, b) = authed(&body);
        assert_error(st, &b, 400);
        assert_eq!(b["error"]["param"], param, "{body}");
    }
    let (st, b) = authed(&json!({"prompt": 5}));
    assert_error(st, &b, 400);
    // Chat: top_logprobs without logprobs, bad role.
    let chat = s.url("/v1/chat/completions");
    for body in [
        json!({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}),
        json!({"messages": [{"role": "wizard", "content": "x"}]}),
        json!({"messages": []}),
    ] {
        let r = c
            .post(&chat)
            .bearer_auth("sekrit")
            .json(&body)
            .send()
            .unwrap();
        assert_error(r.status().as_u16(), &r.json().unwrap(), 400);
    }
}

/// 200 malformed or out-of-range requests: every one gets a 4xx with an error body, the
/// server stays up, and a valid request afterwards gives the same output as before.
#[test]
fn two_hundred_bad_requests_leave_the_server_serving_the_same_output() {
    let s = tiny_server(&["--max-body-bytes", "64KiB", "--max-model-len", "512"]);
    let mut s = s;
    let c = client();
    let probe = json!({"prompt": "probe", "max_tokens": 8, "temperature": 0, "logprobs": 1});
    let (_, before) = post(&c, &s.url("/v1/completions"), &probe);
    let raw_bodies: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"\"prompt\"".to_vec(),
        b"{\"prompt\": \"x\", ".to_vec(),
        vec![0xff, 0xfe, 0x00],
        b"{\"prompt\": \"\\ud800\"}".to_vec(),
    ];
    let json_bodies: Vec<Value> = vec![
        json!({}),
        json!({"prompt": null}),
        json!({"prompt": true}),
        json!({"prompt": [[]]}),
        json!({"prompt": [[1, -2]]}),
        json!({"prompt": [1.5]}),
        json!({"prompt": {"a": 1}}),
        json!({"prompt": "x", "max_tokens": "ten"}),
        json!({"prompt": "x", "max_tokens": 0}),
        json!({"prompt": "x", "max_tokens": 1e30}),
        json!({"prompt": "x", "temperature": "hot"}),
        json!({"prompt": "x", "top_k": -5}),
        json!({"prompt": "x", "min_p": 2}),
        json!({"prompt": "x", "presence_penalty": 9}),
        json!({"prompt": "x", "repetition_penalty": 0}),
        json!({"prompt": "x", "n": 1000}),
        json!({"prompt": "x", "n": -1}),
        json!({"prompt": "x", "logprobs": -1}),
        json!({"prompt": "x", "prompt_logprobs": 100}),
        json!({"prompt": "x", "stop": [""]}),
        json!({"prompt": "x", "stop": 5}),
        json!({"prompt": "x", "stop_token_ids": [-1]}),
        json!({"prompt": "x", "stop_token_ids": [1e9]}),
        json!({"prompt": "x", "min_tokens": 50, "max_tokens": 5}),
        json!({"prompt": "x", "best_of": 3}),
        json!({"prompt": "x", "suffix": "y"}),
        json!({"prompt": "x", "model": "other"}),
        json!({"prompt": "x".repeat(600)}),
        json!({"prompt": "x", "seed": "abc"}),
        json!({"prompt": "x", "echo": "yes"}),
        json!({"prompt": vec![7; 600]}),
        json!({"prompt": "x", "max_tokens": 600}),
    ];
    let chat_bodies: Vec<Value> = vec![
        json!({}),
        json!({"messages": "hi"}),
        json!({"messages": [{"content": "x"}]}),
        json!({"messages": [{"role": "user", "content": 5}]}),
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}),
        json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 50}),
        json!({"messages": [{"role": "user", "content": "x"}], "continue_final_message": true, "add_generation_prompt": true}),
        json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}),
    ];
    let mut sent = 0;
    let huge = vec![b'a'; 1 << 20];
    while sent < 200 {
        let i = sent;
        let (url, body): (String, Vec<u8>) = match i % 4 {
            0 => (
                s.url("/v1/completions"),
                raw_bodies[i / 4 % raw_bodies.len()].clone(),
            ),
            1 => (
                s.url("/v1/completions"),
                json_bodies[i / 4 % json_bodies.len()]
                    .to_string()
                    .into_bytes(),
            ),
            2 => (
                s.url("/v1/chat/completions"),
                chat_bodies[i / 4 % chat_bodies.len()]
                    .to_string()
                    .into_bytes(),
            ),
            _ => match i / 4 % 4 {
                0 => (s.url("/v1/completions"), huge.clone()),
                1 => (s.url("/tokenize"), b"{\"prompt\": 3}".to_vec()),
                2 => (s.url("/detokenize"), b"{\"tokens\": [1, 100000]}".to_vec()),
                _ => (
                    s.url("/v1/completions"),
                    json!({"prompt": [[1], []]}).to_string().into_bytes(),
                ),
            },
        };
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().unwrap();
        assert!(
            (400..500).contains(&status),
            "request {i} to {url} ({:?}) got {status}: {text}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("request {i}: not JSON: {text}"));
        assert_error(status, &v, status);
        sent += 1;
    }
    assert!(s.alive());
    let (_, after) = post(&c, &s.url("/v1/completions"), &probe);
    assert_eq!(before["choices"], after["choices"]);
}

#[test]
fn http_logprobs_are_bitwise_the_engines() {
    use halfstep_model::{Checkpoint, Kernels, Model, Tokenizer};
    use halfstep_server::engine::{start_engine, EngineConfig, RequestOutput, SamplingParams};
    let dir = common::tiny_model();
    let s = tiny_server(&[]);
    let c = client();
    let (_, r) = post(
        &c,
        &s.url("/v1/completions"),
        &json!({"prompt": [5, 6, 7, 8], "max_tokens": 20, "seed": 99, "temperature": 0.8, "logprobs": 3, "ignore_eos": true, "return_token_ids": true}),
    );
    let ck = Checkpoint::open(&dir).unwrap();
    let m = Model::<half::f16>::load(ck.config, &*ck.tensors, Kernels::global()).unwrap();
    let tok = std::sync::Arc::new(Tokenizer::from_hf_dir(&dir).unwrap());
    let e = start_engine(m, tok, EngineConfig::default());
    let params = SamplingParams {
        max_tokens: 20,
        seed: Some(99),
        temperature: 0.8,
        logprobs: Some(3),
        ignore_eos: true,
        ..Default::default()
    };
    let mut rx = e.submit("x".into(), vec![5, 6, 7, 8], params).unwrap();
    let mut toks = Vec::new();
    while let Some(o) = rx.blocking_recv() {
        if let RequestOutput::Sample(s) = o {
            toks.extend(s.tokens);
        }
    }
    let ch = &r["choices"][0];
    let ids: Vec<u32> = toks.iter().map(|t| t.token).collect();
    assert_eq!(ch["token_ids"], json!(ids));
    for (i, t) in toks.iter().enumerate() {
        let http = ch["logprobs"]["token_logprobs"][i].as_f64().unwrap() as f32;
        assert_eq!(
            http.to_bits(),
            t.logprob.as_ref().unwrap().logprob.to_bits(),
            "token {i}"
        );
    }
}

#[test]
fn clients_that_disconnect_abort_their_requests_and_free_blocks() {
    let s = tiny_server(&[]);
    let long =
        json!({"prompt": "a long one", "max_tokens": 1000, "temperature": 0, "ignore_eos": true});
    // Streaming: read a little, then hang up.
    let mut sb = long.clone();
    sb["stream"] = json!(true);
    common::start_and_drop_stream(&s.url("/v1/completions"), &sb);
    common::wait_idle(&s);
    // Non-streaming: the client gives up before the answer.
    let impatient = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_millis(150))
        .build()
        .unwrap();
    let mut chat = json!({"messages": [{"role": "user", "content": "go on"}], "max_tokens": 1000, "temperature": 0, "ignore_eos": true});
    assert!(impatient
        .post(s.url("/v1/completions"))
        .json(&long)
        .send()
        .is_err());
    assert!(impatient
        .post(s.url("/v1/chat/completions"))
        .json(&chat)
        .send()
        .is_err());
    common::wait_idle(&s);
    let aborted: f64 = client()
        .get(s.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap()
        .lines()
        .filter(|l| {
            l.starts_with("vllm:request_success_total{") && l.contains("finished_reason=\"abort\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(aborted, 3.0, "each hung-up request was aborted");
    chat["stream"] = json!(true);
    let (chunks, done) = post_stream(
        &client(),
        &s.url("/v1/chat/completions"),
        &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": true}),
    );
    assert!(done && !chunks.is_empty(), "still serving");
}

#[test]
fn sigterm_lets_in_flight_requests_finish_and_exits_zero() {
    let mut s = tiny_server(&["--shutdown-timeout", "30"]);
    let url = s.url("/v1/completions");
    // A request that is running when the signal comes finishes normally.
    let running = std::thread::spawn(move || {
        post(
            &client(),
            &url,
            &json!({"prompt": "finish me", "max_tokens": 400, "temperature": 0, "ignore_eos": true}),
        )
    });
    common::wait_running(&s);
    let status = s
        .terminate(std::time::Duration::from_secs(30))
        .expect("exits after draining");
    assert!(status.success(), "exit status {status:?}");
    let (st, r) = running.join().unwrap();
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 400);
}

#[test]
fn sigterm_stops_requests_still_running_after_the_shutdown_timeout() {
    let mut s = tiny_server(&["--shutdown-timeout", "0.5", "--max-model-len", "1024"]);
    let url = s.url("/v1/completions");
    let stream = std::thread::spawn(move || {
        let body = json!({"prompt": "x", "max_tokens": 1000, "temperature": 0, "ignore_eos": true, "stream": true});
        let r = client().post(&url).json(&body).send().unwrap();
        std::io::Read::read_to_end(&mut { r }, &mut Vec::new()).ok();
    });
    common::wait_running(&s);
    let t0 = std::time::Instant::now();
    let status = s
        .terminate(std::time::Duration::from_secs(20))
        .expect("exits at the timeout");
    assert!(status.success(), "exit status {status:?}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    stream.join().unwrap();
}

#[test]
fn an_engine_panic_makes_the_server_exit_non_zero_instead_of_hanging() {
    let model = common::tiny_model();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_halfstep"))
        .arg("serve")
        .arg(&model)
        .args(["--port", "0"])
        .env("HALFSTEP_FAULT_ENGINE_PANIC_STEP", "3")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Port 0 binds any free port: read the address from the log.
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let base = loop {
        let line = lines.next().expect("server log").unwrap();
        if let Some(i) = line.find("on http://") {
            break line[i + 3..].trim().to_string();
        }
    };
    // This request makes the engine step until the injected panic; it must end, not hang.
    let _ = client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "boom", "max_tokens": 50}))
        .send();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "server did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        !status.success(),
        "exit status must be non-zero, got {status:?}"
    );
    let log: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        log.iter().any(|l| l.contains("engine thread panicked")),
        "{log:?}"
    );
}

#[test]
fn chat_template_options_continue_final_message_and_add_generation_prompt() {
    let s = tiny_server(&[]);
    let c = client();
    let msgs =
        json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello th"}]);
    // The rendered prompt of each option, through /tokenize and /detokenize.
    let render = |extra: serde_json::Value| {
        let mut body =
            json!({"messages": msgs, "max_tokens": 1, "return_token_ids": true, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (st, r) = post(&c, &s.url("/v1/chat/completions"), &body);
        assert_eq!(st, 200, "{r}");
        let ids = r["prompt_token_ids"].clone();
        let (_, d) = post(&c, &s.url("/detokenize"), &json!({"tokens": ids}));
        d["prompt"].as_str().unwrap().to_string()
    };
    let cont = render(json!({"continue_final_message": true, "add_generation_prompt": false}));
    assert!(
        cont.ends_with("<|im_start|>assistant\nHello th"),
        "{cont:?}"
    );
    let fresh = render(json!({}));
    assert!(
        fresh.ends_with("Hello th<|im_end|>\n<|im_start|>assistant\n"),
        "{fresh:?}"
    );
    let none = render(json!({"add_generation_prompt": false}));
    assert!(none.ends_with("Hello th<|im_end|>\n"), "{none:?}");
}

#[test]
fn oversized_request_headers_get_431_and_the_server_keeps_serving() {
    let s = tiny_server(&["--max-header-bytes", "16KiB"]);
    let c = client();
    // Over our limit: the OpenAI error body, before any route or key check runs.
    let r = c
        .post(s.url("/v1/completions"))
        .header("x-padding", "a".repeat(20_000))
        .json(&json!({"prompt": "x", "max_tokens": 1}))
        .send()
        .unwrap();
    let st = r.status().as_u16();
    assert_error(st, &r.json().unwrap(), 431);
    // Many small headers adding up to the limit.
    let mut req = c.get(s.url("/v1/models"));
    for i in 0..90 {
        req = req.header(format!("x-h{i}"), "b".repeat(200));
    }
    assert_eq!(req.send().unwrap().status(), 431);
    // Far over hyper's own buffer (about 400 KiB): refused or the connection closed, never a
    // crash or a hang.
    if let Ok(r) = c
        .get(s.url("/v1/models"))
        .header("x-huge", "c".repeat(1 << 20))
        .send()
    {
        assert_eq!(r.status(), 431);
    }
    // Just under the limit is fine, and the server still answers normally.
    let r = c
        .get(s.url("/v1/models"))
        .header("x-padding", "d".repeat(15_000))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (st, body) = post(
        &c,
        &s.url("/v1/completions"),
        &json!({"prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{body}");
}
