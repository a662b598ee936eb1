"""Train the default CPU config once per quantization setting, same steps and seed, and print a table of
validation losses against full precision.

    python demos/compare_methods.py --suite=weights        # every weight method, 8 and 4 bits where bits apply
    python demos/compare_methods.py --suite=activations    # W8A8, W4A8, W8A4 at every activation site

Extra flags after `--` go to every train.py run (e.g. `-- --max_iters=500`).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from safety import check_output_file, write_text_atomic  # noqa: E402

QAT = ["--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear"]
ACT = ["--quantize_attn_act", "--quantize_mlp_act"]

SUITES = {
    "weights": {
        "full precision": [],
        "symmetric_quant W8": QAT + ["--quantize_linear_method=symmetric_quant", "--quantize_linear_bits=8"],
        "symmetric_quant W4": QAT + ["--quantize_linear_method=symmetric_quant", "--quantize_linear_bits=4"],
        "affine_quant W8": QAT + ["--quantize_linear_method=affine_quant", "--quantize_linear_bits=8"],
        "affine_quant W4": QAT + ["--quantize_linear_method=affine_quant", "--quantize_linear_bits=4"],
        "stochastic_quant W8": QAT + ["--quantize_linear_method=stochastic_quant", "--quantize_linear_bits=8"],
        "stochastic_quant W4": QAT + ["--quantize_linear_method=stochastic_quant", "--quantize_linear_bits=4"],
        "ternary_quant (1.58 bits)": QAT + ["--quantize_linear_method=ternary_quant"],
        "binary_quant (1 bit)": QAT + ["--quantize_linear_method=binary_quant"],
    },
    "activations": {
        "full precision": [],
        "W8A8 (all sites)": QAT + ACT + ["--quantize_linear_bits=8", "--quantize_attn_act_bits=8", "--quantize_mlp_act_bits=8"],
        "W4A8 (all sites)": QAT + ACT + ["--quantize_linear_bits=4", "--quantize_attn_act_bits=8", "--quantize_mlp_act_bits=8"],
        "W8A4 (all sites)": QAT + ACT + ["--quantize_linear_bits=8", "--quantize_attn_act_bits=4", "--quantize_mlp_act_bits=4"],
    },
}


def run(name, flags, out_root, extra):
    out_dir = os.path.join(out_root, name.split(" (")[0].replace(" ", "_"))
    if os.path.exists(os.path.join(out_dir, "log.jsonl")):
        os.remove(os.path.join(out_dir, "log.jsonl"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}", "--device=cpu", "--overwrite", *flags,
           *extra]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-2000:]}")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    print(f"  {name}: val loss {evals[-1]['val_loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return evals[-1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="weights", choices=SUITES, help="which settings to compare")
    p.add_argument("--out_root", default="out-compare", help="one checkpoint folder per setting under this")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing <out_root>/<suite>.md")
    args, extra = p.parse_known_args(argv)
    try:
        check_output_file(os.path.join(args.out_root, f"{args.suite}.md"), overwrite=args.overwrite)
    except ValueError as e:
        sys.exit(f"compare_methods.py: error: --out_root={args.out_root}: {e}")
    extra = [e for e in extra if e != "--"]
    suite = SUITES[args.suite]
    print(f"training {len(suite)} models ({args.suite}) with train.py defaults {' '.join(extra)}")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(suite, pool.map(lambda kv: run(*kv, args.out_root, extra), suite.items())))
    base = results["full precision"]["val_loss"]
    lines = ["| setting | steps | val loss | vs full precision |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['iter']} | {r['val_loss']:.4f} | {100 * (r['val_loss'] / base - 1):+.1f}% |")
    table = "\n".join(lines)
    print("\n" + table)
    write_text_atomic(os.path.join(args.out_root, f"{args.suite}.md"), table + "\n")


if __name__ == "__main__":
    main()
