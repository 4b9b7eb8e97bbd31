//! Property test of request validation: JSON bodies built from the OpenAPI spec's own field
//! names with values of every JSON type and extreme sizes, sent through the real router
//! in-process. Every answer is a clean 2xx/4xx (or 503: the engine is paused so valid requests
//! stop just before queuing), with an OpenAI error body on failure; never a panic or a 500.

use axum::body::Body;
use axum::http::Request;
use halfstep_model::testmodel::TinyModelSpec;
use halfstep_model::{Checkpoint, Kernels, Model, Tokenizer};
use halfstep_server::api::{self, ApiConfig, AppState};
use halfstep_server::engine::{start_engine, EngineConfig};
use proptest::prelude::*;

#[path = "../../tests/common/scratch.rs"]
mod scratch;
use scratch::scratch;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tower::ServiceExt;

struct Harness {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    spec: Value,
    fields: Vec<(String, Value)>,
}

/// Property names of a schema, following `$ref` and `allOf`/`oneOf`/`anyOf`.
fn properties(spec: &Value, schema: &Value, out: &mut Vec<String>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap();
        return properties(spec, &spec["components"]["schemas"][name], out);
    }
    if let Some(p) = schema.get("properties").and_then(Value::as_object) {
        out.extend(p.keys().cloned());
    }
    for k in ["allOf", "oneOf", "anyOf"] {
        for s in schema
            .get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            properties(spec, s, out);
        }
    }
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = scratch("tiny");
        let _ = std::fs::remove_dir_all(&dir);
        TinyModelSpec::default().write(&dir).unwrap();
        let ck = Checkpoint::open(&dir).unwrap();
        let model = Model::<half::f16>::load(
            ck.config,
            &*ck.tensors,
            Kernels::with_threads(halfstep_model::SimdLevel::detect(), 1),
        )
        .unwrap();
        let tok = Arc::new(Tokenizer::from_hf_dir(&dir).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let engine = start_engine(model, tok, EngineConfig::default());
        let cfg = ApiConfig {
            served_model_name: "tiny".into(),
            model_root: dir.display().to_string(),
            api_key: None,
            max_body_bytes: 1 << 20,
            max_header_bytes: 32 << 10,
            request_timeout: Duration::from_secs(30),
            admin_key: None,
            enable_weight_updates: false,
            allowed_weight_dir: None,
        };
        let state = Arc::new(AppState::new(engine, &cfg));
        // Valid requests end at the readiness check instead of generating.
        state.reject_new.store(true, Ordering::Relaxed);
        let app = api::router(state, &cfg);
        let spec: Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../openapi/openapi.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let mut fields = Vec::new();
        for route in [
            "/v1/completions",
            "/v1/chat/completions",
            "/tokenize",
            "/detokenize",
            "/v1/logprobs",
            "/v1/mismatch_report",
        ] {
            let schema = &spec["paths"][route]["post"]["requestBody"]["content"]
                ["application/json"]["schema"];
            let mut names = Vec::new();
            properties(&spec, schema, &mut names);
            assert!(names.len() >= 2, "{route}: no fields found in the spec");
            fields.push((route.to_string(), schema.clone()));
        }
        Harness {
            rt,
            app,
            spec,
            fields,
        }
    })
}

/// A small deterministic generator: proptest picks the seed, the spec the shapes. A tame
/// generator keeps to ordinary values of the declared types, so that many requests pass
/// validation and the checks behind the parser are reached too.
struct Gen {
    state: u64,
    tame: bool,
}

impl Gen {
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }
}

