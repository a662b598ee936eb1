#!/usr/bin/env bash
# Low-bit inference on one GPU (about 40 minutes on an H200 for all of it; each part fits in 10 minutes): every
# kernel checked against the dequantize reference on the GPU, the packed kernels against cuBLAS bf16, then decode
# tokens/s and peak memory, bf16 against every packed format, eager and compiled, batch 1 and 16, one run per
# shape (124M, 6.7B, GPT-2 XL). Tables go to $RESULTS (default bench/results), the output of a part to
# $RESULTS/inference_<gpu>_<part>_log.txt.
#   bash bench/inference_gpu.sh            # every part, in order
#   bash bench/inference_gpu.sh kernels    # one part (or several, quoted): check, kernels, kernels_goal,
#                                          # modes_124m, decode_124m, decode_6.7b, decode_xl, profile_124m,
#                                          # repeats_124m, check_parallel, prefill_profile, peer,
#                                          # prefill, peer_large, binary_decode, choices_124m, ncu_small,
#                                          # launch, launch_large, step_budget, step_budget_decode,
#                                          # fused_tuning_decode, read_ceiling, prefill_gluon,
#                                          # prefill_gluon_all, prefill_ncu, prefill_timeline,
#                                          # prefill_ncu_peer, prefill_regs, prefill_pairs,
#                                          # prefill_pairs_table, prefill_after
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R=${RESULTS:-bench/results}
mkdir -p "$R"
PARTS=${1:-check kernels modes_124m decode_124m decode_6.7b decode_xl}

run() {  # run <seconds> <command...>: the command echoed into the log, then its output without warnings
    local limit=$1; shift
    echo "# $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" 2>&1 | grep -v -i warn | tee -a "$LOG"  # -k: a hung GPU kernel ignores SIGTERM
}

alternate_6_7b() {  # alternate_6_7b <variable> <tag>: the 6.7B decode (bf16 and W4, compiled, batch 1) with the
                   # variable 0, 1, 0, 1, one process each, into decode_<gpu>_6.7b_<tag><value>_run<n>.md
    local n value
    for n in 1 2; do for value in 0 1; do
        run 400 env "$1=$value" python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,W4 --modes=compiled \
            --batches=1 --out="$R/decode_${GPU}_6.7b_$2${value}_run$n.md"
    done; done
}

gluon_all() {  # gluon_all <tag>: the Gluon GEMM's configs checked on every format it takes (1, 2, 3, 4 and 8-bit
               # codes, zero points or one constant), then the prefill table of those formats with the launcher's list
    local formats="int3 g128,int4 g128,int8 per channel,int2 g128,ternary per tensor,1-bit per channel"
    run 240 python bench/kernels.py --check --check_kernels=gluon_mm --shapes= --gemm_shapes= --variants="$formats" \
        --out="$R/kernels_${GPU}_check_$1.md"
    run 500 python bench/kernels.py --shapes= --gemm_variants="$formats" --gemm_shapes=4096x11008,4096x4096 \
        --out="$R/kernels_${GPU}_prefill_$1.md"
}

