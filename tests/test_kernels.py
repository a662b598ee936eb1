"""The packed kernels (quantization/kernels/) against the reference: quantizers.py's dequantize, then a float matmul.

The Triton kernels run on the CPU under TRITON_INTERPRET=1, in a fresh interpreter (the variable must be set before
Triton compiles anything); the GPU runs the same check in `bench/kernels.py --check`."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_interpreted
from quantization.kernels import PackedLinear, convert_to_packed, ops, pack_model
from quantization.kernels.layout import dequantize_kernel_layout
from quantization.quantizers import QuantSpec, dequantize, quantize_tensor

# (method, bits, granularity, group_size): every kernel bit width (8, 4, 3, 2, ternary's 2, binary's 1)
SPECS = [("symmetric_quant", 8, "per_channel", 0), ("affine_quant", 8, "per_group", 32),
         ("affine_quant", 4, "per_group", 32), ("symmetric_quant", 4, "per_group", 64),
         ("affine_quant", 4, "per_channel", 0), ("affine_quant", 3, "per_group", 32),
         ("symmetric_quant", 3, "per_channel", 0), ("affine_quant", 2, "per_group", 32),
         ("ternary_quant", 2, "per_tensor", 0), ("ternary_quant", 2, "per_channel", 0),
         ("binary_quant", 2, "per_channel", 0)]

KERNEL_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from quantization.kernels import PackedLinear, ops
from quantization.quantizers import QuantSpec, dequantize, quantize_tensor
assert ops.interpreting() and ops.triton_kernels is not None
torch.manual_seed(0)
out = []
for method, bits, granularity, group_size in json.loads(sys.argv[2]):
    spec = QuantSpec(method, bits, granularity, group_size)
    # odd output width; input widths that are and are not multiples of the 32-code block (per channel only)
    # (36: a width whose uint8 zero points the GEMM reads as 32-bit words, ZWORDS)
    for n, k, rows, bias in ((37, 128, 1, True), (36, 64 if group_size else 80, 3, False), (19, 64, 20, True)):
        w = torch.randn(n, k)
        b = torch.randn(n) if bias else None
        codes, scale, zero_point = quantize_tensor(w, spec)
        expected_w = dequantize(codes, scale, zero_point, spec)
        x = torch.randn(rows, k)
        expected = x.double() @ expected_w.double().T + (b.double() if bias else 0)
        layer = PackedLinear.from_float(w, spec, b)
        assert ops.kernel_refusal(x, layer.bits, layer.group_size) is None
        ys = [("layer", layer(x))]
        # every kernel that may run this many rows, with its first config (the layer ran the default one)
        pairs = ops.candidates(rows, group_size, layer.bits)
        blocks = group_size // 32 if group_size else -(-k // 32)
        for i, (kernel, config) in enumerate(pairs):
            if kernel not in [p[0] for p in pairs[:i]]:
                ys.append((kernel.__name__, kernel(x, layer.qweight, layer.scale, layer.zero, layer.bias, layer.bits,
                                                   blocks, layer.zero_const, config)))
        if rows == 1:  # the streaming GEMV without split-K (a plain store), and split-K without the prefetch
            for label, config in (("no split", (64, 4, 0, 4, 1)), ("split-K", (64, 1, 16, 4, 0))):
                ys.append((f"stream_gemv {label}", ops.stream_gemv(x, layer.qweight, layer.scale, layer.zero,
                                                                   layer.bias, layer.bits, blocks, layer.zero_const,
                                                                   config, counters=layer.split_counters)))
            # the split-K arrival counters are back to zero for the next call
            assert not layer.split_counters.any()
            # a step's x in one load (XLOAD 1): the new configs of ops.STREAM_CONFIGS (K = 128: 4 of their 128 or 32
            # blocks, masked) and an unmasked one (EVEN), each the same output as x loaded per value (XLOAD 0)
            for config in [c for c in ops.STREAM_CONFIGS if len(c) > 5] + [(64, 2, 0, 4, 0, 1)]:
                y = ops.stream_gemv(x, layer.qweight, layer.scale, layer.zero, layer.bias, layer.bits, blocks,
                                    layer.zero_const, config, counters=layer.split_counters)
                assert torch.equal(y, ops.stream_gemv(x, layer.qweight, layer.scale, layer.zero, layer.bias,
                                                      layer.bits, blocks, layer.zero_const, config[:5],
                                                      counters=layer.split_counters)), config
                ys.append(("stream_gemv x block", y))
        else:  # the GEMM with K split into one tile per program (16-row tiles: 20 rows are two tiles)
            ys.append(("gemm split-K", ops.gemm(x, layer.qweight, layer.scale, layer.zero, layer.bias, layer.bits,
                                                blocks, layer.zero_const, (16, 64, 32, 4, 1, 64),
                                                counters=layer.split_counters)))
            assert not layer.split_counters.any()
            # words loaded once and their codes shifted out (unpack), in the GEMM (split K too) and the dequantize
            block_k = ops._fit_k(64, group_size)
            ys.append(("gemm unpack", ops.gemm(x, layer.qweight, layer.scale, layer.zero, layer.bias, layer.bits,
                                               blocks, layer.zero_const, (16, 32, block_k, 4, 1, 0, 1))))
            ys.append(("gemm unpack split-K", ops.gemm(x, layer.qweight, layer.scale, layer.zero, layer.bias,
                                                       layer.bits, blocks, layer.zero_const,
                                                       (16, 64, 32, 4, 1, 64, 1), counters=layer.split_counters)))
            assert not layer.split_counters.any()
            for config in ((4, 32, 4), (1, 64, 2)):  # unpacked on the store side: a row of the scratch per code
                ys.append((f"dequant_mm words {config[0]}", ops.dequant_mm(
                    x, layer.qweight, layer.scale, layer.zero, layer.bias, layer.bits, blocks, layer.zero_const,
                    config)))
        for name, y in ys:
            out.append([method, bits, granularity, group_size, n, k, rows, bias, name,
                        ((y.double() - expected).abs().max() / expected.abs().max()).item()])
# torch.compile traces a layer as one custom op node (eager mode calls the launcher directly)
graphs = []
def backend(gm, example_inputs):
    graphs.append(str(gm.graph))
    return gm.forward
layer = PackedLinear.from_float(torch.randn(37, 64), QuantSpec("affine_quant", 4, "per_group", 32))
x = torch.randn(1, 64)
assert torch.equal(torch.compile(layer, backend=backend, fullgraph=True)(x), layer(x))
assert graphs and "nanoqat.packed_matmul" in graphs[0], graphs
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted():
    """This module's three longest Triton-interpreter scripts, started together at first use: each keeps one core
    busy (KERNEL_CHECK about 47 s, ONE_ROW_RANGE about 40 s and NORM_RESIDUAL about 60 s, each alone on a core), so
    that on 2 cores they take about half their sum; each test reads its own result."""
    pytest.importorskip("triton")
    from conftest import Interpreted
    jobs = {"kernels": Interpreted(KERNEL_CHECK, json.dumps(SPECS)),
            "one_row_range": Interpreted(ONE_ROW_RANGE, json.dumps(ONE_ROW_SPECS)),
            "norm_residual": Interpreted(NORM_RESIDUAL, json.dumps(NORM_SPECS))}
    yield jobs
    for job in jobs.values():
        job.stop()


def test_every_kernel_equals_the_dequantized_matmul_under_the_interpreter(interpreted):
    rows = interpreted["kernels"].result()
    # float32 accumulation over at most 128 products: relative error far below one quantization step
    bad = [r for r in rows if not r[-1] < 1e-5]
    assert not bad, bad
    # every kernel ran on every spec: one row (streaming GEMV with and without split-K), 3 rows (GEMM at 16 rows,
    # GEMV, dequantize then matmul, GEMM split-K), 20 (GEMM, dequantize then matmul, GEMM split-K); at 3 and 20
    # rows the GEMM (split K too) also with each word loaded once (unpack), and the dequantize with two more tiles
    ran = {(r[6], r[8]) for r in rows}
    unpacked = {(m, name) for m in (3, 20) for name in ("gemm unpack", "gemm unpack split-K",
                                                        "dequant_mm words 4", "dequant_mm words 1")}
    assert ran == {(1, "layer"), (1, "stream_gemv"), (1, "stream_gemv no split"), (1, "stream_gemv split-K"),
                   (1, "stream_gemv x block"), (3, "layer"), (3, "gemm"), (3, "gemv"), (3, "dequant_mm"),
                   (3, "gemm split-K"), (20, "layer"), (20, "gemm"), (20, "dequant_mm"),
                   (20, "gemm split-K")} | unpacked, ran
    assert len(rows) == (21 + sum(len(c) > 5 for c in ops.STREAM_CONFIGS) + 1) * len(SPECS)


ONE_ROW_RANGE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from quantization.kernels import PackedLinear, ops
from quantization.quantizers import QuantSpec
torch.manual_seed(0)
out = []
for method, bits, granularity, group_size, k in json.loads(sys.argv[2]):
    w = torch.randn(37, k)
    layer = PackedLinear.from_float(w, QuantSpec(method, bits, granularity, group_size))
    blocks = group_size // 32 if group_size else k // 32
    # one row per magnitude (the kernel runs each row of x as its own one-row problem)
    x = torch.randn(3, k) * torch.tensor([[1e15], [1.0], [1e-9]])
    expected = x.double() @ layer.dequantized_weight().double().T
    counters = torch.zeros(3, dtype=torch.int32)
    # k = 1088: 17 splits of 2 blocks, so the last program of a tile adds the partials in two chunks (16, then 1)
    y = ops.stream_gemv(x, layer.qweight, layer.scale, layer.zero, None, layer.bits, blocks, layer.zero_const,
                        (64, 1, 64, 4, 1), counters=counters)
    # the step's x in one load (XLOAD 1): the same output
    assert torch.equal(y, ops.stream_gemv(x, layer.qweight, layer.scale, layer.zero, None, layer.bits, blocks,
                                          layer.zero_const, (64, 1, 64, 4, 1, 1), counters=counters))
    for row, magnitude in enumerate((1e15, 1.0, 1e-9)):
        err = ((y[row].double() - expected[row]).abs().max() / expected[row].abs().max()).item()
        out.append([method, bits, magnitude, err, int(counters.abs().sum())])
    # the 16-bit and non-finite x below on the layer's first 128 inputs (4 blocks, 2 splits): how x is loaded does
    # not depend on K, and each row of the 34 blocks above costs the interpreter about 3 s
    if k > 128:
        k = 128
        layer = PackedLinear.from_float(w[:, :k].contiguous(), QuantSpec(method, bits, granularity, group_size))
        blocks = group_size // 32 if group_size else k // 32
    # 16-bit x (bfloat16: its bits moved into a float32's exponent in one instruction), some values exactly 0: the
    # same float32 sums as the same values given as float32, so the outputs differ by the output's rounding alone
    for dtype in (torch.bfloat16, torch.float16):
        xh = (torch.randn(2, k) * torch.tensor([[30.0], [1e-3]])).to(dtype)
        xh[:, ::3] = 0
        y16, y32 = (ops.stream_gemv(v, layer.qweight, layer.scale, layer.zero, None, layer.bits, blocks,
                                    layer.zero_const, (64, 1, 64, 4, 1), counters=counters) for v in (xh, xh.float()))
        assert torch.equal(y16, ops.stream_gemv(xh, layer.qweight, layer.scale, layer.zero, None, layer.bits, blocks,
                                                layer.zero_const, (64, 1, 64, 4, 1, 1), counters=counters))
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
        for row in range(2):
            err = ((y16[row].float() - y32[row]).abs() / (y32[row].abs() * ulp + 1e-6 * y32[row].abs().max())).max()
            out.append([method, bits, str(dtype), err.item(), int(counters.abs().sum())])
        # a NaN or an infinity in x is never swallowed: every output is then NaN or infinite
        for bad in (float("nan"), float("inf")):
            xb = xh[:1].clone()
            xb[0, 7] = bad
            yb = ops.stream_gemv(xb, layer.qweight, layer.scale, layer.zero, None, layer.bits, blocks,
                                 layer.zero_const, (64, 1, 64, 4, 1), counters=counters)
            yb1 = ops.stream_gemv(xb, layer.qweight, layer.scale, layer.zero, None, layer.bits, blocks,
                                  layer.zero_const, (64, 1, 64, 4, 1, 1), counters=counters)
            assert not yb1.isfinite().any()
            out.append([method, bits, f"{dtype} {bad}", 0.0 if not yb.isfinite().any() else 2.0,
                        int(counters.abs().sum())])
print(json.dumps(out))
"""


# 4-bit codes over many splits (16-bit and non-finite x over its first 128 inputs); 1-bit codes (a field at every
# bit position) over a short K
ONE_ROW_SPECS = [("affine_quant", 4, "per_group", 32, 1088), SPECS[-1] + (128,)]


def test_the_one_row_kernel_keeps_float32_accuracy_over_magnitudes_and_many_splits(interpreted):
    """Codes become subnormal floats and x is scaled by 2**(64 - p): exact for |x| from about 1e-12 to 1e19."""
    rows = interpreted["one_row_range"].result()
    assert len(rows) == 11 * len(ONE_ROW_SPECS)
    # float32 x: far below a quantization step; 16-bit x: at most one unit in the last place of each output
    bad = [r for r in rows if not (r[3] < (1e-5 if isinstance(r[2], float) else 1.0) and r[4] == 0)]
    assert not bad, bad


