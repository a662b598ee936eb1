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
from quantization.quantizers import QuantSpec, dequantize, quantize_tensor

SITES = tuple(LINEAR_SITES)


@dataclass
class QuantizedWeight:
    """One layer's quantized weight: codes in the layer's shape, scale and zero point per row of to_rows(spec)."""
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    spec: QuantSpec

    def dequantize(self):
        return dequantize(self.codes, self.scale, self.zero_point, self.spec)


def weight_spec(bits, group_size=0, sym=False):
    """The spec of a PTQ bit width: per group of `group_size` input columns, or per output channel when 0;
    symmetric (signed codes) or asymmetric (unsigned codes with a zero point)."""
    if group_size < 0:
        raise ValueError(f"group_size={group_size}: must be 0 (per channel) or a positive number of columns")
    return QuantSpec(method="symmetric_quant" if sym else "affine_quant", bits=bits,
                     granularity="per_group" if group_size else "per_channel", group_size=group_size)


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
        if spec.granularity == "per_group" and layer.in_features % spec.group_size:
            raise ValueError(f"group_size={spec.group_size}: does not divide the input width {layer.in_features} "
                             f"of {name}")


@torch.no_grad()
def set_quantized(layer, codes, scale, zero_point, spec):
    """Bake quantized values into a plain linear layer; returns the record packing.py saves."""
    record = QuantizedWeight(codes, scale, zero_point, spec)
    layer.weight.copy_(record.dequantize().to(layer.weight.dtype))
    return record


@torch.no_grad()
def rtn_quantize(model, spec, sites=SITES):
    """Round every target layer's weight to the nearest code: {module name: QuantizedWeight}."""
    layers = target_layers(model, sites)
    check_layers(layers, spec)
    return {name: set_quantized(layer, *quantize_tensor(layer.weight, spec), spec) for name, layer in layers.items()}
