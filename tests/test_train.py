"""train.py end to end on tiny models: the warm-up switch, learning, exact resumption, DDP, bad input."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train as train_module
from bench.ddp_scaling import worker_pid
from conftest import ROOT, TINY, read_log, run_main, train, train_in_process
from inference import load_checkpoint
from model import GPT
from quantization.layers import FakeQuantize

QAT = ["--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear"]


@pytest.fixture
def quantized_forwards(monkeypatch):
    """For every training forward pass, in order: did any weight quantizer actually run?"""
    per_step, active = [], []
    fq_forward, gpt_forward = FakeQuantize.forward, GPT.forward

    def counting_fq(self, weight):
        if self.enabled:
            active.append(1)
        return fq_forward(self, weight)

    def recording_gpt(self, *args, **kwargs):
        before = len(active)
        out = gpt_forward(self, *args, **kwargs)
        if self.training:
            per_step.append(len(active) > before)
        return out

    monkeypatch.setattr(FakeQuantize, "forward", counting_fq)
    monkeypatch.setattr(GPT, "forward", recording_gpt)
    return per_step


def test_quantization_switches_on_at_warmup_also_after_resume(char_data, tmp_path, quantized_forwards):
    out = str(tmp_path)
    common = TINY + QAT + [f"--out_dir={out}", "--quantization_warmup_iters=8", "--eval_interval=3",
                           "--lr_decay_iters=12"]
    train_module.main(common + ["--max_iters=6"])
    assert quantized_forwards == [False] * 6
    quantized_forwards.clear()
    train_module.main(common + ["--max_iters=12", "--init_from=resume"])
    assert quantized_forwards == [False, False] + [True] * 4  # iterations 6..11, quantized from 8 on
    logged = {r["iter"]: r["quantized"] for r in read_log(out) if "loss" in r}
    assert logged == {i: i >= 8 for i in range(12)}


def test_a_resumed_run_keeps_its_warmup_unless_given(char_data, tmp_path, quantized_forwards):
    """--quantization_warmup_iters left out on resume: the checkpoint's (here 3), not the default (100), which would
    train the rest of this run in full precision again."""
    out = str(tmp_path)
    common = TINY + QAT + [f"--out_dir={out}", "--eval_interval=3", "--lr_decay_iters=9"]
    train_module.main(common + ["--max_iters=6", "--quantization_warmup_iters=3"])
    quantized_forwards.clear()
    train_module.main(common + ["--max_iters=9", "--init_from=resume"])
    assert quantized_forwards == [True] * 3  # iterations 6..8
    quantized_forwards.clear()
    train_module.main(common + ["--max_iters=12", "--init_from=resume", "--quantization_warmup_iters=11"])
    assert quantized_forwards == [False, False, True]  # given: iterations 9 and 10 in full precision


def test_training_lowers_the_loss(char_data, tmp_path):
    train_in_process(tmp_path, *QAT, "--quantize_linear_bits=4", "--quantization_warmup_iters=50", "--max_iters=150",
          "--eval_interval=150", "--lr_decay_iters=150", "--learning_rate=3e-3")
    evals = [r for r in read_log(tmp_path) if "val_loss" in r]
    assert evals[0]["iter"] == 0 and evals[-1]["iter"] == 150
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert os.path.exists(tmp_path / "ckpt.pt")


def test_resumed_run_matches_uninterrupted_run(char_data, tmp_path):
    flags = QAT + ["--quantize_linear_method=stochastic_quant", "--quantize_linear_bits=4", "--dropout=0.1",
                   "--quantization_warmup_iters=4", "--eval_interval=5", "--lr_decay_iters=16"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    train_in_process(whole, *flags, "--max_iters=16")
    train_in_process(part, *flags, "--max_iters=10")
    train_in_process(part, *flags, "--max_iters=16", "--init_from=resume")
    losses = lambda d: {r["iter"]: r["loss"] for r in read_log(d) if "loss" in r}
    expected, got = losses(whole), losses(part)
    assert sorted(got) == list(range(16))
    assert [got[i] for i in range(10, 16)] == [expected[i] for i in range(10, 16)]
    assert len({expected[i] for i in range(10, 16)}) > 1  # the run really trained


def torchrun_cmd(out_dir, *flags):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}", *TINY, *QAT, "--gradient_accumulation_steps=2",
            "--backend=gloo", "--ddp_timeout=60", *flags]  # a stuck collective fails in a minute, with a message


def kill_all(proc, pids):
    """SIGKILL torchrun's process group and its workers (torchrun starts each worker in a session of its own)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL) if pid else None
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def torchrun(out_dir, *flags):
    """Run a 2-process job to its end; on a timeout the whole process group goes (no stray workers for later tests)
    and the job's output is in the failure."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(torchrun_cmd(out_dir, *flags), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        workers = [worker_pid(proc.pid, rank) for rank in (0, 1)]
        for pid in filter(None, workers):  # each worker prints its threads' stacks (train.py's SIGUSR1 handler)
            os.kill(pid, signal.SIGUSR1)
        time.sleep(2)
        kill_all(proc, workers)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 300 s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_torchrun_trains_with_ddp_on_cpu(char_data, tmp_path):
    result = torchrun(tmp_path, "--max_iters=30", "--eval_interval=30", "--lr_decay_iters=30",
                      "--learning_rate=3e-3", "--quantization_warmup_iters=10")
    assert "world size 2" in result.stdout
    assert "tokens per iteration: 512" in result.stdout  # 2 processes x 1 micro-batch x 8 x 32
    evals = [r for r in read_log(tmp_path) if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 30


def test_same_global_batch_gives_the_same_losses_on_one_or_two_processes(char_data, tmp_path):
    """Two processes with accumulation 1 each train on exactly the batches of one process with accumulation 2
    (train.py draws one global batch per step): the same losses, through the warm-up -> quantization switch."""
    flags = ["--quantization_warmup_iters=6", "--eval_interval=6", "--max_iters=12", "--lr_decay_iters=12",
             "--learning_rate=3e-3"]
    train_in_process(tmp_path / "one", *QAT, "--gradient_accumulation_steps=2", *flags)
    torchrun(tmp_path / "two", *flags)
    for key in ("loss", "val_loss"):
        one = {r["iter"]: r[key] for r in read_log(tmp_path / "one") if key in r}
        two = {r["iter"]: r[key] for r in read_log(tmp_path / "two") if key in r}
        assert sorted(one) == sorted(two) and len(one) >= 3
        assert max(abs(one[i] - two[i]) for i in one) < 1e-5, (one, two)
    assert one[12] < one[0] - 0.05  # it trained


def test_torchrun_killed_rank_stops_clearly_and_resume_matches(char_data, tmp_path):
    """SIGKILL to rank 1 mid-run: the job stops with torchrun's failure report and train.py's one line; resuming
    from the last checkpoint on 2 processes gives the uninterrupted run's losses (each process's random state,
    dropout and stochastic rounding included, is in the checkpoint)."""
    from bench.ddp_scaling import read_log as read_growing_log
    flags = ["--quantize_linear_method=stochastic_quant", "--quantize_linear_bits=4", "--dropout=0.1",
             "--quantization_warmup_iters=3", "--eval_interval=4", "--lr_decay_iters=40", "--max_iters=40",
             "--always_save_checkpoint"]
    torchrun(tmp_path / "whole", *flags)
    part = tmp_path / "part"
    # the output goes to a file, not a pipe: an undrained pipe fills up and blocks the processes writing to it
    output_path = tmp_path / "part_output.txt"
    with open(output_path, "w") as output_file:
        proc = subprocess.Popen(torchrun_cmd(part, *flags), cwd=ROOT, stdout=output_file, stderr=subprocess.STDOUT,
                                text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
        killed, deadline = False, time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            logged = [r["iter"] for r in read_growing_log(part) if "loss" in r]
            if logged and logged[-1] >= 5 and not killed:
                workers = [worker_pid(proc.pid, rank) for rank in (0, 1)]
                os.kill(workers[1], signal.SIGKILL)
                killed = True
            time.sleep(0.02)
        timed_out = proc.poll() is None
        kill_all(proc, workers if killed else [])  # nothing of it may outlive it and compete with the resumed run
        proc.wait(timeout=60)
    output = output_path.read_text()
    assert killed and proc.returncode != 0 and not timed_out, output[-3000:]
    assert "ChildFailedError" in output and "Signal 9 (SIGKILL)" in output
    note = [line for line in output.splitlines() if line.startswith("train.py: error: rank 0")]
    assert len(note) == 1 and "--init_from=resume" in note[0], output[-3000:]
    start = torch.load(part / "ckpt.pt", weights_only=True)["iter_num"]
    assert 4 <= start < 40
    torchrun(part, *flags, "--init_from=resume")
    rngs = torch.load(part / "ckpt.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["cpu"], rngs[1]["cpu"])
    losses = lambda d: {r["iter"]: r["loss"] for r in read_log(d) if "loss" in r}
    whole, resumed = losses(tmp_path / "whole"), losses(part)  # the resumed run's records come last: they win
    assert [resumed[i] for i in range(start, 40)] == [whole[i] for i in range(start, 40)]


@pytest.mark.parametrize("flags,message", [
    (["--linear_variant_mlp=fancy_linear"], "argument --linear_variant_mlp: invalid choice: 'fancy_linear'"),
    (["--quantize_linear_method=fancy_quant"], "argument --quantize_linear_method: invalid choice"),
    (QAT + ["--quantize_linear_bits=9"], "--quantize_linear_bits: bits=9 is out of range; expected 2..8"),
    (QAT + ["--quantize_linear_granularity=per_group", "--quantize_linear_group_size=24"],
     "--quantize_linear_group_size=24 does not divide the input width 32"),
    (["--dataset=no_such_data"], "--dataset=no_such_data"),
    (["--init_from=resume"], "--init_from=resume: checkpoint"),
    (["--compile=maybe"], "expected a boolean"),
])
def test_bad_input_gives_one_clear_line(char_data, tmp_path, flags, message):
    error = run_main(train_module.main, f"--out_dir={tmp_path / 'o'}", *TINY, *flags)
    assert error is not None and message in error and "\n" not in error, error
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


def test_cli_error_is_one_line_and_nonzero(char_data, tmp_path):
    result = train(tmp_path, *QAT, "--quantize_linear_bits=9", check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == ["train.py: error: --quantize_linear_bits: bits=9 is out of range; expected 2..8"]


def test_corrupt_checkpoint_is_refused_and_kept(char_data, tmp_path):
    os.makedirs(tmp_path, exist_ok=True)
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"not a checkpoint at all")
    result = train(tmp_path, "--init_from=resume", check=False)
    assert result.returncode != 0 and "is not a readable checkpoint" in result.stderr
    assert ckpt.read_bytes() == b"not a checkpoint at all"


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    from inference import load_checkpoint
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload(), "model_args": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="asks for code"):
        load_checkpoint(str(tmp_path))
    assert not marker.exists()


def test_checkpoint_write_is_atomic(tmp_path):
    from checkpoint import save_checkpoint
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_args": {}})
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "bad": Unsaveable()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_eval_only_evaluates_and_writes_no_checkpoint(char_data, tmp_path):
    train_in_process(tmp_path, "--eval_only", "--max_iters=50")
    records = read_log(tmp_path)
    assert [r["iter"] for r in records] == [0] and "val_loss" in records[0]
    assert not os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("always", [True, False])
def test_always_save_checkpoint_saves_at_every_evaluation(char_data, tmp_path, capsys, always):
    # a learning rate of 10 wrecks the model after one step, so step 2 never improves on step 0's val loss:
    # only --always_save_checkpoint saves there
    flags = ["--max_iters=4", "--eval_interval=2", "--learning_rate=10", "--warmup_iters=0", "--decay_lr=False"]
    train_in_process(tmp_path, *flags, f"--always_save_checkpoint={always}")
    out = capsys.readouterr().out
    after_step_2 = out.split("step 2:")[1].split("step 4:")[0]
    assert ("saved checkpoint" in after_step_2) == always


def test_ddp_compile_splits_a_qat_model_like_a_full_precision_one():
    """dynamo's DDPOptimizer cuts the compiled graph where DDP's gradient buckets end, counting a parameter's bytes
    at each node that takes it: the quantized layer's latent weight must enter the graph once, or a QAT model is cut
    several times finer than DDP's buckets (more graphs, less fusion)."""
    from torch._dynamo.backends.distributed import DDPOptimizer
    from model import GPTConfig, LINEAR_SITES

    def buckets(quantized):
        cfg = dict(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=64)
        if quantized:
            cfg.update(linear_variants={s: "quantized_linear" for s in LINEAR_SITES},
                       weight_quant={s: {} for s in LINEAR_SITES})
        torch._dynamo.reset()
        splitter = DDPOptimizer(bucket_bytes_cap=100_000, backend_compile_fn=lambda gm, example: gm.forward,
                                first_bucket_cap=100_000)
        x = torch.randint(0, 64, (1, 8))
        torch.compile(GPT(GPTConfig(**cfg)), backend=splitter.compile_fn)(x, x)
        torch._dynamo.reset()
        return [b.size for b in splitter.buckets]

    fp, qat = buckets(False), buckets(True)
    assert len(fp) >= 3 and qat == fp


