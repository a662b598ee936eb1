"""WrapperLinear: a linear layer whose weight is quantized on the fly with a learnable rounding offset V in
[-0.5, 0.5] (in units of the scale) and learnable factors on each group's minimum and maximum, in [0, 1]."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantization.quantizers import code_range, dequantize, qparams_from_range, quantize, to_rows


class WrapperLinear(nn.Module):

    def __init__(self, linear, spec, outliers=None):
        super().__init__()
        self.linear, self.spec = linear, spec
        # dense-and-sparse: the outliers stay full precision and out of the ranges; the dense part sees them as 0
        self.register_buffer("outliers", outliers)
        weight = self.dense_weight()
        rows = to_rows(weight, spec).float()
        self.register_buffer("row_min", rows.amin(dim=1, keepdim=True))
        self.register_buffer("row_max", rows.amax(dim=1, keepdim=True))
        self.value = nn.Parameter(torch.zeros_like(weight, dtype=torch.float32))  # V
        self.min_scale = nn.Parameter(torch.ones_like(self.row_min))
        self.max_scale = nn.Parameter(torch.ones_like(self.row_max))

    def dense_weight(self):
        weight = self.linear.weight.detach().float()
        return weight if self.outliers is None else torch.where(self.outliers, torch.zeros_like(weight), weight)

    def sparse_weight(self, dense):
        """The outliers as W - dequantized dense (zero elsewhere), or None without outliers."""
        if self.outliers is None:
            return None
        weight = self.linear.weight.detach().float()
        return torch.where(self.outliers, weight - dense.detach(), torch.zeros_like(weight))

    def qparams(self):
        return qparams_from_range(self.row_min * self.min_scale, self.row_max * self.max_scale, self.spec)

    def quantized_weight(self):
        """codes, scale, zero point and the dequantized weight (differentiable in V and the scale factors
        through a straight-through estimator; clipped codes pass no gradient, as clamp does)."""
        weight = self.dense_weight()
        scale, zero_point = self.qparams()
        offset = to_rows(self.value, self.spec) * scale  # V is in units of the scale
        shifted = weight + offset.reshape(weight.shape)
        codes = quantize(shifted.detach(), scale.detach(), zero_point, self.spec)
        qmin, qmax = code_range(self.spec)
        continuous = to_rows(shifted, self.spec) / scale + zero_point
        inside = (continuous.detach() >= qmin - 0.5) & (continuous.detach() <= qmax + 0.5)
        codes_ste = to_rows(codes, self.spec) + (continuous - continuous.detach()) * inside
        return codes, scale, zero_point, dequantize(codes_ste.reshape(weight.shape), scale, zero_point, self.spec)

    def forward(self, x):
        weight = self.quantized_weight()[3]
        if self.outliers is not None:
            weight = torch.where(self.outliers, self.linear.weight.detach().float(), weight)
        weight = weight.to(x.dtype)
        return F.linear(x, weight, self.linear.bias)

    @torch.no_grad()
    def clamp_(self):
        self.value.clamp_(-0.5, 0.5)
        self.min_scale.clamp_(0.0, 1.0)
        self.max_scale.clamp_(0.0, 1.0)
