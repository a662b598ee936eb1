"""PackedLinear: the inference module of a quantized linear layer. It holds the packed codes, scales, zero points
and bias (no float weight), and multiplies with the Triton kernels of this folder, or on the CPU (or without a
kernel for its layout) through the dequantize path x @ dequant(W).T + b."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from quantization.kernels import ops
from quantization.kernels.layout import dequantize_kernel_layout, record_codes, to_kernel_layout
from quantization.quantizers import quantize_tensor


class PackedLinear(nn.Module):

    def __init__(self, layout, bias=None):
        super().__init__()
        self.in_features, self.out_features = layout["in_features"], layout["out_features"]
        self.bits, self.group_size, self.zero_const = layout["bits"], layout["group_size"], layout["zero_const"]
        self.register_buffer("qweight", layout["qweight"])
        # the float32 scales are kept as their bits in an int32 buffer: model.to(torch.bfloat16) converts floating
        # buffers and would round them, while integer buffers only change device
        self.register_buffer("scale_bits", layout["scale"].float().contiguous().view(torch.int32))
        self.register_buffer("zero", layout["zero"])
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("sparse", None)  # dense-and-sparse weights: the full-precision outliers, CSR
        # split-K arrival counters of the one-row kernel (zero between calls; not saved). A buffer, so that it is
        # allocated when the module moves to the GPU, never inside a CUDA graph's memory pool
        self.register_buffer("split_counters", torch.zeros(-(-self.out_features // ops.BLOCK), dtype=torch.int32),
                             persistent=False)
        # a GELU applied to the output (F.gelu's `approximate`: "none" or "tanh"; None: no activation), by the kernel
        # that writes it where it can (inference.fuse_gelu: a decode step saves the GELU's own kernel)
        self.gelu = None
        # the normalization before the layer (fuse_norm) and the gain of the one after its residual add
        # (fuse_residual), for norm_forward and residual_forward; float32 kept as int32 bits, as the scales are
        self.norm_kind, self.norm_eps = 0, 0.0
        self.register_buffer("norm_in_bits", None, persistent=False)   # (2, in): the norm's gain and bias
        self.register_buffer("norm_out_bits", None, persistent=False)  # (2, out): W @ gain, bias + W @ norm bias
        self.register_buffer("next_gain_bits", None, persistent=False)  # (out,): the next norm's gain

    @classmethod
    def from_record(cls, record, bias=None):
        """From a packed checkpoint's record (checkpoint["packed_weights"][name], quantization/packing.py),
        its sparse outliers (if any) included."""
        layer = cls(to_kernel_layout(*record_codes(record)), bias)
        if "outliers" in record:
            from quantization.packing import packed_outliers
            layer.sparse = packed_outliers(record).to_sparse_csr()
        return layer

    @classmethod
    def from_float(cls, weight, spec, bias=None):
        """Quantize a float weight (out, in) with quantizers.quantize_tensor (round to nearest) under `spec`."""
        codes, scale, zero_point = quantize_tensor(weight.detach(), spec)
        return cls(to_kernel_layout(codes, scale, zero_point, spec), bias)

    @classmethod
    def concatenate(cls, layers):
        """One PackedLinear whose outputs are the layers' outputs side by side (the output dimension is the
        layout's contiguous one: codes, scales and zero points are joined along it), or None where the layers
        differ in bits, groups, input width, zero points or bias, or hold sparse outliers."""
        first = layers[0]
        same = {(layer.bits, layer.group_size, layer.in_features, layer.zero is None,
                 layer.zero_const if layer.zero is None else None, layer.bias is None, layer.sparse is None)
                for layer in layers}
        if len(same) > 1 or first.sparse is not None:
            return None

        def join(name):
            parts = [getattr(layer, name) for layer in layers]
            return None if parts[0] is None else torch.cat(parts, dim=-1)

        layout = dict(qweight=join("qweight"), scale=join("scale"), zero=join("zero"), zero_const=first.zero_const,
                      bits=first.bits, group_size=first.group_size, in_features=first.in_features,
                      out_features=sum(layer.out_features for layer in layers))
        return cls(layout, join("bias")).to(first.qweight.device)

    @property
    def scale(self):
        return self.scale_bits.view(torch.float32)

    def dequantized_weight(self):
        """The float32 weight (out, in), equal to quantizers.dequantize of the codes it was made from."""
        weight = dequantize_kernel_layout(self.qweight, self.scale, self.zero, self.zero_const, self.bits,
                                          self.group_size, self.in_features)
        return weight if self.sparse is None else weight + self.sparse.to_dense().float()

    def forward(self, x):
        refusal = ops.kernel_refusal(x, self.bits, self.group_size)
        fused = self.sparse is None and refusal is None  # the kernel applies the GELU (after the outliers: not it)
        if refusal is None:
            y = ops.matmul(x, self.qweight, self.scale, self.zero, self.bias, self.bits, self.group_size,
                           self.in_features, self.zero_const, self.split_counters,
                           ops.ACTIVATIONS[self.gelu] if fused else 0)
        else:
            ops.say_once(refusal)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            dense = dequantize_kernel_layout(self.qweight, self.scale, self.zero, self.zero_const, self.bits,
                                             self.group_size, self.in_features)
            y = F.linear(x, dense.to(x.dtype), bias)
        if self.sparse is not None:  # + x @ S^T, the outliers through torch.sparse
            outliers = torch.sparse.mm(self.sparse, x.reshape(-1, self.in_features).t().float()).t()
            y = y + outliers.to(y.dtype).reshape(y.shape)
        if self.gelu is not None and not fused:
            y = F.gelu(y, approximate=self.gelu)
        return y

    def fuse_norm(self, norm):
        """Take the normalization before this layer (an nn.LayerNorm or nn.RMSNorm over in_features) into the layer,
        for norm_forward. The layer's weights and forward do not change."""
        kind = 1 if isinstance(norm, nn.LayerNorm) else 2 if isinstance(norm, nn.RMSNorm) else 0
        if not kind or norm.normalized_shape != (self.in_features,):
            raise ValueError(f"fuse_norm takes a LayerNorm or RMSNorm over {self.in_features} inputs, not {norm}")
        weight = self.dequantized_weight().double()
        device = weight.device
        gain = torch.ones(self.in_features) if norm.weight is None else norm.weight.detach()
        gain = gain.to(device, torch.float64)
        shift = getattr(norm, "bias", None)
        shift = torch.zeros_like(gain) if shift is None else shift.detach().to(device, torch.float64)
        bias = weight @ shift + (0 if self.bias is None else self.bias.double())
        self.norm_kind = kind
        self.norm_eps = float(norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps)
        self.norm_in_bits = _bits(torch.stack([gain, shift]))
        self.norm_out_bits = _bits(torch.stack([weight @ gain, bias]))

    def fuse_residual(self, gain):
        """Let residual_forward also give u = output * gain (ops.norm_input_dtype): the input of the next layer's
        norm_forward, gain that norm's (out_features,) weight."""
        if gain.shape != (self.out_features,):
            raise ValueError(f"fuse_residual takes a gain of {self.out_features} values, not {tuple(gain.shape)}")
        self.next_gain_bits = _bits(gain.detach().to(self.qweight.device))

    def _kernel_ok(self, x):
        return self.sparse is None and ops.kernel_refusal(x, self.bits, self.group_size) is None

    def norm_forward(self, u, r):
        """self(norm(r)) (GELU included), norm the one fuse_norm took; u = r * its gain (ops.norm_input_dtype: what
        residual_forward gives). The one-row kernel computes it in one launch: the statistics of r in its epilogue."""
        if not self._kernel_ok(r):
            norm_in = self.norm_in_bits.view(torch.float32)
            if self.norm_kind == 1:
                h = F.layer_norm(r.float(), (self.in_features,), norm_in[0], norm_in[1], self.norm_eps)
            else:
                h = F.rms_norm(r.float(), (self.in_features,), norm_in[0], self.norm_eps)
            return self(h.to(r.dtype))
        wg, bias = self.norm_out_bits.view(torch.float32)
        return ops.norm_mm(u, r, self.qweight, self.scale, self.zero, bias, wg, self.bits, self.group_size,
                           self.in_features, self.zero_const, self.split_counters, ops.ACTIVATIONS[self.gelu],
                           self.norm_kind, self.norm_eps)

    def residual_forward(self, x, res):
        """(res + self(x) in res's dtype, that sum * the gain of fuse_residual in ops.norm_input_dtype), in one
        launch of the one-row kernel."""
        gain = self.next_gain_bits.view(torch.float32)
        if not self._kernel_ok(x) or self.gelu is not None:
            y = res + self(x).to(res.dtype)
            return y, (y.float() * gain).to(ops.norm_input_dtype(y.dtype))
        return ops.residual_mm(x, res, gain, self.qweight, self.scale, self.zero, self.bias, self.bits,
                               self.group_size, self.in_features, self.zero_const, self.split_counters)

    def extra_repr(self):
        groups = f"group {self.group_size}" if self.group_size else "per channel"
        gelu = "" if self.gelu is None else f", gelu={self.gelu}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {groups}{gelu}"


