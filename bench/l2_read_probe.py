"""What bounds the prefill GEMM at 256 rows: the bytes its programs read, timed with the loads alone.

    python bench/l2_read_probe.py                        # 4096x4096 and 4096x11008; int4 g128, int8 and 1-bit
    python bench/l2_read_probe.py --shapes=4096x4096 --formats=int8 --stages=8

The Gluon GEMM (quantization/kernels/gluon_gemm.py) runs one program per (128 rows, 64 outputs) tile of y: at 256
rows, 2 x N / 64 programs, each reading its 128 rows of x whole ((128, K) bf16: x is 2 MB on 4096 inputs, read from
L2 once per tile of outputs, 128 MB a call on 4096 outputs) and its 64 outputs' words (from memory for one row tile,
from L2 for the other). This probe runs that grid with the loads alone: TMA copies (a host tensor descriptor) of x's
(128, 64) tiles, with or without the words' tiles, XOR-folded so that the compiler keeps them, no dequantize and no
products. Every time is the median replay of a CUDA graph over copies of the words (and of the layer, for the GEMM)
that do not fit in L2, as bench/kernels.py times a layer; cuBLAS bf16 and the Gluon GEMM (gluon_gemm.CONFIGS[0])
on the same shape run in the same process. Bytes count x's reads and the words' (scales and zero points left
out); a rate near the GEMM's says its loads bound it. Needs a Hopper GPU (TMA) and Triton with Gluon.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROTATE_BYTES = 3 * 50 * 2**20
BLOCK_M, BLOCK_N, BLOCK_K = 128, 64, 64
FORMATS = {"int4": ("affine_quant", 4, "per_group", 128), "int8": ("symmetric_quant", 8, "per_channel", None),
           "1-bit": ("binary_quant", 8, "per_channel", None)}  # QuantSpec's arguments (1-bit: its bits argument 8)


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _loads(x_desc, w_desc, out_ptr, K, BITS: tl.constexpr, WORDS: tl.constexpr, STAGES: tl.constexpr,
               TILE_M: tl.constexpr, TILE_K: tl.constexpr, WORD_ROWS: tl.constexpr, TILE_N: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        acc = tl.zeros((TILE_M, TILE_K), tl.int16)
        words = tl.zeros((WORD_ROWS, TILE_N), tl.int32)
        for k0 in tl.range(0, K, TILE_K, num_stages=STAGES):
            acc ^= x_desc.load([pid_m * TILE_M, k0]).to(tl.int16, bitcast=True)
            if WORDS:
                words ^= w_desc.load([k0 * BITS // 32, pid_n * TILE_N])
        folded = tl.sum(tl.sum(acc.to(tl.int32), axis=1), axis=0) ^ tl.sum(tl.sum(words, axis=1), axis=0)
        tl.store(out_ptr + pid_m * tl.num_programs(1) + pid_n, folded)
    return _loads


def copies(nbytes):
    return max(2, min(64, math.ceil(ROTATE_BYTES / nbytes)))


def bench(shape, fmt, rows, stages, loads):
    from triton.tools.tensor_descriptor import TensorDescriptor

    from quantization.kernels import PackedLinear, gluon_gemm, ops
    from quantization.quantizers import QuantSpec
    k, n = map(int, shape.split("x"))
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda") * 0.02
    layer = PackedLinear.from_float(weight, QuantSpec(*FORMATS[fmt])).cuda()
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    bits, blocks = layer.bits, (layer.group_size or k) // 32
    wb = weight.to(torch.bfloat16)
    mms = [lambda v=v: torch.mm(x, v.T) for v in [wb.clone() for _ in range(copies(wb.nbytes))]]
    for call in mms:  # each run once before the capture (cuBLAS's handle, Triton's compilation)
        call()
    cublas = ops.replay_time(mms)
    layers = [(layer.qweight.clone(), layer.scale.clone(), None if layer.zero is None else layer.zero.clone())
              for _ in range(copies(layer.qweight.nbytes))]
    gemm = [lambda q=q, s=s, z=z: gluon_gemm.gluon_mm(x, q, s, z, None, bits, blocks, layer.zero_const,
                                                     gluon_gemm.CONFIGS[0]) for q, s, z in layers]
    for call in gemm:
        call()
    t_gemm = ops.replay_time(gemm)
    grid = (math.ceil(rows / BLOCK_M), n // BLOCK_N)
    x_desc = TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K])
    word_rows = gluon_gemm.word_rows(BLOCK_K, bits)
    descs = [TensorDescriptor.from_tensor(q, [word_rows, BLOCK_N]) for q, _, _ in layers]
    out = torch.empty(grid[0] * grid[1], dtype=torch.int32, device="cuda")
    x_bytes = grid[0] * grid[1] * BLOCK_M * k * 2
    w_bytes = grid[0] * grid[1] * (k // BLOCK_K) * word_rows * BLOCK_N * 4
    for st in stages:
        times = []
        for words in (0, 1):
            calls = [lambda d=d, w=words: loads[grid](x_desc, d, out, k, BITS=bits, WORDS=w, STAGES=st, TILE_M=BLOCK_M,
                                                      TILE_K=BLOCK_K, WORD_ROWS=word_rows, TILE_N=BLOCK_N,
                                                      num_warps=4) for d in descs]
            for call in calls:
                call()
            times.append(ops.replay_time(calls))
        nbytes = x_bytes + w_bytes
        print(f"| {shape} | {fmt} | {st} | {cublas * 1e3:.1f} | {t_gemm * 1e3:.1f} | {times[0] * 1e3:.1f} | "
              f"{x_bytes / times[0] / 1e9:.2f} | {times[1] * 1e3:.1f} | {nbytes / 2**20:.0f} | "
              f"{nbytes / times[1] / 1e9:.2f} | {nbytes / t_gemm / 1e9:.2f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,4096x11008", help="comma-separated in x out shapes (multiples of 64)")
    p.add_argument("--formats", default="int4,int8,1-bit", help=f"comma-separated, some of {', '.join(FORMATS)}")
    p.add_argument("--rows", type=int, default=256, help="rows of x")
    p.add_argument("--stages", default="4,8", help="comma-separated tiles in flight of the loads-only kernel")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    if not shapes or any(len(s.split("x")) != 2 or not all(v.isdigit() and int(v) % 64 == 0 and int(v) > 0
                                                            for v in s.split("x")) for s in shapes):
        sys.exit(f"l2_read_probe.py: error: --shapes={args.shapes!r}: expected comma-separated INxOUT, multiples of 64")
    formats = [f for f in args.formats.split(",") if f]
    if not formats or any(f not in FORMATS for f in formats):
        sys.exit(f"l2_read_probe.py: error: --formats={args.formats!r}: expected some of {', '.join(FORMATS)}")
    if args.rows < 1:
        sys.exit(f"l2_read_probe.py: error: --rows={args.rows}: expected a positive number of rows")
    try:
        stages = [int(s) for s in args.stages.split(",") if s]
    except ValueError:
        stages = []
    if not stages or min(stages) < 1:
        sys.exit(f"l2_read_probe.py: error: --stages={args.stages!r}: expected comma-separated positive integers")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        sys.exit("l2_read_probe.py: error: needs a CUDA GPU of compute capability 9 (Hopper: TMA, the Gluon GEMM)")
    print(f"Loads alone against the Gluon prefill GEMM, {args.rows} rows, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print("command: python " + " ".join(sys.argv))
    print("\n| in x out | format | stages | cuBLAS (us) | Gluon GEMM (us) | x alone (us) | x TB/s | x + words (us) | "
          "MB read | loads TB/s | the GEMM's TB/s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    loads = _kernel()
    for shape in shapes:
        for fmt in formats:
            bench(shape, fmt, args.rows, stages, loads)


if __name__ == "__main__":
    main()
