"""Launching the packed kernels: which kernel, which config (the fastest of a small set, timed once per shape
on the first call, as a CUDA graph of back-to-back calls over copies of the weights: the time a decode step or a
benchmark sees), split-K, and a torch custom op so that torch.compile sees one opaque call per layer.

    matmul(x, qweight, scale, zero, bias, bits, group_size, in_features, zero_const, counters, activation) -> y
    (the custom op packed_matmul under torch.compile, a plain call in eager mode; activation: ACTIVATIONS[gelu],
    the GELU applied to y by the kernel that writes it)
    norm_mm(u, r, ...) -> y, residual_mm(x, res, gain, ...) -> (y, u): the same with the normalization before the
    layer, or the residual add after it, in the one-row kernel (inference.fuse_norms)
    kernel_refusal(x, bits, group_size) -> None (a kernel runs), "" (the CPU: silent fallback) or a reason

The choices persist across processes in a JSON file (choices_file(): $NANOQAT_KERNEL_CACHE, by default
~/.cache/nanoqat/kernel_choices.json; "off" keeps them in memory only), keyed by the GPU, the versions of torch and
Triton, a digest of the kernels' source and the shape: a new process reuses them instead of timing every shape again
(tens of seconds for a model). A stored choice is used only while it is still one of the candidates.
"""
import functools
import hashlib
import json
import math
import os
import sys
from typing import Optional

import torch

from safety import write_text_atomic

try:
    import triton
    from quantization.kernels import gluon_gemm, triton_kernels
except ImportError:  # no Triton: every PackedLinear takes the dequantize path
    triton = triton_kernels = gluon_gemm = None

from quantization.kernels.layout import BLOCK, KERNEL_BITS  # noqa: E402 (the one definition of both)


def _env_int(name, default):
    """An integer setting from the environment variable `name`, or `default` where it is unset."""
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


GEMV_MAX_ROWS = 16      # up to this many rows of x (batch x sequence): the GEMV kernel, else the GEMM kernel
# 2 to 16 rows: (BLOCK_N, BLOCK_B blocks of 32 codes, split-K parts (0: enough to fill the GPU), num_warps)
GEMV_CONFIGS = [(64, 2, 0, 4), (128, 1, 0, 8)]
# one row, small layers in one step per program: every word of a program's tile loaded at once (one memory round
# trip, the shape of tinygemm's kernel), narrow column tiles for enough programs without split-K: K = 768 in 32
# blocks (24 used), K = 3072 in 128 (96 used). The configs after the first six give each thread fewer codes (more
# warps per program): with 4 warps a (32, 32) tile is 256 codes a thread, with 8 warps an (8, 32) tile is 32. On an
# H200 8 warps won every small shape (bench/results/kernels_h200_goal.md); 16 warps are the next step
ONE_STEP_CONFIGS = [(32, 32, 0, 4, 0), (16, 32, 0, 2, 0), (8, 32, 0, 1, 0), (16, 128, 0, 4, 0),
                    (8, 128, 0, 4, 0), (8, 128, 0, 2, 0),
                    (8, 32, 0, 4, 0), (8, 32, 0, 8, 0), (16, 32, 0, 8, 0), (8, 128, 0, 8, 0), (16, 128, 0, 8, 0),
                    (8, 32, 0, 16, 0), (16, 32, 0, 16, 0), (32, 32, 0, 8, 0), (8, 128, 0, 16, 0),
                    (16, 128, 0, 16, 0),
                    # the winners above with their words loaded before the loop: under programmatic dependent
                    # launch (dependent_launch) that load overlaps the end of the kernel before
                    (32, 32, 0, 8, 1), (8, 32, 0, 8, 1), (8, 128, 0, 8, 1), (8, 128, 0, 16, 1), (16, 128, 0, 16, 1),
                    # the same with the step's x block in one load (XLOAD 1): every load of x before the first
                    # FMA. Built for 4096 x 4096, which it did not speed up; on an H200 the launcher picks the
                    # second for GPT-2's 768-wide layers, 15-20% faster (bench/results/xload_h200/README.md)
                    (16, 128, 0, 16, 0, 1), (32, 32, 0, 8, 1, 1)]
