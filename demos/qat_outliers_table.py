"""Validation loss and bits per weight of QAT checkpoints (e.g. with and without --quantize_linear_outlier_fraction),
each scored on its whole validation split with the quantizers on, as the PTQ tables are.

    python demos/qat_outliers_table.py --runs=out-w2,out-w2-outliers
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from inference import load_checkpoint  # noqa: E402
from cli import OneLineParser  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantization.layers import QuantizedLinear  # noqa: E402
from quantization.perplexity import evaluate, split_tokens  # noqa: E402
from quantization.quantizers import outlier_count, storage_bits  # noqa: E402
from safety import check_output_file, write_text_atomic  # noqa: E402


def model_bits(model):
    """(storage bits per weight over the quantized linear sites, outliers in all of them)."""
    bits = numel = outliers = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            shape = tuple(module.latent_weight.shape)
            n = outlier_count(module.latent_weight.numel(), module.spec.outlier_fraction)
            bits += storage_bits(module.spec, shape, n)
            numel += module.latent_weight.numel()
            outliers += n
    return bits / max(numel, 1), outliers


def main(argv=None):
    p = OneLineParser(prog="qat_outliers_table.py", description="Score QAT checkpoints with their bits per weight.")
    p.add_argument("--runs", required=True, help="comma-separated out_dirs of QAT runs")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--eval_tokens", type=int, default=0, help="score only this many validation tokens (0: all)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    if args.json:
        try:
            check_output_file(args.json, runs + [os.path.join(r, "ckpt.pt") for r in runs], args.overwrite)
        except ValueError as e:
            sys.exit(f"{p.prog}: error: --json={args.json}: {e}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for out_dir in runs:
        try:
            checkpoint = load_checkpoint(out_dir, device)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"{p.prog}: error: --runs={out_dir}: {e}")
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(checkpoint["model"])
        model.set_quantization(True)
        model.to(device).eval()
        dataset = checkpoint.get("dataset", "shakespeare_char")
        loss = evaluate(model, split_tokens(dataset, "val"), max_tokens=args.eval_tokens, device=device,
                        progress=False)["loss"]
        bits, outliers = model_bits(model)
        spec = next(iter(checkpoint["model_args"]["weight_quant"].values()), {})
        rows.append(dict(run=os.path.basename(os.path.normpath(out_dir)), method=spec.get("method"),
                         bits=spec.get("bits"), outlier_fraction=spec.get("outlier_fraction", 0.0), outliers=outliers,
                         bits_per_weight=bits, loss=loss, iters=checkpoint.get("iter_num")))
        print(f"{out_dir}: val loss {loss:.4f}, {bits:.3f} bits/weight, {outliers} outliers", flush=True)
    print("\n| run | method | outliers | bits/weight | steps | val loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['method']} | {100 * r['outlier_fraction']:g}% | {r['bits_per_weight']:.3f} | "
              f"{r['iters']} | {r['loss']:.4f} |")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
