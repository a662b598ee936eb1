"""Decode throughput and peak memory: bf16 against packed weights (W8, W4, W2, ternary, W1, RB2) and against PyTorch's
own int4 kernel (tinygemm), eager and compiled, batch 1 and 16, for GPT-2 124M, GPT-2 XL and 6.7B shapes with
random weights, in one run.

    python bench/decode.py                                        # everything (GPU; longer than 10 minutes)
    python bench/decode.py --shapes=gpt2_124m,gpt2_6.7b --formats=bf16 --batches=1
    python bench/decode.py --shapes=tiny --device=cpu --modes=eager --new_tokens=8   # a smoke run anywhere

Each row generates --new_tokens tokens greedily after a --prompt_len token prompt through generate.generate (prefill,
then one-token steps against the preallocated KV cache; `compiled` captures the torch.compile'd step, sampling
included, as one CUDA graph that feeds itself, replayed once per token (`compiled_whole`: the step compiled as one
graph, not one block for all layers); `reduce_overhead` runs the step under
torch.compile(mode="reduce-overhead"), one call per token), after one warm-up generation; tokens/s counts the batch's
new tokens over the whole timed generation, prefill included. The bandwidth floor is the weight bytes read per
step over the device-to-device copy bandwidth measured in the same run; "of floor" is tokens/s at batch 1 over
that floor's tokens/s. Packed formats need quantization.kernels.pack_model (RTN onto PackedLinear); on GPT-2 XL,
whose width 1600 is not a multiple of 128, W4 and W2 take groups of 64. `tinygemm` is W4's codes (the same RTN
grid and groups) multiplied by aten._weight_int4pack_mm (quantization/kernels/tinygemm.py, bf16 scales and
offsets), the kernel of gpt-fast and torchao's int4 weight-only: a row says "skipped" with the reason where it
cannot run, and the run goes on. Rows run bf16 first, then tinygemm, then ours, whatever the order of --formats,
so that "vs tinygemm" is known for each packed row. RB2 is residual binary with two terms (two sign matrices and
their scales per output; quantization/binary_linear.py), one row of x through its Triton GEMV
(kernels/binary_bitwise.py), several (the prompt, batch 16) through its dequantized weight and cuBLAS. Each
attention layer computes q, k and v as one layer (inference.fuse_qkv, as sample.py does); --qkv=fused,separate adds
the rows of three layers beside them. A packed model's MLP leaves its GELU to the up projection's kernel
(inference.fuse_gelu, as sample.py does); --gelu=fused,separate adds the rows with a GELU kernel of its own (bf16 and
tinygemm have no such fusion: their rows are the same either way, and run once). At batch 1 a packed model's
blocks also leave their LayerNorms to the q/k/v and up projections' kernels and their residual adds to the output
and down projections' (inference.fuse_norms, which sample.py runs on models of width 1024 or more, where it
helped; here at every width); --norms=fused,separate adds the rows without. A one-token step's attention writes
the new k and v into the cache and attends over its valid positions in one kernel
(quantization/kernels/attention.py, every format, where its programs read at most 32 KiB of the cache:
attention.worth_it; elsewhere the kernel rows run SDPA too); --attention=kernel,sdpa adds the rows that write the
cache and call F.scaled_dot_product_attention over all of it, as before that kernel.
"""
import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generate import generate, reset_compiled  # noqa: E402
from inference import fuse_gelu, fuse_norms, fuse_qkv  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from safety import table_file_or_exit, write_text_atomic  # noqa: E402

