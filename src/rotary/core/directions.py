"""Frequency directions for N-D positions: pair i turns by the angle ``<w_i, r>`` for a position vector r.

Shapes: n axes (1, 2 or 3), r rotary_dim, H heads; positions ``(..., n)``; frequency vectors ``w`` ``(r/2, n)``, or
``(H, r/2, n)`` when they differ per head ("mixed").

Kinds (``directions=`` of :class:`rotary.Rotary`):

- ``"axial"``: the pairs are split into n contiguous blocks as evenly as possible (earlier axes take the
  remainder); block a turns with axis a alone, at the 1-D frequencies of a rotary dim of twice its size
  (rotary-embedding-torch's axial mode: every axis gets the whole range of frequencies).
- ``"sections"``: explicit pair counts per axis (``sections=[...]``, summing to r/2), contiguous in pair order, at
  the standard 1-D frequencies ``base ** (-2i / r)`` sliced among the axes. Qwen2-VL's M-RoPE is this with
  ``interleaved=False`` (its half layout) and ``sections=[16, 24, 24]`` for (t, h, w).
- ``"oblique"``: axial's magnitudes, but pair i points along a fixed unit vector taken from a low-discrepancy
  sequence (golden-angle steps on the half circle for n = 2, a Fibonacci lattice on the half sphere for n = 3), so
  the directions are spread evenly and pairs of equal magnitude point far apart. No parameters. For n = 1 every
  direction is +1: standard RoPE.
- ``"mixed"``: a learnable vector per pair and per head (RoPE-Mixed, Heo et al. 2024, arXiv 2403.13298). Initialised
  to oblique's magnitudes with each head continuing the same direction sequence (head h takes its terms
  ``h * r/2 ... (h+1) * r/2 - 1``), so that at initialisation no relation such as "same diagonal" is out of reach
  and the heads together cover the circle/sphere H times more finely than one. Deterministic (no RNG): a fresh
  module, ``reset_parameters`` and ``to_empty`` followed by it all give the same values.

Why directions and not P: any family of commuting rotations equals ``Q R(r) Q^T`` for one orthogonal Q, and Q
folds into the query and key projections; what a position-independent P cannot change is which combinations of
the axes each pair measures. Scores stay functions of ``r_n - r_m`` for every kind here (all generators commute).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .frequencies import angle_dtype

__all__ = ["DIRECTIONS", "Directions", "axial_counts", "oblique_units", "trig_gradient"]

DIRECTIONS = ("axial", "sections", "oblique", "mixed")
MAX_AXES = 3
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 1/phi: the most evenly spreading irrational step


def axial_counts(pairs: int, axes: int) -> list[int]:
    """Pairs per axis, as even as possible, earlier axes taking the remainder: ``axial_counts(32, 3)`` is
    ``[11, 11, 10]``."""
    return [pairs // axes + (1 if a < pairs % axes else 0) for a in range(axes)]


def oblique_units(count: int, axes: int, start: int = 0, total: int | None = None) -> list[list[float]]:
    """Terms ``start .. start + count - 1`` of a low-discrepancy sequence of unit vectors in R^axes (Python floats).

    n = 1: +1. n = 2: angle ``pi * frac(k / phi)`` on the half circle (w and -w measure the same relation).
    n = 3: the Fibonacci lattice on the half sphere of ``total`` points (default ``start + count``).
    """
    total = start + count if total is None else total
    out = []
    for k in range(start, start + count):
        if axes == 1:
            out.append([1.0])
        elif axes == 2:
            phi = math.pi * ((k * _GOLDEN) % 1.0)
            out.append([math.cos(phi), math.sin(phi)])
        else:
            z = 1.0 - (k + 0.5) / total  # in (0, 1): the upper half sphere
            rho = math.sqrt(max(0.0, 1.0 - z * z))
            phi = 2.0 * math.pi * ((k * _GOLDEN) % 1.0)
            out.append([z, rho * math.cos(phi), rho * math.sin(phi)])
    return out


class Directions(nn.Module):
    """The frequency vectors of one :class:`rotary.Rotary` with N-D positions (see the module docstring).

    Fixed kinds keep float64 buffers, rebuilt from Python numbers after every ``to``/``to_empty``/cast (a
    ``module.to(bfloat16)`` cannot round them); "mixed" has one parameter ``weight`` ``(H, r/2, n)``.
    """

    def __init__(self, kind: str, axes: int, rotary_dim: int, heads: int, base: float,
                 sections: list[int] | tuple[int, ...] | None = None):
        super().__init__()
        if kind not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {kind!r}")
        if isinstance(axes, bool) or not isinstance(axes, int) or not 1 <= axes <= MAX_AXES:
            raise ValueError(f"axes must be 1, 2 or 3, got {axes!r}")
        pairs = rotary_dim // 2
        if kind == "sections":
            if sections is None:
                raise ValueError('directions="sections" needs sections=[pairs per axis], e.g. [16, 24, 24]')
            sections = list(sections)
            if len(sections) != axes or sum(sections) != pairs or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sections
            ):
                raise ValueError(f"sections must be {axes} non-negative ints summing to rotary_dim // 2 = {pairs}, "
                                 f"got {sections!r}")
        elif sections is not None:
            raise ValueError(f'sections= is only for directions="sections", not {kind!r}')
        elif pairs < axes and kind != "mixed":
            raise ValueError(f"rotary_dim // 2 = {pairs} pairs cannot be split among {axes} axes")
        self.kind, self.axes, self.pairs, self.heads = kind, axes, pairs, heads
        self.counts = sections if kind == "sections" else axial_counts(pairs, axes)
        self.separable = kind in ("axial", "sections")  # each pair turns with one axis alone
        self.per_head = kind == "mixed"
        if kind == "sections":
            mags = [base ** (-2 * i / rotary_dim) for i in range(pairs)]  # the 1-D frequencies, sliced
        else:
            mags = [base ** (-2 * j / (2 * c)) for c in self.counts for j in range(c)]  # each axis its full range
        # the axis of each pair (separable kinds) and, for the others, the unit vector of each pair
        self._pair_axis = [a for a, c in enumerate(self.counts) for _ in range(c)]
        # same-magnitude pairs get consecutive sequence terms (j * n + a), so they point far apart
        order = [j * axes + a for a, c in enumerate(self.counts) for j in range(c)]
        if kind == "mixed":
            total = heads * pairs
            units = [oblique_units(1, axes, h * pairs + k, total)[0] for h in range(heads) for k in order]
            self._init = [[m * u for u in units[h * pairs + i]] for h in range(heads) for i, m in enumerate(mags)]
            self.weight = nn.Parameter(torch.tensor(self._init, dtype=torch.float32).view(heads, pairs, axes))
        elif kind == "oblique":
            units = [oblique_units(1, axes, k, pairs)[0] for k in order]
            self._units = units
        else:
            self._units = [[1.0 if b == a else 0.0 for b in range(axes)] for a in self._pair_axis]
        self._mags = mags
        self.register_buffer("magnitudes", torch.empty(0), persistent=False)
        self.register_buffer("units", torch.empty(0), persistent=False)
        self.register_buffer("pair_axis", torch.empty(0, dtype=torch.long), persistent=False)
        self._build(torch.device("cpu"))

    def _build(self, device) -> None:
        dtype = angle_dtype(device)
        self.magnitudes = torch.tensor(self._mags, dtype=dtype, device=device)
        self.pair_axis = torch.tensor(self._pair_axis, dtype=torch.long, device=device)
        if not self.per_head:
            self.units = torch.tensor(self._units, dtype=dtype, device=device).view(self.pairs, self.axes)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._build(self.magnitudes.device)  # fixed constants: rebuilt exact, never cast
        return self

    def reset_parameters(self) -> None:
        if self.per_head:
            with torch.no_grad():
                self.weight.copy_(torch.tensor(self._init, dtype=torch.float64).view_as(self.weight))

    def vectors(self, scale: Tensor | None = None) -> Tensor:
        """The frequency vectors ``(r/2, n)`` or ``(H, r/2, n)`` in the angle dtype; ``scale`` ``(r/2,)``
        multiplies the magnitudes (learned frequencies)."""
        if self.per_head:
            return self.weight.to(self.magnitudes.dtype)
        mags = self.magnitudes if scale is None else self.magnitudes * scale.to(self.magnitudes.dtype)
        return self.units * mags.unsqueeze(-1)

    def angles(self, positions: Tensor, scale: Tensor | None = None) -> Tensor:
        """``<w_i, r>`` in the angle dtype: positions ``(..., n)`` -> ``(..., r/2)`` or ``(..., H, r/2)``."""
        pos = positions.to(self.magnitudes.dtype)
        if self.separable:  # exact: one product per pair, as the 1-D path forms its angles
            mags = self.magnitudes if scale is None else self.magnitudes * scale.to(self.magnitudes.dtype)
            return pos.index_select(-1, self.pair_axis) * mags
        w = self.vectors(scale)  # (r/2, n) or (H, r/2, n)
        if self.per_head:
            pos = pos.unsqueeze(-2)  # (..., 1, n) against heads
        return _sum_over_axes(pos, w)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Per-head directions: cos and sin of :meth:`angles` in ``dtype``, ``(..., H, r/2)``, differentiable in
        ``weight`` through a hand-written backward (``dL/dw = sum r (cos dL/dsin - sin dL/dcos)``, one small
        matmul) rather than autograd through full-size float64 trigonometry."""
        if not torch.is_grad_enabled() or not self.weight.requires_grad:
            angles = self.angles(positions)
            return angles.cos().to(dtype), angles.sin().to(dtype)
        return _PerHeadCosSin.apply(self.weight, positions, self.magnitudes.dtype, dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, axes={self.axes}, counts={self.counts}"


def _sum_over_axes(pos: Tensor, w: Tensor) -> Tensor:
    """``sum_a pos[..., a] * w[..., a]`` with pos ``(..., n)`` broadcasting against w ``(..., r/2, n)``."""
    # at most 3 axes: products accumulated in place, not a matmul with an inner dimension of n (a slow batched
    # matmul) nor a full-size temporary per axis
    angles = pos[..., None, 0] * w[..., 0]
    for a in range(1, w.shape[-1]):
        angles.addcmul_(pos[..., None, a], w[..., a])
    return angles


class _PerHeadCosSin(torch.autograd.Function):
    """cos/sin of ``<w_h,i, r>`` (float64 angles) for learned per-head directions; see Directions.cos_sin."""

    @staticmethod
    def forward(ctx, weight, positions, angle_dtype, dtype):
        pos = positions.to(angle_dtype)
        angles = _sum_over_axes(pos.unsqueeze(-2), weight.to(angle_dtype))  # (..., H, r/2)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        ctx.save_for_backward(cos, sin, positions)
        ctx.weight_dtype = weight.dtype
        return cos, sin

    @staticmethod
    def backward(ctx, dcos, dsin):
        cos, sin, positions = ctx.saved_tensors
        G = torch.zeros_like(cos)  # dL/dangle
        if dsin is not None:
            G.addcmul_(dsin, cos)
        if dcos is not None:
            G.addcmul_(dcos, sin, value=-1)
        n = positions.shape[-1]
        H, half = cos.shape[-2], cos.shape[-1]
        pos = positions.to(G.dtype).reshape(-1, n)  # (N, n)
        dw = (pos.T @ G.reshape(-1, H * half)).T  # (H r/2, n): sum over every position of G * r
        return dw.reshape(H, half, n).to(ctx.weight_dtype), None, None, None


class _TrigGradient(torch.autograd.Function):
    """Identity on y = R(theta) x (computed without autograd on cos/sin); its backward gives cos and sin the
    gradient that makes the angles' gradient exact: ``dL/dtheta_i = sum (g_b y_a - g_a y_b)`` over the pair i of
    y, because ``dy/dtheta_i = J y`` (a quarter turn of that pair). With cos = A cos(theta), sin = A sin(theta)
    (A a constant attention factor), ``dL/dcos = -sin G / A^2`` and ``dL/dsin = cos G / A^2`` chain back to
    exactly G. This keeps the fast kernel (no autograd-visible elementwise ops on the big tensor) for learned
    per-head directions: the backward adds two passes over y and a reduction."""

    @staticmethod
    def forward(ctx, y, cos, sin, interleaved):
        ctx.save_for_backward(y, cos, sin)
        ctx.interleaved = interleaved
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        y, cos, sin = ctx.saved_tensors
        half = cos.shape[-1]
        dtype = cos.dtype
        yr, gr = y[..., : 2 * half].to(dtype), g[..., : 2 * half].to(dtype)
        if ctx.interleaved:
            ya, yb = yr.unflatten(-1, (half, 2)).unbind(-1)
            ga, gb = gr.unflatten(-1, (half, 2)).unbind(-1)
        else:
            ya, yb, ga, gb = yr[..., :half], yr[..., half:], gr[..., :half], gr[..., half:]
        if y.dim() == cos.dim() + 1 and cos.shape[:-1] == y.shape[1:-1]:
            # cos/sin broadcast over the batch only: accumulate row by row into one (.., r/2) buffer, which stays
            # in cache, instead of full-size temporaries reduced at the end
            G = torch.zeros(cos.shape, dtype=dtype, device=cos.device)
            for b in range(y.shape[0]):
                G.addcmul_(gb[b], ya[b]).addcmul_(ga[b], yb[b], value=-1)
        else:
            G = (gb * ya).sub_(ga * yb).sum_to_size(cos.shape)
        G = G / (cos * cos + sin * sin)  # 1 up to rounding unless an attention factor scales cos and sin
        return g, -sin * G, cos * G, None


def trig_gradient(y: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool) -> Tensor:
    """y (already rotated with detached cos/sin, broadcastable to ``y[..., :r/2]``), now carrying their gradient."""
    return _TrigGradient.apply(y, cos, sin, interleaved)
