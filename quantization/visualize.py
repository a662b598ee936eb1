"""
Pictures of a file written by save_weights.py: what quantization did to each weight and stored activation.

    python quantization/visualize.py --file_name=quantized_data.pkl --image_folder=quantized_images \
        --weight=all --graph=histogram

Per tensor, `<name>_histogram.png` (how often each integer level is used, and how many of the grid's levels are)
and/or `<name>_matrix.png` (the dequantized values as a heatmap, every k-th row/column when large). Always one
`overview.png`: per site (summed over layers), the share of codes at the clipping limits (qmin or qmax) and the
quantization error as an SNR in dB, 10*log10(sum x**2 / sum (x - dequantized)**2), from the unquantized values
save_weights.py measured (latent weights; activations of a validation batch). A weight with full-precision
outliers (dense-and-sparse) also gets `<name>_outliers.png`: where its outliers sit (counts over the matrix, and
per input column below it: an outlier channel is a vertical stripe), and the overview gets their share per site.

--weight is `all`, a tensor's name, a site (`q`, `attn.softmax_input`, ...), a glob (`*.mlp.*`) or a regex.
"""
import fnmatch
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as a command (python quantization/<this>.py): import from the root, not from
    # quantization/ itself, whose kernels/ would shadow the `kernels` package that transformers looks for
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != here]

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cli import OneLineParser  # noqa: E402
from quantization.save_weights import (dequantize_entry, load_quantized_data, outlier_positions,  # noqa: E402
                                       outlier_summary)
from safety import check_out_dir, safe_join, safe_name  # noqa: E402

GRAPHS = ("histogram", "matrix", "both", "outliers")  # outliers: only the outlier maps (always drawn where present)
MAX_CELLS = 256  # a heatmap shows at most this many rows and columns
COLORS = {"weight": "tab:blue", "activation": "tab:orange"}


def select(tensors, pattern):
    """Names of the tensors that `pattern` picks, in file order; ValueError naming it when none does."""
    names = list(tensors)
    if pattern == "all":
        return names
    if pattern in tensors:
        return [pattern]
    picked = [n for n in names if tensors[n]["site"] == pattern or fnmatch.fnmatchcase(n, pattern)]
    if not picked:
        try:
            picked = [n for n in names if re.fullmatch(pattern, n)]
        except re.error:
            pass
    if not picked:
        sites = sorted({t["site"] for t in tensors.values()})
        raise ValueError(f"no tensor or site named '{pattern}'; known tensors: {', '.join(names)}; "
                         f"known sites: {', '.join(sites)}")
    return picked


def used_levels(tensor):
    """(codes per level, the levels) over the tensor's whole grid."""
    levels = np.array([-1, 1]) if tensor["levels"] == 2 and tensor["qmin"] == -1 \
        else np.arange(tensor["qmin"], tensor["qmax"] + 1)
    counts = np.bincount(tensor["codes"].astype(np.int64).ravel() - tensor["qmin"],
                         minlength=tensor["qmax"] - tensor["qmin"] + 1)
    return counts[levels - tensor["qmin"]], levels


def describe(tensor):
    if "term" in tensor:  # one sign matrix of a residual binary weight
        return f"{tensor['method']}, term {tensor['term'] + 1} of {tensor['binary_terms']}, {tensor['granularity']}"
    return f"{tensor['method']}, {tensor['bits']} bits, {tensor['granularity']}"


