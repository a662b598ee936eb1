"""QAT of one model with 1- and 2-bit weight methods, same steps and seed: full precision, binary (k=1), residual
binary (k=2), ternary and 2-bit affine per group; a table of validation loss, the share of binary's gap to full
precision that residual binary closes, and storage bits per weight of the linear layers.

    python demos/residual_binary.py --config=configs/cpu_char.toml                      # the default CPU model
    python demos/residual_binary.py --config=configs/baby_gpt.toml --device=cuda        # the baby GPT preset
    python demos/residual_binary.py --print_graph          # torch.export graph of a 2-term bitwise layer, and exit

Extra flags after `--` go to every train.py run (e.g. `-- --max_iters=1000 --lr_decay_iters=1000`).
Storage counts the packed checkpoint's layout: codes at their bits, one float32 scale per row and term, and an
8-bit zero point per row where the grid has one; embeddings and LayerNorms are not counted (they stay float).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configurator import model_quant_config, parse_args  # noqa: E402
from model import LINEAR_SITES  # noqa: E402
from quantization.binary_linear import exported_graph  # noqa: E402
from quantization.quantizers import QuantSpec, code_bits, code_range  # noqa: E402
from safety import check_output_file, write_text_atomic  # noqa: E402

QAT = ["--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear"]
SETTINGS = {
    "full precision": [],
    "binary (k=1)": QAT + ["--quantize_linear_method=binary_quant"],
    "residual binary (k=2)": QAT + ["--quantize_linear_method=residual_binary_quant",
                                    "--quantize_linear_binary_terms=2"],
    "ternary": QAT + ["--quantize_linear_method=ternary_quant"],
    "2-bit affine, group 32": QAT + ["--quantize_linear_method=affine_quant", "--quantize_linear_bits=2",
                                     "--quantize_linear_granularity=per_group", "--quantize_linear_group_size=32"],
}


def layer_shapes(args):
    """(site, out_features, in_features) of every linear layer of the model the flags describe."""
    n = args.n_embd
    shapes = {"q": (n, n), "k": (n, n), "v": (n, n), "attn_proj": (n, n), "mlp_up": (4 * n, n),
              "mlp_down": (n, 4 * n)}
    return [(site, *shapes[site]) for _ in range(args.n_layer) for site in LINEAR_SITES]


def storage_bits(flags):
    """Bits per weight of the linear layers, as a packed checkpoint stores them."""
    args = parse_args(flags)
    quant = model_quant_config(args)["weight_quant"]
    bits = weights = 0
    for site, out_features, in_features in layer_shapes(args):
        weights += out_features * in_features
        if site not in quant:
            bits += 32 * out_features * in_features
            continue
        spec = QuantSpec(**quant[site])
        rows = {"per_tensor": 1, "per_channel": out_features,
                "per_group": out_features * in_features // max(spec.group_size, 1)}[spec.granularity]
        code = {"binary": 1, "ternary": 2}.get(spec.grid, code_bits(spec))
        scales = spec.binary_terms if spec.grid == "residual_binary" else 1
        zero_point = 8 if spec.grid == "affine" and code_range(spec)[0] == 0 else 0
        bits += code * out_features * in_features + rows * (32 * scales + zero_point)
    return bits / weights


def run(name, flags, out_root, base_flags):
    out_dir = os.path.join(out_root, name.split(" (")[0].split(",")[0].replace(" ", "_").replace("-", "") +
                           ("_k2" if "k=2" in name else ""))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "log.jsonl")):
        os.remove(os.path.join(out_dir, "log.jsonl"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *base_flags, f"--out_dir={out_dir}", *flags]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.time()
    with open(os.path.join(out_dir, "train.log"), "w") as log:
        result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        with open(os.path.join(out_dir, "train.log")) as f:
            raise RuntimeError(f"{name} failed:\n{f.read()[-2000:]}")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    print(f"  {name}: val loss {evals[-1]['val_loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    return {"iter": evals[-1]["iter"], "val_loss": evals[-1]["val_loss"], "seconds": time.time() - t0}


def table(results, bits):
    fp, binary = results["full precision"]["val_loss"], results["binary (k=1)"]["val_loss"]
    lines = ["| weights | steps | val loss | vs full precision | bits per weight |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['iter']} | {r['val_loss']:.4f} | {100 * (r['val_loss'] / fp - 1):+.1f}% | "
                     f"{bits[name]:.2f} |")
    k2 = results["residual binary (k=2)"]["val_loss"]
    closed = (binary - k2) / (binary - fp) if binary != fp else float("nan")
    verdict = "met" if closed >= 0.5 else "missed"
    lines.append(f"\nresidual binary (k=2) closes {100 * closed:.0f}% of binary's gap to full precision "
                 f"({binary:.4f} -> {k2:.4f}, full precision {fp:.4f}); goal >= 50%: {verdict}")
    return "\n".join(lines), closed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cpu_char.toml", help="train.py preset every run starts from")
    p.add_argument("--device", default="cpu", help="device of every run")
    p.add_argument("--out_root", default="out-residual-binary", help="one checkpoint folder per setting under this")
    p.add_argument("--jobs", type=int, default=5, help="runs in parallel")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--print_graph", action="store_true", help="print the exported graph of a bitwise layer and exit")
    args, extra = p.parse_known_args(argv)
    if args.print_graph:
        print(exported_graph().replace(ROOT + os.sep, ""))
        return
    extra = [e for e in extra if e != "--"]
    if not os.path.isfile(args.config):
        sys.exit(f"residual_binary.py: error: --config={args.config}: no such file")
    if args.json:
        try:
            check_output_file(args.json, [args.config], args.overwrite)
        except ValueError as e:
            sys.exit(f"residual_binary.py: error: --json={args.json}: {e}")
    base = [f"--config={args.config}", f"--device={args.device}", *extra]
    bits = {name: storage_bits(base + flags) for name, flags in SETTINGS.items()}
    print(f"training {len(SETTINGS)} models: {' '.join(base)}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = pool.map(lambda kv: run(*kv, args.out_root, base), SETTINGS.items())
        results = dict(zip(SETTINGS, runs))
    text, closed = table(results, bits)
    print("\n" + text)
    if args.json:
        write_text_atomic(args.json, json.dumps({"flags": base, "results": results, "bits_per_weight": bits,
                                                 "gap_closed": closed}, indent=1))


if __name__ == "__main__":
    main()