KNOWN="check kernels kernels_goal modes_124m decode_124m decode_6.7b decode_xl profile_124m repeats_124m check_parallel prefill_profile peer prefill peer_large binary_decode choices_124m ncu_small launch launch_large step_budget step_budget_decode fused_tuning_decode read_ceiling prefill_gluon prefill_gluon_all prefill_ncu prefill_timeline prefill_ncu_peer prefill_regs prefill_pairs prefill_pairs_table prefill_after"
FORMATS=("int4 g128" "int8 per channel" "int3 g128" "int2 g128" "ternary per tensor" "1-bit per channel")
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
    kernels)  # the goal's shape first, so that a run cut short still has it
        run 290 python bench/kernels.py --out="$R/kernels_$GPU.md" --gemm_shapes=4096x11008 \
            --shapes=4096x11008,768x768,768x3072,3072x768,4096x4096,11008x4096,8192x8192 ;;
    kernels_goal)  # the goals' shapes (issue 22): the int4 kernels and tinygemm checked, one layer at batch 1 and
                   # 16 against cuBLAS and tinygemm, prefill of every packed format, residual binary at batch 1,
                   # and where the time of a small layer goes
        run 120 python bench/kernels.py --check --variants="int4 g128" --shapes= --gemm_shapes= \
            --out="$R/kernels_${GPU}_goal_check.md"
        run 240 python bench/kernels.py --variants="int4 g128" --shapes=768x3072,3072x768,4096x4096,4096x11008 \
            --batches=1,16 --gemm_shapes=4096x11008,4096x4096 --binary=4096x4096 --out="$R/kernels_${GPU}_goal.md"
        run 150 python bench/kernels.py --profile=768x3072,3072x768,768x2304,768x768 --variants="int4 g128" \
            --out="$R/kernels_profile_${GPU}_small.md" ;;
    modes_124m)  # the self-feeding CUDA graph of the step compiled one block for all layers, of the step compiled
                 # whole, and torch.compile's reduce-overhead mode; greedy tokens checked against the uncached
                 # forward first
        run 240 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 \
            --modes=compiled,compiled_whole,reduce_overhead --batches=1,16 --check \
            --out="$R/decode_${GPU}_124m_modes.md" ;;
    decode_124m)  # every format, compiled and eager, batch 1 and 16; then q/k/v apart at batch 1
        run 300 python bench/decode.py --shapes=gpt2_124m --modes=compiled,eager --batches=1,16 \
            --out="$R/decode_${GPU}_124m.md"
        run 60 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 --modes=compiled --batches=1 \
            --qkv=separate --out="$R/decode_${GPU}_124m_qkv_apart.md" ;;
    decode_6.7b)  # every format, compiled and eager, batch 1 and 16, the goals' rows (compiled, batch 1) first
        run 590 python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,W4,W8,W2,ternary,W1 --modes=compiled,eager \
            --batches=1,16 --out="$R/decode_${GPU}_6.7b.md" ;;
    profile_124m)  # where a compiled decode step's GPU time goes (torch.profiler), bf16 and W4
        run 120 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 --modes=compiled --batches=1 \
            --new_tokens=64 --profile=40 --out="$R/decode_${GPU}_124m_profile.md" ;;
    repeats_124m)  # bf16 at batch 1, the compiled modes side by side, in two more runs: the spread near the goal
        for i in 1 2; do
            run 120 python bench/decode.py --shapes=gpt2_124m --formats=bf16 \
                --modes=compiled_whole,compiled,reduce_overhead --batches=1 --out="$R/decode_${GPU}_124m_repeat$i.md"
        done ;;
    check|check_parallel)  # every config of every kernel, on odd shapes, one process per format and kernel, all at
                           # once (their kernels compile in parallel: every format in one process did not finish in
                           # 420 s on an H100, nor int3's alone in 280 s), a table and a log each in
                           # $R/kernels_check_<gpu>/
        D="$R/kernels_check_$GPU"
        mkdir -p "$D"
        pids=()
        KERNELS=$(python -c "import sys; sys.path.insert(0, 'bench'); import kernels; print(*kernels.KERNEL_NAMES)")
        for v in "${FORMATS[@]}"; do for k in $KERNELS; do
            f=${v// /_}_$k
            (timeout -k 10 280 python bench/kernels.py --check --variants="$v" --check_kernels="$k" --shapes= \
                --gemm_shapes= --out="$D/kernels_${GPU}_check_$f.md" > "$D/check_${GPU}_$f.log" 2>&1
             echo "$v, $k: exit $? (124: stopped by the time limit)" | tee -a "$LOG") & pids+=($!)
        done; done
        for pid in "${pids[@]}"; do wait "$pid"; done
        grep -H "check:\|FAIL" "$D"/check_"${GPU}"_*.log | tee -a "$LOG" ;;
    prefill_profile)  # every prefill candidate (GEMM configs, dequantize then cuBLAS) timed at 256 rows, int4
        run 280 python bench/kernels.py --profile=4096x4096,4096x11008 --profile_rows=256 --variants="int4 g128" \
            --out="$R/kernels_profile_${GPU}_prefill.md" ;;
    peer)  # issue 22's table: int4 at batch 1 and 16 on the 124M and 6.7B layers against cuBLAS and tinygemm,
           # prefill of every packed format, then the 124M decode against bf16 and tinygemm
        run 270 python bench/kernels.py --variants="int4 g128" --batches=1,16 \
            --shapes=768x3072,3072x768,768x2304,768x768,4096x4096,4096x11008 --gemm_shapes=4096x4096,4096x11008 \
            --out="$R/kernels_${GPU}_peer.md"
        run 170 python bench/decode.py --shapes=gpt2_124m --formats=bf16,tinygemm,W4 --modes=compiled \
            --batches=1,16 --check --out="$R/decode_${GPU}_124m_peer.md" ;;
    prefill)  # prefill (256 rows) of every packed format against cuBLAS, and where the int4 4096x4096 time goes
        run 150 python bench/kernels.py --shapes= --gemm_shapes=4096x4096,4096x11008 --out="$R/kernels_${GPU}_prefill.md"
        run 100 python bench/kernels.py --profile=4096x4096 --profile_rows=256 --variants="int4 g128" \
            --out="$R/kernels_profile_${GPU}_prefill.md" ;;
    peer_large)  # issue 22's decode rows on the larger shapes: GPT-2 XL and 6.7B, W4 against bf16 and tinygemm
        run 280 python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,tinygemm,W4 --modes=compiled \
            --batches=1,16 --out="$R/decode_${GPU}_6.7b_peer.md"
        run 280 python bench/decode.py --shapes=gpt2_xl --formats=bf16,tinygemm,W4 --modes=compiled \
            --batches=1,16 --out="$R/decode_${GPU}_xl_peer.md" ;;
    binary_decode)  # residual binary (k = 2) decoding through its Triton kernels, against bf16 and 1-bit, batch 1;
                    # then its GEMV and many-rows path against each other and the bit operations
        run 280 python bench/decode.py --shapes=gpt2_124m,gpt2_6.7b --formats=bf16,W1,RB2 --modes=compiled \
            --batches=1 --out="$R/decode_${GPU}_binary.md"
        run 100 python bench/residual_binary_check.py ;;
    ncu_small)  # Nsight Compute on one cold call of the one-row kernel (the launcher's config) and of tinygemm,
                # GPT-2's four layer shapes (ncu must be on PATH)
        for sc in 768x3072:32,32,0,8,0 768x2304:32,32,0,8,0 768x768:8,32,0,8,0 3072x768:8,128,0,16,0; do
            for kernel in _stream_gemv_kernel tinygemm; do
                run 120 ncu --kernel-name "regex:$kernel" --launch-skip 3 --launch-count 1 --section SpeedOfLight \
                    --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
                    --section MemoryWorkloadAnalysis python bench/ncu_one_row.py --shape="${sc%%:*}" --config="${sc#*:}"
            done
        done ;;
    choices_124m)  # the launcher's choices file: the same W4 decode twice with a new file, the warm-up column of
                   # the second run read from it (tokens/s should not move)
        F=$(mktemp -d)/kernel_choices.json
        for i in 1 2; do
            NANOQAT_KERNEL_CACHE=$F run 200 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4,RB2 \
                --modes=compiled --batches=1 --out="$R/decode_${GPU}_124m_choices$i.md"
        done ;;
    launch)  # the GELU in the up projection's kernel and programmatic dependent launch (PDL), against bf16 and
             # tinygemm: the 124M decode with the GELU fused and apart (checked first), then without our kernels'
             # PDL (NANOQAT_PDL=0) and without any (TORCHINDUCTOR_ENABLE_PDL=0 too)
        run 280 python bench/decode.py --shapes=gpt2_124m --formats=bf16,tinygemm,W4 --modes=compiled --batches=1,16 \
            --check --gelu=fused,separate --out="$R/decode_${GPU}_124m_launch.md"
        NANOQAT_PDL=0 run 100 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 --modes=compiled \
            --batches=1,16 --out="$R/decode_${GPU}_124m_launch_no_kernel_pdl.md"
        NANOQAT_PDL=0 TORCHINDUCTOR_ENABLE_PDL=0 run 100 python bench/decode.py --shapes=gpt2_124m --formats=bf16,W4 \
            --modes=compiled --batches=1,16 --out="$R/decode_${GPU}_124m_launch_no_pdl.md" ;;
    launch_large)  # as launch, on the 6.7B shape and GPT-2 XL, with every switch on
        run 250 python bench/decode.py --shapes=gpt2_6.7b --formats=bf16,tinygemm,W4 --modes=compiled --batches=1,16 \
            --out="$R/decode_${GPU}_6.7b_launch.md"
        run 220 python bench/decode.py --shapes=gpt2_xl --formats=bf16,tinygemm,W4 --modes=compiled --batches=1,16 \
            --out="$R/decode_${GPU}_xl_launch.md" ;;
    step_budget)  # where a 6.7B step's time goes (docs/kernels.md): the stack of its one-row layers as they are,
                  # and with the model's LayerNorms and residual adds in the layers, their statistics before the
                  # loop (default) or in the epilogue (NANOQAT_NORM_STATS=0)
        C=qkv:32x32x2x8x1,out:32x32x0x8x1x1,up:32x32x2x8x1,down:32x32x2x8x1
        run 150 python bench/pdl_timeline.py --modes=none --configs=$C --json="$R/step_budget_${GPU}_plain.json"
        NANOQAT_NORM_STATS=0 run 120 python bench/pdl_timeline.py --modes=none --fused --configs=$C \
            --json="$R/step_budget_${GPU}_fused.json"
        run 120 python bench/pdl_timeline.py --modes=none --fused --configs=$C \
            --json="$R/step_budget_${GPU}_fused_stats.json" ;;
    step_budget_decode)  # the 6.7B decode with the statistics in the epilogue and before the loop, alternating
                         # (the first process tunes the kernels on a fresh machine: 2-4 minutes)
        alternate_6_7b NANOQAT_NORM_STATS stats ;;
    fused_tuning_decode)  # the 6.7B decode with its fused layers (LayerNorm in q/k/v and up, residual in out and
                          # down) on the plain kernel's config (NANOQAT_FUSED_TUNING=0) and tuned as they run,
                          # alternating (the first two processes tune; 6 minutes in all on a fresh H100)
        alternate_6_7b NANOQAT_FUSED_TUNING fused_tuning ;;
    read_ceiling)  # how fast the bytes of a 6.7B layer can be read at all: flat Triton reads (1, 2, 4 blocks in
                   # flight, with and without evict_first) against PyTorch's own float32 sum over the same bytes
        run 60 python bench/gemv_layout_probe.py --shapes=4096x16384,4096x4096 --layouts= --unroll=1,2,4 \
            > "$R/read_ceiling_$GPU.md" ;;
    prefill_gluon)  # the Gluon prefill GEMM (quantization/kernels/gluon_gemm.py): every int4 kernel and config
                    # checked (it runs on the 512x384 layer), then it and its diagnostic (products left out)
                    # against cuBLAS and the launcher's choice, 256 rows
        run 300 python bench/kernels.py --check --variants="int4 g128" --shapes= --gemm_shapes= \
            --out="$R/kernels_${GPU}_check_int4.md"
        run 240 python bench/prefill_ws_probe.py --variants=gluon,gluon_nomma \
            > "$R/prefill_gluon_$GPU.md" ;;
    prefill_gluon_all)  # the Gluon prefill GEMM on every format it takes, checked, then their prefill table
        gluon_all gluon_all ;;
    prefill_pairs)  # the TAIL 2 config with MATH 0 (float32, twice), 1 (bfloat16x2 pairs; listed as MATH 3, the
                    # same with groups of scales) and 2 (bf16 scales), int4 g128, 256 rows; then every candidate's
                    # time at 256 rows on 4096x11008 and 4096x4096 for int4, int2 and 1-bit, MATH 0's twins offered
        c=256x64x64x8x5x4x2x3x2
        run 150 python bench/prefill_ws_probe.py --shapes=4096x11008,4096x12288,4096x4096 --variants=gluon \
            --no_project --configs=$c,${c}x1,${c}x2,$c,${c}x1
        run 300 python bench/kernels.py --profile=4096x11008,4096x4096 --profile_rows=256 \
            --variants="int4 g128,int2 g128,1-bit per channel" --gluon_configs=$c,128x64x64x4x8x4x3x3 \
            --out="$R/kernels_profile_${GPU}_pairs.md" ;;
    prefill_pairs_table)  # the launcher's prefill table of every format (the listed configs), checked first
        run 240 python bench/kernels.py --check --check_kernels=gluon_mm --shapes= --gemm_shapes= \
            --variants="int3 g128,int4 g128,int8 per channel,int2 g128,ternary per tensor,1-bit per channel" \
            --out="$R/kernels_${GPU}_check_pairs.md"
        run 400 python bench/kernels.py --shapes= --gemm_shapes=4096x11008,4096x12288,4096x4096 \
            --gemm_variants="int3 g128,int4 g128,int8 per channel,int2 g128,ternary per tensor,1-bit per channel" \
            --out="$R/kernels_${GPU}_prefill_pairs.md" ;;
    prefill_after)  # MATH 3 (one row of scales: c - z dequantized, the scale after the products) against MATH 1
                    # side by side: every candidate's time at 256 rows for the per-channel and per-tensor formats,
                    # MATH 1's twins of the listed configs offered
        run 300 python bench/kernels.py --profile=4096x11008,4096x4096 --profile_rows=256 \
            --variants="int8 per channel,1-bit per channel,ternary per tensor,int8 affine per channel" \
            --gluon_configs=256x64x64x8x5x4x2x3x2x1,128x64x64x4x8x4x3x3x0x1 \
            --out="$R/kernels_profile_${GPU}_after.md" ;;
    prefill_ncu)  # Nsight Compute on one call of the Gluon GEMM (the first config, int4 g128, 256 rows, 4096x4096):
                  # every section, then the warp stall samples of each SASS instruction (ncu must be on PATH)
        run 150 ncu --kernel-name regex:_gluon_mm_kernel --launch-count 1 --set full -o "$R/prefill_ncu_$GPU" -f \
            python bench/prefill_ws_probe.py --variants=gluon --no_project --configs=128x64x64x4x8x4x3x1 \
            --shapes=4096x4096
        run 60 ncu -i "$R/prefill_ncu_$GPU.ncu-rep" --page details
        ncu -i "$R/prefill_ncu_$GPU.ncu-rep" --page source --csv --print-source sass > "$R/prefill_ncu_${GPU}_sass.csv" ;;
    prefill_timeline)  # when each program of the Gluon GEMM runs, per round on a multiprocessor (int4 g128, 256 rows):
                       # the listed tile, two wider ones and the TAIL config (the last wave split in K), on
                       # 4096x4096, 4096x8448 (132 tiles of 128 x 128) and 4096x11008 (--timeline of
                       # bench/prefill_ws_probe.py)
        run 400 python bench/prefill_ws_probe.py --variants=gluon --no_project --timeline \
            --configs=128x64x64x4x8x4x3x3,128x128x64x8x6x4x2x1,256x64x64x8x5x4x2x3,256x64x64x8x5x4x2x3x1 \
            --shapes=4096x4096,4096x8448,4096x11008 ;;
    prefill_ncu_peer)  # Nsight Compute on one call each of the Gluon GEMM (its first config) and cuBLAS bf16 on
                       # 4096x11008, 256 rows: every section of each, then chosen metrics side by side
        probe="python bench/prefill_ws_probe.py --variants=gluon --no_project --configs=128x64x64x4x8x4x3x3"
        run 150 ncu --kernel-name regex:_gluon_mm_kernel --launch-count 1 --set full -o "$R/ncu_peer_ours_$GPU" -f \
            $probe --shapes=4096x11008
        run 150 ncu --kernel-name regex:"nvjet|bf16" --launch-count 1 --set full -o "$R/ncu_peer_cublas_$GPU" -f \
            $probe --shapes=4096x11008
        for k in ours cublas; do
            run 60 ncu -i "$R/ncu_peer_${k}_$GPU.ncu-rep" --page details
            ncu -i "$R/ncu_peer_${k}_$GPU.ncu-rep" --page raw --csv > "$R/ncu_peer_${k}_${GPU}_raw.csv"
        done
        run 30 python bench/ncu_side_by_side.py "$R/ncu_peer_ours_${GPU}_raw.csv" "$R/ncu_peer_cublas_${GPU}_raw.csv" \
            --names="ours (Gluon int4 g128),cuBLAS bf16" ;;
    prefill_regs)  # the Gluon GEMM's REG_A configs (dequantized into wgmma's registers): known weights' patterns,
                   # int4 g128 beside the TAIL config with each program's timeline, then every format checked and the
                   # prefill table with the launcher's list (which has the one-warp-group REG_A config)
        run 60 python bench/gluon_pattern_probe.py --configs=256x64x64x4x6x0x0x3x1,128x64x64x4x8x0x0x3
        run 300 python bench/prefill_ws_probe.py --variants=gluon --no_project --timeline \
            --configs=256x64x64x8x5x4x2x3x1,256x64x64x4x6x0x0x3x1,256x64x64x8x6x0x0x3x1,128x64x64x4x8x0x0x3 \
            --shapes=4096x11008,4096x4096
        gluon_all regs ;;
    decode_xl)  # every format, compiled and eager, batch 1 and 16
        run 590 python bench/decode.py --shapes=gpt2_xl --modes=compiled,eager --batches=1,16 \
            --out="$R/decode_${GPU}_xl.md" ;;
    esac
done
