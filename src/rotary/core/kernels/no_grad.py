"""The no-grad kernel of :class:`rotary.Rotary`: decode steps at the cost of the work (chosen by
:func:`rotary.core.kernels.choose`).

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

from ..layout import transposed_buffer
from ..positions import index_range
from .dispatch import KERNEL_DTYPES
from .torch_kernel import rope_into

__all__ = ["rotate_no_grad"]

def _gathered_rows(angles, start, B: int, T: int, time_dim: int) -> Tensor | None:
    """Rows ``start[b] + arange(T)`` of the complex table for an integer start ``(B,)`` or ``()`` (checked by
    :func:`rotary.core.positions.resolve`), shaped to broadcast against x; None if it cannot serve."""
    table = angles.cis_table
    if start.dim() == 0:
        start = start.expand(B)
    if T == 1 and table.is_cpu:  # one token: (B, 1, 1, r/2) straight from the gather, in either layout
        try:
            return angles.cis_batch_rows.index_select(0, start)
        except (IndexError, RuntimeError):
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
    is a cheap attribute read: at one token each costs a measurable share of the call (docs/speed.md)."""
    # submodules read from _modules directly: nn.Module.__getattr__ costs about a microsecond a lookup
    angles, mixer = rotary._modules["angles"], rotary._modules.get("mixer")
    if not angles.fixed or x4.dtype not in KERNEL_DTYPES or torch.compiler.is_compiling():
        return None
    if time_dim == 2 and transposed_buffer(x4):
        y = rotate_no_grad(rotary, x4.transpose(1, 2), 1, start, mix)
        return None if y is None else y.transpose(1, 2)
    shape = x4.shape
    T = shape[time_dim]
    if type(start) is int:
        if start + T > angles.cis_table.shape[0]:
            return None  # the general path grows the table or computes these rows
        # (T, 1, r/2) against (B, T, H, D); (T, r/2) against (B, H, T, D)
        cis = (angles.cis_rows if time_dim == 1 else angles.cis_table)[start : start + T]
    else:
        cis = _gathered_rows(angles, start, shape[0], T, time_dim)
        if cis is None:
            return None
    xf = x4 if x4.dtype == torch.float32 else x4.float()
    if mix and mixer is not None:
        xf = mixer.apply_frozen(xf)
    if rotary.interleaved and rotary.rotary_dim == rotary.head_dim and xf.is_contiguous():
        # a view by plain ints: unflatten and torch.Size arithmetic cost a microsecond each
        s = shape if xf is x4 else xf.shape
        y = torch.view_as_real(torch.view_as_complex(xf.view(s[0], s[1], s[2], s[3] // 2, 2)) * cis).flatten(-2)
    else:
        y = torch.empty_like(xf)
        rope_into(y, xf, cis.real, cis.imag, rotary.interleaved, rot=cis)
    return y if y.dtype == x4.dtype else y.to(x4.dtype)
