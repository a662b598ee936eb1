#!/usr/bin/env bash
# Low-bit inference on one GPU, in one go (about 8 minutes on an H100): the packed kernels against cuBLAS bf16
# (every kernel first checked against the dequantize reference on the GPU), then decode tokens/s and peak memory
# for the 124M and 6.7B shapes, bf16 against the packed formats. Tables go to $RESULTS (default bench/results).
#   bash bench/inference_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${RESULTS:-bench/results}
mkdir -p "$R"
GPU=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
timeout 200 python bench/kernels.py --check --out="$R/kernels_$GPU.md"
# the goals: 6.7B at batch 1, compiled, every format; then 124M eager and compiled at batch 1 and 16
timeout 260 python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,W8,W4,W2,ternary,W1 --modes=compiled \
    --batches=1 --out="$R/decode_${GPU}_6.7b.md"
timeout 150 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 --modes=eager,compiled --batches=1,16 \
    --check --out="$R/decode_${GPU}_124m.md"
