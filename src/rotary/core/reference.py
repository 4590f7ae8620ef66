"""Plain, obviously-correct float64 implementations used as the oracle by the tests.

Nothing here is fast or clever: every rotation is built as an explicit dense matrix and applied with einsum,
so that the fast paths in :mod:`rotary.core.kernels` and :mod:`rotary.core.mixing` are checked against code that
shares none of their tricks (complex views, in-place updates, index gathers, sparse plane updates).

Shapes: B batch, T sequence, H heads, D head_dim, r rotary_dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "apply_rotary_reference",
    "attention_factor_reference",
    "direction_vectors_reference",
    "frequencies_reference",
    "givens_matrix_reference",
    "orthogonal_matrix_reference",
    "quaternion_matrix_reference",
    "rope_matrices_reference",
    "rotary_nd_reference",
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


def frequencies_reference(
    rotary_dim: int,
    base: float = 10000.0,
    *,
    scaling: dict | None = None,
    length: int | None = None,
    log_scale: list[float] | None = None,
) -> list[float]:
    """The frequencies ``w_i`` ``(r/2)`` as Python floats, from the schemes' published definitions.

    Written apart from :mod:`rotary.core.scaling` (plain ``math``, one pair at a time, no tensors), so that tests can
    check the module's frequencies, learned scale included, against numbers it did not compute. scaling: a
    ``rope_parameters`` dict (linear, ntk, dynamic, yarn, llama3, longrope, p / proportional); length: the
    sequence length of the length-dependent schemes (None: within the original context); log_scale: a learned
    ``log_freq_scale``, multiplying ``w_i`` by ``exp(log_scale_i)`` after the scheme.
    """
    half = rotary_dim // 2
    w = [base ** (-2 * i / rotary_dim) for i in range(half)]
    s = scaling or {"rope_type": "default"}
    kind = s.get("rope_type", s.get("type"))
    factor = s.get("factor", 1.0)
    original = s.get("original_max_position_embeddings") or s.get("max_position_embeddings")
    if kind == "linear":  # position interpolation: every position divided by the factor
        w = [x / factor for x in w]
    elif kind in ("ntk", "dynamic"):  # NTK-aware: the base grows to base * factor ** (r / (r - 2))
        if kind == "dynamic":  # ... by a factor that grows with the length past the original context
            factor = 1.0 if length is None else max(factor * length / original - (factor - 1), 1.0)
        grown = base * factor ** (rotary_dim / (rotary_dim - 2))
        w = [grown ** (-2 * i / rotary_dim) for i in range(half)]
    elif kind == "yarn":  # NTK-by-parts: interpolate the pairs that turn few times over the original context
        fast, slow = s.get("beta_fast") or 32.0, s.get("beta_slow") or 1.0

        def pair_turning(rotations: float) -> float:  # the (fractional) pair index turning `rotations` times
            return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = pair_turning(fast), pair_turning(slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        high = high + 0.001 if low == high else high
        out = []
        for i, x in enumerate(w):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 1: interpolated
            out.append(x / factor * ramp + x * (1 - ramp))
        w = out
    elif kind == "llama3":  # long wavelengths interpolated, short ones kept, a smooth band between
        lo, hi = s["low_freq_factor"], s["high_freq_factor"]
        out = []
        for x in w:
            wavelength = 2 * math.pi / x
            if wavelength < original / hi:
                out.append(x)
            elif wavelength > original / lo:
                out.append(x / factor)
            else:
                smooth = (original / wavelength - lo) / (hi - lo)
                out.append((1 - smooth) * x / factor + smooth * x)
        w = out
    elif kind == "longrope":  # one rescale factor per pair, the long list past the original context
        factors = s["long_factor"] if length is not None and length > original else s["short_factor"]
        w = [x / f for x, f in zip(w, factors)]
    elif kind in ("p", "proportional"):  # p-RoPE: only the fastest fraction p of the pairs turns
        p = s["p"] if kind == "p" else s.get("partial_rotary_factor", 1.0)
        kept = int(p * rotary_dim // 2)
        w = [(x if i < kept else 0.0) / factor for i, x in enumerate(w)]
    elif kind != "default":
        raise ValueError(f"no reference for rope_type {kind!r}")
    if log_scale is not None:
        w = [x * math.exp(v) for x, v in zip(w, log_scale)]
    return w


def attention_factor_reference(scaling: dict | None) -> float:
    """The factor yarn and longrope multiply cos and sin by (1 for every other scheme), from their definitions."""
    s = scaling or {}
    kind = s.get("rope_type", s.get("type"))
    if s.get("attention_factor") is not None and kind in ("yarn", "longrope"):
        return s["attention_factor"]
    if kind == "yarn":
        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if s.get("mscale") and s.get("mscale_all_dim"):
            return mscale(s["factor"], s["mscale"]) / mscale(s["factor"], s["mscale_all_dim"])
        return mscale(s["factor"])
    if kind == "longrope":
        original = s["original_max_position_embeddings"]
        factor = s.get("factor") or s["max_position_embeddings"] / original
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return 1.0


def direction_vectors_reference(
    kind: str, axes: int, rotary_dim: int, *, base: float = 10000.0, sections: list[int] | None = None
) -> Tensor:
    """The fixed frequency vectors ``w_i`` ``(r/2, n)`` float64 of :mod:`rotary.core.directions`, from their definitions
    with Python floats: pair blocks per axis (axial: as even as possible, earlier axes longer; sections: as given),
    axial magnitudes ``base ** (-2j / (2 * block))``, sections' the 1-D ``base ** (-2i / r)``; oblique: axial's
    magnitudes along unit vector number ``j * n + a`` (block a, index j in it) of the sequence
    ``(cos, sin)(pi * frac(k / phi))`` (n = 2) or the half-sphere Fibonacci lattice of r/2 points (n = 3)."""
    pairs = rotary_dim // 2
    if kind == "sections":
        blocks = list(sections)
    else:
        blocks = [pairs // axes + (1 if a < pairs % axes else 0) for a in range(axes)]
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    rows, i = [], 0
    for a, size in enumerate(blocks):
        for j in range(size):
            if kind == "sections":
                magnitude = base ** (-2 * i / rotary_dim)
            else:
                magnitude = base ** (-2 * j / (2 * size))
            if kind == "oblique" and axes > 1:
                k = j * axes + a
                if axes == 2:
                    t = math.pi * ((k * golden) % 1.0)
                    unit = [math.cos(t), math.sin(t)]
                else:
                    z = 1.0 - (k + 0.5) / pairs
                    t = 2.0 * math.pi * ((k * golden) % 1.0)
                    unit = [z, math.sqrt(1 - z * z) * math.cos(t), math.sqrt(1 - z * z) * math.sin(t)]
            else:
                unit = [1.0 if b == a else 0.0 for b in range(axes)]
            rows.append([magnitude * u for u in unit])
            i += 1
    return torch.tensor(rows, dtype=torch.float64)


def rotary_nd_reference(
    x: Tensor,
    positions: Tensor,
    vectors: Tensor,
    *,
    interleaved: bool = True,
    mixing: Tensor | None = None,
) -> Tensor:
    """``R(r) P x`` in float64 for N-D positions: pair i of head h turns by ``sum_a r_a w[h, i, a]``.

    x ``(B, T, H, D)``; positions ``(T, n)`` or ``(B, T, n)``; vectors ``(r/2, n)`` (all heads alike) or
    ``(H, r/2, n)``; mixing: the dense ``(D, D)`` P. Angles are summed axis by axis, one float64 product each.
    """
    B, T, H, D = x.shape
    pos = positions.double().to(x.device)
    if pos.dim() == 2:
        pos = pos.unsqueeze(0).expand(B, -1, -1)
    w = vectors.double().to(x.device)
    if w.dim() == 2:
        w = w.unsqueeze(0).expand(H, -1, -1)
    angles = torch.zeros(B, T, H, w.shape[1], dtype=torch.float64, device=x.device)
    for a in range(w.shape[-1]):
        angles = angles + pos[:, :, None, None, a] * w[None, None, :, :, a]
    R = rope_matrices_reference(angles.cos(), angles.sin(), D, interleaved=interleaved)  # (B, T, H, D, D)
    xd = x.double()
    if mixing is not None:
        xd = torch.einsum("de,bthe->bthd", mixing.double(), xd)
    return torch.einsum("bthde,bthe->bthd", R, xd)


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
