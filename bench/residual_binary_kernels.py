"""Batch-1 speed of residual binary weights (k sign matrices packed 32 to an int32) against a dense matmul.

    python bench/residual_binary_kernels.py --device=cpu    # bitwise PyTorch path vs the dequantized fp32 matmul
    python bench/residual_binary_kernels.py --device=cuda   # Triton bitwise GEMV vs cuBLAS bf16 (triton do_bench)

Every timed path is first checked against the dequantize path of quantizers.py (the reference). On the GPU a few
block shapes of the kernel are timed and the fastest is reported beside the others.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from quantization.binary_linear import ResidualBinaryLinear  # noqa: E402
from quantization.quantizers import QuantSpec, dequantize, quantize_tensor  # noqa: E402

# (BLOCK_N output rows, BLOCK_W words of 32 inputs, warps) tried on the GPU
CONFIGS = [(8, 4, 4), (16, 4, 4), (16, 8, 4), (32, 4, 4), (32, 8, 8), (8, 8, 2), (64, 2, 4)]


def build(out_features, in_features, terms, granularity, group_size, device):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    spec = QuantSpec("residual_binary_quant", granularity=granularity, group_size=group_size, binary_terms=terms)
    codes, scale, zero_point = quantize_tensor(w, spec)
    module = ResidualBinaryLinear.from_quantized(codes, scale, spec).to(device)
    return module, dequantize(codes, scale, zero_point, spec).to(device), codes, scale, zero_point, spec


def cpu_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_cpu(args):
    torch.set_num_threads(args.threads)
    rows = []
    for terms in args.terms:
        module, weight, codes, scale, zero_point, spec = build(args.out_features, args.in_features, terms,
                                                               args.granularity, args.group_size, "cpu")
        x = torch.randn(1, args.in_features)
        ref = x.double() @ weight.double().T
        with torch.no_grad():
            assert torch.allclose(module(x).double(), ref, atol=1e-3, rtol=1e-4), "bitwise path disagrees"
            paths = {"bitwise (packed bits, PyTorch)": lambda: module(x),
                     "dense fp32 matmul (weight dequantized ahead)": lambda: x @ weight.T,
                     "dequantize each call + fp32 matmul": lambda: x @ dequantize(codes, scale, zero_point, spec).T}
            for name, fn in paths.items():
                reps = args.reps if name.startswith(("bitwise", "dense")) else min(args.reps, 3)  # seconds a call
                rows.append((terms, name, cpu_time(fn, reps) * 1e6))
    dense = {t: us for t, name, us in rows if name.startswith("dense")}
    print(f"CPU, {args.threads} thread(s), batch 1, {args.out_features}x{args.in_features}, {args.granularity}, "
          f"median of {args.reps}\n")
    print("| terms | path | us | vs dense fp32 |\n|---:|---|---:|---:|")
    for terms, name, us in rows:
        print(f"| {terms} | {name} | {us:.0f} | {dense[terms] / us:.2f}x |")


def bench_cuda(args):
    import triton.testing

    from quantization.kernels.binary_bitwise import residual_binary_gemv, stack_terms
    print(f"{torch.cuda.get_device_name()}, batch 1, {args.out_features}x{args.in_features}, {args.granularity}, "
          f"triton.testing.do_bench median (us)\n")
    print("| terms | path | us | vs cuBLAS bf16 | weight MB |\n|---:|---|---:|---:|---:|")
    for terms in args.terms:
        module, weight, *_ = build(args.out_features, args.in_features, terms, args.granularity, args.group_size,
                                   "cuda")
        x = torch.randn(1, args.in_features, device="cuda")
        words, scales = stack_terms(module)
        x16, w16 = x.bfloat16(), weight.bfloat16()
        ref = (x.double() @ weight.double().T).float()

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.5])[0] * 1e3

        cublas = bench(lambda: torch.nn.functional.linear(x16, w16))
        timed = []
        for block_n, block_w, warps in CONFIGS:
            y = residual_binary_gemv(x, words, scales, block_n, block_w, warps)
            err = (y - ref).abs().max().item()
            assert err < 1e-3 * ref.abs().max().item() + 1e-4, f"kernel {block_n, block_w, warps} error {err}"
            us = bench(lambda: residual_binary_gemv(x, words, scales, block_n, block_w, warps))
            timed.append((us, block_n, block_w, warps))
        timed.sort()
        print(f"| {terms} | cuBLAS bf16 (F.linear) | {cublas:.1f} | 1.00x | {w16.numel() * 2 / 1e6:.1f} |")
        packed_mb = (words.numel() * 4 + scales.numel() * 4) / 1e6
        for us, block_n, block_w, warps in timed[:3]:
            print(f"| {terms} | Triton bitwise, BLOCK_N={block_n} BLOCK_W={block_w} warps={warps} | {us:.1f} | "
                  f"{cublas / us:.2f}x | {packed_mb:.1f} |")
        with torch.no_grad():
            pt = bench(lambda: module(x))
        print(f"| {terms} | PyTorch bitwise path on the GPU (reference) | {pt:.1f} | {cublas / pt:.2f}x | "
              f"{packed_mb:.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out_features", type=int, default=4096)
    p.add_argument("--in_features", type=int, default=4096)
    p.add_argument("--terms", type=int, nargs="+", default=[1, 2])
    p.add_argument("--granularity", default="per_channel", choices=("per_channel", "per_group"))
    p.add_argument("--group_size", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--reps", type=int, default=20, help="CPU repetitions")
    args = p.parse_args()
    if args.granularity == "per_group" and args.group_size <= 0:
        sys.exit("residual_binary_kernels.py: error: --group_size: must be > 0 with --granularity=per_group")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("residual_binary_kernels.py: error: --device=cuda: no CUDA device")
    bench_cuda(args) if args.device == "cuda" else bench_cpu(args)


if __name__ == "__main__":
    main()
