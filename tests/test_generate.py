"""Decoding through the KV cache (generate.py: KVCache, generate) against the uncached forward, and inference.py.

What equals what: for a float model, and for a quantized one whose activation sites are per_token (or per_group)
except softmax_input, the cached path's logits equal the uncached forward's at every step (to float rounding)
and greedy tokens are identical. softmax_input and per_tensor activation ranges span other tokens in the
uncached forward (future scores, the whole sequence); the cached path takes them over what a causal step sees,
so there the facts checked are causality (one-shot prefill == token by token) and the per-token K/V storage."""
import os

import pytest
import torch

from checkpoint import save_checkpoint
from functools import partial

from generate import KVCache, chained_step, generate, setup_cache, step_regions
from inference import freeze_quantized_weights, fuse_gelu, fuse_norms, fuse_qkv, load_model, use_kernels
from model import ACT_SITES, LINEAR_SITES, GPT, GPTConfig
from quantization.quantizers import QuantSpec, fake_quant
from quantization.packing import save_packed
from quantization.rtn import rtn_quantize, weight_spec

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65)
QAT_WEIGHTS = dict(linear_variants={s: "quantized_linear" for s in LINEAR_SITES},
                   weight_quant={s: dict(bits=4) for s in LINEAR_SITES}, embedding_quant=dict(bits=8))


def act_quant(granularity="per_token", method="affine_quant", skip=("softmax_input",), **overrides):
    sites = {f"{kind}_{site}": dict(method=method, bits=6, granularity=granularity)
             for kind in ACT_SITES for site in ACT_SITES[kind] if site not in skip}
    return {**sites, **overrides}


CONFIGS = {
    "float": {},
    "quantized": dict(QAT_WEIGHTS, act_quant=act_quant()),
    "quantized_symmetric_kv_groups": dict(QAT_WEIGHTS, act_quant=act_quant(
        method="symmetric_quant", attn_qk_mult_k_input=dict(bits=4, granularity="per_group", group_size=8))),
}


def build(**config):
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, **config)).eval()


def stepwise_logits(model, tokens, prompt_len):
    """Logits of the cached path: prefill of tokens[:, :prompt_len], then one token at a time."""
    setup_cache(model, tokens.size(0), tokens.size(1), "cpu", torch.float32)
    out = [model(tokens[:, :prompt_len], input_pos=torch.arange(prompt_len))[0]]
    for t in range(prompt_len, tokens.size(1)):
        out.append(model(tokens[:, t:t + 1], input_pos=torch.tensor([t]))[0])
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_equals_uncached(name, batch):
    model = build(**CONFIGS[name])
    prompt = torch.randint(TINY["vocab_size"], (batch, 5))
    uncached = generate(model, prompt, 12, temperature=0, use_cache=False)
    assert torch.equal(generate(model, prompt, 12, temperature=0), uncached)
    cached = stepwise_logits(model, uncached[:, :-1], 5)
    reference = torch.cat([model(uncached[:, :t])[0] for t in range(5, uncached.size(1))], dim=1)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)


def test_kv_stored_as_codes_per_token():
    spec = QuantSpec(method="affine_quant", bits=8, granularity="per_tensor")
    cache = KVCache(2, 3, 10, 8, "cpu", torch.float32, k_spec=spec)
    assert cache.k_codes.dtype == torch.uint8 and cache.k_scale.shape == (2, 3, 10, 1)
    assert cache.v.dtype == torch.float32  # the V site is off: stored as is
    k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    keys, values = cache.update(torch.arange(2, 6), k, v)
    per_token = QuantSpec(method="affine_quant", bits=8, granularity="per_token")
    assert torch.equal(keys[:, :, 2:6], fake_quant(k, per_token))  # the per_tensor range is taken per token
    assert not torch.equal(keys[:, :, 2:6], fake_quant(k, spec))
    assert torch.equal(values[:, :, 2:6], v) and torch.equal(keys[:, :, :2], torch.zeros(2, 3, 2, 8))


def test_cached_path_is_causal_with_every_site_on():
    """softmax_input included: a one-shot prefill equals prefill of 1 token then single steps."""
    model = build(**QAT_WEIGHTS, act_quant=act_quant(skip=()))
    tokens = torch.randint(TINY["vocab_size"], (2, 9))
    steps = stepwise_logits(model, tokens, 1)[:, -1]
    assert model.transformer.h[0].attn.kv_cache.k_codes.dtype == torch.int8  # 6-bit codes 0..63 in one byte
    setup_cache(model, 2, 9, "cpu", torch.float32)
    prefill = model(tokens, input_pos=torch.arange(9))[0][:, -1]
    torch.testing.assert_close(steps, prefill, atol=1e-5, rtol=1e-5)