# one row: (BLOCK_N, BLOCK_B blocks of 32 codes, programs per multiprocessor that split-K aims for (0: no split:
# no atomics, no zeroing and no cast after), num_warps, prefetch the next step's words (1) or not (0)[, how a step
# gets x (the kernel's XLOAD; 0 where left out): 0 a load per value where it is used, 1 its (BLOCK_B, 32) block in
# one load at the step's start]). The last six before ONE_STEP_CONFIGS are for small layers (weights in L2, a few
# microseconds): narrow column tiles give many programs without split-K, whose hand-off (store, counter, reload) is
# a second round trip through memory
STREAM_CONFIGS = [(128, 4, 4, 4, 1), (256, 2, 4, 4, 1), (128, 8, 16, 4, 0), (128, 8, 4, 4, 1),
                  (32, 8, 0, 2, 1), (64, 4, 0, 2, 1), (32, 4, 2, 2, 1), (64, 8, 0, 4, 0), (32, 2, 8, 1, 1),
                  (32, 4, 4, 1, 1),
                  # long K (16384 x 4096 in the 6.7B shape): a (32, 32) tile in two splits, 17.8 against 19.6 us on
                  # an H200 (bench/results/one_row_h200/README.md)
                  (32, 32, 2, 8, 1)] + ONE_STEP_CONFIGS
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, programs per multiprocessor that split-K aims for (0: no
# split), unpack); BLOCK_K shrinks to divide the group size. 128 or 256 rows a tile: each tile of weights is
# dequantized once per BLOCK_M rows of x. unpack 1: each word is loaded once and its codes shifted out along a new
# axis (triton_kernels._code_tile), where 0 loads the word once per code it holds (8 loads per int4 word). At 256
# rows on an H200 dequant_mm beat every one of these for every format (bench/results/kernels_h200_peer.md); split-K
# configs, 256 x 64 tiles and the operands swapped (gemm_t) were timed too, never chosen, and taken out (each costs
# tuning time); these stay for fewer rows, where the dequantize's fixed cost weighs more
GEMM_CONFIGS = [(128, 128, 64, 8, 3, 0, 0), (64, 128, 64, 4, 3, 0, 0), (128, 64, 64, 4, 3, 0, 0),
                (256, 128, 64, 8, 3, 0, 0), (128, 128, 128, 8, 2, 0, 0), (64, 64, 128, 4, 4, 0, 0),
                (128, 128, 64, 8, 3, 0, 1), (256, 128, 64, 8, 3, 0, 1)]
# 2 to 16 rows on the tensor cores (tl.dot needs 16 rows: the rest are masked), split-K to fill the GPU
SMALL_GEMM_CONFIGS = [(16, 64, 128, 4, 3, 4, 0), (16, 128, 64, 4, 3, 4, 0), (16, 64, 128, 4, 4, 8, 0),
                      (16, 128, 128, 4, 3, 2, 0), (16, 64, 128, 4, 3, 0, 0),
                      (16, 64, 128, 4, 3, 4, 1), (16, 128, 64, 4, 3, 4, 1), (16, 64, 128, 4, 4, 8, 1),
                      (16, 128, 128, 4, 3, 2, 1), (16, 64, 128, 4, 3, 0, 1), (16, 32, 128, 4, 3, 4, 1),
                      (16, 32, 128, 4, 3, 0, 1), (16, 32, 128, 2, 4, 0, 1), (16, 16, 128, 2, 3, 0, 1),
                      (16, 32, 128, 4, 3, 2, 1)]
# the whole weight dequantized into a reused scratch, then cuBLAS: (BLOCK_B blocks of 32 codes, BLOCK_N, num_warps)
# of triton_kernels._dequant_words_kernel (unpacked on the store side: at about 80% of the copy bandwidth on an H200,
# bench/results/kernels_profile_h200_prefill.md)
DEQUANT_CONFIGS = [(1, 256, 4), (1, 512, 4), (2, 256, 4), (4, 256, 8)]
# the epilogue activation of a call: F.gelu's `approximate` (None: none) -> the kernels' ACT code (_activate)
ACTIVATIONS = {None: 0, "none": 1, "tanh": 2}
# PDL for layers of at most this many bytes of codes: on an H200 it sped GPT-2 124M's decode (layers of 0.3-1.2 MiB),
# slowed the 6.7B shape's on all its layers (8-22 MiB; bench/results/pdl_h200/README.md) and sped it on the 8 MiB
# one alone (409-412 -> 428 tokens/s, bench/results/pdl_8mib_h200/README.md)
PDL_MAX_BYTES = _env_int("NANOQAT_PDL_MAX_BYTES", 8 * 2**20)  # the variable sets it, to measure
# the fused normalization (norm_matmul) loads a row of up to this many values before the one-row kernel's loop, a
# longer one after it: held through the loop, the 6.7B shape's rows of 4096 cost 11% of its decode on an H200, where
# XL's (1600) gained (bench/results/norms_h200/README.md). NANOQAT_EARLY_ROW sets it, to measure
EARLY_ROW = _env_int("NANOQAT_EARLY_ROW", 2048)
# 1: the fused normalization's statistics computed before the one-row kernel's loop, whatever the row's length (the
# kernel's STATS: two values held through the loop, no reduction in the epilogue; EARLY_ROW then unused). On an H100
# the 6.7B decode went 402, 402 -> 413, 409 tokens/s, alternating, and a block of its layers 68.1 -> 65.2 us
# (bench/results/step_budget_h100/README.md), with the whole row held for the reduction: 80 registers, two waves of
# the up projection's programs. The row is now read in chunks (64 registers, one wave; not yet timed on a GPU).
# NANOQAT_NORM_STATS=0 puts the statistics back in the epilogue
NORM_STATS = _env_int("NANOQAT_NORM_STATS", 1)
# 1: a fused call (norm_matmul, residual_matmul) is tuned as it runs, with its LayerNorm or residual add, under a
# key of its own: the fused kernels hold more registers than the plain one (docs/kernels.md: 5 of 34 configs more
# with the norm), so another config may fit more programs. 0: the plain kernel's choice of the shape (as before;
# NANOQAT_FUSED_TUNING=0, to measure)
FUSED_TUNING = _env_int("NANOQAT_FUSED_TUNING", 1)
TUNE_COPIES = 64    # at most this many copies of a layer's weights in a tuning graph (enough to leave L2 for most)
TIE = 0.03          # a later candidate must beat an earlier one by this share to be chosen: stable choices
AGREE = 1e-2        # a Gluon candidate's relative error to the first candidate at tuning (each is ~2e-3 in bf16)
_best = {}      # tuning key -> (kernel, config)
_stored = None  # the choices file's entries, read once per process (choices_file)
last_choice = {}  # the kernel and config of the latest timed call (bench/kernels.py prints it)
_said = set()   # fallback messages already printed
_scratch = {}   # (device, dtype) -> the dequantized-weight buffer that every dequant_mm call reuses
_retired = []   # smaller scratch buffers a captured CUDA graph may still write: kept, never freed


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_refusal(x, bits, group_size):
    """Why x cannot go through a kernel: None when it can, "" on the CPU (not worth a message), else a reason."""
    if x.device.type == "cpu" and not interpreting():
        return ""
    if triton_kernels is None:
        return "Triton is not installed"
    if x.device.type not in ("cuda", "cpu"):
        return f"no kernel for device {x.device.type}"
    if bits not in KERNEL_BITS:
        return f"no kernel for {bits}-bit codes (kernels: {', '.join(map(str, KERNEL_BITS))})"
    if group_size % BLOCK:
        return f"no kernel for group_size={group_size} (kernels need a multiple of {BLOCK})"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"no kernel for {x.dtype} activations"
    return None


def say_once(reason):
    if reason:
        note_once(f"{reason}; using the dequantize path (x @ dequant(W).T + b)")


def note_once(message):
    """One line on stderr, once per process."""
    if message not in _said:
        _said.add(message)
        print(f"PackedLinear: {message}", file=sys.stderr)


def activate(y, activation):
    """The epilogue activation (an ACTIVATIONS code) in PyTorch, for the paths whose last kernel is not ours."""
    if activation == 0:
        return y
    return torch.nn.functional.gelu(y, approximate="none" if activation == 1 else "tanh")


def dependent_launch(device, qweight):
    """Whether a layer's kernels launch with programmatic dependent launch (PDL: each may start while the kernel
    before it finishes, loading its weights meanwhile; triton_kernels._after_earlier_kernels): on CUDA GPUs of
    compute capability 9 or more (Hopper), for layers of at most PDL_MAX_BYTES of codes, unless NANOQAT_PDL=0
    (to measure without it)."""
    return qweight.numel() * qweight.element_size() <= PDL_MAX_BYTES and pdl_available(device)


def pdl_available(device):
    """Whether kernels on `device` may launch with programmatic dependent launch: a CUDA GPU of compute capability 9
    or more, unless NANOQAT_PDL=0."""
    if device.type != "cuda" or os.environ.get("NANOQAT_PDL", "1") == "0":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)[0]


