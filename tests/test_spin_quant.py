"""SpinQuant: Hadamard constructions, exactness of folding and of every rotation, Cayley SGD, the saved checkpoint,
train.py --spinquant, and bad input."""
import math
import os
import re

import pytest
import torch

from checkpoint import save_checkpoint
from inference import load_checkpoint
from conftest import (TINY, _calibration, _random_model, _random_orthogonal, _rel, _save_plain, load_script, read_log,
                      run_main, train_in_process)
from model import GPT, GPTConfig
from quantization.fold import fold_norms
from quantization.hf import from_pretrained
from quantization.hadamard import (factor, hadamard_matrix, hadamard_transform, paley_hadamard,
                                   random_hadamard_matrix)
from quantization.perplexity import split_tokens
from quantization.spin_quant import SpinQuant

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("order", [12, 20, 44])
def test_paley_matrices_are_hadamard(order):
    H = paley_hadamard(order)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.t(), order * torch.eye(order, dtype=H.dtype))


@pytest.mark.parametrize("n", [64, 96, 384, 640, 1536])
def test_fast_transform_equals_dense_orthonormal_matrix(n):
    H = hadamard_matrix(n)
    assert (H @ H.t() - torch.eye(n, dtype=H.dtype)).abs().max() < 1e-12
    x = torch.randn(5, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert (hadamard_transform(x) - x @ H.t()).abs().max() < 1e-12
    assert factor(n)[0] in (1, 12, 20)


def test_width_without_construction_is_named():
    with pytest.raises(ValueError, match="width 36 has no Hadamard construction"):
        hadamard_matrix(36)


@pytest.mark.parametrize("rotations", [(), ("R1",), ("R2",), ("R3",), ("R4",), ("R1", "R2", "R3", "R4")])
def test_rotated_float64_model_computes_the_same_logits(rotations):
    model = _random_model()
    x = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    reference = model(x, x)[0]
    assert _rel(fold_norms(model)(x, x)[0], reference) < 1e-12
    sq = SpinQuant(model, bits=16, act_bits=16, kv_bits=16, rotations=rotations, dtype=torch.float64)
    with torch.no_grad():  # any orthogonal matrices, not only the Hadamard start
        if sq.R1 is not None:
            sq.R1.copy_(_random_orthogonal(24, 2))
        for i, R in enumerate(sq.R2 or []):
            R.copy_(_random_orthogonal(12, 3 + i))
    rotated = sq.bake()
    assert _rel(rotated(x, x)[0], reference) < 1e-6
    if "R4" in rotations:
        assert rotated.config.online_transforms == {"mlp_activation_output": "hadamard"}
    assert not rotated.config.tied_head and rotated.config.norm == "rmsnorm"


def test_optimize_reduces_the_quantized_loss_and_keeps_rotations_orthogonal(tiny_trained):
    model, tokens = tiny_trained
    calib = _calibration(tokens)
    data = torch.cat(calib)
    sq = SpinQuant(model, bits=2, act_bits=4, kv_bits=4, method="rtn", seed=0)

    def loss():
        with torch.no_grad():
            return sq.loss(data[:, :-1], data[:, 1:], quantize_weights=True).item()

    before = loss()
    sq.optimize(calib, steps=30, lr=1.5, batch_size=8, progress=False, holdout=0)  # learning alone: the last step
    after = loss()
    assert after < before - 0.02, (before, after)
    for R in [sq.R1, *sq.R2]:
        eye = torch.eye(R.shape[0], dtype=torch.float64)
        assert (R.detach().double() @ R.detach().double().t() - eye).abs().max() < 1e-5


def test_the_kl_objective_measures_the_quantized_model_against_the_model_as_given(tiny_trained):
    """learning_loss(objective="kl"): the KL divergence of the rotated, quantized model's next-token distribution
    from the full-precision one, here computed from the unrotated model as given (rotations leave it unchanged), in
    float64; learning on it lowers it, and an unknown objective is refused by name."""
    import torch.nn.functional as F
    from torch.func import functional_call
    model, tokens = tiny_trained
    calib = _calibration(tokens)
    data = torch.cat(calib)
    x, y = data[:, :-1], data[:, 1:]
    sq = SpinQuant(model, bits=2, act_bits=4, kv_bits=4, method="rtn", seed=0)
    with torch.no_grad():
        teacher = model.double()(x, y)[0]
        model.float()
        student = functional_call(sq.model, sq.rotated_state(True), (x, y))[0].double()
        expected = F.kl_div(F.log_softmax(student, -1).reshape(-1, student.shape[-1]),
                            F.log_softmax(teacher, -1).reshape(-1, teacher.shape[-1]), log_target=True,
                            reduction="batchmean").item()
        before = sq.learning_loss(x, y, True, "kl").item()
    assert expected > 0.01 and abs(before - expected) < 1e-3 * expected + 1e-5, (before, expected)
    assert sq.model.quantization_enabled  # the teacher's forward switched the quantizers back on
    sq.optimize(calib, steps=30, lr=1.5, batch_size=8, progress=False, holdout=0, objective="kl")
    with torch.no_grad():
        assert sq.learning_loss(x, y, True, "kl").item() < before
    with pytest.raises(ValueError, match="objective='mse'"):
        sq.optimize(calib, steps=1, progress=False, objective="mse")


def test_apply_passes_gptq_options_through_act_order_changes_the_codes(tiny_trained, monkeypatch):
    """--act_order reaches GPTQ (gptq_weight called with it) and changes the weights it picks."""
    from quantization import gptq
    model, tokens = tiny_trained
    calib = _calibration(tokens)
    seen, original = [], gptq.gptq_weight
    monkeypatch.setattr(gptq, "gptq_weight", lambda *a, **k: seen.append(k.get("act_order", a[4] if len(a) > 4
                                                                             else False)) or original(*a, **k))
    weights = []
    for act_order in (False, True):
        sq = SpinQuant(model, bits=4, act_bits=8, kv_bits=4, method="gptq", seed=1)
        sq.optimize(calib, steps=0, progress=False)
        sq.apply(progress=False, select=False, act_order=act_order)
        weights.append(sq.model.transformer.h[1].mlp.mlp_up.weight.detach().clone())
    assert seen[:12] == [False] * 12 and seen[12:] == [True] * 12
    assert not torch.equal(weights[0], weights[1])


def test_apply_saves_an_ordinary_packed_checkpoint(tiny_trained, tmp_path):
    from inference import load_model
    model, tokens = tiny_trained
    sq = SpinQuant(model, bits=4, act_bits=8, kv_bits=4, method="gptq", seed=1)
    calib = _calibration(tokens)
    sq.optimize(calib, steps=3, progress=False)
    records = sq.apply(progress=False, select=False)  # the learned rotations, whatever the held-out choice
    assert len(records) == 2 * 6
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), sq.checkpoint({"model_args": {}, "dataset": "shakespeare_char"}))
    x = torch.cat(calib)[:4, :-1]
    expected = sq.model(x, x)[0]
    loaded = from_pretrained(str(tmp_path))
    assert torch.equal(loaded(x, x)[0], expected)
    via_sample, _ = load_model(str(tmp_path), "cpu")
    assert torch.equal(via_sample(x, x)[0], expected)
    assert load_checkpoint(str(path))["model_args"]["online_transforms"] == {"mlp_activation_output": "hadamard"}
    from quantization import save_weights
    saved = str(tmp_path / "w.npz")
    assert run_main(save_weights.main, f"--out_dir={tmp_path}", f"--file_name={saved}", "--file_type=npz") is None
    tensors = save_weights.load_quantized_data(saved)["tensors"]
    assert len(tensors) == 12
    down = tensors["transformer.h.1.mlp.mlp_down.weight"]
    assert torch.equal(torch.from_numpy(save_weights.dequantize_entry(down)), loaded.transformer.h[1].mlp.mlp_down.weight)


