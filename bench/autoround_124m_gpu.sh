#!/usr/bin/env bash
# AutoRound wall time on a GPT-2 124M-shaped model (12 layers, 12 heads, 768 wide, block 1024): a briefly trained
# checkpoint on BPE Shakespeare, then AutoRound W4 group 128, 200 iterations per block, 128 samples of 1024 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
python data/shakespeare/prepare.py
python train.py --config=configs/gpt2_124m.toml --dataset=shakespeare --out_dir=out-124m --device=cuda \
    --gradient_accumulation_steps=1 --batch_size=8 --max_iters=300 --lr_decay_iters=300 --warmup_iters=30 \
    --eval_interval=300 --eval_iters=5 --log_interval=100 --compile=False --overwrite
python demos/autoround_ptq.py --out_dir=out-124m --bits=4 --group_size=128 --iters=200 --nsamples=128 --seqlen=1024 \
    --batch_size=8 --device=cuda --eval_tokens=131072 --progress=False --overwrite | tee bench/results/autoround_124m.txt
