//! Black-box test harness: starts the real `halfstep` binary on a loopback port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod scratch;
pub use scratch::scratch;

/// A running server process, killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    log: PathBuf,
}

/// The tiny model directory, written once per test binary run.
pub fn tiny_model() -> PathBuf {
    let dir = scratch("tiny");
    if !dir.join("model.safetensors").exists() {
        // Tests of one binary run in parallel threads: each writes its own copy, one wins.
        let tmp = dir.with_extension(
            format!("tmp-{:?}", std::thread::current().id()).replace(['(', ')'], ""),
        );
        let ok = Command::new(env!("CARGO_BIN_EXE_halfstep"))
            .args(["tiny-model"])
            .arg(&tmp)
            .status()
            .expect("running halfstep tiny-model");
        assert!(ok.success());
        let _ = std::fs::rename(&tmp, &dir);
    }
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Starts `halfstep serve MODEL ARGS...` and waits until `/health` answers 200.
    pub fn start(model: &Path, args: &[&str]) -> Server {
        for _ in 0..3 {
            let port = free_port();
            let log = scratch(&format!("server-{port}.log"));
            let child = Command::new(env!("CARGO_BIN_EXE_halfstep"))
                .arg("serve")
                .arg(model)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("starting halfstep serve");
            let mut s = Server {
                child,
                base: format!("http://127.0.0.1:{port}"),
                log,
            };
            if s.wait_healthy(Duration::from_secs(60)) {
                return s;
            }
        }
        panic!("server did not become healthy");
    }

    fn wait_healthy(&mut self, limit: Duration) -> bool {
        let t0 = Instant::now();
        let client = reqwest::blocking::Client::new();
        while t0.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                eprintln!("server exited:\n{}", self.log());
                return false;
            }
            if let Ok(r) = client.get(format!("{}/health", self.base)).send() {
                if r.status() == 200 {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (up to `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A blocking client with a generous timeout.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// POSTs JSON and returns (status, parsed body).
pub fn post(
    c: &reqwest::blocking::Client,
    url: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let r = c.post(url).json(body).send().expect("request");
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// POSTs and reads an SSE stream: the JSON of every `data:` line before `[DONE]`, and
/// whether `[DONE]` came.
pub fn post_stream(
    c: &reqwest::blocking::Client,
    url: &str,
    body: &serde_json::Value,
) -> (Vec<serde_json::Value>, bool) {
    let r = c.post(url).json(body).send().expect("request");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut chunks = Vec::new();
    let mut done = false;
    for line in BufReader::new(r).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            if d == "[DONE]" {
                done = true;
                break;
            }
            chunks.push(serde_json::from_str(d).unwrap());
        }
    }
    (chunks, done)
}

/// Reads a few bytes of a streaming response and then drops the connection.
pub fn start_and_drop_stream(url: &str, body: &serde_json::Value) {
    let r = client().post(url).json(body).send().expect("request");
    let mut buf = [0u8; 64];
    let mut rd = r;
    let _ = rd.read(&mut buf);
}

/// Reads a gauge from `/metrics` (summed over label sets).
pub fn gauge(s: &Server, name: &str) -> f64 {
    let text = client()
        .get(s.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until a request is running, so a test acts on in-flight work however fast the
/// server decodes.
pub fn wait_running(s: &Server) {
    let t0 = std::time::Instant::now();
    while gauge(s, "vllm:num_requests_running") < 1.0 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "no request started running"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Waits until no request runs and every K/V block is free again (a leak fails the test).
pub fn wait_idle(s: &Server) {
    let t0 = std::time::Instant::now();
    loop {
        let running = gauge(s, "vllm:num_requests_running");
        let free = gauge(s, "halfstep_kv_blocks_free");
        if running == 0.0 && free == gauge(s, "halfstep_kv_blocks_total") {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "blocks not freed: running {running}, free {free}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