def multiprocessors(device):
    """Streaming multiprocessors of a CUDA device, which split-K aims to fill (1 elsewhere: the interpreter)."""
    return _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemv(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config, activation=0):
    block_n, block_b, split, warps = config
    m, k = x.shape
    n = qweight.shape[1]
    block_m = min(triton.next_power_of_2(m), GEMV_MAX_ROWS)
    num_blocks = triton.cdiv(k, BLOCK)
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    if split == 0:  # split K until about four programs per multiprocessor
        split = max(1, min(triton.cdiv(4 * multiprocessors(x.device), programs), num_blocks // (4 * block_b)))
    per_split = triton.cdiv(triton.cdiv(num_blocks, split), block_b) * block_b
    split = triton.cdiv(num_blocks, per_split)
    atomic = split > 1
    y = (torch.zeros if atomic else torch.empty)((m, n), device=x.device, dtype=torch.float32 if atomic else x.dtype)
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))
    triton_kernels._gemv_kernel[grid](
        x, qweight, scale, zero if zero is not None else scale, bias if bias is not None else scale, y,
        m, n, k, x.stride(0), y.stride(0), blocks_per_group, per_split,
        BITS=bits, HAS_ZERO=zero is not None, ZERO=zero_const, HAS_BIAS=bias is not None, ATOMIC=atomic,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_B=block_b, ACT=0 if atomic else activation, num_warps=warps)
    return activate(y, activation).to(x.dtype) if atomic else y


