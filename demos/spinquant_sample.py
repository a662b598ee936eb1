"""Generate text from a SpinQuant checkpoint (or any nanoQAT checkpoint): its rotations, online Hadamard and
activation quantizers are in its config, so the loaded model computes what was measured.

    python demos/spinquant_sample.py --ckpt=spinquant_out/ckpt_spinquant.pt --prompt="ROMEO." --max_new_tokens=100
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from inference import load_checkpoint  # noqa: E402
from cli import OneLineParser  # noqa: E402
from generate import generate  # noqa: E402
from quantization.hf import from_pretrained  # noqa: E402
from safety import finite_float  # noqa: E402
from tokenizer import Tokenizer, load_meta  # noqa: E402


def main(argv=None):
    p = OneLineParser(prog="spinquant_sample.py", description="Sample from a SpinQuant checkpoint.")
    p.add_argument("--ckpt", default="spinquant_out/ckpt_spinquant.pt", help="checkpoint file, or its folder")
    p.add_argument("--prompt", default="\n", help="prompt text")
    p.add_argument("--max_new_tokens", type=int, default=100, help="tokens to generate")
    p.add_argument("--temperature", type=finite_float, default=0.8, help="<1 sharper, >1 more random")
    p.add_argument("--top_k", type=int, default=200, help="keep only the k most likely tokens")
    p.add_argument("--seed", type=int, default=1337, help="random seed")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    args = p.parse_args(argv)
    error = f"{p.prog}: error:"
    if args.max_new_tokens < 1:
        sys.exit(f"{error} --max_new_tokens={args.max_new_tokens}: must be at least 1")
    if args.temperature <= 0:
        sys.exit(f"{error} --temperature={args.temperature}: must be positive")
    try:
        checkpoint = load_checkpoint(args.ckpt)
        model = from_pretrained(args.ckpt).to(args.device).eval()
        tokenizer = Tokenizer(load_meta(os.path.join(ROOT, "data", checkpoint.get("dataset", "shakespeare_char"))))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"{error} --ckpt={args.ckpt}: {e}")
    try:
        ids = tokenizer.encode(args.prompt)
    except ValueError as e:
        sys.exit(f"{error} --prompt: {e}")
    torch.manual_seed(args.seed)
    x = torch.tensor(ids, dtype=torch.long, device=args.device)[None]
    y = generate(model, x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    print(tokenizer.decode(y[0].tolist()))


if __name__ == "__main__":
    main()
