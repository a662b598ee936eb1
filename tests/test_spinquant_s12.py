"""S1 and S2, SmoothQuant's scales where they fold offline in SpinQuant's candidates (quantization/spin_quant.py
norm_smooth_scales, smooth_norms_state): S1 at each norm's output, S2 at v's output."""
import pytest
import torch

from checkpoint import save_checkpoint
from conftest import _calibration, _random_model, _random_orthogonal, _rel, load_script
from model import GPT
from quantization.hf import from_pretrained
from quantization.quantizers import QuantSpec, fake_quant
from quantization.spin_quant import SMOOTHINGS, SpinQuant, activation_quant, gelu_output_scales, norm_smooth_scales


@pytest.mark.parametrize("rotations, fold", [((), False), ((), True), (("R3",), True),
                                             (("R1", "R2", "R3", "R4"), True)])
def test_s1_s2_float64_model_computes_the_same_logits_and_reloads(rotations, fold):
    """Folded into the norms' gains, q/k/v/mlp_up's columns, v's rows and attn_proj's columns, S1 and S2 leave the
    float64 model's function as it was: unfolded, folded, and in the basis of every rotation (with S4 too); a GPT
    built from its config and state computes the same."""
    model = _random_model()
    x = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    reference = model(x, x)[0]
    data = torch.randint(0, 40, (4, 17), generator=torch.Generator().manual_seed(2))
    sq = SpinQuant(model, bits=16, act_bits=16, kv_bits=16, rotations=rotations, fold=fold, smooth_norms=0.5,
                   smooth=gelu_output_scales(model, data, 0.5), dtype=torch.float64)
    sq.calibration = data
    sq.apply(progress=False, select=False)
    assert sq.norm_scales is not None and len(sq.norm_scales) == 3 * model.config.n_layer
    smoothed = sq.model
    assert _rel(smoothed(x, x)[0], reference) < 1e-6
    gain = smoothed.state_dict()["transformer.h.1.ln_2.weight"]
    assert not torch.allclose(gain, torch.ones_like(gain))  # the scales are there, not ones
    fresh = GPT(smoothed.config).double().eval()
    fresh.load_state_dict(smoothed.state_dict())
    assert torch.equal(fresh(x, x)[0], smoothed(x, x)[0])
    assert sq.info["rotations"].endswith("S1,S2,S4")


def test_norm_smooth_scales_follow_smoothquants_rule_with_the_rms(tiny_trained):
    """Against a float64 reference taken at other points (q's, mlp_up's and attn_proj's inputs in a plain model,
    no SpinQuant): s_j = rms_j^alpha / max_i |W[i, j]|^(1 - alpha), W every linear that reads the channel, up to
    one factor per scale (the mean is 1)."""
    model, tokens = tiny_trained
    data = torch.cat(_calibration(tokens, n=6))
    seen = {}

    def record(name):
        return lambda m, inp: seen.setdefault(name, []).append(inp[0].double())

    readers = {"ln_1": ("attn.q", ("attn.q", "attn.k", "attn.v")), "ln_2": ("mlp.mlp_up", ("mlp.mlp_up",)),
               "attn.v": ("attn.attn_proj", ("attn.attn_proj",))}
    handles = []
    for i, block in enumerate(model.transformer.h):
        for key, (at, _) in readers.items():
            handles.append(block.get_submodule(at).register_forward_pre_hook(record(f"{i}.{key}")))
    with torch.no_grad():
        model(data[:, :-1])
    for h in handles:
        h.remove()
    sq = SpinQuant(model, bits=16, act_bits=4, kv_bits=4, rotations=(), fold=False)
    for alpha in (0.0, 0.5, 0.8):
        got = norm_smooth_scales(sq.bake(), data, alpha, batch_size=4)
        for i, block in enumerate(model.transformer.h):
            for key, (_, weights) in readers.items():
                acts = torch.cat(seen[f"{i}.{key}"]).flatten(0, -2)
                w = torch.stack([block.get_submodule(r).weight.detach().double().abs().amax(0) for r in weights])
                expected = acts.pow(2).mean(0).sqrt() ** alpha / w.amax(0) ** (1 - alpha)
                assert torch.allclose(got[f"transformer.h.{i}.{key}"], expected / expected.mean(), rtol=1e-5), \
                    (alpha, i, key)
    assert sq.model.quantization_enabled  # taken with the quantizers off, left on
    with pytest.raises(ValueError, match=r"smooth_norms=1.5: must be in \[0, 1\]"):
        norm_smooth_scales(sq.model, data, 1.5)


