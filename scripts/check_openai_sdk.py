#!/usr/bin/env python3
"""Check a running halfstep server through the official OpenAI Python SDK.

Run by scripts/check-openai-sdk.sh against the seeded tiny test model (byte-level
tokenizer: one token per byte). Each check prints "ok <name>" or
"FAIL <name>: <why>"; the last line is "N passed, M failed". Exits 0 only if
every check passed.
"""
import argparse
import math
import sys
import traceback

import openai
from openai import OpenAI


class CheckError(AssertionError):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckError(msg)


def eq(got, want, what):
    expect(got == want, f"{what}: got {got!r}, want {want!r}")


CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def extra(obj, key):
    """A field the SDK's model does not declare (vLLM extension)."""
    me = getattr(obj, "model_extra", None) or {}
    if key in me:
        return me[key]
    return obj.to_dict().get(key)


# ---------------------------------------------------------------------------


@check
def models_list(c, model):
    ids = [m.id for m in c.models.list()]
    expect(model in ids, f"models.list() ids {ids!r} do not contain {model!r}")


@check
def completion_greedy(c, model):
    req = dict(model=model, prompt="Hello", max_tokens=8, temperature=0)
    r = c.completions.create(**req)
    eq(r.object, "text_completion", "object")
    eq(len(r.choices), 1, "number of choices")
    ch = r.choices[0]
    eq(ch.index, 0, "choices[0].index")
    eq(ch.finish_reason, "length", "choices[0].finish_reason")
    expect(r.usage is not None, "usage missing")
    eq(r.usage.completion_tokens, 8, "usage.completion_tokens")
    eq(r.usage.prompt_tokens, 5, "usage.prompt_tokens (byte-level tokenizer, 'Hello')")
    eq(r.usage.total_tokens, 13, "usage.total_tokens")
    expect(isinstance(ch.text, str) and ch.text != "", f"text empty: {ch.text!r}")
    r2 = c.completions.create(**req)
    eq(r2.choices[0].text, ch.text, "text of the same greedy request repeated")


@check
def completion_logprobs(c, model):
    r = c.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    expect(lp is not None, "choices[0].logprobs is None")
    eq(len(lp.tokens or []), 5, "len(logprobs.tokens)")
    eq(len(lp.token_logprobs or []), 5, "len(logprobs.token_logprobs)")
    eq(len(lp.top_logprobs or []), 5, "len(logprobs.top_logprobs)")
    eq(len(lp.text_offset or []), 5, "len(logprobs.text_offset)")
    for i, (tok, tlp, top) in enumerate(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs)):
        expect(isinstance(tlp, float) and math.isfinite(tlp) and tlp <= 0.0,
               f"token_logprobs[{i}] = {tlp!r} is not a finite float <= 0")
        expect(isinstance(top, dict), f"top_logprobs[{i}] is {type(top).__name__}, not dict")
        expect(1 <= len(top) <= 4, f"top_logprobs[{i}] has {len(top)} entries, want 1..4: {top!r}")
        for k, v in top.items():
            expect(isinstance(v, float) and v <= 0.0, f"top_logprobs[{i}][{k!r}] = {v!r} not a float <= 0")
        best = max(top.values())
        expect(math.isclose(tlp, best, rel_tol=0, abs_tol=1e-5),
               f"greedy token {i} ({tok!r}) logprob {tlp!r} != max of its top_logprobs {best!r} ({top!r})")
        expect(tok in top, f"greedy token {i} ({tok!r}) not a key of its top_logprobs {top!r}")
    # (''.join(tokens) need not equal the text: a token that is part of a UTF-8
    # sequence decodes alone to U+FFFD, as in vLLM.)
    offsets = lp.text_offset
    expect(offsets[0] == 0 and all(a <= b for a, b in zip(offsets, offsets[1:])),
           f"text_offset not non-decreasing from 0: {offsets!r}")


