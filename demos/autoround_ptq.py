"""Post-training quantization of a full-precision checkpoint: AutoRound by default (or GPTQ, or round-to-nearest),
saved as a packed quantized checkpoint beside the original, then scored on the validation split.

    python demos/autoround_ptq.py --out_dir=out --bits=4 --group_size=32 --iters=200 --nsamples=128 --seqlen=256
    python quantization/perplexity.py --out_dir=out --quantized_dir=out-autoround
    python sample.py --out_dir=out-autoround
"""
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoint import checkpoint_dataset, load_checkpoint  # noqa: E402
from configurator import BoolFlag, OneLineParser  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantization.autoround import AutoRound  # noqa: E402
from quantization.autoround.calibration import prepare_samples  # noqa: E402
from quantization.awq import AWQ  # noqa: E402
from quantization.channel_stats import sensitivity_scales  # noqa: E402
from quantization.gptq import GPTQ  # noqa: E402
from quantization.packing import is_packed, save_packed  # noqa: E402
from quantization.perplexity import evaluate, split_tokens, text_tokens  # noqa: E402
from quantization.quantizers import MAX_OUTLIER_FRACTION  # noqa: E402
from quantization.rtn import (SITES, bits_per_weight, check_layers, rtn_quantize, target_layers,  # noqa: E402
                              weight_spec)
from safety import check_device, check_output_file, finite_float, same_file  # noqa: E402
from tokenizer import Tokenizer, load_meta  # noqa: E402

METHODS = ("autoround", "gptq", "rtn", "awq", "awq+gptq", "awq+autoround")  # awq: AWQ scales, then RTN


def add_ptq_flags(p):
    p.add_argument("--out_dir", default="out", help="folder holding the full-precision ckpt.pt")
    p.add_argument("--bits", type=int, default=4, help="weight bits (2..8)")
    p.add_argument("--group_size", type=int, default=32, help="input columns per scale (0: one per output channel)")
    p.add_argument("--sym", action=BoolFlag, default=False, help="symmetric codes (no zero point)")
    p.add_argument("--iters", type=int, default=200, help="AutoRound steps per block (0: round to nearest)")
    p.add_argument("--lr", type=finite_float, default=0.0, help="AutoRound SignSGD learning rate (0: 1/iters)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples")
    p.add_argument("--seqlen", type=int, default=0, help="tokens per calibration sample (0: the model's block_size)")
    p.add_argument("--batch_size", type=int, default=8, help="calibration samples per step")
    p.add_argument("--sites", default=",".join(SITES), help="comma-separated linear sites to quantize")
    p.add_argument("--calib_file", default=None, help="calibrate on this text file (default: the train split)")
    p.add_argument("--damp_percent", type=finite_float, default=0.01, help="GPTQ: dampening, a fraction of mean(diag H)")
    p.add_argument("--act_order", action=BoolFlag, default=False, help="GPTQ: columns by decreasing Hessian diagonal")
    p.add_argument("--true_sequential", action=BoolFlag, default=True, help="GPTQ: quantize a block's layers in order")
    p.add_argument("--eval_tokens", type=int, default=0, help="score only this many validation tokens (0: all)")
    p.add_argument("--eval_batch_size", type=int, default=16, help="windows per forward pass when scoring")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--seed", type=int, default=0, help="random seed of the calibration draw and AutoRound")
    p.add_argument("--progress", action=BoolFlag, default=True, help="progress bars")
    p.add_argument("--overwrite", action=BoolFlag, default=False, help="replace an existing result")
    p.add_argument("--outlier_fraction", type=finite_float, default=0.0,
                   help="share of each weight kept full precision as sparse outliers, in [0, 0.5)")
    p.add_argument("--outlier_criterion", default="magnitude", choices=("magnitude", "sensitivity"),
                   help="outliers by |w|, or by |w| times the input channel's activation RMS on calibration data")
    p.add_argument("--awq_grid", type=int, default=20, help="AWQ: alphas tried per folding point (grid over [0, 1])")
    return p


