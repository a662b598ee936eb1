"""Packed Triton kernels against cuBLAS bf16: time, share of the bandwidth floor, speedup, in one run.

    python bench/kernels.py --check        # verify every kernel against the dequantize reference, then time
    python bench/kernels.py --shapes=4096x11008 --batches=1

Shapes are `in x out` (the weight is out x in). Each time is the median replay of a CUDA graph that runs the layer
over R copies of the weights and inputs (R large enough that the copies together are 3x the L2 cache, so weights
come from memory, as in decode), divided by R; graphs also take the Python launch cost out, as a compiled decode
step does. The bandwidth floor of a call is the bytes it must move (codes, scales, zero points, activations in and
out) over the device-to-device copy bandwidth measured in the same run; "floor %" is floor / time.
"""
import argparse
import copy
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from quantization.kernels import PackedLinear  # noqa: E402
from quantization.kernels import ops  # noqa: E402
from quantization.quantizers import QuantSpec  # noqa: E402

SHAPES = ("768x768", "768x3072", "3072x768", "4096x4096", "4096x11008", "11008x4096", "8192x8192")
VARIANTS = {
    "int8 per channel": QuantSpec("symmetric_quant", 8, "per_channel"),
    "int4 g128": QuantSpec("affine_quant", 4, "per_group", 128),
    "int3 g128": QuantSpec("affine_quant", 3, "per_group", 128),
    "int2 g128": QuantSpec("affine_quant", 2, "per_group", 128),
    "ternary per tensor": QuantSpec("ternary_quant", 2, "per_tensor"),
    "1-bit per channel": QuantSpec("binary_quant", 8, "per_channel"),
}
ROTATE_BYTES = 3 * 50 * 2**20  # 3x an H100's L2
MAX_COPIES = 512


def copy_bandwidth():
    """Bytes read plus written per second of a 1 GiB device-to-device copy."""
    import triton
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    return 2 * a.numel() * 4 / (ms * 1e-3)


def buffer_bytes(module):
    return sum(t.numel() * t.element_size() for t in module.buffers())


def graph_time(calls):
    """Seconds per call: median replay of a CUDA graph of all `calls` (each already run once), over len(calls)."""
    import triton
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    return ms * 1e-3 / len(calls)


def copies(nbytes):
    return max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))


def relative_error(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def reference(x, layer):
    """float64 x @ dequant(W).T + b: the dequantize path of quantizers.py, upcast."""
    ref = x.double() @ layer.dequantized_weight().double().T
    return ref + layer.bias.double() if layer.bias is not None else ref


def check(log):
    """Every variant on odd shapes (N not a multiple of any block; K not a multiple of 32 per channel): every
    config the benchmark may pick (bf16, 1 and 16 rows: GEMV; 300 rows: GEMM), and the first config with bias and
    fp32/fp16 activations (1, 5 and 70 rows); relative error to the float64 reference."""
    torch.manual_seed(0)
    failures = 0
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
    cases = [(1, torch.bfloat16, False, "all"), (16, torch.bfloat16, False, "all"), (300, torch.bfloat16, False, "all"),
             (1, torch.float32, True, "first"), (5, torch.float16, True, "first"), (70, torch.float32, True, "first")]
    for name, spec in VARIANTS.items():
        for k, n in ((768, 1000),) + (((1000, 200),) if spec.granularity != "per_group" else ((1024, 333),)):
            weight = torch.randn(n, k, device="cuda")
            layer = PackedLinear.from_float(weight, spec, bias=torch.randn(n, device="cuda")).cuda()
            for m, dtype, bias, which in cases:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                b = layer.bias.to(dtype) if bias else None
                ref = x.double() @ layer.dequantized_weight().double().T + (b.double() if bias else 0)
                pairs = ops.candidates(m, layer.group_size)
                if which == "first":  # the first config of each kernel
                    pairs = [p for i, p in enumerate(pairs) if p[0] not in [q[0] for q in pairs[:i]]]
                blocks = layer.group_size // 32 if layer.group_size else math.ceil(k / 32)
                for kernel, config in pairs:
                    # poison: the caching allocator hands this freed NaN block to the kernel's (m, n) output
                    torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    y = kernel(x, layer.qweight, layer.scale, layer.zero, b, layer.bits, blocks, layer.zero_const,
                               config)
                    err = relative_error(y, ref)
                    ok = math.isfinite(err) and err < tolerance[dtype] and y.dtype == dtype
                    failures += not ok
                    if not ok:
                        log(f"  FAIL {name} {k}x{n} m={m} {dtype} bias={bias} {kernel.__name__} {config}: "
                            f"error {err:.2e}")
        log(f"  checked {name}")
    log(f"check: {'all passed' if not failures else f'{failures} FAILED'}")
    return failures


def bench_shape(shape, batches, bandwidth, log):
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
    for name, spec in VARIANTS.items():
        layer = PackedLinear.from_float(weight.float(), spec).cuda()
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
                             speedup=base[m] / (t * 1e6), copies=count, error=error, kernel=chosen))
            log(f"  {shape} m={m} {name}: {t * 1e6:.1f} us, {rows[-1]['speedup']:.2f}x bf16, error {error:.1e}, "
                f"{chosen}")
        del layers
    return rows


def table(rows):
    out = ["| in x out | batch | weights | time (us) | floor % | vs bf16 | error | copies | kernel, config |",
           "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['shape']} | {r['m']} | {r['variant']} | {r['us']:.1f} | {100 * r['floor']:.0f} | "
                   f"{r['speedup']:.2f} | {r['error']:.1e} | {r['copies']} | {r.get('kernel', '-')} |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated in x out shapes")
    p.add_argument("--batches", default="1,16", help="comma-separated rows of x (batch x sequence)")
    p.add_argument("--gemm_shapes", default="4096x4096,4096x11008", help="shapes also timed at --gemm_batch rows")
    p.add_argument("--gemm_batch", type=int, default=256, help="rows for the GEMM (prefill) rows")
    p.add_argument("--check", action="store_true", help="verify every kernel against the reference first")
    p.add_argument("--out", default=None, help="markdown file (default bench/results/kernels_<gpu>.md)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernels.py: error: needs a CUDA GPU (the kernels run on the CPU only under TRITON_INTERPRET=1, "
                 "which tests/test_kernels.py covers)")
    import triton
    gpu = torch.cuda.get_device_name()
    lines = []

    def log(line):
        print(line, flush=True)
        lines.append(line)

    log(f"# Packed kernels vs cuBLAS bf16: {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    if args.check and check(log):
        sys.exit("kernels.py: error: a kernel disagrees with the dequantize reference (see FAIL lines)")
    bandwidth = copy_bandwidth()
    log(f"copy bandwidth (read + write): {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for shape in args.shapes.split(","):
        rows += bench_shape(shape, [int(b) for b in args.batches.split(",")], bandwidth, log)
    gemm_rows = []
    for shape in filter(None, args.gemm_shapes.split(",")):
        gemm_rows += bench_shape(shape, [args.gemm_batch], bandwidth, log)
    result = ["", "## Decode (GEMV)", "", table(rows)]
    if gemm_rows:
        result += ["", f"## Prefill (GEMM, {args.gemm_batch} rows)", "", table(gemm_rows)]
    log("\n".join(result))
    short = "h100" if "H100" in gpu else "h200" if "H200" in gpu else gpu.split()[-1].lower()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels_{short}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
