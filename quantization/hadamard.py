"""Hadamard matrices of every width this project meets (384, 768, 1536, 3072, powers of two, ...) and a fast
transform by them, for rotations (SpinQuant, QuaRot).

A width n is factored as m * 2^k, where m is 1 or q + 1 for a prime q = 3 (mod 4) (4, 8, 12, 20, 24, 32, 44, ...):
the order-m matrix comes from Paley's first construction, the order-2^k one from Sylvester's (Walsh-Hadamard), and
H_n = kron(H_m, H_2^k) / sqrt(n) is orthonormal. The fast transform applies the Walsh-Hadamard part by butterflies
(n log n additions) and the small order-m part as an (m x m) matmul, never forming the n x n matrix.
"""
import math

import torch
import torch.nn as nn


def _is_prime(q):
    return q >= 2 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def paley_hadamard(order):
    """The unnormalised (+-1) Hadamard matrix of `order` = q + 1, q a prime = 3 (mod 4), by Paley's first
    construction: I + [[0, 1^T], [-1, Q]], with Q the Jacobsthal matrix Q[i, j] = chi(j - i) of the quadratic
    character chi mod q."""
    q = order - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"order {order}: Paley's first construction needs order - 1 to be a prime = 3 (mod 4)")
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    S = torch.zeros(order, order, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    for i in range(q):
        for j in range(q):
            S[i + 1, j + 1] = chi[(j - i) % q]
    return S + torch.eye(order, dtype=torch.float64)


def sylvester_hadamard(order):
    """The unnormalised Walsh-Hadamard matrix of a power-of-two order (symmetric)."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < order:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    if H.shape[0] != order:
        raise ValueError(f"order {order} is not a power of two")
    return H


def factor(n):
    """(m, p) with n = m * p, p the largest power of two for which an order-m Hadamard matrix is constructed here
    (m = 1, or m - 1 a prime = 3 mod 4); ValueError when there is none."""
    p = 1 << ((n & -n).bit_length() - 1) if n > 0 else 0
    while p >= 1:
        m = n // p
        if m == 1 or (_is_prime(m - 1) and (m - 1) % 4 == 3):
            return m, p
        p //= 2
    raise ValueError(f"width {n} has no Hadamard construction here (it must be m * 2^k with m = 1 or m - 1 a prime "
                     f"= 3 mod 4, e.g. 384 = 12 * 32, 640 = 20 * 32)")


def hadamard_matrix(n, dtype=torch.float64):
    """The orthonormal n x n Hadamard matrix kron(H_m, H_p) / sqrt(n) that `hadamard_transform` applies."""
    m, p = factor(n)
    small = paley_hadamard(m) if m > 1 else torch.ones(1, 1, dtype=torch.float64)
    return (torch.kron(small, sylvester_hadamard(p)) / math.sqrt(n)).to(dtype)


def walsh_hadamard(x):
    """x @ H_p over the last dimension (p a power of two, H_p unnormalised Sylvester), by butterflies."""
    shape, p = x.shape, x.shape[-1]
    h = 1
    while h < p:
        y = x.reshape(-1, p // (2 * h), 2, h)
        x = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return x.reshape(shape)


def hadamard_transform(x, small=None):
    """x @ hadamard_matrix(n).T over the last dimension, in O(n log n + n m). `small` is the order-m factor
    (paley_hadamard(m) in x's dtype), passed in to avoid rebuilding it on every call."""
    n = x.shape[-1]
    m, p = factor(n)
    y = walsh_hadamard(x.reshape(*x.shape[:-1], m, p))  # rows of X (m x p) times H_p
    if m > 1:
        if small is None:
            small = paley_hadamard(m)
        y = torch.matmul(small.to(device=y.device, dtype=y.dtype), y)  # H_m X H_p^T = (x kron(H_m, H_p)^T)
    return y.reshape(x.shape) * (1.0 / math.sqrt(n))


def random_hadamard_matrix(n, seed=0, dtype=torch.float64):
    """A random orthogonal matrix with Hadamard structure (QuaRot): diag(random signs) @ H_n."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * hadamard_matrix(n)).to(dtype)


class HadamardTransform(nn.Module):
    """An online transform x -> x @ hadamard_matrix(n).T over the last dimension at an activation site (model.py's
    `online_transforms`); the weight that reads the site carries the inverse. The Paley factors of the usual widths
    are buffers, so that they follow the model to its device."""

    def __init__(self):
        super().__init__()
        for m in (12, 20):
            self.register_buffer(f"paley_{m}", paley_hadamard(m), persistent=False)

    def forward(self, x):
        m, _ = factor(x.shape[-1])
        return hadamard_transform(x, getattr(self, f"paley_{m}", None))
