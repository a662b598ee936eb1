"""Packed Triton kernels against cuBLAS bf16 and PyTorch's own int4 kernel (tinygemm: aten._weight_int4pack_mm, the
kernel of gpt-fast and torchao, fed the int4 g128 codes): time, share of the bandwidth floor, speedups, in one run.

    python bench/kernels.py --check        # verify every kernel against the dequantize reference, then time
    python bench/kernels.py --shapes=4096x11008 --batches=1 --variants="int4 g128"
    python bench/kernels.py --profile=4096x11008   # what bounds one row: every candidate, a kernel breakdown
    python bench/kernels.py --shapes= --gemm_shapes= --binary=4096x4096   # residual binary GEMV vs cuBLAS

Shapes are `in x out` (the weight is out x in). Each time is the median replay of a CUDA graph that runs the layer
over R copies of the weights and inputs (R large enough that the copies together are 3x the L2 cache, so weights
come from memory, as in decode), divided by R; graphs also take the Python launch cost out, as a compiled decode
step does. The bandwidth floor of a call is the bytes it must move (codes, scales, zero points, activations in and
out) over the device-to-device copy bandwidth measured in the same run; "floor %" is floor / time.
"""
import argparse
import copy
import functools
import itertools
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # main() says a GPU is needed; the kernel below is only defined with Triton
    triton = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quantization.kernels import PackedLinear  # noqa: E402
from quantization.kernels import ops  # noqa: E402
from quantization.kernels.tinygemm import TinyGemmLinear, TinyGemmUnsupported  # noqa: E402
from quantization.quantizers import QuantSpec  # noqa: E402
from safety import table_file_or_exit  # noqa: E402

SHAPES = ("768x768", "768x3072", "3072x768", "4096x4096", "4096x11008", "11008x4096", "8192x8192")
VARIANTS = {
    "int8 per channel": QuantSpec("symmetric_quant", 8, "per_channel"),
    "int8 affine per channel": QuantSpec("affine_quant", 8, "per_channel"),
    "int4 g128": QuantSpec("affine_quant", 4, "per_group", 128),
    "int3 g128": QuantSpec("affine_quant", 3, "per_group", 128),
    "int2 g128": QuantSpec("affine_quant", 2, "per_group", 128),
    "ternary per tensor": QuantSpec("ternary_quant", 2, "per_tensor"),
    "1-bit per channel": QuantSpec("binary_quant", 8, "per_channel"),
}
# the names --check_kernels takes: every kernel of the launcher's candidates (the Gluon GEMM's where it imports)
KERNEL_NAMES = sorted({kernel.__name__ for m in (1, ops.GEMV_MAX_ROWS, ops.GEMV_MAX_ROWS + 1)
                       for kernel, _ in ops.candidates(m, 128, 4, gluon=ops.gluon_gemm is not None)})
TINYGEMM = "tinygemm int4 g128"  # PyTorch's int4 kernel on the int4 g128 variant's codes
ROTATE_BYTES = 3 * 50 * 2**20  # 3x an H100's L2
MAX_COPIES = 512


