"""SpinQuant (arXiv 2405.16406) for model.py's GPT: rotate the model so that its weights and activations quantize
with less error, learn two of the rotations on calibration text, then quantize the weights (RTN, GPTQ or AutoRound).

    sq = SpinQuant(model, bits=4, act_bits=4, kv_bits=4)   # folds the norms, fixes R3 and R4, starts R1/R2
    sq.optimize(calib_data, steps=100)                      # Cayley SGD on R1, R2 (weights frozen)
    records = sq.apply()                                    # bake the rotations in, quantize the weights
    save_checkpoint(path, sq.checkpoint(base_checkpoint))   # an ordinary packed checkpoint

The same rotations at the switch to quantized training (train.py --spinquant): quantization/spin_quant_qat.py.

The rotations, for a GPT-2 (LayerNorm, biases, learned positions, no RoPE), after quantization/fold.py has made
every norm a weight-free RMSNorm over a mean-free residual and untied the head:
- R1 (n_embd x n_embd) on the residual stream: embeddings and the head read x R1; q, k, v, mlp_up read it;
  attn_proj and mlp_down write R1^T of what they wrote. Learned.
- R2 (head_dim x head_dim, one per layer) on each head of v and the matching input columns of attn_proj. Learned.
- R3 (head_dim, a Hadamard) on each head of q and k: q k^T is unchanged, the K cache quantizes better. Fixed.
- R4: an online Hadamard on mlp_down's input (config online_transforms, applied before the site's quantizer),
  its inverse folded into mlp_down's weight. Fixed.
- S4 (not in the paper): a scale per channel of mlp_down's input, the GELU output (x -> x / s online, W_down diag(s)):
  SmoothQuant's move of a hard activation's range into the weight, at the one linear input no offline scale passes
  through. Computed from calibration statistics (gelu_output_scales); a candidate of the held-out choice.
- S1, S2 (not in the paper): SmoothQuant's scales where they fold offline, in the candidate's own basis: S1 at each
  norm's output (the norm's gain divided by s, the columns of q, k, v or mlp_up multiplied), S2 at v's output (v's
  rows divided, attn_proj's columns multiplied; it smooths the V cache and attn_proj's input). No online cost.
Activations are quantized per token at the inputs of every linear layer, and the K and V caches per token and
head, by model.py's own activation quantizers (config act_quant); only the weights differ from a plain model.
"""
import copy
import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch.func import functional_call
from tqdm.auto import tqdm

from model import GPTConfig
from quantization.channel_stats import input_channel_stats
from quantization.fold import build_like, fold_norms, with_biases
from quantization.hadamard import hadamard_matrix, random_hadamard_matrix
from quantization.ptq import PTQConfig, make_quantizer
from quantization.quantizers import MAX_BITS, MIN_BITS, fake_quant, misfit
from quantization.rtn import SITES, weight_spec
from quantization.smoothquant import smooth_scale

FULL_BITS = 16  # act_bits / kv_bits of 16: that activation is not quantized
WEIGHT_METHODS = ("rtn", "gptq", "autoround")
ROTATIONS = ("R1", "R2", "R3", "R4")
# the fixed rotations without R1, each a candidate of SpinQuant.choose: R4 on the GELU output, whose heavy tails it
# spreads, and R3 on the K cache; neither rotates the residual stream, where R1 can amplify the noise of some inputs
FIXED_SETS = (("R4",), ("R3", "R4"))
# S4's scale s_j = rms_j^alpha / max_i |W_down[i, j]|^(1 - alpha) (SmoothQuant's migration strength alpha); the
# choice tries each of these and keeps the one whose S4 alone scores lowest on held-out samples
SMOOTH_ALPHA = 0.5
SMOOTH_ALPHAS = (0.5, 0.75)
# S1 and S2's alpha: s_j = rms_j^alpha / max_i |W[i, j]|^(1 - alpha) over every linear reading the channel
# (bench/results/spinquant_s12: 0.5 did best with S4 on the CPU BPE model and the default CPU model)
NORM_SMOOTH_ALPHA = 0.5
SMOOTHINGS = ("S1", "S2", "S4")
# the activation sites SpinQuant quantizes: the inputs of every linear layer, and the K and V caches
LINEAR_INPUT_SITES = ("attn_input", "attn_pv_mult_output", "mlp_input", "mlp_activation_output")
KV_SITES = ("attn_qk_mult_k_input", "attn_pv_mult_v_input")


def activation_quant(act_bits, kv_bits, act_sym=False):
    """model.py's act_quant config for per-token activations at act_bits and K/V caches at kv_bits (16: off)."""
    for name, bits in (("act_bits", act_bits), ("kv_bits", kv_bits)):
        if bits != FULL_BITS and not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"{name}={bits}: expected {MIN_BITS}..{MAX_BITS}, or {FULL_BITS} for no quantization")
    out = {}
    for sites, bits, sym in ((LINEAR_INPUT_SITES, act_bits, act_sym), (KV_SITES, kv_bits, False)):
        if bits != FULL_BITS:
            out.update({site: dict(method="symmetric_quant" if sym else "affine_quant", bits=bits,
                                   granularity="per_token") for site in sites})
    return out


def is_rotated(model_args):
    return model_args.get("norm", "layernorm") != "layernorm" or bool(model_args.get("online_transforms"))


def check_plain(model_args, what="the model"):
    """ValueError unless model_args describe a full-precision, unrotated GPT."""
    if is_rotated(model_args):
        raise ValueError(f"{what} is already rotated (norm {model_args.get('norm')}, online transforms "
                         f"{model_args.get('online_transforms') or 'none'}); rotate its unrotated original")
    variants = set(model_args.get("linear_variants", {}).values()) - {"linear"}
    if variants or model_args.get("act_quant") or model_args.get("embedding_quant"):
        raise ValueError(f"{what} is already quantized ({', '.join(sorted(variants)) or 'activations'}); "
                         f"SpinQuant needs a full-precision model")


def _heads(W, n_head):
    return W.reshape(n_head, -1, *W.shape[1:])


