"""
Save the integer codes of a quantized checkpoint: every quantized weight (each quantized linear site, and the
token embedding when it is quantized) and every activation stored with --store_activations.

    python quantization/save_weights.py --out_dir=out --file_name=quantized_data --file_type=pkl

Each tensor is saved as integer `codes` (the smallest integer dtype that holds its code range), `scale` and
`zero_point` (float32, one per row), and its bits, method, granularity, group_size, shape and code range. Row i
of `codes.reshape(len(scale), -1)` dequantizes as `(codes - zero_point[i]) * scale[i]`, whatever the granularity;
for a weight this gives exactly the weight the model computes with (eval mode, quantization on). A
residual_binary_quant weight (a sum of k scaled sign matrices) is saved as k binary tensors `<name>.term<i>`
(codes -1/+1, one scale per row, fields `term` and `binary_terms`) whose dequantized values add up to the weight.

A dense-and-sparse weight (an outlier fraction, in QAT or PTQ) keeps a few weights in full precision beside its
codes: its codes are those of the dense rest (0 at the outliers), and the outliers come as CSR arrays
`outlier_crow` (int32, rows + 1), `outlier_col` (int16/int32 column indices) and `outlier_values` (float16, the
values added to the dequantized dense part there), as in a packed checkpoint. The script prints the outlier count
per site; `dequantize_entry` adds them back, and visualize.py draws where they sit.

For the overview plot of visualize.py each tensor also carries `signal_sq` and `noise_sq`, the sums of x**2 and
(x - dequantized)**2 over its unquantized values x: for a weight x is the latent full-precision weight; a stored
activation's unquantized values are not kept, so they are measured on one batch of the validation split
(--snr_batch_size sequences) passing the same site.

Formats: `pkl` (plain dicts and numpy arrays, read back through a restricted unpickler), and two that cannot
carry code: `safetensors` and `npz` (arrays, plus the other fields as JSON). `load_quantized_data` reads all three.
"""
import io
import json
import math
import os
import pickle
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as a command (python quantization/<this>.py): import from the root, not from
    # quantization/ itself, whose kernels/ would shadow the `kernels` package that transformers looks for
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != here]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import checkpoint_dataset  # noqa: E402
from inference import load_checkpoint  # noqa: E402
from cli import OneLineParser  # noqa: E402
from inference import from_checkpoint  # noqa: E402
from quantization.layers import ActQuant, QuantizedLinear  # noqa: E402
from quantization.packing import check_packed, from_csr, is_packed, to_csr, unpack_codes  # noqa: E402
from quantization.quantizers import (GRANULARITIES, MAX_BITS, METHODS, MIN_BITS, QuantSpec,  # noqa: E402
                                     code_range, dense_and_sparse, dequantize, quantize_tensor,
                                     residual_binary_signs, smallest_int_dtype)
from safety import check_device, check_output_file  # noqa: E402

FORMAT = "nanoQAT quantized tensors"
VERSION = 1
FILE_TYPES = ("pkl", "safetensors", "npz")
ARRAYS = ("codes", "scale", "zero_point")
OUTLIER_ARRAYS = ("outlier_crow", "outlier_col", "outlier_values")  # only in a tensor that has outliers
# every field of a saved tensor besides its arrays, with the types a loaded file must have
FIELDS = {"kind": str, "site": str, "bits": int, "method": str, "granularity": str, "group_size": int,
          "shape": list, "qmin": int, "qmax": int, "levels": int, "signal_sq": (float, type(None)),
          "noise_sq": (float, type(None))}
SEP = "::"  # joins a tensor's name and an array's name in the flat formats (module names never hold it)


# ---------------------------------------------------------------------------------------------------------------
# collecting the tensors of a checkpoint

def levels(spec):
    """How many integer codes the grid of `spec` has (binary uses -1 and 1 only)."""
    qmin, qmax = code_range(spec)
    return 2 if spec.grid == "binary" else qmax - qmin + 1


