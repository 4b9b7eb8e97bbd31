//! `cargo bench -p halfstep-server --bench weights`: full-weight updates of the default model
//! (FP16) over loopback HTTP, by upload and from disk, idle and under 8 streaming clients.
//! Prints GB/s end to end and the swap time itself (after staging and validation).

use halfstep_model::testmodel::write_safetensors;
use halfstep_model::DType;
use halfstep_server::api::{self, ApiConfig, AppState};
use halfstep_server::engine::{EngineConfig, RequestOutput, SamplingParams};
use halfstep_server::loader;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("weights bench: run with `cargo bench -p halfstep-server --bench weights`");
        return;
    }
    let Some(path) = loader::default_model_path() else {
        println!("default model not found: run scripts/fetch-default-model.sh");
        return;
    };
    let (engine, _) = loader::start(
        &path,
        DType::Float16,
        halfstep_model::KernelMode::Parity,
        EngineConfig::default(),
        &mut |_, _| {},
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("halfstep-bench-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The serving weights, written back as one F16 safetensors file.
    let view = rt.block_on(engine.snapshot()).unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = view
        .names()
        .into_iter()
        .map(|n| {
            let v = view.values(&n).unwrap();
            let bytes = halfstep_model::testmodel::encode(DType::Float16, &v);
            (n.clone(), view.shape(&n).unwrap(), bytes)
        })
        .collect();
    let file = dir.join("model.safetensors");
    write_safetensors(&file, DType::Float16, &tensors).unwrap();
    let body = std::fs::read(&file).unwrap();
    let cfg = ApiConfig {
        served_model_name: "bench".into(),
        model_root: path.display().to_string(),
        api_key: None,
        max_body_bytes: 1 << 26,
        max_header_bytes: 32 << 10,
        request_timeout: Duration::from_secs(600),
        admin_key: Some("k".into()),
        enable_weight_updates: false,
        allowed_weight_dir: Some(dir.clone()),
    };
    let state = Arc::new(AppState::new(engine.clone(), &cfg));
    let app = api::router(state, &cfg);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();
    let base = format!("http://{addr}");
    println!(
        "weights bench: default model, F16, {:.0} MB per full update, loopback HTTP",
        body.len() as f64 / 1e6
    );
    println!(
        "\n{:<28} {:>10} {:>10} {:>10} {:>10}",
        "update", "total s", "GB/s", "stage s", "swap ms"
    );
    for loaded in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let load: Vec<_> = (0..if loaded { 8 } else { 0 })
            .map(|i| {
                let e = engine.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut k = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let p = SamplingParams {
                            max_tokens: 32,
                            ignore_eos: true,
                            ..Default::default()
                        };
                        let mut rx = e
                            .submit(format!("load-{i}-{k}"), vec![1, 2, 3, 4 + i], p)
                            .unwrap();
                        while let Some(o) = rx.blocking_recv() {
                            let _ = matches!(o, RequestOutput::Sample(_));
                        }
                        k += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let label = if loaded { "under 8 streams" } else { "idle" };
        for (kind, url, payload) in [
            (
                "upload",
                format!("{base}/update_weights?mode=continue"),
                body.clone(),
            ),
            (
                "disk",
                format!("{base}/update_weights_from_disk"),
                br#"{"model_path": "model.safetensors", "mode": "continue"}"#.to_vec(),
            ),
        ] {
            let t0 = Instant::now();
            let r: serde_json::Value = client
                .post(&url)
                .bearer_auth("k")
                .body(payload)
                .send()
                .unwrap()
                .json()
                .unwrap();
            let dt = t0.elapsed().as_secs_f64();
            assert_eq!(r["success"], true, "{r}");
            println!(
                "{:<28} {:>10.3} {:>10.2} {:>10.3} {:>10.3}",
                format!("{kind}, {label}"),
                dt,
                body.len() as f64 / dt / 1e9,
                r["timings"]["stage_s"].as_f64().unwrap(),
                r["timings"]["swap_s"].as_f64().unwrap() * 1e3
            );
        }
        stop.store(true, Ordering::Relaxed);
        for t in load {
            t.join().unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    engine.shutdown();
}