@check
def completion_n_seed(c, model):
    req = dict(model=model, prompt="Hello", max_tokens=6, temperature=1.0, n=3, seed=7)
    r = c.completions.create(**req)
    eq(len(r.choices), 3, "number of choices")
    eq(sorted(ch.index for ch in r.choices), [0, 1, 2], "choice indexes")
    texts = [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
    if all(ch.finish_reason == "length" for ch in r.choices):
        eq(r.usage.completion_tokens, 18, "usage.completion_tokens (3 choices x 6 tokens)")
    eq(len(set(texts)), 3, f"n=3 sampled texts at temperature 1.0 should differ ({texts!r})")
    r2 = c.completions.create(**req)
    texts2 = [ch.text for ch in sorted(r2.choices, key=lambda ch: ch.index)]
    eq(texts2, texts, "texts of the same seeded n=3 request repeated")


@check
def completion_stream(c, model):
    req = dict(model=model, prompt="Hello", max_tokens=7, temperature=0)
    want = c.completions.create(**req).choices[0].text
    text, finish, content_chunks = "", [], 0
    for chunk in c.completions.create(stream=True, **req):
        for ch in chunk.choices:
            eq(ch.index, 0, "streamed choice index")
            text += ch.text or ""
            content_chunks += 1
            finish.append(ch.finish_reason)
    eq(text, want, "concatenated streamed text vs non-stream text")
    expect(content_chunks > 0, "no chunks with choices")
    eq(finish[-1], "length", "finish_reason of the last chunk with a choice")
    expect(all(f is None for f in finish[:-1]), f"finish_reason set before the last chunk: {finish!r}")

    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **req))
    expect(chunks, "no chunks with include_usage")
    last = chunks[-1]
    expect(last.usage is not None, f"final chunk has no usage: {last.to_dict()!r}")
    eq(last.choices, [], "choices of the final usage chunk")
    eq(last.usage.completion_tokens, 7, "final chunk usage.completion_tokens")
    eq(last.usage.prompt_tokens, 5, "final chunk usage.prompt_tokens")
    for ch in chunks[:-1]:
        expect(ch.usage is None, f"usage on a non-final chunk: {ch.to_dict()!r}")
    text2 = "".join(ch.text or "" for chunk in chunks for ch in chunk.choices)
    eq(text2, want, "concatenated streamed text (include_usage) vs non-stream text")


CHAT_MSGS = [{"role": "user", "content": "hi"}]


@check
def chat_logprobs(c, model):
    r = c.chat.completions.create(model=model, messages=CHAT_MSGS, max_tokens=6, temperature=0,
                                  logprobs=True, top_logprobs=2)
    eq(r.object, "chat.completion", "object")
    eq(len(r.choices), 1, "number of choices")
    ch = r.choices[0]
    eq(ch.message.role, "assistant", "message.role")
    expect(ch.finish_reason in ("length", "stop"), f"finish_reason {ch.finish_reason!r}")
    expect(r.usage is not None, "usage missing")
    expect(ch.logprobs is not None and ch.logprobs.content is not None, "logprobs.content missing")
    content = ch.logprobs.content
    eq(len(content), r.usage.completion_tokens, "len(logprobs.content) vs usage.completion_tokens")
    if ch.finish_reason == "length":
        eq(r.usage.completion_tokens, 6, "usage.completion_tokens with finish_reason length")
    for i, e in enumerate(content):
        expect(isinstance(e.logprob, float) and e.logprob <= 0.0, f"content[{i}].logprob = {e.logprob!r}")
        eq(len(e.top_logprobs), 2, f"len(content[{i}].top_logprobs)")
        a, b = e.top_logprobs
        expect(a.logprob >= b.logprob,
               f"content[{i}].top_logprobs not sorted: {a.logprob!r} < {b.logprob!r}")
        # Greedy: the chosen token is the most likely one.
        expect(math.isclose(e.logprob, a.logprob, rel_tol=0, abs_tol=1e-5),
               f"content[{i}] greedy logprob {e.logprob!r} != top_logprobs[0] {a.logprob!r}")


@check
def chat_stream(c, model):
    req = dict(model=model, messages=CHAT_MSGS, max_tokens=6, temperature=0)
    want = c.chat.completions.create(**req).choices[0].message.content
    chunks = list(c.chat.completions.create(stream=True, **req))
    expect(chunks, "no chunks")
    first = chunks[0]
    expect(first.choices, f"first chunk has no choices: {first.to_dict()!r}")
    eq(first.choices[0].delta.role, "assistant", "first chunk delta.role")
    for ch in chunks:
        eq(ch.object, "chat.completion.chunk", "chunk object")
    got = "".join(ch.delta.content or "" for chunk in chunks for ch in chunk.choices)
    eq(got, want, "concatenated delta.content vs non-stream content")
    finishes = [ch.finish_reason for chunk in chunks for ch in chunk.choices if ch.finish_reason]
    eq(len(finishes), 1, f"number of chunks with a finish_reason ({finishes!r})")


@check
def errors(c, model):
    try:
        c.completions.create(model="no-such-model", prompt="Hello", max_tokens=2)
    except openai.NotFoundError as e:
        expect("no-such-model" in str(e), f"NotFoundError message does not name the model: {e}")
    except openai.APIStatusError as e:
        raise CheckError(f"wrong model: want NotFoundError (404), got {type(e).__name__} "
                         f"{e.status_code}: {e.response.text!r}")
    else:
        raise CheckError("wrong model: no error raised")

    bad = OpenAI(base_url=str(c.base_url), api_key="wrong-key", max_retries=0)
    try:
        bad.models.list()
    except openai.AuthenticationError:
        pass
    except openai.APIStatusError as e:
        raise CheckError(f"wrong api_key: want AuthenticationError (401), got {type(e).__name__} "
                         f"{e.status_code}: {e.response.text!r}")
    else:
        raise CheckError("wrong api_key: no error raised")
    try:
        bad.completions.create(model=model, prompt="Hello", max_tokens=2)
    except openai.AuthenticationError:
        pass
    else:
        raise CheckError("wrong api_key on /v1/completions: no AuthenticationError")

    try:
        c.completions.create(model=model, prompt="Hello", max_tokens=100000)
    except openai.BadRequestError:
        pass
    except openai.APIStatusError as e:
        raise CheckError(f"max_tokens=100000: want BadRequestError (400), got {type(e).__name__} "
                         f"{e.status_code}: {e.response.text!r}")
    else:
        raise CheckError("max_tokens=100000: no error raised")


