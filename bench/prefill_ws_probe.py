"""Probe: can a fused dequantize-GEMM for int4 g128 prefill (256 rows of x) reach cuBLAS bf16 once its loads are
overlapped with the dequantization, through Triton's automatic warp specialization (`tl.range(...,
warp_specialize=True)`, Hopper) and TMA loads (`tl.make_tensor_descriptor`)? Times the probe kernels below against
cuBLAS bf16 (x @ W.T) and the project's prefill path (PackedLinear's forward: the launcher's choice for 256 rows,
dequant_mm on an H200) in one run, and checks each against the float64 product of x and the dequantized weight.

    python bench/prefill_ws_probe.py                    # both shapes, every variant (CUDA GPU, ~2-3 minutes)
    python bench/prefill_ws_probe.py --shapes=4096x4096 --variants=tma_ws,swap_ws
    python bench/prefill_ws_probe.py --compile_only     # no GPU: compile every config for sm_90, print the SASS
    TRITON_INTERPRET=1 python bench/prefill_ws_probe.py --interpret   # CPU: every variant at 64 rows, 256x256

Shapes are `in x out` (the weight is out x in), as in bench/kernels.py. The weight is packed by the project's own
code (PackedLinear.from_float, QuantSpec("affine_quant", 4, "per_group", 128)): words (K / 8, N) int32, scales
(K / 128, N) float32, zero points (K / 128, N) uint8.

The probe kernel (`_probe_kernel`), one (BLOCK_M, BLOCK_N) tile of y per program, K tiles of BLOCK_K (a divisor of
the group: one scale and zero point per column per tile). Per K tile it gets x (BLOCK_M, BLOCK_K) and the words
(BLOCK_K / 8, BLOCK_N), unpacks the words along a new axis (as triton_kernels._code_tile does), dequantizes
(code - zero) * scale in float32 with the 2**23 trick, rounds to bf16 and runs tl.dot. Variants:
- `ptr`     x and words through pointer loads (cp.async, software pipelined), no warp specialization: the
            project's _gemm_kernel with UNPACK, restated (the baseline of the probe);
- `ptr_ws`  the same loop with warp_specialize=True;
- `tma`     x and words through TMA (device-side tensor descriptors), no warp specialization;
- `tma_ws`  TMA loads with warp_specialize=True: the loads in a producer partition, unpack + wgmma in the
            consumer warps (if Triton's Hopper pass partitions the loop; --compile_only says whether it did);
- `swap`, `swap_ws`  the operands swapped: y^T tile (BLOCK_N, BLOCK_M) = W tile (BLOCK_N, BLOCK_K) @ x^T, the
            dequantized weight the left operand (which wgmma can take from registers), x^T from shared memory
            (TMA), without and with warp specialization.
- `i8`      int8 tensor cores (twice bf16's rate) on the codes as they are: x is first split per row into two int8
            halves, x = sx * (256 hi + lo) (`_split_x_kernel`: x as 16-bit integers per row, more precise than x in
            bf16), then per group of 128 inputs `_i8_kernel` runs two int8 products with the codes (0..15, no
            dequantization), exact in int32, scales them by the group's scales, and subtracts the zero points'
            share at the end (a float32 product of the groups' sums of x and s * z); two int8 passes cost what one
            bf16 pass does, the work per code is an unpack, and the scaling is per output, not per code. Its table
            rows add the GEMM alone (x already split) and the split alone.
- `field`, `field_swap`, `fperm`, `fperm_swap` (`_field_kernel`): no unpack reshape at all. Code f of every word is
            a (BLOCK_K / 8, BLOCK_N) tile by itself, dequantized and multiplied by its own slice of x, one tl.dot
            per field: `field` on the project's words, x's tile split into its 8 fields in registers (tl.split);
            `fperm` on the words repacked field-major inside each K tile (field_major(): each field's x a
            contiguous tile); `_swap` with the weight the left operand (from registers). A sixth config number
            is split-K (the partials added as the project's GEMM adds them).
- `gluon`   the project's own Gluon GEMM (quantization/kernels/gluon_gemm.py, ops' prefill candidate on Hopper),
            warp-specialized by hand: a TMA partition, DQ_PARTS dequantize partitions of DQ_WARPS warps (the
            config's last two numbers) and the wgmma partition; `gluon_nomma` times it with its products left
            out (a diagnostic: its output is not the product; without the dequantize too it hung on an H100).
            A config's eighth number 1: the weight tile as wgmma's left operand (SWAP); 2: the same with y
            stored straight from the accumulator (no shared-memory scratch in the epilogue; slower, not in
            CONFIGS); 3 (the first config): y through a slot of x's ring and one TMA copy. The words in rings
            of their own with a second loader warp (a ninth number until commit 578c0c9) were slower and are not
            in the kernel (bench/results/prefill_gluon_h100, file 20).
            GPU or --compile_only (Gluon does not run under the interpreter).
A config is BLOCK_MxBLOCK_NxBLOCK_Kxnum_warpsxnum_stages (for i8 and the field variants BLOCK_K is the group, 128;
fperm also takes 256). --compile_only
reports, per variant and config, whether it compiled, whether the loop was warp-specialized (ttg.warp_specialize
in the TTGIR), the TMA copies, how many wgmma take their left operand from registers, registers, shared memory,
and SASS instructions.

Times are the median replay of a CUDA graph over R copies of the weights (together 3x the L2 cache, so weights
come from memory, as in bench/kernels.py's prefill rows), divided by R. "error" is ||y - ref|| / ||ref|| (as
bench/kernels.py), "max err" max |y - ref| / max |ref|; a variant whose error is above 1e-2 is marked FAIL.

Result on one H200 (torch 2.11, Triton 3.6; bench/results/prefill_ws_probe_h200/README.md): every variant that ran
took 52-124 us on 4096x4096 against cuBLAS's 18.1 and the project's dequant_mm's 28.3; the TMA configs of 4 warps,
and so every warp-specialized one (Triton specializes only 4-warp loops here), stopped with a CUDA "misaligned
address" error (not found in the session it was written; run one variant per process), and ptr_ws does not
compile (an assertion in Triton's warp-specialization pass). Known open, kept as the starting point of that work.
The field variants on one H100 (bench/results/prefill_field_h100/README.md): 39.6 us at best on 4096x4096 against
cuBLAS's 20.5 and dequant_mm's 33.6. The Gluon kernel on one H100 (bench/results/prefill_gluon_h100/README.md):
22.9-24.0 us on 4096x4096 with three dequantize partitions (cuBLAS 20.0-20.2), 65.8 on 4096x11008 (cuBLAS 44.4).
"""
import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # main() says Triton is needed
    triton = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quantization.kernels import gluon_gemm  # noqa: E402 (after the path)