def test_random_hadamard_start_depends_on_the_seed(tiny_trained):
    model, _ = tiny_trained
    a, b = (SpinQuant(model, bits=4, seed=s) for s in (0, 1))
    assert not torch.equal(a.R1, b.R1)
    assert torch.equal(random_hadamard_matrix(32, seed=5), random_hadamard_matrix(32, seed=5))


def test_demo_ends_with_the_perplexity_line_and_writes_a_sampleable_checkpoint(plain_dir, tmp_path, capsys):
    import demos.spinquant_ptq as demo
    out = str(tmp_path / "sq")
    assert run_main(demo.main, f"--out_dir={plain_dir}", f"--quantized_dir={out}", "--steps=2", "--nsamples=8",
                    "--heldout_tokens=200", "--eval_tokens=2000", "--device=cpu", "--progress=False",
                    "--method=rtn") is None
    lines = capsys.readouterr().out.strip().splitlines()
    last = lines[-1]
    assert last.startswith("spinquant perplexity: ") and "(no rotation " in last and ", full precision " in last
    assert ", kept " in last and any(line.startswith("candidate no rotation: held-out") for line in lines)
    assert any(line.startswith("learned from the identity: held-out calibration loss") for line in lines)
    assert os.path.samefile(os.path.join(out, "ckpt.pt"), os.path.join(out, "ckpt_spinquant.pt"))
    import sample
    assert run_main(sample.main, f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=5", "--device=cpu") is None
    # an already rotated checkpoint is refused
    again = str(tmp_path / "again")
    error = run_main(demo.main, f"--out_dir={out}", f"--quantized_dir={again}", "--device=cpu")
    assert error.startswith(f"spinquant_ptq.py: error: --out_dir={out}:") and "already" in error
    assert not os.path.exists(again)


def test_mse_clipped_rtn_never_rounds_a_row_worse_than_rtn(tiny_trained):
    """bench/spinquant_clipping.py's weight clipping: per row, the range shrink with the lowest sum of |w - q|^2.4
    (1.0, plain RTN, among them): every row's error at most RTN's, some rows strictly lower, codes on the grid."""
    import copy
    clipping = load_script("bench/spinquant_clipping.py")
    NORM, mse_clip_rtn = clipping.NORM, clipping.mse_clip_rtn
    from quantization.quantizers import code_range
    from quantization.rtn import rtn_quantize, weight_spec
    spec = weight_spec(4)
    plain, clipped = copy.deepcopy(tiny_trained[0]), copy.deepcopy(tiny_trained[0])
    records = rtn_quantize(plain, spec)
    mse_clip_rtn(clipped, spec)
    lower = 0
    for name, weight in tiny_trained[0].named_parameters():
        if name.removesuffix(".weight") not in records:
            continue
        w = weight.detach().double()
        rtn_err = (plain.get_parameter(name).double() - w).abs().pow(NORM).sum(1)
        clip_err = (clipped.get_parameter(name).double() - w).abs().pow(NORM).sum(1)
        assert (clip_err <= rtn_err * (1 + 1e-6)).all(), name
        lower += int((clip_err < rtn_err * (1 - 1e-3)).sum())
        # on the grid: one scale and zero point per row, so at most 2**4 distinct values in a row
        assert all(len(row.unique()) <= code_range(spec)[1] + 1 for row in clipped.get_parameter(name).detach())
    assert lower > 0


def test_clipping_bench_table_and_bad_flags(plain_dir, tmp_path, capsys):
    """bench/spinquant_clipping.py on a tiny model: a row per rotation, weight rounding and clipping setting; the
    plain row (no rotation, RTN, no clipping) is what rtn_quantize gives the unrotated model; a bad ratio is one line."""
    spinquant_clipping = load_script("bench/spinquant_clipping.py")
    from quantization.perplexity import evaluate
    from quantization.rtn import rtn_quantize, weight_spec
    from quantization.spin_quant import unrotated
    from quantization.spin_quant_flags import load_plain
    flags = [f"--out_dir={plain_dir}", "--steps=2", "--nsamples=8", "--heldout_tokens=200", "--eval_tokens=1000",
             "--device=cpu", "--progress=False"]
    rows = spinquant_clipping.main(flags + ["--act_clips=1,0.5", "--kv_clips=1", f"--json={tmp_path / 'c.json'}"])
    import json
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == rows
    rotations = {r["rotation"] for r in rows}
    assert rotations >= {"no rotation", "random Hadamard", "learned"}
    assert len(rows) == len(rotations) * 3  # RTN and MSE-clipped RTN unclipped, RTN with activations at 0.5
    plain = [r for r in rows if r["rotation"] == "no rotation" and r["weights"] == "RTN" and r["act_clip"] == 1]
    base, checkpoint = load_plain(plain_dir, "cpu")
    model = unrotated(base, 4, 4)
    rtn_quantize(model, weight_spec(4))
    expected = evaluate(model, split_tokens(checkpoint["dataset"], "val"), max_tokens=1000, device="cpu",
                        progress=False)["loss"]
    assert len(plain) == 1 and math.isclose(plain[0]["loss"], expected, rel_tol=1e-6)
    assert plain[0]["gap_closed"] == 0.0
    halved = [r for r in rows if r["rotation"] == "no rotation" and r["act_clip"] == 0.5]
    assert len(halved) == 1 and halved[0]["loss"] != plain[0]["loss"]
    assert "| rotation | weights |" in capsys.readouterr().out
    error = run_main(spinquant_clipping.main, *flags, "--act_clips=1,1.5")
    assert error == "spinquant_clipping.py: error: --act_clips=1,1.5: expected comma-separated ratios in (0, 1]"


@pytest.mark.parametrize("flags, named", [
    (["--steps=-1"], "--steps=-1"),
    (["--bits=9"], "--bits=9"),
    (["--act_bits=1"], "--act_bits=1"),
    (["--nsamples=100000000"], "--nsamples=100000000"),
    (["--heldout_tokens=-1"], "--heldout_tokens=-1"),
    (["--heldout_tokens=1000000000"], "--heldout_tokens=1000000000"),
    (["--act_order=maybe"], "argument --act_order"),
    (["--gelu_shift=maybe"], "argument --gelu_shift"),
])
def test_demo_bad_flags_one_line_nothing_written(plain_dir, tmp_path, flags, named):
    import demos.spinquant_ptq as demo
    out = str(tmp_path / "sq")
    error = run_main(demo.main, f"--out_dir={plain_dir}", f"--quantized_dir={out}", "--device=cpu", *flags)
    assert error.startswith(f"spinquant_ptq.py: error: {named}") and "\n" not in error
    assert not os.path.exists(out)


def test_width_without_hadamard_is_refused(tmp_path):
    import demos.spinquant_ptq as demo
    folder, out = str(tmp_path / "w36"), str(tmp_path / "sq")
    _save_plain(folder, GPT(GPTConfig(n_layer=1, n_head=2, n_embd=36, block_size=16, vocab_size=84)))
    error = run_main(demo.main, f"--out_dir={folder}", f"--quantized_dir={out}", "--device=cpu")
    assert error.startswith(f"spinquant_ptq.py: error: --out_dir={folder}:") and "width 36" in error
    assert not os.path.exists(out)


@pytest.mark.parametrize("clear_z, kept", [(-math.inf, "rotations"), (math.inf, "no rotation")])
def test_train_spinquant_rotates_when_quantization_starts(char_data, tmp_path, capsys, monkeypatch, clear_z, kept):
    """--spinquant decides once, at the switch, by the held-out rule (CLEAR_Z forced here to take each branch): a
    kept rotation is saved baked with what resuming needs; no rotation leaves the model as it was; a resumed run
    does not decide again."""
    import quantization.spin_quant as spin_quant
    monkeypatch.setattr(spin_quant, "CLEAR_Z", clear_z)
    out = str(tmp_path / "qat")
    train_in_process(out, "--max_iters=12", "--eval_interval=12", "--quantization_warmup_iters=6", "--spinquant",
                     "--spinquant_steps=3", "--spinquant_nsamples=8", "--linear_variant_mlp=quantized_linear",
                     "--quantize_linear_bits=4", "--quantize_mlp_act_input", "--quantize_attn_act_pv_mult_v_input",
                     "--quantize_mlp_act_bits=4", "--activations_quant_granularity=per_token")
    printed = capsys.readouterr().out
    assert "iter 6: spinquant rotations learned" in printed and f"; kept {kept}\n" in printed
    checkpoint = load_checkpoint(out)
    args = checkpoint["model_args"]
    assert checkpoint["spinquant_choice"] == kept
    if kept == "rotations":
        assert args["norm"] == "rmsnorm" and not args["tied_head"] and args["online_transforms"]
        assert checkpoint["spinquant_qat"]["model_args"].get("norm", "layernorm") == "layernorm"  # what resuming trains
    else:
        assert args.get("norm", "layernorm") == "layernorm" and "spinquant_qat" not in checkpoint
    model = from_pretrained(out)
    assert model.config.linear_variants["mlp_up"] == "quantized_linear"
    train_in_process(out, "--init_from=resume", "--max_iters=14", "--eval_interval=2", "--spinquant")
    printed = capsys.readouterr().out
    assert "step 14:" in printed and "rotations learned" not in printed  # resumed, not decided again
    assert load_checkpoint(out)["iter_num"] == 14


def test_spinquant_on_resume_of_a_run_without_it(char_data, tmp_path, capsys, monkeypatch):
    """A run saved at the switch without --spinquant (nothing trained quantized yet), resumed with it, decides at
    the switch as a --spinquant run would (what bench/spinquant_cpu.sh's variants do); one that already trained
    quantized without it is refused in one line, and its checkpoint is left as it was."""
    import quantization.spin_quant as spin_quant
    import train
    monkeypatch.setattr(spin_quant, "CLEAR_Z", -math.inf)
    flags = ["--quantization_warmup_iters=5", "--linear_variant_mlp=quantized_linear", "--quantize_linear_bits=4",
             "--quantize_mlp_act_input", "--quantize_mlp_act_bits=4", "--activations_quant_granularity=per_token"]
    spin = ["--spinquant", "--spinquant_steps=2", "--spinquant_nsamples=8"]
    at_switch, later = str(tmp_path / "at_switch"), str(tmp_path / "later")
    train_in_process(at_switch, "--max_iters=5", "--eval_interval=5", *flags)
    train_in_process(later, "--max_iters=7", "--eval_interval=7", *flags)
    capsys.readouterr()
    train_in_process(at_switch, "--init_from=resume", "--max_iters=7", "--eval_interval=7", *flags, *spin)
    assert "iter 5: spinquant rotations learned" in capsys.readouterr().out
    assert load_checkpoint(at_switch)["spinquant_choice"] == "rotations"
    before = os.path.getmtime(os.path.join(later, "ckpt.pt"))
    error = run_main(train.main, f"--out_dir={later}", *TINY, "--init_from=resume", "--max_iters=9", *flags, *spin)
    assert error.startswith("train.py: error: --spinquant: ") and "from iteration 5 to 7" in error
    assert "\n" not in error and os.path.getmtime(os.path.join(later, "ckpt.pt")) == before


def test_spinquant_that_keeps_no_rotation_trains_exactly_as_plain_qat(char_data, tmp_path, capsys, monkeypatch):
    """Learning and scoring the rotations draws random numbers (the calibration batches, the random starts); they
    come from a forked random state, so a run that keeps no rotation goes on with the dropout masks and batches of
    plain QAT and ends with the same weights, bit for bit (on the CPU)."""
    import quantization.spin_quant as spin_quant
    monkeypatch.setattr(spin_quant, "CLEAR_Z", math.inf)
    flags = ["--max_iters=10", "--eval_interval=10", "--quantization_warmup_iters=5", "--dropout=0.2",
             "--linear_variant_mlp=quantized_linear", "--quantize_linear_bits=4", "--quantize_mlp_act_input",
             "--quantize_mlp_act_bits=4", "--activations_quant_granularity=per_token"]
    plain, spin = str(tmp_path / "plain"), str(tmp_path / "spin")
    train_in_process(plain, *flags)
    train_in_process(spin, *flags, "--spinquant", "--spinquant_steps=2", "--spinquant_nsamples=8")
    assert "; kept no rotation\n" in capsys.readouterr().out
    a, b = load_checkpoint(plain)["model"], load_checkpoint(spin)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("probe_keeps", [True, False])
def test_spinquant_probe_goes_on_exactly_as_the_branch_it_keeps(char_data, tmp_path, capsys, monkeypatch,
                                                                probe_keeps):
    """--spinquant_probe: the switch keeps the rotations (QAT_SELECT off); QAT runs 4 iterations with them, then the
    same 4 again without them; the probe's own held-out choice (forced both ways through train.paired_gain) then
    decides. The run ends with the weights, bit for bit (on the CPU), of the run that took that branch from the
    switch: --spinquant without the probe, or plain QAT, and its last evaluation prints the same losses, although
    the probe skipped the evaluation at the switch that the other run made (evaluations draw their own batches)."""
    import quantization.spin_quant as spin_quant
    import train
    monkeypatch.setattr(spin_quant, "QAT_SELECT", False)
    flags = ["--max_iters=12", "--eval_interval=6", "--quantization_warmup_iters=6", "--dropout=0.2",
             "--linear_variant_mlp=quantized_linear", "--quantize_linear_bits=4", "--quantize_mlp_act_input",
             "--quantize_mlp_act_bits=4", "--activations_quant_granularity=per_token"]
    spin = ["--spinquant", "--spinquant_steps=2", "--spinquant_nsamples=8"]
    reference, probed = str(tmp_path / "reference"), str(tmp_path / "probed")
    train_in_process(reference, *flags, *(spin + ["--spinquant_probe=0"] if probe_keeps else []))
    reference_printed = capsys.readouterr().out
    assert "step 6: train loss" in reference_printed
    scores = []
    real_gain = train.paired_gain
    monkeypatch.setattr(train, "paired_gain", lambda a, b: scores.append(real_gain(a, b))
                        or (0.0, math.inf if probe_keeps else -math.inf))
    train_in_process(probed, *flags, *spin, "--spinquant_probe=4")
    printed = capsys.readouterr().out
    kept = "rotations" if probe_keeps else "no rotation"
    assert "iter 6: spinquant probe: QAT with the rotations to iteration 10" in printed
    assert "iter 10: spinquant probe: again without the rotations, from iteration 6" in printed
    assert "iter 10: spinquant probe after 4 QAT iterations each: held-out quantized loss without rotation " in printed
    assert f"; kept {kept}\n" in printed.split("spinquant probe after")[1]
    assert len(scores) == 1 and math.isfinite(scores[0][1])  # the real per-sequence comparison ran once
    assert "step 6: train loss" not in printed  # nothing is evaluated inside the probe

    def last_eval(out):
        return next(line for line in out.splitlines() if line.startswith("step 12: train loss"))
    assert last_eval(printed) == last_eval(reference_printed)
    a, b = load_checkpoint(reference), load_checkpoint(probed)
    assert b["spinquant_choice"] == kept
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if probe_keeps:
        ra, rb = a["spinquant_qat"]["model"], b["spinquant_qat"]["model"]
        assert all(torch.equal(ra[k], rb[k]) for k in ra)
    if not probe_keeps:  # the default, -1, probes a third of the 6 QAT iterations, and rejects as forced here
        default = str(tmp_path / "default")
        train_in_process(default, *flags, *spin)
        printed = capsys.readouterr().out
        assert "iter 6: spinquant probe: QAT with the rotations to iteration 8" in printed
        assert "iter 8: spinquant probe after 2 QAT iterations each" in printed
        c = load_checkpoint(default)["model"]
        assert all(torch.equal(a["model"][k], c[k]) for k in a["model"])
    # bad input: without --spinquant, or a count below -1; without --spinquant, the default asks for nothing
    error = run_main(train.main, f"--out_dir={tmp_path / 'bad'}", *TINY, "--spinquant_probe=4")
    assert error.startswith("train.py: error: --spinquant_probe=4: probes --spinquant's rotations") and "\n" not in error
    error = run_main(train.main, f"--out_dir={tmp_path / 'bad'}", *TINY, *spin, "--spinquant_probe=-2")
    assert error is not None and "--spinquant_probe" in error and not os.path.exists(tmp_path / "bad")


def test_qat_choice_scores_both_models_on_the_heldout_half(tiny_trained, monkeypatch):
    """rotate_for_qat's choice: `none` and `rotated` are the mean per-token losses, on the second half of the
    held-out sequences, of the QAT model as it is and of the rotated model it would train (checked here with plain
    cross-entropy in float64)."""
    import copy
    from dataclasses import asdict
    import torch.nn.functional as F
    import quantization.spin_quant as spin_quant
    from quantization.spin_quant import rotate_for_qat
    monkeypatch.setattr(spin_quant, "CLEAR_Z", -math.inf)
    model, tokens = copy.deepcopy(tiny_trained[0]).double(), tiny_trained[1]
    data = torch.cat(_calibration(tokens, n=16))
    learn, heldout = data[:8], data[8:]
    new_model, _, info = rotate_for_qat(model, asdict(model.config), learn, steps=2, heldout=heldout)
    x, y = heldout[4:, :-1], heldout[4:, 1:]

    def mean_loss(m):
        logits = m.eval()(x, y)[0].double()
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1).mean().item()

    assert info["kept"] == "rotations" and abs(info["none"] - mean_loss(model)) < 1e-9
    assert abs(info["rotated"] - mean_loss(new_model)) < 1e-9


