#!/usr/bin/env python3
"""Make golden reference data for the default model (SmolLM2-135M-Instruct GGUF).

Loads models/SmolLM2-135M-Instruct.Q4_1.gguf with Hugging Face transformers
(which dequantizes every tensor to float32), runs it on CPU in float32 and
writes tests/golden/smollm2-135m-instruct.json: tokenizations, top-20 logits
per position, greedy continuations, the rendered chat template and the config.

Run with the venv made by scripts/golden/setup-venv.sh:
    .venv-golden/bin/python scripts/golden/make_golden.py
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = REPO_ROOT / "models" / GGUF_NAME
DEFAULT_OUT = REPO_ROOT / "tests" / "golden" / "smollm2-135m-instruct.json"

TOP_K = 20
GREEDY_TOKENS = 16

PROMPTS = [
    # plain English
    "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village,",
    # code-like text with punctuation
    'def add(a, b):\n    """Return a + b."""\n    return a + b\n\nprint(add(2, 3))  #',
    # accented / non-ASCII
    "Le café est naïve à Tokyo (東京), où l'été est chaud — n'est-ce pas?",
    # spaces / newlines / tabs
    "Line one\n\nLine  two   with   spaces\n\tindented\n   trailing   \nThe end",
    # instruction-ish, with digits
    "Question: What is 12 times 34? Answer: The result of 12 * 34 is",
]

CHAT_MESSAGES = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
]

DIGITS_TEXT = "12345 + 678 = 13023"

CONFIG_KEYS = [
    "architectures", "model_type", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "vocab_size",
    "tie_word_embeddings", "max_position_embeddings", "hidden_act",
    "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


def gguf_metadata(path: Path) -> dict:
    r = gguf.GGUFReader(str(path))
    out = {}
    for k, f in r.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                 "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            out[k + ".len"] = len(f.data)
            continue
        out[k] = to_jsonable(f.contents())
    return out


def smollm_reference_tokenizer(path: Path):
    """A `tokenizers` BPE built from the GGUF vocab/merges with the pre-tokenizer
    of llama.cpp's "smollm" pre type / the original HF tokenizer.json:
    split every digit individually, then GPT-2 byte-level regex."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    r = gguf.GGUFReader(str(path))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents()
    ttype = r.fields["tokenizer.ggml.token_type"].contents()
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(ttype) if t == 3])
    return tok


def topk_pairs(logits: torch.Tensor, k: int = TOP_K) -> list:
    """logits: [seq, vocab] float32 -> per position list of [id, logit]."""
    vals, idx = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
    return [[[int(i), float(v)] for i, v in zip(ri.tolist(), rv.tolist())]
            for ri, rv in zip(idx, vals)]


