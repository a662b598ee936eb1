"""residual_binary_quant (W as a sum of k scaled sign matrices) against an explicit float64 greedy fit, and its
flags, QAT, PTQ (RTN), packed checkpoints, save_weights and visualize."""
import os

import pytest
import torch

from conftest import run_main, train
from quantization.quantizers import QuantSpec, code_range, dequantize, fake_quant, quantize_tensor


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3


def reference_fit(w, terms, group):
    """BiLLM eq. 6-7 written out in float64, one row (of `group` values) at a time: term i is the sign of what
    the terms before it left over, times the mean absolute value of that residual."""
    rows = w.double().reshape(-1, group)
    approx = torch.zeros_like(rows)
    scales = torch.zeros(rows.shape[0], terms, dtype=torch.float64)
    for r in range(rows.shape[0]):
        residual = rows[r].clone()
        for t in range(terms):
            alpha = residual.abs().sum() / group
            sign = torch.tensor([1.0 if v >= 0 else -1.0 for v in residual.tolist()], dtype=torch.float64)
            residual -= alpha * sign
            approx[r] += alpha * sign
            scales[r, t] = alpha
    return approx.reshape(w.shape), scales


@pytest.mark.parametrize("granularity,group_size", [("per_channel", 0), ("per_group", 16), ("per_tensor", 0)])
@pytest.mark.parametrize("terms", [1, 2, 3, 4])
def test_matches_float64_greedy_fit(granularity, group_size, terms):
    w = rand(8, 64, seed=terms)
    spec = QuantSpec("residual_binary_quant", granularity=granularity, group_size=group_size, binary_terms=terms)
    group = {"per_channel": 64, "per_group": 16, "per_tensor": w.numel()}[granularity]
    ref, ref_scales = reference_fit(w, terms, group)
    codes, scale, zero_point = quantize_tensor(w, spec)
    assert scale.shape == ref_scales.shape
    assert torch.allclose(scale.double(), ref_scales, rtol=1e-5, atol=0)
    assert torch.allclose(dequantize(codes, scale, zero_point, spec).double(), ref, rtol=0, atol=1e-5)
    assert torch.allclose(fake_quant(w, spec).double(), ref, rtol=0, atol=1e-5)
    qmin, qmax = code_range(spec)
    assert (qmin, qmax) == (0, 2 ** terms - 1) and codes.min() >= qmin and codes.max() <= qmax


def test_each_scale_is_the_least_squares_one():
    """Brute force: for its sign matrix, each term's scale (mean |residual|) minimises the squared error of the
    residual, against a fine grid of scales."""
    w = rand(4, 64, seed=5).double()
    spec = QuantSpec("residual_binary_quant", binary_terms=3)
    _, scale, _ = quantize_tensor(w.float(), spec)
    residual = w.clone()
    for t in range(3):
        sign = torch.where(residual >= 0, 1.0, -1.0).double()
        grid = torch.linspace(0, 3, 30001, dtype=torch.float64)
        errors = ((residual[:, None, :] - grid[None, :, None] * sign[:, None, :]) ** 2).sum(-1)
        best = grid[errors.argmin(dim=1)]
        assert torch.allclose(scale[:, t].double(), best, atol=2e-4), t
        residual = residual - scale[:, t:t + 1].double() * sign


def test_one_term_is_binary_quant():
    w = rand(16, 64, seed=3).requires_grad_()
    one = fake_quant(w, QuantSpec("residual_binary_quant", binary_terms=1), training=True)
    binary = fake_quant(w, QuantSpec("binary_quant"), training=True)
    assert torch.equal(one, binary)
    grad_one, = torch.autograd.grad(one.sum(), w)
    assert torch.equal(grad_one, torch.ones_like(w))  # straight through everywhere, as binary_quant