@pytest.mark.parametrize("basis", ["original", "rotated"])
def test_qat_rotation_computes_the_same_logits(tiny_trained, basis, monkeypatch):
    """rotate_for_qat (train.py --spinquant) changes no function: with the quantizers off the rotated model's logits
    are the trained model's, and the cached decode of the model it saves agrees with its full forward."""
    import copy
    from dataclasses import asdict
    import quantization.spin_quant as spin_quant
    from generate import generate
    from quantization.spin_quant import RotatedQAT, rotate_for_qat
    monkeypatch.setattr(spin_quant, "QAT_BASIS", basis)
    model, tokens = copy.deepcopy(tiny_trained[0]).double(), tiny_trained[1]
    data = torch.cat(_calibration(tokens, n=8))
    new_model, new_args, info = rotate_for_qat(model, asdict(model.config), data, steps=2, select=False)
    assert isinstance(new_model, RotatedQAT) == (basis == "original") and info["kept"] == "rotations"
    new_model.set_quantization(False)
    x = data[:2, :-1]
    expected, got = model.eval()(x, x)[0], new_model.double().eval()(x, x)[0]
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()  # the rotations are float32
    assert new_args["norm"] == "rmsnorm" and not new_args["tied_head"]
    if basis == "original":  # what train.py saves: the rotated model baked
        saved_args, state = new_model.checkpoint_state()
        assert saved_args == new_args
        new_model = GPT(GPTConfig(**new_args)).double()
        new_model.load_state_dict(state)
        new_model.set_quantization(False)
    a = generate(new_model, x[:1, :4], 6, temperature=0)
    assert torch.equal(a, generate(new_model, x[:1, :4], 6, temperature=0, use_cache=False))