GELU_EPILOGUE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.nn.functional as F
from quantization.kernels import PackedLinear, ops
from quantization.quantizers import QuantSpec
torch.manual_seed(0)
out = []
for method, bits, granularity, group_size in json.loads(sys.argv[2]):
    w, b = torch.randn(37, 128), torch.randn(37)
    layer = PackedLinear.from_float(w, QuantSpec(method, bits, granularity, group_size), b)
    blocks = group_size // 32 if group_size else 4
    args = (layer.qweight, layer.scale, layer.zero, layer.bias, layer.bits, blocks, layer.zero_const)
    c = layer.split_counters
    calls = {1: [("stream_gemv", ops.stream_gemv, (64, 4, 0, 4, 1), {}),
                 ("stream_gemv split-K", ops.stream_gemv, (64, 1, 16, 4, 0), dict(counters=c))],
             20: [("gemm", ops.gemm, (16, 64, 32, 4, 1, 0, 1), {}),
                  ("gemm split-K", ops.gemm, (16, 64, 32, 4, 1, 64), dict(counters=c)),
                  ("gemv", ops.gemv, (64, 2, 1, 4), {}), ("gemv split-K", ops.gemv, (64, 1, 4, 4), {}),
                  ("dequant_mm", ops.dequant_mm, (1, 64, 2), {})]}
    for rows, kernels in calls.items():
        x = torch.randn(rows, 128) * 2
        linear = x.double() @ layer.dequantized_weight().double().T + b.double()
        for approximate in ("none", "tanh"):
            expected = F.gelu(linear, approximate=approximate)
            for name, kernel, config, kw in kernels:
                x_in = x[:16] if kernel is ops.gemv else x  # the GEMV takes at most 16 rows
                y = kernel(x_in, *args, config, activation=ops.ACTIVATIONS[approximate], **kw)
                err = ((y.double() - expected[:len(x_in)]).abs().max() / expected.abs().max()).item()
                out.append([method, bits, rows, approximate, name, err, int(c.abs().sum())])
            layer.gelu = approximate  # the layer's own call: the launcher's default kernel
            y = layer(x)
            layer.gelu = None
            err = ((y.double() - expected).abs().max() / expected.abs().max()).item()
            out.append([method, bits, rows, approximate, "layer", err, 0])
print(json.dumps(out))
"""


def test_the_kernels_apply_the_gelu_as_they_write_the_output():
    """The GELU epilogue (inference.fuse_gelu) of every kernel family, exact and tanh, against float64 F.gelu of the
    float64 matmul; split-K too (the last program activates the sum; the atomic GEMV leaves it to the launcher)."""
    pytest.importorskip("triton")
    specs = [("affine_quant", 4, "per_group", 32), ("symmetric_quant", 3, "per_channel", 0)]
    rows = run_interpreted(GELU_EPILOGUE, json.dumps(specs))
    assert len(rows) == len(specs) * 2 * (3 + 6)
    assert {r[4] for r in rows} == {"stream_gemv", "stream_gemv split-K", "gemm", "gemm split-K", "gemv",
                                    "gemv split-K", "dequant_mm", "layer"}
    bad = [r for r in rows if not (r[5] < 1e-5 and r[6] == 0)]
    assert not bad, bad


NORM_RESIDUAL = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.nn.functional as F
from quantization.kernels import PackedLinear, ops
from quantization.quantizers import QuantSpec
assert ops.interpreting()
torch.manual_seed(0)
out = []


def err(y, expected):
    return ((y.double() - expected).abs().max() / expected.abs().max()).item()


for index, (method, bits, granularity, group_size) in enumerate(json.loads(sys.argv[2])):
    spec = QuantSpec(method, bits, granularity, group_size)
    # the fourth: a row longer than ops.EARLY_ROW (set to 0 here), loaded by the epilogue instead of before the
    # loop; the last two: its statistics computed before the loop (ops.NORM_STATS, the kernel's STATS), the last in
    # two chunks of 1024, the second part masked: for the first spec only (the statistics of r do not depend on the
    # weight's format, and its 33 blocks cost the interpreter about 20 s a spec)
    shapes = ((37, 128, 1, "float32", 2048, 0), (40, 128, 2, "float32", 2048, 0), (24, 64, 1, "bfloat16", 2048, 0),
              (8, 96, 2, "float32", 0, 0), (8, 96, 2, "float32", 0, 1), (8, 1056, 1, "float32", 2048, 1))
    for n, k, rows, dtype, early_row, stats in shapes if index == 0 else shapes[:-1]:
        ops.EARLY_ROW, ops.NORM_STATS = early_row, stats
        dt = getattr(torch, dtype)
        w, b = torch.randn(n, k), torch.randn(n)
        layer = PackedLinear.from_float(w, spec, b)
        weight = layer.dequantized_weight().double()
        blocks = group_size // 32 if group_size else k // 32
        for norm in (torch.nn.LayerNorm(k), torch.nn.RMSNorm(k, eps=1e-5)):
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.normal_()
            layer.fuse_norm(norm)
            r = (torch.randn(rows, k) * 3 + 2).to(dt)  # a mean far from zero: W u and mean W gain nearly cancel
            u = r.float() * norm.weight.detach()
            gain = norm.weight.detach().double()
            if isinstance(norm, torch.nn.LayerNorm):
                normed = F.layer_norm(r.double(), (k,), gain, norm.bias.detach().double(), norm.eps)
            else:
                normed = F.rms_norm(r.double(), (k,), gain, 1e-5)
            expected = normed @ weight.T + b.double()
            label = type(norm).__name__
            ys = [("norm_forward", layer.norm_forward(u, r))]
            if dt != torch.float32:  # u as residual_forward gives it in a bfloat16 model: rounded to bfloat16
                ys.append(("norm_forward bf16 u", layer.norm_forward(u.to(dt), r)))
            wg, bias = layer.norm_out_bits.view(torch.float32)
            for name, config in (("no split", (64, 4, 0, 4, 1)), ("split-K", (32, 1, 16, 4, 0))):
                ys.append((f"norm {name}", ops.stream_gemv(u, layer.qweight, layer.scale, layer.zero, bias,
                                                           layer.bits, blocks, layer.zero_const, config,
                                                           counters=layer.split_counters,
                                                           norm=(r, wg, layer.norm_kind, layer.norm_eps))))
                assert not layer.split_counters.any()
            layer.gelu = "tanh"
            ys.append(("norm_forward gelu", layer.norm_forward(u, r)))
            layer.gelu = None
            for name, y in ys:
                reference = F.gelu(expected, approximate="tanh") if "gelu" in name else expected
                out.append([method, bits, n, k, rows, dtype, label, name, err(y, reference), str(y.dtype)])
        # the residual add after the layer, and u for the next normalization
        x, res = torch.randn(rows, k).to(dt), torch.randn(rows, n).to(dt)
        gain = torch.rand(n) + 0.5
        layer.fuse_residual(gain)
        expected = res.double() + x.double() @ weight.T + b.double()
        y, u = layer.residual_forward(x, res)
        out.append([method, bits, n, k, rows, dtype, "residual", "y", err(y, expected), str(y.dtype)])
        out.append([method, bits, n, k, rows, dtype, "residual", "u", err(u, y.double() * gain.double()),
                    str(u.dtype)])
        y, u = ops.stream_gemv(x, layer.qweight, layer.scale, layer.zero, layer.bias, layer.bits, blocks,
                               layer.zero_const, (32, 1, 16, 4, 0), counters=layer.split_counters,
                               residual=(res, gain))
        assert not layer.split_counters.any()
        out.append([method, bits, n, k, rows, dtype, "residual", "y split-K", err(y, expected), str(y.dtype)])
# the custom ops that torch.compile sees: schema, fake tensors, autograd registration
layer = PackedLinear.from_float(torch.randn(40, 128), QuantSpec("affine_quant", 4, "per_group", 32), torch.randn(40))
layer.fuse_norm(torch.nn.LayerNorm(128))
layer.fuse_residual(torch.rand(40))
wg, bias = layer.norm_out_bits.view(torch.float32)
packed = (layer.qweight, layer.scale, layer.zero)
config = (4, 32, 128, layer.zero_const, layer.split_counters)
r, x, res = torch.randn(1, 1, 128), torch.randn(1, 1, 128), torch.randn(1, 1, 40)
for op, args in ((ops.norm_matmul, (r * 1.5, r, *packed, bias, wg, *config, 0, 1, 1e-5)),
                 (ops.residual_matmul, (x, res, layer.next_gain_bits.view(torch.float32), *packed, layer.bias,
                                        *config))):
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result
print(json.dumps(out))
"""


NORM_SPECS = [("affine_quant", 4, "per_group", 32), ("symmetric_quant", 3, "per_channel", 0)]


def test_the_one_row_kernel_normalizes_before_and_adds_the_residual_after(interpreted):
    """fuse_norms' kernels (PackedLinear.norm_forward, residual_forward) against float64: a LayerNorm or RMSNorm
    then the layer (the statistics of r in the epilogue, W u - mean W gain), its GELU; the residual add and u for
    the next normalization; with and without split-K, one and two rows, float32 and bfloat16 (the output and u in
    the residual's dtype; norm_forward also from a bfloat16 u, r's mean 2 against a spread of 3), a row short
    enough to load before the loop and one loaded after it, and its statistics computed before the loop
    (ops.NORM_STATS; for the first spec also a row of 1056, read in two chunks)."""
    rows = interpreted["norm_residual"].result()
    # per spec 6 shapes (the 1056-long row for the first spec only) of 2 normalizations x 4 outputs and 3 of the
    # residual add, and the bfloat16 u's 2
    assert len(rows) == len(NORM_SPECS) * (6 * (2 * 4 + 3) + 2) - (len(NORM_SPECS) - 1) * (2 * 4 + 3)
    assert {(r[0], r[1]) for r in rows if r[3] == 1056} == {NORM_SPECS[0][:2]}
    for row in rows:
        bf16 = row[5] == "bfloat16"
        assert row[8] < (1e-2 if bf16 else 1e-5), row  # float32: far below a quantization step
        assert row[9] == ("torch.bfloat16" if bf16 else "torch.float32"), row  # u too: ops.norm_input_dtype


def test_a_packed_linear_with_outliers_applies_the_gelu_after_them():
    """On the CPU (the dequantize path), and with sparse outliers (added after the kernel): F.gelu of the sum."""
    import torch.nn.functional as F
    from quantization.packing import unpack_weight
    torch.manual_seed(0)
    w, x = torch.randn(12, 64), torch.randn(3, 64)
    sparse = torch.zeros_like(w)
    sparse[2, 5] = 9.0
    record = _record(w, QuantSpec("affine_quant", 3, "per_group", 32, outlier_fraction=0.01), sparse)
    model = torch.nn.Sequential(torch.nn.Linear(64, 12))
    bias = model[0].bias.detach().clone()
    convert_to_packed(model, {"0": record})
    model[0].gelu = "tanh"
    expected = F.gelu(x @ unpack_weight(record).T + bias, approximate="tanh")
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert "gelu=tanh" in repr(model[0])


@pytest.mark.parametrize("method,bits,granularity,group_size", SPECS)
def test_the_layout_dequantizes_exactly_to_the_reference(method, bits, granularity, group_size):
    spec = QuantSpec(method, bits, granularity, group_size)
    w = torch.randn(23, 128)
    codes, scale, zero_point = quantize_tensor(w, spec)
    layer = PackedLinear.from_float(w, spec)
    assert torch.equal(layer.dequantized_weight(), dequantize(codes, scale, zero_point, spec))


def test_a_packed_linear_holds_codes_not_a_float_weight():
    w = torch.randn(256, 512)
    layer = PackedLinear.from_float(w, QuantSpec("affine_quant", 4, "per_group", 128), torch.zeros(256))
    assert not list(layer.parameters())
    total = sum(t.numel() * t.element_size() for t in layer.buffers())
    # 4 bits a weight, plus one float32 scale and one uint8 zero point per group of 128, plus the bias, plus an
    # int32 split-K counter per 32 outputs (not saved: the state dict holds the rest)
    assert total == 256 * 512 // 2 + 256 * 4 * (4 + 1) + 256 * 4 + 256 // 32 * 4
    assert "split_counters" not in layer.state_dict()
    assert total < w.numel() * w.element_size() / 7


def test_the_cpu_falls_back_to_the_dequantize_path():
    spec = QuantSpec("symmetric_quant", 4, "per_group", 32)
    w, x = torch.randn(10, 64), torch.randn(2, 5, 64)
    layer = PackedLinear.from_float(w, spec)
    codes, scale, zero_point = quantize_tensor(w, spec)
    assert torch.allclose(layer(x), x @ dequantize(codes, scale, zero_point, spec).T, atol=1e-5)


def test_a_group_no_kernel_takes_is_refused_with_a_reason():
    from quantization.kernels import ops
    if ops.triton_kernels is None:
        pytest.skip("Triton is not installed")
    layer = PackedLinear.from_float(torch.randn(8, 48), QuantSpec("affine_quant", 4, "per_group", 16))
    reason = ops.kernel_refusal(torch.randn(1, 48, device="cpu"), layer.bits, layer.group_size)
    assert reason == ""  # the CPU without the interpreter: silent fallback
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        reason = ops.kernel_refusal(torch.randn(1, 48), layer.bits, layer.group_size)
    finally:
        del os.environ["TRITON_INTERPRET"]
    assert reason and "group_size=16" in reason


def test_pack_model_replaces_every_linear_site_and_keeps_the_function(one_cpu_thread):
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=50, bias=True)).eval()
    spec = QuantSpec("affine_quant", 4, "per_group", 32)
    idx = torch.randint(50, (2, 16))
    packed = pack_model(model, spec)
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 6
    # the same model with each weight replaced by its dequantized RTN weight
    torch.manual_seed(0)
    reference = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=50, bias=True)).eval()
    with torch.no_grad():
        for name, module in packed.named_modules():
            if isinstance(module, PackedLinear):
                reference.get_submodule(name).weight.copy_(module.dequantized_weight())
        assert torch.allclose(packed(idx)[0], reference(idx)[0], atol=1e-5)


