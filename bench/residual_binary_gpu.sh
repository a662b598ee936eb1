#!/usr/bin/env bash
# Residual binary weights on one GPU, in one run: the Triton bitwise GEMV against cuBLAS bf16 at batch 1
# (4096x4096), the bitwise PyTorch path against the dequantized matmul on the host CPU (1 thread), then QAT of
# full precision, binary, residual binary (k=2), ternary and 2-bit affine on the baby GPT preset (compiled) and on
# the default CPU model (2000 steps, float32), all ten runs at once. Writes bench/results/residual_binary_*.
#   bash bench/residual_binary_gpu.sh                 # baby GPT at its preset's 5000 steps
#   BABY_ITERS=1000 bash bench/residual_binary_gpu.sh # fewer steps
set -euo pipefail
cd "$(dirname "$0")/.."
BABY_ITERS=${BABY_ITERS:-5000}
R=bench/results
[ -f data/shakespeare_char/val.bin ] || python data/shakespeare_char/prepare.py
python bench/residual_binary_kernels.py --device=cuda --terms 1 2 | tee $R/residual_binary_kernels_gpu.md
python bench/residual_binary_kernels.py --device=cpu --terms 1 2 --threads=1 | tee $R/residual_binary_kernels_cpu.md
python demos/residual_binary.py --config=configs/baby_gpt.toml --device=cuda --out_root=out-rb-baby \
    --overwrite --json=$R/residual_binary_baby_gpt.json -- --max_iters=$BABY_ITERS --lr_decay_iters=$BABY_ITERS \
    --eval_interval=$BABY_ITERS --eval_iters=100 --log_interval=100 > $R/residual_binary_baby_gpt.md 2>&1 &
BABY=$!
python demos/residual_binary.py --config=configs/cpu_char.toml --device=cuda --out_root=out-rb-cpu \
    --overwrite --json=$R/residual_binary_cpu_model.json -- --dtype=float32 > $R/residual_binary_cpu_model.md 2>&1 &
CPU=$!
wait $CPU; cat $R/residual_binary_cpu_model.md
wait $BABY; cat $R/residual_binary_baby_gpt.md
