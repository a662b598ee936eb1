#!/usr/bin/env bash
# PTQ results on one GPU: train the baby GPT preset (char-level Shakespeare), then compare full precision,
# RTN, GPTQ and AutoRound at W4, W3 and W2. Writes bench/results/ptq_baby_gpt_g<GROUP_SIZE>.{md,json}.
#   bash bench/ptq_gpu.sh            # group 32
#   GROUP_SIZE=128 bash bench/ptq_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GROUP_SIZE=${GROUP_SIZE:-32}
python data/shakespeare_char/prepare.py
[ -f out-baby-gpt/ckpt.pt ] || python train.py --config=configs/baby_gpt.toml --device=cuda --eval_interval=1000 --log_interval=500
python demos/ptq_compare.py --out_dir=out-baby-gpt --device=cuda --iters=200 --nsamples=128 --seqlen=256 \
    --group_size=$GROUP_SIZE --progress=False --overwrite --json=bench/results/ptq_baby_gpt_g$GROUP_SIZE.json \
    | tee bench/results/ptq_baby_gpt_g$GROUP_SIZE.md
