"""S4, SpinQuant's scale per channel of the GELU output (quantization/spin_quant.py gelu_output_scales), the shift
before it (gelu_output_means), and the online transforms that carry them (quantization/layers.py ChannelScale,
ScaledHadamard, ShiftedScale, ShiftedScaledHadamard)."""
import os

import pytest
import torch

from checkpoint import save_checkpoint
from conftest import _calibration, _random_model, _rel, load_script, run_main
from model import GPT, GPTConfig
from quantization.hadamard import hadamard_matrix
from quantization.hf import from_pretrained
from quantization.quantizers import QuantSpec, fake_quant
from quantization.spin_quant import SpinQuant, activation_quant, gelu_output_means, gelu_output_scales


def _scales(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0.25 + 2 * torch.rand(4 * model.config.n_embd, dtype=torch.float64, generator=g)
            for _ in range(model.config.n_layer)]


@pytest.mark.parametrize("rotations, transform", [((), "scale"), (("R4",), "scale_hadamard"),
                                                  (("R1", "R2", "R3", "R4"), "scale_hadamard"),
                                                  (("R1", "R2", "R3"), "scale")])
def test_s4_float64_model_computes_the_same_logits_and_reloads(rotations, transform):
    """W_down diag(s) with the site dividing by s (before R4 when both are on) is the model it came from: float64,
    any positive scales, alone and with every rotation; a GPT built from its config and state computes the same."""
    model = _random_model()
    x = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    reference = model(x, x)[0]
    scales = _scales(model)
    sq = SpinQuant(model, bits=16, act_bits=16, kv_bits=16, rotations=rotations, fold=bool(rotations), smooth=scales,
                   dtype=torch.float64)
    rotated = sq.bake()
    assert rotated.config.online_transforms == {"mlp_activation_output": transform}
    assert _rel(rotated(x, x)[0], reference) < 1e-6
    inv = rotated.state_dict()["transformer.h.1.mlp.act.activation_output.transform.inv_scale"]
    assert torch.allclose(inv, 1 / scales[1])
    fresh = GPT(rotated.config).double().eval()
    fresh.load_state_dict(rotated.state_dict())
    assert torch.equal(fresh(x, x)[0], rotated(x, x)[0])


def _means(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4 * model.config.n_embd, dtype=torch.float64, generator=g) for _ in range(model.config.n_layer)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rotations, smooth, transform", [((), False, "shift_scale"), ((), True, "shift_scale"),
                                                          (("R4",), True, "shift_scale_hadamard"),
                                                          (("R1", "R2", "R3", "R4"), True, "shift_scale_hadamard"),
                                                          (("R1", "R2", "R3"), False, "shift_scale")])
def test_shift_float64_model_computes_the_same_logits_and_reloads(bias, rotations, smooth, transform):
    """The site subtracting a mean per channel before S4's scale (and R4), mlp_down's bias adding W times it back,
    is the model it came from: float64, any means, with and without S4 and rotations; a model without biases gets
    zero ones (and only mlp_down's become non-zero); a GPT built from its config and state computes the same."""
    model = _random_model(bias=bias)
    x = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    reference = model(x, x)[0]
    means = _means(model)
    sq = SpinQuant(model, bits=16, act_bits=16, kv_bits=16, rotations=rotations, fold=bool(rotations),
                   smooth=_scales(model) if smooth else None, shift=means, dtype=torch.float64)
    rotated = sq.bake()
    assert rotated.config.online_transforms == {"mlp_activation_output": transform} and rotated.config.bias
    assert _rel(rotated(x, x)[0], reference) < 1e-6
    state = rotated.state_dict()
    assert torch.equal(state["transformer.h.1.mlp.act.activation_output.transform.shift"], means[1])
    if not bias:
        nonzero = {k for k, v in state.items() if k.endswith(".bias") and v.abs().max() > 0}
        assert nonzero == {f"transformer.h.{i}.mlp.mlp_down.bias" for i in range(2)}
    fresh = GPT(rotated.config).double().eval()
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x, x)[0], rotated(x, x)[0])
    assert sq.info["rotations"] == ",".join(rotations + (("S4",) if smooth else ()) + ("shift",))


