"""The attention of one new token over a KV cache, in one Triton kernel (a decode step's attention, every format).

    y = decode_attention(q, k, v, stored, input_pos, counters)   # q, k, v (batch, n_head, 1, head_dim) -> y (same)

`stored` is generate.KVCache's buffer of plain keys and values, (2, batch, n_head, max_len, head_dim). The kernel
writes the new token's k and v at input_pos and attends over positions 0..input_pos only (the valid prefix, read
from the position tensor on the device, so a captured CUDA graph replays it at every position), where
F.scaled_dot_product_attention with the step's mask reads the whole cache. The cache is cut into chunks of
positions, one program per (row, head, chunk) ("flash decoding"): each keeps a running maximum, sum and weighted
sum of values (float32) over its chunk and stores them; the last program of a head to arrive (an arrival counter,
zero again after the call) combines the chunks in chunk order (deterministic) and writes y. One launch, where a
step otherwise runs a cache-write kernel and cuDNN's attention for every layer.

Checked against float64 attention under TRITON_INTERPRET=1 (tests/test_generate.py); generate.KVCache uses it on
CUDA for a cache that stores K and V unquantized, when no activation site inside the attention is on.
NANOQAT_DECODE_ATTENTION=0 turns it off (bench/decode.py --attention=kernel,sdpa measures both).
"""
import os
import sys

import torch

from quantization.kernels import ops

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

BLOCK_T = 16           # positions a program loads at once
PROGRAMS_PER_SM = 8    # chunks are cut so that rows x heads x chunks is about this many programs per multiprocessor
MAX_HEAD_DIM = 256
# the kernel runs where each program reads at most this many bytes of cached keys and values: on an H200 it beat
# SDPA where programs read 4-24 KiB, and lost where they read 36 KiB (124M at batch 16, 2 programs per SM) and
# 48 KiB (the 6.7B shape at batch 16) (bench/results/attention_h200/README.md)
MAX_PROGRAM_BYTES = 32 * 1024
ENABLED = os.environ.get("NANOQAT_DECODE_ATTENTION", "1") != "0"  # generate.setup_cache reads it
_said = set()


def refusal(device, dtype, head_dim):
    """Why decode_attention cannot run for a cache on `device` of `dtype` values: None when it can, "" for the CPU
    (the PyTorch path is what runs there) or a reason."""
    if not ENABLED:
        return "NANOQAT_DECODE_ATTENTION=0"
    if torch.device(device).type != "cuda" and not ops.interpreting():
        return ""
    if triton is None:
        return "Triton is not installed"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} is over {MAX_HEAD_DIM}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"no kernel for a {dtype} cache"
    return None


def say_once(reason):
    """One line on stderr, once per process, where a GPU cache cannot use the kernel (the PyTorch path runs)."""
    if reason and reason not in _said and reason != "NANOQAT_DECODE_ATTENTION=0":
        _said.add(reason)
        print(f"decode attention: {reason}; using a cache write and F.scaled_dot_product_attention", file=sys.stderr)


def worth_it(batch, n_head, max_len, head_dim, dtype, device):
    """Whether the kernel is expected to beat a cache write and SDPA for this cache: each of its programs reads at
    most MAX_PROGRAM_BYTES of keys and values."""
    chunk, _ = chunking(batch, n_head, max_len, torch.device(device))
    return 2 * chunk * head_dim * torch.empty((), dtype=dtype).element_size() <= MAX_PROGRAM_BYTES


def chunking(batch, n_head, max_len, device):
    """(positions per chunk, chunks): about PROGRAMS_PER_SM programs per multiprocessor, chunks of whole BLOCK_T."""
    want = max(1, triton.cdiv(PROGRAMS_PER_SM * ops.multiprocessors(device), batch * n_head))
    chunk = triton.cdiv(triton.cdiv(max_len, want), BLOCK_T) * BLOCK_T
    return chunk, triton.cdiv(max_len, chunk)


