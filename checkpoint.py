"""Checkpoints: written atomically (temp file, then rename), read with torch.load(weights_only=True) so that
a file from a stranger cannot run code. They hold only tensors and plain Python values."""
import os
import pickle
import tempfile

import torch

from quantization.layers import ActQuant
from quantization.quantizers import code_range, smallest_int_dtype

REQUIRED_KEYS = ("model", "model_args")


def save_checkpoint(path, checkpoint):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
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
    return checkpoint


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