def load_full_precision(out_dir, device):
    """(model, checkpoint, tokenizer) of a full-precision checkpoint; ValueError if it is already quantized."""
    checkpoint = load_checkpoint(out_dir, device)
    args = checkpoint["model_args"]
    if is_packed(checkpoint):
        raise ValueError(f"{out_dir} is already quantized ({checkpoint['ptq'].get('method', 'ptq')}, "
                         f"{checkpoint['ptq'].get('bits', '?')} bits); quantize its full-precision original")
    variants = {v for v in args.get("linear_variants", {}).values()} - {"linear"}
    if variants or args.get("act_quant") or args.get("embedding_quant"):
        raise ValueError(f"{out_dir} is already quantized (trained with quantization: {', '.join(variants) or 'act'}); "
                         f"post-training quantization needs a full-precision checkpoint")
    model = GPT(GPTConfig(**args))
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    dataset = checkpoint_dataset(checkpoint)
    checkpoint["dataset"] = dataset
    return model, checkpoint, Tokenizer(load_meta(os.path.join(ROOT, "data", dataset)))


def make_quantizer(method, model, calibration, args, device):
    """A ready AutoRound / GPTQ runner, or a round-to-nearest stand-in with the same quantize(); "awq+<method>"
    (plain "awq": AWQ then RTN) folds AWQ's scales first. With --outlier_criterion=sensitivity, quantize() first
    measures each input channel's activation RMS on the calibration samples (after AWQ's folding)."""
    sites = tuple(s for s in args.sites.split(",") if s)
    fraction = getattr(args, "outlier_fraction", 0.0)
    spec = weight_spec(args.bits, args.group_size, args.sym, fraction)
    awq, _, base = method.partition("+") if method.startswith("awq") else ("", "", method)
    base = base or "rtn"
    common = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, nsamples=args.nsamples,
                  seqlen=args.seqlen or None, batch_size=args.batch_size, sites=sites, device=device, seed=args.seed,
                  progress=args.progress)
    if base == "autoround":
        quantizer = AutoRound(model, calibration, iters=args.iters, lr=args.lr or None, outlier_fraction=fraction,
                              **common)
    elif base == "gptq":
        quantizer = GPTQ(model, calibration, damp_percent=args.damp_percent, act_order=args.act_order,
                         true_sequential=args.true_sequential, outlier_fraction=fraction, **common)
    else:
        check_layers(target_layers(model, sites), spec)

        class RTN:
            block_losses, act_scales = [], None

            def quantize(self):
                return rtn_quantize(model, spec, sites, self.act_scales)
        quantizer = RTN()
    scaler = AWQ(model, calibration, spec, grid=args.awq_grid, nsamples=args.nsamples, seqlen=args.seqlen or None,
                 batch_size=args.batch_size, device=device, seed=args.seed, progress=args.progress) if awq else None
    sensitivity = fraction > 0 and getattr(args, "outlier_criterion", "magnitude") == "sensitivity"

    class Pipeline:
        block_losses = quantizer.block_losses

        def quantize(self):
            if scaler is not None:
                scaler.apply()
            if sensitivity:
                samples = prepare_samples(model, calibration, args.nsamples, args.seqlen or None, args.seed)
                quantizer.act_scales = sensitivity_scales(model, samples, args.batch_size, device, sites)
            return quantizer.quantize()
    return Pipeline()