def entry(kind, site, spec, codes, scale, zero_point, shape):
    qmin, qmax = code_range(spec)
    return {"kind": kind, "site": site, "bits": spec.bits, "method": spec.method, "granularity": spec.granularity,
            "group_size": spec.group_size, "shape": list(shape), "qmin": qmin, "qmax": qmax, "levels": levels(spec),
            "codes": codes.to(smallest_int_dtype(qmin, qmax)).cpu().numpy(),
            "scale": scale.float().reshape(-1, 1).cpu().numpy(),
            "zero_point": zero_point.float().reshape(-1, 1).cpu().numpy(),
            "signal_sq": None, "noise_sq": None}


def attach_outliers(tensor, csr):
    """Store a weight's sparse outliers ({crow, col, values} torch tensors, as packing.to_csr makes) in its entry."""
    for a, key in zip(OUTLIER_ARRAYS, ("crow", "col", "values")):
        tensor[a] = csr[key].cpu().numpy()


def outlier_positions(tensor):
    """(rows, columns) of a saved tensor's outliers as int64 arrays; empty when it has none."""
    if "outlier_crow" not in tensor:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    counts = np.diff(tensor["outlier_crow"].astype(np.int64))
    return np.repeat(np.arange(len(counts)), counts), tensor["outlier_col"].astype(np.int64)


def error_power(x, x_q):
    """(sum of x**2, sum of (x - x_q)**2) in float64: the two terms of an SNR."""
    x, x_q = x.double(), x_q.double()
    return (x * x).sum().item(), ((x - x_q) ** 2).sum().item()


def weight_entries(model):
    """Codes of every quantized weight, computed from the latent weight as the model's forward pass does."""
    targets = [(f"{name}.weight", name.rsplit(".", 1)[-1], module.latent_weight, module.spec)
               for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
    if model.embedding_spec is not None:
        targets.append(("transformer.wte.weight", "embedding", model.transformer.wte.weight, model.embedding_spec))
    out = {}
    for name, site, weight, spec in tqdm(targets, desc="weights", unit="tensor"):
        weight = weight.detach().float()
        sparse = None
        if spec.outlier_fraction > 0:  # the same outliers as the forward pass picks, the codes of the dense rest
            codes, scale, zero_point, sparse = dense_and_sparse(weight, spec)
            sparse = to_csr(sparse)
            computed = dequantize(codes, scale, zero_point, spec) + from_csr(sparse, list(weight.shape))
        else:
            codes, scale, zero_point = quantize_tensor(weight, spec)
            computed = dequantize(codes, scale, zero_point, spec)
        power = error_power(weight, computed)
        if spec.grid == "residual_binary":
            terms = term_entries(name, site, spec, codes, scale, power)
            if sparse is not None:
                attach_outliers(terms[next(reversed(terms))], sparse)
            out.update(terms)
            continue
        out[name] = entry("weight", site, spec, codes, scale, zero_point, weight.shape)
        out[name]["signal_sq"], out[name]["noise_sq"] = power
        if sparse is not None:
            attach_outliers(out[name], sparse)
    return out


def term_entries(name, site, spec, codes, scale, power):
    """One binary entry per term of a residual binary weight; the last carries the weight's error power (the
    others 0, so that sums over a site stay right)."""
    binary = QuantSpec("binary_quant", granularity=spec.granularity, group_size=spec.group_size)
    out = {}
    for t, signs in enumerate(residual_binary_signs(codes, spec.binary_terms)):
        e = entry("weight", site, binary, signs, scale[:, t], torch.zeros(scale.shape[0]), codes.shape)
        e.update(method=spec.method, term=t, binary_terms=spec.binary_terms, signal_sq=0.0, noise_sq=0.0)
        out[f"{name}.term{t}"] = e
    e["signal_sq"], e["noise_sq"] = power
    return out


def activation_site(module_name):
    """'transformer.h.0.attn.act.softmax_input' -> ('attn', 'softmax_input')."""
    parts = module_name.split(".")
    return parts[-3], parts[-1]


def activation_entries(stored, act_quant):
    out = {}
    for name, saved in tqdm(stored.items(), desc="activations", unit="tensor"):
        kind, site = activation_site(name)
        spec = QuantSpec(**act_quant[f"{kind}_{site}"])
        codes = saved["codes"]
        out[name] = entry("activation", f"{kind}.{site}", spec, codes, saved["scale"], saved["zero_point"],
                          codes.shape)
    return out


@torch.no_grad()
def measure_activations(model, dataset, batch_size, block_size, device):
    """{module name: (signal_sq, noise_sq)} of each active activation site on `batch_size` validation sequences,
    or None when the dataset is not there."""
    path = os.path.join(ROOT, "data", dataset, "val.bin")
    if batch_size <= 0 or not os.path.exists(path):
        return None
    data = np.memmap(path, dtype=np.uint16, mode="r")
    starts = np.linspace(0, len(data) - block_size - 1, batch_size).astype(np.int64)  # deterministic, spread out
    x = torch.from_numpy(np.stack([data[s:s + block_size].astype(np.int64) for s in starts])).to(device)
    power, hooks = {}, []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0] if module.transform is None else module.transform(inputs[0])  # what is quantized
            s, n = error_power(x, output)
            old = power.get(name, (0.0, 0.0))
            power[name] = (old[0] + s, old[1] + n)
        return record

    for name, module in model.named_modules():
        if isinstance(module, ActQuant) and module.active:
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return power


