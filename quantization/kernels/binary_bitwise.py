"""Triton GEMV of residual binary weights: y = sum over terms t of the one-bit product x @ (scale_t * B_t)^T, all
terms in one kernel, straight from the sign bits packed 32 to an int32 (quantization/binary_linear.py's layout).
For each output row and each run of input columns it loads the packed words, cuts the bits out with shift-and-mask,
sums x over the set bits and uses x @ B^T = 2 * (sum of x over the set bits) - sum(x). No float weight exists.

The PyTorch path, binary_linear.binary_matmul, is its reference. Runs on the CPU with TRITON_INTERPRET=1.

    y = residual_binary_gemv(x, words, scales)   # x (in,), words (terms, out, in/32) int32, scales (terms, out, groups)
"""
import torch
import triton
import triton.language as tl

WORD_BITS = 32


@triton.jit
def _residual_binary_gemv_kernel(x_ptr, words_ptr, scale_ptr, y_ptr, n_out, n_words, n_groups, words_per_group,
                                 TERMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_out
    shifts = tl.arange(0, 32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for w0 in range(0, n_words, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)  # word columns
        col_ok = cols < n_words
        x = tl.load(x_ptr + cols[:, None] * 32 + shifts[None, :], mask=col_ok[:, None], other=0.0).to(tl.float32)
        x_sum = tl.sum(tl.sum(x, axis=1), axis=0)
        group = w0 // words_per_group  # a block never straddles two scale groups (the wrapper sees to it)
        for t in tl.static_range(TERMS):
            words = tl.load(words_ptr + (t * n_out + rows[:, None]) * n_words + cols[None, :],
                            mask=row_ok[:, None] & col_ok[None, :], other=0)
            bits = (words[:, :, None] >> shifts[None, None, :]) & 1  # (BLOCK_N, BLOCK_W, 32)
            set_sum = tl.sum(tl.sum(tl.where(bits != 0, x[None, :, :], 0.0), axis=2), axis=1)
            scale = tl.load(scale_ptr + (t * n_out + rows) * n_groups + group, mask=row_ok, other=0.0)
            acc += scale * (2.0 * set_sum - x_sum)
    tl.store(y_ptr + rows, acc, mask=row_ok)


def residual_binary_gemv(x, words, scales, block_n=16, block_w=4, num_warps=4):
    """x (in,) or (1, in); words (terms, out, in/32) int32; scales (terms, out, groups) float32 -> y (out,) float32
    (or (1, out) for a (1, in) input)."""
    terms, n_out, n_words = words.shape
    n_groups = scales.shape[-1]
    if words.dtype != torch.int32 or scales.shape[:2] != (terms, n_out) or x.shape[-1] != n_words * WORD_BITS:
        raise ValueError(f"expected words (terms, out, in/32) int32 and scales (terms, out, groups) for an input of "
                         f"width {x.shape[-1]}; got {words.dtype} {list(words.shape)} and {list(scales.shape)}")
    if x.numel() != x.shape[-1]:
        raise ValueError(f"a GEMV takes one input row; got shape {list(x.shape)}")
    if n_words % n_groups:
        raise ValueError(f"{n_groups} scale groups do not split {n_words} words evenly (groups must be multiples of 32)")
    words_per_group = n_words // n_groups
    while words_per_group % block_w and n_groups > 1:  # keep each block inside one scale group
        block_w //= 2
    y = torch.empty(n_out, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n_out, block_n),)
    _residual_binary_gemv_kernel[grid](x.contiguous().reshape(-1), words.contiguous(), scales.float().contiguous(), y,
                                       n_out, n_words, n_groups, words_per_group, TERMS=terms, BLOCK_N=block_n,
                                       BLOCK_W=block_w, num_warps=num_warps)
    return y.reshape(*x.shape[:-1], n_out)


def stack_terms(layer):
    """(words, scales) of a ResidualBinaryLinear, stacked over its terms, as residual_binary_gemv takes them."""
    return (torch.stack([t.words for t in layer.terms]), torch.stack([t.scale for t in layer.terms]))
