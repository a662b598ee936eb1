#!/usr/bin/env bash
# Outliers (dense-and-sparse), AWQ and SmoothQuant results on one GPU, in one go (about 8 minutes on an H100):
#  - the baby GPT preset (char-level, shortened to $ITERS steps) in full precision, then RTN, GPTQ, AutoRound and
#    AWQ at W4/W3/W2, group 128 and per channel, outlier fractions 0, 0.1%, 0.5%, 1%; SmoothQuant W8A8 vs W8A8;
#  - QAT of the same model at W2 and ternary, with and without 0.5% outliers;
#  - a second model (6 layers, 384 wide) on GPT-2 BPE Shakespeare: W3 per-channel rows and SmoothQuant.
# Everything independent runs side by side on the one GPU. Tables go to $RESULTS (bench/results), logs below it.
#   bash bench/outliers_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
R=${RESULTS:-bench/results}
L=$R/outliers_logs
mkdir -p "$R" "$L"
ITERS=${ITERS:-2000}          # baby GPT full-precision steps (the preset says 5000)
QAT_ITERS=${QAT_ITERS:-2000}  # QAT steps, a quarter of them full-precision warm-up
BPE_ITERS=${BPE_ITERS:-1000}  # second model's steps (the best validation checkpoint is kept)
AR=${AR:-"--iters=100 --nsamples=64 --seqlen=256"}
COMPILE=${COMPILE:---compile}
EXTRA=${EXTRA:-}              # e.g. tiny model flags for a CPU smoke run
FRACTIONS=0,0.001,0.005,0.01
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0))s] $*"; }

python data/shakespeare_char/prepare.py > "$L/prepare.log"
python data/shakespeare/prepare.py >> "$L/prepare.log"
BABY="--config=configs/baby_gpt.toml --device=$DEVICE --eval_interval=500 --eval_iters=50 --log_interval=500 $COMPILE"
stamp "training: baby GPT, BPE model, 4 QAT runs"
python train.py $BABY --max_iters=$ITERS --lr_decay_iters=$ITERS --out_dir=out-i9-baby $EXTRA > "$L/train_baby.log" 2>&1 &
PID_BABY=$!
python train.py --dataset=shakespeare --out_dir=out-i9-bpe --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 \
    --batch_size=32 --dropout=0.2 --learning_rate=6e-4 --max_iters=$BPE_ITERS --lr_decay_iters=$BPE_ITERS \
    --min_lr=6e-5 --eval_interval=100 --eval_iters=50 --log_interval=250 --device=$DEVICE $COMPILE $EXTRA \
    > "$L/train_bpe.log" 2>&1 &
PID_BPE=$!
QAT="$BABY --max_iters=$QAT_ITERS --lr_decay_iters=$QAT_ITERS --quantization_warmup_iters=$((QAT_ITERS / 4))
     --linear_variant_attn=quantized_linear --linear_variant_mlp=quantized_linear"
QAT_RUNS=""
for run in w2:--quantize_linear_bits=2 ternary:--quantize_linear_method=ternary_quant; do
    name=${run%%:*}
    for frac in 0 0.005; do
        python train.py $QAT ${run#*:} --quantize_linear_outlier_fraction=$frac --out_dir=out-i9-qat-$name-$frac \
            $EXTRA > "$L/qat_${name}_$frac.log" 2>&1 &
        QAT_RUNS="$QAT_RUNS,out-i9-qat-$name-$frac"
    done
done

wait $PID_BABY && stamp "baby GPT trained: $(grep 'step ' "$L/train_baby.log" | tail -1)"
PTQ="--out_dir=out-i9-baby --device=$DEVICE --progress=False $AR"
GRID="$PTQ --group_sizes=128,0 --outlier_fractions=$FRACTIONS"
python demos/ptq_compare.py $GRID --bit_widths=4,3,2 --methods=rtn,awq --overwrite --json=$R/outliers_baby_rtn_awq.json \
    > "$R/outliers_baby_rtn_awq.md" 2> "$L/baby_rtn_awq.err" &
for bits in 4 3 2; do
    python demos/ptq_compare.py $GRID --bit_widths=$bits --methods=rtn,gptq --overwrite --json=$R/outliers_baby_gptq_w$bits.json \
        > "$R/outliers_baby_gptq_w$bits.md" 2> "$L/baby_gptq_w$bits.err" &
    python demos/ptq_compare.py $GRID --bit_widths=$bits --methods=rtn,autoround \
        --overwrite --json=$R/outliers_baby_autoround_w$bits.json > "$R/outliers_baby_autoround_w$bits.md" \
        2> "$L/baby_autoround_w$bits.err" &
done
python demos/ptq_compare.py $PTQ --bit_widths=3 --group_size=0 --outlier_fraction=0.005 --outlier_criterion=sensitivity \
    --methods=rtn,gptq,autoround --overwrite --json=$R/outliers_baby_sensitivity.json > "$R/outliers_baby_sensitivity.md" \
    2> "$L/baby_sensitivity.err" &
python demos/smoothquant_w8a8.py --out_dir=out-i9-baby --device=$DEVICE --alphas=0.5,0.8 \
    --overwrite --json=$R/smoothquant_baby.json > "$R/smoothquant_baby.md" 2> "$L/smoothquant_baby.err" &

wait $PID_BPE && stamp "BPE model trained: $(grep 'step ' "$L/train_bpe.log" | tail -1)"
PTQ2="--out_dir=out-i9-bpe --device=$DEVICE --progress=False $AR"
python demos/ptq_compare.py $PTQ2 --bit_widths=3 --group_sizes=0 --outlier_fractions=$FRACTIONS \
    --methods=rtn,gptq,autoround,awq --overwrite --json=$R/outliers_bpe_w3.json > "$R/outliers_bpe_w3.md" 2> "$L/bpe_w3.err" &
python demos/ptq_compare.py $PTQ2 --bit_widths=4,3 --group_sizes=128 --methods=rtn,awq \
    --overwrite --json=$R/outliers_bpe_awq_g128.json > "$R/outliers_bpe_awq_g128.md" 2> "$L/bpe_awq.err" &
python demos/ptq_compare.py $PTQ2 --bit_widths=3 --group_size=0 --outlier_fraction=0.005 --outlier_criterion=sensitivity \
    --methods=rtn,gptq --overwrite --json=$R/outliers_bpe_sensitivity.json > "$R/outliers_bpe_sensitivity.md" \
    2> "$L/bpe_sensitivity.err" &
python demos/smoothquant_w8a8.py --out_dir=out-i9-bpe --device=$DEVICE --alphas=0.5,0.8 \
    --overwrite --json=$R/smoothquant_bpe.json > "$R/smoothquant_bpe.md" 2> "$L/smoothquant_bpe.err" &
wait
stamp "PTQ and QAT done"
python demos/qat_outliers_table.py --runs=${QAT_RUNS#,} --device=$DEVICE --overwrite --json=$R/qat_outliers_baby.json \
    > "$R/qat_outliers_baby.md" 2> "$L/qat_table.err"
for f in "$R"/outliers_*.md "$R"/smoothquant_*.md "$R"/qat_outliers_baby.md; do
    echo "== $f"; grep '^|' "$f" || tail -3 "$f"
done
stamp "all done"