SHAPES = {
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2_xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "gpt2_6.7b": dict(n_layer=32, n_head=32, n_embd=4096),
    "tiny": dict(n_layer=2, n_head=2, n_embd=128),
}
# QuantSpec fields of each packed format (None: the bf16 model itself)
FORMATS = {
    "bf16": None,
    "W8": dict(method="symmetric_quant", bits=8, granularity="per_channel"),
    "W4": dict(method="affine_quant", bits=4, granularity="per_group", group_size=128),
    "W2": dict(method="affine_quant", bits=2, granularity="per_group", group_size=128),
    "ternary": dict(method="ternary_quant", granularity="per_channel"),
    "W1": dict(method="binary_quant", granularity="per_channel"),
    "RB2": dict(method="residual_binary_quant", granularity="per_channel", binary_terms=2),
    "tinygemm": dict(method="affine_quant", bits=4, granularity="per_group", group_size=128),
}
PEER = "tinygemm"  # the format every packed row is also compared with
# generate()'s compile argument of each mode. compiled: the step, compiled one block for all layers, captured
# once as a CUDA graph that feeds itself (one replay per token); compiled_whole: the same graph of the whole step
# compiled as one; compiled_tuned: compiled with inductor's coordinate-descent tuning of its generated kernels (as
# gpt-fast does); reduce_overhead: torch.compile's own CUDA graphs over the whole step, one call per token
MODES = {"eager": False, "compiled": True, "compiled_whole": "whole", "compiled_tuned": True,
         "reduce_overhead": "reduce-overhead"}


def parse_list(value, allowed, flag):
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        sys.exit(f"decode.py: error: --{flag}={value}: expected a comma-separated subset of {', '.join(allowed)}")
    return items


def build(shape, fmt, device, dtype, vocab_size, block_size, qkv="fused", gelu="fused", norms="fused"):
    """A random-weight model of the shape, in dtype, its linears packed for a packed format, its q, k and v joined
    into one layer (inference.fuse_qkv, as sample.py does) unless qkv is "separate", its GELU applied by packed up
    projections (inference.fuse_gelu) unless gelu is "separate", its LayerNorms and residual adds taken into the
    packed kernels at batch 1 (inference.fuse_norms) unless norms is "separate"."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPT(GPTConfig(**SHAPES[shape], vocab_size=vocab_size, block_size=block_size, bias=True))
    finally:
        torch.set_default_dtype(default)
    model.eval()
    spec = format_spec(shape, fmt)
    if spec is not None:
        from quantization.kernels import pack_model
        model = pack_model(model, spec)
    if qkv == "fused":
        fuse_qkv(model)
    if fmt == PEER:  # the W4 codes, through PyTorch's int4 kernel (raises TinyGemmUnsupported with the reason)
        from quantization.kernels.tinygemm import tinygemm_model
        model = tinygemm_model(model)
    if gelu == "fused":  # after tinygemm's conversion: its layers take no activation
        fuse_gelu(model)
    if norms == "fused":  # packed layers only (bf16 and tinygemm fuse nothing); at every width, to measure it
        fuse_norms(model, min_width=0)
    return model


def format_spec(shape, fmt):
    """The QuantSpec of a packed format for a shape: a group that does not divide the width (GPT-2 XL's 1600 by
    128) is halved until it does."""
    if FORMATS[fmt] is None:
        return None
    from quantization.quantizers import QuantSpec
    spec = QuantSpec(**FORMATS[fmt])
    while spec.granularity == "per_group" and SHAPES[shape]["n_embd"] % spec.group_size:
        spec = QuantSpec(**{**FORMATS[fmt], "group_size": spec.group_size // 2})
    return spec


def format_label(shape, fmt, qkv="fused", gelu="fused", norms="fused", attn="kernel"):
    spec = format_spec(shape, fmt)
    changed = spec is not None and spec.granularity == "per_group" and spec.group_size != FORMATS[fmt]["group_size"]
    label = f"{fmt} (group {spec.group_size})" if changed else fmt
    label = label if qkv == "fused" else f"{label}, q/k/v apart"
    label = label if gelu == "fused" else f"{label}, GELU apart"
    label = label if attn == "kernel" else f"{label}, attention sdpa"
    return label if norms == "fused" or FORMATS[fmt] is None or fmt == PEER else f"{label}, norms apart"


def weight_bytes(model):
    """Bytes of weights read by one decode step: every parameter and buffer but the position table (one row is
    read), the causal masks and the packed layers' split-K counters."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # a tensor and its views count once
                for name, t in list(model.named_parameters()) + list(model.named_buffers())
                if not name.endswith("causal") and "kv_cache" not in name and "split_counters" not in name}
    return sum(storages.values()) - model.transformer.wpe.weight.numel() * model.transformer.wpe.weight.element_size()