def test_pack_model_gives_residual_binary_sites_their_kernel_and_their_function(one_cpu_thread):
    """A residual-binary spec packs each site into a ResidualBinaryLinear with its Triton kernels attached (what
    bench/decode.py's RB2 rows run); each computes x @ (sum of its dequantized terms)^T + b."""
    from model import GPT, GPTConfig
    from quantization.binary_linear import ResidualBinaryLinear
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=50, bias=True)).eval()
    weights = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    spec = QuantSpec("residual_binary_quant", 8, "per_channel", binary_terms=2)
    packed = pack_model(model, spec)
    sites = {name: m for name, m in packed.named_modules() if isinstance(m, ResidualBinaryLinear)}
    assert len(sites) == 2 * 6 and all(hasattr(m, "stacked_words") for m in sites.values())
    for name, layer in sites.items():
        x = torch.randn(3, layer.in_features)
        codes, scale, _ = quantize_tensor(weights[name], spec)
        expected = x.double() @ dequantize(codes, scale, None, spec).double().T + layer.bias.double()
        assert torch.allclose(layer(x).double(), expected, atol=1e-4), name


def test_residual_binary_groups_the_kernels_cannot_take_keep_the_bit_operations_with_one_line(capsys, monkeypatch):
    """Scale groups of 16 inputs (not whole 32-bit words): no kernel is attached, one line says so once, and the
    layers still compute x @ (sum of their dequantized terms)^T + b."""
    pytest.importorskip("triton")
    from model import GPT, GPTConfig
    from quantization.binary_linear import ResidualBinaryLinear
    from quantization.kernels import ops
    monkeypatch.setattr(ops, "_said", set())
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=50, bias=True)).eval()
    weight = model.transformer.h[0].mlp.mlp_up.weight.detach().clone()
    spec = QuantSpec("residual_binary_quant", 8, "per_group", 16, binary_terms=2)
    packed = pack_model(model, spec)
    sites = [m for m in packed.modules() if isinstance(m, ResidualBinaryLinear)]
    assert len(sites) == 6 and all(m.gemv is None for m in sites)
    lines = [line for line in capsys.readouterr().err.splitlines() if "residual binary" in line]
    assert len(lines) == 1 and "16 inputs" in lines[0] and "bit operations" in lines[0], lines
    layer = packed.transformer.h[0].mlp.mlp_up
    x = torch.randn(3, 64)
    codes, scale, _ = quantize_tensor(weight, spec)
    expected = x.double() @ dequantize(codes, scale, None, spec).double().T + layer.bias.double()
    assert torch.allclose(layer(x).double(), expected, atol=1e-4)


def test_convert_to_packed_reads_a_packed_checkpoint_record():
    from quantization.packing import pack_record, unpack_weight
    spec = QuantSpec("affine_quant", 3, "per_group", 32)
    w = torch.randn(12, 64)
    codes, scale, zero_point = quantize_tensor(w, spec)

    class Rec:  # the fields quantization/packing.pack_record reads
        pass
    rec = Rec()
    rec.spec, rec.codes, rec.scale, rec.zero_point = spec, codes, scale, zero_point
    record = pack_record(rec)
    layer = PackedLinear.from_record(record)
    assert torch.equal(layer.dequantized_weight(), unpack_weight(record))
    model = torch.nn.Sequential(torch.nn.Linear(64, 12))
    convert_to_packed(model, {"0": record})
    assert isinstance(model[0], PackedLinear)
    assert torch.equal(dequantize_kernel_layout(model[0].qweight, model[0].scale, model[0].zero, model[0].zero_const,
                                                model[0].bits, model[0].group_size, 64), unpack_weight(record))


def _record(w, spec, sparse=None):
    from quantization.packing import pack_record

    class Rec:  # the fields pack_record reads
        pass
    rec = Rec()
    rec.spec, rec.sparse = spec, sparse
    rec.codes, rec.scale, rec.zero_point = quantize_tensor(w if sparse is None else w - sparse, spec)
    return pack_record(rec)


def test_outliers_and_residual_binary_records_keep_their_function_when_packed():
    from quantization.packing import unpack_weight
    torch.manual_seed(0)
    w, x = torch.randn(12, 64), torch.randn(3, 64)
    sparse = torch.zeros_like(w)
    sparse[2, 5], sparse[7, 40] = 9.0, -7.5
    for record in (_record(w, QuantSpec("affine_quant", 3, "per_group", 32, outlier_fraction=0.01), sparse),
                   _record(w, QuantSpec("residual_binary_quant", granularity="per_channel", binary_terms=2))):
        model = torch.nn.Sequential(torch.nn.Linear(64, 12))
        bias = model[0].bias.detach().clone()
        convert_to_packed(model, {"0": record})
        assert not isinstance(model[0], torch.nn.Linear)
        expected = x @ unpack_weight(record).T + bias
        assert torch.allclose(model(x), expected, atol=1e-4), record["spec"]["method"]


READ_WORDS_CHECK = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
from bench.kernels import read_words
torch.manual_seed(0)
r, n, block_r = 40, 37, 8
words = torch.randint(-2**31, 2**31, (r, n), dtype=torch.int64).to(torch.int32)
out = torch.zeros((r, n), dtype=torch.int32)
read_words(words, out, (16, block_r, 4, 4, 1))  # CPU: split = min(4 * 1 // 3, 40 // 8) = 1
lanes = torch.zeros((block_r, n), dtype=torch.int64)
for row in range(r):
    lanes[row % block_r] ^= words[row].to(torch.int64) & 0xFFFFFFFF
