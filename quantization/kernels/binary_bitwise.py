"""Triton GEMV of residual binary weights: y = sum over terms t of the one-bit product x @ (scale_t * B_t)^T, all
terms in one kernel, straight from the sign bits packed 32 to an int32 (quantization/binary_linear.py's layout).
x @ B^T = 2 * (sum of x over the set bits) - sum(x). No float weight exists.

Each step loads a (terms, BLOCK_N rows, BLOCK_W words) tile, coalesced along the words, and walks the 32 bits of
its words in a static loop: bit j, masked where it lies in the low 16 bits of a word (the high 16 are shifted down
once), is read as a float32, the subnormal 2**(j - 149), and multiplied in one FMA by x scaled by 2**(64 - j),
one value per word column shared by every term and row: x * 2**-85 where the bit is set, exactly, as in the packed
one-row kernel (triton_kernels._stream_gemv_kernel). So a bit costs an AND and an FMA; the sum is scaled back by
2**85 per step.

More than one row (a prompt, batch >= 2) goes through a second kernel that writes the dequantized weight
sum_t scale_t (2 B_t - 1) into ops.py's reused scratch in x's dtype, and one cuBLAS matmul (as PackedLinear's
prefill does). An attached layer (attach) calls both as torch custom ops.

The PyTorch path, binary_linear.binary_matmul, is their reference. Runs on the CPU with TRITON_INTERPRET=1.

    y = residual_binary_gemv(x, words, scales)   # x (in,), words (terms, out, in/32) int32, scales (terms, out, groups)
    w = dequantize(words, scales, torch.bfloat16)   # (out, in)
"""
import torch
import triton
import triton.language as tl

from quantization.kernels import ops

WORD_BITS = 32
# (BLOCK_N output rows, BLOCK_W words of 32 inputs, num_warps): bench/kernels.py --binary times them all; an
# attached layer times them once per shape (tuned_config); the first, the default, was the fastest at k = 1 and 2
# on 4096 x 4096 on an H200 with x read bit-major (9.1 and 12.9 us; bench/results/kernels_h200_goal.md)
CONFIGS = [(8, 64, 2), (16, 32, 4), (32, 32, 4), (8, 32, 2), (16, 32, 2), (64, 32, 8), (16, 64, 4), (8, 128, 4),
           (4, 128, 4), (4, 128, 2), (4, 64, 1)]
XSCALE: tl.constexpr = tl.constexpr(2.0 ** 64)
BACK: tl.constexpr = tl.constexpr(2.0 ** 85)