def copy_bandwidth(device):
    """Bytes per second of a large device-to-device copy (read plus write)."""
    if not device.startswith("cuda"):
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 20
    del src, dst
    return 2 * (1 << 30) / seconds


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, batch, mode, args):
    compiled = MODES[mode]
    torch._inductor.config.coordinate_descent_tuning = mode == "compiled_tuned"
    if compiled:
        torch._dynamo.reset()
        reset_compiled(model)
    prompt = torch.randint(model.config.vocab_size, (batch, args.prompt_len), device=args.device)
    t0 = time.time()
    generate(model, prompt, args.new_tokens, temperature=0, compile=compiled)  # compiles, records the graphs
    synchronize(args.device)
    warm_s = time.time() - t0
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    out = generate(model, prompt, args.new_tokens, temperature=0, compile=compiled)
    synchronize(args.device)
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    assert out.shape == (batch, args.prompt_len + args.new_tokens)
    if args.profile:  # one more generation under the profiler (not timed): where the GPU time goes
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            generate(model, prompt, args.new_tokens, temperature=0, compile=compiled)
            synchronize(args.device)
        sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
        print(f"profile ({mode}, batch {batch}, {args.new_tokens} tokens):\n"
              + prof.key_averages().table(sort_by=sort, row_limit=args.profile), flush=True)
    return batch * args.new_tokens / seconds, peak, warm_s


def check(args, dtype):
    """Greedy tokens of the first shape (bf16 model): cached eager and compiled against the uncached forward."""
    model = build(args.shapes[0], "bf16", args.device, torch.float32, args.vocab_size, args.block_size)
    prompt = torch.randint(model.config.vocab_size, (2, args.prompt_len), device=args.device)
    n = 24
    reference = generate(model, prompt, n, temperature=0, use_cache=False)
    lines = []
    for mode in args.modes:
        tokens = generate(model, prompt, n, temperature=0, compile=MODES[mode])
        agree = (tokens[:, args.prompt_len:] == reference[:, args.prompt_len:]).float().mean().item()
        lines.append(f"check ({args.shapes[0]}, float32, batch 2, {n} greedy tokens): cached {mode} agrees with "
                     f"the uncached forward on {agree:.0%} of tokens" + ("" if agree == 1 else "  <-- MISMATCH"))
    del model
    # the GELU in the packed up projection's kernel (fuse_gelu) against a GELU of its own, W4 in float32, one
    # sequence (the shapes the launcher then times are those of the table's batch-1 rows, in float32)
    model = build(args.shapes[0], "W4", args.device, torch.float32, args.vocab_size, args.block_size, gelu="separate")
    prompt = prompt[:1]
    logits = model(prompt)[0]
    reference = generate(model, prompt, n, temperature=0, compile=MODES[args.modes[0]])
    fuse_gelu(model)
    reset_compiled(model)
    error = ((model(prompt)[0] - logits).abs().max() / logits.abs().max()).item()
    tokens = generate(model, prompt, n, temperature=0, compile=MODES[args.modes[0]])
    agree = (tokens[:, args.prompt_len:] == reference[:, args.prompt_len:]).float().mean().item()
    lines.append(f"check ({args.shapes[0]}, W4, float32, batch 1, {n} greedy tokens, {args.modes[0]}): the GELU in "
                 f"the up projection's kernel against a GELU kernel of its own: logits within {error:.1e}, tokens "
                 f"agree on {agree:.0%}" + ("" if error < 1e-4 and agree == 1 else "  <-- MISMATCH"))
    del model
    # the normalizations and residual adds in the packed kernels (fuse_norms) against their own kernels, the same
    # model in float32 at batch 1
    model = build(args.shapes[0], "W4", args.device, torch.float32, args.vocab_size, args.block_size,
                  norms="separate")
    reference = generate(model, prompt, n, temperature=0, compile=MODES[args.modes[0]])
    fused = fuse_norms(model, min_width=0)
    reset_compiled(model)
    tokens = generate(model, prompt, n, temperature=0, compile=MODES[args.modes[0]])
    agree = (tokens[:, args.prompt_len:] == reference[:, args.prompt_len:]).float().mean().item()
    lines.append(f"check ({args.shapes[0]}, W4, float32, batch 1, {n} greedy tokens, {args.modes[0]}): norms and "
                 f"residual adds in the packed kernels ({fused} blocks) against kernels of their own: tokens agree "
                 f"on {agree:.0%}" + ("" if fused and agree == 1 else "  <-- MISMATCH"))
    del model
    return lines