def test_shift_quantizes_the_gelu_output_less_its_mean(tiny_trained):
    """With the GELU output's quantizer alone on, shift + S4 equals the plain model with that quantizer moved into a
    hook on mlp_down's input, x -> Q((x - m) / s) s + m, the weights untouched (the reference uses no transform)."""
    from dataclasses import asdict
    from quantization.fold import build_like
    model, tokens = tiny_trained
    x = torch.cat(_calibration(tokens, n=2))[:, :-1]
    site = {"mlp_activation_output": activation_quant(4, 16)["mlp_activation_output"]}
    scales, means = _scales(model, seed=3), _means(model, seed=4)
    sq = SpinQuant(model, bits=16, act_quant=site, rotations=(), fold=False, smooth=scales, shift=means,
                   dtype=torch.float64)
    plain = build_like(GPTConfig(**asdict(model.config)), model.state_dict()).double().eval()
    spec = QuantSpec(**site["mlp_activation_output"])
    for block, s, m in zip(plain.transformer.h, scales, means):
        block.mlp.mlp_down.register_forward_pre_hook(lambda _, i, s=s, m=m: (fake_quant((i[0] - m) / s, spec) * s + m,))
    assert torch.allclose(sq.bake()(x, x)[0], plain(x, x)[0], atol=1e-9)


def test_s4_quantizes_the_gelu_output_divided_by_its_scale(tiny_trained):
    """With the GELU output's quantizer alone on, S4 equals the plain model with that quantizer moved into a hook on
    mlp_down's input, x -> Q(x / s) s, the weights untouched (the reference does not use the transform)."""
    from dataclasses import asdict
    from quantization.fold import build_like
    model, tokens = tiny_trained
    x = torch.cat(_calibration(tokens, n=2))[:, :-1]
    site = {"mlp_activation_output": activation_quant(4, 16)["mlp_activation_output"]}
    scales = _scales(model, seed=3)
    sq = SpinQuant(model, bits=16, act_quant=site, rotations=(), fold=False, smooth=scales, dtype=torch.float64)
    plain = build_like(GPTConfig(**asdict(model.config)), model.state_dict()).double().eval()
    spec = QuantSpec(**site["mlp_activation_output"])
    for block, s in zip(plain.transformer.h, scales):
        block.mlp.mlp_down.register_forward_pre_hook(lambda m, i, s=s: (fake_quant(i[0] / s, spec) * s,))
    assert torch.allclose(sq.bake()(x, x)[0], plain(x, x)[0], atol=1e-9)


def test_gelu_output_scales_follow_smoothquants_rule_with_the_rms(tiny_trained):
    """Against a float64 reference taken at another point (mlp_down's input, not the activation site):
    s_j = rms_j^alpha / max_i |W_down[i, j]|^(1 - alpha), up to one factor per block (the scales' mean is 1); the
    shift's means are the channels' float64 averages there."""
    model, tokens = tiny_trained
    data = torch.cat(_calibration(tokens, n=6))
    seen = {i: [] for i in range(model.config.n_layer)}
    handles = [b.mlp.mlp_down.register_forward_pre_hook(lambda m, inp, i=i: seen[i].append(inp[0].double()))
               for i, b in enumerate(model.transformer.h)]
    with torch.no_grad():
        model(data[:, :-1])
    for h in handles:
        h.remove()
    for alpha, statistic in ((0.0, "rms"), (0.5, "rms"), (0.8, "rms"), (0.5, "max")):
        got = gelu_output_scales(model, data, alpha=alpha, batch_size=4, statistic=statistic)
        for i, block in enumerate(model.transformer.h):
            acts = torch.cat(seen[i]).flatten(0, -2)
            a = acts.pow(2).mean(0).sqrt() if statistic == "rms" else acts.abs().amax(0)
            w = block.mlp.mlp_down.weight.detach().double().abs().amax(0)
            expected = a ** alpha / w ** (1 - alpha)
            assert torch.allclose(got[i], expected / expected.mean(), rtol=1e-6), (alpha, statistic, i)
            assert abs(got[i].mean().item() - 1) < 1e-9
    for i, mean in enumerate(gelu_output_means(model, data, batch_size=4)):
        expected = torch.cat(seen[i]).flatten(0, -2).mean(0)  # the same samples as the scales' batches
        assert mean.dtype == torch.float64 and torch.allclose(mean, expected, rtol=1e-5, atol=1e-6), i
    with pytest.raises(ValueError, match=r"smooth_alpha=1.5: must be in \[0, 1\]"):
        gelu_output_scales(model, data, alpha=1.5)
    with pytest.raises(ValueError, match="statistic='mean': expected rms or max"):
        gelu_output_scales(model, data, statistic="mean")