def histogram(name, tensor, path):
    counts, levels = used_levels(tensor)
    used = int((counts > 0).sum())
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(levels, counts, width=0.9 if len(levels) <= 64 else 1.0, color=COLORS[tensor["kind"]])
    for limit in (tensor["qmin"], tensor["qmax"]):
        ax.axvline(limit, color="red", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("integer level (dashed: clipping limits)")
    ax.set_ylabel("count")
    ax.set_title(f"{name}\n{describe(tensor)}: used {used} of {len(levels)} levels "
                 f"({100 * used / len(levels):.0f}% of the grid)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def matrix(name, tensor, path):
    values = dequantize_entry(tensor)
    values = values.reshape(-1, values.shape[-1]) if values.ndim != 1 else values.reshape(1, -1)
    row_step, col_step = (max(1, math.ceil(n / MAX_CELLS)) for n in values.shape)
    shown = values[::row_step, ::col_step]
    limit = float(np.abs(shown).max()) or 1.0
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="dequantized value")
    sub = "" if row_step == col_step == 1 else f", every {row_step}th row and {col_step}th column"
    ax.set_xlabel("column" if tensor["kind"] == "weight" else "feature")
    ax.set_ylabel("row" if tensor["kind"] == "weight" else "token (flattened leading dims)")
    ax.set_title(f"{name}\n{describe(tensor)}, shape {tensor['shape']}{sub}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def outlier_map(rows, cols, shape, cells=MAX_CELLS):
    """(counts, row_step, col_step): outliers per cell of a grid of at most `cells` x `cells` over the matrix."""
    row_step, col_step = (max(1, math.ceil(n / cells)) for n in shape)
    grid = np.zeros((math.ceil(shape[0] / row_step), math.ceil(shape[1] / col_step)), np.int64)
    np.add.at(grid, (rows // row_step, cols // col_step), 1)
    return grid, row_step, col_step


def outliers(name, tensor, path):
    rows, cols = outlier_positions(tensor)
    shape = tensor["shape"]
    grid, row_step, col_step = outlier_map(rows, cols, shape)
    per_column = np.bincount(cols, minlength=shape[1])
    top = np.argsort(-per_column, kind="stable")[:3]
    fig, (ax, below) = plt.subplots(2, 1, figsize=(6, 6), height_ratios=(3, 1), sharex=False)
    image = ax.imshow(np.ma.masked_equal(grid, 0), cmap="viridis", vmin=0, aspect="auto", interpolation="nearest",
                      extent=(0, shape[1], shape[0], 0))
    fig.colorbar(image, ax=ax, label="outliers" + ("" if row_step == col_step == 1 else
                                                   f" per {row_step} x {col_step} cell"))
    ax.set_xlabel("input column")
    ax.set_ylabel("output row")
    below.bar(np.arange(shape[1]), per_column, width=1.0, align="edge", color="tab:red")  # column c: [c, c+1)
    below.set_xlim(0, shape[1])
    below.set_xlabel("input column")
    below.set_ylabel("outliers")
    share = len(rows) / max(1, math.prod(shape))
    ax.set_title(f"{name}\n{len(rows):,} outliers ({100 * share:.2f}% of {math.prod(shape):,}) in full precision; "
                 f"busiest columns: " + ", ".join(f"{c} ({per_column[c]})" for c in top if per_column[c]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def site_summary(tensors):
    """{(kind, site): (share of codes at qmin or qmax, SNR in dB or None)}, summed over layers."""
    totals = {}
    for t in tensors.values():
        at_limit, count, signal, noise = totals.get((t["kind"], t["site"]), (0, 0, 0.0, 0.0))
        codes = t["codes"]
        at_limit += int(((codes == t["qmin"]) | (codes == t["qmax"])).sum())
        if t["signal_sq"] is None:
            signal = None
        elif signal is not None:
            signal, noise = signal + t["signal_sq"], noise + t["noise_sq"]
        totals[(t["kind"], t["site"])] = (at_limit, count + codes.size, signal, noise)
    summary = {}
    for key, (at_limit, count, signal, noise) in totals.items():
        snr = None if signal is None else (math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise))
        summary[key] = (at_limit / max(count, 1), snr)
    return summary


def overview(tensors, path):
    summary = site_summary(tensors)
    keys = list(summary)
    labels = [f"{'W' if kind == 'weight' else 'A'} {site}" for kind, site in keys]
    colors = [COLORS[kind] for kind, _ in keys]
    clip = [100 * summary[k][0] for k in keys]
    snr = [summary[k][1] for k in keys]
    finite = [s for s in snr if s is not None and math.isfinite(s)]
    cap = max(finite, default=1.0) * 1.05
    sparse = outlier_summary(tensors)
    fig, axes = plt.subplots(1, 3 if sparse else 2, figsize=(13 if sparse else 9, 0.3 * len(keys) + 1.6),
                             sharey=True)
    left, right = axes[:2]
    y = np.arange(len(keys))
    left.barh(y, clip, color=colors)
    left.set_yticks(y, labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("codes at the clipping limits (%)")
    right.barh(y, [cap if s is not None and math.isinf(s) else (s or 0.0) for s in snr], color=colors)
    for i, s in enumerate(snr):
        if s is None:
            right.text(0, i, " not measured", va="center", fontsize=7)
    right.set_xlabel("quantization SNR (dB, higher is better)")
    if sparse:  # the share of each site's weights kept in full precision
        share = [100 * sparse[site][0] / sparse[site][1] if kind == "weight" and site in sparse else 0.0
                 for kind, site in keys]
        axes[2].barh(y, share, color=colors)
        for i, (kind, site) in enumerate(keys):
            if kind == "weight" and site in sparse:
                axes[2].text(share[i], i, f" {sparse[site][0]:,}", va="center", fontsize=7)
        axes[2].set_xlabel("outliers in full precision (% of the site's weights)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    fig.legend(handles, ["weights (W)", "activations (A)"], fontsize=7, loc="upper right", ncols=2)
    fig.suptitle("quantization per site, summed over layers", fontsize=10, x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def build_parser():
    p = OneLineParser(prog="visualize.py", description="Plot the tensors saved by save_weights.py.")
    p.add_argument("--file_name", default="quantized_data.pkl", help="a .pkl, .safetensors or .npz of save_weights.py")
    p.add_argument("--image_folder", default="quantized_images", help="folder the PNG files are written to")
    p.add_argument("--weight", default="all", help="all, a tensor's name, a site, a glob or a regex")
    p.add_argument("--graph", default="histogram", choices=GRAPHS,
                   help="per-tensor pictures: histogram, matrix, both, or outliers (only the outlier maps; drawn in "
                        "every mode for weights with outliers)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        tensors = load_quantized_data(args.file_name)["tensors"]
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"visualize.py: error: --file_name={args.file_name}: {e}")
    try:
        names = select(tensors, args.weight)
    except ValueError as e:
        sys.exit(f"visualize.py: error: --weight={args.weight}: {e}")
    graphs = {"histogram": [histogram], "matrix": [matrix], "both": [histogram, matrix], "outliers": []}[args.graph]
    # file names come from tensor names inside the file: sanitised, and checked to stay inside the folder
    try:
        for name in names:
            safe_name(name)
    except ValueError as e:
        sys.exit(f"visualize.py: error: --file_name={args.file_name}: tensor {e}")
    try:
        check_out_dir(args.image_folder)
    except ValueError as e:
        sys.exit(f"visualize.py: error: --image_folder={args.image_folder}: {e}")
    os.makedirs(args.image_folder, exist_ok=True)
    try:
        drawn = {n: graphs + ([outliers] if "outlier_crow" in tensors[n] else []) for n in names}
        paths = {(n, g): safe_join(args.image_folder, f"{n}_{g.__name__}.png") for n in names for g in drawn[n]}
        paths["overview"] = safe_join(args.image_folder, "overview.png")
    except ValueError as e:
        sys.exit(f"visualize.py: error: --image_folder={args.image_folder}: {e}")
    for name in tqdm(names, desc="tensors", unit="tensor"):
        for graph in drawn[name]:
            graph(name, tensors[name], paths[(name, graph)])
    overview({n: tensors[n] for n in names}, paths["overview"])
    print(f"wrote {len(paths)} images to {args.image_folder}")


if __name__ == "__main__":
    main()
