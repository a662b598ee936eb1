"""The bitwise inference module of residual binary weights (quantization/binary_linear.py) and its Triton kernel
(quantization/kernels/binary_bitwise.py), against the dequantize path of quantizers.py; the exported graph is
checked to be k one-bit linears and an add, made of shifts and masks, with no float weight."""
import pytest
import torch

from quantization.binary_linear import BinaryLinear, ResidualBinaryLinear, convert_model, pack_signs, unpack_signs
from quantization.quantizers import QuantSpec, dequantize, quantize_tensor

CASES = [("per_channel", 0, 2), ("per_group", 32, 3), ("per_group", 64, 1), ("per_tensor", 0, 4)]


def layer(out_features, in_features, granularity, group_size, terms, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    spec = QuantSpec("residual_binary_quant", granularity=granularity, group_size=group_size, binary_terms=terms)
    codes, scale, zero_point = quantize_tensor(w, spec)
    b = torch.randn(out_features, generator=g) if bias else None
    return ResidualBinaryLinear.from_quantized(codes, scale, spec, b), dequantize(codes, scale, zero_point, spec), b


def test_pack_signs_round_trip_and_bit_order():
    signs = torch.randn(5, 96) >= 0
    words = pack_signs(signs)
    assert words.dtype == torch.int32 and words.shape == (5, 3)
    assert torch.equal(unpack_signs(words), signs.float() * 2 - 1)
    one = torch.zeros(1, 32, dtype=torch.bool)
    one[0, 31] = True  # the top bit makes the word negative (two's complement)
    assert pack_signs(one).item() == -(1 << 31)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_signs(torch.ones(2, 40))


@pytest.mark.parametrize("granularity,group_size,terms", CASES)
def test_matches_dequantized_matmul(granularity, group_size, terms):
    module, weight, bias = layer(48, 128, granularity, group_size, terms)
    x = torch.randn(3, 7, 128)
    ref = (x.double() @ weight.double().T + bias.double()).float()
    assert len(module.terms) == terms and all(isinstance(t, BinaryLinear) for t in module.terms)
    assert torch.allclose(module(x), ref, atol=1e-4, rtol=1e-5)


def test_term_count_mismatch():
    spec = QuantSpec("residual_binary_quant", binary_terms=3)
    codes, scale, _ = quantize_tensor(torch.randn(8, 32), QuantSpec("residual_binary_quant", binary_terms=2))
    with pytest.raises(ValueError, match="^2 terms stored, but the spec says binary_terms=3$"):
        ResidualBinaryLinear.from_quantized(codes, scale, spec)


def test_exported_graph_is_bitwise_terms_and_an_add():
    """torch.export: k one-bit linears (the modules terms.0 .. terms.k-1) whose outputs one add joins, each
    cutting its packed words with shift and bitwise-and; no float tensor of the weight's size anywhere."""
    out_features, in_features, terms = 48, 128, 2
    module, _, _ = layer(out_features, in_features, "per_channel", 0, terms, bias=False)
    graph = torch.export.export(module, (torch.randn(1, in_features),)).graph
    ops = [(n, str(n.target)) for n in graph.nodes if n.op == "call_function"]

    def owner(node):
        return list(node.meta.get("nn_module_stack", {}).values())[-1][0]

    for t in range(terms):
        mine = {target for n, target in ops if owner(n) == f"terms.{t}"}
        assert any("rshift" in op or "right_shift" in op for op in mine), mine
        assert any("bitwise_and" in op or "__and__" in op for op in mine), mine
        assert "aten.index_select.default" in mine  # the subset sums are looked up by the packed bytes
        assert not any(op in mine for op in ("aten.linear.default", "aten.mm.default", "aten.addmm.default"))
    top = [target for n, target in ops if owner(n) == ""]
    assert top == ["aten.add.Tensor"]
    weight_size = out_features * in_features
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.is_floating_point():
            assert val.numel() < weight_size, (node, val.shape)
    inputs = {n.name: n.meta["val"] for n in graph.nodes if n.op == "placeholder"}
    assert all(v.dtype == torch.int32 for k, v in inputs.items() if k.endswith("words"))


def test_converted_qat_model_has_the_same_logits():
    from configurator import model_quant_config, parse_args
    from model import GPT, GPTConfig
    args = parse_args(["--n_embd=64", "--linear_variant_attn=quantized_linear", "--linear_variant_mlp=quantized_linear",
                       "--quantize_linear_method=residual_binary_quant", "--quantize_linear_granularity_mlp=per_group",
                       "--quantize_linear_group_size_mlp=32", "--quantize_linear_binary_terms_attn=3"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=40, bias=True,
                          **model_quant_config(args))).eval()
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        ref, _ = model(idx, idx)
        replaced = convert_model(model)
        assert len(replaced) == 12 and isinstance(model.transformer.h[0].attn.q, ResidualBinaryLinear)
        assert len(model.transformer.h[0].attn.q.terms) == 3 and len(model.transformer.h[0].mlp.mlp_up.terms) == 2
        logits, _ = model(idx, idx)
    assert torch.allclose(logits, ref, atol=1e-4)


KERNEL_CHECK = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_binary_linear import CASES, layer
from quantization.kernels.binary_bitwise import residual_binary_gemv, stack_terms
errors = []
for granularity, group_size, terms in CASES:
    module, _, _ = layer(24, 256, granularity, group_size, terms, bias=False)
    x = torch.randn(1, 256)
    for block_n, block_w, transpose_x in ((16, 4, True), (8, 2, True), (16, 4, False)):
        y = residual_binary_gemv(x, *stack_terms(module), block_n=block_n, block_w=block_w, transpose_x=transpose_x)
        errors.append((y - module(x)).abs().max().item())
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def interpreted():
    """KERNEL_CHECK and ATTACHED_CHECK started together at first use: each keeps one core of the Triton interpreter
    busy, so that on two cores they take the time of the longer."""
    pytest.importorskip("triton")
    from conftest import Interpreted  # here: the scripts import this module, without tests/ on their path
    jobs = {"kernel": Interpreted(KERNEL_CHECK, timeout=300), "attached": Interpreted(ATTACHED_CHECK, timeout=300)}
    yield jobs
    for job in jobs.values():
        job.stop()


def test_triton_kernel_matches_pytorch_path(interpreted):
    errors = interpreted["kernel"].result()
    assert len(errors) == 3 * len(CASES) and max(errors) < 1e-4, errors


ATTACHED_CHECK = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from tests.test_binary_linear import CASES, layer
from quantization.kernels import binary_bitwise
torch.manual_seed(0)
out = []
for granularity, group_size, terms in CASES:
    module, weight, bias = layer(24, 256, granularity, group_size, terms)
    x = torch.randn(1, 1, 256)
    expected = x.double() @ weight.double().T + bias.double()  # the dequantized weight, float64
    bitwise = module(x)
    attached = binary_bitwise.attach(module)
    kernel = module.gemv(x.reshape(1, -1), module)  # None where the kernel cannot run
    y = module(x)
    out.append([attached, kernel is not None, (y.double() - expected).abs().max().item(),
                (bitwise.double() - expected).abs().max().item(), list(y.shape), "Triton kernels" in repr(module)])
# torch.compile sees one custom op node; more than one row takes the bit operations
graphs = []
def backend(gm, example_inputs):
    graphs.append(str(gm.graph))
    return gm.forward
y = torch.compile(module, backend=backend, fullgraph=True)(x)
# the op's fake (what inductor plans its buffers by) agrees with the real call: shapes, strides, dtype
torch.library.opcheck(binary_bitwise.gemv_op, (binary_bitwise.bit_major(x), module.stacked_words, module.stacked_scales),
                      test_utils=("test_schema", "test_faketensor"))
rows = torch.randn(3, 256)
# more rows: the weight dequantized by the Triton kernel (against quantizers.py's dequantize), then a matmul
dequant_errors = []
for granularity, group_size, terms in CASES:
    m, w, _ = layer(24, 256, granularity, group_size, terms)
    binary_bitwise.attach(m)
    dequant_errors.append((binary_bitwise.dequantize(m.stacked_words, m.stacked_scales, torch.float32).double()
                           - w.double()).abs().max().item())
torch.library.opcheck(binary_bitwise.rows_mm_op, (rows, module.stacked_words, module.stacked_scales),
                      test_utils=("test_schema", "test_faketensor"))
# q, k and v joined (inference.fuse_qkv): one attached layer whose row is the three layers' rows side by side
parts = [layer(24, 256, "per_group", 64, 2, seed=s) for s in range(3)]
for part, _, _ in parts:
    binary_bitwise.attach(part)
from quantization.binary_linear import ResidualBinaryLinear
joined = ResidualBinaryLinear.concatenate([part for part, _, _ in parts])
reference = torch.cat([x.double() @ w.double().T + b.double() for _, w, b in parts], dim=-1)
print(json.dumps([out, "nanoqat.residual_binary_gemv" in graphs[0], module.gemv(rows, module) is not None,
                  (module(rows).double() - (rows.double() @ weight.double().T + bias.double())).abs().max().item(),
                  dequant_errors,
                  joined.gemv is not None, (joined(x).double() - reference).abs().max().item()]))
"""


def test_the_attached_kernel_runs_one_row_of_a_loaded_layer(interpreted):
    """binary_bitwise.attach (what convert_to_packed does for residual-binary records): one row of x goes through
    the Triton GEMV (here under TRITON_INTERPRET=1, on a GPU for real), equal to the float64 product with the
    dequantized weight; torch.compile sees it as one custom op; several rows go through the weight dequantized by
    the Triton kernel (equal to quantizers.py's dequantize) and a matmul."""
    out, compiled_op, rows_kernel, rows_error, dequant_errors, joined_attached, joined_error = \
        interpreted["attached"].result()
    assert len(out) == len(CASES) and compiled_op and rows_kernel and rows_error < 1e-4
    assert len(dequant_errors) == len(CASES) and max(dequant_errors) < 1e-6, dequant_errors
    assert joined_attached and joined_error < 1e-4
    for attached, ran, error, bitwise_error, shape, shown in out:
        assert attached and ran and shown and shape == [1, 1, 24] and error < 1e-4 and bitwise_error < 1e-4, out


def test_concatenate_joins_layers_side_by_side_or_refuses():
    """ResidualBinaryLinear.concatenate (inference.fuse_qkv): the joined layer's output is the layers' outputs side
    by side, against the float64 product with each dequantized weight; layers that differ are not joined."""
    from inference import concatenate_linears
    for granularity, group_size, terms in CASES:
        parts = [layer(24, 128, granularity, group_size, terms, seed=s) for s in range(3)]
        joined = concatenate_linears([part for part, _, _ in parts])
        x = torch.randn(2, 5, 128)
        expected = torch.cat([x.double() @ w.double().T + b.double() for _, w, b in parts], dim=-1)
        assert isinstance(joined, ResidualBinaryLinear) and joined.out_features == 72
        assert (joined(x).double() - expected).abs().max().item() < 1e-4
    a, _, _ = layer(24, 128, "per_channel", 0, 2)
    assert ResidualBinaryLinear.concatenate([a, layer(24, 128, "per_channel", 0, 3)[0]]) is None  # terms
    assert ResidualBinaryLinear.concatenate([a, layer(24, 128, "per_group", 64, 2)[0]]) is None  # groups
    assert ResidualBinaryLinear.concatenate([a, layer(24, 128, "per_channel", 0, 2, bias=False)[0]]) is None


def test_stacked_terms_hold_the_bits_once_through_moves_and_saves():
    """share_stacked (what attaching the kernel does): the terms' words and scales become views into the stacked
    buffers, stay so through .to() and deepcopy, the saved state keeps the terms' keys alone, and the output does not
    change."""
    import copy
    module, weight, bias = layer(24, 256, "per_group", 64, 3)
    x = torch.randn(2, 256)
    before = module(x)
    module.share_stacked(torch.stack([t.words for t in module.terms]), torch.stack([t.scale for t in module.terms]))

    def shared(m):
        base = {m.stacked_words.untyped_storage().data_ptr(), m.stacked_scales.untyped_storage().data_ptr()}
        return all({t.words.untyped_storage().data_ptr(), t.scale.untyped_storage().data_ptr()} == base
                   for t in m.terms)
    assert shared(module) and torch.equal(module(x), before)
    moved = copy.deepcopy(module).to(torch.float64)  # a conversion gives every buffer a new tensor: linked again
    assert shared(moved) and moved.stacked_scales.dtype == torch.float64 and moved.terms[1].scale.dtype == torch.float64
    assert torch.allclose(moved(x.double()), before.double(), atol=1e-4)
    state = module.state_dict()
    assert not any(k.startswith("stacked") for k in state) and "terms.2.words" in state
    fresh, _, _ = layer(24, 256, "per_group", 64, 3, seed=1)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), before)
