"""Decoding a GPT (model.py) token by token, in the manner of gpt-fast's generate.py: the KV caches, prefill, the
one-token decode step, sampling, and the compiled decode that a GPU replays as one CUDA graph per token.

    from generate import generate
    tokens = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200, compile=True)

The model only knows `forward(idx, input_pos=...)`: with input_pos its attention layers write and read the
`kv_cache` this module gives them (setup_cache).
"""
import os
from contextlib import nullcontext
from dataclasses import replace
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F

from model import Block
from quantization.kernels import attention, ops
from quantization.quantizers import code_range, compute_qparams, dequantize, quantize, smallest_int_dtype


class KVCache(nn.Module):
    """The keys and values of one attention layer for decoding, preallocated as (batch, n_head, max_len, head_dim)
    and written in place at the new tokens' positions, so that a decode step has static shapes (CUDA graphs).

    When the layer's qk_mult_k_input / pv_mult_v_input site is on, that tensor is stored quantized: integer codes
    plus a scale and zero point per token and head (per group of head_dim for a per_group spec), computed once as
    the token enters the cache and turned back into values by quantizers.dequantize. For per_token and per_group
    specs this is exactly what the uncached forward computes; a per_tensor or per_channel spec, whose range would
    span tokens not yet generated, is applied per token here (same method and bits)."""

    def __init__(self, batch, n_head, max_len, head_dim, device, dtype, k_spec=None, v_spec=None):
        super().__init__()
        self.dtype = dtype
        self.specs = {}
        shape = (batch, n_head, max_len, head_dim)
        for name, spec in (("k", k_spec), ("v", v_spec)):
            if spec is None:
                continue
            if spec.granularity in ("per_tensor", "per_channel"):
                spec = replace(spec, granularity="per_token")
            self.specs[name] = spec
            rows = head_dim // spec.group_size if spec.granularity == "per_group" else 1
            scales = spec.binary_terms if spec.grid == "residual_binary" else 1  # one scale per term
            self.register_buffer(f"{name}_codes", torch.zeros(shape, device=device,
                                                              dtype=smallest_int_dtype(*code_range(spec))),
                                 persistent=False)
            self.register_buffer(f"{name}_scale", torch.zeros((*shape[:3], rows * scales), device=device),
                                 persistent=False)
            self.register_buffer(f"{name}_zero_point", torch.zeros((*shape[:3], rows), device=device),
                                 persistent=False)
        # the tensors stored as they are (K, V or both) share one buffer: one write per step for both
        self.plain = [name for name in ("k", "v") if name not in self.specs]
        if self.plain:
            self.register_buffer("stored", torch.zeros((len(self.plain), *shape), device=device, dtype=dtype),
                                 persistent=False)
        # a plain cache on a GPU: a one-token step writes and attends in one kernel (attend), where that was
        # measured faster (attention.worth_it)
        refusal = attention.refusal(device, dtype, head_dim) if self.plain == ["k", "v"] else ""
        attention.say_once(refusal)
        self.kernel = refusal is None and attention.worth_it(batch, n_head, max_len, head_dim, dtype, device)
        if self.kernel:  # the kernel's arrival counters, zero between calls
            self.register_buffer("counters", torch.zeros(batch * n_head, device=device, dtype=torch.int32),
                                 persistent=False)

    @property
    def k(self):
        return self.stored[self.plain.index("k")]

    @property
    def v(self):
        return self.stored[self.plain.index("v")]

    def k_or_codes(self):
        return self.k_codes if "k" in self.specs else self.k

    @property
    def max_len(self):
        return self.k_or_codes().size(2)

    def attend(self, q, k, v, input_pos):
        """The attention of one new token (q, k, v: (batch, n_head, 1, head_dim)) over the cache, k and v written
        at input_pos, in one kernel over the valid positions only (quantization/kernels/attention.py); None where
        that kernel does not run (the caller then updates and attends in PyTorch)."""
        if not self.kernel or q.dtype != self.dtype:
            return None
        return attention.decode_attention(q, k, v, self.stored, input_pos, self.counters)

    def update(self, input_pos, k, v):
        """Write k and v (batch, n_head, T, head_dim) at positions input_pos (T,); return the whole cache's keys
        and values (dequantized where stored quantized)."""
        new = {"k": k, "v": v}
        if self.plain:
            self.stored.index_copy_(3, input_pos, torch.stack([new[name] for name in self.plain]).to(self.dtype))
        out = []
        for name, x in new.items():
            spec = self.specs.get(name)
            if spec is None:
                out.append(self.stored[self.plain.index(name)])
                continue
            scale, zero_point = compute_qparams(x, spec)
            codes = quantize(x, scale, zero_point, spec)
            stored = [getattr(self, f"{name}_{part}") for part in ("codes", "scale", "zero_point")]
            for buf, value in zip(stored, (codes, scale, zero_point)):
                buf.index_copy_(2, input_pos, value.reshape(*x.shape[:3], -1).to(buf.dtype))
            codes, scale, zero_point = stored
            scale = scale.reshape(zero_point.numel(), -1)  # (rows, 1), or (rows, terms) for residual binary
            out.append(dequantize(codes, scale, zero_point.reshape(-1, 1), spec).to(x.dtype))
        return out


