#!/usr/bin/env bash
# Low-bit inference on one GPU, in one go (about 12 minutes on an H200): every kernel checked against the dequantize
# reference on the GPU, the packed kernels against cuBLAS bf16, then decode tokens/s and peak memory for the 6.7B and
# 124M shapes, bf16 against the packed formats. Tables go to $RESULTS (default bench/results), the whole output to
# $RESULTS/inference_<gpu>_log.txt (one part alone: inference_<gpu>_<part>_log.txt).
#   bash bench/inference_gpu.sh            # all of it; `kernels` or `decode` as the argument runs one part
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${RESULTS:-bench/results}
mkdir -p "$R"
GPU=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
PART=${1:-all}
if [ "$PART" = all ]; then LOG="$R/inference_${GPU}_log.txt"; else LOG="$R/inference_${GPU}_${PART}_log.txt"; fi
: > "$LOG"
if [ "$PART" != decode ]; then
# the goal's shape first, so that a run cut short still has it
timeout 180 python bench/kernels.py --check --shapes= --gemm_shapes= \
    --out="$R/kernels_${GPU}_check.md" 2>&1 | grep -v -i warn | tee -a "$LOG"
timeout 180 python bench/kernels.py --out="$R/kernels_$GPU.md" --gemm_shapes=4096x11008 \
    --shapes=4096x11008,768x768,768x3072,3072x768,4096x4096,11008x4096,8192x8192 2>&1 | grep -v -i warn | tee -a "$LOG"
fi
[ "$PART" = kernels ] && exit 0
# the goals: 6.7B at batch 1, compiled, every format (two runs, each with bf16 beside it: a 6.7B row takes 40-50 s
# of warm-up); then 124M eager and compiled at batch 1 and 16
timeout 230 python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,W4,ternary --modes=compiled \
    --batches=1 --out="$R/decode_${GPU}_6.7b.md" 2>&1 | grep -v -i warn | tee -a "$LOG"
timeout 230 python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,W2,W1,W8 --modes=compiled \
    --batches=1 --out="$R/decode_${GPU}_6.7b_w2_w1_w8.md" 2>&1 | grep -v -i warn | tee -a "$LOG"
timeout 100 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 --modes=compiled,eager --batches=1,16 \
    --out="$R/decode_${GPU}_124m.md" 2>&1 | grep -v -i warn | tee -a "$LOG"
