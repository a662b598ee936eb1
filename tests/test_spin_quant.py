"""SpinQuant: Hadamard constructions, exactness of folding and of every rotation, Cayley SGD, the saved checkpoint,
the held-out choice, the compare demo, and bad input (in QAT: tests/test_spin_quant_qat.py)."""
import math
import os
import re

import pytest
import torch

from checkpoint import save_checkpoint
from inference import load_checkpoint
from conftest import _calibration, _random_model, _random_orthogonal, _rel, _save_plain, load_script, run_main
from model import GPT, GPTConfig
from quantization.fold import fold_norms
from quantization.hf import from_pretrained
from quantization.hadamard import (factor, hadamard_matrix, hadamard_transform, paley_hadamard,
                                   random_hadamard_matrix)
from quantization.perplexity import split_tokens
from quantization.spin_quant import SpinQuant, sample_kl

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


def _gptq_mlp_up(model, calib, **options):
    """The second block's mlp_up weight after random Hadamard rotations and GPTQ with `options`."""
    sq = SpinQuant(model, bits=4, act_bits=8, kv_bits=4, method="gptq", seed=1)
    sq.optimize(calib, steps=0, progress=False)
    sq.apply(progress=False, select=False, **options)
    return sq.model.transformer.h[1].mlp.mlp_up.weight.detach().clone()


def test_apply_passes_gptq_options_through_act_order_changes_the_codes(tiny_trained, monkeypatch):
    """--act_order reaches GPTQ (gptq_weight called with it) and changes the weights it picks."""
    from quantization import gptq
    model, tokens = tiny_trained
    calib = _calibration(tokens)
    seen, original = [], gptq.gptq_weight
    monkeypatch.setattr(gptq, "gptq_weight", lambda *a, **k: seen.append(k.get("act_order", a[4] if len(a) > 4
                                                                             else False)) or original(*a, **k))
    weights = [_gptq_mlp_up(model, calib, act_order=act_order) for act_order in (False, True)]
    assert seen[:12] == [False] * 12 and seen[12:] == [True] * 12
    assert not torch.equal(weights[0], weights[1])