def setup_cache(model, batch, max_len, device, dtype):
    """Allocate every layer's KVCache for `batch` sequences of up to max_len (<= block_size) positions. K and V
    are stored quantized where their activation site is on now (call after set_quantization)."""
    config = model.config
    if max_len > config.block_size:
        raise ValueError(f"max_len {max_len} is longer than block_size {config.block_size}")
    for block in model.transformer.h:
        attn = block.attn
        k_site, v_site = attn.act["qk_mult_k_input"], attn.act["pv_mult_v_input"]
        attn.kv_cache = KVCache(batch, attn.n_head, max_len, config.n_embd // attn.n_head, device, dtype,
                                k_site.spec if k_site.active else None, v_site.spec if v_site.active else None)


def cache_fits(model, batch, max_len, device, dtype):
    cache = model.transformer.h[0].attn.kv_cache
    return (cache is not None and cache.k_or_codes().shape[0] == batch and cache.max_len >= max_len
            and cache.dtype == dtype and cache.k_or_codes().device == torch.device(device))


def reset_compiled(model):
    """Forget the compiled step and captured graph (they are made again on the next compiled generate)."""
    model._compiled_step = model._graphed = None


def sample_logits(logits, temperature, top_k):
    """The next token (batch, 1) from the last position's logits: argmax when temperature is 0."""
    logits = logits[:, -1, :]
    if temperature == 0:
        return greedy(logits)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("Inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


GREEDY_CHUNK = 128  # argmax over a vocabulary in two stages: the best of each chunk of this many, then of those


def greedy(logits):
    """logits (batch, vocab) -> the index of the largest (batch, 1), the first of equal ones, as argmax. A large
    vocabulary goes in two stages, the largest of each GREEDY_CHUNK logits and then of those, so that a GPU
    reduces it with many programs where argmax over 50257 logits is one long serial reduction (about 10 us an H200
    decode step; two short ones take a few)."""
    batch, vocab = logits.shape
    if vocab < 64 * GREEDY_CHUNK:
        return logits.argmax(dim=-1, keepdim=True)
    pad = -vocab % GREEDY_CHUNK
    if pad:
        logits = F.pad(logits, (0, pad), value=-float("inf"))
    best, where = logits.view(batch, -1, GREEDY_CHUNK).max(dim=-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return chunk * GREEDY_CHUNK + where.gather(1, chunk)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, compile=False):
    """Continue idx (batch, T) by max_new_tokens tokens: greedy when temperature is 0, else sampled from the
    top_k most likely. With use_cache, the prompt is run once (prefill) and each new token attends through
    the KV caches, which are reused across calls when they fit. With compile, the one-token step (sampling
    included) runs under torch.compile: on a GPU it is captured once as a CUDA graph that also feeds its token
    to the next step, so that each token costs one graph replay and no Python (decode_graphed). It compiles
    one block for all layers (seconds, where the whole unrolled model takes about a minute at 32 layers);
    compile="whole" compiles the step as one graph instead; compile="reduce-overhead" takes torch.compile's
    own CUDA graphs over the whole step, one call per token. The cache holds block_size positions: tokens
    beyond it are generated as without a cache (the last block_size tokens recomputed each step)."""
    if not use_cache:
        return generate_uncached(model, idx, max_new_tokens, temperature, top_k)
    block_size = model.config.block_size
    prompt = idx[:, -block_size:]
    cached_steps = min(max_new_tokens, block_size - prompt.size(1))
    if cached_steps <= 0:
        return generate_uncached(model, idx, max_new_tokens, temperature, top_k)
    device_type = idx.device.type
    dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
             else model.transformer.wte.weight.dtype)
    max_len = prompt.size(1) + cached_steps
    if not cache_fits(model, idx.size(0), max_len, idx.device, dtype):
        setup_cache(model, idx.size(0), max_len, idx.device, dtype)
    input_pos = torch.arange(prompt.size(1), device=idx.device)
    logits, _ = model(prompt, input_pos=input_pos)
    tokens = [idx, sample_logits(logits, temperature, top_k)]
    if compile and compile != "reduce-overhead" and device_type == "cuda":
        with dependent_launch(device_type):
            tokens.append(decode_graphed(model, tokens[-1], prompt.size(1), cached_steps - 1, temperature, top_k,
                                         whole=compile == "whole"))
    else:
        step = partial(decode_step, model)
        if compile:
            if getattr(model, "_compiled_step", None) is None:
                model._compiled_step = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
            step = model._compiled_step
        input_pos = input_pos[-1:].clone()
        with dependent_launch(device_type) if compile else nullcontext():  # compiled at the first step
            for _ in range(cached_steps - 1):  # clone: a CUDA graph's next replay overwrites its output
                input_pos += 1
                tokens.append(step(tokens[-1], input_pos, temperature, top_k).clone())
    idx = torch.cat(tokens, dim=1)
    return generate_uncached(model, idx, max_new_tokens - cached_steps, temperature, top_k)


