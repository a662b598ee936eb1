"""AutoRound: its pieces against round-to-nearest, its result against RTN on a trained model, and the demo."""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import load_script, run_script
from quantization.autoround import AutoRound, SignSGD, WrapperLinear, calibration_samples
from quantization.quantizers import compute_qparams, fake_quant, qparams_from_range, quantize_tensor, to_rows
from quantization.rtn import rtn_quantize, weight_spec
from inference import load_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

SPECS = [weight_spec(b, g, s) for b in (2, 3, 4, 8) for g in (0, 16) for s in (False, True)]


def load_demo():
    return load_script("demos/autoround_ptq.py")


def small_model(seed=0):
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=84, bias=True))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_rtn_equals_foundation_quantizers_bit_for_bit(spec):
    model = small_model()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    records = rtn_quantize(model, spec)
    assert set(records) == set(weights) and len(records) == 12
    modules = dict(model.named_modules())
    for name, record in records.items():
        codes, scale, zero_point = quantize_tensor(weights[name], spec)
        assert torch.equal(record.codes, codes) and torch.equal(record.scale, scale)
        assert torch.equal(modules[name].weight, fake_quant(weights[name], spec))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_qparams_from_range_equals_compute_qparams(spec):
    w = torch.randn(24, 32) * torch.rand(24, 1)
    rows = to_rows(w, spec)
    scale, zero_point = qparams_from_range(rows.amin(1, keepdim=True), rows.amax(1, keepdim=True), spec)
    ref_scale, ref_zero_point = compute_qparams(w, spec)
    assert torch.equal(scale, ref_scale) and torch.equal(zero_point, ref_zero_point)


def test_iters_zero_equals_rtn_exactly():
    a, b = small_model(), small_model()
    records = AutoRound(a, torch.randint(0, 84, (4000,)), bits=3, group_size=16, iters=0, nsamples=4,
                        progress=False).quantize()
    reference = rtn_quantize(b, weight_spec(3, 16))
    for name in reference:
        assert torch.equal(records[name].codes, reference[name].codes)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("spec", [weight_spec(3, 16), weight_spec(4, 0, sym=True), weight_spec(2, 32)], ids=str)
def test_wrapper_at_v_zero_and_unit_scales_equals_rtn(spec):
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 7, 64)
    wrapper = WrapperLinear(linear, spec)
    assert wrapper.value.abs().max() == 0 and torch.all(wrapper.min_scale == 1) and torch.all(wrapper.max_scale == 1)
    expected = F.linear(x, fake_quant(linear.weight.detach(), spec), linear.bias)
    assert torch.equal(wrapper(x), expected)
    codes, _, _, weight = wrapper.quantized_weight()
    assert torch.equal(codes, quantize_tensor(linear.weight.detach(), spec)[0])


def test_wrapper_learns_rounding_and_range():
    torch.manual_seed(2)
    wrapper = WrapperLinear(nn.Linear(32, 16), weight_spec(3, 16))
    wrapper(torch.randn(4, 32)).pow(2).sum().backward()
    assert wrapper.value.grad.abs().sum() > 0 and wrapper.min_scale.grad.abs().sum() > 0
    assert wrapper.max_scale.grad.abs().sum() > 0
    with torch.no_grad():
        wrapper.value.fill_(0.9), wrapper.min_scale.fill_(1.5), wrapper.max_scale.fill_(-0.2)
    wrapper.clamp_()
    assert wrapper.value.max() == 0.5 and wrapper.min_scale.max() == 1.0 and wrapper.max_scale.min() == 0.0
    with torch.no_grad():  # V = +0.5 everywhere moves every unclipped code up by at most one
        wrapper.value.fill_(0.49), wrapper.min_scale.fill_(1.0), wrapper.max_scale.fill_(1.0)
    shifted = wrapper.quantized_weight()[0]
    base = quantize_tensor(wrapper.linear.weight.detach(), wrapper.spec)[0]
    assert ((shifted - base) >= 0).all() and ((shifted - base) <= 1).all() and (shifted != base).any()


def test_sign_sgd_steps_by_lr_times_sign():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    q = nn.Parameter(torch.tensor([1.0]))  # no gradient: untouched
    p.grad = torch.tensor([0.3, -1e-6, 0.0, -50.0])
    optimizer = SignSGD([p, q], lr=0.125)
    optimizer.step()
    assert torch.equal(p.detach(), torch.tensor([1.0 - 0.125, -2.0 + 0.125, 3.0, 0.5 + 0.125]))
    assert q.item() == 1.0
    assert isinstance(optimizer, torch.optim.Optimizer)


def test_calibration_samples_are_distinct_windows():
    tokens = torch.arange(1000)
    samples = calibration_samples(tokens, 10, 64, seed=3)
    assert samples.shape == (10, 64)
    starts = samples[:, 0]
    assert len(set(starts.tolist())) == 10 and torch.all(starts % 64 == 0)
    assert torch.equal(samples, starts[:, None] + torch.arange(64))
    with pytest.raises(ValueError, match="nsamples=16"):
        calibration_samples(tokens, 16, 64)


