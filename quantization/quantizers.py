"""The quantization math, in one place: every other part of nanoQAT (QAT layers, activation quantizers,
PTQ methods, saving, plots) calls these functions rather than rounding on its own.

A tensor is quantized over "rows" of a 2-D view chosen by the granularity: the whole tensor is one row
(per_tensor), each output channel is a row (per_channel), each run of `group_size` input columns is a row
(per_group), or each token's feature vector is a row (per_token, for activations). A scale and a zero point
are computed per row, so every method handles every granularity the same way.
"""
from dataclasses import dataclass

import torch

METHODS = ("symmetric_quant", "affine_quant", "stochastic_quant", "ternary_quant", "binary_quant",
           "residual_binary_quant")
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
MIN_BITS, MAX_BITS = 2, 8
MAX_BINARY_TERMS = 4
_EPS = 1e-8
MAX_OUTLIER_FRACTION = 0.5


@dataclass(frozen=True)
class QuantSpec:
    """What to do to one tensor: which method, how many bits, and over which rows the range is taken."""
    method: str = "symmetric_quant"
    bits: int = 8
    granularity: str = "per_channel"
    group_size: int = 0
    stochastic_grid: str = "symmetric"  # the grid stochastic_quant rounds onto: "symmetric" or "affine"
    fp16_scale: bool = False  # scales rounded to float16, as GGUF's blocks store them (an exact GGUF export)
    binary_terms: int = 2  # residual_binary_quant: W ~ sum of this many scaled sign matrices
    outlier_fraction: float = 0.0  # share of a weight's entries kept in full precision (dense-and-sparse)
    # min/max grids: the range of a row is its min and max times this (QuaRot's and SpinQuant's activation and
    # K/V clipping: below 1, the few largest values saturate and every other value gets a finer step)
    clip_ratio: float = 1.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is unknown; expected one of {', '.join(METHODS)}")
        if not (MIN_BITS <= self.bits <= MAX_BITS):
            raise ValueError(f"bits={self.bits} is out of range; expected {MIN_BITS}..{MAX_BITS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity '{self.granularity}' is unknown; expected one of {', '.join(GRANULARITIES)}")
        if self.granularity == "per_group" and self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be > 0 when granularity is per_group")
        if self.stochastic_grid not in ("symmetric", "affine"):
            raise ValueError(f"stochastic_grid '{self.stochastic_grid}' is unknown; expected symmetric or affine")
        if not (1 <= self.binary_terms <= MAX_BINARY_TERMS):
            raise ValueError(f"binary_terms={self.binary_terms} is out of range; expected 1..{MAX_BINARY_TERMS}")
        if not 0.0 <= self.outlier_fraction < MAX_OUTLIER_FRACTION:
            raise ValueError(f"outlier_fraction={self.outlier_fraction} is out of range; expected a fraction in "
                             f"[0, {MAX_OUTLIER_FRACTION})")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio={self.clip_ratio} is out of range; expected a fraction in (0, 1]")
        if self.clip_ratio != 1.0 and self.grid not in ("symmetric", "affine"):
            raise ValueError(f"clip_ratio={self.clip_ratio}: only the min/max grids (symmetric, affine) take a "
                             f"clipping ratio; {self.method} has none")

    @property
    def grid(self):
        """'symmetric' (signed codes, zero point 0), 'affine' (unsigned codes with a zero point),
        'ternary'/'binary' (codes in {-1,0,1} or {-1,1}), or 'residual_binary' (bit i of a code is the sign of
        term i: 1 for +1, 0 for -1)."""
        if self.method == "symmetric_quant":
            return "symmetric"
        if self.method == "affine_quant":
            return "affine"
        if self.method == "stochastic_quant":
            return self.stochastic_grid
        if self.method == "residual_binary_quant":
            return "residual_binary"
        return self.method.split("_")[0]

    @property
    def effective_bits(self):
        return {"ternary": 2, "binary": 1, "residual_binary": self.binary_terms}.get(self.grid, self.bits)


def code_range(spec):
    """(qmin, qmax): the integer codes a spec can produce."""
    grid = spec.grid
    if grid == "symmetric":
        return -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
    if grid == "affine":
        return 0, (1 << spec.bits) - 1
    if grid == "residual_binary":
        return 0, (1 << spec.binary_terms) - 1
    return -1, 1


def code_bits(spec):
    """Bits one stored code takes: the spec's bits, or one per term of residual binary."""
    return spec.binary_terms if spec.grid == "residual_binary" else spec.bits


def misfit(spec, width):
    """Why `spec` cannot quantize a layer of `width` input columns, or None: the one check every layer, config,
    method and format makes (a group must tile the row)."""
    if spec.granularity == "per_group" and width % spec.group_size:
        return f"does not divide the input width {width}"
    return None


def to_rows(x, spec):
    """A 2-D view of x whose rows each get one scale and zero point."""
    if spec.granularity == "per_tensor":
        return x.reshape(1, -1)
    if spec.granularity == "per_token":
        return x.reshape(-1, x.shape[-1])
    if spec.granularity == "per_channel":
        return x.reshape(x.shape[0], -1)
    if misfit(spec, x.shape[-1]):
        raise ValueError(f"group_size={spec.group_size} {misfit(spec, x.shape[-1])}")
    return x.reshape(-1, spec.group_size)


