"""Givens P applied along one axis without a gather, where the planes are two strided channel sets: an autograd
function for P outside the RoPE kernel (an install's projection outputs or weight rows).

Shapes: D head_dim, n planes. Plane k turns channels ``(i_k, j_k)``: ``x_i -> c x_i - s x_j``, ``x_j -> s x_i +
c x_j`` with ``(c, s) = (cos t_k, sin t_k)``. Every plane pattern :func:`rotary.core.mixing.default_planes` prefers
is strided: neighbours ``(2k, 2k + 1)``, halves ``(k, k + D/2)``, partial rotary ``(k, r + k)``. Then ``x_i`` and
``x_j`` are strided views, and the function writes P x into one fresh tensor: no gather, no scatter in the
backward (a gather's transpose), and as few fresh tensors as the maths allows, because on a CPU every new
activation-sized tensor costs page faults that weigh as much as the arithmetic. Channels in no plane are copied.

The backward, from ``dL/d out``: ``g_i' = c g_i + s g_j``, ``g_j' = -s g_i + c g_j`` (P transposed), and
``dL/dt = c * sum(g_j x_i - g_i x_j) - s * sum(g_i x_i + g_j x_j)`` over every axis but the channel one.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["plane_slices", "rotate_planes"]

Slices = tuple[slice, slice]


def plane_slices(planes: list[tuple[int, int]], head_dim: int) -> Slices | None:
    """``(slice of the i channels, slice of the j channels)`` if both are arithmetic progressions (in plane
    order) of disjoint channels within ``head_dim``, else None (the planes need a gather)."""
    if not planes:
        return None
    found = []
    for channels in zip(*planes):
        start, step = channels[0], (channels[1] - channels[0] if len(channels) > 1 else 1)
        if step <= 0 or list(channels) != list(range(start, start + step * len(channels), step)):
            return None
        found.append(slice(start, start + step * (len(channels) - 1) + 1, step))
    i, j = (range(s.start, s.stop, s.step) for s in found)
    if max(i[-1], j[-1]) >= head_dim or set(i) & set(j):
        return None
    return found[0], found[1]


def _write(out: Tensor, a: Tensor, ca: Tensor, b: Tensor, cb: Tensor, sign: int = 1) -> None:
    """``out = a * ca + sign * b * cb`` into ``out`` (maybe a strided view): in eager with no temporary; traced
    (``torch.compile``, which refuses a strided ``out=``) as one expression, which the compiler fuses anyway."""
    if torch.compiler.is_compiling():
        out.copy_(torch.addcmul(a * ca, b, cb, value=sign))  # the same roundings as eager
    else:
        torch.mul(a, ca, out=out)
        out.addcmul_(b, cb, value=sign)


class _RotatePlanes(torch.autograd.Function):
    """``P x`` along the last axis of x; inputs x ``(..., D)`` and angles ``(n,)`` in one float dtype."""

    @staticmethod
    def forward(x: Tensor, angles: Tensor, slices: Slices, covers: bool) -> Tensor:
        si, sj = slices
        c, s = torch.cos(angles), torch.sin(angles)
        xi, xj = x[..., si], x[..., sj]
        out = torch.empty_like(x) if covers else x.clone()
        _write(out[..., si], xi, c, xj, s, -1)
        _write(out[..., sj], xj, c, xi, s)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, angles, slices, covers = inputs
        ctx.save_for_backward(x, angles)
        ctx.slices, ctx.covers = slices, covers

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, angles = ctx.saved_tensors
        si, sj = ctx.slices
        c, s = torch.cos(angles), torch.sin(angles)
        gi, gj = grad[..., si], grad[..., sj]
        grad_x = grad_angles = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(grad) if ctx.covers else grad.clone()
            _write(grad_x[..., si], gi, c, gj, s)
            _write(grad_x[..., sj], gj, c, gi, s, -1)
        if ctx.needs_input_grad[1]:
            xi, xj = x[..., si], x[..., sj]
            axes = tuple(range(x.dim() - 1))
            part = torch.empty_like(gi)  # gi's axis order (weight rows: C innermost): reused for both sums
            _write(part, gj, xi, gi, xj, -1)
            across = part.sum(axes)  # sum(g_j x_i - g_i x_j)
            _write(part, gi, xi, gj, xj)
            along = part.sum(axes)  # sum(g_i x_i + g_j x_j)
            grad_angles = c * across - s * along
        return grad_x, grad_angles, None, None


def rotate_planes(x: Tensor, angles: Tensor, slices: Slices, dim: int = -1) -> Tensor:
    """P x along axis ``dim`` of x (size D) for the planes ``slices`` (:func:`plane_slices`), with autograd.

    x and angles must share a float dtype (the caller picks the compute dtype); the result has x's shape and
    layout. Gradient checkpointing (reentrant or not) and ``torch.compile`` trace through it.
    """
    moved = x.movedim(dim, -1)
    D = moved.shape[-1]
    si, sj = slices
    if (si, sj) == (slice(0, D - 1, 2), slice(1, D, 2)) and _complex_view(moved):
        # neighbours (2k, 2k + 1) in contiguous channels: each pair is a complex number and P multiplies it by
        # e^{i t}, one pass forward (autograd's complex product: two backward), a third of the strided passes
        z = torch.view_as_complex(moved.unflatten(-1, (-1, 2)))
        turned = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
        return turned.movedim(-1, dim)
    covers = len(range(D)[si]) + len(range(D)[sj]) == D
    return _RotatePlanes.apply(moved, angles, slices, covers).movedim(-1, dim)


def _complex_view(x: Tensor) -> bool:
    """Whether ``torch.view_as_complex`` can view x's channel pairs: float32/64, channels contiguous, every other
    stride and the offset even."""
    return (x.dtype in (torch.float32, torch.float64) and x.stride(-1) == 1 and x.storage_offset() % 2 == 0
            and all(s % 2 == 0 for s in x.stride()[:-1]))