def test_s1_quantizes_the_norm_output_divided_by_its_scale(tiny_trained):
    """With the attention input's quantizer alone on, S1 equals the plain model with that quantizer replaced by a
    hook on ln_1's output, x -> Q(x / s) s, the weights untouched (the reference does not fold anything)."""
    from dataclasses import asdict
    from model import GPTConfig
    from quantization.fold import build_like
    model, tokens = tiny_trained
    x = torch.cat(_calibration(tokens, n=2))[:, :-1]
    site = {"attn_input": activation_quant(4, 16)["attn_input"]}
    sq = SpinQuant(model, bits=16, act_quant=site, rotations=(), fold=False, smooth_norms=0.5, dtype=torch.float64)
    sq.apply(_calibration(tokens), progress=False, select=False)
    plain = build_like(GPTConfig(**asdict(model.config)), model.state_dict()).double().eval()
    spec = QuantSpec(**site["attn_input"])
    for i, block in enumerate(plain.transformer.h):
        s = sq.norm_scales[f"transformer.h.{i}.ln_1"]
        block.ln_1.register_forward_hook(lambda m, inp, out, s=s: fake_quant(out / s, spec) * s)
    assert torch.allclose(sq.model(x, x)[0], plain(x, x)[0], atol=1e-9)


def test_s1_s2_candidates_are_scored_as_models_built_apart_and_reload(tiny_trained, tmp_path):
    """The choice scores S1+S2+S4 alone, R3+S1+S2+S4 and the rotations learned from the identity with them, each as
    a model built apart scores it; smooth_alpha=None leaves them out (with S4's). A kept one saves and reloads."""
    model, tokens = tiny_trained
    sq = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, smooth_alpha=0.5)
    sq.optimize(_calibration(tokens), steps=2, progress=False, from_identity=True)
    g = torch.Generator().manual_seed(5)
    moved = [torch.linalg.qr(torch.randn(n, n, generator=g))[0] for n in (32, 16, 16)]
    sq.learned_from_identity = (moved[0], moved[1:])
    lines = []
    sq.apply(progress=False, log=lines.append)
    scales = gelu_output_scales(model, sq.calibration, 0.5)
    for name, rotations, fold, values in (("S1+S2+S4, no rotation", (), False, None),
                                          ("Hadamard R3+S1+S2+S4", ("R3",), True, None),
                                          ("learned from identity R1+R2+R3+S1+S2+S4", ("R1", "R2", "R3"), True,
                                           moved)):
        other = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, rotations=rotations, fold=fold,
                          smooth=scales, smooth_norms=0.5)
        if values is not None:
            other.set_rotations(values[0], values[1:])
        other.apply(sq.calibration, progress=False, select=False)
        candidate = next(c for c in sq.candidates if c["name"] == name)
        assert abs(sq.evaluate(sq.heldout, model=other.model) - candidate["heldout_loss"]) < 1e-6, name
        assert "gain over no rotation" in next(line for line in lines if line.startswith(f"candidate {name}:"))
    off = SpinQuant(model, bits=3, act_bits=4, kv_bits=4, method="rtn", seed=0, smooth_alpha=None)
    off.optimize(_calibration(tokens), steps=2, progress=False)
    off.apply(progress=False, log=lambda line: None)
    assert not any(s in c["name"] for c in off.candidates for s in SMOOTHINGS)
    kept = SpinQuant(model, bits=4, act_bits=4, kv_bits=4, method="rtn", rotations=("R3",), smooth=scales,
                     smooth_norms=0.5)
    kept.apply(sq.calibration, progress=False, select=False)
    save_checkpoint(str(tmp_path / "ckpt.pt"), kept.checkpoint({"model_args": {}, "dataset": "shakespeare_char"}))
    x = torch.cat(_calibration(tokens, n=3))[:, :-1]
    assert torch.equal(from_pretrained(str(tmp_path))(x, x)[0], kept.model(x, x)[0])
    assert kept.info["rotations"] == "R3,S1,S2,S4"


