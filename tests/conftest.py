"""Shared test fixtures: the char-level data is prepared once, and tiny models are trained once per session."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a model small enough to train in seconds on 2 CPU cores
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=2",
        "--device=cpu", "--dtype=float32", "--warmup_iters=5", "--log_interval=1"]


def run_script(script, *flags, check=True, env=None):
    """Run one of the repo's scripts in a fresh interpreter; returns the CompletedProcess."""
    cmd = [sys.executable, os.path.join(ROOT, script), *flags]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def train(out_dir, *flags, check=True):
    return run_script("train.py", f"--out_dir={out_dir}", *TINY, *flags, check=check)


@pytest.fixture(scope="session")
def char_data():
    data_dir = os.path.join(ROOT, "data", "shakespeare_char")
    if not all(os.path.exists(os.path.join(data_dir, f)) for f in ("train.bin", "val.bin", "meta.json")):
        run_script("data/shakespeare_char/prepare.py")
    return data_dir


@pytest.fixture(scope="session")
def trained_fp(char_data, tmp_path_factory):
    """A full-precision char-level model (2 layers, 64 wide) trained for 600 steps: the base for PTQ tests."""
    out = tmp_path_factory.mktemp("trained_fp")
    run_script("train.py", f"--out_dir={out}", "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64",
               "--batch_size=16", "--max_iters=600", "--lr_decay_iters=600", "--eval_interval=600",
               "--eval_iters=10", "--device=cpu", "--dtype=float32", "--log_interval=100")
    return str(out)
