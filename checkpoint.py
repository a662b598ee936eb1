"""Checkpoint files: written atomically (temp file, then rename), read with torch.load(weights_only=True) so that
a file from a stranger cannot run code. They hold only tensors and plain Python values. File I/O only: checking a
checkpoint against the model it describes is inference.load_checkpoint's job."""
import os
import pickle

import torch

from safety import clean_stale_tmp, safe_name, write_atomic

REQUIRED_KEYS = ("model", "model_args")


def save_checkpoint(path, checkpoint):
    clean_stale_tmp(os.path.dirname(os.path.abspath(path)))
    write_atomic(path, lambda f: torch.save(checkpoint, f), mode="wb", prefix=".ckpt-")


def checkpoint_dataset(checkpoint):
    """The dataset a checkpoint was trained on (older checkpoints keep it only in their config)."""
    return checkpoint.get("dataset") or checkpoint.get("config", {}).get("dataset", "shakespeare_char")


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict of a file (or a folder's ckpt.pt), read as data: FileNotFoundError or ValueError with a
    one-line reason when it is no nanoQAT checkpoint. inference.load_checkpoint also checks it against the model."""
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
    return checkpoint
