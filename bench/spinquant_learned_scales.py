"""Learned S1, S2 and S4 scales? SpinQuant's smoothing candidates take SmoothQuant's closed-form scales
(quantization/spin_quant.py: norm_smooth_scales for S1 and S2, gelu_output_scales for S4; alpha 0.5). Methods such as
OSTQuant and FlatQuant learn such scales instead, through the quantized model's loss. This learns a log-offset per
channel of each scale (start 0: the closed-form scales) by Adam on the cross-entropy of the W`bits` A`act_bits`
KV`kv_bits` model with RTN weights and no rotation (straight-through rounding), the learning rate cosine-decayed,
and keeps the step whose loss on held-out windows of the train split is lowest (step 0 included, as SpinQuant's
Cayley steps do). It prints the validation loss of RTN without scales, with the closed-form scales and with the
learned ones at each learning rate, and the share of RTN's gap to full precision each closes.

    python bench/spinquant_learned_scales.py --out_dir=out --device=cpu --eval_tokens=50000 --scale_lrs=0.003,0.01
"""
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

from cli import OneLineParser  # noqa: E402
from quantization.perplexity import evaluate  # noqa: E402
from quantization.spin_quant import (NORM_SMOOTH_ALPHA, SMOOTH_ALPHA, SpinQuant,  # noqa: E402
                                     gelu_output_scales, smooth_norms_state)
from quantization.spin_quant_flags import (add_spinquant_flags, bench_inputs, check_quantized_args,  # noqa: E402
                                          parse_numbers, write_rows)


def scaled_state(sq, s4_offsets, norm_offsets, quantize_weights=True):
    """sq's weights (no rotation, S4 folded in by sq) with S4 times exp(s4_offsets[i]) per block and S1/S2 at
    sq.norm_scales times exp(norm_offsets), RTN fake-quantized (straight-through) when quantize_weights."""
    state = dict(sq.base_state)
    for i, offset in enumerate(s4_offsets):
        p = f"transformer.h.{i}.mlp."
        state[p + "mlp_down.weight"] = state[p + "mlp_down.weight"] * offset.exp()
        key = p + "act.activation_output.transform.inv_scale"
        state[key] = state[key] * (-offset).exp()
    state = smooth_norms_state(state, {k: s.to(norm_offsets[k]) * norm_offsets[k].exp()
                                       for k, s in sq.norm_scales.items()})
    return sq.quantized_state(state) if quantize_weights else state


def learn(sq, calibration, heldout, steps, lr, batch_size, seed=0, eval_every=0):
    """Adam on the log-offsets of sq's S4 and S1/S2 scales; returns (the best step, its held-out loss) and leaves
    sq.model with the scales of that step and RTN weights."""
    device = sq.device
    s4 = [torch.zeros(t.shape[0], device=device, requires_grad=True) for t in sq.smooth]
    norms = {k: torch.zeros(s.shape[0], device=device, requires_grad=True) for k, s in sq.norm_scales.items()}
    params = s4 + list(norms.values())
    opt = torch.optim.Adam(params, lr=lr)
    eval_every = eval_every or max(1, steps // 10)

    def held_loss():
        with torch.no_grad():
            state = scaled_state(sq, s4, norms)
            return sq.evaluate(heldout, model=_loaded(sq, state))

    best = (held_loss(), 0, [p.detach().clone() for p in params])
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
        batch = calibration[torch.randint(0, calibration.shape[0], (min(batch_size, calibration.shape[0]),),
                                          generator=g)].to(device)
        loss = functional_call(sq.model, scaled_state(sq, s4, norms), (batch[:, :-1], batch[:, 1:]))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            held = held_loss()
            if held < best[0]:
                best = (held, step + 1, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, value in zip(params, best[2]):
            p.copy_(value)
        _loaded(sq, scaled_state(sq, s4, norms))
    return best[1], best[0]


def _loaded(sq, state):
    sq.model.load_state_dict({k: v.detach() for k, v in state.items()})
    return sq.model


def main(argv=None):
    p = OneLineParser(prog="spinquant_learned_scales.py",
                      description="S1, S2 and S4 scales learned by Adam against the closed-form ones (RTN, no "
                      "rotation).")
    add_spinquant_flags(p)
    p.add_argument("--scale_lrs", default="0.003,0.01", help="comma-separated Adam learning rates (> 0) of the scales' "
                   "log-offsets; --steps sets the steps, --batch_size the samples per step")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    try:
        check_quantized_args(args)
        lrs = parse_numbers(args.scale_lrs, "scale_lrs", lambda a: a > 0, "numbers above 0")
        if args.batch_size < 1:
            raise ValueError(f"batch_size={args.batch_size}: must be at least 1")
        if not args.heldout_tokens:
            raise ValueError("heldout_tokens=0: the learned step is chosen on held-out windows; give some")
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    device, base, checkpoint, seqlen, calibration, heldout, val = bench_inputs(args, p.prog, error)

    def score(model):
        return evaluate(model, val, batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device,
                        progress=False)["loss"]

    common = dict(bits=args.bits, act_bits=args.act_bits, kv_bits=args.kv_bits, group_size=args.group_size,
                  sym=args.sym, act_sym=args.act_sym, method="rtn", rotations=(), fold=False, device=device)
    fp = score(base)
    rtn = SpinQuant(base, **common)
    rtn.apply(calibration, progress=False, select=False)
    gap = score(rtn.model) - fp
    rows = [dict(scales="none", lr=None, best_step=None, loss=fp + gap)]

    def smoothed():
        sq = SpinQuant(base, smooth=gelu_output_scales(base, calibration, SMOOTH_ALPHA), smooth_norms=NORM_SMOOTH_ALPHA,
                       **common)
        sq.apply(calibration, progress=False, select=False)
        return sq

    rows.append(dict(scales="closed form", lr=None, best_step=None, loss=score(smoothed().model)))
    print(f"full precision {fp:.4f}; RTN {rows[0]['loss']:.4f}; closed-form S1+S2+S4 {rows[1]['loss']:.4f}", flush=True)
    for lr in lrs:
        sq = smoothed()
        step, held = learn(sq, calibration, heldout, args.steps, lr, args.batch_size, args.seed)
        rows.append(dict(scales="learned", lr=lr, best_step=step, heldout_loss=held, loss=score(sq.model)))
        print(f"learned at lr {lr:g}: best held-out step {step} of {args.steps}, val loss {rows[-1]['loss']:.4f}",
              flush=True)
    for r in rows[1:]:
        r["gap_closed"] = 1 - (r["loss"] - fp) / gap if gap > 0 else None
    w = f"W{args.bits}A{args.act_bits}KV{args.kv_bits}"
    print(f"\n{args.out_dir}: {w}, RTN weights, no rotation, S1+S2 alpha {NORM_SMOOTH_ALPHA:g}, S4 alpha "
          f"{SMOOTH_ALPHA:g}; {args.nsamples} x {seqlen} calibration tokens, {heldout.numel()} held-out tokens, "
          f"{args.steps} Adam steps of {args.batch_size} samples; {args.eval_tokens or 'all'} validation tokens; "
          f"full precision {fp:.4f}\n")
    print("| S1+S2+S4 scales | Adam lr | kept step | val loss | RTN gap closed |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        closed = "-" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.0f}%"
        lr = "-" if r["lr"] is None else f"{r['lr']:g}"
        print(f"| {r['scales']} | {lr} | "
              f"{'-' if r['best_step'] is None else r['best_step']} | {r['loss']:.4f} | {closed} |")
    write_rows(args, w, fp, rows)
    return rows


if __name__ == "__main__":
    main()