def test_s1_s2_bad_input_is_named():
    model = _random_model()
    with pytest.raises(ValueError, match=r"smooth_norms=2: must be in \[0, 1\], or None for no S1 and S2"):
        SpinQuant(model, smooth_norms=2)
    sq = SpinQuant(model, bits=4, rotations=(), fold=False, smooth_norms=0.5)
    with pytest.raises(ValueError, match="smooth_norms: S1 and S2 need calibration samples"):
        sq.apply(progress=False, select=False)


def test_s4_alpha_bench_scores_s1_s2_as_built_apart(plain_dir):
    """bench/spinquant_s4_alpha.py --norm_alphas: S1+S2 alone and with each S4, after the rows without them; the
    S1+S2 row is SpinQuant with smooth_norms built here on the same calibration samples."""
    bench = load_script("bench/spinquant_s4_alpha.py")
    from cli import OneLineParser
    from quantization.perplexity import evaluate, split_tokens
    from quantization.spin_quant_flags import add_spinquant_flags, check_args, load_inputs
    argv = [f"--out_dir={plain_dir}", "--device=cpu", "--eval_tokens=1000", "--nsamples=4"]
    rows = bench.main(argv + ["--alphas=0.5", "--statistics=rms", "--norm_alphas=0.5"])
    assert [(r["norm_alpha"], r["statistic"], r["alpha"]) for r in rows] == [
        (None, "-", None), (None, "rms", 0.5), (0.5, "-", None), (0.5, "rms", 0.5)]
    args = add_spinquant_flags(OneLineParser()).parse_args(argv)
    check_args(args)
    args.heldout_tokens = 0
    base, _, _, calibration, _ = load_inputs(args, "cpu", "error")
    sq = SpinQuant(base, bits=4, act_bits=4, kv_bits=4, method="rtn", rotations=(), fold=False, smooth_norms=0.5)
    sq.apply(calibration, progress=False, select=False)
    expected = evaluate(sq.model, split_tokens("shakespeare_char", "val"), max_tokens=1000, progress=False)["loss"]
    assert rows[2]["loss"] == pytest.approx(expected, abs=1e-6) and "gap_closed" in rows[2]


def test_s1_s2_are_taken_anew_when_the_rotations_change():
    """apply takes S1 and S2 in the basis of the rotations it bakes: after set_rotations, new scales, and the float64
    model still computes what the plain one does."""
    model = _random_model()
    x = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(1))
    reference = model(x, x)[0]
    data = torch.randint(0, 40, (4, 17), generator=torch.Generator().manual_seed(2))
    sq = SpinQuant(model, bits=16, act_bits=16, kv_bits=16, rotations=("R1", "R2"), smooth_norms=0.5,
                   dtype=torch.float64)
    sq.apply(data, progress=False, select=False)
    first = sq.norm_scales["transformer.h.0.ln_1"].clone()
    hd = model.config.n_embd // model.config.n_head
    sq.set_rotations(_random_orthogonal(model.config.n_embd, 7),
                     [_random_orthogonal(hd, 8 + i) for i in range(model.config.n_layer)])
    sq.apply(data, progress=False, select=False)
    assert not torch.allclose(sq.norm_scales["transformer.h.0.ln_1"], first)
    assert _rel(sq.model(x, x)[0], reference) < 1e-6