def run_format(shape, fmt, qkv, args, dtype, bandwidth, rows, floors, bf16_speed, peer_speed, gelu="fused",
               norms="fused", attn="kernel"):
    """The rows of one model (shape, weight format, q/k/v, GELU and norms fused or not, the attention kernel or
    SDPA): every mode and batch."""
    from quantization.kernels import attention
    from quantization.kernels.tinygemm import TinyGemmUnsupported
    dtype_name = str(dtype).split(".")[-1]
    attention.ENABLED = attn == "kernel"  # read when generate sets up the model's caches
    try:
        model = build(shape, fmt, args.device, dtype, args.vocab_size, args.block_size, qkv, gelu, norms)
    except (ImportError, TinyGemmUnsupported) as e:
        row = f"| {shape} | {format_label(shape, fmt, qkv, gelu, norms, attn)} | - | - | skipped: {e} | | | | | | |"
        rows.append(row)
        print(row, flush=True)
        gc.collect()
        return
    nbytes = weight_bytes(model)
    if fmt == "bf16" and bandwidth and qkv == args.qkv[0] and attn == args.attention[0]:
        floors.append(f"{shape}: {nbytes / 2**30:.2f} GiB of {dtype_name} weights per token -> floor "
                      f"{bandwidth / nbytes:,.0f} tokens/s at batch 1")
    for mode in args.modes:
        for batch in args.batches:
            try:
                speed, peak, warm_s = measure(model, batch, mode, args)
            except RuntimeError as e:  # one row fails (a compile or CUDA graph error): say so, go on
                row = (f"| {shape} | {format_label(shape, fmt, qkv, gelu, norms, attn)} | {mode} | {batch} | failed: "
                       f"{str(e).splitlines()[0][:120]} | | | | | | |")
                rows.append(row)
                print(row, flush=True)
                torch._dynamo.reset()
                continue
            key = (shape, qkv, mode, batch, attn)
            if fmt == "bf16":
                bf16_speed[key] = speed
            if fmt == PEER:
                peer_speed[key] = speed
            ratio = f"{speed / bf16_speed[key]:.2f}" if key in bf16_speed else "-"
            vs_peer = f"{speed / peer_speed[key]:.2f}" if key in peer_speed and fmt not in ("bf16", PEER) else "-"
            share = f"{speed / (bandwidth / nbytes):.0%}" if bandwidth and batch == 1 else "-"
            row = (f"| {shape} | {format_label(shape, fmt, qkv, gelu, norms, attn)} | {mode} | {batch} | {speed:,.0f} | {ratio} | "
                   f"{vs_peer} | {share} | {nbytes / 2**30:.2f} | {peak:.2f} | {warm_s:.0f} |")
            rows.append(row)
            print(row, flush=True)
    del model
    gc.collect()
    torch._dynamo.reset()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(prog="decode.py", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(s for s in SHAPES if s != "tiny"), help="comma-separated shapes")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated weight formats")
    p.add_argument("--modes", default="eager,compiled", help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--qkv", default="fused", help="comma-separated subset of fused (q, k and v as one layer, "
                   "GPT.fuse_qkv, as sample.py runs) and separate (three layers)")
    p.add_argument("--gelu", default="fused", help="comma-separated subset of fused (packed up projections apply the "
                   "GELU, inference.fuse_gelu, as sample.py runs) and separate (a GELU kernel of its own)")
    p.add_argument("--norms", default="fused", help="comma-separated subset of fused (packed layers normalize their "
                   "input and add the residual at batch 1, inference.fuse_norms, as sample.py runs) and separate")
    p.add_argument("--attention", default="kernel", help="comma-separated subset of kernel (a one-token step writes "
                   "the cache and attends in one kernel where attention.worth_it, as sample.py runs) and sdpa (a cache write, then "
                   "F.scaled_dot_product_attention over the whole cache)")
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--vocab_size", type=int, default=50304)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after each row, print the ROWS operations and kernels that take the most time (torch.profiler)")
    p.add_argument("--check", action="store_true", help="first check greedy tokens against the uncached forward")
    p.add_argument("--out", default=None, help="also write the table here (default bench/results/decode_<gpu>.md)")
    args = p.parse_args(argv)
    args.shapes = parse_list(args.shapes, SHAPES, "shapes")
    order = ["bf16", PEER] + [f for f in FORMATS if f not in ("bf16", PEER)]  # the ratios' bases first
    args.formats = sorted(parse_list(args.formats, FORMATS, "formats"), key=order.index)
    args.modes = parse_list(args.modes, MODES, "modes")
    args.qkv = parse_list(args.qkv, ("fused", "separate"), "qkv")
    args.gelu = parse_list(args.gelu, ("fused", "separate"), "gelu")
    args.norms = parse_list(args.norms, ("fused", "separate"), "norms")
    args.attention = parse_list(args.attention, ("kernel", "sdpa"), "attention")
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        assert all(b >= 1 for b in args.batches)
    except (ValueError, AssertionError):
        sys.exit(f"decode.py: error: --batches={args.batches}: expected comma-separated positive integers")
    if args.prompt_len + args.new_tokens > args.block_size:
        sys.exit(f"decode.py: error: --prompt_len + --new_tokens must be at most --block_size={args.block_size}")
    if args.out:
        table_file_or_exit(args.out, "--out", "decode.py")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"decode.py: error: --device={args.device}: CUDA is not available (try --device=cpu)")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dtype_name = str(dtype).split(".")[-1]
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    header = [f"# Decode throughput on {gpu}", "",
              f"torch {torch.__version__}; {args.prompt_len}-token prompt, {args.new_tokens} new tokens, greedy; "
              f"random weights; bf16 = {dtype_name} weights and activations", "",
              "command: python bench/decode.py " + " ".join(sys.argv[1:] if argv is None else argv), ""]
    print("\n".join(header), flush=True)
    if args.check:
        header += check(args, dtype) + [""]
    bandwidth = copy_bandwidth(args.device)
    if bandwidth:
        header += [f"copy bandwidth: {bandwidth / 1e9:,.0f} GB/s (device to device, read + write)", ""]
    rows = ["| shape | weights | mode | batch | tokens/s | vs bf16 | vs tinygemm | of bandwidth floor | weights (GiB) "
            "| peak memory (GiB) | warm-up s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(header[6:] + rows), flush=True)
    floors = []
    bf16_speed, peer_speed = {}, {}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"decode_{gpu.replace(' ', '_').lower()}.md")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def write(done):
        """The table so far (after every model, so that a run stopped at a time limit keeps its rows)."""
        note = [] if done else ["", "(incomplete: the run was stopped before its last row)"]
        text = "\n".join(header + rows + note + ([""] + ["Bandwidth floor (bf16):", ""] + [f"- {f}" for f in floors]
                                                if floors else []))
        write_text_atomic(out, text + "\n")

    packed = [fmt for fmt in args.formats if fmt not in ("bf16", PEER)]
    models = [(shape, fmt, qkv, gelu, norms, attn) for shape in args.shapes for attn in args.attention
              for fmt in args.formats for qkv in args.qkv
              for gelu in (args.gelu if fmt in packed else ["fused"])
              for norms in (args.norms if fmt in packed else ["fused"])]
    from quantization.kernels import attention
    enabled = attention.ENABLED  # run_format switches the attention kernel per row; back as it was afterwards
    try:
        for i, (shape, fmt, qkv, gelu, norms, attn) in enumerate(models):
            run_format(shape, fmt, qkv, args, dtype, bandwidth, rows, floors, bf16_speed, peer_speed, gelu, norms,
                       attn)
            write(done=i == len(models) - 1)
    finally:
        attention.ENABLED = enabled
    print("\n".join([""] + ["Bandwidth floor (bf16):"] + [f"- {f}" for f in floors]) if floors else "")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
