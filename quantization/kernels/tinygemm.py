"""PyTorch's own int4 kernel as a peer for the benchmarks: `torch.ops.aten._weight_int4pack_mm` over a weight
packed by `torch.ops.aten._convert_weight_to_int4pack` (tinygemm, the kernel gpt-fast and torchao's int4
weight-only run), fed the same RTN grid as a 4-bit group-wise PackedLinear.

tinygemm's value of a code q (0-15) is (q - 8) * s + z, s and z bfloat16 per (group, output). A PackedLinear's is
(q - zero) * scale, so s = scale and z = (8 - zero) * scale: the same codes and grid, with the scale and the
offset rounded to bfloat16 (tinygemm keeps no float32 scales).

    TinyGemmLinear.from_packed(packed_linear)   # or raises TinyGemmUnsupported with the reason
    tinygemm_model(model)                       # every 4-bit group-wise PackedLinear of a model
"""
import torch
import torch.nn as nn

from quantization.kernels.layout import unpack_kernel_codes


class TinyGemmUnsupported(RuntimeError):
    """tinygemm cannot run this layer on this machine (the reason is the message)."""


def tinygemm_refusal(device, bits, group_size, in_features, out_features):
    """Why tinygemm cannot take this layer here (None: it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"tinygemm runs on CUDA only (not {device.type})"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return f"torch {torch.__version__} has no aten._weight_int4pack_mm"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"tinygemm needs compute capability 8.0 or newer (this GPU: {major}.{minor})"
    if bits != 4 or not group_size:
        return f"tinygemm takes 4-bit group-wise weights (not {bits}-bit, group {group_size or 'per channel'})"
    if group_size not in (32, 64, 128, 256):
        return f"tinygemm takes groups of 32, 64, 128 or 256 (not {group_size})"
    if in_features % 32 or out_features % 8:
        return f"tinygemm needs in % 32 == 0 and out % 8 == 0 (layer {out_features} x {in_features})"
    return None


def _inner_k_tiles(in_features):
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


class TinyGemmLinear(nn.Module):

    def __init__(self, weight, scales_and_zeros, group_size, in_features, out_features, bias=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)

    @classmethod
    def from_packed(cls, layer):
        """The PackedLinear's codes, scales and zero points in tinygemm's layout (on the layer's device)."""
        device = layer.qweight.device
        reason = tinygemm_refusal(device, layer.bits, layer.group_size, layer.in_features, layer.out_features)
        if reason is None and layer.sparse is not None:
            reason = "tinygemm has no sparse outlier term"
        if reason:
            raise TinyGemmUnsupported(reason)
        codes = unpack_kernel_codes(layer.qweight, 4, layer.in_features).to(torch.int32)  # (N, K), 0-15
        nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # two codes a byte, even code high
        weight = torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), _inner_k_tiles(layer.in_features))
        scale = layer.scale.float()  # (groups, N)
        zero = layer.zero.float() if layer.zero is not None else torch.full_like(scale, layer.zero_const)
        scales_and_zeros = torch.stack((scale, (8 - zero) * scale), dim=-1).to(torch.bfloat16).contiguous()
        bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
        return cls(weight, scales_and_zeros, layer.group_size, layer.in_features, layer.out_features, bias)

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.weight, self.group_size,
                                               self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self):
        """The float32 weight (out, in) tinygemm multiplies by: its codes at bf16 scales and offsets."""
        eye = torch.eye(self.in_features, device=self.weight.device, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm(eye, self.weight, self.group_size,
                                                  self.scales_and_zeros).float().t()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, 4 bits, group {self.group_size}"


def tinygemm_model(model):
    """Replace every PackedLinear of a model by a TinyGemmLinear of the same codes. Raises TinyGemmUnsupported
    (with the first layer's reason) before changing anything if any layer cannot be converted. Returns model."""
    from quantization.kernels.packed_linear import PackedLinear
    names = [name for name, module in model.named_modules() if isinstance(module, PackedLinear)]
    converted = {name: TinyGemmLinear.from_packed(model.get_submodule(name)) for name in names}
    for name, layer in converted.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, layer)
    return model
