"""Dense-and-sparse weights: the outlier split against a float64 reference, QAT's outlier gradient, the CSR of
packed checkpoints, sparse inference, and bad input."""
import copy
import dataclasses
import os

import pytest
import torch

from checkpoint import save_checkpoint
from conftest import run_main
from model import GPT, GPTConfig
from quantization.autoround import AutoRound
from quantization.gptq import GPTQ
from quantization.packing import (from_csr, load_dense_sparse, load_packed, outlier_bytes, packed_bytes,
                                  packed_checkpoint, to_csr)
from quantization.quantizers import (QuantSpec, dense_and_sparse, dequantize, fake_quant, outlier_count,
                                     outlier_mask, storage_bits)
from quantization.rtn import bits_per_weight, rtn_quantize, weight_spec

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def weight_with_outliers(seed=0, shape=(48, 64)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    idx = torch.randperm(w.numel(), generator=g)[:20]
    w.view(-1)[idx] = torch.randn(20, generator=g).sign() * (0.2 + torch.rand(20, generator=g))
    return w


def reference_split(w, spec, act_scale=None):
    """float64: the top-k by |w| (or |w| * act_scale) and the symmetric/affine RTN of the rest, row by row."""
    w64 = w.double()
    score = w64.abs() * (1 if act_scale is None else act_scale.double()[None, :])
    k = round(spec.outlier_fraction * w.numel())
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[torch.argsort(score.reshape(-1), descending=True)[:k]] = True
    mask = mask.reshape(w.shape)
    dense = torch.where(mask, 0.0, w64)
    rows = dense.reshape(-1, spec.group_size) if spec.granularity == "per_group" else dense
    if spec.method == "symmetric_quant":
        qmax = 2 ** (spec.bits - 1) - 1
        scale = rows.abs().amax(1, keepdim=True) / qmax
        q = torch.clamp(torch.round(rows / scale), -qmax - 1, qmax) * scale
    else:
        qmax = 2 ** spec.bits - 1
        lo, hi = rows.amin(1, keepdim=True).clamp(max=0), rows.amax(1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(rows / scale) + zero, 0, qmax) - zero) * scale
    return mask, q.reshape(w.shape)


@pytest.mark.parametrize("spec", [
    QuantSpec("symmetric_quant", 3, "per_channel", outlier_fraction=0.005),
    QuantSpec("affine_quant", 2, "per_channel", outlier_fraction=0.01),
    QuantSpec("affine_quant", 4, "per_group", group_size=16, outlier_fraction=0.02),
])
def test_dense_and_sparse_matches_float64_reference(spec):
    w = weight_with_outliers()
    mask_ref, dense_ref = reference_split(w, spec)
    codes, scale, zero_point, sparse = dense_and_sparse(w, spec)
    dense = dequantize(codes, scale, zero_point, spec)
    assert torch.equal(outlier_mask(w, spec.outlier_fraction), mask_ref)
    assert int(mask_ref.sum()) == outlier_count(w.numel(), spec.outlier_fraction)
    assert torch.equal(sparse != 0, mask_ref)  # S holds exactly the top-k
    assert torch.allclose(dense[~mask_ref].double(), dense_ref[~mask_ref], atol=1e-6)
    assert torch.equal((dense + sparse)[mask_ref], w[mask_ref])  # exact at the outliers
    # without the outliers, every row's range is narrower: the dense error is smaller than plain RTN's
    plain = fake_quant(w, dataclasses.replace(spec, outlier_fraction=0.0))
    assert ((dense + sparse - w) ** 2).sum() < ((plain - w) ** 2).sum()


def test_sensitivity_picks_large_weight_times_activation():
    w = weight_with_outliers(1)
    act = torch.rand(w.shape[1]) * 10
    spec = QuantSpec("symmetric_quant", 3, "per_channel", outlier_fraction=0.01)
    mask_ref, _ = reference_split(w, spec, act)
    assert torch.equal(outlier_mask(w, spec.outlier_fraction, act), mask_ref)
    assert not torch.equal(outlier_mask(w, spec.outlier_fraction), mask_ref)


def test_qat_outliers_pass_in_full_precision_with_their_gradient():
    w = weight_with_outliers(2).requires_grad_()
    spec = QuantSpec("symmetric_quant", 2, "per_channel", outlier_fraction=0.005)
    y = fake_quant(w, spec, training=True)
    mask = outlier_mask(w, spec.outlier_fraction)
    codes, scale, zero_point, sparse = dense_and_sparse(w, spec)
    assert torch.equal(y.detach(), dequantize(codes, scale, zero_point, spec) + sparse)
    y.sum().backward()
    assert torch.all(w.grad[mask] == 1)


@pytest.mark.parametrize("fraction", [-0.01, 0.5, 0.7])
def test_fraction_outside_range_refused(fraction):
    with pytest.raises(ValueError, match=r"outlier_fraction=.*\[0, 0.5\)"):
        QuantSpec(outlier_fraction=fraction)


@pytest.mark.parametrize("flag", ["--quantize_linear_outlier_fraction=0.5",
                                  "--quantize_linear_outlier_fraction_mlp=-0.1",
                                  "--quantize_linear_outlier_fraction_q=0.9"])
def test_bad_qat_flag_is_one_line_naming_it(tmp_path, flag):
    import train
    out = tmp_path / "out"
    error = run_main(train.main, f"--out_dir={out}", "--linear_variant_attn=quantized_linear",
                     "--linear_variant_mlp=quantized_linear", flag)
    assert error is not None and "\n" not in error and flag.split("=")[0] in error
    assert not out.exists()


