"""Residual binary (k = 2) on a GPU, the two kernels of an attached layer against each other and against the bit
operations: greedy tokens of a random-weight GPT-2 124M RB2 model (bench/decode.py's build), cached (one row a
step: the bitwise GEMV), eager and compiled, against the uncached forward (every step many rows: the dequantized
weight and cuBLAS), in float32 and bfloat16; then one layer's 16 rows both ways against the PyTorch bit operations
(relative error).

    python bench/residual_binary_check.py
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)
from decode import build  # noqa: E402
from generate import generate  # noqa: E402


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("residual_binary_check.py: error: needs a CUDA GPU that torch can see")
    for dtype in (torch.float32, torch.bfloat16):
        model = build("gpt2_124m", "RB2", "cuda", dtype, 50304, 1024)
        torch.manual_seed(1)
        prompt = torch.randint(50304, (1, 16), device="cuda")
        ref = generate(model, prompt, 24, temperature=0, use_cache=False)  # every step through the many-rows path
        for compile in (False, True):
            tok = generate(model, prompt, 24, temperature=0, compile=compile)
            print(dtype, "compile" if compile else "eager", "agree",
                  (tok[:, 16:] == ref[:, 16:]).float().mean().item(), flush=True)
        layer = model.transformer.h[0].mlp.mlp_up
        x = torch.randn(16, 768, device="cuda", dtype=dtype)
        rows = layer(x).float()
        one = torch.cat([layer(x[i:i + 1]) for i in range(16)]).float()
        gemv, layer.gemv = layer.gemv, None
        bitops = layer(x.float()).float()
        layer.gemv = gemv
        print(dtype, "rows vs bit ops", ((rows - bitops).norm() / bitops.norm()).item(), "gemv vs bit ops",
              ((one - bitops).norm() / bitops.norm()).item(), flush=True)


if __name__ == "__main__":
    main()