expected = lanes.sum(0) & 0xFFFFFFFF
expected = torch.where(expected >= 2**31, expected - 2**32, expected)
assert torch.equal(out[0].to(torch.int64), expected), (out[0], expected)
print("ok")
"""


def test_the_loads_only_kernel_of_the_profile_reads_every_word_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", READ_WORDS_CHECK, ROOT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("flag, named", [("--variants=int5 g128", "--variants"), ("--gemm_variants=fp4", "--gemm_variants"),
                                         ("--binary=4096", "--binary"), ("--shapes=0x768", "--shapes"),
                                         ("--profile_rows=0", "--profile_rows=0"),
                                         ("--gemm_configs=128x128x64x4x3x4", "--gemm_configs"),
                                         ("--gemm_configs=8x128x64x4x3x0x1", "--gemm_configs"),
                                         ("--gluon_configs=256x64x64x8x5x4x2x3x2x7", "--gluon_configs"),
                                         ("--gluon_configs=256x64x64x4x6x0x0x3x1x1", "--gluon_configs"),
                                         ("--gluon_configs=256x64", "--gluon_configs"),
                                         ("--gluon_configs=256x64x64x8x5x4x2x3x2x0x3", "--gluon_configs"),
                                         ("--gluon_configs=256x64x64x8x5x4x2x3x2x1", "needs a CUDA GPU"),  # taken
                                         ("--stream_configs=32x32x2x8x2", "--stream_configs"),
                                         ("--stream_configs=24x32x2x8x1", "--stream_configs"),
                                         ("--stream_configs=32x32x2x8", "--stream_configs"),
                                         ("--stream_configs=32x32x2x8x1x0", "needs a CUDA GPU"),  # taken
                                         ("--check_kernels=gemm,tinygemm", "--check_kernels")])
def test_the_kernel_benchmark_refuses_bad_flags_in_one_line(flag, named, capsys):
    """Unknown formats and malformed shapes are refused before anything runs, on any machine (main in this process:
    the error is the message it exits with, one line, and nothing else is written)."""
    from conftest import load_script, run_main
    error = run_main(load_script("bench/kernels.py").main, flag)
    assert error is not None and "\n" not in error and error.startswith(f"kernels.py: error: {named}"), error
    assert not capsys.readouterr().err


@pytest.mark.parametrize("script, flags, named", [
    ("ncu_one_row.py", ["--shape=768"], "--shape="), ("ncu_one_row.py", ["--config=1,2"], "--config="),
    ("ncu_one_row.py", ["--config=a"], "--config="), ("ncu_one_row.py", ["--calls=0"], "--calls=0"),
    ("ncu_one_row.py", [], "needs a CUDA GPU"), ("gemm_zero_words.py", ["--rows=a"], "--rows="),
    ("gemm_zero_words.py", ["--shapes=4096"], "--shapes="), ("gemm_zero_words.py", [], "needs a CUDA GPU"),
    ("prefill_overlap.py", ["--blocks=0"], "--blocks=0"), ("prefill_overlap.py", ["--rows=a"], "--rows"),
    ("prefill_overlap.py", ["--buffers=1"], "--buffers"), ("prefill_overlap.py", ["--carveouts=a"], "--carveouts"),
    ("prefill_overlap.py", [], "needs a CUDA GPU"), ("pdl_timeline.py", ["--blocks=1"], "--blocks=1"),
    ("pdl_timeline.py", ["--modes=late"], "--modes=late"), ("pdl_timeline.py", ["--n_embd=100"], "--n_embd=100"),
    ("pdl_timeline.py", ["--png=t.jpg"], "--png=t.jpg"), ("pdl_timeline.py", ["--configs=up:32x32"], "--configs=up"),
    ("pdl_timeline.py", ["--configs=mlp:32x32x2x8x0"], "--configs=mlp"), ("pdl_timeline.py", [], "needs a CUDA GPU"),
    ("pdl_timeline.py", ["--u_float32"], "--u_float32 needs --fused"),
    ("l2_read_probe.py", ["--shapes=4096x100"], "--shapes="), ("l2_read_probe.py", ["--formats=int5"], "--formats="),
    ("l2_read_probe.py", ["--stages=0"], "--stages="), ("l2_read_probe.py", ["--rows=0"], "--rows=0"),
    ("l2_read_probe.py", [], "needs a CUDA GPU"), ("gluon_pattern_probe.py", ["--configs=12x"], "--configs="),
    ("gluon_pattern_probe.py", [], "needs a CUDA GPU")])
def test_the_gpu_only_benchmarks_refuse_bad_flags_and_no_gpu_in_one_line(script, flags, named, capsys):
    if torch.cuda.is_available() and not flags:
        pytest.skip(f"a GPU is here: bench/{script} would run")
    from conftest import load_script, run_main
    error = run_main(load_script(f"bench/{script}").main, *flags)
    assert error is not None and "\n" not in error and named in error and error.startswith(f"{script}: error:"), error
    assert not capsys.readouterr().err


def test_the_pdl_timeline_measures_each_layer_from_the_end_of_the_kernel_before(tmp_path):
    """bench/pdl_timeline.py's summary on made-up stamps (ns: start, wait returned, loop done, end, multiprocessor)
    of three blocks of four layers: every layer starts 1 us before the one before it ends (PDL), waits until 0.5 us
    after, runs 10 us; the medians over blocks 2 on are those figures, and the timeline draws to a PNG."""
    from conftest import load_script
    timeline = load_script("bench/pdl_timeline.py")
    stack = [(name, None) for _ in range(3) for name in timeline.LAYERS]
    rows, end = [], 0
    for i in range(len(stack)):
        start, wait = end - 1000, end + 500
        rows.append(torch.tensor([[start + p, wait + p, wait + 8000, wait + 10000 + p, p % 3] for p in range(4)]))
        end = int(rows[-1][:, 3].max())
    summary = timeline.summarize(stack, rows)
    assert set(summary) == set(timeline.LAYERS)
    for s in summary.values():
        assert (s["start"], s["gap"], s["resident"], s["programs"], s["sms"], s["most"]) == (-1.0, 0.5, 4, 4, 3, 2)
        assert s["busiest"] == pytest.approx(2 * 8 - 0.003)  # programs 0 and 3 on multiprocessor 0
        assert s["span"] == pytest.approx(10.003) and s["loop"] == pytest.approx(7.9985)
    path = str(tmp_path / "t.png")
    timeline.plot(path, stack, {"all": rows}, 4096)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_pdl_timeline_fuses_the_norm_into_qkv_and_up_and_the_residual_into_out_and_down(monkeypatch):
    """bench/pdl_timeline.py --fused: q/k/v and up get u (bf16, or float32) and the LayerNorm of r with their own
    W @ gain, out and down their x and the residual add; without --fused every layer gets its x alone."""
    import types
    from conftest import load_script
    timeline = load_script("bench/pdl_timeline.py")
    calls = []
    monkeypatch.setattr(ops, "stream_gemv", lambda x, *args, **kwargs: calls.append((x, kwargs)))
    stack = [(name, types.SimpleNamespace(qweight=torch.zeros(4, 8, dtype=torch.int32), scale=None, zero=None, bits=4,
                                          group_size=128, in_features=k, out_features=n, zero_const=0.0,
                                          split_counters=None))
             for name, k, n in timeline.block_shapes(128)]
    xs = {k: torch.zeros(1, k) for k in (128, 512)}
    fused = dict(r=torch.ones(1, 128), u=torch.full((1, 128), 2.0), res=torch.ones(1, 128), gain=torch.ones(128),
                 wg=[torch.zeros(n) if name in ("qkv", "up") else None for name, _, n in timeline.block_shapes(128)])
    timeline.chain(stack, xs, {name: None for name in timeline.LAYERS}, "none", fused=fused)()
    for (name, layer), (x, kwargs) in zip(stack, calls):
        if name in ("qkv", "up"):
            r, wg, kind, _ = kwargs["norm"]
            assert x is fused["u"] and r is fused["r"] and wg.shape == (layer.out_features,) and kind == 1
            assert "residual" not in kwargs
        else:
            assert x is xs[layer.in_features] and kwargs["residual"] == (fused["res"], fused["gain"])
    calls.clear()
    timeline.chain(stack, xs, {name: None for name in timeline.LAYERS}, "none")()
    assert all(x is xs[layer.in_features] and "norm" not in kw and "residual" not in kw
               for (_, layer), (x, kw) in zip(stack, calls))
    made = [timeline.fusions(stack, 128, device="cpu"), timeline.fusions(stack, 128, torch.float32, device="cpu")]
    assert [f["u"].dtype for f in made] == [torch.bfloat16, torch.float32]  # the model's, --u_float32
    assert all(f["r"].dtype == torch.bfloat16 and len(f["wg"]) == len(stack) for f in made)


def test_the_launch_settings_read_from_the_environment_name_a_bad_value():
    """NANOQAT_PDL_MAX_BYTES, NANOQAT_EARLY_ROW and NANOQAT_NORM_STATS (settings to measure with) are read as integers
    at import; a value that is not one stops the import with the variable named, an empty one keeps the default."""
    code = "from quantization.kernels import ops; print(ops.PDL_MAX_BYTES, ops.EARLY_ROW, ops.NORM_STATS)"
    def run(**env):
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "NANOQAT_PDL_MAX_BYTES": "", "NANOQAT_EARLY_ROW": "",
                                   "NANOQAT_NORM_STATS": "", **env})
    assert run(NANOQAT_PDL_MAX_BYTES="8388609", NANOQAT_EARLY_ROW="0",
               NANOQAT_NORM_STATS="0").stdout.split() == ["8388609", "0", "0"]
    assert run().stdout.split() == [str(8 * 2**20), "2048", "1"]
    bad = run(NANOQAT_PDL_MAX_BYTES="8MiB")
    assert bad.returncode != 0 and "NANOQAT_PDL_MAX_BYTES='8MiB': expected an integer" in bad.stderr


def test_dependent_launch_takes_layers_of_up_to_pdl_max_bytes_of_codes(monkeypatch):
    """PDL (where the device has it) for layers of at most ops.PDL_MAX_BYTES of codes: the 6.7B shape's 4096 x 4096
    int4 layer, exactly 8 MiB, included (it decoded faster with it), its 22 MiB layers not."""
    monkeypatch.setattr(ops, "pdl_available", lambda device: True)
    monkeypatch.setattr(ops, "PDL_MAX_BYTES", 8 * 2**20)
    words = torch.empty(4096 // 8, 4096, dtype=torch.int32)  # 4096 x 4096 int4: 8 MiB
    assert ops.dependent_launch(words.device, words)
    assert not ops.dependent_launch(words.device, torch.empty(4096 // 8, 4097, dtype=torch.int32))
    assert not ops.dependent_launch(words.device, torch.empty(4096 // 8, 11008, dtype=torch.int32))
    monkeypatch.setattr(ops, "pdl_available", lambda device: False)
    assert not ops.dependent_launch(words.device, words)


def test_the_kernel_benchmark_without_a_gpu_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench/kernels.py would run")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernels.py"), "--profile=4096x11008"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "needs a CUDA GPU" in lines[0], result.stderr


def test_the_one_row_kernel_spends_about_two_instructions_per_int4_code():
    """bench/kernel_sass.py compiles the kernel for sm_90 without a GPU and counts its main loop: an AND and an FMA
    per code, plus the loads and scaling of x shared by a thread's outputs (the 2**23 formulation also needed an OR
    and a subtraction per code)."""
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_sass.py"), "--bits=4",
                             "--configs=128x8x4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = [line for line in result.stdout.splitlines() if line.startswith("| 4 |")][0].split("|")
    loop, codes, per_code = int(row[3]), int(row[4]), float(row[5])
    assert codes == 256 and loop > 2 * codes and per_code < 4.0, row
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_sass.py"), "--bits=5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1 and "--bits='5'" in lines[0], bad.stderr


def test_with_dependent_launch_the_one_row_kernel_loads_its_words_before_waiting():
    """Programmatic dependent launch (ops.dependent_launch, on Hopper): the kernel compiled for sm_90 waits for the
    earlier kernels (griddepcontrol.wait) after loading the first step's words (four for int4) and before any other
    global load (x, scales, the split-K workspace); without PDL it never waits."""
    pytest.importorskip("triton")
    from bench.kernel_sass import compile_stream, loads_before_wait
    for prefetch, loads in ((True, 4), (False, 0)):
        ptx = compile_stream(4, 32, 32, 8, True, prefetch, 90, pdl=True).asm["ptx"]
        assert loads_before_wait(ptx) == loads and "griddepcontrol.launch_dependents" in ptx
    assert loads_before_wait(compile_stream(4, 32, 32, 8, True, True, 90).asm["ptx"]) is None


def test_the_one_row_kernel_streams_its_words_past_the_caches_and_nothing_else():
    """A decode step reads each word once: the one-row kernel loads the words (BITS a block; with prefetch at the first
    step and in the loop) with evict_first, which took 4096x16384 from 18.25 to 17.9 us on an H100
    (bench/results/evict_first_h100), and x, the scales and the sums keep the default policy."""
    pytest.importorskip("triton")
    from bench.kernel_sass import compile_stream
    for bits in (2, 4, 8):
        for prefetch in (True, False):
            ptx = compile_stream(bits, 32, 32, 8, True, prefetch, 90).asm["ptx"]
            hinted = re.findall(r"ld\.global\.L1::evict_first\S*", ptx)
            assert len(hinted) == bits * (2 if prefetch else 1), (bits, prefetch, hinted)
            assert len(re.findall(r"ld\.global\S*evict", ptx)) == len(hinted)  # no other load hinted


def test_the_fused_norms_statistics_keep_the_6_7b_up_projection_at_4_programs_a_multiprocessor():
    """The LayerNorm fused into the 6.7B shape's up projection (K = 4096, 8 warps, its statistics before the loop:
    the default) compiles for sm_90 to at most 64 registers a thread, so that 4 of its programs fit a multiprocessor
    (65,536 registers) and its 512 run in one wave on 132; holding the whole row took 80 on Triton 3.6 (3 a
    multiprocessor, two waves: its span 20 -> 26 us in bench/results/step_budget_h100). No more than the epilogue's
    statistics by more than the one step of allocation (8 registers)."""
    pytest.importorskip("triton")
    from bench.kernel_sass import compile_stream, disassemble
    up = dict(norm=1, kp=4096, act=ops.ACTIVATIONS["none"])
    stats = disassemble(compile_stream(4, 32, 32, 8, True, True, 90, stats=True, **up).asm["cubin"])[1]
    epilogue = disassemble(compile_stream(4, 32, 32, 8, True, True, 90, stats=False, **up).asm["cubin"])[1]
    assert stats <= 64 and stats <= epilogue + 8, (stats, epilogue)
    # bench/kernel_sass.py --norm prints the same count (the default split and prefetch are the config's)
    script = os.path.join(ROOT, "bench", "kernel_sass.py")
    result = subprocess.run([sys.executable, script, "--bits=4", "--configs=32x32x8", "--norm=4096"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = [line for line in result.stdout.splitlines() if line.startswith("| 4 |")][0].split("|")
    assert int(row[6]) == stats, row
    bad = subprocess.run([sys.executable, script, "--norm=100"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
        "kernel_sass.py: error: --norm=100: expected 0 or a positive multiple of 32 (the row's length)"], bad.stderr


def test_kernel_sass_takes_the_split_prefetch_arch_and_show_flags():
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_sass.py"), "--bits=1",
                             "--configs=128x4x4", "--split=0", "--prefetch=0", "--arch=80", "--show"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    row = [line for line in lines if line.startswith("| 1 |")][0].split("|")
    assert int(row[4]) == 128 and float(row[5]) > 2.0, row
    shown = lines[lines.index([line for line in lines if line.startswith("| 1 |")][0]) + 1:]
    # one FMA per code, and a few more per step for the scales
    assert len(shown) == int(row[3]) and 128 <= sum(line.split()[0] == "FFMA" for line in shown) < 160, shown[:20]


def test_the_gemm_copies_its_x_tiles_ahead():
    """bench/kernel_sass.py --kernel=gemm compiles every GEMM config for sm_90 as the launcher specializes it: the
    x tiles, like the words, are copied to shared memory asynchronously (K and x's row stride keep their
    divisibility specialization; marked do_not_specialize, each K step waited for its x tile), and so are the zero
    points, read as the 32-bit words that hold them (ZWORDS; as uint8 loads some configs waited for them every K
    step): four tiles (x, words, scales, zero points) per pipeline stage."""
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "kernel_sass.py"), "--kernel=gemm",
                             "--bits=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith("| 4 |")]
    assert len(rows) >= 5 and all(int(r[3]) == 4 * int(r[2].split("x")[4]) and int(r[4]) == 0 for r in rows), rows


def test_tinygemm_is_skipped_with_its_reason_and_the_decode_run_goes_on(tmp_path):
    """bench/decode.py's tinygemm peer on a machine it cannot run on: one row saying why, the other rows kept."""
    from bench import decode
    from conftest import run_main
    from quantization.kernels.tinygemm import tinygemm_refusal
    assert "CUDA only" in tinygemm_refusal("cpu", 4, 128, 768, 768)
    out = tmp_path / "decode.md"
    assert run_main(decode.main, "--shapes=tiny", "--device=cpu", "--modes=eager", "--new_tokens=2",
                    "--vocab_size=256", "--block_size=64", "--batches=1", "--formats=W4,RB2,tinygemm,bf16",
                    f"--out={out}") is None
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert [r[1].strip() for r in rows] == ["bf16", "tinygemm", "W4", "RB2"]  # the ratios' bases first
    assert rows[1][4].strip().startswith("skipped: tinygemm runs on CUDA only"), rows[1]
    for row in rows[2:]:  # W4, and residual binary (pack_model's ResidualBinaryLinear sites)
        assert float(row[4].replace(",", "")) > 0 and row[6].strip() == "-"


def test_three_bit_codes_skip_the_unpack_configs():
    """3-bit words hold no whole codes: the unpack configs would compile to their gather twins, so a 3-bit layer's
    tuning leaves them out; other widths time both."""
    from quantization.kernels import ops
    for m in (16, 256):
        four, three = ops.candidates(m, 128, 4), ops.candidates(m, 128, 3)
        unpack = [(k, c) for k, c in four if k is ops.gemm and c[-1]]
        assert unpack and not [p for p in three if p in unpack]
        # left out for 3 bits: the GEMM's unpack configs (last field 1)
        assert three == [p for p in four if p[0] is not ops.gemm or not p[1][-1]]


def test_prefill_probe_kernels_equal_the_dequantized_product_under_the_interpreter():
    """bench/prefill_ws_probe.py --interpret: every fused-prefill probe variant (pointer and TMA loads, the operands
    swapped, with and without warp specialization, which the interpreter ignores) against the float64 product of x
    and the layer's dequantized weight, at 64 and 48 rows (masked rows), float32 x; and the int8 variant (x split into
    two int8 halves, int32 products per group), whose error is that of x as 16-bit integers per row (~3e-5); and the
    field variants (one dot per code field of a word; the project's words and field_major()'s, with split-K and, for
    fperm, two groups per K tile)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "bench/prefill_ws_probe.py", "--interpret"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "rows" not in line
            and not line.startswith("|---")]
    assert len(rows) == 38 and all(r[-1].strip() == "ok" for r in rows), result.stdout
    assert all(float(r[3]) < 1e-4 for r in rows if r[0].strip() == "i8"), result.stdout
    assert all(float(r[3]) < 1e-6 for r in rows if r[0].strip().startswith("f")), result.stdout
    assert {r[1].strip() for r in rows if r[0].strip() == "fperm"} == {"64x64x128x4x2", "64x64x128x4x2x2",
                                                                       "64x64x256x4x2"}, result.stdout


@pytest.mark.parametrize("spec", [QuantSpec("affine_quant", 4, "per_group", 128),
                                  QuantSpec("symmetric_quant", 8, "per_channel"),
                                  QuantSpec("affine_quant", 2, "per_group", 128),
                                  QuantSpec("ternary_quant", 2, "per_tensor"),
                                  QuantSpec("binary_quant", 8, "per_channel"),
                                  QuantSpec("affine_quant", 3, "per_group", 128)],
                         ids=["int4 g128", "int8 per channel", "int2 g128", "ternary", "1-bit", "int3 g128"])
def test_gluon_gemm_dequantize_arithmetic_matches_the_project_dequantize(spec):
    """The Gluon prefill GEMM's per-code arithmetic (quantization/kernels/gluon_gemm.py, _dequantize), done here in
    float64 on the project's words of every format it takes: code f of word row r (input r * 32 / B + f, B bits a
    code) put into a float's mantissa as 1 + c / 2^B, times 2^B s, plus -(2^B + z) s (z the zero points, or the
    layer's constant), each float32 operand as the kernel makes it; 3-bit codes from their planes as _plane_block
    makes them (word rows 3b, 3b + 1: the low two bits of codes 0-15, 16-31 of block b; 3b + 2: the high bits).
    Against the project's own dequantize ((c - z) s, float64): within a few float32 roundings of the bias, and the
    same bf16 weight but for rare ties and the zeros."""
    from quantization.kernels import gluon_gemm
    # seeded: with one scale a column (1-bit, 8-bit per channel) one tie moves a whole column's weights, and about
    # 1 seed in 100 then exceeds the 1e-3 rate below (0.26%, seeds 108, 117, 248 for 1-bit)
    torch.manual_seed(0)
    layer = PackedLinear.from_float(torch.randn(192, 512) * 0.02, spec)
    bits, k = layer.bits, 512
    assert bits in gluon_gemm.KERNEL_BITS and layer.qweight.shape == (k * bits // 32, 192)
    span = 2.0**bits
    zero = layer.zero.float() if layer.zero is not None else torch.full_like(layer.scale, layer.zero_const)
    scaled = layer.scale * span                                                     # float32, as the kernel's
    bias = -(zero + span) * layer.scale
    words = layer.qweight.long()                                                    # (K * bits / 32, N)
    if bits == 3:  # codes r and r + 8 of half h at once (_plane_block): a bfloat16 pair, then each a float32
        planes = words.reshape(k // 32, 3, 1, 192)                                  # (block, word, r, N)
        r = torch.arange(8)[None, :, None]
        halves = []
        for h in (0, 1):
            top = planes[:, 2] >> 16 * h
            top = (top & 0xFF) | ((top & 0xFF00) << 8)                              # code r + 8's bit at 16 + r
            lows = (planes[:, h] << (4 - 2 * r).clamp(min=0)) >> (2 * r - 4).clamp(min=0)
            tops = (top << (6 - r).clamp(min=0)) >> (r - 6).clamp(min=0)
            pair = (lows & 0x00300030) | (tops & 0x00400040) | 0x3F803F80         # (block, r, N)
            halves.append(torch.cat([(pair << 16) & 0xFFFFFFFF, pair & 0xFFFF0000], dim=1))  # codes r, then r + 8
        fields = torch.cat(halves, dim=1)                                           # (block, 32 codes, N)
        fields = torch.where(fields >= 2**31, fields - 2**32, fields)               # as int32
        # and as REG_A makes them (_register_planes): code c of j = 2b + h, low bits at 2c of row 3b + h, its high
        # bit at 16 h + c of row 3b + 2, each moved by a left and a right shift to bits 20-21 and 22
        c = torch.arange(16)[None, None, :, None]
        h = torch.arange(2)[None, :, None, None]
        low = planes[:, :2]                                                         # (block, h, 1, N)
        high = planes[:, 2:]                                                        # (block, 1, 1, N)
        at = 16 * h + c
        lows = (low << (20 - 2 * c).clamp(min=0)) >> (2 * c - 20).clamp(min=0)
        highs = (high << (22 - at).clamp(min=0)) >> (at - 22).clamp(min=0)
        registers = ((lows & 0x00300000) | (highs & 0x00400000) | 0x3F800000).reshape(k // 32, 32, 192)
        assert torch.equal(registers, fields)  # input 32 b + 16 h + c either way
    else:  # code f (bits f B .. f B + B - 1) shifted to 23 - B .. 22 (left or right), masked, the exponent put in
        shift = (torch.arange(32 // bits) * bits)[None, :, None]
        left, right = (23 - bits - shift).clamp(min=0), (shift - 23 + bits).clamp(min=0)
        fields = (((words[:, None, :] << left) >> right) & ((2**bits - 1) << (23 - bits))) | 0x3F800000
    mantissa = fields.to(torch.int32).view(torch.float32).double().reshape(k, 192)   # in input order
    group = torch.arange(k) // (layer.group_size or k)
    w = (mantissa * scaled.double()[group] + bias.double()[group]).float()          # an FMA, then float32
    ref = layer.dequantized_weight().double().T                                     # (K, N)
    s, z = layer.scale.double()[group], zero.double()[group]
    assert ((w.double() - ref).abs() <= 2.0**-22 * (2 * span + z) * s).all()
    nonzero = ref != 0  # where c = z the kernel's weight is a float32 rounding from 0 (its bias is rounded)
    assert (w.bfloat16() != ref.bfloat16())[nonzero].float().mean() < 1e-3


def _bf16_once(x):
    """float64 to bfloat16, rounded once (to nearest, ties to even): what one bfloat16 instruction's result is."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 256), exponent - 8).bfloat16()


