"""Activation sites: each is quantized exactly when its flags say, with its own bits; the fused attention path is
kept while no inner site is on; the quantizers follow the warm-up; stored activations are the last ones seen."""
import pytest
import torch
import torch.nn.functional as F

from configurator import ConfigError, model_quant_config, parse_args
from model import GPT, GPTConfig
from quantization.layers import ActQuant

# the sites, written out here rather than read from model.py, so that a site lost from the table fails a test
ATTN = ["input", "qk_mult_q_input", "qk_mult_k_input", "softmax_input", "pv_mult_p_input", "pv_mult_v_input",
        "pv_mult_output", "output"]
MLP = ["input", "activation_input", "activation_output", "output"]
SMALL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16"]


def build(flags, seed=0):
    args = parse_args(SMALL + flags)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=40, bias=False,
                          **model_quant_config(args)))
    return model.eval()


def batch(seed=1):
    return torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(seed))


def record_sites(model):
    """Run one forward pass; {"attn.<site>" / "mlp.<site>": [(input, output) per layer]} seen by forward hooks."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, ActQuant):
            site = f"{name.split('.')[-3]}.{name.split('.')[-1]}"
            hooks.append(module.register_forward_hook(
                lambda m, i, o, site=site: seen.setdefault(site, []).append((i[0].detach(), o.detach()))))
    with torch.no_grad():
        model(batch())
    for h in hooks:
        h.remove()
    return seen


def symmetric_reference(x, bits):
    """Per-tensor symmetric quantization written out independently of quantization/quantizers.py."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().max() / qmax
    return torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale, scale


def assert_quantized(x, out, bits, where):
    ref, scale = symmetric_reference(x, bits)
    off = (out - ref).abs()
    # x / scale and x * (1 / scale) can round a tie differently: allow one step on a few elements
    assert off.max() <= scale * 1.001, f"{where}: not on the {bits}-bit grid"
    assert (off > scale * 1e-3).float().mean() < 0.01, f"{where}: not quantized with {bits} bits"


