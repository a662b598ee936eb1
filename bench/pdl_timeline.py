"""When each program of a decode's packed layers runs, under programmatic dependent launch (PDL) or without it.

    python bench/pdl_timeline.py                     # the 6.7B shape's layers, 8 blocks, PDL off / <= 8 MiB / all
    python bench/pdl_timeline.py --modes=8mib,all --png=timeline.png --json=timeline.json
    python bench/pdl_timeline.py --modes=none --fused        # as a decode step runs them on wide models

A stack of --blocks blocks of one-row calls of the one-row kernel (ops.stream_gemv), each block the four layers of a
GPT block of width --n_embd (q/k/v fused n -> 3n, the output projection n -> n, the MLP's up n -> 4n with the GELU
and down 4n -> n), int4 g128, every layer its own random weights (so they come from memory), each with the config
the launcher chooses for its shape (or --configs). No attention or normalization between them: only the layers'
kernels, back to back in one CUDA graph, as in a compiled decode step. Modes: `none` (no PDL), `8mib` (PDL on layers
of at most 8 MiB of codes: the launcher's default, ops.PDL_MAX_BYTES), `all` (PDL on every layer).

1. Time: the median replay of the stack's graph, microseconds per block, each mode twice, alternating.
2. Timeline: the stack once more with every program writing the GPU's global timer at its start, after its wait
   for the kernels before it, after its loop and at its end (the kernel's STAMP), and its multiprocessor. Per layer
   (blocks after the first, medians over blocks): when its first program started relative to the end of the kernel
   before it (negative: launched early, under PDL), the gap from that end to its first program's wait returning,
   how long from there to its last program's end (its span), the median and the longest loop of a program, and
   how many of its programs were resident before the kernel before it ended, how many multiprocessors it ran on,
   the most programs one of them ran and the largest sum of loop times on one (an uneven spread of programs over
   the multiprocessors shows there).
--png draws every program of two blocks per mode (a line from its wait to its end, a thin one from its start);
--json writes the tables' rows and every program's stamps.
"""
import argparse
import collections
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safety import table_file_or_exit, write_text_atomic  # noqa: E402

MODES = ("none", "8mib", "all")
LAYERS = ("qkv", "out", "up", "down")


def block_shapes(n_embd):
    """(name, in, out) of one block's layers."""
    return [("qkv", n_embd, 3 * n_embd), ("out", n_embd, n_embd), ("up", n_embd, 4 * n_embd),
            ("down", 4 * n_embd, n_embd)]


def uses_pdl(mode, layer, limit):
    nbytes = layer.qweight.numel() * layer.qweight.element_size()
    return mode == "all" or (mode == "8mib" and nbytes <= limit)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_embd", type=int, default=4096, help="block width (4096: the 6.7B shape)")
    p.add_argument("--blocks", type=int, default=8, help="blocks in the stack (at least 2)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated PDL modes of {', '.join(MODES)}")
    p.add_argument("--configs", default="", help="comma-separated layer:config overrides of the launcher's choice, "
                   "a config as ops.STREAM_CONFIGS' fields joined by x (up:32x32x2x8x0: up's words not prefetched)")
    p.add_argument("--fused", action="store_true", help="the layers as a decode step runs them on wide models "
                   "(inference.fuse_norms): the LayerNorm in q/k/v and up, the residual add in out and down")
    p.add_argument("--u_float32", action="store_true", help="with --fused: u, q/k/v's and up's x, in float32 "
                   "instead of bfloat16 (the model's since it was measured faster), to measure what it costs")
    p.add_argument("--png", default="", help="write the programs' timeline here (a .png)")
    p.add_argument("--json", default="", help="write the tables' rows here (a .json)")
    args = p.parse_args(argv)
    prog = "pdl_timeline.py"  # one-line errors (argparse's p.error adds its usage)
    if args.n_embd < 32 or args.n_embd % 128:
        sys.exit(f"{prog}: error: --n_embd={args.n_embd}: expected a positive multiple of 128 (groups of 128)")
    if args.u_float32 and not args.fused:
        sys.exit(f"{prog}: error: --u_float32 needs --fused (u is the fused LayerNorm's input)")
    if args.blocks < 2:
        sys.exit(f"{prog}: error: --blocks={args.blocks}: expected at least 2 (the first has no kernel before it)")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        sys.exit(f"{prog}: error: --modes={','.join(args.modes)}: expected some of {', '.join(MODES)}")
    overrides = {}
    for item in (c for c in args.configs.split(",") if c):
        name, _, fields = item.partition(":")
        try:
            config = tuple(int(f) for f in fields.split("x"))
        except ValueError:
            config = ()
        if name not in LAYERS or not 5 <= len(config) <= 6 or min(config) < 0 or min(config[:2] + config[3:4]) < 1:
            sys.exit(f"{prog}: error: --configs={item}: expected layer:config, layer one of {', '.join(LAYERS)}, "
                     f"config 5 or 6 integers joined by x (BLOCK_N x BLOCK_B x split x warps x prefetch[ x xload])")
        overrides[name] = config
    args.configs = overrides
    if args.png and not args.png.endswith(".png"):
        sys.exit(f"{prog}: error: --png={args.png}: expected a .png path")
    for flag, path in (("--png", args.png), ("--json", args.json)):
        if path:
            table_file_or_exit(path, flag, prog)
    return args