@pytest.mark.parametrize("spec", [QuantSpec("affine_quant", 4, "per_group", 128),
                                  QuantSpec("symmetric_quant", 4, "per_group", 128),
                                  QuantSpec("affine_quant", 2, "per_group", 128),
                                  QuantSpec("ternary_quant", 2, "per_tensor"),
                                  QuantSpec("binary_quant", 8, "per_channel")],
                         ids=["int4 g128", "int4 symmetric", "int2 g128", "ternary", "1-bit"])
def test_gluon_gemm_pairs_arithmetic_matches_the_project_dequantize(spec):
    """MATH 1 (_pair_tile), done here bit for bit: codes 2i and 2i + 1 of a word by one byte permute of the word
    shifted by o - F and by o + B - F (o: code 2i's offset in its byte), masked, the exponent put in (2^(7 - F) + c in
    each bfloat16 half, F fraction bits for the zero point: 1 for 1-bit codes' 0.5), minus 2^(7 - F) + z, times the
    scale as s_hi + s_lo (a bfloat16 multiply, then a bfloat16 FMA, each rounded once). Against the project's
    dequantize ((c - z) s in float64, rounded once to bfloat16): c - z exact, and the same weight but where the
    multiply's rounding moves a near-tie (about 2^-9 of the weights of 4-bit codes, never more than one unit in the
    last place); pairs() takes the call."""
    from quantization.kernels import gluon_gemm
    torch.manual_seed(0)
    layer = PackedLinear.from_float(torch.randn(192, 512) * 0.02, spec)
    bits, k, n = layer.bits, 512, 192
    zero = layer.zero.float() if layer.zero is not None else torch.full_like(layer.scale, layer.zero_const)
    config = (256, 64, 64, 8, 5, 4, 2, 3, 2, 1)
    kind = gluon_gemm.pairs(config, bits, layer.zero is not None, layer.zero_const)
    frac = kind // 4
    assert kind % 4 == 1 and frac == (1 if bits == 1 else 0)
    # MATH 3: the same pairs without the scale (c - z, shown exact below) where one row of scales serves every input,
    # the scale after the products; MATH 1 where the scales change along the inputs
    one_row = not layer.group_size
    assert gluon_gemm.pairs(config[:9] + (3,), bits, layer.zero is not None, layer.zero_const, one_row) == (
        kind + 2 if one_row else kind)
    words = layer.qweight.long() & 0xFFFFFFFF                                      # (K * bits / 32, N), unsigned
    bit = (2 * torch.arange(16 // bits) * bits)[None, :, None]                     # code 2i's bit
    offset, byte = bit % 8, bit // 8

    def shifted(right):  # the word shifted right (left where negative), 32 bits
        return torch.where(right >= 0, words[:, None] >> right.clamp(min=0),
                           (words[:, None] << (-right).clamp(min=0)) & 0xFFFFFFFF)
    low = (shifted(offset - frac) >> 8 * byte) & 0xFF                              # the permute's byte 0
    high = (shifted(offset + bits - frac) >> 8 * byte) & 0xFF                      # its byte 2
    pair = ((low | high << 16) & ((2**bits - 1) << frac) * 0x10001) | (134 - frac) * 0x800080
    halves = torch.stack([pair & 0xFFFF, pair >> 16], dim=-1)                      # (row, i, N, h): input 2i + h
    halves = halves.permute(2, 0, 1, 3).reshape(n, k).T.to(torch.int16)           # (K, N) bfloat16 bits
    codes = halves.view(torch.bfloat16).double()                                   # 2^(7 - F) + c
    group = torch.arange(k) // (layer.group_size or k)
    s, z = layer.scale.double()[group], zero.double()[group]
    base = 2.0 ** (7 - frac)
    assert torch.equal((z + base).bfloat16().double(), z + base)                   # the zero point, exact
    d = _bf16_once(codes - (z + base)).double()                                    # sub.rn.bf16x2
    ref = layer.dequantized_weight().double().T                                    # (K, N), (c - z) s
    assert torch.equal(d * s, ref) or torch.allclose(d * s, ref, rtol=1e-6, atol=0)  # c - z exact
    s_hi = s.bfloat16().double()
    s_lo = (s - s_hi).bfloat16().double()
    w = _bf16_once(d * s_hi + _bf16_once(d * s_lo).double())                       # mul, then fma
    exact = _bf16_once(ref)
    apart = (w.view(torch.int16).int() - exact.view(torch.int16).int()).abs()
    assert apart.max() <= 1 and (apart > 0).float().mean() < 2.0**-8
    # MATH 2 (one bfloat16 scale, a measurement only): tinygemm's precision, far more weights a unit apart
    if bits == 4:
        assert (_bf16_once(d * s_hi) != exact).float().mean() > 0.03


@pytest.mark.parametrize("spec", [QuantSpec("symmetric_quant", 8, "per_channel"),
                                  QuantSpec("affine_quant", 8, "per_channel")], ids=["int8", "int8 affine"])
def test_gluon_gemm_byte_pairs_are_the_codes_minus_the_zero_point_exactly(spec):
    """MATH 3's 8-bit codes (_byte_pair_tile), done here bit for bit: byte k of a word under the exponent of 2^23 (one
    byte permute: 0x4B0000cc, the float32 2^23 + c), minus the float32 2^23 + z (one rounding, float32 arithmetic),
    the upper half taken as a bfloat16. Against the project's dequantize divided by the scale: c - z, exact (the
    lower half is zero), for every code of the layer; the scale comes after the products."""
    from quantization.kernels import gluon_gemm
    torch.manual_seed(0)
    layer = PackedLinear.from_float(torch.randn(192, 512) * 0.02, spec)
    k, n = 512, 192
    config = (256, 64, 64, 8, 5, 4, 2, 3, 2, 3)
    assert gluon_gemm.pairs(config, 8, layer.zero is not None, layer.zero_const, True) == 3
    assert gluon_gemm.pairs(config, 8, layer.zero is not None, layer.zero_const, False) == 0  # groups: float32 path
    assert gluon_gemm.pairs(config, 8, False, 127.5, True) == 0  # c - z with a half: not exact in bfloat16
    words = layer.qweight.long() & 0xFFFFFFFF                                      # (K / 4, N), unsigned
    byte = torch.arange(4)[None, :, None]
    magic = ((words[:, None] >> 8 * byte) & 0xFF) | 0x4B000000                     # (K / 4, 4, N)
    zero = layer.zero.float() if layer.zero is not None else torch.full_like(layer.scale, layer.zero_const)
    as_float = magic.to(torch.int32).view(torch.float32)
    d = as_float - (zero + 2.0**23).reshape(1, 1, n)                               # sub.f32, float32 rounding
    bits = d.view(torch.int32)
    assert (bits & 0xFFFF).eq(0).all()                                              # the upper half is all of it
    halves = (bits >> 16).to(torch.int16).view(torch.bfloat16).double()
    codes_minus_zero = halves.reshape(k, n)                                         # input 4 r + byte
    ref = layer.dequantized_weight().double().T / layer.scale.double()             # (K, N): c - z, to a rounding
    assert (ref - ref.round()).abs().max() < 1e-3 and torch.equal(codes_minus_zero, ref.round())
    assert codes_minus_zero.abs().max() > 64                                        # the wide codes are in there


def test_gluon_gemm_pairs_compile_for_sm90_where_pairs_takes_the_codes():
    """A config's tenth number, MATH 1 or 2 (dq_math): 1, 2 and 4-bit codes compile to the byte permute, the
    bfloat16x2 subtract, multiply (and, MATH 1, FMA) a pair of codes, the weight tile still stored 16 bytes at a time
    and nothing spilled; 3 and 8-bit codes, and a constant zero point with more than one fraction bit, to the
    float32 path (pairs() 0). MATH takes no REG_A config."""
    pytest.importorskip("triton")
    from quantization.kernels import gluon_gemm
    if gluon_gemm.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    config = (256, 64, 64, 8, 5, 4, 2, 3, 2)
    plain = gluon_gemm.compile_for(config).asm["ptx"]
    for math, bits, has_zero, zero in ((1, 4, True, None), (2, 4, True, None), (1, 2, True, None),
                                       (1, 2, False, 1.0), (1, 1, False, 0.5)):
        ptx = gluon_gemm.compile_for(config + (math,), bits=bits, has_zero=has_zero, zero=zero).asm["ptx"]
        pairs = 2 * 32 // 2  # two dequantize partitions, 32 codes a thread a K tile, two a pair
        assert ptx.count("sub.rn.bf16x2") == pairs and ptx.count("mul.rn.bf16x2") == pairs, (math, bits)
        assert ptx.count("fma.rn.bf16x2") == (pairs if math == 1 else 0), (math, bits)
        assert ptx.count("prmt.b32") >= pairs and not ptx.count("st.local"), (math, bits)
        assert ptx.count("st.shared.v4.b32") == plain.count("st.shared.v4.b32"), (math, bits)
    for bits, has_zero, zero in ((8, False, None), (3, True, None), (2, False, 0.25)):
        ptx = gluon_gemm.compile_for(config + (1,), bits=bits, has_zero=has_zero, zero=zero).asm["ptx"]
        assert "bf16x2" not in ptx.replace("cvt.rn.bf16x2.f32", ""), bits
    assert gluon_gemm.pairs(config + (1,), 2, False, 0.25) == 0 and gluon_gemm.pairs(config, 4, True, 0.0) == 0
    assert gluon_gemm.pairs(config + (2,), 1, False, 0.5) == 6 and gluon_gemm.pairs(config + (1,), 4, True, 0) == 1
    # MATH 3 with one row of scales (group = in_features): the subtract alone a pair, for 8-bit codes two float32
    # subtracts and three permutes, and one multiply per output of the accumulator before y is written (64 a thread
    # in the 256 x 64 tile's 8 warps); with groups, MATH 1's arithmetic
    for bits, has_zero, zero in ((8, False, 128.0), (8, True, None), (1, False, 0.5), (4, True, None)):
        ptx = gluon_gemm.compile_for(config + (3,), bits=bits, has_zero=has_zero, zero=zero, group=4096).asm["ptx"]
        pairs = 2 * 32 // 2
        assert ptx.count("mul.rn.bf16x2") == 0 and ptx.count("fma.rn.bf16x2") == 0, bits
        assert ptx.count("sub.rn.bf16x2") == (0 if bits == 8 else pairs), bits
        assert ptx.count("sub.f32") >= (2 * pairs if bits == 8 else 0) and ptx.count("mul.f32") >= 64, bits
        assert not ptx.count("st.local") and (bits != 8 or not ptx.count("fma.rn.f32")), bits
    folded = gluon_gemm.compile_for(config + (3,), bits=8, has_zero=False, zero=128.0, group=4096, split=3)
    assert folded.asm["ptx"].count("mul.f32") >= 2 * 64  # TAIL 2: both tiles a program writes are scaled
    grouped = gluon_gemm.compile_for(config + (3,), bits=4, group=128).asm["ptx"]
    assert grouped.count("fma.rn.bf16x2") == 2 * 32 // 2
    with pytest.raises(ValueError, match=r"tenth number \(MATH\) is 0 to 3 \(not with DQ_PARTS 0\), got 1 in "
                                         r"\(256, 64, 64, 4, 6, 0, 0, 3, 1, 1\)"):
        gluon_gemm.compile_for((256, 64, 64, 4, 6, 0, 0, 3, 1, 1))


def test_gluon_gemm_compiles_for_sm90_and_joins_the_many_row_candidates_only_where_it_runs():
    """gluon_gemm compiles for sm_90 without a GPU (Triton's own toolchain): warp-specialized, one wgmma per 16 inputs
    of a K tile per 64 rows, within the 227 KiB of shared memory; ops.candidates lists its configs after the others
    for more than GEMV_MAX_ROWS rows when asked, and supports() (so call_candidates) says no on the CPU."""
    pytest.importorskip("triton")
    from quantization.kernels import gluon_gemm
    if gluon_gemm.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    for config in gluon_gemm.CONFIGS[:2]:  # with SWAP, one m64 x BLOCK_M product per 16 inputs of a K tile
        kernel = gluon_gemm.compile_for(config)
        ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
        per_16 = config[1] // 64 if gluon_gemm.swapped(config) else config[0] // 64
        assert "ttg.warp_specialize" in ttgir and ptx.count("wgmma.mma_async") == per_16 * 4, config
        assert kernel.metadata.shared <= 227 * 1024
    many = ops.candidates(256, 128, 4, gluon=True)
    assert many[:-len(gluon_gemm.CONFIGS)] == ops.candidates(256, 128, 4)
    assert many[-len(gluon_gemm.CONFIGS):] == [(gluon_gemm.gluon_mm, c) for c in gluon_gemm.CONFIGS]
    assert ops.candidates(16, 128, 4, gluon=True) == ops.candidates(16, 128, 4)
    layer = PackedLinear.from_float(torch.randn(128, 256), QuantSpec("affine_quant", 4, "per_group", 128))
    x = torch.randn(300, 256, dtype=torch.bfloat16)
    assert not gluon_gemm.supports(x, layer.qweight, 4, 128, 256, layer.zero)
    assert not gluon_gemm.supports(x, layer.qweight, 4, 128, 256, None)
    assert ops.call_candidates(x, layer.qweight, layer.zero, 4, 128, 256) == ops.candidates(300, 128, 4)
    wide = PackedLinear.from_float(torch.randn(192, 256), QuantSpec("affine_quant", 4, "per_group", 128))
    with pytest.raises(ValueError, match=r"config \(256, 128, 64, 8, 4, 0, 0, 1\) takes outputs in tiles of 128, "
                                         r"got 192 outputs"):  # before anything runs, so on the CPU too
        gluon_gemm.gluon_mm(x, wide.qweight, wide.scale, wide.zero, None, 4, 4, 0.0, (256, 128, 64, 8, 4, 0, 0, 1))
    assert gluon_gemm.KERNEL_BITS == (1, 2, 3, 4, 8)
    # the first config: an eighth number 3, the weight tile as the left operand, one m64n128 instruction per 16
    # inputs of a K tile instead of one m64n64 per 64 rows, y's tile through a slot of x's ring and one TMA copy
    # (SWAP 3); the second the same with the compiler's scratch for y (SWAP 1)
    assert gluon_gemm.swapped(gluon_gemm.CONFIGS[0]) == 3 and gluon_gemm.swapped(gluon_gemm.CONFIGS[1]) == 1
    swap = gluon_gemm.compile_for(gluon_gemm.CONFIGS[0]).asm["ptx"]
    assert swap.count("wgmma.mma_async.sync.aligned.m64n128k16") == 4 and not swap.count("st.local")
    assert swap.count("cp.async.bulk.tensor.2d.global.shared") == 1  # y's one TMA store
    for bits in (3, 8):  # 3-bit planes (their own tile code) and 8-bit codes with one constant zero point compile
        for config in gluon_gemm.CONFIGS[:3]:
            kernel = gluon_gemm.compile_for(config, bits=bits, has_zero=bits == 3)
            assert kernel.asm["ptx"].count("st.shared.v4") and not kernel.asm["ptx"].count("st.local"), config
            # every shared-memory store 16 bytes wide: 8-bit codes two word rows a thread (8-byte stores before, file
            # 29 of bench/results/prefill_gluon_h100)
            stores = re.findall(r"st\.shared(\.v\d)?\.b32", kernel.asm["ptx"])
            assert stores and set(stores) == {".v4"}, (config, bits, stores)
            # 3-bit planes: each half's high bits spread by one byte permute a word (_plane_block), in each partition
            assert kernel.asm["ptx"].count("prmt.b32") == (2 * config[6] if bits == 3 else 0), (config, bits)
    with pytest.raises(ValueError, match=r"eighth number \(SWAP\) is 0 to 3, got 4"):
        gluon_gemm.compile_for((128, 64, 64, 4, 8, 4, 3, 4))
    # 8-bit codes (one scale a column, no zero points) at 8 stages: over a Hopper program's 232,448 bytes of shared
    # memory with SWAP 1's epilogue scratch; within them with y through x's ring (SWAP 3) or stored from the
    # accumulator (SWAP 2, slower on an H100 and not listed), where the row of scales takes one slot per dequantize
    # partition (not one per stage) and the unused zero points one
    eight = dict(bits=8, has_zero=False, group=4096, in_features=4096)
    assert gluon_gemm.compile_for((128, 64, 64, 4, 8, 4, 3, 1), **eight).metadata.shared > 232448
    for swap in (2, 3):
        fits = gluon_gemm.compile_for((128, 64, 64, 4, 8, 4, 3, swap), **eight)
        assert fits.metadata.shared <= 232448 and not fits.asm["ptx"].count("st.local")
    zeros = gluon_gemm.compile_for((128, 64, 64, 4, 8, 4, 3, 3), bits=8, has_zero=True, group=4096)  # affine
    assert zeros.metadata.shared <= 232448 and not zeros.asm["ptx"].count("st.local")
    per_group = gluon_gemm.compile_for((128, 64, 64, 4, 8, 4, 3, 3), bits=8, has_zero=False, group=128)
    assert per_group.metadata.shared - fits.metadata.shared >= (8 - 3) * 64 * 4  # 8 slots of scales against 3
    assert all(len(c) <= 10 and gluon_gemm.swapped(c) != 2 for c in gluon_gemm.CONFIGS)
    # the loader, the three dequantize partitions, the products: one loader warp, a ready barrier per dequantize
    # partition and slot (8 slots x 3), and a ninth number other than TAIL's 0 or 1 (it was the words' own rings,
    # measured slower and taken out) or a tenth refused in one line
    ttgir = gluon_gemm.compile_for(gluon_gemm.CONFIGS[0]).asm["ttgir"]
    assert len(re.findall(r"^\s*partition\d+\(", ttgir, flags=re.M)) == 4
    assert ttgir.count("ttng.init_barrier") == 8 * 3 + 8 + 8  # ready, w_ready, empty
    with pytest.raises(ValueError, match=r"ninth number \(TAIL\) is 0, 1 or 2 \(2 not with DQ_PARTS 0\), got 12 in "
                                         r"\(128, 64, 64, 4, 8, 4, 3, 1, "
                                         r"12\)"):
        gluon_gemm.compile_for((128, 64, 64, 4, 8, 4, 3, 1, 12))
    with pytest.raises(ValueError, match=r"tenth number \(MATH\) is 0 to 3 \(not with DQ_PARTS 0\), got 12 in "
                                         r"\(128, 64, 64, 4, 8, 4, 3, 1, 0, 12\)"):
        gluon_gemm.compile_for((128, 64, 64, 4, 8, 4, 3, 1, 0, 12))
    with pytest.raises(ValueError, match=r"a config has 7 numbers, 8 with SWAP, 9 with TAIL, 10 with MATH, got "
                                         r"\(128, 64, 64, 4, 8, 4, 3, 1, 0, 1, 5\)"):
        gluon_gemm.compile_for((128, 64, 64, 4, 8, 4, 3, 1, 0, 1, 5))
    # one row of scales (per channel) is an unsqueezed view with strides (1, 1), which a TMA descriptor refuses (a
    # GPU run's "strides must be 16-byte aligned"): handed over as the same memory with strides (n, 1)
    per_channel = PackedLinear.from_float(torch.randn(384, 512), QuantSpec("symmetric_quant", 8, "per_channel"))
    rows = gluon_gemm._rows(per_channel.scale, 384)
    assert per_channel.scale.stride() == (1, 1) and rows.stride() == (384, 1)
    assert rows.data_ptr() == per_channel.scale.data_ptr() and torch.equal(rows, per_channel.scale)
    assert gluon_gemm._rows(layer.scale, 128).stride() == layer.scale.stride() == (128, 1)


def test_gluon_gemm_register_operand_layout_is_wgmmas_own_and_its_wgmmas_overlap():
    """REG_A (a config's DQ_PARTS 0): register_layout() over (output, word row, field), flattened to (output, input),
    is Triton's own layout of wgmma's left operand (DotOperandLayout of the m64 accumulator, two bf16 a register),
    for every code width and one or two warp groups, so the reshape moves nothing (the kernel asserts it too); the
    kernel compiles for sm_90 with the operand from registers, no weight tile in shared memory and its wgmmas
    overlapping the next tile's dequantization (ptxas serializes them when one loop body's registers feed every
    wgmma: two K tiles a turn); 3-bit planes too, each thread loading the six word rows of its two outputs; the
    launcher offers these configs for every width; a config that cannot take registers is refused in one line."""
    pytest.importorskip("triton")
    from quantization.kernels import gluon_gemm
    if gluon_gemm.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    from triton._C.libtriton import gluon_ir, ir
    from triton.experimental.gluon import language as gl
    from triton.tools.disasm import get_sass
    context = ir.context()
    ir.load_dialects(context)
    builder = gluon_ir.GluonOpBuilder(context)
    for warps, outputs in ((4, 64), (8, 64), (8, 128)):  # the accumulator's layout as gluon_gemm.layouts() makes it
        rows = min(warps, outputs // 16)
        acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[rows, warps // rows],
                                        instr_shape=[16, 256 // (warps // rows), 16])
        operand = builder.to_linear_layout(gl.DotOperandLayout(operand_index=0, parent=acc, k_width=2)._to_ir(builder),
                                           [outputs, 64])
        for bits in (1, 2, 4, 8):
            mine = gluon_gemm.register_layout(warps, bits, block_n=outputs)
            per = 32 // bits
            assert mine.shape == [outputs, 64 // per, per]

            def flat(bases):  # (output, word row, field) -> (output, input = word row * per + field)
                return [[n, w * per + f] for n, w, f in bases]
            assert flat(mine.reg_bases) == operand.reg_bases, (warps, outputs, bits)
            assert flat(mine.lane_bases) == operand.lane_bases and flat(mine.warp_bases) == operand.warp_bases
            words = gluon_gemm.word_layout((256, outputs, 64, warps, 6, 0, 0, 3, 1), bits, mine)
            assert words.shape == [64 // per, outputs] and words.lane_bases[2:] == [[0, 1], [0, 2], [0, 4]]
    listed = [c for c in gluon_gemm.CONFIGS if gluon_gemm.reg_a(c)]
    # the ones that ran fastest somewhere (bench/results/prefill_regs_h100, prefill_wide_h100)
    assert listed == [(256, 64, 64, 4, 6, 0, 0, 3, 1), (256, 128, 64, 8, 4, 0, 0, 1)]
    for config in listed + [(256, 64, 64, 8, 6, 0, 0, 3, 1), (128, 64, 64, 4, 8, 0, 0, 3)]:  # and those that lost
        for bits, has_zero, group in ((4, True, 128), (8, False, 4096), (1, False, 4096), (3, True, 128)):
            kernel = gluon_gemm.compile_for(config, bits=bits, has_zero=has_zero, group=group)
            ptx = kernel.asm["ptx"]
            products = re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k16\.f32\.bf16\.bf16 \{[^}]*\}, "
                                  r"\{([^}]*)\}", ptx)
            assert products and all(len(a.split(",")) == 4 for _, a in products), config  # A: 4 registers a thread
            loop = ptx[:ptx.rindex("wgmma.mma_async")]  # up to the last product (SWAP 1's y goes through scratch after)
            assert "st.shared.v4" not in loop and not ptx.count("st.local"), config  # no weight tile stored
            # each thread's words one 32-bit load apiece (Triton 3.6 read a transposed view of the slot with 16-byte
            # loads along the wrong dimension: the wrong words, bench/results/prefill_regs_h100)
            assert "ld.shared.v" not in loop and loop.count("ld.shared.b32") >= 2 * 64 // (32 // bits), config
            # and at the words' own places: a thread's first tile's loads, from one base, lie where word_layout()'s
            # register bases reach, word row w and output n at 4 (w BLOCK_N + n) bytes of the slot;
            # 3-bit planes: the six rows of a tile, two outputs 8 apart each
            row = 4 * config[1]  # a word row's bytes
            if bits == 3:
                reach = {row * w + 4 * n for w in range(6) for n in (0, 8)}
            else:
                reach = {0}
                layout = gluon_gemm.register_layout(config[3], bits, block_n=config[1])
                for w, n in gluon_gemm.word_layout(config, bits, layout).reg_bases:
                    reach |= {r + row * w + 4 * n for r in reach}
            loads = re.findall(r"ld\.shared\.b32 \s*%r\d+, \[(%r\d+)(?:\+(\d+))?\];", ptx)
            first = [int(offset or 0) for base, offset in loads if base == loads[0][0]][:len(reach)]
            assert {o - min(first) for o in first} == reach, (config, bits, first)
            assert re.search(r"wgmma\.wait_group\.sync\.aligned 1;", ptx) and kernel.metadata.shared <= 232448
            # each tile's wgmmas left in flight while the next is dequantized: one wait for all at the end
            waits = re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x(\d)", get_sass(kernel.asm["cubin"]))
            assert waits.count("1") >= 2 and waits.count("0") == 1, (config, bits, waits)
    # the launcher offers them for every width, the 128-output tile only where 128 divides the outputs
    for bits in (1, 2, 3, 4, 8):
        for n, offered in ((None, listed), (16384, listed), (1600, listed[:1])):
            many = ops.candidates(256, 128, bits, gluon=True, n=n)
            assert [c for k, c in many if k is gluon_gemm.gluon_mm and gluon_gemm.reg_a(c)] == offered, (bits, n)
    with pytest.raises(ValueError, match=r"DQ_PARTS 0 \(registers\) takes SWAP and 64 x 64 or 128 x 64 weight tiles, "
                                         r"a warp group per 64 outputs, got \(128, 128, 64, 4, 8, 0, 0, 3\)"):
        gluon_gemm.compile_for((128, 128, 64, 4, 8, 0, 0, 3))


def test_gluon_gemm_tail_splits_only_the_last_wave_and_hands_its_parts_to_the_tile_owner():
    """TAIL (a config's ninth number): schedule() runs the column tiles of whole waves whole and splits the rest in K
    over the multiprocessors left (4096x11008 at 256 rows: 132 tiles of 256 x 64 whole, 40 in thirds); where no
    split helps, or without TAIL, every tile whole. The compiled kernel of a split: the owner waits for its parts with
    an acquire load, the others count themselves with a release add after storing theirs, 8 bytes a store; the
    launcher lists the TAIL config, and it fits every format's shared memory."""
    pytest.importorskip("triton")
    from quantization.kernels import gluon_gemm
    if gluon_gemm.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    assert gluon_gemm.schedule(1, 172, 64, 132, 1) == (132, 40, 3)        # 256 x 64 tiles on 4096x11008
    assert gluon_gemm.schedule(1, 64, 64, 132, 1) == (0, 64, 2)           # on 4096x4096: every tile in halves
    assert gluon_gemm.schedule(2, 172, 64, 132, 1) == (172, 0, 1)         # 128 x 64: 80 left, no split fills 132
    assert gluon_gemm.schedule(1, 6, 8, 132, 1) == (0, 6, 8)              # a small layer: at most its K tiles
    assert gluon_gemm.schedule(1, 172, 64, 132, 0) == (172, 0, 1)         # TAIL 0
    config = (256, 64, 64, 8, 5, 4, 2, 3, 1)
    assert config in gluon_gemm.CONFIGS and gluon_gemm.tail(config) == 1 and gluon_gemm.tail(config[:8]) == 0
    ptx = gluon_gemm.compile_for(config, split=3).asm["ptx"]
    released = ptx.count("red.global.gpu.release.add.u32") + ptx.count("atom.global.gpu.release.add.u32")  # 3.9, 3.6
    assert ptx.count("ld.global.gpu.acquire.b32") == 1 and released == 1
    assert ptx.count("atom.global.gpu.acq_rel.exch.b32") == 1  # the owner sets the counter back to 0
    assert ptx.count("st.global.v2.b32") == 32 and ptx.count("ld.global.cg.v2.b32") == 2 * 32 and "st.local" not in ptx
    assert "ld.global.gpu.acquire" not in gluon_gemm.compile_for(config).asm["ptx"]  # SPLIT 1: no hand-off
    for bits, has_zero, group in ((8, False, 4096), (8, True, 4096), (3, True, 128), (1, False, 4096)):
        kernel = gluon_gemm.compile_for(config, split=3, bits=bits, has_zero=has_zero, group=group)
        assert kernel.metadata.shared <= 232448 and "st.local" not in kernel.asm["ptx"], (bits, has_zero)


def test_gluon_gemm_tail_2_puts_the_split_parts_into_the_whole_tiles_programs():
    """TAIL 2 (FOLD): the same split as TAIL 1, none without a whole wave; its kernel stores a sibling's part and
    counts it (release), the owner waits for the count (acquire) and sums both parts before its own, and every program
    writes up to two tiles of y, each through TMA; it fits every format's shared memory without spilling. It does not
    take DQ_PARTS 0 (one line)."""
    pytest.importorskip("triton")
    from quantization.kernels import gluon_gemm
    if gluon_gemm.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    assert gluon_gemm.schedule(1, 172, 64, 132, 2) == (132, 40, 3)        # 4096x11008: 40 tiles' parts in 120 programs
    assert gluon_gemm.schedule(1, 192, 64, 132, 2) == (132, 60, 2)        # 4096x12288
    assert gluon_gemm.schedule(1, 64, 64, 132, 2) == (64, 0, 1)           # less than a wave: no program to take parts
    assert gluon_gemm.schedule(2, 80, 8, 132, 2) == (66, 14, 4)           # --check's 512x5120 at 300 rows
    config = (256, 64, 64, 8, 5, 4, 2, 3, 2)
    assert config + (3,) in gluon_gemm.CONFIGS and gluon_gemm.tail(config) == 2  # listed with MATH 3
    ptx = gluon_gemm.compile_for(config, split=3).asm["ptx"]
    released = ptx.count("red.global.gpu.release.add.u32") + ptx.count("atom.global.gpu.release.add.u32")
    assert ptx.count("ld.global.gpu.acquire.b32") == 1 and released == 1
    assert ptx.count("st.global.v2.b32") == 32 and ptx.count("ld.global.cg.v2.b32") == 2 * 32
    assert ptx.count("cp.async.bulk.tensor.2d.global.shared") == 2  # y's two tiles
    plain = gluon_gemm.compile_for(config).asm["ptx"]  # SPLIT 1: one tile, no hand-off
    assert "ld.global.gpu.acquire" not in plain and plain.count("cp.async.bulk.tensor.2d.global.shared") == 1
    for bits, has_zero, group in ((8, False, 4096), (8, True, 4096), (3, True, 128), (1, False, 4096), (4, True, 128)):
        kernel = gluon_gemm.compile_for(config, split=3, bits=bits, has_zero=has_zero, group=group)
        assert kernel.metadata.shared <= 232448 and "st.local" not in kernel.asm["ptx"], (bits, has_zero)
    with pytest.raises(ValueError, match=r"^gluon_gemm: a config's ninth number \(TAIL\) is 0, 1 or 2 \(2 not with "
                                         r"DQ_PARTS 0\), got 2 in \(256, 64, 64, 4, 6, 0, 0, 3, 2\)$"):
        gluon_gemm.compile_for((256, 64, 64, 4, 6, 0, 0, 3, 2), split=3)


def test_fold_share_gives_the_owner_less_k_by_what_its_sum_of_the_parts_costs():
    """TAIL 2's owner (its whole tile, then its part, then the siblings' parts loaded and added) takes fewer K tiles
    than its siblings, so that both end together: own + (split - 1) x part_load = a sibling's share, within a
    tile's rounding; every part at least one K tile; no load: an even split."""
    from quantization.kernels import gluon_gemm
    for k_tiles, split, load in ((64, 3, 2.5), (64, 2, 2.5), (64, 4, 1.0), (128, 3, 4.0)):
        own = gluon_gemm.fold_share(k_tiles, split, load)
        sibling = (k_tiles - own) / (split - 1)
        assert abs(own + (split - 1) * load - sibling) <= 1, (k_tiles, split, load, own)
    assert gluon_gemm.fold_share(64, 3, 2.5) == 18                      # 4096x11008: parts of 23, 23 and 18
    assert gluon_gemm.fold_share(64, 3, 0) == 21 and gluon_gemm.fold_share(64, 1) == 64
    assert gluon_gemm.fold_share(8, 4, 2.5) == 1                        # --check's 512 x 5120: siblings 2, 2, 3
    assert gluon_gemm.fold_share(4, 4, 0.0) == 1 and gluon_gemm.fold_share(5, 3, 9.0) == 1
    assert gluon_gemm.fold_share(5, 3, 0.0) <= 3                        # each sibling keeps a K tile


def test_gluon_gemm_takes_four_dequantize_partitions_of_two_warps():
    """DQ_PARTS up to 4 (2 warps each: the same 8 dequantize warps as 2 partitions of 4, twice the K tiles in
    flight): the program's warps are counted as Triton pads them (8 + the loader's and theirs, 9, in whole warp
    groups: 20, so 96 registers a thread and 72 for the dequantize threads, as the listed 2 x 4 config); it compiles
    for every format within shared memory without spilling, its ring's protocol has no deadlock or early read with 4
    partitions (bench/ring_protocol_check.py), and a ring whose phase period the kernel would get wrong (4
    partitions, STAGES 2 mod 4) is refused in one line."""
    pytest.importorskip("triton")
    from bench.ring_protocol_check import check
    from quantization.kernels import gluon_gemm
    if gluon_gemm.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    config = (256, 64, 64, 8, 5, 2, 4, 3, 2)
    assert gluon_gemm.registers(config) == (96, 72) == gluon_gemm.registers((256, 64, 64, 8, 5, 4, 2, 3, 2))
    for bits, has_zero, group in ((4, True, 128), (8, False, 4096), (3, True, 128), (1, False, 4096)):
        kernel = gluon_gemm.compile_for(config, split=3, bits=bits, has_zero=has_zero, group=group)
        assert kernel.metadata.shared <= 232448 and "st.local" not in kernel.asm["ptx"], bits
        assert len(re.findall(r"^\s*partition\d+\(", kernel.asm["ttgir"], flags=re.M)) == 5  # loader + 4
    for tiles, stages in ((9, 5), (9, 4)):
        states, problems = check(tiles, stages, stages, "one", 4)
        assert states > 1000 and not problems, (tiles, stages, problems[:1])
    def cli(*flags):  # the checker's command line
        return subprocess.run([sys.executable, "bench/ring_protocol_check.py", *flags], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=120).stdout.splitlines()
    assert cli("--tiles=5", "--stages=5", "--protocol=one", "--parts=4")[-2:] == ["one: checked up to 5 tiles",
                                                                                "no problem found"]
    # one barrier a slot is safe where the partitions divide the stages (3 and 6), not with 4: --parts reaches it
    assert cli("--tiles=8", "--stages=6", "--protocol=one_shared", "--parts=4")[-1] == "2 cases with problems"
    with pytest.raises(ValueError, match=r"^gluon_gemm: a config's seventh number \(DQ_PARTS\) is 0 to 4, and 4 takes "
                                         r"STAGES odd or a multiple of 4 \(the ring's phase period\), got \(256, 64, "
                                         r"64, 8, 6, 2, 4, 3, 2\)$"):
        gluon_gemm.compile_for((256, 64, 64, 8, 6, 2, 4, 3, 2))


def test_gluon_gemm_stamps_its_programs_only_when_asked_and_the_probe_reads_them_in_rounds():
    """gluon_mm's stamps (the kernel's DIAG bit 2): the compiled kernel reads the global timer three times (start,
    last product, y written) and its multiprocessor once, and without stamps not at all; stamps of the wrong shape
    are refused in one line before any launch. bench/prefill_ws_probe.py's timeline() puts each program in the round
    of its place on its multiprocessor (checked on stamps made up here, their figures worked out by hand)."""
    pytest.importorskip("triton")
    from conftest import load_script
    from quantization.kernels import gluon_gemm
    if gluon_gemm.gluon is None:
        pytest.skip("this Triton has no Gluon Hopper API")
    plain = gluon_gemm.compile_for(gluon_gemm.CONFIGS[0]).asm["ptx"]
    stamped = gluon_gemm.compile_for(gluon_gemm.CONFIGS[0], diag=2).asm["ptx"]
    assert "%globaltimer" not in plain and "%smid" not in plain
    assert stamped.count("%globaltimer") == 3 and stamped.count("%smid") == 1
    layer = PackedLinear.from_float(torch.randn(128, 256), QuantSpec("affine_quant", 4, "per_group", 128))
    x = torch.randn(256, 256, dtype=torch.bfloat16)  # 2 x 2 programs of 128 x 64
    with pytest.raises(ValueError, match=r"^gluon_gemm: stamps must be int64 of shape \(4, 4\), one row a program, "
                                         r"got \(3, 4\) torch.int64$"):
        gluon_gemm.gluon_mm(x, layer.qweight, layer.scale, layer.zero, None, 4, 4, 0.0, gluon_gemm.CONFIGS[0],
                            stamps=torch.zeros(3, 4, dtype=torch.int64))
    probe = load_script("bench/prefill_ws_probe.py")
    # multiprocessor 0 runs two programs in a row (the second starts at 11.5 us), 1 and 2 one each
    stamps = [[1000, 11000, 12000, 0], [12500, 22500, 23000, 0], [1200, 11200, 11700, 1], [1500, 6000, 6600, 2]]
    summary = probe.timeline(stamps)
    assert (summary["span_us"], summary["programs"], summary["multiprocessors"], summary["most"]) == (22.0, 4, 3, 2)
    first, second = summary["rounds"]
    assert first[:4] == (1, 3, 0.0, 0.2) and first[4:6] == (10.0, 10.0) and first[6:] == pytest.approx((0.6, 1.0))
    assert second == (2, 1, 11.5, 11.5, 10.0, 10.0, 0.5, 0.5)
    lines = probe.timeline_lines("4096x4096", "c", summary)
    assert lines[0] == "  timeline 4096x4096 c: span 22.0 us, 4 programs on 3 multiprocessors, at most 2 on one"
    assert len(lines) == 3 and lines[2].startswith("    round 2: 1 programs, first start 11.5 us")
    # TAIL 2's roles: 4096x11008 at 256 rows, 132 programs, the last 120 with parts (40 tiles in thirds)
    roles = probe.fold_roles(1, 132, 40, 3)
    assert roles[:12] == ["whole"] * 12 and roles[12:15] == ["sibling", "sibling", "owner"]
    assert roles.count("owner") == 40
    assert probe.fold_roles(2, 66, 14, 4).count("sibling") == 84  # two row tiles: 28 split tiles in quarters
    summary = probe.timeline(stamps, roles=["whole", "owner", "whole", "sibling"])
    assert summary["roles"][0] == ("whole", 2, 10.0, 10.0, 0.75, 1.0)
    assert summary["roles"][1][:4] == ("owner", 1, 10, 10)
    assert probe.timeline_lines("s", "c", summary)[-1] == ("    sibling: 1 programs, loop median 4.5 (longest 4.5), "
                                                           "epilogue 0.60 (longest 0.60)")


def test_prefill_probe_compiles_for_sm90_without_a_gpu_and_refuses_bad_flags():
    """bench/prefill_ws_probe.py --compile_only: a warp-specialized TMA variant compiles for sm_90 on the CPU and the
    table says it was partitioned (the Gluon variants compile gluon_gemm's kernel, tested on its own); without a GPU
    and without --compile_only it says a GPU is needed; an unknown variant or a bad --part_load is one error line."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the probe would time kernels")
    probe = [sys.executable, os.path.join(ROOT, "bench", "prefill_ws_probe.py")]
    result = subprocess.run(probe + ["--compile_only", "--variants=tma_ws", "--configs=128x64x128x4x3"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| tma_ws")]
    assert len(row) == 1 and row[0][2].strip() == "yes" and row[0][3].strip().startswith("yes"), result.stdout
    no_gpu = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert no_gpu.returncode == 0 and "GPU" in no_gpu.stdout + no_gpu.stderr
    timeline = subprocess.run(probe + ["--variants=gluon", "--timeline"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)  # each program's timeline (stamps) needs the GPU too
    assert timeline.returncode == 0 and "needs a CUDA GPU" in timeline.stdout + timeline.stderr
    bad = subprocess.run(probe + ["--compile_only", "--variants=nope"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip() == (
        "prefill_ws_probe.py: error: unknown variant 'nope'; expected some of " + ", ".join(
            ["ptr", "ptr_ws", "tma", "tma_ws", "swap", "swap_ws", "swap2", "swap2_ws", "i8", "field", "field_swap",
             "fperm", "fperm_swap", "gluon", "gluon_nomma"]))
    for value in ("x", "1,-2"):  # --part_load: TAIL 2 owners' share values, numbers >= 0
        bad = subprocess.run(probe + ["--compile_only", f"--part_load={value}"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert bad.returncode != 0 and bad.stderr.strip() == (
            f"prefill_ws_probe.py: error: --part_load: expected comma-separated numbers >= 0, got {value!r}")


def test_fused_norm_precision_compares_a_bf16_u_with_the_unfused_path(trained_fp, tmp_path):
    """bench/fused_norm_precision.py on a trained checkpoint: per LayerNorm the layer's error with the unfused bf16
    output, a float32 u and a bf16 u; a float32 u far below both bf16 ways, a bf16 u near the unfused path where
    the rows' mean is small against their spread; on rows of mean 10 and spread 1 a bf16 u is about 10 times worse
    (the factor it prints); bad input in one line."""
    from conftest import load_script
    precision = load_script("bench/fused_norm_precision.py")
    out = str(tmp_path / "t.md")
    precision.main([f"--out_dir={trained_fp}", "--tokens=1024", f"--out={out}"])
    rows = [line.split("|")[1:-1] for line in open(out).read().splitlines() if line.startswith("| h")]
    assert [r[0].strip() for r in rows] == ["h0.ln_1", "h0.ln_2", "h1.ln_1", "h1.ln_2"]
    for _, unfused, u32, u16, median, largest in ([float(v) if i else v for i, v in enumerate(r)] for r in rows):
        assert u32 < 1e-6 < unfused < 1e-2 and 0.5 < u16 / unfused < 2 and 1 <= median <= largest
    torch.manual_seed(0)
    norm, weight = torch.nn.LayerNorm(64), torch.randn(32, 64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)  # a gain of ones leaves a bf16 r's product exact
    (unfused, u32, u16), factor = precision.layer_errors(torch.randn(256, 64) + 10, norm, weight)
    assert 8 < factor.median().item() < 12 and u16 > 4 * unfused and u32 < 1e-6
    for flags, named in ((["--tokens=0"], "--tokens=0"), ([f"--out_dir={tmp_path}/none"], "not found")):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "fused_norm_precision.py"), *flags],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and named in lines[0], result.stderr


def test_the_fused_norms_input_is_bf16_for_a_bf16_stream_and_float32_otherwise():
    """residual_forward's u = output * the next norm's gain (the fused LayerNorm's input, ops.norm_input_dtype):
    bfloat16 for a bfloat16 residual stream, float32 for float32 and for float16, whose range a large residual times
    its gain would overflow (30,000 * 4); the fake tensor that torch.compile sees agrees."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    torch.manual_seed(0)
    layer = PackedLinear.from_float(torch.randn(64, 64) * 0.02, QuantSpec("affine_quant", 4, "per_group", 32))
    layer.fuse_residual(torch.full((64,), 4.0))
    for dtype, expected in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                            (torch.float32, torch.float32)):
        res = torch.full((2, 64), 30000.0, dtype=dtype)
        y, u = layer.residual_forward(torch.randn(2, 64, dtype=dtype), res)
        assert y.dtype == dtype and u.dtype == expected and torch.isfinite(u).all(), (dtype, u.dtype)
        assert torch.allclose(u.double(), y.double() * 4, rtol=1e-2)
        real = (torch.randn(2, 64, dtype=dtype), res, layer.next_gain_bits.view(torch.float32), layer.qweight,
                layer.scale, layer.zero, layer.bias, layer.split_counters)
        with FakeTensorMode() as mode:
            fake = [None if t is None else mode.from_tensor(t) for t in real]
            _, fake_u = ops.residual_matmul(*fake[:7], layer.bits, layer.group_size, layer.in_features,
                                            layer.zero_const, fake[7])
        assert fake_u.dtype == expected


PROBE_HEADER = r"""
import importlib.util, json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
spec = importlib.util.spec_from_file_location("probe", os.path.join(sys.argv[1], "bench", sys.argv[2]))
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)
torch.manual_seed(0)
"""  # an interpreted test script's start: the bench script argv[2] loaded as `probe`

READ_PROBE = PROBE_HEADER + r"""
out = []
w = torch.randint(-2**31, 2**31 - 1, (1000,), dtype=torch.int32)
for unroll in (1, 3):
    for evict in (False, True):
        per_program = 64 * unroll * 2  # two trips of UNROLL blocks of 64
        programs = -(-1000 // per_program)
        got = torch.empty(programs * 64, dtype=torch.int32)
        probe._read_flat[(programs,)](w, got, 1000, per_program, BLOCK=64, UNROLL=unroll, EVICT_FIRST=evict)
        padded = torch.cat([w, torch.zeros(programs * per_program - 1000, dtype=torch.int32)])
        expected = padded.view(programs, -1, 64)
        acc = torch.zeros(programs, 64, dtype=torch.int32)
        for i in range(expected.shape[1]):
            acc ^= expected[:, i]
        out.append([unroll, evict, torch.equal(got.view(programs, 64), acc)])
print(json.dumps(out))
"""


def test_the_read_probes_flat_kernel_reads_every_word_once():
    """bench/gemv_layout_probe.py's flat read (the ceiling the one-row kernel is measured against): with UNROLL
    blocks in flight and with evict_first, each program XORs exactly its own words, the tail masked."""
    pytest.importorskip("triton")
    rows = run_interpreted(READ_PROBE, "gemv_layout_probe.py")
    assert rows == [[u, e, True] for u in (1, 3) for e in (False, True)], rows


L2_PROBE = PROBE_HEADER + r"""
from triton.tools.tensor_descriptor import TensorDescriptor
x = torch.randn(256, 256).to(torch.bfloat16)
q = torch.randint(-2**31, 2**31 - 1, (32, 128), dtype=torch.int32)  # 4-bit words of 256 inputs, 8 rows a K tile
out = []
for words in (0, 1):
    got = torch.empty(4, dtype=torch.int32)
    probe._kernel()[(2, 2)](TensorDescriptor.from_tensor(x, [128, 64]), TensorDescriptor.from_tensor(q, [8, 64]), got,
                            256, BITS=4, WORDS=words, STAGES=2, TILE_M=128, TILE_K=64, WORD_ROWS=8, TILE_N=64)
    expected = []
    for m in range(2):
        for n in range(2):
            tiles = x.view(torch.int16)[128 * m:128 * (m + 1)].reshape(128, 4, 64)
            acc = tiles[:, 0] ^ tiles[:, 1] ^ tiles[:, 2] ^ tiles[:, 3]
            w = q[:, 64 * n:64 * (n + 1)].reshape(4, 8, 64)
            w = w[0] ^ w[1] ^ w[2] ^ w[3] if words else torch.zeros(8, 64, dtype=torch.int32)
            total = (int(acc.int().sum()) ^ int(w.long().sum())) & 0xFFFFFFFF
            expected.append(total - 2**32 if total >= 2**31 else total)
    out.append(got.tolist() == expected)
print(json.dumps(out))
"""


def test_the_l2_probe_reads_each_programs_x_rows_and_words_once():
    """bench/l2_read_probe.py's loads-only kernel (the prefill GEMM's grid, TMA copies and nothing else): each
    program of a (row tile, output tile) grid folds exactly its 128 rows of x over every K tile, and with WORDS its
    64 outputs' words, as computed here in PyTorch."""
    pytest.importorskip("triton")
    assert run_interpreted(L2_PROBE, "l2_read_probe.py") == [True, True]


def test_ring_protocol_of_the_gluon_gemm_has_no_deadlock_or_early_read_in_any_interleaving():
    """bench/ring_protocol_check.py explores every interleaving of the Gluon GEMM's partitions and TMA copies (landing
    in any order) with parity waits as the hardware's: the kernel's protocol (one ring with a `ready` barrier per
    dequantize partition and slot), the words' rings it tried (one per partition) and the words on barriers of their
    own in the one ring (`early`) finish without an unsafe step, and
    the check finds what the earlier designs got wrong (one `ready` per slot with 4 stages: a partition that skips
    the others' tiles reads a slot whose tile has not landed; one shared words ring; the weight slot with 2 stages)."""
    from bench.ring_protocol_check import check
    for tiles, stages, words, protocol in ((7, 4, 4, "one"), (7, 3, 3, "one"), (6, 3, 6, "rings"), (7, 4, 4, "early"),
                                           (7, 5, 5, "early")):
        states, problems = check(tiles, stages, words, protocol)
        assert states > 500 and not problems, (protocol, tiles, stages, words, problems[:2])
    _, problems = check(6, 4, 4, "one_shared")
    assert any("read tile 4's words from a slot holding tile -1" in p for p in problems), problems
    _, problems = check(7, 3, 4, "shared_words")
    assert any("read tile" in p for p in problems), problems
    _, problems = check(5, 2, 6, "rings")
    assert any("overwritten before its product finished" in p for p in problems), problems


def test_ncu_stalls_cuts_the_source_page_to_samples_and_barrier_waits(tmp_path):
    """bench/ncu_stalls.py on a source page in ncu's CSV form: one line per SASS instruction with its samples and
    top reasons; --waits lists each mbarrier wait with the samples of the branch after it (where they land)."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
              "# Samples", "Instructions Executed", "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]
    rows = [["0x10", "  LDC R1, c[0x0][0x28]", "3", "3", "3", "128", "0", "3", "0"],
            ["0x20", "  SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR7+0x35400], R5", "2", "2", "2", "640", "0", "2", "0"],
            ["0x30", "  @!P1  BRA 0x90", "40", "40", "40", "640", "39", "1", "39"]]
    path = tmp_path / "source.csv"
    with open(path, "w", newline="") as f:
        import csv
        csv.writer(f, quoting=csv.QUOTE_ALL).writerows([["Kernel Name", "_gluon_mm_kernel", ""], header, *rows])
    script = os.path.join(ROOT, "bench", "ncu_stalls.py")
    out = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].startswith("# 3 SASS instructions, 45 warp stall samples")
    assert lines[3].split("\t") == ["2", "640", "40", "long_sb 39, wait 1", "@!P1  BRA 0x90"]
    waits = subprocess.run([sys.executable, script, str(path), "--waits"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert waits[1].split("\t")[:4] == ["1", "640", "42", "[UR7+0x35400]"] and len(waits) == 2


def test_ncu_side_by_side_puts_the_chosen_metrics_of_each_raw_page_in_one_table(tmp_path):
    """bench/ncu_side_by_side.py on two raw pages in ncu's CSV form (a header row, a units row, a kernel's row): the
    metrics matching the patterns, one row each with its unit and each page's value, '-' where a page lacks one;
    a file that is not a raw page, or labels that do not match the files, are one error line."""
    import csv
    names = ["ID", "Kernel Name", "gpu__time_duration.sum", "sm__cycles_active.avg", "launch__grid_size",
             "smsp__warps_launched.sum"]
    pages = {"a": [names, ["", "", "us", "cycle", "", "warp"], ["0", "_gluon_mm_kernel", "78.78", "91,349.64",
                                                                  "344", "6880"]],
             "b": [names[:4], ["", "", "us", "cycle"], ["0", "nvjet_tst", "40.51", "51,036.92"]]}
    for name, rows in pages.items():
        with open(tmp_path / f"{name}.csv", "w", newline="") as f:
            csv.writer(f, quoting=csv.QUOTE_ALL).writerows([["==PROF== note"], *rows])
    script = [sys.executable, os.path.join(ROOT, "bench", "ncu_side_by_side.py")]
    out = subprocess.run(script + [str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--names=ours,cuBLAS"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["| metric | unit | ours | cuBLAS |", "|---|---|---:|---:|",
                   "| gpu__time_duration.sum | us | 78.78 | 40.51 |",
                   "| sm__cycles_active.avg | cycle | 91,349.64 | 51,036.92 |",
                   "| launch__grid_size |  | 344 | - |"]
    chosen = subprocess.run(script + [str(tmp_path / "a.csv"), "--patterns=warps"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert chosen[2:] == ["| smsp__warps_launched.sum | warp | 6880 |"]
    (tmp_path / "c.csv").write_text("Address,Source\n0x10,LDC\n")
    for args, message in ((["c.csv"], "c.csv: not an ncu raw page (no 'Kernel Name' column)"),
                          (["a.csv", "b.csv", "--names=ours"], "--names has 1 labels for 2 files"),
                          (["a.csv", "--patterns=("], "--patterns: ")):
        bad = subprocess.run(script + [a if a.startswith("--") else str(tmp_path / a) for a in args],
                             capture_output=True, text=True)
        assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr
