"""Residual binary (k = 2) on a GPU, the two kernels of an attached layer against each other and against the bit
operations: greedy tokens of a random-weight GPT-2 124M RB2 model (as bench/decode.py builds it), cached (one row a
step: the bitwise GEMV), eager and compiled, against the uncached forward (every step many rows: the dequantized
weight and cuBLAS), in float32 and bfloat16; then one layer's 16 rows both ways against the PyTorch bit operations
(relative error).

    python bench/residual_binary_check.py
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generate import generate  # noqa: E402
from inference import fuse_qkv  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from quantization.quantizers import QuantSpec  # noqa: E402


def build(dtype):
    """A random-weight GPT-2 124M shape, every linear site residual binary k = 2 per channel with the kernels
    attached, q, k and v joined (as bench/decode.py's RB2 rows)."""
    from quantization.kernels import pack_model
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024, bias=True))
    model = pack_model(model.to(dtype).eval(), QuantSpec("residual_binary_quant", granularity="per_channel",
                                                          binary_terms=2))
    fuse_qkv(model)
    return model


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("residual_binary_check.py: error: needs a CUDA GPU that torch can see")
    for dtype in (torch.float32, torch.bfloat16):
        model = build(dtype)
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
