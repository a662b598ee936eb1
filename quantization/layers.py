"""Layer variants for the linear sites of model.py, and the activation quantizer of its activation sites.

A new linear variant is one class and one line in LINEAR_VARIANTS; model.py asks `make_linear` for each site.
"""
import warnings

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from quantization.hadamard import HadamardTransform
from quantization.quantizers import QuantSpec, code_range, fake_quant, fake_quant_with_codes, misfit, smallest_int_dtype


class ChannelScale(nn.Module):
    """An online transform x -> x * inv_scale over the last dimension, one factor per channel; the layer that reads
    the site holds the scale in its input columns (W diag(s), inv_scale = 1 / s). SmoothQuant's move of a hard
    activation's range into the weight, at a site no offline scale passes through (the GELU output mlp_down
    reads). `inv_scale` is a buffer, saved with the model."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("inv_scale", torch.ones(width))

    def forward(self, x):
        return x * self.inv_scale.to(x.dtype)


class ScaledHadamard(ChannelScale):
    """x -> (x * inv_scale) H^T: the channel scale, then the Hadamard (the reader holds W diag(s) H^T)."""

    def __init__(self, width):
        super().__init__(width)
        self.hadamard = HadamardTransform()

    def forward(self, x):
        return self.hadamard(super().forward(x))


class ShiftedScale(ChannelScale):
    """x -> (x - shift) * inv_scale: a channel's mean taken out before its scale (Outlier Suppression+'s shift,
    arXiv 2304.09145), so that a channel which is on for every token no longer sets every token's range. The reader
    holds W diag(s) and adds W shift to its bias. `shift` is a buffer, saved with the model."""

    def __init__(self, width):
        super().__init__(width)
        self.register_buffer("shift", torch.zeros(width))

    def forward(self, x):
        return (x - self.shift.to(x.dtype)) * self.inv_scale.to(x.dtype)


class ShiftedScaledHadamard(ScaledHadamard, ShiftedScale):
    """x -> ((x - shift) * inv_scale) H^T: the shift and scale (ShiftedScale, next in the method order), then the
    Hadamard (ScaledHadamard's forward)."""


# online transforms an activation site can apply before its quantizer (GPTConfig.online_transforms): name ->
# (constructor of the site's width, whether it needs that width)
ONLINE_TRANSFORMS = {"hadamard": (lambda width: HadamardTransform(), False), "scale": (ChannelScale, True),
                     "scale_hadamard": (ScaledHadamard, True), "shift_scale": (ShiftedScale, True),
                     "shift_scale_hadamard": (ShiftedScaledHadamard, True)}


def make_transform(name, width=None):
    """The online transform `name` (ONLINE_TRANSFORMS) of a site `width` channels wide; ValueError naming it when it
    is unknown, or needs a width the site does not have."""
    if name not in ONLINE_TRANSFORMS:
        raise ValueError(f"online transform '{name}' is unknown; expected one of {', '.join(ONLINE_TRANSFORMS)}")
    build, needs_width = ONLINE_TRANSFORMS[name]
    if needs_width and not width:
        raise ValueError(f"online transform '{name}' holds one scale per channel: only at a site of known width "
                         "(attn_input, attn_output and the mlp_ sites)")
    return build(width)


class FakeQuantize(nn.Module):
    """A weight parametrization: the layer computes with fake_quant(weight) while the optimizer updates the
    full-precision latent weight (`parametrizations.weight.original`). Identity until switched on."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.enabled = True

    def forward(self, weight):
        if not self.enabled:
            return weight
        # one use of the parameter in the traced graph: under DDP + torch.compile, dynamo's DDPOptimizer counts a
        # parameter's bytes at every node that takes it, and would split the graph about 4x finer than DDP's buckets
        return fake_quant(weight.view(weight.shape), self.spec, self.training)


class QuantizedLinear(nn.Linear):
    """nn.Linear whose weight is fake-quantized in the forward pass (straight-through estimator backward)."""

    def __init__(self, in_features, out_features, bias=True, spec: QuantSpec = None):
        super().__init__(in_features, out_features, bias=bias)
        spec = spec or QuantSpec()
        if misfit(spec, in_features):
            raise ValueError(f"group_size={spec.group_size} {misfit(spec, in_features)}")
        # unsafe: skip the trial forward, which would draw random numbers (stochastic rounding) and shift the init
        parametrize.register_parametrization(self, "weight", FakeQuantize(spec), unsafe=True)

    @property
    def spec(self):
        return self.parametrizations.weight[0].spec

    @property
    def latent_weight(self):
        return self.parametrizations.weight.original


class PlainLinear(nn.Linear):
    """nn.Linear that accepts (and ignores) a quantization spec, so every variant is built the same way."""

    def __init__(self, in_features, out_features, bias=True, spec: QuantSpec = None):
        super().__init__(in_features, out_features, bias=bias)


LINEAR_VARIANTS = {
    "linear": PlainLinear,
    "quantized_linear": QuantizedLinear,
}


def make_linear(variant, in_features, out_features, bias, spec):
    if variant not in LINEAR_VARIANTS:
        raise ValueError(f"linear variant '{variant}' is unknown; expected one of {', '.join(LINEAR_VARIANTS)}")
    return LINEAR_VARIANTS[variant](in_features, out_features, bias=bias, spec=spec)


def latent_weight(linear):
    """The full-precision weight a layer trains, whatever its variant."""
    return linear.latent_weight if isinstance(linear, QuantizedLinear) else linear.weight


class ActQuant(nn.Module):
    """Fake-quantizes the activation passing a named site; the identity when the site is off (spec None) or
    while quantization is switched off (warm-up). With `store`, keeps the last quantized activation's integer
    codes, scale and zero point as buffers (saved with the checkpoint by train.py). A `transform` (a name in
    ONLINE_TRANSFORMS; `width`: the site's channels, for a transform with one scale per channel) is applied first,
    always: it is part of the function the model computes, not a quantizer."""

    def __init__(self, spec: QuantSpec = None, store=False, transform=None, width=None):
        super().__init__()
        self.transform = make_transform(transform, width) if transform else None
        self.spec = spec
        self.enabled = True
        self.store = store and spec is not None
        for name in ("codes", "scale", "zero_point"):
            self.register_buffer(name, None, persistent=False)

    @property
    def active(self):
        return self.spec is not None and self.enabled

    def forward(self, x):
        if self.transform is not None:
            x = self.transform(x)
        if not self.active:
            return x
        if not self.store:
            return fake_quant(x, self.spec, self.training)
        x_q, codes, scale, zero_point = fake_quant_with_codes(x, self.spec, self.training)
        self.codes, self.scale, self.zero_point = codes.detach(), scale, zero_point
        return x_q

    def extra_repr(self):
        return "off" if self.spec is None else f"{self.spec.method}, {self.spec.bits} bits, {self.spec.granularity}"


class DenseSparseLinear(nn.Module):
    """Inference with a dense-and-sparse weight: y = x @ D^T + x @ S^T + b, D the dequantized dense part and S the
    full-precision outliers as a torch.sparse CSR matrix (what a packed checkpoint stores)."""

    def __init__(self, dense_weight, sparse, bias=None):
        super().__init__()
        self.out_features, self.in_features = dense_weight.shape
        self.register_buffer("weight", dense_weight)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are covered by tests
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("sparse", sparse.to_sparse_csr())
        self.bias = bias

    def forward(self, x):
        y = nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        x2 = x.reshape(-1, self.in_features)
        outliers = torch.sparse.mm(self.sparse, x2.t().float()).t().to(y.dtype)
        return y + outliers.reshape(y.shape)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, outliers={self.sparse.values().numel()}"


def stored_activations(model):
    """{module name: {codes, scale, zero_point}} for every activation site that has stored one."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ActQuant) and module.codes is not None:
            qmin, qmax = code_range(module.spec)
            out[name] = {"codes": module.codes.to(smallest_int_dtype(qmin, qmax)).cpu(),
                         "scale": module.scale.cpu(), "zero_point": module.zero_point.cpu()}
    return out


def restore_activations(model, activations):
    modules = dict(model.named_modules())
    for name, saved in activations.items():
        if name in modules:
            module = modules[name]
            module.codes = saved["codes"].float()
            module.scale, module.zero_point = saved["scale"], saved["zero_point"]