def _latent_names(state):
    return {k.replace("q.weight", "q.parametrizations.weight.original").replace(
        "mlp_down.weight", "mlp_down.parametrizations.weight.original"): v for k, v in state.items()}


def test_rotated_qat_trains_the_original_weights(tiny_trained):
    """RotatedQAT (QAT_BASIS "original"): the gradients reach the QAT model's own parameters (LayerNorms, tied
    embedding), none the rotated copy's; the baked weights and the quantized loss are those of a rotated model built
    independently in float64 (fold_norms on the module, rotate_state, QuantizedLinear); a resumed run rebuilds it."""
    import copy
    from dataclasses import asdict
    from quantization.spin_quant import RotatedQAT, rotate_state
    model, tokens = copy.deepcopy(tiny_trained[0]), tiny_trained[1]
    args = {**asdict(model.config), "linear_variants": {s: "quantized_linear" for s in ("q", "mlp_down")},
            "weight_quant": {s: {"method": "affine_quant", "bits": 3} for s in ("q", "mlp_down")},
            "act_quant": {"attn_input": {"method": "affine_quant", "bits": 4, "granularity": "per_token"}}}
    qat = GPT(GPTConfig(**args))
    qat.load_state_dict(_latent_names(model.state_dict()))
    C, hd, L = model.config.n_embd, model.config.n_embd // model.config.n_head, model.config.n_layer
    g = torch.Generator().manual_seed(0)
    # orthogonal matrices in float32, the precision RotatedQAT keeps them in
    R1 = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))[0].float().double()
    R2 = [torch.linalg.qr(torch.randn(hd, hd, generator=g, dtype=torch.float64))[0].float().double() for _ in range(L)]
    wrapped = RotatedQAT(qat, args, R1, R2).double()
    x = torch.cat(_calibration(tokens, n=2))
    wrapped.train()(x[:, :-1], x[:, 1:])[1].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in qat.parameters())
    assert not any(p.requires_grad for p in wrapped.rotated.parameters())
    state = rotate_state(fold_norms(model.double()).state_dict(), model.config, R1=R1, R2=R2,
                         R3=hadamard_matrix(hd).float().double(), R4=hadamard_matrix(4 * C).t().float().double())
    saved_args, baked = wrapped.checkpoint_state()
    reference = GPT(GPTConfig(**saved_args)).double()
    reference.load_state_dict(_latent_names(state))
    for key, value in reference.state_dict().items():
        assert (baked[key] - value).abs().max() < 1e-9, key
    wrapped.eval()
    reference.eval()
    assert abs(wrapped(x[:, :-1], x[:, 1:])[1].item() - reference(x[:, :-1], x[:, 1:])[1].item()) < 1e-9
    resumed = RotatedQAT.from_resume_state(wrapped.resume_state()).double().eval()
    assert torch.equal(resumed(x[:, :-1], x[:, 1:])[0], wrapped(x[:, :-1], x[:, 1:])[0])