def build(n_embd, blocks, overrides):
    from quantization.kernels import PackedLinear, ops
    from quantization.quantizers import QuantSpec
    spec = QuantSpec("affine_quant", 4, "per_group", 128)
    stack = []
    for _ in range(blocks):
        for name, k, n in block_shapes(n_embd):
            layer = PackedLinear.from_float(torch.randn(n, k, device="cuda") * 0.02, spec).cuda()
            stack.append((name, layer))
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (n_embd, 4 * n_embd)}
    configs = {}
    for name, layer in stack[:4]:
        args = (xs[layer.in_features], layer.qweight, layer.scale, layer.zero, None, layer.bits,
                ops.blocks_of(layer.group_size, layer.in_features), layer.zero_const)
        configs[name] = overrides.get(name) or ops.one_row_config(args, layer.group_size, layer.in_features,
                                                                  layer.split_counters)
    return stack, xs, configs


def fusions(stack, n_embd, u_dtype=torch.bfloat16, device="cuda"):
    """What the fused layers take besides x (--fused): the residual stream r (bf16) and u = r * gain (bf16 as the
    model has it, or float32: --u_float32) for the LayerNorm in q/k/v and up, W @ gain per layer, and the residual
    and next gain for out and down."""
    return dict(r=torch.randn(1, n_embd, device=device, dtype=torch.bfloat16),
                u=torch.randn(1, n_embd, device=device, dtype=u_dtype),
                res=torch.randn(1, n_embd, device=device, dtype=torch.bfloat16),
                gain=torch.rand(n_embd, device=device, dtype=torch.bfloat16) + 0.5,
                wg=[torch.randn(layer.out_features, device=device) if name in ("qkv", "up") else None
                    for name, layer in stack])


def chain(stack, xs, configs, mode, stamps=None, fused=None):
    """One replayable call of the whole stack under `mode`; stamps: one int64 buffer per layer, or None; fused:
    fusions(), the LayerNorm in q/k/v and up and the residual add in out and down, as ops.norm_matmul and
    ops.residual_matmul run them."""
    from quantization.kernels import ops

    def call():
        for i, (name, layer) in enumerate(stack):
            x, extra = xs[layer.in_features], {}
            if fused is not None and name in ("qkv", "up"):
                x, extra = fused["u"], dict(norm=(fused["r"], fused["wg"][i], 1, 1e-5))
            elif fused is not None:
                extra = dict(residual=(fused["res"], fused["gain"]))
            ops.stream_gemv(x, layer.qweight, layer.scale, layer.zero, None, layer.bits,
                            ops.blocks_of(layer.group_size, layer.in_features), layer.zero_const, configs[name],
                            counters=layer.split_counters, activation=ops.ACTIVATIONS["none"] if name == "up" else 0,
                            stamps=None if stamps is None else stamps[i],
                            pdl=uses_pdl(mode, layer, ops.PDL_MAX_BYTES), **extra)
    return call


