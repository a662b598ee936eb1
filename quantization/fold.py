"""Folding, exact rewrites of a model that leave its function unchanged:

- `fold_layernorm_into_linears(ln, linears)`: a LayerNorm's gain and bias move into the linear layers it feeds;
- `center_outputs(linear)`, `center_rows(embedding)`: a layer that writes into the residual stream writes only
  mean-free vectors, so that the stream stays mean-free and a LayerNorm over it is an RMSNorm (SliceGPT,
  arXiv 2401.15024, section 3.2);
- `fold_norms(model)`: both, for a whole GPT: a copy whose norms are weight-free RMSNorms (config norm="rmsnorm")
  and whose head is its own matrix (tied_head=False). Rotating the residual stream of that copy (R1 of SpinQuant)
  changes nothing, because an RMSNorm commutes with an orthogonal matrix.

Folding transforms into a model's weights so that the float model computes the same function.

Per-channel scales (AWQ, SmoothQuant): dividing a channel of the activation by s and multiplying the matching
input column of every linear that reads it by s leaves the output unchanged, and the division can live in the
LayerNorm (or the linear) that produces the activation:

    fold_scale_into_layernorm(block.ln_1, [attn.q, attn.k, attn.v], s)   # LN(x) / s, then W * s
    fold_scale_into_linear(attn.v, attn.attn_proj, s)                     # v's output rows / s, attn_proj's columns * s

(v -> attn_proj folds because attention mixes tokens, never channels: channel c of attention's output is a
weighted sum of channel c of v.) A LayerNorm made with bias=False has no bias to divide.
"""
import copy
from dataclasses import asdict

import torch

from model import GPT, GPTConfig


@torch.no_grad()
def fold_layernorm_into_linears(ln, linears):
    """W <- W diag(gain), b <- b + W beta for each linear fed by `ln`; then ln's gain is 1 and its bias 0.
    A linear without a bias cannot take a non-zero LayerNorm bias (ValueError)."""
    gain = ln.weight.detach().clone()
    beta = ln.bias.detach().clone() if getattr(ln, "bias", None) is not None else None
    for linear in linears:
        W = linear.weight
        if beta is not None and beta.any():
            if linear.bias is None:
                raise ValueError("a LayerNorm bias cannot be folded into a linear layer without a bias")
            linear.bias.add_(W @ beta.to(W.dtype))
        W.mul_(gain.to(W.dtype))
    ln.weight.fill_(1.0)
    if beta is not None:
        ln.bias.zero_()


@torch.no_grad()
def center_outputs(linear):
    """Make every output of `linear` mean-free over its features: subtract the mean of each weight column and of
    the bias (the layer then computes its old output minus that output's mean)."""
    linear.weight.sub_(linear.weight.mean(dim=0, keepdim=True))
    if linear.bias is not None:
        linear.bias.sub_(linear.bias.mean())


@torch.no_grad()
def center_rows(embedding):
    """Make every embedding vector mean-free."""
    embedding.weight.sub_(embedding.weight.mean(dim=1, keepdim=True))


@torch.no_grad()
def fold_norms(model):
    """A copy of a LayerNorm GPT computing the same logits with weight-free RMSNorms and an untied head: every
    LayerNorm is folded into the layers it feeds (ln_f into the new head), and the embeddings, attn_proj and
    mlp_down write mean-free vectors into the residual stream. `model` is not changed."""
    cfg = model.config
    if cfg.norm != "layernorm":
        raise ValueError(f"the model's norm is {cfg.norm}, not layernorm: it is already folded")
    model = copy.deepcopy(model)
    if cfg.tied_head:  # the head gets its own copy of the embedding before either changes
        model.lm_head = torch.nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.bias).to(model.transformer.wte.weight)
        model.lm_head.weight.copy_(model.transformer.wte.weight)
        if model.lm_head.bias is not None:
            model.lm_head.bias.zero_()
    t = model.transformer
    for block in t.h:
        a, m = block.attn, block.mlp
        fold_layernorm_into_linears(block.ln_1, (a.q, a.k, a.v))
        fold_layernorm_into_linears(block.ln_2, (m.mlp_up,))
        center_outputs(a.attn_proj)
        center_outputs(m.mlp_down)
    fold_layernorm_into_linears(t.ln_f, (model.lm_head,))
    center_rows(t.wte)
    center_rows(t.wpe)
    state = {k: v for k, v in model.state_dict().items() if not (".ln_" in k and k.endswith(".bias"))}
    return build_like(GPTConfig(**{**asdict(cfg), "norm": "rmsnorm", "tied_head": False}), state)


def build_like(config, state):
    """A GPT of `config` holding `state` exactly (in the state's dtype and on its device); the random
    initialisation it replaces draws from a forked generator, so callers' random streams are not disturbed."""
    like = next(iter(state.values()))
    with torch.random.fork_rng(devices=[]):
        model = GPT(config).to(device=like.device, dtype=like.dtype)
    model.load_state_dict(state)
    return model

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