def test_generation_past_block_size_and_sampling_match_uncached():
    model = build()
    prompt = torch.randint(TINY["vocab_size"], (2, 30))  # 30 + 10 > block_size 32: the last 8 slide
    assert torch.equal(generate(model, prompt, 10, temperature=0), generate(model, prompt, 10, temperature=0,
                                                                                  use_cache=False))
    draws = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        draws.append(generate(model, prompt[:, :4], 10, temperature=1.0, top_k=5, use_cache=use_cache))
    assert torch.equal(*draws)


def test_cache_reused_when_it_fits_and_rebuilt_when_not():
    model = build()
    prompt = torch.randint(TINY["vocab_size"], (2, 4))
    first = generate(model, prompt, 8, temperature=0)
    cache = model.transformer.h[0].attn.kv_cache
    assert torch.equal(generate(model, prompt, 6, temperature=0), first[:, :10])
    assert model.transformer.h[0].attn.kv_cache is cache  # 10 positions fit the 12 allocated
    assert torch.equal(generate(model, prompt[:1], 8, temperature=0), first[:1])
    assert model.transformer.h[0].attn.kv_cache is not cache  # another batch size


def test_the_chained_step_feeds_itself_as_the_graph_replays_do():
    """chained_step, which the CUDA graph of a compiled GPU decode replays: run eagerly here, step after step on
    its own token and position buffers, it writes the tokens of the cached path."""
    model = build(**CONFIGS["quantized"])
    prompt = torch.randint(TINY["vocab_size"], (2, 5))
    expected = generate(model, prompt, 9, temperature=0)
    logits, _ = model(prompt, input_pos=torch.arange(5))
    token, pos = logits[:, -1].argmax(-1, keepdim=True), torch.tensor([5])
    out = torch.zeros(2, model.transformer.h[0].attn.kv_cache.max_len, dtype=torch.long)
    for _ in range(8):
        chained_step(model, token, pos, out, 0, None)
    assert torch.equal(out[:, 6:14], expected[:, 6:]) and pos.item() == 13


def test_a_compiled_decode_compiles_one_block_for_every_layer():
    """The compiled decode's regions (embed, Block.step, finish_step): Block.step compiles twice (the first
    block has no residual left to add) and serves the other layers unchanged; the steps write the eager steps'
    tokens and KV caches."""
    from torch._dynamo.utils import counters
    model = GPT(GPTConfig(**{**TINY, "n_layer": 4})).eval()
    fuse_qkv(model)
    torch._dynamo.reset()
    counters.clear()
    regions = step_regions(model, 2, partial(torch.compile, fullgraph=True, dynamic=False))
    runs = []
    for chosen, temperature, top_k in ((regions, 0, None), (None, 0, None), (regions, 1.0, 1)):
        setup_cache(model, 2, 12, "cpu", torch.float32)
        token, pos, out = torch.tensor([[3], [7]]), torch.tensor([0]), torch.zeros(2, 12, dtype=torch.long)
        with torch.no_grad():
            for _ in range(6):
                chained_step(model, token, pos, out, temperature, top_k, chosen)
        runs.append((out.clone(), [block.attn.kv_cache.stored.clone() for block in model.transformer.h]))
    (compiled, compiled_caches), (eager, eager_caches), (sampled, _) = runs
    assert counters["stats"]["unique_graphs"] == 5  # embed, the first block, every other block, two heads
    assert torch.equal(sampled, eager)  # compiled sampling from the top 1 is greedy
    assert torch.equal(compiled, eager) and compiled[:, 1:7].ne(0).any()
    for a, b in zip(compiled_caches, eager_caches):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the decode's CUDA graphs need a GPU (the compiled regions are checked on the CPU above; "
                           "bench/decode.py --check checks the graphs)")
def test_compiled_decode_step_equals_eager():
    model = build().cuda()
    prompt = torch.randint(TINY["vocab_size"], (2, 4), device="cuda")
    eager = generate(model, prompt, 10, temperature=0)
    for compile in (True, "whole", "reduce-overhead"):  # self-feeding CUDA graphs (one block compiled for all
        # layers, or the whole step); torch.compile's own graphs
        assert torch.equal(generate(model, prompt, 10, temperature=0, compile=compile), eager)
    torch.manual_seed(0)
    sampled = generate(model, prompt, 10, temperature=1.0, top_k=5, compile=True)
    assert sampled.shape == eager.shape and not torch.equal(sampled, generate(model, prompt, 10, temperature=1.0,
                                                                                    top_k=5, compile=True))


