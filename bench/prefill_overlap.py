"""Prefill of a stack of packed layers: each layer's dequantize overlapped with the matmul of the layer before it.

    python bench/prefill_overlap.py                          # 6.7B-shape blocks, 256 rows, int4 g128
    python bench/prefill_overlap.py --blocks=4 --rows=256,1024

A packed layer's prefill through cuBLAS (ops.dequant_mm) is two kernels one after the other: the dequantize of the
weight into a bf16 scratch (bound by its writes) and the matmul. A weight does not depend on the prompt, so the
dequantize of layer i+1 can run on a second stream while layer i multiplies. This times, over a stack of
--blocks blocks of the 6.7B shape (q/k/v fused 4096 -> 12288, 4096 -> 4096, 4096 -> 11008, 11008 -> 4096; each
layer its own weights), each method as the median replay of one CUDA graph of the whole stack:
- cuBLAS bf16: F.linear on bf16 weights (the peer: an unpacked model);
- dequant_mm: each layer dequantized, then multiplied, on one stream (what a packed layer does alone);
- overlapped: the next layer's dequantize on a side stream into one of --buffers scratch buffers, the matmul on the
  main stream waiting for its own; with the side stream at high priority too.
Every packed method multiplies by the same dequantized weights: "difference" is the relative difference of its last
output from dequant_mm's (0 with the same cuBLAS call; cuBLAS may choose another algorithm with fewer multiprocessors). Microseconds per layer and tokens/s of the stack; shapes are in x out.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BLOCK_SHAPES = [(4096, 12288), (4096, 4096), (4096, 11008), (11008, 4096)]


def sequential(layers, xs, config):
    from quantization.kernels import ops
    y = None
    for layer in layers:
        y = ops.dequant_mm(xs[layer.in_features], layer.qweight, layer.scale, layer.zero, None, layer.bits,
                           ops.blocks_of(layer.group_size, layer.in_features), layer.zero_const, config)
    return y


def overlapped(layers, xs, config, buffers, side):
    """The stack with layer i+1's dequantize on `side` while layer i multiplies on the current stream."""
    from quantization.kernels import ops
    main = torch.cuda.current_stream()
    ready = [torch.cuda.Event() for _ in layers]
    free = [torch.cuda.Event() for _ in layers]

    def weight(i):
        layer = layers[i]
        return buffers[i % len(buffers)][:layer.in_features * layer.out_features].view(layer.in_features,
                                                                                        layer.out_features)

    def issue(i):
        layer = layers[i]
        with torch.cuda.stream(side):
            if i >= len(buffers):  # the matmul that last read this buffer is done
                side.wait_event(free[i - len(buffers)])
            ops.dequantize(layer.qweight, layer.scale, layer.zero, layer.bits,
                           ops.blocks_of(layer.group_size, layer.in_features), layer.zero_const, weight(i), config)
            ready[i].record(side)

    side.wait_stream(main)
    issue(0)
    y = None
    for i, layer in enumerate(layers):
        if i + 1 < len(layers):
            issue(i + 1)
        main.wait_event(ready[i])
        y = torch.mm(xs[layer.in_features], weight(i))
        free[i].record(main)
    main.wait_stream(side)
    return y


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=4, help="blocks of 4 layers in the stack")
    p.add_argument("--rows", default="256", help="comma-separated prompt rows")
    p.add_argument("--buffers", default="2,3", help="comma-separated scratch buffer counts to try")
    p.add_argument("--carveouts", default="0", help="comma-separated multiprocessors that cuBLAS leaves free "
                   "(torch._C._set_sm_carveout_experimental) in the overlapped rows, for the dequantize to run on")
    args = p.parse_args(argv)
    if args.blocks < 1:
        sys.exit(f"prefill_overlap.py: error: --blocks={args.blocks}: expected at least 1")
    try:
        rows = [int(r) for r in args.rows.split(",") if r]
        counts = [int(b) for b in args.buffers.split(",") if b]
        carveouts = [int(c) for c in args.carveouts.split(",") if c]
    except ValueError:
        sys.exit("prefill_overlap.py: error: --rows, --buffers and --carveouts take comma-separated integers")
    if not rows or min(rows) < 1 or not counts or min(counts) < 2:
        sys.exit("prefill_overlap.py: error: --rows must be >= 1 and --buffers >= 2")
    if not torch.cuda.is_available():
        sys.exit("prefill_overlap.py: error: needs a CUDA GPU")
    from quantization.kernels import PackedLinear, ops
    from quantization.quantizers import QuantSpec
    torch.manual_seed(0)
    spec = QuantSpec("affine_quant", 4, "per_group", 128)
    shapes = BLOCK_SHAPES * args.blocks
    floats, layers = [], []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda") * 0.02
        layers.append(PackedLinear.from_float(w, spec).cuda())
        floats.append(w.to(torch.bfloat16))
    config = ops.DEQUANT_CONFIGS[0]
    largest = max(k * n for k, n in shapes)
    print(f"Prefill of {args.blocks} blocks of the 6.7B shape ({len(layers)} layers), int4 g128, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("command: python " + " ".join(sys.argv))
    print("\n| rows | method | us per layer | tokens/s | vs cuBLAS | difference |\n|---|---|---:|---:|---:|---:|")
    for m in rows:
        xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in {k for k, _ in shapes}}
        methods = [("cuBLAS bf16", 0, lambda: [F.linear(xs[w.shape[1]], w) for w in floats][-1]),
                   ("dequant_mm, one stream", 0, lambda: sequential(layers, xs, config))]
        for carveout in carveouts:
            for count in counts:
                buffers = [torch.empty(largest, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
                for priority, label in ((0, ""), (-1, ", side stream high priority")):
                    side = torch.cuda.Stream(priority=priority)
                    methods.append((f"overlapped, {count} buffers{label}", carveout,
                                    lambda b=buffers, s=side: overlapped(layers, xs, config, b, s)))
            if carveout:
                methods.append(("cuBLAS bf16", carveout,
                                lambda: [F.linear(xs[w.shape[1]], w) for w in floats][-1]))
        base, reference = None, None
        for name, carveout, call in methods:
            torch._C._set_sm_carveout_experimental(carveout or None)
            call()  # compiles and allocates outside the capture
            ms = ops.replay_time([call])
            base = base or ms
            error = "-"
            if not name.startswith("cuBLAS"):  # the same weights: the same output, up to cuBLAS's own choices
                torch.cuda.synchronize()
                y = call().float()
                reference = y if reference is None else reference
                error = ((y - reference).norm() / reference.norm()).item()
                if error > 1e-2:
                    sys.exit(f"prefill_overlap.py: error: {name} is {error:.1e} away from dequant_mm")
                error = f"{error:.0e}"
            if carveout:
                name += f", cuBLAS leaves {carveout} multiprocessors"
            print(f"| {m} | {name} | {ms * 1e3 / len(layers):.1f} | {m / (ms * 1e-3):,.0f} | {base / ms:.2f} | "
                  f"{error} |", flush=True)
        torch._C._set_sm_carveout_experimental(None)

if __name__ == "__main__":
    main()