/// A value for `schema`: mostly of its declared type (ordinary, boundary or absurd), now and
/// then of any other JSON type.
fn typed(spec: &Value, schema: &Value, g: &mut Gen, depth: usize) -> Value {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap();
        return typed(spec, &spec["components"]["schemas"][name], g, depth);
    }
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        let mut m = Map::new();
        for p in parts {
            if let Value::Object(o) = typed(spec, p, g, depth) {
                m.extend(o);
            }
        }
        return Value::Object(m);
    }
    for k in ["oneOf", "anyOf"] {
        if let Some(alts) = schema.get(k).and_then(Value::as_array) {
            let alt = g.pick(alts);
            return typed(spec, &alt, g, depth);
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if g.below(8) > 0 {
            return g.pick(e);
        }
    }
    let ty = match schema.get("type") {
        Some(Value::Array(ts)) => g.pick(ts).as_str().unwrap_or("null").to_string(),
        Some(Value::String(t)) => t.clone(),
        _ => "any".to_string(),
    };
    let ty = if (!g.tame && depth > 0 && g.below(10) == 0) || ty == "any" {
        g.pick(&[
            "null", "boolean", "integer", "number", "string", "array", "object",
        ])
        .to_string()
    } else {
        ty
    };
    let r = g.below(600);
    if g.tame {
        match ty.as_str() {
            "integer" => return json!(g.below(6)),
            "number" => return json!(g.below(11) as f64 / 10.0),
            "string" => return json!(g.pick(&["hi", "user", "assistant", "tiny", "stop"])),
            _ => {}
        }
    }
    match ty.as_str() {
        "integer" => json!(g.pick(&[
            0i64,
            1,
            2,
            5,
            16,
            -1,
            -2,
            258,
            259,
            260,
            4096,
            1 << 31,
            i64::MAX,
            i64::MIN,
            r as i64 / 2
        ])),
        "number" => json!(g.pick(&[
            0.0f64,
            1.0,
            -1.0,
            0.5,
            2.0,
            1e-30,
            1e308,
            -1e308,
            -0.0,
            r as f64 / 100.0 - 3.0
        ])),
        "string" => json!(g.pick(&[
            "x".repeat(3000).as_str(),
            "",
            "hi",
            "user",
            "assistant",
            "system",
            "tiny",
            "<|im_end|>",
            "\u{e9}\u{1F600}",
            "\n\n",
            "stop"
        ])),
        "boolean" => json!(g.below(2) == 0),
        "array" if depth < 3 => {
            let items = schema.get("items").cloned().unwrap_or(Value::Null);
            let n = g.pick(&[0usize, 1, 2, 3, 5]);
            Value::Array((0..n).map(|_| typed(spec, &items, g, depth + 1)).collect())
        }
        "object" if depth < 3 => {
            let mut m = Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                let required = schema["required"].as_array().cloned().unwrap_or_default();
                for (k, s) in props {
                    if g.below(3) > 0 || (required.contains(&json!(k)) && g.below(8) > 0) {
                        m.insert(k.clone(), typed(spec, s, g, depth + 1));
                    }
                }
            } else if g.below(2) == 0 {
                m.insert("k".into(), typed(spec, &Value::Null, g, depth + 1));
            }
            Value::Object(m)
        }
        _ => Value::Null,
    }
}

/// A route and a body built from its request schema: each field present with some
/// probability (required ones mostly), now and then an unknown field.
fn request() -> impl Strategy<Value = (usize, Value)> {
    (0usize..6, any::<u64>()).prop_map(|(route, seed)| {
        let h = harness();
        let mut g = Gen {
            state: seed,
            tame: seed % 2 == 0,
        };
        let (_, schema) = &h.fields[route];
        let mut body = typed(&h.spec, schema, &mut g, 0);
        if let Value::Object(m) = &mut body {
            if g.tame {
                m.retain(|_, _| g.below(3) == 0);
            }
            let mut required = Vec::new();
            required_fields(&h.spec, schema, &mut required);
            for (r, s) in required {
                if !m.contains_key(&r) && g.below(8) > 0 {
                    m.insert(r, typed(&h.spec, &s, &mut g, 1));
                }
            }
            if g.below(10) == 0 {
                m.insert("no_such_field".into(), json!(1));
            }
        }
        (route, body)
    })
}

/// Required fields of a schema with their schemas, following `$ref` and `allOf`.
fn required_fields(spec: &Value, schema: &Value, out: &mut Vec<(String, Value)>) {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap();
        return required_fields(spec, &spec["components"]["schemas"][name], out);
    }
    for r in schema["required"].as_array().into_iter().flatten() {
        let r = r.as_str().unwrap();
        out.push((r.to_string(), schema["properties"][r].clone()));
    }
    for s in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        required_fields(spec, s, out);
    }
}

fn send(route: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let h = harness();
    h.rt.block_on(async {
        let req = Request::post(route)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let resp = h.app.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
            .await
            .unwrap();
        (status, bytes.to_vec())
    })
}

fn check(route: &str, status: u16, body: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(status, 200..=299 | 400 | 404 | 413 | 422 | 503),
        "{route}: status {status}: {}",
        String::from_utf8_lossy(body)
    );
    if status >= 400 {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| TestCaseError::fail(format!("{route}: error body is not JSON ({e})")))?;
        prop_assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{route}: {v}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn generated_requests_get_a_clean_answer((route, body) in request()) {
        let route = harness().fields[route].0.clone();
        let (status, resp) = send(&route, body.to_string().into_bytes());
        check(&route, status, &resp)?;
    }

    #[test]
    fn byte_soup_bodies_get_a_clean_answer(
        route in 0usize..6,
        body in proptest::collection::vec(any::<u8>(), 0..256)
    ) {
        let route = harness().fields[route].0.clone();
        let (status, resp) = send(&route, body);
        check(&route, status, &resp)?;
    }
}