def compute_qparams(x, spec):
    """Scale and zero point for each row of `to_rows(x, spec)`, shaped (rows, 1). No gradient flows through them."""
    rows = to_rows(x.detach(), spec).float()
    if spec.grid in ("symmetric", "affine"):
        lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
        if spec.clip_ratio != 1.0:
            lo, hi = lo * spec.clip_ratio, hi * spec.clip_ratio
        return qparams_from_range(lo, hi, spec)
    if spec.grid == "residual_binary":
        return residual_binary_scales(rows, spec.binary_terms)
    # ternary (BitNet b1.58: absmean) and binary (mean absolute value)
    scale = rows.abs().mean(dim=1, keepdim=True)
    return _fp16_scale(scale.clamp(min=_EPS), spec), torch.zeros_like(scale)


def _fp16_scale(scale, spec):
    """The scale rounded to float16 when the spec asks for it (the gradient passes straight through)."""
    if not spec.fp16_scale:
        return scale
    return scale + (scale.half().float() - scale).detach()


def qparams_from_range(lo, hi, spec):
    """Scale and zero point for rows whose range is [lo, hi] (each shaped (rows, 1)). The scale keeps its
    gradient, so PTQ methods can learn the range (AutoRound's min/max scale factors); the zero point is an
    integer, with no gradient. The affine range is widened to include 0, so that 0 is exact."""
    qmin, qmax = code_range(spec)
    if spec.grid == "symmetric":
        scale = _fp16_scale(torch.maximum(lo.abs(), hi.abs()) / qmax, spec)
        zero_point = torch.zeros_like(scale).detach()
    elif spec.grid == "affine":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = _fp16_scale((hi - lo) / (qmax - qmin), spec)
        zero_point = torch.clamp(qmin - torch.round(lo.detach() / scale.detach().clamp(min=_EPS)), qmin, qmax)
    else:
        raise ValueError(f"method '{spec.method}' has no min/max range; expected symmetric_quant or affine_quant")
    return scale.clamp(min=_EPS), zero_point


def residual_binary_scales(rows, terms):
    """BiLLM's residual binarization (arXiv 2402.04291, eq. 6-7), greedy: term i is sign(r) times mean|r| of what
    the terms before it left over (r starts as the row). Scales shaped (rows, terms), zero points (rows, 1)."""
    residual, scales = rows, []
    for _ in range(terms):
        scale = residual.abs().mean(dim=1, keepdim=True).clamp(min=_EPS)
        residual = residual - scale * torch.where(residual >= 0, 1.0, -1.0)
        scales.append(scale)
    return torch.cat(scales, dim=1), torch.zeros_like(scales[0])


def residual_binary_codes(rows, scale):
    """Codes of rows under given residual-binary scales: bit i is 1 where term i's sign is +1."""
    residual, codes = rows, torch.zeros_like(rows, dtype=torch.int64)
    for i in range(scale.shape[1]):
        positive = residual >= 0
        residual = residual - scale[:, i:i + 1] * torch.where(positive, 1.0, -1.0)
        codes = codes | (positive.to(torch.int64) << i)
    return codes


def residual_binary_signs(codes, terms):
    """The {-1, +1} sign matrix of each term of residual-binary codes: a list of `terms` tensors of codes' shape."""
    codes = codes.to(torch.int64)
    return [((codes >> i) & 1) * 2.0 - 1.0 for i in range(terms)]


def quantize(x, scale, zero_point, spec, stochastic=False):
    """Integer codes (as floats, in x's shape) for x under the given row-wise scale and zero point.
    With `stochastic`, values round up with probability equal to their fractional part (unbiased)."""
    rows = to_rows(x, spec).float()
    qmin, qmax = code_range(spec)
    if spec.grid == "binary":
        codes = torch.where(rows >= 0, 1.0, -1.0)
    elif spec.grid == "residual_binary":
        codes = residual_binary_codes(rows, scale).float()
    else:
        y = rows * (1.0 / scale)  # multiply by the reciprocal, as PyTorch's fake_quantize kernels do
        y = torch.floor(y + torch.rand_like(y)) if stochastic else torch.round(y)
        codes = torch.clamp(y + zero_point, qmin, qmax)
    return codes.reshape(x.shape)


def dequantize(codes, scale, zero_point, spec):
    """Real values of integer codes: (codes - zero_point) * scale, row by row (residual binary: the sum over terms i
    of scale[:, i] times the sign in bit i)."""
    rows = to_rows(codes, spec)
    if spec.grid == "residual_binary":
        signs = residual_binary_signs(rows, spec.binary_terms)
        return sum(sign * scale[:, i:i + 1].float() for i, sign in enumerate(signs)).reshape(codes.shape)
    return ((rows.float() - zero_point) * scale).reshape(codes.shape)


