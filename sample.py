"""Generate text from a checkpoint (any linear variant and quantization method)."""
import math
import sys
import torch

from cli import BoolFlag, OneLineParser
from generate import generate
from inference import (KERNEL_CHOICES, autocast_context, freeze_quantized_weights, fuse_gelu, fuse_norms, fuse_qkv,
                       load_model, resolve_device)
from safety import check_device, finite_float


def build_parser():
    p = OneLineParser(prog="sample.py", description="Generate text from a nanoQAT checkpoint.")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=3, help="samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=300, help="tokens generated per sample")
    p.add_argument("--temperature", type=finite_float, default=0.8, help="<1 sharper, >1 more random, 0 greedy")
    p.add_argument("--top_k", type=top_k, default=200, help="keep only the k most likely tokens (None: all)")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="float32, bfloat16 or float16; auto picks for the device")
    p.add_argument("--compile", action=BoolFlag, default=False,
                   help="torch.compile the one-token decode step (CUDA graphs on the GPU)")
    p.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="packed checkpoints: keep the weights packed and run the packed kernels (auto: on CUDA)")
    p.add_argument("--cache", action=BoolFlag, default=True,
                   help="decode through the KV cache (--no-cache: recompute the whole context for each token)")
    return p


def top_k(value):
    return None if value.lower() == "none" else int(value)


def check_args(args):
    """The first bad flag as 'flag=value: what was expected', or None."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        return f"--temperature={args.temperature}: expected a finite number >= 0 (0: greedy)"
    if args.top_k is not None and args.top_k < 1:
        return f"--top_k={args.top_k}: expected at least 1, or None to keep every token"
    for name in ("num_samples", "max_new_tokens"):
        if not 1 <= getattr(args, name) <= 2 ** 31 - 1:
            return f"--{name}={getattr(args, name)}: expected an integer in 1..{2 ** 31 - 1}"
    if not 0 <= args.seed < 2 ** 63:
        return f"--seed={args.seed}: expected an integer in 0..2**63-1"
    if args.start == "":
        return "--start: empty; give at least one character (the default is a newline)"
    try:
        check_device(args.device)
    except ValueError as e:
        return f"--device={args.device}: {e}"
    return None


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    error = check_args(args)
    if error:
        parser.error(error)
    device, dtype = resolve_device(args.device, args.dtype)
    torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_model(args.out_dir, device, kernels=args.kernels)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"sample.py: error: --out_dir={args.out_dir}: {e}")
    freeze_quantized_weights(model)
    fuse_qkv(model)  # one matmul (or packed kernel) for q, k and v where the three layers can be joined
    fuse_gelu(model)  # packed up projections apply the GELU in their kernel
    fuse_norms(model)  # and, at batch 1 on wide models, the LayerNorm before them and the residual add after
    start = args.start
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            sys.exit(f"sample.py: error: --start={args.start}: {e.strerror}")
    try:
        ids = tokenizer.encode(start)
    except ValueError as e:
        sys.exit(f"sample.py: error: --start: {e}")
    if not ids:
        sys.exit(f"sample.py: error: --start={args.start}: the prompt is empty")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    with torch.no_grad(), autocast_context(device, dtype):
        for _ in range(args.num_samples):
            y = generate(model, x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               use_cache=args.cache, compile=args.compile)
            print(tokenizer.decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    main()