def test_learned_qat_rotations_start_where_given_stay_orthogonal_and_resume(tiny_trained):
    """QAT_LEARN_ROTATIONS: R1 and R2 start at the rotations given, train in a parameter group of their own (no weight
    decay, train.py scales its lr by lr_scale), move, stay orthogonal, and a resumed run rebuilds them as trained."""
    import copy
    from dataclasses import asdict
    from quantization.spin_quant import RotatedQAT
    model, tokens = copy.deepcopy(tiny_trained[0]), tiny_trained[1]
    args = {**asdict(model.config), "linear_variants": {s: "quantized_linear" for s in ("q", "mlp_down")},
            "weight_quant": {s: {"method": "affine_quant", "bits": 3} for s in ("q", "mlp_down")}}
    qat = GPT(GPTConfig(**args))
    qat.load_state_dict(_latent_names(model.state_dict()))
    C, hd, L = model.config.n_embd, model.config.n_embd // model.config.n_head, model.config.n_layer
    g = torch.Generator().manual_seed(0)
    R1 = torch.linalg.qr(torch.randn(C, C, generator=g, dtype=torch.float64))[0].float()
    R2 = [torch.linalg.qr(torch.randn(hd, hd, generator=g, dtype=torch.float64))[0].float() for _ in range(L)]
    wrapped = RotatedQAT(qat, args, R1, R2, learn=10.0)
    assert (wrapped.R1 - R1).abs().max() < 1e-6 and (wrapped.R2 - torch.stack(R2)).abs().max() < 1e-6
    assert RotatedQAT(copy.deepcopy(qat), args, R1, R2, learn=0.0).rotation_group() is None
    group = wrapped.rotation_group()
    assert group["weight_decay"] == 0.0 and group["lr_scale"] == 10.0
    optimizer = torch.optim.AdamW(qat.parameters(), lr=1e-3)
    optimizer.add_param_group(group)
    x = torch.cat(_calibration(tokens, n=2))
    wrapped.train()
    for _ in range(3):
        for param_group in optimizer.param_groups:
            param_group["lr"] = 1e-3 * param_group.get("lr_scale", 1.0)
        optimizer.zero_grad()
        wrapped(x[:, :-1], x[:, 1:])[1].backward()
        optimizer.step()
    assert (wrapped.R1 - R1).abs().max() > 1e-3 and (wrapped.R2 - torch.stack(R2)).abs().max() > 1e-3
    for R in [wrapped.R1.detach(), *wrapped.R2.detach().unbind(0)]:
        assert (R @ R.T - torch.eye(R.shape[0])).abs().max() < 1e-5
    # resumed: the same parametrizations, so the optimizer's state (saved and loaded with them) goes on exactly
    resumed = RotatedQAT.from_resume_state(copy.deepcopy(wrapped.resume_state()))
    assert resumed.learn_rotations == 10.0
    assert torch.equal(resumed.R1, wrapped.R1) and torch.equal(resumed.R2, wrapped.R2)
    for mine, theirs in zip(resumed.rotation_group()["params"], group["params"]):
        assert torch.equal(mine, theirs)
    wrapped.eval()
    resumed.eval()
    assert torch.equal(resumed(x[:, :-1])[0], wrapped(x[:, :-1])[0])


def test_train_with_learned_rotations_resumes_exactly(char_data, tmp_path, capsys, monkeypatch):
    """train.py --spinquant with QAT_LEARN_ROTATIONS: the rotations train in their own group at lr x lr_scale, and a
    run stopped after the switch and resumed logs the losses of the uninterrupted run."""
    import quantization.spin_quant as spin_quant
    monkeypatch.setattr(spin_quant, "CLEAR_Z", -math.inf)
    monkeypatch.setattr(spin_quant, "QAT_LEARN_ROTATIONS", 10.0)
    flags = ["--quantization_warmup_iters=4", "--eval_interval=6", "--lr_decay_iters=10", "--dropout=0.1",
             "--linear_variant_mlp=quantized_linear", "--quantize_linear_bits=4", "--quantize_mlp_act_input",
             "--quantize_mlp_act_bits=4", "--activations_quant_granularity=per_token", "--spinquant",
             "--spinquant_steps=2", "--spinquant_nsamples=8"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")
    train_in_process(whole, "--max_iters=10", *flags)
    train_in_process(part, "--max_iters=6", *flags)
    train_in_process(part, "--max_iters=10", "--init_from=resume", *flags)
    assert "kept rotations" in capsys.readouterr().out
    groups = load_checkpoint(part)["optimizer"]["param_groups"]
    assert groups[-1]["lr_scale"] == 10.0 and groups[-1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    losses = lambda d: {r["iter"]: r["loss"] for r in read_log(d) if "loss" in r}
    expected, got = losses(whole), losses(part)
    assert [got[i] for i in range(6, 10)] == [expected[i] for i in range(6, 10)]


@pytest.mark.parametrize("flags, named", [
    (["--n_embd=36", "--n_head=2"], "--spinquant with --n_embd=36"),
    (["--spinquant_steps=-1"], "--spinquant_steps=-1"),
    (["--spinquant_nsamples=0"], "--spinquant_nsamples=0"),
])
def test_train_spinquant_bad_input_is_one_line(char_data, tmp_path, flags, named):
    import train
    out = str(tmp_path / "run")
    error = run_main(train.main, f"--out_dir={out}", "--spinquant", "--device=cpu", "--max_iters=1", *flags)
    assert error.startswith(f"train.py: error: {named}") and "\n" not in error
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))


def test_from_pretrained_names_what_it_cannot_load(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor one of gpt2"):
        from_pretrained(str(tmp_path / "missing"))
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(FileNotFoundError):  # a folder with neither ckpt.pt nor a Hugging Face config
        from_pretrained(str(folder))


def test_apply_keeps_the_candidate_with_the_lowest_heldout_loss(tiny_trained, tmp_path):
    model, tokens = tiny_trained
    sq = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0)
    sq.optimize(_calibration(tokens), steps=4, progress=False)
    # a quarter held out, never learned on: half of it picks the best step, the other half the candidate
    assert sq.heldout_steps.shape[0] == 3 and sq.heldout.shape[0] == 3 and sq.calibration.shape[0] == 18
    assert not any(torch.equal(a, b) for a in sq.heldout for b in sq.heldout_steps)
    lines = []
    sq.apply(progress=False, log=lines.append)
    # S4's alpha and the shift under S4 and under R4, each picked once before its candidates
    assert [sum(line.startswith(pick) for line in lines) for pick in PICKS] == [1, 1]
    lines = [line for line in lines if not line.startswith(PICKS)]
    names = [c["name"].removesuffix(" + shift") for c in sq.candidates]
    assert names[0] == "no rotation" and "random Hadamard all" in names and len(lines) == len(names) + 1
    # the lowest of the candidates that clearly beat no rotation (no rotation itself always counts)
    assert sq.candidates[0]["clear"] and all("standard errors" in line for line in lines[1:-1])
    best = min((c for c in sq.candidates if c["clear"]), key=lambda c: c["heldout_loss"])
    assert sq.choice["name"] == best["name"] and lines[-1].startswith(f"kept {best['name']}: ")
    assert abs(sq.evaluate(sq.heldout, model=sq.model) - best["heldout_loss"]) < 1e-6
    save_checkpoint(str(tmp_path / "ckpt.pt"), sq.checkpoint({"model_args": {}, "dataset": "shakespeare_char"}))
    x = sq.heldout[:2, :-1]
    assert torch.equal(from_pretrained(str(tmp_path))(x, x)[0], sq.model(x, x)[0])


PICKS = ("S4 alpha: ", "R4 shift: ")  # the lines of smooth_scales' and r4_shift's picks (tests/test_spinquant_s4.py)