def dependent_launch(device_type):
    """A context in which torch.compile makes its Triton kernels with programmatic dependent launch (inductor's
    triton.enable_pdl: on Hopper and later each kernel of a decode step may launch while the one before finishes;
    other GPUs and the CPU get plain kernels). On an H200 it sped up the compiled decode of GPT-2 124M in bf16 by
    about 10% (bench/results/pdl_h200/README.md). TORCHINDUCTOR_ENABLE_PDL, when set, decides instead."""
    from torch._inductor import config
    if device_type != "cuda" or "TORCHINDUCTOR_ENABLE_PDL" in os.environ or not hasattr(config.triton, "enable_pdl"):
        return nullcontext()
    return config.patch({"triton.enable_pdl": True})


def decode_step(model, token, input_pos, temperature, top_k):
    """The next token after `token` (batch, 1) at position input_pos (1,), through the KV caches."""
    logits, _ = model(token, input_pos=input_pos)
    return sample_logits(logits, temperature, top_k)


def chained_step(model, token, pos, out, temperature, top_k, regions=None):
    """decode_step that writes its own next input: the new token goes to out[:, pos + 1] and to `token`, and
    pos advances, so that the step can be replayed without Python in between. It runs the blocks as
    Block.step (each block's last residual add left to the next), so that a compiled decode compiles three
    regions, `regions` = (embed, block step, finish_step) compiled (step_regions), and one block serves every
    layer: the compile time of one block, not of n_layer unrolled. A model whose normalizations went into its packed
    layers (inference.fuse_norms) runs its blocks as fused_block_step at one row (batch 1)."""
    embed, block_step, finish = regions or step_regions(model, token.size(0))
    x, visible, delta = embed(token, pos)
    for block in model.transformer.h:
        x, delta = block_step(block, x, delta, pos, visible)
    finish(x, None if norms_fused(model, token.size(0)) else delta, token, pos, out, temperature, top_k)


def norms_fused(model, batch):
    """Whether a decode step of `batch` rows runs the blocks as fused_block_step."""
    return batch == 1 and all(getattr(block, "norms_fused", False) for block in model.transformer.h)


def step_regions(model, batch, wrap=lambda f: f):
    """(embed, block step, finish) of chained_step, each passed through `wrap` (torch.compile)."""
    if norms_fused(model, batch):
        return wrap(partial(fused_embed, model)), wrap(fused_block_step), wrap(partial(finish_step, model))
    return wrap(partial(plain_embed, model)), wrap(Block.step), wrap(partial(finish_step, model))