def rotate_state(state, config, R1=None, R2=None, R3=None, R4=None):
    """The state dict of a folded GPT (fold.fold_norms) with the rotations applied (None: that one is skipped).
    R1: (C, C); R2: one (hd, hd) per layer; R3: (hd, hd); R4: (4C, 4C), the matrix the online transform at
    mlp_activation_output multiplies by (x -> x R4). Differentiable in the rotations."""
    s = dict(state)
    H = config.n_head

    def head_out(key, R):  # y -> y R on each head of a layer's output: W[h] <- R^T W[h], b[h] <- b[h] R
        t = _heads(s[key], H)
        s[key] = (R.t() @ t if t.dim() == 3 else t @ R).reshape(s[key].shape)

    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        if R3 is not None:
            for site in ("q", "k"):
                for kind in ("weight", "bias"):
                    if f"{p}attn.{site}.{kind}" in s:
                        head_out(f"{p}attn.{site}.{kind}", R3)
        if R2 is not None:
            for kind in ("weight", "bias"):
                if f"{p}attn.v.{kind}" in s:
                    head_out(f"{p}attn.v.{kind}", R2[i])
            W = s[f"{p}attn.attn_proj.weight"]  # its input columns, head by head: W[:, h] <- W[:, h] R2
            s[f"{p}attn.attn_proj.weight"] = (W.reshape(W.shape[0], H, -1) @ R2[i]).reshape(W.shape)
        if R4 is not None:
            s[f"{p}mlp.mlp_down.weight"] = s[f"{p}mlp.mlp_down.weight"] @ R4
        if R1 is not None:
            for site in ("attn.q", "attn.k", "attn.v", "mlp.mlp_up"):
                s[f"{p}{site}.weight"] = s[f"{p}{site}.weight"] @ R1
            for site in ("attn.attn_proj", "mlp.mlp_down"):
                s[f"{p}{site}.weight"] = R1.t() @ s[f"{p}{site}.weight"]
                if f"{p}{site}.bias" in s:
                    s[f"{p}{site}.bias"] = s[f"{p}{site}.bias"] @ R1
    if R1 is not None:
        for key in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"):
            s[key] = s[key] @ R1
    return s


@torch.no_grad()
def gelu_output_scales(model, data, alpha=SMOOTH_ALPHA, batch_size=16, statistic="rms"):
    """S4: per block, a scale for each channel of the GELU output that mlp_down reads, s_j = a_j^alpha /
    max_i |W_down[i, j]|^(1 - alpha), a_j that channel's root mean square ("rms") or largest magnitude ("max",
    SmoothQuant's) over the (N, T + 1) calibration samples `data` under `model` (full precision, unrotated: the GELU
    output is the same under R1-R3). The RMS is the default (bench/spinquant_s4_alpha.py compares both at several
    alphas). A list of (4 n_embd,) float64 tensors; mlp_down's input columns are multiplied by s, the site divides by
    it."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_alpha={alpha}: must be in [0, 1]")
    if statistic not in ("rms", "max"):
        raise ValueError(f"statistic={statistic!r}: expected rms or max")
    data = calibration_batch(data)
    blocks = model.transformer.h
    sums = [None] * len(blocks)
    count = 0

    def hook(i):
        def record(module, inputs, out):
            a = out.detach().double().flatten(0, -2)
            a = a.pow(2).sum(0) if statistic == "rms" else a.abs().amax(0)
            a = a.cpu()
            sums[i] = a if sums[i] is None else (sums[i] + a if statistic == "rms" else torch.maximum(sums[i], a))
        return record

    handles = [b.mlp.act["activation_output"].register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    device = next(model.parameters()).device
    try:
        for b in range(0, data.shape[0], batch_size):
            x = data[b:b + batch_size, :-1].to(device)
            model(x)
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
    scales = []
    for i, block in enumerate(blocks):
        a = (sums[i] / count).sqrt() if statistic == "rms" else sums[i]
        scales.append(_smooth_scale(a, [block.mlp.mlp_down.weight], alpha))
    return scales


@torch.no_grad()
def gelu_output_means(model, data, batch_size=16):
    """The shift before S4: per block, each channel's mean of the GELU output that mlp_down reads, over the (N, T + 1)
    calibration samples `data` under `model` (full precision, unrotated: the same under R1-R3). A list of
    (4 n_embd,) float64 tensors; the site subtracts it, mlp_down's bias adds W_down times it back."""
    data = calibration_batch(data)
    stats = input_channel_stats(model, data[:, :-1], batch_size, sites=("mlp_down",))
    return [stats[f"transformer.h.{i}.mlp.mlp_down"]["mean"].double().cpu() for i in range(model.config.n_layer)]


def _smooth_scale(a, weights, alpha):
    s = smooth_scale(a.cpu(), [w.cpu() for w in weights], alpha, dtype=torch.float64, eps=1e-8)
    return s / s.mean()  # the mean does not matter to per-token or per-row quantizers: keep s near 1


