#!/usr/bin/env bash
# From a fresh clone: install, prepare the shipped Shakespeare corpus, train a small ternary-weight GPT on the CPU
# (full precision for 500 steps, then QAT), and sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python data/shakespeare_char/prepare.py
python train.py --linear_variant_attn=quantized_linear --linear_variant_mlp=quantized_linear \
    --quantize_linear_method=ternary_quant --quantization_warmup_iters=500 --out_dir=out --overwrite
python sample.py --out_dir=out --start="ROMEO." --num_samples=2 --max_new_tokens=200
