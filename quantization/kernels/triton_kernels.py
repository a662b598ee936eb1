"""Triton kernels for y = x @ dequant(W)^T (+ bias), read straight from the packed codes of layout.py.

Four kernels, each generic over BITS (1, 2, 3, 4, 8) as a compile-time constant:
- `_stream_gemv_kernel` for one row of x: each step loads the words of a few blocks x BLOCK_N outputs and walks
  their fields in a static loop, one broadcast value of x per field, into a 2-D accumulator that is summed once
  at the end (two instructions per code); split-K over a second grid axis, the last program of a column tile
  adding the partials (one launch);
- `_gemv_kernel` for 2 to 16 rows of x: CUDA cores, a static loop over the 32 codes of each block, split-K with
  fp32 atomics (ops.py times it against the GEMM with 16-row tiles and keeps the faster per shape);
- `_gemm_kernel` for more rows (prefill; from 2 rows with BLOCK_M = 16, if it times faster): each element of a
  (BLOCK_K, BLOCK_N) tile loads the word that holds its code and shifts it out (no reshape), the tile is
  dequantized to (code - zero) * scale in the activation dtype and accumulated in place on the tensor cores; a
  tile never straddles a group. Split-K as in the one-row kernel, for problems of few tiles (decode at batch 2 to
  16);
- `_dequant_words_kernel`: the whole weight into a bf16 (K, N) scratch, for prefill through cuBLAS (ops.dequant_mm).
All accumulate in float32. In the one-row kernel a code becomes a float with one AND: the field, masked where it
lies, read as a subnormal float32 (see `_sub`). The others use the 2**23 trick (OR the field into the mantissa of
2**23, subtract 2**23). Both are exact, and cheaper than an integer-to-float conversion, which runs at a quarter of
the rate.
"""
import triton
import triton.language as tl

from quantization.kernels import layout

BLOCK = tl.constexpr(layout.BLOCK)  # a global a kernel reads must be a constexpr (Triton 3.6)
# sizes that change from call to call: one compiled kernel for all their values (N keeps its divisibility
# specialization, which lets the word loads along N be vectorized)
_VARYING = ["M", "K", "stride_xm", "stride_ym", "blocks_per_group", "blocks_per_split"]


