#!/usr/bin/env bash
# SpinQuant results on one GPU, two models: the baby GPT preset (char-level) and a 6-layer, 384-wide GPT-2-BPE model
# on data/shakespeare. Trains each in full precision and with W4A4KV4 QAT (without and with --spinquant), all six
# runs at once on the one GPU, then runs demos/spinquant_compare.py on both. Writes bench/results/spinquant_*.{md,json}
# and the training logs to bench/results/spinquant_logs/ (or to $OUT when set).
#   bash bench/spinquant_gpu.sh
#   ITERS=2000 BPE_ITERS=1000 STEPS=100 bash bench/spinquant_gpu.sh
#   PHASE=train bash bench/spinquant_gpu.sh; PHASE=compare bash bench/spinquant_gpu.sh   # the same, in two parts
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
ITERS=${ITERS:-1200}          # baby GPT training steps (the preset has 5000; this benchmark runs in a few minutes)
BPE_ITERS=${BPE_ITERS:-600}   # GPT-2-BPE model steps (1.4M training tokens: more overfits)
STEPS=${STEPS:-100}           # Cayley SGD steps
PHASE=${PHASE:-all}           # train, compare (on the checkpoints a train phase left in out-sq/) or all
RESULTS=bench/results
LOGS=${OUT:-$RESULTS}/spinquant_logs
mkdir -p "$LOGS"
[ -f data/shakespeare_char/val.bin ] || python data/shakespeare_char/prepare.py
[ -f data/shakespeare/val.bin ] || python data/shakespeare/prepare.py

QAT="--linear_variant_attn=quantized_linear --linear_variant_mlp=quantized_linear --quantize_linear_bits=4
 --quantize_linear_method=affine_quant --activations_quant_method=affine_quant --activations_quant_granularity=per_token
 --quantize_attn_act_input --quantize_attn_act_pv_mult_output --quantize_mlp_act_input
 --quantize_mlp_act_activation_output --quantize_attn_act_qk_mult_k_input --quantize_attn_act_pv_mult_v_input
 --quantize_attn_act_bits=4 --quantize_mlp_act_bits=4"
BABY="--config=configs/baby_gpt.toml --device=cuda --max_iters=$ITERS --lr_decay_iters=$ITERS --eval_interval=600
 --eval_iters=20 --log_interval=100"
BPE="--dataset=shakespeare --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=32 --dropout=0.2
 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=100 --device=cuda --compile --max_iters=$BPE_ITERS
 --lr_decay_iters=$BPE_ITERS --eval_interval=300 --eval_iters=20 --log_interval=100"
pids=()
TRAIN_LIMIT=${TRAIN_LIMIT:-300}  # seconds; a run cut off by it is left out of the table (its log says so)
run() {
  local name=$1; shift
  (timeout $TRAIN_LIMIT python train.py --out_dir=out-sq/$name "$@" > "$LOGS/train_$name.log" 2>&1 \
    || { echo "train $name: stopped (exit $?)" >> "$LOGS/train_$name.log"; rm -f out-sq/$name/ckpt.pt; }) &
  pids+=($!)
}
if [ "$PHASE" != compare ]; then
date
run baby_fp $BABY
run baby_qat $BABY $QAT --quantization_warmup_iters=$((ITERS / 2))
run baby_qat_spin $BABY $QAT --quantization_warmup_iters=$((ITERS / 2)) --spinquant --spinquant_steps=$STEPS
run bpe_fp $BPE
run bpe_qat $BPE $QAT --quantization_warmup_iters=$((BPE_ITERS / 2))
run bpe_qat_spin $BPE $QAT --quantization_warmup_iters=$((BPE_ITERS / 2)) --spinquant --spinquant_steps=$STEPS
for pid in "${pids[@]}"; do wait "$pid"; done
tail -n 3 "$LOGS"/train_*.log
grep -h "spinquant rotations" "$LOGS"/train_*.log
fi
[ "$PHASE" = train ] && exit 0

date
compare() {
  local name=$1 tokens=$2 qat=""
  [ -f out-sq/${name}_qat/ckpt.pt ] && qat="QAT W4A4KV4=out-sq/${name}_qat"
  [ -f out-sq/${name}_qat_spin/ckpt.pt ] && qat="$qat,QAT W4A4KV4 + learned rotations=out-sq/${name}_qat_spin"
  python demos/spinquant_compare.py --out_dir=out-sq/${name}_fp --device=cuda --steps=$STEPS --nsamples=64 \
    --seeds=3 --eval_tokens=$tokens --progress=False --json=$RESULTS/spinquant_$name.json --qat="${qat#,}" \
    > $RESULTS/spinquant_$name.md 2> "$LOGS/compare_$name.err"
}
compare baby 100000 &
c1=$!
compare bpe 0 &
c2=$!
python demos/spinquant_ptq.py --out_dir=out-sq/bpe_fp --quantized_dir=out-sq/bpe_spinquant --device=cuda \
  --steps=$STEPS --nsamples=64 --eval_tokens=50000 --progress=False > "$LOGS/spinquant_ptq_bpe.log" 2>&1
tail -n 1 "$LOGS/spinquant_ptq_bpe.log"
wait $c1; wait $c2
date
cat $RESULTS/spinquant_baby.md $RESULTS/spinquant_bpe.md
tail -n 5 "$LOGS"/compare_*.err
python sample.py --out_dir=out-sq/bpe_spinquant --device=cuda --num_samples=1 --max_new_tokens=60 --start="ROMEO:" \
  > "$LOGS/sample_bpe_spinquant.log" 2>&1; tail -n 4 "$LOGS/sample_bpe_spinquant.log"
[ -n "${OUT:-}" ] && cp $RESULTS/spinquant_*.md $RESULTS/spinquant_*.json "$OUT"/ 2>/dev/null
exit 0
