"""The many-row (prefill) GEMM of packed weights on Hopper, warp-specialized by hand in Gluon (Triton's dialect with
explicit layouts, shared memory, barriers and partitions; Triton 3.5 or later), one of the launcher's candidates for
more than ops.GEMV_MAX_ROWS rows (ops.call_candidates), where supports() says it runs: 1, 2, 3, 4 and 8-bit codes,
with uint8 zero points or one constant zero point (checked and timed on an H100 for int4, int3 (read from its bit
planes by _plane_tile) and int2 g128, int8 and 1-bit per channel and ternary: `bash bench/inference_gpu.sh
prefill_gluon_all`; the launcher also compares every Gluon candidate's output with another kernel's before timing
it, ops.agrees).

    gluon_mm(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config, activation) -> y

Per program a (BLOCK_M, BLOCK_N) tile of y, its K in tiles of BLOCK_K = 64 (a 128-byte row of x and of the weight
tile: the widest TMA and wgmma swizzle), a ring of STAGES shared-memory slots between three kinds of partitions:
- the loader (one warp): TMA copies of each K tile's x (BLOCK_M, 64), words (64 B / 32, BLOCK_N) int32 (the
  project's layout for B-bit codes: code f of word row r is input r * 32 / B + f), scales and zero points (one row
  each) into the next free slot;
- DQ_PARTS (1 to 4) dequantize partitions of DQ_WARPS warps, taking the K tiles in turn (while one waits on its
  loads, stores and barriers, the next computes): code c goes into the top B bits of a float's mantissa, 1 + c / 2^B, and
  w = (1 + c / 2^B) 2^B s - (2^B + z) s = (c - z) s (one constant shift, one 3-input logic op and one FMA per code;
  3-bit codes from their planes two at a time, _plane_block), stored as the (BLOCK_N, 64) bf16 weight tile,
  K-contiguous (16 bytes a store);
- the default partition (num_warps): the asynchronous wgmmas of each K tile, one tile in flight, then y (bf16);
  one warp group per 64 rows with x as the left operand, or (SWAP, a config's eighth number) the weight tile as the
  left operand and y^T's tile accumulated, one m64 x BLOCK_M product per 16 inputs; with SWAP 3 (the first config)
  y's tile goes out through a slot of x's ring and one TMA copy.
Barriers per slot: loaded (one per dequantize partition and slot: a partition skips the others' tiles, and on a
barrier of the slot alone it could wait two phases behind, where the parity passes before its tile has landed;
bench/ring_protocol_check.py explores every interleaving), dequantized, free again. With one row of scales for
all inputs (per channel) each dequantize partition has its own slot of them, loaded with its first tile. On one
H100, 256 rows against cuBLAS bf16's 19.9-20.3 us on 4096x4096: 20.4-21.4 us for int4 g128, int2, ternary and
1-bit, 21.4-21.7 for int8 (symmetric and affine), 21.5-22.4 for int3; 57.9-63.6 against 43.3-45.1 on 4096x11008
(bench/results/prefill_gluon_h100/README.md, files 23-31). The words, scales and zero points in rings of their own,
one per dequantize partition with a second loader warp, were slower (23.3-23.9 us against 22.2, file 20; the code
is in commit 578c0c9); 7 stages, which hung before the race fix, ran correctly after it and were slower too (file
22); so was each dequantize partition loading its next tile's words before its stores (file 29, commit cb0372a);
two partitions taking two K tiles a turn (one fence for both) were level with three taking one (file 31, commit
b095765).

TAIL (a config's ninth number, schedule()): the tiles of whole waves run whole and the rest, which would leave
multiprocessors idle in a last wave, split in K in the same launch; a split tile's owner (its last part, launched
after the others) waits for their float32 parts (stored in the accumulator's register order) and adds them to its
own (_hand_off). On 4096x11008 (256 x 64 tiles: 132 whole, 40 in thirds) 47.7 us against 60.3 for the first
config and cuBLAS's 42.9; the launcher takes it there for every format, 0.87-0.94x cuBLAS
(bench/results/prefill_timeline_h100). TAIL 2 (FOLD) leaves the split tiles no programs of their own: the last
wave's programs take their parts in the same ring beside their whole tiles, a tile's first parts (its siblings')
before the program's whole tile, its last (the owner's) after, started from the siblings' sum, stored a whole
tile earlier: one round, no owner waiting at its end. On one H200, 4096x11008 int4: 42.9 us against 46.9 for TAIL 1
(cuBLAS 36.2); the launcher takes it there and on 4096x12288 for every format (bench/results/prefill_fold).
stamps= has each program write its timeline (bench/prefill_ws_probe.py --timeline).

REG_A (a config's seventh number, DQ_PARTS, 0): no dequantize partitions; the wgmma warps dequantize each K tile
straight into the registers of wgmma's left operand (the weight tile, SWAP), in register_layout(), while the
previous tile's product runs (_register_step); 3-bit planes in 2-bit codes' layout (_register_planes). Its
256 x 64 tile with one warp group is listed: behind the dequantize partitions where a second round follows
(4096x11008: 50.0 us against 47.6) but ahead in one round for 1-bit codes (4096x4096: 18.5 us, 1.10x cuBLAS;
bench/results/prefill_regs_h100). So is its 256 x 128 tile, a warp group per 64 outputs (wgmma m64 x n256), where
128 divides the outputs: on 4096x16384 (128 tiles, one round) the launcher takes it for every format, 1.01-1.18x
cuBLAS against 0.90-1.05x without it (bench/results/prefill_wide_h100).

MATH (a config's tenth number, dq_math()): the dequantize partitions' arithmetic two codes at a time in bfloat16x2
(_pair_tile: a byte permute, a logic op, a subtract, a multiply and an FMA a pair; MATH 1 keeps each weight within a
rounding of the float32 path's, MATH 2 rounds the scale to bfloat16 as tinygemm does) for 1, 2 and 4-bit codes:
the dequantize loop of an int4 tile 135 SASS instructions against 156 (MATH 2: 115): on one H100 the 1 and 2-bit
codes' 256-row calls 6-8% faster, int4's 1-9% (bench/results/prefill_pairs_h100). MATH 3, in the first and the last
listed config, is MATH 1 but where one row of scales serves every input (per channel, per tensor): there the pairs
are c - z alone (8-bit codes too, _byte_pair_tile) and _write_y scales each output once; on one H100 int8, 1-bit
and ternary 2-7% faster than with MATH 1 (bench/results/prefill_after_h100).

Each K tile's words first, on a barrier of their own that the dequantize partition waits on, and x after them on
the one the products wait on (a config's eleventh number, EARLY, in commit 2c595e2; its ring protocol is
bench/ring_protocol_check.py's `early`): level or slower on one H100 (bench/results/prefill_pairs_h100), taken out.

Gluon kernels do not run under TRITON_INTERPRET=1: the CPU tests compile this one for sm_90 (compile_for()) and
check its arithmetic in float64; on the GPU bench/prefill_ws_probe.py checks it against the float64 product and
bench/kernels.py --check with the other kernels.
"""
import functools

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # Triton 3.9's name, 3.6's
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # Triton 3.6's name, 3.9's
except (ImportError, AttributeError):  # no Triton, or one without Gluon's Hopper API: supports() says no
    gluon = None

# BLOCK_M, BLOCK_N, BLOCK_K, num_warps, STAGES, DQ_WARPS, DQ_PARTS[, SWAP]. At 256 rows a 128 x 64 tile gives 128
# programs on 4096 outputs (132 multiprocessors on an H100); three dequantize partitions of 4 warps kept up where one
# did not (30.2 -> 24.1 (two) -> 23.0 us on 4096x4096); wider tiles left multiprocessors idle (128x128: 37-42 us) and
# a 128x128 tile with three dequantize partitions did not finish in two runs, 64x128 tiles (x read half as often, the
# weight dequantized twice as often) took 27.6-30.1 us (file 25): not listed. SWAP (the weight tile as wgmma's left
# operand) took 21.6 us against 23.5 on 4096x4096 and 62.8 against 68.2 on 4096x11008 (one H100 run). Its epilogue
# through the compiler's scratch (SWAP 1) left 8-bit codes 6 stages (232,528 bytes at 8, 232,448 on Hopper); through
# x's ring (SWAP 3) they have 8: int8 24.1 -> 23.3 us, int4 level with SWAP 1 (files 23, 24 of
# bench/results/prefill_gluon_h100). y stored straight from the accumulator (SWAP 2) lost (file 20): not listed
# TAIL (a ninth number 1, schedule()): the tiles past the last whole wave split in K within the one launch. On
# 4096x11008 at 256 rows the 128 x 64 tiles run in three rounds of about 18 us on the 132 multiprocessors (a
# program's loop takes as long whatever runs beside it: `bench/prefill_ws_probe.py --timeline`); 256 x 64 tiles with
# TAIL run 132 whole tiles and then 40 in thirds: 60.3 -> 47.7 us (bench/results/prefill_timeline_h100).
# REG_A (DQ_PARTS 0, the last: the weight tile dequantized into wgmma's registers by one warp group, no dequantize
# partitions): 18.5 us against 20.4-21.7 for the others with 1-bit codes on 4096x4096, 50.0 against 47.6 on
# 4096x11008; with two warp groups (60.4 us) or 128 x 64 tiles (68.3) it lost: not listed
# (bench/results/prefill_regs_h100). Its 256 x 128 tile (the last: a warp group per 64 outputs, each wgmma m64 x n256,
# no split) where its tiles fit one round: 4096x16384 55.3 us, 1.12x cuBLAS, against 62.5 for the others; 52.8
# against 47.6 on 4096x11008 (bench/results/prefill_wide_h100). Offered only where 128 divides the outputs.
# TAIL 2 (the last: FOLD, the split tiles' parts taken by the last wave's programs beside their whole tiles, the
# siblings' first and the owner's last, in one ring): 42.9 us against 46.9 on 4096x11008, 47.6 against 51.1 on
# 4096x12288 (one H200, bench/results/prefill_fold); on an H100 44.7 against 47.4 (cuBLAS 44.2), the owners' loops
# 2.1 us longer than their siblings' for the load of their parts: fold_share() (bench/results/prefill_share_h100).
# Not listed: 4 dequantize partitions of 2 warps, (256, 64, 64, 8, 5, 2, 4, 3, 1 or 2): correct, no faster (a whole
# tile's loop 28.9 us against 27.5 on 4096x11008, one H100, bench/results/prefill_share_h100).
# MATH 1 (a tenth number, bfloat16x2 pairs, dq_math()), listed in the first and the last config until MATH 3 below
# took its place: on one H100, side by side,
# 4096x11008 int2, ternary and 1-bit 40.5-40.8 us against 43.4-44.1 with MATH 0 (cuBLAS 43.2), int4 43.8 against
# 45.0; 4096x4096 int4 with the first config 19.6 against 21.5 (cuBLAS 20.0); 3 and 8-bit codes ran MATH 0 in them
# (bench/results/prefill_pairs_h100). The words first on their own barrier (EARLY, an eleventh number in commit
# 2c595e2): level or slower beside MATH 1 (42.0 against 40.7 us for int2, same run), taken out
# MATH 3 (the scale after the products where one row of scales serves every input, MATH 1 elsewhere) in their place:
# on one H100, side by side with MATH 1, 4096x11008 int8 47.5 us against 48.5, 1-bit 39.3 against 40.9, ternary 39.4
# against 41.0 (cuBLAS 43.1); 4096x4096 with the first config int8 20.8 against 21.8, 1-bit 18.0 against 19.4
# (cuBLAS 20.4; bench/results/prefill_after_h100)
CONFIGS = [(128, 64, 64, 4, 8, 4, 3, 3, 0, 3), (128, 64, 64, 4, 8, 4, 3, 1), (128, 64, 64, 4, 8, 4, 3),
           (128, 64, 64, 4, 8, 4, 2), (256, 64, 64, 8, 5, 4, 2, 3, 1), (256, 64, 64, 4, 6, 0, 0, 3, 1),
           (256, 128, 64, 8, 4, 0, 0, 1), (256, 64, 64, 8, 5, 4, 2, 3, 2, 3)]
