"""Where a Gluon GEMM config's product goes wrong, from two weights whose product is known by heart (one CUDA GPU
with Hopper's Gluon API; int4 codes, one scale of 1 a column, zero point 0, 256 rows, 256 inputs, 64 outputs):

- identity: weight w[n, k] = 1 where k == n, x[m, k] = 1 where k == m % 64, so y[m, n] = 1 where n == m % 64. For the
  first rows m it prints (the output holding row m's largest value, the row's sum) and how many outputs of each
  row are not 0: a wrong word, field or row of x shows where it lands;
- one column: w[n, 5] = 1 for every output, x random, so every output is x[:, 5]; it prints each output's largest
  difference from x[:, 5] and which input column of x each output follows most closely (with that correlation).

A config the launcher's list holds first (the dequantize partitions) is the reference run beside the asked ones.

    python bench/gluon_pattern_probe.py --configs=128x64x64x4x8x0x0x3
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quantization.kernels import gluon_gemm  # noqa: E402

M, K, N = 256, 256, 64


def pack(codes):
    """(N, K) int4 codes as the project's words (K / 8, N): code f of word row r is input 8 r + f."""
    words = torch.zeros(K // 8, N, dtype=torch.int32)
    for f in range(8):
        words |= codes[:, f::8].T.contiguous() << (4 * f)
    return words


def patterns(config, device):
    """The two tests' printed lines for one config."""
    scale = torch.ones(1, N, device=device)
    eye = torch.zeros(N, K, dtype=torch.int32)
    eye[torch.arange(N), torch.arange(N)] = 1
    x = torch.zeros(M, K)
    x[torch.arange(M), torch.arange(M) % N] = 1
    y = gluon_gemm.gluon_mm(x.to(device, torch.bfloat16), pack(eye).to(device), scale, None, None, 4, K // 32, 0.0,
                            config).float().cpu()
    lines = [f"{config} identity x identity: rows m -> (argmax n, sum)",
             "   " + str([(int(y[m].argmax()), round(float(y[m].sum()), 2)) for m in range(24)]),
             "   nonzeros per row (first 16): " + str([int((y[m] != 0).sum()) for m in range(16)])]
    column = torch.zeros(N, K, dtype=torch.int32)
    column[:, 5] = 1
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = gluon_gemm.gluon_mm(x.to(device), pack(column).to(device), scale, None, None, 4, K // 32, 0.0,
                            config).float().cpu()
    x = x.float()
    corr = (y.T @ x) / (y.norm(dim=0)[:, None] * x.norm(dim=0)[None, :] + 1e-9)
    lines += ["   column-5 weights: max |y[:, n] - x[:, 5]| per n (first 8): "
              + str([round(float((y[:, n] - x[:, 5]).abs().max()), 3) for n in range(8)]),
              "   best k per n (first 8): " + str(corr.abs().argmax(1)[:8].tolist()) + " "
              + str([round(v, 2) for v in corr.abs().max(1).values[:8].tolist()])]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", default="x".join(map(str, gluon_gemm.CONFIGS[-1])),
                   help="comma-separated Gluon configs, their numbers joined by x (gluon_gemm.CONFIGS)")
    args = p.parse_args(argv)
    try:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",") if c]
    except ValueError:
        sys.exit(f"gluon_pattern_probe.py: error: --configs={args.configs!r}: expected configs of numbers joined by x, "
                 "e.g. 128x64x64x4x8x0x0x3")
    if gluon_gemm.gluon is None or not torch.cuda.is_available():
        sys.exit("gluon_pattern_probe.py: error: needs a CUDA GPU and Triton's Gluon Hopper API")
    for config in [gluon_gemm.CONFIGS[0]] + configs:
        print("\n".join(patterns(config, torch.device("cuda"))))


if __name__ == "__main__":
    main()
