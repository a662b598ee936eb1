#!/usr/bin/env bash
# PTQ results on one GPU: train the baby GPT preset (char-level Shakespeare), then compare full precision,
# RTN, GPTQ and AutoRound at W4, W3 and W2 (group 32). Writes the table to bench/results/ptq_baby_gpt.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python data/shakespeare_char/prepare.py
python train.py --config=configs/baby_gpt.toml --device=cuda --eval_interval=1000 --log_interval=500
python demos/ptq_compare.py --out_dir=out-baby-gpt --device=cuda --iters=200 --nsamples=128 --seqlen=256 \
    --group_size=32 --progress=False --json=bench/results/ptq_baby_gpt.json | tee bench/results/ptq_baby_gpt.md
