"""Training throughput and peak memory of full precision against QAT, eager and torch.compile, in one run.

    python bench/train_throughput.py                      # GPT-2 124M shape on the GPU (bf16 autocast)
    python bench/train_throughput.py --preset=tiny --device=cpu --steps=3   # a smoke run anywhere

Each row trains the same model shape on random tokens (throughput does not depend on the data) for --steps
optimizer steps after --warmup steps, timed with CUDA events; ratios are taken against full precision with the
same compile setting, in the same process.
"""
import argparse
import gc
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig, LINEAR_SITES  # noqa: E402

PRESETS = {
    "gpt2_124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True),
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256, bias=True),
}
VARIANTS = {
    "full precision": None,
    "W8 symmetric per-channel": dict(method="symmetric_quant", bits=8, granularity="per_channel"),
    "ternary (absmean per-tensor)": dict(method="ternary_quant", bits=8, granularity="per_tensor"),
}


def build(preset, quant):
    cfg = dict(PRESETS[preset])
    if quant is not None:
        cfg["linear_variants"] = {s: "quantized_linear" for s in LINEAR_SITES}
        cfg["weight_quant"] = {s: quant for s in LINEAR_SITES}
    return GPT(GPTConfig(**cfg))


def measure(args, quant, compiled):
    torch.manual_seed(0)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    model = build(args.preset, quant).to(args.device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    step_model = torch.compile(model) if compiled else model
    ctx = torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    cfg = model.config
    # a few batches of random tokens, rotated so that no step reuses the previous one's input
    batches = [torch.randint(cfg.vocab_size, (args.batch_size, cfg.block_size + 1), device=args.device) for _ in range(4)]

    def step(i):
        b = batches[i % len(batches)]
        with ctx:
            _, loss = step_model(b[:, :-1], b[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t_compile = time.time()
    for i in range(args.warmup):
        step(i)
    if device_type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        warm_s = time.time() - t_compile
        start.record()
        for i in range(args.steps):
            loss = step(i)
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        warm_s = time.time() - t_compile
        t0 = time.time()
        for i in range(args.steps):
            loss = step(i)
        seconds, peak = time.time() - t0, float("nan")
    assert torch.isfinite(loss), "training diverged"
    tokens = args.steps * args.batch_size * cfg.block_size
    del model, optimizer, step_model
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return tokens / seconds, peak, warm_s


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2_124m", choices=PRESETS, help="model shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--compile", default="both", choices=["both", "on", "off"], help="which compile settings to run")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"# {args.preset}, batch {args.batch_size} x {PRESETS[args.preset]['block_size']} tokens, {name}, "
          f"torch {torch.__version__}, bf16 autocast on CUDA, {args.steps} timed steps after {args.warmup}")
    rows = []
    for compiled in modes:
        base = None
        for label, quant in VARIANTS.items():
            tps, peak, warm = measure(args, quant, compiled)
            base = base or (tps, peak)
            rows.append((label, "on" if compiled else "off", tps, tps / base[0], peak, peak / base[1], warm))
            print(f"  done: {label}, compile {'on' if compiled else 'off'}: {tps:,.0f} tok/s", flush=True)
    print("\n| weights | compile | tokens/s | vs full precision | peak memory (GiB) | vs full precision | warm-up s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for label, comp, tps, r, peak, rp, warm in rows:
        print(f"| {label} | {comp} | {tps:,.0f} | {r:.2f} | {peak:.2f} | {rp:.2f} | {warm:.0f} |")


if __name__ == "__main__":
    main()
