#!/usr/bin/env bash
# SpinQuant results on one GPU, three models: the baby GPT preset (char-level), a 6-layer, 384-wide GPT-2-BPE model
# on data/shakespeare, and the default model of `python train.py` (4 layers, 128 wide, char-level, 1500 iterations,
# float32 as on a CPU). Trains each in full precision and with W4A4KV4 QAT (without and with --spinquant) on
# SEEDS training seeds, all at once on the one GPU, then runs demos/spinquant_compare.py on every model and seed
# (all SETTINGS on the first seed, W4A4KV4 on the others). Writes bench/results/spinquant_gpu_{baby,bpe,cpu}_s*.{md,json}
# and the logs to bench/results/spinquant_logs/gpu/.
#   bash bench/spinquant_gpu.sh
#   ITERS=2000 BPE_ITERS=1000 STEPS=100 SEEDS="0 1 2" bash bench/spinquant_gpu.sh
#   PHASE=train bash bench/spinquant_gpu.sh; PHASE=compare bash bench/spinquant_gpu.sh   # the same, in two parts
#   MODELS=bpe VARIANTS=0 bash bench/spinquant_gpu.sh     # one model only
#   PHASE=sites MODELS=bpe bash bench/spinquant_gpu.sh      # after a train phase: where the W4A4KV4 gap sits
# With the candidates learned from the identity (on by default) the compare phase of the BPE model alone took 6.7
# min on an H200: in calls of 10 minutes, compare MODELS=bpe and MODELS="baby cpu" apart (same out-sq/, warm machine).
# bench/results/spinquant_gpu_fixed/ (the BPE model, W4A4KV4 only, with the fixed Hadamard candidates):
#   PHASE=train MODELS=bpe VARIANTS=0 FP_ONLY=1 bash bench/spinquant_gpu.sh                        # 1 min
#   TABLE=_fixed PHASE=compare MODELS=bpe VARIANTS=0 SETTINGS=4/4/4 COMPARE_FLAGS=--heldout_tokens=65536 \
#     bash bench/spinquant_gpu.sh                                                                  # 6.6 min
# bench/results/spinquant_gpu_s4/ (with S4, the GELU output's scale, among the candidates), in calls of 10 minutes:
#   PHASE=train MODELS="baby bpe cpu" VARIANTS=0 FP_ONLY=1 bash bench/spinquant_gpu.sh
#   TABLE=_s4 PHASE=compare MODELS=bpe SEEDS=1337 VARIANTS=0 SETTINGS=4/4/4 COMPARE_FLAGS=--heldout_tokens=65536 \
#     bash bench/spinquant_gpu.sh                                          # then SEEDS=1, and MODELS="baby cpu"
# bench/results/spinquant_gpu_s12/ (S1 and S2 too, three more candidates): after the train phase above, one weight
# method per compare (--methods), both at once on the one GPU, without the demo (DEMO=0): 6 minutes together
#   for m in rtn gptq; do TABLE=_s12_$m PHASE=compare MODELS=bpe SEEDS="1337 1" VARIANTS=0 SETTINGS=4/4/4 DEMO=0 \
#     COMPARE_FLAGS="--heldout_tokens=65536 --methods=$m" bash bench/spinquant_gpu.sh & done; wait
# The --spinquant runs probe kept rotations over a third of QAT (train.py's default --spinquant_probe); PROBE=0
# decides at the switch only, PROBE=N probes over N% of the QAT iterations.
# EXTRA=--deterministic asks train.py for deterministic kernels: a run that keeps no rotation then equals plain QAT
# (on an H200 without it the pair ended 0.01 apart); QAT runs at about half the tokens/s.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
ITERS=${ITERS:-1200}          # baby GPT training steps (the preset has 5000; this benchmark runs in a few minutes)
BPE_ITERS=${BPE_ITERS:-600}   # GPT-2-BPE model steps (1.4M training tokens: more overfits)
CPU_ITERS=${CPU_ITERS:-1500}  # the default model's steps
STEPS=${STEPS:-100}           # Cayley SGD steps
SEEDS=${SEEDS:-"1337 1"}      # training seeds (1337: train.py's default)
VARIANTS=${VARIANTS:-1}       # 1: also --spinquant with the rotations kept whatever the choice, both bases, first seed
SETTINGS=${SETTINGS:-4/4/4,4/8/8,4/16/16}
DEVICE=${DEVICE:-cuda}        # cpu: a smoke test of this script (with tiny ITERS, STEPS and EXTRA="--compile=False")
EXTRA=${EXTRA:-}              # more train.py flags for every run
PROBE=${PROBE:-}              # --spinquant runs: --spinquant_probe over this percentage of QAT (empty: train.py's)
PHASE=${PHASE:-all}           # train, compare (on the checkpoints a train phase left in out-sq/), sites, or all
MODELS=${MODELS:-"baby bpe cpu"}  # which of the three models to train and compare
FP_ONLY=${FP_ONLY:-0}         # 1: the train phase trains the full-precision models alone (for PTQ tables, no QAT rows)
QAT_ONLY=${QAT_ONLY:-0}       # 1: compare scores the QAT rows alone (--settings=none), into spinquant_gpu_qat_*
COMPARE_FLAGS=${COMPARE_FLAGS:-}  # more demos/spinquant_compare.py flags for the compare phase (e.g. --heldout_tokens=65536)
TABLE=${TABLE:-}              # a suffix for the compare phase's table names (spinquant_gpu${TABLE}_bpe_s1337.md)
DEMO=${DEMO:-1}               # 0: the compare phase leaves out demos/spinquant_ptq.py on the BPE model
RESULTS=bench/results
LOGS=$RESULTS/spinquant_logs/gpu  # apart from bench/spinquant_cpu.sh's logs of the same names
TRAIN_LOGS=out-sq/logs            # training logs live with the checkpoints (a compare phase finds both) ...
mkdir -p "$LOGS" "$TRAIN_LOGS"
for d in shakespeare_char shakespeare; do  # a corpus is ready when its bins and meta.json are
  [ -f data/$d/val.bin ] && [ -f data/$d/train.bin ] && [ -f data/$d/meta.json ] || python data/$d/prepare.py