@triton.jit
def _as_float(field):
    """Unsigned integer fields (< 2**23) as exact float32."""
    return (field | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _field(word, shift: tl.constexpr, width: tl.constexpr):
    return (word >> shift) & ((1 << width) - 1)


@triton.jit
def _after_earlier_kernels(PDL: tl.constexpr):
    """Programmatic dependent launch (PDL, Hopper and later; the launcher passes launch_pdl): this kernel may start
    while the kernel before it finishes. Everything above this call must read only what no earlier kernel writes (the
    weights); here it waits until the earlier kernels' writes (x, and the buffers it is about to write) are done,
    and lets the next kernel launch in turn."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _activate(y, ACT: tl.constexpr):
    """The epilogue's activation of float32 outputs: ACT 0 none, 1 GELU (erf), 2 GELU's tanh approximation (tanh
    written through exp: 1 - 2 / (1 + e^2u), exact at both ends)."""
    if ACT == 1:
        return 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        return 0.5 * y * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * inner)))
    else:
        return y


@triton.jit
def _code3(low0, low1, high, i: tl.constexpr):
    """Code i (0-31) of 3-bit blocks as float32: its low two bits from the 2-bit plane (words low0, low1), its high
    bit from the 1-bit plane."""
    if i < 16:
        low = _field(low0, 2 * i, 2)
    else:
        low = _field(low1, 2 * (i - 16), 2)
    return _as_float(low | (_field(high, i, 1) << 2))


@triton.jit(do_not_specialize=_VARYING)
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                 blocks_per_group, blocks_per_split,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                 ACT: tl.constexpr):
    """ACT (_activate) only without ATOMIC: split-K partial sums are activated by the launcher afterwards."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    num_blocks = tl.cdiv(K, BLOCK)
    first = pid_k * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)
    acc = tl.zeros((BLOCK_M, BLOCK_B, BLOCK_N), tl.float32)
    for b0 in range(first, last, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < last
        mask_w = mask_b[:, None] & mask_n[None, :]
        w_ptrs = w_ptr + (offs_b * BITS)[:, None] * N + offs_n[None, :]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_b[None, :] * BLOCK
        mask_x = mask_m[:, None] & mask_b[None, :]
        # sum over each block of x * code, and of x (the zero point is applied once per block, not per code)
        dot = tl.zeros((BLOCK_M, BLOCK_B, BLOCK_N), tl.float32)
        xsum = tl.zeros((BLOCK_M, BLOCK_B), tl.float32)
        if BITS == 3:
            low0 = tl.load(w_ptrs, mask=mask_w, other=0)
            low1 = tl.load(w_ptrs + N, mask=mask_w, other=0)
            high = tl.load(w_ptrs + 2 * N, mask=mask_w, other=0)
            for i in tl.static_range(BLOCK):
                code = _code3(low0, low1, high, i)
                xi = tl.load(x_ptrs + i, mask=mask_x & (offs_b[None, :] * BLOCK + i < K), other=0.0).to(tl.float32)
                dot += xi[:, :, None] * code[None, :, :]
                xsum += xi
        else:
            for w in tl.static_range(BITS):
                word = tl.load(w_ptrs + w * N, mask=mask_w, other=0)
                for j in tl.static_range(32 // BITS):
                    i = w * (32 // BITS) + j
                    code = _as_float(_field(word, j * BITS, BITS))
                    xi = tl.load(x_ptrs + i, mask=mask_x & (offs_b[None, :] * BLOCK + i < K), other=0.0).to(tl.float32)
                    dot += xi[:, :, None] * code[None, :, :]
                    xsum += xi
        group = offs_b // blocks_per_group
        sz_offs = group[:, None] * N + offs_n[None, :]
        scale = tl.load(s_ptr + sz_offs, mask=mask_w, other=0.0)
        if HAS_ZERO:
            zero = tl.load(z_ptr + sz_offs, mask=mask_w, other=0).to(tl.float32)
            acc += (dot - zero[None, :, :] * xsum[:, :, None]) * scale[None, :, :]
        else:
            acc += (dot - ZERO * xsum[:, :, None]) * scale[None, :, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        y += tl.where(pid_k == 0, bias, 0.0)[None, :]  # once, by the first split
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, y, mask=mask_y)
    else:
        tl.store(y_ptrs, _activate(y, ACT).to(y_ptr.dtype.element_ty), mask=mask_y)


@triton.jit
def _word(w_ptrs, N, mask, W: tl.constexpr, BITS: tl.constexpr):
    """Word W of each block (a block has BITS words, N apart); a constant 0 where W >= BITS. A step reads each
    word once: loaded with the streaming hint evict_first (4096x16384 18.25 -> 17.9 us on an H100,
    bench/results/evict_first_h100)."""
    if W < BITS:
        return tl.load(w_ptrs + W * N, mask=mask, other=0, eviction_policy="evict_first")
    else:
        return tl.zeros(w_ptrs.shape, tl.int32)


@triton.jit
def _words(w_ptrs, N, mask, BITS: tl.constexpr):
    """The BITS words of each block, padded to eight with constant zeros (a loop may carry a fixed tuple)."""
    return (_word(w_ptrs, N, mask, 0, BITS), _word(w_ptrs, N, mask, 1, BITS), _word(w_ptrs, N, mask, 2, BITS),
            _word(w_ptrs, N, mask, 3, BITS), _word(w_ptrs, N, mask, 4, BITS), _word(w_ptrs, N, mask, 5, BITS),
            _word(w_ptrs, N, mask, 6, BITS), _word(w_ptrs, N, mask, 7, BITS))


@triton.jit
def _pick(c0, c1, c2, c3, c4, c5, c6, c7, W: tl.constexpr):
    if W == 0:
        return c0
    elif W == 1:
        return c1
    elif W == 2:
        return c2
    elif W == 3:
        return c3
    elif W == 4:
        return c4
    elif W == 5:
        return c5
    elif W == 6:
        return c6
    else:
        return c7


@triton.jit
def _term(xb, x_ptrs, word, high, i: tl.constexpr, POS: tl.constexpr, BITS: tl.constexpr, mask_b, offs_b, K,
          EVEN: tl.constexpr, BLOCK_B: tl.constexpr, XLOAD: tl.constexpr):
    """x_i times the code in bits POS .. POS + BITS - 1 of each word, as x_i * c * 2**-85 (BLOCK_B, BLOCK_N): a
    field that ends below bit 23 is read where it lies, one that does not from high, the word shifted down 16 bits
    (the sign bits an arithmetic shift brings in lie outside every field's mask)."""
    if POS + BITS <= 23:
        xi = _x_scaled(xb, x_ptrs, i, 64 - POS, mask_b, offs_b, K, EVEN, BLOCK_B, XLOAD)
        return xi[:, None] * _subnormal(word & (((1 << BITS) - 1) << POS))
    else:
        xi = _x_scaled(xb, x_ptrs, i, 80 - POS, mask_b, offs_b, K, EVEN, BLOCK_B, XLOAD)
        return xi[:, None] * _subnormal(high & (((1 << BITS) - 1) << (POS - 16)))


@triton.jit
def _subnormal(field):
    """An unsigned field masked where it lies in the low 23 bits of a word, read as a float32: c * 2**(p - 149), a
    subnormal, exact (p = the field's lowest bit). One AND per code makes a float of it: no shift, no subtraction."""
    return field.to(tl.float32, bitcast=True)


# x * 2**(64 - p) (_x_times) times the subnormal c * 2**(p - 149) is x * c * 2**-85: exact and a normal float for
# |x * c| > 2**-41, and x * 2**(64 - p) is exact for |x| < 2**64
BACK: tl.constexpr = tl.constexpr(2.0 ** 85)
SPLIT_CHUNK: tl.constexpr = tl.constexpr(16)  # partial sums the last program of a split-K tile loads at once


@triton.jit(do_not_specialize=_VARYING)
def _stream_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, stride_xm, stride_ym,
                        blocks_per_group, blocks_per_split,
                        BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SPLIT: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                        PREFETCH: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr,
                        r_ptr=None, wg_ptr=None, res_ptr=None, g_ptr=None, u_ptr=None, stride_rm=0, stride_resm=0,
                        stride_um=0, eps=0.0, NORM: tl.constexpr = 0, KP: tl.constexpr = 1,
                        EARLY: tl.constexpr = True, RESID: tl.constexpr = False, EMIT_U: tl.constexpr = False,
                        XLOAD: tl.constexpr = 0, stamp_ptr=None, STAMP: tl.constexpr = False,
                        STATS: tl.constexpr = False):
    """One row of x per program (grid axis 2). Each step loads the words of BLOCK_B blocks x BLOCK_N outputs and
    walks their fields in a static loop, each field times one value of x broadcast along the outputs: no reshape,
    and no reduction inside the loop (the accumulator stays (BLOCK_B, BLOCK_N), summed once at the end).
    A code costs two instructions: an AND that leaves the field where it lies (a field that ends past bit 23 in
    the word shifted down 16 bits, once per word), read as a subnormal float32 c * 2**(p - 149), and an FMA with x
    scaled by 2**(64 - p) (_x_times: one integer instruction per value of x, shared by the outputs a thread
    holds): the product is x * c * 2**-85, exact, and the sum is scaled back by 2**85 per block. Subnormals are
    exact and full speed in FMA (Triton does not flush them). Scale and zero point are applied per block row.
    EVEN: K is a multiple of 32 and every split a whole number of steps, so x needs no masks. PREFETCH: the next
    step's words are loaded before this step's fields are used.
    SPLIT (split-K over grid axis 1): each program stores its float32 partial sums in the workspace ws and counts
    itself in count (one counter per row and BLOCK_N outputs); the last to arrive adds the partials (loaded
    SPLIT_CHUNK at a time, in a fixed order: deterministic), writes y in its own dtype and sets the counter back to
    0 for the next call. One launch: no zeroed output, no atomics on y, no cast afterwards.
    ACT: the activation applied to y (bias added) before it is written (_activate): a GELU after the layer costs no
    kernel of its own. PDL: launched before the kernel that writes x has finished (_after_earlier_kernels); with
    PREFETCH the first step's words are loaded before the wait, so their round trip overlaps that kernel's end.
    NORM and RESID take the LayerNorm before a layer and the residual add after one into the kernel (ops.norm_matmul,
    ops.residual_matmul; _epilogue): a decode step then has no normalization kernel of its own.
    XLOAD: how a step gets x (_x_scaled; the same float32 values, so the same output). 0: a load per value where
    it is used; ptxas (sm_90) issues 2 or 3 of them before the first FMA, so in a one-step program the rest wait
    after the words' round trip. 1: the step's (BLOCK_B, 32) block in one load (the one its sum of x needs), the
    values taken out of it (_x_column): every load of x comes before the first FMA, for a transpose of the block
    through shared memory, a loop a few percent longer in most configs and more registers (bench/kernel_sass.py
    --xload=1). For a one-step program; ops.STREAM_CONFIGS lets the launcher time it.
    STAMP (bench/pdl_timeline.py, a GPU's timeline of a decode's kernels): each program writes five int64 to
    stamp_ptr at 5 * its index: the global timer (ns) at its start, after the wait for earlier kernels, after its
    loop and at its end, and its multiprocessor. Off, the kernel is the same code.
    STATS (with NORM; the default, ops.NORM_STATS; EARLY then unused): the row's statistics are computed before the
    loop (while the first step's words are on their way), the row read a chunk at a time
    (_chunked_row_statistics), and only they are kept: the epilogue, which every program ends with, no longer
    reduces the row."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if STAMP:
        stamp = stamp_ptr + 5 * (pid_n + tl.num_programs(0) * (pid_k + tl.num_programs(1) * pid_m))
        tl.store(stamp, tl.extra.cuda.globaltimer())
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    num_blocks = tl.cdiv(K, BLOCK)
    first = pid_k * blocks_per_split
    last = tl.minimum(first + blocks_per_split, num_blocks)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    if PREFETCH:  # the first step's words
        offs_b = first + tl.arange(0, BLOCK_B)
        mask_w = (offs_b < last)[:, None] & mask_n[None, :]
        w_ptrs = w_ptr + (offs_b * BITS)[:, None] * N + offs_n[None, :]
        n0, n1, n2, n3, n4, n5, n6, n7 = _words(w_ptrs, N, mask_w, BITS)
    _after_earlier_kernels(PDL)
    if STAMP:
        tl.store(stamp + 1, tl.extra.cuda.globaltimer())
    if NORM != 0 and EARLY and not STATS:  # the row to normalize, loaded now: its round trip overlaps the loop
        offs_r = tl.arange(0, KP)
        r = tl.load(r_ptr + pid_m * stride_rm + offs_r, mask=offs_r < K, other=0.0).to(tl.float32)
    else:  # loaded by the epilogue (a long row held through the loop costs registers), or reduced a chunk at a time
        r = 0.0
    if NORM != 0 and STATS:  # reduced now: two values held through the loop instead of the row
        mean, rstd = _chunked_row_statistics(r_ptr + pid_m * stride_rm, K, eps, NORM, KP)
    else:
        mean, rstd = 0.0, 0.0
    for b0 in range(first, last, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        mask_b = offs_b < last
        mask_w = mask_b[:, None] & mask_n[None, :]
        if PREFETCH:  # this step's words came with the previous step; the next step's go out now
            c0, c1, c2, c3, c4, c5, c6, c7 = n0, n1, n2, n3, n4, n5, n6, n7
            next_ptrs = w_ptr + ((offs_b + BLOCK_B) * BITS)[:, None] * N + offs_n[None, :]
            mask_next = (offs_b + BLOCK_B < last)[:, None] & mask_n[None, :]
            n0, n1, n2, n3, n4, n5, n6, n7 = _words(next_ptrs, N, mask_next, BITS)
        else:
            w_ptrs = w_ptr + (offs_b * BITS)[:, None] * N + offs_n[None, :]
            c0, c1, c2, c3, c4, c5, c6, c7 = _words(w_ptrs, N, mask_w, BITS)
        x_ptrs = x_row + offs_b * BLOCK
        # the step's scales, zero points and sums of x are loaded before its codes are used: their round trips
        # overlap the words' (loaded after the FMAs, they were a second wait in a one-step program)
        offs_x = offs_b[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        if XLOAD == 1:  # the step's x in one (BLOCK_B, 32) load: its sum, and its values (_x_scaled) from it
            xb = _x_block(x_row, offs_x, mask_b, K, EVEN)
            xsum = tl.sum(_x_value(xb, x_row), 1)
        else:
            xb = 0
            if EVEN:
                xsum = tl.sum(tl.load(x_row + offs_x).to(tl.float32), 1)
            else:
                xsum = tl.sum(tl.load(x_row + offs_x, mask=mask_b[:, None] & (offs_x < K), other=0.0)
                              .to(tl.float32), 1)
        sz_offs = (offs_b // blocks_per_group)[:, None] * N + offs_n[None, :]
        scale = tl.load(s_ptr + sz_offs, mask=mask_w, other=0.0)
        if HAS_ZERO:
            zero = tl.load(z_ptr + sz_offs, mask=mask_w, other=0).to(tl.float32)
        part = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)  # sum of x * (code) * 2**-49 over the step's blocks
        if BITS == 3:
            for h in tl.static_range(2):  # codes 16h .. 16h+15: low two bits in word h, high bit in half h of word 2
                if h == 0:
                    low = c0
                    high = c2 & 0xFFFF
                else:
                    low = c1
                    high = (c2 >> 16) & 0xFFFF
                for q in tl.static_range(2):
                    if q == 0:
                        lw = low
                    else:
                        lw = (low >> 16) & 0xFFFF
                    for j in tl.static_range(8):
                        i = 16 * h + 8 * q + j
                        low_x = _x_scaled(xb, x_ptrs, i, 64 - 2 * j, mask_b, offs_b, K, EVEN, BLOCK_B, XLOAD)
                        high_x = _x_scaled(xb, x_ptrs, i, 66 - (8 * q + j), mask_b, offs_b, K, EVEN, BLOCK_B,
                                           XLOAD)
                        part += low_x[:, None] * _subnormal(lw & (3 << (2 * j)))
                        part += high_x[:, None] * _subnormal(high & (1 << (8 * q + j)))
        else:
            for w in tl.static_range(BITS):
                word = _pick(c0, c1, c2, c3, c4, c5, c6, c7, w)
                high = word >> 16
                for f in tl.static_range(32 // BITS):
                    part += _term(xb, x_ptrs, word, high, w * (32 // BITS) + f, f * BITS, BITS, mask_b, offs_b, K,
                                  EVEN, BLOCK_B, XLOAD)
        if HAS_ZERO:
            acc += (part * BACK - xsum[:, None] * zero) * scale
        else:
            acc += (part * BACK - ZERO * xsum[:, None]) * scale
    y = tl.sum(acc, axis=0)
    if STAMP:  # after the sum, which needs every step's products
        tl.store(stamp + 2, tl.extra.cuda.globaltimer() + 0 * tl.sum(y, 0).to(tl.int64))
    y_ptrs = y_ptr + pid_m * stride_ym + offs_n
    if SPLIT:
        splits = tl.num_programs(1)
        tl.store(ws_ptr + (pid_k * M + pid_m) * N + offs_n, y, mask=mask_n)
        tl.debug_barrier()  # every thread's partials are written before the count says so
        counter = count_ptr + pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
            y = tl.zeros((BLOCK_N,), tl.float32)
            offs_s = tl.arange(0, SPLIT_CHUNK)
            for k0 in range(0, splits, SPLIT_CHUNK):  # in split order: the same sum every call
                ks = k0 + offs_s
                y += tl.sum(tl.load(ws_ptr + ((ks * M + pid_m) * N)[:, None] + offs_n[None, :],
                                    mask=(ks < splits)[:, None] & mask_n[None, :], other=0.0, cache_modifier=".cg"), 0)
            _epilogue(y, y_ptrs, offs_n, mask_n, pid_m, K, b_ptr, r, r_ptr, stride_rm, wg_ptr, res_ptr, g_ptr, u_ptr,
                      stride_resm, stride_um, eps, HAS_BIAS, ACT, NORM, KP, EARLY, RESID, EMIT_U, mean, rstd, STATS)
            tl.atomic_xchg(counter, 0)
    else:
        _epilogue(y, y_ptrs, offs_n, mask_n, pid_m, K, b_ptr, r, r_ptr, stride_rm, wg_ptr, res_ptr, g_ptr, u_ptr,
                  stride_resm, stride_um, eps, HAS_BIAS, ACT, NORM, KP, EARLY, RESID, EMIT_U, mean, rstd, STATS)
    if STAMP:
        tl.store(stamp + 3, tl.extra.cuda.globaltimer())
        tl.store(stamp + 4, tl.extra.cuda.smid().to(tl.int64))


@triton.jit
def _row_statistics(r, offs_r, K, eps, NORM: tl.constexpr):
    """(mean, 1 / standard deviation) of the first K values of the row r (float32) for a LayerNorm (NORM 1), or
    (0, 1 / root mean square) for an RMSNorm (2)."""
    if NORM == 1:
        mean = tl.sum(r, 0) / K
        centered = tl.where(offs_r < K, r - mean, 0.0)
        squares = tl.sum(centered * centered, 0)
    else:
        mean = 0.0
        squares = tl.sum(r * r, 0)
    return mean, 1.0 / tl.sqrt(squares / K + eps)


@triton.jit
def _chunked_row_statistics(r_row, K, eps, NORM: tl.constexpr, KP: tl.constexpr):
    """_row_statistics of the first K values at r_row, loaded CHUNK (at most 1024) at a time in a loop, summed
    elementwise and reduced across the program once per pass: a few registers a thread, where holding the whole row
    (4096 values: 16 a thread at 8 warps) took the 6.7B shape's up projection to 80 (Triton 3.6; 64 this way), 3
    programs a multiprocessor instead of 4 (two waves of its 512). Two passes for a LayerNorm (the mean, then the
    centred squares, re-read from the L1 cache), as _row_statistics computes them."""
    CHUNK: tl.constexpr = KP if KP < 1024 else 1024
    offs = tl.arange(0, CHUNK)
    if NORM == 1:
        total = tl.zeros((CHUNK,), tl.float32)
        for c0 in range(0, K, CHUNK):
            total += tl.load(r_row + c0 + offs, mask=c0 + offs < K, other=0.0).to(tl.float32)
        mean = tl.sum(total, 0) / K
        squares = tl.zeros((CHUNK,), tl.float32)
        for c0 in range(0, K, CHUNK):
            v = tl.load(r_row + c0 + offs, mask=c0 + offs < K, other=0.0).to(tl.float32)
            centered = tl.where(c0 + offs < K, v - mean, 0.0)
            squares += centered * centered
    else:
        mean = 0.0
        squares = tl.zeros((CHUNK,), tl.float32)
        for c0 in range(0, K, CHUNK):
            v = tl.load(r_row + c0 + offs, mask=c0 + offs < K, other=0.0).to(tl.float32)
            squares += v * v
    return mean, 1.0 / tl.sqrt(tl.sum(squares, 0) / K + eps)


@triton.jit
def _epilogue(y, y_ptrs, offs_n, mask_n, pid_m, K, b_ptr, r, r_ptr, stride_rm, wg_ptr, res_ptr, g_ptr, u_ptr,
              stride_resm, stride_um, eps, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, NORM: tl.constexpr,
              KP: tl.constexpr, EARLY: tl.constexpr, RESID: tl.constexpr, EMIT_U: tl.constexpr, mean, rstd,
              STATS: tl.constexpr):
    """The one-row kernel's end: y (float32, the whole sum over K) becomes the output and is written.
    NORM (1 LayerNorm, 2 RMSNorm): the kernel multiplied u = r * gain, and r (the row before its normalization, KP
    values loaded at the start, K used) gives the statistics here. W (r - mean) rstd gain = rstd (W u - mean W gain),
    so y = rstd (y - mean wg) with wg = W gain per output; the normalization's bias is folded into the layer's bias.
    With EARLY the row came with the kernel's first loads; else it is loaded here (ops.EARLY_ROW). With STATS the
    kernel already reduced it to mean and rstd (_chunked_row_statistics).
    RESID: the residual row res is added after the bias; EMIT_U: u = output * g (the next normalization's gain,
    from the output as written, in its dtype) is written in u_ptr's dtype (ops.norm_input_dtype: bfloat16 for a
    bfloat16 stream, else float32) for the next layer's NORM. A bfloat16 u rounds relative to |r| where the layer
    needs r - mean: as accurate as a bfloat16 LayerNorm output where the row's mean is small against its spread
    (sqrt(1 + mean^2 / var) times the error otherwise), and its loop ran 2.7 us a block faster than with float32 x
    on the 6.7B shape (bench/results/step_budget_h100/README.md)."""
    if NORM != 0:
        if not STATS:
            offs_r = tl.arange(0, KP)
            if not EARLY:  # not loaded before the loop
                r = tl.load(r_ptr + pid_m * stride_rm + offs_r, mask=offs_r < K, other=0.0).to(tl.float32)
            mean, rstd = _row_statistics(r, offs_r, K, eps, NORM)
        if NORM == 1:
            y = rstd * (y - mean * tl.load(wg_ptr + offs_n, mask=mask_n, other=0.0))
        else:
            y = rstd * y
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if RESID:
        y += tl.load(res_ptr + pid_m * stride_resm + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    out = _activate(y, ACT).to(y_ptrs.dtype.element_ty)
    tl.store(y_ptrs, out, mask=mask_n)
    if EMIT_U:
        gain = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        u = out.to(tl.float32) * gain
        tl.store(u_ptr + pid_m * stride_um + offs_n, u.to(u_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _x_at(x_ptrs, i: tl.constexpr, mask_b, offs_b, K, EVEN: tl.constexpr):
    """Value i of each block of x, as float32 (0 past K or past the split)."""
    if EVEN:
        return tl.load(x_ptrs + i).to(tl.float32)
    else:
        return tl.load(x_ptrs + i, mask=mask_b & (offs_b * BLOCK + i < K), other=0.0).to(tl.float32)


@triton.jit
def _x_times(x_ptrs, i: tl.constexpr, E: tl.constexpr, mask_b, offs_b, K, EVEN: tl.constexpr):
    """Value i of each block of x times 2**E, as float32, for the one-row kernel's FMAs with subnormal codes.
    bfloat16 and float32 x: one integer instruction, E added to the exponent field of x's bits (bfloat16 moved into
    the high half of a float32 first: bits * 2**16 + E * 2**23), where a conversion and a multiply took two. A zero
    (or a masked position) becomes 2**(E - 127) instead: the code it multiplies lies at bit p = 64 - E (66 - E for
    3-bit high bits), so the product is below 2**(E - 127) * 2**(p + 8 - 149) <= 2**-202, under half the smallest
    subnormal: an exact 0. Exact for normal x below 2**(128 - E) in magnitude; past it (or an infinite or NaN x)
    the product is wrong, and the block's sum of x (the zero-point term, from x as loaded) still carries an
    infinite or NaN x into the output."""
    BF16: tl.constexpr = x_ptrs.dtype.element_ty == tl.bfloat16
    if BF16 or x_ptrs.dtype.element_ty == tl.float32:
        ptrs = x_ptrs.to(tl.pointer_type(tl.int16 if BF16 else tl.int32))
        if EVEN:
            bits = tl.load(ptrs + i).to(tl.int32)
        else:
            bits = tl.load(ptrs + i, mask=mask_b & (offs_b * BLOCK + i < K), other=0).to(tl.int32)
        if BF16:
            bits = bits * 65536
        return (bits + (E << 23)).to(tl.float32, bitcast=True)
    else:
        return _x_at(x_ptrs, i, mask_b, offs_b, K, EVEN) * (2.0 ** E)


@triton.jit
def _x_scaled(xb, x_ptrs, i: tl.constexpr, E: tl.constexpr, mask_b, offs_b, K, EVEN: tl.constexpr,
              BLOCK_B: tl.constexpr, XLOAD: tl.constexpr):
    """Value i of each block of x times 2**E (float32, BLOCK_B), the same float32 either way. XLOAD 0: its own load
    (_x_times). XLOAD 1: taken out of the step's block xb (_x_block, _x_column) and scaled as _x_times does."""
    if XLOAD == 1:
        return _x_pow2(_x_column(xb, i, BLOCK_B), E, x_ptrs)
    else:
        return _x_times(x_ptrs, i, E, mask_b, offs_b, K, EVEN)