def norm_input_dtype(dtype):
    """The dtype of u = r * gain, a fused normalization's input (residual_matmul writes it, norm_matmul reads it as
    x) for a residual stream of `dtype`: bfloat16 for bfloat16 (a float32 x cost the 6.7B shape's q/k/v and up loops
    2.7 us a block, bench/results/step_budget_h100; bench/fused_norm_precision.py measures the precision), float32
    otherwise (float16's range would overflow where |r * gain| passes 65,504)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def stream_grid(m, n, k, config, device):
    """The one-row kernel's grid for m rows of x, n outputs and k inputs under `config`: (column tiles, splits of
    K, blocks of 32 inputs per split); its programs are tiles * splits * m."""
    block_n, block_b, split = config[:3]
    num_blocks = triton.cdiv(k, BLOCK)
    tiles = triton.cdiv(n, block_n)
    if split:  # split K until about `split` programs per multiprocessor
        split = max(1, min(triton.cdiv(split * multiprocessors(device), tiles * m), num_blocks // (2 * block_b)))
    else:
        split = 1
    per_split = triton.cdiv(triton.cdiv(num_blocks, split), block_b) * block_b
    return tiles, triton.cdiv(num_blocks, per_split), per_split


def stream_gemv(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config, counters=None,
                activation=0, norm=None, residual=None, stamps=None, pdl=None):
    """counters: int32 zeros, at least one per column tile (PackedLinear.split_counters), zero again after the
    call; zeroed here when not given.
    stamps (bench/pdl_timeline.py): an int64 tensor of at least 5 per program (stream_grid), where each program
    writes when it ran (the kernel's STAMP). pdl: programmatic dependent launch on or off (None: dependent_launch).
    norm = (r, wg, kind, eps): x is u = r * gain (norm_input_dtype) and the output is the layer of the normalized r
    (norm_matmul); residual = (res, gain): res is added to the output, and u = output * gain is returned with it,
    in norm_input_dtype(res.dtype) (residual_matmul). The output then has r's or res's dtype."""
    block_n, block_b, _, warps, prefetch = config[:5]
    xload = config[5] if len(config) > 5 else 0
    m, k = x.shape
    n = qweight.shape[1]
    num_blocks = triton.cdiv(k, BLOCK)
    tiles, split, per_split = stream_grid(m, n, k, config, x.device)
    if split > 1 and (counters is None or counters.numel() < tiles * m):
        counters = torch.zeros(tiles * m, device=x.device, dtype=torch.int32)
    even = k % BLOCK == 0 and num_blocks % block_b == 0
    if pdl is None:
        pdl = dependent_launch(x.device, qweight)
    dtype = norm[0].dtype if norm is not None else residual[0].dtype if residual is not None else x.dtype
    y = torch.empty((m, n), device=x.device, dtype=dtype)
    workspace = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    extra = {}
    if norm is not None:
        r, wg, kind, eps = norm
        extra = dict(r_ptr=r, wg_ptr=wg, stride_rm=r.stride(0), eps=eps, NORM=kind, KP=triton.next_power_of_2(k),
                     EARLY=k <= EARLY_ROW and not NORM_STATS, STATS=bool(NORM_STATS))
    if residual is not None:
        res, gain = residual
        u = torch.empty((m, n), device=x.device, dtype=norm_input_dtype(res.dtype))
        extra = dict(res_ptr=res, g_ptr=gain, u_ptr=u, stride_resm=res.stride(0), stride_um=u.stride(0), RESID=True,
                     EMIT_U=True)
    triton_kernels._stream_gemv_kernel[(tiles, split, m)](
        x, qweight, scale, zero if zero is not None else scale, bias if bias is not None else scale, y, workspace,
        counters if counters is not None else y, m, n, k, x.stride(0), y.stride(0), blocks_per_group, per_split,
        BITS=bits, HAS_ZERO=zero is not None, ZERO=zero_const, HAS_BIAS=bias is not None, SPLIT=split > 1,
        EVEN=even, BLOCK_N=block_n, BLOCK_B=block_b, PREFETCH=bool(prefetch), ACT=activation, PDL=pdl, XLOAD=xload,
        stamp_ptr=stamps, STAMP=stamps is not None, launch_pdl=pdl, num_warps=warps, **extra)
    return (y, u) if residual is not None else y


def gemm(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config, counters=None, activation=0):
    """counters as for stream_gemv: at least one per (BLOCK_M, BLOCK_N) tile of y when K is split."""
    block_m, block_n, block_k, warps, stages, split = config[:6]
    unpack = config[6] if len(config) > 6 else 0
    m, k = x.shape
    n = qweight.shape[1]
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    if split:  # split K until about `split` programs per multiprocessor, each at least one K tile
        split = max(1, min(triton.cdiv(split * multiprocessors(x.device), tiles), k_tiles))
    else:
        split = 1
    per_split = triton.cdiv(k_tiles, split)
    split = triton.cdiv(k_tiles, per_split)
    if split > 1 and (counters is None or counters.numel() < tiles):
        counters = torch.zeros(tiles, device=x.device, dtype=torch.int32)
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    workspace = torch.empty((split, m, n), device=x.device, dtype=torch.float32) if split > 1 else y
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    pdl = dependent_launch(x.device, qweight)
    triton_kernels._gemm_kernel[grid](
        x, qweight, scale, zero if zero is not None else scale, bias if bias is not None else scale, y, workspace,
        counters if counters is not None else y, m, n, k, x.stride(0), y.stride(0), blocks_per_group,
        per_split * block_k // BLOCK,
        BITS=bits, HAS_ZERO=zero is not None, ZERO=zero_const, HAS_BIAS=bias is not None, SPLIT=split > 1,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UNPACK=bool(unpack), ACT=activation, PDL=pdl,
        ZWORDS=zero is not None and n % 4 == 0 and zero.data_ptr() % 4 == 0,
        launch_pdl=pdl, num_warps=warps, num_stages=stages)
    return y


def scratch(numel, device, dtype):
    """A buffer of at least numel elements shared by every layer's dequant_mm (calls on one stream run one after
    another); grown outside CUDA graph captures only (run() tunes before any capture sees the shape)."""
    buffer = _scratch.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        if buffer is not None:
            _retired.append(buffer)
        buffer = _scratch[device, dtype] = torch.empty(numel, device=device, dtype=dtype)
    return buffer[:numel]


def dequant_mm(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config, activation=0):
    """y = x @ W + b through cuBLAS: the weight dequantized (one kernel) into the reused scratch as W (K, N) in x's
    dtype, then one matmul. For many rows, where cuBLAS's tiles outrun dequantizing inside the GEMM."""
    k = x.shape[1]
    w = scratch(k * qweight.shape[1], x.device, x.dtype).view(k, qweight.shape[1])
    dequantize(qweight, scale, zero, bits, blocks_per_group, zero_const, w, config, dependent_launch(x.device, qweight))
    y = torch.mm(x, w) if bias is None else torch.addmm(bias.to(x.dtype), x, w)
    return activate(y, activation)


