#!/usr/bin/env python3
"""Writes the default model as a Hugging Face directory in float16 (config, safetensors,
tokenizer) for `transformers serve`: the GGUF dequantised by transformers' own loader and
rounded once to float16, the same weights halfstep and llama.cpp's F16 GGUF hold."""
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

src, out = sys.argv[1], sys.argv[2]
d, name = os.path.dirname(os.path.abspath(src)), os.path.basename(src)
loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
# A GGUF-loaded model refuses to serialise itself: rebuild a plain one from its config.
config = loaded.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
model.load_state_dict({k: v.to(torch.float16) for k, v in loaded.state_dict().items()})
model.save_pretrained(out)
AutoTokenizer.from_pretrained(d, gguf_file=name).save_pretrained(out)
print(f"wrote {out}")