@triton.jit
def _x_block(x_row, offs_x, mask_b, K, EVEN: tl.constexpr):
    """The step's x (BLOCK_B, 32) in one load at the step's start (XLOAD 1): bfloat16 and float32 as their bits
    (int16, int32: _x_pow2 scales them as _x_times does; 0 past K or past the split), float16 as float32."""
    BF16: tl.constexpr = x_row.dtype.element_ty == tl.bfloat16
    if BF16 or x_row.dtype.element_ty == tl.float32:
        ptrs = x_row.to(tl.pointer_type(tl.int16 if BF16 else tl.int32)) + offs_x
        if EVEN:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=mask_b[:, None] & (offs_x < K), other=0)
    else:
        if EVEN:
            return tl.load(x_row + offs_x).to(tl.float32)
        else:
            return tl.load(x_row + offs_x, mask=mask_b[:, None] & (offs_x < K), other=0.0).to(tl.float32)


@triton.jit
def _x_value(xb, x_row):
    """_x_block's values as float32 (for the block's sum of x): x as it was loaded."""
    if x_row.dtype.element_ty == tl.bfloat16:
        return xb.to(tl.bfloat16, bitcast=True).to(tl.float32)
    elif x_row.dtype.element_ty == tl.float32:
        return xb.to(tl.float32, bitcast=True)
    else:
        return xb