def test_freeze_quantized_weights_keeps_outputs():
    model = build(**CONFIGS["quantized"])
    idx = torch.randint(TINY["vocab_size"], (2, 8))
    before = model(idx, idx)[0]
    freeze_quantized_weights(model)
    assert not any(hasattr(m, "parametrizations") for m in model.modules()) and model.embedding_spec is None
    assert torch.equal(model(idx, idx)[0], before)


@pytest.mark.parametrize("name", ["float", "quantized"])
def test_fused_qkv_equals_three_layers(name):
    """inference.fuse_qkv: one layer for q, k and v (a frozen QAT model's too), the same logits and tokens."""
    model = build(**CONFIGS[name])
    freeze_quantized_weights(model)
    idx = torch.randint(TINY["vocab_size"], (2, 8))
    before, tokens = model(idx, idx)[0], generate(model, idx[:, :4], 10, temperature=0)
    assert fuse_qkv(model) == TINY["n_layer"]
    attn = model.transformer.h[0].attn
    assert attn.q is None and attn.qkv.weight.shape == (3 * TINY["n_embd"], TINY["n_embd"])
    assert "transformer.h.0.attn.qkv.weight" in model.state_dict()
    torch.testing.assert_close(model(idx, idx)[0], before, atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(model, idx[:, :4], 10, temperature=0), tokens)


