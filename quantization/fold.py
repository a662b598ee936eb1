"""Folding transforms into a model's weights so that the float model computes the same function.

Per-channel scales (AWQ, SmoothQuant): dividing a channel of the activation by s and multiplying the matching
input column of every linear that reads it by s leaves the output unchanged, and the division can live in the
LayerNorm (or the linear) that produces the activation:

    fold_scale_into_layernorm(block.ln_1, [attn.q, attn.k, attn.v], s)   # LN(x) / s, then W * s
    fold_scale_into_linear(attn.v, attn.attn_proj, s)                     # v's output rows / s, attn_proj's columns * s

(v -> attn_proj folds because attention mixes tokens, never channels: channel c of attention's output is a
weighted sum of channel c of v.) A LayerNorm made with bias=False has no bias to divide.
"""
import torch


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