@torch.no_grad()
def forward_logits(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=x, attention_mask=torch.ones_like(x))
    return out.logits[0].float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    model_path: Path = args.model.resolve()
    if not model_path.is_file():
        print(f"model not found: {model_path}\nrun scripts/fetch-default-model.sh first",
              file=sys.stderr)
        return 1

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    d, name = str(model_path.parent), model_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    model.to("cpu")
    assert next(model.parameters()).dtype == torch.float32

    meta = gguf_metadata(model_path)
    ref_tok = smollm_reference_tokenizer(model_path)

    cfg = model.config.to_dict()
    result = {
        "model": {
            "file": name,
            "sha256": sha256_file(model_path),
            "size": model_path.stat().st_size,
        },
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": md.version("gguf"),
        "tokenizers_version": md.version("tokenizers"),
        "numpy_version": np.__version__,
        "dtype": "float32",
        "device": "cpu",
        "top_k": TOP_K,
        "notes": (
            "ids: tokenizer(text, add_special_tokens=False). top20[p]: the 20 largest "
            "logits [token_id, logit] predicting the token after position p, from one "
            "forward over the prompt. greedy: model.generate(do_sample=False, "
            f"max_new_tokens={GREEDY_TOKENS}) on the prompt ids; it stops early after "
            "emitting eos_token_id 2 (<|im_end|>), so greedy may be shorter. greedy_top20[p]: same "
            "as top20 but from one forward over prompt ids + greedy ids (all positions). "
            "ids_smollm_pre: reference tokenization with llama.cpp's 'smollm' "
            "pre-tokenizer (individual digits + GPT-2 byte-level regex), built with the "
            "tokenizers library from the GGUF vocab/merges."
        ),
        "config": {k: to_jsonable(cfg[k]) for k in CONFIG_KEYS if k in cfg},
        "generation_config": to_jsonable(model.generation_config.to_diff_dict()),
        "gguf_metadata": {k: v for k, v in meta.items() if k != "tokenizer.chat_template"},
    }

    prompts = []
    for text in PROMPTS:
        ids = tok(text, add_special_tokens=False).input_ids
        ids_special = tok(text).input_ids
        ref_ids = ref_tok.encode(text, add_special_tokens=False).ids
        assert 8 <= len(ids) <= 40, (text, len(ids))
        logits = forward_logits(model, ids)

        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            gen = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                max_new_tokens=GREEDY_TOKENS, min_new_tokens=0,
                num_beams=1, temperature=None, top_p=None, top_k=None,
                repetition_penalty=1.0, pad_token_id=tok.pad_token_id,
            )
        greedy = gen[0, len(ids):].tolist()
        full = ids + greedy
        full_logits = forward_logits(model, full)
        # Consistency: argmax of the full forward must reproduce the greedy ids.
        am = full_logits[len(ids) - 1: len(full) - 1].argmax(-1).tolist()
        if am != greedy:
            print(f"warning: argmax of full forward {am} != generate {greedy}", file=sys.stderr)
        max_diff = float((full_logits[: len(ids)] - logits).abs().max())

        prompts.append({
            "text": text,
            "ids": ids,
            "ids_with_special": ids_special,
            "tokens": tok.convert_ids_to_tokens(ids),
            "ids_smollm_pre": ref_ids,
            "ids_match_smollm_pre": ref_ids == ids,
            "decoded": tok.decode(ids),
            "top20": topk_pairs(logits),
            "greedy": greedy,
            "greedy_text": tok.decode(greedy),
            "greedy_matches_full_forward_argmax": am == greedy,
            "greedy_top20": topk_pairs(full_logits),
            "prompt_logits_max_abs_diff_vs_full_forward": max_diff,
        })
    result["prompts"] = prompts

    rendered = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    chat_ids = tok(rendered, add_special_tokens=False).input_ids
    special = []
    for tid, at in sorted(tok.added_tokens_decoder.items()):
        special.append({"id": int(tid), "content": at.content, "special": bool(at.special)})
    result["chat"] = {
        "messages": CHAT_MESSAGES,
        "add_generation_prompt": True,
        "rendered": rendered,
        "ids": chat_ids,
        "ids_smollm_pre": ref_tok.encode(rendered, add_special_tokens=False).ids,
        "injects_default_system_prompt": rendered.startswith("<|im_start|>system"),
        "chat_template": tok.chat_template,
        "gguf_chat_template": meta.get("tokenizer.chat_template"),
    }
    result["tokenizer"] = {
        "class": type(tok).__name__,
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
        "all_special_tokens": [[t, tok.convert_tokens_to_ids(t)] for t in tok.all_special_tokens],
        "added_tokens": special,
        "len": len(tok),
        "backend_pre_tokenizer": json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer")
        if hasattr(tok, "backend_tokenizer") else None,
        "gguf_tokenizer_ggml_model": meta.get("tokenizer.ggml.model"),
        "gguf_tokenizer_ggml_pre": meta.get("tokenizer.ggml.pre"),
        "gguf_add_bos_token": meta.get("tokenizer.ggml.add_bos_token"),
    }

    d_ids = tok(DIGITS_TEXT, add_special_tokens=False).input_ids
    d_toks = tok.convert_ids_to_tokens(d_ids)
    ref_d = ref_tok.encode(DIGITS_TEXT, add_special_tokens=False)
    result["digits"] = {
        "text": DIGITS_TEXT,
        "ids": d_ids,
        "tokens": d_toks,
        "split_individually": all(sum(c.isdigit() for c in t) <= 1 for t in d_toks),
        "ids_smollm_pre": ref_d.ids,
        "tokens_smollm_pre": ref_d.tokens,
        "gguf_tokenizer_ggml_pre": meta.get("tokenizer.ggml.pre"),
        "gguf_tokenizer_ggml_model": meta.get("tokenizer.ggml.model"),
    }

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