@triton.jit
def _x_column(xb, i: tl.constexpr, BLOCK_B: tl.constexpr):
    """Column i of the (BLOCK_B, 32) block xb, (BLOCK_B,): five halvings, each a reshape to (BLOCK_B, W / 2, 2)
    and a split that keeps the half holding i (bit 0 of i picks the even or the odd columns, then bit 1, ...):
    Triton cannot index a column. A split needs its pair in one thread, so Triton moves the block (loaded a column
    per lane, coalesced) to a row per thread once per step, through shared memory (sm_90, bfloat16: a stmatrix,
    two barriers, four 16-byte shared loads); a column is then a register of that row (the 32 columns share their
    halvings: CSE), taken with no shuffle (_x_pow2 then scales it: two integer instructions for bfloat16, whose
    values lie two to a register)."""
    t0, t1 = tl.split(tl.reshape(xb, (BLOCK_B, 16, 2)))
    t = t1 if i % 2 == 1 else t0
    t0, t1 = tl.split(tl.reshape(t, (BLOCK_B, 8, 2)))
    t = t1 if (i // 2) % 2 == 1 else t0
    t0, t1 = tl.split(tl.reshape(t, (BLOCK_B, 4, 2)))
    t = t1 if (i // 4) % 2 == 1 else t0
    t0, t1 = tl.split(tl.reshape(t, (BLOCK_B, 2, 2)))
    t = t1 if (i // 8) % 2 == 1 else t0
    t0, t1 = tl.split(tl.reshape(t, (BLOCK_B, 1, 2)))
    t = t1 if (i // 16) % 2 == 1 else t0
    return tl.reshape(t, (BLOCK_B,))


@triton.jit
def _x_pow2(v, E: tl.constexpr, x_ptrs):
    """A value of _x_block times 2**E as float32, as _x_times computes it from the same bits (exact in the same
    range; a zero gives the same 2**(E - 127), whose products with codes round to an exact 0)."""
    if x_ptrs.dtype.element_ty == tl.bfloat16:
        return (v.to(tl.int32) * 65536 + (E << 23)).to(tl.float32, bitcast=True)
    elif x_ptrs.dtype.element_ty == tl.float32:
        return (v + (E << 23)).to(tl.float32, bitcast=True)
    else:
        return v * (2.0 ** E)


@triton.jit
def _codes_along_k(w_ptr, offs_k, offs_n, mask_n, N, num_blocks, BITS: tl.constexpr):
    """The codes (len(offs_k), len(offs_n)) at inputs offs_k and outputs offs_n, as int32: each element loads the
    word that holds its code (a word is loaded once per code it holds, the repeats from L1) and shifts it out. No
    reshape: the tile comes out in the layout of its loads. Past the padded K: code 0."""
    mask = (offs_k < num_blocks * BLOCK)[:, None] & mask_n[None, :]
    if BITS == 3:  # low two bits in word (k % 32) // 16 of the block, high bit in its word 2
        base = (offs_k // BLOCK) * 3
        low = tl.load(w_ptr + (base + (offs_k % BLOCK) // 16)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        high = tl.load(w_ptr + (base + 2)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        return ((low >> ((offs_k % 16) * 2)[:, None]) & 3) | (((high >> (offs_k % BLOCK)[:, None]) & 1) << 2)
    else:
        per_word: tl.constexpr = 32 // BITS
        words = tl.load(w_ptr + (offs_k // per_word)[:, None] * N + offs_n[None, :], mask=mask, other=0)
        return (words >> ((offs_k % per_word) * BITS)[:, None]) & ((1 << BITS) - 1)


@triton.jit
def _code_tile(w_ptr, k0, offs_n, mask_n, N, num_blocks, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_N: tl.constexpr, UNPACK: tl.constexpr):
    """The codes of inputs k0 .. k0 + BLOCK_K - 1 (k0 a multiple of 32) at outputs offs_n, (BLOCK_K, BLOCK_N) int32.
    UNPACK (1, 2, 4, 8 bits): each word is loaded once, as a (BLOCK_K / codes per word, BLOCK_N) tile, its fields
    shifted out along a new middle axis and the tile reshaped, so k = word row * codes per word + field; else
    (and for 3 bits) _codes_along_k, a load per code."""
    if UNPACK and BITS != 3:
        per_word: tl.constexpr = 32 // BITS
        offs_r = k0 // per_word + tl.arange(0, BLOCK_K // per_word)
        words = tl.load(w_ptr + offs_r[:, None] * N + offs_n[None, :],
                        mask=(offs_r < num_blocks * BITS)[:, None] & mask_n[None, :], other=0)
        shifts = tl.arange(0, per_word) * BITS
        codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
        return tl.reshape(codes, (BLOCK_K, BLOCK_N))
    else:
        return _codes_along_k(w_ptr, k0 + tl.arange(0, BLOCK_K), offs_n, mask_n, N, num_blocks, BITS)


@triton.jit(do_not_specialize=["K", "stride_wk"])
def _dequant_words_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wk, blocks_per_group,
                          BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """The whole weight, transposed, (K, N) in out's dtype: (code - zero) * scale. For prefill through cuBLAS
    (ops.dequant_mm): written once into a reused scratch, then one bf16 GEMM. Unpacked on the store side: a program
    loads the words of BLOCK_B blocks of 32 codes x BLOCK_N outputs once (a (BLOCK_B, BLOCK_N) tile per word of a
    block), with one scale (and zero point) per block, and writes each code of a block to its own row of out,
    k = 32 * block + code: one coalesced store per code, no reshape, no load per code. Bound by memory: it reads the
    packed bytes once and writes the weight once. PDL: the scales and the first words are loaded before waiting for
    the earlier kernels (the matmul before may still read the scratch this writes)."""
    pid_b, pid_n = tl.program_id(0), tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_w = (offs_b < tl.cdiv(K, BLOCK))[:, None] & mask_n[None, :]
    w_ptrs = w_ptr + (offs_b * BITS)[:, None] * N + offs_n[None, :]
    sz_offs = (offs_b // blocks_per_group)[:, None] * N + offs_n[None, :]
    scale = tl.load(s_ptr + sz_offs, mask=mask_w, other=0.0)
    if HAS_ZERO:
        zero = tl.load(z_ptr + sz_offs, mask=mask_w, other=0).to(tl.float32)
    else:
        zero = ZERO
    out_ptrs = out_ptr + (offs_b * BLOCK)[:, None] * stride_wk + offs_n[None, :]
    if BITS == 3:  # low two bits in words 0 and 1 of the block, the high bit in word 2
        low0 = tl.load(w_ptrs, mask=mask_w, other=0)
        low1 = tl.load(w_ptrs + N, mask=mask_w, other=0)
        high = tl.load(w_ptrs + 2 * N, mask=mask_w, other=0)
        _after_earlier_kernels(PDL)
        for i in tl.static_range(BLOCK):
            w = (_code3(low0, low1, high, i) - zero) * scale
            tl.store(out_ptrs + i * stride_wk, w.to(out_ptr.dtype.element_ty),
                     mask=mask_w & (offs_b * BLOCK + i < K)[:, None])
    else:
        per_word: tl.constexpr = 32 // BITS
        first_word = tl.load(w_ptrs, mask=mask_w, other=0)
        _after_earlier_kernels(PDL)
        for v in tl.static_range(BITS):
            if v == 0:
                word = first_word
            else:
                word = tl.load(w_ptrs + v * N, mask=mask_w, other=0)
            for j in tl.static_range(per_word):
                i = v * per_word + j
                w = (_as_float(_field(word, j * BITS, BITS)) - zero) * scale
                tl.store(out_ptrs + i * stride_wk, w.to(out_ptr.dtype.element_ty),
                         mask=mask_w & (offs_b * BLOCK + i < K)[:, None])


# K and the row stride of x keep their divisibility-by-16 specialization here: with it the x tiles are known to be
# 16-byte aligned rows, which the software pipeliner needs to copy them asynchronously a few K steps ahead
# (cp.async); without it every K step waited for its x tile (bench/kernel_sass.py --kernel=gemm shows which)
@triton.jit(do_not_specialize=["M", "stride_ym", "blocks_per_group", "blocks_per_split"])
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, stride_xm, stride_ym,
                 blocks_per_group, blocks_per_split,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, UNPACK: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr,
                 ZWORDS: tl.constexpr = False):
    """A (BLOCK_M, BLOCK_N) tile of y per program over the K range of its split (grid axis 2: blocks_per_split
    blocks of 32 codes each, a whole number of K tiles). SPLIT: the partial tiles are added as in
    _stream_gemv_kernel (workspace, arrival counter per tile, the last program adds them in split order), which
    gives a few-row problem (decode at batch 2 to 16) enough programs to stream the weights at full bandwidth.
    ACT: the activation of the output tile (_activate), as in _stream_gemv_kernel. PDL: waits for the earlier kernels
    before its loop (_after_earlier_kernels): their end overlaps this kernel's launch. ZWORDS (N % 4 == 0, zero
    points 4-byte aligned): the uint8 zero points are read as the 32-bit words that hold them, so that the software
    pipeline copies them ahead like the other tiles (an asynchronous copy moves at least 4 bytes; a uint8 load
    stays a synchronous load in the loop, a wait for memory every K tile)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    num_blocks = tl.cdiv(K, BLOCK)
    k_first = pid_k * blocks_per_split * BLOCK
    k_last = tl.minimum(k_first + blocks_per_split * BLOCK, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    _after_earlier_kernels(PDL)
    for k0 in range(k_first, k_last, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        codes = _code_tile(w_ptr, k0, offs_n, mask_n, N, num_blocks, BITS, BLOCK_K, BLOCK_N, UNPACK)
        group = (k0 // BLOCK) // blocks_per_group  # BLOCK_K divides the group size: one group per tile
        scale = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0)
        if HAS_ZERO:  # code | 2**23 read as a float is 2**23 + code: one subtraction of 2**23 + zero (integers
            # below 2**24: exact), where _as_float and the zero point were two
            if ZWORDS:  # little-endian: zero point n is byte n % 4 of word n // 4
                zword = tl.load(z_ptr.to(tl.pointer_type(tl.int32)) + (group * N + offs_n) // 4, mask=mask_n,
                                other=0)
                zero = ((zword >> ((offs_n % 4) * 8)) & 0xFF).to(tl.float32) + 8388608.0
            else:
                zero = tl.load(z_ptr + group * N + offs_n, mask=mask_n, other=0).to(tl.float32) + 8388608.0
            w = ((codes | 0x4B000000).to(tl.float32, bitcast=True) - zero[None, :]) * scale[None, :]
        else:  # a constant zero point may be a half (binary): 2**23 + 1/2 is not a float32
            w = (_as_float(codes) - ZERO) * scale[None, :]
        # the dequantized weight in the activation dtype (bf16 rounds it as a bf16 weight would be), accumulated
        # in place on the tensor cores: no product to scale and add per K tile
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        splits = tl.num_programs(2)
        tile_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + tile_offs, acc, mask=mask_y)
        tl.debug_barrier()  # every thread's partials are written before the count says so
        counter = count_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(counter, 1, sem="acq_rel") == splits - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for k in range(0, splits):  # in split order: the same sum every call
                acc += tl.load(ws_ptr + k * M * N + tile_offs, mask=mask_y, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, _activate(acc, ACT).to(y_ptr.dtype.element_ty), mask=mask_y)
            tl.atomic_xchg(counter, 0)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, _activate(acc, ACT).to(y_ptr.dtype.element_ty), mask=mask_y)