done

QAT="--linear_variant_attn=quantized_linear --linear_variant_mlp=quantized_linear --quantize_linear_bits=4
 --quantize_linear_method=affine_quant --activations_quant_method=affine_quant --activations_quant_granularity=per_token
 --quantize_attn_act_input --quantize_attn_act_pv_mult_output --quantize_mlp_act_input
 --quantize_mlp_act_activation_output --quantize_attn_act_qk_mult_k_input --quantize_attn_act_pv_mult_v_input
 --quantize_attn_act_bits=4 --quantize_mlp_act_bits=4"
BABY="--config=configs/baby_gpt.toml --device=$DEVICE --max_iters=$ITERS --lr_decay_iters=$ITERS --eval_interval=600
 --eval_iters=20 --log_interval=100"
BPE="--dataset=shakespeare --n_layer=6 --n_head=6 --n_embd=384 --block_size=256 --batch_size=32 --dropout=0.2
 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=100 --device=$DEVICE --compile --max_iters=$BPE_ITERS
 --lr_decay_iters=$BPE_ITERS --eval_interval=300 --eval_iters=20 --log_interval=100"
CPU="--device=$DEVICE --dtype=float32 --max_iters=$CPU_ITERS --log_interval=100"
pids=()
TRAIN_LIMIT=${TRAIN_LIMIT:-300}  # seconds; a run cut off by it is left out of the table (its log says so)
run() {  # name flags...; QAT_SETTINGS: Python assignments to quantization/spin_quant_qat.py's settings (module s)
  local name=$1; shift
  case " $MODELS " in *" ${name%%_*} "*) ;; *) return 0 ;; esac  # a model not in MODELS
  [ "$FP_ONLY" = 1 ] && [[ $name != *_fp_s* ]] && return 0  # FP_ONLY=1: the full-precision models alone
  (timeout $TRAIN_LIMIT python -c "import sys; import quantization.spin_quant_qat as s; ${QAT_SETTINGS:-} import train; train.main(sys.argv[1:])" \
    --out_dir=out-sq/$name "$@" $EXTRA > "$TRAIN_LOGS/train_$name.log" 2>&1 \
    || { echo "train $name: stopped (exit $?)" >> "$TRAIN_LOGS/train_$name.log"; rm -f out-sq/$name/ckpt.pt; }) &
  pids+=($!)
}
if [ "$PHASE" != compare ] && [ "$PHASE" != sites ]; then
date
for s in $SEEDS; do
  run baby_fp_s$s $BABY --seed=$s
  run baby_qat_s$s $BABY $QAT --seed=$s --quantization_warmup_iters=$((ITERS / 2))
  run baby_qat_spin_s$s $BABY $QAT --seed=$s --quantization_warmup_iters=$((ITERS / 2)) --spinquant --spinquant_steps=$STEPS \
    ${PROBE:+--spinquant_probe=$((ITERS / 2 * PROBE / 100))}
  run bpe_fp_s$s $BPE --seed=$s
  run bpe_qat_s$s $BPE $QAT --seed=$s --quantization_warmup_iters=$((BPE_ITERS / 2))
  run bpe_qat_spin_s$s $BPE $QAT --seed=$s --quantization_warmup_iters=$((BPE_ITERS / 2)) --spinquant --spinquant_steps=$STEPS \
    ${PROBE:+--spinquant_probe=$((BPE_ITERS / 2 * PROBE / 100))}
  run cpu_fp_s$s $CPU --seed=$s
  run cpu_qat_s$s $CPU $QAT --seed=$s --quantization_warmup_iters=$((CPU_ITERS / 2))
  run cpu_qat_spin_s$s $CPU $QAT --seed=$s --quantization_warmup_iters=$((CPU_ITERS / 2)) --spinquant --spinquant_steps=$STEPS \
    ${PROBE:+--spinquant_probe=$((CPU_ITERS / 2 * PROBE / 100))}
