//! Prometheus metrics: vLLM's names (so vLLM dashboards work) plus halfstep's own.
//!
//! Every metric is lock-free to update (atomics), so the engine thread records as it goes and a
//! scraper never holds anything the engine step waits on.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// vLLM's TTFT buckets (seconds).
const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets (seconds).
const ITL: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (seconds).
const LATENCY: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];
/// Tokens per engine step.
const ITERATION: &[f64] = &[
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];
/// Weight update and HTTP durations (seconds).
const DURATION: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// 1, 2, 5, 10, 20, 50, ... up to `max` (vLLM's `build_1_2_5_buckets`).
fn buckets_1_2_5(max: usize) -> Vec<f64> {
    let mut out = Vec::new();
    let mut base = 1usize;
    'outer: loop {
        for m in [1, 2, 5] {
            let v = base * m;
            if v > max {
                break 'outer;
            }
            out.push(v as f64);
        }
        base *= 10;
    }
    out
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// `vllm:num_requests_running`.
    pub num_requests_running: IntGauge,
    /// `vllm:num_requests_waiting`.
    pub num_requests_waiting: IntGauge,
    /// `vllm:num_requests_waiting_by_reason{reason}`.
    pub num_requests_waiting_by_reason: IntGaugeVec,
    /// `vllm:kv_cache_usage_perc` (0..1).
    pub kv_cache_usage: Gauge,
    /// `vllm:prompt_tokens_total`.
    pub prompt_tokens: IntCounter,
    /// `vllm:generation_tokens_total`.
    pub generation_tokens: IntCounter,
    /// `vllm:request_success_total{finished_reason}`.
    pub request_success: IntCounterVec,
    /// `vllm:prefix_cache_queries_total` (tokens).
    pub prefix_cache_queries: IntCounter,
    /// `vllm:prefix_cache_hits_total` (tokens).
    pub prefix_cache_hits: IntCounter,
    /// `vllm:num_preemptions_total`.
    pub num_preemptions: IntCounter,
    /// `vllm:time_to_first_token_seconds`.
    pub time_to_first_token: Histogram,
    /// `vllm:inter_token_latency_seconds`.
    pub inter_token_latency: Histogram,
    /// `vllm:e2e_request_latency_seconds`.
    pub e2e_request_latency: Histogram,
    /// `vllm:request_queue_time_seconds`.
    pub request_queue_time: Histogram,
    /// `vllm:request_prefill_time_seconds`.
    pub request_prefill_time: Histogram,
    /// `vllm:request_decode_time_seconds`.
    pub request_decode_time: Histogram,
    /// `vllm:request_inference_time_seconds`.
    pub request_inference_time: Histogram,
    /// `vllm:request_prompt_tokens`.
    pub request_prompt_tokens: Histogram,
    /// `vllm:request_generation_tokens`.
    pub request_generation_tokens: Histogram,
    /// `vllm:iteration_tokens_total`.
    pub iteration_tokens: Histogram,
    /// `vllm:request_time_per_output_token_seconds` (a request's mean inter-token time).
    pub request_time_per_output_token: Histogram,
    /// `vllm:request_max_num_generation_tokens` (the `max_tokens` asked for).
    pub request_max_num_generation_tokens: Histogram,
    /// `vllm:request_prefill_kv_computed_tokens` (prompt tokens computed, not cached).
    pub request_prefill_kv_computed_tokens: Histogram,
    /// `vllm:prompt_tokens_cached_total`.
    pub prompt_tokens_cached: IntCounter,
    /// `vllm:prompt_tokens_by_source_total{source}` (`local_compute`, `local_cache_hit`).
    pub prompt_tokens_by_source: IntCounterVec,
    /// `vllm:cache_config_info{block_size,num_gpu_blocks,cache_dtype,enable_prefix_caching}`.
    pub cache_config_info: GaugeVec,
    /// `vllm:rl_weight_update_operation_duration_seconds{operation}`.
    pub rl_operation_duration: HistogramVec,
    /// `halfstep_weight_version`.
    pub weight_version: IntGauge,
    /// `halfstep_weight_updates_total{outcome}`.
    pub weight_updates: IntCounterVec,
    /// `halfstep_weight_update_duration_seconds{phase}`.
    pub weight_update_duration: HistogramVec,
    /// `halfstep_weight_bytes_loaded_total`.
    pub weight_bytes_loaded: IntCounter,
    /// `halfstep_kv_blocks_total`.
    pub kv_blocks_total: IntGauge,
    /// `halfstep_kv_blocks_free`.
    pub kv_blocks_free: IntGauge,
    /// `halfstep_mismatch_<stat>{dtype,learner}` gauges by statistic name.
    pub mismatch: Vec<(&'static str, GaugeVec)>,
    /// `halfstep_mismatch_reports_total`.
    pub mismatch_reports: IntCounter,
    /// `http_requests_total{handler,status}`.
    pub http_requests: IntCounterVec,
    /// `http_request_duration_seconds{handler}`.
    pub http_request_duration: HistogramVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Mismatch statistics a trainer reports.
pub const MISMATCH_STATS: [&str; 6] = ["max_abs", "mean_abs", "k1", "k3", "ratio_min", "ratio_max"];

impl Metrics {
    /// All metrics of a server serving `model_name` with contexts up to `max_model_len`.
    pub fn new(model_name: &str, max_model_len: usize) -> Metrics {
        let registry = Registry::new();
        let engine = |o: Opts| {
            o.const_label("model_name", model_name)
                .const_label("engine", "0")
        };
        let hengine = |o: HistogramOpts| {
            o.const_label("model_name", model_name)
                .const_label("engine", "0")
        };
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m.expect("valid metric");
                registry
                    .register(Box::new(m.clone()))
                    .expect("unique metric");
                m
            }};
        }
        let hist = |name: &str, help: &str, b: &[f64]| {
            Histogram::with_opts(hengine(HistogramOpts::new(name, help).buckets(b.to_vec())))
        };
        let tokens = buckets_1_2_5(max_model_len);
        let m = Metrics {
            num_requests_running: reg!(IntGauge::with_opts(engine(Opts::new(
                "vllm:num_requests_running",
                "Number of requests in model execution batches."
            )))),
            num_requests_waiting: reg!(IntGauge::with_opts(engine(Opts::new(
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed."
            )))),
            num_requests_waiting_by_reason: reg!(IntGaugeVec::new(
                engine(Opts::new(
                    "vllm:num_requests_waiting_by_reason",
                    "Number of requests waiting, by reason."
                )),
                &["reason"]
            )),
            kv_cache_usage: reg!(Gauge::with_opts(engine(Opts::new(
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage."
            )))),
            prompt_tokens: reg!(IntCounter::with_opts(engine(Opts::new(
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed."
            )))),
            generation_tokens: reg!(IntCounter::with_opts(engine(Opts::new(
                "vllm:generation_tokens_total",
                "Number of generation tokens processed."
            )))),
            request_success: reg!(IntCounterVec::new(
                engine(Opts::new(
                    "vllm:request_success_total",
                    "Count of successfully processed requests."
                )),
                &["finished_reason"]
            )),
            prefix_cache_queries: reg!(IntCounter::with_opts(engine(Opts::new(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens."
            )))),
            prefix_cache_hits: reg!(IntCounter::with_opts(engine(Opts::new(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens."
            )))),
            num_preemptions: reg!(IntCounter::with_opts(engine(Opts::new(
                "vllm:num_preemptions_total",
                "Cumulative number of preemption from the engine."
            )))),
            time_to_first_token: reg!(hist(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT
            )),
            inter_token_latency: reg!(hist(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                ITL
            )),
            e2e_request_latency: reg!(hist(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                LATENCY
            )),
            request_queue_time: reg!(hist(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                LATENCY
            )),
            request_prefill_time: reg!(hist(
                "vllm:request_prefill_time_seconds",
                "Histogram of time spent in PREFILL phase for request.",
                LATENCY
            )),
            request_decode_time: reg!(hist(
                "vllm:request_decode_time_seconds",
                "Histogram of time spent in DECODE phase for request.",
                LATENCY
            )),
            request_inference_time: reg!(hist(
                "vllm:request_inference_time_seconds",
                "Histogram of time spent in RUNNING phase for request.",
                LATENCY
            )),
            request_prompt_tokens: reg!(hist(
                "vllm:request_prompt_tokens",
                "Number of prefill tokens processed.",
                &tokens
            )),
            request_generation_tokens: reg!(hist(
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                &tokens
            )),
            iteration_tokens: reg!(hist(
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                ITERATION
            )),
            request_time_per_output_token: reg!(hist(
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                ITL
            )),
            request_max_num_generation_tokens: reg!(hist(
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens.",
                &tokens
            )),
            request_prefill_kv_computed_tokens: reg!(hist(
                "vllm:request_prefill_kv_computed_tokens",
                "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
                &tokens
            )),
            prompt_tokens_cached: reg!(IntCounter::with_opts(engine(Opts::new(
                "vllm:prompt_tokens_cached_total",
                "Number of cached prompt tokens (local prefix cache)."
            )))),
            prompt_tokens_by_source: reg!(IntCounterVec::new(
                engine(Opts::new(
                    "vllm:prompt_tokens_by_source_total",
                    "Number of prompt tokens by source."
                )),
                &["source"]
            )),
            cache_config_info: reg!(GaugeVec::new(
                engine(Opts::new(
                    "vllm:cache_config_info",
                    "Information of the LLMEngine CacheConfig."
                )),
                &[
                    "block_size",
                    "num_gpu_blocks",
                    "cache_dtype",
                    "enable_prefix_caching"
                ]
            )),
            rl_operation_duration: reg!(HistogramVec::new(
                hengine(
                    HistogramOpts::new(
                        "vllm:rl_weight_update_operation_duration_seconds",
                        "Duration of RL weight-update operations."
                    )
                    .buckets(DURATION.to_vec())
                ),
                &["operation"]
            )),
            weight_version: reg!(IntGauge::with_opts(engine(Opts::new(
                "halfstep_weight_version",
                "Version of the weights serving now."
            )))),
            weight_updates: reg!(IntCounterVec::new(
                engine(Opts::new(
                    "halfstep_weight_updates_total",
                    "Weight updates by outcome."
                )),
                &["outcome"]
            )),
            weight_update_duration: reg!(HistogramVec::new(
                hengine(
                    HistogramOpts::new(
                        "halfstep_weight_update_duration_seconds",
                        "Weight update time by phase."
                    )
                    .buckets(DURATION.to_vec())
                ),
                &["phase"]
            )),
            weight_bytes_loaded: reg!(IntCounter::with_opts(engine(Opts::new(
                "halfstep_weight_bytes_loaded_total",
                "Bytes of weights staged by successful updates (run dtype)."
            )))),
            kv_blocks_total: reg!(IntGauge::with_opts(engine(Opts::new(
                "halfstep_kv_blocks_total",
                "K/V cache blocks in the pool."
            )))),
            kv_blocks_free: reg!(IntGauge::with_opts(engine(Opts::new(
                "halfstep_kv_blocks_free",
                "K/V cache blocks free or reusable from the prefix cache."
            )))),
            mismatch: MISMATCH_STATS
                .iter()
                .map(|s| {
                    let help = format!(
                        "Sampler/learner logprob mismatch {s}, as last reported by a trainer."
                    );
                    (
                        *s,
                        reg!(GaugeVec::new(
                            engine(Opts::new(format!("halfstep_mismatch_{s}"), help)),
                            &["dtype", "learner"]
                        )),
                    )
                })
                .collect(),
            mismatch_reports: reg!(IntCounter::with_opts(engine(Opts::new(
                "halfstep_mismatch_reports_total",
                "Mismatch reports received."
            )))),
            http_requests: reg!(IntCounterVec::new(
                Opts::new(
                    "http_requests_total",
                    "Total number of requests by method, status and handler."
                ),
                &["handler", "status", "method"]
            )),
            http_request_duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "http_request_duration_seconds",
                    "Latency with only few buckets by handler."
                )
                .buckets(DURATION.to_vec()),
                &["handler", "method"]
            )),
            registry,
        };
        // Label values known up front are exported from the start, as vLLM does, so
        // dashboards show zeros instead of "no data".
        for r in ["stop", "length", "abort"] {
            m.request_success.with_label_values(&[r]);
        }
        for s in ["local_compute", "local_cache_hit"] {
            m.prompt_tokens_by_source.with_label_values(&[s]);
        }
        for r in ["capacity", "deferred"] {
            m.num_requests_waiting_by_reason.with_label_values(&[r]);
        }
        for o in ["success", "rejected"] {
            m.weight_updates.with_label_values(&[o]);
        }
        for p in ["stage", "validate", "wait", "swap"] {
            m.weight_update_duration.with_label_values(&[p]);
        }
        for op in [
            "update_weights",
            "update_weights_from_disk",
            "finish_weight_update",
            "pause",
            "resume",
        ] {
            m.rl_operation_duration.with_label_values(&[op]);
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_buckets_follow_vllms_1_2_5_rule() {
        assert_eq!(
            super::buckets_1_2_5(100),
            vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
    }
}
