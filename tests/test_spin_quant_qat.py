"""SpinQuant in QAT (quantization/spin_quant_qat.py, train.py --spinquant): the choice at the switch, the rotated
model's logits and gradients, learned rotations, the probe, resuming, the carried optimizer state, and bad input."""
import math
import os

import pytest
import torch

from inference import load_checkpoint
from conftest import TINY, _calibration, read_log, run_main, train_in_process
from model import GPT, GPTConfig
from quantization.fold import fold_norms
from quantization.hf import from_pretrained
from quantization.hadamard import hadamard_matrix

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


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
    import quantization.spin_quant_qat as spin_quant_qat
    import train
    monkeypatch.setattr(spin_quant_qat, "QAT_SELECT", False)
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
    from quantization.spin_quant_qat import rotate_for_qat
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
    import quantization.spin_quant_qat as spin_quant_qat
    from generate import generate
    from quantization.spin_quant_qat import RotatedQAT, rotate_for_qat
    monkeypatch.setattr(spin_quant_qat, "QAT_BASIS", basis)
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
    from quantization.spin_quant import rotate_state
    from quantization.spin_quant_qat import RotatedQAT
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
    from quantization.spin_quant_qat import RotatedQAT
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
    import quantization.spin_quant_qat as spin_quant_qat
    monkeypatch.setattr(spin_quant, "CLEAR_Z", -math.inf)
    monkeypatch.setattr(spin_quant_qat, "QAT_LEARN_ROTATIONS", 10.0)
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


def test_qat_optimizer_carries_the_step_and_rotates_the_first_moment(tiny_trained, monkeypatch):
    import quantization.spin_quant_qat as spin_quant_qat
    from quantization.spin_quant_qat import qat_lr, rotate_for_qat
    monkeypatch.setattr(spin_quant_qat, "QAT_BASIS", "rotated")  # the moments are carried into the rotated basis
    monkeypatch.setattr(spin_quant_qat, "QAT_CARRY_MOMENTS", True)
    monkeypatch.setattr(spin_quant_qat, "QAT_REWARM", True)
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
