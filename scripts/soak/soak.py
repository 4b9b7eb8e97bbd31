"""Soak test of a running halfstep server (stdlib only).

Mixed load from several threads for a bounded time: streaming and plain completions and chat,
n > 1, long prompts (preemption with a small K/V cache), clients that hang up mid-stream, bad
requests, and weight updates in every mode every few seconds (re-uploading the same weights, so
outputs must not change). At the end it checks: no 5xx, every request got a final answer, all
K/V blocks free when idle, resident memory flat, the same greedy output for a probe prompt.
"""

import http.client
import json
import os
import random
import sys
import threading
import time

BASE_HOST, BASE_PORT = sys.argv[1], int(sys.argv[2])
ADMIN, WEIGHTS, PID = sys.argv[3], sys.argv[4], int(sys.argv[5])
SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))

stats = {"requests": 0, "streams": 0, "disconnects": 0, "bad": 0, "updates": 0, "errors": []}
lock = threading.Lock()


def conn():
    return http.client.HTTPConnection(BASE_HOST, BASE_PORT, timeout=120)


def call(method, path, body=None, headers=None, raw=None):
    c = conn()
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    out = r.read()
    c.close()
    return r.status, out


def record(kind, status, detail=""):
    with lock:
        stats[kind] += 1
        if status >= 500:
            stats["errors"].append(f"{kind}: {status} {detail[:200]}")


def probe():
    st, out = call("POST", "/v1/completions", {"prompt": "probe prompt", "max_tokens": 24, "temperature": 0, "ignore_eos": True})
    assert st == 200, (st, out)
    return json.loads(out)["choices"][0]["text"]


def metric(name):
    _, out = call("GET", "/metrics")
    total = 0.0
    for line in out.decode().splitlines():
        if line.startswith(name) and line[len(name)] in "{ ":
            total += float(line.rsplit(" ", 1)[1])
    return total


def rss_kib():
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def client_loop(seed, deadline):
    rng = random.Random(seed)
    while time.time() < deadline:
        kind = rng.random()
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.choice([5, 40, 180])))
        try:
            if kind < 0.30:
                body = {"prompt": prompt, "max_tokens": rng.randint(1, 40), "n": rng.choice([1, 1, 2, 3]), "temperature": 1.0}
                st, out = call("POST", "/v1/completions", body)
                record("requests", st, out.decode(errors="replace"))
                if st == 200 and any(c["finish_reason"] is None for c in json.loads(out)["choices"]):
                    with lock:
                        stats["errors"].append("a choice without finish_reason")
            elif kind < 0.60:
                body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": rng.randint(1, 40), "stream": True}
                c = conn()
                c.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
                r = c.getresponse()
                text = r.read().decode(errors="replace")
                c.close()
                record("streams", r.status, text)
                if r.status == 200 and "data: [DONE]" not in text:
                    with lock:
                        stats["errors"].append("a stream without [DONE]")
            elif kind < 0.75:
                body = {"prompt": prompt, "max_tokens": 200, "stream": True, "ignore_eos": True}
                c = conn()
                c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
                r = c.getresponse()
                r.read(200)
                c.close()  # hang up mid-stream
                record("disconnects", r.status)
            else:
                bad = rng.choice([b"{", b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": -1}', b'{"prompt": [99999]}'])
                st, out = call("POST", "/v1/completions", raw=bad)
                record("bad", st, out.decode(errors="replace"))
                if not 400 <= st < 500:
                    with lock:
                        stats["errors"].append(f"bad request answered {st}")
        except Exception as e:  # a connection error is a failure too
            with lock:
                stats["errors"].append(f"client exception: {e!r}")


def updater(deadline):
    body = open(WEIGHTS, "rb").read()
    modes = ["wait", "continue", "abort"]
    i = 0
    while time.time() < deadline:
        time.sleep(3)
        st, out = call("POST", f"/update_weights?mode={modes[i % 3]}", raw=body,
                       headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/octet-stream"})
        record("updates", st, out.decode(errors="replace"))
        if st != 200:
            with lock:
                stats["errors"].append(f"update {modes[i % 3]} answered {st}: {out[:200]!r}")
        i += 1


def main():
    before = probe()
    start = time.time()
    deadline = start + SECONDS
    threads = [threading.Thread(target=client_loop, args=(s, deadline)) for s in range(6)]
    threads.append(threading.Thread(target=updater, args=(deadline,)))
    for t in threads:
        t.start()
    curve = []
    while any(t.is_alive() for t in threads):
        curve.append((round(time.time() - start), rss_kib()))
        time.sleep(max(1.0, SECONDS / 20))
    for t in threads:
        t.join()
    # Idle: every block free, nothing running.
    for _ in range(100):
        if metric("vllm:num_requests_running") == 0 and metric("halfstep_kv_blocks_free") == metric("halfstep_kv_blocks_total"):
            break
        time.sleep(0.1)
    else:
        stats["errors"].append("K/V blocks not all free when idle")
    after = probe()
    if after != before:
        stats["errors"].append(f"probe output changed: {before!r} -> {after!r}")
    print("RSS curve (seconds, MiB): " + ", ".join(f"{s}:{kib / 1024:.0f}" for s, kib in curve))
    # Flat memory: the second half of the run grows by less than 10 % + 32 MiB.
    mid = curve[len(curve) // 2][1]
    end = rss_kib()
    if end > mid * 1.10 + 32 * 1024:
        stats["errors"].append(f"RSS grew from {mid} KiB (mid-run) to {end} KiB")
    print(f"requests {stats['requests']}, streams {stats['streams']}, disconnects {stats['disconnects']}, "
          f"bad requests {stats['bad']}, weight updates {stats['updates']}, errors {len(stats['errors'])}, "
          f"RSS start {curve[0][1] / 1024:.0f} MiB end {end / 1024:.0f} MiB, "
          f"preemptions {metric('vllm:num_preemptions_total'):.0f}")
    for e in stats["errors"][:20]:
        print("error:", e)
    passed = 1 if not stats["errors"] else 0
    print(f"soak: {passed} passed, {1 - passed} failed")
    sys.exit(0 if passed else 1)


main()