BLOCK_K = 64
MIN_GROUP = BLOCK_K  # a group of at least one K tile: one row of scales per tile


if gluon is not None:
    @gluon.jit
    def _loader(common, part, DQ_LAYOUT: gl.constexpr, DQ_PARTS: gl.constexpr, BITS: gl.constexpr,
                HAS_ZERO: gl.constexpr, ZERO: gl.constexpr, GROUP_TILES: gl.constexpr, FOLD: gl.constexpr):
        """One warp: each K tile's TMA copies (x, words, scales, zero points where HAS_ZERO) into the ring's next
        free slot (free once the default partition has finished the product that read it), on the ready barrier of
        the dequantize partition that takes the tile; with FOLD the program's second segment's K tiles after its
        first's, on in the one ring. The workers share one signature."""
        descs, bufs, bars, off_m, off_n, k_tiles, k_lo, seg2 = common
        p = _load_tiles(descs, bufs, bars, 0, k_tiles, off_m, off_n, k_lo, gl.to_tensor(0), 0, DQ_PARTS, BITS,
                        HAS_ZERO, GROUP_TILES)
        if FOLD:
            off_m2, off_n2, k_lo2, n2 = seg2
            _load_tiles(descs, bufs, bars, k_tiles, k_tiles + n2, off_m2, off_n2, k_lo2 - k_tiles, p, DQ_PARTS,
                        DQ_PARTS, BITS, HAS_ZERO, GROUP_TILES)

    @gluon.jit
    def _load_tiles(descs, bufs, bars, i0, i1, off_m, off_n, k_base, p, row_base, DQ_PARTS: gl.constexpr,
                    BITS: gl.constexpr, HAS_ZERO: gl.constexpr, GROUP_TILES: gl.constexpr):
        """The loader's ring positions i0 .. i1 - 1: K tile k_base + i of the (off_m, off_n) tile (p: the dequantize
        partition of position i0); with one row of scales, each partition's row with its first position here, into
        slot row_base + its index. Returns the partition of position i1."""
        x_desc, q_desc, s_desc, z_desc = descs
        x_bufs, q_bufs, s_bufs, z_bufs, w_bufs = bufs
        ready, w_ready, empty = bars
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        TILE_K: gl.constexpr = x_desc.block_type.shape[1]
        ONE_ROW: gl.constexpr = GROUP_TILES == 0  # one row of scales (and zero points) for all inputs
        rows: gl.constexpr = s_desc.block_type.nbytes + (z_desc.block_type.nbytes if HAS_ZERO else 0)
        nbytes: gl.constexpr = x_desc.block_type.nbytes + q_desc.block_type.nbytes + (0 if ONE_ROW else rows)
        first_bytes: gl.constexpr = nbytes + rows  # with one row: a partition's first tile brings the row
        for i in range(i0, i1):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1 at once
            k0 = (k_base + i) * TILE_K  # the program's K tiles start at k_base + i0 (TAIL)
            bar = ready.index(p * STAGES + s)  # one barrier per partition and slot (_dequantize)
            if ONE_ROW:  # the row once for each dequantize partition, with its first tile, into a slot of its own
                first = i - i0 < DQ_PARTS
                mbarrier.expect(bar, first_bytes, pred=first)
                mbarrier.expect(bar, nbytes, pred=i - i0 >= DQ_PARTS)
                _tma_load(s_desc, [0, off_n], bar, s_bufs.index(row_base + p), pred=first)
                if HAS_ZERO:
                    _tma_load(z_desc, [0, off_n], bar, z_bufs.index(row_base + p).slice(0, 1), pred=first)
            else:  # a constant divisor: a shift or a multiply, not a division a tile (the one warp's loop is short)
                mbarrier.expect(bar, nbytes)
                row = (k_base + i) // GROUP_TILES
                _tma_load(s_desc, [row, off_n], bar, s_bufs.index(s))
                if HAS_ZERO:
                    _tma_load(z_desc, [row, off_n], bar, z_bufs.index(s).slice(0, 1))
            p = gl.where(p == DQ_PARTS - 1, 0, p + 1)
            _tma_load(x_desc, [off_m, k0], bar, x_bufs.index(s))
            _tma_load(q_desc, [k0 * BITS // 32, off_n], bar, q_bufs.index(s))
        return p

    @gluon.jit
    def _ring(x_desc, q_desc, s_desc, z_desc, STAGES: gl.constexpr, ROW_SLOTS: gl.constexpr, Z_SLOTS: gl.constexpr):
        """The ring's STAGES slots: x's tile, the words; ROW_SLOTS rows of scales and Z_SLOTS of zero points (a TMA
        copy lands on 128-byte boundaries: a slot of zero points, 64 bytes for 64 outputs, is padded to that).
        With one row for all inputs (per channel) each dequantize partition has a slot of its own, loaded once, and
        without zero points one unused slot: 8-bit codes' 8 stages fit in shared memory then."""
        TILE_M: gl.constexpr = x_desc.block_type.shape[0]
        TILE_K: gl.constexpr = x_desc.block_type.shape[1]
        TILE_N: gl.constexpr = q_desc.block_type.shape[1]
        x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, TILE_M, TILE_K], x_desc.layout)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
        s_bufs = gl.allocate_shared_memory(s_desc.dtype, [ROW_SLOTS, 1, TILE_N], s_desc.layout)
        ROW_BITS: gl.constexpr = TILE_N * z_desc.dtype.primitive_bitwidth
        Z_ROWS: gl.constexpr = (1024 + ROW_BITS - 1) // ROW_BITS
        z_bufs = gl.allocate_shared_memory(z_desc.dtype, [Z_SLOTS, Z_ROWS, TILE_N], z_desc.layout)
        return x_bufs, q_bufs, s_bufs, z_bufs

    @gluon.jit
    def _fields(words, shifts, scaled, bias, BITS: gl.constexpr, DTYPE: gl.constexpr):
        """The weights of the codes at bit `shifts` of `words` (broadcast against each other), in DTYPE: code c
        moved to mantissa bits 23 - BITS .. 22 by one constant shift (left or right), then masked and the exponent
        put in by one 3-input logic op (LOP3), 1 + c / 2^B, and w = (1 + c / 2^B) * scaled + bias (one FMA) with
        scaled = 2^B s and bias = -(2^B + z) s."""
        left = gl.maximum(23 - BITS - shifts, 0)
        right = gl.maximum(shifts - (23 - BITS), 0)
        mask = gl.full(shifts.shape, ((1 << BITS) - 1) << (23 - BITS), gl.int32, layout=shifts.type.layout)
        bits = gl.inline_asm_elementwise("lop3.b32 $0, $1, $2, 0x3F800000, 0xEA;", "=r,r,r",
                                         [(words << left) >> right, mask], dtype=gl.int32, is_pure=True, pack=1)
        return (bits.to(gl.float32, bitcast=True) * scaled + bias).to(DTYPE)

    @gluon.jit
    def _word_tile(q, scales, zeros, DQ_LAYOUT: gl.constexpr, BITS: gl.constexpr, HAS_ZERO: gl.constexpr,
                   ZERO: gl.constexpr, TILE_N: gl.constexpr, TILE_K: gl.constexpr, DTYPE: gl.constexpr):
        """One slot's weight tile (TILE_N, TILE_K) in DTYPE from B-bit codes in words, 32 / B a word (code f of
        word row r is input r * 32 / B + f): code c goes into the top B bits of a float's mantissa, 1 + c / 2^B,
        and w = (1 + c / 2^B) 2^B s - (2^B + z) s = (c - z) s (one shift, one logic op and one FMA per code)."""
        PER: gl.constexpr = 32 // BITS                                        # codes per word
        SPAN: gl.constexpr = 1 << BITS                                        # 2^BITS, a float below
        rows: gl.constexpr = gl.SliceLayout(1, DQ_LAYOUT)                     # (word row, output)
        fields = gl.arange(0, PER, layout=gl.SliceLayout(0, gl.SliceLayout(2, DQ_LAYOUT)))
        shifts = gl.expand_dims(gl.expand_dims(fields * BITS, 0), 2)          # (1, PER, 1)
        words = gl.expand_dims(q.load(rows), 1)                               # (TILE_K / PER, 1, TILE_N)
        scale = scales.load(rows)                                             # (1, TILE_N)
        if HAS_ZERO:
            bias = gl.expand_dims(-(zeros.load(rows).to(gl.float32) + SPAN) * scale, 1)
        else:
            bias = gl.expand_dims(-(ZERO + SPAN) * scale, 1)
        scaled = gl.expand_dims(scale * SPAN, 1)                              # (1, 1, TILE_N)
        w = _fields(words, shifts, scaled, bias, BITS, DTYPE)                # (TILE_K / PER, PER, TILE_N)
        return gl.reshape(gl.permute(w, (2, 0, 1)), [TILE_N, TILE_K])

    @gluon.jit
    def _pair_tile(q, scales, zeros, DQ_LAYOUT: gl.constexpr, BITS: gl.constexpr, HAS_ZERO: gl.constexpr,
                   ZERO: gl.constexpr, PAIRS: gl.constexpr, TILE_N: gl.constexpr, TILE_K: gl.constexpr):
        """MATH 1 and 2 (PAIRS = 4 F + MATH, pairs()): _word_tile's tile two codes at a time as bfloat16x2,
        codes 2i and 2i + 1 of a word (adjacent inputs, so the pair is what the tile's store takes). One byte permute
        (PRMT) puts the byte holding code 2i of the word shifted by o - F (o: its offset in the byte) and the same byte
        of the word shifted by o + B - F into the halves' low bytes; one logic op masks them and puts the exponent in,
        2^(7 - F) + c in each half (c at mantissa bit F, so F fraction bits for the zero point); the zero point
        2^(7 - F) + z subtracted exactly (both in one binade) leaves c - z, times the scale: MATH 1 as s_hi + s_lo
        (its bfloat16 and the bfloat16 of the rest, one multiply and one FMA: within a rounding of the float32 path's
        weight), MATH 2 as one bfloat16 s (as tinygemm keeps its scales; a measurement only, not listed)."""
        F: gl.constexpr = PAIRS // 4
        PER: gl.constexpr = 32 // BITS
        BASE: gl.constexpr = 1 << (7 - F)                                     # 2^(7 - F), the halves' exponent
        rows: gl.constexpr = gl.SliceLayout(1, DQ_LAYOUT)                     # (word row, output)
        i = gl.arange(0, PER // 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, DQ_LAYOUT)))
        bit = gl.expand_dims(gl.expand_dims(2 * i * BITS, 0), 2)              # code 2i's bit, (1, PER / 2, 1)
        o = bit % 8
        words = gl.expand_dims(q.load(rows), 1)                               # (TILE_K / PER, 1, TILE_N)
        lo = (words << gl.maximum(F - o, 0)) >> gl.maximum(o - F, 0)         # code 2i at bit 8 (bit // 8) + F
        hi = words >> (o + BITS - F)                                          # code 2i + 1 there (F <= 1)
        sel = bit // 8 + ((bit // 8 + 4) << 8)                                # result byte 0: lo's, byte 2: hi's
        mask = gl.full(sel.shape, (((1 << BITS) - 1) << F) * 0x10001, gl.int32, layout=sel.type.layout)
        magic = gl.full(sel.shape, (134 - F) * 0x800080, gl.int32, layout=sel.type.layout)  # exponent 127 + 7 - F
        if HAS_ZERO:
            zero = zeros.load(rows).to(gl.float32) + BASE
        else:
            zero = gl.full([1, TILE_N], ZERO + BASE, gl.float32, layout=rows)
        zero2 = gl.expand_dims(_twice(zero.to(gl.bfloat16)), 1)              # (1, 1, TILE_N), exact
        if PAIRS % 4 == 3:  # MATH 3: c - z alone (exact), the scale after the products (_write_y)
            first, second = gl.inline_asm_elementwise(
                "{ .reg .b32 t; prmt.b32 t, $2, $3, $4; lop3.b32 t, t, $5, $6, 0xEA; sub.rn.bf16x2 t, t, $7; "
                "mov.b32 {$0, $1}, t; }",
                "=h,=h,r,r,r,r,r,r", [lo, hi, sel, mask, magic, zero2],
                dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)     # (TILE_K / PER, PER / 2, TILE_N) each
        else:
            scale = scales.load(rows)                                         # (1, TILE_N) float32
            s_hi = scale.to(gl.bfloat16)
            s_lo = (scale - s_hi.to(gl.float32)).to(gl.bfloat16)
            hi2 = gl.expand_dims(_twice(s_hi), 1)
            lo2 = gl.expand_dims(_twice(s_lo), 1)
            if PAIRS % 4 == 1:  # MATH 1: (c - z) s_hi + (c - z) s_lo
                first, second = gl.inline_asm_elementwise(
                    "{ .reg .b32 t, u; prmt.b32 t, $2, $3, $4; lop3.b32 t, t, $5, $6, 0xEA; sub.rn.bf16x2 t, t, $7; "
                    "mul.rn.bf16x2 u, t, $9; fma.rn.bf16x2 t, t, $8, u; mov.b32 {$0, $1}, t; }",
                    "=h,=h,r,r,r,r,r,r,r,r", [lo, hi, sel, mask, magic, zero2, hi2, lo2],
                    dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
            else:  # MATH 2: (c - z) s_hi
                first, second = gl.inline_asm_elementwise(
                    "{ .reg .b32 t; prmt.b32 t, $2, $3, $4; lop3.b32 t, t, $5, $6, 0xEA; sub.rn.bf16x2 t, t, $7; "
                    "mul.rn.bf16x2 t, t, $8; mov.b32 {$0, $1}, t; }",
                    "=h,=h,r,r,r,r,r,r,r", [lo, hi, sel, mask, magic, zero2, hi2],
                    dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        w = gl.join(first, second)                                            # (TILE_K / PER, PER / 2, TILE_N, 2)
        return gl.reshape(gl.permute(w, (2, 0, 1, 3)), [TILE_N, TILE_K])     # input r PER + 2 i + h

    @gluon.jit
    def _byte_pair_tile(q, zeros, DQ_LAYOUT: gl.constexpr, HAS_ZERO: gl.constexpr, ZERO: gl.constexpr,
                        TILE_N: gl.constexpr, TILE_K: gl.constexpr):
        """MATH 3's 8-bit codes (one row of scales, applied after the products): codes 2i and 2i + 1 of a word (bytes
        2i and 2i + 1) each made 2^23 + c as a float32 by one byte permute (the byte under the exponent of 2^23),
        minus 2^23 + z (exact: both in one binade), and the two results' upper halves taken as bfloat16x2 by one more
        permute: c - z is an integer below 256 in magnitude, so its float32 has nothing in the lower half."""
        rows: gl.constexpr = gl.SliceLayout(1, DQ_LAYOUT)                     # (word row, output)
        i = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(2, DQ_LAYOUT)))
        sel = gl.expand_dims(gl.expand_dims(2 * i + 0x7540, 0), 2)            # byte 2i of the word, then 2^23's
        words = gl.expand_dims(q.load(rows), 1)                               # (TILE_K / 4, 1, TILE_N)
        if HAS_ZERO:
            zero = zeros.load(rows).to(gl.float32) + 8388608.0
        else:
            zero = gl.full([1, TILE_N], ZERO + 8388608.0, gl.float32, layout=rows)
        zero = gl.expand_dims(zero, 1)                                        # (1, 1, TILE_N) float32, exact
        first, second = gl.inline_asm_elementwise(
            "{ .reg .b32 a, b, m, t; mov.b32 m, 0x4B000000; prmt.b32 a, $2, m, $3; add.s32 t, $3, 1; "
            "prmt.b32 b, $2, m, t; sub.f32 a, a, $4; sub.f32 b, b, $4; prmt.b32 a, a, b, 0x7632; "
            "mov.b32 {$0, $1}, a; }",
            "=h,=h,r,r,f", [words, sel, zero], dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        w = gl.join(first, second)                                            # (TILE_K / 4, 2, TILE_N, 2)
        return gl.reshape(gl.permute(w, (2, 0, 1, 3)), [TILE_N, TILE_K])     # input 4 r + 2 i + h

    @gluon.jit
    def _twice(v):
        """A bfloat16 tensor as int32, v in both halves (a bfloat16x2 operand)."""
        b = v.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        return b | (b << 16)

    @gluon.jit
    def _plane_block(q, row, scale, bias, L: gl.constexpr, DTYPE: gl.constexpr):
        """Block b's 32 codes (row = 3b) of 3-bit planes as (half h, r, TILE_N, g) in DTYPE, code 16 h + 8 g + r: h
        across warps, r and g in a thread's registers. Codes r and r + 8 of a half are 16 bits apart in its low word
        (2 bits a code); their high bits (8 apart) are first spread 16 apart, so that two shifts and two logic ops
        make both codes at once, as bfloat16 1 + c / 8 in the two halves of a word; each is then a float32 (one
        logic op) for the FMA, w = (1 + c / 8) 8 s - (8 + z) s, as _word_tile makes it."""
        HALF: gl.constexpr = gl.SliceLayout(1, L)                             # (h, TILE_N)
        h = gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(1, HALF)), 1)
        low = gl.where(h == 0, q.slice(row, 1).load(HALF), q.slice(row + 1, 1).load(HALF))  # word row 3b + h
        low = gl.expand_dims(low, 1)                                          # (2, 1, TILE_N)
        # this half's high bits, code r + 8's moved to bit 16 + r: bytes 2h and 2h + 1 of the word to bytes 0 and 2
        # of a zero word, one byte permute (PRMT; a shift, two masks, a shift and an OR before: file 31)
        top = gl.inline_asm_elementwise("prmt.b32 $0, $1, 0, $2;", "=r,r,r",
                                        [q.slice(row + 2, 1).load(HALF), 0x4140 + h * 0x0202], dtype=gl.int32,
                                        is_pure=True, pack=1)                 # (2, TILE_N)
        top = gl.expand_dims(top, 1)
        r = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(2, L))), 0), 2)
        lows = (low << gl.maximum(4 - 2 * r, 0)) >> gl.maximum(2 * r - 4, 0)  # bits 2r -> 4, 2r + 16 -> 20
        tops = (top << gl.maximum(6 - r, 0)) >> gl.maximum(r - 6, 0)          # bits r -> 6, 16 + r -> 22
        pair = gl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $2, 0x00400040, 0x3F803F80, 0xEA; lop3.b32 $0, $1, 0x00300030, t, 0xEA; }",
            "=r,r,r", [lows, tops], dtype=gl.int32, is_pure=True, pack=1)     # (2, 8, TILE_N)
        first = ((pair << 16).to(gl.float32, bitcast=True) * (scale * 8) + bias).to(DTYPE)        # code r
        second = ((pair & -65536).to(gl.float32, bitcast=True) * (scale * 8) + bias).to(DTYPE)    # code r + 8
        return gl.join(first, second)                                         # (h, r, TILE_N, g)

    @gluon.jit
    def _plane_tile(q, scales, zeros, DQ_LAYOUT: gl.constexpr, HAS_ZERO: gl.constexpr, ZERO: gl.constexpr,
                    TILE_N: gl.constexpr, TILE_K: gl.constexpr, DTYPE: gl.constexpr):
        """One slot's weight tile (TILE_N, TILE_K = 64) in DTYPE from 3-bit codes, two blocks of 32 in planes
        (layout.py): word rows 3b and 3b + 1 the low two bits of codes 0-15 and 16-31 of block b, 3b + 2 their
        high bits; each block by _plane_block, joined in input order."""
        gl.static_assert(TILE_K == 64)
        ROW: gl.constexpr = gl.SliceLayout(1, DQ_LAYOUT)                    # (1, TILE_N), expanded to (1, 1, TILE_N)
        scale = gl.expand_dims(scales.load(ROW), 1)
        if HAS_ZERO:
            bias = -(gl.expand_dims(zeros.load(ROW), 1).to(gl.float32) + 8) * scale
        else:
            bias = -(ZERO + 8) * scale
        w = gl.join(_plane_block(q, 0, scale, bias, DQ_LAYOUT, DTYPE),
                    _plane_block(q, 3, scale, bias, DQ_LAYOUT, DTYPE))      # (h, r, TILE_N, g, b)
        return gl.reshape(gl.permute(w, (2, 4, 0, 3, 1)), [TILE_N, TILE_K])  # input 32 b + 16 h + 8 g + r

    if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton 3.9's name
        @gluon.jit
        def _row(slot):
            """A (1, N) slot of scales or zero points as an (N,) view (a rank-2 TMA layout cannot be indexed down)."""
            return slot.reinterpret(slot.dtype, [slot.shape[1]], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    else:  # Triton 3.6's
        @gluon.jit
        def _row(slot):
            """A (1, N) slot of scales or zero points as an (N,) view (a rank-2 TMA layout cannot be indexed down)."""
            return slot._reinterpret(slot.dtype, [slot.shape[1]], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))

    @gluon.jit
    def _register_scales(scales, zeros, ROW: gl.constexpr, SPAN: gl.constexpr, HAS_ZERO: gl.constexpr,
                         ZERO: gl.constexpr):
        """REG_A's (scaled, bias) = (SPAN s, -(SPAN + z) s) of a tile's outputs, each (TILE_N, 1, 1): s and z from
        their (1, TILE_N) slots in ROW, the outputs' layout (z the ZERO of every code without zero points)."""
        scale = _row(scales).load(ROW)                                        # (TILE_N,)
        if HAS_ZERO:
            bias = -(_row(zeros).load(ROW).to(gl.float32) + SPAN) * scale
        else:
            bias = -(ZERO + SPAN) * scale
        return (gl.expand_dims(gl.expand_dims(scale * SPAN, 1), 2), gl.expand_dims(gl.expand_dims(bias, 1), 2))

    @gluon.jit
    def _register_tile(q, scales, zeros, DQ_LAYOUT: gl.constexpr, WORD_LAYOUT: gl.constexpr, A_LAYOUT: gl.constexpr,
                       BITS: gl.constexpr, HAS_ZERO: gl.constexpr, ZERO: gl.constexpr, DTYPE: gl.constexpr):
        """REG_A (DQ_PARTS 0): one slot's weight tile (TILE_N, TILE_K) dequantized straight into wgmma's left operand
        layout A_LAYOUT (registers): DQ_LAYOUT is that layout over (output, word row, field) (register_layout()), so
        that each thread loads the words its own codes are in and the reshape to (output, input) moves nothing
        (convert_layout asserts it). The arithmetic is _word_tile's (_fields)."""
        PER: gl.constexpr = 32 // BITS
        SPAN: gl.constexpr = 1 << BITS
        TILE_N: gl.constexpr = q.type.shape[1]
        TILE_K: gl.constexpr = q.type.shape[0] * PER
        WORDS: gl.constexpr = gl.SliceLayout(2, DQ_LAYOUT)                   # (output, word row)
        ROW: gl.constexpr = gl.SliceLayout(1, WORDS)                          # (output,)
        fields = gl.arange(0, PER, layout=gl.SliceLayout(0, gl.SliceLayout(0, DQ_LAYOUT)))
        shifts = gl.expand_dims(gl.expand_dims(fields * BITS, 0), 0)          # (1, 1, PER)
        # the words as the slot holds them, (word row, output), in WORD_LAYOUT (WORDS transposed), then transposed
        # in registers (loading through a transposed view of the slot read the wrong words on Triton 3.6)
        words = gl.convert_layout(gl.permute(q.load(WORD_LAYOUT), (1, 0)), WORDS, assert_trivial=True)
        words = gl.expand_dims(words, 2)                                      # (TILE_N, TILE_K / PER, 1)
        scaled, bias = _register_scales(scales, zeros, ROW, SPAN, HAS_ZERO, ZERO)
        w = _fields(words, shifts, scaled, bias, BITS, DTYPE)                # (TILE_N, TILE_K / PER, PER)
        return gl.convert_layout(gl.reshape(w, [TILE_N, TILE_K]), A_LAYOUT, assert_trivial=True)

    @gluon.jit
    def _register_planes(q, scales, zeros, DQ_LAYOUT: gl.constexpr, A_LAYOUT: gl.constexpr, HAS_ZERO: gl.constexpr,
                         ZERO: gl.constexpr, DTYPE: gl.constexpr):
        """REG_A's tile of 3-bit codes in planes (layout.py; 64 inputs: word rows 3b and 3b + 1 the low two bits of
        codes 0-15 and 16-31 of block b, row 3b + 2 their high bits): DQ_LAYOUT is register_layout() of 2-bit codes,
        (output, j, c) with input 16 j + c = 32 b + 16 h + c for j = 2b + h, so code c of j has its low bits at bit
        2c of word row 3b + h and its high bit at bit 16 h + c of row 3b + 2. Each row of the slot is loaded as the
        (output,) words a thread needs (every thread holds all four j of its outputs), the rows put in place by
        selects on register indices (constants after unrolling), and each code's three bits moved to mantissa bits
        20-22 (two shifts each, two logic ops), w = (1 + c / 8) 8 s - (8 + z) s as in _register_tile."""
        TILE_N: gl.constexpr = q.type.shape[1]
        WORDS: gl.constexpr = gl.SliceLayout(2, DQ_LAYOUT)                   # (output, j)
        ROW: gl.constexpr = gl.SliceLayout(1, WORDS)                          # (output,)
        j = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, WORDS)), 0)              # (1, 4)
        r0 = gl.expand_dims(_row(q.slice(0, 1)).load(ROW), 1)                # (TILE_N, 1), word row 0
        r1 = gl.expand_dims(_row(q.slice(1, 1)).load(ROW), 1)
        r3 = gl.expand_dims(_row(q.slice(3, 1)).load(ROW), 1)
        r4 = gl.expand_dims(_row(q.slice(4, 1)).load(ROW), 1)
        low = gl.where(j == 0, r0, gl.where(j == 1, r1, gl.where(j == 2, r3, r4)))           # row 3b + h
        high = gl.where(j < 2, gl.expand_dims(_row(q.slice(2, 1)).load(ROW), 1),
                        gl.expand_dims(_row(q.slice(5, 1)).load(ROW), 1))                    # row 3b + 2
        c = gl.expand_dims(gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(0, DQ_LAYOUT))),
                                          0), 0)                              # (1, 1, 16)
        at = 16 * gl.expand_dims(j % 2, 2) + c                                # the high bit's place, 16 h + c
        lows = (gl.expand_dims(low, 2) << gl.maximum(20 - 2 * c, 0)) >> gl.maximum(2 * c - 20, 0)  # bit 2c -> 20
        highs = (gl.expand_dims(high, 2) << gl.maximum(22 - at, 0)) >> gl.maximum(at - 22, 0)    # 16 h + c -> 22
        bits = gl.inline_asm_elementwise(
            "{ .reg .b32 t; lop3.b32 t, $1, 0x00300000, 0x3F800000, 0xEA; lop3.b32 $0, $2, 0x00400000, t, 0xEA; }",
            "=r,r,r", [lows, highs], dtype=gl.int32, is_pure=True, pack=1)  # (TILE_N, 4, 16): 1 + code / 8
        scaled, bias = _register_scales(scales, zeros, ROW, 8, HAS_ZERO, ZERO)
        w = (bits.to(gl.float32, bitcast=True) * scaled + bias).to(DTYPE)
        return gl.convert_layout(gl.reshape(w, [TILE_N, 64]), A_LAYOUT, assert_trivial=True)

    @gluon.jit
    def _dequantize(common, part, DQ_LAYOUT: gl.constexpr, DQ_PARTS: gl.constexpr, BITS: gl.constexpr,
                    HAS_ZERO: gl.constexpr, ZERO: gl.constexpr, GROUP_TILES: gl.constexpr, FOLD: gl.constexpr,
                    PAIRS: gl.constexpr):
        """DQ_WARPS warps, one of DQ_PARTS such partitions (K tiles part, part + DQ_PARTS, ...): each tile's words to
        the weight tile (BLOCK_N, BLOCK_K) in shared memory, where wgmma reads it. BITS-bit codes, 32 / BITS a word
        (code f of word row r is input r * 32 / BITS + f); the zero points from the slot, or ZERO for all. With
        FOLD the positions of the program's second segment after its first's (with one row of scales, a slot of
        rows for each). PAIRS: _pair_tile's bfloat16x2 arithmetic (pairs()), 0 for _word_tile's."""
        descs, bufs, bars, off_m, off_n, k_tiles, k_lo, seg2 = common
        _dequantize_tiles(bufs, bars, part, part, k_tiles, 0, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES,
                          PAIRS)
        if FOLD:
            start = k_tiles + (part - k_tiles % DQ_PARTS + DQ_PARTS) % DQ_PARTS  # the partition's first from k_tiles
            _dequantize_tiles(bufs, bars, part, start, k_tiles + seg2[3], DQ_PARTS, DQ_LAYOUT, DQ_PARTS, BITS,
                              HAS_ZERO, ZERO, GROUP_TILES, PAIRS)

    @gluon.jit
    def _dequantize_tiles(bufs, bars, part, i0, i1, row_base, DQ_LAYOUT: gl.constexpr, DQ_PARTS: gl.constexpr,
                          BITS: gl.constexpr, HAS_ZERO: gl.constexpr, ZERO: gl.constexpr, GROUP_TILES: gl.constexpr,
                          PAIRS: gl.constexpr):
        """_dequantize's positions i0, i0 + DQ_PARTS, ... below i1 (with one row of scales, from slot row_base +
        part)."""
        x_bufs, q_bufs, s_bufs, z_bufs, w_bufs = bufs
        ready, w_ready, empty = bars
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        TILE_N: gl.constexpr = w_bufs.type.shape[1]
        TILE_K: gl.constexpr = w_bufs.type.shape[2]
        LAP: gl.constexpr = STAGES if STAGES % DQ_PARTS == 0 else STAGES * DQ_PARTS  # lcm (layouts() refuses 4
        # partitions with STAGES 2 mod 4, the one case up to 4 where this is not it)
        for i in range(i0, i1, DQ_PARTS):
            s = i % STAGES
            # the barrier of this partition and slot: a partition skips the others' tiles, and on a barrier of the
            # slot alone it could wait two phases behind, where its parity passes before the tile landed
            # (bench/ring_protocol_check.py); this one it waits on every time it is used (i % DQ_PARTS is part)
            mbarrier.wait(ready.index(part * STAGES + s), (i // LAP) & 1)
            r = row_base + part if GROUP_TILES == 0 else s  # the slot of scales: the partition's own with one row
            scales = s_bufs.index(r)
            zeros = z_bufs.index(r if HAS_ZERO else 0).slice(0, 1)
            if BITS == 3:
                w = _plane_tile(q_bufs.index(s), scales, zeros, DQ_LAYOUT, HAS_ZERO, ZERO, TILE_N, TILE_K, w_bufs.dtype)
            elif PAIRS and BITS == 8:
                w = _byte_pair_tile(q_bufs.index(s), zeros, DQ_LAYOUT, HAS_ZERO, ZERO, TILE_N, TILE_K)
            elif PAIRS:
                w = _pair_tile(q_bufs.index(s), scales, zeros, DQ_LAYOUT, BITS, HAS_ZERO, ZERO, PAIRS, TILE_N, TILE_K)
            else:
                w = _word_tile(q_bufs.index(s), scales, zeros, DQ_LAYOUT, BITS, HAS_ZERO, ZERO, TILE_N, TILE_K,
                               w_bufs.dtype)
            w_bufs.index(s).store(w)
            fence_async_shared()  # the stores (and the loads above) before wgmma and the next TMA copy
            mbarrier.arrive(w_ready.index(s), count=1)

    @gluon.jit
    def _register_step(i, acc, bufs, bars, DQ_LAYOUT: gl.constexpr, WORD_LAYOUT: gl.constexpr, BITS: gl.constexpr,
                       HAS_ZERO: gl.constexpr, ZERO: gl.constexpr, GROUP_TILES: gl.constexpr, DIAG: gl.constexpr):
        """REG_A's K tile i: its slot's words dequantized into wgmma's left operand (_register_tile), the
        asynchronous wgmma, the wait for the one before it, and that one's slot released."""
        x_bufs, q_bufs, s_bufs, z_bufs, w_bufs = bufs
        ready, w_ready, empty = bars
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        A_LAYOUT: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2)
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)  # the slot's copies landed
        r = 0 if GROUP_TILES == 0 else s  # one row: the loader's first slot of rows (_ring)
        if BITS == 3:
            a = _register_planes(q_bufs.index(s), s_bufs.index(r), z_bufs.index(r if HAS_ZERO else 0).slice(0, 1),
                                 DQ_LAYOUT, A_LAYOUT, HAS_ZERO, ZERO, x_bufs.dtype)
        else:
            a = _register_tile(q_bufs.index(s), s_bufs.index(r), z_bufs.index(r if HAS_ZERO else 0).slice(0, 1),
                               DQ_LAYOUT, WORD_LAYOUT, A_LAYOUT, BITS, HAS_ZERO, ZERO, x_bufs.dtype)
        if (DIAG & 1) == 0:
            acc = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
        return acc

    @gluon.jit
    def _products(bufs, bars, y_desc, y_ptr, off_m, off_n, M, N, k_tiles, ACC_LAYOUT: gl.constexpr,
                  DIAG: gl.constexpr, SWAP: gl.constexpr, OUT_LAYOUT: gl.constexpr, DQ_PARTS: gl.constexpr, stamp,
                  split_args, SPLIT: gl.constexpr, REG_A: gl.constexpr, DQ_LAYOUT: gl.constexpr,
                  WORD_LAYOUT: gl.constexpr, BITS: gl.constexpr, HAS_ZERO: gl.constexpr, ZERO: gl.constexpr,
                  GROUP_TILES: gl.constexpr, FOLD: gl.constexpr, seg2, PAIRS: gl.constexpr):
        """The default partition: one asynchronous wgmma per K tile (x and the weight tile from the ring), a slot
        released once the product after it is issued and the one that read it has finished; then y in its dtype
        (_write_y). SWAP: the weight tile as the left operand, y^T's tile (TILE_N, TILE_M) accumulated (one m64 x
        TILE_M instruction per 16 inputs, each operand read from shared memory once).
        SPLIT > 1 (TAIL): a program of the tail (split_args' first value) holds a part of its tile's K; _hand_off
        adds the parts and the last of them writes y.
        FOLD (TAIL 2): two segments in one ring (_gluon_mm_kernel): a sibling stores its part after its first
        segment (_store_part) and writes its whole tile after its second; the others write the first segment's
        tile (through the ring slot of its last K tile, which stays theirs until the next product), and an owner
        starts its second segment, its part, from the sum of its siblings' parts (_sum_parts), stored a whole tile
        earlier, and writes the split tile at its end.
        REG_A (a config's DQ_PARTS 0, with SWAP): no dequantize partitions; this partition dequantizes each slot's
        words into registers (_register_tile) while the previous tile's wgmma runs, and wgmma reads the weight tile
        from them (no weight tile in shared memory: its stores and wgmma's reads of it are about a sixth of a 256 x
        64 tile's shared-memory traffic); two K tiles a turn, so that the tile in flight keeps its registers.
        DIAG & 1: no products (a diagnostic). DIAG & 2: the global timer once the last product has finished and
        again once y is written (or the part handed off), into stamp[1] and stamp[2] (_gluon_mm_kernel's STAMP).
        MATH 3 (PAIRS % 4 == 3): the products are of c - z, and _write_y scales each output by its one row of
        scales, from the slot of the segment's first dequantize partition (the parts handed off stay unscaled)."""
        x_bufs, q_bufs, s_bufs, z_bufs, w_bufs = bufs
        AFTER: gl.constexpr = PAIRS % 4 == 3
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        TILE_M: gl.constexpr = x_bufs.type.shape[1]
        TILE_N: gl.constexpr = q_bufs.type.shape[2]
        SHAPE: gl.constexpr = [TILE_N, TILE_M] if SWAP else [TILE_M, TILE_N]
        acc = gl.zeros(SHAPE, gl.float32, ACC_LAYOUT)
        if REG_A:
            gl.static_assert(SWAP != 0)  # the weight tile is the left operand
            # two K tiles a turn: each step's operand registers are its own values, so that the tile being
            # dequantized never writes the registers of the wgmma still in flight (one loop body's registers
            # are the same every turn, and ptxas serialized every wgmma for that)
            for j in range(k_tiles // 2):
                acc = _register_step(2 * j, acc, bufs, bars, DQ_LAYOUT, WORD_LAYOUT, BITS, HAS_ZERO, ZERO,
                                     GROUP_TILES, DIAG)
                acc = _register_step(2 * j + 1, acc, bufs, bars, DQ_LAYOUT, WORD_LAYOUT, BITS, HAS_ZERO, ZERO,
                                     GROUP_TILES, DIAG)
            if k_tiles % 2:
                acc = _register_step(k_tiles - 1, acc, bufs, bars, DQ_LAYOUT, WORD_LAYOUT, BITS, HAS_ZERO, ZERO,
                                     GROUP_TILES, DIAG)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        else:
            acc, p = _mma_tiles(bufs, bars, 0, k_tiles, acc, gl.to_tensor(0), DIAG, SWAP, DQ_PARTS)
        if FOLD:
            gl.static_assert((REG_A == 0) & (SPLIT > 1))
            has_part, _, _, _, split = split_args
            sibling = has_part & (split < SPLIT - 1)
            if sibling:
                _store_part(acc, split_args, SPLIT, ACC_LAYOUT)
            else:
                _write_y(acc, x_bufs, y_desc, y_ptr, off_m, off_n, M, N, ACC_LAYOUT, SWAP, OUT_LAYOUT,
                         (k_tiles - 1) % STAGES, s_bufs.index(0), AFTER)
            off_m2, off_n2, k_lo2, n2 = seg2
            if n2 > 0:
                acc = gl.zeros(SHAPE, gl.float32, ACC_LAYOUT)
                if has_part & (split == SPLIT - 1):  # the owner: its part starts from its siblings'
                    acc = _sum_parts(acc, split_args, SPLIT, ACC_LAYOUT)
                row = DQ_PARTS + p  # the second segment's rows: from slot DQ_PARTS on, its first partition's
                acc, p = _mma_tiles(bufs, bars, k_tiles, k_tiles + n2, acc, p, DIAG, SWAP, DQ_PARTS)
                if DIAG & 2:
                    gl.store(stamp + 1, _timer())
                _write_y(acc, x_bufs, y_desc, y_ptr, off_m2, off_n2, M, N, ACC_LAYOUT, SWAP, OUT_LAYOUT,
                         (k_tiles + n2 - 1) % STAGES, s_bufs.index(row), AFTER)
            elif DIAG & 2:
                gl.store(stamp + 1, _timer())
        else:
            if DIAG & 2:
                gl.store(stamp + 1, _timer())
            if SPLIT > 1:
                tail = split_args[0]
                last = gl.to_tensor(True)
                if tail:
                    acc, last = _hand_off(acc, split_args, SPLIT, ACC_LAYOUT)
                if last:
                    _write_y(acc, x_bufs, y_desc, y_ptr, off_m, off_n, M, N, ACC_LAYOUT, SWAP, OUT_LAYOUT, 0,
                             s_bufs.index(0), AFTER)
            else:
                _write_y(acc, x_bufs, y_desc, y_ptr, off_m, off_n, M, N, ACC_LAYOUT, SWAP, OUT_LAYOUT, 0,
                         s_bufs.index(0), AFTER)
        if DIAG & 2:
            gl.store(stamp + 2, _timer())

    @gluon.jit
    def _mma_tiles(bufs, bars, i0, i1, acc, p, DIAG: gl.constexpr, SWAP: gl.constexpr, DQ_PARTS: gl.constexpr):
        """_products' ring positions i0 .. i1 - 1 accumulated into acc (p: the dequantize partition of position
        i0); returns (acc once every product has finished, the partition of position i1). Each position releases
        the slot of the one before it (not the last's: its slot stays the caller's until the next position)."""
        x_bufs, q_bufs, s_bufs, z_bufs, w_bufs = bufs
        ready, w_ready, empty = bars
        STAGES: gl.constexpr = x_bufs.type.shape[0]
        LAP: gl.constexpr = STAGES if STAGES % DQ_PARTS == 0 else STAGES * DQ_PARTS  # lcm (layouts() refuses 4
        # partitions with STAGES 2 mod 4, the one case up to 4 where this is not it)
        for i in range(i0, i1):
            s = i % STAGES
            phase = (i // STAGES) & 1
            mbarrier.wait(ready.index(p * STAGES + s), (i // LAP) & 1)  # x's copy landed
            p = gl.where(p == DQ_PARTS - 1, 0, p + 1)
            mbarrier.wait(w_ready.index(s), phase)
            if (DIAG & 1) == 0:
                if SWAP:
                    acc = warpgroup_mma(w_bufs.index(s), x_bufs.index(s).permute((1, 0)), acc, is_async=True)
                else:
                    acc = warpgroup_mma(x_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        return acc, p

    @gluon.jit
    def _part_offsets(R: gl.constexpr, C: gl.constexpr, ACC_LAYOUT: gl.constexpr):
        """A part's offsets in the workspace, in the order of the accumulator's registers (a private layout: the
        stores and the loads agree): element (r, c) of warp row r // 16, column block c // IN, 8-column group j,
        half h of the 16 rows, lane 4 (r % 8) + (c % 8) // 2, pair e = c % 2, so that a warp's store of one register
        pair is 256 contiguous bytes (row-major, a warp's store touched 8 rows' 32 bytes each)."""
        IN: gl.constexpr = ACC_LAYOUT.instr_shape[1]
        rr = gl.expand_dims(gl.arange(0, R, layout=gl.SliceLayout(1, ACC_LAYOUT)), 1)
        cc = gl.expand_dims(gl.arange(0, C, layout=gl.SliceLayout(0, ACC_LAYOUT)), 0)
        block = (rr // 16) * (C // IN) + cc // IN
        offs = (((block * (IN // 8) + (cc % IN) // 8) * 2 + (rr % 16) // 8) * 32 + (rr % 8) * 4 + (cc % 8) // 2) * 2 \
            + cc % 2
        return gl.max_contiguous(gl.multiple_of(offs, [1, 2]), [1, 2])  # each register pair: one 8-byte access

    @gluon.jit
    def _store_part(acc, split_args, SPLIT: gl.constexpr, ACC_LAYOUT: gl.constexpr):
        """A split tile's part (not its owner's) to the workspace (SPLIT - 1 parts a tile), then one count
        (release)."""
        _, part_ptr, cnt_ptr, tile, split = split_args
        R: gl.constexpr = acc.type.shape[0]
        C: gl.constexpr = acc.type.shape[1]
        base = part_ptr + tile.to(gl.int64) * ((SPLIT - 1) * R * C)
        gl.store(base + split * (R * C) + _part_offsets(R, C, ACC_LAYOUT), acc)
        _barrier()  # every thread's part is written before the count says so
        gl.atomic_add(cnt_ptr + tile, 1, sem="release")

    @gluon.jit
    def _sum_parts(acc, split_args, SPLIT: gl.constexpr, ACC_LAYOUT: gl.constexpr):
        """A split tile's owner: waits for the count of its SPLIT - 1 siblings' parts (acquire; they are launched
        before it), adds them in split order (the same sum every call) and then to acc, sets the counter back to 0
        for the next call (after the sum, so that the loads are not all held for it) and returns the total."""
        _, part_ptr, cnt_ptr, tile, split = split_args
        R: gl.constexpr = acc.type.shape[0]
        C: gl.constexpr = acc.type.shape[1]
        offs = _part_offsets(R, C, ACC_LAYOUT)
        base = part_ptr + tile.to(gl.int64) * ((SPLIT - 1) * R * C)
        while gl.atomic_add(cnt_ptr + tile, 0, sem="acquire") < SPLIT - 1:
            pass
        total = gl.load(base + offs, cache_modifier=".cg")
        for s in gl.static_range(1, SPLIT - 1):  # the loads are independent of the sum: issued together
            total += gl.load(base + s * (R * C) + offs, cache_modifier=".cg")
        acc = total + acc
        gl.atomic_xchg(cnt_ptr + tile, 0)
        return acc

    @gluon.jit
    def _hand_off(acc, split_args, SPLIT: gl.constexpr, ACC_LAYOUT: gl.constexpr):
        """Split-K's hand-off within a tile's SPLIT programs: the first SPLIT - 1 each store their float32 part to
        the workspace and count themselves on the tile's counter (_store_part); the last (the tile's owner, launched
        after them) adds their sum to its own (_sum_parts) and returns (the sum, True); the others return (their
        part, False). The owner's wait cannot hold up the others: they are launched before it, and schedule() gives
        the split programs at most one multiprocessor each."""
        owner = split_args[4] == SPLIT - 1
        if owner:
            acc = _sum_parts(acc, split_args, SPLIT, ACC_LAYOUT)
        else:
            _store_part(acc, split_args, SPLIT, ACC_LAYOUT)
        return acc, owner

    @gluon.jit
    def _write_y(acc, x_bufs, y_desc, y_ptr, off_m, off_n, M, N, ACC_LAYOUT: gl.constexpr, SWAP: gl.constexpr,
                 OUT_LAYOUT: gl.constexpr, slot_index, scales, AFTER: gl.constexpr):
        """The accumulated tile to y in y's dtype: with SWAP, through OUT_LAYOUT (SWAP 1: 16 bytes a thread, through
        shared-memory scratch), straight from the accumulator (SWAP 2), or (SWAP 3) stored into a slot of x's ring,
        free once the last product has finished (slot_index: one whose product has finished and which the loader
        cannot fill before the caller's next product), and copied out by TMA: no scratch beside the ring.
        AFTER (MATH 3): each output's products times its scale first (scales: the tile's one row, (1, TILE_N))."""
        TILE_M: gl.constexpr = x_bufs.type.shape[1]
        TILE_N: gl.constexpr = acc.type.shape[0] if SWAP else acc.type.shape[1]
        if AFTER:
            scale = gl.sum(scales.load(OUT_LAYOUT), axis=0)  # (TILE_N,): a row loaded in any layout, then moved
            if SWAP:
                acc = acc * gl.expand_dims(gl.convert_layout(scale, gl.SliceLayout(1, ACC_LAYOUT)), 1)
            else:
                acc = acc * gl.expand_dims(gl.convert_layout(scale, gl.SliceLayout(0, ACC_LAYOUT)), 0)
        if SWAP == 3:  # y's tile through a slot of x's ring and one TMA copy
            gl.static_assert(x_bufs.type.shape[2] == TILE_N)  # the slot's shape and layout are y's tile's
            slot = x_bufs.index(slot_index)
            slot.store(gl.permute(acc.to(y_desc.dtype), (1, 0)))
            fence_async_shared()
            _tma_store(y_desc, [off_m, off_n], slot)
            tma.store_wait(0)
        else:
            if SWAP == 2:  # y stored from the accumulator's registers (2-byte stores): no shared-memory scratch
                out = gl.permute(acc.to(y_ptr.dtype.element_ty), (1, 0))
                offs_m = off_m + gl.arange(0, TILE_M, layout=gl.SliceLayout(1, out.type.layout))
                offs_n = off_n + gl.arange(0, TILE_N, layout=gl.SliceLayout(0, out.type.layout))
            elif SWAP:
                out = gl.convert_layout(gl.permute(acc.to(y_ptr.dtype.element_ty), (1, 0)), OUT_LAYOUT)
                offs_m = off_m + gl.arange(0, TILE_M, layout=gl.SliceLayout(1, OUT_LAYOUT))
                offs_n = off_n + gl.arange(0, TILE_N, layout=gl.SliceLayout(0, OUT_LAYOUT))
            else:
                out = acc.to(y_ptr.dtype.element_ty)
                offs_m = off_m + gl.arange(0, TILE_M, layout=gl.SliceLayout(1, ACC_LAYOUT))
                offs_n = off_n + gl.arange(0, TILE_N, layout=gl.SliceLayout(0, ACC_LAYOUT))
            ptrs = y_ptr + gl.expand_dims(offs_m, 1) * N + gl.expand_dims(offs_n, 0)
            gl.store(ptrs, out, mask=gl.expand_dims(offs_m < M, 1))

    @gluon.jit
    def _timer():
        """The GPU's global timer in ns (STAMP)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _gluon_mm_kernel(x_desc, q_desc, s_desc, z_desc, y_desc, y_ptr, stamp_ptr, part_ptr, cnt_ptr, M, N, K, WHOLE,
                         OWN,
                         GROUP_TILES: gl.constexpr,
                         STAGES: gl.constexpr, W_LAYOUT: gl.constexpr, ACC_LAYOUT: gl.constexpr,
                         DQ_LAYOUT: gl.constexpr, DQ_WARPS: gl.constexpr, DQ_REGS: gl.constexpr,
                         DQ_PARTS: gl.constexpr, BITS: gl.constexpr, HAS_ZERO: gl.constexpr, ZERO: gl.constexpr,
                         DIAG: gl.constexpr, SWAP: gl.constexpr, OUT_LAYOUT: gl.constexpr, SPLIT: gl.constexpr,
                         REG_A: gl.constexpr, WORD_LAYOUT: gl.constexpr, FOLD: gl.constexpr, PAIRS: gl.constexpr):
        """y (M, N) = x (M, K) @ dequant(W)^T: the module docstring's partitions. GROUP_TILES: the K tiles per row
        of scales (group_tiles()). Without zero points (HAS_ZERO 0) every code's is ZERO and z_desc is not read.
        DIAG & 2 (STAMP): each program writes 4 int64 at stamp_ptr + 4 * (its index, row tiles fastest): the global
        timer (ns) at its start, when its last product has finished and when y is written, and its multiprocessor.
        SPLIT > 1 (TAIL, schedule()): the column tiles from WHOLE on are split in K, SPLIT programs a tile (grid axis
        1 from WHOLE on), each adding its part through part_ptr (float32, SPLIT - 1 parts a split tile) and cnt_ptr
        (int32 zeros, one a split tile); the programs before them take whole tiles. FOLD (TAIL 2, with SPLIT > 1):
        no programs of their own for the split tiles: the grid is the whole tiles' (WHOLE column tiles), and the
        last (REST x row tiles x SPLIT) programs each also take a part of a split tile in the same ring, the
        tile's first SPLIT - 1 parts (siblings) before their whole tile, its last (the owner's, OWN K tiles,
        fold_share()) after: the siblings' parts are stored a whole tile before the owner needs them. REG_A (a config's DQ_PARTS 0,
        passed as DQ_PARTS 1 for the ring's barriers): no dequantize partitions, _products dequantizes into
        registers."""
        TILE_M: gl.constexpr = x_desc.block_type.shape[0]
        TILE_K: gl.constexpr = x_desc.block_type.shape[1]
        TILE_N: gl.constexpr = q_desc.block_type.shape[1]
        ROW_SLOTS: gl.constexpr = DQ_PARTS * (1 + FOLD) if GROUP_TILES == 0 else STAGES  # FOLD: one a segment
        x_bufs, q_bufs, s_bufs, z_bufs = _ring(x_desc, q_desc, s_desc, z_desc, STAGES, ROW_SLOTS,
                                               ROW_SLOTS if HAS_ZERO else 1)
        if REG_A:  # no weight tile in shared memory (a placeholder in the tuple of buffers)
            w_bufs = q_bufs
        else:
            w_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, TILE_N, TILE_K], W_LAYOUT)
        # ready: a slot's copies landed, one barrier per dequantize partition and slot; w_ready: its weight tile
        # stored; empty: its product finished
        ready = gl.allocate_shared_memory(gl.int64, [STAGES * DQ_PARTS, 1], mbarrier.MBarrierLayout())
        w_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(w_ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(STAGES * DQ_PARTS):
            mbarrier.init(ready.index(i), count=1)
        stamp = stamp_ptr + 4 * (gl.program_id(1) * gl.num_programs(0) + gl.program_id(0))
        if DIAG & 2:
            gl.store(stamp, _timer())
            gl.store(stamp + 3, gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=gl.int32, is_pure=True,
                                                          pack=1).to(gl.int64))
        off_m = gl.program_id(0) * TILE_M
        k_all = K // TILE_K
        seg2 = (0, 0, 0, 0)  # FOLD's second segment: (off_m, off_n, k_lo, K tiles)
        if FOLD:  # the whole tile (pid0, pid1) and, for the last programs, a part of a split tile
            m_tiles = gl.num_programs(0)
            parts = (N // TILE_N - WHOLE) * m_tiles * SPLIT
            after = gl.program_id(1) * m_tiles + gl.program_id(0) - (WHOLE * m_tiles - parts)
            has_part = after >= 0
            t = gl.where(has_part, after // SPLIT, 0)  # the split tile, row tiles fastest (its counter's index)
            split = gl.where(has_part, after % SPLIT, 0)
            sibling = has_part & (split < SPLIT - 1)
            part_m = (t % m_tiles) * TILE_M
            part_n = (WHOLE + t // m_tiles) * TILE_N
            owner = split == SPLIT - 1
            shared = k_all - OWN  # the siblings' K tiles, in even parts; the owner's OWN after them
            part_lo = gl.where(owner, shared, split * shared // (SPLIT - 1))
            part_tiles = gl.where(owner, OWN, (split + 1) * shared // (SPLIT - 1) - part_lo)
            whole_m = gl.program_id(0) * TILE_M
            whole_n = gl.program_id(1) * TILE_N
            off_m = gl.where(sibling, part_m, whole_m)
            tile_n = gl.where(sibling, WHOLE + t // m_tiles, gl.program_id(1))
            k_lo = gl.where(sibling, part_lo, 0)
            k_tiles = gl.where(sibling, part_tiles, k_all)
            seg2 = (gl.where(sibling, whole_m, part_m), gl.where(sibling, whole_n, part_n),
                    gl.where(sibling, 0, part_lo), gl.where(sibling, k_all, gl.where(has_part, part_tiles, 0)))
            split_args = (has_part, part_ptr, cnt_ptr, t, split)
        elif SPLIT > 1:  # the tail's programs (column index WHOLE on) take a part of K of a split tile each
            after = gl.program_id(1) - WHOLE
            tail = after >= 0
            split = gl.where(tail, after % SPLIT, 0)
            tile_n = gl.where(tail, WHOLE + after // SPLIT, gl.program_id(1))
            k_lo = split * k_all // SPLIT
            k_tiles = gl.where(tail, (split + 1) * k_all // SPLIT - k_lo, k_all)
            split_args = (tail, part_ptr, cnt_ptr, (after // SPLIT) * gl.num_programs(0) + gl.program_id(0), split)
        else:
            tile_n = gl.program_id(1)
            k_lo = 0
            k_tiles = k_all
            split_args = (False, part_ptr, cnt_ptr, 0, 0)
        off_n = tile_n * TILE_N
        bufs = (x_bufs, q_bufs, s_bufs, z_bufs, w_bufs)
        bars = (ready, w_ready, empty)
        common = ((x_desc, q_desc, s_desc, z_desc), bufs, bars, off_m, off_n, k_tiles, k_lo, seg2)  # every worker's
        first = gl.to_tensor(0)  # the first dequantize partition's first K tile, as a value the partitions share
        if REG_A:
            gl.warp_specialize([
                (_products, (bufs, bars, y_desc, y_ptr, off_m, off_n, M, N, k_tiles, ACC_LAYOUT, DIAG, SWAP, OUT_LAYOUT,
                              DQ_PARTS, stamp, split_args, SPLIT, REG_A, DQ_LAYOUT, WORD_LAYOUT, BITS, HAS_ZERO,
                              ZERO, GROUP_TILES, FOLD, seg2, PAIRS)),
                (_loader, (common, first, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD)),
            ], [1], [24])
        elif DQ_PARTS == 1:
            gl.warp_specialize([
                (_products, (bufs, bars, y_desc, y_ptr, off_m, off_n, M, N, k_tiles, ACC_LAYOUT, DIAG, SWAP, OUT_LAYOUT,
                              DQ_PARTS, stamp, split_args, SPLIT, REG_A, DQ_LAYOUT, WORD_LAYOUT, BITS, HAS_ZERO,
                              ZERO, GROUP_TILES, FOLD, seg2, PAIRS)),
                (_loader, (common, first, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD)),
                (_dequantize, (common, first, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
            ], [1, DQ_WARPS], [24, DQ_REGS])
        elif DQ_PARTS == 2:
            gl.warp_specialize([
                (_products, (bufs, bars, y_desc, y_ptr, off_m, off_n, M, N, k_tiles, ACC_LAYOUT, DIAG, SWAP, OUT_LAYOUT,
                              DQ_PARTS, stamp, split_args, SPLIT, REG_A, DQ_LAYOUT, WORD_LAYOUT, BITS, HAS_ZERO,
                              ZERO, GROUP_TILES, FOLD, seg2, PAIRS)),
                (_loader, (common, first, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD)),
                (_dequantize, (common, first, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
                (_dequantize, (common, first + 1, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
            ], [1, DQ_WARPS, DQ_WARPS], [24, DQ_REGS, DQ_REGS])
        elif DQ_PARTS == 3:
            gl.warp_specialize([
                (_products, (bufs, bars, y_desc, y_ptr, off_m, off_n, M, N, k_tiles, ACC_LAYOUT, DIAG, SWAP, OUT_LAYOUT,
                              DQ_PARTS, stamp, split_args, SPLIT, REG_A, DQ_LAYOUT, WORD_LAYOUT, BITS, HAS_ZERO,
                              ZERO, GROUP_TILES, FOLD, seg2, PAIRS)),
                (_loader, (common, first, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD)),
                (_dequantize, (common, first, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
                (_dequantize, (common, first + 1, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
                (_dequantize, (common, first + 2, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
            ], [1, DQ_WARPS, DQ_WARPS, DQ_WARPS], [24, DQ_REGS, DQ_REGS, DQ_REGS])
        else:
            gl.static_assert(DQ_PARTS == 4)
            gl.warp_specialize([
                (_products, (bufs, bars, y_desc, y_ptr, off_m, off_n, M, N, k_tiles, ACC_LAYOUT, DIAG, SWAP, OUT_LAYOUT,
                              DQ_PARTS, stamp, split_args, SPLIT, REG_A, DQ_LAYOUT, WORD_LAYOUT, BITS, HAS_ZERO,
                              ZERO, GROUP_TILES, FOLD, seg2, PAIRS)),
                (_loader, (common, first, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD)),
                (_dequantize, (common, first, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
                (_dequantize, (common, first + 1, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
                (_dequantize, (common, first + 2, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
                (_dequantize, (common, first + 3, DQ_LAYOUT, DQ_PARTS, BITS, HAS_ZERO, ZERO, GROUP_TILES, FOLD,
                               PAIRS)),
            ], [1, DQ_WARPS, DQ_WARPS, DQ_WARPS, DQ_WARPS], [24, DQ_REGS, DQ_REGS, DQ_REGS, DQ_REGS])


def swapped(config):
    """A config's eighth number, 1 for the weight tile as wgmma's left operand (_products' SWAP), 2 for that with y
    stored straight from the accumulator, 3 with y through a slot of x's ring and TMA; 0 where absent."""
    if not 7 <= len(config) <= 10:
        raise ValueError(f"gluon_gemm: a config has 7 numbers, 8 with SWAP, 9 with TAIL, 10 with MATH, got {config}")
    swap = config[7] if len(config) > 7 else 0
    if swap not in (0, 1, 2, 3):
        raise ValueError(f"gluon_gemm: a config's eighth number (SWAP) is 0 to 3, got {swap} in {config}")
    return swap


def tail(config):
    """A config's ninth number, TAIL: 1 splits the tiles past the last whole wave in K (schedule()), each part a
    program of its own; 2 the same, the parts taken by the last wave's programs beside their whole tiles
    (_gluon_mm_kernel's FOLD; not with REG_A); 0 where absent. (Each split tile's owner taking 1/16 of K more than
    an even share, so that its loop ends when its siblings' parts land, was level: 47.1 us either way on
    4096x11008, bench/results/prefill_regs_h100.)"""
    split = config[8] if len(config) > 8 else 0
    if split not in (0, 1, 2) or (split == 2 and config[6] == 0):
        raise ValueError(f"gluon_gemm: a config's ninth number (TAIL) is 0, 1 or 2 (2 not with DQ_PARTS 0), got "
                         f"{split} in {config}")
    return split


def dq_math(config):
    """A config's tenth number, MATH, the dequantize partitions' arithmetic: 0 (or absent) float32, one code an FMA
    (_word_tile); 1 bfloat16x2, two codes at a time, the scale as the sum of two bfloat16 (_pair_tile: a weight
    within a rounding of the float32 path's); 2 the same with one bfloat16 scale (tinygemm's precision: a
    measurement of what the arithmetic costs, not listed); 3 where one row of scales serves every input (per
    channel, per tensor) the pairs c - z alone, exact, and the scale once per output after the products (_write_y),
    8-bit codes too; elsewhere MATH 1. 1 and 2 take 1, 2 and 4-bit codes (pairs() says where); elsewhere the config
    runs MATH 0."""
    math = config[9] if len(config) > 9 else 0
    if math not in (0, 1, 2, 3) or (math and config[6] == 0):
        raise ValueError(f"gluon_gemm: a config's tenth number (MATH) is 0 to 3 (not with DQ_PARTS 0), got {math} "
                         f"in {config}")
    return math


def pairs(config, bits, has_zero, zero, one_row=False):
    """The kernel's PAIRS for a config's MATH (dq_math()): 4 F + MATH where _pair_tile takes the call, 0 where not.
    Its codes are 2^(7 - F) + c in a bfloat16's mantissa from bit F, and the zero points 2^(7 - F) + z, exact
    where z has at most F fraction bits and is below 2^(7 - F): uint8 zero points (B-bit codes' are below 2^B, so
    F = 0) or a constant of F = 0 or 1 (1-bit codes' 0.5). MATH 3 with one row of scales (one_row): PAIRS 4 F + 3,
    8-bit codes too (2^23 + c as float32, minus 2^23 + z: an integer zero point below 256); without one row MATH 1."""
    math = dq_math(config)
    if math == 3 and not one_row:
        math = 1
    if math == 3 and bits == 8:
        return 3 if has_zero or (float(zero).is_integer() and 0 <= zero < 256) else 0
    if not math or bits not in (1, 2, 4):
        return 0
    if has_zero:
        return math
    frac = next((f for f in (0, 1) if float(zero * 2**f).is_integer()), None)
    return 4 * frac + math if frac is not None and 0 <= zero < 2 ** (7 - frac) else 0


def schedule(m_tiles, n_tiles, k_tiles, programs, tail_split):
    """(WHOLE, REST, SPLIT) of one call, one launch: the first WHOLE column tiles (m_tiles x WHOLE tiles, whole waves
    on `programs` multiprocessors, one program each: a program takes most of a multiprocessor's shared memory) run
    whole, and the REST after them (the last wave's, which would leave multiprocessors idle) SPLIT programs a tile,
    each a part of K, on as many multiprocessors as that fills. Without tail_split, or where no split helps:
    (n_tiles, 0, 1). On 4096 x 11008 at 256 rows, 172 tiles of 256 x 64 are 132 whole ones and 40 split in 3.
    tail_split 2 (FOLD) puts the parts into the whole tiles' programs: none without a whole wave."""
    whole = m_tiles * n_tiles // programs * programs // m_tiles if tail_split else n_tiles
    rest = n_tiles - whole
    split = min(programs // (m_tiles * rest), k_tiles) if rest else 1
    return (whole, rest, split) if split > 1 and (whole or tail_split != 2) else (n_tiles, 0, 1)


# TAIL 2: an owner's load of one sibling's part (64 KB for 256 x 64) takes about as long as this many K tiles' steps
# (one H100: owners' loops 2.1 us longer than their siblings' for two parts, a K tile 0.435 us); the shorter owner
# share measured level with the even split (43.5 against 43.7 us, bench/results/prefill_share_h100)
PART_LOAD_TILES = 2.5


def fold_share(k_tiles, split, part_load=PART_LOAD_TILES):
    """TAIL 2's owner's K tiles of a split tile of k_tiles (its siblings share the rest evenly): fewer than an even
    share by what its load of the SPLIT - 1 siblings' parts costs ((SPLIT - 1) x part_load K tiles' time, spread
    over the SPLIT programs), so that owners and siblings end together; at least one K tile each."""
    if split < 2:
        return k_tiles
    own = round((k_tiles - (split - 1) ** 2 * part_load) / split)
    return max(1, min(own, k_tiles - (split - 1)))


@functools.lru_cache(maxsize=None)  # per launch otherwise (tens of microseconds of host time)
def layouts(config, bits=4, pair=False):
    """(x tile, words/scales, zero points, weight tile shared layouts; accumulator, dequantize and (for SWAP) output
    register layouts); pair: the dequantize layout of _pair_tile, half as many fields a thread (pairs of them)."""
    block_m, block_n, block_k, warps, stages, dq_warps = config[:6]
    tail(config)  # a config's numbers checked, each in one line
    if not 0 <= config[6] <= 4 or (config[6] == 4 and stages % 4 == 2):
        raise ValueError(f"gluon_gemm: a config's seventh number (DQ_PARTS) is 0 to 4, and 4 takes STAGES odd or a "
                         f"multiple of 4 (the ring's phase period), got {config}")
    x_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.bfloat16)
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.bfloat16)
    flat = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)  # words, scales: no swizzle
    bytes_ = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)  # zero points
    rows, cols = (block_n, block_m) if swapped(config) else (block_m, block_n)  # the accumulator's
    wm = min(warps, rows // 16)  # warps along its rows (16 each, 64 a warp group) while they allow, then columns
    acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[wm, warps // wm],
                                    instr_shape=[16, cols // (warps // wm), 16])
    # SWAP's y tile (block_m, block_n) written 16 bytes a thread along the outputs
    out = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 * 8 // block_n, block_n // 8],
                           warps_per_cta=[warps, 1], order=[1, 0])
    # lanes along the outputs (conflict-free word loads), each thread a word's 32 / bits fields for its word rows:
    # after the permute it holds contiguous inputs of one output, stored 16 bytes at a time: 8-bit codes two word
    # rows a thread for that (8-byte stores before: int8 23.2 -> 21.6-21.7 us on 4096x4096, file 29)
    if reg_a(config):  # 3-bit planes in 2-bit codes' layout (_register_planes)
        dq = register_layout(warps, 2 if bits == 3 else bits, block_k, block_n)
        return x_layout, flat, bytes_, w_layout, acc, dq, out
    wn = min(dq_warps, block_n // 32)
    if bits == 3:  # (h, r, output): a block's half h, codes r and r + 8 of it (_plane_block) in a thread's registers
        gw = dq_warps // wn  # warps along h: one or two
        if gw > 2:
            raise ValueError(f"gluon_gemm: 3-bit codes take at most {2 * wn} dequantize warps, got {dq_warps}")
        dq = gl.BlockedLayout(size_per_thread=[2 // gw, 8, 1], threads_per_warp=[1, 1, 32],
                              warps_per_cta=[gw, 1, wn], order=[1, 0, 2])
    else:
        dq = gl.BlockedLayout(size_per_thread=[max(1, bits // 4), 32 // bits // (1 + pair), 1],
                              threads_per_warp=[1, 1, 32], warps_per_cta=[dq_warps // wn, 1, wn], order=[1, 0, 2])
    return x_layout, flat, bytes_, w_layout, acc, dq, out


def reg_a(config):
    """Whether a config dequantizes into wgmma's registers (its DQ_PARTS, the seventh number, 0: _products' REG_A):
    SWAP only (the weight tile is the left operand, the one wgmma takes from registers), 64 or 128 outputs a tile
    (a warp group's m64 operand per 64 outputs); 3-bit planes by _register_planes, the other widths by
    _register_tile."""
    if config[6] != 0:
        return False
    if not swapped(config) or config[1] not in (64, 128) or config[3] < config[1] // 16 or config[2] != BLOCK_K:
        raise ValueError(f"gluon_gemm: DQ_PARTS 0 (registers) takes SWAP and 64 x 64 or 128 x 64 weight tiles, a warp "
                         f"group per 64 outputs, got {config}")
    return True


def register_layout(warps, bits, block_k=BLOCK_K, block_n=64):
    """REG_A's layout of a weight tile over (output, word row, field), 64 or 128 outputs: the layout of wgmma's left
    operand (block_n outputs x block_k inputs, two bf16 a register; a warp group per 64 outputs, any other warp
    groups holding the same) with input k = word row * 32 / bits + field split into its word row and field, so that
    the reshape to (output, input) is the operand's layout itself. The operand's bases (Triton's linear layout of
    DotOperandLayout(0, the accumulator, 2)): registers k0, n3, k3, k4, k5; lanes k1, k2, n0, n1, n2; warps n4, n5
    (and n6 for 128 outputs), then none."""
    per = 32 // bits
    p = per.bit_length() - 1

    def k(b):  # input bit b as (output, word row, field)
        return [0, 0, 1 << b] if b < p else [0, 1 << (b - p), 0]

    def n(b):
        return [1 << b, 0, 0]
    regs = [k(0), n(3), k(3)] + [k(b) for b in range(4, block_k.bit_length() - 1)]
    lanes = [k(1), k(2), n(0), n(1), n(2)]
    groups = block_n // 64  # warp groups along the outputs
    warp_bases = [n(b) for b in range(4, 5 + groups.bit_length())]
    warp_bases += [[0, 0, 0]] * ((warps // 4 // groups).bit_length() - 1)
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=warp_bases, block_bases=[],
                                      shape=[block_n, block_k // per, per])


def word_layout(config, bits, dq):
    """REG_A's layout of a slot's words as the slot holds them, (word row, output): register_layout() without its
    field dimension, transposed (_register_tile); for other configs the dequantize layout, unused."""
    if not reg_a(config):
        return dq

    def words(basis):  # (output, word row, field) -> (word row, output); a field-only basis is a broadcast
        return [basis[1], basis[0]]
    return gl.DistributedLinearLayout(reg_bases=[words(b) for b in dq.reg_bases],
                                      lane_bases=[words(b) for b in dq.lane_bases],
                                      warp_bases=[words(b) for b in dq.warp_bases], block_bases=[],
                                      shape=[dq.shape[1], dq.shape[0]])


def registers(config):
    """(registers per thread for the program, for each dequantize partition's threads): the program's warps
    (num_warps, and the loader's warp and the dequantize partitions' warps padded to whole warp groups of 4, as
    Triton pads them) fit the 64K registers of a multiprocessor; the default partition (the accumulator) is left 168
    a thread, the loader's warp group 24, and the dequantize partitions share the rest (at most 128 a thread; with
    4 warps a partition, as before 2-warp partitions were allowed)."""
    _, _, _, warps, _, dq_warps, parts = config[:7]
    if parts == 0:  # REG_A: the default partition and the loader's warp group alone
        return min(256, 65536 // (32 * (warps + 4)) // 8 * 8), 24
    dq_threads = parts * 32 * (dq_warps if dq_warps < 4 else -(-dq_warps // 4) * 4)
    workers = -(-(32 + dq_threads) // 128) * 128  # the loader's warp and theirs, in warp groups
    total = min(256, 65536 // (32 * warps + workers) // 8 * 8)
    return total, max(24, min(128, (65536 - 128 * 24 - 32 * warps * 168) // dq_threads // 8 * 8))


KERNEL_BITS = (1, 2, 3, 4, 8)  # 3-bit codes in planes (layout.py), the others one field of a word each


@functools.lru_cache(maxsize=None)
def _hopper(index):
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.lru_cache(maxsize=None)
def _multiprocessors(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def supports(x, qweight, bits, group_size, in_features, zero):
    """Whether gluon_mm runs this call: Gluon's Hopper API, a CUDA GPU of compute capability 9 (wgmma), x bf16 and
    contiguous, codes in words (in_features * bits / 32, N), N a multiple of 64, in_features a multiple of 64,
    groups of a multiple of 64 inputs (or one scale per output); 1, 2, 4 or 8-bit codes, uint8 zero points or one
    constant."""
    if gluon is None or not x.is_cuda or x.dtype != torch.bfloat16 or bits not in KERNEL_BITS:
        return False
    n = qweight.shape[1]
    group = group_size or in_features
    return (_hopper(x.device.index if x.device.index is not None else torch.cuda.current_device())
            and x.is_contiguous() and n % 64 == 0 and in_features % BLOCK_K == 0 and group % MIN_GROUP == 0
            and in_features % group == 0 and qweight.shape[0] * 32 == in_features * bits
            and (zero is None or zero.dtype == torch.uint8))


def word_rows(block_k, bits):
    """Rows of words a K tile's TMA copy takes: block_k * bits / 32, for 3-bit codes (6) rounded up to a power of two
    (8: the next tile's first two rows come along unused, or zeros past the end)."""
    return triton.next_power_of_2(block_k * bits // 32)


def _rows(t, n):
    """Scales or zero points (rows, n) as a TMA copy takes them: one row (per channel) is an unsqueezed view with
    strides (1, 1), and a descriptor wants every stride but the last a multiple of 16 bytes (the same memory)."""
    return t.as_strided(t.shape, (n, 1)) if t.shape[0] == 1 else t


def gluon_mm(x, qweight, scale, zero, bias, bits, blocks_per_group, zero_const, config, activation=0, diag=0,
             stamps=None, counters=None, part_load=None):
    """y = x @ dequant(W).T + bias, then the activation (ops.ACTIVATIONS code), with the signature of ops' other
    kernels (blocks_per_group: blocks of 32 codes per scale row; zero_const: every code's zero point where zero
    is None). config: CONFIGS' seven numbers, an optional eighth (_products' SWAP) and ninth (TAIL, schedule()).
    The product is _gluon_mm_kernel's; the bias and the activation are PyTorch ops after it (the kernel's epilogue
    could take them, once measured on a GPU). diag: 1 leaves the products out (a diagnostic: y is then not the
    product; leaving the dequantize out as well hung on an H100, bench/results/prefill_gluon_h100).
    stamps: an int64 tensor of (programs, 4) that each program fills with its timeline (_gluon_mm_kernel's STAMP;
    bench/prefill_ws_probe.py --timeline). counters: int32 zeros, at least one per split tile (PackedLinear's
    split_counters, zero again after the call), where the config's TAIL splits some (schedule()). part_load: TAIL
    2's owner share's parameter (fold_share(); None: PART_LOAD_TILES)."""
    m, k = x.shape
    n = qweight.shape[1]
    config = tuple(config)  # a key of layouts()' and _constants' caches
    block_m, block_n, block_k = config[:3]
    if n % block_n:  # a partial column tile would be left out (ops.candidates offers only configs that divide n)
        raise ValueError(f"gluon_gemm: config {config} takes outputs in tiles of {block_n}, got {n} outputs")
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    x_layout, flat, bytes_, _, _, _, _ = layouts(config, bits)
    scales = TensorDescriptor.from_tensor(_rows(scale, n), [1, block_n], flat)
    descs = (TensorDescriptor.from_tensor(x, [block_m, block_k], x_layout),
             TensorDescriptor.from_tensor(qweight, [word_rows(block_k, bits), block_n], flat), scales,
             TensorDescriptor.from_tensor(_rows(zero, n), [1, block_n], bytes_) if zero is not None else scales,
             TensorDescriptor.from_tensor(y, [block_m, block_n], _y_layout(config)))
    m_tiles, (whole, rest, split) = call_schedule(m, n, k, config, x.device)
    part, count = y, y  # not read without a split
    if split > 1:
        part = torch.empty((m_tiles * rest * (split - 1), block_m * block_n), device=x.device, dtype=torch.float32)
        count = counters if counters is not None and counters.numel() >= m_tiles * rest else torch.zeros(
            m_tiles * rest, device=x.device, dtype=torch.int32)
    grid = (m_tiles, whole + rest * split * (tail(config) != 2))
    group = group_tiles(blocks_per_group * 32, k, block_k)
    if stamps is not None:
        if stamps.shape != (grid[0] * grid[1], 4) or stamps.dtype != torch.int64:
            raise ValueError(f"gluon_gemm: stamps must be int64 of shape ({grid[0] * grid[1]}, 4), one row a program,"
                             f" got {tuple(stamps.shape)} {stamps.dtype}")
        diag |= 2
    _gluon_mm_kernel[grid](
        *descs, y, y if stamps is None else stamps, part, count, m, n, k, whole,
        fold_share(k // block_k, split, PART_LOAD_TILES if part_load is None else part_load), group,
        **_constants(config, bits, zero is not None, float(zero_const), diag, split, group == 0), num_warps=config[3],
        maxnreg=registers(config)[0])
    return _epilogue(y, bias, activation)


@functools.lru_cache(maxsize=None)
def _constants(config, bits, has_zero, zero, diag, split, one_row):
    """_gluon_mm_kernel's constexprs but GROUP_TILES, for a launch (gluon_mm) and for compile_for alike (one_row:
    one row of scales for every input, GROUP_TILES 0)."""
    pair = pairs(config, bits, has_zero, zero, one_row)
    _, _, _, w_layout, acc, dq, out = layouts(config, bits, pair > 0)
    return dict(STAGES=config[4], W_LAYOUT=w_layout, ACC_LAYOUT=acc, DQ_LAYOUT=dq, DQ_WARPS=config[5],
                DQ_REGS=registers(config)[1], DQ_PARTS=max(1, config[6]), BITS=bits, HAS_ZERO=has_zero, ZERO=zero,
                DIAG=diag, SWAP=swapped(config), OUT_LAYOUT=out, SPLIT=split, REG_A=reg_a(config),
                WORD_LAYOUT=word_layout(config, bits, dq), FOLD=tail(config) == 2 and split > 1, PAIRS=pair)


def call_schedule(m, n, k, config, device):
    """(row tiles, schedule()'s (WHOLE, REST, SPLIT)) of a call of m rows, n outputs and k inputs on `device`: its
    grid is (row tiles, WHOLE + REST * SPLIT), (row tiles, WHOLE) with TAIL 2."""
    m_tiles = triton.cdiv(m, config[0])
    programs = _multiprocessors(device.index if device.index is not None else torch.cuda.current_device()) if tail(
        config) else 0
    return m_tiles, schedule(m_tiles, n // config[1], k // config[2], programs, tail(config))


def _y_layout(config):
    """The shared layout of y's (BLOCK_M, BLOCK_N) tile for its TMA copy (SWAP 3): x's tile's where the shapes agree."""
    return gl.NVMMASharedLayout.get_default_for(list(config[:2]), gl.bfloat16)


def _epilogue(y, bias, activation):
    """The bias and the activation (ops.ACTIVATIONS: 1 GELU, 2 its tanh form) as PyTorch ops after the kernel."""
    if bias is not None:
        y += bias.to(y.dtype)
    if activation:
        y = torch.nn.functional.gelu(y, approximate="none" if activation == 1 else "tanh")
    return y


def group_tiles(group, in_features, block_k=BLOCK_K):
    """The kernel's GROUP_TILES: K tiles per row of scales (a constant, so the loader's row is a shift, not a
    division a tile: the loader's loop went from 73 SASS instructions to 48, and 21.6 to 20.7 us on 4096x4096 at 256
    rows, file 17 of bench/results/prefill_gluon_h100), 0 for one row (per channel)."""
    return 0 if group >= in_features else group // block_k


@functools.lru_cache(maxsize=None)
def compile_for(config, arch=90, diag=0, bits=4, has_zero=True, group=128, in_features=4096, split=1, zero=None):
    """The kernel compiled for `arch` without a GPU (triton.compile with an explicit target): what the CPU tests and
    bench/prefill_ws_probe.py --compile_only look at (registers, shared memory, SASS). zero: the constant zero point
    without zero points (default 8)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    config = tuple(config)
    block_m, block_n, block_k = config[:3]
    x_layout, flat, bytes_, _, _, _, _ = layouts(config, bits)

    def desc(element, shape, layout):  # the signature a TensorDescriptor argument specializes to
        return f"tensordesc<{element}[{','.join(map(str, shape))}],{layout!r}>"

    signature = {"x_desc": desc("bf16", [block_m, block_k], x_layout),
                 "q_desc": desc("i32", [word_rows(block_k, bits), block_n], flat),
                 "s_desc": desc("fp32", [1, block_n], flat),
                 "z_desc": desc("u8", [1, block_n], bytes_) if has_zero else desc("fp32", [1, block_n], flat),
                 "y_desc": desc("bf16", [block_m, block_n], _y_layout(config)),
                 "y_ptr": "*bf16", "stamp_ptr": "*i64", "part_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32",
                 "N": "i32", "K": "i32", "WHOLE": "i32", "OWN": "i32"}
    one_row = group_tiles(group, in_features, block_k) == 0
    consts = dict(GROUP_TILES=group_tiles(group, in_features, block_k),
                  **_constants(config, bits, has_zero, 0.0 if has_zero else 8.0 if zero is None else zero, diag, split,
                               one_row))
    signature.update({name: "constexpr" for name in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i in (5, 6, 7, 8, 9, 10, 11)}
    source = GluonASTSource(fn=_gluon_mm_kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=config[3], maxnreg=registers(config)[0]))
