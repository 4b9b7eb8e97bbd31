#!/usr/bin/env python3
"""Scores sampled tokens with Hugging Face transformers: the `torch` row of
`halfstep-train mismatch --torch`.

Loads the same checkpoint the server runs (a GGUF file, dequantised by transformers' own GGUF
loader, or an HF directory), casts it to the server's dtype, runs one forward per sequence on
CPU, and writes log p(token | prefix) of every token from `from` on, with the log-softmax taken
in float32 over the model's logits, as RL trainers built on transformers do.

Input JSON: {"sequences": [{"tokens": [...], "from": k}, ...]}
Output JSON: {"logprobs": [[...], ...], "torch": version, "transformers": version}

The venv: scripts/golden/setup-venv.sh (pinned torch and transformers from PyPI).
"""
import argparse
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", required=True, choices=sorted(DTYPES))
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    if args.model.endswith(".gguf"):
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(args.model)),
            gguf_file=os.path.basename(args.model),
            dtype=torch.float32,
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # Dequantised (or stored) weights rounded once to the run dtype, as the server does.
    model = model.to(dtype).eval()
    seqs = json.load(open(args.input))["sequences"]
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s["tokens"]], dtype=torch.long)
            logits = model(ids).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            k = s["from"]
            tgt = ids[0, k:]
            out.append(lp[k - 1 : len(s["tokens"]) - 1].gather(1, tgt[:, None])[:, 0].tolist())
    json.dump(
        {"logprobs": out, "torch": torch.__version__, "transformers": transformers.__version__},
        open(args.output, "w"),
    )


if __name__ == "__main__":
    main()