def test_deterministic_holds_for_the_run_and_is_undone_after(char_data, tmp_path, monkeypatch):
    """--deterministic: torch.use_deterministic_algorithms (warning, not failing, on an op that has none) and cuBLAS's
    fixed workspace while the run trains; the process's own settings come back after it (the tests run train.py
    in-process), and the run trains as without the flag (the CPU is deterministic either way)."""
    seen = []
    original = train_module.train

    def spy(args, given):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return original(args, given)
    monkeypatch.setattr(train_module, "train", spy)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    train_in_process(str(tmp_path / "det"), "--max_iters=4", "--eval_interval=4", "--deterministic")
    train_in_process(str(tmp_path / "plain"), "--max_iters=4", "--eval_interval=4")
    assert seen[0] == (True, True, ":4096:8") and seen[1][0] is False
    assert not torch.are_deterministic_algorithms_enabled()
    a = torch.load(tmp_path / "det" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_calib_tokens_are_never_trained_on(char_data, tmp_path, monkeypatch):
    """--calib_tokens=C: every training window (the steps' and the train-loss estimate's) ends before the last C
    tokens of train.bin; the checkpoint records C, a resume keeps it and refuses another value; too many is one line."""
    data = np.memmap(os.path.join(char_data, "train.bin"), dtype=np.uint16, mode="r")
    total, block, calib = len(data), 32, len(data) - 32 - 40  # 40 window starts left
    seen, real = [], train_module.batch_loader

    def loader(args, data_dir, device):
        get_batch = real(args, data_dir, device)

        def recorded(split, ix=None, generator=None):
            x, y = get_batch(split, ix, generator)
            if split == "train":
                seen.append(torch.cat([x, y[:, -1:]], 1))
            return x, y
        return recorded
    monkeypatch.setattr(train_module, "batch_loader", loader)
    out = tmp_path / "c"
    train_in_process(out, "--max_iters=6", "--eval_interval=3", f"--calib_tokens={calib}")
    allowed = torch.from_numpy(np.stack([data[i:i + block + 1].astype(np.int64) for i in range(40)]))
    windows = torch.cat(seen)
    assert len(windows) > 6 * 8  # training steps and the loss estimates
    assert all((w == allowed).all(1).any() for w in windows)  # each window starts at one of the first 40 offsets
    assert load_checkpoint(str(out / "ckpt.pt"))["config"]["calib_tokens"] == calib
    error = run_main(train_module.main, f"--out_dir={out}", *TINY, "--max_iters=8", "--init_from=resume",
                     "--calib_tokens=5")
    assert error.startswith("train.py: error:") and "--calib_tokens=5 contradicts" in error
    error = run_main(train_module.main, f"--out_dir={tmp_path / 'd'}", *TINY, f"--calib_tokens={total}")
    assert error.startswith(f"train.py: error: --calib_tokens={total}:") and "\n" not in error
