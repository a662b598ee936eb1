"""Residual binary weights at inference: W ~ a1*B1 + ... + ak*Bk (B in {-1,+1}) run as k one-bit linear layers
whose outputs are added. Each term keeps its signs packed 32 to an int32 word and computes x @ B^T from the bits,
never from a float copy of B:

    x @ B^T = 2 * (sum of x over the set bits) - sum(x)        (bit set: sign +1)

The sum over the set bits is a table look-up: each run of 8 inputs gets a table of its 256 subset sums, and the
bytes of the packed words, cut out by shift-and-mask, index it (as in LUT-GEMM, arXiv 2206.09557). This file is
the PyTorch (CPU) path and the reference of the Triton kernel in quantization/kernels/binary_bitwise.py.

    layer = ResidualBinaryLinear.from_quantized(codes, scale, spec, bias)   # codes/scale of quantize_tensor
    convert_model(model)   # every residual_binary_quant QuantizedLinear of a QAT model -> ResidualBinaryLinear
"""
import torch
import torch.nn as nn

from quantization.quantizers import QuantSpec, quantize_tensor

WORD_BITS = 32


def pack_signs(positive):
    """A (out, in) tensor of sign bits (nonzero: +1) -> (out, in/32) int32 words, bit j of word w being column
    32*w + j."""
    out_features, in_features = positive.shape
    if in_features % WORD_BITS:
        raise ValueError(f"input width {in_features} is not a multiple of {WORD_BITS}: signs pack 32 to a word")
    bits = (positive != 0).to(torch.int64).reshape(out_features, -1, WORD_BITS)
    words = (bits << torch.arange(WORD_BITS, device=bits.device)).sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement wrap


def unpack_signs(words):
    """The inverse of pack_signs, as {-1.0, +1.0} floats (for tests and plots; the forward pass never does this)."""
    bits = (words[..., None] >> torch.arange(WORD_BITS, device=words.device, dtype=torch.int32)) & 1
    return bits.reshape(words.shape[0], -1).float() * 2 - 1


def subset_sums(x):
    """(n, in) -> (n, in/8, 256): entry [r, g, v] is the sum of x[r, 8g + j] over the set bits j of v."""
    patterns = (torch.arange(256, device=x.device)[None, :] >> torch.arange(8, device=x.device)[:, None]) & 1
    return x.unflatten(-1, (-1, 8)) @ patterns.to(x.dtype)


def binary_matmul(x, words, scale):
    """x @ (scale-weighted B)^T for one term: x (n, in), words (out, in/32) int32, scale (out, groups) with the
    input width split into `groups` equal runs. Only integer shifts, masks and an index touch the weight."""
    out_features, groups = scale.shape
    n_words = words.shape[1]
    shifts = torch.arange(0, WORD_BITS, 8, dtype=torch.int32, device=words.device)  # the 4 bytes of a word
    # byte b of the input row lives at table column 256*b: offset each byte code by its position
    offsets = torch.arange(0, 4 * n_words * 256, 256, dtype=torch.int32, device=words.device).reshape(n_words, 4)
    index = (((words[..., None] >> shifts) & 0xFF) + offsets).reshape(-1)              # (out * in/8,) int32
    table = subset_sums(x)                                                             # (n, in/8, 256)
    set_sums = table.reshape(x.shape[0], -1).index_select(1, index)                    # (n, out * in/8)
    set_sums = set_sums.reshape(x.shape[0], out_features, groups, -1).sum(dim=-1)      # (n, out, groups)
    x_sums = x.unflatten(-1, (groups, -1)).sum(dim=-1)                                 # (n, groups)
    return ((2 * set_sums - x_sums[:, None, :]) * scale).sum(dim=-1)


