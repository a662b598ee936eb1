"""GPTQ: round-to-nearest when the Hessian says inputs are uncorrelated, smaller output error than RTN when they
are not, act-order and groups in the packable layout, and better than RTN on a trained model at 3 bits."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantization.gptq import GPTQ, gptq_weight
from quantization.quantizers import dequantize, quantize_tensor
from quantization.rtn import weight_spec
from test_autoround import final_hidden, small_model, val_loss

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SPECS = [weight_spec(3, 0), weight_spec(3, 16), weight_spec(4, 32, sym=True), weight_spec(2, 8)]


def correlated_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix * torch.linspace(0.2, 3.0, d)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_round_to_nearest(spec, act_order):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    codes, scale, zero_point = gptq_weight(w, torch.eye(64), spec, damp_percent=0.0, act_order=act_order)
    ref_codes, ref_scale, ref_zero_point = quantize_tensor(w, spec)
    assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zero_point)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_layer_output_error(spec, act_order):
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = correlated_inputs()
    H = 2 * x.t() @ x / x.shape[0]
    codes, scale, zero_point = gptq_weight(w, H, spec, damp_percent=0.01, act_order=act_order)
    qmin, qmax = (0, 2 ** spec.bits - 1) if spec.grid == "affine" else (-2 ** (spec.bits - 1), 2 ** (spec.bits - 1) - 1)
    assert codes.min() >= qmin and codes.max() <= qmax and torch.equal(codes, codes.round())
    q = dequantize(codes, scale, zero_point, spec)  # the packed layout reproduces GPTQ's weights
    rtn = dequantize(*quantize_tensor(w, spec), spec)
    err_gptq = F.mse_loss(x @ q.t(), x @ w.t())
    err_rtn = F.mse_loss(x @ rtn.t(), x @ w.t())
    assert err_gptq < 0.9 * err_rtn


def test_dead_inputs_are_zeroed():
    torch.manual_seed(0)
    x = correlated_inputs(d=32)
    x[:, 5] = 0
    H = 2 * x.t() @ x / x.shape[0]
    codes, scale, zero_point = gptq_weight(torch.randn(8, 32), H, weight_spec(4, 0))
    assert torch.all(dequantize(codes, scale, zero_point, weight_spec(4, 0))[:, 5].abs() <= scale[:, 0] / 2)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_gptq_on_a_model_sets_every_site(true_sequential):
    model = small_model()
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    records = GPTQ(model, torch.randint(0, 84, (2000,)), bits=4, group_size=16, nsamples=8, seqlen=16,
                   true_sequential=true_sequential, act_order=true_sequential, progress=False,
                   log=lambda s: None).quantize()
    modules = dict(model.named_modules())
    assert set(records) == set(reference)
    for name, record in records.items():
        assert torch.equal(modules[name].weight, record.dequantize())
        assert not torch.equal(modules[name].weight, reference[name])


def test_bad_damp_percent():
    with pytest.raises(ValueError, match="damp_percent=2"):
        GPTQ(small_model(), torch.randint(0, 84, (2000,)), damp_percent=2, nsamples=4, seqlen=16)


def test_gptq_beats_rtn_at_3_bits(ptq_w3):
    fp, val = ptq_w3["fp"], ptq_w3["val"]
    reference = final_hidden(fp, val)
    mse = {m: F.mse_loss(final_hidden(ptq_w3[m], val), reference).item() for m in ("rtn", "gptq")}
    assert mse["gptq"] < mse["rtn"]
    assert val_loss(ptq_w3["gptq"], val) < val_loss(ptq_w3["rtn"], val)
