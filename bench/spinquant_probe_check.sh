#!/usr/bin/env bash
# train.py --spinquant's probe on a GPU, with deterministic kernels: a run whose probe rejects the rotations ends
# with the weights of plain QAT, and one whose probe keeps them with the weights of --spinquant without a probe
# (the probe's choice forced both ways; the switch keeps the rotations whatever the held-out margin). The CPU test
# of the same (tests/test_spin_quant_qat.py) cannot see the GPU path: fused AdamW's state and the CUDA random state go
# through the probe's CPU snapshots and back. Tiny runs of the default model (60 iterations); prints max |diff|.
#   bash bench/spinquant_probe_check.sh            # logs in bench/results/spinquant_probe_check/ (OUTDIR=...)

cd "$(dirname "$0")/.."
OUT=${OUTDIR:-bench/results/spinquant_probe_check}
mkdir -p "$OUT"
Q="--linear_variant_attn=quantized_linear --linear_variant_mlp=quantized_linear --quantize_linear_bits=4 --quantize_linear_method=affine_quant --activations_quant_method=affine_quant --activations_quant_granularity=per_token --quantize_mlp_act_input --quantize_mlp_act_bits=4"
COMMON="--device=cuda --dtype=bfloat16 --compile=False --deterministic --max_iters=60 --quantization_warmup_iters=30 --eval_interval=30 --eval_iters=10 --log_interval=10 --dropout=0.1 --spinquant_steps=3 --spinquant_nsamples=16"
[ -f data/shakespeare_char/val.bin ] || python data/shakespeare_char/prepare.py > /dev/null
python train.py --out_dir=out-probecheck/plain $COMMON $Q > $OUT/plain.log 2>&1
python -c "import sys, math; import quantization.spin_quant_qat as s; s.QAT_SELECT = False
import train; train.paired_gain = lambda a, b: (0.0, -math.inf); train.main(sys.argv[1:])" --out_dir=out-probecheck/reject $COMMON $Q --spinquant > $OUT/reject.log 2>&1
python -c "import sys, math; import quantization.spin_quant_qat as s; s.QAT_SELECT = False
import train; train.paired_gain = lambda a, b: (0.0, math.inf); train.main(sys.argv[1:])" --out_dir=out-probecheck/keep $COMMON $Q --spinquant > $OUT/keep.log 2>&1
python -c "import sys; import quantization.spin_quant_qat as s; s.QAT_SELECT = False
import train; train.main(sys.argv[1:])" --out_dir=out-probecheck/noprobe $COMMON $Q --spinquant --spinquant_probe=0 > $OUT/noprobe.log 2>&1
{ for f in plain reject keep noprobe; do echo "== $f"; grep "probe\|step 60\|kept\|error\|Error" $OUT/$f.log | cut -c1-200; done
python - <<'PY'
import torch
def load(d): return torch.load(d + "/ckpt.pt", weights_only=True, map_location="cpu")
a, b = load("out-probecheck/plain")["model"], load("out-probecheck/reject")["model"]
diff = lambda x, y: max((x[k].float() - y[k].float()).abs().max().item() for k in x if x[k].is_floating_point())
print("reject vs plain: equal", all(torch.equal(a[k], b[k]) for k in a), "max diff", diff(a, b))
c, d = load("out-probecheck/keep"), load("out-probecheck/noprobe")
print("keep vs no probe: equal", all(torch.equal(c["model"][k], d["model"][k]) for k in c["model"]), "max diff",
      diff(c["model"], d["model"]), diff(c["spinquant_qat"]["model"], d["spinquant_qat"]["model"]))
PY
} | tee "$OUT/summary.txt"
