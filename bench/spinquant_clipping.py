"""Does clipping help SpinQuant on this model? QuaRot and SpinQuant quantize with clipped ranges: activations and
the K/V cache at a fixed share of each token's range (QuantSpec.clip_ratio), and weights with the per-row clipping
that minimises the rounding error (QuaRot's --w_clip: shrink each row's range by a factor from 1.0 down to 0.5 in
steps of 0.01, keep the one with the lowest sum of |w - q(w)|^2.4). This prints the validation loss of a
full-precision checkpoint at W`bits` A`act_bits` KV`kv_bits`, per rotation (none, random Hadamard, learned from it,
learned from the identity; R1 + R2 + R3 + R4, RTN weights) with and without each kind of clipping, and the share
of plain RTN-without-rotation's gap to full precision each row closes.

    python bench/spinquant_clipping.py --out_dir=out --device=cpu --eval_tokens=50000
    python bench/spinquant_clipping.py --out_dir=out-sq/bpe_fp_s1337 --device=cuda --act_clips=1,0.95,0.9
"""
import os
import sys
from dataclasses import asdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cli import OneLineParser  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantization.perplexity import evaluate  # noqa: E402
from quantization.quantizers import dequantize, qparams_from_range, quantize, to_rows  # noqa: E402
from quantization.rtn import rtn_quantize, set_quantized, target_layers, weight_spec  # noqa: E402
from quantization.spin_quant import KV_SITES, SpinQuant, activation_quant  # noqa: E402
from quantization.spin_quant_flags import add_spinquant_flags, bench_inputs, check_args, write_rows  # noqa: E402

SHRINKS = [1.0 - 0.01 * i for i in range(51)]  # 1.0 .. 0.5
NORM = 2.4  # the error norm of GPTQ's and QuaRot's clipping search


@torch.no_grad()
def mse_clip_rtn(model, spec):
    """Round every target layer's weight with, per row, the range shrink of SHRINKS whose rounding error (sum of
    |w - q(w)|^NORM) is lowest; 1.0 is plain RTN, so no row ends with a larger error than RTN gives it."""
    for layer in target_layers(model).values():
        w = layer.weight.detach()
        rows = to_rows(w, spec).float()
        lo, hi = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
        best = scale = zero_point = None
        for shrink in SHRINKS:
            s, z = qparams_from_range(lo * shrink, hi * shrink, spec)
            err = (dequantize(quantize(rows, s, z, spec), s, z, spec) - rows).abs().pow(NORM).sum(1, keepdim=True)
            if best is None:
                best, scale, zero_point = err, s, z
            else:
                better = err < best
                best = torch.where(better, err, best)
                scale, zero_point = torch.where(better, s, scale), torch.where(better, z, zero_point)
        set_quantized(layer, quantize(w, scale, zero_point, spec), scale, zero_point, spec)


def clipped(act_quant, act_clip, kv_clip):
    """model.py's act_quant config with every linear input clipped at act_clip and the K/V caches at kv_clip."""
    return {site: {**spec, "clip_ratio": kv_clip if site in KV_SITES else act_clip}
            for site, spec in act_quant.items()}


def ratios(text, flag):
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise ValueError(f"{flag}={text}: expected comma-separated ratios in (0, 1]")
    return values


def main(argv=None):
    p = OneLineParser(prog="spinquant_clipping.py", description="SpinQuant with and without clipping.")
    add_spinquant_flags(p)
    p.add_argument("--act_clips", default="1,0.95,0.9", help="activation clipping ratios to try (1: none)")
    p.add_argument("--kv_clips", default="1,0.95", help="K/V cache clipping ratios to try (1: none)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    try:
        check_args(args)
        act_clips, kv_clips = ratios(args.act_clips, "act_clips"), ratios(args.kv_clips, "kv_clips")
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    device, base, checkpoint, seqlen, calibration, heldout, val = bench_inputs(args, p.prog, error)
    spec = weight_spec(args.bits, args.group_size, args.sym)
    common = dict(bits=args.bits, act_bits=args.act_bits, kv_bits=args.kv_bits, group_size=args.group_size,
                  sym=args.sym, act_sym=args.act_sym, device=device)

    def score(model):
        return evaluate(model, val, batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device,
                        progress=False)["loss"]

    rows = []

    def add(rotation, weights, act_clip, kv_clip, loss):
        rows.append(dict(rotation=rotation, weights=weights, act_clip=act_clip, kv_clip=kv_clip, loss=loss))
        print(f"{rotation}, {weights}, activations clipped at {act_clip:g}, K/V at {kv_clip:g}: val loss {loss:.4f}",
              flush=True)

    fp = score(base)
    print(f"full precision: val loss {fp:.4f}", flush=True)
    # the rotations: learned ones from SpinQuant.optimize with RTN in the loss, no clipping (what apply uses)
    sq = SpinQuant(base, method="rtn", seed=args.seed, **common)
    sq.optimize(calibration, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                progress=args.progress, heldout=heldout, from_identity=args.from_identity)
    rotations = [("no rotation", None), ("random Hadamard", sq.start), ("learned", sq.rotation_values())]
    if sq.learned_from_identity is not None:
        rotations.append(("learned from identity", sq.learned_from_identity))
    act_quant = activation_quant(args.act_bits, args.kv_bits, args.act_sym)
    for act_clip in act_clips:
        for kv_clip in kv_clips:
            aq = clipped(act_quant, act_clip, kv_clip)
            for name, values in rotations:
                weight_kinds = [("RTN", rtn_quantize)]
                if act_clip == act_clips[0] and kv_clip == kv_clips[0]:  # weight clipping at the first setting
                    weight_kinds.append(("RTN, MSE-clipped", mse_clip_rtn))
                for weights, quantize_weights in weight_kinds:
                    if values is None:
                        model = GPT(GPTConfig(**{**asdict(base.config), "act_quant": aq})).to(device).eval()
                        model.load_state_dict(base.state_dict())
                    else:
                        rotated = SpinQuant(base, method="rtn", seed=args.seed, act_quant=aq, **common)
                        rotated.set_rotations(*values)
                        model = rotated.bake()
                    quantize_weights(model, spec)
                    add(name, weights, act_clip, kv_clip, score(model))
    rtn = next(r["loss"] for r in rows if r["rotation"] == "no rotation" and r["weights"] == "RTN"
               and r["act_clip"] == 1 and r["kv_clip"] == 1) if 1.0 in act_clips and 1.0 in kv_clips else None
    setting = f"W{args.bits}A{args.act_bits}KV{args.kv_bits}"
    print(f"\n{args.out_dir}: {setting}, {checkpoint['model_args']['n_layer']} layers, "
          f"{checkpoint['model_args']['n_embd']} wide; full precision {fp:.4f}; {args.steps} Cayley steps on "
          f"{args.nsamples} x {seqlen} tokens\n")
    print("| rotation | weights | activations clipped at | K/V clipped at | val loss | RTN gap closed |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if rtn is not None and rtn > fp:
            r["gap_closed"] = (rtn - r["loss"]) / (rtn - fp)
        gap = f"{100 * r['gap_closed']:.0f}%" if "gap_closed" in r else "-"
        print(f"| {r['rotation']} | {r['weights']} | {r['act_clip']:g} | {r['kv_clip']:g} | {r['loss']:.4f} | {gap} |")
    write_rows(args, setting, fp, rows)
    return rows


if __name__ == "__main__":
    main()
