#!/usr/bin/env bash
# SpinQuant on the default CPU model (`python train.py`, 4 layers, 128 wide, char-level; 1500 iterations): what a new
# user trains first. Phases (PHASE=..., SEED=...):
#   fp        train it in full precision: `python train.py --max_iters=1500 --seed=$SEED` (out-sq/cpu_fp_s$SEED)
#   qat       QAT W4A4KV4 switched on at iteration 750: one run to 750 (out-sq/cpu_qatbase_s$SEED), then each variant
#             resumes a copy of it to 1500: plain QAT; --spinquant (weights trained in their own basis, the default);
#             --spinquant with the weights trained in the rotated basis (QAT_BASIS = "rotated", a fresh AdamW); both
#             again with the rotations kept whatever the held-out choice (QAT_SELECT = False: "forced"); with
#             VARIANTS=1 also, in the rotated basis: AdamW state carried + lr warm-up; fresh AdamW + lr warm-up; state
#             carried without warm-up; carried + warm-up + no weight decay on the gain-absorbing matrices; with
#             VARIANTS=learn, forced and in the original basis, R1/R2 trained on with the weights at 1x and 10x the lr
#             (QAT_LEARN_ROTATIONS)
#   compare   demos/spinquant_compare.py (W4A4KV4) on out-sq/cpu_fp_s$SEED with its QAT runs
#   study     what learning needs (demos/spinquant_compare.py --study) on out-sq/cpu_fp_s$SEED, GPTQ and RTN
#   sites     where the W4A4KV4 gap sits (demos/spinquant_compare.py --sites) on out-sq/cpu_fp_s$SEED (SITES="cpu
#             baby_cpu bpe_cpu": also on the baby and bpe phases' models)
#   baby      no GPU: the baby GPT preset trained 300 iterations on the CPU, then the W4A4KV4 PTQ table
#   bpe       no GPU: a GPT-2-BPE model of 4 layers, 128 wide (block 128) trained 1000 iterations on data/shakespeare
#             on the CPU (out-sq/bpe_cpu_fp_s$SEED), then the W4A4KV4 PTQ table
#   demo      the issue's command: demos/spinquant_ptq.py --bits=4 --act_bits=4 --steps=40 --nsamples=32
#   probe     train.py --spinquant_probe=$PROBE_ITERS (250) with the rotations kept at the switch whatever the
#             held-out choice (QAT_SELECT = False), to 1500, beside plain QAT from the same run to 750
# Logs: bench/results/spinquant_logs/; tables: bench/results/spinquant_cpu_*.md
#   PHASE=fp SEED=1337 bash bench/spinquant_cpu.sh; PHASE=qat SEED=0 VARIANTS=1 bash bench/spinquant_cpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-1}
LOGS=bench/results/spinquant_logs
mkdir -p "$LOGS"
[ -f data/shakespeare_char/val.bin ] || python data/shakespeare_char/prepare.py
PHASE=${PHASE:-all}
SEED=${SEED:-1337}
VARIANTS=${VARIANTS:-0}
STEPS=${STEPS:-100}
S=$SEED
QAT="--linear_variant_attn=quantized_linear --linear_variant_mlp=quantized_linear --quantize_linear_bits=4
 --quantize_linear_method=affine_quant --activations_quant_method=affine_quant --activations_quant_granularity=per_token
 --quantize_attn_act_input --quantize_attn_act_pv_mult_output --quantize_mlp_act_input
 --quantize_mlp_act_activation_output --quantize_attn_act_qk_mult_k_input --quantize_attn_act_pv_mult_v_input
 --quantize_attn_act_bits=4 --quantize_mlp_act_bits=4 --quantization_warmup_iters=750"
# train.py with quantization/spin_quant_qat.py's QAT settings set first: variant "ASSIGNMENTS" flags... (Python, on
# the module as s: "s.QAT_BASIS = 'rotated'"; "" keeps the defaults)
variant() {
  local settings=$1; shift
  python -c "import sys; import quantization.spin_quant_qat as s; $settings
import train; train.main(sys.argv[1:])" "$@"
}
if [ "$PHASE" = fp ] || [ "$PHASE" = all ]; then
  python train.py --max_iters=1500 --seed=$S --out_dir=out-sq/cpu_fp_s$S > $LOGS/train_cpu_fp_s$S.log 2>&1
