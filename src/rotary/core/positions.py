"""Where the tokens of one call sit: ``offset``, ``positions`` and ``length`` checked and resolved once.

Shapes: B batch, T tokens of the call (Tk keys, Tq queries with :meth:`rotary.Rotary.rotate_qk`), n position axes.

:func:`resolve` runs at the top of every call and returns a :class:`Where`; every path below (the no-grad decode
path, the Triton kernel, the general path) reads that and derives nothing again. A :class:`Where` holds:

- ``keys``: the positions of the rotated tensor (of k in ``rotate_qk``): a :class:`Span` ``start + arange(T)``
  (``start`` an int, symbolic under ``torch.export``, or a ``()``/``(B,)`` integer tensor: per-row offsets), or a
  position tensor ``(T,)``/``(B, T)`` (1-D, integer or float) or ``(T, n)``/``(B, T, n)`` (N-D);
- ``shift``: how many keys come before the first query (``Tk - Tq``; 0 for ``forward``): the queries sit at the
  last Tq key positions;
- ``length``: the ``()``/``(B,)`` length L that length-dependent scaling (dynamic NTK, LongRoPE) is evaluated at
  (by default the last position + 1, per row for ``(B, T)`` positions, as transformers' ``max(position_ids) + 1``),
  always a tensor, so that picking a regime is ``torch.where`` with nothing for ``torch.compile`` to guard on;
  None where the angles do not depend on it.

:func:`index_range` is the one range check before a table gather (a host synchronisation, skipped in a graph).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["INDEX_DTYPES", "Span", "Where", "check_length", "check_offset", "index_range", "resolve"]

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # what indexes a table


class Span(NamedTuple):
    """Positions ``start + arange(count)``: start an int (or a symbolic one) or a ``()``/``(B,)`` integer tensor."""

    start: int | Tensor
    count: int

    def tensor(self, device) -> Tensor:
        """The positions as a tensor: ``(T,)``, or ``(B, T)`` for a ``(B,)`` start."""
        steps = torch.arange(self.count, device=device)
        if not isinstance(self.start, Tensor):
            return steps + self.start
        start = self.start.to(device)
        return start.unsqueeze(-1) + steps if start.dim() == 1 else start + steps


class Where(NamedTuple):
    """The positions of one call, resolved (see the module docstring)."""

    keys: Span | Tensor
    shift: int
    length: Tensor | None


# A NamedTuple's own __new__ is a Python frame; on the decode steps' cheap path, the tuple is built directly.
_new = tuple.__new__


def _not_index(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex() or t.dtype == torch.bool


def check_offset(offset, B: int | None = None) -> None:
    """The one check of ``offset=``: a non-negative int (a symbolic int under ``torch.export``, whose sign becomes
    a runtime assertion of the graph), or an integer tensor (``()``, or ``(B,)`` where B is given)."""
    if isinstance(offset, Tensor):
        if B is not None and (offset.dim() > 1 or (offset.dim() == 1 and offset.shape[0] != B)):
            raise ValueError(f"a tensor offset must have shape () or ({B},), got {tuple(offset.shape)}")
        if _not_index(offset):
            raise ValueError(f"offset must be an integer tensor (use positions= for float), got {offset.dtype}")
        return
    if isinstance(offset, torch.SymInt):
        torch._check(offset >= 0, lambda: f"offset must be non-negative, got {offset}")
        return
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int or an integer tensor, got {offset!r}")


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
    if isinstance(length, torch.SymInt):
        torch._check(length >= 1, lambda: f"length must be positive, got {length}")
        return torch.scalar_tensor(length, dtype=torch.int64, device=device)
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


def resolve(B: int, T: int, offset, positions, length, shift: int = 0, axes: int = 1, nd: bool = False,
            length_dependent: bool = False, device=None) -> Where:
    """Check a call's ``offset``/``positions``/``length`` and return its :class:`Where`.

    B, T: batch and tokens of the rotated tensor (the keys in ``rotate_qk``). offset: the position of the first
    query (the first token for ``forward``); the keys start ``shift`` earlier, and an int offset must leave that
    >= 0. positions: the key positions, overriding offset. N-D modules without ``positions=`` put every axis at
    ``offset + t`` (text tokens in M-RoPE).
    """
    if positions is None and length is None and not length_dependent and not nd:  # decode steps: the cheap cases
        if type(offset) is int:
            if type(shift) is not int or offset < shift:  # (offset >= shift >= 0 needs no call)
                _check_start(offset, T, shift)
            return _new(Where, (_new(Span, (offset - shift, T)), shift, None))
        if isinstance(offset, Tensor) and offset.dtype in INDEX_DTYPES and offset.dim() == 1 and offset.shape[0] == B:
            return _new(Where, (_new(Span, (offset - shift if shift else offset, T)), shift, None))
    if nd and length is not None:
        raise ValueError("length= is for length-dependent scaling, which N-D directions do not take")
    length = check_length(B, length, device)
    if positions is not None:
        keys = _check_positions(positions, B, T, axes, nd)
        if length is None and length_dependent and T > 0:
            length = keys.amax(dim=-1) + 1  # () or (B,): transformers' max(position_ids) + 1, per row
    else:
        check_offset(offset, B)
        if not isinstance(offset, Tensor):  # a tensor's keys may start below 0: those rows are computed directly
            _check_start(offset, T, shift)
        keys = Span(offset - shift if shift else offset, T)
        if length is None and length_dependent:
            if isinstance(offset, Tensor):
                length = offset + (T - shift)
            else:  # a tensor, no guard on the int
                length = torch.arange(offset + T - shift, offset + T - shift + 1, device=device).squeeze(0)
        if nd:  # every axis at offset + t
            keys = keys.tensor(device)
            keys = keys.unsqueeze(-1).expand(*keys.shape, axes)
    return Where(keys, shift, length if length_dependent else None)


def _check_start(offset, T, shift) -> None:
    """The keys start ``shift`` before the first query, at a position >= 0. Symbolic sizes (torch.export): a runtime
    assertion of the graph, where a comparison would pin them."""
    if type(offset) is int and type(shift) is int:
        check_offset(offset)
        if offset < shift:
            raise ValueError(_start_text(offset, T, shift))
    else:
        torch._check(offset >= shift, lambda: _start_text(offset, T, shift))


def _start_text(offset, T, shift) -> str:
    return (f"offset is the position of the first query: with {T} keys and {T - shift} queries it must be at least "
            f"{shift} (the keys start at offset - {shift}), got {offset}")


def index_range(index: Tensor) -> tuple[int, int] | None:
    """``(lo, hi)`` of integer positions: the one range check before a table gather, a host synchronisation (a
    bad index is an error on CPU, an illegal memory access on a GPU). None where no gather may be decided on
    values: in a compiled or exported graph, for float or empty positions."""
    if torch.compiler.is_compiling() or _not_index(index) or index.numel() == 0:
        return None
    lo, hi = torch.aminmax(index)
    return int(lo), int(hi)