BITS, GROUP = 4, 128
ROTATE_BYTES = 3 * 50 * 2**20   # 3x the H200's L2 (50 MiB): the weight copies a timing graph runs over
MAX_COPIES = 64
ERROR_LIMIT = 1e-2              # bf16 paths give ~2.5e-3 against the float64 reference (docs/kernels.md)
VARIANTS = {  # name: (TMA, SWAP, WS)
    "ptr": (False, False, False), "ptr_ws": (False, False, True),
    "tma": (True, False, False), "tma_ws": (True, False, True),
    "swap": (True, 1, False), "swap_ws": (True, 1, True),
    "swap2": (True, 2, False), "swap2_ws": (True, 2, True),
    "i8": None,  # int8 tensor cores, x in two int8 halves (_split_x_kernel, _i8_kernel): not a TMA/swap/ws variant
}
FIELD_VARIANTS = {  # name: (SWAP, PERM) of _field_kernel: one tl.dot per code field of a word, no unpack reshape
    "field": (0, 0), "field_swap": (1, 0), "fperm": (0, 1), "fperm_swap": (1, 1),
}
VARIANTS.update({name: None for name in FIELD_VARIANTS})
# the project's Gluon GEMM (quantization/kernels/gluon_gemm.py: TMA, dequantize and wgmma partitions; GPU or compile
# only). The _nomma diagnostic times the same kernel with its products left out (its DIAG bit 1; the output is not the
# product); the dequantize left out as well (_nodq, _loads) hung on an H100 (prefill_gluon_h100 files 4, 7, 10): gone
GLUON_VARIANTS = {"gluon": 0, "gluon_nomma": 1}
VARIANTS.update({name: None for name in GLUON_VARIANTS})
# BLOCK_M x BLOCK_N x BLOCK_K x num_warps x num_stages. At 256 rows a 128x128 tile gives 64 programs on 4096
# outputs (132 SMs on an H200), 128x64 gives 128: the narrower tiles are there for the square layer
CONFIGS = {  # each compiled for sm_90 with Triton 3.6 and 3.9 (--compile_only); the _ws ones warp-specialize only
    # with 4 warps (2 consumer warp groups of 4 and a producer), and ptr_ws not at all (kept to show it)
    "ptr": ["128x128x64x8x3", "256x128x64x8x3", "128x64x128x4x4"],
    "ptr_ws": ["128x64x128x4x4"],
    "tma": ["128x128x64x8x3", "128x128x128x8x3", "256x128x64x8x3", "128x64x128x4x4", "128x128x64x4x3"],
    "tma_ws": ["128x64x128x4x3", "128x64x64x4x4", "128x128x64x4x3", "128x128x64x4x4", "256x128x64x4x2",
               "128x128x128x4x2", "128x256x64x4x2", "256x64x64x4x3"],
    # here BLOCK_N (outputs) is wgmma's M (64 per warp group) and BLOCK_M (rows of x) its N (up to 256). With warp
    # specialization only BLOCK_N = 64 compiles (128 fails in Triton's WSDataPartition), and there the two
    # consumer warp groups each compute the whole tile (their accumulators are the full 64 x BLOCK_M)
    "swap": ["256x128x64x8x3", "128x128x64x8x3", "256x64x128x4x3", "128x64x128x4x4"],
    "swap_ws": ["128x64x128x4x3", "128x64x64x4x4"],
    "swap2": ["128x128x64x8x3", "256x128x64x8x3"],
    "swap2_ws": ["128x64x128x4x3"],
    # BLOCK_K is the group (128): 16 word rows, a dot of K = 16 per code field (fperm: also 256, two groups)
    "field": ["128x64x128x4x3", "128x128x128x8x3", "256x64x128x8x3", "128x64x128x4x4", "64x64x128x4x4",
              "256x32x128x8x3", "128x32x128x4x4", "256x64x128x8x3x2", "128x64x128x4x3x2"],
    "field_swap": ["128x64x128x4x3", "128x128x128x8x3", "256x64x128x4x3", "64x64x128x4x4", "256x128x128x8x2"],
    "fperm": ["128x64x128x4x3", "128x128x128x8x3", "256x64x128x8x3", "128x64x128x4x4", "64x64x128x4x4",
              "256x32x128x8x3", "128x32x128x4x4", "256x32x256x8x2", "128x64x256x4x3", "256x64x128x8x3x2",
              "256x32x128x8x3x2", "128x64x128x4x3x2"],
    "fperm_swap": ["128x64x128x4x3", "128x128x128x8x3", "256x64x128x4x3", "64x64x128x4x4", "256x128x128x8x2",
                   "128x64x128x4x4", "128x64x256x4x3", "256x64x256x4x2", "128x128x256x8x2", "128x64x128x4x3x2",
                   "256x64x128x4x3x2", "256x64x128x4x3x4", "128x128x128x8x3x2"],
    # BLOCK_K is the group (one scale and zero point per column per tile, applied to the tile's int32 products)
    "i8": ["128x64x128x4x3", "128x64x128x8x3", "128x128x128x8x3", "64x128x128x4x3", "256x64x128x8x2",
           "128x128x128x4x2"],
    # BLOCK_MxBLOCK_NxBLOCK_KxwarpsxstagesxDQ_WARPSxDQ_PARTS[xSWAP] (gluon_gemm.CONFIGS, and the narrower and wider
    # tiles measured beside them; split-K, tried in 2141e22 and e6f3dd9 (bench/results/prefill_gluon_h100, files 3
    # and 7), was slower and is not in the kernel; SWAP 1: the weight tile as wgmma's left operand; 64x128 tiles
    # (128 outputs, half the reads of x) were slower with SWAP, 28.0-32.0 us against 21.2 (file 16); SWAP 2 (y from
    # the accumulator) 22.8 against 22.2 (file 20); 6 stages, int8's before SWAP 3 (file 23)
    "gluon": ["x".join(map(str, c)) for c in gluon_gemm.CONFIGS] + ["128x64x64x4x8x4x3x2", "128x64x64x4x6x4x3x1",
                                                                    "128x64x64x4x6x4x2", "128x64x64x4x6x4x1",
                                                                    "64x128x64x4x6x4x3", "128x128x64x4x4x4x1",
                                                                    "128x64x64x4x8x4x2x1", "64x128x64x4x6x4x3x1"],
}
CONFIGS.update({name: CONFIGS["gluon"][:3] for name in GLUON_VARIANTS if name != "gluon"})
INTERPRET_CONFIG = "64x64x64x4x2"   # --interpret: every variant at this config (M = 64, 256x256)
INTERPRET_I8 = "64x64x128x4x2"      # the int8 variant's (BLOCK_K = GROUP)
INTERPRET_FIELD = ["64x64x128x4x2", "64x64x128x4x2x2"]  # the field variants': one tile of K per group, split-K 2
INTERPRET_FPERM = INTERPRET_FIELD + ["64x64x256x4x2"]     # and for fperm two groups per K tile