def collect(checkpoint, device="cpu", snr_batch_size=4):
    """The {format, version, tensors} dict that save() writes, from a loaded checkpoint."""
    model_args = checkpoint["model_args"]
    model = from_checkpoint(checkpoint)  # a packed (PTQ, SpinQuant) checkpoint's codes are stored, not recomputed
    model.set_quantization(True)  # the weights as the quantized model computes with them, even from a warm-up save
    model.eval().to(device)
    tensors = weight_entries(model)
    for name, packed in checkpoint.get("packed_weights", {}).items():
        spec, shape = QuantSpec(**packed["spec"]), packed["shape"]
        codes = (unpack_codes(packed["codes"], spec.bits, math.prod(shape)) + code_range(spec)[0]).reshape(shape)
        tensors[f"{name}.weight"] = entry("weight", name.rsplit(".", 1)[-1], spec, codes, packed["scale"],
                                          packed["zero_point"], shape)
        if "outliers" in packed:
            attach_outliers(tensors[f"{name}.weight"], packed["outliers"])
    tensors.update(activation_entries(checkpoint.get("activations", {}), model_args["act_quant"]))
    dataset = checkpoint_dataset(checkpoint)
    power = measure_activations(model, dataset, snr_batch_size, model_args["block_size"], device)
    for name, (signal_sq, noise_sq) in (power or {}).items():
        if name in tensors:
            tensors[name]["signal_sq"], tensors[name]["noise_sq"] = signal_sq, noise_sq
    return {"format": FORMAT, "version": VERSION, "iter_num": int(checkpoint.get("iter_num", 0)),
            "quantization_enabled": bool(checkpoint.get("quantization_enabled", True)), "tensors": tensors}


def dequantize_entry(tensor, with_outliers=True):
    """Real values of a saved tensor (float32 numpy array of its shape): row i of the codes uses scale[i] and
    zero_point[i]; a weight's outliers are added where they sit (unless with_outliers=False)."""
    scale, zero_point = tensor["scale"], tensor["zero_point"]
    rows = tensor["codes"].reshape(scale.shape[0], -1).astype(np.float32)
    values = ((rows - zero_point) * scale).reshape(tensor["shape"])
    if with_outliers and "outlier_crow" in tensor:
        r, c = outlier_positions(tensor)
        values[r, c] += tensor["outlier_values"].astype(np.float32)
    return values


