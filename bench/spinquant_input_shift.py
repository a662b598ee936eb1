"""Does Outlier Suppression+'s channel shift (arXiv 2304.09145) help at the norms' outputs too? SpinQuant's candidates
take each channel's calibration mean out of the GELU output before its quantizer (gelu_output_means); this study
does the same at the two sites a norm feeds, attn_input (read by q, k and v) and mlp_input (read by mlp_up): the
site subtracts the mean online ("shift_scale", scale 1) and each reader adds W mean to its bias, so that in full
precision the model computes the same function (the table's last column checks it). Per rotation set (no
rotation; the folded norms; the fixed Hadamards R3+R4; a random Hadamard R1, R1+R2 and all four, not learned),
with RTN weights, the validation loss without a shift and with it at attn_input, mlp_input and both, and the share
of that rotation set's own gap to full precision each closes. The means are taken in the set's basis (a rotation
moves them) from the calibration samples, in full precision. A study, not a candidate of SpinQuant's choice.

    python bench/spinquant_input_shift.py --out_dir=out-sq/bpe_cpu_fp_s1337 --device=cpu --eval_tokens=50000
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
from quantization.fold import build_like, with_biases  # noqa: E402
from quantization.perplexity import evaluate  # noqa: E402
from quantization.rtn import rtn_quantize, weight_spec  # noqa: E402
from quantization.spin_quant import FULL_BITS, SpinQuant, calibration_batch  # noqa: E402
from quantization.spin_quant_flags import (add_spinquant_flags, bench_inputs, check_quantized_args,  # noqa: E402
                                          write_rows)

SETS = [("no rotation", (), False), ("folded norms", (), True), ("Hadamard R3+R4", ("R3", "R4"), True),
        ("random Hadamard R1", ("R1",), True), ("random Hadamard R1+R2", ("R1", "R2"), True),
        ("random Hadamard all", ("R1", "R2", "R3", "R4"), True)]
SHIFTS = [(), ("attn",), ("mlp",), ("attn", "mlp")]
READERS = {"attn": ("q", "k", "v"), "mlp": ("mlp_up",)}


@torch.no_grad()
def input_means(model, data, batch_size=16):
    """{(block, "attn" or "mlp"): (n_embd,) float64 mean over the (N, T + 1) samples (or a list of (1, T + 1)) of what
    the block's attn_input or mlp_input quantizer reads}, the model in full precision."""
    data = calibration_batch(data)
    sums, count, hooks = {}, 0, []
    for i, block in enumerate(model.transformer.h):
        for kind, part in (("attn", block.attn), ("mlp", block.mlp)):
            def record(module, inputs, key=(i, kind)):
                sums[key] = sums.get(key, 0) + inputs[0].double().flatten(0, -2).sum(0)
            hooks.append(part.act["input"].register_forward_pre_hook(record))
    was = model.quantization_enabled
    model.set_quantization(False)
    try:
        for b in range(0, data.shape[0], batch_size):
            x = data[b:b + batch_size, :-1].to(next(model.parameters()).device)
            model(x)
            count += x.numel()
    finally:
        model.set_quantization(was)
        for h in hooks:
            h.remove()
    return {key: (total / count).cpu() for key, total in sums.items()}


def shifted(model, means, kinds):
    """A copy of `model` whose `kinds` ("attn", "mlp") input sites subtract their means before the quantizer, the
    readers adding W mean to their biases (a model without biases gets zero ones first)."""
    base = with_biases(model)
    transforms = {**base.config.online_transforms, **{f"{kind}_input": "shift_scale" for kind in kinds}}
    config = GPTConfig(**{**asdict(base.config), "online_transforms": transforms})
    state = dict(base.state_dict())
    state.update(_new_buffers(config, state))
    for (i, kind), mean in means.items():
        if kind not in kinds:
            continue
        p = f"transformer.h.{i}.{kind}."
        mean = mean.to(state[p + "act.input.transform.inv_scale"])
        state[p + "act.input.transform.shift"] = mean
        for reader in READERS[kind]:
            state[p + f"{reader}.bias"] = state[p + f"{reader}.bias"] + state[p + f"{reader}.weight"] @ mean
    return build_like(config, state)


def _new_buffers(config, state):
    """The buffers a config's new online transforms add, at their neutral values (inv_scale 1), where `state` has
    none yet."""
    like = next(iter(state.values()))
    with torch.random.fork_rng(devices=[]):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    return {k: (torch.ones if k.endswith("inv_scale") else torch.zeros)(shape, dtype=like.dtype, device=like.device)
            for k, shape in shapes.items() if k not in state}


def main(argv=None):
    p = OneLineParser(prog="spinquant_input_shift.py",
                      description="The channel shift at the norms' outputs, per rotation set, RTN weights.")
    add_spinquant_flags(p)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    try:
        check_quantized_args(args)
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    args.heldout_tokens = 0  # nothing is chosen here
    device, base, checkpoint, seqlen, calibration, _, val = bench_inputs(args, p.prog, error)
    data = calibration_batch(calibration)  # the exactness check's rows too
    spec = weight_spec(args.bits, args.group_size, args.sym)

    def score(model):
        return evaluate(model, val, batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device,
                        progress=False)["loss"]

    fp = score(base)
    print(f"full precision: val loss {fp:.4f}", flush=True)
    rows = []
    for name, rotations, fold in SETS:
        sq = SpinQuant(base, bits=FULL_BITS, act_bits=args.act_bits, kv_bits=args.kv_bits, act_sym=args.act_sym,
                       rotations=rotations, learn=(), fold=fold, smooth_alpha=None, gelu_shift=False, device=device,
                       seed=args.seed)
        rotated = sq.bake()
        means = input_means(rotated, data)
        losses, exact = {}, 0.0
        for kinds in SHIFTS:
            model = shifted(rotated, means, kinds) if kinds else build_like(rotated.config, rotated.state_dict())
            model.eval()
            if kinds:  # a change of basis: the same logits in full precision
                model.set_quantization(False)
                rotated.set_quantization(False)
                x = data[:4, :-1].to(device)
                exact = max(exact, (model(x)[0] - rotated(x)[0]).abs().max().item())
                model.set_quantization(True)
                rotated.set_quantization(True)
            rtn_quantize(model, spec)
            losses[kinds] = score(model)
        gap = losses[()] - fp
        row = dict(rotations=name, full_precision_difference=exact,
                   **{"+".join(k) or "no shift": v for k, v in losses.items()},
                   gap_closed={"+".join(k): (losses[()] - v) / gap if gap > 0 else None
                               for k, v in losses.items() if k})
        rows.append(row)
        print(f"{name}: " + ", ".join(f"{'+'.join(k) or 'no shift'} {v:.4f}" for k, v in losses.items()), flush=True)
    setting = f"W{args.bits}A{args.act_bits}KV{args.kv_bits}"
    print(f"\n{args.out_dir}: {setting}, RTN weights, means from {args.nsamples} x {seqlen} calibration tokens, "
          f"{args.eval_tokens or 'all'} validation tokens; full precision {fp:.4f}. Gap closed: of the rotation "
          f"set's own gap without a shift\n")
    print("| rotations | no shift | attn_input shifted | mlp_input shifted | both | full-precision difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[k]:.4f}" + (f" ({100 * r['gap_closed'][k]:+.0f}%)" if r["gap_closed"][k] is not None else "")
                 for k in ("attn", "mlp", "attn+mlp")]
        print(f"| {r['rotations']} | {r['no shift']:.4f} | " + " | ".join(cells)
              + f" | {r['full_precision_difference']:.1e} |")
    write_rows(args, setting, fp, rows)
    return rows


if __name__ == "__main__":
    main()
