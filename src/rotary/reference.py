"""Plain, obviously-correct float64 implementations used as the oracle by the tests.

Nothing here is fast or clever: every rotation is built as an explicit dense matrix and applied with einsum,
so that the fast paths in :mod:`rotary.functional` and :mod:`rotary.mixing` are checked against code that
shares none of their tricks (complex views, in-place updates, index gathers, sparse plane updates).

Shapes: B batch, T sequence, H heads, D head_dim, r rotary_dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "apply_rotary_reference",
    "givens_matrix_reference",
    "orthogonal_matrix_reference",
    "quaternion_matrix_reference",
    "rope_matrices_reference",
    "rotary_reference",
]


def _pairs(rotary_dim: int, interleaved: bool) -> list[tuple[int, int]]:
    half = rotary_dim // 2
    if interleaved:
        return [(2 * i, 2 * i + 1) for i in range(half)]
    return [(i, i + half) for i in range(half)]


def rope_matrices_reference(cos: Tensor, sin: Tensor, head_dim: int, *, interleaved: bool = True) -> Tensor:
    """Dense RoPE rotations ``R``: cos/sin ``(..., r/2)`` -> ``(..., D, D)`` float64; channels past r untouched."""
    cos, sin = cos.double(), sin.double()
    rotary_dim = 2 * cos.shape[-1]
    R = torch.eye(head_dim, dtype=torch.float64, device=cos.device).expand(*cos.shape[:-1], head_dim, head_dim).clone()
    for i, (p, q) in enumerate(_pairs(rotary_dim, interleaved)):
        c, s = cos[..., i], sin[..., i]
        R[..., p, p] = c
        R[..., p, q] = -s
        R[..., q, p] = s
        R[..., q, q] = c
    return R


def apply_rotary_reference(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = True) -> Tensor:
    """Reference for :func:`rotary.apply_rotary`: x ``(B, T, H, D)``, cos/sin ``(T, r/2)`` or ``(B, T, r/2)``."""
    R = rope_matrices_reference(cos, sin, x.shape[-1], interleaved=interleaved)
    if R.dim() == 3:  # (T, D, D): same rotation for every batch row
        R = R.unsqueeze(0).expand(x.shape[0], -1, -1, -1)
    return torch.einsum("btde,bthe->bthd", R, x.double())


def rotary_reference(
    x: Tensor,
    positions: Tensor,
    *,
    base: float = 10000.0,
    rotary_dim: int | None = None,
    interleaved: bool = True,
    mixing: Tensor | None = None,
    freqs: Tensor | None = None,
) -> Tensor:
    """``R(m) P x`` in float64 for x ``(B, T, H, D)`` at positions ``(T,)`` or ``(B, T)``.

    mixing: the dense ``(D, D)`` matrix P (identity if None). freqs: ``(r/2,)`` frequencies, by default
    ``base ** (-2i / r)`` computed with Python floats.
    """
    head_dim = x.shape[-1]
    rotary_dim = rotary_dim or (head_dim - head_dim % 2)
    if freqs is None:
        freqs = torch.tensor([base ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)], dtype=torch.float64)
    angles = positions.double().unsqueeze(-1) * freqs.double().to(x.device)
    if angles.dim() == 2:
        angles = angles.unsqueeze(0).expand(x.shape[0], -1, -1)
    xd = x.double()
    if mixing is not None:
        xd = torch.einsum("de,bthe->bthd", mixing.double(), xd)
    return apply_rotary_reference(xd, angles.cos(), angles.sin(), interleaved=interleaved)


def givens_matrix_reference(planes: Tensor, angles: Tensor, head_dim: int) -> Tensor:
    """Product of dense Givens rotations ``G(i_k, j_k, theta_k)``: ``(i, j) -> (c i - s j, s i + c j)``."""
    P = torch.eye(head_dim, dtype=torch.float64)
    for (i, j), theta in zip(planes.tolist(), angles.double().cpu().unbind(0)):
        G = torch.eye(head_dim, dtype=torch.float64)
        G[i, i] = torch.cos(theta)
        G[i, j] = -torch.sin(theta)
        G[j, i] = torch.sin(theta)
        G[j, j] = torch.cos(theta)
        P = G @ P
    return P


def _hamilton(a: list, b: list) -> list:
    a0, a1, a2, a3 = a
    b0, b1, b2, b3 = b
    return [
        a0 * b0 - a1 * b1 - a2 * b2 - a3 * b3,
        a0 * b1 + a1 * b0 + a2 * b3 - a3 * b2,
        a0 * b2 - a1 * b3 + a2 * b0 + a3 * b1,
        a0 * b3 + a1 * b2 - a2 * b1 + a3 * b0,
    ]


def quaternion_matrix_reference(axis: Tensor, angle: Tensor) -> Tensor:
    """3x3 matrix of ``v -> q v q*`` with ``q = (cos(t/2), sin(t/2) u)``, by Hamilton products on basis vectors."""
    u = axis.double().cpu()
    u = u / u.norm()
    t = float(angle)
    q = [math.cos(t / 2)] + [math.sin(t / 2) * float(c) for c in u]
    q_conj = [q[0], -q[1], -q[2], -q[3]]
    columns = []
    for e in torch.eye(3, dtype=torch.float64):
        rotated = _hamilton(_hamilton(q, [0.0] + e.tolist()), q_conj)
        columns.append(rotated[1:])
    return torch.tensor(columns, dtype=torch.float64).T


def orthogonal_matrix_reference(generator: Tensor) -> Tensor:
    """``expm(A - A^T)`` for the strictly upper triangle A of ``generator``, by a truncated Taylor series."""
    A = generator.double().cpu().triu(1)
    S = A - A.T
    P = torch.eye(S.shape[0], dtype=torch.float64)
    term = torch.eye(S.shape[0], dtype=torch.float64)
    for k in range(1, 60):
        term = term @ S / k
        P = P + term
    return P
