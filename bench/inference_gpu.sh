#!/usr/bin/env bash
# Low-bit inference on one GPU (about 30 minutes on an H200 for all of it; each part fits in 10 minutes): every
# kernel checked against the dequantize reference on the GPU, the packed kernels against cuBLAS bf16, then decode
# tokens/s and peak memory, bf16 against the packed formats, for the 6.7B, 124M and GPT-2 XL shapes. Tables go to
# $RESULTS (default bench/results), the output of a part to $RESULTS/inference_<gpu>_<part>_log.txt.
#   bash bench/inference_gpu.sh            # every part, in order
#   bash bench/inference_gpu.sh kernels    # one part (or several, quoted): check, kernels, modes_124m,
#                                          # decode_6.7b, decode_124m, profile_124m, decode_xl
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${RESULTS:-bench/results}
mkdir -p "$R"
PARTS=${1:-check kernels modes_124m decode_6.7b decode_124m decode_xl}

run() {  # run <seconds> <command...>: the command echoed into the log, then its output without warnings
    local limit=$1; shift
    echo "# $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | grep -v -i warn | tee -a "$LOG"
}

KNOWN="check kernels modes_124m decode_6.7b decode_124m profile_124m decode_xl"
for PART in $PARTS; do  # every part known before any runs (or leaves a log)
    case " $KNOWN " in *" $PART "*) ;; *)
        echo "inference_gpu.sh: error: part '$PART' is unknown; expected one of: $KNOWN" >&2; exit 2 ;; esac
done
GPU=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())" 2>/dev/null) ||
    { echo "inference_gpu.sh: error: needs a CUDA GPU that torch can see" >&2; exit 2; }

for PART in $PARTS; do
    LOG="$R/inference_${GPU}_${PART}_log.txt"
    : > "$LOG"
    case $PART in
    check)  # every config of every kernel, on odd shapes
        run 300 python bench/kernels.py --check --shapes= --gemm_shapes= --out="$R/kernels_${GPU}_check.md" ;;
    kernels)  # the goal's shape first, so that a run cut short still has it
        run 290 python bench/kernels.py --out="$R/kernels_$GPU.md" --gemm_shapes=4096x11008 \
            --shapes=4096x11008,768x768,768x3072,3072x768,4096x4096,11008x4096,8192x8192 ;;
    decode_6.7b)  # the goals: batch 1, compiled, every format (a 6.7B row takes 30-50 s of warm-up); then batch 16
        run 400 python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,W4,W8,W2,ternary,W1 --modes=compiled \
            --batches=1 --out="$R/decode_${GPU}_6.7b.md"
        run 180 python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,W4 --modes=compiled --batches=16 \
            --out="$R/decode_${GPU}_6.7b_batch16.md" ;;
    modes_124m)  # the compiled step as one self-feeding CUDA graph against torch.compile's reduce-overhead mode,
                 # greedy tokens checked against the uncached forward first
        run 200 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 --modes=compiled,reduce_overhead \
            --batches=1,16 --check --out="$R/decode_${GPU}_124m_modes.md" ;;
    decode_124m)  # every format, eager and compiled, batch 1 and 16; then q/k/v apart at batch 1
        run 320 python bench/decode.py --shapes=gpt2_124m --modes=compiled,eager --batches=1,16 \
            --out="$R/decode_${GPU}_124m.md"
        run 60 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 --modes=compiled --batches=1 \
            --qkv=separate --out="$R/decode_${GPU}_124m_qkv_apart.md" ;;
    profile_124m)  # where a compiled decode step's GPU time goes (torch.profiler), bf16 and W4
        run 120 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 --modes=compiled --batches=1 \
            --new_tokens=64 --profile=40 --out="$R/decode_${GPU}_124m_profile.md" ;;
    decode_xl)  # compiled, batch 1 (eager GPT-2 XL rows would take minutes each)
        run 540 python bench/decode.py --shapes=gpt2_xl --modes=compiled --batches=1 \
            --out="$R/decode_${GPU}_xl.md" ;;
    esac
done
