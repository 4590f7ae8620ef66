"""The no-grad path of :class:`rotary.Rotary`: decode steps at the cost of the work.

Shapes: B batch, T tokens, H heads, D head_dim, r/2 rotated pairs.

At one token, Python overhead is the whole cost of a rotation: the general path's validation, dtype juggling
and autograd.Function dispatch dominate. This path applies where the answer is a complex multiply by rows of
the precomputed table (Meta's ``freqs_cis``): positions ``start + arange(T)`` from an int or a ``(B,)`` tensor
start (a :class:`rotary.core.positions.Span` that :func:`rotary.core.positions.resolve` has checked),
float32/bf16/fp16 input, angles that depend on no parameter and no length. Everything else returns None and the
general path rotates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import rope_into
from .layout import transposed_buffer
from .positions import INDEX_DTYPES, index_range

__all__ = ["rotate_no_grad"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _table_rows(table: Tensor, start, B: int, T: int, time_dim: int) -> Tensor | None:
    """Rows ``start + arange(T)`` of the complex table, shaped to broadcast against x; None if it cannot serve."""
    if type(start) is int:
        if start + T > table.shape[0]:
            return None  # the general path grows the table or computes these rows
        cis = table[start : start + T]  # (T, r/2)
        return cis.unsqueeze(-2) if time_dim == 1 else cis  # (T, 1, r/2) against BTHD; (T, r/2) against BHTD
    if not (isinstance(start, Tensor) and start.dim() == 1 and start.dtype in INDEX_DTYPES):
        return None
    index = start if T == 1 else (start.view(B, 1) + torch.arange(T, device=start.device)).view(-1)
    if table.is_cpu:
        try:  # index_select checks the range itself on CPU: no host synchronisation needed
            cis = table.index_select(0, index)  # (B * T, r/2)
        except (IndexError, RuntimeError):
            return None
    else:  # on accelerators a bad index is an asynchronous device assert: the range check first
        lo, hi = index_range(index)
        if lo < 0 or hi >= table.shape[0]:
            return None
        cis = table[index.to(table.device)]
    # (B, T, 1, r/2) against (B, T, H, D); (B, 1, T, r/2) against (B, H, T, D)
    return cis.view(B, T, 1, -1) if time_dim == 1 else cis.view(B, 1, T, -1)


def rotate_no_grad(rotary, x4: Tensor, time_dim: int, start, mix: bool) -> Tensor | None:
    """``R(m) P x`` (``R(m) x`` if not ``mix``) for a :class:`rotary.Rotary` and a 4-D x4 it has checked (time on
    axis ``time_dim``), at positions ``start + arange(T)``; None where this path does not apply. Every check here
    is a cheap attribute read."""
    # submodules read from _modules directly: nn.Module.__getattr__ costs about a microsecond a lookup
    angles, mixer = rotary._modules["angles"], rotary._modules.get("mixer")
    if not angles.fixed or x4.dtype not in _DTYPES or torch.compiler.is_compiling():
        return None
    if time_dim == 2 and transposed_buffer(x4):
        y = rotate_no_grad(rotary, x4.transpose(1, 2), 1, start, mix)
        return None if y is None else y.transpose(1, 2)
    cis = _table_rows(angles.cis_table, start, x4.shape[0], x4.shape[time_dim], time_dim)
    if cis is None:
        return None
    xf = x4 if x4.dtype == torch.float32 else x4.float()
    if mix and mixer is not None:
        xf = mixer.apply_frozen(xf)
    if rotary.interleaved and rotary.rotary_dim == rotary.head_dim and xf.is_contiguous():
        y = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * cis).flatten(-2)
    else:
        y = torch.empty_like(xf)
        rope_into(y, xf, cis.real, cis.imag, rotary.interleaved, rot=cis)
    return y if y.dtype == x4.dtype else y.to(x4.dtype)