def quantize_tensor(x, spec, stochastic=False):
    """codes, scale, zero_point for x; what a saved model stores."""
    scale, zero_point = compute_qparams(x, spec)
    return quantize(x, scale, zero_point, spec, stochastic), scale, zero_point


def fake_quant(x, spec, training=False):
    """Quantize then dequantize x, with a straight-through estimator for the gradient: identity inside the
    representable range, zero outside it (values that were clipped get no gradient)."""
    return fake_quant_with_codes(x, spec, training)[0]


def fake_quant_with_codes(x, spec, training=False):
    """fake_quant, also returning the codes, scale and zero point it computed with. With an outlier_fraction,
    the outliers (largest magnitudes, chosen anew at every call) pass in full precision, gradient included, and
    the codes are those of the dense rest (see dense_and_sparse)."""
    if spec.outlier_fraction > 0:
        mask = outlier_mask(x, spec.outlier_fraction)
        x_q, codes, scale, zero_point = _fake_quant_dense(torch.where(mask, torch.zeros_like(x), x), spec, training)
        return torch.where(mask, x, x_q), codes, scale, zero_point
    return _fake_quant_dense(x, spec, training)


def _fake_quant_dense(x, spec, training):
    stochastic = training and spec.method == "stochastic_quant"
    scale, zero_point = compute_qparams(x, spec)
    codes = quantize(x, scale, zero_point, spec, stochastic)
    x_q = dequantize(codes, scale, zero_point, spec).to(x.dtype)
    if not x.requires_grad:
        return x_q, codes, scale, zero_point
    # the forward value is exactly x_q (x - x is exactly 0), so a saved model dequantizes to what training used
    if spec.grid in ("binary", "residual_binary"):  # sign() clips nothing: every value passes its gradient
        return x_q + (x - x.detach()), codes, scale, zero_point
    qmin, qmax = code_range(spec)
    unclipped = to_rows(x.detach(), spec).float() * (1.0 / scale) + zero_point
    inside = ((unclipped >= qmin - 0.5) & (unclipped <= qmax + 0.5)).reshape(x.shape)
    x_pass = torch.where(inside, x, x.detach())
    return x_q + (x_pass - x_pass.detach()), codes, scale, zero_point


# ---------------------------------------------------------------------------------------------------------------
# dense-and-sparse weights (SqueezeLLM, SpQR): W = Q(W - S) + S, S a few weights kept in full precision

def outlier_count(numel, fraction):
    """How many of `numel` entries a fraction keeps as outliers."""
    return int(round(fraction * numel))


def outlier_mask(weight, fraction, act_scale=None):
    """Boolean mask of exactly outlier_count(numel, fraction) entries of a (out, in) weight: the largest |w|, or,
    given `act_scale` (one per input channel, from calibration), the largest |w| * act_scale (sensitivity)."""
    score = weight.detach().abs().float()
    if act_scale is not None:
        score = score * act_scale.detach().float().reshape(1, -1).to(score.device)
    k = outlier_count(score.numel(), fraction)
    flat = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        flat[torch.topk(score.reshape(-1), k, sorted=False).indices] = True
    return flat.reshape(weight.shape)


def dense_and_sparse(weight, spec, act_scale=None, mask=None):
    """Split a weight into its quantized dense part and its sparse full-precision part:
    (codes, scale, zero_point of W with the outliers set to 0, S), where S is a dense-shaped float32 tensor that is
    zero except at the outliers, where it holds W - dequantized dense, so that dequantize + S equals W there exactly
    (S = W there whenever the grid holds 0, as every grid but binary does)."""
    weight = weight.detach().float()
    if mask is None:
        mask = outlier_mask(weight, spec.outlier_fraction, act_scale)
    codes, scale, zero_point = quantize_tensor(torch.where(mask, torch.zeros_like(weight), weight), spec)
    sparse = torch.where(mask, weight - dequantize(codes, scale, zero_point, spec), torch.zeros_like(weight))
    return codes, scale, zero_point, sparse


def index_bits(in_features):
    """Bits of one CSR column index: int16 while the columns fit, else int32."""
    return 16 if in_features <= 1 << 15 else 32


def storage_bits(spec, shape, n_outliers=0):
    """Bits a packed weight of `shape` takes: codes, a float32 scale and an integer zero point per row, and the
    sparse outliers in CSR (int32 row pointers, int16/int32 column indices, fp16 values)."""
    numel = 1
    for d in shape:
        numel *= d
    rows = {"per_tensor": 1, "per_channel": shape[0]}.get(spec.granularity, numel // max(spec.group_size, 1))
    qmin, qmax = code_range(spec)
    zero_bits = torch.iinfo(smallest_int_dtype(qmin, qmax)).bits
    sparse = 32 * (shape[0] + 1) + n_outliers * (index_bits(shape[-1]) + 16) if n_outliers else 0
    return numel * spec.effective_bits + rows * (32 + zero_bits) + sparse


def smallest_int_dtype(qmin, qmax):
    """The narrowest torch integer dtype that holds [qmin, qmax]."""
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    return torch.int64