fi
B=cpu_qatbase  # the run to the switch (iteration 750) that every QAT variant resumes a copy of
base() {
  [ -f out-sq/${B}_s$S/ckpt.pt ] || python train.py --max_iters=750 --seed=$S --out_dir=out-sq/${B}_s$S \
    $QAT > $LOGS/train_${B}_s$S.log 2>&1
}
run() {  # name "settings" [--spinquant ...]: decides at the switch only (--spinquant_probe=0) unless the flags say
  local name=$1 settings=$2; shift 2
  rm -rf out-sq/$name; cp -r out-sq/${B}_s$S out-sq/$name
  variant "$settings" --spinquant_probe=0 "$@" --init_from=resume --out_dir=out-sq/$name --max_iters=1500 \
    --spinquant_steps=$STEPS $QAT > $LOGS/train_$name.log 2>&1
}
if [ "$PHASE" = qat ] || [ "$PHASE" = all ]; then
  base
  R="s.QAT_BASIS = 'rotated';"  # the weights trained in the rotated basis, then (carry, rewarm, decay) settings
  [ -f out-sq/cpu_qat_s$S/ckpt.pt ] || run cpu_qat_s$S "" &
  run cpu_spin_s$S "" --spinquant  # the defaults: trained in the original basis, the rotations in the forward pass
  wait
  run cpu_spin_rotated_s$S "$R" --spinquant  # rotated basis, a fresh AdamW, no warm-up
  F="s.QAT_SELECT = False;"  # the rotations kept whatever the held-out choice: what rotated QAT itself reaches
  run cpu_spin_forced_s$S "$F" --spinquant &
  run cpu_spin_forced_rotated_s$S "$F $R" --spinquant
  wait
  if [ "$VARIANTS" = 1 ]; then
    run cpu_spin_carry_rewarm_s$S "$R s.QAT_CARRY_MOMENTS, s.QAT_REWARM = True, True" --spinquant &
    run cpu_spin_fresh_rewarm_s$S "$R s.QAT_REWARM = True" --spinquant
    wait
    run cpu_spin_carry_s$S "$R s.QAT_CARRY_MOMENTS = True" --spinquant &
    run cpu_spin_carry_rewarm_nodecay_s$S "$R s.QAT_CARRY_MOMENTS, s.QAT_REWARM, s.QAT_DECAY_FOLDED = True, True, False" \
      --spinquant
    wait
  fi
  if [ "$VARIANTS" = learn ]; then  # R1/R2 trained on with the weights after the switch (QAT_LEARN_ROTATIONS), forced
    run cpu_spin_learn1_s$S "$F s.QAT_LEARN_ROTATIONS = 1.0" --spinquant &
    run cpu_spin_learn10_s$S "$F s.QAT_LEARN_ROTATIONS = 10.0" --spinquant
    wait
  fi
  grep -H "step 1500\|spinquant rotations" $LOGS/train_cpu_qat_s$S.log $LOGS/train_cpu_spin*_s$S.log
fi
if [ "$PHASE" = probe ]; then  # --spinquant_probe on the rotations forced at the switch, against plain QAT
  B=cpu_qatbase_probe  # its own base and plain run: the qat phase's logs may come from another machine
  base
  run cpu_qat_probeplain_s$S "" &
  run cpu_spin_forced_probe_s$S "s.QAT_SELECT = False;" --spinquant --spinquant_probe=${PROBE_ITERS:-250}
  wait
  { echo "# --spinquant_probe=${PROBE_ITERS:-250} on the default CPU model, seed $S (rotations forced at the switch)"
    echo; echo "PHASE=probe SEED=$S bash bench/spinquant_cpu.sh"; echo; echo '```'
    grep -H "spinquant\|step 1500" $LOGS/train_cpu_spin_forced_probe_s$S.log $LOGS/train_cpu_qat_probeplain_s$S.log \
      | sed "s|$LOGS/||"
    echo '```'; } > bench/results/spinquant_cpu_probe_s$S.md
  cat bench/results/spinquant_cpu_probe_s$S.md