# word_stride (1) is not specialized: not knowing the words contiguous, Triton gives each thread one word column
# (a warp still loads 32 neighbouring words) and several rows and terms, which then share each value of x it loads;
# with 16-byte vectors a thread held four columns and loaded four values of x per bit
# x is read through (x_word_stride, x_bit_stride): (32, 1) as it comes, or (1, n_words) from the bit-major copy
# residual_binary_gemv makes (transpose_x), where a warp's 32 word columns read 32 neighbouring floats for each bit
# instead of 32 floats 128 bytes apart
@triton.jit(do_not_specialize=["word_stride", "x_word_stride", "x_bit_stride"])
def _residual_binary_gemv_kernel(x_ptr, words_ptr, scale_ptr, y_ptr, n_out, n_words, n_groups, words_per_group,
                                 word_stride, x_word_stride, x_bit_stride, TERMS: tl.constexpr,
                                 TERMS_P2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    terms = tl.arange(0, TERMS_P2)
    row_ok = (terms < TERMS)[:, None] & (rows < n_out)[None, :]  # (terms, rows)
    acc = tl.zeros((TERMS_P2, BLOCK_N), dtype=tl.float32)
    for w0 in range(0, n_words, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)  # word columns
        col_ok = cols < n_words
        x_cols = x_ptr + cols * x_word_stride
        x_sum = tl.sum(tl.load(x_cols[:, None] + tl.arange(0, 32)[None, :] * x_bit_stride, mask=col_ok[:, None],
                               other=0.0).to(tl.float32))
        words = tl.load(words_ptr + ((terms[:, None] * n_out + rows[None, :]) * n_words)[:, :, None]
                        + (cols * word_stride)[None, None, :], mask=row_ok[:, :, None] & col_ok[None, None, :], other=0)
        low = words
        high = (words >> 16) & 0xFFFF
        part = tl.zeros((TERMS_P2, BLOCK_N, BLOCK_W), dtype=tl.float32)  # sum of x over set bits, times 2**-85
        for j in tl.static_range(16):
            x_low = tl.load(x_cols + j * x_bit_stride, mask=col_ok, other=0.0).to(tl.float32) * (XSCALE / (1 << j))
            x_high = tl.load(x_cols + (16 + j) * x_bit_stride, mask=col_ok, other=0.0).to(tl.float32) * (
                XSCALE / (1 << j))
            part += x_low[None, None, :] * (low & (1 << j)).to(tl.float32, bitcast=True)
            part += x_high[None, None, :] * (high & (1 << j)).to(tl.float32, bitcast=True)
        set_sum = tl.sum(part, axis=2) * BACK
        group = w0 // words_per_group  # a step never straddles two scale groups (the wrapper sees to it)
        scale = tl.load(scale_ptr + (terms[:, None] * n_out + rows[None, :]) * n_groups + group, mask=row_ok,
                        other=0.0)
        acc += scale * (2.0 * set_sum - x_sum)
    rows_ok = rows < n_out
    tl.store(y_ptr + rows, tl.sum(acc, axis=0), mask=rows_ok)


# Many rows (a prompt, batch >= 2): the weight W = sum over terms of scale_t * (2 B_t - 1) is written once into
# ops' reused scratch in x's dtype, then one cuBLAS matmul (as PackedLinear's dequant_mm). A program writes a
# (BLOCK_N rows, BLOCK_W words x 32 bits) tile of W, contiguous along the input.
@triton.jit
def _residual_binary_dequant_kernel(words_ptr, scale_ptr, w_ptr, n_out, n_words, n_groups, words_per_group,
                                    TERMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    bits = tl.arange(0, 32)
    ok = (rows < n_out)[:, None] & (cols < n_words)[None, :]
    w = tl.zeros((BLOCK_N, BLOCK_W, 32), dtype=tl.float32)
    for t in tl.static_range(TERMS):
        word = tl.load(words_ptr + (t * n_out + rows[:, None]) * n_words + cols[None, :], mask=ok, other=0)
        scale = tl.load(scale_ptr + (t * n_out + rows[:, None]) * n_groups + cols[None, :] // words_per_group,
                        mask=ok, other=0.0)
        bit = ((word[:, :, None] >> bits[None, None, :]) & 1).to(tl.float32)
        w += scale[:, :, None] * (2.0 * bit - 1.0)
    offsets = rows[:, None, None] * (n_words * 32) + cols[None, :, None] * 32 + bits[None, None, :]
    tl.store(w_ptr + offsets, w.to(w_ptr.dtype.element_ty), mask=ok[:, :, None])


DEQUANT_BLOCK = (16, 8)  # (BLOCK_N rows, BLOCK_W words): 4096 weights a program


def dequantize(words, scales, dtype, out=None):
    """The (out, in) weight of stacked terms in `dtype` (into `out` when given, e.g. ops' scratch)."""
    terms, n_out, n_words = words.shape
    n_groups = scales.shape[-1]
    w = out if out is not None else torch.empty(n_out, n_words * WORD_BITS, device=words.device, dtype=dtype)
    block_n, block_w = DEQUANT_BLOCK
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(n_words, block_w))
    _residual_binary_dequant_kernel[grid](words.contiguous(), scales.float().contiguous(), w, n_out, n_words,
                                          n_groups, n_words // n_groups, TERMS=terms, BLOCK_N=block_n,
                                          BLOCK_W=block_w)
    return w


def _rows_mm(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (rows, in) -> x @ W^T (rows, out) in x's dtype: W dequantized into ops' scratch, then cuBLAS."""
    _check(x.shape[-1], words, scales)
    n_out, in_features = words.shape[1], x.shape[-1]
    w = dequantize(words, scales, x.dtype, ops.scratch(n_out * in_features, x.device, x.dtype).view(n_out, in_features))
    return torch.mm(x, w.t())


rows_mm_op = torch.library.custom_op("nanoqat::residual_binary_rows_mm", _rows_mm, mutates_args=())


@rows_mm_op.register_fake
def _(x, words, scales):
    return x.new_empty((x.shape[0], words.shape[1]))


def residual_binary_gemv(x, words, scales, block_n=CONFIGS[0][0], block_w=CONFIGS[0][1],
                         num_warps=CONFIGS[0][2], transpose_x=True):
    """x (in,) or (1, in); words (terms, out, in/32) int32; scales (terms, out, groups) float32 -> y (out,) float32
    (or (1, out) for a (1, in) input). transpose_x: the kernel reads a bit-major float32 copy of x (bit_major: one
    small copy kernel more; the reads of x coalesce); False: x as it comes."""
    _check(x.shape[-1], words, scales)
    if x.numel() != x.shape[-1]:
        raise ValueError(f"a GEMV takes one input row; got shape {list(x.shape)}")
    n_words = words.shape[-1]
    if transpose_x:
        y = _launch(bit_major(x), words, scales, (block_n, block_w, num_warps), 1, n_words)
    else:
        y = _launch(x.reshape(-1).contiguous(), words, scales, (block_n, block_w, num_warps), WORD_BITS, 1)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def bit_major(x):
    """One row of x (in,) or (1, in) as the float32 (32, in/32) tensor whose row j holds bit j of every word
    column (input 32 w + j at [j, w]): what the kernel reads fastest. In a compiled decode step this copy is traced
    before the GEMV's custom op, so inductor writes it from the kernel that makes x (a LayerNorm, GELU) instead of
    launching a copy of its own."""
    return x.reshape(-1, WORD_BITS).t().float().contiguous()


def gemv_bit_major(xt, words, scales, config=CONFIGS[0]):
    """The GEMV of bit_major(x) (32, in/32) float32 -> y (1, out) float32, with a config of CONFIGS."""
    _check(xt.numel(), words, scales)
    if xt.shape != (WORD_BITS, words.shape[-1]) or xt.dtype != torch.float32 or not xt.is_contiguous():
        raise ValueError(f"expected x bit-major, a contiguous float32 ({WORD_BITS}, {words.shape[-1]}) tensor; "
                         f"got {xt.dtype} {list(xt.shape)}")
    return _launch(xt, words, scales, config, 1, words.shape[-1]).reshape(1, -1)


def _check(in_features, words, scales):
    terms, n_out, n_words = words.shape
    n_groups = scales.shape[-1]
    if words.dtype != torch.int32 or scales.shape[:2] != (terms, n_out) or in_features != n_words * WORD_BITS:
        raise ValueError(f"expected words (terms, out, in/32) int32 and scales (terms, out, groups) for an input of "
                         f"width {in_features}; got {words.dtype} {list(words.shape)} and {list(scales.shape)}")
    if n_words % n_groups:
        raise ValueError(f"{n_groups} scale groups do not split {n_words} words evenly (groups must be multiples of 32)")


def _launch(xs, words, scales, config, x_word_stride, x_bit_stride):
    """y (out,) float32 of x read at (x_word_stride, x_bit_stride); shapes already checked."""
    block_n, block_w, num_warps = config
    terms, n_out, n_words = words.shape
    n_groups = scales.shape[-1]
    words_per_group = n_words // n_groups
    while words_per_group % block_w and n_groups > 1:  # keep each step inside one scale group
        block_w //= 2
    block_w = max(1, min(block_w, triton.next_power_of_2(n_words)))
    y = torch.empty(n_out, device=xs.device, dtype=torch.float32)
    grid = (triton.cdiv(n_out, block_n),)
    _residual_binary_gemv_kernel[grid](xs, words.contiguous(), scales.float().contiguous(), y,
                                       n_out, n_words, n_groups, words_per_group, 1, x_word_stride, x_bit_stride,
                                       TERMS=terms, TERMS_P2=triton.next_power_of_2(terms), BLOCK_N=block_n,
                                       BLOCK_W=block_w, num_warps=num_warps)
    return y


def stack_terms(layer):
    """(words, scales) of a ResidualBinaryLinear, stacked over its terms, as residual_binary_gemv takes them."""
    return (torch.stack([t.words for t in layer.terms]), torch.stack([t.scale for t in layer.terms]))


_best = {}  # (terms, out, words, groups, device) -> the config of CONFIGS chosen for it


def tuned_config(xt, words, scales):
    """The config of CONFIGS for this shape: timed once per shape by ops.py's tuner (CUDA graph replays over copies
    of the words and scales, as for PackedLinear), kept in ops' choices file across processes; CONFIGS[0] under the
    interpreter and inside a CUDA graph capture of a shape never timed."""
    key = (*words.shape, scales.shape[-1], xt.device)
    if key in _best:
        return _best[key]
    if not can_time(xt):
        return CONFIGS[0]
    pairs = [(gemv_bit_major, config) for config in CONFIGS]
    name = ops.choice_name(xt.device, "residual binary terms {} out {} words {} groups {}".format(*key[:4]), __file__)
    pair = ops.stored_choice(name, pairs)
    if pair is None:
        pair = _fastest(xt, words, scales, pairs)
        ops.store_choice(name, pair)
    _best[key] = pair[1]
    return pair[1]


def can_time(x):
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


def _fastest(x, words, scales, pairs):
    return ops._fastest((x, words, scales), pairs, weights=2)


def _gemv_op(xt: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return gemv_bit_major(xt, words, scales, tuned_config(xt, words, scales))


# one opaque node per layer under torch.compile, as ops.packed_matmul
gemv_op = torch.library.custom_op("nanoqat::residual_binary_gemv", _gemv_op, mutates_args=())


@gemv_op.register_fake
def _(xt, words, scales):
    return xt.new_empty((1, words.shape[1]), dtype=torch.float32)


def kernel_gemv(x, layer):
    """ResidualBinaryLinear.gemv: rows of x (rows, in) through the kernels on CUDA (or under TRITON_INTERPRET=1),
    with the terms stacked by attach: one row through the bitwise GEMV (float32 out), more through the dequantized
    weight and cuBLAS (x's dtype out); None elsewhere (the layer's bit operations run)."""
    if not (x.is_cuda or ops.interpreting()):
        return None
    compiling = torch.compiler.is_compiling()
    if x.shape[0] == 1:
        return (gemv_op if compiling else _gemv_op)(bit_major(x), layer.stacked_words, layer.stacked_scales)
    return (rows_mm_op if compiling else _rows_mm)(x.contiguous(), layer.stacked_words, layer.stacked_scales)


def attach(layer):
    """Give a ResidualBinaryLinear the kernels (what convert_to_packed does), when its scale groups are whole words
    (the GEMV's steps never straddle a group): its terms stacked once into buffers that follow the
    module's device (not saved), the terms' own words and scales becoming views into them
    (ResidualBinaryLinear.share_stacked: the bits are held once). Returns whether it was attached."""
    words, scales = stack_terms(layer)
    if words.shape[-1] % scales.shape[-1]:
        return False
    layer.share_stacked(words, scales.float())
    layer.gemv = kernel_gemv
    return True
