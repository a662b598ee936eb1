"""Shared test fixtures: the char-level data is prepared once, and tiny models are trained once per session.

pytest.ini runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`; `-n 0` runs it in one process). Each
worker runs whole test files, the costliest first (COST); files that share an in-memory fixture run on one worker
(SHARED); the trained checkpoints (folders) are built once for both workers (shared_folder); each worker and what it
starts computes on one thread, so that two workers do not fight over the two cores."""
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER:  # before torch is imported here or in a script a test starts: one intra-op thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# seconds each test file took on one of two workers (2 CPU cores): the scheduler hands out the costliest first, so that
# the two workers end together; a file not named here goes after these
COST = {"test_kernels.py": 220, "test_spin_quant.py": 120, "test_train.py": 55, "test_fuzz.py": 50,
        "test_generate.py": 50, "test_gguf.py": 45, "test_perplexity.py": 16, "test_hf.py": 15, "test_demos.py": 14,
        "test_binary_linear.py": 13}
# files that share a session fixture held in memory (not a folder): one worker runs them, so it is built once
SHARED = {"test_autoround.py": "ptq_w3", "test_gptq.py": "ptq_w3", "test_spin_quant.py": "tiny_trained",
          "test_spin_quant_qat.py": "tiny_trained", "test_spinquant_s4.py": "tiny_trained"}


def pytest_sessionstart(session):
    """The datasets are prepared before any worker starts: test_fuzz.py checks that refused commands write nothing
    into the repository, so no other worker may write there meanwhile."""
    if not WORKER:
        for dataset in ("shakespeare_char", "shakespeare"):
            prepared(dataset)


def pytest_xdist_make_scheduler(config, log):
    """loadfile scheduling (a test file is one work unit) with the units of SHARED joined and COST's order."""
    from xdist.scheduler import LoadFileScheduling
    if config.getvalue("dist") != "loadfile":
        return None

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid):
            name = os.path.basename(nodeid.split("::", 1)[0])
            return SHARED.get(name, name)

        def schedule(self):
            self.config.option.loadscopereorder = False  # the collection's order, which COST sorted
            super().schedule()

    return Scheduling(config, log)


def pytest_collection_modifyitems(items):
    """The costliest files first (COST; every worker sorts the same collection the same way)."""
    cost = {}  # per work unit
    for name, seconds in COST.items():
        cost[SHARED.get(name, name)] = cost.get(SHARED.get(name, name), 0) + seconds
    items.sort(key=lambda item: -cost.get(SHARED.get(item.path.name, item.path.name), 0))


def once(tmp_path_factory, name, build):
    """Calls build() once in this test session: under pytest-xdist the first worker to ask builds under a file lock
    and the others wait for it."""
    if not WORKER:
        return build()
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp().parent  # this session's, shared by its workers
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            build()
            (root / f"{name}.done").touch()