@torch.no_grad()
def norm_smooth_scales(model, data, alpha=NORM_SMOOTH_ALPHA, batch_size=8):
    """S1 and S2's scales: {"transformer.h.<i>.ln_1" / "ln_2" / "attn.v": (channels,) float64}, from the channels'
    RMS at the inputs of q (ln_1's output), mlp_up (ln_2's) and attn_proj (v's, after attention) over the (N, T + 1)
    samples `data` under `model` with its quantizers off (the scales belong to the basis `model` computes in)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_norms={alpha}: must be in [0, 1]")
    data = calibration_batch(data)
    was = model.quantization_enabled
    model.set_quantization(False)
    try:
        stats = input_channel_stats(model, data[:, :-1], batch_size)
    finally:
        model.set_quantization(was)
    scales = {}
    for i, block in enumerate(model.transformer.h):
        p, attn = f"transformer.h.{i}.", block.attn
        scales[p + "ln_1"] = _smooth_scale(stats[p + "attn.q"]["rms"], [attn.q.weight, attn.k.weight, attn.v.weight],
                                           alpha)
        scales[p + "ln_2"] = _smooth_scale(stats[p + "mlp.mlp_up"]["rms"], [block.mlp.mlp_up.weight], alpha)
        scales[p + "attn.v"] = _smooth_scale(stats[p + "attn.attn_proj"]["rms"], [attn.attn_proj.weight], alpha)
    return scales


def smooth_norms_state(state, scales):
    """A state dict with S1 and S2 folded in (norm_smooth_scales' scales; differentiable in `state`): a norm's gain
    and bias divided by s and its readers' input columns multiplied; v's rows and bias divided and attn_proj's
    columns multiplied. The float model computes the same function."""
    state = dict(state)

    def divide(key, s):
        for suffix in (".weight", ".bias"):
            if key + suffix in state:
                t = state[key + suffix]
                state[key + suffix] = t / (s.reshape(-1, 1) if t.dim() == 2 else s).to(t)

    def widen(key, s):
        state[key + ".weight"] = state[key + ".weight"] * s.reshape(1, -1).to(state[key + ".weight"])

    for key, s in scales.items():
        p = key.rsplit(".", 1)[0] + "." if key.endswith((".ln_1", ".ln_2")) else key.rsplit(".", 2)[0] + "."
        divide(key, s)
        readers = {"ln_1": ("attn.q", "attn.k", "attn.v"), "ln_2": ("mlp.mlp_up",), "v": ("attn.attn_proj",)}
        for r in readers[key.rsplit(".", 1)[1]]:
            widen(p + r, s)
    return state


def cayley_step(R, grad, lr):
    """One Cayley SGD step on the orthogonal group (Li et al., arXiv 2002.01113, as SpinQuant uses it): the skew
    matrix A = G R^T - R G^T, a step alpha = min(lr, 1 / ||A||_1), and R <- (I + alpha/2 A)^-1 (I - alpha/2 A) R,
    which is orthogonal whatever alpha is. Computed in float64."""
    R64, G = R.double(), grad.double()
    A = G @ R64.t() - R64 @ G.t()
    alpha = min(lr, 1.0 / (A.abs().sum(dim=0).max().item() + 1e-12))
    eye = torch.eye(R.shape[0], dtype=torch.float64, device=R.device)
    return torch.linalg.solve(eye + 0.5 * alpha * A, (eye - 0.5 * alpha * A) @ R64).to(R.dtype)


def calibration_batch(calib_data):
    """A list of (1, T) token tensors (or a (N, T) tensor) -> one (N, T) tensor; ValueError when too short."""
    if isinstance(calib_data, (list, tuple)):
        if not calib_data:
            raise ValueError("calibration data is empty")
        lengths = {int(t.shape[-1]) for t in calib_data}
        if len(lengths) > 1:
            raise ValueError(f"calibration samples differ in length ({sorted(lengths)}); give samples of one length")
        calib_data = torch.cat([torch.as_tensor(t).reshape(1, -1) for t in calib_data])
    calib_data = torch.as_tensor(calib_data).long()
    if calib_data.dim() != 2 or calib_data.shape[1] < 2 or calib_data.shape[0] < 1:
        raise ValueError(f"calibration data of shape {tuple(calib_data.shape)}: need at least one sample of at "
                         f"least 2 tokens")
    return calib_data


def identity_like(values):
    """(R1, R2) as rotation_values() gives them, each rotation replaced by the identity of its size."""
    eye = [None if R is None else torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
           for R in (values[0], *(values[1] or []))]
    return eye[0], eye[1:] or None


# candidate_list's markers for rotations that choose() learns with S4 in the model (learn_with_s4)
LEARN_FROM_IDENTITY, LEARN_ON = "from identity", "on from identity"
HOLDOUT = 0.25  # share of the calibration samples held out to choose among the candidates (never learned on)


# a rotation is kept only when its held-out gain over no rotation is at least this many standard errors of the
# per-sample differences: the lowest of seven noisy scores is otherwise a rotation that validation can find worse
CLEAR_Z = 2.0


def paired_gain(base, other):
    """(mean of base - other, that mean in standard errors of the per-sample differences): how clearly `other`'s
    per-sample losses beat `base`'s on the same samples (+-inf when every difference is the same nonzero value, 0
    with one sample, which cannot tell)."""
    diff = (base - other).double()
    gain = diff.mean().item()
    if diff.numel() < 2:
        return gain, 0.0
    se = diff.std().item() / math.sqrt(diff.numel())
    if se == 0:
        return gain, math.copysign(math.inf, gain) if gain else 0.0
    return gain, gain / se


def family_threshold(diffs, level=CLEAR_Z, draws=4000, seed=0):
    """The standard errors a candidate must be below no rotation when the lowest of several is kept. `diffs`: (m, n),
    per held-out sample, no rotation's score minus each of m candidates'. The lowest of many noisy scores beats
    `level` by luck more often than one does, so the bar is the normal quantile of `level` (97.7% for 2) of the
    largest z over the m candidates when every sample's differences are flipped in sign at random, one flip a sample
    for all candidates so that their correlation is kept (Westfall and Young's max-T). One candidate, or m that
    move together: about `level`; m independent ones: the Sidak bar. Never below `level`."""
    d = diffs.double()
    m, n = d.shape
    if m == 0 or n < 2 or not math.isfinite(level):
        return level
    signs = torch.randint(0, 2, (draws, n), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    mean = signs @ d.T / n  # (draws, m); a flip leaves each candidate's sum of squares as it is
    var = ((d * d).sum(1) - n * mean * mean) / (n - 1)
    z = mean / (var.clamp_min(1e-300).sqrt() / math.sqrt(n))
    q = torch.distributions.Normal(0.0, 1.0).cdf(torch.tensor(level, dtype=torch.float64)).item()
    return max(level, torch.quantile(z.max(1).values, q).item())


def sample_losses(model, data, device, batch_size=16):
    """Mean cross-entropy per token of each of the (N, T + 1) samples `data` under `model`: a (N,) float64 tensor
    (the per-sample losses that paired_gain compares)."""
    out = []
    with torch.no_grad():
        for b in range(0, data.shape[0], batch_size):
            x = data[b:b + batch_size].to(device)
            logits = model(x[:, :-1], x[:, 1:])[0]
            out.append(F.cross_entropy(logits.transpose(1, 2).double(), x[:, 1:], reduction="none").mean(1).cpu())
    return torch.cat(out)


def sample_kl(model, reference, data, device, batch_size=8):
    """Mean KL divergence per token of `model`'s next-token distributions from `reference`'s (the full-precision
    model), KL(reference || model), for each of the (N, T + 1) samples `data`: a (N,) float64 tensor. Unlike the
    cross-entropy it needs no target token: a candidate's damage, read from every token of the vocabulary."""
    out, home = [], next(reference.parameters()).device  # the reference where it is (a user's model is not moved)
    with torch.no_grad():
        for b in range(0, data.shape[0], batch_size):
            x = data[b:b + batch_size].to(device)
            log_q = F.log_softmax(model(x[:, :-1], x[:, 1:])[0].float(), -1)
            r = x.to(home)
            log_p = F.log_softmax(reference(r[:, :-1], r[:, 1:])[0].float(), -1).to(log_q.device)
            out.append((log_p.exp() * (log_p - log_q)).sum(-1).double().mean(1).cpu())
    return torch.cat(out)


CHOOSE_BY = ("ce", "kl")  # what SpinQuant.choose scores candidates by on the held-out samples


def split_calibration(calib_data, holdout=HOLDOUT):
    """(learn, held out): the last max(1, round(holdout N)) of N calibration samples are held out; ValueError when
    fewer than 2 samples leave nothing to learn on or nothing to choose on."""
    data = calibration_batch(calib_data)
    n = data.shape[0]
    if n < 2:
        raise ValueError(f"{n} calibration sample: need at least 2 (a share is held out to choose the rotation)")
    k = min(n - 1, max(1, round(n * holdout)))
    return data[:n - k], data[n - k:]


class SpinQuant:
    """Rotate a full-precision GPT for W`bits` A`act_bits` KV`kv_bits` quantization (16: that part stays full
    precision), learn R1/R2, then quantize its weights with `method` (rtn, gptq or autoround).

    When the weights will be quantized by GPTQ or AutoRound, the rotations are learned against activation
    quantization only (the paper's recipe); with RTN, against the round-to-nearest weights too."""

    def __init__(self, model, bits=4, act_bits=4, kv_bits=4, group_size=0, sym=False, act_sym=False,
                 method="rtn", rotations=ROTATIONS, learn=("R1", "R2"), seed=0, device=None, act_quant=None,
                 weight_specs=None, dtype=torch.float32, fold=True, smooth=None, smooth_alpha=SMOOTH_ALPHAS,
                 smooth_norms=None, shift=None, gelu_shift=True, learn_with_s4=False):
        """`act_quant` (model.py's config dict) replaces the activation quantizers that act_bits/kv_bits describe,
        and `weight_specs` ({site: QuantSpec}) the weight quantizers of optimisation, as QAT needs. `dtype`: of
        the rotated model and the rotations (float64 to check exactness). `fold=False` (not with R1, which needs
        the fold): the norms stay LayerNorms, the model as it came (the no-rotation candidate). `smooth`: S4, one
        scale per block for mlp_down's input (gelu_output_scales), applied before R4 when both are on.
        `smooth_alpha`: the alpha of the S4 candidates of apply's choice, or several (smooth_scales picks one on
        held-out samples); None: no S4 candidates. `smooth_norms`: S1 and S2 at this alpha (norm_smooth_scales),
        taken by apply from the calibration samples in the rotated basis, before the weights are quantized.
        `shift`: one mean per block for mlp_down's input (gelu_output_means), subtracted online before S4's scale;
        mlp_down's bias holds W_down times it (a model without biases gets zero ones everywhere). `gelu_shift`: apply's
        choice also tries the shift under its S4 and R4 candidates, and keeps it for each where it scores lower
        (smooth_scales, r4_shift). `learn_with_s4` (with smooth_alpha and optimize(from_identity=True)): two more
        candidates whose R1/R2 apply's choice learns with S4 (and the shift, where picked) in the model, as optimize
        learned the others (its samples, steps and step choice): from the identity, and on from the rotations
        learned from it (the others are learned with R4 and get S4 in its place afterwards)."""
        if bits != FULL_BITS and not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits={bits}: expected {MIN_BITS}..{MAX_BITS}, or {FULL_BITS} for full-precision weights")
        if method not in WEIGHT_METHODS:
            raise ValueError(f"method={method}: expected one of {', '.join(WEIGHT_METHODS)}")
        unknown = set(rotations) - set(ROTATIONS)
        if unknown:
            raise ValueError(f"rotations={','.join(sorted(unknown))}: unknown; expected some of {','.join(ROTATIONS)}")
        cfg = model.config
        check_plain(asdict(cfg))
        C, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
        for rotation, width in (("R1", C), ("R2", hd), ("R3", hd), ("R4", 4 * C)):
            if rotation in rotations:
                hadamard_matrix(width)  # ValueError naming the width when there is no construction
        self.bits, self.method, self.group_size, self.sym = bits, method, group_size, sym
        self.spec = weight_spec(bits, group_size, sym) if bits != FULL_BITS else None
        self.weight_specs = weight_specs if weight_specs is not None else {site: self.spec for site in SITES}
        for width in (C, 4 * C) if self.spec is not None else ():
            if misfit(self.spec, width):
                raise ValueError(f"group_size={group_size}: {misfit(self.spec, width)}")
        self.device = device or next(model.parameters()).device
        self.rotations = tuple(rotations)
        self.smooth, self.smooth_choice, self.shift, self.means = smooth, None, shift, None
        self.gelu_shift, self.r4_choice = bool(gelu_shift), None
        if smooth_norms is not None and not 0.0 <= smooth_norms <= 1.0:
            raise ValueError(f"smooth_norms={smooth_norms}: must be in [0, 1], or None for no S1 and S2")
        self.smooth_norms, self.norm_scales = smooth_norms, None
        self.info = dict(bits=bits, act_bits=act_bits, kv_bits=kv_bits, group_size=group_size, sym=sym,
                         act_sym=act_sym, method=method, seed=seed, steps=0, rotations=",".join(
                             self.rotations + self.smoothings()))
        if not fold and "R1" in rotations:
            raise ValueError("fold=False: only without R1 (R1 needs the norms folded; R2-R4 do not)")
        if smooth_alpha is not None:
            alphas = tuple(smooth_alpha) if isinstance(smooth_alpha, (list, tuple)) else (smooth_alpha,)
            if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
                raise ValueError(f"smooth_alpha={smooth_alpha}: must be in [0, 1] (one or several), or None for no "
                                 f"S4 candidates")
            smooth_alpha = alphas
        self.smooth_alpha = smooth_alpha
        if smooth is not None and (len(smooth) != cfg.n_layer or any(t.shape != (4 * C,) for t in smooth)):
            raise ValueError(f"smooth: expected {cfg.n_layer} scales of {4 * C} channels (gelu_output_scales)")
        if shift is not None and (len(shift) != cfg.n_layer or any(t.shape != (4 * C,) for t in shift)):
            raise ValueError(f"shift: expected {cfg.n_layer} means of {4 * C} channels (gelu_output_means)")
        # fold in float64, apply the fixed rotations (R3, R4), keep `dtype` weights for optimisation
        folded = copy.deepcopy(model).to("cpu", torch.float64)
        folded = fold_norms(folded) if fold else folded
        if shift is not None and not folded.config.bias:  # the shift comes back through mlp_down's bias
            folded = with_biases(folded)
        fixed = dict(R3=hadamard_matrix(hd) if "R3" in rotations else None,
                     R4=hadamard_matrix(4 * C).t() if "R4" in rotations else None)
        state = folded.state_dict()
        for i, mean in enumerate(shift or []):  # the shift: the site subtracts the mean, mlp_down's bias adds W mean
            p = f"transformer.h.{i}.mlp."
            mean = mean.to(torch.float64)
            state[p + "mlp_down.bias"] = state[p + "mlp_down.bias"] + state[p + "mlp_down.weight"] @ mean
            state[p + "act.activation_output.transform.shift"] = mean
            state[p + "act.activation_output.transform.inv_scale"] = torch.ones_like(mean)
        for i, scale in enumerate(smooth or []):  # S4: W_down <- W_down diag(s), the site divides by s (before R4)
            p = f"transformer.h.{i}.mlp."
            state[p + "mlp_down.weight"] = state[p + "mlp_down.weight"] * scale.to(torch.float64)
            state[p + "act.activation_output.transform.inv_scale"] = 1.0 / scale.to(torch.float64)
        state = rotate_state(state, cfg, **fixed)
        if act_quant is None:
            act_quant = activation_quant(act_bits, kv_bits, act_sym)
        transform = ("shift_" if shift is not None else "") + ("scale_" if smooth is not None or shift is not None
                                                                 else "") + ("hadamard" if "R4" in rotations else "")
        config = {**asdict(folded.config), "act_quant": act_quant,
                  "online_transforms": {"mlp_activation_output": transform.strip("_")} if transform else {}}
        self.config = GPTConfig(**config)
        self.model = build_like(self.config, {k: v.to(dtype) for k, v in state.items()}).to(self.device).eval()
        self.base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        # R1 and R2 start from random Hadamard matrices (identity when that rotation is not asked for)
        g = torch.Generator().manual_seed(seed)

        def start(name, width):
            if name not in rotations:
                return None
            return random_hadamard_matrix(width, seed=int(torch.randint(0, 2**31, (1,), generator=g))).to(
                self.device, dtype).requires_grad_(name in learn)

        self.R1 = start("R1", C)
        self.R2 = [start("R2", hd) for _ in range(cfg.n_layer)] if "R2" in rotations else None
        self.losses, self.records, self.calibration = [], None, None
        # what apply's choice needs: the model as given, the options, the random start, held-out samples
        self.source, self.learn = model, tuple(learn)
        self.options = dict(bits=bits, act_bits=act_bits, kv_bits=kv_bits, group_size=group_size, sym=sym,
                            act_sym=act_sym, method=method, seed=seed, device=self.device, act_quant=act_quant,
                            weight_specs=weight_specs, dtype=dtype, gelu_shift=gelu_shift)
        self.learn_with_s4, self.learn_args = bool(learn_with_s4), None  # learn_args: optimize's, for those candidates
        self.start = self.rotation_values()
        self.heldout, self.heldout_steps, self.heldout_losses, self.candidates, self.choice = None, None, [], [], None
        # optimize(from_identity=True): R1/R2 learned from the identity, their losses, held-out losses
        self.learned_from_identity, self.identity_losses, self.identity_heldout_losses = None, [], []

    def smoothings(self):
        """The S names this instance applies: S1 and S2 with smooth_norms, S4 with smooth, "shift" with shift."""
        return ((("S1", "S2") if self.smooth_norms is not None else ()) + (("S4",) if self.smooth else ())
                + (("shift",) if self.shift else ()))

    def rotation_values(self):
        """Detached copies of (R1, R2)."""
        return (None if self.R1 is None else self.R1.detach().clone(),
                None if self.R2 is None else [R.detach().clone() for R in self.R2])

    def set_rotations(self, R1, R2):
        with torch.no_grad():
            if self.R1 is not None:
                self.R1.copy_(R1)
            for R, value in zip(self.R2 or [], R2 or []):
                R.copy_(value)

    @torch.no_grad()
    def sample_losses(self, data, model, batch_size=16):
        """Mean cross-entropy per token of each of the (N, T + 1) samples under `model`: a (N,) float64 tensor."""
        return sample_losses(model, data, self.device, batch_size)

    @torch.no_grad()
    def evaluate(self, data, quantize_weights=False, model=None, batch_size=16):
        """Mean cross-entropy per token over (N, T + 1) samples: of `model` (as it computes), or of the rotated
        model under the current rotations (weights fake-quantized with quantize_weights)."""
        total = 0.0
        for b in range(0, data.shape[0], batch_size):
            x = data[b:b + batch_size].to(self.device)
            if model is None:
                loss = self.loss(x[:, :-1], x[:, 1:], quantize_weights)
            else:
                loss = model(x[:, :-1], x[:, 1:])[1]
            total += loss.item() * x.shape[0]
        return total / data.shape[0]

    def rotated_state(self, quantize_weights=False):
        """The model's weights under the current R1 and R2 (differentiable); with quantize_weights, the linear
        sites' weights are fake-quantized (straight-through) with the weight spec."""
        state = rotate_state(self.base_state, self.config, R1=self.R1, R2=self.R2)
        if self.norm_scales is not None:
            state = smooth_norms_state(state, self.norm_scales)
        return self.quantized_state(state) if quantize_weights else state

    def quantized_state(self, state):
        """`state` with the linear sites' weights fake-quantized (straight-through) with their weight specs."""
        state = dict(state)
        for key in state:
            spec = self.weight_specs.get(key.split(".")[-2]) if key.endswith(".weight") else None
            if spec is not None:
                state[key] = fake_quant(state[key], spec)
        return state

    def loss(self, x, y, quantize_weights):
        return functional_call(self.model, self.rotated_state(quantize_weights), (x, y))[1]

    def learning_loss(self, x, y, quantize_weights, objective="ce"):
        """What the Cayley steps minimise: "ce", the quantized model's cross-entropy on the next tokens (the paper's),
        or "kl", its KL divergence from the full-precision model's next-token distribution (the same model with its
        quantizers off: a rotation leaves it unchanged), over every position."""
        if objective == "ce":
            return self.loss(x, y, quantize_weights)
        if objective != "kl":
            raise ValueError(f"objective={objective!r}: expected ce or kl")
        was = self.model.quantization_enabled
        with torch.no_grad():
            self.model.set_quantization(False)
            try:
                target = functional_call(self.model, self.rotated_state(False), (x, y))[0]
            finally:
                self.model.set_quantization(was)
        logits = functional_call(self.model, self.rotated_state(quantize_weights), (x, y))[0]
        vocab = logits.shape[-1]
        return F.kl_div(F.log_softmax(logits.float().reshape(-1, vocab), -1),
                        F.log_softmax(target.float().reshape(-1, vocab), -1), log_target=True, reduction="batchmean")

    def parameters(self):
        return [R for R in ([self.R1] + (self.R2 or [])) if R is not None and R.requires_grad]

    def optimize(self, calib_data, steps=100, lr=1.5, batch_size=8, seed=0, progress=True, holdout=HOLDOUT,
                 eval_every=0, learn_weights=None, heldout=None, from_identity=False, objective="ce"):
        """Learn R1 and R2 by Cayley SGD (cosine-decayed lr) on the cross-entropy of the quantized model over
        calibration samples (a list of (1, T) token tensors, or an (N, T) tensor); returns the loss per step.
        A `holdout` share of the samples (or the samples `heldout`, when given) is not learned on: the
        rotations are scored on its first half (self.heldout_steps) every `eval_every` steps (0: steps // 10) and
        the best ones are kept (step 0, the random start, included), and apply chooses among its candidates on
        the second half (self.heldout; both the same sample when there is only one). `learn_weights`:
        fake-quantize the weights (RTN) in the loss (None: only for method rtn; GPTQ and AutoRound learn against
        activation quantization only). `from_identity`: learn R1/R2 a second time, from the identity (no rotation),
        on the same samples and batches; the result (self.learned_from_identity) is one more candidate of apply's
        choice, and the rotations stay those learned from the random Hadamard start. Where a random Hadamard
        rotation quantizes worse than none (the small models here), learning from it rarely catches up.
        `objective`: what the steps minimise (learning_loss: "ce" or "kl"); held-out scoring is cross-entropy."""
        if steps < 0:
            raise ValueError(f"steps={steps}: must be 0 (keep the random Hadamard start) or more")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        if objective not in ("ce", "kl"):
            raise ValueError(f"objective={objective!r}: expected ce or kl")
        data = calibration_batch(calib_data)
        if data.shape[1] - 1 > self.config.block_size:
            raise ValueError(f"calibration samples of {data.shape[1]} tokens: longer than block_size + 1 "
                             f"({self.config.block_size + 1})")
        if heldout is not None:
            heldout = calibration_batch(heldout)
            if heldout.shape[1] != data.shape[1]:
                raise ValueError(f"held-out samples of {heldout.shape[1]} tokens: the calibration ones have "
                                 f"{data.shape[1]}")
        elif holdout:
            data, heldout = split_calibration(data, holdout)
        # the best step is chosen on one half of the held-out samples and apply's candidate on the other: scored on
        # the samples that picked its step, the learned rotation looked better than it was (on the H200 tables it
        # was kept twice where validation then found it worse than no rotation)
        steps_set = heldout
        if heldout is not None and heldout.shape[0] >= 2:
            steps_set, heldout = heldout[:heldout.shape[0] // 2], heldout[heldout.shape[0] // 2:]
        self.calibration, self.heldout, self.heldout_steps = data, heldout, steps_set
        quantize_weights = self.method == "rtn" if learn_weights is None else learn_weights
        if self.spec is None and not any(s is not None for s in self.weight_specs.values()):
            quantize_weights = False
        learn = dict(data=data, steps_set=steps_set if heldout is not None else None, steps=steps, lr=lr,
                     batch_size=batch_size, seed=seed, progress=progress, quantize_weights=quantize_weights,
                     eval_every=eval_every or max(1, steps // 10), objective=objective)
        self.learn_args = learn
        losses, self.heldout_losses, best_step = self._learn(**learn)
        self.losses += losses
        if best_step is not None:
            self.info["best_step"] = self.info["steps"] + best_step
        if from_identity and self.parameters():
            learned = self.rotation_values()
            self.set_rotations(*identity_like(learned))
            self.identity_losses, self.identity_heldout_losses, best_step = self._learn(**learn)
            self.learned_from_identity = self.rotation_values()
            self.info["identity_best_step"] = best_step
            self.set_rotations(*learned)
        self.info["steps"] = self.info["steps"] + steps
        return self.losses

    def _learn(self, data, steps_set, steps, lr, batch_size, seed, progress, quantize_weights, eval_every,
               objective="ce"):
        """optimize's Cayley SGD from the current rotations: (losses, [(step, held-out loss)], best step or None);
        the rotations end at the best held-out step (the start included) when steps_set is given."""
        params = self.parameters()
        best, held_losses, losses = None, [], []
        if steps_set is not None:
            best = (self.evaluate(steps_set, quantize_weights), 0, self.rotation_values())
            held_losses.append((0, best[0]))
        g = torch.Generator().manual_seed(seed)
        for step in tqdm(range(steps), desc="spinquant", unit="step", disable=not progress):
            batch = data[torch.randint(0, data.shape[0], (min(batch_size, data.shape[0]),), generator=g)]
            batch = batch.to(self.device)
            loss = self.learning_loss(batch[:, :-1], batch[:, 1:], quantize_weights, objective)
            grads = torch.autograd.grad(loss, params) if params else []
            step_lr = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
            with torch.no_grad():
                for R, G in zip(params, grads):
                    R.copy_(cayley_step(R, G, step_lr))
            losses.append(loss.item())
            if steps_set is not None and params and ((step + 1) % eval_every == 0 or step + 1 == steps):
                held = self.evaluate(steps_set, quantize_weights)
                held_losses.append((step + 1, held))
                if held < best[0]:
                    best = (held, step + 1, self.rotation_values())
        if best is not None:
            self.set_rotations(*best[2])
        return losses, held_losses, None if best is None else best[1]

    @torch.no_grad()
    def bake(self):
        """Put the rotated weights into self.model (full precision) and return it."""
        self.model.load_state_dict({k: v.detach() for k, v in self.rotated_state().items()})
        return self.model

    def apply(self, calib_data=None, nsamples=128, seed=0, progress=True, select=True, log=print, report=None,
              choose_by="ce", **method_options):
        """Bake the rotations in and quantize the weights with the method: {module name: QuantizedWeight}
        (empty at 16 bits). GPTQ and AutoRound calibrate on calib_data, or on optimize's calibration data.
        With `select` and held-out samples (optimize's), each candidate (no rotation; the folded norms alone; the
        fixed Hadamards R4 and R3+R4 alone; random Hadamard and learned rotations, each as R1 only, R1+R2 and all;
        with smooth_alpha the S4 and S1+S2+S4 ones, candidate_list)
        is quantized and scored on the held-out samples, `log` gets one
        line per candidate and one for the choice, and the best is kept (self.choice, self.candidates); the
        weight method then calibrates on optimize's learning samples only (calib_data is not used). `report`: a
        function of a model whose value each candidate's entry records (a study of the choice, e.g. the validation
        loss; never used to choose). `choose_by`: choose()'s score, "ce" or "kl"."""
        if select and self.heldout is not None:
            return self.choose(calib_data, nsamples, seed, log, report=report, choose_by=choose_by, progress=progress,
                               **method_options)
        data = calibration_batch(calib_data) if calib_data is not None else self.calibration
        if self.smooth_norms is not None:  # S1, S2 taken anew in the basis of the current rotations
            if data is None:
                raise ValueError("smooth_norms: S1 and S2 need calibration samples (pass calib_data, or call "
                                 "optimize first)")
            self.norm_scales = None
            self.norm_scales = norm_smooth_scales(self.bake(), data, self.smooth_norms)
        model = self.bake()
        if self.spec is None:
            self.records = {}
            return self.records
        if data is None and self.method != "rtn":
            raise ValueError(f"method={self.method} needs calibration data (pass calib_data, or call optimize first)")
        config = PTQConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, device=self.device, seed=seed,
                           progress=progress, log=(lambda line: None) if not progress else None, **method_options)
        if data is not None:
            config.nsamples, config.seqlen = min(nsamples, data.shape[0]), min(data.shape[1], model.config.block_size)
        self.records = make_quantizer(self.method, model, data, config).quantize()
        return self.records

    def candidate_list(self):
        """[(name, rotations, (R1, R2) or None for the random start, fold, smoothings)]: no rotation first (with GPTQ or
        AutoRound also no rotation with RTN, the baseline spinquant_ptq.py reports: a weight method can lose to it),
        the folded norms without rotation and the fixed Hadamards without R1 (R4, R3+R4: mlp_down's input and the K
        cache, the residual stream as it was), then per rotation set with R1 the random Hadamard start and the learned
        rotations (left out where learning changed nothing). All but the no-rotation ones fold the norms. With
        smooth_alpha, S4 takes R4's place in four more: S4 alone (unfolded), R3+S4, and the learned rotations of the
        largest set (from the random start and from the identity) with S4 for R4; and three with S1 and S2 besides
        (SMOOTHINGS): S1+S2+S4 alone (unfolded), R3+S1+S2+S4, and the rotations learned from the identity with
        them. With learn_with_s4, two whose rotations choose() learns with S4 in the model (LEARN_FROM_IDENTITY,
        LEARN_ON in place of the values)."""
        sets = []
        for names in (("R1",), ("R1", "R2"), self.rotations):
            names = tuple(r for r in ROTATIONS if r in names)
            if names and set(names) <= set(self.rotations) and names not in sets:
                sets.append(names)
        learned = self.rotation_values()
        changed = any(not torch.equal(a, b) for a, b in zip([learned[0], *(learned[1] or [])],
                                                               [self.start[0], *(self.start[1] or [])])
                      if a is not None)
        identity = self.learned_from_identity
        from_identity = identity is not None and any(
            not torch.equal(R, torch.eye(R.shape[0], dtype=R.dtype, device=R.device))
            for R in [identity[0], *(identity[1] or [])] if R is not None)
        out = [("no rotation", (), None, False, ())]
        if self.method != "rtn" and self.spec is not None:  # what the demo reports as "no rotation": RTN
            out.append(("no rotation, RTN", (), None, False, ()))
        out.append(("folded norms, no rotation", (), None, True, ()))
        for names in FIXED_SETS:
            if set(names) <= set(self.rotations):
                out.append((f"Hadamard {'+'.join(names)}", names, None, True, ()))
        for names in sets:
            label = "all" if names == ROTATIONS else "+".join(names)
            out.append((f"random Hadamard {label}", names, self.start, True, ()))
            if changed and {"R1", "R2"} & set(names):
                out.append((f"learned {label}", names, learned, True, ()))
            if from_identity and {"R1", "R2"} & set(names):
                out.append((f"learned from identity {label}", names, identity, True, ()))
        if self.smooth_alpha is not None:  # S4 in R4's place (on the small models R4 + S4 did worse than S4)
            out.append(("S4, no rotation", (), None, False, ("S4",)))
            out.append(("S1+S2+S4, no rotation", (), None, False, SMOOTHINGS))
            if "R3" in self.rotations:
                out.append(("Hadamard R3+S4", ("R3",), None, True, ("S4",)))
                out.append(("Hadamard R3+S1+S2+S4", ("R3",), None, True, SMOOTHINGS))
            names = tuple(r for r in sets[-1] if r != "R4") if sets else ()
            label = "+".join(names + ("S4",))
            if changed and {"R1", "R2"} & set(names):
                out.append((f"learned {label}", names, learned, True, ("S4",)))
            if from_identity and {"R1", "R2"} & set(names):
                out.append((f"learned from identity {label}", names, identity, True, ("S4",)))
                out.append((f"learned from identity {'+'.join(names + SMOOTHINGS)}", names, identity, True,
                             SMOOTHINGS))
                if self.learn_with_s4 and self.learn_args is not None:  # learned by choose(), S4 in the model
                    out.append((f"learned with S4 from identity {label}", names, LEARN_FROM_IDENTITY, True, ("S4",)))
                    out.append((f"learned from identity, then with S4, {label}", names, LEARN_ON, True, ("S4",)))
        return out

    def gelu_means(self):
        """The shift's means (gelu_output_means) from the learning samples (optimize's); computed once."""
        if self.means is None:
            if self.calibration is None:
                raise ValueError("the shift's means need calibration samples: call optimize first")
            self.means = gelu_output_means(self.source, self.calibration)
        return self.means

    def _pick_score(self, **kwargs):
        """The loss, on the held-out samples that chose the Cayley step, of the source with RTN weights and `kwargs`
        (S4's scales, the shift, R4): the score of smooth_scales' and r4_shift's picks."""
        sq = SpinQuant(self.source, **{**self.options, "method": "rtn", "seed": self.info["seed"], "fold": False,
                                       "rotations": (), **kwargs})
        sq.apply(progress=False, select=False)
        return self.evaluate(self.heldout_steps, model=sq.model)

    def smooth_scales(self, log=print):
        """(S4's scales, alpha, the shift's means or None) for the candidates, from the learning samples (optimize's);
        with several alphas, or with gelu_shift (each alpha also after the shift), the one whose S4 alone (no
        rotation, RTN weights) scores lowest on the held-out samples that chose the Cayley step, never on those the
        final choice is made on. Computed once."""
        if self.smooth_choice is None:
            if self.calibration is None:
                raise ValueError("S4's scales need calibration samples: call optimize first")
            options = [(alpha, shift) for shift in ((False, True) if self.gelu_shift else (False,))
                       for alpha in self.smooth_alpha]
            scored, by_alpha = [], {}  # each alpha's scales once, with and without the shift
            for alpha, shift in options:
                if alpha not in by_alpha:
                    by_alpha[alpha] = gelu_output_scales(self.source, self.calibration, alpha)
                scales = by_alpha[alpha]
                means = self.gelu_means() if shift else None
                loss = self._pick_score(smooth=scales, shift=means) if len(options) > 1 else math.inf
                scored.append((loss, alpha, scales, means))
            loss, alpha, scales, means = min(scored, key=lambda r: r[0])
            if len(scored) > 1:
                log("S4 alpha: " + ", ".join(f"{a:g}{'+shift' if m is not None else ''} {l:.4f}"
                                             for l, a, _, m in scored)
                    + f"; kept {alpha:g}{'+shift' if means is not None else ''} (S4 alone with RTN on the held-out "
                      f"samples that chose the Cayley step)")
            self.smooth_choice = (scales, alpha, means)
            self.info["smooth_alpha"] = alpha
        return self.smooth_choice

    def r4_shift(self, log=print):
        """The shift's means for the candidates with R4, or None: with gelu_shift, R4 alone (unfolded, RTN weights)
        without and with the shift, scored on the held-out samples that chose the Cayley step; the shift is kept
        where it scores lower. (A GELU output's channel means, rotated by the Hadamard, add up in one coordinate,
        which then sets every token's range.) Computed once."""
        if not self.gelu_shift:
            return None
        if self.r4_choice is None:
            if self.calibration is None:
                raise ValueError("R4's shift needs calibration samples: call optimize first")
            off = self._pick_score(rotations=("R4",))
            on = self._pick_score(rotations=("R4",), shift=self.gelu_means())
            log(f"R4 shift: off {off:.4f}, on {on:.4f}; kept {'on' if on < off else 'off'} (R4 alone with RTN on the "
                f"held-out samples that chose the Cayley step)")
            self.r4_choice = (on < off,)
        return self.gelu_means() if self.r4_choice[0] else None

    def choose(self, calib_data=None, nsamples=128, seed=0, log=print, report=None, choose_by="ce", progress=False,
               **method_options):
        """apply's choice: quantize every candidate and score it on the held-out samples; keep the lowest score among
        the unfolded no-rotation candidates and the others (folded, rotated) clearly below the better of those: by at
        least family_threshold's standard errors of the per-sample differences (paired_gain), CLEAR_Z for one
        candidate and more for many (self.choice["bar"]). `choose_by`: the score, "ce" (the held-out cross-entropy) or
        "kl" (the KL divergence from the full-precision model, sample_kl; the loss is scored too); with a `report`
        (a study) both are, and self.choice["by"] records what each would keep. GPTQ and AutoRound calibrate on
        optimize's learning samples, never on the held-out ones. The candidates' lines are logged once all are scored
        (their verdicts need the bar); `progress` shows a bar while they are."""
        if choose_by not in CHOOSE_BY:
            raise ValueError(f"choose_by={choose_by!r}: expected one of {', '.join(CHOOSE_BY)}")
        criteria = CHOOSE_BY if report is not None or choose_by == "kl" else ("ce",)  # the loss always
        data = self.calibration
        options = {**self.options, "seed": self.info["seed"]}
        # (name, sq, baseline, {criterion: per-sample scores}, {criterion: clear}); the best baseline per criterion
        scored, base, lines, entries = [], {}, [], []
        candidates = self.candidate_list()  # scored one by one (a bar with progress), printed once all are scored
        for name, rotations, values, fold, smoothings in tqdm(candidates, desc="candidates", disable=not progress):
            method = "rtn" if name == "no rotation, RTN" else self.method
            scales, shift = None, None
            if "S4" in smoothings:  # S4's scales (and the shift, where it was picked), from the learning samples
                scales, _, shift = self.smooth_scales(log)
            elif "R4" in rotations:
                shift = self.r4_shift(log)
            name += " + shift" if shift is not None else ""
            sq = SpinQuant(self.source, rotations=rotations, learn=self.learn, fold=fold, smooth=scales, shift=shift,
                           smooth_norms=NORM_SMOOTH_ALPHA if "S1" in smoothings else None,
                           **{**options, "method": method})
            if isinstance(values, str):  # learned now, with S4 (and the shift) in the model, as optimize learned
                start = self.learned_from_identity
                sq.set_rotations(*(identity_like(start) if values == LEARN_FROM_IDENTITY else start))
                sq._learn(**self.learn_args)
            elif values is not None:
                sq.set_rotations(*values)
            sq.calibration = self.calibration
            sq.apply(data, nsamples=nsamples, seed=seed, progress=False, select=False,
                     **(method_options if method == self.method else {}))
            scores = {c: self.sample_losses(self.heldout, sq.model) if c == "ce"
                      else sample_kl(sq.model, self.source, self.heldout, self.device) for c in criteria}
            loss = scores["ce"].mean().item()
            line = f"candidate {name}: held-out " + ", ".join(
                f"{'calibration loss' if c == 'ce' else 'KL from full precision'} {scores[c].mean().item():.4f}"
                for c in criteria)
            baseline = not fold and not smoothings
            entry = dict(name=name, heldout_loss=loss)
            if "kl" in scores:
                entry["heldout_kl"] = scores["kl"].mean().item()
            for c in criteria:
                if baseline and (c not in base or scores[c].mean() < base[c].mean()):
                    base[c] = scores[c]  # no rotation (with the weight method, and with RTN): what others must beat
            scored.append((name, sq, baseline, scores, {}))
            if report is not None:
                entry["report"] = report(sq.model)
            entries.append(entry)
            lines.append(line)
        # clear: each criterion's bar for the lowest of the rotated candidates (family_threshold), lines printed then
        bars = {c: family_threshold(torch.stack([base[c] - r[3][c] for r in scored if not r[2]]), CLEAR_Z)
                if any(not r[2] for r in scored) else CLEAR_Z for c in criteria}
        for (name, sq, baseline, scores, clear), entry, line in zip(scored, entries, lines):
            for c in criteria:
                clear[c] = baseline
                if not baseline:
                    gain, z = paired_gain(base[c], scores[c])
                    clear[c] = z >= bars[c]
                    prefix = "" if c == choose_by else f"{c}_"
                    entry.update({f"{prefix}gain": gain, f"{prefix}standard_errors": z})
                    if c == choose_by:
                        line += (f" (gain over no rotation {gain:+.4f}, {z:.1f} standard errors"
                                 f"{'' if clear[c] else ': not clearly better'})")
            entry["clear"] = clear[choose_by]
            self.candidates.append(entry)
            log(line)

        def lowest(c):  # the lowest of the candidates that clearly beat no rotation by c (ties: the earlier, simpler)
            return min((r for r in scored if r[4][c]), key=lambda r: r[3][c].mean().item())
        name, best, baseline, scores, _ = lowest(choose_by)
        loss = scores[choose_by].mean().item()
        for attr in ("model", "config", "records", "R1", "R2", "rotations", "base_state", "smooth", "smooth_norms",
                     "norm_scales", "shift"):
            setattr(self, attr, getattr(best, attr))
        none = base[choose_by].mean().item()
        what = "held-out calibration loss" if choose_by == "ce" else "held-out KL from full precision"
        if baseline:
            others = [r for r in scored if r[2] and r[0] != name]
            reason = (f"none of the others beat it by {bars[choose_by]:.2f} standard errors"
                      + (f"; {others[0][0]}: {others[0][3][choose_by].mean().item():.4f}" if others else ""))
        else:
            n_clear = sum(r[4][choose_by] for r in scored if not r[2])
            reason = (f"{100 * (none - loss) / none:.2f}% below no rotation ({none:.4f}); the lowest of the {n_clear} "
                      f"candidates {bars[choose_by]:.2f} or more standard errors below it")
        heldout_loss = scores["ce"].mean().item()
        self.choice = dict(name=name, heldout_loss=heldout_loss, reason=reason, choose_by=choose_by,
                           by={c: lowest(c)[0] for c in criteria}, bar=bars[choose_by], bars=bars)
        if choose_by == "kl":
            self.choice["heldout_kl"] = loss
        self.method = best.method
        self.info.update(rotations=",".join(best.rotations + best.smoothings()) or "none",
                         choice=name, heldout_loss=heldout_loss, choose_by=choose_by,
                         heldout_samples=self.heldout.shape[0], method=best.method)
        log(f"kept {name}: {what} {loss:.4f} ({len(scored)} candidates); {reason}")
        return self.records

    def checkpoint(self, base, extra_info=None):
        """A checkpoint dict: packed (quantization/packing.py) when the weights are quantized, else full precision;
        `base` gives the metadata (dataset, iter_num, ...) and its model_args are replaced by the rotated model's."""
        from quantization.packing import packed_checkpoint
        base = {**base, "model_args": asdict(self.config)}
        info = {"method": f"spinquant+{self.method}", **self.info, **(extra_info or {})}
        if self.records:
            return packed_checkpoint(base, self.model, self.records, info)
        keep = ("model_args", "dataset", "config", "iter_num", "best_val_loss")
        return {**{k: base[k] for k in keep if k in base}, "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "quantization_enabled": True, "spinquant": info}


def unrotated(model, act_bits, kv_bits, act_sym=False):
    """A copy of `model` with SpinQuant's activation quantizers and no rotation: the baseline it is measured against."""
    config = GPTConfig(**{**asdict(model.config), "act_quant": activation_quant(act_bits, kv_bits, act_sym)})
    return build_like(config, {k: v.detach() for k, v in model.state_dict().items()}).eval()
