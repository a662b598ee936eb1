"""How fast the one-row kernel's weight words can be read, by layout: only the loads, no arithmetic.

- rows: today's layout (layout.py), words (R, N) row-major; a program reads a (R, BLOCK_N) column strip, BLOCK_N
  words of each of R rows N words apart (the access pattern of `_stream_gemv_kernel`);
- strips: the same words stored strip by strip, each (R, TN) strip contiguous, so that a program's words are one
  run of memory (TN = BLOCK_N);
- flat: the same bytes read as one contiguous array by programs of contiguous chunks, UNROLL blocks loaded before
  any is used (more bytes in flight a thread), optionally with the streaming hint evict_first;
- torch.sum: the peer, PyTorch's own reduction over the same bytes (read as float32, its vectorized path).
Each is the median replay of a CUDA graph over enough copies that the words come from memory, as bench/kernels.py
times a layer. Prints a markdown table; shapes are in x out of an int4 weight (R = in / 8 rows of words).

    python bench/gemv_layout_probe.py --shapes=4096x4096,4096x16384,16384x4096
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from quantization.kernels import ops  # noqa: E402

ROTATE_BYTES = 3 * 50 * 2**20


@triton.jit
def _read(w_ptr, out_ptr, R, N, rows_per_split, STRIPS: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_R: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_N)
    if STRIPS:  # strip pid_n is (R, BLOCK_N), contiguous
        base = w_ptr + pid_n.to(tl.int64) * R * BLOCK_N + offs_c[None, :]
        stride = BLOCK_N
    else:
        base = w_ptr + pid_n * BLOCK_N + offs_c[None, :]
        stride = N
    acc = tl.zeros((BLOCK_R, BLOCK_N), tl.int32)
    last = tl.minimum((pid_k + 1) * rows_per_split, R)
    for r0 in range(pid_k * rows_per_split, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc ^= tl.load(base + rows[:, None] * stride, mask=(rows < last)[:, None], other=0)
    tl.store(out_ptr + (pid_k * tl.num_programs(0) + pid_n) * BLOCK_N + offs_c, tl.sum(acc, axis=0))


@triton.jit
def _read_flat(w_ptr, out_ptr, total, per_program, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
               EVICT_FIRST: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.int32)
    start = pid.to(tl.int64) * per_program
    for i in range(0, per_program, BLOCK * UNROLL):
        for u in tl.static_range(UNROLL):  # UNROLL independent loads, then their uses
            offs = start + i + u * BLOCK + tl.arange(0, BLOCK)
            if EVICT_FIRST:
                acc ^= tl.load(w_ptr + offs, mask=offs < total, other=0, eviction_policy="evict_first")
            else:
                acc ^= tl.load(w_ptr + offs, mask=offs < total, other=0)
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)


def print_row(row):
    print("| {} | {} | {} | {} | {} | {} | {:.1f} | {:,.0f} |".format(*row), flush=True)


def replay_us(calls):
    for c in calls:
        c()
    return ops.replay_time(calls, warmup=10, rep=60) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,4096x12288,4096x16384,16384x4096", help="in x out, int4")
    p.add_argument("--block_n", default="16,32,64,128,256", help="column strip widths (words)")
    p.add_argument("--block_r", default="16,32,64", help="rows of words a step loads")
    p.add_argument("--per_sm", default="2,4,8", help="programs per multiprocessor that split-K aims for")
    p.add_argument("--warps", default="4,8", help="num_warps")
    p.add_argument("--layouts", default="rows,strips", help="tiled layouts to time (rows, strips; empty: none)")
    p.add_argument("--unroll", default="1", help="flat reads: blocks loaded before any is used")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv_layout_probe.py: error: needs a CUDA GPU")
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# One-row weight reads by layout: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}\n")
    print("| in x out | layout | BLOCK_N | BLOCK_R | programs/SM | warps | us | GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        r = k // 8
        count = max(2, math.ceil(ROTATE_BYTES / (r * n * 4)))
        words = [torch.randint(-2**31, 2**31 - 1, (r, n), device="cuda", dtype=torch.int32) for _ in range(count)]
        nbytes = r * n * 4
        best = {}
        for layout in [v for v in args.layouts.split(",") if v]:
            for bn in ints(args.block_n):
                for br in ints(args.block_r):
                    for per_sm in ints(args.per_sm):
                        for warps in ints(args.warps):
                            tiles = n // bn
                            split = max(1, min(per_sm * sms // tiles, r // br))
                            per_split = triton.cdiv(triton.cdiv(r, split), br) * br
                            split = triton.cdiv(r, per_split)
                            out = torch.empty(split * tiles * bn, device="cuda", dtype=torch.int32)
                            calls = [lambda w=w, out=out: _read[(tiles, split)](
                                w, out, r, n, per_split, STRIPS=layout == "strips", BLOCK_N=bn, BLOCK_R=br,
                                num_warps=warps) for w in words]
                            us = replay_us(calls)
                            row = (shape, layout, bn, br, per_sm, warps, us, nbytes / us / 1e3)
                            if layout not in best or us < best[layout][6]:
                                best[layout] = row
                            print_row(row)
        for unroll in ints(args.unroll):
            for evict in (False, True):
                for block, per_sm in ((1024, 2), (1024, 4), (2048, 4), (4096, 2)):
                    programs = per_sm * sms
                    per_program = triton.cdiv(triton.cdiv(r * n, programs), block * unroll) * block * unroll
                    programs = triton.cdiv(r * n, per_program)
                    out = torch.empty(programs * block, device="cuda", dtype=torch.int32)
                    calls = [lambda w=w, out=out: _read_flat[(programs,)](
                        w, out, r * n, per_program, BLOCK=block, UNROLL=unroll, EVICT_FIRST=evict, num_warps=8)
                        for w in words]
                    us = replay_us(calls)
                    name = f"flat x{unroll}" + (" evict_first" if evict else "")
                    row = (shape, name, "-", block, per_sm, 8, us, nbytes / us / 1e3)
                    if "flat" not in best or us < best["flat"][6]:
                        best["flat"] = row
                    print_row(row)
        sums = [torch.empty((), device="cuda") for _ in words]  # a float32 reduction: PyTorch's vectorized path
        us = replay_us([lambda w=w, o=o: torch.sum(w.view(torch.float32), dim=(0, 1), out=o)
                        for w, o in zip(words, sums)])
        best["torch.sum"] = row = (shape, "torch.sum", "-", "-", "-", "-", us, nbytes / us / 1e3)
        print_row(row)
        print(f"\nbest of {shape}: " + "; ".join(f"{row[1]} {row[6]:.1f} us ({row[7]:,.0f} GB/s, BLOCK_N {row[2]}, "
                                                f"BLOCK_R {row[3]}, {row[4]}/SM, {row[5]} warps)"
                                                for row in best.values()) + "\n", flush=True)
        del words


if __name__ == "__main__":
    main()
