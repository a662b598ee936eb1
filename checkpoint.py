"""Checkpoints: written atomically (temp file, then rename), read with torch.load(weights_only=True) so that
a file from a stranger cannot run code. They hold only tensors and plain Python values."""
import dataclasses
import os
import pickle
import tempfile

import torch

from model import GPT, GPTConfig
from quantization.layers import ActQuant
from quantization.quantizers import code_range, smallest_int_dtype
from safety import clean_stale_tmp, safe_name

REQUIRED_KEYS = ("model", "model_args")
# model_args every checkpoint must carry (the rest have GPTConfig's defaults), and the largest value believed
REQUIRED_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
MAX_DIM = 2 ** 31 - 1


def save_checkpoint(path, checkpoint):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    clean_stale_tmp(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def checkpoint_dataset(checkpoint):
    """The dataset a checkpoint was trained on (older checkpoints keep it only in their config)."""
    return checkpoint.get("dataset") or checkpoint.get("config", {}).get("dataset", "shakespeare_char")


def load_checkpoint(path, device="cpu"):
    """The checkpoint dict; FileNotFoundError or ValueError with a one-line reason when it cannot be used."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = next((line.strip() for line in str(e).splitlines() if "unsupported global" in line.lower()), None)
        raise ValueError(f"{path} is not a readable checkpoint: " + (
            f"it asks for code ({refused}); refused, nothing in it was run" if refused else
            "corrupt, or not a torch checkpoint of tensors and plain values; nothing in it was run")) from None
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else "truncated or corrupt"
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first})") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise ValueError(f"{path} is not a nanoQAT checkpoint (expected the keys {', '.join(REQUIRED_KEYS)})")
    dataset = checkpoint.get("dataset")
    try:
        if dataset is not None and (not isinstance(dataset, str) or safe_name(dataset) != dataset):
            raise ValueError
    except ValueError:
        raise ValueError(f"{path}: its dataset {str(dataset)[:80]!r} is not the name of a folder under data/") from None
    try:
        check_model_args(checkpoint["model_args"])
        check_state(checkpoint)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return checkpoint


def check_model_args(model_args):
    """ValueError naming the field unless `model_args` describes a GPT that GPTConfig and GPT accept."""
    if not isinstance(model_args, dict):
        raise ValueError("model_args is not a dict")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(str(k) for k in model_args if k not in fields)
    if unknown:
        raise ValueError(f"model_args has unknown config field(s) {', '.join(unknown)} (a newer or foreign checkpoint?)")
    for key in REQUIRED_MODEL_ARGS:
        value = model_args.get(key)
        if type(value) is not int or not 1 <= value <= MAX_DIM:
            raise ValueError(f"model_args lacks a valid '{key}' (a positive integer), got {value!r}")
    if model_args["n_embd"] % model_args["n_head"]:
        raise ValueError(f"model_args: n_embd={model_args['n_embd']} is not divisible by n_head={model_args['n_head']}")
    dropout = model_args.get("dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise ValueError(f"model_args: dropout={dropout!r} is not in [0, 1)")
    try:
        GPTConfig(**model_args)
        with torch.device("meta"):  # builds the module tree without allocating any weight
            GPT(GPTConfig(**model_args))
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        raise ValueError(f"model_args describe no valid model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def check_state(checkpoint):
    """ValueError unless checkpoint['model'] holds exactly the tensors (names and shapes) its model_args' GPT has;
    the weights of a packed checkpoint's quantized layers are in checkpoint['packed_weights'] instead."""
    state = checkpoint["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError("'model' is not a dict of named tensors")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(GPTConfig(**checkpoint["model_args"])).state_dict().items()}
    packed = checkpoint.get("packed_weights", {})
    if not isinstance(packed, dict):
        raise ValueError("'packed_weights' is not a dict")
    for name, p in packed.items():
        key = f"{name}.weight"
        if key not in expected or not isinstance(p, dict) or not {"codes", "shape", "scale", "zero_point", "spec"} <= set(p):
            raise ValueError(f"packed weight '{name}' is not a weight of the model, or lacks codes/shape/scale/spec")
        if list(p["shape"]) != list(expected[key]):
            raise ValueError(f"packed weight '{name}' has shape {p['shape']}, the model's is {list(expected[key])}")
    missing = [k for k in expected if k not in state and k[:-len(".weight")] not in packed]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"its tensors do not match its model_args (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    wrong = [k for k, v in state.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise ValueError(f"tensor {wrong[0]} has shape {list(state[wrong[0]].shape)}, its model_args give "
                         f"{list(expected[wrong[0]])}")


def stored_activations(model):
    """{module name: {codes, scale, zero_point}} for every activation site that has stored one."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ActQuant) and module.codes is not None:
            qmin, qmax = code_range(module.spec)
            out[name] = {"codes": module.codes.to(smallest_int_dtype(qmin, qmax)).cpu(),
                         "scale": module.scale.cpu(), "zero_point": module.zero_point.cpu()}
    return out


def restore_activations(model, activations):
    modules = dict(model.named_modules())
    for name, saved in activations.items():
        if name in modules:
            module = modules[name]
            module.codes = saved["codes"].float()
            module.scale, module.zero_point = saved["scale"], saved["zero_point"]
