"""
A GPT-2 language model in the manner of nanoGPT, with quantization sites.

Every linear layer is a *linear site* (q, k, v, attn_proj, mlp_up, mlp_down) whose class comes from the
variant registry in quantization/layers.py; every named point of the activations is an *activation site*
whose ActQuant is the identity unless the config switches it on. The two tables below are the only list
of sites: train.py's flags, the config, saving and plots are all generated from them.
"""
import math
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from quantization.layers import ActQuant, make_linear, latent_weight
from quantization.quantizers import QuantSpec, code_range, compute_qparams, fake_quant, quantize, smallest_int_dtype

# linear site -> the layer kind it belongs to (group-level flags such as --linear_variant_attn apply to a kind)
LINEAR_SITES = {"q": "attn", "k": "attn", "v": "attn", "attn_proj": "attn", "mlp_up": "mlp", "mlp_down": "mlp"}

# layer kind -> its activation sites, in the order the forward pass meets them
ACT_SITES = {
    "attn": ("input", "qk_mult_q_input", "qk_mult_k_input", "softmax_input",
             "pv_mult_p_input", "pv_mult_v_input", "pv_mult_output", "output"),
    "mlp": ("input", "activation_input", "activation_output", "output"),
}
# the sites inside the attention product: while none is on, attention takes the fused SDPA kernel
ATTN_INNER_SITES = ACT_SITES["attn"][1:-1]


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    # linear site -> variant name; missing sites are "linear"
    linear_variants: dict = field(default_factory=dict)
    # linear site -> QuantSpec fields (a plain dict, so that checkpoints hold no custom classes)
    weight_quant: dict = field(default_factory=dict)
    # "attn_<site>" / "mlp_<site>" -> QuantSpec fields, for the activation sites that are on
    act_quant: dict = field(default_factory=dict)
    store_activations: bool = False
    # QuantSpec fields for the tied token embedding / lm_head, or None to keep them full precision
    embedding_quant: dict = None
    # GELU of the MLP: "none" (exact) or "tanh" (the approximation GPT-2 was trained with, for imported weights)
    gelu_approximate: str = "none"
    # "layernorm", or "rmsnorm" (what a LayerNorm becomes once folded into its linears over a mean-free residual)
    norm: str = "layernorm"
    # the output head shares the token embedding's matrix; False gives it its own (rotated models need that)
    tied_head: bool = True
    # "<kind>_<site>" -> online transform applied just before the site's quantizer (quantization/layers.py
    # ONLINE_TRANSFORMS, e.g. "hadamard"); the layer reading the site carries its inverse in its weight
    online_transforms: dict = field(default_factory=dict)


def act_sites(config, kind):
    return nn.ModuleDict({
        site: ActQuant(QuantSpec(**config.act_quant[f"{kind}_{site}"]) if f"{kind}_{site}" in config.act_quant
                       else None, store=config.store_activations,
                       transform=config.online_transforms.get(f"{kind}_{site}"))
        for site in ACT_SITES[kind]})


def make_norm(config):
    if config.norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm '{config.norm}' is unknown; expected layernorm or rmsnorm")
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def linear_site(config, site, in_features, out_features):
    spec = QuantSpec(**config.weight_quant.get(site, {}))
    return make_linear(config.linear_variants.get(site, "linear"), in_features, out_features, config.bias, spec)