def _bits(t):
    """A float tensor as the int32 bits of its float32 values (a buffer that model.to(dtype) leaves alone)."""
    return t.float().contiguous().view(torch.int32)


def _replace(model, name, make):
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    linear = getattr(parent, attr)
    device = linear.bias.device if linear.bias is not None else next(linear.parameters()).device
    setattr(parent, attr, make(linear).to(device))


def _binary(layer):
    """A ResidualBinaryLinear with its Triton kernels attached where Triton is installed (one line where they
    cannot take its scale groups)."""
    if ops.triton_kernels is not None:
        from quantization.kernels import binary_bitwise
        if not binary_bitwise.attach(layer):
            group = layer.in_features // layer.terms[0].scale.shape[1]
            ops.note_once(f"residual binary scale groups of {group} inputs are not whole 32-bit words: no Triton "
                          f"kernel, those layers keep the bit operations")
    return layer


def convert_to_packed(model, packed_weights):
    """Replace each linear named in `packed_weights` (a packed checkpoint's "packed_weights") by a PackedLinear of
    its record, keeping the linear's bias. Load the checkpoint's "model" state first (strict=False). Returns model."""
    from quantization.binary_linear import ResidualBinaryLinear
    from quantization.quantizers import QuantSpec
    for name, record in packed_weights.items():
        if QuantSpec(**record["spec"]).grid == "residual_binary":  # k one-bit layers computed with bit operations
            codes, scale, _, spec = record_codes(record)
            _replace(model, name, lambda linear: _binary(ResidualBinaryLinear.from_quantized(codes, scale, spec,
                                                                                              linear.bias)))
        else:
            _replace(model, name, lambda linear: PackedLinear.from_record(record, linear.bias))
    return model


def pack_model(model, spec):
    """Round every linear site (model.LINEAR_SITES) of a float model to `spec` (a QuantSpec) and replace it by a
    PackedLinear (a residual-binary spec: by a ResidualBinaryLinear with its Triton kernels attached, as
    convert_to_packed loads one). Returns model."""
    from model import LINEAR_SITES
    from quantization.binary_linear import ResidualBinaryLinear
    from quantization.layers import latent_weight

    def make(linear):
        weight = latent_weight(linear)
        if spec.grid == "residual_binary":
            codes, scale, _ = quantize_tensor(weight.detach(), spec)
            return _binary(ResidualBinaryLinear.from_quantized(codes, scale, spec, linear.bias))
        return PackedLinear.from_float(weight, spec, linear.bias)
    names = [name for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in LINEAR_SITES and isinstance(module, nn.Linear)]
    for name in names:
        _replace(model, name, make)
    return model