def dequantize(qweight, scale, zero, bits, blocks_per_group, zero_const, out, config, pdl=False):
    """The whole weight, transposed, into out (K, N), in out's dtype: one _dequant_words_kernel launch (a
    DEQUANT_CONFIGS config)."""
    block_b, block_n, warps = config
    k, n = out.shape
    triton_kernels._dequant_words_kernel[(triton.cdiv(triton.cdiv(k, BLOCK), block_b), triton.cdiv(n, block_n))](
        qweight, scale, zero if zero is not None else scale, out, n, k, out.stride(0), blocks_per_group,
        BITS=bits, HAS_ZERO=zero is not None, ZERO=zero_const, BLOCK_B=block_b, BLOCK_N=block_n, PDL=pdl,
        launch_pdl=pdl, num_warps=warps)
    return out


def _fit_k(block_k, group_size):
    """BLOCK_K shrunk to divide the group size, so that a K tile has one scale per output column."""
    return math.gcd(block_k, group_size) if group_size else block_k


def candidates(m, group_size, bits=None, gluon=False, n=None):
    """The (kernel, config) pairs that may run m rows, the default first (the one used without timing: on the
    CPU under the interpreter, and in a CUDA graph capture of a shape never timed). For 3-bit codes (bits=3) the
    unpack configs are left out: 3-bit words hold no whole codes, so those compile to their gather twins. gluon:
    the call is one that gluon_gemm.gluon_mm runs (gluon_gemm.supports: Hopper, 1 to 4 or 8-bit codes), whose
    configs join the many-row candidates, those whose tiles divide n outputs where n is given."""
    def keep(config):  # unpack configs ([-1] == 1) skip 3-bit codes
        return not (bits == 3 and config[-1])
    dequants = [(dequant_mm, c) for c in DEQUANT_CONFIGS]
    if m == 1:
        return [(stream_gemv, c) for c in STREAM_CONFIGS]
    gemms = [(gemm, (bm, bn, _fit_k(bk, group_size), *rest))
             for bm, bn, bk, *rest in (SMALL_GEMM_CONFIGS if m <= GEMV_MAX_ROWS else GEMM_CONFIGS) if keep(rest)]
    if m <= GEMV_MAX_ROWS:
        return gemms + [(gemv, c) for c in GEMV_CONFIGS] + dequants
    return gemms + dequants + ([(gluon_gemm.gluon_mm, c) for c in gluon_gemm.CONFIGS if not n or n % c[1] == 0]
                               if gluon else [])


def call_candidates(x, qweight, zero, bits, group_size, in_features):
    """candidates() for one call's arguments: with gluon_gemm's configs where it runs the call (more than
    GEMV_MAX_ROWS rows, gluon_gemm.supports)."""
    m = x.shape[0]
    gluon = m > GEMV_MAX_ROWS and gluon_gemm.supports(x, qweight, bits, group_size, in_features, zero)
    return candidates(m, group_size, bits, gluon=gluon, n=qweight.shape[1])