def test_per_site_outlier_flag_reaches_the_config():
    from configurator import model_quant_config, parse_args
    args = parse_args(["--linear_variant_mlp=quantized_linear", "--quantize_linear_outlier_fraction=0.005",
                       "--quantize_linear_outlier_fraction_mlp_down=0.01"])
    quant = model_quant_config(args)
    assert quant["weight_quant"]["mlp_up"]["outlier_fraction"] == 0.005
    assert quant["weight_quant"]["mlp_down"]["outlier_fraction"] == 0.01


def test_csr_round_trip_and_storage_bits():
    w = weight_with_outliers(3)
    spec = QuantSpec("affine_quant", 3, "per_channel", outlier_fraction=0.01)
    sparse = dense_and_sparse(w, spec)[3].half().float()
    csr = to_csr(sparse)
    assert csr["crow"].dtype == torch.int32 and csr["col"].dtype == torch.int16 and csr["values"].dtype == torch.float16
    assert torch.equal(from_csr(csr, list(w.shape)), sparse)
    wide = torch.zeros(2, 40000)
    wide[1, 39999] = 1.5
    assert to_csr(wide)["col"].dtype == torch.int32 and torch.equal(from_csr(to_csr(wide), [2, 40000]), wide)
    n = int((sparse != 0).sum())
    expected = w.numel() * 3 + 48 * (32 + 8) + 32 * 49 + n * (16 + 16)
    assert storage_bits(spec, w.shape, n) == expected


def tiny(seed=0, bias=True):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=84, bias=bias)).eval()


@pytest.fixture(scope="module")
def rtn_packed():
    model = tiny()
    records = rtn_quantize(model, weight_spec(3, 0, outlier_fraction=0.01))
    return model, records, packed_checkpoint({"model_args": dataclasses.asdict(model.config)}, model, records, {})


def test_packed_bytes_are_the_bits_printed(rtn_packed):
    model, records, checkpoint = rtn_packed
    codes, params = packed_bytes(checkpoint)
    numel = sum(r.codes.numel() for r in records.values())
    assert (codes + params + outlier_bytes(checkpoint)) * 8 == pytest.approx(bits_per_weight(records) * numel)
    assert bits_per_weight(records) > 3 + 0.01 * 32  # codes, plus each outlier's index and value


def test_sparse_inference_equals_dequantized(rtn_packed):
    model, records, checkpoint = rtn_packed
    idx = torch.randint(0, 84, (3, 16), generator=torch.Generator().manual_seed(0))
    dequantized, sparse = load_packed(tiny(1), checkpoint), load_dense_sparse(tiny(2), checkpoint)
    from quantization.layers import DenseSparseLinear
    assert sum(isinstance(m, DenseSparseLinear) for m in sparse.modules()) == len(records)
    with torch.no_grad():
        ref = model(idx, idx)[0]
        assert torch.equal(dequantized(idx, idx)[0], ref)
        assert torch.allclose(sparse(idx, idx)[0], ref, atol=1e-5)
    for name, r in records.items():  # the outliers sit exactly at their fp16 values
        w = dequantized.get_submodule(name).weight
        mask = r.sparse != 0
        assert torch.equal(w[mask], (r.dequantize())[mask])


def test_mismatched_sparse_matrix_is_one_line_naming_the_file(rtn_packed, tmp_path, char_data):
    import sample
    _, _, checkpoint = rtn_packed
    bad = copy.deepcopy(checkpoint)
    bad["dataset"] = "shakespeare_char"
    name = next(iter(bad["packed_weights"]))
    bad["packed_weights"][name]["outliers"]["crow"] = bad["packed_weights"][name]["outliers"]["crow"][:-1]
    path = tmp_path / "bad" / "ckpt.pt"
    save_checkpoint(str(path), bad)
    error = run_main(sample.main, f"--out_dir={path.parent}", "--device=cpu", "--num_samples=1",
                     "--max_new_tokens=2")
    assert error is not None and "\n" not in error and str(path.parent) in error and name in error
    assert "do not match the layer's shape" in error


@pytest.mark.parametrize("method", ["gptq", "autoround"])
def test_gptq_and_autoround_keep_the_outliers_apart(method):
    model = tiny(4)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith(("q", "mlp_up"))}
    calibration = torch.randint(0, 84, (8, 16), generator=torch.Generator().manual_seed(0))
    kwargs = dict(bits=3, group_size=0, nsamples=8, batch_size=4, progress=False, log=lambda line: None,
                  outlier_fraction=0.01)
    quantizer = GPTQ(model, calibration, **kwargs) if method == "gptq" else AutoRound(model, calibration, iters=5,
                                                                                       **kwargs)
    records = quantizer.quantize()
    for name, w in original.items():
        r = records[name]
        assert r.outliers == outlier_count(w.numel(), 0.01)
        assert torch.equal(r.sparse != 0, outlier_mask(w, 0.01))
        if method == "autoround":  # AutoRound keeps the original value of an outlier
            assert torch.equal(model.get_submodule(name).weight[r.sparse != 0], w[r.sparse != 0].half().float())


def load_demo(name):
    from conftest import load_script
    return load_script(f"demos/{name}.py")


def test_ptq_compare_bad_fraction_is_one_line(tmp_path):
    ptq_compare = load_demo("ptq_compare")
    out = tmp_path / "nothing"
    error = run_main(ptq_compare.main, f"--out_dir={out}", "--outlier_fractions=0,0.6")
    assert error is not None and "\n" not in error and "outlier_fraction=0.6" in error


def test_qat_training_with_outliers_runs(tmp_path, char_data):
    from conftest import train_in_process
    out = tmp_path / "qat"
    train_in_process(out, "--max_iters=4", "--eval_interval=4", "--quantization_warmup_iters=2",
                     "--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear",
                     "--quantize_linear_bits=2", "--quantize_linear_outlier_fraction=0.005")
    assert os.path.exists(out / "ckpt.pt")