def _chosen(model, tokens, method, steps, gelu_shift=True, **optimize):
    """A SpinQuant at W3A4KV4 after `steps` of optimize and apply's choice: (sq, the lines it logged but the picks',
    candidate names)."""
    sq = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method=method, seed=0, gelu_shift=gelu_shift)
    sq.optimize(_calibration(tokens), steps=steps, progress=False, **optimize)
    lines = []
    sq.apply(progress=False, log=lines.append)
    lines = [line for line in lines if not line.startswith(PICKS)]
    return sq, lines, [c["name"] for c in sq.candidates]


def test_with_gptq_no_rotation_with_rtn_is_a_candidate_too(tiny_trained):
    """A weight method can lose to RTN on a model (GPTQ on the BPE model): the RTN model without rotation (what
    spinquant_ptq.py reports as "no rotation") is scored as well, equal to one built independently, and rotations
    must clearly beat the better of the two unrotated candidates."""
    from quantization.rtn import rtn_quantize, weight_spec
    from quantization.spin_quant import unrotated
    model, tokens = tiny_trained
    sq, lines, names = _chosen(model, tokens, "gptq", 2)
    assert names[:2] == ["no rotation", "no rotation, RTN"] and len(lines) == len(names) + 1
    baseline = unrotated(model, 4, 4)
    rtn_quantize(baseline, weight_spec(3, 0, False))
    assert abs(sq.evaluate(sq.heldout, model=baseline) - sq.candidates[1]["heldout_loss"]) < 1e-6
    best = min((c for c in sq.candidates if c["clear"]), key=lambda c: c["heldout_loss"])
    assert sq.choice["name"] == best["name"] and sq.info["method"] == ("rtn" if best["name"] == "no rotation, RTN"
                                                                       else "gptq")
    unrotated_base = min(sq.candidates[:2], key=lambda c: c["heldout_loss"])
    for c in sq.candidates[2:]:  # a clear rotation is below the better unrotated candidate, not just the other
        assert not c["clear"] or c["heldout_loss"] < unrotated_base["heldout_loss"], (c, unrotated_base)
    assert all("gain over no rotation" in line for line in lines[3:-1])


def test_learning_from_the_identity_is_one_more_candidate(tiny_trained):
    """optimize(from_identity=True) learns R1/R2 a second time from no rotation: orthogonal, moved off the identity,
    a candidate of the choice; the rotations learned from the random Hadamard start are those of a run without it."""
    model, tokens = tiny_trained
    plain = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0)
    plain.optimize(_calibration(tokens), steps=4, progress=False)
    sq = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0)
    sq.optimize(_calibration(tokens), steps=4, progress=False, from_identity=True)
    for a, b in zip([sq.R1, *sq.R2], [plain.R1, *plain.R2]):
        assert torch.equal(a, b)
    R1, R2 = sq.learned_from_identity
    for R in [R1, *R2]:
        eye = torch.eye(R.shape[0], dtype=torch.float64)
        assert (R.double() @ R.double().T - eye).abs().max() < 1e-4
    assert not torch.equal(R1, torch.eye(R1.shape[0])) and len(sq.identity_losses) == 4
    assert sq.identity_heldout_losses[0][0] == 0 and len(sq.identity_heldout_losses) >= 2
    lines = []
    sq.apply(progress=False, log=lines.append)
    names = [c["name"].removesuffix(" + shift") for c in sq.candidates]
    assert "learned from identity all" in names and "learned from identity R1" in names
    best = min((c for c in sq.candidates if c["clear"]), key=lambda c: c["heldout_loss"])
    assert sq.choice["name"] == best["name"]


def test_the_fixed_hadamards_without_r1_match_a_model_built_with_hooks(tiny_trained):
    """R4 alone, norms unfolded (a candidate's rotation without R1): the GELU output quantized in the Hadamard basis
    equals the plain model with that one quantizer moved into a hook on mlp_down's input, x -> Q(x H) H^T (the
    weights untouched); R3 alone leaves q k^T, so the full-precision model, unchanged. R1 still needs the fold."""
    from dataclasses import asdict
    from quantization.fold import build_like
    from quantization.quantizers import QuantSpec, fake_quant
    from quantization.spin_quant import activation_quant
    model, tokens = tiny_trained
    x = torch.cat(_calibration(tokens, n=2))[:, :-1]
    site = {"mlp_activation_output": activation_quant(4, 16)["mlp_activation_output"]}
    sq = SpinQuant(model, bits=16, act_quant=site, rotations=("R4",), fold=False, dtype=torch.float64)
    rotated = sq.bake()
    plain = build_like(GPTConfig(**asdict(model.config)), model.state_dict()).double().eval()
    H = hadamard_matrix(4 * model.config.n_embd).t().double()
    spec = QuantSpec(**site["mlp_activation_output"])
    hooks = [block.mlp.mlp_down.register_forward_pre_hook(lambda m, i: (fake_quant(i[0] @ H, spec) @ H.t(),))
             for block in plain.transformer.h]
    assert sq.config.norm == "layernorm"
    assert torch.allclose(rotated(x, x)[0], plain(x, x)[0], atol=1e-9)
    for hook in hooks:
        hook.remove()
    r3 = SpinQuant(model, bits=16, act_bits=16, kv_bits=16, rotations=("R3",), fold=False, dtype=torch.float64)
    assert torch.allclose(r3.bake()(x, x)[0], plain(x, x)[0], atol=1e-9)
    with pytest.raises(ValueError, match="fold=False: only without R1"):
        SpinQuant(model, rotations=("R1", "R4"), fold=False)


def test_the_folded_norms_and_fixed_hadamards_are_candidates_that_must_clearly_win(tiny_trained):
    """The choice also scores the folded norms without rotation and the fixed Hadamards R4 and R3+R4 (norms
    folded), each as a model built apart scores it, and keeps one only when it clearly beats no rotation (without
    the shift: test_spinquant_s4.py has the candidates with it)."""
    model, tokens = tiny_trained
    sq, lines, names = _chosen(model, tokens, "rtn", 2, gelu_shift=False)
    assert names[:4] == ["no rotation", "folded norms, no rotation", "Hadamard R4", "Hadamard R3+R4"]
    for name, rotations in (("folded norms, no rotation", ()), ("Hadamard R4", ("R4",)), ("Hadamard R3+R4", ("R3", "R4"))):
        other = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, rotations=rotations)
        other.apply(progress=False, select=False)
        candidate = next(c for c in sq.candidates if c["name"] == name)
        assert abs(sq.evaluate(sq.heldout, model=other.model) - candidate["heldout_loss"]) < 1e-6, name
        line = next(line for line in lines if line.startswith(f"candidate {name}:"))
        assert "gain over no rotation" in line and candidate["clear"] == ("not clearly better" not in line)
    best = min((c for c in sq.candidates if c["clear"]), key=lambda c: c["heldout_loss"])
    assert sq.choice["name"] == best["name"]
    if best["name"] != "no rotation":
        assert best["heldout_loss"] < sq.candidates[0]["heldout_loss"]


def test_a_rotation_must_clearly_beat_no_rotation():
    """paired_gain against a float64 reference: a consistent small gain is clear, a lower mean made of large
    opposite swings is not (the lowest of several noisy scores is how a worse rotation got kept)."""
    from quantization.spin_quant import CLEAR_Z, paired_gain
    base = torch.full((16,), 2.0, dtype=torch.float64) + torch.linspace(0, 0.1, 16, dtype=torch.float64)
    gain, z = paired_gain(base, base - 0.01 - 1e-4 * torch.arange(16.0, dtype=torch.float64))
    diff = 0.01 + 1e-4 * torch.arange(16.0, dtype=torch.float64)
    assert abs(gain - diff.mean().item()) < 1e-12 and abs(z - diff.mean() / (diff.std() / 4)) < 1e-9 and z > CLEAR_Z
    swings = torch.tensor([0.5, -0.5] * 8, dtype=torch.float64) + 0.002
    gain, z = paired_gain(base, base - swings)
    assert abs(gain - 0.002) < 1e-12 and 0 < z < CLEAR_Z
    assert paired_gain(base[:1], base[:1] - 1)[1] == 0.0 and paired_gain(base, base + 0.1)[1] < 0