def test_apply_passes_fp_target_through(tiny_trained, monkeypatch):
    """fp_target reaches GPTQ: every layer's weight goes through asymmetric_weight, and the weights differ."""
    from quantization import gptq
    model, tokens = tiny_trained
    calib = _calibration(tokens)
    calls, original = [], gptq.asymmetric_weight
    monkeypatch.setattr(gptq, "asymmetric_weight", lambda *a, **k: calls.append(1) or original(*a, **k))
    weights = [_gptq_mlp_up(model, calib, fp_target=fp_target) for fp_target in (False, True)]
    assert len(calls) == 12 and not torch.equal(weights[0], weights[1])


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
                    "--method=rtn", "--learn_with_s4") is None
    lines = capsys.readouterr().out.strip().splitlines()
    last = lines[-1]
    # --learn_with_s4: the two candidates learned with S4 in the model, scored like the others
    assert any(line.startswith("candidate learned with S4 from identity R1+R2+R3+S4") for line in lines)
    assert any(line.startswith("candidate learned from identity, then with S4, R1+R2+R3+S4") for line in lines)
    assert last.startswith("spinquant perplexity: ") and "(no rotation " in last and ", full precision " in last
    assert ", kept " in last and any(line.startswith("candidate no rotation: held-out") for line in lines)
    assert any(line.startswith("learned from the identity: held-out calibration loss") for line in lines)
    assert os.path.samefile(os.path.join(out, "ckpt.pt"), os.path.join(out, "ckpt_spinquant.pt"))
    assert load_checkpoint(out)["ptq"]["choose_by"] == "ce"
    # the saved line names the weight method of the kept candidate (RTN where "no rotation, RTN" was kept)
    saved = next(line for line in lines if line.startswith("saved "))
    assert f"spinquant+{load_checkpoint(out)['ptq']['method'].removeprefix('spinquant+')}," in saved
    # --choose_by=kl: every candidate scored by its KL from full precision too, the choice by it, recorded
    kl_out = str(tmp_path / "sq_kl")
    assert run_main(demo.main, f"--out_dir={plain_dir}", f"--quantized_dir={kl_out}", "--steps=2", "--nsamples=8",
                    "--heldout_tokens=200", "--eval_tokens=2000", "--device=cpu", "--progress=False",
                    "--method=rtn", "--from_identity=False", "--smooth=False", "--choose_by=kl") is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("candidate no rotation: held-out calibration loss ") and "KL from full precision"
               in line for line in lines)
    assert any(line.startswith("kept ") and ": held-out KL from full precision " in line for line in lines)
    assert load_checkpoint(kl_out)["ptq"]["choose_by"] == "kl"
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
    (["--fp_target=maybe"], "argument --fp_target"),
    (["--gelu_shift=maybe"], "argument --gelu_shift"),
    (["--choose_by=mse"], "argument --choose_by"),
    (["--learn_with_s4", "--smooth=False"], "--learn_with_s4: needs --smooth, --from_identity and --steps above 0"),
    (["--learn_with_s4", "--steps=0"], "--learn_with_s4: needs --smooth"),
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
    # ... by the bar for the lowest of this many (family_threshold), never below CLEAR_Z
    from quantization.spin_quant import CLEAR_Z
    assert sq.choice["bar"] >= CLEAR_Z and f"{sq.choice['bar']:.2f} " in lines[-1]
    assert all(c["clear"] == (c["standard_errors"] >= sq.choice["bar"]) for c in sq.candidates if "gain" in c)
    best = min((c for c in sq.candidates if c["clear"]), key=lambda c: c["heldout_loss"])
    assert sq.choice["name"] == best["name"] and lines[-1].startswith(f"kept {best['name']}: ")
    assert abs(sq.evaluate(sq.heldout, model=sq.model) - best["heldout_loss"]) < 1e-6
    save_checkpoint(str(tmp_path / "ckpt.pt"), sq.checkpoint({"model_args": {}, "dataset": "shakespeare_char"}))
    x = sq.heldout[:2, :-1]
    assert torch.equal(from_pretrained(str(tmp_path))(x, x)[0], sq.model(x, x)[0])


def test_sample_kl_is_pytorchs_kl_div_in_float64(tiny_trained):
    """sample_kl against torch's own kl_div in float64, per sample, with the full-precision model as the reference;
    a model is at KL 0 from itself."""
    model, tokens = tiny_trained
    data = torch.cat(_calibration(tokens)[:5])
    other = GPT(model.config).eval()
    kl = sample_kl(other, model, data, "cpu", batch_size=2)
    with torch.no_grad():
        log_q = torch.log_softmax(other(data[:, :-1], data[:, 1:])[0].double(), -1)
        log_p = torch.log_softmax(model(data[:, :-1], data[:, 1:])[0].double(), -1)
    ref = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean(1)
    assert kl.shape == (5,) and kl.dtype == torch.float64 and torch.allclose(kl, ref, rtol=1e-4, atol=1e-6)
    assert kl.min() > 0 and sample_kl(model, model, data, "cpu").abs().max() < 1e-6


