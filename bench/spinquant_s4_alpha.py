"""Which S4 scale? S4 (quantization/spin_quant.py gelu_output_scales) divides the GELU output that mlp_down reads by a
scale per channel, s_j = a_j^alpha / max_i |W_down[i, j]|^(1 - alpha), and multiplies mlp_down's input columns by it.
This prints the validation loss of a full-precision checkpoint at W`bits` A`act_bits` KV`kv_bits` with RTN weights
and no rotation, without S4 and with S4 for each statistic a_j (the channel's root mean square over the calibration
samples, or its largest magnitude as SmoothQuant takes it) and each alpha, with the share of RTN's gap to full
precision each closes; and, with --act_only, the same with the weights in full precision. With --norm_alphas, also
S1 and S2 (SmoothQuant's scales folded into the norms' gains and v's rows, quantization/spin_quant.py
norm_smooth_scales) at each of those alphas, alone and with each S4. With --shift, also the shift alone and every S4
row with the shift: each channel's calibration mean taken out of the GELU output before S4's scale and added back
through mlp_down's bias (gelu_output_means; Outlier Suppression+'s channel shift). With --r4, every row also with
the online Hadamard R4 after them (the unfolded model: R4 needs no fold).

    python bench/spinquant_s4_alpha.py --out_dir=out --device=cpu --eval_tokens=50000
    python bench/spinquant_s4_alpha.py --out_dir=out --device=cpu --alphas=0.5,0.75 --statistics=rms --norm_alphas=0.25,0.5,0.75
    python bench/spinquant_s4_alpha.py --out_dir=out --device=cpu --alphas=0.5,0.75 --statistics=rms --shift --r4
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli import BoolFlag, OneLineParser  # noqa: E402
from quantization.perplexity import evaluate  # noqa: E402
from quantization.spin_quant import FULL_BITS, SpinQuant, gelu_output_means, gelu_output_scales  # noqa: E402
from quantization.spin_quant_flags import (add_spinquant_flags, bench_inputs, check_quantized_args,  # noqa: E402
                                          parse_alphas, write_rows)


def main(argv=None):
    p = OneLineParser(prog="spinquant_s4_alpha.py",
                      description="S4's statistic and alpha against RTN without rotation.")
    add_spinquant_flags(p)
    p.add_argument("--alphas", default="0.25,0.5,0.75", help="comma-separated alphas in [0, 1]")
    p.add_argument("--statistics", default="rms,max", help="comma-separated: rms, max")
    p.add_argument("--norm_alphas", default="", help="comma-separated alphas in [0, 1] of S1 and S2, each alone and "
                   "with every S4 row (empty: none)")
    p.add_argument("--shift", action=BoolFlag, default=False, help="also the shift alone and every S4 row with the "
                   "GELU output's channel means taken out first")
    p.add_argument("--r4", action=BoolFlag, default=False, help="also every row with the online Hadamard R4 after "
                   "its S4 and shift")
    p.add_argument("--act_only", action=BoolFlag, default=False, help="also the rows with full-precision weights")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    try:
        check_quantized_args(args)
        alphas = list(parse_alphas(args.alphas, "alphas"))
        norm_alphas = list(parse_alphas(args.norm_alphas, "norm_alphas")) if args.norm_alphas else []
        statistics = args.statistics.split(",")
        if not set(statistics) <= {"rms", "max"}:
            raise ValueError(f"statistics={args.statistics}: expected comma-separated rms, max")
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    args.heldout_tokens = 0  # the scales come from the calibration samples; nothing is chosen here
    device, base, checkpoint, seqlen, calibration, _, val = bench_inputs(args, p.prog, error)

    def score(model):
        return evaluate(model, val, batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device,
                        progress=False)["loss"]

    common = dict(act_bits=args.act_bits, kv_bits=args.kv_bits, group_size=args.group_size, sym=args.sym,
                  act_sym=args.act_sym, method="rtn", rotations=(), fold=False, device=device)
    fp = score(base)
    print(f"full precision: val loss {fp:.4f}", flush=True)
    rows, gaps = [], {}
    means = gelu_output_means(base, calibration) if args.shift else None
    for bits in [args.bits] + ([FULL_BITS] if args.act_only else []):
        weights = "RTN" if bits != FULL_BITS else "full precision"
        s4 = [(None, None)] + [(s, a) for s in statistics for a in alphas]
        s4 = [(r, False) for r in s4] + ([(r, True) for r in s4] if args.shift else [])
        s4 = [(r, False) for r in s4] + ([(r, True) for r in s4] if args.r4 else [])
        for norm_alpha, (((statistic, alpha), shift), r4) in [(None, r) for r in s4] + [(n, r) for n in norm_alphas
                                                                                         for r in s4]:
            scales = None if statistic is None else gelu_output_scales(base, calibration, alpha, statistic=statistic)
            sq = SpinQuant(base, bits=bits, smooth=scales, smooth_norms=norm_alpha, shift=means if shift else None,
                           **{**common, "rotations": ("R4",) if r4 else ()})
            sq.apply(calibration, progress=False, select=False)
            loss = score(sq.model)
            row = dict(weights=weights, norm_alpha=norm_alpha, statistic=statistic or "-", alpha=alpha, shift=shift,
                       r4=r4, loss=loss)
            if statistic is None and norm_alpha is None and not shift and not r4:
                gaps[bits] = loss - fp
            elif gaps[bits] > 0:
                row["gap_closed"] = 1 - (loss - fp) / gaps[bits]
            rows.append(row)
            print(f"{weights}, S1+S2 {'off' if norm_alpha is None else f'alpha {norm_alpha:g}'}, S4 "
                  f"{statistic or 'off'}{'' if alpha is None else f' alpha {alpha:g}'}, shift "
                  f"{'on' if shift else 'off'}, R4 {'on' if r4 else 'off'}: val loss {loss:.4f}", flush=True)
    w = f"W{args.bits}" if args.bits != FULL_BITS else "W16"
    setting = f"{w}A{args.act_bits}KV{args.kv_bits}"
    print(f"\n{args.out_dir}: {setting}, no rotation, {args.nsamples} x {seqlen} calibration tokens, "
          f"{args.eval_tokens or 'all'} validation tokens; full precision {fp:.4f}\n")
    print("| weights | S1+S2 alpha | S4 statistic | S4 alpha | shift | R4 | val loss | gap closed |")
    print("|---|---:|---|---:|---|---|---:|---:|")
    for r in rows:
        gap = f"{100 * r['gap_closed']:.0f}%" if "gap_closed" in r else "-"
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        norm = "-" if r["norm_alpha"] is None else f"{r['norm_alpha']:g}"
        print(f"| {r['weights']} | {norm} | {r['statistic']} | {alpha} | {'on' if r['shift'] else '-'} | "
              f"{'on' if r['r4'] else '-'} | {r['loss']:.4f} | {gap} |")
    write_rows(args, setting, fp, rows)
    return rows


if __name__ == "__main__":
    main()
