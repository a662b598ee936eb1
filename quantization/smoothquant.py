"""SmoothQuant (arXiv 2211.10438): move the activations' outlier channels into the weights before W8A8, with a
per-channel scale s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha) folded into the previous LayerNorm or linear.

In a block: ln_1 -> q, k, v (one scale for the three, which read the same input), v -> attn_proj, and
ln_2 -> mlp_up. mlp_down reads GELU's output, which no scale passes through, so it is left as it is.
"""
import torch

from quantization.channel_stats import input_channel_stats
from quantization.fold import fold_scale_into_layernorm, fold_scale_into_linear

_EPS = 1e-5


def check_alpha(alpha, flag="alpha"):
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{flag}={alpha}: must be in [0, 1]")


def smooth_scale(act_max, weights, alpha, dtype=torch.float32, eps=_EPS):
    """s_j = max|x_j|^alpha / max_i |W_ij|^(1-alpha), the weight maximum taken over every linear reading x (SpinQuant's
    S1, S2 and S4 pass a channel's RMS for max|x_j|, in float64)."""
    check_alpha(alpha)
    w_max = torch.stack([w.detach().abs().to(dtype).amax(dim=0) for w in weights]).amax(dim=0)
    s = act_max.to(dtype).clamp(min=eps).pow(alpha) / w_max.clamp(min=eps).pow(1 - alpha)
    return s.clamp(min=eps)


@torch.no_grad()
def smooth_model(model, samples, alpha=0.5, batch_size=8, device=None):
    """Fold SmoothQuant's scales into `model` in place (the float model's outputs do not change); returns
    {folded pair: scale}. `samples` are (nsamples, seqlen) calibration token ids."""
    check_alpha(alpha)
    stats = input_channel_stats(model, samples, batch_size, device)
    scales = {}
    for i, block in enumerate(model.transformer.h):
        pre, attn, mlp = f"transformer.h.{i}.", block.attn, block.mlp
        s = smooth_scale(stats[pre + "attn.q"]["max_abs"], [attn.q.weight, attn.k.weight, attn.v.weight], alpha)
        fold_scale_into_layernorm(block.ln_1, [attn.q, attn.k, attn.v], s)
        scales[pre + "ln_1"] = s
        s = smooth_scale(stats[pre + "attn.attn_proj"]["max_abs"], [attn.attn_proj.weight], alpha)
        fold_scale_into_linear(attn.v, attn.attn_proj, s)
        scales[pre + "attn.v"] = s
        s = smooth_scale(stats[pre + "mlp.mlp_up"]["max_abs"], [mlp.mlp_up.weight], alpha)
        fold_scale_into_layernorm(block.ln_2, [mlp.mlp_up], s)
        scales[pre + "ln_2"] = s
    return scales