def test_s4_candidates_are_scored_as_models_built_apart_and_can_be_left_out(tiny_trained, tmp_path):
    """The choice scores S4 alone, R3+S4 and the learned rotations with S4 in R4's place, and Hadamard R4, each as a
    model built apart with the same scales and the shift its pick kept (named "+ shift" where kept) scores it;
    smooth_alpha=None leaves the S4 ones out. A kept S4 saves and reloads."""
    model, tokens = tiny_trained
    sq = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, smooth_alpha=0.5)
    sq.optimize(_calibration(tokens), steps=2, progress=False, from_identity=True)
    g = torch.Generator().manual_seed(5)  # rotations that learning from the identity could have reached
    moved = [torch.linalg.qr(torch.randn(n, n, generator=g))[0] for n in (32, 16, 16)]
    sq.learned_from_identity = (moved[0], moved[1:])
    lines = []
    sq.apply(progress=False, log=lines.append)
    scales, _, s4_shift = sq.smooth_scales()
    assert torch.equal(scales[1], gelu_output_scales(model, sq.calibration, 0.5)[1])
    r4_shift = sq.r4_shift()
    names = [c["name"] for c in sq.candidates]
    s4 = " + shift" if s4_shift is not None else ""
    assert {"S4, no rotation" + s4, "Hadamard R3+S4" + s4, "learned from identity R1+R2+R3+S4" + s4} <= set(names)
    assert ("learned R1+R2+R3+S4" + s4 in names) == any(n.startswith("learned all") for n in names)
    for name, rotations, fold, values, shift in (
            ("S4, no rotation", (), False, None, s4_shift), ("Hadamard R3+S4", ("R3",), True, None, s4_shift),
            ("learned from identity R1+R2+R3+S4", ("R1", "R2", "R3"), True, moved, s4_shift),
            ("Hadamard R4", ("R4",), True, None, r4_shift)):
        other = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, rotations=rotations, fold=fold,
                          smooth=None if "R4" in rotations else scales, shift=shift)
        if values is not None:
            other.set_rotations(values[0], values[1:])
        other.apply(progress=False, select=False)
        name += " + shift" if shift is not None else ""
        candidate = next(c for c in sq.candidates if c["name"] == name)
        assert abs(sq.evaluate(sq.heldout, model=other.model) - candidate["heldout_loss"]) < 1e-6, name
        line = next(line for line in lines if line.startswith(f"candidate {name}:"))
        assert "gain over no rotation" in line  # S4 must clearly beat no rotation, as a rotation must
    off = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, smooth_alpha=None, gelu_shift=False)
    off.optimize(_calibration(tokens), steps=2, progress=False)
    off.apply(progress=False, log=lambda line: None)
    assert not any("S4" in c["name"] or "shift" in c["name"] for c in off.candidates)
    kept = SpinQuant(model, bits=4, act_bits=4, kv_bits=4, method="rtn", rotations=(), fold=False, smooth=scales)
    kept.apply(progress=False, select=False)
    save_checkpoint(str(tmp_path / "ckpt.pt"), kept.checkpoint({"model_args": {}, "dataset": "shakespeare_char"}))
    x = torch.cat(_calibration(tokens, n=3))[:, :-1]
    assert torch.equal(from_pretrained(str(tmp_path))(x, x)[0], kept.model(x, x)[0])
    assert kept.info["rotations"] == "S4"
    # the shift too: mlp_down's bias, packed like any other, and the saved means
    shifted = SpinQuant(model, bits=4, act_bits=4, kv_bits=4, method="rtn", rotations=(), fold=False, smooth=scales,
                        shift=gelu_output_means(model, sq.calibration))
    shifted.apply(progress=False, select=False)
    save_checkpoint(str(tmp_path / "shifted" / "ckpt.pt"), shifted.checkpoint({"model_args": {}, "dataset": "x"}))
    assert torch.equal(from_pretrained(str(tmp_path / "shifted"))(x, x)[0], shifted.model(x, x)[0])
    assert shifted.info["rotations"] == "S4,shift"


