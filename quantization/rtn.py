"""Round-to-nearest (RTN) weight quantization, the floor every PTQ method is compared against, and what the PTQ
methods share: which layers they quantize, the spec of a bit width, and the record a quantized layer leaves
(integer codes, scale, zero point), which packing.py saves.

Every method ends the same way: `set_quantized` puts dequantize(codes) into the layer's weight, so the model
computes with exactly the values its packed checkpoint will hold.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from model import LINEAR_SITES
from quantization.quantizers import QuantSpec, dense_and_sparse, dequantize, misfit, quantize_tensor, storage_bits

SITES = tuple(LINEAR_SITES)


@dataclass
class QuantizedWeight:
    """One layer's quantized weight: codes in the layer's shape, scale and zero point per row of to_rows(spec)."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec
    sparse: torch.Tensor = None  # dense-and-sparse: the full-precision outliers (zero elsewhere), fp16 values

    def dequantize(self):
        dense = dequantize(self.codes, self.scale, self.zero_point, self.spec)
        return dense if self.sparse is None else dense + self.sparse.to(dense.device)

    @property
    def outliers(self):
        return 0 if self.sparse is None else int(torch.count_nonzero(self.sparse))

    @property
    def bits(self):
        """Storage bits of the packed layer, outliers' indices and values included."""
        return storage_bits(self.spec, self.codes.shape, self.outliers)


def bits_per_weight(records):
    """Average storage bits per weight over a set of quantized layers."""
    return sum(r.bits for r in records.values()) / max(1, sum(r.codes.numel() for r in records.values()))


def weight_spec(bits, group_size=0, sym=False, outlier_fraction=0.0):
    """The spec of a PTQ bit width: per group of `group_size` input columns, or per output channel when 0;
    symmetric (signed codes) or asymmetric (unsigned codes with a zero point); a share of outliers kept apart."""
    if group_size < 0:
        raise ValueError(f"group_size={group_size}: must be 0 (per channel) or a positive number of columns")
    return QuantSpec(method="symmetric_quant" if sym else "affine_quant", bits=bits,
                     granularity="per_group" if group_size else "per_channel", group_size=group_size,
                     outlier_fraction=outlier_fraction)


def target_layers(model, sites=SITES):
    """{module name: linear} of the sites to quantize, in forward order (block by block)."""
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"sites={','.join(sorted(unknown))}: unknown; expected some of {','.join(SITES)}")
    layers = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in sites and isinstance(module, nn.Linear):
            if type(module).__name__ != "PlainLinear" and type(module) is not nn.Linear:
                raise ValueError(f"{name} is a {type(module).__name__}: the model is already quantized")
            layers[name] = module
    return layers


def check_layers(layers, spec):
    """A clear error when the group size does not divide a layer's input width."""
    for name, layer in layers.items():
        if misfit(spec, layer.in_features):
            raise ValueError(f"group_size={spec.group_size}: {misfit(spec, layer.in_features)} of {name}")


@torch.no_grad()
def set_quantized(layer, codes, scale, zero_point, spec, sparse=None):
    """Bake quantized values into a plain linear layer; returns the record packing.py saves. The outliers of
    `sparse` (if any) are stored as fp16, as the packed checkpoint holds them."""
    if sparse is not None:
        sparse = sparse.detach().to(torch.float16).float()
    record = QuantizedWeight(codes, scale, zero_point, spec, sparse if spec.outlier_fraction > 0 else None)
    layer.weight.copy_(record.dequantize().to(layer.weight.dtype))
    return record


def rtn_weight(weight, spec, act_scale=None):
    """codes, scale, zero_point and the sparse outliers (None without them) of one weight, rounded to nearest."""
    if spec.outlier_fraction > 0:
        return dense_and_sparse(weight, spec, act_scale)
    return (*quantize_tensor(weight, spec), None)


@torch.no_grad()
def rtn_quantize(model, spec, sites=SITES, act_scales=None):
    """Round every target layer's weight to the nearest code: {module name: QuantizedWeight}. `act_scales`
    ({module name: per-input-channel scale}) chooses outliers by sensitivity instead of magnitude."""
    layers = target_layers(model, sites)
    check_layers(layers, spec)
    act_scales = act_scales or {}
    records = {}
    for name, layer in layers.items():
        codes, scale, zero_point, sparse = rtn_weight(layer.weight, spec, act_scales.get(name))
        records[name] = set_quantized(layer, codes, scale, zero_point, spec, sparse)
    return records