def concatenate_linears(layers):
    """One layer whose output is the layers' outputs side by side (they read the same input), or None where they
    cannot be joined. Linears that compute F.linear with a plain weight (no parametrization, so QAT layers once
    frozen) become one nn.Linear; a layer class with a `concatenate` classmethod (PackedLinear) joins its own."""
    first = layers[0]
    if all(type(layer).forward is nn.Linear.forward and not parametrize.is_parametrized(layer) for layer in layers):
        if len({(layer.bias is None, layer.weight.dtype, layer.weight.device) for layer in layers}) > 1:
            return None
        fused = nn.Linear(first.in_features, sum(layer.out_features for layer in layers), bias=first.bias is not None,
                          device="meta")
        fused.weight = nn.Parameter(torch.cat([layer.weight.detach() for layer in layers]), requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
        return fused
    if len({type(layer) for layer in layers}) == 1 and hasattr(type(first), "concatenate"):
        return type(first).concatenate(layers)
    return None


class KVCache(nn.Module):
    """The keys and values of one attention layer for decoding, preallocated as (batch, n_head, max_len, head_dim)
    and written in place at the new tokens' positions, so that a decode step has static shapes (CUDA graphs).

    When the layer's qk_mult_k_input / pv_mult_v_input site is on, that tensor is stored quantized: integer codes
    plus a scale and zero point per token and head (per group of head_dim for a per_group spec), computed once as
    the token enters the cache. For per_token and per_group specs this is exactly what the uncached forward
    computes; a per_tensor or per_channel spec, whose range would span tokens not yet generated, is applied per
    token here (same method and bits)."""

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
            codes_dtype = smallest_int_dtype(*code_range(spec))
            self.register_buffer(f"{name}_codes", torch.zeros(shape, device=device, dtype=codes_dtype), persistent=False)
            for qparam in ("scale", "zero_point"):
                self.register_buffer(f"{name}_{qparam}", torch.zeros((*shape[:3], rows), device=device), persistent=False)
        # the tensors stored as they are (K, V or both) share one buffer: one write per step for both
        self.plain = [name for name in ("k", "v") if name not in self.specs]
        if self.plain:
            self.register_buffer("stored", torch.zeros((len(self.plain), *shape), device=device, dtype=dtype),
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
            rows = scale.size(-1)  # dequantize as quantizers.dequantize does: (codes - zero_point) * scale, in float32
            grouped = codes.float().unflatten(-1, (rows, -1))
            out.append(((grouped - zero_point[..., None]) * scale[..., None]).flatten(-2).to(x.dtype))
        return out


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.q = linear_site(config, "q", config.n_embd, config.n_embd)
        self.k = linear_site(config, "k", config.n_embd, config.n_embd)
        self.v = linear_site(config, "v", config.n_embd, config.n_embd)
        self.attn_proj = linear_site(config, "attn_proj", config.n_embd, config.n_embd)
        self.act = act_sites(config, "attn")
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.register_buffer("causal", torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool)),
                             persistent=False)
        self.kv_cache = None
        self.qkv = None  # fuse_qkv: q, k and v as one layer

    def fuse_qkv(self):
        """Replace q, k and v by one layer of 3 x n_embd outputs (inference: one matmul, or one packed kernel,
        instead of three). Returns False, changing nothing, where the three cannot be joined."""
        fused = concatenate_linears([self.q, self.k, self.v])
        if fused is None:
            return False
        self.qkv, self.q, self.k, self.v = fused, None, None, None
        return True

    def forward(self, x, input_pos=None, visible=None):
        B, T, C = x.size()
        x = self.act["input"](x)
        qkv = self.qkv(x).split(C, dim=-1) if self.qkv is not None else (self.q(x), self.k(x), self.v(x))
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv)
        if input_pos is not None:
            y = self.cached_attention(q, k, v, input_pos, visible)
        elif not any(self.act[site].active or self.act[site].transform is not None for site in ATTN_INNER_SITES):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True)
        else:
            q, k = self.act["qk_mult_q_input"](q), self.act["qk_mult_k_input"](k)
            att = self.act["softmax_input"]((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1))))
            att = att.masked_fill(~self.causal[:T, :T], float("-inf"))  # masked after quantizing: -inf has no scale
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = self.act["pv_mult_p_input"](att) @ self.act["pv_mult_v_input"](v)
            y = self.act["pv_mult_output"](y)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.act["output"](self.resid_dropout(self.attn_proj(y)))

    def cached_attention(self, q, k, v, input_pos, visible=None):
        """Attention of the new tokens at input_pos over every token in the cache up to them (visible: that mask,
        (T, cache length), which GPT computes once for all layers). The activation sites see only the new tokens'
        rows (their per_tensor ranges cover this step's tokens); K and V are quantized as they enter the cache
        (KVCache); the softmax input's masked scores are zeroed before quantizing, which widens neither a
        symmetric nor an affine range."""
        k, v = self.kv_cache.update(input_pos, k, v)
        if visible is None:
            visible = self.causal[input_pos, :k.size(2)]
        if not any(self.act[site].active for site in ATTN_INNER_SITES):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        att = (self.act["qk_mult_q_input"](q) @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = self.act["softmax_input"](att.masked_fill(~visible, 0.0)).masked_fill(~visible, float("-inf"))
        y = self.act["pv_mult_p_input"](F.softmax(att, dim=-1)) @ v
        return self.act["pv_mult_output"](y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.mlp_up = linear_site(config, "mlp_up", config.n_embd, 4 * config.n_embd)
        self.mlp_down = linear_site(config, "mlp_down", 4 * config.n_embd, config.n_embd)
        self.act = act_sites(config, "mlp")
        self.dropout = nn.Dropout(config.dropout)
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x):
        x = self.mlp_up(self.act["input"](x))
        x = self.act["activation_output"](F.gelu(self.act["activation_input"](x), approximate=self.gelu_approximate))
        return self.act["output"](self.dropout(self.mlp_down(x)))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, input_pos=None, visible=None):
        x, mlp_out = self.step(x, None, input_pos, visible)
        return x + mlp_out

    def step(self, x, delta, input_pos=None, visible=None):
        """The block with its last residual add left to the next block: x + delta in, (the residual after
        attention, the MLP's output) out. A block compiled on its own (a compiled decode compiles one block for
        all layers) then adds and normalizes in one kernel, as a whole-model compile does."""
        if delta is not None:
            x = x + delta
        x = x + self.attn(self.ln_1(x), input_pos, visible)
        return x, self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if not config.tied_head:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        # the output head is tied to the token embedding (one matrix, quantized once if at all)
        self.embedding_spec = QuantSpec(**config.embedding_quant) if config.embedding_quant else None
        self.quantization_enabled = True
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for block in self.transformer.h:
            for proj in (block.attn.attn_proj, block.mlp.mlp_down):
                torch.nn.init.normal_(latent_weight(proj), mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(latent_weight(module), mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_pretrained(cls, name_or_folder, **overrides):
        """A GPT from a checkpoint train.py (or a PTQ script) wrote (its folder or file), a local Hugging Face
        GPT-2 folder, or a GPT-2 name (gpt2, gpt2-medium, ...: downloaded, needs a network). `overrides`
        (block_size, dropout, config fields) apply to the Hugging Face import."""
        import os
        from checkpoint import load_checkpoint
        from quantization.hf import load_hf_gpt2
        path = os.path.join(name_or_folder, "ckpt.pt") if os.path.isdir(name_or_folder) else name_or_folder
        if os.path.isfile(path):
            return cls.from_checkpoint(load_checkpoint(path))
        return load_hf_gpt2(name_or_folder, **overrides)[0]

    @classmethod
    def from_checkpoint(cls, checkpoint):
        """The GPT of a loaded checkpoint dict: its weights (a packed one dequantized), quantizers on or off as
        it was saved."""
        from quantization.packing import is_packed, load_packed
        model = cls(GPTConfig(**checkpoint["model_args"]))
        if is_packed(checkpoint):
            load_packed(model, checkpoint)
        else:
            model.load_state_dict(checkpoint["model"])
        model.set_quantization(checkpoint.get("quantization_enabled", True))
        return model

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def set_quantization(self, enabled):
        """Switch every weight and activation quantizer on or off (off during the full-precision warm-up)."""
        self.quantization_enabled = enabled
        for module in self.modules():
            if module is not self and hasattr(module, "enabled"):
                module.enabled = enabled

    def fuse_qkv(self):
        """Inference: each attention layer computes q, k and v with one layer (CausalSelfAttention.fuse_qkv), for
        faster decoding. The state dict then holds `qkv` in place of `q`, `k` and `v`: fuse after loading, and
        save or export (hf.py, gguf_export.py) an unfused model. Returns how many layers were fused."""
        return sum(block.attn.fuse_qkv() for block in self.transformer.h)

    def token_embedding_weight(self):
        weight = self.transformer.wte.weight
        if self.embedding_spec is not None and self.quantization_enabled:
            weight = fake_quant(weight, self.embedding_spec, self.training)
        return weight

    def forward(self, idx, targets=None, input_pos=None):
        """Logits (of the last position only, unless targets are given) and the loss. With input_pos (the
        positions of idx's tokens, a 1-D tensor) the layers attend through their KV caches (setup_cache)."""
        wte = self.token_embedding_weight()
        x, visible = self.embed(idx, input_pos, wte)
        for block in self.transformer.h:
            x = block(x, input_pos, visible)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.head(x, wte)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:  # inference: only the last position's logits are needed
            logits = self.head(x[:, [-1], :], wte)
            loss = None
        return logits, loss

    def head(self, x, wte=None):
        """Logits of the final normalized hidden states: the tied token embedding (wte as
        token_embedding_weight() gives it) or lm_head."""
        if not self.config.tied_head:
            return self.lm_head(x)
        return F.linear(x, self.token_embedding_weight() if wte is None else wte)

    def embed(self, idx, input_pos=None, wte=None):
        """The blocks' input for tokens idx (batch, T) at positions input_pos (default 0..T-1), and with
        input_pos the (T, cache length) mask of the cached positions each token sees (None without). wte: the
        token embedding weight as token_embedding_weight() gives it (computed here if not given)."""
        t = idx.size(1)
        assert t <= self.config.block_size, f"sequence of length {t} is longer than block_size {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device) if input_pos is None else input_pos
        wte = self.token_embedding_weight() if wte is None else wte
        x = self.transformer.drop(F.embedding(idx, wte) + self.transformer.wpe(pos))
        if input_pos is None:
            return x, None
        cached = torch.arange(self.transformer.h[0].attn.kv_cache.max_len, device=idx.device)
        return x, cached[None, :] <= input_pos[:, None]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def estimate_mfu(self, fwdbwd_per_iter, dt):
        """Model flops utilization in units of an A100's bf16 peak (312 TFLOPS), as nanoGPT reports it."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * self.get_num_params() + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / dt / 312e12

    def setup_cache(self, batch, max_len, device, dtype):
        """Allocate every layer's KVCache for `batch` sequences of up to max_len (<= block_size) positions. K and V
        are stored quantized where their activation site is on now (call after set_quantization)."""
        assert max_len <= self.config.block_size, f"max_len {max_len} is longer than block_size {self.config.block_size}"
        for block in self.transformer.h:
            attn = block.attn
            k_site, v_site = attn.act["qk_mult_k_input"], attn.act["pv_mult_v_input"]
            attn.kv_cache = KVCache(batch, attn.n_head, max_len, self.config.n_embd // attn.n_head, device, dtype,
                                    k_site.spec if k_site.active else None, v_site.spec if v_site.active else None)

    def cache_fits(self, batch, max_len, device, dtype):
        cache = self.transformer.h[0].attn.kv_cache
        return (cache is not None and cache.k_or_codes().shape[0] == batch and cache.max_len >= max_len
                and cache.dtype == dtype and cache.k_or_codes().device == torch.device(device))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, compile=False):
        """Continue idx (batch, T) by max_new_tokens tokens: greedy when temperature is 0, else sampled from the
        top_k most likely. With use_cache, the prompt is run once (prefill) and each new token attends through
        the KV caches, which are reused across calls when they fit. With compile, the one-token step (sampling
        included) runs under torch.compile: on a GPU it is captured once as a CUDA graph that also feeds its token
        to the next step, so that each token costs one graph replay and no Python (_decode_graphed). It compiles
        one block for all layers (seconds, where the whole unrolled model takes about a minute at 32 layers);
        compile="whole" compiles the step as one graph instead; compile="reduce-overhead" takes torch.compile's
        own CUDA graphs over the whole step, one call per token. The cache holds block_size positions: tokens
        beyond it are generated as without a cache (the last block_size tokens recomputed each step)."""
        if not use_cache:
            return self._generate_uncached(idx, max_new_tokens, temperature, top_k)
        block_size = self.config.block_size
        prompt = idx[:, -block_size:]
        cached_steps = min(max_new_tokens, block_size - prompt.size(1))
        if cached_steps <= 0:
            return self._generate_uncached(idx, max_new_tokens, temperature, top_k)
        device_type = idx.device.type
        dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                 else self.transformer.wte.weight.dtype)
        max_len = prompt.size(1) + cached_steps
        if not self.cache_fits(idx.size(0), max_len, idx.device, dtype):
            self.setup_cache(idx.size(0), max_len, idx.device, dtype)
        input_pos = torch.arange(prompt.size(1), device=idx.device)
        logits, _ = self(prompt, input_pos=input_pos)
        tokens = [idx, sample_logits(logits, temperature, top_k)]
        if compile and compile != "reduce-overhead" and device_type == "cuda":
            tokens.append(self._decode_graphed(tokens[-1], prompt.size(1), cached_steps - 1, temperature, top_k,
                                               whole=compile == "whole"))
        else:
            step = self.decode_step
            if compile:
                if getattr(self, "_compiled_step", None) is None:
                    self._compiled_step = torch.compile(self.decode_step, mode="reduce-overhead", fullgraph=True,
                                                       dynamic=False)
                step = self._compiled_step
            input_pos = input_pos[-1:].clone()
            for _ in range(cached_steps - 1):  # clone: a CUDA graph's next replay overwrites its output
                input_pos += 1
                tokens.append(step(tokens[-1], input_pos, temperature, top_k).clone())
        idx = torch.cat(tokens, dim=1)
        return self._generate_uncached(idx, max_new_tokens - cached_steps, temperature, top_k)

    def decode_step(self, token, input_pos, temperature, top_k):
        """The next token after `token` (batch, 1) at position input_pos (1,), through the KV caches."""
        logits, _ = self(token, input_pos=input_pos)
        return sample_logits(logits, temperature, top_k)

    def _chained_step(self, token, pos, out, temperature, top_k, regions=None):
        """decode_step that writes its own next input: the new token goes to out[:, pos + 1] and to `token`, and
        pos advances, so that the step can be replayed without Python in between. It runs the blocks as
        Block.step (each block's last residual add left to the next), so that a compiled decode compiles three
        regions, `regions` = (embed, Block.step, _finish_step) compiled, and one block serves every layer: the
        compile time of one block, not of n_layer unrolled."""
        embed, block_step, finish = regions or (self.embed, Block.step, self._finish_step)
        x, visible = embed(token, pos)
        delta = None
        for block in self.transformer.h:
            x, delta = block_step(block, x, delta, pos, visible)
        finish(x, delta, token, pos, out, temperature, top_k)

    def _finish_step(self, x, delta, token, pos, out, temperature, top_k):
        """_chained_step's end: the last residual add, ln_f, the head, sampling, and the writes of its token."""
        new = sample_logits(self.head(self.transformer.ln_f(x + delta)), temperature, top_k)
        out.index_copy_(1, pos + 1, new)
        token.copy_(new)
        pos.add_(1)

    def _decode_graphed(self, token, pos, steps, temperature, top_k, whole=False):
        """`steps` tokens after `token` (batch, 1), which sits at position pos: one CUDA graph replay each. The
        graph (_chained_step, compiled by regions, or whole, over static token, position and output buffers) is
        captured on first use and again when the cache, batch, sampling settings or compile choice change. Its
        warm-up runs the real first step (it writes the cache at pos as the first replay does again), on a side
        stream as CUDA graph capture needs."""
        if steps == 0:  # nothing to replay (and a warm-up step would write past the cache)
            return token[:, :0]
        cache = self.transformer.h[0].attn.kv_cache
        key = (token.size(0), cache.max_len, temperature, top_k, token.device, whole)
        state = getattr(self, "_graphed", None)
        if state is None or state["key"] != key or state["cache"] is not cache:
            self._graphed = None
            compiled = partial(torch.compile, fullgraph=True, dynamic=False)
            step = compiled(self._chained_step) if whole else self._chained_step
            regions = None if whole else tuple(map(compiled, (self.embed, Block.step, self._finish_step)))
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
            self._graphed = state
        state["token"].copy_(token)
        state["pos"].fill_(pos)
        for _ in range(steps):
            state["graph"].replay()
        return state["out"][:, pos + 1:pos + 1 + steps].clone()

    def _generate_uncached(self, idx, max_new_tokens, temperature, top_k):
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            idx = torch.cat((idx, sample_logits(logits, temperature, top_k)), dim=1)
        return idx


def sample_logits(logits, temperature, top_k):
    """The next token (batch, 1) from the last position's logits: argmax when temperature is 0."""
    logits = logits[:, -1, :]
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("Inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