fi
if [ "$PHASE" = compare ] || [ "$PHASE" = all ]; then
  qat=""  # the QAT runs a qat phase left (none: the PTQ rows alone)
  [ -f out-sq/cpu_qat_s$S/ckpt.pt ] && qat="QAT W4A4KV4=out-sq/cpu_qat_s$S"
  [ -f out-sq/cpu_spin_s$S/ckpt.pt ] && qat="$qat,QAT W4A4KV4 + rotations=out-sq/cpu_spin_s$S"
  for v in rotated forced forced_rotated carry_rewarm fresh_rewarm carry carry_rewarm_nodecay learn1 learn10; do
    [ -f out-sq/cpu_spin_${v}_s$S/ckpt.pt ] && qat="$qat,QAT W4A4KV4 + rotations ($v)=out-sq/cpu_spin_${v}_s$S"
  done
  qat=${qat#,}
  python demos/spinquant_compare.py --out_dir=out-sq/cpu_fp_s$S --device=cpu --steps=$STEPS --nsamples=128 \
    --seeds=3 --settings=${SETTINGS:-4/4/4} --eval_tokens=100000 --progress=False \
    --overwrite --json=bench/results/spinquant_cpu${TABLE:-}_s$S.json --qat="$qat" > bench/results/spinquant_cpu${TABLE:-}_s$S.md \
    2> $LOGS/compare_cpu${TABLE:-}_s$S.err
fi
if [ "$PHASE" = study ]; then
  for method in ${METHODS:-gptq rtn}; do
    python demos/spinquant_compare.py --out_dir=out-sq/cpu_fp_s$S --device=cpu --method=$method --eval_tokens=100000 \
      --settings=4/4/4 --progress=False --overwrite --json=bench/results/spinquant_cpu_study${TABLE:-}_${method}_s$S.json \
      --study=${STUDY:-1.5:40:32:none,1.5:40:32:rtn,1.5:100:128:none,1.5:100:128:rtn,0.5:100:128:rtn,0.1:100:128:rtn,1.5:100:512:rtn,1.5:300:512:rtn} \
      > bench/results/spinquant_cpu_study${TABLE:-}_${method}_s$S.md 2> $LOGS/study${TABLE:-}_${method}_s$S.err
  done
fi
if [ "$PHASE" = sites ]; then  # where the W4A4KV4 gap sits, site by site, without and with random Hadamard rotations
  for name in ${SITES:-cpu}; do  # cpu: the default model; baby_cpu, bpe_cpu: the baby and bpe phases' (50,000 tokens)
    tokens=100000; [ "$name" != cpu ] && tokens=50000; tokens=${TOKENS:-$tokens}  # validation tokens per score
    python demos/spinquant_compare.py --out_dir=out-sq/${name}_fp_s$S --device=cpu --eval_tokens=$tokens \
      --settings=4/4/4 --sites --progress=False --overwrite --json=bench/results/spinquant_${name}_sites_s$S.json \
      > bench/results/spinquant_${name}_sites_s$S.md 2> $LOGS/sites_${name}_s$S.err
  done
fi
if [ "$PHASE" = baby ]; then  # no GPU: the baby GPT preset, 300 iterations of 16 sequences, PTQ at W4A4KV4 only
  [ -f out-sq/baby_cpu_fp_s$S/ckpt.pt ] || python train.py --config=configs/baby_gpt.toml --device=cpu \
    --compile=False --max_iters=300 --lr_decay_iters=300 --batch_size=16 --eval_iters=10 --eval_interval=300 \
    --log_interval=20 --seed=$S --out_dir=out-sq/baby_cpu_fp_s$S > $LOGS/train_baby_cpu_fp_s$S.log 2>&1
  python demos/spinquant_compare.py --out_dir=out-sq/baby_cpu_fp_s$S --device=cpu --steps=$STEPS --nsamples=64 \
    --seeds=2 --settings=4/4/4 --eval_tokens=50000 --progress=False --overwrite --json=bench/results/spinquant_baby_cpu_s$S.json \
    > bench/results/spinquant_baby_cpu_s$S.md 2> $LOGS/compare_baby_cpu_s$S.err
fi
if [ "$PHASE" = bpe ]; then  # no GPU: a small GPT-2-BPE model, 1000 iterations on the CPU, the W4A4KV4 PTQ table
  [ -f data/shakespeare/val.bin ] || python data/shakespeare/prepare.py
  [ -f out-sq/bpe_cpu_fp_s$S/ckpt.pt ] || python train.py --dataset=shakespeare --n_layer=4 --n_head=4 --n_embd=128 \
    --block_size=128 --batch_size=16 --dropout=0.1 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=100 \
    --max_iters=1000 --lr_decay_iters=1000 --eval_iters=10 --eval_interval=1000 --log_interval=100 --dtype=float32 \
    --compile=False --device=cpu --seed=$S --out_dir=out-sq/bpe_cpu_fp_s$S > $LOGS/train_bpe_cpu_fp_s$S.log 2>&1
  python demos/spinquant_compare.py --out_dir=out-sq/bpe_cpu_fp_s$S --device=cpu --steps=$STEPS --nsamples=64 \
    --seeds=2 --settings=4/4/4 --eval_tokens=50000 --progress=False --overwrite --json=bench/results/spinquant_bpe_cpu_s$S.json \
    > bench/results/spinquant_bpe_cpu_s$S.md 2> $LOGS/compare_bpe_cpu_s$S.err
fi
if [ "$PHASE" = demo ] || [ "$PHASE" = all ]; then
  python demos/spinquant_ptq.py --out_dir=out-sq/cpu_fp_s$S --quantized_dir=out-sq/cpu_spinquant_s$S --bits=4 \
    --act_bits=4 --steps=40 --nsamples=32 --device=cpu --progress=False --overwrite > $LOGS/spinquant_ptq_cpu_s$S.log 2>&1
  tail -n 1 $LOGS/spinquant_ptq_cpu_s$S.log
fi
