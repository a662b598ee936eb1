"""W8A8 with and without SmoothQuant: 8-bit symmetric per-channel weights (round to nearest) and 8-bit activations
at every linear layer's input (attn input, attention's output before attn_proj, mlp input, GELU's output before
mlp_down), per tensor or per token (dynamic: the range of each forward pass). SmoothQuant's scales are folded
into ln_1, v and ln_2 first (quantization/smoothquant.py).

    python demos/smoothquant_w8a8.py --out_dir=out --alphas=0.5 --granularities=per_tensor,per_token
"""
import copy
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import checkpoint_dataset  # noqa: E402
from inference import load_checkpoint  # noqa: E402
from cli import OneLineParser  # noqa: E402
from configurator import ACT_GRANULARITIES  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantization.autoround.calibration import prepare_samples  # noqa: E402
from quantization.packing import is_packed  # noqa: E402
from quantization.perplexity import evaluate, split_tokens  # noqa: E402
from quantization.quantizers import QuantSpec  # noqa: E402
from quantization.rtn import bits_per_weight, rtn_quantize, weight_spec  # noqa: E402
from quantization.smoothquant import check_alpha, smooth_model  # noqa: E402
from safety import check_output_file, write_text_atomic  # noqa: E402

# the activation sites that are a linear layer's input
LINEAR_INPUT_SITES = ("attn_input", "attn_pv_mult_output", "mlp_input", "mlp_activation_output")


def w8a8(model, granularity, bits=8):
    """A copy of a float model with `bits`-bit activations at the linear inputs and RTN `bits`-bit weights."""
    act = dataclasses.asdict(QuantSpec(method="symmetric_quant", bits=bits, granularity=granularity))
    quantized = GPT(dataclasses.replace(model.config, act_quant={site: act for site in LINEAR_INPUT_SITES}))
    quantized.load_state_dict(model.state_dict())
    quantized.to(next(model.parameters()).device).eval()
    records = rtn_quantize(quantized, weight_spec(bits, 0, sym=True))
    return quantized, records


def main(argv=None):
    p = OneLineParser(prog="smoothquant_w8a8.py", description="W8A8 with and without SmoothQuant.")
    p.add_argument("--out_dir", default="out", help="folder holding a full-precision ckpt.pt")
    p.add_argument("--alphas", default="0.5", help="comma-separated SmoothQuant migration strengths, each in [0, 1]")
    p.add_argument("--granularities", default="per_tensor,per_token", help="activation ranges to compare")
    p.add_argument("--bits", type=int, default=8, help="weight and activation bits")
    p.add_argument("--nsamples", type=int, default=64, help="calibration samples (train split)")
    p.add_argument("--seqlen", type=int, default=0, help="tokens per calibration sample (0: block_size)")
    p.add_argument("--eval_tokens", type=int, default=0, help="score only this many validation tokens (0: all)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--seed", type=int, default=0, help="calibration draw")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    try:
        alphas = [float(a) for a in args.alphas.split(",")]
        for a in alphas:
            check_alpha(a, "alphas")
    except ValueError as e:
        sys.exit(f"{error} --{e}" if str(e).startswith("alphas") else f"{error} --alphas={args.alphas}: {e}")
    granularities = args.granularities.split(",")
    if any(g not in ACT_GRANULARITIES for g in granularities):
        sys.exit(f"{error} --granularities={args.granularities}: expected some of {', '.join(ACT_GRANULARITIES)}")
    try:
        QuantSpec(bits=args.bits)
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    if args.json:
        try:
            check_output_file(args.json, [os.path.join(args.out_dir, "ckpt.pt"), args.out_dir], args.overwrite)
        except ValueError as e:
            sys.exit(f"{error} --json={args.json}: {e}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        checkpoint = load_checkpoint(args.out_dir, device)
        if is_packed(checkpoint) or checkpoint["model_args"].get("act_quant"):
            raise ValueError("already quantized; SmoothQuant needs a full-precision checkpoint")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{error} --out_dir={args.out_dir}: {e}")
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    dataset = checkpoint_dataset(checkpoint)
    val = split_tokens(dataset, "val")
    samples = prepare_samples(model, split_tokens(dataset, "train"), args.nsamples, args.seqlen or None, args.seed)

    def score(m):
        return evaluate(m, val, max_tokens=args.eval_tokens, device=device, progress=False)["loss"]

    fp = score(model)
    rows = [dict(setting="full precision", granularity="-", alpha=None, loss=fp, bits_per_weight=32.0)]
    print(f"full precision: val loss {fp:.4f}", flush=True)
    for granularity in granularities:
        quantized, records = w8a8(model, granularity, args.bits)
        rows.append(dict(setting=f"W{args.bits}A{args.bits}", granularity=granularity, alpha=None,
                         loss=score(quantized), bits_per_weight=bits_per_weight(records)))
        print(f"W{args.bits}A{args.bits} {granularity}: val loss {rows[-1]['loss']:.4f}", flush=True)
        for alpha in alphas:
            smoothed = copy.deepcopy(model)
            smooth_model(smoothed, samples, alpha, device=device)
            quantized, records = w8a8(smoothed, granularity, args.bits)
            rows.append(dict(setting=f"W{args.bits}A{args.bits} SmoothQuant", granularity=granularity, alpha=alpha,
                             loss=score(quantized), bits_per_weight=bits_per_weight(records)))
            print(f"W{args.bits}A{args.bits} SmoothQuant alpha {alpha} {granularity}: val loss {rows[-1]['loss']:.4f}",
                  flush=True)
    print(f"\n{args.out_dir}; activations at {', '.join(LINEAR_INPUT_SITES)}; calibration {args.nsamples} samples; "
          f"{device}\n")
    print("| setting | activations | alpha | bits/weight | val loss | vs full precision |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        alpha = "-" if r["alpha"] is None else f"{r['alpha']:g}"
        print(f"| {r['setting']} | {r['granularity']} | {alpha} | {r['bits_per_weight']:.3f} | {r['loss']:.4f} | "
              f"{r['loss'] - fp:+.4f} |")
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
