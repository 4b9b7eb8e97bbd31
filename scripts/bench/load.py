#!/usr/bin/env python3
"""A fixed HTTP workload for OpenAI-compatible servers (halfstep, llama.cpp's llama-server, ...).

Streams /v1/completions from 1..64 concurrent clients, each sending `--requests` requests whose
prompt and output lengths come from a seeded distribution, and prints per concurrency level:
output tokens/s (all clients together), time to first token and inter-token latency
percentiles. `--ttft-prompt 512` also times the first token of single 512-token prompts.

Standard library only, so it runs anywhere python3 does. Output tokens are counted from the
stream (one chunk per token on halfstep and llama-server) and checked against `usage` when the
server sends it.
"""
import argparse
import json
import random
import statistics
import threading
import time
import http.client
import urllib.parse

WORDS = ("time person year way day thing man world life hand part child eye woman place work "
         "week case point government company number group problem fact").split()


def prompt_of(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def stream_completion(url, body, timeout=600):
    """Returns (ttft_s, [inter-token gaps], tokens, usage_tokens) of one streamed request."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft, last, gaps, tokens, usage = None, None, [], 0, None
    buf = b""
    while True:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
                msg = json.loads(data)
                if msg.get("usage"):
                    usage = msg["usage"].get("completion_tokens")
                for ch in msg.get("choices", []):
                    if ch.get("text"):
                        now = time.perf_counter()
                        if ttft is None:
                            ttft = now - t0
                        else:
                            gaps.append(now - last)
                        last = now
                        tokens += 1
    conn.close()
    return ttft, gaps, tokens, usage


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def run_level(url, model, conc, requests, seed, ignore_eos=True, prompt_words=(24, 200),
              out_tokens=(64, 128)):
    results, errors = [], []
    lock = threading.Lock()

    def client(i):
        rng = random.Random(seed * 1000 + i)
        for _ in range(requests):
            body = {
                "model": model,
                "prompt": prompt_of(rng, rng.randint(*prompt_words)),
                "max_tokens": rng.randint(*out_tokens),
                "temperature": 0.8,
                "seed": rng.randint(0, 1 << 30),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if ignore_eos:
                body["ignore_eos"] = True
            try:
                r = stream_completion(url, body)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    # The server's own count where it sends one: a chunk may carry more than one token.
    toks = sum(r[3] if r[3] is not None else r[2] for r in results)
    ttfts = [r[0] for r in results if r[0] is not None]
    gaps = [g for r in results for g in r[1]]
    mism = sum(1 for r in results if r[3] is not None and r[3] != r[2])
    return {
        "concurrency": conc,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "output_tok_s": toks / wall,
        "ttft_ms": [1e3 * pct(ttfts, p) for p in (50, 90, 99)],
        "itl_ms": [1e3 * pct(gaps, p) for p in (50, 90, 99)],
        "usage_mismatches": mism,
        "mean_output_tokens": toks / max(1, len(results)),
        "wall_s": wall,
    }


def ttft_long(url, model, n_words, reps):
    out = []
    for i in range(reps):
        rng = random.Random(4242 + i)  # a new prompt each time: no prefix-cache hit
        body = {"model": model, "prompt": prompt_of(rng, n_words), "max_tokens": 1,
                "temperature": 0, "stream": True}
        out.append(stream_completion(url, body)[0])
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttft-words", type=int, default=0,
                    help="also time first tokens of prompts this many words long")
    ap.add_argument("--label", default="server")
    ap.add_argument("--no-ignore-eos", action="store_true",
                    help="for servers that refuse the field: outputs may then end early at EOS")
    ap.add_argument("--json", default=None, help="append results as one JSON line here")
    ap.add_argument("--prompt-words", default="24,200", help="prompt length range, words: LO,HI")
    ap.add_argument("--max-tokens", default="64,128", help="output length range, tokens: LO,HI")
    a = ap.parse_args()
    prompt_words = tuple(int(x) for x in a.prompt_words.split(","))
    out_tokens = tuple(int(x) for x in a.max_tokens.split(","))
    rows = []
    print(f"{a.label}: {a.url}")
    # Warm-up: servers that load the model on first use (transformers serve) do it here.
    stream_completion(a.url, {"model": a.model, "prompt": "warm up", "max_tokens": 4, "stream": True})
    print(f"{'conc':>5} {'req':>5} {'err':>4} {'out tok/s':>10} {'TTFT p50/p90/p99 ms':>24} "
          f"{'ITL p50/p90/p99 ms':>22} {'out/req':>8}")
    for c in [int(x) for x in a.concurrency.split(",")]:
        r = run_level(a.url, a.model, c, a.requests, a.seed, not a.no_ignore_eos, prompt_words,
                      out_tokens)
        rows.append(r)
        t, i = r["ttft_ms"], r["itl_ms"]
        print(f"{c:>5} {r['requests']:>5} {r['errors']:>4} {r['output_tok_s']:>10.1f} "
              f"{t[0]:>8.0f}/{t[1]:>6.0f}/{t[2]:>6.0f} {i[0]:>8.1f}/{i[1]:>5.1f}/{i[2]:>5.1f} "
              f"{r['mean_output_tokens']:>8.1f}",
              flush=True)
        if r["usage_mismatches"]:
            print(f"      {r['usage_mismatches']} streams disagree with their usage token count")
        if r["first_error"]:
            print(f"      first error: {r['first_error']}")
    ttft = None
    if a.ttft_words:
        ttft = ttft_long(a.url, a.model, a.ttft_words, 3)
        print(f"TTFT, {a.ttft_words}-word prompt (median of 3, no cache hits): {1e3 * ttft:.0f} ms")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps({"label": a.label, "levels": rows, "ttft_long_s": ttft}) + "\n")


if __name__ == "__main__":
    main()