def final_hidden(model, tokens, seqlen=64):
    """The last block's output (before ln_f) on non-overlapping windows."""
    out = []
    handle = model.transformer.h[-1].register_forward_hook(lambda m, i, o: out.append(o))
    x = tokens[:len(tokens) // seqlen * seqlen].reshape(-1, seqlen)
    with torch.no_grad():
        model(x, x)
    handle.remove()
    return out[0]


def val_loss(model, tokens, seqlen=64):
    x = tokens[:(len(tokens) - 1) // seqlen * seqlen]
    y = tokens[1:len(x) + 1]
    with torch.no_grad():
        return model(x.reshape(-1, seqlen), y.reshape(-1, seqlen))[1].item()


def test_autoround_beats_rtn_at_3_bits(ptq_w3):
    fp, val = ptq_w3["fp"], ptq_w3["val"]
    reference = final_hidden(fp, val)
    mse = {m: F.mse_loss(final_hidden(ptq_w3[m], val), reference).item() for m in ("rtn", "autoround")}
    assert mse["autoround"] < mse["rtn"]
    losses = {m: val_loss(ptq_w3[m], val) for m in ("fp", "rtn", "autoround")}
    assert losses["fp"] < losses["rtn"] and losses["autoround"] < losses["rtn"]
    for before, after in ptq_w3["autoround_block_losses"]:
        assert after < before


def test_autoround_weights_are_on_the_grid(ptq_w3):
    modules = dict(ptq_w3["autoround"].named_modules())
    spec = ptq_w3["spec"]
    for name, record in ptq_w3["autoround_records"].items():
        assert torch.equal(modules[name].weight, record.dequantize())
        assert record.codes.min() >= -4 and record.codes.max() <= 3 and torch.equal(record.codes, record.codes.round())
        assert record.scale.shape == (modules[name].weight.shape[0], 1) and spec == record.spec


def test_demo_quantizes_saves_and_samples(trained_fp, tmp_path, capsys):
    demo = load_demo()
    quantized = str(tmp_path / "q")
    demo.main([f"--out_dir={trained_fp}", f"--quantized_dir={quantized}", "--bits=4", "--group_size=32",
               "--iters=4", "--nsamples=8", "--eval_tokens=3000", "--device=cpu", "--progress=False"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("quantized perplexity: ") and "(full precision " in last
    model, _ = load_model(quantized, "cpu")
    assert model.transformer.h[0].attn.q.weight.unique().numel() <= 16 * 2 * 64  # 16 levels per group of 32
    result = run_script("sample.py", f"--out_dir={quantized}", "--num_samples=1", "--max_new_tokens=10",
                        "--device=cpu", env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "---------------" in result.stdout
    # a packed checkpoint is refused as a base: it is already quantized, and nothing is written
    with pytest.raises(SystemExit, match="already quantized"):
        demo.main([f"--out_dir={quantized}", f"--quantized_dir={tmp_path / 'again'}", "--device=cpu"])
    assert not os.path.exists(tmp_path / "again")


@pytest.mark.parametrize("flags,message", [
    (["--iters=-1"], r"autoround_ptq.py: error: --iters=-1: must be 0"),
    (["--nsamples=100000", "--seqlen=64"], r"--nsamples=100000: the calibration data has [\d,]+ tokens"),
    (["--bits=9"], r"--bits=9 is out of range; expected 2\.\.8"),
    (["--bits=1"], r"--bits=1 is out of range"),
    (["--group_size=48"], r"--group_size=48: does not divide the input width 64 of transformer.h.0.attn.q"),
    (["--seqlen=65"], r"--seqlen=65: longer than the model's block_size 64"),
])
def test_bad_input_is_one_clear_error(trained_fp, tmp_path, flags, message):
    demo = load_demo()
    before = os.listdir(trained_fp)
    with pytest.raises(SystemExit, match=message) as e:
        demo.main([f"--out_dir={trained_fp}", f"--quantized_dir={tmp_path / 'q'}", "--device=cpu", *flags])
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "q") and os.listdir(trained_fp) == before


def test_qat_checkpoint_is_already_quantized(tmp_path):
    from checkpoint import save_checkpoint
    from model import GPT, GPTConfig
    args = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=84,
                linear_variants={"q": "quantized_linear"}, weight_quant={"q": {"bits": 4}})
    save_checkpoint(str(tmp_path / "qat" / "ckpt.pt"), {"model": GPT(GPTConfig(**args)).state_dict(),
                                                        "model_args": args, "dataset": "shakespeare_char"})
    with pytest.raises(SystemExit, match="already quantized"):
        load_demo().main([f"--out_dir={tmp_path / 'qat'}", "--device=cpu"])
    assert not os.path.exists(str(tmp_path / "qat") + "-autoround")


def test_calibration_from_a_text_file(trained_fp, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("To be, or not to be, that is the question:\n" * 4)  # 172 characters: 10 windows of 16
    flags = [f"--out_dir={trained_fp}", f"--calib_file={text}", "--seqlen=16", "--bits=4", "--group_size=32",
             "--eval_tokens=500", "--device=cpu", "--progress=False", "--method=gptq"]
    load_demo().main([*flags, f"--quantized_dir={tmp_path / 'q'}", "--nsamples=10"])
    assert "quantized perplexity" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--nsamples=11: the calibration data has 172 tokens, enough for 1..10"):
        load_demo().main([*flags, f"--quantized_dir={tmp_path / 'q2'}", "--nsamples=11"])
    assert not os.path.exists(tmp_path / "q2")