if triton is not None:
    @triton.jit
    def _read_words(w_ptr, out_ptr, R, N, rows_per_split, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                    STAGES: tl.constexpr):
        """Only the loads of the GEMV: (BLOCK_R, BLOCK_N) tiles of words, XOR-ed together, one result per split."""
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_R, BLOCK_N), tl.int32)
        last = tl.minimum((pid_k + 1) * rows_per_split, R)
        for r0 in tl.range(pid_k * rows_per_split, last, BLOCK_R, num_stages=STAGES):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask = (rows[:, None] < last) & (offs_n < N)[None, :]
            acc ^= tl.load(w_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
        tl.store(out_ptr + pid_k * N + offs_n, tl.sum(acc, axis=0), mask=offs_n < N)


# (BLOCK_N, BLOCK_R, programs per multiprocessor, num_warps, pipeline stages)
READ_CONFIGS = [(128, 16, 4, 4, 1), (128, 32, 4, 4, 1), (128, 64, 4, 4, 1), (128, 16, 8, 4, 1), (128, 16, 16, 4, 1),
                (256, 32, 8, 8, 1), (128, 16, 4, 4, 3), (128, 32, 8, 4, 3)]


def read_words(qweight, out, config):
    """The loads-only kernel over qweight (R, N): out[split, n] gets its split's words, XOR-ed down each of BLOCK_R
    lanes of rows, then the lanes summed (int32)."""
    block_n, block_r, per_sm, warps, stages = config
    r, n = qweight.shape
    sms = torch.cuda.get_device_properties(qweight.device).multi_processor_count if qweight.is_cuda else 1
    split = max(1, min(per_sm * sms // triton.cdiv(n, block_n), r // block_r))
    per_split = triton.cdiv(triton.cdiv(r, split), block_r) * block_r
    _read_words[(triton.cdiv(n, block_n), triton.cdiv(r, per_split))](qweight, out, r, n, per_split, BLOCK_N=block_n,
                                                                     BLOCK_R=block_r, STAGES=stages, num_warps=warps)


def profile(shape, bandwidth, log, variants, rows=1, gemm_configs=()):
    """`rows` rows of x through one layer: every candidate (kernel, config) timed as in the table, and the GEMM
    with each of `gemm_configs` (--gemm_configs: configs the launcher does not have, to try); for the fastest, the GPU
    time of each kernel it launches (torch.profiler); and, for one row, a kernel that only loads the same words, the
    bandwidth that the access pattern reaches."""
    k, n = map(int, shape.split("x"))
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda") * 0.02
    count = copies(weight.numel() * 2)
    weights = [weight.bfloat16() for _ in range(count)]
    xs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
    calls = [lambda w=w, x=x: F.linear(x, w) for w, x in zip(weights, xs)]
    for call in calls:
        call()
    what = "one row" if rows == 1 else f"{rows} rows"
    log(f"### {shape}, {what}, cuBLAS bf16: {graph_time(calls) * 1e6:.1f} us")
    del weights
    tiny, reason = tinygemm_layer(PackedLinear.from_float(weight, VARIANTS["int4 g128"]).cuda())
    if tiny is None:
        log(f"### {shape}, {what}, {TINYGEMM}: skipped: {reason}")
    else:
        tinies = [tiny] + [copy.deepcopy(tiny) for _ in range(copies(buffer_bytes(tiny)) - 1)]
        xs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in tinies]
        calls = [lambda lay=lay, x=x: lay(x) for lay, x in zip(tinies, xs)]
        for call in calls:
            call()
        log(f"### {shape}, {what}, {TINYGEMM}: {graph_time(calls) * 1e6:.1f} us")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                tinies[0](xs[0])
            torch.cuda.synchronize()
        log("  its kernels (warm L2, us): " + "; ".join(f"{e.key[:40]} {e.device_time_total / e.count:.1f}"
                                                      for e in prof.key_averages() if e.device_time_total > 0))
        del tinies
    for name in variants:
        spec = VARIANTS[name]
        layer = PackedLinear.from_float(weight, spec).cuda()
        count = copies(buffer_bytes(layer))
        layers = [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]
        xs = [torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
        blocks = layer.group_size // 32 if layer.group_size else math.ceil(k / 32)
        floor_us = (buffer_bytes(layer) + 2 * rows * (k + n)) / bandwidth * 1e6
        log(f"### {shape}, {what}, {name}: floor {floor_us:.1f} us")
        times = {}
        extra = [(ops.gemm, (c[0], c[1], ops._fit_k(c[2], layer.group_size), *c[3:])) for c in gemm_configs
                 if rows > 1]
        pairs = ops.call_candidates(xs[0], layer.qweight, layer.zero, layer.bits, layer.group_size, k) + extra
        for kernel, config in pairs:
            calls = [lambda lay=lay, x=x: ops.bind(kernel, lay.split_counters)(
                x, lay.qweight, lay.scale, lay.zero, None, lay.bits, blocks, lay.zero_const, config)
                for lay, x in zip(layers, xs)]
            try:
                for call in calls:
                    call()
            except Exception as e:  # too many registers or too much shared memory for this device
                log(f"  {kernel.__name__} {config}: does not run ({type(e).__name__}: {str(e)[:100]})")
                continue
            times[kernel.__name__, config] = t = graph_time(calls) * 1e6
            log(f"  {kernel.__name__} {config}: {t:.1f} us ({100 * floor_us / t:.0f}% of floor)")
        (kname, config), best = min(times.items(), key=lambda kv: kv[1])
        kernel = next(kern for kern, _ in pairs if kern.__name__ == kname)
        lay, x = layers[0], xs[0]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                ops.bind(kernel, lay.split_counters)(x, lay.qweight, lay.scale, lay.zero, None, lay.bits, blocks,
                                                     lay.zero_const, config)
            torch.cuda.synchronize()
        parts = [(e.key, e.device_time_total / e.count) for e in prof.key_averages() if e.device_time_total > 0]
        log(f"  fastest {kname} {config} {best:.1f} us; its kernels (warm L2, us): "
            + "; ".join(f"{key[:40]} {t:.1f}" for key, t in parts))
        if rows > 1:  # the loads-only kernel is the one-row kernel's access pattern
            del layers
            continue
        words = layer.qweight.numel() * 4
        outs = [torch.empty(layer.qweight.shape, device="cuda", dtype=torch.int32) for _ in range(count)]
        for config in READ_CONFIGS:
            for lay, out in zip(layers, outs):
                read_words(lay.qweight, out, config)
            t = graph_time([lambda lay=lay, out=out: read_words(lay.qweight, out, config)
                            for lay, out in zip(layers, outs)]) * 1e6
            log(f"  loads only {config} ({words / 2**20:.1f} MiB of words): {t:.1f} us, {words / t / 1e3:.0f} GB/s "
                f"({100 * words / bandwidth / (t * 1e-6):.0f}% of the copy bandwidth)")
        del layers


def copy_bandwidth():
    """Bytes read plus written per second of a 1 GiB device-to-device copy."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() * 4 / (ms * 1e-3)


def buffer_bytes(module):
    """Bytes of codes, scales, zero points (and bias): what a call must read."""
    return sum(t.numel() * t.element_size() for name, t in module.named_buffers() if name != "split_counters")


def graph_time(calls):
    """Seconds per call: median replay of a CUDA graph of all `calls` (each already run once), over len(calls)."""
    return ops.replay_time(calls, warmup=25, rep=200) * 1e-3


def copies(nbytes):
    return max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))


def relative_error(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def reference(x, layer):
    """float64 x @ dequant(W).T + b: the dequantize path of quantizers.py, upcast."""
    ref = x.double() @ layer.dequantized_weight().double().T
    return ref + layer.bias.double() if layer.bias is not None else ref


def check(log, variants, kernels=()):
    """Every variant on odd shapes (N not a multiple of any block; K not a multiple of 32 per channel): every
    config the benchmark may pick for 1, 16 and 300 rows (bf16), the first config of each kernel with bias and
    fp32/fp16 activations (1, 5 and 70 rows); relative error to the float64 reference, and the split-K arrival
    counters back at zero after every call. kernels: only these (names of ops' kernels; empty: all)."""
    torch.manual_seed(0)
    failures = 0
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    cases = [(1, torch.bfloat16, False, "all"), (16, torch.bfloat16, False, "all"),
             (300, torch.bfloat16, False, "all"), (1, torch.float32, True, "first"),
             (5, torch.float16, True, "first"), (70, torch.float32, True, "first")]
    for name in variants:
        spec = VARIANTS[name]
        # (and layers of 64-wide tiles for the formats the Gluon prefill GEMM takes on Hopper: 1, 2, 3, 4, 8-bit
        # codes; 512x5120 has more than one wave of 256 x 64 tiles at 300 rows, so that its TAIL configs split some)
        for k, n in ((768, 1000),) + (((1000, 200),) if spec.granularity != "per_group" else ((1024, 333),)) + (
                ((512, 384), (512, 5120)) if ops.gluon_gemm and spec.bits in ops.gluon_gemm.KERNEL_BITS else ()):
            weight = torch.randn(n, k, device="cuda")
            layer = PackedLinear.from_float(weight, spec, bias=torch.randn(n, device="cuda")).cuda()
            for m, dtype, bias, which in cases:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                b = layer.bias.to(dtype) if bias else None
                ref = x.double() @ layer.dequantized_weight().double().T + (b.double() if bias else 0)
                pairs = ops.call_candidates(x, layer.qweight, layer.zero, layer.bits, layer.group_size, k)
                if kernels:
                    pairs = [p for p in pairs if p[0].__name__ in kernels]
                if which == "first":  # the first config of each kernel
                    pairs = [p for i, p in enumerate(pairs) if p[0] not in [q[0] for q in pairs[:i]]]
                blocks = layer.group_size // 32 if layer.group_size else math.ceil(k / 32)
                for kernel, config in pairs:
                    # poison: the caching allocator hands this freed NaN block to the kernel's (m, n) output
                    torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    try:
                        y = ops.bind(kernel, layer.split_counters)(x, layer.qweight, layer.scale, layer.zero, b,
                                                                   layer.bits, blocks, layer.zero_const, config)
                    except Exception as e:  # as the launcher does: a config this device cannot run is skipped
                        if "OutOfResources" not in type(e).__name__:
                            raise
                        log(f"  skip {name} m={m} {kernel.__name__} {config}: does not run here ({e})"[:200])
                        continue
                    err = relative_error(y, ref)
                    ok = (math.isfinite(err) and err < tolerance[dtype] and y.dtype == dtype
                          and not layer.split_counters.any())
                    failures += not ok
                    if not ok:
                        log(f"  FAIL {name} {k}x{n} m={m} {dtype} bias={bias} {kernel.__name__} {config}: "
                            f"error {err:.2e}")
        log(f"  checked {name}")
    # tinygemm on the int4 g128 codes: its own bf16 scales and offsets, so the bf16 tolerance
    weight = torch.randn(1000, 768, device="cuda")
    layer = PackedLinear.from_float(weight, VARIANTS["int4 g128"], bias=torch.randn(1000, device="cuda")).cuda()
    tiny, reason = tinygemm_layer(layer)
    if tiny is None:
        log(f"  {TINYGEMM}: skipped: {reason}")
    for m in (1, 16, 300) if tiny is not None else ():
        x = torch.randn(m, 768, device="cuda", dtype=torch.bfloat16)
        err = relative_error(tiny(x), reference(x, layer))
        ok = math.isfinite(err) and err < tolerance[torch.bfloat16]
        failures += not ok
        log(f"  {'checked' if ok else 'FAIL'} {TINYGEMM} 768x1000 m={m}: error {err:.2e}")
    log(f"check: {'all passed' if not failures else f'{failures} FAILED'}")
    return failures


def tinygemm_layer(layer):
    """(TinyGemmLinear of the int4 g128 layer's codes, None) or (None, the reason tinygemm cannot run it)."""
    try:
        return TinyGemmLinear.from_packed(layer), None
    except TinyGemmUnsupported as e:
        return None, str(e)
    except RuntimeError as e:  # the op itself refused (a shape or build its checks did not foresee)
        return None, f"aten._convert_weight_to_int4pack failed: {str(e).splitlines()[0][:120]}"


def bench_shape(shape, batches, bandwidth, log, variants):
    k, n = map(int, shape.split("x"))
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    rows = []
    bf16_copies = copies(weight.numel() * 2)
    weights = [weight] + [weight.clone() for _ in range(bf16_copies - 1)]
    for m in batches:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(bf16_copies)]
        for w, x in zip(weights, xs):
            F.linear(x, w)
        t = graph_time([lambda w=w, x=x: F.linear(x, w) for w, x in zip(weights, xs)])
        nbytes = weight.numel() * 2 + 2 * m * (k + n)
        rows.append(dict(shape=shape, m=m, variant="cuBLAS bf16", us=t * 1e6, floor=nbytes / bandwidth / t,
                         speedup=1.0, copies=bf16_copies, error=0.0))
    base = {r["m"]: r["us"] for r in rows}
    del weights
    # tinygemm on the int4 g128 codes, timed right after cuBLAS: the peer every packed row is compared with
    peer = {}
    layer = PackedLinear.from_float(weight.float(), VARIANTS["int4 g128"]).cuda()
    tiny, reason = tinygemm_layer(layer)
    if tiny is None:
        log(f"  {shape} {TINYGEMM}: skipped: {reason}")
        rows += [dict(shape=shape, m=m, variant=TINYGEMM, skipped=reason) for m in batches]
    else:
        size = buffer_bytes(tiny)
        count = copies(size)
        tinies = [tiny] + [copy.deepcopy(tiny) for _ in range(count - 1)]
        for m in batches:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
            try:
                ys = [lay(x) for lay, x in zip(tinies, xs)]
            except RuntimeError as e:  # this batch or shape is not one tinygemm takes here
                reason = f"aten._weight_int4pack_mm failed: {str(e).splitlines()[0][:120]}"
                log(f"  {shape} m={m} {TINYGEMM}: skipped: {reason}")
                rows.append(dict(shape=shape, m=m, variant=TINYGEMM, skipped=reason))
                continue
            error = max(relative_error(ys[i], reference(xs[i], layer)) for i in (0, count - 1))
            t = graph_time([lambda lay=lay, x=x: lay(x) for lay, x in zip(tinies, xs)])
            peer[m] = t * 1e6
            rows.append(dict(shape=shape, m=m, variant=TINYGEMM, us=t * 1e6,
                             floor=(size + 2 * m * (k + n)) / bandwidth / t, speedup=base[m] / (t * 1e6),
                             copies=count, error=error, kernel="aten._weight_int4pack_mm"))
            log(f"  {shape} m={m} {TINYGEMM}: {t * 1e6:.1f} us, {rows[-1]['speedup']:.2f}x bf16, error {error:.1e}")
        del tinies
    for name in variants:
        layer = PackedLinear.from_float(weight.float(), VARIANTS[name]).cuda()
        size = buffer_bytes(layer)
        count = copies(size)
        layers = [layer] + [copy.deepcopy(layer) for _ in range(count - 1)]
        for m in batches:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
            ys = [lay(x) for lay, x in zip(layers, xs)]  # the first call tunes the config for this shape
            error = max(relative_error(ys[i], reference(xs[i], layers[i])) for i in (0, count - 1))
            t = graph_time([lambda lay=lay, x=x: lay(x) for lay, x in zip(layers, xs)])
            nbytes = size + 2 * m * (k + n)
            chosen = f"{ops.last_choice.get('kernel', '?')} {ops.last_choice.get('config', '')}"
            rows.append(dict(shape=shape, m=m, variant=name, us=t * 1e6, floor=nbytes / bandwidth / t,
                             speedup=base[m] / (t * 1e6), copies=count, error=error, kernel=chosen,
                             vs_peer=peer[m] / (t * 1e6) if m in peer else None))
            log(f"  {shape} m={m} {name}: {t * 1e6:.1f} us, {rows[-1]['speedup']:.2f}x bf16"
                + (f", {rows[-1]['vs_peer']:.2f}x tinygemm" if m in peer else "") + f", error {error:.1e}, {chosen}")
        del layers
    return rows


def table(rows):
    out = ["| in x out | batch | weights | time (us) | floor % | vs bf16 | vs tinygemm | error | copies | "
           "kernel, config |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "skipped" in r:
            out.append(f"| {r['shape']} | {r['m']} | {r['variant']} | skipped: {r['skipped']} | | | | | | |")
            continue
        peer = f"{r['vs_peer']:.2f}" if r.get("vs_peer") else "-"
        out.append(f"| {r['shape']} | {r['m']} | {r['variant']} | {r['us']:.1f} | {100 * r['floor']:.0f} | "
                   f"{r['speedup']:.2f} | {peer} | {r['error']:.1e} | {r['copies']} | {r.get('kernel', '-')} |")
    return "\n".join(out)


def bench_binary(shape, bandwidth, log):
    """Residual binary weights (k sign matrices, per channel) at batch 1: every config of
    binary_bitwise.CONFIGS, each checked against the layer's PyTorch bitwise path and timed as in the table,
    against cuBLAS bf16 of the same shape."""
    from quantization.binary_linear import ResidualBinaryLinear
    from quantization.kernels.binary_bitwise import CONFIGS, residual_binary_gemv, stack_terms
    from quantization.quantizers import quantize_tensor
    k, n = map(int, shape.split("x"))
    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda") * 0.02
    count = copies(n * k * 2)
    weights = [weight.bfloat16() for _ in range(count)]
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
    for w, x in zip(weights, xs):
        F.linear(x, w)
    base = graph_time([lambda w=w, x=x: F.linear(x, w) for w, x in zip(weights, xs)]) * 1e6
    del weights
    rows = [f"| {shape} | - | cuBLAS bf16 | {base:.1f} | 1.00 | - | {n * k * 2 / 2**20:.1f} |"]
    log(f"  {shape} residual binary: cuBLAS bf16 {base:.1f} us")
    for terms in (1, 2):
        spec = QuantSpec("residual_binary_quant", granularity="per_channel", binary_terms=terms)
        codes, scale, _ = quantize_tensor(weight, spec)
        module = ResidualBinaryLinear.from_quantized(codes, scale, spec).cuda()
        words, scales = stack_terms(module)
        count = copies(words.numel() * 4)
        packs = [(words, scales)] + [(words.clone(), scales.clone()) for _ in range(count - 1)]
        xs = [torch.randn(1, k, device="cuda") for _ in range(count)]
        ref = module(xs[0]).double()
        nbytes = words.numel() * 4 + scales.numel() * 4
        for (block_n, block_w, warps), transpose_x in itertools.product(CONFIGS, (True, False)):
            call = functools.partial(residual_binary_gemv, block_n=block_n, block_w=block_w, num_warps=warps,
                                     transpose_x=transpose_x)
            torch.full((n,), float("nan"), device="cuda")  # poison: the output reuses this freed block
            error = relative_error(call(xs[0], words, scales), ref)
            t = graph_time([lambda x=x, p=p: call(x, *p) for x, p in zip(xs, packs)]) * 1e6
            layout = "x bit-major" if transpose_x else "x as given"
            rows.append(f"| {shape} | {terms} | Triton bitwise BLOCK_N={block_n} BLOCK_W={block_w} warps={warps}, "
                        f"{layout} | {t:.1f} | {base / t:.2f} | {error:.1e} | {nbytes / 2**20:.1f} |")
            log(f"  {shape} residual binary k={terms} {(block_n, block_w, warps)} {layout}: {t:.1f} us, "
                f"{base / t:.2f}x bf16, error {error:.1e}")
        del packs
    return rows


def gluon_config_list(text):
    """--gluon_configs as tuples, each checked by gluon_gemm's own rules (its numbers, SWAP, TAIL, MATH, REG_A), or
    one line naming the flag and the exit."""
    from quantization.kernels import gluon_gemm
    configs = []
    for item in (c for c in text.split(",") if c):
        try:
            if not re.fullmatch(r"[1-9][0-9]*(x[0-9]+){6,9}", item):
                raise ValueError("expected 7 to 10 numbers joined by x")
            config = tuple(int(v) for v in item.split("x"))
            gluon_gemm.swapped(config), gluon_gemm.tail(config), gluon_gemm.dq_math(config), gluon_gemm.reg_a(config)
        except ValueError as e:
            sys.exit(f"kernels.py: error: --gluon_configs: {item!r}: {str(e).replace('gluon_gemm: ', '')}; expected "
                     "BLOCK_MxBLOCK_NxBLOCK_KxWARPSxSTAGESxDQ_WARPSxDQ_PARTS[xSWAP[xTAIL[xMATH]]], e.g. "
                     "256x64x64x8x5x4x2x3x2x1")
        configs.append(config)
    return configs


def stream_config_list(text):
    """--stream_configs as tuples (ops.STREAM_CONFIGS' numbers), or one line naming the flag and the exit."""
    configs = []
    for item in (c for c in text.split(",") if c):
        numbers = [int(v) for v in item.split("x")] if re.fullmatch(r"[0-9]+(x[0-9]+){4,5}", item) else []
        powers = numbers and all(v > 0 and v & (v - 1) == 0 for v in (numbers[0], numbers[1], numbers[3]))
        if not (powers and numbers[4] <= 1 and (len(numbers) == 5 or numbers[5] <= 1)):
            sys.exit(f"kernels.py: error: --stream_configs: {item!r}: expected BLOCK_NxBLOCK_BxSPLITxWARPSxPREFETCH"
                     "[xXLOAD] (BLOCK_N, BLOCK_B and WARPS powers of 2, PREFETCH 0 or 1, XLOAD 0 or 1), e.g. "
                     "32x32x2x8x1")
        configs.append(tuple(numbers))
    return configs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated in x out shapes")
    p.add_argument("--batches", default="1,16", help="comma-separated rows of x (batch x sequence)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated packed formats of the decode "
                   f"rows and --check, of: {', '.join(VARIANTS)}")
    p.add_argument("--gemm_shapes", default="4096x4096,4096x11008", help="shapes also timed at --gemm_batch rows")
    p.add_argument("--gemm_batch", type=int, default=256, help="rows for the GEMM (prefill) rows")
    p.add_argument("--gemm_variants", default=",".join(VARIANTS), help="packed formats of the prefill rows")
    p.add_argument("--binary", default="", help="comma-separated shapes: residual binary (k = 1, 2) at batch 1")
    p.add_argument("--check", action="store_true", help="verify every kernel against the reference first")
    p.add_argument("--check_kernels", default="", help="comma-separated kernels that --check verifies (default "
                   f"all), of: {', '.join(KERNEL_NAMES)}")
    p.add_argument("--profile", default="", help="comma-separated shapes: time every candidate at one row, a "
                   "kernel breakdown and a loads-only kernel, instead of the table")
    p.add_argument("--profile_rows", type=int, default=1, help="rows of x for --profile (256: prefill)")
    p.add_argument("--gemm_configs", default="", help="comma-separated BLOCK_MxBLOCK_NxBLOCK_KxWARPSxSTAGESxSPLITx"
                   "UNPACK GEMM configs that --profile (more than one row) also times, besides the launcher's")
    p.add_argument("--gluon_configs", default="", help="comma-separated Gluon prefill GEMM configs (BLOCK_MxBLOCK_Nx"
                   "BLOCK_KxWARPSxSTAGESxDQ_WARPSxDQ_PARTS[xSWAP[xTAIL[xMATH]]], gluon_gemm.CONFIGS' "
                   "numbers) offered to --check and the launcher in this run besides the listed ones: configs to "
                   "measure before listing them")
    p.add_argument("--stream_configs", default="", help="comma-separated one-row kernel configs (BLOCK_NxBLOCK_Bx"
                   "SPLITxWARPSxPREFETCH[xXLOAD], ops.STREAM_CONFIGS' numbers) offered to --check and the launcher "
                   "in this run besides the listed ones")
    p.add_argument("--out", default=None, help="markdown file (default bench/results/kernels_<gpu>.md, with "
                   "--profile kernels_profile_<gpu>.md)")
    args = p.parse_args(argv)
    if args.profile_rows < 1:
        sys.exit(f"kernels.py: error: --profile_rows={args.profile_rows}: expected a positive number of rows")
    variants, gemm_variants = ([v for v in value.split(",") if v] for value in (args.variants, args.gemm_variants))
    for flag, chosen in (("variants", variants), ("gemm_variants", gemm_variants)):
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            sys.exit(f"kernels.py: error: --{flag}: unknown variant {unknown[0]!r}; expected some of: {', '.join(VARIANTS)}")
    check_kernels = [k for k in args.check_kernels.split(",") if k]
    unknown = [k for k in check_kernels if k not in KERNEL_NAMES]
    if unknown:
        sys.exit(f"kernels.py: error: --check_kernels: unknown kernel {unknown[0]!r}; expected some of: "
                 f"{', '.join(KERNEL_NAMES)}")
    for flag in ("shapes", "gemm_shapes", "binary", "profile"):  # in x out, positive integers
        bad = [s for s in getattr(args, flag).split(",") if s and not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", s)]
        if bad:
            sys.exit(f"kernels.py: error: --{flag}={getattr(args, flag)}: {bad[0]!r} is not a shape; expected in x out, e.g. 4096x11008")
    gemm_configs = [tuple(int(v) for v in c.split("x")) for c in args.gemm_configs.split(",")
                    if re.fullmatch(r"[1-9][0-9]*(x[0-9]+){6}", c)]
    if len(gemm_configs) != len([c for c in args.gemm_configs.split(",") if c]) or any(
            c[0] < 16 or c[3] < 1 or c[4] < 1 or c[6] > 1 for c in gemm_configs):
        sys.exit(f"kernels.py: error: --gemm_configs={args.gemm_configs}: expected BLOCK_MxBLOCK_NxBLOCK_KxWARPSx"
                 "STAGESxSPLITxUNPACK, e.g. 128x128x64x4x3x4x1 (BLOCK_M at least 16, UNPACK 0 or 1)")
    gluon_configs = gluon_config_list(args.gluon_configs)
    stream_configs = stream_config_list(args.stream_configs)
    if args.out:
        table_file_or_exit(args.out, "--out", "kernels.py")
    if not torch.cuda.is_available():
        sys.exit("kernels.py: error: needs a CUDA GPU (the kernels run on the CPU only under TRITON_INTERPRET=1, "
                 "which tests/test_kernels.py covers)")
    gpu = torch.cuda.get_device_name()
    short = "h100" if "H100" in gpu else "h200" if "H200" in gpu else gpu.split()[-1].lower()
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    lines = []
    out = args.out or os.path.join(results, f"kernels_profile_{short}.md" if args.profile else f"kernels_{short}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    open(out, "w").close()

    def log(line):  # each line also goes to the file as it is measured: a run cut short keeps what it printed
        print(line, flush=True)
        lines.append(line)
        with open(out, "a") as f:
            f.write(line + "\n")

    log(f"# Packed kernels vs cuBLAS bf16 and tinygemm: {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    log("command: python bench/kernels.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if gluon_configs and ops.gluon_gemm is not None:  # this run's list, after the listed configs
        ops.gluon_gemm.CONFIGS = list(ops.gluon_gemm.CONFIGS) + [c for c in gluon_configs
                                                                 if c not in ops.gluon_gemm.CONFIGS]
        os.environ["NANOQAT_KERNEL_CACHE"] = "off"  # a stored choice (keyed by the source, not this list) not reused
        log(f"Gluon configs offered besides the listed ones: {gluon_configs}; stored kernel choices not used")
    if stream_configs:  # the same, for the one-row kernel
        ops.STREAM_CONFIGS = list(ops.STREAM_CONFIGS) + [c for c in stream_configs if c not in ops.STREAM_CONFIGS]
        os.environ["NANOQAT_KERNEL_CACHE"] = "off"
        log(f"one-row configs offered besides the listed ones: {stream_configs}; stored kernel choices not used")
    if args.check and check(log, variants, check_kernels):
        sys.exit("kernels.py: error: a kernel disagrees with the dequantize reference (see FAIL lines)")
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s")
    if args.profile:
        for shape in args.profile.split(","):
            profile(shape, bandwidth, log, variants, args.profile_rows, gemm_configs)
        return print(f"wrote {out}")  # log wrote every line
    result = []

    def write():  # after every section: a run stopped at a time limit keeps what it measured
        with open(out, "w") as f:
            f.write("\n".join(lines + result) + "\n")

    rows = []
    for shape in filter(None, args.shapes.split(",")):
        rows += bench_shape(shape, [int(b) for b in args.batches.split(",")], bandwidth, log, variants)
        write()
    if rows:
        result += ["", "## Decode (GEMV)", "", table(rows)]
    gemm_rows = []
    for shape in filter(None, args.gemm_shapes.split(",")):
        gemm_rows += bench_shape(shape, [args.gemm_batch], bandwidth, log, gemm_variants)
        write()
    if gemm_rows:
        result += ["", f"## Prefill (GEMM, {args.gemm_batch} rows)", "", table(gemm_rows)]
    binary_rows = []
    for shape in filter(None, args.binary.split(",")):
        binary_rows += bench_binary(shape, bandwidth, log)
        write()
    if binary_rows:
        result += ["", "## Residual binary, batch 1 (per channel)", "",
                   "| in x out | terms | path | time (us) | vs bf16 | error | weight MiB |",
                   "|---|---:|---|---:|---:|---:|---:|"] + binary_rows
    print("\n".join(result))
    write()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
