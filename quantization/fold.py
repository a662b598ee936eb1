"""Folding, exact rewrites of a model that leave its function unchanged:

- `fold_state(state, config)`: a LayerNorm's gain and bias move into the linear layers it feeds, and every layer
  that writes into the residual stream writes only mean-free vectors, so that the stream stays mean-free and a
  LayerNorm over it is an RMSNorm (SliceGPT, arXiv 2401.15024, section 3.2); differentiable in the weights;
- `fold_norms(model)`: the same for a GPT module: a copy whose norms are weight-free RMSNorms (config
  norm="rmsnorm") and whose head is its own matrix (tied_head=False). Rotating the residual stream of that copy
  (R1 of SpinQuant) changes nothing, because an RMSNorm commutes with an orthogonal matrix.

Folding transforms into a model's weights so that the float model computes the same function.

Per-channel scales (AWQ, SmoothQuant): dividing a channel of the activation by s and multiplying the matching
input column of every linear that reads it by s leaves the output unchanged, and the division can live in the
LayerNorm (or the linear) that produces the activation:

    fold_scale_into_layernorm(block.ln_1, [attn.q, attn.k, attn.v], s)   # LN(x) / s, then W * s
    fold_scale_into_linear(attn.v, attn.attn_proj, s)                     # v's output rows / s, attn_proj's columns * s

(v -> attn_proj folds because attention mixes tokens, never channels: channel c of attention's output is a
weighted sum of channel c of v.) A LayerNorm made with bias=False has no bias to divide.
"""
from dataclasses import asdict

import torch

from model import GPT, GPTConfig


def fold_state(state, config):
    """The state dict of fold_norms' copy, computed from a LayerNorm GPT's state dict (plain `.weight` keys) with
    plain tensor operations, so that it is differentiable in `state` (train.py --spinquant trains the original
    weights through it). `state` is not changed."""
    s = dict(state)

    def fold(ln, readers):  # W <- W diag(gain), b <- b + W beta; the norm keeps a gain of 1 and loses its bias
        gain, beta = s[f"{ln}.weight"], s.pop(f"{ln}.bias", None)
        for r in readers:
            W = s[f"{r}.weight"]
            if beta is not None:
                if f"{r}.bias" not in s:
                    raise ValueError("a LayerNorm bias cannot be folded into a linear layer without a bias")
                s[f"{r}.bias"] = s[f"{r}.bias"] + W @ beta.to(W.dtype)
            s[f"{r}.weight"] = W * gain.to(W.dtype)
        s[f"{ln}.weight"] = torch.ones_like(gain)

    def center(r):  # the layer's outputs made mean-free over the features
        s[f"{r}.weight"] = s[f"{r}.weight"] - s[f"{r}.weight"].mean(dim=0, keepdim=True)
        if f"{r}.bias" in s:
            s[f"{r}.bias"] = s[f"{r}.bias"] - s[f"{r}.bias"].mean()

    if config.tied_head:  # the head gets its own copy of the embedding before either changes
        wte = s["transformer.wte.weight"]
        s["lm_head.weight"] = wte
        if config.bias:
            s["lm_head.bias"] = wte.new_zeros(wte.shape[0])
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        fold(f"{p}ln_1", (f"{p}attn.q", f"{p}attn.k", f"{p}attn.v"))
        fold(f"{p}ln_2", (f"{p}mlp.mlp_up",))
        center(f"{p}attn.attn_proj")
        center(f"{p}mlp.mlp_down")
    fold("transformer.ln_f", ("lm_head",))
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        s[key] = s[key] - s[key].mean(dim=1, keepdim=True)
    return s


def folded_config(config):
    if config.norm != "layernorm":
        raise ValueError(f"the model's norm is {config.norm}, not layernorm: it is already folded")
    return GPTConfig(**{**asdict(config), "norm": "rmsnorm", "tied_head": False})


@torch.no_grad()
def fold_norms(model):
    """A copy of a LayerNorm GPT computing the same logits with weight-free RMSNorms and an untied head: every
    LayerNorm is folded into the layers it feeds (ln_f into the new head), and the embeddings, attn_proj and
    mlp_down write mean-free vectors into the residual stream (fold_state). `model` is not changed."""
    config = folded_config(model.config)
    state = {k: v.clone() for k, v in fold_state(model.state_dict(), model.config).items()}
    return build_like(config, state)


def build_like(config, state):
    """A GPT of `config` holding `state` exactly (in the state's dtype and on its device); the random
    initialisation it replaces draws from a forked generator, so callers' random streams are not disturbed."""
    like = next(iter(state.values()))
    with torch.random.fork_rng(devices=[]):
        model = GPT(config).to(device=like.device, dtype=like.dtype)
    model.load_state_dict(state)
    return model


def with_biases(model):
    """A copy of `model` computing the same function with bias=True: every linear and LayerNorm that had no bias
    gets a zero one (for a change of basis that must add a constant to a layer's output)."""
    config = GPTConfig(**{**asdict(model.config), "bias": True})
    state = dict(model.state_dict())
    like = next(iter(state.values()))
    with torch.random.fork_rng(devices=[]):
        shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    state.update({k: torch.zeros(shape, dtype=like.dtype, device=like.device)
                  for k, shape in shapes.items() if k not in state})
    return build_like(config, state)


def check_scale(scale, width, what):
    if scale.dim() != 1 or scale.numel() != width:
        raise ValueError(f"scale of shape {list(scale.shape)} does not fit {what} of width {width}")
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError("scale must be finite and positive in every channel")


@torch.no_grad()
def fold_scale_into_layernorm(ln, linears, scale):
    """Divide the LayerNorm's output channels by `scale` (its weight, and its bias if it has one) and multiply the
    matching input column of each linear in `linears` by it."""
    check_scale(scale, ln.weight.numel(), "the LayerNorm")
    scale = scale.to(ln.weight.device, torch.float32)
    ln.weight.div_(scale.to(ln.weight.dtype))
    if ln.bias is not None:
        ln.bias.div_(scale.to(ln.bias.dtype))
    for linear in linears:
        linear.weight.mul_(scale.to(linear.weight.dtype).reshape(1, -1))


@torch.no_grad()
def fold_scale_into_linear(prev, next, scale):
    """Divide `prev`'s output channels (weight rows and bias) by `scale` and multiply `next`'s input columns by it.
    Valid wherever only channel-preserving, linear maps lie between them (attention's mixing of v over tokens)."""
    check_scale(scale, prev.weight.shape[0], "the previous linear's output")
    if next.weight.shape[1] != prev.weight.shape[0]:
        raise ValueError(f"the next linear reads {next.weight.shape[1]} channels, the previous writes "
                         f"{prev.weight.shape[0]}")
    scale = scale.to(prev.weight.device, torch.float32)
    prev.weight.div_(scale.to(prev.weight.dtype).reshape(-1, 1))
    if prev.bias is not None:
        prev.bias.div_(scale.to(prev.bias.dtype))
    next.weight.mul_(scale.to(next.weight.dtype).reshape(1, -1))