class BinaryLinear(nn.Module):
    """A one-bit linear layer without bias: y = sum over groups g of scale[o, g] * (x_g @ B_g^T), B from packed
    sign bits."""

    def __init__(self, words, scale):
        super().__init__()
        if words.dtype != torch.int32 or words.dim() != 2 or scale.dim() != 2 or scale.shape[0] != words.shape[0]:
            raise ValueError(f"expected int32 words (out, in/32) and scales (out, groups); got {words.dtype} "
                             f"{list(words.shape)} and {list(scale.shape)}")
        in_features = words.shape[1] * WORD_BITS
        if in_features % scale.shape[1] or (in_features // scale.shape[1]) % 8:
            raise ValueError(f"{scale.shape[1]} scale groups do not split the input width {in_features} into runs "
                             f"of a multiple of 8")
        self.in_features, self.out_features = in_features, words.shape[0]
        self.register_buffer("words", words)
        self.register_buffer("scale", scale.float())

    def forward(self, x):
        shape = x.shape
        y = binary_matmul(x.reshape(-1, shape[-1]).float(), self.words, self.scale)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, groups={self.scale.shape[1]}"


def term_scales(scale, spec, out_features, in_features):
    """Scales of quantize_tensor (rows of to_rows(spec), terms) -> one (out, groups) tensor per term."""
    if spec.granularity == "per_tensor":
        return [scale[:, t:t + 1].expand(out_features, 1).contiguous() for t in range(scale.shape[1])]
    groups = in_features // spec.group_size if spec.granularity == "per_group" else 1
    return [scale.reshape(out_features, groups, -1)[..., t].contiguous() for t in range(scale.shape[1])]


class ResidualBinaryLinear(nn.Module):
    """k one-bit linear layers (`terms`) whose outputs are added, plus the bias."""

    def __init__(self, terms, bias=None):
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.in_features, self.out_features = terms[0].in_features, terms[0].out_features
        self.register_buffer("bias", bias)
        # gemv(x (rows, in), module) -> y (rows, out), or None where it cannot run: the kernels that
        # quantization.kernels attaches on loading (binary_bitwise.attach); None: the bit operations below
        self.gemv = None

    @classmethod
    def from_quantized(cls, codes, scale, spec: QuantSpec, bias=None):
        """From the codes and scales of quantize_tensor under a residual_binary_quant spec."""
        if spec.grid != "residual_binary":
            raise ValueError(f"method '{spec.method}' is not residual_binary_quant")
        if scale.dim() != 2 or scale.shape[1] != spec.binary_terms:
            raise ValueError(f"{scale.shape[-1] if scale.dim() else 0} terms stored, but the spec says "
                             f"binary_terms={spec.binary_terms}")
        codes = codes.to(torch.int64)
        out_features, in_features = codes.shape
        terms = [BinaryLinear(pack_signs((codes >> t) & 1), s)
                 for t, s in enumerate(term_scales(scale.float(), spec, out_features, in_features))]
        return cls(terms, None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear):
        """From a QuantizedLinear with a residual_binary_quant spec: its latent weight, quantized as the QAT
        forward pass does."""
        codes, scale, _ = quantize_tensor(linear.latent_weight.detach().float(), linear.spec)
        return cls.from_quantized(codes, scale, linear.spec, linear.bias)

    @classmethod
    def concatenate(cls, layers):
        """One layer whose outputs are the layers' outputs side by side (inference.fuse_qkv: q, k and v in one
        kernel call), or None where they differ in terms, input width, scale groups or bias. A term's words and
        scales are per output row, so joining them along the rows is exact; layers with the Triton kernels attached
        give the joined one the same kernels over its stacked terms."""
        first = layers[0]
        same = {(len(layer.terms), layer.in_features, layer.terms[0].scale.shape[1], layer.bias is None)
                for layer in layers}
        if len(same) > 1:
            return None
        terms = [BinaryLinear(torch.cat([layer.terms[t].words for layer in layers]),
                              torch.cat([layer.terms[t].scale for layer in layers])) for t in range(len(first.terms))]
        bias = None if first.bias is None else torch.cat([layer.bias for layer in layers])
        fused = cls(terms, bias)
        if first.gemv is not None and all(layer.gemv is first.gemv for layer in layers):
            fused.share_stacked(torch.stack([t.words for t in terms]), torch.stack([t.scale for t in terms]))
            fused.gemv = first.gemv
        return fused

    def share_stacked(self, words, scales):
        """Hold the terms' words and scales stacked, (terms, out, in/32) and (terms, out, groups), as buffers of this
        layer (not saved: the terms' own keys are), each term's being a view into them: the Triton kernels read
        all terms from one tensor, and the bits are held once. Kept shared through .to() and the like (_apply)."""
        self.register_buffer("stacked_words", words, persistent=False)
        self.register_buffer("stacked_scales", scales, persistent=False)
        self._link_terms()

    def _link_terms(self):
        for t, term in enumerate(self.terms):
            term._buffers["words"] = self.stacked_words[t]
            term._buffers["scale"] = self.stacked_scales[t]

    def _apply(self, fn, recurse=True):
        # each buffer is converted on its own, which would give every term a copy of its own: link them again
        super()._apply(fn, recurse)
        if getattr(self, "stacked_words", None) is not None:
            self._link_terms()
        return self

    def forward(self, x):
        y = self.gemv(x.reshape(-1, self.in_features), self) if self.gemv is not None else None
        if y is not None:  # through the attached kernels
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = self.terms[0](x)
            for term in self.terms[1:]:
                y = y + term(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"terms={len(self.terms)}" + (", Triton kernels" if self.gemv is not None else "")


@torch.no_grad()
def convert_model(model):
    """Replace, in place, every QuantizedLinear whose spec is residual_binary_quant by a ResidualBinaryLinear
    (same outputs, computed from packed bits); returns the names of the replaced modules."""
    from quantization.layers import QuantizedLinear
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear) and module.spec.grid == "residual_binary":
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ResidualBinaryLinear.from_linear(module).to(module.latent_weight.device))
            replaced.append(name)
    return replaced


def exported_graph(out_features=48, in_features=128, terms=2, seed=0):
    """torch.export of a random ResidualBinaryLinear at batch 1, as readable code (what docs/residual_binary.md
    shows)."""
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec("residual_binary_quant", binary_terms=terms)
    codes, scale, _ = quantize_tensor(torch.randn(out_features, in_features, generator=g), spec)
    module = ResidualBinaryLinear.from_quantized(codes, scale, spec)
    program = torch.export.export(module, (torch.randn(1, in_features, generator=g),))
    return program.graph_module.print_readable(print_output=False)