def check_args(args):
    for name, low in (("group_size", 0), ("seqlen", 0), ("eval_tokens", 0), ("seed", 0)):
        if not low <= getattr(args, name) <= 2 ** 31 - 1:
            raise ValueError(f"{name}={getattr(args, name)}: must be an integer in {low}..{2 ** 31 - 1}")
    for name in ("lr", "damp_percent"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise ValueError(f"{name}={getattr(args, name)}: must be a finite number >= 0")
    try:
        check_device(args.device)
    except ValueError as e:
        raise ValueError(f"device={args.device}: {e}") from None
    if args.iters < 0:
        raise ValueError(f"iters={args.iters}: must be 0 (round to nearest) or more")
    if args.nsamples < 1:
        raise ValueError(f"nsamples={args.nsamples}: must be at least 1")
    if args.batch_size < 1:
        raise ValueError(f"batch_size={args.batch_size}: must be at least 1")
    if args.eval_batch_size < 1:
        raise ValueError(f"eval_batch_size={args.eval_batch_size}: must be at least 1")
    weight_spec(args.bits, args.group_size, args.sym)  # bits and group size
    if not 0.0 <= args.outlier_fraction < MAX_OUTLIER_FRACTION:
        raise ValueError(f"outlier_fraction={args.outlier_fraction}: must be a fraction in [0, {MAX_OUTLIER_FRACTION})")
    if args.awq_grid < 1:
        raise ValueError(f"awq_grid={args.awq_grid}: must be at least 1")


def calibration_tokens(args, checkpoint, tokenizer):
    if args.calib_file:
        return text_tokens(args.calib_file, tokenizer)
    return split_tokens(checkpoint["dataset"], "train")


def main(argv=None):
    p = OneLineParser(prog="autoround_ptq.py", description="Post-training quantization of a checkpoint.")
    add_ptq_flags(p)
    p.add_argument("--method", default="autoround", choices=METHODS, help="quantization method")
    p.add_argument("--quantized_dir", default=None, help="where to save (default: <out_dir>-<method>)")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    quantized_dir = args.quantized_dir or f"{os.path.normpath(args.out_dir)}-{args.method}"
    try:
        check_args(args)
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    from inference import resolve_device
    device, _ = resolve_device(args.device, "float32")
    torch.backends.cuda.matmul.allow_tf32 = True
    # the result never replaces its source, whatever links lie between them, nor an earlier result unasked
    source = args.out_dir if os.path.isfile(args.out_dir) else os.path.join(args.out_dir, "ckpt.pt")
    try:
        if same_file(quantized_dir, args.out_dir):
            raise ValueError("is the folder of the original checkpoint; it would be replaced")
        check_output_file(os.path.join(quantized_dir, "ckpt.pt"), [source, args.calib_file], args.overwrite)
    except ValueError as e:
        sys.exit(f"{error} --quantized_dir={quantized_dir}: {e}")
    try:
        model, checkpoint, tokenizer = load_full_precision(args.out_dir, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{error} --out_dir={args.out_dir}: {e}")
    try:
        calibration = calibration_tokens(args, checkpoint, tokenizer)
        quantizer = make_quantizer(args.method, model, calibration, args, device)
    except OSError as e:
        sys.exit(f"{error} --calib_file={args.calib_file}: {e.strerror}")
    except ValueError as e:
        sys.exit(f"{error} --{e}")
    val = split_tokens(checkpoint["dataset"], "val")
    fp = evaluate(model, val, batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device,
                  progress=args.progress)
    print(f"full precision: val loss {fp['loss']:.4f}, perplexity {fp['perplexity']:.2f}")
    t0 = time.time()
    records = quantizer.quantize()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.time() - t0
    q = evaluate(model, val, batch_size=args.eval_batch_size, max_tokens=args.eval_tokens, device=device,
                 progress=args.progress)
    info = dict(method=args.method, bits=args.bits, group_size=args.group_size, sym=args.sym, iters=args.iters,
                nsamples=args.nsamples, seqlen=args.seqlen or model.config.block_size, seconds=seconds,
                val_loss=q["loss"], base_val_loss=fp["loss"], outlier_fraction=args.outlier_fraction,
                outlier_criterion=args.outlier_criterion, bits_per_weight=bits_per_weight(records))
    save_packed(os.path.join(quantized_dir, "ckpt.pt"), checkpoint, model, records, info)
    print(f"{args.method} W{args.bits} g{args.group_size or 'channel'} outliers {100 * args.outlier_fraction:g}%: "
          f"{bits_per_weight(records):.3f} bits/weight, quantized in {seconds:.1f}s, saved {quantized_dir}/ckpt.pt")
    print(f"quantized perplexity: {q['perplexity']:.2f} (full precision {fp['perplexity']:.2f})")
    return fp, q, records


if __name__ == "__main__":
    main()
