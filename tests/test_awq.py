"""Per-channel scale folding (quantization/fold.py), AWQ and SmoothQuant: folding keeps the float model's outputs,
AWQ's search never loses to round to nearest on its calibration data, SmoothQuant's scales follow the paper's
formula, and bad alphas are refused in one line."""
import copy

import pytest
import torch

from conftest import run_main
from model import GPT, GPTConfig
from quantization.autoround.calibration import capture_block_inputs, run_block
from quantization.awq import AWQ
from quantization.fold import fold_scale_into_layernorm, fold_scale_into_linear
from quantization.rtn import rtn_quantize, weight_spec
from quantization.smoothquant import smooth_model, smooth_scale

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def tiny64(bias, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=84, bias=bias)).double().eval()
    with torch.no_grad():  # LayerNorm gains and biases away from 1 and 0, so that folding into them is tested
        for ln in [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]:
            ln.weight.uniform_(0.5, 1.5)
            if ln.bias is not None:
                ln.bias.uniform_(-0.2, 0.2)
        for name, p in model.named_parameters():
            if name.endswith(".bias") and "ln" not in name:
                p.uniform_(-0.1, 0.1)
    return model


def tokens(n=4, seed=0):
    return torch.randint(0, 84, (n, 16), generator=torch.Generator().manual_seed(seed))


def scale(width, seed=1):
    return torch.rand(width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4 + 0.1


@pytest.mark.parametrize("bias", [True, False])
def test_folding_keeps_the_float_model_outputs(bias):
    model = tiny64(bias)
    idx = tokens()
    ref = model(idx, idx)[0]
    folded = copy.deepcopy(model)
    for i, block in enumerate(folded.transformer.h):
        a = block.attn
        fold_scale_into_layernorm(block.ln_1, [a.q, a.k, a.v], scale(32, i))
        fold_scale_into_linear(a.v, a.attn_proj, scale(32, 10 + i))
        fold_scale_into_layernorm(block.ln_2, [block.mlp.mlp_up], scale(32, 20 + i))
    assert not torch.equal(folded.transformer.h[0].ln_1.weight, model.transformer.h[0].ln_1.weight)
    assert torch.allclose(folded(idx, idx)[0], ref, atol=1e-6, rtol=0)


def test_fold_refuses_bad_scales():
    model = tiny64(True)
    block = model.transformer.h[0]
    with pytest.raises(ValueError, match="does not fit"):
        fold_scale_into_layernorm(block.ln_1, [block.attn.q], torch.ones(31, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        fold_scale_into_linear(block.attn.v, block.attn.attn_proj, torch.zeros(32, dtype=torch.float64))


@pytest.mark.parametrize("bias", [True, False])
def test_smoothquant_keeps_the_float_model_outputs(bias):
    model = tiny64(bias)
    idx = tokens()
    ref = model(idx, idx)[0]
    scales = smooth_model(model, tokens(8, 1), alpha=0.5, batch_size=4)
    assert len(scales) == 3 * 2
    assert torch.allclose(model(idx, idx)[0], ref, atol=1e-6, rtol=0)


def test_smoothquant_scale_formula():
    act = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)
    w1 = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.1, -4.0]], dtype=torch.float64)
    w2 = torch.tensor([[-3.0, 0.5, 0.5]], dtype=torch.float64)
    w_max = torch.tensor([3.0, 2.0, 4.0], dtype=torch.float64)
    for alpha in (0.0, 0.5, 0.8, 1.0):
        expected = act ** alpha / w_max ** (1 - alpha)
        assert torch.allclose(smooth_scale(act, [w1, w2], alpha).double(), expected, rtol=1e-6)


def test_awq_keeps_float_outputs_and_never_loses_to_rtn_on_its_calibration():
    model = tiny64(True).float()
    idx = tokens()
    ref = model(idx, idx)[0]
    calibration = tokens(8, 2)
    spec = weight_spec(3, 0)
    awq_model = copy.deepcopy(model)
    chosen = AWQ(awq_model, calibration, spec, grid=10, nsamples=8, batch_size=4, progress=False,
                 log=lambda line: None).apply()
    assert len(chosen) == 3 * 2 and all(0.0 <= a <= 1.0 for a in chosen.values())
    assert torch.allclose(awq_model(idx, idx)[0], ref, atol=1e-4)

    def first_block_error(m):
        rtn_quantize(m, spec)
        inputs = capture_block_inputs(m, calibration, 4, "cpu")
        return torch.mean((run_block(m.transformer.h[0], inputs, 4) - fp_targets) ** 2).item()

    fp_targets = run_block(model.transformer.h[0], capture_block_inputs(model, calibration, 4, "cpu"), 4)
    assert first_block_error(awq_model) <= first_block_error(copy.deepcopy(model)) * (1 + 1e-6)


@pytest.mark.parametrize("alphas", ["1.5", "-0.1", "0.5,2"])
def test_smoothquant_demo_refuses_alpha_outside_unit_interval(alphas, tmp_path):
    from conftest import load_script
    demo = load_script("demos/smoothquant_w8a8.py")
    error = run_main(demo.main, f"--out_dir={tmp_path / 'none'}", f"--alphas={alphas}")
    assert error is not None and "\n" not in error and "--alphas" in error and "[0, 1]" in error
    assert list(tmp_path.iterdir()) == []


def test_awq_grid_refused():
    with pytest.raises(ValueError, match="grid=0"):
        AWQ(tiny64(True).float(), tokens(4), weight_spec(3, 0), grid=0, nsamples=4)