def test_choose_by_kl_keeps_the_lowest_heldout_kl_and_a_study_scores_both(tiny_trained):
    """choose_by="kl": each candidate's KL from the full-precision model on the held-out samples decides (the lowest
    of those clearly below no rotation by it); with a report both scores are kept and what each would keep is named;
    an unknown score is one ValueError."""
    model, tokens = tiny_trained
    sq = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0)
    sq.optimize(_calibration(tokens), steps=4, progress=False, from_identity=False)
    lines = []
    sq.apply(progress=False, log=lines.append, choose_by="kl", report=lambda m: 0.0)
    assert all("KL from full precision" in line for line in lines if line.startswith("candidate "))
    candidates = sq.candidates
    assert all("heldout_kl" in c and "heldout_loss" in c for c in candidates)
    best = min((c for c in candidates if c["clear"]), key=lambda c: c["heldout_kl"])
    assert sq.choice["name"] == best["name"] == sq.choice["by"]["kl"] and sq.choice["choose_by"] == "kl"
    kl = sample_kl(sq.model, model, sq.heldout, "cpu").mean().item()
    assert abs(kl - best["heldout_kl"]) < 1e-6 and lines[-1].startswith(f"kept {best['name']}: held-out KL")
    assert set(sq.choice["bars"]) == {"ce", "kl"} and min(sq.choice["bars"].values()) >= 2
    by_loss = min((c for c in candidates if c.get("ce_standard_errors", math.inf) >= sq.choice["bars"]["ce"]),
                  key=lambda c: c["heldout_loss"])
    assert sq.choice["by"]["ce"] == by_loss["name"]
    with pytest.raises(ValueError, match="choose_by='mse'"):
        sq.choose(choose_by="mse")


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


def test_learn_with_s4_learns_two_more_candidates_with_the_scales_in_the_model(tiny_trained, monkeypatch):
    """learn_with_s4: choose() learns R1/R2 twice more, as optimize learned (its samples, steps and step choice), on a
    model that has S4 (the GELU output's scales, online) instead of R4: from the identity and on from the rotations
    learned from the identity; both are candidates, scored like the others, and the lowest clear one is kept.
    Off (the default), neither is learned or listed."""
    model, tokens = tiny_trained
    calls = []
    learn = SpinQuant._learn

    def record(self, **kwargs):
        R1, R2 = self.rotation_values()
        calls.append((self.config.online_transforms, R1.clone(), kwargs["steps"], kwargs["data"]))
        return learn(self, **kwargs)

    monkeypatch.setattr(SpinQuant, "_learn", record)
    sq = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, smooth_alpha=0.5, learn_with_s4=True)
    sq.optimize(_calibration(tokens), steps=3, progress=False, from_identity=True)
    assert len(calls) == 2 and all("scale" not in t.get("mlp_activation_output", "") for t, *_ in calls)
    sq.apply(progress=False, log=lambda line: None)
    assert len(calls) == 4, len(calls)
    for transforms, R1, steps, data in calls[2:]:  # with S4 (and maybe the shift) online, no Hadamard: R4's place
        assert "scale" in transforms["mlp_activation_output"] and "hadamard" not in transforms["mlp_activation_output"]
        assert steps == 3 and data is sq.calibration
    eye = torch.eye(calls[2][1].shape[0])
    assert torch.equal(calls[2][1], eye) and torch.equal(calls[3][1], sq.learned_from_identity[0])
    names = [c["name"].removesuffix(" + shift") for c in sq.candidates]
    assert "learned with S4 from identity R1+R2+R3+S4" in names
    assert "learned from identity, then with S4, R1+R2+R3+S4" in names
    best = min((c for c in sq.candidates if c["clear"]), key=lambda c: c["heldout_loss"])
    assert sq.choice["name"] == best["name"]
    calls.clear()
    off = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, smooth_alpha=0.5)
    off.optimize(_calibration(tokens), steps=3, progress=False, from_identity=True)
    off.apply(progress=False, log=lambda line: None)
    assert len(calls) == 2 and not any("with S4" in c["name"] for c in off.candidates)


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