@pytest.mark.parametrize("gelu_shift", [False, True])
def test_s4_alpha_and_shift_are_chosen_on_the_samples_that_chose_the_cayley_step(tiny_trained, gelu_shift):
    """With several alphas (and with gelu_shift, each also after the shift), S4 takes the one whose S4 alone (RTN)
    scores lowest on heldout_steps, as models built here apart score them; the R4 shift is picked the same way. Each
    choice is logged, recorded, and made once."""
    model, tokens = tiny_trained
    sq = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, smooth_alpha=(0.25, 0.5, 0.9),
                   gelu_shift=gelu_shift)
    sq.optimize(_calibration(tokens), steps=1, progress=False)
    lines = []
    scales, alpha, shift = sq.smooth_scales(log=lines.append)
    means = gelu_output_means(model, sq.calibration)
    losses = {}
    for a, shifted in [(a, s) for s in ((False, True) if gelu_shift else (False,)) for a in (0.25, 0.5, 0.9)]:
        other = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, rotations=(), fold=False,
                          smooth=gelu_output_scales(model, sq.calibration, a), shift=means if shifted else None)
        other.apply(progress=False, select=False)
        losses[a, shifted] = sq.evaluate(sq.heldout_steps, model=other.model)
    assert (alpha, shift is not None) == min(losses, key=losses.get) and sq.info["smooth_alpha"] == alpha
    assert shift is None or all(torch.equal(a, b) for a, b in zip(shift, means))
    assert all(torch.equal(a, b) for a, b in zip(scales, gelu_output_scales(model, sq.calibration, alpha)))
    assert len(lines) == 1 and lines[0].startswith("S4 alpha: 0.25 ") and lines[0].endswith(
        "(S4 alone with RTN on the held-out samples that chose the Cayley step)")
    assert ("0.9+shift " in lines[0]) == gelu_shift
    assert sq.smooth_scales(log=lines.append)[1] == alpha and len(lines) == 1
    r4 = sq.r4_shift(log=lines.append)
    if not gelu_shift:
        assert r4 is None and len(lines) == 1
        return
    r4_losses = []
    for shifted in (None, means):
        other = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, rotations=("R4",), fold=False,
                          shift=shifted)
        other.apply(progress=False, select=False)
        r4_losses.append(sq.evaluate(sq.heldout_steps, model=other.model))
    assert (r4 is not None) == (r4_losses[1] < r4_losses[0]) and len(lines) == 2
    assert lines[1] == (f"R4 shift: off {r4_losses[0]:.4f}, on {r4_losses[1]:.4f}; kept {'on' if r4 else 'off'} (R4 "
                        f"alone with RTN on the held-out samples that chose the Cayley step)")
    assert sq.r4_shift(log=lines.append) is r4 and len(lines) == 2


def test_s4_bad_input_is_named():
    model = _random_model()
    with pytest.raises(ValueError, match="smooth: expected 2 scales of 96 channels"):
        SpinQuant(model, smooth=_scales(model)[:1])
    with pytest.raises(ValueError, match="shift: expected 2 means of 96 channels"):
        SpinQuant(model, shift=[m[:10] for m in _means(model)])
    with pytest.raises(ValueError, match=r"smooth_alpha=-0.1: must be in \[0, 1\]"):
        SpinQuant(model, smooth_alpha=-0.1)
    with pytest.raises(ValueError, match="online_transforms: attn_softmax_input: online transform 'scale' holds one "
                                         "scale per channel"):
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20,
                      online_transforms={"attn_softmax_input": "scale"}))
    with pytest.raises(ValueError, match="online_transforms: mlp_input: online transform 'rotate' is unknown"):
        GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20,
                      online_transforms={"mlp_input": "rotate"}))


