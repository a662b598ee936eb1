#!/usr/bin/env bash
# Low-bit inference on one GPU, in one go (about 8 minutes on an H100): the packed kernels against cuBLAS bf16
# (every kernel first checked against the dequantize reference on the GPU), then decode tokens/s and peak memory
# for the 124M and 6.7B shapes, bf16 against the packed formats. Tables go to $RESULTS (default bench/results).
#   bash bench/inference_gpu.sh            # all of it; `kernels` or `decode` as the argument runs one part
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${RESULTS:-bench/results}
mkdir -p "$R"
GPU=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
PART=${1:-all}
if [ "$PART" != decode ]; then
# the goal's shape first: the whole list takes longer than the limit when every shape's configs are timed
timeout 280 python bench/kernels.py --check --out="$R/kernels_$GPU.md" \
    --shapes=4096x11008,768x768,768x3072,3072x768,4096x4096,11008x4096,8192x8192
fi
[ "$PART" = kernels ] && exit 0
# the goals: 6.7B at batch 1, compiled, every format; then 124M eager and compiled at batch 1 and 16
timeout 260 python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,W8,W4,W2,ternary,W1 --modes=compiled \
    --batches=1 --out="$R/decode_${GPU}_6.7b.md"
timeout 150 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 --modes=eager,compiled --batches=1,16 \
    --check --out="$R/decode_${GPU}_124m.md"
