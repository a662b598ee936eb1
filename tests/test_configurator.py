"""Flags: generated per site from model.py's tables, specific flags beating kind-level and global ones."""
import pytest
import torch

from configurator import build_parser, model_quant_config, parse_args, ConfigError
from model import ACT_SITES, GPT, GPTConfig, LINEAR_SITES
from quantization.layers import PlainLinear, QuantizedLinear

SITE_MODULE = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "attn_proj": "attn.attn_proj",
               "mlp_up": "mlp.mlp_up", "mlp_down": "mlp.mlp_down"}


def build(argv):
    args = parse_args(["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16"] + argv)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, **model_quant_config(args))
    return GPT(config)


def site_layer(model, site, block=0):
    module = model.transformer.h[block]
    for part in SITE_MODULE[site].split("."):
        module = getattr(module, part)
    return module


def test_every_site_has_every_flag():
    options = {o for a in build_parser()._actions for o in a.option_strings}
    for site in list(LINEAR_SITES) + ["attn", "mlp"]:
        assert f"--linear_variant_{site}" in options
        for fld in ("method", "bits", "granularity", "group_size"):
            assert f"--quantize_linear_{fld}_{site}" in options
    for kind, sites in ACT_SITES.items():
        for site in sites:
            assert f"--quantize_{kind}_act_{site}" in options and f"--quantize_{kind}_act_{site}_bits" in options


def test_help_explains_every_flag():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_default_is_full_precision():
    model = build([])
    for site in LINEAR_SITES:
        assert isinstance(site_layer(model, site), PlainLinear)


def test_kind_flag_sets_its_sites_and_site_flag_wins():
    model = build(["--linear_variant_attn=quantized_linear", "--linear_variant_mlp_down=quantized_linear",
                   "--linear_variant_q=linear", "--quantize_linear_method=affine_quant", "--quantize_linear_bits=6",
                   "--quantize_linear_method_mlp=ternary_quant", "--quantize_linear_bits_k=3",
                   "--quantize_linear_method_v=binary_quant", "--quantize_linear_granularity_attn_proj=per_group",
                   "--quantize_linear_group_size_attn_proj=8"])
    expected_variant = {"q": PlainLinear, "k": QuantizedLinear, "v": QuantizedLinear, "attn_proj": QuantizedLinear,
                        "mlp_up": PlainLinear, "mlp_down": QuantizedLinear}
    for block in range(2):
        for site, cls in expected_variant.items():
            assert isinstance(site_layer(model, site, block), QuantizedLinear) == (cls is QuantizedLinear), site
    specs = {s: site_layer(model, s).spec for s in ("k", "v", "attn_proj", "mlp_down")}
    assert (specs["k"].method, specs["k"].bits) == ("affine_quant", 3)
    assert (specs["v"].method, specs["v"].bits) == ("binary_quant", 6)
    assert (specs["attn_proj"].granularity, specs["attn_proj"].group_size, specs["attn_proj"].bits) == ("per_group", 8, 6)
    assert specs["mlp_down"].method == "ternary_quant"


def test_quantized_site_computes_with_quantized_weight():
    model = build(["--linear_variant_mlp_up=quantized_linear", "--quantize_linear_method=ternary_quant"]).eval()
    layer = site_layer(model, "mlp_up")
    w = layer.weight
    scale = layer.latent_weight.abs().mean(dim=1, keepdim=True)
    assert torch.allclose(w, torch.clamp(torch.round(layer.latent_weight / scale), -1, 1) * scale)
    x = torch.randn(3, 32)
    assert torch.allclose(layer(x), x @ w.T)
    model.set_quantization(False)
    assert torch.equal(layer.weight, layer.latent_weight)


def test_boolean_flags_accept_all_spellings():
    assert parse_args(["--compile"]).compile is True
    assert parse_args(["--compile=False"]).compile is False
    assert parse_args(["--compile=True"]).compile is True
    assert parse_args(["--no-compile"]).compile is False
    assert parse_args([]).compile is False


def test_preset_loads_and_command_line_overrides(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('n_layer = 3\nlinear_variant_mlp = "quantized_linear"\nlearning_rate = 0.01\n')
    args = parse_args([f"--config={preset}", "--n_layer=5"])
    assert (args.n_layer, args.linear_variant_mlp, args.learning_rate) == (5, "quantized_linear", 0.01)


@pytest.mark.parametrize("argv,message", [
    (["--linear_variant_mlp=quantized_linear", "--quantize_linear_bits_mlp_down=9"], "--quantize_linear_bits_mlp_down: bits=9"),
    (["--linear_variant_attn=quantized_linear", "--quantize_linear_bits=1"], "--quantize_linear_bits: bits=1"),
    (["--linear_variant_attn=quantized_linear", "--quantize_linear_granularity=per_group",
      "--quantize_linear_group_size=12"], "--quantize_linear_group_size=12 does not divide"),
    (["--quantize_mlp_act", "--quantize_mlp_act_output_bits=12"], "--quantize_mlp_act_output_bits: bits=12"),
])
def test_bad_quantization_values_name_their_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        model_quant_config(parse_args(["--n_embd=32"] + argv))


def test_every_method_starts_from_the_same_weights_as_full_precision():
    """Comparisons between methods are fair only if one seed gives one initialisation, whatever the variant."""
    from quantization.layers import latent_weight
    torch.manual_seed(0)
    reference = build([])
    for method in ("symmetric_quant", "stochastic_quant", "binary_quant"):
        torch.manual_seed(0)
        model = build(["--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear",
                       f"--quantize_linear_method={method}"])
        for site in LINEAR_SITES:
            assert torch.equal(latent_weight(site_layer(model, site)), latent_weight(site_layer(reference, site)))


def test_quantize_embedding_quantizes_the_tied_embedding_and_head():
    model = build(["--quantize_embedding", "--quantize_linear_method=symmetric_quant", "--quantize_linear_bits=4"]).eval()
    w = model.transformer.wte.weight
    qmax = 7
    scale = w.abs().amax(dim=1, keepdim=True) / qmax
    expected = torch.clamp(torch.round(w * (1 / scale)), -8, 7) * scale
    assert torch.allclose(model.token_embedding_weight(), expected, atol=1e-7)
    idx = torch.randint(50, (1, 8))
    logits, _ = model(idx)
    model.set_quantization(False)
    assert torch.equal(model.token_embedding_weight(), w)
    assert not torch.allclose(logits, model(idx)[0])
    assert build([]).embedding_spec is None  # full precision unless asked


def test_stochastic_grid_flag_reaches_the_quantizer():
    model = build(["--linear_variant_mlp=quantized_linear", "--quantize_linear_method=stochastic_quant",
                   "--stochastic_grid=affine"])
    assert site_layer(model, "mlp_up").spec.grid == "affine"
    assert build(["--linear_variant_mlp=quantized_linear",
                  "--quantize_linear_method=stochastic_quant"]).transformer.h[0].mlp.mlp_up.spec.grid == "symmetric"