def outlier_summary(tensors):
    """{site: (outliers, weights)} over the weights of a saved file that have outliers, summed over layers (a
    residual binary weight's size counted once, not once per term)."""
    sites = {}
    for t in tensors.values():
        if t["kind"] != "weight":
            continue
        n, numel = sites.get(t["site"], (0, 0))
        if t.get("term", 0) == 0:
            numel += math.prod(t["shape"])
        sites[t["site"]] = (n + len(t.get("outlier_values", ())), numel)
    return {site: v for site, v in sites.items() if v[0]}


# ---------------------------------------------------------------------------------------------------------------
# writing and reading the three formats

def split(data):
    """(flat {name::array: ndarray}, JSON-able everything else) for the formats that hold only arrays."""
    arrays, meta = {}, {k: v for k, v in data.items() if k != "tensors"}
    meta["tensors"] = {}
    for name, tensor in data["tensors"].items():
        for a in ARRAYS + OUTLIER_ARRAYS:
            if a in tensor:
                arrays[f"{name}{SEP}{a}"] = np.ascontiguousarray(tensor[a])
        meta["tensors"][name] = {k: v for k, v in tensor.items() if k not in ARRAYS + OUTLIER_ARRAYS}
    return arrays, meta


def join(arrays, meta):
    data = dict(meta)
    for name, fields in meta["tensors"].items():
        data["tensors"][name] = dict(fields, **{a: arrays[f"{name}{SEP}{a}"] for a in ARRAYS + OUTLIER_ARRAYS
                                                if f"{name}{SEP}{a}" in arrays or a in ARRAYS})
    return data


