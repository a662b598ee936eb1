"""Post-training quantization of a full-precision checkpoint: AutoRound by default (or GPTQ, or round-to-nearest),
saved as a packed quantized checkpoint beside the original, then scored on the validation split.

    python demos/autoround_ptq.py --out_dir=out --bits=4 --group_size=32 --iters=200 --nsamples=128 --seqlen=256
    python quantization/perplexity.py --out_dir=out --quantized_dir=out-autoround
    python sample.py --out_dir=out-autoround
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cli import OneLineParser  # noqa: E402
from inference import resolve_device  # noqa: E402
from quantization.packing import save_packed  # noqa: E402
from quantization.perplexity import evaluate, split_tokens  # noqa: E402
from quantization.ptq import (PTQConfig, add_ptq_flags, calibration_tokens, check_args, check_method,  # noqa: E402
                              load_full_precision, make_quantizer, method_names)
from quantization.rtn import bits_per_weight  # noqa: E402
from safety import check_output_file, same_file  # noqa: E402

def main(argv=None):
    p = OneLineParser(prog="autoround_ptq.py", description="Post-training quantization of a checkpoint.")
    add_ptq_flags(p)
    p.add_argument("--method", default="autoround", help=f"quantization method: {', '.join(method_names())}")
    p.add_argument("--quantized_dir", default=None, help="where to save (default: <out_dir>-<method>)")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    quantized_dir = args.quantized_dir or f"{os.path.normpath(args.out_dir)}-{args.method}"
    try:
        check_method(args.method)
        check_args(args)
    except ValueError as e:
        sys.exit(f"{error} --{e}")
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
        quantizer = make_quantizer(args.method, model, calibration, PTQConfig.from_args(args, device=device))
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
                outlier_criterion=args.outlier_criterion, fp_target=args.fp_target,
                bits_per_weight=bits_per_weight(records))
    save_packed(os.path.join(quantized_dir, "ckpt.pt"), checkpoint, model, records, info)
    print(f"{args.method} W{args.bits} g{args.group_size or 'channel'} outliers {100 * args.outlier_fraction:g}%: "
          f"{bits_per_weight(records):.3f} bits/weight, quantized in {seconds:.1f}s, saved {quantized_dir}/ckpt.pt")
    print(f"quantized perplexity: {q['perplexity']:.2f} (full precision {fp['perplexity']:.2f})")
    return fp, q, records


if __name__ == "__main__":
    main()
