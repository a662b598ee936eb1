"""quantization/ptq.py: one interface for every post-training method. A method registered in METHODS runs through
the demos' code path with nothing else changed, and the registry's names are the ones the command lines take."""
import dataclasses
import re

import pytest
import torch

from conftest import run_main
from quantization import ptq


def test_a_registered_toy_method_runs_through_the_demo(trained_fp, tmp_path, monkeypatch):
    """A new method is one factory plus one registry line: here a toy that rounds every weight to 2 bits per
    output channel, whatever bits the flags ask, registered as 'toy' and run by demos/autoround_ptq.py."""
    from test_autoround import load_demo
    seen = []

    class Toy(ptq.RTN):
        def __init__(self, model, calibration, config):
            seen.append((calibration.numel() > 0, config.bits))
            super().__init__(model, calibration, dataclasses.replace(config, bits=2, group_size=0))

    monkeypatch.setitem(ptq.METHODS, "toy", Toy)
    assert "toy" in ptq.method_names() and "awq+toy" in ptq.method_names()
    qdir = tmp_path / "toy"
    error = run_main(load_demo().main, f"--out_dir={trained_fp}", "--method=toy", "--bits=4", "--eval_tokens=2000",
                     "--device=cpu", "--progress=False", f"--quantized_dir={qdir}")
    assert error is None, error
    assert seen == [(True, 4)]  # the demo handed the method its calibration tokens and the flags' config
    ckpt = torch.load(qdir / "ckpt.pt", weights_only=True)
    assert ckpt["ptq"]["method"] == "toy"
    packed = next(iter(ckpt["packed_weights"].values()))
    assert packed["spec"]["bits"] == 2 and packed["spec"]["granularity"] == "per_channel"


def test_method_names_and_refusals():
    assert ptq.check_method("awq") == ["awq", "rtn"] and ptq.check_method("awq+gptq") == ["awq", "gptq"]
    for bad in ("fancy", "gptq+awq", "awq+awq", "rtn+gptq"):
        with pytest.raises(ValueError, match=re.escape(f"method={bad}: unknown")):
            ptq.check_method(bad)


def test_rtn_through_the_registry_matches_pytorch_fake_quantize():
    """make_quantizer('rtn') at 3 bits, groups of 16, affine: its scales are float64 min/max math and its weights
    what torch.fake_quantize_per_channel_affine makes of each group (an independent reference)."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50))
    layer = model.transformer.h[0].mlp.mlp_up
    groups = layer.weight.detach().clone().reshape(-1, 16)
    records = ptq.make_quantizer("rtn", model, None, ptq.PTQConfig(bits=3, group_size=16)).quantize()
    lo, hi = groups.double().amin(1).clamp(max=0), groups.double().amax(1).clamp(min=0)
    scale = records["transformer.h.0.mlp.mlp_up"].scale.reshape(-1)
    torch.testing.assert_close(scale.double(), (hi - lo) / 7, rtol=1e-6, atol=0)
    zero_point = torch.clamp(torch.round(-lo / scale.double()), 0, 7).int()
    expected = torch.fake_quantize_per_channel_affine(groups, scale.float(), zero_point, 0, 0, 7)
    torch.testing.assert_close(layer.weight.reshape(-1, 16), expected, rtol=0, atol=1e-6)
    assert set(records) == {f"transformer.h.0.{s}" for s in ("attn.q", "attn.k", "attn.v", "attn.attn_proj",
                                                            "mlp.mlp_up", "mlp.mlp_down")}