def save(data, path):
    """Write `data` to `path` whole or not at all (a temp file beside it, renamed when complete)."""
    file_type = os.path.splitext(path)[1][1:]
    if file_type not in FILE_TYPES:
        raise ValueError(f"{path}: unknown file type '{file_type}'; expected one of {', '.join(FILE_TYPES)}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".save-", suffix=f".{file_type}")
    os.close(fd)
    try:
        if file_type == "pkl":
            with open(tmp, "wb") as f:
                pickle.dump(data, f, protocol=4)
        else:
            arrays, meta = split(data)
            if file_type == "safetensors":
                from safetensors.numpy import save_file
                save_file(arrays, tmp, metadata={"format": FORMAT, "nanoqat": json.dumps(meta)})
            else:
                np.savez(tmp, __nanoqat__=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class RefusedGlobal(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a pickle of plain values and numpy arrays needs; any other global (os.system,
    builtins.eval, a class with a __reduce__ payload, ...) is refused before it can be called."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise RefusedGlobal(f"refused to load '{module}.{name}': a save of save_weights.py holds only "
                                     f"numpy arrays and plain values")


def restricted_load(raw):
    return RestrictedUnpickler(io.BytesIO(raw)).load()


def check(data, path):
    """Raise ValueError naming what is wrong unless `data` is a well-formed save of this tool."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tensors"), dict):
        raise ValueError(f"{path} is not a file saved by save_weights.py")
    if data.get("version") != VERSION:
        raise ValueError(f"{path} has version {data.get('version')}; this tool reads version {VERSION}")
    for name, tensor in data["tensors"].items():
        if not isinstance(name, str) or not isinstance(tensor, dict):
            raise ValueError(f"{path}: tensor {name!r} is not a named dict of fields")
        for field, type_ in FIELDS.items():
            if not isinstance(tensor.get(field), type_) or (type_ is int and isinstance(tensor[field], bool)):
                raise ValueError(f"{path}: tensor '{name}' lacks a valid '{field}'")
        for a in ARRAYS:
            if not isinstance(tensor.get(a), np.ndarray) or tensor[a].dtype.kind not in "iuf":
                raise ValueError(f"{path}: tensor '{name}' lacks a numeric '{a}' array")
        if not MIN_BITS <= tensor["bits"] <= MAX_BITS:
            raise ValueError(f"{path}: tensor '{name}' has bits={tensor['bits']}, outside {MIN_BITS}..{MAX_BITS}")
        if tensor["method"] not in METHODS or tensor["granularity"] not in GRANULARITIES or \
                tensor["kind"] not in ("weight", "activation"):
            raise ValueError(f"{path}: tensor '{name}' has an unknown kind, method or granularity")
        # the code range and level count follow from method and bits: a file cannot claim a larger grid
        grids = {code_range(QuantSpec(tensor["method"], tensor["bits"], "per_tensor", stochastic_grid=g))
                 for g in ("symmetric", "affine")}
        if "term" in tensor:  # one binary term of a residual_binary_quant weight: signs -1/+1
            grids = {(-1, 1)}
        if (tensor["qmin"], tensor["qmax"]) not in grids or tensor["levels"] > tensor["qmax"] - tensor["qmin"] + 1:
            raise ValueError(f"{path}: tensor '{name}' claims the range {tensor['qmin']}..{tensor['qmax']} "
                             f"({tensor['levels']} levels), not that of {tensor['method']} at {tensor['bits']} bits")
        codes, scale = tensor["codes"], tensor["scale"]
        if not all(type(d) is int and d >= 0 for d in tensor["shape"]) or list(codes.shape) != tensor["shape"]:
            raise ValueError(f"{path}: tensor '{name}' has codes of shape {list(codes.shape)}, "
                             f"not its shape {tensor['shape']}")
        if scale.ndim != 2 or scale.shape[1] != 1 or tensor["zero_point"].shape != scale.shape or \
                codes.size % max(1, scale.shape[0]):
            raise ValueError(f"{path}: tensor '{name}' has scale/zero_point of shapes {list(scale.shape)}/"
                             f"{list(tensor['zero_point'].shape)}, not one per row of its codes")
        if codes.size and (codes.min() < tensor["qmin"] or codes.max() > tensor["qmax"]):
            raise ValueError(f"{path}: tensor '{name}' has codes outside its range {tensor['qmin']}..{tensor['qmax']}")
        check_outliers(tensor, f"{path}: tensor '{name}'")
    return data


def check_outliers(tensor, where):
    """ValueError unless a tensor's CSR outliers (if it has any) fit its shape: all three arrays, row pointers from
    0 rising to the number of values, columns inside the matrix, finite values."""
    present = [a for a in OUTLIER_ARRAYS if a in tensor]
    if not present:
        return
    if len(present) != len(OUTLIER_ARRAYS) or tensor["kind"] != "weight" or len(tensor["shape"]) != 2:
        raise ValueError(f"{where} has partial outlier arrays ({', '.join(present)}) or outliers on a tensor that "
                         f"is not a 2-D weight")
    crow, col, values = (tensor[a] for a in OUTLIER_ARRAYS)
    rows, cols = tensor["shape"]
    if not all(isinstance(a, np.ndarray) and a.ndim == 1 for a in (crow, col, values)) or \
            crow.dtype.kind not in "iu" or col.dtype.kind not in "iu" or values.dtype.kind != "f":
        raise ValueError(f"{where} has outlier arrays that are not 1-D (integer row pointers and columns, "
                         f"float values)")
    crow = crow.astype(np.int64)
    if len(crow) != rows + 1 or crow[0] != 0 or (np.diff(crow) < 0).any() or crow[-1] != len(col) or \
            len(col) != len(values) or (len(col) and (col.min() < 0 or col.max() >= cols)) or \
            not np.isfinite(values).all():
        raise ValueError(f"{where} has sparse outliers that do not match its shape {tensor['shape']} (CSR with "
                         f"{len(crow) - 1} rows, {len(values)} values)")


def load_quantized_data(path):
    """A file written by save_weights.py (pkl, safetensors or npz) as {format, version, ..., tensors: {name:
    {codes, scale, zero_point (numpy arrays), kind, site, bits, method, granularity, group_size, shape, ...}}}.
    FileNotFoundError when it is missing, ValueError with a one-line reason when it is not such a file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    file_type = os.path.splitext(path)[1][1:]
    try:
        if file_type == "pkl":
            with open(path, "rb") as f:
                data = restricted_load(f.read())
        elif file_type == "safetensors":
            from safetensors import safe_open
            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"{path} is not a file saved by save_weights.py")
                data = join({k: f.get_tensor(k) for k in f.keys()}, json.loads(meta["nanoqat"]))
        elif file_type == "npz":
            with np.load(path, allow_pickle=False) as f:
                if "__nanoqat__" not in f.files:
                    raise ValueError(f"{path} is not a file saved by save_weights.py")
                data = join({k: f[k] for k in f.files if k != "__nanoqat__"}, json.loads(str(f["__nanoqat__"])))
        else:
            raise ValueError(f"{path}: unknown file type '.{file_type}'; expected one of "
                             f"{', '.join('.' + t for t in FILE_TYPES)}")
    except RefusedGlobal as e:
        raise ValueError(f"{path} was refused, nothing in it was run: {e}") from None
    except ValueError:
        raise
    except Exception as e:  # truncated files, foreign zips and pickles, missing arrays
        raise ValueError(f"{path} is not a file saved by save_weights.py ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    return check(data, path)


# ---------------------------------------------------------------------------------------------------------------

def build_parser():
    p = OneLineParser(prog="save_weights.py", description="Save the integer codes of a quantized checkpoint.")
    p.add_argument("--device", default="cpu", help="device the model is rebuilt on (cpu, cuda, ...)")
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt (or the path of a checkpoint file)")
    p.add_argument("--file_name", default="quantized_data", help="output file, without or with its extension")
    p.add_argument("--file_type", default="pkl", choices=FILE_TYPES,
                   help="pkl (restricted unpickler on load), or safetensors / npz (cannot carry code)")
    p.add_argument("--snr_batch_size", type=int, default=4,
                   help="validation sequences run to measure the activations' quantization error (0: skip)")
    p.add_argument("--overwrite", action="store_true", help="replace --file_name if it exists")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.snr_batch_size <= 4096:
        parser.error(f"--snr_batch_size={args.snr_batch_size}: must be in 0..4096")
    try:
        check_device(args.device)
    except ValueError as e:
        parser.error(f"--device={args.device}: {e}")
    path = args.file_name if args.file_name.endswith(f".{args.file_type}") else f"{args.file_name}.{args.file_type}"
    source = os.path.join(args.out_dir, "ckpt.pt") if os.path.isdir(args.out_dir) else args.out_dir
    try:
        check_output_file(path, [source], args.overwrite)
    except ValueError as e:
        parser.error(f"--file_name={args.file_name}: {e}")
    try:
        checkpoint = load_checkpoint(args.out_dir, args.device)
        if is_packed(checkpoint):
            check_packed(checkpoint, source)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"save_weights.py: error: --out_dir={args.out_dir}: {e}")
    model_args = checkpoint["model_args"]
    quantized = any(v != "linear" for v in model_args.get("linear_variants", {}).values())
    data = {"tensors": None}
    if quantized or is_packed(checkpoint) or model_args.get("embedding_quant") or checkpoint.get("activations"):
        data = collect(checkpoint, args.device, args.snr_batch_size)
    if not data["tensors"]:
        sys.exit(f"save_weights.py: error: --out_dir={args.out_dir}: the checkpoint has no quantized weight and no "
                 f"stored activation (train with --linear_variant_*=quantized_linear or --store_activations)")
    if not data["quantization_enabled"]:
        print("save_weights.py: note: the checkpoint was saved during the full-precision warm-up; "
              "its weights are saved as they quantize", file=sys.stderr)
    save(data, path)
    kinds = [t["kind"] for t in data["tensors"].values()]
    print(f"saved {kinds.count('weight')} weights and {kinds.count('activation')} activations to {path}")
    sites = outlier_summary(data["tensors"])
    if sites:
        print("outliers kept in full precision (CSR beside the codes), per site summed over layers:")
        for site, (n, numel) in sites.items():
            print(f"  {site:<10} {n:>9,} of {numel:>11,} weights ({100 * n / numel:.2f}%)")


if __name__ == "__main__":
    main()