def test_the_bar_for_the_lowest_of_many_candidates_grows_with_how_many_move_apart():
    """family_threshold (max-T over random sign flips of the per-sample differences) against float64 references:
    one candidate, or many that move together, about CLEAR_Z (the 97.7% normal quantile); m independent ones, the
    Sidak bar for the largest of m normal z; never below CLEAR_Z; a level that is not finite (a test forcing the
    choice) comes back as it is."""
    from statistics import NormalDist
    from quantization.spin_quant import CLEAR_Z, family_threshold
    g = torch.Generator().manual_seed(3)
    one = torch.randn(1, 2000, generator=g, dtype=torch.float64)
    assert CLEAR_Z <= family_threshold(one, CLEAR_Z) < CLEAR_Z + 0.1
    together = one * torch.linspace(0.5, 2, 12, dtype=torch.float64)[:, None]
    assert abs(family_threshold(together, CLEAR_Z) - family_threshold(one, CLEAR_Z)) < 1e-9
    normal = NormalDist()
    for m in (5, 20):
        apart = torch.randn(m, 2000, generator=g, dtype=torch.float64)
        sidak = normal.inv_cdf(normal.cdf(CLEAR_Z) ** (1 / m))
        assert abs(family_threshold(apart, CLEAR_Z) - sidak) < 0.12, (m, sidak)
        assert abs(family_threshold(apart + 0.3, CLEAR_Z) - sidak) < 0.12  # a real gain does not move the bar
    assert family_threshold(torch.zeros(3, 50, dtype=torch.float64), CLEAR_Z) == CLEAR_Z
    assert family_threshold(one, -math.inf) == -math.inf and family_threshold(one[:, :1], 2.5) == 2.5


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
    # both scores of the choice (--choose_by): the loss's pick is the kept one, KL's is named beside it
    assert kept[0]["kept_by"]["ce"] == name and all("heldout_kl" in c for c in kept[0]["candidates"])
    assert f"Chosen by ce; kept by each score: ce: {name}" in out and f"; kl: {kept[0]['kept_by']['kl']}" in out
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


def test_choice_rules_bench_replays_each_rule(tmp_path, capsys):
    """bench/spinquant_choice_rules.py on a made-up table: the held-out rule keeps the lowest held-out loss among the
    clear candidates, the simplest-within-k-SE rule the candidate with the fewest fitted parts among those near it,
    the validation best the lowest validation loss; opt-in candidates are left out; bad flags are refused."""
    import json
    rules = load_script("bench/spinquant_choice_rules.py")
    # name, held-out loss, validation loss (report), clear; the best held-out gain is 0.010 at 5 standard errors
    cands = [("no rotation", 3.000, 4.000, True), ("learned R1+R2+R3+S4 + shift", 2.990, 3.996, True),
             ("learned all + shift", 2.9915, 3.994, True), ("Hadamard R4 + shift", 2.996, 3.997, True),
             ("random Hadamard R1", 2.995, 3.990, False),
             ("learned with S4 from identity R1+R2+R3+S4", 2.980, 3.9, True)]
    gains = [{} if n == "no rotation" else dict(gain=3.0 - h, standard_errors=(3.0 - h) / 0.002) for n, h, _, _ in cands]
    table = [dict(name=n, heldout_loss=h, report=v, clear=c, **g) for (n, h, v, c), g in zip(cands, gains)]
    rows = [dict(method="full precision", loss=3.990), dict(method="RTN, no rotation", loss=4.000),
            dict(method="SpinQuant + RTN, kept", loss=3.996, candidates=table)]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(dict(rows=rows)))
    assert run_main(rules.main, f"--files={path}", "--k=0.5,1") is None
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if "/t.json |" in row)
    # held-out: 2.990 (the opt-in 2.980 left out); within 0.5 SE (0.001) only it; within 1 SE (0.002) also 2.9915,
    # learned all (3 fitted parts against 4); the validation best: the candidate that was not clear, 3.990
    assert ("| 0.0100 | 40% learned R1+R2+R3+S4 + shift | 40% learned R1+R2+R3+S4 + shift | 60% learned all + shift "
            "| 100% random Hadamard R1 |") in line
    assert "| at least 70% | 0 | 0 | 0 | 1 |" in out
    assert rules.fitted_parts("learned from identity R1+R2+R3+S1+S2+S4 + shift") == 6
    assert rules.fitted_parts("Hadamard R3+R4 + shift") == 1 and rules.fitted_parts("learned R1") == 1
    assert "--k=x" in run_main(rules.main, f"--files={path}", "--k=x")
    assert "no JSON table" in run_main(rules.main, f"--files={tmp_path}/none*.json")