def run(x, qweight, scale, zero, bias, bits, group_size, in_features, zero_const, counters=None, activation=0):
    """y = x @ dequant(W).T + bias for a 2-D contiguous x, with the fastest (kernel, config) of a small set, then
    the activation (an ACTIVATIONS code) applied by the kernel that writes y. The choice of a shape does not depend
    on the activation (a few instructions per output, the same in every config)."""
    args = (x, qweight, scale, zero, bias, bits, blocks_of(group_size, in_features), zero_const)
    kernel, config = choose(args, group_size, in_features, counters)
    return bind(kernel, counters, activation)(*args, config)


def blocks_of(group_size, in_features):
    """Blocks of 32 codes per scale group (per channel: every block of the row)."""
    return group_size // BLOCK if group_size else triton.cdiv(in_features, BLOCK)


def fused_tag(fused):
    """The tuning key's name of a fused call's extra arguments (stream_gemv's norm= or residual=): "norm1" (LayerNorm),
    "norm2" (RMSNorm), "residual", or None for a plain call."""
    if not fused:
        return None
    return f"norm{fused['norm'][2]}" if "norm" in fused else "residual"


def choose(args, group_size, in_features, counters=None, fused=None):
    """The (kernel, config) that runs a call's arguments (x first): the stored or timed choice of its shape, or,
    on the CPU and inside a CUDA graph capture (nothing is timed there), the default candidate. `fused`: the
    norm= or residual= arguments of a one-row fused call, timed with them under a key of their own (FUSED_TUNING)."""
    x, qweight, zero, bias, bits = args[0], args[1], args[3], args[4], args[5]
    m = x.shape[0]
    rows = triton.next_power_of_2(m) if m > GEMV_MAX_ROWS else m
    tag = fused_tag(fused) if FUSED_TUNING else None
    key = (rows, qweight.shape[1], in_features, bits, group_size, zero is not None, bias is not None, x.dtype,
           x.device) + ((tag,) if tag else ())
    if key not in _best:  # the candidates are listed only until a shape has its choice
        pairs = call_candidates(x, qweight, zero, bits, group_size, in_features)
        if interpreting() or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return pairs[0]
        name = stored_name(key)
        _best[key] = stored_choice(name, pairs)
        if _best[key] is None:
            _best[key] = _fastest(args, pairs, counters, fused=fused if tag else None)
            store_choice(name, _best[key])
    kernel, config = _best[key]
    last_choice.update(kernel=kernel.__name__, config=config)
    return kernel, config


def one_row_config(args, group_size, in_features, counters=None, fused=None):
    """The one-row kernel's config for a call whose rows all go through stream_gemv (the fused normalization and
    residual below): the choice of the shape at one row (timed on the first row of x, and of the fused call's r or
    res, with `fused`: stream_gemv's norm= or residual=)."""
    args = (args[0][:1].contiguous(),) + tuple(args[1:])
    if fused and "norm" in fused:
        r, wg, kind, eps = fused["norm"]
        fused = dict(norm=(r[:1].contiguous(), wg, kind, eps))
    elif fused:
        res, gain = fused["residual"]
        fused = dict(residual=(res[:1].contiguous(), gain))
    return choose(args, group_size, in_features, counters, fused)[1]


def _norm_matmul(u: torch.Tensor, r: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 zero: Optional[torch.Tensor], bias: Optional[torch.Tensor], wg: torch.Tensor, bits: int,
                 group_size: int, in_features: int, zero_const: float, counters: Optional[torch.Tensor],
                 activation: int, kind: int, eps: float) -> torch.Tensor:
    u2, r2 = u.reshape(-1, in_features).contiguous(), r.reshape(-1, in_features).contiguous()
    args = (u2, qweight, scale, zero, bias, bits, blocks_of(group_size, in_features), zero_const)
    config = one_row_config(args, group_size, in_features, counters, dict(norm=(r2, wg, kind, eps)))
    y = stream_gemv(*args, config, counters=counters, activation=activation, norm=(r2, wg, kind, eps))
    return y.reshape(*r.shape[:-1], qweight.shape[1])


# y = norm(r) @ dequant(W).T + b in one kernel (PackedLinear.norm_forward): u = r * the norm's gain, wg =
# W @ gain, bias = b + W @ the norm's bias, kind 1 LayerNorm or 2 RMSNorm; the one-row kernel for every row
norm_matmul = torch.library.custom_op("nanoqat::packed_norm_matmul", _norm_matmul, mutates_args=())


@norm_matmul.register_fake
def _(u, r, qweight, scale, zero, bias, wg, bits, group_size, in_features, zero_const, counters, activation, kind,
      eps):
    return r.new_empty((*r.shape[:-1], qweight.shape[1]))


