#!/usr/bin/env bash
# SpinQuant on the default CPU model (`python train.py`, 4 layers, 128 wide, char-level, 1500 iterations): what a new
# user trains first. Phases (PHASE=...):
#   fp        train it in full precision, seeds 0 and 1 (out-sq/cpu_fp_s{0,1})
#   qat       QAT W4A4KV4 from iteration 750: one run to 750, then the variants resume from a copy of it
#             (no rotation; --spinquant with a fresh AdamW as before; fresh AdamW + lr warm-up; AdamW state carried;
#             carried + warm-up (the default); carried + warm-up + no weight decay on gain-absorbing matrices)
#   qatseeds  the default --spinquant and plain QAT on training seed 1 (from iteration 0)
#   compare   demos/spinquant_compare.py on both seeds (W4A4KV4), and the issue's reproduction command
# Logs: bench/results/spinquant_logs/; tables: bench/results/spinquant_cpu*.md
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-1}
LOGS=bench/results/spinquant_logs
mkdir -p "$LOGS"
[ -f data/shakespeare_char/val.bin ] || python data/shakespeare_char/prepare.py
PHASE=${PHASE:-all}
QAT="--linear_variant_attn=quantized_linear --linear_variant_mlp=quantized_linear --quantize_linear_bits=4
 --quantize_linear_method=affine_quant --activations_quant_method=affine_quant --activations_quant_granularity=per_token
 --quantize_attn_act_input --quantize_attn_act_pv_mult_output --quantize_mlp_act_input
 --quantize_mlp_act_activation_output --quantize_attn_act_qk_mult_k_input --quantize_attn_act_pv_mult_v_input
 --quantize_attn_act_bits=4 --quantize_mlp_act_bits=4 --quantization_warmup_iters=750"
# train.py with quantization/spin_quant.py's QAT settings set first: variant CARRY REWARM DECAY out_dir flags...
variant() {
  local carry=$1 rewarm=$2 decay=$3; shift 3
  python -c "import sys; import quantization.spin_quant as s; s.QAT_CARRY_MOMENTS, s.QAT_REWARM, s.QAT_DECAY_FOLDED = $carry, $rewarm, $decay
import train; train.main(sys.argv[1:])" "$@"
}
if [ "$PHASE" = fp ] || [ "$PHASE" = all ]; then
  for seed in 0 1; do
    [ -f out-sq/cpu_fp_s$seed/ckpt.pt ] || python train.py --max_iters=1500 --seed=$seed --out_dir=out-sq/cpu_fp_s$seed \
      > $LOGS/train_cpu_fp_s$seed.log 2>&1 &
  done
  wait
fi
if [ "$PHASE" = qat ] || [ "$PHASE" = all ]; then
  python train.py --max_iters=750 --seed=0 --out_dir=out-sq/cpu_qatbase_s0 $QAT > $LOGS/train_cpu_qatbase_s0.log 2>&1
  run() {  # name carry rewarm decay [--spinquant]
    local name=$1; shift
    rm -rf out-sq/$name; cp -r out-sq/cpu_qatbase_s0 out-sq/$name
    variant "$@" --init_from=resume --out_dir=out-sq/$name --max_iters=1500 $QAT > $LOGS/train_$name.log 2>&1
  }
  run cpu_qat_s0 True True True &
  run cpu_spin_fresh_s0 False False True --spinquant
  wait
  run cpu_spin_fresh_rewarm_s0 False True True --spinquant &
  run cpu_spin_carry_s0 True False True --spinquant
  wait
  run cpu_spin_s0 True True True --spinquant &
  run cpu_spin_carry_rewarm_nodecay_s0 True True False --spinquant
  wait
  grep -h "step 1500\|spinquant rotations" $LOGS/train_cpu_qat*_s0.log $LOGS/train_cpu_spin*_s0.log
fi
if [ "$PHASE" = qatseeds ] || [ "$PHASE" = all ]; then
  python train.py --max_iters=1500 --seed=1 --out_dir=out-sq/cpu_qat_s1 $QAT > $LOGS/train_cpu_qat_s1.log 2>&1 &
  python train.py --max_iters=1500 --seed=1 --out_dir=out-sq/cpu_spin_s1 $QAT --spinquant > $LOGS/train_cpu_spin_s1.log 2>&1
  wait
fi
if [ "$PHASE" = compare ] || [ "$PHASE" = all ]; then
  for seed in 0 1; do
    python demos/spinquant_compare.py --out_dir=out-sq/cpu_fp_s$seed --device=cpu --steps=${STEPS:-100} --nsamples=128 \
      --seeds=3 --settings=4/4/4 --progress=False --json=bench/results/spinquant_cpu_s$seed.json \
      --qat="QAT W4A4KV4=out-sq/cpu_qat_s$seed,QAT W4A4KV4 + rotations=out-sq/cpu_spin_s$seed" \
      > bench/results/spinquant_cpu_s$seed.md 2> $LOGS/compare_cpu_s$seed.err &
  done
  wait
  python demos/spinquant_ptq.py --out_dir=out-sq/cpu_fp_s0 --quantized_dir=out-sq/cpu_spinquant --bits=4 --act_bits=4 \
    --steps=40 --nsamples=32 --device=cpu --progress=False > $LOGS/spinquant_ptq_cpu.log 2>&1
  tail -n 12 $LOGS/spinquant_ptq_cpu.log
fi
