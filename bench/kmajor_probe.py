"""Probe: the one-row kernel over K-major words (triton_kernels._kmajor_gemv_kernel) against the launcher's
choice over N-major words, cuBLAS bf16 and tinygemm, int4 g128 (and int8, int2, 1-bit), one row, graph replays
over copies of the weights (3x the L2), as bench/kernels.py times. Also checks each K-major config against the
float64 reference.

    python bench/kmajor_probe.py --shapes=768x3072,768x768 --out=probe.md
"""
import argparse
import copy
import itertools
import math
import os
import sys

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quantization.kernels import PackedLinear, ops, triton_kernels  # noqa: E402
from quantization.kernels.tinygemm import TinyGemmLinear  # noqa: E402
from quantization.quantizers import QuantSpec  # noqa: E402

SPECS = {"int4 g128": QuantSpec("affine_quant", 4, "per_group", 128),
         "int8 per channel": QuantSpec("symmetric_quant", 8, "per_channel"),
         "int2 g128": QuantSpec("affine_quant", 2, "per_group", 128),
         "1-bit per channel": QuantSpec("binary_quant", 8, "per_channel")}
# (BLOCK_N, BLOCK_B, num_warps, N_FAST)
CONFIGS = [(bn, bb, w, 1) for bn, bb, w in itertools.product((16, 32, 64), (4, 8, 32), (2, 4, 8))] + \
          [(bn, bb, w, 0) for bn, bb, w in itertools.product((2, 4, 8), (8, 32), (2, 4, 8))]


def kmajor(x, wk, scale, zero, bias, bits, blocks_per_group, zero_const, config):
    block_n, block_b, warps, n_fast = config
    k = x.shape[1]
    n = wk.shape[0]
    y = torch.empty((1, n), device=x.device, dtype=x.dtype)
    triton_kernels._kmajor_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, wk, scale, zero if zero is not None else scale, bias if bias is not None else scale, y, n, k,
        wk.stride(0), blocks_per_group, BITS=bits, HAS_ZERO=zero is not None, ZERO=zero_const,
        HAS_BIAS=bias is not None, EVEN=k % (32 * block_b) == 0, BLOCK_N=block_n, BLOCK_B=block_b, N_FAST=bool(n_fast),
        num_warps=warps)
    return y


def graph_us(calls):
    for c in calls:
        c()
    return ops.replay_time(calls, warmup=25, rep=200) * 1e3


def copies_for(nbytes):
    return max(2, min(512, math.ceil(3 * 50 * 2**20 / nbytes)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="768x3072,768x2304,768x768,3072x768,4096x4096,4096x11008")
    p.add_argument("--specs", default="int4 g128")
    p.add_argument("--out", default="kmajor_probe.md")
    args = p.parse_args()
    lines = [f"# K-major one-row kernel probe: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}", ""]

    def log(s):
        print(s, flush=True)
        lines.append(s)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        torch.manual_seed(0)
        weight = torch.randn(n, k, device="cuda") * 0.02
        count = copies_for(n * k * 2)
        ws = [weight.bfloat16() for _ in range(count)]
        xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
        t_bf16 = graph_us([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)])
        del ws
        log(f"## {shape}: cuBLAS bf16 {t_bf16:.2f} us")
        for name in args.specs.split(","):
            layer = PackedLinear.from_float(weight, SPECS[name]).cuda()
            nbytes = layer.qweight.numel() * 4 + layer.scale.numel() * 4
            count = copies_for(nbytes)
            layers = [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]
            xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
            if name == "int4 g128":
                tinies = [TinyGemmLinear.from_packed(lay) for lay in layers]
                t_tiny = graph_us([lambda t=t, x=x: t(x) for t, x in zip(tinies, xs)])
                del tinies
            else:
                t_tiny = float("nan")
            layers[0](xs[0])  # tunes
            choice = f"{ops.last_choice.get('kernel')} {ops.last_choice.get('config')}"
            t_ours = graph_us([lambda lay=lay, x=x: lay(x) for lay, x in zip(layers, xs)])
            log(f"### {shape} {name}: tinygemm {t_tiny:.2f} us, ours N-major {t_ours:.2f} us ({choice})")
            wks = [lay.qweight.t().contiguous() for lay in layers]
            blocks = layer.group_size // 32 if layer.group_size else math.ceil(k / 32)
            ref = (xs[0].double() @ layer.dequantized_weight().double().t())
            results = []
            for config in CONFIGS:
                try:
                    y = kmajor(xs[0], wks[0], layer.scale, layer.zero, None, layer.bits, blocks, layer.zero_const,
                               config)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    t = graph_us([lambda lay=lay, wk=wk, x=x: kmajor(x, wk, lay.scale, lay.zero, None, lay.bits,
                                                                      blocks, lay.zero_const, config)
                                  for lay, wk, x in zip(layers, wks, xs)])
                except Exception as e:
                    log(f"  {config}: failed {type(e).__name__} {str(e)[:80]}")
                    continue
                results.append((t, config, err))
            results.sort()
            for t, config, err in results[:6]:
                log(f"  K-major {config}: {t:.2f} us ({t_tiny / t:.2f}x tinygemm, {t_ours / t:.2f}x ours), "
                    f"error {err:.1e}")
            bad = [(c, e) for _, c, e in results if e > 1e-2]
            log(f"  configs {len(results)}, worst {results[-1][0]:.2f} us; errors over 1e-2: {bad}")
            del layers, wks


if __name__ == "__main__":
    main()
