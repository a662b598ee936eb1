"""The quantizer math against independent references: PyTorch's fake_quantize kernels, brute force over the grid,
the definitions of ternary and binary quantization, and statistics of stochastic rounding."""

import pytest
import torch

from quantization.quantizers import QuantSpec, code_range, compute_qparams, fake_quant, quantize_tensor, dequantize

BITS = range(2, 9)


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_per_tensor_matches_pytorch(bits):
    x = rand(16, 64, seed=bits)
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().max() / qmax).item()
    ref = torch.fake_quantize_per_tensor_affine(x, scale, 0, -qmax - 1, qmax)
    out = fake_quant(x, QuantSpec("symmetric_quant", bits, "per_tensor"))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_per_channel_matches_pytorch(bits):
    x = rand(16, 64, seed=10 + bits)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=1) / qmax
    ref = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(16, dtype=torch.int32), 0, -qmax - 1, qmax)
    out = fake_quant(x, QuantSpec("symmetric_quant", bits, "per_channel"))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("bits", BITS)
def test_affine_per_tensor_matches_pytorch(bits):
    x = rand(16, 64, seed=20 + bits) + 0.7  # off-centre, so the zero point matters
    qmax = 2 ** bits - 1
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = torch.tensor((hi - lo) / qmax).item()
    zero_point = int(min(max(-round(lo / scale), 0), qmax))
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, qmax)
    out = fake_quant(x, QuantSpec("affine_quant", bits, "per_tensor"))
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", BITS)
def test_affine_per_channel_matches_pytorch(bits):
    x = rand(16, 64, seed=30 + bits) + torch.linspace(-2, 2, 16)[:, None]
    qmax = 2 ** bits - 1
    lo, hi = x.amin(dim=1).clamp(max=0), x.amax(dim=1).clamp(min=0)
    scale = (hi - lo) / qmax
    zero_point = torch.clamp(-torch.round(lo / scale), 0, qmax).to(torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, 0, qmax)
    out = fake_quant(x, QuantSpec("affine_quant", bits, "per_channel"))
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["symmetric_quant", "affine_quant"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_per_group_is_nearest_grid_point(method, bits):
    """Brute force in float64: every value lands on the grid point of its group nearest to it."""
    group = 16
    x = rand(8, 64, seed=bits).double()
    spec = QuantSpec(method, bits, "per_group", group_size=group)
    out = fake_quant(x.float(), spec).double()
    qmin, qmax = code_range(spec)
    rows = x.reshape(-1, group)
    for r, row in enumerate(rows):
        if method == "symmetric_quant":
            scale, zp = row.abs().max() / qmax, 0.0
        else:
            lo, hi = min(row.min(), 0.0), max(row.max(), 0.0)
            scale = (hi - lo) / (qmax - qmin)
            zp = min(max(qmin - round(float(lo / scale)), qmin), qmax)
        grid = (torch.arange(qmin, qmax + 1, dtype=torch.float64) - zp) * scale
        nearest = grid[(row[:, None] - grid[None, :]).abs().argmin(dim=1)]
        got = out.reshape(-1, group)[r]
        # equal up to float32 rounding; a tie may go either way, so accept any grid point equally near
        tol = 1e-6 * row.abs().max() + 1e-5 * scale  # float32 arithmetic against float64
        dist_got = (row - got).abs()
        dist_best = (row - nearest).abs()
        assert torch.all(dist_got <= dist_best + tol), f"row {r}: not the nearest grid point"
        assert torch.all((got[:, None] - grid[None, :]).abs().min(dim=1).values < tol), "off the grid"


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_ternary_is_absmean_times_minus_one_zero_one(granularity):
    x = rand(8, 32, seed=3)
    out = fake_quant(x, QuantSpec("ternary_quant", granularity=granularity))
    dims = (0, 1) if granularity == "per_tensor" else (1,)
    gamma = x.double().abs().mean(dim=dims, keepdim=True)
    expected = torch.clamp(torch.round(x.double() / gamma), -1, 1) * gamma
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert all(len(torch.unique(row.abs()[row != 0])) <= 1 for row in (out if granularity == "per_channel" else out.reshape(1, -1)))


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_binary_is_sign_times_mean_abs(granularity):
    x = rand(8, 32, seed=4)
    out = fake_quant(x, QuantSpec("binary_quant", granularity=granularity))
    dims = (0, 1) if granularity == "per_tensor" else (1,)
    alpha = x.double().abs().mean(dim=dims, keepdim=True)
    expected = torch.where(x >= 0, 1.0, -1.0).double() * alpha
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert (out != 0).all()


@pytest.mark.parametrize("grid", ["symmetric", "affine"])
def test_stochastic_rounding_hits_only_neighbours_and_is_unbiased(grid):
    torch.manual_seed(0)
    spec = QuantSpec("stochastic_quant", 3, "per_tensor", stochastic_grid=grid)
    x = rand(4, 64, seed=5)
    scale, zp = compute_qparams(x, spec)
    draws = 4000
    samples = torch.stack([fake_quant(x, spec, training=True) for _ in range(draws)])
    y = x / scale + zp  # position on the grid in units of the step
    codes = samples / scale + zp
    lower, upper = torch.floor(y), torch.ceil(y)
    on_neighbour = (codes - lower).abs() < 1e-3
    on_neighbour |= (codes - upper).abs() < 1e-3
    assert on_neighbour.all(), "stochastic rounding returned a value that is not a neighbouring grid point"
    # unbiased: the mean code equals y; each draw is Bernoulli(frac), so the std of the mean is sqrt(p(1-p)/n).
    # (An affine grid's integer zero point can leave the extreme values up to half a step outside the grid;
    # those are clipped, so unbiasedness holds for values inside [qmin, qmax].)
    qmin, qmax = code_range(spec)
    inside = (y >= qmin) & (y <= qmax)
    assert inside.float().mean() > 0.9
    frac = y - lower
    bound = 5 * torch.sqrt(frac * (1 - frac) / draws) + 1e-4
    assert ((codes.mean(dim=0) - y).abs() <= bound)[inside].all()
    # and it really is random: some value with a fractional part is rounded both ways
    assert ((codes.amax(0) - codes.amin(0)) > 0.5).any()


def test_stochastic_rounds_to_nearest_in_eval():
    x = rand(4, 64, seed=6)
    a = fake_quant(x, QuantSpec("stochastic_quant", 4, "per_channel"), training=False)
    b = fake_quant(x, QuantSpec("symmetric_quant", 4, "per_channel"))
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["symmetric_quant", "affine_quant", "ternary_quant"])
def test_straight_through_gradient_is_identity_inside_and_zero_outside(method):
    spec = QuantSpec(method, 4, "per_tensor")
    x = rand(4, 64, seed=7)
    # put a few values far outside the range the quantizer's scale was computed from: compute the scale on
    # the bulk, then check the mask against the clipping range derived by hand
    x = x.clone().requires_grad_(True)
    out = fake_quant(x, spec, training=True)
    upstream = torch.randn_like(x)
    out.backward(upstream)
    scale, zp = compute_qparams(x.detach(), spec)
    qmin, qmax = code_range(spec)
    pos = x.detach() / scale + zp
    inside = (pos >= qmin - 0.5) & (pos <= qmax + 0.5)
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    if method == "ternary_quant":  # absmean scale clips the large weights: some gradient must be blocked
        assert (~inside).any()