def programs(layer, config):
    from quantization.kernels import ops
    tiles, split, _ = ops.stream_grid(1, layer.out_features, layer.in_features, config, layer.qweight.device)
    return tiles * split


def timeline(stack, xs, configs, mode, fused=None):
    """Each layer's (programs, 5) stamps from one replay, in ns from the stack's first stamp."""
    from quantization.kernels import ops
    stamps = [torch.full((programs(layer, configs[name]), 5), -1, device="cuda", dtype=torch.int64)
              for name, layer in stack]
    call = chain(stack, xs, configs, mode, stamps, fused)
    call()
    ms = ops.replay_time([call])  # the graph with stamps: its own time, to show what they cost
    torch.cuda.synchronize()
    for s in stamps:
        s.fill_(-1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    rows = [s.cpu() for s in stamps]
    if any((r < 0).any() for r in rows):
        sys.exit("pdl_timeline.py: error: a program wrote no stamp")
    origin = min(int(r[:, 0].min()) for r in rows)
    for r in rows:
        r[:, :4] -= origin
    return rows, ms


def sum_loops(r):
    """Each multiprocessor's summed loop time (ns) over its programs: the busiest bounds the layer when its programs
    share the multiprocessor's loads."""
    sums = collections.Counter()
    for sm, loop in zip(r[:, 4].tolist(), (r[:, 2] - r[:, 1]).tolist()):
        sums[sm] += loop
    return sums


def summarize(stack, rows):
    """Per layer name, medians over the blocks after the first (ns -> us)."""
    per = {name: [] for name in LAYERS}
    for i in range(4, len(stack)):
        name = stack[i][0]
        r, before = rows[i], rows[i - 1]
        end_before = int(before[:, 3].max())
        per[name].append(dict(
            start=(int(r[:, 0].min()) - end_before) / 1e3,
            gap=(int(r[:, 1].min()) - end_before) / 1e3,
            span=(int(r[:, 3].max()) - int(r[:, 1].min())) / 1e3,
            loop=statistics.median((r[:, 2] - r[:, 1]).tolist()) / 1e3,
            longest=int((r[:, 2] - r[:, 1]).max()) / 1e3,
            resident=int((r[:, 0] < end_before).sum()), programs=len(r),
            sms=len(set(r[:, 4].tolist())), most=max(collections.Counter(r[:, 4].tolist()).values()),
            busiest=max(sum_loops(r).values()) / 1e3))
    return {name: {key: statistics.median(v[key] for v in values) for key in values[0]}
            for name, values in per.items() if values}


def plot(path, stack, timelines, n_embd):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    colors = dict(qkv="tab:blue", out="tab:orange", up="tab:green", down="tab:red")
    fig, axes = plt.subplots(len(timelines), 1, figsize=(12, 3.2 * len(timelines)), squeeze=False)
    for ax, (mode, rows) in zip(axes[:, 0], timelines.items()):
        first = 4 * min(2, len(stack) // 4 - 2)  # two blocks after the first
        base = int(rows[first][:, 0].min())
        y = 0
        for i in range(first, first + 8):
            r = rows[i][rows[i][:, 0].argsort()]
            t = (r[:, :4] - base).double().numpy() / 1e3
            ys = range(y, y + len(r))
            color = colors[stack[i][0]]
            ax.add_collection(LineCollection([[(a, k), (b, k)] for a, b, k in zip(t[:, 0], t[:, 1], ys)],
                                             colors=color, linewidths=0.3, alpha=0.4))
            ax.add_collection(LineCollection([[(a, k), (b, k)] for a, b, k in zip(t[:, 1], t[:, 3], ys)],
                                             colors=color, linewidths=1.0))
            y += len(r)
        ax.autoscale()
        ax.set_title(f"PDL {mode}: programs of two blocks (n_embd {n_embd}); thin: start to wait, thick: wait to end",
                     fontsize=9)
        ax.set_xlabel("microseconds")
        ax.set_ylabel("program")
    handles = [plt.Line2D([], [], color=c, label=n) for n, c in colors.items()]
    axes[0, 0].legend(handles=handles, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    args = parse(argv)
    if not torch.cuda.is_available():
        sys.exit("pdl_timeline.py: error: needs a CUDA GPU")
    import triton
    from quantization.kernels import ops
    if not ops.pdl_available(torch.device("cuda")) and set(args.modes) != {"none"}:
        sys.exit("pdl_timeline.py: error: PDL needs compute capability 9 or more (and NANOQAT_PDL unset or 1); "
                 "pass --modes=none")
    torch.manual_seed(0)
    stack, xs, configs = build(args.n_embd, args.blocks, args.configs)
    fused = fusions(stack, args.n_embd, torch.float32 if args.u_float32 else torch.bfloat16) if args.fused else None
    print(f"# PDL timeline: {args.blocks} blocks of n_embd {args.n_embd}, int4 g128, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}"
          f"{'; LayerNorms and residual adds in the layers (--fused)' if fused else ''}"
          f"{'; u in float32 (--u_float32)' if args.u_float32 else ''}\n")
    print("command: python " + " ".join(sys.argv) + "\n")
    print("| layer | in x out | MiB of codes | config | programs | PDL in 8mib |\n|---|---|---:|---|---:|---|")
    for name, layer in stack[:4]:
        nbytes = layer.qweight.numel() * layer.qweight.element_size()
        print(f"| {name} | {layer.in_features}x{layer.out_features} | {nbytes / 2**20:.1f} | {configs[name]} | "
              f"{programs(layer, configs[name])} | {uses_pdl('8mib', layer, ops.PDL_MAX_BYTES)} |")
    result = dict(n_embd=args.n_embd, blocks=args.blocks, device=torch.cuda.get_device_name(), fused=args.fused,
                  u_float32=args.u_float32,
                  configs={k: list(v) for k, v in configs.items()}, times={}, timeline={})
    print("\n| mode | us per block (run 1) | us per block (run 2) |\n|---|---:|---:|")
    calls = {mode: chain(stack, xs, configs, mode, fused=fused) for mode in args.modes}
    for call in calls.values():
        call()
    times = {mode: [] for mode in args.modes}
    for _ in range(2):
        for mode, call in calls.items():
            times[mode].append(ops.replay_time([call]) * 1e3 / args.blocks)
    for mode in args.modes:
        print(f"| {mode} | {times[mode][0]:.1f} | {times[mode][1]:.1f} |")
    result["times"] = times
    timelines = {}
    print("\nPer layer, medians over blocks 2 on (us; start and gap from the end of the kernel before):\n")
    print("| mode | layer | first start | first wait returns | span (wait to last end) | loop, median | "
          "loop, longest | resident before | programs | SMs | most on one SM | busiest SM's loops |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode in args.modes:
        rows, ms = timeline(stack, xs, configs, mode, fused)
        timelines[mode] = rows
        summary = summarize(stack, rows)
        result["timeline"][mode] = dict(us_per_block_with_stamps=ms * 1e3 / args.blocks, layers=summary,
                                        stamps=[r.tolist() for r in rows])
        for name, s in summary.items():
            print(f"| {mode} | {name} | {s['start']:.1f} | {s['gap']:.1f} | {s['span']:.1f} | {s['loop']:.1f} | "
                  f"{s['longest']:.1f} | {s['resident']:.0f} | {s['programs']:.0f} | {s['sms']:.0f} | {s['most']:.0f} | "
                  f"{s['busiest']:.1f} |")
        print(f"| {mode} | (us per block with the stamps: {ms * 1e3 / args.blocks:.1f}) | | | | | | | | | | |")
    if args.png:
        plot(args.png, stack, timelines, args.n_embd)
        print(f"\nwrote {args.png}")
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