if triton is not None:
    @triton.jit
    def _probe_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K,
                      BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr, SWAP: tl.constexpr,
                      WS: tl.constexpr):
        """y (M, N) bf16 = x (M, K) bf16 @ dequant(W)^T, W packed as layout.py's words (K / 32 * BITS, N) int32
        (code i of a word at bits i * BITS), scales and zero points (K / GROUP, N). N % BLOCK_N == 0 and
        K % BLOCK_K == 0 (the launcher checks); rows of x past M are masked (pointer loads) or zero (TMA). x and y: bf16 (float32 under the interpreter)."""
        PER: tl.constexpr = 32 // BITS            # codes per word
        WK: tl.constexpr = BLOCK_K // PER         # word rows per K tile
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, WK)
        shifts = tl.arange(0, PER) * BITS
        if TMA:
            x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
            # the words as (K / PER, N / 64, 64): a TMA box 64 words (256 bytes) wide, whatever BLOCK_N is (Triton
            # 3.6's Hopper warp specialization fails on a 128-word-wide box)
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K // PER, N // 64, 64], strides=[N, 64, 1],
                                               block_shape=[WK, BLOCK_N // 64, 64])
            s_desc = tl.make_tensor_descriptor(s_ptr, shape=[K // GROUP, N], strides=[N, 1], block_shape=[1, BLOCK_N])
            z_desc = tl.make_tensor_descriptor(z_ptr, shape=[K // GROUP, N], strides=[N, 1], block_shape=[1, BLOCK_N])
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        k_tiles = K // BLOCK_K
        for kt in tl.range(0, k_tiles, num_stages=STAGES, warp_specialize=WS):
            k0 = kt * BLOCK_K
            if TMA:
                x = x_desc.load([off_m, k0])
                words = tl.reshape(w_desc.load([k0 // PER, off_n // 64, 0]), (WK, BLOCK_N))
            else:
                x = tl.load(x_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=(offs_m < M)[:, None],
                            other=0.0)
                words = tl.load(w_ptr + (k0 // PER + offs_r)[:, None] * N + offs_n[None, :])
            group = k0 // GROUP
            if TMA:
                scale = tl.reshape(s_desc.load([group, off_n]), (BLOCK_N,))
                zero = tl.reshape(z_desc.load([group, off_n]), (BLOCK_N,))
            else:
                scale = tl.load(s_ptr + group * N + offs_n)
                zero = tl.load(z_ptr + group * N + offs_n)
            # code | 2**23 read as a float is 2**23 + code: one subtraction of 2**23 + zero (exact below 2**24)
            zero = zero.to(tl.float32) + 8388608.0
            if SWAP == 2:  # unpacked as (BLOCK_K, BLOCK_N), the bf16 tile transposed in registers
                codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
                codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
                w = ((codes | 0x4B000000).to(tl.float32, bitcast=True) - zero[None, :]) * scale[None, :]
                acc = tl.dot(w.to(x.dtype).T, x.T, acc)
            elif SWAP:  # the weight tile (BLOCK_N, BLOCK_K), k = word row * PER + field
                codes = (words.T[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
                codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))
                w = ((codes | 0x4B000000).to(tl.float32, bitcast=True) - zero[:, None]) * scale[:, None]
                acc = tl.dot(w.to(x.dtype), x.T, acc)
            else:     # the weight tile (BLOCK_K, BLOCK_N)
                codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
                codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
                w = ((codes | 0x4B000000).to(tl.float32, bitcast=True) - zero[None, :]) * scale[None, :]
                acc = tl.dot(x, w.to(x.dtype), acc)
        if SWAP:
            tl.store(y_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
                     mask=(offs_m < M)[None, :])
        else:
            tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


    @triton.jit
    def _field_dot(acc, xf, words, scale, zero, F: tl.constexpr, BITS: tl.constexpr, SWAP: tl.constexpr):
        """acc += x_f @ dequant(field F of the words): xf (BLOCK_M, WK) holds the inputs of field F's codes."""
        codes = (words >> (F * BITS)) & ((1 << BITS) - 1)      # (WK, BLOCK_N), no reshape
        w = ((codes | 0x4B000000).to(tl.float32, bitcast=True) - zero[None, :]) * scale[None, :]
        w = w.to(xf.dtype)
        if SWAP:
            return tl.dot(w.T, xf.T, acc)   # (BLOCK_N, WK) @ (WK, BLOCK_M): the weight the register operand
        else:
            return tl.dot(xf, w, acc)       # (BLOCK_M, WK) @ (WK, BLOCK_N)

    @triton.jit
    def _field_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, count_ptr, M, N, K,
                      BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, STAGES: tl.constexpr, SWAP: tl.constexpr, PERM: tl.constexpr,
                      SPLIT: tl.constexpr):
        """y (M, N) = x (M, K) @ dequant(W)^T for 4-bit codes, one tl.dot of K = BLOCK_K / 8 per code field of a
        word, so that no (BLOCK_K / 8, 8, BLOCK_N) -> (BLOCK_K, BLOCK_N) reshape stands between the loaded words
        and the tensor cores. BLOCK_K == GROUP (or 2 GROUP with PERM). PERM = 0: the project's words (code f of
        word row i is input 8 i + f), x's tile split in registers into its 8 fields (tl.split of (BLOCK_M,
        BLOCK_K / 8, 2, 2, 2));
        PERM = 1: words repacked field-major inside each K tile (field_major(): code f of word row r is input
        k0 + f * BLOCK_K / 8 + r), each field's x a contiguous (BLOCK_M, BLOCK_K / 8) tile of its own. SPLIT:
        split-K over grid axis 2, the partial tiles added as in triton_kernels._gemm_kernel (float32 workspace,
        an arrival counter per tile, the last program adds them in split order)."""
        PER: tl.constexpr = 32 // BITS
        WK: tl.constexpr = BLOCK_K // PER
        NG: tl.constexpr = BLOCK_K // GROUP      # groups per K tile: 1, or 2 (PERM only: fields 0-3 and 4-7)
        tl.static_assert(PER == 8)
        tl.static_assert(NG * GROUP == BLOCK_K)
        tl.static_assert(NG == 1 or (NG == 2 and PERM == 1))
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, WK)
        tiles = K // BLOCK_K // tl.num_programs(2)
        mmask = (offs_m < M)[:, None]
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kt in tl.range(pid_k * tiles, pid_k * tiles + tiles, num_stages=STAGES):
            k0 = kt * BLOCK_K
            words = tl.load(w_ptr + (kt * WK + offs_r)[:, None] * N + offs_n[None, :])
            scale = tl.load(s_ptr + kt * NG * N + offs_n)
            zero = tl.load(z_ptr + kt * NG * N + offs_n).to(tl.float32) + 8388608.0
            if NG == 2:
                scale1 = tl.load(s_ptr + (kt * NG + 1) * N + offs_n)
                zero1 = tl.load(z_ptr + (kt * NG + 1) * N + offs_n).to(tl.float32) + 8388608.0
            else:
                scale1 = scale
                zero1 = zero
            if PERM:
                xrow = x_ptr + offs_m[:, None] * K + (k0 + offs_r)[None, :]
                x0 = tl.load(xrow, mask=mmask, other=0.0)
                x1 = tl.load(xrow + WK, mask=mmask, other=0.0)
                x2 = tl.load(xrow + 2 * WK, mask=mmask, other=0.0)
                x3 = tl.load(xrow + 3 * WK, mask=mmask, other=0.0)
                x4 = tl.load(xrow + 4 * WK, mask=mmask, other=0.0)
                x5 = tl.load(xrow + 5 * WK, mask=mmask, other=0.0)
                x6 = tl.load(xrow + 6 * WK, mask=mmask, other=0.0)
                x7 = tl.load(xrow + 7 * WK, mask=mmask, other=0.0)
            else:
                x = tl.load(x_ptr + offs_m[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mmask,
                            other=0.0)
                # input 8 r + f with f = 4 a + 2 b + c: dims (r, a, b, c), split c, then b, then a
                c0, c1 = tl.split(tl.reshape(x, (BLOCK_M, WK, 2, 2, 2)))
                b0c0, b1c0 = tl.split(c0)
                b0c1, b1c1 = tl.split(c1)
                x0, x4 = tl.split(b0c0)
                x2, x6 = tl.split(b1c0)
                x1, x5 = tl.split(b0c1)
                x3, x7 = tl.split(b1c1)
            acc = _field_dot(acc, x0, words, scale, zero, 0, BITS, SWAP)
            acc = _field_dot(acc, x1, words, scale, zero, 1, BITS, SWAP)
            acc = _field_dot(acc, x2, words, scale, zero, 2, BITS, SWAP)
            acc = _field_dot(acc, x3, words, scale, zero, 3, BITS, SWAP)
            acc = _field_dot(acc, x4, words, scale1, zero1, 4, BITS, SWAP)
            acc = _field_dot(acc, x5, words, scale1, zero1, 5, BITS, SWAP)
            acc = _field_dot(acc, x6, words, scale1, zero1, 6, BITS, SWAP)
            acc = _field_dot(acc, x7, words, scale1, zero1, 7, BITS, SWAP)
        if SWAP:  # y's offsets and mask in the accumulator's orientation
            tile_offs = offs_m[None, :] * N + offs_n[:, None]
            mask_y = (offs_m < M)[None, :]
        else:
            tile_offs = offs_m[:, None] * N + offs_n[None, :]
            mask_y = mmask
        if SPLIT:
            tl.store(ws_ptr + pid_k * M * N + tile_offs, acc, mask=mask_y)
            tl.debug_barrier()  # every thread's partials are written before the count says so
            counter = count_ptr + pid_m * tl.num_programs(1) + pid_n
            if tl.atomic_add(counter, 1, sem="acq_rel") == tl.num_programs(2) - 1:
                acc = tl.load(ws_ptr + tile_offs, mask=mask_y, other=0.0, cache_modifier=".cg")
                for k in range(1, tl.num_programs(2)):  # in split order: the same sum every call
                    acc += tl.load(ws_ptr + k * M * N + tile_offs, mask=mask_y, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + tile_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
                tl.atomic_xchg(counter, 0)
        else:
            tl.store(y_ptr + tile_offs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)

    @triton.jit
    def _split_x_kernel(x_ptr, hi_ptr, lo_ptr, sx_ptr, r_ptr, M, K, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
        """x (M, K) as integers per row: xi = round(x / sx) in [-32639, 32639] with sx = max |x| / 32639 (M,)
        float32, written as hi = floor((xi + 128) / 256) and lo = xi - 256 hi (both int8, since 32639 = 127 * 256
        + 127: xi = 256 hi + lo exactly), and r (M, K / GROUP) int32, each group's sum of xi."""
        pid_m = tl.program_id(0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, GROUP)
        mask = (offs_m < M)[:, None]
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, GROUP):
            x = tl.load(x_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        sx = amax / 32639.0
        sx = tl.where(sx > 0, sx, 1.0)
        tl.store(sx_ptr + offs_m, sx, mask=offs_m < M)
        for k0 in range(0, K, GROUP):
            x = tl.load(x_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=mask, other=0.0).to(tl.float32)
            xi = tl.minimum(tl.maximum(tl.floor(x / sx[:, None] + 0.5), -32639.0), 32639.0)
            hi = tl.floor((xi + 128.0) / 256.0)
            tl.store(hi_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], hi.to(tl.int8), mask=mask)
            tl.store(lo_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], (xi - 256.0 * hi).to(tl.int8), mask=mask)
            tl.store(r_ptr + offs_m * (K // GROUP) + k0 // GROUP, tl.sum(xi, axis=1).to(tl.int32), mask=offs_m < M)

    @triton.jit
    def _i8_kernel(hi_ptr, lo_ptr, sx_ptr, r_ptr, w_ptr, s_ptr, sz_ptr, y_ptr, M, N, K,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   STAGES: tl.constexpr):
        """y = x @ dequant(W)^T on int8 tensor cores: with x = sx * (256 hi + lo) (_split_x_kernel) and
        W[n, k] = s[g, n] * (q - z[g, n]) for k in group g,
        y[m, n] = sx[m] * (sum_g s[g, n] * (256 * (hi @ q) + lo @ q)[m, n] - sum_g r[m, g] * sz[g, n]),
        sz = s * z (float32, made once per weight), the int32 products per group exact, q the codes as int8."""
        PER: tl.constexpr = 32 // BITS
        WK: tl.constexpr = GROUP // PER
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, GROUP)
        offs_r = tl.arange(0, WK)
        shifts = tl.arange(0, PER) * BITS
        mask_m = offs_m < M
        groups = K // GROUP
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for g in tl.range(0, groups, num_stages=STAGES):
            k0 = g * GROUP
            a_hi = tl.load(hi_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0)
            a_lo = tl.load(lo_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :], mask=mask_m[:, None], other=0)
            words = tl.load(w_ptr + (k0 // PER + offs_r)[:, None] * N + offs_n[None, :])
            codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
            codes = tl.reshape(codes, (GROUP, BLOCK_N)).to(tl.int8)
            t = tl.dot(a_hi, codes) * 256 + tl.dot(a_lo, codes)  # (Triton 3.6 takes no int32 accumulator here)
            acc += t.to(tl.float32) * tl.load(s_ptr + g * N + offs_n)[None, :]
        for g0 in range(0, groups, 16):  # the zero points: r (BLOCK_M, 16) @ sz (16, BLOCK_N) per 16 groups
            offs_g = g0 + tl.arange(0, 16)
            r = tl.load(r_ptr + offs_m[:, None] * groups + offs_g[None, :],
                        mask=mask_m[:, None] & (offs_g < groups)[None, :], other=0)
            sz = tl.load(sz_ptr + offs_g[:, None] * N + offs_n[None, :], mask=(offs_g < groups)[:, None], other=0.0)
            acc -= tl.dot(r.to(tl.float32), sz, input_precision="ieee")
        sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], (acc * sx[:, None]).to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None])


def parse_config(text):
    """BLOCK_MxBLOCK_NxBLOCK_Kxwarpsxstages, and for the field variants optionally xSPLIT (split-K, default 1),
    for the gluon ones xDQ_WARPSxDQ_PARTS[xSWAP[xTAIL[xMATH]]] (gluon_gemm.CONFIGS; SWAP 1: the weight tile as
    wgmma's left operand, 2: the same, y stored from the accumulator; TAIL 1: the last wave's tiles split in K, 2:
    folded; MATH 1: two codes at a time in bfloat16x2, 2: the same with bfloat16 scales, 3: the scale after the
    products where one row of scales serves every input, MATH 1 with this probe's groups; gluon_gemm.dq_math)."""
    values = tuple(int(v) for v in text.split("x"))
    if len(values) not in (5, 6, 7, 8, 9, 10):
        raise ValueError(f"config {text!r}: expected BLOCK_MxBLOCK_NxBLOCK_Kxwarpsxstages[xsplit]")
    return values


def constants(variant, config):
    block_m, block_n, block_k, _, stages = config[:5]
    tma, swap, ws = VARIANTS[variant]
    return dict(BITS=BITS, GROUP=GROUP, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                TMA=tma, SWAP=swap, WS=ws)


def field_major(qweight, block_k=GROUP):
    """The words (K / 8, N) int32 repacked for fperm: inside each K tile of block_k inputs, code f of word row r
    holds input f * block_k / 8 + r (the project's layout: 8 r + f). The same codes, the same bytes."""
    per = 32 // BITS
    k, n = qweight.shape[0] * per, qweight.shape[1]
    shifts = torch.arange(per, device=qweight.device, dtype=torch.int64) * BITS
    codes = (qweight.long()[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)   # (K / 8, 8, N): 8 i + f
    codes = codes.reshape(k // block_k, per, block_k // per, n).transpose(1, 2)         # (tile, r, f, N)
    words = (codes << shifts[None, None, :, None]).sum(2).reshape(k // per, n)          # disjoint bits: a sum
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


_SPLIT_BUFFERS = {}  # (device, M, N, split, BLOCK_M, BLOCK_N): (float32 partials, arrival counters) of _field_kernel


def split_x(x, split=None):
    """x's int8 halves, row scales and group sums for _i8_kernel (into `split`'s tensors when given)."""
    m, k = x.shape
    if split is None:
        hi, lo = (torch.empty((m, k), device=x.device, dtype=torch.int8) for _ in range(2))
        sx = torch.empty(m, device=x.device, dtype=torch.float32)
        split = (hi, lo, sx, torch.empty((m, k // GROUP), device=x.device, dtype=torch.int32))
    _split_x_kernel[(triton.cdiv(m, 4),)](x, *split, m, k, GROUP=GROUP, BLOCK_M=4, num_warps=4)
    return split


def scaled_zeros(scale, zero):
    """sz = s * z (K / GROUP, N) float32: what _i8_kernel takes for the zero points (made once per weight)."""
    return scale * zero.float()


def i8(split, qweight, scale, sz, config, y, m):
    """y = x @ dequant(W)^T through _i8_kernel, x already split (split_x), sz = scaled_zeros(scale, zero)."""
    block_m, block_n, block_k, warps, stages = config
    k, n = split[0].shape[1], qweight.shape[1]
    _i8_kernel[(triton.cdiv(m, block_m), n // block_n)](*split, qweight, scale, sz, y, m, n, k, BITS=BITS,
                                                          GROUP=GROUP, BLOCK_M=block_m, BLOCK_N=block_n,
                                                          STAGES=stages, num_warps=warps, num_stages=stages)
    return y


def fold_roles(m_tiles, whole, rest, split):
    """Each program's role under gluon_gemm's TAIL 2 (FOLD), in program order (row tiles fastest): "whole" (its whole
    tile only), "sibling" (a part of a split tile, then its whole tile) or "owner" (its whole tile, then the split
    tile's last part, started from its siblings' sum): the last rest x m_tiles x split programs take parts."""
    first = m_tiles * whole - rest * m_tiles * split
    return ["whole" if g < first else "owner" if (g - first) % split == split - 1 else "sibling"
            for g in range(m_tiles * whole)]


def timeline(stamps, roles=None):
    """What gluon_gemm's STAMP stamps (an int64 (programs, 4) array: start, last product finished, y written, in ns of
    the global timer, and the multiprocessor) say about one call: its span, how many multiprocessors it used and the
    most programs one ran, and per round (a program's place among those of its multiprocessor, by start) how many
    programs, when the round's first and median program started (us after the call's first), and the median and
    longest time from a program's start to its last product and from there to y written (or its part handed off).
    A dict: span_us, programs, multiprocessors, most, rounds [(round, programs, first start, median start, median
    loop, longest loop, median epilogue, longest epilogue)]; with roles (a label per program, fold_roles()) also
    roles [(label, programs, median loop, longest loop, median epilogue, longest epilogue)], in order of first
    appearance."""
    import statistics
    rows = [tuple(int(v) for v in row) for row in stamps]
    t0 = min(r[0] for r in rows)
    per_sm = {}
    for r in sorted(rows):
        per_sm.setdefault(r[3], []).append(r)
    rounds = {}
    for runs in per_sm.values():
        for i, r in enumerate(runs):
            rounds.setdefault(i, []).append(r)
    out = []
    for i in sorted(rounds):
        rs = rounds[i]
        loops = [(r[1] - r[0]) / 1e3 for r in rs]
        starts = [(r[0] - t0) / 1e3 for r in rs]
        tails = [(r[2] - r[1]) / 1e3 for r in rs]
        out.append((i + 1, len(rs), min(starts), statistics.median(starts), statistics.median(loops), max(loops),
                    statistics.median(tails), max(tails)))
    by_role = {}
    for label, r in zip(roles or (), rows):
        by_role.setdefault(label, []).append(r)
    role_rows = []
    for label, rs in by_role.items():
        loops = [(r[1] - r[0]) / 1e3 for r in rs]
        tails = [(r[2] - r[1]) / 1e3 for r in rs]
        role_rows.append((label, len(rs), statistics.median(loops), max(loops), statistics.median(tails), max(tails)))
    return dict(span_us=(max(r[2] for r in rows) - t0) / 1e3, programs=len(rows), multiprocessors=len(per_sm),
                most=max(len(v) for v in per_sm.values()), rounds=out, roles=role_rows)


def timeline_lines(shape, text, summary):
    """timeline()'s dict as the lines --timeline prints."""
    lines = [f"  timeline {shape} {text}: span {summary['span_us']:.1f} us, {summary['programs']} programs on "
             f"{summary['multiprocessors']} multiprocessors, at most {summary['most']} on one"]
    for rnd, n, first, median, loop, longest, epilogue, slowest in summary["rounds"]:
        lines.append(f"    round {rnd}: {n} programs, first start {first:.1f} us, median start {median:.1f}, "
                     f"loop median {loop:.1f} (longest {longest:.1f}), epilogue {epilogue:.2f} (longest {slowest:.2f})")
    for label, n, loop, longest, epilogue, slowest in summary.get("roles", ()):
        lines.append(f"    {label}: {n} programs, loop median {loop:.1f} (longest {longest:.1f}), epilogue "
                     f"{epilogue:.2f} (longest {slowest:.2f})")
    return lines


_COUNTERS = {}


def _counters(device):
    """A split tile's arrival counters for the gluon variants' TAIL configs, zero again after each call (as a
    layer's split_counters), one set per device."""
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(4096, device=device, dtype=torch.int32)
    return _COUNTERS[device]


def probe(x, qweight, scale, zero, variant, config, y=None, split=None, sz=None, stamps=None, part_load=None):
    """y = x @ dequant(W)^T through _probe_kernel (or, for i8, _split_x_kernel and _i8_kernel; split: buffers
    for the halves of x, sz: scaled_zeros(scale, zero), each made here when not given; for the gluon variants
    gluon_gemm.gluon_mm, part_load its TAIL 2 owners' share's parameter, None: the module's)."""
    block_m, block_n, block_k, warps, stages = config[:5]
    split_k = config[5] if len(config) > 5 else 1
    if variant in GLUON_VARIANTS:
        gluon_gemm.swapped(config)  # gluon_gemm's own rule for a config's length, one line
        if config[2] != gluon_gemm.BLOCK_K:
            raise ValueError(f"{variant}: a config is BLOCK_MxBLOCK_Nx{gluon_gemm.BLOCK_K}xwarpsxstagesxDQ_WARPSx"
                             f"DQ_PARTS[xSWAP[xTAIL[xMATH]]] (got {config})")
        return gluon_gemm.gluon_mm(x, qweight, scale, zero, None, BITS, GROUP // 32, 0.0, config,
                                   diag=GLUON_VARIANTS[variant], counters=_counters(x.device), stamps=stamps,
                                   part_load=part_load)
    if len(config) > 6 or (split_k > 1 and variant not in FIELD_VARIANTS):
        raise ValueError(f"{variant}: split-K (a sixth number) is only in the field variants (got {config})")
    if variant == "i8":
        if block_k != GROUP or qweight.shape[1] % block_n or x.shape[1] % GROUP:
            raise ValueError(f"i8 needs BLOCK_K = {GROUP} and N % BLOCK_N == 0 (got {config})")
        y = torch.empty((x.shape[0], qweight.shape[1]), device=x.device, dtype=x.dtype) if y is None else y
        sz = scaled_zeros(scale, zero) if sz is None else sz
        return i8(split_x(x, split), qweight, scale, sz, config, y, x.shape[0])
    m, k = x.shape
    n = qweight.shape[1]
    if variant in FIELD_VARIANTS:  # qweight already field_major() for the fperm variants
        if block_k not in ((GROUP, 2 * GROUP) if variant.startswith("fperm") else (GROUP,)) or n % block_n \
                or k % block_k:
            raise ValueError(f"{variant}: BLOCK_K must be the group ({GROUP}; fperm: or twice it), N % BLOCK_N "
                             f"== 0 (got {config})")
        if (k // block_k) % split_k:
            raise ValueError(f"{variant}: {k // block_k} K tiles do not split in {split_k}")
        y = torch.empty((m, n), device=x.device, dtype=x.dtype) if y is None else y
        swap, perm = FIELD_VARIANTS[variant]
        grid = (triton.cdiv(m, block_m), n // block_n, split_k)
        key = (x.device, m, n, split_k, block_m, block_n)
        if key not in _SPLIT_BUFFERS:  # made on the first call, before any graph capture
            ws = torch.empty((split_k if split_k > 1 else 0, m, n), device=x.device, dtype=torch.float32)
            _SPLIT_BUFFERS[key] = (ws, torch.zeros(grid[0] * grid[1], device=x.device, dtype=torch.int32))
        ws, count = _SPLIT_BUFFERS[key]
        _field_kernel[grid](
            x, qweight, scale, zero, y, ws, count, m, n, k, BITS=BITS, GROUP=GROUP, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, SWAP=swap, PERM=perm, SPLIT=split_k > 1,
            num_warps=warps, num_stages=stages)
        return y
    if n % block_n or k % block_k or GROUP % block_k:
        raise ValueError(f"{n}x{k} does not tile by BLOCK_N={block_n}, BLOCK_K={block_k} (group {GROUP})")
    if y is None:
        y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, block_m), n // block_n)  # the programs that share a weight tile launch together
    _probe_kernel[grid](x, qweight, scale, zero, y, m, n, k, **constants(variant, config),
                        num_warps=warps, num_stages=stages)
    return y


def set_allocator(device):
    """tl.make_tensor_descriptor needs global scratch for the descriptors it builds on the device."""
    def alloc(size, alignment, stream):
        return torch.empty(size, device=device, dtype=torch.int8)
    triton.set_allocator(alloc)


def int4_layer(k, n, device, seed=0):
    """A random bf16 weight (n out, k in), and its int4 g128 asymmetric PackedLinear (the project's packing)."""
    from quantization.kernels import PackedLinear
    from quantization.quantizers import QuantSpec
    torch.manual_seed(seed)
    weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    layer = PackedLinear.from_float(weight.float(), QuantSpec("affine_quant", 4, "per_group", 128)).to(device)
    if layer.bits != BITS or layer.group_size != GROUP or layer.zero is None:
        raise RuntimeError(f"packing gave bits={layer.bits} group={layer.group_size} zero={layer.zero is not None}")
    return weight, layer


def errors(y, ref):
    """(||y - ref|| / ||ref||, max |y - ref| / max |ref|) against a float64 reference."""
    diff = y.double() - ref
    return (diff.norm() / ref.norm()).item(), (diff.abs().max() / ref.abs().max()).item()


# --- compile only (no GPU) --------------------------------------------------------------------------------------

class quiet_stderr:
    """Sends file descriptor 2 to a temporary file while a kernel compiles (a failing MLIR pass prints its whole
    module there); .tail is the last error line it printed."""
    def __enter__(self):
        sys.stderr.flush()
        self.file = tempfile.TemporaryFile(mode="w+")
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        errors = [line for line in self.file.read().splitlines()
                  if ("error:" in line or "Assertion" in line or "Unexpected" in line) and "Failures have been detected" not in line]
        self.file.close()
        self.tail = " ".join(errors[0].split()[-30:])[:240] if errors else ""
        return False


def compile_for(variant, config, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if variant in GLUON_VARIANTS:
        return gluon_gemm.compile_for(config, arch, diag=GLUON_VARIANTS[variant])
    if variant == "i8":
        signature = {"hi_ptr": "*i8", "lo_ptr": "*i8", "sx_ptr": "*fp32", "r_ptr": "*i32", "w_ptr": "*i32",
                     "s_ptr": "*fp32", "sz_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32"}
        consts = dict(BITS=BITS, GROUP=GROUP, BLOCK_M=config[0], BLOCK_N=config[1], STAGES=config[4])
        signature.update({name: "constexpr" for name in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 9, 10)}
        source = ASTSource(fn=_i8_kernel, signature=signature, constexprs=consts, attrs=attrs)
        return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config[3], num_stages=config[4]))
    signature = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*u8", "y_ptr": "*bf16",
                 "M": "i32", "N": "i32", "K": "i32"}
    fn = _probe_kernel
    if variant in FIELD_VARIANTS:
        fn = _field_kernel
        signature = dict(list(signature.items())[:5] + [("ws_ptr", "*fp32"), ("count_ptr", "*i32")]
                         + list(signature.items())[5:])
        consts = dict(BITS=BITS, GROUP=GROUP, BLOCK_M=config[0], BLOCK_N=config[1], BLOCK_K=config[2],
                      STAGES=config[4], SWAP=FIELD_VARIANTS[variant][0], PERM=FIELD_VARIANTS[variant][1],
                      SPLIT=len(config) > 5 and config[5] > 1)
    else:
        consts = constants(variant, config)
    signature.update({name: "constexpr" for name in consts})
    # pointers 16-byte aligned, N and K divisible by 16 (4096, 11008): what a launch on the GPU specializes on
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 6, 7)}
    if variant in FIELD_VARIANTS:  # pointers (with ws, count), M, N, K
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(10)}
    source = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config[3], num_stages=config[4]))


def sass_stats(cubin):
    """(SASS instructions, registers per thread) through the cuobjdump that Triton ships; (None, None) without."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    count = len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[^;]*;", text))
    registers = re.search(r"REG:(\d+)", usage)
    return count, int(registers.group(1)) if registers else None


def partitions(ttgir):
    """(warp-specialized partitions besides the default one, the distinct accumulator shapes of the wgmma ops):
    with an accumulator as large as the whole tile in two consumer partitions, both compute the same tile."""
    count = len(re.findall(r"^\s*partition\d+\(", ttgir, flags=re.M))
    shapes = sorted(set(re.findall(r"warp_group_dot [^\n]*-> tensor<(\d+x\d+)xf32", ttgir)))
    return count, shapes


def wgmma_operands(ptx):
    """(wgmma instructions, those whose left operand comes from registers) in the PTX."""
    lines = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    # wgmma ... {d...}, {a0, a1, a2, a3}, descB, ...: two braced lists where A is in registers, one where it is a
    # shared-memory descriptor
    return len(lines), sum(1 for line in lines if line.count("{") >= 2)


def compile_only(variants, arch):
    print(f"Triton {triton.__version__}, sm_{arch}")
    print("| variant | config | compiled | warp-specialized (partitions, wgmma acc) | TMA copies "
          "| wgmma (A from registers) | registers | shared KiB | SASS | PTX lines | compile s |")
    print("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    for variant in variants:
        for text in CONFIGS[variant]:
            config = parse_config(text)
            start = time.time()
            quiet = quiet_stderr()
            try:
                with quiet:
                    kernel = compile_for(variant, config, arch)
            except Exception as e:  # noqa: BLE001 (one line per variant, the run goes on)
                message = " ".join(str(e).split())[:120] + (f" ({quiet.tail})" if quiet.tail else "")
                print(f"| {variant} | {text} | no: {type(e).__name__}: {message} | | | | | | | | "
                      f"{time.time() - start:.1f} |", flush=True)
                continue
            seconds = time.time() - start
            ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
            count, shapes = partitions(ttgir)
            ws = f"yes ({count}, {' '.join(shapes)})" if "ttg.warp_specialize" in ttgir else "no"
            tma = len(re.findall(r"async_tma_copy_global_to_local", ttgir))
            wgmma, from_registers = wgmma_operands(ptx)
            sass, registers = sass_stats(kernel.asm["cubin"])
            print(f"| {variant} | {text} | yes | {ws} | {tma} | {wgmma} ({from_registers}) | {registers} "
                  f"| {kernel.metadata.shared / 1024:.0f} | {sass} | {len(ptx.splitlines())} | {seconds:.1f} |",
                  flush=True)


# --- the interpreter (CPU) --------------------------------------------------------------------------------------

def interpret(variants):
    """Every variant at INTERPRET_CONFIG on 64 rows, 256x256 (and 48 rows: masked rows), on the CPU."""
    if set(variants) & set(GLUON_VARIANTS):
        print("gluon: not run: Gluon kernels do not run under the interpreter (--compile_only compiles them)")
        variants = [v for v in variants if v not in GLUON_VARIANTS]
    _, layer = int4_layer(256, 256, "cpu")
    ref_w = layer.dequantized_weight().double()
    print(f"Triton {triton.__version__}, TRITON_INTERPRET=1, float32 x")
    print("| variant | config | rows | error | max err | result |")
    print("|---|---|---:|---:|---:|---|")
    for variant, text in [(v, c) for v in variants for c in (
            INTERPRET_FPERM if v.startswith("fperm") else INTERPRET_FIELD if v in FIELD_VARIANTS
            else [INTERPRET_I8] if v == "i8" else [INTERPRET_CONFIG])]:
        config = parse_config(text)
        words = field_major(layer.qweight, config[2]) if variant.startswith("fperm") else layer.qweight
        for m in (64, 48):
            # float32 x: the interpreter multiplies bf16 tensors as their raw 16-bit patterns (tl.dot of bf16
            # operands gives ~1e8), so the CPU check runs the kernel in float32; the GPU check is the bf16 gate
            x = torch.randn(m, 256) * 0.5
            try:
                y = probe(x, words, layer.scale, layer.zero, variant, config)
                err, max_err = errors(y, x.double() @ ref_w.T)
                result = "ok" if err < ERROR_LIMIT else "FAIL"
                print(f"| {variant} | {text} | {m} | {err:.1e} | {max_err:.1e} | {result} |", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"| {variant} | {text} | {m} | | | error: {type(e).__name__}: "
                      f"{' '.join(str(e).split())[:160]} |", flush=True)


# --- the GPU ----------------------------------------------------------------------------------------------------

def graph_time(calls):
    """Microseconds per call: the median replay of a CUDA graph of every call (each already run once)."""
    from quantization.kernels import ops
    return ops.replay_time(calls, warmup=10, rep=60) * 1e3


def copies(nbytes):
    return max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))


def bench_shape(shape, m, variants, project, log, stamp=False, part_loads=(None,)):
    from quantization.kernels import ops
    k, n = map(int, shape.split("x"))
    weight, layer = int4_layer(k, n, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ layer.dequantized_weight().double().T
    rows = []

    # cuBLAS bf16 over copies of the bf16 weight
    count = copies(weight.numel() * 2)
    weights = [weight] + [weight.clone() for _ in range(count - 1)]
    for w in weights:
        torch.mm(x, w.T)
    base = graph_time([lambda w=w: torch.mm(x, w.T) for w in weights])
    err, max_err = errors(torch.mm(x, weight.T), ref)
    rows.append((shape, "cuBLAS bf16", "-", base, err, max_err, ""))
    log(f"  {shape} cuBLAS bf16: {base:.1f} us ({count} copies)")
    del weights

    packed = [layer.qweight, layer.scale, layer.zero]
    nbytes = sum(t.numel() * t.element_size() for t in packed)
    count = copies(nbytes)
    sets = [packed] + [[t.clone() for t in packed] for _ in range(count - 1)]

    if project:  # PackedLinear's forward: ops.matmul, timed by the launcher on its first call for this shape
        try:
            layers = [layer] + [_clone_layer(layer, s) for s in sets[1:]]
            y = layer(x)
            chosen = f"{ops.last_choice.get('kernel')} {ops.last_choice.get('config')}"
            for lay in layers:
                lay(x)
            t = graph_time([lambda lay=lay: lay(x) for lay in layers])
            err, max_err = errors(y, ref)
            rows.append((shape, "project (PackedLinear)", chosen, t, err, max_err,
                         "" if err < ERROR_LIMIT else "FAIL"))
            log(f"  {shape} project: {t:.1f} us, {chosen}, error {err:.1e}")
            # the dequantize alone (the first half of dequant_mm), with the default config
            scratch = torch.empty((k, n), device="cuda", dtype=torch.bfloat16)
            calls = [lambda s=s: _dequant(s, scratch) for s in sets]
            for c in calls:
                c()
            t = graph_time(calls)
            rows.append((shape, "  its dequantize alone", str(ops.DEQUANT_CONFIGS[0]), t, float("nan"),
                         float("nan"), ""))
        except Exception as e:  # noqa: BLE001
            rows.append((shape, "project (PackedLinear)", "-", float("nan"), float("nan"), float("nan"),
                         f"error: {type(e).__name__}: {' '.join(str(e).split())[:120]}"))
            log(f"  {shape} project: {type(e).__name__}: {e}")

    perm_sets = {}  # BLOCK_K: the weight copies with their codes repacked field-major (fperm), made once
    runs = []  # (variant, config's text, config, part_load): a TAIL 2 config once per part_loads value
    for variant in variants:
        for text in CONFIGS[variant]:
            config = parse_config(text)
            fold = variant in GLUON_VARIANTS and len(config) == 9 and config[8] == 2
            runs += [(variant, text if pl is None else f"{text} part_load {pl:g}", config, pl)
                     for pl in (part_loads if fold else (None,))]
    for variant, text, config, part_load in runs:
        vsets = sets
        if variant.startswith("fperm"):
            if config[2] not in perm_sets:
                perm_sets[config[2]] = [[field_major(s[0], config[2])] + s[1:] for s in sets]
            vsets = perm_sets[config[2]]
        vpacked = vsets[0]
        start = time.time()
        try:
            split = split_x(x) if variant == "i8" else None  # buffers for x's halves, made before any capture
            y = probe(x, *vpacked, variant, config, split=split, part_load=part_load)
            torch.cuda.synchronize()
            err, max_err = errors(y, ref)
            outs = [torch.empty_like(y) for _ in vsets]
            # i8 takes s * z for the zero points, made here once per weight copy as a packed layer would
            szs = [scaled_zeros(sc, z) if variant == "i8" else None for _, sc, z in vsets]
            calls = [lambda s=s, o=o, sz=sz: probe(x, *s, variant, config, o, split, sz, part_load=part_load)
                     for s, o, sz in zip(vsets, outs, szs)]
            for c in calls:
                c()
            t = graph_time(calls)
            status = "" if err < ERROR_LIMIT else "FAIL"
            if GLUON_VARIANTS.get(variant):
                status = "diagnostic: parts left out, not the product"
            rows.append((shape, variant, text, t, err, max_err, status))
            log(f"  {shape} {variant} {text}: {t:.1f} us, {base / t:.2f}x cuBLAS, error {err:.1e} {status} "
                f"({time.time() - start:.1f} s)")
            if stamp and variant == "gluon":  # the timeline of each copy's call, back to back; the last printed
                m_tiles, (whole, rest, split_) = gluon_gemm.call_schedule(m, n, k, config, x.device)
                programs = m_tiles * (whole + rest * split_ * (gluon_gemm.tail(config) != 2))  # TAIL 2: parts in
                stamps = [torch.zeros(programs, 4, dtype=torch.int64, device="cuda") for _ in vsets]
                for s, st in zip(vsets, stamps):
                    probe(x, *s, variant, config, stamps=st, part_load=part_load)
                torch.cuda.synchronize()
                roles = fold_roles(m_tiles, whole, rest, split_) if gluon_gemm.tail(config) == 2 else None
                for line in timeline_lines(shape, text, timeline(stamps[-1].cpu().tolist(), roles)):
                    log(line)
            if variant == "i8":  # its two kernels apart: the GEMM on x already split, and the split alone
                calls = [lambda s=s, o=o, sz=sz: i8(split, s[0], s[1], sz, config, o, x.shape[0])
                         for s, o, sz in zip(sets, outs, szs)]
                for c in calls:
                    c()
                t = graph_time(calls)
                rows.append((shape, "  its GEMM alone", text, t, float("nan"), float("nan"), ""))
                if text == CONFIGS[variant][0]:  # (i8 configs have no part_load)
                    t = graph_time([lambda: split_x(x, split)])
                    rows.append((shape, "  its split of x alone", "-", t, float("nan"), float("nan"), ""))
        except Exception as e:  # noqa: BLE001 (a variant that fails to compile or run is one line)
            message = " ".join(str(e).split())[:160]
            rows.append((shape, variant, text, float("nan"), float("nan"), float("nan"),
                         f"error: {type(e).__name__}: {message}"))
            log(f"  {shape} {variant} {text}: {type(e).__name__}: {message}")
            torch.cuda.synchronize()
    return rows, base


def _clone_layer(layer, tensors):
    import copy
    clone = copy.copy(layer)  # shares the module's settings; its own buffers below
    clone._buffers = dict(layer._buffers)
    clone._buffers["qweight"] = tensors[0]
    clone._buffers["scale_bits"] = tensors[1].view(torch.int32)
    clone._buffers["zero"] = tensors[2]
    return clone


def _dequant(tensors, out):
    from quantization.kernels import ops
    from quantization.kernels.layout import BLOCK
    return ops.dequantize(*tensors, BITS, GROUP // BLOCK, 0.0, out, ops.DEQUANT_CONFIGS[0])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4096x4096,4096x11008", help="comma-separated in x out shapes")
    p.add_argument("--rows", type=int, default=256, help="rows of x")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--configs", default="", help="comma-separated BLOCK_MxBLOCK_NxBLOCK_Kxwarpsxstages for every "
                   "variant, with xSPLIT (split-K) for the field variants and "
                   "xDQ_WARPSxDQ_PARTS[xSWAP[xTAIL[xMATH]]] for the gluon ones (default: each variant's own "
                   "list)")
    p.add_argument("--no_project", action="store_true", help="skip the project's path (its first call tunes)")
    p.add_argument("--compile_only", action="store_true", help="no GPU: compile every config for --arch")
    p.add_argument("--arch", type=int, default=90, help="--compile_only's CUDA compute capability (90: H100/H200)")
    p.add_argument("--interpret", action="store_true", help="CPU check under TRITON_INTERPRET=1 (64 rows, 256x256)")
    p.add_argument("--part_load", default="", help="gluon TAIL 2 configs: comma-separated values of the owners' "
                   "share's parameter (gluon_gemm.fold_share's part_load, K tiles a sibling's part takes to load), "
                   "each config run once per value (default: gluon_gemm.PART_LOAD_TILES)")
    p.add_argument("--timeline", action="store_true", help="gluon: print each config's timeline per round of programs "
                   "on a multiprocessor (when programs started, their loop and epilogue times; timeline())")
    args = p.parse_args()
    if triton is None:
        print("prefill_ws_probe.py: needs Triton")
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"prefill_ws_probe.py: error: unknown variant {unknown[0]!r}; expected some of {', '.join(VARIANTS)}")
    if args.configs:
        try:
            for c in args.configs.split(","):
                parse_config(c)
        except ValueError as e:
            sys.exit(f"prefill_ws_probe.py: error: --configs: {e}")
        for v in variants:
            CONFIGS[v] = args.configs.split(",")
    try:
        part_loads = [float(v) for v in args.part_load.split(",") if v] or [None]
        if any(v < 0 for v in part_loads if v is not None):
            raise ValueError
    except ValueError:
        sys.exit(f"prefill_ws_probe.py: error: --part_load: expected comma-separated numbers >= 0, got "
                 f"{args.part_load!r}")
    if args.compile_only:
        compile_only(variants, args.arch)
        return
    if args.interpret:
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            sys.exit("prefill_ws_probe.py: error: --interpret needs TRITON_INTERPRET=1 in the environment")
        interpret(variants)
        return
    if not torch.cuda.is_available():
        print("prefill_ws_probe.py: needs a CUDA GPU (Hopper); --compile_only compiles the kernels without one")
        return
    set_allocator("cuda")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 (progress; the table on stdout)
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
    table = []
    for shape in [s for s in args.shapes.split(",") if s]:
        rows, base = bench_shape(shape, args.rows, variants, not args.no_project, log, args.timeline, part_loads)
        table += [(r, base) for r in rows]
    print(f"\nPrefill probe, {args.rows} rows, int4 g128 asymmetric, {torch.cuda.get_device_name()}, "
          f"Triton {triton.__version__}\n")
    print("| in x out | variant | config | time (us) | vs cuBLAS | error | max err | note |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for (shape, variant, config, t, err, max_err, note), base in table:
        vs = f"{base / t:.2f}" if t == t else "-"
        ts = f"{t:.1f}" if t == t else "-"
        es = f"{err:.1e}" if err == err else "-"
        ms = f"{max_err:.1e}" if max_err == max_err else "-"
        print(f"| {shape} | {variant} | {config} | {ts} | {vs} | {es} | {ms} | {note} |")


if __name__ == "__main__":
    main()
