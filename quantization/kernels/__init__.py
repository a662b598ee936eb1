"""Packed low-bit inference: Triton kernels that multiply straight from packed codes, and the PackedLinear module
that holds them (docs/kernels.md).

    PackedLinear.from_record(checkpoint["packed_weights"][name], bias)   # a packed checkpoint's layer
    PackedLinear.from_float(weight, spec, bias)                           # round a float weight
    convert_to_packed(model, checkpoint["packed_weights"])                # every packed layer of a model
    pack_model(model, spec)                                               # every linear site, rounded
"""
from quantization.kernels.packed_linear import PackedLinear, convert_to_packed, pack_model

__all__ = ["PackedLinear", "convert_to_packed", "pack_model"]