def test_the_hadamard_transform_after_the_scale_is_the_dense_matrix():
    from quantization.layers import make_transform
    t = make_transform("scale_hadamard", 48).double()  # float64 before the scale is set: no float32 rounding
    scale, shift = torch.linspace(0.5, 2, 48, dtype=torch.float64), torch.linspace(-1, 1, 48, dtype=torch.float64)
    with torch.no_grad():
        t.inv_scale.copy_(scale)
    x = torch.randn(3, 5, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(t(x), (x * scale) @ hadamard_matrix(48).t(), atol=1e-12)
    shifted = make_transform("shift_scale_hadamard", 48).double()
    with torch.no_grad():
        shifted.inv_scale.copy_(scale)
        shifted.shift.copy_(shift)
    assert torch.allclose(shifted(x), ((x - shift) * scale) @ hadamard_matrix(48).t(), atol=1e-12)
    assert sorted(shifted.state_dict()) == ["inv_scale", "shift"]


@pytest.mark.parametrize("flag", ["--smooth_alpha=1.5", "--smooth_alpha=nan", "--smooth_alpha=0.5,x",
                                  "--smooth_alpha="])
def test_demo_refuses_a_bad_smooth_alpha_in_one_line(plain_dir, tmp_path, flag):
    import demos.spinquant_ptq as demo
    out = str(tmp_path / "sq")
    error = run_main(demo.main, f"--out_dir={plain_dir}", f"--quantized_dir={out}", "--device=cpu", flag)
    assert error.startswith("spinquant_ptq.py: error: ") and "--smooth_alpha" in error and "\n" not in error
    assert not os.path.exists(out)


def test_s4_alpha_bench_table_and_bad_flags(plain_dir, capsys):
    """bench/spinquant_s4_alpha.py: its no-S4 row is plain RTN without rotation, built here apart; one row per
    statistic and alpha; bad flags one line each."""
    bench = load_script("bench/spinquant_s4_alpha.py")
    from quantization.perplexity import evaluate, split_tokens
    from quantization.rtn import rtn_quantize, weight_spec
    from quantization.spin_quant import unrotated
    rows = bench.main([f"--out_dir={plain_dir}", "--device=cpu", "--eval_tokens=1000", "--nsamples=4",
                       "--alphas=0.5,1", "--statistics=rms,max", "--act_only"])
    assert [(r["weights"], r["statistic"], r["alpha"]) for r in rows][:5] == [
        ("RTN", "-", None), ("RTN", "rms", 0.5), ("RTN", "rms", 1.0), ("RTN", "max", 0.5), ("RTN", "max", 1.0)]
    assert len(rows) == 10 and rows[5]["weights"] == "full precision"
    model = unrotated(from_pretrained(plain_dir), 4, 4)
    rtn_quantize(model, weight_spec(4))
    expected = evaluate(model, split_tokens("shakespeare_char", "val"), max_tokens=1000, progress=False)["loss"]
    assert rows[0]["loss"] == pytest.approx(expected, abs=1e-6)
    assert "| weights | S1+S2 alpha | S4 statistic | S4 alpha | shift | R4 | val loss | gap closed |" in (
        capsys.readouterr().out)
    rows = bench.main([f"--out_dir={plain_dir}", "--device=cpu", "--eval_tokens=1000", "--nsamples=4", "--alphas=0.5",
                       "--statistics=rms", "--shift", "--r4"])
    assert [(r["alpha"], r["shift"], r["r4"]) for r in rows] == [
        (None, False, False), (0.5, False, False), (None, True, False), (0.5, True, False),
        (None, False, True), (0.5, False, True), (None, True, True), (0.5, True, True)]
    assert rows[0]["loss"] == pytest.approx(expected, abs=1e-6) and "gap_closed" in rows[2]
    assert all(r["norm_alpha"] is None for r in rows)
    for flag, named in (("--alphas=0.5,x", "--alphas=0.5,x"), ("--alphas=2", "--alphas=2"),
                        ("--norm_alphas=0.5,y", "--norm_alphas=0.5,y"), ("--norm_alphas=-1", "--norm_alphas=-1"),
                        ("--statistics=mean", "--statistics=mean"), ("--bits=16", "--bits=16")):
        error = run_main(bench.main, f"--out_dir={plain_dir}", "--device=cpu", flag)
        assert error.startswith(f"spinquant_s4_alpha.py: error: {named}") and "\n" not in error, error


def test_input_shift_study_keeps_the_function_and_takes_the_means_of_what_the_quantizers_read(plain_dir, tiny_trained):
    """bench/spinquant_input_shift.py: in every rotation set the shifted models compute the model's logits in full
    precision (the mean comes back through q, k, v's and mlp_up's biases); each row scores no shift and the three
    shifts; the means are those of ln_1's and ln_2's outputs, computed here from the blocks directly; bits 16 and a
    bad flag are refused in one line."""
    bench = load_script("bench/spinquant_input_shift.py")
    rows = bench.main([f"--out_dir={plain_dir}", "--device=cpu", "--nsamples=4", "--eval_tokens=300"])
    assert [r["rotations"] for r in rows] == [name for name, _, _ in bench.SETS]
    for r in rows:
        assert r["full_precision_difference"] < 1e-4, r
        assert set(r["gap_closed"]) == {"attn", "mlp", "attn+mlp"} and all(r[k] > 0 for k in ("attn", "mlp"))
    model = tiny_trained[0].eval()
    data = _calibration(tiny_trained[1], n=6, seqlen=17)
    means = bench.input_means(model, data)
    with torch.no_grad():
        x = torch.cat(data)[:, :-1]
        pos = torch.arange(x.shape[1])
        h = model.transformer.wte(x) + model.transformer.wpe(pos)
        block = model.transformer.h[0]
        expected_attn = block.ln_1(h).double().mean((0, 1))
        h = h + block.attn(block.ln_1(h))
        expected_mlp = block.ln_2(h).double().mean((0, 1))
    assert torch.allclose(means[(0, "attn")], expected_attn, atol=1e-6)
    assert torch.allclose(means[(0, "mlp")], expected_mlp, atol=1e-6)
    error = run_main(bench.main, f"--out_dir={plain_dir}", "--bits=16")
    assert error is not None and error.startswith("spinquant_input_shift.py: error: --bits=16")