def test_error_falls_with_each_term():
    w = rand(32, 128, seed=9)
    errors = [(fake_quant(w, QuantSpec("residual_binary_quant", binary_terms=k)) - w).pow(2).mean().item()
              for k in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert QuantSpec("residual_binary_quant", binary_terms=3).effective_bits == 3


@pytest.mark.parametrize("terms", [0, 5])
def test_terms_out_of_range(terms):
    with pytest.raises(ValueError, match=f"binary_terms={terms} is out of range; expected 1..4"):
        QuantSpec("residual_binary_quant", binary_terms=terms)


def test_flags_per_kind_and_site():
    from configurator import ConfigError, model_quant_config, parse_args
    args = parse_args(["--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear",
                       "--quantize_linear_method=residual_binary_quant", "--quantize_linear_binary_terms_mlp=3",
                       "--quantize_linear_binary_terms_v=1"])
    quant = model_quant_config(args)["weight_quant"]
    assert {s: quant[s]["binary_terms"] for s in quant} == {"q": 2, "k": 2, "v": 1, "attn_proj": 2, "mlp_up": 3,
                                                            "mlp_down": 3}
    args = parse_args(["--linear_variant_mlp=quantized_linear", "--quantize_linear_binary_terms_mlp_up=7"])
    with pytest.raises(ConfigError, match=r"^--quantize_linear_binary_terms_mlp_up: binary_terms=7 is out of range"):
        model_quant_config(args)


def test_bad_terms_flag_writes_nothing(char_data, tmp_path):
    import train as train_script
    out = tmp_path / "bad"
    error = run_main(train_script.main, f"--out_dir={out}", "--linear_variant_attn=quantized_linear",
                     "--quantize_linear_method=residual_binary_quant", "--quantize_linear_binary_terms=0")
    assert error is not None and "--quantize_linear_binary_terms" in error and "expected 1..4" in error
    assert "\n" not in error
    assert not os.path.exists(out) or not os.listdir(out)


RESIDUAL_QAT = ["--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear",
                "--quantize_linear_method=residual_binary_quant", "--quantization_warmup_iters=5",
                "--quantize_linear_granularity_mlp=per_group", "--quantize_linear_group_size_mlp=16"]


@pytest.fixture(scope="session")
def residual_ckpt(char_data, tmp_path_factory):
    """A tiny model trained 20 steps with residual binary weights (2 terms; per channel in attention, per group
    of 16 in the MLP): its out_dir."""
    out = tmp_path_factory.mktemp("residual_ckpt")
    train(out, "--max_iters=20", "--eval_interval=20", "--n_embd=64", *RESIDUAL_QAT)
    return str(out)


def test_qat_trains_and_weights_are_two_terms(residual_ckpt):
    from sample import load_model
    model, _ = load_model(residual_ckpt, "cpu")
    layer = model.transformer.h[0].mlp.mlp_up
    assert layer.spec.method == "residual_binary_quant" and layer.spec.binary_terms == 2
    ref, _ = reference_fit(layer.latent_weight.detach(), 2, 16)
    assert torch.allclose(layer.weight.double(), ref, atol=1e-5)
    assert len(torch.unique(layer.weight[0, :16])) <= 4  # a group holds at most 2**terms values


def test_rtn_ptq_and_packed_checkpoint():
    import copy

    from model import GPT, GPTConfig
    from quantization.packing import load_packed, packed_bytes, packed_checkpoint, unpack_weight
    from quantization.rtn import rtn_quantize
    torch.manual_seed(0)
    model_args = dict(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=32, bias=False)
    fp = GPT(GPTConfig(**model_args))
    model = copy.deepcopy(fp)
    spec = QuantSpec("residual_binary_quant", granularity="per_group", group_size=32, binary_terms=2)
    records = rtn_quantize(model, spec)
    name = "transformer.h.1.mlp.mlp_down"
    ref, _ = reference_fit(fp.get_submodule(name).weight.detach(), 2, 32)
    assert torch.allclose(model.get_submodule(name).weight.double(), ref, atol=1e-5)
    ckpt = packed_checkpoint({"model_args": model_args}, model, records, {"method": "rtn"})
    codes_bytes, _ = packed_bytes(ckpt)
    n_weights = sum(r.codes.numel() for r in records.values())
    assert codes_bytes == sum((r.codes.numel() * 2 + 7) // 8 for r in records.values()) and codes_bytes * 8 >= 2 * n_weights
    fresh = copy.deepcopy(fp)
    load_packed(fresh, ckpt)
    assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)
    bad = dict(ckpt["packed_weights"][name], scale=torch.cat([ckpt["packed_weights"][name]["scale"]] * 2, dim=1))
    with pytest.raises(ValueError, match=f"^{name} stores 4 binary terms but its spec says binary_terms=2$"):
        unpack_weight(bad, name)


def test_save_weights_and_visualize_terms(residual_ckpt, tmp_path):
    from quantization import save_weights, visualize
    from sample import load_model
    path = str(tmp_path / "terms.npz")
    save_weights.main([f"--out_dir={residual_ckpt}", f"--file_name={path}", "--file_type=npz", "--snr_batch_size=0"])
    tensors = save_weights.load_quantized_data(path)["tensors"]
    model, _ = load_model(residual_ckpt, "cpu")
    model.eval()
    name = "transformer.h.1.mlp.mlp_up.weight"
    terms = [tensors[f"{name}.term{t}"] for t in range(2)]
    assert [t["term"] for t in terms] == [0, 1] and all(t["levels"] == 2 for t in terms)
    assert set(terms[1]["codes"].ravel().tolist()) <= {-1, 1}
    total = sum(torch.from_numpy(save_weights.dequantize_entry(t)) for t in terms)
    assert torch.allclose(total, model.get_submodule(name[:-len(".weight")]).weight.detach(), atol=1e-6)
    assert terms[0]["noise_sq"] == 0.0 and terms[1]["noise_sq"] > 0.0
    images = tmp_path / "images"
    visualize.main([f"--file_name={path}", f"--image_folder={images}", f"--weight={name}.term1"])
    assert os.path.getsize(images / f"{name}.term1_histogram.png") > 0