def test_fuse_qkv_leaves_layers_that_cannot_be_joined():
    model = build(**CONFIGS["quantized"])  # QAT layers still fake-quantize their weights: not plain linears
    assert fuse_qkv(model) == 0 and model.transformer.h[0].attn.qkv is None
    try:
        from quantization.kernels import PackedLinear
    except ImportError:
        return
    model = GPT(GPTConfig(**{**TINY, "n_layer": 1})).eval()
    attn = model.transformer.h[0].attn
    spec4, spec2 = QuantSpec("affine_quant", 4, "per_group", 16), QuantSpec("affine_quant", 2, "per_group", 16)
    attn.q, attn.k, attn.v = (PackedLinear.from_float(layer.weight, spec, layer.bias)
                              for layer, spec in ((attn.q, spec4), (attn.k, spec4), (attn.v, spec2)))
    assert not fuse_qkv(model) and attn.qkv is None and attn.q is not None  # a 2-bit v: three kernels stay
    attn.v = PackedLinear.from_float(torch.randn(TINY["n_embd"], TINY["n_embd"]), spec4, attn.q.bias)
    x = torch.randn(3, TINY["n_embd"])
    separate = torch.cat([attn.q(x), attn.k(x), attn.v(x)], dim=-1)
    weights = torch.cat([layer.dequantized_weight() for layer in (attn.q, attn.k, attn.v)])
    assert fuse_qkv(model) and attn.qkv.bits == 4
    assert torch.equal(attn.qkv.dequantized_weight(), weights)
    torch.testing.assert_close(attn.qkv(x), separate, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fuse_gelu_hands_the_gelu_to_packed_up_projections(approximate):
    """inference.fuse_gelu: packed up projections apply the GELU (on the CPU, after the dequantize path); the same
    logits and greedy tokens, the same state dict; an MLP with a quantizer at the GELU, or a float up projection,
    keeps its GELU."""
    pytest.importorskip("triton")
    from quantization.kernels import pack_model
    assert fuse_gelu(build()) == 0  # float layers take no activation
    model = pack_model(build(gelu_approximate=approximate), QuantSpec("affine_quant", 4, "per_group", 16))
    idx = torch.randint(TINY["vocab_size"], (2, 8))
    before, tokens, state = model(idx, idx)[0], generate(model, idx[:, :4], 10, temperature=0), model.state_dict()
    assert fuse_gelu(model) == TINY["n_layer"] and fuse_gelu(model) == 0  # once
    mlp = model.transformer.h[0].mlp
    assert mlp.mlp_up.gelu == approximate and mlp.mlp_down.gelu is None
    torch.testing.assert_close(model(idx, idx)[0], before, atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(model, idx[:, :4], 10, temperature=0), tokens)
    assert model.state_dict().keys() == state.keys()
    for block in model.transformer.h:  # an up projection that no longer applies it (replaced, say): the MLP does
        block.mlp.mlp_up.gelu = None
    torch.testing.assert_close(model(idx, idx)[0], before, atol=1e-5, rtol=1e-5)
    sites = act_quant(skip=("softmax_input", "activation_output"))
    quantized = pack_model(build(act_quant={"mlp_activation_input": sites["mlp_activation_input"]}),
                           QuantSpec("affine_quant", 4, "per_group", 16))
    assert fuse_gelu(quantized) == 0 and quantized.transformer.h[0].mlp.mlp_up.gelu is None


FUSED_NORMS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from generate import chained_step, norms_fused, setup_cache
from inference import fuse_gelu, fuse_norms, fuse_qkv
from model import GPT, GPTConfig
from quantization.kernels import ops, pack_model
from quantization.quantizers import QuantSpec
# decode steps: the first (position 0, an empty cache) and one that attends over an earlier position; a step after
# those runs the same kernels on the same shapes (each step costs about 0.6 s of interpreted kernels per model)
STEPS = 2
results = {}
stream_gemv = ops.stream_gemv
for norm_kind, dtype in [(k, d) for k in sys.argv[2:] for d in (torch.float32, torch.bfloat16)]:
    # each normalization on a model of its own, in this one interpreter; in bfloat16 the fused step's u between the
    # kernels is bfloat16 too (ops.norm_input_dtype). 32 wide (one block of 32 codes per row of q/k/v and up, one
    # column tile each): about 30% less interpreter time than 64; seed 3: greedy tokens that are not all the prompt's
    torch.manual_seed(3)
    config = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, norm=norm_kind)
    model = pack_model(GPT(GPTConfig(**config)).eval(), QuantSpec("affine_quant", 4, "per_group", 32))
    for block in model.transformer.h:  # gains and biases away from 1 and 0
        for norm in (block.ln_1, block.ln_2):
            torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
            if getattr(norm, "bias", None) is not None:
                torch.nn.init.normal_(norm.bias, std=0.5)
    model.to(dtype)
    fuse_qkv(model)
    fuse_gelu(model)
    calls = []
    ops.stream_gemv = lambda *a, **kw: calls.append(("norm" in kw, "residual" in kw)) or stream_gemv(*a, **kw)
    runs = []
    for fused in (False, True):
        if fused:
            assert fuse_norms(model) == 0  # narrower than NORMS_MIN_WIDTH: where it did not help
            assert fuse_norms(model, min_width=32) == 2 and norms_fused(model, 1) and not norms_fused(model, 2)
        setup_cache(model, 1, 16, "cpu", dtype)
        token, pos, out = torch.tensor([[5]]), torch.tensor([0]), torch.zeros(1, 16, dtype=torch.long)
        with torch.no_grad():
            for _ in range(STEPS):
                chained_step(model, token, pos, out, 0, None)
        runs.append((out[0, 1:STEPS + 1].tolist(), [b.attn.kv_cache.stored.clone() for b in model.transformer.h]))
    (plain, plain_cache), (fused, fused_cache) = runs
    err = max(((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
              for a, b in zip(plain_cache, fused_cache))
    # per step of the fused run: per block one normalized (q/k/v, up) pair and one residual (output, down) pair
    results[f"{norm_kind} {str(dtype)[6:]}"] = [plain, fused, err, calls.count((True, False)),
                                                calls.count((False, True))]
print(json.dumps(results))
"""


FUSED_NORM_KINDS = ["layernorm", "rmsnorm"]


@pytest.fixture(scope="module")
def interpreted():
    """This module's two Triton-interpreter scripts, started together at first use: each keeps one core busy
    (FUSED_NORMS, about 20 s, for every normalization and dtype in one interpreter, whose start costs about 2 s;
    DECODE_ATTENTION, about 15 s), so that on two cores they take the time of the longer."""
    pytest.importorskip("triton")
    from conftest import Interpreted
    jobs = {"fused_norms": Interpreted(FUSED_NORMS, *FUSED_NORM_KINDS), "decode_attention": Interpreted(DECODE_ATTENTION)}
    yield jobs
    for job in jobs.values():
        job.stop()


@pytest.fixture(scope="module")
def fused_norm_runs(interpreted):
    """{normalization: FUSED_NORMS's results for it}."""
    return interpreted["fused_norms"].result()


@pytest.mark.parametrize("norm", FUSED_NORM_KINDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_norms_decode_the_same_tokens_through_the_kernels(norm, dtype, fused_norm_runs):
    """inference.fuse_norms under the Triton interpreter: the decode step with each block's normalizations and
    residual adds in its packed kernels (generate.fused_block_step) writes the plain step's greedy tokens, and its
    K/V caches (every layer's normalized input through q/k/v) agree to float32 rounding, or in a bfloat16 model (u
    between the kernels in bfloat16 too) to a few bfloat16 roundings (2**-8 each)."""
    plain, fused, err, normed, residual = fused_norm_runs[f"{norm} {dtype}"]
    assert len(plain) == 2 and fused == plain and err < (1e-5 if dtype == "float32" else 2e-2), (plain, fused, err)
    assert normed == residual == 2 * 2 * 2


DECODE_ATTENTION = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from generate import generate, reset_compiled, setup_cache
from model import GPT, GPTConfig
from quantization.kernels import attention
torch.manual_seed(0)
worst = {}
counters_left, untouched = 0, True
for per_sm in (2, 16):  # the interpreter counts one multiprocessor: 2 -> one chunk, 16 -> several
    attention.PROGRAMS_PER_SM = per_sm
    for dtype in (torch.float32, torch.bfloat16):
        B, H, L, hd = 2, 3, 45, 24  # head_dim not a power of two
        for pos in (0, 15, 16, 30, L - 1):
            stored = torch.randn(2, B, H, L, hd).to(dtype)
            qkv = torch.randn(B, 1, 3 * H * hd).to(dtype)
            q, k, v = (t.view(B, 1, H, hd).transpose(1, 2) for t in qkv.split(H * hd, -1))
            # the reference: the cache written at pos, softmax attention over 0..pos in float64
            want = stored.clone()
            want[0, :, :, pos], want[1, :, :, pos] = k[:, :, 0], v[:, :, 0]
            K, V = want[:, :, :, :pos + 1].double()
            ref = torch.softmax(q.double() @ K.transpose(-1, -2) / hd ** 0.5, -1) @ V
            counters = torch.zeros(B * H, dtype=torch.int32)
            y = attention.decode_attention(q, k, v, stored, torch.tensor([pos]), counters)
            assert y.shape == (B, H, 1, hd) and y.transpose(1, 2).is_contiguous() and y.dtype == dtype
            # float32: to rounding; bf16: the output's own rounding, one unit in the last place
            ulp = 2.0 ** -23 if dtype == torch.float32 else 2.0 ** -7
            err = ((y.double() - ref).abs() / (ref.abs().clamp(min=1) * ulp)).max().item()
            key = f"{dtype}, {attention.chunking(B, H, L, q.device)[1]} chunks"
            worst[key] = max(worst.get(key, 0), err)
            counters_left += counters.abs().sum().item()
            untouched &= torch.equal(stored, want)  # only position pos was written
attention.PROGRAMS_PER_SM = 16
B, H, L, hd = 1, 2, 40, 32
stored = torch.randn(2, B, H, L, hd)
q, k, v = (t.view(B, 1, H, hd).transpose(1, 2) for t in torch.randn(B, 1, 3 * H * hd).split(H * hd, -1))
torch.library.opcheck(attention.decode_attention_op, (q, k, v, stored, torch.tensor([17]),
                                                      torch.zeros(B * H, dtype=torch.int32)))
# a model decodes the same tokens through the kernel (eager and compiled) as through SDPA
model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=65)).eval()
idx = torch.randint(0, 65, (2, 5))
runs = {}
for name, enabled, compile in (("sdpa", False, False), ("kernel", True, False), ("compiled", True, True)):
    attention.ENABLED = enabled
    setup_cache(model, 2, 32, "cpu", torch.float32)
    reset_compiled(model)
    runs[name] = (generate(model, idx, 14, temperature=0, compile=compile)[:, 5:].tolist(),
                  model.transformer.h[0].attn.kv_cache.kernel)
print(json.dumps([worst, counters_left, untouched, runs]))
"""


def test_the_decode_attention_kernel_writes_the_cache_and_attends_over_the_valid_positions(interpreted):
    """quantization/kernels/attention.py under the Triton interpreter: against float64 attention over positions
    0..pos of the cache with the new k and v written at pos (float32 to a few units of rounding, bf16 to one unit
    of its output's), in one chunk and in several (the last program combines them and sets its counter back to
    zero), the cache untouched elsewhere; torch.library.opcheck on the custom op (it declares the cache written);
    and a model's greedy tokens through it, eager and compiled, equal those through SDPA."""
    worst, counters_left, untouched, runs = interpreted["decode_attention"].result()
    assert len(worst) == 4 and any("1 chunks" in k for k in worst) and any("3 chunks" in k for k in worst), worst
    assert all(err < (16 if "float32" in key else 1) for key, err in worst.items()), worst
    assert counters_left == 0 and untouched
    assert runs["sdpa"][1] is False and runs["kernel"][1] is True and runs["compiled"][1] is True
    assert runs["kernel"][0] == runs["sdpa"][0] == runs["compiled"][0], runs


def test_the_decode_attention_kernel_compiles_for_hopper_with_its_first_tile_loaded_before_the_wait():
    """The kernel compiled for sm_90 without a GPU (what the interpreter does not check: types, a value's type
    changing in a loop), one chunk and several, head_dim 64 and 128; with PDL its first tile of cached keys and
    values is loaded before griddepcontrol.wait (the earlier steps wrote them), q, k and v after."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from quantization.kernels import attention
    signature = dict(zip(["q_ptr", "k_ptr", "v_ptr", "c_ptr", "pos_ptr", "y_ptr", "ws_ptr", "ml_ptr", "count_ptr"],
                         ["*bf16"] * 4 + ["*i64", "*bf16", "*fp32", "*fp32", "*i32"]))
    signature.update({name: "i32" for name in ["n_head", "chunk", "stride_qb", "stride_qh", "stride_kb", "stride_kh",
                                               "stride_vb", "stride_vh", "stride_cs", "stride_cb", "stride_ch",
                                               "stride_ct", "stride_yb", "stride_yh"]}, sm_scale="fp32")
    for split in (False, True):
        for head_dim in (64, 128):
            constants = dict(HEAD_DIM=head_dim, HD_P=head_dim, BLOCK_T=attention.BLOCK_T, CHUNKS_P=32, SPLIT=split,
                             PDL=True)
            source = ASTSource(fn=attention._decode_attention_kernel, constexprs=constants,
                               signature={**signature, **{name: "constexpr" for name in constants}})
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
            before, after = ptx.split("griddepcontrol.wait", 1)
            # pos and the tile: (16 x head_dim) keys and values in bf16, at most 16 bytes a load per thread
            assert before.count("ld.global") >= 1 + 2 * attention.BLOCK_T * head_dim * 2 // (16 * 128)
            assert after.count("ld.global") > 0  # q, k and v


def test_the_decode_attention_kernel_runs_where_its_programs_read_little(monkeypatch):
    """attention.worth_it on an H200's 132 multiprocessors, 272 cached positions, bf16: the H200 runs' shapes where the
    kernel won (each program reads 4-24 KiB of keys and values) keep it; the 6.7B shape at batch 16 (48 KiB), where
    SDPA was faster, does not."""
    from quantization.kernels import attention, ops
    monkeypatch.setattr(ops, "multiprocessors", lambda device: 132)
    shapes = {(1, 12, 64): True, (16, 12, 64): True, (1, 25, 64): True, (16, 25, 64): True, (1, 32, 128): True,
              (16, 32, 128): False}  # (batch, heads, head_dim): GPT-2 124M, XL, the 6.7B shape
    for (batch, heads, head_dim), expected in shapes.items():
        assert attention.worth_it(batch, heads, 272, head_dim, torch.bfloat16, "cpu") is expected


def test_greedy_takes_the_first_largest_logit_as_argmax():
    """generate.greedy (two stages over a large vocabulary) against argmax, ties included, eager and compiled."""
    from generate import greedy
    torch.manual_seed(0)
    for vocab in (50257, 50304, 100):
        logits = (torch.randn(4, vocab) * 4).round()  # many equal values
        logits[1] = 3.0
        logits[2] = -float("inf")
        logits[3, [vocab // 3, vocab // 2]] = 100.0  # two maxima in different chunks
        for fn in (greedy, torch.compile(greedy)):
            assert torch.equal(fn(logits), logits.argmax(-1, keepdim=True)), vocab


def test_the_decode_attention_kernel_stays_off_on_the_cpu(capsys):
    """On the CPU (no interpreter) the cache keeps the PyTorch write and SDPA: attend declines, silently; a GPU
    cache the kernel cannot take says why in one line, once."""
    from quantization.kernels import attention
    cache = KVCache(1, 2, 8, 16, "cpu", torch.float32)
    assert attention.refusal("cpu", torch.float32, 16) == "" and not cache.kernel
    assert cache.attend(*torch.zeros(3, 1, 2, 1, 16), torch.tensor([0])) is None
    if attention.triton is not None:
        assert attention.refusal("cuda", torch.float32, 512) == "head_dim 512 is over 256"
        attention.say_once("head_dim 512 is over 256")
        attention.say_once("head_dim 512 is over 256")
        err = capsys.readouterr().err
        assert err.count("decode attention: head_dim 512 is over 256; using a cache write and F.scaled_dot") == 1


def test_fuse_norms_takes_every_block_or_none_and_keeps_the_tokens_on_the_cpu():
    """On the CPU (the dequantize path: norm_forward normalizes, residual_forward adds) the fused step writes the
    plain step's tokens at batch 1; batch 2 keeps Block.step; float layers, an activation quantizer at a block's
    input, or a model in training fuse nothing (nor, by default, a model narrower than NORMS_MIN_WIDTH); the state
    dict does not change."""
    pytest.importorskip("triton")
    from quantization.kernels import pack_model
    from generate import norms_fused
    spec = QuantSpec("affine_quant", 4, "per_group", 16)
    assert fuse_norms(build(), min_width=0) == 0
    sites = act_quant()
    quantized = pack_model(build(act_quant={"attn_input": sites["attn_input"]}), spec)
    fuse_qkv(quantized)
    assert fuse_norms(quantized, min_width=0) == 0
    model = pack_model(build(), spec)
    assert fuse_norms(model, min_width=0) == 0  # q, k and v not joined yet
    fuse_qkv(model)
    fuse_gelu(model)
    assert fuse_norms(model.train(), min_width=0) == 0
    model.eval()
    state = model.state_dict().keys()
    runs = []
    for fused in (False, True):
        if fused:
            assert fuse_norms(model, min_width=0) == TINY["n_layer"] and norms_fused(model, 1)
            assert not norms_fused(model, 2)
        for batch in (1, 2):
            setup_cache(model, batch, 12, "cpu", torch.float32)
            token, pos = torch.tensor([[3], [7]])[:batch], torch.tensor([0])
            out = torch.zeros(batch, 12, dtype=torch.long)
            with torch.no_grad():
                for _ in range(6):
                    chained_step(model, token, pos, out, 0, None)
            runs.append(out.clone())
    assert torch.equal(runs[0], runs[2]) and torch.equal(runs[1], runs[3]) and runs[0][:, 1:7].ne(0).any()
    assert model.state_dict().keys() == state


def test_the_compiled_decode_asks_inductor_for_dependent_launch_on_cuda_only(monkeypatch):
    """generate.dependent_launch: inductor's triton.enable_pdl inside the compiled decode on CUDA (inductor itself
    leaves it out on GPUs without it), nothing on the CPU, and TORCHINDUCTOR_ENABLE_PDL, when set, decides."""
    from torch._inductor import config
    from generate import dependent_launch
    if not hasattr(config.triton, "enable_pdl"):
        pytest.skip("this torch has no inductor PDL")
    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    before = config.triton.enable_pdl
    with dependent_launch("cuda"):
        assert config.triton.enable_pdl is True
    assert config.triton.enable_pdl == before
    with dependent_launch("cpu"):
        assert config.triton.enable_pdl == before
    monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "0")
    with dependent_launch("cuda"):
        assert config.triton.enable_pdl == before


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, char_data):
    """A float and a packed (RTN W4) checkpoint of a random tiny model: {kind: folder}."""
    root = tmp_path_factory.mktemp("decode_ckpts")
    model = build()
    base = {"model_args": dict(TINY), "dataset": "shakespeare_char"}
    save_checkpoint(str(root / "float" / "ckpt.pt"), {**base, "model": model.state_dict()})
    records = rtn_quantize(model, weight_spec(4, 16))
    save_packed(str(root / "packed" / "ckpt.pt"), base, model, records, {"method": "rtn", "bits": 4})
    return {"float": str(root / "float"), "packed": str(root / "packed")}


def test_use_kernels_choice():
    assert use_kernels("auto", "cuda", True) and not use_kernels("auto", "cpu", True)
    assert use_kernels("on", "cpu", True) and not use_kernels("off", "cuda", True)
    assert not use_kernels("auto", "cuda", False)
    with pytest.raises(ValueError, match="kernels=on needs a packed"):
        use_kernels("on", "cuda", False)
    with pytest.raises(ValueError, match="kernels 'yes' is unknown"):
        use_kernels("yes", "cpu", True)


def test_load_packed_with_kernels_equals_dequantized(checkpoints):
    dequantized, _ = load_model(checkpoints["packed"], "cpu")
    try:
        import quantization.kernels  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="kernels=on: the packed kernels cannot be loaded"):
            load_model(checkpoints["packed"], "cpu", kernels="on")
        return
    packed, _ = load_model(checkpoints["packed"], "cpu", kernels="on")
    assert not any(type(m).__name__ == "PlainLinear" for m in packed.modules())
    idx = torch.randint(TINY["vocab_size"], (2, 8))
    torch.testing.assert_close(packed(idx, idx)[0], dequantized(idx, idx)[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(generate(packed, idx, 6, temperature=0), generate(dequantized, idx, 6, temperature=0))


def test_sample_cached_equals_uncached(checkpoints, capsys):
    import sample
    from conftest import run_main
    outputs = []
    for flag in ("--cache", "--no-cache"):
        assert run_main(sample.main, f"--out_dir={checkpoints['float']}", "--start=ROMEO.", "--num_samples=1",
                        "--max_new_tokens=20", "--device=cpu", "--kernels=off", flag) is None
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("ROMEO.")
    error = run_main(sample.main, f"--out_dir={checkpoints['float']}", "--kernels=on", "--device=cpu")
    assert error is not None and "kernels=on needs a packed" in error


def test_decode_benchmark_smoke_run_on_the_cpu(tmp_path, capsys):
    """bench/decode.py's table on a tiny shape (the GPU run reports speeds): every format, q/k/v fused and
    separate, the GELU and the norms fused and apart (packed formats only), and its one-line error for a bad list."""
    from bench import decode
    from conftest import run_main
    out = tmp_path / "decode.md"
    assert run_main(decode.main, "--shapes=tiny", "--device=cpu", "--modes=eager", "--new_tokens=3", "--vocab_size=256",
                    "--block_size=64", "--profile=3",
                    "--batches=1,2", "--formats=bf16,W4,W1", "--qkv=fused,separate", "--gelu=fused,separate",
                    f"--out={out}") is None
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| tiny")]
    packed = [f"{w}{q}{g}" for w in ("W4", "W1") for q in ("", ", q/k/v apart") for g in ("", ", GELU apart")]
    assert [(r[1].strip(), r[3].strip()) for r in rows] == [
        (label, batch) for label in ["bf16", "bf16, q/k/v apart"] + packed for batch in ("1", "2")]
    assert all(float(r[4].replace(",", "")) > 0 for r in rows) and rows[0][5].strip() == "1.00"
    assert "incomplete" not in out.read_text()
    assert capsys.readouterr().out.count("profile (eager, batch ") == len(rows)
    error = run_main(decode.main, "--shapes=tiny", "--device=cpu", "--qkv=fused,joined")
    assert error is not None and "--qkv=fused,joined: expected a comma-separated subset of fused, separate" in error
    error = run_main(decode.main, "--shapes=tiny", "--device=cpu", "--gelu=erf")
    assert error is not None and "--gelu=erf: expected a comma-separated subset of fused, separate" in error
    # the norms in the packed kernels or apart (packed formats only; bf16 runs once)
    assert run_main(decode.main, "--shapes=tiny", "--device=cpu", "--modes=eager", "--new_tokens=3",
                    "--vocab_size=256", "--block_size=64", "--batches=1", "--formats=bf16,W4",
                    "--norms=fused,separate", f"--out={out}") is None
    labels = [line.split("|")[2].strip() for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert labels == ["bf16", "W4", "W4, norms apart"]
    error = run_main(decode.main, "--shapes=tiny", "--device=cpu", "--norms=both")
    assert error is not None and "--norms=both: expected a comma-separated subset of fused, separate" in error
    # the attention kernel or SDPA (every format; each row's ratio against bf16 with the same attention)
    from quantization.kernels import attention
    assert run_main(decode.main, "--shapes=tiny", "--device=cpu", "--modes=eager", "--new_tokens=3",
                    "--vocab_size=256", "--block_size=64", "--batches=1", "--formats=bf16,W4",
                    "--attention=kernel,sdpa", f"--out={out}") is None
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert [r[1].strip() for r in rows] == ["bf16", "W4", "bf16, attention sdpa", "W4, attention sdpa"]
    assert rows[2][5].strip() == "1.00" and attention.ENABLED
    error = run_main(decode.main, "--shapes=tiny", "--device=cpu", "--attention=flash")
    assert error is not None and "--attention=flash: expected a comma-separated subset of kernel, sdpa" in error


def test_the_gpu_script_names_a_bad_part_or_a_missing_gpu_in_one_line(tmp_path):
    import subprocess
    from conftest import ROOT
    script = os.path.join(ROOT, "bench", "inference_gpu.sh")
    env = dict(os.environ, RESULTS=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    bad = subprocess.run(["bash", script, "check bogus"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip() == ("inference_gpu.sh: error: part 'bogus' is unknown; expected "
                                                          "one of: check kernels kernels_goal modes_124m "
                                                          "decode_124m decode_6.7b decode_xl profile_124m repeats_124m "
                                                          "check_parallel prefill_profile peer prefill peer_large "
                                                          "binary_decode choices_124m ncu_small launch "
                                                          "launch_large step_budget step_budget_decode "
                                                          "fused_tuning_decode read_ceiling prefill_gluon prefill_gluon_all "
                                                          "prefill_ncu prefill_timeline prefill_ncu_peer prefill_regs "
                                                          "prefill_pairs prefill_pairs_table prefill_after")
    no_gpu = subprocess.run(["bash", script, "check"], capture_output=True, text=True, env=env, timeout=120)
    assert no_gpu.returncode == 2 and "needs a CUDA GPU" in no_gpu.stderr and len(no_gpu.stderr.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # no log left behind