@check
def extra_body_token_ids(c, model):
    r = c.completions.create(model=model, prompt="Hello", max_tokens=4, temperature=0,
                             extra_body={"return_token_ids": True})
    ch = r.choices[0]
    ids = extra(ch, "token_ids")
    expect(isinstance(ids, list), f"choices[0].token_ids missing: {ch.to_dict()!r}")
    eq(len(ids), 4, "len(choices[0].token_ids)")
    expect(all(isinstance(t, int) and 0 <= t < 259 for t in ids), f"token_ids not vocab ids: {ids!r}")
    prompt_ids = extra(ch, "prompt_token_ids")
    if prompt_ids is not None:
        eq(len(prompt_ids), 5, "len(choices[0].prompt_token_ids)")


@check
def completion_echo_stop(c, model):
    base = dict(model=model, prompt="Hello", temperature=0)
    plain = c.completions.create(max_tokens=3, **base).choices[0].text
    r = c.completions.create(max_tokens=3, echo=True, logprobs=1, **base)
    ch = r.choices[0]
    eq(ch.text, "Hello" + plain, "echo=True text (prompt + completion)")
    lp = ch.logprobs
    eq(len(lp.tokens), 5 + 3, "echo=True: len(logprobs.tokens) (5 prompt + 3 generated)")
    eq(lp.tokens[:5], list("Hello"), "echo=True: prompt tokens in logprobs.tokens")
    expect(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None,
           f"echo=True: first prompt token must have no logprob, got "
           f"{lp.token_logprobs[0]!r} / {lp.top_logprobs[0]!r}")
    eq(r.usage.prompt_tokens, 5, "echo=True: usage.prompt_tokens")
    eq(r.usage.completion_tokens, 3, "echo=True: usage.completion_tokens")

    # Stop at the first character of the greedy continuation that is a plain
    # printable ASCII char (past its first character): the output is cut there.
    full = c.completions.create(max_tokens=8, **base).choices[0].text
    stops = [i for i, ch in enumerate(full) if i > 0 and ch.isascii() and ch.isprintable()]
    if stops:
        i = stops[0]
        r = c.completions.create(max_tokens=8, stop=[full[i]], **base)
        ch = r.choices[0]
        eq(ch.text, full[:full.index(full[i])], f"text with stop={full[i]!r} (full text {full!r})")
        eq(ch.finish_reason, "stop", f"finish_reason with stop={full[i]!r}")
        eq(extra(ch, "stop_reason"), full[i], f"stop_reason with stop={full[i]!r}")
        expect(r.usage.completion_tokens < 8, f"usage.completion_tokens {r.usage.completion_tokens} not < 8")


@check
def extra_body_prompt_logprobs(c, model):
    r = c.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0,
                             extra_body={"prompt_logprobs": 1})
    pl = extra(r.choices[0], "prompt_logprobs")
    expect(isinstance(pl, list), f"choices[0].prompt_logprobs missing: {r.choices[0].to_dict()!r}")
    eq(len(pl), 5, "len(prompt_logprobs)")
    expect(pl[0] is None, f"prompt_logprobs[0] = {pl[0]!r}, want None")
    for i, d in enumerate(pl[1:], 1):
        expect(isinstance(d, dict) and 1 <= len(d) <= 2, f"prompt_logprobs[{i}] = {d!r}")
        toks = [v.get("decoded_token") for v in d.values()]
        expect("Hello"[i] in toks, f"prompt_logprobs[{i}] lacks the prompt token {'Hello'[i]!r}: {d!r}")
        for k, v in d.items():
            expect(k.isdigit(), f"prompt_logprobs[{i}] key {k!r} not a token id")
            expect(isinstance(v.get("logprob"), float) and v["logprob"] <= 0.0, f"prompt_logprobs[{i}][{k}] = {v!r}")
            expect(isinstance(v.get("rank"), int) and v["rank"] >= 1, f"prompt_logprobs[{i}][{k}] rank = {v!r}")


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=60)
    passed = failed = 0
    for fn in CHECKS:
        name = fn.__name__
        try:
            fn(client, args.model)
        except CheckError as e:
            failed += 1
            print(f"FAIL {name}: {e}", flush=True)
        except Exception as e:  # SDK/transport errors, bad shapes, ...
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
        else:
            passed += 1
            print(f"ok {name}", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
