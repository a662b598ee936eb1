"""Generate text from a checkpoint (any linear variant and quantization method)."""
import os
import sys
import torch

from checkpoint import load_checkpoint
from configurator import BoolFlag, OneLineParser
from model import GPT, GPTConfig
from tokenizer import Tokenizer, load_meta

ROOT = os.path.dirname(os.path.abspath(__file__))


def build_parser():
    p = OneLineParser(prog="sample.py", description="Generate text from a nanoQAT checkpoint.")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=3, help="samples to draw")
    p.add_argument("--max_new_tokens", type=int, default=300, help="tokens generated per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="<1 sharper, >1 more random")
    p.add_argument("--top_k", type=int, default=200, help="keep only the k most likely tokens")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="float32, bfloat16 or float16; auto picks for the device")
    p.add_argument("--compile", action=BoolFlag, default=False, help="torch.compile the model")
    return p


def load_model(out_dir, device):
    """The model of a checkpoint, in eval mode with its quantizers on, and the tokenizer of its data.
    A packed quantized checkpoint (quantization/packing.py) is dequantized into the model."""
    from quantization.packing import is_packed, load_packed
    checkpoint = load_checkpoint(out_dir, device)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    if is_packed(checkpoint):
        load_packed(model, checkpoint)
    else:
        model.load_state_dict(checkpoint["model"])
    model.set_quantization(checkpoint.get("quantization_enabled", True))
    model.eval().to(device)
    dataset = checkpoint.get("dataset") or checkpoint.get("config", {}).get("dataset", "shakespeare_char")
    return model, Tokenizer(load_meta(os.path.join(ROOT, "data", dataset)))


def main(argv=None):
    args = build_parser().parse_args(argv)
    from train import autocast_context, resolve_device
    device, dtype = resolve_device(args.device, args.dtype)
    torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_model(args.out_dir, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"sample.py: error: --out_dir={args.out_dir}: {e}")
    if args.compile:
        model = torch.compile(model)
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
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    with torch.no_grad(), autocast_context(device, dtype):
        for _ in range(args.num_samples):
            y = model.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
            print(tokenizer.decode(y[0].tolist()))
            print("---------------")


if __name__ == "__main__":
    main()