done
s=${SEEDS%% *}
if [ "$VARIANTS" = 1 ]; then  # --spinquant with the rotations kept whatever the held-out choice (QAT_SELECT off, no probe):
  for v in "forced:s.QAT_SELECT = False;" "forced_rotated:s.QAT_SELECT = False; s.QAT_BASIS = 'rotated';"; do
    QAT_SETTINGS=${v#*:}  # ... in the original basis (the default) and in the rotated one
    run baby_qat_spin_${v%%:*}_s$s $BABY $QAT --seed=$s --quantization_warmup_iters=$((ITERS / 2)) --spinquant \
      --spinquant_steps=$STEPS --spinquant_probe=0
    run bpe_qat_spin_${v%%:*}_s$s $BPE $QAT --seed=$s --quantization_warmup_iters=$((BPE_ITERS / 2)) --spinquant \
      --spinquant_steps=$STEPS --spinquant_probe=0
    run cpu_qat_spin_${v%%:*}_s$s $CPU $QAT --seed=$s --quantization_warmup_iters=$((CPU_ITERS / 2)) --spinquant \
      --spinquant_steps=$STEPS --spinquant_probe=0
  done
  QAT_SETTINGS=
fi
for pid in "${pids[@]}"; do wait "$pid"; done
date
grep -H "step $ITERS:\|step $BPE_ITERS:\|step $CPU_ITERS:\|stopped" "$TRAIN_LOGS"/train_*_s*.log
grep -H "spinquant rotations" "$TRAIN_LOGS"/train_*_s*.log
fi
cp "$TRAIN_LOGS"/train_*.log "$LOGS"/ 2>/dev/null  # ... and are copied beside the tables by every phase
[ "$PHASE" = train ] && exit 0

date
compare() {
  local name=$1 seed=$2 tokens=$3 settings=$4 qat=""
  [ -f out-sq/${name}_qat_s$seed/ckpt.pt ] && qat="QAT W4A4KV4=out-sq/${name}_qat_s$seed"
  [ -f out-sq/${name}_qat_spin_s$seed/ckpt.pt ] && qat="$qat,QAT W4A4KV4 + rotations=out-sq/${name}_qat_spin_s$seed"
  for v in forced forced_rotated; do
    [ -f out-sq/${name}_qat_spin_${v}_s$seed/ckpt.pt ] && qat="$qat,QAT W4A4KV4 + rotations ($v)=out-sq/${name}_qat_spin_${v}_s$seed"
  done
  [ -f out-sq/${name}_fp_s$seed/ckpt.pt ] || return 0
  python demos/spinquant_compare.py --out_dir=out-sq/${name}_fp_s$seed --device=$DEVICE --steps=$STEPS --nsamples=64 \
    --seeds=3 --eval_tokens=$tokens --settings=$settings --progress=False $COMPARE_FLAGS \
    --overwrite --json=$RESULTS/spinquant_gpu${TABLE}_${name}_s$seed.json --qat="${qat#,}" \
    > $RESULTS/spinquant_gpu${TABLE}_${name}_s$seed.md 2> "$LOGS/compare${TABLE}_${name}_s$seed.err"
}
first=${SEEDS%% *}
if [ "$PHASE" = sites ]; then  # where each full-precision model's W4A4KV4 gap sits, site by site (--sites)
  for s in $SEEDS; do
    for m in $MODELS; do
      tokens=100000; [ "$m" = bpe ] && tokens=0
      [ -f out-sq/${m}_fp_s$s/ckpt.pt ] || continue
      python demos/spinquant_compare.py --out_dir=out-sq/${m}_fp_s$s --device=$DEVICE --eval_tokens=$tokens \
        --settings=4/4/4 --sites --progress=False --overwrite --json=$RESULTS/spinquant_gpu_sites_${m}_s$s.json \
        > $RESULTS/spinquant_gpu_sites_${m}_s$s.md 2> "$LOGS/sites_${m}_s$s.err" &
    done
  done
  wait; cat $RESULTS/spinquant_gpu_sites_*_s*.md; exit 0
fi
[ "$QAT_ONLY" = 1 ] && TABLE=_qat$TABLE
cpids=()
for s in $SEEDS; do
  settings=4/4/4; [ "$s" = "$first" ] && settings=$SETTINGS; [ "$QAT_ONLY" = 1 ] && settings=none
  for m in $MODELS; do
    tokens=100000; [ "$m" = bpe ] && tokens=0
    compare $m $s $tokens $settings & cpids+=($!)
  done
done
case " $MODELS " in *" bpe "*) BPE_DEMO=$DEMO ;; *) BPE_DEMO=0 ;; esac
[ "$QAT_ONLY" = 1 ] || [ "$BPE_DEMO" = 0 ] || python demos/spinquant_ptq.py --out_dir=out-sq/bpe_fp_s$first --quantized_dir=out-sq/bpe_spinquant --overwrite \
  --device=$DEVICE --steps=$STEPS --nsamples=64 --eval_tokens=50000 --progress=False > "$LOGS/spinquant_ptq_bpe.log" 2>&1
[ "$QAT_ONLY" = 1 ] || [ "$BPE_DEMO" = 0 ] || tail -n 1 "$LOGS/spinquant_ptq_bpe.log"
for pid in "${cpids[@]}"; do wait "$pid"; done
date
cat $RESULTS/spinquant_gpu${TABLE}_*_s*.md
tail -n 5 "$LOGS"/compare_*.err
[ "$QAT_ONLY" = 1 ] || [ "$BPE_DEMO" = 0 ] && exit 0
python sample.py --out_dir=out-sq/bpe_spinquant --device=$DEVICE --num_samples=1 --max_new_tokens=60 --start="ROMEO:" \
  > "$LOGS/sample_bpe_spinquant.log" 2>&1; tail -n 4 "$LOGS/sample_bpe_spinquant.log"
exit 0
