"""The kernels' layout of a quantized weight, converted from quantizers.py's codes (or a packed checkpoint's
record), and its exact inverse in PyTorch (the CPU fallback and the tests use it).

A weight of shape (N out, K in) becomes:
- `qweight`: int32, shape (K_pad / 32 * BITS, N). The input dimension is cut into blocks of 32 codes (K padded
  with zero codes to K_pad, a multiple of 32); each block is BITS words, one row of N words each, so that a row
  of the tensor is contiguous along N (the threads of a kernel load neighbouring outputs: coalesced loads).
  For BITS in 1, 2, 4, 8 word w of a block holds codes w*P .. w*P+P-1 of it (P = 32 / BITS), code i in bits
  i*BITS .. i*BITS+BITS-1 (least significant first). 3-bit blocks are a 2-bit plane (words 0 and 1: the low two
  bits of codes 0-15 and 16-31) and a 1-bit plane (word 2: the high bit of codes 0-31): 3 bits per weight, and
  every field lies inside one word.
- `scale`: float32, shape (groups, N); `zero`: uint8, shape (groups, N), or one constant for the whole weight
  (symmetric, ternary, binary). groups = K / group_size, or 1 per output channel.
The value of a weight is (code - zero) * scale, in float32, which is exactly quantizers.dequantize's
(codes - zero_point) * scale: code - zero is the same small integer. Binary codes are one bit b with zero 1/2 and
scale 2s: (b - 1/2) * 2s = +-s exactly.
"""
import torch

from quantization.quantizers import QuantSpec, code_bits, code_range

BLOCK = 32            # codes along the input dimension per block of BITS words
KERNEL_BITS = (1, 2, 3, 4, 8)


def storage_bits(spec):
    """Bits per code in the kernel layout: the spec's own width, 5 to 7-bit codes in 8-bit fields."""
    bits = spec.effective_bits
    return bits if bits in KERNEL_BITS else 8


def _words(codes, bits):
    """Unsigned codes (N, K_pad) -> int32 words (N, K_pad * bits / 32), code i of a word at bit i * bits."""
    per_word = 32 // bits
    n = codes.shape[0]
    fields = codes.reshape(n, -1, per_word) << (torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits)
    words = fields.sum(dim=-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _fields(words, bits):
    """The inverse of _words: int32 words (N, W) -> unsigned codes (N, W * 32 / bits) as int64."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits
    return ((words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)


def pack_kernel_codes(codes, bits):
    """Unsigned codes (N, K) -> qweight (K_pad / 32 * bits, N) int32."""
    n, k = codes.shape
    codes = torch.nn.functional.pad(codes.to(torch.int64), (0, -k % BLOCK))
    if bits == 3:
        low, high = _words(codes & 3, 2), _words(codes >> 2, 1)
        words = torch.stack((low[:, 0::2], low[:, 1::2], high), dim=2).reshape(n, -1)
    else:
        words = _words(codes, bits)
    return words.t().contiguous()


def unpack_kernel_codes(qweight, bits, in_features):
    """The inverse of pack_kernel_codes: unsigned codes (N, K) as int64."""
    words = qweight.t()
    n = words.shape[0]
    if bits == 3:
        blocks = words.reshape(n, -1, 3)
        low = _fields(blocks[:, :, :2].reshape(n, -1), 2)
        codes = low | (_fields(blocks[:, :, 2].contiguous(), 1) << 2)
    else:
        codes = _fields(words, bits)
    return codes[:, :in_features]


def to_kernel_layout(codes, scale, zero_point, spec):
    """quantize_tensor's (codes, scale, zero_point) of a (N, K) weight -> the kernels' tensors and constants:
    dict(qweight, scale, zero (uint8 tensor or None), zero_const, bits, group_size (0: one group per row),
    in_features, out_features)."""
    n, k = codes.shape
    qmin, _ = code_range(spec)
    rows = scale.numel()
    scale = scale.detach().float().reshape(-1).to(codes.device)
    zero_point = zero_point.detach().float().reshape(-1).to(codes.device)
    if spec.granularity == "per_group":
        groups, group_size = k // spec.group_size, spec.group_size
    else:  # per channel (and per token, the same rows for a weight) or one row for the whole tensor
        groups, group_size = 1, 0
    if rows not in (1, n * groups):
        raise ValueError(f"{rows} scales do not fit a {n}x{k} weight of granularity {spec.granularity}")
    codes = codes.detach().to(torch.int64)
    if spec.grid == "binary":
        unsigned, zero, scale = (codes + 1) // 2, torch.full_like(zero_point, 0.5), 2 * scale
    else:
        unsigned, zero = codes - qmin, zero_point - qmin
    # (N * groups,) row order n-major -> (groups, N), so that a kernel loads neighbouring outputs together
    scale = scale.expand(n * groups).reshape(n, groups).t().contiguous()
    zero = zero.expand(n * groups).reshape(n, groups).t().contiguous()
    bits = storage_bits(spec)
    constant = bool((zero == zero.reshape(-1)[0]).all())
    return dict(qweight=pack_kernel_codes(unsigned, bits), scale=scale,
                zero=None if constant else zero.to(torch.uint8), zero_const=float(zero.reshape(-1)[0]) if constant else 0.0,
                bits=bits, group_size=group_size, in_features=k, out_features=n)


def dequantize_kernel_layout(qweight, scale, zero, zero_const, bits, group_size, in_features):
    """The float32 weight (N, K) of the kernel layout: (code - zero) * scale, as quantizers.dequantize."""
    codes = unpack_kernel_codes(qweight, bits, in_features).float()
    repeat = group_size or in_features
    scale = scale.t().repeat_interleave(repeat, dim=1)
    zero = zero.t().float().repeat_interleave(repeat, dim=1) if zero is not None else zero_const
    return (codes - zero) * scale


def record_codes(record):
    """A packed checkpoint record (quantization/packing.py, nanoqat-packed-v1) -> (codes, scale, zero_point, spec),
    codes in the spec's signed range as quantizers.quantize returns them."""
    from quantization.packing import FORMAT, unpack_codes
    spec = QuantSpec(**record["spec"])
    qmin, _ = code_range(spec)
    shape = record["shape"]
    if len(shape) != 2:
        raise ValueError(f"a packed weight of shape {shape} is not a linear weight (expected 2 dimensions, {FORMAT})")
    codes = unpack_codes(record["codes"].cpu(), code_bits(spec), shape[0] * shape[1]).reshape(shape) + qmin
    return codes, record["scale"].float(), record["zero_point"].float(), spec