def plain_embed(model, token, pos):
    return (*model.embed(token, pos), None)


def fused_embed(model, token, pos):
    """model.embed, and u = x * the first normalization's gain, the first block's fused_block_step input."""
    x, visible = model.embed(token, pos)
    gain = model.transformer.h[0].attn.qkv.norm_in_bits.view(torch.float32)[0]
    return x, visible, (x.float() * gain).to(ops.norm_input_dtype(x.dtype))


def fused_block_step(block, x, u, input_pos=None, visible=None):
    """Block.step of a block whose normalizations and residual adds went into its packed layers
    (inference.fuse_norms): x (the residual stream) and u = x * the gain of its first normalization in, the same
    two for the next block out. Four kernels besides the attention's: the q/k/v layer normalizes x itself
    (norm_forward), the output projection adds the residual and gives the up projection its u (residual_forward),
    and so on."""
    attn, mlp = block.attn, block.mlp
    B, T, C = x.size()
    qkv = attn.qkv.norm_forward(u, x).split(C, dim=-1)
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in qkv)
    y = attn.cached_attention(q, k, v, input_pos, visible).transpose(1, 2).contiguous().view(B, T, C)
    x, u = attn.attn_proj.residual_forward(y, x)
    h = mlp.mlp_up.norm_forward(u, x)
    if getattr(mlp.mlp_up, "gelu", None) is None:
        h = mlp.act["activation_output"](F.gelu(mlp.act["activation_input"](h), approximate=mlp.gelu_approximate))
    return mlp.mlp_down.residual_forward(h, x)


def finish_step(model, x, delta, token, pos, out, temperature, top_k):
    """chained_step's end: the last residual add (none where delta is None), ln_f, the head, sampling, and the
    writes of its token."""
    new = sample_logits(model.head(model.transformer.ln_f(x if delta is None else x + delta)), temperature, top_k)
    out.index_copy_(1, pos + 1, new)
    token.copy_(new)
    pos.add_(1)


def decode_graphed(model, token, pos, steps, temperature, top_k, whole=False):
    """`steps` tokens after `token` (batch, 1), which sits at position pos: one CUDA graph replay each. The
    graph (chained_step, compiled by regions, or whole, over static token, position and output buffers) is
    captured on first use and again when the cache, batch, sampling settings or compile choice change. Its
    warm-up runs the real first step (it writes the cache at pos as the first replay does again), on a side
    stream as CUDA graph capture needs."""
    if steps == 0:  # nothing to replay (and a warm-up step would write past the cache)
        return token[:, :0]
    cache = model.transformer.h[0].attn.kv_cache
    key = (token.size(0), cache.max_len, temperature, top_k, token.device, whole)
    state = getattr(model, "_graphed", None)
    if state is None or state["key"] != key or state["cache"] is not cache:
        model._graphed = None
        compiled = partial(torch.compile, fullgraph=True, dynamic=False)
        step = compiled(partial(chained_step, model)) if whole else partial(chained_step, model)
        regions = None if whole else step_regions(model, token.size(0), compiled)
        state = dict(key=key, cache=cache, token=torch.empty_like(token),
                     pos=torch.empty(1, dtype=torch.long, device=token.device),
                     out=torch.zeros(token.size(0), cache.max_len, dtype=torch.long, device=token.device))
        run = partial(step, state["token"], state["pos"], state["out"], temperature, top_k, regions)
        side = torch.cuda.Stream(token.device)
        side.wait_stream(torch.cuda.current_stream(token.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles, then runs once more as compiled code (kernel configs timed)
                state["token"].copy_(token)
                state["pos"].fill_(pos)
                run()
        torch.cuda.current_stream(token.device).wait_stream(side)
        state["graph"] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(state["graph"]):
            run()
        model._graphed = state
    state["token"].copy_(token)
    state["pos"].fill_(pos)
    for _ in range(steps):
        state["graph"].replay()
    return state["out"][:, pos + 1:pos + 1 + steps].clone()


def generate_uncached(model, idx, max_new_tokens, temperature, top_k):
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
        logits, _ = model(idx_cond)
        idx = torch.cat((idx, sample_logits(logits, temperature, top_k)), dim=1)
    return idx
