//! `/metrics` after a known workload, parsed with a real Prometheus text-format parser:
//! counters equal the responses' `usage`, histograms count every request, gauges return to
//! idle, and every metric a vLLM dashboard queries is there under its vLLM name.

mod common;

use common::{client, post, post_stream, Server};
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{MetricNumber, MetricsExposition, PrometheusCounterValue};
use openmetrics_parser::{PrometheusType, PrometheusValue};
use serde_json::json;

type Exposition = MetricsExposition<PrometheusType, PrometheusValue>;

fn scrape(s: &Server) -> String {
    let r = client().get(s.url("/metrics")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    r.text().unwrap()
}

fn num(n: &MetricNumber) -> f64 {
    match n {
        MetricNumber::Int(i) => *i as f64,
        MetricNumber::Float(f) => *f,
    }
}

/// Every sample of a family as (labels, value); histograms as their count.
fn family(m: &Exposition, name: &str) -> Vec<(std::collections::HashMap<String, String>, f64)> {
    let f = m
        .families
        .get(name)
        .unwrap_or_else(|| panic!("metric {name} missing"));
    let names = f.get_label_names().to_vec();
    f.iter_samples()
        .map(|s| {
            let ls = s.get_labelset().unwrap();
            let labels = names
                .iter()
                .filter_map(|n| {
                    ls.get_label_value(n)
                        .map(|v| (n.to_string(), v.to_string()))
                })
                .collect();
            let v = match &s.value {
                PrometheusValue::Counter(PrometheusCounterValue { value, .. }) => {
                    num(&value.clone())
                }
                PrometheusValue::Gauge(g) | PrometheusValue::Unknown(g) => num(g),
                PrometheusValue::Histogram(h) => h.count.unwrap_or(0) as f64,
                PrometheusValue::Summary(s) => s.count.unwrap_or(0) as f64,
            };
            (labels, v)
        })
        .collect()
}

fn value(m: &Exposition, name: &str) -> f64 {
    family(m, name).iter().map(|x| x.1).sum()
}

fn hist_count(m: &Exposition, name: &str) -> f64 {
    assert!(
        matches!(m.families[name].family_type, PrometheusType::Histogram),
        "{name} is a histogram"
    );
    value(m, name)
}

#[test]
fn metrics_match_a_known_workload() {
    let model = common::tiny_model();
    let s = Server::start(&model, &["--served-model-name", "tiny", "--admin-key", "k"]);
    let c = client();
    let (mut prompt, mut completion, mut requests) = (0u64, 0u64, 0u64);
    for i in 0..6 {
        let (st, r) = post(
            &c,
            &s.url("/v1/completions"),
            &json!({"prompt": format!("request number {i}"), "max_tokens": 5 + i, "temperature": 0}),
        );
        assert_eq!(st, 200);
        prompt += r["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += r["usage"]["completion_tokens"].as_u64().unwrap();
        requests += 1;
    }
    for i in 0..3 {
        let (chunks, _) = post_stream(
            &c,
            &s.url("/v1/chat/completions"),
            &json!({"messages": [{"role": "user", "content": format!("chat {i}")}], "max_tokens": 7, "stream": true, "stream_options": {"include_usage": true}}),
        );
        let u = &chunks.last().unwrap()["usage"];
        prompt += u["prompt_tokens"].as_u64().unwrap();
        completion += u["completion_tokens"].as_u64().unwrap();
        requests += 1;
    }
    // A weight update and a mismatch report.
    let body = std::fs::read(model.join("model.safetensors")).unwrap();
    let r = c
        .post(s.url("/update_weights"))
        .bearer_auth("k")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let (st, _) = post(
        &c,
        &s.url("/v1/mismatch_report"),
        &json!({"dtype": "float16", "learner": "parity", "max_abs": 0.0, "mean_abs": 0.0, "k1": 0.0, "k3": 0.0, "ratio_min": 1.0, "ratio_max": 1.0}),
    );
    assert_eq!(st, 200);
    std::thread::sleep(std::time::Duration::from_millis(100));
    let m = parse_prometheus(&scrape(&s)).expect("valid Prometheus text format");

    assert_eq!(value(&m, "vllm:prompt_tokens_total"), prompt as f64);
    // Every prompt token was either computed or served from the prefix cache.
    assert_eq!(
        value(&m, "vllm:prompt_tokens_by_source_total"),
        prompt as f64
    );
    assert_eq!(
        hist_count(&m, "vllm:request_max_num_generation_tokens"),
        requests as f64
    );
    assert_eq!(value(&m, "vllm:generation_tokens_total"), completion as f64);
    assert_eq!(value(&m, "vllm:num_requests_running"), 0.0);
    assert_eq!(value(&m, "vllm:num_requests_waiting"), 0.0);
    assert_eq!(value(&m, "vllm:kv_cache_usage_perc"), 0.0);
    assert_eq!(value(&m, "vllm:request_success_total"), requests as f64);
    for h in [
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
    ] {
        assert_eq!(
            hist_count(&m, h),
            requests as f64,
            "{h} has one observation per request"
        );
    }
    // Every token after each request's first is one inter-token interval.
    assert_eq!(
        hist_count(&m, "vllm:inter_token_latency_seconds"),
        (completion - requests) as f64
    );
    assert!(hist_count(&m, "vllm:iteration_tokens_total") >= 1.0);
    let running = family(&m, "vllm:num_requests_running");
    assert_eq!(
        running[0].0.get("model_name").map(String::as_str),
        Some("tiny")
    );
    assert_eq!(running[0].0.get("engine").map(String::as_str), Some("0"));
    assert_eq!(value(&m, "halfstep_weight_version"), 1.0);
    let updates = family(&m, "halfstep_weight_updates_total");
    let ok = updates
        .iter()
        .find(|x| x.0.get("outcome").map(String::as_str) == Some("success"))
        .unwrap();
    assert_eq!(ok.1, 1.0);
    assert!(value(&m, "halfstep_weight_bytes_loaded_total") > 0.0);
    assert!(value(&m, "halfstep_kv_blocks_total") > 0.0);
    assert_eq!(
        value(&m, "halfstep_kv_blocks_free"),
        value(&m, "halfstep_kv_blocks_total")
    );
    assert_eq!(value(&m, "halfstep_mismatch_ratio_max"), 1.0);
    let completions: f64 = family(&m, "http_requests_total")
        .iter()
        .filter(|x| {
            x.0.get("handler").map(String::as_str) == Some("/v1/completions")
                && x.0.get("status").map(String::as_str) == Some("2xx")
        })
        .map(|x| x.1)
        .sum();
    assert_eq!(completions, 6.0);
}

/// The names vLLM's Grafana dashboards query (and api.md lists) that mean something here.
#[test]
fn every_vllm_dashboard_metric_is_exported() {
    let s = Server::start(&common::tiny_model(), &[]);
    let (st, _) = post(
        &client(),
        &s.url("/v1/completions"),
        &json!({"prompt": "warm", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
    // Mismatch gauges carry the reporter's dtype and learner, so they appear with a report.
    let (st, _) = post(
        &client(),
        &s.url("/v1/mismatch_report"),
        &json!({"dtype": "bfloat16", "max_abs": 0.5, "mean_abs": 0.01, "k3": 0.001}),
    );
    assert_eq!(st, 200);
    let text = scrape(&s);
    parse_prometheus(&text).expect("valid Prometheus text format");
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
        "vllm:iteration_tokens_total",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:num_requests_waiting_by_reason",
        "vllm:rl_weight_update_operation_duration_seconds",
        "http_requests_total",
        "http_request_duration_seconds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "halfstep_weight_version",
        "halfstep_weight_updates_total",
        "halfstep_weight_update_duration_seconds",
        "halfstep_weight_bytes_loaded_total",
        "halfstep_kv_blocks_total",
        "halfstep_kv_blocks_free",
        "halfstep_mismatch_max_abs",
        "halfstep_mismatch_k3",
        "vllm:request_time_per_output_token_seconds",
        "vllm:request_max_num_generation_tokens",
        "vllm:request_prefill_kv_computed_tokens",
        "vllm:prompt_tokens_cached_total",
        "vllm:prompt_tokens_by_source_total",
        "vllm:cache_config_info",
        "process_start_time_seconds",
        "process_max_fds",
        "process_open_fds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} is not exported"
        );
    }
    for (name, ty) in [
        ("vllm:iteration_tokens_total", "histogram"),
        ("vllm:prompt_tokens_total", "counter"),
        ("vllm:kv_cache_usage_perc", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {ty}")),
            "{name} must be a {ty}"
        );
    }
}