def test_no_rotation_candidate_is_the_unfolded_model(tiny_trained):
    model, tokens = tiny_trained
    sq = SpinQuant(model, bits=16, act_bits=16, kv_bits=16, rotations=(), fold=False)
    x = torch.cat(_calibration(tokens, n=2))[:, :-1]
    assert sq.config.norm == "layernorm" and torch.equal(sq.bake()(x, x)[0], model(x, x)[0])
    with pytest.raises(ValueError, match="fold=False"):
        SpinQuant(model, fold=False)


def test_too_few_calibration_samples_are_refused(tiny_trained, plain_dir, tmp_path):
    model, tokens = tiny_trained
    with pytest.raises(ValueError, match="need at least 2"):
        SpinQuant(model, bits=4).optimize(_calibration(tokens, n=1), steps=1, progress=False)
    import demos.spinquant_ptq as demo
    out = str(tmp_path / "sq")
    error = run_main(demo.main, f"--out_dir={plain_dir}", f"--quantized_dir={out}", "--device=cpu", "--nsamples=1")
    assert error.startswith("spinquant_ptq.py: error: --nsamples=1:") and "\n" not in error
    assert not os.path.exists(out)


def test_qat_optimizer_carries_the_step_and_rotates_the_first_moment(tiny_trained, monkeypatch):
    import quantization.spin_quant as spin_quant
    from quantization.spin_quant import qat_lr, rotate_for_qat
    monkeypatch.setattr(spin_quant, "QAT_BASIS", "rotated")  # the moments are carried into the rotated basis
    monkeypatch.setattr(spin_quant, "QAT_CARRY_MOMENTS", True)
    monkeypatch.setattr(spin_quant, "QAT_REWARM", True)
    import copy
    model, tokens = copy.deepcopy(tiny_trained[0]), tiny_trained[1]  # the steps below must not train the fixture
    data = torch.cat(_calibration(tokens, n=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(data[:, :-1], data[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    from dataclasses import asdict
    args = asdict(model.config)
    new_model, _, _, new_optimizer = rotate_for_qat(model, args, data, steps=2, optimizer=optimizer, select=False,
                                                    optimizer_args=dict(weight_decay=0.1, learning_rate=1e-3,
                                                                        betas=(0.9, 0.99), device_type="cpu"))
    old = optimizer.state[model.transformer.h[0].attn.attn_proj.weight]
    new = new_optimizer.state[new_model.transformer.h[0].attn.attn_proj.weight]
    assert new["step"] == old["step"] == 3
    # attn_proj reads no norm: R2 on its columns and R1 on its rows keep the moment's norm
    assert abs(new["exp_avg"].norm() - old["exp_avg"].norm()) < 1e-4 * old["exp_avg"].norm()
    assert not torch.allclose(new["exp_avg"], old["exp_avg"])
    assert qat_lr(1.0, 10, 10, 4) == 1 / 5 and qat_lr(1.0, 14, 10, 4) == 1.0 and qat_lr(1.0, 9, 10, 4) == 1.0


def test_compare_table_has_the_kept_rows_and_the_study_runs(plain_dir, capsys):
    import demos.spinquant_compare as compare
    common = [f"--out_dir={plain_dir}", "--device=cpu", "--steps=2", "--nsamples=8", "--eval_tokens=1000",
              "--settings=4/4/4"]
    rows = compare.main(common + ["--seeds=1", "--progress=False"])
    assert "  R4 shift: off " in capsys.readouterr().out  # --gelu_shift, on by default: its pick under R4
    methods = [r["method"] for r in rows]
    assert any(m.startswith("SpinQuant + GPTQ, kept: ") for m in methods) and "SpinQuant + RTN, learned" in methods
    assert "SpinQuant + RTN, learned from identity" in methods  # --from_identity, on by default
    for method in ("RTN", "GPTQ"):  # --smooth, on by default: S4 alone, a row per weight method
        assert any(re.match(r"S4 \(GELU output scale, alpha 0\.(5|75)(, shifted)?\) \+ " + method, m)
                   for m in methods), method
    off = compare.main(common + ["--seeds=1", "--progress=False", "--from_identity=False", "--smooth=False",
                                 "--methods=gptq", "--gelu_shift=False"])
    assert not any("from identity" in r["method"] or "S4" in r["method"] for r in off)
    assert "shift" not in capsys.readouterr().out  # --gelu_shift=False: no pick, no shifted candidate
    assert not any(r["method"].startswith("SpinQuant + RTN") for r in off)  # --methods=gptq
    assert any(r["method"].startswith("SpinQuant + GPTQ, kept: ") for r in off)
    study = compare.main(common + ["--method=rtn", "--study=0.5:2:8:rtn,1.5:2:8:none,1.5:2:8:rtn:kl"])
    assert len(study) == 3 and study[0]["held_best"] <= study[0]["held_start"] and "val_fold_only" in study[0]
    assert study[2]["learns_on"] == "A+W(RTN), KL" and study[0]["learns_on"] == "A+W(RTN)"
    assert "| lr | steps |" in capsys.readouterr().out


def test_compare_scores_every_candidate_on_validation_without_changing_the_choice(plain_dir, capsys):
    """--score_candidates: each candidate of the kept row carries its validation loss; the kept one's is the kept
    row's own loss; and the choice (made on held-out text) is the one made without the flag."""
    import demos.spinquant_compare as compare
    common = [f"--out_dir={plain_dir}", "--device=cpu", "--steps=2", "--nsamples=8", "--eval_tokens=1000",
              "--settings=4/4/4", "--seeds=1", "--progress=False", "--methods=rtn", "--smooth=False"]
    kept = [r for r in compare.main(common + ["--score_candidates"]) if r["method"].startswith("SpinQuant + RTN, kept")]
    assert len(kept) == 1 and len(kept[0]["candidates"]) > 3
    assert all("report" in c for c in kept[0]["candidates"])
    name = kept[0]["method"].split("kept: ")[1]
    assert [c["report"] for c in kept[0]["candidates"] if c["name"] == name] == [kept[0]["loss"]]
    out = capsys.readouterr().out
    assert "| candidate | held-out loss |" in out and "Spearman rank correlation" in out
    table = out[out.index("| candidate | held-out loss |"):].split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(kept[0]["candidates"]) and all(line.startswith("|") for line in table)
    assert compare.rank_correlation([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert compare.rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    plain = [r for r in compare.main(common) if r["method"].startswith("SpinQuant + RTN, kept")]
    assert plain[0]["method"] == kept[0]["method"] and not any("report" in c for c in plain[0]["candidates"])


def test_compare_sets_every_qat_row_against_the_first_on_the_same_windows(plain_dir, quant_ckpt, capsys):
    """--qat rows after the first carry their difference from it and its standard errors, over the per-window
    losses of the same validation windows (checked against a paired computation done here)."""
    import demos.spinquant_compare as compare
    from quantization.hf import from_pretrained
    from quantization.perplexity import evaluate
    rows = compare.main([f"--out_dir={plain_dir}", "--device=cpu", "--settings=none", "--eval_tokens=3000",
                         f"--qat=QAT={quant_ckpt},plain={plain_dir}"])
    qat, plain = [r for r in rows if r["setting"] == "QAT"]
    assert "against" not in qat and plain["against"] == "QAT" and plain["difference"] == plain["loss"] - qat["loss"]
    val = split_tokens("shakespeare_char", "val")
    a, b = (evaluate(from_pretrained(folder).eval(), val, max_tokens=3000, progress=False, per_window=True)
            for folder in (quant_ckpt, plain_dir))
    diff = b["window_losses"] - a["window_losses"]
    assert plain["windows"] == len(diff) > 10
    assert plain["standard_errors"] == pytest.approx(diff.mean().item() / (diff.std().item() / len(diff) ** 0.5),
                                                     rel=1e-6)
    assert f"- plain against QAT: {plain['difference']:+.4f} on the same {len(diff)} validation windows" in \
        capsys.readouterr().out


def test_compare_sites_splits_the_gap_as_independently_built_models_do(plain_dir, capsys):
    """--sites: without rotation, every quantized site's loss alone (and every site at once) equals a model built
    here from the plain checkpoint with only that quantizer (model.py's act_quant config, rtn_quantize for the
    weights); with no quantizer on, each rotation set leaves the full-precision loss (rotations are exact)."""
    import demos.spinquant_compare as compare
    from dataclasses import asdict
    from quantization.fold import build_like
    from quantization.perplexity import evaluate
    from quantization.quantizers import QuantSpec, fake_quant
    from quantization.rtn import rtn_quantize, weight_spec
    from quantization.spin_quant import activation_quant, unrotated
    rows = compare.main([f"--out_dir={plain_dir}", "--device=cpu", "--eval_tokens=2000", "--settings=4/4/4",
                         "--sites"])
    base = from_pretrained(plain_dir).eval()
    val = split_tokens("shakespeare_char", "val")

    def loss(model):
        return evaluate(model, val, max_tokens=2000, progress=False)["loss"]

    def built(act_quant, weights):
        model = build_like(GPTConfig(**{**asdict(base.config), "act_quant": act_quant}), base.state_dict()).eval()
        if weights:
            rtn_quantize(model, weight_spec(4, 0, False))
        return loss(model)

    fp = loss(base)
    assert [r["rotations"] for r in rows] == ["no rotation", "folded", "R4", "R3+R4", "S4", "R1", "R1+R2", "R1+R2+R3",
                                              "R1+R2+R3+R4"]
    plain = rows[0]
    assert plain["none"] == pytest.approx(fp, abs=1e-6)
    assert all(r["none"] == pytest.approx(fp, abs=1e-4) for r in rows)
    every = unrotated(base, 4, 4)
    rtn_quantize(every, weight_spec(4, 0, False))
    assert plain["all"] == pytest.approx(loss(every), abs=1e-6)
    assert plain["alone"]["weights"] == pytest.approx(built({}, True), abs=1e-6)
    sites = activation_quant(4, 4)
    assert set(plain["alone"]) == {"weights"} | set(sites) and set(plain["without"]) == set(plain["alone"])
    for site, spec in sites.items():
        assert plain["alone"][site] == pytest.approx(built({site: spec}, False), abs=1e-6), site
    assert plain["without"]["weights"] == pytest.approx(built(sites, False), abs=1e-6)
    assert all(len(r["blocks"]) == base.config.n_layer for r in rows)
    out = capsys.readouterr().out
    assert "| every site |" in out
    # the top site of this model is the attention's input (q, k and v read it): each reader's input quantized
    # alone in the costliest block, here by a hook on the plain model
    assert plain["top_site"] == "attn_input" and set(plain["readers"]) == {"q", "k", "v"}
    block = plain["top_block"]
    assert f"| attn_input, block {block}: the input of k alone |" in out
    spec = QuantSpec(**sites["attn_input"])
    for reader, value in plain["readers"].items():
        hook = getattr(base.transformer.h[block].attn, reader).register_forward_pre_hook(
            lambda module, inputs: (fake_quant(inputs[0], spec),))
        assert value == pytest.approx(loss(base), abs=1e-6), reader
        hook.remove()
    # the block's quantizer alone: the same as all three readers' inputs quantized
    hooks = [getattr(base.transformer.h[block].attn, reader).register_forward_pre_hook(
        lambda module, inputs: (fake_quant(inputs[0], spec),)) for reader in ("q", "k", "v")]
    assert plain["blocks"][block] == pytest.approx(loss(base), abs=1e-6)
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("flags, named", [(["--settings=16/4/4"], "--sites needs quantized weights"),
                                          (["--settings=none"], "--sites needs a W/A/KV setting")])
def test_compare_sites_refuses_a_setting_it_cannot_split_in_one_line(plain_dir, flags, named):
    import demos.spinquant_compare as compare
    error = run_main(compare.main, f"--out_dir={plain_dir}", "--device=cpu", "--sites", *flags)
    assert error.startswith(f"spinquant_compare.py: error: {named}") and "\n" not in error


@pytest.mark.parametrize("study", ["1.5:2:8", "x:2:8:rtn", "1.5:2:8:rtn:mse", "1.5:2:0:none", "1.5:-1:8:rtn"])
def test_compare_refuses_a_bad_study_in_one_line(plain_dir, study):
    import demos.spinquant_compare as compare
    error = run_main(compare.main, f"--out_dir={plain_dir}", "--device=cpu", f"--study={study}")
    assert error.startswith(f"spinquant_compare.py: error: --study={study}: ") and "\n" not in error


@pytest.mark.parametrize("methods", ["awq", "rtn,rtn", "", "gptq,"])
def test_compare_refuses_bad_methods_in_one_line(plain_dir, methods):
    import demos.spinquant_compare as compare
    error = run_main(compare.main, f"--out_dir={plain_dir}", "--device=cpu", f"--methods={methods}")
    assert error.startswith(f"spinquant_compare.py: error: --methods={methods}: expected rtn, gptq") and "\n" not in error


def test_calibration_comes_from_the_tokens_training_left_out(tiny_trained, char_data, tmp_path, capsys):
    """A checkpoint trained with --calib_tokens=C: the demos' calibration and held-out windows all lie in the last C
    tokens of the train split (text the model never saw); without it, anywhere in the split."""
    import argparse
    from quantization.spin_quant_flags import load_inputs
    model, _ = tiny_trained
    folder = str(tmp_path / "c")
    _save_plain(folder, model)
    path = os.path.join(folder, "ckpt.pt")
    checkpoint = load_checkpoint(path)
    calib, seqlen = 20000, 16
    save_checkpoint(path, {**checkpoint, "config": {"calib_tokens": calib}})
    args = argparse.Namespace(out_dir=folder, seqlen=seqlen, nsamples=8, seed=0, heldout_tokens=170)
    _, _, _, calibration, heldout = load_inputs(args, "cpu", "error:")
    assert "the last 20,000 tokens of the train split" in capsys.readouterr().out
    tail = split_tokens("shakespeare_char", "train")[-calib:].long()
    tail_windows = tail[:len(tail) // (seqlen + 1) * (seqlen + 1)].view(-1, seqlen + 1)
    windows = torch.cat([calibration, heldout])
    assert len(windows) == 8 + 10 and len({tuple(w.tolist()) for w in windows}) == 18
    assert all((w == tail_windows).all(1).any() for w in windows)
    save_checkpoint(path, {**checkpoint, "config": {}})
    _, _, _, calibration, _ = load_inputs(args, "cpu", "error:")
    assert not all((w == tail_windows).all(1).any() for w in calibration)
