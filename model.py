"""
A GPT-2 language model in the manner of nanoGPT, with quantization sites.

Every linear layer is a *linear site* (q, k, v, attn_proj, mlp_up, mlp_down) whose class comes from the
variant registry in quantization/layers.py; every named point of the activations is an *activation site*
whose ActQuant is the identity unless the config switches it on. The two tables below are the only list
of sites: train.py's flags, the config, saving and plots are all generated from them.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F

from quantization.layers import ActQuant, make_linear, latent_weight
from quantization.quantizers import QuantSpec, fake_quant

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
    # ONLINE_TRANSFORMS: "hadamard", "scale" (one factor per channel, a saved buffer), "scale_hadamard", and
    # "shift_scale", "shift_scale_hadamard" with a channel mean taken out first); the layer reading the site carries
    # the inverse in its weight (and the shift in its bias)
    online_transforms: dict = field(default_factory=dict)


def site_width(config, kind, site):
    """Channels of an activation site whose last dimension is the model's width (or the MLP's); None for the sites
    inside attention, which are per head."""
    if kind == "mlp":
        return 4 * config.n_embd if site.startswith("activation") else config.n_embd
    return config.n_embd if site in ("input", "output") else None


def act_sites(config, kind):
    sites = nn.ModuleDict()
    for site in ACT_SITES[kind]:
        name = f"{kind}_{site}"
        try:
            sites[site] = ActQuant(QuantSpec(**config.act_quant[name]) if name in config.act_quant else None,
                                   store=config.store_activations, transform=config.online_transforms.get(name),
                                   width=site_width(config, kind, site))
        except ValueError as e:
            raise ValueError(f"online_transforms: {name}: {e}") from None
    return sites


def make_norm(config):
    if config.norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"norm '{config.norm}' is unknown; expected layernorm or rmsnorm")
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def linear_site(config, site, in_features, out_features):
    spec = QuantSpec(**config.weight_quant.get(site, {}))
    return make_linear(config.linear_variants.get(site, "linear"), in_features, out_features, config.bias, spec)


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
        self.qkv = None  # inference.fuse_qkv: q, k and v as one layer

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
        (T, cache length), True where seen, or as GPT.embed computes it once for all layers, added to the scores:
        0 where seen, -inf elsewhere). The activation sites see only the new tokens' rows (their per_tensor ranges
        cover this step's tokens); K and V are quantized as they enter the cache (KVCache); the softmax input's
        masked scores are zeroed before quantizing, which widens neither a symmetric nor an affine range. One new
        token with none of those sites on may go through the cache's own kernel (KVCache.attend: the write and the
        attention over the valid positions in one), which gives the same result."""
        plain = not any(self.act[site].active for site in ATTN_INNER_SITES)
        if plain and q.size(2) == 1:  # one new token: the cache may write and attend in one kernel
            y = self.kv_cache.attend(q, k, v, input_pos)
            if y is not None:
                return y
        k, v = self.kv_cache.update(input_pos, k, v)
        if visible is None:
            visible = self.causal[input_pos, :k.size(2)]
        if plain:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        if visible.dtype != torch.bool:
            visible = visible == 0
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
        if getattr(self.mlp_up, "gelu", None) is None:  # else mlp_up applies it (inference.fuse_gelu)
            x = self.act["activation_output"](F.gelu(self.act["activation_input"](x),
                                                     approximate=self.gelu_approximate))
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

    def token_embedding_weight(self):
        weight = self.transformer.wte.weight
        if self.embedding_spec is not None and self.quantization_enabled:
            weight = fake_quant(weight, self.embedding_spec, self.training)
        return weight

    def forward(self, idx, targets=None, input_pos=None):
        """Logits (of the last position only, unless targets are given) and the loss. With input_pos (the
        positions of idx's tokens, a 1-D tensor) the layers attend through their KV caches (generate.setup_cache)."""
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
        input_pos the (T, cache length) mask of the cached positions each token sees, as the attention adds it to
        its scores (0 where seen, -inf elsewhere, in the dtype the attention runs in: made once here, not by every
        layer), None without. wte: the token embedding weight as token_embedding_weight() gives it (computed here if
        not given)."""
        t = idx.size(1)
        assert t <= self.config.block_size, f"sequence of length {t} is longer than block_size {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device) if input_pos is None else input_pos
        wte = self.token_embedding_weight() if wte is None else wte
        x = self.transformer.drop(F.embedding(idx, wte) + self.transformer.wpe(pos))
        if input_pos is None:
            return x, None
        cached = torch.arange(self.transformer.h[0].attn.kv_cache.max_len, device=idx.device)
        device = idx.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        hidden = torch.full((t, cached.numel()), float("-inf"), dtype=dtype, device=idx.device)
        return x, hidden.masked_fill(cached[None, :] <= input_pos[:, None], 0.0)

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