def _residual_matmul(x: torch.Tensor, res: torch.Tensor, gain: torch.Tensor, qweight: torch.Tensor,
                     scale: torch.Tensor, zero: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int,
                     group_size: int, in_features: int, zero_const: float,
                     counters: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = qweight.shape[1]
    x2, res2 = x.reshape(-1, in_features).contiguous(), res.reshape(-1, n).contiguous()
    args = (x2, qweight, scale, zero, bias, bits, blocks_of(group_size, in_features), zero_const)
    config = one_row_config(args, group_size, in_features, counters, dict(residual=(res2, gain)))
    y, u = stream_gemv(*args, config, counters=counters, residual=(res2, gain))
    return y.reshape(res.shape), u.reshape(res.shape)


# (res + x @ dequant(W).T + b, that sum * gain: norm_input_dtype) in one kernel (PackedLinear.residual_forward): the
# residual add after a layer, and the next normalization's u for norm_matmul
residual_matmul = torch.library.custom_op("nanoqat::packed_residual_matmul", _residual_matmul, mutates_args=())


@residual_matmul.register_fake
def _(x, res, gain, qweight, scale, zero, bias, bits, group_size, in_features, zero_const, counters):
    return res.new_empty(res.shape), res.new_empty(res.shape, dtype=norm_input_dtype(res.dtype))


def choices_file():
    """Where the chosen (kernel, config) of each shape persist, or None (NANOQAT_KERNEL_CACHE=off)."""
    path = os.environ.get("NANOQAT_KERNEL_CACHE", os.path.join("~", ".cache", "nanoqat", "kernel_choices.json"))
    return None if path.lower() in ("", "off", "0", "none") else os.path.expanduser(path)


@functools.lru_cache(maxsize=None)
def source_digest(*files):
    """A digest of the kernels' source and the candidate lists (this file, triton_kernels.py, gluon_gemm.py and
    `files`): a stored choice made for other kernels is not reused."""
    digest = hashlib.sha256()
    for path in (__file__, triton_kernels.__file__, gluon_gemm.__file__) + files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def choice_name(device, shape, *files):
    """The choices file's name for a shape: the GPU, torch, Triton and the kernels' source (source_digest(*files)),
    then `shape` (a description of the call)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{gpu}|torch {torch.__version__}|triton {triton.__version__}|{source_digest(*files)}|{shape}"


def stored_name(key):
    """choice_name of a tuning key of run()."""
    rows, n, k, bits, group_size, has_zero, has_bias, dtype, device = key[:9]
    fused = f" fused {key[9]}" if len(key) > 9 else ""
    return choice_name(device, f"rows {rows} n {n} k {k} bits {bits} group {group_size} zero {int(has_zero)} "
                               f"bias {int(has_bias)} {str(dtype).split('.')[-1]}{fused}")


def _read_choices(path):
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object")
        return entries
    except (FileNotFoundError, NotADirectoryError):  # none yet (store_choice says if it cannot write one)
        return {}
    except (OSError, ValueError) as e:  # unreadable or not ours: tune again and write a fresh one
        note_once(f"{path} is not a kernel choices file ({str(e)[:80]}); the shapes are timed again")
        return {}


def stored_choice(name, pairs):
    """The (kernel, config) stored under `name`, if it is still one of `pairs`; else None."""
    global _stored
    path = choices_file()
    if path is None:
        return None
    if _stored is None:
        _stored = _read_choices(path)
    entry = _stored.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
        return None
    return next(((kernel, config) for kernel, config in pairs
                 if kernel.__name__ == entry[0] and list(config) == entry[1]), None)


def store_choice(name, pair):
    """Add one shape's choice to the choices file (merged with what other processes wrote; written atomically).
    A file that cannot be written only costs the timing again next time."""
    global _stored
    path = choices_file()
    if path is None:
        return
    entries = _read_choices(path)
    entries[name] = [pair[0].__name__, list(pair[1])]
    _stored = entries
    try:
        write_text_atomic(path, json.dumps(entries, indent=0, sort_keys=True))
    except OSError as e:
        note_once(f"cannot write {path} ({e.strerror}); kernel choices are kept for this process only")


def bind(kernel, counters, activation=0):
    """A kernel with the call's activation, a split-K kernel with the layer's own arrival counters
    (PackedLinear.split_counters)."""
    if kernel in (stream_gemv, gemm):
        return functools.partial(kernel, counters=counters, activation=activation)
    extra = dict(activation=activation) if activation else {}
    if gluon_gemm is not None and kernel is gluon_gemm.gluon_mm:  # counters for a config whose TAIL splits K
        extra["counters"] = counters
    return functools.partial(kernel, **extra) if extra else kernel


def _fastest(args, pairs, counters=None, weights=3, fused=None):
    """The first (kernel, config) within TIE of the fastest, each timed as the median replay of a CUDA graph of
    back-to-back calls over copies of the layer's weights (enough copies to be twice the L2 cache, or TUNE_COPIES):
    weights from memory and no launch gaps, as in a graph-captured decode step and in bench/kernels.py. An isolated
    call's time (what this chose by before) includes a launch and ranked configs differently from run to run.
    `weights`: how many of the arguments after x are the layer's weights (copied): (qweight, scale, zero) here.
    `fused`: stream_gemv's norm= or residual=, passed to every (stream_gemv) candidate."""
    times, copies = {}, weight_copies(args, weights)  # one set of copies for every candidate
    reference = []  # the first candidate's output, made for the first Gluon candidate
    for kernel, config in pairs:
        call = functools.partial(bind(kernel, counters), **fused) if fused else bind(kernel, counters)
        try:
            if kernel is gluon_gemm.gluon_mm:  # Gluon is experimental: its output is checked before it is timed
                reference = reference or [bind(pairs[0][0], counters)(*args, pairs[0][1])]
                if not agrees(call(*args, config), reference[0]):
                    print(f"packed kernels: gluon_mm {config} disagrees with {pairs[0][0].__name__} here (relative "
                          f"error above {AGREE}); timing the other kernels", file=sys.stderr)
                    continue
            times[kernel, config] = graph_time(args, call, config, copies, weights)
        except Exception as e:  # a config the device cannot run (too many registers, shared memory): skipped
            if "OutOfResources" in type(e).__name__ or "out of resource" in str(e).lower():
                continue  # a property of the config and the format (8-bit codes need more shared memory), no fault
            if kernel is not gluon_gemm.gluon_mm:
                raise
            print(f"packed kernels: gluon_mm {config} did not run here ({type(e).__name__}: "  # one line, the
                  f"{' '.join(str(e).split())[:160]}); timing the other kernels", file=sys.stderr)  # others timed
    best = min(times.values())
    return next(pair for pair in times if times[pair] <= best * (1 + TIE))


def agrees(y, reference, tolerance=AGREE):
    """Whether y is the reference to within `tolerance` relative (Frobenius) error over the reference's finite
    values, and not finite exactly where the reference is not."""
    y, reference = y.float(), reference.float()
    finite = torch.isfinite(reference)
    if not torch.equal(torch.isfinite(y), finite):
        return False
    return (y - reference)[finite].norm().item() <= tolerance * reference[finite].norm().item()


def weight_copies(args, weights=3):
    """Copies of the `weights` tensors after x in a call's arguments (qweight, scale, zero), the first the layer's
    own: together at least twice the L2 cache (at most TUNE_COPIES)."""
    x, tensors = args[0], tuple(args[1:1 + weights])
    nbytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
    l2 = getattr(torch.cuda.get_device_properties(x.device), "L2_cache_size", 50 * 2**20)
    count = max(2, min(TUNE_COPIES, -(-2 * l2 // nbytes)))
    return [tensors] + [tuple(None if t is None else t.clone() for t in tensors) for _ in range(count - 1)]


def graph_time(args, call, config, copies=None, weights=3):
    """Milliseconds per call of call(*args, config): the median replay of one CUDA graph of a call on each copy
    of the weights (weight_copies), over the number of copies."""
    copies = copies or weight_copies(args, weights)
    calls = [functools.partial(call, args[0], *copy, *args[1 + weights:], config) for copy in copies]
    for c in calls:  # compiles, and grows the dequant scratch, before the capture
        c()
    return replay_time(calls)


def replay_time(calls, warmup=5, rep=25):
    """Milliseconds per call: the median replay of one CUDA graph of all `calls` (each already run once, so that
    nothing compiles or allocates during the capture), over len(calls)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")
    del graph
    return ms / len(calls)


def _packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], bits: int, group_size: int, in_features: int,
                   zero_const: float, counters: Optional[torch.Tensor] = None, activation: int = 0) -> torch.Tensor:
    # counters are written during the call and back to zero at its end: not a mutation the graph sees
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = run(x2, qweight, scale, zero, bias, bits, group_size, in_features, zero_const, counters, activation)
    return y.reshape(*x.shape[:-1], qweight.shape[1])


# the same call as a torch custom op: what torch.compile sees, one opaque node per layer
packed_matmul = torch.library.custom_op("nanoqat::packed_matmul", _packed_matmul, mutates_args=())


@packed_matmul.register_fake
def _(x, qweight, scale, zero, bias, bits, group_size, in_features, zero_const, counters=None, activation=0):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def matmul(*args):
    """packed_matmul's arguments -> y: through the custom op while torch.compile traces, else called directly (in
    eager mode the op's dispatch would only add its cost to every layer's call)."""
    return packed_matmul(*args) if torch.compiler.is_compiling() else _packed_matmul(*args)


def norm_mm(*args):
    """norm_matmul's arguments -> y, as matmul calls its op."""
    return norm_matmul(*args) if torch.compiler.is_compiling() else _norm_matmul(*args)


def residual_mm(*args):
    """residual_matmul's arguments -> (y, u), as matmul calls its op."""
    return residual_matmul(*args) if torch.compiler.is_compiling() else _residual_matmul(*args)