if triton is not None:
    @triton.jit
    def _attend(kt, vt, t, pos, end, k_new, v_new, q, m, l, acc):
        """One tile of positions t into the running maximum m, sum l and weighted sum acc (float32); the new
        token's row (t == pos) from registers."""
        new = (t == pos)[:, None]
        kt = tl.where(new, k_new[None, :], kt).to(tl.float32)
        vt = tl.where(new, v_new[None, :], vt).to(tl.float32)
        s = tl.where(t < end, tl.sum(kt * q[None, :], axis=1), -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m - m_new)
        return m_new, l * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * vt, axis=0)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, c_ptr, pos_ptr, y_ptr, ws_ptr, ml_ptr, count_ptr, n_head,
                                 chunk, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
                                 stride_cs, stride_cb, stride_ch, stride_ct, stride_yb, stride_yh, sm_scale,
                                 HEAD_DIM: tl.constexpr, HD_P: tl.constexpr, BLOCK_T: tl.constexpr,
                                 CHUNKS_P: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr):
        """Program (row x head, chunk). sm_scale carries log2(e): the softmax runs on exp2. The chunk's first tile
        of cached keys and values is loaded before the wait for the kernel before (PDL): those rows, and the
        position, were written by earlier steps, whose kernels have finished (the q/k/v projection launches this
        one only after its own wait, and every kernel of a step reads what the one before it wrote, so waits in
        turn); only q, k and v come from the kernel just before."""
        pid_bh, pid_c = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // n_head, pid_bh % n_head
        d = tl.arange(0, HD_P)
        d_ok = d < HEAD_DIM
        pos = tl.load(pos_ptr).to(tl.int32)
        start = pid_c * chunk
        end = tl.minimum(start + chunk, pos + 1)
        cache_k = c_ptr + b * stride_cb + h * stride_ch
        cache_v = cache_k + stride_cs
        t = start + tl.arange(0, BLOCK_T)
        old = ((t < end) & (t != pos))[:, None] & d_ok[None, :]  # the new row is not read back
        kt = tl.load(cache_k + t[:, None] * stride_ct + d[None, :], mask=old, other=0.0)
        vt = tl.load(cache_v + t[:, None] * stride_ct + d[None, :], mask=old, other=0.0)
        if PDL:  # q, k and v come from the kernel before (see triton_kernels._after_earlier_kernels)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        m = tl.full([], -float("inf"), tl.float32)
        l = tl.zeros([], tl.float32)
        acc = tl.zeros((HD_P,), tl.float32)
        if start <= pos:
            q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * sm_scale
            # the chunk that holds the new token writes it into the cache and uses it from registers
            holds = d_ok & (d * 0 + pos < start + chunk)
            k_new = tl.load(k_ptr + b * stride_kb + h * stride_kh + d, mask=holds, other=0.0)
            v_new = tl.load(v_ptr + b * stride_vb + h * stride_vh + d, mask=holds, other=0.0)
            k_new = k_new.to(c_ptr.dtype.element_ty)
            v_new = v_new.to(c_ptr.dtype.element_ty)
            tl.store(cache_k + pos * stride_ct + d, k_new, mask=holds)
            tl.store(cache_v + pos * stride_ct + d, v_new, mask=holds)
            m, l, acc = _attend(kt, vt, t, pos, end, k_new, v_new, q, m, l, acc)
            for t0 in range(start + BLOCK_T, end, BLOCK_T):
                tt = t0 + tl.arange(0, BLOCK_T)
                old = ((tt < end) & (tt != pos))[:, None] & d_ok[None, :]
                kt = tl.load(cache_k + tt[:, None] * stride_ct + d[None, :], mask=old, other=0.0)
                vt = tl.load(cache_v + tt[:, None] * stride_ct + d[None, :], mask=old, other=0.0)
                m, l, acc = _attend(kt, vt, tt, pos, end, k_new, v_new, q, m, l, acc)
        y_ptrs = y_ptr + b * stride_yb + h * stride_yh + d
        if SPLIT:
            chunks = tl.num_programs(1)
            tl.store(ws_ptr + (pid_bh * chunks + pid_c) * HD_P + d, acc)
            tl.store(ml_ptr + (pid_bh * chunks + pid_c) * 2, m)
            tl.store(ml_ptr + (pid_bh * chunks + pid_c) * 2 + 1, l)
            tl.debug_barrier()  # every thread's partials are written before the count says so
            counter = count_ptr + pid_bh
            if tl.atomic_add(counter, 1, sem="acq_rel") == chunks - 1:
                c = tl.arange(0, CHUNKS_P)
                c_ok = c < chunks
                base = pid_bh * chunks + c
                ms = tl.load(ml_ptr + base * 2, mask=c_ok, other=-float("inf"), cache_modifier=".cg")
                ls = tl.load(ml_ptr + base * 2 + 1, mask=c_ok, other=0.0, cache_modifier=".cg")
                top = tl.max(ms, axis=0)  # chunk 0 always holds position 0: finite
                w = tl.where(c_ok & (ls > 0), tl.exp2(ms - top), 0.0)
                accs = tl.load(ws_ptr + base[:, None] * HD_P + d[None, :], mask=c_ok[:, None], other=0.0,
                               cache_modifier=".cg")
                y = tl.sum(accs * w[:, None], axis=0) / tl.sum(ls * w, axis=0)
                tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=d_ok)
                tl.atomic_xchg(counter, 0)
        else:
            tl.store(y_ptrs, (acc / l).to(y_ptr.dtype.element_ty), mask=d_ok)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stored: torch.Tensor,
                      input_pos: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    # counters are written during the call and back to zero at its end: not a mutation the graph sees
    batch, n_head, _, head_dim = q.shape
    max_len = stored.size(3)
    chunk, chunks = chunking(batch, n_head, max_len, q.device)
    # y laid out as (batch, 1, n_head, head_dim), returned as (batch, n_head, 1, head_dim): the caller's
    # transpose back is then contiguous, with no copy
    y = torch.empty((batch, 1, n_head, head_dim), device=q.device, dtype=q.dtype)
    hd_p = triton.next_power_of_2(head_dim)
    split = chunks > 1
    ws = torch.empty((batch * n_head * chunks, hd_p), device=q.device, dtype=torch.float32) if split else y
    ml = torch.empty((batch * n_head * chunks, 2), device=q.device, dtype=torch.float32) if split else y
    pdl = ops.pdl_available(q.device)
    for t in (q, k, v, stored):
        assert t.stride(-1) == 1, "decode_attention: head_dim must be contiguous"
    extra = dict(launch_pdl=True) if pdl else {}
    _decode_attention_kernel[(batch * n_head, chunks)](
        q, k, v, stored, input_pos, y, ws, ml, counters, n_head, chunk,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        stored.stride(0), stored.stride(1), stored.stride(2), stored.stride(3), y.stride(0), y.stride(2),
        1.4426950408889634 / head_dim ** 0.5,
        HEAD_DIM=head_dim, HD_P=hd_p, BLOCK_T=BLOCK_T, CHUNKS_P=triton.next_power_of_2(chunks), SPLIT=split,
        PDL=pdl, num_warps=2 if hd_p <= 64 else 4, **extra)
    return y.transpose(1, 2)


decode_attention_op = torch.library.custom_op("nanoqat::decode_attention", _decode_attention,
                                              mutates_args=("stored",))


@decode_attention_op.register_fake
def _(q, k, v, stored, input_pos, counters):
    batch, n_head, _, head_dim = q.shape
    return q.new_empty((batch, 1, n_head, head_dim)).transpose(1, 2)


def decode_attention(q, k, v, stored, input_pos, counters):
    """The new token's attention (batch, n_head, 1, head_dim), with its k and v written into `stored` at
    input_pos (a (1,) tensor): through the custom op while torch.compile traces, else called directly."""
    args = (q, k, v, stored, input_pos, counters)
    return decode_attention_op(*args) if torch.compiler.is_compiling() else _decode_attention(*args)