CASES = {
    "kind switches and bits, site overrides": (
        ["--quantize_attn_act", "--quantize_attn_act_softmax_input=False", "--quantize_attn_act_bits=6",
         "--quantize_attn_act_qk_mult_q_input_bits=3", "--quantize_mlp_act_activation_input",
         "--quantize_mlp_act_activation_input_bits=2"],
        {**{f"attn.{s}": 6 for s in ATTN if s != "softmax_input"}, "attn.qk_mult_q_input": 3,
         "mlp.activation_input": 2}),
    "single sites only": (
        ["--quantize_attn_act_pv_mult_p_input", "--quantize_attn_act_pv_mult_p_input_bits=5",
         "--quantize_mlp_act_output", "--quantize_mlp_act_bits=4"],
        {"attn.pv_mult_p_input": 5, "mlp.output": 4}),
    "everything, default bits": (
        ["--quantize_attn_act", "--quantize_mlp_act"],
        {**{f"attn.{s}": 8 for s in ATTN}, **{f"mlp.{s}": 8 for s in MLP}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_site_is_quantized_exactly_when_its_flags_say_with_its_own_bits(case):
    flags, expected = CASES[case]
    seen = record_sites(build(flags))
    assert sorted(seen) == sorted([f"attn.{s}" for s in ATTN] + [f"mlp.{s}" for s in MLP])  # an inner site is on
    quantized = set()
    for site, calls in seen.items():
        assert len(calls) == 2, f"{site} ran {len(calls)} times for 2 layers"
        for x, out in calls:
            if site in expected:
                assert_quantized(x, out, expected[site], site)
                quantized.add(site)
            else:
                assert torch.equal(x, out), f"{site} changed its input although its flags leave it off"
    assert quantized == set(expected)


def test_inner_sites_run_only_when_one_of_them_is_on():
    seen = record_sites(build(["--quantize_attn_act_input", "--quantize_attn_act_output"]))
    assert {"attn.input", "attn.output"} <= set(seen) and "attn.softmax_input" not in seen
    seen = record_sites(build(["--quantize_attn_act_softmax_input"]))
    assert {"attn.qk_mult_q_input", "attn.pv_mult_output"} <= set(seen)


def count_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_fused_path_while_inner_sites_are_off_and_explicit_path_matches_it(monkeypatch):
    calls = count_sdpa(monkeypatch)
    fused = build(["--quantize_attn_act_input", "--quantize_attn_act_output", "--quantize_mlp_act"])
    with torch.no_grad():
        logits_fused, loss_fused = fused(batch(), batch(2))
    assert len(calls) == 2  # one per layer
    # the same weights with every inner site on, but its quantizer made the identity: the explicit product
    explicit = build(["--quantize_attn_act", "--quantize_mlp_act"])
    explicit.load_state_dict(fused.state_dict())
    for name, module in explicit.named_modules():
        if isinstance(module, ActQuant) and name.split(".")[-1] in ATTN[1:-1]:
            module.forward = lambda x: x
    calls.clear()
    with torch.no_grad():
        logits_explicit, loss_explicit = explicit(batch(), batch(2))
    assert calls == []
    torch.testing.assert_close(logits_explicit, logits_fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_explicit, loss_fused, rtol=1e-5, atol=1e-5)


def test_an_inner_site_switches_to_the_explicit_product(monkeypatch):
    calls = count_sdpa(monkeypatch)
    model = build(["--quantize_attn_act_pv_mult_v_input"])
    with torch.no_grad():
        model(batch())
    assert calls == []


def test_activation_quantizers_follow_the_warmup(monkeypatch):
    model = build(["--quantize_attn_act", "--quantize_mlp_act", "--quantize_attn_act_bits=4"])
    model.set_quantization(False)
    calls = count_sdpa(monkeypatch)
    seen = record_sites(model)
    assert all(torch.equal(x, out) for pairs in seen.values() for x, out in pairs)
    assert len(calls) == 2  # the fused path again while the inner quantizers are off
    model.set_quantization(True)
    seen = record_sites(model)
    assert all(not torch.equal(x, out) for pairs in seen.values() for x, out in pairs)


def test_per_token_ranges_are_taken_per_token():
    model = build(["--quantize_mlp_act_input", "--activations_quant_granularity=per_token",
                   "--quantize_mlp_act_bits=4"])
    for x, out in record_sites(model)["mlp.input"]:
        for token in range(0, x.shape[1], 5):
            assert_quantized(x[0, token], out[0, token], 4, f"token {token}")


def test_stored_activation_is_the_last_one_seen():
    model = build(["--quantize_attn_act_softmax_input", "--quantize_attn_act_softmax_input_bits=5",
                   "--store_activations"])
    site = model.transformer.h[1].attn.act["softmax_input"]
    other = model.transformer.h[1].attn.act["output"]
    for seed in (1, 2):
        seen = []
        hook = site.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
        with torch.no_grad():
            model(batch(seed))
        hook.remove()
        x, out = seen[0]
        ref, scale = symmetric_reference(x, 5)
        assert site.codes.shape == x.shape and site.codes.abs().max() <= 16
        torch.testing.assert_close((site.codes - site.zero_point) * site.scale, out)
        torch.testing.assert_close(site.scale.squeeze(), scale)
    assert other.codes is None  # a site that is off stores nothing


def test_stored_activations_are_saved_with_the_checkpoint(quant_ckpt):
    from inference import load_checkpoint
    checkpoint = load_checkpoint(quant_ckpt)
    stored = checkpoint["activations"]
    expected = {f"transformer.h.{layer}.{kind}.act.{site}" for layer in (0, 1)
                for kind, sites in (("attn", ATTN), ("mlp", MLP)) for site in sites}
    assert set(stored) == expected
    for name, saved in stored.items():
        bits = 3 if name.endswith("activation_output") else 8 if name.endswith("softmax_input") or ".mlp." in name \
            else 6
        assert saved["codes"].dtype in (torch.int8, torch.uint8), f"{name}: {saved['codes'].dtype} is not one byte"
        assert 0 <= saved["codes"].min() and saved["codes"].max() <= 2 ** bits - 1, name
        assert saved["codes"].max() > 2 ** (bits - 1) - 1, f"{name}: fewer than {bits} bits used"
        assert saved["scale"].shape == (saved["codes"][..., 0].numel(), 1)  # one range per token


@pytest.mark.parametrize("flags, named", [
    (["--quantize_attn_act_no_such_site"], "quantize_attn_act_no_such_site"),
    (["--quantize_mlp_act_softmax_input"], "quantize_mlp_act_softmax_input"),
])
def test_a_site_that_does_not_exist_is_refused(flags, named):
    with pytest.raises(SystemExit) as e:
        parse_args(flags)
    assert named in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.mark.parametrize("flag", ["--quantize_attn_act_bits=9", "--quantize_mlp_act_output_bits=1",
                                  "--quantize_attn_act_softmax_input_bits=16"])
def test_bits_outside_2_to_8_are_refused_naming_the_flag(flag):
    args = parse_args(["--quantize_attn_act", "--quantize_mlp_act", flag])
    with pytest.raises(ConfigError) as e:
        model_quant_config(args)
    assert flag.split("=")[0] in str(e.value) and "2..8" in str(e.value)
