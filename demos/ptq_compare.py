"""The PTQ results table: validation loss and perplexity of a full-precision checkpoint and of its round-to-nearest,
GPTQ and AutoRound quantizations at several bit widths, with the wall time of each quantization.

    python demos/ptq_compare.py --out_dir=out --device=cuda                               # the README table
    python demos/ptq_compare.py --out_dir=out --device=cpu --iters=50 --nsamples=32 --eval_tokens=100000

"gap closed" is the share of round-to-nearest's loss gap to full precision that a method recovers.
"""
import copy
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cli import OneLineParser  # noqa: E402
from inference import resolve_device  # noqa: E402
from quantization.perplexity import evaluate, split_tokens  # noqa: E402
from quantization.ptq import (PTQConfig, add_ptq_flags, calibration_tokens, check_args, check_method,  # noqa: E402
                              load_full_precision, make_quantizer, method_names)
from quantization.rtn import bits_per_weight  # noqa: E402
from safety import check_output_file, write_text_atomic  # noqa: E402


def main(argv=None):
    p = OneLineParser(prog="ptq_compare.py", description="Compare RTN, GPTQ and AutoRound at several bit widths.")
    add_ptq_flags(p)
    p.add_argument("--bit_widths", default="4,3,2", help="comma-separated weight bits to compare")
    p.add_argument("--w4_group_size", type=int, default=-1,
                   help="group size at 4 bits (0: per channel; -1: --group_size)")
    p.add_argument("--methods", default="rtn,gptq,autoround", help=f"comma-separated methods ({', '.join(method_names())})")
    p.add_argument("--group_sizes", default=None,
                   help="comma-separated group sizes to compare (0: per channel; default: --group_size)")
    p.add_argument("--outlier_fractions", default=None,
                   help="comma-separated outlier fractions to compare (default: --outlier_fraction)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    try:
        check_args(args)
        bit_widths = [int(b) for b in args.bit_widths.split(",") if b.strip().lstrip("-").isdigit()]
        if len(bit_widths) != len(args.bit_widths.split(",")) or not all(2 <= b <= 8 for b in bit_widths):
            raise ValueError(f"bit_widths={args.bit_widths}: expected comma-separated integers in 2..8")
        if args.w4_group_size < -1 or args.w4_group_size > 2 ** 31 - 1:
            raise ValueError(f"w4_group_size={args.w4_group_size}: expected -1, 0 or a group size")
        methods = [m for m in args.methods.split(",") if m]
        for method in methods:
            try:
                check_method(method)
            except ValueError:
                raise ValueError(f"methods={args.methods}: unknown {method}") from None
        group_sizes = [int(g) for g in args.group_sizes.split(",")] if args.group_sizes else [args.group_size]
        fractions = ([float(f) for f in args.outlier_fractions.split(",")] if args.outlier_fractions
                     else [args.outlier_fraction])
        for f in fractions:
            check_args(type(args)(**{**vars(args), "outlier_fraction": f}))
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    device, _ = resolve_device(args.device, "float32")
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.json:
        source = args.out_dir if os.path.isfile(args.out_dir) else os.path.join(args.out_dir, "ckpt.pt")
        try:
            check_output_file(args.json, [source, args.calib_file], args.overwrite)
        except ValueError as e:
            sys.exit(f"{error} --json={args.json}: {e}")
    try:
        base, checkpoint, tokenizer = load_full_precision(args.out_dir, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{error} --out_dir={args.out_dir}: {e}")
    val = split_tokens(checkpoint["dataset"], "val")
    calibration = calibration_tokens(args, checkpoint, tokenizer)

    def score(model):
        return evaluate(model, val, batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device,
                        progress=False)

    fp = score(base)
    rows = [dict(method="full precision", bits=32, group="-", loss=fp["loss"], ppl=fp["perplexity"], seconds=0.0,
                 outliers=0.0, bits_per_weight=32.0)]
    print(f"full precision: val loss {fp['loss']:.4f}, perplexity {fp['perplexity']:.2f} ({fp['tokens']:,} tokens)",
          flush=True)
    settings = [(b, g, f) for b in bit_widths for g in group_sizes for f in fractions]
    rtn_losses = {}
    for bits, group_size, fraction in settings:
        if bits == 4 and args.w4_group_size >= 0:
            group_size = args.w4_group_size
        for method in methods:
            run = copy.copy(args)
            run.bits, run.group_size, run.progress, run.outlier_fraction = bits, group_size, False, fraction
            model = copy.deepcopy(base)
            try:
                quantizer = make_quantizer(method, model, calibration, PTQConfig.from_args(run, device=device))
            except ValueError as e:
                sys.exit(f"{error} --{e}")
            t0 = time.time()
            records = quantizer.quantize()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.time() - t0
            r = score(model)
            if method == "rtn" and fraction == 0:  # the reference: plain round to nearest at these bits and group
                rtn_losses[(bits, group_size)] = r["loss"]
            rtn_loss = rtn_losses.get((bits, group_size))
            row = dict(method=method, bits=bits, group=group_size or "channel", loss=r["loss"], ppl=r["perplexity"],
                       seconds=seconds, outliers=fraction, bits_per_weight=bits_per_weight(records))
            if rtn_loss is not None and not (method == "rtn" and fraction == 0) and rtn_loss > fp["loss"]:
                row["gap_closed"] = (rtn_loss - r["loss"]) / (rtn_loss - fp["loss"])
            rows.append(row)
            print(f"{method} W{bits} g{row['group']} outliers {100 * fraction:g}%: val loss {r['loss']:.4f}, "
                  f"perplexity {r['perplexity']:.2f}, {row['bits_per_weight']:.3f} bits/weight, {seconds:.1f}s",
                  flush=True)
            del model, quantizer
    cfg = (f"{args.out_dir}, {fp['tokens']:,} val tokens; calibration {args.nsamples} x "
           f"{args.seqlen or base.config.block_size} tokens; AutoRound {args.iters} iters; "
           f"{'symmetric' if args.sym else 'asymmetric'}; {device}")
    print(f"\n{cfg}\n")
    print("| method | weights | group | outliers | bits/weight | val loss | perplexity | RTN gap closed "
          "| quantize time (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        weights = "fp32" if r["bits"] == 32 else f"W{r['bits']}"
        gap = f"{100 * r['gap_closed']:.0f}%" if "gap_closed" in r else "-"
        print(f"| {r['method']} | {weights} | {r['group']} | {100 * r['outliers']:g}% | {r['bits_per_weight']:.3f} | "
              f"{r['loss']:.4f} | {r['ppl']:.2f} | {gap} | {r['seconds']:.1f} |")
    if args.json:
        write_text_atomic(args.json, json.dumps({"config": cfg, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
