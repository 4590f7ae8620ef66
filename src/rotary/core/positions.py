"""Where the tokens of one call sit: ``offset``, ``positions`` and ``length`` checked and resolved in one place.

Shapes: B batch, T tokens of the call, n position axes (``axes``).

A call's positions are either a :class:`Span` (an int offset: rows ``offset .. offset + T - 1``, which the angle
table serves by slicing) or a tensor: ``(T,)``/``(B, T)`` for 1-D positions (from a ``(B,)`` offset tensor or
given as ``positions=``, integer or float), ``(T, n)``/``(B, T, n)`` for N-D. Length-dependent scaling (dynamic
NTK, LongRoPE) also needs the sequence length L at which it is evaluated: by default the last position + 1 (per
row for ``(B, T)`` positions, as transformers' ``max(position_ids) + 1``), always as a tensor, so that picking a
regime is ``torch.where`` with nothing for ``torch.compile`` to guard on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Span", "check_length", "offset_positions", "resolve"]


@dataclass(frozen=True)
class Span:
    """Positions ``start .. start + count - 1`` of an int offset."""

    start: int
    count: int

    def tensor(self, device) -> Tensor:
        return torch.arange(self.start, self.start + self.count, device=device)


def _check_int_offset(offset) -> None:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int or an integer tensor, got {offset!r}")


def _not_index(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex() or t.dtype == torch.bool


def offset_positions(B: int, T: int, offset: Tensor) -> Tensor:
    """Positions ``offset + arange(T)`` for a ``()`` or ``(B,)`` integer tensor offset: ``(T,)`` or ``(B, T)``."""
    if offset.dim() > 1 or (offset.dim() == 1 and offset.shape[0] != B):
        raise ValueError(f"a tensor offset must have shape () or ({B},), got {tuple(offset.shape)}")
    if _not_index(offset):
        raise ValueError(f"offset must be an integer tensor (use positions= for float), got {offset.dtype}")
    steps = torch.arange(T, device=offset.device)
    return offset.unsqueeze(-1) + steps if offset.dim() == 1 else offset + steps


def check_length(B: int, length, device) -> Tensor | None:
    """``length=`` as a ``()`` or ``(B,)`` integer tensor, or None."""
    if length is None:
        return None
    if isinstance(length, Tensor):
        if length.dim() > 1 or (length.dim() == 1 and length.shape[0] != B):
            raise ValueError(f"a tensor length must have shape () or ({B},), got {tuple(length.shape)}")
        if _not_index(length):
            raise ValueError(f"length must be an integer tensor, got dtype {length.dtype}")
        return length
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int or an integer tensor, got {length!r}")
    return torch.tensor(length, device=device)


def _check_positions(positions, B: int, T: int, axes: int, nd: bool) -> Tensor:
    shapes = ((T, axes), (B, T, axes)) if nd else ((T,), (B, T))

    def text() -> str:  # on the error path only: formatting a traced size would make torch.compile specialise on it
        if nd:
            return f"({T}, {axes}) or ({B}, {T}, {axes})"
        return f"({T},) or ({B}, {T}) (or ({T}, 1), ({B}, {T}, 1))"

    if not isinstance(positions, Tensor):
        raise ValueError(f"positions must be a tensor of shape {text()}, got {type(positions).__name__}")
    shape = tuple(positions.shape)
    if axes == 1 and nd and shape in ((T,), (B, T)):
        positions, shape = positions.unsqueeze(-1), shape + (1,)  # one axis, given without its axis dimension
    elif not nd and len(shape) in (2, 3) and shape[-1] == 1 and shape[:-1] in ((T,), (B, T)) and shape != (B, T):
        positions, shape = positions.squeeze(-1), shape[:-1]  # one axis, given with its axis dimension
    if shape not in shapes:
        hint = ""
        if nd and len(shape) in (2, 3) and shape[:-1] in ((T,), (B, T)):
            hint = f": {shape[-1]} axes given, the module has axes={axes}"
        raise ValueError(f"positions must be a tensor of shape {text()}, got {shape}{hint}")
    if positions.dtype == torch.bool or positions.is_complex():
        raise ValueError(f"positions must be an integer or float tensor, got dtype {positions.dtype}")
    return positions


def resolve(
    B: int, T: int, offset, positions, length, *, axes: int, nd: bool, length_dependent: bool, device
) -> tuple[Span | Tensor, Tensor | None]:
    """Check a call's ``offset``/``positions``/``length`` and return ``(where, length)``.

    where: a :class:`Span` or a position tensor (see the module docstring); N-D positions without ``positions=``
    put every axis at ``offset + t`` (text tokens in M-RoPE). length: the ``()``/``(B,)`` tensor length-dependent
    scaling is evaluated at, None where the angles do not depend on it.
    """
    if nd and length is not None:
        raise ValueError("length= is for length-dependent scaling, which N-D directions do not take")
    length = check_length(B, length, device)
    if positions is not None:
        where = _check_positions(positions, B, T, axes, nd)
        if length is None and length_dependent and T > 0:
            length = where.amax(dim=-1) + 1  # () or (B,): transformers' max(position_ids) + 1, per row
    elif isinstance(offset, Tensor):
        where = offset_positions(B, T, offset)
        if length is None and length_dependent:
            length = offset + T
    else:
        _check_int_offset(offset)
        where = Span(offset, T)
        if length is None and length_dependent:
            length = torch.arange(offset + T, offset + T + 1, device=device).squeeze(0)  # a tensor, no guard
    if nd and positions is None:  # every axis at offset + t
        where = where.tensor(device) if isinstance(where, Span) else where
        where = where.unsqueeze(-1).expand(*where.shape, axes)
    return where, (length if length_dependent else None)
