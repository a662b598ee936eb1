"""One layer at batch 1 through the one-row kernel (a fixed config) and through tinygemm, each called a few times,
for Nsight Compute to profile one call of each (the weights cold: ncu flushes the caches before each pass).

    ncu --kernel-name regex:_stream_gemv_kernel --launch-skip 3 --launch-count 1 --section WarpStateStats \
        python bench/ncu_one_row.py --shape=768x3072 --config=32,32,0,8,0
    ncu --kernel-name regex:tinygemm --launch-skip 3 --launch-count 1 ... python bench/ncu_one_row.py --shape=768x3072

`bash bench/inference_gpu.sh ncu_small` runs both on GPT-2's four layer shapes with the configs the launcher chose
(bench/results/kernels_h200_peer.md) and keeps the reports. Shapes are in x out.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quantization.kernels import PackedLinear, ops  # noqa: E402
from quantization.kernels.tinygemm import TinyGemmLinear  # noqa: E402
from quantization.quantizers import QuantSpec  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="768x3072", help="in x out")
    p.add_argument("--config", default="32,32,0,8,0", help="the one-row kernel's config (ops.STREAM_CONFIGS)")
    p.add_argument("--calls", type=int, default=4, help="calls of each kernel")
    args = p.parse_args(argv)
    try:
        k, n = map(int, args.shape.split("x"))
    except ValueError:
        sys.exit(f"ncu_one_row.py: error: --shape={args.shape!r}: expected IN x OUT, e.g. 768x3072")
    try:
        config = tuple(int(v) for v in args.config.split(","))
    except ValueError:
        config = ()
    if len(config) != 5:
        sys.exit(f"ncu_one_row.py: error: --config={args.config!r}: expected five comma-separated integers (BLOCK_N, "
                 f"BLOCK_B, split, warps, prefetch)")
    if args.calls < 1 or min(k, n) < 1:
        sys.exit(f"ncu_one_row.py: error: --calls={args.calls} --shape={args.shape}: expected at least one call and "
                 f"positive widths")
    if not torch.cuda.is_available():
        sys.exit("ncu_one_row.py: error: needs a CUDA GPU")
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda") * 0.02
    layer = PackedLinear.from_float(weight, QuantSpec("affine_quant", 4, "per_group", 128)).cuda()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    blocks = layer.group_size // 32
    for _ in range(args.calls):
        ops.stream_gemv(x, layer.qweight, layer.scale, layer.zero, None, layer.bits, blocks, layer.zero_const, config,
                        counters=layer.split_counters)
    tiny = TinyGemmLinear.from_packed(layer)
    for _ in range(args.calls):
        tiny(x)
    torch.cuda.synchronize()
    print(f"ncu_one_row.py: {args.shape}, config {config}: {args.calls} calls of each kernel")


if __name__ == "__main__":
    main()