def shared_folder(tmp_path_factory, name, build):
    """A folder made by build(folder) once in this test session, for every worker; returns its path."""
    if not WORKER:
        folder = str(tmp_path_factory.mktemp(name))
        build(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name

    def make():
        shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed midway left
        folder.mkdir()
        build(str(folder))
    once(tmp_path_factory, name, make)
    return str(folder)

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


def run_interpreted(script, *args, timeout=600):
    """Run a test script (`python -c script ROOT *args`) in a fresh interpreter under TRITON_INTERPRET=1 (set before
    Triton is imported), so that the Triton kernels run on the CPU; returns the JSON its last line prints."""
    return Interpreted(script, *args, timeout=timeout).result()


class Interpreted:
    """run_interpreted started now and read later (result()): the Triton interpreter keeps one core busy, so two
    scripts that do not depend on each other, started together, take the time of the longer on a 2-core machine."""

    def __init__(self, script, *args, timeout=600):
        env = dict(os.environ, TRITON_INTERPRET="1")
        self.stdout, self.stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill up
        self.proc = subprocess.Popen([sys.executable, "-c", script, ROOT, *args], cwd=ROOT, env=env,
                                     stdout=self.stdout, stderr=self.stderr, text=True)
        self.deadline = time.monotonic() + timeout

    def result(self):
        """What run_interpreted returns (the JSON of the last line); waits for the script to end."""
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        finally:
            self.stop()
        self.stderr.seek(0)
        self.stdout.seek(0)
        assert self.proc.returncode == 0, self.stderr.read()[-3000:]
        return json.loads(self.stdout.read().strip().splitlines()[-1])

    def stop(self):
        """Ends the script if it still runs (a timeout, or a test that never asked for the result)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def load_script(path):
    """A script of the repository (path relative to its root, e.g. "bench/spinquant_clipping.py") loaded as a module
    from its file, its folder kept off sys.path: bench/kernels.py would otherwise shadow the `kernels` package that
    transformers imports, for every later test."""
    import importlib.util
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(main, *argv):
    """Call a script's main(argv) in this process (no interpreter start-up); returns its error line or None.
    The objects the session holds are frozen meanwhile (gc.freeze), so that a garbage collection during the call
    walks what the call allocated, as in a fresh interpreter: bench/decode.py collects after every format, and
    each full collection would walk the whole session's objects (a quarter to three quarters of a second)."""
    gc.freeze()
    try:
        main(list(argv))
    except SystemExit as e:
        if e.code not in (None, 0):
            return str(e.code)
    finally:
        gc.unfreeze()  # back in the oldest generation: collected as before once garbage
    return None


def train_in_process(out_dir, *flags):
    import train as train_script
    error = run_main(train_script.main, f"--out_dir={out_dir}", *TINY, *flags)
    assert error is None, error


def prepared(dataset):
    """data/<dataset>, prepared if its files are missing."""
    data_dir = os.path.join(ROOT, "data", dataset)
    if not all(os.path.exists(os.path.join(data_dir, f)) for f in ("train.bin", "val.bin", "meta.json")):
        run_script(f"data/{dataset}/prepare.py")
    return data_dir


@pytest.fixture(scope="session")
def char_data():
    return prepared("shakespeare_char")


@pytest.fixture(scope="session")
def bpe_data():
    """The GPT-2 BPE Shakespeare dataset."""
    return prepared("shakespeare")


@pytest.fixture(scope="session")
def trained_fp(char_data, tmp_path_factory):
    """A full-precision char-level model (2 layers, 64 wide) trained for 600 steps: the base for PTQ tests."""
    return shared_folder(tmp_path_factory, "trained_fp", lambda out: run_script(
        "train.py", f"--out_dir={out}", "--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=64",
        "--batch_size=16", "--max_iters=600", "--lr_decay_iters=600", "--eval_interval=600", "--eval_iters=10",
        "--device=cpu", "--dtype=float32", "--log_interval=100"))


# flags of a tiny model with every weight and activation quantizer on, mixing methods, granularities and bits
QUANT_FLAGS = ["--quantization_warmup_iters=0", "--store_activations", "--quantize_embedding",
               "--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear",
               "--quantize_linear_bits_attn=4", "--quantize_linear_method_v=affine_quant",
               "--quantize_linear_granularity_mlp=per_group", "--quantize_linear_group_size_mlp=16",
               "--quantize_linear_method_mlp_down=ternary_quant",
               "--quantize_attn_act", "--quantize_mlp_act", "--quantize_attn_act_bits=6",
               "--quantize_attn_act_softmax_input_bits=8", "--quantize_mlp_act_activation_output_bits=3"]


@pytest.fixture(scope="session")
def quant_ckpt(char_data, tmp_path_factory):
    """A tiny model trained 20 steps with QUANT_FLAGS (per-token affine activations): its out_dir."""
    return shared_folder(tmp_path_factory, "quant_ckpt", lambda out: train(
        out, "--max_iters=20", "--eval_interval=20", "--activations_quant_method=affine_quant",
        "--activations_quant_granularity=per_token", *QUANT_FLAGS))


@pytest.fixture(scope="session")
def quant_saved(quant_ckpt, tmp_path_factory):
    """quant_ckpt saved by save_weights.py in every format: {file type: path}."""
    from quantization import save_weights
    paths = {t: os.path.join(quant_ckpt, f"quantized_data.{t}") for t in save_weights.FILE_TYPES}

    def save():
        for file_type, path in paths.items():
            save_weights.main([f"--out_dir={quant_ckpt}", f"--file_name={path}", f"--file_type={file_type}"])
    once(tmp_path_factory, "quant_saved", save)
    return paths


@pytest.fixture(scope="session")
def ptq_w3(trained_fp):
    """trained_fp's model quantized to 3 bits (symmetric, per output channel) by round-to-nearest, GPTQ and
    AutoRound on the same calibration draw, built once for test_autoround.py and test_gptq.py."""
    import copy

    import torch

    from quantization.autoround import AutoRound
    from quantization.gptq import GPTQ
    from quantization.perplexity import split_tokens
    from quantization.rtn import rtn_quantize, weight_spec
    from inference import load_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and far faster when the cores are busy
    fp, _ = load_model(trained_fp, "cpu")
    train_tokens = split_tokens("shakespeare_char", "train")
    out = {"fp": fp, "val": split_tokens("shakespeare_char", "val")[:20000], "spec": weight_spec(3, 0, sym=True)}
    out["rtn"] = copy.deepcopy(fp)
    out["rtn_records"] = rtn_quantize(out["rtn"], out["spec"])
    config = dict(bits=3, group_size=0, sym=True, nsamples=32, batch_size=8, seed=0, progress=False,
                  log=lambda line: None)
    out["gptq"] = copy.deepcopy(fp)
    gptq = GPTQ(out["gptq"], train_tokens, **config)
    out["gptq_records"] = gptq.quantize()
    out["autoround"] = copy.deepcopy(fp)
    autoround = AutoRound(out["autoround"], train_tokens, iters=50, **config)
    out["autoround_records"] = autoround.quantize()
    out["autoround_block_losses"] = autoround.block_losses
    torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One intra-op thread for a test module of tiny models: as fast on idle cores, and many times faster than
    two spinning threads when other jobs share the cores."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_log(out_dir):
    """train.py's JSON log (out_dir/log.jsonl), one record per line."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_trained(char_data):
    """A char-level GPT (2 layers, 32 wide, biases) trained 300 steps in this process: (model, train tokens). The
    SpinQuant tests share it (tests/test_spin_quant.py, test_spin_quant_qat.py, test_spinquant_s4.py)."""
    import torch
    from model import GPT, GPTConfig
    from quantization.perplexity import split_tokens
    from tokenizer import load_meta
    tokens = split_tokens("shakespeare_char", "train")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=load_meta(char_data)["vocab_size"],
                          bias=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        ix = torch.randint(0, len(tokens) - 33, (16,), generator=g)
        batch = torch.stack([tokens[i:i + 33] for i in ix.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokens


def _save_plain(folder, model):
    """A full-precision checkpoint of `model` (shakespeare_char) in `folder`."""
    from dataclasses import asdict
    from checkpoint import save_checkpoint
    save_checkpoint(os.path.join(folder, "ckpt.pt"), {"model": model.state_dict(), "model_args": asdict(model.config),
                                                      "dataset": "shakespeare_char", "iter_num": 0})


@pytest.fixture(scope="session")
def plain_dir(tiny_trained, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("plain"))
    _save_plain(folder, tiny_trained[0])
    return folder


def _random_model(bias=True, n_embd=24, n_head=2, seed=0):
    """A float64 GPT with LayerNorm gains and biases, linear biases and a tied embedding, all far from their init."""
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=n_head, n_embd=n_embd, block_size=16, vocab_size=40, bias=bias)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.endswith("bias"):
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def _random_orthogonal(n, seed):
    import torch
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _calibration(tokens, n=24, seqlen=33):
    """n windows of seqlen tokens, 997 apart: the SpinQuant tests' calibration samples."""
    return [tokens[i * 997:i * 997 + seqlen].reshape(1, -1) for i in range(n)]