def test_straight_through_blocks_clipped_values():
    """With a scale fixed from part of the data (as for an activation range), values beyond it get no gradient."""
    spec = QuantSpec("symmetric_quant", 4, "per_channel")
    w = torch.tensor([[0.1, -0.2, 0.3, 1.0], [0.5, 0.25, -0.5, 0.0]], requires_grad=True)
    out = fake_quant(w, spec, training=True)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # absmax scaling: nothing is clipped
    # binary passes every gradient
    w2 = w.detach().clone().requires_grad_(True)
    fake_quant(w2, QuantSpec("binary_quant"), training=True).sum().backward()
    assert torch.equal(w2.grad, torch.ones_like(w2))


def test_codes_dequantize_to_fake_quant():
    x = rand(8, 32, seed=8)
    spec = QuantSpec("affine_quant", 4, "per_group", group_size=8)
    codes, scale, zp = quantize_tensor(x, spec)
    qmin, qmax = code_range(spec)
    assert codes.min() >= qmin and codes.max() <= qmax and torch.equal(codes, codes.round())
    assert torch.equal(dequantize(codes, scale, zp, spec), fake_quant(x, spec))


@pytest.mark.parametrize("clip", [0.75, 0.6])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_clipped_affine_per_token_matches_pytorch(bits, clip):
    """clip_ratio: each token's range is its min and max times the ratio (widened to include 0), so the values
    past it saturate at the ends of the grid; PyTorch's kernel with that range is the reference."""
    x = rand(16, 64, seed=40 + bits) + torch.linspace(-1, 1, 16)[:, None]
    qmax = 2 ** bits - 1
    lo, hi = (x.double().amin(dim=1) * clip).clamp(max=0), (x.double().amax(dim=1) * clip).clamp(min=0)
    scale = ((hi - lo) / qmax).float()
    zero_point = torch.clamp(-torch.round(lo / scale.double()), 0, qmax).to(torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, 0, qmax)
    out = fake_quant(x, QuantSpec("affine_quant", bits, "per_token", clip_ratio=clip))
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    top, bottom = ((qmax - zero_point) * scale)[:, None], (-zero_point * scale)[:, None]  # the grid's ends
    saturated = (x > top + scale[:, None]) | (x < bottom - scale[:, None])
    assert saturated.any()  # the ratio clipped values a step or more past the ends: they sit at the ends
    assert torch.allclose(out[saturated], torch.where(x > 0, top, bottom)[saturated], atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [3, 4])
def test_clipped_symmetric_per_channel_matches_pytorch(bits):
    x = rand(16, 64, seed=50 + bits)
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(dim=1) * 0.8 / qmax
    ref = torch.fake_quantize_per_channel_affine(x, scale, torch.zeros(16, dtype=torch.int32), 0, -qmax - 1, qmax)
    assert torch.allclose(fake_quant(x, QuantSpec("symmetric_quant", bits, "per_channel", clip_ratio=0.8)), ref,
                          atol=1e-6, rtol=0)


@pytest.mark.parametrize("fields,message", [
    (dict(bits=9), "bits=9 is out of range"),
    (dict(bits=1), "bits=1 is out of range"),
    (dict(method="fancy_quant"), "method 'fancy_quant' is unknown"),
    (dict(granularity="per_group", group_size=0), "group_size=0 must be > 0"),
    (dict(clip_ratio=0.0), "clip_ratio=0.0 is out of range"),
    (dict(clip_ratio=1.5), "clip_ratio=1.5 is out of range"),
    (dict(method="ternary_quant", clip_ratio=0.9), "only the min/max grids"),
])
def test_bad_specs_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**fields)


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match="does not divide"):
        fake_quant(torch.randn(4, 30), QuantSpec(granularity="per_group", group_size=8))
