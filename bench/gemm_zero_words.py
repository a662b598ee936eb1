"""The GEMM's zero points as 32-bit words (ZWORDS) against uint8 loads, side by side in one run, every config.

    python bench/gemm_zero_words.py                                   # 16 rows on GPT-2 and 6.7B layers, 256 rows
    python bench/gemm_zero_words.py --rows=16 --shapes=768x3072,3072x768

`_gemm_kernel` reads an int4 g128 layer's uint8 zero points as the words that hold them when the output width is a
multiple of 4 and the zero points are 4-byte aligned (ops.gemm sets ZWORDS): Triton's software pipeline then copies
them to shared memory ahead of use like the other tiles (an asynchronous copy moves at least 4 bytes), where a
uint8 load stayed a synchronous load inside the loop in some configs (bench/kernel_sass.py --kernel=gemm counts the
copies). The "bytes" rows run the same kernel on a copy of the zero points one byte past an aligned address, so
ZWORDS is off. Each time is the median replay of a CUDA graph over copies of the layer (3x the L2 cache, so the
weights come from memory, as in bench/kernels.py), in microseconds; cuBLAS bf16 and dequant_mm (the weight
dequantized into a bf16 scratch, then cuBLAS) are timed in the same run. Shapes are `in x out`.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROTATE_BYTES = 3 * 50 * 2**20
# 256 rows: ops.GEMM_CONFIGS and these (narrower tiles, more programs per multiprocessor), none chosen by the launcher
EXTRA_256 = [(128, 64, 128, 4, 3, 0, 1), (128, 64, 64, 4, 4, 0, 1), (64, 64, 128, 4, 3, 0, 1), (128, 32, 128, 4, 3, 0, 1),
             (256, 64, 64, 8, 3, 0, 1), (128, 128, 64, 8, 4, 0, 1), (64, 128, 128, 4, 3, 0, 1),
             (128, 128, 64, 8, 3, 2, 1), (256, 128, 64, 8, 3, 2, 1), (128, 64, 128, 4, 3, 2, 1),
             (256, 64, 128, 8, 3, 0, 1)]


def misaligned(z):
    """z's values at an address one byte past a 4-byte boundary: ops.gemm then reads them as bytes."""
    buf = torch.empty(z.numel() + 4, dtype=torch.uint8, device=z.device)
    view = buf[1:1 + z.numel()].view(z.shape)
    view.copy_(z)
    return view


def copies(nbytes):
    return max(2, min(64, math.ceil(ROTATE_BYTES / nbytes)))


def bench(shape, rows, configs):
    from quantization.kernels import PackedLinear, ops
    from quantization.quantizers import QuantSpec
    k, n = map(int, shape.split("x"))
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    layer = PackedLinear.from_float(w, QuantSpec("affine_quant", 4, "per_group", 128)).cuda()
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ layer.dequantized_weight().double().T
    nbytes = layer.qweight.numel() * 4 + layer.scale.numel() * 4 + layer.zero.numel()
    sets = [(layer.qweight.clone(), layer.scale.clone(), layer.zero.clone()) for _ in range(copies(nbytes))]
    shifted = [(q, s, misaligned(z)) for q, s, z in sets]
    blocks = 128 // 32
    counters = torch.zeros(8192, dtype=torch.int32, device="cuda")

    def timed(calls):
        for c in calls:
            c()
        return ops.replay_time(calls) * 1e3, calls[0]()

    def error(y):
        return ((y.double() - ref).norm() / ref.norm()).item()

    wb = w.to(torch.bfloat16)
    base, _ = timed([lambda v=v: torch.mm(x, v.T) for v in [wb.clone() for _ in range(copies(wb.numel() * 2))]])
    out = [("cuBLAS bf16", "-", base, 0.0)]
    for config in ops.DEQUANT_CONFIGS[:2]:
        t, y = timed([lambda s=s, c=config: ops.dequant_mm(x, *s, None, 4, blocks, 0.0, c) for s in sets])
        out.append(("dequant_mm", str(config), t, error(y)))
    for config in configs:
        config = (config[0], config[1], ops._fit_k(config[2], 128), *config[3:])
        for label, group in (("gemm, zero points as words", sets), ("gemm, zero points as bytes", shifted)):
            t, y = timed([lambda s=s, c=config: ops.gemm(x, *s, None, 4, blocks, 0.0, c, counters=counters)
                          for s in group])
            out.append((label, str(config), t, error(y)))
    for name, config, t, err in out:
        print(f"| {shape} | {rows} | {name} | {config} | {t:.1f} | {base / t:.2f} | {err:.1e} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="", help="comma-separated in x out shapes (default: 768x3072, 3072x768, "
                   "768x2304, 4096x4096 at 16 rows; 4096x4096, 4096x11008 at 256)")
    p.add_argument("--rows", default="16,256", help="comma-separated rows of x: 16 times ops.SMALL_GEMM_CONFIGS, "
                   "more rows ops.GEMM_CONFIGS and a few more")
    args = p.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",") if r]
    except ValueError:
        sys.exit(f"gemm_zero_words.py: error: --rows={args.rows!r}: expected comma-separated integers")
    shapes = [s for s in args.shapes.split(",") if s]
    if any(len(s.split("x")) != 2 or not all(v.isdigit() for v in s.split("x")) for s in shapes):
        sys.exit(f"gemm_zero_words.py: error: --shapes={args.shapes!r}: expected comma-separated INxOUT")
    if not torch.cuda.is_available():
        sys.exit("gemm_zero_words.py: error: needs a CUDA GPU")
    from quantization.kernels import ops
    print(f"GEMM zero points as words or bytes, int4 g128, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("command: python " + " ".join(sys.argv))
    print("\n| in x out | rows | kernel | config | time (us) | vs cuBLAS | error |\n|---|---:|---|---|---:|---:|---:|")
    for m in rows:
        small = m <= ops.GEMV_MAX_ROWS
        default = "768x3072,3072x768,768x2304,4096x4096" if small else "4096x4096,4096x11008"
        for shape in shapes or default.split(","):
            bench(shape, m, ops.SMALL_GEMM_CONFIGS if small else ops.GEMM_CONFIGS + EXTRA_256)


if __name__ == "__main__":
    main()
